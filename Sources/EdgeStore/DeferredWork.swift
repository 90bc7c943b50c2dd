import EdgeLoop

/// Work a rare transition leaves for later, so that the transaction that
/// acknowledges it stays O(1) whatever is stored: the member index entries
/// of a group removed with a million members, say. Each piece of work is
/// one key under `prefix` in `db` (the rest of the key names it, the value
/// is where it goes on from), written in the transition's own transaction;
/// later transactions each do a bounded chunk of it (`deleteRange`) and
/// remove the key when none is left. Durable: a crash between two chunks
/// leaves the key, and the work goes on after a restart. Readers must not
/// see what is left meanwhile (the caller's: a removed group's entries are
/// skipped because the group is gone).
public struct DeferredWork: Sendable {
    public let db: Database
    public let prefix: [UInt8]

    public init(_ db: Database, prefix: String) {
        self.db = db
        self.prefix = Array(prefix.utf8)
    }

    /// Just past every key under `prefix` (its last byte + 1).
    var end: [UInt8] { Array(prefix.dropLast()) + [prefix.last! + 1] }

    public func add(_ name: [UInt8], _ value: [UInt8], _ txn: borrowing WriteTransaction) throws {
        try txn.put(db, prefix + name, value)
    }

    public func remove(_ name: [UInt8], _ txn: borrowing WriteTransaction) throws {
        _ = try txn.delete(db, prefix + name)
    }

    /// Where the work `name` goes on from, if it is under way.
    public func value(_ name: [UInt8], _ txn: borrowing some StoreReading & ~Copyable) throws -> [UInt8]? {
        try txn.get(db, prefix + name)
    }

    /// The first piece of work left (its name and value), if any.
    public func first(_ txn: borrowing some StoreReading & ~Copyable) throws -> (name: [UInt8], value: [UInt8])? {
        var out: (name: [UInt8], value: [UInt8])?
        let n = prefix.count
        try txn.scan(db, from: prefix, to: end) { k, v in
            out = (Array(k[n...]), v)
            return false
        }
        return out
    }

    /// How many pieces of work are left (a key walk).
    public func count(_ txn: borrowing some StoreReading & ~Copyable) throws -> Int {
        var n = 0
        try txn.scanKeys(db, from: prefix, to: end) { _ in
            n += 1
            return true
        }
        return n
    }
}

extension WriteTransaction {
    /// Deletes up to `limit` keys with `from <= key < to` in `db`, calling
    /// `each` with each key first (to remove what points at it). Returns
    /// how many went: fewer than `limit` means the range is now empty.
    public func deleteRange(
        _ db: Database, from: [UInt8], to: [UInt8], limit: Int, _ each: ([UInt8]) throws -> Void = { _ in }
    ) throws -> Int {
        var keys: [[UInt8]] = []
        try scanKeys(db, from: from, to: to) { k in
            keys.append(k)
            return keys.count < limit
        }
        for k in keys {
            try each(k)
            _ = try delete(db, k)
        }
        return keys.count
    }

    /// Whether `db` holds a key with `from <= key < to` (one cursor step).
    public func holdsAny(_ db: Database, from: [UInt8], to: [UInt8]) throws -> Bool {
        var any = false
        try scanKeys(db, from: from, to: to) { _ in
            any = true
            return false
        }
        return any
    }
}

/// Runs deferred work in the background: a step (at most `weight` entries,
/// one write transaction through the group-commit writer) after another
/// while the step says it did something, then again at the next `poke()`
/// when `pending()` (a read) finds work left. At most one step is under
/// way. `done` runs on the loop after each committed step with what it did
/// (counters, waking whoever the step queued work for). Loop-confined.
public final class DeferredWorkRunner<Progress: Sendable> {
    private let writer: GroupCommitWriter
    private let weight: Int
    private let pending: () -> Bool
    private let step: WriteOperation<Progress>
    private let didSomething: (Progress) -> Bool
    private let done: (Progress) -> Void
    private var running = false
    private var timer: LoopTimer?

    /// `ownTimer`: poke every second on `loop` (else the caller pokes).
    public init(
        writer: GroupCommitWriter, loop: EventLoop, ownTimer: Bool, weight: Int, pending: @escaping () -> Bool,
        step: @escaping WriteOperation<Progress>, didSomething: @escaping (Progress) -> Bool, done: @escaping (Progress) -> Void
    ) throws {
        (self.writer, self.weight, self.pending, self.step, self.didSomething, self.done) =
            (writer, weight, pending, step, didSomething, done)
        guard ownTimer else { return }
        let t = try LoopTimer(loop: loop)
        t.keepsLoopAlive = false
        timer = t
        t.start(after: 1000, repeatEvery: 1000) { [weak self] in self?.poke() }
    }

    /// Starts stepping if work is left and no step is under way.
    public func poke() {
        guard !running, pending() else { return }
        next()
    }

    private func next() {
        running = true
        writer.submit(step, weight: weight) { [weak self] r in
            guard let self else { return }
            running = false
            guard case .success(let progress) = r else { return }
            done(progress)
            if didSomething(progress) { next() }
        }
    }

    public func stop() {
        timer?.close()
        timer = nil
    }
}
