import EdgeLoop
import EdgeStore
import EdgeTLS
import Glibc
import SCIM

/// The delivery engine's part of a store's LMDB file (the broker's, or an
/// agent's with local targets): the tables of `DeliveryTables`.
///
/// | database | key | value |
/// |---|---|---|
/// | `fanout` | `<target> 0x00 <seq BE>` | a `DeliveryItem` (JSON) |
/// | `targetIds` | `<target> 0x00 <broker id>` | target id, ETag, last body sent |
/// | `targetOwners` | `<target> 0x00 <type>/<target id>` | the broker id whose mapping names that account |
/// | `targetLinks` | `<target> 0x00 <link value> 0x00 <broker id>` | — (`collisions: link`: the users linked into one account) |
/// | `targetDead` | `<target> 0x00 <seq BE>` | a dead letter: request, status, response |
/// | `trail` | `<broker id> 0x00 <µs BE> <hop>` | one hop of a change |
/// | `traces` | `<trace id> 0x00 <broker id>` | — |
/// | `targetState` | `seq/<target>`, `guard/<target>`, `status/<target>`, `links/<target>` | counters, deletion guard, last status, linked accounts |
///
/// Queue entries are written in the apply's own transaction: what is
/// acknowledged to an agent is already queued for every target.
public struct DeliveryItem: Sendable, Equatable {
    public enum Operation: String, Sendable {
        /// Create or update to the current state.
        case upsert
        /// Deleted at the source or out of the target's routes: the target's removal mode.
        case remove
        /// Reconciliation: a stray account the broker created, set inactive.
        case deactivate
    }
    public var brokerID: String
    public var type: String
    public var operation: Operation
    public var trace: String
    /// Unix ms: queued at the broker, and accepted at the agent (0: unknown).
    public var queuedAt: Int64
    public var acceptedAt: Int64
    /// A removal's source domain and userName (users) or displayName
    /// (groups) when it was queued: a resource deleted at the source is
    /// gone from the directory, and the deletion guard's list
    /// (`targets held`) must still name it. Nil for other operations and
    /// for items queued before they were kept.
    public var domain: String?
    public var name: String?
    /// `collisions: link`: the link value of the account the item is about
    /// (the user's, or the one it left). Deliveries of one link value go one
    /// at a time, like those of one resource: they all write one account.
    public var link: String?
    /// `deactivate` of a stray named by its target id, leaving the broker
    /// id's mapping alone (with `collisions: link` that names the account
    /// the user shares).
    public var account: String?

    package var json: JSON {
        var o: JSONObject = [
            "id": .string(brokerID), "type": .string(type), "op": .string(operation.rawValue), "trace": .string(trace),
            "at": .number(JSONNumber(integer: queuedAt)), "accepted": .number(JSONNumber(integer: acceptedAt)),
        ]
        if let domain { o["domain"] = .string(domain) }
        if let name { o["name"] = .string(name) }
        if let link { o["link"] = .string(link) }
        if let account { o["account"] = .string(account) }
        return .object(o)
    }

    package init(
        brokerID: String, type: String, operation: Operation, trace: String, queuedAt: Int64, acceptedAt: Int64, link: String? = nil,
        account: String? = nil
    ) {
        self.brokerID = brokerID
        self.type = type
        self.operation = operation
        self.trace = trace
        self.queuedAt = queuedAt
        self.acceptedAt = acceptedAt
        self.link = link
        self.account = account
    }

    package init?(_ bytes: [UInt8]) {
        guard let o = (try? JSONParser.parse(bytes, limits: .stored))?.objectValue, let id = o["id"]?.stringValue,
            let type = o["type"]?.stringValue,
            let op = o["op"]?.stringValue.flatMap(Operation.init(rawValue:))
        else { return nil }
        self.init(
            brokerID: id, type: type, operation: op, trace: o["trace"]?.stringValue ?? "",
            queuedAt: o["at"]?.numberValue?.integer ?? 0, acceptedAt: o["accepted"]?.numberValue?.integer ?? 0,
            link: o["link"]?.stringValue, account: o["account"]?.stringValue)
        domain = o["domain"]?.stringValue
        name = o["name"]?.stringValue
    }

    /// What the worker serialises on: the resource, and a linked account's link value.
    package var serialKeys: [String] { link.map { [brokerID, "link\u{0}" + $0] } ?? [brokerID] }
}

/// What the broker knows of a resource at one target.
public struct TargetMapping: Sendable, Equatable {
    public var targetID: String
    public var etag: String?
    /// The body last delivered (after mapping); nil after adoption, when
    /// the target's state is unknown (the next update is a full PUT).
    public var sent: JSONObject?
    /// `collisions: link`: the link value under which this account is shared
    /// with other linked users (nil: the resource's own account).
    public var link: String?
    /// A group whose members at the target are in the index
    /// (`TargetMembers.swift`): how many it holds there, and `sent` holds
    /// no members. Nil: `sent` lists them.
    public var members: Int?
    /// A group created at the target with its first members and still
    /// being grown from the directory's member index: the last member
    /// whose addition was recorded ("": from the first). Nil: grown.
    public var growFrom: String?

    package var json: JSON {
        var o: JSONObject = ["id": .string(targetID)]
        if let etag { o["etag"] = .string(etag) }
        if let sent { o["sent"] = .object(sent) }
        if let link { o["link"] = .string(link) }
        if let members { o["members"] = .int(members) }
        if let growFrom { o["grow"] = .string(growFrom) }
        return .object(o)
    }

    public init(targetID: String, etag: String?, sent: JSONObject?, link: String? = nil, members: Int? = nil) {
        self.targetID = targetID
        self.etag = etag
        self.sent = sent
        self.link = link
        self.members = members
    }

    package init?(_ bytes: [UInt8]) {
        guard let o = (try? JSONParser.parse(bytes, limits: .stored))?.objectValue, let id = o["id"]?.stringValue else { return nil }
        self.init(
            targetID: id, etag: o["etag"]?.stringValue, sent: o["sent"]?.objectValue, link: o["link"]?.stringValue,
            members: o["members"]?.numberValue?.integer.map(Int.init))
        growFrom = o["grow"]?.stringValue
    }
}

