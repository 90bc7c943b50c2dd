import EdgeConfig
import EdgeDelivery
import EdgeHTTP
import EdgeLoop
import EdgeStore
import EdgeTLS
import Glibc
import Logging
import SCIM

/// Where and how the agent relays its outbox.
public struct RelayConfiguration: Sendable {
    /// `https://HOST:PORT` of the broker's federation listener.
    public var broker: SocketAddress
    /// The name the broker's certificate must carry (SNI and host check).
    public var brokerName: String
    /// Client certificate and key, and the federation CA to verify the broker.
    public var tls: TLSConfiguration
    /// This agent's domain; the broker checks it against the certificate.
    public var domain: String
    public var agentName: String
    public var maxEventsPerBatch = AgentOptions.maxEventsPerBatch.defaultInteger
    public var maxBytesPerBatch = 1 << 20
    /// Batches in flight on the (pipelined) connection: the window adapts
    /// between 1 and this (additive increase, multiplicative decrease).
    public var window = AgentOptions.window.defaultInteger
    /// Wait this long after a commit so that close writes share a batch.
    public var lingerMilliseconds: UInt64 = 2
    /// Look at the outbox this often even without commits.
    public var pollMilliseconds: UInt64 = 1000
    public var maxBackoffMilliseconds: UInt64 = 30_000

    public init(broker: SocketAddress, brokerName: String, tls: TLSConfiguration, domain: String, agentName: String) {
        self.broker = broker
        self.brokerName = brokerName
        self.tls = tls
        self.domain = domain
        self.agentName = agentName
    }

    /// Parses `https://HOST:PORT` (an IP address or `localhost`).
    public static func brokerAddress(_ url: String) -> (SocketAddress, String)? {
        guard url.hasPrefix("https://") else { return nil }
        var rest = Substring(url.dropFirst(8))
        if rest.hasSuffix("/") { rest = rest.dropLast() }
        guard let address = SocketAddress(String(rest)) else { return nil }
        let host = rest.hasPrefix("[") ? address.host : String(rest[..<rest.lastIndex(of: ":")!])
        return (address, host)
    }
}

/// Relay statistics, for metrics and status.
public struct RelayStatistics: Sendable {
    public static let rttBuckets: [Double] = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5]
    public var rttBucketCounts = [Int](repeating: 0, count: RelayStatistics.rttBuckets.count)
    public var rttCount = 0
    public var rttSum = 0.0
    /// The adaptive window now.
    public var window = 1
    public var batchesSent = 0
    public var eventsAcknowledged = 0
    public var eventsRejected = 0
    public var errors = 0
    public var rewinds = 0
    /// Answers no honest broker gives (an acknowledgement of more than was
    /// sent): logged, counted, the connection reset, nothing skipped.
    public var protocolErrors = 0
    /// Batches the broker refused as a whole, split to find the event it cannot take.
    public var splits = 0
    /// Failed TLS handshakes with the broker (refused or unverifiable certificates).
    public var tlsFailures = 0
    public var lastError: String?
}

