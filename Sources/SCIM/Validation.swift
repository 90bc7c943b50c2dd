/// Deviations from RFC 7643/7644 that real identity providers send, accepted
/// on input and normalised away. On by default; see docs/scim.md.
public struct ClientProfile: Sendable, Equatable {
    /// Microsoft Entra ID: op names in any case, "True"/"False" strings for
    /// booleans, path-less replace with dotted keys, members removed with a
    /// value array, `manager` as a plain string, add through a value filter
    /// that matches nothing creates the element.
    public var entraCompatible: Bool
    public init(entraCompatible: Bool = true) { self.entraCompatible = entraCompatible }
    public static let lenient = ClientProfile(entraCompatible: true)
    public static let strict = ClientProfile(entraCompatible: false)
}

/// Validates resource input against a resource type and normalises it:
/// attribute names in the schema's spelling, read-only attributes dropped,
/// nulls and empty arrays removed (unassigned), booleans from the profile's
/// strings. Every error names the attribute path.
public struct ResourceValidator: Sendable {
    public let registry: SchemaRegistry
    public let type: ResourceType
    public var profile: ClientProfile
    /// The type's schemas, resolved once.
    let core: Schema?
    let extensions: [(schema: Schema, required: Bool)]

    public init(registry: SchemaRegistry, type: ResourceType, profile: ClientProfile = .lenient) {
        self.registry = registry
        self.type = type
        self.profile = profile
        core = registry.schema(type.schema)
        extensions = type.extensions.compactMap { e in registry.schema(e.schema).map { ($0, e.required) } }
    }

    func extensionSchema(_ urn: String) -> Schema? {
        extensions.first { equalsIgnoringASCIICase($0.schema.id, urn) }?.schema
    }

    /// A POST body: returns the resource without `id` and `meta`.
    public func validateCreate(_ input: JSON) throws(SCIMError) -> JSONObject {
        try normalize(input, existing: nil)
    }

    /// A PUT body against the stored resource: immutable attributes may not change.
    public func validateReplace(_ input: JSON, existing: JSONObject) throws(SCIMError) -> JSONObject {
        try normalize(input, existing: existing)
    }

    func normalize(_ input: JSON, existing: JSONObject?) throws(SCIMError) -> JSONObject {
        guard let body = input.objectValue else {
            throw .invalidSyntax("the resource must be a JSON object, not \(input.typeName)")
        }
        // schemas: must name the core schema and every extension used.
        guard let listed = body["schemas"] else { throw .invalidValue("attribute 'schemas' is required") }
        guard let list = listed.arrayValue, !list.isEmpty else {
            throw .invalidValue("'schemas' must be a non-empty array of schema URNs")
        }
        var schemas: [String] = []
        for (k, s) in list.enumerated() {
            guard let urn = s.stringValue else { throw .invalidValue("schemas[\(k)] must be a string") }
            let canonical: String
            if equalsIgnoringASCIICase(urn, type.schema) {
                canonical = type.schema
            } else if let ext = extensionSchema(urn) {
                canonical = ext.id
            } else {
                throw .invalidValue("schemas[\(k)]: '\(urn)' is not a schema of resource type \(type.id)")
            }
            if !schemas.contains(canonical) { schemas.append(canonical) }
        }
        guard schemas.contains(type.schema) else {
            throw .invalidValue("'schemas' must include the core schema \(type.schema)")
        }
        guard let core else { throw SCIMError(500, nil, "schema \(type.schema) not loaded") }

        var out = JSONObject([("schemas", .array(schemas.map(JSON.string)))])
        out.reserveCapacity(body.count + 1)
        for (key, value) in body where !equalsIgnoringASCIICase(key, "schemas") {
            if hasURNPrefix(key) {
                guard let ext = extensionSchema(key) else {
                    if equalsIgnoringASCIICase(key, type.schema) {
                        throw .invalidSyntax("core attributes go at the top level, not under '\(key)'")
                    }
                    throw .invalidSyntax("unknown schema extension '\(key)' for resource type \(type.id)")
                }
                guard schemas.contains(ext.id) else {
                    throw .invalidValue("extension \(ext.id) is used but not listed in 'schemas'")
                }
                if value.isNull { continue }
                guard let inner = value.objectValue else {
                    throw .invalidSyntax("'\(ext.id)' must be an object, not \(value.typeName)")
                }
                var extOut = JSONObject()
                for (k2, v2) in inner {
                    guard let def = ext.attribute(k2) else {
                        throw .invalidSyntax("unknown attribute '\(k2)' in \(ext.id)")
                    }
                    var changed = false
                    if let v = try check(v2, def, &changed, path: ValuePath(schema: ext, attribute: def)) {
                        extOut.appendUnique(def.name, v)
                    }
                }
                if !extOut.isEmpty { out.appendUnique(ext.id, .object(extOut)) }
                continue
            }
            let def: AttributeDefinition
            if let d = core.attribute(key) {
                def = d
            } else if let d = commonAttributes.first(where: { equalsIgnoringASCIICase($0.name, key) }) {
                def = d
            } else {
                throw .invalidSyntax("unknown attribute '\(key)' for resource type \(type.id)")
            }
            var changed = false
            if let v = try check(value, def, &changed, path: ValuePath(schema: nil, attribute: def)) { out.appendUnique(def.name, v) }
        }
        if let existing { try checkImmutable(new: &out, old: existing) }
        // `schemas` lists the core schema and the extensions that hold attributes.
        out["schemas"] = .array([.string(type.schema)] + extensions.filter { out[$0.schema.id] != nil }.map { .string($0.schema.id) })
        try checkRequired(out, core: core)
        return out
    }

