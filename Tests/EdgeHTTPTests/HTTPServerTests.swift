import EdgeHTTP
import EdgeLoop
import EdgeTLS
import EdgeTestSupport
import Foundation
import XCTest

/// Answers `/echo` with the body, `/slow/N` after N ms, `/big/N` with N bytes,
/// everything else with `path method`.
@Sendable func testHandler(_ request: HTTPRequest, _ context: RequestContext, _ responder: Responder) {
    let path = String(request.path)
    if path == "/echo" {
        responder.respond(HTTPResponse(status: 200, headers: ["Content-Type": "application/octet-stream"], body: request.body))
    } else if path.hasPrefix("/slow/"), let ms = UInt64(path.dropFirst(6)) {
        // Answer later from a timer on the same loop.
        let timer = try! LoopTimer(loop: currentLoop!)
        timer.start(after: ms) {
            responder.respond(HTTPResponse(status: 200, contentType: "text/plain", body: path))
            timer.close()
        }
    } else if path.hasPrefix("/big/"), let n = Int(path.dropFirst(5)) {
        responder.respond(HTTPResponse(status: 200, body: [UInt8](repeating: 65, count: n)))
    } else if path == "/whoami" {
        responder.respond(
            HTTPResponse(
                status: 200, contentType: "text/plain",
                body: context.peerIdentity?.uris.joined(separator: ",") ?? "anonymous"))
    } else {
        responder.respond(HTTPResponse(status: 200, contentType: "text/plain", body: "\(path) \(request.method)"))
    }
}

/// The loop of the server under test (set on its thread by `harness`).
nonisolated(unsafe) var currentLoop: EventLoop?

func harness(
    limits: HTTPServerLimits = HTTPServerLimits(), tls: TLSConfiguration? = nil,
    handler: @escaping @Sendable (HTTPRequest, RequestContext, Responder) -> Void = testHandler
) throws -> ServerHarness {
    let h = try ServerHarness(tls: tls, limits: limits, handler: handler)
    _ = h.onLoop { server in
        currentLoop = server.loop; return true
    }
    return h
}

final class HTTPServerTests: XCTestCase {
    func testKeepAliveServesSeveralRequestsOnOneConnection() throws {
        let server = try harness()
        let client = try RawClient(port: server.port)
        for i in 0..<3 {
            client.send("GET /n\(i) HTTP/1.1\r\nHost: x\r\n\r\n")
            let r = client.readResponses(1)
            XCTAssertEqual(r.first?.status, 200)
            XCTAssertEqual(r.first?.body, "/n\(i) GET")
            XCTAssertTrue(r.first?.head.contains("Date: ") ?? false)
            XCTAssertFalse(r.first?.head.contains("Connection: close") ?? true)
        }
        XCTAssertEqual(server.onLoop { $0.statistics.acceptedConnections }, 1)
        XCTAssertEqual(server.stop(), 0)
    }

    func testPipelinedRequestsAreAnsweredInOrderEvenWhenHandlersFinishOutOfOrder() throws {
        let server = try harness()
        let client = try RawClient(port: server.port)
        client.send(
            "GET /slow/80 HTTP/1.1\r\nHost: x\r\n\r\nGET /fast HTTP/1.1\r\nHost: x\r\n\r\n"
                + "GET /slow/30 HTTP/1.1\r\nHost: x\r\n\r\nPOST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n\r\nlast")
        let r = client.readResponses(4)
        XCTAssertEqual(r.map(\.body), ["/slow/80", "/fast GET", "/slow/30", "last"])
        XCTAssertEqual(server.stop(), 0)
    }

    func testChunkedAndContentLengthBodies() throws {
        let server = try harness()
        let client = try RawClient(port: server.port)
        client.send(
            "POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n7;ext=1\r\n, world\r\n0\r\nTrailer: t\r\n\r\n"
        )
        XCTAssertEqual(client.readResponses(1).first?.body, "hello, world")
        client.send("POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc")
        XCTAssertEqual(client.readResponses(1).first?.body, "abc")
        XCTAssertEqual(server.stop(), 0)
    }

