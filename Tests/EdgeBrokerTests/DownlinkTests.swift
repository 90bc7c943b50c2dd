import EdgeAgent
import EdgeBroker
import EdgeTestSupport
import EdgeTools
import Foundation
import SCIM
import XCTest

/// The downlink with real processes over mutual TLS: acme-de ("HQ") relays
/// up, and the broker routes its users to the boundary acme-us ("the
/// subsidiary"), whose agent fetches them and keeps them by its own
/// inbound policy.
final class DownlinkTests: FederationTestCase {
    /// The broker routes every domain to acme-us, its own included: the
    /// destination must still never get its own resources back.
    let brokerYAML = """
        targets:
          - name: us-boundary
            domain: acme-us
            routes:
              - domains: [acme-de, acme-us]

        """

    /// An agent of acme-us (or claiming to be) with an inbound policy, from a YAML file.
    func startInboundAgent(
        _ name: String, cert: (String, String), domain: String = "acme-us", brokerPort: Int, waitMs: Int = 2000, maxEvents: Int = 100,
        accept: String = "- domains: [acme-de]\n      types: [User, Group]"
    ) throws -> (ChildProcess, Int) {
        let file = dir.write(
            "\(name).yaml",
            """
            dataDir: \(dir.file(name))
            listen: 127.0.0.1:0
            admin: {listen: 127.0.0.1:0}
            broker: {url: "https://127.0.0.1:\(brokerPort)", ca: \(ca!), cert: \(cert.0), key: \(cert.1), domain: \(domain), agent: \(name)}
            inbound:
              accept:
                \(accept)
              map:
                set: {userType: Guest}
                userName: "{userName}@{domain}"
                drop: [title]
              waitMs: \(waitMs)
              maxEventsPerPoll: \(maxEvents)

            """)
        let child = try ChildProcess(productsDirectory + "/scim-edge", ["serve", "--config", file, "--token", "t"])
        children.append(child)
        return (child, try self.port(of: child, "scim-edge"))
    }

    func users(_ port: Int, _ filter: String) throws -> [JSON] {
        let q = filter.addingPercentEncoding(withAllowedCharacters: .alphanumerics) ?? ""
        return try scim(port, "GET", "/Users?filter=\(q)").1?["Resources"]?.arrayValue ?? []
    }

    func user(_ port: Int, _ userName: String) throws -> JSON? { try users(port, "userName eq \"\(userName)\"").first }

    /// PATCH active=false at an agent; the status.
    func deactivate(_ port: Int, _ id: String) throws -> Int {
        try scim(
            port, "PATCH", "/Users/\(id)",
            #"{"schemas":["urn:ietf:params:scim:api:messages:2.0:PatchOp"],"Operations":[{"op":"replace","path":"active","value":false}]}"#
        ).0
    }

    func foreign(_ name: String) -> [String: Int] {
        (try? AgentStore(path: dir.file(name), registry: .standard).foreignCounts()) ?? [:]
    }

    func metric(_ child: ChildProcess, _ name: String) -> Double? {
        guard let text = try? brokerMetrics(child) else { return nil }
        return text.split(separator: "\n").first { $0.hasPrefix(name + " ") || $0.hasPrefix(name + "{") }
            .flatMap { Double($0.split(separator: " ").last!) }
    }

