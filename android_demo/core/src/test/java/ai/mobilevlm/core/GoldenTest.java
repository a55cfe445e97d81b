package ai.mobilevlm.core;

import static org.junit.Assert.assertArrayEquals;
import static org.junit.Assert.assertEquals;
import static org.junit.Assert.assertNotNull;
import static org.junit.Assert.assertNull;
import static org.junit.Assert.assertTrue;
import static org.junit.Assert.fail;
import static org.junit.Assume.assumeTrue;

import java.awt.image.BufferedImage;
import java.io.File;
import java.util.ArrayList;
import java.util.List;
import java.util.Map;
import javax.imageio.ImageIO;
import org.junit.Before;
import org.junit.Rule;
import org.junit.Test;
import org.junit.rules.TemporaryFolder;

/** The core against the Python toolkit's golden files: same tensors, token ids, stops and statistics. */
public class GoldenTest {
    @Rule
    public TemporaryFolder tmp = new TemporaryFolder();

    private Golden golden;
    private Manifest manifest;
    private Tokenizer tokenizer;

    @Before
    public void setUp() throws Exception {
        golden = Golden.load();
        manifest = Manifest.load(Golden.fakeBundle(tmp.getRoot(), golden.manifestText()), Manifest.Verify.EXISTS);
        tokenizer = Tokenizer.load(new File(golden.dir, "tokenizer.json"));
    }

    @Test
    public void theRealBundleLoadsWithEveryChecksum() throws Exception {
        File bundle = new File((String) golden.json.get("bundle"));
        assumeTrue("bundle folder not on this machine", bundle.isDirectory());
        Manifest real = Manifest.load(bundle, Manifest.Verify.SHA256);
        assertEquals(manifest.artifacts.size(), real.artifacts.size());
    }

    @Test
    public void manifestSectionsAreRead() {
        assertEquals(((Number) golden.json.get("image_size")).intValue(), manifest.image.size);
        assertArrayEquals(Golden.ints(golden.json.get("pad_color")), manifest.image.padColor);
        assertTrue(manifest.prompt.contextLength > manifest.prompt.imageTokens);
        assertTrue(manifest.prompt.beforeImageIds.length > 0);
    }

    @Test
    public void everyImageGivesTheReferenceTensor() throws Exception {
        List<String> wrong = new ArrayList<String>();
        int checked = 0;
        for (Map<String, Object> image : golden.list("images")) {
            int w = ((Number) image.get("width")).intValue();
            int h = ((Number) image.get("height")).intValue();
            byte[] rgba = Files.readBytes(new File(golden.dir, (String) image.get("pixels")));
            RgbImage upright = RgbImage.fromRgba(w, h, rgba).oriented(((Number) image.get("exif_orientation")).intValue());
            RgbImage prepared = ImagePreprocessor.prepare(upright, manifest.image.size, (String) image.get("aspect_mode"), manifest.image.padColor);
            byte[] chw = prepared.toChw();
            @SuppressWarnings("unchecked")
            Map<String, Object> expected = (Map<String, Object>) image.get("expected");
            assertArrayEquals(Golden.ints(expected.get("shape")), new int[] {1, 3, prepared.height, prepared.width});
            if (!Sha256.hex(chw).equals(expected.get("sha256"))) {
                wrong.add(image.get("name") + " (" + image.get("aspect_mode") + ", exif " + image.get("exif_orientation") + ")");
            }
            checked++;
        }
        assertTrue("no images in golden.json", checked > 0);
        assertTrue("tensor SHA-256 differs from PIL's for: " + wrong, wrong.isEmpty());
    }

    @Test
    public void theSessionTensorMatchesForTheParityImages() throws Exception {
        ImagePreprocessor pre = new ImagePreprocessor(manifest.image);
        for (Map<String, Object> image : golden.list("images")) {
            if ("made up".equals(image.get("source"))) {
                continue;
            }
            int w = ((Number) image.get("width")).intValue();
            int h = ((Number) image.get("height")).intValue();
            byte[] rgba = Files.readBytes(new File(golden.dir, (String) image.get("pixels")));
            @SuppressWarnings("unchecked")
            Map<String, Object> expected = (Map<String, Object>) image.get("expected");
            assertEquals((String) image.get("name"), expected.get("sha256"), Sha256.hex(pre.tensor(RgbImage.fromRgba(w, h, rgba))));
        }
    }

    /** The ARGB-int path (Android's Bitmap.getPixels) gives the same pixels as the RGBA bytes; decoded here by ImageIO. */
    @Test
    public void argbPixelsOfTheDecodedPngsMatchTheRgbaFiles() throws Exception {
        for (Map<String, Object> image : golden.list("images")) {
            BufferedImage decoded = ImageIO.read(new File(golden.dir, (String) image.get("png")));
            assertNotNull(image.get("png") + " not decodable by ImageIO", decoded);
            int w = decoded.getWidth();
            int h = decoded.getHeight();
            int[] argb = decoded.getRGB(0, 0, w, h, null, 0, w);
            byte[] rgba = Files.readBytes(new File(golden.dir, (String) image.get("pixels")));
            assertArrayEquals((String) image.get("name"), RgbImage.fromRgba(w, h, rgba).rgb, RgbImage.fromArgb(w, h, argb).rgb);
        }
    }

