import EdgeLoop
import EdgeStore
import SCIM

/// What each target holds of each group's members, as an index, and which
/// members changed since the group was last delivered there: a membership
/// change reaches a target in O(k log n), whatever the group's size.
///
/// | database | key | value |
/// |---|---|---|
/// | `targetMembers` | `<target> 0x00 <group> 0x00 <member>` | the member's id at the target, as the target holds it |
/// | `targetMemberOf` | `<target> 0x00 <member>` (duplicates) | group broker id |
/// | `targetPending` | `<target> 0x00 <group> 0x00 <member>` | the queue sequence (BE) of the change that touched it |
///
/// The apply marks a member pending at every target the group goes to,
/// in the transaction that changes it, and queues the group there as
/// before; the group's delivery reads the pending members only, compares
/// each with the directory and with what the target holds, and sends the
/// difference. A pending entry is removed only when its member's state was
/// sent (or was found the same), and only if no later change marked it
/// again (its sequence is unchanged): a change is never skipped.
///
/// A group mapping with `members` (a count) is delivered this way; one
/// without (a target without PATCH, or a store from before) keeps the
/// members in `sent`, and its next delivery compares whole groups, then
/// moves what the target holds into the index (`GroupIndexing.rebuild`).
package extension DeliveryTables {
    static func targetGroupPrefix(_ target: String, _ group: String) -> [UInt8] {
        Array(target.utf8) + [0] + Array(group.utf8) + [0]
    }
    static func targetMemberKey(_ target: String, _ group: String, _ member: String) -> [UInt8] {
        targetGroupPrefix(target, group) + Array(member.utf8)
    }
    static func targetGroupEnd(_ target: String, _ group: String) -> [UInt8] { Array(target.utf8) + [0] + Array(group.utf8) + [1] }

    /// Marks `members` of `group` pending at `target`, by the queue item `seq`.
    func markMembersPending(target: String, group: String, _ members: some Sequence<String>, seq: UInt64, _ txn: borrowing WriteTransaction)
        throws
    {
        let value = seq.bigEndianBytes
        for m in members { try txn.put(targetPending, Self.targetMemberKey(target, group, m), value) }
    }

    /// Up to `limit` pending members of `group` at `target`, after `cursor`
    /// (a member id; nil: the first), each with what the target should hold
    /// and holds. `routes` says whether a member without a mapping there is
    /// routed to it (then it waits). The last member read is the next cursor.
    func pendingMemberChanges(
        target: String, group: String, after cursor: String?, limit: Int,
        routes: (_ domain: String, _ type: String, _ resource: JSONObject) -> Bool
    ) throws -> [MemberChange] {
        try environment.read { txn in
            try pendingMemberChanges(target: target, group: group, after: cursor, limit: limit, routes: routes, txn)
        }
    }

    /// The same in `txn` (the downlink reads them in the transaction that records them).
    func pendingMemberChanges(
        target: String, group: String, after cursor: String?, limit: Int,
        routes: (_ domain: String, _ type: String, _ resource: JSONObject) -> Bool, _ txn: borrowing some StoreReading & ~Copyable
    ) throws -> [MemberChange] {
        let prefix = Self.targetGroupPrefix(target, group)
        var marks: [(String, [UInt8])] = []
        try txn.scan(
            targetPending, from: cursor.map { prefix + Array($0.utf8) + [0] } ?? prefix,
            to: Self.targetGroupEnd(target, group)
        ) { k, v in
            marks.append((String(decoding: k[prefix.count...], as: UTF8.self), v))
            return marks.count < limit
        }
        var out: [MemberChange] = []
        for (member, mark) in marks {
            let entry = try groupMemberEntry(group: group, member: member, txn)
            let held = try txn.get(targetMembers, Self.targetMemberKey(target, group, member)).map {
                String(decoding: $0, as: UTF8.self)
            }
            var want: String?, waiting = false
            if entry != nil {
                want = try txn.get(targetIds, prefixed(target, member)).flatMap(TargetMapping.init)?.targetID
                if want == nil, let e = try deliveryEntry(member, members: false, txn) {
                    waiting = routes(e.domain, e.type, e.resource)
                }
            }
            out.append(MemberChange(member: member, mark: mark, want: want, held: held, entry: entry, waiting: waiting))
        }
        return out
    }

    /// Records one step of a group's delivery: the members the target now
    /// holds (`added`: member → its id there) and no longer holds, the
    /// pending entries done (removed when unchanged), and the group's
    /// mapping (its count updated by what really changed). Returns the mapping.
    func recordMemberStep(
        target: String, group: String, added: [(member: String, targetID: String)], removed: [String],
        done: [(member: String, mark: [UInt8])], mapping: TargetMapping, _ txn: borrowing WriteTransaction
    ) throws -> TargetMapping {
        var count = try txn.get(targetIds, prefixed(target, group)).flatMap(TargetMapping.init)?.members ?? mapping.members ?? 0
        // Removals first: a member whose account there changed is removed under the old id and added under the new.
        for m in removed where try dropMember(target: target, group: group, member: m, txn) { count -= 1 }
        for (m, tid) in added where try holdMember(target: target, group: group, member: m, targetID: tid, txn) { count += 1 }
        for (m, mark) in done {
            let key = Self.targetMemberKey(target, group, m)
            if try txn.get(targetPending, key) == mark { _ = try txn.delete(targetPending, key) }
        }
        var m = mapping
        m.members = max(0, count)
        try txn.put(targetIds, prefixed(target, group), m.json.serialized())
        return m
    }

    /// Returns whether the member is new in the group's index at the target.
    func holdMember(target: String, group: String, member: String, targetID: String, _ txn: borrowing WriteTransaction) throws -> Bool {
        let key = Self.targetMemberKey(target, group, member)
        let had = try txn.get(targetMembers, key)
        try txn.put(targetMembers, key, Array(targetID.utf8))
        if had == nil { try txn.put(targetMemberOf, prefixed(target, member), Array(group.utf8)) }
        return had == nil
    }

    /// Returns whether the member was in the group's index at the target.
    func dropMember(target: String, group: String, member: String, _ txn: borrowing WriteTransaction) throws -> Bool {
        guard try txn.delete(targetMembers, Self.targetMemberKey(target, group, member)) else { return false }
        _ = try txn.delete(targetMemberOf, prefixed(target, member), value: Array(group.utf8))
        return true
    }

    /// The groups whose index at `target` holds `member` (not those the
    /// target no longer has, whose index is being swept).
    func heldGroups(target: String, member: String, _ txn: borrowing some StoreReading & ~Copyable) throws -> [String] {
        try txn.duplicateValues(targetMemberOf, prefixed(target, member)).filter { try txn.get(targetIds, prefixed(target, $0)) != nil }
    }

    /// Forgets what `target` holds of `group`'s members, and its pending
    /// marks through `through` (all: nil), in this transaction: O(n). Only
    /// where the index is recorded anew at once (`completeGroupMapping`);
    /// a group leaving a target forgets it later (`clearGroupIndexLater`).
    func clearGroupIndex(target: String, group: String, pendingThrough through: UInt64?, _ txn: borrowing WriteTransaction) throws {
        let prefix = Self.targetGroupPrefix(target, group), end = Self.targetGroupEnd(target, group)
        var held: [String] = []
        try txn.scanKeys(targetMembers, from: prefix, to: end) { k in
            held.append(String(decoding: k[prefix.count...], as: UTF8.self))
            return true
        }
        for m in held { _ = try dropMember(target: target, group: group, member: m, txn) }
        var marks: [[UInt8]] = []
        try txn.scan(targetPending, from: prefix, to: end) { k, v in
            if through.map({ (UInt64(bigEndianBytes: v) ?? 0) <= $0 }) ?? true { marks.append(k) }
            return true
        }
        for k in marks { _ = try txn.delete(targetPending, k) }
    }

    /// A group's mapping as its delivery ends (`completeDelivery`): the
    /// index made to match `indexing`, pending marks through `through`
    /// (the last queue item the delivery covered) cleared after a whole-
    /// group delivery. Returns the mapping to record.
    func completeGroupMapping(
        target: String, group: String, _ mapping: TargetMapping, indexing: GroupIndexing, through: UInt64,
        _ txn: borrowing WriteTransaction
    ) throws -> TargetMapping {
        let m = try indexedGroupMapping(target: target, group: group, mapping, indexing: indexing, through: through, txn)
        if m.growFrom != nil, m.members != nil {
            // Created with its first members: the rest follow from the index, in the delivery queued here.
            try enqueue(
                target: target,
                DeliveryItem(brokerID: group, type: "Group", operation: .upsert, trace: "", queuedAt: unixMilliseconds(), acceptedAt: 0),
                txn)
        }
        return m
    }

    private func indexedGroupMapping(
        target: String, group: String, _ mapping: TargetMapping, indexing: GroupIndexing, through: UInt64,
        _ txn: borrowing WriteTransaction
    ) throws -> TargetMapping {
        var m = mapping
        switch indexing {
        case .keep(let done):
            m.members = try txn.get(targetIds, prefixed(target, group)).flatMap(TargetMapping.init)?.members ?? mapping.members ?? 0
            for (member, mark) in done {
                let key = Self.targetMemberKey(target, group, member)
                if try txn.get(targetPending, key) == mark { _ = try txn.delete(targetPending, key) }
            }
        case .rebuild, .none:
            try clearGroupIndex(target: target, group: group, pendingThrough: through, txn)
            guard case .rebuild = indexing, var sent = m.sent else {
                m.members = nil
                return m
            }
            var count = 0
            for member in sent["members"]?.arrayValue ?? [] {
                // A member the broker did not send (the target's own) is not ours to track.
                guard let tid = member["value"]?.stringValue,
                    let owner = try txn.get(targetOwners, ownerKey(target, "User", tid)).map({ String(decoding: $0, as: UTF8.self) })
                else { continue }
                if try holdMember(target: target, group: group, member: owner, targetID: tid, txn) { count += 1 }
            }
            sent["members"] = nil
            m.sent = sent
            m.members = count
        }
        return m
    }

    /// A user's account at `target` changed from `old` to `new`: the groups
    /// that hold it there, or should, are queued with the user marked
    /// pending (a user that arrives after its group joins it; one whose
    /// account was replaced is swapped). An account deleted at the target
    /// left its groups there with it: their index forgets it. Returns how
    /// many items were queued.
    func userAccountChanged(
        target: String, user: String, old: TargetMapping?, new: TargetMapping?, trace: String, _ txn: borrowing WriteTransaction
    ) throws -> Int {
        guard old?.targetID != new?.targetID else { return 0 }
        guard new != nil else {
            for g in try heldGroups(target: target, member: user, txn) {
                guard try dropMember(target: target, group: g, member: user, txn),
                    var gm = try txn.get(targetIds, prefixed(target, g)).flatMap(TargetMapping.init), let n = gm.members
                else { continue }
                gm.members = max(0, n - 1)
                try txn.put(targetIds, prefixed(target, g), gm.json.serialized())
            }
            return 0
        }
        var queued = 0
        let config = targets.first { $0.name == target }
        for g in Set(try groupsHolding(user, txn) + heldGroups(target: target, member: user, txn)).sorted() {
            // Every group there or on its way there: one whose first whole delivery is in flight read its
            // members before this account existed, and its next delivery (from the index) adds the user.
            if try txn.get(targetIds, prefixed(target, g)) == nil {
                guard let config, let e = try deliveryEntry(g, members: config.groupRoutesReadMembers, txn),
                    config.routes(domain: e.domain, type: "Group", e.resource)
                else { continue }
            }
            let seq = try enqueue(
                target: target,
                DeliveryItem(
                    brokerID: g, type: "Group", operation: .upsert, trace: trace, queuedAt: unixMilliseconds(), acceptedAt: 0), txn)
            try markMembersPending(target: target, group: g, [user], seq: seq, txn)
            queued += 1
        }
        return queued
    }
}

