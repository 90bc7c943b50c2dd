import EdgeAgent
import EdgeBroker
import EdgeHTTP
import EdgeTLS
import EdgeTestSupport
import EdgeTools
import Foundation
import SCIM
import XCTest

/// Local targets: an agent provisions the reference SCIM server
/// (scim2-server) inside its boundary with the broker's delivery engine,
/// from its own IdP's writes and from what enters through the downlink.
/// Real processes, real sockets, SIGKILL.
final class LocalTargetTests: FederationTestCase {
    /// A proxy in front of the reference server: it records every create
    /// the server took (by userName), refuses the users the test names, and
    /// keeps the answer to one create to itself (the server made the
    /// account; the agent never learns it).
    final class AppProxy: Sendable {
        let harness: ServerHarness
        let created = Locked<[String: Int]>([:])
        let refuse = Locked<Set<String>>([])
        let swallow = Locked<String?>(nil)
        let swallowed = Locked(false)
        var port: Int { harness.port }

        init(to appPort: Int) throws {
            let created = self.created, refuse = self.refuse, swallow = self.swallow, swallowed = self.swallowed
            harness = try ServerHarness { request, _, responder in
                let name = request.method == "POST" ? (try? JSONParser.parse(request.body))?["userName"]?.stringValue : nil
                if let name, refuse.current.contains(name) {
                    responder.respond(
                        HTTPResponse(
                            status: 400, headers: ["Content-Type": "application/scim+json"],
                            body: Array(
                                #"{"schemas":["urn:ietf:params:scim:api:messages:2.0:Error"],"status":"400","scimType":"invalidValue","detail":"not here"}"#
                                    .utf8)))
                    return
                }
                let r = forward(request, to: appPort)
                if let name, r.status == 201 { created.withLock { $0[name, default: 0] += 1 } }
                if let name, name == swallow.current {
                    swallowed.withLock { $0 = true }
                    return  // never answered: the agent is killed waiting for it
                }
                responder.respond(r)
            }
        }
    }

    func targetYAML(_ port: Int, routes: String = "[{}]", rate: Int = 2000) -> String {
        """
        targets:
          - name: app
            url: http://127.0.0.1:\(port)
            tokenFile: \(dir.write("app.token", "ref-token\n"))
            rate: {requestsPerSecond: \(rate), concurrency: 2}
            routes: \(routes)

        """
    }

    /// A standalone agent (no broker) with local targets, from a YAML file.
    func startLocalAgent(_ name: String, _ extraYAML: String, port: Int = 0) throws -> (ChildProcess, Int) {
        let file = dir.write(
            "\(name).yaml",
            """
            dataDir: \(dir.file(name))
            listen: 127.0.0.1:\(port)
            admin: {listen: 127.0.0.1:0}

            """ + extraYAML)
        let child = try ChildProcess(productsDirectory + "/scim-edge", ["serve", "--config", file, "--token", "t"])
        children.append(child)
        return (child, try self.port(of: child, "scim-edge"))
    }

    func edgeCLI(_ args: [String]) throws -> (Int32, String) { try cli("scim-edge", args) }

    /// What the reference server holds, by userName (or displayName).
    func held(_ appPort: Int, _ endpoint: String = "/Users", by key: String = "userName") -> [String: JSON] {
        resources(appPort, endpoint, by: key, token: "ref-token", prefix: "")
    }

    func metric(_ child: ChildProcess, _ name: String) -> Double? {
        guard let text = try? brokerMetrics(child) else { return nil }
        return text.split(separator: "\n").first { $0.hasPrefix(name + " ") }.flatMap { Double($0.split(separator: " ").last!) }
    }

