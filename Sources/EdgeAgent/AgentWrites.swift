import EdgeStore
import EdgeTLS
import SCIM

/// What a write needs that must not change if group commit runs it again
/// (ids, clocks): made on the loop before the write is submitted.
public struct WriteContext: Sendable {
    public var newID: String
    public var now: String
    public var epochSeconds: Int64
    public var eventID: String
    public var traceID: String
    public var ifMatch: String?
    /// When the write was accepted, in Unix milliseconds (events carry it as
    /// `ts`, so the broker can measure propagation).
    public var epochMilliseconds: Int64 = 0
    /// A change that entered through the downlink: when its source agent
    /// accepted it (the feed event's `ts`; 0: not such a change). The local
    /// targets measure their propagation from it, as the broker does.
    public var originAcceptedAt: Int64 = 0
    /// Whether writes append relay events (false for a standalone agent).
    public var recordEvents = true

    public init(newID: String, now: String, epochSeconds: Int64, eventID: String, traceID: String, ifMatch: String? = nil) {
        self.newID = newID
        self.now = now
        self.epochSeconds = epochSeconds
        self.eventID = eventID
        self.traceID = traceID
        self.ifMatch = ifMatch
    }
}

/// A change to one resource.
public enum AgentWrite: Sendable {
    /// `validated` is the output of `ResourceValidator.validateCreate`.
    case create(ResourceType, validated: JSONObject)
    case replace(ResourceType, id: String, body: JSON)
    case patch(ResourceType, id: String, request: PatchRequest)
    case delete(ResourceType, id: String)
}

extension AgentWrite {
    /// The stored resource the write changes (nil: a create).
    var existingResource: (ResourceType, String)? {
        switch self {
        case .create: return nil
        case .replace(let type, let id, _), .patch(let type, let id, _), .delete(let type, let id): return (type, id)
        }
    }
}

/// RFC 9967 event URIs (SCIM profile for Security Event Tokens).
enum EventURI {
    static let createFull = "urn:ietf:params:SCIM:event:prov:create:full"
    static let putFull = "urn:ietf:params:SCIM:event:prov:put:full"
    static let patchFull = "urn:ietf:params:SCIM:event:prov:patch:full"
    static let delete = "urn:ietf:params:SCIM:event:prov:delete"
    /// Relay only (docs/protocol.md): stands in for an event the broker
    /// refused on its own, so that its sequence is recorded as rejected.
    static let undeliverable = "urn:scim-edge:params:event:undeliverable"
}

extension AgentStore {
    /// Applies `write` in `txn`: the resource, its indexes and its outbox
    /// event(s) change together. Returns the stored resource (nil for a delete).
    /// Deterministic given `ctx` and the store's state.
    public func apply(
        _ write: AgentWrite, _ ctx: WriteContext, profile: ClientProfile,
        in txn: borrowing WriteTransaction
    ) throws -> JSONObject? {
        if let (type, id) = write.existingResource { try refuseForeignWrite(type, id, txn) }
        switch write {
        case .create(let type, let validated):
            return try store(type, id: ctx.newID, new: validated, old: nil, event: EventURI.createFull, ctx, txn)
        case .replace(let type, let id, let body):
            let old = try existing(type, id, ctx, txn)
            let validator = ResourceValidator(registry: registry, type: type, profile: profile)
            let new = try validator.validateReplace(body, existing: old)
            return try store(type, id: id, new: new, old: old, event: EventURI.putFull, ctx, txn)
        case .patch(let type, let id, let request) where type.id == "Group":
            return try patchGroup(type, id: id, request, ctx, profile: profile, txn)
        case .patch(let type, let id, let request):
            let old = try existing(type, id, ctx, txn)
            let new = try request.apply(to: old)
            return try store(type, id: id, new: new, old: old, event: EventURI.patchFull, ctx, txn)
        case .delete(let type, let id):
            let old = try existing(type, id, ctx, txn)
            try remove(type, id: id, old: old, ctx, txn)
            return nil
        }
    }

