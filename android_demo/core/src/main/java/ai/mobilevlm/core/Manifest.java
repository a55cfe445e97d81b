package ai.mobilevlm.core;

import java.io.File;
import java.io.FileInputStream;
import java.io.IOException;
import java.io.InputStream;
import java.util.ArrayList;
import java.util.Collections;
import java.util.List;
import java.util.Map;

/**
 * A bundle's manifest.json, read and checked the way {@code mobilevlm.export.bundle.load_bundle}
 * checks it: the format and its version, the required fields, that every listed file stays inside the
 * bundle folder and exists (and, as asked, has the recorded size or SHA-256), that every artifact's
 * file is listed and present. Then the fields an app needs are read into typed values, each problem a
 * {@link BundleException} naming the file and the field.
 */
public final class Manifest {
    public static final String FILE = "manifest.json";
    public static final String FORMAT = "mobilevlm-bundle";
    /** The newest manifest format_version this app reads. */
    public static final int FORMAT_VERSION = 1;

    /** How much of each listed file to check when loading. */
    public enum Verify {
        /** the file exists */
        EXISTS,
        /** and has the recorded size (cheap; the app's default) */
        SIZE,
        /** and has the recorded SHA-256 (reads every byte) */
        SHA256
    }

    public final File root;
    public final Map<String, Object> json;
    public final ImageSpec image;
    public final PromptSpec prompt;
    public final List<Artifact> artifacts;
    public final List<ParityCase> parityCases;
    public final String tokenizerFile;
    private final String where;

    private Manifest(File root, Map<String, Object> json) throws BundleException {
        this.root = root;
        this.json = json;
        this.where = new File(root, FILE).getPath();
        refuseUndrivable(where, json);
        this.image = new ImageSpec(where, object(json, "preprocessing", where));
        this.prompt = new PromptSpec(where, object(json, "prompt", where));
        this.tokenizerFile = string(object(json, "tokenizer", where), "file", where + ": tokenizer");
        List<Artifact> found = new ArrayList<Artifact>();
        List<Object> list = list(json, "artifacts", where);
        for (int i = 0; i < list.size(); i++) {
            found.add(new Artifact(where, i, list.get(i)));
        }
        this.artifacts = Collections.unmodifiableList(found);
        List<ParityCase> cases = new ArrayList<ParityCase>();
        Object parity = json.get("parity");
        if (parity instanceof Map && ((Map<?, ?>) parity).get("cases") instanceof List) {
            List<?> rows = (List<?>) ((Map<?, ?>) parity).get("cases");
            for (int i = 0; i < rows.size(); i++) {
                cases.add(new ParityCase(where, i, rows.get(i)));
            }
        }
        this.parityCases = Collections.unmodifiableList(cases);
    }

    /** The end of every refusal of a program whose methods take more than the apps' runner flow passes. */
    private static final String RUNNER_ONLY = "; the demo app drives MultimodalRunner-style programs only";

    /**
     * Refuses bundles the apps would otherwise run wrongly rather than fail on: the apps prepare one
     * S x S image for {@code vision_encoder} and call {@code text_decoder(embeddings, input_pos)}, so a
     * tiled model (its encoder takes several views) or a feature-level interface (its decoder takes the
     * image as a third input) would load and then answer from garbage. Absent fields mean the flow the
     * apps drive, so older bundles load as before.
     */
    static void refuseUndrivable(String where, Map<String, Object> json) throws BundleException {
        Object pre = json.get("preprocessing");
        if (pre instanceof Map && ((Map<?, ?>) pre).get("tiling") != null) {
            throw new BundleException(where + ": this bundle tiles images (preprocessing.tiling); the demo app drives single-image programs only");
        }
        Object model = json.get("model");
        Object config = model instanceof Map ? ((Map<?, ?>) model).get("config") : null;
        Object modelInterface = config instanceof Map ? ((Map<?, ?>) config).get("interface") : null;
        if (modelInterface != null && !"token".equals(modelInterface)) {
            throw new BundleException(where + ": text_decoder takes an image input (model.config.interface " + bare(modelInterface) + ")"
                    + RUNNER_ONLY);
        }
        Object artifacts = json.get("artifacts");
        if (!(artifacts instanceof List)) {
            return;
        }
        List<?> list = (List<?>) artifacts;
        for (int i = 0; i < list.size(); i++) {
            Object a = list.get(i);
            Object methods = a instanceof Map ? ((Map<?, ?>) a).get("methods") : null;
            Object decoder = methods instanceof Map ? ((Map<?, ?>) methods).get("text_decoder") : null;
            String reason = decoder instanceof Map ? decoderMismatch((Map<?, ?>) decoder) : null;
            if (reason != null) {
                Object name = ((Map<?, ?>) a).get("name");
                throw new BundleException(where + ": artifacts[" + i + "]" + (name instanceof String ? " (" + name + ")" : "") + ": " + reason
                        + RUNNER_ONLY);
            }
        }
    }

