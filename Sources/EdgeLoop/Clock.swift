import Glibc

/// The clocks every module reads, in one place. Monotonic time measures
/// durations and deadlines (it never jumps); Unix time stamps what is
/// stored, logged or compared with certificates and other hosts.

/// Nanoseconds of `CLOCK_MONOTONIC`.
public func monotonicNanoseconds() -> UInt64 {
    var ts = timespec()
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return UInt64(ts.tv_sec) * 1_000_000_000 + UInt64(ts.tv_nsec)
}

/// Milliseconds of `CLOCK_MONOTONIC`.
public func monotonicMilliseconds() -> UInt64 { monotonicNanoseconds() / 1_000_000 }

/// Microseconds of `CLOCK_MONOTONIC`.
public func monotonicMicroseconds() -> UInt64 { monotonicNanoseconds() / 1000 }

/// `CLOCK_REALTIME` as seconds and nanoseconds.
public func unixTimespec() -> timespec {
    var ts = timespec()
    clock_gettime(CLOCK_REALTIME, &ts)
    return ts
}

/// Whole seconds since the Unix epoch.
public func unixSeconds() -> Int64 { Int64(unixTimespec().tv_sec) }

/// Milliseconds since the Unix epoch.
public func unixMilliseconds() -> Int64 {
    let ts = unixTimespec()
    return Int64(ts.tv_sec) * 1000 + Int64(ts.tv_nsec / 1_000_000)
}

/// Microseconds since the Unix epoch.
public func unixMicroseconds() -> Int64 {
    let ts = unixTimespec()
    return Int64(ts.tv_sec) * 1_000_000 + Int64(ts.tv_nsec / 1000)
}
