import EdgeDelivery
import EdgeLoop
import EdgeStore
import EdgeTLS
import SCIM
import Synchronization

/// The broker's LMDB file: the federated directory and, per agent, the
/// sequence applied so far, changed together in one transaction per batch.
///
/// | database | key | value |
/// |---|---|---|
/// | `agents` | `<domain>/<agent identity>` or `<domain>/<agent identity>\0<epoch>` | applied sequence (big-endian) |
/// | `resources` | `<domain>/<Type>/<source id>` | the federated resource (JSON) |
/// | `brokerIds` | broker id | `<domain>/<Type>/<source id>` |
/// | `byType`, `byValue` | list indexes (`BrokerLists.swift`) | `<domain>/<Type>/<source id>` |
/// | `downlink` | `<target> 0x00 <feed seq BE>` | a downlink event not yet acknowledged (`Downlink.swift`) |
/// | `downlinkTrail` | `<target> 0x00 <feed seq BE>` | what that event's commit hop needs (`FeedTrail`: broker id, trace id, kind, times) |
///
/// The agent is named by its certificate identity, never by the batch
/// (invariant 6): one agent cannot advance another's sequence. Each agent
/// store has an epoch of its own, so a re-imaged agent, or a second one
/// with the same certificate, gets a sequence of its own that starts at 1
/// (invariant 3: a new store never makes changes vanish as "duplicates").
public final class BrokerStore: Sendable {
    public let environment: Environment
    let agents: Database
    let resources: Database
    let brokerIds: Database
    package let fanout: Database
    package let targetIds: Database
    package let targetDead: Database
    package let trail: Database
    package let traces: Database
    package let targetState: Database
    package let targetOwners: Database
    package let targetLinks: Database
    /// A group's members (`group broker id\0member broker id` → the member),
    /// not an array in the stored group: a change of k members costs
    /// O(k log n) (`BrokerMembers.swift`).
    let groupMembers: Database
    /// The other direction (member broker id → group broker ids), so that a
    /// deleted user leaves its groups without a scan.
    let memberOf: Database
    /// What each target holds of each group's members, and the members
    /// changed since the group was delivered there (`TargetMembers.swift`).
    package let targetMembers: Database
    package let targetMemberOf: Database
    package let targetPending: Database
    /// The store's own settings (`layout`), and the per-type counts of lists.
    let meta: Database
    /// Lists: each type's resources in broker id order, and the values of
    /// the attributes filtered and sorted on (`BrokerLists.swift`).
    let byType: Database
    let byValue: Database
    /// The downlink feeds, per destination (`Downlink.swift`).
    let downlink: Database
    /// Per feed event not yet acknowledged: what `trace` records of it when the agent acknowledges it.
    let downlinkTrail: Database
    let listState = BrokerListState()
    /// Where changes fan out to (their routes decide what is queued).
    public let targets: [TargetConfiguration]

    public init(path: String, maxBytes: Int = 16 << 30, targets: [TargetConfiguration] = []) throws {
        var o = EnvironmentOptions(path: path)
        o.maxMapSize = maxBytes
        environment = try Environment(o)
        agents = try environment.openDatabase("agents")
        resources = try environment.openDatabase("resources")
        brokerIds = try environment.openDatabase("brokerIds")
        fanout = try environment.openDatabase("fanout")
        targetIds = try environment.openDatabase("targetIds")
        targetDead = try environment.openDatabase("targetDead")
        trail = try environment.openDatabase("trail")
        traces = try environment.openDatabase("traces")
        targetState = try environment.openDatabase("targetState")
        targetOwners = try environment.openDatabase("targetOwners")
        targetLinks = try environment.openDatabase("targetLinks")
        groupMembers = try environment.openDatabase("groupMembers")
        memberOf = try environment.openDatabase("memberOf", flags: .duplicateSort)
        targetMembers = try environment.openDatabase("targetMembers")
        targetMemberOf = try environment.openDatabase("targetMemberOf", flags: .duplicateSort)
        targetPending = try environment.openDatabase("targetPending")
        meta = try environment.openDatabase("meta")
        byType = try environment.openDatabase("byType")
        byValue = try environment.openDatabase("byValue")
        downlink = try environment.openDatabase("downlink")
        downlinkTrail = try environment.openDatabase("downlinkTrail")
        self.targets = targets
        try migrateInlineMembers()
        try buildListIndexes()
    }

