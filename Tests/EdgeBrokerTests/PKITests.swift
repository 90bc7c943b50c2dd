import EdgeTLS
import EdgeTestSupport
import Foundation
import XCTest

/// `scim-broker pki` and `scim-edge pki csr` as an operator runs them: real
/// processes, the files they write, a broker and an agent started on them,
/// real TLS handshakes.
final class PKITests: FederationTestCase {
    let identity = "spiffe://acme.example/acme-de/agent-1"

    func pki(_ arguments: [String], file: StaticString = #filePath, line: UInt = #line) throws -> ToolRun {
        let r = try runTool("scim-broker", ["pki"] + arguments)
        XCTAssertEqual(r.status, 0, "\(arguments): \(r)", file: file, line: line)
        return r
    }

    func csr(out: String) throws -> ToolRun {
        try FileManager.default.createDirectory(atPath: out, withIntermediateDirectories: true)
        let r = try runTool(
            "scim-edge", ["pki", "csr", "--domain", "acme-de", "--agent", "agent-1", "--trust-domain", "acme.example", "--out", out])
        XCTAssertEqual(r.status, 0, "\(r)")
        return r
    }

    /// The serial `pki sign` printed.
    func serial(_ run: ToolRun) throws -> String {
        let line = try XCTUnwrap(run.stdout.split(separator: "\n").first { $0.contains("serial ") }, run.stdout)
        return String(line.split(separator: " ")[line.split(separator: " ").firstIndex(of: "serial")! + 1].dropLast())
    }

    /// An extension of a certificate as OpenSSL's own tool prints it: an
    /// opinion independent of the code that wrote it.
    func openssl(_ arguments: [String]) throws -> String { try runProgram("/usr/bin/openssl", arguments).output }

    /// The agent's log says its handshake with the broker failed on a revoked certificate.
    func assertRefusedAsRevoked(_ agent: ChildProcess, file: StaticString = #filePath, line: UInt = #line) {
        XCTAssertTrue(
            eventually(seconds: 20) {
                agent.output.contains { $0.contains("TLS handshake with the broker failed") && $0.contains("revoked") }
            },
            "\(agent.output.suffix(3))", file: file, line: line)
    }

    func mode(_ path: String) throws -> Int {
        (try FileManager.default.attributesOfItem(atPath: path)[.posixPermissions] as? Int) ?? -1
    }

    /// The file names the tools write are the ones the example configurations
    /// name (`pki csr` wrote agent-1.key where the agent's example expects agent.key).
    func testTheFilesWrittenAreTheOnesTheExampleConfigurationsName() throws {
        let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent().path
        func files(_ example: String, under section: String) throws -> [String: String] {
            // The `key: /path` lines of one top-level section of an example configuration.
            var out: [String: String] = [:], inSection = false
            for line in try String(contentsOfFile: "\(root)/packaging/\(example)", encoding: .utf8).split(separator: "\n") {
                if !line.hasPrefix(" ") { inSection = line.hasPrefix("\(section):") }
                let t = line.trimmingCharacters(in: .whitespaces).replacingOccurrences(of: "# ", with: "")  // optional ones too
                guard inSection, let colon = t.firstIndex(of: ":"), t[t.index(after: colon)...].hasPrefix(" /") else { continue }
                let value = t[t.index(colon, offsetBy: 2)...].split(separator: " ").first!
                out[String(t[..<colon])] = (value as NSString).lastPathComponent
            }
            return out
        }
        let agent = try files("agent.example.yaml", under: "broker")
        let broker = try files("broker.example.yaml", under: "tls")
        XCTAssertEqual(agent.count, 4, "\(agent)")
        XCTAssertEqual(broker.count, 4, "\(broker)")

        let appliance = dir.file("appliance"), ca = dir.file("ca"), out = dir.file("issued")
        for d in [ca, out] { try FileManager.default.createDirectory(atPath: d, withIntermediateDirectories: true) }
        _ = try csr(out: appliance)
        XCTAssertTrue(FileManager.default.fileExists(atPath: "\(appliance)/\(agent["key"]!)"), "pki csr writes the key broker.key names")
        XCTAssertFalse(FileManager.default.fileExists(atPath: "\(appliance)/agent-1.key"))
        XCTAssertEqual(try mode("\(appliance)/\(agent["key"]!)"), 0o600)
        _ = try pki(["init", "--dir", ca, "--trust-domain", "acme.example"])
        _ = try pki(["sign", "agent", "--dir", ca, "--csr", "\(appliance)/agent.csr", "--out", appliance])
        _ = try pki(["sign", "broker", "--dir", ca, "--dns", "localhost", "--out", out])
        XCTAssertTrue(FileManager.default.fileExists(atPath: "\(appliance)/\(agent["cert"]!)"))
        for key in ["ca", "crl"] { XCTAssertTrue(FileManager.default.fileExists(atPath: "\(ca)/\(agent[key]!)"), key) }
        for key in ["ca", "crl"] { XCTAssertTrue(FileManager.default.fileExists(atPath: "\(ca)/\(broker[key]!)"), key) }
        for key in ["cert", "key"] { XCTAssertTrue(FileManager.default.fileExists(atPath: "\(out)/\(broker[key]!)"), key) }
        XCTAssertEqual(try mode("\(ca)/federation-ca.key"), 0o600)
        XCTAssertEqual(try mode("\(out)/broker.key"), 0o600)
    }