    /// An HQ user reaches the subsidiary with the inbound mapping applied, a
    /// deactivation shows there, the subsidiary's IdP cannot change it, and
    /// nothing of the subsidiary's own comes back down or goes back up.
    func testAnHQUserArrivesMappedReadOnlyAndNothingEchoes() throws {
        let (broker, bp) = try startBroker(yaml: brokerYAML)
        let (_, dp) = try startAgent("de", cert: de, domain: "acme-de", brokerPort: bp)
        let (usAgent, up) = try startInboundAgent("us", cert: us, brokerPort: bp)
        XCTAssertEqual(try createUser(up, "bob"), 201, "the subsidiary's own user")
        XCTAssertEqual(
            try scim(
                dp, "POST", "/Users",
                #"{"schemas":["urn:ietf:params:scim:schemas:core:2.0:User"],"userName":"alice","title":"CFO","active":true}"#
            ).0, 201)
        XCTAssertTrue(eventually(seconds: 20) { (try? self.user(up, "alice@acme-de")) != nil }, "\(usAgent.output.suffix(20))")
        let alice = try XCTUnwrap(try user(up, "alice@acme-de"))
        XCTAssertEqual(alice["userType"], "Guest", "map.set")
        XCTAssertNil(alice["title"], "map.drop")
        let id = try XCTUnwrap(alice["id"]?.stringValue)
        XCTAssertEqual(foreign("us"), ["acme-de": 1])

        // The subsidiary's IdP may not change it: 400 mutability, and nothing changes.
        let version = alice["meta"]?["version"]
        for (method, body) in [
            ("PUT", #"{"schemas":["urn:ietf:params:scim:schemas:core:2.0:User"],"userName":"mallory"}"#),
            (
                "PATCH",
                #"{"schemas":["urn:ietf:params:scim:api:messages:2.0:PatchOp"],"Operations":[{"op":"replace","path":"active","value":false}]}"#
            ),
            ("DELETE", ""),
        ] {
            let (status, error) = try scim(up, method, "/Users/\(id)", body)
            XCTAssertEqual(status, 400, "\(method) \(String(describing: error))")
            XCTAssertEqual(error?["scimType"], "mutability", method)
        }
        let after = try XCTUnwrap(try scim(up, "GET", "/Users/\(id)").1)
        XCTAssertEqual(after["meta"]?["version"], version)
        XCTAssertEqual(after["userName"], "alice@acme-de")

        // A deactivation in HQ shows there.
        let hqID = try XCTUnwrap(try user(dp, "alice")?["id"]?.stringValue)
        XCTAssertEqual(try deactivate(dp, hqID), 200)
        XCTAssertTrue(eventually(seconds: 20) { (try? self.user(up, "alice@acme-de"))??["active"] == .bool(false) })

        // Nothing echoes: bob never came down, alice never went up as acme-us's.
        XCTAssertTrue(eventually(seconds: 10) { self.applied()["acme-us/\(self.usID)"] == 1 }, "\(applied())")
        XCTAssertEqual(
            try BrokerStore(path: dir.file("broker")).resources(domain: "acme-us").compactMap { $0["userName"]?.stringValue }, ["bob"])
        XCTAssertEqual(foreign("us"), ["acme-de": 1], "bob is not foreign, and no second alice")
        XCTAssertEqual(try scim(up, "GET", "/Users?count=0").1?["totalResults"], 2)
        XCTAssertEqual(metric(usAgent, "scim_edge_downlink_events_refused_total"), 0)
        XCTAssertEqual(metric(usAgent, "scim_edge_downlink_events_not_accepted_total"), 0, "the feed never carried bob")
        // The backlog is visible at the broker.
        XCTAssertEqual(metric(broker, "scim_broker_downlink_unacked_events"), 0)
        XCTAssertNotNil(metric(broker, "scim_broker_downlink_queue_depth"))
    }

    /// A group arrives with its members, and a member change travels as a
    /// delta (the agent counts the delta events it applied).
    func testAGroupMemberChangeArrivesAsADelta() throws {
        let (_, bp) = try startBroker(yaml: brokerYAML)
        let (_, dp) = try startAgent("de", cert: de, domain: "acme-de", brokerPort: bp)
        let (usAgent, up) = try startInboundAgent("us", cert: us, brokerPort: bp)
        for name in ["g1", "g2", "g3"] { XCTAssertEqual(try createUser(dp, name), 201) }
        let ids = try ["g1", "g2", "g3"].map { try XCTUnwrap(try user(dp, $0)?["id"]?.stringValue) }
        let (status, group) = try scim(
            dp, "POST", "/Groups",
            #"{"schemas":["urn:ietf:params:scim:schemas:core:2.0:Group"],"displayName":"staff","members":[{"value":"\#(ids[0])"},{"value":"\#(ids[1])"}]}"#
        )
        XCTAssertEqual(status, 201)
        func staffMembers() -> Set<String>? {
            guard let g = try? scim(up, "GET", "/Groups?filter=displayName%20eq%20%22staff%22").1?["Resources"]?.arrayValue?.first
            else { return nil }
            return Set(g["members"]?.arrayValue?.compactMap { $0["display"]?.stringValue ?? $0["value"]?.stringValue } ?? [])
        }
        let usIDs = { try ["g1", "g2", "g3"].map { try XCTUnwrap(try self.user(up, "\($0)@acme-de")?["id"]?.stringValue) } }
        XCTAssertTrue(
            eventually(seconds: 20) { staffMembers()?.count == 2 },
            "\(String(describing: staffMembers())) \(usAgent.output.filter { !$0.contains("\"request\"") }.suffix(10))")
        let here = try usIDs()
        XCTAssertEqual(staffMembers(), Set(here[0..<2]))
        let deltasBefore = metric(usAgent, "scim_edge_downlink_membership_deltas_total") ?? -1
        let gid = try XCTUnwrap(group?["id"]?.stringValue)
        XCTAssertEqual(
            try scim(
                dp, "PATCH", "/Groups/\(gid)",
                #"{"schemas":["urn:ietf:params:scim:api:messages:2.0:PatchOp"],"Operations":[{"op":"add","path":"members","value":[{"value":"\#(ids[2])"}]},{"op":"remove","path":"members[value eq \"\#(ids[0])\"]"}]}"#
            ).0 / 100, 2)
        XCTAssertTrue(eventually(seconds: 20) { staffMembers() == Set(here[1...]) }, "\(String(describing: staffMembers()))")
        // The poller counts the delta when the commit's completion reaches its loop, just after readers see it.
        XCTAssertTrue(
            eventually(seconds: 10) { (self.metric(usAgent, "scim_edge_downlink_membership_deltas_total") ?? 0) > deltasBefore },
            "a delta, not the whole group")
        XCTAssertEqual(foreign("us"), ["acme-de": 4])
        // A rename (downlink protocol 4: the attributes alone) keeps the members held there.
        XCTAssertEqual(
            try scim(
                dp, "PATCH", "/Groups/\(gid)",
                #"{"schemas":["urn:ietf:params:scim:api:messages:2.0:PatchOp"],"Operations":[{"op":"replace","path":"displayName","value":"crew"}]}"#
            ).0, 200)
        func crew() -> JSON? { try? scim(up, "GET", "/Groups?filter=displayName%20eq%20%22crew%22").1?["Resources"]?.arrayValue?.first }
        XCTAssertTrue(eventually(seconds: 20) { crew() != nil }, "\(usAgent.output.suffix(10))")
        XCTAssertEqual(
            Set(crew()?["members"]?.arrayValue?.compactMap { $0["value"]?.stringValue } ?? []), Set(here[1...]), "its members kept")
        XCTAssertEqual(metric(usAgent, "scim_edge_downlink_events_refused_total"), 0)
    }

    /// The certificate decides the feed: an agent with acme-de's certificate
    /// that calls itself acme-us (and accepts acme-de's users) gets nothing,
    /// while acme-us's agent gets everything.
    func testTheCertificateDecidesTheFeed() throws {
        let (broker, bp) = try startBroker(yaml: brokerYAML)
        let (_, dp) = try startAgent("de", cert: de, domain: "acme-de", brokerPort: bp)
        let (impostor, _) = try startInboundAgent("impostor", cert: de, domain: "acme-us", brokerPort: bp)
        for k in 0..<5 { XCTAssertEqual(try createUser(dp, "hq\(k)"), 201) }
        XCTAssertTrue(
            eventually(seconds: 20) { (self.metric(impostor, "scim_edge_downlink_errors_total") ?? 0) >= 1 }, "the impostor is refused")
        XCTAssertTrue(impostor.output.contains { $0.contains("no feed for this domain") }, "\(impostor.output.suffix(10))")
        XCTAssertEqual(metric(broker, "scim_broker_downlink_acked_sequence"), 0)
        let (_, up) = try startInboundAgent("us", cert: us, brokerPort: bp)
        XCTAssertTrue(eventually(seconds: 20) { self.foreign("us") == ["acme-de": 5] }, "\(foreign("us"))")
        XCTAssertEqual(foreign("impostor"), [:], "nothing of acme-us's feed reached the impostor")
        XCTAssertEqual(try scim(up, "GET", "/Users?count=0").1?["totalResults"], 5)
    }

    /// An agent without an inbound policy never polls: nothing enters.
    func testAnAgentWithoutInboundPolicyAcceptsNothing() throws {
        let (broker, bp) = try startBroker(yaml: brokerYAML)
        let (_, dp) = try startAgent("de", cert: de, domain: "acme-de", brokerPort: bp)
        let (_, up) = try startAgent("us", cert: us, domain: "acme-us", brokerPort: bp)
        for k in 0..<3 { XCTAssertEqual(try createUser(dp, "hq\(k)"), 201) }
        XCTAssertTrue(eventually(seconds: 20) { self.applied()["acme-de/\(self.deID)"] == 3 })
        Thread.sleep(forTimeInterval: 1)
        XCTAssertEqual(try scim(up, "GET", "/Users?count=0").1?["totalResults"], 0)
        XCTAssertEqual(metric(broker, "scim_broker_downlink_polls_waiting"), 0)
        XCTAssertEqual(metric(broker, "scim_broker_downlink_acked_sequence"), 0)
    }

    /// While the boundary's agent is away its backlog grows, visible in
    /// `targets status` and /metrics (depth, age); it drains when the agent comes.
    func testTheBacklogIsVisibleWhileTheBoundaryIsAway() throws {
        let (broker, bp) = try startBroker(yaml: brokerYAML)
        let (_, dp) = try startAgent("de", cert: de, domain: "acme-de", brokerPort: bp)
        for k in 0..<7 { XCTAssertEqual(try createUser(dp, "away\(k)"), 201) }
        XCTAssertTrue(eventually(seconds: 20) { self.applied()["acme-de/\(self.deID)"] == 7 })
        // Counted on the thread pool: the first scrape starts the count, a later one shows it.
        XCTAssertTrue(eventually(seconds: 10) { self.metric(broker, "scim_broker_downlink_queue_depth") == 7 })
        XCTAssertGreaterThan(metric(broker, "scim_broker_downlink_queue_oldest_age_seconds") ?? 0, 0)
        let status = try ChildProcess(productsDirectory + "/scim-broker", ["targets", "status", "--config", dir.file("broker.yaml")])
        XCTAssertEqual(status.waitForExit(), 0)
        XCTAssertTrue(
            status.output.contains { $0.hasPrefix("us-boundary\tdownlink to acme-us\tqueued 7 (oldest 20") }, "\(status.output)")
        _ = try startInboundAgent("us", cert: us, brokerPort: bp)
        XCTAssertTrue(eventually(seconds: 20) { self.foreign("us") == ["acme-de": 7] })
        XCTAssertTrue(
            eventually(seconds: 30) {
                self.metric(broker, "scim_broker_downlink_queue_depth") == 0
                    && self.metric(broker, "scim_broker_downlink_unacked_events") == 0
            })
        XCTAssertEqual(metric(broker, "scim_broker_downlink_polls_waiting"), 1, "the agent's long poll is parked")
    }

    /// The subsidiary's appliance re-imaged (an empty data directory, the
    /// same certificate): its new store has another epoch, so the broker
    /// starts the feed again with everything the routes want, and nothing is
    /// lost for the new store (invariant 3).
    func testAReimagedSubsidiaryAgentGetsEverythingAgain() throws {
        let (_, bp) = try startBroker(yaml: brokerYAML)
        let (_, dp) = try startAgent("de", cert: de, domain: "acme-de", brokerPort: bp)
        var names: [String] = []
        for k in 0..<20 {
            XCTAssertEqual(try createUser(dp, "r\(k)"), 201)
            names.append("r\(k)")
        }
        var (usAgent, up) = try startInboundAgent("us", cert: us, brokerPort: bp)
        try assertArrivedOnce(names, port: up, agent: "us")
        usAgent.signal(SIGKILL)
        _ = usAgent.waitForExit()
        try FileManager.default.removeItem(atPath: dir.file("us"))
        for k in 20..<25 {
            XCTAssertEqual(try createUser(dp, "r\(k)"), 201)
            names.append("r\(k)")
        }
        (usAgent, up) = try startInboundAgent("us", cert: us, brokerPort: bp)
        try assertArrivedOnce(names, port: up, agent: "us")
        XCTAssertEqual(metric(usAgent, "scim_edge_downlink_protocol_errors_total"), 0)
    }

    /// Two agents of one boundary, each with its own store and the same
    /// certificate, both running (an HA pair both active): the newcomer is
    /// refused (409 `another_store`, counted) while the first polls, so the
    /// feed is not started again at every poll of either. When the first is
    /// gone, the second's store gets the feed, everything in it, once.
    func testASecondStoreOfOneBoundaryIsRefusedWhileTheFirstPolls() throws {
        let (broker, bp) = try startBroker(yaml: brokerYAML)
        let (_, dp) = try startAgent("de", cert: de, domain: "acme-de", brokerPort: bp)
        var names: [String] = []
        for k in 0..<10 {
            XCTAssertEqual(try createUser(dp, "h\(k)"), 201)
            names.append("h\(k)")
        }
        let (first, fp) = try startInboundAgent("us", cert: us, brokerPort: bp)
        try assertArrivedOnce(names, port: fp, agent: "us")
        let (second, sp) = try startInboundAgent("us-standby", cert: us, brokerPort: bp)
        XCTAssertTrue(eventually(seconds: 20) { (self.metric(broker, "scim_broker_downlink_store_conflicts_total") ?? 0) >= 2 })
        XCTAssertEqual(try createUser(dp, "h10"), 201)
        names.append("h10")
        try assertArrivedOnce(names, port: fp, agent: "us")
        XCTAssertEqual(metric(first, "scim_edge_downlink_resyncs_total"), 0, "the first store keeps its feed")
        XCTAssertEqual(foreign("us-standby"), [:], "the second store got nothing while the first polled")
        first.signal(SIGKILL)
        _ = first.waitForExit()
        try assertArrivedOnce(names, port: sp, agent: "us-standby")
        XCTAssertGreaterThanOrEqual(metric(second, "scim_edge_downlink_resyncs_total") ?? 0, 1)
    }

    /// The subsidiary's store restored from an older backup (same epoch,
    /// behind what it acknowledged): the broker starts the feed again, the
    /// agent counts from 0, and the users it lacked arrive (none skipped as
    /// a "resend"). A user deleted at HQ after the backup, which the restored
    /// store still holds, goes at the resync's end (downlink protocol 5):
    /// a departed employee keeps no account in the boundary.
    func testARestoredSubsidiaryStoreGetsWhatItLacks() throws {
        let (_, bp) = try startBroker(yaml: brokerYAML)
        let (_, dp) = try startAgent("de", cert: de, domain: "acme-de", brokerPort: bp)
        var names: [String] = []
        var made = 0
        func create(_ n: Int) throws {
            for _ in 0..<n {
                XCTAssertEqual(try createUser(dp, "b\(made)"), 201)
                names.append("b\(made)")
                made += 1
            }
        }
        try create(10)
        var (usAgent, up) = try startInboundAgent("us", cert: us, brokerPort: bp)
        try assertArrivedOnce(names, port: up, agent: "us")
        usAgent.signal(SIGKILL)
        _ = usAgent.waitForExit()
        try FileManager.default.copyItem(atPath: dir.file("us"), toPath: dir.file("us-backup"))
        (usAgent, up) = try startInboundAgent("us", cert: us, brokerPort: bp)
        // b0 changes after the backup: the restored store holds it as it was, and its new state is the feed's first event again.
        let b0 = try XCTUnwrap(try user(dp, "b0")?["id"]?.stringValue)
        XCTAssertEqual(try deactivate(dp, b0), 200)
        // b1 leaves HQ after the backup: the restored store holds it, and no feed event will name it again.
        let b1 = try XCTUnwrap(try user(dp, "b1")?["id"]?.stringValue)
        XCTAssertEqual(try scim(dp, "DELETE", "/Users/\(b1)").0, 204)
        names.removeAll { $0 == "b1" }
        try create(10)
        try assertArrivedOnce(names, port: up, agent: "us")
        usAgent.signal(SIGKILL)
        _ = usAgent.waitForExit()
        try FileManager.default.removeItem(atPath: dir.file("us"))
        try FileManager.default.moveItem(atPath: dir.file("us-backup"), toPath: dir.file("us"))
        try create(5)
        (usAgent, up) = try startInboundAgent("us", cert: us, brokerPort: bp)
        try assertArrivedOnce(names, port: up, agent: "us")
        XCTAssertGreaterThanOrEqual(metric(usAgent, "scim_edge_downlink_resyncs_total") ?? 0, 1)
        XCTAssertEqual(try user(up, "b0@acme-de")?["active"], false, "the restored store's old b0 was updated, not skipped")
        XCTAssertNil(try user(up, "b1@acme-de"), "the restored store's b1, deleted at HQ meanwhile, is gone")
        XCTAssertEqual(metric(usAgent, "scim_edge_downlink_stale_removed_total"), 1)
        XCTAssertEqual(
            try AgentStore(path: dir.file("us"), registry: .standard).staleSweepPending(), false, "the sweep ended with the resync")
    }

    /// The feed position at the broker, and what the agent committed.
    func positions(_ agent: String) -> (issued: UInt64, acked: UInt64, committed: UInt64)? {
        guard let p = try? BrokerStore(path: dir.file("broker")).feedPosition(target: "us-boundary"),
            let c = try? AgentStore(path: dir.file(agent), registry: .standard).downlinkSequence()
        else { return nil }
        return (p.issued, p.acked, c)
    }

    /// Every HQ user is at the subsidiary once, and the feed is committed and acknowledged through its end.
    func assertArrivedOnce(
        _ names: [String], groups: Int = 0, port: Int, agent: String, file: StaticString = #filePath, line: UInt = #line
    ) throws {
        XCTAssertTrue(
            eventually(seconds: 120) { self.foreign(agent) == ["acme-de": names.count + groups] }, "\(foreign(agent))", file: file,
            line: line)
        var seen: [String] = []
        for start in stride(from: 1, through: names.count, by: 100) {
            let page = try scim(port, "GET", "/Users?startIndex=\(start)&count=100").1?["Resources"]?.arrayValue ?? []
            seen += page.compactMap { $0["userName"]?.stringValue }
        }
        XCTAssertEqual(seen.count, names.count, "no user twice", file: file, line: line)
        XCTAssertEqual(Set(seen), Set(names.map { "\($0)@acme-de" }), file: file, line: line)
        XCTAssertTrue(
            eventually(seconds: 30) {
                guard let p = self.positions(agent) else { return false }
                return p.issued > 0 && p.issued == p.committed && p.acked == p.issued
            }, "feed \(String(describing: positions(agent)))", file: file, line: line)
    }

    /// SIGKILL of the subsidiary's agent in the middle of its feed, then of
    /// the broker: after the restarts every HQ user is there exactly once,
    /// the feed committed and acknowledged through its last event.
    func testKilledAgentAndBrokerLoseNothingAndApplyNothingTwice() throws {
        let brokerPort = freeLoopbackPort()
        var (broker, bp) = try startBroker(yaml: brokerYAML, port: brokerPort)
        let (_, dp) = try startAgent("de", cert: de, domain: "acme-de", brokerPort: bp)
        var names: [String] = []
        func create(_ n: Int) throws {
            for _ in 0..<n {
                let name = "k\(names.count)"
                XCTAssertEqual(try createUser(dp, name), 201)
                names.append(name)
            }
        }
        try create(150)
        XCTAssertTrue(eventually(seconds: 30) { self.applied()["acme-de/\(self.deID)"] == 150 })
        // A backlog of 150 for a subsidiary agent that takes 2 events a poll.
        var (usAgent, up) = try startInboundAgent("us", cert: us, brokerPort: bp, maxEvents: 2)
        XCTAssertTrue(eventually(seconds: 30) { (self.foreign("us")["acme-de"] ?? 0) > 0 }, "the feed started")
        usAgent.signal(SIGKILL)
        _ = usAgent.waitForExit()
        XCTAssertLessThan(foreign("us")["acme-de"] ?? 0, 150, "killed in the middle of the feed")
        try create(50)
        (usAgent, up) = try startInboundAgent("us", cert: us, brokerPort: bp, maxEvents: 2)
        XCTAssertTrue(eventually(seconds: 30) { (self.foreign("us")["acme-de"] ?? 0) > 150 }, "\(foreign("us"))")
        broker.signal(SIGKILL)
        _ = broker.waitForExit()
        try create(50)  // buffered in acme-de's outbox meanwhile
        (broker, bp) = try startBroker(yaml: brokerYAML, port: brokerPort)
        try assertArrivedOnce(names, port: up, agent: "us")
        XCTAssertEqual(metric(usAgent, "scim_edge_downlink_events_refused_total"), 0)
        XCTAssertEqual(metric(usAgent, "scim_edge_downlink_protocol_errors_total"), 0)
    }

    /// A fault proxy between the subsidiary's agent and the broker (drops,
    /// delays, resets, stalls): users and a group with its members converge,
    /// each once.
    func testFaultyNetworkToTheSubsidiaryConverges() throws {
        let (_, bp) = try startBroker(yaml: brokerYAML)
        let proxy = try FaultProxy(upstreamPort: bp, seed: 20_261_201)
        defer { proxy.stop() }
        let (_, dp) = try startAgent("de", cert: de, domain: "acme-de", brokerPort: bp)
        let (usAgent, up) = try startInboundAgent("us", cert: us, brokerPort: proxy.port, waitMs: 500)
        var names: [String] = []
        var ids: [String] = []
        for k in 0..<120 {
            XCTAssertEqual(try createUser(dp, "f\(k)"), 201)
            names.append("f\(k)")
        }
        for name in names.prefix(30) { ids.append(try XCTUnwrap(try user(dp, name)?["id"]?.stringValue)) }
        let members = ids.map { #"{"value":"\#($0)"}"# }.joined(separator: ",")
        XCTAssertEqual(
            try scim(
                dp, "POST", "/Groups",
                #"{"schemas":["urn:ietf:params:scim:schemas:core:2.0:Group"],"displayName":"faulty","members":[\#(members)]}"#
            ).0, 201)
        Thread.sleep(forTimeInterval: 4)
        proxy.healthy()
        try assertArrivedOnce(names, groups: 1, port: up, agent: "us")
        XCTAssertTrue(
            eventually(seconds: 60) {
                let g = try? scim(up, "GET", "/Groups?filter=displayName%20eq%20%22faulty%22").1?["Resources"]?.arrayValue?.first
                return g?["members"]?.arrayValue?.count == 30
            }, "the group and its 30 members")
        let faults = proxy.faultCounts
        XCTAssertGreaterThan(faults.filter { $0.key != "pass" }.values.reduce(0, +), 2, "faults were injected: \(faults)")
        XCTAssertEqual(metric(usAgent, "scim_edge_downlink_protocol_errors_total"), 0)
    }
}
