import EdgeBroker
import EdgeHTTP
import EdgeLoop
import EdgeStore
import EdgeTLS
import EdgeTestSupport
import Foundation
import SCIM
import XCTest

@testable import EdgeAgent

/// How a boundary agent paces its polls when the broker's answers give it
/// nothing to do, against a scripted broker over mutual TLS (the agent a
/// real process). Each of these made it poll in a loop, as fast as the
/// connection answers: an empty answer before the wait asked for (a second
/// agent polling with a copy of this store takes the first's place at the
/// broker, again and again), an answer holding only what is committed here
/// already (a broker that does not take the acknowledgement; each was also a
/// commit), a `Retry-After: 0`, and an answer that cannot be committed (the
/// backoff was reset by its 200). Counted over a few seconds: a loaded
/// machine only makes the counts smaller, the loops made them hundreds.
extension DownlinkTests {
    /// A broker that answers each feed poll with `answer(poll, n)` (n counts the polls from 1); the times and bodies
    /// of the polls it got. Anything else gets an empty relay acknowledgement.
    func scriptedBroker(
        _ answer: @escaping @Sendable (JSON, Int) -> HTTPResponse
    ) throws -> (ServerHarness, Locked<[(at: Date, body: JSON)]>) {
        let polls = Locked<[(at: Date, body: JSON)]>([])
        let fake = try ServerHarness(tls: TLSConfiguration(certificateChainFile: broker.0, privateKeyFile: broker.1, trustRootsFile: ca)) {
            request, _, responder in
            guard request.target == BrokerService.feedPath, let poll = try? JSONParser.parse(request.body) else {
                return responder.respond(
                    HTTPResponse(status: 200, headers: ["Content-Type": "application/json"], body: Array(#"{"ackedThrough":0}"#.utf8)))
            }
            let n = polls.withLock { p in
                p.append((Date(), poll))
                return p.count
            }
            responder.respond(answer(poll, n))
        }
        return (fake, polls)
    }

    /// A feed answer; without `lastSeq`, as a broker answers a held poll another took the place of.
    static func feedAnswer(_ events: [JSON], lastSeq: Int? = 0) -> HTTPResponse {
        var fields: JSONObject = ["protocol": 5, "moreAvailable": false, "events": .array(events)]
        if let lastSeq { fields["lastSeq"] = .int(lastSeq) }
        let body = JSON.object(fields)
        return HTTPResponse(status: 200, headers: ["Content-Type": "application/json"], body: body.serialized())
    }

    /// Feed event `seq`: a user of acme-de named `userName` (broker id `b<seq>` unless `id`).
    static func userEvent(_ seq: Int, _ userName: String, id: String? = nil) -> JSON {
        [
            "seq": .int(seq), "jti": .string("f-\(seq)"), "txn": .string(String(repeating: "a", count: 31) + "\(seq % 10)"), "ts": 1,
            "domain": "acme-de",
            "events": [
                "urn:ietf:params:SCIM:event:prov:create:full": [
                    "ref": .string("/Users/\(id ?? "b\(seq)")"),
                    "data": ["schemas": ["urn:ietf:params:scim:schemas:core:2.0:User"], "userName": .string(userName)],
                ]
            ],
        ]
    }

    /// The polls that arrived within `seconds` after the `from`th one did.
    func polls(_ log: Locked<[(at: Date, body: JSON)]>, within seconds: TimeInterval, from: Int) -> Int {
        let all = log.current
        guard all.count >= from else { return 0 }
        let start = all[from - 1].at
        return all.dropFirst(from).filter { $0.at.timeIntervalSince(start) <= seconds }.count
    }

    func testEmptyAnswersBeforeTheWaitAreSpacedOutAndTheFeedGoesOn() throws {
        let sending = Locked(false)
        // Answers at once with nothing, whatever the wait asked for, as a broker answers a held poll whose place
        // another took (another copy of the store polling).
        let (fake, log) = try scriptedBroker { _, _ in
            sending.current ? Self.feedAnswer([Self.userEvent(1, "alice")], lastSeq: 1) : Self.feedAnswer([], lastSeq: nil)
        }
        defer { _ = fake.stop() }
        let (usAgent, up) = try startInboundAgent("us", cert: us, brokerPort: fake.port, waitMs: 5000)
        XCTAssertTrue(eventually(seconds: 20) { log.current.count >= 2 }, "\(usAgent.output.suffix(10))")
        // Watched for 4 s from the second poll (the first of a row goes at once, then 250 ms doubling to 5 s).
        Thread.sleep(forTimeInterval: 4.5)
        let spaced = polls(log, within: 4, from: 2)
        XCTAssertLessThanOrEqual(spaced, 12, "polled \(spaced) times in 4 s: a loop")
        XCTAssertGreaterThanOrEqual(spaced, 2, "polls go on")
        XCTAssertTrue(log.current.allSatisfy { $0.body["timeoutMs"] == 5000 }, "each asked to be held")
        XCTAssertGreaterThanOrEqual(metric(usAgent, "scim_edge_downlink_idle_answers_total") ?? 0, 3)
        XCTAssertTrue(usAgent.output.contains { $0.contains("polls are spaced out") }, "said once: \(usAgent.output.suffix(5))")
        // Something to send: it arrives within the longest spacing, mapped.
        sending.withLock { $0 = true }
        XCTAssertTrue(eventually(seconds: 15) { (try? self.user(up, "alice@acme-de")) != nil }, "\(usAgent.output.suffix(10))")
        XCTAssertTrue(eventually(seconds: 10) { log.current.last?.body["ackedThrough"] == 1 })
    }

    func testAnswersRepeatingCommittedEventsAreNotCommittedAgainAndAreSpacedOut() throws {
        // Ignores the acknowledgement: always the first event again.
        let (fake, log) = try scriptedBroker { _, _ in Self.feedAnswer([Self.userEvent(1, "alice")], lastSeq: 1) }
        defer { _ = fake.stop() }
        let (usAgent, up) = try startInboundAgent("us", cert: us, brokerPort: fake.port, waitMs: 5000)
        XCTAssertTrue(eventually(seconds: 20) { (try? self.user(up, "alice@acme-de")) != nil }, "\(usAgent.output.suffix(10))")
        func firstAcknowledging() -> Int? { log.current.firstIndex { $0.body["ackedThrough"] == 1 }.map { $0 + 1 } }
        XCTAssertTrue(eventually(seconds: 10) { firstAcknowledging() != nil })
        let writes = metric(usAgent, "scim_edge_committed_writes_total") ?? 0, answered = log.current.count
        Thread.sleep(forTimeInterval: 8)
        let spaced = polls(log, within: 4, from: try XCTUnwrap(firstAcknowledging()))
        XCTAssertLessThanOrEqual(spaced, 12, "polled \(spaced) times in 4 s: a loop")
        // Pauses of at most 250, 500, 1000, 2000, 4000 ms: at least 2 in the 8 s after `answered` was read, even 2 s late.
        let repeats = log.current.count - answered
        XCTAssertGreaterThanOrEqual(repeats, 2, "polls go on")
        let committed = (metric(usAgent, "scim_edge_committed_writes_total") ?? 0) - writes
        XCTAssertLessThanOrEqual(committed, Double(repeats / 2), "\(repeats) answers of nothing new: \(committed) commits")
        XCTAssertGreaterThanOrEqual(metric(usAgent, "scim_edge_downlink_duplicates_total") ?? 0, Double(repeats - 1))
        XCTAssertEqual(metric(usAgent, "scim_edge_downlink_applied_sequence"), 1)
        XCTAssertEqual(metric(usAgent, "scim_edge_downlink_events_applied_total"), 1, "applied once")
        XCTAssertTrue(log.current.suffix(3).allSatisfy { $0.body["ackedThrough"] == 1 }, "still acknowledged")
    }

    func testARetryAfterOfZeroWaitsASecond() throws {
        // 503 busy to the first 4 polls, then 409 another_store: each with Retry-After 0.
        let (fake, log) = try scriptedBroker { _, n in
            let (status, error) = n <= 4 ? (503, "busy") : (409, "another_store")
            return HTTPResponse(
                status: status, headers: ["Content-Type": "application/json", "Retry-After": "0"],
                body: Array(#"{"error":"\#(error)","description":"scripted"}"#.utf8))
        }
        defer { _ = fake.stop() }
        let (usAgent, _) = try startInboundAgent("us", cert: us, brokerPort: fake.port)
        XCTAssertTrue(eventually(seconds: 30) { log.current.count >= 8 }, "\(log.current.count) \(usAgent.output.suffix(10))")
        let times = log.current.prefix(8).map(\.at)
        for k in 1..<times.count {
            XCTAssertGreaterThanOrEqual(
                times[k].timeIntervalSince(times[k - 1]), 0.9,
                "poll \(k + 1) came \(times[k].timeIntervalSince(times[k - 1])) s after the one before")
        }
    }

    func testAnAnswerThatCannotBeCommittedBacksOffLikeALostConnection() throws {
        // Sequence 2 to a store at 0: a gap, never committed.
        let (fake, log) = try scriptedBroker { _, _ in Self.feedAnswer([Self.userEvent(2, "bob")], lastSeq: 2) }
        defer { _ = fake.stop() }
        let (usAgent, _) = try startInboundAgent("us", cert: us, brokerPort: fake.port)
        XCTAssertTrue(eventually(seconds: 20) { log.current.count >= 2 }, "\(usAgent.output.suffix(10))")
        Thread.sleep(forTimeInterval: 5.5)
        // Backing off 0-200 ms, 0-400 ms, … doubling (full jitter): a handful in 5 s; reset by each 200, dozens.
        let retries = polls(log, within: 5, from: 1)
        XCTAssertLessThanOrEqual(retries, 15, "polled \(retries) times in 5 s")
        XCTAssertGreaterThanOrEqual(metric(usAgent, "scim_edge_downlink_protocol_errors_total") ?? 0, 2)
        XCTAssertEqual(metric(usAgent, "scim_edge_downlink_applied_sequence"), 0, "nothing of it applied")
    }

    func testRefusalsOfOneAnswerAreLoggedTwentyAtMostAndAllCounted() throws {
        // 25 users whose mapped userName (…@acme-de) is too long for the store's index keys: each refused alone.
        let long = String(repeating: "r", count: 509)
        let events = (1...25).map { Self.userEvent($0, "\(long)\($0 % 10)") }
        let (fake, _) = try scriptedBroker { poll, _ in
            poll["ackedThrough"] == 0 ? Self.feedAnswer(events, lastSeq: 25) : Self.feedAnswer([], lastSeq: 25)
        }
        defer { _ = fake.stop() }
        let (usAgent, _) = try startInboundAgent("us", cert: us, brokerPort: fake.port)
        XCTAssertTrue(
            eventually(seconds: 20) { self.metric(usAgent, "scim_edge_downlink_applied_sequence") == 25 }, "\(usAgent.output.suffix(10))")
        XCTAssertEqual(metric(usAgent, "scim_edge_downlink_events_refused_total"), 25)
        XCTAssertTrue(eventually(seconds: 5) { usAgent.output.contains { $0.contains("than are logged") } })
        let each = usAgent.output.filter { $0.contains("an accepted resource could not be stored here") }
        XCTAssertEqual(each.count, 20, "\(each.count) refusals logged one by one")
        XCTAssertEqual(usAgent.output.filter { $0.contains("than are logged") }.count, 1)
    }

    /// An answer's commit that fails after a later poll failed (and its
    /// retry's empty answer left the next poll to that commit) polls again:
    /// before, nothing did, and the boundary's feed stopped for good. The
    /// poller runs in this process so that the test can hold its writer
    /// until that order is reached.
    func testACommitFailingAfterALaterFailureStillPollsAgain() throws {
        // 1: sequences 1 and 3 (a gap: that commit fails); 2 (pipelined): a 500, retried; then nothing.
        let (fake, log) = try scriptedBroker { _, n in
            switch n {
            case 1: return Self.feedAnswer([Self.userEvent(1, "alice"), Self.userEvent(3, "carol")], lastSeq: 3)
            case 2:
                return HTTPResponse(
                    status: 500, headers: ["Content-Type": "application/json"],
                    body: Array(#"{"error":"unavailable","description":"scripted"}"#.utf8))
            default: return Self.feedAnswer([], lastSeq: 3)
            }
        }
        defer { _ = fake.stop() }
        let store = try AgentStore(path: dir.file("us"), registry: .standard)
        let relay = RelayConfiguration(
            broker: SocketAddress(host: "127.0.0.1", port: fake.port), brokerName: "localhost",
            tls: TLSConfiguration(certificateChainFile: us.0, privateKeyFile: us.1, trustRootsFile: ca), domain: "acme-us",
            agentName: "us")
        var policy = InboundPolicy(accept: [try InboundPolicy.Rule(domains: ["acme-de"])], userNameTemplate: "{userName}@{domain}")
        policy.waitMilliseconds = 2000
        let inbound = policy
        let gate = DispatchSemaphore(value: 0)
        defer { gate.signal() }  // the writer is never left blocked, whatever failed
        final class Running: @unchecked Sendable {  // touched on the loop thread only
            var poller: DownlinkPoller?
            var keepAlive: LoopTimer?
            var writer: GroupCommitWriter?
        }
        let running = Running()
        let thread = try LoopThread.start { loop in
            let writer = GroupCommitWriter(environment: store.environment, inbox: loop.inbox)
            // Holds the writer: the first answer's commit waits behind this write until the gate opens.
            writer.submit({ _ in gate.wait() }) { _ in }
            let poller = try DownlinkPoller(
                loop: loop, store: store, writer: writer, relay: relay, policy: inbound,
                makeContext: { trace in
                    WriteContext(
                        newID: "n-\(UInt64.random(in: 0...UInt64.max))", now: "2026-12-04T00:00:00Z", epochSeconds: 0, eventID: "e",
                        traceID: trace ?? "t")
                })
            let keepAlive = try LoopTimer(loop: loop)
            keepAlive.start(after: 60_000) {}
            (running.poller, running.keepAlive, running.writer) = (poller, keepAlive, writer)
            try poller.start()
        }
        defer {
            gate.signal()  // before the writer goes: its thread must not be left waiting
            thread.inbox.send {
                running.poller?.stop()
                running.keepAlive?.close()
                (running.poller, running.keepAlive, running.writer) = (nil, nil, nil)
            }
            XCTAssertEqual(thread.join(), 0)
        }
        // The retry's poll (3) was answered with nothing while the first answer waits for the writer.
        XCTAssertTrue(eventually(seconds: 20) { log.current.count >= 3 }, "\(log.current.count) polls")
        Thread.sleep(forTimeInterval: 0.5)  // that answer read by the agent (a slower machine only makes the test pass)
        XCTAssertEqual(log.current.count, 3, "nothing else asked meanwhile")
        XCTAssertEqual(log.current.dropFirst().first?.body["after"], 3, "the second poll was pipelined")
        gate.signal()
        XCTAssertTrue(eventually(seconds: 10) { log.current.count >= 4 }, "the poller stopped after the failed commit")
        XCTAssertEqual(log.current.last?.body["ackedThrough"], 0, "nothing of the answer with a gap committed")
        XCTAssertNil(log.current.last?.body["after"], "asked again from what is committed")
    }

    /// The sweep that ends a resync, failing on a quiet feed (no answer
    /// commits to start it again), is retried on its own backoff: before,
    /// it waited for a committed answer, which a quiet feed never brings, and
    /// the resync stayed open with its stale resources. Here a stale foreign
    /// record is damaged, so every step fails: the retries show, and the
    /// polls go on.
    func testAFailedSweepIsRetriedOnAQuietFeed() throws {
        let (fake, log) = try scriptedBroker { _, _ in Self.feedAnswer([], lastSeq: 0) }
        defer { _ = fake.stop() }
        var (usAgent, _) = try startInboundAgent("us", cert: us, brokerPort: fake.port)
        usAgent.signal(SIGTERM)
        XCTAssertNotNil(usAgent.waitForExit(seconds: 20))
        // While it is down: a resync's sweep under way, and a foreign user it did not send again, damaged.
        let store = try AgentStore(path: dir.file("us"), registry: .standard)
        let user = try XCTUnwrap(store.registry.resourceType("User"))
        try store.environment.write { txn in
            try txn.put(store.foreign, AgentStore.key(user, "stale-1"), Array("acme-de".utf8))
            try txn.put(store.resources, AgentStore.key(user, "stale-1"), Array(#"{"id":"#.utf8))
            try txn.put(store.meta, AgentStore.resyncKey, [1])
            try txn.put(store.meta, AgentStore.staleSweepKey, [])
        }
        (usAgent, _) = try startInboundAgent("us", cert: us, brokerPort: fake.port)
        func failures() -> Int { usAgent.output.filter { $0.contains("the sweep after a resync failed") }.count }
        XCTAssertTrue(eventually(seconds: 20) { failures() >= 3 }, "\(failures()) sweep failures: \(usAgent.output.suffix(10))")
        XCTAssertEqual(metric(usAgent, "scim_edge_downlink_events_applied_total"), 0, "no answer committed meanwhile")
        XCTAssertGreaterThanOrEqual(log.current.count, 2, "polls go on")
        XCTAssertTrue(try store.staleSweepPending(), "the sweep stays under way")
    }

    /// A held poll woken by changes that make no feed event (here a user
    /// created and deleted in one uplink batch, so neither is sent) stays
    /// held for the rest of its wait. Before, the broker answered it at once
    /// with an empty page: a poll again at once for the agent, and an agent
    /// cannot tell that from its poll being replaced.
    func testAHeldPollWokenByChangesThatMakeNoEventStaysHeld() throws {
        let (broker, bp) = try startBroker(yaml: brokerYAML)
        let answered = Locked<(Date, Int, JSON?)?>(nil)
        let asked = Date()
        let poll = #"{"ackedThrough":0,"maxEvents":100,"timeoutMs":4000,"epoch":"e1","protocol":5}"#
        nonisolated(unsafe) let test = self  // its poll helper only reads the certificates' paths
        DispatchQueue.global().async {
            let r = try? test.poll(bp, cert: test.us, poll)
            answered.withLock { $0 = (Date(), r?.0 ?? 0, r?.1) }
        }
        let waiting = #"scim_broker_downlink_polls_waiting{domain="acme-us",target="us-boundary"} 1"#
        XCTAssertTrue(eventually(seconds: 10) { (try? self.brokerMetrics(broker))?.contains(waiting) == true })
        let create: JSON = [
            "seq": 1, "txn": .string(String(repeating: "b", count: 32)), "ts": 1,
            "events": [
                "urn:ietf:params:SCIM:event:prov:create:full": [
                    "ref": "/Users/u1", "version": "W/\"1\"",
                    "data": ["schemas": ["urn:ietf:params:scim:schemas:core:2.0:User"], "id": "u1", "userName": "gone"],
                ]
            ],
        ]
        let delete: JSON = [
            "seq": 2, "txn": .string(String(repeating: "c", count: 32)), "ts": 1,
            "events": ["urn:ietf:params:SCIM:event:prov:delete": ["ref": "/Users/u1", "version": "W/\"2\""]],
        ]
        let batch: JSON = ["domain": "acme-de", "epoch": "hq1", "events": [create, delete]]
        let (status, body) = try post(bp, cert: de, path: "/federation/v1/events", batch.serialized())
        XCTAssertEqual(status, 200, "\(String(describing: body))")
        XCTAssertEqual(body?["ackedThrough"], 2)
        XCTAssertTrue(eventually(seconds: 10) { answered.current != nil }, "the poll was never answered")
        let (at, code, page) = try XCTUnwrap(answered.current)
        XCTAssertEqual(code, 200)
        XCTAssertEqual(page?["events"]?.arrayValue?.count, 0)
        XCTAssertNotNil(page?["lastSeq"], "answered at its wait's end, with the feed's position")
        XCTAssertGreaterThanOrEqual(at.timeIntervalSince(asked), 3.5, "answered before its wait, with nothing")
    }

    /// A POST over mutual TLS with `cert` to the broker: the status and the answer.
    func post(_ port: Int, cert: (String, String), path: String, _ body: [UInt8]) throws -> (Int, JSON?) {
        let config = TLSConfiguration(certificateChainFile: cert.0, privateKeyFile: cert.1, trustRootsFile: ca)
        let (answer, _) = try runOnLoop { (loop: EventLoop, finish: @escaping @Sendable ((Int, [UInt8])) -> Void) in
            let client = HTTPClient(
                loop: loop, address: SocketAddress(host: "127.0.0.1", port: port),
                tls: try TLSContext(role: .client, configuration: config), serverName: "localhost")
            client.send(HTTPRequest(method: "POST", target: path, headers: ["Content-Type": "application/json"], body: body)) { r in
                client.close()
                finish((try? r.get()).map { ($0.status, $0.body) } ?? (0, []))
            }
        }
        let (status, bytes) = try XCTUnwrap(answer)
        return (status, try? JSONParser.parse(bytes))
    }

    /// A commit that fails (here on a damaged foreign record) while the
    /// pipelined poll after it is out: the retry's timer fires while that
    /// poll is out and so leaves the next poll to it, and its answer, which
    /// follows what was not committed, is dropped. Before, dropping it
    /// polled no more, and the feed stopped for good; now it polls.
    func testAnAnswerDroppedAfterAFailedCommitStillPollsAgain() throws {
        let restarted = Locked(false), failed = Locked(false)
        let (fake, log) = try scriptedBroker { poll, _ in
            guard restarted.current else {
                return poll["ackedThrough"] == 0
                    ? Self.feedAnswer([Self.userEvent(1, "alice")], lastSeq: 1) : Self.feedAnswer([], lastSeq: 1)
            }
            if poll["after"] != nil {
                // The pipelined poll, held until its answer's commit failed and past the retry's timer (at most 200 ms).
                let until = Date().addingTimeInterval(10)
                while !failed.current && Date() < until { usleep(10_000) }
                usleep(500_000)
                return Self.feedAnswer([], lastSeq: 2)
            }
            return Self.feedAnswer([Self.userEvent(2, "alice", id: "b1")], lastSeq: 2)
        }
        defer { _ = fake.stop() }
        var (usAgent, up) = try startInboundAgent("us", cert: us, brokerPort: fake.port)
        XCTAssertTrue(eventually(seconds: 20) { (try? self.user(up, "alice@acme-de")) != nil }, "\(usAgent.output.suffix(10))")
        usAgent.signal(SIGTERM)
        XCTAssertNotNil(usAgent.waitForExit(seconds: 20))
        let store = try AgentStore(path: dir.file("us"), registry: .standard)
        try store.environment.write { txn in
            var keys: [[UInt8]] = []
            try txn.scanKeys(store.foreign, from: nil) { k in
                keys.append(k)
                return true
            }
            XCTAssertEqual(keys.count, 1)
            for k in keys { try txn.put(store.resources, k, Array(#"{"id":"#.utf8)) }
        }
        restarted.withLock { $0 = true }
        let before = log.current.count
        (usAgent, up) = try startInboundAgent("us", cert: us, brokerPort: fake.port)
        XCTAssertTrue(eventually(seconds: 10) { usAgent.output.contains { $0.contains("cannot be read") } }, "\(usAgent.output.suffix(6))")
        failed.withLock { $0 = true }
        // The update of alice fails on her damaged record, again and again: retried, with backoff, never stopped.
        XCTAssertTrue(
            eventually(seconds: 15) { log.current.count - before >= 4 },
            "\(log.current.count - before) polls after the restart: \(usAgent.output.suffix(6))")
        XCTAssertTrue(usAgent.output.contains { $0.contains("cannot be read") }, "\(usAgent.output.suffix(6))")
        XCTAssertEqual(metric(usAgent, "scim_edge_downlink_applied_sequence"), 1)
    }

    /// A boundary agent that cannot record the restart of its feed (its
    /// store full, say) polls again as before: the same stale poll. The
    /// broker answered each with a whole resync (every table of the
    /// destination rewritten); now the same poll within a minute gets
    /// `resync` again, counted, and nothing is redone. A poll from 0 then
    /// gets the feed.
    func testTheSamePollAfterAResyncIsAnsweredWithoutRedoingIt() throws {
        let (broker, bp) = try startBroker(yaml: brokerYAML)
        let fresh = #"{"ackedThrough":0,"maxEvents":10,"timeoutMs":0,"epoch":"e1","protocol":5}"#
        let stale = #"{"ackedThrough":7,"maxEvents":10,"timeoutMs":0,"epoch":"e1","protocol":5}"#
        XCTAssertEqual(try poll(bp, cert: us, fresh).0, 200)
        XCTAssertEqual(try poll(bp, cert: us, stale).0, 503, "ahead of what the feed issued: it starts again")
        func started() -> Int {
            broker.output.filter { $0.contains("the feed starts again\"") || $0.contains("\"msg\":\"downlink: the feed starts again") }
                .count
        }
        XCTAssertTrue(eventually(seconds: 10) { started() == 1 }, "\(broker.output.suffix(5))")
        for _ in 0..<3 {
            let (status, body) = try poll(bp, cert: us, stale)
            XCTAssertEqual(status, 503)
            XCTAssertEqual(body?["error"], "resync")
        }
        let resyncs = #"scim_broker_downlink_resyncs_total{domain="acme-us",target="us-boundary"} 1"#
        let repeated = #"scim_broker_downlink_resyncs_repeated_total{domain="acme-us",target="us-boundary"} 3"#
        XCTAssertTrue(
            eventually(seconds: 5) { (try? self.brokerMetrics(broker)).map { $0.contains(resyncs) && $0.contains(repeated) } == true },
            (try? brokerMetrics(broker))?.split(separator: "\n").filter { $0.contains("resync") }.joined(separator: "\n") ?? "")
        Thread.sleep(forTimeInterval: 0.5)
        XCTAssertEqual(started(), 1, "not started again")
        XCTAssertEqual(try poll(bp, cert: us, fresh).0, 200, "counted from 0, the feed is served")
    }
}
