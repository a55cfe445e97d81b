package ai.mobilevlm.core;

import static org.junit.Assert.assertArrayEquals;
import static org.junit.Assert.assertEquals;
import static org.junit.Assert.assertTrue;

import java.io.File;
import java.util.ArrayList;
import java.util.Arrays;
import java.util.List;
import java.util.Map;
import java.util.Random;
import org.junit.Rule;
import org.junit.Test;
import org.junit.rules.TemporaryFolder;

/** Resampling against a plain floating-point bicubic (tolerance), stop conditions, the session and the results record. */
public class CoreTest {
    @Rule
    public TemporaryFolder tmp = new TemporaryFolder();

    /** A textbook separable bicubic in doubles (antialiased like PIL), rounded once at the end. */
    private static double[] reference(RgbImage in, int outW, int outH) {
        double[] horizontal = new double[outW * in.height * 3];
        double sx = (double) in.width / outW;
        double fx = Math.max(1.0, sx);
        for (int y = 0; y < in.height; y++) {
            for (int x = 0; x < outW; x++) {
                double center = (x + 0.5) * sx;
                double[] acc = new double[3];
                double norm = 0;
                for (int i = 0; i < in.width; i++) {
                    double w = ImagePreprocessor.bicubic((i + 0.5 - center) / fx);
                    norm += w;
                    for (int c = 0; c < 3; c++) {
                        acc[c] += w * (in.rgb[3 * (y * in.width + i) + c] & 0xFF);
                    }
                }
                for (int c = 0; c < 3; c++) {
                    horizontal[3 * (y * outW + x) + c] = acc[c] / norm;
                }
            }
        }
        double[] out = new double[outW * outH * 3];
        double sy = (double) in.height / outH;
        double fy = Math.max(1.0, sy);
        for (int y = 0; y < outH; y++) {
            double center = (y + 0.5) * sy;
            for (int x = 0; x < outW; x++) {
                double[] acc = new double[3];
                double norm = 0;
                for (int j = 0; j < in.height; j++) {
                    double w = ImagePreprocessor.bicubic((j + 0.5 - center) / fy);
                    norm += w;
                    for (int c = 0; c < 3; c++) {
                        acc[c] += w * horizontal[3 * (j * outW + x) + c];
                    }
                }
                for (int c = 0; c < 3; c++) {
                    out[3 * (y * outW + x) + c] = Math.max(0, Math.min(255, acc[c] / norm));
                }
            }
        }
        return out;
    }

    @Test
    public void resamplingStaysWithinOneLevelOfAFloatingPointBicubic() {
        Random random = new Random(7);
        int[][] sizes = {{64, 48, 32, 32}, {20, 13, 32, 32}, {97, 97, 32, 32}, {33, 70, 17, 23}};
        for (int[] s : sizes) {
            byte[] rgb = new byte[s[0] * s[1] * 3];
            for (int i = 0; i < rgb.length; i++) {
                // smooth content plus noise: the two passes' intermediate rounding is what differs
                rgb[i] = (byte) Math.max(0, Math.min(255, (i % (3 * s[0])) * 255 / (3 * s[0]) + random.nextInt(9) - 4));
            }
            RgbImage in = new RgbImage(s[0], s[1], rgb);
            RgbImage ours = ImagePreprocessor.resize(in, s[2], s[3]);
            double[] ref = reference(in, s[2], s[3]);
            double worst = 0;
            for (int i = 0; i < ref.length; i++) {
                worst = Math.max(worst, Math.abs((ours.rgb[i] & 0xFF) - ref[i]));
            }
            assertTrue(Arrays.toString(s) + ": off by " + worst, worst <= 1.5);
        }
    }

    @Test
    public void aConstantPictureStaysConstant() {
        RgbImage flat = RgbImage.filled(50, 30, new int[] {10, 200, 255});
        byte[] chw = ImagePreprocessor.prepare(flat, 32, "pad", new int[] {10, 200, 255}).toChw();
        for (int i = 0; i < 32 * 32; i++) {
            assertEquals(10, chw[i] & 0xFF);
            assertEquals(200, chw[1024 + i] & 0xFF);
            assertEquals(255, chw[2048 + i] & 0xFF);
        }
    }

