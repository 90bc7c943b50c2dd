import EdgeAgent
import EdgeLoop
import EdgeStore
import EdgeTestSupport
import EdgeTools
import Foundation
import SCIM
import XCTest

@testable import EdgeBroker
@testable import EdgeDelivery

/// What one console request may cost on a large store, against a real
/// broker process over a real socket: every answer reads a bounded part of
/// the store and says when it did not read everything; the pool's queue is
/// bounded too. And the names, the boundary and the logging of refusals.
extension FanoutTests {
    /// 10,300 users of acme-de in the broker's LMDB file, written before the
    /// broker starts: 300 under one trace id (`bulk-trace`), each queued for
    /// `app` (an app that is not there, paused by an operator, whose deletion
    /// guard holds the one removal queued, the last) and out of the routes
    /// of `elsewhere` (a hop each); and two dead letters of `app`, the first
    /// with a 100,000-byte response.
    func largeConsoleStore() throws -> (api: Int, broker: ChildProcess, removal: UInt64) {
        let nowhere = freeLoopbackPort()
        var app = try TargetConfiguration(name: "app", url: "http://127.0.0.1:\(nowhere)/scim/v2")
        app.routes = [try Route(domains: ["acme-de"])]
        var elsewhere = try TargetConfiguration(name: "elsewhere", url: "http://127.0.0.1:\(nowhere)/scim/v2")
        elsewhere.routes = [try Route(domains: ["acme-us"])]
        var removal: UInt64 = 0
        do {
            let store = try BrokerStore(path: dir.file("broker"), targets: [app, elsewhere])
            var fixture = ListFixture()
            var k = 0
            while k < 10_300 {
                let batch = k..<min(k + 1000, 10_300)
                let events = batch.map { i in
                    let e = fixture.user(i)
                    var body = e.body.objectValue!
                    body["txn"] = .string(i < 300 ? "bulk-trace" : "t-\(i)")
                    return RelayEvent(seq: e.seq, body: .object(body))
                }
                try fixture.apply(store, events, ids: batch.map(ListFixture.brokerID))
                k = batch.upperBound
            }
            try fixture.apply(store, [fixture.event("urn:ietf:params:SCIM:event:prov:delete", ["ref": "/Users/u10299"])], ids: [])
            removal = try XCTUnwrap(store.lastQueueKey(target: "app").flatMap { UInt64(bigEndianBytes: Array($0.suffix(8))) })
            try store.pauseTarget("app", reason: "the app is away")
            try store.pauseTarget("elsewhere", reason: "the app is away")
            try store.environment.write { txn in
                try store.setDeletionGuard(target: "app", pausedSince: unixMilliseconds(), confirmedAt: 0, txn)
                for seq in [1, 2] as [UInt64] {
                    let letter: JSONObject = [
                        "id": .string(ListFixture.brokerID(Int(seq))), "type": "User", "op": "upsert", "trace": "t-dead",
                        "method": "PUT", "path": "/scim/v2/Users/x", "request": "{}", "status": 400,
                        "response": .string(seq == 1 ? String(repeating: "é", count: 50_000) : "no"), "seq": .int(Int(seq)),
                        "at": .number(JSONNumber(integer: unixMilliseconds())),
                    ]
                    try txn.put(store.targetDead, prefixed("app", seq.bigEndianBytes), JSON.object(letter).serialized())
                }
                try txn.put(store.targetState, Array("deadseq/app".utf8), UInt64(2).bigEndianBytes)
            }
        }
        let reads = dir.write("read.tokens", Self.readToken + "\n")
        let operators = dir.write("operator.tokens", Self.operatorToken + "\n")
        let (broker, _) = try startBroker(
            yaml: "targets:\n" + target("app", port: nowhere)
                + target("elsewhere", port: nowhere).replacing("routes: [{domains: [acme-de]}]", with: "routes: [{domains: [acme-us]}]")
                + "api: {listen: 127.0.0.1:0, tokenFile: \(reads), operatorTokenFile: \(operators)}\n")
        return (try port(of: broker, "console at"), broker, removal)
    }

