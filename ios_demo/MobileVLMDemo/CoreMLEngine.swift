import CoreML
import CoreVideo
import Foundation
import MobileVLMCore

/// A bundle's Core ML artifact (backend "coreml": a folder with a vision, an embedding and a stateful
/// decoder ML program, iOS 18+), driven from the manifest's `methods` section alone: file names, input,
/// output and state names are read from it, not assumed. Greedy decoding; token ids go to the sink,
/// which stops at the manifest's EOS ids and stop strings.
///
/// What the manifest must say (the draft the Core ML exporter writes today):
///   methods.vision    {file, inputs[0] {name, type: "ImageType"}, outputs[0] {name}}
///   methods.embedding {file, inputs[0] {name, dtype: "int32"}, outputs[0] {name}}
///   methods.decoder   {file, inputs [embeddings {name}, causal_mask {name}], outputs[0] {name}, max_positions}
@available(iOS 18.0, macOS 15.0, *)
final class CoreMLEngine: Engine {
    static let backend = "coreml"

    private struct Method {
        let url: URL
        let inputs: [String]
        let outputs: [String]
    }

    private let vision: Method
    private let embedding: Method
    private let decoder: Method
    private let maxPositions: Int
    private let tokenizer: Tokenizer
    private var models: [String: MLModel] = [:]
    private var stopRequested = false

    init(manifest: Manifest, artifact: Manifest.Artifact) throws {
        let folder = try manifest.file(artifact.file)
        func method(_ name: String) throws -> Method {
            guard let m = artifact.method(name), let file = m["file"]?.string,
                let inputs = m["inputs"]?.array?.compactMap({ $0["name"]?.string }), !inputs.isEmpty,
                let outputs = m["outputs"]?.array?.compactMap({ $0["name"]?.string }), !outputs.isEmpty
            else {
                throw BundleError("\(manifest.root.path)/manifest.json: artifact \(artifact.name) needs methods.\(name) with file, inputs and outputs")
            }
            return Method(url: folder.appendingPathComponent(file), inputs: inputs, outputs: outputs)
        }
        vision = try method("vision")
        embedding = try method("embedding")
        decoder = try method("decoder")
        guard decoder.inputs.count >= 2 else { throw BundleError("\(artifact.name): methods.decoder needs embeddings and causal_mask inputs") }
        maxPositions = Int(artifact.method("decoder")?["max_positions"]?.int ?? Int64(manifest.prompt.contextLength - 1))
        tokenizer = try Tokenizer.load(try manifest.file(manifest.tokenizerFile))
    }

    /// Compiles each .mlpackage once (cached under Caches) and loads it.
    func load() throws {
        let configuration = MLModelConfiguration()
        configuration.computeUnits = .all
        for method in [vision, embedding, decoder] {
            do {
                let compiled = try MLModel.compileModel(at: method.url)
                models[method.url.lastPathComponent] = try MLModel(contentsOf: compiled, configuration: configuration)
            } catch {
                throw BundleError("\(method.url.path): Core ML cannot load this model (\(error.localizedDescription))")
            }
        }
    }

    private func model(_ m: Method) -> MLModel { models[m.url.lastPathComponent]! }

    func stop() { stopRequested = true }

    func generate(_ request: GenerationRequest, sink: GenerationSink) throws -> RunnerStats? {
        stopRequested = false
        guard let afterIds = request.prompt.afterIds else { throw BundleError("Core ML engine: the prompt was not tokenized") }
        let start = Date()
        let image = try embed(image: request.imageCHW, size: request.imageSize)
        let before = try embed(ids: request.prompt.beforeIds)
        let after = try embed(ids: afterIds)
        let prompt = try concat([before, image, after])
        let promptLength = prompt.shape[1].intValue
        let state = model(decoder).makeState()
        var logits = try decode(prompt, past: 0, state: state)
        let promptEnd = Date()
        var position = promptLength
        var generated: Int64 = 0
        var pending: [UInt8] = []
        var firstToken: Date?
        while !stopRequested && generated < request.maxNewTokens && position < maxPositions {
            let id = argmax(logits)
            generated += 1
            if firstToken == nil { firstToken = Date() }
            pending += (try? tokenizer.tokenBytes(id)) ?? []
            // Hand over whole UTF-8 characters only (as ExecuTorch's Android binding does).
            var piece = ""
            if let text = String(bytes: pending, encoding: .utf8) {
                piece = text
                pending = []
            }
            if !sink.onToken(id, piece) { break }
            logits = try decode(try embed(ids: [id]), past: position, state: state)
            position += 1
        }
        let end = Date()
        func ms(_ d: Date) -> Int64 { Int64(d.timeIntervalSince1970 * 1000) }
        return RunnerStats(
            promptTokens: Int64(promptLength), generatedTokens: generated, modelLoadStartMs: 0, modelLoadEndMs: 0,
            inferenceStartMs: ms(start), promptEvalEndMs: ms(promptEnd), firstTokenMs: ms(firstToken ?? end), inferenceEndMs: ms(end))
    }

