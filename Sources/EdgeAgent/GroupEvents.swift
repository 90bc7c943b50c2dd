import EdgeLoop
import EdgeStore
import EdgeTLS
import SCIM

/// A group's relay events. What leaves of a group is its attributes (hashed
/// in `propagated`, as for users, but without members) and its members that
/// have left the boundary themselves, kept in `relayedMembers` as the broker
/// was last told them. A group entering the boundary goes, with protocol
/// 2, with at most its first 1,000 members and the rest later as members
/// events, a chunk per transaction (`emitEnteringGroup`); a change of the
/// attributes goes as the attributes alone with protocol 3, else whole
/// (O(n)); a change of members only — the
/// PATCH of an IdP adding one person to "all staff", a member entering or
/// leaving the boundary — sends the members added and removed
/// (`prov:patch:members`, relay protocol 2: docs/protocol.md), O(k log n),
/// once the broker has said it speaks protocol 2. Before that (an older
/// broker, or none heard from yet since the store was made) the same change
/// goes as the whole group.
extension AgentStore {
    /// The members event of relay protocol 2 (`BrokerStore.membersEvent` at the broker).
    static let membersEvent = "urn:scim-edge:params:event:prov:patch:members"
    /// The attributes event of relay protocol 3 (`BrokerStore.attributesEvent`).
    static let attributesEvent = "urn:scim-edge:params:event:prov:patch:attributes"
    static let brokerProtocolKey = Array("brokerProtocol".utf8)
    /// The most members one members event carries: a larger change is sent
    /// as several events, in order, written in the same transaction.
    static let maxMembersPerEvent = 1000

    /// The relay protocol the broker last said it speaks (1 when it never said).
    public func brokerProtocol() throws -> Int {
        try environment.read { txn in try brokerProtocol(txn) }
    }

    func brokerProtocol(_ txn: borrowing some StoreReading & ~Copyable) throws -> Int {
        Int(try txn.get(meta, AgentStore.brokerProtocolKey).flatMap(UInt64.init(bigEndianBytes:)) ?? 1)
    }

    /// Records what the broker answered (the relay, when it changes).
    public func recordBrokerProtocol(_ version: Int, in txn: borrowing WriteTransaction) throws {
        try txn.put(meta, AgentStore.brokerProtocolKey, UInt64(max(1, version)).bigEndianBytes)
    }

    /// The member ids a write marked in `groupID` (and forgets the marks).
    func takePendingMembers(_ groupID: String, _ txn: borrowing WriteTransaction) throws -> [String] {
        let prefix = AgentStore.memberPrefix(groupID)
        var ids: [[UInt8]] = []
        try txn.scanKeys(pendingMembers, from: prefix, to: Array(groupID.utf8) + [1]) { k in
            ids.append(Array(k[prefix.count...]))
            return true
        }
        for id in ids { _ = try txn.delete(pendingMembers, prefix + id) }
        return ids.map { String(decoding: $0, as: UTF8.self) }
    }

    /// Whether member `id` (a user or a group) has left the boundary.
    func isPropagated(_ id: String, _ txn: borrowing some StoreReading & ~Copyable) throws -> Bool {
        let users = registry.resourceType("User")!, groups = registry.resourceType("Group")!
        return try txn.get(propagated, AgentStore.key(users, id)) != nil || txn.get(propagated, AgentStore.key(groups, id)) != nil
    }

