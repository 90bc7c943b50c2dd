import EdgeStore
import SCIM
import Synchronization

/// Lists of the federated directory at any size (docs/scim.md, "The
/// broker's read API"), from indexes kept in the apply transaction:
///
/// | database / key | value |
/// |---|---|
/// | `byType`: `<Type>\0<broker id>` | `<domain>/<Type>/<source id>` (the `resources` key) |
/// | `byValue`: `<Type>\0u\0<lowercased userName>\0<broker id>` | the `resources` key |
/// | `byValue`: `<Type>\0e\0<externalId>\0<broker id>` | the `resources` key |
/// | `meta`: `count/<Type>` | how many resources of the type (big-endian) |
/// | `meta`: `generation/<Type>` | bumped by every insert into or delete from the type's `byType` range |
/// | `meta`: `lists` | 1 once the indexes are built (`buildListIndexes`) |
///
/// `byType` is in broker id order across domains: an unfiltered page is a
/// walk of it (a cursor is a seek, a `startIndex` a key-only walk shortened
/// by a `PositionIndex`), and only the page's resources are read and parsed.
/// Broker ids are hex: the NUL separators split keys unambiguously. Values
/// over `maxIndexedValue` bytes or holding a NUL are not in `byValue`; a
/// lookup of such a value scans.
extension BrokerStore {
    static let listsLayoutKey = Array("lists".utf8)
    static let maxIndexedValue = 256
    static let listsChunk = 1024

    static func countKey(_ type: String) -> [UInt8] { Array("count/\(type)".utf8) }
    static func generationKey(_ type: String) -> [UInt8] { Array("generation/\(type)".utf8) }
    static func typePrefix(_ type: String) -> [UInt8] { Array(type.utf8) + [0] }

    /// The `byValue` prefix of one value of one attribute (`u` userName,
    /// `e` externalId): nil when the value is not indexed.
    static func valuePrefix(_ type: String, _ attribute: UInt8, _ value: String) -> [UInt8]? {
        let normalized = Array((attribute == UInt8(ascii: "u") ? value.lowercased() : value).utf8)
        guard normalized.count <= maxIndexedValue, !normalized.contains(0) else { return nil }
        return typePrefix(type) + [attribute, 0] + normalized + [0]
    }

    static func indexedValues(_ type: String, _ resource: JSONObject?) -> [[UInt8]] {
        guard let resource else { return [] }
        var out: [[UInt8]] = []
        if let u = resource["userName"]?.stringValue, let p = valuePrefix(type, UInt8(ascii: "u"), u) { out.append(p) }
        if let e = resource["externalId"]?.stringValue, let p = valuePrefix(type, UInt8(ascii: "e"), e) { out.append(p) }
        return out
    }

    /// Keeps the list indexes of one resource in the apply transaction:
    /// `old` as stored before (nil: new), `new` as stored now (nil: deleted).
    /// Idempotent: counts move only when a `byType` entry really comes or
    /// goes, so the migration may run it again after a crash.
    func updateListIndexes(
        type: String, key: [UInt8], old: JSONObject?, new: JSONObject?, _ txn: borrowing WriteTransaction
    ) throws {
        guard let brokerID = new?["id"]?.stringValue ?? old?["id"]?.stringValue else { return }
        let typeKey = BrokerStore.typePrefix(type) + Array(brokerID.utf8)
        var delta = 0
        if new != nil {
            if try txn.get(byType, typeKey) != key {
                if try txn.get(byType, typeKey) == nil { delta = 1 }
                try txn.put(byType, typeKey, key)
            }
        } else if try txn.delete(byType, typeKey) {
            delta = -1
        }
        if delta != 0 {
            let count = try txn.get(meta, BrokerStore.countKey(type)).flatMap(UInt64.init(bigEndianBytes:)) ?? 0
            try txn.put(meta, BrokerStore.countKey(type), UInt64(max(0, Int64(count) + Int64(delta))).bigEndianBytes)
            let generation = try txn.get(meta, BrokerStore.generationKey(type)).flatMap(UInt64.init(bigEndianBytes:)) ?? 0
            try txn.put(meta, BrokerStore.generationKey(type), (generation &+ 1).bigEndianBytes)
        }
        let before = Set(BrokerStore.indexedValues(type, old)), after = Set(BrokerStore.indexedValues(type, new))
        let id = Array(brokerID.utf8)
        for p in before.subtracting(after) { _ = try txn.delete(byValue, p + id) }
        for p in after where try txn.get(byValue, p + id) != key { try txn.put(byValue, p + id, key) }
    }

