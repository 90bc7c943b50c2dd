import EdgeConfig
import EdgeStore
import SCIM

/// What this boundary accepts from other domains through the broker's
/// downlink, and how it maps it: decided here, inside the boundary
/// (invariant 5). Without one the agent never polls and nothing enters.
public struct InboundPolicy: Sendable {
    /// One `accept:` entry: a resource enters when any entry matches.
    public struct Rule: Sendable {
        public var domains: [String]
        /// `User`, `Group`; empty: both.
        public var types: [String]
        public var filter: String?
        /// The filter compiled per type it applies to.
        var compiled: [String: Filter] = [:]

        public init(domains: [String], types: [String] = [], filter: String? = nil, registry: SchemaRegistry = .standard)
            throws(SCIMError)
        {
            guard !domains.isEmpty else { throw SCIMError.invalidValue("name at least one source domain") }
            for t in types where t != "User" && t != "Group" { throw SCIMError.invalidValue("type '\(t)' must be User or Group") }
            (self.domains, self.types, self.filter) = (domains, types, filter)
            guard let filter else { return }
            for type in ["User", "Group"] where types.isEmpty || types.contains(type) {
                do throws(SCIMError) {
                    compiled[type] = try Filter(filter, registry: registry, type: registry.resourceType(type)!)
                } catch {
                    throw SCIMError.invalidValue(error.detail + (types.isEmpty ? " (give the entry `types: [User]` or `[Group]`)" : ""))
                }
            }
        }

        func matches(domain: String, type: String, _ resource: JSONObject) -> Bool {
            guard domains.contains(domain), types.isEmpty || types.contains(type) else { return false }
            return filter == nil || (compiled[type]?.matches(resource) ?? false)
        }
    }

    public var accept: [Rule]
    /// `map.set` and `map.drop`: each path applies to the types whose schema has it (`userType` to users only).
    public var mapping: AttributeMapping
    /// `map.userName`: `{userName}` and `{domain}`.
    public var userNameTemplate: String { didSet { userNameParts = Self.parts(of: userNameTemplate) } }
    /// The template cut once into its text and its placeholders (`userName(_:domain:)` runs for every user that enters).
    var userNameParts: [TemplatePart]
    /// Per poll: events asked for, and how long the broker may hold the poll.
    public var maxEventsPerPoll = AgentOptions.Inbound.maxEventsPerPoll.defaultInteger
    public var waitMilliseconds = AgentOptions.Inbound.waitMs.defaultInteger
    /// What the broker learns of the local targets' answers (`AppOutcomes.swift`).
    public var reportApps = AppOutcomeReporting.named

    public static let defaultUserNameTemplate = AgentOptions.Inbound.userName.defaultValue!

    public init(accept: [Rule], mapping: AttributeMapping = AttributeMapping(), userNameTemplate: String = defaultUserNameTemplate) {
        self.accept = accept
        self.mapping = mapping
        self.userNameTemplate = userNameTemplate
        self.userNameParts = Self.parts(of: userNameTemplate)
    }

    /// A group's entry has a filter that reads `members`: an event without
    /// them (`attributesEvent`) cannot say whether the group is in scope.
    public var groupScopeReadsMembers: Bool { accept.contains { $0.compiled["Group"]?.root.reads("members") ?? false } }

    /// Whether a resource of `domain` enters, judged on it as it arrives.
    public func accepts(domain: String, type: String, _ resource: JSONObject) -> Bool {
        accept.contains { $0.matches(domain: domain, type: type, resource) }
    }

    /// The paths of `mapping` that `type`'s schema has.
    func mapping(for type: String, registry: SchemaRegistry = .standard) -> AttributeMapping {
        guard let t = registry.resourceType(type) else { return AttributeMapping() }
        func has(_ path: String) -> Bool { registry.parsePath(path, in: t).flatMap { registry.resolve($0, in: t) } != nil }
        var m = AttributeMapping()
        m.constant = mapping.constant.filter { has($0.path) }
        m.drop = mapping.drop.filter(has)
        return m
    }

    /// A path of `map` that no type has (a typo: it would never apply).
    public func unknownPaths(registry: SchemaRegistry = .standard) -> [String] {
        let known = Set(
            ["User", "Group"].flatMap { t in
                mapping(for: t, registry: registry).constant.map(\.path) + mapping(for: t, registry: registry).drop
            })
        return (mapping.constant.map(\.path) + mapping.drop).filter { !known.contains($0) }
    }

