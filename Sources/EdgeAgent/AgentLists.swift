import EdgeStore
import EdgeTLS
import SCIM
import Synchronization

/// Lists of one resource type at any store size (docs/scim.md, "Lists: what
/// each form costs"). LMDB keeps keys in order but has no order statistics
/// (no "k-th key"), so a list walks an ordered key space, `resources` (by id)
/// or `userNames` (by lowercased userName), from where the request starts:
/// a cursor's anchor is a seek, a `startIndex` is a walk over keys only to
/// it; then only the resources on the page are read and parsed.
extension AgentStore {
    /// The page `query` asks for. Forms that cannot be answered from a walk
    /// (a `sortBy` other than userName, a scanned filter with `startIndex` or
    /// `sortBy`) load at most `scanBudget` resources, then are `tooMany`.
    public func list(_ type: ResourceType, _ query: ListQuery, scanBudget: Int) throws -> ListPage<JSONObject> {
        try environment.read { txn in
            if let filter = query.filter, let hint = filter.indexLookup {
                // An index names the few candidates: read them, page in memory.
                let matches = try lookup(txn, type, hint.lookup).compactMap { id -> JSONObject? in
                    guard let r = try load(txn, type, id) else { return nil }
                    return try hint.exact || filter.matches(forMatching(txn, type, r, filter)) ? r : nil
                }
                return try query.paginate(matches) { $0 }
            }
            if let filter = query.filter, let matches = try groupsRequiringMembers(txn, type, filter) {
                // `members.value eq "X"`: the groups holding X, from the member → groups index.
                return try query.paginate(matches) { $0 }
            }
            if let filter = query.filter, query.sortBy == nil, let value = AttributeIndex.lookup(filter, type) {
                // `active eq true` and the like: the index's key range for
                // the value, in id order, paged like an unfiltered list.
                let space = KeySpace(db: attributes, prefix: value + [0])
                return try walk(txn, type, query, space, descending: false, salt: "\u{0}attributes", total: try valueCount(txn, value)) {
                    key, _ in
                    try load(txn, type, String(decoding: key.dropFirst(space.prefix.count), as: UTF8.self))
                }
            }
            let byUserName = type.id == "User" && AgentStore.sortsByUserName(query)
            if query.filter == nil && byUserName {
                // userName cursors anchor at a name, not an id: they must not be
                // taken for the id-anchored cursors of the same query before this walk.
                let space = KeySpace(db: userNames, prefix: [])
                return try walk(
                    txn, type, query, space, descending: query.sortOrder == .descending, salt: "\u{0}userNames", total: try count(txn, type)
                ) { _, value in try load(txn, type, String(decoding: value, as: UTF8.self)) }
            }
            if query.filter == nil && query.sortBy == nil {
                let space = KeySpace(db: resources, prefix: Array("\(type.id)/".utf8))
                return try walk(txn, type, query, space, descending: false, salt: "", total: try count(txn, type)) { _, value in
                    try JSONParser.parse(value, limits: .stored).objectValue
                }
            }
            if let filter = query.filter, query.sortBy == nil, query.count > 0 {
                if query.cursor != nil { return try scanPage(txn, type, query, filter, scanBudget: scanBudget) }
                if !query.namesStartIndex {
                    // Neither startIndex nor cursor: the exact answer when the
                    // scan fits the budget, else a cursor page (RFC 9865 §2.4
                    // lets a provider page by cursor when none was asked for).
                    do {
                        let all = try loadAll(txn, type, filter: filter, scanBudget: scanBudget, cursorHelps: true)
                        return try query.paginate(all) { $0 }
                    } catch let e as SCIMError where e.scimType == .tooMany {
                        return try scanPage(txn, type, query, filter, scanBudget: scanBudget)
                    }
                }
            }
            let all = try loadAll(txn, type, filter: query.filter, scanBudget: scanBudget, cursorHelps: query.sortBy == nil)
            return try query.paginate(all) { $0 }
        }
    }

