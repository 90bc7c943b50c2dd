import EdgeTestSupport
import XCTest

@testable import EdgeDelivery

/// The delivery policies alone, on a simulated clock (milliseconds passed
/// in): nothing here waits.
final class PolicyTests: XCTestCase {
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

    func testRetryAfterIsHonouredInSecondsWithADefaultAndACap() {
        XCTAssertEqual(RetrySchedule.retryAfter("3"), 3)
        XCTAssertEqual(RetrySchedule.retryAfter(" 12\t"), 12, "spaces around delta-seconds")
        XCTAssertNil(RetrySchedule.retryAfter("Wed, 21 Oct 2015 07:28:00 GMT"), "an HTTP date is not understood: the default")
        XCTAssertNil(RetrySchedule.retryAfter("-1"))
        XCTAssertNil(RetrySchedule.retryAfter(nil))
        XCTAssertEqual(RetrySchedule.throttlePause(retryAfterSeconds: nil), 1000, "no Retry-After: a second")
        XCTAssertEqual(RetrySchedule.throttlePause(retryAfterSeconds: 0), 1000, "0 is a second too: not a loop")
        XCTAssertEqual(RetrySchedule.throttlePause(retryAfterSeconds: 7), 7000)
        XCTAssertEqual(RetrySchedule.throttlePause(retryAfterSeconds: 86_400), 300_000, "a target cannot park the queue for a day")
    }

    func testTheCredentialsPauseProbesAfterOneTwoFourSecondsUpToAMinuteAndAtOnceAfterAReload() {
        var p = CredentialsPause(reason: "401", since: 1_700_000_000_000)
        var now: UInt64 = 50_000
        p.refused("401", now: now)
        XCTAssertFalse(p.mayProbe(now: now + 999))
        XCTAssertTrue(p.mayProbe(now: now + 1000), "the first probe after a second")
        p.refused("401 to a request in flight", now: now + 10)
        XCTAssertEqual(p.probeAt, now + 1000, "requests in flight when it paused do not put the probe off")
        now += 1000
        p.refused("401 again", now: now)
        XCTAssertEqual(p.probeAt, now + 2000, "the probe was refused: then two")
        XCTAssertEqual(p.reason, "401 again")
        for _ in 0..<10 {
            now = p.probeAt
            p.refused("401", now: now)
        }
        XCTAssertEqual(p.probeAt, now + 60_000, "at most a minute apart")
        p.probeNow()
        XCTAssertTrue(p.mayProbe(now: now), "SIGHUP re-read the credentials: probe now")
        p.refused("still 401", now: now)
        XCTAssertEqual(p.probeAt, now + 1000, "and the schedule starts again")
        XCTAssertEqual(p.since, 1_700_000_000_000, "paused since the first refusal")
    }

    func testTheDeletionGateTripsHoldsAndIsReleasedByTheOperator() {
        var g = DeletionGate(maxDeletes: 2, windowSeconds: 60)
        let unix: Int64 = 1_700_000_000_000
        XCTAssertEqual(g.admit(queuedAt: unix, now: 0, unixNow: unix), .pass)
        XCTAssertEqual(g.admit(queuedAt: unix, now: 10, unixNow: unix + 10), .pass)
        XCTAssertEqual(g.admit(queuedAt: unix, now: 20, unixNow: unix + 20), .tripped(since: unix + 20), "the third within the window")
        XCTAssertTrue(g.paused)
        XCTAssertEqual(g.admit(queuedAt: unix, now: 120_000, unixNow: unix + 120_000), .held, "held while paused, window or not")
        // Another process (the CLI) confirmed: what was queued before passes, the count starts again.
        XCTAssertEqual(g.refresh(pausedSince: nil, confirmedAt: unix + 200_000, rejectedAt: 0), .confirmed)
        XCTAssertFalse(g.paused)
        XCTAssertEqual(g.admit(queuedAt: unix + 150_000, now: 120_001, unixNow: unix + 200_001), .pass, "queued before the confirmation")
        XCTAssertEqual(g.window.times.count, 0, "and not counted")
        XCTAssertEqual(g.admit(queuedAt: unix + 200_002, now: 120_002, unixNow: unix + 200_002), .pass)
        XCTAssertEqual(g.admit(queuedAt: unix + 200_003, now: 120_003, unixNow: unix + 200_003), .pass)
        XCTAssertEqual(g.admit(queuedAt: unix + 200_004, now: 120_004, unixNow: unix + 200_004), .tripped(since: unix + 200_004))
        // Rejected instead: the confirmation time stays.
        XCTAssertEqual(g.refresh(pausedSince: nil, confirmedAt: unix + 200_000, rejectedAt: unix + 300_000), .rejected)
        XCTAssertEqual(g.rejectedAt, unix + 300_000)
        XCTAssertNil(g.refresh(pausedSince: nil, confirmedAt: unix + 200_000, rejectedAt: unix + 300_000), "nothing new")
        var none = DeletionGate(maxDeletes: 0, windowSeconds: 1)
        XCTAssertEqual(none.admit(queuedAt: 1, now: 0, unixNow: 5), .tripped(since: 5), "maxDeletes 0: the first removal trips it")
    }

    func testTheSeededJitterIsReproducibleAndTheSystemOneIsNot() {
        var a = DeliveryRandom(seed: 9), b = DeliveryRandom(seed: 9)
        XCTAssertEqual((0..<8).map { RetrySchedule.backoff($0, using: &a) }, (0..<8).map { RetrySchedule.backoff($0, using: &b) })
        var s = DeliveryRandom.system
        XCTAssertGreaterThan(Set((0..<20).map { _ in s.next() }).count, 15)
    }
}
