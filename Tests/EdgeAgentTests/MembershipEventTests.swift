import EdgeAgent
import EdgeStore
import EdgeTestSupport
import Foundation
import SCIM
import XCTest

/// A group's relay events with relay protocol 2 (real agent, real LMDB
/// file): a change of members only goes as the members added and removed,
/// small whatever the group's size; a change of its attributes, or a broker
/// that never said it speaks 2, sends the whole group.
final class MembershipEventTests: XCTestCase {
    let groupSchema = #"["urn:ietf:params:scim:schemas:core:2.0:Group"]"#
    let patchSchema = #"["urn:ietf:params:scim:api:messages:2.0:PatchOp"]"#

    /// Every outbox event after `after`: its kind, ref, the event's own bytes and body.
    func events(_ store: AgentStore, after: UInt64 = 0) throws -> [(kind: String, ref: String, bytes: Int, body: JSON)] {
        try store.outboxEntries(after: after, limit: 100_000).map { _, e in
            let (uri, body) = e["events"]!.objectValue!.members.first!
            // prov:create:full, prov:patch:members, prov:delete …
            let kind = uri.split(separator: ":").drop { $0 != "prov" }.joined(separator: ":")
            return (kind, body["ref"]!.stringValue!, e.serialized().count, body)
        }
    }

