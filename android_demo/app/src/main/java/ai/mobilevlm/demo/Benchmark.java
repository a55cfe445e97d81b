package ai.mobilevlm.demo;

import ai.mobilevlm.core.BenchRecord;
import ai.mobilevlm.core.BundleException;
import ai.mobilevlm.core.Engine;
import ai.mobilevlm.core.Files;
import ai.mobilevlm.core.Json;
import ai.mobilevlm.core.Manifest;
import ai.mobilevlm.core.RgbImage;
import ai.mobilevlm.core.Session;
import ai.mobilevlm.core.Tokenizer;
import android.content.Context;
import android.util.Log;
import java.io.File;
import java.io.IOException;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;

/**
 * Benchmark mode (started by an intent, see README): runs the bundle's parity prompts once each,
 * times the first one {@code repeats} times after {@code warmup} runs, and writes one results record
 * ("mobilevlm-bench/1") per line to files/results/results.jsonl, then files/results/status.json.
 */
final class Benchmark {
    static final String TAG = "MobileVLMBench";

    interface Progress {
        void say(String line);
    }

    private Benchmark() {
    }

    static File resultsDir(Context context) {
        return new File(context.getExternalFilesDir(null), "results");
    }

    static void run(Context context, File bundleDir, String artifactName, int repeats, int warmup, Progress progress) {
        File dir = resultsDir(context);
        File results = new File(dir, "results.jsonl");
        File status = new File(dir, "status.json");
        Map<String, Object> state = new LinkedHashMap<String, Object>();
        try {
            dir.mkdirs();
            results.delete();
            state.put("state", "running");
            Files.writeUtf8Atomically(status, Json.write(state) + "\n");
            Manifest manifest = Manifest.load(bundleDir, Manifest.Verify.SIZE);
            Tokenizer tokenizer = null;
            try {
                tokenizer = Tokenizer.load(manifest.file(manifest.tokenizerFile));
            } catch (BundleException e) {
                progress.say(e.getMessage() + " (prompts are not length-checked)");
            }
            List<Manifest.Artifact> artifacts = artifactName == null ? manifest.artifacts("executorch")
                    : java.util.Collections.singletonList(manifest.artifact(artifactName));
            if (artifacts.isEmpty()) {
                manifest.firstArtifact("executorch"); // throws the error that lists what the bundle has
            }
            StringBuilder lines = new StringBuilder();
            for (Manifest.Artifact artifact : artifacts) {
                progress.say(artifact.name + ": loading");
                lines.append(Json.write(measure(context, manifest, tokenizer, artifact, repeats, warmup, progress))).append('\n');
                Files.writeUtf8Atomically(results, lines.toString());
            }
            state.put("state", "done");
            state.put("records", (long) artifacts.size());
            state.put("results", results.getPath());
        } catch (BundleException | IOException | RuntimeException e) {
            state.put("state", "failed");
            state.put("error", e.getMessage() == null ? e.toString() : e.getMessage());
            Log.e(TAG, "benchmark failed: " + state.get("error"));
        }
        try {
            Files.writeUtf8Atomically(status, Json.write(state) + "\n");
        } catch (IOException e) {
            Log.e(TAG, "cannot write " + status + ": " + e.getMessage());
        }
        progress.say("benchmark " + state.get("state") + (state.containsKey("error") ? ": " + state.get("error") : "") + " → " + status);
        Log.i(TAG, "status " + Json.write(state));
    }

    private static Map<String, Object> measure(Context context, Manifest manifest, Tokenizer tokenizer, Manifest.Artifact artifact,
                                               int repeats, int warmup, Progress progress) throws BundleException {
        BenchRecord.Measurements m = new BenchRecord.Measurements();
        m.fileBytes = manifest.file(artifact.file).length();
        m.threads = Math.max(1, Runtime.getRuntime().availableProcessors() - 1);
        long started = System.nanoTime();
        Engine engine = Engines.create(manifest, artifact);
        try {
            engine.load();
            m.loadS = (System.nanoTime() - started) / 1e9;
            Session session = new Session(manifest, tokenizer, engine);
            Map<String, String> expected = expectedAnswers(artifact);
            for (Manifest.ParityCase c : manifest.parityCases) {
                RgbImage image = Pictures.decode(manifest.file(c.image));
                Session.Answer answer = session.ask(image, c.question, c.maxNewTokens, null);
                Map<String, Object> row = new LinkedHashMap<String, Object>();
                row.put("case", c.id);
                row.put("question", c.question);
                row.put("answer", answer.text);
                row.put("expected", expected.get(c.id));
                row.put("match", expected.containsKey(c.id) ? answer.text.equals(expected.get(c.id)) : null);
                row.put("stop", answer.reason.id);
                m.answers.add(row);
                progress.say(artifact.name + " " + c.id + ": " + answer.text);
            }
            if (!manifest.parityCases.isEmpty()) {
                Manifest.ParityCase first = manifest.parityCases.get(0);
                RgbImage image = Pictures.decode(manifest.file(first.image));
                for (int i = 0; i < warmup + repeats; i++) {
                    Session.Answer answer = session.ask(image, first.question, first.maxNewTokens, null);
                    if (i >= warmup) {
                        if (answer.stats != null) {
                            m.runs.add(answer.stats);
                        }
                        m.imageMs.add(engine.lastImageMs());
                    }
                    progress.say(artifact.name + " timing run " + (i + 1) + "/" + (warmup + repeats)
                            + (answer.stats != null ? ": " + answer.stats.line() : ""));
                }
            }
            m.peakRssMb = DeviceFacts.peakRssMb();
        } finally {
            engine.close();
        }
        return BenchRecord.build(manifest, artifact, manifest.root.getPath(), DeviceFacts.machine(context), DeviceFacts.versions(context), m,
                System.currentTimeMillis());
    }

    /** The artifact's answers at export time (manifest parity), by case id. */
    private static Map<String, String> expectedAnswers(Manifest.Artifact artifact) {
        Map<String, String> out = new LinkedHashMap<String, String>();
        Object parity = artifact.json.get("parity");
        if (parity instanceof Map && ((Map<?, ?>) parity).get("cases") instanceof List) {
            for (Object row : (List<?>) ((Map<?, ?>) parity).get("cases")) {
                if (row instanceof Map && ((Map<?, ?>) row).get("case") instanceof String && ((Map<?, ?>) row).get("artifact") instanceof String) {
                    out.put((String) ((Map<?, ?>) row).get("case"), (String) ((Map<?, ?>) row).get("artifact"));
                }
            }
        }
        return out;
    }
}
