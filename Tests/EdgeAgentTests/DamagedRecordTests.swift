import EdgeLoop
import EdgeStore
import EdgeTestSupport
import Foundation
import SCIM
import XCTest

@testable import EdgeAgent

/// A stored resource that no longer parses (the file damaged there) is
/// named wherever it is parsed: a SCIM read or list answers 500 saying
/// which record, and an agent whose policy changed, which reads every
/// resource before it serves, refuses to start naming it. Before, they said
/// only where the parser stopped ("unexpected end of input at line 1,
/// column 7"), and a value that parsed but was no object read as absent
/// (a GET by id answered `{}`) and was skipped by lists.
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
        // A list reads it too (not skipped in silence), and a filter that scans (one on an index reads only what it names).
        for path in ["/Users", "/Users?filter=nickName%20eq%20%22bob%22"] {
            let list = try agent.call("GET", path)
            XCTAssertEqual(list.status, 500, path)
            XCTAssertTrue(list.body?["detail"]?.stringValue?.contains("User/\(id)") == true, "\(path): \(list.raw)")
        }
        // A value that parses but is no resource is damage too, not an absent resource.
        try store.environment.write { txn in try txn.put(store.resources, Array("User/\(id)".utf8), Array("5".utf8)) }
        let number = try agent.call("GET", "/Users/\(id)")
        XCTAssertEqual(number.status, 500)
        XCTAssertTrue(number.body?["detail"]?.stringValue?.contains("not a JSON object") == true, number.raw)
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
