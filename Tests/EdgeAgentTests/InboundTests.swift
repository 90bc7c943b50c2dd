import EdgeAgent
import EdgeConfig
import EdgeTestSupport
import SCIM
import XCTest

@testable import EdgeDelivery

/// The inbound policy and the store's side of the downlink, in process.
final class InboundTests: XCTestCase {
    func testInboundConfigurationIsCheckedAtItsKeys() {
        func problems(_ yaml: String) -> [String] {
            let d = ConfigDiagnostics()
            _ = AgentConfiguration.decode(YAMLNode.parse(yaml, d), d)
            return d.problems.filter { !$0.isWarning }.map(\.description)
        }
        let broker = "dataDir: /d\nbroker: {url: 'https://127.0.0.1:1', ca: a, cert: b, key: c, domain: sub}\n"
        XCTAssertTrue(problems("dataDir: /d\ninbound: {accept: [{domains: [hq]}]}\n").contains { $0.contains("inbound: needs broker") })
        XCTAssertTrue(problems(broker + "inbound: {}\n").contains { $0.contains("inbound.accept: is required") })
        XCTAssertTrue(problems(broker + "inbound: {accept: [{types: [User]}]}\n").contains { $0.contains("at least one source domain") })
        XCTAssertTrue(
            problems(broker + "inbound: {accept: [{domains: [hq]}], map: {set: {usrType: Guest}}}\n").contains {
                $0.contains("inbound.map.set: 'usrType' is an attribute of neither User nor Group")
            })
        XCTAssertTrue(
            problems(broker + "inbound: {accept: [{domains: [hq]}], map: {userName: '{domain}'}}\n").contains { $0.contains("{userName}") })
        XCTAssertTrue(problems(broker + "inbound: {accept: [{domains: [hq]}], waitMs: 70000}\n").contains { $0.contains("0 to 60000") })
        let d = ConfigDiagnostics()
        let c = AgentConfiguration.decode(
            YAMLNode.parse(
                broker + "inbound: {accept: [{domains: [hq], types: [User], filter: 'active eq true'}], map: {set: {userType: Guest}}}\n", d
            ), d)
        XCTAssertEqual(d.problems.filter { !$0.isWarning }.map(\.description), [])
        let policy = try? XCTUnwrap(c.inbound)
        XCTAssertEqual(policy?.accepts(domain: "hq", type: "User", ["userName": "a", "active": true]), true)
        XCTAssertEqual(policy?.accepts(domain: "hq", type: "User", ["userName": "a", "active": false]), false, "the scoping filter")
        XCTAssertEqual(policy?.accepts(domain: "other", type: "User", ["userName": "a", "active": true]), false, "only the domains named")
    }

    func event(_ seq: Int, _ uri: String, _ id: String, data: JSON? = nil, domain: String = "hq", endpoint: String = "Users") -> JSON {
        var body: JSONObject = ["ref": .string("/\(endpoint)/\(id)")]
        if let data { body["data"] = data }
        return ["seq": .int(seq), "domain": .string(domain), "events": .object(JSONObject([(uri, .object(body))]))]
    }

    func user(_ name: String) -> JSON {
        ["schemas": ["urn:ietf:params:scim:schemas:core:2.0:User"], "userName": .string(name), "title": "CFO"]
    }

