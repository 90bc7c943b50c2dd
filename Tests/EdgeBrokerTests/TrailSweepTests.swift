import EdgeLoop
import EdgeTestSupport
import SCIM
import XCTest

@testable import EdgeBroker
@testable import EdgeDelivery

final class TrailSweepTests: XCTestCase {
    func testSweepDeletesOnlyHopsPastTheRetention() throws {
        let dir = TempDirectory("edge-trail")
        defer { dir.remove() }
        let store = try BrokerStore(path: dir.path)
        let now = unixMicroseconds()
        let old = now - trailRetentionMicroseconds - 3_600_000_000
        try store.environment.write { txn in
            for k in 0..<30 {
                try store.recordHop(brokerID: "gone-\(k)", trace: "trace-old-\(k)", ["hop": "target app"], txn, now: old)
            }
            try store.recordHop(brokerID: "kept", trace: "trace-new", ["hop": "target app"], txn, now: now)
        }
        XCTAssertEqual(try store.trail("gone-3").hops.count, 1)
        // Small steps: the cursors carry the walk across calls.
        var cursors: (trail: [UInt8]?, traces: [UInt8]?) = (nil, nil)
        var deleted = 0, steps = 0
        repeat {
            let r = try store.environment.write { txn in
                try store.sweepTrail(trailFrom: cursors.trail, tracesFrom: cursors.traces, limit: 7, now: now, txn)
            }
            cursors = (r.trail, r.traces)
            deleted += r.deleted
            steps += 1
        } while cursors.trail != nil || cursors.traces != nil
        XCTAssertGreaterThan(steps, 3, "walked in steps of 7 keys")
        XCTAssertEqual(deleted, 60, "30 hops and their 30 trace entries")
        XCTAssertTrue(try store.trail("gone-3").hops.isEmpty)
        XCTAssertTrue(try store.trail("trace-old-3").hops.isEmpty)
        XCTAssertEqual(try store.trail("kept").hops.count, 1, "recent hops stay")
        XCTAssertEqual(try store.trail("trace-new").hops.count, 1)
    }
}
