import EdgeDelivery
import EdgeHTTP
import EdgeStore
import SCIM

/// A group's members as an index, not an array inside the stored group.
///
/// `groupMembers` holds one entry per (group, member): key
/// `<group id>\0<member id>`, value the member as stored (`{"value":…,
/// "type":…, "$ref":…}`, serialised JSON). The stored group (`resources`)
/// holds every other attribute and never `members`. With `memberships`
/// (member id → ids of the groups holding it) both directions are LMDB
/// B-trees, kept in the write transaction of the group. So adding or
/// removing k members of a group of n costs O(k log n) (no parse or
/// rewrite of the other members), a replace walks the group's key range
/// once, O(old + new), and a user's `groups` cost nothing per member of
/// those groups. Ids never hold a NUL (they are UUIDs made here, and a
/// member must be a stored resource), so the key splits unambiguously.
/// Members come back in member-id order (SCIM gives `members` no order).
extension AgentStore {
    static func memberPrefix(_ groupID: String) -> [UInt8] { Array(groupID.utf8) + [0] }
    static func memberKey(_ groupID: String, _ memberID: String) -> [UInt8] { memberPrefix(groupID) + Array(memberID.utf8) }

    /// How many entries a walk of a group's members reads per chunk: a
    /// replace or delete of a group of any size holds at most this many in
    /// memory at once.
    static let memberChunk = 4096

    /// Visits the members of `groupID` in member-id order, as stored (the
    /// member id and its serialised value), in chunks of `memberChunk`: each
    /// chunk is read, then `body` runs on it, so `body` may change the index.
    /// `body` returns false to stop.
    func forEachMemberChunk(
        _ txn: borrowing some StoreReading & ~Copyable, _ groupID: String,
        _ body: ([(id: [UInt8], value: [UInt8])]) throws -> Bool
    ) throws {
        let prefix = AgentStore.memberPrefix(groupID)
        let end = Array(groupID.utf8) + [1]
        var from = prefix
        while true {
            var chunk: [(id: [UInt8], value: [UInt8])] = []
            try txn.scan(groupMembers, from: from, to: end) { k, v in
                chunk.append((Array(k[prefix.count...]), v))
                return chunk.count < AgentStore.memberChunk
            }
            guard !chunk.isEmpty, try body(chunk), chunk.count == AgentStore.memberChunk else { return }
            from = prefix + chunk[chunk.count - 1].id + [0]
        }
    }

    /// Whether `groupID` has more than `limit` members, in a snapshot of its own.
    public func hasMoreMembers(_ groupID: String, than limit: Int) throws -> Bool {
        try environment.read { txn in try hasMoreMembers(txn, groupID, than: limit) }
    }

    /// Whether `groupID` has more than `limit` members (reads at most `limit + 1` keys).
    func hasMoreMembers(_ txn: borrowing some StoreReading & ~Copyable, _ groupID: String, than limit: Int) throws -> Bool {
        try hasMoreMembers(txn, [groupID], than: limit)
    }

    /// Whether the groups `groupIDs` hold more than `limit` members together
    /// (reads at most `limit + 1` keys): a list page streams them then.
    func hasMoreMembers(_ txn: borrowing some StoreReading & ~Copyable, _ groupIDs: [String], than limit: Int) throws -> Bool {
        try holdMoreKeys(txn, groupMembers, in: groupIDs.lazy.map { (AgentStore.memberPrefix($0), Array($0.utf8) + [1]) }, than: limit)
    }

    /// The same in a snapshot of its own.
    public func hasMoreMembers(_ groupIDs: [String], than limit: Int) throws -> Bool {
        try environment.read { txn in try hasMoreMembers(txn, groupIDs, than: limit) }
    }

    /// The members of `groupID` as JSON values (O(n): every one is parsed).
    func members(_ txn: borrowing some StoreReading & ~Copyable, of groupID: String) throws -> [JSON] {
        var out: [JSON] = []
        try forEachMemberChunk(txn, groupID) { chunk in
            for e in chunk { out.append(try JSONParser.parse(e.value, limits: .stored)) }
            return true
        }
        return out
    }

