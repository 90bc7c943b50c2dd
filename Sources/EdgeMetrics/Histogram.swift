/// An HDR-style latency histogram: log-linear buckets, 64 per power of two
/// above 128 µs (values are reported at their bucket's upper bound: at most
/// 1/64, 1.6 %, above the true value), exact below, from 1 µs to about
/// 70 min, in a fixed array of 3,456 counters (27 KiB) whatever the number
/// of samples.
public struct LatencyHistogram: Sendable, Equatable {
    static let subBits = 7
    static let subCount = 1 << subBits
    static let magnitudes = 26
    private(set) var counts = [UInt64](repeating: 0, count: (magnitudes + 1) * subCount)
    public private(set) var count: UInt64 = 0
    public private(set) var max: UInt64 = 0
    public private(set) var min: UInt64 = .max
    public private(set) var sum: Double = 0

    public init() {}

    static let largest: UInt64 = (1 << UInt64(magnitudes + subBits)) - 1

    static func index(_ value: UInt64) -> Int {
        let v = Swift.min(value, largest)
        if v < UInt64(subCount) { return Int(v) }
        let magnitude = (63 - v.leadingZeroBitCount) - subBits + 1
        let sub = Int(v >> UInt64(magnitude)) & (subCount - 1)
        return magnitude * subCount + sub  // sub is in [subCount/2, subCount) for magnitude ≥ 1
    }

    /// The largest value that falls in bucket `i` (values are reported at
    /// their bucket's upper bound, never under-stated).
    static func upperBound(_ i: Int) -> UInt64 {
        let m = i / subCount, sub = UInt64(i % subCount)
        if m == 0 { return sub }
        return ((sub + 1) << UInt64(m)) - 1
    }

    /// Records `micros` microseconds.
    public mutating func record(_ micros: UInt64) {
        counts[Self.index(micros)] += 1
        count += 1
        sum += Double(micros)
        if micros > max { max = micros }
        if micros < min { min = micros }
    }

    public mutating func merge(_ other: LatencyHistogram) {
        for i in counts.indices { counts[i] += other.counts[i] }
        count += other.count
        sum += other.sum
        max = Swift.max(max, other.max)
        min = Swift.min(min, other.min)
    }

    /// The value at quantile `q` (0…1), in microseconds; 0 when empty.
    public func quantile(_ q: Double) -> UInt64 {
        guard count > 0 else { return 0 }
        if q >= 1 { return max }
        let rank = Swift.max(1, UInt64((q * Double(count)).rounded(.up)))
        var seen: UInt64 = 0
        for (i, c) in counts.enumerated() where c > 0 {
            seen += c
            if seen >= rank { return Swift.min(Self.upperBound(i), max) }
        }
        return max
    }

    public var mean: Double { count == 0 ? 0 : sum / Double(count) }
}