    /// A group PATCH: operations on `members` change the members index (the
    /// few entries they name: O(k log n)), the others the stored group
    /// (without members: small whatever the group's size), validated as a
    /// replacement as `PatchRequest.apply` does. All in this transaction, so
    /// a failing operation changes nothing. Errors name the operation's
    /// index in the request.
    func patchGroup(
        _ type: ResourceType, id: String, _ request: PatchRequest, _ ctx: WriteContext, profile: ClientProfile,
        _ txn: borrowing WriteTransaction
    ) throws -> JSONObject {
        let old = try existing(type, id, ctx, txn)
        let (memberOps, otherOps) = try splitMemberOperations(request, profile: profile)
        for (k, op) in memberOps {
            do {
                try applyMemberOperation(op, request, groupID: id, profile: profile, txn)
            } catch let e as SCIMError {
                throw e.prefixed("Operations[\(k)]")
            }
        }
        var working = old
        for (k, op) in otherOps {
            do throws(SCIMError) {
                try request.applyUnvalidated(op, to: &working)
            } catch {
                throw error.prefixed("Operations[\(k)]")
            }
        }
        let new: JSONObject
        do throws(SCIMError) {
            new = try ResourceValidator(registry: registry, type: type, profile: profile).validateReplace(.object(working), existing: old)
        } catch {
            throw error.prefixed("after applying the operations")
        }
        return try store(type, id: id, new: new, old: old, event: EventURI.patchFull, ctx, txn, replacingMembers: false)
    }

    /// The stored resource, after checking `If-Match`.
    func existing(_ type: ResourceType, _ id: String, _ ctx: WriteContext, _ txn: borrowing WriteTransaction) throws -> JSONObject {
        guard let old = try load(txn, type, id) else { throw SCIMError.notFound("\(type.id) \(id) not found") }
        let version = old["meta"]?["version"]?.stringValue
        if ETag.evaluate(ifMatch: ctx.ifMatch, ifNoneMatch: nil, current: version, isRead: false) != .proceed {
            throw SCIMError(412, nil, "If-Match \(ctx.ifMatch ?? "") does not match the current version \(version ?? "-")")
        }
        return old
    }

    func nextCounter(_ name: String, _ txn: borrowing WriteTransaction) throws -> UInt64 {
        let key = Array(name.utf8)
        let next = (try txn.get(meta, key).flatMap(UInt64.init(bigEndianBytes:)) ?? 0) + 1
        try txn.put(meta, key, next.bigEndianBytes)
        return next
    }

    /// Adds `delta` to the stored count of `type` (`meta` `count/<type>`), in
    /// the transaction that adds or removes the resource.
    func adjustCount(_ type: ResourceType, by delta: Int64, _ txn: borrowing WriteTransaction) throws {
        let key = AgentStore.countKey(type)
        let current = Int64(try txn.get(meta, key).flatMap(UInt64.init(bigEndianBytes:)) ?? 0)
        try txn.put(meta, key, UInt64(max(0, current + delta)).bigEndianBytes)
    }

    /// Writes `new` (validated, without id and meta) as resource `id`. A
    /// group's `members` go to the members index, never into the stored
    /// group: `replacingMembers` (create, replace) makes `new`'s members the
    /// whole membership; otherwise (PATCH, a member's deletion) the caller
    /// has changed the index and `new` holds no members.
    func store(
        _ type: ResourceType, id: String, new given: JSONObject, old: JSONObject?, event: String,
        _ ctx: WriteContext, _ txn: borrowing WriteTransaction, replacingMembers: Bool = true
    ) throws -> JSONObject {
        // writeOnly values (`password`) are accepted and dropped: never stored, relayed or returned.
        var new = registry.removingWriteOnly(given, of: type)
        if type.id == "Group" {
            let members = new["members"]
            new["members"] = nil
            if old == nil, try removedGroups.value(Array(id.utf8), txn) != nil {
                // Back with the id of a group removed moments ago (a foreign group re-entering): what is
                // left of the old one's entries goes first, so that none is taken for the new one's.
                while try sweepRemovedGroup(id, limit: AgentStore.memberChunk, txn) == AgentStore.memberChunk {}
            }
            if replacingMembers {
                try replaceMembers(id, with: members?.arrayValue?.compactMap(\.objectValue) ?? [], txn)
            } else if members != nil {
                throw SCIMError.invalidPath("members can be changed only through the path 'members' or a path-less value naming it")
            }
        }
        // userName is unique per agent (RFC 7643 uniqueness: server), compared case-insensitively.
        if type.id == "User", let name = new["userName"]?.stringValue {
            let key = Array(name.lowercased().utf8)
            if let owner = try txn.get(userNames, key), String(decoding: owner, as: UTF8.self) != id {
                throw SCIMError.uniqueness("userName '\(name)' is already taken")
            }
            if let oldName = old?["userName"]?.stringValue, oldName.lowercased() != name.lowercased() {
                try txn.delete(userNames, Array(oldName.lowercased().utf8))
            }
            try txn.put(userNames, key, Array(id.utf8))
        }
        let oldExternal = old?["externalId"]?.stringValue, newExternal = new["externalId"]?.stringValue
        if oldExternal != newExternal {
            if let e = oldExternal { try txn.delete(externalIds, Array("\(type.id)/\(e)".utf8), value: Array(id.utf8)) }
            if let e = newExternal { try txn.put(externalIds, Array("\(type.id)/\(e)".utf8), Array(id.utf8)) }
        }
        let version = try nextCounter("version", txn)
        var stored = JSONObject()
        stored["schemas"] = new["schemas"]
        stored["id"] = .string(id)
        for (k, v) in new where k != "schemas" { stored[k] = v }
        // meta last: GET by id answers from these stored
        // bytes (`AgentStore.getForDefaultRead`).
        stored["meta"] = [
            "resourceType": .string(type.id),
            "created": old?["meta"]?["created"] ?? .string(ctx.now),
            "lastModified": .string(ctx.now),
            "version": .string(ETag.make(version: version)),
        ]
        try txn.put(resources, AgentStore.key(type, id), JSON.object(stored).serialized())
        // `old` is nil exactly when the resource is new (create): the only
        // writes that add a resource come through here.
        if old == nil { try adjustCount(type, by: 1, txn) }
        try updateAttributeIndex(type, id: id, old: old, new: stored, txn)
        // Before the relay's event takes the group's pending member marks.
        try queueForTargets(type, id: id, old: old, new: stored, ctx, txn)
        try emitChange(type, id: id, current: stored, kind: event, ctx, txn)
        return stored
    }

