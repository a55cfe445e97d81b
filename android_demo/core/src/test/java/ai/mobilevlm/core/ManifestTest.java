package ai.mobilevlm.core;

import static org.junit.Assert.assertEquals;
import static org.junit.Assert.assertTrue;
import static org.junit.Assert.fail;

import java.io.File;
import java.io.FileOutputStream;
import java.util.List;
import java.util.Map;
import org.junit.Rule;
import org.junit.Test;
import org.junit.rules.TemporaryFolder;

/** Bad bundles: each is an error message the app shows, naming the file and the problem. */
public class ManifestTest {
    @Rule
    public TemporaryFolder tmp = new TemporaryFolder();

    /** A small valid manifest (self-contained: these tests need no golden files). */
    static String manifest(String artifactsAndFiles, int version) {
        return "{\"format\": \"mobilevlm-bundle\", \"format_version\": " + version + ", \"model\": {\"config\": {}},"
                + "\"preprocessing\": {\"image_size\": 32, \"aspect_mode\": \"pad\", \"pad_color\": [122, 116, 104], \"resize\": \"bicubic\","
                + " \"channel_order\": \"RGB\", \"mean\": [0.5, 0.5, 0.5], \"std\": [0.5, 0.5, 0.5]},"
                + "\"prompt\": {\"before_image\": \"USER: \", \"after_image\": \"\\n{prompt} ASSISTANT:\", \"prompt_slot\": \"{prompt}\","
                + " \"add_bos\": true, \"bos_id\": 1, \"eos_ids\": [2], \"stop_strings\": [\"</s>\"], \"before_image_ids\": [1, 293, 28, 223],"
                + " \"image_tokens\": 4, \"context_length\": 64},"
                + "\"tokenizer\": {\"file\": \"tokenizer.json\"}, \"parity\": {\"cases\": [{\"id\": \"case-00\", \"image\": \"parity/case-00.png\","
                + " \"question\": \"What?\", \"max_new_tokens\": 12}]}, " + artifactsAndFiles + "}";
    }

    static final String GOOD = "\"artifacts\": [{\"name\": \"executorch-fp32\", \"backend\": \"executorch\", \"file\": \"model.pte\","
            + " \"quantization\": {\"recipe\": \"fp32\"}}], \"files\": {\"model.pte\": {\"bytes\": 5, \"sha256\":"
            + " \"2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824\"}, \"tokenizer.json\": {\"bytes\": 2, \"sha256\": \"44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a\"}}";

    private File bundle(String text) throws Exception {
        return bundle("b", text);
    }

    private File bundle(String folder, String text) throws Exception {
        File root = tmp.newFolder(folder);
        write(new File(root, "model.pte"), "hello");
        write(new File(root, "tokenizer.json"), "{}");
        write(new File(root, "manifest.json"), text);
        return root;
    }

    private static void write(File f, String text) throws Exception {
        f.getParentFile().mkdirs();
        FileOutputStream out = new FileOutputStream(f);
        out.write(text.getBytes("UTF-8"));
        out.close();
    }

    private static void assertRefused(File root, Manifest.Verify verify, String... parts) {
        try {
            Manifest.load(root, verify);
            fail("expected an error containing " + java.util.Arrays.toString(parts));
        } catch (BundleException e) {
            for (String part : parts) {
                assertTrue("'" + e.getMessage() + "' should contain '" + part + "'", e.getMessage().contains(part));
            }
        }
    }

    @Test
    public void aValidBundleLoadsWithChecksums() throws Exception {
        Manifest m = Manifest.load(bundle(manifest(GOOD, 1)), Manifest.Verify.SHA256);
        assertEquals("executorch-fp32", m.firstArtifact("executorch").name);
        assertEquals("fp32", m.artifacts.get(0).quantization);
        assertEquals(32, m.image.size);
        assertEquals("\n{prompt} ASSISTANT:", m.prompt.afterImage);
        assertEquals(1, m.parityCases.size());
        assertEquals(12, m.parityCases.get(0).maxNewTokens);
    }

    @Test
    public void noSuchFolder() {
        assertRefused(new File(tmp.getRoot(), "nowhere"), Manifest.Verify.SIZE, "nowhere", "no such bundle folder");
    }

    @Test
    public void aFolderWithoutManifest() throws Exception {
        assertRefused(tmp.newFolder("empty"), Manifest.Verify.SIZE, "manifest.json: missing", "not a bundle written by mobilevlm export");
    }

    @Test
    public void aNewerManifestVersion() throws Exception {
        assertRefused(bundle(manifest(GOOD, 2)), Manifest.Verify.SIZE, "format_version 2 is newer than this app reads (1)", "update the app");
    }

    @Test
    public void anUnknownOlderVersion() throws Exception {
        assertRefused(bundle(manifest(GOOD, 0)), Manifest.Verify.SIZE, "format_version 0 is not a version this app knows");
    }

