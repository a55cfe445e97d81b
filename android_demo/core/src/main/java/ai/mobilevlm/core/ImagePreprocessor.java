package ai.mobilevlm.core;

/**
 * manifest["preprocessing"] applied to an upright RGB picture: pad to a square / crop the centre /
 * stretch, then a bicubic resize to S x S, giving the uint8 [1, 3, S, S] RGB bytes (CHW) the artifact's
 * vision method takes. Normalisation happens inside the artifact.
 *
 * <p>The resize is a port of Pillow's {@code ImagingResample} for 8-bit images (Resample.c): a
 * separable convolution with the bicubic kernel (a = -0.5) widened by the downscale factor (so it
 * antialiases), coefficients normalised in double precision and rounded to 22-bit fixed point, a
 * horizontal pass then a vertical pass, each clipped to 0..255. With IEEE doubles this gives the same
 * bytes as PIL, which the golden files check (SHA-256 of the tensor).
 */
public final class ImagePreprocessor {
    private static final int PRECISION_BITS = 32 - 8 - 2;

    private final Manifest.ImageSpec spec;

    public ImagePreprocessor(Manifest.ImageSpec spec) {
        this.spec = spec;
    }

    public int size() {
        return spec.size;
    }

    /** uint8 CHW bytes of length 3 * S * S. */
    public byte[] tensor(RgbImage upright) {
        return prepare(upright, spec.size, spec.aspectMode, spec.padColor).toChw();
    }

    /** The S x S picture before it is laid out as CHW (for display). */
    public static RgbImage prepare(RgbImage image, int size, String aspectMode, int[] padColor) {
        if ("pad".equals(aspectMode) && image.width != image.height) {
            image = image.paddedToSquare(padColor);
        } else if ("crop".equals(aspectMode) && image.width != image.height) {
            // Python: scale = size / min(w, h); w, h = max(size, round(w * scale)), ... (round: half to even)
            double scale = (double) size / Math.min(image.width, image.height);
            int w = Math.max(size, (int) Math.rint(image.width * scale));
            int h = Math.max(size, (int) Math.rint(image.height * scale));
            image = resize(image, w, h);
            image = image.crop((w - size) / 2, (h - size) / 2, size, size);
        }
        if (image.width != size || image.height != size) {
            image = resize(image, size, size);
        }
        return image;
    }

    static double bicubic(double x) {
        final double a = -0.5;
        if (x < 0.0) {
            x = -x;
        }
        if (x < 1.0) {
            return ((a + 2.0) * x - (a + 3.0)) * x * x + 1;
        }
        if (x < 2.0) {
            return (((x - 5) * x + 8) * x - 4) * a;
        }
        return 0.0;
    }

    /** Pillow's precompute_coeffs + normalize_coeffs_8bpc for one axis. */
    static final class Coefficients {
        final int ksize;
        final int[] bounds; // per output pixel: first input index, count
        final int[] k;      // per output pixel: ksize fixed-point weights

        Coefficients(int inSize, int outSize) {
            double scale = (double) inSize / outSize;
            double filterscale = scale < 1.0 ? 1.0 : scale;
            double support = 2.0 * filterscale;
            ksize = (int) Math.ceil(support) * 2 + 1;
            bounds = new int[outSize * 2];
            double[] kk = new double[outSize * ksize];
            for (int xx = 0; xx < outSize; xx++) {
                double center = 0.0 + (xx + 0.5) * scale;
                double ww = 0.0;
                double ss = 1.0 / filterscale;
                int xmin = (int) (center - support + 0.5);
                if (xmin < 0) {
                    xmin = 0;
                }
                int xmax = (int) (center + support + 0.5);
                if (xmax > inSize) {
                    xmax = inSize;
                }
                xmax -= xmin;
                for (int x = 0; x < xmax; x++) {
                    double w = bicubic((x + xmin - center + 0.5) * ss);
                    kk[xx * ksize + x] = w;
                    ww += w;
                }
                for (int x = 0; x < xmax; x++) {
                    if (ww != 0.0) {
                        kk[xx * ksize + x] /= ww;
                    }
                }
                bounds[2 * xx] = xmin;
                bounds[2 * xx + 1] = xmax;
            }
            k = new int[kk.length];
            for (int i = 0; i < kk.length; i++) {
                k[i] = kk[i] < 0 ? (int) (-0.5 + kk[i] * (1 << PRECISION_BITS)) : (int) (0.5 + kk[i] * (1 << PRECISION_BITS));
            }
        }
    }