    /// A store made before the list indexes gets them once, when it is
    /// opened: `listsChunk` resources per transaction (memory holds one
    /// chunk), the position reached kept in `meta` with each chunk, so an
    /// interrupted build goes on where it stopped. No fan-out: nothing changed.
    func buildListIndexes() throws {
        let meta = self.meta, resources = self.resources
        let progressKey = Array("lists/from".utf8)
        while true {
            let done = try environment.write { txn -> Bool in
                if try txn.get(meta, BrokerStore.listsLayoutKey) != nil { return true }
                var from: [UInt8]? = try txn.get(meta, progressKey).map { $0 + [0] }
                if from == [0] { from = nil }
                var chunk: [([UInt8], [UInt8])] = []
                try txn.scan(resources, from: from) { k, v in
                    chunk.append((k, v))
                    return chunk.count < BrokerStore.listsChunk
                }
                for (k, v) in chunk {
                    let parts = k.split(separator: UInt8(ascii: "/"), maxSplits: 2)
                    guard parts.count == 3, let o = try JSONParser.parse(v, limits: .stored).objectValue else { continue }
                    try updateListIndexes(type: String(decoding: parts[1], as: UTF8.self), key: k, old: nil, new: o, txn)
                }
                if chunk.count < BrokerStore.listsChunk {
                    try txn.put(meta, BrokerStore.listsLayoutKey, UInt64(1).bigEndianBytes)
                    _ = try txn.delete(meta, progressKey)
                    return true
                }
                try txn.put(meta, progressKey, chunk[chunk.count - 1].0)
                return false
            }
            if done { return }
        }
    }

    /// How many resources of `type` the directory holds (O(1)).
    public func count(_ type: String) throws -> Int {
        let meta = self.meta
        return try environment.read { txn in
            Int(try txn.get(meta, BrokerStore.countKey(type)).flatMap(UInt64.init(bigEndianBytes:)) ?? 0)
        }
    }

    /// Resources parsed by the last list (`list`), and groups whose members
    /// it read: what a page costs, for tests and diagnostics.
    public var lastListCost: (parsed: Int, memberReads: Int, startIndexSteps: Int) {
        (
            listState.parsed.load(ordering: .relaxed), listState.memberReads.load(ordering: .relaxed),
            listState.positions.lastSteps.load(ordering: .relaxed)
        )
    }

    /// The page `query` asks for. An `id`, `userName` or `externalId`
    /// equality reads its few candidates from a key; an unfiltered list walks
    /// `byType`; any other filter scans at most `scanBudget` resources per
    /// request and, by cursor (or when no pagination was named), pages
    /// through the scan. A `sortBy`, or a scanned filter with `startIndex`
    /// or `count=0`, needs every match: within `scanBudget`, else `tooMany`.
    /// Groups get their members from the index only when `members` is
    /// returned (`withMembers`).
    public func list(_ type: ResourceType, _ query: ListQuery, scanBudget: Int, members: Bool) throws -> ListPage<JSONObject> {
        listState.positions.lastSteps.store(0, ordering: .relaxed)
        var cost = ListCost()
        defer {
            listState.parsed.store(cost.parsed, ordering: .relaxed)
            listState.memberReads.store(cost.memberReads, ordering: .relaxed)
        }
        return try environment.read { txn in
            var page = try listPage(txn, type, query, scanBudget: scanBudget, &cost)
            if members && type.id == "Group" {
                page.items = try page.items.map { g in
                    cost.memberReads += 1
                    return try withMembers(txn, g)
                }[...]
            }
            return page
        }
    }

    struct ListCost {
        var parsed = 0
        var memberReads = 0
    }

