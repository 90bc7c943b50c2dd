import EdgeTestSupport
import EdgeTools
import Foundation
import SCIM
import XCTest

/// The alert rules and the dashboard shipped in packaging/monitoring: checked
/// by Debian's promtool, and every metric they use exported by a running
/// agent and broker. The relay's connection state and log, as they read.
final class MonitoringTests: FederationTestCase {
    let monitoring = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
        .deletingLastPathComponent().appendingPathComponent("packaging/monitoring").path
    let rules = ["scim-edge.rules.yml", "scim-broker.rules.yml"]
    let dashboard = "scim-edge-federation.dashboard.json"

    func promtool(_ arguments: [String]) throws -> (Int32, String) {
        let exe = "/usr/bin/promtool"
        guard FileManager.default.isExecutableFile(atPath: exe) else {
            throw HarnessError("promtool is not installed: apt-get install prometheus (make test installs it)")
        }
        return try runProgram(exe, arguments, in: monitoring)
    }

    /// Every PromQL expression of the dashboard's panels.
    func dashboardExpressions() throws -> [String] {
        let data = try Data(contentsOf: URL(fileURLWithPath: "\(monitoring)/\(dashboard)"))
        let root = try XCTUnwrap(try JSONSerialization.jsonObject(with: data) as? [String: Any])
        let panels = try XCTUnwrap(root["panels"] as? [[String: Any]])
        return panels.flatMap { ($0["targets"] as? [[String: Any]] ?? []).compactMap { $0["expr"] as? String } }
    }

    /// The metric names an expression reads.
    func metricNames(_ text: String) -> Set<String> {
        let regex = try! NSRegularExpression(pattern: "scim_(edge|broker)_[a-z_]+")
        return Set(
            regex.matches(in: text, range: NSRange(text.startIndex..., in: text)).map { String(text[Range($0.range, in: text)!]) })
    }

    func testTheRulesPassPromtoolAndTheirUnitTests() throws {
        let check = try promtool(["check", "rules"] + rules)
        XCTAssertEqual(check.0, 0, check.1)
        XCTAssertTrue(check.1.contains("SUCCESS: 8 rules found") && check.1.contains("SUCCESS: 11 rules found"), check.1)
        // Relay down, dead letters (agent and broker), an expiring certificate and CRL, with their texts.
        let unit = try promtool(["test", "rules", "rules.test.yml"])
        XCTAssertEqual(unit.0, 0, unit.1)
        XCTAssertTrue(unit.1.contains("SUCCESS"), unit.1)

        // The dashboard's queries parse as PromQL: promtool checks them as recording rules
        // (Grafana's $__rate_interval stands for a range).
        let exprs = try dashboardExpressions()
        XCTAssertGreaterThan(exprs.count, 25)
        let recorded = exprs.enumerated().map { i, e in
            "      - record: dashboard:query\(i)\n        expr: '\(e.replacingOccurrences(of: "$__rate_interval", with: "5m").replacingOccurrences(of: "'", with: "''"))'"
        }
        let file = dir.write("dashboard.rules.yml", "groups:\n  - name: dashboard\n    rules:\n" + recorded.joined(separator: "\n") + "\n")
        let parsed = try promtool(["check", "rules", file])
        XCTAssertEqual(parsed.0, 0, parsed.1)
    }

