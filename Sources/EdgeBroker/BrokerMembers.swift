import EdgeDelivery
import EdgeHTTP
import EdgeStore
import SCIM

/// The federated directory's group members as an index (`groupMembers`:
/// `group broker id\0member broker id` → the member as JSON; `memberOf`:
/// member → groups), maintained in the apply transaction. A membership delta
/// costs O(k log n) whatever the group's size, and the stored group stays a
/// few hundred bytes; readers put `members` back (`withMembers`, O(n)).
/// Broker ids are hex and never hold a NUL, so keys split unambiguously.
extension BrokerStore {
    static func memberPrefix(_ groupID: String) -> [UInt8] { Array(groupID.utf8) + [0] }
    static func memberKey(_ groupID: String, _ memberID: String) -> [UInt8] { memberPrefix(groupID) + Array(memberID.utf8) }
    static let memberChunk = 4096
    static let layoutKey = Array("layout".utf8)
    /// 1 (or absent): members inline in the stored group; 2: in `groupMembers`.
    static let layoutVersion: UInt64 = 2

    /// Adds or updates one member of `groupID`; returns its id when that changed anything.
    @discardableResult
    func putMember(_ groupID: String, _ member: JSONObject, _ txn: borrowing WriteTransaction) throws -> String? {
        guard let id = member["value"]?.stringValue else { return nil }
        let key = BrokerStore.memberKey(groupID, id)
        let bytes = JSON.object(member).serialized()
        let current = try txn.get(groupMembers, key)
        guard current != bytes else { return nil }
        try txn.put(groupMembers, key, bytes)
        if current == nil { try txn.put(memberOf, Array(id.utf8), Array(groupID.utf8)) }
        return id
    }

    /// Returns whether the group held the member.
    @discardableResult
    func deleteMember(_ groupID: String, _ memberID: String, _ txn: borrowing WriteTransaction) throws -> Bool {
        guard try txn.delete(groupMembers, BrokerStore.memberKey(groupID, memberID)) else { return false }
        _ = try txn.delete(memberOf, Array(memberID.utf8), value: Array(groupID.utf8))
        return true
    }

    /// Makes `members` the whole membership of `groupID`: one walk of the
    /// group's range (kept, updated, deleted), then what is new. O(old + new).
    /// Returns the members that changed (added, updated or removed).
    @discardableResult
    func replaceMembers(_ groupID: String, with members: [JSONObject], _ txn: borrowing WriteTransaction) throws -> [String] {
        var touched: [String] = []
        var wanted: [String: JSONObject] = [:]
        for m in members { if let v = m["value"]?.stringValue { wanted[v] = m } }
        let prefix = BrokerStore.memberPrefix(groupID), end = Array(groupID.utf8) + [1]
        var from = prefix
        while true {
            var chunk: [(id: String, value: [UInt8])] = []
            try txn.scan(groupMembers, from: from, to: end) { k, v in
                chunk.append((String(decoding: k[prefix.count...], as: UTF8.self), v))
                return chunk.count < BrokerStore.memberChunk
            }
            for e in chunk {
                if let m = wanted.removeValue(forKey: e.id) {
                    let bytes = JSON.object(m).serialized()
                    if bytes != e.value {
                        try txn.put(groupMembers, prefix + Array(e.id.utf8), bytes)
                        touched.append(e.id)
                    }
                } else {
                    try deleteMember(groupID, e.id, txn)
                    touched.append(e.id)
                }
            }
            guard chunk.count == BrokerStore.memberChunk else { break }
            from = prefix + Array(chunk[chunk.count - 1].id.utf8) + [0]
        }
        for id in wanted.keys.sorted() { if let t = try putMember(groupID, wanted[id]!, txn) { touched.append(t) } }
        return touched
    }

    /// A deleted resource leaves every group holding it (each one index
    /// entry); returns those groups (the directory's: not removed ones).
    @discardableResult
    func leaveGroups(_ memberID: String, _ txn: borrowing WriteTransaction) throws -> [String] {
        let all = try txn.duplicateValues(memberOf, Array(memberID.utf8))
        for g in all { _ = try txn.delete(groupMembers, BrokerStore.memberKey(g, memberID)) }
        _ = try txn.delete(memberOf, Array(memberID.utf8))
        return try all.filter { try txn.get(brokerIds, Array($0.utf8)) != nil }
    }

    /// The groups `member` belongs to in the directory (a group removed
    /// whose members are still being swept is not one of them).
    func groups(of member: String, _ txn: borrowing some StoreReading & ~Copyable) throws -> [String] {
        try txn.duplicateValues(memberOf, Array(member.utf8)).filter { try txn.get(brokerIds, Array($0.utf8)) != nil }
    }

    /// Removed groups whose members are still in the index: `sweep/<group>` in `meta`.
    var removedGroups: DeferredWork { DeferredWork(meta, prefix: "sweep/") }

    /// A removed group's members leave the index later, a chunk per
    /// transaction (`sweepRemovedGroups`): removing a group of n members
    /// is O(1) in the apply, and no transaction grows with n. Readers skip
    /// them meanwhile (the group has no `brokerIds` entry any more). A
    /// group's broker id is made when it is created and never reused, so
    /// the sweep of a removed group never meets a new one's members.
    func removeMembersLater(_ groupID: String, _ txn: borrowing WriteTransaction) throws {
        if try txn.holdsAny(groupMembers, from: BrokerStore.memberPrefix(groupID), to: Array(groupID.utf8) + [1]) {
            try removedGroups.add(Array(groupID.utf8), [], txn)
        }
    }

