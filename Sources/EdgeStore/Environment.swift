internal import CLMDB
import Glibc
import Synchronization

/// A named LMDB database (`MDB_dbi`). Valid for the life of its `Environment`;
/// safe to share across threads once opened (LMDB: handles are process-wide
/// after the opening transaction committed).
public struct Database: Sendable, Hashable {
    let dbi: UInt32
    public let name: String
}

/// How a named database orders and stores its keys.
public struct DatabaseFlags: OptionSet, Sendable {
    public let rawValue: UInt32
    public init(rawValue: UInt32) { self.rawValue = rawValue }
    /// Keys are native-endian unsigned integers (`MDB_INTEGERKEY`).
    public static let integerKey = DatabaseFlags(rawValue: UInt32(MDB_INTEGERKEY))
    /// Several sorted values per key (`MDB_DUPSORT`).
    public static let duplicateSort = DatabaseFlags(rawValue: UInt32(MDB_DUPSORT))
}

/// Options of an LMDB environment. Defaults suit the agent on an appliance.
public struct EnvironmentOptions: Sendable {
    /// The directory holding `data.mdb` and `lock.mdb`; created if missing.
    public var path: String
    /// Initial map size in bytes; grows by doubling on `MDB_MAP_FULL`.
    public var mapSize: Int = 64 << 20
    /// The map never grows beyond this; writes then fail with `.storeFull`.
    public var maxMapSize: Int = 16 << 30
    public var maxDatabases: Int = 32
    public var maxReaders: Int = 126
    /// Skip the fsync at commit (`MDB_NOSYNC`). Only for benchmarks and tests
    /// that measure something else: it gives up invariant 1.
    public var unsafeNoSync: Bool = false
    public init(path: String) { self.path = path }
}

/// Live figures of an environment, for status and metrics.
public struct EnvironmentInfo: Sendable {
    public var mapSize: Int
    public var usedBytes: Int
    public var pageSize: Int
    public var lastTransactionID: Int
    public var readersUsed: Int
    public var maxReaders: Int
}

/// An LMDB environment: one memory-mapped file with named databases.
///
/// Threading: LMDB environments are thread-safe, and so is this class; write
/// transactions are serialised by LMDB itself. Growing the map needs no other
/// transaction to be live in this process (LMDB's rule for
/// `mdb_env_set_mapsize`), so every transaction holds a shared `resizeLock` and
/// growth takes it exclusively.
public final class Environment: @unchecked Sendable {  // see the threading note above
    let env: OpaquePointer
    public let options: EnvironmentOptions
    private let resizeLock: UnsafeMutablePointer<pthread_rwlock_t>
    private var databasesByName: [String: Database] = [:]
    private let namesLock: UnsafeMutablePointer<pthread_mutex_t>
    /// Number of stale reader slots cleared when the environment was opened.
    public private(set) var staleReadersCleared: Int = 0
    /// Entries written (puts and deletes, nested ones included) by the write
    /// transaction under way, and the most any committed one wrote: LMDB
    /// holds a transaction's dirty pages in memory until it commits, so this
    /// says how large the heaviest commit was (tests, `/metrics`). One write
    /// transaction at a time: LMDB's writer lock orders these.
    let writesInTransaction = Atomic<Int>(0)
    private let heaviestWrites = Atomic<Int>(0)

    /// The most entries one committed write transaction wrote since the environment was opened.
    public var heaviestCommitEntries: Int { heaviestWrites.load(ordering: .relaxed) }

    /// Starts counting again (tests measure one phase).
    public func resetHeaviestCommit() { heaviestWrites.store(0, ordering: .relaxed) }

    func committedTopLevel() {
        let n = writesInTransaction.exchange(0, ordering: .relaxed)
        if n > heaviestWrites.load(ordering: .relaxed) { heaviestWrites.store(n, ordering: .relaxed) }
    }

    public init(_ options: EnvironmentOptions) throws(StoreError) {
        self.options = options
        var envp: OpaquePointer?
        try check(mdb_env_create(&envp))
        guard let envp else { throw .invalid }
        env = envp
        resizeLock = .allocate(capacity: 1)
        pthread_rwlock_init(resizeLock, nil)
        namesLock = .allocate(capacity: 1)
        pthread_mutex_init(namesLock, nil)
        // Every stored property is set: from here a throw runs `deinit`, the
        // one place that closes the environment and frees the locks.
        try check(mdb_env_set_maxdbs(env, UInt32(options.maxDatabases)))
        try check(mdb_env_set_maxreaders(env, UInt32(options.maxReaders)))
        try check(mdb_env_set_mapsize(env, options.mapSize))
        if mkdir(options.path, 0o750) != 0 && errno != EEXIST { throw StoreError.system(errno) }
        // MDB_NOMETASYNC: a commit syncs the data pages (so a crash can
        // never corrupt the file); the meta page is flushed by `flush()`,
        // which every durable commit path calls before it reports success.
        var flags = UInt32(MDB_NOTLS) | UInt32(MDB_NOMETASYNC)
        if options.unsafeNoSync { flags |= UInt32(MDB_NOSYNC) }
        try check(mdb_env_open(env, options.path, flags, 0o640))
        var dead: Int32 = 0
        try check(mdb_reader_check(env, &dead))
        staleReadersCleared = Int(dead)
        // Adopt a larger map left by an earlier run (LMDB: size 0 = adopt current).
        try check(mdb_env_set_mapsize(env, 0))
    }