    /// What the rules and the dashboard read exists: a federation with a CRL, a
    /// target and a relaying agent is scraped, and every metric name they use is
    /// in the agent's or the broker's exposition. build_info carries VERSION.
    func testEveryMetricTheRulesAndTheDashboardUseIsExported() throws {
        let (_, appPort) = try startAppAgent("app")
        let (broker, bp) = try startBroker(extra: [
            "--crl", crl, "--target", "app=http://127.0.0.1:\(appPort)/scim/v2", "--target-token", "app=t",
        ])
        let (agent, dp) = try startAgent(
            "de", cert: de, domain: "acme-de", brokerPort: bp, extra: ["--admin-listen", "127.0.0.1:0", "--crl", crl])
        XCTAssertEqual(try create(dp, "scraped"), 201)
        let brokerPort = try adminPort(broker), agentPort = try adminPort(agent)
        XCTAssertTrue(
            eventually(seconds: 30) {
                (try? scrapeMetrics(brokerPort)).flatMap { sample($0, #"scim_broker_target_delivered_total{target="app"}"#) } == 1
            }, "delivered to the target")
        let exported = try scrapeMetrics(agentPort) + "\n" + scrapeMetrics(brokerPort)
        let names = Set(exported.split(separator: "\n").filter { !$0.hasPrefix("#") }.map { String($0.prefix { $0 != "{" && $0 != " " }) })

        var used = Set<String>()
        for file in rules { used.formUnion(metricNames(try String(contentsOfFile: "\(monitoring)/\(file)", encoding: .utf8))) }
        for e in try dashboardExpressions() { used.formUnion(metricNames(e)) }
        XCTAssertGreaterThan(used.count, 30, "\(used.sorted())")
        let missing = used.filter { !names.contains($0) }.sorted()
        XCTAssertEqual(missing, [], "used by the rules or the dashboard but not exported")

        let version = try String(contentsOfFile: monitoring + "/../../VERSION", encoding: .utf8).trimmingCharacters(
            in: .whitespacesAndNewlines)
        XCTAssertEqual(sample(exported, "scim_edge_build_info{version=\"\(version)\"}"), 1, exported)
        XCTAssertEqual(sample(exported, "scim_broker_build_info{version=\"\(version)\"}"), 1, exported)
    }

    /// `scim_edge_relay_connected` is 0 while the broker refuses every batch
    /// (the TLS connection is up, the identity is bound to no domain), 1 once
    /// it takes them; each (re)connection that works is logged once.
    func testRelayConnectedSaysZeroWhileEveryBatchIsRefused() throws {
        let brokerPort = freeLoopbackPort()
        // A broker that binds acme-de to another identity: the agent's certificate verifies, its batches get 403.
        let refusing = try ChildProcess(
            productsDirectory + "/scim-broker",
            [
                "serve", "--data-dir", dir.file("refusing"), "--listen", "127.0.0.1:\(brokerPort)", "--ca", ca, "--cert", broker.0,
                "--key", broker.1, "--domain", "acme-de=spiffe://scim-edge.test/acme-de/someone-else", "--admin-listen", "127.0.0.1:0",
            ])
        children.append(refusing)
        _ = try port(of: refusing, "scim-broker")
        let (agent, dp) = try startAgent(
            "de", cert: de, domain: "acme-de", brokerPort: brokerPort, extra: ["--admin-listen", "127.0.0.1:0"])
        let agentPort = try adminPort(agent)
        func connected() -> Double? { (try? scrapeMetrics(agentPort)).flatMap { sample($0, "scim_edge_relay_connected") } }
        XCTAssertEqual(try create(dp, "refused"), 201)
        let refusals = try adminPort(refusing)
        XCTAssertTrue(
            eventually(seconds: 20) {
                (try? scrapeMetrics(refusals)).flatMap { sample($0, #"scim_broker_refused_total{reason="unknown_agent"}"#) } ?? 0 >= 2
            }, "the broker refuses the batches")
        XCTAssertEqual(connected(), 0, "refused batches: not connected, though the TLS connection is up")
        XCTAssertFalse(agent.output.contains { $0.contains("connected to the broker") }, "nothing to log as working")

        refusing.signal(SIGTERM)
        XCTAssertEqual(refusing.waitForExit(), 0)
        let (accepting, _) = try startBroker(port: brokerPort)
        XCTAssertTrue(eventually(seconds: 30) { self.applied()["acme-de/\(self.deID)"] == 1 }, "\(agent.output.suffix(3))")
        XCTAssertTrue(eventually(seconds: 5) { connected() == 1 }, "taken: connected")
        let first = try XCTUnwrap(agent.waitForLine("relay: connected to the broker"), "\(agent.output.suffix(5))")
        XCTAssertTrue(first.contains("\"failedAttempts\":\""), "says the relay failed before: \(first)")
        XCTAssertTrue(first.contains("spiffe://") || first.contains("localhost"), "names the broker's certificate: \(first)")

        // The broker restarts: the reconnection is logged, once.
        accepting.signal(SIGTERM)
        XCTAssertEqual(accepting.waitForExit(), 0)
        _ = try startBroker(port: brokerPort)
        XCTAssertEqual(try create(dp, "after-restart"), 201)
        XCTAssertTrue(eventually(seconds: 30) { self.applied()["acme-de/\(self.deID)"] == 2 }, "\(agent.output.suffix(3))")
        XCTAssertNotNil(agent.waitForLine("relay: reconnected to the broker"), "\(agent.output.suffix(5))")
        XCTAssertEqual(agent.output.filter { $0.contains("connected to the broker") }.count, 2, "one line per connection")
    }
}
