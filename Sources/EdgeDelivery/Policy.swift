/// The policies a target's delivery runs on, each a small value type that
/// takes "now" (monotonic milliseconds, and Unix milliseconds where a time
/// is stored) as a parameter, so that it is tested by advancing that
/// parameter, never by waiting (`PolicyTests`). `TargetWorker` holds one of
/// each and reads the clock it was given (`DeliveryClock`).

/// The clocks a worker reads: monotonic milliseconds for deadlines, Unix
/// milliseconds for what it stores. Tests pass a simulated one.
public struct DeliveryClock: Sendable {
    public var monotonic: @Sendable () -> UInt64
    public var unix: @Sendable () -> Int64

    public init(monotonic: @escaping @Sendable () -> UInt64, unix: @escaping @Sendable () -> Int64) {
        self.monotonic = monotonic
        self.unix = unix
    }
}

/// The target's request rate: a token bucket of one second's worth of
/// requests (at least one), refilled continuously.
public struct TokenBucket: Sendable {
    public let rate: Double
    public private(set) var tokens: Double
    private var last: UInt64

    public init(requestsPerSecond: Double, now: UInt64) {
        rate = max(0.1, requestsPerSecond)
        tokens = max(1, rate)
        last = now
    }

    /// Takes one token if there is one (after refilling to `now`).
    public mutating func take(now: UInt64) -> Bool {
        guard available(now: now) else { return false }
        tokens -= 1
        return true
    }

    /// Whether a token is there (after refilling to `now`), without taking it.
    public mutating func available(now: UInt64) -> Bool {
        tokens = min(max(1, rate), tokens + Double(now &- min(now, last)) * rate / 1000)
        last = max(last, now)
        return tokens >= 1
    }
}

/// The circuit breaker: closed until `threshold` failures in a row, then
/// open for a cooldown (1 s doubling per opening, at most 60 s), then half
/// open (one probe); a success closes it and forgets the openings.
public struct CircuitBreaker: Sendable {
    public enum State: String, Sendable { case closed, open, halfOpen = "half-open" }

    public let threshold: Int
    public private(set) var consecutiveFailures = 0
    public private(set) var openings = 0
    public private(set) var openUntil: UInt64 = 0

    public init(threshold: Int) { self.threshold = max(1, threshold) }

    public func state(now: UInt64) -> State {
        if consecutiveFailures < threshold { return .closed }
        return now < openUntil ? .open : .halfOpen
    }

    /// A failure (retryable, or no answer): the cooldown when it opens (or
    /// opens again after a failed probe). Failures while it is open (the
    /// requests in flight when it opened) are counted, not another opening.
    public mutating func failure(now: UInt64) -> UInt64? {
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
    public mutating func success() -> Bool {
        let wasOpen = consecutiveFailures >= threshold
        consecutiveFailures = 0
        openings = 0
        return wasOpen
    }
}

/// Adaptive concurrency (AIMD) between 1 and `maximum`: halved on a
/// failure or a throttle, grown by 1/limit per success.
public struct AdaptiveLimit: Sendable {
    public let maximum: Double
    public private(set) var value: Double

    public init(maximum: Int) {
        self.maximum = Double(max(1, maximum))
        value = self.maximum
    }

    public mutating func decrease() { value = max(1, value / 2) }
    public mutating func increase() { value = min(maximum, value + 1 / max(1, value)) }
}

/// When a change is tried again: after a failure, capped exponential
/// backoff with full jitter (0 … min(30 s, 250 ms · 2^attempt)); after a
/// throttle (429, 503), the target's `Retry-After` in seconds (1 s when it
/// gives none or 0, at most 5 minutes: a target cannot park the queue for good).
public enum RetrySchedule {
    public static let capMilliseconds: UInt64 = 30_000
    public static let maxRetryAfterSeconds: UInt64 = 300

    /// The delay before attempt `attempt + 1`, drawn from `generator`.
    public static func backoff(_ attempt: Int, using generator: inout some RandomNumberGenerator) -> UInt64 {
        let cap = min(capMilliseconds, 250 << UInt64(min(max(0, attempt), 7)))
        return UInt64.random(in: 0...cap, using: &generator)
    }

    /// `Retry-After` as delta-seconds (RFC 9110 §10.2.3); an HTTP date or
    /// anything else is not understood (nil: the default pause).
    public static func retryAfter(_ header: String?) -> UInt64? {
        header.flatMap { UInt64($0.trimmingSpacesAndTabs) }
    }

    /// A peer's `Retry-After` seconds as every caller follows them: at
    /// least 1 (a `0` had the caller send again at once, in a loop for as
    /// long as the peer answered so), at most `maximum` (a peer cannot park
    /// it for good, nor overflow a timer's milliseconds).
    public static func bounded(_ seconds: UInt64, atMost maximum: UInt64 = maxRetryAfterSeconds) -> UInt64 {
        min(max(1, seconds), maximum)
    }

