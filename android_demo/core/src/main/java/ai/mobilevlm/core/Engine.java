package ai.mobilevlm.core;

/**
 * A runtime that runs one artifact of a bundle: the Android app's ExecuTorch engine (LlmModule), the
 * iOS app's ExecuTorch and Core ML engines. The core drives it the same way whatever the runtime:
 * prompt before the image, the image tensor, prompt after it, then generation streamed to a sink.
 */
public interface Engine {
    /** Loads the artifact (slow). A failure is a message for the user. */
    void load() throws BundleException;

    /**
     * Prefills {@code request} and generates, blocking until the runner returns; pieces of text go to
     * {@code sink} as they come. Returns the runner's statistics, or null when it reports none.
     */
    RunnerStats generate(Request request, Sink sink) throws BundleException;

    /** Wall time of the last generate call's image step (vision encoder and its prefill), in ms, or -1. */
    double lastImageMs();

    /** Asks a running {@link #generate} to return soon (called from the sink or another thread). */
    void stop();

    /** Frees the runtime's memory. */
    void close();

    /** Where an engine sends what it generates. */
    interface Sink {
        /** A piece of text (runners that detokenize themselves). */
        void onPiece(String piece);

        /** A token id and its text (engines that sample ids themselves). */
        void onToken(int id, String piece);
    }

    /** Everything one generation needs, computed by the core from the manifest. */
    final class Request {
        public final Prompt prompt;
        /** uint8 CHW bytes, 3 x size x size, RGB. */
        public final byte[] imageChw;
        public final int imageSize;
        public final int maxNewTokens;
        /** Total sequence length for runners that take one (prompt + maxNewTokens, capped by the context). */
        public final int seqLen;
        public final boolean addBos;

        public Request(Prompt prompt, byte[] imageChw, int imageSize, int maxNewTokens, boolean addBos) {
            this.prompt = prompt;
            this.imageChw = imageChw;
            this.imageSize = imageSize;
            this.maxNewTokens = maxNewTokens;
            this.seqLen = prompt.seqLen(maxNewTokens);
            this.addBos = addBos;
        }
    }
}