    /// Exactly once across resends, a gap refused whole, a local userName
    /// never overwritten, foreign resources read-only and never relayed.
    func testDownlinkEventsApplyOnceAndForeignResourcesStayForeign() throws {
        let dir = TempDirectory("inbound")
        defer { dir.remove() }
        let store = try AgentStore(path: dir.path, registry: .standard)
        var policy = InboundPolicy(accept: [try InboundPolicy.Rule(domains: ["hq"])], userNameTemplate: "{userName}@{domain}")
        policy.mapping.constant = [("userType", "Guest")]
        policy.mapping.drop = ["title"]
        var ctx = WriteContext(newID: "local-1", now: "2026-12-01T00:00:00Z", epochSeconds: 0, eventID: "e", traceID: "t")
        ctx.recordEvents = true
        let users = store.registry.resourceType("User")!
        _ = try store.environment.write { txn in
            try store.apply(.create(users, validated: ["userName": "taken@hq"]), ctx, profile: .lenient, in: txn)
        }
        XCTAssertEqual(try store.outboxCount(), 1, "the local user leaves")
        let create = "urn:ietf:params:SCIM:event:prov:create:full"
        func apply(_ events: [JSON]) throws -> DownlinkOutcome {
            try store.environment.write { txn in try store.applyDownlink(events, policy: policy, ctx, in: txn) }
        }
        let first = try apply([event(1, create, "b1", data: user("alice")), event(2, create, "b2", data: user("taken"))])
        XCTAssertEqual(first.appliedThrough, 2)
        XCTAssertEqual(first.applied, 1)
        XCTAssertEqual(first.refused.keys.sorted(), [2], "taken@hq is a local user's: never overwritten")
        let alice = try XCTUnwrap(try store.get(users, "b1"))
        XCTAssertEqual(alice["userName"], "alice@hq")
        XCTAssertEqual(alice["userType"], "Guest")
        XCTAssertNil(alice["title"])
        XCTAssertEqual(try store.foreignDomain(users, "b1"), "hq")
        XCTAssertEqual(try store.outboxCount(), 1, "nothing foreign goes up")

        // What the next poll reports (downlink protocol 2), stored with the events: the refusal by its kind only.
        let report = try XCTUnwrap(try store.downlinkReport())
        XCTAssertEqual(first.report, report)
        XCTAssertEqual([report.from, report.through], [1, 2])
        XCTAssertEqual(report.refused, [2: "uniqueness"])
        XCTAssertEqual(report.notAccepted, [])
        XCTAssertFalse(String(decoding: report.json.serialized(), as: UTF8.self).contains("taken"), "the local detail stays here")

        let again = try apply([event(1, create, "b1", data: user("alice")), event(2, create, "b2", data: user("taken"))])
        XCTAssertEqual(again.duplicates, 2)
        XCTAssertEqual(again.applied, 0)
        XCTAssertNil(again.report)
        XCTAssertEqual(try store.downlinkReport(), report, "resends keep the report of what they were applied with")
        XCTAssertThrowsError(try apply([event(4, create, "b4", data: user("dave"))]), "a gap") { XCTAssertTrue($0 is DownlinkGap) }
        XCTAssertEqual(try store.downlinkSequence(), 2, "nothing of a gapped answer is committed")
        XCTAssertNil(try store.get(users, "b4"))

        // The local IdP cannot change or delete it.
        for write in [AgentWrite.replace(users, id: "b1", body: user("mallory")), .delete(users, id: "b1")] {
            XCTAssertThrowsError(try store.environment.write { txn in try store.apply(write, ctx, profile: .lenient, in: txn) }) {
                let e = $0 as? SCIMError
                XCTAssertEqual(e?.status, 400)
                XCTAssertEqual(e?.scimType, .mutability)
            }
        }
        XCTAssertEqual(try store.get(users, "b1")?["userName"], "alice@hq")

        // Leaving what the boundary accepts removes it; a delete too.
        let left = try apply([event(3, create, "b1", data: user("alice"), domain: "elsewhere")])
        XCTAssertEqual(left.notAccepted, 1)
        XCTAssertEqual(left.report?.notAccepted, [3])
        _ = try store.environment.write { txn in try store.restartDownlink(in: txn) }
        XCTAssertNil(try store.downlinkReport(), "a feed started again reports nothing of the old one")
        XCTAssertNil(try store.get(users, "b1"))
        XCTAssertEqual(try store.foreignCounts(), [:])
        XCTAssertEqual(try store.outboxCount(), 1)
    }

