import EdgeAgent
import EdgeConfig
import EdgeDelivery
import EdgeHTTP
// Test and benchmark fixture: a process the tests can SIGKILL, and a minimal
// HTTP server to compare with nginx. Not installed by the packages.
import EdgeLog
import EdgeLoop
import EdgeStore
import EdgeTLS
import EdgeTools
import Glibc
import SCIM

/// Unbuffered line output (file descriptors, not stdio: a SIGKILL must not
/// eat lines the parent is waiting for).
func emit(_ line: String, fd: Int32 = 1) { writeLine(line, fd: fd) }

func fail(_ message: String) -> Never {
    emit("edge-fixture: \(message)", fd: 2)
    exit(2)
}

/// Appends records forever, each commit holding one `data` entry and the
/// `meta` counter; prints `committed N` after each durable commit. The crash
/// test kills it and checks that everything printed is there, consistently.
func lmdbWriter(_ dir: String, groupCommit: Bool) throws {
    let env = try Environment(EnvironmentOptions(path: dir))
    let data = try env.openDatabase("data")
    let meta = try env.openDatabase("meta")
    var seq: UInt64 = try env.read { txn in try txn.get(meta, Array("counter".utf8)).flatMap(UInt64.init(bigEndianBytes:)) } ?? 0
    if !groupCommit {
        while true {
            seq += 1
            let n = seq
            try env.write { txn in
                try txn.put(data, n.bigEndianBytes, record(n))
                try txn.put(meta, Array("counter".utf8), n.bigEndianBytes)
            }
            emit("committed \(n)")
        }
    }
    // Group commit: 16 writers on one loop, each resubmitting when done.
    let loop = try EventLoop()
    let writer = GroupCommitWriter(environment: env, inbox: loop.inbox)
    func submitNext() {
        seq += 1
        let n = seq
        writer.submit({ txn in
            let current = try txn.get(meta, Array("counter".utf8)).flatMap(UInt64.init(bigEndianBytes:)) ?? 0
            try txn.put(data, n.bigEndianBytes, record(n))
            if n > current { try txn.put(meta, Array("counter".utf8), n.bigEndianBytes) }
            return n
        }) { result in
            if case .success(let n) = result { emit("committed \(n)") }
            submitNext()
        }
    }
    for _ in 0..<16 { submitNext() }
    if getenv("EDGE_FIXTURE_STATS") != nil {
        let stats = try LoopTimer(loop: loop)
        stats.start(after: 1000, repeatEvery: 1000) {
            let s = writer.statistics
            emit("stats batches=\(s.batches) writes=\(s.writes) largest=\(s.largestBatch)", fd: 2)
        }
    }
    while true { loop.runOnce(wait: true) }
}

/// Holds a read transaction open until killed: leaves a stale reader slot.
/// With `--idle` it only keeps the environment open (as `scim-edge status`
/// or a second tool would), so LMDB does not reset the reader table.
func lmdbReader(_ dir: String, idle: Bool) throws -> Never {
    let env = try Environment(EnvironmentOptions(path: dir))
    if idle {
        emit("open")
        while true { sleep(60) }
    }
    let db = try env.openDatabase("x")
    let txn = try env.beginRead()
    emit("reading")
    // Keep using it: a ~Copyable value may end at its last use.
    while true { _ = try txn.count(db); sleep(60) }
}

/// 1 KiB derived from the sequence number, so a torn value is detectable.
func record(_ n: UInt64) -> [UInt8] {
    (0..<1024).map { UInt8(truncatingIfNeeded: n &* 31 &+ UInt64($0)) }
}

