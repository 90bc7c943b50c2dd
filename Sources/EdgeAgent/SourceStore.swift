import EdgeStore
import SCIM

/// One entry of a source, mapped to its SCIM body on the source's thread
/// (an LDAP entry by `SourceMapping`, a SCIM resource by `SCIMSourceMapping`):
/// what the write path needs, whatever the kind of source.
public struct SourceEntry: Sendable, Equatable {
    /// What names the entry for good (entryUUID, objectGUID, the SCIM id): renames keep it.
    public var key: String
    /// How groups of the same source name it as a member (a normalised DN, a SCIM id).
    public var reference: String
    /// For logs and `sources status` (the DN, the resource's path).
    public var name: String
    public var group: Bool
    /// The SCIM body, without members (those are `members`, resolved in the write transaction).
    public var body: JSONObject
    /// For a group: its members' references.
    public var members: [String]

    public init(key: String, reference: String, name: String, group: Bool, body: JSONObject, members: [String] = []) {
        self.key = key
        self.reference = reference
        self.name = name
        self.group = group
        self.body = body
        self.members = members
    }
}

/// One change read from a source.
public enum SourceChange: Sendable, Equatable {
    /// The entry as it is now (added, modified or renamed).
    case upsert(SourceEntry)
    /// The entry with this key is gone (or left the source's filters).
    case delete(key: String)
    /// An entry that cannot even be keyed: recorded as a failure in the batch's transaction.
    case unmappable(dn: String, reason: String)
}

/// What a source hands to the agent's loop: one write transaction's worth.
/// The position (the sync cookie or the polling high-water mark) is stored
/// in the same transaction as the writes it covers, so a restart resumes
/// exactly there.
public struct SourceBatch: Sendable {
    public var source: String
    public var mode: String
    public var changes: [SourceChange]
    /// The new position; nil: unchanged (a batch in the middle of a refresh).
    public var position: [UInt8]?
    /// A full comparison: every entry known from this source whose key is
    /// not in the set (nor in `changes`) is gone.
    public var keepOnly: Set<String>?
    /// Unix seconds (the agent's clock) up to which every change of the
    /// source is in this batch or before it (a poll's start, an idle
    /// persistent search); nil: not known from this batch.
    public var caughtUpAt: Int64?
    /// Unix seconds (the source's clock) of the newest change in this
    /// batch, when the source says (modifyTimestamp, a CSN, lastModified).
    public var newestChange: Int64?

    public init(source: String, mode: String, changes: [SourceChange], position: [UInt8]? = nil, keepOnly: Set<String>? = nil) {
        self.source = source
        self.mode = mode
        self.changes = changes
        self.position = position
        self.keepOnly = keepOnly
    }
}

/// What one batch did.
public struct SourceBatchResult: Sendable {
    /// Resources created, replaced, deactivated or deleted.
    public var written = 0
    /// Entries whose mapped resource was already stored as it is (a repeat after a restart).
    public var unchanged = 0
    public var deleted = 0
    /// Entries that could not be mapped or were refused by validation: their DN and why.
    public var failures: [(dn: String, reason: String)] = []
}

/// A source's state as stored (`sources status`, `/metrics` at start).
public struct SourceStatus: Sendable {
    public var name: String
    public var mode = ""
    /// The position as text (OpenLDAP's cookies and the high-water mark are text).
    public var position: String?
    public var entries = 0
    public var written = 0
    public var errors = 0
    /// Unix seconds of the last batch committed; 0: never.
    public var lastSuccess: Int64 = 0
    /// The newest `caughtUpAt` and `newestChange` committed (`SourceBatch`); 0: none.
    public var caughtUpAt: Int64 = 0
    public var newestChange: Int64 = 0
    public var lastFailures: [(dn: String, reason: String, at: Int64)] = []

    public init(name: String) { self.name = name }

    init(name: String, json: JSONObject, position: [UInt8]?) {
        self.name = name
        mode = json["mode"]?.stringValue ?? ""
        entries = Int(json["entries"]?.numberValue?.integer ?? 0)
        written = Int(json["written"]?.numberValue?.integer ?? 0)
        errors = Int(json["errors"]?.numberValue?.integer ?? 0)
        lastSuccess = json["lastSuccess"]?.numberValue?.integer ?? 0
        caughtUpAt = json["caughtUpAt"]?.numberValue?.integer ?? 0
        newestChange = json["newestChange"]?.numberValue?.integer ?? 0
        lastFailures = (json["lastFailures"]?.arrayValue ?? []).map {
            ($0["dn"]?.stringValue ?? "", $0["reason"]?.stringValue ?? "", $0["at"]?.numberValue?.integer ?? 0)
        }
        self.position = position.map { String(decoding: $0, as: UTF8.self) }
    }

