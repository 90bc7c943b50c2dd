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
            let firstID = String(format: "%08x-0000-7000-8000-%012x", 0, 0)
            func time(_ label: String, _ parameters: [String: String]) throws {
                let q = try ListQuery(parameters: parameters, registry: registry, type: users)
                // The first run walks without checkpoints of the position
                // index; the next ones find them (no write in between).
                var got = 0
                var times: [Double] = []
                for _ in 0..<5 {
                    let start = DispatchTime.now().uptimeNanoseconds
                    got = try store.list(users, q, scanBudget: 500).items.count
                    times.append(Double(DispatchTime.now().uptimeNanoseconds - start) / 1e6)
                }
                let warm = times.dropFirst().reduce(0, +) / Double(times.count - 1)
                print(
                    "lists n=\(n) \(label): first \(String(format: "%.2f", times[0])) ms, then \(String(format: "%.2f", warm)) ms (\(got) resources)"
                )
            }
            /// Drops the checkpoints (a write changes the generation).
            func write() throws {
                try store.environment.write { txn in
                    var ctx = WriteContext(newID: "", now: "2026-01-01T00:00:00Z", epochSeconds: 0, eventID: "e", traceID: "t")
                    ctx.recordEvents = false
                    _ = try store.apply(
                        .replace(
                            users, id: firstID,
                            body: .object(["schemas": [.string("urn:ietf:params:scim:schemas:core:2.0:User")], "userName": "user0"])), ctx,
                        profile: .lenient, in: txn)
                }
            }
            try time("count=0", ["count": "0"])
            try time("startIndex=1 count=100", ["startIndex": "1", "count": "100"])
            try write()
            try time("startIndex=n/2 count=100", ["startIndex": "\(n / 2)", "count": "100"])
            try write()
            try time("startIndex=n-99 count=100", ["startIndex": "\(n - 99)", "count": "100"])
            try time("cursor first page count=100", ["cursor": "", "count": "100"])
            try write()
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

    /// A deep startIndex walks from the nearest checkpoint of the position
    /// index; a write drops the checkpoints, and the pages stay right.
    func testStartIndexWalksFromTheNearestCheckpoint() throws {
        let registry = SchemaRegistry.standard, users = registry.resourceType("User")!
        let dir = TempDirectory("edge-lists")
        defer { dir.remove() }
        let store = try AgentStore(path: dir.file("data"), registry: registry)
        func create(_ i: Int) throws -> String {
            var ctx = WriteContext(
                newID: String(format: "%08x-0000-7000-8000-%012x", i, i), now: "2026-01-01T00:00:00Z", epochSeconds: 0,
                eventID: "e", traceID: "t")
            ctx.recordEvents = false
            let user: JSONObject = ["schemas": [.string("urn:ietf:params:scim:schemas:core:2.0:User")], "userName": .string("u\(i)")]
            return try store.environment.write { txn in
                try store.apply(.create(users, validated: user), ctx, profile: .lenient, in: txn)!["id"]!.stringValue!
            }
        }
        var ids: [String] = []
        for i in 0..<3_000 { ids.append(try create(i)) }
        func page(_ start: Int) throws -> [String] {
            try store.list(
                users, try ListQuery(parameters: ["startIndex": "\(start)", "count": "10"], registry: registry, type: users),
                scanBudget: 500
            ).items.compactMap { $0["id"]?.stringValue }
        }
        XCTAssertEqual(try page(2_001), Array(ids[2_000..<2_010]))
        XCTAssertEqual(store.lastStartIndexSteps, 2_001, "the first deep walk steps from the first key")
        XCTAssertEqual(try page(2_101), Array(ids[2_100..<2_110]))
        XCTAssertLessThanOrEqual(store.lastStartIndexSteps, 257, "the next starts at a checkpoint")
        XCTAssertEqual(try page(1_001), Array(ids[1_000..<1_010]))
        XCTAssertLessThanOrEqual(store.lastStartIndexSteps, 257, "any rank below the deepest walk")

        // A delete shifts every rank: the checkpoints are dropped.
        try store.environment.write { txn in
            var ctx = WriteContext(newID: "", now: "2026-01-01T00:00:00Z", epochSeconds: 0, eventID: "e", traceID: "t")
            ctx.recordEvents = false
            _ = try store.apply(.delete(users, id: ids[0]), ctx, profile: .lenient, in: txn)
        }
        XCTAssertEqual(try page(2_101), Array(ids[2_101..<2_111]), "one fewer before it")
        XCTAssertEqual(store.lastStartIndexSteps, 2_101)
        // A create (at the end: ids are ordered) changes the generation too.
        ids.append(try create(3_000))
        XCTAssertEqual(try page(2_101), Array(ids[2_101..<2_111]))
        XCTAssertEqual(store.lastStartIndexSteps, 2_101)
        XCTAssertEqual(try page(2_991), Array(ids[2_991...]))
        XCTAssertEqual(store.lastStartIndexSteps, 2_990 - 2_109 + 1, "from the last key of the deepest page (rank 2,109)")
        // The next page of an import starts where the last one ended.
        XCTAssertEqual(try page(2), Array(ids[2..<12]))
        XCTAssertEqual(try page(12), Array(ids[12..<22]))
        XCTAssertEqual(store.lastStartIndexSteps, 2)
    }
}