/// Sends the outbox to the broker, in order, at least once; the broker's
/// per-agent sequence makes the effect exactly once. Up to `window` batches
/// are in flight on the pipelined connection; acknowledged events are pruned
/// in the background (a crash before the prune only causes harmless resends).
/// Threading: loop-confined.
public final class Relay {
    let loop: EventLoop
    let store: AgentStore
    let writer: GroupCommitWriter
    let configuration: RelayConfiguration
    let client: HTTPClient
    /// The client certificate, key and federation CA: re-read on SIGHUP.
    let tls: ReloadableTLSContext
    /// This agent's client certificate's end of validity (Unix seconds; 0: unknown).
    public private(set) var certificateNotAfter: Int64 = 0
    /// The CRL's next update (Unix seconds; 0: no CRL configured).
    public private(set) var crlNextUpdate: Int64 = 0
    /// The broker's certificate's, from the last handshake (0: none yet).
    public var brokerCertificateNotAfter: Int64 { client.serverIdentity?.notAfter ?? 0 }
    /// The broker refuses what this agent sends (a handshake that fails, an
    /// identity bound to no domain, any answer other than taking the batch or
    /// asking to wait): the connection may be up, the relay is not.
    private var refused = false
    /// The connection (`HTTPClient.connectionsOpened`) last logged as working.
    private var connectionLogged = 0
    /// The connection is up and the broker takes batches on it: what
    /// `scim_edge_relay_connected` says (0 while every batch is refused).
    public var isConnected: Bool { client.isConnected && !refused }
    private var timer: LoopTimer?
    /// Batches sent and not yet answered.
    private var inFlight = 0
    /// The last sequence sent (in memory; restarts from the acknowledged one).
    private var sentThrough: UInt64 = 0
    /// The highest sequence that may have been sent: everything numbered
    /// when this run started (a run before a crash may have sent it) and what
    /// this run sent since. An acknowledgement beyond it acknowledges what
    /// this agent never sent.
    private var sentHigh: UInt64 = 0
    /// While isolating an event the broker refuses as part of a batch:
    /// batches stay at most this many events until the refused range
    /// (through `isolating.through`) is acknowledged.
    private var isolating: (limit: Int, through: UInt64)?
    /// Events the broker refused alone: sent as an `undeliverable` stand-in
    /// for the same sequence, which the broker records as rejected, so the
    /// original becomes a dead letter with the broker's reason and the
    /// sequence stays contiguous. In memory: after a restart the event is
    /// tried once more and replaced again.
    private var standIns: [UInt64: [UInt8]] = [:]
    /// The batch envelope's bytes around the events (with 20-digit sequences).
    private let envelopeBytes: Int
    /// The highest sequence the broker acknowledged, and the one pruned durably.
    private var ackedThrough: UInt64 = 0
    private var pruning = false
    /// Bumped on every rewind: answers to batches sent before it are stale.
    private var generation = 0
    /// The adaptive window (AIMD) and the best round trip seen, for the latency signal.
    private var window = 1
    private var bestRTT = Double.infinity
    private var scheduled = false
    /// When the scheduled send fires (monotonic ns).
    private var scheduledFor: UInt64 = 0
    private var failures = 0
    private var stopped = false
    /// The relay protocol the broker says it speaks (`protocol` in its 200s),
    /// as recorded in the store: membership changes become deltas from 2.
    public private(set) var brokerProtocol = 1
    public private(set) var statistics = RelayStatistics()
    public var logger = Logger(label: "scim-edge.relay")
    /// Called after an acknowledgement's prune committed (the outbox shrank).
    public var onAcknowledged: (() -> Void)?

    public init(loop: EventLoop, store: AgentStore, writer: GroupCommitWriter, configuration: RelayConfiguration) throws {
        self.loop = loop
        self.store = store
        self.writer = writer
        self.configuration = configuration
        tls = try ReloadableTLSContext(role: .client, configuration: configuration.tls)
        client = HTTPClient(loop: loop, address: configuration.broker, reloadableTLS: tls, serverName: configuration.brokerName)
        certificateNotAfter = CertificateSummary.expiry(ofFile: configuration.tls.certificateChainFile)
        crlNextUpdate = revocationListNextUpdate(ofFile: configuration.tls.crlFile)
        envelopeBytes = Relay.envelope(configuration, store.epoch, first: .max, last: .max).count + 2
    }

