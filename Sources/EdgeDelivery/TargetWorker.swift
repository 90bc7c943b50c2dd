import EdgeHTTP
import EdgeLoop
import EdgeStore
import EdgeTLS
import Glibc
import Logging
import SCIM

/// Per-target counters for metrics and status.
public struct TargetStatistics: Sendable {
    public static let latencyBuckets: [Double] = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60]
    /// "METHOD class" (e.g. "POST 2xx", "PATCH 4xx", "DELETE error") → count.
    public var requests: [String: Int] = [:]
    public var delivered = 0
    public var deadLettered = 0
    public var retries = 0
    public var throttled = 0
    public var adopted = 0
    /// Group PATCHes sent from the member index (`groupDelta`).
    public var memberSteps = 0
    /// Group deliveries that read the whole group (O(n): no PATCH, `collisions: link`, member routes, an old store).
    public var wholeGroupReads = 0
    /// Changes refused because the account belongs to another resource.
    public var collisions = 0
    public var latencyCounts = [Int](repeating: 0, count: TargetStatistics.latencyBuckets.count)
    public var latencyCount = 0
    public var latencySum = 0.0
    public var breakerOpened = 0
    public var lastError: String?

    mutating func observe(latency seconds: Double) {
        latencyCount += 1
        latencySum += seconds
        for (i, b) in Self.latencyBuckets.enumerated() where seconds <= b { latencyCounts[i] += 1 }
    }
}

/// Delivers one target's queue: resources in queue order per resource,
/// different resources concurrently (adaptive, at most `concurrency`),
/// within the target's request rate; retries with backoff and jitter;
/// 429/503 honour `Retry-After`; other 4xx become dead letters; a circuit
/// breaker on sustained failure; the deletion guard; a pause while the
/// target refuses the credentials.
///
/// Composed from the parts in this module, each tested alone: the rate
/// (`TokenBucket`), the window (`AdaptiveLimit`), the breaker
/// (`CircuitBreaker`), the guard (`DeletionGate`), the retry schedule
/// (`RetrySchedule`), the credentials pause (`CredentialsPause`), and the
/// SCIM requests and answers (`SCIMOperations`). This file schedules and
/// completes deliveries; `TargetWorker+Operations.swift` and
/// `TargetWorker+Groups.swift` run them. It reads the clock it is given
/// (`DeliveryClock`) and reaches the target through a `TargetTransport`,
/// so that tests drive it on a simulated clock against a simulated target.
/// The broker runs one per app target; an agent one per local target.
/// Threading: loop-confined.
public final class TargetWorker {
    public let target: TargetConfiguration
    let store: any DeliveryTables
    let writer: GroupCommitWriter
    let loop: EventLoop
    let clock: DeliveryClock
    var logger: Logger
    let transport: any TargetTransport
    var random: DeliveryRandom
    var token: String?
    /// Where its operator commands live, for what the log tells an operator (`scim-broker`, `scim-edge`).
    let command: String
    public internal(set) var capabilities: TargetCapabilities?
    public internal(set) var statistics = TargetStatistics()
    /// Acceptance → target answer, recent samples.
    public internal(set) var recent = RecentSamples()