    /// The resource as it is stored here: the broker's bookkeeping removed
    /// (`id`, `meta`, the source extension), then `map` (`mapping(for:)`,
    /// worked out once per answer by the caller), then the userName
    /// template. Members are left to the caller (they must be held here).
    func mapped(_ data: JSONObject, type: String, domain: String, mapping typeMapping: AttributeMapping? = nil) -> JSONObject {
        var o = data
        for k in ["id", "meta", "groups", "members", AgentStore.sourceExtension] { o[k] = nil }
        if let schemas = o["schemas"]?.arrayValue, schemas.contains(where: { $0.stringValue == AgentStore.sourceExtension }) {
            o["schemas"] = .array(schemas.filter { $0.stringValue != AgentStore.sourceExtension })
        }
        (typeMapping ?? mapping(for: type)).apply(to: &o)
        if type == "User", let name = o["userName"]?.stringValue {
            o["userName"] = .string(userName(name, domain: domain))
        }
        return o
    }

    /// A piece of the userName template: text kept as it is, or a placeholder.
    enum TemplatePart: Equatable, Sendable { case text([UInt8]), userName, domain }

    /// `template` cut into text and placeholders: `{userName}` and `{domain}`
    /// are the only ones, any other brace is text.
    static func parts(of template: String) -> [TemplatePart] {
        let placeholders: [(token: [UInt8], part: TemplatePart)] = [
            (Array("{userName}".utf8), .userName), (Array("{domain}".utf8), .domain),
        ]
        let bytes = Array(template.utf8)
        var parts: [TemplatePart] = []
        var text: [UInt8] = []
        var i = 0
        scan: while i < bytes.count {
            if bytes[i] == UInt8(ascii: "{") {
                for p in placeholders where bytes[i...].starts(with: p.token) {
                    if !text.isEmpty { parts.append(.text(text)) }
                    text = []
                    parts.append(p.part)
                    i += p.token.count
                    continue scan
                }
            }
            text.append(bytes[i])
            i += 1
        }
        if !text.isEmpty { parts.append(.text(text)) }
        return parts
    }

    /// `map.userName` for one user: `{userName}` and `{domain}` replaced.
    public func userName(_ name: String, domain: String) -> String {
        if userNameParts == [.userName] { return name }
        var out: [UInt8] = []
        out.reserveCapacity(name.utf8.count + domain.utf8.count + 16)
        for part in userNameParts {
            switch part {
            case .text(let t): out += t
            case .userName: out += name.utf8
            case .domain: out += domain.utf8
            }
        }
        return String(decoding: out, as: UTF8.self)
    }
}

/// What one applied poll answer did.
public struct DownlinkOutcome: Sendable, Equatable {
    /// The feed sequence committed with the changes (the next poll acknowledges it).
    public var appliedThrough: UInt64
    public var applied = 0
    /// Of them, group membership deltas.
    public var membershipDeltas = 0
    /// At or below what was committed before: skipped (a resend).
    public var duplicates = 0
    /// Not accepted by the inbound policy (and, if held, removed).
    public var notAccepted = 0
    /// Accepted but not storable here (a userName taken by a local user, an
    /// invalid value): counted and logged, the sequence goes on.
    public var refused: [UInt64: String] = [:]
    /// What the next poll tells the broker of these events (nil: none newly applied).
    public var report: DownlinkReport?
    /// The answer held the end of a resync (downlink protocol 5): the sweep
    /// of what was not sent again has begun (`sweepStaleForeign`).
    public var resyncCompleted = false
}

/// The boundary's decision on each feed event of one applied answer, sent
/// with the acknowledgement (`outcomes`, downlink protocol 2 and later) so that the
/// broker's `trace` shows the change's last hop: committed here at
/// `committed` (Unix ms, this agent's clock), and for each event whether the
/// inbound policy accepted it (stored as mapped), did not accept it, or it
/// was refused here. A refusal goes up as its `scimType` only: the detail
/// may name what this boundary holds (a local user's userName), so it stays
/// in this agent's log (invariant 5). Stored in the transaction of the
/// events (`meta`), so a crash before the next poll loses no report.
public struct DownlinkReport: Sendable, Equatable {
    /// The feed sequences it covers: every one not listed was accepted.
    public var from: UInt64
    public var through: UInt64
    public var committed: Int64
    public var notAccepted: [UInt64] = []
    /// Feed sequence → `scimType` (`uniqueness`, `invalidValue`, …).
    public var refused: [UInt64: String] = [:]