    /// From nothing to a federation: a CA, an agent's own key signed from its
    /// request, a broker certificate; the agent relays; its certificate is
    /// rotated (SIGHUP) and the old one revoked without a pause; then the
    /// current one is revoked, and the broker refuses it at the handshake.
    func testAFederationFromNothingThroughRotationAndRevocation() throws {
        let ca = dir.file("ca"), appliance = dir.file("appliance"), central = dir.file("central")
        for d in [ca, central] { try FileManager.default.createDirectory(atPath: d, withIntermediateDirectories: true) }
        _ = try pki(["init", "--dir", ca, "--trust-domain", "acme.example", "--name", "Acme federation CA"])
        _ = try csr(out: appliance)
        let signed = try pki(["sign", "agent", "--dir", ca, "--csr", "\(appliance)/agent.csr", "--out", appliance])
        XCTAssertTrue(signed.stdout.contains("domains: { acme-de: \"\(identity)\" }"), signed.stdout)
        let first = try serial(signed)
        _ = try pki(["sign", "broker", "--dir", ca, "--dns", "localhost", "--ip", "127.0.0.1", "--out", central])

        // What the broker and the agents check, as OpenSSL reads it.
        let agentText = try openssl(["x509", "-in", "\(appliance)/agent.crt", "-noout", "-ext", "subjectAltName,extendedKeyUsage"])
        XCTAssertTrue(agentText.contains("URI:\(identity)"), agentText)
        XCTAssertTrue(agentText.contains("TLS Web Client Authentication") && !agentText.contains("Server"), agentText)
        let brokerText = try openssl(["x509", "-in", "\(central)/broker.crt", "-noout", "-ext", "subjectAltName,extendedKeyUsage"])
        XCTAssertTrue(brokerText.contains("DNS:localhost") && brokerText.contains("IP Address:127.0.0.1"), brokerText)
        XCTAssertTrue(brokerText.contains("TLS Web Server Authentication") && !brokerText.contains("Client"), brokerText)
        let verified = try openssl([
            "verify", "-CAfile", "\(ca)/federation-ca.crt", "-crl_check", "-CRLfile", "\(ca)/federation-ca.crl", "\(appliance)/agent.crt",
        ])
        XCTAssertTrue(verified.contains(": OK"), verified)

        let broker = try ChildProcess(
            productsDirectory + "/scim-broker",
            [
                "serve", "--data-dir", dir.file("broker"), "--listen", "127.0.0.1:0", "--ca", "\(ca)/federation-ca.crt",
                "--cert", "\(central)/broker.crt", "--key", "\(central)/broker.key", "--crl", "\(ca)/federation-ca.crl",
                "--domain", "acme-de=\(identity)", "--admin-listen", "127.0.0.1:0",
            ])
        children.append(broker)
        let bp = try port(of: broker, "scim-broker")
        let agent = try ChildProcess(
            productsDirectory + "/scim-edge",
            [
                "serve", "--data-dir", dir.file("agent"), "--listen", "127.0.0.1:0", "--token", "t", "--admin-listen", "none",
                "--broker", "https://localhost:\(bp)", "--ca", "\(ca)/federation-ca.crt", "--cert", "\(appliance)/agent.crt",
                "--key", "\(appliance)/agent.key", "--domain", "acme-de", "--agent-name", "agent-1",
            ])
        children.append(agent)
        let dp = try port(of: agent, "scim-edge")
        XCTAssertEqual(try create(dp, "first"), 201)
        XCTAssertTrue(eventually(seconds: 20) { self.applied()["acme-de/\(self.identity)"] == 1 }, "\(applied()) \(agent.output.suffix(3))")

        // Rotation: a new key and request on the appliance, signed, installed over the old files, SIGHUP.
        _ = try csr(out: "\(appliance)/next")
        let rotated = try pki(["sign", "agent", "--dir", ca, "--csr", "\(appliance)/next/agent.csr", "--out", "\(appliance)/next"])
        for f in ["agent.crt", "agent.key"] { XCTAssertEqual(rename("\(appliance)/next/\(f)", "\(appliance)/\(f)"), 0, f) }
        agent.signal(SIGHUP)
        XCTAssertTrue(
            eventually(seconds: 10) { agent.output.contains { $0.contains("reloaded") && $0.contains("the relay certificate") } },
            "\(agent.output.suffix(3))")
        // The old certificate is revoked once the new one is in use: nothing stops.
        let revokedOld = try pki(["revoke", "--dir", ca, first])
        XCTAssertTrue(revokedOld.stdout.contains("revoked \(first)"), revokedOld.stdout)
        broker.signal(SIGHUP)
        XCTAssertTrue(eventually(seconds: 10) { broker.output.contains { $0.contains("reloaded") } }, "\(broker.output.suffix(3))")
        XCTAssertEqual(try create(dp, "after-rotation"), 201)
        XCTAssertTrue(eventually(seconds: 20) { self.applied()["acme-de/\(self.identity)"] == 2 }, "\(applied()) \(agent.output.suffix(3))")
        let list = try pki(["list", "--dir", ca])
        XCTAssertTrue(list.stdout.contains("\(first)\trevoked "), list.stdout)
        XCTAssertTrue(list.stdout.contains("\(try serial(rotated))\tvalid\t"), list.stdout)

        // Revoking the certificate in use: the reload closes its connection and the next handshake is refused.
        _ = try pki(["revoke", "--dir", ca, "\(appliance)/agent.crt"])
        let crl = try openssl(["crl", "-in", "\(ca)/federation-ca.crl", "-noout", "-text"])
        XCTAssertEqual(crl.components(separatedBy: "Serial Number:").count - 1, 2, crl)
        broker.signal(SIGHUP)
        XCTAssertTrue(
            eventually(seconds: 10) { broker.output.contains { $0.contains("closed an agent connection") } }, "\(broker.output.suffix(3))")
        XCTAssertEqual(try create(dp, "after-revocation"), 201)
        assertRefusedAsRevoked(agent)
        let metrics = try scrapeMetrics(try adminPort(broker))
        XCTAssertGreaterThanOrEqual(sample(metrics, #"scim_broker_tls_handshake_failures_total{reason="revoked"}"#) ?? 0, 1, metrics)
        // The CRL `pki revoke` wrote runs 30 days: the broker says when (an alert watches it).
        let nextUpdate = try XCTUnwrap(sample(metrics, "scim_broker_crl_next_update_timestamp_seconds"), metrics)
        XCTAssertEqual(nextUpdate, Date().timeIntervalSince1970 + 30 * 86400, accuracy: 120)
        XCTAssertEqual(applied()["acme-de/\(identity)"], 2, "nothing relayed with the revoked certificate")
    }

    /// Replacing the CA itself: a new CA of the same trust domain; for the
    /// transition both CA certificates are trusted (one PEM bundle) and both
    /// CRLs loaded (one PEM file), so agents on the old CA and a broker on
    /// the new one relay, with CRL checking on both sides.
    func testTheCAIsReplacedWithBothTrustedDuringTheTransition() throws {
        let old = dir.file("ca-old"), new = dir.file("ca-new"), appliance = dir.file("appliance"), central = dir.file("central")
        for d in [old, new, central] { try FileManager.default.createDirectory(atPath: d, withIntermediateDirectories: true) }
        _ = try pki(["init", "--dir", old, "--trust-domain", "acme.example"])
        _ = try pki(["init", "--dir", new, "--trust-domain", "acme.example", "--name", "Acme federation CA 2"])
        _ = try csr(out: appliance)
        _ = try pki(["sign", "agent", "--dir", old, "--csr", "\(appliance)/agent.csr", "--out", appliance])
        _ = try pki(["sign", "broker", "--dir", new, "--dns", "localhost", "--out", central])
        func concatenated(_ name: String, _ file: String) throws -> String {
            try dir.write(
                name, String(contentsOfFile: "\(old)/\(file)", encoding: .utf8) + String(contentsOfFile: "\(new)/\(file)", encoding: .utf8))
        }
        let trust = try concatenated("both-ca.crt", "federation-ca.crt"), crls = try concatenated("both.crl", "federation-ca.crl")
        let broker = try ChildProcess(
            productsDirectory + "/scim-broker",
            [
                "serve", "--data-dir", dir.file("broker"), "--listen", "127.0.0.1:0", "--ca", trust, "--cert", "\(central)/broker.crt",
                "--key", "\(central)/broker.key", "--crl", crls, "--domain", "acme-de=\(identity)", "--admin-listen", "none",
            ])
        children.append(broker)
        let bp = try port(of: broker, "scim-broker")
        let agent = try ChildProcess(
            productsDirectory + "/scim-edge",
            [
                "serve", "--data-dir", dir.file("agent"), "--listen", "127.0.0.1:0", "--token", "t", "--admin-listen", "none",
                "--broker", "https://localhost:\(bp)", "--ca", trust, "--crl", crls, "--cert", "\(appliance)/agent.crt",
                "--key", "\(appliance)/agent.key", "--domain", "acme-de", "--agent-name", "agent-1",
            ])
        children.append(agent)
        XCTAssertEqual(try create(try port(of: agent, "scim-edge"), "across-cas"), 201)
        XCTAssertTrue(eventually(seconds: 20) { self.applied()["acme-de/\(self.identity)"] == 1 }, "\(agent.output.suffix(3))")
    }

    /// With broker.crl an agent holds the broker to revocations too (a
    /// broker key that leaked): the handshake fails, nothing is relayed, the
    /// outbox keeps it; with a CRL that does not list the broker, it relays.
    func testAnAgentWithTheCRLRefusesARevokedBrokerCertificate() throws {
        let leaked = try authority.issue(.broker(dnsNames: ["localhost"], ipAddresses: ["127.0.0.1"], validDays: 30))
        broker = (dir.write("leaked.crt", leaked.certificatePEM), dir.write("leaked.key", leaked.privateKeyPEM))
        let listsBroker = dir.write("broker-revoked.crl", try authority.revocationList(revoking: [leaked.serial]))
        let (_, bp) = try startBroker()
        let (agent, dp) = try startAgent(
            "de", cert: de, domain: "acme-de", brokerPort: bp, extra: ["--crl", listsBroker, "--admin-listen", "127.0.0.1:0"])
        XCTAssertEqual(try create(dp, "held-back"), 201)
        assertRefusedAsRevoked(agent)
        let metrics = try scrapeMetrics(try adminPort(agent))
        XCTAssertEqual(sample(metrics, "scim_edge_relay_connected"), 0, metrics)
        XCTAssertNotNil(sample(metrics, "scim_edge_relay_crl_next_update_timestamp_seconds"), metrics)
        XCTAssertEqual(applied(), [:])
        agent.signal(SIGTERM)
        XCTAssertEqual(agent.waitForExit(), 0)
        _ = try startAgent("de", cert: de, domain: "acme-de", brokerPort: bp, extra: ["--crl", crl])
        XCTAssertTrue(
            eventually(seconds: 20) { self.applied()["acme-de/\(self.deID)"] == 1 }, "relayed once the CRL does not list the broker")
    }

    /// The CA decides what it issues: not another trust domain, not another
    /// identity than the request's, not over files that exist, not twice the CA.
    /// Each refusal is an error (exit 1) without the usage text.
    func testTheCARefusesWhatItShouldNotIssue() throws {
        let ca = dir.file("ca"), appliance = dir.file("appliance")
        try FileManager.default.createDirectory(atPath: ca, withIntermediateDirectories: true)
        _ = try pki(["init", "--dir", ca, "--trust-domain", "other.example"])
        _ = try csr(out: appliance)
        func refused(_ arguments: [String], _ because: String) throws {
            let r = try runTool("scim-broker", ["pki"] + arguments)
            XCTAssertEqual(r.status, 1, "\(arguments): \(r)")
            XCTAssertTrue(r.stderr.contains(because), "\(arguments): \(r)")
            XCTAssertFalse(r.stderr.contains("USAGE"), "not a usage error: \(r)")
        }
        try refused(["init", "--dir", ca], "holds a CA already")
        try refused(
            ["sign", "agent", "--dir", ca, "--csr", "\(appliance)/agent.csr", "--out", appliance], "this CA issues spiffe://other.example/")
        try refused(["sign", "agent", "--dir", dir.file("nowhere"), "--domain", "d", "--agent", "a"], "no CA in")
        try refused(["revoke", "--dir", ca, "abcdef"], "was not issued by this CA")
        // Without a request the CA makes the key too, and never over one that exists.
        try refused(["sign", "agent", "--dir", ca, "--domain", "acme-de", "--agent", "agent-1", "--out", appliance], "agent.key exists")
        try FileManager.default.createDirectory(atPath: dir.file("made"), withIntermediateDirectories: true)
        _ = try pki(["sign", "agent", "--dir", ca, "--domain", "acme-de", "--agent", "agent-1", "--out", dir.file("made")])
        try refused(
            ["sign", "agent", "--dir", ca, "--domain", "acme-de", "--agent", "agent-1", "--out", dir.file("made")], "agent.crt exists")
        XCTAssertEqual(try runTool("scim-broker", ["pki", "sign", "broker", "--dir", ca]).status, 64, "no name: a usage error")
    }
}
