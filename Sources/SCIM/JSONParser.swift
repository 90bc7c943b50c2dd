/// Where and why JSON input was refused.
public struct JSONError: Error, Sendable, Equatable, CustomStringConvertible {
    public let message: String
    /// Byte offset of the problem in the input.
    public let offset: Int
    public let line: Int
    public let column: Int
    public var description: String { "\(message) at line \(line), column \(column) (byte \(offset))" }
}

/// Limits on untrusted JSON; exceeding one is an error, never a truncation.
public struct JSONLimits: Sendable {
    public var maxBytes = 1 << 20
    public var maxDepth = 64
    public var maxStringBytes = 64 * 1024
    public var maxNumberLength = 64
    /// Members of one object / elements of one array.
    public var maxContainerEntries = 10_000
    /// Reject two members whose names differ only in case (SCIM's names are
    /// case-insensitive, so such input is ambiguous). Exact duplicates are
    /// always rejected.
    public var rejectCaseInsensitiveDuplicates = true
    public init() {}

    /// For JSON this program stored itself after accepting it: what was
    /// accepted must always read back, so no size or count limit applies,
    /// only a depth that covers an accepted resource (64) inside the
    /// envelopes the stores wrap around it.
    public static let stored: JSONLimits = {
        var l = JSONLimits()
        l.maxBytes = .max
        l.maxStringBytes = .max
        l.maxContainerEntries = .max
        l.maxDepth = 96
        return l
    }()

    /// A relay batch at the broker: up to 64 MiB of events that agents
    /// accepted under their request limits (a 1 MiB body, 64 KiB strings,
    /// a depth of 64) and may since have grown by PATCH (a group's members):
    /// only the batch's size and a depth covering the envelope are limits.
    public static let relayBatch: JSONLimits = {
        var l = JSONLimits()
        l.maxBytes = 64 << 20
        l.maxStringBytes = 64 << 20
        l.maxContainerEntries = .max
        l.maxDepth = 96
        return l
    }()
}

/// A strict RFC 8259 parser: no trailing garbage, no comments, no trailing
/// commas, valid UTF-8 only, no lone surrogates, no duplicate member names,
/// bounded depth and sizes. Errors carry the position.
public struct JSONParser: ~Copyable {
    private let bytes: UnsafeBufferPointer<UInt8>
    private let limits: JSONLimits
    private var i = 0
    private var depth = 0
    /// Scratch stacks: members and elements of the containers being parsed,
    /// so each finished container is allocated once at its exact size.

    public static func parse(_ input: [UInt8], limits: JSONLimits = JSONLimits()) throws(JSONError) -> JSON {
        let result: Result<JSON, JSONError> = input.withUnsafeBufferPointer { buf in
            var p = JSONParser(bytes: buf, limits: limits)
            do throws(JSONError) { return .success(try p.document()) } catch { return .failure(error) }
        }
        return try result.get()
    }

    public static func parse(_ text: String, limits: JSONLimits = JSONLimits()) throws(JSONError) -> JSON {
        try parse(Array(text.utf8), limits: limits)
    }

    private init(bytes: UnsafeBufferPointer<UInt8>, limits: JSONLimits) {
        self.bytes = bytes
        self.limits = limits
    }

    private func error(_ message: String, at offset: Int? = nil) -> JSONError {
        let at = min(offset ?? i, bytes.count)
        var line = 1, col = 1
        for k in 0..<at {
            if bytes[k] == 10 { line += 1; col = 1 } else if bytes[k] & 0xC0 != 0x80 { col += 1 }
        }
        return JSONError(message: message, offset: at, line: line, column: col)
    }

    private mutating func document() throws(JSONError) -> JSON {
        guard bytes.count <= limits.maxBytes else {
            throw JSONError(message: "document larger than \(limits.maxBytes) bytes", offset: limits.maxBytes, line: 0, column: 0)
        }
        skipSpace()
        let v = try value()
        skipSpace()
        guard i == bytes.count else { throw error("unexpected data after the JSON value") }
        return v
    }

    @inline(__always)
    private mutating func skipSpace() {
        while i < bytes.count {
            switch bytes[i] {
            case 0x20, 0x09, 0x0A, 0x0D: i += 1
            default: return
            }
        }
    }