    func listPage(
        _ txn: borrowing ReadTransaction, _ type: ResourceType, _ query: ListQuery, scanBudget: Int, _ cost: inout ListCost
    ) throws -> ListPage<JSONObject> {
        if let filter = query.filter, let hint = filter.indexLookup, let keys = try lookup(txn, type.id, hint.lookup) {
            // A key names the few candidates: read them, check, page in memory.
            var found: [JSONObject] = []
            for key in keys {
                if let r = try load(txn, key, &cost), try matches(txn, type, r, filter, &cost) { found.append(r) }
            }
            return try query.paginate(found) { $0 }
        }
        if query.filter == nil && query.sortBy == nil {
            return try walk(txn, type, query, &cost)
        }
        if let filter = query.filter, query.sortBy == nil, query.count > 0 {
            if query.cursor != nil { return try scanPage(txn, type, query, filter, scanBudget: scanBudget, &cost) }
            if !query.namesStartIndex {
                // Neither startIndex nor cursor: exact when the scan fits the
                // budget, else the first cursor page (RFC 9865 §2.4).
                do {
                    return try query.paginate(try loadAll(txn, type, filter, scanBudget: scanBudget, cursorHelps: true, &cost)) { $0 }
                } catch let e as SCIMError where e.scimType == .tooMany {
                    return try scanPage(txn, type, query, filter, scanBudget: scanBudget, &cost)
                }
            }
        }
        let all = try loadAll(txn, type, query.filter, scanBudget: scanBudget, cursorHelps: query.sortBy == nil, &cost)
        return try query.paginate(all) { $0 }
    }

    /// The `resources` keys an equality names, from `brokerIds` or
    /// `byValue`; nil when the value is not indexed (then the filter scans).
    func lookup(_ txn: borrowing ReadTransaction, _ type: String, _ lookup: IndexLookup) throws -> [[UInt8]]? {
        let prefix: [UInt8]
        switch lookup {
        case .id(let id):
            return try txn.get(brokerIds, Array(id.utf8)).map { [$0] } ?? []
        case .userName(let v):
            guard let p = BrokerStore.valuePrefix(type, UInt8(ascii: "u"), v) else { return nil }
            prefix = p
        case .externalId(let v):
            guard let p = BrokerStore.valuePrefix(type, UInt8(ascii: "e"), v) else { return nil }
            prefix = p
        }
        var keys: [[UInt8]] = []
        try txn.scan(byValue, from: prefix, to: prefix.dropLast() + [1]) { _, v in
            keys.append(v)
            return true
        }
        return keys
    }

    func load(_ txn: borrowing ReadTransaction, _ key: [UInt8], _ cost: inout ListCost) throws -> JSONObject? {
        guard let bytes = try txn.get(resources, key) else { return nil }
        cost.parsed += 1
        return try JSONParser.parse(bytes, limits: .stored).objectValue
    }

    /// Whether `resource` matches; a group's members are read for a filter
    /// that names them.
    func matches(
        _ txn: borrowing ReadTransaction, _ type: ResourceType, _ resource: JSONObject, _ filter: Filter, _ cost: inout ListCost
    ) throws -> Bool {
        guard type.id == "Group", filter.root.reads("members") else { return filter.matches(resource) }
        cost.memberReads += 1
        return filter.matches(try withMembers(txn, resource))
    }

    /// An unfiltered page: `byType` from the cursor's anchor (a seek) or
    /// from `startIndex` (a key-only walk from the nearest checkpoint); only
    /// the page's resources are parsed; `totalResults` is the count.
    func walk(_ txn: borrowing ReadTransaction, _ type: ResourceType, _ query: ListQuery, _ cost: inout ListCost) throws -> ListPage<
        JSONObject
    > {
        let space = KeySpace(db: byType, prefix: BrokerStore.typePrefix(type.id))
        let total = Int(try txn.get(meta, BrokerStore.countKey(type.id)).flatMap(UInt64.init(bigEndianBytes:)) ?? 0)
        var entries: [([UInt8], [UInt8])] = []
        var startIndex: Int?
        let position = try query.cursorPosition()
        if query.count == 0 {
            if query.cursor == nil { startIndex = query.startIndex }
        } else if let position {
            let anchor = space.prefix + position.anchor
            entries =
                position.after
                ? try space.entries(txn, beyond: anchor, descending: false, skip: 0, limit: query.count)
                : try space.entries(txn, beyond: anchor, descending: true, skip: 0, limit: query.count).reversed()
        } else {
            if query.cursor == nil { startIndex = query.startIndex }
            let generation = try txn.get(meta, BrokerStore.generationKey(type.id)) ?? []
            entries = try space.entries(
                txn, beyond: nil, descending: false, skip: (startIndex ?? 1) - 1, limit: query.count,
                positions: (listState.positions, "byType/\(type.id)", generation))
        }
        var items: [JSONObject] = []
        for (_, key) in entries { if let r = try load(txn, key, &cost) { items.append(r) } }
        var page = ListPage(items: items[...], totalResults: total, startIndex: startIndex)
        if query.cursor != nil, let first = entries.first?.0, let last = entries.last?.0 {
            if try !space.entries(txn, beyond: last, descending: false, skip: 0, limit: 0).isEmpty {
                page.nextCursor = query.makeCursor(after: true, offset: 0, anchor: Array(last.dropFirst(space.prefix.count)))
            }
            if try !space.entries(txn, beyond: first, descending: true, skip: 0, limit: 0).isEmpty {
                page.previousCursor = query.makeCursor(after: false, offset: 0, anchor: Array(first.dropFirst(space.prefix.count)))
            }
        }
        return page
    }