    @Test
    public void aVersionThatIsNotAnInteger() throws Exception {
        assertRefused(bundle(manifest(GOOD, 1).replace("\"format_version\": 1", "\"format_version\": \"1\"")), Manifest.Verify.SIZE,
                "field 'format_version' must be an integer");
    }

    @Test
    public void notJson() throws Exception {
        assertRefused(bundle("{\"format\": "), Manifest.Verify.SIZE, "manifest.json: not valid JSON");
    }

    @Test
    public void notOurFormat() throws Exception {
        assertRefused(bundle(manifest(GOOD, 1).replace("mobilevlm-bundle", "something-else")), Manifest.Verify.SIZE, "field 'format' must be 'mobilevlm-bundle'");
    }

    @Test
    public void aMissingArtifactFile() throws Exception {
        File root = bundle(manifest(GOOD, 1));
        assertTrue(new File(root, "model.pte").delete());
        assertRefused(root, Manifest.Verify.EXISTS, "listed file 'model.pte' is missing from the bundle");
    }

    @Test
    public void anArtifactNotListedUnderFiles() throws Exception {
        String text = manifest(GOOD.replace("\"file\": \"model.pte\"", "\"file\": \"other.pte\""), 1);
        File root = bundle(text);
        write(new File(root, "other.pte"), "x");
        assertRefused(root, Manifest.Verify.SIZE, "artifacts[0].file 'other.pte' is not listed under 'files'");
    }

    @Test
    public void aPathLeavingTheBundle() throws Exception {
        assertRefused(bundle(manifest(GOOD.replace("\"model.pte\": {", "\"../outside.pte\": {"), 1)), Manifest.Verify.SIZE,
                "file path \"../outside.pte\" escapes the bundle folder");
    }

    @Test
    public void anAbsolutePath() throws Exception {
        assertRefused(bundle(manifest(GOOD.replace("\"model.pte\": {", "\"/etc/passwd\": {"), 1)), Manifest.Verify.SIZE,
                "file path \"/etc/passwd\" must be a relative path inside the bundle");
    }

    @Test
    public void aTruncatedFile() throws Exception {
        File root = bundle(manifest(GOOD, 1));
        write(new File(root, "model.pte"), "hell");
        assertRefused(root, Manifest.Verify.SIZE, "model.pte: size 4 bytes does not match the manifest's 5");
    }

    @Test
    public void aChangedFile() throws Exception {
        File root = bundle(manifest(GOOD, 1));
        write(new File(root, "model.pte"), "jello");
        Manifest.load(root, Manifest.Verify.SIZE);
        assertRefused(root, Manifest.Verify.SHA256, "model.pte: SHA-256 does not match the manifest");
    }

    @Test
    public void aMissingSection() throws Exception {
        assertRefused(bundle(manifest(GOOD, 1).replace("\"tokenizer\": {\"file\": \"tokenizer.json\"},", "")), Manifest.Verify.SIZE,
                "missing field 'tokenizer'");
    }

    @Test
    public void anAspectModeTheAppDoesNotKnow() throws Exception {
        assertRefused(bundle(manifest(GOOD, 1).replace("\"pad\"", "\"letterbox\"")), Manifest.Verify.SIZE,
                "preprocessing.aspect_mode is 'letterbox'; this app knows pad, crop and resize");
    }

    @Test
    public void aBundleWithoutAnArtifactForThisApp() throws Exception {
        Manifest m = Manifest.load(bundle(manifest(GOOD.replace("\"backend\": \"executorch\"", "\"backend\": \"onnx\""), 1)), Manifest.Verify.SIZE);
        try {
            m.firstArtifact("executorch");
            fail();
        } catch (BundleException e) {
            assertTrue(e.getMessage(), e.getMessage().contains("no executorch artifact in this bundle (it has: executorch-fp32 (onnx))"));
        }
    }

    /** The one-line message loading {@code root} fails with. */
    private static String refusal(File root) {
        try {
            Manifest.load(root, Manifest.Verify.SIZE);
        } catch (BundleException e) {
            return e.getMessage();
        }
        throw new AssertionError("expected " + root + " to be refused");
    }

    /** GOOD with a {@code methods.text_decoder} section on its artifact. */
    static String withDecoder(String decoder) {
        return GOOD.replace("\"quantization\": {\"recipe\": \"fp32\"}}]",
                "\"quantization\": {\"recipe\": \"fp32\"}, \"methods\": {\"text_decoder\": " + decoder + "}}]");
    }

    static final String TWO_INPUTS = "\"inputs\": [{\"name\": \"embeddings\"}, {\"name\": \"input_pos\"}";

    @Test
    public void aTiledBundleIsRefused() throws Exception {
        String text = manifest(GOOD, 1).replace("\"channel_order\": \"RGB\",",
                "\"channel_order\": \"RGB\", \"tiling\": {\"grids\": [[1, 2], [2, 1], [2, 2]], \"tile_size\": 32, \"tokens_per_view\": 5},");
        File root = bundle(text);
        assertEquals(new File(root, "manifest.json").getPath()
                + ": this bundle tiles images (preprocessing.tiling); the demo app drives single-image programs only", refusal(root));
    }

