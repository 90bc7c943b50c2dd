import EdgeAgent
import EdgeStore
import EdgeTestSupport
import Foundation
import SCIM
import XCTest

/// Measurements of the list forms at 100k and 1M users (docs/scim.md).
final class ListCostTests: XCTestCase {
    /// What a deep startIndex costs: `SCIM_EDGE_MEASURE_LISTS=100000,1000000`
    /// fills stores of those sizes (straight into LMDB, one transaction per
    /// 50,000) and times pages at the start, the middle and the end, by index
    /// and by cursor. Skipped otherwise (docs/scim.md has the figures).
    func testMeasureListCosts() throws {
        guard let sizes = ProcessInfo.processInfo.environment["SCIM_EDGE_MEASURE_LISTS"] else {
            throw XCTSkip("set SCIM_EDGE_MEASURE_LISTS=100000,1000000 to measure")
        }
        let registry = SchemaRegistry.standard, users = registry.resourceType("User")!
        for n in sizes.split(separator: ",").compactMap({ Int($0) }) {
            let dir = TempDirectory("edge-lists")
            defer { dir.remove() }
            let store = try AgentStore(path: dir.file("data"), registry: registry) { $0.mapSize = 8 << 30 }
            var k = 0
            while k < n {
                let upper = min(n, k + 50_000)
                try store.environment.write { txn in
                    for i in k..<upper {
                        var ctx = WriteContext(
                            newID: String(format: "%08x-0000-7000-8000-%012x", i, i), now: "2026-01-01T00:00:00Z", epochSeconds: 0,
                            eventID: "e", traceID: "t")
                        ctx.recordEvents = false
                        let user: JSONObject = [
                            "schemas": [.string("urn:ietf:params:scim:schemas:core:2.0:User")], "userName": .string("user\(i)"),
                            "displayName": .string("User Number \(i)"), "active": .bool(i % 2 == 0),
                            "emails": [["value": .string("user\(i)@example.com"), "type": "work", "primary": .bool(true)]],
                        ]
                        _ = try store.apply(.create(users, validated: user), ctx, profile: .lenient, in: txn)
                    }
                }
                k = upper
            }
            func time(_ label: String, _ parameters: [String: String]) throws {
                let q = try ListQuery(parameters: parameters, registry: registry, type: users)
                let runs = 5
                let start = DispatchTime.now().uptimeNanoseconds
                var got = 0
                for _ in 0..<runs { got = try store.list(users, q, scanBudget: 500).items.count }
                let ms = Double(DispatchTime.now().uptimeNanoseconds - start) / 1e6 / Double(runs)
                print("lists n=\(n) \(label): \(String(format: "%.2f", ms)) ms (\(got) resources)")
            }
            try time("count=0", ["count": "0"])
            try time("startIndex=1 count=100", ["startIndex": "1", "count": "100"])
            try time("startIndex=n/2 count=100", ["startIndex": "\(n / 2)", "count": "100"])
            try time("startIndex=n-99 count=100", ["startIndex": "\(n - 99)", "count": "100"])
            try time("cursor first page count=100", ["cursor": "", "count": "100"])
            try time("sortBy=userName startIndex=n/2 count=100", ["sortBy": "userName", "startIndex": "\(n / 2)", "count": "100"])
            let middle = try store.list(
                users, try ListQuery(parameters: ["startIndex": "\(n / 2)", "count": "1"], registry: registry, type: users),
                scanBudget: 500)
            let anchor = try XCTUnwrap(middle.items.first?["id"]?.stringValue)
            let cursor = try ListQuery(parameters: ["cursor": ""], registry: registry, type: users).makeCursor(
                after: true, offset: 0, anchor: Array(anchor.utf8))
            try time("cursor mid page count=100", ["cursor": cursor, "count": "100"])
            try time("filter=active eq true (indexed) count=0", ["filter": "active eq true", "count": "0"])
            try time("filter=active eq true (indexed) startIndex=1 count=100", ["filter": "active eq true", "count": "100"])
            try time("filter=title eq x (scan, budget 500) cursor= count=100", ["filter": "title eq \"x\"", "cursor": "", "count": "100"])
            // The index built once at open for a store made before it.
            let meta = try store.environment.openDatabase("meta")
            try store.environment.write { txn in _ = try txn.delete(meta, Array("attributeIndex".utf8)) }
            let opened = DispatchTime.now().uptimeNanoseconds
            _ = try AgentStore(path: dir.file("data"), registry: registry) { $0.mapSize = 8 << 30 }
            print("lists n=\(n) open with the attribute index rebuilt: \((DispatchTime.now().uptimeNanoseconds - opened) / 1_000_000) ms")
        }
    }
}
