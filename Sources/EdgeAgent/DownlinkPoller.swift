import EdgeHTTP
import EdgeLoop
import EdgeStore
import EdgeTLS
import Logging
import SCIM

/// Downlink figures, for metrics and status.
public struct DownlinkStatistics: Sendable {
    public var polls = 0
    public var eventsApplied = 0
    public var membershipDeltas = 0
    public var duplicates = 0
    /// Events the inbound policy did not accept.
    public var notAccepted = 0
    /// Events accepted but not storable here (logged with their reason).
    public var refused = 0
    public var errors = 0
    /// Answers no honest broker gives (a gap in the feed): logged, counted, nothing applied.
    public var protocolErrors = 0
    /// Times the broker started the feed again for this store.
    public var resyncs = 0
    /// Foreign resources a resync did not send again, removed at its end.
    public var staleRemoved = 0
    /// Local apps' answers to foreign changes the broker took (protocol 3).
    public var appOutcomesReported = 0
    /// Reports the broker refused (`invalid_report`): dropped, logged, the poll sent again without them.
    public var reportsRefused: [String: Int] = [:]
    /// Of them, the local apps' answers dropped; and answers dropped because their stored record could not be read.
    public var appOutcomesRefused = 0
    public var appOutcomesUnreadable = 0
    /// Answers that brought nothing new (empty, before the wait the poll asked for and without `lastSeq`: the
    /// held poll was replaced; or only events committed already): after the first of a row the next poll waits
    /// (`DownlinkPoller.idle`).
    public var idleAnswers = 0
    /// The feed sequence committed here, and the last the broker issued.
    public var appliedThrough: UInt64 = 0
    public var brokerLastSeq: UInt64 = 0
    public var lastError: String?
}

/// Fetches this boundary's feed from the broker (docs/protocol.md,
/// "Downlink"), modelled on RFC 8936 poll-based delivery: each poll carries
/// the acknowledgement of what this agent committed and asks for more,
/// the broker holding it open while there is nothing. The events are
/// applied with the feed sequence they reach in one LMDB transaction
/// (`AgentStore.applyDownlink`), and only the next poll acknowledges them:
/// delivery is at least once, the effect exactly once. Outbound only, on a
/// connection of its own beside the relay's (a long poll would hold up the
/// relay's pipelined batches); the same client certificate, so the broker
/// picks the feed by it. Runs only with an inbound policy (invariant 5).
/// Threading: loop-confined.
public final class DownlinkPoller {
    let loop: EventLoop
    let store: AgentStore
    let writer: GroupCommitWriter
    let policy: InboundPolicy
    let tls: ReloadableTLSContext
    let client: HTTPClient
    /// A write context per applied answer (ids, clock, trace).
    let makeContext: (String?) -> WriteContext
    private var timer: LoopTimer?
    private var failures = 0
    private var stopped = false
    /// What the next poll reports of the events it acknowledges (protocol 2).
    private var report: DownlinkReport?
    /// Pipelining (protocol 2): the next poll leaves as soon as an answer
    /// arrives, asking for what follows the last sequence received (`after`)
    /// while that answer is committed; it acknowledges what is committed.
    /// At most one poll and `maxApplying` answers are out at once.
    private var received: UInt64 = 0
    private var polling = false
    private var applying = 0
    private var waiting = false
    /// The acknowledgement of the last poll the broker answered: outcomes through it are taken.
    private var reported: UInt64 = 0
    /// Counts failures: an answer applied from before one may fail as its consequence (not a protocol error).
    private var generation = 0
    static let maxApplying = 2
    /// Refused events logged one by one per answer at most (the rest counted, with one line saying so).
    static let refusalsLogged = 20
    /// The broker's last answer said protocol 2 (it takes `after`): only then does a poll leave before a commit.
    private var pipelined = false
    /// It said protocol 3: it takes the local apps' answers (`appOutcomes`); those through `appsTaken` it has.
    private var takesAppOutcomes = false
    private var appsTaken: UInt64 = 0
    /// Answers the broker refused whose removal is not committed yet: left out of polls.
    private var appsRefused: Set<UInt64> = []
    /// Idle answers in a row (`DownlinkStatistics.idleAnswers`): reset by an answer with something new, or an
    /// empty one the broker held for the wait asked.
    private var idleRow = 0
    public private(set) var statistics = DownlinkStatistics()
    public var logger = Logger(label: "scim-edge.downlink")
    static let maxBackoffMilliseconds: UInt64 = 30_000

