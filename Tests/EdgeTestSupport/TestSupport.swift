import EdgeHTTP
import EdgeLoop
import EdgeTLS
// Shared by the test targets only. Foundation is fine here: this module is
// never linked into the agent or broker binaries.
import Foundation

/// A fresh directory under the system temp dir, removed by `remove()`.
public final class TempDirectory: @unchecked Sendable {  // immutable after init
    public let path: String
    public init(_ prefix: String = "scim-edge-test") {
        let base = FileManager.default.temporaryDirectory.path
        var template = Array("\(base)/\(prefix).XXXXXX".utf8CString)
        let made = template.withUnsafeMutableBufferPointer { mkdtemp($0.baseAddress!) }
        precondition(made != nil, "mkdtemp failed")
        path = String(decoding: template.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }
    public func file(_ name: String) -> String { "\(path)/\(name)" }
    public func write(_ name: String, _ text: String) -> String {
        let p = file(name)
        _ = FileManager.default.createFile(atPath: p, contents: Data(text.utf8))
        return p
    }
    public func remove() { try? FileManager.default.removeItem(atPath: path) }
}

/// Certificates for TLS tests, written as PEM files: a federation CA, a
/// server (localhost / 127.0.0.1 / ::1), a good client, and the bad ones.
public struct TestPKI: Sendable {
    public let caFile: String
    public let serverCert: String, serverKey: String
    public let clientCert: String, clientKey: String
    public let otherCAClientCert: String, otherCAClientKey: String
    public let expiredClientCert: String, expiredClientKey: String
    public let revokedClientCert: String, revokedClientKey: String
    public let crlFile: String
    public let otherCAFile: String
    /// A server certificate valid only for `wrong.example`.
    public let wrongHostServerCert: String, wrongHostServerKey: String
    public let clientURI = "spiffe://scim-edge.test/agent/agent-1"

    public init(in dir: TempDirectory) throws {
        let ca = try CertificateAuthority(commonName: "scim-edge test federation CA")
        let other = try CertificateAuthority(commonName: "some other CA")
        func save(_ name: String, _ c: Credential) -> (String, String) {
            (dir.write("\(name).crt", c.certificatePEM), dir.write("\(name).key", c.privateKeyPEM))
        }
        caFile = dir.write("ca.crt", ca.certificatePEM)
        otherCAFile = dir.write("other-ca.crt", other.certificatePEM)
        (serverCert, serverKey) = save(
            "server",
            try ca.issue(
                CertificateRequest(
                    commonName: "broker.test", dnsNames: ["localhost"], ipAddresses: ["127.0.0.1", "::1"])))
        (wrongHostServerCert, wrongHostServerKey) = save(
            "wrong-host",
            try ca.issue(
                CertificateRequest(
                    commonName: "wrong.example", dnsNames: ["wrong.example"])))
        (clientCert, clientKey) = save(
            "client",
            try ca.issue(
                CertificateRequest(
                    commonName: "agent-1", dnsNames: ["agent-1.acme-de.test"], uris: [clientURI])))
        (otherCAClientCert, otherCAClientKey) = save(
            "other-client",
            try other.issue(
                CertificateRequest(
                    commonName: "agent-1", uris: [clientURI])))
        (expiredClientCert, expiredClientKey) = save(
            "expired",
            try ca.issue(
                CertificateRequest(
                    commonName: "agent-expired", notBeforeOffset: -10 * 86400, notAfterOffset: -86400)))
        let revoked = try ca.issue(CertificateRequest(commonName: "agent-revoked"))
        (revokedClientCert, revokedClientKey) = save("revoked", revoked)
        crlFile = dir.write("ca.crl", try ca.revocationList(revoking: [revoked.serial]))
    }

    public func serverConfig(crl: Bool = true, requireClient: Bool = true) -> TLSConfiguration {
        TLSConfiguration(
            certificateChainFile: serverCert, privateKeyFile: serverKey, trustRootsFile: caFile,
            crlFile: crl ? crlFile : nil, verifyPeer: requireClient)
    }

    public func clientConfig(cert: String? = nil, key: String? = nil, noCert: Bool = false) -> TLSConfiguration {
        TLSConfiguration(
            certificateChainFile: noCert ? nil : (cert ?? clientCert),
            privateKeyFile: noCert ? nil : (key ?? clientKey), trustRootsFile: caFile)
    }
}

/// A blocking TCP client for feeding servers raw bytes (malformed HTTP).
public final class RawClient {
    public let fd: Int32

