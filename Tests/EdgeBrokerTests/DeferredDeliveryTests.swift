import EdgeStore
import EdgeTestSupport
import SCIM
import XCTest

@testable import EdgeBroker
@testable import EdgeDelivery

/// A target's group index across rare transitions, at the broker, against
/// a real LMDB file: a group back in a target's routes has its members
/// compared a chunk per transaction after the apply (not all marked in it),
/// and a group new at a downlink destination is sent as its first members,
/// then grown a chunk a poll (not one event of every member), also when it
/// comes back while the index of its last time there is being forgotten.
final class DeferredDeliveryTests: XCTestCase {
    let agent = AgentKey(identity: "spiffe://t/acme-de/agent-1", epoch: "e1")
    var seq: UInt64 = 0

    func event(_ uri: String, _ body: JSONObject) -> RelayEvent {
        seq += 1
        return RelayEvent(seq: seq, body: ["seq": .number(JSONNumber(integer: Int64(seq))), "events": .object([uri: .object(body)])])
    }

    func apply(_ store: BrokerStore, _ events: [RelayEvent]) throws {
        let outcome = try store.environment.write { txn in
            try store.apply(domain: "acme-de", agent: agent, events: events, newIDs: events.map { "b-\($0.seq)" }, in: txn)
        }
        XCTAssertEqual(outcome.rejected, [:])
    }

    /// `n` users (broker ids `b-1`…`b-n`) and group `g1` holding them (`b-<n+1>`).
    func fill(_ store: BrokerStore, _ n: Int, name: String) throws -> (users: [String], group: String) {
        for start in stride(from: 0, to: n, by: 1000) {
            try apply(
                store,
                (start..<min(n, start + 1000)).map { i in
                    event(
                        "urn:ietf:params:SCIM:event:prov:create:full",
                        [
                            "ref": .string("/Users/u\(i)"),
                            "data": ["schemas": ["urn:ietf:params:scim:schemas:core:2.0:User"], "userName": .string("u\(i)")],
                        ])
                })
        }
        try apply(
            store,
            [
                event(
                    "urn:ietf:params:SCIM:event:prov:create:full",
                    [
                        "ref": "/Groups/g1",
                        "data": [
                            "schemas": ["urn:ietf:params:scim:schemas:core:2.0:Group"], "displayName": .string(name),
                            "members": .array((0..<n).map { ["value": .string("u\($0)")] }),
                        ],
                    ])
            ])
        return ((1...n).map { "b-\($0)" }, "b-\(n + 1)")
    }

    func rename(_ store: BrokerStore, _ name: String) throws {
        try apply(
            store,
            [
                event(
                    BrokerStore.attributesEvent,
                    [
                        "ref": "/Groups/g1",
                        "data": ["schemas": ["urn:ietf:params:scim:schemas:core:2.0:Group"], "displayName": .string(name)],
                    ])
            ])
    }

    func count(_ store: BrokerStore, _ db: Database, _ target: String, _ group: String) throws -> Int {
        try store.environment.read { txn in
            var k = 0
            try txn.scanKeys(db, from: BrokerStore.targetGroupPrefix(target, group), to: BrokerStore.targetGroupEnd(target, group)) { _ in
                k += 1
                return true
            }
            return k
        }
    }