    /// The stored members of `groupID` whose ids are `ids` (those that are members).
    func members(_ txn: borrowing some StoreReading & ~Copyable, of groupID: String, ids: some Sequence<String>) throws -> [JSON] {
        var out: [JSON] = []
        for id in Set(ids).sorted() {
            guard let v = try txn.get(groupMembers, AgentStore.memberKey(groupID, id)) else { continue }
            out.append(try JSONParser.parse(v, limits: .stored))
        }
        return out
    }

    /// The group with its `members` from the index (last, after `meta`), as
    /// the general read path and the relay see it.
    func withMembers(_ txn: borrowing some StoreReading & ~Copyable, _ group: JSONObject) throws -> JSONObject {
        guard let id = group["id"]?.stringValue, group["members"] == nil else { return group }
        var out = group
        let m = try members(txn, of: id)
        out["members"] = m.isEmpty ? nil : .array(m)
        return out
    }

    /// Appends `,"members":[…]` to `body` straight from the stored bytes of
    /// the index (nothing parsed): the bytes `withMembers` then serialising
    /// gives. Nothing when the group has no member.
    func appendMembers(_ txn: borrowing some StoreReading & ~Copyable, of groupID: String, to body: inout [UInt8]) throws {
        var first = true
        try forEachMemberChunk(txn, groupID) { chunk in
            for e in chunk {
                body.append(contentsOf: first ? streamedMembersOpening : [UInt8(ascii: ",")])
                first = false
                body.append(contentsOf: e.value)
            }
            return true
        }
        if !first { body.append(UInt8(ascii: "]")) }
    }

    /// The rest of a streamed group body (`DefaultRead.streamed`, a
    /// projected GET, a list page): its members a chunk at a time, each
    /// chunk read in a snapshot of its own, then the closing brackets.
    /// Memory holds one chunk. A group changing while it is streamed shows
    /// each member as one of the snapshots saw it. `element` turns each
    /// stored member into what is sent (`Projection.memberElement`; nil:
    /// as stored).
    public func memberPieces(of groupID: String, element: (([UInt8]) throws -> [UInt8]?)? = nil) -> BodyPieces {
        storedArrayPieces(
            environment, groupMembers, from: AgentStore.memberPrefix(groupID), to: Array(groupID.utf8) + [1],
            member: streamedMembersOpening, chunk: AgentStore.memberChunk, element: element)
    }

    // MARK: a removed group's members, later

    /// Removed groups whose entries are still in the indexes: `sweep/<group>` in `meta`.
    var removedGroups: DeferredWork { DeferredWork(meta, prefix: "sweep/") }

    /// A removed group's members leave the indexes later, a chunk per
    /// transaction (`sweepRemovedGroup`): its `groupMembers` and
    /// `memberships` entries, then what the relay kept of it
    /// (`relayedMembers`, `pendingMembers`). Removing a group of n members
    /// is O(1) in the write that removes it. Readers skip them meanwhile:
    /// every read of a group's members starts from the stored group, and a
    /// member's groups are those still stored (`groupsReturned`,
    /// `groupsHolding`). A group coming back with the same id (a foreign
    /// group, named by its broker id, re-entering the boundary) finishes
    /// the sweep first (`store`), so its members are never the old ones.
    func removeMembersLater(_ groupID: String, _ txn: borrowing WriteTransaction) throws {
        let prefix = AgentStore.memberPrefix(groupID), end = Array(groupID.utf8) + [1]
        for db in [groupMembers, relayedMembers, pendingMembers] where try txn.holdsAny(db, from: prefix, to: end) {
            try removedGroups.add(Array(groupID.utf8), [], txn)
            return
        }
    }

    /// Up to `limit` entries of removed group `groupID` leave the indexes;
    /// the work is done when fewer went. Returns how many went.
    @discardableResult
    func sweepRemovedGroup(_ groupID: String, limit: Int, _ txn: borrowing WriteTransaction) throws -> Int {
        let prefix = AgentStore.memberPrefix(groupID), end = Array(groupID.utf8) + [1], memberships = self.memberships
        var n = try txn.deleteRange(groupMembers, from: prefix, to: end, limit: limit) { k in
            _ = try txn.delete(memberships, Array(k[prefix.count...]), value: Array(groupID.utf8))
        }
        for db in [relayedMembers, pendingMembers] where n < limit {
            n += try txn.deleteRange(db, from: prefix, to: end, limit: limit - n)
        }
        if n < limit { try removedGroups.remove(Array(groupID.utf8), txn) }
        return n
    }