/// Serves `200 ok` to every request, like the nginx reference config;
/// `/slow` answers after 300 ms. SIGTERM drains, SIGHUP reloads the certificate.
func httpServe(port: Int, cert: String?, key: String?) throws {
    let loop = try EventLoop()
    var tls: ReloadableTLSContext?
    if let cert, let key {
        tls = try ReloadableTLSContext(
            role: .server,
            configuration: TLSConfiguration(
                certificateChainFile: cert, privateKeyFile: key, verifyPeer: false))
    }
    var limits = HTTPServerLimits()
    limits.maxConnections = 10_000
    let body = Array("ok\n".utf8)
    let server = try HTTPServer(
        loop: loop, address: SocketAddress(host: "127.0.0.1", port: port), tls: tls,
        limits: limits
    ) { request, _, responder in
        if request.path == "/slow" {
            emit("in flight: /slow")  // the tests' signal that the request arrived
            let timer = try! LoopTimer(loop: loop)
            timer.start(after: 300) {
                responder.respond(HTTPResponse(status: 200, contentType: "text/plain", body: "slow\n"))
                timer.close()
            }
            return
        }
        responder.respond(HTTPResponse(status: 200, headers: ["Content-Type": "text/plain"], body: body))
    }
    var signals: ServiceSignals?
    signals = try ServiceSignals(
        loop: loop,
        onDrain: {
            emit("draining")
            server.shutdown {
                signals?.close()
                emit("drained")
            }
        },
        onReload: {
            do { try tls?.reload(); emit("reloaded") } catch { emit("reload failed: \(error)") }
        })
    emit("listening \(server.port)")
    loop.run()
    let left = loop.close()
    if left != 0 { fail("\(left) handles left open") }
}