    struct Pending {
        let key: [UInt8]
        let item: DeliveryItem
        var attempts = 0
        var waits = 0
        var notBefore: UInt64 = 0
        var dispatched = false
        let recovered: Bool
    }
    var pending: [Pending] = []
    private var lastLoaded: [UInt8]?
    private var recoveredThrough: [UInt8]?
    /// Serial keys of the deliveries under way: delivery ids, and the link
    /// values of linked accounts (`DeliveryItem.serialKeys`).
    var inFlight: Set<String> = []
    var inFlightCount = 0
    /// Accounts two users or more share (`collisions: link`), from the store.
    public private(set) var linkedAccounts = 0
    /// Adaptive concurrency (AIMD), between 1 and `target.concurrency`.
    var concurrency: AdaptiveLimit
    public var limit: Double { concurrency.value }
    /// The target's request rate.
    var bucket: TokenBucket
    /// Nothing is sent before this (a throttle's Retry-After).
    var pausedUntil: UInt64 = 0
    var breaker: CircuitBreaker
    var deletionGate: DeletionGate
    /// Set while the target refuses the credentials (401/403) or the TLS
    /// handshake: nothing is sent but one probe now and then; the queue stays.
    var credentialsPause: CredentialsPause?
    /// Resource types whose PATCH the target answered 501.
    var patchNotImplemented: Set<String> = []
    /// The form of member removal this target takes: learnt from a 501 to
    /// the other one (kept for this run; a restart costs one more 501).
    var memberRemoval = MemberRemovalForm.filter
    /// Items queued and not yet completed: counted at start, then what each
    /// `kick` finds queued after `counted`, less what completes (counted
    /// again from LMDB every 10 s).
    public private(set) var depth = 0
    /// The last queue key `depth` counts.
    private var counted: [UInt8]?
    public private(set) var oldestQueuedAt: Int64 = 0
    private var timer: LoopTimer?
    private var ticks = 0
    private var discoveryAttempts = 0
    private var nextDiscovery: UInt64 = 0
    private var discovering = false
    private var stopped = false
    static let window = 2048
    static let maxMemberWaits = 40
    /// The timer's period: every tick pumps; every 40th refreshes from the store.
    package static let tickMilliseconds: UInt64 = 25

    public enum BreakerState: String, Sendable { case closed, open, halfOpen = "half-open" }

    public var breakerState: BreakerState { BreakerState(rawValue: breaker.state(now: clock.monotonic()).rawValue)! }

    public var deletesPaused: Bool { deletionGate.paused }
    /// Paused because the target refuses the credentials or the TLS handshake.
    public var credentialsRefused: Bool { credentialsPause != nil }

    /// `transport` nil: kept-alive HTTP connections to the target's URL.
    package init(
        target: TargetConfiguration, store: any DeliveryTables, writer: GroupCommitWriter, loop: EventLoop,
        logLabel: String = "scim-broker.target", command: String = "scim-broker", clock: DeliveryClock = .system,
        transport: (any TargetTransport)? = nil, random: DeliveryRandom = .system
    ) throws {
        self.target = target
        self.store = store
        self.writer = writer
        self.loop = loop
        self.clock = clock
        self.random = random
        self.command = command
        logger = Logger(label: logLabel)
        logger[metadataKey: "target"] = .string(target.name)
        concurrency = AdaptiveLimit(maximum: target.concurrency)
        bucket = TokenBucket(requestsPerSecond: target.requestsPerSecond, now: clock.monotonic())
        breaker = CircuitBreaker(threshold: target.breakerThreshold)
        deletionGate = DeletionGate(maxDeletes: target.deletionGuard.maxDeletes, windowSeconds: target.deletionGuard.windowSeconds)
        token = try target.resolveToken()
        self.transport = try transport ?? HTTPTargetTransport(target: target, loop: loop)
    }

    /// `timer` false: the caller drives `tick()` (tests on a simulated clock).
    package func start(timer: Bool = true) throws {
        let depth = try store.queueCount(target: target.name)
        self.depth = depth.count
        oldestQueuedAt = depth.oldest
        recoveredThrough = depth.last
        counted = depth.last
        let g = try store.deletionGuard(target: target.name)
        deletionGate.refresh(pausedSince: g.pausedSince, confirmedAt: g.confirmedAt, rejectedAt: g.rejectedAt)
        if timer {
            let t = try LoopTimer(loop: loop)
            t.keepsLoopAlive = false
            t.start(after: Self.tickMilliseconds, repeatEvery: Self.tickMilliseconds) { [weak self] in self?.tick() }
            self.timer = t
        }
        discover()
    }

