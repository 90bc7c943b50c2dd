import EdgeAgent
import EdgeBroker
import EdgeTLS
import EdgeTestSupport
import EdgeTools
import Foundation
import SCIM
import XCTest

/// Agents and a broker as real processes with certificates made by the test.
final class FederationTests: FederationTestCase {
    func testTwoDomainsArriveExactlyOnceAndStayNamespaced() throws {
        let (brokerProcess, bp) = try startBroker(extra: ["--api-listen", "127.0.0.1:0", "--api-token", "api-token"])
        let apiLine = try XCTUnwrap(brokerProcess.waitForLine("read API at"))
        let apiPort = Int(apiLine.split(separator: ":").last!.split(separator: "/").first!)!
        let (deAgent, dp) = try startAgent("de", cert: de, domain: "acme-de", brokerPort: bp, extra: ["--admin-listen", "127.0.0.1:0"])
        let (_, up) = try startAgent("us", cert: us, domain: "acme-us", brokerPort: bp)
        for k in 0..<40 { XCTAssertEqual(try create(dp, "de\(k)"), 201) }
        for k in 0..<25 { XCTAssertEqual(try create(up, "us\(k)"), 201) }
        XCTAssertEqual(try create(dp, "same@example.com"), 201)
        XCTAssertEqual(try create(up, "same@example.com"), 201)
        XCTAssertTrue(
            eventually(seconds: 30) {
                self.applied()["acme-de/\(self.deID)"] == 41 && self.applied()["acme-us/\(self.usID)"] == 26
            }, "broker applied \(applied())")
        XCTAssertTrue(eventually(seconds: 10) { (try? self.outboxEvents("de")) == 0 }, "acknowledged events leave the agent's outbox")

        // The relay reports on the agent's /metrics.
        let agentMetrics = try brokerMetrics(deAgent)
        for line in [
            "scim_edge_relay_events_acknowledged_total 41", "scim_edge_relay_connected 1", "scim_edge_outbox_events 0",
            "scim_edge_relay_events_rejected_total 0", "scim_edge_relay_rtt_seconds_count",
        ] {
            XCTAssertTrue(agentMetrics.contains(line), "agent metrics should contain \(line)")
        }
        XCTAssertTrue(agentMetrics.contains("scim_edge_relay_window "), agentMetrics)

        // The read API over all domains.
        let both = try api(apiPort, "/Users?filter=userName%20eq%20%22same@example.com%22")
        XCTAssertEqual(both.0, 200)
        XCTAssertEqual(both.1?["totalResults"], 2)
        let source = "urn:scim-edge:params:scim:schemas:extension:source:1.0:Resource"
        let deOnly = try api(apiPort, "/Users?count=0&filter=\(source):domain%20eq%20%22acme-de%22")
        XCTAssertEqual(deOnly.1?["totalResults"], 41, "filter by source domain")
        let brokerID = try XCTUnwrap(both.1?["Resources"]?.arrayValue?.first?["id"]?.stringValue)
        XCTAssertEqual(try api(apiPort, "/Users/\(brokerID)").0, 200)
        XCTAssertEqual(try api(apiPort, "/Groups/\(brokerID)").0, 404)
        XCTAssertEqual(try api(apiPort, "/Users", method: "POST").0, 405, "the directory is read-only here")
        XCTAssertEqual(try api(apiPort, "/Users", token: "wrong").0, 401)
        let twice = try RawClient(port: apiPort)
        twice.send(
            "GET /scim/v2/Users HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer api-token\r\nAuthorization: Bearer other\r\nConnection: close\r\n\r\n"
        )
        let refused = try XCTUnwrap(twice.readResponses(1).first)
        XCTAssertEqual(refused.status, 400, "two Authorization fields: \(refused.body)")
        XCTAssertEqual(try JSONParser.parse(refused.body)["scimType"], "invalidSyntax")
        XCTAssertEqual(try api(apiPort, "/ResourceTypes/User").1?["schemaExtensions"]?.arrayValue?.count, 2)
        // RFC 9865 cursors walk the federated directory: all 67 users, once each.
        var walked: [String] = [], cursor = ""
        for _ in 0..<20 {
            let page = try api(apiPort, "/Users?count=10&cursor=\(cursor)")
            XCTAssertEqual(page.0, 200)
            walked += page.1?["Resources"]?.arrayValue?.compactMap { $0["id"]?.stringValue } ?? []
            guard let next = page.1?["nextCursor"]?.stringValue else { break }
            cursor = next
        }
        XCTAssertEqual(walked.count, 67)
        XCTAssertEqual(Set(walked).count, 67, "no user twice")
        XCTAssertEqual(try api(apiPort, "/Users?cursor=bogus").1?["scimType"], "invalidCursor")
        let metrics = try brokerMetrics(brokerProcess)
        XCTAssertTrue(metrics.contains("scim_broker_events_applied_total 67"), metrics)
        XCTAssertNotNil(
            metrics.range(
                of: #"scim_broker_agent_applied_sequence\{agent="acme-us/\#(usID)",epoch="[0-9a-f]{32}"\} 26\n"#,
                options: .regularExpression), metrics)
        let samples =
            metrics.split(separator: "\n").first { $0.hasPrefix("scim_broker_propagation_seconds_count ") }
            .flatMap { Int($0.split(separator: " ")[1]) } ?? 0
        XCTAssertGreaterThan(samples, 0, "propagation is measured from the agents' acceptance times")
        for c in children { c.signal(SIGTERM); XCTAssertEqual(c.waitForExit(), 0) }

        let store = try BrokerStore(path: dir.file("broker"))
        let deUsers = try store.resources(domain: "acme-de"), usUsers = try store.resources(domain: "acme-us")
        XCTAssertEqual(deUsers.count, 41)
        XCTAssertEqual(usUsers.count, 26)
        XCTAssertEqual(Set(deUsers.compactMap { $0["userName"]?.stringValue }).count, 41, "nothing twice")
        let same = (deUsers + usUsers).filter { $0["userName"] == "same@example.com" }
        XCTAssertEqual(same.count, 2, "the same userName from two domains stays two resources")
        XCTAssertEqual(Set(same.compactMap { $0[BrokerStore.sourceExtension]?["domain"]?.stringValue }), ["acme-de", "acme-us"])
        XCTAssertNotEqual(same[0]["id"], same[1]["id"], "each has its own broker id")
    }