    public init(
        loop: EventLoop, store: AgentStore, writer: GroupCommitWriter, relay: RelayConfiguration, policy: InboundPolicy,
        makeContext: @escaping (String?) -> WriteContext
    ) throws {
        self.loop = loop
        self.store = store
        self.writer = writer
        self.policy = policy
        self.makeContext = makeContext
        tls = try ReloadableTLSContext(role: .client, configuration: relay.tls)
        var options = HTTPClientOptions()
        options.responseTimeoutMilliseconds = UInt64(policy.waitMilliseconds) + 15_000
        client = HTTPClient(loop: loop, address: relay.broker, reloadableTLS: tls, serverName: relay.brokerName, options: options)
    }

    public func start() throws {
        let t = try LoopTimer(loop: loop)
        t.keepsLoopAlive = false
        timer = t
        let st = try LoopTimer(loop: loop)
        st.keepsLoopAlive = false
        sweepTimer = st
        statistics.appliedThrough = try store.downlinkSequence()
        received = statistics.appliedThrough
        report = try store.downlinkReport()
        if try store.staleSweepPending() { sweepStale() }  // a sweep a restart interrupted goes on
        poll()
    }

    private var sweeping = false
    /// A sweep step failed: the next committed answer starts it again, or
    /// `sweepTimer` after a backoff (a quiet feed has no next answer).
    private var staleLeft = false
    private var sweepTimer: LoopTimer?
    private var sweepFailures = 0

    /// The end of a resync: what this store holds and the new feed did not
    /// send again goes, a step per transaction (`sweepStaleForeign`),
    /// while polls go on (what they apply is marked, so it stays).
    private func sweepStale() {
        guard !stopped, !sweeping else { return }
        (sweeping, staleLeft) = (true, false)
        let store = self.store, ctx = makeContext(nil)
        writer.submit({ txn in try store.sweepStaleForeign(limit: 1000, ctx, txn) }) { [weak self] result in
            guard let self, !stopped else { return }
            sweeping = false
            switch result {
            case .success(let step?):
                sweepFailures = 0
                statistics.staleRemoved += step.removed
                if step.removed > 0 {
                    logger.notice(
                        "downlink: foreign resources the resync did not send again were removed (deleted at their source or out of the routes meanwhile)",
                        metadata: ["removed": .stringConvertible(step.removed)])
                    onCommitted?()
                }
                if !step.done { sweepStale() }
            case .success(nil):
                return
            case .failure(let e):
                staleLeft = true
                sweepFailures += 1
                let after = jitteredBackoff(failures: sweepFailures, cap: Self.maxBackoffMilliseconds)
                logger.warning("downlink: the sweep after a resync failed; it goes on at the next answer, or in \(after) ms: \(e)")
                sweepTimer?.start(after: after) { [weak self] in
                    guard let self, staleLeft else { return }
                    sweepStale()
                }
            }
        }
    }

    public func stop() {
        stopped = true
        timer?.close()
        timer = nil
        sweepTimer?.close()
        sweepTimer = nil
        client.close()
    }

    /// SIGHUP: the rotated certificate is presented on a new connection now.
    public func reloadTLS() throws(TLSError) {
        try tls.reload()
        client.resetConnection()
    }