    /// Checks one attribute value; `nil` means unassigned (null, empty array,
    /// or read-only input that is ignored).
    /// `path` becomes text only when an error needs it. `changed` is set when the
    /// result differs from `value` (so callers need no deep comparison).
    func check(
        _ value: JSON, _ def: AttributeDefinition, _ changed: inout Bool,
        path: ValuePath
    ) throws(SCIMError) -> JSON? {
        if def.mutability == .readOnly { changed = true; return nil }  // RFC 7643 §2.2: ignored on input
        if value.isNull { changed = true; return nil }
        if def.multiValued {
            guard let items = value.arrayValue else {
                throw .invalidValue("'\(path.text)' is multi-valued: expected an array, got \(value.typeName)")
            }
            // Rebuilt only once something changes; otherwise the input array is returned as is.
            var rebuilt: [JSON]?
            var primaries = 0
            // Earlier values by their `value` string (nil: none): an exact
            // duplicate has the same one, so each value is compared with
            // those few only (a 10,000-member group is not 50 million comparisons).
            var earlier: [String?: [JSON]] = [:]
            for (k, item) in items.enumerated() {
                if item.isNull { throw .invalidValue("'\(path.indexed(k).text)' is null") }
                var itemChanged = false
                guard let v = try checkSingle(item, def, &itemChanged, path: path.indexed(k)) else {
                    if rebuilt == nil { rebuilt = Array(items[0..<k]) }
                    continue
                }
                if v["primary"] == .bool(true) { primaries += 1 }
                let bucket = v["value"]?.stringValue
                let duplicate = earlier[bucket]?.contains(v) ?? false  // exact duplicates collapse
                if !duplicate { earlier[bucket, default: []].append(v) }
                if (duplicate || itemChanged) && rebuilt == nil { rebuilt = Array(items[0..<k]) }
                if !duplicate { rebuilt?.append(v) }
            }
            if primaries > 1 {
                throw .invalidValue("'\(path.text)' has \(primaries) values with \"primary\": true; at most one is allowed")
            }
            guard let rebuilt else {
                if items.isEmpty { changed = true; return nil }
                return value
            }
            changed = true
            return rebuilt.isEmpty ? nil : .array(rebuilt)
        }
        if case .array = value, !(profile.entraCompatible && def.type != .complex && value.arrayValue?.count == 1) {
            throw .invalidValue("'\(path.text)' is single-valued: expected \(def.type.rawValue), got an array")
        }
        if let one = value.arrayValue?.first {
            changed = true
            return try checkSingle(one, def, &changed, path: path)
        }
        return try checkSingle(value, def, &changed, path: path)
    }

