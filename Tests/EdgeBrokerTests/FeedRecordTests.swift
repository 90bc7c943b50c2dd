import EdgeLoop
import EdgeStore
import EdgeTestSupport
import SCIM
import XCTest

@testable import EdgeBroker
@testable import EdgeDelivery

/// What a downlink event's commit hop needs is kept beside it in binary
/// (`FeedTrail` in `downlinkTrail`); the event itself stays the JSON the
/// agent receives, written as bytes. Records an older broker wrote (JSON)
/// are still read.
final class FeedRecordTests: XCTestCase {
    func testATrailRoundTripsAndABrokenRecordIsNone() throws {
        let trails = [
            FeedTrail(brokerID: "b-1", trace: "7ef9", event: "change", issued: 1_764_000_000_123, accepted: 1, applied: 2),
            FeedTrail(brokerID: "ü/é ✓", trace: "", event: "members", issued: -5, accepted: .min, applied: .max),
        ]
        for t in trails {
            let value = t.encoded
            XCTAssertEqual(value.first, FeedTrail.marker)
            XCTAssertEqual(FeedTrail(value), t)
            // Cut anywhere, or with a byte more: not a record.
            for n in 0..<value.count { XCTAssertNil(FeedTrail(Array(value.prefix(n))), "cut at \(n)") }
            XCTAssertNil(FeedTrail(value + [0]))
        }
        XCTAssertNil(FeedTrail([0x02, 0, 0]))
        // A length past the value's end.
        XCTAssertNil(FeedTrail([FeedTrail.marker, 0xff, 0xff, 0xff, 0xff, 0]))
        // An older broker's record (JSON), and one without a kind or an id.
        XCTAssertEqual(
            FeedTrail(Array(#"{"id":"old-1","trace":"t1","event":"delete","issued":13,"accepted":11,"applied":12}"#.utf8)),
            FeedTrail(brokerID: "old-1", trace: "t1", event: "delete", issued: 13, accepted: 11, applied: 12))
        XCTAssertEqual(FeedTrail(Array(#"{"id":"old-2"}"#.utf8))?.event, "change")
        XCTAssertNil(FeedTrail(Array(#"{"trace":"t"}"#.utf8)))
    }

    func testDecimalsAreWrittenAsJSONNumbersWriteThem() {
        for n: Int64 in [0, 7, -1, 10, 99, 100, 1_764_000_000_123, .max, .min, .max - 1, .min + 1, -1_000_000] {
            var out: [UInt8] = [UInt8(ascii: "x")]
            appendDecimal(n, to: &out)
            XCTAssertEqual(String(decoding: out, as: UTF8.self), "x" + JSONNumber(integer: n).text)
        }
    }

    /// Real LMDB file: the page carries each event's JSON (compact, its
    /// members in the envelope's order), its hop's needs are one binary
    /// record each, and the acknowledgement records the hop from it, an
    /// older broker's JSON record too, in feed order, and deletes them.
    func testAFeedEventsTrailIsBinaryAndAnOlderBrokersIsStillRead() throws {
        let dir = TempDirectory("feed-record")
        defer { dir.remove() }
        let (store, dest) = try destinationStore(dir)
        try applyUsers(store, ["ana", "bo\"b", "çé"])
        let page = try store.environment.write { txn in
            try store.pollFeed(target: dest, epoch: "s1", ack: 0, limit: 100, window: 100, speaks: 5, txn)
        }
        XCTAssertEqual(page.events.count, 3)
        var refs: [String] = []
        for (i, bytes) in page.events.enumerated() {
            let e = try XCTUnwrap(JSONParser.parse(bytes, limits: .stored).objectValue)
            XCTAssertEqual(JSON.object(e).serialized(), bytes, "compact, as serialising the envelope gives")
            XCTAssertEqual(e.members.map(\.key), ["seq", "jti", "txn", "iat", "ts", "queued", "domain", "events"])
            XCTAssertEqual(e["seq"], .int(i + 1))
            XCTAssertEqual(e["jti"], .string("sub-\(i + 1)"))
            XCTAssertEqual(e["txn"], .string("trace-\(i)"))
            XCTAssertEqual(e["domain"], "acme-de")
            let (uri, body) = try XCTUnwrap(e["events"]?.objectValue?.members.first)
            XCTAssertEqual(uri, BrokerStore.DownlinkURI.createFull)
            XCTAssertEqual(body.objectValue?.members.map(\.key), ["ref", "data"])
            XCTAssertEqual(body["data"]?["userName"], .string(["ana", "bo\"b", "çé"][i]))
            refs.append(try XCTUnwrap(body["ref"]?.stringValue))
        }
        let ids = refs.map { String($0.dropFirst("/Users/".count)) }
        try store.environment.read { txn in
            var trails: [FeedTrail] = []
            try txn.scan(store.downlinkTrail) { _, v in
                XCTAssertEqual(v.first, UInt8(ascii: "{"), "JSON, which an older broker reads, until the binary reader has shipped")
                trails.append(try XCTUnwrap(FeedTrail(v)))
                return true
            }
            XCTAssertEqual(trails.map(\.brokerID), ids)
            XCTAssertEqual(trails.map(\.trace), ["trace-0", "trace-1", "trace-2"])
            XCTAssertEqual(trails.map(\.event), ["create", "create", "create"])
            XCTAssertTrue(trails.allSatisfy { $0.issued > 0 && $0.applied > 0 && $0.accepted > 0 })
        }
        // The second event's record as a broker before this one wrote it (JSON).
        try store.environment.write { txn in
            let key = prefixed("sub", UInt64(2).bigEndianBytes)
            let json = #"{"id":"\#(ids[1])","trace":"t1","event":"put","issued":13,"accepted":11,"applied":12}"#
            try txn.put(store.downlinkTrail, key, Array(json.utf8))
        }
        _ = try store.environment.write { txn in
            try store.pollFeed(target: dest, epoch: "s1", ack: 3, limit: 100, window: 100, speaks: 5, txn)
        }
        try store.environment.read { txn in
            XCTAssertEqual(try txn.count(store.downlink), 0)
            XCTAssertEqual(try txn.count(store.downlinkTrail), 0, "the records go with their acknowledgement")
        }
        for (i, id) in ids.enumerated() {
            let hop = try XCTUnwrap(boundaryHop(store, id), id)
            XCTAssertEqual(hop["feedSeq"], .int(i + 1))
            XCTAssertEqual(hop["target"], "sub")
            XCTAssertEqual(hop["outcome"], "unreported")
            if i == 1 {
                XCTAssertEqual(hop["event"], "put")
                XCTAssertEqual(hop["trace"], "t1")
                XCTAssertEqual(hop["issued"], 13)
                XCTAssertEqual(hop["accepted"], 11)
                XCTAssertEqual(hop["applied"], 12)
            } else {
                XCTAssertEqual(hop["event"], "create")
                XCTAssertEqual(hop["trace"], .string("trace-\(i)"))
                for k in ["issued", "accepted", "applied"] { XCTAssertGreaterThan(hop[k]?.numberValue?.integer ?? 0, 0, k) }
            }
        }
    }

    /// The envelope written as bytes is, byte for byte, what serialising
    /// the `JSONObject` of the event gave before (header members, then the
    /// event's), with its data inline or given as bytes, for every kind of
    /// feed event: create, put, delete, members delta, attributes, the end
    /// of a resync; with a trace and a target name that need escaping.
    func testTheEnvelopeIsWhatSerialisingItsObjectGave() throws {
        let dir = TempDirectory("feed-envelope")
        defer { dir.remove() }
        let (store, _) = try destinationStore(dir)
        let data: JSONObject = [
            "schemas": ["urn:ietf:params:scim:schemas:core:2.0:User"], "userName": "zoë \"z\"", "id": "b-9",
            "emails": [["value": "z@example.com", "primary": true]], "n": .number(JSONNumber(integer: 1500)),
        ]
        let kinds: [(uri: String, ref: String, data: JSONObject?, extra: JSONObject)] = [
            (BrokerStore.DownlinkURI.createFull, "/Users/b-9", data, [:]),
            (BrokerStore.DownlinkURI.putFull, "/Users/b-9", data, [:]),
            (BrokerStore.DownlinkURI.delete, "/Users/b-9", nil, [:]),
            (BrokerStore.membersEvent, "/Groups/g-1", nil, ["added": [["value": "b-1"], ["value": "b-2"]], "removed": ["b-3"]]),
            (BrokerStore.attributesEvent, "/Groups/g-1", ["displayName": "staff"], [:]),
        ]
        let target = "sub \"ü\"\n"
        var seq: Int64 = 0
        for (i, k) in kinds.enumerated() {
            let item = DeliveryItem(
                brokerID: "b-\(i)", type: "User", operation: .upsert, trace: "t\"\u{1}\(i)", queuedAt: 1_764_000_000_000 + Int64(i),
                acceptedAt: 1_763_999_999_000 + Int64(i))
            let withData = store.feedEvent(k.uri, k.ref, domain: "acme-de", data: k.data, extra: k.extra)
            let withoutData = store.feedEvent(k.uri, k.ref, domain: "acme-de", extra: k.extra)
            // The data inline in the event, and (as materialising a user does) given as its serialised bytes.
            // (An event without data is written once.)
            for (event, bytes) in [(withData, nil), (withoutData, k.data.map { JSON.object($0).serialized() })]
            where k.data != nil || bytes == nil {
                seq += 1
                let written = try store.environment.write { txn in
                    try store.appendFeedEvent(target, event, data: bytes, item, txn)
                    return try XCTUnwrap(txn.get(store.downlink, prefixed(target, UInt64(seq).bigEndianBytes)))
                }
                let iat = try XCTUnwrap(JSONParser.parse(written, limits: .stored)["iat"])
                var old: JSONObject = [
                    "seq": .number(JSONNumber(integer: seq)), "jti": .string("\(target)-\(seq)"), "txn": .string(item.trace), "iat": iat,
                    "ts": .number(JSONNumber(integer: item.acceptedAt)), "queued": .number(JSONNumber(integer: item.queuedAt)),
                ]
                for (key, v) in withData { old[key] = v }
                XCTAssertEqual(
                    String(decoding: written, as: UTF8.self), String(decoding: JSON.object(old).serialized(), as: UTF8.self), k.uri)
                // `iat` is in seconds; the record read back from the event (when its own cannot be read) has it in ms.
                let seconds = try XCTUnwrap(iat.numberValue?.integer)
                XCTAssertLessThanOrEqual(abs(seconds - unixMilliseconds() / 1000), 5)
                XCTAssertEqual(
                    FeedTrail(event: written),
                    FeedTrail(
                        brokerID: String(k.ref.split(separator: "/").last!), trace: item.trace, event: BrokerStore.feedEventKinds[k.uri]!,
                        issued: seconds * 1000, accepted: item.acceptedAt, applied: item.queuedAt), k.uri)
                XCTAssertFalse(FeedTrail.isResyncEnd(written))
            }
        }
        // The end of a resync: an empty body, and no trail record (it names no resource).
        seq += 1
        let end: JSONObject = ["events": .object([BrokerStore.resyncCompleteEvent: .object([:])])]
        let item = DeliveryItem(
            brokerID: "", type: BrokerStore.resyncCompleteItem, operation: .upsert, trace: "", queuedAt: 5, acceptedAt: 0)
        try store.environment.write { txn in
            try store.appendFeedEvent(target, end, item, txn)
            let written = try XCTUnwrap(txn.get(store.downlink, prefixed(target, UInt64(seq).bigEndianBytes)))
            let iat = try XCTUnwrap(JSONParser.parse(written, limits: .stored)["iat"])
            let old: JSONObject = [
                "seq": .number(JSONNumber(integer: seq)), "jti": .string("\(target)-\(seq)"), "txn": "", "iat": iat, "ts": 0, "queued": 5,
                "events": .object([BrokerStore.resyncCompleteEvent: .object([:])]),
            ]
            XCTAssertEqual(String(decoding: written, as: UTF8.self), String(decoding: JSON.object(old).serialized(), as: UTF8.self))
            XCTAssertNil(try txn.get(store.downlinkTrail, prefixed(target, UInt64(seq).bigEndianBytes)))
            XCTAssertNil(FeedTrail(event: written), "it names no resource")
            XCTAssertTrue(FeedTrail.isResyncEnd(written))
            XCTAssertEqual(try txn.count(store.downlinkTrail), Int(seq) - 1, "one record per event that names a resource")
        }
    }

    /// Real LMDB file: a group's create and its members delta, a user's
    /// delete and the end of a resync, acknowledged, leave the hop each
    /// names (the end of a resync none), and their records go.
    func testGroupDeleteAndResyncEventsLeaveTheirHops() throws {
        let dir = TempDirectory("feed-kinds")
        defer { dir.remove() }
        let (store, dest) = try destinationStore(dir, types: ["User", "Group"])
        try applyUsers(store, ["ana", "bob"])
        try applyRelay(store, [group("g1", "staff", members: ["u0"])], ids: ["b-g"])
        var page = try poll(store, dest, ack: 0)
        let ids = try refs(page).map { String($0.split(separator: "/").last!) }
        XCTAssertEqual(try kinds(page), ["create", "create", "create"], "two users, then the group")
        try applyRelay(store, [members("g1", add: ["u1"])], ids: [])
        try applyRelay(store, [relayEvent(BrokerStore.DownlinkURI.delete, ["ref": "/Users/u0"])], ids: [])
        page = try poll(store, dest, ack: 3)
        XCTAssertEqual(try kinds(page), ["members", "delete"], "the member joins; the user goes (the agent drops it from its groups)")
        let outcomes = try BrokerStore.FeedOutcomes(
            ["from": 4, "through": 5, "committed": .number(JSONNumber(integer: unixMilliseconds())), "notAccepted": [5]], ack: 5)
        page = try poll(store, dest, ack: 5, outcomes: outcomes)
        XCTAssertEqual(page.committed.outcomes, ["accepted": 1, "not accepted": 1])
        XCTAssertTrue(page.committed.untraced.isEmpty)
        XCTAssertEqual(try boundaryHops(store, ids[2]).map { $0["event"] }, ["create", "members"])
        XCTAssertEqual(try boundaryHops(store, ids[2]).map { $0["outcome"] }, ["unreported", "accepted"])
        XCTAssertEqual(try boundaryHops(store, ids[0]).map { $0["event"] }, ["create", "delete"])
        XCTAssertEqual(try boundaryHops(store, ids[0]).last?["outcome"], "not accepted")
        // A resync queues every resource again, then its end.
        var phase = ResyncPhase.clear(0)
        var from: [UInt8]?
        while phase != .done {
            (phase, from) = try store.environment.write { txn in try store.resyncStep(dest, epoch: "s2", phase, from: from, txn) }
        }
        page = try store.environment.write { txn in
            try store.pollFeed(target: dest, epoch: "s2", ack: 0, limit: 100, window: 100, speaks: 5, txn)
        }
        let uris = try page.events.map { try XCTUnwrap(JSONParser.parse($0, limits: .stored)["events"]?.objectValue?.members.first?.key) }
        XCTAssertEqual(uris.last, BrokerStore.resyncCompleteEvent)
        XCTAssertEqual(uris.count, 3, "bob, the group, the end")
        try store.environment.read { txn in XCTAssertEqual(try txn.count(store.downlinkTrail), 2, "none for the end of the resync") }
        page = try store.environment.write { txn in
            try store.pollFeed(target: dest, epoch: "s2", ack: 3, limit: 100, window: 100, speaks: 5, txn)
        }
        XCTAssertEqual(page.committed.outcomes, ["unreported": 2])
        try store.environment.read { txn in XCTAssertEqual(try txn.count(store.downlinkTrail), 0) }
        XCTAssertEqual(try boundaryHops(store, ids[1]).map { $0["event"] }, ["create", "create"], "and again after the resync")
    }

    /// Two events of one resource acknowledged by one answer share its
    /// commit time: each hop gets a µs of its own (feed order), so neither
    /// overwrites the other in the trail.
    func testTwoEventsOfOneResourceInOneAnswerKeepTwoHopsInOrder() throws {
        let dir = TempDirectory("feed-two")
        defer { dir.remove() }
        let (store, dest) = try destinationStore(dir)
        try applyUsers(store, ["ana"])
        _ = try poll(store, dest, ack: 0)
        try applyRelay(store, [user("u0", "ana.b")], ids: [])
        _ = try poll(store, dest, ack: 0, after: 1)
        let committed = unixMilliseconds()
        let outcomes = try BrokerStore.FeedOutcomes(
            ["from": 1, "through": 2, "committed": .number(JSONNumber(integer: committed))], ack: 2)
        let page = try poll(store, dest, ack: 2, outcomes: outcomes)
        XCTAssertEqual(page.committed.outcomes, ["accepted": 2])
        let hops = try boundaryHopsWithTimes(store, "b-1")
        XCTAssertEqual(hops.map { $0.hop["event"] }, ["create", "put"])
        XCTAssertEqual(hops.map { $0.hop["feedSeq"] }, [1, 2])
        XCTAssertEqual(hops.map(\.micros), [UInt64(committed) * 1000, UInt64(committed) * 1000 + 1])
        XCTAssertEqual(hops.map { $0.hop["at"] }, [.number(JSONNumber(integer: committed)), .number(JSONNumber(integer: committed))])
    }

    /// A trail record that is missing or cannot be read (a newer broker's
    /// format after a downgrade, a damaged value) is not skipped in
    /// silence: its hop is made from the event itself, in feed order with
    /// the readable ones (a refused group delta is sent whole again from
    /// it), and counted; one whose event cannot be read either is counted
    /// as unrecorded, its outcome still counted. Before, both were deleted
    /// with no hop, count or log.
    func testAnUnreadableOrMissingTrailRecordIsReadFromItsEventAndCounted() throws {
        let dir = TempDirectory("feed-unreadable")
        defer { dir.remove() }
        let (store, dest) = try destinationStore(dir, types: ["User", "Group"])
        try applyUsers(store, ["ana", "bob", "cy"])
        try applyRelay(store, [group("g1", "staff", members: ["u0"])], ids: ["b-g"])
        _ = try poll(store, dest, ack: 0)
        let rename = relayEvent(
            BrokerStore.attributesEvent, ["ref": "/Groups/g1", "data": ["schemas": [.string(groupSchema)], "displayName": "crew"]])
        try applyRelay(store, [rename, user("u0", "ana.b")], ids: [])
        var page = try poll(store, dest, ack: 0, after: 4)
        XCTAssertEqual(try kinds(page), ["attributes", "put"])
        let ids = (1...3).map { "b-\($0)" }
        // 1 and 2: a record in a format this broker does not know; 3: that, and its event damaged; 5 (the group's
        // delta): no record at all. 6 (ana's second event) is read as usual, and 4 from its record alone.
        try store.environment.write { txn in
            for seq: UInt64 in [1, 2, 3] { try txn.put(store.downlinkTrail, prefixed("sub", seq.bigEndianBytes), [0x7f, 1, 2, 3]) }
            try txn.put(store.downlink, prefixed("sub", UInt64(3).bigEndianBytes), Array("{\"seq\":3,".utf8))
            XCTAssertTrue(try txn.delete(store.downlinkTrail, prefixed("sub", UInt64(5).bigEndianBytes)))
            // 4 (the group's create): its record without its event, which is read alone.
            XCTAssertTrue(try txn.delete(store.downlink, prefixed("sub", UInt64(4).bigEndianBytes)))
        }
        let second = try store.environment.read { txn in
            try XCTUnwrap(JSONParser.parse(XCTUnwrap(txn.get(store.downlink, prefixed("sub", UInt64(2).bigEndianBytes))), limits: .stored))
        }
        let committed = unixMilliseconds()
        let outcomes = try BrokerStore.FeedOutcomes(
            [
                "from": 1, "through": 6, "committed": .number(JSONNumber(integer: committed)),
                "refused": ["3": "invalidValue", "5": "noTarget"],
            ],
            ack: 6)
        page = try poll(store, dest, ack: 6, outcomes: outcomes)
        XCTAssertEqual(page.committed.untraced.map(\.seq), [1, 2, 3, 5])
        XCTAssertEqual(page.committed.untraced.map(\.recovered), [true, true, false, true])
        XCTAssertEqual(page.committed.outcomes, ["accepted": 4, "refused": 2], "each acknowledged event's outcome is counted")
        // Ana's hops in feed order: the create made from its event, then the put from its record, a µs apart.
        let ana = try boundaryHopsWithTimes(store, ids[0])
        XCTAssertEqual(ana.map { $0.hop["event"] }, ["create", "put"])
        XCTAssertEqual(ana.map { $0.hop["feedSeq"] }, [1, 6])
        XCTAssertEqual(ana.map(\.micros), [UInt64(committed) * 1000, UInt64(committed) * 1000 + 1])
        let recovered = try XCTUnwrap(try boundaryHops(store, ids[1]).first)
        XCTAssertEqual(recovered["event"], "create")
        XCTAssertEqual(recovered["feedSeq"], 2)
        XCTAssertEqual(recovered["trace"], "trace-1")
        XCTAssertEqual(recovered["accepted"], second["ts"])
        XCTAssertEqual(recovered["applied"], second["queued"])
        XCTAssertEqual(recovered["issued"], .number(JSONNumber(integer: try XCTUnwrap(second["iat"]?.numberValue?.integer) * 1000)))
        XCTAssertEqual(recovered["outcome"], "accepted")
        XCTAssertEqual(try boundaryHops(store, ids[2]), [], "no hop: neither its record nor its event could be read")
        XCTAssertEqual(try boundaryHops(store, "b-g").map { $0["event"] }, ["create", "attributes"])
        XCTAssertEqual(try boundaryHops(store, "b-g").last?["outcome"], "refused")
        // The refused delta's group is sent whole again (its record was read from the event): the same answer carries it.
        XCTAssertEqual(try kinds(page), ["put"])
        XCTAssertEqual(try refs(page), ["/Groups/b-g"])
        XCTAssertNotNil(
            try JSONParser.parse(page.events[0], limits: .stored)["events"]?.objectValue?.members.first?.value["data"]?["members"])
        try store.environment.read { txn in
            XCTAssertEqual(try txn.count(store.downlinkTrail), 1, "the acknowledged records went; the new event's is there")
            XCTAssertEqual(try txn.count(store.downlink), 1)
        }
    }

    /// Two answers committed in the same ms (the agent's clock) with an
    /// event of one resource each: the second hop takes the next free µs
    /// instead of overwriting the first.
    func testHopsOfTwoAnswersCommittedInOneMillisecondAreBothKept() throws {
        let dir = TempDirectory("feed-same-ms")
        defer { dir.remove() }
        let (store, dest) = try destinationStore(dir)
        try applyUsers(store, ["ana"])
        _ = try poll(store, dest, ack: 0)
        let committed = unixMilliseconds()
        _ = try poll(
            store, dest, ack: 1,
            outcomes: try BrokerStore.FeedOutcomes(["from": 1, "through": 1, "committed": .number(JSONNumber(integer: committed))], ack: 1))
        try applyRelay(store, [user("u0", "ana.b")], ids: [])
        _ = try poll(store, dest, ack: 1)
        _ = try poll(
            store, dest, ack: 2,
            outcomes: try BrokerStore.FeedOutcomes(["from": 2, "through": 2, "committed": .number(JSONNumber(integer: committed))], ack: 2))
        let hops = try boundaryHopsWithTimes(store, "b-1")
        XCTAssertEqual(hops.map { $0.hop["feedSeq"] }, [1, 2])
        XCTAssertEqual(hops.map(\.micros), [UInt64(committed) * 1000, UInt64(committed) * 1000 + 1])
    }

    /// An agent whose clock is far ahead (10 days) does not carry the
    /// feed's hops with it: its hop is keyed at most 5 minutes past the
    /// broker's clock, and the next answer's, from a clock set right, at
    /// its own time (before, every later hop would have followed the
    /// furthest one, past the trail's retention). One far behind keeps
    /// its hop through the next sweep (it was keyed in 1970 and swept).
    func testAnAgentClockFarAheadDoesNotCarryTheFeedsHops() throws {
        let dir = TempDirectory("feed-clock-ahead")
        defer { dir.remove() }
        let (store, dest) = try destinationStore(dir)
        try applyUsers(store, ["ana", "bob"])
        _ = try poll(store, dest, ack: 0, after: 0)
        let before = unixMilliseconds()
        let ahead = before + 10 * 86_400_000
        _ = try poll(
            store, dest, ack: 1,
            outcomes: try BrokerStore.FeedOutcomes(["from": 1, "through": 1, "committed": .number(JSONNumber(integer: ahead))], ack: 1))
        let first = try XCTUnwrap(boundaryHopsWithTimes(store, "b-1").first)
        XCTAssertLessThanOrEqual(first.micros, UInt64(unixMilliseconds() + BrokerStore.maxHopSkewMilliseconds) * 1000)
        XCTAssertGreaterThanOrEqual(first.micros, UInt64(before + BrokerStore.maxHopSkewMilliseconds) * 1000)
        let right = unixMilliseconds()
        _ = try poll(
            store, dest, ack: 2,
            outcomes: try BrokerStore.FeedOutcomes(["from": 2, "through": 2, "committed": .number(JSONNumber(integer: right))], ack: 2))
        let second = try XCTUnwrap(boundaryHopsWithTimes(store, "b-2").first)
        XCTAssertLessThanOrEqual(second.micros, first.micros + 1, "after the furthest hop, not 10 days ahead")
        XCTAssertGreaterThanOrEqual(second.micros, UInt64(right) * 1000)
        // A local app's answer from that clock: also at most 5 minutes ahead.
        let app = BrokerStore.AppOutcome(id: "b-1", trace: "trace-0", event: "upsert", outcome: "delivered", at: ahead)
        let page = try store.environment.write { txn in
            try store.pollFeed(target: dest, epoch: "s1", ack: 2, limit: 100, window: 100, apps: [app], speaks: 5, txn)
        }
        XCTAssertEqual(page.committed.apps, ["delivered": 1])
        let hops = try store.environment.read { txn in
            var found: [UInt64] = []
            try txn.scanKeys(store.trail, from: prefixed("b-1", []), to: prefixEnd("b-1")) { k in
                if k.suffix(3).elementsEqual(Array("app".utf8)) { found.append(UInt64(bigEndianBytes: Array(k[4..<12])) ?? 0) }
                return true
            }
            return found
        }
        XCTAssertEqual(hops.count, 1)
        XCTAssertLessThanOrEqual(hops.first ?? .max, UInt64(unixMilliseconds() + BrokerStore.maxHopSkewMilliseconds) * 1000 + 999)

        // A clock far behind (1970), in a feed of its own: the hop is kept through a sweep.
        let other = TempDirectory("feed-clock-behind")
        defer { other.remove() }
        let (fresh, feed) = try destinationStore(other)
        relaySeq = 0
        try applyUsers(fresh, ["cy"])
        XCTAssertEqual(try refs(try poll(fresh, feed, ack: 0)), ["/Users/b-1"])
        let early = unixMilliseconds()
        _ = try poll(fresh, feed, ack: 1, outcomes: try BrokerStore.FeedOutcomes(["from": 1, "through": 1, "committed": 5], ack: 1))
        _ = try fresh.environment.write { txn in try fresh.sweepTrail(trailFrom: nil, tracesFrom: nil, limit: 10_000, txn) }
        let kept = try XCTUnwrap(boundaryHopsWithTimes(fresh, "b-1").first, "kept through the sweep")
        XCTAssertGreaterThanOrEqual(kept.micros, UInt64(early - BrokerStore.maxHopSkewMilliseconds) * 1000)
    }

    /// A queue item this broker cannot read (damaged, or a newer broker's
    /// kind after a downgrade) becomes a dead letter with its bytes,
    /// counted, and the items after it go on; before, it was deleted with
    /// nothing sent, logged or kept.
    func testAnUnreadableQueueItemBecomesADeadLetterAndTheNextGoOn() throws {
        let dir = TempDirectory("feed-unreadable-item")
        defer { dir.remove() }
        let (store, dest) = try destinationStore(dir)
        try applyUsers(store, ["ana", "bob"])
        let damaged = Array("{\"id\":\"b-1\",\"type\":".utf8)
        let newer = try store.environment.write { txn in
            // The first user's item damaged; an item of a kind this broker does not know before the second's.
            var keys: [[UInt8]] = []
            try txn.scanKeys(store.fanout, from: prefixed("sub", []), to: prefixEnd("sub")) { k in
                keys.append(k)
                return true
            }
            XCTAssertEqual(keys.count, 2)
            try txn.put(store.fanout, keys[0], damaged)
            var other = try XCTUnwrap(DeliveryItem(XCTUnwrap(txn.get(store.fanout, keys[1]))))
            other.type = "Device"
            let key = keys[0] + [0]  // between the two
            XCTAssertTrue(key.lexicographicallyPrecedes(keys[1]))
            try txn.put(store.fanout, key, other.json.serialized())
            return other.json.serialized()
        }
        let page = try poll(store, dest, ack: 0)
        XCTAssertEqual(try refs(page), ["/Users/b-2"], "the items after them go on")
        XCTAssertEqual(page.committed.unreadableItems, 2)
        let letters = try store.deadLetters(target: "sub")
        XCTAssertEqual(
            letters.map { $0.letter["request"] },
            [.string(String(decoding: damaged, as: UTF8.self)), .string(String(decoding: newer, as: UTF8.self))])
        XCTAssertEqual(letters.map { $0.letter["type"] }, ["", "Device"])
        XCTAssertTrue(letters.allSatisfy { $0.letter["response"]?.stringValue?.contains("cannot read") == true })
        try store.environment.read { txn in XCTAssertEqual(try txn.count(store.fanout), 0) }
    }

    /// What an answer reports reaches the right counter.
    func testUntracedEventsAndUnreadableItemsAreCountedByKind() throws {
        var dest = try TargetConfiguration(name: "sub", url: "http://127.0.0.1:9/scim/v2")
        dest.destination = "acme-us"
        let feeds = BrokerFeeds(destinations: [dest])
        var c = BrokerStore.CommittedEvents()
        c.untraced = [(1, true), (2, false), (3, true)]
        feeds.committed("acme-us", c)
        XCTAssertEqual(feeds.untraced["acme-us"], ["true": 2, "false": 1])
    }

    /// A push's answer asked for from a time past what µs can hold (the
    /// console's `since`) finds nothing instead of trapping.
    func testAPushAnswerFromTheFarFutureIsNothing() throws {
        let dir = TempDirectory("feed-far-future")
        defer { dir.remove() }
        let (store, _) = try destinationStore(dir)
        try applyUsers(store, ["ana"])
        let at = unixMilliseconds()
        try store.environment.write { txn in
            try store.recordHop(brokerID: "b-1", trace: "t", ["hop": "target sub", "status": 201], txn, now: at * 1000)
        }
        XCTAssertEqual(try store.pushAnswer(target: "sub", brokerID: "b-1", since: at - 1)?["status"], 201)
        XCTAssertNil(try store.pushAnswer(target: "sub", brokerID: "b-1", since: at + 1))
        XCTAssertNil(try store.pushAnswer(target: "sub", brokerID: "b-1", since: .max))
        XCTAssertNil(try store.pushAnswer(target: "sub", brokerID: "b-1", since: Int64.max / 1000 + 1))
    }

    func testSequencesAreLoggedAsRanges() {
        XCTAssertEqual(BrokerService.sequences([1, 2, 3, 7, 9, 10]), "1-3,7,9-10")
        XCTAssertEqual(BrokerService.sequences([]), "")
        XCTAssertEqual(BrokerService.sequences(stride(from: 1, to: 100, by: 2).map(UInt64.init)).hasSuffix(",… (50 events)"), true)
    }

    let groupSchema = "urn:ietf:params:scim:schemas:core:2.0:Group"
    var relaySeq: UInt64 = 0

    func relayEvent(_ uri: String, _ body: JSONObject) -> JSONObject {
        ["txn": "", "ts": .number(JSONNumber(integer: unixMilliseconds())), "events": [uri: .object(body)]]
    }

    func user(_ ref: String, _ name: String) -> JSONObject {
        relayEvent(
            BrokerStore.DownlinkURI.putFull,
            [
                "ref": .string("/Users/\(ref)"),
                "data": ["schemas": ["urn:ietf:params:scim:schemas:core:2.0:User"], "userName": .string(name)],
            ])
    }

    func group(_ ref: String, _ name: String, members: [String]) -> JSONObject {
        relayEvent(
            BrokerStore.DownlinkURI.createFull,
            [
                "ref": .string("/Groups/\(ref)"),
                "data": [
                    "schemas": [.string(groupSchema)], "displayName": .string(name),
                    "members": .array(members.map { ["value": .string($0)] }),
                ],
            ])
    }

    func members(_ ref: String, add: [String]) -> JSONObject {
        relayEvent(BrokerStore.membersEvent, ["ref": .string("/Groups/\(ref)"), "added": .array(add.map { ["value": .string($0)] })])
    }

    func applyRelay(_ store: BrokerStore, _ bodies: [JSONObject], ids: [String]) throws {
        let agent = AgentKey(identity: "spiffe://t/acme-de/agent-1", epoch: "e1")
        let events = bodies.map { body in
            relaySeq += 1
            var b = body
            b["seq"] = .number(JSONNumber(integer: Int64(relaySeq)))
            return RelayEvent(seq: relaySeq, body: .object(b))
        }
        let outcome = try store.environment.write { txn in
            try store.apply(domain: "acme-de", agent: agent, events: events, newIDs: ids, in: txn)
        }
        XCTAssertEqual(outcome.rejected, [:])
    }

    func poll(
        _ store: BrokerStore, _ dest: TargetConfiguration, ack: UInt64, after: UInt64? = nil, outcomes: BrokerStore.FeedOutcomes? = nil
    ) throws -> BrokerStore.FeedPage {
        try store.environment.write { txn in
            try store.pollFeed(
                target: dest, epoch: "s1", ack: ack, after: after, limit: 100, window: 100, outcomes: outcomes, speaks: 5, txn)
        }
    }

    func refs(_ page: BrokerStore.FeedPage) throws -> [String] {
        try page.events.map {
            try XCTUnwrap(JSONParser.parse($0, limits: .stored)["events"]?.objectValue?.members.first?.value["ref"]?.stringValue)
        }
    }

    func kinds(_ page: BrokerStore.FeedPage) throws -> [String] {
        try page.events.map {
            let uri = try XCTUnwrap(JSONParser.parse($0, limits: .stored)["events"]?.objectValue?.members.first?.key)
            return BrokerStore.feedEventKinds[uri] ?? uri
        }
    }

    /// The stored hop of the boundary's commit of `id`, as `trace` reads it.
    func boundaryHop(_ store: BrokerStore, _ id: String) throws -> JSONObject? {
        try boundaryHops(store, id).first
    }

    /// Every hop of the boundary's commits of `id`, in the trail's order.
    func boundaryHops(_ store: BrokerStore, _ id: String) throws -> [JSONObject] {
        try boundaryHopsWithTimes(store, id).map(\.hop)
    }

    func boundaryHopsWithTimes(_ store: BrokerStore, _ id: String) throws -> [(micros: UInt64, hop: JSONObject)] {
        try store.environment.read { txn in
            var found: [(UInt64, JSONObject)] = []
            try txn.scan(store.trail, from: prefixed(id, []), to: prefixEnd(id)) { k, v in
                let hop = try XCTUnwrap(JSONParser.parse(v, limits: .stored).objectValue)
                let at = Array(k[(id.utf8.count + 1)...].prefix(8))
                if hop["hop"] == "boundary acme-us" { found.append((try XCTUnwrap(UInt64(bigEndianBytes: at)), hop)) }
                return true
            }
            return found
        }
    }

    func destinationStore(_ dir: TempDirectory, types: [String] = ["User"]) throws -> (BrokerStore, TargetConfiguration) {
        var dest = try TargetConfiguration(name: "sub", url: "http://127.0.0.1:9/scim/v2")
        dest.destination = "acme-us"
        dest.routes = [try Route(types: types)]
        return (try BrokerStore(path: dir.file("broker"), targets: [dest]), dest)
    }

    func applyUsers(_ store: BrokerStore, _ names: [String]) throws {
        let agent = AgentKey(identity: "spiffe://t/acme-de/agent-1", epoch: "e1")
        let first = relaySeq
        relaySeq += UInt64(names.count)
        let events = names.enumerated().map { i, name in
            RelayEvent(
                seq: first + UInt64(i + 1),
                body: [
                    "seq": .number(JSONNumber(integer: Int64(first) + Int64(i + 1))), "txn": .string("trace-\(i)"),
                    "ts": .number(JSONNumber(integer: unixMilliseconds())),
                    "events": [
                        BrokerStore.DownlinkURI.createFull: [
                            "ref": .string("/Users/u\(i)"),
                            "data": ["schemas": ["urn:ietf:params:scim:schemas:core:2.0:User"], "userName": .string(name)],
                        ]
                    ],
                ])
        }
        let outcome = try store.environment.write { txn in
            try store.apply(
                domain: "acme-de", agent: agent, events: events, newIDs: names.indices.map { "b-\(Int(first) + $0 + 1)" }, in: txn)
        }
        XCTAssertEqual(outcome.rejected, [:])
    }
}