    private func poll() {
        guard !stopped, !polling, !waiting else { return }
        polling = true
        statistics.polls += 1
        let acked = statistics.appliedThrough
        received = max(received, acked)
        // Waiting for nothing while an answer is being committed would hold its acknowledgement: not then.
        let wait = applying > 0 ? 0 : policy.waitMilliseconds
        var body: JSONObject = [
            "ackedThrough": .number(JSONNumber(integer: Int64(acked))),
            "maxEvents": .int(policy.maxEventsPerPoll), "timeoutMs": .int(wait),
            // Which store acknowledges: a re-imaged one (another epoch) gets the feed again from the start.
            "epoch": .string(store.epoch),
            // Downlink protocol 4: a group's attribute change may come without its members (`attributesEvent`); 5: a resync ends with `resyncCompleteEvent`.
            "protocol": 5,
        ]
        if received > acked { body["after"] = .number(JSONNumber(integer: Int64(received))) }
        // This boundary's decisions on what it acknowledges, for the broker's trace (a broker of protocol 1 ignores them).
        if let r = report?.trimmed(after: reported), r.through <= acked { body["outcomes"] = r.json }
        // The local apps' answers to what entered (protocol 3; `AppOutcomes.swift`): the broker's 200 takes them.
        var apps = takesAppOutcomes ? (try? store.appOutcomes(after: appsTaken)) ?? nil : nil
        // Refused by the broker, their removal not yet committed: not sent again.
        if !appsRefused.isEmpty { apps?.entries.removeAll { appsRefused.contains($0.seq) } }
        if let apps { body["appOutcomes"] = .array(apps.items) }
        let carried = (outcomes: body["outcomes"] != nil, apps: apps)
        let asked = (at: loop.now, wait: UInt64(wait))
        let request = HTTPRequest(
            method: "POST", target: "/federation/v1/feed", headers: ["Content-Type": "application/json"],
            body: JSON.object(body).serialized())
        let generation = self.generation
        client.send(request) { [weak self] result in
            guard let self else { return }
            polling = false
            // Sent before a failure: what it asks for follows what may not be committed; asked for again, by the
            // retry's timer, or now: when that timer fired while this poll was out, it left the next poll to it.
            guard generation == self.generation else { return poll() }
            answered(result, acked: acked, carried: carried, asked: asked)
        }
    }

