import EdgeStore
import SCIM
import Synchronization

/// Lists of the federated directory at any size (docs/scim.md, "The
/// broker's read API"), from indexes kept in the apply transaction:
///
/// | database / key | value |
/// |---|---|
/// | `byType`: `<Type>\0<broker id>` | `<domain>/<Type>/<source id>` (the `resources` key) |
/// | `byValue`: `<Type>\0<letter>\0<value>\0<broker id>` | the `resources` key (`IndexedAttribute`) |
/// | `meta`: `count/<Type>` | how many resources of the type (big-endian) |
/// | `meta`: `count/<Type>\0<letter>\0<value>\0` | how many hold the value (`countedPerValue`) |
/// | `meta`: `unsorted/<Type>/<letter>` | resources without an entry of a `sortable` attribute |
/// | `meta`: `generation/<Type>` | bumped by every insert into or delete from the type's `byType` range |
/// | `meta`: `generation/<Type>/values` | the same for the type's `byValue` entries |
/// | `meta`: `lists` | the layout built (`listsLayout`, `buildListIndexes`) |
///
/// `byType` is in broker id order across domains: an unfiltered page is a
/// walk of it (a cursor is a seek, a `startIndex` a key-only walk shortened
/// by a `PositionIndex`), and only the page's resources are read and parsed.
/// A value's range of `byValue` is walked the same way for an equality, and
/// an attribute's whole range, in value order, for `sortBy`.
/// Broker ids are hex: the NUL separators split keys unambiguously. Values
/// over `maxIndexedValue` bytes or holding a NUL are not in `byValue`; a
/// lookup of such a value scans.
extension BrokerStore {
    static let listsLayoutKey = Array("lists".utf8)
    /// 2: `active`, `userType`, `emails.value` and `displayName` in
    /// `byValue`, with their counts; a store of layout 1 is rebuilt at open.
    static let listsLayout: UInt64 = 2
    static let maxIndexedValue = 256
    static let listsChunk = 1024
    static let sortedSalt = "\u{0}sorted"

    static func countKey(_ type: String) -> [UInt8] { Array("count/\(type)".utf8) }
    static func generationKey(_ type: String) -> [UInt8] { Array("generation/\(type)".utf8) }
    static func valuesGenerationKey(_ type: String) -> [UInt8] { Array("generation/\(type)/values".utf8) }
    static func valueCountKey(_ prefix: [UInt8]) -> [UInt8] { Array("count/".utf8) + prefix }
    static func unsortedKey(_ type: String, _ a: IndexedAttribute) -> [UInt8] { Array("unsorted/\(type)/".utf8) + [a.rawValue] }
    static func typePrefix(_ type: String) -> [UInt8] { Array(type.utf8) + [0] }
    static func attributePrefix(_ type: String, _ a: IndexedAttribute) -> [UInt8] { typePrefix(type) + [a.rawValue, 0] }
    static func valuePrefix(_ type: String, _ a: IndexedAttribute, _ value: [UInt8]) -> [UInt8] {
        attributePrefix(type, a) + value + [0]
    }

    /// The `byValue` prefixes of `resource`'s values, one per distinct value.
    /// (An array: a resource has a handful, and hashing keys costs more than comparing them.)
    static func indexedValues(_ type: String, _ resource: JSONObject?) -> [[UInt8]] {
        guard let resource else { return [] }
        var out: [[UInt8]] = []
        for a in IndexedAttribute.allCases where a.applies(to: type) {
            for v in a.values(resource) {
                if let n = a.normalized(v) {
                    let p = valuePrefix(type, a, n)
                    if !out.contains(p) { out.append(p) }
                }
            }
        }
        return out
    }

    /// 1 when `resource` exists and has no entry in `a`'s range (`sortBy`
    /// from the index needs none such).
    static func unsorted(_ type: String, _ a: IndexedAttribute, _ resource: JSONObject?) -> Int {
        guard let resource else { return 0 }
        return a.values(resource).contains { a.normalized($0) != nil } ? 0 : 1
    }

