import EdgeAgent
import EdgeBroker
import EdgeTestSupport
import Foundation
import SCIM
import XCTest

/// Broker fan-out to real downstream SCIM servers started by the test: the
/// reference scim2-server (PyPI) and a standalone scim-edge agent.
final class FanoutTests: FederationTestCase {
    let userSchema = "urn:ietf:params:scim:schemas:core:2.0:User"
    let groupSchema = "urn:ietf:params:scim:schemas:core:2.0:Group"

    func target(_ name: String, port: Int, token: String = "t", extra: String = "") -> String {
        """
          - name: \(name)
            url: http://127.0.0.1:\(port)/scim/v2
            tokenFile: \(dir.write("\(name).token", token + "\n"))
            rate: {requestsPerSecond: 2000, concurrency: 4}
            routes: [{domains: [acme-de]}]
        \(extra)

        """
    }

    func referenceTarget(_ name: String, port: Int, extra: String = "") -> String {
        """
          - name: \(name)
            url: http://127.0.0.1:\(port)
            tokenFile: \(dir.write("\(name).token", "ref-token"))
            rate: {requestsPerSecond: 2000, concurrency: 4}
            routes: [{domains: [acme-de]}]
        \(extra)

        """
    }

    @discardableResult
    func idp(_ port: Int, _ method: String, _ path: String, _ body: String = "") throws -> (Int, JSON?) {
        try scim(port, method, path, body)
    }

    func newUser(_ port: Int, _ userName: String, extra: String = "") throws -> String {
        let (status, body) = try idp(port, "POST", "/Users", #"{"schemas":["\#(userSchema)"],"userName":"\#(userName)"\#(extra)}"#)
        XCTAssertEqual(status, 201, "\(body.map { String(decoding: $0.serialized(), as: UTF8.self) } ?? "")")
        return try XCTUnwrap(body?["id"]?.stringValue)
    }

    /// The target's users (by userName), read through its own SCIM API.
    func users(_ port: Int, token: String, prefix: String) -> [String: JSON] {
        guard let (status, body) = try? scim(port, "GET", "/Users?count=1000", token: token, prefix: prefix), status == 200 else { return [:] }
        var out: [String: JSON] = [:]
        for r in body?["Resources"]?.arrayValue ?? [] { if let n = r["userName"]?.stringValue { out[n] = r } }
        return out
    }

    func groups(_ port: Int, token: String, prefix: String) -> [String: JSON] {
        guard let (status, body) = try? scim(port, "GET", "/Groups?count=1000", token: token, prefix: prefix), status == 200 else { return [:] }
        var out: [String: JSON] = [:]
        for r in body?["Resources"]?.arrayValue ?? [] { if let n = r["displayName"]?.stringValue { out[n] = r } }
        return out
    }

    func brokerCLI(_ args: [String]) throws -> (Int32, String) {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: productsDirectory + "/scim-broker")
        p.arguments = args
        let pipe = Pipe()
        p.standardOutput = pipe
        p.standardError = pipe
        try p.run()
        let out = pipe.fileHandleForReading.readDataToEndOfFile()
        p.waitUntilExit()
        return (p.terminationStatus, String(decoding: out, as: UTF8.self))
    }

    func metric(_ text: String, _ prefix: String) -> Double? {
        text.split(separator: "\n").first { $0.hasPrefix(prefix + " ") }.flatMap { Double($0.split(separator: " ").last!) }
    }