    /// One step of the agent's deferred work: a chunk of the first removed
    /// group's entries, else of what the relay told the broker of a group
    /// that left the boundary (`forgetRelayedLater`), else of the members
    /// of a group that entered it (`relaySendStep`: `relayed`, its events
    /// are in the outbox), else of the local targets' group indexes
    /// (`deferredDeliveryStep`). `swept`: the agent's entries (0: none left).
    package func deferredStep(limit: Int, _ txn: borrowing WriteTransaction) throws -> (
        swept: Int, delivery: DeferredProgress, relayed: Int
    ) {
        if let (name, _) = try removedGroups.first(txn) {
            return (max(1, try sweepRemovedGroup(String(decoding: name, as: UTF8.self), limit: limit, txn)), DeferredProgress(), 0)
        }
        if let (name, _) = try relayForgets.first(txn) {
            return (max(1, try forgetRelayedChunk(String(decoding: name, as: UTF8.self), limit: limit, txn)), DeferredProgress(), 0)
        }
        if let (name, value) = try relaySends.first(txn) {
            return (0, DeferredProgress(), try relaySendStep(String(decoding: name, as: UTF8.self), value, limit: limit, txn))
        }
        return (0, targets.isEmpty ? DeferredProgress() : try deferredDeliveryStep(limit: limit, txn), 0)
    }

    /// The same in a transaction of its own (tools and tests).
    package func deferredStep(limit: Int) throws -> (swept: Int, delivery: DeferredProgress, relayed: Int) {
        try environment.write { txn in try deferredStep(limit: limit, txn) }
    }

    /// Whether deferred work is left (a read).
    package func deferredWorkPending() throws -> Bool {
        let removed = removedGroups, forgets = relayForgets, sends = relaySends
        return try environment.read { txn in
            try removed.first(txn) != nil || forgets.first(txn) != nil || sends.first(txn) != nil
        }
            || (!targets.isEmpty && deliveryWorkPending())
    }

    /// Removed groups whose entries are still being swept.
    public func groupsBeingSwept() throws -> Int {
        let removed = removedGroups
        return try environment.read { txn in try removed.count(txn) }
    }

    // MARK: writes

    /// Members as the validator leaves them (canonical `type`, read-only
    /// `display` dropped, exact duplicates collapsed): a group holding only
    /// them is validated, so PATCH values are checked as a PUT's are.
    func validatedMembers(_ elements: [JSON], profile: ClientProfile) throws -> [JSONObject] {
        guard !elements.isEmpty else { return [] }
        let groups = registry.resourceType("Group")!
        let probe: JSON = ["schemas": [.string(groups.schema)], "displayName": "-", "members": .array(elements)]
        let validated = try ResourceValidator(registry: registry, type: groups, profile: profile).validateCreate(probe)
        return validated["members"]?.arrayValue?.compactMap(\.objectValue) ?? []
    }

    /// The member id of a validated member; every member needs one (it is its key).
    func memberID(_ member: JSONObject) throws -> String {
        guard let id = member["value"]?.stringValue, !id.isEmpty else {
            throw SCIMError.invalidValue("members: every member needs a 'value' naming a User or Group of this agent")
        }
        return id
    }

    /// Adds or updates one member of `groupID`; a new member must be a
    /// stored User or Group other than the group itself.
    func putMember(_ groupID: String, _ member: JSONObject, _ txn: borrowing WriteTransaction) throws {
        let id = try memberID(member)
        let key = AgentStore.memberKey(groupID, id)
        let bytes = JSON.object(member).serialized()
        if let current = try txn.get(groupMembers, key) {
            if current != bytes {
                try txn.put(groupMembers, key, bytes)
                try txn.put(pendingMembers, key, [])
            }
            return
        }
        guard id != groupID else { throw SCIMError.invalidValue("a group cannot be a member of itself") }
        let users = registry.resourceType("User")!, groups = registry.resourceType("Group")!
        guard
            try txn.get(resources, AgentStore.key(users, id)) != nil
                || txn.get(resources, AgentStore.key(groups, id)) != nil
        else {
            throw SCIMError.invalidValue("members: '\(id)' is not a User or Group of this agent")
        }
        try txn.put(groupMembers, key, bytes)
        try txn.put(pendingMembers, key, [])
        try txn.put(memberships, Array(id.utf8), Array(groupID.utf8))
    }

