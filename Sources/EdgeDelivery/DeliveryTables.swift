import EdgeStore
import SCIM

/// The store a delivery engine runs in: the broker's (`BrokerStore`) or an
/// agent's (`AgentStore`). Its LMDB environment holds the engine's own
/// databases (below: queues, account mappings, dead letters, the trail, the
/// member and link indexes) beside the store's resources, so that what a
/// write changes and what it queues for the targets commit together
/// (invariant 1). The engine reads the resources through the directory
/// requirements: a resource is named by its *delivery id*, the id the
/// store gives it (the broker id, or the agent's id), which targets receive
/// as `externalId`, and comes with its source domain.
///
/// The engine's code is the extension of this protocol (`DeliveryStore.swift`,
/// `TargetMembers.swift`, `DeletionGuard.swift`, `Reconcile.swift`), written
/// once for both stores.
package protocol DeliveryTables: AnyObject, Sendable {
    var environment: Environment { get }
    /// Where changes fan out to (their routes decide what is queued).
    var targets: [TargetConfiguration] { get }

    /// `<target> 0x00 <seq BE>` → a `DeliveryItem`.
    var fanout: Database { get }
    /// `<target> 0x00 <delivery id>` → a `TargetMapping`.
    var targetIds: Database { get }
    /// `<target> 0x00 <type>/<target id>` → the delivery id whose mapping names it.
    var targetOwners: Database { get }
    /// `<target> 0x00 <link value> 0x00 <delivery id>` (`collisions: link`).
    var targetLinks: Database { get }
    /// `<target> 0x00 <seq BE>` → a dead letter.
    var targetDead: Database { get }
    /// `<delivery id> 0x00 <µs BE> <hop>` → one hop of a change.
    var trail: Database { get }
    /// `<trace id> 0x00 <delivery id>`.
    var traces: Database { get }
    /// Counters, deletion guards, saved statuses, per target.
    var targetState: Database { get }
    /// What each target holds of each group's members (`TargetMembers.swift`).
    var targetMembers: Database { get }
    /// Its other direction (duplicates).
    var targetMemberOf: Database { get }
    /// Members changed since the group was delivered.
    var targetPending: Database { get }
    /// Other tables keyed `<target> 0x00 …` that `forgetTarget` clears too (the broker's downlink feeds).
    var otherTargetTables: [(Database, WritableKeyPath<ForgottenTarget, Int>)] { get }

    /// The resource `id` names, its source domain and type; a group with
    /// its `members` unless `members` is false. Nil: gone.
    func deliveryEntry(_ id: String, members: Bool, _ txn: borrowing some StoreReading & ~Copyable) throws -> DirectoryEntry?
    /// The member entry of `group` for `member` (nil: not a member).
    func groupMemberEntry(group: String, member: String, _ txn: borrowing some StoreReading & ~Copyable) throws -> JSONObject?
    /// Up to `limit` member ids of `group` after `cursor` (nil: from the first), in key order.
    func groupMemberIDs(_ group: String, after cursor: String?, limit: Int, _ txn: borrowing some StoreReading & ~Copyable) throws
        -> [String]
    /// The groups holding `member` directly.
    func groupsHolding(_ member: String, _ txn: borrowing some StoreReading & ~Copyable) throws -> [String]
    /// The resources of `type` (groups with their members when `members`)
    /// from the position `from` (nil: the first) in the store's order, each
    /// with its position (an opaque key), until `body` returns false.
    func forEachDirectoryEntry(
        _ type: String, members: Bool, from: [UInt8]?, _ txn: borrowing some StoreReading & ~Copyable,
        _ body: (_ position: [UInt8], DirectoryEntry) throws -> Bool
    ) throws
    /// The delivery ids a `trail` query names (at most `limits.resources`,
    /// looking at most `limits.scan` resources of the directory when it
    /// scans), and whether it named them by trace id. By default: a trace
    /// id, else the delivery id itself; the broker also knows names and the
    /// ids at targets and sources.
    func resolveTrail(_ query: String, limits: TrailLimits, _ txn: borrowing some StoreReading & ~Copyable) throws -> TrailNames
    /// A delivery ended (the target answered, had nothing to be sent, or
    /// refused: `deadLetter`), in the transaction that records it. The
    /// broker does nothing more; an agent reports its apps' answers to what
    /// entered through the downlink up to the broker (`AppOutcomes.swift`).
    /// `domain`: a removal's source domain, as queued.
    func deliveryEnded(
        target: String, brokerID: String, type: String, trace: String, domain: String?, hop: JSONObject, deadLetter: JSONObject?,
        _ txn: borrowing WriteTransaction
    ) throws
}

/// A resource as the engine reads it.
package typealias DirectoryEntry = (domain: String, type: String, resource: JSONObject)

/// The engine's database names: a store opens each with these names in its
/// own environment (`DeliveryDatabases.open`).
package struct DeliveryDatabases: Sendable {
    package let fanout, targetIds, targetOwners, targetLinks, targetDead, trail, traces, targetState: Database
    package let targetMembers, targetMemberOf, targetPending: Database

    package init(_ environment: Environment) throws {
        fanout = try environment.openDatabase("fanout")
        targetIds = try environment.openDatabase("targetIds")
        targetOwners = try environment.openDatabase("targetOwners")
        targetLinks = try environment.openDatabase("targetLinks")
        targetDead = try environment.openDatabase("targetDead")
        trail = try environment.openDatabase("trail")
        traces = try environment.openDatabase("traces")
        targetState = try environment.openDatabase("targetState")
        targetMembers = try environment.openDatabase("targetMembers")
        targetMemberOf = try environment.openDatabase("targetMemberOf", flags: .duplicateSort)
        targetPending = try environment.openDatabase("targetPending")
    }
}

