import EdgeHTTP
import EdgeLoop
import EdgeStore
import EdgeTestSupport
import Foundation
import SCIM
import XCTest

@testable import EdgeDelivery

/// A store of its own for the engine: resources by id in one LMDB table,
/// the engine's tables beside them, a write and its queue entries in one
/// transaction (as the broker's apply and the agent's writes do).
final class TestStore: DeliveryTables {
    let environment: Environment
    let targets: [TargetConfiguration]
    let tables: DeliveryDatabases
    /// id → `{"domain":…,"type":…,"resource":…}`
    let directory: Database

    init(path: String, targets: [TargetConfiguration]) throws {
        environment = try Environment(EnvironmentOptions(path: path))
        tables = try DeliveryDatabases(environment)
        directory = try environment.openDatabase("directory")
        self.targets = targets
    }

    var fanout: Database { tables.fanout }
    var targetIds: Database { tables.targetIds }
    var targetOwners: Database { tables.targetOwners }
    var targetLinks: Database { tables.targetLinks }
    var targetDead: Database { tables.targetDead }
    var trail: Database { tables.trail }
    var traces: Database { tables.traces }
    var targetState: Database { tables.targetState }
    var targetMembers: Database { tables.targetMembers }
    var targetMemberOf: Database { tables.targetMemberOf }
    var targetPending: Database { tables.targetPending }

    func deliveryEntry(_ id: String, members: Bool, _ txn: borrowing some StoreReading & ~Copyable) throws -> DirectoryEntry? {
        guard let bytes = try txn.get(directory, Array(id.utf8)), let o = try JSONParser.parse(bytes).objectValue,
            let domain = o["domain"]?.stringValue, let type = o["type"]?.stringValue, let r = o["resource"]?.objectValue
        else { return nil }
        return (domain, type, r)
    }
    /// A group's members, from its `members` (sorted by id, as an index would give them).
    func memberIDs(_ group: String, _ txn: borrowing some StoreReading & ~Copyable) throws -> [String] {
        let members = try deliveryEntry(group, members: true, txn)?.resource["members"]?.arrayValue ?? []
        return members.compactMap { $0["value"]?.stringValue }.sorted()
    }
    func groupMemberEntry(group: String, member: String, _ txn: borrowing some StoreReading & ~Copyable) throws -> JSONObject? {
        try memberIDs(group, txn).contains(member) ? ["value": .string(member), "type": "User"] : nil
    }
    func groupMemberIDs(_ group: String, after: String?, limit: Int, _ txn: borrowing some StoreReading & ~Copyable) throws -> [String] {
        Array(try memberIDs(group, txn).filter { after == nil || $0 > after! }.prefix(limit))
    }
    func groupsHolding(_ member: String, _ txn: borrowing some StoreReading & ~Copyable) throws -> [String] { [] }
    func forEachDirectoryEntry(
        _ type: String, members: Bool, from: [UInt8]?, _ txn: borrowing some StoreReading & ~Copyable,
        _ body: ([UInt8], DirectoryEntry) throws -> Bool
    ) throws {
        try txn.scan(directory, from: from) { k, _ in
            guard let e = try deliveryEntry(String(decoding: k, as: UTF8.self), members: members, txn), e.type == type else { return true }
            return try body(k, e)
        }
    }

    /// Writes (or, `resource` nil, deletes) a user and queues it for the targets, in one transaction.
    func writeUser(_ id: String, _ resource: JSONObject?, domain: String = "d1") throws {
        try write(id, "User", resource, domain: domain)
    }

    /// Writes a group (its `members` beside its attributes) and queues it, its members marked as changed.
    func writeGroup(_ id: String, _ resource: JSONObject) throws {
        let members = resource["members"]?.arrayValue?.compactMap { $0["value"]?.stringValue } ?? []
        try write(id, "Group", resource, touched: members)
    }

    func write(_ id: String, _ type: String, _ resource: JSONObject?, domain: String = "d1", touched: [String] = []) throws {
        try environment.write { txn in
            let old = try deliveryEntry(id, members: false, txn)?.resource
            var new = resource
            new?["id"] = .string(id)
            new?[sourceExtensionSchema] = ["domain": .string(domain)]
            if let new {
                try txn.put(
                    directory, Array(id.utf8),
                    JSON.object(["domain": .string(domain), "type": .string(type), "resource": .object(new)]).serialized())
            } else {
                _ = try txn.delete(directory, Array(id.utf8))
            }
            _ = try enqueueFanout(
                domain: domain, type: type, brokerID: id, old: old, new: new, trace: "", acceptedAt: 0, touched: touched, txn)
        }
    }
}