    /// The batch's members before `"events":[`, without the closing brace.
    static func envelope(_ configuration: RelayConfiguration, _ epoch: String, first: UInt64, last: UInt64) -> [UInt8] {
        var members: JSONObject = ["agent": .string(configuration.agentName), "domain": .string(configuration.domain)]
        if !epoch.isEmpty { members["epoch"] = .string(epoch) }
        members["firstSeq"] = .number(JSONNumber(integer: Int64(bitPattern: first)))
        members["lastSeq"] = .number(JSONNumber(integer: Int64(bitPattern: last)))
        var body = JSON.object(members).serialized()
        body.removeLast()  // the closing brace
        body.append(contentsOf: Array(#","events":["#.utf8))
        return body
    }

    public func start() throws {
        let t = try LoopTimer(loop: loop)
        t.keepsLoopAlive = false
        timer = t
        ackedThrough = try store.acknowledgedSequence()
        sentThrough = ackedThrough
        // A run before a crash may have sent everything numbered: an honest
        // broker may acknowledge up to there at once.
        sentHigh = max(ackedThrough, try store.numberedSequence())
        brokerProtocol = try store.brokerProtocol()
        schedule(after: 0)
    }

    /// SIGHUP: re-reads the client certificate, key and CA (a rotation) and
    /// reconnects, so the broker sees the new certificate now. On error the
    /// old ones stay in use.
    public func reloadTLS() throws(TLSError) {
        try tls.reload()
        certificateNotAfter = CertificateSummary.expiry(ofFile: configuration.tls.certificateChainFile)
        crlNextUpdate = revocationListNextUpdate(ofFile: configuration.tls.crlFile)
        rewind(nil, retryAfter: 0)
        client.resetConnection()
    }

    public func stop() {
        stopped = true
        timer?.close()
        timer = nil
        client.close()
    }

    /// New events were committed: send them soon.
    /// A backoff or Retry-After is running: commits do not cut it short.
    private var backingOff = false

    public func kick() {
        guard inFlight < window, !stopped, !backingOff else { return }
        // A send due within the linger stays as it is: under a steady stream of
        // commits, restarting the timer at each one would postpone it forever.
        let due = monotonicNanoseconds() + configuration.lingerMilliseconds * 1_000_000
        if scheduled && scheduledFor <= due { return }
        schedule(after: configuration.lingerMilliseconds)  // replaces a pending idle poll
    }

    private func schedule(after milliseconds: UInt64) {
        guard let timer, !stopped else { return }
        scheduled = true
        scheduledFor = monotonicNanoseconds() + milliseconds * 1_000_000
        timer.start(after: milliseconds) { [unowned self] in
            scheduled = false
            sendNext()
            if inFlight == 0 && !scheduled { idle() }
        }
    }

    private func idle() { if !scheduled { schedule(after: configuration.pollMilliseconds) } }

    /// Fills the window with batches after `sentThrough`.
    private func sendNext() {
        while inFlight < window, !stopped {
            let entries: [(UInt64, [UInt8])]
            do {
                // The budget counts the envelope and the commas: the whole
                // body stays within `maxBytesPerBatch`, except an event
                // larger than that on its own, which goes alone.
                entries = try store.rawOutboxEntries(
                    after: sentThrough, limit: isolating?.limit ?? configuration.maxEventsPerBatch,
                    maxBytes: max(1, configuration.maxBytesPerBatch - envelopeBytes), separatorBytes: 1)
            } catch {
                fail("cannot read the outbox: \(error)", retryAfter: nil)
                return
            }
            guard !entries.isEmpty else {
                if inFlight == 0 { idle() }
                return
            }
            let first = entries[0].0, last = entries[entries.count - 1].0
            // The batch is assembled from the stored events' bytes (they are JSON already).
            var body = Relay.envelope(configuration, store.epoch, first: first, last: last)
            body.reserveCapacity(body.count + entries.reduce(2) { $0 + $1.1.count + 1 })
            for (i, e) in entries.enumerated() {
                if i > 0 { body.append(UInt8(ascii: ",")) }
                body.append(contentsOf: standIns[e.0] ?? e.1)
            }
            body.append(contentsOf: [UInt8(ascii: "]"), UInt8(ascii: "}")])
            inFlight += 1
            sentThrough = last
            sentHigh = max(sentHigh, last)
            statistics.batchesSent += 1
            let sentIn = generation
            let sentAt = monotonicNanoseconds()
            let request = HTTPRequest(
                method: "POST", target: "/federation/v1/events",
                headers: ["Content-Type": "application/json"], body: body)
            let batch = SentBatch(first: first, last: last, count: entries.count, generation: sentIn)
            client.send(request) { [weak self] result in
                self?.recordRTT(Double(monotonicNanoseconds() - sentAt) / 1e9)
                self?.answered(result, batch)
            }
        }
    }

    struct SentBatch {
        let first: UInt64, last: UInt64, count: Int, generation: Int
    }

    private func answered(_ result: Result<HTTPResponse, HTTPClientError>, _ batch: SentBatch) {
        inFlight -= 1
        guard !stopped else { return }
        let current = batch.generation == generation
        switch result {
        case .failure(.tls(let e)):
            // Not "unreachable": the broker answered and the handshake failed
            // (a revoked or expired certificate, another CA).
            statistics.tlsFailures += 1
            refused = true
            if current { rewind("TLS handshake with the broker failed: \(e)", retryAfter: nil) }
        case .failure(let e):
            if current { rewind("broker unreachable: \(e)", retryAfter: nil) }
        case .success(let r):
            let body = try? JSONParser.parse(r.body)
            switch r.status {
            case 200:
                guard let acked = body?["ackedThrough"]?.numberValue?.integer.map({ UInt64(clamping: $0) }) else {
                    if current { rewind("broker answered 200 without ackedThrough", retryAfter: nil) }
                    return
                }
                // Believed only as far as this batch reached: the broker may
                // truly hold more (resends after a restart), and the next
                // batch learns it without anything being skipped.
                let believed = min(acked, batch.last)
                var rejected: [UInt64: String] = [:]
                for (seq, reason) in body?["rejected"]?.objectValue ?? JSONObject() {
                    if let n = UInt64(seq), n >= batch.first, n <= believed {
                        rejected[n] = reason["description"]?.stringValue ?? reason.text
                    }
                }
                if !rejected.isEmpty {
                    statistics.eventsRejected += rejected.count
                    logger.error(
                        "broker rejected events for good: kept as dead letters",
                        metadata: ["sequences": .string(rejected.keys.sorted().map(String.init).joined(separator: ","))])
                }
                taken(afterFailures: failures)
                failures = 0
                backingOff = false
                let spoken = body?["protocol"]?.numberValue?.integer.map { Int(clamping: $0) } ?? 1
                if spoken != brokerProtocol { learnProtocol(spoken) }
                window = min(configuration.window, window + 1)  // additive increase
                statistics.window = window
                acknowledged(through: believed, rejected: rejected)
                if acked > sentHigh {
                    protocolError("broker acknowledged through \(acked), but this agent has sent only through \(sentHigh)")
                    return
                }
                if acked < batch.last, current {
                    // The broker committed part of the batch (it applies a batch in parts): the rest goes again, shortly.
                    rewind("broker applied the batch through \(acked) of \(batch.last)", retryAfter: 1)
                    return
                }
                if current { sendNext() }
            case 409:
                guard let expected = body?["expectedSeq"]?.numberValue?.integer.map({ UInt64(clamping: $0) }), expected >= 1 else {
                    if current { rewind("broker answered 409 without expectedSeq", retryAfter: nil) }
                    return
                }
                statistics.rewinds += 1
                taken(afterFailures: failures)
                guard expected - 1 <= sentHigh else {
                    protocolError("broker expects sequence \(expected), but this agent has sent only through \(sentHigh)")
                    return
                }
                // It refused this batch's first event as not the one it expects, and expects exactly that one:
                // no honest broker answers so (it applies what continues its sequence); resent at once, it looped.
                guard expected != batch.first else {
                    protocolError("broker refused batch \(batch.first)…\(batch.last) as out of sequence, yet expects sequence \(expected)")
                    return
                }
                // The broker has everything before `expected`.
                if expected - 1 > ackedThrough { acknowledged(through: expected - 1, rejected: [:]) }
                if expected - 1 < ackedThrough {
                    // The broker lost what it acknowledged (restored from an older
                    // backup?): those events are gone here. Say so, count it, back off:
                    // resending at once would only loop.
                    protocolError(
                        "broker expects sequence \(expected), but it acknowledged through \(ackedThrough) and this agent pruned those events; resending from \(ackedThrough + 1)"
                    )
                    return
                }
                if current { rewind(nil, retryAfter: 0) }
            case 429, 503:
                if current { rewind("broker busy (\(r.status))", retryAfter: brokerRetryAfter(r.headers["Retry-After"])) }
            case 400, 413, 422:
                // The broker cannot take this batch as a whole. Split it
                // until the event it cannot take is alone; that event is
                // replaced by a stand-in the broker records as rejected.
                guard current else { return }
                let reason = "\(r.status) \(body?["description"]?.stringValue ?? r.bodyText)"
                if batch.count > 1 {
                    statistics.splits += 1
                    isolating = (max(1, batch.count / 2), max(isolating?.through ?? 0, batch.last))
                    logger.warning("relay: broker refused a batch of \(batch.count) events (\(reason)): splitting it")
                    rewind(nil, retryAfter: 0)
                } else if standIns[batch.first] == nil {
                    standIns[batch.first] = undeliverable(batch.first, reason: reason)
                    logger.error(
                        "relay: broker refused event \(batch.first) on its own: it becomes a dead letter",
                        metadata: ["reason": .string(reason)])
                    rewind(nil, retryAfter: 0)
                } else {
                    // Even the stand-in is refused: the batch, not the event, is
                    // at fault (the envelope, the broker). The original is tried
                    // again after the backoff; nothing becomes a dead letter.
                    standIns[batch.first] = nil
                    refused = true
                    rewind("broker refused the batch: \(reason)", retryAfter: nil)
                }
            default:
                refused = true
                if current {
                    rewind("broker refused the batch: \(r.status) \(body?["description"]?.stringValue ?? r.bodyText)", retryAfter: nil)
                }
            }
        }
    }

    /// The broker took a batch (200, or 409 with its position): the relay is
    /// up. The first time on each connection, it is logged: a reconnection
    /// says how many attempts failed before it.
    private func taken(afterFailures failed: Int) {
        refused = false
        guard client.connectionsOpened != connectionLogged else { return }
        let first = connectionLogged == 0
        connectionLogged = client.connectionsOpened
        var metadata: Logger.Metadata = [
            "broker": .string("\(configuration.brokerName):\(configuration.broker.port)"),
            "brokerIdentity": .string(client.serverIdentity?.names.joined(separator: ",") ?? "-"),
            "connection": .stringConvertible(client.connectionsOpened),
        ]
        if failed > 0 { metadata["failedAttempts"] = .stringConvertible(failed) }
        logger.info(first ? "relay: connected to the broker" : "relay: reconnected to the broker", metadata: metadata)
    }

    /// An answer that acknowledges what was never sent: logged and counted,
    /// the connection reset, and sending resumes from what was really
    /// acknowledged, so no event is skipped on the broker's word.
    private func protocolError(_ message: String) {
        statistics.protocolErrors += 1
        logger.error("relay: protocol error: \(message); resetting the connection")
        rewind("protocol error: \(message)", retryAfter: nil)
        client.resetConnection()  // what is in flight on it is stale now (answers of an old generation)
    }

    /// The stand-in for an event the broker refused alone: same sequence and
    /// `jti`, the same `ref`, and the broker's reason.
    private func undeliverable(_ seq: UInt64, reason: String) -> [UInt8] {
        let original = (try? store.rawOutboxEntries(after: seq - 1, limit: 1, maxBytes: .max).first)
            .flatMap { $0.0 == seq ? try? JSONParser.parse($0.1, limits: .stored) : nil }
        var body: JSONObject = ["reason": .string(reason)]
        if let ref = original?["events"]?.objectValue?.members.first?.value["ref"] { body["ref"] = ref }
        var event: JSONObject = ["seq": .number(JSONNumber(integer: Int64(seq)))]
        for k in ["jti", "txn", "iat", "ts"] { if let v = original?[k] { event[k] = v } }
        event["events"] = .object([EventURI.undeliverable: .object(body)])
        return JSON.object(event).serialized()
    }

    /// The broker has everything through `sequence`: prune it (and keep
    /// refused events as dead letters) in the background.
    private func acknowledged(through sequence: UInt64, rejected: [UInt64: String]) {
        guard sequence > ackedThrough || !rejected.isEmpty else { return }
        let before = ackedThrough
        ackedThrough = max(ackedThrough, sequence)
        statistics.eventsAcknowledged += Int(ackedThrough - before)
        if let i = isolating, ackedThrough >= i.through { isolating = nil }
        for seq in standIns.keys where seq <= ackedThrough { standIns[seq] = nil }
        pendingRejections.merge(rejected) { a, _ in a }
        prune()
    }

    private var pendingRejections: [UInt64: String] = [:]

    /// The broker speaks another protocol than recorded: recorded durably, so
    /// that the writes after it (on any loop) decide their events by it.
    private func learnProtocol(_ version: Int) {
        brokerProtocol = version
        logger.info("the broker speaks relay protocol \(version)", metadata: ["protocol": .string(String(version))])
        let store = self.store
        writer.submit({ txn in try store.recordBrokerProtocol(version, in: txn) }) { [weak self] result in
            if case .failure(let e) = result { self?.logger.error("relay: cannot record the broker's protocol: \(e)") }
        }
    }

    private func prune() {
        guard !pruning else { return }
        let target = ackedThrough, rejected = pendingRejections, store = self.store
        pendingRejections = [:]
        let now = unixSeconds()
        pruning = true
        writer.submit({ txn in try store.acknowledge(through: target, rejected: rejected, at: now, in: txn) }) { [weak self] result in
            guard let self else { return }
            pruning = false
            if case .failure(let e) = result {
                logger.error("relay: cannot record the acknowledgement: \(e)")
                pendingRejections.merge(rejected) { a, _ in a }
            }
            if case .success = result { onAcknowledged?() }
            if ackedThrough > target || !pendingRejections.isEmpty { prune() }
        }
    }

    /// Forgets what is in flight and resends from the last acknowledgement,
    /// after the broker's Retry-After or a jittered backoff (none for 0).
    private func rewind(_ message: String?, retryAfter: UInt64?) {
        if message != nil { shrinkWindow() }
        generation += 1
        sentThrough = ackedThrough
        if let message { fail(message, retryAfter: retryAfter) } else { schedule(after: (retryAfter ?? 0) * 1000) }
    }

    /// Multiplicative decrease: on errors, busy answers and rising latency.
    private func shrinkWindow() {
        window = max(1, window / 2)
        statistics.window = window
    }

    /// Records a round trip; one far above the best seen means a queue is
    /// building somewhere: back off the window.
    private func recordRTT(_ seconds: Double) {
        statistics.rttCount += 1
        statistics.rttSum += seconds
        for (k, le) in RelayStatistics.rttBuckets.enumerated() where seconds <= le { statistics.rttBucketCounts[k] += 1 }
        bestRTT = min(bestRTT, seconds)
        if seconds > max(bestRTT * 4, 0.05) && window > 1 { shrinkWindow() }
    }

    /// Capped exponential backoff with full jitter, or the broker's Retry-After.
    private func fail(_ message: String, retryAfter: UInt64?) {
        backingOff = true
        failures += 1
        statistics.errors += 1
        statistics.lastError = message
        logger.warning("relay: \(message)")
        let delay: UInt64
        if let retryAfter {
            delay = retryAfter * 1000
        } else {
            delay = jitteredBackoff(failures: failures, cap: configuration.maxBackoffMilliseconds)
        }
        schedule(after: delay)
    }
}

/// Capped exponential backoff with full jitter, in milliseconds: up to
/// 100 ms × 2^failures, at most `cap`.
func jitteredBackoff(failures: Int, cap: UInt64) -> UInt64 {
    UInt64.random(in: 0...min(cap, 100 << UInt64(min(failures, 16))))
}

/// The broker's `Retry-After` (delta-seconds), between 1 s and 5 minutes as
/// for a target (`RetrySchedule`): a larger one would park the relay or the
/// downlink for good, and one past 2^64 / 1000 s would overflow the timer's
/// milliseconds and stop the agent; a `0` had the relay send the refused
/// batch again at once, in a loop for as long as the broker (or a proxy
/// before it) answered so.
func brokerRetryAfter(_ header: String?) -> UInt64? {
    RetrySchedule.retryAfter(header).map { RetrySchedule.bounded($0) }
}