    public var json: JSON {
        var o: JSONObject = [
            "from": .number(JSONNumber(integer: Int64(from))), "through": .number(JSONNumber(integer: Int64(through))),
            "committed": .number(JSONNumber(integer: committed)),
        ]
        if !notAccepted.isEmpty { o["notAccepted"] = .array(notAccepted.map { .number(JSONNumber(integer: Int64($0))) }) }
        if !refused.isEmpty {
            o["refused"] = .object(JSONObject(refused.sorted { $0.key < $1.key }.map { ("\($0.key)", .string($0.value)) }))
        }
        return .object(o)
    }

    init(from: UInt64, through: UInt64, committed: Int64) {
        (self.from, self.through, self.committed) = (from, through, committed)
    }

    /// Without what the broker has taken already (sequences through `acknowledged`); nil: nothing left.
    public func trimmed(after acknowledged: UInt64) -> DownlinkReport? {
        guard through > acknowledged else { return nil }
        guard from <= acknowledged else { return self }
        var r = self
        r.from = acknowledged + 1
        r.notAccepted = notAccepted.filter { $0 > acknowledged }
        r.refused = refused.filter { $0.key > acknowledged }
        return r
    }

    /// This report followed by `next` (which starts where this one ends): one report of both.
    func followed(by next: DownlinkReport) -> DownlinkReport {
        guard through + 1 == next.from else { return next }
        var r = next
        r.from = from
        r.notAccepted = notAccepted + next.notAccepted
        r.refused.merge(refused) { new, _ in new }
        return r
    }

    init?(_ json: JSON) {
        guard let from = json["from"]?.numberValue?.integer, let through = json["through"]?.numberValue?.integer,
            let committed = json["committed"]?.numberValue?.integer
        else { return nil }
        self.init(from: UInt64(clamping: from), through: UInt64(clamping: through), committed: committed)
        notAccepted = (json["notAccepted"]?.arrayValue ?? []).compactMap { $0.numberValue?.integer.map { UInt64(clamping: $0) } }
        for (k, v) in json["refused"]?.objectValue?.members ?? [] {
            if let seq = UInt64(k), let t = v.stringValue { refused[seq] = t }
        }
    }
}

/// A feed answer that skips a sequence: no honest broker sends one.
public struct DownlinkGap: Error, CustomStringConvertible {
    public let expected: UInt64, got: UInt64
    public var description: String { "the feed skipped from \(expected) to \(got)" }
}

/// Foreign resources: what entered from other domains (`foreign`:
/// `<type>/<id>` → the source domain). Their id here is the broker's id
/// (unique across the federation); they are read-only for the local IdP,
/// readable by local apps, and never relayed back up.
extension AgentStore {
    /// Where a federated resource came from (the broker's source extension; only `domain` reaches an agent).
    static let sourceExtension = "urn:scim-edge:params:scim:schemas:extension:source:1.0:Resource"
    static let downlinkKey = Array("downlinkSeq".utf8)
    static let downlinkReportKey = Array("downlinkReport".utf8)
    /// The last event of a resync's feed (downlink protocol 5; the broker's `resyncCompleteEvent`).
    static let resyncCompleteEvent = "urn:scim-edge:params:event:feed:resync:complete"

    /// The source domain of a foreign resource; nil: the resource is this boundary's own.
    func foreignDomain(_ type: ResourceType, _ id: String, _ txn: borrowing some StoreReading & ~Copyable) throws -> String? {
        try txn.get(foreign, AgentStore.key(type, id)).map { String(decoding: $0, as: UTF8.self) }
    }

    public func foreignDomain(_ type: ResourceType, _ id: String) throws -> String? {
        try environment.read { txn in try foreignDomain(type, id, txn) }
    }

    /// The last downlink sequence committed (0: none).
    public func downlinkSequence() throws -> UInt64 {
        try environment.read { txn in try txn.get(meta, AgentStore.downlinkKey).flatMap(UInt64.init(bigEndianBytes:)) ?? 0 }
    }