    /// How far behind its source the store may be at `now`, in seconds:
    /// since the latest moment up to which every change of the source is
    /// known committed (a poll's start, an idle persistent search), or,
    /// when the source cannot say that, since the newest committed change
    /// happened there. nil: nothing committed says. `live`: a later such
    /// moment the running source knows without having written it.
    public func lag(now: Int64, live: Int64 = 0) -> Int64? {
        let mark = max(caughtUpAt, newestChange, live)
        return mark == 0 ? nil : max(0, now - mark)
    }

    var json: JSONObject {
        [
            "mode": .string(mode), "entries": .number(JSONNumber(integer: Int64(entries))),
            "written": .number(JSONNumber(integer: Int64(written))), "errors": .number(JSONNumber(integer: Int64(errors))),
            "lastSuccess": .number(JSONNumber(integer: lastSuccess)),
            "caughtUpAt": .number(JSONNumber(integer: caughtUpAt)), "newestChange": .number(JSONNumber(integer: newestChange)),
            "lastFailures": .array(
                lastFailures.map {
                    ["dn": .string($0.dn), "reason": .string($0.reason), "at": .number(JSONNumber(integer: $0.at))]
                }),
        ]
    }
}

/// What the store remembers of one entry of a source (`sources`
/// `<source>\0k\0<key>`): the resource it became, its DN and, for a group,
/// its body and member DNs (members are resolved to ids as their entries
/// arrive).
struct SourceRecord {
    var type: String
    var id: String
    var dn: String
    var gone = false
    var body: JSONObject?
    var members: [String] = []

    init(type: String, id: String, dn: String) {
        self.type = type
        self.id = id
        self.dn = dn
    }

    init?(_ bytes: [UInt8]) {
        guard let o = try? JSONParser.parse(bytes, limits: .stored).objectValue, let t = o["t"]?.stringValue,
            let id = o["id"]?.stringValue, let dn = o["dn"]?.stringValue
        else { return nil }
        type = t
        self.id = id
        self.dn = dn
        gone = o["gone"]?.boolValue ?? false
        body = o["body"]?.objectValue
        members = o["members"]?.arrayValue?.compactMap(\.stringValue) ?? []
    }

    var bytes: [UInt8] {
        var o: JSONObject = ["t": .string(type), "id": .string(id), "dn": .string(dn)]
        if gone { o["gone"] = true }
        if let body { o["body"] = .object(body) }
        if !members.isEmpty { o["members"] = .array(members.map(JSON.string)) }
        return JSON.object(o).serialized()
    }
}

/// The keys of the `sources` database.
enum SourceKey {
    static func position(_ s: String) -> [UInt8] { Array("\(s)\u{0}cookie".utf8) }
    static func status(_ s: String) -> [UInt8] { Array("\(s)\u{0}status".utf8) }
    static func record(_ s: String, _ key: String) -> [UInt8] { Array("\(s)\u{0}k\u{0}\(key)".utf8) }
    static func records(_ s: String) -> ([UInt8], [UInt8]) { (Array("\(s)\u{0}k\u{0}".utf8), Array("\(s)\u{0}k\u{1}".utf8)) }
    static func dn(_ s: String, _ dn: String) -> [UInt8] { Array("\(s)\u{0}d\u{0}\(dn)".utf8) }
    static func pending(_ s: String, _ dn: String, _ group: String) -> [UInt8] { Array("\(s)\u{0}p\u{0}\(dn)\u{0}\(group)".utf8) }
    static func pendingRange(_ s: String, _ dn: String) -> ([UInt8], [UInt8]) {
        (Array("\(s)\u{0}p\u{0}\(dn)\u{0}".utf8), Array("\(s)\u{0}p\u{0}\(dn)\u{1}".utf8))
    }
}

/// The failures kept for `sources status`.
let keptSourceFailures = 10

