package ai.mobilevlm.core;

import java.io.File;
import java.io.IOException;
import java.util.ArrayList;
import java.util.HashMap;
import java.util.List;
import java.util.Map;
import java.util.regex.Matcher;
import java.util.regex.Pattern;

/**
 * The bundle's tokenizer.json when it is a byte-level BPE (what {@code mobilevlm} trains: a
 * {@code ByteLevel} pre-tokenizer and a {@code BPE} model), reimplemented so the app can count prompt
 * tokens (the context check), and turn ids into text for engines without a tokenizer of their own.
 * Any other tokenizer type is a {@link BundleException} naming what was found.
 *
 * <p>As Hugging Face tokenizers does: added tokens (e.g. {@code </s>}) are split out first; the rest is
 * cut by the GPT-2 pattern, each piece's UTF-8 bytes mapped to the byte-level alphabet, and merged
 * by merge rank.
 */
public final class Tokenizer {
    /** Unicode White_Space, spelled out: what \\s means in the Rust tokenizer, the same in Java, Android and ICU. */
    static final String WS = "\\t\\n\\x0B\\f\\r \\x{85}\\x{A0}\\x{1680}\\x{2000}-\\x{200A}\\x{2028}\\x{2029}\\x{202F}\\x{205F}\\x{3000}";
    /** The GPT-2 split of Hugging Face's ByteLevel pre-tokenizer (use_regex). */
    static final String GPT2_PATTERN =
            "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^" + WS + "\\p{L}\\p{N}]+|[" + WS + "]+(?![^" + WS + "])|[" + WS + "]+";
    private static final Pattern GPT2_SPLIT = Pattern.compile(GPT2_PATTERN);

    private final Map<String, Integer> vocab = new HashMap<String, Integer>();
    private final Map<Integer, String> pieces = new HashMap<Integer, String>();
    private final Map<String, Integer> ranks = new HashMap<String, Integer>();
    private final List<String> addedTokens = new ArrayList<String>();
    private final Map<Integer, Boolean> special = new HashMap<Integer, Boolean>();
    private final boolean ignoreMerges;
    private static final char[] BYTE_TO_CHAR = new char[256];
    private static final Map<Character, Integer> CHAR_TO_BYTE = new HashMap<Character, Integer>();

    static {
        int extra = 0;
        for (int b = 0; b < 256; b++) {
            boolean printable = (b >= 0x21 && b <= 0x7E) || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
            char c = printable ? (char) b : (char) (0x100 + extra++);
            BYTE_TO_CHAR[b] = c;
            CHAR_TO_BYTE.put(c, b);
        }
    }

    public static Tokenizer load(File file) throws BundleException {
        String text;
        try {
            text = Files.readUtf8(file);
        } catch (IOException e) {
            throw new BundleException(file.getPath() + ": cannot read tokenizer (" + e.getMessage() + ")");
        }
        try {
            return new Tokenizer(file.getPath(), Json.parse(text));
        } catch (IllegalArgumentException e) {
            throw new BundleException(file.getPath() + ": not valid JSON (" + e.getMessage() + ")");
        }
    }

    @SuppressWarnings("unchecked")
    Tokenizer(String where, Object parsed) throws BundleException {
        if (!(parsed instanceof Map)) {
            throw new BundleException(where + ": not a tokenizer.json object");
        }
        Map<String, Object> json = (Map<String, Object>) parsed;
        Object model = json.get("model");
        if (!(model instanceof Map) || !"BPE".equals(((Map<?, ?>) model).get("type"))) {
            throw new BundleException(where + ": model.type must be 'BPE' (this app implements byte-level BPE), got "
                    + (model instanceof Map ? Json.write(((Map<?, ?>) model).get("type")) : "none"));
        }
        Object pre = json.get("pre_tokenizer");
        if (!(pre instanceof Map) || !"ByteLevel".equals(((Map<?, ?>) pre).get("type"))) {
            throw new BundleException(where + ": pre_tokenizer.type must be 'ByteLevel' (byte-level BPE), got "
                    + (pre instanceof Map ? Json.write(((Map<?, ?>) pre).get("type")) : Json.write(pre)));
        }
        if (Boolean.TRUE.equals(((Map<?, ?>) pre).get("add_prefix_space"))) {
            throw new BundleException(where + ": pre_tokenizer.add_prefix_space true is not supported");
        }
        if (json.get("normalizer") != null) {
            throw new BundleException(where + ": a normalizer is not supported (got " + Json.write(json.get("normalizer")) + ")");
        }
        Map<String, Object> m = (Map<String, Object>) model;
        ignoreMerges = Boolean.TRUE.equals(m.get("ignore_merges"));
        if (!(m.get("vocab") instanceof Map) || !(m.get("merges") instanceof List)) {
            throw new BundleException(where + ": model.vocab (object) and model.merges (list) are required");
        }
        for (Map.Entry<String, Object> e : ((Map<String, Object>) m.get("vocab")).entrySet()) {
            int id = (int) (long) (Long) e.getValue();
            vocab.put(e.getKey(), id);
            pieces.put(id, e.getKey());
        }
        List<Object> merges = (List<Object>) m.get("merges");
        for (int i = 0; i < merges.size(); i++) {
            Object merge = merges.get(i);
            String a;
            String b;
            if (merge instanceof List && ((List<?>) merge).size() == 2) {
                a = (String) ((List<?>) merge).get(0);
                b = (String) ((List<?>) merge).get(1);
            } else if (merge instanceof String && ((String) merge).indexOf(' ') > 0) {
                String s = (String) merge;
                a = s.substring(0, s.indexOf(' '));
                b = s.substring(s.indexOf(' ') + 1);
            } else {
                throw new BundleException(where + ": model.merges[" + i + "] must be a pair");
            }
            String key = a + " " + b;
            if (!ranks.containsKey(key)) {
                ranks.put(key, i);
            }
        }
        Object added = json.get("added_tokens");
        if (added instanceof List) {
            for (Object t : (List<Object>) added) {
                Map<String, Object> token = (Map<String, Object>) t;
                String content = (String) token.get("content");
                int id = (int) (long) (Long) token.get("id");
                addedTokens.add(content);
                vocab.put(content, id);
                pieces.put(id, content);
                special.put(id, Boolean.TRUE.equals(token.get("special")));
            }
        }
        // Longest first, so that a token that contains another wins.
        java.util.Collections.sort(addedTokens, new java.util.Comparator<String>() {
            @Override
            public int compare(String x, String y) {
                return y.length() - x.length();
            }
        });
    }

