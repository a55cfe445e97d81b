package ai.mobilevlm.core;

import java.util.LinkedHashMap;
import java.util.Map;

/**
 * One generation's statistics: ExecuTorch's stats record (the JSON that Android's
 * {@code LlmCallback.onStats} receives and the runners print after "PyTorchObserver"), or the same
 * timestamps measured by an app whose runtime reports none (iOS). Rates use ExecuTorch's own formulas,
 * so they agree with its logs.
 */
public final class RunnerStats {
    public final long promptTokens;
    public final long generatedTokens;
    public final long modelLoadStartMs;
    public final long modelLoadEndMs;
    public final long inferenceStartMs;
    public final long promptEvalEndMs;
    public final long firstTokenMs;
    public final long inferenceEndMs;

    public RunnerStats(long promptTokens, long generatedTokens, long modelLoadStartMs, long modelLoadEndMs, long inferenceStartMs,
                       long promptEvalEndMs, long firstTokenMs, long inferenceEndMs) {
        this.promptTokens = promptTokens;
        this.generatedTokens = generatedTokens;
        this.modelLoadStartMs = modelLoadStartMs;
        this.modelLoadEndMs = modelLoadEndMs;
        this.inferenceStartMs = inferenceStartMs;
        this.promptEvalEndMs = promptEvalEndMs;
        this.firstTokenMs = firstTokenMs;
        this.inferenceEndMs = inferenceEndMs;
    }

    /** Parses the runner's stats JSON; a malformed record is an error naming the field. */
    public static RunnerStats parse(String json) throws BundleException {
        Object parsed;
        try {
            parsed = Json.parse(json);
        } catch (IllegalArgumentException e) {
            throw new BundleException("runner statistics: not valid JSON (" + e.getMessage() + ")");
        }
        if (!(parsed instanceof Map)) {
            throw new BundleException("runner statistics: expected a JSON object");
        }
        Map<?, ?> m = (Map<?, ?>) parsed;
        return new RunnerStats(field(m, "prompt_tokens"), field(m, "generated_tokens"), field(m, "model_load_start_ms"),
                field(m, "model_load_end_ms"), field(m, "inference_start_ms"), field(m, "prompt_eval_end_ms"),
                field(m, "first_token_ms"), field(m, "inference_end_ms"));
    }

    private static long field(Map<?, ?> m, String name) throws BundleException {
        Object v = m.get(name);
        if (!(v instanceof Number)) {
            throw new BundleException("runner statistics: field '" + name + "' missing or not a number");
        }
        return ((Number) v).longValue();
    }

    public Double prefillTokPerS() {
        long ms = promptEvalEndMs - inferenceStartMs;
        return ms > 0 ? promptTokens / (double) ms * 1000 : null;
    }

    public Double decodeTokPerS() {
        long ms = inferenceEndMs - promptEvalEndMs;
        return ms > 0 ? generatedTokens / (double) ms * 1000 : null;
    }

    public Double ttftMs() {
        return firstTokenMs >= inferenceStartMs ? Double.valueOf(firstTokenMs - inferenceStartMs) : null;
    }

    public Double loadS() {
        long ms = modelLoadEndMs - modelLoadStartMs;
        return ms > 0 ? ms / 1000.0 : null;
    }

    /** The line shown under an answer. */
    public String line() {
        return "prefill " + promptTokens + " tok @ " + Format.fixed(prefillTokPerS(), 1) + " tok/s · first token "
                + Format.fixed(ttftMs(), 0) + " ms · decode " + generatedTokens + " tok @ " + Format.fixed(decodeTokPerS(), 1)
                + " tok/s · load " + Format.fixed(loadS(), 2) + " s";
    }

    public Map<String, Object> toMap() {
        Map<String, Object> m = new LinkedHashMap<String, Object>();
        m.put("prompt_tokens", promptTokens);
        m.put("generated_tokens", generatedTokens);
        m.put("prefill_tok_s", prefillTokPerS());
        m.put("decode_tok_s", decodeTokPerS());
        m.put("ttft_ms", ttftMs());
        m.put("load_s", loadS());
        return m;
    }
}
