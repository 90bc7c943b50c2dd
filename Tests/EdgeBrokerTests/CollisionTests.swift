import EdgeAgent
import EdgeBroker
import EdgeTestSupport
import Foundation
import SCIM
import XCTest

/// The same userName in two domains at one downstream app (the reference
/// scim2-server): no domain's change alters, adopts or deactivates the
/// other's account, with either collision policy.
extension FanoutTests {
    func bothDomainsTarget(_ name: String, port: Int, extra: String = "") -> String {
        referenceTarget(name, port: port, extra: extra).replacing("routes: [{domains: [acme-de]}]", with: "routes: [{}]")
    }

    func patchTitle(_ port: Int, _ id: String, _ title: String) throws -> Int {
        try idp(port, "PATCH", "/Users/\(id)",
                #"{"schemas":["urn:ietf:params:scim:api:messages:2.0:PatchOp"],"Operations":[{"op":"replace","path":"title","value":"\#(title)"}]}"#).0
    }

    /// `collisions: refuse` (the default): beta's `shared-bob` is never
    /// adopted onto alpha's account. Its create, its update and (with
    /// nothing to remove) its delete leave alpha's account as alpha made it;
    /// the refusal is a dead letter naming both domains and both broker ids;
    /// reconciliation does not flip the account either.
    func testCrossDomainCollisionIsRefusedAndTheOtherAccountUntouched() throws {
        let (_, refPort) = try startReferenceServer()
        let (broker, bp) = try startBroker(yaml: "targets:\n" + bothDomainsTarget("ref", port: refPort))
        let (_, dp) = try startAgent("de", cert: de, domain: "acme-de", brokerPort: bp)
        let (_, up) = try startAgent("us", cert: us, domain: "acme-us", brokerPort: bp)
        _ = try newUser(dp, "shared-bob", extra: #","title":"de-title""#)
        XCTAssertTrue(eventually(seconds: 20) { self.users(refPort, token: "ref-token", prefix: "")["shared-bob"] != nil })
        let usBob = try newUser(up, "shared-bob", extra: #","title":"us-title""#)
        XCTAssertTrue(eventually(seconds: 20) {
            (try? self.brokerMetrics(broker)).flatMap { self.metric($0, #"scim_broker_target_collisions_total{target="ref"}"#) } == 1
        }, (try? brokerMetrics(broker)) ?? "")
        let store = try BrokerStore(path: dir.file("broker"))
        let deID = try XCTUnwrap(try store.resources(domain: "acme-de").first?["id"]?.stringValue)
        let usID = try XCTUnwrap(try store.resources(domain: "acme-us").first?["id"]?.stringValue)
        let letters = try brokerCLI(["deadletter", "list", "--data-dir", dir.file("broker"), "--json"]).1
        XCTAssertTrue(letters.contains("collision") && letters.contains(deID) && letters.contains(usID)
                      && letters.contains("acme-de") && letters.contains("acme-us"), letters)
        XCTAssertEqual(try patchTitle(up, usBob, "us-again"), 200)
        XCTAssertTrue(eventually(seconds: 20) {
            (try? self.brokerMetrics(broker)).flatMap { self.metric($0, #"scim_broker_target_collisions_total{target="ref"}"#) } == 2
        }, "the update is refused too")
        XCTAssertEqual(users(refPort, token: "ref-token", prefix: "")["shared-bob"]?["title"], "de-title", "before any reconciliation")
        XCTAssertEqual(try idp(up, "DELETE", "/Users/\(usBob)").0, 204)
        let reconcile = try brokerCLI(["targets", "reconcile", "--config", dir.file("broker.yaml"), "ref", "--apply"])
        XCTAssertEqual(reconcile.0, 0, reconcile.1)
        // A change after all of them, to know they were processed: it arrives, then alpha's account is checked.
        _ = try newUser(dp, "marker")
        XCTAssertTrue(eventually(seconds: 20) { self.users(refPort, token: "ref-token", prefix: "")["marker"] != nil })
        XCTAssertTrue(eventually(seconds: 10) { (try? self.brokerCLI(["targets", "status", "--data-dir", self.dir.file("broker")]).1)?.contains("ref\tclosed\tqueued 0 ") ?? false },
                      (try? brokerCLI(["targets", "status", "--data-dir", dir.file("broker")]).1) ?? "")
        let bob = try XCTUnwrap(users(refPort, token: "ref-token", prefix: "")["shared-bob"])
        XCTAssertEqual(bob["title"], "de-title", "beta's data never overwrote alpha's account")
        XCTAssertEqual(bob["externalId"]?.stringValue, deID)
        XCTAssertNotEqual(bob["active"], .bool(false), "beta's delete did not deactivate alpha's account")
        XCTAssertEqual(users(refPort, token: "ref-token", prefix: "").count, 2)
        let metrics = try brokerMetrics(broker)
        XCTAssertEqual(metric(metrics, #"scim_broker_target_adopted_total{target="ref"}"#), 0, metrics)
    }

    /// `collisions: namespace`: both domains' `shared-bob` become accounts
    /// of their own (`shared-bob@acme-de`, `shared-bob@acme-us`); updates,
    /// a delete and reconciliation each touch only their own domain's.
    func testNamespacedCollisionsKeepOneAccountPerDomain() throws {
        let (_, refPort) = try startReferenceServer()
        let (_, bp) = try startBroker(yaml: "targets:\n" + bothDomainsTarget("ref", port: refPort, extra: "    collisions: namespace"))
        let (_, dp) = try startAgent("de", cert: de, domain: "acme-de", brokerPort: bp)
        let (_, up) = try startAgent("us", cert: us, domain: "acme-us", brokerPort: bp)
        let deBob = try newUser(dp, "shared-bob", extra: #","title":"de-title""#)
        let usBob = try newUser(up, "shared-bob", extra: #","title":"us-title""#)
        XCTAssertTrue(eventually(seconds: 20) {
            let u = self.users(refPort, token: "ref-token", prefix: "")
            return u["shared-bob@acme-de"]?["title"] == "de-title" && u["shared-bob@acme-us"]?["title"] == "us-title"
        }, "\(users(refPort, token: "ref-token", prefix: ""))")
        XCTAssertEqual(try patchTitle(up, usBob, "us-new"), 200)
        XCTAssertEqual(try patchTitle(dp, deBob, "de-new"), 200)
        XCTAssertTrue(eventually(seconds: 20) {
            let u = self.users(refPort, token: "ref-token", prefix: "")
            return u["shared-bob@acme-de"]?["title"] == "de-new" && u["shared-bob@acme-us"]?["title"] == "us-new"
        }, "\(users(refPort, token: "ref-token", prefix: ""))")
        XCTAssertEqual(try idp(up, "DELETE", "/Users/\(usBob)").0, 204)
        XCTAssertTrue(eventually(seconds: 20) {
            self.users(refPort, token: "ref-token", prefix: "")["shared-bob@acme-us"]?["active"] == .bool(false)
        }, "\(users(refPort, token: "ref-token", prefix: ""))")
        let u = users(refPort, token: "ref-token", prefix: "")
        XCTAssertNotEqual(u["shared-bob@acme-de"]?["active"], .bool(false), "only beta's own account was deactivated")
        XCTAssertEqual(u.count, 2)
        let report = try JSONParser.parse(Array(try brokerCLI(["targets", "reconcile", "--config", dir.file("broker.yaml"), "ref", "--json"]).1.utf8))
        XCTAssertEqual(report["drifted"]?.arrayValue?.count, 0, "the namespace is applied by reconciliation too: \(report)")
        XCTAssertEqual(report["missing"]?.arrayValue?.count, 0, "\(report)")
    }

    /// The collision settings are checked where they are written.
    func testCollisionSettingsAreValidated() throws {
        for (yaml, fragment) in [
            ("    collisions: merge", "collisions: must be refuse or namespace"),
            ("    collisions: link", "not available yet"),
            ("    collisions: namespace\n    namespace: {userName: \"{userName}\"}", "must hold {userName} and {domain}"),
            ("    namespace: {userName: \"{userName}@{domain}\"}", "only with 'collisions: namespace'"),
        ] {
            let file = dir.write("bad.yaml", """
                dataDir: \(dir.file("bad"))
                listen: 127.0.0.1:0
                tls: {ca: \(ca!), cert: \(broker.0), key: \(broker.1)}
                domains:
                  acme-de: \(deID)
                targets:

                """ + referenceTarget("ref", port: 9, extra: yaml))
            let (status, out) = try brokerCLI(["check-config", file])
            XCTAssertEqual(status, 1, out)
            XCTAssertTrue(out.contains(fragment), "'\(fragment)' not in \(out)")
        }
    }
}