    /// Deletes a resource, its index entries and its memberships; groups that
    /// held it get a new version and an event of their own.
    func remove(
        _ type: ResourceType, id: String, old: JSONObject, _ ctx: WriteContext,
        _ txn: borrowing WriteTransaction
    ) throws {
        if try txn.delete(resources, AgentStore.key(type, id)) { try adjustCount(type, by: -1, txn) }
        try updateAttributeIndex(type, id: id, old: old, new: nil, txn)
        if let name = old["userName"]?.stringValue, type.id == "User" {
            try txn.delete(userNames, Array(name.lowercased().utf8))
        }
        if let e = old["externalId"]?.stringValue {
            try txn.delete(externalIds, Array("\(type.id)/\(e)".utf8), value: Array(id.utf8))
        }
        // A group's members leave the indexes after this write, a chunk a transaction (`removeMembersLater`).
        if type.id == "Group" { try removeMembersLater(id, txn) }
        // Each group holding it loses one index entry and gets a new
        // version; no group's other members are read (unless events are
        // recorded: the event carries the group's members, `emitChange`).
        let groups = registry.resourceType("Group")!
        for gid in try groupIDs(txn, of: id) {
            guard let old = try load(txn, groups, gid) else { continue }
            try deleteMember(gid, Array(id.utf8), txn)
            var group = old
            group["meta"] = nil
            group["id"] = nil
            _ = try store(groups, id: gid, new: group, old: old, event: EventURI.patchFull, ctx, txn, replacingMembers: false)
        }
        _ = try txn.delete(memberships, Array(id.utf8))
        try queueForTargets(type, id: id, old: old, new: nil, ctx, txn)
        try emitChange(type, id: id, current: nil, kind: EventURI.delete, ctx, txn)
    }

    /// Decides the relay event from what leaves now against what left last
    /// (a hash per resource): entering the boundary is a create, leaving it a
    /// delete, a change of what leaves is `kind`; a change that stays inside
    /// (a keep-local attribute, an out-of-scope resource) sends nothing.
    /// Groups list only members that have left the boundary, so a member
    /// entering or leaving it changes the groups that hold it too: entering,
    /// after its own event; leaving, before it (the broker names the member
    /// by its id while it still holds it). Groups: `emitGroupChange`.
    func emitChange(
        _ type: ResourceType, id: String, current: JSONObject?, kind: String,
        _ ctx: WriteContext, _ txn: borrowing WriteTransaction
    ) throws {
        // What entered from another domain never goes back up as this boundary's own.
        if try foreignDomain(type, id, txn) != nil {
            if type.id == "Group" { _ = try takePendingMembers(id, txn) }
            return
        }
        if type.id == "Group" { return try emitGroupChange(type, id: id, current: current, kind: kind, ctx, txn) }
        guard ctx.recordEvents else { return }
        let key = AgentStore.key(type, id)
        let previous = try txn.get(propagated, key)
        let outbound = current.flatMap { policy.outbound($0, type: type) }
        let digest = outbound.map(outboundDigest)
        switch (previous, digest) {
        case (nil, nil):
            return
        case (nil, let d?):
            try txn.put(propagated, key, d)
            try appendEvent(EventURI.createFull, type: type, id: id, data: outbound, ctx, txn)
            try memberCrossed(id, entering: true, ctx, txn)
        case (_?, nil):
            try txn.delete(propagated, key)
            try memberCrossed(id, entering: false, ctx, txn)
            try appendEvent(EventURI.delete, type: type, id: id, data: nil, ctx, txn)
        case (let p?, let d?):
            guard p != d else { return }
            try txn.put(propagated, key, d)
            try appendEvent(kind == EventURI.createFull ? EventURI.putFull : kind, type: type, id: id, data: outbound, ctx, txn)
        }
    }

