import EdgeTestSupport
import Foundation
import XCTest

/// What the operator commands print, run as the real binaries: times in RFC
/// 3339, "nothing to show" rather than nothing, failures that are not usage
/// mistakes as one line and exit 1 (no usage text), and dropping every dead
/// letter of a target only with --all.
final class CLIOutputTests: FederationTestCase {
    let rfc3339 = #"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?Z"#

    /// A failure of the work, not of the command line: status 1, the reason, no usage.
    func assertFailure(_ r: ToolRun, _ reason: String, file: StaticString = #filePath, line: UInt = #line) {
        XCTAssertEqual(r.status, 1, "\(r)", file: file, line: line)
        XCTAssertTrue(r.stderr.contains(reason), "\(r)", file: file, line: line)
        XCTAssertFalse(r.stderr.contains("Usage:") || r.stderr.contains("--help"), "no usage text: \(r)", file: file, line: line)
    }

    /// A mistake on the command line: status 64 and the usage.
    func assertUsage(_ r: ToolRun, _ reason: String, file: StaticString = #filePath, line: UInt = #line) {
        XCTAssertEqual(r.status, 64, "\(r)", file: file, line: line)
        XCTAssertTrue(r.stderr.contains(reason) && r.stderr.contains("Usage:"), "\(r)", file: file, line: line)
    }

    func testAgentCommands() throws {
        let (agent, _) = try startAppAgent("edge")
        let data = ["--data-dir", dir.file("edge")]
        func edge(_ arguments: [String]) throws -> ToolRun { try runTool("scim-edge", arguments + data) }

        XCTAssertEqual(try edge(["outbox", "list"]).stdout, "nothing to show: no event waits for the broker\n")
        XCTAssertEqual(try edge(["deadletter", "list"]).stdout, "nothing to show: no dead letters\n")
        XCTAssertTrue(try edge(["sources", "status"]).stdout.hasPrefix("nothing to show: "))

        agent.signal(SIGTERM)
        XCTAssertEqual(agent.waitForExit(), 0)
        // An outbox kept without a broker: status names its oldest event's time in RFC 3339.
        let (kept, keptPort) = try startAppAgentKeepingOutbox("kept")
        XCTAssertEqual(try create(keptPort, "someone"), 201)
        kept.signal(SIGTERM)
        XCTAssertEqual(kept.waitForExit(), 0)
        let status = try runTool("scim-edge", ["status", "--data-dir", dir.file("kept")])
        let oldest = try XCTUnwrap(status.stdout.split(separator: "\n").first { $0.hasPrefix("oldest event") }, "\(status)")
        XCTAssertNotNil(oldest.range(of: "issued at \(rfc3339) \\(\\d+ s ago\\)$", options: .regularExpression), String(oldest))
        XCTAssertFalse(status.stdout.contains("Unix time"), status.stdout)

        assertFailure(try edge(["resources", "get", "nobody"]), "Error: no User or Group with id nobody")
        assertFailure(try edge(["deadletter", "drop", "99"]), "no dead letter 99")
        assertFailure(try edge(["outbox", "show", "99"]), "no event 99 in the outbox")
        assertFailure(try runTool("scim-edge", ["status", "--data-dir", dir.file("nowhere")]), "no agent data in")
        assertFailure(try runTool("scim-edge", ["serve", "--config", dir.file("missing.yaml")]), "missing.yaml")
        assertUsage(try edge(["deadletter", "drop"]), "Missing expected argument")
    }

    func testBrokerCommands() throws {
        let (app, appPort) = try startAppAgent("app")
        let (broker, bp) = try startBroker(extra: [
            "--target", "app=http://127.0.0.1:\(appPort)/scim/v2", "--target-token", "app=t",
        ])
        XCTAssertEqual(try cli(["status"]).stdout, "nothing to show: no agent has relayed to this broker yet\n")
        XCTAssertEqual(try cli(["deadletter", "list"]).stdout, "nothing to show: no dead letters\n")
        XCTAssertEqual(try cli(["deadletter", "list", "--json"]).stdout, "", "JSON lines: none is nothing")

        let (_, dp) = try startAgent("de", cert: de, domain: "acme-de", brokerPort: bp)
        XCTAssertEqual(try create(dp, "someone"), 201)
        XCTAssertTrue(eventually(seconds: 30) { (try? self.cli(["targets", "status"]).stdout.contains("delivered 1")) == true })
        app.signal(SIGTERM)
        XCTAssertEqual(app.waitForExit(), 0)
        let targets = try cli(["targets", "status"])
        XCTAssertNotNil(targets.stdout.range(of: "\tupdated \(rfc3339)", options: .regularExpression), targets.stdout)
        let agents = try cli(["status"])
        XCTAssertTrue(agents.stdout.hasPrefix("acme-de/\(deID)\t"), "\(agents)")

        // Dropping every dead letter of a target needs --all; a number or --all, not both.
        assertUsage(try cli(["deadletter", "drop", "app"]), "--all")
        assertUsage(try cli(["deadletter", "drop", "app", "3", "--all"]), "not both")
        let all = try cli(["deadletter", "drop", "app", "--all"])
        XCTAssertEqual(all.status, 0, "\(all)")
        XCTAssertTrue(all.stdout.hasSuffix(" dropped for app\n"), "\(all)")

        assertFailure(try cli(["trace", "no-such-change"]), "Error: nothing recorded for no-such-change")
        assertFailure(try cli(["deadletter", "drop", "nope", "--all"]), "no target named 'nope'")
        assertFailure(try runTool("scim-broker", ["serve", "--config", dir.file("missing.yaml")]), "missing.yaml")
        assertUsage(try runTool("scim-broker", ["status"]), "--data-dir")
        broker.signal(SIGTERM)
        XCTAssertEqual(broker.waitForExit(), 0)
    }

    /// `scim-broker ARGUMENTS --data-dir` the broker's.
    func cli(_ arguments: [String]) throws -> ToolRun { try runTool("scim-broker", arguments + ["--data-dir", dir.file("broker")]) }

    /// A standalone agent that records its outbox (no broker to drain it).
    func startAppAgentKeepingOutbox(_ name: String) throws -> (ChildProcess, Int) {
        let child = try ChildProcess(
            productsDirectory + "/scim-edge",
            [
                "serve", "--data-dir", dir.file(name), "--listen", "127.0.0.1:0", "--token", "t", "--admin-listen", "none", "--keep-outbox",
            ])
        children.append(child)
        return (child, try port(of: child, "scim-edge"))
    }
}