    func patch(_ agent: AgentHarness, _ gid: String, _ ops: String) throws {
        XCTAssertEqual(try agent.call("PATCH", "/Groups/\(gid)", #"{"schemas":\#(patchSchema),"Operations":\#(ops)}"#).status, 200)
    }

    func testMembershipChangesAreRelayedAsDeltasOnceTheBrokerSpeaksProtocol2() throws {
        let first = try AgentHarness()  // kept: its directory holds the store
        var agent: AgentHarness? = first
        let path = first.dir.file("data")
        let ids = try (0..<3).map { k in try XCTUnwrap(try agent!.call("POST", "/Users", userBody("u\(k)")).body?["id"]?.stringValue) }
        let gid = try XCTUnwrap(
            try agent!.call("POST", "/Groups", #"{"schemas":\#(groupSchema),"displayName":"staff","members":[{"value":"\#(ids[0])"}]}"#)
                .body?["id"]?.stringValue)
        // Protocol 1 (no broker has said otherwise): a member added is the whole group.
        try patch(agent!, gid, #"[{"op":"add","path":"members","value":[{"value":"\#(ids[1])"}]}]"#)
        XCTAssertEqual(agent!.stop(), 0)
        var store = try AgentStore(path: path, registry: .standard)
        var e = try events(store)
        XCTAssertEqual(e.map(\.kind), ["prov:create:full", "prov:create:full", "prov:create:full", "prov:create:full", "prov:patch:full"])
        XCTAssertEqual(e[4].body["data"]?["members"]?.arrayValue?.count, 2)
        let seen = try store.numberedSequence()
        // The broker said 2 (what the relay records from its answers).
        try store.environment.write { txn in try store.recordBrokerProtocol(2, in: txn) }
        store = try AgentStore(path: path, registry: .standard)
        XCTAssertEqual(try store.brokerProtocol(), 2)

        agent = try AgentHarness { $0.dataDirectory = path }
        // Members added and removed, in the forms IdPs send, and a user deleted while a member.
        try patch(agent!, gid, #"[{"op":"add","path":"members","value":[{"value":"\#(ids[2])"}]}]"#)
        try patch(agent!, gid, #"[{"op":"remove","path":"members[value eq \"\#(ids[0])\"]"}]"#)
        try patch(agent!, gid, #"[{"op":"add","path":"members","value":[{"value":"\#(ids[2])"}]}]"#)  // already a member: no event
        XCTAssertEqual(try agent!.call("DELETE", "/Users/\(ids[1])").status, 204)
        // An attribute change sends the whole group (still with its one member).
        try patch(agent!, gid, #"[{"op":"replace","path":"displayName","value":"all staff"}]"#)
        XCTAssertEqual(agent!.stop(), 0)
        e = try events(try AgentStore(path: path, registry: .standard), after: seen)
        XCTAssertEqual(
            e.map { "\($0.kind) \($0.ref)" },
            [
                "prov:patch:members /Groups/\(gid)", "prov:patch:members /Groups/\(gid)",
                // The group loses the user before the user goes: the broker resolves the member while it holds it.
                "prov:patch:members /Groups/\(gid)", "prov:delete /Users/\(ids[1])",
                "prov:patch:full /Groups/\(gid)",
            ])
        func values(_ k: Int, _ key: String) -> [String] {
            (e[k].body[key]?.arrayValue ?? []).compactMap { $0["value"]?.stringValue ?? $0.stringValue }
        }
        XCTAssertEqual(values(0, "added"), [ids[2]])
        XCTAssertEqual(values(0, "removed"), [])
        XCTAssertEqual(values(1, "removed"), [ids[0]])
        XCTAssertEqual(values(2, "removed"), [ids[1]])
        XCTAssertNotNil(e[0].body["version"], "a delta carries the group's version")
        for k in 0..<3 { XCTAssertLessThan(e[k].bytes, 1024, "one member's change is well under 1 KiB: \(e[k].bytes) bytes") }
        XCTAssertEqual(e[4].body["data"]?["members"]?.arrayValue?.compactMap { $0["value"]?.stringValue }, [ids[2]])
        XCTAssertEqual(e[4].body["data"]?["displayName"]?.stringValue, "all staff")
    }

    /// A change of more than `maxMembersPerEvent` (1,000) members goes as
    /// several members events, in order, written with the change: the
    /// broker applies each in a transaction of bounded size.
    func testALargeMembershipChangeIsSplitIntoEventsOfAtMost1000Members() throws {
        let first = try AgentHarness()
        let path = first.dir.file("data")
        var ids: [String] = []
        for b in 0..<3 {
            let ops = (0..<1000).map { k in
                #"{"method":"POST","path":"/Users","bulkId":"b\#(k)","data":\#(userBody("u\(b * 1000 + k)"))}"#
            }
            let r = try first.call(
                "POST", "/Bulk",
                #"{"schemas":["urn:ietf:params:scim:api:messages:2.0:BulkRequest"],"Operations":[\#(ops.joined(separator: ","))]}"#)
            XCTAssertEqual(r.status, 200)
            ids += try XCTUnwrap(r.body?["Operations"]?.arrayValue).compactMap {
                $0["location"]?.stringValue?.split(separator: "/").last.map(String.init)
            }
        }
        XCTAssertEqual(ids.count, 3000)
        let gid = try XCTUnwrap(
            try first.call("POST", "/Groups", #"{"schemas":\#(groupSchema),"displayName":"staff","members":[{"value":"\#(ids[0])"}]}"#)
                .body?["id"]?.stringValue)
        XCTAssertEqual(first.stop(), 0)
        let store = try AgentStore(path: path, registry: .standard)
        try store.environment.write { txn in try store.recordBrokerProtocol(2, in: txn) }
        let seen = try store.numberedSequence()
        let agent = try AgentHarness { $0.dataDirectory = path }
        let added = ids[1..<2501].map { #"{"value":"\#($0)"}"# }.joined(separator: ",")
        let ops = #"[{"op":"remove","path":"members[value eq \"\#(ids[0])\"]"},{"op":"add","path":"members","value":[\#(added)]}]"#
        XCTAssertEqual(try agent.call("PATCH", "/Groups/\(gid)", #"{"schemas":\#(patchSchema),"Operations":\#(ops)}"#).status, 204)
        XCTAssertEqual(agent.stop(), 0)
        let e = try events(try AgentStore(path: path, registry: .standard), after: seen)
        XCTAssertEqual(e.map(\.kind), Array(repeating: "prov:patch:members", count: 3))
        let sizes = e.map { ($0.body["added"]?.arrayValue?.count ?? 0) + ($0.body["removed"]?.arrayValue?.count ?? 0) }
        XCTAssertEqual(sizes, [1000, 1000, 501])
        let removed = e.flatMap { $0.body["removed"]?.arrayValue ?? [] }.compactMap(\.stringValue)
        let addedIDs = e.flatMap { $0.body["added"]?.arrayValue ?? [] }.compactMap { $0["value"]?.stringValue }
        XCTAssertEqual(removed, [ids[0]])
        XCTAssertEqual(Set(addedIDs), Set(ids[1..<2501]))
        XCTAssertEqual(addedIDs.count, 2500, "each member once")
        for k in e.indices { XCTAssertNotNil(e[k].body["version"], "each part carries the group's version") }
    }

    /// Protocol 3: a change of a group's attributes goes as the attributes
    /// alone (`membersUnchanged`), whatever the group's size, and a change
    /// of members made in the same request follows as members events.
    func testWithProtocol3AGroupsAttributesGoWithoutItsMembers() throws {
        let first = try AgentHarness()
        let path = first.dir.file("data")
        let ids = try (0..<3).map { k in try XCTUnwrap(try first.call("POST", "/Users", userBody("u\(k)")).body?["id"]?.stringValue) }
        let gid = try XCTUnwrap(
            try first.call(
                "POST", "/Groups",
                #"{"schemas":\#(groupSchema),"displayName":"staff","members":[{"value":"\#(ids[0])"},{"value":"\#(ids[1])"}]}"#
            ).body?["id"]?.stringValue)
        XCTAssertEqual(first.stop(), 0)
        let store = try AgentStore(path: path, registry: .standard)
        try store.environment.write { txn in try store.recordBrokerProtocol(3, in: txn) }
        let seen = try store.numberedSequence()
        let agent = try AgentHarness { $0.dataDirectory = path }
        try patch(agent, gid, #"[{"op":"replace","path":"displayName","value":"all staff"}]"#)
        try patch(
            agent, gid,
            #"[{"op":"replace","path":"displayName","value":"everyone"},{"op":"add","path":"members","value":[{"value":"\#(ids[2])"}]}]"#)
        XCTAssertEqual(agent.stop(), 0)
        let e = try events(try AgentStore(path: path, registry: .standard), after: seen)
        XCTAssertEqual(e.map(\.kind), ["prov:patch:full", "prov:patch:full", "prov:patch:members"])
        for k in 0..<2 {
            XCTAssertEqual(e[k].body["membersUnchanged"], .bool(true))
            XCTAssertNil(e[k].body["data"]?["members"], "no members with the attributes")
        }
        XCTAssertEqual(e[0].body["data"]?["displayName"]?.stringValue, "all staff")
        XCTAssertEqual(e[1].body["data"]?["displayName"]?.stringValue, "everyone")
        XCTAssertEqual(e[2].body["added"]?.arrayValue?.compactMap { $0["value"]?.stringValue }, [ids[2]])
    }

    /// What the broker refused is not believed to be there: a user whose
    /// create was refused, added to a group meanwhile, is added again when
    /// the dead letter is retried; a group whose create was refused is sent
    /// in full at its next change, not as a delta against nothing.
    func testRefusedEventsAreNotBelievedByTheDeltas() throws {
        let first = try AgentHarness()
        let path = first.dir.file("data")
        let gid = try XCTUnwrap(
            try first.call("POST", "/Groups", #"{"schemas":\#(groupSchema),"displayName":"team"}"#).body?["id"]?.stringValue)
        let uid = try XCTUnwrap(try first.call("POST", "/Users", userBody("late")).body?["id"]?.stringValue)
        XCTAssertEqual(first.stop(), 0)
        var store = try AgentStore(path: path, registry: .standard)
        // The broker speaks 2, took the group's create (seq 1) and refused the user's (seq 2).
        try store.environment.write { txn in
            try store.recordBrokerProtocol(2, in: txn)
            _ = try store.acknowledge(through: 2, rejected: [2: "refused for the test"], in: txn)
        }
        let second = try AgentHarness { $0.dataDirectory = path }
        try patch(second, gid, #"[{"op":"add","path":"members","value":[{"value":"\#(uid)"}]}]"#)
        XCTAssertEqual(second.stop(), 0)
        store = try AgentStore(path: path, registry: .standard)
        XCTAssertEqual(try events(store, after: 2).map(\.kind), ["prov:patch:members"], "sent, but the broker held no such user")
        let ctx = WriteContext(newID: "", now: "2026-12-01T00:00:00Z", epochSeconds: 0, eventID: "retry", traceID: "retry")
        XCTAssertTrue(try store.retryDeadLetter(2, ctx))
        let retried = try events(store, after: 3)
        XCTAssertEqual(retried.map(\.kind), ["prov:create:full", "prov:patch:members"], "the user, then its membership again")
        guard retried.count == 2 else { return }
        XCTAssertEqual((retried[1].body["added"]?.arrayValue ?? []).compactMap { $0["value"]?.stringValue }, [uid])

        // A group whose create was refused: its next change is a full create.
        let third = try AgentHarness { $0.dataDirectory = path }
        let g2 = try XCTUnwrap(
            try third.call("POST", "/Groups", #"{"schemas":\#(groupSchema),"displayName":"refused"}"#).body?["id"]?.stringValue)
        XCTAssertEqual(third.stop(), 0)
        store = try AgentStore(path: path, registry: .standard)
        let refused = try store.numberedSequence()
        try store.environment.write { txn in
            _ = try store.acknowledge(through: refused, rejected: [refused: "refused for the test"], in: txn)
        }
        let fourth = try AgentHarness { $0.dataDirectory = path }
        try patch(fourth, g2, #"[{"op":"add","path":"members","value":[{"value":"\#(uid)"}]}]"#)
        XCTAssertEqual(fourth.stop(), 0)
        let after = try events(try AgentStore(path: path, registry: .standard), after: refused)
        XCTAssertEqual(after.map { "\($0.kind) \($0.ref)" }, ["prov:create:full /Groups/\(g2)"], "in full, not a delta")
        XCTAssertEqual(after.first?.body["data"]?["members"]?.arrayValue?.compactMap { $0["value"]?.stringValue }, [uid])
    }

    /// A policy change that only changes how members leave (here: members
    /// kept local) re-sends the groups concerned at start.
    func testAPolicyChangeOnMembersReSendsTheGroup() throws {
        let first = try AgentHarness()
        let path = first.dir.file("data")
        let uid = try XCTUnwrap(try first.call("POST", "/Users", userBody("shown")).body?["id"]?.stringValue)
        let gid = try XCTUnwrap(
            try first.call(
                "POST", "/Groups", #"{"schemas":\#(groupSchema),"displayName":"g","members":[{"value":"\#(uid)"}]}"#
            ).body?["id"]?.stringValue)
        XCTAssertEqual(first.stop(), 0)
        let store = try AgentStore(path: path, registry: .standard)
        try store.environment.write { txn in try store.recordBrokerProtocol(2, in: txn) }
        let seq = try store.numberedSequence()
        let policy = try LocalPolicy(registry: .standard, attributes: [("members", .keepLocal)])
        let second = try AgentHarness {
            $0.dataDirectory = path
            $0.policy = policy
        }
        XCTAssertEqual(second.stop(), 0)
        let e = try events(try AgentStore(path: path, registry: .standard), after: seq)
        XCTAssertEqual(e.map { "\($0.kind) \($0.ref)" }, ["prov:put:full /Groups/\(gid)"])
        XCTAssertNil(e.first?.body["data"]?["members"], "the members stay inside: the broker is told the group has none")
        XCTAssertNotNil(uid)
    }
}
