import EdgeBroker
import EdgeConfig
import EdgeDelivery
import EdgeTLS
import EdgeTestSupport
import Foundation
import SCIM
import XCTest

final class BrokerConfigTests: XCTestCase {
    func testShippedExampleIsValid() throws {
        let source = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
            .deletingLastPathComponent().appendingPathComponent("packaging/broker.example.yaml")
        let config = try BrokerConfiguration.load(file: source.path)
        XCTAssertEqual(config.dataDirectory, "/var/lib/scim-broker")
        XCTAssertEqual(config.listen.port, 8443)
        XCTAssertEqual(
            config.domains,
            [
                DomainBinding(domain: "acme-de", identity: "spiffe://acme.example/acme-de/agent-1"),
                DomainBinding(domain: "acme-us", identity: "spiffe://acme.example/acme-us/agent-1"),
            ])
        XCTAssertEqual(config.tls.crlFile, "/etc/scim-broker/federation-ca.crl")
        XCTAssertTrue(config.tls.verifyPeer, "client certificates are always required")
        XCTAssertEqual(config.apiTokens, [], "no token in a conffile")
        XCTAssertEqual(config.apiTokenFile, "/etc/scim-broker/api.tokens")
        XCTAssertEqual(config.maxPendingBatches, 256)
        let crm = try XCTUnwrap(config.targets.first)
        XCTAssertEqual(crm.name, "crm")
        XCTAssertTrue(crm.useTLS)
        XCTAssertEqual(crm.basePath, "/scim/v2")
        XCTAssertEqual(crm.port, 443)
        XCTAssertEqual(crm.host, "crm.example.com")
        XCTAssertEqual(crm.tokenFile, "/etc/scim-broker/crm.token")
        XCTAssertEqual(crm.removal, .deactivate)
        XCTAssertEqual(crm.deletionGuard, DeletionGuard(maxDeletes: 50, windowSeconds: 300))
        XCTAssertEqual(crm.concurrency, 4)
        XCTAssertEqual(crm.mapping.drop, ["phoneNumbers", "addresses"])
        XCTAssertEqual(crm.routes.count, 2)
        let employee: JSONObject = ["userName": "a", "active": false, "userType": "Employee"]
        XCTAssertTrue(crm.routes(domain: "acme-de", type: "User", employee))
        XCTAssertFalse(crm.routes(domain: "acme-fr", type: "User", employee), "domain not routed")
        XCTAssertFalse(crm.routes(domain: "acme-de", type: "User", ["userName": "b", "active": false]))
        XCTAssertTrue(crm.routes(domain: "acme-fr", type: "Group", ["displayName": "crm-admins"]), "no domain list: all")
        XCTAssertFalse(crm.routes(domain: "acme-de", type: "Group", ["displayName": "staff"]))
        // As shipped, nothing it refers to exists yet: check-config says what is missing and fails.
        let child = try ChildProcess(productsDirectory + "/scim-broker", ["check-config", source.path])
        XCTAssertEqual(child.waitForExit(), 1)
        XCTAssertEqual(child.output.last, "\(source.path): 6 problems", "\(child.output)")
        XCTAssertTrue(
            child.output.contains(
                "\(source.path):9:7: tls.ca: /etc/scim-broker/federation-ca.crt: No such file or directory (fix: create it, or correct the path)"
            ),
            "\(child.output)")
        XCTAssertTrue(
            child.output.contains { $0.hasPrefix("\(source.path):25:14: api.tokenFile: /etc/scim-broker/api.tokens: No such file") },
            "\(child.output)")
        XCTAssertTrue(child.output.contains { $0.contains("targets[0].tokenFile: /etc/scim-broker/crm.token: No such file or directory") })
    }

