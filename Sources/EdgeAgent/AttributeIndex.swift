import EdgeStore
import SCIM

/// The index of the attributes IdPs filter on by equality (`active`,
/// `userType`, `emails.value` of users): database `attributes`, keys
/// `<type>/<attribute>/<value>\0<id>` (empty values), so the matches of one
/// equality are a key range in id order, paged like an unfiltered list; and
/// `<type>/<attribute>/<value>` (no `\0`) holding how many ids the value has
/// (big-endian UInt64), for `totalResults`. Values are normalised as the
/// filter compares them: booleans as `true` / `false`, strings lowercased
/// unless `caseExact`. A value too long for an LMDB key, or holding a NUL,
/// is not indexed, and an equality on such a value is not answered from
/// the index (it scans): the index never answers for what it lacks.
enum AttributeIndex {
    /// Format of the `attributes` database (`meta` `attributeIndex`): a store
    /// without it, or with another, has the index rebuilt once at open.
    static let format: [UInt8] = Array("1".utf8)
    static let attributes: [(type: String, attribute: String, sub: String?)] = [
        ("User", "active", nil), ("User", "userType", nil), ("User", "emails", "value"),
    ]
    /// LMDB keys are at most 511 bytes; the rest of the key is the type,
    /// the attribute and a 36-byte id.
    static let maxValueBytes = 256

    /// The normalised value bytes of `value` for an attribute, or nil when
    /// it is not indexed.
    static func normalised(_ value: JSON, caseExact: Bool) -> [UInt8]? {
        let bytes: [UInt8]
        switch value {
        case .bool(let b): bytes = Array((b ? "true" : "false").utf8)
        case .string(let s): bytes = Array((caseExact ? s : s.lowercased()).utf8)
        default: return nil
        }
        guard bytes.count <= maxValueBytes, !bytes.contains(0) else { return nil }
        return bytes
    }

    /// `<type>/<attribute>/<value>`: the count key, and with `\0` the prefix of the ids.
    static func valueKey(_ type: String, _ attribute: String, _ value: [UInt8]) -> [UInt8] {
        Array("\(type)/\(attribute)/".utf8) + value
    }

    /// Whether each of `attributes` compares case-exactly, in their order:
    /// resolved once per store, not on every write.
    static func caseExactness(_ registry: SchemaRegistry) -> [Bool] {
        attributes.map { t, attribute, sub in
            registry.resourceType(t).map { caseExactness(registry, $0, attribute, sub) } ?? false
        }
    }

    /// The value keys a resource has in the index (`caseExact`: from `caseExactness(_:)`), each once.
    /// (An array: a resource has a handful, and hashing keys costs more than comparing them.)
    static func valueKeys(_ type: ResourceType, _ resource: JSONObject?, caseExact exact: [Bool]) -> [[UInt8]] {
        guard let resource else { return [] }
        var keys: [[UInt8]] = []
        for (i, (t, attribute, sub)) in attributes.enumerated() where t == type.id {
            guard let v = resource[attribute] else { continue }
            let caseExact = exact[i]
            let values: [JSON] = sub.map { s in (v.arrayValue ?? [v]).compactMap { $0[s] } } ?? [v]
            for value in values {
                if let n = normalised(value, caseExact: caseExact) {
                    let k = valueKey(type.id, attribute, n)
                    if !keys.contains(k) { keys.append(k) }
                }
            }
        }
        return keys
    }

    static func caseExactness(_ registry: SchemaRegistry, _ type: ResourceType, _ attribute: String, _ sub: String?) -> Bool {
        guard let path = registry.parsePath(sub.map { "\(attribute).\($0)" } ?? attribute, in: type),
            let resolved = registry.resolve(path, in: type)
        else { return false }
        return resolved.leaf.caseExact
    }