    func emitGroupChange(
        _ type: ResourceType, id: String, current: JSONObject?, kind: String, _ ctx: WriteContext,
        _ txn: borrowing WriteTransaction
    ) throws {
        let pending = try takePendingMembers(id, txn)
        guard ctx.recordEvents else { return }
        let key = AgentStore.key(type, id)
        let previous = try txn.get(propagated, key)
        var attributes: JSONObject?
        var whole: JSONObject?  // the outbound group with its members, when it was needed already
        if let current {
            if policy.scopeReadsMembers(type) {
                // The scope decides on members: the whole group is needed to know whether it leaves.
                whole = try policy.outbound(withMembers(txn, current), type: type)
                attributes = whole.map {
                    var a = $0; a["members"] = nil; return a
                }
            } else {
                attributes = policy.outbound(current, type: type)
            }
        }
        let digest = attributes.map(outboundDigest)
        switch (previous, digest) {
        case (nil, nil):
            return
        case (nil, let d?):
            try txn.put(propagated, key, d)
            if whole == nil, let attributes, try brokerProtocol(txn) >= 2 {
                // Protocol 2: its first members with it, the rest as members events later.
                try emitEnteringGroup(type, id: id, current: current!, attributes: attributes, ctx, txn)
            } else {
                try emitWholeGroup(type, id: id, current: current!, outbound: whole, uri: EventURI.createFull, ctx, txn)
            }
            try memberCrossed(id, entering: true, ctx, txn)
        case (_?, nil):
            try txn.delete(propagated, key)
            try relaySends.remove(Array(id.utf8), txn)
            // A deleted group's are swept after it (`removeMembersLater`); one leaving the boundary forgets
            // what the broker was told of its members later too (`forgetRelayedLater`).
            if current != nil { try forgetRelayedLater(id, txn) }
            try memberCrossed(id, entering: false, ctx, txn)
            try appendEvent(EventURI.delete, type: type, id: id, data: nil, ctx, txn)
        case (let p?, let d?) where p != d:
            try txn.put(propagated, key, d)
            guard whole == nil, try brokerProtocol(txn) >= 3, let attributes else {
                try emitWholeGroup(
                    type, id: id, current: current!, outbound: whole, uri: kind == EventURI.createFull ? EventURI.putFull : kind, ctx, txn)
                return
            }
            // Protocol 3: the attributes alone (the broker keeps the members it
            // holds, which `relayedMembers` records), then what changed of the
            // members as deltas: renaming a group of a million costs O(1).
            try appendEvent(AgentStore.attributesEvent, type: type, id: id, data: attributes, ctx, txn)
            try emitMemberDeltas(type, id: id, current: current!, pending: pending, outbound: whole, ctx, txn)
        case (_?, _?):
            try emitMemberDeltas(type, id: id, current: current!, pending: pending, outbound: whole, ctx, txn)
        }
    }

    /// The members `pending` names that changed as the broker was told them
    /// (`relayedMembers`): sent as members events (protocol 2), or as the
    /// whole group to a broker that never said it speaks 2.
    func emitMemberDeltas(
        _ type: ResourceType, id: String, current: JSONObject, pending: [String], outbound whole: JSONObject?, _ ctx: WriteContext,
        _ txn: borrowing WriteTransaction
    ) throws {
        guard !pending.isEmpty else { return }
        // What the broker was told of the group is still being forgotten
        // before it is sent (`relaySendStep`): nothing to compare with yet,
        // and the sending that follows reads every member as it is then.
        if try relaySends.value(Array(id.utf8), txn)?.first == AgentStore.relaySendPurging { return }
        // Only members changed: those marked, each decided against what the broker was told.
        var subset = current
        subset["members"] = .array(try members(txn, of: id, ids: pending))
        let outbound = (whole ?? policy.outbound(subset, type: type))?["members"]?.arrayValue ?? []
        var byID: [String: JSON] = [:]
        for m in outbound { if let v = m["value"]?.stringValue { byID[v] = m } }
        var added: [JSON] = [], removed: [JSON] = []
        for m in pending.sorted() {
            let relayedKey = AgentStore.memberKey(id, m)
            let was = try txn.get(relayedMembers, relayedKey)
            if let member = byID[m], try isPropagated(m, txn) {
                let bytes = JSON.object(member.objectValue ?? [:]).serialized()
                guard was != bytes else { continue }
                added.append(member)
                try txn.put(relayedMembers, relayedKey, bytes)
            } else if was != nil {
                removed.append(.string(m))
                _ = try txn.delete(relayedMembers, relayedKey)
            }
        }
        guard !added.isEmpty || !removed.isEmpty else { return }
        if try brokerProtocol(txn) >= 2 {
            try appendMembersEvents(type, id: id, version: current["meta"]?["version"], added: added, removed: removed, ctx, txn)
        } else {
            try emitWholeGroup(type, id: id, current: current, outbound: whole, uri: EventURI.patchFull, ctx, txn)
        }
    }

