/// An LDAP search filter (RFC 4515), parsed so that the agent can tell which
/// of a source's filters an entry matched (one search carries users and
/// groups). Evaluation is case-insensitive, as the attributes a mapping
/// uses (`objectClass`, names) compare; `>=`/`<=` compare text.
public indirect enum LDAPFilter: Sendable, Equatable {
    case and([LDAPFilter])
    case or([LDAPFilter])
    case not(LDAPFilter)
    case present(String)
    case equal(String, String)
    /// `initial*any*…*final`: the pieces, nil at an open end.
    case substring(String, initial: String?, any: [String], final: String?)
    case greaterOrEqual(String, String)
    case lessOrEqual(String, String)

    public init(_ text: String) throws(BERError) {
        var p = FilterParser(Array(text.utf8))
        self = try p.filter()
        guard p.atEnd else { throw BERError("filter '\(text)': unexpected text at \(p.index)") }
    }

    public func matches(_ entry: LDAPEntry) -> Bool {
        switch self {
        case .and(let fs): return fs.allSatisfy { $0.matches(entry) }
        case .or(let fs): return fs.contains { $0.matches(entry) }
        case .not(let f): return !f.matches(entry)
        case .present(let a): return !entry.values(a).isEmpty
        case .equal(let a, let v): return entry.strings(a).contains { $0.lowercased() == v.lowercased() }
        case .greaterOrEqual(let a, let v): return entry.strings(a).contains { $0.lowercased() >= v.lowercased() }
        case .lessOrEqual(let a, let v): return entry.strings(a).contains { $0.lowercased() <= v.lowercased() }
        case .substring(let a, let initial, let any, let final):
            return entry.strings(a).contains { value in
                var rest = Substring(value.lowercased())
                if let i = initial?.lowercased() {
                    guard rest.hasPrefix(i) else { return false }
                    rest = rest.dropFirst(i.count)
                }
                for piece in any.map({ $0.lowercased() }) {
                    guard let r = rest.range(of: piece) else { return false }
                    rest = rest[r.upperBound...]
                }
                if let f = final?.lowercased() { return rest.hasSuffix(f) }
                return true
            }
        }
    }
}

extension Substring {
    fileprivate func range(of piece: String) -> Range<Substring.Index>? {
        guard !piece.isEmpty else { return startIndex..<startIndex }
        var i = startIndex
        while i < endIndex {
            if self[i...].hasPrefix(piece) { return i..<index(i, offsetBy: piece.count) }
            i = index(after: i)
        }
        return nil
    }
}

private struct FilterParser {
    let bytes: [UInt8]
    var index = 0
    init(_ bytes: [UInt8]) { self.bytes = bytes }
    var atEnd: Bool { index >= bytes.count }

    mutating func expect(_ c: UInt8) throws(BERError) {
        guard index < bytes.count, bytes[index] == c else {
            throw BERError("filter: expected '\(Character(UnicodeScalar(c)))' at \(index)")
        }
        index += 1
    }

    mutating func filter() throws(BERError) -> LDAPFilter {
        try expect(UInt8(ascii: "("))
        guard index < bytes.count else { throw BERError("filter: truncated") }
        let result: LDAPFilter
        switch bytes[index] {
        case UInt8(ascii: "&"):
            index += 1
            result = .and(try list())
        case UInt8(ascii: "|"):
            index += 1
            result = .or(try list())
        case UInt8(ascii: "!"):
            index += 1
            result = .not(try filter())
        default:
            result = try item()
        }
        try expect(UInt8(ascii: ")"))
        return result
    }

    mutating func list() throws(BERError) -> [LDAPFilter] {
        var out: [LDAPFilter] = []
        while index < bytes.count, bytes[index] == UInt8(ascii: "(") { out.append(try filter()) }
        return out
    }

    mutating func item() throws(BERError) -> LDAPFilter {
        let start = index
        while index < bytes.count, !"=<>~()".utf8.contains(bytes[index]) { index += 1 }
        let attribute = String(decoding: bytes[start..<index], as: UTF8.self)
        guard !attribute.isEmpty, index < bytes.count else { throw BERError("filter: no attribute at \(start)") }
        var op = bytes[index]
        if op != UInt8(ascii: "=") {
            index += 1
            guard index < bytes.count, bytes[index] == UInt8(ascii: "=") else { throw BERError("filter: bad operator at \(index)") }
        } else {
            op = 0
        }
        index += 1
        // The value up to ')', split at unescaped '*'.
        var pieces: [[UInt8]] = [[]]
        while index < bytes.count, bytes[index] != UInt8(ascii: ")") {
            let c = bytes[index]
            if c == UInt8(ascii: "\\") {
                guard index + 2 < bytes.count, let hi = hexValue(bytes[index + 1]), let lo = hexValue(bytes[index + 2]) else {
                    throw BERError("filter: bad escape at \(index)")
                }
                pieces[pieces.count - 1].append(hi << 4 | lo)
                index += 3
            } else if c == UInt8(ascii: "*") {
                pieces.append([])
                index += 1
            } else {
                pieces[pieces.count - 1].append(c)
                index += 1
            }
        }
        let texts = pieces.map { String(decoding: $0, as: UTF8.self) }
        switch op {
        case UInt8(ascii: ">"): return .greaterOrEqual(attribute, texts.joined(separator: "*"))
        case UInt8(ascii: "<"): return .lessOrEqual(attribute, texts.joined(separator: "*"))
        default:
            if texts.count == 1 { return .equal(attribute, texts[0]) }
            if texts.count == 2 && texts[0].isEmpty && texts[1].isEmpty { return .present(attribute) }
            return .substring(
                attribute, initial: texts.first!.isEmpty ? nil : texts.first!,
                any: Array(texts.dropFirst().dropLast()).filter { !$0.isEmpty },
                final: texts.last!.isEmpty ? nil : texts.last!)
        }
    }

    func hexValue(_ c: UInt8) -> UInt8? {
        switch c {
        case UInt8(ascii: "0")...UInt8(ascii: "9"): return c - UInt8(ascii: "0")
        case UInt8(ascii: "a")...UInt8(ascii: "f"): return c - UInt8(ascii: "a") + 10
        case UInt8(ascii: "A")...UInt8(ascii: "F"): return c - UInt8(ascii: "A") + 10
        default: return nil
        }
    }
}