    /// SIGHUP: the token file, the CA and the client certificate may have been rotated.
    package func reload() {
        do { token = try target.resolveToken() } catch { logger.error("cannot reload the token: \(error)") }
        do { try transport.reloadTLS() } catch { logger.error("cannot reload the target's TLS files, keeping the old ones: \(error)") }
        if credentialsPause != nil {
            credentialsPause?.probeNow()  // try the new credentials now
            pump()
        }
        if capabilities == nil { nextDiscovery = 0 }  // a discovery refused for its credentials, too
    }

    package func stop() {
        stopped = true
        timer?.close()
        timer = nil
        transport.close()
    }

    /// New items may have been queued (by an apply, a write at the agent, a
    /// delivery's completion, another process): they are counted (the keys
    /// after the last one counted, O(new)), loaded and sent.
    package func kick() {
        if let new = try? store.queuedSince(target: target.name, after: counted), new.count > 0 {
            depth += new.count
            counted = new.last
            if oldestQueuedAt == 0 { oldestQueuedAt = clock.unix() }
        }
        load()
        pump()
    }

    /// One period of the timer: pumps, and every 40th refreshes from the store.
    package func tick() {
        ticks += 1
        if ticks % 40 == 0 { refreshFromStore() }
        if capabilities == nil { discover() }
        pump()
    }

    /// Every second: the deletion guard (the CLI changes it), new items queued
    /// by other processes (dead-letter retries, reconciliation), and the status
    /// snapshot `targets status` reads, saved when it changed (or every 10 s).
    /// The queue is counted every 10 s (a scan of the whole queue); in
    /// between, `kick` and completions keep the count (items other processes
    /// queue show up at the next count).
    private func refreshFromStore() {
        let recount = ticks % 400 == 0
        if recount, let d = try? store.queueCount(target: target.name) { (depth, oldestQueuedAt, counted) = (d.count, d.oldest, d.last) }
        // After a rejection, the guard changes only once the rejected removals are out of `pending`.
        if let g = try? store.deletionGuard(target: target.name), g.rejectedAt == deletionGate.rejectedAt || dropRejectedRemovals() {
            switch deletionGate.refresh(pausedSince: g.pausedSince, confirmedAt: g.confirmedAt, rejectedAt: g.rejectedAt) {
            case .confirmed?: logger.notice("removals released by confirm-deletes")
            case .rejected?: logger.notice("removals resume: reject-deletes dropped the ones held")
            case nil: break
            }
        }
        if target.collisions.linkPolicy != nil, let n = try? store.linkedAccounts(target: target.name) { linkedAccounts = n }
        load()
        var snapshot = statusDocument()
        snapshot["updatedAt"] = nil
        guard recount || snapshot != lastSavedStatus else { return }
        lastSavedStatus = snapshot
        snapshot["updatedAt"] = .number(JSONNumber(integer: clock.unix()))
        let store = self.store, name = target.name, saved = snapshot
        writer.submit({ txn in try store.saveStatus(target: name, saved, txn) }) { _ in }
    }

    private var lastSavedStatus: JSONObject?

    public func statusDocument() -> JSONObject {
        var o: JSONObject = [
            "target": .string(target.name), "url": .string(target.url),
            "state": .string(
                capabilities == nil
                    ? "discovering"
                    : credentialsPause != nil
                        ? "credentials-refused"
                        : deletionGate.paused ? "deletes-paused" : breakerState.rawValue),
            "breaker": .string(breakerState.rawValue),
            "queued": .int(depth), "oldestQueuedAt": .number(JSONNumber(integer: oldestQueuedAt)),
            "inFlight": .int(inFlightCount), "concurrency": .int(Int(limit)),
            "delivered": .int(statistics.delivered), "deadLettered": .int(statistics.deadLettered),
            "retries": .int(statistics.retries), "throttled": .int(statistics.throttled), "adopted": .int(statistics.adopted),
            "deletesPaused": .bool(deletionGate.paused), "updatedAt": .number(JSONNumber(integer: clock.unix())),
        ]
        if target.collisions.linkPolicy != nil { o["linked"] = .int(linkedAccounts) }
        if let c = capabilities {
            o["capabilities"] = ["patch": .bool(c.patch), "bulk": .bool(c.bulk), "filter": .bool(c.filter), "etag": .bool(c.etag)]
        }
        if let e = statistics.lastError { o["lastError"] = .string(e) }
        if let p = credentialsPause {
            o["credentialsRefused"] = ["since": .number(JSONNumber(integer: p.since)), "reason": .string(p.reason)]
        }
        return o
    }

