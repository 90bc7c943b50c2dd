import EdgeAgent
import EdgeTestSupport
import EdgeTools
import Foundation
import SCIM
import XCTest

/// A pull source under backpressure (invariant 4): the agent's outbox is
/// small and the broker is away, so the agent refuses the source's
/// batches as it refuses an IdP's writes; the source offers the same batch
/// again and drops nothing. When the broker comes, the outbox drains, the
/// source reads on, and every resource arrives once.
final class SourceBackpressureTests: FederationTestCase {
    func testAPulledBatchPushedBackIsOfferedAgainUntilTheOutboxDrains() throws {
        let users = 150
        let (_, refPort) = try startReferenceServer()
        for i in 0..<users {
            let body = #"{"schemas":["urn:ietf:params:scim:schemas:core:2.0:User"],"userName":"pulled\#(i)"}"#
            XCTAssertEqual(try scim(refPort, "POST", "/Users", body, token: "ref-token", prefix: "").0, 201)
        }
        let brokerPort = freeLoopbackPort()
        let tokens = dir.write("agent.tokens", "test-token-0123456789\n")
        chmod(tokens, 0o600)
        let sourceToken = dir.write("source.token", "ref-token\n")
        chmod(sourceToken, 0o600)
        let config = dir.write(
            "agent.yaml",
            """
            dataDir: \(dir.file("de"))
            listen: 127.0.0.1:0
            tokenFile: \(tokens)
            admin: {listen: 127.0.0.1:0}
            outbox: {maxEvents: 20}
            broker:
              url: https://127.0.0.1:\(brokerPort)
              ca: \(ca!)
              cert: \(de.0)
              key: \(de.1)
              domain: acme-de
            sources:
              - name: hr
                kind: scim
                url: http://127.0.0.1:\(refPort)
                tokenFile: \(sourceToken)
                pageSize: 10
                batchSize: 10
                requestsPerSecond: 100
                pollSeconds: 1

            """)
        let agent = try ChildProcess(productsDirectory + "/scim-edge", ["serve", "--config", config])
        children.append(agent)
        let agentPort = try port(of: agent, "scim-edge")
        func stored() -> Int {
            (try? scim(agentPort, "GET", "/Users?count=0", token: "test-token-0123456789"))?.1?["totalResults"]?.numberValue?.integer.map(
                Int.init) ?? -1
        }
        func sample(_ name: String) -> Double {
            guard let text = try? brokerMetrics(agent) else { return -1 }
            return text.split(separator: "\n").first { $0.hasPrefix(name + " ") }.flatMap { Double($0.split(separator: " ").last!) } ?? -1
        }

        // No broker: the outbox fills to its limit and the source is pushed back, again and again.
        XCTAssertTrue(
            eventually(seconds: 30) { sample("scim_edge_source_backpressure_total{source=\"hr\"}") >= 3 },
            "the source pushed back: \(agent.output.suffix(5))")
        let held = stored()
        XCTAssertGreaterThanOrEqual(held, 20, "the source filled the outbox")
        XCTAssertLessThan(held, users, "and then stopped: nothing past the limit was written")
        XCTAssertLessThanOrEqual(try outboxEvents("de"), 20 + 10, "the outbox bounded: its limit and at most one page over")
        XCTAssertEqual(try outboxEvents("de"), held, "every stored user waits in the outbox, none was dropped")

        // The broker comes: the outbox drains, the same batch is taken, the source reads on to the end.
        _ = try startBroker(port: brokerPort)
        XCTAssertTrue(eventually(seconds: 60) { stored() == users }, "the rest after the drain: \(stored()) of \(users)")
        XCTAssertTrue(
            eventually(seconds: 30) { self.applied()["acme-de/\(self.deID)"] == UInt64(users) },
            "the broker applied each once: \(applied())")
        XCTAssertTrue(eventually(seconds: 10) { (try? self.outboxEvents("de")) == 0 })
        XCTAssertEqual(sample("scim_edge_source_errors_total{source=\"hr\"}"), 0)
        XCTAssertEqual(sample("scim_edge_source_changes_total{source=\"hr\"}"), Double(users), "each user written once")
    }
}
