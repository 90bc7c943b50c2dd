import EdgeBroker
import EdgeStore
import EdgeTestSupport
import SCIM
import XCTest

/// Protocol 2's membership deltas at the broker, against a real LMDB file:
/// applied as the members added and removed, exactly once (a replayed
/// batch changes nothing), refused when they name what the broker does not
/// hold.
final class MembershipDeltaTests: XCTestCase {
    let agent = AgentKey(identity: "spiffe://t/acme-de/agent-1", epoch: "e1")

    func event(_ seq: UInt64, _ uri: String, _ body: JSONObject) -> RelayEvent {
        RelayEvent(seq: seq, body: ["seq": .number(JSONNumber(integer: Int64(seq))), "events": .object([uri: .object(body)])])
    }

    func user(_ seq: UInt64, _ id: String) -> RelayEvent {
        event(
            seq, "urn:ietf:params:SCIM:event:prov:create:full",
            [
                "ref": .string("/Users/\(id)"),
                "data": ["schemas": ["urn:ietf:params:scim:schemas:core:2.0:User"], "id": .string(id), "userName": .string(id)],
            ])
    }

    func members(_ seq: UInt64, _ group: String, added: [String] = [], removed: [String] = []) -> RelayEvent {
        event(
            seq, BrokerStore.membersEvent,
            [
                "ref": .string("/Groups/\(group)"), "version": .string("W/\"\(seq)\""),
                "added": .array(added.map { .object(["value": .string($0)]) }), "removed": .array(removed.map { .string($0) }),
            ])
    }

    func apply(_ store: BrokerStore, _ events: [RelayEvent]) throws -> ApplyOutcome {
        try store.environment.write { txn in
            try store.apply(domain: "acme-de", agent: agent, events: events, newIDs: events.map { "b-\($0.seq)" }, in: txn)
        }
    }

    func groupMembers(_ store: BrokerStore) throws -> [String] {
        let group = try XCTUnwrap(try store.resources(domain: "acme-de").first { $0["displayName"]?.stringValue == "G" })
        return (group["members"]?.arrayValue ?? []).compactMap { $0["value"]?.stringValue }.sorted()
    }

    func testMembershipDeltasApplyOnceAndReplaysChangeNothing() throws {
        let dir = TempDirectory("broker-deltas")
        defer { dir.remove() }
        let store = try BrokerStore(path: dir.file("broker"))
        let group = event(
            4, "urn:ietf:params:SCIM:event:prov:create:full",
            [
                "ref": "/Groups/g1",
                "data": [
                    "schemas": ["urn:ietf:params:scim:schemas:core:2.0:Group"], "id": "g1", "displayName": "G",
                    "members": [["value": "u1"]],
                ],
            ])
        var outcome = try apply(store, [user(1, "u1"), user(2, "u2"), user(3, "u3"), group])
        XCTAssertEqual(outcome.applied, 4)
        XCTAssertEqual(try groupMembers(store), ["b-1"])

        // +u2 +u3 −u1, then +u2 again (already a member: no duplicate entry).
        let batch = [members(5, "g1", added: ["u2", "u3"], removed: ["u1"]), members(6, "g1", added: ["u2"])]
        outcome = try apply(store, batch)
        XCTAssertEqual(outcome.applied, 2)
        XCTAssertEqual(outcome.rejected, [:])
        XCTAssertEqual(try groupMembers(store), ["b-2", "b-3"])

        // The same batch again (a resend after a lost answer): acknowledged, not applied.
        outcome = try apply(store, batch)
        XCTAssertEqual(outcome.applied, 0)
        XCTAssertEqual(outcome.duplicates, 2)
        XCTAssertEqual(outcome.ackedThrough, 6)
        XCTAssertEqual(try groupMembers(store), ["b-2", "b-3"])
        // The source extension follows the last change.
        let g = try XCTUnwrap(try store.resources(domain: "acme-de").first { $0["displayName"]?.stringValue == "G" })
        XCTAssertEqual(g[BrokerStore.sourceExtension]?["seq"]?.numberValue?.integer, 6)

        // A delta for a group the broker does not hold, or naming a user,
        // is refused for good (a dead letter at the agent), and the events
        // after it still apply.
        outcome = try apply(store, [members(7, "nope", added: ["u1"]), user(8, "u4"), members(9, "g1", added: ["u4"])])
        XCTAssertEqual(outcome.ackedThrough, 9)
        XCTAssertTrue(outcome.rejected[7]?.contains("does not hold") ?? false, "\(outcome.rejected)")
        // (a refused event takes no new id: u4 gets the batch's first, b-7)
        XCTAssertEqual(try groupMembers(store), ["b-2", "b-3", "b-7"])
        outcome = try apply(store, [members(10, "u1", added: ["u2"])])
        XCTAssertNotNil(outcome.rejected[10])

        // Protocol 3: the attributes alone keep the members; for a group the
        // broker does not hold, they are refused (the agent then sends it whole).
        func attributes(_ seq: UInt64, _ group: String, _ name: String) -> RelayEvent {
            event(
                seq, "urn:ietf:params:SCIM:event:prov:patch:full",
                [
                    "ref": .string("/Groups/\(group)"), "membersUnchanged": true,
                    "data": [
                        "schemas": ["urn:ietf:params:scim:schemas:core:2.0:Group"], "id": .string(group), "displayName": .string(name),
                    ],
                ])
        }
        outcome = try apply(store, [attributes(11, "g1", "G"), attributes(12, "nope", "N")])
        XCTAssertEqual(outcome.applied, 1)
        XCTAssertTrue(outcome.rejected[12]?.contains("does not hold") ?? false, "\(outcome.rejected)")
        XCTAssertEqual(try groupMembers(store), ["b-2", "b-3", "b-7"], "members kept")
    }

