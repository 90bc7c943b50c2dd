import EdgeHTTP
import EdgeLoop
import EdgeStore
import EdgeTLS
import Glibc
import Logging
import SCIM

/// What a target said it supports (`/ServiceProviderConfig`).
public struct TargetCapabilities: Sendable, Equatable {
    public var patch = false
    public var bulk = false
    public var filter = false
    public var etag = false

    init(_ config: JSON) {
        patch = config["patch"]?["supported"]?.boolValue ?? false
        bulk = config["bulk"]?["supported"]?.boolValue ?? false
        filter = config["filter"]?["supported"]?.boolValue ?? false
        etag = config["etag"]?["supported"]?.boolValue ?? false
    }
}

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
/// breaker on sustained failure; the deletion guard. Threading: loop-confined.
public final class TargetWorker {
    public let target: TargetConfiguration
    let store: BrokerStore
    let writer: GroupCommitWriter
    let loop: EventLoop
    var logger: Logger
    private var clients: [HTTPClient] = []
    private var token: String?
    public private(set) var capabilities: TargetCapabilities?
    public private(set) var statistics = TargetStatistics()
    /// Agent acceptance → target answer, recent samples.
    var recent = RecentSamples()

    private struct Pending {
        let key: [UInt8]
        let item: DeliveryItem
        var attempts = 0
        var waits = 0
        var notBefore: UInt64 = 0
        var dispatched = false
        let recovered: Bool
    }
    private var pending: [Pending] = []
    private var lastLoaded: [UInt8]?
    private var recoveredThrough: [UInt8]?
    /// Serial keys of the deliveries under way: broker ids, and the link
    /// values of linked accounts (`DeliveryItem.serialKeys`).
    private var inFlight: Set<String> = []
    private var inFlightCount = 0
    /// Accounts two users or more share (`collisions: link`), from the store.
    public private(set) var linkedAccounts = 0
    /// Adaptive concurrency (AIMD), between 1 and `target.concurrency`.
    private var concurrency: AdaptiveLimit
    public var limit: Double { concurrency.value }
    /// The target's request rate.
    private var bucket: TokenBucket
    private var pausedUntil: UInt64 = 0
    private var breaker: CircuitBreaker
    private var removals: RemovalWindow
    private var guardPausedSince: Int64?
    private var guardConfirmedAt: Int64 = 0
    /// Set while the target refuses the credentials (401/403) or the TLS
    /// handshake: nothing is sent but one probe now and then; the queue stays.
    struct CredentialsPause {
        var reason: String
        let since: Int64
        var probeAt: UInt64 = 0
        var probes = 0
    }
    private var credentialsPause: CredentialsPause?
    /// Resource types whose PATCH the target answered 501.
    private var patchNotImplemented: Set<String> = []
    /// The form of member removal this target takes: learnt from a 501 to
    /// the other one (kept for this run; a restart costs one more 501).
    private(set) var memberRemoval = MemberRemovalForm.filter
    private var guardRejectedAt: Int64 = 0
    /// Items queued and not yet completed (refreshed from LMDB periodically).
    public private(set) var depth = 0
    public private(set) var oldestQueuedAt: Int64 = 0
    private var timer: LoopTimer?
    private var ticks = 0
    private var discoveryAttempts = 0
    private var nextDiscovery: UInt64 = 0
    private var discovering = false
    private var stopped = false
    static let window = 2048
    static let maxMemberWaits = 40

    public enum BreakerState: String, Sendable { case closed, open, halfOpen = "half-open" }

    public var breakerState: BreakerState { BreakerState(rawValue: breaker.state(now: monotonicMilliseconds()).rawValue)! }

    public var deletesPaused: Bool { guardPausedSince != nil }
    /// Paused because the target refuses the credentials or the TLS handshake.
    public var credentialsRefused: Bool { credentialsPause != nil }

    init(target: TargetConfiguration, store: BrokerStore, writer: GroupCommitWriter, loop: EventLoop) throws {
        self.target = target
        self.store = store
        self.writer = writer
        self.loop = loop
        logger = Logger(label: "scim-broker.target")
        logger[metadataKey: "target"] = .string(target.name)
        concurrency = AdaptiveLimit(maximum: target.concurrency)
        bucket = TokenBucket(requestsPerSecond: target.requestsPerSecond, now: monotonicMilliseconds())
        breaker = CircuitBreaker(threshold: target.breakerThreshold)
        removals = RemovalWindow(maxDeletes: target.deletionGuard.maxDeletes, windowSeconds: target.deletionGuard.windowSeconds)
        token = try target.resolveToken()
        if target.useTLS {
            var tls = target.tls
            tls.verifyPeer = true
            tlsContext = try ReloadableTLSContext(role: .client, configuration: tls)
        }
        clientOptions.maxPipelined = 1
        clientOptions.responseTimeoutMilliseconds = target.requestTimeoutMilliseconds
        clientOptions.connectTimeoutMilliseconds = min(5_000, target.requestTimeoutMilliseconds)
    }

    /// The target's CA and client certificate: re-read on SIGHUP (a rotated client certificate resumes a paused target).
    private var tlsContext: ReloadableTLSContext?
    private var clientOptions = HTTPClientOptions()

    /// One kept-alive connection per unit of concurrency, to the address the
    /// host name resolves to now; false while it does not resolve.
    private func ensureClients() -> Bool {
        guard clients.isEmpty else { return true }
        guard let address = target.resolveAddress() else {
            statistics.lastError = "cannot resolve \(target.host)"
            return false
        }
        for _ in 0..<max(1, target.concurrency) {
            let serverName = target.useTLS ? target.host : nil
            clients.append(
                tlsContext.map {
                    HTTPClient(loop: loop, address: address, reloadableTLS: $0, serverName: serverName, options: clientOptions)
                }
                    ?? HTTPClient(loop: loop, address: address, serverName: serverName, options: clientOptions))
        }
        return true
    }

    /// Closes the connections, so that the next request resolves the host again.
    private func dropClients() {
        for c in clients { c.close() }
        clients.removeAll()
    }

    func start() throws {
        let depth = try store.queueDepth(target: target.name)
        self.depth = depth.count
        oldestQueuedAt = depth.oldest
        recoveredThrough = try store.lastQueueKey(target: target.name)
        let g = try store.deletionGuard(target: target.name)
        guardPausedSince = g.pausedSince
        guardConfirmedAt = g.confirmedAt
        guardRejectedAt = g.rejectedAt
        let t = try LoopTimer(loop: loop)
        t.keepsLoopAlive = false
        t.start(after: 25, repeatEvery: 25) { [weak self] in self?.tick() }
        timer = t
        discover()
    }

    /// SIGHUP: the token file, the CA and the client certificate may have been rotated.
    func reload() {
        do { token = try target.resolveToken() } catch { logger.error("cannot reload the token: \(error)") }
        if let tlsContext {
            do {
                try tlsContext.reload()
                dropClients()  // the next requests handshake with what was re-read
            } catch { logger.error("cannot reload the target's TLS files, keeping the old ones: \(error)") }
        }
        if credentialsPause != nil {
            credentialsPause?.probeAt = 0  // try the new credentials now
            credentialsPause?.probes = 0
            pump()
        }
        if capabilities == nil { nextDiscovery = 0 }  // a discovery refused for its credentials, too
    }

    func stop() {
        stopped = true
        timer?.close()
        timer = nil
        for c in clients { c.close() }
    }

    /// New items were queued by an apply.
    func kick(queued: Int) {
        depth += queued
        if oldestQueuedAt == 0 && queued > 0 { oldestQueuedAt = unixMilliseconds() }
        load()
        pump()
    }

    private func tick() {
        ticks += 1
        if ticks % 40 == 0 { refreshFromStore() }
        if capabilities == nil { discover() }
        pump()
    }

