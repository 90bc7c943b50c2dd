import EdgeHTTP
import EdgeLoop
import EdgeMetrics
import EdgeTLS
import Glibc
import SCIM

/// The requests `scim-edge bench` mixes.
public enum BenchOperation: String, Sendable, CaseIterable {
    /// `POST /Users` with a new, unique user.
    case post
    /// `GET /Users/{id}` of a user created by this run.
    case get
    /// `PATCH /Users/{id}`: replace `title`.
    case patch
    /// `GET /Users?filter=userName eq "…"` of a user created by this run.
    case filter
}

public struct BenchOptions {
    /// The SCIM base, e.g. `http://127.0.0.1:8080/scim/v2`.
    public var url: ServiceURL
    public var token: String?
    public var connections = 16
    /// Stop after this many seconds, or after `requests` (whichever is given; default 10 s).
    public var duration: Double?
    public var requests: Int?
    /// Open loop at this many requests/s; nil: closed loop (each connection
    /// sends its next request when the previous one is answered).
    public var rate: Double?
    /// Weights of the operations.
    public var mix: [(BenchOperation, Int)] = [(.post, 1)]
    /// Users created before the measurement when the mix reads or updates.
    public var seedUsers = 200
    /// https: the CA to verify the server (nil: the system's), a client certificate.
    public var tls = TLSConfiguration(minimumVersion: .tls12)
    /// A prefix for the userNames this run creates (unique per run by default).
    public var prefix: String
    /// Called about every second with a progress snapshot.
    public var progress: ((BenchProgress) -> Void)?

    public init(url: ServiceURL) {
        self.url = url
        prefix = "bench-" + hexString(secureRandomBytes(4))
    }

    /// Parses `post=70,get=20,patch=10`.
    public static func parseMix(_ text: String) -> [(BenchOperation, Int)]? {
        var out: [(BenchOperation, Int)] = []
        for part in text.split(separator: ",") {
            let kv = part.split(separator: "=")
            guard kv.count == 2, let op = BenchOperation(rawValue: String(kv[0])), let w = Int(kv[1]), w >= 0 else { return nil }
            if w > 0 { out.append((op, w)) }
        }
        return out.isEmpty ? nil : out
    }
}

public struct BenchProgress: Sendable {
    public var elapsed: Double
    public var completed: Int
    public var errors: Int
    public var recentP99Micros: UInt64
}

/// One second of the run.
public struct BenchSecond: Sendable {
    public var second: Int
    public var completed: Int
    public var p50Micros: UInt64
    public var p99Micros: UInt64
}

public struct BenchReport: Sendable {
    public var options: (connections: Int, rate: Double?, url: String, mix: String)
    public var duration: Double
    public var latency = LatencyHistogram()
    public var byOperation: [String: LatencyHistogram] = [:]
    public var statuses: [Int: Int] = [:]
    public var errors: [String: Int] = [:]
    public var timeline: [BenchSecond] = []
    /// Requests an open loop could not start on time because every connection was busy (still measured from their intended time).
    public var queuedBehind = 0
    /// Broker propagation quantiles read after the run (`--e2e-metrics`), name → value.
    public var propagation: [(String, Double)] = []

    /// Requests answered (any status); failures without an answer are in `errors`.
    public var completed: Int { Int(latency.count) }
    public var throughput: Double { duration > 0 ? Double(completed) / duration : 0 }
    public var errorCount: Int { errors.values.reduce(0, +) }
}

/// A load generator for any SCIM 2.0 endpoint: a fixed pool of kept-alive
/// connections (one request in flight each), closed or open loop. In open
/// loop every request has an intended start time on a constant schedule
/// and its latency is measured from that time, so a stalled server is not
/// hidden by the generator waiting for it (no coordinated omission).
/// Threading: loop-confined.
public final class Bench {
    let loop: EventLoop
    let options: BenchOptions
    private var clients: [HTTPClient] = []
    private var idle: [Int] = []
    private var ids: [(id: String, userName: String)] = []
    private var created = 0
    private var started = 0
    private var report: BenchReport
    private var startTime: UInt64 = 0
    private var deadline: UInt64?
    private var timer: LoopTimer?
    private var intendedNext: Double = 0
    private var backlog: [UInt64] = []  // intended start times (µs) waiting for a connection
    private var second = LatencyHistogram()
    private var secondIndex = 0
    private var secondCompleted = 0
    private var lastProgress: UInt64 = 0
    private var recent = LatencyHistogram()
    private var finished = false
    private var completion: ((BenchReport) -> Void)?
    private var weights: [BenchOperation] = []
    private var rng = SystemRandomNumberGenerator()

