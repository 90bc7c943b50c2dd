/// Comparison operators of RFC 7644 §3.4.2.2 (case-insensitive in input).
public enum CompareOp: String, Sendable, CaseIterable {
    case eq, ne, co, sw, ew, gt, ge, lt, le
}

/// Where a filter reads its values: an attribute (in an extension or not),
/// optionally a sub-attribute. Inside a value path the target is relative to
/// each element of the multi-valued attribute.
public struct FilterTarget: Sendable {
    /// The extension container key for extension attributes.
    public let container: String?
    public let attribute: String?
    public let subAttribute: String?
    /// The definition whose type and `caseExact` govern the comparison.
    public let definition: AttributeDefinition
    public let path: String
}

/// A compiled filter: parsed, resolved against the schemas, type-checked.
public indirect enum FilterNode: Sendable {
    case and(FilterNode, FilterNode)
    case or(FilterNode, FilterNode)
    case not(FilterNode)
    case present(FilterTarget)
    case compare(FilterTarget, CompareOp, JSON)
    /// `attr[filter]`: true when some element of `attr` matches `filter`.
    case valuePath(FilterTarget, FilterNode)
}

/// A lookup the store can answer from an index instead of a scan.
public enum IndexLookup: Sendable, Equatable {
    case id(String)
    case userName(String)
    case externalId(String)
}

public struct Filter: Sendable {
    public let root: FilterNode
    public let text: String

    /// Parses and compiles `text` for resources of `type`. Errors are
    /// `400 invalidFilter` with the position.
    public init(
        _ text: String, registry: SchemaRegistry, type: ResourceType,
        profile: ClientProfile = .lenient
    ) throws(SCIMError) {
        var parser = FilterParser(text: text, registry: registry, type: type, profile: profile)
        root = try parser.parseFilter()
        self.text = text
    }

    init(root: FilterNode, text: String) {
        self.root = root
        self.text = text
    }

    public func matches(_ resource: JSONObject) -> Bool { root.matches(resource) }

    /// An equality on `id`, `userName` or `externalId` that every match must
    /// satisfy; `exact` when the lookup alone decides the filter.
    public var indexLookup: (lookup: IndexLookup, exact: Bool)? { root.indexLookup }
}

extension FilterNode {
    public func matches(_ object: JSONObject) -> Bool {
        switch self {
        case .and(let a, let b): return a.matches(object) && b.matches(object)
        case .or(let a, let b): return a.matches(object) || b.matches(object)
        case .not(let a): return !a.matches(object)
        case .present(let t):
            return filterValues(t, object).contains { v in
                switch v {
                case .null: return false
                case .string(let s): return !s.isEmpty
                case .array(let a): return !a.isEmpty
                case .object(let o): return !o.isEmpty
                default: return true
                }
            }
        case .compare(let t, let op, let literal):
            let vs = filterValues(t, object)
            if literal.isNull {
                let present = vs.contains { !$0.isNull }
                return op == .eq ? !present : present
            }
            if op == .ne { return !vs.contains { compareValue($0, .eq, literal, t.definition) } }
            return vs.contains { compareValue($0, op, literal, t.definition) }
        case .valuePath(let t, let inner):
            guard let container = t.container.flatMap({ object[$0]?.objectValue }) ?? (t.container == nil ? object : nil),
                let attr = t.attribute, let value = container[attr]
            else { return false }
            let elements = value.arrayValue ?? [value]
            return elements.contains { element in element.objectValue.map { inner.matches($0) } ?? false }
        }
    }

    var indexLookup: (lookup: IndexLookup, exact: Bool)? {
        switch self {
        case .compare(let t, .eq, .string(let v)) where t.container == nil && t.subAttribute == nil:
            switch t.attribute.map({ $0.asciiLowercased }) {
            case "id": return (.id(v), true)
            case "username": return (.userName(v), true)
            case "externalid": return (.externalId(v), true)
            default: return nil
            }
        case .and(let a, let b):
            if let l = a.indexLookup { return (l.lookup, false) }
            if let l = b.indexLookup { return (l.lookup, false) }
            return nil
        default:
            return nil
        }
    }
}