    @Test
    public void paddingCentresThePictureOnThePadColour() {
        RgbImage img = RgbImage.filled(4, 2, new int[] {255, 0, 0});
        RgbImage square = img.paddedToSquare(new int[] {1, 2, 3});
        assertEquals(4, square.width);
        assertEquals(1, square.rgb[0] & 0xFF);
        assertEquals(255, square.rgb[3 * 4] & 0xFF);
        assertEquals(1, square.rgb[3 * 12] & 0xFF);
    }

    @Test
    public void exifOrientationsTurnThePictureUpright() {
        // 2 x 1 picture: A B. Orientation 6 (rotate 90 clockwise) gives a 1 x 2 picture A over B.
        RgbImage img = new RgbImage(2, 1, new byte[] {1, 1, 1, 2, 2, 2});
        assertArrayEquals(new byte[] {1, 1, 1, 2, 2, 2}, img.oriented(6).rgb);
        assertArrayEquals(new byte[] {2, 2, 2, 1, 1, 1}, img.oriented(8).rgb);
        assertArrayEquals(new byte[] {2, 2, 2, 1, 1, 1}, img.oriented(2).rgb);
        assertEquals(1, img.oriented(6).width);
        assertArrayEquals(img.rgb, img.oriented(1).rgb);
    }

    @Test
    public void transparentPixelsBecomeWhite() {
        RgbImage img = RgbImage.fromRgba(2, 1, new byte[] {0, 0, 0, 0, 10, 20, 30, (byte) 255});
        assertArrayEquals(new byte[] {(byte) 255, (byte) 255, (byte) 255, 10, 20, 30}, img.rgb);
        assertEquals(128, RgbImage.compositeOverWhite(0, 127) + 0);
    }

    @Test
    public void aStopStringHeldBackIsNeverShown() {
        StopController c = new StopController(Arrays.asList("</s>", "###"), new int[] {2}, 100);
        assertEquals("yes ", c.onText("yes <"));
        assertEquals("", c.onText("/"));
        assertEquals("", c.onText("s>"));
        assertTrue(c.stopped());
        assertEquals("yes ", c.text());
        assertEquals(StopController.Reason.STOP_STRING, c.reason());
        assertEquals("", c.onText("more"));
    }

    @Test
    public void anEosIdStopsWithoutItsText() {
        StopController c = new StopController(Arrays.asList("</s>"), new int[] {2, 7}, 100);
        c.onToken(5, "red");
        c.onToken(7, "<|end|>");
        assertEquals("red", c.text());
        assertEquals(StopController.Reason.EOS, c.reason());
    }

    /** A test double that replays pieces: it stands in for a runtime in these JVM tests only. */
    static final class ReplayEngine implements Engine {
        final List<String> pieces;
        Request seen;
        int stopCalls;

        ReplayEngine(String... pieces) {
            this.pieces = Arrays.asList(pieces);
        }

        @Override
        public void load() {
        }

        @Override
        public RunnerStats generate(Request request, Sink sink) {
            seen = request;
            for (String p : pieces) {
                if (stopCalls > 0) {
                    break;
                }
                sink.onPiece(p);
            }
            return new RunnerStats(17, 3, 0, 1500, 100, 150, 160, 400);
        }

        @Override
        public double lastImageMs() {
            return -1;
        }

        @Override
        public void stop() {
            stopCalls++;
        }

        @Override
        public void close() {
        }
    }

