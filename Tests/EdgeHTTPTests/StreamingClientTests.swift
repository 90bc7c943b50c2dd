import EdgeHTTP
import EdgeLoop
import EdgeTestSupport
import Foundation
import XCTest

/// `HTTPClient.stream`: a response body handed over piece by piece as it
/// arrives, over real sockets, never held whole (the client's body limit
/// does not apply to it, and no piece is larger than the loop's read buffer).
final class StreamingClientTests: XCTestCase {
    struct Streamed: Sendable {
        var status = 0
        var headBeforeBody = true
        var body: [UInt8] = []
        var pieces = 0
        var largestPiece = 0
        var outcome = ""
    }

    /// Streams `request` from a client on its own loop; `received` sees the
    /// body's length so far (a raw server's gate), `refuseAfter` makes the
    /// reader throw once that many bytes arrived.
    func stream(
        port: Int, _ request: HTTPRequest = HTTPRequest(method: "GET", target: "/big"), options: HTTPClientOptions = HTTPClientOptions(),
        received: Locked<Int>? = nil, refuseAfter: Int? = nil, then next: HTTPRequest? = nil
    ) throws -> Streamed {
        let (result, leftOpen) = try runOnLoop { (loop: EventLoop, finish: @escaping @Sendable (Streamed) -> Void) in
            let client = HTTPClient(loop: loop, address: SocketAddress(host: "127.0.0.1", port: port), options: options)
            var s = Streamed()
            client.stream(
                request,
                head: { head in s.status = head.status },
                body: { piece in
                    if s.status == 0 { s.headBeforeBody = false }
                    s.body.append(contentsOf: piece)
                    s.pieces += 1
                    s.largestPiece = max(s.largestPiece, piece.count)
                    received?.withLock { $0 = s.body.count }
                    if let refuseAfter, s.body.count >= refuseAfter { throw HTTPClientError.malformedResponse("enough") }
                },
                completion: { r in
                    switch r {
                    case .success(let response): s.outcome = "\(response.status) body \(response.body.count)"
                    case .failure(let e): s.outcome = "error \(e)"
                    }
                    guard let next else {
                        client.close()
                        finish(s)
                        return
                    }
                    // The client stays usable after a streamed response (or a refused one).
                    client.send(next) { r in
                        if case .success(let response) = r {
                            s.outcome += "; then \(response.status) \(response.bodyText)"
                        } else {
                            s.outcome += "; then \(r)"
                        }
                        client.close()
                        finish(s)
                    }
                })
        }
        XCTAssertEqual(leftOpen, 0, "client loop closed cleanly")
        return try XCTUnwrap(result)
    }

    static func pattern(_ n: Int) -> [UInt8] { (0..<n).map { UInt8(truncatingIfNeeded: $0 &* 31 &+ $0 >> 8) } }

    /// A chunked body (the server's streamed responses) and a Content-Length
    /// one, each far larger than `maxResponseBodyBytes`: streamed whole in
    /// pieces of at most one read, where `send` refuses the same response.
    func testLargeBodiesStreamPastTheBodyLimit() throws {
        let body = Self.pattern(3 << 20)
        let server = try harness { request, _, responder in
            var r = HTTPResponse(status: 200, headers: ["Content-Type": "application/octet-stream"])
            if request.path == "/chunked" {
                var at = 0
                r.stream = BodyStream {
                    guard at < body.count else { return nil }
                    defer { at += 40_000 }
                    return Array(body[at..<min(at + 40_000, body.count)])
                }
            } else {
                r.body = body
            }
            responder.respond(r)
        }
        defer { _ = server.stop() }
        var options = HTTPClientOptions()
        options.maxResponseBodyBytes = 64 * 1024
        for path in ["/chunked", "/length"] {
            let s = try stream(
                port: server.port, HTTPRequest(method: "GET", target: path), options: options,
                then: HTTPRequest(method: "GET", target: "/length"))
            XCTAssertEqual(s.status, 200, path)
            XCTAssertTrue(s.headBeforeBody, path)
            XCTAssertEqual(s.body.count, body.count, path)
            XCTAssertTrue(s.body == body, "\(path): the body, byte for byte")
            XCTAssertGreaterThan(s.pieces, 1, path)
            XCTAssertLessThanOrEqual(s.largestPiece, 64 * 1024, "\(path): no piece larger than the loop's read buffer")
            XCTAssertTrue(
                s.outcome.hasPrefix("200 body 0; then failure(malformed response: body of 3145728 bytes is over the limit"),
                "\(path): streamed whole; the whole-body send is over the limit: \(s.outcome)")
        }
    }