/// The values a target reads from an object, flattened across multi-valued
/// attributes; a complex multi-valued attribute without a sub-attribute is
/// read through its `value` sub-attribute (RFC 7644 §3.4.2.2).
func filterValues(_ t: FilterTarget, _ object: JSONObject) -> [JSON] {
    let scope: JSONObject?
    if let c = t.container { scope = object[c]?.objectValue } else { scope = object }
    guard let scope else { return [] }
    guard let attr = t.attribute else { return [] }
    guard let v = scope[attr] else { return [] }
    let sub = t.subAttribute ?? (t.definition.type != .complex && isComplexValue(v) ? "value" : nil)
    func read(_ x: JSON) -> [JSON] {
        if let sub { return x[sub].map { [$0] } ?? [] }
        return [x]
    }
    if let items = v.arrayValue { return items.flatMap(read) }
    return read(v)
}

private func isComplexValue(_ v: JSON) -> Bool {
    if case .object = v { return true }
    if let a = v.arrayValue, case .object = a.first { return true }
    return false
}

/// Compares a stored value with a literal under the attribute's type rules.
func compareValue(_ value: JSON, _ op: CompareOp, _ literal: JSON, _ def: AttributeDefinition) -> Bool {
    switch def.type {
    case .boolean:
        guard case .bool(let a) = value, case .bool(let b) = literal else { return false }
        return op == .eq ? a == b : false
    case .integer, .decimal:
        guard let a = value.numberValue, let b = literal.numberValue else { return false }
        switch op {
        case .eq: return a.numericallyEquals(b)
        case .gt: return a.double > b.double
        case .ge: return a.double >= b.double
        case .lt: return a.double < b.double
        case .le: return a.double <= b.double
        default: return false
        }
    case .dateTime:
        guard let s = value.stringValue, let a = DateTimeValue(s), let l = literal.stringValue, let b = DateTimeValue(l) else {
            return false
        }
        switch op {
        case .eq: return a == b
        case .gt: return a > b
        case .ge: return a >= b
        case .lt: return a < b
        case .le: return a <= b
        default: return false
        }
    case .string, .reference, .binary, .complex:
        guard var a = value.stringValue, var b = literal.stringValue else { return false }
        if !def.caseExact {
            a = a.lowercased()
            b = b.lowercased()
        }
        switch op {
        case .eq: return a == b
        case .co: return b.isEmpty || a.contains(b)
        case .sw: return a.hasPrefix(b)
        case .ew: return a.hasSuffix(b)
        case .gt: return a > b
        case .ge: return a >= b
        case .lt: return a < b
        case .le: return a <= b
        case .ne: return a != b
        }
    }
}

// MARK: parsing

enum FilterToken: Equatable {
    case open, close, openBracket, closeBracket
    case string(String)
    case word(String)
    case end
}

struct FilterParser {
    let text: String
    let bytes: [UInt8]
    let registry: SchemaRegistry
    let type: ResourceType
    let profile: ClientProfile
    var i = 0
    var depth = 0

    init(text: String, registry: SchemaRegistry, type: ResourceType, profile: ClientProfile) {
        self.text = text
        self.bytes = Array(text.utf8)
        self.registry = registry
        self.type = type
        self.profile = profile
    }

    func fail(_ message: String, at position: Int? = nil) -> SCIMError {
        .invalidFilter("\(message) at position \((position ?? i) + 1) of filter '\(text)'")
    }

    mutating func skipSpace() {
        while i < bytes.count && (bytes[i] == 0x20 || bytes[i] == 0x09 || bytes[i] == 0x0A || bytes[i] == 0x0D) { i += 1 }
    }