    /// (c) A group back in a target's routes with its old mapping and index
    /// there: the apply records that its members are to be compared (O(1);
    /// it marked all 3,000 before), then each chunk marks up to 1,000 of
    /// them with a queue item of its own, until every member of the
    /// directory's group and every one the target holds is marked.
    func testAGroupBackInATargetsRoutesIsComparedAChunkATransactionAfterTheApply() throws {
        let dir = TempDirectory("deferred-rescan")
        defer { dir.remove() }
        var app = try TargetConfiguration(name: "app", url: "http://127.0.0.1:9/scim/v2")
        app.routes = [try Route(types: ["User"]), try Route(types: ["Group"], filter: #"displayName sw "A""#)]
        let store = try BrokerStore(path: dir.file("broker"), targets: [app])
        let n = 3000
        let (users, gid) = try fill(store, n, name: "A team")
        // What the target holds, as its deliveries would have recorded it, with one member more than the directory's group.
        try store.environment.write { txn in
            for u in users + ["b-gone"] {
                try store.setMapping(target: "app", type: "User", brokerID: u, TargetMapping(targetID: "t-" + u, etag: nil, sent: nil), txn)
                _ = try store.holdMember(target: "app", group: gid, member: u, targetID: "t-" + u, txn)
            }
            try store.setMapping(
                target: "app", type: "Group", brokerID: gid, TargetMapping(targetID: "t-g", etag: nil, sent: [:], members: n + 1), txn)
            _ = try txn.deleteRange(
                store.targetPending, from: BrokerStore.targetGroupPrefix("app", gid), to: BrokerStore.targetGroupEnd("app", gid),
                limit: .max)
        }
        try rename(store, "B team")  // out of the routes: its removal is queued, its mapping still there
        let queued = try store.queueDepth(target: "app").count
        store.environment.resetHeaviestCommit()
        try rename(store, "A team")  // back in
        XCTAssertLessThan(store.environment.heaviestCommitEntries, 100, "the apply is O(1) whatever the group's size")
        XCTAssertEqual(try count(store, store.targetPending, "app", gid), 0, "nothing marked in the apply")
        XCTAssertTrue(try store.deliveryWorkPending())
        var steps = 0
        while try store.deferredWorkPending() {
            store.environment.resetHeaviestCommit()
            let p = try store.environment.write { txn in try store.deferredStep(limit: deferredChunk, txn) }
            XCTAssertLessThanOrEqual(store.environment.heaviestCommitEntries, deferredChunk + 10)
            XCTAssertLessThanOrEqual(p.delivery.marked, deferredChunk)
            steps += 1
        }
        XCTAssertEqual(try count(store, store.targetPending, "app", gid), n + 1, "every member, and the one only the target holds")
        XCTAssertEqual(steps, 8, "3 chunks of the directory's group (the third full), 1 empty, 4 of what the target holds")
        XCTAssertEqual(try store.queueDepth(target: "app").count, queued + 1 + 7, "the apply's item, and one per chunk that marked")
    }

    /// A poll materialises only what its page lacks (its transaction stays
    /// short); the rest is materialised ahead after the answer, a page at a
    /// time within the window, so the next poll finds its page ready and
    /// only acknowledges and reads. Every user arrives once, in order.
    func testAPollMaterialisesWhatItsPageLacksAndTheNextPageIsMadeAhead() throws {
        let dir = TempDirectory("downlink-ahead")
        defer { dir.remove() }
        var dest = try TargetConfiguration(name: "sub", url: "http://127.0.0.1:9/scim/v2")
        dest.destination = "acme-us"
        dest.routes = [try Route(types: ["User"])]
        let store = try BrokerStore(path: dir.file("broker"), targets: [dest])
        _ = try fill(store, 1000, name: "A team")  // 1,000 users (the group is not routed)
        func poll(ack: UInt64, after: UInt64? = nil) throws -> BrokerStore.FeedPage {
            try store.environment.write { txn in
                try store.pollFeed(target: dest, epoch: "s1", ack: ack, after: after, limit: 100, window: 250, speaks: 5, txn)
            }
        }
        func ahead() throws -> Bool {
            try store.environment.write { txn in try store.materializeAhead(target: dest, limit: 100, window: 250, speaks: 5, txn).made }
        }
        let first = try poll(ack: 0)
        XCTAssertEqual(first.events.count, 100)
        XCTAssertEqual(first.position.issued, 100, "only the page's events, not the window's")
        XCTAssertTrue(first.queued && first.more)
        XCTAssertTrue(try ahead())
        XCTAssertEqual(try store.feedPosition(target: "sub").issued, 200, "a page ahead")
        XCTAssertTrue(try ahead())
        XCTAssertEqual(try store.feedPosition(target: "sub").issued, 250, "never past the window of unacknowledged events")
        XCTAssertFalse(try ahead(), "the window is full: nothing more until an acknowledgement")
        // The next poll (pipelined: after what it received) finds its page ready and materialises nothing.
        let second = try poll(ack: 0, after: 100)
        XCTAssertEqual(second.position.issued, 250)
        XCTAssertEqual(second.events.count, 100)
        var seqs = (first.events + second.events).map { try? JSONParser.parse($0, limits: .stored)["seq"]?.numberValue?.integer }
        var ack: UInt64 = 200
        for _ in 0..<100 {
            let page = try poll(ack: ack)
            seqs += page.events.map { try? JSONParser.parse($0, limits: .stored)["seq"]?.numberValue?.integer }
            XCTAssertLessThanOrEqual(page.position.unacked, 250)
            if let last = seqs.last, let l = last { ack = UInt64(l) }
            if page.queued { _ = try ahead() }
            if !page.more && page.events.isEmpty { break }
        }
        XCTAssertEqual(seqs.compactMap { $0 }, (1...1000).map(Int64.init), "every user once, in feed order")
        XCTAssertEqual(try store.queueDepth(target: "sub").count, 0)
    }

    /// Polls the feed of `target` until nothing is left; returns each poll's
    /// events (parsed) and the heaviest poll commit.
    func drain(_ store: BrokerStore, _ target: TargetConfiguration, ack: inout UInt64, speaks: Int = 1) throws -> (
        events: [JSON], heaviest: Int
    ) {
        var out: [JSON] = []
        var heaviest = 0
        for _ in 0..<10_000 {
            store.environment.resetHeaviestCommit()
            let acked = ack
            let page = try store.environment.write { txn in
                try store.pollFeed(target: target, epoch: "s1", ack: acked, limit: 100, window: 100, speaks: speaks, txn)
            }
            heaviest = max(heaviest, store.environment.heaviestCommitEntries)
            for e in page.events { out.append(try JSONParser.parse(e, limits: .stored)) }
            ack = page.position.issued
            if page.events.isEmpty && !page.more { return (out, heaviest) }
        }
        XCTFail("the feed never drained")
        return (out, heaviest)
    }

    /// (d) A group of 10,000 members new at a downlink destination: created
    /// with its first members (at most `maxMembersPerPatch`), the rest as
    /// members events of that many, about 1,000 members a poll; before,
    /// one event carried all 10,000 and one poll held them all. Taken out
    /// of the destination's routes and back at once, while the index of
    /// its first time there is still being forgotten, it is sent again
    /// whole, never mistaking the old index for the new.
    func testAGroupNewAtADestinationIsGrownAChunkAPoll() throws {
        let dir = TempDirectory("deferred-downlink")
        defer { dir.remove() }
        var dest = try TargetConfiguration(name: "sub", url: "http://127.0.0.1:9/scim/v2")
        dest.destination = "acme-us"
        dest.routes = [try Route(types: ["User"]), try Route(types: ["Group"], filter: #"displayName sw "A""#)]
        let store = try BrokerStore(path: dir.file("broker"), targets: [dest])
        let n = 10_000
        let (_, gid) = try fill(store, n, name: "A team")
        var ack: UInt64 = 0
        func groupMembers(_ events: [JSON]) -> (perEvent: [Int], added: [String], creates: Int, deletes: Int) {
            var perEvent: [Int] = [], added: [String] = [], creates = 0, deletes = 0
            for e in events {
                guard let (uri, body) = e["events"]?.objectValue?.members.first, body["ref"]?.stringValue == "/Groups/\(gid)" else {
                    continue
                }
                let members = (body["data"]?["members"] ?? body["added"])?.arrayValue ?? []
                perEvent.append(members.count)
                added += members.compactMap { $0["value"]?.stringValue }
                if uri == BrokerStore.DownlinkURI.createFull { creates += 1 }
                if uri == BrokerStore.DownlinkURI.delete { deletes += 1 }
            }
            return (perEvent, added, creates, deletes)
        }
        let first = try drain(store, dest, ack: &ack)
        var seen = groupMembers(first.events)
        XCTAssertEqual(seen.creates, 1)
        XCTAssertLessThanOrEqual(seen.perEvent.max() ?? 0, dest.maxMembersPerPatch, "no event carries more than maxMembersPerPatch members")
        XCTAssertEqual(Set(seen.added).count, n, "every member reached the destination")
        XCTAssertEqual(seen.added.count, n, "each once")
        XCTAssertLessThan(first.heaviest, 4 * deferredChunk, "no poll grows with the group")
        XCTAssertEqual(try count(store, store.targetMembers, "sub", gid), n)

        // Out of the routes and back while its old index is still being forgotten.
        try rename(store, "B team")
        let out = try drain(store, dest, ack: &ack)
        XCTAssertEqual(groupMembers(out.events).deletes, 1)
        XCTAssertTrue(try store.groupIndexSweepPending(target: "sub", group: gid))
        try rename(store, "A team")
        let back = try drain(store, dest, ack: &ack)
        XCTAssertFalse(try store.groupIndexSweepPending(target: "sub", group: gid), "the old index went first")
        seen = groupMembers(back.events)
        XCTAssertEqual(seen.creates, 1)
        XCTAssertEqual(Set(seen.added).count, n, "the whole group again: no member taken for held by the old index")
        XCTAssertEqual(seen.added.count, n)
        XCTAssertLessThan(back.heaviest, 4 * deferredChunk)
        XCTAssertEqual(try count(store, store.targetMembers, "sub", gid), n)
        XCTAssertEqual(try count(store, store.targetPending, "sub", gid), 0)
    }

    /// (e) A rename of a group of 3,000 members held at a destination whose
    /// agent speaks downlink protocol 4 is one attributes event of a few
    /// hundred bytes, no member in it, and a poll of a few entries (before,
    /// full state with all 3,000 and as many reads). An agent that does not
    /// say 3 gets full state, also for an attributes event materialised
    /// before it was downgraded; one the agent refused (it does not hold
    /// the group) is followed by the group whole.
    func testARenameAtADestinationThatSpeaks3IsItsAttributesAlone() throws {
        let dir = TempDirectory("deferred-rename")
        defer { dir.remove() }
        var dest = try TargetConfiguration(name: "sub", url: "http://127.0.0.1:9/scim/v2")
        dest.destination = "acme-us"
        dest.routes = [try Route(types: ["User"]), try Route(types: ["Group"])]
        let store = try BrokerStore(path: dir.file("broker"), targets: [dest])
        let n = 3_000
        let (_, gid) = try fill(store, n, name: "A team")
        var ack: UInt64 = 0
        func mine(_ events: [JSON]) -> [(uri: String, body: JSON, bytes: Int)] {
            events.compactMap { e in
                guard let (uri, body) = e["events"]?.objectValue?.members.first, body["ref"]?.stringValue == "/Groups/\(gid)" else {
                    return nil
                }
                return (uri, body, e.serialized().count)
            }
        }
        _ = try drain(store, dest, ack: &ack, speaks: 4)
        XCTAssertEqual(try count(store, store.targetMembers, "sub", gid), n)

        try rename(store, "A team, renamed")
        let renamed = try drain(store, dest, ack: &ack, speaks: 4)
        var seen = mine(renamed.events)
        XCTAssertEqual(seen.map(\.uri), [BrokerStore.attributesEvent], "one attributes event")
        XCTAssertEqual(seen.first?.body["data"]?["displayName"], "A team, renamed")
        XCTAssertNil(seen.first?.body["data"]?["members"], "no member travels")
        XCTAssertLessThan(seen.first?.bytes ?? .max, 1024)
        XCTAssertLessThan(renamed.heaviest, 50, "the poll does not read the group's members")
        XCTAssertEqual(try count(store, store.targetMembers, "sub", gid), n)

        // An older agent (it says no protocol): full state with the members the destination holds.
        try rename(store, "A team, again")
        seen = mine(try drain(store, dest, ack: &ack).events)
        XCTAssertEqual(seen.map(\.uri), [BrokerStore.DownlinkURI.putFull])
        XCTAssertEqual(seen.first?.body["data"]?["members"]?.arrayValue?.count, n)

        // Materialised for protocol 4, then asked for by an agent downgraded before it acknowledged it.
        try rename(store, "A team, 3")
        let acked = ack
        let page3 = try store.environment.write { txn in
            try store.pollFeed(target: dest, epoch: "s1", ack: acked, limit: 100, window: 100, speaks: 4, txn)
        }
        XCTAssertEqual(mine(try page3.events.map { try JSONParser.parse($0, limits: .stored) }).map(\.uri), [BrokerStore.attributesEvent])
        seen = mine(try drain(store, dest, ack: &ack).events)
        XCTAssertEqual(seen.map(\.uri), [BrokerStore.DownlinkURI.putFull], "answered whole to the older agent")
        XCTAssertEqual(seen.first?.body["data"]?["displayName"], "A team, 3")
        XCTAssertEqual(seen.first?.body["data"]?["members"]?.arrayValue?.count, n)
        XCTAssertNil(
            try store.environment.read { txn in try txn.get(store.targetState, Array("dlattr/sub".utf8)) }, "gone once acknowledged")

        // The agent refused the attributes event (it does not hold the group): the group whole follows.
        try rename(store, "A team, 4")
        let before = ack
        let page = try store.environment.write { txn in
            try store.pollFeed(target: dest, epoch: "s1", ack: before, limit: 100, window: 100, speaks: 4, txn)
        }
        XCTAssertEqual(page.events.count, 1)
        let refusedSeq = page.position.issued
        let outcomes = try BrokerStore.FeedOutcomes(
            [
                "from": .int(Int(refusedSeq)), "through": .int(Int(refusedSeq)), "committed": 1,
                "refused": .object(JSONObject([(String(refusedSeq), "noTarget")])),
            ], ack: refusedSeq)
        let after = try store.environment.write { txn in
            try store.pollFeed(target: dest, epoch: "s1", ack: refusedSeq, limit: 100, window: 100, outcomes: outcomes, speaks: 4, txn)
        }
        seen = mine(try after.events.map { try JSONParser.parse($0, limits: .stored) })
        XCTAssertEqual(seen.map(\.uri), [BrokerStore.DownlinkURI.putFull], "sent whole after the refusal")
        XCTAssertEqual(seen.first?.body["data"]?["members"]?.arrayValue?.count, n)
    }
}