    /// The broker starts the feed again: the next poll acknowledges nothing
    /// (and reports nothing), and a new resync generation begins: each
    /// foreign resource the new feed names is marked with it
    /// (`markSent`), so that when the broker says the resync is complete
    /// the ones it did not send again can go (`sweepStaleForeign`). A sweep
    /// of an earlier resync under way stops: this one's covers it.
    public func restartDownlink(in txn: borrowing WriteTransaction) throws {
        try txn.put(meta, AgentStore.downlinkKey, UInt64(0).bigEndianBytes)
        _ = try txn.delete(meta, AgentStore.downlinkReportKey)
        // Never reused (the counter outlives each resync): a mark a sweep left behind names an older one.
        let generation = (try txn.get(meta, AgentStore.resyncCounterKey).flatMap(UInt64.init(bigEndianBytes:)) ?? 0) + 1
        try txn.put(meta, AgentStore.resyncCounterKey, generation.bigEndianBytes)
        try txn.put(meta, AgentStore.resyncKey, generation.bigEndianBytes)
        _ = try txn.delete(meta, AgentStore.staleSweepKey)
    }

    // MARK: what a resync did not send again

    /// `meta` keys: the resync generation under way (BE; absent: none), and
    /// where the sweep that ends it stands (present while it runs: the last
    /// `foreign` key looked at, empty at its start).
    static let resyncKey = Array("downlinkResync".utf8)
    static let staleSweepKey = Array("downlinkStaleSweep".utf8)
    /// The last resync generation begun (BE), kept after it ends.
    static let resyncCounterKey = Array("downlinkResyncCounter".utf8)
    /// `fsent/<type>/<id>` in `meta` → the generation whose feed named it.
    static func sentKey(_ key: [UInt8]) -> [UInt8] { Array("fsent/".utf8) + key }

    /// While a resync is under way, the foreign resources `events` named
    /// and this store holds are marked as sent again (whatever became of the
    /// event: a refusal keeps what was held, and so does the sweep).
    func markSent(_ events: [(UInt64, JSON)], _ txn: borrowing WriteTransaction) throws -> Bool {
        guard let generation = try txn.get(meta, AgentStore.resyncKey) else { return false }
        var completed = false
        for (_, event) in events {
            guard let (uri, body) = event["events"]?.objectValue?.members.first else { continue }
            if uri == AgentStore.resyncCompleteEvent {
                // Everything the destination should hold came before this: what was not sent again goes.
                if try txn.get(meta, AgentStore.staleSweepKey) == nil { try txn.put(meta, AgentStore.staleSweepKey, []) }
                completed = true
                continue
            }
            guard let ref = body["ref"]?.stringValue else { continue }
            let parts = slashParts(ref)
            guard parts.count == 2, let type = registry.resourceType(parts[0] == "Users" ? "User" : parts[0] == "Groups" ? "Group" : "")
            else { continue }
            let key = AgentStore.key(type, String(parts[1]))
            if try txn.get(foreign, key) != nil { try txn.put(meta, AgentStore.sentKey(key), generation) }
        }
        return completed
    }

    /// Whether the sweep that ends a resync is under way (a read).
    public func staleSweepPending() throws -> Bool {
        try environment.read { txn in try txn.get(meta, AgentStore.staleSweepKey) != nil }
    }