    /// Reads the next token; `start` is where it began.
    mutating func next() throws(SCIMError) -> (token: FilterToken, start: Int) {
        skipSpace()
        let start = i
        guard i < bytes.count else { return (.end, start) }
        switch bytes[i] {
        case UInt8(ascii: "("): i += 1; return (.open, start)
        case UInt8(ascii: ")"): i += 1; return (.close, start)
        case UInt8(ascii: "["): i += 1; return (.openBracket, start)
        case UInt8(ascii: "]"): i += 1; return (.closeBracket, start)
        case UInt8(ascii: "\""):
            // A JSON string literal, escapes included.
            var k = i + 1
            while k < bytes.count && bytes[k] != UInt8(ascii: "\"") {
                if bytes[k] == UInt8(ascii: "\\") { k += 1 }
                k += 1
            }
            guard k < bytes.count else { throw fail("unterminated string", at: start) }
            let literal = Array(bytes[i...k])
            i = k + 1
            let parsed: Result<JSON, JSONError> = { () -> Result<JSON, JSONError> in
                do throws(JSONError) { return .success(try JSONParser.parse(literal)) } catch { return .failure(error) }
            }()
            switch parsed {
            case .success(.string(let s)): return (.string(s), start)
            case .success: throw fail("invalid string literal", at: start)
            case .failure(let e): throw fail("invalid string literal (\(e.message))", at: start)
            }
        default:
            var k = i
            while k < bytes.count {
                let c = bytes[k]
                if c == 0x20 || c == 0x09 || c == 0x0A || c == 0x0D || c == UInt8(ascii: "(") || c == UInt8(ascii: ")")
                    || c == UInt8(ascii: "[") || c == UInt8(ascii: "]") || c == UInt8(ascii: "\"")
                {
                    break
                }
                k += 1
            }
            let word = String(decoding: bytes[i..<k], as: UTF8.self)
            i = k
            return (.word(word), start)
        }
    }

    mutating func peek() throws(SCIMError) -> (token: FilterToken, start: Int) {
        let save = i
        let t = try next()
        i = save
        return t
    }

    mutating func parseFilter() throws(SCIMError) -> FilterNode {
        guard !bytes.isEmpty else { throw fail("empty filter", at: 0) }
        guard bytes.count <= 4096 else { throw .invalidFilter("filter longer than 4096 characters") }
        let node = try parseOr(scope: nil)
        let (t, at) = try next()
        guard t == .end else { throw fail("unexpected \(describe(t))", at: at) }
        return node
    }

    /// `scope` is the multi-valued attribute inside `attr[...]`, else nil.
    mutating func parseOr(scope: ResolvedAttribute?) throws(SCIMError) -> FilterNode {
        var left = try parseAnd(scope: scope)
        while case (.word(let w), _) = try peek(), equalsIgnoringASCIICase(w, "or") {
            _ = try next()
            left = .or(left, try parseAnd(scope: scope))
        }
        return left
    }

    mutating func parseAnd(scope: ResolvedAttribute?) throws(SCIMError) -> FilterNode {
        var left = try parseUnary(scope: scope)
        while case (.word(let w), _) = try peek(), equalsIgnoringASCIICase(w, "and") {
            _ = try next()
            left = .and(left, try parseUnary(scope: scope))
        }
        return left
    }

    mutating func parseUnary(scope: ResolvedAttribute?) throws(SCIMError) -> FilterNode {
        depth += 1
        defer { depth -= 1 }
        guard depth <= 64 else { throw fail("filter nested too deeply") }
        let (t, at) = try next()
        switch t {
        case .open:
            let inner = try parseOr(scope: scope)
            let (c, cat) = try next()
            guard c == .close else { throw fail("expected ')' but found \(describe(c))", at: cat) }
            return inner
        case .word(let w) where equalsIgnoringASCIICase(w, "not"):
            let (o, oat) = try next()
            guard o == .open else { throw fail("expected '(' after 'not'", at: oat) }
            let inner = try parseOr(scope: scope)
            let (c, cat) = try next()
            guard c == .close else { throw fail("expected ')' but found \(describe(c))", at: cat) }
            return .not(inner)
        case .word(let w):
            return try parseAttributeExpression(w, at: at, scope: scope)
        default:
            throw fail("expected an attribute, '(' or 'not' but found \(describe(t))", at: at)
        }
    }

