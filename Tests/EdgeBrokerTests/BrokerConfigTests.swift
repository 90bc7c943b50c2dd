import EdgeBroker
import EdgeConfig
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
        XCTAssertEqual(config.domains, [DomainBinding(domain: "acme-de", identity: "spiffe://acme.example/acme-de/agent-1"),
                                        DomainBinding(domain: "acme-us", identity: "spiffe://acme.example/acme-us/agent-1")])
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
        XCTAssertTrue(child.output.contains("\(source.path):9:7: tls.ca: /etc/scim-broker/federation-ca.crt: No such file or directory (fix: create it, or correct the path)"),
                      "\(child.output)")
        XCTAssertTrue(child.output.contains { $0.hasPrefix("\(source.path):24:14: api.tokenFile: /etc/scim-broker/api.tokens: No such file") }, "\(child.output)")
        XCTAssertTrue(child.output.contains { $0.contains("targets[0].tokenFile: /etc/scim-broker/crm.token: No such file or directory") })
    }

    func testCheckConfigAcceptsAConfiguredBrokerAndNamesEachProblem() throws {
        let dir = TempDirectory("edge-broker-check")
        defer { dir.remove() }
        let ca = try CertificateAuthority(commonName: "federation CA")
        let cert = try ca.issue(CertificateRequest(commonName: "broker", dnsNames: ["broker.acme.example"]))
        _ = dir.write("ca.crt", ca.certificatePEM)
        _ = dir.write("broker.crt", cert.certificatePEM)
        _ = dir.write("broker.key", cert.privateKeyPEM)
        _ = dir.write("crl.pem", try ca.revocationList(revoking: []))
        _ = dir.write("app.token", "secret\n")
        chmod(dir.file("broker.key"), 0o600)
        chmod(dir.file("app.token"), 0o640)
        let config = dir.write("broker.yaml", """
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
        _ = dir.write("broker.crt", try CertificateAuthority(commonName: "other").issue(CertificateRequest(commonName: "broker")).certificatePEM)
        let bad = try check()
        XCTAssertEqual(bad.0, 1)
        XCTAssertTrue(bad.1.contains { $0.contains("is not accepted by the CA") }, "\(bad.1)")
        XCTAssertTrue(bad.1.contains { $0.contains("does not match") || $0.contains("key values mismatch") || $0.contains("and key") }, "\(bad.1)")
        XCTAssertTrue(bad.1.contains { $0.contains("targets[0].tokenFile: \(dir.file("app.token")): a secret readable by every user") }, "\(bad.1)")
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
        fails("dataDir: /d\ntls:\n  ca: a\n", "tls.cert: is required")
        fails(base + "domains:\n  acme: x\napi:\n  listen: nowhere\n", "api.listen: must be HOST:PORT")
        let d = base + "domains:\n  acme: x\ntargets:\n"
        fails(d + "  - name: a\n    url: ftp://x\n    routes: []\n", "is not http(s)://HOST:PORT/PATH", line: 10)
        fails(d + "  - name: a\n    url: http://127.0.0.1:1\n", "needs 'routes'", line: 9)
        fails(d + "  - name: a b\n    url: http://127.0.0.1:1\n    routes: []\n", "letters, digits")
        fails(d + "  - name: a\n    url: http://127.0.0.1:1\n    routes: [{filter: 'userName eq 1 and'}]\n", "target 'a'")
        fails(d + "  - name: a\n    url: http://127.0.0.1:1\n    routes: [{filter: 'userName eq \"x\"'}]\n", "types: [User]")
        fails(d + "  - name: a\n    url: http://127.0.0.1:1\n    routes: [{types: [Users]}]\n", "must be User or Group")
        fails(d + "  - name: a\n    url: http://127.0.0.1:1\n    onRemove: purge\n    routes: []\n", "delete or deactivate", line: 11)
        fails(d + "  - name: a\n    url: http://127.0.0.1:1\n    routes: []\n    color: red\n", "targets[0].color: unknown key", line: 12)
        fails(d + "  - {name: a, url: 'http://127.0.0.1:1', routes: []}\n  - {name: a, url: 'http://127.0.0.1:2', routes: []}\n", "defined twice")
        fails(d + "  - name: a\n    url: http://127.0.0.1:1\n    rate: {concurrency: 0}\n    routes: []\n", "1 to 256")
    }
}