    private func answered(
        _ result: Result<HTTPResponse, HTTPClientError>, acked: UInt64,
        carried: (outcomes: Bool, apps: AgentStore.PendingAppOutcomes?) = (false, nil), asked: (at: UInt64, wait: UInt64)
    ) {
        let apps = carried.apps
        guard !stopped else { return }
        switch result {
        case .failure(let e):
            retry("broker unreachable: \(e)", after: nil)
        case .success(let r):
            let body = try? JSONParser.parse(r.body, limits: .relayBatch)
            // Only for a refusal: a 200's body (a page of several MiB) is not made a String.
            var description: String { body?["description"]?.stringValue ?? r.bodyText }
            switch r.status {
            case 200:
                guard let events = body?["events"]?.arrayValue else { return retry("broker answered 200 without events", after: nil) }
                statistics.brokerLastSeq = body?["lastSeq"]?.numberValue?.integer.map { UInt64(clamping: $0) } ?? statistics.brokerLastSeq
                reported = max(reported, acked)
                let version = body?["protocol"]?.numberValue?.integer ?? 1
                pipelined = version >= 2
                takesAppOutcomes = version >= 3
                // A broker that said less than 3 ignored them (downgraded): they stay, and go again to one of 3.
                if let apps, version >= 3 { tookAppOutcomes(apps) }
                report = report?.trimmed(after: reported)
                if events.isEmpty {
                    failures = 0
                    // Before the wait asked for (at most a second of it) and without `lastSeq`: the broker answered the
                    // held poll with nothing because a newer poll of this feed took its place (or it stops, or starts a
                    // resync). Once is nothing; in a row, another agent polls with a copy of this store (a cloned data
                    // directory), and the two would take turns at once. (An empty page with `lastSeq` before the wait
                    // is an older broker's poll woken by a change that made no event: polled again at once.)
                    let early = asked.wait > 0 && body?["lastSeq"] == nil && loop.now - asked.at < min(asked.wait, 1000)
                    let pause = early ? idle("empty answers before the wait asked for") : nil
                    if !early { idleRow = 0 }
                    // An answer being committed polls when it is (acknowledging it).
                    if applying > 0 { return }
                    if let pause { return schedule(after: pause) }
                    // The broker held the poll while there was nothing: ask again (at once, unless it may not hold polls).
                    return policy.waitMilliseconds == 0 ? schedule(after: 1000) : poll()
                }
                // Only events committed here already (the broker did not take an acknowledgement): nothing to commit.
                let committed = statistics.appliedThrough
                if events.allSatisfy({ e in e["seq"]?.numberValue?.integer.map { $0 > 0 && UInt64($0) <= committed } ?? false }) {
                    statistics.duplicates += events.count
                    let pause = idle("answers holding only events committed here already")
                    if applying > 0 { return }
                    return pause.map { schedule(after: $0) } ?? poll()
                }
                idleRow = 0
                if let last = events.last?["seq"]?.numberValue?.integer { received = max(received, UInt64(clamping: last)) }
                apply(events)
                if pipelined && applying < Self.maxApplying { poll() }
            case 400 where body?["error"]?.stringValue == "invalid_report":
                // The report only annotates the broker's trace: one it cannot take must not hold the feed.
                let part = body?["report"]?.stringValue ?? ""
                var dropped = ""
                if part == "outcomes" && carried.outcomes {
                    reported = max(reported, acked)
                    report = report?.trimmed(after: reported)
                    dropped = "the outcomes of feed sequences through \(acked)"
                    let store = self.store
                    writer.submit({ txn in try store.dropDownlinkReport(through: acked, in: txn) }) { [weak self] result in
                        if case .failure(let e) = result { self?.logger.warning("downlink: cannot drop the refused report: \(e)") }
                    }
                } else if part == "appOutcomes", let apps, !apps.entries.isEmpty {
                    if let e = body?["entry"] {
                        // An entry this poll did not carry: nothing is dropped on a broker's word that fits no answer.
                        guard let i = e.numberValue?.integer, i >= 0, i < apps.entries.count else {
                            return retry("broker refused an answer this poll did not carry: \(description)", after: nil)
                        }
                        // One answer refused: it goes, the others are sent again.
                        let (seq, item) = apps.entries[Int(i)]
                        dropped = "the local app's answer \(seq) (\(item["trace"]?.stringValue ?? "-"))"
                        appsRefused.insert(seq)
                        let store = self.store
                        writer.submit({ txn in try store.dropAppOutcome(seq, in: txn) }) { [weak self] result in
                            guard let self else { return }
                            if case .failure(let e) = result { return logger.warning("downlink: cannot drop the refused answer: \(e)") }
                            appsRefused.remove(seq)
                        }
                        statistics.appOutcomesRefused += 1
                    } else {
                        dropped = "\(apps.entries.count) local apps' answers"
                        statistics.appOutcomesRefused += apps.entries.count
                        tookAppOutcomes(apps, reported: false)
                    }
                } else {
                    return retry("broker refused the poll: \(r.status) \(description)", after: nil)
                }
                statistics.reportsRefused[part, default: 0] += 1
                logger.error(
                    "downlink: the broker refused this poll's report; what it named is dropped (those traces end without it) and the poll sent again",
                    metadata: ["report": .string(part), "dropped": .string(dropped), "detail": .string(description)])
                poll()
            case 404:
                // No route names this domain: nothing to fetch now (a broker restarted with one is found within a minute).
                retry("the broker has no feed for this domain: \(description)", after: 60)
            case 409 where body?["error"]?.stringValue == "another_store":
                // Another agent of this boundary polls with a store of its own: this one waits (and says so).
                retry("refused: \(description)", after: brokerRetryAfter(r.headers["Retry-After"]))
            case 503 where body?["error"]?.stringValue == "resync":
                restart(after: brokerRetryAfter(r.headers["Retry-After"]) ?? 1)
            case 429, 503:
                retry("broker busy (\(r.status))", after: brokerRetryAfter(r.headers["Retry-After"]))
            default:
                retry("broker refused the poll: \(r.status) \(description)", after: nil)
            }
        }
    }

