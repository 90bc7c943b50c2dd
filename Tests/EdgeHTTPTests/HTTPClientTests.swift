import EdgeHTTP
import EdgeLoop
import EdgeTLS
import EdgeTestSupport
import Foundation
import XCTest

/// The HTTPClient against HTTPServer, each on its own loop thread, over real
/// sockets; TLS with certificates made by the test.
final class HTTPClientTests: XCTestCase {
    var dir: TempDirectory!
    var pki: TestPKI!

    override func setUpWithError() throws {
        dir = TempDirectory("edge-http")
        pki = try TestPKI(in: dir)
    }
    override func tearDown() { dir.remove() }

    /// Sends `requests` from a client on its own loop; returns one line per
    /// request (`status body` or `error …`) and the client's connection count.
    func exchange(
        port: Int, host: String = "127.0.0.1", tls: TLSConfiguration? = nil, serverName: String? = nil,
        options: HTTPClientOptions = HTTPClientOptions(), sequential: Bool = false,
        _ requests: [HTTPRequest]
    ) throws -> (lines: [String], connections: Int) {
        let (result, leftOpen) = try runOnLoop { (loop: EventLoop, finish: @escaping @Sendable ([String]) -> Void) in
            let context = try tls.map { try TLSContext(role: .client, configuration: $0) }
            let client = HTTPClient(
                loop: loop, address: SocketAddress(host: host, port: port), tls: context,
                serverName: serverName, options: options)
            var lines = [String](repeating: "", count: requests.count)
            var done = 0
            func complete(_ i: Int, _ r: Result<HTTPResponse, HTTPClientError>) {
                switch r {
                case .success(let resp): lines[i] = "\(resp.status) \(resp.bodyText)"
                case .failure(let e): lines[i] = "error \(e)"
                }
                done += 1
                if sequential && done < requests.count {
                    let next = done
                    client.send(requests[next]) { complete(next, $0) }
                }
                if done == requests.count {
                    lines.append("connections \(client.connectionsOpened)")
                    client.close()
                    finish(lines)
                }
            }
            if sequential {
                client.send(requests[0]) { complete(0, $0) }
            } else {
                for (i, r) in requests.enumerated() { client.send(r) { complete(i, $0) } }
            }
        }
        XCTAssertEqual(leftOpen, 0, "client loop closed cleanly")
        var lines = try XCTUnwrap(result)
        let connections = Int(lines.removeLast().dropFirst("connections ".count)) ?? -1
        return (lines, connections)
    }

    func get(_ path: String) -> HTTPRequest { HTTPRequest(method: "GET", target: path) }

    func testKeepAliveReusesOneConnection() throws {
        let server = try harness()
        let r = try exchange(port: server.port, sequential: true, (0..<50).map { get("/r\($0)") })
        XCTAssertEqual(r.lines, (0..<50).map { "200 /r\($0) GET" })
        XCTAssertEqual(r.connections, 1)
        XCTAssertEqual(server.onLoop { $0.statistics.acceptedConnections }, 1)
        XCTAssertEqual(server.stop(), 0)
    }

    func testPipelinedRequestsComeBackMatchedInOrder() throws {
        let server = try harness()
        var requests = (0..<40).map { i in i % 5 == 0 ? get("/slow/\(40 - i)") : get("/p\(i)") }
        requests.append(HTTPRequest(method: "POST", target: "/echo", body: Array("payload".utf8)))
        var options = HTTPClientOptions()
        options.maxPipelined = 8
        let r = try exchange(port: server.port, options: options, requests)
        for (i, line) in r.lines.dropLast().enumerated() {
            XCTAssertEqual(line, i % 5 == 0 ? "200 /slow/\(40 - i)" : "200 /p\(i) GET")
        }
        XCTAssertEqual(r.lines.last, "200 payload")
        XCTAssertEqual(r.connections, 1)
        XCTAssertEqual(server.stop(), 0)
    }

    func testReconnectsAfterTheServerClosesTheConnection() throws {
        var limits = HTTPServerLimits()
        limits.idleTimeoutMilliseconds = 100
        let server = try harness(limits: limits)
        // Requests spaced beyond the idle timeout: the server closes in between.
        let (result, leftOpen) = try runOnLoop { (loop: EventLoop, finish: @escaping @Sendable ([String]) -> Void) in
            let client = HTTPClient(loop: loop, address: SocketAddress(host: "127.0.0.1", port: server.port))
            var lines: [String] = []
            let timer = try LoopTimer(loop: loop)
            func step(_ i: Int) {
                client.send(HTTPRequest(method: "GET", target: "/s\(i)")) { r in
                    lines.append((try? r.get().bodyText) ?? "error \(r)")
                    if i == 2 {
                        lines.append("connections \(client.connectionsOpened)")
                        client.close()
                        timer.close()
                        finish(lines)
                    } else {
                        timer.start(after: 400) { step(i + 1) }
                    }
                }
            }
            step(0)
        }
        XCTAssertEqual(leftOpen, 0)
        XCTAssertEqual(result, ["/s0 GET", "/s1 GET", "/s2 GET", "connections 3"])
        XCTAssertEqual(server.stop(), 0)
    }