    func testCheckConfigAcceptsAConfiguredBrokerAndNamesEachProblem() throws {
        let dir = TempDirectory("edge-broker-check")
        defer { dir.remove() }
        let ca = try writeBrokerPKI(in: dir)
        _ = dir.write("crl.pem", try ca.revocationList(revoking: []))
        _ = dir.write("app.token", "secret\n")
        chmod(dir.file("broker.key"), 0o600)
        chmod(dir.file("app.token"), 0o640)
        let config = dir.write(
            "broker.yaml",
            """
            dataDir: \(dir.file("data"))
            tls: {ca: \(dir.file("ca.crt")), cert: \(dir.file("broker.crt")), key: \(dir.file("broker.key")), crl: \(dir.file("crl.pem"))}
            domains: {acme-de: "spiffe://acme.example/acme-de/agent-1"}
            targets:
              - {name: app, url: "https://app.example/scim/v2", tokenFile: \(dir.file("app.token")), routes: [{}]}

            """)
        func check() throws -> (Int32?, [String]) {
            let c = try ChildProcess(productsDirectory + "/scim-broker", ["check-config", config])
            return (c.waitForExit(), c.output)
        }
        let ok = try check()
        XCTAssertEqual(ok.0, 0, "\(ok.1)")
        XCTAssertEqual(ok.1.first, "\(config): ok (1 domains, 1 targets, federation on 127.0.0.1:8443)")
        chmod(dir.file("app.token"), 0o644)
        _ = dir.write(
            "broker.crt", try CertificateAuthority(commonName: "other").issue(CertificateRequest(commonName: "broker")).certificatePEM)
        let bad = try check()
        XCTAssertEqual(bad.0, 1)
        XCTAssertTrue(bad.1.contains { $0.contains("is not accepted by the CA") }, "\(bad.1)")
        XCTAssertTrue(
            bad.1.contains { $0.contains("does not match") || $0.contains("key values mismatch") || $0.contains("and key") }, "\(bad.1)")
        XCTAssertTrue(
            bad.1.contains { $0.contains("targets[0].tokenFile: \(dir.file("app.token")): a secret readable by every user") }, "\(bad.1)")
    }