    public func appliedSequence(domain: String, agent: AgentKey) throws -> UInt64 {
        let agents = self.agents
        return try environment.read { txn in
            try txn.get(agents, agent.storeKey(domain: domain)).flatMap(UInt64.init(bigEndianBytes:)) ?? 0
        }
    }

    /// Every federated resource of a domain (for status and tests).
    public func resources(domain: String) throws -> [JSONObject] {
        let resources = self.resources
        return try environment.read { txn in
            var out: [JSONObject] = []
            try txn.scan(resources, from: Array("\(domain)/".utf8), to: Array("\(domain)0".utf8)) { k, v in
                if let o = try JSONParser.parse(v, limits: .stored).objectValue {
                    out.append(k.starts(with: Array("\(domain)/Group/".utf8)) ? try withMembers(txn, o) : o)
                }
                return true
            }
            return out
        }
    }

    /// How many federated resources a domain has (keys only: cheap enough to poll).
    public func resourceCount(domain: String) throws -> Int {
        let resources = self.resources
        return try environment.read { txn in
            var n = 0
            try txn.scan(resources, from: Array("\(domain)/".utf8), to: Array("\(domain)0".utf8)) { _, _ in
                n += 1
                return true
            }
            return n
        }
    }

    /// Agent stores known to the broker and their applied sequences.
    public func agentSequences() throws -> [AgentSequence] {
        let agents = self.agents
        return try environment.read { txn in
            var out: [AgentSequence] = []
            try txn.scan(agents) { k, v in
                let nul = k.firstIndex(of: 0) ?? k.endIndex
                let name = String(decoding: k[..<nul], as: UTF8.self)
                let epoch = nul == k.endIndex ? "" : String(decoding: k[(nul + 1)...], as: UTF8.self)
                let slash = name.firstIndex(of: "/") ?? name.endIndex
                out.append(
                    AgentSequence(
                        domain: String(name[..<slash]),
                        agent: AgentKey(identity: slash == name.endIndex ? "" : String(name[name.index(after: slash)...]), epoch: epoch),
                        sequence: UInt64(bigEndianBytes: v) ?? 0))
                return true
            }
            return out
        }
    }
}

/// One agent store as the broker keys its sequence: the certificate identity
/// that bound it and the epoch its store was created with ("" for a store
/// made before epochs, which has the single sequence such stores had).
public struct AgentKey: Sendable, Hashable, CustomStringConvertible {
    public var identity: String
    public var epoch: String
    public init(identity: String, epoch: String = "") {
        self.identity = identity
        self.epoch = epoch
    }

    /// `<domain>/<identity>`, then NUL and the epoch when there is one (a
    /// configured identity never holds NUL, so the key is unambiguous).
    func storeKey(domain: String) -> [UInt8] {
        var key = Array("\(domain)/\(identity)".utf8)
        if !epoch.isEmpty { key.append(0); key.append(contentsOf: epoch.utf8) }
        return key
    }

    public var description: String { epoch.isEmpty ? identity : "\(identity) (epoch \(epoch))" }
}

/// An agent store's applied sequence.
public struct AgentSequence: Sendable, Equatable {
    public var domain: String
    public var agent: AgentKey
    public var sequence: UInt64
}

/// The outcome of applying one batch.
public struct ApplyOutcome: Sendable, Equatable {
    /// Everything up to here is applied (or was before).
    public var ackedThrough: UInt64
    /// Events refused for good: sequence → (error, description).
    public var rejected: [UInt64: String] = [:]
    /// Set when the batch does not continue the agent's sequence.
    public var expectedSequence: UInt64?
    /// The first batch of an agent store the broker had not seen.
    public var newSequence = false
    public var applied = 0
    /// Of them, membership deltas (protocol 2).
    public var membershipDeltas = 0
    public var duplicates = 0
    /// `ts` (agent acceptance, Unix ms) of each applied event, for propagation metrics.
    public var acceptedAt: [Int64] = []
    /// Items queued per target (fan-out).
    public var fanout: [String: Int] = [:]
}