package extension DeliveryTables {
    /// A user deleted at its source left `groups`: at a target that keeps
    /// removed users as inactive accounts, the groups holding it there are
    /// queued with the user marked, so that it leaves them. (A target that
    /// deletes the account drops its memberships with it.)
    func memberLeft(_ member: String, groups: [String], trace: String, acceptedAt: Int64, _ txn: borrowing WriteTransaction) throws
        -> [String]
    {
        var queued: [String] = []
        for target in targets where target.removal == .deactivate {
            for g in groups where try txn.get(targetMembers, Self.targetMemberKey(target.name, g, member)) != nil {
                let seq = try enqueue(
                    target: target.name,
                    DeliveryItem(
                        brokerID: g, type: "Group", operation: .upsert, trace: trace, queuedAt: unixMilliseconds(),
                        acceptedAt: acceptedAt), txn)
                try markMembersPending(target: target.name, group: g, [member], seq: seq, txn)
                queued.append(target.name)
            }
        }
        return queued
    }
}

/// How many member ids one snapshot of `forEachMemberID` reads.
package let deliveryMemberChunk = 4096

package extension DeliveryTables {
    /// The broker ids of `group`'s members, a chunk at a time, each chunk
    /// read in a snapshot of its own (reconcile: memory holds a chunk).
    func forEachMemberID(of group: String, _ body: ([String]) throws -> Void) throws {
        var cursor: String?
        while true {
            let ids: [String] = try environment.read { txn in try groupMemberIDs(group, after: cursor, limit: deliveryMemberChunk, txn) }
            try body(ids)
            guard ids.count == deliveryMemberChunk else { return }
            cursor = ids[ids.count - 1]
        }
    }

    /// Reconcile found `group`'s members at `target` other than the index
    /// says: `missing` (members the target lacks) and `extra` (members it
    /// holds that it should not, with their ids there). The index is set to
    /// what the target holds and those members are marked, with the group
    /// queued: its delivery sends just those (`groupDelta`).
    func repairGroupMembers(
        target: String, group: String, missing: [String], extra: [(member: String, targetID: String)], trace: String
    ) throws {
        try environment.write { txn in
            var count = 0
            for m in missing where try dropMember(target: target, group: group, member: m, txn) { count -= 1 }
            for (m, tid) in extra where try holdMember(target: target, group: group, member: m, targetID: tid, txn) { count += 1 }
            if var gm = try txn.get(targetIds, prefixed(target, group)).flatMap(TargetMapping.init), let n = gm.members {
                gm.members = max(0, n + count)
                try txn.put(targetIds, prefixed(target, group), gm.json.serialized())
            }
            let seq = try enqueue(
                target: target,
                DeliveryItem(brokerID: group, type: "Group", operation: .upsert, trace: trace, queuedAt: unixMilliseconds(), acceptedAt: 0),
                txn)
            try markMembersPending(target: target, group: group, missing + extra.map(\.member), seq: seq, txn)
        }
    }
}

