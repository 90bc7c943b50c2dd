import EdgeDelivery
import EdgeLoop
import EdgeStore
import SCIM

/// The downlink's durable side (docs/protocol.md, "Downlink"): a target
/// with `domain:` is a boundary, and its fan-out queue becomes a feed that
/// the boundary's agent fetches over its own outbound connection.
///
/// The apply queues a destination's changes as for any target
/// (`enqueueFanout`: routes, and never the destination's own domain). A
/// poll *materialises* queue items into feed events (the resource's
/// current state, a group's member changes from the per-target member
/// index) with a sequence of the destination's own, in the transaction that
/// records what the destination now holds (mappings, member index), and
/// removes the items. The events stay in `downlink` until the agent
/// acknowledges them, and are served again until then: the feed is what was
/// promised, so the index is right once the agent has applied it, and a
/// resend is harmless (the agent skips what it committed).
///
/// | `targetState` key | value |
/// |---|---|
/// | `dlseq/<target>` | the last feed sequence issued (BE) |
/// | `dlacked/<target>` | the sequence the agent acknowledged (BE): entries through it are gone |
///
/// Bounded: at most `window` events are materialised and unacknowledged;
/// the rest waits as queue items (one per change, as for a slow app), with
/// depth and age visible.
extension BrokerStore {
    /// RFC 9967 event URIs, as the uplink uses them.
    enum DownlinkURI {
        static let createFull = "urn:ietf:params:SCIM:event:prov:create:full"
        static let putFull = "urn:ietf:params:SCIM:event:prov:put:full"
        static let delete = "urn:ietf:params:SCIM:event:prov:delete"
    }

    /// A feed event's kind in the trail (`trace`), by its event URI.
    static let feedEventKinds = [
        DownlinkURI.createFull: "create", DownlinkURI.putFull: "put", DownlinkURI.delete: "delete", BrokerStore.membersEvent: "members",
        BrokerStore.attributesEvent: "attributes",
    ]

    /// How far from the broker's clock a boundary hop's time may be (an agent's clock ahead or behind).
    static let maxHopSkewMilliseconds: Int64 = 300_000

    /// The time a boundary's hop is recorded at: the agent's (`ms`), within
    /// `maxHopSkewMilliseconds` of the broker's (`now`). A clock far ahead
    /// would carry the feed's later hops with it (`dlhopat/`) past the
    /// trail's retention, never swept; one far behind would have the next
    /// sweep remove the hop at once, without notice.
    static func hopTime(_ ms: Int64, now: Int64) -> Int64 {
        min(max(ms, now - maxHopSkewMilliseconds), now + maxHopSkewMilliseconds)
    }

    /// The most bytes of events one poll answers (the agent parses up to 64 MiB).
    static let maxPageBytes = 4 << 20

    /// The downlink protocol version (docs/protocol.md): 2 takes the
    /// agent's outcomes with its acknowledgement, 3 its local apps' answers
    /// (`appOutcomes`), 4 sends an agent that says 4 in its poll a group's
    /// attribute change as `attributesEvent` (without its members), 5 ends
    /// a resync with `resyncCompleteEvent` to an agent that says 5.
    public static let downlinkVersion = 5

    /// The last event of a resync's feed (downlink protocol 5): everything
    /// the destination should hold has been sent again before it, so what
    /// the agent holds and was not sent again since the feed started over
    /// is no longer the destination's (deleted at its source, or out of the
    /// routes, while the store was away) and goes.
    public static let resyncCompleteEvent = "urn:scim-edge:params:event:feed:resync:complete"
    /// The queue item that becomes it (no resource).
    static let resyncCompleteItem = "ResyncComplete"

    /// Where a destination's feed stands.
    public struct FeedPosition: Sendable, Equatable {
        /// The last sequence issued, and the one acknowledged.
        public var issued: UInt64
        public var acked: UInt64
        public var unacked: Int { Int(issued - acked) }
    }

    /// What a poll answers.
    public struct FeedPage: Sendable {
        /// Events after the acknowledgement, in order (their stored bytes).
        public var events: [[UInt8]]
        public var position: FeedPosition
        /// More is waiting (events past this page, or queue items not yet materialised).
        public var more: Bool
        /// Queue items are left to materialise (`materializeAhead` turns them into events while the answer travels).
        public var queued = false
        /// What this poll acknowledged, for metrics.
        public var committed = CommittedEvents()
    }

    /// The events a poll acknowledged: how many of each outcome, and from
    /// their source agent's acceptance to the boundary's commit (ms; only
    /// where the agent reported its commit time).
    public struct CommittedEvents: Sendable {
        public var outcomes: [String: Int] = [:]
        public var latencies: [Int64] = []
        /// The local apps' answers the poll carried (protocol 3), by outcome (and `unmatched`).
        public var apps: [String: Int] = [:]
        /// Acknowledged events whose trail record was missing or could not be read, by
        /// feed sequence: `recovered` when their hop was made from the
        /// event itself, otherwise no hop was recorded (logged, counted).
        public var untraced: [(seq: UInt64, recovered: Bool)] = []
        /// Queue items this poll's materialising could not read: dead letters now.
        public var unreadableItems = 0
    }

    /// The agent's word on what it acknowledges (`outcomes`, downlink
    /// protocol 2): its commit time, and for each feed sequence from `from`
    /// through `through` whether its inbound policy accepted the event
    /// (every one not listed), did not accept it, or the boundary refused it
    /// (a `scimType`; its detail stays in the boundary). The broker records
    /// it as the change's last hop (`trace`), from its own record of each
    /// event: the agent names sequences, never resources.
    public struct FeedOutcomes: Sendable, Equatable {
        public var from: UInt64
        public var through: UInt64
        public var committed: Int64
        public var notAccepted: Set<UInt64> = []
        public var refused: [UInt64: String] = [:]
        /// 9999-12-31T23:59:59.999Z in Unix ms: the latest `committed` taken.
        static let latestCommit: Int64 = 253_402_300_799_999

