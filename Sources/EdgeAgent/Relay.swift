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
    public var maxEventsPerBatch = 500
    public var maxBytesPerBatch = 1 << 20
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
    public var batchesSent = 0
    public var eventsAcknowledged = 0
    public var eventsRejected = 0
    public var errors = 0
    public var rewinds = 0
    public var lastError: String?
}

/// Sends the outbox to the broker, in order, at least once; the broker's
/// per-agent sequence makes the effect exactly once. One batch in flight.
/// Threading: loop-confined.
public final class Relay {
    let loop: EventLoop
    let store: AgentStore
    let writer: GroupCommitWriter
    let configuration: RelayConfiguration
    let client: HTTPClient
    private var timer: LoopTimer?
    private var inFlight = false
    private var scheduled = false
    private var failures = 0
    private var stopped = false
    public private(set) var statistics = RelayStatistics()
    public var logger = Logger(label: "scim-edge.relay")

    public init(loop: EventLoop, store: AgentStore, writer: GroupCommitWriter, configuration: RelayConfiguration) throws {
        self.loop = loop
        self.store = store
        self.writer = writer
        self.configuration = configuration
        let context = try TLSContext(role: .client, configuration: configuration.tls)
        client = HTTPClient(loop: loop, address: configuration.broker, tls: context, serverName: configuration.brokerName)
    }

    public func start() throws {
        let t = try LoopTimer(loop: loop)
        t.keepsLoopAlive = false
        timer = t
        schedule(after: 0)
    }

    public func stop() {
        stopped = true
        timer?.close()
        timer = nil
        client.close()
    }

    /// New events were committed: send them soon.
    public func kick() {
        guard !inFlight, !stopped else { return }
        schedule(after: configuration.lingerMilliseconds)
    }

    private func schedule(after milliseconds: UInt64) {
        guard let timer, !stopped else { return }
        scheduled = true
        timer.start(after: milliseconds) { [unowned self] in
            scheduled = false
            sendNext()
        }
    }

    private func idle() { schedule(after: configuration.pollMilliseconds) }

    private func sendNext() {
        guard !inFlight, !stopped else { return }
        let entries: [(UInt64, JSON)]
        do {
            entries = try store.outboxEntries(after: try store.acknowledgedSequence(), limit: configuration.maxEventsPerBatch)
        } catch {
            fail("cannot read the outbox: \(error)", retryAfter: nil)
            return
        }
        guard !entries.isEmpty else { idle(); return }
        var events: [JSON] = []
        var bytes = 0
        for (_, e) in entries {
            let size = e.serialized().count
            if !events.isEmpty && bytes + size > configuration.maxBytesPerBatch { break }
            events.append(e)
            bytes += size
        }
        let first = entries[0].0, last = entries[events.count - 1].0
        let batch: JSON = [
            "agent": .string(configuration.agentName), "domain": .string(configuration.domain),
            "firstSeq": .number(JSONNumber(integer: Int64(first))), "lastSeq": .number(JSONNumber(integer: Int64(last))),
            "events": .array(events),
        ]
        inFlight = true
        statistics.batchesSent += 1
        let request = HTTPRequest(method: "POST", target: "/federation/v1/events",
                                  headers: ["Content-Type": "application/json"], body: batch.serialized())
        client.send(request) { [weak self] result in self?.answered(result, first: first, last: last) }
    }

    private func answered(_ result: Result<HTTPResponse, HTTPClientError>, first: UInt64, last: UInt64) {
        inFlight = false
        guard !stopped else { return }
        switch result {
        case .failure(let e):
            fail("broker unreachable: \(e)", retryAfter: nil)
        case .success(let r):
            let body = try? JSONParser.parse(r.body)
            switch r.status {
            case 200:
                guard let acked = body?["ackedThrough"]?.numberValue?.integer.map(UInt64.init), acked >= first - 1 else {
                    fail("broker answered 200 without a usable ackedThrough", retryAfter: nil)
                    return
                }
                var rejected: [UInt64: String] = [:]
                for (seq, reason) in body?["rejected"]?.objectValue ?? JSONObject() {
                    if let n = UInt64(seq) { rejected[n] = reason["description"]?.stringValue ?? reason.text }
                }
                if !rejected.isEmpty {
                    statistics.eventsRejected += rejected.count
                    logger.error("broker rejected events for good: kept as dead letters",
                                 metadata: ["sequences": .string(rejected.keys.sorted().map(String.init).joined(separator: ","))])
                }
                acknowledge(through: acked, rejected: rejected)
            case 409:
                guard let expected = body?["expectedSeq"]?.numberValue?.integer.map(UInt64.init), expected >= 1 else {
                    fail("broker answered 409 without expectedSeq", retryAfter: nil)
                    return
                }
                statistics.rewinds += 1
                // The broker has everything before `expected`: continue from there.
                logger.warning("broker expects another sequence", metadata: ["expected": .string(String(expected)), "sent": .string(String(first))])
                if expected - 1 >= first { acknowledge(through: expected - 1) } else {
                    fail("broker expects sequence \(expected) but this agent already pruned it", retryAfter: nil)
                }
            case 429, 503:
                fail("broker busy (\(r.status))", retryAfter: r.headers["Retry-After"].flatMap(UInt64.init))
            default:
                fail("broker refused the batch: \(r.status) \(body?["description"]?.stringValue ?? r.bodyText)", retryAfter: nil)
            }
        }
    }

    /// Prunes through `sequence` durably (group commit), then sends more.
    private func acknowledge(through sequence: UInt64, rejected: [UInt64: String] = [:]) {
        let store = self.store
        var ts = timespec()
        clock_gettime(CLOCK_REALTIME, &ts)
        let now = Int64(ts.tv_sec)
        inFlight = true
        writer.submit({ txn in try store.acknowledge(through: sequence, rejected: rejected, at: now, in: txn) }) { [weak self] result in
            guard let self else { return }
            inFlight = false
            switch result {
            case .success(let n):
                failures = 0
                statistics.eventsAcknowledged += n
                schedule(after: 0)
            case .failure(let e):
                fail("cannot record the acknowledgement: \(e)", retryAfter: nil)
            }
        }
    }

    /// Capped exponential backoff with full jitter, or the broker's Retry-After.
    private func fail(_ message: String, retryAfter: UInt64?) {
        failures += 1
        statistics.errors += 1
        statistics.lastError = message
        logger.warning("relay: \(message)")
        let delay: UInt64
        if let retryAfter {
            delay = retryAfter * 1000
        } else {
            let cap = min(configuration.maxBackoffMilliseconds, 100 << UInt64(min(failures, 16)))
            delay = UInt64.random(in: 0...cap)
        }
        schedule(after: delay)
    }
}
