import Synchronization

/// Ordered key spaces of LMDB walked for lists (the agent's `AgentLists`,
/// the broker's `BrokerLists`): LMDB keeps keys in order but has no order
/// statistics, so a page starts at a seek (a cursor's anchor) or after a
/// key-only walk (a `startIndex`), shortened by a `PositionIndex`.

/// The keys of `db` that start with `prefix`, in key order.
public struct KeySpace {
    public let db: Database
    public let prefix: [UInt8]

    public init(db: Database, prefix: [UInt8]) {
        self.db = db
        self.prefix = prefix
    }

    /// Entries strictly beyond `anchor` (nil: from the first, or the last
    /// when `descending`) in the walk's direction: `skip` of them walked by
    /// key only (nothing copied but the key), then up to `limit` with their
    /// values. `limit` 0 returns at most one entry: whether any is beyond.
    public func entries(
        _ txn: borrowing ReadTransaction, beyond anchor: [UInt8]?, descending: Bool, skip: Int, limit: Int,
        positions: (index: PositionIndex, name: String, generation: [UInt8])? = nil
    ) throws -> [([UInt8], [UInt8])] {
        let end = prefixEnd()
        // [from, to) in key order; the smallest key above `a` is `a + [0]`.
        var from: [UInt8]? = prefix.isEmpty ? nil : prefix, to = end
        if let anchor {
            if descending { to = anchor } else { from = anchor + [0] }
        }
        if skip > 0 {
            // From the nearest checkpoint at or below the start (a key every
            // `PositionIndex.stride` ranks, valid for this generation), else
            // from the first key; checkpoints passed on the way are kept.
            var rank = 0
            if let positions, let (r, key) = positions.index.nearest(positions.name, positions.generation, atOrBelow: skip) {
                rank = r
                if descending { to = key + [0] } else { from = key }
            }
            var start: [UInt8]?
            var passed: [(Int, [UInt8])] = []
            var steps = 0
            try txn.scanKeys(db, from: from, to: to, reverse: descending) { key in
                steps += 1
                if rank % PositionIndex.stride == 0 { passed.append((rank, key)) }
                if rank == skip {
                    start = key
                    passed.append((rank, key))
                    return false
                }
                rank += 1
                return true
            }
            if let positions { positions.index.record(positions.name, positions.generation, passed, steps: steps) }
            guard let start else { return [] }
            if descending { to = start + [0] } else { from = start }
        }
        var out: [([UInt8], [UInt8])] = []
        try txn.scan(db, from: from, to: to, reverse: descending) { key, value in
            out.append((key, value))
            return out.count < max(limit, 1)
        }
        // The page's last key too: the next page of an import starts there.
        if skip > 0, limit > 0, let positions, let last = out.last {
            positions.index.record(positions.name, positions.generation, [(skip + out.count - 1, last.0)], steps: nil)
        }
        return limit == 0 ? Array(out.prefix(1)) : out
    }

    /// The first key past every key with `prefix` (nil: unbounded).
    public func prefixEnd() -> [UInt8]? {
        guard let last = prefix.last else { return nil }
        // Resource prefixes end in "/"; the next byte is "0".
        return prefix.dropLast() + [last + 1]
    }
}

/// A sparse position index: for each key space walked by `startIndex`, the
/// key at every `stride`-th rank, as last seen, with the store generation it
/// holds for. LMDB has no order statistics; with these a `startIndex` walks
/// at most `stride` keys past the nearest checkpoint instead of every key
/// from the first. Any create, replace, patch or delete changes the
/// generation and the checkpoints of the old one are dropped when next
/// looked up: they are rebuilt lazily by the next deep walk, which costs
/// what a walk without them costs. In memory only, a few bytes per `stride`
/// keys (about 200 KB for a million users), for at most `maxSpaces` spaces.
public final class PositionIndex: Sendable {
    public static let stride = 256
    static let maxSpaces = 64
    static let maxExtra = 100_000
    struct Space {
        var generation: [UInt8]
        var keys: [Int: [UInt8]]
    }
    public init() {}

    private let spaces = Mutex<[String: Space]>([:])
    /// Keys stepped over by the last `startIndex` walk (for tests and
    /// diagnostics).
    public let lastSteps = Atomic<Int>(0)

    /// The checkpoint with the highest rank at or below `rank`.
    public func nearest(_ name: String, _ generation: [UInt8], atOrBelow rank: Int) -> (Int, [UInt8])? {
        spaces.withLock { spaces -> (Int, [UInt8])? in
            guard let space = spaces[name], space.generation == generation else { return nil }
            var best: (Int, [UInt8])?
            for (r, key) in space.keys where r <= rank && r > (best?.0 ?? -1) { best = (r, key) }
            return best
        }
    }

    /// Keeps `points` (rank, key) for `generation`, dropping those of any
    /// other. Besides the stride's ranks, the start and the last key of each
    /// page are kept (the next page of a walk starts right after it), at most
    /// `maxExtra` of them.
    public func record(_ name: String, _ generation: [UInt8], _ points: [(Int, [UInt8])], steps: Int?) {
        if let steps { lastSteps.store(steps, ordering: .relaxed) }
        spaces.withLock { spaces in
            if spaces[name]?.generation != generation {
                if spaces.count >= Self.maxSpaces { spaces.removeAll() }
                spaces[name] = Space(generation: generation, keys: [:])
            }
            for (rank, key) in points { spaces[name]!.keys[rank] = key }
            if spaces[name]!.keys.count > Self.maxExtra {
                spaces[name]!.keys = spaces[name]!.keys.filter { $0.key % Self.stride == 0 }
            }
        }
    }
}