    // MARK: discovery

    private func discover() {
        guard !discovering, !stopped, clock.monotonic() >= nextDiscovery else { return }
        if let why = transport.unreachable() {
            statistics.lastError = why
            discoveryAttempts += 1
            nextDiscovery = clock.monotonic() + RetrySchedule.backoff(discoveryAttempts, using: &random)
            return
        }
        discovering = true
        send(
            HTTPRequest(
                method: "GET", target: target.basePath + "/ServiceProviderConfig", headers: SCIMOperations.headers(token: token, trace: "")),
            method: "GET", nil
        ) { [weak self] result in
            guard let self else { return }
            discovering = false
            if case .success(let r) = result, r.status == 200, let doc = try? JSONParser.parse(r.body), doc.objectValue != nil {
                capabilities = TargetCapabilities(doc)
                logger.info(
                    "target capabilities",
                    metadata: [
                        "patch": .stringConvertible(capabilities!.patch), "filter": .stringConvertible(capabilities!.filter),
                        "etag": .stringConvertible(capabilities!.etag), "bulk": .stringConvertible(capabilities!.bulk),
                    ])
                load()
                pump()
            } else {
                discoveryAttempts += 1
                let why: String
                switch result {
                case .success(let r): why = "GET /ServiceProviderConfig answered \(r.status)"
                case .failure(let e): why = "GET /ServiceProviderConfig: \(e)"
                }
                statistics.lastError = why
                if case .failure = result { transport.reset() }
                if discoveryAttempts == 1 || discoveryAttempts % 10 == 0 {
                    logger.warning("target not ready", metadata: ["error": .string(why)])
                }
                nextDiscovery = clock.monotonic() + RetrySchedule.backoff(discoveryAttempts, using: &random)
            }
        }
    }

    // MARK: scheduling

    private func load() {
        guard pending.count < Self.window / 2 || lastLoaded == nil else { return }
        guard let items = try? store.queued(target: target.name, after: lastLoaded, limit: Self.window - pending.count) else { return }
        for (key, item) in items {
            let recovered = recoveredThrough.map { !$0.lexicographicallyPrecedes(key) } ?? false
            pending.append(Pending(key: key, item: item, recovered: recovered))
            lastLoaded = key
            if counted.map({ $0.lexicographicallyPrecedes(key) }) ?? true {
                depth += 1  // queued by another process since the last kick
                counted = key
            }
        }
    }

    private var pumping = false
    private var repump = false

    func pump() {
        guard capabilities != nil, !stopped else { return }
        if pumping { repump = true; return }
        pumping = true
        repeat {
            repump = false
            pumpOnce()
        } while repump
        pumping = false
    }

    private func pumpOnce() {
        let now = clock.monotonic()
        guard now >= pausedUntil else { return }
        var allowed = Int(limit)
        if let pause = credentialsPause {
            guard pause.mayProbe(now: now), inFlight.isEmpty else { return }
            allowed = 1  // one change probes the credentials
        }
        switch breakerState {
        case .closed: break
        case .open: return
        case .halfOpen: allowed = 1  // one probe
        }
        var blocked: Set<String> = []
        var i = 0
        while i < pending.count, inFlightCount < allowed {
            let p = pending[i]
            let serial = p.item.serialKeys
            defer { i += 1 }
            if p.dispatched || serial.contains(where: { inFlight.contains($0) || blocked.contains($0) }) {
                blocked.formUnion(serial)
                continue
            }
            blocked.formUnion(serial)  // later items of this resource (and of its linked account) wait for this one
            if p.notBefore > now { continue }
            guard bucket.available(now: now) else { break }
            // A removal is counted by the guard only when it is sent now.
            if p.item.operation != .upsert && !removalAllowed(p.item, now) { continue }
            _ = bucket.take(now: now)
            dispatch(i)
        }
    }

