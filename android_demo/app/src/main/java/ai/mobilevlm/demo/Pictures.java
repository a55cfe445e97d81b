package ai.mobilevlm.demo;

import ai.mobilevlm.core.BundleException;
import ai.mobilevlm.core.RgbImage;
import android.content.ContentResolver;
import android.graphics.Bitmap;
import android.graphics.BitmapFactory;
import android.media.ExifInterface;
import android.net.Uri;
import java.io.File;
import java.io.FileOutputStream;
import java.io.IOException;
import java.io.InputStream;
import java.io.OutputStream;

/**
 * Decodes a picture to the core's RgbImage the way the Python reference loads it: every pixel at full
 * resolution, straight (not premultiplied) alpha so the core composites transparency over white as PIL
 * does, and the EXIF orientation applied by the core. Decoding itself is Android's: PNG pixels are
 * exact; JPEG decoders may differ from libjpeg by a level here and there.
 */
final class Pictures {
    static final long MAX_PIXELS = 64_000_000L;
    static final double MAX_ASPECT = 50.0;

    private Pictures() {
    }

    /** Copies a content Uri to a file (ExifInterface reads files on API 23). */
    static File copyToCache(ContentResolver resolver, Uri uri, File cacheDir) throws BundleException {
        File file = new File(cacheDir, "picked-picture");
        try {
            InputStream in = resolver.openInputStream(uri);
            if (in == null) {
                throw new BundleException(uri + ": cannot open the picture");
            }
            OutputStream out = new FileOutputStream(file);
            try {
                byte[] buffer = new byte[1 << 16];
                int n;
                while ((n = in.read(buffer)) > 0) {
                    out.write(buffer, 0, n);
                }
            } finally {
                out.close();
                in.close();
            }
        } catch (IOException e) {
            throw new BundleException(uri + ": cannot read the picture (" + e.getMessage() + ")");
        }
        return file;
    }

    static RgbImage decode(File file) throws BundleException {
        if (!file.isFile()) {
            throw new BundleException(file + ": no such image file");
        }
        if (file.length() == 0) {
            throw new BundleException(file + ": file is empty (0 bytes), expected an image");
        }
        BitmapFactory.Options bounds = new BitmapFactory.Options();
        bounds.inJustDecodeBounds = true;
        BitmapFactory.decodeFile(file.getPath(), bounds);
        int w = bounds.outWidth;
        int h = bounds.outHeight;
        if (w < 1 || h < 1) {
            throw new BundleException(file + ": not a decodable image");
        }
        if ((long) w * h > MAX_PIXELS) {
            throw new BundleException(file + ": image is " + w + "x" + h + " pixels, more than the " + MAX_PIXELS + " accepted");
        }
        if (Math.max(w, h) / (double) Math.min(w, h) > MAX_ASPECT) {
            throw new BundleException(file + ": image is " + w + "x" + h + ", an aspect ratio over 50:1");
        }
        BitmapFactory.Options options = new BitmapFactory.Options();
        options.inPreferredConfig = Bitmap.Config.ARGB_8888;
        options.inPremultiplied = false;
        options.inScaled = false;
        Bitmap bitmap = BitmapFactory.decodeFile(file.getPath(), options);
        if (bitmap == null) {
            throw new BundleException(file + ": image data is corrupt or truncated");
        }
        int[] argb = new int[bitmap.getWidth() * bitmap.getHeight()];
        bitmap.getPixels(argb, 0, bitmap.getWidth(), 0, 0, bitmap.getWidth(), bitmap.getHeight());
        RgbImage image = RgbImage.fromArgb(bitmap.getWidth(), bitmap.getHeight(), argb);
        bitmap.recycle();
        int orientation = ExifInterface.ORIENTATION_NORMAL;
        try {
            orientation = new ExifInterface(file.getPath()).getAttributeInt(ExifInterface.TAG_ORIENTATION, ExifInterface.ORIENTATION_NORMAL);
        } catch (IOException e) {
            // a broken EXIF block must not make a readable picture unusable (as the Python reference)
        }
        return image.oriented(orientation);
    }

    /** An RgbImage as a Bitmap for the preview. */
    static Bitmap toBitmap(RgbImage image) {
        int[] argb = new int[image.width * image.height];
        for (int i = 0; i < argb.length; i++) {
            argb[i] = 0xFF000000 | (image.rgb[3 * i] & 0xFF) << 16 | (image.rgb[3 * i + 1] & 0xFF) << 8 | (image.rgb[3 * i + 2] & 0xFF);
        }
        return Bitmap.createBitmap(argb, image.width, image.height, Bitmap.Config.ARGB_8888);
    }
}