    /// One step of the sweep that ends a resync: up to `limit` foreign
    /// resources looked at (at most `limit / 10` removed), each removed when
    /// the new feed did not name it (deleted at its source, or out of the
    /// broker's routes, while this store was away; a store restored from a
    /// backup still held it). Removed as a deletion from the feed would
    /// remove it: the local targets get it. The marks go as the sweep
    /// passes, and with the last step the resync ends (nothing is marked
    /// after it). Events applied meanwhile are still marked, so a resource
    /// that entered after the resync's end stays. nil: no sweep under way.
    public func sweepStaleForeign(limit: Int, _ ctx: WriteContext, _ txn: borrowing WriteTransaction) throws -> (
        removed: Int, done: Bool
    )? {
        guard let cursor = try txn.get(meta, AgentStore.staleSweepKey) else { return nil }
        let generation = try txn.get(meta, AgentStore.resyncKey)
        var keys: [[UInt8]] = []
        try txn.scanKeys(foreign, from: cursor.isEmpty ? nil : cursor + [0]) { k in
            keys.append(k)
            return keys.count < limit
        }
        var removed = 0, last: [UInt8]?, looked = 0
        for key in keys {
            (last, looked) = (key, looked + 1)
            let sent = try txn.get(meta, AgentStore.sentKey(key))
            _ = try txn.delete(meta, AgentStore.sentKey(key))
            guard sent == nil || sent != generation else { continue }
            let parts = key.split(separator: UInt8(ascii: "/"), maxSplits: 1)
            if parts.count == 2, let type = registry.resourceType(String(decoding: parts[0], as: UTF8.self)) {
                let id = String(decoding: parts[1], as: UTF8.self)
                if let old = try load(txn, type, id) { try removeForeign(type, id, old, ctx, txn) }
                if type.id == "User" { try forgetWaiting(member: id, txn) }
            }
            _ = try txn.delete(foreign, key)
            removed += 1
            if removed >= max(1, limit / 10) { break }
        }
        // Done when this step looked at every key left (the scan found fewer than it asked for).
        let done = keys.count < limit && looked == keys.count
        if done {
            _ = try txn.delete(meta, AgentStore.staleSweepKey)
            _ = try txn.delete(meta, AgentStore.resyncKey)
        } else {
            try txn.put(meta, AgentStore.staleSweepKey, last!)
        }
        return (removed, done)
    }

    /// The outcomes of the last applied answer, which the next poll reports (nil: none).
    public func downlinkReport() throws -> DownlinkReport? {
        try environment.read { txn in try storedDownlinkReport(txn) }
    }

    func storedDownlinkReport(_ txn: borrowing some StoreReading & ~Copyable) throws -> DownlinkReport? {
        try txn.get(meta, AgentStore.downlinkReportKey).flatMap { DownlinkReport(try JSONParser.parse($0, limits: .stored)) }
    }

    /// The broker refused the report of what was committed through `acked`:
    /// the stored report keeps only what follows (sent after a restart
    /// otherwise, and refused again).
    public func dropDownlinkReport(through acked: UInt64, in txn: borrowing WriteTransaction) throws {
        guard let stored = try storedDownlinkReport(txn) else { return }
        if let rest = stored.trimmed(after: acked) {
            try txn.put(meta, AgentStore.downlinkReportKey, rest.json.serialized())
        } else {
            _ = try txn.delete(meta, AgentStore.downlinkReportKey)
        }
    }

    /// How many foreign resources of each source domain are stored.
    public func foreignCounts() throws -> [String: Int] {
        try environment.read { txn in
            var out: [String: Int] = [:]
            try txn.scan(foreign) { _, v in
                out[String(decoding: v, as: UTF8.self), default: 0] += 1
                return true
            }
            return out
        }
    }

