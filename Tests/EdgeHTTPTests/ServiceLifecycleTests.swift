import EdgeHTTP
import EdgeLoop
import EdgeTLS
import EdgeTestSupport
import Foundation
import XCTest

/// A real server process (edge-fixture http-serve): SIGHUP reloads its
/// certificate without a restart, SIGTERM drains.
final class ServiceLifecycleTests: XCTestCase {
    var fixture: String { productsDirectory + "/edge-fixture" }

    /// One TLS request to 127.0.0.1:`port` expecting the name `serverName`:
    /// "200 …" or the error.
    func probe(port: Int, pki: TestPKI, serverName: String) throws -> String {
        let (line, leftOpen) = try runOnLoop { (loop: EventLoop, finish: @escaping @Sendable (String) -> Void) in
            let ctx = try TLSContext(role: .client, configuration: pki.clientConfig(noCert: true))
            let client = HTTPClient(
                loop: loop, address: SocketAddress(host: "127.0.0.1", port: port), tls: ctx,
                serverName: serverName)
            client.send(HTTPRequest(method: "GET", target: "/")) { r in
                client.close()
                switch r {
                case .success(let resp): finish("\(resp.status) \(resp.bodyText)")
                case .failure(let e): finish("error \(e)")
                }
            }
        }
        XCTAssertEqual(leftOpen, 0)
        return line ?? "no answer"
    }

    func testSIGHUPReloadsTheCertificateWithoutARestart() throws {
        let dir = TempDirectory("edge-reload")
        defer { dir.remove() }
        let pki = try TestPKI(in: dir)
        let cert = dir.file("live.crt"), key = dir.file("live.key")
        try FileManager.default.copyItem(atPath: pki.serverCert, toPath: cert)
        try FileManager.default.copyItem(atPath: pki.serverKey, toPath: key)
        let child = try ChildProcess(fixture, ["http-serve", "--port", "0", "--cert", cert, "--key", key])
        let port = try XCTUnwrap(child.waitForLine("listening").flatMap { Int($0.split(separator: " ")[1]) })
        XCTAssertEqual(try probe(port: port, pki: pki, serverName: "localhost"), "200 ok\n")
        XCTAssertTrue(try probe(port: port, pki: pki, serverName: "wrong.example").contains("hostname mismatch"))

        // Rotate the files, then SIGHUP: new connections get the new certificate.
        try FileManager.default.removeItem(atPath: cert)
        try FileManager.default.removeItem(atPath: key)
        try FileManager.default.copyItem(atPath: pki.wrongHostServerCert, toPath: cert)
        try FileManager.default.copyItem(atPath: pki.wrongHostServerKey, toPath: key)
        child.signal(SIGHUP)
        XCTAssertNotNil(child.waitForLine("reloaded"))
        XCTAssertEqual(try probe(port: port, pki: pki, serverName: "wrong.example"), "200 ok\n")
        XCTAssertTrue(try probe(port: port, pki: pki, serverName: "localhost").contains("hostname mismatch"))

        // A broken file: the reload fails and the server keeps serving the old one.
        _ = dir.write("live.key", "garbage")
        child.signal(SIGHUP)
        XCTAssertNotNil(child.waitForLine("reload failed"))
        XCTAssertEqual(try probe(port: port, pki: pki, serverName: "wrong.example"), "200 ok\n")

        child.signal(SIGTERM)
        XCTAssertEqual(child.waitForExit(), 0)
    }

    /// A plain server with one `/slow` request in flight, then SIGTERM.
    func serverDrainingASlowRequest() throws -> (ChildProcess, RawClient, Int) {
        let child = try ChildProcess(fixture, ["http-serve", "--port", "0"])
        let port = try XCTUnwrap(child.waitForLine("listening").flatMap { Int($0.split(separator: " ")[1]) })
        let client = try RawClient(port: port)
        client.send("GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
        XCTAssertNotNil(child.waitForLine("in flight: /slow"), "the request reached the server")
        child.signal(SIGTERM)
        XCTAssertNotNil(child.waitForLine("draining"))
        return (child, client, port)
    }

    func testSIGTERMDrainsInFlightRequestsThenExitsClean() throws {
        let (child, client, port) = try serverDrainingASlowRequest()
        let text = client.readToEnd()
        XCTAssertTrue(text.hasPrefix("HTTP/1.1 200 ") && text.hasSuffix("slow\n"), text)
        XCTAssertTrue(text.contains("Connection: close"))
        XCTAssertNotNil(child.waitForLine("drained"))
        XCTAssertEqual(child.waitForExit(), 0, "clean exit: the loop closed with no handle left (\(child.output))")
        XCTAssertThrowsError(try RawClient(port: port), "nothing listens after the drain")
    }

    func testASecondSIGTERMExitsAtOnce() throws {
        let (child, _, _) = try serverDrainingASlowRequest()
        child.signal(SIGTERM)
        XCTAssertEqual(child.waitForExit(), 1)
        XCTAssertNil(child.waitForLine("drained", seconds: 0.1))
    }
}