    mutating func parseAttributeExpression(_ word: String, at: Int, scope: ResolvedAttribute?) throws(SCIMError) -> FilterNode {
        let target = try resolveTarget(word, at: at, scope: scope)
        let (t, tat) = try next()
        if t == .openBracket {
            guard scope == nil else { throw fail("value filters cannot be nested", at: tat) }
            guard let attr = try resolve(word, at: at, scope: nil), attr.subAttribute == nil, attr.attribute.type == .complex else {
                throw fail("'\(word)' is not a complex attribute and cannot take a value filter", at: at)
            }
            let inner = try parseOr(scope: attr)
            let (c, cat) = try next()
            guard c == .closeBracket else { throw fail("expected ']' but found \(describe(c))", at: cat) }
            return .valuePath(target, inner)
        }
        guard case .word(let opWord) = t else { throw fail("expected an operator after '\(word)'", at: tat) }
        if equalsIgnoringASCIICase(opWord, "pr") { return .present(target) }
        guard let op = CompareOp(rawValue: opWord.asciiLowercased) else {
            throw fail("unknown operator '\(opWord)'", at: tat)
        }
        let (v, vat) = try next()
        let literal: JSON
        switch v {
        case .string(let s): literal = .string(s)
        case .word(let w):
            if w == "true" {
                literal = .bool(true)
            } else if w == "false" {
                literal = .bool(false)
            } else if w == "null" {
                literal = .null
            } else if let n = JSONNumber(w) {
                literal = .number(n)
            } else {
                throw fail("invalid comparison value '\(w)' (strings need double quotes)", at: vat)
            }
        default:
            throw fail("expected a comparison value after '\(opWord)'", at: vat)
        }
        return .compare(target, op, try typed(literal, op, target, at: vat))
    }

    /// Checks that the literal and the operator fit the attribute's type.
    func typed(_ literal: JSON, _ op: CompareOp, _ target: FilterTarget, at: Int) throws(SCIMError) -> JSON {
        let def = target.definition
        if literal.isNull {
            guard op == .eq || op == .ne else { throw fail("'\(op.rawValue) null' is not a comparison", at: at) }
            return literal
        }
        switch def.type {
        case .boolean:
            guard op == .eq || op == .ne else { throw fail("'\(op.rawValue)' cannot compare booleans ('\(target.path)')", at: at) }
            if case .bool = literal { return literal }
            if profile.entraCompatible, let s = literal.stringValue {
                if equalsIgnoringASCIICase(s, "true") { return .bool(true) }
                if equalsIgnoringASCIICase(s, "false") { return .bool(false) }
            }
            throw fail("'\(target.path)' is a boolean: compare it with true or false", at: at)
        case .integer, .decimal:
            guard [.eq, .ne, .gt, .ge, .lt, .le].contains(op) else {
                throw fail("'\(op.rawValue)' cannot compare numbers ('\(target.path)')", at: at)
            }
            guard case .number = literal else { throw fail("'\(target.path)' is a number: compare it with a number", at: at) }
            return literal
        case .dateTime:
            guard [.eq, .ne, .gt, .ge, .lt, .le].contains(op) else {
                throw fail("'\(op.rawValue)' cannot compare date-times ('\(target.path)')", at: at)
            }
            guard let s = literal.stringValue, DateTimeValue(s) != nil else {
                throw fail("'\(target.path)' is a dateTime: compare it with a quoted xsd:dateTime", at: at)
            }
            return literal
        case .binary:
            throw fail("binary attribute '\(target.path)' cannot be filtered", at: at)
        case .string, .reference, .complex:
            guard case .string = literal else { throw fail("'\(target.path)' is a string: compare it with a quoted string", at: at) }
            return literal
        }
    }