    /// Applies a feed answer's events in `txn`, with the sequence they
    /// reach: what is committed and what is acknowledged are one (the poll
    /// after this commit acknowledges `appliedThrough`). Events at or below
    /// it are resends and skipped; a gap is an error (nothing applied).
    /// Each event runs in a nested transaction, so one that cannot be stored
    /// changes nothing and the others go on.
    ///
    /// The stored report (`downlinkReport`) is what the next poll tells the
    /// broker: this answer's outcomes after those not yet taken, i.e. after
    /// `reported` (the acknowledgement of the last poll the broker answered),
    /// so that answers applied while a poll was out are all reported.
    public func applyDownlink(
        _ events: [JSON], policy: InboundPolicy, _ ctx: WriteContext, reported: UInt64 = 0, in txn: borrowing WriteTransaction
    ) throws -> DownlinkOutcome {
        let before = try txn.get(meta, AgentStore.downlinkKey).flatMap(UInt64.init(bigEndianBytes:)) ?? 0
        var last = before
        var fresh: [(UInt64, JSON)] = []
        var duplicates = 0
        for event in events {
            guard let n = event["seq"]?.numberValue?.integer, n > 0 else { throw DownlinkGap(expected: last + 1, got: 0) }
            let seq = UInt64(n)
            if seq <= last {
                duplicates += 1
                continue
            }
            guard seq == last + 1 else { throw DownlinkGap(expected: last + 1, got: seq) }
            fresh.append((seq, event))
            last = seq
        }
        let maps = ["User": policy.mapping(for: "User"), "Group": policy.mapping(for: "Group")]
        func run(_ nestEach: Bool, _ txn: borrowing WriteTransaction) throws -> DownlinkOutcome {
            var outcome = DownlinkOutcome(appliedThrough: before)
            outcome.duplicates = duplicates
            var report = DownlinkReport(from: before + 1, through: last, committed: ctx.epochMilliseconds)
            for (seq, event) in fresh {
                // The end of a resync changes no resource (`markSent` starts the sweep it asks for).
                if event["events"]?.objectValue?.members.first?.0 == AgentStore.resyncCompleteEvent { continue }
                // Each change is written under its own trace id (the IdP request's at its source).
                var each = ctx
                if let trace = event["txn"]?.stringValue, !trace.isEmpty { each.traceID = trace }
                each.originAcceptedAt = event["ts"]?.numberValue?.integer ?? 0
                do {
                    let change =
                        nestEach
                        ? try txn.nested { sub in try applyForeign(event, policy: policy, maps, each, sub) }
                        : try applyForeign(event, policy: policy, maps, each, txn)
                    switch change {
                    case .applied: outcome.applied += 1
                    case .delta: (outcome.applied, outcome.membershipDeltas) = (outcome.applied + 1, outcome.membershipDeltas + 1)
                    case .notAccepted:
                        outcome.notAccepted += 1
                        report.notAccepted.append(seq)
                    }
                } catch {
                    guard nestEach, let refusal = AgentStore.refusal(error) else { throw error }
                    (outcome.refused[seq], report.refused[seq]) = refusal
                }
            }
            if !fresh.isEmpty { outcome.report = report }
            return outcome
        }
        // One nested transaction for the answer; if an event cannot be stored, the answer again with one per
        // event, so that it alone changes nothing (a nested commit per event costs more, with many events).
        var outcome: DownlinkOutcome
        do {
            outcome = try txn.nested { sub in try run(false, sub) }
        } catch  where AgentStore.refusal(error) != nil {
            outcome = try run(true, txn)
        }
        try txn.put(meta, AgentStore.downlinkKey, last.bigEndianBytes)
        outcome.appliedThrough = last
        outcome.resyncCompleted = try markSent(fresh, txn)
        // Only resends (nothing new): the stored report, of what they were applied with, stays the one to send.
        if let report = outcome.report {
            let merged = try storedDownlinkReport(txn)?.trimmed(after: reported)?.followed(by: report) ?? report
            try txn.put(meta, AgentStore.downlinkReportKey, merged.json.serialized())
            outcome.report = merged
        }
        return outcome
    }

    /// An error that refuses one feed event (its detail, logged here, and
    /// the `scimType` the broker's trace gets), not the answer: a SCIM error,
    /// or a key over LMDB's 511 bytes (a long id, a userName the template
    /// lengthened). Nil: the answer fails.
    static func refusal(_ error: any Error) -> (detail: String, scimType: String)? {
        if let e = error as? SCIMError { return (e.detail, e.scimType?.rawValue ?? "refused") }
        if case StoreError.badValueSize? = error as? StoreError {
            return (
                "a key of this resource (its id, its userName as mapped, or a value) is longer than the store holds",
                SCIMType.invalidValue.rawValue
            )
        }
        return nil
    }

    enum ForeignChange { case applied, delta, notAccepted }