    /// The deletion guard (`DeletionGate`); a trip is stored and logged.
    private func removalAllowed(_ item: DeliveryItem, _ now: UInt64) -> Bool {
        switch deletionGate.admit(queuedAt: item.queuedAt, now: now, unixNow: clock.unix()) {
        case .pass: return true
        case .held: return false
        case .tripped(let since):
            logger.error(
                "deletion guard: removals paused until `\(command) targets confirm-deletes \(target.name)`",
                metadata: [
                    "removals": .stringConvertible(deletionGate.window.times.count),
                    "windowSeconds": .stringConvertible(target.deletionGuard.windowSeconds),
                ])
            let store = self.store, name = target.name, confirmed = deletionGate.confirmedAt
            writer.submit({ txn in try store.setDeletionGuard(target: name, pausedSince: since, confirmedAt: confirmed, txn) }) { _ in }
            return false
        }
    }

    /// `reject-deletes` dropped held removals from the queue (and may have
    /// lifted the pause): forgets the copies loaded before, so they are never
    /// sent. Read after the guard, so it sees that transaction. False when
    /// the queue cannot be read (the guard's old state then stays).
    private func dropRejectedRemovals() -> Bool {
        let held = pending.filter { !$0.dispatched && $0.item.operation != .upsert }.map(\.key)
        guard let gone = try? store.missingQueueKeys(held) else { return false }
        pending.removeAll { !$0.dispatched && gone.contains($0.key) }
        depth = max(0, depth - gone.count)
        if !gone.isEmpty { logger.notice("held removals rejected by the operator", metadata: ["removals": .stringConvertible(gone.count)]) }
        return true
    }

    /// Sends the item at `index` with the later items of the same resource
    /// and operation (they all mean "deliver the current state").
    private func dispatch(_ index: Int) {
        let first = pending[index]
        let id = first.item.brokerID
        var keys: [[UInt8]] = []
        // Every folded item's serial keys are held (a later item of the
        // resource may name another linked account); one whose account is
        // under way in another delivery is not folded.
        var serial = Set(first.item.serialKeys)
        for j in index..<pending.count where pending[j].item.brokerID == id && !pending[j].dispatched {
            if pending[j].item.operation != first.item.operation || pending[j].item.account != first.item.account { break }
            let more = pending[j].item.serialKeys.filter { !serial.contains($0) }
            if more.contains(where: { inFlight.contains($0) }) { break }
            serial.formUnion(more)
            pending[j].dispatched = true
            keys.append(pending[j].key)
        }
        inFlight.formUnion(serial)
        inFlightCount += 1
        steps[id] = nil
        var delivery = Delivery(
            item: first.item, keys: keys, serialKeys: serial, attempts: first.attempts, waits: first.waits, recovered: first.recovered)
        do {
            if let account = first.item.account {
                // A stray named by its account: deactivated, and no mapping recorded.
                delivery.mapping = TargetMapping(targetID: account, etag: nil, sent: nil)
                delivery.recordsMapping = false
            } else {
                delivery.mapping = try store.mapping(target: target.name, brokerID: id)
            }
        } catch {
            finish(delivery, .storeError("cannot read the mapping: \(error)"))
            return
        }
        switch first.item.operation {
        case .upsert: upsert(delivery)
        case .remove: remove(delivery, deactivate: target.removal == .deactivate && first.item.type == "User")
        case .deactivate: remove(delivery, deactivate: first.item.type == "User")
        }
    }