    /// A resync (downlink protocol 5) ends with `resyncCompleteEvent`: what
    /// the store held and the new feed did not name goes, a step per
    /// transaction; what the feed named stays, a refusal included, and so does
    /// what arrives while the sweep runs. A group goes with its members'
    /// entries. Before the resync, nothing is ever swept.
    func testAResyncsEndRemovesWhatTheNewFeedDidNotSendAgain() throws {
        let dir = TempDirectory("inbound-resync")
        defer { dir.remove() }
        let store = try AgentStore(path: dir.path, registry: .standard)
        let policy = InboundPolicy(accept: [try InboundPolicy.Rule(domains: ["hq"])], userNameTemplate: "{userName}@{domain}")
        let ctx = WriteContext(newID: "local-1", now: "2026-12-01T00:00:00Z", epochSeconds: 0, eventID: "e", traceID: "t")
        let users = store.registry.resourceType("User")!, groups = store.registry.resourceType("Group")!
        let create = "urn:ietf:params:SCIM:event:prov:create:full", complete = "urn:scim-edge:params:event:feed:resync:complete"
        func apply(_ events: [JSON]) throws -> DownlinkOutcome {
            try store.environment.write { txn in try store.applyDownlink(events, policy: policy, ctx, in: txn) }
        }
        func sweep(_ limit: Int) throws -> (removed: Int, done: Bool)? {
            try store.environment.write { txn in try store.sweepStaleForeign(limit: limit, ctx, txn) }
        }
        var seq = 0
        func next(_ id: String, _ name: String) -> JSON {
            seq += 1
            return event(seq, create, id, data: user(name))
        }
        var feed = (0..<30).map { next("u\($0)", "user\($0)") }
        seq += 1
        feed.append(
            event(
                seq, create, "g1",
                data: ["schemas": ["urn:ietf:params:scim:schemas:core:2.0:Group"], "displayName": "staff", "members": [["value": "u0"]]],
                endpoint: "Groups"))
        _ = try apply(feed)
        XCTAssertEqual(try store.foreignCounts(), ["hq": 31])
        XCTAssertNil(try sweep(10), "no resync: nothing to sweep")

        // The feed starts again; it names u0…u9, and u10 with a userName a local user took meanwhile (refused: kept as it was).
        _ = try store.environment.write { txn in try store.restartDownlink(in: txn) }
        _ = try store.environment.write { txn in
            try store.apply(.create(users, validated: ["userName": "taken@hq"]), ctx, profile: .lenient, in: txn)
        }
        seq = 0
        var again = (0..<10).map { next("u\($0)", "user\($0)") }
        again.append(next("u10", "taken"))
        let outcome = try apply(again)
        XCTAssertEqual(outcome.refused.count, 1)
        XCTAssertFalse(outcome.resyncCompleted)
        XCTAssertFalse(try store.staleSweepPending(), "not before the broker says the resync is complete")
        seq += 1
        let end = try apply([["seq": .int(seq), "events": .object(JSONObject([(complete, .object([:]))]))]])
        XCTAssertTrue(end.resyncCompleted)
        XCTAssertEqual(end.applied, 0, "the end of a resync changes no resource")
        XCTAssertEqual(end.refused, [:])
        XCTAssertTrue(try store.staleSweepPending())

        // Two steps of at most 10 keys: then u25 (held, not yet looked at) is named again and u40 is new; both stay.
        // u0, which the sweep passed, is named again too: its mark outlives this resync.
        var removed = 0
        for _ in 0..<2 { removed += try XCTUnwrap(try sweep(10)).removed }
        _ = try apply([next("u25", "user25"), next("u40", "user40"), next("u0", "user0")])
        var steps = 2
        while let step = try sweep(10) {
            removed += step.removed
            steps += 1
            if step.done { break }
            XCTAssertLessThan(steps, 50)
        }
        XCTAssertFalse(try store.staleSweepPending())
        XCTAssertEqual(removed, 31 - 11 - 1, "all but u0…u10 and u25; g1 too")
        XCTAssertGreaterThan(steps, 3, "a bounded step at a time (at most limit / 10 removals each)")
        XCTAssertEqual(try store.foreignCounts(), ["hq": 13])
        XCTAssertNotNil(try store.get(users, "u10"), "a refused event keeps what was held")
        XCTAssertNotNil(try store.get(users, "u25"))
        XCTAssertNotNil(try store.get(users, "u40"))
        XCTAssertNil(try store.get(users, "u11"))
        XCTAssertNil(try store.get(groups, "g1"))
        XCTAssertNil(try sweep(10), "the resync is over")
        // After it, nothing is marked: a later feed's events are not swept by anything.
        _ = try apply([next("u26", "user26")])
        XCTAssertEqual(try store.foreignCounts(), ["hq": 14])

        // A second resync that names only u26: u0's mark from the first one does not keep it.
        _ = try store.environment.write { txn in try store.restartDownlink(in: txn) }
        seq = 0
        _ = try apply([next("u26", "user26")])
        seq += 1
        XCTAssertTrue(try apply([["seq": .int(seq), "events": .object(JSONObject([(complete, .object([:]))]))]]).resyncCompleted)
        while let step = try sweep(1000), !step.done {}
        XCTAssertEqual(try store.foreignCounts(), ["hq": 1], "only what the second resync named")
        XCTAssertNil(try store.get(users, "u0"))
    }

