/// A PATCH target: `attr`, `attr.sub`, `attr[filter]`, `attr[filter].sub`,
/// each optionally URN-qualified (RFC 7644 §3.5.2).
public struct PatchPath: Sendable {
    public let text: String
    public let attribute: ResolvedAttribute
    /// The value filter on a multi-valued attribute.
    public let filter: FilterNode?
    /// The sub-attribute after the filter (`emails[type eq "work"].value`),
    /// or of a singular complex attribute (`name.givenName`).
    public let subAttribute: AttributeDefinition?

    public init(_ text: String, registry: SchemaRegistry, type: ResourceType, profile: ClientProfile) throws(SCIMError) {
        self.text = text
        var attrPart = Substring(text)
        var filterText: Substring?
        var after: Substring = ""
        if let open = text.firstIndex(of: "[") {
            guard let close = text.lastIndex(of: "]"), close > open else {
                throw .invalidPath("path '\(text)': '[' without a closing ']'")
            }
            attrPart = text[..<open]
            filterText = text[text.index(after: open)..<close]
            after = text[text.index(after: close)...]
        }
        guard let path = registry.parsePath(String(attrPart), in: type), !path.attribute.isEmpty,
            let resolved = registry.resolve(path, in: type)
        else {
            throw .invalidPath("path '\(text)' does not name an attribute of resource type \(type.id)")
        }
        var sub = resolved.subAttribute
        var filter: FilterNode?
        if let filterText {
            guard resolved.subAttribute == nil, resolved.attribute.multiValued, resolved.attribute.type == .complex else {
                throw .invalidPath("path '\(text)': a value filter needs a multi-valued complex attribute")
            }
            filter = try Filter.valueFilter(String(filterText), scope: resolved, registry: registry, type: type, profile: profile)
            if !after.isEmpty {
                guard after.first == ".", let s = resolved.attribute.subAttribute(String(after.dropFirst())) else {
                    throw .invalidPath("path '\(text)': '\(after)' is not a sub-attribute of '\(resolved.attribute.name)'")
                }
                sub = s
            }
        }
        attribute = ResolvedAttribute(
            schema: resolved.schema, isExtension: resolved.isExtension,
            attribute: resolved.attribute, subAttribute: nil)
        self.filter = filter
        self.subAttribute = sub
    }

    var leaf: AttributeDefinition { subAttribute ?? attribute.attribute }
}

/// One PATCH operation as received.
public struct PatchOperation: Sendable {
    public enum Op: String, Sendable { case add, remove, replace }
    public let op: Op
    public let path: PatchPath?
    public let value: JSON?
    /// `remove` with a bare extension URN as path: drops the whole extension.
    public var removesExtension: String? = nil

    /// An operation made by a store that splits a request (the agent applies
    /// a group's `members` to its index and the rest to the stored group).
    public init(op: Op, path: PatchPath?, value: JSON?, removesExtension: String? = nil) {
        self.op = op
        self.path = path
        self.value = value
        self.removesExtension = removesExtension
    }
}

/// A PATCH request (`PatchOp` message), parsed and checked against the schemas.
public struct PatchRequest: Sendable {
    public let operations: [PatchOperation]
    let registry: SchemaRegistry
    let type: ResourceType
    let profile: ClientProfile

    public init(
        _ body: JSON, registry: SchemaRegistry, type: ResourceType, profile: ClientProfile = .lenient,
        maxOperations: Int = 1000
    ) throws(SCIMError) {
        self.registry = registry
        self.type = type
        self.profile = profile
        guard let o = body.objectValue else { throw .invalidSyntax("the PATCH body must be a JSON object") }
        guard let schemas = o["schemas"]?.arrayValue,
            schemas.contains(where: { $0.stringValue.map { equalsIgnoringASCIICase($0, SchemaURN.patchOp) } ?? false })
        else {
            throw .invalidSyntax("'schemas' must contain \(SchemaURN.patchOp)")
        }
        for key in o.keys where !["schemas", "operations"].contains(key.asciiLowercased) {
            throw .invalidSyntax("unknown member '\(key)' in a PATCH request")
        }
        guard let list = o["Operations"]?.arrayValue, !list.isEmpty else {
            throw .invalidValue("'Operations' must be a non-empty array")
        }
        guard list.count <= maxOperations else { throw SCIMError(400, .tooMany, "more than \(maxOperations) operations") }
        var ops: [PatchOperation] = []
        for (k, item) in list.enumerated() {
            do throws(SCIMError) {
                ops.append(try PatchRequest.operation(item, registry: registry, type: type, profile: profile))
            } catch {
                throw error.prefixed("Operations[\(k)]")
            }
        }
        operations = ops
    }

