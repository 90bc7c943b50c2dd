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
        for recovered in ["true", "false"] {
            XCTAssertTrue(
                metrics.contains(
                    #"scim_broker_downlink_untraced_events_total{domain="acme-us",target="us-boundary",recovered="\#(recovered)"} 0"#),
                "every trail record was read")
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

    /// Protocols 2 and 3 stay compatible: a poll without `outcomes` (a
    /// version 1 agent) is served and its acknowledgement recorded as
    /// `unreported`; malformed outcomes or app answers are refused with a
    /// precise 400 and acknowledge nothing (invariant 7); an app answer about
    /// a change the feed did not carry under that trace is not recorded.
    func testAPollWithoutOutcomesIsUnderstoodAndBadOutcomesAreRefused() throws {
        let (_, bp) = try startBroker(yaml: brokerYAML)
        let (_, dp) = try startAgent("de", cert: de, domain: "acme-de", brokerPort: bp)
        XCTAssertEqual(try createAtHQ(dp, "olga", trace: "7ef92f3577b34da6a3ce929d0e0e4739"), 201)
        XCTAssertEqual(try createAtHQ(dp, "pia", trace: "8ff92f3577b34da6a3ce929d0e0e4730"), 201)
        XCTAssertTrue(eventually(seconds: 20) { self.applied()["acme-de/\(self.deID)"] == 2 })
        let epoch = "0123456789abcdef0123456789abcdef"
        let (status, first) = try poll(bp, cert: us, #"{"ackedThrough":0,"epoch":"\#(epoch)","timeoutMs":0}"#)
        XCTAssertEqual(status, 200)
        XCTAssertEqual(first?["protocol"], 5)
        XCTAssertEqual(first?["events"]?.arrayValue?.count, 2)
        XCTAssertEqual(
            first?["events"]?.arrayValue?.first?["txn"], "7ef92f3577b34da6a3ce929d0e0e4739", "the trace id travels with the event")
        // `after`: what follows the last received, while it is being committed.
        let (_, next) = try poll(bp, cert: us, #"{"ackedThrough":0,"after":1,"epoch":"\#(epoch)","timeoutMs":0}"#)
        XCTAssertEqual(next?["events"]?.arrayValue?.compactMap { $0["seq"]?.numberValue?.integer }, [2])
        let (behind, said) = try poll(bp, cert: us, #"{"ackedThrough":1,"after":0,"epoch":"\#(epoch)","timeoutMs":0}"#)
        XCTAssertEqual(behind, 400)
        XCTAssertTrue(said?["description"]?.stringValue?.contains("at least 'ackedThrough'") == true, "\(String(describing: said))")

        let answer = #""id":"x","trace":"t","event":"upsert","at":1"#
        for (outcomes, says) in [
            (#""outcomes":{"from":0,"through":1,"committed":1}"#, "'outcomes' must name the feed sequences"),
            (#""outcomes":{"from":1,"through":2,"committed":1}"#, "at most 'ackedThrough'"),
            (#""outcomes":{"from":1,"through":1}"#, "'outcomes.committed'"),
            // A commit time whose µs overflow: it crashed the broker at every retry of the poll.
            (#""outcomes":{"from":1,"through":1,"committed":253402300800000}"#, "at most 253402300799999"),
            (
                #""outcomes":{"from":1,"through":1,"committed":1,"notAccepted":[5]}"#,
                "'outcomes.notAccepted' must list sequences from 1 through 1"
            ),
            (#""outcomes":{"from":1,"through":1,"committed":1,"refused":{"1":"no such thing!"}}"#, "'outcomes.refused'"),
            (#""appOutcomes":{}"#, "'appOutcomes' must be an array"),
            (#""appOutcomes":[{\#(answer),"outcome":"lost"}]"#, "'appOutcomes[0]': 'outcome' must be delivered, unchanged or refused"),
            (
                #""appOutcomes":[{\#(answer),"outcome":"delivered"},{\#(answer),"outcome":"delivered","status":42}]"#,
                "'appOutcomes[1]': 'status' must be an HTTP status"
            ),
            (#""appOutcomes":[{\#(answer),"outcome":"refused","scimType":"in valid"}]"#, "'scimType' must be a scimType"),
            (#""appOutcomes":[{\#(answer),"outcome":"delivered","target":"a/b"}]"#, "'target' must be the local target's name"),
            (#""appOutcomes":[{"trace":"t","event":"upsert","outcome":"delivered","at":1}]"#, "'id' must be the broker id"),
            // An answer time whose µs overflow: like `committed`, it crashed the broker at every retry of the poll.
            (#""appOutcomes":[{\#(answer.replacing("\"at\":1", with: "\"at\":253402300800000")),"outcome":"delivered"}]"#, "'at' must be"),
        ] {
            let (s, error) = try poll(bp, cert: us, #"{"ackedThrough":1,"epoch":"\#(epoch)","timeoutMs":0,\#(outcomes)}"#)
            XCTAssertEqual(s, 400, outcomes)
            // A report's part is named, so that the agent drops it and polls again without it (DownlinkReportTests).
            XCTAssertEqual(error?["error"], "invalid_report", outcomes)
            XCTAssertEqual(error?["report"]?.stringValue, outcomes.hasPrefix(#""outcomes""#) ? "outcomes" : "appOutcomes", outcomes)
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

        // App answers (protocol 3): one about olga's change under its trace is recorded; one naming
        // pia's resource under olga's trace, or olga's under a made-up trace, is not.
        let ids =
            first?["events"]?.arrayValue?.compactMap {
                $0["events"]?.objectValue?.members.first?.1["ref"]?.stringValue?.split(separator: "/").last.map(String.init)
            } ?? []
        XCTAssertEqual(ids.count, 2)
        let answers = [
            (ids[0], "7ef92f3577b34da6a3ce929d0e0e4739"), (ids[1], "7ef92f3577b34da6a3ce929d0e0e4739"),
            (ids[0], "00000000000000000000000000000001"),
        ].map {
            #"{"id":"\#($0.0)","trace":"\#($0.1)","event":"upsert","outcome":"delivered","status":201,"target":"crm","at":\#(Int64(Date().timeIntervalSince1970 * 1000))}"#
        }
        let (taken, _) = try poll(
            bp, cert: us, #"{"ackedThrough":2,"epoch":"\#(epoch)","timeoutMs":0,"appOutcomes":[\#(answers.joined(separator: ","))]}"#)
        XCTAssertEqual(taken, 200)
        XCTAssertEqual(traceHops("olga").last?["hop"], "app crm", "\(traceHops("olga"))")
        XCTAssertEqual(traceHops("olga").filter { $0["hop"] == "app crm" }.count, 1)
        XCTAssertFalse(traceHops("pia").contains { $0["hop"] == "app crm" }, "\(traceHops("pia"))")
        XCTAssertTrue(traceHops("00000000000000000000000000000001").isEmpty)

        // Another store (a re-imaged agent): the feed starts again. An agent that says no protocol
        // gets the users and no end of the resync; one that says 5 gets it last, naming no resource.
        func resynced(_ epoch: String, _ protocolField: String) throws -> [JSON] {
            XCTAssertTrue(
                eventually(seconds: 20) {
                    (try? self.poll(bp, cert: self.us, #"{"ackedThrough":0,"epoch":"\#(epoch)","timeoutMs":0\#(protocolField)}"#).0)
                        == 200
                }, "the resync ends")
            let (status, page) = try poll(
                bp, cert: us, #"{"ackedThrough":0,"epoch":"\#(epoch)","timeoutMs":0,"maxEvents":100\#(protocolField)}"#)
            XCTAssertEqual(status, 200)
            return page?["events"]?.arrayValue ?? []
        }
        let complete = "urn:scim-edge:params:event:feed:resync:complete"
        let old = try resynced("1123456789abcdef0123456789abcdef", "")
        XCTAssertEqual(old.count, 2, "\(old)")
        XCTAssertFalse(old.contains { $0["events"]?.objectValue?[complete] != nil })
        XCTAssertEqual(old.compactMap { $0["seq"]?.numberValue?.integer }, [1, 2], "no sequence taken by what an older agent does not get")
        let new = try resynced("2123456789abcdef0123456789abcdef", #","protocol":5"#)
        XCTAssertEqual(new.count, 3, "\(new)")
        XCTAssertNotNil(new.last?["events"]?.objectValue?[complete], "the end of the resync comes last")
        XCTAssertNil(new.last?["events"]?.objectValue?[complete]?["ref"])
        XCTAssertEqual(new.compactMap { $0["seq"]?.numberValue?.integer }, [1, 2, 3])
    }
}
