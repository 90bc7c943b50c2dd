/// An attribute mapping: a broker target's (applied to the body sent to the
/// app) and an agent's inbound policy (applied to what enters the boundary).
/// Paths are `attr` or `attr.sub` (a complex attribute's sub-attribute).
public struct AttributeMapping: Sendable, Equatable {
    /// from → to (the value moves).
    public var rename: [(from: String, to: String)] = []
    public var drop: [String] = []
    /// path → value set on every resource.
    public var constant: [(path: String, value: JSON)] = []
    public init() {}

    public static func == (a: AttributeMapping, b: AttributeMapping) -> Bool {
        a.rename.elementsEqual(b.rename, by: { $0 == $1 }) && a.drop == b.drop
            && a.constant.elementsEqual(b.constant, by: { $0.path == $1.path && $0.value == $1.value })
    }

    /// A configured constant as JSON: a plain `true`/`false` or number is
    /// one; anything else (or quoted) is a string.
    public static func constantValue(_ text: String, plain: Bool) -> JSON {
        if plain && (text == "true" || text == "false") { return .bool(text == "true") }
        if plain, let n = JSONNumber(text) { return .number(n) }
        return .string(text)
    }

    public var isEmpty: Bool { rename.isEmpty && drop.isEmpty && constant.isEmpty }

    public func apply(to body: inout JSONObject) {
        for (from, to) in rename {
            if let v = Self.remove(from, in: &body) { Self.set(to, v, in: &body) }
        }
        for path in drop { _ = Self.remove(path, in: &body) }
        for (path, value) in constant { Self.set(path, value, in: &body) }
    }

    static func split(_ path: String) -> (String, String?) {
        guard let dot = path.firstIndex(of: "."), !path.hasPrefix("urn:") else { return (path, nil) }
        return (String(path[..<dot]), String(path[path.index(after: dot)...]))
    }

    static func remove(_ path: String, in body: inout JSONObject) -> JSON? {
        let (attr, sub) = split(path)
        guard let sub else { return body.removeValue(forKey: attr) }
        guard var inner = body[attr]?.objectValue, let v = inner.removeValue(forKey: sub) else { return nil }
        body[attr] = inner.isEmpty ? nil : .object(inner)
        return v
    }

    static func set(_ path: String, _ value: JSON, in body: inout JSONObject) {
        let (attr, sub) = split(path)
        guard let sub else { body[attr] = value; return }
        var inner = body[attr]?.objectValue ?? JSONObject()
        inner[sub] = value
        body[attr] = .object(inner)
    }
}