    struct Delivery {
        let item: DeliveryItem
        let keys: [[UInt8]]
        /// What it holds in `inFlight`: the serial keys of every item folded into it.
        let serialKeys: Set<String>
        var attempts: Int
        var waits: Int
        let recovered: Bool
        var mapping: TargetMapping?
        var adopted = false
        var redirected = 0
        /// Steps whose answer showed members other than those sent (a target
        /// that drops members on POST or PUT): bounded, so that one that
        /// never takes them ends as a dead letter, not a loop.
        var readBacks = 0
        /// A group's membership change, worked out once and sent in steps
        /// (`updateGroup`): O(n) for the delivery, O(chunk) per step.
        var plan: MemberPlan?
        /// A group's change sent from the member index (`groupDelta`).
        var delta: DeltaPlan?
        /// A new group created with its first members only: it is grown from the index next.
        var growAfter = false
        /// `collisions: link`: the value and the users that share the account
        /// (each gets its mapping on success).
        var linkValue: String?
        var linked: [String] = []
        /// The user left an account it shared: that account is the others'
        /// and may neither be adopted nor looked up as this user's.
        var leftLink = false
        var recordsMapping = true
    }

    typealias Outcome = DeliveryOutcome

    // MARK: the wire

    func request(_ method: String, _ path: String, _ d: Delivery, body: [UInt8]) -> HTTPRequest {
        SCIMOperations.request(method, path, token: token, trace: d.item.trace, body: body)
    }

    /// Sends one request (of delivery `d`: its method, path and answer are
    /// kept as one of the delivery's steps, which the hop lists: `trace`,
    /// `targets push`).
    func send(
        _ request: HTTPRequest, method: String, _ d: Delivery?, _ completion: @escaping (Result<HTTPResponse, HTTPClientError>) -> Void
    ) {
        let id = d?.item.brokerID, path = request.target
        if let why = transport.unreachable() {
            step(id, method, path, nil, why)
            completion(.failure(.connectFailed(why)))
            return
        }
        transport.send(request) { [weak self] result in
            guard let self else { return }
            let label: String
            switch result {
            case .success(let r):
                label = "\(method) \(r.status / 100)xx"
                step(id, method, path, r.status, nil)
            case .failure(let e):
                label = "\(method) error"
                step(id, method, path, nil, "\(e)")
            }
            statistics.requests[label, default: 0] += 1
            completion(result)
        }
    }

    /// The requests of the deliveries in flight, by delivery id (at most
    /// `maxSteps` each: a long membership change keeps its first ones).
    var steps: [String: [JSON]] = [:]
    static let maxSteps = 16

    private func step(_ id: String?, _ method: String, _ path: String, _ status: Int?, _ error: String?) {
        guard let id, steps[id, default: []].count < Self.maxSteps else { return }
        var o: JSONObject = ["method": .string(method), "path": .string(path)]
        if let status { o["status"] = .int(status) }
        if let error { o["error"] = .string(String(error.prefix(200))) }
        steps[id, default: []].append(.object(o))
    }

    // MARK: completion