    func checkSingle(
        _ value: JSON, _ def: AttributeDefinition, _ changed: inout Bool,
        path: ValuePath
    ) throws(SCIMError) -> JSON? {
        func wrong() -> SCIMError {
            .invalidValue("'\(path.text)' must be \(article(def.type)) \(def.type.rawValue), got \(value.typeName)")
        }
        switch def.type {
        case .string:
            guard let s = value.stringValue else { throw wrong() }
            if def.enforceCanonicalValues, !def.canonicalValues.isEmpty {
                guard let c = def.canonicalValues.first(where: { equalsIgnoringASCIICase($0, s) }) else {
                    throw .invalidValue("'\(path.text)' must be one of \(def.canonicalValues.joined(separator: ", ")); got '\(s)'")
                }
                if !sameUTF8(c, s) { changed = true }
                return .string(c)
            }
            return value
        case .boolean:
            if case .bool = value { return value }
            if profile.entraCompatible, let s = value.stringValue {
                changed = true
                if equalsIgnoringASCIICase(s, "true") { return .bool(true) }
                if equalsIgnoringASCIICase(s, "false") { return .bool(false) }
            }
            throw wrong()
        case .decimal:
            guard case .number = value else { throw wrong() }
            return value
        case .integer:
            guard let n = value.numberValue, n.isInteger else { throw wrong() }
            return value
        case .dateTime:
            guard let s = value.stringValue else { throw wrong() }
            guard DateTimeValue(s) != nil else {
                throw .invalidValue("'\(path.text)' must be an xsd:dateTime such as 2025-01-23T04:56:22Z; got '\(s)'")
            }
            return value
        case .binary:
            guard let s = value.stringValue else { throw wrong() }
            guard isBase64(s) else { throw .invalidValue("'\(path.text)' must be base64 (RFC 4648)") }
            return value
        case .reference:
            guard let s = value.stringValue else { throw wrong() }
            guard !s.isEmpty, !s.utf8.contains(where: { $0 <= 0x20 || $0 == 0x7F }) else {
                throw .invalidValue("'\(path.text)' must be a URI reference without spaces")
            }
            return value
        case .complex:
            if profile.entraCompatible, let s = value.stringValue, def.subAttribute("value") != nil {
                // Entra sends `"manager": "<id>"`: the plain string is the value.
                changed = true
                return .object(["value": .string(s)])
            }
            guard let o = value.objectValue else { throw wrong() }
            // Rebuilt only once something changes (a name's spelling, a dropped
            // or coerced value); otherwise the input object is returned as is.
            var rebuilt: JSONObject?
            for (k, member) in o.members.enumerated() {
                guard let sub = def.subAttribute(member.key) else {
                    throw .invalidSyntax("unknown sub-attribute '\(member.key)' of '\(path.text)'")
                }
                var memberChanged = false
                let checked = try check(member.value, sub, &memberChanged, path: path.child(sub))
                if rebuilt == nil, memberChanged || checked == nil || !sameUTF8(member.key, sub.name) {
                    rebuilt = JSONObject(Array(o.members[0..<k]))
                }
                if let checked { rebuilt?.appendUnique(sub.name, checked) }
            }
            let result = rebuilt ?? o
            for sub in def.requiredSubAttributes where result[sub.name] == nil {
                throw .invalidValue("'\(path.child(sub).text)' is required")
            }
            if result.isEmpty { changed = true; return nil }
            if rebuilt == nil { return value }
            changed = true
            return .object(result)
        }
    }

    private func checkRequired(_ resource: JSONObject, core: Schema) throws(SCIMError) {
        for def in core.requiredInput where resource[def.name] == nil {
            throw .invalidValue("attribute '\(def.name)' is required")
        }
        for (schema, required) in extensions {
            let container = resource[schema.id]?.objectValue
            if required && container == nil { throw .invalidValue("extension \(schema.id) is required") }
            guard let container else { continue }
            for def in schema.requiredInput where container[def.name] == nil {
                throw .invalidValue("attribute '\(schema.id):\(def.name)' is required")
            }
        }
    }

    /// Immutable values already set may not change; omitted ones are kept
    /// (RFC 7643 §2.2: immutable may be set once).
    private func checkImmutable(new: inout JSONObject, old: JSONObject) throws(SCIMError) {
        func visit(_ defs: [AttributeDefinition], _ new: inout JSONObject, _ old: JSONObject, _ prefix: String) throws(SCIMError) {
            for def in defs {
                guard let before = old[def.name] else { continue }
                if def.mutability == .immutable {
                    if let after = new[def.name] {
                        guard after == before else {
                            throw .mutability("'\(prefix)\(def.name)' is immutable and already set")
                        }
                    } else {
                        new[def.name] = before
                    }
                } else if def.type == .complex, !def.multiValued, var inner = new[def.name]?.objectValue,
                    let oldInner = before.objectValue
                {
                    try visit(def.subAttributes, &inner, oldInner, "\(prefix)\(def.name).")
                    new[def.name] = .object(inner)
                }
            }
        }
        if let core { try visit(core.attributes + commonAttributes, &new, old, "") }
        for (schema, _) in extensions {
            if let oldExt = old[schema.id]?.objectValue {
                var ext = new[schema.id]?.objectValue ?? JSONObject()
                try visit(schema.attributes, &ext, oldExt, "\(schema.id):")
                if !ext.isEmpty { new[schema.id] = .object(ext) }
            }
        }
    }
}

private func article(_ t: AttributeType) -> String {
    switch t {
    case .integer: return "an"
    default: return "a"
    }
}

/// Where a value sits (`[ext:]attr[i].sub[j]`), as references: error
/// messages make it text; the success path never builds a string and,
/// being unowned, never retains the definitions it names.
struct ValuePath {
    unowned(unsafe) let schema: Schema?
    unowned(unsafe) let attribute: AttributeDefinition
    var index = -1
    unowned(unsafe) var sub: AttributeDefinition?
    var subIndex = -1

    init(schema: Schema?, attribute: AttributeDefinition) {
        self.schema = schema
        self.attribute = attribute
    }

    func indexed(_ k: Int) -> ValuePath {
        var p = self
        if sub == nil { p.index = k } else { p.subIndex = k }
        return p
    }

    func child(_ s: AttributeDefinition) -> ValuePath {
        var p = self
        p.sub = s
        return p
    }

    var text: String {
        var t = schema.map { "\($0.id):" } ?? ""
        t += attribute.name
        if index >= 0 { t += "[\(index)]" }
        if let sub {
            t += "." + sub.name
            if subIndex >= 0 { t += "[\(subIndex)]" }
        }
        return t
    }
}