    /// Removes one member of `groupID` (both directions); false if it was none.
    @discardableResult
    func deleteMember(_ groupID: String, _ memberID: [UInt8], _ txn: borrowing WriteTransaction) throws -> Bool {
        guard try txn.delete(groupMembers, AgentStore.memberPrefix(groupID) + memberID) else { return false }
        try txn.put(pendingMembers, AgentStore.memberPrefix(groupID) + memberID, [])
        _ = try txn.delete(memberships, memberID, value: Array(groupID.utf8))
        return true
    }

    /// Makes `elements` (validated members) the whole membership of
    /// `groupID`: one walk over the group's key range, keeping what stays,
    /// deleting what went, then adding what is new. O(old + new); memory
    /// O(new + `memberChunk`).
    func replaceMembers(_ groupID: String, with elements: [JSONObject], _ txn: borrowing WriteTransaction) throws {
        var wanted: [String: JSONObject] = [:]
        for m in elements { wanted[try memberID(m)] = m }
        try forEachMemberChunk(txn, groupID) { chunk in
            for e in chunk {
                let id = String(decoding: e.id, as: UTF8.self)
                if let m = wanted.removeValue(forKey: id) {
                    let bytes = JSON.object(m).serialized()
                    if bytes != e.value {
                        try txn.put(groupMembers, AgentStore.memberPrefix(groupID) + e.id, bytes)
                        try txn.put(pendingMembers, AgentStore.memberPrefix(groupID) + e.id, [])
                    }
                } else {
                    try deleteMember(groupID, e.id, txn)
                }
            }
            return true
        }
        for id in wanted.keys.sorted() { try putMember(groupID, wanted[id]!, txn) }
    }

    /// Applies one PATCH operation on `members` (made by `splitMemberOperations`)
    /// to the index. Whole-set forms (`replace`, `remove` without a value) walk
    /// the group once. Every other form works on the few members it can touch:
    /// those named by the values it adds or removes, or by the `value eq`
    /// equalities of its filter (`members[value eq "X"]`), each a B-tree
    /// look-up; only a filter on something else (`members[type eq "Group"]`)
    /// walks the group. Those members go through the SCIM module's own PATCH
    /// semantics (`applyUnvalidated`), and the difference is written back.
    func applyMemberOperation(
        _ op: PatchOperation, _ request: PatchRequest, groupID: String, profile: ClientProfile,
        _ txn: borrowing WriteTransaction
    ) throws {
        let path = op.path!
        if path.filter == nil, path.subAttribute == nil {
            switch op.op {
            case .replace:
                let value = op.value ?? .null
                try replaceMembers(
                    groupID, with: try validatedMembers(value.isNull ? [] : value.arrayValue ?? [value], profile: profile), txn)
                return
            case .remove where op.value == nil:
                try replaceMembers(groupID, with: [], txn)
                return
            default: break
            }
        }
        var subset: [JSON]
        if let ids = touchedMemberIDs(op) {
            subset = try members(txn, of: groupID, ids: ids)
            if let filter = path.filter { subset = subset.filter { $0.objectValue.map(filter.matches) ?? false } }
        } else {
            subset = []
            try forEachMemberChunk(txn, groupID) { chunk in
                for e in chunk {
                    let m = try JSONParser.parse(e.value, limits: .stored)
                    if path.filter.map({ f in m.objectValue.map(f.matches) ?? false }) ?? true { subset.append(m) }
                }
                return true
            }
        }
        var before: [String: JSON] = [:]
        for m in subset { if let id = m["value"]?.stringValue { before[id] = m } }
        var working: JSONObject = subset.isEmpty ? [:] : ["members": .array(subset)]
        try request.applyUnvalidated(op, to: &working)
        guard working.keys.allSatisfy({ equalsIgnoringASCIICase($0, "members") }) else {
            throw SCIMError.invalidPath("'\(path.text)' must change members as a whole or through a value filter")
        }
        // `members.value` without a filter writes one object, not a list: refused, as the validator refuses it.
        guard let after = working["members"].map({ $0.arrayValue }) ?? [] else {
            throw SCIMError.invalidValue(
                "'\(path.text)': members is multi-valued; name the members with a value filter (members[value eq \"…\"])")
        }
        var kept = Set<String>(), changed: [JSON] = []
        for m in after {
            if let id = m["value"]?.stringValue { kept.insert(id) }
            if m["value"]?.stringValue.flatMap({ before[$0] }) != m { changed.append(m) }
        }
        for id in before.keys.sorted() where !kept.contains(id) { try deleteMember(groupID, Array(id.utf8), txn) }
        for m in try validatedMembers(changed, profile: profile) { try putMember(groupID, m, txn) }
    }

