package ai.mobilevlm.core;

import java.io.ByteArrayOutputStream;
import java.io.File;
import java.io.FileInputStream;
import java.io.FileOutputStream;
import java.io.IOException;
import java.io.InputStream;
import java.io.OutputStream;
import java.nio.charset.Charset;

/** File reading and atomic writing with java.io only (java.nio.file needs Android API 26). */
public final class Files {
    public static final Charset UTF8 = Charset.forName("UTF-8");

    private Files() {
    }

    public static byte[] readBytes(InputStream in) throws IOException {
        ByteArrayOutputStream out = new ByteArrayOutputStream();
        byte[] buffer = new byte[1 << 16];
        int n;
        while ((n = in.read(buffer)) > 0) {
            out.write(buffer, 0, n);
        }
        return out.toByteArray();
    }

    public static byte[] readBytes(File file) throws IOException {
        InputStream in = new FileInputStream(file);
        try {
            return readBytes(in);
        } finally {
            in.close();
        }
    }

    public static String readUtf8(File file) throws IOException {
        return new String(readBytes(file), UTF8);
    }

    /** Writes {@code text} to a sibling temporary file, then renames it over {@code file}. */
    public static void writeUtf8Atomically(File file, String text) throws IOException {
        File parent = file.getAbsoluteFile().getParentFile();
        if (parent != null && !parent.isDirectory() && !parent.mkdirs()) {
            throw new IOException(parent + ": cannot create folder");
        }
        File tmp = new File(parent, "." + file.getName() + ".tmp");
        OutputStream out = new FileOutputStream(tmp);
        try {
            out.write(text.getBytes(UTF8));
        } finally {
            out.close();
        }
        if (!tmp.renameTo(file)) {
            throw new IOException(file + ": cannot replace");
        }
    }
}
