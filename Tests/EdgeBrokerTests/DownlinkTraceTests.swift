import EdgeAgent
import EdgeBroker
import EdgeHTTP
import EdgeLoop
import EdgeTLS
import EdgeTestSupport
import Foundation
import SCIM
import XCTest

/// One trace end to end (issue 16, point 5): from the HQ IdP's request
/// through HQ's agent, the broker and the boundary's feed to the
/// destination agent's commit, with its inbound decision, as `scim-broker
/// trace` shows it. The destination's agent reports its decisions with its
/// acknowledgement (downlink protocol 2), so what entered was decided inside
/// the boundary and is visible centrally.
extension DownlinkTests {
    /// HQ's IdP request with a W3C `traceparent` (trace id `trace`): the status.
    func createAtHQ(_ port: Int, _ userName: String, trace: String, extra: String = "") throws -> Int {
        try scim(
            port, "POST", "/Users", #"{"schemas":["urn:ietf:params:scim:schemas:core:2.0:User"],"userName":"\#(userName)"\#(extra)}"#,
            headers: ["traceparent": "00-\(trace)-00f067aa0ba902b7-01"]
        ).0
    }

    /// `scim-broker trace --json`: the hops, in the order given.
    func traceHops(_ what: String) -> [JSON] {
        guard let out = try? brokerCLI(["trace", "--data-dir", dir.file("broker"), "--json", what]).1 else { return [] }
        return out.split(separator: "\n").compactMap { try? JSONParser.parse(Array($0.utf8)) }
    }

