/// Latencies of the last `windowSeconds` seconds, for quantiles in /metrics:
/// one `LatencyHistogram` per second in a ring, so recording is O(1) and a
/// scrape merges a fixed number of histograms, whatever the traffic (memory
/// is fixed too: `windowSeconds + 1` histograms). Quantiles carry the
/// histogram's relative error (at most 1.6 %, never under the true value).
public struct RecentLatencies: Sendable {
    public let windowSeconds: Int64
    private var slots: [LatencyHistogram]
    /// The second each slot holds (Unix time); a slot is reset when reused.
    private var slotSecond: [Int64]

    public init(windowSeconds: Int64 = 10) {
        precondition(windowSeconds > 0)
        self.windowSeconds = windowSeconds
        slots = Array(repeating: LatencyHistogram(), count: Int(windowSeconds) + 1)
        slotSecond = Array(repeating: .min, count: Int(windowSeconds) + 1)
    }

    /// Records `micros` microseconds, observed at `atMillis` (Unix ms).
    public mutating func record(_ micros: UInt64, atMillis: Int64) {
        let second = atMillis / 1000
        let k = Int(second % Int64(slots.count))
        if slotSecond[k] != second {
            guard second > slotSecond[k] else { return }  // older than the window: dropped
            slots[k] = LatencyHistogram()
            slotSecond[k] = second
        }
        slots[k].record(micros)
    }

    /// Every sample of the last `windowSeconds` whole seconds and of the
    /// current one (so 10 to 11 s for a 10 s window: never less than asked),
    /// in one histogram.
    public func window(nowMillis: Int64) -> LatencyHistogram {
        let current = nowMillis / 1000
        var merged = LatencyHistogram()
        for k in slots.indices where slotSecond[k] >= current - windowSeconds && slotSecond[k] <= current {
            merged.merge(slots[k])
        }
        return merged
    }
}
