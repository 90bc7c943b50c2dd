import EdgeStore
import SCIM

/// The agent's LMDB file: resources, their indexes, group memberships and the
/// outbox, changed together in one transaction per write.
///
/// | database | key | value |
/// |---|---|---|
/// | `resources` | `User/<id>`, `Group/<id>` | the stored resource (JSON, with `id` and `meta`) |
/// | `userNames` | lower-cased `userName` | user id |
/// | `externalIds` | `<type>/<externalId>` | ids (duplicates sorted) |
/// | `memberships` | member id | ids of the groups holding it (duplicates sorted) |
/// | `outbox` | big-endian sequence | relay event (JSON) |
/// | `propagated` | `User/<id>`, `Group/<id>` | SHA-256 of what last left the boundary |
/// | `meta` | `seq`, `version`, `schema`, `acked`, `policy` | counters, layout version, relay position, policy fingerprint |
///
/// Threading: `Sendable`; reads run anywhere, writes run as `WriteOperation`s
/// of a `GroupCommitWriter` (on its worker thread).
public final class AgentStore: Sendable {
    public let environment: Environment
    public let registry: SchemaRegistry
    let resources: Database
    let userNames: Database
    let externalIds: Database
    let memberships: Database
    public let outbox: Database
    let meta: Database
    let propagated: Database
    /// What may leave the boundary (invariant 4), applied before the outbox.
    public let policy: LocalPolicy

    public static let layoutVersion: UInt64 = 1

    public init(path: String, registry: SchemaRegistry, policy: LocalPolicy? = nil,
                options: (inout EnvironmentOptions) -> Void = { _ in }) throws {
        var o = EnvironmentOptions(path: path)
        options(&o)
        environment = try Environment(o)
        self.registry = registry
        self.policy = policy ?? .propagateAll(registry)
        propagated = try environment.openDatabase("propagated")
        resources = try environment.openDatabase("resources")
        userNames = try environment.openDatabase("userNames")
        externalIds = try environment.openDatabase("externalIds", flags: .duplicateSort)
        memberships = try environment.openDatabase("memberships", flags: .duplicateSort)
        outbox = try environment.openDatabase("outbox")
        meta = try environment.openDatabase("meta")
        let meta = self.meta
        try environment.write { txn in
            if let v = try txn.get(meta, Array("schema".utf8)).flatMap(UInt64.init(bigEndianBytes:)) {
                guard v == AgentStore.layoutVersion else { throw StoreLayoutError(found: v) }
            } else {
                try txn.put(meta, Array("schema".utf8), AgentStore.layoutVersion.bigEndianBytes)
            }
        }
    }

    struct StoreLayoutError: Error, CustomStringConvertible {
        let found: UInt64
        var description: String { "data directory has layout version \(found); this agent reads \(AgentStore.layoutVersion)" }
    }

    static func key(_ type: ResourceType, _ id: String) -> [UInt8] { Array("\(type.id)/\(id)".utf8) }

    // MARK: reads

    /// The stored resource, or nil.
    public func get(_ type: ResourceType, _ id: String) throws -> JSONObject? {
        try environment.read { txn in try load(txn, type, id) }
    }

    func load(_ txn: borrowing some StoreReading & ~Copyable, _ type: ResourceType, _ id: String) throws -> JSONObject? {
        guard let bytes = try txn.get(resources, AgentStore.key(type, id)) else { return nil }
        return try JSONParser.parse(bytes).objectValue
    }

    /// The ids an index equality names (`userName` case-insensitively).
    func lookup(_ txn: borrowing some StoreReading & ~Copyable, _ type: ResourceType, _ lookup: IndexLookup) throws -> [String] {
        switch lookup {
        case .id(let id):
            return try txn.get(resources, AgentStore.key(type, id)) == nil ? [] : [id]
        case .userName(let name):
            guard type.id == "User" else { return [] }
            return try txn.get(userNames, Array(name.lowercased().utf8)).map { [String(decoding: $0, as: UTF8.self)] } ?? []
        case .externalId(let value):
            var ids: [String] = []
            let key = Array("\(type.id)/\(value)".utf8)
            try txn.withCursor(externalIds) { cursor in
                var entry = try cursor.seek(exactly: key)
                while let e = entry {
                    ids.append(String(decoding: e.value, as: UTF8.self))
                    entry = try cursor.nextDuplicate()
                }
            }
            return ids
        }
    }