    static func operation(
        _ item: JSON, registry: SchemaRegistry, type: ResourceType,
        profile: ClientProfile
    ) throws(SCIMError) -> PatchOperation {
        guard let o = item.objectValue else { throw .invalidSyntax("an operation must be an object") }
        for key in o.keys where !["op", "path", "value"].contains(key.asciiLowercased) {
            throw .invalidSyntax("unknown member '\(key)'")
        }
        guard let opText = o["op"]?.stringValue else { throw .invalidSyntax("'op' is required") }
        let normalized = profile.entraCompatible ? opText.asciiLowercased : opText
        guard let op = PatchOperation.Op(rawValue: normalized) else {
            throw .invalidSyntax("'op' must be add, remove or replace; got '\(opText)'")
        }
        var path: PatchPath?
        let value = o["value"]
        if let p = o["path"] {
            guard let text = p.stringValue else { throw .invalidPath("'path' must be a string") }
            // A bare extension URN names the whole extension object (RFC 7644 §3.10).
            if let ext = registry.extensionSchema(text, of: type) {
                switch op {
                case .remove:
                    return PatchOperation(op: .remove, path: nil, value: nil, removesExtension: ext.id)
                case .add, .replace:
                    guard let v = value, v.objectValue != nil else {
                        throw .invalidValue("'\(op.rawValue)' of \(ext.id) needs an object of its attributes as 'value'")
                    }
                    return PatchOperation(op: op, path: nil, value: .object(JSONObject([(ext.id, v)])))
                }
            }
            path = try PatchPath(text, registry: registry, type: type, profile: profile)
        }
        switch op {
        case .remove:
            guard path != nil else { throw .noTarget("'remove' needs a 'path'") }
            if value != nil && !(profile.entraCompatible && path!.filter == nil && path!.attribute.attribute.multiValued) {
                throw .invalidSyntax("'remove' takes no 'value'")
            }
        case .add, .replace:
            guard let value, !value.isNull || path != nil else { throw .invalidValue("'\(op.rawValue)' needs a 'value'") }
            if path == nil, value.objectValue == nil {
                throw .invalidValue("'\(op.rawValue)' without 'path' needs an object of attributes as 'value'")
            }
        }
        if let path {
            if path.attribute.attribute.mutability == .readOnly || path.leaf.mutability == .readOnly {
                throw .mutability("'\(path.text)' is read-only")
            }
        }
        return PatchOperation(op: op, path: path, value: value)
    }

    /// Applies every operation to `resource`, all or nothing, then validates
    /// the result as a replacement of `resource` (types, required and
    /// immutable attributes). Errors name the operation index.
    public func apply(to resource: JSONObject) throws(SCIMError) -> JSONObject {
        var working = resource
        for (k, op) in operations.enumerated() {
            do throws(SCIMError) {
                try apply(op, to: &working)
            } catch {
                throw error.prefixed("Operations[\(k)]")
            }
        }
        let validator = ResourceValidator(registry: registry, type: type, profile: profile)
        do throws(SCIMError) {
            return try validator.validateReplace(.object(working), existing: resource)
        } catch {
            throw error.prefixed("after applying the operations")
        }
    }

    /// Applies one operation to `resource` without validating the result:
    /// for a store that applies part of a resource (a group's members) to a
    /// subset it holds elsewhere and validates the changed values itself.
    public func applyUnvalidated(_ op: PatchOperation, to resource: inout JSONObject) throws(SCIMError) {
        try apply(op, to: &resource)
    }

    /// The client profile the request was parsed under.
    public var clientProfile: ClientProfile { profile }