    /** Why an artifact's {@code methods.text_decoder} is not {@code (embeddings, input_pos)}, or null. */
    private static String decoderMismatch(Map<?, ?> decoder) {
        Object kind = decoder.get("interface");
        if (kind != null && !"token".equals(kind)) {
            return "text_decoder takes an image input (interface " + bare(kind) + ")";
        }
        if (Boolean.FALSE.equals(decoder.get("multimodal_runner"))) {
            return "text_decoder is marked multimodal_runner false";
        }
        Object inputs = decoder.get("inputs");
        if (inputs instanceof List && ((List<?>) inputs).size() > 2) {
            StringBuilder names = new StringBuilder();
            for (Object input : (List<?>) inputs) {
                Object name = input instanceof Map ? ((Map<?, ?>) input).get("name") : null;
                names.append(names.length() == 0 ? "" : ", ").append(name instanceof String ? (String) name : "?");
            }
            return "text_decoder takes " + ((List<?>) inputs).size() + " inputs (" + names + "), not embeddings and input_pos";
        }
        return null;
    }

    /** A string as it is, anything else as JSON (for naming a field's value in a message). */
    private static String bare(Object value) {
        return value instanceof String ? (String) value : Json.write(value);
    }

    /** Reads and validates {@code root/manifest.json}. */
    public static Manifest load(File root, Verify verify) throws BundleException {
        if (!root.isDirectory()) {
            throw new BundleException(root.getPath() + ": no such bundle folder");
        }
        File file = new File(root, FILE);
        if (!file.isFile()) {
            throw new BundleException(file.getPath() + ": missing (not a bundle written by mobilevlm export)");
        }
        String text;
        try {
            text = Files.readUtf8(file);
        } catch (IOException e) {
            throw new BundleException(file.getPath() + ": cannot read (" + e.getMessage() + ")");
        }
        return parse(root, text, verify);
    }

    /** Validates manifest text as if it were {@code root/manifest.json}. */
    public static Manifest parse(File root, String text, Verify verify) throws BundleException {
        String where = new File(root, FILE).getPath();
        Object parsed;
        try {
            parsed = Json.parse(text);
        } catch (IllegalArgumentException e) {
            throw new BundleException(where + ": not valid JSON (" + e.getMessage() + ")");
        }
        if (!(parsed instanceof Map) || !FORMAT.equals(((Map<?, ?>) parsed).get("format"))) {
            throw new BundleException(where + ": field 'format' must be '" + FORMAT + "'");
        }
        @SuppressWarnings("unchecked")
        Map<String, Object> json = (Map<String, Object>) parsed;
        Object version = json.get("format_version");
        if (!(version instanceof Long)) {
            throw new BundleException(where + ": field 'format_version' must be an integer, got " + Json.write(version));
        }
        long v = (Long) version;
        if (v > FORMAT_VERSION) {
            throw new BundleException(where + ": format_version " + v + " is newer than this app reads (" + FORMAT_VERSION
                    + "); update the app");
        }
        if (v < 1) {
            throw new BundleException(where + ": format_version " + v + " is not a version this app knows (it reads 1 to "
                    + FORMAT_VERSION + ")");
        }
        String[] required = {"model", "preprocessing", "prompt", "tokenizer", "artifacts", "files"};
        for (String field : required) {
            if (!json.containsKey(field)) {
                throw new BundleException(where + ": missing field '" + field + "'");
            }
        }
        if (!(json.get("files") instanceof Map) || !(json.get("artifacts") instanceof List)) {
            throw new BundleException(where + ": fields 'files' (object) and 'artifacts' (list) have the wrong type");
        }
        Map<?, ?> files = (Map<?, ?>) json.get("files");
        for (Map.Entry<?, ?> entry : files.entrySet()) {
            String relative = String.valueOf(entry.getKey());
            File f = resolveInside(root, relative);
            if (!f.exists()) {
                throw new BundleException(where + ": listed file '" + relative + "' is missing from the bundle");
            }
            if (verify != Verify.EXISTS) {
                checkFile(root, relative, f, entry.getValue(), verify);
            }
        }
        List<?> artifacts = (List<?>) json.get("artifacts");
        for (int i = 0; i < artifacts.size(); i++) {
            Object a = artifacts.get(i);
            if (!(a instanceof Map) || !(((Map<?, ?>) a).get("file") instanceof String) || !(((Map<?, ?>) a).get("backend") instanceof String)) {
                throw new BundleException(where + ": artifacts[" + i + "] needs 'backend' and 'file'");
            }
            String relative = (String) ((Map<?, ?>) a).get("file");
            File f = resolveInside(root, relative);
            if (!listed(files, relative)) {
                throw new BundleException(where + ": artifacts[" + i + "].file '" + relative + "' is not listed under 'files'");
            }
            if (!f.exists()) {
                throw new BundleException(f.getPath() + ": artifact file missing");
            }
        }
        return new Manifest(root, json);
    }