    /// Keeps the list indexes of one resource in the apply transaction:
    /// `old` as stored before (nil: new), `new` as stored now (nil: deleted).
    /// Counts move only when an entry really comes or goes; `unsorted`
    /// follows `old` and `new`, so the migration runs this once per
    /// resource (its progress commits with each chunk).
    /// `counters`: where a batch collects its counter moves (written at its
    /// end); without, each is written at once. `fresh`: the broker id was
    /// made for this write (a create), so no entry of it can be stored yet
    /// and none is looked up (the migration, which may meet entries of an
    /// older layout, never says so).
    func updateListIndexes(
        type: String, key: [UInt8], old: JSONObject?, new: JSONObject?, counters: ListCounters? = nil, fresh: Bool = false,
        _ txn: borrowing WriteTransaction
    ) throws {
        guard let brokerID = new?["id"]?.stringValue ?? old?["id"]?.stringValue else { return }
        let typeKey = BrokerStore.typePrefix(type) + Array(brokerID.utf8)
        var delta = 0
        if new != nil {
            let stored = fresh ? nil : try txn.get(byType, typeKey)
            if stored != key {
                if stored == nil { delta = 1 }
                try txn.put(byType, typeKey, key)
            }
        } else if try txn.delete(byType, typeKey) {
            delta = -1
        }
        if delta != 0 {
            try move(BrokerStore.countKey(type), delta, counters, txn)
            try move(BrokerStore.generationKey(type), 1, counters, txn)
        }
        try updateValueEntries(type: type, id: Array(brokerID.utf8), key: key, old: old, new: new, counters: counters, fresh: fresh, txn)
    }

    func updateValueEntries(
        type: String, id: [UInt8], key: [UInt8], old: JSONObject?, new: JSONObject?, counters: ListCounters? = nil,
        fresh: Bool = false, _ txn: borrowing WriteTransaction
    ) throws {
        let before = BrokerStore.indexedValues(type, old), after = BrokerStore.indexedValues(type, new)
        var changed = false
        for p in before where try !after.contains(p) && txn.delete(byValue, p + id) {
            changed = true
            try countValue(type, p, -1, counters, txn)
        }
        for p in after {
            let stored = fresh ? nil : try txn.get(byValue, p + id)
            guard stored != key else { continue }
            try txn.put(byValue, p + id, key)
            if stored == nil {
                changed = true
                try countValue(type, p, 1, counters, txn)
            }
        }
        if changed { try move(BrokerStore.valuesGenerationKey(type), 1, counters, txn) }
        for a in IndexedAttribute.allCases where a.sortable && a.applies(to: type) {
            let d = BrokerStore.unsorted(type, a, new) - BrokerStore.unsorted(type, a, old)
            if d != 0 { try move(BrokerStore.unsortedKey(type, a), d, counters, txn) }
        }
    }

    /// The count of the value `prefix` names, for the attributes counted per value.
    func countValue(_ type: String, _ prefix: [UInt8], _ delta: Int, _ counters: ListCounters?, _ txn: borrowing WriteTransaction) throws {
        guard let a = IndexedAttribute(rawValue: prefix[BrokerStore.typePrefix(type).count]), a.countedPerValue else { return }
        try move(BrokerStore.valueCountKey(prefix), delta, counters, txn)
    }

    /// A counter move: into `counters` when given, else written at once.
    func move(_ key: [UInt8], _ delta: Int, _ counters: ListCounters?, _ txn: borrowing WriteTransaction) throws {
        if let counters { try counters.add(key, delta, self, txn) } else { try addToCounter(key, delta, txn) }
    }

    /// A big-endian counter of `meta` (0 when absent).
    func counter(_ txn: borrowing some StoreReading & ~Copyable, _ key: [UInt8]) throws -> Int {
        Int(try txn.get(meta, key).flatMap(UInt64.init(bigEndianBytes:)) ?? 0)
    }

    /// Moves a counter of `meta`, never below 0; one at 0 is deleted.
    func addToCounter(_ key: [UInt8], _ delta: Int, _ txn: borrowing WriteTransaction) throws {
        try setCounter(key, max(0, try counter(txn, key) + delta), txn)
    }