    /// Every second: the deletion guard (the CLI changes it), new items queued
    /// by other processes (dead-letter retries, reconciliation), and the status
    /// snapshot `scim-broker targets status` reads, saved when it changed (or
    /// every 10 s). The queue is counted every 10 s (a scan of the whole
    /// queue); in between, `kick` and completions keep the count (items other
    /// processes queue show up at the next count).
    private func refreshFromStore() {
        let recount = ticks % 400 == 0
        if recount, let d = try? store.queueDepth(target: target.name) { depth = d.count; oldestQueuedAt = d.oldest }
        // After a rejection, the guard changes only once the rejected removals are out of `pending`.
        if let g = try? store.deletionGuard(target: target.name), g.rejectedAt == guardRejectedAt || dropRejectedRemovals() {
            if guardPausedSince != nil && g.pausedSince == nil {
                logger.notice(
                    g.confirmedAt != guardConfirmedAt
                        ? "removals released by confirm-deletes"
                        : "removals resume: reject-deletes dropped the ones held")
                removals.reset()
            }
            guardPausedSince = g.pausedSince
            guardConfirmedAt = g.confirmedAt
            guardRejectedAt = g.rejectedAt
        }
        if target.collisions.linkPolicy != nil, let n = try? store.linkedAccounts(target: target.name) { linkedAccounts = n }
        load()
        var snapshot = statusDocument()
        snapshot["updatedAt"] = nil
        guard recount || snapshot != lastSavedStatus else { return }
        lastSavedStatus = snapshot
        snapshot["updatedAt"] = .number(JSONNumber(integer: unixMilliseconds()))
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
                        : guardPausedSince != nil ? "deletes-paused" : breakerState.rawValue),
            "breaker": .string(breakerState.rawValue),
            "queued": .int(depth), "oldestQueuedAt": .number(JSONNumber(integer: oldestQueuedAt)),
            "inFlight": .int(inFlightCount), "concurrency": .int(Int(limit)),
            "delivered": .int(statistics.delivered), "deadLettered": .int(statistics.deadLettered),
            "retries": .int(statistics.retries), "throttled": .int(statistics.throttled), "adopted": .int(statistics.adopted),
            "deletesPaused": .bool(guardPausedSince != nil), "updatedAt": .number(JSONNumber(integer: unixMilliseconds())),
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
        guard !discovering, !stopped, monotonicMilliseconds() >= nextDiscovery else { return }
        guard ensureClients() else {
            discoveryAttempts += 1
            nextDiscovery = monotonicMilliseconds() + backoff(discoveryAttempts)
            return
        }
        discovering = true
        send(
            HTTPRequest(method: "GET", target: target.basePath + "/ServiceProviderConfig", headers: headers(trace: "")),
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
                if case .failure = result { dropClients() }
                if discoveryAttempts == 1 || discoveryAttempts % 10 == 0 {
                    logger.warning("target not ready", metadata: ["error": .string(why)])
                }
                nextDiscovery = monotonicMilliseconds() + backoff(discoveryAttempts)
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
        }
    }

    private var pumping = false
    private var repump = false

    private func pump() {
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
        let now = monotonicMilliseconds()
        guard now >= pausedUntil else { return }
        var allowed = Int(limit)
        if let pause = credentialsPause {
            guard now >= pause.probeAt, inFlight.isEmpty else { return }
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

    /// The deletion guard: held back while paused; trips past `maxDeletes`
    /// removals within the window. Removals queued before the operator's
    /// confirmation pass.
    private func removalAllowed(_ item: DeliveryItem, _ now: UInt64) -> Bool {
        if item.queuedAt <= guardConfirmedAt { return true }
        if guardPausedSince != nil { return false }
        if !removals.admit(now: now) {
            let since = unixMilliseconds()
            guardPausedSince = since
            logger.error(
                "deletion guard: removals paused until `scim-broker targets confirm-deletes \(target.name)`",
                metadata: [
                    "removals": .stringConvertible(removals.times.count),
                    "windowSeconds": .stringConvertible(target.deletionGuard.windowSeconds),
                ])
            let store = self.store, name = target.name, confirmed = guardConfirmedAt
            writer.submit({ txn in try store.setDeletionGuard(target: name, pausedSince: since, confirmedAt: confirmed, txn) }) { _ in }
            return false
        }
        return true
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

    /// What a group delivery still has to send: the attribute operations
    /// (first step only), the members to add and to remove, and how many
    /// members the target should hold so far (to tell a complete answer
    /// from a partial one).
    struct MemberPlan {
        var attributeOps: [JSON]
        var added: ArraySlice<JSON>
        var removed: ArraySlice<String>
        /// The members (lowercased) the target should hold so far.
        var expected: Set<String>
    }

    /// What a group delivery from the index still has to send: the
    /// attribute operations (first step only), and the pending members read
    /// so far, as removals and additions. Pending members are read in
    /// batches (`deltaBatch`) after `cursor`: memory holds a batch, not the group.
    struct DeltaPlan {
        var attributeOps: [JSON]
        /// Growing a new group (`TargetMapping.growFrom`): the last member whose chunk is recorded
        /// (nil: grown), the end of the chunk being sent (nil: the last), and whether one is loaded.
        var grow: String?
        var growNext: String?
        var growLoaded = false
        var cursor: String?
        var exhausted = false
        var removes: [(member: String, targetID: String)] = []
        var adds: [(member: String, targetID: String)] = []
        /// Pending entries to clear: of members found as the target holds
        /// them, and, once their operations are sent, of the others.
        var done: [(member: String, mark: [UInt8])] = []
        /// Per member with operations: its pending mark and how many of its operations are left.
        var open: [String: (mark: [UInt8], left: Int)] = [:]
    }
    static let deltaBatch = 1024

    enum Outcome {
        /// Done; record the mapping (nil inside: forget it) and the hop.
        case done(mapping: TargetMapping??, method: String?, status: Int?)
        case deadLetter(method: String, path: String, request: String, status: Int, response: String)
        case retry(String)
        /// The broker's own store could not be read: retried later, and not
        /// held against the target (its breaker and concurrency stay as they are).
        case storeError(String)
        case throttled(retryAfter: UInt64?, status: Int)
        /// Group members not yet at the target: try again shortly.
        case waitForMembers
        /// 401, a 403 the credentials check confirmed, or a TLS failure: the target's state, not the change's.
        case credentialsRefused(String)
        /// 403 to one change: a dead letter if the credentials work, else a credentials pause.
        case forbidden(method: String, path: String, request: String, response: String)
    }

    // MARK: the operations

    /// The target's collection for a resource type: `/Users` or `/Groups` under its base.
    private func endpoint(_ type: String) -> String { target.basePath + (type == "User" ? "/Users" : "/Groups") }

    /// Whether a group's members at this target are kept in the index
    /// (`TargetMembers.swift`), so that a change sends only what changed:
    /// with PATCH, without `collisions: link` (linked users share one
    /// account, which one member there stands for) and without routes that
    /// read members (those need the whole group anyway).
    private var indexesGroupMembers: Bool {
        usesPatch("Group") && target.collisions.linkPolicy == nil && !target.groupRoutesReadMembers
    }

    private func upsert(_ d: Delivery) {
        // A group already delivered from the index is read without its members, and so is a new one:
        // it is created with its first members and grown from the index (`growChunk`).
        let delta = d.item.type == "Group" && indexesGroupMembers && d.mapping?.members != nil && d.mapping?.sent != nil
        let fromIndex = delta || (d.item.type == "Group" && indexesGroupMembers && d.mapping == nil)
        // A read error is not a deletion: the item stays queued and is retried.
        let stored: (domain: String, type: String, resource: JSONObject)?
        if d.item.type == "Group" && !fromIndex { statistics.wholeGroupReads += 1 }
        do { stored = try store.resource(brokerID: d.item.brokerID, members: !fromIndex) } catch {
            finish(d, .storeError("cannot read the resource: \(error)"))
            return
        }
        guard let (domain, type, resource) = stored, target.routes(domain: domain, type: type, resource) else {
            // Deleted or out of the routes since: the removal queued after it does the work.
            finish(d, .done(mapping: .none, method: nil, status: nil))
            return
        }
        if delta, let mapping = d.mapping {
            var body = targetBody(resource, type: type, brokerID: d.item.brokerID, target: target)
            body["members"] = nil
            groupDelta(d, mapping: mapping, body: body)
            return
        }
        var d = d
        if fromIndex {
            // New at the target: created with its first members (as many as one request may add),
            // the rest added by PATCH from the index, a batch at a time, in the delivery queued after it.
            var body = targetBody(resource, type: type, brokerID: d.item.brokerID, target: target)
            do {
                let first = try store.growChunk(
                    target: target.name, group: d.item.brokerID, after: "", limit: max(1, target.maxMembersPerPatch))
                body["members"] = .array(first.adds.map { ["value": .string($0.targetID)] })
                d.growAfter = first.last != nil
            } catch {
                finish(d, .storeError("cannot read the group's members: \(error)"))
                return
            }
            deliver(d, type: type, body: body, externalID: d.item.brokerID)
            return
        }
        if type == "Group", var mapping = d.mapping, mapping.members != nil, var sent = mapping.sent {
            // Delivered from the index before, compared whole now (the target took `collisions: link` or
            // member-reading routes, or lost PATCH): the difference is taken from what it holds.
            do { sent["members"] = .array(try store.heldMembers(target: target.name, group: d.item.brokerID)) } catch {
                finish(d, .storeError("cannot read what the target holds of the group: \(error)"))
                return
            }
            mapping.sent = sent
            mapping.members = nil
            d.mapping = mapping
        }
        if type == "User", let link = target.collisions.linkPolicy {
            linkedUpsert(d, link, LinkedResource(brokerID: d.item.brokerID, domain: domain, resource: resource))
            return
        }
        var body = targetBody(resource, type: type, brokerID: d.item.brokerID, target: target)
        if type == "Group", let members = body["members"]?.arrayValue {
            var mapped: [JSON] = []
            var missing = false
            for m in members {
                guard var o = m.objectValue, let v = o["value"]?.stringValue else { continue }
                // An unreadable member must not drop out of the group: retry the group.
                let memberMapping: TargetMapping?, member: (domain: String, type: String, resource: JSONObject)?
                do {
                    memberMapping = try store.mapping(target: target.name, brokerID: v)
                    member = memberMapping == nil ? try store.resource(brokerID: v) : nil
                } catch {
                    finish(d, .storeError("cannot read group member \(v): \(error)"))
                    return
                }
                if let tid = memberMapping?.targetID {
                    o["value"] = .string(tid)
                    o["$ref"] = nil
                    o["display"] = nil
                    mapped.append(.object(o))
                } else if let (md, mt, mr) = member, target.routes(domain: md, type: mt, mr) {
                    missing = true  // routed here, not delivered yet
                }
            }
            if missing && d.waits < Self.maxMemberWaits {
                finish(d, .waitForMembers)
                return
            }
            body["members"] = .array(mapped)
        }
        deliver(d, type: type, body: body, externalID: d.item.brokerID)
    }

    /// Sends `body` to the account the mapping names, or creates it.
    private func deliver(_ d: Delivery, type: String, body: JSONObject, externalID: String) {
        guard let mapping = d.mapping else {
            if (d.recovered || d.attempts > 0), capabilities?.filter == true, !d.leftLink {
                // A POST may have succeeded without its answer being recorded: look first.
                lookup(d, type: type, attribute: "externalId", value: externalID) { [weak self] result in
                    guard let self else { return }
                    switch result {
                    case .found(let found): adopt(d, found.id, body: body)
                    case .absent: create(d, type: type, body: body)
                    case .failed(let outcome): finish(d, outcome)  // never "absent" on a failed look: that could create it twice
                    }
                }
            } else {
                create(d, type: type, body: body)
            }
            return
        }
        update(d, type: type, mapping: mapping, body: body)
    }

    /// The users linked under `value` as they are now: those that still
    /// exist, are routed here and have that value (the index is kept in the
    /// apply; an entry that no longer fits is a user that changed since,
    /// whose own queued change re-sends what it must).
    private func linkedResources(_ link: LinkPolicy, value: String) throws -> [LinkedResource] {
        var out: [LinkedResource] = []
        for id in try store.linkMembers(target: target.name, value: value) {
            guard let (domain, type, resource) = try store.resource(brokerID: id), type == "User",
                target.routes(domain: domain, type: type, resource), link.value(of: resource, domain: domain) == value
            else { continue }
            out.append(LinkedResource(brokerID: id, domain: domain, resource: resource))
        }
        return out
    }

    /// `collisions: link`: a user's change re-sends the merged state of
    /// every user linked to it, to their one account.
    private func linkedUpsert(_ given: Delivery, _ link: LinkPolicy, _ me: LinkedResource) {
        var d = given
        // Only the domains in `sourceOfRecord` link: another domain's user has no link value.
        let value = link.value(of: me.resource, domain: me.domain)
        do {
            if let shared = d.mapping?.link, shared != value,
                try linkedResources(link, value: shared).contains(where: { $0.brokerID != me.brokerID })
            {
                // It left an account others still share: that one stays theirs
                // (their merged state is queued); this user needs one of its own.
                d.mapping = nil
                d.leftLink = true
            }
            guard let value else {
                // Nothing to link by: the user's own account, as under refuse.
                deliver(
                    d, type: "User", body: targetBody(me.resource, type: "User", brokerID: me.brokerID, target: target),
                    externalID: me.brokerID)
                return
            }
            var members = try linkedResources(link, value: value)
            if !members.contains(where: { $0.brokerID == me.brokerID }) { members.append(me) }
            guard let (anchor, body) = linkedTargetBody(members, link: link, target: target) else {
                // No member to take data from (never: `me` is one): nothing to send, and the delivery ends.
                finish(d, .done(mapping: .none, method: nil, status: nil))
                return
            }
            // The account: that of the first user, in source-of-record order, that has one.
            var chosen: TargetMapping?
            for m in link.ordered(members) {
                let mapping = m.brokerID == me.brokerID ? d.mapping : try store.mapping(target: target.name, brokerID: m.brokerID)
                if let mapping { chosen = mapping; break }
            }
            if let mine = d.mapping, let chosen, mine.targetID != chosen.targetID {
                logger.warning(
                    "a linked user had an account of its own: its data now goes to the linked account; the other one is left as it is",
                    metadata: ["brokerId": .string(me.brokerID), "targetId": .string(mine.targetID), "linkedTo": .string(chosen.targetID)])
            }
            // Its own mapping of that account may say more (none of the body
            // sent: reconciliation found drift, and a full PUT is due).
            d.mapping = d.mapping.flatMap { $0.targetID == chosen?.targetID ? $0 : nil } ?? chosen
            d.linkValue = value
            d.linked = members.map(\.brokerID)
            deliver(d, type: "User", body: body, externalID: anchor)
        } catch {
            finish(d, .storeError("cannot read the linked users: \(error)"))
        }
    }

    private func create(_ d: Delivery, type: String, body full: JSONObject) {
        let path = endpoint(type)
        // A group larger than one request may carry is created with its first
        // members and grown by PATCH (`update`, in steps).
        let first = usesPatch(type) ? membershipStep(from: nil, to: full, limit: target.maxMembersPerPatch) : nil
        let body = first ?? full
        let bytes = JSON.object(body).serialized()
        send(request("POST", path, d, body: bytes), method: "POST", d) { [weak self] result in
            guard let self else { return }
            switch result {
            case .success(let r) where r.status == 201 || r.status == 200:
                guard let doc = try? JSONParser.parse(r.body), let id = doc["id"]?.stringValue else {
                    finish(
                        d,
                        .deadLetter(
                            method: "POST", path: path, request: String(decoding: bytes, as: UTF8.self), status: r.status,
                            response: "the response carries no id: " + r.bodyText))
                    return
                }
                var created = TargetMapping(targetID: id, etag: etag(r, doc), sent: body)
                if type == "Group",
                    let (held, _) = answeredMembers(doc, sent: body, before: nil, whole: true, absentMeansNone: usesPatch(type))
                {
                    // Created without (some of) the members it was sent (django-scim2
                    // drops members on POST): the rest goes by PATCH, or, without
                    // PATCH, the membership cannot be delivered.
                    guard usesPatch(type) else {
                        finish(d, droppedMembers("POST", path, bytes, r, sent: body, held: held))
                        return
                    }
                    var actual = body
                    actual["members"] = .array(held)
                    created = TargetMapping(targetID: id, etag: etag(r, doc), sent: actual)
                    var next = d
                    next.mapping = created
                    next.readBacks += 1
                    update(next, type: type, mapping: created, body: full)
                    return
                }
                if first != nil {
                    var next = d
                    next.mapping = created
                    update(next, type: type, mapping: created, body: full)
                    return
                }
                finish(d, .done(mapping: .some(created), method: "POST", status: r.status))
            case .success(let r) where r.status == 409 && capabilities?.filter == true && !d.adopted:
                // The account exists already: adopt it (userName for users, displayName for groups).
                let attribute = type == "User" ? "userName" : "displayName"
                guard let value = body[attribute]?.stringValue else {
                    finish(d, classify(r, "POST", path, bytes))
                    return
                }
                lookup(d, type: type, attribute: attribute, value: value) { [weak self] result in
                    guard let self else { return }
                    let found: (id: String, externalId: String?)
                    switch result {
                    case .found(let f): found = f
                    case .absent:
                        finish(d, classify(r, "POST", path, bytes))
                        return
                    case .failed(let outcome):
                        finish(d, outcome)
                        return
                    }
                    // Never adopt an account that is another resource's (invariant 6).
                    switch owner(of: found, type: type) {
                    case .failure(let e):
                        finish(d, .retry("cannot tell whose account \(found.id) is: \(e)"))
                    case .success(let other?) where (other != d.item.brokerID || d.leftLink) && !d.linked.contains(other):
                        // Linked users share one account; one that left its link adopts nothing of the others'.
                        finish(d, collision(d, attribute: attribute, value: value, targetID: found.id, other: other, path: path, bytes))
                    case .success:
                        adopt(d, found.id, body: full)
                    }
                }
            case .success(let r):
                finish(d, classify(r, "POST", path, bytes))
            case .failure(let e):
                finish(d, transportFailure(e, "POST \(path)"))
            }
        }
    }

    /// The broker id an account at the target belongs to, if any: the one
    /// whose mapping names it, else its `externalId` when that is a broker
    /// id the directory holds (an account the broker created for another
    /// resource). An account of neither kind was made outside the broker and
    /// may be adopted.
    private func owner(of account: (id: String, externalId: String?), type: String) -> Result<String?, Error> {
        Result {
            if let mapped = try store.accountOwner(target: target.name, type: type, targetID: account.id) { return mapped }
            if let e = account.externalId, !e.isEmpty, try store.resource(brokerID: e) != nil { return e }
            return nil
        }
    }

    /// An account that is another resource's: with `collisions: refuse` (and
    /// when a namespace still collides) the change becomes a dead letter
    /// that names both domains and both broker ids.
    private func collision(
        _ d: Delivery, attribute: String, value: String, targetID: String, other: String,
        path: String, _ bytes: [UInt8]
    ) -> Outcome {
        statistics.collisions += 1
        func domain(_ id: String) -> String { ((try? store.resource(brokerID: id)) ?? nil)?.0 ?? "unknown" }
        let reason =
            "collision: \(attribute) '\(value)' at target \(target.name) is account \(targetID) of broker id \(other) "
            + "(domain \(domain(other))); broker id \(d.item.brokerID) (domain \(domain(d.item.brokerID))) may not adopt it"
        logger.error(
            "cross-resource collision: refused",
            metadata: [
                "brokerId": .string(d.item.brokerID), "owner": .string(other), "targetId": .string(targetID),
                "attribute": .string(attribute),
            ])
        return .deadLetter(method: "POST", path: path, request: String(decoding: bytes, as: UTF8.self), status: 409, response: reason)
    }

    /// Takes over an existing account and brings it to the broker's state
    /// with a full PUT (its current state is not known).
    private func adopt(_ d: Delivery, _ targetID: String, body: JSONObject) {
        var next = d
        next.adopted = true
        next.mapping = TargetMapping(targetID: targetID, etag: nil, sent: nil)
        statistics.adopted += 1
        logger.info("adopted an existing account", metadata: ["brokerId": .string(d.item.brokerID), "targetId": .string(targetID)])
        update(next, type: d.item.type, mapping: next.mapping!, body: body)
    }

    /// A group's update by PATCH, in steps of at most `maxMembersPerPatch`
    /// members: the difference from what was sent is worked out once (O(n)),
    /// each step sends its chunk (O(chunk)), and the mapping records `body`
    /// when the last step is done. What the target answers for members is
    /// believed when its list is complete (as many members as it should
    /// hold): members it dropped are sent again (at most 3 times), a step it
    /// took none of is a dead letter.
    private func updateGroup(_ d: Delivery, mapping: TargetMapping, sent: JSONObject, body: JSONObject) {
        var d = d
        if d.plan == nil {
            var a = sent, b = body
            let had = sent["members"]?.arrayValue ?? [], want = body["members"]?.arrayValue ?? []
            a["members"] = nil
            b["members"] = nil
            let hadIDs = Set(had.compactMap { $0["value"]?.stringValue }), wantIDs = Set(want.compactMap { $0["value"]?.stringValue })
            // Each value once (two linked users share one account: one member there).
            var seen = Set<String>()
            let added = want.filter { m in
                guard let v = m["value"]?.stringValue, !hadIDs.contains(v) else { return false }
                return seen.insert(v).inserted
            }
            d.plan = MemberPlan(
                attributeOps: patchOperations(from: a, to: b, removal: memberRemoval), added: added[...],
                removed: hadIDs.subtracting(wantIDs).sorted()[...], expected: Set(hadIDs.map { $0.lowercased() }))
        }
        var plan = d.plan!
        let limit = max(1, target.maxMembersPerPatch)
        // Removals first: they free room at a target with a cap.
        let removeNow = Array(plan.removed.prefix(limit)), addNow = Array(plan.added.prefix(limit - removeNow.count))
        let ops = plan.attributeOps + memberOperations(add: addNow, remove: removeNow)
        let done = TargetMapping(targetID: mapping.targetID, etag: mapping.etag, sent: body)
        if ops.isEmpty {
            finish(d, .done(mapping: .some(done), method: nil, status: nil))
            return
        }
        plan.attributeOps = []
        plan.added = plan.added.dropFirst(addNow.count)
        plan.removed = plan.removed.dropFirst(removeNow.count)
        // What the target should still hold of what it had: an answer that lists all of it is complete.
        let keptOld = plan.expected.subtracting(removeNow.map { $0.lowercased() })
        plan.expected = keptOld.union(addNow.compactMap { $0["value"]?.stringValue?.lowercased() })
        let path = endpoint("Group") + "/" + mapping.targetID
        let bytes = JSON.object(["schemas": ["urn:ietf:params:scim:api:messages:2.0:PatchOp"], "Operations": .array(ops)]).serialized()
        var req = request("PATCH", path, d, body: bytes)
        if capabilities?.etag == true, let etag = mapping.etag { req.headers.set("If-Match", etag) }
        send(req, method: "PATCH", d) { [weak self] result in
            guard let self else { return }
            switch result {
            case .success(let r) where (200..<300).contains(r.status):
                let doc = try? JSONParser.parse(r.body)
                let tag = etag(r, doc) ?? (r.status == 204 ? nil : mapping.etag)
                var next = d
                if let held = doc?["id"] != nil
                    ? doc?["members"]?.arrayValue ?? (doc!.objectValue!.keys.contains("members") ? [] : nil) : nil
                {
                    let holds = Set(held.compactMap { $0["value"]?.stringValue?.lowercased() })
                    let dropped = addNow.filter { !holds.contains(($0["value"]?.stringValue ?? "").lowercased()) }
                    let kept = removeNow.filter { holds.contains($0.lowercased()) }
                    // Believed only when the list is complete: every member the target kept from before is in it
                    // (a shorter list is a partial or capped one, and says nothing of the change).
                    if (!dropped.isEmpty || !kept.isEmpty) && keptOld.isSubset(of: holds) {
                        guard next.readBacks < 3, dropped.count + kept.count < addNow.count + removeNow.count else {
                            finish(
                                d,
                                stepRefused(path, bytes, r, dropped: dropped.count, of: addNow.count, kept: kept.count, of: removeNow.count)
                            )
                            return
                        }
                        next.readBacks += 1
                        plan.added = dropped[...] + plan.added
                        plan.removed = kept[...] + plan.removed
                        plan.expected.subtract(dropped.compactMap { $0["value"]?.stringValue?.lowercased() })
                        plan.expected.formUnion(kept.map { $0.lowercased() })
                    }
                }
                next.plan = plan
                let now = TargetMapping(targetID: mapping.targetID, etag: tag, sent: mapping.sent)
                if plan.added.isEmpty && plan.removed.isEmpty {
                    finish(
                        next,
                        .done(
                            mapping: .some(TargetMapping(targetID: mapping.targetID, etag: tag, sent: body)), method: "PATCH",
                            status: r.status))
                } else {
                    updateGroup(next, mapping: now, sent: sent, body: body)  // the next step
                }
            case .success(let r)
            where r.status == 501 && memberRemoval == .filter && onlyFilteredMemberRemovals(bytes):
                learnValueListRemoval(r)
                updateGroup(d, mapping: mapping, sent: sent, body: body)
            default:
                // Anything else is decided as for any update, from a fresh start.
                var fresh = d
                fresh.plan = nil
                self.updateAnswered(
                    result, fresh, type: "Group", mapping: mapping, body: body, method: "PATCH", path: path, bytes: bytes, step: body)
            }
        }
    }

    /// A PATCH's member operations: additions as one value list, removals
    /// in the form the target takes.
    private func memberOperations(add: [JSON], remove: [String]) -> [JSON] {
        var ops: [JSON] = []
        if !add.isEmpty { ops.append(["op": "add", "path": "members", "value": .array(add)]) }
        if !remove.isEmpty {
            if memberRemoval == .valueList {
                ops.append(["op": "remove", "path": "members", "value": .array(remove.map { ["value": .string($0)] })])
            } else {
                for id in remove { ops.append(["op": "remove", "path": .string("members[value eq \"\(id)\"]")]) }
            }
        }
        return ops
    }

    /// Above this many members at the target, a step asks for its answer
    /// without them (RFC 7644 §3.9 allows `excludedAttributes` on PATCH):
    /// an answer of the whole group would make a step O(n). Such a step's
    /// members are then not read back; reconcile compares them.
    static let readBackMembers = 1000

    /// A group's change from the member index (`TargetMembers.swift`): the
    /// attribute operations, then the members marked pending, in PATCH
    /// steps of at most `maxMembersPerPatch`. Each step the target took is
    /// recorded at once (index, pending marks, count), so a retry sends
    /// only what was not taken. O(k log n) for k changed members, whatever
    /// the group's size. What the target answers for members is checked as
    /// in `updateGroup`, when its list is complete.
    private func groupDelta(_ d: Delivery, mapping: TargetMapping, body: JSONObject) {
        var d = d
        var plan =
            d.delta
            ?? DeltaPlan(attributeOps: patchOperations(from: mapping.sent ?? [:], to: body, removal: memberRemoval), grow: mapping.growFrom)
        let group = d.item.brokerID, target = self.target
        // A new group's growth first, then the pending members, a batch at a time, until there is something
        // to send or none are left (or a batch of settled marks to record first: memory and each
        // transaction hold a batch).
        while plan.removes.isEmpty && plan.adds.isEmpty && !plan.exhausted && plan.done.count < Self.deltaBatch {
            if let from = plan.grow {
                if plan.growLoaded {
                    // The chunk is sent: the walk goes on after it (the next step records that).
                    plan.grow = plan.growNext
                    plan.growLoaded = false
                    continue
                }
                do {
                    let chunk = try store.growChunk(target: target.name, group: group, after: from, limit: Self.deltaBatch)
                    plan.adds = chunk.adds
                    plan.growNext = chunk.last
                    plan.growLoaded = true
                } catch {
                    finish(d, .storeError("cannot read the group's members: \(error)"))
                    return
                }
                continue
            }
            let changes: [BrokerStore.MemberChange]
            do {
                changes = try store.pendingMemberChanges(target: target.name, group: group, after: plan.cursor, limit: Self.deltaBatch) {
                    target.routes(domain: $0, type: $1, $2)
                }
            } catch {
                finish(d, .storeError("cannot read the group's pending members: \(error)"))
                return
            }
            plan.cursor = changes.last?.member ?? plan.cursor
            plan.exhausted = changes.count < Self.deltaBatch
            for c in changes {
                var left = 0
                if let held = c.held, held != c.want {
                    plan.removes.append((c.member, held))
                    left += 1
                }
                if let want = c.want, want != c.held {
                    plan.adds.append((c.member, want))
                    left += 1
                }
                // Routed here and not there yet: it stays pending (its delivery marks it again).
                if c.waiting { continue }
                if left == 0 { plan.done.append((c.member, c.mark)) } else { plan.open[c.member] = (c.mark, left) }
            }
        }
        let limit = max(1, target.maxMembersPerPatch)
        let removeNow = Array(plan.removes.prefix(limit)), addNow = Array(plan.adds.prefix(limit - removeNow.count))
        let ops =
            plan.attributeOps + memberOperations(add: addNow.map { ["value": .string($0.targetID)] }, remove: removeNow.map(\.targetID))
        d.delta = plan
        if ops.isEmpty && !plan.exhausted {
            // Marks found settled, more to read: record them, then go on from the loop.
            var next = d
            next.delta?.done = []
            let store = self.store, name = target.name, settled = plan.done
            var unchanged = TargetMapping(targetID: mapping.targetID, etag: mapping.etag, sent: mapping.sent, members: mapping.members)
            unchanged.growFrom = plan.grow
            let same = unchanged
            writer.submit({ txn in
                try store.recordMemberStep(target: name, group: group, added: [], removed: [], done: settled, mapping: same, txn)
            }) { [weak self] recorded in
                guard let self else { return }
                switch recorded {
                case .success(let now): groupDelta(next, mapping: now, body: body)
                case .failure(let error): finish(d, .storeError("cannot record a group's settled members: \(error)"))
                }
            }
            return
        }
        if ops.isEmpty {
            var same = TargetMapping(targetID: mapping.targetID, etag: mapping.etag, sent: body, members: mapping.members)
            same.growFrom = plan.grow
            finish(d, .done(mapping: .some(same), method: nil, status: nil))
            return
        }
        let large = (mapping.members ?? 0) > Self.readBackMembers
        // An answer's member list is believed complete when it holds a sample of what the target holds
        // (a capped or partial list misses some; the target's own members do not count).
        let sample: [String]
        do { sample = large ? [] : try store.heldSample(target: target.name, group: group, limit: 32) } catch {
            finish(d, .storeError("cannot read what the target holds of the group: \(error)"))
            return
        }
        let path = endpoint("Group") + "/" + mapping.targetID
        let bytes = JSON.object(["schemas": ["urn:ietf:params:scim:api:messages:2.0:PatchOp"], "Operations": .array(ops)]).serialized()
        var req = request("PATCH", path + (large ? "?excludedAttributes=members" : ""), d, body: bytes)
        if capabilities?.etag == true, let etag = mapping.etag { req.headers.set("If-Match", etag) }
        statistics.memberSteps += 1
        send(req, method: "PATCH", d) { [weak self] result in
            guard let self else { return }
            switch result {
            case .success(let r) where (200..<300).contains(r.status):
                let doc = r.body.isEmpty ? nil : try? JSONParser.parse(r.body)
                let tag = etag(r, doc) ?? (r.status == 204 ? nil : mapping.etag)
                var dropped: [(member: String, targetID: String)] = [], kept: [(member: String, targetID: String)] = []
                if !large, let o = doc?.objectValue, o["id"] != nil,
                    let held = o["members"]?.arrayValue ?? (o.keys.contains("members") ? [] : nil)
                {
                    let holds = Set(held.compactMap { $0["value"]?.stringValue?.lowercased() })
                    // Believed only when complete: at least as many as the target kept from before, the sample
                    // of what it held among them (a partial or capped list says nothing of the change).
                    let removing = Set(removeNow.map { $0.targetID.lowercased() })
                    if holds.count >= (mapping.members ?? 0) - removeNow.count,
                        sample.allSatisfy({ removing.contains($0.lowercased()) || holds.contains($0.lowercased()) })
                    {
                        dropped = addNow.filter { !holds.contains($0.targetID.lowercased()) }
                        kept = removeNow.filter { holds.contains($0.targetID.lowercased()) }
                    }
                }
                var next = d
                if !dropped.isEmpty || !kept.isEmpty {
                    guard next.readBacks < 3, dropped.count + kept.count < addNow.count + removeNow.count else {
                        finish(
                            d, stepRefused(path, bytes, r, dropped: dropped.count, of: addNow.count, kept: kept.count, of: removeNow.count))
                        return
                    }
                    next.readBacks += 1
                }
                var plan = plan
                plan.attributeOps = []
                plan.removes = kept + plan.removes.dropFirst(removeNow.count)
                plan.adds = dropped + plan.adds.dropFirst(addNow.count)
                var done = plan.done
                plan.done = []
                let again = Set((dropped + kept).map(\.member))
                for m in (removeNow + addNow).map(\.member) where !again.contains(m) {
                    guard var o = plan.open[m] else { continue }
                    o.left -= 1
                    if o.left == 0 {
                        done.append((m, o.mark))
                        plan.open[m] = nil
                    } else {
                        plan.open[m] = o
                    }
                }
                let added = addNow.filter { !again.contains($0.member) },
                    removed = removeNow.filter { !again.contains($0.member) }.map(\.member)
                var recordedStep = TargetMapping(targetID: mapping.targetID, etag: tag, sent: body, members: mapping.members)
                recordedStep.growFrom = plan.grow  // the chunk's start until it is all recorded: a restart walks it again
                let step = recordedStep
                let store = self.store, name = target.name, cleared = done
                writer.submit({ txn in
                    try store.recordMemberStep(
                        target: name, group: group, added: added, removed: removed, done: cleared, mapping: step, txn)
                }) { [weak self] recorded in
                    guard let self else { return }
                    switch recorded {
                    case .success(let now):
                        next.delta = plan
                        next.mapping = now
                        if plan.removes.isEmpty && plan.adds.isEmpty && plan.exhausted && plan.grow == nil {
                            finish(next, .done(mapping: .some(now), method: "PATCH", status: r.status))
                        } else {
                            groupDelta(next, mapping: now, body: body)  // the next step
                        }
                    case .failure(let error):
                        finish(d, .storeError("cannot record a group's step: \(error)"))
                    }
                }
            case .success(let r)
            where r.status == 501 && memberRemoval == .filter && onlyFilteredMemberRemovals(bytes):
                learnValueListRemoval(r)
                groupDelta(d, mapping: mapping, body: body)
            case .success(let r) where r.status == 501:
                // No PATCH there: the whole group by PUT (its completion drops the index).
                patchRefused("Group", r)
                var next = d
                next.delta = nil
                upsert(next)
            case .success(let r) where r.status == 404 && d.redirected < 2:
                // Gone at the target (deleted there): created again, whole.
                var next = d
                next.delta = nil
                next.mapping = nil
                next.redirected += 1
                upsert(next)
            case .success(let r) where r.status == 412 && d.redirected < 2:
                // Changed at the target since: the broker's state wins, without If-Match, its attributes
                // all sent again (as a full update would), with the pending members.
                var next = d
                next.redirected += 1
                next.delta?.attributeOps = patchOperations(from: [:], to: body, removal: memberRemoval)
                var m = mapping
                m.etag = nil
                m.sent = [:]
                groupDelta(next, mapping: m, body: body)
            case .success(let r):
                finish(d, classify(r, "PATCH", path, bytes))
            case .failure(let e):
                finish(d, transportFailure(e, "PATCH \(path)"))
            }
        }
    }

    /// Removal by value filter is not implemented there (django-scim2): the
    /// same removal with a value list, remembered for this target.
    private func learnValueListRemoval(_ r: HTTPResponse) {
        memberRemoval = .valueList
        logger.warning(
            "the target does not implement member removal by filter (501): members are removed with a value list",
            metadata: ["response": .string(String(decoding: r.body.prefix(300), as: UTF8.self))])
    }

    private func update(_ d: Delivery, type: String, mapping: TargetMapping, body: JSONObject) {
        if type == "Group", usesPatch(type), let sent = mapping.sent {
            updateGroup(d, mapping: mapping, sent: sent, body: body)
            return
        }
        let path = endpoint(type) + "/" + mapping.targetID
        var method = "PUT"
        var bytes: [UInt8]
        // A membership change larger than the target takes in one request goes in steps.
        var step = body
        if usesPatch(type), let sent = mapping.sent {
            step = membershipStep(from: sent, to: body, limit: target.maxMembersPerPatch) ?? body
            let ops = patchOperations(from: sent, to: step, removal: memberRemoval)
            if ops.isEmpty {
                finish(d, .done(mapping: .some(mapping), method: nil, status: nil))
                return
            }
            method = "PATCH"
            bytes = JSON.object(["schemas": ["urn:ietf:params:scim:api:messages:2.0:PatchOp"], "Operations": .array(ops)]).serialized()
        } else {
            var full = body
            full["id"] = .string(mapping.targetID)
            bytes = JSON.object(full).serialized()
        }
        var req = request(method, path, d, body: bytes)
        if capabilities?.etag == true, let etag = mapping.etag { req.headers.set("If-Match", etag) }
        send(req, method: method, d) { [weak self] result in
            self?.updateAnswered(result, d, type: type, mapping: mapping, body: body, method: method, path: path, bytes: bytes, step: step)
        }
    }

    /// What an update's answer means (`update`, and `updateGroup` for what
    /// is not a step's success).
    private func updateAnswered(
        _ result: Result<HTTPResponse, HTTPClientError>, _ d: Delivery, type: String, mapping: TargetMapping, body: JSONObject,
        method: String, path: String, bytes: [UInt8], step: JSONObject
    ) {
        switch result {
        case .success(let r) where (200..<300).contains(r.status):
            let doc = try? JSONParser.parse(r.body)
            let tag = etag(r, doc) ?? (r.status == 204 ? nil : mapping.etag)
            var now = TargetMapping(targetID: mapping.targetID, etag: tag, sent: step)
            if type == "Group",
                let (held, tookNothing) = answeredMembers(
                    doc, sent: step, before: mapping.sent?["members"], whole: method == "PUT",
                    absentMeansNone: method == "PUT" && usesPatch(type))
            {
                // The target did not take (all) the members of this change:
                // what it answered is what it has, and the rest goes by PATCH.
                guard usesPatch(type), d.readBacks < 3, !(method == "PATCH" && tookNothing) else {
                    finish(d, droppedMembers(method, path, bytes, r, sent: step, held: held))
                    return
                }
                var actual = step
                actual["members"] = .array(held)
                now = TargetMapping(targetID: mapping.targetID, etag: tag, sent: actual)
                var next = d
                next.readBacks += 1
                update(next, type: type, mapping: now, body: body)
                return
            }
            if step != body {
                update(d, type: type, mapping: now, body: body)  // the next step
                return
            }
            finish(d, .done(mapping: .some(now), method: method, status: r.status))
        case .success(let r) where r.status == 404 && d.redirected < 2:
            // Gone at the target (deleted there): create it again.
            var next = d
            next.mapping = nil
            next.redirected += 1
            create(next, type: type, body: body)
        case .success(let r) where r.status == 412 && d.redirected < 2:
            // Changed at the target since: the broker's state wins, without If-Match.
            var next = d
            next.redirected += 1
            update(next, type: type, mapping: TargetMapping(targetID: mapping.targetID, etag: nil, sent: nil), body: body)
        case .success(let r)
        where r.status == 501 && method == "PATCH" && memberRemoval == .filter && onlyFilteredMemberRemovals(bytes):
            learnValueListRemoval(r)
            update(d, type: type, mapping: mapping, body: body)
        case .success(let r) where r.status == 501 && method == "PATCH":
            // This PATCH form is not implemented there (RFC 7644 §3.12): a
            // property of the request, not a fault. A full PUT says the same.
            patchRefused(type, r)
            update(d, type: type, mapping: mapping, body: body)
        case .success(let r):
            finish(d, classify(r, method, path, bytes))
        case .failure(let e):
            finish(d, transportFailure(e, "\(method) \(path)"))
        }
    }

    private func remove(_ d: Delivery, deactivate: Bool) {
        guard let mapping = d.mapping else {
            finish(d, .done(mapping: .none, method: nil, status: nil))  // never reached the target
            return
        }
        if d.item.type == "User", let link = target.collisions.linkPolicy, let shared = mapping.link {
            // A linked account is removed only when every user sharing it is gone.
            do {
                if try linkedResources(link, value: shared).contains(where: { $0.brokerID != d.item.brokerID }) {
                    // The others' merged state is queued (by the apply); only this user's mapping goes.
                    finish(d, .done(mapping: .some(nil), method: nil, status: nil))
                    return
                }
            } catch {
                finish(d, .storeError("cannot read the linked users: \(error)"))
                return
            }
        }
        let path = endpoint(d.item.type) + "/" + mapping.targetID
        if !deactivate {
            send(request("DELETE", path, d, body: []), method: "DELETE", d) { [weak self] result in
                guard let self else { return }
                switch result {
                case .success(let r) where (200..<300).contains(r.status) || r.status == 404:
                    finish(d, .done(mapping: .some(nil), method: "DELETE", status: r.status))
                case .success(let r): finish(d, classify(r, "DELETE", path, []))
                case .failure(let e): finish(d, transportFailure(e, "DELETE \(path)"))
                }
            }
            return
        }
        if !usesPatch(d.item.type) && mapping.sent == nil {
            // A PUT replaces the whole account: without PATCH and without the
            // body last sent (an adopted or stray account), read it first.
            send(request("GET", path, d, body: []), method: "GET", d) { [weak self] result in
                guard let self else { return }
                switch result {
                case .success(let r) where r.status == 200:
                    guard var current = (try? JSONParser.parse(r.body))?.objectValue else {
                        finish(d, classify(r, "GET", path, []))
                        return
                    }
                    current["meta"] = nil
                    current["id"] = nil
                    var next = d
                    next.mapping = TargetMapping(targetID: mapping.targetID, etag: mapping.etag, sent: current)
                    remove(next, deactivate: true)
                case .success(let r) where r.status == 404:
                    finish(d, .done(mapping: .some(nil), method: "GET", status: 404))
                case .success(let r): finish(d, classify(r, "GET", path, []))
                case .failure(let e): finish(d, transportFailure(e, "GET \(path)"))
                }
            }
            return
        }
        var sent = mapping.sent ?? JSONObject()
        sent["active"] = .bool(false)
        let method: String
        let bytes: [UInt8]
        if usesPatch(d.item.type) {
            method = "PATCH"
            bytes = JSON.object([
                "schemas": ["urn:ietf:params:scim:api:messages:2.0:PatchOp"],
                "Operations": [["op": "replace", "path": "active", "value": false]],
            ]).serialized()
        } else {
            method = "PUT"
            var full = sent
            full["id"] = .string(mapping.targetID)
            bytes = JSON.object(full).serialized()
        }
        send(request(method, path, d, body: bytes), method: method, d) { [weak self] result in
            guard let self else { return }
            switch result {
            case .success(let r) where (200..<300).contains(r.status):
                let tag = etag(r, try? JSONParser.parse(r.body))
                finish(
                    d,
                    .done(
                        mapping: .some(TargetMapping(targetID: mapping.targetID, etag: tag, sent: sent)), method: method, status: r.status))
            case .success(let r) where r.status == 404:
                finish(d, .done(mapping: .some(nil), method: method, status: 404))
            case .success(let r) where r.status == 501 && method == "PATCH":
                patchRefused(d.item.type, r)
                remove(d, deactivate: true)
            case .success(let r): finish(d, classify(r, method, path, bytes))
            case .failure(let e): finish(d, transportFailure(e, "\(method) \(path)"))
            }
        }
    }

    /// What a lookup found: the one match, none, or no answer to go by.
    enum LookupResult {
        case found((id: String, externalId: String?))
        case absent
        /// The request failed (no answer, 5xx, 401/403, a body that is not a list): not "absent".
        case failed(Outcome)
    }

    /// `GET /Users?filter=attribute eq "value"`: the one match's id and externalId.
    private func lookup(
        _ d: Delivery, type: String, attribute: String, value: String,
        _ done: @escaping (LookupResult) -> Void
    ) {
        let escaped = value.replacing("\\", with: "\\\\").replacing("\"", with: "\\\"")
        let path = endpoint(type) + "?filter=" + percentEncode("\(attribute) eq \"\(escaped)\"") + "&attributes=id,externalId"
        send(request("GET", path, d, body: []), method: "GET", d) { [weak self] result in
            guard let self else { return }
            switch result {
            case .success(let r) where r.status == 200:
                // A list; with no match a server may leave `Resources` out (RFC 7644 §3.4.2).
                let doc = try? JSONParser.parse(r.body)
                guard let list = doc?["Resources"]?.arrayValue ?? (doc?["totalResults"]?.numberValue?.integer == 0 ? [] : nil) else {
                    done(.failed(.retry("GET \(path): the answer is not a list")))
                    return
                }
                // Several matches: none of them is known to be the one.
                if list.count == 1, let id = list[0]["id"]?.stringValue {
                    done(.found((id, list[0]["externalId"]?.stringValue)))
                } else {
                    done(.absent)
                }
            case .success(let r):
                done(.failed(classify(r, "GET", path, [])))
            case .failure(let e):
                done(.failed(transportFailure(e, "GET \(path)")))
            }
        }
    }

    // MARK: the wire

    func headers(trace: String) -> HTTPHeaders {
        var h: HTTPHeaders = ["Accept": "application/scim+json"]
        if let token { h.set("Authorization", "Bearer \(token)") }
        let traceID = trace.count == 32 && trace.allSatisfy(\.isHexDigit) ? trace.lowercased() : hexString(secureRandomBytes(16))
        h.set("traceparent", "00-\(traceID)-\(hexString(secureRandomBytes(8)))-01")
        return h
    }

    private func request(_ method: String, _ path: String, _ d: Delivery, body: [UInt8]) -> HTTPRequest {
        var h = headers(trace: d.item.trace)
        if !body.isEmpty { h.set("Content-Type", "application/scim+json") }
        return HTTPRequest(method: method, target: path, headers: h, body: body)
    }

    /// Sends one request (of delivery `d`: its method, path and answer are
    /// kept as one of the delivery's steps, which the hop lists: `trace`,
    /// `targets push`).
    private func send(
        _ request: HTTPRequest, method: String, _ d: Delivery?, _ completion: @escaping (Result<HTTPResponse, HTTPClientError>) -> Void
    ) {
        let id = d?.item.brokerID, path = request.target
        guard ensureClients(), let client = clients.min(by: { $0.outstanding < $1.outstanding }) else {
            step(id, method, path, nil, "cannot resolve \(target.host)")
            completion(.failure(.connectFailed("cannot resolve \(target.host)")))
            return
        }
        client.send(request) { [weak self] result in
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

    /// The requests of the deliveries in flight, by broker id (at most
    /// `maxSteps` each: a long membership change keeps its first ones).
    private var steps: [String: [JSON]] = [:]
    static let maxSteps = 16

    private func step(_ id: String?, _ method: String, _ path: String, _ status: Int?, _ error: String?) {
        guard let id, steps[id, default: []].count < Self.maxSteps else { return }
        var o: JSONObject = ["method": .string(method), "path": .string(path)]
        if let status { o["status"] = .int(status) }
        if let error { o["error"] = .string(String(error.prefix(200))) }
        steps[id, default: []].append(.object(o))
    }

    /// A request that got no answer: TLS failures (a certificate the target
    /// refuses or that fails verification) pause the target like refused
    /// credentials; anything else is retried and counts toward the breaker.
    private func transportFailure(_ e: HTTPClientError, _ what: String) -> Outcome {
        if case .tls = e { return .credentialsRefused("\(what): TLS: \(e)") }
        return .retry("\(what): \(e)")
    }

    /// The target answered 501 to a PATCH: updates of this type go as full PUTs from now on.
    private func patchRefused(_ type: String, _ r: HTTPResponse) {
        guard !patchNotImplemented.contains(type) else { return }
        patchNotImplemented.insert(type)
        logger.warning(
            "the target does not implement this PATCH (501): \(type) updates are sent as PUT",
            metadata: ["response": .string(String(decoding: r.body.prefix(300), as: UTF8.self))])
    }

    /// What a target's answer says of the members this request changed:
    /// nil when it took them all (or the answer cannot tell), else the
    /// members it holds of `sent` (those added that it dropped left out,
    /// those removed that it kept put back) and whether it took none of the
    /// change. Only the members of the change are judged, ids compared
    /// ASCII case-insensitively. An answer is believed only when it can
    /// tell: the answer to a POST or PUT (`whole`) when it lists none of
    /// the members sent (django-scim2 drops them all; a shorter list may be
    /// a capped one), a PATCH answer when it lists every member the change
    /// kept (else it is a partial or paged list). `before`: the members the
    /// target had (nil: none, a create). A `whole` answer without `members`
    /// holds none (a PATCH answer may leave them out) when PATCH can repair it.
    private func answeredMembers(_ doc: JSON?, sent: JSONObject, before: JSON?, whole: Bool, absentMeansNone: Bool) -> (
        held: [JSON], tookNothing: Bool
    )? {
        guard let doc = doc?.objectValue, doc["id"] != nil else { return nil }
        let held = doc["members"]?.arrayValue ?? (doc.keys.contains("members") ? [] : nil)
        guard let answered = held ?? (absentMeansNone && doc["displayName"] != nil ? [] : nil) else { return nil }
        let holds = Set(memberValues(.array(answered)).map { $0.lowercased() })
        let want = sent["members"]?.arrayValue ?? []
        let had = Set(memberValues(before).map { $0.lowercased() }), wanted = Set(memberValues(sent["members"]).map { $0.lowercased() })
        if whole {
            guard holds.isDisjoint(with: wanted) else { return nil }
        } else {
            guard had.intersection(wanted).isSubset(of: holds) else { return nil }
        }
        let added = want.filter { !had.contains(($0["value"]?.stringValue ?? "").lowercased()) }
        let removed = memberValues(before).filter { !wanted.contains($0.lowercased()) }
        let dropped = Set(added.compactMap { $0["value"]?.stringValue?.lowercased() }.filter { !holds.contains($0) })
        let kept = removed.filter { holds.contains($0.lowercased()) }
        guard !dropped.isEmpty || !kept.isEmpty else { return nil }
        let actual = want.filter { !dropped.contains(($0["value"]?.stringValue ?? "").lowercased()) } + kept.map { ["value": .string($0)] }
        return (actual, dropped.count == added.count && kept.count == removed.count)
    }

    /// Whether a PATCH holds only removals of members by value filter: then
    /// a 501 is the form's (django-scim2), not another operation's, and the
    /// value-list form may be tried. (On a server that ignored the value,
    /// `remove` of `members` would remove every member: only a target that
    /// refused the filter form is sent it.)
    private func onlyFilteredMemberRemovals(_ bytes: [UInt8]) -> Bool {
        guard let ops = (try? JSONParser.parse(bytes))?["Operations"]?.arrayValue, !ops.isEmpty else { return false }
        return ops.allSatisfy { op in
            op["op"]?.stringValue == "remove" && (op["path"]?.stringValue?.hasPrefix("members[value eq ") ?? false)
        }
    }

    private func memberValues(_ members: JSON?) -> [String] { members?.arrayValue?.compactMap { $0["value"]?.stringValue } ?? [] }

    /// A dead letter for a PATCH step answered with success whose member changes the target took none of.
    private func stepRefused(_ path: String, _ bytes: [UInt8], _ r: HTTPResponse, dropped: Int, of added: Int, kept: Int, of removed: Int)
        -> Outcome
    {
        logger.error(
            "the target answered success but did not take the group's member changes",
            metadata: ["path": .string(path), "dropped": .string("\(dropped)/\(added)"), "kept": .string("\(kept)/\(removed)")])
        return .deadLetter(
            method: "PATCH", path: path, request: String(decoding: bytes.prefix(4096), as: UTF8.self), status: r.status,
            response: "the target answered \(r.status) but its member list shows none of the change: \(dropped) of \(added) members "
                + "added are missing and \(kept) of \(removed) removed are still there (after 3 tries); "
                + String(decoding: r.body.prefix(1024), as: UTF8.self))
    }

    /// A dead letter for a target that took the request (2xx) but not its members.
    private func droppedMembers(_ method: String, _ path: String, _ bytes: [UInt8], _ r: HTTPResponse, sent: JSONObject, held: [JSON])
        -> Outcome
    {
        let want = Set(memberValues(sent["members"])), have = Set(memberValues(.array(held)))
        logger.error(
            "the target answered success but did not take the group's members",
            metadata: ["method": .string(method), "path": .string(path), "missing": .string(String(want.subtracting(have).count))])
        return .deadLetter(
            method: method, path: path, request: String(decoding: bytes.prefix(4096), as: UTF8.self), status: r.status,
            response: "the target answered \(r.status) but holds \(have.count) of the \(want.count) members sent "
                + "(\(want.subtracting(have).count) missing, \(have.subtracting(want).count) not sent): it dropped them silently; "
                + String(decoding: r.body.prefix(1024), as: UTF8.self))
    }

    /// Whether updates of `type` go as PATCH.
    private func usesPatch(_ type: String) -> Bool { capabilities?.patch == true && !patchNotImplemented.contains(type) }

    private func etag(_ r: HTTPResponse, _ doc: JSON?) -> String? {
        r.headers["ETag"] ?? doc?["meta"]?["version"]?.stringValue
    }

    private func classify(_ r: HTTPResponse, _ method: String, _ path: String, _ request: [UInt8]) -> Outcome {
        switch r.status {
        case 429, 503: return .throttled(retryAfter: r.headers["Retry-After"].flatMap { UInt64($0.trimmingSpaces) }, status: r.status)
        case 401:
            // The credentials, not the change: the target pauses with its queue kept.
            return .credentialsRefused("\(method) \(path) answered 401: \(String(decoding: r.body.prefix(300), as: UTF8.self))")
        case 403:
            // The credentials, or this one change ("operation not permitted",
            // RFC 7644 §3.12): `finish` asks the target with a request about no resource.
            return .forbidden(
                method: method, path: path, request: String(decoding: request, as: UTF8.self),
                response: String(decoding: r.body.prefix(16 * 1024), as: UTF8.self))
        case 500...599 where r.status != 501, 408:
            return .retry("\(method) \(path) answered \(r.status)")
        default:
            // 501 too: not implemented (RFC 7644 §3.12) is a property of the
            // request form; retrying cannot help, and the target is up.
            return .deadLetter(
                method: method, path: path, request: String(decoding: request, as: UTF8.self), status: r.status,
                response: String(decoding: r.body.prefix(16 * 1024), as: UTF8.self))
        }
    }

    // MARK: completion

    private func finish(_ d: Delivery, _ outcome: Outcome) {
        let id = d.item.brokerID
        let now = monotonicMilliseconds()
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
            let check = endpoint(d.item.type) + "?count=1&attributes=id"
            send(self.request("GET", check, d, body: []), method: "GET", d) { [weak self] result in
                guard let self else { return }
                switch result {
                case .success(let r) where (200..<300).contains(r.status):
                    finish(d, .deadLetter(method: method, path: path, request: request, status: 403, response: response))
                case .success(let r) where r.status == 401 || r.status == 403:
                    finish(d, .credentialsRefused("\(method) \(path) answered 403, and so did GET \(check) (\(r.status))"))
                case .success(let r):
                    finish(d, .retry("\(method) \(path) answered 403; GET \(check) answered \(r.status)"))
                case .failure(let e):
                    finish(d, transportFailure(e, "GET \(check) (after a 403 to \(method) \(path))"))
                }
            }
        case .credentialsRefused(let why):
            statistics.lastError = why
            var pause = credentialsPause ?? CredentialsPause(reason: why, since: unixMilliseconds())
            pause.reason = why
            pause.probes += 1
            // Probe again (with one queued change) after 1, 2, 4 … 60 s; a SIGHUP probes at once.
            pause.probeAt = now + UInt64(min(60_000, 1000 << min(6, pause.probes - 1)))
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
            pausedUntil = now + min(300, retryAfter ?? 1) * 1000
            release(retryAt: pausedUntil, countAttempt: false)
        case .retry(let why):
            statistics.retries += 1
            statistics.lastError = why
            concurrency.decrease()
            if let cooldown = breaker.failure(now: now) {
                statistics.breakerOpened += 1
                dropClients()  // resolve again before the probe
                logger.error(
                    "circuit breaker open",
                    metadata: [
                        "failures": .stringConvertible(breaker.consecutiveFailures),
                        "cooldownMs": .stringConvertible(cooldown), "error": .string(why),
                    ])
            } else if d.attempts == 0 || d.attempts % 10 == 0 {
                logger.warning("delivery failed, will retry", metadata: ["brokerId": .string(id), "error": .string(why)])
            }
            release(retryAt: now + backoff(d.attempts + 1), countAttempt: true)
        case .storeError(let why):
            statistics.retries += 1
            statistics.lastError = why
            if d.attempts == 0 || d.attempts % 10 == 0 {
                logger.error(
                    "cannot read the store for a delivery; it stays queued and is retried",
                    metadata: ["brokerId": .string(id), "error": .string(why)])
            }
            release(retryAt: now + backoff(d.attempts + 1), countAttempt: true)
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
                "response": .string(response), "at": .number(JSONNumber(integer: unixMilliseconds())),
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
                metadata: ["pausedSeconds": .stringConvertible((unixMilliseconds() - pause.since) / 1000)])
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
        let type = d.item.type
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
        let indexing: BrokerStore.GroupIndexing =
            d.delta.map { .keep(done: $0.done) } ?? (indexesGroupMembers ? .rebuild : .none)
        writer.submit({ txn in
            try store.completeDelivery(
                target: name, keys: keys, brokerID: id, type: type, mapping: final, linked: linked,
                deadLetter: deadLetter, hop: finalHop, trace: trace, indexing: indexing, txn)
        }) { [weak self] result in
            guard let self else { return }
            endFlight(d)
            switch result {
            case .success(let queued):
                // A user's account changed there: the groups it joins or leaves were queued.
                if queued > 0 { kick(queued: queued) }
                let done = Set(keys)
                pending.removeAll { done.contains($0.key) }
                depth = max(0, depth - keys.count)
                if deadLetter == nil {
                    statistics.delivered += 1
                    let from = d.item.acceptedAt > 0 ? d.item.acceptedAt : d.item.queuedAt
                    let now = unixMilliseconds(), seconds = Double(max(0, now - from)) / 1000
                    statistics.observe(latency: seconds)
                    recent.add(at: now, seconds: seconds)
                }
            case .failure(let error):
                logger.error("cannot record a delivery; it will be repeated", metadata: ["error": .string("\(error)")])
                for j in pending.indices where keys.contains(pending[j].key) {
                    pending[j].dispatched = false
                    pending[j].notBefore = monotonicMilliseconds() + 1000
                }
            }
            pump()
        }
    }
}