    @Test
    public void promptTokenIdsMatchThePythonTokenizer() throws Exception {
        for (Map<String, Object> p : golden.list("prompts")) {
            int[] before = tokenizer.encode((String) p.get("before_image"));
            int[] withBos = before;
            if (manifest.prompt.addBos) {
                withBos = new int[before.length + 1];
                withBos[0] = manifest.prompt.bosId;
                System.arraycopy(before, 0, withBos, 1, before.length);
            }
            assertArrayEquals(Golden.ints(p.get("before_ids")), withBos);
            assertArrayEquals(Golden.ints(p.get("manifest_before_ids")), manifest.prompt.beforeImageIds);
            assertArrayEquals((String) p.get("case"), Golden.ints(p.get("after_ids")), tokenizer.encode((String) p.get("after_image")));
            if (Boolean.TRUE.equals(p.get("fits_context"))) {
                Prompt prompt = Prompt.build(manifest.prompt, (String) p.get("question"), tokenizer);
                assertEquals(p.get("after_image"), prompt.afterText);
                assertEquals(((Number) p.get("prompt_tokens")).intValue(), prompt.promptTokens);
            } else {
                try {
                    Prompt.build(manifest.prompt, (String) p.get("question"), tokenizer);
                    fail("a prompt of " + p.get("prompt_tokens") + " tokens must not fit");
                } catch (BundleException e) {
                    assertTrue(e.getMessage(), e.getMessage().startsWith("prompt takes " + p.get("prompt_tokens") + " tokens"));
                }
            }
        }
    }

    @Test
    public void tokenizerStringsEncodeAsInPython() throws Exception {
        for (Map<String, Object> c : golden.list("tokenizer_cases")) {
            assertArrayEquals(Json.write(c.get("text")), Golden.ints(c.get("ids")), tokenizer.encode((String) c.get("text")));
        }
    }

    @Test
    public void tokenIdsDecodeAsInPython() throws Exception {
        for (Map<String, Object> c : golden.list("decode_cases")) {
            assertEquals(c.get("text"), tokenizer.decode(Golden.ints(c.get("ids"))));
        }
    }

    @Test
    public void stopConditionsCutWherePythonCuts() {
        for (Map<String, Object> c : golden.list("stops")) {
            @SuppressWarnings("unchecked")
            List<String> stops = (List<String>) c.get("stop_strings");
            StopController controller = new StopController(stops, manifest.prompt.eosIds, ((Number) c.get("max_new_tokens")).intValue());
            StringBuilder shown = new StringBuilder();
            for (Object piece : (List<?>) c.get("pieces")) {
                shown.append(controller.onText((String) piece));
                String visible = shown.toString();
                for (String stop : stops) {
                    assertTrue(c.get("name") + ": a stop string was shown", !visible.contains(stop));
                }
            }
            shown.append(controller.finish());
            String name = (String) c.get("name");
            assertEquals(name, c.get("expected_text"), shown.toString());
            assertEquals(name, c.get("expected_text"), controller.text());
            assertEquals(name, c.get("expected_reason"), controller.reason().id);
            assertEquals(name, ((Number) c.get("expected_tokens")).intValue(), controller.tokens());
        }
    }

    @Test
    public void statisticsAreDerivedAndShownAsInPython() throws Exception {
        for (Map<String, Object> c : golden.list("stats")) {
            RunnerStats stats = RunnerStats.parse((String) c.get("json"));
            @SuppressWarnings("unchecked")
            Map<String, Object> expected = (Map<String, Object>) c.get("expected");
            assertEquals(((Number) expected.get("prompt_tokens")).longValue(), stats.promptTokens);
            assertEquals(((Number) expected.get("generated_tokens")).longValue(), stats.generatedTokens);
            assertClose(expected.get("prefill_tok_s"), stats.prefillTokPerS());
            assertClose(expected.get("decode_tok_s"), stats.decodeTokPerS());
            assertClose(expected.get("ttft_ms"), stats.ttftMs());
            assertClose(expected.get("load_s"), stats.loadS());
            assertEquals(c.get("line"), stats.line());
        }
    }

    @Test
    public void fixedDecimalsRoundAsInPython() {
        for (Object row : (List<?>) golden.json.get("fixed_cases")) {
            List<?> r = (List<?>) row;
            assertEquals(r.toString(), r.get(2), Format.fixed(((Number) r.get(0)).doubleValue(), ((Number) r.get(1)).intValue()));
        }
    }

    private static void assertClose(Object expected, Double actual) {
        if (expected == null) {
            assertNull(actual);
            return;
        }
        double e = ((Number) expected).doubleValue();
        assertNotNull(actual);
        assertEquals(e, actual, 1e-9 * Math.max(1, Math.abs(e)));
    }
}