        /// Parses `outcomes` of a poll acknowledging `ack`; the error is the 400's description.
        public init(_ json: JSON, ack: UInt64) throws(FeedOutcomesError) {
            guard json.objectValue != nil, let from = json["from"]?.numberValue?.integer,
                let through = json["through"]?.numberValue?.integer, from >= 1, through >= from - 1, UInt64(through) <= ack
            else {
                throw FeedOutcomesError(
                    "'outcomes' must name the feed sequences it covers ('from' ≥ 1 through 'through', at most 'ackedThrough')")
            }
            guard through - from < 100_000 else { throw FeedOutcomesError("'outcomes' may cover at most 100000 sequences") }
            // Bounded (year 9999): the hop's key is the time in µs, which a larger value would overflow.
            guard let committed = json["committed"]?.numberValue?.integer, committed >= 0, committed <= Self.latestCommit else {
                throw FeedOutcomesError("'outcomes.committed' must be the commit time in Unix milliseconds (at most \(Self.latestCommit))")
            }
            (self.from, self.through, self.committed) = (UInt64(from), UInt64(through), committed)
            let range = self.from...max(self.from, self.through)
            for v in json["notAccepted"]?.arrayValue ?? [] {
                guard let n = v.numberValue?.integer, n >= 1, range.contains(UInt64(n)) else {
                    throw FeedOutcomesError("'outcomes.notAccepted' must list sequences from \(from) through \(through)")
                }
                notAccepted.insert(UInt64(n))
            }
            if let r = json["refused"], r.objectValue == nil { throw FeedOutcomesError("'outcomes.refused' must be an object") }
            for (k, v) in json["refused"]?.objectValue?.members ?? [] {
                guard let n = UInt64(k), range.contains(n), let t = v.stringValue, (1...64).contains(t.utf8.count),
                    t.utf8.allSatisfy({ ($0 >= 0x41 && $0 <= 0x5A) || ($0 >= 0x61 && $0 <= 0x7A) })
                else {
                    throw FeedOutcomesError(
                        "'outcomes.refused' maps sequences from \(from) through \(through) to a scimType (letters only)")
                }
                refused[n] = t
            }
        }

        /// The hop's `outcome` and `detail` for one feed sequence of `domain`.
        func describe(_ seq: UInt64, domain: String) -> (outcome: String, detail: String, scimType: String?)? {
            guard seq >= from && seq <= through else { return nil }
            if let t = refused[seq] {
                return ("refused", "refused by boundary \(domain) (\(t)); the reason is in its agent's log", t)
            }
            if notAccepted.contains(seq) { return ("not accepted", "not accepted by the inbound policy of \(domain)", nil) }
            return ("accepted", "committed by boundary \(domain) as its inbound policy maps it", nil)
        }
    }

    public struct FeedOutcomesError: Error, Equatable {
        public let description: String
        /// The index of the `appOutcomes` entry refused (nil: the whole part).
        public let entry: Int?
        init(_ d: String, entry: Int? = nil) { (description, self.entry) = (d, entry) }
    }

    /// A poll the feed cannot answer as it stands: another store than the
    /// one the feed was for (a re-imaged agent), one behind what it
    /// acknowledged (restored from a backup), or one ahead of what this feed
    /// issued (the broker restored from a backup). Either side lacks what the
    /// other believes delivered, so the feed starts again (`resyncStep`): the
    /// destination's current state queued anew, and the agent counting from 0.
    public enum FeedError: Error, Equatable {
        case newStore(acked: UInt64, issued: UInt64)
    }

    func feedPosition(target: String, _ txn: borrowing some StoreReading & ~Copyable) throws -> FeedPosition {
        func counter(_ name: String) throws -> UInt64 {
            try txn.get(targetState, Array("\(name)/\(target)".utf8)).flatMap(UInt64.init(bigEndianBytes:)) ?? 0
        }
        return FeedPosition(issued: try counter("dlseq"), acked: try counter("dlacked"))
    }

    public func feedPosition(target: String) throws -> FeedPosition {
        try environment.read { txn in try feedPosition(target: target, txn) }
    }

    /// The oldest unacknowledged event's queue time (Unix ms; 0: none).
    public func feedOldest(target: String) throws -> Int64 {
        let downlink = self.downlink
        return try environment.read { txn in
            var at: Int64 = 0
            try txn.scan(downlink, from: prefixed(target, []), to: prefixEnd(target)) { _, v in
                at = try JSONParser.parse(v, limits: .stored)["queued"]?.numberValue?.integer ?? 0
                return false
            }
            return at
        }
    }