    /// Removing a group leaves its members in the index for a sweep, a
    /// chunk per transaction: the apply is O(1) whatever the group's size;
    /// meanwhile no reader sees the removed group (a member's groups, a
    /// `members.value eq` filter), and the sweep then empties the index.
    func testARemovedGroupsMembersAreSweptAChunkAtATime() throws {
        let dir = TempDirectory("broker-sweep")
        defer { dir.remove() }
        let store = try BrokerStore(path: dir.file("broker"))
        func group(_ seq: UInt64, _ id: String, _ name: String, _ members: [String]) -> RelayEvent {
            event(
                seq, "urn:ietf:params:SCIM:event:prov:create:full",
                [
                    "ref": .string("/Groups/\(id)"),
                    "data": [
                        "schemas": ["urn:ietf:params:scim:schemas:core:2.0:Group"], "id": .string(id), "displayName": .string(name),
                        "members": .array(members.map { ["value": .string($0)] }),
                    ],
                ])
        }
        let users = (1...5).map { user(UInt64($0), "u\($0)") }
        XCTAssertEqual(
            try apply(store, users + [group(6, "g1", "G", ["u1", "u2", "u3", "u4", "u5"]), group(7, "h1", "H", ["u1"])]).applied, 7)
        XCTAssertEqual(try apply(store, [event(8, "urn:ietf:params:SCIM:event:prov:delete", ["ref": "/Groups/g1"])]).applied, 1)
        XCTAssertEqual(try store.groupsBeingSwept(), 1)
        let groups = brokerRegistry.resourceType("Group")!
        func memberOf(_ id: String) throws -> [String] {
            let query = try ListQuery(
                parameters: ["filter": #"members.value eq "\#(id)""#, "attributes": "displayName"], registry: brokerRegistry, type: groups)
            return try store.list(groups, query, scanBudget: 1000, members: false).items.compactMap { $0["displayName"]?.stringValue }
        }
        XCTAssertEqual(try memberOf("b-1"), ["H"], "the removed group is no one's group while it is swept")
        XCTAssertEqual(try memberOf("b-2"), [])
        var passes = 0
        while try store.sweepRemovedGroups(limit: 2) > 0 { passes += 1 }
        XCTAssertEqual(passes, 3, "5 members, 2 a transaction")
        XCTAssertEqual(try store.groupsBeingSwept(), 0)
        XCTAssertEqual(try memberOf("b-1"), ["H"])
        // A user deleted now leaves only the groups there are.
        XCTAssertEqual(try apply(store, [event(9, "urn:ietf:params:SCIM:event:prov:delete", ["ref": "/Users/u1"])]).applied, 1)
        XCTAssertEqual(try groupMembersOf(store, "H"), [])
    }

    func groupMembersOf(_ store: BrokerStore, _ name: String) throws -> [String] {
        let group = try XCTUnwrap(try store.resources(domain: "acme-de").first { $0["displayName"]?.stringValue == name })
        return (group["members"]?.arrayValue ?? []).compactMap { $0["value"]?.stringValue }.sorted()
    }

    /// The stored group holds no members (they are an index); a deleted
    /// user leaves the index; a store written with members inline (layout 1)
    /// is migrated when it is opened and reads back the same.
    func testMembersAreAnIndexAndAnInlineStoreIsMigrated() throws {
        let dir = TempDirectory("broker-members")
        defer { dir.remove() }
        do {
            let store = try BrokerStore(path: dir.file("broker"))
            let group = event(
                3, "urn:ietf:params:SCIM:event:prov:create:full",
                [
                    "ref": "/Groups/g1",
                    "data": [
                        "schemas": ["urn:ietf:params:scim:schemas:core:2.0:Group"], "id": "g1", "displayName": "G",
                        "members": [["value": "u1"], ["value": "u2"]],
                    ],
                ])
            _ = try apply(store, [user(1, "u1"), user(2, "u2"), group])
            let resources = try store.environment.openDatabase("resources")
            let raw = try store.environment.read { txn in try txn.get(resources, Array("acme-de/Group/g1".utf8)) }
            let stored = try JSONParser.parse(try XCTUnwrap(raw))
            XCTAssertNil(stored["members"], "the stored group holds no members")
            XCTAssertLessThan(raw!.count, 1024)
            XCTAssertEqual(try groupMembers(store), ["b-1", "b-2"])
            // u1 deleted at the broker: it leaves the group.
            _ = try apply(store, [event(4, "urn:ietf:params:SCIM:event:prov:delete", ["ref": "/Users/u1"])])
            XCTAssertEqual(try groupMembers(store), ["b-2"])
        }
        // Layout 1: a group with its members inline, as older brokers wrote it.
        let old = dir.file("old")
        do {
            let env = try Environment(EnvironmentOptions(path: old))
            let resources = try env.openDatabase("resources"), ids = try env.openDatabase("brokerIds")
            try env.write { txn in
                for (key, doc) in [
                    ("acme-de/User/u1", #"{"id":"b1","userName":"u1"}"#),
                    ("acme-de/Group/g1", #"{"id":"bg","displayName":"G","members":[{"value":"b1","display":"u1"}]}"#),
                ] {
                    try txn.put(resources, Array(key.utf8), Array(doc.utf8))
                    try txn.put(ids, Array((key.hasSuffix("u1") ? "b1" : "bg").utf8), Array(key.utf8))
                }
            }
        }
        let migrated = try BrokerStore(path: old)
        let g = try XCTUnwrap(try migrated.resources(domain: "acme-de").first { $0["displayName"]?.stringValue == "G" })
        XCTAssertEqual(g["members"]?.arrayValue?.compactMap { $0["value"]?.stringValue }, ["b1"])
        XCTAssertEqual(g["members"]?.arrayValue?.first?["display"]?.stringValue, "u1")
        let resources = try migrated.environment.openDatabase("resources")
        let raw = try migrated.environment.read { txn in try txn.get(resources, Array("acme-de/Group/g1".utf8)) }
        XCTAssertNil(try JSONParser.parse(try XCTUnwrap(raw))["members"], "moved to the index")
        XCTAssertEqual(try migrated.resource(brokerID: "bg")?.resource["members"]?.arrayValue?.count, 1)
    }
}