    /// How long the target is left alone after a throttle, in milliseconds
    /// (`bounded`; 1 s without a `Retry-After`).
    public static func throttlePause(retryAfterSeconds: UInt64?) -> UInt64 {
        bounded(retryAfterSeconds ?? 1) * 1000
    }
}

/// Capped exponential backoff with full jitter (`RetrySchedule.backoff`),
/// from the system's generator.
public func backoff(_ attempt: Int) -> UInt64 {
    var g = SystemRandomNumberGenerator()
    return RetrySchedule.backoff(attempt, using: &g)
}

public func backoff(_ attempt: Int, using generator: inout some RandomNumberGenerator) -> UInt64 {
    RetrySchedule.backoff(attempt, using: &generator)
}

extension String {
    fileprivate var trimmingSpacesAndTabs: Substring {
        var s = Substring(self)
        while let c = s.first, c == " " || c == "\t" { s = s.dropFirst() }
        while let c = s.last, c == " " || c == "\t" { s = s.dropLast() }
        return s
    }
}

/// Refused credentials (401, a confirmed 403, a TLS failure): the target
/// is paused with its queue kept, and one change probes it after 1, 2, 4 …
/// 60 s; new credentials (SIGHUP) probe at once.
public struct CredentialsPause: Sendable {
    public private(set) var reason: String
    /// Unix ms of the first refusal.
    public let since: Int64
    /// Monotonic ms before which nothing is sent.
    public private(set) var probeAt: UInt64 = 0
    public private(set) var probes = 0

    public init(reason: String, since: Int64) {
        self.reason = reason
        self.since = since
    }

    /// Another refusal (the first one included) at `now`. Refusals of the
    /// requests that were in flight when it paused (before the next probe
    /// was due) are the same refusal: they do not put the probe off.
    public mutating func refused(_ why: String, now: UInt64) {
        reason = why
        guard now >= probeAt else { return }
        probes += 1
        probeAt = now + UInt64(min(60_000, 1000 << min(6, probes - 1)))
    }

    /// The credentials were re-read: probe with the next change.
    public mutating func probeNow() {
        probeAt = 0
        probes = 0
    }

    public func mayProbe(now: UInt64) -> Bool { now >= probeAt }
}

/// The deletion guard's count: removals within a sliding window; the one
/// that would make more than `maxDeletes` in `windowMilliseconds` trips it
/// (the worker then pauses removals until an operator confirms or rejects).
public struct RemovalWindow: Sendable {
    public let maxDeletes: Int
    public let windowMilliseconds: UInt64
    public private(set) var times: [UInt64] = []

    public init(maxDeletes: Int, windowSeconds: Int) {
        self.maxDeletes = max(0, maxDeletes)
        windowMilliseconds = UInt64(max(1, windowSeconds)) * 1000
    }

    /// Counts a removal at `now`; false (and not counted) when it would trip the guard.
    public mutating func admit(now: UInt64) -> Bool {
        times.removeAll { now &- $0 > windowMilliseconds && $0 <= now }
        guard times.count < maxDeletes else { return false }
        times.append(now)
        return true
    }

    /// After a release by the operator: the count starts again.
    public mutating func reset() { times.removeAll() }
}

/// The deletion guard as a worker applies it to each removal it is about
/// to send: removals queued up to the operator's last confirmation pass;
/// while paused every other removal is held; otherwise the window counts
/// it, and the one past `maxDeletes` trips the pause (which the worker
/// then stores). The stored state (`refresh`) is what the operator's
/// commands change.
public struct DeletionGate: Sendable {
    public enum Decision: Equatable, Sendable {
        case pass
        case held
        /// Tripped now: paused since this Unix ms time (to be stored).
        case tripped(since: Int64)
    }

    /// What the operator's commands did to a paused guard (`refresh`).
    public enum Release: Equatable, Sendable { case confirmed, rejected }

    public private(set) var window: RemovalWindow
    /// Unix ms since removals are paused; nil: not paused.
    public private(set) var pausedSince: Int64?
    /// Unix ms of the last `confirm-deletes`: removals queued up to it pass.
    public private(set) var confirmedAt: Int64 = 0
    /// Unix ms of the last `reject-deletes` (0: never).
    public private(set) var rejectedAt: Int64 = 0

    public init(maxDeletes: Int, windowSeconds: Int) {
        window = RemovalWindow(maxDeletes: maxDeletes, windowSeconds: windowSeconds)
    }

    public var paused: Bool { pausedSince != nil }

    /// A removal queued at `queuedAt` (Unix ms), about to be sent at `now`.
    public mutating func admit(queuedAt: Int64, now: UInt64, unixNow: Int64) -> Decision {
        if queuedAt <= confirmedAt { return .pass }
        if pausedSince != nil { return .held }
        guard window.admit(now: now) else {
            pausedSince = unixNow
            return .tripped(since: unixNow)
        }
        return .pass
    }

    /// The guard as stored now. A pause lifted by the operator restarts the
    /// count and says how (a confirmation moves `confirmedAt`).
    @discardableResult
    public mutating func refresh(pausedSince stored: Int64?, confirmedAt: Int64, rejectedAt: Int64) -> Release? {
        var release: Release?
        if pausedSince != nil && stored == nil {
            release = confirmedAt != self.confirmedAt ? .confirmed : .rejected
            window.reset()
        }
        pausedSince = stored
        self.confirmedAt = confirmedAt
        self.rejectedAt = rejectedAt
        return release
    }
}