extension AgentStore {
    /// The stored position of `source` (its sync cookie or high-water mark).
    public func sourcePosition(_ source: String) throws -> [UInt8]? {
        try environment.read { txn in try txn.get(sources, SourceKey.position(source)) }
    }

    /// Every source with state in this store, by name (a walk of the
    /// `sources` database: for the operator's command, not the write path).
    public func sourceStatuses() throws -> [SourceStatus] {
        var names: [String] = []
        try environment.read { txn in
            try txn.scanKeys(sources) { k in
                let key = String(decoding: k, as: UTF8.self)
                if key.hasSuffix("\u{0}status") { names.append(String(key.dropLast("\u{0}status".count))) }
                return true
            }
        }
        return try names.map(sourceStatus)
    }

    /// The status of one source (empty when it never wrote): two reads, whatever the number of entries.
    public func sourceStatus(_ source: String) throws -> SourceStatus {
        try environment.read { txn in
            guard let bytes = try txn.get(sources, SourceKey.status(source)),
                let o = try JSONParser.parse(bytes, limits: .stored).objectValue
            else { return SourceStatus(name: source) }
            return SourceStatus(name: source, json: o, position: try txn.get(sources, SourceKey.position(source)))
        }
    }

    /// Applies one batch of a source in `txn`, through the same writes as
    /// the SCIM endpoint (validation, uniqueness, local policy, outbox),
    /// then stores the batch's position and the source's status. Each
    /// change runs in a nested transaction: one that cannot be mapped or
    /// is refused is undone alone, recorded as a failure, and the others
    /// go on. Store errors end the whole batch (the writer retries or
    /// fails it, and the position stays where it was). `contexts`: one per
    /// change, then one for the deletions of `keepOnly`. Deterministic
    /// given the contexts and the store.
    public func applySource(
        _ batch: SourceBatch, onDelete: SourceDeletion, contexts: [WriteContext],
        profile: ClientProfile, in txn: borrowing WriteTransaction
    ) throws -> SourceBatchResult {
        precondition(contexts.count == batch.changes.count + 1, "one context per change and one for the comparison")
        var result = SourceBatchResult()
        var entriesDelta = 0
        let s = batch.source
        var seen = Set<String>()
        for (change, ctx) in zip(batch.changes, contexts) {
            if case .unmappable(let dn, let reason) = change {
                result.failures.append((dn, reason))
                continue
            }
            do {
                try txn.nested { sub in
                    switch change {
                    case .upsert(let entry):
                        seen.insert(entry.key)
                        let (wrote, added) = try upsertEntry(entry, s, ctx, profile, sub)
                        if wrote { result.written += 1 } else { result.unchanged += 1 }
                        if added { entriesDelta += 1 }
                    case .delete(let key):
                        seen.insert(key)
                        let (wrote, removed) = try removeEntry(key: key, s, onDelete, ctx, profile, sub)
                        if wrote { result.written += 1; result.deleted += 1 }
                        if removed { entriesDelta -= 1 }
                    case .unmappable: break
                    }
                }
            } catch let e as SourceMappingError {
                result.failures.append((change.dn, e.message))
            } catch let e as SCIMError {
                result.failures.append((change.dn, e.detail))
            }
        }
        if let keep = batch.keepOnly {
            var gone: [String] = []
            let (from, to) = SourceKey.records(s)
            try txn.scan(sources, from: from, to: to) { k, v in
                let key = String(decoding: k.dropFirst(from.count), as: UTF8.self)
                if !keep.contains(key) && !seen.contains(key), let r = SourceRecord(v), !r.gone { gone.append(key) }
                return true
            }
            for key in gone {
                do {
                    try txn.nested { sub in
                        let (wrote, removed) = try removeEntry(key: key, s, onDelete, contexts.last!, profile, sub)
                        if wrote { result.written += 1; result.deleted += 1 }
                        if removed { entriesDelta -= 1 }
                    }
                } catch let e as SCIMError {
                    result.failures.append(("(key \(key))", e.detail))
                }
            }
        }
        if let position = batch.position { try txn.put(sources, SourceKey.position(s), position) }
        var status =
            try txn.get(sources, SourceKey.status(s)).flatMap { b in
                (try? JSONParser.parse(b, limits: .stored).objectValue).map { SourceStatus(name: s, json: $0, position: nil) }
            } ?? SourceStatus(name: s)
        status.mode = batch.mode
        status.entries = max(0, status.entries + entriesDelta)
        status.written += result.written
        status.errors += result.failures.count
        status.lastSuccess = contexts.last!.epochSeconds
        if let t = batch.caughtUpAt { status.caughtUpAt = max(status.caughtUpAt, t) }
        if let t = batch.newestChange { status.newestChange = max(status.newestChange, t) }
        status.lastFailures = Array(
            (status.lastFailures + result.failures.map { ($0.dn, $0.reason, contexts.last!.epochSeconds) }).suffix(keptSourceFailures))
        try txn.put(sources, SourceKey.status(s), JSON.object(status.json).serialized())
        return result
    }

