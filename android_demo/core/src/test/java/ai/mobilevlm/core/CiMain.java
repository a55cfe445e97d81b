package ai.mobilevlm.core;

import java.util.ArrayList;
import java.util.List;
import org.junit.runner.Description;
import org.junit.runner.JUnitCore;
import org.junit.runner.Result;
import org.junit.runner.notification.Failure;
import org.junit.runner.notification.RunListener;

/**
 * Runs test classes with JUnit 4 and prints one line per test and a closing "N passed, N failed"
 * line (used by .ci/apps; Android Studio and Gradle run the same classes with their own runner).
 */
public final class CiMain {
    private CiMain() {
    }

    public static void main(String[] args) throws Exception {
        String label = args.length > 0 ? args[0] : "jvm";
        List<Class<?>> classes = new ArrayList<Class<?>>();
        for (int i = 1; i < args.length; i++) {
            classes.add(Class.forName(args[i]));
        }
        final int[] counts = new int[3];
        JUnitCore core = new JUnitCore();
        core.addListener(new RunListener() {
            private boolean failed;
            private boolean skipped;

            @Override
            public void testStarted(Description d) {
                failed = false;
                skipped = false;
            }

            @Override
            public void testFailure(Failure f) {
                failed = true;
                System.out.println("FAIL " + f.getDescription().getDisplayName() + ": " + f.getMessage());
                String trace = f.getTrace();
                String[] lines = trace.split("\n");
                for (int i = 1; i < Math.min(lines.length, 6); i++) {
                    System.out.println("    " + lines[i].trim());
                }
            }

            @Override
            public void testAssumptionFailure(Failure f) {
                skipped = true;
                System.out.println("SKIP " + f.getDescription().getDisplayName() + ": " + f.getMessage());
            }

            @Override
            public void testIgnored(Description d) {
                counts[2]++;
                System.out.println("SKIP " + d.getDisplayName());
            }

            @Override
            public void testFinished(Description d) {
                if (failed) {
                    counts[1]++;
                } else if (skipped) {
                    counts[2]++;
                } else {
                    counts[0]++;
                    System.out.println("ok   " + d.getDisplayName());
                }
            }
        });
        Result result = core.run(classes.toArray(new Class<?>[0]));
        System.out.println(label + ": " + counts[0] + " passed, " + counts[1] + " failed" + (counts[2] > 0 ? ", " + counts[2] + " skipped" : ""));
        System.exit(result.wasSuccessful() && counts[1] == 0 ? 0 : 1);
    }
}
