internal import CLMDB

/// Byte access to a database inside a transaction, shared by read and write
/// transactions.
///
/// Lifetime (LMDB): values handed to closures are valid only inside the
/// closure; `get` and cursor steps copy them out.
public protocol StoreReading: ~Copyable {
    /// The value stored at `key`, copied out, or `nil`.
    func get(_ db: Database, _ key: [UInt8]) throws(StoreError) -> [UInt8]?
    /// Runs `body` with a cursor over `db`; the cursor closes when it returns.
    func withCursor<R>(_ db: Database, _ body: (inout Cursor) throws -> R) throws -> R
    /// Number of entries in `db`.
    func count(_ db: Database) throws(StoreError) -> Int
    /// Bytes of the pages `db` occupies (`mdb_stat`).
    func storedBytes(_ db: Database) throws(StoreError) -> Int
}

extension StoreReading where Self: ~Copyable {
    /// Every value of `key` in a `duplicateSort` database, as text, in order.
    public func duplicateValues(_ db: Database, _ key: [UInt8]) throws -> [String] {
        try withCursor(db) { cursor in
            var values: [String] = []
            var entry = try cursor.seek(exactly: key)
            while let e = entry {
                values.append(String(decoding: e.value, as: UTF8.self))
                entry = try cursor.nextDuplicate()
            }
            return values
        }
    }

    /// Visits entries with `start <= key < end` (`nil` = unbounded) in key
    /// order, or in reverse; `body` returns `false` to stop early.
    public func scan(
        _ db: Database, from start: [UInt8]? = nil, to end: [UInt8]? = nil, reverse: Bool = false,
        _ body: ([UInt8], [UInt8]) throws -> Bool
    ) throws {
        try withCursor(db) { cursor in
            var entry: (key: [UInt8], value: [UInt8])?
            if reverse {
                if let end {
                    entry = try cursor.seek(atLeast: end)
                    entry = entry == nil ? try cursor.last() : try cursor.previous()
                } else {
                    entry = try cursor.last()
                }
            } else {
                entry = try start.map { k throws(StoreError) in try cursor.seek(atLeast: k) } ?? cursor.first()
            }
            while let e = entry {
                if !reverse, let end, !lexicographicallyLess(e.key, end) { break }
                if reverse, let start, lexicographicallyLess(e.key, start) { break }
                guard try body(e.key, e.value) else { break }
                entry = reverse ? try cursor.previous() : try cursor.next()
            }
        }
    }
}

extension StoreReading where Self: ~Copyable {
    /// Like `scan`, keys only: the values are never copied out, so walking
    /// keys costs a cursor step each, whatever the values' size.
    public func scanKeys(
        _ db: Database, from start: [UInt8]? = nil, to end: [UInt8]? = nil, reverse: Bool = false,
        _ body: ([UInt8]) throws -> Bool
    ) throws {
        try withCursor(db) { cursor in
            var key: [UInt8]?
            if reverse {
                if let end {
                    key = try cursor.seekKey(atLeast: end)
                    key = key == nil ? try cursor.lastKey() : try cursor.previousKey()
                } else {
                    key = try cursor.lastKey()
                }
            } else {
                key = try start.map { k throws(StoreError) in try cursor.seekKey(atLeast: k) } ?? cursor.firstKey()
            }
            while let k = key {
                if !reverse, let end, !lexicographicallyLess(k, end) { break }
                if reverse, let start, lexicographicallyLess(k, start) { break }
                guard try body(k) else { break }
                key = reverse ? try cursor.previousKey() : try cursor.nextKey()
            }
        }
    }
}

@inline(__always)
func lexicographicallyLess(_ a: [UInt8], _ b: [UInt8]) -> Bool {
    a.lexicographicallyPrecedes(b)
}

/// Borrows `bytes` as an `MDB_val` for the duration of `body`.
@inline(__always)
func withValue<R>(_ bytes: [UInt8], _ body: (inout MDB_val) throws -> R) rethrows -> R {
    try bytes.withUnsafeBufferPointer { buf in
        var val = MDB_val(mv_size: buf.count, mv_data: UnsafeMutableRawPointer(mutating: buf.baseAddress))
        return try body(&val)
    }
}

