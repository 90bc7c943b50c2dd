/// Reads a SCIM resource (a group as a target answers `GET /Groups/{id}`)
/// fed in chunks, and yields each element of its top-level `members` array
/// as soon as that element is complete, parsed by `JSONParser`. Nothing else
/// is kept: memory holds the element being read (at most
/// `maxElementBytes`), a top-level attribute name, a number or literal, and
/// the nesting stack, whatever the document's size.
///
/// The whole document is checked as strictly as `JSONParser` checks it
/// (structure, strings, escapes, UTF-8, numbers, literals, depth), except
/// for duplicate attribute names other than `members`. Only the top-level
/// `members` counts (its name matched as SCIM matches names, ignoring
/// case): one nested in another attribute, or in a string, is not it.
public struct MemberScanner {
    /// The largest one element may be; a larger one is refused.
    public let maxElementBytes: Int
    public let maxDepth: Int
    /// True once a top-level `members` array was read to its end.
    public private(set) var sawMembers = false
    /// The most bytes held at once for an element or a name.
    public private(set) var peakBuffered = 0
    /// Bytes read so far.
    public private(set) var offset = 0

    private enum Expect { case value, valueOrClose, key, keyOrClose, colon, commaOrClose, end }
    private static let object: UInt8 = 1
    private static let array: UInt8 = 2

    private var expect = Expect.value
    private var stack: [UInt8] = []
    private var line = 1
    private var column = 1

    // A string being read.
    private var inString = false
    /// 0: none; 1: after a backslash; 2...5: that many minus 2 hex digits of `\u` read.
    private var escape = 0
    private var hex = 0
    private var highSurrogate = false
    private var utf8Needed = 0
    private var utf8Low: UInt8 = 0x80
    private var utf8High: UInt8 = 0xBF

    // A number or literal being read (at most 64 bytes, checked by `JSONParser`).
    private var scalar: [UInt8] = []
    private var inScalar = false

    /// A top-level attribute name (with its quotes) being read.
    private var name: [UInt8] = []
    private var readingName = false
    private var membersNamed = false
    private var membersNext = false
    /// True inside the top-level `members` array.
    private var inMembers = false
    /// The member element being read (raw bytes), when `capturing`.
    private var element: [UInt8] = []
    private var capturing = false

    public init(maxElementBytes: Int = 64 * 1024, maxDepth: Int = 64) {
        self.maxElementBytes = maxElementBytes
        self.maxDepth = maxDepth
        element.reserveCapacity(256)
    }

    private func error(_ message: String) -> JSONError {
        JSONError(message: message, offset: offset, line: line, column: column)
    }

    /// Reads `bytes`, calling `member` with each element of `members`
    /// completed in them. Throws a `JSONError` for malformed input (or
    /// what `member` throws); the scanner is of no further use then.
    public mutating func feed(_ bytes: UnsafeRawBufferPointer, _ member: (JSON) throws -> Void) throws {
        for c in bytes {
            try take(c, member)
            offset += 1
            if c == 10 {
                line += 1
                column = 1
            } else if c & 0xC0 != 0x80 {
                column += 1
            }
        }
    }

    public mutating func feed(_ bytes: [UInt8], _ member: (JSON) throws -> Void) throws {
        try bytes.withUnsafeBytes { try feed($0, member) }
    }

    /// The input ended: throws unless it was one complete document.
    public mutating func finish() throws(JSONError) {
        guard expect == .end, !inString else { throw error("unexpected end of input") }
    }

    @inline(__always)
    private mutating func take(_ c: UInt8, _ member: (JSON) throws -> Void) throws {
        if inString {
            try stringByte(c, member)
            return
        }
        if inScalar {
            if isScalarByte(c) {
                scalar.append(c)
                if capturing { try keep(c) }
                guard scalar.count <= 64 else { throw error("number longer than 64 characters") }
                return
            }
            inScalar = false
            do { _ = try JSONParser.parse(scalar) } catch { throw self.error("invalid number or literal") }
            try valueEnded(member)
        }
        switch c {
        case 0x20, 0x09, 0x0A, 0x0D:
            if capturing { try keep(c) }
            return
        default: break
        }
        switch expect {
        case .end:
            throw error("unexpected data after the JSON value")
        case .colon:
            guard c == UInt8(ascii: ":") else { throw error("expected ':' after member name") }
            if capturing { try keep(c) }
            expect = .value
        case .commaOrClose:
            let top = stack[stack.count - 1]
            if c == UInt8(ascii: ",") {
                if capturing { try keep(c) }
                expect = top == MemberScanner.object ? .key : .value
            } else if c == (top == MemberScanner.object ? UInt8(ascii: "}") : UInt8(ascii: "]")) {
                try close(c, member)
            } else {
                throw error(top == MemberScanner.object ? "expected ',' or '}' in object" : "expected ',' or ']' in array")
            }
        case .key, .keyOrClose:
            if c == UInt8(ascii: "}") && expect == .keyOrClose {
                try close(c, member)
                return
            }
            guard c == UInt8(ascii: "\"") else { throw error("expected a member name in quotes") }
            if capturing { try keep(c) }
            readingName = stack.count == 1
            if readingName { name = [c] }
            startString()
        case .value, .valueOrClose:
            if c == UInt8(ascii: "]") && expect == .valueOrClose {
                try close(c, member)
                return
            }
            if stack.isEmpty && c != UInt8(ascii: "{") { throw error("a SCIM resource is a JSON object") }
            // The first byte of a value: an element of `members` is captured from here.
            if inMembers && stack.count == 2 {
                capturing = true
                element.removeAll(keepingCapacity: true)
            }
            let startsMembers = membersNext
            membersNext = false
            if capturing { try keep(c) }
            switch c {
            case UInt8(ascii: "{"), UInt8(ascii: "["):
                guard stack.count < maxDepth else { throw error("nesting deeper than \(maxDepth)") }
                stack.append(c == UInt8(ascii: "{") ? MemberScanner.object : MemberScanner.array)
                expect = c == UInt8(ascii: "{") ? .keyOrClose : .valueOrClose
                if startsMembers && c == UInt8(ascii: "[") { inMembers = true }
            case UInt8(ascii: "\""):
                startString()
            case UInt8(ascii: "-"), UInt8(ascii: "0")...UInt8(ascii: "9"), UInt8(ascii: "t"), UInt8(ascii: "f"), UInt8(ascii: "n"):
                inScalar = true
                scalar.removeAll(keepingCapacity: true)
                scalar.append(c)
            default:
                throw error("unexpected character '\(printable(c))'")
            }
        }
    }

