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
                return try walk(txn, type, query, space, descending: false, salt: "", total: try count(txn, type)) { key, value in
                    try AgentStore.parseResource(value, key: key)
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
        try txn.scan(resources, from: Array("\(type.id)/".utf8), to: Array("\(type.id)0".utf8)) { key, value in
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
                let r = try AgentStore.parseResource(value, key: key)
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
        let prefix = Array("\(type.id)/".utf8)
        let (from, before) = try query.scanStart(under: prefix)
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
                let r = try AgentStore.parseResource(value, key: key)
                if try filter.matches(forMatching(txn, type, r, filter)) {
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
            page.nextCursor = query.scanCursor(after: last, under: prefix, matches: before + items.count)
        }
        return page
    }
}