    /// Commits the events with the sequence they reach, then polls again (acknowledging them).
    /// After a commit that applied events (the local targets look at their queues).
    var onCommitted: (() -> Void)?

    private func apply(_ events: [JSON]) {
        let store = self.store, policy = self.policy, ctx = makeContext(events.first?["txn"]?.stringValue), reported = self.reported
        let generation = self.generation
        applying += 1
        writer.submit({ txn in try store.applyDownlink(events, policy: policy, ctx, reported: reported, in: txn) }) {
            [weak self] result in
            guard let self, !stopped else { return }
            applying -= 1
            switch result {
            case .success(let outcome):
                // Only a commit resets the backoff: a 200 whose events cannot be committed is a failure too.
                failures = 0
                statistics.appliedThrough = max(statistics.appliedThrough, outcome.appliedThrough)
                if var r = outcome.report {
                    r.committed = unixMilliseconds()  // durable now (the stored report has the transaction's time)
                    report = r
                }
                statistics.eventsApplied += outcome.applied
                statistics.membershipDeltas += outcome.membershipDeltas
                statistics.duplicates += outcome.duplicates
                statistics.notAccepted += outcome.notAccepted
                statistics.refused += outcome.refused.count
                // Each refusal logged with its event (looked up by sequence, not by a scan per refusal), at most 20 an answer.
                let bySeq =
                    outcome.refused.isEmpty
                    ? [:]
                    : Dictionary(events.compactMap { e in e["seq"]?.numberValue?.integer.map { ($0, e) } }, uniquingKeysWith: { a, _ in a })
                let refusals = outcome.refused.sorted(by: { $0.key < $1.key })
                if refusals.count > Self.refusalsLogged {
                    logger.warning(
                        "downlink: more accepted resources of one answer could not be stored here than are logged; all are counted",
                        metadata: ["refused": .stringConvertible(refusals.count), "logged": .stringConvertible(Self.refusalsLogged)])
                }
                for (seq, reason) in refusals.prefix(Self.refusalsLogged) {
                    let event = bySeq[Int64(clamping: seq)]
                    logger.warning(
                        "downlink: an accepted resource could not be stored here; it is skipped (counted)",
                        metadata: [
                            "seq": .stringConvertible(seq), "reason": .string(reason),
                            "trace": .string(event?["txn"]?.stringValue ?? ""),
                            "ref": .string(event?["events"]?.objectValue?.members.first?.1["ref"]?.stringValue ?? ""),
                        ])
                }
                if outcome.applied > 0 { onCommitted?() }
                if outcome.resyncCompleted || staleLeft { sweepStale() }
                poll()
            case .failure where generation != self.generation:
                // Fetched before a failure: it follows an answer that was not committed. Fetched again from what was,
                // by the retry's timer, or now: an empty answer that came meanwhile left the next poll to this commit.
                received = statistics.appliedThrough
                poll()
            case .failure(let gap as DownlinkGap):
                protocolError("\(gap)")
            case .failure(let e):
                retry("cannot store the feed's events: \(e)", after: nil)
            }
        }
    }

