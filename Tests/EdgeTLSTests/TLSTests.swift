import EdgeTLS
import EdgeTestSupport
import Foundation
import XCTest

/// Handshakes between two in-memory endpoints: ciphertext is moved by hand,
/// no sockets (the socket versions are in EdgeHTTPTests).
final class TLSTests: XCTestCase {
    var dir: TempDirectory!
    var pki: TestPKI!

    override func setUpWithError() throws {
        dir = TempDirectory("edge-tls")
        pki = try TestPKI(in: dir)
    }
    override func tearDown() { dir.remove() }

    struct Outcome {
        var client: String
        var server: String
        var serverSawClient: PeerIdentity?
        var clientSawServer: PeerIdentity?
    }

    /// Runs the handshake, then one round trip of application data so that a
    /// rejection sent after the client's view of the handshake (TLS 1.3)
    /// reaches the client.
    func connect(server: TLSConfiguration, client: TLSConfiguration, peerName: String? = "localhost") throws -> Outcome {
        let s = try TLSContext(role: .server, configuration: server).makeSession()
        let c = try TLSContext(role: .client, configuration: client).makeSession(peerName: peerName)
        var cs: TLSProgress = .needsInput, ss: TLSProgress = .needsInput
        func move(_ from: TLSSession, _ to: TLSSession) {
            let bytes = from.takeOutput()
            bytes.withUnsafeBytes { to.feed($0) }
        }
        for _ in 0..<10 {
            if cs == .needsInput { cs = c.handshake() }
            move(c, s)
            if ss == .needsInput { ss = s.handshake() }
            move(s, c)
        }
        var out = Outcome(client: describe(cs), server: describe(ss))
        var buf = [UInt8](repeating: 0, count: 256)
        if cs == .complete {
            try Array("ping".utf8).withUnsafeBytes { try c.write($0) }
            move(c, s)
            if ss == .complete {
                let r = buf.withUnsafeMutableBytes { s.read(into: $0) }
                out.server = r == .data(4) ? "ok" : "read: \(r)"
                try Array("pong".utf8).withUnsafeBytes { try s.write($0) }
                move(s, c)
            }
            let r = buf.withUnsafeMutableBytes { c.read(into: $0) }
            if case .data(4) = r {
                out.client = "ok"
            } else if case .failed(let e) = r {
                out.client = "failed: \(e)"
            } else {
                out.client = "read: \(r)"
            }
        }
        out.serverSawClient = s.peerIdentity
        out.clientSawServer = c.peerIdentity
        if cs == .complete && ss == .complete { XCTAssertEqual(c.protocolVersion, "TLSv1.3") }
        return out
    }

    func describe(_ p: TLSProgress) -> String {
        switch p {
        case .complete: return "ok"
        case .needsInput: return "stuck"
        case .failed(let e): return "failed: \(e)"
        }
    }

    func testMutualTLSIsAcceptedAndBothSidesSeeTheOthersIdentity() throws {
        let o = try connect(server: pki.serverConfig(), client: pki.clientConfig())
        XCTAssertEqual(o.client, "ok")
        XCTAssertEqual(o.server, "ok")
        let agent = try XCTUnwrap(o.serverSawClient)
        XCTAssertEqual(agent.uris, [pki.clientURI])
        XCTAssertEqual(agent.dnsNames, ["agent-1.acme-de.test"])
        XCTAssertEqual(agent.commonName, "agent-1")
        XCTAssertEqual(agent.names.first, pki.clientURI, "SAN URI is the most specific identity")
        XCTAssertEqual(agent.sha256Fingerprint.count, 64)
        let broker = try XCTUnwrap(o.clientSawServer)
        XCTAssertEqual(broker.ipAddresses, ["127.0.0.1", "0:0:0:0:0:0:0:1"])
        XCTAssertEqual(broker.dnsNames, ["localhost"])
    }

