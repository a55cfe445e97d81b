import Foundation

/// A JSON value. Integers and other numbers are kept apart (as the manifest needs: format_version must
/// be an integer), which Foundation's JSONSerialization does not do the same way on every platform.
public enum JSON: Equatable {
    case object([String: JSON], keys: [String])
    case array([JSON])
    case string(String)
    case int(Int64)
    case double(Double)
    case bool(Bool)
    case null

    public subscript(key: String) -> JSON? {
        if case .object(let map, _) = self { return map[key] }
        return nil
    }

    public var string: String? { if case .string(let s) = self { return s }; return nil }
    public var int: Int64? { if case .int(let i) = self { return i }; return nil }
    public var bool: Bool? { if case .bool(let b) = self { return b }; return nil }
    public var array: [JSON]? { if case .array(let a) = self { return a }; return nil }
    public var number: Double? {
        switch self {
        case .int(let i): return Double(i)
        case .double(let d): return d
        default: return nil
        }
    }
    public var isObject: Bool { if case .object = self { return true }; return false }
    /// Keys of an object in file order.
    public var keys: [String] { if case .object(_, let keys) = self { return keys }; return [] }

    public static func object(_ pairs: [(String, JSON)]) -> JSON {
        var map: [String: JSON] = [:]
        var keys: [String] = []
        for (k, v) in pairs {
            if map[k] == nil { keys.append(k) }
            map[k] = v
        }
        return .object(map, keys: keys)
    }

    /// Compact JSON text.
    public func text() -> String {
        switch self {
        case .null: return "null"
        case .bool(let b): return b ? "true" : "false"
        case .int(let i): return String(i)
        case .double(let d):
            if !d.isFinite { return "null" }
            if d == d.rounded() && abs(d) < 1e15 { return String(Int64(d)) + ".0" }
            return "\(d)"
        case .string(let s): return JSON.quote(s)
        case .array(let items): return "[" + items.map { $0.text() }.joined(separator: ", ") + "]"
        case .object(let map, let keys):
            return "{" + keys.map { JSON.quote($0) + ": " + map[$0]!.text() }.joined(separator: ", ") + "}"
        }
    }

    static func quote(_ s: String) -> String {
        var out = "\""
        for scalar in s.unicodeScalars {
            switch scalar {
            case "\"": out += "\\\""
            case "\\": out += "\\\\"
            case "\n": out += "\\n"
            case "\r": out += "\\r"
            case "\t": out += "\\t"
            default:
                if scalar.value < 0x20 {
                    out += String(format: "\\u%04x", scalar.value)
                } else {
                    out.unicodeScalars.append(scalar)
                }
            }
        }
        return out + "\""
    }

    /// Parses JSON text; a syntax error names the line and column.
    public static func parse(_ text: String) throws -> JSON {
        var parser = Parser(Array(text.utf8))
        parser.skipSpace()
        let value = try parser.value(depth: 0)
        parser.skipSpace()
        if parser.pos != parser.bytes.count { throw parser.error("unexpected text after the JSON value") }
        return value
    }

    public struct SyntaxError: Error, CustomStringConvertible {
        public let description: String
    }

    struct Parser {
        let bytes: [UInt8]
        var pos = 0

        init(_ bytes: [UInt8]) { self.bytes = bytes }

        func error(_ what: String) -> SyntaxError {
            var line = 1
            var column = 1
            for b in bytes[0..<min(pos, bytes.count)] {
                if b == 0x0A { line += 1; column = 1 } else { column += 1 }
            }
            return SyntaxError(description: "\(what) at line \(line) column \(column)")
        }

        mutating func skipSpace() {
            while pos < bytes.count, [0x20, 0x09, 0x0A, 0x0D].contains(bytes[pos]) { pos += 1 }
        }

        mutating func value(depth: Int) throws -> JSON {
            if depth > 512 { throw error("JSON nested too deeply") }
            guard pos < bytes.count else { throw error("unexpected end of JSON") }
            switch bytes[pos] {
            case UInt8(ascii: "{"): return try object(depth)
            case UInt8(ascii: "["): return try array(depth)
            case UInt8(ascii: "\""): return .string(try string())
            case UInt8(ascii: "t"): return try literal("true", .bool(true))
            case UInt8(ascii: "f"): return try literal("false", .bool(false))
            case UInt8(ascii: "n"): return try literal("null", .null)
            case UInt8(ascii: "-"), UInt8(ascii: "0")...UInt8(ascii: "9"): return try number()
            default: throw error("unexpected character")
            }
        }