    /// Create, update, group membership, deactivation and delete reach both
    /// kinds of target; deletes become DELETE at one and active=false at the
    /// other; members are named by each target's own ids; every hop is traced.
    func testChangesReachReferenceServerAndAgentTargets() throws {
        let (_, refPort) = try startReferenceServer()
        let (_, appPort) = try startAppAgent("app")
        let (broker, bp) = try startBroker(yaml: "targets:\n"
            + referenceTarget("ref", port: refPort, extra: "    onRemove: deactivate")
            + target("app", port: appPort, extra: "    onRemove: delete"))
        let (_, dp) = try startAgent("de", cert: de, domain: "acme-de", brokerPort: bp)
        let (_, up) = try startAgent("us", cert: us, domain: "acme-us", brokerPort: bp)

        let alice = try newUser(dp, "alice", extra: #","name":{"givenName":"Alice","familyName":"Liddell"},"emails":[{"value":"alice@de.example","type":"work","primary":true}]"#)
        let bob = try newUser(dp, "bob", extra: #","title":"Engineer""#)
        let carol = try newUser(dp, "carol")
        _ = try newUser(up, "us-only")  // acme-us is not routed to these targets
        let (gs, group) = try idp(dp, "POST", "/Groups", #"{"schemas":["\#(groupSchema)"],"displayName":"staff","members":[{"value":"\#(alice)"},{"value":"\#(bob)"}]}"#)
        XCTAssertEqual(gs, 201)
        let groupID = try XCTUnwrap(group?["id"]?.stringValue)

        for (port, token, prefix) in [(refPort, "ref-token", ""), (appPort, "t", "/scim/v2")] {
            XCTAssertTrue(eventually(seconds: 30) {
                let u = self.users(port, token: token, prefix: prefix)
                let g = self.groups(port, token: token, prefix: prefix)
                return u.count == 3 && g["staff"]?["members"]?.arrayValue?.count == 2
            }, "target \(port): \(users(port, token: token, prefix: prefix).keys.sorted()) \(groups(port, token: token, prefix: prefix))")
            let u = users(port, token: token, prefix: prefix)
            XCTAssertNil(u["us-only"], "routes: acme-us does not flow here")
            XCTAssertEqual(u["alice"]?["name"]?["givenName"], "Alice")
            XCTAssertEqual(u["bob"]?["title"], "Engineer")
            // Members are the target's own ids.
            let memberIDs = Set(groups(port, token: token, prefix: prefix)["staff"]?["members"]?.arrayValue?.compactMap { $0["value"]?.stringValue } ?? [])
            XCTAssertEqual(memberIDs, Set([u["alice"]?["id"]?.stringValue, u["bob"]?["id"]?.stringValue].compactMap { $0 }))
        }

        // Update, membership change, deactivation at the IdP.
        XCTAssertEqual(try idp(dp, "PATCH", "/Users/\(bob)", #"{"schemas":["urn:ietf:params:scim:api:messages:2.0:PatchOp"],"Operations":[{"op":"replace","path":"title","value":"Manager"}]}"#).0, 200)
        XCTAssertEqual(try idp(dp, "PATCH", "/Groups/\(groupID)", #"{"schemas":["urn:ietf:params:scim:api:messages:2.0:PatchOp"],"Operations":[{"op":"add","path":"members","value":[{"value":"\#(carol)"}]},{"op":"remove","path":"members[value eq \"\#(alice)\"]"}]}"#).0, 200)
        XCTAssertEqual(try idp(dp, "PATCH", "/Users/\(carol)", #"{"schemas":["urn:ietf:params:scim:api:messages:2.0:PatchOp"],"Operations":[{"op":"replace","path":"active","value":false}]}"#).0, 200)
        // Delete at the IdP: DELETE at "app", active=false at "ref".
        XCTAssertEqual(try idp(dp, "DELETE", "/Users/\(alice)").0, 204)

        for (port, token, prefix) in [(refPort, "ref-token", ""), (appPort, "t", "/scim/v2")] {
            XCTAssertTrue(eventually(seconds: 30) {
                let u = self.users(port, token: token, prefix: prefix)
                let members = Set(self.groups(port, token: token, prefix: prefix)["staff"]?["members"]?.arrayValue?.compactMap { $0["value"]?.stringValue } ?? [])
                let aliceGone = port == appPort ? u["alice"] == nil : u["alice"]?["active"] == .bool(false)
                return u["bob"]?["title"] == "Manager" && u["carol"]?["active"] == .bool(false) && aliceGone
                    && members == Set([u["bob"]?["id"]?.stringValue, u["carol"]?["id"]?.stringValue].compactMap { $0 })
            }, "target \(port): \(users(port, token: token, prefix: prefix)) \(groups(port, token: token, prefix: prefix))")
        }
        XCTAssertEqual(users(refPort, token: "ref-token", prefix: "").count, 3, "nothing twice at the reference server")

        // Metrics per target, method and status class; the latency histogram.
        let metrics = try brokerMetrics(broker)
        for target in ["ref", "app"] {
            XCTAssertGreaterThanOrEqual(metric(metrics, #"scim_broker_target_requests_total{target="\#(target)",method="POST",class="2xx"}"#) ?? 0, 4, metrics)
            XCTAssertGreaterThanOrEqual(metric(metrics, #"scim_broker_target_requests_total{target="\#(target)",method="PATCH",class="2xx"}"#) ?? 0, 2, metrics)
            XCTAssertEqual(metric(metrics, #"scim_broker_target_queue_depth{target="\#(target)"}"#), 0, metrics)
            XCTAssertGreaterThan(metric(metrics, #"scim_broker_target_delivery_seconds_count{target="\#(target)"}"#) ?? 0, 0)
        }
        XCTAssertGreaterThanOrEqual(metric(metrics, #"scim_broker_target_requests_total{target="app",method="DELETE",class="2xx"}"#) ?? 0, 1)

        // `trace <broker id>`: agent accept → broker apply → each target.
        let store = try BrokerStore(path: dir.file("broker"))
        let bobBroker = try XCTUnwrap(store.resources(domain: "acme-de").first { $0["userName"] == "bob" }?["id"]?.stringValue)
        XCTAssertTrue(eventually(seconds: 5) {
            let t = (try? self.brokerCLI(["trace", "--data-dir", self.dir.file("broker"), bobBroker]).1) ?? ""
            return t.contains("agent accept") && t.contains("broker apply") && t.contains("target ref") && t.contains("target app")
                && t.contains("method PATCH status 200")
        }, (try? brokerCLI(["trace", "--data-dir", dir.file("broker"), bobBroker]).1) ?? "")
        let trace = try brokerCLI(["trace", "--data-dir", dir.file("broker"), bobBroker])
        XCTAssertEqual(trace.0, 0, trace.1)
        // The same hops by trace id.
        let traceID = try XCTUnwrap(store.trail(bobBroker).last?.hop["trace"]?.stringValue)
        XCTAssertTrue(try brokerCLI(["trace", "--data-dir", dir.file("broker"), traceID]).1.contains("target app"))

        // The running broker saves each target's status every second.
        XCTAssertTrue(eventually(seconds: 5) {
            ((try? self.brokerCLI(["targets", "status", "--data-dir", self.dir.file("broker")]).1) ?? "").contains("ref\tclosed\tqueued 0")
        })
        let status = try brokerCLI(["targets", "status", "--data-dir", dir.file("broker")])
        XCTAssertEqual(status.0, 0, status.1)
        XCTAssertTrue(status.1.contains("supports patch"), status.1)
    }
}