    func resolve(_ word: String, at: Int, scope: ResolvedAttribute?) throws(SCIMError) -> ResolvedAttribute? {
        if scope != nil { return nil }
        guard let path = registry.parsePath(word, in: type), !path.attribute.isEmpty else {
            throw fail("'\(word)' is not an attribute path", at: at)
        }
        return registry.resolve(path, in: type)
    }

    func resolveTarget(_ word: String, at: Int, scope: ResolvedAttribute?) throws(SCIMError) -> FilterTarget {
        if let scope {
            // Inside attr[...]: a sub-attribute of the scope.
            guard isAttributeName(word), let sub = scope.attribute.subAttribute(word) else {
                throw fail("'\(word)' is not a sub-attribute of '\(scope.canonicalPath)'", at: at)
            }
            return FilterTarget(
                container: nil, attribute: sub.name, subAttribute: nil, definition: sub,
                path: scope.canonicalPath + "." + sub.name)
        }
        guard let resolved = try resolve(word, at: at, scope: nil) else {
            throw fail("unknown attribute '\(word)' for resource type \(type.id)", at: at)
        }
        var leaf = resolved.leaf
        if resolved.subAttribute == nil, resolved.attribute.type == .complex {
            // `emails co "x"` compares the `value` sub-attribute.
            guard let value = resolved.attribute.subAttribute("value") else {
                // Only usable in `pr` or `attr[...]`; give it a string type for `pr`.
                leaf = AttributeDefinition(resolved.attribute.name, .complex)
                return FilterTarget(
                    container: resolved.isExtension ? resolved.schema!.id : nil,
                    attribute: resolved.attribute.name, subAttribute: nil, definition: leaf,
                    path: resolved.canonicalPath)
            }
            leaf = value
        }
        return FilterTarget(
            container: resolved.isExtension ? resolved.schema!.id : nil, attribute: resolved.attribute.name,
            subAttribute: resolved.subAttribute?.name, definition: leaf, path: resolved.canonicalPath)
    }

    func describe(_ t: FilterToken) -> String {
        switch t {
        case .open: return "'('"
        case .close: return "')'"
        case .openBracket: return "'['"
        case .closeBracket: return "']'"
        case .string(let s): return "\"\(s)\""
        case .word(let w): return "'\(w)'"
        case .end: return "the end of the filter"
        }
    }
}

extension Filter {
    /// Compiles the filter inside `attr[...]` of a PATCH path: its attribute
    /// names are sub-attributes of `scope`.
    static func valueFilter(
        _ text: String, scope: ResolvedAttribute, registry: SchemaRegistry, type: ResourceType,
        profile: ClientProfile
    ) throws(SCIMError) -> FilterNode {
        var parser = FilterParser(text: text, registry: registry, type: type, profile: profile)
        guard !text.isEmpty else { throw .invalidPath("empty value filter in '\(scope.canonicalPath)[]'") }
        let node = try parser.parseOr(scope: scope)
        let (t, at) = try parser.next()
        guard t == .end else { throw parser.fail("unexpected \(parser.describe(t))", at: at) }
        return node
    }
}

extension FilterNode {
    /// Whether the filter reads the top-level attribute `name` anywhere
    /// (`members` in `members.value eq "…"`, `members[type eq "User"]`).
    public func reads(_ name: String) -> Bool {
        switch self {
        case .and(let a, let b), .or(let a, let b): return a.reads(name) || b.reads(name)
        case .not(let a): return a.reads(name)
        case .present(let t), .compare(let t, _, _), .valuePath(let t, _):
            return t.container == nil && (t.attribute.map { equalsIgnoringASCIICase($0, name) } ?? false)
        }
    }
}
