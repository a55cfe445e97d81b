package ai.mobilevlm.demo;

import ai.mobilevlm.core.BenchRecord;
import ai.mobilevlm.core.Files;
import android.app.ActivityManager;
import android.content.Context;
import android.os.Build;
import java.io.File;
import java.io.IOException;
import java.util.ArrayList;
import java.util.Arrays;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;

/** The phone's facts for a results record ("machine" and "versions"). */
final class DeviceFacts {
    static final String EXECUTORCH_ANDROID = "1.3.0";

    private DeviceFacts() {
    }

    static Map<String, Object> machine(Context context) {
        ActivityManager am = (ActivityManager) context.getSystemService(Context.ACTIVITY_SERVICE);
        ActivityManager.MemoryInfo info = new ActivityManager.MemoryInfo();
        am.getMemoryInfo(info);
        double gib = Math.round(info.totalMem / (double) (1L << 30) * 10) / 10.0;
        String soc = Build.HARDWARE;
        List<String> features = new ArrayList<String>();
        try {
            for (String line : Files.readUtf8(new File("/proc/cpuinfo")).split("\n")) {
                String[] kv = line.split(":", 2);
                String key = kv[0].trim().toLowerCase();
                if (kv.length == 2 && (key.equals("hardware") || key.equals("model name")) && !kv[1].trim().isEmpty()) {
                    soc = kv[1].trim();
                }
                if (kv.length == 2 && key.equals("features") && features.isEmpty()) {
                    for (String f : kv[1].trim().split("\\s+")) {
                        if (Arrays.asList("asimd", "asimddp", "i8mm", "bf16", "sve", "sve2", "sme", "fphp", "asimdhp").contains(f)) {
                            features.add(f);
                        }
                    }
                }
            }
        } catch (IOException e) {
            // not readable on this phone: the record keeps Build.HARDWARE
        }
        String abi = Build.SUPPORTED_ABIS.length > 0 ? Build.SUPPORTED_ABIS[0] : "unknown";
        return BenchRecord.machine(soc, abi, features, Runtime.getRuntime().availableProcessors(), gib,
                "Android " + Build.VERSION.RELEASE + " (API " + Build.VERSION.SDK_INT + ")", Build.MANUFACTURER, Build.MODEL);
    }

    static Map<String, Object> versions(Context context) {
        Map<String, Object> v = new LinkedHashMap<String, Object>();
        v.put("android_demo", "0.1.0");
        v.put("executorch_android", EXECUTORCH_ANDROID);
        v.put("android_api", (long) Build.VERSION.SDK_INT);
        return v;
    }

    static Double peakRssMb() {
        try {
            return BenchRecord.peakRssMb(Files.readUtf8(new File("/proc/self/status")));
        } catch (IOException e) {
            return null;
        }
    }
}
