/// Above this many elements a stored array (a group's members) is streamed
/// rather than built into one body: the agent's and the broker's reads.
public let streamedArrayAbove = 1000

/// The pieces of a JSON array member (`,"members":[…]`) whose elements are
/// the stored values of one key range, read a chunk at a time, each chunk in
/// a read snapshot of its own, then the object's closing brace: for a body
/// streamed as the connection drains (memory holds one chunk). A range
/// changing while it is read shows each element as one of those snapshots
/// saw it. `member` is the opening (`,"members":[`); `element`, when given,
/// turns a stored value into the element sent (nil: none for it, as a
/// projection leaves out an element with nothing kept). No element gives
/// just `}`, or the empty array when `emptyArray` (as a store that
/// renders an empty group with `"members":[]` does). Returns nil after the
/// last piece.
public func storedArrayPieces(
    _ environment: Environment, _ db: Database, from prefix: [UInt8], to end: [UInt8], member: [UInt8], chunk: Int,
    element: (([UInt8]) throws -> [UInt8]?)? = nil, emptyArray: Bool = false
) -> () throws -> [UInt8]? {
    var from: [UInt8]? = prefix, first = true
    return {
        guard let start = from else { return nil }
        var piece: [UInt8] = [], n = 0, last: [UInt8] = []
        try environment.read { txn in
            try txn.scan(db, from: start, to: end) { k, v in
                last = k
                n += 1
                let sent: [UInt8]?
                if let element { sent = try element(v) } else { sent = v }
                if let sent {
                    piece.append(contentsOf: first ? member : [UInt8(ascii: ",")])
                    first = false
                    piece.append(contentsOf: sent)
                }
                return n < chunk
            }
        }
        if n == chunk {
            from = last + [0]
        } else {
            from = nil
            if first && emptyArray { piece.append(contentsOf: member) }
            piece.append(contentsOf: first && !emptyArray ? [UInt8(ascii: "}")] : Array("]}".utf8))
        }
        return piece
    }
}

/// Whether the key ranges of `db` (each `from` up to `to`) hold more than
/// `limit` keys together: reads at most `limit + 1` keys, whatever they
/// hold (the members of a page's groups, before choosing to stream them).
public func holdMoreKeys(
    _ txn: borrowing some StoreReading & ~Copyable, _ db: Database, in ranges: some Sequence<(from: [UInt8], to: [UInt8])>,
    than limit: Int
) throws -> Bool {
    var n = 0
    for range in ranges {
        try txn.scanKeys(db, from: range.from, to: range.to) { _ in
            n += 1
            return n <= limit
        }
        if n > limit { return true }
    }
    return false
}
