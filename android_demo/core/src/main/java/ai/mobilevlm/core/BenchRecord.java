package ai.mobilevlm.core;

import java.text.SimpleDateFormat;
import java.util.ArrayList;
import java.util.Collections;
import java.util.Date;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Locale;
import java.util.Map;
import java.util.TimeZone;

/**
 * A results record in the schema of {@code mobilevlm/benchmarks} ("mobilevlm-bench/1", one JSON object
 * per line of results.jsonl), built from measurements on the phone, so {@code mobilevlm report} shows
 * phone figures beside host ones. Metric names and units are the benchmark worker's; where the phone
 * measures something slightly different the record says so under "notes".
 */
public final class BenchRecord {
    public static final String SCHEMA = "mobilevlm-bench/1";

    private BenchRecord() {
    }

    /** median / min / max / n, as the benchmark worker's {@code spread} (median of an even count: mean of the middle two). */
    public static Map<String, Object> spread(List<Double> values) {
        List<Double> sorted = new ArrayList<Double>();
        for (Double v : values) {
            if (v != null) {
                sorted.add(v);
            }
        }
        if (sorted.isEmpty()) {
            return null;
        }
        Collections.sort(sorted);
        int n = sorted.size();
        double median = n % 2 == 1 ? sorted.get(n / 2) : (sorted.get(n / 2 - 1) + sorted.get(n / 2)) / 2;
        Map<String, Object> m = new LinkedHashMap<String, Object>();
        m.put("median", median);
        m.put("min", sorted.get(0));
        m.put("max", sorted.get(n - 1));
        m.put("n", (long) n);
        return m;
    }

    public static String isoTimestamp(long epochMs) {
        SimpleDateFormat format = new SimpleDateFormat("yyyy-MM-dd'T'HH:mm:ss'Z'", Locale.ROOT);
        format.setTimeZone(TimeZone.getTimeZone("UTC"));
        return format.format(new Date(epochMs));
    }

    /** VmHWM (peak resident set) of a /proc/self/status text, in MB (MiB, as the worker's ru_maxrss / 1024). */
    public static Double peakRssMb(String procStatus) {
        for (String line : procStatus.split("\n")) {
            if (line.startsWith("VmHWM:")) {
                String[] parts = line.substring(6).trim().split("\\s+");
                try {
                    return Long.parseLong(parts[0]) / 1024.0;
                } catch (NumberFormatException e) {
                    return null;
                }
            }
        }
        return null;
    }

    /**
     * The record's "machine" in the shape of {@code benchmarks/machine.py}'s machine_facts (cpu.model,
     * cpu.machine, cpu.flags, cpu.logical_cores, memory_gib, os), plus the phone's maker and model.
     */
    public static Map<String, Object> machine(String socModel, String abi, List<String> cpuFeatures, int cores, Double memoryGib,
                                              String os, String manufacturer, String deviceModel) {
        Map<String, Object> cpu = new LinkedHashMap<String, Object>();
        cpu.put("model", socModel);
        cpu.put("machine", abi);
        cpu.put("flags", cpuFeatures);
        cpu.put("logical_cores", (long) cores);
        Map<String, Object> m = new LinkedHashMap<String, Object>();
        m.put("cpu", cpu);
        m.put("memory_gib", memoryGib);
        m.put("os", os);
        Map<String, Object> device = new LinkedHashMap<String, Object>();
        device.put("manufacturer", manufacturer);
        device.put("model", deviceModel);
        m.put("device", device);
        return m;
    }

    /** The measurements of one benchmark run of one artifact. */
    public static final class Measurements {
        public double loadS;
        public final List<Double> imageMs = new ArrayList<Double>();
        public final List<RunnerStats> runs = new ArrayList<RunnerStats>();
        public Double peakRssMb;
        public long fileBytes;
        public int threads;
        public final List<Map<String, Object>> answers = new ArrayList<Map<String, Object>>();
    }