    /// Every match of `filter` (nil: every resource), parsing at most
    /// `scanBudget` resources, else `tooMany` (with the advice to page by
    /// cursor when a cursor would page through the scan).
    func loadAll(
        _ txn: borrowing ReadTransaction, _ type: ResourceType, _ filter: Filter?, scanBudget: Int, cursorHelps: Bool,
        _ cost: inout ListCost
    ) throws -> [JSONObject] {
        let prefix = BrokerStore.typePrefix(type.id)
        var keys: [[UInt8]] = []
        var tooMany = false
        try txn.scan(byType, from: prefix, to: Array(type.id.utf8) + [1]) { _, v in
            if keys.count == scanBudget {
                tooMany = true
                return false
            }
            keys.append(v)
            return true
        }
        if tooMany {
            let advice =
                cursorHelps
                ? "page through it with a cursor (cursor= and count=, RFC 9865), or filter by equality on id, userName or externalId"
                : "filter by equality on id, userName or externalId, or leave sortBy out and page by cursor"
            throw SCIMError(400, .tooMany, "this request needs a scan of more than \(scanBudget) resources; \(advice)")
        }
        var out: [JSONObject] = []
        for key in keys {
            guard let r = try load(txn, key, &cost) else { continue }
            if try filter == nil || matches(txn, type, r, filter!, &cost) { out.append(r) }
        }
        return out
    }

    /// A filter no key answers, paged through its scan (RFC 9865), as the
    /// agent does: from the cursor's anchor (the last broker id the previous
    /// page scanned) at most `scanBudget` resources are parsed, and the page
    /// holds the matches found, up to `count` (possibly none), with a
    /// `nextCursor` while the scan has not ended. `totalResults` is the
    /// matches so far (earlier pages' count travels in the cursor's offset).
    /// Forward only.
    func scanPage(
        _ txn: borrowing ReadTransaction, _ type: ResourceType, _ query: ListQuery, _ filter: Filter, scanBudget: Int,
        _ cost: inout ListCost
    ) throws -> ListPage<JSONObject> {
        let prefix = BrokerStore.typePrefix(type.id)
        let (from, before) = try query.scanStart(under: prefix)
        var entries: [([UInt8], [UInt8])] = []
        var more = false
        try txn.scan(byType, from: from, to: Array(type.id.utf8) + [1]) { k, v in
            if entries.count == max(1, scanBudget) {
                more = true
                return false
            }
            entries.append((k, v))
            return true
        }
        var items: [JSONObject] = []
        var last: [UInt8]?
        for (k, v) in entries {
            if items.count == query.count {
                more = true
                break
            }
            last = k
            if let r = try load(txn, v, &cost), try matches(txn, type, r, filter, &cost) { items.append(r) }
        }
        var page = ListPage(items: items[...], totalResults: before + items.count)
        if more, let last {
            page.nextCursor = query.scanCursor(after: last, under: prefix, matches: before + items.count)
        }
        return page
    }
}

/// What lists keep in memory: `startIndex` checkpoints and the last list's cost.
final class BrokerListState: Sendable {
    let positions = PositionIndex()
    let parsed = Atomic<Int>(0)
    let memberReads = Atomic<Int>(0)
}