    /// Resources of `type` that match `filter`, using an index when the filter
    /// allows, else scanning at most `scanBudget` resources (then `tooMany`).
    public func query(_ type: ResourceType, filter: Filter?, scanBudget: Int) throws -> [JSONObject] {
        try environment.read { txn in
            if let hint = filter?.indexLookup {
                return try lookup(txn, type, hint.lookup).compactMap { id in
                    guard let r = try load(txn, type, id) else { return nil }
                    return hint.exact || filter!.matches(r) ? r : nil
                }
            }
            var out: [JSONObject] = []
            var scanned = 0
            var failure: Error?
            try txn.scan(resources, from: Array("\(type.id)/".utf8), to: Array("\(type.id)0".utf8)) { _, value in
                scanned += 1
                if scanned > scanBudget {
                    failure = SCIMError(400, .tooMany, "the filter needs a scan of more than \(scanBudget) resources; filter on id, userName or externalId")
                    return false
                }
                do {
                    guard let r = try JSONParser.parse(value).objectValue else { return true }
                    if filter?.matches(r) ?? true { out.append(r) }
                } catch {
                    failure = error
                    return false
                }
                return true
            }
            if let failure { throw failure }
            return out
        }
    }

    /// Groups holding `memberID` (directly).
    func groupIDs(_ txn: borrowing some StoreReading & ~Copyable, of memberID: String) throws -> [String] {
        var ids: [String] = []
        try txn.withCursor(memberships) { cursor in
            var entry = try cursor.seek(exactly: Array(memberID.utf8))
            while let e = entry {
                ids.append(String(decoding: e.value, as: UTF8.self))
                entry = try cursor.nextDuplicate()
            }
        }
        return ids
    }

    /// A user as returned: with its read-only `groups` from the membership index.
    public func withGroups(_ user: JSONObject, baseURL: String) throws -> JSONObject {
        guard let id = user["id"]?.stringValue else { return user }
        return try environment.read { txn in
            var out = user
            let groups: [JSON] = try groupIDs(txn, of: id).compactMap { gid in
                guard let group = try load(txn, registry.resourceType("Group")!, gid) else { return nil }
                var g: JSONObject = ["value": .string(gid), "$ref": .string("\(baseURL)/Groups/\(gid)"), "type": "direct"]
                if let name = group["displayName"] { g["display"] = name }
                return .object(g)
            }
            out["groups"] = groups.isEmpty ? nil : .array(groups)
            return out
        }
    }

    /// Outbox entries after `sequence`, at most `limit`.
    public func outboxEntries(after sequence: UInt64, limit: Int) throws -> [(UInt64, JSON)] {
        try environment.read { txn in
            var out: [(UInt64, JSON)] = []
            try txn.scan(outbox, from: (sequence &+ 1).bigEndianBytes) { k, v in
                out.append((UInt64(bigEndianBytes: k)!, try JSONParser.parse(v)))
                return out.count < limit
            }
            return out
        }
    }

    public func outboxCount() throws -> Int { try environment.count(outbox) }
}

extension AgentStore {
    /// Outbox size now: events and bytes (from LMDB's page counts).
    public func outboxUsage() throws -> (events: Int, bytes: Int) {
        let outbox = self.outbox
        return try environment.read { txn in
            (try txn.count(outbox), try txn.storedBytes(outbox))
        }
    }

    /// The broker has everything up to `sequence`: those events leave the
    /// outbox and the acknowledged sequence is kept, in one transaction.
    /// Returns how many events were removed.
    @discardableResult
    public func acknowledge(through sequence: UInt64) throws -> Int {
        try environment.write { txn in try acknowledge(through: sequence, in: txn) }
    }

    /// `acknowledge(through:)` inside a write transaction (the relay runs it through group commit).
    public func acknowledge(through sequence: UInt64, in txn: borrowing WriteTransaction) throws -> Int {
        var keys: [[UInt8]] = []
        try txn.scan(outbox, to: (sequence &+ 1).bigEndianBytes) { k, _ in keys.append(k); return true }
        for k in keys { try txn.delete(outbox, k) }
        let current = try txn.get(meta, Array("acked".utf8)).flatMap(UInt64.init(bigEndianBytes:)) ?? 0
        if sequence > current { try txn.put(meta, Array("acked".utf8), sequence.bigEndianBytes) }
        return keys.count
    }

    /// The highest sequence the broker acknowledged (0: none yet).
    public func acknowledgedSequence() throws -> UInt64 {
        let meta = self.meta
        return try environment.read { txn in
            try txn.get(meta, Array("acked".utf8)).flatMap(UInt64.init(bigEndianBytes:)) ?? 0
        }
    }

    /// The oldest event still in the outbox: its sequence and `iat`.
    public func oldestOutboxEvent() throws -> (seq: UInt64, issuedAt: Int64)? {
        guard let first = try outboxEntries(after: 0, limit: 1).first else { return nil }
        return (first.0, first.1["iat"]?.numberValue?.integer ?? 0)
    }
}