    /// Members events (protocol 2) for `added` and `removed`, at most
    /// `maxMembersPerEvent` members an event: the broker applies an event
    /// in one transaction, whose size this bounds.
    func appendMembersEvents(
        _ type: ResourceType, id: String, version: JSON?, added: [JSON], removed: [JSON], _ ctx: WriteContext,
        _ txn: borrowing WriteTransaction
    ) throws {
        let changes = removed.map { (false, $0) } + added.map { (true, $0) }
        for start in stride(from: 0, to: changes.count, by: AgentStore.maxMembersPerEvent) {
            let part = changes[start..<min(changes.count, start + AgentStore.maxMembersPerEvent)]
            var body: JSONObject = ["ref": .string("\(type.endpoint)/\(id)")]
            body["version"] = version
            let adds = part.filter(\.0).map(\.1), removes = part.filter { !$0.0 }.map(\.1)
            if !adds.isEmpty || start == 0 { body["added"] = .array(adds) }
            if !removes.isEmpty || start == 0 { body["removed"] = .array(removes) }
            try appendEvent(AgentStore.membersEvent, body: body, ctx, txn)
        }
    }

    /// The whole group as it leaves (members that left the boundary only),
    /// and `relayedMembers` made to match it. O(n).
    func emitWholeGroup(
        _ type: ResourceType, id: String, current: JSONObject, outbound known: JSONObject?, uri: String, _ ctx: WriteContext,
        _ txn: borrowing WriteTransaction
    ) throws {
        guard var out = try known ?? policy.outbound(withMembers(txn, current), type: type) else { return }
        var members: [JSON] = []
        for m in out["members"]?.arrayValue ?? [] {
            guard let v = m["value"]?.stringValue, try isPropagated(v, txn) else { continue }
            members.append(m)
        }
        out["members"] = members.isEmpty ? nil : .array(members)
        try forgetRelayedMembers(id, txn)
        for m in members {
            try txn.put(relayedMembers, AgentStore.memberKey(id, m["value"]!.stringValue!), JSON.object(m.objectValue ?? [:]).serialized())
        }
        try appendEvent(uri, type: type, id: id, data: out, ctx, txn)
    }

    /// Empties `relayedMembers` of `groupID` now (the group is sent whole
    /// next, which is O(n) already), and with it any forgetting of them
    /// left for later (`forgetRelayedLater`), which must not then take the
    /// entries the whole group writes.
    func forgetRelayedMembers(_ groupID: String, _ txn: borrowing WriteTransaction) throws {
        let prefix = AgentStore.memberPrefix(groupID), end = Array(groupID.utf8) + [1]
        while try txn.deleteRange(relayedMembers, from: prefix, to: end, limit: AgentStore.memberChunk) == AgentStore.memberChunk {}
        try relayForgets.remove(Array(groupID.utf8), txn)
        try relaySends.remove(Array(groupID.utf8), txn)
    }

    // MARK: what the relay told the broker of a group that left, later

    /// Groups still stored that left the boundary, whose `relayedMembers`
    /// entries are still to be forgotten: `rforget/<group>` in `meta`.
    var relayForgets: DeferredWork { DeferredWork(meta, prefix: "rforget/") }

    /// A group left the boundary (its scope, a policy change): what the
    /// broker was told of its members goes later, a chunk per transaction
    /// (`forgetRelayedChunk`), so that the write or the policy change that
    /// takes it out is O(1) whatever its size. Nothing reads them
    /// meanwhile: member deltas are only decided for a group that leaves
    /// (`propagated`), and one that comes back ends this work: sent whole
    /// (protocol 1), which empties them first (`forgetRelayedMembers`), or
    /// sent a chunk at a time (`emitEnteringGroup`), which forgets them
    /// itself before it sends any member.
    func forgetRelayedLater(_ groupID: String, _ txn: borrowing WriteTransaction) throws {
        let prefix = AgentStore.memberPrefix(groupID), end = Array(groupID.utf8) + [1]
        guard try txn.holdsAny(relayedMembers, from: prefix, to: end) else { return }
        try relayForgets.add(Array(groupID.utf8), [], txn)
    }