@inline(__always)
func copyOut(_ val: MDB_val) -> [UInt8] {
    guard val.mv_size > 0, let p = val.mv_data else { return [] }
    return Array(UnsafeRawBufferPointer(start: p, count: val.mv_size))
}

func txnGet(_ txn: OpaquePointer, _ db: Database, _ key: [UInt8]) throws(StoreError) -> [UInt8]? {
    var out = MDB_val()
    let rc = withValue(key) { k in mdb_get(txn, db.dbi, &k, &out) }
    if rc == MDB_NOTFOUND { return nil }
    try check(rc)
    return copyOut(out)
}

func txnCursor<R>(_ txn: OpaquePointer, _ db: Database, _ body: (inout Cursor) throws -> R) throws -> R {
    var cur: OpaquePointer?
    try check(mdb_cursor_open(txn, db.dbi, &cur))
    guard let cur else { throw StoreError.badTransaction }
    var cursor = Cursor(cursor: cur)
    defer { mdb_cursor_close(cur) }
    return try body(&cursor)
}

func txnStoredBytes(_ txn: OpaquePointer, _ db: Database) throws(StoreError) -> Int {
    var stat = MDB_stat()
    try check(mdb_stat(txn, db.dbi, &stat))
    return Int(stat.ms_psize) * (stat.ms_branch_pages + stat.ms_leaf_pages + stat.ms_overflow_pages)
}

func txnCount(_ txn: OpaquePointer, _ db: Database) throws(StoreError) -> Int {
    var stat = MDB_stat()
    try check(mdb_stat(txn, db.dbi, &stat))
    return Int(stat.ms_entries)
}

/// A read-only snapshot (`mdb_txn_begin` with `MDB_RDONLY`). Ends (aborts)
/// when it goes out of scope; never waits for writers.
public struct ReadTransaction: ~Copyable, StoreReading {
    let txn: OpaquePointer
    /// Unmanaged so that `commit` can `discard self`; the environment outlives
    /// its transactions (LMDB's rule for `mdb_env_close`).
    let environmentRef: Unmanaged<Environment>
    var environment: Environment { environmentRef.takeUnretainedValue() }

    init(txn: OpaquePointer, environment: Environment) {
        self.txn = txn
        self.environmentRef = .passUnretained(environment)
    }

    deinit {
        mdb_txn_abort(txn)
        environment.releaseTransactionLock()
    }

    /// Ends the snapshot keeping database handles it opened (`mdb_txn_commit`
    /// on a read-only transaction).
    consuming func commit() throws(StoreError) {
        let txn = self.txn
        let environment = self.environment
        discard self
        let rc = mdb_txn_commit(txn)
        environment.releaseTransactionLock()
        try check(rc)
    }

    public func get(_ db: Database, _ key: [UInt8]) throws(StoreError) -> [UInt8]? { try txnGet(txn, db, key) }
    public func withCursor<R>(_ db: Database, _ body: (inout Cursor) throws -> R) throws -> R {
        try txnCursor(txn, db, body)
    }
    public func count(_ db: Database) throws(StoreError) -> Int { try txnCount(txn, db) }
    public func storedBytes(_ db: Database) throws(StoreError) -> Int { try txnStoredBytes(txn, db) }
}

/// How `put` treats an existing key.
public struct PutFlags: OptionSet, Sendable {
    public let rawValue: UInt32
    public init(rawValue: UInt32) { self.rawValue = rawValue }
    /// Fail with `.keyExists` instead of overwriting (`MDB_NOOVERWRITE`).
    public static let noOverwrite = PutFlags(rawValue: UInt32(MDB_NOOVERWRITE))
    /// Keys arrive in ascending order (`MDB_APPEND`): fast bulk loads.
    public static let append = PutFlags(rawValue: UInt32(MDB_APPEND))
}

