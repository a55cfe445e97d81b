package ai.mobilevlm.demo.engine;

import ai.mobilevlm.core.BundleException;
import ai.mobilevlm.core.Engine;
import ai.mobilevlm.core.Manifest;
import ai.mobilevlm.core.RunnerStats;
import java.io.File;
import java.nio.ByteBuffer;
import org.pytorch.executorch.extension.llm.LlmCallback;
import org.pytorch.executorch.extension.llm.LlmGenerationConfig;
import org.pytorch.executorch.extension.llm.LlmModule;
import org.pytorch.executorch.extension.llm.LlmModuleConfig;

/**
 * A bundle's .pte run by ExecuTorch's Android LlmModule in its text-vision mode (the C++
 * MultimodalRunner, the runner the exporter's parity check uses): the text before the image
 * (prefillPrompt; the runner adds BOS when the manifest says add_bos), the image as the uint8
 * [1, 3, S, S] RGB tensor the manifest describes (prefillImages with a direct buffer of CHW bytes),
 * then generate with the text after the image, streaming each piece to the sink.
 *
 * <p>Written against ExecuTorch's Android API 1.3 (org.pytorch:executorch-android, the same classes as
 * the classes.jar inside react-native-executorch 0.9.3, which CI compiles this file against).
 */
public final class ExecuTorchEngine implements Engine {
    private final File program;
    private final LlmModule module;
    private volatile double lastImageMs = -1;

    public ExecuTorchEngine(Manifest manifest, Manifest.Artifact artifact) throws BundleException {
        if (!"executorch".equals(artifact.backend)) {
            throw new BundleException(artifact.name + ": backend is " + artifact.backend + ", this engine runs executorch artifacts");
        }
        program = manifest.file(artifact.file);
        File tokenizer = manifest.file(manifest.tokenizerFile);
        LlmModuleConfig config = LlmModuleConfig.create()
                .modulePath(program.getPath())
                .tokenizerPath(tokenizer.getPath())
                .modelType(LlmModule.MODEL_TYPE_TEXT_VISION)
                .temperature(0.0f)
                .numBos(manifest.prompt.addBos ? 1 : 0)
                .numEos(0)
                .loadMode(LlmModuleConfig.LOAD_MODE_MMAP)
                .build();
        try {
            module = new LlmModule(config);
        } catch (RuntimeException e) {
            throw new BundleException(program.getPath() + ": ExecuTorch cannot open this program (" + e.getMessage() + ")");
        }
    }

    @Override
    public void load() throws BundleException {
        try {
            module.load();
        } catch (RuntimeException e) {
            throw new BundleException(program.getPath() + ": ExecuTorch cannot load this program (" + e.getMessage() + ")");
        }
    }

    @Override
    public RunnerStats generate(Request request, final Sink sink) throws BundleException {
        final String[] stats = {null};
        final String[] error = {null};
        try {
            module.resetContext();
            module.prefillPrompt(request.prompt.beforeText);
            ByteBuffer image = ByteBuffer.allocateDirect(request.imageChw.length);
            image.put(request.imageChw);
            image.rewind();
            long started = System.nanoTime();
            module.prefillImages(image, request.imageSize, request.imageSize, 3);
            lastImageMs = (System.nanoTime() - started) / 1e6;
            LlmGenerationConfig config = LlmGenerationConfig.create()
                    .seqLen(request.seqLen)
                    .maxNewTokens(request.maxNewTokens)
                    .temperature(0.0f)
                    .echo(false)
                    .numBos(0)
                    .numEos(0)
                    .build();
            module.generate(request.prompt.afterText, config, new LlmCallback() {
                @Override
                public void onResult(String piece) {
                    sink.onPiece(piece);
                }

                @Override
                public void onStats(String json) {
                    stats[0] = json;
                }

                @Override
                public void onError(int code, String message) {
                    error[0] = message + " (error " + code + ")";
                }
            });
        } catch (RuntimeException e) {
            throw new BundleException(program.getPath() + ": generation failed (" + e.getMessage() + ")");
        }
        if (error[0] != null) {
            throw new BundleException(program.getPath() + ": generation failed: " + error[0]);
        }
        return stats[0] == null ? null : RunnerStats.parse(stats[0]);
    }

    @Override
    public double lastImageMs() {
        return lastImageMs;
    }

    @Override
    public void stop() {
        module.stop();
    }

    @Override
    public void close() {
        module.close();
    }
}
