import EdgeStore
import EdgeTestSupport
import Foundation
import SCIM
import XCTest

@testable import EdgeAgent
@testable import EdgeDelivery

/// What a rare transition leaves for later at the agent, against real LMDB
/// files: the write that removes a group of n members, or that takes a
/// group off a local target, is O(1), and the rest goes a chunk per
/// transaction afterwards, durably (the work outlives a SIGKILL between two
/// chunks and goes on after the restart), with readers never seeing what is
/// left of the group meanwhile.
final class DeferredWorkTests: XCTestCase {
    let n = 5_000

    func context(_ id: String) -> WriteContext {
        var ctx = WriteContext(newID: id, now: "2026-12-01T00:00:00Z", epochSeconds: 0, eventID: "e-\(id)", traceID: "t-\(id)")
        ctx.recordEvents = true
        return ctx
    }

    /// `n` users and a group "all" holding them; returns the user ids and the group's.
    func fill(_ store: AgentStore) throws -> (users: [String], group: String) {
        let users = store.registry.resourceType("User")!, groups = store.registry.resourceType("Group")!
        let ids = (0..<n).map { String(format: "%08x-0000-7000-8000-000000000000", $0) }
        for chunk in stride(from: 0, to: n, by: 1000) {
            try store.environment.write { txn in
                for id in ids[chunk..<min(n, chunk + 1000)] {
                    let user: JSONObject = ["schemas": ["urn:ietf:params:scim:schemas:core:2.0:User"], "userName": .string("u" + id)]
                    _ = try store.apply(.create(users, validated: user), context(id), profile: .lenient, in: txn)
                }
            }
        }
        let gid = "99999999-0000-7000-8000-000000000000"
        let group: JSONObject = [
            "schemas": ["urn:ietf:params:scim:schemas:core:2.0:Group"], "displayName": "all",
            "members": .array(ids.map { ["value": .string($0), "type": "User"] }),
        ]
        try store.environment.write { txn in
            _ = try store.apply(.create(groups, validated: group), context(gid), profile: .lenient, in: txn)
        }
        return (ids, gid)
    }

    func entries(_ store: AgentStore, _ db: Database, of group: String) throws -> Int {
        try store.environment.read { txn in
            var k = 0
            try txn.scanKeys(db, from: AgentStore.memberPrefix(group), to: Array(group.utf8) + [1]) { _ in
                k += 1
                return true
            }
            return k
        }
    }

    /// The fixture process runs `steps` steps of the store's deferred work
    /// and is SIGKILLed after the last one's commit, before any other.
    func stepThenKill(_ dir: String, steps: Int, target: String? = nil) throws {
        let fixture = try ChildProcess(
            productsDirectory + "/edge-fixture", ["deferred-steps", dir, String(steps)] + (target.map { ["--target", $0] } ?? []))
        XCTAssertNotNil(fixture.waitForLine("waiting", seconds: 60), "\(fixture.output)")
        fixture.signal(SIGKILL)
        _ = fixture.waitForExit()
    }

    func metric(_ text: String, _ name: String) -> Double? {
        text.split(separator: "\n").first { $0.hasPrefix(name + " ") }.flatMap { Double($0.split(separator: " ").last!) }
    }

