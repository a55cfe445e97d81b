import Foundation

/// Decimals rounded half away from zero, as the Android core and golden.py's `fixed`.
public func fixed(_ value: Double?, _ digits: Int) -> String {
    guard let value, value.isFinite else { return "-" }
    let pow10: [Double] = [1, 10, 100, 1000, 10000, 100000, 1000000]
    let scaled = Int64((abs(value) * pow10[digits] + 0.5).rounded(.down))
    let unit = Int64(pow10[digits])
    var out = (value < 0 && scaled != 0 ? "-" : "") + String(scaled / unit)
    if digits > 0 {
        let f = String(scaled % unit)
        out += "." + String(repeating: "0", count: digits - f.count) + f
    }
    return out
}

/// One generation's statistics: ExecuTorch's stats record, or the same timestamps measured by the app
/// (the iOS runner reports none). Rates use ExecuTorch's formulas.
public struct RunnerStats: Equatable {
    public var promptTokens: Int64
    public var generatedTokens: Int64
    public var modelLoadStartMs: Int64
    public var modelLoadEndMs: Int64
    public var inferenceStartMs: Int64
    public var promptEvalEndMs: Int64
    public var firstTokenMs: Int64
    public var inferenceEndMs: Int64

    public init(
        promptTokens: Int64, generatedTokens: Int64, modelLoadStartMs: Int64, modelLoadEndMs: Int64, inferenceStartMs: Int64,
        promptEvalEndMs: Int64, firstTokenMs: Int64, inferenceEndMs: Int64
    ) {
        self.promptTokens = promptTokens
        self.generatedTokens = generatedTokens
        self.modelLoadStartMs = modelLoadStartMs
        self.modelLoadEndMs = modelLoadEndMs
        self.inferenceStartMs = inferenceStartMs
        self.promptEvalEndMs = promptEvalEndMs
        self.firstTokenMs = firstTokenMs
        self.inferenceEndMs = inferenceEndMs
    }

    public static func parse(_ text: String) throws -> RunnerStats {
        let json: JSON
        do { json = try JSON.parse(text) } catch { throw BundleError("runner statistics: not valid JSON (\(error))") }
        func f(_ name: String) throws -> Int64 {
            guard let v = json[name]?.number else { throw BundleError("runner statistics: field '\(name)' missing or not a number") }
            return Int64(v)
        }
        return RunnerStats(
            promptTokens: try f("prompt_tokens"), generatedTokens: try f("generated_tokens"),
            modelLoadStartMs: try f("model_load_start_ms"), modelLoadEndMs: try f("model_load_end_ms"),
            inferenceStartMs: try f("inference_start_ms"), promptEvalEndMs: try f("prompt_eval_end_ms"),
            firstTokenMs: try f("first_token_ms"), inferenceEndMs: try f("inference_end_ms"))
    }

    public var prefillTokPerS: Double? {
        let ms = promptEvalEndMs - inferenceStartMs
        return ms > 0 ? Double(promptTokens) / Double(ms) * 1000 : nil
    }

    public var decodeTokPerS: Double? {
        let ms = inferenceEndMs - promptEvalEndMs
        return ms > 0 ? Double(generatedTokens) / Double(ms) * 1000 : nil
    }

    public var ttftMs: Double? { firstTokenMs >= inferenceStartMs ? Double(firstTokenMs - inferenceStartMs) : nil }

    public var loadS: Double? {
        let ms = modelLoadEndMs - modelLoadStartMs
        return ms > 0 ? Double(ms) / 1000 : nil
    }

    /// The line shown under an answer.
    public var line: String {
        "prefill \(promptTokens) tok @ \(fixed(prefillTokPerS, 1)) tok/s · first token \(fixed(ttftMs, 0)) ms · "
            + "decode \(generatedTokens) tok @ \(fixed(decodeTokPerS, 1)) tok/s · load \(fixed(loadS, 2)) s"
    }
}