/// A write transaction, or a nested one. Single owner: `commit()` consumes
/// it; dropping it aborts. Must be used on the thread that began it.
public struct WriteTransaction: ~Copyable, StoreReading {
    let txn: OpaquePointer
    /// See `ReadTransaction.environmentRef`.
    let environmentRef: Unmanaged<Environment>
    var environment: Environment { environmentRef.takeUnretainedValue() }
    /// Top-level transactions hold the environment's resize lock; nested ones
    /// run under their parent's.
    let ownsLock: Bool

    init(txn: OpaquePointer, environment: Environment, ownsLock: Bool) {
        self.txn = txn
        self.environmentRef = .passUnretained(environment)
        self.ownsLock = ownsLock
    }

    deinit {
        mdb_txn_abort(txn)
        if ownsLock { environment.releaseTransactionLock() }
    }

    /// Commits durably: when this returns, the transaction survives a crash
    /// or power loss. LMDB frees the transaction even when the commit fails,
    /// so nothing is aborted afterwards (no double free).
    public consuming func commit() throws(StoreError) {
        let environment = self.environment
        let topLevel = ownsLock
        try commitDeferringFlush()
        if topLevel { try environment.flush() }
    }

    /// Commits with the data pages synced but the meta page not yet flushed:
    /// atomic and consistent now, durable after the next `Environment.flush()`.
    consuming func commitDeferringFlush() throws(StoreError) {
        let txn = self.txn
        let environment = self.environment
        let ownsLock = self.ownsLock
        discard self
        let rc = mdb_txn_commit(txn)
        if ownsLock {
            if rc == 0 { environment.committedTopLevel() }
            environment.releaseTransactionLock()
        }
        try check(rc)
    }

    /// Ends the transaction without writing anything.
    public consuming func abort() {
        // deinit aborts
    }

    public func get(_ db: Database, _ key: [UInt8]) throws(StoreError) -> [UInt8]? { try txnGet(txn, db, key) }
    public func withCursor<R>(_ db: Database, _ body: (inout Cursor) throws -> R) throws -> R {
        try txnCursor(txn, db, body)
    }
    public func count(_ db: Database) throws(StoreError) -> Int { try txnCount(txn, db) }
    public func storedBytes(_ db: Database) throws(StoreError) -> Int { try txnStoredBytes(txn, db) }

    public func put(_ db: Database, _ key: [UInt8], _ value: [UInt8], flags: PutFlags = []) throws(StoreError) {
        let rc = withValue(key) { k in withValue(value) { v in mdb_put(txn, db.dbi, &k, &v, flags.rawValue) } }
        try check(rc)
        environment.writesInTransaction.add(1, ordering: .relaxed)
    }

    /// Deletes `key`; returns whether it existed.
    @discardableResult
    public func delete(_ db: Database, _ key: [UInt8]) throws(StoreError) -> Bool {
        let rc = withValue(key) { k in mdb_del(txn, db.dbi, &k, nil) }
        if rc == MDB_NOTFOUND { return false }
        try check(rc)
        environment.writesInTransaction.add(1, ordering: .relaxed)
        return true
    }

    /// Deletes one value of a `duplicateSort` key; returns whether it existed.
    @discardableResult
    public func delete(_ db: Database, _ key: [UInt8], value: [UInt8]) throws(StoreError) -> Bool {
        let rc = withValue(key) { k in withValue(value) { v in mdb_del(txn, db.dbi, &k, &v) } }
        if rc == MDB_NOTFOUND { return false }
        try check(rc)
        environment.writesInTransaction.add(1, ordering: .relaxed)
        return true
    }

    /// Deletes every entry of `db`, keeping the database.
    public func clear(_ db: Database) throws(StoreError) {
        try check(mdb_drop(txn, db.dbi, 0))
    }

    /// Runs `body` in a nested transaction: its writes become part of this
    /// transaction if it returns, and are undone if it throws, leaving this
    /// transaction usable.
    public func nested<R>(_ body: (borrowing WriteTransaction) throws -> R) throws -> R {
        var child: OpaquePointer?
        try check(mdb_txn_begin(environment.env, txn, 0, &child))
        guard let child else { throw StoreError.badTransaction }
        let sub = WriteTransaction(txn: child, environment: environment, ownsLock: false)
        let result = try body(sub)
        try sub.commitDeferringFlush()  // a nested commit only merges into its parent
        return result
    }
}

