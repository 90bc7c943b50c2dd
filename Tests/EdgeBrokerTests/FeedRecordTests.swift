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