let args = Array(CommandLine.arguments.dropFirst())
do {
    switch args.first {
    case "lmdb-writer":
        guard args.count >= 2 else { fail("usage: edge-fixture lmdb-writer DIR [--group]") }
        try lmdbWriter(args[1], groupCommit: args.contains("--group"))
    case "lmdb-reader":
        guard args.count >= 2 else { fail("usage: edge-fixture lmdb-reader DIR") }
        try lmdbReader(args[1], idle: args.contains("--idle"))
    case "lmdb-ceiling":
        // Batches of N puts committed durably back to back on one thread: the
        // ceiling group commit can reach without any thread hand-off.
        let env = try Environment(EnvironmentOptions(path: args[1]))
        let db = try env.openDatabase("c")
        let batch = Int(args[2]) ?? 16
        let value = [UInt8](repeating: 1, count: 1024)
        var t0 = timespec(), t1 = timespec()
        clock_gettime(CLOCK_MONOTONIC, &t0)
        var n: UInt64 = 0
        for _ in 0..<2000 {
            let txn = try env.beginWrite()
            for _ in 0..<batch { n += 1; try txn.put(db, n.bigEndianBytes, value) }
            try txn.commit()
        }
        clock_gettime(CLOCK_MONOTONIC, &t1)
        let secs = Double(t1.tv_sec - t0.tv_sec) + Double(t1.tv_nsec - t0.tv_nsec) / 1e9
        emit("commits/s \(Int(2000 / secs)) writes/s \(Int(Double(n) / secs))")
    case "deferred-steps":
        // The agent store's deferred work (a removed group's index entries, a local target's group index):
        // STEPS steps of it, each a durable commit of its own, `stepped K` after each; then it waits to be
        // SIGKILLed, so that the crash tests stop it between two chunks.
        guard args.count >= 3, let steps = Int(args[2]) else { fail("usage: edge-fixture deferred-steps DIR STEPS [--target NAME]") }
        var targets: [TargetConfiguration] = []
        if let i = args.firstIndex(of: "--target"), i + 1 < args.count {
            var t = try TargetConfiguration(name: args[i + 1], url: "http://127.0.0.1:9/scim/v2")
            t.routes = [try Route()]
            targets = [t]
        }
        let store = try AgentStore(path: args[1], registry: .standard, targets: targets)
        for k in 0..<steps {
            let r = try store.deferredStep(limit: deferredChunk)
            emit("stepped \(k + 1) swept \(r.swept) target \(r.delivery.swept) marked \(r.delivery.marked)")
        }
        emit("waiting")
        while true { sleep(60) }
    case "pki":
        // A throwaway federation PKI: ca.crt, broker.{crt,key} (127.0.0.1), agent.{crt,key}
        // with the identity spiffe://bench/<domain>/agent for each domain given.
        guard args.count >= 3 else { fail("usage: edge-fixture pki DIR DOMAIN...") }
        let ca = try CertificateAuthority(commonName: "bench federation CA")
        func save(_ name: String, _ text: String) throws {
            guard let f = fopen("\(args[1])/\(name)", "w") else { fail("cannot write \(args[1])/\(name)") }
            fputs(text, f)
            fclose(f)
        }
        try save("ca.crt", ca.certificatePEM)
        let b = try ca.issue(CertificateRequest(commonName: "broker", dnsNames: ["localhost"], ipAddresses: ["127.0.0.1"]))
        try save("broker.crt", b.certificatePEM)
        try save("broker.key", b.privateKeyPEM)
        for domain in args.dropFirst(2) {
            let a = try ca.issue(CertificateRequest(commonName: "agent-\(domain)", uris: ["spiffe://bench/\(domain)/agent"]))
            try save("\(domain).crt", a.certificatePEM)
            try save("\(domain).key", a.privateKeyPEM)
        }
    case "slapd-conf":
        // The slapd.conf of a throwaway directory (the sandbox's and the LDAP source tests'), for the benchmarks.
        guard args.count == 3 else { fail("usage: edge-fixture slapd-conf DATABASE-DIR PIDFILE") }
        writeLine(LocalDirectory.slapdConfig(database: args[1], pidFile: args[2]), newline: false)
    case "fill-outbox":
        // Appends N create events of distinct users to an agent's outbox (agent stopped), each
        // with a trace id of its own; BYTES pads each user (its `title`) to about that size.
        guard args.count >= 3, let n = Int(args[2]) else { fail("usage: edge-fixture fill-outbox DIR N [BYTES]") }
        let size = args.count > 3 ? Int(args[3]) ?? 0 : 0
        let store = try AgentStore(path: args[1], registry: .standard)
        for chunk in stride(from: 1, through: n, by: 50_000) {
            try store.environment.write { txn in
                for k in chunk...min(n, chunk + 49_999) {
                    var user: JSONObject = [
                        "schemas": ["urn:ietf:params:scim:schemas:core:2.0:User"], "id": .string("u\(k)"),
                        "userName": .string("user\(k)@example.com"), "active": true,
                        "name": ["givenName": "Bench", "familyName": .string("User \(k)")],
                        "meta": ["resourceType": "User", "version": "W/\"1\""],
                    ]
                    let bare = JSON.object(user).serialized().count + #","title":"""#.utf8.count
                    if size > bare { user["title"] = .string(String(repeating: "x", count: size - bare)) }
                    try store.appendEventForTesting(
                        uri: "urn:ietf:params:SCIM:event:prov:create:full", ref: "/Users/u\(k)",
                        data: user, WriteContext(newID: "", now: "", epochSeconds: 0, eventID: "f\(k)", traceID: "fill\(k)"),
                        in: txn)
                }
            }
        }
        emit("filled \(n)")
    case "scim-loop":
        // Profiling aid: parse + validate + serialise a JSON file N times (perf record this).
        let bytes = try readFileBytes(args[1])
        let registry = SchemaRegistry.standard
        let validator = ResourceValidator(registry: registry, type: registry.resourceType("User")!)
        var total = 0
        let parsed = try JSONParser.parse(bytes)
        let validateOnly = args.contains("--validate")
        for _ in 0..<(Int(args[2]) ?? 100_000) {
            if validateOnly { total &+= try validator.validateCreate(parsed).count; continue }
            total &+= JSON.object(try validator.validateCreate(try JSONParser.parse(bytes))).serialized().count
        }
        print(total)
    case "http-serve":
        func opt(_ name: String) -> String? { args.firstIndex(of: name).flatMap { $0 + 1 < args.count ? args[$0 + 1] : nil } }
        try httpServe(port: Int(opt("--port") ?? "0") ?? 0, cert: opt("--cert"), key: opt("--key"))
    default:
        fail("usage: edge-fixture lmdb-writer DIR [--group] | http-serve [--port P] [--cert F --key F]")
    }
} catch {
    fail("\(error)")
}