    /// The broker starts the feed again (this store, or the broker's, is not
    /// the one the other side knew): count from 0, durably, then poll. The
    /// current state arrives again; what is held is updated in place.
    private func restart(after seconds: UInt64) {
        logger.warning("downlink: the broker starts the feed again; counting from 0")
        statistics.resyncs += 1
        waiting = true  // no poll until the restart is committed (an answer being committed before it may finish first)
        generation += 1
        idleRow = 0
        let store = self.store
        writer.submit({ txn in try store.restartDownlink(in: txn) }) { [weak self] result in
            guard let self, !stopped else { return }
            if case .failure(let e) = result { return retry("cannot record the feed's restart: \(e)", after: nil) }
            statistics.appliedThrough = 0
            (received, reported, report) = (0, 0, nil)
            schedule(after: seconds * 1000)
        }
    }

    private func protocolError(_ message: String) {
        statistics.protocolErrors += 1
        logger.error("downlink: protocol error: \(message); nothing applied, resetting the connection")
        client.resetConnection()
        retry("protocol error: \(message)", after: nil)
    }

    /// Counts an answer that brought nothing new; the wait before the next
    /// poll: none for the first of a row (a poll taken over once, a resend),
    /// then 125–250 ms, doubling to 2.5–5 s (jittered in the upper half), so
    /// that two agents polling with one store, or a broker ignoring
    /// acknowledgements, do not loop at once. Said once a row, at its third.
    private func idle(_ what: String) -> UInt64? {
        statistics.idleAnswers += 1
        idleRow += 1
        if idleRow == 3 {
            logger.warning(
                "downlink: the broker keeps answering with nothing new; polls are spaced out (up to 5 s) until it sends something. Another agent may poll this feed with a copy of this store (a cloned data directory: give each its own), or the broker does not take the acknowledgements",
                metadata: ["kind": .string(what)])
        }
        guard idleRow >= 2 else { return nil }
        let wait = min(Self.maxIdleWaitMilliseconds, 250 << UInt64(min(idleRow - 2, 5)))
        return wait / 2 + UInt64.random(in: 0...wait / 2)
    }
    static let maxIdleWaitMilliseconds: UInt64 = 5_000

    /// Polls again after the broker's Retry-After (seconds) or a jittered backoff.
    private func retry(_ message: String, after seconds: UInt64?) {
        // What was received and not committed is asked for again (answers still being committed may yet be).
        generation += 1
        received = statistics.appliedThrough
        failures += 1
        statistics.errors += 1
        statistics.lastError = message
        logger.warning("downlink: \(message)")
        schedule(after: seconds.map { $0 * 1000 } ?? jitteredBackoff(failures: failures, cap: Self.maxBackoffMilliseconds))
    }

    /// The broker has the apps' answers through outbox sequence `through`
    /// (or refused them: `reported` false): they go from the store, and so
    /// do the damaged records among them (logged, counted).
    private func tookAppOutcomes(_ apps: AgentStore.PendingAppOutcomes, reported: Bool = true) {
        let through = apps.through
        appsTaken = max(appsTaken, through)
        if reported { statistics.appOutcomesReported += apps.entries.count }
        if !apps.unreadable.isEmpty {
            statistics.appOutcomesUnreadable += apps.unreadable.count
            logger.error(
                "downlink: local apps' answers kept for the broker could not be read; they are dropped (those traces end at the boundary)",
                metadata: ["sequences": .string(apps.unreadable.map(String.init).joined(separator: ","))])
        }
        let store = self.store
        writer.submit({ txn in try store.dropAppOutcomes(through: through, in: txn) }) { [weak self] result in
            if case .failure(let e) = result {
                self?.logger.warning("downlink: cannot drop the reported app answers (sent again after a restart): \(e)")
            }
        }
    }

    private func schedule(after milliseconds: UInt64) {
        waiting = true
        timer?.start(after: milliseconds) { [weak self] in
            self?.waiting = false
            self?.poll()
        }
    }
}