    /// The value key an equality filter names, when the index alone decides
    /// it (`active eq true`, `userType eq "Employee"`, `emails.value eq "a@b"`,
    /// `emails eq "a@b"`); nil otherwise (it scans).
    static func lookup(_ filter: Filter, _ type: ResourceType) -> [UInt8]? {
        guard case .compare(let t, .eq, let literal) = filter.root, t.container == nil, let name = t.attribute else { return nil }
        for (ty, attribute, sub) in attributes
        where ty == type.id && equalsIgnoringASCIICase(name, attribute)
            && (t.subAttribute.map { s in sub.map { equalsIgnoringASCIICase(s, $0) } ?? false } ?? true)
        {
            // The literal must compare the way the stored values are keyed:
            // a boolean for `active`, a string for the others.
            switch (literal, t.definition.type == .boolean) {
            case (.bool, true), (.string, false): break
            default: return nil
            }
            guard let n = normalised(literal, caseExact: t.definition.caseExact) else { return nil }
            return valueKey(type.id, attribute, n)
        }
        return nil
    }
}

extension AttributeIndex {
    /// Builds the index from the stored resources: once, when a store made
    /// before it (or with another format) is opened. This parses every
    /// resource of the indexed types, in the one write transaction of the
    /// open; from then on every write keeps the index.
    static func rebuild(
        _ txn: borrowing WriteTransaction, resources: Database, attributes: Database, meta: Database, registry: SchemaRegistry
    ) throws {
        try txn.clear(attributes)
        let exact = caseExactness(registry)
        for type in registry.resourceTypes where Self.attributes.contains(where: { $0.type == type.id }) {
            let prefix = Array("\(type.id)/".utf8)
            var failure: Error?
            try txn.scan(resources, from: prefix, to: Array("\(type.id)0".utf8)) { key, value in
                do {
                    let r = try AgentStore.parseResource(value, key: key)
                    let id = Array(key.dropFirst(prefix.count))
                    // Written as the scan goes (another database than the
                    // one the cursor reads), counts included: nothing is held
                    // in memory, whatever the number of distinct values.
                    for k in valueKeys(type, r, caseExact: exact) {
                        try txn.put(attributes, k + [0] + id, [])
                        let n = try txn.get(attributes, k).flatMap(UInt64.init(bigEndianBytes:)) ?? 0
                        try txn.put(attributes, k, (n + 1).bigEndianBytes)
                    }
                } catch {
                    failure = error
                    return false
                }
                return true
            }
            if let failure { throw failure }
        }
        try txn.put(meta, Array("attributeIndex".utf8), format)
    }
}

extension AgentStore {
    /// Keeps the attribute index in step with a write of resource `id`:
    /// entries for the values it lost go, for those it gained come, and the
    /// per-value counts follow, in the write's transaction.
    func updateAttributeIndex(
        _ type: ResourceType, id: String, old: JSONObject?, new: JSONObject?, _ txn: borrowing WriteTransaction
    ) throws {
        let before = AttributeIndex.valueKeys(type, old, caseExact: attributeCaseExact)
        let after = AttributeIndex.valueKeys(type, new, caseExact: attributeCaseExact)
        guard before != after else { return }
        for key in before where !after.contains(key) {
            try txn.delete(attributes, key + [0] + Array(id.utf8))
            try adjustValueCount(key, by: -1, txn)
        }
        for key in after where !before.contains(key) {
            try txn.put(attributes, key + [0] + Array(id.utf8), [])
            try adjustValueCount(key, by: 1, txn)
        }
    }

    func adjustValueCount(_ key: [UInt8], by delta: Int64, _ txn: borrowing WriteTransaction) throws {
        let current = Int64(try txn.get(attributes, key).flatMap(UInt64.init(bigEndianBytes:)) ?? 0)
        let next = max(0, current + delta)
        if next == 0 { try txn.delete(attributes, key) } else { try txn.put(attributes, key, UInt64(next).bigEndianBytes) }
    }

    /// How many resources hold the value of `key`.
    func valueCount(_ txn: borrowing some StoreReading & ~Copyable, _ key: [UInt8]) throws -> Int {
        Int(try txn.get(attributes, key).flatMap(UInt64.init(bigEndianBytes:)) ?? 0)
    }
}
