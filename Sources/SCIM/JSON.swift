/// A JSON value (RFC 8259). Objects keep their members in arrival order and
/// with the sender's spelling; SCIM lookups on them are case-insensitive.
public enum JSON: Sendable, Equatable {
    case null
    case bool(Bool)
    case number(JSONNumber)
    case string(String)
    case array([JSON])
    case object(JSONObject)

    public var stringValue: String? { if case .string(let s) = self { return s } else { return nil } }
    public var boolValue: Bool? { if case .bool(let b) = self { return b } else { return nil } }
    public var arrayValue: [JSON]? { if case .array(let a) = self { return a } else { return nil } }
    public var objectValue: JSONObject? { if case .object(let o) = self { return o } else { return nil } }
    public var numberValue: JSONNumber? { if case .number(let n) = self { return n } else { return nil } }
    public var isNull: Bool { self == .null }

    /// Case-insensitive member lookup on an object (`nil` for other values).
    public subscript(key: String) -> JSON? { objectValue?[key] }

    public static func int(_ v: Int) -> JSON { .number(JSONNumber(integer: Int64(v))) }

    /// A short name of the value's JSON type, for error messages.
    public var typeName: String {
        switch self {
        case .null: return "null"
        case .bool: return "boolean"
        case .number(let n): return n.isInteger ? "integer" : "number"
        case .string: return "string"
        case .array: return "array"
        case .object: return "object"
        }
    }
}

/// A JSON number kept exactly as written: integers that fit stay `Int64`,
/// every other number keeps its text, so serialising gives back what came in.
public struct JSONNumber: Sendable, Equatable, CustomStringConvertible {
    /// The number's text (RFC 8259 grammar).
    public let text: String
    public let integer: Int64?

    public init(integer: Int64) {
        self.integer = integer
        self.text = String(integer)
    }

    /// `text` must already be valid JSON number syntax.
    init(validatedText text: String, integral: Bool) {
        self.text = text
        self.integer = integral ? Int64(text) : nil
    }

    /// Parses a JSON number; `nil` when `text` is not one.
    public init?(_ text: String) {
        let bytes = Array(text.utf8)
        guard let end = scanNumber(bytes, 0), end == bytes.count else { return nil }
        let integral = !bytes.contains { $0 == UInt8(ascii: ".") || $0 == UInt8(ascii: "e") || $0 == UInt8(ascii: "E") }
        self.init(validatedText: text, integral: integral)
    }

    public var isInteger: Bool { integer != nil }
    public var double: Double { integer.map(Double.init) ?? Double(text) ?? .nan }
    public var description: String { text }

    /// Numeric equality (1.0 == 1), for comparisons; `==` compares text.
    public func numericallyEquals(_ other: JSONNumber) -> Bool {
        if let a = integer, let b = other.integer { return a == b }
        return double == other.double
    }
}

/// Returns the index after a JSON number starting at `i`, or `nil`.
func scanNumber(_ b: [UInt8], _ start: Int) -> Int? {
    var i = start
    func digit(_ j: Int) -> Bool { j < b.count && b[j] >= 48 && b[j] <= 57 }
    if i < b.count && b[i] == UInt8(ascii: "-") { i += 1 }
    guard digit(i) else { return nil }
    if b[i] == 48 { i += 1 } else { while digit(i) { i += 1 } }
    if i < b.count && b[i] == UInt8(ascii: ".") {
        i += 1
        guard digit(i) else { return nil }
        while digit(i) { i += 1 }
    }
    if i < b.count && (b[i] == UInt8(ascii: "e") || b[i] == UInt8(ascii: "E")) {
        i += 1
        if i < b.count && (b[i] == UInt8(ascii: "+") || b[i] == UInt8(ascii: "-")) { i += 1 }
        guard digit(i) else { return nil }
        while digit(i) { i += 1 }
    }
    return i
}

/// An object's members in arrival order. Lookup by name is ASCII
/// case-insensitive (RFC 7643 §2.1: attribute names are case-insensitive).
public struct JSONObject: Sendable, Equatable, Sequence {
    public private(set) var members: [(key: String, value: JSON)]

    public init(_ members: [(key: String, value: JSON)] = []) { self.members = members }

    public var count: Int { members.count }
    public var isEmpty: Bool { members.isEmpty }
    public var keys: [String] { members.map(\.key) }

    public func makeIterator() -> IndexingIterator<[(key: String, value: JSON)]> { members.makeIterator() }

    /// The member spelled exactly `key`, else the first spelled like it in another ASCII case.
    /// One pass over the members, comparing the bytes of those of the same length only.
    public func index(of key: String) -> Int? {
        let length = key.utf8.count
        var folded: Int?
        for k in members.indices where members[k].key.utf8.count == length {
            switch caseComparison(members[k].key, key) {
            case .exact: return k
            case .folded: if folded == nil { folded = k }
            case .different: break
            }
        }
        return folded
    }