package extension DeliveryTables {
    /// What `target` holds of `group`'s members (their ids there), from the
    /// index: a group delivered from it, now compared whole (its target took
    /// `collisions: link` or member-reading routes, or lost PATCH), diffs
    /// against what the target really holds. O(n).
    func heldMembers(target: String, group: String) throws -> [JSON] {
        let targetMembers = self.targetMembers
        return try environment.read { txn in
            var out: [JSON] = []
            try txn.scan(targetMembers, from: Self.targetGroupPrefix(target, group), to: Self.targetGroupEnd(target, group)) {
                _, v in
                out.append(["value": .string(String(decoding: v, as: UTF8.self))])
                return true
            }
            return out
        }
    }

    /// Up to `limit` of the ids `target` holds for `group`'s members: a
    /// sample that a complete member list in an answer must contain.
    func heldSample(target: String, group: String, limit: Int) throws -> [String] {
        let targetMembers = self.targetMembers
        return try environment.read { txn in
            var out: [String] = []
            try txn.scan(targetMembers, from: Self.targetGroupPrefix(target, group), to: Self.targetGroupEnd(target, group)) {
                _, v in
                out.append(String(decoding: v, as: UTF8.self))
                return out.count < limit
            }
            return out
        }
    }
}

package extension DeliveryTables {
    /// The next members of `group` to add at `target` while it is grown
    /// (`TargetMapping.growFrom`): up to `limit` members of the directory's
    /// group after `cursor` ("": from the first), those with an account
    /// there that the target does not hold yet, and the last member read
    /// (nil: none left). Members without an account there join when their
    /// account appears (`userAccountChanged`).
    func growChunk(target: String, group: String, after cursor: String, limit: Int) throws -> (
        adds: [(member: String, targetID: String)], last: String?
    ) {
        try environment.read { txn in try growChunk(target: target, group: group, after: cursor, limit: limit, txn) }
    }

    /// The same in `txn` (the downlink grows a group in the poll's transaction).
    func growChunk(target: String, group: String, after cursor: String, limit: Int, _ txn: borrowing some StoreReading & ~Copyable)
        throws -> (adds: [(member: String, targetID: String)], last: String?)
    {
        let ids = try groupMemberIDs(group, after: cursor.isEmpty ? nil : cursor, limit: limit, txn)
        var adds: [(member: String, targetID: String)] = []
        for id in ids {
            guard let tid = try txn.get(targetIds, prefixed(target, id)).flatMap(TargetMapping.init)?.targetID else { continue }
            if try txn.get(targetMembers, Self.targetMemberKey(target, group, id)).map({ String(decoding: $0, as: UTF8.self) }) != tid {
                adds.append((id, tid))
            }
        }
        return (adds, ids.count == limit ? ids.last : nil)
    }
}

