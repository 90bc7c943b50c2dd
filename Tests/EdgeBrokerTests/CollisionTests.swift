import EdgeAgent
import EdgeBroker
import EdgeDelivery
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
        try idp(
            port, "PATCH", "/Users/\(id)",
            #"{"schemas":["urn:ietf:params:scim:api:messages:2.0:PatchOp"],"Operations":[{"op":"replace","path":"title","value":"\#(title)"}]}"#
        ).0
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
        XCTAssertTrue(
            eventually(seconds: 20) {
                (try? self.brokerMetrics(broker)).flatMap { self.metric($0, #"scim_broker_target_collisions_total{target="ref"}"#) } == 1
            }, (try? brokerMetrics(broker)) ?? "")
        let store = try BrokerStore(path: dir.file("broker"))
        let deID = try XCTUnwrap(try store.resources(domain: "acme-de").first?["id"]?.stringValue)
        let usID = try XCTUnwrap(try store.resources(domain: "acme-us").first?["id"]?.stringValue)
        let letters = try brokerCLI(["deadletter", "list", "--data-dir", dir.file("broker"), "--json"]).1
        XCTAssertTrue(
            letters.contains("collision") && letters.contains(deID) && letters.contains(usID)
                && letters.contains("acme-de") && letters.contains("acme-us"), letters)
        XCTAssertEqual(try patchTitle(up, usBob, "us-again"), 200)
        XCTAssertTrue(
            eventually(seconds: 20) {
                (try? self.brokerMetrics(broker)).flatMap { self.metric($0, #"scim_broker_target_collisions_total{target="ref"}"#) } == 2
            }, "the update is refused too")
        XCTAssertEqual(users(refPort, token: "ref-token", prefix: "")["shared-bob"]?["title"], "de-title", "before any reconciliation")
        XCTAssertEqual(try idp(up, "DELETE", "/Users/\(usBob)").0, 204)
        let reconcile = try brokerCLI(["targets", "reconcile", "--config", dir.file("broker.yaml"), "ref", "--apply"])
        XCTAssertEqual(reconcile.0, 0, reconcile.1)
        // A change after all of them, to know they were processed: it arrives, then alpha's account is checked.
        _ = try newUser(dp, "marker")
        XCTAssertTrue(eventually(seconds: 20) { self.users(refPort, token: "ref-token", prefix: "")["marker"] != nil })
        XCTAssertTrue(
            eventually(seconds: 10) {
                (try? self.brokerCLI(["targets", "status", "--data-dir", self.dir.file("broker")]).1)?.contains("ref\tclosed\tqueued 0 ")
                    ?? false
            },
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
        XCTAssertTrue(
            eventually(seconds: 20) {
                let u = self.users(refPort, token: "ref-token", prefix: "")
                return u["shared-bob@acme-de"]?["title"] == "de-title" && u["shared-bob@acme-us"]?["title"] == "us-title"
            }, "\(users(refPort, token: "ref-token", prefix: ""))")
        XCTAssertEqual(try patchTitle(up, usBob, "us-new"), 200)
        XCTAssertEqual(try patchTitle(dp, deBob, "de-new"), 200)
        XCTAssertTrue(
            eventually(seconds: 20) {
                let u = self.users(refPort, token: "ref-token", prefix: "")
                return u["shared-bob@acme-de"]?["title"] == "de-new" && u["shared-bob@acme-us"]?["title"] == "us-new"
            }, "\(users(refPort, token: "ref-token", prefix: ""))")
        XCTAssertEqual(try idp(up, "DELETE", "/Users/\(usBob)").0, 204)
        XCTAssertTrue(
            eventually(seconds: 20) {
                self.users(refPort, token: "ref-token", prefix: "")["shared-bob@acme-us"]?["active"] == .bool(false)
            }, "\(users(refPort, token: "ref-token", prefix: ""))")
        let u = users(refPort, token: "ref-token", prefix: "")
        XCTAssertNotEqual(u["shared-bob@acme-de"]?["active"], .bool(false), "only beta's own account was deactivated")
        XCTAssertEqual(u.count, 2)
        let report = try JSONParser.parse(
            Array(try brokerCLI(["targets", "reconcile", "--config", dir.file("broker.yaml"), "ref", "--json"]).1.utf8))
        XCTAssertEqual(report["drifted"]?.arrayValue?.count, 0, "the namespace is applied by reconciliation too: \(report)")
        XCTAssertEqual(report["missing"]?.arrayValue?.count, 0, "\(report)")
    }

    /// The collision settings are checked where they are written.
    func testCollisionSettingsAreValidated() throws {
        for (yaml, fragment) in [
            ("    collisions: merge", "collisions: must be refuse, namespace or link, got 'merge'"),
            ("    collisions: link", "needs 'link: {attribute"),
            ("    collisions: link\n    link: {sourceOfRecord: [acme-de]}", "link.attribute: is required"),
            ("    collisions: link\n    link: {attribute: employeeNumber, sourceOfRecord: []}", "must list at least one domain"),
            (
                "    collisions: link\n    link: {attribute: employeeNumber, sourceOfRecord: [acme-fr]}",
                "'acme-fr', which is not one of the broker's domains"
            ),
            ("    collisions: link\n    link: {attribute: employeeNumber, sourceOfRecord: [acme-de, acme-de]}", "names 'acme-de' twice"),
            ("    collisions: link\n    link: {attribute: emails, sourceOfRecord: [acme-de]}", "is multi-valued: pick one element"),
            ("    collisions: link\n    link: {attribute: badgeNumber, sourceOfRecord: [acme-de]}", "no such User attribute"),
            (
                "    collisions: link\n    link: {attribute: 'emails[value eq \"x\"].value', sourceOfRecord: [acme-de]}",
                "only value filter allowed"
            ),
            ("    collisions: link\n    link: {attribute: employeeNumber, sourceOfRecord: [acme-de], order: x}", "link.order: unknown key"),
            ("    link: {attribute: employeeNumber, sourceOfRecord: [acme-de]}", "only with 'collisions: link'"),
            ("    collisions: namespace\n    namespace: {userName: \"{userName}\"}", "must hold {userName} and {domain}"),
            ("    namespace: {userName: \"{userName}@{domain}\"}", "only with 'collisions: namespace'"),
        ] {
            let file = dir.write(
                "bad.yaml",
                """
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
            XCTAssertTrue(out.contains("bad.yaml:"), "the error names its line: \(out)")
        }
        // The attribute forms a link accepts, and the value each reads (trimmed, any case).
        let enterprise = "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User"
        let user = try XCTUnwrap(
            JSONParser.parse(
                Array(
                    #"""
                    {"userName": "Bob", "\#(enterprise)": {"employeeNumber": " E-42 "},
                     "emails": [{"value": "bob@home.example", "type": "home"}, {"value": "Bob@Work.example", "type": "work"}]}
                    """#.utf8)
            ).objectValue)
        for (attribute, value) in [
            ("employeeNumber", "e-42"), ("\(enterprise):employeeNumber", "e-42"),
            (#"emails[type eq "work"].value"#, "bob@work.example"), (#"emails[type eq "other"].value"#, nil),
            ("userName", "bob"), ("nickName", nil),
        ] {
            XCTAssertEqual(try LinkPolicy(attribute: attribute, sourceOfRecord: ["acme-de"]).value(of: user), value, attribute)
        }
        XCTAssertNil(
            try LinkPolicy(attribute: "employeeNumber", sourceOfRecord: ["acme-de"]).value(of: ["\(enterprise)": ["employeeNumber": "  "]]),
            "nothing links on an empty value")
    }

    func linkTarget(_ name: String, port: Int, order: String = "[acme-de, acme-us]") -> String {
        bothDomainsTarget(name, port: port, extra: "    collisions: link\n    link: {attribute: employeeNumber, sourceOfRecord: \(order)}")
    }

    /// A user with the enterprise extension (`employeeNumber`, and more of it in `enterprise`).
    func newEmployee(_ port: Int, _ userName: String, employeeNumber: String?, extra: String = "", enterprise: String = "") throws -> String
    {
        let ext = "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User"
        var fields: [String] = []
        if let employeeNumber { fields.append(#""employeeNumber":"\#(employeeNumber)""#) }
        if !enterprise.isEmpty { fields.append(enterprise) }
        let (status, body) = try idp(
            port, "POST", "/Users",
            #"{"schemas":["\#(userSchema)","\#(ext)"],"userName":"\#(userName)"\#(extra),"\#(ext)":{\#(fields.joined(separator: ","))}}"#)
        XCTAssertEqual(status, 201, "\(body.map { String(decoding: $0.serialized(), as: UTF8.self) } ?? "")")
        return try XCTUnwrap(body?["id"]?.stringValue)
    }

    func patch(_ port: Int, _ id: String, _ operations: String) throws -> Int {
        try idp(
            port, "PATCH", "/Users/\(id)", #"{"schemas":["urn:ietf:params:scim:api:messages:2.0:PatchOp"],"Operations":[\#(operations)]}"#
        ).0
    }

    /// Waits until the broker has nothing queued for `target` (its saved status says so).
    func waitForIdle(_ target: String) {
        XCTAssertTrue(
            eventually(seconds: 20) {
                (try? self.brokerCLI(["targets", "status", "--data-dir", self.dir.file("broker")]).1)?.contains(
                    "\(target)\tclosed\tqueued 0 ") ?? false
            }, (try? brokerCLI(["targets", "status", "--data-dir", dir.file("broker")]).1) ?? "")
    }

    /// `collisions: link`: the same person in two domains (one employeeNumber,
    /// spelt differently) is one account at the target. Each attribute comes
    /// from the first domain in source-of-record order that has it, whichever
    /// domain came first; an update from the lower one changes only what the
    /// higher one lacks; deactivating or deleting one side leaves the account
    /// active with the other's data; deleting the other deactivates it.
    /// Reconciliation finds no drift, nothing missing and no stray, and does
    /// not flip the account between the two sources.
    func testLinkedUsersOfTwoDomainsAreOneAccount() throws {
        let (_, refPort) = try startReferenceServer()
        let (broker, bp) = try startBroker(yaml: "targets:\n" + linkTarget("ref", port: refPort))
        let (_, dp) = try startAgent("de", cert: de, domain: "acme-de", brokerPort: bp)
        let (_, up) = try startAgent("us", cert: us, domain: "acme-us", brokerPort: bp)
        func accounts() -> [String: JSON] { users(refPort, token: "ref-token", prefix: "") }
        let ext = "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User"

        // The lower-priority domain first: its account exists before the link.
        let usBob = try newEmployee(
            up, "bob.us", employeeNumber: "E-42", extra: #","title":"us-title","nickName":"bobby""#,
            enterprise: #""costCenter":"us-cc""#)
        XCTAssertTrue(eventually(seconds: 20) { accounts()["bob.us"] != nil }, "\(accounts())")
        let deBob = try newEmployee(
            dp, "bob.de", employeeNumber: " e-42", extra: #","title":"de-title""#,
            enterprise: #""department":"de-dept""#)
        XCTAssertTrue(
            eventually(seconds: 20) {
                let u = accounts()
                return u.count == 1 && u["bob.de"]?["title"] == "de-title" && u["bob.de"]?["nickName"] == "bobby"
            }, "one account, de's data first: \(accounts())")
        let store = try BrokerStore(path: dir.file("broker"))
        let deID = try XCTUnwrap(try store.resources(domain: "acme-de").first?["id"]?.stringValue)
        let usID = try XCTUnwrap(try store.resources(domain: "acme-us").first?["id"]?.stringValue)
        var bob = try XCTUnwrap(accounts()["bob.de"])
        XCTAssertEqual(bob["externalId"]?.stringValue, deID, "named by the first source of record")
        XCTAssertEqual(bob[ext]?["department"], "de-dept")
        XCTAssertEqual(bob[ext]?["costCenter"], "us-cc", "an extension's attributes merge one by one")
        XCTAssertEqual(bob[ext]?["employeeNumber"], " e-42", "de's spelling")
        XCTAssertNotEqual(bob["active"], .bool(false))
        XCTAssertTrue(
            eventually(seconds: 5) {
                (try? self.brokerMetrics(broker)).flatMap { self.metric($0, #"scim_broker_target_linked_accounts{target="ref"}"#) } == 1
            }, (try? brokerMetrics(broker)) ?? "")

        // An update from the lower-priority domain: only what de lacks changes.
        XCTAssertEqual(
            try patch(up, usBob, #"{"op":"replace","path":"title","value":"us-new"},{"op":"replace","path":"nickName","value":"bobby2"}"#),
            200)
        XCTAssertTrue(eventually(seconds: 20) { accounts()["bob.de"]?["nickName"] == "bobby2" }, "\(accounts())")
        XCTAssertEqual(accounts()["bob.de"]?["title"], "de-title", "de is the source of record for the title")
        XCTAssertEqual(try patch(dp, deBob, #"{"op":"replace","path":"title","value":"de-new"}"#), 200)
        XCTAssertTrue(eventually(seconds: 20) { accounts()["bob.de"]?["title"] == "de-new" }, "\(accounts())")

        // Reconciliation wants the merged account: nothing to report, and --apply flips nothing.
        waitForIdle("ref")
        for apply in [false, true, false] {
            let run = try brokerCLI(
                ["targets", "reconcile", "--config", dir.file("broker.yaml"), "ref", "--json"] + (apply ? ["--apply"] : []))
            XCTAssertEqual(run.0, 0, run.1)
            let report = try JSONParser.parse(Array(run.1.utf8))
            XCTAssertEqual(report["expected"], 1, "one account for the two linked users: \(report)")
            XCTAssertEqual(report["drifted"]?.arrayValue?.count, 0, "\(report)")
            XCTAssertEqual(report["missing"]?.arrayValue?.count, 0, "\(report)")
            XCTAssertEqual(report["strays"]?.arrayValue?.count, 0, "\(report)")
            waitForIdle("ref")
        }
        bob = try XCTUnwrap(accounts()["bob.de"])
        XCTAssertEqual(bob["title"], "de-new", "reconciliation did not flip the account to the other source")
        XCTAssertEqual(bob["externalId"]?.stringValue, deID)

        // de deactivated: the account stays active, with us's data.
        XCTAssertEqual(try patch(dp, deBob, #"{"op":"replace","path":"active","value":false}"#), 200)
        XCTAssertTrue(
            eventually(seconds: 20) {
                let u = accounts()
                return u.count == 1 && u["bob.us"]?["title"] == "us-new" && u["bob.us"]?["active"] == .bool(true)
            }, "\(accounts())")
        XCTAssertEqual(accounts()["bob.us"]?["externalId"]?.stringValue, usID)
        XCTAssertNil(accounts()["bob.us"]?[ext]?["department"], "only the active source supplies data")
        // Active again, then deleted at de: still us's data, still active.
        XCTAssertEqual(try patch(dp, deBob, #"{"op":"replace","path":"active","value":true}"#), 200)
        XCTAssertTrue(eventually(seconds: 20) { accounts()["bob.de"]?["title"] == "de-new" }, "\(accounts())")
        XCTAssertEqual(try idp(dp, "DELETE", "/Users/\(deBob)").0, 204)
        XCTAssertTrue(
            eventually(seconds: 20) {
                let u = accounts()
                return u.count == 1 && u["bob.us"]?["title"] == "us-new" && u["bob.us"]?["active"] == .bool(true)
            }, "\(accounts())")
        XCTAssertTrue(
            eventually(seconds: 5) {
                (try? self.brokerMetrics(broker)).flatMap { self.metric($0, #"scim_broker_target_linked_accounts{target="ref"}"#) } == 0
            }, (try? brokerMetrics(broker)) ?? "")
        let report = try JSONParser.parse(
            Array(try brokerCLI(["targets", "reconcile", "--config", dir.file("broker.yaml"), "ref", "--json"]).1.utf8))
        XCTAssertEqual(report["drifted"]?.arrayValue?.count, 0, "\(report)")
        XCTAssertEqual(report["missing"]?.arrayValue?.count, 0, "\(report)")
        XCTAssertEqual(report["strays"]?.arrayValue?.count, 0, "\(report)")

        // The last linked source gone: the account is deactivated (onRemove: deactivate).
        XCTAssertEqual(try idp(up, "DELETE", "/Users/\(usBob)").0, 204)
        XCTAssertTrue(eventually(seconds: 20) { accounts()["bob.us"]?["active"] == .bool(false) }, "\(accounts())")
        XCTAssertEqual(accounts().count, 1, "never a second account")
        let metrics = try brokerMetrics(broker)
        XCTAssertEqual(metric(metrics, #"scim_broker_target_collisions_total{target="ref"}"#), 0, metrics)
        XCTAssertEqual(metric(metrics, #"scim_broker_target_dead_letters_total{target="ref"}"#), 0, metrics)
    }

    /// `collisions: link` links by the configured attribute only: two users
    /// with one userName and different employeeNumbers (or none) are not one
    /// person, and the second is refused as a collision that leaves the
    /// first's account as it was; a user of the other domain with the same
    /// employeeNumber and another userName is linked to it.
    func testLinkingIsByTheAttributeOnlyNeverByUserName() throws {
        let (_, refPort) = try startReferenceServer()
        let (broker, bp) = try startBroker(yaml: "targets:\n" + linkTarget("ref", port: refPort))
        let (_, dp) = try startAgent("de", cert: de, domain: "acme-de", brokerPort: bp)
        let (_, up) = try startAgent("us", cert: us, domain: "acme-us", brokerPort: bp)
        func accounts() -> [String: JSON] { users(refPort, token: "ref-token", prefix: "") }
        func collisions() -> Double? {
            (try? brokerMetrics(broker)).flatMap { metric($0, #"scim_broker_target_collisions_total{target="ref"}"#) }
        }
        _ = try newEmployee(dp, "shared-bob", employeeNumber: "E-1", extra: #","title":"de-title""#)
        XCTAssertTrue(eventually(seconds: 20) { accounts()["shared-bob"] != nil }, "\(accounts())")
        let other = try newEmployee(up, "shared-bob", employeeNumber: nil, extra: #","title":"us-title""#)
        XCTAssertTrue(
            eventually(seconds: 20) { collisions() == 1 }, "nothing links on a missing value: \((try? brokerMetrics(broker)) ?? "")")
        XCTAssertEqual(
            try patch(
                up, other,
                #"{"op":"replace","path":"urn:ietf:params:scim:schemas:extension:enterprise:2.0:User:employeeNumber","value":"E-2"}"#), 200)
        XCTAssertTrue(eventually(seconds: 20) { collisions() == 2 }, "another employeeNumber: \(String(describing: collisions()))")
        // The same employeeNumber under another userName: one person, one account.
        _ = try newEmployee(up, "robert", employeeNumber: "e-1", extra: #","title":"us-title","nickName":"rob""#)
        XCTAssertTrue(eventually(seconds: 20) { accounts()["shared-bob"]?["nickName"] == "rob" }, "\(accounts())")
        XCTAssertNil(accounts()["robert"], "linked to de's account, not one of its own")
        XCTAssertEqual(try patch(up, other, #"{"op":"replace","path":"title","value":"us-again"}"#), 200)
        XCTAssertTrue(eventually(seconds: 20) { collisions() == 3 }, "the unlinked user's update is refused too")
        XCTAssertEqual(try idp(up, "DELETE", "/Users/\(other)").0, 204)
        waitForIdle("ref")
        let bob = try XCTUnwrap(accounts()["shared-bob"])
        XCTAssertEqual(bob["title"], "de-title", "no unlinked user changed the account")
        XCTAssertNotEqual(bob["active"], .bool(false))
        XCTAssertEqual(accounts().count, 1)
        let letters = try brokerCLI(["deadletter", "list", "--data-dir", dir.file("broker"), "--json"]).1
        XCTAssertTrue(letters.contains("collision") && letters.contains("acme-us"), letters)
        let report = try JSONParser.parse(
            Array(try brokerCLI(["targets", "reconcile", "--config", dir.file("broker.yaml"), "ref", "--json"]).1.utf8))
        XCTAssertEqual(report["strays"]?.arrayValue?.count, 0, "\(report)")
    }

    /// `collisions: link` links only the domains in `sourceOfRecord`: a user
    /// of another domain with the same employeeNumber is not linked (it
    /// cannot join, nor later take over, the other domain's account): under
    /// another userName it has an account of its own, under the same one it
    /// is refused as a collision, and the linked account keeps its data.
    func testOnlyTheSourceOfRecordDomainsLink() throws {
        let (_, refPort) = try startReferenceServer()
        let (broker, bp) = try startBroker(yaml: "targets:\n" + linkTarget("ref", port: refPort, order: "[acme-de]"))
        let (_, dp) = try startAgent("de", cert: de, domain: "acme-de", brokerPort: bp)
        let (_, up) = try startAgent("us", cert: us, domain: "acme-us", brokerPort: bp)
        func accounts() -> [String: JSON] { users(refPort, token: "ref-token", prefix: "") }
        func collisions() -> Double? {
            (try? brokerMetrics(broker)).flatMap { metric($0, #"scim_broker_target_collisions_total{target="ref"}"#) }
        }
        let deBob = try newEmployee(dp, "shared-bob", employeeNumber: "E-1", extra: #","title":"de-title""#)
        XCTAssertTrue(eventually(seconds: 20) { accounts()["shared-bob"] != nil }, "\(accounts())")
        _ = try newEmployee(up, "robert", employeeNumber: "e-1", extra: #","title":"us-title","nickName":"rob""#)
        XCTAssertTrue(eventually(seconds: 20) { accounts()["robert"] != nil }, "an account of its own: \(accounts())")
        _ = try newEmployee(up, "shared-bob", employeeNumber: "E-1", extra: #","title":"us-title","nickName":"bobby""#)
        XCTAssertTrue(eventually(seconds: 20) { collisions() == 1 }, "refused, not linked: \((try? brokerMetrics(broker)) ?? "")")
        // The source of record's user inactive: the account is not handed to the other domain's user.
        XCTAssertEqual(try patch(dp, deBob, #"{"op":"replace","path":"active","value":false}"#), 200)
        waitForIdle("ref")
        let bob = try XCTUnwrap(accounts()["shared-bob"])
        XCTAssertEqual(bob["title"], "de-title", "\(bob)")
        XCTAssertNil(bob["nickName"], "no data of acme-us: \(bob)")
        XCTAssertEqual(bob["active"], .bool(false), "deactivated with its only source")
        XCTAssertEqual(accounts()["robert"]?["title"], "us-title")
        XCTAssertEqual(accounts().count, 2)
        let metrics = try brokerMetrics(broker)
        XCTAssertEqual(metric(metrics, #"scim_broker_target_linked_accounts{target="ref"}"#), 0, metrics)
    }

    /// `collisions: link` turned on for a target that already holds both
    /// users' accounts: the link index is built from the directory at start,
    /// and `reconcile --apply` merges them: the source of record's account
    /// gets the merged state, the other one is deactivated as a stray (named
    /// by its account, so the user's mapping to the shared one stays).
    func testLinkTurnedOnLaterMergesTheExistingAccounts() throws {
        let (_, refPort) = try startReferenceServer()
        let (first, bp) = try startBroker(yaml: "targets:\n" + bothDomainsTarget("ref", port: refPort))
        let (_, dp) = try startAgent("de", cert: de, domain: "acme-de", brokerPort: bp)
        let (_, up) = try startAgent("us", cert: us, domain: "acme-us", brokerPort: bp)
        func accounts() -> [String: JSON] { users(refPort, token: "ref-token", prefix: "") }
        _ = try newEmployee(dp, "bob.de", employeeNumber: "E-7", extra: #","title":"de-title""#)
        let usBob = try newEmployee(up, "bob.us", employeeNumber: "E-7", extra: #","title":"us-title","nickName":"bobby""#)
        XCTAssertTrue(eventually(seconds: 20) { accounts().count == 2 }, "two accounts under refuse: \(accounts())")
        waitForIdle("ref")
        first.signal(SIGTERM)
        _ = first.waitForExit()
        let (broker, _) = try startBroker(yaml: "targets:\n" + linkTarget("ref", port: refPort), port: bp)
        XCTAssertNotNil(broker.waitForLine("link index built"), broker.output.joined(separator: "\n"))
        XCTAssertTrue(
            eventually(seconds: 5) {
                (try? self.brokerMetrics(broker)).flatMap { self.metric($0, #"scim_broker_target_linked_accounts{target="ref"}"#) } == 1
            }, (try? brokerMetrics(broker)) ?? "")
        let run = try brokerCLI(["targets", "reconcile", "--config", dir.file("broker.yaml"), "ref", "--json", "--apply"])
        XCTAssertEqual(run.0, 0, run.1)
        let before = try JSONParser.parse(Array(run.1.utf8))
        XCTAssertEqual(before["expected"], 1, "\(before)")
        XCTAssertEqual(before["strays"]?.arrayValue?.count, 1, "us's own account is no longer wanted: \(before)")
        XCTAssertTrue(
            eventually(seconds: 20) {
                let u = accounts()
                return u["bob.de"]?["nickName"] == "bobby" && u["bob.de"]?["title"] == "de-title" && u["bob.us"]?["active"] == .bool(false)
            }, "\(accounts())")
        waitForIdle("ref")
        let after = try JSONParser.parse(
            Array(try brokerCLI(["targets", "reconcile", "--config", dir.file("broker.yaml"), "ref", "--json"]).1.utf8))
        for key in ["drifted", "missing", "strays"] { XCTAssertEqual(after[key]?.arrayValue?.count, 0, "\(key): \(after)") }
        // us's changes now reach the linked account, never its old one.
        XCTAssertEqual(try patch(up, usBob, #"{"op":"replace","path":"nickName","value":"rob"}"#), 200)
        XCTAssertTrue(eventually(seconds: 20) { accounts()["bob.de"]?["nickName"] == "rob" }, "\(accounts())")
        XCTAssertEqual(accounts()["bob.us"]?["active"], .bool(false))
        XCTAssertEqual(accounts()["bob.us"]?["nickName"], "bobby")
    }
}
