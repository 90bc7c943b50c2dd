import EdgeLoop
import EdgeStore
import EdgeTestSupport
import SCIM
import XCTest

@testable import EdgeBroker
@testable import EdgeDelivery

/// A downlink event is one record: what its commit's hop needs, in binary,
/// then the event's JSON as the destination receives it (`FeedRecord`).
/// Events an older broker stored (JSON alone, their hop's needs in
/// `downlinkTrail`) are still served and their hops recorded.
final class FeedRecordTests: XCTestCase {
    func testATrailRoundTripsAndABrokenValueIsNoRecord() throws {
        let trails = [
            FeedTrail(brokerID: "b-1", trace: "7ef9", event: "change", issued: 1_764_000_000_123, accepted: 1, applied: 2),
            FeedTrail(brokerID: "ü/é ✓", trace: "", event: "members", issued: -5, accepted: .min, applied: .max),
        ]
        for t in trails {
            let json = Array(#"{"seq":1}"#.utf8)
            let value = FeedRecord.start(t, jsonCapacity: json.count) + json
            let split = try XCTUnwrap(FeedRecord.split(value))
            XCTAssertEqual(split.trail, t)
            XCTAssertEqual(Array(value[split.json...]), json)
            XCTAssertEqual(Array(FeedRecord.json(value)), json)
            // Cut anywhere inside the trail (or right after it): not a record.
            for n in 1..<split.json + 1 { XCTAssertNil(FeedRecord.split(Array(value.prefix(n))), "cut at \(n)") }
        }
        // JSON alone: no trail, the whole value is the event.
        let plain = Array(#"{"seq":2}"#.utf8)
        XCTAssertNil(try XCTUnwrap(FeedRecord.split(plain)).trail)
        XCTAssertEqual(Array(FeedRecord.json(plain)), plain)
        XCTAssertEqual(Array(FeedRecord.start(nil, jsonCapacity: 9)), [])
        XCTAssertNil(FeedRecord.split([]))
        XCTAssertNil(FeedRecord.split([0x02, 0, 0]))
        // A length past the value's end.
        XCTAssertNil(FeedRecord.split([FeedRecord.marker, 0xff, 0xff, 0xff, 0xff, UInt8(ascii: "{")]))
    }

    func testDecimalsAreWrittenAsJSONNumbersWriteThem() {
        for n: Int64 in [0, 7, -1, 10, 99, 100, 1_764_000_000_123, .max, .min, .max - 1, .min + 1, -1_000_000] {
            var out: [UInt8] = [UInt8(ascii: "x")]
            appendDecimal(n, to: &out)
            XCTAssertEqual(String(decoding: out, as: UTF8.self), "x" + JSONNumber(integer: n).text)
        }
    }

    /// Real LMDB file: each event is one record with its trail in front,
    /// nothing goes to `downlinkTrail`, the page carries the JSON alone
    /// (compact, its members in the envelope's order), and the
    /// acknowledgement records the hop from the record and deletes it.
    func testAFeedEventIsItsTrailAndItsJSONInOneRecord() throws {
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
            XCTAssertEqual(bytes.first, UInt8(ascii: "{"), "the destination gets the JSON alone")
            let e = try XCTUnwrap(JSONParser.parse(bytes, limits: .stored).objectValue)
            XCTAssertEqual(JSON.object(e).serialized(), bytes, "compact, as serialising the envelope gives")
            XCTAssertEqual(e.members.map(\.key), ["seq", "jti", "txn", "iat", "ts", "queued", "domain", "events"])
            XCTAssertEqual(e["seq"], .int(i + 1))
            XCTAssertEqual(e["jti"], .string("sub-\(i + 1)"))
            XCTAssertEqual(e["domain"], "acme-de")
            let (uri, body) = try XCTUnwrap(e["events"]?.objectValue?.members.first)
            XCTAssertEqual(uri, BrokerStore.DownlinkURI.createFull)
            XCTAssertEqual(body.objectValue?.members.map(\.key), ["ref", "data"])
            XCTAssertEqual(body["data"]?["userName"], .string(["ana", "bo\"b", "çé"][i]))
            refs.append(try XCTUnwrap(body["ref"]?.stringValue))
        }
        try store.environment.read { txn in
            XCTAssertEqual(try txn.count(store.downlinkTrail), 0, "no second record per event")
            var trails: [FeedTrail] = []
            try txn.scan(store.downlink) { _, v in
                XCTAssertEqual(v.first, FeedRecord.marker)
                trails.append(try XCTUnwrap(FeedRecord.split(v)?.trail))
                return true
            }
            XCTAssertEqual(trails.map { "/Users/\($0.brokerID)" }, refs)
            XCTAssertEqual(trails.map(\.event), ["create", "create", "create"])
            XCTAssertTrue(trails.allSatisfy { $0.issued > 0 && $0.applied > 0 && $0.accepted > 0 })
        }
        XCTAssertGreaterThan(try store.feedOldest(target: "sub"), 0, "the oldest event's queue time, from its trail")
        _ = try store.environment.write { txn in
            try store.pollFeed(target: dest, epoch: "s1", ack: 3, limit: 100, window: 100, speaks: 5, txn)
        }
        try store.environment.read { txn in XCTAssertEqual(try txn.count(store.downlink), 0) }
        for (i, ref) in refs.enumerated() {
            let id = String(ref.dropFirst("/Users/".count))
            let hop = try XCTUnwrap(boundaryHop(store, id), id)
            XCTAssertEqual(hop["feedSeq"], .int(i + 1))
            XCTAssertEqual(hop["event"], "create")
            XCTAssertEqual(hop["target"], "sub")
            XCTAssertEqual(hop["outcome"], "unreported")
            for k in ["issued", "accepted", "applied"] { XCTAssertGreaterThan(hop[k]?.numberValue?.integer ?? 0, 0, k) }
        }
    }

    /// An upgrade over a feed an older broker left: its events (JSON alone)
    /// go out as they were stored, its oldest's age reads from the JSON,
    /// and their acknowledgement records each hop from `downlinkTrail`,
    /// in feed order with the new broker's events after them, and empties it.
    func testEventsAnOlderBrokerStoredAreServedAndTheirHopsRecorded() throws {
        let dir = TempDirectory("feed-record-legacy")
        defer { dir.remove() }
        let (store, dest) = try destinationStore(dir)
        try applyUsers(store, ["new"])
        let old: [(seq: UInt64, id: String, json: String, trail: String)] = [
            (
                1, "old-1",
                #"{"seq":1,"jti":"sub-1","txn":"t1","iat":1,"ts":11,"queued":12,"domain":"acme-de","events":{"urn:ietf:params:SCIM:event:prov:delete":{"ref":"/Users/old-1"}}}"#,
                #"{"id":"old-1","trace":"t1","event":"delete","issued":13,"accepted":11,"applied":12}"#
            ),
            (
                2, "old-2",
                #"{"seq":2,"jti":"sub-2","txn":"","iat":1,"ts":0,"queued":22,"domain":"acme-de","events":{"urn:ietf:params:SCIM:event:prov:delete":{"ref":"/Users/old-2"}}}"#,
                #"{"id":"old-2","trace":"","issued":23,"accepted":0,"applied":22}"#
            ),
        ]
        try store.environment.write { txn in
            for o in old {
                try txn.put(store.downlink, prefixed("sub", o.seq.bigEndianBytes), Array(o.json.utf8))
                try txn.put(store.downlinkTrail, prefixed("sub", o.seq.bigEndianBytes), Array(o.trail.utf8))
            }
            try txn.put(store.targetState, Array("dlseq/sub".utf8), UInt64(2).bigEndianBytes)
        }
        XCTAssertEqual(try store.feedOldest(target: "sub"), 12, "the oldest event's queue time, from its JSON")
        let page = try store.environment.write { txn in
            try store.pollFeed(target: dest, epoch: "s1", ack: 0, limit: 100, window: 100, speaks: 5, txn)
        }
        XCTAssertEqual(page.events.count, 3, "the old feed's two events, then the new broker's")
        XCTAssertEqual(page.events.prefix(2).map { String(decoding: $0, as: UTF8.self) }, old.map(\.json), "as they were stored")
        XCTAssertEqual(try JSONParser.parse(page.events[2], limits: .stored)["seq"], 3)
        _ = try store.environment.write { txn in
            try store.pollFeed(target: dest, epoch: "s1", ack: 3, limit: 100, window: 100, speaks: 5, txn)
        }
        try store.environment.read { txn in
            XCTAssertEqual(try txn.count(store.downlinkTrail), 0, "the old records go with their acknowledgement")
            XCTAssertEqual(try txn.count(store.downlink), 0)
        }
        let first = try XCTUnwrap(boundaryHop(store, "old-1"))
        XCTAssertEqual(first["feedSeq"], 1)
        XCTAssertEqual(first["event"], "delete")
        XCTAssertEqual(first["trace"], "t1")
        XCTAssertEqual(first["issued"], 13)
        XCTAssertEqual(first["accepted"], 11)
        XCTAssertEqual(first["applied"], 12)
        let second = try XCTUnwrap(boundaryHop(store, "old-2"))
        XCTAssertEqual(second["event"], "change", "a record without a kind, as before")
        XCTAssertNil(second["accepted"], "a time of 0 is left out")
        XCTAssertEqual(second["feedSeq"], 2)
    }

    /// The stored hop of the boundary's commit of `id`, as `trace` reads it.
    func boundaryHop(_ store: BrokerStore, _ id: String) throws -> JSONObject? {
        try store.environment.read { txn in
            var found: JSONObject?
            try txn.scan(store.trail, from: prefixed(id, []), to: prefixEnd(id)) { _, v in
                let hop = try JSONParser.parse(v, limits: .stored).objectValue
                if hop?["hop"] == "boundary acme-us" { found = hop }
                return found == nil
            }
            return found
        }
    }

    func destinationStore(_ dir: TempDirectory) throws -> (BrokerStore, TargetConfiguration) {
        var dest = try TargetConfiguration(name: "sub", url: "http://127.0.0.1:9/scim/v2")
        dest.destination = "acme-us"
        dest.routes = [try Route(types: ["User"])]
        return (try BrokerStore(path: dir.file("broker"), targets: [dest]), dest)
    }

    func applyUsers(_ store: BrokerStore, _ names: [String]) throws {
        let agent = AgentKey(identity: "spiffe://t/acme-de/agent-1", epoch: "e1")
        let events = names.enumerated().map { i, name in
            RelayEvent(
                seq: UInt64(i + 1),
                body: [
                    "seq": .int(i + 1), "txn": .string("trace-\(i)"), "ts": .number(JSONNumber(integer: unixMilliseconds())),
                    "events": [
                        BrokerStore.DownlinkURI.createFull: [
                            "ref": .string("/Users/u\(i)"),
                            "data": ["schemas": ["urn:ietf:params:scim:schemas:core:2.0:User"], "userName": .string(name)],
                        ]
                    ],
                ])
        }
        let outcome = try store.environment.write { txn in
            try store.apply(domain: "acme-de", agent: agent, events: events, newIDs: names.indices.map { "b-\($0 + 1)" }, in: txn)
        }
        XCTAssertEqual(outcome.rejected, [:])
    }
}
