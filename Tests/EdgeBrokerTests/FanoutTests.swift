import EdgeAgent
import EdgeBroker
import EdgeHTTP
import EdgeStore
import EdgeTestSupport
import EdgeTools
import Foundation
import SCIM
import XCTest

/// Broker fan-out to real downstream SCIM servers started by the test: the
/// reference scim2-server (PyPI) and a standalone scim-edge agent.
final class FanoutTests: FederationTestCase {
    let userSchema = "urn:ietf:params:scim:schemas:core:2.0:User"
    let groupSchema = "urn:ietf:params:scim:schemas:core:2.0:Group"

    /// A target's `extra`: a user with a nickName reaches the app under an
    /// attribute it does not know, which it refuses (a dead letter).
    static let refusesNickNames = "    mapping:\n      rename: {nickName: bogusAttribute}"

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

    /// A group created at the agent on `port` with `members` (ids there): its id.
    func newGroup(_ port: Int, _ displayName: String, members: some Sequence<String>) throws -> String {
        let list = members.map { #"{"value":"\#($0)"}"# }.joined(separator: ",")
        let (status, group) = try idp(
            port, "POST", "/Groups", #"{"schemas":["\#(groupSchema)"],"displayName":"\#(displayName)","members":[\#(list)]}"#)
        XCTAssertEqual(status, 201)
        return try XCTUnwrap(group?["id"]?.stringValue)
    }

    /// `scim-broker targets reconcile TARGET --json` with the test's configuration, parsed.
    func reconcileReport(_ target: String) throws -> JSON {
        let report = try brokerCLI(["targets", "reconcile", "--config", dir.file("broker.yaml"), target, "--json"])
        XCTAssertEqual(report.0, 0, report.1)
        return try JSONParser.parse(Array(report.1.utf8))
    }

    /// The target's users (by userName), read through its own SCIM API.
    func users(_ port: Int, token: String, prefix: String) -> [String: JSON] {
        resources(port, "/Users", by: "userName", token: token, prefix: prefix)
    }

    func groups(_ port: Int, token: String, prefix: String) -> [String: JSON] {
        resources(port, "/Groups", by: "displayName", token: token, prefix: prefix)
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
        let (broker, bp) = try startBroker(
            yaml: "targets:\n"
                + referenceTarget("ref", port: refPort, extra: "    onRemove: deactivate")
                + target("app", port: appPort, extra: "    onRemove: delete"))
        let (_, dp) = try startAgent("de", cert: de, domain: "acme-de", brokerPort: bp)
        let (_, up) = try startAgent("us", cert: us, domain: "acme-us", brokerPort: bp)

        let alice = try newUser(
            dp, "alice",
            extra:
                #","name":{"givenName":"Alice","familyName":"Liddell"},"emails":[{"value":"alice@de.example","type":"work","primary":true}]"#
        )
        let bob = try newUser(dp, "bob", extra: #","title":"Engineer""#)
        let carol = try newUser(dp, "carol")
        _ = try newUser(up, "us-only")  // acme-us is not routed to these targets
        let (gs, group) = try idp(
            dp, "POST", "/Groups",
            #"{"schemas":["\#(groupSchema)"],"displayName":"staff","members":[{"value":"\#(alice)"},{"value":"\#(bob)"}]}"#)
        XCTAssertEqual(gs, 201)
        let groupID = try XCTUnwrap(group?["id"]?.stringValue)

        for (port, token, prefix) in [(refPort, "ref-token", ""), (appPort, "t", "/scim/v2")] {
            XCTAssertTrue(
                eventually(seconds: 30) {
                    let u = self.users(port, token: token, prefix: prefix)
                    let g = self.groups(port, token: token, prefix: prefix)
                    return u.count == 3 && g["staff"]?["members"]?.arrayValue?.count == 2
                },
                "target \(port): \(users(port, token: token, prefix: prefix).keys.sorted()) \(groups(port, token: token, prefix: prefix))")
            let u = users(port, token: token, prefix: prefix)
            XCTAssertNil(u["us-only"], "routes: acme-us does not flow here")
            XCTAssertEqual(u["alice"]?["name"]?["givenName"], "Alice")
            XCTAssertEqual(u["bob"]?["title"], "Engineer")
            // Members are the target's own ids.
            let memberIDs = Set(
                groups(port, token: token, prefix: prefix)["staff"]?["members"]?.arrayValue?.compactMap { $0["value"]?.stringValue } ?? [])
            XCTAssertEqual(memberIDs, Set([u["alice"]?["id"]?.stringValue, u["bob"]?["id"]?.stringValue].compactMap { $0 }))
        }

        // Update, membership change, deactivation at the IdP.
        XCTAssertEqual(
            try idp(
                dp, "PATCH", "/Users/\(bob)",
                #"{"schemas":["urn:ietf:params:scim:api:messages:2.0:PatchOp"],"Operations":[{"op":"replace","path":"title","value":"Manager"}]}"#
            ).0, 200)
        XCTAssertEqual(
            try idp(
                dp, "PATCH", "/Groups/\(groupID)",
                #"{"schemas":["urn:ietf:params:scim:api:messages:2.0:PatchOp"],"Operations":[{"op":"add","path":"members","value":[{"value":"\#(carol)"}]},{"op":"remove","path":"members[value eq \"\#(alice)\"]"}]}"#
            ).0, 200)
        XCTAssertEqual(
            try idp(
                dp, "PATCH", "/Users/\(carol)",
                #"{"schemas":["urn:ietf:params:scim:api:messages:2.0:PatchOp"],"Operations":[{"op":"replace","path":"active","value":false}]}"#
            ).0, 200)
        // Delete at the IdP: DELETE at "app", active=false at "ref".
        XCTAssertEqual(try idp(dp, "DELETE", "/Users/\(alice)").0, 204)

        for (port, token, prefix) in [(refPort, "ref-token", ""), (appPort, "t", "/scim/v2")] {
            XCTAssertTrue(
                eventually(seconds: 30) {
                    let u = self.users(port, token: token, prefix: prefix)
                    let members = Set(
                        self.groups(port, token: token, prefix: prefix)["staff"]?["members"]?.arrayValue?.compactMap {
                            $0["value"]?.stringValue
                        } ?? [])
                    let aliceGone = port == appPort ? u["alice"] == nil : u["alice"]?["active"] == .bool(false)
                    return u["bob"]?["title"] == "Manager" && u["carol"]?["active"] == .bool(false) && aliceGone
                        && members == Set([u["bob"]?["id"]?.stringValue, u["carol"]?["id"]?.stringValue].compactMap { $0 })
                }, "target \(port): \(users(port, token: token, prefix: prefix)) \(groups(port, token: token, prefix: prefix))")
        }
        XCTAssertEqual(users(refPort, token: "ref-token", prefix: "").count, 3, "nothing twice at the reference server")

        // Metrics per target, method and status class; the latency histogram.
        let metrics = try brokerMetrics(broker)
        for target in ["ref", "app"] {
            XCTAssertGreaterThanOrEqual(
                metric(metrics, #"scim_broker_target_requests_total{target="\#(target)",method="POST",class="2xx"}"#) ?? 0, 4, metrics)
            XCTAssertGreaterThanOrEqual(
                metric(metrics, #"scim_broker_target_requests_total{target="\#(target)",method="PATCH",class="2xx"}"#) ?? 0, 2, metrics)
            XCTAssertEqual(metric(metrics, #"scim_broker_target_queue_depth{target="\#(target)"}"#), 0, metrics)
            XCTAssertGreaterThan(metric(metrics, #"scim_broker_target_delivery_seconds_count{target="\#(target)"}"#) ?? 0, 0)
        }
        XCTAssertGreaterThanOrEqual(
            metric(metrics, #"scim_broker_target_requests_total{target="app",method="DELETE",class="2xx"}"#) ?? 0, 1)

        // `trace <broker id>`: agent accept → broker apply → each target.
        let store = try BrokerStore(path: dir.file("broker"))
        let bobBroker = try XCTUnwrap(store.resources(domain: "acme-de").first { $0["userName"] == "bob" }?["id"]?.stringValue)
        XCTAssertTrue(
            eventually(seconds: 5) {
                let t = (try? self.brokerCLI(["trace", "--data-dir", self.dir.file("broker"), bobBroker]).1) ?? ""
                return t.contains("agent accept") && t.contains("broker apply") && t.contains("target ref") && t.contains("target app")
                    && t.contains("method PATCH status 200")
            }, (try? brokerCLI(["trace", "--data-dir", dir.file("broker"), bobBroker]).1) ?? "")
        let trace = try brokerCLI(["trace", "--data-dir", dir.file("broker"), bobBroker])
        XCTAssertEqual(trace.0, 0, trace.1)
        // The same hops by trace id.
        let traceID = try XCTUnwrap(store.trail(bobBroker).hops.last?.hop["trace"]?.stringValue)
        XCTAssertTrue(try brokerCLI(["trace", "--data-dir", dir.file("broker"), traceID]).1.contains("target app"))

        // The running broker saves each target's status every second.
        XCTAssertTrue(
            eventually(seconds: 5) {
                ((try? self.brokerCLI(["targets", "status", "--data-dir", self.dir.file("broker")]).1) ?? "").contains(
                    "ref\tclosed\tqueued 0")
            })
        let status = try brokerCLI(["targets", "status", "--data-dir", dir.file("broker")])
        XCTAssertEqual(status.0, 0, status.1)
        XCTAssertTrue(status.1.contains("supports patch"), status.1)
    }

    /// An account that already exists at the target (409 uniqueness) is
    /// looked up by userName, adopted and brought to the broker's state.
    func testConflictAdoptsTheExistingAccount() throws {
        let (_, refPort) = try startReferenceServer()
        let (pre, _) = try scim(
            refPort, "POST", "/Users", #"{"schemas":["\#(userSchema)"],"userName":"taken","title":"old"}"#,
            token: "ref-token", prefix: "")
        XCTAssertEqual(pre, 201)
        let (broker, bp) = try startBroker(yaml: "targets:\n" + referenceTarget("ref", port: refPort))
        let (_, dp) = try startAgent("de", cert: de, domain: "acme-de", brokerPort: bp)
        _ = try newUser(dp, "taken", extra: #","title":"new""#)
        _ = try newUser(dp, "fresh")
        XCTAssertTrue(
            eventually(seconds: 30) {
                let u = self.users(refPort, token: "ref-token", prefix: "")
                return u["taken"]?["title"] == "new" && u["fresh"] != nil
            }, "\(users(refPort, token: "ref-token", prefix: ""))")
        let u = users(refPort, token: "ref-token", prefix: "")
        XCTAssertEqual(u.count, 2, "adopted, not duplicated")
        let brokerID = try BrokerStore(path: dir.file("broker")).resources(domain: "acme-de").first { $0["userName"] == "taken" }?["id"]
        XCTAssertEqual(u["taken"]?["externalId"], brokerID, "the adopted account now carries the broker id")
        let metrics = try brokerMetrics(broker)
        XCTAssertEqual(metric(metrics, #"scim_broker_target_adopted_total{target="ref"}"#), 1, metrics)
        XCTAssertEqual(metric(metrics, #"scim_broker_target_requests_total{target="ref",method="POST",class="4xx"}"#), 1, metrics)
        XCTAssertEqual(metric(metrics, #"scim_broker_target_dead_letters_total{target="ref"}"#), 0)
    }

    /// A queued change whose resource cannot be read (its stored record is
    /// not JSON) is not taken for a deletion: it stays queued, is retried and
    /// counted, and arrives once the record reads again.
    func testAnUnreadableResourceStaysQueuedAndIsRetried() throws {
        let appPort = freeLoopbackPort()  // the target starts only once the record is broken
        let (broker, bp) = try startBroker(yaml: "targets:\n" + target("app", port: appPort))
        let (_, dp) = try startAgent("de", cert: de, domain: "acme-de", brokerPort: bp)
        let id = try newUser(dp, "fragile")
        let store = try BrokerStore(path: dir.file("broker"))
        XCTAssertTrue(eventually(seconds: 30) { (try? store.queueDepth(target: "app").count) == 1 }, "applied and queued")
        let resources = try store.environment.openDatabase("resources")
        let key = Array("acme-de/User/\(id)".utf8)
        let original = try XCTUnwrap(try store.environment.read { try $0.get(resources, key) })
        try store.environment.write { try $0.put(resources, key, Array(#"{"userName":"#.utf8)) }

        _ = try startAppAgent("app", port: appPort)
        XCTAssertTrue(
            eventually(seconds: 60) {
                (try? self.brokerMetrics(broker)).flatMap { self.metric($0, #"scim_broker_target_retries_total{target="app"}"#) } ?? 0 >= 1
            }, "the failed read is counted as a retry")
        XCTAssertEqual(try store.queueDepth(target: "app").count, 1, "the change is still queued")
        XCTAssertTrue(users(appPort, token: "t", prefix: "/scim/v2").isEmpty)

        try store.environment.write { try $0.put(resources, key, original) }
        XCTAssertTrue(
            eventually(seconds: 60) { self.users(appPort, token: "t", prefix: "/scim/v2")["fragile"] != nil },
            "delivered once the record reads")
        XCTAssertTrue(eventually(seconds: 10) { (try? store.queueDepth(target: "app").count) == 0 })
    }

    /// A target answering 429 with Retry-After is given that time before the
    /// next request, and everything still arrives once.
    func testTargetAnswering429IsGivenItsRetryAfter() throws {
        let (_, appPort) = try startAppAgent("app")
        let log = Locked<[(Double, Int)]>([])  // (time, status) of every write the proxy saw
        let throttle = Locked(3)
        let traceparents = Locked<[String]>([])
        let proxy = try ServerHarness { request, _, responder in
            let now = Date().timeIntervalSince1970
            if request.method == "POST", let t = request.headers["traceparent"] { traceparents.withLock { $0.append(t) } }
            if request.method != "GET",
                throttle.withLock({ n in
                    n -= 1; return n >= 0
                })
            {
                log.withLock { $0.append((now, 429)) }
                responder.respond(
                    HTTPResponse(
                        status: 429, headers: ["Retry-After": "1", "Content-Type": "application/scim+json"],
                        body: Array(#"{"schemas":["urn:ietf:params:scim:api:messages:2.0:Error"],"status":"429"}"#.utf8)))
                return
            }
            let r = forward(request, to: appPort)
            if request.method != "GET" { log.withLock { $0.append((now, r.status)) } }
            responder.respond(r)
        }
        defer { _ = proxy.stop() }
        let (broker, bp) = try startBroker(yaml: "targets:\n" + target("app", port: proxy.port))
        let (_, dp) = try startAgent("de", cert: de, domain: "acme-de", brokerPort: bp)
        for k in 0..<5 { _ = try newUser(dp, "user\(k)") }
        XCTAssertTrue(eventually(seconds: 30) { self.users(appPort, token: "t", prefix: "/scim/v2").count == 5 })
        // The proxy logs a write once its answer is back (the app may show the user a moment before).
        XCTAssertTrue(eventually(seconds: 5) { log.current.filter { $0.1 == 201 }.count >= 5 }, "\(log.current)")
        let seen = log.current
        XCTAssertEqual(seen.filter { $0.1 == 429 }.count, 3)
        // The Retry-After (1 s) reaches the worker: the creates come after it. (That
        // nothing comes sooner, to the millisecond, is `WorkerTests`', on a simulated clock.)
        let first = try XCTUnwrap(seen.first { $0.1 == 429 }?.0)
        XCTAssertTrue(seen.contains { $0.1 == 201 && $0.0 - first >= 0.9 }, "\(seen)")
        XCTAssertEqual(seen.filter { $0.1 == 201 }.count, 5, "each user created once: \(seen)")
        // W3C trace context: the IdP request's trace id reaches the target.
        let traces = traceparents.current
        XCTAssertEqual(traces.count, 8, "every POST carries a traceparent")
        for t in traces {
            let parts = t.split(separator: "-")
            XCTAssertEqual(parts.count, 4, t)
            XCTAssertEqual(parts.first, "00")
            XCTAssertEqual(parts[1].count, 32)
            XCTAssertEqual(parts[2].count, 16)
        }
        let store = try BrokerStore(path: dir.file("broker"))
        let sourceTraces = Set(try store.resources(domain: "acme-de").compactMap { $0[BrokerStore.sourceExtension]?["trace"]?.stringValue })
        XCTAssertEqual(Set(traces.map { String($0.split(separator: "-")[1]) }), sourceTraces, "the agent's trace ids, unchanged")
        let metrics = try brokerMetrics(broker)
        XCTAssertEqual(metric(metrics, #"scim_broker_target_throttled_total{target="app"}"#), 3, metrics)
        XCTAssertEqual(metric(metrics, #"scim_broker_target_requests_total{target="app",method="POST",class="4xx"}"#), 3, metrics)
    }

    /// A target behind TLS that requires a client certificate (mTLS): the
    /// broker presents the configured one and verifies the target against
    /// the configured CA; a target configured without a certificate gets no
    /// accounts and says why in its status.
    func testMutualTLSTarget() throws {
        let pkiDir = TempDirectory("edge-target-pki")  // its own CA, apart from the federation's
        defer { pkiDir.remove() }
        let pki = try TestPKI(in: pkiDir)
        let (_, appPort) = try startAppAgent("app")
        let peers = Locked<Set<String>>([])
        let proxy = try ServerHarness(tls: pki.serverConfig(crl: false, requireClient: true)) { request, context, responder in
            peers.withLock { $0.formUnion(context.peerIdentity?.names ?? []) }
            var forwarded = request
            forwarded.headers.set("Authorization", "Bearer t")
            responder.respond(forward(forwarded, to: appPort))
        }
        defer { _ = proxy.stop() }
        let (_, bp) = try startBroker(
            yaml: """
                targets:
                  - name: secure
                    url: https://localhost:\(proxy.port)/scim/v2
                    tls: {ca: \(pki.caFile), cert: \(pki.clientCert), key: \(pki.clientKey)}
                    routes: [{}]
                  - name: nocert
                    url: https://localhost:\(proxy.port)/scim/v2
                    tls: {ca: \(pki.caFile)}
                    routes: [{}]

                """)
        let (_, dp) = try startAgent("de", cert: de, domain: "acme-de", brokerPort: bp)
        _ = try newUser(dp, "over-mtls")
        XCTAssertTrue(
            eventually(seconds: 20) { self.users(appPort, token: "t", prefix: "/scim/v2")["over-mtls"] != nil },
            (try? brokerCLI(["targets", "status", "--data-dir", dir.file("broker")]).1) ?? "")
        XCTAssertTrue(peers.current.contains(pki.clientURI), "the broker presented its client certificate: \(peers.current)")
        XCTAssertTrue(
            eventually(seconds: 10) {
                let status = (try? self.brokerCLI(["targets", "status", "--data-dir", self.dir.file("broker")]).1) ?? ""
                return status.contains("secure\tclosed") && status.contains("nocert\tdiscovering") && status.contains("last error")
            }, (try? brokerCLI(["targets", "status", "--data-dir", dir.file("broker")]).1) ?? "")
    }

    /// A target that goes down: deliveries retry with backoff, the circuit
    /// breaker opens (visible in status and metrics), and everything arrives
    /// once it is back. The wiring, over a real process and socket; the
    /// breaker's threshold, cooldowns and probe are `WorkerTests`', on a
    /// simulated clock.
    func testTargetDownOpensTheBreakerThenEverythingArrives() throws {
        var (app, appPort) = try startAppAgent("app")
        let (broker, bp) = try startBroker(yaml: "targets:\n" + target("app", port: appPort, extra: "    breakerThreshold: 3"))
        let (_, dp) = try startAgent("de", cert: de, domain: "acme-de", brokerPort: bp)
        _ = try newUser(dp, "before")
        XCTAssertTrue(eventually(seconds: 20) { self.users(appPort, token: "t", prefix: "/scim/v2").count == 1 })
        app.signal(SIGKILL)
        _ = app.waitForExit()
        for k in 0..<6 { _ = try newUser(dp, "during\(k)") }
        XCTAssertTrue(
            eventually(seconds: 30) {
                (try? self.brokerMetrics(broker)).flatMap { self.metric($0, #"scim_broker_target_breaker_open{target="app"}"#) } == 1
            }, "the breaker opens after 3 consecutive failures")
        XCTAssertTrue(
            eventually(seconds: 5) {
                ((try? self.brokerCLI(["targets", "status", "--data-dir", self.dir.file("broker")]).1) ?? "").contains("breaker open")
            })
        let metrics = try brokerMetrics(broker)
        // The failures that opened it: requests without an answer (a refused
        // connect before a request is written counts toward the breaker, not here).
        XCTAssertGreaterThanOrEqual(
            metric(metrics, #"scim_broker_target_requests_total{target="app",method="POST",class="error"}"#) ?? 0, 1)
        (app, _) = try startAppAgent("app", port: appPort)
        XCTAssertTrue(
            eventually(seconds: 90) { self.users(appPort, token: "t", prefix: "/scim/v2").count == 7 },
            "\(users(appPort, token: "t", prefix: "/scim/v2").keys.sorted())")
        XCTAssertTrue(
            eventually(seconds: 5) {
                (try? self.brokerMetrics(broker)).flatMap { self.metric($0, #"scim_broker_target_breaker_open{target="app"}"#) } == 0
            })
    }

    /// A target removed from the configuration keeps its queue (shown as
    /// removed) until `targets forget` clears it; forget refuses a target
    /// that is still configured and leaves the other targets alone.
    func testForgetClearsWhatARemovedTargetLeftBehind() throws {
        // A port bound and never listened on: refused, and no other process can take it meanwhile.
        let (dead, gonePort) = boundLoopbackPort()
        defer { close(dead) }
        let (_, keptPort) = try startAppAgent("kept")
        let (broker, bp) = try startBroker(yaml: "targets:\n" + target("gone", port: gonePort) + target("kept", port: keptPort))
        let (_, dp) = try startAgent("de", cert: de, domain: "acme-de", brokerPort: bp)
        for k in 0..<4 { _ = try newUser(dp, "waiting\(k)") }
        let data = dir.file("broker")
        XCTAssertTrue(eventually(seconds: 30) { self.users(keptPort, token: "t", prefix: "/scim/v2").count == 4 })
        XCTAssertTrue(
            eventually(seconds: 20) {
                ((try? self.brokerCLI(["targets", "status", "--data-dir", data]).1) ?? "").contains("gone\t")
            }, (try? brokerCLI(["targets", "status", "--data-dir", data]).1) ?? "")
        let config = dir.file("broker.yaml")
        let refused = try brokerCLI(["targets", "forget", "--config", config, "gone"])
        XCTAssertNotEqual(refused.0, 0)
        XCTAssertTrue(refused.1.contains("gone is still a target in"), refused.1)
        XCTAssertNotEqual(try brokerCLI(["targets", "forget", "--data-dir", data, "gone"]).0, 0, "--config is required")

        broker.signal(SIGTERM)
        XCTAssertEqual(broker.waitForExit(seconds: 20), 0)
        let full = try String(contentsOfFile: config, encoding: .utf8)
        let without = dir.write(
            "without-gone.yaml", full.components(separatedBy: "targets:")[0] + "targets:\n" + target("kept", port: keptPort))
        let status = try brokerCLI(["targets", "status", "--config", without])
        let goneLine = status.1.split(separator: "\n").first { $0.hasPrefix("gone\t") } ?? ""
        XCTAssertTrue(goneLine.contains("queued 4") && goneLine.contains("REMOVED from the configuration"), status.1)
        XCTAssertFalse(status.1.split(separator: "\n").first { $0.hasPrefix("kept\t") }?.contains("REMOVED") ?? true, status.1)

        let forgot = try brokerCLI(["targets", "forget", "--config", without, "gone"])
        XCTAssertEqual(forgot.0, 0, forgot.1)
        XCTAssertTrue(forgot.1.hasPrefix("gone: forgot 4 queued changes, 0 account mappings, 0 dead letters"), forgot.1)
        let after = try brokerCLI(["targets", "status", "--config", without]).1
        XCTAssertFalse(after.contains("gone\t"), after)
        XCTAssertTrue(after.contains("kept\t"), after)
        XCTAssertEqual(try BrokerStore(path: data).queueDepth(target: "gone").count, 0)
        XCTAssertEqual(try BrokerStore(path: data).mappings(target: "kept").count, 4, "the other target's state is untouched")
        let again = try brokerCLI(["targets", "forget", "--config", without, "gone"])
        XCTAssertEqual(again.0, 1, again.1)
        XCTAssertTrue(again.1.contains("nothing stored for a target named 'gone' (with stored state: kept)"), again.1)
    }

    /// A 400 from the target becomes a dead letter holding the request, the
    /// status and the response; the other resources keep flowing; the CLI
    /// lists, retries and drops it.
    func testRefusedChangeBecomesADeadLetterAndOthersFlow() throws {
        let (_, appPort) = try startAppAgent("app")
        let (_, bp) = try startBroker(yaml: "targets:\n" + target("app", port: appPort, extra: Self.refusesNickNames))
        let (_, dp) = try startAgent("de", cert: de, domain: "acme-de", brokerPort: bp)
        _ = try newUser(dp, "ok1")
        _ = try newUser(dp, "refused", extra: #","nickName":"nick""#)
        _ = try newUser(dp, "ok2")
        XCTAssertTrue(eventually(seconds: 20) { self.users(appPort, token: "t", prefix: "/scim/v2").count == 2 })
        let data = dir.file("broker")
        XCTAssertTrue(
            eventually(seconds: 10) { ((try? self.brokerCLI(["deadletter", "list", "--data-dir", data]).1) ?? "").contains("POST") })
        let list = try brokerCLI(["deadletter", "list", "--data-dir", data])
        XCTAssertEqual(list.0, 0)
        XCTAssertTrue(list.1.contains("app\t#1"), list.1)
        XCTAssertTrue(list.1.contains("POST /scim/v2/Users → 400"), list.1)
        XCTAssertTrue(list.1.contains(#""bogusAttribute":"nick""#), "the request is kept: \(list.1)")
        XCTAssertTrue(list.1.contains("invalidSyntax") && list.1.contains("bogusAttribute"), "the response is kept: \(list.1)")
        let json = try brokerCLI(["deadletter", "list", "--data-dir", data, "--json"])
        let letter = try JSONParser.parse(Array(json.1.split(separator: "\n")[0].utf8))
        XCTAssertEqual(letter["status"], 400)
        XCTAssertEqual(letter["method"], "POST")
        // Retry: it is delivered again, refused again, and dead-lettered again (once).
        XCTAssertTrue(try brokerCLI(["deadletter", "retry", "--data-dir", data, "app"]).1.hasPrefix("1 queued again"))
        XCTAssertTrue(
            eventually(seconds: 10) { ((try? self.brokerCLI(["deadletter", "list", "--data-dir", data]).1) ?? "").contains("app\t#2") })
        XCTAssertEqual(try BrokerStore(path: data).deadLetters(target: "app").count, 1)
        XCTAssertTrue(try brokerCLI(["deadletter", "drop", "--data-dir", data, "app", "2"]).1.hasPrefix("1 dropped"))
        XCTAssertEqual(try BrokerStore(path: data).deadLetters(target: "app").count, 0)
        XCTAssertEqual(users(appPort, token: "t", prefix: "/scim/v2").count, 2)
    }

    /// An agent target with `maxDeletes: 2` and `users` users (named
    /// `prefix` and a number), the first `deleting` of them deleted at the
    /// source: two removals pass and the guard holds the rest.
    func tripDeletionGuard(users count: Int = 5, deleting: Int? = nil, prefix: String = "leaver") throws -> (
        broker: ChildProcess, appPort: Int, agentPort: Int, ids: [String]
    ) {
        let (_, appPort) = try startAppAgent("app")
        let (broker, bp) = try startBroker(
            yaml: "targets:\n"
                + target(
                    "app", port: appPort,
                    extra: """
                            onRemove: delete
                            deleteGuard: {maxDeletes: 2, windowSeconds: 600}
                        """))
        let (_, dp) = try startAgent("de", cert: de, domain: "acme-de", brokerPort: bp)
        var ids: [String] = []
        for k in 0..<count { ids.append(try newUser(dp, "\(prefix)\(k)")) }
        XCTAssertTrue(eventually(seconds: 20) { self.users(appPort, token: "t", prefix: "/scim/v2").count == count })
        for id in ids.prefix(deleting ?? count) { XCTAssertEqual(try idp(dp, "DELETE", "/Users/\(id)").0, 204) }
        XCTAssertTrue(
            eventually(seconds: 20) {
                (try? self.brokerMetrics(broker)).flatMap { self.metric($0, #"scim_broker_target_deletes_paused{target="app"}"#) } == 1
            })
        XCTAssertTrue(eventually(seconds: 5) { self.users(appPort, token: "t", prefix: "/scim/v2").count == count - 2 })
        return (broker, appPort, dp, ids)
    }

    /// More than maxDeletes removals within the window pause the target's
    /// removals until `targets confirm-deletes`.
    func testDeletionGuardHoldsMassDeletesUntilConfirmed() throws {
        let (broker, appPort, _, _) = try tripDeletionGuard()
        // The positive signal first: three removals are listed as held, so none of them can pass any more.
        XCTAssertTrue(
            eventually(seconds: 10) {
                ((try? self.brokerCLI(["targets", "held", "--data-dir", self.dir.file("broker"), "app"]).1) ?? "")
                    .split(separator: "\n").filter { $0.hasPrefix("#") }.count == 3
            })
        XCTAssertEqual(users(appPort, token: "t", prefix: "/scim/v2").count, 3, "two deletes passed, three are held")
        XCTAssertTrue(
            eventually(seconds: 5) {
                ((try? self.brokerCLI(["targets", "status", "--data-dir", self.dir.file("broker")]).1) ?? "").contains("deletes PAUSED")
            })
        let confirm = try brokerCLI(["targets", "confirm-deletes", "--data-dir", dir.file("broker"), "app"])
        XCTAssertEqual(confirm.0, 0, confirm.1)
        XCTAssertTrue(eventually(seconds: 10) { self.users(appPort, token: "t", prefix: "/scim/v2").isEmpty })
        XCTAssertTrue(
            eventually(seconds: 5) {
                (try? self.brokerMetrics(broker)).flatMap { self.metric($0, #"scim_broker_target_deletes_paused{target="app"}"#) } == 0
            })
    }

    /// The removals the guard holds are listed with their
    /// userNames (the users are gone from the directory); `trace` says a
    /// held delete is held; one rejected removal never reaches the target
    /// (although the worker had it loaded) and its trail says so; the rest
    /// are confirmed and delivered; unknown target names are refused.
    func testHeldDeletionsAreListedAndCanBeRejected() throws {
        let (broker, appPort, _, _) = try tripDeletionGuard()
        let data = dir.file("broker"), config = dir.file("broker.yaml")
        func cli(_ args: [String]) -> (Int32, String) { (try? brokerCLI(args)) ?? (-1, "") }
        let remaining = Set(users(appPort, token: "t", prefix: "/scim/v2").keys)

        // held: one line per held removal, named although the directory no longer has the users.
        XCTAssertTrue(
            eventually(seconds: 5) { cli(["targets", "held", "--data-dir", data, "app"]).1.contains("3 removals held") },
            cli(["targets", "held", "--data-dir", data, "app"]).1)
        let held = cli(["targets", "held", "--config", config, "app"])
        XCTAssertEqual(held.0, 0, held.1)
        let lines = held.1.split(separator: "\n").filter { $0.hasPrefix("#") }
        XCTAssertEqual(lines.count, 3, held.1)
        for name in remaining { XCTAssertEqual(lines.filter { $0.contains("\tuserName \(name)\t") }.count, 1, held.1) }
        XCTAssertTrue(lines.allSatisfy { $0.contains("remove User ") && $0.contains("\tdomain acme-de\t") }, held.1)
        let docs = try cli(["targets", "held", "--data-dir", data, "app", "--json"]).1.split(separator: "\n")
            .map { try JSONParser.parse(Array($0.utf8)) }
        XCTAssertEqual(Set(docs.compactMap { $0["userName"]?.stringValue }), remaining)
        let first = try XCTUnwrap(docs.first)
        let rejectedName = try XCTUnwrap(first["userName"]?.stringValue)
        let rejectedSeq = try XCTUnwrap(first["seq"]?.numberValue?.integer)
        let rejectedID = try XCTUnwrap(first["id"]?.stringValue)
        let rejectedTrace = try XCTUnwrap(first["trace"]?.stringValue)
        XCTAssertFalse(rejectedTrace.isEmpty)
        XCTAssertEqual(first["domain"]?.stringValue, "acme-de")

        // trace of a held delete (by its trace id and by broker id) says it is held.
        for id in [rejectedTrace, rejectedID] {
            let trace = cli(["trace", "--data-dir", data, id])
            XCTAssertEqual(trace.0, 0, trace.1)
            XCTAssertTrue(trace.1.contains("held by the deletion guard of target app since "), trace.1)
        }

        // Unknown names and sequences are refused, changing nothing.
        let unknown = cli(["targets", "confirm-deletes", "--data-dir", data, "nosuch"])
        XCTAssertEqual(unknown.0, 1, unknown.1)
        XCTAssertTrue(unknown.1.contains("no target named 'nosuch' (with stored state: app;"), unknown.1)
        let unknownConfigured = cli(["targets", "confirm-deletes", "--config", config, "nosuch"])
        XCTAssertEqual(unknownConfigured.0, 1, unknownConfigured.1)
        XCTAssertTrue(unknownConfigured.1.contains("no target named 'nosuch' (configured: app)"), unknownConfigured.1)
        for command in [["targets", "held"], ["targets", "reject-deletes"]] {
            let r = cli(command + ["--data-dir", data, "nosuch"])
            XCTAssertEqual(r.0, 1, "\(command): \(r.1)")
            XCTAssertTrue(r.1.contains("no target named 'nosuch'"), r.1)
        }
        let notHeld = cli(["targets", "reject-deletes", "--data-dir", data, "app", "\(rejectedSeq)", "999999"])
        XCTAssertEqual(notHeld.0, 1, notHeld.1)
        XCTAssertTrue(notHeld.1.contains("#999999 is not held by the deletion guard"), notHeld.1)
        XCTAssertEqual(cli(["targets", "held", "--data-dir", data, "app"]).1.split(separator: "\n").filter { $0.hasPrefix("#") }.count, 3)

        // Reject one, then confirm at once (the worker may not have seen the rejection yet).
        let reject = cli(["targets", "reject-deletes", "--data-dir", data, "app", "#\(rejectedSeq)"])
        XCTAssertEqual(reject.0, 0, reject.1)
        XCTAssertTrue(reject.1.contains("rejected #\(rejectedSeq)\tremove User \(rejectedID)\tuserName \(rejectedName)\t"), reject.1)
        XCTAssertTrue(reject.1.contains("app: 1 held removal rejected; 2 still held"), reject.1)
        let stillHeld = cli(["targets", "held", "--data-dir", data, "app"]).1
        XCTAssertTrue(stillHeld.contains("2 removals held") && !stillHeld.contains("userName \(rejectedName)\t"), stillHeld)
        let confirm = cli(["targets", "confirm-deletes", "--data-dir", data, "app"])
        XCTAssertEqual(confirm.0, 0, confirm.1)
        XCTAssertTrue(
            eventually(seconds: 10) { Set(self.users(appPort, token: "t", prefix: "/scim/v2").keys) == [rejectedName] },
            "\(users(appPort, token: "t", prefix: "/scim/v2").keys)")
        XCTAssertTrue(
            eventually(seconds: 5) {
                (try? self.brokerMetrics(broker)).flatMap { self.metric($0, #"scim_broker_target_deletes_paused{target="app"}"#) } == 0
            })
        XCTAssertTrue(
            eventually(seconds: 15) {
                let status = cli(["targets", "status", "--data-dir", data]).1
                return status.contains("queued 0") && status.contains("deletes flowing") && status.contains("delivered 9")
            }, cli(["targets", "status", "--data-dir", data]).1)
        XCTAssertEqual(Set(users(appPort, token: "t", prefix: "/scim/v2").keys), [rejectedName], "the rejected delete was never sent")

        let trace = cli(["trace", "--data-dir", data, rejectedTrace])
        XCTAssertEqual(trace.0, 0, trace.1)
        XCTAssertTrue(trace.1.contains("target app\tevent remove detail rejected by the operator: the deletion guard held it"), trace.1)
        XCTAssertFalse(trace.1.contains("held by the deletion guard of target"), trace.1)
        XCTAssertFalse(trace.1.contains("DELETE"), trace.1)
        XCTAssertTrue(cli(["targets", "held", "--data-dir", data, "app"]).1.contains("holds nothing"))
    }

    /// Rejecting every held removal lifts the pause, and removals queued
    /// after it are counted by the guard afresh.
    func testRejectingAllHeldDeletionsResumesTheTarget() throws {
        let (_, appPort, dp, ids) = try tripDeletionGuard(users: 7, deleting: 4, prefix: "user")
        let data = dir.file("broker")
        func cli(_ args: [String]) -> (Int32, String) { (try? brokerCLI(args)) ?? (-1, "") }
        func heldCount() -> Int {
            cli(["targets", "held", "--data-dir", data, "app"]).1.split(separator: "\n").filter { $0.hasPrefix("#") }.count
        }
        XCTAssertTrue(eventually(seconds: 20) { heldCount() == 2 }, cli(["targets", "held", "--data-dir", data, "app"]).1)
        XCTAssertEqual(users(appPort, token: "t", prefix: "/scim/v2").count, 5)
        let reject = cli(["targets", "reject-deletes", "--data-dir", data, "app"])
        XCTAssertEqual(reject.0, 0, reject.1)
        XCTAssertTrue(reject.1.contains("app: 2 held removals rejected; nothing held any more: removals resume"), reject.1)
        XCTAssertTrue(eventually(seconds: 10) { cli(["targets", "status", "--data-dir", data]).1.contains("deletes flowing") })
        // Counted afresh: two pass, the third is held again.
        for id in ids[4..<7] { XCTAssertEqual(try idp(dp, "DELETE", "/Users/\(id)").0, 204) }
        XCTAssertTrue(eventually(seconds: 20) { heldCount() == 1 }, cli(["targets", "held", "--data-dir", data, "app"]).1)
        XCTAssertTrue(eventually(seconds: 10) { self.users(appPort, token: "t", prefix: "/scim/v2").count == 3 })
        let kept = Set(users(appPort, token: "t", prefix: "/scim/v2").keys)
        XCTAssertEqual(kept.filter { ["user0", "user1", "user2", "user3"].contains($0) }.count, 2, "the rejected stay: \(kept)")
        XCTAssertEqual(kept.filter { ["user4", "user5", "user6"].contains($0) }.count, 1, "one held again: \(kept)")
    }

    /// Reconciliation finds missing, drifted and stray accounts (and leaves
    /// foreign ones alone); --apply queues the fixes and a second pass is clean.
    func testReconcileFindsMissingDriftedAndStrayAccountsAndFixesThem() throws {
        let (_, refPort) = try startReferenceServer()
        let ref = referenceTarget("ref", port: refPort, extra: "    onRemove: delete")
        var (broker, bp) = try startBroker(yaml: "targets:\n" + ref)
        let (_, dp) = try startAgent("de", cert: de, domain: "acme-de", brokerPort: bp)
        for name in ["gone", "tampered", "fine", "leaves-route"] { _ = try newUser(dp, name, extra: #","title":"Staff""#) }
        XCTAssertTrue(eventually(seconds: 20) { self.users(refPort, token: "ref-token", prefix: "").count == 4 })
        var at = users(refPort, token: "ref-token", prefix: "")
        // Someone changes the target behind the broker's back.
        XCTAssertEqual(try scim(refPort, "DELETE", "/Users/\(at["gone"]!["id"]!.stringValue!)", token: "ref-token", prefix: "").0, 204)
        XCTAssertEqual(
            try scim(
                refPort, "PATCH", "/Users/\(at["tampered"]!["id"]!.stringValue!)",
                #"{"schemas":["urn:ietf:params:scim:api:messages:2.0:PatchOp"],"Operations":[{"op":"replace","path":"title","value":"Hacked"}]}"#,
                token: "ref-token", prefix: ""
            ).0 / 100, 2)
        XCTAssertEqual(
            try scim(
                refPort, "POST", "/Users", #"{"schemas":["\#(userSchema)"],"userName":"local-admin"}"#,
                token: "ref-token", prefix: ""
            ).0, 201)
        // The routes change: "leaves-route" is no longer wanted there.
        broker.signal(SIGTERM)
        XCTAssertEqual(broker.waitForExit(), 0)
        (broker, _) = try startBroker(
            yaml: "targets:\n"
                + ref.replacing(
                    "routes: [{domains: [acme-de]}]",
                    with: #"routes: [{types: [User], filter: 'userName ne "leaves-route"'}, {types: [Group]}]"#),
            port: bp)
        let config = dir.file("broker.yaml")
        let r = try reconcileReport("ref")
        XCTAssertEqual(r["missing"]?.arrayValue?.count, 1, "\(r)")
        XCTAssertEqual(r["drifted"]?.arrayValue?.first?["attributes"], ["title"], "\(r)")
        XCTAssertEqual(r["strays"]?.arrayValue?.count, 1, "\(r)")
        XCTAssertEqual(r["foreign"], 1, "local-admin was not created by the broker")
        XCTAssertEqual(r["expected"], 3)
        let text = try brokerCLI(["targets", "reconcile", "--config", config, "ref"])
        XCTAssertTrue(
            text.1.hasPrefix("ref: 3 expected, 4 at the target: 1 missing, 1 drifted, 1 strays, 1 not created by the broker"), text.1)

        let applied = try brokerCLI(["targets", "reconcile", "--config", config, "ref", "--apply"])
        XCTAssertTrue(applied.1.contains("3 fixes queued"), applied.1)
        XCTAssertTrue(
            eventually(seconds: 20) {
                let u = self.users(refPort, token: "ref-token", prefix: "")
                return u["gone"] != nil && u["tampered"]?["title"] == "Staff" && u["leaves-route"]?["active"] == .bool(false)
            }, "\(users(refPort, token: "ref-token", prefix: ""))")
        at = users(refPort, token: "ref-token", prefix: "")
        XCTAssertEqual(at.count, 5)
        XCTAssertNotNil(at["local-admin"], "foreign accounts are left alone")
        let again = try JSONParser.parse(Array(try brokerCLI(["targets", "reconcile", "--config", config, "ref", "--json"]).1.utf8))
        XCTAssertEqual(again["missing"]?.arrayValue?.count, 0)
        XCTAssertEqual(again["drifted"]?.arrayValue?.count, 0)
        XCTAssertEqual(again["strays"]?.arrayValue?.count, 0, "deactivated strays are settled")
    }

    /// A target without PATCH: deactivating an account whose last body the
    /// broker does not know (a stray found by reconciliation) reads it first,
    /// so the PUT keeps its attributes instead of wiping them.
    func testDeactivationWithoutPatchKeepsTheAccountsAttributes() throws {
        let spc = dir.write(
            "spc.json",
            #"{"schemas":["urn:ietf:params:scim:schemas:core:2.0:ServiceProviderConfig"],"patch":{"supported":false},"bulk":{"supported":false,"maxOperations":0,"maxPayloadSize":0},"filter":{"supported":true,"maxResults":1000},"changePassword":{"supported":false},"sort":{"supported":false},"etag":{"supported":false},"authenticationSchemes":[]}"#
        )
        let (_, refPort) = try startReferenceServer(arguments: ["--service-provider-config", spc])
        let ref = referenceTarget("ref", port: refPort, extra: "    onRemove: deactivate")
        var (broker, bp) = try startBroker(yaml: "targets:\n" + ref)
        let (_, dp) = try startAgent("de", cert: de, domain: "acme-de", brokerPort: bp)
        _ = try newUser(dp, "stays", extra: #","title":"Staff""#)
        _ = try newUser(dp, "leaves", extra: #","title":"Staff","name":{"givenName":"Lea","familyName":"Ves"}"#)
        XCTAssertTrue(eventually(seconds: 20) { self.users(refPort, token: "ref-token", prefix: "").count == 2 })
        broker.signal(SIGTERM)
        XCTAssertEqual(broker.waitForExit(), 0)
        (broker, _) = try startBroker(
            yaml: "targets:\n"
                + ref.replacing(
                    "routes: [{domains: [acme-de]}]",
                    with: #"routes: [{types: [User], filter: 'userName ne "leaves"'}]"#),
            port: bp)
        let applied = try brokerCLI(["targets", "reconcile", "--config", dir.file("broker.yaml"), "ref", "--apply"])
        XCTAssertTrue(applied.1.contains("1 strays") && applied.1.contains("1 fixes queued"), applied.1)
        XCTAssertTrue(
            eventually(seconds: 20) {
                self.users(refPort, token: "ref-token", prefix: "")["leaves"]?["active"] == .bool(false)
            }, "\(users(refPort, token: "ref-token", prefix: ""))")
        let leaves = users(refPort, token: "ref-token", prefix: "")["leaves"]
        XCTAssertEqual(leaves?["title"], "Staff", "a PUT of the account read back, not of {active: false} alone")
        XCTAssertEqual(leaves?["name"]?["givenName"], "Lea")
        XCTAssertEqual(try BrokerStore(path: dir.file("broker")).deadLetters(target: "ref").count, 0)
        let metrics = try brokerMetrics(broker)
        XCTAssertGreaterThanOrEqual(metric(metrics, #"scim_broker_target_requests_total{target="ref",method="GET",class="2xx"}"#) ?? 0, 1)
        XCTAssertEqual(
            metric(metrics, #"scim_broker_target_requests_total{target="ref",method="PATCH",class="2xx"}"#), nil, "no PATCH sent")
    }

    /// The broker SIGKILLed while delivering: after a restart everything
    /// arrives, and no account exists twice (groups have no unique name, so
    /// a repeated POST would show).
    func testBrokerKilledMidDeliveryLosesNothingAndDuplicatesNothing() throws {
        let (_, refPort) = try startReferenceServer()
        // A slow target (20 requests/s: 160 items take 8 s) so that the kill lands mid-delivery on a loaded machine too.
        let yaml =
            "targets:\n"
            + referenceTarget("ref", port: refPort).replacing(
                "{requestsPerSecond: 2000, concurrency: 4}",
                with: "{requestsPerSecond: 20, concurrency: 2}")
        var (broker, bp) = try startBroker(yaml: yaml)
        let (_, dp) = try startAgent("de", cert: de, domain: "acme-de", brokerPort: bp)
        let users = 120, groupCount = 40
        for k in 0..<users { _ = try newUser(dp, "u\(k)") }
        for k in 0..<groupCount {
            XCTAssertEqual(try idp(dp, "POST", "/Groups", #"{"schemas":["\#(groupSchema)"],"displayName":"g\#(k)"}"#).0, 201)
        }
        XCTAssertTrue(eventually(seconds: 30) { self.users(refPort, token: "ref-token", prefix: "").count >= 20 })
        broker.signal(SIGKILL)
        _ = broker.waitForExit()
        let before = self.users(refPort, token: "ref-token", prefix: "").count
        XCTAssertLessThan(before, users, "killed mid-delivery")
        (broker, _) = try startBroker(yaml: yaml, port: bp)
        XCTAssertTrue(
            eventually(seconds: 90) {
                self.users(refPort, token: "ref-token", prefix: "").count == users
                    && self.groups(refPort, token: "ref-token", prefix: "").count == groupCount
            },
            "killed with \(before) users delivered; now \(self.users(refPort, token: "ref-token", prefix: "").count) users, \(groups(refPort, token: "ref-token", prefix: "").count) groups"
        )
        let (_, all) = try scim(refPort, "GET", "/Groups?count=1000", token: "ref-token", prefix: "")
        XCTAssertEqual(all?["totalResults"], .int(groupCount), "no group twice")
        let store = try BrokerStore(path: dir.file("broker"))
        let expected = Set(try store.resources(domain: "acme-de").compactMap { $0["id"]?.stringValue })
        let external =
            self.users(refPort, token: "ref-token", prefix: "").values.compactMap { $0["externalId"]?.stringValue }
            + (all?["Resources"]?.arrayValue ?? []).compactMap { $0["externalId"]?.stringValue }
        XCTAssertEqual(Set(external), expected, "every account carries its broker id")
        XCTAssertEqual(external.count, users + groupCount)
    }

    /// `scim-edge bench --e2e-metrics`: load at an agent, propagation read
    /// from the broker afterwards (agent → broker and → each target).
    func testBenchEndToEndModeReportsPropagation() throws {
        let (_, appPort) = try startAppAgent("app")
        let (broker, bp) = try startBroker(yaml: "targets:\n" + target("app", port: appPort))
        let (_, dp) = try startAgent("de", cert: de, domain: "acme-de", brokerPort: bp)
        let line = try XCTUnwrap(broker.waitForLine("operations at"))
        let metricsURL = String(line.split(separator: " ").last!)
        let c = try ChildProcess(
            productsDirectory + "/scim-edge",
            [
                "bench", "--url", "http://127.0.0.1:\(dp)/scim/v2", "--token", "t", "--requests", "300", "--connections", "8",
                "--json", "--quiet", "--e2e-metrics", metricsURL, "--settle", "1.5",
            ])
        XCTAssertEqual(c.waitForExit(seconds: 60), 0, "\(c.output)")
        let r = try JSONParser.parse(Array(c.output.joined(separator: "\n").utf8))
        XCTAssertEqual(r["status"]?["201"], 300)
        let p = try XCTUnwrap(r["propagationMs"]?.objectValue, "\(r)")
        XCTAssertNotNil(p["propagation{quantile=\"0.99\"}"], "\(p)")
        let target = try XCTUnwrap(p["target_propagation{target=\"app\",quantile=\"0.99\"}"]?.numberValue?.double, "\(p)")
        XCTAssertGreaterThan(target, 0)
        // The bench waited `--settle` before reading the metrics; the last deliveries may still be on their way on a busy machine.
        XCTAssertTrue(
            eventually(seconds: 30) { self.users(appPort, token: "t", prefix: "/scim/v2").count == 300 },
            "everything reached the target: \(users(appPort, token: "t", prefix: "/scim/v2").count) of 300")
    }
}

/// Forwards one request to 127.0.0.1:`port` over a blocking connection (test proxy).
func forward(_ request: HTTPRequest, to port: Int) -> HTTPResponse {
    guard let c = try? RawClient(port: port) else { return HTTPResponse(status: 502) }
    var head = "\(request.method) \(request.target) HTTP/1.1\r\n"
    for (n, v) in request.headers where n.lowercased() != "connection" && n.lowercased() != "content-length" { head += "\(n): \(v)\r\n" }
    head += "Connection: close\r\nContent-Length: \(request.body.count)\r\n\r\n"
    c.send(Array(head.utf8) + request.body)
    guard let r = c.readResponses(1).first else { return HTTPResponse(status: 502) }
    var headers = HTTPHeaders()
    for line in r.head.split(separator: "\r\n").dropFirst() {
        guard let colon = line.firstIndex(of: ":") else { continue }
        let name = String(line[..<colon])
        if ["content-type", "etag", "location", "retry-after"].contains(name.lowercased()) {
            headers.set(name, String(line[line.index(after: colon)...]).trimmingCharacters(in: .whitespaces))
        }
    }
    return HTTPResponse(status: r.status, headers: headers, body: Array(r.body.utf8))
}
