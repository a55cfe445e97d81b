package ai.mobilevlm.core;

import static org.junit.Assume.assumeTrue;

import java.io.File;
import java.io.IOException;
import java.util.List;
import java.util.Map;

/**
 * The golden files written by {@code python -m mobilevlm.export.golden}; their folder comes from the
 * system property {@code mobilevlm.golden} (the CI script sets it). Without it the golden tests are
 * skipped, unless {@code mobilevlm.golden.required=true} (CI), when they fail.
 */
final class Golden {
    final File dir;
    final Map<String, Object> json;

    private Golden(File dir, Map<String, Object> json) {
        this.dir = dir;
        this.json = json;
    }

    @SuppressWarnings("unchecked")
    static Golden load() throws IOException {
        String path = System.getProperty("mobilevlm.golden", System.getenv("MOBILEVLM_GOLDEN") == null ? "" : System.getenv("MOBILEVLM_GOLDEN"));
        boolean required = Boolean.getBoolean("mobilevlm.golden.required");
        if (path.isEmpty() || !new File(path, "golden.json").isFile()) {
            if (required) {
                throw new AssertionError("golden files required but not found at '" + path + "' (run python -m mobilevlm.export.golden)");
            }
            assumeTrue("no golden files (set -Dmobilevlm.golden=DIR)", false);
        }
        File dir = new File(path);
        return new Golden(dir, (Map<String, Object>) Json.parse(Files.readUtf8(new File(dir, "golden.json"))));
    }

    @SuppressWarnings("unchecked")
    List<Map<String, Object>> list(String key) {
        return (List<Map<String, Object>>) json.get(key);
    }

    String manifestText() throws IOException {
        return Files.readUtf8(new File(dir, "manifest.json"));
    }

    static int[] ints(Object list) {
        List<?> l = (List<?>) list;
        int[] out = new int[l.size()];
        for (int i = 0; i < out.length; i++) {
            out[i] = ((Number) l.get(i)).intValue();
        }
        return out;
    }

    /** A bundle folder holding {@code manifestText} and an empty file for every path it lists. */
    @SuppressWarnings("unchecked")
    static File fakeBundle(File parent, String manifestText) throws IOException {
        File root = new File(parent, "bundle");
        root.mkdirs();
        Map<String, Object> m = (Map<String, Object>) Json.parse(manifestText);
        if (m.get("files") instanceof Map) {
            for (Object key : ((Map<String, Object>) m.get("files")).keySet()) {
                File f = new File(root, (String) key);
                f.getParentFile().mkdirs();
                f.createNewFile();
            }
        }
        Files.writeUtf8Atomically(new File(root, Manifest.FILE), manifestText);
        return root;
    }
}
