/// The policies a target's delivery runs on, each a small value type that
/// takes "now" (monotonic milliseconds) as a parameter, so that it is tested
/// by advancing that parameter, never by waiting (`DeliveryPolicyTests`).
/// `TargetWorker` holds one of each.

/// The target's request rate: a token bucket of one second's worth of
/// requests (at least one), refilled continuously.
struct TokenBucket: Sendable {
    let rate: Double
    private(set) var tokens: Double
    private var last: UInt64

    init(requestsPerSecond: Double, now: UInt64) {
        rate = max(0.1, requestsPerSecond)
        tokens = max(1, rate)
        last = now
    }

    /// Takes one token if there is one (after refilling to `now`).
    mutating func take(now: UInt64) -> Bool {
        guard available(now: now) else { return false }
        tokens -= 1
        return true
    }

    /// Whether a token is there (after refilling to `now`), without taking it.
    mutating func available(now: UInt64) -> Bool {
        tokens = min(max(1, rate), tokens + Double(now &- min(now, last)) * rate / 1000)
        last = max(last, now)
        return tokens >= 1
    }
}

/// The circuit breaker: closed until `threshold` failures in a row, then
/// open for a cooldown (1 s doubling per opening, at most 60 s), then half
/// open (one probe); a success closes it and forgets the openings.
struct CircuitBreaker: Sendable {
    enum State: String, Sendable { case closed, open, halfOpen = "half-open" }

    let threshold: Int
    private(set) var consecutiveFailures = 0
    private(set) var openings = 0
    private(set) var openUntil: UInt64 = 0

    init(threshold: Int) { self.threshold = max(1, threshold) }

    func state(now: UInt64) -> State {
        if consecutiveFailures < threshold { return .closed }
        return now < openUntil ? .open : .halfOpen
    }

    /// A failure (retryable, or no answer): the cooldown when it opens (or
    /// opens again after a failed probe). Failures while it is open (the
    /// requests in flight when it opened) are counted, not another opening.
    mutating func failure(now: UInt64) -> UInt64? {
        consecutiveFailures += 1
        guard consecutiveFailures >= threshold else { return nil }
        if consecutiveFailures > threshold && now < openUntil { return nil }
        openings += 1
        let cooldown = UInt64(min(60_000, 1000 << min(6, openings)))
        openUntil = now + cooldown
        return cooldown
    }

    /// An answer from the target: true when that closed an open (or half-open) breaker.
    @discardableResult
    mutating func success() -> Bool {
        let wasOpen = consecutiveFailures >= threshold
        consecutiveFailures = 0
        openings = 0
        return wasOpen
    }
}

/// Adaptive concurrency (AIMD) between 1 and `maximum`: halved on a
/// failure or a throttle, grown by 1/limit per success.
struct AdaptiveLimit: Sendable {
    let maximum: Double
    private(set) var value: Double

    init(maximum: Int) {
        self.maximum = Double(max(1, maximum))
        value = self.maximum
    }

    mutating func decrease() { value = max(1, value / 2) }
    mutating func increase() { value = min(maximum, value + 1 / max(1, value)) }
}

/// Capped exponential backoff with full jitter: 0 … min(30 s, 250 ms · 2^attempt).
func backoff(_ attempt: Int) -> UInt64 {
    var g = SystemRandomNumberGenerator()
    return backoff(attempt, using: &g)
}

func backoff(_ attempt: Int, using generator: inout some RandomNumberGenerator) -> UInt64 {
    let cap = min(30_000, 250 << UInt64(min(max(0, attempt), 7)))
    return UInt64.random(in: 0...UInt64(cap), using: &generator)
}

/// The deletion guard's count: removals within a sliding window; the one
/// that would make more than `maxDeletes` in `windowMilliseconds` trips it
/// (the worker then pauses removals until an operator confirms or rejects).
struct RemovalWindow: Sendable {
    let maxDeletes: Int
    let windowMilliseconds: UInt64
    private(set) var times: [UInt64] = []

    init(maxDeletes: Int, windowSeconds: Int) {
        self.maxDeletes = max(0, maxDeletes)
        windowMilliseconds = UInt64(max(1, windowSeconds)) * 1000
    }

    /// Counts a removal at `now`; false (and not counted) when it would trip the guard.
    mutating func admit(now: UInt64) -> Bool {
        times.removeAll { now &- $0 > windowMilliseconds && $0 <= now }
        guard times.count < maxDeletes else { return false }
        times.append(now)
        return true
    }

    /// After a release by the operator: the count starts again.
    mutating func reset() { times.removeAll() }
}
