import SCIM

/// The same JSON, the members of objects in any order (a streamed group
/// places `members` after its other attributes, as `withMembers` does, but
/// the comparison does not depend on it).
public func sameJSON(_ a: JSON?, _ b: JSON?) -> Bool {
    switch (a, b) {
    case (.object(let x)?, .object(let y)?):
        x.count == y.count && x.members.allSatisfy { m in sameJSON(m.value, y[m.key]) }
    case (.array(let x)?, .array(let y)?):
        x.count == y.count && zip(x, y).allSatisfy { sameJSON($0, $1) }
    default:
        a == b
    }
}

/// `json` without its `meta` (the version and time of a change).
public func withoutMeta(_ json: JSON?) -> JSON? {
    guard var o = json?.objectValue else { return json }
    o["meta"] = nil
    return .object(o)
}
