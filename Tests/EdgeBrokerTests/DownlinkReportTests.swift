import EdgeBroker
import EdgeStore
import EdgeTestSupport
import Foundation
import SCIM
import XCTest

@testable import EdgeAgent

/// A poll's report (the boundary's outcomes, its local apps' answers) only
/// annotates the broker's trace. One the broker cannot take (a clock past
/// year 9999, a newer broker's stricter check, a damaged record) is refused
/// with 400 `invalid_report` naming the part; the agent drops that part,
/// logs and counts it, and polls again without it. Before, it sent the same
/// poll again with backoff forever: its acknowledgement never went through
/// and that boundary's feed stopped.
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

        // While it is down, the store's report and an app's answer get times the broker refuses.
        let store = try AgentStore(path: dir.file("us"), registry: .standard)
        var report = try XCTUnwrap(try store.downlinkReport(), "the report of alice's commit is kept")
        XCTAssertEqual(report.through, 1)
        report.committed = 253_402_300_800_000
        let answer: JSON = [
            "id": "x", "trace": .string(alice), "event": "upsert", "outcome": "delivered",
            "at": .number(JSONNumber(integer: 253_402_300_800_000)),
        ]
        try store.environment.write { txn in
            try txn.put(store.meta, AgentStore.downlinkReportKey, report.json.serialized())
            try txn.put(store.meta, AgentStore.appOutcomePrefix + UInt64(1).bigEndianBytes, answer.serialized())
            try txn.put(store.meta, AgentStore.appOutcomeSeqKey, UInt64(1).bigEndianBytes)
            try txn.put(store.meta, AgentStore.appOutcomeCountKey, UInt64(1).bigEndianBytes)
        }
        XCTAssertEqual(try store.appOutcomeCounts().pending, 1)

        (usAgent, up) = try startInboundAgent("us", cert: us, brokerPort: bp)
        XCTAssertEqual(try createAtHQ(dp, "bob", trace: bob), 201)
        XCTAssertTrue(
            eventually(seconds: 30) { (try? self.user(up, "bob@acme-de")) ?? nil != nil },
            "the feed goes on: \(usAgent.output.suffix(10))")
        XCTAssertTrue(eventually(seconds: 30) { boundaryHop(bob)?["outcome"] == "accepted" }, "\(traceHops(bob))")

        let metrics = try brokerMetrics(usAgent)
        for part in ["outcomes", "appOutcomes"] {
            XCTAssertTrue(
                metrics.contains(#"scim_edge_downlink_reports_refused_total{report="\#(part)"} 1"#),
                metrics.split(separator: "\n").filter { $0.contains("reports_refused") }.joined(separator: "\n"))
        }
        XCTAssertTrue(eventually(seconds: 10) { (try? store.appOutcomeCounts().pending) == 0 }, "the refused answer went")
        for part in ["outcomes", "appOutcomes"] {
            XCTAssertTrue(
                usAgent.output.contains { $0.contains("refused this poll's report") && $0.contains(#""report":"\#(part)""#) },
                "\(usAgent.output.suffix(10))")
            XCTAssertTrue(
                broker.output.contains {
                    $0.contains("a poll's report is refused") && $0.contains(#""report":"\#(part)""#) && $0.contains("253402300799999")
                },
                "the broker says which part and why: \(broker.output.suffix(10))")
        }
        XCTAssertEqual(boundaryHop(alice)?["outcome"], "accepted", "what the broker had recorded stays")
        XCTAssertEqual(foreign("us"), ["acme-de": 2])
    }
}
