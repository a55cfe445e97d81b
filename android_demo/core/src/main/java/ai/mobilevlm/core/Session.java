package ai.mobilevlm.core;

/**
 * One bundle, one engine: turns (picture, question) into the engine's inputs exactly as the manifest
 * says, filters the streamed text through the stop conditions, and stops the engine when they say so.
 */
public final class Session {
    /** Receives the visible answer so far, each time it grows. */
    public interface Listener {
        void onAnswer(String visibleSoFar);
    }

    /** What one question produced. */
    public static final class Answer {
        public final String text;
        public final StopController.Reason reason;
        public final int tokens;
        /** The runner's statistics, or null. */
        public final RunnerStats stats;
        /** Wall time of the engine's generate call. */
        public final double wallMs;

        Answer(String text, StopController.Reason reason, int tokens, RunnerStats stats, double wallMs) {
            this.text = text;
            this.reason = reason;
            this.tokens = tokens;
            this.stats = stats;
            this.wallMs = wallMs;
        }
    }

    public final Manifest manifest;
    public final Tokenizer tokenizer;
    public final ImagePreprocessor images;
    private final Engine engine;

    public Session(Manifest manifest, Tokenizer tokenizer, Engine engine) {
        this.manifest = manifest;
        this.tokenizer = tokenizer;
        this.images = new ImagePreprocessor(manifest.image);
        this.engine = engine;
    }

    public Engine.Request request(RgbImage upright, String question, int maxNewTokens) throws BundleException {
        Prompt prompt = Prompt.build(manifest.prompt, question, tokenizer);
        return new Engine.Request(prompt, images.tensor(upright), images.size(), maxNewTokens, manifest.prompt.addBos);
    }

    public Answer ask(RgbImage upright, String question, int maxNewTokens, final Listener listener) throws BundleException {
        Engine.Request request = request(upright, question, maxNewTokens);
        final StopController stops = StopController.forPrompt(manifest.prompt, maxNewTokens);
        Engine.Sink sink = new Engine.Sink() {
            @Override
            public void onPiece(String piece) {
                deliver(stops.onText(piece));
            }

            @Override
            public void onToken(int id, String piece) {
                deliver(stops.onToken(id, piece));
            }

            private void deliver(String shown) {
                if (!shown.isEmpty() && listener != null) {
                    listener.onAnswer(stops.text());
                }
                if (stops.stopped()) {
                    engine.stop();
                }
            }
        };
        long started = System.nanoTime();
        RunnerStats stats = engine.generate(request, sink);
        double wallMs = (System.nanoTime() - started) / 1e6;
        if (!stops.finish().isEmpty() && listener != null) {
            listener.onAnswer(stops.text());
        }
        return new Answer(stops.text(), stops.reason(), stops.tokens(), stats, wallMs);
    }
}
