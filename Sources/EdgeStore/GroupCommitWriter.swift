import EdgeLoop
import Glibc

/// One write operation: runs inside its own nested transaction, so an error
/// undoes only its own changes.
public typealias WriteOperation<T> = @Sendable (borrowing WriteTransaction) throws -> T

/// Group commit: many callers' writes in one transaction and one fsync.
///
/// Callers on any event loop `submit` write closures. A writer thread takes
/// every write waiting, applies them in one transaction, commits it with its
/// data pages synced and flushes its meta page; then it answers the batch's
/// callers (on their loops: acknowledged means durable) and takes the next
/// batch at once, the writes that arrived meanwhile. No event loop sits
/// between two batches. Completions come in commit order; a failing closure
/// fails only itself.
///
/// Threading: `submit` on any loop's thread, naming that loop's inbox;
/// completions run there, and the loop keeps running until they have.
public final class GroupCommitWriter: Sendable {
    public struct Statistics: Sendable {
        public var batches = 0
        public var writes = 0
        public var failedWrites = 0
        public var largestBatch = 0
        /// The largest sum of the weights of one batch's writes.
        public var heaviestBatch = 0
        /// Flushes (meta-page syncs): one per batch.
        public var flushes = 0
    }

    public let environment: Environment
    private let core: WriterCore
    private let inbox: LoopInbox

    /// `inbox`: the loop of callers that name none of their own. A batch
    /// takes at most `maxBatch` writes and, past its first write, at most
    /// `maxWeight` of their weights (`submit(weight:)`): a transaction's
    /// dirty pages, which LMDB holds in memory until the commit, stay bounded
    /// however many large writes wait.
    public init(environment: Environment, maxBatch: Int = 1024, maxWeight: Int = .max, inbox: LoopInbox) {
        self.environment = environment
        self.inbox = inbox
        core = WriterCore(environment: environment, maxBatch: maxBatch, maxWeight: maxWeight)
        core.start()
    }

    deinit { core.stop() }

    /// Queues `operation`; `completion` runs on the caller's loop (`inbox`,
    /// or the writer's own; called on that loop's thread) after the batch
    /// holding it committed durably (success) or with this write's own error.
    /// `weight`: about how many keys the write changes (see `init`).
    public func submit<T: Sendable>(
        _ operation: @escaping WriteOperation<T>, weight: Int = 1, inbox: LoopInbox? = nil,
        completion: @escaping (Result<T, any Error>) -> Void
    ) {
        let inbox = inbox ?? self.inbox
        inbox.hold()
        let box = ResultBox<T>()
        let write = PendingWrite(
            apply: { txn in box.value = try operation(txn) },
            complete: { error in
                inbox.release()
                if let error {
                    completion(.failure(error))
                } else if let value = box.value {
                    completion(.success(value))
                } else {
                    completion(.failure(StoreError.badTransaction))
                }
            }, inbox: inbox, weight: weight)
        core.enqueue(write)
    }

    /// Writes not yet answered: waiting for a batch, being committed, or
    /// waiting for the flush that makes them durable.
    public var queuedWrites: Int { core.locked { $0.queued } }
    public var statistics: Statistics { core.locked { $0.statistics } }
}

/// The writer thread's state, shared with submitters under one mutex.
final class WriterCore: @unchecked Sendable {  // every field below is used under `mutex` only
    struct State {
        var pending: [PendingWrite] = []
        var queued = 0
        var stopping = false
        /// Completion jobs running on loops: their callers' resubmissions
        /// wait for the job's end to wake the writer, so they form one batch.
        var completing = 0
        var statistics = GroupCommitWriter.Statistics()
    }

    let environment: Environment
    let maxBatch: Int
    let maxWeight: Int
    private var state = State()
    private let mutex = UnsafeMutablePointer<pthread_mutex_t>.allocate(capacity: 1)
    private let work = UnsafeMutablePointer<pthread_cond_t>.allocate(capacity: 1)