/// How much one `trail` reads at most (the console's limits; the command
/// line's are its `--limit`).
public struct TrailLimits: Sendable {
    /// Resources whose hops are read (a trace id may touch thousands).
    public var resources: Int
    /// Hops kept: the earliest.
    public var hops: Int
    /// Trail entries read, over all the resources.
    public var reads: Int
    /// Resources the directory scan for a trace that reached no target yet looks at.
    public var scan: Int
    /// Entries of each paused target's queue read for held removals.
    public var queue: Int

    public init(resources: Int = .max, hops: Int = .max, reads: Int = .max, scan: Int = .max, queue: Int = .max) {
        (self.resources, self.hops, self.reads, self.scan, self.queue) = (resources, hops, reads, scan, queue)
    }

    public static let console = TrailLimits(resources: 200, hops: 1_000, reads: 20_000, scan: 5_000, queue: 10_000)
}

/// What `trail` found.
public struct Trail: Sendable {
    /// The earliest hops, in time order (at most `TrailLimits.hops`).
    public var hops: [(brokerID: String, hop: JSONObject)] = []
    /// The hops found: all of them when `complete`, else at least these.
    public var total = 0
    /// The resources whose hops were read, and how many the query names
    /// (at least that many when not `complete`).
    public var resources: [String] = []
    public var resourcesTotal = 0
    /// Everything the query names was read.
    public var complete = true
    /// The directory scan (for a trace that reached no target yet) stopped
    /// after this many resources without finding the query (nil: no such stop).
    public var scanStopped: Int?
}

/// The delivery ids a `trail` query names (`DeliveryTables.resolveTrail`).
package struct TrailNames: Sendable {
    /// The first of them (at most `TrailLimits.resources`).
    package var ids: [String] = []
    /// Named by a trace id (else: one resource, or several sharing a name).
    package var byTrace = false
    /// How many the query names: `ids.count` when all were read, else at least this.
    package var total = 0
    /// The directory scan for a trace that reached no target yet stopped
    /// after this many resources without finding it (nil: no such stop).
    package var scanStopped: Int?

    package init(ids: [String] = [], byTrace: Bool = false, total: Int? = nil, scanStopped: Int? = nil) {
        (self.ids, self.byTrace, self.total, self.scanStopped) = (ids, byTrace, total ?? ids.count, scanStopped)
    }
}

/// Seven days of hops per resource.
package let trailRetentionMicroseconds: Int64 = 7 * 86_400 * 1_000_000

package func prefixed(_ name: String, _ tail: [UInt8]) -> [UInt8] { Array(name.utf8) + [0] + tail }
package func prefixed(_ name: String, _ tail: String) -> [UInt8] { Array(name.utf8) + [0] + Array(tail.utf8) }
package func prefixEnd(_ name: String) -> [UInt8] { Array(name.utf8) + [1] }

/// An id chosen elsewhere (an account's id at a target, an externalId) as
/// (part of) an LMDB key, for storing and looking up alike: its bytes, or
/// for one longer than 400 bytes (LMDB keys hold at most 511) 0xFF then its
/// SHA-256. 0xFF is never in UTF-8, so the two never meet; ids keep their
/// order among themselves.
package func boundedKey(_ id: String) -> [UInt8] {
    let bytes = Array(id.utf8)
    return bytes.count <= 400 ? bytes : [0xFF] + sha256(bytes)
}

/// The key of `targetOwners` naming the broker id whose account at `target` `targetID` is.
package func ownerKey(_ target: String, _ type: String, _ targetID: String) -> [UInt8] {
    prefixed(target, Array("\(type)/".utf8) + boundedKey(targetID))
}

/// The console settles "all" dead letters it showed, and more arrived since.
public enum DeadLetterError: Error, CustomStringConvertible, Equatable {
    case newer(target: String, through: UInt64, count: Int)

    public var description: String {
        switch self {
        case .newer(let target, let through, let count):
            return
                "\(count) more dead \(count == 1 ? "letter" : "letters") of \(target) after #\(through), the last one shown: look at the list again (nothing was changed)"
        }
    }
}

