package ai.mobilevlm.core;

import java.util.List;

/**
 * Decides what of a runner's streamed text the user sees and when generation must stop: at an EOS id
 * (engines that report ids), at the first stop string (ExecuTorch's runners hand over the EOS token's
 * text, and do not stop when the very first token is EOS), or after max_new_tokens tokens. Text that
 * could be the start of a stop string is held back until the next piece shows it is not, so a stop
 * string split over two pieces never flashes on screen.
 */
public final class StopController {
    public enum Reason {
        /** still generating */
        NONE("generating"),
        STOP_STRING("stop_string"),
        EOS("eos"),
        MAX_NEW_TOKENS("max_new_tokens"),
        /** the runner finished on its own (its own EOS check or the sequence length) */
        END("end");

        public final String id;

        Reason(String id) {
            this.id = id;
        }
    }

    private final List<String> stopStrings;
    private final int[] eosIds;
    private final int maxNewTokens;
    private final StringBuilder shown = new StringBuilder();
    private String held = "";
    private int tokens;
    private Reason reason = Reason.NONE;

    public StopController(List<String> stopStrings, int[] eosIds, int maxNewTokens) {
        this.stopStrings = stopStrings;
        this.eosIds = eosIds;
        this.maxNewTokens = maxNewTokens;
    }

    public static StopController forPrompt(Manifest.PromptSpec spec, int maxNewTokens) {
        return new StopController(spec.stopStrings, spec.eosIds, maxNewTokens);
    }

    /** One piece of text (one token, or a few when the runner joins bytes into whole characters). Returns what to show now. */
    public String onText(String piece) {
        if (reason != Reason.NONE) {
            return "";
        }
        tokens++;
        String buffer = held + piece;
        int cut = -1;
        for (String stop : stopStrings) {
            int at = buffer.indexOf(stop);
            if (at >= 0 && (cut < 0 || at < cut)) {
                cut = at;
            }
        }
        if (cut >= 0) {
            held = "";
            reason = Reason.STOP_STRING;
            return show(buffer.substring(0, cut));
        }
        int keep = 0;
        for (String stop : stopStrings) {
            for (int n = Math.min(stop.length() - 1, buffer.length()); n > keep; n--) {
                if (buffer.endsWith(stop.substring(0, n))) {
                    keep = n;
                    break;
                }
            }
        }
        held = buffer.substring(buffer.length() - keep);
        String out = buffer.substring(0, buffer.length() - keep);
        if (tokens >= maxNewTokens) {
            reason = Reason.MAX_NEW_TOKENS;
            out += held;
            held = "";
        }
        return show(out);
    }

    /** One token from an engine that reports ids: an EOS id stops without showing its text. */
    public String onToken(int id, String piece) {
        if (reason != Reason.NONE) {
            return "";
        }
        for (int eos : eosIds) {
            if (eos == id) {
                tokens++;
                reason = Reason.EOS;
                String out = held;
                held = "";
                return show(out);
            }
        }
        return onText(piece);
    }

    /** The runner returned: shows what was held back (it was not a stop string). */
    public String finish() {
        String out = "";
        if (reason == Reason.NONE) {
            reason = Reason.END;
            out = held;
        }
        held = "";
        return show(out);
    }

    private String show(String text) {
        shown.append(text);
        return text;
    }

    public boolean stopped() {
        return reason != Reason.NONE;
    }

    public Reason reason() {
        return reason;
    }

    /** Everything shown so far: the answer. */
    public String text() {
        return shown.toString();
    }

    /** Pieces received, the stopping one included. */
    public int tokens() {
        return tokens;
    }
}