    func apply(_ op: PatchOperation, to resource: inout JSONObject) throws(SCIMError) {
        if let urn = op.removesExtension {
            resource[urn] = nil
            return
        }
        guard let path = op.path else {
            // No path: the value is an object of attributes (and extension objects).
            let value = op.value!.objectValue!
            for (key, v) in value {
                if let ext = registry.extensionSchema(key, of: type) {
                    guard let inner = v.objectValue else {
                        throw .invalidValue("'\(key)' must be an object of \(ext.id) attributes")
                    }
                    for (k2, v2) in inner where !equalsIgnoringASCIICase(k2, "schemas") {
                        let p = try PatchPath("\(ext.id):\(k2)", registry: registry, type: type, profile: profile)
                        try write(op.op, p, v2, into: &resource)
                    }
                    continue
                }
                if equalsIgnoringASCIICase(key, "schemas") { continue }
                // Entra: `{"name.givenName": "X"}`; RFC: plain attribute names.
                if key.contains("."), !profile.entraCompatible {
                    throw .invalidPath("'\(key)': a path-less value holds attribute names, not paths")
                }
                let p = try PatchPath(key, registry: registry, type: type, profile: profile)
                if p.attribute.attribute.mutability == .readOnly { continue }  // e.g. id, meta: ignored
                try write(op.op, p, v, into: &resource)
            }
            return
        }
        switch op.op {
        case .add, .replace: try write(op.op, path, op.value!, into: &resource)
        case .remove: try remove(path, op.value, from: &resource)
        }
    }

    // MARK: containers

    /// Reads and writes the object that holds `path`'s attribute: the
    /// resource itself, or its extension object.
    func withContainer(
        _ path: PatchPath, _ resource: inout JSONObject,
        _ body: (inout JSONObject) throws(SCIMError) -> Void
    ) throws(SCIMError) {
        guard path.attribute.isExtension, let urn = path.attribute.schema?.id else {
            try body(&resource)
            return
        }
        var ext = resource[urn]?.objectValue ?? JSONObject()
        try body(&ext)
        if ext.isEmpty {
            resource[urn] = nil
        } else {
            resource[urn] = .object(ext)
            if var schemas = resource["schemas"]?.arrayValue, !schemas.contains(.string(urn)) {
                schemas.append(.string(urn))
                resource["schemas"] = .array(schemas)
            }
        }
    }

    func write(_ op: PatchOperation.Op, _ path: PatchPath, _ value: JSON, into resource: inout JSONObject) throws(SCIMError) {
        let def = path.attribute.attribute
        let name = def.name
        try withContainer(path, &resource) { (c: inout JSONObject) throws(SCIMError) in
            if let filter = path.filter {
                var items = c[name]?.arrayValue ?? []
                var matched = false
                for k in items.indices {
                    guard let element = items[k].objectValue, filter.matches(element) else { continue }
                    matched = true
                    items[k] = try merged(element: element, path: path, value: value, op: op)
                }
                if !matched {
                    // Entra adds through a filter that matches nothing (`emails[type eq "work"].value`):
                    // create the element the filter describes.
                    guard profile.entraCompatible, let seed = equalities(filter) else {
                        throw .noTarget("'\(path.text)' matches no value")
                    }
                    items.append(try merged(element: seed, path: path, value: value, op: op))
                }
                c[name] = .array(items)
                clearOtherPrimaries(&c, name, keepingMatching: items.filter { $0["primary"] == .bool(true) }.last)
                return
            }
            if let sub = path.subAttribute {
                // `name.givenName` on a singular complex attribute.
                var inner = c[name]?.objectValue ?? JSONObject()
                inner[sub.name] = value.isNull ? nil : value
                c[name] = inner.isEmpty ? nil : .object(inner)
                return
            }
            if value.isNull {
                c[name] = nil
                return
            }
            if def.multiValued {
                let incoming = value.arrayValue ?? [value]
                let primaries = incoming.filter { $0["primary"] == .bool(true) }.count
                guard primaries <= 1 else {
                    throw .invalidValue("'\(path.text)': \(primaries) values with \"primary\": true; at most one is allowed")
                }
                if op == .replace {
                    c[name] = .array(incoming)
                } else {
                    // Elements are identified by `value`: adding a known one updates it.
                    // Indexes of the elements by their `value` string (nil: none), so
                    // adding k values to n costs O(k + n), not O(k × n).
                    var items = c[name]?.arrayValue ?? []
                    var positions: [String?: [Int]] = [:]
                    for (k, item) in items.enumerated() { positions[item["value"]?.stringValue, default: []].append(k) }
                    for v in incoming {
                        let bucket = v["value"]?.stringValue
                        if positions[bucket]?.contains(where: { items[$0] == v }) ?? false { continue }
                        if let key = v["value"], let k = positions[bucket]?.first(where: { items[$0]["value"] == key }),
                            var existing = items[k].objectValue, let fields = v.objectValue
                        {
                            for (f, x) in fields { existing[f] = x.isNull ? nil : x }
                            items[k] = .object(existing)
                        } else {
                            positions[bucket, default: []].append(items.count)
                            items.append(v)
                        }
                    }
                    c[name] = .array(items)
                }
                if let newPrimary = incoming.last(where: { $0["primary"] == .bool(true) }) {
                    clearOtherPrimaries(&c, name, keepingMatching: newPrimary)
                }
                return
            }
            if def.type == .complex, let incoming = value.objectValue, var existing = c[name]?.objectValue {
                // RFC 7644 §3.5.2.1/§3.5.2.3: sub-attributes not given are left unchanged.
                for (k, v) in incoming { existing[k] = v.isNull ? nil : v }
                c[name] = existing.isEmpty ? nil : .object(existing)
                return
            }
            c[name] = value
        }
    }