    /// Creates or updates the resource of `entry`. Returns whether anything
    /// was written and whether the entry is new to the source.
    private func upsertEntry(
        _ entry: SourceEntry, _ s: String, _ ctx: WriteContext, _ profile: ClientProfile, _ txn: borrowing WriteTransaction
    ) throws -> (wrote: Bool, added: Bool) {
        let group = entry.group, key = entry.key
        let type = registry.resourceType(group ? "Group" : "User")!
        var body = entry.body
        if !group && body["active"] == nil { body["active"] = true }
        let dn = entry.reference
        var record = try txn.get(sources, SourceKey.record(s, key)).flatMap(SourceRecord.init)
        let added = record == nil || record!.gone
        if let r = record, r.type != type.id {
            // A user became a group (or back): a new resource.
            if try load(txn, registry.resourceType(r.type)!, r.id) != nil {
                _ = try apply(.delete(registry.resourceType(r.type)!, id: r.id), ctx, profile: profile, in: txn)
            }
            record = nil
        }
        if let old = record?.dn, old != dn, try txn.get(sources, SourceKey.dn(s, old)) == Array(key.utf8) {
            _ = try txn.delete(sources, SourceKey.dn(s, old))
        }
        try txn.put(sources, SourceKey.dn(s, dn), Array(key.utf8))
        var members: [String] = []
        if group {
            for old in record?.members ?? [] { _ = try txn.delete(sources, SourceKey.pending(s, old, key)) }
            members = entry.members
            body["members"] = try resolveMembers(members, group: key, s, txn)
        }
        let (id, wrote) = try upsertResource(type, id: record?.id, body: body, ctx, profile, txn, mayCreate: true)!
        var stored = record ?? SourceRecord(type: type.id, id: id, dn: dn)
        stored.id = id
        stored.dn = dn
        stored.gone = false
        if group {
            var plain = body
            plain["members"] = nil
            stored.body = plain
            stored.members = members
        }
        let renamed = record?.dn != dn
        try txn.put(sources, SourceKey.record(s, key), stored.bytes)
        if renamed { try resolvePending(dn: dn, s, ctx, profile, txn) }
        return (wrote, added)
    }

    /// Member DNs to SCIM members: the ids of the entries known by those
    /// DNs; the others wait in `pending` for their entry to arrive.
    private func resolveMembers(_ dns: [String], group: String, _ s: String, _ txn: borrowing WriteTransaction) throws -> JSON? {
        var members: [JSON] = []
        for dn in dns {
            if let key = try txn.get(sources, SourceKey.dn(s, dn)), key != Array(group.utf8),
                let r = try txn.get(sources, SourceKey.record(s, String(decoding: key, as: UTF8.self))).flatMap(SourceRecord.init)
            {
                members.append(["value": .string(r.id), "type": .string(r.type)])
            } else {
                try txn.put(sources, SourceKey.pending(s, dn, group), [])
            }
        }
        return members.isEmpty ? nil : .array(members)
    }

