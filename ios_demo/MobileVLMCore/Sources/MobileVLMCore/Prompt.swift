import Foundation

/// The text around the image for one question, as manifest["prompt"] says.
public struct Prompt {
    public let question: String
    /// Text before the image, without BOS (runners that tokenize add BOS themselves).
    public let beforeText: String
    /// Token ids before the image, BOS included (manifest before_image_ids).
    public let beforeIds: [Int]
    public let afterText: String
    /// Token ids of afterText, nil without a tokenizer.
    public let afterIds: [Int]?
    /// before + image + after tokens, or -1 when unknown.
    public let promptTokens: Int
    public let contextLength: Int

    /// Checks the question (as mobilevlm.processing.check_prompt) and renders the template.
    public static func build(_ spec: Manifest.PromptSpec, question: String, tokenizer: Tokenizer?) throws -> Prompt {
        if question.trimmingCharacters(in: .whitespacesAndNewlines).isEmpty { throw BundleError("prompt is empty") }
        let before = spec.beforeImage.replacingOccurrences(of: spec.slot, with: question)
        let after = spec.afterImage.replacingOccurrences(of: spec.slot, with: question)
        var afterIds: [Int]? = nil
        var total = -1
        if let tokenizer {
            let ids = try tokenizer.encode(after)
            total = spec.beforeImageIds.count + spec.imageTokens + ids.count
            if total >= spec.contextLength {
                throw BundleError("prompt takes \(total) tokens (image included); the artifact was exported with a context of \(spec.contextLength)")
            }
            afterIds = ids
        }
        return Prompt(
            question: question, beforeText: before, beforeIds: spec.beforeImageIds, afterText: after, afterIds: afterIds,
            promptTokens: total, contextLength: spec.contextLength)
    }

    /// The runner's total sequence length for this prompt plus `maxNewTokens`.
    public func seqLen(_ maxNewTokens: Int) -> Int {
        promptTokens < 0 ? contextLength : min(contextLength, promptTokens + maxNewTokens)
    }
}

/// What of the streamed text is shown and when generation stops: an EOS id, the first stop string
/// (held back while it could still be one), or max_new_tokens.
public final class StopController {
    public enum Reason: String { case none = "generating", stopString = "stop_string", eos = "eos", maxNewTokens = "max_new_tokens", end = "end" }

    private let stopStrings: [String]
    private let eosIds: Set<Int>
    private let maxNewTokens: Int
    private var held = ""
    public private(set) var text = ""
    public private(set) var tokens = 0
    public private(set) var reason = Reason.none

    public init(stopStrings: [String], eosIds: [Int], maxNewTokens: Int) {
        self.stopStrings = stopStrings
        self.eosIds = Set(eosIds)
        self.maxNewTokens = maxNewTokens
    }

    public var stopped: Bool { reason != .none }

    /// One piece of text; returns what to show now.
    @discardableResult
    public func onText(_ piece: String) -> String {
        if stopped { return "" }
        tokens += 1
        // Work on unicode scalars: Swift's Character comparison would merge "\n" + "\r" and the like.
        let buffer = held + piece
        var cut: String.Index? = nil
        for stop in stopStrings {
            if let r = buffer.range(of: stop, options: .literal), cut == nil || r.lowerBound < cut! { cut = r.lowerBound }
        }
        if let cut {
            held = ""
            reason = .stopString
            return show(String(buffer[..<cut]))
        }
        let scalars = Array(buffer.unicodeScalars)
        var keep = 0
        for stop in stopStrings {
            let s = Array(stop.unicodeScalars)
            var n = min(s.count - 1, scalars.count)
            while n > keep {
                if Array(scalars[(scalars.count - n)...]) == Array(s[..<n]) { keep = n; break }
                n -= 1
            }
        }
        held = String(String.UnicodeScalarView(scalars[(scalars.count - keep)...]))
        var out = String(String.UnicodeScalarView(scalars[..<(scalars.count - keep)]))
        if tokens >= maxNewTokens {
            reason = .maxNewTokens
            out += held
            held = ""
        }
        return show(out)
    }

    /// One token from an engine that reports ids: an EOS id stops without showing its text.
    @discardableResult
    public func onToken(_ id: Int, _ piece: String) -> String {
        if stopped { return "" }
        if eosIds.contains(id) {
            tokens += 1
            reason = .eos
            let out = held
            held = ""
            return show(out)
        }
        return onText(piece)
    }

    /// The runner returned: shows what was held back.
    @discardableResult
    public func finish() -> String {
        var out = ""
        if !stopped {
            reason = .end
            out = held
        }
        held = ""
        return show(out)
    }

    private func show(_ s: String) -> String {
        text += s
        return s
    }
}
