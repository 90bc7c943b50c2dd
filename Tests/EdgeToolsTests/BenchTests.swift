import EdgeHTTP
import EdgeMetrics
import EdgeTestSupport
import Foundation
import SCIM
import XCTest

@testable import EdgeTools

final class HistogramTests: XCTestCase {
    func testQuantilesWithinOnePercent() {
        var h = LatencyHistogram()
        for v in 1...100_000 { h.record(UInt64(v)) }
        for (q, expected) in [(0.5, 50_000.0), (0.9, 90_000.0), (0.99, 99_000.0), (0.999, 99_900.0)] {
            let got = Double(h.quantile(q))
            XCTAssertLessThanOrEqual(abs(got - expected) / expected, 0.01, "q\(q): \(got)")
            XCTAssertGreaterThanOrEqual(got, expected, "reported at the bucket's upper bound, never under-stated")
        }
        XCTAssertEqual(h.quantile(1), 100_000)
        XCTAssertEqual(h.min, 1)
        XCTAssertEqual(h.count, 100_000)
        XCTAssertEqual(h.quantile(0.001), 100, "small values are exact")
        var other = LatencyHistogram()
        other.record(5_000_000_000)  // beyond the range: clamped, still counted
        h.merge(other)
        XCTAssertEqual(h.count, 100_001)
        XCTAssertEqual(h.max, 5_000_000_000)
        XCTAssertEqual(LatencyHistogram().quantile(0.5), 0)
    }
}

/// `scim-edge bench` against a server whose latency the test fixes.
final class BenchCommandTests: XCTestCase {
    var dir: TempDirectory!
    var server: ChildProcess!
    var port = 0

    override func setUpWithError() throws {
        dir = TempDirectory("edge-bench")
        // A threaded HTTP/1.1 server: every request takes DELAY seconds; POST answers 201 with an id.
        let script = dir.write(
            "server.py",
            """
            import http.server, json, sys, time, itertools
            DELAY = float(sys.argv[2]); counter = itertools.count(1)
            class H(http.server.BaseHTTPRequestHandler):
                protocol_version = "HTTP/1.1"
                wbufsize = 1 << 16  # one write per response (no Nagle + delayed-ACK stall)
                def log_message(self, *a): pass
                def answer(self, status, body):
                    time.sleep(DELAY)
                    data = json.dumps(body).encode()
                    self.send_response(status); self.send_header("Content-Type", "application/scim+json")
                    self.send_header("Content-Length", str(len(data))); self.end_headers(); self.wfile.write(data)
                def do_POST(self):
                    self.rfile.read(int(self.headers.get("Content-Length", 0)))
                    self.answer(201, {"id": str(next(counter)), "userName": "u"})
                def do_GET(self): self.answer(200, {"id": "1"})
            s = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
            print("listening on 127.0.0.1:%d" % s.server_address[1], flush=True)
            s.serve_forever()
            """)
        server = try ChildProcess("/usr/bin/env", ["python3", script, "x", "0.02"])
        let line = try XCTUnwrap(server.waitForLine("listening on"))
        port = Int(line.split(separator: ":").last!)!
    }

    override func tearDown() {
        server.signal(SIGKILL)
        _ = server.waitForExit()
        dir.remove()
    }

    func bench(_ args: [String]) throws -> JSON {
        let c = try ChildProcess(
            productsDirectory + "/scim-edge", ["bench", "--url", "http://127.0.0.1:\(port)/scim/v2", "--json", "--quiet"] + args)
        XCTAssertEqual(c.waitForExit(seconds: 60), 0)
        return try JSONParser.parse(Array(c.output.joined(separator: "\n").utf8))
    }

    func testClosedLoopReportsTheServersLatency() throws {
        let r = try bench(["--connections", "4", "--requests", "120", "--mix", "post=1,get=1", "--seed-users", "8"])
        XCTAssertEqual(r["requests"], 120)
        XCTAssertEqual(r["mode"], "closed")
        let p50 = try XCTUnwrap(r["latencyMs"]?["p50"]?.numberValue?.double)
        XCTAssertGreaterThanOrEqual(p50, 20, "the server sleeps 20 ms")
        XCTAssertLessThan(p50, 60)
        let throughput = try XCTUnwrap(r["throughput"]?.numberValue?.double)
        XCTAssertLessThanOrEqual(throughput, 4 / 0.02 * 1.05, "4 connections × 1/20 ms at most")
        XCTAssertGreaterThan(throughput, 40)
        XCTAssertEqual((r["status"]?["201"]?.numberValue?.integer ?? 0) + (r["status"]?["200"]?.numberValue?.integer ?? 0), 120)
        XCTAssertNotNil(r["operations"]?["get"]?["p99"])
        XCTAssertGreaterThan(r["timeline"]?.arrayValue?.count ?? 0, 0)
    }

