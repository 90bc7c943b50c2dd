import EdgeMetrics
import XCTest

final class RecentLatenciesTests: XCTestCase {
    /// The window holds the last 10 whole seconds and the current one;
    /// older seconds drop out, and a reused slot starts empty.
    func testWindowKeepsTheLastSecondsOnly() {
        var r = RecentLatencies(windowSeconds: 10)
        let t0: Int64 = 1_800_000_000_000
        for s in 0...10 { r.record(UInt64(1000 * (s + 1)), atMillis: t0 + Int64(s) * 1000 + 500) }
        var w = r.window(nowMillis: t0 + 10_999)
        XCTAssertEqual(w.count, 11, "seconds 0 to 10")
        XCTAssertEqual(w.min, 1000)
        XCTAssertEqual(w.max, 11_000)
        // Second 11: second 0 leaves the window, even before its slot is reused.
        w = r.window(nowMillis: t0 + 11_100)
        XCTAssertEqual(w.count, 10)
        XCTAssertEqual(w.min, 2000, "second 0 is out of the window")
        // Its slot is reused by second 11 and starts empty.
        r.record(50_000, atMillis: t0 + 11_200)
        w = r.window(nowMillis: t0 + 11_300)
        XCTAssertEqual(w.count, 11)
        XCTAssertEqual(w.min, 2000)
        XCTAssertEqual(w.max, 50_000)
        // Much later: nothing recent.
        XCTAssertEqual(r.window(nowMillis: t0 + 60_000).count, 0)
        // A sample older than what its slot holds now is dropped, not mixed in.
        r.record(7, atMillis: t0 + 100)
        XCTAssertEqual(r.window(nowMillis: t0 + 11_300).count, 11)
    }

    /// Quantiles over many samples stay within the histogram's error (at
    /// most 1/64 over the true value), however many samples there are.
    func testQuantilesOverManySamples() {
        var r = RecentLatencies(windowSeconds: 10)
        let t0: Int64 = 1_800_000_000_000
        for k in 0..<500_000 { r.record(UInt64(1 + k % 10_000), atMillis: t0 + Int64(k / 100_000) * 1000) }
        let w = r.window(nowMillis: t0 + 4_999)
        XCTAssertEqual(w.count, 500_000)
        let p50 = Double(w.quantile(0.5)), p99 = Double(w.quantile(0.99))
        XCTAssertGreaterThanOrEqual(p50, 5000)
        XCTAssertLessThanOrEqual(p50, 5000 * (1 + 1.0 / 64))
        XCTAssertGreaterThanOrEqual(p99, 9900)
        XCTAssertLessThanOrEqual(p99, 9900 * (1 + 1.0 / 64))
    }
}