    func testTheConsoleReadsABoundedPartOfALargeStoreAndSaysSo() throws {
        let (api, broker, removal) = try largeConsoleStore()
        XCTAssertEqual(try console(api, "GET", "/console/api/session").status, 200)

        // A name nothing has: no walk of the whole directory; the answer says how far it looked.
        let unknown = try console(api, "GET", "/console/api/trace?q=no-such-name")
        XCTAssertEqual(unknown.status, 200)
        XCTAssertEqual(unknown.json?["hops"], .array([]))
        XCTAssertTrue(
            unknown.json?["notFound"]?.stringValue?.contains("the first \(TrailLimits.console.scan) of the directory") ?? false,
            "\(String(describing: unknown.json))")
        // An id at the source is read by its key, in every domain, whatever the directory holds.
        let bySource = try console(api, "GET", "/console/api/trace?q=u10200").json
        XCTAssertEqual(bySource?["resources"]?.arrayValue?.first?["id"]?.stringValue, ListFixture.brokerID(10_200))

        // A trace id that touched 300 resources: the hops of the first 200 are read, and the answer says so.
        let bulk = try console(api, "GET", "/console/api/trace?q=bulk-trace").json
        XCTAssertEqual(bulk?["complete"], .bool(false), "\(String(describing: bulk?["total"]))")
        XCTAssertEqual(bulk?["resourcesTotal"], 300)
        XCTAssertEqual(bulk?["resourcesRead"], .int(TrailLimits.console.resources))
        XCTAssertEqual(bulk?["hops"]?.arrayValue?.count, bulk?["total"]?.numberValue?.integer.map(Int.init))
        XCTAssertLessThanOrEqual(bulk?["hops"]?.arrayValue?.count ?? .max, TrailLimits.console.hops)
        // The command line: the earliest --limit hops, and a note of how many there are.
        let cli = try brokerCLI(["trace", "--data-dir", dir.file("broker"), "bulk-trace", "--limit", "50"])
        XCTAssertEqual(cli.0, 0, cli.1)
        let lines = cli.1.split(separator: "\n")
        XCTAssertEqual(lines.filter { $0.contains("\tb-0") }.count, 50)
        XCTAssertTrue(
            lines.contains { $0.hasPrefix("the earliest 50 of ") && $0.contains(" hops, of 300 resources: --limit N") },
            "\(lines.prefix(2))")

        // The held removal's count walks 10,301 queue entries: taken once, then at most every 30 s.
        let overview = try console(api, "GET", "/console/api/overview").json
        XCTAssertEqual(target(overview, "app")?["held"], 1)
        XCTAssertEqual(target(overview, "app")?["heldComplete"], .bool(true))
        let countedAt = try XCTUnwrap(target(overview, "app")?["heldCountedAt"]?.numberValue?.integer)
        let again = try console(api, "GET", "/console/api/overview").json
        XCTAssertEqual(target(again, "app")?["heldCountedAt"]?.numberValue?.integer, countedAt, "the walk is not made at every poll")
        XCTAssertEqual(target(again, "app")?["deadLetters"], 2)
        let held = try console(api, "GET", "/console/api/targets/app/held").json
        XCTAssertEqual(held?["total"], 1)
        XCTAssertEqual(held?["scanned"], 10_301)
        XCTAssertEqual(held?["lastSeq"]?.numberValue?.integer, Int64(removal))

        // Dead letters: a long response is cut for the page, and says so.
        let letters = try XCTUnwrap(console(api, "GET", "/console/api/targets/app/deadletters").json)
        XCTAssertEqual(letters["total"], 2)
        XCTAssertEqual(letters["lastSeq"], 2)
        let long = try XCTUnwrap(letters["letters"]?.arrayValue?.first)
        XCTAssertEqual(long["truncated"], ["response"])
        XCTAssertEqual(long["responseBytes"], 100_000)
        XCTAssertLessThanOrEqual(long["response"]?.stringValue?.utf8.count ?? .max, BrokerConsole.bodyBytes + 3)
        XCTAssertTrue(long["response"]?.stringValue?.hasPrefix("éé") ?? false, "cut on a character's boundary")
        XCTAssertNil(letters["letters"]?.arrayValue?.last?["truncated"])
        // "Drop all" of what was shown (#1) while #2 is there: 409, nothing dropped; then both.
        assertSCIMError(try consoleAction(api, "targets/app/deadletters/drop", #"{"through":1}"#), 409)
        XCTAssertEqual(try console(api, "GET", "/console/api/targets/app/deadletters").json?["total"], 2)
        XCTAssertEqual(try consoleAction(api, "targets/app/deadletters/drop", #"{"through":2}"#).json?["dropped"], 2)

        // Confirming what was shown releases it.
        XCTAssertEqual(try consoleAction(api, "targets/app/held/confirm", #"{"through":\#(removal)}"#).status, 200)
        XCTAssertNil(try BrokerStore(path: dir.file("broker")).deletionGuard(target: "app").pausedSince)

        // Many slow requests at once: those beyond the console's share of the pool get 503 and Retry-After.
        let clients = try (0..<12).map { _ in try RawClient(port: api, timeoutSeconds: 60) }
        for c in clients {
            c.send(
                "GET /console/api/trace?q=still-no-such-name HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer \(Self.readToken)\r\nConnection: close\r\n\r\n"
            )
        }
        let answers = clients.compactMap { $0.readResponses(1).first }
        XCTAssertEqual(answers.count, 12)
        XCTAssertEqual(Set(answers.map(\.status)), [200, 503], "\(answers.map(\.status))")
        XCTAssertTrue(answers.filter { $0.status == 503 }.allSatisfy { $0.head.contains("Retry-After: ") })
        XCTAssertEqual(try console(api, "GET", "/console/api/session").status, 200)
        XCTAssertEqual(try console(api, "GET", "/console/api/trace?q=u1").status, 200, "the pool's slots came back")
        _ = broker
    }

    /// A target name with any letter (the page percent-encodes it); a
    /// boundary refuses push like pause; refused requests are logged a
    /// bounded number of times, their paths cut short.
    func testConsoleNamesRefusalsAndBoundaries() throws {
        let (_, appPort) = try startAppAgent("app")
        let reads = dir.write("read.tokens", Self.readToken + "\n")
        let operators = dir.write("operator.tokens", Self.operatorToken + "\n")
        let (broker, _) = try startBroker(
            yaml: "targets:\n" + target("zürich-app", port: appPort)
                + "  - name: us-boundary\n    domain: acme-us\n    routes: [{domains: [acme-de]}]\n"
                + "api: {listen: 127.0.0.1:0, tokenFile: \(reads), operatorTokenFile: \(operators)}\n")
        let api = try port(of: broker, "console at")
        let held = try console(api, "GET", "/console/api/targets/z%C3%BCrich-app/held")
        XCTAssertEqual(held.status, 200, "\(String(describing: held.json))")
        XCTAssertEqual(held.json?["target"], "zürich-app")
        XCTAssertEqual(try console(api, "GET", "/console/api/targets/z%C3%BCrich-app/deadletters").status, 200)
        assertSCIMError(try console(api, "GET", "/console/api/targets/z%C3rich-app/held"), 400, "invalidSyntax")

        // A boundary: its agent fetches the feed; nothing is pushed, paused or resumed here.
        for action in ["push", "pause", "resume"] {
            assertSCIMError(try consoleAction(api, "targets/us-boundary/\(action)", #"{"resource":"dora"}"#), 409)
        }

        // 50 refused requests (no token), with 5,000-byte paths: a few lines, each short.
        let long = String(repeating: "p", count: 5_000)
        for _ in 0..<50 { assertSCIMError(try console(api, "GET", "/console/api/\(long)", token: nil), 401) }
        XCTAssertTrue(eventually(seconds: 5) { broker.output.filter { $0.contains(#""msg":"console: refused""#) }.count >= 20 })
        let refused = broker.output.filter { $0.contains(#""msg":"console: refused""#) }
        XCTAssertLessThanOrEqual(
            refused.count, RateLimitedLog.perMinute + 3, "at most \(RateLimitedLog.perMinute) a minute (and those before)")
        XCTAssertTrue(refused.allSatisfy { $0.utf8.count < 1_000 }, "\(refused.map(\.utf8.count))")
    }
}
