import EdgeAgent
import EdgeTestSupport
import Foundation
import SCIM
import XCTest

/// Lists above the scan budget: a small budget, a few
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
        let migrated = try AgentHarness(scanBudget: 500) { $0.dataDirectory = path }
        XCTAssertEqual(try migrated.call("GET", "/Users?count=0").body?["totalResults"], 1_493, "computed once at open")
        XCTAssertEqual(try migrated.call("GET", "/Groups?count=0").body?["totalResults"], 1)
        XCTAssertEqual(try migrated.call("DELETE", "/Users/\(ids[8])").status, 204)
        XCTAssertEqual(try migrated.call("GET", "/Users?count=0").body?["totalResults"], 1_492, "and kept from then on")
        XCTAssertEqual(migrated.stop(), 0)
        agent = nil
    }

    /// The ids (or `attribute` values) of every page of a walk: by cursor
    /// when `cursor`, else by startIndex; checks totalResults on each page.
    func pages(
        _ agent: AgentHarness, _ query: String, count: Int, cursor: Bool, total: Int, attribute: String = "id",
        file: StaticString = #filePath, line: UInt = #line
    ) throws -> [String] {
        var out: [String] = [], next = "", start = 1
        for _ in 0..<10_000 {
            let page = try agent.call(
                "GET", "/Users?\(query)&count=\(count)&attributes=userName&" + (cursor ? "cursor=\(next)" : "startIndex=\(start)"))
            XCTAssertEqual(page.status, 200, page.raw, file: file, line: line)
            XCTAssertEqual(page.body?["totalResults"], .int(total), file: file, line: line)
            let got = page.body?["Resources"]?.arrayValue?.compactMap { $0[attribute]?.stringValue } ?? []
            XCTAssertLessThanOrEqual(got.count, count, file: file, line: line)
            out += got
            if cursor {
                guard let n = page.body?["nextCursor"]?.stringValue else { break }
                next = n
            } else {
                XCTAssertEqual(page.body?["startIndex"], .int(start), file: file, line: line)
                start += count
                if start > total { break }
            }
        }
        return out
    }

    func testUnfilteredPagesAboveTheBudget() throws {
        let agent = try AgentHarness(scanBudget: 500)
        let ids = try fill(agent, 2_000)
        _ = try agent.call("POST", "/Groups", #"{"schemas":["urn:ietf:params:scim:schemas:core:2.0:Group"],"displayName":"g"}"#)

        let okta = try agent.call("GET", "/Users?startIndex=1&count=100")
        XCTAssertEqual(okta.status, 200, "an import page needs no scan")
        XCTAssertEqual(okta.body?["totalResults"], 2_000)
        XCTAssertEqual(okta.body?["itemsPerPage"], 100)
        XCTAssertEqual(okta.body?["Resources"]?.arrayValue?.first?["meta"]?["resourceType"], "User")

        let walked = try pages(agent, "x=1", count: 300, cursor: true, total: 2_000)
        XCTAssertEqual(walked, ids.sorted(), "every user once, in id order")
        guard walked.count == 2_000 else { return XCTFail("the walk is incomplete") }
        let indexed = try pages(agent, "x=1", count: 300, cursor: false, total: 2_000)
        XCTAssertEqual(indexed, walked, "startIndex pages agree with the cursor walk")

        let deep = try agent.call("GET", "/Users?startIndex=1991&count=100&attributes=userName")
        XCTAssertEqual(deep.body?["Resources"]?.arrayValue?.compactMap { $0["id"]?.stringValue }, Array(walked[1990...]))
        XCTAssertEqual(try agent.call("GET", "/Users?startIndex=2001").body?["itemsPerPage"], 0)

        // previousCursor goes back a page; a deleted anchor still has its place.
        let first = try agent.call("GET", "/Users?count=50&cursor=")
        let second = try agent.call("GET", "/Users?count=50&cursor=\(first.body?["nextCursor"]?.stringValue ?? "")")
        XCTAssertEqual(second.body?["Resources"]?.arrayValue?.first?["id"]?.stringValue, walked[50])
        let back = try agent.call("GET", "/Users?count=50&cursor=\(second.body?["previousCursor"]?.stringValue ?? "")")
        XCTAssertEqual(back.body?["Resources"]?.arrayValue?.compactMap { $0["id"]?.stringValue }, Array(walked[0..<50]))
        XCTAssertNil(first.body?["previousCursor"])
        XCTAssertEqual(try agent.call("DELETE", "/Users/\(walked[49])").status, 204)
        let resumed = try agent.call("GET", "/Users?count=50&cursor=\(first.body?["nextCursor"]?.stringValue ?? "")")
        XCTAssertEqual(resumed.body?["Resources"]?.arrayValue?.first?["id"]?.stringValue, walked[50], "after a vanished anchor")
        XCTAssertEqual(resumed.body?["totalResults"], 1_999)
        XCTAssertEqual(agent.stop(), 0)
    }

    func testSortByUserNamePagesAboveTheBudget() throws {
        let agent = try AgentHarness(scanBudget: 500)
        // Mixed case: the order is case-insensitive.
        try fill(agent, 1_200, prefix: "") { _ in "" }
        let names = (0..<1_200).map { "\($0)" }
        for (order, expected) in [("ascending", names.sorted()), ("descending", names.sorted().reversed())] {
            let q = "sortBy=userName&sortOrder=\(order)"
            let byCursor = try pages(agent, q, count: 250, cursor: true, total: 1_200, attribute: "userName")
            XCTAssertEqual(byCursor, expected, "\(order), by cursor: sorted and complete")
            let byIndex = try pages(agent, q, count: 250, cursor: false, total: 1_200, attribute: "userName")
            XCTAssertEqual(byIndex, expected, "\(order), by startIndex")
        }
        XCTAssertEqual(agent.stop(), 0)

        let mixed = try AgentHarness(scanBudget: 500)
        try fill(mixed, 600, prefix: "b")
        try fill(mixed, 600, prefix: "A")
        let sorted = try pages(mixed, "sortBy=userName", count: 500, cursor: true, total: 1_200, attribute: "userName")
        XCTAssertEqual(sorted, sorted.sorted { $0.lowercased() < $1.lowercased() })
        XCTAssertEqual(sorted.first?.first, "A", "case-insensitive: A before b")
        XCTAssertEqual(Set(sorted).count, 1_200)
        // Other attributes sort within the budget, as before.
        let other = try mixed.call("GET", "/Users?sortBy=displayName")
        XCTAssertEqual(other.status, 400)
        XCTAssertEqual(other.body?["scimType"], "tooMany")
        XCTAssertEqual(mixed.stop(), 0)
    }

    func testAScannedFilterPagesThroughWithCursors() throws {
        let agent = try AgentHarness(scanBudget: 500)
        let ids = try fill(agent, 2_000) { #","title":"\#($0 % 3 == 0 ? "Lead" : "Guide")""# }
        let expected = Set(ids.enumerated().filter { $0.offset % 3 == 0 }.map(\.element))
        // title is not indexed: the filter scans.
        let filter = "filter=title%20eq%20%22lead%22"

        var seen: [String] = [], next = "", requests = 0, lastTotal = 0
        while requests < 100 {
            requests += 1
            let page = try agent.call("GET", "/Users?\(filter)&count=100&attributes=title&cursor=\(next)")
            XCTAssertEqual(page.status, 200, page.raw)
            let got = page.body?["Resources"]?.arrayValue ?? []
            XCTAssertLessThanOrEqual(got.count, 100)
            for r in got { XCTAssertEqual(r["title"], "Lead") }
            seen += got.compactMap { $0["id"]?.stringValue }
            let total = page.body?["totalResults"]?.numberValue?.integer ?? -1
            XCTAssertEqual(Int(total), seen.count, "totalResults: the matches so far")
            XCTAssertGreaterThanOrEqual(Int(total), lastTotal)
            lastTotal = Int(total)
            guard let n = page.body?["nextCursor"]?.stringValue else { break }
            next = n
        }
        XCTAssertEqual(seen.count, expected.count, "every match exactly once")
        XCTAssertEqual(Set(seen), expected)
        XCTAssertEqual(lastTotal, 667, "exact on the last page")
        XCTAssertGreaterThanOrEqual(requests, 4, "no request scanned more than the budget")

        // A filter that matches nothing walks to the end with empty pages.
        var empty = 0, cursor = ""
        for _ in 0..<20 {
            let page = try agent.call("GET", "/Users?filter=title%20eq%20%22nobody%22&count=10&cursor=\(cursor)")
            XCTAssertEqual(page.status, 200)
            XCTAssertEqual(page.body?["itemsPerPage"], 0)
            empty += 1
            guard let n = page.body?["nextCursor"]?.stringValue else { break }
            cursor = n
        }
        XCTAssertEqual(empty, 4, "2,000 users, 500 a request")

        // Neither startIndex nor cursor: a cursor page (RFC 9865 §2.4).
        let plain = try agent.call("GET", "/Users?\(filter)&count=50")
        XCTAssertEqual(plain.status, 200)
        XCTAssertEqual(plain.body?["itemsPerPage"], 50)
        XCTAssertNotNil(plain.body?["nextCursor"])
        // .search pages the same way.
        let search = try agent.call(
            "POST", "/Users/.search",
            #"{"schemas":["urn:ietf:params:scim:api:messages:2.0:SearchRequest"],"filter":"title eq \"Lead\"","cursor":"","count":30}"#)
        XCTAssertEqual(search.body?["itemsPerPage"], 30)
        XCTAssertNotNil(search.body?["nextCursor"])
        // startIndex asks for a position in a scan: refused, with the way out.
        let indexed = try agent.call("GET", "/Users?\(filter)&startIndex=1&count=100")
        XCTAssertEqual(indexed.status, 400)
        XCTAssertEqual(indexed.body?["scimType"], "tooMany")
        XCTAssertTrue(indexed.body?["detail"]?.stringValue?.contains("cursor") ?? false)
        XCTAssertEqual(agent.stop(), 0)
    }

    func testEqualityOnActiveUserTypeAndEmailsUsesTheAttributeIndex() throws {
        let agent = try AgentHarness(scanBudget: 500)
        let ids = try fill(agent, 2_000) { k in
            #","active":\#(k % 3 == 0),"userType":"\#(k % 2 == 0 ? "Employee" : "Contractor")","emails":[{"value":"U\#(k)@Example.com","type":"work"}]"#
        }
        let active = ids.enumerated().filter { $0.offset % 3 == 0 }.map(\.element).sorted()
        let byCursor = try pages(agent, "filter=active%20eq%20true", count: 100, cursor: true, total: active.count)
        XCTAssertEqual(byCursor, active, "every active user once, in id order, exact totalResults on every page")
        let byIndex = try pages(agent, "filter=active%20eq%20true", count: 100, cursor: false, total: active.count)
        XCTAssertEqual(byIndex, active, "startIndex pages of an indexed filter")
        XCTAssertEqual(try agent.call("GET", "/Users?filter=active%20eq%20false&count=0").body?["totalResults"], 1_333)
        XCTAssertEqual(
            try agent.call("GET", "/Users?filter=userType%20eq%20%22employee%22&count=0").body?["totalResults"], 1_000,
            "userType is not caseExact")
        let email = try agent.call("GET", "/Users?filter=emails.value%20eq%20%22u7%40example.COM%22")
        XCTAssertEqual(email.status, 200)
        XCTAssertEqual(email.body?["Resources"]?.arrayValue?.first?["id"]?.stringValue, ids[7])
        XCTAssertEqual(try agent.call("GET", "/Users?filter=emails%20eq%20%22U8%40example.com%22").body?["totalResults"], 1)

        // Writes keep it: a deactivation, a delete, a replace.
        let patch =
            #"{"schemas":["urn:ietf:params:scim:api:messages:2.0:PatchOp"],"Operations":[{"op":"replace","path":"active","value":false}]}"#
        XCTAssertEqual(try agent.call("PATCH", "/Users/\(ids[0])", patch).status, 200)
        XCTAssertEqual(try agent.call("DELETE", "/Users/\(ids[3])").status, 204)
        XCTAssertEqual(try agent.call("PUT", "/Users/\(ids[7])", userBody("u7", extra: #","active":true"#)).status, 200)
        XCTAssertEqual(try agent.call("GET", "/Users?filter=active%20eq%20true&count=0").body?["totalResults"], .int(active.count - 1))
        XCTAssertEqual(try agent.call("GET", "/Users?filter=emails.value%20eq%20%22u7%40example.com%22").body?["totalResults"], 0)
        let walk = try pages(agent, "filter=active%20eq%20true", count: 500, cursor: true, total: active.count - 1)
        XCTAssertEqual(Set(walk), Set(active).subtracting([ids[0], ids[3]]).union([ids[7]]))
        XCTAssertEqual(agent.stop(), 0)

        // A store without the index (made before it) gets it at open.
        do {
            let store = try agent.openStore()
            let meta = try store.environment.openDatabase("meta"), index = try store.environment.openDatabase("attributes")
            try store.environment.write { txn in
                _ = try txn.delete(meta, Array("attributeIndex".utf8))
                try txn.clear(index)
            }
        }
        let path = agent.dir.file("data")
        let again = try AgentHarness(scanBudget: 500) { $0.dataDirectory = path }
        XCTAssertEqual(try again.call("GET", "/Users?filter=active%20eq%20true&count=0").body?["totalResults"], .int(active.count - 1))
        XCTAssertEqual(
            try again.call("GET", "/Users?filter=userType%20eq%20%22Contractor%22&count=0").body?["totalResults"], 998,
            "u3 deleted, u7 replaced without userType")
        XCTAssertEqual(again.stop(), 0)
    }
}