    func testExpectContinue() throws {
        let server = try harness()
        let client = try RawClient(port: server.port)
        client.send("POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n")
        let interim = client.readResponses(1)
        XCTAssertEqual(interim.first?.status, 100, "100 Continue before the body is sent")
        client.send("hello")
        XCTAssertEqual(client.readResponses(1).first?.body, "hello")
        // A body over the limit is refused before it is sent: no 100, a 413.
        var limits = HTTPServerLimits()
        limits.maxBodyBytes = 10
        let small = try harness(limits: limits)
        let c2 = try RawClient(port: small.port)
        c2.send("POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\nExpect: 100-continue\r\n\r\n")
        XCTAssertEqual(c2.readResponses(1).first?.status, 413)
        XCTAssertEqual(server.stop(), 0)
        XCTAssertEqual(small.stop(), 0)
    }

    func testHeadOmitsTheBodyButKeepsItsLength() throws {
        let server = try harness()
        let client = try RawClient(port: server.port)
        client.send("HEAD /big/1000 HTTP/1.1\r\nHost: x\r\n\r\nGET /after HTTP/1.1\r\nHost: x\r\n\r\n")
        // Read raw: the HEAD response has Content-Length 1000 but no body.
        var seen = ""
        let deadline = Date().addingTimeInterval(5)
        while !seen.contains("/after GET") && Date() < deadline {
            var buf = [UInt8](repeating: 0, count: 4096)
            let n = recv(client.fd, &buf, buf.count, 0)
            if n <= 0 { break }
            seen += String(decoding: buf[0..<n], as: UTF8.self)
        }
        XCTAssertTrue(seen.contains("Content-Length: 1000\r\n"))
        XCTAssertFalse(seen.contains("AAAA"), "no body for HEAD")
        XCTAssertTrue(seen.hasSuffix("/after GET"))
        XCTAssertEqual(server.stop(), 0)
    }

    /// Malformed and hostile input: each gets its status, `Connection: close`,
    /// and the connection is closed.
    func testMalformedRequestCorpus() throws {
        var limits = HTTPServerLimits()
        limits.maxBodyBytes = 1024
        let server = try harness(limits: limits)
        let hugeHeader = "GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + String(repeating: "a", count: 17 * 1024) + "\r\n\r\n"
        let manyHeaders = "GET / HTTP/1.1\r\n" + (0..<1000).map { "X-H\($0): 12345678\r\n" }.joined() + "\r\n"
        let corpus: [(String, String, Int)] = [
            ("bad method", "G@T / HTTP/1.1\r\nHost: x\r\n\r\n", 400),
            ("lowercase method", "get / HTTP/1.1\r\nHost: x\r\n\r\n", 400),
            ("bad version token", "GET / HTPT/1.1\r\nHost: x\r\n\r\n", 400),
            ("unsupported version", "GET / HTTP/2.0\r\nHost: x\r\n\r\n", 505),
            ("HTTP/0.9 style", "GET /\r\n\r\n", 400),
            (
                "CL and TE (smuggling)",
                "POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400
            ),
            ("duplicate Content-Length", "POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd", 400),
            ("negative Content-Length", "POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n", 400),
            ("TE not ending in chunked", "POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\nabc", 400),
            ("space before colon", "GET / HTTP/1.1\r\nHost : x\r\n\r\n", 400),
            ("bad chunk size", "POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nZZ\r\nhello\r\n0\r\n\r\n", 400),
            ("chunk without CRLF", "POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhelloXX\r\n0\r\n\r\n", 400),
            ("huge chunk size", "POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nFFFFFFFFFFFFFFFFFF\r\n", 400),
            ("header block too large", hugeHeader, 431),
            ("too many headers", manyHeaders, 431),
            ("body too large by length", "POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\n", 413),
            (
                "chunked body too large",
                "POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n800\r\n" + String(repeating: "b", count: 2048)
                    + "\r\n0\r\n\r\n", 413
            ),
            ("unknown expectation", "POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nExpect: magic\r\n\r\nx", 417),
            ("NUL in header", "GET / HTTP/1.1\r\nHost: x\u{0}y\r\n\r\n", 400),
            ("request line without CRLF", "GET / HTTP/1.1\nHost: x\r\n\r\n", 400),
            ("two spaces in request line", "GET  / HTTP/1.1\r\nHost: x\r\n\r\n", 400),
            ("control char in target", "GET /a\u{7}b HTTP/1.1\r\nHost: x\r\n\r\n", 400),
            ("request line too long", "GET /" + String(repeating: "x", count: 17 * 1024) + " HTTP/1.1\r\n\r\n", 431),
        ]
        for (name, bytes, status) in corpus {
            let client = try RawClient(port: server.port, timeoutSeconds: 5)
            // Byte by byte for some, so the checks also hold across reads.
            if name.hasPrefix("bad version") || name.hasPrefix("space") || name.hasPrefix("CL and TE") {
                for b in Array(bytes.utf8) { client.send([b]) }
            } else {
                client.send(bytes)
            }
            let text = client.readToEnd()
            let got = Int(text.split(separator: " ").dropFirst().first ?? "") ?? 0
            XCTAssertEqual(got, status, "\(name): \(text.prefix(200))")
            XCTAssertTrue(text.contains("Connection: close"), "\(name) closes the connection")
        }
        XCTAssertEqual(server.onLoop { $0.statistics.protocolErrors }, corpus.count)
        XCTAssertEqual(server.onLoop { $0.statistics.openConnections }, 0, "every bad connection was closed")
        XCTAssertEqual(server.stop(), 0)
    }