    /// One poll, in one write transaction: drops the events through `ack`,
    /// materialises the queue items this page lacks (while fewer than
    /// `window` events are unacknowledged; the next page is made after the
    /// answer, `materializeAhead`), and returns up to `limit` events after `ack`.
    ///
    /// `after` (protocol 2; at least `ack`): the last sequence the agent
    /// received, committed or not: the answer starts after it, so the agent
    /// fetches the next page while it commits the last.
    ///
    /// `speaks`: the protocol the agent said in its poll (1 when it said
    /// none). From 4, a group's attribute change is materialised as
    /// `attributesEvent`; an older agent gets full state, also for such
    /// events materialised before it was downgraded (`dlattr`).
    func pollFeed(
        target: TargetConfiguration, epoch: String, ack: UInt64, after: UInt64? = nil, limit: Int, window: Int,
        outcomes: FeedOutcomes? = nil, apps: [AppOutcome] = [], speaks: Int = 1, _ txn: borrowing WriteTransaction
    ) throws -> FeedPage {
        var position = try feedPosition(target: target.name, txn)
        let after = max(ack, after ?? ack)
        let epochKey = Array("dlepoch/\(target.name)".utf8)
        if let known = try txn.get(targetState, epochKey) {
            if known != Array(epoch.utf8) || ack < position.acked || after > position.issued {
                throw FeedError.newStore(acked: position.acked, issued: position.issued)
            }
        } else if ack > 0 || after > position.issued {
            // A store that counted a feed this broker does not know of (its data restored or replaced).
            throw FeedError.newStore(acked: position.acked, issued: position.issued)
        } else {
            try txn.put(targetState, epochKey, Array(epoch.utf8))  // the first store to poll
        }
        var committed = CommittedEvents()
        if ack > position.acked {
            var done: [[UInt8]] = []
            try txn.scanKeys(downlink, from: prefixed(target.name, []), to: prefixed(target.name, (ack + 1).bigEndianBytes)) { k in
                done.append(k)
                return true
            }
            committed = try recordCommits(target, acknowledged: done, through: ack, outcomes, txn)  // may read events: before they go
            for k in done { _ = try txn.delete(downlink, k) }
            try txn.put(targetState, Array("dlacked/\(target.name)".utf8), ack.bigEndianBytes)
            position.acked = ack
        }
        if !apps.isEmpty { committed.apps = try recordAppOutcomes(target, apps, txn) }
        // Only what this page lacks: the rest is materialised after the answer (`materializeAhead`), off the poll's path.
        let lacking = limit - Int(clamping: position.issued - min(after, position.issued))
        let (itemsLeft, unreadable) = try materialize(target, room: min(window - position.unacked, max(0, lacking)), speaks: speaks, txn)
        committed.unreadableItems = unreadable
        position = try feedPosition(target: target.name, txn)
        var events: [[UInt8]] = []
        var bytes = 0
        try txn.scan(downlink, from: prefixed(target.name, (after + 1).bigEndianBytes), to: prefixEnd(target.name)) { _, v in
            // A page stays within `maxPageBytes`, except an event larger on its own (a big group's full state), which goes alone.
            guard events.isEmpty || bytes + v.count <= BrokerStore.maxPageBytes else { return false }
            events.append(v)
            bytes += v.count + 1
            return events.count < limit
        }
        if speaks < 4 { try wholeForOlderAgent(&events, target: target.name, acked: position.acked, txn) }
        return FeedPage(
            events: events, position: position, more: itemsLeft || UInt64(events.count) < position.issued - after, queued: itemsLeft,
            committed: committed)
    }

    /// Up to `limit` more queue items' worth of events, while fewer than
    /// `window` are unacknowledged: run after a poll is answered, so that
    /// the agent's next poll finds its page ready (the feed stays bounded by
    /// the window, as in `pollFeed`). Returns whether it materialised any.
    func materializeAhead(target: TargetConfiguration, limit: Int, window: Int, speaks: Int, _ txn: borrowing WriteTransaction) throws
        -> (made: Bool, unreadable: Int)
    {
        let before = try feedPosition(target: target.name, txn)
        let (_, unreadable) = try materialize(target, room: min(window - before.unacked, limit), speaks: speaks, txn)
        return (try feedPosition(target: target.name, txn).issued > before.issued, unreadable)
    }