    init(environment: Environment, maxBatch: Int, maxWeight: Int) {
        self.environment = environment
        self.maxBatch = maxBatch
        self.maxWeight = maxWeight
        pthread_mutex_init(mutex, nil)
        pthread_cond_init(work, nil)
    }

    deinit {
        pthread_mutex_destroy(mutex); mutex.deallocate()
        pthread_cond_destroy(work); work.deallocate()
    }

    func locked<R>(_ body: (inout State) -> R) -> R {
        pthread_mutex_lock(mutex)
        defer { pthread_mutex_unlock(mutex) }
        return body(&state)
    }

    func start() {
        startDetachedThread("the group-commit thread") { [self] in writerLoop() }
    }

    /// The thread finishes what is queued, then ends.
    func stop() {
        locked { $0.stopping = true }
        pthread_cond_signal(work)
    }

    func enqueue(_ write: PendingWrite) {
        let wake = locked {
            $0.pending.append(write)
            $0.queued += 1
            return $0.completing == 0
        }
        if wake { pthread_cond_signal(work) }
    }

    /// A completion job ended: wake the writer for what its callers submitted.
    func endCompletions() {
        let wake = locked {
            $0.completing -= 1
            return $0.completing == 0 && !$0.pending.isEmpty
        }
        if wake { pthread_cond_signal(work) }
    }

    /// Batches back to back: each is applied in one transaction, committed
    /// with its data pages synced (`MDB_NOMETASYNC`), flushed so that its meta
    /// page is durable too, and only then answered.
    ///
    /// Leaving the flush to the next commit's data sync would save a sync per
    /// batch, but every write would then wait for a whole extra commit, and
    /// with a bounded number of clients that splits them over two batches in
    /// flight: measured smaller batches and about 8 % fewer POST /Users per
    /// second. A batch that committed nothing is flushed as well: its answers
    /// may rest on another thread's commit that is not flushed yet, and a sync
    /// with nothing to write is cheap.
    private func writerLoop() {
        pthread_mutex_lock(mutex)
        while true {
            while state.pending.isEmpty && !state.stopping { pthread_cond_wait(work, mutex) }
            guard !state.pending.isEmpty else { break }  // stopping, nothing left
            var take = 1, weight = state.pending[0].weight
            while take < min(state.pending.count, maxBatch), state.pending[take].weight <= maxWeight - weight {
                weight += state.pending[take].weight
                take += 1
            }
            let batch = WriteBatch(writes: Array(state.pending.prefix(take)))
            state.pending.removeFirst(take)
            state.statistics.batches += 1
            state.statistics.writes += take
            state.statistics.largestBatch = max(state.statistics.largestBatch, take)
            state.statistics.heaviestBatch = max(state.statistics.heaviestBatch, weight)
            pthread_mutex_unlock(mutex)
            batch.run(in: environment)
            acknowledge(batch, flushError: flush())
            pthread_mutex_lock(mutex)
        }
        pthread_mutex_unlock(mutex)
    }

    private func flush() -> (any Error)? {
        locked { $0.statistics.flushes += 1 }
        do { try environment.flush() } catch { return error }
        return nil
    }

    /// Posts each write's completion to its loop (called without the mutex).
    private func acknowledge(_ batch: WriteBatch, flushError: (any Error)?) {
        var failed = 0, answered = 0
        // One job per loop, completing its writes in commit order.
        var groups: [(LoopInbox, [(PendingWrite, (any Error)?)])] = []
        for write in batch.writes {
            // Committed but not known durable: the caller must not take it as acknowledged.
            let error = write.error ?? flushError
            if error != nil { failed += 1 }
            answered += 1
            if let k = groups.firstIndex(where: { $0.0 === write.inbox }) {
                groups[k].1.append((write, error))
            } else {
                groups.append((write.inbox, [(write, error)]))
            }
        }
        locked {
            $0.statistics.failedWrites += failed
            $0.queued -= answered
            $0.completing += groups.count
        }
        for (inbox, writes) in groups {
            let job = CompletionJob(writes)
            let sent = inbox.send { [self] in
                job.run()
                endCompletions()
            }
            if !sent { endCompletions() }  // the loop is gone: nobody to answer
        }
    }
}

