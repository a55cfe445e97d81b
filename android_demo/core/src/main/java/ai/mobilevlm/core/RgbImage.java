package ai.mobilevlm.core;

/**
 * An 8-bit RGB picture, rows top to bottom, 3 bytes per pixel: what the platform decoder's bitmap
 * becomes before the manifest's preprocessing. Decoding (JPEG, PNG, HEIC) stays in the app; the steps
 * after it are here, written to give the same bytes as the Python reference
 * ({@code mobilevlm.processing.load_image}, PIL).
 */
public final class RgbImage {
    public final int width;
    public final int height;
    /** width * height * 3 bytes, R G B per pixel. */
    public final byte[] rgb;

    public RgbImage(int width, int height, byte[] rgb) {
        if (width < 1 || height < 1) {
            throw new IllegalArgumentException("image has no pixels (" + width + "x" + height + ")");
        }
        if (rgb.length != width * height * 3) {
            throw new IllegalArgumentException("expected " + (width * height * 3) + " RGB bytes, got " + rgb.length);
        }
        this.width = width;
        this.height = height;
        this.rgb = rgb;
    }

    public static RgbImage filled(int width, int height, int[] color) {
        byte[] data = new byte[width * height * 3];
        for (int i = 0; i < width * height; i++) {
            data[3 * i] = (byte) color[0];
            data[3 * i + 1] = (byte) color[1];
            data[3 * i + 2] = (byte) color[2];
        }
        return new RgbImage(width, height, data);
    }

    /**
     * Straight-alpha RGBA bytes composited over opaque white, exactly as PIL's
     * {@code Image.alpha_composite(white, image)} (its 7-bit fixed-point formula) does in
     * {@code load_image}. Alpha 255 leaves a pixel unchanged.
     */
    public static RgbImage fromRgba(int width, int height, byte[] rgba) {
        if (rgba.length != width * height * 4) {
            throw new IllegalArgumentException("expected " + (width * height * 4) + " RGBA bytes, got " + rgba.length);
        }
        byte[] out = new byte[width * height * 3];
        for (int i = 0; i < width * height; i++) {
            int a = rgba[4 * i + 3] & 0xFF;
            for (int c = 0; c < 3; c++) {
                out[3 * i + c] = (byte) compositeOverWhite(rgba[4 * i + c] & 0xFF, a);
            }
        }
        return new RgbImage(width, height, out);
    }

    /** Android's {@code Bitmap.getPixels} form: one ARGB int per pixel, straight (not premultiplied) alpha. */
    public static RgbImage fromArgb(int width, int height, int[] argb) {
        if (argb.length != width * height) {
            throw new IllegalArgumentException("expected " + (width * height) + " pixels, got " + argb.length);
        }
        byte[] out = new byte[width * height * 3];
        for (int i = 0; i < argb.length; i++) {
            int p = argb[i];
            int a = (p >>> 24) & 0xFF;
            out[3 * i] = (byte) compositeOverWhite((p >> 16) & 0xFF, a);
            out[3 * i + 1] = (byte) compositeOverWhite((p >> 8) & 0xFF, a);
            out[3 * i + 2] = (byte) compositeOverWhite(p & 0xFF, a);
        }
        return new RgbImage(width, height, out);
    }

    /** One channel of PIL's AlphaComposite.c with an opaque white destination. */
    static int compositeOverWhite(int src, int alpha) {
        if (alpha == 0) {
            return 255;
        }
        long blend = 255L * (255 - alpha);
        long outa255 = alpha * 255L + blend;
        long coef1 = alpha * 255L * 255L * 128L / outa255;
        long coef2 = 255L * 128L - coef1;
        long tmp = src * coef1 + 255L * coef2 + (0x80L << 7);
        return (int) ((((tmp >> 8) + tmp) >> 8) >> 7);
    }

    /**
     * This image turned upright for an EXIF orientation tag (1 to 8), as PIL's
     * {@code ImageOps.exif_transpose}; other values leave it as it is.
     */
    public RgbImage oriented(int exifOrientation) {
        switch (exifOrientation) {
            case 2: return transform(false, true, false);   // mirror left-right
            case 3: return transform(false, true, true);    // rotate 180
            case 4: return transform(false, false, true);   // mirror top-bottom
            case 5: return transform(true, false, false);   // transpose
            case 6: return transform(true, true, false);    // rotate 90 clockwise (PIL ROTATE_270)
            case 7: return transform(true, true, true);     // transverse
            case 8: return transform(true, false, true);    // rotate 90 counter-clockwise (PIL ROTATE_90)
            default: return this;
        }
    }

    /**
     * Output pixel (x, y) takes input pixel (sx, sy): with {@code swap} the axes are exchanged
     * first, then x and / or y are mirrored in the output.
     */
    private RgbImage transform(boolean swap, boolean mirrorX, boolean mirrorY) {
        int w = swap ? height : width;
        int h = swap ? width : height;
        byte[] out = new byte[w * h * 3];
        for (int y = 0; y < h; y++) {
            for (int x = 0; x < w; x++) {
                int tx = mirrorX ? w - 1 - x : x;
                int ty = mirrorY ? h - 1 - y : y;
                int sx = swap ? ty : tx;
                int sy = swap ? tx : ty;
                int s = 3 * (sy * width + sx);
                int d = 3 * (y * w + x);
                out[d] = rgb[s];
                out[d + 1] = rgb[s + 1];
                out[d + 2] = rgb[s + 2];
            }
        }
        return new RgbImage(w, h, out);
    }

    /** The pixels [left, left + w) x [top, top + h); the area must lie inside the image. */
    public RgbImage crop(int left, int top, int w, int h) {
        byte[] out = new byte[w * h * 3];
        for (int y = 0; y < h; y++) {
            System.arraycopy(rgb, 3 * ((top + y) * width + left), out, 3 * y * w, 3 * w);
        }
        return new RgbImage(w, h, out);
    }

    /** This image pasted onto a {@code canvas}-coloured square of side max(w, h) at ((side - w) / 2, (side - h) / 2). */
    public RgbImage paddedToSquare(int[] color) {
        int side = Math.max(width, height);
        RgbImage canvas = filled(side, side, color);
        int left = (side - width) / 2;
        int top = (side - height) / 2;
        for (int y = 0; y < height; y++) {
            System.arraycopy(rgb, 3 * y * width, canvas.rgb, 3 * ((top + y) * side + left), 3 * width);
        }
        return canvas;
    }

    /** uint8 CHW bytes (the layout of the artifact's [1, 3, S, S] input). */
    public byte[] toChw() {
        int n = width * height;
        byte[] out = new byte[3 * n];
        for (int i = 0; i < n; i++) {
            out[i] = rgb[3 * i];
            out[n + i] = rgb[3 * i + 1];
            out[2 * n + i] = rgb[3 * i + 2];
        }
        return out;
    }
}