    @Test
    public void theSessionDrivesAnEngineAsTheManifestSays() throws Exception {
        File root = tmp.newFolder("b");
        Files.writeUtf8Atomically(new File(root, "model.pte"), "hello");
        Files.writeUtf8Atomically(new File(root, "tokenizer.json"), "{}");
        Files.writeUtf8Atomically(new File(root, "manifest.json"), ManifestTest.manifest(ManifestTest.GOOD, 1));
        Manifest m = Manifest.load(root, Manifest.Verify.SIZE);
        ReplayEngine engine = new ReplayEngine(" red", " circle", "</", "s>", " junk");
        final List<String> updates = new ArrayList<String>();
        Session session = new Session(m, null, engine);
        Session.Answer answer = session.ask(RgbImage.filled(40, 20, new int[] {0, 0, 0}), "What is it?", 12, new Session.Listener() {
            @Override
            public void onAnswer(String visibleSoFar) {
                updates.add(visibleSoFar);
            }
        });
        assertEquals(" red circle", answer.text);
        assertEquals(StopController.Reason.STOP_STRING, answer.reason);
        assertEquals(1, engine.stopCalls);
        assertEquals(Arrays.asList(" red", " red circle"), updates);
        assertEquals(3 * 32 * 32, engine.seen.imageChw.length);
        assertEquals("\nWhat is it? ASSISTANT:", engine.seen.prompt.afterText);
        assertArrayEquals(new int[] {1, 293, 28, 223}, engine.seen.prompt.beforeIds);
        assertEquals(64, engine.seen.seqLen);
        assertEquals("prefill 17 tok @ 340.0 tok/s · first token 60 ms · decode 3 tok @ 12.0 tok/s · load 1.50 s", answer.stats.line());
    }

    @Test
    public void aResultsRecordHasTheBenchmarkSchema() throws Exception {
        File root = tmp.newFolder("b");
        Files.writeUtf8Atomically(new File(root, "model.pte"), "hello");
        Files.writeUtf8Atomically(new File(root, "tokenizer.json"), "{}");
        Files.writeUtf8Atomically(new File(root, "manifest.json"), ManifestTest.manifest(ManifestTest.GOOD, 1));
        Manifest m = Manifest.load(root, Manifest.Verify.SIZE);
        BenchRecord.Measurements meas = new BenchRecord.Measurements();
        meas.loadS = 1.25;
        meas.threads = 4;
        meas.fileBytes = 5_000_000;
        meas.peakRssMb = BenchRecord.peakRssMb("Name:\tapp\nVmHWM:\t  204800 kB\nVmRSS:\t1 kB\n");
        for (int i = 0; i < 4; i++) {
            meas.imageMs.add(10.0 + i);
            meas.runs.add(new RunnerStats(17, 8, 0, 0, 100, 150 + i, 160 + i, 500 + 10 * i));
        }
        Map<String, Object> machine = BenchRecord.machine("SM8650 (test)", "arm64-v8a", Arrays.asList("asimd", "asimddp", "i8mm"), 8, 11.2,
                "Android 14 (API 34) [JVM test record, not a phone measurement]", "TestMaker", "TestPhone");
        Map<String, Object> r = BenchRecord.build(m, m.firstArtifact("executorch"), "/sdcard/b", machine,
                new java.util.LinkedHashMap<String, Object>(), meas, 0L);
        assertEquals("mobilevlm-bench/1", r.get("schema"));
        assertEquals("adb", r.get("target"));
        assertEquals("1970-01-01T00:00:00Z", r.get("timestamp"));
        @SuppressWarnings("unchecked")
        Map<String, Object> metrics = (Map<String, Object>) r.get("metrics");
        @SuppressWarnings("unchecked")
        Map<String, Object> encode = (Map<String, Object>) metrics.get("image_encode_ms");
        assertEquals(11.5, (Double) encode.get("median"), 1e-12);
        assertEquals(200.0, (Double) metrics.get("peak_rss_mb"), 1e-12);
        assertTrue(((Map<?, ?>) metrics.get("prefill_tok_s")).containsKey("17"));
        String out = System.getProperty("mobilevlm.bench.out");
        if (out != null) {
            // CI reads this back with mobilevlm.benchmarks.runner.read_records and renders a report table.
            Files.writeUtf8Atomically(new File(out), Json.write(r) + "\n");
        }
    }
}