    private static boolean listed(Map<?, ?> files, String relative) {
        if (files.containsKey(relative)) {
            return true;
        }
        String prefix = relative.replaceAll("/+$", "") + "/";
        for (Object key : files.keySet()) {
            if (String.valueOf(key).startsWith(prefix)) {
                return true;
            }
        }
        return false;
    }

    private static void checkFile(File root, String relative, File f, Object info, Verify verify) throws BundleException {
        if (!(info instanceof Map)) {
            throw new BundleException(new File(root, FILE).getPath() + ": files['" + relative + "'] must be an object with bytes and sha256");
        }
        Object bytes = ((Map<?, ?>) info).get("bytes");
        if (bytes instanceof Long && f.length() != (Long) bytes) {
            throw new BundleException(f.getPath() + ": size " + f.length() + " bytes does not match the manifest's " + bytes
                    + " (file changed or copied incompletely)");
        }
        if (verify == Verify.SHA256) {
            String digest;
            try {
                InputStream in = new FileInputStream(f);
                try {
                    digest = Sha256.hex(in);
                } finally {
                    in.close();
                }
            } catch (IOException e) {
                throw new BundleException(f.getPath() + ": cannot read (" + e.getMessage() + ")");
            }
            if (!digest.equals(((Map<?, ?>) info).get("sha256"))) {
                throw new BundleException(f.getPath() + ": SHA-256 does not match the manifest (file changed or corrupt)");
            }
        }
    }

    /** {@code root/relative}, refusing absolute paths and any path that leaves the bundle folder. */
    public static File resolveInside(File root, String relative) throws BundleException {
        String where = new File(root, FILE).getPath();
        if (relative == null || relative.isEmpty() || relative.startsWith("/") || relative.startsWith("\\")
                || (relative.length() > 1 && relative.charAt(1) == ':')) {
            throw new BundleException(where + ": file path " + Json.write(relative) + " must be a relative path inside the bundle");
        }
        try {
            File base = root.getCanonicalFile();
            File f = new File(base, relative).getCanonicalFile();
            String b = base.getPath().endsWith(File.separator) ? base.getPath() : base.getPath() + File.separator;
            if (!f.getPath().startsWith(b) && !f.equals(base)) {
                throw new BundleException(where + ": file path " + Json.write(relative) + " escapes the bundle folder");
            }
            return f;
        } catch (IOException e) {
            throw new BundleException(where + ": file path " + Json.write(relative) + " cannot be resolved (" + e.getMessage() + ")");
        }
    }

    public File file(String relative) throws BundleException {
        return resolveInside(root, relative);
    }

    /** The artifacts of one backend, in manifest order. */
    public List<Artifact> artifacts(String backend) {
        List<Artifact> out = new ArrayList<Artifact>();
        for (Artifact a : artifacts) {
            if (a.backend.equals(backend)) {
                out.add(a);
            }
        }
        return out;
    }