    func testAnErrorAfterPipelinedRequestsComesAfterTheirResponses() throws {
        let server = try harness()
        let client = try RawClient(port: server.port)
        client.send("GET /slow/50 HTTP/1.1\r\nHost: x\r\n\r\nBROKEN\r\n\r\n")
        let r = client.readResponses(2)
        XCTAssertEqual(r.map(\.status), [200, 400])
        XCTAssertEqual(server.stop(), 0)
    }

    func testSlowClientGets408AndIdleConnectionsAreClosed() throws {
        var limits = HTTPServerLimits()
        limits.requestTimeoutMilliseconds = 300
        limits.idleTimeoutMilliseconds = 400
        let server = try harness(limits: limits)
        let slow = try RawClient(port: server.port)
        slow.send("GET / HTTP/1.1\r\nHo")  // and nothing more
        let started = Date()
        let text = slow.readToEnd()
        XCTAssertTrue(text.hasPrefix("HTTP/1.1 408 "), text)
        XCTAssertLessThan(Date().timeIntervalSince(started), 5, "closed by the server, not by our read timeout")
        // Trickling bytes does not extend the request deadline (slowloris).
        let trickle = try RawClient(port: server.port)
        var trickled = ""
        for ch in "GET / HTTP/1.1\r\nX-A: b" {
            guard trickle.send(String(ch)) else { break }
            trickled.append(ch)
            usleep(50_000)
        }
        XCTAssertTrue(trickle.readToEnd().hasPrefix("HTTP/1.1 408 "), "trickled \(trickled.count) bytes")
        // A kept-alive connection with nothing in flight is closed quietly.
        let idle = try RawClient(port: server.port)
        idle.send("GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        XCTAssertEqual(idle.readResponses(1).first?.status, 200)
        XCTAssertEqual(idle.readToEnd(), "", "idle close sends nothing more")
        XCTAssertGreaterThanOrEqual(server.onLoop { $0.statistics.timeouts } ?? 0, 2)
        XCTAssertEqual(server.stop(), 0)
    }

    /// The request timeout runs from a request's first byte: a client that
    /// sends part of a request line and goes silent gets 408 at the request
    /// timeout, not a quiet close at the (much longer) idle timeout. So does
    /// a pipelined request begun after a complete one.
    func testTheRequestTimeoutStartsAtTheFirstByteOfTheRequestLine() throws {
        var limits = HTTPServerLimits()
        limits.requestTimeoutMilliseconds = 300
        limits.idleTimeoutMilliseconds = 60_000
        let server = try harness(limits: limits)
        for (sent, answers) in [("GET /twenty-bytes-of", 1), ("GET /a HTTP/1.1\r\nHost: x\r\n\r\nGET /then-twenty-b", 2)] {
            let client = try RawClient(port: server.port, timeoutSeconds: 20)
            let started = Date()
            client.send(sent)  // and nothing more
            let text = client.readToEnd()
            XCTAssertEqual(text.components(separatedBy: "HTTP/1.1 ").count - 1, answers, text)
            XCTAssertTrue(text.contains("HTTP/1.1 408 "), "\(sent.debugDescription): \(text)")
            XCTAssertLessThan(Date().timeIntervalSince(started), 5, "closed at the request timeout")
        }
        XCTAssertEqual(server.onLoop { $0.statistics.timeouts }, 2)
        XCTAssertEqual(server.stop(), 0)
    }

    func testConnectionLimit() throws {
        var limits = HTTPServerLimits()
        limits.maxConnections = 2
        let server = try harness(limits: limits)
        let a = try RawClient(port: server.port), b = try RawClient(port: server.port)
        a.send("GET /a HTTP/1.1\r\nHost: x\r\n\r\n")
        b.send("GET /b HTTP/1.1\r\nHost: x\r\n\r\n")
        XCTAssertEqual(a.readResponses(1).first?.body, "/a GET")
        XCTAssertEqual(b.readResponses(1).first?.body, "/b GET")
        let c = try RawClient(port: server.port)
        c.send("GET /c HTTP/1.1\r\nHost: x\r\n\r\n")
        XCTAssertEqual(c.readToEnd(), "", "the third connection is closed at accept")
        XCTAssertEqual(server.onLoop { $0.statistics.rejectedConnections }, 1)
        XCTAssertEqual(server.stop(), 0)
    }

    /// Binding a port in use throws EADDRINUSE and leaves nothing behind:
    /// the server is released (its handler with it) and opened no handle,
    /// so the loop ends and closes clean.
    func testBindingAPortInUseThrowsAndLeavesNothingBehind() throws {
        final class Sentinel: Sendable {}
        let (outcome, leftOpen) = try runOnLoop { (loop: EventLoop, finish: @escaping @Sendable (String) -> Void) in
            let first = try HTTPServer(loop: loop, address: SocketAddress(host: "127.0.0.1", port: 0), handler: testHandler)
            let handles = loop.liveHandles
            var sentinel: Sentinel? = Sentinel()
            weak let watched = sentinel
            var failure = "no error"
            do {
                _ = try HTTPServer(loop: loop, address: first.address) { [sentinel] request, context, responder in
                    withExtendedLifetime(sentinel) { testHandler(request, context, responder) }
                }
            } catch let error as LoopError {
                failure = error.name
            }
            sentinel = nil
            let released = watched == nil
            let opened = loop.liveHandles - handles
            first.shutdown {
                finish("\(failure) released=\(released) handles=\(opened)")
                loop.stop()  // a leaked timer would otherwise keep the loop running: close() reports it
            }
        }
        XCTAssertEqual(outcome, "EADDRINUSE released=true handles=0")
        XCTAssertEqual(leftOpen, 0)
    }

    func testWriteBackpressurePausesReadingUntilTheClientReads() throws {
        var limits = HTTPServerLimits()
        limits.writeHighWatermark = 256 * 1024
        limits.writeLowWatermark = 64 * 1024
        let server = try harness(limits: limits)
        let client = try RawClient(port: server.port, timeoutSeconds: 20)
        // 16 MiB of answers: far more than loopback socket buffers hold.
        let count = 64
        client.send(String(repeating: "GET /big/262144 HTTP/1.1\r\nHost: x\r\n\r\n", count: count))
        // Not reading: the server's queued bytes pass its watermark.
        XCTAssertTrue(eventually { (server.onLoop { $0.statistics.readPauses } ?? 0) >= 1 }, "the server stopped reading this connection")
        let responses = client.readResponses(count)
        XCTAssertEqual(responses.count, count, "every response arrives once the client reads")
        XCTAssertTrue(responses.allSatisfy { $0.body.utf8.count == 262_144 })
        XCTAssertEqual(server.stop(), 0)
    }

    func testGracefulShutdownFinishesInFlightRequests() throws {
        let server = try harness()
        let client = try RawClient(port: server.port)
        client.send("GET /slow/200 HTTP/1.1\r\nHost: x\r\n\r\n")
        XCTAssertTrue(eventually { (server.onLoop { $0.statistics.requests } ?? 0) >= 1 }, "the request is in flight")
        let stopped = Locked(-1)
        let stopper = Thread { stopped.withLock { $0 = server.stop() } }
        stopper.start()
        let text = client.readToEnd()
        XCTAssertTrue(text.hasPrefix("HTTP/1.1 200 "), text)
        XCTAssertTrue(text.contains("Connection: close"))
        XCTAssertTrue(text.hasSuffix("/slow/200"))
        while !stopper.isFinished { usleep(1000) }
        XCTAssertEqual(stopped.current, 0, "loop closed cleanly after the drain")
        XCTAssertThrowsError(try RawClient(port: server.port), "the listener is gone")
    }

    func testUpgradeIsIgnoredAndBlankLinesBeforeARequestAreSkipped() throws {
        let server = try harness()
        let client = try RawClient(port: server.port)
        client.send("GET /up HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n\r\nGET /next HTTP/1.1\r\nHost: x\r\n\r\n")
        XCTAssertEqual(client.readResponses(2).map(\.body), ["/up GET", "/next GET"])
        XCTAssertEqual(server.stop(), 0)
    }

    func testShutdownDoesNotWaitForeverForAClientThatStopsReading() throws {
        var limits = HTTPServerLimits()
        limits.closeLingerMilliseconds = 300
        let server = try harness(limits: limits)
        let client = try RawClient(port: server.port)
        client.send(String(repeating: "GET /big/1048576 HTTP/1.1\r\nHost: x\r\n\r\n", count: 32))
        // 32 MiB owed, the client reads none of it: the server has stopped reading.
        XCTAssertTrue(eventually { (server.onLoop { $0.statistics.readPauses } ?? 0) >= 1 })
        let started = Date()
        XCTAssertEqual(server.stop(), 0, "the drain completed and the loop closed cleanly")
        XCTAssertLessThan(Date().timeIntervalSince(started), 5, "bounded by the linger, not by the client")
        withExtendedLifetime(client) {}
    }

    func testHTTP10ClosesUnlessKeepAliveIsAsked() throws {
        let server = try harness()
        let c1 = try RawClient(port: server.port)
        c1.send("GET /old HTTP/1.0\r\n\r\n")
        let t = c1.readToEnd()
        XCTAssertTrue(t.contains("Connection: close") && t.hasSuffix("/old GET"), t)
        let c2 = try RawClient(port: server.port)
        c2.send("GET /a HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\nGET /ignored HTTP/1.1\r\nHost: x\r\n\r\n")
        let t2 = c2.readToEnd()
        XCTAssertTrue(t2.hasSuffix("/a GET"), "nothing after Connection: close is served: \(t2)")
        XCTAssertEqual(server.stop(), 0)
    }
}

/// A streamed body (`HTTPResponse.stream`): chunked, produced only as the
/// client reads, whole once it has.
final class StreamedBodyTests: XCTestCase {
    static let piece = 64 * 1024