    private mutating func value() throws(JSONError) -> JSON {
        guard i < bytes.count else { throw error("unexpected end of input") }
        switch bytes[i] {
        case UInt8(ascii: "{"): return try object()
        case UInt8(ascii: "["): return try array()
        case UInt8(ascii: "\""): return .string(try string())
        case UInt8(ascii: "t"): try literal("true"); return .bool(true)
        case UInt8(ascii: "f"): try literal("false"); return .bool(false)
        case UInt8(ascii: "n"): try literal("null"); return .null
        case UInt8(ascii: "-"), UInt8(ascii: "0")...UInt8(ascii: "9"): return .number(try number())
        default: throw error("unexpected character '\(printable(bytes[i]))'")
        }
    }

    private mutating func literal(_ word: StaticString) throws(JSONError) {
        let n = word.utf8CodeUnitCount
        guard i + n <= bytes.count else { throw error("invalid literal") }
        let w = word.utf8Start
        for k in 0..<n where bytes[i + k] != w[k] { throw error("invalid literal") }
        i += n
    }

    private mutating func enter() throws(JSONError) {
        depth += 1
        if depth > limits.maxDepth { throw error("nesting deeper than \(limits.maxDepth)") }
    }

    private mutating func object() throws(JSONError) -> JSON {
        try enter()
        i += 1
        skipSpace()
        if i < bytes.count && bytes[i] == UInt8(ascii: "}") {
            i += 1
            depth -= 1
            return .object(JSONObject())
        }
        // Members are collected in the object's own array (moved into the
        // result, no copy): fewer retain/release pairs than a shared stack.
        var members: [(key: String, value: JSON)] = []
        members.reserveCapacity(8)
        while true {
            skipSpace()
            guard i < bytes.count, bytes[i] == UInt8(ascii: "\"") else { throw error("expected a member name in quotes") }
            let keyStart = i
            let key = try string()
            for m in members {
                if limits.rejectCaseInsensitiveDuplicates ? equalsIgnoringASCIICase(m.key, key) : sameUTF8(m.key, key) {
                    throw error("duplicate member name \"\(key)\"", at: keyStart)
                }
            }
            skipSpace()
            guard i < bytes.count, bytes[i] == UInt8(ascii: ":") else { throw error("expected ':' after member name") }
            i += 1
            skipSpace()
            let value = try value()
            members.append((key, value))
            guard members.count <= limits.maxContainerEntries else {
                throw error("object with more than \(limits.maxContainerEntries) members")
            }
            skipSpace()
            guard i < bytes.count else { throw error("unterminated object") }
            if bytes[i] == UInt8(ascii: ",") { i += 1; continue }
            if bytes[i] == UInt8(ascii: "}") { i += 1; break }
            throw error("expected ',' or '}' in object")
        }
        depth -= 1
        return .object(JSONObject(members))
    }

    private mutating func array() throws(JSONError) -> JSON {
        try enter()
        i += 1
        skipSpace()
        if i < bytes.count && bytes[i] == UInt8(ascii: "]") {
            i += 1
            depth -= 1
            return .array([])
        }
        var items: [JSON] = []
        items.reserveCapacity(4)
        while true {
            skipSpace()
            let value = try value()
            items.append(value)
            guard items.count <= limits.maxContainerEntries else {
                throw error("array with more than \(limits.maxContainerEntries) elements")
            }
            skipSpace()
            guard i < bytes.count else { throw error("unterminated array") }
            if bytes[i] == UInt8(ascii: ",") { i += 1; continue }
            if bytes[i] == UInt8(ascii: "]") { i += 1; break }
            throw error("expected ',' or ']' in array")
        }
        depth -= 1
        return .array(items)
    }