/// A cursor over one database, valid only inside `withCursor`. Each step
/// copies the entry out.
public struct Cursor: ~Copyable {
    let cursor: OpaquePointer

    /// One `mdb_cursor_get`: the entry's key and value as LMDB holds them
    /// (valid until the next step or the transaction's end), nil at the end.
    private func rawStep(_ op: MDB_cursor_op, key: [UInt8]?) throws(StoreError) -> (MDB_val, MDB_val)? {
        var k = MDB_val()
        var v = MDB_val()
        let rc: Int32
        if let key {
            rc = withValue(key) { kv in
                k = kv
                return mdb_cursor_get(cursor, &k, &v, op)
            }
        } else {
            rc = mdb_cursor_get(cursor, &k, &v, op)
        }
        if rc == MDB_NOTFOUND { return nil }
        try check(rc)
        return (k, v)
    }

    private func step(_ op: MDB_cursor_op, key: [UInt8]? = nil) throws(StoreError) -> (key: [UInt8], value: [UInt8])? {
        guard let (k, v) = try rawStep(op, key: key) else { return nil }
        return (copyOut(k), copyOut(v))
    }

    /// A step that copies out the key only (the value stays in the map).
    private func stepKey(_ op: MDB_cursor_op, key: [UInt8]? = nil) throws(StoreError) -> [UInt8]? {
        guard let (k, _) = try rawStep(op, key: key) else { return nil }
        return copyOut(k)
    }

    public mutating func firstKey() throws(StoreError) -> [UInt8]? { try stepKey(MDB_FIRST) }
    public mutating func lastKey() throws(StoreError) -> [UInt8]? { try stepKey(MDB_LAST) }
    public mutating func nextKey() throws(StoreError) -> [UInt8]? { try stepKey(MDB_NEXT) }
    public mutating func previousKey() throws(StoreError) -> [UInt8]? { try stepKey(MDB_PREV) }
    public mutating func seekKey(atLeast key: [UInt8]) throws(StoreError) -> [UInt8]? { try stepKey(MDB_SET_RANGE, key: key) }

    public mutating func first() throws(StoreError) -> (key: [UInt8], value: [UInt8])? { try step(MDB_FIRST) }
    public mutating func last() throws(StoreError) -> (key: [UInt8], value: [UInt8])? { try step(MDB_LAST) }
    public mutating func next() throws(StoreError) -> (key: [UInt8], value: [UInt8])? { try step(MDB_NEXT) }
    public mutating func previous() throws(StoreError) -> (key: [UInt8], value: [UInt8])? { try step(MDB_PREV) }
    /// Positions at the first key `>= key`.
    public mutating func seek(atLeast key: [UInt8]) throws(StoreError) -> (key: [UInt8], value: [UInt8])? {
        try step(MDB_SET_RANGE, key: key)
    }
    /// Positions at exactly `key`.
    public mutating func seek(exactly key: [UInt8]) throws(StoreError) -> (key: [UInt8], value: [UInt8])? {
        try step(MDB_SET_KEY, key: key)
    }
    /// The values of the current key of a `duplicateSort` database, one by one.
    public mutating func nextDuplicate() throws(StoreError) -> (key: [UInt8], value: [UInt8])? { try step(MDB_NEXT_DUP) }
}

extension FixedWidthInteger {
    /// The integer as big-endian bytes: such keys sort numerically in LMDB's
    /// default (memcmp) order, which is what the outbox relies on.
    /// (Inlinable, so that callers in other modules get it specialised for
    /// their integer type: generic shifts cost dozens of calls per byte.)
    @inlinable
    public var bigEndianBytes: [UInt8] {
        withUnsafeBytes(of: self.bigEndian) { Array($0) }
    }

    /// Reads a big-endian key; `nil` if the length is wrong.
    @inlinable
    public init?(bigEndianBytes bytes: [UInt8]) {
        guard bytes.count == MemoryLayout<Self>.size else { return nil }
        var v: Self = 0
        for b in bytes { v = (v << 8) | Self(b) }
        self = v
    }
}
