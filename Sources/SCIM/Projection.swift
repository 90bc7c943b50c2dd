/// `attributes` / `excludedAttributes` (RFC 7644 §3.4.2.5, §3.9) combined
/// with each attribute's `returned` characteristic.
public struct Projection: Sendable {
    public let attributes: [ResolvedAttribute]
    public let excluded: [ResolvedAttribute]
    /// Extension URNs requested or excluded as a whole.
    let wholeExtensions: [String]
    let excludedExtensions: [String]
    let registry: SchemaRegistry
    let type: ResourceType

    public init(
        attributes: [String] = [], excluded: [String] = [], registry: SchemaRegistry,
        type: ResourceType
    ) throws(SCIMError) {
        self.registry = registry
        self.type = type
        func resolve(_ names: [String], _ param: String) throws(SCIMError) -> ([ResolvedAttribute], [String]) {
            var attrs: [ResolvedAttribute] = [], exts: [String] = []
            for n in names {
                guard let p = registry.parsePath(n, in: type) else {
                    throw .invalidValue("\(param): '\(n)' is not an attribute of resource type \(type.id)")
                }
                if p.attribute.isEmpty { exts.append(p.schema!); continue }
                guard let r = registry.resolve(p, in: type) else {
                    throw .invalidValue("\(param): '\(n)' is not an attribute of resource type \(type.id)")
                }
                attrs.append(r)
            }
            return (attrs, exts)
        }
        (self.attributes, self.wholeExtensions) = try resolve(attributes, "attributes")
        (self.excluded, self.excludedExtensions) = try resolve(excluded, "excludedAttributes")
    }

    public static func none(registry: SchemaRegistry, type: ResourceType) -> Projection {
        try! Projection(registry: registry, type: type)
    }

    /// The names of every attribute and sub-attribute of `type` (its schemas
    /// and the common attributes) that a request without `attributes` or
    /// `excludedAttributes` never gets back (`returned: never` or `request`).
    /// A validated resource naming none of them is returned as it is.
    public static func namesHiddenByDefault(registry: SchemaRegistry, type: ResourceType) -> [String] {
        func hidden(_ defs: [AttributeDefinition]) -> [String] {
            defs.flatMap { def in
                (def.returned == .never || def.returned == .request ? [def.name] : []) + hidden(def.subAttributes)
            }
        }
        return hidden(commonAttributes + registry.schemas(of: type).flatMap(\.attributes))
    }

    var selective: Bool { !attributes.isEmpty || !wholeExtensions.isEmpty }

    /// The resource as returned to a client.
    public func apply(to resource: JSONObject) -> JSONObject {
        var out = JSONObject()
        for (key, value) in resource {
            if equalsIgnoringASCIICase(key, "schemas") { out[key] = value; continue }
            if let ext = registry.extensionSchema(key, of: type) {
                guard let inner = value.objectValue else { continue }
                let whole = wholeExtensions.contains { equalsIgnoringASCIICase($0, ext.id) }
                if excludedExtensions.contains(where: { equalsIgnoringASCIICase($0, ext.id) }) { continue }
                var kept = JSONObject()
                for (k2, v2) in inner {
                    guard let def = ext.attribute(k2) else { continue }
                    if let v = project(v2, def, schema: ext.id, isExtension: true, forceWhole: whole) { kept[k2] = v }
                }
                if !kept.isEmpty { out[key] = .object(kept) }
                continue
            }
            guard
                let def = registry.schema(type.schema)?.attribute(key)
                    ?? commonAttributes.first(where: { equalsIgnoringASCIICase($0.name, key) })
            else { continue }
            if let v = project(value, def, schema: nil, isExtension: false, forceWhole: false) { out[key] = v }
        }
        return out
    }

    private func matches(_ r: ResolvedAttribute, _ def: AttributeDefinition, _ isExtension: Bool, _ schema: String?) -> Bool {
        equalsIgnoringASCIICase(r.attribute.name, def.name) && r.isExtension == isExtension
            && (!isExtension || equalsIgnoringASCIICase(r.schema?.id ?? "", schema ?? ""))
    }

    private func project(
        _ value: JSON, _ def: AttributeDefinition, schema: String?, isExtension: Bool,
        forceWhole: Bool
    ) -> JSON? {
        switch def.returned {
        case .never: return nil
        case .always: return value
        default: break
        }
        let requested = attributes.filter { matches($0, def, isExtension, schema) }
        if selective && !forceWhole {
            guard !requested.isEmpty else { return nil }
            if requested.contains(where: { $0.subAttribute == nil }) { return stripNever(value, def) }
            let subs = requested.compactMap(\.subAttribute?.name)
            return keepSubAttributes(value, def, subs)
        }
        if def.returned == .request && !forceWhole { return nil }
        let excludedHere = excluded.filter { matches($0, def, isExtension, schema) }
        if excludedHere.contains(where: { $0.subAttribute == nil }) { return nil }
        let dropSubs = excludedHere.compactMap(\.subAttribute?.name)
        return dropSubAttributes(stripNever(value, def), def, dropSubs)
    }

    private func stripNever(_ value: JSON, _ def: AttributeDefinition) -> JSON {
        let never = def.subAttributes.filter { $0.returned == .never || $0.returned == .request }.map(\.name)
        return never.isEmpty ? value : dropSubAttributes(value, def, never) ?? value
    }

    private func keepSubAttributes(_ value: JSON, _ def: AttributeDefinition, _ subs: [String]) -> JSON? {
        let always = def.subAttributes.filter { $0.returned == .always }.map(\.name)
        func keep(_ v: JSON) -> JSON? {
            guard let o = v.objectValue else { return v }
            let kept = JSONObject(o.members.filter { m in (subs + always).contains { equalsIgnoringASCIICase($0, m.key) } })
            return kept.isEmpty ? nil : .object(kept)
        }
        if let items = value.arrayValue {
            let kept = items.compactMap(keep)
            return kept.isEmpty ? nil : .array(kept)
        }
        return keep(value)
    }

    private func dropSubAttributes(_ value: JSON, _ def: AttributeDefinition, _ subs: [String]) -> JSON? {
        guard !subs.isEmpty else { return value }
        func drop(_ v: JSON) -> JSON? {
            guard let o = v.objectValue else { return v }
            let kept = JSONObject(
                o.members.filter { m in
                    !subs.contains { equalsIgnoringASCIICase($0, m.key) }
                        || def.subAttribute(m.key)?.returned == .always
                })
            return kept.isEmpty ? nil : .object(kept)
        }
        if let items = value.arrayValue {
            let kept = items.compactMap(drop)
            return kept.isEmpty ? nil : .array(kept)
        }
        return drop(value)
    }
}
