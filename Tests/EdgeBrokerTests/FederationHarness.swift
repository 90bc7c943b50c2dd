import EdgeAgent
import EdgeBroker
import EdgeTLS
import EdgeTestSupport
import EdgeTools
import Foundation
import SCIM
import XCTest

/// Agents and a broker as real processes with certificates made by the test.
class FederationTestCase: XCTestCase {
    var dir: TempDirectory!
    var ca: String!, broker: (String, String)!
    var de: (String, String)!, us: (String, String)!, rogue: (String, String)!, revoked: (String, String)!
    var crl: String!
    /// The federation CA, for tests that issue certificates of their own.
    var authority: CertificateAuthority!
    let deID = "spiffe://scim-edge.test/acme-de/agent-1"
    let usID = "spiffe://scim-edge.test/acme-us/agent-1"
    var children: [ChildProcess] = []

    override func setUpWithError() throws {
        dir = TempDirectory("edge-federation")
        authority = try CertificateAuthority(commonName: "federation CA")
        let other = try CertificateAuthority(commonName: "another CA")
        func save(_ name: String, _ c: Credential) -> (String, String) {
            (dir.write("\(name).crt", c.certificatePEM), dir.write("\(name).key", c.privateKeyPEM))
        }
        ca = dir.write("ca.crt", authority.certificatePEM)
        broker = save(
            "broker", try authority.issue(CertificateRequest(commonName: "broker", dnsNames: ["localhost"], ipAddresses: ["127.0.0.1"])))
        de = save("de", try authority.issue(CertificateRequest(commonName: "agent-de", uris: [deID])))
        us = save("us", try authority.issue(CertificateRequest(commonName: "agent-us", uris: [usID])))
        rogue = save("rogue", try other.issue(CertificateRequest(commonName: "agent-de", uris: [deID])))
        let stolen = try authority.issue(CertificateRequest(commonName: "agent-de-old", uris: [deID]))
        revoked = save("revoked", stolen)
        crl = dir.write("ca.crl", try authority.revocationList(revoking: [stolen.serial]))
    }

    override func tearDown() {
        for c in children where c.process.isRunning { c.signal(SIGKILL); _ = c.waitForExit() }
        dir.remove()
    }

    func port(of child: ChildProcess, _ prefix: String) throws -> Int {
        let line = try XCTUnwrap(child.waitForLine(prefix), "did not start: \(child.output)")
        let address = line.split(separator: " ").first { $0.contains("127.0.0.1:") }!
        return Int(address.split(separator: ":").last!.filter(\.isNumber))!
    }

    func startBroker(port: Int = 0, extra: [String] = []) throws -> (ChildProcess, Int) {
        let child = try ChildProcess(
            productsDirectory + "/scim-broker",
            [
                "serve", "--data-dir", dir.file("broker"), "--listen", "127.0.0.1:\(port)", "--ca", ca, "--cert", broker.0,
                "--key", broker.1, "--domain", "acme-de=\(deID)", "--domain", "acme-us=\(usID)", "--admin-listen", "127.0.0.1:0",
            ] + extra)
        children.append(child)
        return (child, try self.port(of: child, "scim-broker"))
    }

    func startAgent(
        _ name: String, cert: (String, String), domain: String, brokerPort: Int,
        extra: [String] = []
    ) throws -> (ChildProcess, Int) {
        let child = try ChildProcess(
            productsDirectory + "/scim-edge",
            [
                "serve", "--data-dir", dir.file(name), "--listen", "127.0.0.1:0", "--token", "t", "--admin-listen", "none",
                "--broker", "https://127.0.0.1:\(brokerPort)", "--ca", ca, "--cert", cert.0, "--key", cert.1,
                "--domain", domain, "--agent-name", name,
            ] + extra)
        children.append(child)
        return (child, try self.port(of: child, "scim-edge"))
    }

    @discardableResult
    func create(_ port: Int, _ userName: String) throws -> Int { try createUser(port, userName) }

    /// The broker's applied sequences, read from its LMDB file while it runs.
    func applied() -> [String: UInt64] { brokerApplied(dir.file("broker")) }

    func outboxEvents(_ name: String) throws -> Int { try AgentStore(path: dir.file(name), registry: .standard).outboxCount() }

    func api(_ port: Int, _ path: String, method: String = "GET", token: String = "api-token") throws -> (Int, JSON?) {
        let c = try RawClient(port: port)
        c.send(
            "\(method) /scim/v2\(path) HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer \(token)\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
        )
        let r = try XCTUnwrap(c.readResponses(1).first)
        return (r.status, try? JSONParser.parse(r.body))
    }