    /** The first artifact of {@code backend}, or an error listing what the bundle has. */
    public Artifact firstArtifact(String backend) throws BundleException {
        List<Artifact> found = artifacts(backend);
        if (found.isEmpty()) {
            StringBuilder names = new StringBuilder();
            for (Artifact a : artifacts) {
                names.append(names.length() == 0 ? "" : ", ").append(a.name).append(" (").append(a.backend).append(')');
            }
            throw new BundleException(where + ": no " + backend + " artifact in this bundle (it has: "
                    + (names.length() == 0 ? "none" : names.toString()) + ")");
        }
        return found.get(0);
    }

    public Artifact artifact(String name) throws BundleException {
        for (Artifact a : artifacts) {
            if (a.name.equals(name)) {
                return a;
            }
        }
        throw new BundleException(where + ": no artifact named '" + name + "'");
    }

    /** The model config's text section (for results records), or an empty map. */
    public Map<String, Object> modelConfig() {
        Object model = json.get("model");
        if (model instanceof Map && ((Map<?, ?>) model).get("config") instanceof Map) {
            @SuppressWarnings("unchecked")
            Map<String, Object> config = (Map<String, Object>) ((Map<?, ?>) model).get("config");
            return config;
        }
        return Collections.emptyMap();
    }

    // --- typed sections ---------------------------------------------------------------------------

    /** manifest["preprocessing"]: how a picture becomes the uint8 [1, 3, S, S] tensor. */
    public static final class ImageSpec {
        public final int size;
        public final String aspectMode;
        public final int[] padColor;
        public final String resize;
        public final String channelOrder;

        ImageSpec(String where, Map<String, Object> pre) throws BundleException {
            String w = where + ": preprocessing";
            size = (int) integer(pre, "image_size", w, 1, 8192);
            aspectMode = string(pre, "aspect_mode", w);
            if (!aspectMode.equals("pad") && !aspectMode.equals("crop") && !aspectMode.equals("resize")) {
                throw new BundleException(w + ".aspect_mode is '" + aspectMode + "'; this app knows pad, crop and resize");
            }
            List<Object> pad = list(pre, "pad_color", w);
            if (pad.size() != 3) {
                throw new BundleException(w + ".pad_color must be 3 integers 0-255");
            }
            padColor = new int[3];
            for (int i = 0; i < 3; i++) {
                Object c = pad.get(i);
                if (!(c instanceof Long) || (Long) c < 0 || (Long) c > 255) {
                    throw new BundleException(w + ".pad_color must be 3 integers 0-255");
                }
                padColor[i] = (int) (long) (Long) c;
            }
            resize = string(pre, "resize", w);
            if (!resize.equals("bicubic")) {
                throw new BundleException(w + ".resize is '" + resize + "'; this app implements bicubic (PIL's BICUBIC)");
            }
            channelOrder = string(pre, "channel_order", w);
            if (!channelOrder.equals("RGB")) {
                throw new BundleException(w + ".channel_order is '" + channelOrder + "'; this app produces RGB");
            }
        }
    }

    /** manifest["prompt"]: the text around the image, special token ids and stop conditions. */
    public static final class PromptSpec {
        public final String beforeImage;
        public final String afterImage;
        public final String slot;
        public final boolean addBos;
        public final int bosId;
        public final int[] eosIds;
        public final List<String> stopStrings;
        public final int[] beforeImageIds;
        public final int imageTokens;
        public final int contextLength;

        PromptSpec(String where, Map<String, Object> p) throws BundleException {
            String w = where + ": prompt";
            beforeImage = string(p, "before_image", w);
            afterImage = string(p, "after_image", w);
            slot = string(p, "prompt_slot", w);
            if (!afterImage.contains(slot) && !beforeImage.contains(slot)) {
                throw new BundleException(w + ": neither before_image nor after_image contains the prompt_slot '" + slot + "'");
            }
            Object bos = p.get("add_bos");
            if (!(bos instanceof Boolean)) {
                throw new BundleException(w + ".add_bos must be true or false");
            }
            addBos = (Boolean) bos;
            bosId = (int) integer(p, "bos_id", w, 0, Integer.MAX_VALUE);
            eosIds = ints(list(p, "eos_ids", w), w + ".eos_ids");
            List<String> stops = new ArrayList<String>();
            for (Object s : list(p, "stop_strings", w)) {
                if (!(s instanceof String) || ((String) s).isEmpty()) {
                    throw new BundleException(w + ".stop_strings must be non-empty strings");
                }
                stops.add((String) s);
            }
            stopStrings = Collections.unmodifiableList(stops);
            beforeImageIds = ints(list(p, "before_image_ids", w), w + ".before_image_ids");
            imageTokens = (int) integer(p, "image_tokens", w, 1, Integer.MAX_VALUE);
            contextLength = (int) integer(p, "context_length", w, 2, Integer.MAX_VALUE);
        }
    }