/// One event of a batch as received.
public struct RelayEvent: Sendable {
    public let seq: UInt64
    public let body: JSON
    public init(seq: UInt64, body: JSON) {
        self.seq = seq
        self.body = body
    }
}

extension ApplyOutcome {
    /// The outcome of a batch applied in consecutive parts, in sequence
    /// order: what the parts applied together; a part's gap counts only when
    /// nothing was applied before it (as in one transaction).
    static func merged(_ parts: [ApplyOutcome]) -> ApplyOutcome {
        guard var m = parts.first else { return ApplyOutcome(ackedThrough: 0) }
        for o in parts.dropFirst() {
            if m.applied == 0, m.expectedSequence == nil { m.expectedSequence = o.expectedSequence }
            m.ackedThrough = max(m.ackedThrough, o.ackedThrough)
            m.rejected.merge(o.rejected) { a, _ in a }
            m.applied += o.applied
            m.membershipDeltas += o.membershipDeltas
            m.duplicates += o.duplicates
            m.acceptedAt += o.acceptedAt
            m.fanout.merge(o.fanout, uniquingKeysWith: +)
        }
        return m
    }
}

extension BrokerStore {
    /// The most weight (`applyWeight`) one apply transaction takes when a
    /// batch's events can be split: about 1,000 changed index entries
    /// (a members event of at most 1,000 members goes alone), at most a few
    /// thousand dirty pages even when each entry lands on a page of its own.
    static let applyWeightPerTransaction = 1000

    /// About how many index entries applying `event` changes: one for the
    /// resource, one per member it names.
    static func applyWeight(_ event: RelayEvent) -> Int {
        guard let body = event.body["events"]?.objectValue?.members.first?.value else { return 1 }
        let members = body["data"]?["members"]?.arrayValue?.count ?? 0
        return 1 + members + (body["added"]?.arrayValue?.count ?? 0) + (body["removed"]?.arrayValue?.count ?? 0)
    }

    /// `events` (in sequence order) in consecutive parts of at most
    /// `maxWeight` each (an event heavier than that alone), with their weights.
    static func applyParts(_ events: [RelayEvent], maxWeight: Int) -> [(events: [RelayEvent], weight: Int)] {
        var parts: [(events: [RelayEvent], weight: Int)] = []
        for e in events {
            let w = applyWeight(e)
            if let last = parts.last, last.weight + w <= maxWeight {
                parts[parts.count - 1].events.append(e)
                parts[parts.count - 1].weight += w
            } else {
                parts.append(([e], w))
            }
        }
        return parts
    }
}

extension BrokerStore {
    /// Applies a batch from `agent` of `domain` in `txn`: events at or below
    /// the applied sequence are acknowledged without re-applying; a gap stops
    /// the batch (the agent resends from `expectedSequence`). Deterministic:
    /// `newIDs` supplies ids for resources seen for the first time.
    public func apply(
        domain: String, agent: AgentKey, events: [RelayEvent], newIDs: [String],
        in txn: borrowing WriteTransaction
    ) throws -> ApplyOutcome {
        let key = agent.storeKey(domain: domain)
        let known = try txn.get(agents, key).flatMap(UInt64.init(bigEndianBytes:))
        var applied = known ?? 0
        var outcome = ApplyOutcome(ackedThrough: applied)
        outcome.newSequence = known == nil
        var ids = newIDs[...]
        let counters = ListCounters()
        for event in events.sorted(by: { $0.seq < $1.seq }) {
            if event.seq <= applied {
                outcome.duplicates += 1
                continue
            }
            guard event.seq == applied + 1 else {
                if outcome.applied == 0 { outcome.expectedSequence = applied + 1 }
                break
            }
            do {
                for t in try applyOne(domain: domain, agent: agent, event, id: ids.first ?? secureID(), counters: counters, txn) {
                    outcome.fanout[t, default: 0] += 1
                }
                if !ids.isEmpty { ids.removeFirst() }
                outcome.applied += 1
                if event.body["events"]?[BrokerStore.membersEvent] != nil { outcome.membershipDeltas += 1 }
                if let ts = event.body["ts"]?.numberValue?.integer, ts > 0 { outcome.acceptedAt.append(ts) }
            } catch let e as SCIMError {
                outcome.rejected[event.seq] = e.detail
            }
            applied = event.seq
        }
        try counters.flush(self, txn)
        try txn.put(agents, key, applied.bigEndianBytes)
        outcome.ackedThrough = applied
        return outcome
    }