    /// Up to `limit` members of removed groups leave the index (both
    /// directions). Returns how many entries went (0: nothing to sweep).
    func sweepRemovedGroups(limit: Int, _ txn: borrowing WriteTransaction) throws -> Int {
        guard let (name, _) = try removedGroups.first(txn) else { return 0 }
        let members = BrokerStore.memberPrefix(String(decoding: name, as: UTF8.self)), memberOf = self.memberOf
        let n = try txn.deleteRange(groupMembers, from: members, to: name + [1], limit: limit) { k in
            _ = try txn.delete(memberOf, Array(k[members.count...]), value: name)
        }
        if n < limit { try removedGroups.remove(name, txn) }
        return max(1, n)
    }

    /// The same in a transaction of its own.
    public func sweepRemovedGroups(limit: Int) throws -> Int {
        try environment.write { txn in try sweepRemovedGroups(limit: limit, txn) }
    }

    /// Removed groups whose members are still being swept.
    public func groupsBeingSwept() throws -> Int {
        let removed = removedGroups
        return try environment.read { txn in try removed.count(txn) }
    }

    /// One step of the broker's deferred work: a chunk of a removed group's
    /// members, else of the targets' group indexes (`deferredDeliveryStep`).
    func deferredStep(limit: Int, _ txn: borrowing WriteTransaction) throws -> (swept: Int, delivery: DeferredProgress) {
        let swept = try sweepRemovedGroups(limit: limit, txn)
        if swept > 0 { return (swept, DeferredProgress()) }
        return (0, try deferredDeliveryStep(limit: limit, txn))
    }

    /// Whether deferred work is left (a read).
    func deferredWorkPending() throws -> Bool {
        try groupsBeingSwept() > 0 || deliveryWorkPending()
    }

    /// The members of `groupID` (O(n): each is parsed).
    func members(_ txn: borrowing some StoreReading & ~Copyable, of groupID: String) throws -> [JSON] {
        var out: [JSON] = []
        try txn.scan(groupMembers, from: BrokerStore.memberPrefix(groupID), to: Array(groupID.utf8) + [1]) { _, v in
            out.append(try JSONParser.parse(v, limits: .stored))
            return true
        }
        return out
    }

    /// Whether `groupID` has more than `limit` members (reads at most `limit + 1` keys).
    func hasMoreMembers(_ groupID: String, than limit: Int) throws -> Bool {
        try environment.read { txn in try hasMoreMembers(txn, [groupID], than: limit) }
    }

    /// Whether the groups `groupIDs` hold more than `limit` members together
    /// (reads at most `limit + 1` keys): a list page streams them then.
    func hasMoreMembers(_ txn: borrowing some StoreReading & ~Copyable, _ groupIDs: [String], than limit: Int) throws -> Bool {
        try holdMoreKeys(txn, groupMembers, in: groupIDs.lazy.map { (BrokerStore.memberPrefix($0), Array($0.utf8) + [1]) }, than: limit)
    }

    /// The rest of a streamed group body: its members a chunk at a time,
    /// then `]}` (`storedArrayPieces`); `element` turns each stored member
    /// into what is sent (`Projection.memberElement`), nil: as stored. A
    /// group without members sent as stored gets `"members":[]`, as
    /// `withMembers` renders it.
    func memberPieces(of groupID: String, element: (([UInt8]) throws -> [UInt8]?)? = nil) -> BodyPieces {
        storedArrayPieces(
            environment, groupMembers, from: BrokerStore.memberPrefix(groupID), to: Array(groupID.utf8) + [1],
            member: streamedMembersOpening, chunk: BrokerStore.memberChunk, element: element, emptyArray: element == nil)
    }

    /// The group with its `members` from the index, in a snapshot of its own.
    func withMembers(_ group: JSONObject) throws -> JSONObject {
        try environment.read { txn in try withMembers(txn, group) }
    }

    /// The group with its `members` from the index, as readers see it.
    func withMembers(_ txn: borrowing some StoreReading & ~Copyable, _ group: JSONObject) throws -> JSONObject {
        guard let id = group["id"]?.stringValue, group["members"] == nil else { return group }
        var out = group
        out["members"] = .array(try members(txn, of: id))
        return out
    }

    /// A store of layout 1 holds each group's members inline: moved to the
    /// index once, when it is opened (the groups keep their versions; no
    /// fan-out: nothing changed), a few groups per transaction, so that
    /// memory holds one batch, not the store.
    func migrateInlineMembers() throws {
        let meta = self.meta, resources = self.resources
        let done = try environment.read { txn in
            (try txn.get(meta, BrokerStore.layoutKey).flatMap(UInt64.init(bigEndianBytes:)) ?? 1) >= BrokerStore.layoutVersion
        }
        if done { return }
        var keys: [[UInt8]] = []
        try environment.read { txn in
            try txn.scanKeys(resources) { k in
                let parts = k.split(separator: UInt8(ascii: "/"), maxSplits: 2)
                if parts.count == 3, parts[1].elementsEqual("Group".utf8) { keys.append(k) }
                return true
            }
        }
        var rest = keys[...]
        while true {
            let batch = rest.prefix(64)
            rest = rest.dropFirst(batch.count)
            try environment.write { txn in
                for key in batch {
                    guard let bytes = try txn.get(resources, key), var group = try JSONParser.parse(bytes, limits: .stored).objectValue,
                        group["members"] != nil, let id = group["id"]?.stringValue
                    else { continue }
                    let members = group["members"]?.arrayValue?.compactMap(\.objectValue) ?? []
                    group["members"] = nil
                    try replaceMembers(id, with: members, txn)
                    try txn.put(resources, key, JSON.object(group).serialized())
                }
                if rest.isEmpty { try txn.put(meta, BrokerStore.layoutKey, BrokerStore.layoutVersion.bigEndianBytes) }
            }
            if rest.isEmpty { return }
        }
    }
}
