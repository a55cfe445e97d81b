import ExecuTorchLLM
import Foundation
import MobileVLMCore

/// A bundle's .pte run by ExecuTorch's iOS MultimodalRunner (ExecuTorchLLM, SwiftPM branch
/// swiftpm-1.3.0): the text before the image, the image as uint8 CHW bytes [3, S, S] (the runner adds
/// the batch dimension the vision method takes), the text after it; tokens stream to the sink.
/// The iOS runner reports no statistics, so the engine measures the same timestamps itself.
final class ExecuTorchEngine: Engine {
    static let backend = "executorch"
    private let runner: MultimodalRunner
    private let program: URL

    init(manifest: Manifest, artifact: Manifest.Artifact) throws {
        program = try manifest.file(artifact.file)
        runner = MultimodalRunner(modelPath: program.path, tokenizerPath: try manifest.file(manifest.tokenizerFile).path)
    }

    func load() throws {
        do {
            try runner.load()
        } catch {
            throw BundleError("\(program.path): ExecuTorch cannot load this program (\(error.localizedDescription))")
        }
    }

    func generate(_ request: GenerationRequest, sink: GenerationSink) throws -> RunnerStats? {
        runner.reset()
        let image = Image(data: Data(request.imageCHW), width: request.imageSize, height: request.imageSize, channels: 3)
        let inputs = [MultimodalInput(request.prompt.beforeText), MultimodalInput(image), MultimodalInput(request.prompt.afterText)]
        let config = Config {
            $0.sequenceLength = request.seqLen
            $0.maximumNewTokens = request.maxNewTokens
            $0.temperature = 0
            $0.bosCount = request.addBos ? 1 : 0
            $0.eosCount = 0
            $0.echoEnabled = false
        }
        let start = Date()
        var firstToken: Date?
        var generated: Int64 = 0
        do {
            try runner.generate(inputs, config) { [weak self] piece in
                if firstToken == nil { firstToken = Date() }
                generated += 1
                if !sink.onPiece(piece) { self?.runner.stop() }
            }
        } catch {
            throw BundleError("\(program.path): generation failed (\(error.localizedDescription))")
        }
        let end = Date()
        func ms(_ d: Date) -> Int64 { Int64(d.timeIntervalSince1970 * 1000) }
        let first = firstToken ?? end
        return RunnerStats(
            promptTokens: Int64(max(request.prompt.promptTokens, 0)), generatedTokens: generated, modelLoadStartMs: 0, modelLoadEndMs: 0,
            inferenceStartMs: ms(start), promptEvalEndMs: ms(first), firstTokenMs: ms(first), inferenceEndMs: ms(end))
    }

    func stop() {
        runner.stop()
    }
}