    /// A member entered or left the boundary: each group holding it decides
    /// its event for that one member. Entering, it is sent again even if
    /// the broker was told of it before: it may not have held the member
    /// then (a create it refused, now retried) and dropped it, and adding
    /// is idempotent there.
    func memberCrossed(_ id: String, entering: Bool, _ ctx: WriteContext, _ txn: borrowing WriteTransaction) throws {
        let groups = registry.resourceType("Group")!
        for gid in try groupIDs(txn, of: id) {
            guard let group = try load(txn, groups, gid) else { continue }
            if entering { _ = try txn.delete(relayedMembers, AgentStore.memberKey(gid, id)) }
            try txn.put(pendingMembers, AgentStore.memberKey(gid, id), [])
            try emitChange(groups, id: gid, current: group, kind: EventURI.patchFull, ctx, txn)
        }
    }

    /// What is hashed of an outbound resource: all but `meta` (version and
    /// timestamps change on every write).
    func outboundDigest(_ outbound: JSONObject) -> [UInt8] {
        var content = outbound
        content["meta"] = nil
        return sha256(JSON.object(content).serialized())
    }

    /// Re-evaluates every stored resource against the current policy when the
    /// policy changed since the last run: events for whatever now leaves,
    /// stops leaving or leaves differently. Returns the events appended.
    @discardableResult
    public func reconcilePolicy(_ ctx: WriteContext) throws -> Int {
        let meta = self.meta, outbox = self.outbox, fingerprint = Array(policy.fingerprint.utf8)
        return try environment.write { txn in
            guard try txn.get(meta, Array("policy".utf8)) != fingerprint else { return 0 }
            let before = try txn.count(outbox)
            // Users first, so that groups see their members' new state.
            for type in registry.resourceTypes.sorted(by: { ($0.id == "User" ? 0 : 1) < ($1.id == "User" ? 0 : 1) }) {
                var ids: [String] = []
                try txn.scan(resources, from: Array("\(type.id)/".utf8), to: Array("\(type.id)0".utf8)) { k, _ in
                    ids.append(String(String(decoding: k, as: UTF8.self).dropFirst(type.id.count + 1)))
                    return true
                }
                for id in ids {
                    try emitChange(type, id: id, current: try load(txn, type, id), kind: EventURI.putFull, ctx, txn)
                    // A group's members are not in its hash: compared on their own.
                    if type.id == "Group", ctx.recordEvents, try foreignDomain(type, id, txn) == nil {
                        try reconcileGroupMembers(type, id: id, ctx, txn)
                    }
                }
            }
            try txn.put(meta, Array("policy".utf8), fingerprint)
            return try txn.count(outbox) - before
        }
    }

    /// The relay event (docs/protocol.md, relay protocol v1): full state, so
    /// applying it twice is harmless.
    func appendEvent(
        _ uri: String, type: ResourceType, id: String, data: JSONObject?, _ ctx: WriteContext,
        _ txn: borrowing WriteTransaction
    ) throws {
        var body: JSONObject = ["ref": .string("\(type.endpoint)/\(id)")]
        if let data {
            body["version"] = data["meta"]?["version"]
            body["data"] = .object(data)
        }
        try appendEvent(uri, body: body, ctx, txn)
    }

    /// Appends one event with `body` (`ref` and what the event carries) to the outbox.
    func appendEvent(_ uri: String, body: JSONObject, _ ctx: WriteContext, _ txn: borrowing WriteTransaction) throws {
        guard ctx.recordEvents else { return }
        let seq = try nextCounter("seq", txn)
        let event: JSON = [
            "seq": .number(JSONNumber(integer: Int64(seq))),
            "jti": .string("\(ctx.eventID)-\(seq)"),
            "txn": .string(ctx.traceID),
            "iat": .number(JSONNumber(integer: ctx.epochSeconds)),
            "ts": .number(JSONNumber(integer: ctx.epochMilliseconds)),
            "events": .object(JSONObject([(uri, .object(body))])),
        ]
        try txn.put(outbox, seq.bigEndianBytes, event.serialized(), flags: .append)
    }
}