    /// The member ids an operation can touch, when it names them: the
    /// values it adds or removes, or those its filter requires; nil when it
    /// may touch any member.
    func touchedMemberIDs(_ op: PatchOperation) -> Set<String>? {
        let path = op.path!
        if let filter = path.filter { return requiredMemberValues(filter, inElement: true) }
        guard path.subAttribute == nil, let value = op.value else { return nil }
        var ids = Set<String>()
        for v in value.arrayValue ?? [value] {
            guard let id = v["value"]?.stringValue else {
                // `add` appends a value without `value` as it is (then refused); a
                // `remove` target without one compares whole values: any member.
                if op.op == .add { continue }
                return nil
            }
            ids.insert(id)
        }
        return ids
    }

    /// Splits a group PATCH: operations on `members` (with a path on them,
    /// or the `members` of a path-less value, which becomes an operation of
    /// its own), each with its index in the request, and the others.
    func splitMemberOperations(_ request: PatchRequest, profile: ClientProfile) throws -> (
        members: [(Int, PatchOperation)], others: [(Int, PatchOperation)]
    ) {
        let groups = registry.resourceType("Group")!
        var members: [(Int, PatchOperation)] = [], others: [(Int, PatchOperation)] = []
        for (k, op) in request.operations.enumerated() {
            if let path = op.path {
                if !path.attribute.isExtension, equalsIgnoringASCIICase(path.attribute.attribute.name, "members") {
                    members.append((k, op))
                } else {
                    others.append((k, op))
                }
                continue
            }
            guard op.removesExtension == nil, let value = op.value?.objectValue,
                let name = value.keys.first(where: { equalsIgnoringASCIICase($0, "members") })
            else {
                others.append((k, op))
                continue
            }
            let path = try PatchPath("members", registry: registry, type: groups, profile: profile)
            members.append((k, PatchOperation(op: op.op, path: path, value: value[name])))
            var rest = value
            rest[name] = nil
            if !rest.isEmpty { others.append((k, PatchOperation(op: op.op, path: nil, value: .object(rest)))) }
        }
        return (members, others)
    }
}

// MARK: filters on members

/// Whether a filter reads `members` anywhere.
func filterReadsMembers(_ node: FilterNode) -> Bool { node.reads("members") }

func isMembers(_ t: FilterTarget) -> Bool {
    t.container == nil && t.attribute.map { equalsIgnoringASCIICase($0, "members") } ?? false
}

/// Member ids of which a group matching `node` must hold one: from
/// `members.value eq "X"` (or `members eq "X"`, `members[value eq "X"]`),
/// through `and` (either side) and `or` (both sides); nil when the filter
/// requires no particular member. `inElement`: `node` is a value filter on
/// one member (`value eq "X"`).
func requiredMemberValues(_ node: FilterNode, inElement: Bool) -> Set<String>? {
    switch node {
    case .compare(let t, .eq, .string(let v)):
        if inElement {
            return t.attribute.map { equalsIgnoringASCIICase($0, "value") } ?? false ? [v] : nil
        }
        guard isMembers(t), t.subAttribute.map({ equalsIgnoringASCIICase($0, "value") }) ?? true else { return nil }
        return [v]
    case .valuePath(let t, let inner) where !inElement && isMembers(t):
        return requiredMemberValues(inner, inElement: true)
    case .and(let a, let b):
        switch (requiredMemberValues(a, inElement: inElement), requiredMemberValues(b, inElement: inElement)) {
        case (let x?, let y?): return x.intersection(y)
        case (let x?, nil): return x
        case (nil, let y): return y
        }
    case .or(let a, let b):
        guard let x = requiredMemberValues(a, inElement: inElement), let y = requiredMemberValues(b, inElement: inElement) else {
            return nil
        }
        return x.union(y)
    default:
        return nil
    }
}