/// A target that answers as the test says, when the test says: each
/// request is recorded with the simulated time it was sent at, and its
/// answer is handed back at the next `flush`.
final class SimulatedTarget: TargetTransport {
    var sent: [(at: UInt64, request: HTTPRequest)] = []
    var answer: (HTTPRequest) -> Result<HTTPResponse, HTTPClientError> = { _ in .success(HTTPResponse(status: 500)) }
    private var waiting: [() -> Void] = []
    let now: () -> UInt64
    var resets = 0

    init(now: @escaping () -> UInt64) { self.now = now }

    func unreachable() -> String? { nil }
    func send(_ request: HTTPRequest, _ completion: @escaping (Result<HTTPResponse, HTTPClientError>) -> Void) {
        sent.append((now(), request))
        let result = answer(request)
        waiting.append { completion(result) }
    }
    func reset() { resets += 1 }
    func reloadTLS() throws {}
    func close() {}

    /// Hands the answers back; true when there were any.
    @discardableResult
    func flush() -> Bool {
        guard !waiting.isEmpty else { return false }
        let now = waiting
        waiting.removeAll()
        for w in now { w() }
        return true
    }

    /// The requests of `method` (not the discovery).
    func writes(_ method: String = "POST") -> [(at: UInt64, request: HTTPRequest)] { sent.filter { $0.request.method == method } }

    /// Every request about a change (the discovery left out): creates, and the look-ups before a retried create.
    var changes: [(at: UInt64, request: HTTPRequest)] { sent.filter { !$0.request.target.hasSuffix("/ServiceProviderConfig") } }
}