    /// (a) Removing a group of 5,000 members commits a few entries (it
    /// wrote some 25,000 before: each member's index entries both ways,
    /// its relay record, a pending mark put and taken); no reader sees the
    /// removed group among a member's groups meanwhile; a SIGKILL between
    /// two chunks of the sweep leaves the rest recorded, and the restarted
    /// agent sweeps it, no commit heavier than one chunk.
    func testARemovedGroupsMembersLeaveTheIndexAChunkAtATimeAcrossASIGKILL() throws {
        let dir = TempDirectory("deferred-agent")
        defer { dir.remove() }
        let data = dir.file("data")
        var users: [String] = [], gid = ""
        do {
            let store = try AgentStore(path: data, registry: .standard)
            (users, gid) = try fill(store)
            XCTAssertEqual(try entries(store, store.relayedMembers, of: gid), n, "the broker was told every member")
            let groups = store.registry.resourceType("Group")!
            store.environment.resetHeaviestCommit()
            try store.environment.write { txn in _ = try store.apply(.delete(groups, id: gid), context("del"), profile: .lenient, in: txn) }
            XCTAssertLessThan(store.environment.heaviestCommitEntries, 100, "the removal is O(1) whatever the group's size")
            XCTAssertEqual(try store.groupsBeingSwept(), 1)
            XCTAssertEqual(try entries(store, store.groupMembers, of: gid), n, "left for the sweep")
            let user = try XCTUnwrap(try store.getAsReturned(store.registry.resourceType("User")!, users[7], baseURL: ""))
            XCTAssertNil(user["groups"], "the removed group is no one's group while it is swept: \(user)")
            XCTAssertEqual(try store.environment.read { txn in try store.groupsHolding(users[7], txn) }, [])
        }
        // Two chunks in another process, SIGKILLed after the second one's commit.
        try stepThenKill(data, steps: 2)
        do {
            let store = try AgentStore(path: data, registry: .standard)
            XCTAssertEqual(try store.groupsBeingSwept(), 1, "the rest is still recorded after the SIGKILL")
            XCTAssertEqual(try entries(store, store.groupMembers, of: gid), n - 2 * deferredChunk, "two chunks went")
            XCTAssertEqual(try store.environment.read { txn in try store.groupIDs(txn, of: users[0]) }, [], "both directions")
            XCTAssertEqual(try store.environment.read { txn in try store.groupIDs(txn, of: users[n - 1]) }, [gid], "not swept yet")
            let user = try XCTUnwrap(try store.getAsReturned(store.registry.resourceType("User")!, users[n - 1], baseURL: ""))
            XCTAssertNil(user["groups"], "\(user)")
        }
        // The agent started again sweeps the rest in the background, a chunk a commit.
        let agent = try ChildProcess(
            productsDirectory + "/scim-edge",
            ["serve", "--data-dir", data, "--listen", "127.0.0.1:0", "--token", "t", "--admin-listen", "127.0.0.1:0"])
        let line = try XCTUnwrap(agent.waitForLine("operations at", seconds: 30), "\(agent.output)")
        let adminPort = try XCTUnwrap(Int(line.split(separator: ":").last!.split(separator: "/").first!))
        func metrics() -> String {
            guard let c = try? RawClient(port: adminPort) else { return "" }
            _ = c.send("GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            return c.readResponses(1).first?.body ?? ""
        }
        let rest = (n - 2 * deferredChunk) + n  // its members, then what the relay kept of it
        XCTAssertTrue(
            eventually(seconds: 60) { (self.metric(metrics(), "scim_edge_removed_group_members_swept_total") ?? 0) >= Double(rest) },
            metrics())
        let heaviest = try XCTUnwrap(metric(metrics(), "scim_edge_store_commit_entries_max"))
        XCTAssertLessThanOrEqual(heaviest, Double(2 * deferredChunk + 10), "a chunk and its reverse entries a commit")
        agent.signal(SIGTERM)
        XCTAssertNotNil(agent.waitForExit(seconds: 30))
        let store = try AgentStore(path: data, registry: .standard)
        XCTAssertEqual(try store.groupsBeingSwept(), 0)
        for db in [store.groupMembers, store.relayedMembers, store.pendingMembers] { XCTAssertEqual(try entries(store, db, of: gid), 0) }
        XCTAssertEqual(try store.environment.read { txn in try store.groupIDs(txn, of: users[n - 1]) }, [])
    }

    /// A foreign group (named by its broker id) removed and sent again at
    /// once, while its old members are still being swept, holds only its
    /// new members: the old entries go before the new ones are written.
    func testAGroupBackWithTheSameIDWhileItsOldMembersAreSweptHoldsOnlyItsNewOnes() throws {
        let dir = TempDirectory("deferred-foreign")
        defer { dir.remove() }
        let store = try AgentStore(path: dir.path, registry: .standard)
        let policy = InboundPolicy(accept: [try InboundPolicy.Rule(domains: ["hq"])])
        let ctx = context("n")
        let create = "urn:ietf:params:SCIM:event:prov:create:full", delete = "urn:ietf:params:SCIM:event:prov:delete"
        var seq = 0
        func event(_ uri: String, _ ref: String, _ data: JSON? = nil) -> JSON {
            seq += 1
            var body: JSONObject = ["ref": .string(ref)]
            if let data { body["data"] = data }
            return ["seq": .int(seq), "domain": "hq", "events": .object(JSONObject([(uri, .object(body))]))]
        }
        func group(_ members: Range<Int>) -> JSON {
            [
                "schemas": ["urn:ietf:params:scim:schemas:core:2.0:Group"], "displayName": "staff",
                "members": .array(members.map { ["value": .string("hu\($0)"), "type": "User"] }),
            ]
        }
        func apply(_ events: [JSON]) throws {
            let outcome = try store.environment.write { txn in try store.applyDownlink(events, policy: policy, ctx, in: txn) }
            XCTAssertEqual(outcome.refused, [:])
        }
        for chunk in stride(from: 0, to: 3000, by: 1000) {
            try apply(
                (chunk..<chunk + 1000).map { i in
                    event(
                        create, "/Users/hu\(i)", ["schemas": ["urn:ietf:params:scim:schemas:core:2.0:User"], "userName": .string("hu\(i)")])
                })
        }
        try apply([event(create, "/Groups/hg", group(0..<3000))])
        try apply([event(delete, "/Groups/hg")])
        XCTAssertEqual(try store.groupsBeingSwept(), 1)
        _ = try store.deferredStep(limit: deferredChunk)  // one chunk of the old members went
        try apply([event(create, "/Groups/hg", group(2990..<3000))])
        let groups = store.registry.resourceType("Group")!
        let members = try XCTUnwrap(store.get(groups, "hg"))["members"]?.arrayValue?.compactMap { $0["value"]?.stringValue } ?? []
        XCTAssertEqual(members, (2990..<3000).map { "hu\($0)" })
        XCTAssertEqual(try store.groupsBeingSwept(), 0, "the old one's sweep finished before the new group was written")
        XCTAssertEqual(try store.environment.read { txn in try store.groupIDs(txn, of: "hu2500") }, [])
        XCTAssertEqual(try store.environment.read { txn in try store.groupIDs(txn, of: "hu2995") }, ["hg"])
    }

    /// (c) A group of 5,000 members taken out of the boundary by a policy
    /// change: the change commits a few entries (it deleted the 5,000
    /// records of what the broker was told before), the records go a chunk
    /// a commit, across a SIGKILL between two chunks; and a group back in
    /// the boundary before they are all gone is sent whole, with exactly
    /// its members recorded, which the rest of the work never takes.
    func testWhatTheRelayToldOfAGroupThatLeftGoesAChunkAtATimeAcrossASIGKILL() throws {
        let dir = TempDirectory("deferred-relay")
        defer { dir.remove() }
        let data = dir.file("data")
        let out = try LocalPolicy(registry: .standard, scopes: ["Group": #"displayName eq "nobody""#])
        var gid = ""
        do {
            let store = try AgentStore(path: data, registry: .standard)
            (_, gid) = try fill(store)
            _ = try store.reconcilePolicy(context("p0"))  // the policy it runs with, recorded
            XCTAssertEqual(try entries(store, store.relayedMembers, of: gid), n)
        }
        do {
            let store = try AgentStore(path: data, registry: .standard, policy: out)
            let before = try store.outboxCount()
            store.environment.resetHeaviestCommit()
            XCTAssertEqual(try store.reconcilePolicy(context("p1")), 1, "the group's delete")
            XCTAssertEqual(try store.outboxCount(), before + 1)
            XCTAssertLessThan(store.environment.heaviestCommitEntries, 100, "the policy change is O(1) in the group's size")
            XCTAssertEqual(try store.relayForgetsPending(), 1)
            XCTAssertEqual(try entries(store, store.relayedMembers, of: gid), n, "left for later")
        }
        try stepThenKill(data, steps: 2)
        do {
            let store = try AgentStore(path: data, registry: .standard, policy: out)
            XCTAssertEqual(try store.relayForgetsPending(), 1, "the rest is still recorded after the SIGKILL")
            XCTAssertEqual(try entries(store, store.relayedMembers, of: gid), n - 2 * deferredChunk)
        }
        // Back in the boundary (the policy before) with 3,000 records left: sent whole, its records its own.
        do {
            let store = try AgentStore(path: data, registry: .standard)
            let before = try store.outboxCount()
            XCTAssertEqual(try store.reconcilePolicy(context("p2")), 1)
            let last = try XCTUnwrap(try store.outboxEntries(after: UInt64(before), limit: 10).last?.1)
            let (uri, body) = try XCTUnwrap(last["events"]?.objectValue?.members.first)
            XCTAssertEqual(uri, "urn:ietf:params:SCIM:event:prov:create:full")
            XCTAssertEqual(body["data"]?["members"]?.arrayValue?.count, n, "the group whole")
            XCTAssertEqual(try store.relayForgetsPending(), 0, "its sending whole ended the work")
            XCTAssertEqual(try entries(store, store.relayedMembers, of: gid), n)
            while try store.deferredStep(limit: deferredChunk).swept > 0 {}
            XCTAssertEqual(try entries(store, store.relayedMembers, of: gid), n, "no later step takes its new records")
        }
        // Out again: the records go a chunk a commit.
        let outAgain = try AgentStore(path: data, registry: .standard, policy: out)
        XCTAssertEqual(try outAgain.reconcilePolicy(context("p3")), 1)
        XCTAssertEqual(try outAgain.relayForgetsPending(), 1)
        var steps = 0
        while try outAgain.deferredStep(limit: deferredChunk).swept > 0 {
            XCTAssertLessThanOrEqual(outAgain.environment.heaviestCommitEntries, deferredChunk + 10)
            steps += 1
        }
        XCTAssertEqual(steps, n / deferredChunk + 1, "5 full chunks, then the one that finds none and ends the work")
        XCTAssertEqual(try outAgain.relayForgetsPending(), 0)
        XCTAssertEqual(try entries(outAgain, outAgain.relayedMembers, of: gid), 0)
    }

    /// (b) A local target's index of a group of 5,000 members is forgotten
    /// after the group left the target, not in the transaction that records
    /// it (which wrote 10,000 entries before): a chunk a commit, across a
    /// SIGKILL between two chunks; meanwhile the members are in no group
    /// there.
    func testATargetsIndexOfAGroupThatLeftItGoesAChunkAtATimeAcrossASIGKILL() throws {
        let dir = TempDirectory("deferred-target")
        defer { dir.remove() }
        let data = dir.file("data")
        var app = try TargetConfiguration(name: "app", url: "http://127.0.0.1:9/scim/v2")
        app.routes = [try Route()]
        var users: [String] = [], gid = ""
        func held(_ store: AgentStore) throws -> Int {
            try store.environment.read { txn in
                var k = 0
                try txn.scanKeys(
                    store.targetMembers, from: AgentStore.targetGroupPrefix("app", gid), to: AgentStore.targetGroupEnd("app", gid)
                ) { _ in
                    k += 1
                    return true
                }
                return k
            }
        }
        do {
            let store = try AgentStore(path: data, registry: .standard, targets: [app])
            (users, gid) = try fill(store)
            // What the target holds, as the deliveries would have recorded it.
            try store.environment.write { txn in
                for u in users {
                    try store.setMapping(
                        target: "app", type: "User", brokerID: u, TargetMapping(targetID: "t-" + u, etag: nil, sent: nil), txn)
                    _ = try store.holdMember(target: "app", group: gid, member: u, targetID: "t-" + u, txn)
                }
                try store.setMapping(
                    target: "app", type: "Group", brokerID: gid, TargetMapping(targetID: "t-g", etag: nil, sent: [:], members: n), txn)
            }
            XCTAssertEqual(try held(store), n)
            store.environment.resetHeaviestCommit()
            // The group's removal at the target is recorded.
            try store.environment.write { txn in
                _ = try store.completeDelivery(
                    target: "app", keys: [], brokerID: gid, type: "Group", mapping: .some(nil), deadLetter: nil, hop: nil, trace: "", txn)
            }
            XCTAssertLessThan(store.environment.heaviestCommitEntries, 50, "recording the removal is O(1)")
            XCTAssertTrue(try store.groupIndexSweepPending(target: "app", group: gid))
            XCTAssertEqual(try store.environment.read { txn in try store.heldGroups(target: "app", member: users[3], txn) }, [])
        }
        try stepThenKill(data, steps: 1, target: "app")
        let store = try AgentStore(path: data, registry: .standard, targets: [app])
        XCTAssertTrue(try store.groupIndexSweepPending(target: "app", group: gid), "the rest is still recorded after the SIGKILL")
        XCTAssertEqual(try held(store), n - deferredChunk)
        XCTAssertEqual(try store.environment.read { txn in try store.heldGroups(target: "app", member: users[n - 1], txn) }, [])
        store.environment.resetHeaviestCommit()
        var steps = 0
        while try store.deferredWorkPending() {
            _ = try store.deferredStep(limit: deferredChunk)
            steps += 1
        }
        // The rest of what it held, then the pending marks the group's creation left there, then the last, empty one.
        XCTAssertEqual(steps, ((n - deferredChunk) + n) / deferredChunk + 1)
        XCTAssertLessThanOrEqual(store.environment.heaviestCommitEntries, 2 * deferredChunk + 5)
        XCTAssertEqual(try held(store), 0)
        XCTAssertEqual(
            try store.environment.read { txn in try txn.duplicateValues(store.targetMemberOf, prefixed("app", users[n - 1])) }, [])
    }
}