    private func embed(ids: [Int]) throws -> MLMultiArray {
        let input = try MLMultiArray(shape: [1, NSNumber(value: ids.count)], dataType: .int32)
        for (i, id) in ids.enumerated() { input[i] = NSNumber(value: Int32(id)) }
        let out = try model(embedding).prediction(from: MLDictionaryFeatureProvider(dictionary: [embedding.inputs[0]: input]))
        guard let value = out.featureValue(for: embedding.outputs[0])?.multiArrayValue else {
            throw BundleError("Core ML embedding: no output named \(embedding.outputs[0])")
        }
        return value
    }

    /// The S x S picture as a 32BGRA pixel buffer (the vision model's ImageType input scales it to [0, 1]).
    private func embed(image chw: [UInt8], size: Int) throws -> MLMultiArray {
        var buffer: CVPixelBuffer?
        let status = CVPixelBufferCreate(kCFAllocatorDefault, size, size, kCVPixelFormatType_32BGRA, nil, &buffer)
        guard status == kCVReturnSuccess, let pixels = buffer else { throw BundleError("Core ML vision: cannot make a pixel buffer") }
        CVPixelBufferLockBaseAddress(pixels, [])
        let base = CVPixelBufferGetBaseAddress(pixels)!.assumingMemoryBound(to: UInt8.self)
        let stride = CVPixelBufferGetBytesPerRow(pixels)
        let n = size * size
        for y in 0..<size {
            for x in 0..<size {
                let p = y * stride + 4 * x
                let i = y * size + x
                base[p] = chw[2 * n + i]
                base[p + 1] = chw[n + i]
                base[p + 2] = chw[i]
                base[p + 3] = 255
            }
        }
        CVPixelBufferUnlockBaseAddress(pixels, [])
        let out = try model(vision).prediction(from: MLDictionaryFeatureProvider(dictionary: [vision.inputs[0]: MLFeatureValue(pixelBuffer: pixels)]))
        guard let value = out.featureValue(for: vision.outputs[0])?.multiArrayValue else {
            throw BundleError("Core ML vision: no output named \(vision.outputs[0])")
        }
        return value
    }

    /// [1, T_i, D] arrays joined along T (fp16, what the decoder takes).
    private func concat(_ parts: [MLMultiArray]) throws -> MLMultiArray {
        let width = parts[0].shape[2].intValue
        let total = parts.reduce(0) { $0 + $1.shape[1].intValue }
        let out = try MLMultiArray(shape: [1, NSNumber(value: total), NSNumber(value: width)], dataType: .float16)
        var t = 0
        for part in parts {
            for i in 0..<part.shape[1].intValue {
                for d in 0..<width {
                    out[[0, NSNumber(value: t), NSNumber(value: d)]] = part[[0, NSNumber(value: i), NSNumber(value: d)]]
                }
                t += 1
            }
        }
        return out
    }

    /// Runs the decoder on [1, T, D] embeddings after `past` cached positions; returns logits [1, V].
    private func decode(_ embeds: MLMultiArray, past: Int, state: MLState) throws -> MLMultiArray {
        let t = embeds.shape[1].intValue
        let mask = try MLMultiArray(shape: [1, 1, NSNumber(value: t), NSNumber(value: past + t)], dataType: .float16)
        for i in 0..<t {
            for j in 0..<(past + t) {
                mask[[0, 0, NSNumber(value: i), NSNumber(value: j)]] = NSNumber(value: j <= past + i ? 0 : -Float.infinity)
            }
        }
        let features = try MLDictionaryFeatureProvider(dictionary: [decoder.inputs[0]: embeds, decoder.inputs[1]: mask])
        let out = try model(decoder).prediction(from: features, using: state)
        guard let logits = out.featureValue(for: decoder.outputs[0])?.multiArrayValue else {
            throw BundleError("Core ML decoder: no output named \(decoder.outputs[0])")
        }
        return logits
    }

    private func argmax(_ logits: MLMultiArray) -> Int {
        var best = 0
        var bestValue = -Float.infinity
        for i in 0..<logits.count {
            let v = logits[i].floatValue
            if v > bestValue {
                bestValue = v
                best = i
            }
        }
        return best
    }
}
