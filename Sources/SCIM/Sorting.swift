/// The value a resource sorts by: for a multi-valued attribute, the primary
/// value, else the first (RFC 7644 §3.4.2.3).
func sortKey(_ resource: JSONObject, _ path: ResolvedAttribute) -> JSON? {
    let scope = path.isExtension ? resource[path.schema!.id]?.objectValue : resource
    guard let v = scope?[path.attribute.name] else { return nil }
    let sub = path.subAttribute?.name ?? (path.attribute.type == .complex ? "value" : nil)
    if let items = v.arrayValue {
        let chosen = items.first { $0["primary"] == .bool(true) } ?? items.first
        return sub.flatMap { chosen?[$0] } ?? (sub == nil ? chosen : nil)
    }
    return sub.map { v[$0] } ?? v
}

func sortEqual(_ a: JSON, _ b: JSON, _ def: AttributeDefinition) -> Bool {
    !sortLess(a, b, def) && !sortLess(b, a, def)
}

func sortLess(_ a: JSON, _ b: JSON, _ def: AttributeDefinition) -> Bool {
    switch (a, b) {
    case (.number(let x), .number(let y)): return x.double < y.double
    case (.bool(let x), .bool(let y)): return !x && y
    case (.string(let x), .string(let y)):
        if def.type == .dateTime, let dx = DateTimeValue(x), let dy = DateTimeValue(y) { return dx < dy }
        return def.caseExact ? x < y : x.lowercased() < y.lowercased()
    default: return false
    }
}