    /// What is valid key by key can still be wrong across keys;
    /// each is reported at its own line, all in one run.
    func testCrossFieldProblemsAtTheirLines() throws {
        let dir = TempDirectory("edge-broker-cross")
        defer { dir.remove() }
        _ = try writeBrokerPKI(in: dir)
        _ = dir.write("crm.token", "app-issued\n")
        chmod(dir.file("broker.key"), 0o600)
        chmod(dir.file("crm.token"), 0o600)
        let config = dir.write(
            "broker.yaml",
            """
            dataDir: \(dir.file("data"))
            tls: {ca: \(dir.file("ca.crt")), cert: \(dir.file("broker.crt")), key: \(dir.file("broker.key"))}
            domains:
              acme-de: spiffe://acme.example/acme-de/agent-1
              acme-us: spiffe://acme.example/acme-de/agent-1
            api:
              listen: 0.0.0.0:9443
              tokens: [change-me]
            targets:
              - name: crm
                url: https://crm.example/scim/v2
                tokenFile: \(dir.file("crm.token"))
                routes:
                  - domains: [acme-de, acme-fr]

            """)
        let c = try ChildProcess(productsDirectory + "/scim-broker", ["check-config", config])
        XCTAssertEqual(c.waitForExit(), 1)
        for expected in [
            "\(config):5:12: domains.acme-us: 'spiffe://acme.example/acme-de/agent-1' is already bound to domain 'acme-de' (line 4)",
            "\(config):7:11: api.listen: the read API has no TLS: on 0.0.0.0",
            "\(config):8:11: warning: api.tokens: a token in the configuration file",
            "\(config):8:12: api.tokens[0]: the token is a placeholder",
            "\(config):14:28: targets[0].routes[0].domains[1]: domain 'acme-fr' is not bound in 'domains'; did you mean 'acme-de'?",
        ] {
            XCTAssertTrue(c.output.contains { $0.hasPrefix(expected) }, "'\(expected)' not in \(c.output)")
        }
        XCTAssertEqual(c.output.last, "\(config): 4 problems, 1 warning", "\(c.output)")

        // Fixed, with the read API's tokens in api.tokenFile: it passes (the warning gone with the inline tokens).
        _ = dir.write("api.tokens", "# rotated 2025-01\nq3Jx9vY2mP8sL4tW6nB1cR7e\n")
        chmod(dir.file("api.tokens"), 0o640)
        _ = dir.write(
            "broker.yaml",
            try String(contentsOfFile: config, encoding: .utf8)
                .replacingOccurrences(of: "acme-us: spiffe://acme.example/acme-de/", with: "acme-us: spiffe://acme.example/acme-us/")
                .replacingOccurrences(of: "0.0.0.0:9443", with: "127.0.0.1:9443")
                .replacingOccurrences(of: "tokens: [change-me]", with: "tokenFile: \(dir.file("api.tokens"))")
                .replacingOccurrences(of: "acme-fr", with: "acme-us"))
        let ok = try ChildProcess(productsDirectory + "/scim-broker", ["check-config", config])
        XCTAssertEqual(ok.waitForExit(), 0, "\(ok.output)")
        XCTAssertEqual(ok.output, ["\(config): ok (2 domains, 1 targets, federation on 127.0.0.1:8443)"])
        // A weak token in that file fails, at the key naming it.
        _ = dir.write("api.tokens", "changeme\n")
        let weak = try ChildProcess(productsDirectory + "/scim-broker", ["check-config", config])
        XCTAssertEqual(weak.waitForExit(), 1)
        XCTAssertTrue(
            weak.output.contains { $0.hasPrefix("\(config):8:14: api.tokenFile: \(dir.file("api.tokens")): token 1 is a placeholder") },
            "\(weak.output)")
        // The console's operator tokens: a file of their own, strong, and never a reader's token.
        _ = dir.write("api.tokens", "q3Jx9vY2mP8sL4tW6nB1cR7e\n")
        _ = dir.write("operator.tokens", "q3Jx9vY2mP8sL4tW6nB1cR7e\nshort\n")
        chmod(dir.file("operator.tokens"), 0o640)
        _ = dir.write(
            "broker.yaml",
            try String(contentsOfFile: config, encoding: .utf8).replacingOccurrences(
                of: "tokenFile: \(dir.file("api.tokens"))",
                with: "tokenFile: \(dir.file("api.tokens"))\n  operatorTokenFile: \(dir.file("operator.tokens"))"))
        let operators = try ChildProcess(productsDirectory + "/scim-broker", ["check-config", config])
        XCTAssertEqual(operators.waitForExit(), 1)
        for expected in [
            "\(config):9:22: api.operatorTokenFile: \(dir.file("operator.tokens")): token 2 is shorter than 16 characters",
            "\(config):9:22: api.operatorTokenFile: a token is both a read-API token and an operator token",
        ] {
            XCTAssertTrue(operators.output.contains { $0.hasPrefix(expected) }, "'\(expected)' not in \(operators.output)")
        }
    }