    /// The boundary's commit of the events through `through` becomes each
    /// change's last hop in the trail (`boundary <domain>`, with the feed's
    /// issue, the outcome and the agent's commit time), from the broker's
    /// record of each event (`downlinkTrail`, `FeedTrail`), which goes with it.
    /// `acknowledged`: the keys of the events through `through`, in feed
    /// order, still stored (the caller deletes them after): an event whose
    /// record is missing or cannot be read (a newer broker's format after a
    /// downgrade, a damaged value) has its record read from the event
    /// itself, so that its hop, its outcome and a refused delta's whole
    /// state again are not skipped; counted (`untraced`) either way.
    func recordCommits(
        _ target: TargetConfiguration, acknowledged: [[UInt8]], through: UInt64, _ outcomes: FeedOutcomes?,
        _ txn: borrowing WriteTransaction
    ) throws -> CommittedEvents {
        let domain = target.destination ?? target.name
        var keys: [[UInt8]] = []
        var records: [(seq: UInt64, value: [UInt8])] = []  // in feed order, as `acknowledged`
        try txn.scan(downlinkTrail, from: prefixed(target.name, []), to: prefixed(target.name, (through + 1).bigEndianBytes)) { k, v in
            keys.append(k)
            records.append((UInt64(bigEndianBytes: Array(k.suffix(8))) ?? 0, v))
            return true
        }
        for key in keys { _ = try txn.delete(downlinkTrail, key) }
        var out = CommittedEvents()
        var all: [(UInt64, FeedTrail)] = []
        all.reserveCapacity(acknowledged.count)
        func untraced(_ seq: UInt64) {
            out.untraced.append((seq, recovered: false))
            out.outcomes[outcomes?.describe(seq, domain: domain)?.outcome ?? "unreported", default: 0] += 1
        }
        // A record whose event is no longer stored (none is, but a record is never dropped unread).
        func alone(_ r: (seq: UInt64, value: [UInt8])) {
            if let trail = FeedTrail(r.value) { all.append((r.seq, trail)) } else { untraced(r.seq) }
        }
        var next = 0  // the first record not yet matched with its event: the two lists are merged in feed order
        for key in acknowledged {
            let seq = UInt64(bigEndianBytes: Array(key.suffix(8))) ?? 0
            while next < records.count, records[next].seq < seq {
                alone(records[next])
                next += 1
            }
            if next < records.count, records[next].seq == seq {
                next += 1
                if let trail = FeedTrail(records[next - 1].value) {
                    all.append((seq, trail))
                    continue
                }
            }
            let event = try txn.get(downlink, key) ?? []
            if let trail = FeedTrail(event: event) {
                all.append((seq, trail))
                out.untraced.append((seq, recovered: true))
            } else if !FeedTrail.isResyncEnd(event) {  // the end of a resync names no resource: it has no record, and no hop
                untraced(seq)
            }
        }
        for r in records[next...] { alone(r) }
        let now = unixMilliseconds()
        // A hop's key is its time in µs: each is after every earlier boundary hop of this feed (`dlhopat/`, one read
        // and one write per answer) and after the resource's previous one in this answer, so that two events of one
        // resource in an answer, or two answers committed in the same ms, never share a key (one would overwrite
        // the other). A hop's `at` is then a little later than the agent's commit time, never earlier.
        let hopAtKey = Array("dlhopat/\(target.name)".utf8)
        let stored = try txn.get(targetState, hopAtKey).flatMap(UInt64.init(bigEndianBytes:)) ?? 0
        // One already far ahead (the broker's own clock jumped, then came back) is not followed: its keys are far
        // from the new ones, which cannot meet them.
        let previous = stored <= UInt64(now + Self.maxHopSkewMilliseconds) * 1000 ? stored : 0
        var latest = previous
        var lastMicros: [String: UInt64] = [:]
        for (seq, r) in all {
            let said = outcomes?.describe(seq, domain: domain)
            if said?.outcome == "refused", r.event == "attributes" { try sendWholeAgain(target, r.brokerID, txn) }
            let at = said != nil ? outcomes!.committed : now
            var hop: JSONObject = [
                "hop": .string("boundary \(domain)"), "event": .string(r.event), "target": .string(target.name),
                "feedSeq": .number(JSONNumber(integer: Int64(seq))), "outcome": .string(said?.outcome ?? "unreported"),
                "detail": .string(
                    said?.detail
                        ?? "acknowledged by boundary \(domain), whose agent reported no outcome for it (an agent of downlink protocol 1)"),
            ]
            if let t = said?.scimType { hop["scimType"] = .string(t) }
            for (k, v) in [("issued", r.issued), ("accepted", r.accepted), ("applied", r.applied)] where v > 0 {
                hop[k] = .number(JSONNumber(integer: v))
            }
            out.outcomes[said?.outcome ?? "unreported", default: 0] += 1
            let keyed = Self.hopTime(at, now: now)
            if said != nil, r.accepted > 0 { out.latencies.append(keyed - r.accepted) }
            let micros = max(UInt64(max(0, keyed)) * 1000, previous + 1, (lastMicros[r.brokerID] ?? 0) + 1)
            lastMicros[r.brokerID] = micros
            latest = max(latest, micros)
            try recordHop(brokerID: r.brokerID, trace: r.trace, hop, txn, now: Int64(micros))
        }
        if latest > previous { try txn.put(targetState, hopAtKey, latest.bigEndianBytes) }
        return out
    }

    /// Turns up to `room` events' worth of queue items into feed events.
    /// Returns whether queue items are left, and how many could not be read
    /// (each one a dead letter: it never blocks the items after it).
    func materialize(_ target: TargetConfiguration, room: Int, speaks: Int = 1, _ txn: borrowing WriteTransaction) throws -> (
        queued: Bool, unreadable: Int
    ) {
        guard room > 0 else { return (try hasQueued(target.name, txn), 0) }
        var items: [([UInt8], DeliveryItem)] = []
        var unreadable: [([UInt8], [UInt8])] = []
        try txn.scan(fanout, from: prefixed(target.name, []), to: prefixEnd(target.name)) { k, v in
            if let item = DeliveryItem(v), Self.feedItemTypes.contains(item.type) {
                items.append((k, item))
            } else {
                unreadable.append((k, v))
            }
            return items.count + unreadable.count < room
        }
        for (k, v) in unreadable { try unreadableItem(target.name, k, v, txn) }
        var written = 0
        var seenUsers: Set<String> = []
        for (key, item) in items {
            var events: [JSONObject] = []
            var data: [UInt8]?
            var more = false
            if item.type == "User" {
                // Later items of one user in this pass: the first already sent its current state.
                if seenUsers.insert(item.brokerID).inserted, let e = try userEvent(target, item.brokerID, txn) {
                    (events, data) = ([e.event], e.data)
                }
            } else if item.type == "Group" {
                (events, more) = try groupEvents(
                    target, item.brokerID, limit: max(1, room - written), attributesOnly: speaks >= 4, txn)
            } else if item.type == BrokerStore.resyncCompleteItem, speaks >= 5 {
                // An older agent could not act on it: it goes with no event (its sequence is not taken).
                events = [["events": .object([BrokerStore.resyncCompleteEvent: .object([:])])]]
            }
            for e in events { try appendFeedEvent(target.name, e, data: data, item, txn) }
            written += events.count
            if !more { _ = try txn.delete(fanout, key) }
            if written >= room || more { break }
        }
        return (try hasQueued(target.name, txn), unreadable.count)
    }

    /// A queue item this broker cannot read (a newer broker's kind after a
    /// downgrade, a damaged value) leaves the queue as a dead letter with
    /// its stored bytes: visible (`deadletter list`, the console), never
    /// dropped in silence, and never in the way of the items after it.
    /// The queue items a feed is made of; any other is unreadable here.
    static let feedItemTypes: Set<String> = ["User", "Group", resyncCompleteItem]

