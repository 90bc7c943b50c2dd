// Platform-layer benchmarks: HTTP round trips over loopback (plain and TLS,
// keep-alive) and LMDB durable writes (one commit per write vs group commit).
// Malloc counts are process-wide: they include the server's and client's loops.
import Benchmark
import EdgeHTTP
import EdgeLoop
import EdgeStore
import EdgeTLS
import Glibc

let benchmarks: @Sendable () -> Void = {
    let http = Benchmark.Configuration(metrics: [.throughput, .wallClock, .mallocCountTotal, .peakMemoryResident],
                                      scalingFactor: .kilo, maxDuration: .seconds(3), maxIterations: 1_000_000)
    let disk = Benchmark.Configuration(metrics: [.throughput, .wallClock, .mallocCountTotal],
                                      scalingFactor: .kilo, maxDuration: .seconds(4), maxIterations: 1_000_000)

    Benchmark("HTTP keep-alive round trips, plain, 16 connections", configuration: http) { benchmark in
        let rig = HTTPRig.shared(tls: false)
        benchmark.startMeasurement()
        rig.roundTrips(benchmark.scaledIterations.count)
    }
    Benchmark("HTTP keep-alive round trips, TLS 1.3 mutual, 16 connections", configuration: http) { benchmark in
        let rig = HTTPRig.shared(tls: true)
        benchmark.startMeasurement()
        rig.roundTrips(benchmark.scaledIterations.count)
    }
    Benchmark("LMDB durable writes, one commit per write", configuration: disk) { benchmark in
        let store = StoreRig.make()
        defer { store.remove() }
        benchmark.startMeasurement()
        let value = [UInt8](repeating: 42, count: 1024)
        for i in benchmark.scaledIterations {
            try store.env.write { txn in try txn.put(store.db, UInt64(i).bigEndianBytes, value) }
        }
    }
    Benchmark("LMDB durable writes, group commit, 16 concurrent writers", configuration: disk) { benchmark in
        let store = StoreRig.make()
        defer { store.remove() }
        benchmark.startMeasurement()
        store.groupWrites(benchmark.scaledIterations.count, writers: 16)
    }
}

/// A server and 16 clients, each on its own loop thread, set up once.
final class HTTPRig: @unchecked Sendable {  // immutable after init; loop objects only touched on their loops
    nonisolated(unsafe) static var rigs: [Bool: HTTPRig] = [:]
    static func shared(tls: Bool) -> HTTPRig {
        if let r = rigs[tls] { return r }
        let r = try! HTTPRig(tls: tls)
        rigs[tls] = r
        return r
    }

    let serverThread: LoopThread
    let clientThread: LoopThread
    let clients: LoopBound<[HTTPClient]>

    init(tls: Bool) throws {
        let dir = "/tmp/scim-edge-bench-pki-\(getpid())"
        mkdir(dir, 0o700)
        let ca = try CertificateAuthority(commonName: "bench CA")
        func save(_ name: String, _ text: String) -> String {
            let path = "\(dir)/\(name)"
            let f = fopen(path, "w")!
            fputs(text, f)
            fclose(f)
            return path
        }
        let caFile = save("ca.crt", ca.certificatePEM)
        let server = try ca.issue(CertificateRequest(commonName: "localhost", ipAddresses: ["127.0.0.1"]))
        let client = try ca.issue(CertificateRequest(commonName: "agent", uris: ["spiffe://bench/agent"]))
        let serverTLS = TLSConfiguration(certificateChainFile: save("s.crt", server.certificatePEM),
                                         privateKeyFile: save("s.key", server.privateKeyPEM), trustRootsFile: caFile)
        let clientTLS = TLSConfiguration(certificateChainFile: save("c.crt", client.certificatePEM),
                                         privateKeyFile: save("c.key", client.privateKeyPEM), trustRootsFile: caFile)
        let port = OneShot<Int>()
        let body = Array(#"{"ok":true}"#.utf8)
        serverThread = try LoopThread.start { loop in
            let context = tls ? try ReloadableTLSContext(role: .server, configuration: serverTLS) : nil
            let s = try HTTPServer(loop: loop, address: SocketAddress(host: "127.0.0.1", port: 0), tls: context) { _, _, r in
                r.respond(HTTPResponse(status: 200, headers: ["Content-Type": "application/json"], body: body))
            }
            port.fulfil(s.port)
        }
        let p = port.wait()!
        let made = OneShot<LoopBound<[HTTPClient]>>()
        clientThread = try LoopThread.start { loop in
            let context = tls ? try TLSContext(role: .client, configuration: clientTLS) : nil
            let keep = try LoopTimer(loop: loop)
            keep.start(after: 1 << 40) {}  // the client loop lives as long as the process
            made.fulfil(LoopBound((0..<16).map { _ in
                HTTPClient(loop: loop, address: SocketAddress(host: "127.0.0.1", port: p), tls: context)
            }))
        }
        clients = made.wait()!
    }

    /// `count` requests, 16 connections each with one request outstanding.
    func roundTrips(_ count: Int) {
        let done = OneShot<Bool>()
        let clients = self.clients
        clientThread.inbox.send {
            var remaining = count
            var started = 0
            func next(_ client: HTTPClient) {
                guard started < count else { return }
                started += 1
                client.send(HTTPRequest(method: "GET", target: "/scim/v2/Users/1")) { result in
                    precondition((try? result.get().status) == 200, "request failed: \(result)")
                    remaining -= 1
                    if remaining == 0 { done.fulfil(true) } else { next(client) }
                }
            }
            for c in clients.value { next(c) }
        }
        _ = done.wait(seconds: 120)
    }
}

final class StoreRig: @unchecked Sendable {  // used by one benchmark at a time
    let path: String
    let env: Environment
    let db: Database

    static func make() -> StoreRig { try! StoreRig() }

    init() throws {
        path = "/var/tmp/scim-edge-bench-lmdb-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        env = try Environment(EnvironmentOptions(path: path))
        db = try env.openDatabase("bench")
    }

    func remove() {
        unlink(path + "/data.mdb")
        unlink(path + "/lock.mdb")
        rmdir(path)
    }

    /// `count` durable 1 KiB writes from `writers` concurrent submitters on one loop.
    func groupWrites(_ count: Int, writers: Int) {
        let env = self.env, db = self.db
        let (_, _) = try! runLoop { loop, finish in
            let writer = GroupCommitWriter(environment: env, inbox: loop.inbox)
            var submitted = 0, completed = 0
            let value = [UInt8](repeating: 42, count: 1024)
            func submit() {
                guard submitted < count else { return }
                submitted += 1
                let key = UInt64(submitted).bigEndianBytes
                writer.submit({ txn in try txn.put(db, key, value) }) { result in
                    precondition((try? result.get()) != nil, "write failed: \(result)")
                    completed += 1
                    if completed == count { finish() } else { submit() }
                }
            }
            for _ in 0..<writers { submit() }
        }
    }
}

/// Runs `body` on a fresh loop until it calls `finish`.
func runLoop(_ body: @escaping @Sendable (EventLoop, @escaping () -> Void) -> Void) throws -> (Bool, Int) {
    let done = OneShot<Bool>()
    let thread = try LoopThread.start { loop in body(loop) { done.fulfil(true) } }
    let ok = done.wait(seconds: 300) ?? false
    return (ok, thread.join())
}