    /// One feed event, and what became of it.
    func applyForeign(
        _ event: JSON, policy: InboundPolicy, _ maps: [String: AttributeMapping], _ ctx: WriteContext, _ txn: borrowing WriteTransaction
    ) throws -> ForeignChange {
        guard let (uri, body) = event["events"]?.objectValue?.members.first, let ref = body["ref"]?.stringValue else {
            throw SCIMError.invalidValue("a feed event holds one SCIM event with a 'ref'")
        }
        let parts = slashParts(ref)
        guard parts.count == 2, let type = registry.resourceType(parts[0] == "Users" ? "User" : parts[0] == "Groups" ? "Group" : "") else {
            throw SCIMError.invalidValue("'ref' \(ref) is not /Users/<id> or /Groups/<id>")
        }
        let id = String(parts[1])
        let domain = event["domain"]?.stringValue ?? ""
        let old = try load(txn, type, id)
        let held = try foreignDomain(type, id, txn)
        if old != nil && held == nil { throw SCIMError.uniqueness("\(ref) is a resource of this boundary, not a foreign one") }
        switch uri {
        case EventURI.delete:
            if let old { try removeForeign(type, id, old, ctx, txn) }
            if type.id == "User" { try forgetWaiting(member: id, txn) }
            return .applied
        case EventURI.createFull, EventURI.putFull, EventURI.patchFull:
            guard let data = body["data"]?.objectValue else { throw SCIMError.invalidValue("\(ref): no 'data'") }
            guard policy.accepts(domain: domain, type: type.id, data) else {
                // Out of what this boundary accepts (now): what it held goes.
                if let old { try removeForeign(type, id, old, ctx, txn) }
                return .notAccepted
            }
            var mapped = policy.mapped(data, type: type.id, domain: domain, mapping: maps[type.id])
            if type.id == "Group" {
                try forgetWaiting(group: id, txn)  // full state: the members it names now are the ones waiting
                mapped["members"] = .array(try heldMembers(data["members"]?.arrayValue ?? [], group: id, txn))
            }
            let validator = ResourceValidator(registry: registry, type: type, profile: .lenient)
            let new =
                try old.map { try validator.validateReplace(.object(mapped), existing: $0) } ?? validator.validateCreate(.object(mapped))
            // Marked foreign first: the write then sends nothing up (`emitChange`).
            try txn.put(foreign, AgentStore.key(type, id), Array(domain.utf8))
            _ = try store(type, id: id, new: new, old: old, event: uri, ctx, txn)
            if old == nil && type.id == "User" { try joinWaitingGroups(id, ctx, txn) }
            return .applied
        case AgentStore.membersEvent:
            // Held only if accepted: a delta for a group this boundary did not take is not its business.
            guard type.id == "Group", let old else { return .notAccepted }
            for r in body["removed"]?.arrayValue ?? [] {
                guard let m = r.stringValue else { continue }
                try deleteMember(id, Array(m.utf8), txn)
                try unwait(member: m, group: id, txn)
            }
            for m in try heldMembers(body["added"]?.arrayValue ?? [], group: id, txn) {
                if let o = m.objectValue { try putMember(id, o, txn) }
            }
            var group = old
            (group["id"], group["meta"]) = (nil, nil)
            _ = try store(type, id: id, new: group, old: old, event: EventURI.patchFull, ctx, txn, replacingMembers: false)
            return .delta
        case AgentStore.attributesEvent:
            // Downlink protocol 4: a group's attributes without its members, which stay as they are here.
            guard type.id == "Group", let data = body["data"]?.objectValue, data["members"] == nil else {
                throw SCIMError.invalidValue("\(ref): an attributes event is for a group, with 'data' and no 'members'")
            }
            guard !policy.groupScopeReadsMembers else {
                // Whether the group is in scope depends on members this event does not carry: the broker sends it whole.
                throw SCIMError.noTarget("\(ref): the inbound policy reads members; the group is needed whole")
            }
            guard policy.accepts(domain: domain, type: type.id, data) else {
                if let old { try removeForeign(type, id, old, ctx, txn) }
                return .notAccepted
            }
            // Not held here (not accepted before): the broker sends it whole on this refusal.
            guard let old else { throw SCIMError.noTarget("\(ref): the group is not held here; it is needed whole") }
            let mapped = policy.mapped(data, type: type.id, domain: domain, mapping: maps[type.id])
            let validator = ResourceValidator(registry: registry, type: type, profile: .lenient)
            var new = try validator.validateReplace(.object(mapped), existing: old)
            new["members"] = nil
            _ = try store(type, id: id, new: new, old: old, event: EventURI.patchFull, ctx, txn, replacingMembers: false)
            return .applied
        default:
            throw SCIMError.invalidValue("\(ref): unknown event type \(uri)")
        }
    }

