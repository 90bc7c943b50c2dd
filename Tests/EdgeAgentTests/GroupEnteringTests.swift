import EdgeStore
import EdgeTestSupport
import Foundation
import SCIM
import XCTest

@testable import EdgeAgent
@testable import EdgeDelivery

/// A group entering the boundary with a broker that speaks relay protocol
/// 2 (real LMDB files, the deferred work run in this process and in
/// another one SIGKILLed between two chunks): it goes as full state with at
/// most its first 1,000 members, then members events of at most 1,000, a
/// chunk per transaction, and the broker ends with exactly its members
/// whatever the IdP does to the group meanwhile.
final class GroupEnteringTests: XCTestCase {
    let n = 2_500
    let gid = "99999999-0000-7000-8000-000000000000"
    /// Keeps every group inside the boundary (users still leave).
    var out: LocalPolicy { try! LocalPolicy(registry: .standard, scopes: ["Group": #"displayName eq "nobody""#]) }

    func context(_ id: String) -> WriteContext {
        var ctx = WriteContext(newID: id, now: "2026-12-01T00:00:00Z", epochSeconds: 0, eventID: "e-\(id)", traceID: "t-\(id)")
        ctx.recordEvents = true
        return ctx
    }

    func userID(_ k: Int) -> String { String(format: "%08x-0000-7000-8000-000000000000", k) }

    /// `n` users and the group "all" holding them, kept inside by `out`; the broker speaks 2.
    func fill(_ path: String) throws -> [String] {
        let store = try AgentStore(path: path, registry: .standard, policy: out)
        let users = store.registry.resourceType("User")!, groups = store.registry.resourceType("Group")!
        let ids = (0..<n).map(userID)
        try store.environment.write { txn in
            try store.recordBrokerProtocol(2, in: txn)
            for id in ids {
                let user: JSONObject = ["schemas": ["urn:ietf:params:scim:schemas:core:2.0:User"], "userName": .string("u" + id)]
                _ = try store.apply(.create(users, validated: user), context(id), profile: .lenient, in: txn)
            }
        }
        let group: JSONObject = [
            "schemas": ["urn:ietf:params:scim:schemas:core:2.0:Group"], "displayName": "all",
            "members": .array(ids.map { ["value": .string($0), "type": "User"] }),
        ]
        try store.environment.write { txn in
            _ = try store.apply(.create(groups, validated: group), context(gid), profile: .lenient, in: txn)
        }
        _ = try store.reconcilePolicy(context("p0"))  // the policy it runs with, recorded
        XCTAssertEqual(try store.relaySendsPending(), 0)
        return ids
    }

    func write(_ store: AgentStore, _ w: AgentWrite, _ id: String) throws {
        try store.environment.write { txn in _ = try store.apply(w, context(id), profile: .lenient, in: txn) }
    }

    func patch(_ store: AgentStore, _ op: String, _ path: String, _ value: JSON?, _ id: String) throws {
        var operation: JSONObject = ["op": .string(op), "path": .string(path)]
        if let value { operation["value"] = value }
        let request = try PatchRequest(
            ["schemas": ["urn:ietf:params:scim:api:messages:2.0:PatchOp"], "Operations": [.object(operation)]],
            registry: store.registry, type: store.registry.resourceType("Group")!)
        try write(store, .patch(store.registry.resourceType("Group")!, id: gid, request: request), id)
    }

    /// What a broker holds of the group after applying the outbox in order
    /// (nil: not at all), the most members one event named, and the members
    /// events it would refuse (for a group it does not hold).
    struct Broker {
        var members: Set<String>?
        var largestEvent = 0
        var refused = 0
        var events = 0
    }

    func broker(_ store: AgentStore) throws -> Broker {
        var b = Broker()
        for (_, e) in try store.outboxEntries(after: 0, limit: 1_000_000) {
            let (uri, body) = try XCTUnwrap(e["events"]?.objectValue?.members.first)
            guard body["ref"]?.stringValue == "/Groups/\(gid)" else { continue }
            b.events += 1
            if uri.hasSuffix(":delete") {
                b.members = nil
            } else if uri == AgentStore.membersEvent {
                let added = (body["added"]?.arrayValue ?? []).compactMap { $0["value"]?.stringValue }
                let removed = (body["removed"]?.arrayValue ?? []).compactMap(\.stringValue)
                b.largestEvent = max(b.largestEvent, added.count + removed.count)
                guard var m = b.members else {
                    b.refused += 1
                    continue
                }
                m.subtract(removed)
                m.formUnion(added)
                b.members = m
            } else {
                let m = (body["data"]?["members"]?.arrayValue ?? []).compactMap { $0["value"]?.stringValue }
                b.largestEvent = max(b.largestEvent, m.count)
                b.members = Set(m)
            }
        }
        return b
    }

    /// The difference between two member sets, short enough to read in a failure.
    func diff(_ a: Set<String>?, _ b: Set<String>) -> String {
        guard let a else { return "none held" }
        let extra = a.subtracting(b), missing = b.subtracting(a)
        return extra.isEmpty && missing.isEmpty
            ? ""
            : "\(a.count) held, \(extra.count) extra (\(extra.sorted().prefix(3))), \(missing.count) missing (\(missing.sorted().prefix(3)))"
    }

    func told(_ store: AgentStore) throws -> Int {
        try store.environment.read { txn in
            var k = 0
            try txn.scanKeys(store.relayedMembers, from: AgentStore.memberPrefix(gid), to: Array(gid.utf8) + [1]) { _ in
                k += 1
                return true
            }
            return k
        }
    }

    /// The fixture process runs `steps` steps of the store's deferred work
    /// and is SIGKILLed after the last one's commit, before any other.
    func stepThenKill(_ dir: String, steps: Int) throws {
        let fixture = try ChildProcess(productsDirectory + "/edge-fixture", ["deferred-steps", dir, String(steps)])
        XCTAssertNotNil(fixture.waitForLine("waiting", seconds: 60), "\(fixture.output)")
        fixture.signal(SIGKILL)
        _ = fixture.waitForExit()
    }

    /// Runs the deferred work to its end, no commit heavier than a chunk of
    /// what the broker is told and of what it was told (2,000 entries and
    /// the events). Returns the steps.
    @discardableResult
    func finish(_ store: AgentStore) throws -> Int {
        var steps = 0
        store.environment.resetHeaviestCommit()
        while try store.deferredStep(limit: deferredChunk).relayed > 0 {
            XCTAssertLessThanOrEqual(store.environment.heaviestCommitEntries, 2 * deferredChunk + 20)
            steps += 1
            if steps > 100 { break }
        }
        XCTAssertEqual(try store.relaySendsPending(), 0)
        return steps
    }

    /// A local group of 2,500 members enters the boundary by a policy
    /// change: the change commits about 1,000 entries (it wrote 2,500 and
    /// queued one event of 2,500 members before) and queues the group with
    /// its first 1,000; the rest goes as members events a chunk a commit,
    /// across a SIGKILL between two chunks; and the IdP's changes made
    /// meanwhile (a member not sent yet removed, a member added that a later
    /// chunk also holds, a member already sent removed) end exactly right.
    func testAGroupEnteringTheBoundaryGoesAChunkATransactionAcrossASIGKILL() throws {
        let dir = TempDirectory("entering")
        defer { dir.remove() }
        let data = dir.file("data")
        let ids = try fill(data)
        do {
            let store = try AgentStore(path: data, registry: .standard)
            store.environment.resetHeaviestCommit()
            XCTAssertEqual(try store.reconcilePolicy(context("p1")), 1, "the group's create")
            XCTAssertLessThanOrEqual(store.environment.heaviestCommitEntries, deferredChunk + 50, "the policy change is bounded")
            let b = try broker(store)
            XCTAssertEqual(b.largestEvent, 1000, "the group goes with its first 1,000 members")
            XCTAssertEqual(diff(b.members, Set(ids[0..<1000])), "")
            XCTAssertEqual(try store.relaySendsPending(), 1)
            XCTAssertEqual(try told(store), 1000, "what the broker was told, exactly")
        }
        // One chunk in another process, SIGKILLed after its commit.
        try stepThenKill(data, steps: 1)
        let store = try AgentStore(path: data, registry: .standard)
        XCTAssertEqual(try store.relaySendsPending(), 1, "the rest is still recorded after the SIGKILL")
        XCTAssertEqual(diff(try broker(store).members, Set(ids[0..<2000])), "")
        XCTAssertEqual(try told(store), 2000)
        // The IdP meanwhile: a member not sent yet leaves the group, another
        // already sent too, and a new user (whose id the last chunk covers) joins.
        let users = store.registry.resourceType("User")!
        let late = String(format: "%08x-0000-7000-8000-000000000001", 2300)
        try write(store, .create(users, validated: ["schemas": ["urn:ietf:params:scim:schemas:core:2.0:User"], "userName": "late"]), late)
        try patch(store, "remove", #"members[value eq "\#(ids[2400])"]"#, nil, "r1")
        try patch(store, "remove", #"members[value eq "\#(ids[10])"]"#, nil, "r2")
        try patch(store, "add", "members", [["value": .string(late)]], "a1")
        XCTAssertEqual(try broker(store).members?.contains(late), true, "sent as a delta at once")
        XCTAssertEqual(try finish(store), 1, "the last 500 members in one chunk")
        var expected = Set(ids)
        expected.remove(ids[2400])
        expected.remove(ids[10])
        expected.insert(late)
        let b = try broker(store)
        XCTAssertEqual(diff(b.members, expected), "")
        XCTAssertEqual(b.refused, 0)
        XCTAssertLessThanOrEqual(b.largestEvent, 1000, "no event names more than 1,000 members")
        XCTAssertEqual(try told(store), expected.count)
        // Later deltas are right: one member out, one more event.
        let before = b.events
        try patch(store, "remove", #"members[value eq "\#(ids[2499])"]"#, nil, "r3")
        expected.remove(ids[2499])
        XCTAssertEqual(diff(try broker(store).members, expected), "")
        XCTAssertEqual(try broker(store).events, before + 1)
    }

    /// The group leaves the boundary again while its members are sent (the
    /// work ends; what the broker was told is forgotten later), comes back
    /// before that is done (what is left of it is forgotten first, the
    /// group goes without members, then all of them), and is removed while
    /// it is sent (the work ends, nothing more is sent).
    func testAGroupLeavingComingBackOrRemovedWhileItsMembersAreSentEndsRight() throws {
        let dir = TempDirectory("entering-again")
        defer { dir.remove() }
        let data = dir.file("data")
        let ids = try fill(data)
        do {
            let store = try AgentStore(path: data, registry: .standard)
            _ = try store.reconcilePolicy(context("in1"))
            _ = try store.deferredStep(limit: deferredChunk)
            XCTAssertEqual(try broker(store).members?.count, 2000)
        }
        do {
            let store = try AgentStore(path: data, registry: .standard, policy: out)
            XCTAssertEqual(try store.reconcilePolicy(context("out1")), 1, "the group's delete")
            XCTAssertEqual(try store.relaySendsPending(), 0, "leaving ended the sending")
            XCTAssertEqual(try store.relayForgetsPending(), 1)
            XCTAssertNil(try broker(store).members)
            _ = try store.deferredStep(limit: deferredChunk)
            XCTAssertEqual(try told(store), 1000, "half of what the broker was told is forgotten")
        }
        let store = try AgentStore(path: data, registry: .standard)
        store.environment.resetHeaviestCommit()
        XCTAssertEqual(try store.reconcilePolicy(context("in2")), 1)
        XCTAssertLessThan(store.environment.heaviestCommitEntries, 100, "coming back is O(1) with old records left")
        XCTAssertEqual(diff(try broker(store).members, []), "", "without members until the old records are forgotten")
        XCTAssertEqual(try store.relayForgetsPending(), 0, "the sending forgets them itself")
        // A member removed while the old records are forgotten is never sent.
        try patch(store, "remove", #"members[value eq "\#(ids[5])"]"#, nil, "r1")
        XCTAssertEqual(try finish(store), 2 + 3, "the old records (1,000, then a step that finds none), then three chunks")
        var expected = Set(ids)
        expected.remove(ids[5])
        var b = try broker(store)
        XCTAssertEqual(diff(b.members, expected), "")
        XCTAssertLessThanOrEqual(b.largestEvent, 1000)
        XCTAssertEqual(b.refused, 0)
        XCTAssertEqual(try told(store), expected.count, "exactly what the broker was told")

        // Out and back in once more, so that it is sent again, then removed mid-way.
        do {
            let outStore = try AgentStore(path: data, registry: .standard, policy: out)
            _ = try outStore.reconcilePolicy(context("out2"))
            while try outStore.deferredStep(limit: deferredChunk).swept > 0 {}
            XCTAssertEqual(try told(outStore), 0)
        }
        let again = try AgentStore(path: data, registry: .standard)
        _ = try again.reconcilePolicy(context("in3"))
        XCTAssertEqual(try broker(again).members?.count, 1000)
        try write(again, .delete(again.registry.resourceType("Group")!, id: gid), "del")
        XCTAssertEqual(try again.relaySendsPending(), 0, "the removal ended the sending")
        let events = try broker(again).events
        while try again.deferredStep(limit: deferredChunk).swept > 0 {}
        b = try broker(again)
        XCTAssertNil(b.members)
        XCTAssertEqual(b.events, events, "nothing sent after the delete")
        XCTAssertEqual(b.refused, 0)
    }

    /// A policy change while the members are sent (here: members kept
    /// local from now on) starts the sending over under the new policy:
    /// what the broker was told and the new policy no longer sends is
    /// removed, a chunk at a time, and the broker ends with no members.
    func testAPolicyChangeWhileTheMembersAreSentStartsTheSendingOver() throws {
        let dir = TempDirectory("entering-policy")
        defer { dir.remove() }
        let data = dir.file("data")
        _ = try fill(data)
        do {
            let store = try AgentStore(path: data, registry: .standard)
            _ = try store.reconcilePolicy(context("in"))
            _ = try store.deferredStep(limit: deferredChunk)
            XCTAssertEqual(try broker(store).members?.count, 2000)
        }
        let store = try AgentStore(
            path: data, registry: .standard, policy: try LocalPolicy(registry: .standard, attributes: [("members", .keepLocal)]))
        store.environment.resetHeaviestCommit()
        _ = try store.reconcilePolicy(context("local"))
        XCTAssertLessThan(store.environment.heaviestCommitEntries, 100, "O(1) in the group's size")
        XCTAssertEqual(try store.relaySendsPending(), 1)
        try finish(store)
        let b = try broker(store)
        XCTAssertEqual(diff(b.members, []), "")
        XCTAssertLessThanOrEqual(b.largestEvent, 1000)
        XCTAssertEqual(try told(store), 0)
    }

    /// An older broker (no protocol 2 recorded) still gets the group whole.
    func testWithoutProtocol2AGroupEnteringGoesWhole() throws {
        let dir = TempDirectory("entering-v1")
        defer { dir.remove() }
        let data = dir.file("data")
        let ids = try fill(data)
        let store = try AgentStore(path: data, registry: .standard)
        try store.environment.write { txn in try store.recordBrokerProtocol(1, in: txn) }
        _ = try store.reconcilePolicy(context("p1"))
        XCTAssertEqual(diff(try broker(store).members, Set(ids)), "")
        XCTAssertEqual(try store.relaySendsPending(), 0)
    }
}
