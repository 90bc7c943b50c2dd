import EdgeTestSupport
import XCTest

@testable import EdgeBroker

/// The delivery policies alone, on a simulated clock (milliseconds passed
/// in): nothing here waits.
final class DeliveryPolicyTests: XCTestCase {
    func testTheBreakerOpensAtItsThresholdCoolsDownDoublingAndClosesOnAnAnswer() {
        var b = CircuitBreaker(threshold: 3)
        var now: UInt64 = 1_000_000
        XCTAssertEqual(b.state(now: now), .closed)
        XCTAssertNil(b.failure(now: now))
        XCTAssertNil(b.failure(now: now))
        XCTAssertEqual(b.state(now: now), .closed, "two failures: still closed")
        XCTAssertEqual(b.failure(now: now), 2000, "the third opens it: 1 s doubled for the first opening")
        XCTAssertEqual(b.state(now: now + 1999), .open)
        now += 2000
        XCTAssertEqual(b.state(now: now), .halfOpen, "after the cooldown: one probe")
        XCTAssertEqual(b.failure(now: now), 4000, "the probe failed: open again, twice as long")
        XCTAssertNil(b.failure(now: now + 1), "a request in flight failing while it is open: no new opening")
        XCTAssertEqual(b.openings, 2)
        var last: UInt64 = 4000
        for _ in 0..<10 {
            now += last  // each probe after the cooldown fails
            last = b.failure(now: now) ?? 0
        }
        XCTAssertEqual(last, 60_000, "capped at a minute")
        XCTAssertTrue(b.success(), "an answer closes it")
        XCTAssertEqual(b.state(now: now), .closed)
        XCTAssertNil(b.failure(now: now), "and the count starts again")
        XCTAssertFalse(b.success())
    }

    func testTheTokenBucketKeepsTheRateAndHoldsOneSecondAtMost() {
        let start: UInt64 = 5_000
        var bucket = TokenBucket(requestsPerSecond: 10, now: start)
        XCTAssertEqual((0..<20).filter { _ in bucket.take(now: start) }.count, 10, "a second's worth at once")
        XCTAssertFalse(bucket.take(now: start + 50), "half a token after 50 ms")
        XCTAssertTrue(bucket.take(now: start + 100), "one token per 100 ms at 10/s")
        XCTAssertEqual((0..<100).filter { _ in bucket.take(now: start + 100_000) }.count, 10, "idle for long: still one second's worth")
        var slow = TokenBucket(requestsPerSecond: 0.5, now: start)
        XCTAssertTrue(slow.take(now: start), "at least one request")
        XCTAssertFalse(slow.take(now: start + 1000))
        XCTAssertTrue(slow.take(now: start + 2000), "one every 2 s")
        XCTAssertFalse(slow.take(now: start + 1500), "a clock going back gives nothing")
    }

    func testTheConcurrencyLimitHalvesOnFailureAndGrowsBack() {
        var l = AdaptiveLimit(maximum: 8)
        XCTAssertEqual(l.value, 8)
        l.decrease()
        l.decrease()
        XCTAssertEqual(l.value, 2)
        for _ in 0..<5 { l.decrease() }
        XCTAssertEqual(l.value, 1, "never below one")
        var successes = 0
        while l.value < 8 {
            l.increase()
            successes += 1
        }
        XCTAssertEqual(l.value, 8, "never above the target's concurrency")
        XCTAssertGreaterThan(successes, 20, "additive increase: about 1/limit per success")
    }

    func testBackoffIsCappedAndJitteredFromAGenerator() {
        var g = SplitMix(seed: 7)
        for attempt in 0..<20 { XCTAssertLessThanOrEqual(backoff(attempt, using: &g), 30_000) }
        XCTAssertLessThanOrEqual((0..<200).map { _ in backoff(1, using: &g) }.max()!, 500)
        XCTAssertGreaterThan(Set((0..<50).map { _ in backoff(6, using: &g) }).count, 10, "jittered")
        var a = SplitMix(seed: 42), b = SplitMix(seed: 42)
        XCTAssertEqual((0..<10).map { backoff($0, using: &a) }, (0..<10).map { backoff($0, using: &b) }, "reproducible")
    }

    func testTheRemovalWindowTripsPastMaxDeletesAndForgetsOldRemovals() {
        var w = RemovalWindow(maxDeletes: 3, windowSeconds: 10)
        XCTAssertTrue(w.admit(now: 0))
        XCTAssertTrue(w.admit(now: 1_000))
        XCTAssertTrue(w.admit(now: 2_000))
        XCTAssertFalse(w.admit(now: 3_000), "a fourth within 10 s trips the guard")
        XCTAssertFalse(w.admit(now: 9_999))
        XCTAssertTrue(w.admit(now: 10_001), "the first has left the window")
        XCTAssertFalse(w.admit(now: 10_002))
        w.reset()
        XCTAssertTrue(w.admit(now: 10_003), "released by the operator: counted again from zero")
        var none = RemovalWindow(maxDeletes: 0, windowSeconds: 1)
        XCTAssertFalse(none.admit(now: 0), "maxDeletes 0: every removal is held")
    }
}