    /// A member the boundary did not take when its group arrived (out of the
    /// filter then) joins the group when it enters later: the broker, which
    /// sent it, will not name it again.
    func testAUserAcceptedLaterJoinsTheGroupsThatNamedIt() throws {
        let dir = TempDirectory("inbound-late")
        defer { dir.remove() }
        let store = try AgentStore(path: dir.path, registry: .standard)
        let policy = InboundPolicy(accept: [
            try InboundPolicy.Rule(domains: ["hq"], types: ["User"], filter: "active eq true"),
            try InboundPolicy.Rule(domains: ["hq"], types: ["Group"]),
        ])
        let ctx = WriteContext(newID: "n", now: "2026-12-01T00:00:00Z", epochSeconds: 0, eventID: "e", traceID: "t")
        let create = "urn:ietf:params:SCIM:event:prov:create:full", put = "urn:ietf:params:SCIM:event:prov:put:full"
        func apply(_ events: [JSON]) throws -> DownlinkOutcome {
            try store.environment.write { txn in try store.applyDownlink(events, policy: policy, ctx, in: txn) }
        }
        func person(_ name: String, active: Bool) -> JSON {
            ["schemas": ["urn:ietf:params:scim:schemas:core:2.0:User"], "userName": .string(name), "active": .bool(active)]
        }
        let staff = event(
            3, create, "g1",
            data: [
                "schemas": ["urn:ietf:params:scim:schemas:core:2.0:Group"], "displayName": "staff",
                "members": [["value": "u1", "type": "User"], ["value": "u2", "type": "User"]],
            ], endpoint: "Groups")
        let first = try apply([
            event(1, create, "u1", data: person("in", active: true)), event(2, create, "u2", data: person("out", active: false)), staff,
        ])
        XCTAssertEqual(first.notAccepted, 1)
        let groups = store.registry.resourceType("Group")!
        func members() throws -> [String] {
            try store.get(groups, "g1")?["members"]?.arrayValue?.compactMap { $0["value"]?.stringValue } ?? []
        }
        XCTAssertEqual(try members(), ["u1"])
        _ = try apply([event(4, put, "u2", data: person("out", active: true))])
        XCTAssertEqual(try members().sorted(), ["u1", "u2"], "u2 entered and joined the group that named it")
    }