    /// A response delimited by closing the connection (HTTP/1.1, `Connection:
    /// close`, neither Content-Length nor chunked: RFC 9112 §6.3) completes
    /// when the server closes; one closed before its Content-Length is
    /// reached still fails as a lost connection.
    func testAResponseDelimitedByTheServerClosingCompletes() throws {
        let cases = [
            ("HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Type: text/plain\r\n\r\nread until the end", "200 read until the end"),
            ("HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 100\r\n\r\ncut short", "error connection lost: closed by peer"),
        ]
        for (answer, expected) in cases {
            let server = try OneShotRawServer(answer: answer)
            let r = try exchange(port: server.port, [get("/x")])
            XCTAssertEqual(r.lines, [expected])
            XCTAssertTrue(server.finished(), "the raw server ran")
        }
    }

    func testConnectionRefusedIsReported() throws {
        let server = try harness()
        let port = server.port
        XCTAssertEqual(server.stop(), 0)
        let r = try exchange(port: port, [get("/x")])
        XCTAssertTrue(r.lines[0].hasPrefix("error connect failed: connect: ECONNREFUSED"), r.lines[0])
    }

    /// A peer that accepts the connection and closes it before the TLS
    /// handshake completes (a server at its connection budget does, so does
    /// a load balancer with no backend): the waiting request fails as a
    /// connect failure, and the caller's backoff decides when to try again.
    /// Before, nothing was in flight to fail, so the client connected again
    /// at once, forever (each attempt restarting the connect timeout), and
    /// the request never completed.
    func testAPeerClosingBeforeTheHandshakeFailsTheRequestInsteadOfReconnectingInALoop() throws {
        let listener = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        XCTAssertGreaterThanOrEqual(listener, 0)
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_addr.s_addr = inet_addr("127.0.0.1")
        var length = socklen_t(MemoryLayout<sockaddr_in>.size)
        let bound = withUnsafeMutablePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                bind(listener, $0, length) == 0 && getsockname(listener, $0, &length) == 0
            }
        }
        XCTAssertTrue(bound)
        XCTAssertEqual(listen(listener, 64), 0)
        let port = Int(UInt16(bigEndian: address.sin_port))
        let accepted = Locked(0), stop = Locked(false)
        let acceptor = Thread {
            while !stop.current {
                var ready = pollfd(fd: listener, events: Int16(POLLIN), revents: 0)
                guard poll(&ready, 1, 50) > 0 else { continue }
                let c = accept(listener, nil, nil)
                if c >= 0 {
                    accepted.withLock { $0 += 1 }
                    close(c)
                }
            }
        }
        acceptor.start()
        defer {
            stop.withLock { $0 = true }
            Thread.sleep(forTimeInterval: 0.1)
            close(listener)
        }
        let started = Date()
        let r = try exchange(port: port, tls: pki.clientConfig(), [get("/x")])
        XCTAssertTrue(r.lines[0].hasPrefix("error connect failed"), r.lines[0])
        XCTAssertLessThan(Date().timeIntervalSince(started), 5, "failed when the peer closed, not at a timeout")
        XCTAssertLessThanOrEqual(accepted.current, 2, "\(accepted.current) connections for one request")
    }

    func testQueueIsBounded() throws {
        let server = try harness()
        var options = HTTPClientOptions()
        options.maxPipelined = 1
        options.maxQueued = 3
        // Five sent at once before the connection is up: three wait, two are refused.
        let r = try exchange(port: server.port, options: options, (0..<5).map { get("/q\($0)") })
        XCTAssertEqual(
            r.lines,
            [
                "200 /q0 GET", "200 /q1 GET", "200 /q2 GET",
                "error more than 3 requests waiting", "error more than 3 requests waiting",
            ])
        XCTAssertEqual(server.stop(), 0)
    }

    func testResponseTimeout() throws {
        let server = try harness()
        var options = HTTPClientOptions()
        options.responseTimeoutMilliseconds = 200
        let r = try exchange(port: server.port, options: options, [get("/slow/1000")])
        XCTAssertEqual(r.lines, ["error timed out"])
        XCTAssertEqual(server.stop(), 0)
    }

    // MARK: mutual TLS over sockets

    func testMutualTLSRequestCarriesTheClientIdentity() throws {
        let server = try harness(tls: pki.serverConfig())
        for host in ["127.0.0.1", "localhost"] {
            let r = try exchange(
                port: server.port, tls: pki.clientConfig(), serverName: host == "localhost" ? "localhost" : nil,
                (0..<5).map { _ in get("/whoami") })
            XCTAssertEqual(r.lines, Array(repeating: "200 \(pki.clientURI)", count: 5))
            XCTAssertEqual(r.connections, 1)
        }
        XCTAssertEqual(server.tlsFailures.current, [])
        XCTAssertEqual(server.stop(), 0)
    }

    func testTLSRefusalsSeenFromBothSides() throws {
        let server = try harness(tls: pki.serverConfig())
        let cases: [(String, TLSConfiguration, String, String)] = [
            ("no client certificate", pki.clientConfig(noCert: true), "certificate required", "peer did not return a certificate"),
            (
                "other CA", pki.clientConfig(cert: pki.otherCAClientCert, key: pki.otherCAClientKey), "unknown ca",
                "unable to get local issuer certificate"
            ),
            (
                "expired", pki.clientConfig(cert: pki.expiredClientCert, key: pki.expiredClientKey), "certificate expired",
                "certificate has expired"
            ),
            (
                "revoked", pki.clientConfig(cert: pki.revokedClientCert, key: pki.revokedClientKey), "certificate revoked",
                "certificate revoked"
            ),
        ]
        for (i, (name, config, clientSees, serverSees)) in cases.enumerated() {
            let r = try exchange(port: server.port, tls: config, [get("/whoami")])
            XCTAssertTrue(r.lines[0].hasPrefix("error") && r.lines[0].contains(clientSees), "\(name): client saw \(r.lines[0])")
            // The server records its side when the handshake fails there: may come after the client's.
            XCTAssertTrue(eventually { server.tlsFailures.current.count == i + 1 }, name)
            let failures = server.tlsFailures.current
            XCTAssertTrue(failures.last?.contains(serverSees) ?? false, "\(name): server saw \(failures.last ?? "nothing")")
        }
        XCTAssertEqual(server.onLoop { $0.statistics.requests }, 0, "no refused client reached the handler")
        XCTAssertEqual(server.stop(), 0)
    }

    func testClientRefusesAServerWithTheWrongName() throws {
        var config = pki.serverConfig()
        config.certificateChainFile = pki.wrongHostServerCert
        config.privateKeyFile = pki.wrongHostServerKey
        let server = try harness(tls: config)
        let r = try exchange(port: server.port, tls: pki.clientConfig(), serverName: "localhost", [get("/whoami")])
        XCTAssertTrue(r.lines[0].contains("hostname mismatch"), r.lines[0])
        XCTAssertTrue(eventually { !server.tlsFailures.current.isEmpty })
        let failures = server.tlsFailures.current
        XCTAssertTrue(failures.first?.contains("bad certificate") ?? false, "\(failures)")
        XCTAssertEqual(server.stop(), 0)
    }

    func testPlainClientAgainstTLSServerFailsCleanly() throws {
        let server = try harness(tls: pki.serverConfig())
        let r = try exchange(port: server.port, [get("/whoami")])
        XCTAssertTrue(r.lines[0].hasPrefix("error"), r.lines[0])
        XCTAssertEqual(server.onLoop { $0.statistics.requests }, 0)
        XCTAssertEqual(server.stop(), 0)
    }
}