    func testOneTraceFollowsAChangeIntoTheBoundaryWithItsDecision() throws {
        let (broker, bp) = try startBroker(yaml: brokerYAML)
        let (_, dp) = try startAgent("de", cert: de, domain: "acme-de", brokerPort: bp)
        // The subsidiary takes HQ's active users only.
        let (usAgent, up) = try startInboundAgent(
            "us", cert: us, brokerPort: bp, accept: "- domains: [acme-de]\n      types: [User]\n      filter: 'active eq true'")
        // The subsidiary's own user holds the name HQ's carol maps to.
        XCTAssertEqual(try createUser(up, "carol@acme-de"), 201)
        let accepted = "4bf92f3577b34da6a3ce929d0e0e4736", refused = "5cf92f3577b34da6a3ce929d0e0e4737"
        let filtered = "6df92f3577b34da6a3ce929d0e0e4738"
        XCTAssertEqual(try createAtHQ(dp, "alice", trace: accepted, extra: #","active":true"#), 201)
        XCTAssertEqual(try createAtHQ(dp, "carol", trace: refused, extra: #","active":true"#), 201)
        XCTAssertEqual(try createAtHQ(dp, "ivan", trace: filtered, extra: #","active":false"#), 201)

        func boundaryHop(_ trace: String) -> JSON? { traceHops(trace).first { $0["hop"] == "boundary acme-us" } }
        XCTAssertTrue(
            eventually(seconds: 30) { [accepted, refused, filtered].allSatisfy { boundaryHop($0) != nil } },
            "\(traceHops(accepted)) \(usAgent.output.suffix(10))")

        // Accepted: every hop, in the order the change took them, with its time.
        let hops = traceHops(accepted)
        XCTAssertEqual(
            hops.compactMap { $0["hop"]?.stringValue }, ["agent accept", "broker apply", "feed us-boundary", "boundary acme-us"],
            "\(hops)")
        let times = hops.compactMap { $0["at"]?.numberValue?.integer }
        XCTAssertEqual(times.count, 4)
        XCTAssertEqual(times, times.sorted(), "the hops' times follow the change")
        XCTAssertTrue(hops.allSatisfy { $0["trace"]?.stringValue == accepted }, "one trace id, from the IdP's traceparent")
        XCTAssertEqual(hops[0]["domain"], "acme-de")
        let commit = hops[3]
        XCTAssertEqual(commit["outcome"], "accepted")
        XCTAssertEqual(commit["event"], "create")
        XCTAssertEqual(commit["target"], "us-boundary")
        XCTAssertEqual(commit["feedSeq"], hops[2]["feedSeq"])
        let alice = try XCTUnwrap(try user(up, "alice@acme-de"), "accepted and mapped")
        XCTAssertEqual(alice["userType"], "Guest")

        // Refused inside the boundary: the broker learns that, and of what kind, never the local detail.
        let refusal = try XCTUnwrap(boundaryHop(refused))
        XCTAssertEqual(refusal["outcome"], "refused")
        XCTAssertEqual(refusal["scimType"], "uniqueness")
        XCTAssertFalse(
            String(decoding: refusal.serialized(), as: UTF8.self).contains("carol@acme-de"), "the local userName stays inside: \(refusal)")
        XCTAssertTrue(
            usAgent.output.contains { $0.contains("could not be stored here") && $0.contains(refused) },
            "the boundary's log has the reason, under the change's trace id")
        // Not accepted by the inbound policy: said so, and nothing entered.
        XCTAssertEqual(boundaryHop(filtered)?["outcome"], "not accepted")
        XCTAssertNil(try user(up, "ivan@acme-de"))
        XCTAssertEqual(foreign("us"), ["acme-de": 1])

        // The text form, as an operator reads it, and by any name of the resource.
        let text = try brokerCLI(["trace", "--data-dir", dir.file("broker"), "alice"]).1
        XCTAssertTrue(text.contains("boundary acme-us\tfeedSeq"), text)
        XCTAssertTrue(text.contains("outcome accepted"), text)
        // Centrally visible: outcomes and the end-to-end latency per destination.
        let metrics = try brokerMetrics(broker)
        for (outcome, n) in [("accepted", 1), ("refused", 1), ("not_accepted", 1)] {
            XCTAssertTrue(
                metrics.contains(
                    #"scim_broker_downlink_events_committed_total{domain="acme-us",target="us-boundary",outcome="\#(outcome)"} \#(n)"#),
                outcome)
        }
        XCTAssertTrue(
            metrics.contains(#"scim_broker_downlink_propagation_seconds_count{domain="acme-us",target="us-boundary"} 3"#),
            metrics.split(separator: "\n").filter { $0.contains("propagation") }.joined(separator: "\n"))
    }

    /// One poll of acme-us's feed over mutual TLS with `cert`, as an agent
    /// of its own: the status and the answer.
    func poll(_ port: Int, cert: (String, String), _ body: String) throws -> (Int, JSON?) {
        let config = TLSConfiguration(certificateChainFile: cert.0, privateKeyFile: cert.1, trustRootsFile: ca)
        let (answer, _) = try runOnLoop { (loop: EventLoop, finish: @escaping @Sendable ((Int, [UInt8])) -> Void) in
            let client = HTTPClient(
                loop: loop, address: SocketAddress(host: "127.0.0.1", port: port),
                tls: try TLSContext(role: .client, configuration: config),
                serverName: "localhost")
            client.send(
                HTTPRequest(
                    method: "POST", target: BrokerService.feedPath, headers: ["Content-Type": "application/json"], body: Array(body.utf8))
            ) { r in
                client.close()
                finish((try? r.get()).map { ($0.status, $0.body) } ?? (0, []))
            }
        }
        let (status, bytes) = try XCTUnwrap(answer)
        return (status, try? JSONParser.parse(bytes))
    }

    /// Protocol 2 stays compatible: a poll without `outcomes` (a version 1
    /// agent) is served and its acknowledgement recorded as `unreported`;
    /// malformed outcomes are refused with a precise 400 and acknowledge
    /// nothing (invariant 7).
    func testAPollWithoutOutcomesIsUnderstoodAndBadOutcomesAreRefused() throws {
        let (_, bp) = try startBroker(yaml: brokerYAML)
        let (_, dp) = try startAgent("de", cert: de, domain: "acme-de", brokerPort: bp)
        XCTAssertEqual(try createAtHQ(dp, "olga", trace: "7ef92f3577b34da6a3ce929d0e0e4739"), 201)
        XCTAssertEqual(try createAtHQ(dp, "pia", trace: "8ff92f3577b34da6a3ce929d0e0e4730"), 201)
        XCTAssertTrue(eventually(seconds: 20) { self.applied()["acme-de/\(self.deID)"] == 2 })
        let epoch = "0123456789abcdef0123456789abcdef"
        let (status, first) = try poll(bp, cert: us, #"{"ackedThrough":0,"epoch":"\#(epoch)","timeoutMs":0}"#)
        XCTAssertEqual(status, 200)
        XCTAssertEqual(first?["protocol"], 3)
        XCTAssertEqual(first?["events"]?.arrayValue?.count, 2)
        XCTAssertEqual(
            first?["events"]?.arrayValue?.first?["txn"], "7ef92f3577b34da6a3ce929d0e0e4739", "the trace id travels with the event")
        // `after`: what follows the last received, while it is being committed.
        let (_, next) = try poll(bp, cert: us, #"{"ackedThrough":0,"after":1,"epoch":"\#(epoch)","timeoutMs":0}"#)
        XCTAssertEqual(next?["events"]?.arrayValue?.compactMap { $0["seq"]?.numberValue?.integer }, [2])
        let (behind, said) = try poll(bp, cert: us, #"{"ackedThrough":1,"after":0,"epoch":"\#(epoch)","timeoutMs":0}"#)
        XCTAssertEqual(behind, 400)
        XCTAssertTrue(said?["description"]?.stringValue?.contains("at least 'ackedThrough'") == true, "\(String(describing: said))")

        for (outcomes, says) in [
            (#"{"from":0,"through":1,"committed":1}"#, "'outcomes' must name the feed sequences"),
            (#"{"from":1,"through":2,"committed":1}"#, "at most 'ackedThrough'"),
            (#"{"from":1,"through":1}"#, "'outcomes.committed'"),
            (#"{"from":1,"through":1,"committed":1,"notAccepted":[5]}"#, "'outcomes.notAccepted' must list sequences from 1 through 1"),
            (#"{"from":1,"through":1,"committed":1,"refused":{"1":"no such thing!"}}"#, "'outcomes.refused'"),
        ] {
            let (s, error) = try poll(bp, cert: us, #"{"ackedThrough":1,"epoch":"\#(epoch)","timeoutMs":0,"outcomes":\#(outcomes)}"#)
            XCTAssertEqual(s, 400, outcomes)
            XCTAssertEqual(error?["error"], "invalid_request", outcomes)
            XCTAssertTrue(error?["description"]?.stringValue?.contains(says) == true, "\(outcomes): \(String(describing: error))")
        }
        XCTAssertEqual(try BrokerStore(path: dir.file("broker")).feedPosition(target: "us-boundary").acked, 0, "nothing acknowledged")
        XCTAssertFalse(traceHops("olga").contains { $0["hop"] == "boundary acme-us" })

        // Acknowledged without outcomes: the hop says the boundary committed it, and that it did not say how.
        let (s, _) = try poll(bp, cert: us, #"{"ackedThrough":2,"epoch":"\#(epoch)","timeoutMs":0}"#)
        XCTAssertEqual(s, 200)
        let hop = try XCTUnwrap(traceHops("olga").first { $0["hop"] == "boundary acme-us" }, "\(traceHops("olga"))")
        XCTAssertEqual(hop["outcome"], "unreported")
        XCTAssertEqual(hop["trace"], "7ef92f3577b34da6a3ce929d0e0e4739")
    }
}
