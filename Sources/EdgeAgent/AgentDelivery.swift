import EdgeDelivery
import EdgeStore
import SCIM

/// Local targets: the agent provisions apps inside its boundary with the
/// broker's delivery engine (EdgeDelivery), run on the agent's own store.
/// A resource is named by its id here (the agent's own, or the broker id of
/// a foreign resource), which the app receives as `externalId`; its source
/// domain is this boundary's (`ownDomain`) or, for a foreign resource, the
/// one it entered from. Every write queues what the targets' routes want in
/// its own transaction (`queueForTargets`), so that what the IdP (or the
/// downlink) was told is committed is committed for the targets too
/// (invariant 1). What the engine reads carries the source extension with
/// its `domain`, as the broker's directory does, for routes, namespaces and
/// links.
extension AgentStore: DeliveryTables {
    package var fanout: Database { delivery.fanout }
    package var targetIds: Database { delivery.targetIds }
    package var targetOwners: Database { delivery.targetOwners }
    package var targetLinks: Database { delivery.targetLinks }
    package var targetDead: Database { delivery.targetDead }
    package var trail: Database { delivery.trail }
    package var traces: Database { delivery.traces }
    package var targetState: Database { delivery.targetState }
    package var targetMembers: Database { delivery.targetMembers }
    package var targetMemberOf: Database { delivery.targetMemberOf }
    package var targetPending: Database { delivery.targetPending }

    /// Users and groups, the types targets receive.
    var deliveredTypes: [ResourceType] { ["User", "Group"].compactMap { registry.resourceType($0) } }

    /// `resource` of `type` as the engine reads it: with its source domain.
    func deliveryEntry(_ type: ResourceType, _ id: String, _ resource: JSONObject, _ txn: borrowing some StoreReading & ~Copyable) throws
        -> DirectoryEntry
    {
        let domain = try foreignDomain(type, id, txn) ?? ownDomain
        var r = resource
        r[sourceExtensionSchema] = ["domain": .string(domain)]
        return (domain, type.id, r)
    }

    package func deliveryEntry(_ id: String, members: Bool, _ txn: borrowing some StoreReading & ~Copyable) throws -> DirectoryEntry? {
        for type in deliveredTypes {
            guard let stored = try load(txn, type, id) else { continue }
            return try deliveryEntry(type, id, type.id == "Group" && members ? try withMembers(txn, stored) : stored, txn)
        }
        return nil
    }

    package func groupMemberEntry(group: String, member: String, _ txn: borrowing some StoreReading & ~Copyable) throws -> JSONObject? {
        try txn.get(groupMembers, AgentStore.memberKey(group, member)).flatMap { try JSONParser.parse($0, limits: .stored).objectValue }
    }

    package func groupMemberIDs(_ group: String, after cursor: String?, limit: Int, _ txn: borrowing some StoreReading & ~Copyable) throws
        -> [String]
    {
        try EdgeDelivery.groupMemberIDs(in: groupMembers, group, after: cursor, limit: limit, txn)
    }

    /// The stored groups holding `member` (not a removed one whose entries are still being swept).
    package func groupsHolding(_ member: String, _ txn: borrowing some StoreReading & ~Copyable) throws -> [String] {
        let groups = registry.resourceType("Group")!
        return try groupIDs(txn, of: member).filter { try txn.get(resources, AgentStore.key(groups, $0)) != nil }
    }

    package func forEachDirectoryEntry(
        _ typeName: String, members: Bool, from: [UInt8]?, _ txn: borrowing some StoreReading & ~Copyable,
        _ body: (_ position: [UInt8], DirectoryEntry) throws -> Bool
    ) throws {
        guard let type = registry.resourceType(typeName) else { return }
        try txn.scan(resources, from: from ?? Array("\(type.id)/".utf8), to: Array("\(type.id)0".utf8)) { k, v in
            let o = try AgentStore.parseResource(v, key: k)
            let id = String(decoding: k.dropFirst(type.id.utf8.count + 1), as: UTF8.self)
            return try body(k, deliveryEntry(type, id, type.id == "Group" && members ? try withMembers(txn, o) : o, txn))
        }
    }

    /// A trace id (every resource its change touched), an id here, or a userName.
    package func resolveTrail(_ query: String, limits: TrailLimits, _ txn: borrowing some StoreReading & ~Copyable) throws -> TrailNames {
        let byTrace = try traceTouched(query, limit: limits.resources, txn)
        if byTrace.total > 0 { return byTrace }
        if let users = registry.resourceType("User"), try load(txn, users, query) == nil,
            let id = try lookup(txn, users, .userName(query)).first
        {
            return TrailNames(ids: [id])
        }
        return TrailNames(ids: [query])
    }

    /// Queues, in the write's transaction, what each local target must do now
    /// that resource `id` changed from `old` to `new` (nil: absent or
    /// deleted): its routes judge both, with the resource's source domain.
    /// A group's members this write changed (its pending marks, not yet
    /// taken by the relay's `emitChange`) are marked at the targets, so that
    /// its delivery sends just those.
    func queueForTargets(
        _ type: ResourceType, id: String, old: JSONObject?, new: JSONObject?, _ ctx: WriteContext, _ txn: borrowing WriteTransaction
    )
        throws
    {
        guard !targets.isEmpty, type.id == "User" || type.id == "Group" else { return }
        let domain = try foreignDomain(type, id, txn) ?? ownDomain
        func decorated(_ o: JSONObject?) -> JSONObject? {
            o.map {
                var r = $0
                r[sourceExtensionSchema] = ["domain": .string(domain)]
                return r
            }
        }
        var touched: [String] = []
        if type.id == "Group" && new != nil {
            let prefix = AgentStore.memberPrefix(id)
            try txn.scanKeys(pendingMembers, from: prefix, to: Array(id.utf8) + [1]) { k in
                touched.append(String(decoding: k[prefix.count...], as: UTF8.self))
                return true
            }
        }
        _ = try enqueueFanout(
            domain: domain, type: type.id, brokerID: id, old: decorated(old), new: decorated(new), trace: ctx.traceID,
            acceptedAt: ctx.originAcceptedAt > 0 ? ctx.originAcceptedAt : ctx.epochMilliseconds, touched: touched, txn)
    }
}