    @Test
    public void aFeatureLevelInterfaceIsRefused() throws Exception {
        String decoder = "{" + TWO_INPUTS + ", {\"name\": \"image_features\"}], \"interface\": \"cross_attention\", \"multimodal_runner\": false}";
        File root = bundle(manifest(withDecoder(decoder), 1).replace("\"config\": {}", "\"config\": {\"interface\": \"cross_attention\"}"));
        assertEquals(new File(root, "manifest.json").getPath() + ": text_decoder takes an image input (model.config.interface cross_attention);"
                + " the demo app drives MultimodalRunner-style programs only", refusal(root));
    }

    @Test
    public void anArtifactWhoseDecoderTakesAnImageIsRefused() throws Exception {
        String[][] cases = {
            {"{" + TWO_INPUTS + ", {\"name\": \"image_mask\"}], \"interface\": \"visual_expert\", \"multimodal_runner\": false}",
                "text_decoder takes an image input (interface visual_expert)"},
            {"{" + TWO_INPUTS + "], \"multimodal_runner\": false}", "text_decoder is marked multimodal_runner false"},
            {"{" + TWO_INPUTS + ", {\"name\": \"image_mask\"}]}",
                "text_decoder takes 3 inputs (embeddings, input_pos, image_mask), not embeddings and input_pos"},
        };
        for (int i = 0; i < cases.length; i++) {
            String[] c = cases[i];
            File root = bundle("b" + i, manifest(withDecoder(c[0]), 1));
            assertEquals(new File(root, "manifest.json").getPath() + ": artifacts[0] (executorch-fp32): " + c[1]
                    + "; the demo app drives MultimodalRunner-style programs only", refusal(root));
        }
    }

    @Test
    public void aTokenInterfaceBundleStillLoads() throws Exception {
        String decoder = "{" + TWO_INPUTS + "], \"interface\": \"token\", \"multimodal_runner\": true}";
        Manifest m = Manifest.load(bundle(manifest(withDecoder(decoder), 1).replace("\"config\": {}", "\"config\": {\"interface\": \"token\"}")),
                Manifest.Verify.SHA256);
        assertEquals("executorch-fp32", m.firstArtifact("executorch").name);
        assertEquals(2, ((List<?>) m.artifacts.get(0).method("text_decoder").get("inputs")).size());
        assertEquals(32, m.image.size);
    }

    @Test
    public void aPromptTemplateWithoutSlot() throws Exception {
        assertRefused(bundle(manifest(GOOD, 1).replace("\\n{prompt} ASSISTANT:", "ASSISTANT:")), Manifest.Verify.SIZE,
                "neither before_image nor after_image contains the prompt_slot");
    }

    @Test
    public void emptyAndBrokenQuestionsAreRefused() throws Exception {
        Manifest m = Manifest.load(bundle(manifest(GOOD, 1)), Manifest.Verify.SIZE);
        try {
            Prompt.build(m.prompt, "   ", null);
            fail();
        } catch (BundleException e) {
            assertEquals("prompt is empty", e.getMessage());
        }
        try {
            Prompt.build(m.prompt, "bad \uD800 surrogate", null);
            fail();
        } catch (BundleException e) {
            assertTrue(e.getMessage().startsWith("prompt is not valid UTF-8"));
        }
        Prompt p = Prompt.build(m.prompt, "What?", null);
        assertEquals("\nWhat? ASSISTANT:", p.afterText);
        assertEquals(64, p.seqLen(10));
    }

    @Test
    public void jsonRoundTrip() {
        Object parsed = Json.parse("{\"a\": [1, 2.5, \"x\\u00e9\\n\", true, null], \"b\": {\"c\": -3e2}}");
        assertEquals("{\"a\": [1, 2.5, \"x\u00e9\\n\", true, null], \"b\": {\"c\": -300.0}}", Json.write(parsed));
        @SuppressWarnings("unchecked")
        List<Object> a = (List<Object>) ((Map<String, Object>) parsed).get("a");
        assertEquals(Long.valueOf(1), a.get(0));
        try {
            Json.parse("[1, 2");
            fail();
        } catch (IllegalArgumentException e) {
            assertTrue(e.getMessage(), e.getMessage().contains("line 1"));
        }
    }

    @Test
    public void anUnsupportedTokenizerIsNamed() throws Exception {
        File f = tmp.newFile("tokenizer.json");
        write(f, "{\"model\": {\"type\": \"Unigram\", \"vocab\": []}, \"pre_tokenizer\": null}");
        try {
            Tokenizer.load(f);
            fail();
        } catch (BundleException e) {
            assertTrue(e.getMessage(), e.getMessage().contains("model.type must be 'BPE'") && e.getMessage().contains("\"Unigram\""));
        }
    }
}