    func setCounter(_ key: [UInt8], _ n: Int, _ txn: borrowing WriteTransaction) throws {
        if n == 0 { _ = try txn.delete(meta, key) } else { try txn.put(meta, key, UInt64(n).bigEndianBytes) }
    }

    /// A store made before the list indexes of `listsLayout` gets them once,
    /// when it is opened: `listsChunk` resources per transaction (memory
    /// holds one chunk), the position reached kept in `meta` with each
    /// chunk, so an interrupted build goes on where it stopped. Entries of
    /// an older layout are kept (not counted again). No fan-out: nothing changed.
    func buildListIndexes() throws {
        let meta = self.meta, resources = self.resources
        let progressKey = Array("lists/from/\(BrokerStore.listsLayout)".utf8)
        while true {
            let done = try environment.write { txn -> Bool in
                let built = try txn.get(meta, BrokerStore.listsLayoutKey).flatMap(UInt64.init(bigEndianBytes:)) ?? 0
                if built >= BrokerStore.listsLayout { return true }
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
                    try txn.put(meta, BrokerStore.listsLayoutKey, BrokerStore.listsLayout.bigEndianBytes)
                    _ = try txn.delete(meta, progressKey)
                    _ = try txn.delete(meta, Array("lists/from".utf8))  // layout 1's
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
        try environment.read { txn in try counter(txn, BrokerStore.countKey(type)) }
    }

    /// Resources parsed by the last list (`list`), and groups whose members
    /// it read: what a page costs, for tests and diagnostics.
    public var lastListCost: (parsed: Int, memberReads: Int, startIndexSteps: Int) {
        (
            listState.parsed.load(ordering: .relaxed), listState.memberReads.load(ordering: .relaxed),
            listState.positions.lastSteps.load(ordering: .relaxed)
        )
    }

    /// The page `query` asks for. An equality on `id` or an indexed
    /// attribute (`IndexedAttribute`) alone walks its value's range like an
    /// unfiltered list walks `byType`, and `sortBy` on `userName` (users) or
    /// `displayName` (groups) without a filter walks that attribute's range:
    /// O(page). An `and` with such an equality scans that value's range,
    /// any other filter the type's; a scan parses at most `scanBudget`
    /// resources per request and, by cursor (or when no pagination was
    /// named), pages through. Any other `sortBy`, or a scan with
    /// `startIndex` or `count=0`, needs every match: within `scanBudget`,
    /// else `tooMany`. Groups get their members from the index only when
    /// `members` is returned (`withMembers`).
    public func list(_ type: ResourceType, _ query: ListQuery, scanBudget: Int, members: Bool) throws -> ListPage<JSONObject> {
        try list(type, query, scanBudget: scanBudget, members: members, streamAbove: nil).page
    }

    /// The same; when the page's groups hold more than `streamAbove`
    /// members together (counted in the page's snapshot, at most that many
    /// keys read), they are left without them and `streamMembers` is true:
    /// the response streams each group's members from the index
    /// (`memberPieces`), so that memory holds a chunk, not the groups.
    func list(
        _ type: ResourceType, _ query: ListQuery, scanBudget: Int, members: Bool, streamAbove: Int?
    ) throws -> (page: ListPage<JSONObject>, streamMembers: Bool) {
        listState.positions.lastSteps.store(0, ordering: .relaxed)
        var cost = ListCost()
        defer {
            listState.parsed.store(cost.parsed, ordering: .relaxed)
            listState.memberReads.store(cost.memberReads, ordering: .relaxed)
        }
        return try environment.read { txn in
            var page = try listPage(txn, type, query, scanBudget: scanBudget, &cost)
            guard members && type.id == "Group" else { return (page, false) }
            cost.memberReads += page.items.count
            if let streamAbove,
                try hasMoreMembers(txn, page.items.compactMap { $0["id"]?.stringValue }, than: streamAbove)
            {
                return (page, true)
            }
            page.items = try page.items.map { g in try withMembers(txn, g) }[...]
            return (page, false)
        }
    }

    struct ListCost {
        var parsed = 0
        var memberReads = 0
    }

    func listPage(
        _ txn: borrowing ReadTransaction, _ type: ResourceType, _ query: ListQuery, scanBudget: Int, _ cost: inout ListCost
    ) throws -> ListPage<JSONObject> {
        let all = KeySpace(db: byType, prefix: BrokerStore.typePrefix(type.id))
        if let filter = query.filter, let (plan, exact) = IndexPlan.of(filter.root, type.id) {
            switch plan {
            case .id(let id):
                var found: [JSONObject] = []
                if let key = try txn.get(brokerIds, Array(id.utf8)), BrokerStore.type(ofKey: key) == type.id,
                    let r = try load(txn, key, &cost), try matches(txn, type, r, filter, &cost)
                {
                    found.append(r)
                }
                return try query.paginate(found) { $0 }
            case .member(let id):
                // A member's groups: as many as it belongs to, whatever their sizes.
                var found: [JSONObject] = []
                for g in try groups(of: id, txn).sorted() {
                    guard let key = try txn.get(brokerIds, Array(g.utf8)), let r = try load(txn, key, &cost) else { continue }
                    if try exact || matches(txn, type, r, filter, &cost) { found.append(r) }
                }
                return try query.paginate(found) { $0 }
            case .value(let attribute, let value):
                let space = KeySpace(db: byValue, prefix: BrokerStore.valuePrefix(type.id, attribute, value))
                if exact && query.sortBy == nil {
                    let total = try rangeCount(txn, attribute, space)
                    let generation = try txn.get(meta, BrokerStore.valuesGenerationKey(type.id)) ?? []
                    return try walk(txn, query, IndexWalk(space: space, total: total, generation: generation), &cost)
                }
                // Each candidate is checked: the value's range is the scan.
                return try scanned(txn, type, query, filter, space, scanBudget: scanBudget, &cost)
            }
        }
        if query.filter == nil && query.sortBy == nil {
            let generation = try txn.get(meta, BrokerStore.generationKey(type.id)) ?? []
            let total = try counter(txn, BrokerStore.countKey(type.id))
            return try walk(txn, query, IndexWalk(space: all, total: total, generation: generation), &cost)
        }
        if query.filter == nil, let sorted = try sortedWalk(txn, type, query) {
            return try walk(txn, query, sorted, &cost)
        }
        return try scanned(txn, type, query, query.filter, all, scanBudget: scanBudget, &cost)
    }

    /// `<domain>/<Type>/<source id>` → `Type`.
    static func type(ofKey key: [UInt8]) -> String? {
        let parts = key.split(separator: UInt8(ascii: "/"), maxSplits: 2)
        return parts.count == 3 ? String(decoding: parts[1], as: UTF8.self) : nil
    }

    /// How many resources hold one value: its maintained count, or (for
    /// attributes whose values are nearly unique) a key-only walk of its range.
    func rangeCount(_ txn: borrowing ReadTransaction, _ attribute: IndexedAttribute, _ space: KeySpace) throws -> Int {
        if attribute.countedPerValue { return try counter(txn, BrokerStore.valueCountKey(space.prefix)) }
        var n = 0
        try txn.scanKeys(space.db, from: space.prefix, to: space.prefixEnd()) { _ in
            n += 1
            return true
        }
        return n
    }

    /// An unfiltered `sortBy` the index serves: the sorted attribute's range
    /// when every resource of the type is in it (`unsorted` is 0), else nil
    /// (the resources are sorted in memory, within the budget). Ties go by
    /// broker id in the walk's direction.
    func sortedWalk(_ txn: borrowing ReadTransaction, _ type: ResourceType, _ query: ListQuery) throws -> IndexWalk? {
        guard let sortBy = query.sortBy, !sortBy.isExtension,
            let attribute = IndexedAttribute.allCases.first(where: {
                $0.sortable && $0.applies(to: type.id) && $0.paths.contains(sortBy.canonicalPath.asciiLowercased)
            }),
            try counter(txn, BrokerStore.unsortedKey(type.id, attribute)) == 0
        else { return nil }
        return IndexWalk(
            space: KeySpace(db: byValue, prefix: BrokerStore.attributePrefix(type.id, attribute)),
            total: try counter(txn, BrokerStore.countKey(type.id)), descending: query.sortOrder == .descending,
            generation: try txn.get(meta, BrokerStore.valuesGenerationKey(type.id)) ?? [], salt: BrokerStore.sortedSalt)
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

    /// A page of an index range that is the answer: from the cursor's
    /// anchor (a seek) or from `startIndex` (a key-only walk from the
    /// nearest checkpoint); only the page's resources are parsed;
    /// `totalResults` is the walk's `total`.
    func walk(_ txn: borrowing ReadTransaction, _ query: ListQuery, _ w: IndexWalk, _ cost: inout ListCost) throws -> ListPage<
        JSONObject
    > {
        var entries: [([UInt8], [UInt8])] = []
        var startIndex: Int?
        let position = try query.cursorPosition(salt: w.salt)
        if query.count == 0 {
            if query.cursor == nil { startIndex = query.startIndex }
        } else if let position {
            let anchor = w.space.prefix + position.anchor
            entries =
                position.after
                ? try w.space.entries(txn, beyond: anchor, descending: w.descending, skip: 0, limit: query.count)
                : try w.space.entries(txn, beyond: anchor, descending: !w.descending, skip: 0, limit: query.count).reversed()
        } else {
            if query.cursor == nil { startIndex = query.startIndex }
            entries = try w.space.entries(
                txn, beyond: nil, descending: w.descending, skip: (startIndex ?? 1) - 1, limit: query.count,
                positions: (listState.positions, w.positionsName, w.generation))
        }
        var items: [JSONObject] = []
        for (_, key) in entries { if let r = try load(txn, key, &cost) { items.append(r) } }
        var page = ListPage(items: items[...], totalResults: w.total, startIndex: startIndex)
        if query.cursor != nil, let first = entries.first?.0, let last = entries.last?.0 {
            func anchor(_ key: [UInt8]) -> [UInt8] { Array(key.dropFirst(w.space.prefix.count)) }
            if try !w.space.entries(txn, beyond: last, descending: w.descending, skip: 0, limit: 0).isEmpty {
                page.nextCursor = query.makeCursor(after: true, offset: 0, anchor: anchor(last), salt: w.salt)
            }
            if try !w.space.entries(txn, beyond: first, descending: !w.descending, skip: 0, limit: 0).isEmpty {
                page.previousCursor = query.makeCursor(after: false, offset: 0, anchor: anchor(first), salt: w.salt)
            }
        }
        return page
    }

    /// A filter (nil: none, with a `sortBy` no index serves) answered by
    /// scanning `space` (the type's `byType` range, or the candidates of an
    /// `and`'s indexed equality): by cursor page by page within the budget;
    /// without pagination named, exact when the scan fits the budget, else
    /// the first cursor page (RFC 9865 §2.4); otherwise every match within
    /// the budget, or `tooMany`.
    func scanned(
        _ txn: borrowing ReadTransaction, _ type: ResourceType, _ query: ListQuery, _ filter: Filter?, _ space: KeySpace,
        scanBudget: Int, _ cost: inout ListCost
    ) throws -> ListPage<JSONObject> {
        if let filter, query.sortBy == nil, query.count > 0 {
            if query.cursor != nil { return try scanPage(txn, type, query, filter, space, scanBudget: scanBudget, &cost) }
            if !query.namesStartIndex {
                do {
                    return try query.paginate(try loadAll(txn, type, filter, space, scanBudget: scanBudget, cursorHelps: true, &cost)) {
                        $0
                    }
                } catch let e as SCIMError where e.scimType == .tooMany {
                    return try scanPage(txn, type, query, filter, space, scanBudget: scanBudget, &cost)
                }
            }
        }
        let all = try loadAll(txn, type, filter, space, scanBudget: scanBudget, cursorHelps: query.sortBy == nil, &cost)
        return try query.paginate(all) { $0 }
    }

    static let indexedFilters = "id, userName, externalId, active, userType or emails.value (displayName for groups)"

    /// Every match of `filter` (nil: every resource) in `space`, parsing at
    /// most `scanBudget` resources, else `tooMany` (with the advice to page
    /// by cursor when a cursor would page through the scan).
    func loadAll(
        _ txn: borrowing ReadTransaction, _ type: ResourceType, _ filter: Filter?, _ space: KeySpace, scanBudget: Int,
        cursorHelps: Bool, _ cost: inout ListCost
    ) throws -> [JSONObject] {
        var keys: [[UInt8]] = []
        var tooMany = false
        try txn.scan(space.db, from: space.prefix, to: space.prefixEnd()) { _, v in
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
                ? "page through it with a cursor (cursor= and count=, RFC 9865), or filter by equality on \(BrokerStore.indexedFilters)"
                : "filter by equality on \(BrokerStore.indexedFilters), sort by userName (displayName for groups), or leave sortBy out and page by cursor"
            throw SCIMError(400, .tooMany, "this request needs a scan of more than \(scanBudget) resources; \(advice)")
        }
        var out: [JSONObject] = []
        for key in keys {
            guard let r = try load(txn, key, &cost) else { continue }
            if try filter == nil || matches(txn, type, r, filter!, &cost) { out.append(r) }
        }
        return out
    }

    /// A filter no key answers alone, paged through its scan of `space`
    /// (RFC 9865), as the agent does: from the cursor's anchor (the last
    /// key the previous page scanned) at most `scanBudget` resources are
    /// parsed, and the page holds the matches found, up to `count` (possibly
    /// none), with a `nextCursor` while the scan has not ended.
    /// `totalResults` is the matches so far (earlier pages' count travels in
    /// the cursor's offset). Forward only.
    func scanPage(
        _ txn: borrowing ReadTransaction, _ type: ResourceType, _ query: ListQuery, _ filter: Filter, _ space: KeySpace,
        scanBudget: Int, _ cost: inout ListCost
    ) throws -> ListPage<JSONObject> {
        let (from, before) = try query.scanStart(under: space.prefix)
        var entries: [([UInt8], [UInt8])] = []
        var more = false
        try txn.scan(space.db, from: from, to: space.prefixEnd()) { k, v in
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
            page.nextCursor = query.scanCursor(after: last, under: space.prefix, matches: before + items.count)
        }
        return page
    }
}

/// An index range walked as the answer to a list: `byType` (unfiltered),
/// one value's range of `byValue` (an equality), or one attribute's
/// (`sortBy`, `descending` for `sortOrder=descending`). `generation`
/// invalidates its `startIndex` checkpoints; `salt` keeps its cursors
/// apart from the same query's other kinds.
struct IndexWalk {
    var space: KeySpace
    var total: Int
    var descending = false
    var generation: [UInt8]
    var salt = ""

    var positionsName: String { (descending ? "<" : ">") + String(decoding: space.prefix, as: UTF8.self) }
}

/// What lists keep in memory: `startIndex` checkpoints and the last list's cost.
final class BrokerListState: Sendable {
    let positions = PositionIndex()
    let parsed = Atomic<Int>(0)
    let memberReads = Atomic<Int>(0)
}

/// The list counters one apply transaction moves (`addToCounter`), each read
/// once and written once, at the end (`flush`), with the same result as
/// moving each at once (the same floor at 0 at every move): a batch of
/// creates moves the same few counters for every event. Nothing reads them
/// in between (lists read them in their own transactions).
final class ListCounters {
    private var entries: [(key: [UInt8], value: Int, stored: Int)] = []

    func add(_ key: [UInt8], _ delta: Int, _ store: BrokerStore, _ txn: borrowing WriteTransaction) throws {
        if let i = entries.firstIndex(where: { $0.key == key }) {
            entries[i].value = max(0, entries[i].value + delta)
        } else {
            let n = try store.counter(txn, key)
            entries.append((key, max(0, n + delta), n))
        }
    }

    func flush(_ store: BrokerStore, _ txn: borrowing WriteTransaction) throws {
        for e in entries where e.value != e.stored { try store.setCounter(e.key, e.value, txn) }
        entries = []
    }
}