/// What the simulated app answers by default: creates with an id, and no match to a look-up.
func created(_ request: HTTPRequest) -> HTTPResponse {
    if request.method == "GET" {
        return HTTPResponse(
            status: 200,
            body: Array(#"{"schemas":["urn:ietf:params:scim:api:messages:2.0:ListResponse"],"totalResults":0,"Resources":[]}"#.utf8))
    }
    let body = (try? JSONParser.parse(request.body).objectValue) ?? [:]
    var o = body
    o["id"] = .string("t-" + (body["externalId"]?.stringValue ?? "?"))
    return HTTPResponse(status: 201, headers: ["Content-Type": "application/scim+json"], body: JSON.object(o).serialized())
}

/// The worker on a simulated clock: the test moves the time and ticks it,
/// so that backoffs, Retry-After, the breaker's cooldowns and the
/// credentials probes are checked to the millisecond without waiting for
/// any of them.
final class WorkerTests: XCTestCase {
    var dir: TempDirectory!
    var loop: EventLoop!
    var store: TestStore!
    var writer: GroupCommitWriter!
    var worker: TargetWorker!
    var target: SimulatedTarget!
    let time = Locked<UInt64>(1_000_000)

    override func setUp() {
        dir = TempDirectory("edge-worker")
    }

    override func tearDown() {
        worker?.stop()
        worker = nil
        writer = nil
        store = nil
        if let loop { while loop.runOnce(wait: false) {}; _ = loop.close() }
        dir.remove()
    }

    func start(_ configure: (inout TargetConfiguration) -> Void = { _ in }) throws {
        var t = try TargetConfiguration(name: "app", url: "http://127.0.0.1:1/scim/v2")
        t.routes = [try Route()]
        t.requestsPerSecond = 1000
        t.concurrency = 4
        t.token = "tok"
        configure(&t)
        loop = try EventLoop()
        store = try TestStore(path: dir.file("store"), targets: [t])
        writer = GroupCommitWriter(environment: store.environment, inbox: loop.inbox)
        let time = self.time
        target = SimulatedTarget(now: { time.current })
        let clock = DeliveryClock(monotonic: { time.current }, unix: { 1_700_000_000_000 + Int64(time.current) })
        worker = try TargetWorker(
            target: t, store: store, writer: writer, loop: loop, clock: clock, transport: target, random: DeliveryRandom(seed: 1))
        let answers = target!
        let discovery = #"{"patch":{"supported":true},"filter":{"supported":true},"etag":{"supported":false}}"#
        target.answer = { r in
            r.target.hasSuffix("/ServiceProviderConfig")
                ? .success(HTTPResponse(status: 200, body: Array(discovery.utf8))) : .success(created(r))
        }
        try worker.start(timer: false)
        settle()
        XCTAssertNotNil(worker.capabilities)
        _ = answers
    }

    /// Answers handed back and the writer's completions run, until nothing
    /// moves: the loop is alive exactly while a write is under way (the
    /// writer holds it), and blocks then for its completion.
    func settle() {
        let deadline = Date().addingTimeInterval(10)
        while Date() < deadline {
            let moved = target.flush()
            let writing = loop.runOnce(wait: false)
            if !moved && !writing { return }
            if !moved { loop.runOnce(wait: true) }
        }
        XCTFail("the worker did not settle")
    }

    /// Moves the simulated clock by `ms` in timer periods, ticking and settling at each.
    func advance(_ ms: UInt64) {
        var left = ms
        while left > 0 {
            let step = min(left, TargetWorker.tickMilliseconds)
            time.withLock { $0 += step }
            left -= step
            worker.tick()
            settle()
        }
    }

    func queueUsers(_ n: Int, from k: Int = 0) throws {
        for i in k..<(k + n) { try store.writeUser("u\(i)", ["userName": .string("user\(i)")]) }
        worker.kick()
        settle()
    }

    func testA429HoldsEveryRequestForItsRetryAfterThenTheQueueFlows() throws {
        try start()
        var throttled = 1
        target.answer = { r in
            if throttled > 0 {
                throttled -= 1
                return .success(HTTPResponse(status: 429, headers: ["Retry-After": "2"]))
            }
            return .success(created(r))
        }
        let t0 = time.current
        try queueUsers(3)
        XCTAssertEqual(worker.statistics.throttled, 1)
        XCTAssertLessThan(worker.limit, 4, "the window shrinks on a throttle")
        let answeredAt = target.writes().first!.at
        advance(1975)
        XCTAssertEqual(
            target.writes().filter { $0.at > answeredAt }.count, 0,
            "nothing is sent during the Retry-After (the others were in flight when it was answered)")
        advance(25)
        XCTAssertEqual(store.delivered(), 3, "after 2 s everything flows")
        let retried = target.writes().filter { $0.at > answeredAt }
        XCTAssertTrue(retried.allSatisfy { $0.at >= t0 + 2000 }, "\(retried.map(\.at))")
        XCTAssertEqual(worker.statistics.delivered, 3)
    }

    func testARetryAfterOfADayIsCappedAtFiveMinutes() throws {
        try start()
        var throttled = true
        target.answer = { r in
            if throttled {
                throttled = false
                return .success(HTTPResponse(status: 503, headers: ["Retry-After": "86400"]))
            }
            return .success(created(r))
        }
        try store.writeUser("u0", ["userName": "user0"])
        worker.kick()
        settle()
        XCTAssertEqual(target.writes().count, 1)
        time.withLock { $0 += 299_975 }
        worker.tick()
        settle()
        XCTAssertEqual(target.writes().count, 1, "still paused just before five minutes")
        advance(25)
        XCTAssertEqual(target.writes().count, 2)
        XCTAssertEqual(store.delivered(), 1)
    }

    /// A throttle's `Retry-After: 0` holds the target a second, as none
    /// does: 0 had the worker send again at once, for as long as the target
    /// kept answering so (as fast as its rate limit let it).
    func testAThrottleWithARetryAfterOfZeroHoldsTheTargetASecond() throws {
        try start()
        var throttled = 3
        target.answer = { r in
            if throttled > 0 {
                throttled -= 1
                return .success(HTTPResponse(status: 429, headers: ["Retry-After": "0"]))
            }
            return .success(created(r))
        }
        try store.writeUser("u0", ["userName": "user0"])
        worker.kick()
        settle()
        XCTAssertEqual(target.writes().count, 1, "the throttled request alone, not a loop of them")
        advance(975)
        XCTAssertEqual(target.writes().count, 1, "held for the second")
        advance(25)
        XCTAssertEqual(target.writes().count, 2)
        advance(1000)
        advance(1000)
        XCTAssertEqual(target.writes().count, 4)
        XCTAssertEqual(store.delivered(), 1)
        XCTAssertEqual(worker.statistics.throttled, 3)
    }

    func testTheBreakerOpensAtItsThresholdWaitsItsCooldownAndOneProbeClosesIt() throws {
        try start {
            $0.breakerThreshold = 3; $0.concurrency = 1
        }
        var up = false
        target.answer = { r in up ? .success(created(r)) : .failure(.connectionLost("reset by peer")) }
        try queueUsers(4)
        // Failures in a row: each retried after its backoff, until the third opens the breaker.
        var guardTime = 0
        while worker.breakerState == .closed && guardTime < 100_000 {
            advance(25)
            guardTime += 25
        }
        XCTAssertEqual(worker.breakerState, .open)
        XCTAssertEqual(target.changes.count, 3, "three failures opened it")
        XCTAssertEqual(worker.statistics.breakerOpened, 1)
        XCTAssertEqual(target.resets, 1, "the connections are dropped (the host is resolved again before the probe)")
        let opened = target.changes.last!.at
        advance(1975)
        XCTAssertEqual(target.changes.count, 3, "nothing during the cooldown (2 s for the first opening)")
        advance(25)
        XCTAssertEqual(worker.breakerState, .open, "the half-open probe failed: open again")
        XCTAssertEqual(target.changes.count, 4, "one probe, not the queue")
        XCTAssertEqual(target.changes.last!.at, opened + 2000)
        advance(3975)
        XCTAssertEqual(target.changes.count, 4, "the second cooldown is twice as long")
        up = true
        advance(25)
        XCTAssertEqual(worker.breakerState, .closed, "an answer closes it")
        // The probe's own retry waits out its backoff; then everything goes.
        advance(30_000)
        XCTAssertEqual(store.delivered(), 4)
        XCTAssertEqual(target.writes().filter { $0.at >= opened + 6000 }.count, 4, "the four users, created once each after it closed")
        XCTAssertEqual(
            target.writes("GET").filter { $0.at >= opened + 6000 }.count, 3,
            "the three that failed are looked up first (their POST may have been taken)")
    }

    func testRetriesWaitTheirBackoffAndARefusedChangeIsADeadLetterThatBlocksNothing() throws {
        try start { $0.concurrency = 1 }
        var failures = 2
        target.answer = { r in
            let name = (try? JSONParser.parse(r.body))?["userName"]?.stringValue
            if name == "user0" { return .success(HTTPResponse(status: 400, body: Array(#"{"detail":"no"}"#.utf8))) }
            if name == "user1" && failures > 0 {
                failures -= 1
                return .success(HTTPResponse(status: 500))
            }
            return .success(created(r))
        }
        try queueUsers(3)
        let firstFailure = target.writes().first { (try? JSONParser.parse($0.request.body))?["userName"]?.stringValue == "user1" }!.at
        advance(60_000)
        XCTAssertEqual(store.delivered(), 2, "user1 after its retries, user2 beside them")
        let letters = try store.deadLetters(target: "app")
        XCTAssertEqual(letters.count, 1)
        XCTAssertEqual(letters.first?.letter["status"]?.numberValue?.integer, 400)
        XCTAssertEqual(letters.first?.letter["id"]?.stringValue, "u0")
        let user1 = target.writes().filter { (try? JSONParser.parse($0.request.body))?["userName"]?.stringValue == "user1" }
        XCTAssertEqual(user1.count, 3, "two 500s, then the create (each retry looks it up first: a POST may have been taken)")
        XCTAssertEqual(target.writes("GET").filter { $0.request.target.contains("externalId") }.count, 2)
        // Each retry waited at least… nothing more than its cap (full jitter: 0 … 500 ms, 0 … 1 s).
        XCTAssertLessThanOrEqual(user1[1].at - firstFailure, 500 + TargetWorker.tickMilliseconds)
        XCTAssertLessThanOrEqual(user1[2].at - user1[1].at, 1000 + TargetWorker.tickMilliseconds)
        XCTAssertEqual(worker.statistics.retries, 2)
        XCTAssertEqual(worker.statistics.deadLettered, 1)
    }

    func testRefusedCredentialsPauseTheQueueAndOneChangeProbesThemUntilAReload() throws {
        try start()
        var accepted = false
        target.answer = { r in accepted ? .success(created(r)) : .success(HTTPResponse(status: 401)) }
        try queueUsers(3)
        XCTAssertTrue(worker.credentialsRefused)
        let refusedAt = time.current
        let sentBefore = target.writes().count
        advance(975)
        XCTAssertEqual(target.writes().count, sentBefore, "paused: nothing during the first second")
        advance(25)
        XCTAssertEqual(target.writes().count, sentBefore + 1, "then one change probes")
        XCTAssertEqual(target.writes().last!.at, refusedAt + 1000)
        advance(1975)
        XCTAssertEqual(target.writes().count, sentBefore + 1, "the next probe two seconds later")
        advance(25)
        XCTAssertEqual(target.writes().count, sentBefore + 2)
        accepted = true
        worker.reload()  // SIGHUP: new credentials, probed at once
        settle()
        XCTAssertFalse(worker.credentialsRefused)
        advance(100)
        XCTAssertEqual(store.delivered(), 3)
        XCTAssertEqual(try store.deadLetters(target: "app").count, 0, "refused credentials never make dead letters")
    }

    func testTheDeletionGuardHoldsRemovalsPastItsThresholdUntilConfirmed() throws {
        try start {
            $0.deletionGuard = DeletionGuard(maxDeletes: 2, windowSeconds: 60); $0.removal = .delete
        }
        try queueUsers(4)
        XCTAssertEqual(store.delivered(), 4)
        for i in 0..<4 { try store.writeUser("u\(i)", nil) }
        worker.kick()
        settle()
        XCTAssertEqual(target.writes("DELETE").count, 2, "two removals pass")
        XCTAssertTrue(worker.deletesPaused)
        XCTAssertNotNil(try store.deletionGuard(target: "app").pausedSince, "the pause is stored (the CLI lists it)")
        XCTAssertEqual(try store.heldRemovals(target: "app").removals.map(\.item.brokerID), ["u2", "u3"])
        advance(120_000)
        XCTAssertEqual(target.writes("DELETE").count, 2, "held however long, the window notwithstanding")
        try store.confirmDeletes(target: "app")
        advance(1000)  // the worker reads the guard every 40 ticks
        XCTAssertFalse(worker.deletesPaused)
        XCTAssertEqual(target.writes("DELETE").count, 4)
        XCTAssertEqual(try store.queueDepth(target: "app").count, 0)
    }
}

extension TestStore {
    /// How many users the target holds an account for.
    func delivered() -> Int { ((try? mappings(target: "app")) ?? [:]).count }
}

extension WorkerTests {
    /// A group taken off the target and routed there again before its old
    /// index there is forgotten (no background sweep runs here): its
    /// delivery forgets the old index first, then creates the group with
    /// every member. Were the old entries taken for the new group's, its
    /// members would look held already and the POST would carry none.
    func testAGroupBackAtTheTargetBeforeItsOldIndexIsGoneIsCreatedWithAllItsMembers() throws {
        let routes = [try Route(types: ["User"]), try Route(types: ["Group"], filter: #"displayName sw "A""#)]
        try start { t in
            t.routes = routes
            t.removal = .delete
        }
        try queueUsers(3)
        let members: JSON = .array((0..<3).map { ["value": .string("u\($0)")] })
        try store.writeGroup("g1", ["displayName": "A team", "members": members])
        worker.kick()
        settle()
        let posts = { self.target.writes().filter { $0.request.target.hasSuffix("/Groups") } }
        XCTAssertEqual(posts().count, 1)
        try store.writeGroup("g1", ["displayName": "B team", "members": members])  // out of the routes: removed there
        worker.kick()
        settle()
        XCTAssertEqual(target.writes("DELETE").count, 1)
        XCTAssertTrue(try store.groupIndexSweepPending(target: "app", group: "g1"), "its index is left for later")
        XCTAssertEqual(try store.environment.read { txn in try store.heldGroups(target: "app", member: "u1", txn) }, [])
        try store.writeGroup("g1", ["displayName": "A team", "members": members])  // back
        worker.kick()
        settle()
        XCTAssertEqual(posts().count, 2)
        XCTAssertFalse(try store.groupIndexSweepPending(target: "app", group: "g1"))
        let body = try JSONParser.parse(try XCTUnwrap(posts().last).request.body)
        XCTAssertEqual(
            body["members"]?.arrayValue?.compactMap { $0["value"]?.stringValue }.sorted(), ["t-u0", "t-u1", "t-u2"], "\(body)")
    }
}