/// A listening socket on 127.0.0.1 that accepts one connection, reads one
/// request head, writes `answer` and closes: servers EdgeHTTP's own would
/// not be (no framing of its own choice). With `pieces`, each is written on
/// its own, and before the next one `gate(k)` must return true for the
/// pieces up to k (waited for with a deadline): the client read them.
final class OneShotRawServer: Sendable {
    let port: Int
    private let done = OneShot<Bool>()

    convenience init(answer: String) throws { try self.init(pieces: [Array(answer.utf8)]) }

    init(pieces: [[UInt8]], gate: @escaping @Sendable (Int) -> Bool = { _ in true }) throws {
        let listener = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        var addr = sockaddr_in()
        addr.sin_family = sa_family_t(AF_INET)
        addr.sin_port = 0
        inet_pton(AF_INET, "127.0.0.1", &addr.sin_addr)
        var len = socklen_t(MemoryLayout<sockaddr_in>.size)
        let bound = withUnsafeMutablePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { p in
                bind(listener, p, len) == 0 && listen(listener, 1) == 0 && getsockname(listener, p, &len) == 0
            }
        }
        guard bound else { close(listener); throw POSIXError(.EADDRINUSE) }
        port = Int(UInt16(bigEndian: addr.sin_port))
        let done = self.done
        Thread {
            let fd = accept(listener, nil, nil)
            var head: [UInt8] = [], buf = [UInt8](repeating: 0, count: 4096)
            while fd >= 0, !String(decoding: head, as: UTF8.self).contains("\r\n\r\n") {
                let n = recv(fd, &buf, buf.count, 0)
                if n <= 0 { break }
                head.append(contentsOf: buf[0..<n])
            }
            var one: Int32 = 1
            setsockopt(fd, Int32(IPPROTO_TCP), TCP_NODELAY, &one, socklen_t(MemoryLayout<Int32>.size))
            for (k, piece) in pieces.enumerated() {
                _ = piece.withUnsafeBytes { send(fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }
                if k < pieces.count - 1 { _ = eventually(seconds: 10) { gate(k) } }
            }
            close(fd)
            close(listener)
            done.fulfil(fd >= 0)
        }.start()
    }

    /// Waits (bounded) until the answer was sent and the connection closed.
    func finished() -> Bool { done.wait(seconds: 10) ?? false }
}
