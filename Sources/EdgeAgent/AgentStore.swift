import EdgeDelivery
import EdgeStore
import EdgeTLS
import Glibc
import SCIM
import Synchronization

/// The agent's LMDB file: resources, their indexes, group memberships and the
/// outbox, changed together in one transaction per write.
///
/// | database | key | value |
/// |---|---|---|
/// | `resources` | `User/<id>`, `Group/<id>` | the stored resource (JSON, with `id` and `meta`); unfiltered pages walk these keys (`AgentLists.swift`) |
/// | `userNames` | lower-cased `userName` | user id (also the order of `sortBy=userName` pages) |
/// | `externalIds` | `<type>/<externalId>` | ids (duplicates sorted) |
/// | `attributes` | `User/<attribute>/<value>\0<id>`; `User/<attribute>/<value>` | empty: the index of `active`, `userType`, `emails.value` (normalised, `AttributeIndex`); the count of ids with the value |
/// | `memberships` | member id | ids of the groups holding it (duplicates sorted) |
/// | `groupMembers` | `<group id>\0<member id>` | the member as stored (`value`, `type`, `$ref`; JSON): a group's `members`, which the stored group never holds (`GroupMembers.swift`) |
/// | `outbox` | big-endian sequence | relay event (JSON) |
/// | `propagated` | `User/<id>`, `Group/<id>` | SHA-256 of what last left the boundary |
/// | `relayedMembers` | `<group id>\0<member id>` | the member as the broker was last told it (relay deltas, `GroupEvents.swift`) |
/// | `pendingMembers` | `<group id>\0<member id>` | members a write changed, until its event is decided (emptied in the same transaction) |
/// | `deadLetters` | big-endian sequence | an event the broker refused for good, with its reason |
/// | `sources` | `<source>\0cookie`, `<source>\0status`, `<source>\0k\0<key>`, `<source>\0d\0<dn>`, `<source>\0p\0<dn>\0<group key>` | a pull source's position (written with the changes it covers), its status, each entry's resource, the DN index, group members waiting for their entry (`SourceStore.swift`) |
/// | `foreign` | `User/<id>`, `Group/<id>` | the source domain of a resource that entered through the downlink (`Inbound.swift`) |
/// | `foreignWaiting` | `m\0<member>\0<group>` (the member), `g\0<group>\0<member>` | members of foreign groups not held here, until the user enters or the group forgets them |
/// | `meta` | `downlinkSeq` | the last downlink feed sequence committed (with the changes it brought) |
/// | `meta` | `seq`, `version`, `schema` (layout version, 2: members in `groupMembers`), `acked`, `policy`, `epoch`, `brokerProtocol` | counters, layout version, relay position, policy fingerprint, store identity |
/// | `meta` | `attributeIndex` | the format of `attributes` (rebuilt once at open when it differs) |
/// | `meta` | `count/<type>` (`count/User`, `count/Group`) | how many resources of the type are stored (big-endian UInt64), kept by every create and delete in its transaction |
/// | `fanout`, `targetIds`, `targetOwners`, `targetLinks`, `targetDead`, `trail`, `traces`, `targetState`, `targetMembers`, `targetMemberOf`, `targetPending` | the delivery engine's, as at the broker (`DeliveryStore.swift`, EdgeDelivery) | the local targets' queues (written in the write's transaction), account mappings, dead letters, trail (`AgentDelivery.swift`) |
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
    let groupMembers: Database
    let attributes: Database
    public let outbox: Database
    let meta: Database
    let propagated: Database
    /// Per group, the members the broker was last told it has
    /// (`group id\0member id` → the member as relayed): membership changes
    /// are relayed as the difference from it (`emitGroupChange`).
    let relayedMembers: Database
    /// Members a write changed in a group, until that write's event is
    /// decided (`group id\0member id`; emptied in the same transaction).
    let pendingMembers: Database
    let deadLetters: Database
    /// The pull sources' state (`SourceStore.swift`): positions, status, entry records, DN index, pending members.
    let sources: Database
    /// Resources that entered from other domains (`Inbound.swift`): `<type>/<id>` → source domain.
    let foreign: Database
    /// Members of foreign groups that this boundary does not hold (yet): `Inbound.swift`.
    let foreignWaiting: Database
    /// What may leave the boundary (invariant 5), applied before the outbox.
    public let policy: LocalPolicy
    /// The delivery engine's databases (local targets: `AgentDelivery.swift`).
    package let delivery: DeliveryDatabases
    /// The apps inside the boundary every write is queued for, by their routes.
    public let targets: [TargetConfiguration]
    /// This boundary's domain, the source domain of its own resources (foreign ones have theirs).
    public let ownDomain: String
    /// What the broker learns of the local targets' answers to foreign changes (`AppOutcomes.swift`).
    public let reportApps: AppOutcomeReporting
    /// Set by a write that left members of a group entering the boundary to
    /// send later (`emitEnteringGroup`), so that the commit starts that work
    /// at once (`takeNewDeferredWork`) and other commits look for none. Set
    /// before the commit: a write rolled back only causes one needless look.
    let newDeferredWork = Atomic<Bool>(false)

    /// Whether a write since the last call left deferred work to start now.
    public func takeNewDeferredWork() -> Bool { newDeferredWork.exchange(false, ordering: .relaxed) }
    /// Per resource type, the member names (lowercased UTF-8) that send a GET
    /// by id down the general path: those the default projection drops
    /// (`Projection.namesHiddenByDefault`) and, for users, `groups`, which
    /// the read adds from the membership index.
    let generalPathNames: [String: [[UInt8]]]
    /// `AttributeIndex.caseExactness`, resolved once (every write reads it).
    let attributeCaseExact: [Bool]
    /// Checkpoints of `startIndex` walks (`PositionIndex`), in memory.
    let positionIndex = PositionIndex()

    /// Keys the last `startIndex` page stepped over to reach its start.
    public var lastStartIndexSteps: Int { positionIndex.lastSteps.load(ordering: .relaxed) }

    /// 1: a group's `members` inline in its stored JSON; 2: in `groupMembers`.
    /// A store of layout 1 is migrated when it is opened (`migrateInlineMembers`).
    public static let layoutVersion: UInt64 = 2

    /// This store's identity, made when the store is: 32 hex digits, sent
    /// with every relay batch. The broker keys the applied sequence by
    /// certificate identity *and* epoch, so a re-imaged appliance (a new,
    /// empty store with the old certificate) or a second agent with the same
    /// certificate starts a sequence of its own instead of having its events
    /// taken for duplicates. Empty for a store that sent events before epochs
    /// existed: it keeps the one sequence it had.
    public let epoch: String

    /// `targets`: the local targets writes are queued for; `domain`: this
    /// boundary's (`local` without a broker).
    public init(
        path: String, registry: SchemaRegistry, policy: LocalPolicy? = nil, targets: [TargetConfiguration] = [],
        domain: String = AgentStore.standaloneDomain, reportApps: AppOutcomeReporting = .none,
        options: (inout EnvironmentOptions) -> Void = { _ in }
    ) throws {
        var o = EnvironmentOptions(path: path)
        options(&o)
        environment = try Environment(o)
        self.registry = registry
        self.policy = policy ?? .propagateAll(registry)
        self.targets = targets
        ownDomain = domain
        self.reportApps = reportApps
        attributeCaseExact = AttributeIndex.caseExactness(registry)
        generalPathNames = Dictionary(
            uniqueKeysWithValues: registry.resourceTypes.map { type in
                (
                    type.id,
                    (Projection.namesHiddenByDefault(registry: registry, type: type) + (type.id == "User" ? ["groups"] : []))
                        .map { Array($0.lowercased().utf8) }
                )
            })
        propagated = try environment.openDatabase("propagated")
        relayedMembers = try environment.openDatabase("relayedMembers")
        pendingMembers = try environment.openDatabase("pendingMembers")
        deadLetters = try environment.openDatabase("deadLetters")
        resources = try environment.openDatabase("resources")
        userNames = try environment.openDatabase("userNames")
        externalIds = try environment.openDatabase("externalIds", flags: .duplicateSort)
        memberships = try environment.openDatabase("memberships", flags: .duplicateSort)
        groupMembers = try environment.openDatabase("groupMembers")
        attributes = try environment.openDatabase("attributes")
        outbox = try environment.openDatabase("outbox")
        meta = try environment.openDatabase("meta")
        sources = try environment.openDatabase("sources")
        foreign = try environment.openDatabase("foreign")
        foreignWaiting = try environment.openDatabase("foreignWaiting")
        delivery = try DeliveryDatabases(environment)
        let meta = self.meta, resources = self.resources, types = registry.resourceTypes, attributes = self.attributes
        let groupMembers = self.groupMembers
        epoch = try environment.write { txn in
            if let v = try txn.get(meta, Array("schema".utf8)).flatMap(UInt64.init(bigEndianBytes:)) {
                if v == 1 {
                    try AgentStore.migrateInlineMembers(txn, resources: resources, groupMembers: groupMembers)
                    try txn.put(meta, Array("schema".utf8), AgentStore.layoutVersion.bigEndianBytes)
                } else {
                    guard v == AgentStore.layoutVersion else { throw StoreLayoutError(found: v) }
                }
            } else {
                try txn.put(meta, Array("schema".utf8), AgentStore.layoutVersion.bigEndianBytes)
            }
            // A store made before resource counts existed gets them here, once:
            // a key-only scan per type, in this one write transaction. From
            // then on every create and delete keeps them (`adjustCount`).
            for type in types where try txn.get(meta, AgentStore.countKey(type)) == nil {
                var n: UInt64 = 0
                try txn.scanKeys(resources, from: Array("\(type.id)/".utf8), to: Array("\(type.id)0".utf8)) { _ in
                    n += 1
                    return true
                }
                try txn.put(meta, AgentStore.countKey(type), n.bigEndianBytes)
            }
            if try txn.get(meta, Array("attributeIndex".utf8)) != AttributeIndex.format {
                try AttributeIndex.rebuild(txn, resources: resources, attributes: attributes, meta: meta, registry: registry)
            }
            if let e = try txn.get(meta, Array("epoch".utf8)) { return String(decoding: e, as: UTF8.self) }
            // A store that already numbered events under the old, single
            // sequence keeps it: a new epoch would make the broker expect 1.
            if try txn.get(meta, Array("seq".utf8)) != nil { return "" }
            let e = hexString(secureRandomBytes(16))
            try txn.put(meta, Array("epoch".utf8), Array(e.utf8))
            return e
        }
    }

    /// The domain of an agent without a broker: local targets' routes name it.
    public static let standaloneDomain = "local"

    struct StoreLayoutError: Error, CustomStringConvertible {
        let found: UInt64
        var description: String { "data directory has layout version \(found); this agent reads \(AgentStore.layoutVersion)" }
    }

    static func key(_ type: ResourceType, _ id: String) -> [UInt8] { Array("\(type.id)/\(id)".utf8) }

    /// Layout 1 → 2, once, in the open's write transaction: every group
    /// whose stored JSON holds `members` gets them as `groupMembers`
    /// entries and is rewritten without them (its other members, `meta`
    /// last, unchanged; no new version and no event: what the group is did
    /// not change). `memberships` was already kept by layout 1. A member
    /// without a string `value` could not be read back as one and is
    /// dropped. Groups are parsed with `JSONLimits.stored`, so one grown
    /// past the request limits migrates too (invariant 8). Costs one parse
    /// and rewrite of every group, and memory for the group keys.
    static func migrateInlineMembers(_ txn: borrowing WriteTransaction, resources: Database, groupMembers: Database) throws {
        var keys: [[UInt8]] = []
        try txn.scanKeys(resources, from: Array("Group/".utf8), to: Array("Group0".utf8)) { k in
            keys.append(k)
            return true
        }
        for key in keys {
            guard let bytes = try txn.get(resources, key), case var group = try AgentStore.parseResource(bytes, key: key),
                let name = group.keys.first(where: { equalsIgnoringASCIICase($0, "members") })
            else { continue }
            let id = String(decoding: key.dropFirst("Group/".utf8.count), as: UTF8.self)
            for m in group[name]?.arrayValue ?? [] {
                guard let o = m.objectValue, let mid = o["value"]?.stringValue, !mid.isEmpty else { continue }
                try txn.put(groupMembers, memberKey(id, mid), JSON.object(o).serialized())
            }
            group[name] = nil
            try txn.put(resources, key, JSON.object(group).serialized())
        }
    }

    /// The `meta` key of a type's resource count.
    static func countKey(_ type: ResourceType) -> [UInt8] { Array("count/\(type.id)".utf8) }

    /// How many resources of `type` are stored: the count kept in `meta`, O(1).
    public func count(_ type: ResourceType) throws -> Int {
        try environment.read { txn in try count(txn, type) }
    }

    func count(_ txn: borrowing some StoreReading & ~Copyable, _ type: ResourceType) throws -> Int {
        Int(try txn.get(meta, AgentStore.countKey(type)).flatMap(UInt64.init(bigEndianBytes:)) ?? 0)
    }

    // MARK: reads

    /// The stored resource, or nil; a group with its `members` (from the index, O(n)).
    public func get(_ type: ResourceType, _ id: String) throws -> JSONObject? {
        try environment.read { txn in try load(txn, type, id).map { type.id == "Group" ? try withMembers(txn, $0) : $0 } }
    }

    func load(_ txn: borrowing some StoreReading & ~Copyable, _ type: ResourceType, _ id: String) throws -> JSONObject? {
        let key = AgentStore.key(type, id)
        guard let bytes = try txn.get(resources, key) else { return nil }
        return try AgentStore.parseResource(bytes, key: key)
    }

    /// A stored resource's bytes parsed; one that does not parse, or is not
    /// an object, is a `DamagedRecord` naming `key` (never taken as absent,
    /// nor skipped by a list in silence).
    static func parseResource(_ bytes: [UInt8], key: [UInt8]) throws -> JSONObject {
        let parsed: JSON
        do { parsed = try JSONParser.parse(bytes, limits: .stored) } catch {
            throw DamagedRecord(key: String(decoding: key, as: UTF8.self), reason: "\(error)")
        }
        guard let object = parsed.objectValue else {
            throw DamagedRecord(key: String(decoding: key, as: UTF8.self), reason: "not a JSON object")
        }
        return object
    }

    /// A stored resource that does not parse or is not a JSON object (what
    /// this agent writes always is: the file was damaged there). Names the record, so that a read,
    /// or the start of an agent whose policy changed (which reads every
    /// resource), says which one instead of only where the parser stopped.
    public struct DamagedRecord: Error, CustomStringConvertible {
        public let key: String
        public let reason: String
        public var description: String {
            "the stored resource \(key) cannot be read (\(reason)): the data directory is damaged there; restore it from a backup"
        }
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
            return try txn.duplicateValues(externalIds, Array("\(type.id)/\(value)".utf8))
        }
    }

    /// Resources of `type` that match `filter`, using an index when the filter
    /// allows, else scanning at most `scanBudget` resources (then `tooMany`).
    public func query(_ type: ResourceType, filter: Filter?, scanBudget: Int) throws -> [JSONObject] {
        try environment.read { txn in
            if let hint = filter?.indexLookup {
                return try lookup(txn, type, hint.lookup).compactMap { id in
                    guard let r = try load(txn, type, id) else { return nil }
                    return try hint.exact || filter!.matches(forMatching(txn, type, r, filter)) ? r : nil
                }
            }
            if let filter, let found = try groupsRequiringMembers(txn, type, filter) { return found }
            return try loadAll(txn, type, filter: filter, scanBudget: scanBudget, cursorHelps: false)
        }
    }

    /// Groups holding `memberID` (directly).
    func groupIDs(_ txn: borrowing some StoreReading & ~Copyable, of memberID: String) throws -> [String] {
        try txn.duplicateValues(memberships, Array(memberID.utf8))
    }

    /// A resource as a client reads it, in one snapshot: users with their
    /// read-only `groups` from the membership index, groups with their
    /// `members` from theirs unless `members` is false (the projection
    /// drops them: `excludedAttributes=members`, `attributes=displayName`),
    /// when the members index is not read at all.
    public func getAsReturned(_ type: ResourceType, _ id: String, baseURL: String, members: Bool = true) throws -> JSONObject? {
        try environment.read { txn in
            guard let stored = try load(txn, type, id) else { return nil }
            return try asReturned(txn, stored, type, baseURL: baseURL, members: members)
        }
    }

    /// A GET by id under a projection, in one snapshot: as `getAsReturned`,
    /// except that a group of more than `streamedArrayAbove` members whose
    /// members are returned (`members`) comes back without them and with
    /// `streamMembers`: they follow streamed (`memberPieces`), as in
    /// `DefaultRead.streamed`, the version being the one read here.
    public func getForProjectedRead(
        _ type: ResourceType, _ id: String, baseURL: String, members: Bool
    ) throws -> (resource: JSONObject, streamMembers: Bool)? {
        try environment.read { txn in
            guard let stored = try load(txn, type, id) else { return nil }
            if members, type.id == "Group", stored["members"] == nil, try hasMoreMembers(txn, id, than: streamedArrayAbove) {
                return (stored, true)
            }
            return (try asReturned(txn, stored, type, baseURL: baseURL, members: members), false)
        }
    }

    func asReturned(
        _ txn: borrowing some StoreReading & ~Copyable, _ stored: JSONObject, _ type: ResourceType, baseURL: String, members: Bool
    ) throws -> JSONObject {
        switch type.id {
        case "User": return try addGroups(txn, stored, baseURL: baseURL)
        case "Group" where members: return try withMembers(txn, stored)
        default: return stored
        }
    }

    /// What a GET by id without `attributes` or `excludedAttributes` answers.
    public enum DefaultRead {
        case notFound
        /// The response body, made from the stored bytes, and `meta.version`.
        case body([UInt8], version: String?)
        /// The stored form needs the general path (`asReturned`, then a projection).
        case general(JSONObject)
        /// A group with more members than one body should hold: the body up
        /// to its members, which follow streamed (`memberPieces`).
        case streamed(head: [UInt8], version: String?)
    }

    /// GET by id in one snapshot, without parsing the resource when it can be
    /// answered as stored: `store` writes `meta` last, so the body is the
    /// stored bytes up to `meta`, then `meta` with its `location`, then (users)
    /// `groups`: the bytes `output(asReturned(…))` gives under the default
    /// projection (tested). A resource naming one of `generalPathNames`, or
    /// not ending in a `meta` object, takes the general path.
    public func getForDefaultRead(_ type: ResourceType, _ id: String, baseURL: String) throws -> DefaultRead {
        try environment.read { txn in
            guard let bytes = try txn.get(resources, AgentStore.key(type, id)) else { return .notFound }
            let isUser = type.id == "User"
            let metaStart = lastIndex(of: AgentStore.metaMember, in: bytes).map { $0 + AgentStore.metaMember.count }
            var meta: JSONObject?
            if let metaStart, bytes.last == UInt8(ascii: "}"),
                !namesMember(bytes, generalPathNames[type.id] ?? []),
                // The rest is exactly one object (the parse fails on anything after it): meta is the last member.
                let parsed = try? JSONParser.parse(Array(bytes[metaStart..<(bytes.count - 1)]), limits: .stored).objectValue,
                parsed["resourceType"]?.stringValue == type.id, parsed["location"] == nil
            {
                meta = parsed
            }
            guard var meta, let metaStart else {
                let stored = try AgentStore.parseResource(bytes, key: AgentStore.key(type, id))
                return .general(try asReturned(txn, stored, type, baseURL: baseURL, members: true))
            }
            meta["location"] = .string("\(baseURL)\(type.endpoint)/\(id)")
            var body: [UInt8] = []
            body.reserveCapacity(bytes.count + 256)
            body.append(contentsOf: bytes[..<metaStart])
            JSON.object(meta).write(to: &body)
            if isUser {
                let groups = try groupsReturned(txn, of: id, baseURL: baseURL)
                if !groups.isEmpty {
                    body.append(contentsOf: AgentStore.groupsMember)
                    JSON.array(groups).write(to: &body)
                }
            } else if type.id == "Group" {
                if try hasMoreMembers(txn, id, than: streamedArrayAbove) {
                    return .streamed(head: body, version: meta["version"]?.stringValue)
                }
                // Straight from the index's stored bytes, after meta (as `withMembers` places them).
                try appendMembers(txn, of: id, to: &body)
            }
            body.append(UInt8(ascii: "}"))
            return .body(body, version: meta["version"]?.stringValue)
        }
    }

    static let metaMember = Array(#","meta":"#.utf8)
    static let groupsMember = Array(#","groups":"#.utf8)

    /// A stored resource as a client reads it: users with their read-only
    /// `groups` from the membership index, groups with their `members`
    /// (unless `members` is false, or they are there already).
    public func asReturned(_ stored: JSONObject, _ type: ResourceType, baseURL: String, members: Bool = true) throws -> JSONObject {
        guard type.id == "User" || (type.id == "Group" && members && stored["members"] == nil) else { return stored }
        return try environment.read { txn in try asReturned(txn, stored, type, baseURL: baseURL, members: members) }
    }

    func addGroups(_ txn: borrowing some StoreReading & ~Copyable, _ user: JSONObject, baseURL: String) throws -> JSONObject {
        guard let id = user["id"]?.stringValue else { return user }
        var out = user
        let groups = try groupsReturned(txn, of: id, baseURL: baseURL)
        out["groups"] = groups.isEmpty ? nil : .array(groups)
        return out
    }

    /// A user's read-only `groups` values, from the membership index.
    func groupsReturned(_ txn: borrowing some StoreReading & ~Copyable, of id: String, baseURL: String) throws -> [JSON] {
        try groupIDs(txn, of: id).compactMap { gid in
            guard let group = try load(txn, registry.resourceType("Group")!, gid) else { return nil }
            var g: JSONObject = ["value": .string(gid), "$ref": .string("\(baseURL)/Groups/\(gid)"), "type": "direct"]
            if let name = group["displayName"] { g["display"] = name }
            return .object(g)
        }
    }

    /// Outbox entries after `sequence`, at most `limit`.
    public func outboxEntries(after sequence: UInt64, limit: Int) throws -> [(UInt64, JSON)] {
        try rawOutboxEntries(after: sequence, limit: limit, maxBytes: .max).map { ($0.0, try JSONParser.parse($0.1, limits: .stored)) }
    }

    /// Outbox events as stored (serialised JSON), in sequence order, up to
    /// `limit` events and `maxBytes`, counting `separatorBytes` between two
    /// events (at least one event, however large): the relay sends them as
    /// they are, without parsing them again.
    public func rawOutboxEntries(
        after sequence: UInt64, limit: Int, maxBytes: Int,
        separatorBytes: Int = 0
    ) throws -> [(UInt64, [UInt8])] {
        try environment.read { txn in
            var out: [(UInt64, [UInt8])] = []
            var bytes = 0
            try txn.scan(outbox, from: (sequence &+ 1).bigEndianBytes) { k, v in
                let more = out.isEmpty ? v.count : separatorBytes + v.count
                if !out.isEmpty && bytes + more > maxBytes { return false }
                out.append((UInt64(bigEndianBytes: k)!, v))
                bytes += more
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

    /// `acknowledge(through:)` inside a write transaction (the relay runs it
    /// through group commit). Events the broker refused for good move to the
    /// dead letters with its reason instead of vanishing.
    public func acknowledge(
        through sequence: UInt64, rejected: [UInt64: String] = [:], at epochSeconds: Int64 = 0,
        in txn: borrowing WriteTransaction
    ) throws -> Int {
        var keys: [[UInt8]] = []
        try txn.scan(outbox, to: (sequence &+ 1).bigEndianBytes) { k, _ in
            keys.append(k); return true
        }
        for (seq, reason) in rejected where seq <= sequence {
            guard let event = try txn.get(outbox, seq.bigEndianBytes) else { continue }
            let letter: JSON = [
                "reason": .string(reason), "at": .number(JSONNumber(integer: epochSeconds)),
                "event": try JSONParser.parse(event, limits: .stored),
            ]
            try txn.put(deadLetters, seq.bigEndianBytes, letter.serialized())
            try forgetRefusedGroup(event, txn)
        }
        for k in keys { try txn.delete(outbox, k) }
        let current = try txn.get(meta, Array("acked".utf8)).flatMap(UInt64.init(bigEndianBytes:)) ?? 0
        if sequence > current { try txn.put(meta, Array("acked".utf8), sequence.bigEndianBytes) }
        return keys.count
    }

    /// The highest sequence this store has numbered (0: none yet): every
    /// event up to it may have been sent, by this run or one before a crash.
    public func numberedSequence() throws -> UInt64 {
        let meta = self.meta
        return try environment.read { txn in
            try txn.get(meta, Array("seq".utf8)).flatMap(UInt64.init(bigEndianBytes:)) ?? 0
        }
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

extension AgentStore {
    /// Dead letters: sequence, reason, the event.
    public func deadLetterEntries() throws -> [(UInt64, String, JSON)] {
        let deadLetters = self.deadLetters
        return try environment.read { txn in
            var out: [(UInt64, String, JSON)] = []
            try txn.scan(deadLetters) { k, v in
                let letter = try JSONParser.parse(v, limits: .stored)
                out.append((UInt64(bigEndianBytes: k)!, letter["reason"]?.stringValue ?? "", letter["event"] ?? .null))
                return true
            }
            return out
        }
    }

    /// Forgets a dead letter. Returns whether it existed.
    @discardableResult
    public func dropDeadLetter(_ seq: UInt64) throws -> Bool {
        let deadLetters = self.deadLetters
        return try environment.write { txn in try txn.delete(deadLetters, seq.bigEndianBytes) }
    }

    /// Sends the resource of a dead letter again, as it is now (or its
    /// deletion): a new event at the end of the outbox. Returns whether a
    /// dead letter was found.
    @discardableResult
    public func retryDeadLetter(_ seq: UInt64, _ ctx: WriteContext) throws -> Bool {
        let deadLetters = self.deadLetters, propagated = self.propagated
        return try environment.write { txn in
            guard let bytes = try txn.get(deadLetters, seq.bigEndianBytes) else { return false }
            let letter = try JSONParser.parse(bytes, limits: .stored)
            guard let (_, body) = letter["event"]?["events"]?.objectValue?.members.first,
                let ref = body["ref"]?.stringValue
            else { return false }
            let parts = slashParts(ref)
            if parts.count == 2, let type = registry.resourceType(endpoint: "/" + parts[0]) {
                let id = String(parts[1])
                // Forget what we believed had left, so the current state goes out in full.
                try txn.delete(propagated, AgentStore.key(type, id))
                let current = try load(txn, type, id)
                if current == nil {
                    try appendEvent(EventURI.delete, type: type, id: id, data: nil, ctx, txn)
                } else {
                    try emitChange(type, id: id, current: current, kind: EventURI.putFull, ctx, txn)
                }
            }
            try txn.delete(deadLetters, seq.bigEndianBytes)
            return true
        }
    }
}

extension AgentStore {
    /// Appends an event as given, with the next sequence number: for tests
    /// that need an event the broker refuses. Not used by the agent itself.
    public func appendEventForTesting(uri: String, ref: String, data: JSONObject?, _ ctx: WriteContext) throws {
        try environment.write { txn in try appendEventForTesting(uri: uri, ref: ref, data: data, ctx, in: txn) }
    }

    /// The same inside a write transaction (bulk fills for benchmarks).
    public func appendEventForTesting(
        uri: String, ref: String, data: JSONObject?, _ ctx: WriteContext,
        in txn: borrowing WriteTransaction
    ) throws {
        do {
            let key = Array("seq".utf8)
            let seq = (try txn.get(meta, key).flatMap(UInt64.init(bigEndianBytes:)) ?? 0) + 1
            try txn.put(meta, key, seq.bigEndianBytes)
            var body: JSONObject = ["ref": .string(ref)]
            if let data { body["data"] = .object(data) }
            let event: JSON = [
                "seq": .number(JSONNumber(integer: Int64(seq))), "jti": .string(ctx.eventID), "txn": .string(ctx.traceID),
                "iat": .number(JSONNumber(integer: ctx.epochSeconds)), "events": .object(JSONObject([(uri, .object(body))])),
            ]
            try txn.put(outbox, seq.bigEndianBytes, event.serialized(), flags: .append)
        }
    }
}

/// Whether serialised JSON has a member named one of `names` (lowercase;
/// compared ASCII case-insensitively, as attribute names are). A string value
/// that reads `"name":` also counts, which only sends the caller down its
/// general path. One pass over the bytes, from quote to quote.
func namesMember(_ bytes: [UInt8], _ names: [[UInt8]]) -> Bool {
    guard !names.isEmpty else { return false }
    let quote = UInt8(ascii: "\""), colon = UInt8(ascii: ":")
    return bytes.withUnsafeBufferPointer { b in
        guard let base = b.baseAddress else { return false }
        var k = 0
        while k < b.count, let hit = memchr(base + k, Int32(quote), b.count - k) {
            let start = base.distance(to: hit.assumingMemoryBound(to: UInt8.self)) + 1
            for name in names
            where start + name.count + 1 < b.count
                && b[start + name.count] == quote && b[start + name.count + 1] == colon
            {
                var m = 0
                while m < name.count, asciiLower(b[start + m]) == name[m] { m += 1 }
                if m == name.count { return true }
            }
            k = start
        }
        return false
    }
}

/// The start of the last occurrence of `pattern` in `bytes`.
func lastIndex(of pattern: [UInt8], in bytes: [UInt8]) -> Int? {
    guard bytes.count >= pattern.count else { return nil }
    var k = bytes.count - pattern.count
    while k >= 0 {
        if bytes[k] == pattern[0] && bytes[k..<(k + pattern.count)].elementsEqual(pattern) { return k }
        k -= 1
    }
    return nil
}

@inline(__always) func asciiLower(_ c: UInt8) -> UInt8 { c >= 65 && c <= 90 ? c | 0x20 : c }