/// The completions of one batch for one loop; run there (see `ResultBox`).
final class CompletionJob: @unchecked Sendable {
    let writes: [(PendingWrite, (any Error)?)]
    init(_ writes: [(PendingWrite, (any Error)?)]) { self.writes = writes }
    func run() { for (write, error) in writes { write.complete(error) } }
}

/// Holds one write's result between the writer thread and the loop. Written
/// on the writer before the completion is posted, read on the loop after:
/// the post (a mutex hand-over) orders the two.
final class ResultBox<T>: @unchecked Sendable {
    var value: T?
}

/// See `ResultBox` for why crossing threads is safe: `apply` and `error` are
/// used by the writer threads only, `complete` only on the submitter's loop.
final class PendingWrite: @unchecked Sendable {
    let apply: @Sendable (borrowing WriteTransaction) throws -> Void
    let complete: (Error?) -> Void
    let inbox: LoopInbox
    let weight: Int
    var error: (any Error)?
    var settled = false

    init(
        apply: @escaping @Sendable (borrowing WriteTransaction) throws -> Void, complete: @escaping (Error?) -> Void,
        inbox: LoopInbox, weight: Int = 1
    ) {
        self.apply = apply
        self.complete = complete
        self.inbox = inbox
        self.weight = max(1, weight)
    }
}

/// A batch in flight; see `PendingWrite` for the threading argument.
final class WriteBatch: @unchecked Sendable {
    let writes: [PendingWrite]
    init(writes: [PendingWrite]) { self.writes = writes }

    /// Applies every write in one transaction and commits once, with the
    /// data pages synced; the writer flushes the meta page before answering.
    ///
    /// Optimistic isolation: writes run directly in the batch transaction.
    /// When one throws, the transaction is aborted, that write is settled with
    /// its error and the others run again. Writes are deterministic and touch
    /// nothing outside the transaction, so the outcome is the one per-write
    /// rollback would give, without LMDB's nested transactions (each
    /// allocates a 2 MB dirty list). After `maxOptimisticRetries` failures in
    /// one batch the rest run in nested transactions.
    /// On `MDB_MAP_FULL` the map grows and the batch runs again; at the cap the
    /// write that hit the limit fails with `.storeFull`.
    func run(in environment: Environment) {
        var retries = 0
        while true {
            let nested = retries >= WriteBatch.maxOptimisticRetries
            var current: PendingWrite?
            do {
                let txn = try environment.beginWrite()
                for write in writes where !write.settled {
                    current = write
                    if nested {
                        do {
                            try txn.nested { sub in try write.apply(sub) }
                            write.error = nil
                        } catch StoreError.mapFull {
                            throw StoreError.mapFull
                        } catch {
                            write.error = error
                        }
                    } else {
                        try write.apply(txn)
                        write.error = nil
                    }
                }
                current = nil
                try txn.commitDeferringFlush()
                return
            } catch StoreError.mapFull {
                do {
                    try environment.grow()
                } catch {
                    if let current {
                        current.error = error
                        current.settled = true
                    } else {
                        // The commit itself hit the cap: nothing of this batch is stored.
                        settleAll(error)
                        return
                    }
                }
            } catch {
                guard let current else {
                    // Begin or commit failed: the whole batch shares the error.
                    settleAll(error)
                    return
                }
                // This write failed: drop it and run the others again.
                current.error = error
                current.settled = true
                retries += 1
            }
        }
    }

    static let maxOptimisticRetries = 4

    private func settleAll(_ error: any Error) {
        for write in writes where !write.settled || write.error == nil {
            write.error = error
            write.settled = true
        }
    }
}