extension DeliveryTables {
    package var otherTargetTables: [(Database, WritableKeyPath<ForgottenTarget, Int>)] { [] }

    package func deliveryEnded(
        target: String, brokerID: String, type: String, trace: String, domain: String?, hop: JSONObject, deadLetter: JSONObject?,
        _ txn: borrowing WriteTransaction
    ) throws {}

    package func resolveTrail(_ query: String, limits: TrailLimits, _ txn: borrowing some StoreReading & ~Copyable) throws -> TrailNames {
        let byTrace = try traceTouched(query, limit: limits.resources, txn)
        return byTrace.total > 0 ? byTrace : TrailNames(ids: [query])
    }

    /// The delivery ids trace id `trace` touched: the first `limit`, and how
    /// many there are, counted on to `limit` + 10,000 keys (`byTrace`
    /// false: none).
    package func traceTouched(_ trace: String, limit: Int, _ txn: borrowing some StoreReading & ~Copyable) throws -> TrailNames {
        var ids: [String] = []
        var total = 0
        let counted = limit > Int.max - 10_000 ? Int.max : limit + 10_000
        try txn.scanKeys(traces, from: prefixed(trace, []), to: prefixEnd(trace)) { k in
            total += 1
            if ids.count < limit { ids.append(String(decoding: k[(trace.utf8.count + 1)...], as: UTF8.self)) }
            return total < counted
        }
        return TrailNames(ids: ids, byTrace: total > 0, total: total)
    }

    /// `deliveryEntry` in a snapshot of its own.
    package func deliveryEntry(_ id: String, members: Bool = true) throws -> DirectoryEntry? {
        try environment.read { txn in try deliveryEntry(id, members: members, txn) }
    }

    /// Every resource of `type`, across domains, a chunk at a time, each
    /// chunk read in a snapshot of its own (reconcile: memory holds a chunk).
    package func forEachDirectoryEntry(_ type: String, members: Bool, chunk: Int = 500, _ body: (DirectoryEntry) throws -> Void)
        throws
    {
        var from: [UInt8]?
        while true {
            let (found, last): ([DirectoryEntry], [UInt8]?) = try environment.read { txn in
                var out: [DirectoryEntry] = []
                var last: [UInt8]?
                try forEachDirectoryEntry(type, members: members, from: from, txn) { position, e in
                    out.append(e)
                    last = position
                    return out.count < chunk
                }
                return (out, out.count == chunk ? last : nil)
            }
            for e in found { try body(e) }
            guard let last else { return }
            from = last + [0]
        }
    }
}

/// Up to `limit` member ids of `group` after `cursor` (nil: from the first)
/// in `members`, a table keyed `<group> 0x00 <member>` (the broker's and the
/// agent's group member indexes both are).
package func groupMemberIDs(
    in members: Database, _ group: String, after cursor: String?, limit: Int, _ txn: borrowing some StoreReading & ~Copyable
) throws -> [String] {
    let prefix = Array(group.utf8) + [0]
    var ids: [String] = []
    try txn.scanKeys(members, from: cursor.map { prefix + Array($0.utf8) + [0] } ?? prefix, to: Array(group.utf8) + [1]) { k in
        ids.append(String(decoding: k[prefix.count...], as: UTF8.self))
        return ids.count < limit
    }
    return ids
}

/// Where a federated resource came from: the extension every resource the
/// engine reads carries, with at least its source `domain`.
public let sourceExtensionSchema = "urn:scim-edge:params:scim:schemas:extension:source:1.0:Resource"

/// `registry` with the source extension on users and groups: what routes
/// and link attributes are compiled against.
public func withSourceExtension(_ registry: SchemaRegistry) -> SchemaRegistry {
    var r = registry
    let source = Schema(
        id: sourceExtensionSchema, name: "Source", description: "Where a federated resource came from",
        attributes: [
            AttributeDefinition("domain", description: "The domain of the agent that sent it.", caseExact: true, mutability: .readOnly),
            AttributeDefinition("agent", description: "The agent's certificate identity.", caseExact: true, mutability: .readOnly),
            AttributeDefinition("id", description: "The id at the agent.", caseExact: true, mutability: .readOnly),
            AttributeDefinition("version", description: "The version at the agent.", caseExact: true, mutability: .readOnly),
            AttributeDefinition("trace", description: "Trace id of the change.", caseExact: true, mutability: .readOnly),
            AttributeDefinition("seq", .integer, description: "The agent's event sequence.", mutability: .readOnly),
            AttributeDefinition("accepted", .integer, description: "When the agent accepted the change (Unix ms).", mutability: .readOnly),
            AttributeDefinition("applied", .integer, description: "When the broker applied it (Unix ms).", mutability: .readOnly),
        ])
    for type in ["User", "Group"]
    where r.resourceType(type) != nil && !(r.resourceType(type)!.extensions.contains { $0.schema == sourceExtensionSchema }) {
        try! r.addExtension(source, to: type)
    }
    return r
}

/// The standard schemas with the source extension: the broker's directory.
public let federatedRegistry: SchemaRegistry = withSourceExtension(.standard)
