import EdgeAgent
import EdgeTestSupport
import Foundation
import SCIM
import XCTest

/// Lists above the scan budget (issue 15, point 3): a small budget, a few
/// thousand users, every list form over a real socket.
final class ListAtScaleTests: XCTestCase {
    /// Creates `n` users named `<prefix><k>` through `/Bulk` requests of up to
    /// 1,000 operations (one commit each); `extra(k)` adds members. Returns the ids.
    @discardableResult
    func fill(_ agent: AgentHarness, _ n: Int, prefix: String = "u", extra: (Int) -> String = { _ in "" }) throws -> [String] {
        var ids: [String] = []
        var k = 0
        while k < n {
            let batch = k..<min(n, k + 1000)
            let ops = batch.map { i in
                #"{"method":"POST","path":"/Users","bulkId":"b\#(i)","data":\#(userBody("\(prefix)\(i)", extra: extra(i)))}"#
            }.joined(separator: ",")
            let r = try agent.call(
                "POST", "/Bulk", #"{"schemas":["urn:ietf:params:scim:api:messages:2.0:BulkRequest"],"Operations":[\#(ops)]}"#)
            XCTAssertEqual(r.status, 200)
            for op in r.body?["Operations"]?.arrayValue ?? [] {
                XCTAssertEqual(op["status"]?.stringValue, "201")
                if let location = op["location"]?.stringValue { ids.append(String(location.split(separator: "/").last!)) }
            }
            k = batch.upperBound
        }
        XCTAssertEqual(ids.count, n)
        return ids
    }

    func testCountsAboveTheBudgetAndAcrossARestart() throws {
        var agent: AgentHarness? = try AgentHarness(scanBudget: 500)
        let ids = try fill(agent!, 1_500)
        let counted = try agent!.call("GET", "/Users?count=0")
        XCTAssertEqual(counted.status, 200, "count=0 needs no scan")
        XCTAssertEqual(counted.body?["totalResults"], 1_500)
        XCTAssertEqual(counted.body?["Resources"]?.arrayValue?.count, 0)
        for id in ids.prefix(7) { XCTAssertEqual(try agent!.call("DELETE", "/Users/\(id)").status, 204) }
        XCTAssertEqual(try agent!.call("DELETE", "/Users/\(ids[0])").status, 404)
        _ = try agent!.call(
            "POST", "/Groups",
            #"{"schemas":["urn:ietf:params:scim:schemas:core:2.0:Group"],"displayName":"g","members":[{"value":"\#(ids[9])"}]}"#)
        XCTAssertEqual(try agent!.call("GET", "/Users?count=0").body?["totalResults"], 1_493)
        XCTAssertEqual(try agent!.call("GET", "/Groups?count=0").body?["totalResults"], 1)
        // A failed create (userName taken) counts nothing.
        XCTAssertEqual(try agent!.call("POST", "/Users", userBody("u100")).status, 409)
        XCTAssertEqual(agent!.stop(), 0)

        // A restart on the same data directory: the count is stored.
        let path = agent!.dir.file("data")
        let again = try AgentHarness(scanBudget: 500) { $0.dataDirectory = path }
        XCTAssertEqual(try again.call("GET", "/Users?count=0").body?["totalResults"], 1_493)
        XCTAssertEqual(try again.call("GET", "/Groups?count=0").body?["totalResults"], 1)
        XCTAssertEqual(again.stop(), 0)

        // A store without the counts (made before them) gets them at open.
        do {
            let store = try agent!.openStore()
            let meta = try store.environment.openDatabase("meta")
            try store.environment.write { txn in
                _ = try txn.delete(meta, Array("count/User".utf8))
                _ = try txn.delete(meta, Array("count/Group".utf8))
            }
        }
        let store = try agent!.openStore()
        XCTAssertEqual(try store.count(SchemaRegistry.standard.resourceType("User")!), 1_493, "computed once at open")
        XCTAssertEqual(try store.count(SchemaRegistry.standard.resourceType("Group")!), 1)
        agent = nil
    }
}