    /// Up to `limit` of the entries left of `groupID`; the work is done
    /// when fewer went. Returns how many went.
    func forgetRelayedChunk(_ groupID: String, limit: Int, _ txn: borrowing WriteTransaction) throws -> Int {
        let prefix = AgentStore.memberPrefix(groupID), end = Array(groupID.utf8) + [1]
        let n = try txn.deleteRange(relayedMembers, from: prefix, to: end, limit: limit)
        if n < limit { try relayForgets.remove(Array(groupID.utf8), txn) }
        return n
    }

    /// Groups that left the boundary whose relay records are still being forgotten.
    public func relayForgetsPending() throws -> Int {
        let forgets = relayForgets
        return try environment.read { txn in try forgets.count(txn) }
    }
}

extension AgentStore {
    /// A group event the broker refused for good: what the agent believed
    /// the broker holds of the group (its hash and its members) is
    /// forgotten, so that the group's next change goes in full (a create the
    /// broker may take) rather than as a delta against state it never had.
    func forgetRefusedGroup(_ event: [UInt8], _ txn: borrowing WriteTransaction) throws {
        guard let (_, body) = try JSONParser.parse(event, limits: .stored)["events"]?.objectValue?.members.first,
            let ref = body["ref"]?.stringValue, ref.hasPrefix("/Groups/")
        else { return }
        let id = String(ref.dropFirst("/Groups/".count))
        _ = try txn.delete(propagated, AgentStore.key(registry.resourceType("Group")!, id))
        try forgetRelayedMembers(id, txn)
    }

    /// After a policy change (`reconcilePolicy`): a group whose attributes
    /// leave as before may still list its members otherwise (a rule on
    /// `members` or its sub-attributes, a member now kept local): compared
    /// with what the broker was told, and sent in full when they differ. O(n).
    func reconcileGroupMembers(_ type: ResourceType, id: String, _ ctx: WriteContext, _ txn: borrowing WriteTransaction) throws {
        guard try txn.get(propagated, AgentStore.key(type, id)) != nil else { return }
        if let value = try relaySends.value(Array(id.utf8), txn) {
            // Still being sent a chunk at a time, under another policy: the
            // sending starts over under this one, comparing each member with
            // what the broker was told and sending what differs. O(1) here.
            if var work = RelaySend.decode(value), work.policy != policy.fingerprint {
                work.policy = policy.fingerprint
                if !work.purging { work.after = [] }
                try relaySends.add(Array(id.utf8), work.encoded, txn)
            }
            return
        }
        guard let current = try load(txn, type, id), let out = try policy.outbound(withMembers(txn, current), type: type) else {
            return
        }
        var want: [[UInt8]: [UInt8]] = [:]
        for m in out["members"]?.arrayValue ?? [] {
            guard let v = m["value"]?.stringValue, try isPropagated(v, txn) else { continue }
            want[AgentStore.memberKey(id, v)] = JSON.object(m.objectValue ?? [:]).serialized()
        }
        var same = true
        try txn.scan(relayedMembers, from: AgentStore.memberPrefix(id), to: Array(id.utf8) + [1]) { k, v in
            if want.removeValue(forKey: k) != v { same = false }
            return same
        }
        if same && want.isEmpty { return }
        try emitWholeGroup(type, id: id, current: current, outbound: nil, uri: EventURI.putFull, ctx, txn)
    }
}

/// Where the sending of a group that entered the boundary stands
/// (`rsend/<group>` in `meta`): forgetting what the broker was told of it
/// before (`purging`), or sending its members after `after` (a member id;
/// empty: from the first). With the trace and acceptance time of the write
/// that made it enter, which its events carry, and the fingerprint of the
/// policy it is sent under (a policy change starts the sending over).
struct RelaySend {
    var purging: Bool
    var acceptedAt: Int64
    var trace: String
    var policy: String
    var after: [UInt8]

    var encoded: [UInt8] {
        let t = Array(trace.utf8.prefix(255)), p = Array(policy.utf8.prefix(255))
        return [purging ? AgentStore.relaySendPurging : AgentStore.relaySendSyncing] + UInt64(bitPattern: acceptedAt).bigEndianBytes
            + [UInt8(t.count)] + t + [UInt8(p.count)] + p + after
    }