    public init(loop: EventLoop, options: BenchOptions) throws {
        self.loop = loop
        self.options = options
        let mixText = options.mix.map { "\($0.0.rawValue)=\($0.1)" }.joined(separator: ",")
        report = BenchReport(
            options: (
                options.connections, options.rate,
                "\(options.url.tls ? "https" : "http")://\(options.url.host):\(options.url.port)\(options.url.path)", mixText
            ),
            duration: 0)
        guard let address = options.url.resolveAddress() else { throw BenchError("cannot resolve \(options.url.host)") }
        var tls: TLSContext?
        if options.url.tls { tls = try TLSContext(role: .client, configuration: options.tls) }
        var o = HTTPClientOptions()
        o.maxPipelined = 1
        o.responseTimeoutMilliseconds = 60_000
        for i in 0..<max(1, options.connections) {
            clients.append(
                HTTPClient(loop: loop, address: address, tls: tls, serverName: options.url.tls ? options.url.host : nil, options: o))
            idle.append(i)
        }
        for (op, w) in options.mix { weights += Array(repeating: op, count: w) }
    }

    /// Seeds users when the mix needs them, runs, then calls `completion` on the loop.
    public func run(_ completion: @escaping (BenchReport) -> Void) {
        self.completion = completion
        if needsUsers { seed(remaining: options.seedUsers, inFlight: 0) } else { begin() }
    }

    private func seed(remaining: Int, inFlight: Int) {
        var remaining = remaining
        var inFlight = inFlight
        while remaining > 0, let c = idle.popLast() {
            remaining -= 1
            inFlight += 1
            clients[c].send(request(.post)) { [self] result in
                idle.append(c)
                if case .success(let r) = result { noteCreated(r) }
                inFlight -= 1
                if remaining == 0 && inFlight == 0 {
                    if ids.isEmpty { report.errors["seeding: no user could be created", default: 0] += 1; done(); return }
                    begin()
                } else {
                    seed(remaining: remaining, inFlight: inFlight)
                }
            }
        }
    }

    private func begin() {
        startTime = monotonicMicros()
        lastProgress = startTime
        if options.requests == nil || options.duration != nil {
            deadline = startTime + UInt64((options.duration ?? 10) * 1_000_000)
        }
        intendedNext = Double(startTime)
        guard let t = try? LoopTimer(loop: loop) else { done(); return }
        timer = t
        t.start(after: 1, repeatEvery: 1) { [weak self] in self?.tick() }
        if options.rate == nil { while let c = idle.popLast() { if !launch(on: c, intended: monotonicMicros()) { idle.append(c); break } } }
        tick()
    }

    /// Whether another request may start.
    private var budgetLeft: Bool {
        if let n = options.requests, started >= n { return false }
        if let deadline, monotonicMicros() >= deadline { return false }
        return true
    }

    private func tick() {
        guard !finished else { return }
        let now = monotonicMicros()
        if let rate = options.rate {
            let interval = 1_000_000 / rate
            while intendedNext <= Double(now), budgetLeft {
                let intended = UInt64(intendedNext)
                intendedNext += interval
                started += 1
                if let c = idle.popLast() { send(on: c, intended: intended) } else { backlog.append(intended); report.queuedBehind += 1 }
                if backlog.count > 1_000_000 {
                    report.errors["more than 1,000,000 requests behind schedule", default: 0] += 1; done(); return
                }
            }
        }
        if options.rate == nil {
            while budgetLeft, let c = idle.popLast() { launch(on: c, intended: now) }
        } else {
            while !backlog.isEmpty, let c = idle.popLast() { send(on: c, intended: backlog.removeFirst()) }
        }
        rollSeconds(now)
        if now - lastProgress >= 1_000_000 {
            lastProgress = now
            options.progress?(
                BenchProgress(
                    elapsed: Double(now - startTime) / 1e6, completed: report.completed,
                    errors: report.errorCount, recentP99Micros: recent.quantile(0.99)))
            recent = LatencyHistogram()
        }
        if !budgetLeft && backlog.isEmpty && idle.count == clients.count { done() }
    }

    private func rollSeconds(_ now: UInt64) {
        let s = Int((now - startTime) / 1_000_000)
        while secondIndex < s {
            report.timeline.append(
                BenchSecond(
                    second: secondIndex + 1, completed: secondCompleted,
                    p50Micros: second.quantile(0.5), p99Micros: second.quantile(0.99)))
            second = LatencyHistogram()
            secondCompleted = 0
            secondIndex += 1
        }
    }