    func testOpenLoopKeepsItsRate() throws {
        let r = try bench(["--connections", "8", "--rate", "40", "--duration", "2"])
        XCTAssertEqual(r["mode"], "open")
        let n = try XCTUnwrap(r["requests"]?.numberValue?.integer)
        XCTAssertGreaterThanOrEqual(n, 76)
        XCTAssertLessThanOrEqual(n, 84, "40/s for 2 s")
        let p99 = try XCTUnwrap(r["latencyMs"]?["p99"]?.numberValue?.double)
        XCTAssertLessThan(p99, 200, "8 connections keep up with 40/s at 20 ms")
    }

    /// One connection at 20 ms cannot serve 100/s: requests wait, and an
    /// open loop measures that wait (from each request's intended start)
    /// instead of hiding it as a closed loop would.
    func testOpenLoopIsFreeOfCoordinatedOmission() throws {
        let r = try bench(["--connections", "1", "--rate", "100", "--duration", "2", "--svg", dir.file("plot.svg")])
        let p99 = try XCTUnwrap(r["latencyMs"]?["p99"]?.numberValue?.double)
        XCTAssertGreaterThan(p99, 500, "the backlog grows to ~1 s by the end: \(r)")
        XCTAssertGreaterThan(r["queuedBehind"]?.numberValue?.integer ?? 0, 50)
        let svg = try String(contentsOfFile: dir.file("plot.svg"), encoding: .utf8)
        XCTAssertTrue(svg.hasPrefix("<svg") && svg.contains("Latency by percentile") && svg.contains("<polyline"))
    }

    func testBadArgumentsFailClearly() throws {
        let c = try ChildProcess(productsDirectory + "/scim-edge", ["bench", "--url", "ftp://x", "--quiet"])
        XCTAssertNotEqual(c.waitForExit(), 0)
        let m = try ChildProcess(
            productsDirectory + "/scim-edge", ["bench", "--url", "http://127.0.0.1:\(port)", "--mix", "post=1,delete=2"])
        XCTAssertNotEqual(m.waitForExit(), 0)
    }
}

/// `scim-edge bench` over TLS with a client certificate (mutual TLS).
final class BenchTLSTests: XCTestCase {
    func testBenchPresentsItsClientCertificate() throws {
        let dir = TempDirectory("edge-bench-tls")
        defer { dir.remove() }
        let pki = try TestPKI(in: dir)
        let peers = Locked<Set<String>>([])
        let server = try ServerHarness(tls: pki.serverConfig(crl: false, requireClient: true)) { request, context, responder in
            peers.withLock { $0.formUnion(context.peerIdentity?.names ?? []) }
            responder.respond(
                HTTPResponse(status: 201, headers: ["Content-Type": "application/scim+json"], body: Array(#"{"id":"1"}"#.utf8)))
        }
        defer { _ = server.stop() }
        let c = try ChildProcess(
            productsDirectory + "/scim-edge",
            [
                "bench", "--url", "https://localhost:\(server.port)/scim/v2", "--requests", "50", "--connections", "2", "--json", "--quiet",
                "--ca", pki.caFile, "--cert", pki.clientCert, "--key", pki.clientKey,
            ])
        XCTAssertEqual(c.waitForExit(seconds: 30), 0)
        let r = try JSONParser.parse(Array(c.output.joined(separator: "\n").utf8))
        XCTAssertEqual(r["status"]?["201"], 50)
        XCTAssertTrue(peers.current.contains(pki.clientURI))
        // Without the client certificate the handshake fails: errors, not responses.
        let refused = try ChildProcess(
            productsDirectory + "/scim-edge",
            [
                "bench", "--url", "https://localhost:\(server.port)/scim/v2", "--requests", "5", "--connections", "1", "--json", "--quiet",
                "--ca", pki.caFile,
            ])
        XCTAssertNotEqual(refused.waitForExit(seconds: 30), 0, "no request completed")
    }
}