    func finish(_ d: Delivery, _ outcome: Outcome) {
        let id = d.item.brokerID
        let now = clock.monotonic()
        func release(retryAt: UInt64?, countAttempt: Bool, wait: Bool = false) {
            endFlight(d)
            steps[id] = nil
            // A removal rejected by the operator while it was in flight is gone
            // from the queue: it must not be tried again. (A failed read keeps it:
            // the next refresh looks again.)
            var rejected: Set<[UInt8]> = []
            if d.item.operation != .upsert, let gone = try? store.missingQueueKeys(d.keys) { rejected = gone }
            if !rejected.isEmpty {
                pending.removeAll { rejected.contains($0.key) }
                depth = max(0, depth - rejected.count)
            }
            for j in pending.indices where d.keys.contains(pending[j].key) {
                pending[j].dispatched = false
                if countAttempt { pending[j].attempts += 1 }
                if wait { pending[j].waits += 1 }
                if let retryAt { pending[j].notBefore = retryAt }
            }
            pump()
        }
        switch outcome {
        case .waitForMembers:
            release(retryAt: now + 250, countAttempt: false, wait: true)
        case .forbidden(let method, let path, let request, let response):
            // One page of one resource, about no change: it answers whether the credentials work.
            let check = SCIMOperations.credentialsCheckPath(target.basePath, type: d.item.type)
            send(self.request("GET", check, d, body: []), method: "GET", d) { [weak self] result in
                self?.finish(
                    d,
                    SCIMOperations.afterForbidden(
                        result, checkPath: check, method: method, path: path, request: request, response: response))
            }
        case .credentialsRefused(let why):
            statistics.lastError = why
            var pause = credentialsPause ?? CredentialsPause(reason: why, since: clock.unix())
            pause.refused(why, now: now)
            if credentialsPause == nil {
                logger.error(
                    "target refused the credentials: paused with its queue kept until they work again (SIGHUP re-reads the token)",
                    metadata: ["error": .string(why)])
            }
            credentialsPause = pause
            release(retryAt: nil, countAttempt: false)
        case .throttled(let retryAfter, let status):
            statistics.throttled += 1
            statistics.lastError = "target answered \(status)"
            concurrency.decrease()
            pausedUntil = now + RetrySchedule.throttlePause(retryAfterSeconds: retryAfter)
            release(retryAt: pausedUntil, countAttempt: false)
        case .retry(let why):
            statistics.retries += 1
            statistics.lastError = why
            concurrency.decrease()
            if let cooldown = breaker.failure(now: now) {
                statistics.breakerOpened += 1
                transport.reset()  // resolve again before the probe
                logger.error(
                    "circuit breaker open",
                    metadata: [
                        "failures": .stringConvertible(breaker.consecutiveFailures),
                        "cooldownMs": .stringConvertible(cooldown), "error": .string(why),
                    ])
            } else if d.attempts == 0 || d.attempts % 10 == 0 {
                logger.warning("delivery failed, will retry", metadata: ["brokerId": .string(id), "error": .string(why)])
            }
            release(retryAt: now + RetrySchedule.backoff(d.attempts + 1, using: &random), countAttempt: true)
        case .storeError(let why):
            statistics.retries += 1
            statistics.lastError = why
            if d.attempts == 0 || d.attempts % 10 == 0 {
                logger.error(
                    "cannot read the store for a delivery; it stays queued and is retried",
                    metadata: ["brokerId": .string(id), "error": .string(why)])
            }
            release(retryAt: now + RetrySchedule.backoff(d.attempts + 1, using: &random), countAttempt: true)
        case .done(let mapping, let method, let status):
            // Only an answer says the target is up (or takes the credentials): a
            // delivery with nothing to send leaves the breaker and a pause as they are.
            if method != nil { succeeded() }
            var hop: JSONObject = ["hop": .string("target \(target.name)"), "event": .string(d.item.operation.rawValue)]
            if let method { hop["method"] = .string(method) }
            if let status { hop["status"] = .int(status) }
            if method == nil { hop["detail"] = "nothing to send" }
            complete(d, mapping: mapping, deadLetter: nil, hop: hop)
        case .deadLetter(let method, let path, let request, let status, let response):
            succeeded()  // the target answered: it is up
            statistics.deadLettered += 1
            statistics.lastError = "\(method) \(path) answered \(status)"
            logger.error(
                "delivery refused by the target: dead letter",
                metadata: [
                    "brokerId": .string(id), "method": .string(method), "status": .stringConvertible(status),
                    "trace": .string(d.item.trace),
                ])
            var letter: JSONObject = [
                "id": .string(id), "type": .string(d.item.type), "op": .string(d.item.operation.rawValue), "trace": .string(d.item.trace),
                "method": .string(method), "path": .string(path), "request": .string(request), "status": .int(status),
                "response": .string(response), "at": .number(JSONNumber(integer: clock.unix())),
            ]
            // A retry queues the item as it was: the stray's account, the linked account's value.
            if let account = d.item.account { letter["account"] = .string(account) }
            if let link = d.item.link { letter["link"] = .string(link) }
            complete(
                d, mapping: d.adopted ? .some(d.mapping) : .none, deadLetter: letter,
                hop: [
                    "hop": .string("target \(target.name)"), "event": .string(d.item.operation.rawValue), "method": .string(method),
                    "status": .int(status), "detail": "dead letter",
                ])
        }
    }