    static func decode(_ v: [UInt8]) -> RelaySend? {
        guard v.count >= 11, let ms = UInt64(bigEndianBytes: Array(v[1..<9])) else { return nil }
        let t = Int(v[9])
        guard v.count >= 11 + t else { return nil }
        let p = Int(v[10 + t])
        guard v.count >= 11 + t + p else { return nil }
        return RelaySend(
            purging: v[0] == AgentStore.relaySendPurging, acceptedAt: Int64(bitPattern: ms),
            trace: String(decoding: v[10..<10 + t], as: UTF8.self), policy: String(decoding: v[(11 + t)..<(11 + t + p)], as: UTF8.self),
            after: Array(v[(11 + t + p)...]))
    }
}

// MARK: a group entering the boundary, a chunk per transaction

extension AgentStore {
    static let relaySendPurging: UInt8 = 0
    static let relaySendSyncing: UInt8 = 1

    /// Groups that entered the boundary whose members are still being sent
    /// (relay protocol 2): `rsend/<group>` in `meta`, a `RelaySend`.
    var relaySends: DeferredWork { DeferredWork(meta, prefix: "rsend/") }

    /// A group entering the boundary with a broker that speaks protocol 2
    /// (a policy change, a write that brings it into the scope, its
    /// creation): full state with at most its first `maxMembersPerEvent`
    /// members, the rest sent later as members events, a chunk per
    /// transaction (`relaySendStep`), so the transaction, the event and the
    /// broker's apply stay bounded whatever its size. `relayedMembers`
    /// holds exactly what the broker was told throughout: the changes an
    /// IdP makes meanwhile go as deltas against it (a member not sent yet
    /// and removed is never sent; one added is sent once, and the chunk
    /// that reaches it finds it told). What the broker was told of the
    /// group before (it left the boundary, or an event of it was refused,
    /// and those records are not all forgotten yet) is forgotten first, a
    /// chunk a transaction, and the group then goes without members.
    func emitEnteringGroup(
        _ type: ResourceType, id: String, current: JSONObject, attributes: JSONObject, _ ctx: WriteContext,
        _ txn: borrowing WriteTransaction
    ) throws {
        let name = Array(id.utf8), prefix = AgentStore.memberPrefix(id), end = Array(id.utf8) + [1]
        var work = RelaySend(
            purging: false, acceptedAt: ctx.epochMilliseconds, trace: ctx.traceID, policy: policy.fingerprint, after: [])
        // This work forgets them itself (the two never run at once for a group).
        try relayForgets.remove(name, txn)
        var out = attributes
        out["members"] = nil
        if try txn.holdsAny(relayedMembers, from: prefix, to: end) {
            work.purging = true
            try relaySends.add(name, work.encoded, txn)
            newDeferredWork.store(true, ordering: .relaxed)
        } else {
            let (added, _, next) = try syncRelayedMembers(
                type, id: id, current: current, after: [], limit: AgentStore.maxMembersPerEvent, txn)
            if !added.isEmpty { out["members"] = .array(added) }
            if let next {
                work.after = next
                try relaySends.add(name, work.encoded, txn)
                newDeferredWork.store(true, ordering: .relaxed)
            } else {
                try relaySends.remove(name, txn)
            }
        }
        try appendEvent(EventURI.createFull, type: type, id: id, data: out, ctx, txn)
    }