    @SuppressWarnings("unchecked")
    public static Map<String, Object> build(Manifest manifest, Manifest.Artifact artifact, String bundlePath, Map<String, Object> machine,
                                            Map<String, Object> versions, Measurements m, long epochMs) {
        Map<String, Object> r = new LinkedHashMap<String, Object>();
        r.put("schema", SCHEMA);
        r.put("bundle", bundlePath);
        r.put("target", "adb");
        r.put("emulated", Boolean.FALSE);
        r.put("projected", Boolean.FALSE);
        r.put("machine", machine);
        r.put("versions", versions);
        Object toolkit = manifest.json.get("toolkit");
        r.put("git_commit", toolkit instanceof Map ? ((Map<String, Object>) toolkit).get("git_commit") : null);
        r.put("contender", artifact.name);
        r.put("backend", artifact.backend);
        r.put("model_config", manifest.modelConfig());
        r.put("quantization", artifact.quantization);
        r.put("threads", (long) m.threads);
        r.put("timestamp", isoTimestamp(epochMs));
        Map<String, Object> parity = new LinkedHashMap<String, Object>();
        Object p = artifact.json.get("parity");
        Map<String, Object> pm = p instanceof Map ? (Map<String, Object>) p : Collections.<String, Object>emptyMap();
        parity.put("token_agreement", pm.get("token_agreement"));
        parity.put("answers_identical", pm.get("answers_identical"));
        parity.put("num_cases", pm.get("num_cases"));
        Object accuracy = null;
        if (pm.get("task") instanceof Map && ((Map<String, Object>) pm.get("task")).get("artifact") instanceof Map) {
            accuracy = ((Map<String, Object>) ((Map<String, Object>) pm.get("task")).get("artifact")).get("closed_ended_accuracy");
        }
        parity.put("accuracy", accuracy);
        r.put("parity", parity);

        List<Double> ttft = new ArrayList<Double>();
        List<Double> decode = new ArrayList<Double>();
        List<Double> prefill = new ArrayList<Double>();
        long promptTokens = 0;
        long decodeTokens = 0;
        for (RunnerStats s : m.runs) {
            ttft.add(s.ttftMs());
            decode.add(s.decodeTokPerS());
            prefill.add(s.prefillTokPerS());
            promptTokens = s.promptTokens;
            decodeTokens = s.generatedTokens;
        }
        Map<String, Object> metrics = new LinkedHashMap<String, Object>();
        metrics.put("image_encode_ms", spread(m.imageMs));
        metrics.put("ttft_ms", spread(ttft));
        metrics.put("prompt_tokens", promptTokens);
        metrics.put("decode_tok_s", spread(decode));
        metrics.put("decode_tokens", decodeTokens);
        Map<String, Object> prefillByLength = new LinkedHashMap<String, Object>();
        Map<String, Object> prefillSpread = spread(prefill);
        if (prefillSpread != null) {
            prefillByLength.put(Long.toString(promptTokens), prefillSpread);
        }
        metrics.put("prefill_tok_s", prefillByLength);
        metrics.put("load_s", m.loadS);
        metrics.put("peak_rss_mb", m.peakRssMb);
        metrics.put("file_mb", m.fileBytes / 1e6);
        r.put("metrics", metrics);
        Map<String, Object> notes = new LinkedHashMap<String, Object>();
        notes.put("measured_by", "android_demo benchmark mode: ExecuTorch LlmModule on the phone, statistics from its runner");
        notes.put("image_encode_ms", "wall time of LlmModule.prefillImages: the vision encoder plus the decoder's prefill of the image tokens");
        notes.put("prefill_tok_s", "the runner's prefill rate for the whole text prompt of the first parity case (keyed by its token count), not a synthetic prefill");
        notes.put("ttft_ms", "runner's first_token_ms - inference_start_ms: prefill of the text after the image and the first token (the image was prefilled before)");
        notes.put("threads", "ExecuTorch's Android runner sizes its thread pool itself (performant cores - 1)");
        r.put("notes", notes);
        r.put("device_answers", m.answers);
        return r;
    }
}