    private static int clip8(int in) {
        int v = in >> PRECISION_BITS;
        return v < 0 ? 0 : (v > 255 ? 255 : v);
    }

    /** Pillow's {@code Image.resize((w, h), Image.BICUBIC)} of an RGB image. */
    public static RgbImage resize(RgbImage in, int outW, int outH) {
        if (outW == in.width && outH == in.height) {
            return in;
        }
        Coefficients vert = new Coefficients(in.height, outH);
        int yFirst = vert.bounds[0];
        int yLast = vert.bounds[outH * 2 - 2] + vert.bounds[outH * 2 - 1];
        RgbImage src = in;
        int rowOffset = 0;
        if (outW != in.width) {
            Coefficients horiz = new Coefficients(in.width, outW);
            int rows = yLast - yFirst;
            byte[] tmp = new byte[outW * rows * 3];
            for (int yy = 0; yy < rows; yy++) {
                int row = (yy + yFirst) * in.width * 3;
                for (int xx = 0; xx < outW; xx++) {
                    int xmin = horiz.bounds[2 * xx];
                    int xmax = horiz.bounds[2 * xx + 1];
                    int base = xx * horiz.ksize;
                    int s0 = 1 << (PRECISION_BITS - 1);
                    int s1 = s0;
                    int s2 = s0;
                    for (int x = 0; x < xmax; x++) {
                        int p = row + (x + xmin) * 3;
                        int w = horiz.k[base + x];
                        s0 += (in.rgb[p] & 0xFF) * w;
                        s1 += (in.rgb[p + 1] & 0xFF) * w;
                        s2 += (in.rgb[p + 2] & 0xFF) * w;
                    }
                    int d = (yy * outW + xx) * 3;
                    tmp[d] = (byte) clip8(s0);
                    tmp[d + 1] = (byte) clip8(s1);
                    tmp[d + 2] = (byte) clip8(s2);
                }
            }
            src = new RgbImage(outW, rows, tmp);
            rowOffset = yFirst;
        }
        if (outH == in.height) {
            if (rowOffset != 0 || src.height != outH) {
                return src.crop(0, 0, outW, outH);
            }
            return src;
        }
        byte[] out = new byte[outW * outH * 3];
        for (int yy = 0; yy < outH; yy++) {
            int ymin = vert.bounds[2 * yy] - rowOffset;
            int ymax = vert.bounds[2 * yy + 1];
            int base = yy * vert.ksize;
            for (int xx = 0; xx < outW; xx++) {
                int s0 = 1 << (PRECISION_BITS - 1);
                int s1 = s0;
                int s2 = s0;
                for (int y = 0; y < ymax; y++) {
                    int p = ((y + ymin) * outW + xx) * 3;
                    int w = vert.k[base + y];
                    s0 += (src.rgb[p] & 0xFF) * w;
                    s1 += (src.rgb[p + 1] & 0xFF) * w;
                    s2 += (src.rgb[p + 2] & 0xFF) * w;
                }
                int d = (yy * outW + xx) * 3;
                out[d] = (byte) clip8(s0);
                out[d + 1] = (byte) clip8(s1);
                out[d + 2] = (byte) clip8(s2);
            }
        }
        return new RgbImage(outW, outH, out);
    }
}