    /// The groups waiting for `dn` get it as a member now.
    private func resolvePending(dn: String, _ s: String, _ ctx: WriteContext, _ profile: ClientProfile, _ txn: borrowing WriteTransaction)
        throws
    {
        var groups: [String] = []
        let (from, to) = SourceKey.pendingRange(s, dn)
        try txn.scanKeys(sources, from: from, to: to) { k in
            groups.append(String(decoding: k.dropFirst(from.count), as: UTF8.self))
            return true
        }
        let groupType = registry.resourceType("Group")!
        for g in groups {
            _ = try txn.delete(sources, SourceKey.pending(s, dn, g))
            guard var r = try txn.get(sources, SourceKey.record(s, g)).flatMap(SourceRecord.init), var body = r.body, !r.gone else {
                continue
            }
            body["members"] = try resolveMembers(r.members, group: g, s, txn)
            // Only an update: a group deleted here meanwhile is not made again by a member's arrival.
            _ = try upsertResource(groupType, id: r.id, body: body, ctx, profile, txn, mayCreate: false)
            r.body = body
            r.body?["members"] = nil
            try txn.put(sources, SourceKey.record(s, g), r.bytes)
        }
    }

    /// Writes `body` as resource `id` when it differs from what is stored
    /// (creates it when it is not stored and `mayCreate`). Returns the id and
    /// whether anything was written; nil when there was nothing to update.
    private func upsertResource(
        _ type: ResourceType, id: String?, body: JSONObject, _ ctx: WriteContext, _ profile: ClientProfile,
        _ txn: borrowing WriteTransaction, mayCreate: Bool
    ) throws -> (String, Bool)? {
        let validator = ResourceValidator(registry: registry, type: type, profile: profile)
        if let id, let stored = try load(txn, type, id) {
            let new = try validator.validateReplace(.object(body), existing: stored)
            var current = stored
            current["id"] = nil
            current["meta"] = nil
            var wanted = registry.removingWriteOnly(new, of: type)
            if type.id == "Group" {
                // A stored group holds no members (they are an index): its members are compared with the index.
                func key(_ m: JSON) -> String { "\(m["value"]?.stringValue ?? "")\u{0}\(m["type"]?.stringValue ?? "User")" }
                let given = Set((wanted["members"]?.arrayValue ?? []).map(key))
                wanted["members"] = nil
                current["members"] = nil
                if current == wanted, given == Set(try members(txn, of: id).map(key)) { return (id, false) }
            } else if current == wanted {
                return (id, false)
            }
            _ = try apply(.replace(type, id: id, body: .object(body)), ctx, profile: profile, in: txn)
            return (id, true)
        }
        guard mayCreate else { return nil }
        let validated = try validator.validateCreate(.object(body))
        _ = try apply(.create(type, validated: validated), ctx, profile: profile, in: txn)
        return (ctx.newID, true)
    }

    /// The entry `key` is gone: its user is deactivated (`onDelete:
    /// deactivate`) or its resource deleted. Returns whether anything was
    /// written and whether the source forgot the entry.
    private func removeEntry(
        key: String, _ s: String, _ onDelete: SourceDeletion, _ ctx: WriteContext, _ profile: ClientProfile,
        _ txn: borrowing WriteTransaction
    ) throws -> (wrote: Bool, removed: Bool) {
        guard var r = try txn.get(sources, SourceKey.record(s, key)).flatMap(SourceRecord.init) else { return (false, false) }
        let type = registry.resourceType(r.type)!
        if r.type == "User" && onDelete == .deactivate {
            guard !r.gone else { return (false, false) }
            var wrote = false
            if var stored = try load(txn, type, r.id) {
                stored["id"] = nil
                stored["meta"] = nil
                stored["groups"] = nil
                stored["active"] = false
                wrote = try upsertResource(type, id: r.id, body: stored, ctx, profile, txn, mayCreate: false)?.1 ?? false
            }
            r.gone = true
            try txn.put(sources, SourceKey.record(s, key), r.bytes)
            return (wrote, true)
        }
        var wrote = false
        if try load(txn, type, r.id) != nil {
            _ = try apply(.delete(type, id: r.id), ctx, profile: profile, in: txn)
            wrote = true
        }
        for m in r.members { _ = try txn.delete(sources, SourceKey.pending(s, m, key)) }
        if try txn.get(sources, SourceKey.dn(s, r.dn)) == Array(key.utf8) { _ = try txn.delete(sources, SourceKey.dn(s, r.dn)) }
        _ = try txn.delete(sources, SourceKey.record(s, key))
        return (wrote, !r.gone)
    }
}

extension SourceChange {
    /// The DN for a failure's report (a deletion has only its key).
    var dn: String {
        switch self {
        case .upsert(let e): return e.name
        case .delete(let key): return "(key \(key))"
        case .unmappable(let dn, _): return dn
        }
    }
}