    func applyOne(
        domain: String, agent: AgentKey, _ event: RelayEvent, id newID: String, counters: ListCounters? = nil,
        _ txn: borrowing WriteTransaction
    ) throws -> [String] {
        guard let events = event.body["events"]?.objectValue, events.count == 1, let (uri, body) = events.members.first else {
            throw SCIMError.invalidValue("event \(event.seq) must hold exactly one SCIM event")
        }
        if uri == BrokerStore.undeliverableEvent {
            // The agent could not deliver this event (the broker refused it on
            // its own): recorded as rejected, so the agent keeps it as a dead letter.
            throw SCIMError.invalidValue(
                "event \(event.seq) (\(body["ref"]?.stringValue ?? "no ref")) could not be delivered: \(body["reason"]?.stringValue ?? "no reason given")"
            )
        }
        guard let ref = body["ref"]?.stringValue else { throw SCIMError.invalidValue("event \(event.seq) has no 'ref'") }
        let parts = slashParts(ref)
        guard parts.count == 2, ["Users", "Groups"].contains(parts[0]), !parts[1].isEmpty else {
            throw SCIMError.invalidValue("event \(event.seq): 'ref' \(ref) is not /Users/<id> or /Groups/<id>")
        }
        let type = parts[0] == "Users" ? "User" : "Group"
        let sourceID = String(parts[1])
        let key = Array("\(domain)/\(type)/\(sourceID)".utf8)
        let existing = try txn.get(resources, key).flatMap { try JSONParser.parse($0, limits: .stored).objectValue }
        let trace = event.body["txn"]?.stringValue ?? ""
        let acceptedAt = event.body["ts"]?.numberValue?.integer ?? 0
        // A route that decides on members sees them (read before the index changes, and after).
        let routesReadMembers = type == "Group" && targets.contains { $0.groupRoutesReadMembers }
        let routedOld = routesReadMembers ? try existing.map { try withMembers(txn, $0) } : existing
        func routed(_ new: JSONObject) throws -> JSONObject { routesReadMembers ? try withMembers(txn, new) : new }
        switch uri {
        case "urn:ietf:params:SCIM:event:prov:delete":
            guard let existing, let brokerID = existing["id"]?.stringValue else { return [] }
            try txn.delete(brokerIds, Array(brokerID.utf8))
            try txn.delete(resources, key)
            try updateListIndexes(type: type, key: key, old: existing, new: nil, counters: counters, txn)
            if type == "Group" { try removeMembersLater(brokerID, txn) }
            let left = try leaveGroups(brokerID, txn)
            let queued = try enqueueFanout(
                domain: domain, type: type, brokerID: brokerID, old: routedOld, new: nil, trace: trace,
                acceptedAt: acceptedAt, txn)
            return queued + (try memberLeft(brokerID, groups: left, trace: trace, acceptedAt: acceptedAt, txn))
        case "urn:ietf:params:SCIM:event:prov:create:full", "urn:ietf:params:SCIM:event:prov:put:full",
            "urn:ietf:params:SCIM:event:prov:patch:full", BrokerStore.attributesEvent:
            guard var data = body["data"]?.objectValue else { throw SCIMError.invalidValue("event \(event.seq) has no 'data'") }
            // Namespaced by domain: the broker's own stable id, the source kept beside it.
            let brokerID = existing?["id"]?.stringValue ?? newID
            data["id"] = .string(brokerID)
            var source: JSONObject = ["domain": .string(domain), "agent": .string(agent.identity), "id": .string(sourceID)]
            if !agent.epoch.isEmpty { source["epoch"] = .string(agent.epoch) }
            stamp(&source, event, body)
            data[BrokerStore.sourceExtension] = .object(source)
            var schemas = data["schemas"]?.arrayValue ?? []
            if !schemas.contains(.string(BrokerStore.sourceExtension)) { schemas.append(.string(BrokerStore.sourceExtension)) }
            data["schemas"] = .array(schemas)
            // Members name users of the same domain by their source ids: the
            // directory names them by broker id (unknown ones are not federated).
            // They go to the members index, not into the stored group.
            var touched: [String] = []
            if uri == BrokerStore.attributesEvent {
                // Protocol 3: the group's attributes alone; its members stand.
                guard type == "Group" else {
                    throw SCIMError.invalidValue("event \(event.seq): an attributes event names a group, not \(ref)")
                }
                guard existing != nil else {
                    // Nothing to keep: refused, so the agent sends the whole group at its next change.
                    throw SCIMError.invalidValue(
                        "event \(event.seq): the attributes of \(ref) without its members, which this broker does not hold")
                }
                guard data["members"] == nil else {
                    throw SCIMError.invalidValue("event \(event.seq): an attributes event carries no 'members'")
                }
                // Protocol 3: the attributes alone; the members stand (their changes come as members events).
                data["members"] = nil
            } else if type == "Group" {
                var mapped: [JSONObject] = []
                for m in data["members"]?.arrayValue ?? [] {
                    if let o = try federatedMember(m, domain: domain, txn) { mapped.append(o) }
                }
                data["members"] = nil
                touched = try replaceMembers(brokerID, with: mapped, txn)
            }
            try txn.put(resources, key, JSON.object(data).serialized())
            try txn.put(brokerIds, Array(brokerID.utf8), key)
            // A resource new here has a broker id made for this write: none of its entries can exist.
            try updateListIndexes(
                type: type, key: key, old: existing, new: data, counters: counters, fresh: existing == nil && brokerID == newID, txn)
            let queued = try enqueueFanout(
                domain: domain, type: type, brokerID: brokerID, old: routedOld, new: try routed(data), trace: trace,
                acceptedAt: acceptedAt, touched: touched, txn)
            return queued
        case BrokerStore.membersEvent:
            // Protocol 2: the members added and removed, not the whole group.
            guard type == "Group" else { throw SCIMError.invalidValue("event \(event.seq): a members change names a group, not \(ref)") }
            guard let existing, let brokerID = existing["id"]?.stringValue else {
                throw SCIMError.invalidValue("event \(event.seq): members change for \(ref), which this broker does not hold")
            }
            let added = body["added"]?.arrayValue ?? [], removed = body["removed"]?.arrayValue ?? []
            // Checked before anything changes: a refused event leaves nothing half applied.
            guard removed.allSatisfy({ $0.stringValue != nil }) else {
                throw SCIMError.invalidValue("event \(event.seq): 'removed' holds member ids (strings)")
            }
            guard added.allSatisfy({ $0["value"]?.stringValue != nil }) else {
                throw SCIMError.invalidValue("event \(event.seq): 'added' holds members ({\"value\": id})")
            }
            var data = existing
            var touched: [String] = []
            for r in removed {
                guard let v = r.stringValue else {
                    throw SCIMError.invalidValue("event \(event.seq): 'removed' holds member ids (strings)")
                }
                if let id = try memberBrokerID(domain: domain, sourceID: v, txn), try deleteMember(brokerID, id, txn) { touched.append(id) }
            }
            for a in added {
                guard a["value"]?.stringValue != nil else {
                    throw SCIMError.invalidValue("event \(event.seq): 'added' holds members ({\"value\": id})")
                }
                // A member already there is updated (display, type).
                if let o = try federatedMember(a, domain: domain, txn), let id = try putMember(brokerID, o, txn) { touched.append(id) }
            }
            var source = existing[BrokerStore.sourceExtension]?.objectValue ?? [:]
            stamp(&source, event, body)
            data[BrokerStore.sourceExtension] = .object(source)
            try txn.put(resources, key, JSON.object(data).serialized())
            return try enqueueFanout(
                domain: domain, type: type, brokerID: brokerID, old: routedOld, new: try routed(data), trace: trace,
                acceptedAt: acceptedAt, touched: touched, txn)
        default:
            throw SCIMError.invalidValue("event \(event.seq): unknown event type \(uri)")
        }
    }