    private func endFlight(_ d: Delivery) {
        inFlight.subtract(d.serialKeys)
        inFlightCount = max(0, inFlightCount - 1)
    }

    private func succeeded() {
        if let pause = credentialsPause {
            logger.notice(
                "target accepts the credentials again: resumed",
                metadata: ["pausedSeconds": .stringConvertible((clock.unix() - pause.since) / 1000)])
            credentialsPause = nil
        }
        if breaker.success() { logger.notice("circuit breaker closed") }
        concurrency.increase()
    }

    private func complete(_ d: Delivery, mapping: TargetMapping??, deadLetter: JSONObject?, hop given: JSONObject) {
        var hop = given
        if let taken = steps.removeValue(forKey: d.item.brokerID), !taken.isEmpty { hop["steps"] = .array(taken) }
        if d.item.acceptedAt > 0 { hop["accepted"] = .number(JSONNumber(integer: d.item.acceptedAt)) }
        hop["applied"] = .number(JSONNumber(integer: d.item.queuedAt))
        let store = self.store, name = target.name, keys = d.keys, id = d.item.brokerID, trace = d.item.trace, finalHop = hop
        let type = d.item.type, domain = d.item.domain
        // A linked account's mapping says under which value it is shared; every user sharing it gets it.
        var recorded =
            !d.recordsMapping
            ? .none
            : d.linkValue == nil
                ? mapping
                : mapping.map {
                    $0.map { m in
                        var m = m; m.link = d.linkValue; return m
                    }
                }
        let linked = d.linked
        if d.growAfter, case .some(.some(var m)) = recorded {
            m.growFrom = ""  // created with its first members: grown from the index next
            recorded = .some(m)
        }
        let final = recorded
        // What a group's mapping says of its members there (`TargetMembers.swift`).
        let indexing: GroupIndexing = d.delta.map { .keep(done: $0.done) } ?? (indexesGroupMembers ? .rebuild : .none)
        writer.submit({ txn in
            try store.completeDelivery(
                target: name, keys: keys, brokerID: id, type: type, mapping: final, linked: linked,
                deadLetter: deadLetter, hop: finalHop, trace: trace, indexing: indexing, domain: domain, txn)
        }) { [weak self] result in
            guard let self else { return }
            endFlight(d)
            switch result {
            case .success(let queued):
                // A user's account changed there: the groups it joins or leaves were queued.
                if queued > 0 { kick() }
                let done = Set(keys)
                pending.removeAll { done.contains($0.key) }
                depth = max(0, depth - keys.count)
                if deadLetter == nil {
                    statistics.delivered += 1
                    let from = d.item.acceptedAt > 0 ? d.item.acceptedAt : d.item.queuedAt
                    let now = clock.unix(), seconds = Double(max(0, now - from)) / 1000
                    statistics.observe(latency: seconds)
                    recent.add(at: now, seconds: seconds)
                }
            case .failure(let error):
                logger.error("cannot record a delivery; it will be repeated", metadata: ["error": .string("\(error)")])
                for j in pending.indices where keys.contains(pending[j].key) {
                    pending[j].dispatched = false
                    pending[j].notBefore = clock.monotonic() + 1000
                }
            }
            pump()
        }
    }
}

extension DeliveryClock {
    /// The process's clocks (`Clock.swift`).
    public static let system = DeliveryClock(monotonic: { monotonicMilliseconds() }, unix: { unixMilliseconds() })
}