    @discardableResult
    private func launch(on c: Int, intended: UInt64) -> Bool {
        guard budgetLeft else { return false }
        started += 1
        send(on: c, intended: intended)
        return true
    }

    private func send(on c: Int, intended: UInt64) {
        let op = weights.isEmpty ? .post : weights[Int.random(in: 0..<weights.count, using: &rng)]
        clients[c].send(request(op)) { [self] result in
            guard !finished else { return }
            let now = monotonicMicros()
            let micros = now > intended ? now - intended : 0
            switch result {
            case .success(let r):
                report.statuses[r.status, default: 0] += 1
                if op == .post { noteCreated(r) }
                // Latencies are of answered requests; failures are counted apart.
                report.latency.record(micros)
                report.byOperation[op.rawValue, default: LatencyHistogram()].record(micros)
                second.record(micros)
                recent.record(micros)
                secondCompleted += 1
            case .failure(let e):
                report.errors["\(e)", default: 0] += 1
            }
            // Next: the open loop's backlog first, else (closed loop) a new request.
            // After a failure the connection waits for the next tick: a client
            // that fails at once (closed, refused) must not recurse here.
            if case .failure = result {
                idle.append(c)
            } else if let next = backlog.first {
                backlog.removeFirst()
                send(on: c, intended: next)
            } else if options.rate == nil, launch(on: c, intended: now) {
            } else {
                idle.append(c)
                if !budgetLeft && idle.count == clients.count { done() }
            }
        }
    }

    /// Whether the mix reads or patches users this run created.
    private var needsUsers: Bool { options.mix.contains { $0.0 != .post } }

    /// Keeps the id of a created user (only when the mix needs them: parsing
    /// every answer would cost the generator CPU the server should get).
    private func noteCreated(_ r: HTTPResponse) {
        guard needsUsers, ids.count < 100_000, r.status == 201, let o = try? JSONParser.parse(r.body),
            let id = o["id"]?.stringValue
        else { return }
        ids.append((id, o["userName"]?.stringValue ?? ""))
    }

    private func request(_ op: BenchOperation) -> HTTPRequest {
        var h: HTTPHeaders = ["Accept": "application/scim+json"]
        if let token = options.token { h.set("Authorization", "Bearer \(token)") }
        let base = options.url.path
        let pick = ids.isEmpty ? nil : ids[Int.random(in: 0..<ids.count, using: &rng)]
        switch (op, pick) {
        case (.get, let p?):
            return HTTPRequest(method: "GET", target: "\(base)/Users/\(p.id)", headers: h)
        case (.patch, let p?):
            h.set("Content-Type", "application/scim+json")
            let body =
                #"{"schemas":["urn:ietf:params:scim:api:messages:2.0:PatchOp"],"Operations":[{"op":"replace","path":"title","value":"Title \#(started)"}]}"#
            return HTTPRequest(method: "PATCH", target: "\(base)/Users/\(p.id)", headers: h, body: Array(body.utf8))
        case (.filter, let p?):
            return HTTPRequest(method: "GET", target: "\(base)/Users?filter=userName%20eq%20%22\(p.userName)%22", headers: h)
        default:
            created += 1
            h.set("Content-Type", "application/scim+json")
            let n = created, user = "\(options.prefix)-\(n)"
            let body =
                #"{"schemas":["urn:ietf:params:scim:schemas:core:2.0:User"],"userName":"\#(user)","name":{"givenName":"Bench","familyName":"User \#(n)"},"displayName":"Bench User \#(n)","emails":[{"value":"\#(user)@bench.example","type":"work","primary":true}],"phoneNumbers":[{"value":"+1 555 0100","type":"work"}],"title":"Engineer","active":true}"#
            return HTTPRequest(method: "POST", target: "\(base)/Users", headers: h, body: Array(body.utf8))
        }
    }

    /// Stops now and reports what was measured so far.
    public func cancel() { done() }

    private func done() {
        guard !finished else { return }
        finished = true
        timer?.close()
        timer = nil
        let now = monotonicMicros()
        rollSeconds(now)
        if secondCompleted > 0 {
            report.timeline.append(
                BenchSecond(
                    second: secondIndex + 1, completed: secondCompleted,
                    p50Micros: second.quantile(0.5), p99Micros: second.quantile(0.99)))
        }
        report.duration = startTime == 0 ? 0 : Double(now - startTime) / 1e6
        for c in clients { c.close() }
        completion?(report)
        completion = nil
    }
}

public struct BenchError: Error, CustomStringConvertible {
    public let description: String
    public init(_ d: String) { description = d }
}

func monotonicMicros() -> UInt64 { monotonicMicroseconds() }