    /// The source extension's fields of the event last applied: the agent's
    /// version, the trace, the sequence, and when it was accepted and applied.
    func stamp(_ source: inout JSONObject, _ event: RelayEvent, _ body: JSON) {
        if let v = body["version"] { source["version"] = v }
        if let trace = event.body["txn"]?.stringValue, !trace.isEmpty { source["trace"] = .string(trace) }
        source["seq"] = .number(JSONNumber(integer: Int64(event.seq)))
        if let accepted = event.body["ts"]?.numberValue?.integer, accepted > 0 {
            source["accepted"] = .number(JSONNumber(integer: accepted))
        }
        source["applied"] = .number(JSONNumber(integer: unixMilliseconds()))
    }

    /// A member as the agent named it (its source id) as the directory names
    /// it (the broker id of the domain's user); nil when the directory does
    /// not hold it (it was not federated).
    func federatedMember(_ member: JSON, domain: String, _ txn: borrowing WriteTransaction) throws -> JSONObject? {
        guard var o = member.objectValue, let v = o["value"]?.stringValue,
            let id = try memberBrokerID(domain: domain, sourceID: v, txn)
        else { return nil }
        o["value"] = .string(id)
        o["$ref"] = nil
        return o
    }

    /// The relay protocol this broker speaks (docs/protocol.md): 2 adds
    /// `membersEvent`, 3 `attributesEvent` (a group's attributes without its
    /// members); it says so in every 200.
    public static let protocolVersion = 3
    /// A group's members added and removed (protocol 2): `ref`, `version`,
    /// `added` (members, `{"value": id}` in the agent's ids), `removed` (ids).
    public static let membersEvent = "urn:scim-edge:params:event:prov:patch:members"
    /// Protocol 3: a group's attributes without its members, which stand (a
    /// broker that does not know it refuses it: the agent then sends the group whole).
    public static let attributesEvent = "urn:scim-edge:params:event:prov:patch:attributes"