    /// The agent's users and a group reach the app; the agent is SIGKILLed
    /// with its queue half sent and a create taken by the app but not yet
    /// answered, and after the restart every user is there, each created
    /// exactly once (the create whose answer was lost is found by its
    /// externalId and adopted, not made twice); a user the app refuses is a
    /// dead letter that blocks nothing, and `targets retry` delivers it.
    func testTheAgentsWritesReachTheAppExactlyOnceAcrossAKillAndARefusalIsADeadLetter() throws {
        let (_, refPort) = try startReferenceServer()
        let app = try AppProxy(to: refPort)
        app.refuse.withLock { $0.insert("refused") }
        app.swallow.withLock { $0 = "u5" }
        // Slow enough that the kill finds the queue half sent.
        var (agent, ap) = try startLocalAgent("local", targetYAML(app.port, rate: 15))
        XCTAssertEqual(try createUser(ap, "refused"), 201, "the IdP's write is taken: the app's refusal is the target's business")
        let total = 40
        for k in 0..<total { XCTAssertEqual(try createUser(ap, "u\(k)"), 201) }
        XCTAssertTrue(eventually(seconds: 30) { app.swallowed.current }, "\(app.created.current)")
        agent.signal(SIGKILL)
        _ = agent.waitForExit()
        let before = app.created.current.count
        XCTAssertLessThan(before, total, "killed mid-queue")
        XCTAssertEqual(app.created.current["u5"], 1, "u5 is at the app; the agent did not hear it")
        (agent, ap) = try startLocalAgent("local", targetYAML(app.port), port: ap)
        XCTAssertTrue(
            eventually(seconds: 60) { self.held(refPort).count == total }, "\(held(refPort).keys.sorted()) \(agent.output.suffix(10))")
        XCTAssertTrue(eventually(seconds: 5) { app.created.current.count == total })
        XCTAssertEqual(app.created.current.filter { $0.value != 1 }, [:], "each user created exactly once")
        XCTAssertEqual(held(refPort).count, total, "no second account for anyone")
        XCTAssertTrue(agent.output.contains { $0.contains("adopted an existing account") }, "u5 was found and adopted")
        // Every account is named by the agent's id (externalId), and a group by its members' accounts there.
        let store = try AgentStore(path: dir.file("local"), registry: .standard)
        let ids = try store.query(store.registry.resourceType("User")!, filter: nil, scanBudget: 1000).compactMap { $0["id"]?.stringValue }
        XCTAssertEqual(Set(held(refPort).values.compactMap { $0["externalId"]?.stringValue }), Set(ids).subtracting(try refusedID(ap)))
        let members = (0..<3).compactMap { k in
            try? scim(ap, "GET", "/Users?filter=userName%20eq%20%22u\(k)%22").1?["Resources"]?.arrayValue?.first?["id"]?.stringValue
        }
        XCTAssertEqual(
            try scim(
                ap, "POST", "/Groups",
                #"{"schemas":["urn:ietf:params:scim:schemas:core:2.0:Group"],"displayName":"team","members":[\#(members.map { #"{"value":"\#($0)"}"# }.joined(separator: ","))]}"#
            ).0, 201)
        XCTAssertTrue(
            eventually(seconds: 20) { self.held(refPort, "/Groups", by: "displayName")["team"]?["members"]?.arrayValue?.count == 3 },
            "\(held(refPort, "/Groups", by: "displayName"))")
        let appIDs = Set(["u0", "u1", "u2"].compactMap { held(refPort)[$0]?["id"]?.stringValue })
        XCTAssertEqual(
            Set(held(refPort, "/Groups", by: "displayName")["team"]?["members"]?.arrayValue?.compactMap { $0["value"]?.stringValue } ?? []),
            appIDs, "members named by the app's own ids")

        // The refusal: a dead letter with the app's answer, the others flowed past it.
        let letters = try edgeCLI(["targets", "deadletter", "list", "--data-dir", dir.file("local")])
        XCTAssertEqual(letters.0, 0, letters.1)
        XCTAssertTrue(letters.1.contains("app\t#1") && letters.1.contains("POST /Users → 400") && letters.1.contains("not here"), letters.1)
        app.refuse.withLock { $0.removeAll() }
        let retry = try edgeCLI(["targets", "deadletter", "retry", "--data-dir", dir.file("local"), "app"])
        XCTAssertEqual(retry.1, "1 queued again for app\n")
        XCTAssertTrue(eventually(seconds: 20) { self.held(refPort)["refused"] != nil })
        XCTAssertEqual(
            try edgeCLI(["targets", "deadletter", "list", "--data-dir", dir.file("local")]).1, "nothing to show: no dead letters\n")
        XCTAssertTrue(eventually(seconds: 10) { self.metric(agent, #"scim_edge_target_queue_depth{target="app"}"#) == 0 })
        XCTAssertGreaterThan(metric(agent, #"scim_edge_target_delivered_total{target="app"}"#) ?? 0, 0)
        let status = try edgeCLI(["targets", "status", "--data-dir", dir.file("local")])
        XCTAssertTrue(
            eventually(seconds: 5) {
                ((try? self.edgeCLI(["targets", "status", "--data-dir", self.dir.file("local")]).1) ?? "").hasPrefix(
                    "app\tclosed\tqueued 0")
            }, status.1)
        let trace = try edgeCLI(["targets", "trace", "--data-dir", dir.file("local"), "u\(total - 1)"])
        XCTAssertEqual(trace.0, 0, trace.1)
        XCTAssertTrue(trace.1.contains("target app") && trace.1.contains("POST /Users → 201"), trace.1)
        // `--limit`: the refused user's earliest hop (its acceptance; the dead letter and the retry come later), and a note.
        let limited = try edgeCLI(["targets", "trace", "--data-dir", dir.file("local"), "refused", "--limit", "1"])
        XCTAssertEqual(limited.0, 0, limited.1)
        let hops = limited.1.split(separator: "\n").filter { !$0.hasPrefix("\t") && !$0.hasPrefix("the earliest ") }
        XCTAssertEqual(hops.count, 1, limited.1)
        XCTAssertFalse(limited.1.contains("→ 201"), limited.1)
        XCTAssertTrue(limited.1.contains("the earliest 1 of ") && limited.1.contains("--limit N prints more"), limited.1)
    }

    /// The ids of users the app has not got (those it refused), by the agent's list.
    func refusedID(_ ap: Int) throws -> Set<String> {
        Set(
            [try scim(ap, "GET", "/Users?filter=userName%20eq%20%22refused%22").1?["Resources"]?.arrayValue?.first?["id"]?.stringValue]
                .compactMap { $0 })
    }

    /// The broker routes acme-de's users into boundary acme-us, whose agent
    /// it is not configured to reach beyond that feed.
    let boundaryBrokerYAML = """
        targets:
          - name: us-boundary
            domain: acme-us
            routes: [{domains: [acme-de]}]

        """

    /// acme-us's agent: the inbound policy (HQ's users as guests, named
    /// `{userName}@{domain}`) and its local app at `appPort`.
    func startSubsidiary(brokerPort bp: Int, appPort: Int, port: Int = 0, extraInbound: String = "") throws -> (ChildProcess, Int) {
        let file = dir.write(
            "us.yaml",
            """
            dataDir: \(dir.file("us"))
            listen: 127.0.0.1:\(port)
            admin: {listen: 127.0.0.1:0}
            broker: {url: "https://127.0.0.1:\(bp)", ca: \(ca!), cert: \(us.0), key: \(us.1), domain: acme-us, agent: us}
            inbound:
              accept: [{domains: [acme-de]}]
              map:
                set: {userType: Guest}
                userName: "{userName}@{domain}"
              waitMs: 1000
            \(extraInbound)
            """ + targetYAML(appPort, routes: "[{domains: [acme-de, acme-us]}]"))
        let child = try ChildProcess(productsDirectory + "/scim-edge", ["serve", "--config", file, "--token", "t"])
        children.append(child)
        return (child, try self.port(of: child, "scim-edge"))
    }

    /// An HQ user enters the subsidiary through the downlink and reaches the
    /// subsidiary's own app there with the inbound mapping applied (the
    /// broker is not configured to reach that app at all); the
    /// subsidiary's own users reach it too; a deactivation in HQ shows at
    /// the app; a foreign group arrives with its members as the app's ids.
    func testAForeignUserFromTheDownlinkReachesTheLocalAppMapped() throws {
        let (_, refPort) = try startReferenceServer()
        let (_, bp) = try startBroker(yaml: boundaryBrokerYAML)
        let (_, dp) = try startAgent("de", cert: de, domain: "acme-de", brokerPort: bp)
        let (usAgent, up) = try startSubsidiary(brokerPort: bp, appPort: refPort)
        XCTAssertEqual(try createUser(up, "bob"), 201, "the subsidiary's own user")
        XCTAssertEqual(
            try scim(
                dp, "POST", "/Users", #"{"schemas":["urn:ietf:params:scim:schemas:core:2.0:User"],"userName":"alice","title":"CFO"}"#
            ).0, 201)
        XCTAssertTrue(
            eventually(seconds: 30) { self.held(refPort)["alice@acme-de"] != nil }, "\(held(refPort).keys) \(usAgent.output.suffix(10))")
        let alice = try XCTUnwrap(held(refPort)["alice@acme-de"])
        XCTAssertEqual(alice["userType"], "Guest", "the inbound mapping, applied before the local app sees it")
        XCTAssertEqual(alice["title"], "CFO")
        XCTAssertNotNil(held(refPort)["bob"], "the boundary's own users reach its app too")
        let local = try XCTUnwrap(
            try scim(up, "GET", "/Users?filter=userName%20eq%20%22alice@acme-de%22").1?["Resources"]?.arrayValue?.first)
        XCTAssertEqual(alice["externalId"], local["id"], "named by its id in this boundary (the broker id)")

        // A foreign group, with alice as its member there.
        let hqAlice = try XCTUnwrap(
            try scim(dp, "GET", "/Users?filter=userName%20eq%20%22alice%22").1?["Resources"]?.arrayValue?.first?["id"]?.stringValue)
        XCTAssertEqual(
            try scim(
                dp, "POST", "/Groups",
                #"{"schemas":["urn:ietf:params:scim:schemas:core:2.0:Group"],"displayName":"finance","members":[{"value":"\#(hqAlice)"}]}"#
            ).0, 201)
        XCTAssertTrue(
            eventually(seconds: 30) {
                self.held(refPort, "/Groups", by: "displayName")["finance"]?["members"]?.arrayValue?.first?["value"] == alice["id"]
            }, "\(held(refPort, "/Groups", by: "displayName"))")

        // Deactivated in HQ: inactive at the subsidiary's app.
        XCTAssertEqual(
            try scim(
                dp, "PATCH", "/Users/\(hqAlice)",
                #"{"schemas":["urn:ietf:params:scim:api:messages:2.0:PatchOp"],"Operations":[{"op":"replace","path":"active","value":false}]}"#
            ).0, 200)
        XCTAssertTrue(eventually(seconds: 30) { self.held(refPort)["alice@acme-de"]?["active"] == .bool(false) }, "\(held(refPort))")
        XCTAssertEqual(held(refPort).count, 2, "alice and bob, once each")
        let trace = try edgeCLI(["targets", "trace", "--data-dir", dir.file("us"), "alice@acme-de"])
        XCTAssertTrue(trace.1.contains("target app"), trace.1)
    }

    /// A broker downgraded to downlink protocol 2 while the agent holds its
    /// app's answers: the poll that carried them is answered by a broker that
    /// ignores them (its answer says 2), so the agent keeps them and sends
    /// them again once a broker of 3 answers (a fixture plays the broker).
    func testAppAnswersIgnoredByADowngradedBrokerAreSentAgain() throws {
        let (_, refPort) = try startReferenceServer()
        struct Feed {
            var polls = 0
            var carried: [String] = []  // the app answers' ids in each poll that carried some
            var downgradedAt: Int?
        }
        let feed = Locked(Feed())
        let trace = "7af92f3577b34da6a3ce929d0e0e4731"
        let create: JSON = [
            "seq": 1, "jti": "f-1", "txn": .string(trace), "ts": 1, "domain": "acme-de",
            "events": [
                "urn:ietf:params:SCIM:event:prov:create:full": [
                    "ref": "/Users/b0001", "data": ["schemas": ["urn:ietf:params:scim:schemas:core:2.0:User"], "userName": "alice"],
                ]
            ],
        ]
        let fake = try ServerHarness(tls: TLSConfiguration(certificateChainFile: broker.0, privateKeyFile: broker.1, trustRootsFile: ca)) {
            request, _, responder in
            guard request.target == BrokerService.feedPath, let poll = try? JSONParser.parse(request.body) else {
                return responder.respond(
                    HTTPResponse(status: 200, headers: ["Content-Type": "application/json"], body: Array(#"{"ackedThrough":0}"#.utf8)))
            }
            let (version, events): (Int, [JSON]) = feed.withLock { f in
                f.polls += 1
                let ids = poll["appOutcomes"]?.arrayValue?.compactMap { $0["id"]?.stringValue } ?? []
                if !ids.isEmpty { f.carried.append(ids.joined(separator: ",")) }
                // The first poll that carries app answers meets the downgraded broker; the others one of 3.
                if !ids.isEmpty && f.downgradedAt == nil { f.downgradedAt = f.polls }
                let acked = poll["ackedThrough"]?.numberValue?.integer ?? 0
                return (f.downgradedAt == f.polls ? 2 : 3, acked == 0 ? [create] : [])
            }
            if events.isEmpty { usleep(100_000) }  // a short hold, as a broker holds an empty poll
            let body: JSON = ["protocol": .int(version), "lastSeq": 1, "ackedThrough": 0, "moreAvailable": false, "events": .array(events)]
            responder.respond(HTTPResponse(status: 200, headers: ["Content-Type": "application/json"], body: body.serialized()))
        }
        defer { _ = fake.stop() }
        let (usAgent, _) = try startSubsidiary(brokerPort: fake.port, appPort: refPort)
        XCTAssertTrue(
            eventually(seconds: 30) { feed.current.carried.count >= 2 }, "\(feed.current) \(usAgent.output.suffix(10))")
        XCTAssertNotNil(held(refPort)["alice@acme-de"])
        let carried = feed.current.carried
        XCTAssertEqual(carried.prefix(2), ["b0001", "b0001"], "the answer the downgraded broker ignored goes again")
        XCTAssertTrue(eventually(seconds: 10) { self.metric(usAgent, "scim_edge_downlink_app_outcomes_pending") == 0 })
    }

    /// One trace from HQ's IdP request to the answer of the subsidiary's
    /// own app (issue 16, point 5): the agent reports its app's answer up
    /// with a later poll (downlink protocol 3), and `scim-broker trace` ends
    /// with it, at its time, a refusal by the app too (its kind only: the
    /// app's detail stays inside). With `reportApps: anonymous` the answer
    /// still goes up, the app's name withheld; nothing of the subsidiary's
    /// own users goes up at all.
    func testOneTraceEndsWithTheLocalAppsAnswerARefusalToo() throws {
        let (_, refPort) = try startReferenceServer()
        let app = try AppProxy(to: refPort)
        app.refuse.withLock { $0.insert("carol@acme-de") }
        let (broker, bp) = try startBroker(yaml: boundaryBrokerYAML)
        let (_, dp) = try startAgent("de", cert: de, domain: "acme-de", brokerPort: bp)
        var (usAgent, up) = try startSubsidiary(brokerPort: bp, appPort: app.port)
        XCTAssertEqual(try createUser(up, "bob"), 201, "the subsidiary's own user: its delivery is nobody else's business")
        let delivered = "4bf92f3577b34da6a3ce929d0e0e4736", refused = "5cf92f3577b34da6a3ce929d0e0e4737"
        XCTAssertEqual(try createAtHQ(dp, "alice", trace: delivered), 201)
        XCTAssertEqual(try createAtHQ(dp, "carol", trace: refused), 201)
        func appHop(_ trace: String) -> JSON? { traceHops(trace).first { $0["hop"]?.stringValue?.hasPrefix("app") == true } }
        XCTAssertTrue(
            eventually(seconds: 30) { appHop(delivered) != nil && appHop(refused) != nil },
            "\(traceHops(delivered)) \(usAgent.output.suffix(10))")

        let hops = traceHops(delivered)
        XCTAssertEqual(
            hops.compactMap { $0["hop"]?.stringValue },
            ["agent accept", "broker apply", "feed us-boundary", "boundary acme-us", "app app"], "\(hops)")
        let times = hops.compactMap { $0["at"]?.numberValue?.integer }
        XCTAssertEqual(times.count, 5)
        XCTAssertEqual(times, times.sorted(), "each hop at its time, in the order the change took them")
        XCTAssertTrue(hops.allSatisfy { $0["trace"]?.stringValue == delivered })
        let answer = try XCTUnwrap(hops.count == 5 ? hops[4] : nil)
        XCTAssertEqual(answer["status"], 201)
        XCTAssertEqual(answer["outcome"], "delivered")
        XCTAssertEqual(answer["event"], "upsert")
        XCTAssertEqual(answer["boundary"], "acme-us")
        XCTAssertNotNil(held(refPort)["alice@acme-de"])

        let refusal = try XCTUnwrap(appHop(refused))
        XCTAssertEqual(refusal["hop"], "app app")
        XCTAssertEqual(refusal["outcome"], "refused")
        XCTAssertEqual(refusal["status"], 400)
        XCTAssertEqual(refusal["scimType"], "invalidValue")
        XCTAssertFalse(
            String(decoding: refusal.serialized(), as: UTF8.self).contains("not here"), "the app's detail stays inside: \(refusal)")
        XCTAssertEqual(traceHops(refused).last?["hop"], "app app", "the refusal ends the trace")

        // The text form, as an operator reads it.
        let text = try brokerCLI(["trace", "--data-dir", dir.file("broker"), delivered]).1
        XCTAssertTrue(text.contains("\tapp app\tevent upsert outcome delivered status 201"), text)
        let refusedText = try brokerCLI(["trace", "--data-dir", dir.file("broker"), refused]).1
        XCTAssertTrue(refusedText.contains("status 400 scimType invalidValue"), refusedText)
        let metrics = try brokerMetrics(broker)
        for (outcome, n) in [("delivered", 1), ("refused", 1), ("unmatched", 0)] {
            XCTAssertTrue(
                metrics.contains(
                    #"scim_broker_downlink_app_outcomes_total{domain="acme-us",target="us-boundary",outcome="\#(outcome)"} \#(n)"#),
                "\(outcome): " + metrics.split(separator: "\n").filter { $0.contains("app_outcomes") }.joined(separator: "\n"))
        }
        XCTAssertTrue(eventually(seconds: 10) { self.metric(usAgent, "scim_edge_downlink_app_outcomes_pending") == 0 })

        // The name withheld: the answer still ends the trace, as `app`.
        usAgent.signal(SIGTERM)
        _ = usAgent.waitForExit()
        (usAgent, up) = try startSubsidiary(brokerPort: bp, appPort: app.port, port: up, extraInbound: "  reportApps: anonymous\n")
        let withheld = "6df92f3577b34da6a3ce929d0e0e4738"
        XCTAssertEqual(try createAtHQ(dp, "dora", trace: withheld), 201)
        XCTAssertTrue(eventually(seconds: 30) { appHop(withheld) != nil }, "\(traceHops(withheld)) \(usAgent.output.suffix(10))")
        XCTAssertEqual(appHop(withheld)?["hop"], "app")
        XCTAssertEqual(appHop(withheld)?["status"], 201)
        XCTAssertFalse(String(decoding: try XCTUnwrap(appHop(withheld)).serialized(), as: UTF8.self).contains("\"app app\""))
    }
}
