/// Cursor pagination (RFC 9865): cursors as positions, bound to their query.

extension ListQuery {
    /// A cursor is a position, not server state: `<query>.<n|p><offset>.<id>`,
    /// where `<query>` binds it to the type, filter and sort it came from,
    /// `n` means "after the resource `id`" and `p` "before it" (both hex),
    /// and `offset` is where that resource was, used only when it has gone.
    /// Positions survive inserts and deletes elsewhere in the list, so a walk
    /// neither repeats nor skips a resource that stays put, and cursors never
    /// expire.
    ///
    /// `ordered` must be in a total order that does not depend on the page:
    /// by `id` when `orderedByID` (then a vanished anchor still has an exact
    /// successor), or sorted by `sortBy` with `id` as the tie-break.
    public func cursorPage<Element>(
        _ ordered: [Element], orderedByID: Bool,
        id: (Element) -> String
    ) throws(SCIMError) -> ListPage<Element> {
        var start = 0, end = min(count, ordered.count)
        if let given = try cursorPosition() {
            let kind: Character = given.after ? "n" : "p", offset = given.offset
            let anchor = String(decoding: given.anchor, as: UTF8.self)
            // Where the anchor is now; else where it would be.
            let position: Int
            if let i = ordered.firstIndex(where: { id($0) == anchor }) {
                position = i
            } else if orderedByID {
                let after = ordered.firstIndex(where: { id($0).utf8.lexicographicallyPrecedes(anchor.utf8) == false }) ?? ordered.count
                position = kind == "n" ? after - 1 : after
            } else {
                position = min(offset, ordered.count)
            }
            if kind == "n" {
                start = min(position + 1, ordered.count)
                end = min(start + count, ordered.count)
            } else {
                end = max(0, min(position, ordered.count))
                start = max(0, end - count)
            }
        }
        var page = ListPage(items: ordered[start..<end], totalResults: ordered.count)
        if end < ordered.count, end > start {
            page.nextCursor = makeCursor(after: true, offset: end - 1, anchor: Array(id(ordered[end - 1]).utf8))
        }
        if start > 0, start < ordered.count, count > 0 {
            page.previousCursor = makeCursor(after: false, offset: start, anchor: Array(id(ordered[start]).utf8))
        }
        return page
    }

    /// Where this request's cursor points: nil without a cursor or with the
    /// empty one (the first page). Refuses a cursor this server did not
    /// issue for this query (type, filter, sort); `salt` tells apart cursors
    /// of one query whose anchors mean different things.
    public func cursorPosition(salt: String = "") throws(SCIMError) -> CursorPosition? {
        guard let cursor, !cursor.isEmpty else { return nil }
        let parts = cursor.split(separator: ".", omittingEmptySubsequences: false)
        guard parts.count == 3, let kind = parts[1].first, kind == "n" || kind == "p",
            let offset = Int(parts[1].dropFirst(), radix: 16), offset >= 0,
            let anchor = Self.unhex(parts[2])
        else {
            throw SCIMError(400, .invalidCursor, "cursor '\(cursor)' was not issued by this server; start again with an empty cursor")
        }
        guard parts[0] == cursorTag(salt: salt) else {
            throw SCIMError(
                400, .invalidCursor,
                "cursor '\(cursor)' belongs to another query (resource type, filter "
                    + "or sort changed); start again with an empty cursor")
        }
        return CursorPosition(after: kind == "n", offset: offset, anchor: anchor)
    }

    /// A cursor of this query: after (`nextCursor`) or before
    /// (`previousCursor`) `anchor`, with `offset` (a position, or whatever
    /// the walk that issues it needs carried to the next page).
    public func makeCursor(after: Bool, offset: Int, anchor: [UInt8], salt: String = "") -> String {
        "\(cursorTag(salt: salt)).\(after ? "n" : "p")\(String(max(0, offset), radix: 16)).\(Self.hex(anchor))"
    }

    func cursorTag(salt: String = "") -> String { Self.hex(fnv1a(signature + salt)) }

    static func hex(_ bytes: [UInt8]) -> String {
        let digits = Array("0123456789abcdef".utf8)
        var out: [UInt8] = []
        out.reserveCapacity(bytes.count * 2)
        for b in bytes { out.append(digits[Int(b >> 4)]); out.append(digits[Int(b & 15)]) }
        return String(decoding: out, as: UTF8.self)
    }

    static func hex(_ value: UInt64) -> String {
        hex((0..<8).map { UInt8(truncatingIfNeeded: value >> (56 - 8 * $0)) })
    }

    static func unhex(_ text: Substring) -> [UInt8]? {
        let u = Array(text.utf8)
        guard u.count % 2 == 0 else { return nil }
        var out: [UInt8] = []
        var i = 0
        while i < u.count {
            guard let h = hexValue(u[i]), let l = hexValue(u[i + 1]) else { return nil }
            out.append(h << 4 | l)
            i += 2
        }
        return out
    }
}

/// A parsed cursor: after or before `anchor` (bytes whose meaning the walk
/// that issued the cursor decides), with its `offset`.
public struct CursorPosition: Sendable, Equatable {
    public var after: Bool
    public var offset: Int
    public var anchor: [UInt8]
}

/// FNV-1a, 64 bits: a stable fingerprint (not a security measure; a cursor
/// only says where to continue a query the client may run anyway).
func fnv1a(_ text: String) -> UInt64 {
    var h: UInt64 = 0xcbf2_9ce4_8422_2325
    for b in text.utf8 { h = (h ^ UInt64(b)) &* 0x0000_0100_0000_01b3 }
    return h
}

extension ListQuery {
    /// Cursors of a page of a scanned filter carry a match count, not a
    /// position: salted apart from the same query's other cursors.
    public static let scanSalt = "\u{0}scan"

    /// Where a page of a scanned filter over keys under `prefix` starts: the
    /// first key (after the one its cursor names) and the matches before it.
    /// Forward only: a `previousCursor` is refused.
    public func scanStart(under prefix: [UInt8]) throws(SCIMError) -> (from: [UInt8], before: Int) {
        guard let position = try cursorPosition(salt: Self.scanSalt) else { return (prefix, 0) }
        guard position.after else {
            throw SCIMError(
                400, .invalidCursor, "a filter that scans pages forward only (no previousCursor); start again with an empty cursor")
        }
        return (prefix + position.anchor + [0], position.offset)
    }

    /// The `nextCursor` of a scanned page that stopped after `key` with `matches` matches so far.
    public func scanCursor(after key: [UInt8], under prefix: [UInt8], matches: Int) -> String {
        makeCursor(after: true, offset: matches, anchor: Array(key.dropFirst(prefix.count)), salt: Self.scanSalt)
    }
}
