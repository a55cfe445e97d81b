import Foundation

/// The bundle's tokenizer.json when it is a byte-level BPE (what mobilevlm trains), reimplemented so
/// the app can count prompt tokens, and tokenize / detokenize for engines without a tokenizer of
/// their own (Core ML). Added tokens are split out first, the rest cut by the GPT-2 pattern, each
/// piece's UTF-8 bytes mapped to the byte-level alphabet and merged by rank (as Hugging Face tokenizers).
public final class Tokenizer {
    /// Unicode White_Space spelled out (the Rust tokenizer's \s), the same pattern as the Android core.
    static let ws = "\\t\\n\\x0B\\f\\r \\x{85}\\x{A0}\\x{1680}\\x{2000}-\\x{200A}\\x{2028}\\x{2029}\\x{202F}\\x{205F}\\x{3000}"
    static let pattern = "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\(ws)\\p{L}\\p{N}]+|[\(ws)]+(?![^\(ws)])|[\(ws)]+"
    static let split = try! NSRegularExpression(pattern: pattern)
    static let byteToChar: [Character] = {
        var out: [Character] = []
        var extra: UInt32 = 0
        for b in 0..<256 {
            let printable = (0x21...0x7E).contains(b) || (0xA1...0xAC).contains(b) || (0xAE...0xFF).contains(b)
            if printable {
                out.append(Character(Unicode.Scalar(UInt32(b))!))
            } else {
                out.append(Character(Unicode.Scalar(0x100 + extra)!))
                extra += 1
            }
        }
        return out
    }()
    static let charToByte: [Character: UInt8] = {
        var map: [Character: UInt8] = [:]
        for (b, c) in byteToChar.enumerated() { map[c] = UInt8(b) }
        return map
    }()

    private var vocab: [String: Int] = [:]
    private var pieces: [Int: String] = [:]
    private var ranks: [String: Int] = [:]
    private var added: [String] = []
    private var special: [Int: Bool] = [:]
    private let ignoreMerges: Bool

    public static func load(_ url: URL) throws -> Tokenizer {
        guard let data = FileManager.default.contents(atPath: url.path), let text = String(data: data, encoding: .utf8) else {
            throw BundleError("\(url.path): cannot read tokenizer")
        }
        let json: JSON
        do { json = try JSON.parse(text) } catch { throw BundleError("\(url.path): not valid JSON (\(error))") }
        return try Tokenizer(url.path, json)
    }

    init(_ whereFile: String, _ json: JSON) throws {
        guard let model = json["model"], model["type"]?.string == "BPE" else {
            throw BundleError("\(whereFile): model.type must be 'BPE' (this app implements byte-level BPE), got \(json["model"]?["type"]?.text() ?? "none")")
        }
        guard let pre = json["pre_tokenizer"], pre["type"]?.string == "ByteLevel" else {
            throw BundleError("\(whereFile): pre_tokenizer.type must be 'ByteLevel' (byte-level BPE), got \(json["pre_tokenizer"]?["type"]?.text() ?? "null")")
        }
        if pre["add_prefix_space"]?.bool == true { throw BundleError("\(whereFile): pre_tokenizer.add_prefix_space true is not supported") }
        if let n = json["normalizer"], n != .null { throw BundleError("\(whereFile): a normalizer is not supported (got \(n.text()))") }
        ignoreMerges = model["ignore_merges"]?.bool ?? false
        guard let v = model["vocab"], v.isObject, let merges = model["merges"]?.array else {
            throw BundleError("\(whereFile): model.vocab (object) and model.merges (list) are required")
        }
        for key in v.keys {
            let id = Int(v[key]!.int ?? -1)
            vocab[key] = id
            pieces[id] = key
        }
        for (i, merge) in merges.enumerated() {
            let pair: [String]
            if let list = merge.array, list.count == 2, let a = list[0].string, let b = list[1].string {
                pair = [a, b]
            } else if let s = merge.string, let space = s.firstIndex(of: " ") {
                pair = [String(s[..<space]), String(s[s.index(after: space)...])]
            } else {
                throw BundleError("\(whereFile): model.merges[\(i)] must be a pair")
            }
            let key = pair[0] + " " + pair[1]
            if ranks[key] == nil { ranks[key] = i }
        }
        for token in json["added_tokens"]?.array ?? [] {
            guard let content = token["content"]?.string, let id = token["id"]?.int else { continue }
            added.append(content)
            vocab[content] = Int(id)
            pieces[Int(id)] = content
            special[Int(id)] = token["special"]?.bool ?? false
        }
        added.sort { $0.count > $1.count }
    }

    /// Token ids of `text` (no BOS: callers add it where the template says).
    public func encode(_ text: String) throws -> [Int] {
        var ids: [Int] = []
        var rest = Substring(text)
        while !rest.isEmpty {
            var best: Range<Substring.Index>? = nil
            var bestToken = ""
            for token in added {
                if let r = rest.range(of: token), best == nil || r.lowerBound < best!.lowerBound {
                    best = r
                    bestToken = token
                }
            }
            guard let found = best else {
                try encodeSegment(String(rest), &ids)
                break
            }
            try encodeSegment(String(rest[..<found.lowerBound]), &ids)
            ids.append(vocab[bestToken]!)
            rest = rest[found.upperBound...]
        }
        return ids
    }

    private func encodeSegment(_ segment: String, _ ids: inout [Int]) throws {
        if segment.isEmpty { return }
        let ns = segment as NSString
        for match in Tokenizer.split.matches(in: segment, range: NSRange(location: 0, length: ns.length)) {
            let piece = ns.substring(with: match.range)
            let word = String(piece.utf8.map { Tokenizer.byteToChar[Int($0)] })
            if ignoreMerges, let id = vocab[word] {
                ids.append(id)
                continue
            }
            for symbol in bpe(word) {
                guard let id = vocab[symbol] else { throw BundleError("tokenizer: no token for '\(symbol)' (the vocabulary lacks a byte)") }
                ids.append(id)
            }
        }
    }

    private func bpe(_ word: String) -> [String] {
        var symbols = word.map { String($0) }
        while symbols.count > 1 {
            var bestRank = Int.max
            var bestAt = -1
            for i in 0..<(symbols.count - 1) {
                if let rank = ranks[symbols[i] + " " + symbols[i + 1]], rank < bestRank {
                    bestRank = rank
                    bestAt = i
                }
            }
            if bestAt < 0 { break }
            symbols[bestAt] += symbols[bestAt + 1]
            symbols.remove(at: bestAt + 1)
        }
        return symbols
    }

    public func isSpecial(_ id: Int) -> Bool { special[id] ?? false }

    /// The raw bytes one token stands for (part of a UTF-8 character, for some byte-level tokens).
    public func tokenBytes(_ id: Int) throws -> [UInt8] {
        guard let piece = pieces[id] else { throw BundleError("tokenizer: token id \(id) is outside the vocabulary") }
        if special[id] != nil { return Array(piece.utf8) }
        var out: [UInt8] = []
        for c in piece {
            guard let b = Tokenizer.charToByte[c] else { return Array(piece.utf8) }
            out.append(b)
        }
        return out
    }

    /// Text of `ids`, special tokens skipped, invalid UTF-8 replaced.
    public func decode(_ ids: [Int]) throws -> String {
        var bytes: [UInt8] = []
        for id in ids where !isSpecial(id) { bytes += try tokenBytes(id) }
        return String(decoding: bytes, as: UTF8.self)
    }
}