    /// Whether the request sorts by the core `userName` (the `userNames`
    /// index's order: lowercased, byte order, which is code point order).
    static func sortsByUserName(_ query: ListQuery) -> Bool {
        guard let s = query.sortBy else { return false }
        return !s.isExtension && s.subAttribute == nil && equalsIgnoringASCIICase(s.attribute.name, "userName")
    }

    /// Every resource of `type` matching `filter`, scanning at most
    /// `scanBudget`, else `tooMany` (with the advice to use a cursor when a
    /// cursor would page through the scan).
    func loadAll(
        _ txn: borrowing ReadTransaction, _ type: ResourceType, filter: Filter?, scanBudget: Int, cursorHelps: Bool
    ) throws -> [JSONObject] {
        var out: [JSONObject] = []
        var scanned = 0
        var failure: Error?
        try txn.scan(resources, from: Array("\(type.id)/".utf8), to: Array("\(type.id)0".utf8)) { _, value in
            scanned += 1
            if scanned > scanBudget {
                let advice =
                    cursorHelps
                    ? "page through it with a cursor (cursor= and count=, RFC 9865), or filter by equality on id, userName, externalId, active, userType or emails.value"
                    : "filter by equality on id, userName, externalId, active, userType or emails.value, or sort by userName"
                failure = SCIMError(400, .tooMany, "this request needs a scan of more than \(scanBudget) resources; \(advice)")
                return false
            }
            do {
                guard let r = try JSONParser.parse(value, limits: .stored).objectValue else { return true }
                if try filter == nil || filter!.matches(forMatching(txn, type, r, filter)) { out.append(r) }
            } catch {
                failure = error
                return false
            }
            return true
        }
        if let failure { throw failure }
        return out
    }

    /// A page of an ordered key space (ids, userNames, or the ids of one
    /// indexed value), in either direction. Cursors anchor at the key
    /// without the space's prefix: a seek finds the anchor's place even when
    /// it has gone. Only the page's entries become resources (`resource`).
    func walk(
        _ txn: borrowing ReadTransaction, _ type: ResourceType, _ query: ListQuery, _ space: KeySpace, descending: Bool, salt: String,
        total: Int,
        resource: ([UInt8], [UInt8]) throws -> JSONObject?
    ) throws -> ListPage<JSONObject> {
        var entries: [([UInt8], [UInt8])] = []
        var startIndex: Int?
        if query.count == 0 {
            // Only totalResults (RFC 7644 §3.4.2.4).
            if query.cursor == nil { startIndex = query.startIndex }
        } else if let position = try query.cursorPosition(salt: salt) {
            let anchor = space.prefix + position.anchor
            if position.after {
                entries = try space.entries(txn, beyond: anchor, descending: descending, skip: 0, limit: query.count)
            } else {
                entries = try space.entries(txn, beyond: anchor, descending: !descending, skip: 0, limit: query.count).reversed()
            }
        } else {
            if query.cursor == nil { startIndex = query.startIndex }
            // The space (database, prefix, direction) and the store's
            // generation in this snapshot: `version` changes with every
            // create, replace and patch, the count with every delete, so
            // equal generations have the same keys in the same ranks.
            let name = "\(space.db.hashValue)/\(hexString(space.prefix))/\(descending)"
            let generation =
                (try txn.get(meta, Array("version".utf8)) ?? []) + (try txn.get(meta, AgentStore.countKey(type)) ?? [])
            entries = try space.entries(
                txn, beyond: nil, descending: descending, skip: (startIndex ?? 1) - 1, limit: query.count,
                positions: (positionIndex, name, generation))
        }
        var items: [JSONObject] = []
        items.reserveCapacity(entries.count)
        for (key, value) in entries {
            if let r = try resource(key, value) { items.append(r) }
        }
        var page = ListPage(items: items[...], totalResults: total, startIndex: startIndex)
        if query.cursor != nil, let first = entries.first?.0, let last = entries.last?.0 {
            if try !space.entries(txn, beyond: last, descending: descending, skip: 0, limit: 0).isEmpty {
                page.nextCursor = query.makeCursor(after: true, offset: 0, anchor: Array(last.dropFirst(space.prefix.count)), salt: salt)
            }
            if try !space.entries(txn, beyond: first, descending: !descending, skip: 0, limit: 0).isEmpty {
                page.previousCursor = query.makeCursor(
                    after: false, offset: 0, anchor: Array(first.dropFirst(space.prefix.count)), salt: salt)
            }
        }
        return page
    }
}