    deinit {
        mdb_env_close(env)
        pthread_rwlock_destroy(resizeLock)
        resizeLock.deallocate()
        pthread_mutex_destroy(namesLock)
        namesLock.deallocate()
    }

    /// Opens (creating if needed) a named database. Call at start-up, before
    /// the handle is shared.
    public func openDatabase(_ name: String, flags: DatabaseFlags = []) throws(StoreError) -> Database {
        pthread_mutex_lock(namesLock)
        defer { pthread_mutex_unlock(namesLock) }
        if let db = databasesByName[name] { return db }
        let txn = try beginWrite()
        var dbi: MDB_dbi = 0
        try check(mdb_dbi_open(txn.txn, name, flags.rawValue | UInt32(MDB_CREATE), &dbi))
        try txn.commit()
        let db = Database(dbi: dbi, name: name)
        databasesByName[name] = db
        return db
    }

    /// Opens an existing named database read-only (for tools that inspect a
    /// running agent's file); `nil` if it does not exist.
    public func existingDatabase(_ name: String) throws(StoreError) -> Database? {
        let txn = try beginRead()
        var dbi: MDB_dbi = 0
        let rc = mdb_dbi_open(txn.txn, name, 0, &dbi)
        if rc == MDB_NOTFOUND { return nil }
        try check(rc)
        try txn.commit()  // a handle opened in a read txn is kept only if it commits
        return Database(dbi: dbi, name: name)
    }

    public func beginRead() throws(StoreError) -> ReadTransaction {
        let txn = try begin(flags: UInt32(MDB_RDONLY), parent: nil)
        return ReadTransaction(txn: txn, environment: self)
    }

    public func beginWrite() throws(StoreError) -> WriteTransaction {
        let txn = try begin(flags: 0, parent: nil)
        writesInTransaction.store(0, ordering: .relaxed)
        return WriteTransaction(txn: txn, environment: self, ownsLock: true)
    }

    private func begin(flags: UInt32, parent: OpaquePointer?) throws(StoreError) -> OpaquePointer {
        pthread_rwlock_rdlock(resizeLock)
        var txn: OpaquePointer?
        var rc = mdb_txn_begin(env, parent, flags, &txn)
        if rc == MDB_MAP_RESIZED {
            // Another process grew the map; adopt its size (no txn is live here).
            rc = mdb_env_set_mapsize(env, 0)
            if rc == 0 { rc = mdb_txn_begin(env, parent, flags, &txn) }
        }
        guard rc == 0, let txn else {
            pthread_rwlock_unlock(resizeLock)
            throw StoreError(code: rc == 0 ? MDB_BAD_TXN : rc)
        }
        return txn
    }

    func releaseTransactionLock() { pthread_rwlock_unlock(resizeLock) }

    /// Runs `body` in a read transaction.
    public func read<R>(_ body: (borrowing ReadTransaction) throws -> R) throws -> R {
        let txn = try beginRead()
        return try body(txn)
    }

    /// Runs `body` in a write transaction and commits it (durably unless
    /// `unsafeNoSync`). On `MDB_MAP_FULL` the map grows and `body` runs again,
    /// so `body` must have no effect outside the transaction.
    public func write<R>(_ body: (borrowing WriteTransaction) throws -> R) throws -> R {
        while true {
            do {
                let txn = try beginWrite()
                let result = try body(txn)
                try txn.commit()
                return result
            } catch StoreError.mapFull {
                try grow()
            }
        }
    }

    /// Doubles the map, up to `maxMapSize`. Throws `.storeFull` at the cap.
    /// No transaction of this process may be live on the calling thread.
    public func grow() throws(StoreError) {
        pthread_rwlock_wrlock(resizeLock)
        defer { pthread_rwlock_unlock(resizeLock) }
        var info = MDB_envinfo()
        try check(mdb_env_info(env, &info))
        let current = info.me_mapsize
        guard current < options.maxMapSize else { throw .storeFull(limitBytes: options.maxMapSize) }
        let next = min(current * 2, options.maxMapSize)
        try check(mdb_env_set_mapsize(env, next))
    }

    public var info: EnvironmentInfo {
        var info = MDB_envinfo()
        var stat = MDB_stat()
        mdb_env_info(env, &info)
        mdb_env_stat(env, &stat)
        let page = Int(stat.ms_psize)
        return EnvironmentInfo(
            mapSize: info.me_mapsize, usedBytes: (info.me_last_pgno + 1) * page,
            pageSize: page, lastTransactionID: info.me_last_txnid,
            readersUsed: Int(info.me_numreaders), maxReaders: Int(info.me_maxreaders))
    }

    /// Makes every commit so far durable (`mdb_env_sync` with force): the
    /// second half of a durable commit. Thread-safe; takes no LMDB lock, so a
    /// write transaction may run meanwhile (it only keeps the map from being
    /// resized under it).
    public func flush() throws(StoreError) {
        if options.unsafeNoSync { return }
        pthread_rwlock_rdlock(resizeLock)
        defer { pthread_rwlock_unlock(resizeLock) }
        try check(mdb_env_sync(env, 1))
    }

    /// Number of entries in a database.
    public func count(_ db: Database) throws(StoreError) -> Int {
        let txn = try beginRead()
        var stat = MDB_stat()
        try check(mdb_stat(txn.txn, db.dbi, &stat))
        return Int(stat.ms_entries)
    }
}