    func streamingServer(pieces: Int, produced: Locked<Int>) throws -> ServerHarness {
        var limits = HTTPServerLimits()
        limits.writeHighWatermark = 256 * 1024
        limits.writeLowWatermark = 64 * 1024
        return try harness(limits: limits) { request, _, responder in
            guard request.path == "/stream" else {
                responder.respond(HTTPResponse(status: 200, contentType: "text/plain", body: "plain"))
                return
            }
            var n = 0
            var response = HTTPResponse(status: 200, headers: ["Content-Type": "application/octet-stream"])
            response.stream = BodyStream {
                guard n < pieces else { return nil }
                n += 1
                produced.withLock { $0 += 1 }
                return [UInt8](repeating: UInt8(ascii: "a") + UInt8(n % 26), count: StreamedBodyTests.piece)
            }
            responder.respond(response)
        }
    }

    func testAStreamedBodyIsProducedAsTheClientReadsAndArrivesWhole() throws {
        let pieces = 1000  // 62.5 MiB
        let produced = Locked(0)
        let server = try streamingServer(pieces: pieces, produced: produced)
        let client = try RawClient(port: server.port, timeoutSeconds: 20)
        client.send("GET /stream HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        // Not reading: production stops at the write watermark plus what the socket buffers hold.
        XCTAssertTrue(eventually { produced.current >= 4 })
        let bound = 32 * 1024 * 1024 / Self.piece
        XCTAssertFalse(eventually(seconds: 2) { produced.current > bound }, "produced \(produced.current) pieces before any was read")
        let raw = Array(client.readToEnd().utf8)
        let split = try XCTUnwrap(
            (0..<(raw.count - 3)).first { raw[$0] == 13 && raw[$0 + 1] == 10 && raw[$0 + 2] == 13 && raw[$0 + 3] == 10 })
        let head = String(decoding: raw[..<split], as: UTF8.self)
        XCTAssertTrue(head.hasPrefix("HTTP/1.1 200"), head)
        XCTAssertTrue(head.contains("Transfer-Encoding: chunked"), head)
        XCTAssertFalse(head.contains("Content-Length"), head)
        let body = try XCTUnwrap(dechunk(raw[(split + 4)...])?.body, "a complete chunked body")
        XCTAssertEqual(body.count, pieces * Self.piece)
        XCTAssertEqual(body[0], UInt8(ascii: "b"))
        XCTAssertEqual(body[body.count - 1], UInt8(ascii: "a") + UInt8(pieces % 26))
        XCTAssertEqual(produced.current, pieces)
        XCTAssertEqual(server.stop(), 0)
    }

    /// HTTP/1.0 has no chunked coding: the pieces are streamed as they come
    /// and the body ends with the connection (RFC 9112 §6.3), never joined in
    /// memory; HEAD sends no body at all.
    func testHTTP10GetsTheBodyUntilTheConnectionEndsAndHeadNone() throws {
        let produced = Locked(0)
        let server = try streamingServer(pieces: 3, produced: produced)
        let old = try RawClient(port: server.port)
        old.send("GET /stream HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        let whole = old.readToEnd()
        let parts = whole.components(separatedBy: "\r\n\r\n")
        XCTAssertTrue(parts[0].hasPrefix("HTTP/1.1 200"), parts[0])
        XCTAssertFalse(parts[0].contains("Content-Length") || parts[0].contains("Transfer-Encoding"), parts[0])
        XCTAssertTrue(parts[0].contains("Connection: close"), "the end of the body is the end of the connection: \(parts[0])")
        XCTAssertEqual(parts.dropFirst().joined(separator: "\r\n\r\n").utf8.count, 3 * Self.piece)
        let head = try RawClient(port: server.port)
        head.send("HEAD /stream HTTP/1.1\r\nHost: x\r\n\r\nGET /after HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        let text = head.readToEnd()
        XCTAssertTrue(text.hasPrefix("HTTP/1.1 200"), text)
        XCTAssertEqual(
            text.components(separatedBy: "HTTP/1.1 200").count, 3, "the HEAD's answer, then the next request's: \(text.prefix(400))")
        XCTAssertLessThan(text.utf8.count, 2 * Self.piece, "no body after HEAD")
        XCTAssertTrue(text.hasPrefix("HTTP/1.1 200 OK\r\n") && text.components(separatedBy: "Transfer-Encoding: chunked").count == 2, text)
        XCTAssertEqual(server.stop(), 0)
    }
}