    public init(port: Int, host: String = "127.0.0.1", timeoutSeconds: Int = 10) throws {
        fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        guard fd >= 0 else { throw POSIXError(.EIO) }
        var tv = timeval(tv_sec: timeoutSeconds, tv_usec: 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
        var addr = sockaddr_in()
        addr.sin_family = sa_family_t(AF_INET)
        addr.sin_port = UInt16(port).bigEndian
        inet_pton(AF_INET, host, &addr.sin_addr)
        let rc = withUnsafePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { Glibc.connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
        }
        guard rc == 0 else { close(fd); throw POSIXError(.ECONNREFUSED) }
    }

    deinit { close(fd) }

    @discardableResult
    public func send(_ text: String) -> Bool { send(Array(text.utf8)) }

    @discardableResult
    public func send(_ bytes: [UInt8]) -> Bool {
        var off = 0
        while off < bytes.count {
            let n = bytes[off...].withUnsafeBytes { Glibc.send(fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }
            if n <= 0 { return false }
            off += n
        }
        return true
    }

    /// Reads until the peer closes or the receive timeout passes.
    public func readToEnd() -> String {
        var out: [UInt8] = []
        var buf = [UInt8](repeating: 0, count: 65536)
        while true {
            let n = recv(fd, &buf, buf.count, 0)
            if n <= 0 { break }
            out.append(contentsOf: buf[0..<n])
        }
        return String(decoding: out, as: UTF8.self)
    }

    /// Reads exactly `count` complete responses (status line, headers,
    /// Content-Length body) and returns them as (status, headers text, body).
    public func readResponses(_ count: Int) -> [(status: Int, head: String, body: String)] {
        var data: [UInt8] = []
        var results: [(Int, String, String)] = []
        var buf = [UInt8](repeating: 0, count: 65536)
        while results.count < count {
            if let (r, used) = Self.parseOne(data) {
                results.append(r)
                data.removeFirst(used)
                continue
            }
            let n = recv(fd, &buf, buf.count, 0)
            if n <= 0 { break }
            data.append(contentsOf: buf[0..<n])
        }
        return results
    }

    static func parseOne(_ data: [UInt8]) -> ((Int, String, String), Int)? {
        let sep: [UInt8] = [13, 10, 13, 10]
        guard data.count >= 4 else { return nil }
        var end: Int?
        for i in 0...(data.count - 4) where Array(data[i..<i + 4]) == sep { end = i; break }
        guard let end else { return nil }
        let head = String(decoding: data[0..<end], as: UTF8.self)
        let status = Int(head.split(separator: " ").dropFirst().first ?? "") ?? 0
        var length = 0
        for line in head.split(separator: "\r\n") where line.lowercased().hasPrefix("content-length:") {
            length = Int(line.split(separator: ":")[1].trimmingCharacters(in: .whitespaces)) ?? 0
        }
        if head.lowercased().contains("\r\ntransfer-encoding: chunked") {
            guard let (body, used) = dechunk(data[(end + 4)...]) else { return nil }
            return ((status, head, String(decoding: body, as: UTF8.self)), end + 4 + used)
        }
        guard data.count >= end + 4 + length else { return nil }
        let body = String(decoding: data[(end + 4)..<(end + 4 + length)], as: UTF8.self)
        return ((status, head, body), end + 4 + length)
    }
}

/// A chunked body (RFC 9112 §7.1) at the start of `data`, and how many
/// bytes it took; nil while it is incomplete.
public func dechunk(_ data: ArraySlice<UInt8>) -> (body: [UInt8], used: Int)? {
    var i = data.startIndex, out: [UInt8] = []
    func line() -> String? {
        var j = i
        while j + 1 < data.endIndex, !(data[j] == 13 && data[j + 1] == 10) { j += 1 }
        guard j + 1 < data.endIndex else { return nil }
        defer { i = j + 2 }
        return String(decoding: data[i..<j], as: UTF8.self)
    }
    while let size = line().flatMap({ Int($0, radix: 16) }) {
        if size == 0 {
            guard i + 1 < data.endIndex else { return nil }
            return (out, i + 2 - data.startIndex)  // no trailers: the last chunk's empty line
        }
        guard i + size + 2 <= data.endIndex else { return nil }
        out.append(contentsOf: data[i..<(i + size)])
        i += size + 2
    }
    return nil
}

/// Sockets in this process (a server or client of a test's own) write to
/// peers that may have gone: SIGPIPE is ignored, as the programs ignore it
/// (`ServiceSignals`), or it ends the whole test run (signal 13) as soon as
/// a test's timing has a peer close first.
public func ignoreBrokenPipes() { signal(SIGPIPE, SIG_IGN) }

/// An HTTP server on its own loop thread, for tests.
public final class ServerHarness: Sendable {
    public let port: Int
    private let thread: LoopThread
    private let server: LoopBound<HTTPServer>
    public let tlsFailures = Locked<[String]>([])

    public init(
        tls: TLSConfiguration? = nil, limits: HTTPServerLimits = HTTPServerLimits(),
        host: String = "127.0.0.1",
        handler: @escaping @Sendable (HTTPRequest, RequestContext, Responder) -> Void
    ) throws {
        ignoreBrokenPipes()
        let ready = OneShot<LoopBound<HTTPServer>>()
        let failures = tlsFailures
        thread = try LoopThread.start { loop in
            let context = try tls.map { try ReloadableTLSContext(role: .server, configuration: $0) }
            let server = try HTTPServer(
                loop: loop, address: SocketAddress(host: host, port: 0), tls: context,
                limits: limits, handler: handler)
            server.onTLSFailure = { error, _ in failures.withLock { $0.append(error.description) } }
            ready.fulfil(LoopBound(server))
        }
        guard let bound = ready.wait(seconds: 10) else { throw POSIXError(.ETIMEDOUT) }
        server = bound
        port = thread.inbox.sendAndWait { bound.value.port } ?? 0
    }

    /// Runs `body` with the server on its loop and returns its result.
    public func onLoop<T: Sendable>(_ body: @escaping @Sendable (HTTPServer) -> T) -> T? {
        let server = self.server
        return thread.inbox.sendAndWait { body(server.value) }
    }

    /// Graceful shutdown; returns the handles left open when the loop closed (0 = clean).
    public func stop() -> Int {
        let server = self.server
        thread.inbox.send { server.value.shutdown() }
        return thread.join()
    }
}

extension LoopInbox {
    /// Runs `job` on the loop and waits for its result.
    public func sendAndWait<T: Sendable>(seconds: Double = 10, _ job: @escaping @Sendable () -> T) -> T? {
        let shot = OneShot<T>()
        guard send({ shot.fulfil(job()) }) else { return nil }
        return shot.wait(seconds: seconds)
    }
}

/// Runs `body` on a fresh loop thread; `body` calls `finish` with its result
/// once it has closed everything it opened. Returns the result and the number
/// of handles still open when the loop closed (must be 0).
public func runOnLoop<T: Sendable>(
    timeout: Double = 30,
    _ body: @escaping @Sendable (EventLoop, @escaping @Sendable (T) -> Void) throws -> Void
)
    throws -> (T?, Int)
{
    ignoreBrokenPipes()
    let result = OneShot<T>()
    let thread = try LoopThread.start { loop in try body(loop) { result.fulfil($0) } }
    let value = result.wait(seconds: timeout)
    let leftOpen = thread.join()
    return (value, leftOpen)
}

/// A value behind a lock, for collecting results across threads in tests.
public final class Locked<Value>: @unchecked Sendable {  // every access holds the lock
    private var value: Value
    private let lock = NSLock()
    public init(_ value: Value) { self.value = value }
    @discardableResult
    public func withLock<R>(_ body: (inout Value) -> R) -> R {
        lock.lock(); defer { lock.unlock() }
        return body(&value)
    }
    public var current: Value { withLock { $0 } }
}

/// The directory of the test binary, where SwiftPM also puts `edge-fixture`.
public var productsDirectory: String {
    let exe = CommandLine.arguments[0]
    var dir = (exe as NSString).deletingLastPathComponent
    // `.xctest` bundles on Linux are plain executables next to the products.
    if dir.hasSuffix(".xctest") { dir = (dir as NSString).deletingLastPathComponent }
    return dir
}

/// A child process whose standard output is collected line by line.
public final class ChildProcess: @unchecked Sendable {  // lines behind a lock; process only used by the test thread
    public let process = Process()
    private let lines = Locked<[String]>([])
    private let reader: Thread
    /// Signalled when the reader saw the end of the output (every line is in `lines`).
    private let readerDone = DispatchSemaphore(value: 0)

    public init(_ executable: String, _ arguments: [String]) throws {
        process.executableURL = URL(fileURLWithPath: executable)
        process.arguments = arguments
        let pipe = Pipe()
        process.standardOutput = pipe
        let handle = pipe.fileHandleForReading
        let lines = self.lines, done = readerDone
        reader = Thread {
            var pending = ""
            while true {
                let data = handle.availableData
                if data.isEmpty { break }
                pending += String(decoding: data, as: UTF8.self)
                // A terminal's lines end in CRLF, which Swift reads as one Character.
                while let nl = pending.firstIndex(where: { $0 == "\n" || $0 == "\r\n" }) {
                    let line = String(pending[..<nl])
                    pending = String(pending[pending.index(after: nl)...])
                    lines.withLock { $0.append(line) }
                }
            }
            if !pending.isEmpty { lines.withLock { $0.append(pending) } }  // a last line without a newline
            done.signal()
        }
        try process.run()
        reader.start()
    }

    deinit {
        if process.isRunning { kill(process.processIdentifier, SIGKILL) }
    }

    public var output: [String] { lines.current }

    /// Waits for a line starting with `prefix`, or a JSON log line whose
    /// message starts with it; returns the line.
    public func waitForLine(_ prefix: String, seconds: Double = 10) -> String? {
        let deadline = Date().addingTimeInterval(seconds)
        while Date() < deadline {
            if let l = lines.current.first(where: { $0.hasPrefix(prefix) || $0.contains("\"msg\":\"\(prefix)") }) { return l }
            usleep(5_000)
        }
        return nil
    }

    public func signal(_ sig: Int32) { kill(process.processIdentifier, sig) }

    /// Waits for the exit and for the output reader to have read every line
    /// (bounded: a grandchild may keep the pipe open); returns the status,
    /// or nil on timeout.
    public func waitForExit(seconds: Double = 10) -> Int32? {
        let deadline = Date().addingTimeInterval(seconds)
        while process.isRunning && Date() < deadline { usleep(5_000) }
        guard !process.isRunning else { return nil }
        if !readerJoined {
            readerJoined = readerDone.wait(timeout: .now() + min(2, max(0.1, deadline.timeIntervalSinceNow))) == .success
        }
        return process.terminationStatus
    }

    private var readerJoined = false
}

/// Polls `condition` until it holds or `seconds` pass; returns whether it held.
/// For effects another thread or process reports asynchronously.
public func eventually(seconds: Double = 5, _ condition: () -> Bool) -> Bool {
    let deadline = Date().addingTimeInterval(seconds)
    while Date() < deadline {
        if condition() { return true }
        usleep(5_000)
    }
    return condition()
}

/// A small deterministic generator (reproducible test data and faults).
public struct SplitMix: RandomNumberGenerator {
    public var state: UInt64
    public init(seed: UInt64) { state = seed }
    public mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
    public mutating func below(_ n: Int) -> Int { Int(next() % UInt64(n)) }
}

/// Why a test's helper could not set up what it needed.
public struct TestSetupError: Error, CustomStringConvertible {
    public let description: String
    public init(_ description: String) { self.description = description }
}

/// The reference SCIM server (scim2-server from PyPI, in `.venv`: `make
/// venv`; `SCIM2_SERVER` overrides the path) as a real process on
/// 127.0.0.1:`port`, accepting `token`; returns once it answers.
public func startReferenceSCIMServer(port: Int, token: String = "ref-token", arguments: [String] = []) throws -> ChildProcess {
    let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent().path
    let exe = ProcessInfo.processInfo.environment["SCIM2_SERVER"] ?? root + "/.venv/bin/scim2-server"
    guard FileManager.default.isExecutableFile(atPath: exe) else {
        throw TestSetupError("scim2-server is not installed at \(exe): run `make venv` (make test does)")
    }
    let child = try ChildProcess(
        "/usr/bin/env", ["PYTHONUNBUFFERED=1", exe, "--port", String(port), "--bearer-token", token] + arguments)
    let up = eventually(seconds: 20) {
        guard let c = try? RawClient(port: port),
            c.send("GET /ServiceProviderConfig HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer \(token)\r\nConnection: close\r\n\r\n")
        else { return false }
        return c.readResponses(1).first?.status == 200
    }
    guard up else { throw TestSetupError("scim2-server did not start: \(child.output.suffix(5))") }
    return child
}