    private mutating func number() throws(JSONError) -> JSONNumber {
        let start = i
        var integral = true
        if bytes[i] == UInt8(ascii: "-") { i += 1 }
        guard i < bytes.count, isDigit(bytes[i]) else { throw error("invalid number") }
        if bytes[i] == UInt8(ascii: "0") {
            i += 1
            if i < bytes.count && isDigit(bytes[i]) { throw error("leading zero in number") }
        } else {
            while i < bytes.count && isDigit(bytes[i]) { i += 1 }
        }
        if i < bytes.count && bytes[i] == UInt8(ascii: ".") {
            integral = false
            i += 1
            guard i < bytes.count, isDigit(bytes[i]) else { throw error("digit expected after '.'") }
            while i < bytes.count && isDigit(bytes[i]) { i += 1 }
        }
        if i < bytes.count && (bytes[i] == UInt8(ascii: "e") || bytes[i] == UInt8(ascii: "E")) {
            integral = false
            i += 1
            if i < bytes.count && (bytes[i] == UInt8(ascii: "+") || bytes[i] == UInt8(ascii: "-")) { i += 1 }
            guard i < bytes.count, isDigit(bytes[i]) else { throw error("digit expected in exponent") }
            while i < bytes.count && isDigit(bytes[i]) { i += 1 }
        }
        guard i - start <= limits.maxNumberLength else { throw error("number longer than \(limits.maxNumberLength) characters", at: start) }
        let text = String(decoding: UnsafeBufferPointer(rebasing: bytes[start..<i]), as: UTF8.self)
        // An integer too large for Int64 keeps its exact text as a decimal.
        return JSONNumber(validatedText: text, integral: integral && Int64(text) != nil)
    }

    private mutating func string() throws(JSONError) -> String {
        let open = i
        i += 1
        let start = i
        // Fast path: ASCII without escapes, eight bytes at a time, then byte by byte.
        if let base = bytes.baseAddress {
            while i + 8 <= bytes.count, !mayEndPlainRun(UnsafeRawPointer(base + i).loadUnaligned(as: UInt64.self)) { i += 8 }
        }
        while i < bytes.count {
            let c = bytes[i]
            if c == UInt8(ascii: "\"") {
                guard i - start <= limits.maxStringBytes else { throw error("string longer than \(limits.maxStringBytes) bytes", at: open) }
                let s = String(decoding: UnsafeBufferPointer(rebasing: bytes[start..<i]), as: UTF8.self)
                i += 1
                return s
            }
            if c == UInt8(ascii: "\\") || c < 0x20 || c >= 0x80 { break }
            i += 1
        }
        var out = Array(bytes[start..<i])
        while true {
            guard i < bytes.count else { throw error("unterminated string", at: open) }
            guard out.count <= limits.maxStringBytes else { throw error("string longer than \(limits.maxStringBytes) bytes", at: open) }
            let c = bytes[i]
            switch c {
            case UInt8(ascii: "\""):
                i += 1
                return String(decoding: out, as: UTF8.self)
            case UInt8(ascii: "\\"):
                try escape(into: &out)
            case 0..<0x20:
                throw error("unescaped control character in string")
            case 0x80...:
                try utf8Sequence(into: &out)
            default:
                out.append(c)
                i += 1
            }
        }
    }

    private mutating func escape(into out: inout [UInt8]) throws(JSONError) {
        let at = i
        i += 1
        guard i < bytes.count else { throw error("unterminated escape") }
        let e = bytes[i]
        i += 1
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
            var scalar = try hex4()
            if scalar >= 0xD800 && scalar <= 0xDBFF {
                guard i + 1 < bytes.count, bytes[i] == UInt8(ascii: "\\"), bytes[i + 1] == UInt8(ascii: "u") else {
                    throw error("lone high surrogate in \\u escape", at: at)
                }
                i += 2
                let low = try hex4()
                guard low >= 0xDC00 && low <= 0xDFFF else { throw error("high surrogate not followed by a low surrogate", at: at) }
                scalar = 0x10000 + ((scalar - 0xD800) << 10) + (low - 0xDC00)
            } else if scalar >= 0xDC00 && scalar <= 0xDFFF {
                throw error("lone low surrogate in \\u escape", at: at)
            }
            appendUTF8(UInt32(scalar), to: &out)
        default:
            throw error("invalid escape '\\\(printable(e))'", at: at)
        }
    }

    private mutating func hex4() throws(JSONError) -> Int {
        guard i + 4 <= bytes.count else { throw error("incomplete \\u escape") }
        var v = 0
        for _ in 0..<4 {
            guard let d = hexDigitValue(bytes[i]) else { throw error("invalid hex digit in \\u escape") }
            v = v << 4 | d
            i += 1
        }
        return v
    }

    /// Copies one well-formed UTF-8 sequence (RFC 3629: no overlongs, no
    /// surrogates, nothing above U+10FFFF).
    private mutating func utf8Sequence(into out: inout [UInt8]) throws(JSONError) {
        let c = bytes[i]
        guard let (more, lo, hi) = utf8Lead(c) else { throw error("invalid UTF-8 byte 0x\(String(c, radix: 16))") }
        let n = more + 1
        guard i + n <= bytes.count else { throw error("truncated UTF-8 sequence") }
        let second = bytes[i + 1]
        guard second >= lo && second <= hi else { throw error("invalid UTF-8 sequence") }
        for k in 2..<max(n, 2) where bytes[i + k] & 0xC0 != 0x80 { throw error("invalid UTF-8 sequence") }
        out.append(contentsOf: UnsafeBufferPointer(rebasing: bytes[i..<i + n]))
        i += n
    }
}

