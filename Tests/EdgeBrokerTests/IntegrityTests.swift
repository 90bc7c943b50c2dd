import EdgeAgent
import EdgeBroker
import EdgeHTTP
import EdgeTLS
import EdgeTestSupport
import Foundation
import SCIM
import XCTest

/// Trust across domains with real processes, certificates made here and
/// real LMDB files: who a certificate is, agent stores that are new or
/// doubled, brokers that lie, and events no broker takes in one batch.
final class IntegrityTests: FederationTestCase {
    func brokerResources(_ domain: String) -> Int {
        (try? BrokerStore(path: dir.file("broker")).resourceCount(domain: domain)) ?? -1
    }

    func metricValue(_ text: String, _ name: String) -> Double? {
        text.split(separator: "\n").first { $0.hasPrefix(name + " ") }.flatMap { Double($0.split(separator: " ").last!) }
    }

    func issue(_ name: String, _ request: CertificateRequest) throws -> (String, String) {
        let c = try authority.issue(request)
        return (dir.write("\(name).crt", c.certificatePEM), dir.write("\(name).key", c.privateKeyPEM))
    }

    // MARK: certificate identity

    /// A CA-signed certificate whose SAN URI is unbound but whose subject CN
    /// spells acme-de's bound identity is not acme-de's agent; neither is a
    /// certificate with only that CN; one naming two bound identities is
    /// refused as ambiguous. Nothing of theirs is applied, and acme-de's
    /// sequence stays where its real agent left it.
    func testSubjectCNNeverBindsAndTwoBindingsAreRefused() throws {
        let cnSpoof = try issue("cn-spoof", CertificateRequest(commonName: deID, uris: ["spiffe://scim-edge.test/beta/agent/7"]))
        let cnOnly = try issue("cn-only", CertificateRequest(commonName: deID))
        let both = try issue("both", CertificateRequest(commonName: "agent-both", uris: [deID, usID]))
        let (broker, bp) = try startBroker()
        let (_, dp) = try startAgent("de", cert: de, domain: "acme-de", brokerPort: bp)
        for k in 0..<3 { XCTAssertEqual(try create(dp, "real-\(k)"), 201) }
        XCTAssertTrue(eventually(seconds: 20) { self.applied()["acme-de/\(self.deID)"] == 3 }, "\(applied())")

        let (_, sp) = try startAgent("spoof", cert: cnSpoof, domain: "acme-de", brokerPort: bp)
        let (_, op) = try startAgent("cnonly", cert: cnOnly, domain: "acme-de", brokerPort: bp)
        let (_, bothPort) = try startAgent("both", cert: both, domain: "acme-de", brokerPort: bp)
        for k in 0..<2 {
            XCTAssertEqual(try create(sp, "spoofed-\(k)"), 201)
            XCTAssertEqual(try create(op, "cn-only-\(k)"), 201)
            XCTAssertEqual(try create(bothPort, "both-\(k)"), 201)
        }
        // The positive signal first: all three were refused (and counted), then nothing moved.
        XCTAssertTrue(
            eventually(seconds: 20) {
                guard let m = try? self.brokerMetrics(broker) else { return false }
                return (self.metricValue(m, #"scim_broker_refused_total{reason="unknown_agent"}"#) ?? 0) >= 2
                    && (self.metricValue(m, #"scim_broker_refused_total{reason="ambiguous_identity"}"#) ?? 0) >= 1
            }, (try? brokerMetrics(broker)) ?? "")
        XCTAssertTrue(
            eventually(seconds: 5) { broker.output.contains { $0.contains("certificate matches more than one binding") } },
            "\(broker.output)")
        XCTAssertEqual(applied(), ["acme-de/\(deID)": 3], "acme-de's sequence is untouched; nothing applied for the others")
        XCTAssertEqual(brokerResources("acme-de"), 3)
        XCTAssertEqual(brokerResources("acme-us"), 0)
        XCTAssertEqual(try outboxEvents("spoof"), 2, "refused events stay in the outbox")
        XCTAssertEqual(try outboxEvents("both"), 2)
    }

    // MARK: store epochs

    /// An appliance re-imaged with an empty data directory and its old
    /// certificate: its new events start at sequence 1 again, and every one
    /// of them arrives (they are not taken for duplicates of the old store's).
    func testReimagedAgentLosesNothing() throws {
        let (_, bp) = try startBroker()
        var (agent, dp) = try startAgent("de", cert: de, domain: "acme-de", brokerPort: bp)
        for k in 0..<20 { XCTAssertEqual(try create(dp, "before-\(k)"), 201) }
        XCTAssertTrue(eventually(seconds: 20) { self.brokerResources("acme-de") == 20 })
        let oldEpoch = try AgentStore(path: dir.file("de"), registry: .standard).epoch
        agent.signal(SIGKILL)
        _ = agent.waitForExit()
        try FileManager.default.removeItem(atPath: dir.file("de"))
        (agent, dp) = try startAgent("de", cert: de, domain: "acme-de", brokerPort: bp)
        for k in 0..<20 { XCTAssertEqual(try create(dp, "after-\(k)"), 201) }
        XCTAssertTrue(
            eventually(seconds: 20) { self.brokerResources("acme-de") == 40 },
            "20 of 20 new creates reach the broker: \(brokerResources("acme-de"))")
        XCTAssertTrue(eventually(seconds: 10) { (try? self.outboxEvents("de")) == 0 })
        let newEpoch = try AgentStore(path: dir.file("de"), registry: .standard).epoch
        XCTAssertNotEqual(oldEpoch, newEpoch)
        XCTAssertEqual(oldEpoch.count, 32)
        let sequences = try BrokerStore(path: dir.file("broker")).agentSequences()
        XCTAssertEqual(Set(sequences.map(\.agent.epoch)), [oldEpoch, newEpoch])
        XCTAssertTrue(sequences.allSatisfy { $0.sequence == 20 && $0.agent.identity == deID }, "\(sequences)")
    }

    /// Two agents running at once with one certificate: each store has its
    /// own epoch, so each is applied in its own order and none of either's
    /// events is acknowledged as the other's.
    func testTwoAgentsWithOneCertificateAreBothApplied() throws {
        let (_, bp) = try startBroker()
        let (_, p1) = try startAgent("de-a", cert: de, domain: "acme-de", brokerPort: bp)
        let (_, p2) = try startAgent("de-b", cert: de, domain: "acme-de", brokerPort: bp)
        let group = DispatchGroup()
        let statuses = Locked<[Int]>([])
        for (port, name) in [(p1, "a"), (p2, "b")] {
            DispatchQueue.global().async(group: group) {
                for k in 0..<75 { let s = (try? createUser(port, "\(name)-\(k)")) ?? 0; statuses.withLock { $0.append(s) } }
            }
        }
        XCTAssertEqual(group.wait(timeout: .now() + 60), .success)
        XCTAssertEqual(statuses.current.filter { $0 == 201 }.count, 150)
        XCTAssertTrue(
            eventually(seconds: 30) { self.brokerResources("acme-de") == 150 },
            "150 accepted, \(brokerResources("acme-de")) at the broker")
        XCTAssertEqual(applied()["acme-de/\(deID)"], 150, "two sequences of 75")
    }

    // MARK: a broker that lies

    /// A broker (a fixture) that acknowledges far more than the agent sent:
    /// the agent logs and counts a protocol error, resets the connection and
    /// skips nothing: every event reaches the fixture.
    func testOverAcknowledgementIsAProtocolErrorAndSkipsNothing() throws {
        let fake = try FakeBroker(
            tls: TLSConfiguration(certificateChainFile: broker.0, privateKeyFile: broker.1, trustRootsFile: ca),
            overAcknowledgeFirst: true)
        defer { _ = fake.harness.stop() }
        let (agent, dp) = try startAgent("de", cert: de, domain: "acme-de", brokerPort: fake.harness.port)
        for k in 0..<10 { XCTAssertEqual(try create(dp, "u\(k)"), 201) }
        XCTAssertTrue(eventually(seconds: 20) { agent.output.contains { $0.contains("protocol error") } }, "\(agent.output)")
        for k in 10..<20 { XCTAssertEqual(try create(dp, "u\(k)"), 201) }
        XCTAssertTrue(
            eventually(seconds: 30) { fake.state.current.applied == 20 }, "the fixture got \(fake.state.current.applied): \(agent.output)")
        XCTAssertEqual(Set(fake.state.current.received.keys), Set(1...20), "every event, none skipped")
        XCTAssertTrue(eventually(seconds: 10) { (try? self.outboxEvents("de")) == 0 })
        XCTAssertTrue(
            agent.output.contains { $0.contains("acknowledged through") && $0.contains("has sent only through") }, "\(agent.output)")
    }

    /// An honest broker ahead of a restarted agent: it applied events whose
    /// acknowledgement the agent never pruned (a crash between the broker's
    /// commit and the agent's prune), and acknowledges all of them at the
    /// agent's first batch. That is no protocol error: the agent prunes them
    /// and goes on, with nothing skipped and nothing logged as an error.
    func testAnHonestBrokerAheadOfARestartedAgentIsNoProtocolError() throws {
        let store = try AgentStore(path: dir.file("de"), registry: .standard)
        let ctx = WriteContext(newID: "", now: "", epochSeconds: 0, eventID: "e", traceID: "t")
        for k in 0..<50 {
            try store.appendEventForTesting(uri: "urn:ietf:params:SCIM:event:prov:delete", ref: "/Users/u\(k)", data: nil, ctx)
        }
        let fake = try FakeBroker(
            tls: TLSConfiguration(certificateChainFile: broker.0, privateKeyFile: broker.1, trustRootsFile: ca), applied: 50)
        defer { _ = fake.harness.stop() }
        // Batches of 10: the first answer acknowledges 50, far past what this run has sent.
        let tokens = dir.write("de.tokens", "t-for-the-integrity-tests\n")
        chmod(tokens, 0o600)
        let config = dir.write(
            "de.yaml",
            """
            dataDir: \(dir.file("de"))
            listen: 127.0.0.1:0
            tokenFile: \(tokens)
            admin: {listen: none}
            broker: {url: "https://127.0.0.1:\(fake.harness.port)", ca: \(ca!), cert: \(de.0), key: \(de.1), domain: acme-de, agent: agent-1, maxEventsPerBatch: 10}

            """)
        let agent = try ChildProcess(productsDirectory + "/scim-edge", ["serve", "--config", config])
        children.append(agent)
        let dp = try port(of: agent, "scim-edge")
        let body = #"{"schemas":["urn:ietf:params:scim:schemas:core:2.0:User"],"userName":"after"}"#
        let c = try RawClient(port: dp)
        c.send(
            "POST /scim/v2/Users HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer t-for-the-integrity-tests\r\nContent-Type: application/scim+json\r\nConnection: close\r\nContent-Length: \(body.utf8.count)\r\n\r\n\(body)"
        )
        XCTAssertEqual(c.readResponses(1).first?.status, 201)
        XCTAssertTrue(eventually(seconds: 20) { fake.state.current.applied == 51 }, "the fixture applied \(fake.state.current.applied)")
        XCTAssertTrue(eventually(seconds: 10) { (try? self.outboxEvents("de")) == 0 })
        XCTAssertFalse(agent.output.contains { $0.contains("protocol error") }, "\(agent.output.filter { $0.contains("relay") })")
    }

    // MARK: anything accepted can be delivered

    /// Four users of 261,714 bytes (each event just under the relay's 1 MiB
    /// batch budget, so that two of them and the envelope are over it), then
    /// small ones, then one just under the agent's 1 MiB request limit: all
    /// arrive, and what the broker stored reads back.
    func testLargeEventsAndEventsNearTheRequestLimitAllArrive() throws {
        let (_, bp) = try startBroker()
        let (agent, dp) = try startAgent("de", cert: de, domain: "acme-de", brokerPort: bp)
        func bigUser(_ name: String, bytes: Int) -> String {
            let head = #"{"schemas":["urn:ietf:params:scim:schemas:core:2.0:User"],"userName":"\#(name)","addresses":["#
            var body = head
            var k = 0
            while body.utf8.count + 70_000 < bytes {
                if k > 0 { body += "," }
                body += #"{"formatted":""# + String(repeating: String(UnicodeScalar(UInt8(97 + k % 26))), count: 60_000) + #""}"#  // distinct values
                k += 1
            }
            let rest = bytes - body.utf8.count - 18 - (k > 0 ? 1 : 0)
            if k > 0 { body += "," }
            body += #"{"formatted":""# + String(repeating: "Z", count: rest) + #""}]}"#
            return body
        }
        for k in 0..<4 {
            let body = bigUser("big-\(k)", bytes: 261_714)
            XCTAssertEqual(body.utf8.count, 261_714)
            XCTAssertEqual(try scim(dp, "POST", "/Users", body).0, 201)
        }
        for k in 0..<5 { XCTAssertEqual(try create(dp, "small-\(k)"), 201) }
        let huge = bigUser("huge", bytes: (1 << 20) - 200)
        XCTAssertEqual(try scim(dp, "POST", "/Users", huge).0, 201, "just under the agent's request limit")
        XCTAssertEqual(try create(dp, "last"), 201)
        XCTAssertTrue(eventually(seconds: 30) { self.brokerResources("acme-de") == 11 }, "\(brokerResources("acme-de")) of 11")
        let stored = try BrokerStore(path: dir.file("broker")).resources(domain: "acme-de")
        let names = Set(stored.compactMap { $0["userName"]?.stringValue })
        let hugeAtBroker = try XCTUnwrap(stored.first { $0["userName"]?.stringValue == "huge" })
        XCTAssertGreaterThan(JSON.object(hugeAtBroker).serialized().count, 1 << 20, "over the old 1 MiB parse limit, and it reads back")
        XCTAssertTrue(names.contains("huge") && names.contains("big-3") && names.contains("last"), "\(names)")
        XCTAssertTrue(eventually(seconds: 10) { (try? self.outboxEvents("de")) == 0 })
        agent.signal(SIGTERM)
        XCTAssertEqual(agent.waitForExit(), 0)
        let local = try AgentStore(path: dir.file("de"), registry: .standard)
        XCTAssertEqual(try local.deadLetterEntries().count, 0, "nothing was refused")
    }

    /// A broker that refuses every batch holding one particular event: the
    /// agent splits its batches until that event is alone, and it becomes a
    /// dead letter with the broker's reason; the events after it flow.
    func testAnEventTheBrokerRefusesIsIsolatedAndDeadLettered() throws {
        let fake = try FakeBroker(
            tls: TLSConfiguration(certificateChainFile: broker.0, privateKeyFile: broker.1, trustRootsFile: ca),
            refusing: "POISON-PILL")
        defer { _ = fake.harness.stop() }
        let (agent, dp) = try startAgent("de", cert: de, domain: "acme-de", brokerPort: fake.harness.port)
        for k in 0..<6 { XCTAssertEqual(try create(dp, "before-\(k)"), 201) }
        XCTAssertEqual(try create(dp, "POISON-PILL"), 201)
        for k in 0..<6 { XCTAssertEqual(try create(dp, "after-\(k)"), 201) }
        XCTAssertTrue(eventually(seconds: 30) { fake.state.current.applied == 13 }, "the fixture applied \(fake.state.current.applied)")
        let received = fake.state.current.received
        XCTAssertEqual(received.values.filter { $0 == BrokerStore.undeliverableEvent }.count, 1, "\(received)")
        XCTAssertEqual(received.values.filter { $0.hasSuffix("create:full") }.count, 12)
        XCTAssertTrue(eventually(seconds: 10) { (try? self.outboxEvents("de")) == 0 })
        agent.signal(SIGTERM)
        XCTAssertEqual(agent.waitForExit(), 0)
        let letters = try AgentStore(path: dir.file("de"), registry: .standard).deadLetterEntries()
        XCTAssertEqual(letters.count, 1, "\(letters)")
        XCTAssertTrue(letters.first?.1.contains("this broker refuses that event") ?? false, "the broker's reason: \(letters)")
        let data = letters.first?.2["events"]?.objectValue?.members.first?.value["data"]
        XCTAssertEqual(data?["userName"]?.stringValue, "POISON-PILL", "the original event is kept for a retry")
    }
}

extension IntegrityTests {
    func agentMetrics(_ agent: ChildProcess) throws -> String { try brokerMetrics(agent) }  // the same operations listener

    // MARK: revocation, expiry, rotation

    /// A certificate revoked while its agent is connected: reloading the CRL
    /// (SIGHUP) closes the live connection at once, the reconnect is refused
    /// and counted as revoked, the agent says the handshake failed (not that
    /// the broker is unreachable), and nothing it writes afterwards is applied.
    func testRevocationReloadedBySIGHUPCutsTheLiveConnection() throws {
        let leaf = try authority.issue(CertificateRequest(commonName: "agent-de-2", uris: [deID]))
        let cert = (dir.write("de2.crt", leaf.certificatePEM), dir.write("de2.key", leaf.privateKeyPEM))
        let crlFile = dir.write("live.crl", try authority.revocationList(revoking: []))
        let (broker, bp) = try startBroker(extra: ["--crl", crlFile])
        let (agent, dp) = try startAgent("de", cert: cert, domain: "acme-de", brokerPort: bp, extra: ["--admin-listen", "127.0.0.1:0"])
        for k in 0..<3 { XCTAssertEqual(try create(dp, "before-\(k)"), 201) }
        XCTAssertTrue(eventually(seconds: 20) { self.applied()["acme-de/\(self.deID)"] == 3 })

        _ = dir.write("live.crl", try authority.revocationList(revoking: [leaf.serial]))
        broker.signal(SIGHUP)
        XCTAssertTrue(
            eventually(seconds: 10) { broker.output.contains { $0.contains("closed an agent connection") && $0.contains("revoked") } },
            "\(broker.output.suffix(5))")
        XCTAssertTrue(
            eventually(seconds: 5) { broker.output.contains { $0.contains("reloaded") && $0.contains("1 agent connection closed") } },
            "\(broker.output.suffix(5))")
        XCTAssertEqual(try create(dp, "after"), 201)
        XCTAssertTrue(
            eventually(seconds: 20) {
                (try? self.brokerMetrics(broker)).flatMap {
                    self.metricValue($0, #"scim_broker_tls_handshake_failures_total{reason="revoked"}"#)
                } ?? 0 >= 1
            }, (try? brokerMetrics(broker)) ?? "")
        let metrics = try brokerMetrics(broker)
        XCTAssertEqual(metricValue(metrics, "scim_broker_certificate_closures_total"), 1, metrics)
        XCTAssertTrue(
            eventually(seconds: 10) { agent.output.contains { $0.contains("TLS handshake with the broker failed") } },
            "\(agent.output.suffix(3))")
        XCTAssertFalse(agent.output.contains { $0.contains("broker unreachable") && $0.contains("revoked") }, "\(agent.output)")
        XCTAssertGreaterThanOrEqual(metricValue(try agentMetrics(agent), "scim_edge_relay_tls_failures_total") ?? 0, 1)
        XCTAssertEqual(applied()["acme-de/\(deID)"], 3, "nothing after the revocation")
        XCTAssertEqual(try outboxEvents("de"), 1, "the agent keeps what it could not send")
    }

    /// A connection ends when the certificate that opened it expires.
    func testAConnectionEndsWhenItsCertificateExpires() throws {
        let leaf = try authority.issue(CertificateRequest(commonName: "agent-de-short", uris: [deID], notAfterOffset: 4))
        let cert = (dir.write("short.crt", leaf.certificatePEM), dir.write("short.key", leaf.privateKeyPEM))
        let (broker, bp) = try startBroker()
        let (_, dp) = try startAgent("de", cert: cert, domain: "acme-de", brokerPort: bp)
        XCTAssertEqual(try create(dp, "in-time"), 201)
        XCTAssertTrue(eventually(seconds: 3) { self.applied()["acme-de/\(self.deID)"] == 1 }, "delivered while valid")
        XCTAssertTrue(
            eventually(seconds: 15) {
                broker.output.contains { $0.contains("closed an agent connection") && $0.contains("expired") }
            }, "\(broker.output.suffix(5))")
        XCTAssertEqual(try create(dp, "too-late"), 201)
        XCTAssertTrue(
            eventually(seconds: 20) {
                (try? self.brokerMetrics(broker)).flatMap {
                    self.metricValue($0, #"scim_broker_tls_handshake_failures_total{reason="expired"}"#)
                } ?? 0 >= 1
            }, (try? brokerMetrics(broker)) ?? "")
        XCTAssertEqual(applied()["acme-de/\(deID)"], 1)
    }

    /// The agent's SIGHUP re-reads its relay certificate: after a rotation the
    /// broker sees the new certificate (its expiry on the broker's metrics)
    /// without a restart, and both sides report certificate expiry times.
    func testAgentSIGHUPRotatesTheRelayCertificate() throws {
        let first = try authority.issue(CertificateRequest(commonName: "agent-de", uris: [deID], notAfterOffset: 10 * 86400))
        let second = try authority.issue(CertificateRequest(commonName: "agent-de", uris: [deID], notAfterOffset: 20 * 86400))
        let cert = (dir.write("rot.crt", first.certificatePEM), dir.write("rot.key", first.privateKeyPEM))
        let (broker, bp) = try startBroker()
        let (agent, dp) = try startAgent("de", cert: cert, domain: "acme-de", brokerPort: bp, extra: ["--admin-listen", "127.0.0.1:0"])
        XCTAssertEqual(try create(dp, "one"), 201)
        XCTAssertTrue(eventually(seconds: 20) { self.applied()["acme-de/\(self.deID)"] == 1 })
        let name = #"scim_broker_agent_certificate_expiry_timestamp_seconds{agent="acme-de/\#(deID)"}"#
        let before = try XCTUnwrap(metricValue(try brokerMetrics(broker), name))
        let own = try XCTUnwrap(metricValue(try agentMetrics(agent), "scim_edge_relay_certificate_expiry_timestamp_seconds"))
        XCTAssertEqual(before, own, "both sides see the same certificate")
        XCTAssertGreaterThan(metricValue(try agentMetrics(agent), "scim_edge_broker_certificate_expiry_timestamp_seconds") ?? 0, 0)
        XCTAssertGreaterThan(metricValue(try brokerMetrics(broker), "scim_broker_certificate_expiry_timestamp_seconds") ?? 0, 0)

        _ = dir.write("rot.crt", second.certificatePEM)
        _ = dir.write("rot.key", second.privateKeyPEM)
        agent.signal(SIGHUP)
        XCTAssertTrue(
            eventually(seconds: 10) { agent.output.contains { $0.contains("reloaded") && $0.contains("relay certificate") } },
            "\(agent.output.suffix(3))")
        XCTAssertEqual(try create(dp, "two"), 201)
        XCTAssertTrue(eventually(seconds: 20) { self.applied()["acme-de/\(self.deID)"] == 2 })
        let after = try XCTUnwrap(metricValue(try brokerMetrics(broker), name))
        XCTAssertEqual(after - before, 10 * 86400, accuracy: 5, "the broker saw the rotated certificate")
        XCTAssertEqual(metricValue(try agentMetrics(agent), "scim_edge_relay_certificate_expiry_timestamp_seconds"), after)
    }
}

/// A relay peer in the test process: applies batches as the broker does
/// (per sequence, duplicates acknowledged, gaps answered 409), but can lie
/// about its first acknowledgement or refuse every batch holding a marker.
final class FakeBroker: Sendable {
    struct State {
        var applied: UInt64 = 0
        var received: [UInt64: String] = [:]
        var lied = false
    }

    let state = Locked(State())
    let harness: ServerHarness

    init(tls: TLSConfiguration, overAcknowledgeFirst: Bool = false, refusing marker: String? = nil, applied: UInt64 = 0) throws {
        let state = self.state
        state.withLock { $0.applied = applied }
        harness = try ServerHarness(
            tls: tls,
            limits: {
                var l = HTTPServerLimits(); l.maxBodyBytes = 64 << 20; return l
            }()
        ) { request, _, responder in
            func answer(_ status: Int, _ body: JSON) {
                responder.respond(HTTPResponse(status: status, headers: ["Content-Type": "application/json"], body: body.serialized()))
            }
            if let marker, request.body.count >= marker.utf8.count,
                String(decoding: request.body, as: UTF8.self).contains(marker)
            {
                answer(400, ["error": "invalid_request", "description": "this broker refuses that event"])
                return
            }
            guard let batch = try? JSONParser.parse(request.body, limits: .relayBatch), let events = batch["events"]?.arrayValue else {
                answer(400, ["error": "invalid_request", "description": "not a batch"])
                return
            }
            let (status, body): (Int, JSON) = state.withLock { s in
                var rejected = JSONObject()
                var appliedNow = 0
                for e in events {
                    guard let n = e["seq"]?.numberValue?.integer, n > 0 else { continue }
                    let seq = UInt64(n)
                    if seq <= s.applied { continue }
                    guard seq == s.applied + 1 else {
                        if appliedNow == 0 { return (409, ["expectedSeq": .number(JSONNumber(integer: Int64(s.applied + 1)))]) }
                        break
                    }
                    let uri = e["events"]?.objectValue?.members.first?.key ?? ""
                    s.received[seq] = uri
                    if uri == BrokerStore.undeliverableEvent {
                        let reason = e["events"]?[uri]?["reason"]?.stringValue ?? ""
                        rejected[String(seq)] = ["err": "invalid_request", "description": .string("could not be delivered: \(reason)")]
                    }
                    s.applied = seq
                    appliedNow += 1
                }
                var acked = s.applied
                if overAcknowledgeFirst && !s.lied { s.lied = true; acked += 1000 }
                return (200, ["ackedThrough": .number(JSONNumber(integer: Int64(acked))), "rejected": .object(rejected)])
            }
            answer(status, body)
        }
    }
}