    func testFingerprintMatchesOpenSSLCommandLine() throws {
        let o = try connect(server: pki.serverConfig(), client: pki.clientConfig())
        let process = Process()
        process.executableURL = URL(fileURLWithPath: "/usr/bin/openssl")
        process.arguments = ["x509", "-in", pki.clientCert, "-noout", "-fingerprint", "-sha256"]
        let pipe = Pipe()
        process.standardOutput = pipe
        try process.run()
        process.waitUntilExit()
        let text = String(decoding: pipe.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
        let expected = text.split(separator: "=").last!.trimmingCharacters(in: .whitespacesAndNewlines)
            .replacingOccurrences(of: ":", with: "").lowercased()
        XCTAssertEqual(o.serverSawClient?.sha256Fingerprint, expected)
    }

    func testClientWithoutCertificateIsRefusedOnBothSides() throws {
        let o = try connect(server: pki.serverConfig(), client: pki.clientConfig(noCert: true))
        XCTAssertTrue(o.server.contains("peer did not return a certificate"), o.server)
        XCTAssertTrue(o.client.hasPrefix("failed:") && o.client.contains("certificate required"), o.client)
        XCTAssertNil(o.serverSawClient)
    }

    func testClientFromAnotherCAIsRefusedOnBothSides() throws {
        let o = try connect(
            server: pki.serverConfig(),
            client: pki.clientConfig(cert: pki.otherCAClientCert, key: pki.otherCAClientKey))
        XCTAssertTrue(o.server.contains("unable to get local issuer certificate"), o.server)
        XCTAssertTrue(o.client.hasPrefix("failed:") && o.client.contains("unknown ca"), o.client)
    }

    func testExpiredClientIsRefusedOnBothSides() throws {
        let o = try connect(
            server: pki.serverConfig(),
            client: pki.clientConfig(cert: pki.expiredClientCert, key: pki.expiredClientKey))
        XCTAssertTrue(o.server.contains("certificate has expired"), o.server)
        XCTAssertTrue(o.client.hasPrefix("failed:") && o.client.contains("certificate expired"), o.client)
    }

    /// The `pki sign` profiles: an agent's certificate (clientAuth) cannot
    /// serve as the broker's, the broker's (serverAuth) cannot pass as an
    /// agent's; each works in its own role. A CA loaded from its PEM files
    /// signs a request's key with the names it decides.
    func testSignedProfilesHoldOnlyInTheirRole() throws {
        let made = try CertificateAuthority(commonName: "federation", uris: ["spiffe://acme.example"])
        let ca = try CertificateAuthority(certificatePEM: made.certificatePEM, privateKeyPEM: made.privateKeyPEM)
        XCTAssertEqual(ca.identity.uris, ["spiffe://acme.example"])
        let caFile = dir.write("fed.crt", ca.certificatePEM)
        let request = try makeSigningRequest(commonName: "asked", uris: ["spiffe://acme.example/acme-de/agent-1"])
        let csr = try SigningRequest(pem: request.requestPEM)
        XCTAssertEqual(csr.identity.uris, ["spiffe://acme.example/acme-de/agent-1"])
        let agent = try ca.sign(csr, .agent(trustDomain: "acme.example", domain: "acme-de", agent: "agent-1", validDays: 1))
        let agentFiles = (dir.write("a.crt", agent.certificatePEM), dir.write("a.key", request.privateKeyPEM))
        let broker = try ca.issue(.broker(dnsNames: ["localhost"], ipAddresses: ["127.0.0.1"], validDays: 1))
        let brokerFiles = (dir.write("b.crt", broker.certificatePEM), dir.write("b.key", broker.privateKeyPEM))
        func with(_ files: (String, String)) -> TLSConfiguration {
            TLSConfiguration(certificateChainFile: files.0, privateKeyFile: files.1, trustRootsFile: caFile)
        }
        let right = try connect(server: with(brokerFiles), client: with(agentFiles))
        XCTAssertEqual(right.server, "ok")
        XCTAssertEqual(right.serverSawClient?.uris, ["spiffe://acme.example/acme-de/agent-1"])
        XCTAssertEqual(right.serverSawClient?.commonName, "agent-1.acme-de", "the CA's names, not the request's")
        let swapped = try connect(server: with(agentFiles), client: with(brokerFiles))
        XCTAssertTrue(swapped.client.contains("certificate purpose"), swapped.client)
        let asAgent = try connect(server: with(brokerFiles), client: with(brokerFiles))
        XCTAssertTrue(asAgent.server.contains("certificate purpose"), asAgent.server)
        XCTAssertThrowsError(try SigningRequest(pem: "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n"))
    }

    func testRevokedClientIsRefusedOnBothSides() throws {
        let o = try connect(
            server: pki.serverConfig(crl: true),
            client: pki.clientConfig(cert: pki.revokedClientCert, key: pki.revokedClientKey))
        XCTAssertTrue(o.server.contains("certificate revoked"), o.server)
        XCTAssertTrue(o.client.hasPrefix("failed:") && o.client.contains("certificate revoked"), o.client)
        // Without the CRL the same certificate is accepted: the CRL is what refuses it.
        let without = try connect(
            server: pki.serverConfig(crl: false),
            client: pki.clientConfig(cert: pki.revokedClientCert, key: pki.revokedClientKey))
        XCTAssertEqual(without.server, "ok")
    }

    func testWrongHostnameIsRefusedByTheClientAndTheServerLearnsWhy() throws {
        var server = pki.serverConfig()
        server.certificateChainFile = pki.wrongHostServerCert
        server.privateKeyFile = pki.wrongHostServerKey
        let o = try connect(server: server, client: pki.clientConfig(), peerName: "localhost")
        XCTAssertTrue(o.client.contains("hostname mismatch"), o.client)
        XCTAssertTrue(o.server.hasPrefix("failed:") && o.server.contains("bad certificate"), o.server)
        // An IP the certificate does not name is refused the same way.
        let ip = try connect(server: server, client: pki.clientConfig(), peerName: "127.0.0.1")
        XCTAssertTrue(ip.client.contains("IP address mismatch"), ip.client)
        // The right certificate passes by IPv6 address too.
        XCTAssertEqual(try connect(server: pki.serverConfig(), client: pki.clientConfig(), peerName: "::1").client, "ok")
    }

    func testReloadPicksUpANewCertificateForNewSessions() throws {
        let chain = dir.file("live.crt"), key = dir.file("live.key")
        try FileManager.default.copyItem(atPath: pki.serverCert, toPath: chain)
        try FileManager.default.copyItem(atPath: pki.serverKey, toPath: key)
        var config = pki.serverConfig()
        config.certificateChainFile = chain
        config.privateKeyFile = key
        let reloadable = try ReloadableTLSContext(role: .server, configuration: config)
        let before = reloadable.context
        // Rotate to the wrong-host certificate and reload.
        try FileManager.default.removeItem(atPath: chain)
        try FileManager.default.removeItem(atPath: key)
        try FileManager.default.copyItem(atPath: pki.wrongHostServerCert, toPath: chain)
        try FileManager.default.copyItem(atPath: pki.wrongHostServerKey, toPath: key)
        try reloadable.reload()
        XCTAssertFalse(before === reloadable.context)
        let o = try connect(server: reloadable.context.configuration, client: pki.clientConfig())
        XCTAssertTrue(o.client.contains("hostname mismatch"), "new sessions use the new certificate: \(o.client)")
        // A broken file keeps the old context.
        _ = dir.write("live.key", "not a key")
        XCTAssertThrowsError(try reloadable.reload())
        XCTAssertEqual(reloadable.context.configuration, config)
    }

    func testErrorsCarryTheOpenSSLErrorQueue() {
        XCTAssertThrowsError(
            try TLSContext(
                role: .server,
                configuration: TLSConfiguration(
                    certificateChainFile: "/nonexistent/cert.pem", privateKeyFile: "/nonexistent/key.pem"))
        ) { error in
            let e = error as! TLSError
            XCTAssertTrue(e.operation.contains("/nonexistent/cert.pem"))
            XCTAssertFalse(e.reasons.isEmpty, "the OpenSSL error queue is kept")
        }
        XCTAssertThrowsError(
            try TLSContext(
                role: .server,
                configuration: TLSConfiguration(
                    certificateChainFile: pki.serverCert, privateKeyFile: pki.clientKey))
        ) { error in
            XCTAssertTrue("\(error)".contains("key values mismatch"), "\(error)")
        }
        let notCRL = dir.write("empty.crl", "")
        XCTAssertThrowsError(
            try TLSContext(
                role: .server,
                configuration: TLSConfiguration(
                    certificateChainFile: pki.serverCert, privateKeyFile: pki.serverKey, trustRootsFile: pki.caFile, crlFile: notCRL)))
    }
}