    /// Makes `relayedMembers` of `groupID` match its outbound members for
    /// the next member ids after `after` (empty: from the first): at most
    /// `limit` of its members and `limit` of those records. Returns what
    /// changed (the members to add, the ids to remove) and the last member
    /// id covered, nil when the rest of the group was covered.
    func syncRelayedMembers(
        _ type: ResourceType, id: String, current: JSONObject, after: [UInt8], limit: Int, _ txn: borrowing WriteTransaction
    ) throws -> (added: [JSON], removed: [JSON], next: [UInt8]?) {
        let prefix = AgentStore.memberPrefix(id), end = Array(id.utf8) + [1]
        let from = after.isEmpty ? prefix : prefix + after + [0]
        var stored: [(id: [UInt8], value: [UInt8])] = [], told: [(id: [UInt8], value: [UInt8])] = []
        try txn.scan(groupMembers, from: from, to: end) { k, v in
            stored.append((Array(k[prefix.count...]), v))
            return stored.count < limit
        }
        try txn.scan(relayedMembers, from: from, to: end) { k, v in
            told.append((Array(k[prefix.count...]), v))
            return told.count < limit
        }
        // Covered: through the last of a list that may go on (the smaller), or everything.
        var through: [UInt8]?
        if stored.count == limit { through = stored[stored.count - 1].id }
        if told.count == limit, through.map({ told[told.count - 1].id.lexicographicallyPrecedes($0) }) ?? true {
            through = told[told.count - 1].id
        }
        if let through {
            stored.removeAll { through.lexicographicallyPrecedes($0.id) }
            told.removeAll { through.lexicographicallyPrecedes($0.id) }
        }
        var subset = current
        subset["members"] = .array(try stored.map { try JSONParser.parse($0.value, limits: .stored) })
        var want: [[UInt8]: [UInt8]] = [:], order: [[UInt8]] = []
        for m in policy.outbound(subset, type: type)?["members"]?.arrayValue ?? [] {
            guard let v = m["value"]?.stringValue, try isPropagated(v, txn) else { continue }
            want[Array(v.utf8)] = JSON.object(m.objectValue ?? [:]).serialized()
            order.append(Array(v.utf8))
        }
        var removed: [JSON] = [], added: [JSON] = []
        for t in told where want[t.id] == nil {
            removed.append(.string(String(decoding: t.id, as: UTF8.self)))
            _ = try txn.delete(relayedMembers, prefix + t.id)
        }
        var toldValues: [[UInt8]: [UInt8]] = [:]
        for t in told { toldValues[t.id] = t.value }
        for m in order.sorted(by: { $0.lexicographicallyPrecedes($1) }) where toldValues[m] != want[m] {
            added.append(try JSONParser.parse(want[m]!, limits: .stored))
            try txn.put(relayedMembers, prefix + m, want[m]!)
        }
        return (added, removed, through)
    }

    /// One chunk of the sending of group `groupID` (`emitEnteringGroup`):
    /// forgets up to `limit` of what the broker was told before, or sends
    /// the next members as members events. Ends the work when the group
    /// is sent, no longer leaves, or is gone (its leaving or removal ended
    /// it already). Returns how many records or members it handled (at
    /// least 1).
    func relaySendStep(_ groupID: String, _ value: [UInt8], limit: Int, _ txn: borrowing WriteTransaction) throws -> Int {
        let name = Array(groupID.utf8), groups = registry.resourceType("Group")!
        guard var work = RelaySend.decode(value), try txn.get(propagated, AgentStore.key(groups, groupID)) != nil,
            let current = try load(txn, groups, groupID)
        else {
            try relaySends.remove(name, txn)
            return 1
        }
        let ts = unixTimespec()
        var ctx = WriteContext(
            newID: "", now: "", epochSeconds: Int64(ts.tv_sec), eventID: hexString(secureRandomBytes(8)), traceID: work.trace)
        ctx.epochMilliseconds = work.acceptedAt
        if work.purging {
            let prefix = AgentStore.memberPrefix(groupID), end = Array(groupID.utf8) + [1]
            let n = try txn.deleteRange(relayedMembers, from: prefix, to: end, limit: limit)
            if n < limit {
                work.purging = false
                work.after = []
                try relaySends.add(name, work.encoded, txn)
            }
            return max(1, n)
        }
        guard try brokerProtocol(txn) >= 2 else {
            // A broker downgraded meanwhile: the whole group, as protocol 1 has it (this ends the work).
            try emitWholeGroup(groups, id: groupID, current: current, outbound: nil, uri: EventURI.putFull, ctx, txn)
            return 1
        }
        let (added, removed, next) = try syncRelayedMembers(groups, id: groupID, current: current, after: work.after, limit: limit, txn)
        if !added.isEmpty || !removed.isEmpty {
            try appendMembersEvents(groups, id: groupID, version: current["meta"]?["version"], added: added, removed: removed, ctx, txn)
        }
        if let next {
            work.after = next
            try relaySends.add(name, work.encoded, txn)
        } else {
            try relaySends.remove(name, txn)
        }
        return max(1, added.count + removed.count)
    }

    /// Groups that entered the boundary whose members are still being sent.
    public func relaySendsPending() throws -> Int {
        let sends = relaySends
        return try environment.read { txn in try sends.count(txn) }
    }
}
