internal import CLMDB

/// Every return code of LMDB as a Swift error, plus the store's own conditions.
///
/// The corresponding C constants are `MDB_KEYEXIST` … `MDB_BAD_DBI` and the
/// `errno` values LMDB passes through (disk full, permission denied, …).
public enum StoreError: Error, Equatable, CustomStringConvertible, Sendable {
    case keyExists
    case notFound
    case pageNotFound
    case corrupted
    case panic
    case versionMismatch
    case invalid
    /// The map is full; `Environment` grows it and retries, so callers only
    /// see `storeFull` once the configured cap is reached.
    case mapFull
    case databasesFull
    case readersFull
    case threadLocalStorageFull
    case transactionFull
    case cursorStackFull
    case pageFull
    case mapResized
    case incompatible
    case badReaderSlot
    case badTransaction
    case badValueSize
    case badDatabase
    /// An operating-system error code passed through by LMDB (`ENOSPC`, `EACCES`, …).
    case system(Int32)
    /// The map reached its configured maximum size and cannot grow further.
    case storeFull(limitBytes: Int)
    /// A database name that was never opened.
    case unknownDatabase(String)

    init(code: Int32) {
        switch code {
        case MDB_KEYEXIST: self = .keyExists
        case MDB_NOTFOUND: self = .notFound
        case MDB_PAGE_NOTFOUND: self = .pageNotFound
        case MDB_CORRUPTED: self = .corrupted
        case MDB_PANIC: self = .panic
        case MDB_VERSION_MISMATCH: self = .versionMismatch
        case MDB_INVALID: self = .invalid
        case MDB_MAP_FULL: self = .mapFull
        case MDB_DBS_FULL: self = .databasesFull
        case MDB_READERS_FULL: self = .readersFull
        case MDB_TLS_FULL: self = .threadLocalStorageFull
        case MDB_TXN_FULL: self = .transactionFull
        case MDB_CURSOR_FULL: self = .cursorStackFull
        case MDB_PAGE_FULL: self = .pageFull
        case MDB_MAP_RESIZED: self = .mapResized
        case MDB_INCOMPATIBLE: self = .incompatible
        case MDB_BAD_RSLOT: self = .badReaderSlot
        case MDB_BAD_TXN: self = .badTransaction
        case MDB_BAD_VALSIZE: self = .badValueSize
        case MDB_BAD_DBI: self = .badDatabase
        default: self = .system(code)
        }
    }

    public var description: String {
        switch self {
        case .storeFull(let limit): return "store full: the LMDB map reached its cap of \(limit) bytes"
        case .unknownDatabase(let name): return "unknown database '\(name)'"
        case .system(let code): return "LMDB: \(String(cString: mdb_strerror(code)))"
        default: return "LMDB: \(String(cString: mdb_strerror(code)))"
        }
    }

    var code: Int32 {
        switch self {
        case .keyExists: return MDB_KEYEXIST
        case .notFound: return MDB_NOTFOUND
        case .pageNotFound: return MDB_PAGE_NOTFOUND
        case .corrupted: return MDB_CORRUPTED
        case .panic: return MDB_PANIC
        case .versionMismatch: return MDB_VERSION_MISMATCH
        case .invalid: return MDB_INVALID
        case .mapFull: return MDB_MAP_FULL
        case .databasesFull: return MDB_DBS_FULL
        case .readersFull: return MDB_READERS_FULL
        case .threadLocalStorageFull: return MDB_TLS_FULL
        case .transactionFull: return MDB_TXN_FULL
        case .cursorStackFull: return MDB_CURSOR_FULL
        case .pageFull: return MDB_PAGE_FULL
        case .mapResized: return MDB_MAP_RESIZED
        case .incompatible: return MDB_INCOMPATIBLE
        case .badReaderSlot: return MDB_BAD_RSLOT
        case .badTransaction: return MDB_BAD_TXN
        case .badValueSize: return MDB_BAD_VALSIZE
        case .badDatabase: return MDB_BAD_DBI
        case .system(let c): return c
        case .storeFull, .unknownDatabase: return 0
        }
    }
}

/// The one C-call helper for LMDB: maps a return code to a typed error.
@inline(__always)
func check(_ rc: Int32) throws(StoreError) {
    if rc != 0 { throw StoreError(code: rc) }
}
