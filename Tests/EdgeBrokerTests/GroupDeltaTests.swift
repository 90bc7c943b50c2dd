import EdgeAgent
import EdgeBroker
import EdgeHTTP
import EdgeTestSupport
import Foundation
import SCIM
import XCTest

/// A group's change reaches a target from the member index: only the
/// members that changed are read and sent, and members whose own account
/// there changes join or leave the group there.
extension FanoutTests {
    /// The target's members of `name`, by userName.
    func membersAtTarget(_ appPort: Int, _ name: String) -> Set<String> {
        let appUsers = users(appPort, token: "t", prefix: "/scim/v2")
        let byTargetID = Dictionary(uniqueKeysWithValues: appUsers.compactMap { n, u in u["id"]?.stringValue.map { ($0, n) } })
        return Set(
            groups(appPort, token: "t", prefix: "/scim/v2")[name]?["members"]?.arrayValue?.compactMap {
                $0["value"]?.stringValue.flatMap { byTargetID[$0] }
            } ?? [])
    }

    func patchAt(_ dp: Int, _ path: String, _ ops: String) throws -> Int {
        try idp(dp, "PATCH", path, #"{"schemas":["urn:ietf:params:scim:api:messages:2.0:PatchOp"],"Operations":\#(ops)}"#).0
    }

    /// After a group is delivered, its mapping holds no members (they are
    /// in the index, with their count); a one-member change is one PATCH of
    /// that member, sent from the index; a broker SIGKILLed and restarted
    /// between changes sends each change once; the group at the target ends
    /// exactly as the IdP's.
    func testAGroupChangeIsSentFromTheMemberIndex() throws {
        let (_, appPort) = try startAppAgent("app")
        let patches = Locked<[String]>([])
        let proxy = try ServerHarness { request, _, responder in
            let r = forward(request, to: appPort)
            // A 412 (a replay after the SIGKILL with an ETag the broker had not recorded yet) is sent again.
            if request.path.contains("/Groups/"), request.method == "PATCH", r.status != 412 {
                patches.withLock { $0.append(String(decoding: request.body, as: UTF8.self)) }
            }
            responder.respond(r)
        }
        defer { _ = proxy.stop() }
        let yaml = "targets:\n" + target("app", port: proxy.port)
        var (broker, bp) = try startBroker(yaml: yaml)
        let (_, dp) = try startAgent("de", cert: de, domain: "acme-de", brokerPort: bp)
        let ids = try (0..<12).map { try newUser(dp, "u\($0)") }
        let gid = try newGroup(dp, "staff", members: ids[0..<10])
        XCTAssertTrue(
            eventually(seconds: 20) { self.membersAtTarget(appPort, "staff").count == 10 }, "\(membersAtTarget(appPort, "staff"))")

        // The mapping records the count, not the members.
        let store = try BrokerStore(path: dir.file("broker"))
        let groupID = try XCTUnwrap(store.resources(domain: "acme-de").first { $0["displayName"] == "staff" }?["id"]?.stringValue)
        XCTAssertTrue(
            eventually(seconds: 10) { (try? store.mappings(target: "app"))?[groupID]?.members == 10 },
            "\(String(describing: try? store.mappings(target: "app")[groupID]))")
        XCTAssertNil(try store.mappings(target: "app")[groupID]?.sent?["members"], "members are in the index, not in the mapping")

        patches.withLock { $0 = [] }
        XCTAssertEqual(try patchAt(dp, "/Groups/\(gid)", #"[{"op":"add","path":"members","value":[{"value":"\#(ids[10])"}]}]"#), 200)
        XCTAssertTrue(eventually(seconds: 20) { self.membersAtTarget(appPort, "staff").contains("u10") })
        // The proxy records a PATCH once its answer is back (the target may show the change a moment before).
        XCTAssertTrue(eventually(seconds: 5) { !patches.current.isEmpty })
        var sent = patches.current
        XCTAssertEqual(sent.count, 1, "\(sent)")
        let added = try JSONParser.parse(Array(sent[0].utf8))["Operations"]?.arrayValue ?? []
        XCTAssertEqual(added.count, 1, sent[0])
        XCTAssertEqual(added.first?["value"]?.arrayValue?.count, 1, "only the member added: \(sent[0])")
        let steps = try XCTUnwrap(metric(try brokerMetrics(broker), #"scim_broker_target_member_steps_total{target="app"}"#))
        XCTAssertGreaterThanOrEqual(steps, 1, "sent from the index")

        // A broker SIGKILL between changes: each is sent once.
        broker.signal(SIGKILL)
        _ = broker.waitForExit()
        (broker, bp) = try startBroker(yaml: yaml, port: bp)
        patches.withLock { $0 = [] }
        XCTAssertEqual(try patchAt(dp, "/Groups/\(gid)", #"[{"op":"remove","path":"members[value eq \"\#(ids[0])\"]"}]"#), 200)
        XCTAssertEqual(try patchAt(dp, "/Groups/\(gid)", #"[{"op":"add","path":"members","value":[{"value":"\#(ids[11])"}]}]"#), 200)
        let want = Set((1..<12).map { "u\($0)" })
        XCTAssertTrue(eventually(seconds: 20) { self.membersAtTarget(appPort, "staff") == want }, "\(membersAtTarget(appPort, "staff"))")
        XCTAssertTrue(eventually(seconds: 5) { !patches.current.isEmpty })
        sent = patches.current
        XCTAssertLessThanOrEqual(sent.count, 2, "one PATCH per change at most (they may fold into one): \(sent)")
        XCTAssertTrue(sent.allSatisfy { !$0.contains(ids[5]) }, "unchanged members are not sent")
        XCTAssertTrue(
            eventually(seconds: 10) { (try? store.mappings(target: "app"))?[groupID]?.members == 11 },
            "\(String(describing: try? store.mappings(target: "app")[groupID]))")
    }

    /// A member that reaches the target after its group (it entered the
    /// target's routes later) joins the group there, and a user deleted at
    /// its source, kept as an inactive account by a `removal: deactivate`
    /// target, leaves the group there: neither waits for the group's next
    /// change.
    func testMembersWhoseAccountChangesJoinAndLeaveTheGroupAtTheTarget() throws {
        let (_, appPort) = try startAppAgent("app")
        let routes = "routes: [{domains: [acme-de], types: [Group]}, {domains: [acme-de], types: [User], filter: 'title eq \"staff\"'}]"
        let yaml = "targets:\n" + target("app", port: appPort).replacing("routes: [{domains: [acme-de]}]", with: routes)
        let (_, bp) = try startBroker(yaml: yaml)
        let (_, dp) = try startAgent("de", cert: de, domain: "acme-de", brokerPort: bp)
        let a = try newUser(dp, "ann", extra: #","title":"staff""#), b = try newUser(dp, "ben", extra: #","title":"staff""#)
        let c = try newUser(dp, "cat", extra: #","title":"intern""#)
        let (status, group) = try idp(
            dp, "POST", "/Groups",
            #"{"schemas":["\#(groupSchema)"],"displayName":"team","members":[{"value":"\#(a)"},{"value":"\#(b)"},{"value":"\#(c)"}]}"#)
        XCTAssertEqual(status, 201)
        _ = try XCTUnwrap(group?["id"]?.stringValue)
        XCTAssertTrue(
            eventually(seconds: 20) { self.membersAtTarget(appPort, "team") == ["ann", "ben"] }, "\(membersAtTarget(appPort, "team"))")

        // cat enters the routes: created at the target, and it joins the group there.
        XCTAssertEqual(try patchAt(dp, "/Users/\(c)", #"[{"op":"replace","path":"title","value":"staff"}]"#), 200)
        XCTAssertTrue(
            eventually(seconds: 20) { self.membersAtTarget(appPort, "team") == ["ann", "ben", "cat"] },
            "\(membersAtTarget(appPort, "team"))")

        // ann is deleted at the source: deactivated at the target, and out of the group there.
        XCTAssertEqual(try idp(dp, "DELETE", "/Users/\(a)").0, 204)
        XCTAssertTrue(eventually(seconds: 20) { self.users(appPort, token: "t", prefix: "/scim/v2")["ann"]?["active"]?.boolValue == false })
        XCTAssertTrue(
            eventually(seconds: 20) { self.membersAtTarget(appPort, "team") == ["ben", "cat"] }, "\(membersAtTarget(appPort, "team"))")
    }
}

extension FanoutTests {
    /// Reconcile compares a group's members one group at a time: members
    /// removed and added behind the broker's back are reported as drift of
    /// `members`, and `--apply` sends just those (a PATCH of two members,
    /// from the index), leaving a member the target added of its own alone.
    func testReconcileRepairsAGroupsMembersOneByOne() throws {
        let (_, appPort) = try startAppAgent("app")
        let patches = Locked<[String]>([])
        let proxy = try ServerHarness { request, _, responder in
            let r = forward(request, to: appPort)
            if request.path.contains("/Groups/"), request.method == "PATCH" || request.method == "PUT" {
                patches.withLock { $0.append("\(request.method) \(r.status) " + String(decoding: request.body, as: UTF8.self)) }
            }
            responder.respond(r)
        }
        defer { _ = proxy.stop() }
        let (broker, bp) = try startBroker(yaml: "targets:\n" + target("app", port: proxy.port))
        let (_, dp) = try startAgent("de", cert: de, domain: "acme-de", brokerPort: bp)
        let ids = try (0..<6).map { try newUser(dp, "r\($0)") }
        _ = try newGroup(dp, "crew", members: ids[0..<5])
        XCTAssertTrue(
            eventually(seconds: 20) {
                self.membersAtTarget(appPort, "crew").count == 5 && self.users(appPort, token: "t", prefix: "/scim/v2").count == 6
            })
        // Behind the broker's back: r0 removed, r5 (the broker's, not a member) and a local account added.
        let at = users(appPort, token: "t", prefix: "/scim/v2")
        let local = try XCTUnwrap(
            try scim(appPort, "POST", "/Users", #"{"schemas":["\#(userSchema)"],"userName":"local"}"#, token: "t", prefix: "/scim/v2").1?[
                "id"]?
                .stringValue)
        let gid = try XCTUnwrap(groups(appPort, token: "t", prefix: "/scim/v2")["crew"]?["id"]?.stringValue)
        let ops =
            #"[{"op":"remove","path":"members[value eq \"\#(at["r0"]!["id"]!.stringValue!)\"]"},"#
            + #"{"op":"add","path":"members","value":[{"value":"\#(at["r5"]!["id"]!.stringValue!)"},{"value":"\#(local)"}]}]"#
        XCTAssertEqual(
            try scim(
                appPort, "PATCH", "/Groups/\(gid)", #"{"schemas":["urn:ietf:params:scim:api:messages:2.0:PatchOp"],"Operations":\#(ops)}"#,
                token: "t", prefix: "/scim/v2"
            ).0 / 100, 2)
        XCTAssertEqual(membersAtTarget(appPort, "crew"), ["r1", "r2", "r3", "r4", "r5", "local"])

        let config = dir.file("broker.yaml")
        let r = try reconcileReport("app")
        XCTAssertEqual(r["drifted"]?.arrayValue?.count, 1, "\(r)")
        XCTAssertEqual(r["drifted"]?.arrayValue?.first?["attributes"], ["members"], "\(r)")
        patches.withLock { $0 = [] }
        let applied = try brokerCLI(["targets", "reconcile", "--config", config, "app", "--apply"])
        XCTAssertTrue(applied.1.contains("1 fixes queued"), applied.1)
        XCTAssertTrue(
            eventually(seconds: 20) { self.membersAtTarget(appPort, "crew") == ["r0", "r1", "r2", "r3", "r4", "local"] },
            "\(membersAtTarget(appPort, "crew"))")
        // The group changed at the target, so its ETag did: a 412, then the same PATCH without If-Match.
        XCTAssertTrue(eventually(seconds: 5) { patches.current.contains { $0.hasPrefix("PATCH 200 ") } })
        let sent = patches.current.filter { !$0.hasPrefix("PATCH 412 ") }
        XCTAssertEqual(sent.count, 1, "\(patches.current) \(broker.output.suffix(30))")
        XCTAssertTrue(sent.first?.hasPrefix("PATCH 200 ") ?? false, "\(sent)")
        let operations = try JSONParser.parse(Array(try XCTUnwrap(sent.first).split(separator: " ", maxSplits: 2)[2].utf8))["Operations"]
        // After the 412 the group's attributes go again too (the broker's state wins); of members, just the two.
        let memberOps = operations?.arrayValue?.filter { ($0["path"]?.stringValue ?? "").hasPrefix("members") } ?? []
        XCTAssertEqual(memberOps.count, 2, "r0 added, r5 removed, nothing else: \(sent)")
        XCTAssertEqual(memberOps.first?["value"]?.arrayValue?.count, 1, "\(sent)")
        let again = try JSONParser.parse(Array(try brokerCLI(["targets", "reconcile", "--config", config, "app", "--json"]).1.utf8))
        XCTAssertEqual(again["drifted"]?.arrayValue?.count, 0, "settled")
    }
}

extension FanoutTests {
    /// A member that reaches the target while its group's first delivery is
    /// under way (the group was read before the member had an account
    /// there) joins the group once that delivery ends: the group is queued
    /// with the member marked, even though it had no mapping yet.
    func testAMemberArrivingWhileItsGroupIsBeingCreatedJoinsIt() throws {
        let (_, appPort) = try startAppAgent("app")
        let catCreated = Locked(false)
        let proxy = try ServerHarness { request, _, responder in
            // A slow target for the group's growth: each PATCH takes 1.5 s.
            if request.path.contains("/Groups/"), request.method == "PATCH" { usleep(1_500_000) }
            let r = forward(request, to: appPort)
            if request.method == "POST", String(decoding: request.body, as: UTF8.self).contains(#""userName":"cat""#) {
                catCreated.withLock { $0 = true }
            }
            responder.respond(r)
        }
        defer { _ = proxy.stop() }
        let routes = "routes: [{domains: [acme-de], types: [Group]}, {domains: [acme-de], types: [User], filter: 'title eq \"staff\"'}]"
        let yaml =
            "targets:\n"
            + target("app", port: proxy.port, extra: "    maxMembersPerPatch: 1").replacing("routes: [{domains: [acme-de]}]", with: routes)
        let (_, bp) = try startBroker(yaml: yaml)
        let (_, dp) = try startAgent("de", cert: de, domain: "acme-de", brokerPort: bp)
        let ids = try ["ann", "bob", "dan", "eve"].map { try newUser(dp, $0, extra: #","title":"staff""#) }
        let cat = try newUser(dp, "cat", extra: #","title":"intern""#)
        XCTAssertTrue(eventually(seconds: 20) { self.users(appPort, token: "t", prefix: "/scim/v2").count == 4 })
        _ = try newGroup(dp, "crew", members: ids + [cat])
        // The group is created with ann and grown by slow PATCHes; meanwhile cat enters the routes.
        XCTAssertTrue(eventually(seconds: 20) { self.groups(appPort, token: "t", prefix: "/scim/v2")["crew"] != nil })
        XCTAssertEqual(try patchAt(dp, "/Users/\(cat)", #"[{"op":"replace","path":"title","value":"staff"}]"#), 200)
        XCTAssertTrue(eventually(seconds: 20) { catCreated.current })
        XCTAssertTrue(
            (groups(appPort, token: "t", prefix: "/scim/v2")["crew"]?["members"]?.arrayValue?.count ?? 0) < 4,
            "cat arrived while the group was still being grown (the case under test)")
        XCTAssertTrue(
            eventually(seconds: 30) { self.membersAtTarget(appPort, "crew") == ["ann", "bob", "dan", "eve", "cat"] },
            "\(membersAtTarget(appPort, "crew"))")
    }
}

extension FanoutTests {
    /// A new group is created at a target with its first members and grown
    /// from the member index a batch at a time (never read whole), its
    /// progress recorded with each PATCH: a broker SIGKILLed mid-growth
    /// resumes where it was, and the group ends complete, grown.
    func testANewGroupIsGrownFromTheIndexAndResumesAfterASIGKILL() throws {
        let (_, appPort) = try startAppAgent("app")
        let patches = Locked(0)
        let proxy = try ServerHarness { request, _, responder in
            if request.path.contains("/Groups/"), request.method == "PATCH" {
                usleep(20_000)  // a target that takes its time: the kill lands mid-growth
                patches.withLock { $0 += 1 }
            }
            responder.respond(forward(request, to: appPort))
        }
        defer { _ = proxy.stop() }
        let yaml = "targets:\n" + target("app", port: proxy.port, extra: "    maxMembersPerPatch: 10")
        var (broker, bp) = try startBroker(yaml: yaml)
        let (_, dp) = try startAgent("de", cert: de, domain: "acme-de", brokerPort: bp)
        let ids = try (0..<300).map { try newUser(dp, "g\($0)") }
        XCTAssertTrue(eventually(seconds: 60) { self.users(appPort, token: "t", prefix: "/scim/v2").count == 300 })
        _ = try newGroup(dp, "everyone", members: ids)
        XCTAssertTrue(eventually(seconds: 30) { patches.current >= 5 }, "growing by PATCH")
        broker.signal(SIGKILL)
        _ = broker.waitForExit()
        let atKill = membersAtTarget(appPort, "everyone").count
        XCTAssertLessThan(atKill, 300, "killed mid-growth")
        (broker, bp) = try startBroker(yaml: yaml, port: bp)
        XCTAssertTrue(
            eventually(seconds: 60) { self.membersAtTarget(appPort, "everyone").count == 300 },
            "\(membersAtTarget(appPort, "everyone").count)")
        let store = try BrokerStore(path: dir.file("broker"))
        let gid = try XCTUnwrap(store.resources(domain: "acme-de").first { $0["displayName"] == "everyone" }?["id"]?.stringValue)
        XCTAssertTrue(
            eventually(seconds: 10) {
                let m = (try? store.mapping(target: "app", brokerID: gid)) ?? nil
                return m?.members == 300 && m?.growFrom == nil
            }, "\(String(describing: try? store.mapping(target: "app", brokerID: gid)))")
        XCTAssertNil(try store.mapping(target: "app", brokerID: gid)?.sent?["members"], "never held whole in the mapping")
        XCTAssertLessThan(patches.current, 300 / 10 + 10, "each chunk sent about once (a replay after the kill resends at most one)")
        let metrics = try brokerMetrics(broker)
        XCTAssertEqual(metric(metrics, #"scim_broker_target_dead_letters_total{target="app"}"#), 0)
        XCTAssertEqual(metric(metrics, #"scim_broker_target_whole_group_reads_total{target="app"}"#), 0, "the group was never read whole")
    }
}

extension FanoutTests {
    /// A membership change of 2,400 members leaves the agent as three
    /// events of at most 1,000 members and reaches the broker in one batch
    /// (the broker was away while it was made); the broker applies that
    /// batch in transactions of bounded weight (about 1,000 index entries a
    /// commit), exactly once, and the group holds every member. Removing
    /// it commits little: its members are swept after it, a chunk a commit.
    func testALargeMembershipChangeIsAppliedInTransactionsOfBoundedWeight() throws {
        var (broker, bp) = try startBroker(yaml: "")
        let (_, dp) = try startAgent("de", cert: de, domain: "acme-de", brokerPort: bp)
        var ids: [String] = []
        for b in 0..<3 {
            let ops = (0..<1000).map { k in
                #"{"method":"POST","path":"/Users","bulkId":"b\#(k)","data":{"schemas":["\#(userSchema)"],"userName":"u\#(b * 1000 + k)"}}"#
            }
            let (status, body) = try idp(
                dp, "POST", "/Bulk",
                #"{"schemas":["urn:ietf:params:scim:api:messages:2.0:BulkRequest"],"Operations":[\#(ops.joined(separator: ","))]}"#)
            XCTAssertEqual(status, 200)
            ids += (body?["Operations"]?.arrayValue ?? []).compactMap {
                $0["location"]?.stringValue?.split(separator: "/").last.map(String.init)
            }
        }
        XCTAssertEqual(ids.count, 3000)
        let gid = try newGroup(dp, "staff", members: ids[0..<1])
        XCTAssertTrue(eventually(seconds: 30) { self.applied().values.first == 3001 }, "\(applied())")
        broker.signal(SIGTERM)
        XCTAssertEqual(broker.waitForExit(seconds: 20), 0)
        let added = ids[1..<2401].map { #"{"value":"\#($0)"}"# }.joined(separator: ",")
        // 204: a large group's PATCH answers without the group (docs/scim.md).
        XCTAssertEqual(try patchAt(dp, "/Groups/\(gid)", #"[{"op":"add","path":"members","value":[\#(added)]}]"#), 204)
        (broker, bp) = try startBroker(yaml: "", port: bp)
        XCTAssertTrue(eventually(seconds: 30) { self.applied().values.first == 3004 }, "three members events: \(applied())")
        let text = try brokerMetrics(broker)
        XCTAssertEqual(metric(text, "scim_broker_batches_total"), 1, "the three events came in one batch")
        XCTAssertEqual(metric(text, "scim_broker_events_applied_total"), 3)
        XCTAssertGreaterThanOrEqual(metric(text, "scim_broker_store_commits_total") ?? 0, 2, "applied in parts")
        let heaviest = try XCTUnwrap(metric(text, "scim_broker_store_commit_weight_max"))
        XCTAssertEqual(heaviest, 1001, "one members event of 1,000 members a commit")
        broker.signal(SIGTERM)
        XCTAssertEqual(broker.waitForExit(seconds: 20), 0)
        let store = try BrokerStore(path: dir.file("broker"))
        let group = try XCTUnwrap(try store.resources(domain: "acme-de").first { $0["displayName"]?.stringValue == "staff" })
        XCTAssertEqual(group["members"]?.arrayValue?.count, 2401)

        // Removing the group is one small commit; its members leave the index after it, 1,000 a commit.
        (broker, bp) = try startBroker(yaml: "", port: bp)
        XCTAssertEqual(try idp(dp, "DELETE", "/Groups/\(gid)").0, 204)
        XCTAssertTrue(
            eventually(seconds: 30) {
                (try? self.metric(self.brokerMetrics(broker), "scim_broker_removed_group_members_swept_total")) == 2401
            },
            "\(String(describing: try? metric(brokerMetrics(broker), "scim_broker_removed_group_members_swept_total")))")
        XCTAssertLessThanOrEqual(try XCTUnwrap(metric(try brokerMetrics(broker), "scim_broker_store_commit_weight_max")), 1000)
        XCTAssertEqual(try store.groupsBeingSwept(), 0)
    }
}