/// Whether `node` reads members only through equalities on their value
/// (outside any `not`): then a group holding just the members those
/// equalities name matches exactly when the whole group would.
func readsMembersOnlyByValue(_ node: FilterNode) -> Bool {
    func onlyValueEqualities(_ n: FilterNode) -> Bool {
        switch n {
        case .and(let a, let b), .or(let a, let b): return onlyValueEqualities(a) && onlyValueEqualities(b)
        case .compare(let t, .eq, .string): return t.attribute.map { equalsIgnoringASCIICase($0, "value") } ?? false
        default: return false
        }
    }
    switch node {
    case .and(let a, let b), .or(let a, let b): return readsMembersOnlyByValue(a) && readsMembersOnlyByValue(b)
    case .not(let a): return !filterReadsMembers(a)
    case .present(let t): return !isMembers(t)
    case .compare(let t, let op, let v):
        guard isMembers(t) else { return true }
        guard op == .eq, case .string = v else { return false }
        return t.subAttribute.map { equalsIgnoringASCIICase($0, "value") } ?? true
    case .valuePath(let t, let inner): return !isMembers(t) || onlyValueEqualities(inner)
    }
}

/// Whether `filter` is exactly one equality on a member's value: the
/// member → groups index then answers it without reading the groups' members.
func isLoneMemberEquality(_ node: FilterNode) -> Bool {
    switch node {
    case .compare(let t, .eq, .string):
        return isMembers(t) && (t.subAttribute.map { equalsIgnoringASCIICase($0, "value") } ?? true)
    case .valuePath(let t, .compare(let inner, .eq, .string)):
        return isMembers(t) && (inner.attribute.map { equalsIgnoringASCIICase($0, "value") } ?? false)
    default: return false
    }
}

extension AgentStore {
    /// `resource` as `filter` must see it: a group gets the members the
    /// filter reads (only those its value equalities name when that is all
    /// it reads, else all of them).
    func forMatching(
        _ txn: borrowing some StoreReading & ~Copyable, _ type: ResourceType, _ resource: JSONObject, _ filter: Filter?
    ) throws -> JSONObject {
        guard type.id == "Group", let filter, filterReadsMembers(filter.root), resource["members"] == nil,
            let id = resource["id"]?.stringValue
        else { return resource }
        var out = resource
        let m: [JSON]
        if readsMembersOnlyByValue(filter.root) {
            m = try members(txn, of: id, ids: memberValuesNamed(filter.root))
        } else {
            m = try members(txn, of: id)
        }
        out["members"] = m.isEmpty ? nil : .array(m)
        return out
    }

    /// The groups matching a filter that requires one of a few members
    /// (`members.value eq "X"`), from the member → groups index: none of
    /// the groups' other members is read. Nil when the filter requires none.
    func groupsRequiringMembers(_ txn: borrowing some StoreReading & ~Copyable, _ type: ResourceType, _ filter: Filter) throws
        -> [JSONObject]?
    {
        guard type.id == "Group", let values = requiredMemberValues(filter.root, inElement: false) else { return nil }
        var ids = Set<String>()
        for v in values { ids.formUnion(try groupIDs(txn, of: v)) }
        let exact = isLoneMemberEquality(filter.root)
        return try ids.sorted().compactMap { gid -> JSONObject? in
            guard let r = try load(txn, type, gid) else { return nil }
            return try exact || filter.matches(forMatching(txn, type, r, filter)) ? r : nil
        }
    }
}

/// Every member value a filter's equalities name (for `forMatching`).
func memberValuesNamed(_ node: FilterNode) -> Set<String> {
    switch node {
    case .and(let a, let b), .or(let a, let b): return memberValuesNamed(a).union(memberValuesNamed(b))
    case .not(let a): return memberValuesNamed(a)
    case .compare(let t, .eq, .string(let v)) where isMembers(t): return [v]
    case .valuePath(let t, let inner) where isMembers(t): return memberValuesInElement(inner)
    default: return []
    }
}

private func memberValuesInElement(_ node: FilterNode) -> Set<String> {
    switch node {
    case .and(let a, let b), .or(let a, let b): return memberValuesInElement(a).union(memberValuesInElement(b))
    case .compare(let t, .eq, .string(let v)) where t.attribute.map({ equalsIgnoringASCIICase($0, "value") }) ?? false: return [v]
    default: return []
    }
}