    /// `/metrics` of a broker or an agent process (from its "operations at" line).
    func brokerMetrics(_ broker: ChildProcess) throws -> String {
        let line = try XCTUnwrap(broker.waitForLine("operations at"))
        let port = Int(line.split(separator: ":").last!.split(separator: "/").first!)!
        let c = try RawClient(port: port)
        c.send("GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        return try XCTUnwrap(c.readResponses(1).first).body
    }

    /// A broker started from a YAML file: the federation settings of
    /// `startBroker` plus `extraYAML` (targets, api, ...).
    func startBroker(yaml extraYAML: String, port: Int = 0, name: String = "broker") throws -> (ChildProcess, Int) {
        let file = dir.write(
            "\(name).yaml",
            """
            dataDir: \(dir.file(name))
            listen: 127.0.0.1:\(port)
            tls: {ca: \(ca!), cert: \(broker.0), key: \(broker.1)}
            domains:
              acme-de: \(deID)
              acme-us: \(usID)
            admin: {listen: 127.0.0.1:0}

            """ + extraYAML)
        let child = try ChildProcess(productsDirectory + "/scim-broker", ["serve", "--config", file])
        children.append(child)
        return (child, try self.port(of: child, "scim-broker"))
    }

    /// A standalone agent (no broker): a downstream app for the fan-out, token `t`.
    func startAppAgent(_ name: String, port: Int = 0) throws -> (ChildProcess, Int) {
        let child = try ChildProcess(
            productsDirectory + "/scim-edge",
            [
                "serve", "--data-dir", dir.file(name), "--listen", "127.0.0.1:\(port)", "--token", "t", "--admin-listen", "none",
            ])
        children.append(child)
        return (child, try self.port(of: child, "scim-edge"))
    }

    /// A `scim-broker` command: its exit status and output (stdout and stderr).
    func brokerCLI(_ args: [String]) throws -> (Int32, String) { try cli("scim-broker", args) }

    /// `PROGRAM ARGS` (`scim-broker`, `scim-edge`) to its end: exit status and output (stdout and stderr).
    func cli(_ program: String, _ args: [String]) throws -> (Int32, String) {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: productsDirectory + "/" + program)
        p.arguments = args
        let pipe = Pipe()
        p.standardOutput = pipe
        p.standardError = pipe
        try p.run()
        let out = pipe.fileHandleForReading.readDataToEndOfFile()
        p.waitUntilExit()
        return (p.terminationStatus, String(decoding: out, as: UTF8.self))
    }

    /// What a SCIM server holds of `endpoint` (`/Users`, `/Groups`), by the value of `key`, read through its own API.
    func resources(_ port: Int, _ endpoint: String, by key: String, token: String, prefix: String) -> [String: JSON] {
        guard let (status, body) = try? scim(port, "GET", "\(endpoint)?count=1000", token: token, prefix: prefix), status == 200 else {
            return [:]
        }
        var out: [String: JSON] = [:]
        for r in body?["Resources"]?.arrayValue ?? [] { if let n = r[key]?.stringValue { out[n] = r } }
        return out
    }

    /// The reference SCIM server (PyPI `scim2-server`), installed into .venv by `make test`.
    func startReferenceServer(port: Int? = nil, arguments: [String] = []) throws -> (ChildProcess, Int) {
        let p = port ?? freeLoopbackPort()
        let child = try startReferenceSCIMServer(port: p, arguments: arguments)
        children.append(child)
        return (child, p)
    }
}

/// One SCIM request over a fresh connection: status and parsed body.
@discardableResult
func scim(
    _ port: Int, _ method: String, _ path: String, _ body: String = "", token: String = "t",
    prefix: String = "/scim/v2", headers: [String: String] = [:]
) throws -> (Int, JSON?) {
    let c = try RawClient(port: port)
    let extra = headers.sorted { $0.key < $1.key }.map { "\($0.key): \($0.value)\r\n" }.joined()
    c.send(
        "\(method) \(prefix)\(path) HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer \(token)\r\n\(extra)"
            + "Content-Type: application/scim+json\r\nConnection: close\r\nContent-Length: \(body.utf8.count)\r\n\r\n\(body)")
    guard let r = c.readResponses(1).first else { return (0, nil) }
    return (r.status, try? JSONParser.parse(r.body))
}

struct HarnessError: Error, CustomStringConvertible {
    let description: String
    init(_ d: String) { description = d }
}

/// One trace across boundaries (`DownlinkTraceTests`, `LocalTargetTests`).
extension FederationTestCase {
    /// HQ's IdP request with a W3C `traceparent` (trace id `trace`): the status.
    func createAtHQ(_ port: Int, _ userName: String, trace: String, extra: String = "") throws -> Int {
        try scim(
            port, "POST", "/Users", #"{"schemas":["urn:ietf:params:scim:schemas:core:2.0:User"],"userName":"\#(userName)"\#(extra)}"#,
            headers: ["traceparent": "00-\(trace)-00f067aa0ba902b7-01"]
        ).0
    }

    /// `scim-broker trace --json`: the hops, in the order given.
    func traceHops(_ what: String) -> [JSON] {
        guard let out = try? brokerCLI(["trace", "--data-dir", dir.file("broker"), "--json", what]).1 else { return [] }
        return out.split(separator: "\n").compactMap { try? JSONParser.parse(Array($0.utf8)) }
    }
}