@inline(__always) private func isDigit(_ c: UInt8) -> Bool { c >= 48 && c <= 57 }

func printable(_ c: UInt8) -> String {
    c >= 0x20 && c < 0x7F ? String(UnicodeScalar(c)) : "\\x" + String(c, radix: 16)
}

/// The value of a hexadecimal digit.
@inline(__always) func hexDigitValue(_ c: UInt8) -> Int? {
    switch c {
    case 48...57: return Int(c) - 48
    case 65...70: return Int(c) - 55
    case 97...102: return Int(c) - 87
    default: return nil
    }
}

/// For the first byte of a well-formed UTF-8 sequence (RFC 3629: no
/// overlongs, no surrogates, nothing above U+10FFFF): how many continuation
/// bytes follow, and the range the next one must be in (the others are
/// 0x80...0xBF). Nil: not a first byte.
@inline(__always) func utf8Lead(_ c: UInt8) -> (continuation: Int, low: UInt8, high: UInt8)? {
    switch c {
    case 0xC2...0xDF: return (1, 0x80, 0xBF)
    case 0xE0: return (2, 0xA0, 0xBF)
    case 0xE1...0xEC, 0xEE...0xEF: return (2, 0x80, 0xBF)
    case 0xED: return (2, 0x80, 0x9F)
    case 0xF0: return (3, 0x90, 0xBF)
    case 0xF1...0xF3: return (3, 0x80, 0xBF)
    case 0xF4: return (3, 0x80, 0x8F)
    default: return nil
    }
}

func appendUTF8(_ scalar: UInt32, to out: inout [UInt8]) {
    switch scalar {
    case 0..<0x80: out.append(UInt8(scalar))
    case 0x80..<0x800:
        out.append(UInt8(0xC0 | (scalar >> 6)))
        out.append(UInt8(0x80 | (scalar & 0x3F)))
    case 0x800..<0x10000:
        out.append(UInt8(0xE0 | (scalar >> 12)))
        out.append(UInt8(0x80 | ((scalar >> 6) & 0x3F)))
        out.append(UInt8(0x80 | (scalar & 0x3F)))
    default:
        out.append(UInt8(0xF0 | (scalar >> 18)))
        out.append(UInt8(0x80 | ((scalar >> 12) & 0x3F)))
        out.append(UInt8(0x80 | ((scalar >> 6) & 0x3F)))
        out.append(UInt8(0x80 | (scalar & 0x3F)))
    }
}

// MARK: serialisation

extension JSON {
    /// Compact UTF-8 serialisation. Strings escape `"`, `\` and control
    /// characters; numbers are written as they were read.
    public func serialized() -> [UInt8] {
        var out: [UInt8] = []
        out.reserveCapacity(1024)
        write(to: &out)
        return out
    }

    /// The serialisation as a `String`.
    public var text: String { String(decoding: serialized(), as: UTF8.self) }

    public func write(to out: inout [UInt8]) {
        switch self {
        case .null: out.append(contentsOf: nullBytes)
        case .bool(let b): out.append(contentsOf: b ? trueBytes : falseBytes)
        case .number(let n): out.append(contentsOf: n.text.utf8)
        case .string(let s): writeString(s, to: &out)
        case .array(let a):
            out.append(UInt8(ascii: "["))
            for k in a.indices {
                if k > 0 { out.append(UInt8(ascii: ",")) }
                a[k].write(to: &out)
            }
            out.append(UInt8(ascii: "]"))
        case .object(let o):
            out.append(UInt8(ascii: "{"))
            let members = o.members
            for k in members.indices {
                if k > 0 { out.append(UInt8(ascii: ",")) }
                writeString(members[k].key, to: &out)
                out.append(UInt8(ascii: ":"))
                members[k].value.write(to: &out)
            }
            out.append(UInt8(ascii: "}"))
        }
    }
}