    func unreadableItem(_ target: String, _ key: [UInt8], _ value: [UInt8], _ txn: borrowing WriteTransaction) throws {
        let letter: JSONObject = [
            "id": "", "type": .string(DeliveryItem(value)?.type ?? ""),
            "method": "", "path": "feed queue",
            "request": .string(String(decoding: value.prefix(64 << 10), as: UTF8.self)),
            "response":
                "a queue item this broker cannot read (a newer broker's after a downgrade, or a damaged value): not sent to the boundary",
            "at": .number(JSONNumber(integer: unixMilliseconds())),
        ]
        _ = try completeDelivery(
            target: target, keys: [key], brokerID: "", type: "", mapping: .none, deadLetter: letter, hop: nil, trace: "", txn)
    }

    func hasQueued(_ target: String, _ txn: borrowing WriteTransaction) throws -> Bool {
        var any = false
        try txn.scanKeys(fanout, from: prefixed(target, []), to: prefixEnd(target)) { _ in
            any = true
            return false
        }
        return any
    }

    /// Appends one event to the feed under the next sequence, and what its
    /// commit's hop will need to `downlinkTrail` (`FeedTrail`). `data`: the SCIM
    /// event's `data` as bytes (`downlinkBytes`), written after its `ref`
    /// as the serialised object would have it. The envelope is written as
    /// bytes: `seq`, `jti`, `txn`, `iat`, `ts`, `queued`, then `event`'s
    /// members (`domain`, `events`).
    func appendFeedEvent(
        _ target: String, _ event: JSONObject, data: [UInt8]? = nil, _ item: DeliveryItem, _ txn: borrowing WriteTransaction
    ) throws {
        let seq = try nextCounter("dlseq/\(target)", txn)
        let now = unixMilliseconds()
        let uri = event["events"]?.objectValue?.members.first?.0 ?? ""
        // The end of a resync names no resource: no hop.
        let trail =
            item.brokerID.isEmpty
            ? nil
            : FeedTrail(
                brokerID: item.brokerID, trace: item.trace, event: BrokerStore.feedEventKinds[uri] ?? uri, issued: now,
                accepted: item.acceptedAt, applied: item.queuedAt)
        var out: [UInt8] = []
        out.reserveCapacity(192 + target.utf8.count + item.trace.utf8.count + (data?.count ?? 0))
        out += #"{"seq":"#.utf8
        appendDecimal(Int64(seq), to: &out)
        out += #","jti":"#.utf8
        appendJSONString("\(target)-\(seq)", to: &out)
        out += #","txn":"#.utf8
        appendJSONString(item.trace, to: &out)
        out += #","iat":"#.utf8
        appendDecimal(now / 1000, to: &out)
        out += #","ts":"#.utf8
        appendDecimal(item.acceptedAt, to: &out)
        out += #","queued":"#.utf8
        appendDecimal(item.queuedAt, to: &out)
        for (k, v) in event {
            out.append(UInt8(ascii: ","))
            appendJSONString(k, to: &out)
            out.append(UInt8(ascii: ":"))
            v.write(to: &out)
        }
        out.append(UInt8(ascii: "}"))
        if let data {
            // `…"events":{"<uri>":{"ref":"…"}}}`: the data goes before the last three braces.
            out.insert(contentsOf: Array(#","data":"#.utf8) + data, at: out.count - 3)
        }
        try txn.put(downlink, prefixed(target, seq.bigEndianBytes), out)
        guard let trail else { return }
        if uri == BrokerStore.attributesEvent { try txn.put(targetState, Array("dlattr/\(target)".utf8), seq.bigEndianBytes) }
        // What the commit's hop will need (`recordCommits`), without reading the event back.
        try txn.put(downlinkTrail, prefixed(target, seq.bigEndianBytes), trail.json)
    }

    /// A resource of the directory by broker id: its domain and state (nil: gone).
    func current(_ brokerID: String, _ txn: borrowing some StoreReading & ~Copyable) throws -> (domain: String, resource: JSONObject)? {
        guard let key = try txn.get(brokerIds, Array(brokerID.utf8)), let bytes = try txn.get(resources, key),
            let o = try JSONParser.parse(bytes, limits: .stored).objectValue
        else { return nil }
        return (String(decoding: key.prefix { $0 != UInt8(ascii: "/") }, as: UTF8.self), o)
    }

    /// What a destination receives of a resource: its broker id as `id`, the
    /// source domain (the only field of the source extension that leaves the
    /// broker), no `meta` or `groups` (the agent keeps its own).
    func downlinkData(_ resource: JSONObject, domain: String) -> JSONObject {
        var data = resource
        data["meta"] = nil
        data["groups"] = nil
        data[BrokerStore.sourceExtension] = ["domain": .string(domain)]
        return data
    }

    /// One SCIM event body (RFC 9967 URI → `ref`, `data`) plus the source domain.
    func feedEvent(_ uri: String, _ ref: String, domain: String, data: JSONObject? = nil, extra: JSONObject = [:]) -> JSONObject {
        var body: JSONObject = ["ref": .string(ref)]
        if let data { body["data"] = .object(data) }
        for (k, v) in extra { body[k] = v }
        return ["domain": .string(domain), "events": .object(JSONObject([(uri, .object(body))]))]
    }

    /// A user's event: its current state if the routes want it there (a
    /// create the first time), a delete if it was there and is no more,
    /// nothing otherwise. The mapping (target id = broker id: the agent
    /// names foreign resources by it) is recorded with the event, and the
    /// groups it joins or leaves there are queued (`userAccountChanged`).
    func userEvent(_ target: TargetConfiguration, _ id: String, _ txn: borrowing WriteTransaction) throws -> (
        event: JSONObject, data: [UInt8]?
    )? {
        let old = try txn.get(targetIds, prefixed(target.name, id)).flatMap(TargetMapping.init)
        // The stored bytes, parsed only when a route decides on the resource
        // itself or they cannot be copied as they are (`downlinkBytes`).
        let stored = try currentBytes(id, txn)
        var routed = false
        if let stored {
            if let decided = BrokerStore.routesWithoutResource(target, domain: stored.domain, type: "User") {
                routed = decided
            } else if let o = try JSONParser.parse(stored.bytes, limits: .stored).objectValue {
                routed = target.routes(domain: stored.domain, type: "User", o)
            }
        }
        if let stored, routed {
            if old == nil {
                let m = TargetMapping(targetID: id, etag: nil, sent: nil)
                try setMapping(target: target.name, type: "User", brokerID: id, m, txn)
                _ = try userAccountChanged(target: target.name, user: id, old: nil, new: m, trace: "", txn)
            }
            let uri = old == nil ? DownlinkURI.createFull : DownlinkURI.putFull, ref = "/Users/\(id)"
            if let data = downlinkBytes(stored.bytes, domain: stored.domain) {
                return (feedEvent(uri, ref, domain: stored.domain), data)
            }
            guard let o = try JSONParser.parse(stored.bytes, limits: .stored).objectValue else { return nil }
            return (feedEvent(uri, ref, domain: stored.domain, data: downlinkData(o, domain: stored.domain)), nil)
        }
        guard old != nil else { return nil }
        try setMapping(target: target.name, type: "User", brokerID: id, nil, txn)
        _ = try userAccountChanged(target: target.name, user: id, old: old, new: nil, trace: "", txn)
        return (feedEvent(DownlinkURI.delete, "/Users/\(id)", domain: stored?.domain ?? ""), nil)
    }

    /// A resource of the directory by broker id: its domain and stored bytes (nil: gone).
    func currentBytes(_ brokerID: String, _ txn: borrowing some StoreReading & ~Copyable) throws -> (domain: String, bytes: [UInt8])? {
        guard let key = try txn.get(brokerIds, Array(brokerID.utf8)), let bytes = try txn.get(resources, key) else { return nil }
        return (String(decoding: key.prefix { $0 != UInt8(ascii: "/") }, as: UTF8.self), bytes)
    }

    /// Whether `target` routes resources of `domain` and `type` whatever
    /// they hold (a route without a filter takes them), does not (no route
    /// names them), or nil: a route's filter decides on the resource.
    static func routesWithoutResource(_ target: TargetConfiguration, domain: String, type: String) -> Bool? {
        guard domain != target.destination else { return false }
        let named = target.routes.filter {
            ($0.domains.isEmpty || $0.domains.contains(domain)) && ($0.types.isEmpty || $0.types.contains(type))
        }
        if named.contains(where: { $0.filter == nil }) { return true }
        return named.isEmpty ? false : nil
    }

    /// `downlinkData` of a stored resource, on its bytes: its members but
    /// `meta` and `groups`, copied as stored, the source extension (in its
    /// place, or last) reduced to the domain. The same bytes as serialising
    /// `downlinkData` of the parsed resource, without building it; nil when
    /// the bytes are not such an object (the caller parses).
    func downlinkBytes(_ stored: [UInt8], domain: String) -> [UInt8]? {
        guard let members = storedObjectMembers(stored) else { return nil }
        let ext = BrokerStore.sourceExtension
        var out: [UInt8] = [UInt8(ascii: "{")]
        out.reserveCapacity(stored.count)
        var first = true, extended = false
        func member(_ key: String) {
            if !first { out.append(UInt8(ascii: ",")) }
            first = false
            appendJSONString(key, to: &out)
            out.append(UInt8(ascii: ":"))
        }
        func extensionValue() {
            out += Array(#"{"domain":"#.utf8)
            appendJSONString(domain, to: &out)
            out.append(UInt8(ascii: "}"))
        }
        for (key, range) in members {
            if equalsIgnoringASCIICase(key, "meta") || equalsIgnoringASCIICase(key, "groups") { continue }
            if !extended, equalsIgnoringASCIICase(key, ext) {
                member(ext)
                extensionValue()
                extended = true
                continue
            }
            member(key)
            stored.withUnsafeBufferPointer { out.append(contentsOf: UnsafeBufferPointer(rebasing: $0[range])) }
        }
        if !extended {
            member(ext)
            extensionValue()
        }
        out.append(UInt8(ascii: "}"))
        return out
    }

    /// A group's events. New there: its full state with its first members
    /// (at most `maxMembersPerPatch`), then the rest as members events of
    /// that many, read from the directory's index a chunk at a time
    /// (`TargetMapping.growFrom`, as for a target: docs/fanout.md), about
    /// `deferredChunk` members a poll, so neither the poll's transaction
    /// nor an event grows with the group.
    /// Then membership changes as deltas of the pending members
    /// (`TargetMembers.swift`: O(k)), at most `limit` events of
    /// `maxMembersPerPatch` members; a change of its other attributes is
    /// full state again with the members it holds there, unless
    /// `attributesOnly` (the agent speaks protocol 4) and the destination
    /// took the group's attributes before (`mapping.sent`): then one
    /// `attributesEvent` without members, O(1) whatever the group's size.
    /// Out of the routes or deleted: a delete. `more`: members are left for
    /// the next pass.
    func groupEvents(
        _ target: TargetConfiguration, _ id: String, limit: Int, attributesOnly: Bool = false, _ txn: borrowing WriteTransaction
    ) throws -> (events: [JSONObject], more: Bool) {
        let name = target.name, ref = "/Groups/\(id)"
        let existing = try txn.get(targetIds, prefixed(name, id)).flatMap(TargetMapping.init)
        let now = try current(id, txn)
        let routed = try now.map { n in
            target.routes(domain: n.domain, type: "Group", target.groupRoutesReadMembers ? try withMembers(txn, n.resource) : n.resource)
        }
        guard let now, routed == true else {
            try clearGroupIndexLater(target: name, group: id, txn)
            guard existing != nil else { return ([], false) }
            try setMapping(target: name, type: "Group", brokerID: id, nil, txn)
            return ([feedEvent(DownlinkURI.delete, ref, domain: now?.domain ?? "")], false)
        }
        let attributes = downlinkData(now.resource, domain: now.domain)
        let chunk = max(1, target.maxMembersPerPatch)
        var events: [JSONObject] = []
        var mapping: TargetMapping
        if let existing {
            mapping = existing
        } else {
            if try groupIndexSweepPending(target: name, group: id, txn) {
                // Its index from its last time there is still being forgotten: a chunk of that now, and the
                // group waits for the next pass, so that its new index is never mistaken for the old one.
                try sweepGroupIndex(target: name, group: id, limit: deferredChunk, txn)
                return ([], true)
            }
            mapping = TargetMapping(targetID: id, etag: nil, sent: attributes, members: 0)
            mapping.growFrom = ""
            _ = try growDestination(target, id, &mapping, chunk, txn)
            events.append(try fullGroupEvent(DownlinkURI.createFull, target: name, id, attributes, domain: now.domain, txn))
        }
        // At most about `deferredChunk` members grown a poll: the poll's transaction stays bounded.
        var growing = max(1, deferredChunk / chunk)
        while events.count < limit, growing > 0, mapping.growFrom != nil {
            growing -= 1
            let added = try growDestination(target, id, &mapping, chunk, txn)
            if !added.isEmpty {
                events.append(
                    feedEvent(BrokerStore.membersEvent, ref, domain: now.domain, extra: ["added": .array(added), "removed": .array([])]))
            }
        }
        var cursor: String?
        var more = mapping.growFrom != nil
        while !more && events.count < limit {
            let changes = try pendingMemberChanges(
                target: name, group: id, after: cursor, limit: chunk, routes: { target.routes(domain: $0, type: $1, $2) }, txn)
            let added = changes.filter { $0.want != nil && $0.held == nil }
            let removed = changes.filter { $0.want == nil && $0.held != nil }
            mapping = try recordMemberStep(
                target: name, group: id, added: added.map { ($0.member, $0.member) }, removed: removed.map(\.member),
                done: changes.filter { !$0.waiting }.map { ($0.member, $0.mark) }, mapping: mapping, txn)
            if !added.isEmpty || !removed.isEmpty {
                let members: [JSON] = added.map { ["value": .string($0.member), "type": $0.entry?["type"] ?? "User"] }
                events.append(
                    feedEvent(
                        BrokerStore.membersEvent, ref, domain: now.domain,
                        extra: ["added": .array(members), "removed": .array(removed.map { .string($0.member) })]))
            }
            cursor = changes.last?.member
            more = changes.count == chunk
            if !more { break }
        }
        if mapping.sent != attributes {
            let whole = !attributesOnly || mapping.sent == nil
            mapping.sent = attributes
            try setMapping(target: name, type: "Group", brokerID: id, mapping, txn)
            if whole {
                events.append(try fullGroupEvent(DownlinkURI.putFull, target: name, id, attributes, domain: now.domain, txn))
            } else {
                var data = attributes
                data["members"] = nil
                events.append(feedEvent(BrokerStore.attributesEvent, ref, domain: now.domain, data: data))
            }
        }
        return (events, more)
    }

    /// The next chunk of a group being grown at a destination
    /// (`mapping.growFrom`): the directory's members after it that the
    /// destination holds as users and not yet in the group, held now, and
    /// the mapping recorded with where to go on (nil: grown). Returns the
    /// members added (`{value, type}`).
    func growDestination(
        _ target: TargetConfiguration, _ id: String, _ mapping: inout TargetMapping, _ chunk: Int, _ txn: borrowing WriteTransaction
    ) throws -> [JSON] {
        guard let from = mapping.growFrom else { return [] }
        let name = target.name
        let (adds, last) = try growChunk(target: name, group: id, after: from, limit: chunk, txn)
        var added: [JSON] = []
        var count = mapping.members ?? 0
        for a in adds where try holdMember(target: name, group: id, member: a.member, targetID: a.member, txn) {
            count += 1
            let type = try txn.get(groupMembers, BrokerStore.memberKey(id, a.member)).flatMap {
                try JSONParser.parse($0, limits: .stored)["type"]
            }
            added.append(["value": .string(a.member), "type": type ?? "User"])
        }
        mapping.members = count
        mapping.growFrom = last
        try setMapping(target: name, type: "Group", brokerID: id, mapping, txn)
        return added
    }

    /// A group's full state as the destination holds it: its attributes and
    /// the members of its index there.
    func fullGroupEvent(
        _ uri: String, target: String, _ id: String, _ attributes: JSONObject, domain: String, _ txn: borrowing WriteTransaction
    ) throws -> JSONObject {
        var data = attributes
        var members: [JSON] = []
        let prefix = BrokerStore.targetGroupPrefix(target, id)
        try txn.scanKeys(targetMembers, from: prefix, to: BrokerStore.targetGroupEnd(target, id)) { k in
            let member = String(decoding: k[prefix.count...], as: UTF8.self)
            let type = try txn.get(groupMembers, BrokerStore.memberKey(id, member)).flatMap {
                try JSONParser.parse($0, limits: .stored)["type"]
            }
            members.append(["value": .string(member), "type": type ?? "User"])
            return true
        }
        data["members"] = .array(members)
        return feedEvent(uri, "/Groups/\(id)", domain: domain, data: data)
    }
}

extension BrokerStore {
    /// An older agent's page (it did not say protocol 4): each
    /// `attributesEvent` in it, materialised while the destination spoke 3
    /// (through the sequence in `dlattr`), is answered as full state with
    /// the members the destination holds now (later members events in the
    /// feed are set operations, harmless on top of it). O(n) for such an
    /// event, only after a downgrade; `dlattr` goes once acknowledged.
    func wholeForOlderAgent(_ events: inout [[UInt8]], target: String, acked: UInt64, _ txn: borrowing WriteTransaction) throws {
        let key = Array("dlattr/\(target)".utf8)
        guard let last = try txn.get(targetState, key).flatMap(UInt64.init(bigEndianBytes:)) else { return }
        guard acked < last else {
            _ = try txn.delete(targetState, key)
            return
        }
        let uri = Array(BrokerStore.attributesEvent.utf8)
        for (i, bytes) in events.enumerated() where bytes.count >= uri.count && bytes.contains(uri) {
            guard var e = try JSONParser.parse(bytes, limits: .stored).objectValue,
                let (u, body) = e["events"]?.objectValue?.members.first, u == BrokerStore.attributesEvent,
                let ref = body["ref"]?.stringValue, ref.hasPrefix("/Groups/"), let data = body["data"]?.objectValue
            else { continue }
            let domain = e["domain"]?.stringValue ?? ""
            let full = try fullGroupEvent(DownlinkURI.putFull, target: target, String(ref.dropFirst(8)), data, domain: domain, txn)
            e["events"] = full["events"]
            events[i] = JSON.object(e).serialized()
        }
    }

    /// The destination refused an `attributesEvent` (it does not hold the
    /// group, or its inbound policy reads members): what it was sent is
    /// forgotten and the group queued, so that it goes whole next.
    func sendWholeAgain(_ target: TargetConfiguration, _ id: String, _ txn: borrowing WriteTransaction) throws {
        guard var m = try txn.get(targetIds, prefixed(target.name, id)).flatMap(TargetMapping.init) else { return }
        m.sent = nil
        try setMapping(target: target.name, type: "Group", brokerID: id, m, txn)
        try enqueue(
            target: target.name,
            DeliveryItem(brokerID: id, type: "Group", operation: .upsert, trace: "", queuedAt: unixMilliseconds(), acceptedAt: 0), txn)
    }
}

/// Starting a boundary's feed again (`FeedError.newStore`), a chunk per
/// write transaction so that memory and each commit stay small: forget what
/// the broker believes the destination holds (its queue, feed, mappings and
/// member index), then queue every resource its routes want, users before
/// groups (a group then finds its members there), and take the new store's
/// epoch. Changes applied meanwhile are queued as usual; a resource queued
/// twice is sent once more at its current state.
public enum ResyncPhase: Sendable, Equatable {
    /// Clearing the `n`th of the tables kept per target.
    case clear(Int)
    case requeue(type: String)
    case done
}

extension BrokerStore {
    /// One chunk of a resync: returns the phase and key to go on from.
    func resyncStep(
        _ target: TargetConfiguration, epoch: String, _ phase: ResyncPhase, from: [UInt8]?, chunk: Int = 5000,
        _ txn: borrowing WriteTransaction
    ) throws -> (ResyncPhase, [UInt8]?) {
        let name = target.name
        switch phase {
        case .clear(let n):
            let tables = [fanout, downlink, downlinkTrail, targetIds, targetOwners, targetMembers, targetMemberOf, targetPending]
            guard n < tables.count else {
                // The feed's sequence starts again; the queue's own goes on (items queued meanwhile keep theirs).
                // (`dlhopat/` stays: the trail's hops of this feed stay too, and a new hop comes after them.)
                for kind in ["dlseq/", "dlacked/", "dlattr/"] { _ = try txn.delete(targetState, Array("\(kind)\(name)".utf8)) }
                return (.requeue(type: "User"), nil)
            }
            var keys: [[UInt8]] = []
            try txn.scanKeys(tables[n], from: prefixed(name, []), to: prefixEnd(name)) { k in
                keys.append(k)
                return keys.count < chunk
            }
            for k in keys { _ = try txn.delete(tables[n], k) }
            return keys.count < chunk ? (.clear(n + 1), nil) : (phase, nil)
        case .requeue(let type):
            var last: [UInt8]?
            var seen = 0
            try txn.scan(resources, from: from.map { $0 + [0] }) { k, v in
                seen += 1
                last = k
                // `<domain>/<Type>/<source id>`
                let parts = k.split(separator: UInt8(ascii: "/"), maxSplits: 2)
                guard parts.count == 3, parts[1].elementsEqual(type.utf8),
                    let o = try JSONParser.parse(v, limits: .stored).objectValue, let id = o["id"]?.stringValue
                else { return seen < chunk }
                let domain = String(decoding: parts[0], as: UTF8.self)
                let routed = try target.routes(
                    domain: domain, type: type, type == "Group" && target.groupRoutesReadMembers ? withMembers(txn, o) : o)
                if routed {
                    try enqueue(
                        target: name,
                        DeliveryItem(brokerID: id, type: type, operation: .upsert, trace: "", queuedAt: unixMilliseconds(), acceptedAt: 0),
                        txn)
                }
                return seen < chunk
            }
            if seen == chunk { return (phase, last) }
            guard type == "User" else {
                try txn.put(targetState, Array("dlepoch/\(name)".utf8), Array(epoch.utf8))
                // After every resource queued again: the agent removes what it holds and was not sent again.
                _ = try enqueue(
                    target: name,
                    DeliveryItem(
                        brokerID: "", type: BrokerStore.resyncCompleteItem, operation: .upsert, trace: "", queuedAt: unixMilliseconds(),
                        acceptedAt: 0),
                    txn)
                return (.done, nil)
            }
            return (.requeue(type: "Group"), nil)
        case .done:
            return (.done, nil)
        }
    }
}