    private func isScalarByte(_ c: UInt8) -> Bool {
        switch c {
        case UInt8(ascii: "0")...UInt8(ascii: "9"), UInt8(ascii: "a")...UInt8(ascii: "z"), UInt8(ascii: "A")...UInt8(ascii: "Z"),
            UInt8(ascii: "-"), UInt8(ascii: "+"), UInt8(ascii: "."):
            return true
        default: return false
        }
    }

    @inline(__always)
    private mutating func keep(_ c: UInt8) throws(JSONError) {
        element.append(c)
        if element.count > peakBuffered { peakBuffered = element.count }
        guard element.count <= maxElementBytes else {
            throw error("an element of members larger than \(maxElementBytes) bytes")
        }
    }

    private mutating func close(_ c: UInt8, _ member: (JSON) throws -> Void) throws {
        if capturing { try keep(c) }
        stack.removeLast()
        if inMembers && stack.count == 1 {
            inMembers = false
            sawMembers = true
        }
        try valueEnded(member)
    }

    /// A value ended (a container closed, a string or scalar ended).
    private mutating func valueEnded(_ member: (JSON) throws -> Void) throws {
        if capturing && stack.count == 2 {
            capturing = false
            var limits = JSONLimits()
            limits.maxBytes = maxElementBytes
            limits.maxStringBytes = maxElementBytes
            limits.maxDepth = maxDepth
            let parsed: JSON
            do { parsed = try JSONParser.parse(element, limits: limits) } catch {
                throw self.error("in an element of members: \(error.message)")
            }
            try member(parsed)
        }
        expect = stack.isEmpty ? .end : .commaOrClose
    }

    private mutating func startString() {
        inString = true
        escape = 0
        highSurrogate = false
        utf8Needed = 0
    }

    @inline(__always)
    private mutating func stringByte(_ c: UInt8, _ member: (JSON) throws -> Void) throws {
        if capturing { try keep(c) }
        if readingName {
            name.append(c)
            if name.count > peakBuffered { peakBuffered = name.count }
            guard name.count <= maxElementBytes else { throw error("member name longer than \(maxElementBytes) bytes") }
        }
        if utf8Needed > 0 {
            guard c >= utf8Low && c <= utf8High else { throw error("invalid UTF-8 sequence") }
            utf8Needed -= 1
            utf8Low = 0x80
            utf8High = 0xBF
            return
        }
        if escape == 1 {
            switch c {
            case UInt8(ascii: "u"):
                escape = 2
                hex = 0
            case UInt8(ascii: "\""), UInt8(ascii: "\\"), UInt8(ascii: "/"), UInt8(ascii: "b"), UInt8(ascii: "f"), UInt8(ascii: "n"),
                UInt8(ascii: "r"), UInt8(ascii: "t"):
                guard !highSurrogate else { throw error("lone high surrogate in \\u escape") }
                escape = 0
            default:
                throw error("invalid escape '\\\(printable(c))'")
            }
            return
        }
        if escape >= 2 {
            guard let d = hexDigitValue(c) else { throw error("invalid hex digit in \\u escape") }
            hex = hex << 4 | d
            escape += 1
            guard escape == 6 else { return }
            escape = 0
            if highSurrogate {
                guard hex >= 0xDC00 && hex <= 0xDFFF else { throw error("high surrogate not followed by a low surrogate") }
                highSurrogate = false
            } else if hex >= 0xD800 && hex <= 0xDBFF {
                highSurrogate = true
            } else if hex >= 0xDC00 && hex <= 0xDFFF {
                throw error("lone low surrogate in \\u escape")
            }
            return
        }
        if c == UInt8(ascii: "\\") {
            escape = 1
            return
        }
        guard !highSurrogate else { throw error("lone high surrogate in \\u escape") }
        switch c {
        case UInt8(ascii: "\""):
            inString = false
            if readingName {
                readingName = false
                try topLevelName()
                expect = .colon
            } else if expect == .key || expect == .keyOrClose {
                expect = .colon
            } else {
                try valueEnded(member)
            }
        case 0..<0x20:
            throw error("unescaped control character in string")
        case 0x80...:
            guard let lead = utf8Lead(c) else { throw error("invalid UTF-8 byte 0x\(String(c, radix: 16))") }
            (utf8Needed, utf8Low, utf8High) = lead
        default:
            break
        }
    }

    /// A top-level attribute's name ended: is it `members`?
    private mutating func topLevelName() throws(JSONError) {
        guard name.count == 9 || name.contains(UInt8(ascii: "\\")) else { return }  // "members" with its quotes, unless escaped
        guard case .string(let s) = try JSONParser.parse(name), equalsIgnoringASCIICase(s, "members") else { return }
        guard !membersNamed else { throw error("duplicate member name \"members\"") }
        membersNamed = true
        membersNext = true
    }
}