    func testStrictErrors() {
        func fails(_ yaml: String, _ fragment: String, line: Int? = nil, file: StaticString = #filePath, lineNo: UInt = #line) {
            let d = ConfigDiagnostics()
            _ = BrokerConfiguration.decode(YAMLNode.parse(yaml, d), d)
            guard let e = d.problems.first(where: { !$0.isWarning && $0.description.contains(fragment) }) else {
                return XCTFail("'\(fragment)' not in \(d.problems)", file: file, line: lineNo)
            }
            if let line { XCTAssertEqual(e.mark?.line, line, "\(e)", file: file, line: lineNo) }
        }
        let base = "dataDir: /d\ntls:\n  ca: a\n  cert: b\n  key: c\n"
        fails(base, "domains: is required")
        fails(base + "domains:\n  acme: x\nmaxPending: 3\n", "maxPending: unknown key; did you mean 'maxPendingBatches'?", line: 8)
        fails(base + "domains:\n  acme: [x]\n", "certificate identity")
        // A '/' would let one domain's LMDB key range (`<domain>/…`) take in another's.
        fails(base + "domains:\n  acme/de: x\n", "letters, digits, '.', '_' and '-' only", line: 7)
        XCTAssertNil(DomainBinding("acme/de=spiffe://x"))
        XCTAssertNotNil(DomainBinding("acme-de.eu_1=spiffe://x"))
        fails("dataDir: /d\ntls:\n  ca: a\n", "tls.cert: is required")
        fails(base + "domains:\n  acme: x\napi:\n  listen: nowhere\n", "api.listen: must be HOST:PORT")
        fails(
            base + "domains:\n  acme: x\napi:\n  tokens: [q3Jx9vY2mP8sL4tW6nB1cR7e]\n  operatorTokens: [q3Jx9vY2mP8sL4tW6nB1cR7e]\n",
            "api.operatorTokens: a token is both a read-API token and an operator token", line: 10)
        let d = base + "domains:\n  acme: x\ntargets:\n"
        fails(d + "  - name: a\n    url: ftp://x\n    routes: []\n", "is not http(s)://HOST:PORT/PATH", line: 10)
        fails(d + "  - name: a\n    url: http://127.0.0.1:1\n", "targets[0].routes: is required", line: 9)
        fails(d + "  - name: a b\n    url: http://127.0.0.1:1\n    routes: []\n", "letters, digits")
        fails(d + "  - name: a\n    url: http://127.0.0.1:1\n    routes: [{filter: 'userName eq 1 and'}]\n", "target 'a'")
        fails(d + "  - name: a\n    url: http://127.0.0.1:1\n    routes: [{filter: 'userName eq \"x\"'}]\n", "types: [User]")
        fails(d + "  - name: a\n    url: http://127.0.0.1:1\n    routes: [{types: [Users]}]\n", "must be User or Group")
        fails(d + "  - name: a\n    url: http://127.0.0.1:1\n    onRemove: purge\n    routes: []\n", "delete or deactivate", line: 11)
        fails(d + "  - name: a\n    url: http://127.0.0.1:1\n    routes: []\n    color: red\n", "targets[0].color: unknown key", line: 12)
        fails(
            d + "  - {name: a, url: 'http://127.0.0.1:1', routes: []}\n  - {name: a, url: 'http://127.0.0.1:2', routes: []}\n",
            "defined twice")
        fails(d + "  - name: a\n    url: http://127.0.0.1:1\n    rate: {concurrency: 0}\n    routes: []\n", "1 to 256")
        // A target is an app (url) or a boundary (domain).
        fails(d + "  - name: a\n    routes: []\n", "targets[0].url: is required")
        fails(
            d + "  - name: a\n    url: http://127.0.0.1:1\n    domain: acme\n    routes: []\n",
            "an app (url) or a boundary (domain), not both")
        fails(d + "  - name: a\n    domain: acme-fr\n    routes: []\n", "domain 'acme-fr' is not bound")
        fails(d + "  - {name: a, domain: acme, routes: []}\n  - {name: b, domain: acme, routes: []}\n", "already the destination")
        let ok = ConfigDiagnostics()
        let config = BrokerConfiguration.decode(YAMLNode.parse(d + "  - {name: b, domain: acme, routes: [{}]}\n", ok), ok)
        XCTAssertEqual(ok.problems.filter { !$0.isWarning }.map(\.description), [])
        let boundary = try? XCTUnwrap(config.targets.first)
        XCTAssertEqual(boundary?.destination, "acme")
        XCTAssertEqual(boundary?.routes(domain: "other", type: "User", ["userName": "u"]), true)
        XCTAssertEqual(boundary?.routes(domain: "acme", type: "User", ["userName": "u"]), false, "never its own domain's back")
        let warned = ConfigDiagnostics()
        _ = BrokerConfiguration.decode(
            YAMLNode.parse(d + "  - {name: b, domain: acme, routes: [{}], mapping: {drop: [title]}}\n", warned), warned)
        XCTAssertTrue(
            warned.problems.contains { $0.isWarning && $0.description.contains("mapping: applies to apps (url), not to a boundary") },
            "\(warned.problems)")
    }

    /// A federation CA and a broker certificate and key in `dir` (`ca.crt`, `broker.crt`, `broker.key`).
    func writeBrokerPKI(in dir: TempDirectory) throws -> CertificateAuthority {
        let ca = try CertificateAuthority(commonName: "federation CA")
        let cert = try ca.issue(CertificateRequest(commonName: "broker", dnsNames: ["broker.acme.example"]))
        _ = dir.write("ca.crt", ca.certificatePEM)
        _ = dir.write("broker.crt", cert.certificatePEM)
        _ = dir.write("broker.key", cert.privateKeyPEM)
        return ca
    }
}
