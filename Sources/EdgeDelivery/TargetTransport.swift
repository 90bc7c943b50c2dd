import EdgeHTTP
import EdgeLoop
import EdgeMetrics
import EdgeTLS

/// How a worker reaches its target. `HTTPTargetTransport` in the programs;
/// tests give a simulated target. Threading: the worker's loop.
package protocol TargetTransport: AnyObject {
    /// Why nothing can be sent now (the host does not resolve); nil: ready.
    func unreachable() -> String?
    /// Sends one request; `completion` runs on the worker's loop.
    func send(_ request: HTTPRequest, _ completion: @escaping (Result<HTTPResponse, HTTPClientError>) -> Void)
    /// Drops the connections: the next request resolves the host and connects again.
    func reset()
    /// SIGHUP: the target's CA and client certificate are read again.
    func reloadTLS() throws
    func close()
}

/// One kept-alive connection per unit of the target's concurrency, to the
/// address its host name resolves to now, over TLS for `https` (the CA and
/// client certificate re-read on SIGHUP: a rotated client certificate
/// resumes a paused target).
final class HTTPTargetTransport: TargetTransport {
    private let target: TargetConfiguration
    private let loop: EventLoop
    private var clients: [HTTPClient] = []
    private var tlsContext: ReloadableTLSContext?
    private var options = HTTPClientOptions()

    init(target: TargetConfiguration, loop: EventLoop) throws {
        self.target = target
        self.loop = loop
        if target.useTLS {
            var tls = target.tls
            tls.verifyPeer = true
            tlsContext = try ReloadableTLSContext(role: .client, configuration: tls)
        }
        options.maxPipelined = 1
        options.responseTimeoutMilliseconds = target.requestTimeoutMilliseconds
        options.connectTimeoutMilliseconds = min(5_000, target.requestTimeoutMilliseconds)
    }

    func unreachable() -> String? {
        guard clients.isEmpty else { return nil }
        guard let address = target.resolveAddress() else { return "cannot resolve \(target.host)" }
        let serverName = target.useTLS ? target.host : nil
        for _ in 0..<max(1, target.concurrency) {
            clients.append(
                tlsContext.map { HTTPClient(loop: loop, address: address, reloadableTLS: $0, serverName: serverName, options: options) }
                    ?? HTTPClient(loop: loop, address: address, serverName: serverName, options: options))
        }
        return nil
    }

    func send(_ request: HTTPRequest, _ completion: @escaping (Result<HTTPResponse, HTTPClientError>) -> Void) {
        guard unreachable() == nil, let client = clients.min(by: { $0.outstanding < $1.outstanding }) else {
            completion(.failure(.connectFailed("cannot resolve \(target.host)")))
            return
        }
        client.send(request, completion: completion)
    }

    func reset() {
        for c in clients { c.close() }
        clients.removeAll()
    }

    func reloadTLS() throws {
        guard let tlsContext else { return }
        try tlsContext.reload()
        reset()  // the next requests handshake with what was re-read
    }

    func close() { for c in clients { c.close() } }
}

/// The jitter of retries: the system's generator, or a seeded one
/// (SplitMix64) so that a test's schedule is reproducible.
public struct DeliveryRandom: RandomNumberGenerator, Sendable {
    private var state: UInt64?

    public static var system: DeliveryRandom { DeliveryRandom(state: nil) }
    public init(seed: UInt64) { state = seed }
    private init(state: UInt64?) { self.state = state }

    public mutating func next() -> UInt64 {
        guard var s = state else {
            var g = SystemRandomNumberGenerator()
            return g.next()
        }
        s &+= 0x9E37_79B9_7F4A_7C15
        state = s
        var z = s
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
}

/// Latencies of the last 10 s for the /metrics summaries: per-second
/// histograms (`RecentLatencies`), so a scrape costs the same whatever the
/// traffic and memory is fixed.
public struct RecentSamples: Sendable {
    private var latencies = RecentLatencies(windowSeconds: 10)

    public init() {}

    public mutating func add(at: Int64, seconds: Double) {
        latencies.record(UInt64(max(0, seconds) * 1_000_000), atMillis: at)
    }

    /// Quantiles `qs` over the last 10 s, in seconds.
    public func quantiles(_ qs: [Double]) -> (count: Int, values: [Double]) {
        let window = latencies.window(nowMillis: unixMilliseconds())
        return (Int(window.count), qs.map { Double(window.quantile($0)) / 1_000_000 })
    }

    public func summary(_ name: String, _ help: String) -> String {
        let (n, q) = quantiles([0.5, 0.99])
        return "# HELP \(name) \(help)\n# TYPE \(name) summary\n"
            + "\(name){quantile=\"0.5\"} \(q[0])\n\(name){quantile=\"0.99\"} \(q[1])\n\(name)_count \(n)\n"
    }
}