    func testForeignCAAndClaimedDomainAreRefused() throws {
        let (broker, bp) = try startBroker()
        let (_, rp) = try startAgent("rogue", cert: rogue, domain: "acme-de", brokerPort: bp)
        let (_, lp) = try startAgent("liar", cert: de, domain: "acme-us", brokerPort: bp)
        XCTAssertEqual(try create(rp, "intruder"), 201, "the agent itself works")
        XCTAssertEqual(try create(lp, "impostor"), 201)
        XCTAssertTrue(
            eventually(seconds: 10) { broker.output.contains { $0.contains("batch claims another domain") } },
            "the broker logs the refused batch: \(broker.output)")
        // Both were refused at least once (the rogue at the handshake), so nothing can have been applied since.
        XCTAssertTrue(
            eventually(seconds: 10) {
                guard let m = try? self.brokerMetrics(broker) else { return false }
                return m.contains(#"scim_broker_tls_handshake_failures_total{reason="untrusted"} "#)
                    && !m.contains(#"scim_broker_tls_handshake_failures_total{reason="untrusted"} 0"#)
            }, (try? brokerMetrics(broker)) ?? "")
        XCTAssertEqual(applied(), [:], "nothing was applied for either")
        XCTAssertEqual(try outboxEvents("rogue"), 1, "refused events stay in the outbox")
        XCTAssertEqual(try outboxEvents("liar"), 1)
    }

    func testBrokerKilledMidLoadLosesNothingAndAppliesNothingTwice() throws {
        var (broker, bp) = try startBroker()
        let (_, dp) = try startAgent("de", cert: de, domain: "acme-de", brokerPort: bp)
        let created = Locked(0)
        let writer = Thread {
            for k in 0..<400 {
                if (try? createUser(dp, "load\(k)")) == 201 { created.withLock { $0 += 1 } }
            }
        }
        writer.start()
        XCTAssertTrue(eventually(seconds: 30) { (self.applied()["acme-de/\(self.deID)"] ?? 0) >= 50 })
        broker.signal(SIGKILL)
        _ = broker.waitForExit()
        // The agent goes on accepting while the broker is away: wait until it has, not for a time.
        let atKill = created.current
        XCTAssertTrue(eventually(seconds: 20) { created.current >= min(400, atKill + 20) || writer.isFinished })
        (broker, _) = try startBroker(port: bp)
        while !writer.isFinished { usleep(10_000) }
        let total = UInt64(created.current)
        XCTAssertEqual(total, 400, "the agent accepted everything while the broker was away")
        XCTAssertTrue(eventually(seconds: 60) { self.applied()["acme-de/\(self.deID)"] == total }, "applied \(applied())")
        for c in children where c.process.isRunning { c.signal(SIGTERM); _ = c.waitForExit() }
        let users = try BrokerStore(path: dir.file("broker")).resources(domain: "acme-de")
        XCTAssertEqual(users.count, 400)
        XCTAssertEqual(Set(users.compactMap { $0["userName"]?.stringValue }).count, 400)
    }

    func testAgentKilledMidLoadRelaysEverythingOnceAfterRestart() throws {
        let (_, bp) = try startBroker()
        var (agent, dp) = try startAgent("de", cert: de, domain: "acme-de", brokerPort: bp)
        var acked: [String] = []
        for k in 0..<150 where try create(dp, "a\(k)") == 201 { acked.append("a\(k)") }
        agent.signal(SIGKILL)
        _ = agent.waitForExit()
        (agent, dp) = try startAgent("de", cert: de, domain: "acme-de", brokerPort: bp)
        for k in 150..<200 where try create(dp, "a\(k)") == 201 { acked.append("a\(k)") }
        XCTAssertEqual(acked.count, 200)
        XCTAssertTrue(eventually(seconds: 30) { self.applied()["acme-de/\(self.deID)"] == 200 }, "applied \(applied())")
        for c in children where c.process.isRunning { c.signal(SIGTERM); _ = c.waitForExit() }
        let names = try BrokerStore(path: dir.file("broker")).resources(domain: "acme-de").compactMap { $0["userName"]?.stringValue }
        XCTAssertEqual(names.count, 200)
        XCTAssertEqual(Set(names), Set(acked), "every acknowledged change, once")
    }

    func testBrokerAwayAgentsBufferThenPushBackThenDrain() throws {
        var (broker, bp) = try startBroker()
        broker.signal(SIGKILL)
        _ = broker.waitForExit()
        // The broker is gone; the agent buffers up to 20 events, then pushes back.
        let (_, dp) = try startAgent("de", cert: de, domain: "acme-de", brokerPort: bp, extra: ["--outbox-max-events", "20"])
        var statuses: [Int] = []
        for k in 0..<25 { statuses.append(try create(dp, "b\(k)")) }
        XCTAssertEqual(statuses.filter { $0 == 201 }.count, 20, "accepted until the watermark: \(statuses)")
        XCTAssertEqual(statuses.suffix(5), [503, 503, 503, 503, 503], "then 503 + Retry-After, nothing dropped")
        XCTAssertEqual(try outboxEvents("de"), 20)
        (broker, _) = try startBroker(port: bp)
        XCTAssertTrue(eventually(seconds: 40) { self.applied()["acme-de/\(self.deID)"] == 20 }, "applied \(applied())")
        XCTAssertTrue(eventually(seconds: 10) { (try? createUser(dp, "after")) == 201 }, "writes resume once the outbox drained")
        XCTAssertTrue(eventually(seconds: 10) { self.applied()["acme-de/\(self.deID)"] == 21 })
    }

    func testEventsRefusedForGoodBecomeDeadLettersAndTheRelayMovesOn() throws {
        let (_, bp) = try startBroker()
        var (agent, dp) = try startAgent("de", cert: de, domain: "acme-de", brokerPort: bp)
        XCTAssertEqual(try create(dp, "first"), 201)
        XCTAssertTrue(eventually(seconds: 20) { self.applied()["acme-de/\(self.deID)"] == 1 })
        agent.signal(SIGTERM)
        XCTAssertEqual(agent.waitForExit(), 0)
        // An event no broker accepts (no such resource type), then a good one.
        let local = try AgentStore(path: dir.file("de"), registry: .standard)
        let firstID = try XCTUnwrap(
            try local.query(SchemaRegistry.standard.resourceType("User")!, filter: nil, scanBudget: 10).first?["id"]?.stringValue)
        let ctx = WriteContext(newID: "", now: "", epochSeconds: 0, eventID: "bad", traceID: "bad")
        try local.appendEventForTesting(uri: "urn:ietf:params:SCIM:event:prov:create:full", ref: "/Printers/p1", data: [:], ctx)
        try local.appendEventForTesting(uri: "urn:ietf:params:SCIM:event:prov:shred", ref: "/Users/\(firstID)", data: nil, ctx)
        (agent, dp) = try startAgent("de", cert: de, domain: "acme-de", brokerPort: bp)
        XCTAssertEqual(try create(dp, "second"), 201)
        XCTAssertTrue(eventually(seconds: 20) { self.applied()["acme-de/\(self.deID)"] == 4 }, "the relay moved past them")
        agent.signal(SIGTERM)
        XCTAssertEqual(agent.waitForExit(), 0)
        func run(_ args: [String]) throws -> (Int32, String) {
            let child = try ChildProcess(productsDirectory + "/scim-edge", args + ["--data-dir", dir.file("de")])
            let status = child.waitForExit() ?? -1  // also waits for the last lines
            return (status, child.output.joined(separator: "\n"))
        }
        let list = try run(["deadletter", "list"])
        XCTAssertTrue(list.1.hasPrefix("2\t/Printers/p1\t"), list.1)
        XCTAssertTrue(list.1.contains("is not /Users/<id> or /Groups/<id>"), "the broker's reason is kept: \(list.1)")
        XCTAssertTrue(list.1.contains("3\t/Users/\(firstID)\t"), list.1)
        XCTAssertEqual(try run(["deadletter", "drop", "2"]).0, 0)
        XCTAssertNotEqual(try run(["deadletter", "drop", "2"]).0, 0)
        // Retry sends the user's current state again as a new event.
        XCTAssertEqual(try run(["deadletter", "retry", "3"]).0, 0)
        XCTAssertEqual(try run(["deadletter", "list"]).1, "nothing to show: no dead letters")
        let outbox = try run(["outbox", "list"])
        // Event 4 may still be listed: the broker's acknowledgement of it can
        // be in flight when the agent stops, and it is sent again (and applied
        // once) after the restart.
        XCTAssertTrue(outbox.1.split(separator: "\n").contains { $0.hasPrefix("5\tprov:create:full\t/Users/\(firstID)") }, outbox.1)
        (agent, _) = try startAgent("de", cert: de, domain: "acme-de", brokerPort: bp)
        XCTAssertTrue(eventually(seconds: 20) { self.applied()["acme-de/\(self.deID)"] == 5 })
        XCTAssertEqual(try BrokerStore(path: dir.file("broker")).resources(domain: "acme-de").count, 2, "both users, once each")
    }

    func testBrokerBackpressureMakesAgentsHoldTheirEvents() throws {
        let (broker, bp) = try startBroker(extra: ["--max-pending-batches", "0"])
        let (agent, dp) = try startAgent("de", cert: de, domain: "acme-de", brokerPort: bp)
        for k in 0..<3 { XCTAssertEqual(try create(dp, "held\(k)"), 201) }
        XCTAssertTrue(eventually(seconds: 10) { agent.output.contains { $0.contains("broker busy (503)") } }, "\(agent.output.suffix(3))")
        XCTAssertTrue(try brokerMetrics(broker).contains(#"scim_broker_refused_total{reason="busy"}"#))
        XCTAssertEqual(applied(), [:])
        XCTAssertEqual(try outboxEvents("de"), 3, "the agent holds every event")
    }

    /// Drops, delays, resets and stalled reads between agent and broker:
    /// everything converges, nothing lost, nothing twice.
    func testFaultyNetworkConverges() throws {
        let (_, bp) = try startBroker()
        let proxy = try FaultProxy(upstreamPort: bp, seed: 20_261_129)
        defer { proxy.stop() }
        let (_, dp) = try startAgent("de", cert: de, domain: "acme-de", brokerPort: proxy.port)
        // Writes for 5 s (at most 5,000) while the network misbehaves.
        var acked: [String] = []
        let until = Date().addingTimeInterval(5)
        var k = 0
        while Date() < until && k < 5000 {
            if try create(dp, "f\(k)") == 201 { acked.append("f\(k)") }
            k += 1
        }
        XCTAssertEqual(acked.count, k, "the IdP side never noticed the network")
        proxy.healthy()
        let total = UInt64(acked.count)
        XCTAssertTrue(
            eventually(seconds: 120) { self.applied()["acme-de/\(self.deID)"] == total },
            "applied \(applied()) of \(total); faults \(proxy.faultCounts)")
        let faults = proxy.faultCounts
        XCTAssertGreaterThan(faults.values.reduce(0, +), 5, "the relay reconnected through many faulty connections: \(faults)")
        XCTAssertGreaterThan(faults.filter { $0.key != "pass" }.values.reduce(0, +), 3, "faults were injected: \(faults)")
        for c in children where c.process.isRunning { c.signal(SIGTERM); _ = c.waitForExit() }
        let names = try BrokerStore(path: dir.file("broker")).resources(domain: "acme-de").compactMap { $0["userName"]?.stringValue }
        XCTAssertEqual(names.count, acked.count)
        XCTAssertEqual(Set(names), Set(acked))
    }

    func testRevokedAgentCertificateIsRefused() throws {
        let (_, bp) = try startBroker(extra: ["--crl", crl])
        let (agent, dp) = try startAgent("old", cert: revoked, domain: "acme-de", brokerPort: bp)
        XCTAssertEqual(try create(dp, "revoked-user"), 201)
        XCTAssertTrue(
            eventually(seconds: 10) { agent.output.contains { $0.contains("certificate revoked") } },
            "the agent learns why: \(agent.output.suffix(2))")
        XCTAssertEqual(applied(), [:])
        XCTAssertEqual(try outboxEvents("old"), 1)
        // A valid certificate with the same identity still works.
        let (_, good) = try startAgent("new", cert: de, domain: "acme-de", brokerPort: bp)
        XCTAssertEqual(try create(good, "valid-user"), 201)
        XCTAssertTrue(eventually(seconds: 20) { self.applied()["acme-de/\(self.deID)"] == 1 })
    }

    /// Backpressure ends when the relay drains the outbox, not at the next
    /// write: /readyz and scim_edge_backpressure follow the acknowledgement.
    func testBackpressureEndsWhenTheRelayDrainsTheOutbox() throws {
        let brokerPort = freeLoopbackPort()  // the broker starts once the outbox is full
        let (agent, dp) = try startAgent(
            "de", cert: de, domain: "acme-de", brokerPort: brokerPort,
            extra: ["--admin-listen", "127.0.0.1:0", "--outbox-max-events", "5"])
        let line = try XCTUnwrap(agent.waitForLine("operations at"))
        let adminPort = Int(line.split(separator: ":").last!.split(separator: "/").first!)!
        func admin(_ path: String) -> (Int, String) {
            guard let c = try? RawClient(port: adminPort) else { return (0, "") }
            c.send("GET \(path) HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            guard let r = c.readResponses(1).first else { return (0, "") }
            return (r.status, r.body)
        }
        for k in 0..<5 { XCTAssertEqual(try create(dp, "bp\(k)"), 201) }
        XCTAssertEqual(try create(dp, "bp5"), 503, "the outbox is at its high watermark")
        XCTAssertEqual(admin("/readyz").0, 503)
        XCTAssertTrue(admin("/metrics").1.contains("scim_edge_backpressure 1"))

        _ = try startBroker(port: brokerPort)
        XCTAssertTrue(eventually(seconds: 30) { self.applied()["acme-de/\(self.deID)"] == 5 }, "broker applied \(applied())")
        // No write comes: the acknowledgement alone ends the backpressure.
        XCTAssertTrue(eventually(seconds: 30) { admin("/readyz").0 == 200 }, "ready again once the outbox drained")
        let metrics = admin("/metrics").1
        XCTAssertTrue(metrics.contains("scim_edge_backpressure 0"), metrics)
        XCTAssertTrue(metrics.contains("scim_edge_outbox_events 0"), metrics)
        XCTAssertEqual(try create(dp, "bp5"), 201)
    }
}

func createUser(_ port: Int, _ userName: String) throws -> Int {
    let c = try RawClient(port: port)
    let body = #"{"schemas":["urn:ietf:params:scim:schemas:core:2.0:User"],"userName":"\#(userName)"}"#
    c.send(
        "POST /scim/v2/Users HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer t\r\nContent-Type: application/scim+json\r\nConnection: close\r\nContent-Length: \(body.utf8.count)\r\n\r\n\(body)"
    )
    return c.readResponses(1).first?.status ?? 0
}

/// Per `<domain>/<identity>`: events applied, over all of its store epochs
/// (each epoch's sequence starts at 1).
func brokerApplied(_ path: String) -> [String: UInt64] {
    guard let store = try? BrokerStore(path: path), let seqs = try? store.agentSequences() else { return [:] }
    return Dictionary(seqs.map { ("\($0.domain)/\($0.agent.identity)", $0.sequence) }, uniquingKeysWith: +)
}