    public int vocabSize() {
        return pieces.size();
    }

    /** Token ids of {@code text} (no BOS: callers add it where the template says). */
    public int[] encode(String text) throws BundleException {
        List<Integer> ids = new ArrayList<Integer>();
        int start = 0;
        while (start < text.length()) {
            int best = -1;
            String bestToken = null;
            for (String token : addedTokens) {
                int at = text.indexOf(token, start);
                if (at >= 0 && (best < 0 || at < best)) {
                    best = at;
                    bestToken = token;
                }
            }
            int end = best < 0 ? text.length() : best;
            encodeSegment(text.substring(start, end), ids);
            if (best < 0) {
                break;
            }
            ids.add(vocab.get(bestToken));
            start = best + bestToken.length();
        }
        int[] out = new int[ids.size()];
        for (int i = 0; i < out.length; i++) {
            out[i] = ids.get(i);
        }
        return out;
    }

    private void encodeSegment(String segment, List<Integer> ids) throws BundleException {
        Matcher matcher = GPT2_SPLIT.matcher(segment);
        while (matcher.find()) {
            byte[] bytes = matcher.group().getBytes(Files.UTF8);
            StringBuilder word = new StringBuilder();
            for (byte b : bytes) {
                word.append(BYTE_TO_CHAR[b & 0xFF]);
            }
            String w = word.toString();
            if (ignoreMerges && vocab.containsKey(w)) {
                ids.add(vocab.get(w));
                continue;
            }
            for (String symbol : bpe(w)) {
                Integer id = vocab.get(symbol);
                if (id == null) {
                    throw new BundleException("tokenizer: no token for '" + symbol + "' (the vocabulary lacks a byte)");
                }
                ids.add(id);
            }
        }
    }

    private List<String> bpe(String word) {
        List<String> symbols = new ArrayList<String>();
        for (int i = 0; i < word.length(); i++) {
            symbols.add(String.valueOf(word.charAt(i)));
        }
        while (symbols.size() > 1) {
            int bestRank = Integer.MAX_VALUE;
            int bestAt = -1;
            for (int i = 0; i + 1 < symbols.size(); i++) {
                Integer rank = ranks.get(symbols.get(i) + " " + symbols.get(i + 1));
                if (rank != null && rank < bestRank) {
                    bestRank = rank;
                    bestAt = i;
                }
            }
            if (bestAt < 0) {
                break;
            }
            symbols.set(bestAt, symbols.get(bestAt) + symbols.get(bestAt + 1));
            symbols.remove(bestAt + 1);
        }
        return symbols;
    }

    /** The raw bytes one token stands for (part of a UTF-8 character, for some byte-level tokens). */
    public byte[] tokenBytes(int id) throws BundleException {
        String piece = pieces.get(id);
        if (piece == null) {
            throw new BundleException("tokenizer: token id " + id + " is outside the vocabulary");
        }
        if (special.containsKey(id)) {
            return piece.getBytes(Files.UTF8);
        }
        byte[] out = new byte[piece.length()];
        for (int i = 0; i < piece.length(); i++) {
            Integer b = CHAR_TO_BYTE.get(piece.charAt(i));
            if (b == null) {
                return piece.getBytes(Files.UTF8);
            }
            out[i] = (byte) (int) b;
        }
        return out;
    }

    public boolean isSpecial(int id) {
        return Boolean.TRUE.equals(special.get(id));
    }

    /** Text of {@code ids}, special tokens skipped, invalid UTF-8 replaced (as the Python tokenizer's decode). */
    public String decode(int[] ids) throws BundleException {
        java.io.ByteArrayOutputStream bytes = new java.io.ByteArrayOutputStream();
        for (int id : ids) {
            if (isSpecial(id)) {
                continue;
            }
            byte[] b = tokenBytes(id);
            bytes.write(b, 0, b.length);
        }
        return new String(bytes.toByteArray(), Files.UTF8);
    }
}
