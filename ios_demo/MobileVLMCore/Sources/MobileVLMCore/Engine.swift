import Foundation

/// Everything one generation needs, computed by the core from the manifest.
public struct GenerationRequest {
    public let prompt: Prompt
    /// uint8 CHW bytes, 3 x size x size, RGB.
    public let imageCHW: [UInt8]
    public let imageSize: Int
    public let maxNewTokens: Int
    public let seqLen: Int
    public let addBos: Bool
}

/// Where an engine sends what it generates; return false to ask it to stop.
public protocol GenerationSink: AnyObject {
    /// A piece of text (runners that detokenize themselves: ExecuTorch).
    func onPiece(_ piece: String) -> Bool
    /// A token id and its text (engines that sample ids themselves: Core ML).
    func onToken(_ id: Int, _ piece: String) -> Bool
}

/// A runtime that runs one artifact of a bundle. The app has an ExecuTorch engine (MultimodalRunner)
/// and a Core ML engine (vision + embedding + stateful decoder); both take the same request.
public protocol Engine: AnyObject {
    /// The manifest backend this engine runs ("executorch", "coreml").
    static var backend: String { get }
    init(manifest: Manifest, artifact: Manifest.Artifact) throws
    func load() throws
    /// Prefills and generates, blocking; returns statistics (runner-reported or measured).
    func generate(_ request: GenerationRequest, sink: GenerationSink) throws -> RunnerStats?
    func stop()
}

/// One bundle, one engine: (picture, question) -> the engine's inputs as the manifest says, streamed
/// text filtered through the stop conditions.
public final class Session {
    public struct Answer {
        public let text: String
        public let reason: StopController.Reason
        public let tokens: Int
        public let stats: RunnerStats?
    }

    public let manifest: Manifest
    public let tokenizer: Tokenizer?
    public let images: ImagePreprocessor
    public let engine: Engine

    public init(manifest: Manifest, tokenizer: Tokenizer?, engine: Engine) {
        self.manifest = manifest
        self.tokenizer = tokenizer
        self.images = ImagePreprocessor(manifest.image)
        self.engine = engine
    }

    public func request(_ upright: RgbImage, question: String, maxNewTokens: Int) throws -> GenerationRequest {
        let prompt = try Prompt.build(manifest.prompt, question: question, tokenizer: tokenizer)
        return GenerationRequest(
            prompt: prompt, imageCHW: images.tensor(upright), imageSize: manifest.image.size,
            maxNewTokens: maxNewTokens, seqLen: prompt.seqLen(maxNewTokens), addBos: manifest.prompt.addBos)
    }

    final class Filter: GenerationSink {
        let stops: StopController
        let onAnswer: (String) -> Void
        init(_ stops: StopController, _ onAnswer: @escaping (String) -> Void) {
            self.stops = stops
            self.onAnswer = onAnswer
        }
        func onPiece(_ piece: String) -> Bool { deliver(stops.onText(piece)) }
        func onToken(_ id: Int, _ piece: String) -> Bool { deliver(stops.onToken(id, piece)) }
        private func deliver(_ shown: String) -> Bool {
            if !shown.isEmpty { onAnswer(stops.text) }
            return !stops.stopped
        }
    }

    /// Runs one question; `onAnswer` gets the visible answer each time it grows.
    public func ask(_ upright: RgbImage, question: String, maxNewTokens: Int, onAnswer: @escaping (String) -> Void = { _ in }) throws -> Answer {
        let req = try request(upright, question: question, maxNewTokens: maxNewTokens)
        let stops = StopController(stopStrings: manifest.prompt.stopStrings, eosIds: manifest.prompt.eosIds, maxNewTokens: maxNewTokens)
        let filter = Filter(stops) { [engine] text in
            onAnswer(text)
            if stops.stopped { engine.stop() }
        }
        let stats = try engine.generate(req, sink: filter)
        if stops.stopped { engine.stop() }
        if !stops.finish().isEmpty { onAnswer(stops.text) }
        return Answer(text: stops.text, reason: stops.reason, tokens: stops.tokens, stats: stats)
    }
}