    /** One entry of manifest["artifacts"]. */
    public static final class Artifact {
        public final String name;
        public final String backend;
        public final String file;
        public final String quantization;
        public final Map<String, Object> json;

        @SuppressWarnings("unchecked")
        Artifact(String where, int index, Object raw) throws BundleException {
            String w = where + ": artifacts[" + index + "]";
            if (!(raw instanceof Map)) {
                throw new BundleException(w + " must be an object");
            }
            json = (Map<String, Object>) raw;
            backend = string(json, "backend", w);
            file = string(json, "file", w);
            name = json.get("name") instanceof String ? (String) json.get("name") : backend + "-" + index;
            Object q = json.get("quantization");
            quantization = q instanceof Map && ((Map<?, ?>) q).get("recipe") instanceof String ? (String) ((Map<?, ?>) q).get("recipe") : "unknown";
        }

        /** A method's section (e.g. "vision" of a Core ML artifact), or null. */
        @SuppressWarnings("unchecked")
        public Map<String, Object> method(String method) {
            Object methods = json.get("methods");
            if (methods instanceof Map && ((Map<?, ?>) methods).get(method) instanceof Map) {
                return (Map<String, Object>) ((Map<?, ?>) methods).get(method);
            }
            return null;
        }
    }

    /** One of manifest["parity"]["cases"]: an image and question the exporter checked. */
    public static final class ParityCase {
        public final String id;
        public final String image;
        public final String question;
        public final int maxNewTokens;

        ParityCase(String where, int index, Object raw) throws BundleException {
            String w = where + ": parity.cases[" + index + "]";
            if (!(raw instanceof Map)) {
                throw new BundleException(w + " must be an object");
            }
            @SuppressWarnings("unchecked")
            Map<String, Object> c = (Map<String, Object>) raw;
            id = string(c, "id", w);
            image = string(c, "image", w);
            question = string(c, "question", w);
            maxNewTokens = c.containsKey("max_new_tokens") ? (int) integer(c, "max_new_tokens", w, 1, Integer.MAX_VALUE) : 32;
        }
    }

    // --- field readers ----------------------------------------------------------------------------

    @SuppressWarnings("unchecked")
    static Map<String, Object> object(Map<String, Object> json, String field, String where) throws BundleException {
        Object v = json.get(field);
        if (!(v instanceof Map)) {
            throw new BundleException(where + ": field '" + field + "' must be an object");
        }
        return (Map<String, Object>) v;
    }

    @SuppressWarnings("unchecked")
    static List<Object> list(Map<String, Object> json, String field, String where) throws BundleException {
        Object v = json.get(field);
        if (!(v instanceof List)) {
            throw new BundleException(where + "." + field + " must be a list");
        }
        return (List<Object>) v;
    }

    static String string(Map<String, Object> json, String field, String where) throws BundleException {
        Object v = json.get(field);
        if (!(v instanceof String)) {
            throw new BundleException(where + "." + field + " must be a string" + (v == null ? " (missing)" : ""));
        }
        return (String) v;
    }

    static long integer(Map<String, Object> json, String field, String where, long min, long max) throws BundleException {
        Object v = json.get(field);
        if (!(v instanceof Long) || (Long) v < min || (Long) v > max) {
            throw new BundleException(where + "." + field + " must be an integer from " + min + " to " + max + ", got " + Json.write(v));
        }
        return (Long) v;
    }

    static int[] ints(List<Object> list, String where) throws BundleException {
        int[] out = new int[list.size()];
        for (int i = 0; i < out.length; i++) {
            Object v = list.get(i);
            if (!(v instanceof Long) || (Long) v < 0 || (Long) v > Integer.MAX_VALUE) {
                throw new BundleException(where + "[" + i + "] must be a token id (a non-negative integer)");
            }
            out[i] = (int) (long) (Long) v;
        }
        return out;
    }
}