package extension DeliveryTables {
    /// Queues, in the apply's transaction, what each target must do after a
    /// resource changed from `old` to `new` (nil: absent or deleted).
    /// `touched`: a group's members that changed (marked pending at each
    /// target the group goes to: its delivery sends only those).
    func enqueueFanout(
        domain: String, type: String, brokerID: String, old: JSONObject?, new: JSONObject?,
        trace: String, acceptedAt: Int64, touched: [String] = [], _ txn: borrowing WriteTransaction
    ) throws -> [String] {
        var queued: [String] = [], outOfScope: [String] = []
        // Queued when applied: the apply's time as the resource records it, so that `trace` shows one "broker apply".
        let appliedAt = new?[sourceExtensionSchema]?["applied"]?.numberValue?.integer ?? unixMilliseconds()
        for target in targets {
            let was = old.map { target.routes(domain: domain, type: type, $0) } ?? false
            let now = new.map { target.routes(domain: domain, type: type, $0) } ?? false
            guard was || now else {
                outOfScope.append(target.name)
                continue
            }
            var item = DeliveryItem(
                brokerID: brokerID, type: type, operation: now ? .upsert : .remove, trace: trace,
                queuedAt: appliedAt, acceptedAt: acceptedAt)
            if !now, let old {
                // Who is removed, kept with the removal: the directory may no longer know (see `DeliveryItem.name`).
                item.domain = domain
                item.name = old[type == "User" ? "userName" : "displayName"]?.stringValue
            }
            var partner: (id: String, link: String)?
            if type == "User", let link = target.collisions.linkPolicy {
                // The link index holds the routed users that have a link value.
                // Only the domains in `sourceOfRecord` link; other domains' users have no link value.
                let before = was ? old.flatMap { link.value(of: $0, domain: domain) } : nil
                let after = now ? new.flatMap { link.value(of: $0, domain: domain) } : nil
                if before != after {
                    if let before, let other = try removeLink(target: target.name, value: before, brokerID: brokerID, txn) {
                        partner = (other, before)
                    }
                    if let after { try addLink(target: target.name, value: after, brokerID: brokerID, txn) }
                }
                item.link = after ?? before
            }
            let seq = try enqueue(target: target.name, item, txn)
            if now && type == "Group" {
                if !was, try txn.get(targetIds, prefixed(target.name, brokerID)).flatMap(TargetMapping.init)?.members != nil {
                    // Back in the routes with its old index: what changed while it was out is compared
                    // too, a chunk at a time after this transaction (`compareWholeGroupLater`).
                    try compareWholeGroupLater(target: target.name, group: brokerID, txn)
                    if !touched.isEmpty { try markMembersPending(target: target.name, group: brokerID, touched, seq: seq, txn) }
                } else if !touched.isEmpty {
                    try markMembersPending(target: target.name, group: brokerID, touched, seq: seq, txn)
                }
            }
            queued.append(target.name)
            if let partner {
                // It left an account it shared: the others' merged state is sent again (once, by one of them).
                try enqueue(
                    target: target.name,
                    DeliveryItem(
                        brokerID: partner.id, type: type, operation: .upsert, trace: trace,
                        queuedAt: unixMilliseconds(), acceptedAt: acceptedAt, link: partner.link), txn)
                queued.append(target.name)
            }
        }
        if !outOfScope.isEmpty && new != nil {
            // The provisioning log says why a target got nothing (`trace`).
            var hop: JSONObject = [
                "hop": "broker routes", "event": "out of scope",
                "detail": .string("out of scope for \(outOfScope.count == 1 ? "target" : "targets") \(outOfScope.joined(separator: ", "))"),
                "outOfScope": .array(outOfScope.map { .string($0) }), "applied": .number(JSONNumber(integer: appliedAt)),
            ]
            if acceptedAt > 0 { hop["accepted"] = .number(JSONNumber(integer: acceptedAt)) }
            try recordHop(brokerID: brokerID, trace: trace, hop, txn)
        }
        return queued
    }

    func linkKey(_ target: String, _ value: String, _ brokerID: String = "") -> [UInt8] {
        prefixed(target, Array(value.utf8) + [0] + Array(brokerID.utf8))
    }

    /// Up to `limit` broker ids linked under `value` at `target`, in key order (one range read).
    func linkMembers(target: String, value: String, limit: Int = Int.max, _ txn: borrowing WriteTransaction) throws -> [String] {
        var out: [String] = []
        let start = linkKey(target, value)
        try txn.scan(targetLinks, from: start, to: prefixed(target, Array(value.utf8) + [1])) { k, _ in
            out.append(String(decoding: k[start.count...], as: UTF8.self))
            return out.count < limit
        }
        return out
    }

    /// Adds a user to the link index; the linked-accounts gauge counts values with two users or more.
    func addLink(target: String, value: String, brokerID: String, _ txn: borrowing WriteTransaction) throws {
        let others = try linkMembers(target: target, value: value, limit: 2, txn).filter { $0 != brokerID }
        try txn.put(targetLinks, linkKey(target, value, brokerID), [])
        if others.count == 1 { try addToCounter("links/\(target)", 1, txn) }
    }

    /// Removes a user from the link index; returns one user still linked under the value, if any.
    func removeLink(target: String, value: String, brokerID: String, _ txn: borrowing WriteTransaction) throws -> String? {
        guard try txn.delete(targetLinks, linkKey(target, value, brokerID)) else {
            return try linkMembers(target: target, value: value, limit: 1, txn).first
        }
        let rest = try linkMembers(target: target, value: value, limit: 2, txn)
        if rest.count == 1 { try addToCounter("links/\(target)", -1, txn) }
        return rest.first
    }

    func addToCounter(_ name: String, _ delta: Int64, _ txn: borrowing WriteTransaction) throws {
        let key = Array(name.utf8)
        let now = Int64(bitPattern: try txn.get(targetState, key).flatMap(UInt64.init(bigEndianBytes:)) ?? 0)
        try txn.put(targetState, key, UInt64(bitPattern: max(0, now + delta)).bigEndianBytes)
    }

    /// `collisions: link`: the users linked under `value` (read for a delivery).
    func linkMembers(target: String, value: String) throws -> [String] {
        try environment.read { txn in
            var out: [String] = []
            let start = linkKey(target, value)
            try txn.scan(targetLinks, from: start, to: prefixed(target, Array(value.utf8) + [1])) { k, _ in
                out.append(String(decoding: k[start.count...], as: UTF8.self))
                return true
            }
            return out
        }
    }

    /// `collisions: link`: the apply keeps the link index; when a target's
    /// link attribute or routes change (or it is new), the index is built
    /// again from the directory, once, at start: one pass over the
    /// directory, nothing queued (`targets reconcile --apply` then merges
    /// the accounts of users that are now linked). True: it was rebuilt.
    /// A target that is not `link` (any more) loses its index and
    /// fingerprint, so that turning link on again rebuilds the index: the
    /// apply does not keep it meanwhile.
    func rebuildLinkIndexIfNeeded(_ target: TargetConfiguration) throws -> Bool {
        let stateKey = Array("linkindex/\(target.name)".utf8)
        let targetState = self.targetState, targetLinks = self.targetLinks
        func dropIndex(_ txn: borrowing WriteTransaction) throws {
            var stale: [[UInt8]] = []
            try txn.scan(targetLinks, from: prefixed(target.name, []), to: prefixEnd(target.name)) { k, _ in
                stale.append(k); return true
            }
            for k in stale { _ = try txn.delete(targetLinks, k) }
            _ = try txn.delete(targetState, Array("links/\(target.name)".utf8))
        }
        guard let link = target.collisions.linkPolicy else {
            try environment.write { txn in
                guard try txn.get(targetState, stateKey) != nil else { return }
                try dropIndex(txn)
                _ = try txn.delete(targetState, stateKey)
            }
            return false
        }
        let fingerprint = Array(
            ([link.attribute, link.sourceOfRecord.joined(separator: ",")]
                + target.routes.map { "\($0.domains)|\($0.types)|\($0.filter ?? "")" })
                .joined(separator: "\n").utf8)
        return try environment.write { txn in
            if try txn.get(targetState, stateKey) == fingerprint { return false }
            try dropIndex(txn)
            var linked: [(value: String, brokerID: String)] = []
            try forEachDirectoryEntry("User", members: false, from: nil, txn) { _, e in
                guard let id = e.resource["id"]?.stringValue else { return true }
                if target.routes(domain: e.domain, type: "User", e.resource), let value = link.value(of: e.resource, domain: e.domain) {
                    linked.append((value, id))
                }
                return true
            }
            for (value, id) in linked { try addLink(target: target.name, value: value, brokerID: id, txn) }
            try txn.put(targetState, stateKey, fingerprint)
            return true
        }
    }

    /// Accounts at `target` that two users or more share (`collisions: link`).
    func linkedAccounts(target: String) throws -> Int {
        let targetState = self.targetState
        return try environment.read { txn in
            Int(Int64(bitPattern: try txn.get(targetState, Array("links/\(target)".utf8)).flatMap(UInt64.init(bigEndianBytes:)) ?? 0))
        }
    }

    /// Returns the item's sequence in the target's queue.
    @discardableResult
    func enqueue(target: String, _ item: DeliveryItem, _ txn: borrowing WriteTransaction) throws -> UInt64 {
        let seq = try nextCounter("seq/\(target)", txn)
        try txn.put(fanout, prefixed(target, seq.bigEndianBytes), item.json.serialized())
        return seq
    }

    func nextCounter(_ name: String, _ txn: borrowing WriteTransaction) throws -> UInt64 {
        let key = Array(name.utf8)
        let next = (try txn.get(targetState, key).flatMap(UInt64.init(bigEndianBytes:)) ?? 0) + 1
        try txn.put(targetState, key, next.bigEndianBytes)
        return next
    }

    /// Records one hop of a change in the resource's trail (and the trace
    /// id's index); `sweepTrail` removes them after the retention.
    func recordHop(
        brokerID: String, trace: String, _ hop: JSONObject, _ txn: borrowing WriteTransaction,
        now: Int64 = unixMicroseconds()
    ) throws {
        var value = hop
        value["at"] = .number(JSONNumber(integer: now / 1000))
        value["trace"] = .string(trace)
        let name = hop["hop"]?.stringValue ?? ""
        try txn.put(trail, prefixed(brokerID, UInt64(now).bigEndianBytes + Array(name.utf8)), JSON.object(value).serialized())
        if !trace.isEmpty { try txn.put(traces, prefixed(trace, brokerID), UInt64(now).bigEndianBytes) }
    }

    /// One step of the background sweep that keeps the trail bounded (hops of
    /// resources that changed no more, deleted ones included, and their trace
    /// index entries): looks at up to `limit` keys of each table from the
    /// cursors, deletes what is past the retention, and returns where to go
    /// on (nil: the table's end; the next sweep starts again from the top).
    func sweepTrail(
        trailFrom: [UInt8]?, tracesFrom: [UInt8]?, limit: Int, now: Int64 = unixMicroseconds(),
        _ txn: borrowing WriteTransaction
    ) throws -> (trail: [UInt8]?, traces: [UInt8]?, deleted: Int) {
        let cutoff = UInt64(max(0, now - trailRetentionMicroseconds))
        var stale: [[UInt8]] = []
        var seen = 0
        var nextTrail: [UInt8]?
        try txn.scan(trail, from: trailFrom) { k, _ in
            seen += 1
            if seen > limit { nextTrail = k; return false }
            if let zero = k.firstIndex(of: 0), k.count >= zero + 9,
                let t = UInt64(bigEndianBytes: Array(k[(zero + 1)...(zero + 8)])), t < cutoff
            {
                stale.append(k)
            }
            return true
        }
        for k in stale { _ = try txn.delete(trail, k) }
        var deleted = stale.count
        stale.removeAll()
        seen = 0
        var nextTraces: [UInt8]?
        try txn.scan(traces, from: tracesFrom) { k, v in
            seen += 1
            if seen > limit { nextTraces = k; return false }
            if (UInt64(bigEndianBytes: v) ?? 0) < cutoff { stale.append(k) }
            return true
        }
        for k in stale { _ = try txn.delete(traces, k) }
        deleted += stale.count
        return (nextTrail, nextTraces, deleted)
    }

    /// The hops of a change: for a broker id, or for the resources a trace
    /// id touched. Each target's delivery records one hop that carries the
    /// agent's acceptance and the broker's apply times; the current state of
    /// the resource adds its own last acceptance and apply (no target needed).
    /// A removal the deletion guard holds has no hop yet: it adds one that
    /// says so (`heldSince`, `target`), from the paused target's queue.
    /// `idOrTrace` may also be what an operator knows of a resource: its
    /// `userName`, `externalId`, an email or a group's `displayName`
    /// (indexed), its id at a target or at its source (the store's
    /// `resolveTrail`).
    /// What it reads is bounded by `limits`: the earliest `limits.hops` hops
    /// are kept as they are found (the memory is that of those, whatever
    /// the trace touched), and `Trail.complete` says whether everything the
    /// query names was read.
    func trail(_ idOrTrace: String, limits: TrailLimits = TrailLimits()) throws -> Trail {
        let trail = self.trail
        return try environment.read { txn in
            let named = try resolveTrail(idOrTrace, limits: limits, txn)
            var ids = named.ids, byTrace = named.byTrace
            var out = Trail()
            out.resourcesTotal = named.total
            out.complete = named.total == ids.count
            out.scanStopped = named.scanStopped
            let (held, heldComplete) = try heldRemovals(matching: idOrTrace, budget: limits.queue, txn)
            out.complete = out.complete && heldComplete
            if ids.isEmpty && !held.isEmpty {
                // Deleted at the source and held before any target answered: only the queue knows it.
                byTrace = !held.contains { $0.item.brokerID == idOrTrace }
                for h in held where !ids.contains(h.item.brokerID) { ids.append(h.item.brokerID) }
                out.resourcesTotal = ids.count
            }
            // Hops of one millisecond in the order a change takes them.
            func rank(_ hop: JSONObject) -> Int {
                let name = hop["hop"]?.stringValue ?? ""
                return name == "agent accept" ? 0 : name == "broker apply" ? 1 : name.hasPrefix("feed ") ? 2 : name.hasPrefix("app") ? 4 : 3
            }
            func earlier(_ x: (String, JSONObject), _ y: (String, JSONObject)) -> Bool {
                let a = x.1["at"]?.numberValue?.integer ?? 0, b = y.1["at"]?.numberValue?.integer ?? 0
                return a != b ? a < b : rank(x.1) < rank(y.1)
            }
            var hops: [(String, JSONObject)] = []
            var keys: [String] = []  // each hop's key in `seen`, beside it
            // A hop's index in `hops`, or -1 once it was dropped as later than the kept ones.
            var seen: [String: Int] = [:]
            func add(_ id: String, _ name: String, _ at: Int64?, _ trace: String?, _ extra: JSONObject = [:]) {
                guard let at, at > 0, !byTrace || trace == idOrTrace else { return }
                let key = "\(id) \(name) \(at) \(trace ?? "")"
                if let i = seen[key] {
                    // The same hop seen again (from another target's record, or the resource): what it adds is kept.
                    if i >= 0 { for (k, v) in extra where hops[i].1[k] == nil { hops[i].1[k] = v } }
                    return
                }
                seen[key] = hops.count
                var o = extra
                o["hop"] = .string(name)
                o["at"] = .number(JSONNumber(integer: at))
                if let trace { o["trace"] = .string(trace) }
                out.total += 1
                hops.append((id, o))
                keys.append(key)
                if limits.hops <= Int.max / 2 && hops.count >= 2 * max(1, limits.hops) {
                    // A top-N as they come: the earliest are kept (`seen` follows their new places).
                    let order = hops.indices.sorted { earlier(hops[$0], hops[$1]) }
                    for k in order[limits.hops...] { seen[keys[k]] = -1 }
                    hops = order.prefix(limits.hops).map { hops[$0] }
                    keys = order.prefix(limits.hops).map { keys[$0] }
                    for (i, k) in keys.enumerated() { seen[k] = i }
                }
            }
            var reads = 0
            for id in ids {
                guard reads < limits.reads else {
                    out.complete = false
                    break
                }
                out.resources.append(id)
                try txn.scan(trail, from: prefixed(id, []), to: prefixEnd(id)) { _, v in
                    guard reads < limits.reads else {
                        out.complete = false
                        return false
                    }
                    reads += 1
                    guard let o = try JSONParser.parse(v, limits: .stored).objectValue else { return true }
                    let trace = o["trace"]?.stringValue
                    add(id, "agent accept", o["accepted"]?.numberValue?.integer, trace)
                    add(id, "broker apply", o["applied"]?.numberValue?.integer, trace)
                    if let issued = o["issued"]?.numberValue?.integer, let target = o["target"]?.stringValue {
                        // A boundary's commit: its feed issued the event first.
                        add(id, "feed \(target)", issued, trace, ["feedSeq": o["feedSeq"] ?? .null, "event": o["event"] ?? .null])
                    }
                    var target = o
                    target["accepted"] = nil
                    target["applied"] = nil
                    target["issued"] = nil
                    add(id, o["hop"]?.stringValue ?? "target", o["at"]?.numberValue?.integer, trace, target)
                    return true
                }
                if let source = try deliveryEntry(id, members: false, txn)?.resource[sourceExtensionSchema]?.objectValue {
                    let trace = source["trace"]?.stringValue
                    let extra: JSONObject = [
                        "domain": source["domain"] ?? .null, "sourceId": source["id"] ?? .null, "seq": source["seq"] ?? .null,
                    ]
                    add(id, "agent accept", source["accepted"]?.numberValue?.integer, trace, extra)
                    add(id, "broker apply", source["applied"]?.numberValue?.integer, trace, ["seq": source["seq"] ?? .null])
                }
            }
            for h in held {
                let id = h.item.brokerID, trace = h.item.trace
                add(id, "agent accept", h.item.acceptedAt, trace)
                add(id, "broker apply", h.item.queuedAt, trace)
                add(
                    id, "target \(h.target)", h.heldSince, trace,
                    [
                        "event": .string(h.item.operation.rawValue), "detail": .string("held by the deletion guard of target \(h.target)"),
                        "target": .string(h.target), "heldSince": .number(JSONNumber(integer: h.heldSince)),
                        "queueSeq": .number(JSONNumber(integer: Int64(h.seq))),
                    ])
            }
            hops.sort(by: earlier)
            out.hops = Array(hops.prefix(limits.hops)).map { (brokerID: $0.0, hop: $0.1) }
            return out
        }
    }

    // MARK: queue and mapping access for the delivery worker and the CLI

    /// Up to `limit` queued items of `target` after `after` (a queue key).
    func queued(target: String, after: [UInt8]?, limit: Int) throws -> [(key: [UInt8], item: DeliveryItem)] {
        let fanout = self.fanout
        return try environment.read { txn in
            var out: [([UInt8], DeliveryItem)] = []
            let start = after.map { $0 + [0] } ?? prefixed(target, [])
            try txn.scan(fanout, from: start, to: prefixEnd(target)) { k, v in
                if let item = DeliveryItem(v) { out.append((k, item)) }
                return out.count < limit
            }
            return out
        }
    }

    /// The key of the last queued item of `target` (nil: empty), without reading the rest.
    func lastQueueKey(target: String) throws -> [UInt8]? {
        let fanout = self.fanout
        return try environment.read { txn in
            var last: [UInt8]?
            try txn.scan(fanout, from: prefixed(target, []), to: prefixEnd(target), reverse: true) { k, _ in
                last = k
                return false
            }
            return last
        }
    }

    /// Queue depth and the oldest item's queue time (Unix ms; 0: empty).
    func queueDepth(target: String) throws -> (count: Int, oldest: Int64) {
        let d = try queueCount(target: target)
        return (d.count, d.oldest)
    }

    /// The queue's depth, the oldest item's queue time and the last key, in one snapshot.
    func queueCount(target: String) throws -> (count: Int, oldest: Int64, last: [UInt8]?) {
        let fanout = self.fanout
        return try environment.read { txn in
            var n = 0
            var oldest: Int64 = 0
            try txn.scan(fanout, from: prefixed(target, []), to: prefixEnd(target)) { _, v in
                if n == 0 { oldest = DeliveryItem(v)?.queuedAt ?? 0 }
                n += 1
                return true
            }
            var last: [UInt8]?
            try txn.scanKeys(fanout, from: prefixed(target, []), to: prefixEnd(target), reverse: true) { k in
                last = k
                return false
            }
            return (n, oldest, last)
        }
    }

    /// How many items were queued for `target` after the key `after` (nil:
    /// from the first), and the last one's key: what a worker has not
    /// counted yet, in O(new items).
    func queuedSince(target: String, after: [UInt8]?) throws -> (count: Int, last: [UInt8]?) {
        let fanout = self.fanout
        return try environment.read { txn in
            var n = 0
            var last = after
            try txn.scanKeys(fanout, from: after.map { $0 + [0] } ?? prefixed(target, []), to: prefixEnd(target)) { k in
                n += 1
                last = k
                return true
            }
            return (n, last)
        }
    }

    /// Records (or, with nil, forgets) which target account a broker id has,
    /// and keeps the reverse index (`targetOwners`) that tells whose an
    /// account is, so that no other resource adopts it. A group's mapping
    /// forgotten takes its member index there with it, later
    /// (`clearGroupIndexLater`).
    func setMapping(
        target: String, type: String, brokerID: String, _ mapping: TargetMapping?,
        _ txn: borrowing WriteTransaction
    ) throws {
        let key = prefixed(target, brokerID)
        if let old = try txn.get(targetIds, key).flatMap(TargetMapping.init), old.targetID != mapping?.targetID {
            let oldOwner = ownerKey(target, type, old.targetID)
            if try txn.get(targetOwners, oldOwner).map({ String(decoding: $0, as: UTF8.self) }) == brokerID {
                // A shared (linked) account stays owned while another linked
                // user's mapping still names it: the entry moves to that user.
                var heir: String?
                if let shared = old.link {
                    for other in try linkMembers(target: target, value: shared, txn) where other != brokerID {
                        if try txn.get(targetIds, prefixed(target, other)).flatMap(TargetMapping.init)?.targetID == old.targetID {
                            heir = other
                            break
                        }
                    }
                }
                if let heir { try txn.put(targetOwners, oldOwner, Array(heir.utf8)) } else { _ = try txn.delete(targetOwners, oldOwner) }
            }
        }
        if let mapping {
            try txn.put(targetIds, key, mapping.json.serialized())
            try txn.put(targetOwners, ownerKey(target, type, mapping.targetID), Array(brokerID.utf8))
        } else if try txn.delete(targetIds, key), type == "Group" {
            // What the target held of the group's members is forgotten after this, a chunk a transaction.
            try clearGroupIndexLater(target: target, group: brokerID, txn)
        }
    }

    /// The broker id whose mapping names account `targetID` at the target, if any.
    func accountOwner(target: String, type: String, targetID: String) throws -> String? {
        let targetOwners = self.targetOwners
        return try environment.read { txn in
            try txn.get(targetOwners, ownerKey(target, type, targetID)).map { String(decoding: $0, as: UTF8.self) }
        }
    }

    /// What the broker knows of `brokerID`'s account at `target`.
    func mapping(target: String, brokerID: String) throws -> TargetMapping? {
        let targetIds = self.targetIds
        return try environment.read { txn in try txn.get(targetIds, prefixed(target, brokerID)).flatMap(TargetMapping.init) }
    }

    /// Every mapping of a target: broker id → mapping.
    func mappings(target: String) throws -> [String: TargetMapping] {
        let targetIds = self.targetIds
        return try environment.read { txn in
            var out: [String: TargetMapping] = [:]
            try txn.scan(targetIds, from: prefixed(target, []), to: prefixEnd(target)) { k, v in
                if let m = TargetMapping(v) { out[String(decoding: k[(target.utf8.count + 1)...], as: UTF8.self)] = m }
                return true
            }
            return out
        }
    }

    /// Completes deliveries: drops their queue entries, records the
    /// mapping (nil: forget it), a dead letter, and the trail hop.
    /// `linked`: the other users sharing the account (`collisions: link`)
    /// get the same mapping.
    /// A group's `indexing` says what its mapping's members mean
    /// (`TargetMembers.swift`); a user whose account changed gets its
    /// groups there queued. Returns how many items that queued.
    @discardableResult
    func completeDelivery(
        target: String, keys: [[UInt8]], brokerID: String, type: String, mapping: TargetMapping??,
        linked: [String] = [], deadLetter: JSONObject?, hop: JSONObject?, trace: String, indexing: GroupIndexing = .none,
        domain: String? = nil, _ txn: borrowing WriteTransaction
    ) throws -> Int {
        for k in keys { _ = try txn.delete(fanout, k) }
        var queued = 0
        if case .some(var m) = mapping {
            if type == "Group" {
                if let g = m {
                    let through = keys.compactMap { UInt64(bigEndianBytes: Array($0.suffix(8))) }.max() ?? 0
                    m = try completeGroupMapping(target: target, group: brokerID, g, indexing: indexing, through: through, txn)
                }  // else: its index is forgotten after this (`setMapping`)
            } else if linked.isEmpty {
                let old = try txn.get(targetIds, prefixed(target, brokerID)).flatMap(TargetMapping.init)
                queued += try userAccountChanged(target: target, user: brokerID, old: old, new: m, trace: trace, txn)
            }
            try setMapping(target: target, type: type, brokerID: brokerID, m, txn)
            if let m { for other in linked where other != brokerID { try setMapping(target: target, type: type, brokerID: other, m, txn) } }
        }
        if let deadLetter {
            let seq = try nextCounter("deadseq/\(target)", txn)
            var d = deadLetter
            d["seq"] = .number(JSONNumber(integer: Int64(seq)))
            try txn.put(targetDead, prefixed(target, seq.bigEndianBytes), JSON.object(d).serialized())
        }
        if let hop {
            try recordHop(brokerID: brokerID, trace: trace, hop, txn)
            try deliveryEnded(
                target: target, brokerID: brokerID, type: type, trace: trace, domain: domain, hop: hop, deadLetter: deadLetter, txn)
        }
        return queued
    }

    // MARK: dead letters, the deletion guard, status (shared with the CLI)

    /// Dead letters, oldest first (of `target`, or of all); at most `limit` (the console pages them).
    func deadLetters(target: String?, limit: Int = .max) throws -> [(target: String, letter: JSONObject)] {
        let targetDead = self.targetDead
        return try environment.read { txn in
            var out: [(String, JSONObject)] = []
            try txn.scan(targetDead, from: target.map { prefixed($0, []) }, to: target.map(prefixEnd)) { k, v in
                let name = String(decoding: k.prefix { $0 != 0 }, as: UTF8.self)
                if let o = try JSONParser.parse(v, limits: .stored).objectValue { out.append((name, o)) }
                return out.count < limit
            }
            return out
        }
    }

    /// How many dead letters `target` has (keys only).
    func deadLetterCount(target: String) throws -> Int {
        let targetDead = self.targetDead
        return try environment.read { txn in
            var n = 0
            try txn.scanKeys(targetDead, from: prefixed(target, []), to: prefixEnd(target)) { _ in
                n += 1
                return true
            }
            return n
        }
    }

    /// Removes dead letters of `target` (`seq` nil: all); with `requeue`,
    /// queues the resource again (its current state is delivered), with the
    /// item's `account` and `link` as they were (a letter written before
    /// they were kept: the link value of the resource as it is now, with
    /// `linkPolicy`, else the one of the store's configured target).
    /// All of them: those up to `through` (the console's: the highest the
    /// operator was shown; `DeadLetterError.newer`, changing nothing, when
    /// there are more now), else up to the highest there is when it starts;
    /// in transactions of at most `chunk` letters (a later run finishes an
    /// interrupted one).
    func settleDeadLetters(
        target: String, seq: UInt64?, requeue: Bool, linkPolicy: LinkPolicy? = nil, through: UInt64? = nil, chunk: Int = 1_000
    ) throws -> Int {
        let targetDead = self.targetDead
        let policy = linkPolicy ?? targets.first { $0.name == target }?.collisions.linkPolicy
        var from = seq ?? 1
        let last: UInt64
        if let seq {
            last = seq
        } else {
            let highest = try environment.read { txn in
                var highest: UInt64 = 0
                try txn.scanKeys(targetDead, from: prefixed(target, []), to: prefixEnd(target), reverse: true) { k in
                    highest = UInt64(bigEndianBytes: Array(k.suffix(8))) ?? 0
                    return false
                }
                return highest
            }
            if let through, highest > through {
                let newer = try environment.read { txn in
                    var n = 0
                    try txn.scanKeys(targetDead, from: prefixed(target, (through + 1).bigEndianBytes), to: prefixEnd(target)) { _ in
                        n += 1
                        return true
                    }
                    return n
                }
                throw DeadLetterError.newer(target: target, through: through, count: newer)
            }
            last = through ?? highest
        }
        var settled = 0
        while from <= last {
            let (n, next) = try environment.write { txn in
                var found: [([UInt8], JSONObject)] = []
                var next: UInt64?
                try txn.scan(targetDead, from: prefixed(target, from.bigEndianBytes), to: prefixed(target, (last + 1).bigEndianBytes)) {
                    k, v in
                    guard found.count < chunk else {
                        next = UInt64(bigEndianBytes: Array(k.suffix(8)))
                        return false
                    }
                    if let o = try JSONParser.parse(v, limits: .stored).objectValue { found.append((k, o)) }
                    return true
                }
                for (k, o) in found {
                    _ = try txn.delete(targetDead, k)
                    if requeue, let id = o["id"]?.stringValue, let type = o["type"]?.stringValue,
                        let op = o["op"]?.stringValue.flatMap(DeliveryItem.Operation.init(rawValue:))
                    {
                        var link = o["link"]?.stringValue
                        if link == nil, type == "User", let policy { link = try currentLinkValue(brokerID: id, policy, txn) }
                        try enqueue(
                            target: target,
                            DeliveryItem(
                                brokerID: id, type: type, operation: op, trace: o["trace"]?.stringValue ?? "",
                                queuedAt: unixMilliseconds(), acceptedAt: 0, link: link, account: o["account"]?.stringValue), txn)
                    }
                }
                return (found.count, next)
            }
            settled += n
            guard let next else { break }
            from = next
        }
        return settled
    }

    /// The deletion guard's state: paused since (Unix ms), or nil; the
    /// time of the last confirmation; and of the last `reject-deletes`
    /// (0: never), which tells a running worker to drop what it loaded of
    /// the rejected removals.
    func deletionGuard(target: String) throws -> (pausedSince: Int64?, confirmedAt: Int64, rejectedAt: Int64) {
        try environment.read { txn in try deletionGuard(target: target, txn) }
    }

    func deletionGuard(target: String, _ txn: borrowing some StoreReading & ~Copyable) throws
        -> (pausedSince: Int64?, confirmedAt: Int64, rejectedAt: Int64)
    {
        let o = try txn.get(targetState, Array("guard/\(target)".utf8)).flatMap { try JSONParser.parse($0, limits: .stored).objectValue }
        return (
            o?["pausedSince"]?.numberValue?.integer, o?["confirmedAt"]?.numberValue?.integer ?? 0,
            o?["rejectedAt"]?.numberValue?.integer ?? 0
        )
    }

    /// Writes the pause and the confirmation; `rejectedAt` is kept unless given.
    func setDeletionGuard(
        target: String, pausedSince: Int64?, confirmedAt: Int64, rejectedAt: Int64? = nil,
        _ txn: borrowing WriteTransaction
    ) throws {
        var o: JSONObject = ["confirmedAt": .number(JSONNumber(integer: confirmedAt))]
        if let pausedSince { o["pausedSince"] = .number(JSONNumber(integer: pausedSince)) }
        let rejected = try rejectedAt ?? deletionGuard(target: target, txn).rejectedAt
        if rejected > 0 { o["rejectedAt"] = .number(JSONNumber(integer: rejected)) }
        try txn.put(targetState, Array("guard/\(target)".utf8), JSON.object(o).serialized())
    }

    /// `scim-broker targets confirm-deletes NAME`: releases the removals held back.
    func confirmDeletes(target: String) throws {
        try environment.write { txn in try setDeletionGuard(target: target, pausedSince: nil, confirmedAt: unixMilliseconds(), txn) }
    }

    func saveStatus(target: String, _ status: JSONObject, _ txn: borrowing WriteTransaction) throws {
        try txn.put(targetState, Array("status/\(target)".utf8), JSON.object(status).serialized())
    }

    /// The last status a running broker saved for each target.
    func targetStatuses() throws -> [(String, JSONObject)] {
        let targetState = self.targetState
        return try environment.read { txn in
            var out: [(String, JSONObject)] = []
            try txn.scan(targetState, from: Array("status/".utf8), to: Array("status0".utf8)) { k, v in
                if let o = try JSONParser.parse(v, limits: .stored).objectValue {
                    out.append((String(decoding: k.dropFirst(7), as: UTF8.self), o))
                }
                return true
            }
            return out
        }
    }

    /// `scim-broker targets forget NAME`: removes everything kept for a target
    /// that left the configuration (its queue, account mappings, dead letters,
    /// status, deletion guard and counters). Deletes in transactions of at
    /// most `chunk` entries, so a long queue does not make one huge commit;
    /// running it again finishes an interrupted run. The caller checks that
    /// the target is no longer configured.
    func forgetTarget(_ name: String, chunk: Int = 10_000) throws -> ForgottenTarget {
        var result = ForgottenTarget()
        for (db, field) in [
            (fanout, \ForgottenTarget.queued), (targetIds, \.mappings), (targetOwners, \.owners), (targetDead, \.deadLetters),
            (targetLinks, \.links), (targetMembers, \.members), (targetMemberOf, \.members), (targetPending, \.members),
        ] + otherTargetTables {
            while true {
                let removed = try environment.write { txn in
                    var keys: [[UInt8]] = []
                    try txn.scan(db, from: prefixed(name, []), to: prefixEnd(name)) { k, _ in
                        keys.append(k)
                        return keys.count < chunk
                    }
                    for k in keys { _ = try txn.delete(db, k) }
                    return keys.count
                }
                result[keyPath: field] += removed
                if removed < chunk { break }
            }
        }
        result.stateEntries = try environment.write { txn in
            try [
                "status/", "guard/", "paused/", "seq/", "deadseq/", "links/", "linkindex/", "dlseq/", "dlacked/", "dlattr/", "dlepoch/",
                "dlhopat/",
            ].reduce(0) { n, kind in
                n + (try txn.delete(targetState, Array("\(kind)\(name)".utf8)) ? 1 : 0)
            }
        }
        return result
    }

    /// The link value (`collisions: link`) of a user as the directory holds it now.
    func currentLinkValue(brokerID: String, _ policy: LinkPolicy, _ txn: borrowing WriteTransaction) throws -> String? {
        guard let e = try deliveryEntry(brokerID, members: false, txn), e.type == "User" else { return nil }
        return policy.value(of: e.resource, domain: e.domain)
    }

    /// Queues an item from outside the apply (reconciliation, retries).
    /// With `mapping`, the target account is recorded first (adopting a
    /// stray), for the users in `linked` too (the users of a linked account).
    /// With `collisions: link` (`linkPolicy`, else the store's configured
    /// target) a user's item carries its current link value, so that it
    /// waits for the other deliveries to that account.
    /// With `resend`, the account's state at the target is taken as unknown
    /// (reconcile's drift, `targets push`): the stored mapping, read in this
    /// transaction, forgets its ETag and the body last sent (a group
    /// delivered from the member index keeps its index and count: its
    /// attributes are sent again), so the resource is sent whole.
    func enqueue(
        target: String, brokerID: String, type: String, _ operation: DeliveryItem.Operation,
        mapping: TargetMapping? = nil, linked: [String] = [], account: String? = nil, linkPolicy: LinkPolicy? = nil,
        trace: String = "", resend: Bool = false
    ) throws {
        let policy = type == "User" ? linkPolicy ?? targets.first { $0.name == target }?.collisions.linkPolicy : nil
        try environment.write { txn in
            if resend, var stored = try txn.get(targetIds, prefixed(target, brokerID)).flatMap(TargetMapping.init) {
                stored.sent = stored.members != nil ? [:] : nil
                stored.etag = nil
                try txn.put(targetIds, prefixed(target, brokerID), stored.json.serialized())
            }
            var link = mapping?.link
            if let policy, let now = try currentLinkValue(brokerID: brokerID, policy, txn) { link = now }
            if let mapping {
                for other in linked where other != brokerID { try setMapping(target: target, type: type, brokerID: other, mapping, txn) }
                try setMapping(target: target, type: type, brokerID: brokerID, mapping, txn)
            }
            try enqueue(
                target: target,
                DeliveryItem(
                    brokerID: brokerID, type: type, operation: operation,
                    trace: trace, queuedAt: unixMilliseconds(), acceptedAt: 0, link: link, account: account), txn)
        }
    }
}

/// What `forgetTarget` removed.
public struct ForgottenTarget: Sendable {
    public var queued = 0
    public var mappings = 0
    /// Reverse entries of the mappings (whose an account is).
    public var owners = 0
    /// Link index entries (`collisions: link`).
    public var links = 0
    /// Group member index entries (what the target holds, and what is pending).
    public var members = 0
    public var deadLetters = 0
    /// A boundary's records of its unacknowledged feed events (counted in `queued` already).
    public var feedRecords = 0
    /// Status, deletion guard and counters.
    public var stateEntries = 0
    public var total: Int { queued + mappings + deadLetters + stateEntries }
}
