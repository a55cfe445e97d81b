package ai.mobilevlm.demo;

import ai.mobilevlm.core.BundleException;
import ai.mobilevlm.core.Engine;
import ai.mobilevlm.core.Manifest;
import java.lang.reflect.InvocationTargetException;

/**
 * Creates the ExecuTorch engine by name, so that the same sources also build an APK without the
 * ExecuTorch runtime (the one CI builds here, which cannot contain it): that APK says so when a bundle
 * is run, rather than pretending to answer.
 */
final class Engines {
    static final String EXECUTORCH = "ai.mobilevlm.demo.engine.ExecuTorchEngine";

    private Engines() {
    }

    static boolean executorchPresent() {
        try {
            Class.forName(EXECUTORCH);
            Class.forName("org.pytorch.executorch.extension.llm.LlmModule");
            return true;
        } catch (ClassNotFoundException | LinkageError e) {
            return false;
        }
    }

    static Engine create(Manifest manifest, Manifest.Artifact artifact) throws BundleException {
        if (!executorchPresent()) {
            throw new BundleException("This build of the app has no ExecuTorch runtime (the APK that CI builds leaves it out); "
                    + "build the app with Android Studio to run bundles.");
        }
        try {
            return (Engine) Class.forName(EXECUTORCH).getConstructor(Manifest.class, Manifest.Artifact.class).newInstance(manifest, artifact);
        } catch (InvocationTargetException e) {
            Throwable cause = e.getCause();
            if (cause instanceof BundleException) {
                throw (BundleException) cause;
            }
            if (cause instanceof UnsatisfiedLinkError) {
                throw new BundleException("ExecuTorch's native library is missing for this phone's CPU (" + cause.getMessage() + ")");
            }
            throw new BundleException("ExecuTorch could not start: " + cause);
        } catch (ReflectiveOperationException e) {
            throw new BundleException("ExecuTorch engine unavailable: " + e);
        }
    }
}