    /// A chunked response (extensions, a trailer), a Content-Length one and
    /// one delimited by the close, written cut in two at every position:
    /// the same body whatever the cut.
    func testABodySplitAtEveryBoundary() throws {
        let chunked =
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Type: application/scim+json\r\n\r\n"
            + "5\r\n{\"mem\r\n1;ext=\"x\"\r\nb\r\n0B\r\ners\":[1,2,3\r\n1\r\n]\r\n1\r\n}\r\n0\r\nX-Trailer: t\r\n\r\n"
        let length = "HTTP/1.1 200 OK\r\nContent-Length: 21\r\n\r\n{\"members\":[1,2,3]}\r\n"
        let close = "HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n{\"members\":[1,2,3]}"
        for (answer, want) in [(chunked, #"{"members":[1,2,3]}"#), (length, "{\"members\":[1,2,3]}\r\n"), (close, #"{"members":[1,2,3]}"#)]
        {
            let bytes = Array(answer.utf8)
            let headEnd = try XCTUnwrap(answer.range(of: "\r\n\r\n")).upperBound.utf16Offset(in: answer)
            for cut in 1..<bytes.count {
                let received = Locked(0)
                // Before the second piece, the client has read the first one's body bytes.
                let bodyBytesBefore = Self.bodyBytes(in: Array(bytes[..<cut]), headEnd: headEnd, chunked: answer == chunked)
                let server = try OneShotRawServer(pieces: [Array(bytes[..<cut]), Array(bytes[cut...])]) { _ in
                    received.current >= bodyBytesBefore
                }
                let s = try stream(port: server.port, received: received)
                XCTAssertEqual(String(decoding: s.body, as: UTF8.self), want, "cut at \(cut)")
                XCTAssertEqual(s.outcome, "200 body 0", "cut at \(cut)")
                XCTAssertTrue(s.headBeforeBody)
                XCTAssertTrue(server.finished())
            }
        }
    }

    /// How many body bytes the first `prefix` bytes of a response carry.
    static func bodyBytes(in prefix: [UInt8], headEnd: Int, chunked: Bool) -> Int {
        guard prefix.count > headEnd else { return 0 }
        let rest = prefix[headEnd...]
        guard chunked else { return rest.count }
        var n = 0, i = rest.startIndex
        while i < rest.endIndex {
            // size [;ext] CRLF data CRLF
            guard let lf = rest[i...].firstIndex(of: 10) else { break }
            let line = String(decoding: rest[i..<lf], as: UTF8.self)
            let size = Int(line.split(separator: ";")[0].trimmingCharacters(in: .whitespacesAndNewlines), radix: 16) ?? 0
            if size == 0 { break }
            let start = lf + 1
            n += min(size, rest.endIndex - start)
            i = start + size + 2
        }
        return n
    }

    /// A reader that throws ends that response with `.bodyRefused` and the
    /// connection; the next request connects anew.
    func testAReaderThatThrowsEndsTheResponse() throws {
        let body = Self.pattern(1 << 20)
        let server = try harness { request, _, responder in
            responder.respond(HTTPResponse(status: 200, headers: [:], body: request.path == "/small" ? Array("ok".utf8) : body))
        }
        defer { _ = server.stop() }
        let s = try stream(port: server.port, refuseAfter: 100_000, then: HTTPRequest(method: "GET", target: "/small"))
        XCTAssertLessThan(s.body.count, body.count)
        XCTAssertTrue(s.outcome.hasPrefix("error response body refused: "), s.outcome)
        XCTAssertTrue(s.outcome.hasSuffix("; then 200 ok"), s.outcome)
    }

    /// Statuses without a body still run `head` then `completion`; an
    /// error status's body streams like any other.
    func testStatusesAndEmptyBodies() throws {
        let server = try harness { request, _, responder in
            switch request.path {
            case "/none": responder.respond(HTTPResponse(status: 204))
            default: responder.respond(HTTPResponse(status: 404, contentType: "application/scim+json", body: #"{"status":"404"}"#))
            }
        }
        defer { _ = server.stop() }
        let none = try stream(port: server.port, HTTPRequest(method: "GET", target: "/none"))
        XCTAssertEqual(none.status, 204)
        XCTAssertEqual(none.pieces, 0)
        XCTAssertEqual(none.outcome, "204 body 0")
        let missing = try stream(port: server.port, HTTPRequest(method: "GET", target: "/gone"))
        XCTAssertEqual(missing.status, 404)
        XCTAssertEqual(String(decoding: missing.body, as: UTF8.self), #"{"status":"404"}"#)
    }
}