    mutating func reserveCapacity(_ n: Int) { members.reserveCapacity(n) }

    /// Appends without looking for an existing member: for builders whose
    /// names are already unique.
    mutating func appendUnique(_ key: String, _ value: JSON) {
        members.append((key, value))
    }

    /// The member named `key` in any case; setting `nil` removes it, setting a
    /// value replaces the member in place (keeping its position) or appends.
    public subscript(key: String) -> JSON? {
        get { index(of: key).map { members[$0].value } }
        set {
            if let i = index(of: key) {
                if let newValue { members[i] = (key, newValue) } else { members.remove(at: i) }
            } else if let newValue {
                members.append((key, newValue))
            }
        }
    }

    /// The member's name as the sender spelled it.
    public func spelling(of key: String) -> String? { index(of: key).map { members[$0].key } }

    @discardableResult
    public mutating func removeValue(forKey key: String) -> JSON? {
        guard let i = index(of: key) else { return nil }
        return members.remove(at: i).value
    }

    public static func == (a: JSONObject, b: JSONObject) -> Bool {
        a.members.count == b.members.count && zip(a.members, b.members).allSatisfy { $0.key == $1.key && $0.value == $1.value }
    }

    /// Same members regardless of order (names compared case-insensitively).
    public func sameMembers(as other: JSONObject) -> Bool {
        guard count == other.count else { return false }
        return members.allSatisfy { m in other[m.key] == m.value }
    }
}

extension JSONObject: ExpressibleByDictionaryLiteral {
    public init(dictionaryLiteral elements: (String, JSON)...) {
        self.init(elements.map { (key: $0.0, value: $0.1) })
    }
}

// Not ExpressibleByNilLiteral on purpose: in a `JSON?` context `nil` must
// mean "no value", never silently become `.null`.
extension JSON: ExpressibleByStringLiteral, ExpressibleByBooleanLiteral, ExpressibleByIntegerLiteral,
    ExpressibleByArrayLiteral, ExpressibleByDictionaryLiteral
{
    public init(stringLiteral value: String) { self = .string(value) }
    public init(booleanLiteral value: Bool) { self = .bool(value) }
    public init(integerLiteral value: Int64) { self = .number(JSONNumber(integer: value)) }
    public init(arrayLiteral elements: JSON...) { self = .array(elements) }
    public init(dictionaryLiteral elements: (String, JSON)...) {
        self = .object(JSONObject(elements.map { (key: $0.0, value: $0.1) }))
    }
}

/// ASCII case-insensitive equality: attribute names and URNs are ASCII.
/// Compares UTF-8 bytes directly (never Unicode-normalising `String ==`).
@inline(__always)
public func equalsIgnoringASCIICase(_ a: String, _ b: String) -> Bool {
    compareUTF8(a, b, ignoringASCIICase: true)
}

/// Byte-for-byte equality of two strings' UTF-8.
@inline(__always)
func sameUTF8(_ a: String, _ b: String) -> Bool {
    compareUTF8(a, b, ignoringASCIICase: false)
}

@inline(__always)
func compareUTF8(_ a: String, _ b: String, ignoringASCIICase: Bool) -> Bool {
    let x = a.utf8, y = b.utf8
    guard x.count == y.count else { return false }  // O(1) for native strings
    if a == b { return true }  // equal ASCII strings compare as bytes
    if !ignoringASCIICase { return false }
    // Iterate: most names are small (inline) strings, which have no contiguous buffer to borrow.
    var i = x.makeIterator(), j = y.makeIterator()
    while let c = i.next(), let d = j.next() {
        if c != d && (!ignoringASCIICase || lowerASCII(c) != lowerASCII(d)) { return false }
    }
    return true
}

enum CaseComparison { case exact, folded, different }

/// How two strings of the same UTF-8 length compare: byte for byte, only
/// in ASCII case, or not at all.
@inline(__always)
func caseComparison(_ a: String, _ b: String) -> CaseComparison {
    if a == b { return .exact }  // equal ASCII strings compare as bytes
    var i = a.utf8.makeIterator(), j = b.utf8.makeIterator()
    while let c = i.next(), let d = j.next() {
        if c != d && lowerASCII(c) != lowerASCII(d) { return .different }
    }
    return .folded
}

/// Whether `s` starts with `urn:` in any case, without allocating.
@inline(__always)
func hasURNPrefix(_ s: String) -> Bool {
    var it = s.utf8.makeIterator()
    for expected in "urn:".utf8 {
        guard let c = it.next(), lowerASCII(c) == expected else { return false }
    }
    return it.next() != nil
}

@inline(__always)
func lowerASCII(_ c: UInt8) -> UInt8 { c >= 65 && c <= 90 ? c + 32 : c }

extension String {
    /// ASCII lower-casing (Unicode-independent; attribute names and URNs).
    public var asciiLowercased: String {
        String(decoding: utf8.map(lowerASCII), as: UTF8.self)
    }
}
