import EdgeBroker
import EdgeConfig
import EdgeTestSupport
import Foundation
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
        XCTAssertEqual(config.apiTokens, ["change-me"])
        XCTAssertEqual(config.maxPendingBatches, 256)
        let child = try ChildProcess(productsDirectory + "/scim-broker", ["check-config", source.path])
        XCTAssertEqual(child.waitForExit(), 0)
    }

    func testStrictErrors() {
        func fails(_ yaml: String, _ fragment: String, line: Int? = nil) {
            XCTAssertThrowsError(try BrokerConfiguration.decode(try YAMLNode.parse(yaml))) { error in
                let e = error as! ConfigError
                XCTAssertTrue(e.message.contains(fragment), "'\(e.message)' should contain '\(fragment)'")
                if let line { XCTAssertEqual(e.mark?.line, line) }
            }
        }
        let base = "dataDir: /d\ntls:\n  ca: a\n  cert: b\n  key: c\n"
        fails(base, "'domains'")
        fails(base + "domains:\n  acme: x\nmaxPending: 3\n", "unknown key 'maxPending'", line: 8)
        fails(base + "domains:\n  acme: [x]\n", "certificate identity")
        fails("dataDir: /d\ntls:\n  ca: a\n", "needs ca, cert and key")
        fails(base + "domains:\n  acme: x\napi:\n  listen: nowhere\n", "'api.listen'")
    }
}