    /// Downlink protocol 4: a group's attributes without its members (a
    /// rename) keep the 3,000 members it holds here, with the inbound
    /// mapping applied, in a commit of a few entries (full state read and
    /// wrote every member). Refused with `noTarget` (the broker then sends
    /// it whole) for a group not held here, or when the inbound policy's
    /// scope reads members; one the policy no longer accepts goes.
    func testAGroupsAttributesAloneKeepItsMembers() throws {
        let dir = TempDirectory("inbound-attributes")
        defer { dir.remove() }
        let store = try AgentStore(path: dir.path, registry: .standard)
        var policy = InboundPolicy(accept: [
            try InboundPolicy.Rule(domains: ["hq"], types: ["User"]),
            try InboundPolicy.Rule(domains: ["hq"], types: ["Group"], filter: #"displayName sw "staff""#),
        ])
        policy.mapping.constant = [("externalId", "from-hq")]
        let ctx = WriteContext(newID: "n", now: "2026-12-01T00:00:00Z", epochSeconds: 0, eventID: "e", traceID: "t")
        let create = "urn:ietf:params:SCIM:event:prov:create:full"
        let attributes = "urn:scim-edge:params:event:prov:patch:attributes"
        var seq = 0
        func next(_ uri: String, _ id: String, _ data: JSON, endpoint: String = "Groups") -> JSON {
            seq += 1
            return event(seq, uri, id, data: data, endpoint: endpoint)
        }
        func apply(_ events: [JSON], _ policy: InboundPolicy) throws -> DownlinkOutcome {
            try store.environment.write { txn in try store.applyDownlink(events, policy: policy, ctx, in: txn) }
        }
        func named(_ name: String) -> JSON { ["schemas": ["urn:ietf:params:scim:schemas:core:2.0:Group"], "displayName": .string(name)] }
        let n = 3_000
        for start in stride(from: 0, to: n, by: 1000) {
            _ = try apply((start..<start + 1000).map { next(create, "u\($0)", user("u\($0)"), endpoint: "Users") }, policy)
        }
        var staff = named("staff").objectValue!
        staff["members"] = .array((0..<n).map { ["value": .string("u\($0)"), "type": "User"] })
        _ = try apply([next(create, "g1", .object(staff))], policy)
        let groups = store.registry.resourceType("Group")!
        store.environment.resetHeaviestCommit()
        let renamed = try apply([next(attributes, "g1", named("staff, renamed"))], policy)
        XCTAssertEqual(renamed.refused, [:])
        XCTAssertEqual(renamed.applied, 1)
        XCTAssertLessThan(store.environment.heaviestCommitEntries, 50, "no member read or written")
        let g1 = try XCTUnwrap(store.get(groups, "g1"))
        XCTAssertEqual(g1["displayName"], "staff, renamed")
        XCTAssertEqual(g1["externalId"], "from-hq", "the inbound mapping applies")
        XCTAssertEqual(g1["members"]?.arrayValue?.count, n, "its members kept")

        let notHeld = try apply([next(attributes, "g2", named("staff 2"))], policy)
        XCTAssertEqual(notHeld.refused.count, 1, "a group not held here is needed whole")
        XCTAssertNil(try store.get(groups, "g2"))
        var readsMembers = policy
        readsMembers.accept[1] = try InboundPolicy.Rule(domains: ["hq"], types: ["Group"], filter: #"members.value eq "u1""#)
        XCTAssertEqual(try apply([next(attributes, "g1", named("staff, 3"))], readsMembers).refused.count, 1)
        XCTAssertEqual(try store.get(groups, "g1")?["displayName"], "staff, renamed", "unchanged")
        let out = try apply([next(attributes, "g1", named("others"))], policy)
        XCTAssertEqual(out.notAccepted, 1)
        XCTAssertTrue(try store.get(groups, "g1") == nil, "out of what this boundary accepts: it goes")
    }
}

/// Local targets' queues at the agent, in process: a write queues what the
/// routes want in its own transaction (a failing write queues nothing), by
/// the resource's source domain, with what the inbound mapping made of a
/// foreign resource.
final class LocalTargetQueueTests: XCTestCase {
    func testAWriteQueuesForTheTargetsInItsOwnTransactionByItsSourceDomain() throws {
        let dir = TempDirectory("local-targets")
        defer { dir.remove() }
        var own = try TargetConfiguration(name: "own", url: "http://127.0.0.1:1")
        own.routes = [try Route(domains: ["sub"])]
        var guests = try TargetConfiguration(name: "guests", url: "http://127.0.0.1:2")
        guests.routes = [try Route(domains: ["hq"], types: ["User"])]
        let store = try AgentStore(path: dir.path, registry: .standard, targets: [own, guests], domain: "sub")
        let users = store.registry.resourceType("User")!, groups = store.registry.resourceType("Group")!
        var ctx = WriteContext(newID: "u1", now: "2026-12-01T00:00:00Z", epochSeconds: 0, eventID: "e", traceID: "t1")
        func write(_ w: AgentWrite) throws {
            _ = try store.environment.write { txn in try store.apply(w, ctx, profile: .lenient, in: txn) }
        }
        try write(.create(users, validated: ["userName": "bob"]))
        XCTAssertEqual(try store.queueDepth(target: "own").count, 1, "queued with the write, in its transaction")
        XCTAssertEqual(try store.queueDepth(target: "guests").count, 0, "not routed there: another domain's")
        ctx.newID = "u9"
        XCTAssertThrowsError(try write(.create(users, validated: ["userName": "BOB"])), "a userName taken")
        XCTAssertEqual(try store.queueDepth(target: "own").count, 1, "a refused write queues nothing")
        ctx.newID = "g1"
        try write(
            .create(
                groups,
                validated: [
                    "schemas": ["urn:ietf:params:scim:schemas:core:2.0:Group"], "displayName": "team", "members": [["value": "u1"]],
                ]))
        let queued = try store.queued(target: "own", after: nil, limit: 10).map(\.item)
        XCTAssertEqual(queued.map(\.brokerID), ["u1", "g1"])
        XCTAssertEqual(queued.map(\.trace), ["t1", "t1"], "the write's trace id goes with it")
        XCTAssertEqual(try store.deliveryEntry("g1")?.resource["members"]?.arrayValue?.count, 1, "read with its members")
        XCTAssertEqual(try store.deliveryEntry("u1")?.domain, "sub")

        // What enters from hq: queued for the target that takes hq, as the inbound policy made it.
        var policy = InboundPolicy(accept: [try InboundPolicy.Rule(domains: ["hq"])], userNameTemplate: "{userName}@{domain}")
        policy.mapping.constant = [("userType", "Guest")]
        let create = "urn:ietf:params:SCIM:event:prov:create:full"
        let data: JSON = ["schemas": ["urn:ietf:params:scim:schemas:core:2.0:User"], "userName": "alice"]
        let body: JSON = ["ref": "/Users/b1", "data": data]
        let event: JSON = ["seq": 1, "domain": "hq", "events": .object(JSONObject([(create, body)]))]
        _ = try store.environment.write { txn in try store.applyDownlink([event], policy: policy, ctx, in: txn) }
        XCTAssertEqual(try store.queued(target: "guests", after: nil, limit: 10).map(\.item.brokerID), ["b1"])
        XCTAssertEqual(try store.queueDepth(target: "own").count, 2, "the own-domain target gets nothing of hq")
        let alice = try XCTUnwrap(try store.deliveryEntry("b1"))
        XCTAssertEqual(alice.domain, "hq")
        XCTAssertEqual(alice.resource["userName"], "alice@hq")
        XCTAssertEqual(alice.resource["userType"], "Guest")
        let sent = targetBody(alice.resource, type: "User", brokerID: "b1", target: guests)
        XCTAssertEqual(sent["externalId"], "b1", "the app knows it by its id here")
        XCTAssertNil(sent[sourceExtensionSchema], "the engine's bookkeeping stays here")

        // A membership change marks just that member at the targets the group goes to.
        ctx.newID = "u2"
        try write(.create(users, validated: ["userName": "carol"]))
        let add = try PatchRequest(
            [
                "schemas": ["urn:ietf:params:scim:api:messages:2.0:PatchOp"],
                "Operations": [["op": "add", "path": "members", "value": [["value": "u2"]]]],
            ], registry: store.registry, type: groups)
        try write(.patch(groups, id: "g1", request: add))
        let changes = try store.pendingMemberChanges(target: "own", group: "g1", after: nil, limit: 10) { _, _, _ in true }
        XCTAssertEqual(changes.map(\.member), ["u1", "u2"], "u1 from the group's creation, u2 from the PATCH")
        // A user's removal leaves its groups: the group is queued with the member marked.
        try write(.delete(users, id: "u2"))
        let last = try store.queued(target: "own", after: nil, limit: 20).map { "\($0.item.operation.rawValue) \($0.item.brokerID)" }
        XCTAssertEqual(last.suffix(2), ["upsert g1", "remove u2"])
    }
}

/// The userName template, cut once into text and placeholders.
final class UserNameTemplateTests: XCTestCase {
    func testTheTemplateReplacesItsTwoPlaceholdersAndKeepsEverythingElse() throws {
        func name(_ template: String, _ user: String = "alice", _ domain: String = "hq") throws -> String {
            try InboundPolicy(accept: [InboundPolicy.Rule(domains: ["hq"])], userNameTemplate: template).userName(user, domain: domain)
        }
        XCTAssertEqual(try name("{userName}"), "alice")
        XCTAssertEqual(try name("{userName}@{domain}"), "alice@hq")
        XCTAssertEqual(try name("{domain}\\{userName}"), "hq\\alice")
        XCTAssertEqual(try name("{userName}.{userName}"), "alice.alice", "a placeholder used twice")
        XCTAssertEqual(try name("guest-{userName}"), "guest-alice")
        XCTAssertEqual(try name("{user}{userName}{"), "{user}alice{", "an unknown placeholder and a lone brace are text")
        XCTAssertEqual(try name("{{userName}}"), "{alice}")
        XCTAssertEqual(try name("{userName"), "{userName", "an unclosed placeholder is text")
        XCTAssertEqual(try name("ext_{userName}_é@{domain}", "zoë", "ünï"), "ext_zoë_é@ünï")
        XCTAssertEqual(try name("fixed"), "fixed")
        // Changed after the policy was made: the new template applies.
        var policy = InboundPolicy(accept: [try InboundPolicy.Rule(domains: ["hq"])])
        policy.userNameTemplate = "{domain}:{userName}"
        XCTAssertEqual(policy.userName("bob", domain: "de"), "de:bob")
    }
}