/// The keys of `db` that start with `prefix`, in key order.
struct KeySpace {
    let db: Database
    let prefix: [UInt8]

    /// Entries strictly beyond `anchor` (nil: from the first, or the last
    /// when `descending`) in the walk's direction: `skip` of them walked by
    /// key only (nothing copied but the key), then up to `limit` with their
    /// values. `limit` 0 returns at most one entry: whether any is beyond.
    func entries(
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
    func prefixEnd() -> [UInt8]? {
        guard let last = prefix.last else { return nil }
        // Resource prefixes end in "/"; the next byte is "0".
        return prefix.dropLast() + [last + 1]
    }
}

extension AgentStore {
    /// A filter no index answers, paged through its scan (RFC 9865): from
    /// the cursor's anchor (the last resource the previous page scanned, in
    /// id order), at most `scanBudget` resources are parsed per request, and
    /// the page holds the matches found, up to `count`: possibly fewer, even
    /// none, with a `nextCursor` that resumes the scan where it stopped
    /// (RFC 9865 §2: the provider "MAY return fewer results"; `nextCursor` is
    /// omitted only on the last page). The number of matches is not known
    /// before the scan ends: `totalResults` is the matches so far (earlier
    /// pages, carried in the cursor's offset, plus this one), so it grows
    /// along the walk and is exact on the last page.
    func scanPage(
        _ txn: borrowing ReadTransaction, _ type: ResourceType, _ query: ListQuery, _ filter: Filter, scanBudget: Int
    ) throws -> ListPage<JSONObject> {
        // Scan cursors carry a match count, not a position: not to be taken
        // for the cursors of this query issued before scans paged.
        let salt = "\u{0}scan"
        let prefix = Array("\(type.id)/".utf8)
        var from = prefix, before = 0
        if let position = try query.cursorPosition(salt: salt) {
            guard position.after else {
                throw SCIMError(
                    400, .invalidCursor, "a filter that scans pages forward only (no previousCursor); start again with an empty cursor")
            }
            from = prefix + position.anchor + [0]
            before = position.offset
        }
        var items: [JSONObject] = [], scanned = 0, more = false
        var last: [UInt8]?
        var failure: Error?
        try txn.scan(resources, from: from, to: Array("\(type.id)0".utf8)) { key, value in
            if items.count == query.count || scanned == max(1, scanBudget) {
                more = true
                return false
            }
            scanned += 1
            last = key
            do {
                if let r = try JSONParser.parse(value, limits: .stored).objectValue, filter.matches(try forMatching(txn, type, r, filter)) {
                    items.append(r)
                }
            } catch {
                failure = error
                return false
            }
            return true
        }
        if let failure { throw failure }
        var page = ListPage(items: items[...], totalResults: before + items.count)
        if more, let last {
            page.nextCursor = query.makeCursor(
                after: true, offset: before + items.count, anchor: Array(last.dropFirst(prefix.count)), salt: salt)
        }
        return page
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
final class PositionIndex: Sendable {
    static let stride = 256
    static let maxSpaces = 64
    static let maxExtra = 100_000
    struct Space {
        var generation: [UInt8]
        var keys: [Int: [UInt8]]
    }
    private let spaces = Mutex<[String: Space]>([:])
    /// Keys stepped over by the last `startIndex` walk (for tests and
    /// diagnostics).
    let lastSteps = Atomic<Int>(0)

    /// The checkpoint with the highest rank at or below `rank`.
    func nearest(_ name: String, _ generation: [UInt8], atOrBelow rank: Int) -> (Int, [UInt8])? {
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
    func record(_ name: String, _ generation: [UInt8], _ points: [(Int, [UInt8])], steps: Int?) {
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
