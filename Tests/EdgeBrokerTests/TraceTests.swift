import EdgeAgent
import EdgeBroker
import EdgeHTTP
import EdgeTestSupport
import Foundation
import SCIM
import XCTest

/// The provisioning log on the command line: `trace` finds a resource by
/// what an operator knows of it, says why a target got nothing, and follows
/// what reconciliation queued.
extension FanoutTests {
    /// A broker with one app (a standalone agent) whose routes take acme-de's
    /// users with title "staff" only, and acme-de's agent: the app's port and the agent's.
    func staffOnlyFederation() throws -> (app: Int, agent: Int) {
        let (_, appPort) = try startAppAgent("app")
        let routes = #"routes: [{domains: [acme-de], types: [User], filter: 'title eq "staff"'}]"#
        let (_, bp) = try startBroker(
            yaml: "targets:\n" + target("app", port: appPort).replacing("routes: [{domains: [acme-de]}]", with: routes))
        let (_, dp) = try startAgent("de", cert: de, domain: "acme-de", brokerPort: bp)
        return (appPort, dp)
    }

    func testTraceFindsAResourceByAnyOfItsNamesAndSaysWhatWasOutOfScope() throws {
        let (appPort, dp) = try staffOnlyFederation()
        let dora = try newUser(dp, "dora", extra: #","title":"staff","externalId":"hr-4711""#)
        _ = try newUser(dp, "eve", extra: #","title":"intern""#)
        XCTAssertTrue(eventually(seconds: 20) { self.users(appPort, token: "t", prefix: "/scim/v2")["dora"] != nil })
        let atApp = try XCTUnwrap(users(appPort, token: "t", prefix: "/scim/v2")["dora"]?["id"]?.stringValue)
        func trace(_ what: String) -> String { (try? brokerCLI(["trace", "--data-dir", dir.file("broker"), what]).1) ?? "" }
        // By userName, externalId, the id at the target and the id at the source: the same hops.
        for name in ["dora", "hr-4711", atApp, dora] {
            XCTAssertTrue(
                eventually(seconds: 10) {
                    let t = trace(name)
                    return t.contains("agent accept") && t.contains("broker apply") && t.contains("target app")
                }, "trace \(name): \(trace(name))")
        }
        // eve is out of the target's routes: the log says so.
        XCTAssertTrue(trace("eve").contains("out of scope for target app"), trace("eve"))
        XCTAssertFalse(trace("eve").contains("target app\t"), trace("eve"))
        let unknown = try brokerCLI(["trace", "--data-dir", dir.file("broker"), "nobody-at-all"])
        XCTAssertNotEqual(unknown.0, 0)

        // What reconciliation queues carries its own trace id.
        XCTAssertEqual(try scim(appPort, "DELETE", "/Users/\(atApp)", token: "t", prefix: "/scim/v2").0, 204)
        let applied = try brokerCLI(["targets", "reconcile", "--config", dir.file("broker.yaml"), "app", "--apply"])
        let reconcileTrace = try XCTUnwrap(
            applied.1.split(separator: "(trace ").last?.split(separator: ")").first.map(String.init), applied.1)
        XCTAssertTrue(reconcileTrace.hasPrefix("reconcile-"), applied.1)
        XCTAssertTrue(eventually(seconds: 20) { self.users(appPort, token: "t", prefix: "/scim/v2")["dora"] != nil })
        XCTAssertTrue(
            eventually(seconds: 10) { trace(reconcileTrace).contains("target app") && trace(reconcileTrace).contains("POST") },
            trace(reconcileTrace))
    }
}

extension FanoutTests {
    /// `targets push`: provision on demand. A resource in scope is sent now
    /// (whole: its state at the target is taken as unknown) and each request
    /// and answer is printed; one out of scope is not sent, and says why.
    func testPushDeliversOneResourceNowAndPrintsEachStep() throws {
        let (appPort, dp) = try staffOnlyFederation()
        _ = try newUser(dp, "fay", extra: #","title":"staff""#)
        _ = try newUser(dp, "gus", extra: #","title":"intern""#)
        XCTAssertTrue(eventually(seconds: 20) { self.users(appPort, token: "t", prefix: "/scim/v2")["fay"] != nil })
        // Changed at the target behind the broker's back: the push puts it right.
        let atApp = try XCTUnwrap(users(appPort, token: "t", prefix: "/scim/v2")["fay"]?["id"]?.stringValue)
        XCTAssertEqual(
            try scim(
                appPort, "PATCH", "/Users/\(atApp)",
                #"{"schemas":["urn:ietf:params:scim:api:messages:2.0:PatchOp"],"Operations":[{"op":"replace","path":"title","value":"tampered"}]}"#,
                token: "t", prefix: "/scim/v2"
            ).0 / 100, 2)
        let push = try brokerCLI(["targets", "push", "--config", dir.file("broker.yaml"), "app", "fay"])
        XCTAssertEqual(push.0, 0, push.1)
        XCTAssertTrue(push.1.contains("scope\tin scope for target app"), push.1)
        XCTAssertTrue(push.1.contains("step\tPUT /scim/v2/Users/\(atApp) → 200"), push.1)
        XCTAssertTrue(push.1.contains("result\tdelivered"), push.1)
        XCTAssertEqual(users(appPort, token: "t", prefix: "/scim/v2")["fay"]?["title"], "staff")
        // The push's own trace id finds its hop, with the step.
        let trace = try XCTUnwrap(
            push.1.split(separator: "\n").first { $0.hasPrefix("queued\ttrace ") }?.split(separator: " ").last.map(String.init))
        XCTAssertTrue(try brokerCLI(["trace", "--data-dir", dir.file("broker"), trace]).1.contains("PUT /scim/v2/Users/\(atApp) → 200"))

        let out = try brokerCLI(["targets", "push", "--config", dir.file("broker.yaml"), "app", "gus"])
        XCTAssertEqual(out.0, 1, out.1)
        XCTAssertTrue(out.1.contains("out of scope: the routes of target app do not want it; nothing is sent"), out.1)
        XCTAssertNil(users(appPort, token: "t", prefix: "/scim/v2")["gus"])
        let unknown = try brokerCLI(["targets", "push", "--config", dir.file("broker.yaml"), "app", "nobody"])
        XCTAssertEqual(unknown.0, 1)
        XCTAssertTrue(unknown.1.contains("no resource named nobody"), unknown.1)
    }
}