/// A member's change as a group's delivery sees it: what the target
/// should hold and what it holds.
package struct MemberChange: Sendable {
    package var member: String
    /// The pending entry's value when read (removed only if unchanged).
    package var mark: [UInt8]
    /// The member's id at the target, if the target should hold it now.
    package var want: String?
    /// The id the target holds for it, if any.
    package var held: String?
    /// The member as the directory holds it (`type`), when wanted.
    package var entry: JSONObject?
    /// Routed to the target but not there yet: stays pending (its
    /// delivery marks it again when it arrives).
    package var waiting: Bool
}

/// How a group delivery's completion treats the target's member index.
package enum GroupIndexing: Sendable {
    /// The mapping's `sent` lists every member the target holds (a whole
    /// group was sent): they move into the index, `sent` keeps the rest.
    case rebuild
    /// Delivered from the index: it is current; the stored count stands,
    /// and `done`'s pending marks are cleared (when unchanged).
    case keep(done: [(member: String, mark: [UInt8])])
    /// The target takes no PATCH: members stay in `sent`, the index goes.
    case none
}

/// A target's group index after a transition, later: the index of a group
/// the target no longer has is forgotten (`clearGroupIndexLater`), and
/// every member of a group back in its routes is compared
/// (`compareWholeGroupLater`), each a chunk per write transaction in the
/// background (`deferredDeliveryStep`), so that the transaction that
/// acknowledges the change stays O(1) whatever the group's size. Kept in
/// `targetState`: `gsweep/<target>\0<group>` (empty) and
/// `grescan/<target>\0<group>` (a phase byte, 0: the directory's members,
/// 1: those the target holds, then the last member marked).
package extension DeliveryTables {
    var groupIndexSweeps: DeferredWork { DeferredWork(targetState, prefix: "gsweep/") }
    var groupRescans: DeferredWork { DeferredWork(targetState, prefix: "grescan/") }

    static func workName(_ target: String, _ group: String) -> [UInt8] { Array(target.utf8) + [0] + Array(group.utf8) }
    static func splitWorkName(_ name: [UInt8]) -> (target: String, group: String)? {
        guard let zero = name.firstIndex(of: 0) else { return nil }
        return (String(decoding: name[..<zero], as: UTF8.self), String(decoding: name[(zero + 1)...], as: UTF8.self))
    }

    /// `group` left `target` (its mapping is gone, in this transaction):
    /// what the target held of its members and their pending marks are
    /// forgotten later, a chunk a transaction. O(1) here. Readers skip them
    /// meanwhile (`heldGroups` wants a mapping; the others read a group's
    /// index only through its mapping), and the group's next mapping there
    /// is made only once its old index is gone (`groupIndexSweepPending`).
    func clearGroupIndexLater(target: String, group: String, _ txn: borrowing WriteTransaction) throws {
        let name = Self.workName(target, group)
        try groupRescans.remove(name, txn)
        let prefix = Self.targetGroupPrefix(target, group), end = Self.targetGroupEnd(target, group)
        if try txn.holdsAny(targetMembers, from: prefix, to: end) || txn.holdsAny(targetPending, from: prefix, to: end) {
            try groupIndexSweeps.add(name, [], txn)
        }
    }

    /// Whether the index of a group that left `target` is still being forgotten.
    func groupIndexSweepPending(target: String, group: String) throws -> Bool {
        let sweeps = groupIndexSweeps
        return try environment.read { txn in try sweeps.value(Self.workName(target, group), txn) != nil }
    }

    func groupIndexSweepPending(target: String, group: String, _ txn: borrowing some StoreReading & ~Copyable) throws -> Bool {
        try groupIndexSweeps.value(Self.workName(target, group), txn) != nil
    }

    /// Up to `limit` entries of the old index of `group` at `target` go
    /// (both directions, then its pending marks); the work is done when
    /// fewer went. Returns how many went.
    @discardableResult
    func sweepGroupIndex(target: String, group: String, limit: Int, _ txn: borrowing WriteTransaction) throws -> Int {
        let prefix = Self.targetGroupPrefix(target, group), end = Self.targetGroupEnd(target, group)
        let targetMemberOf = self.targetMemberOf
        var n = try txn.deleteRange(targetMembers, from: prefix, to: end, limit: limit) { k in
            _ = try txn.delete(targetMemberOf, prefixed(target, Array(k[prefix.count...])), value: Array(group.utf8))
        }
        if n < limit { n += try txn.deleteRange(targetPending, from: prefix, to: end, limit: limit - n) }
        if n < limit { try groupIndexSweeps.remove(Self.workName(target, group), txn) }
        return n
    }

    /// A group back in `target`'s routes with its old mapping and index
    /// missed the changes made while it was out: each of its members in the
    /// directory and each the target holds is marked pending later, a chunk
    /// a transaction, each chunk with a queue item of its own, so its
    /// deliveries compare all of them. O(1) here.
    func compareWholeGroupLater(target: String, group: String, _ txn: borrowing WriteTransaction) throws {
        try groupRescans.add(Self.workName(target, group), [0], txn)
    }

    /// One chunk of a whole-group comparison: up to `limit` members marked,
    /// with the group queued. Returns how many were marked, and whether an
    /// item was queued.
    func rescanGroup(target: String, group: String, from value: [UInt8], limit: Int, _ txn: borrowing WriteTransaction) throws
        -> (marked: Int, queued: Bool)
    {
        let name = Self.workName(target, group)
        // Gone from the target again, its index being forgotten, or the target no longer configured: nothing to compare.
        guard targets.contains(where: { $0.name == target }),
            try txn.get(targetIds, prefixed(target, group)).flatMap(TargetMapping.init)?.members != nil,
            try !groupIndexSweepPending(target: target, group: group, txn), let phase = value.first
        else {
            try groupRescans.remove(name, txn)
            return (0, false)
        }
        let cursor = value.count > 1 ? String(decoding: value[1...], as: UTF8.self) : nil
        var ids: [String]
        if phase == 0 {
            ids = try groupMemberIDs(group, after: cursor, limit: limit, txn)
        } else {
            ids = []
            let prefix = Self.targetGroupPrefix(target, group)
            try txn.scanKeys(
                targetMembers, from: cursor.map { prefix + Array($0.utf8) + [0] } ?? prefix, to: Self.targetGroupEnd(target, group)
            ) {
                k in
                ids.append(String(decoding: k[prefix.count...], as: UTF8.self))
                return ids.count < limit
            }
        }
        if !ids.isEmpty {
            let seq = try enqueue(
                target: target,
                DeliveryItem(brokerID: group, type: "Group", operation: .upsert, trace: "", queuedAt: unixMilliseconds(), acceptedAt: 0),
                txn)
            try markMembersPending(target: target, group: group, ids, seq: seq, txn)
        }
        if ids.count == limit {
            try groupRescans.add(name, [phase] + Array(ids[ids.count - 1].utf8), txn)
        } else if phase == 0 {
            try groupRescans.add(name, [1], txn)
        } else {
            try groupRescans.remove(name, txn)
        }
        return (ids.count, !ids.isEmpty)
    }

    /// Whether deferred work on the targets' group indexes is left (a read).
    func deliveryWorkPending() throws -> Bool {
        let sweeps = groupIndexSweeps, rescans = groupRescans
        return try environment.read { txn in try sweeps.first(txn) != nil || rescans.first(txn) != nil }
    }

    /// One step of that work, in `txn`: a chunk of the first index being
    /// forgotten, else of the first group being compared whole.
    func deferredDeliveryStep(limit: Int, _ txn: borrowing WriteTransaction) throws -> DeferredProgress {
        if let (name, _) = try groupIndexSweeps.first(txn) {
            guard let (target, group) = Self.splitWorkName(name) else {
                try groupIndexSweeps.remove(name, txn)
                return DeferredProgress(found: true)
            }
            return DeferredProgress(found: true, swept: try sweepGroupIndex(target: target, group: group, limit: limit, txn))
        }
        if let (name, value) = try groupRescans.first(txn) {
            guard let (target, group) = Self.splitWorkName(name) else {
                try groupRescans.remove(name, txn)
                return DeferredProgress(found: true)
            }
            let r = try rescanGroup(target: target, group: group, from: value, limit: limit, txn)
            return DeferredProgress(found: true, marked: r.marked, queued: r.queued ? [target] : [])
        }
        return DeferredProgress()
    }
}

/// What one step of deferred work did.
package struct DeferredProgress: Sendable {
    /// It found work (false: none is left).
    package var found = false
    /// Index entries it removed.
    package var swept = 0
    /// Members it marked pending for a whole-group comparison.
    package var marked = 0
    /// Targets it queued items for (their workers are woken).
    package var queued: [String] = []

    package init(found: Bool = false, swept: Int = 0, marked: Int = 0, queued: [String] = []) {
        (self.found, self.swept, self.marked, self.queued) = (found, swept, marked, queued)
    }
}

/// Entries one transaction of deferred work changes at most (as the broker's
/// apply transactions: docs/protocol.md).
package let deferredChunk = 1000