    /// Stands in for an event the broker refused on its own (docs/protocol.md).
    public static let undeliverableEvent = "urn:scim-edge:params:event:undeliverable"

    /// Where a federated resource came from.
    public static let sourceExtension = sourceExtensionSchema
}

/// `count` new broker ids (`BrokerIDs`).
func newBrokerIDs(_ count: Int) -> [String] { BrokerIDs.shared.next(count) }

func secureID() -> String { BrokerIDs.shared.next(1)[0] }

/// Broker ids in creation order: 32 hex digits, a 48-bit Unix time in ms, a
/// 16-bit count that orders the ids of one millisecond, and 64 random bits
/// (unique across processes and clock steps). Ascending within a process,
/// so the tables keyed by broker id (`brokerIds`, `byType`, the per-value
/// index, a boundary agent's foreign resources) grow at their end: a batch
/// dirties a few pages instead of one per table per event, which is most of
/// what an apply writes and syncs. An id names a resource and reveals when
/// the broker first saw it; it grants nothing (every read is authenticated).
final class BrokerIDs: Sendable {
    static let shared = BrokerIDs()
    private let state = Mutex<(ms: UInt64, count: UInt64)>((0, 0))

    func next(_ count: Int) -> [String] {
        guard count > 0 else { return [] }
        let random = secureRandomBytes(8 * count)
        let now = UInt64(max(0, unixMilliseconds()))
        let first = state.withLock { s -> (ms: UInt64, count: UInt64) in
            if now > s.ms { s = (now, 0) } else { s.count += 1 }
            let start = s
            // Each id after the first takes the next count; past 16 bits, the next millisecond.
            let last = s.count + UInt64(count - 1)
            s = (s.ms + (last >> 16), last & 0xFFFF)
            return start
        }
        var out: [String] = []
        out.reserveCapacity(count)
        var ms = first.ms, n = first.count
        for k in 0..<count {
            var bytes = [UInt8](repeating: 0, count: 16)
            let head = ms << 16 | n
            for b in 0..<8 { bytes[b] = UInt8(truncatingIfNeeded: head >> (56 - 8 * UInt64(b))) }
            for b in 0..<8 { bytes[8 + b] = random[8 * k + b] }
            out.append(hexString(bytes))
            n += 1
            if n > 0xFFFF { (ms, n) = (ms + 1, 0) }
        }
        return out
    }
}
