import SCIM

/// The attributes the broker's `byValue` database indexes, each under a
/// letter of its own (`<Type>\0<letter>\0<value>\0<broker id>`): those IdPs
/// filter on by equality, and those `sortBy` walks (docs/scim.md, "The
/// broker's read API").
enum IndexedAttribute: UInt8, CaseIterable {
    // In the order an `and` prefers them: the likely smallest ranges first.
    case userName = 0x75  // u
    case externalId = 0x65  // e
    case email = 0x6D  // m: one entry per address
    case displayName = 0x64  // d
    case userType = 0x74  // t
    case active = 0x61  // a

    /// Where the resource holds it: an attribute, or a sub-attribute of
    /// each element of a multi-valued one.
    var attribute: (name: String, sub: String?) {
        switch self {
        case .userName: return ("userName", nil)
        case .externalId: return ("externalId", nil)
        case .active: return ("active", nil)
        case .userType: return ("userType", nil)
        case .email: return ("emails", "value")
        case .displayName: return ("displayName", nil)
        }
    }

    /// The filter paths (lowercased) that compare it: `emails eq "…"`
    /// compares the `value` sub-attribute (RFC 7644 §3.4.2.2).
    var paths: [String] {
        let (name, sub) = attribute
        return sub.map { [name.asciiLowercased + "." + $0, name.asciiLowercased] } ?? [name.asciiLowercased]
    }

    /// `externalId` is common to users and groups; `displayName` is indexed
    /// for groups (their name), the others for users.
    func applies(to type: String) -> Bool {
        switch self {
        case .externalId: return true
        case .displayName: return type == "Group"
        default: return type == "User"
        }
    }

    /// RFC 7643: only `externalId` compares case-exactly.
    var caseExact: Bool { self == .externalId }

    /// Few distinct values, each possibly held by the whole directory: a
    /// count per value is kept, so `totalResults` never walks the range.
    /// The others' ranges are a few keys each: they are counted by a walk.
    var countedPerValue: Bool { self == .active || self == .userType }

    /// `sortBy` on it walks its range (single-valued and required).
    var sortable: Bool { self == .userName || self == .displayName }

    /// Which of two attributes of an `and` gives fewer candidates, likely (lower: fewer).
    var selectivity: Int { IndexedAttribute.allCases.firstIndex(of: self)! }

    /// The values `resource` holds, as stored.
    func values(_ resource: JSONObject) -> [JSON] {
        let (name, sub) = attribute
        guard let v = resource[name] else { return [] }
        guard let sub else { return [v] }
        return (v.arrayValue ?? [v]).compactMap { $0[sub] }
    }

    /// The key bytes of a value, normalised as the filter compares it (a
    /// boolean as `true` / `false`, a string lowercased unless case-exact);
    /// nil when the index does not hold it: a value of another JSON type,
    /// over `maxIndexedValue` bytes or holding a NUL (a lookup of it scans).
    func normalized(_ value: JSON) -> [UInt8]? {
        var text: String
        switch (self, value) {
        case (.active, .bool(let b)): text = b ? "true" : "false"
        case (.active, _): return nil
        case (_, .string(let s)): text = s
        default: return nil
        }
        if !caseExact { text = text.lowercased() }
        let bytes = Array(text.utf8)
        return bytes.count > BrokerStore.maxIndexedValue || bytes.contains(0) ? nil : bytes
    }
}

/// What the indexes answer of a filter: a broker id (`brokerIds`), or the
/// `byValue` range of one value of an attribute.
enum IndexPlan: Equatable {
    case id(String)
    case value(IndexedAttribute, [UInt8])
    /// Groups holding one member (`members.value eq`, `members[value eq …]`,
    /// as Entra and Okta ask): from the member → groups index.
    case member(String)

    var selectivity: Int {
        if case .value(let a, _) = self { return 1 + a.selectivity }
        return 0
    }

    /// The plan of `node` for resources of `type`, `exact` when the index
    /// alone decides the filter (else each candidate is checked): an
    /// equality on `id` or an indexed attribute (also inside a value path,
    /// `emails[value eq "…"]`), or an `and` with one, whose most selective
    /// side names the candidates.
    static func of(_ node: FilterNode, _ type: String) -> (plan: IndexPlan, exact: Bool)? {
        switch node {
        case .compare(let t, .eq, let literal) where t.container == nil:
            let path = t.path.asciiLowercased
            if path == "id", let id = literal.stringValue { return (.id(id), true) }
            if type == "Group", path == "members.value" || path == "members", let id = literal.stringValue { return (.member(id), true) }
            guard let a = IndexedAttribute.allCases.first(where: { $0.applies(to: type) && $0.paths.contains(path) }),
                let value = a.normalized(literal)
            else { return nil }
            return (.value(a, value), true)
        case .valuePath(let t, let inner) where t.container == nil:
            return of(inner, type)
        case .and(let a, let b):
            let sides = [of(a, type), of(b, type)].compactMap { $0?.plan }
            return sides.min { $0.selectivity < $1.selectivity }.map { ($0, false) }
        default:
            return nil
        }
    }
}
