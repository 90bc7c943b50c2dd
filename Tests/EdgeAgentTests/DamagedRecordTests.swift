import EdgeLoop
import EdgeStore
import EdgeTestSupport
import Foundation
import SCIM
import XCTest

@testable import EdgeAgent

/// A stored resource that no longer parses (the file damaged there) is
/// named wherever it is read: a SCIM read answers 500 saying which record,
/// and an agent whose policy changed, which reads every resource before it
/// serves, refuses to start naming it. Before, both said only where the
/// parser stopped ("unexpected end of input at line 1, column 7").
final class DamagedRecordTests: XCTestCase {
    func testADamagedResourceIsNamedByAReadAndByTheStart() throws {
        let agent = try AgentHarness()
        let created = try agent.call("POST", "/Users", userBody("alice"))
        XCTAssertEqual(created.status, 201)
        let id = try XCTUnwrap(created.body?["id"]?.stringValue)
        let store = try agent.openStore()
        try store.environment.write { txn in try txn.put(store.resources, Array("User/\(id)".utf8), Array(#"{"id":"#.utf8)) }
        let read = try agent.call("GET", "/Users/\(id)")
        XCTAssertEqual(read.status, 500)
        let detail = read.body?["detail"]?.stringValue ?? ""
        XCTAssertTrue(detail.contains("User/\(id)") && detail.contains("damaged"), detail)
        XCTAssertEqual(agent.stop(), 0)

        // Another policy fingerprint: the next start applies the policy to every stored resource first.
        try store.environment.write { txn in try txn.put(store.meta, Array("policy".utf8), Array("another".utf8)) }
        let path = agent.dir.file("data")
        XCTAssertThrowsError(
            try LoopThread.start { loop in
                var config = AgentConfiguration(dataDirectory: path, listen: SocketAddress(host: "127.0.0.1", port: 0))
                config.tokens = ["t"]
                config.endpoint.recordOutbox = true
                _ = try AgentService(loop: loop, configuration: config)
            }
        ) { error in
            XCTAssertTrue("\(error)".contains("the stored resource User/\(id) cannot be read"), "\(error)")
        }
    }
}
