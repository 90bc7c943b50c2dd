import EdgeBroker
import EdgeStore
import EdgeTestSupport
import Foundation
import SCIM
import XCTest

@testable import EdgeAgent

/// A poll's report (the boundary's outcomes, its local apps' answers) only
/// annotates the broker's trace. One the broker cannot take (a clock past
/// year 9999, a newer broker's stricter check) is refused with 400
/// `invalid_report` naming the part, and for an app's answer the entry;
/// the agent drops what was named (logged, counted, and the stored report
/// too), and polls again. Before, it sent the same poll with backoff
/// forever: its acknowledgement never went through and that boundary's
/// feed stopped. A stored answer that cannot be read goes with its batch
/// (counted) instead of holding the answers after it.
extension DownlinkTests {
    func testAReportTheBrokerRefusesDoesNotHoldTheFeed() throws {
        let (broker, bp) = try startBroker(yaml: brokerYAML)
        let (_, dp) = try startAgent("de", cert: de, domain: "acme-de", brokerPort: bp)
        var (usAgent, up) = try startInboundAgent("us", cert: us, brokerPort: bp)
        let alice = "1af92f3577b34da6a3ce929d0e0e4731", bob = "2bf92f3577b34da6a3ce929d0e0e4732"
        XCTAssertEqual(try createAtHQ(dp, "alice", trace: alice), 201)
        func boundaryHop(_ trace: String) -> JSON? { traceHops(trace).first { $0["hop"] == "boundary acme-us" } }
        XCTAssertTrue(eventually(seconds: 30) { boundaryHop(alice) != nil }, "\(usAgent.output.suffix(10))")
        XCTAssertEqual(boundaryHop(alice)?["outcome"], "accepted")
        usAgent.signal(SIGTERM)
        XCTAssertNotNil(usAgent.waitForExit(seconds: 20))

        // While it is down: the stored report gets a time the broker refuses, and three app answers are
        // kept, one with such a time, one damaged, and one about alice's change that the broker takes.
        let store = try AgentStore(path: dir.file("us"), registry: .standard)
        var report = try XCTUnwrap(try store.downlinkReport(), "the report of alice's commit is kept")
        XCTAssertEqual(report.through, 1)
        report.committed = 253_402_300_800_000
        let aliceID = try store.environment.read { txn in
            var id = ""
            try txn.scanKeys(store.foreign, from: nil) { k in
                id = String(decoding: k.split(separator: UInt8(ascii: "/"), maxSplits: 1).last!, as: UTF8.self)
                return false
            }
            return id
        }
        func answer(at: Int64) -> [UInt8] {
            JSON.object([
                "id": .string(aliceID), "trace": .string(alice), "event": "upsert", "outcome": "delivered", "status": 201,
                "target": "crm", "at": .number(JSONNumber(integer: at)),
            ]).serialized()
        }
        let answers = [answer(at: 253_402_300_800_000), Array("{\"id\":".utf8), answer(at: Int64(Date().timeIntervalSince1970 * 1000))]
        try store.environment.write { txn in
            try txn.put(store.meta, AgentStore.downlinkReportKey, report.json.serialized())
            for (i, a) in answers.enumerated() { try txn.put(store.meta, AgentStore.appOutcomePrefix + UInt64(i + 1).bigEndianBytes, a) }
            try txn.put(store.meta, AgentStore.appOutcomeSeqKey, UInt64(3).bigEndianBytes)
            try txn.put(store.meta, AgentStore.appOutcomeCountKey, UInt64(3).bigEndianBytes)
        }
        XCTAssertEqual(try store.appOutcomeCounts().pending, 3)

        (usAgent, up) = try startInboundAgent("us", cert: us, brokerPort: bp)
        // The answer the broker can take arrives, the refused and the damaged ones go.
        XCTAssertTrue(
            eventually(seconds: 30) { self.traceHops(alice).contains { $0["hop"] == "app crm" } },
            "\(traceHops(alice)) \(usAgent.output.suffix(10))")
        XCTAssertEqual(traceHops(alice).filter { $0["hop"] == "app crm" }.count, 1)
        XCTAssertTrue(eventually(seconds: 10) { (try? store.appOutcomeCounts().pending) == 0 }, "\(usAgent.output.suffix(10))")
        XCTAssertNil(try store.downlinkReport(), "the refused report is not kept to be sent again after a restart")
        let metrics = try brokerMetrics(usAgent)
        for line in [
            #"scim_edge_downlink_reports_refused_total{report="outcomes"} 1"#,
            #"scim_edge_downlink_reports_refused_total{report="appOutcomes"} 1"#,
            #"scim_edge_downlink_app_outcomes_refused_total{reason="refused"} 1"#,
            #"scim_edge_downlink_app_outcomes_refused_total{reason="unreadable"} 1"#,
            #"scim_edge_downlink_app_outcomes_reported_total 1"#,
        ] {
            XCTAssertTrue(
                metrics.split(separator: "\n").contains { $0 == line },
                "\(line)\n" + metrics.split(separator: "\n").filter { $0.contains("outcomes") }.joined(separator: "\n"))
        }
        let brokerSide = try brokerMetrics(broker)
        for part in ["outcomes", "appOutcomes"] {
            XCTAssertTrue(
                brokerSide.split(separator: "\n").contains {
                    $0 == #"scim_broker_downlink_reports_refused_total{domain="acme-us",target="us-boundary",report="\#(part)"} 1"#
                }, part)
            XCTAssertTrue(
                usAgent.output.contains { $0.contains("refused this poll's report") && $0.contains(#""report":"\#(part)""#) },
                "\(usAgent.output.suffix(10))")
            XCTAssertTrue(
                broker.output.contains {
                    $0.contains("a poll's report is refused") && $0.contains(#""report":"\#(part)""#) && $0.contains("253402300799999")
                }, "the broker says which part and why: \(broker.output.suffix(10))")
        }
        XCTAssertTrue(
            usAgent.output.contains { $0.contains("could not be read") && $0.contains(#""sequences":2"#) },
            usAgent.output.filter { $0.contains("downlink") }.joined(separator: "\n"))

        // The feed goes on.
        XCTAssertEqual(try createAtHQ(dp, "bob", trace: bob), 201)
        XCTAssertTrue(
            eventually(seconds: 30) { (try? self.user(up, "bob@acme-de")) ?? nil != nil }, "the feed goes on: \(usAgent.output.suffix(10))")
        XCTAssertTrue(eventually(seconds: 30) { boundaryHop(bob)?["outcome"] == "accepted" }, "\(traceHops(bob))")
        XCTAssertEqual(boundaryHop(alice)?["outcome"], "accepted", "what the broker had recorded stays")
        XCTAssertEqual(foreign("us"), ["acme-de": 2])
    }
}
