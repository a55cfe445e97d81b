package ai.mobilevlm.core;

/** Number formatting shared by both apps (and golden.py's {@code fixed}): decimals rounded half away from zero. */
public final class Format {
    private static final double[] POW10 = {1, 10, 100, 1000, 10000, 100000, 1000000};

    private Format() {
    }

    public static String fixed(Double value, int digits) {
        if (value == null || value.isNaN() || value.isInfinite()) {
            return "-";
        }
        double v = value;
        long scaled = (long) Math.floor(Math.abs(v) * POW10[digits] + 0.5);
        long unit = (long) POW10[digits];
        long whole = scaled / unit;
        long frac = scaled % unit;
        StringBuilder out = new StringBuilder();
        if (v < 0 && scaled != 0) {
            out.append('-');
        }
        out.append(whole);
        if (digits > 0) {
            String f = Long.toString(frac);
            out.append('.');
            for (int i = f.length(); i < digits; i++) {
                out.append('0');
            }
            out.append(f);
        }
        return out.toString();
    }
}
