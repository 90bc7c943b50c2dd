import EdgeHTTP
import EdgeLoop
import EdgeStore
import EdgeTestSupport
import Foundation
import SCIM
import XCTest

@testable import EdgeBroker
@testable import EdgeDelivery

/// Reconcile of a large group against a SCIM target over a real socket
/// (a small fake target served by the test), with the broker's store in a
/// real LMDB file: the target's members are streamed into the run's
/// scratch file, never held whole, and the repair queued is exactly the
/// members missing and the broker's members extra.
final class ReconcileMembersTests: XCTestCase {
    var dir: TempDirectory!
    override func setUp() {
        dir = TempDirectory("broker-reconcile-members")
        // The fake target writes on after a client that gave up hung up (as the programs do, the test ignores SIGPIPE).
        signal(SIGPIPE, SIG_IGN)
    }
    override func tearDown() { dir.remove() }

    static let members = 20_000
    /// Users beyond the group's members: broker users the target holds in the group as extras.
    static let others = 10

    /// What the fake target holds: accounts (serialised), the group's account and the member values it lists.
    struct Held: Sendable {
        var users: [[UInt8]] = []
        var group: [UInt8] = []
        var memberValues: [String] = []
        var listMembers = true
    }

    func fakeTarget(_ held: Locked<Held>) throws -> ServerHarness {
        try ServerHarness { request, _, responder in
            let h = held.current
            let query = String(request.query ?? "")
            func param(_ name: String) -> Int? {
                query.split(separator: "&").first { $0.hasPrefix(name + "=") }.flatMap { Int($0.dropFirst(name.count + 1)) }
            }
            func page(_ items: [[UInt8]]) -> HTTPResponse {
                let start = param("startIndex") ?? 1, count = param("count") ?? 100
                let slice = items.dropFirst(start - 1).prefix(count)
                var body = Array(
                    #"{"schemas":["urn:ietf:params:scim:api:messages:2.0:ListResponse"],"totalResults":\#(items.count),"Resources":["#.utf8)
                for (k, item) in slice.enumerated() {
                    if k > 0 { body.append(UInt8(ascii: ",")) }
                    body += item
                }
                body += Array("]}".utf8)
                return HTTPResponse(status: 200, headers: ["Content-Type": "application/scim+json"], body: body)
            }
            switch request.path {
            case "/scim/v2/Users": responder.respond(page(h.users))
            case "/scim/v2/Groups":
                XCTAssertTrue(query.contains("excludedAttributes=members"), query)
                responder.respond(page([h.group]))
            case "/scim/v2/Groups/tg":
                // The group as a target answers it: its attributes, then every member, streamed (chunked).
                var r = HTTPResponse(status: 200, headers: ["Content-Type": "application/scim+json"])
                var prefix = Array(h.group.dropLast())
                if h.listMembers { prefix += Array(#","members":["#.utf8) }
                var next = 0
                var sentPrefix = false, ended = false
                r.stream = BodyStream {
                    if !sentPrefix {
                        sentPrefix = true
                        return prefix
                    }
                    guard h.listMembers, next < h.memberValues.count else {
                        if ended { return nil }
                        ended = true
                        return Array(
                            (h.listMembers ? #"],"meta":{"resourceType":"Group","members":[{"value":"nested, not a member"}]}}"# : "}").utf8
                        )
                    }
                    var piece: [UInt8] = []
                    for k in next..<min(next + 500, h.memberValues.count) {
                        let v = h.memberValues[k]
                        if k > 0 { piece.append(UInt8(ascii: ",")) }
                        piece += Array(
                            #"{"value":"\#(v)","type":"User","$ref":"http://127.0.0.1/scim/v2/Users/\#(v)","display":"member \#(v)"}"#.utf8)
                    }
                    next += 500
                    return piece
                }
                responder.respond(r)
            default:
                responder.respond(HTTPResponse(status: 404, contentType: "application/scim+json", body: #"{"status":"404"}"#))
            }
        }
    }

    /// The fake target as target "app", every resource routed to it.
    func appTarget(_ server: ServerHarness) throws -> TargetConfiguration {
        var target = try TargetConfiguration(name: "app", url: "http://127.0.0.1:\(server.port)/scim/v2")
        target.routes = [try Route()]
        return target
    }

    /// A user's account at the fake target.
    static func account(_ brokerID: String) -> String { "t-" + brokerID.dropFirst(2) }

    /// The directory in an LMDB file at `path`: users 0..<`users` and a
    /// group "all" (broker id g-all) of users 0..<`members`, as delivered to
    /// `target`: every user's mapping names account t-<k>, which the fake
    /// target lists; the group's names tg, with its members in the index
    /// when `indexed`. Read a chunk at a time (the store may be large).
    func deliveredDirectory(
        path: String, users: Int, members: Int, to target: TargetConfiguration, _ held: Locked<Held>, indexed: Bool
    ) throws -> BrokerStore {
        let store = try BrokerStore(path: path)
        var fixture = ListFixture()
        var k = 0
        while k < users {
            let batch = k..<min(k + 1000, users)
            try fixture.apply(store, batch.map { fixture.user($0) }, ids: batch.map(ListFixture.brokerID))
            k = batch.upperBound
        }
        try fixture.apply(store, [fixture.group(0, members: Array(0..<members), displayName: "all")], ids: ["g-all"])
        var accounts: [[UInt8]] = []
        var cursor: [UInt8]?
        while true {
            var chunk: [JSONObject] = []
            var last: [UInt8]?
            try store.environment.read { txn in
                try store.forEachDirectoryEntry("User", members: false, from: cursor, txn) { position, entry in
                    chunk.append(entry.resource)
                    last = position
                    return chunk.count < 5000
                }
            }
            try store.environment.write { txn in
                for r in chunk {
                    let id = try XCTUnwrap(r["id"]?.stringValue)
                    var body = targetBody(r, type: "User", brokerID: id, target: target)
                    body["id"] = .string(Self.account(id))
                    accounts.append(JSON.object(body).serialized())
                    try store.setMapping(
                        target: "app", type: "User", brokerID: id, TargetMapping(targetID: Self.account(id), etag: nil, sent: nil), txn)
                }
            }
            guard chunk.count == 5000, let last else { break }
            cursor = last + [0]
        }
        XCTAssertEqual(accounts.count, users)
        let group = try XCTUnwrap(try store.environment.read { txn in try store.deliveryEntry("g-all", members: false, txn) })
        var body = targetBody(group.resource, type: "Group", brokerID: "g-all", target: target)
        body["members"] = nil
        body["id"] = "tg"
        try store.environment.write { txn in
            try store.setMapping(
                target: "app", type: "Group", brokerID: "g-all",
                TargetMapping(targetID: "tg", etag: nil, sent: nil, members: indexed ? members : nil), txn)
            guard indexed else { return }
            for m in 0..<members {
                let id = ListFixture.brokerID(m)
                _ = try store.holdMember(target: "app", group: "g-all", member: id, targetID: Self.account(id), txn)
            }
        }
        held.withLock {
            $0.users = accounts
            $0.group = JSON.object(body).serialized()
        }
        return store
    }

    func testALargeGroupsMembersAreStreamedAndTheRepairIsExact() throws {
        let held = Locked(Held())
        let server = try fakeTarget(held)
        defer { _ = server.stop() }
        let target = try appTarget(server)
        // The directory: users 0..<20,010, a group "all" of users 0..<20,000, all delivered there.
        let users = Self.members + Self.others
        let store = try deliveredDirectory(path: dir.file("broker"), users: users, members: Self.members, to: target, held, indexed: true)

        // At the target, behind the broker's back: 20 members gone, the 10 other users and 3 accounts of its own added.
        let gone = Set((0..<Self.members).filter { $0 % 1000 == 5 }.map(ListFixture.brokerID))
        let extra = (Self.members..<users).map(ListFixture.brokerID)
        var values = (0..<Self.members).map(ListFixture.brokerID).filter { !gone.contains($0) }.map(Self.account)
        values += extra.map(Self.account) + ["own-1", "own-2", "own-3"]
        var random = SplitMix(seed: 7)
        values.shuffle(using: &random)
        held.withLock { $0.memberValues = values }

        // The client may hold far less than the group's body: the whole-body GET of it would be refused.
        var options = HTTPClientOptions()
        options.maxResponseBodyBytes = 128 * 1024
        let body = values.count * 90
        XCTAssertGreaterThan(body, 10 * options.maxResponseBodyBytes, "the group's body is over ten times the client's limit")

        let dry = try reconcile(store: store, target: target, apply: false, pageSize: 100, client: options)
        XCTAssertEqual(dry.missing, [])
        XCTAssertEqual(dry.strays.count, 0)
        XCTAssertEqual(dry.drifted.map { $0.brokerID }, ["g-all"], "\(dry.drifted)")
        XCTAssertEqual(dry.drifted.first?.attributes, ["members"])

        let fixed = try reconcile(store: store, target: target, apply: true, pageSize: 100, client: options)
        XCTAssertEqual(fixed.queued, 1)
        // The repair: exactly the missing and the broker's extra members are pending (the target's own are left alone) …
        let pending = try store.environment.read { txn in
            var out: [String] = []
            let prefix = BrokerStore.targetGroupPrefix("app", "g-all")
            try txn.scanKeys(store.targetPending, from: prefix, to: BrokerStore.targetGroupEnd("app", "g-all")) { key in
                out.append(String(decoding: key[prefix.count...], as: UTF8.self))
                return true
            }
            return out
        }
        XCTAssertEqual(Set(pending), gone.union(extra))
        XCTAssertEqual(pending.count, gone.count + extra.count)
        // … the index says what the target holds, and one item is queued for the group.
        let indexed = try store.heldMembers(target: "app", group: "g-all").compactMap { $0["value"]?.stringValue }
        XCTAssertEqual(indexed.count, Self.members - gone.count + extra.count)
        XCTAssertEqual(try store.mappings(target: "app")["g-all"]?.members, Self.members - gone.count + extra.count)
        XCTAssertEqual(try store.queueDepth(target: "app").count, 1)

        // A target that leaves `members` out of the group's GET says nothing of them: no drift.
        held.withLock { $0.listMembers = false }
        let silent = try reconcile(store: store, target: target, apply: false, pageSize: 100, client: options)
        XCTAssertEqual(silent.drifted.count, 0, "\(silent.drifted)")
    }

    /// A target that lost 5,000 of a group's 6,000 members: the repair is
    /// queued in transactions of at most 1,000 members each (their own
    /// commits), exactly those members, and a rerun (as after a run killed
    /// in the middle) changes nothing it already did.
    func testAGroupsMissingMembersAreRepairedInBoundedTransactions() throws {
        let held = Locked(Held())
        let server = try fakeTarget(held)
        defer { _ = server.stop() }
        let target = try appTarget(server)
        let n = 6_000
        let store = try deliveredDirectory(path: dir.file("broker"), users: n, members: n, to: target, held, indexed: true)
        let gone = Set((0..<5_000).map(ListFixture.brokerID))
        held.withLock { $0.memberValues = (5_000..<n).map { Self.account(ListFixture.brokerID($0)) } }

        let dry = try reconcile(store: store, target: target, apply: false, pageSize: 500)
        XCTAssertEqual(dry.membersMissing, 5_000)
        XCTAssertEqual(dry.membersExtra, 0)
        XCTAssertEqual(dry.queued, 0)

        store.environment.resetHeaviestCommit()
        let fixed = try reconcile(store: store, target: target, apply: true, pageSize: 500)
        // Each missing member is 3 entries (its index entry and reverse entry deleted, its mark put):
        // one transaction for all would write 15,000.
        let heaviest = store.environment.heaviestCommitEntries
        XCTAssertGreaterThan(heaviest, 0)
        XCTAssertLessThanOrEqual(heaviest, 3 * 1_000 + 10, "a repair transaction holds at most 1,000 members")
        XCTAssertEqual(fixed.membersMissing, 5_000)
        XCTAssertEqual(fixed.drifted.map(\.brokerID), ["g-all"])
        XCTAssertEqual(fixed.queued, 5, "one queue item a chunk")
        XCTAssertEqual(try store.queueDepth(target: "app").count, 5)

        func pending() throws -> Set<String> {
            try store.environment.read { txn in
                var out: Set<String> = []
                let prefix = BrokerStore.targetGroupPrefix("app", "g-all")
                try txn.scanKeys(store.targetPending, from: prefix, to: BrokerStore.targetGroupEnd("app", "g-all")) { key in
                    out.insert(String(decoding: key[prefix.count...], as: UTF8.self))
                    return true
                }
                return out
            }
        }
        XCTAssertEqual(try pending(), gone)
        XCTAssertEqual(try store.heldMembers(target: "app", group: "g-all").count, n - 5_000)
        XCTAssertEqual(try store.mappings(target: "app")["g-all"]?.members, n - 5_000)

        // Run again (the target unchanged, as when a run was killed before its end): the same repair, counted once.
        let again = try reconcile(store: store, target: target, apply: true, pageSize: 500)
        XCTAssertEqual(again.membersMissing, 5_000)
        XCTAssertEqual(try pending(), gone)
        XCTAssertEqual(try store.mappings(target: "app")["g-all"]?.members, n - 5_000)
    }

    /// Accounts whose ids are too long for an LMDB key (kept in the scratch
    /// file and the owner table under their digest) are found, claimed and
    /// seen as members: not reported missing, not created again; one of the
    /// target's own is told apart.
    func testAccountsWithIdsLongerThanAKeyAreFound() throws {
        let held = Locked(Held())
        let server = try fakeTarget(held)
        defer { _ = server.stop() }
        let target = try appTarget(server)
        let store = try deliveredDirectory(path: dir.file("broker"), users: 4, members: 4, to: target, held, indexed: true)
        // Users 1 and 2 have accounts named by 450 and 600 bytes there (the target chose them).
        let long = [1: "L" + String(repeating: "x", count: 449), 2: "M" + String(repeating: "y", count: 599)]
        var users = held.current.users
        for (k, id) in long {
            var account = try XCTUnwrap(JSONParser.parse(users[k]).objectValue)
            account["id"] = .string(id)
            users[k] = JSON.object(account).serialized()
            let brokerID = ListFixture.brokerID(k)
            try store.environment.write { txn in
                try store.setMapping(
                    target: "app", type: "User", brokerID: brokerID, TargetMapping(targetID: id, etag: nil, sent: nil), txn)
                _ = try store.holdMember(target: "app", group: "g-all", member: brokerID, targetID: id, txn)
            }
        }
        // And an account of its own named by 600 bytes: not the broker's.
        users.append(JSON.object(["id": .string("F" + String(repeating: "z", count: 599)), "userName": "foreign"]).serialized())
        held.withLock {
            $0.users = users
            $0.memberValues = (0..<4).map { long[$0] ?? Self.account(ListFixture.brokerID($0)) }
        }
        let report = try reconcile(store: store, target: target, apply: true, pageSize: 2)
        XCTAssertEqual(report.missing, [])
        XCTAssertEqual(report.strays.count, 0, "\(report.strays)")
        XCTAssertEqual(report.drifted.count, 0, "\(report.drifted)")
        XCTAssertEqual(report.seen, 6)
        XCTAssertEqual(report.foreign, 1)
        XCTAssertEqual(report.queued, 0)
        XCTAssertEqual(try store.queueDepth(target: "app").count, 0, "nothing created again")
        XCTAssertEqual(try store.mappings(target: "app")[ListFixture.brokerID(2)]?.targetID, long[2])
    }

    /// Not a test: the peak anonymous memory of `scim-broker targets
    /// reconcile` (the process) at groups of the sizes in
    /// `RECONCILE_HEAP_SIZES` (e.g. "1000 200000"), each with as many users,
    /// one member missing at the target. Printed as `reconcile heap …`
    /// lines (docs/benchmarks.md); skipped unless the variable is set.
    func testReconcileHeapBySize() throws {
        guard let sizes = ProcessInfo.processInfo.environment["RECONCILE_HEAP_SIZES"] else {
            throw XCTSkip("set RECONCILE_HEAP_SIZES to measure")
        }
        for n in sizes.split(separator: " ").compactMap({ Int($0) }) {
            let held = Locked(Held())
            let server = try fakeTarget(held)
            defer { _ = server.stop() }
            let target = try appTarget(server)
            let path = dir.file("broker-\(n)")
            _ = try deliveredDirectory(path: path, users: n, members: n, to: target, held, indexed: true)
            held.withLock { $0.memberValues = (1..<n).map { Self.account(ListFixture.brokerID($0)) } }
            let started = Date()
            let child = try ChildProcess(
                productsDirectory + "/scim-broker",
                ["targets", "reconcile", "--data-dir", path, "--target", "app=http://127.0.0.1:\(server.port)/scim/v2", "app", "--json"])
            // Anonymous RSS (the heap; LMDB's pages are the file's), sampled every 50 ms.
            var peak = 0
            while child.process.isRunning {
                let status = (try? String(contentsOfFile: "/proc/\(child.process.processIdentifier)/status", encoding: .utf8)) ?? ""
                if let line = status.split(separator: "\n").first(where: { $0.hasPrefix("RssAnon:") }) {
                    peak = max(peak, Int(line.split(separator: " ").dropFirst().first ?? "") ?? 0)
                }
                usleep(50_000)
            }
            XCTAssertEqual(child.waitForExit(), 0)
            let report = try JSONParser.parse(Array(child.output.joined().utf8))
            XCTAssertEqual(report["drifted"]?.arrayValue?.count, 1, "\(report)")
            print(
                "reconcile heap: \(n) members (and users): peak anonymous RSS \(peak) KiB, "
                    + "\(String(format: "%.1f", Date().timeIntervalSince(started))) s")
        }
    }
}