        mutating func literal(_ word: String, _ value: JSON) throws -> JSON {
            let w = Array(word.utf8)
            guard pos + w.count <= bytes.count, Array(bytes[pos..<pos + w.count]) == w else { throw error("invalid literal") }
            pos += w.count
            return value
        }

        mutating func expect(_ c: Character) throws {
            guard pos < bytes.count, bytes[pos] == c.asciiValue! else { throw error("expected '\(c)'") }
            pos += 1
        }

        mutating func object(_ depth: Int) throws -> JSON {
            pos += 1
            var pairs: [(String, JSON)] = []
            skipSpace()
            if pos < bytes.count, bytes[pos] == UInt8(ascii: "}") { pos += 1; return .object(pairs) }
            while true {
                skipSpace()
                guard pos < bytes.count, bytes[pos] == UInt8(ascii: "\"") else { throw error("expected a string key") }
                let key = try string()
                skipSpace()
                try expect(":")
                skipSpace()
                pairs.append((key, try value(depth: depth + 1)))
                skipSpace()
                if pos < bytes.count, bytes[pos] == UInt8(ascii: ",") { pos += 1; continue }
                try expect("}")
                return .object(pairs)
            }
        }

        mutating func array(_ depth: Int) throws -> JSON {
            pos += 1
            var items: [JSON] = []
            skipSpace()
            if pos < bytes.count, bytes[pos] == UInt8(ascii: "]") { pos += 1; return .array(items) }
            while true {
                skipSpace()
                items.append(try value(depth: depth + 1))
                skipSpace()
                if pos < bytes.count, bytes[pos] == UInt8(ascii: ",") { pos += 1; continue }
                try expect("]")
                return .array(items)
            }
        }

        mutating func hex4() throws -> UInt32 {
            guard pos + 4 <= bytes.count, let v = UInt32(String(decoding: bytes[pos..<pos + 4], as: UTF8.self), radix: 16) else {
                throw error("bad \\u escape")
            }
            pos += 4
            return v
        }

        mutating func string() throws -> String {
            pos += 1
            var out: [UInt8] = []
            while true {
                guard pos < bytes.count else { throw error("unterminated string") }
                let c = bytes[pos]
                pos += 1
                if c == UInt8(ascii: "\"") { break }
                if c < 0x20 { throw error("control character in string") }
                if c != UInt8(ascii: "\\") { out.append(c); continue }
                guard pos < bytes.count else { throw error("unterminated escape") }
                let e = bytes[pos]
                pos += 1
                switch e {
                case UInt8(ascii: "\""): out.append(0x22)
                case UInt8(ascii: "\\"): out.append(0x5C)
                case UInt8(ascii: "/"): out.append(0x2F)
                case UInt8(ascii: "b"): out.append(0x08)
                case UInt8(ascii: "f"): out.append(0x0C)
                case UInt8(ascii: "n"): out.append(0x0A)
                case UInt8(ascii: "r"): out.append(0x0D)
                case UInt8(ascii: "t"): out.append(0x09)
                case UInt8(ascii: "u"):
                    var code = try hex4()
                    if (0xD800..<0xDC00).contains(code), pos + 6 <= bytes.count, bytes[pos] == UInt8(ascii: "\\"), bytes[pos + 1] == UInt8(ascii: "u") {
                        pos += 2
                        let low = try hex4()
                        code = 0x10000 + ((code - 0xD800) << 10) + (low - 0xDC00)
                    }
                    let scalar = Unicode.Scalar(code) ?? "\u{FFFD}"
                    out.append(contentsOf: Array(String(Character(scalar)).utf8))
                default: throw error("bad escape")
                }
            }
            return String(decoding: out, as: UTF8.self)
        }

        mutating func number() throws -> JSON {
            let start = pos
            if bytes[pos] == UInt8(ascii: "-") { pos += 1 }
            var integral = true
            while pos < bytes.count {
                let c = bytes[pos]
                if (UInt8(ascii: "0")...UInt8(ascii: "9")).contains(c) {
                    pos += 1
                } else if [UInt8(ascii: "."), UInt8(ascii: "e"), UInt8(ascii: "E"), UInt8(ascii: "+"), UInt8(ascii: "-")].contains(c) {
                    integral = false
                    pos += 1
                } else {
                    break
                }
            }
            let digits = String(decoding: bytes[start..<pos], as: UTF8.self)
            if integral, digits.count < 19, let i = Int64(digits) { return .int(i) }
            guard let d = Double(digits) else { throw error("bad number '\(digits)'") }
            return .double(d)
        }
    }
}