private let nullBytes: [UInt8] = Array("null".utf8)
private let trueBytes: [UInt8] = Array("true".utf8)
private let falseBytes: [UInt8] = Array("false".utf8)

private let hexDigits: [UInt8] = Array("0123456789abcdef".utf8)

/// Appends `s` as a JSON string (quoted and escaped) to `out`.
public func appendJSONString(_ s: String, to out: inout [UInt8]) { writeString(s, to: &out) }

/// Writes `s` quoted, copying runs that need no escape in one go.
func writeString(_ s: String, to out: inout [UInt8]) {
    out.append(UInt8(ascii: "\""))
    // Native strings are read in place (no uniqueness check, no copy); small
    // and bridged ones through a contiguous copy.
    if s.utf8.withContiguousStorageIfAvailable({ writeEscaped($0, to: &out) }) == nil {
        var copy = s
        copy.withUTF8 { writeEscaped($0, to: &out) }
    }
    out.append(UInt8(ascii: "\""))
}

private func writeEscaped(_ bytes: UnsafeBufferPointer<UInt8>, to out: inout [UInt8]) {
    guard let base = bytes.baseAddress else { return }
    let n = bytes.count
    var run = 0, i = 0
    while i < n {
        // Eight bytes at a time while none of them needs an escape.
        while i + 8 <= n, !mayNeedEscape(UnsafeRawPointer(base + i).loadUnaligned(as: UInt64.self)) { i += 8 }
        guard i < n else { break }
        let c = base[i]
        i += 1
        guard c == 0x22 || c == 0x5C || c < 0x20 else { continue }
        out.append(contentsOf: UnsafeBufferPointer(start: base + run, count: i - 1 - run))
        run = i
        switch c {
        case 0x22: out.append(contentsOf: [0x5C, 0x22])
        case 0x5C: out.append(contentsOf: [0x5C, 0x5C])
        case 0x0A: out.append(contentsOf: [0x5C, UInt8(ascii: "n")])
        case 0x0D: out.append(contentsOf: [0x5C, UInt8(ascii: "r")])
        case 0x09: out.append(contentsOf: [0x5C, UInt8(ascii: "t")])
        default:
            out.append(contentsOf: [0x5C, UInt8(ascii: "u"), 48, 48, hexDigits[Int(c >> 4)], hexDigits[Int(c & 15)]])
        }
    }
    out.append(contentsOf: UnsafeBufferPointer(start: base + run, count: n - run))
}

private let lowBits: UInt64 = 0x0101_0101_0101_0101
private let highBits: UInt64 = 0x8080_8080_8080_8080

/// Whether one of the eight bytes of `w` may be `"`, `\` or a control
/// character (never false when one is; rarely true when none is: a borrow
/// from a byte that is one, or from a byte of 0x80 and above).
@inline(__always)
private func mayNeedEscape(_ w: UInt64) -> Bool {
    hasZeroByte(w ^ (lowBits &* 0x22)) || hasZeroByte(w ^ (lowBits &* 0x5C)) || (w &- lowBits &* 0x20) & ~w & highBits != 0
}

/// Whether one of the eight bytes of `w` is 0 (exact).
@inline(__always)
func hasZeroByte(_ w: UInt64) -> Bool { (w &- lowBits) & ~w & highBits != 0 }

/// Whether one of the eight bytes of `w` may end a plain ASCII run of a
/// string being parsed: `"`, `\`, a control character or a byte of 0x80 and
/// above (never false when one is).
@inline(__always)
func mayEndPlainRun(_ w: UInt64) -> Bool {
    w & highBits != 0 || hasZeroByte(w ^ (lowBits &* 0x22)) || hasZeroByte(w ^ (lowBits &* 0x5C))
        || (w &- lowBits &* 0x20) & ~w & highBits != 0
}