    /// One matched element after an add/replace through a value filter.
    func merged(element: JSONObject, path: PatchPath, value: JSON, op: PatchOperation.Op) throws(SCIMError) -> JSON {
        var e = element
        if let sub = path.subAttribute {
            e[sub.name] = value.isNull ? nil : value
            return .object(e)
        }
        guard let incoming = value.objectValue else {
            throw .invalidValue("'\(path.text)' selects complex values: 'value' must be an object")
        }
        if op == .replace && !profile.entraCompatible { return .object(incoming) }
        for (k, v) in incoming { e[k] = v.isNull ? nil : v }
        return .object(e)
    }

    func remove(_ path: PatchPath, _ value: JSON?, from resource: inout JSONObject) throws(SCIMError) {
        let def = path.attribute.attribute
        let name = def.name
        try withContainer(path, &resource) { (c: inout JSONObject) throws(SCIMError) in
            if let filter = path.filter {
                guard var items = c[name]?.arrayValue else {
                    if profile.entraCompatible { return }
                    throw .noTarget("'\(path.text)' matches no value")
                }
                var matched = false
                if let sub = path.subAttribute {
                    for k in items.indices {
                        guard var e = items[k].objectValue, filter.matches(e) else { continue }
                        matched = true
                        e[sub.name] = nil
                        items[k] = .object(e)
                    }
                } else {
                    let before = items.count
                    items.removeAll { $0.objectValue.map(filter.matches) ?? false }
                    matched = items.count != before
                }
                if !matched && !profile.entraCompatible { throw .noTarget("'\(path.text)' matches no value") }
                c[name] = items.isEmpty ? nil : .array(items)
                return
            }
            if let sub = path.subAttribute {
                guard var inner = c[name]?.objectValue else { return }
                inner[sub.name] = nil
                c[name] = inner.isEmpty ? nil : .object(inner)
                return
            }
            if def.multiValued, let value {
                // Entra: `{"op":"Remove","path":"members","value":[{"value":"id"}]}`.
                let targets = value.arrayValue ?? [value]
                // Targets with a string `value` are looked up by it; the others compared one by one.
                let byValue = Set(targets.compactMap { $0["value"]?.stringValue })
                let others = targets.filter { $0["value"]?.stringValue == nil }
                var items = c[name]?.arrayValue ?? []
                items.removeAll { item in
                    if let iv = item["value"]?.stringValue, byValue.contains(iv) { return true }
                    return others.contains { t in
                        if let tv = t["value"], let iv = item["value"] { return tv == iv }
                        return t == item
                    }
                }
                c[name] = items.isEmpty ? nil : .array(items)
                return
            }
            c[name] = nil
        }
    }

    /// Only one value of a multi-valued attribute may be primary (RFC 7643 §2.4):
    /// the one just written keeps it.
    func clearOtherPrimaries(_ c: inout JSONObject, _ name: String, keepingMatching keep: JSON?) {
        guard let keep, var items = c[name]?.arrayValue else { return }
        var kept = false
        for k in items.indices.reversed() {
            guard var e = items[k].objectValue, e["primary"] == .bool(true) else { continue }
            if !kept && items[k] == keep { kept = true; continue }
            e["primary"] = .bool(false)
            items[k] = .object(e)
        }
        c[name] = .array(items)
    }
}

/// The `sub eq "v"` conditions of a filter made only of `and`-ed
/// equalities, as the element they describe; `nil` otherwise.
func equalities(_ node: FilterNode) -> JSONObject? {
    switch node {
    case .compare(let t, .eq, let v) where t.attribute != nil: return [t.attribute!: v]
    case .and(let a, let b):
        guard var x = equalities(a), let y = equalities(b) else { return nil }
        for (k, v) in y { x[k] = v }
        return x
    default: return nil
    }
}