    /// The members of foreign group `group` that this boundary holds
    /// (foreign users it accepted), as `{value, type}`. The others wait
    /// (`foreignWaiting`): the broker sent them, so it will not name them
    /// again, and a user this policy accepts later (it came to match the
    /// filter) joins the group then (`joinWaitingGroups`).
    func heldMembers(_ members: [JSON], group: String, _ txn: borrowing WriteTransaction) throws -> [JSON] {
        var out: [JSON] = []
        for m in members {
            guard let v = m["value"]?.stringValue else { continue }
            let type = m["type"]?.stringValue == "Group" ? "Group" : "User"
            let member: JSON = ["value": .string(v), "type": .string(type)]
            if try foreignDomain(registry.resourceType(type)!, v, txn) != nil {
                out.append(member)
            } else {
                try txn.put(foreignWaiting, AgentStore.waitingKey("m", v, group), member.serialized())
                try txn.put(foreignWaiting, AgentStore.waitingKey("g", group, v), [])
            }
        }
        return out
    }

    /// `foreignWaiting` keys: `m\0<member>\0<group>` → the member, and `g\0<group>\0<member>`.
    static func waitingKey(_ kind: String, _ a: String, _ b: String = "") -> [UInt8] {
        Array(kind.utf8) + [0] + Array(a.utf8) + [0] + Array(b.utf8)
    }

    func unwait(member: String, group: String, _ txn: borrowing WriteTransaction) throws {
        _ = try txn.delete(foreignWaiting, AgentStore.waitingKey("m", member, group))
        _ = try txn.delete(foreignWaiting, AgentStore.waitingKey("g", group, member))
    }

    /// The other ids under `kind\0<id>\0` (a member's groups, or a group's members).
    func waiting(_ kind: String, _ id: String, _ txn: borrowing WriteTransaction) throws -> [(String, [UInt8])] {
        let prefix = AgentStore.waitingKey(kind, id)
        var out: [(String, [UInt8])] = []
        try txn.scan(foreignWaiting, from: prefix, to: Array(prefix.dropLast()) + [1]) { k, v in
            out.append((String(decoding: k[prefix.count...], as: UTF8.self), v))
            return true
        }
        return out
    }

    func forgetWaiting(group: String, _ txn: borrowing WriteTransaction) throws {
        for (member, _) in try waiting("g", group, txn) { try unwait(member: member, group: group, txn) }
    }

    func forgetWaiting(member: String, _ txn: borrowing WriteTransaction) throws {
        for (group, _) in try waiting("m", member, txn) { try unwait(member: member, group: group, txn) }
    }

    /// A foreign user entered: it joins the foreign groups that named it while it was not here.
    func joinWaitingGroups(_ member: String, _ ctx: WriteContext, _ txn: borrowing WriteTransaction) throws {
        let groups = registry.resourceType("Group")!
        for (gid, bytes) in try waiting("m", member, txn) {
            try unwait(member: member, group: gid, txn)
            guard let old = try load(txn, groups, gid), let m = try JSONParser.parse(bytes, limits: .stored).objectValue else { continue }
            try putMember(gid, m, txn)
            var group = old
            (group["id"], group["meta"]) = (nil, nil)
            _ = try store(groups, id: gid, new: group, old: old, event: EventURI.patchFull, ctx, txn, replacingMembers: false)
        }
    }

    func removeForeign(_ type: ResourceType, _ id: String, _ old: JSONObject, _ ctx: WriteContext, _ txn: borrowing WriteTransaction) throws
    {
        try remove(type, id: id, old: old, ctx, txn)
        _ = try txn.delete(foreign, AgentStore.key(type, id))
        _ = try txn.delete(meta, AgentStore.sentKey(AgentStore.key(type, id)))
        if type.id == "Group" { try forgetWaiting(group: id, txn) }
    }

    /// The local IdP (or a pull source) may not change what entered from
    /// another domain: 400 `mutability` (RFC 7644 §3.12: "not compatible
    /// with the target attribute's mutability or current state"; the whole
    /// resource is read-only here). Not 403: a SCIM client (the broker
    /// itself) reads 403 as refused credentials, and these are fine.
    func refuseForeignWrite(_ type: ResourceType, _ id: String, _ txn: borrowing WriteTransaction) throws {
        guard let domain = try foreignDomain(type, id, txn) else { return }
        throw SCIMError(
            400, .mutability,
            "\(type.id) \(id) entered this boundary from domain '\(domain)' and is read-only here: change it in its own domain")
    }
}
