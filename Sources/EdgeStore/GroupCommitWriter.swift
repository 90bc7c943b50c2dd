/// Runs `work` on a worker thread, then `completion` back on the caller's
/// event-loop thread. `EventLoop.offload` (EdgeLoop) has this shape.
public typealias Offload = (_ work: @escaping @Sendable () -> Void, _ completion: @escaping () -> Void) -> Void

/// One write operation: runs inside its own nested transaction, so an error
/// undoes only its own changes.
public typealias WriteOperation<T> = @Sendable (borrowing WriteTransaction) throws -> T

/// Group commit: many callers' writes in one transaction and one fsync.
///
/// Callers on the event loop `submit` write closures. While no batch is being
/// committed, the next submission starts one at once; while one is, the
/// submissions that arrive meanwhile wait and form the next batch. A batch runs
/// on a worker (never blocking the loop): one transaction, one durable
/// commit. Then its callers are completed on the loop, each with its own
/// result (acknowledged means durable), and only after all of them ran does
/// the next batch start, so writers that resubmit from their completion join
/// one batch instead of splitting into alternating small ones. A failing
/// closure fails only itself.
///
/// Threading: loop-confined (not `Sendable`); only `WriteBatch` crosses to the worker.
public final class GroupCommitWriter {
    public struct Statistics: Sendable {
        public var batches = 0
        public var writes = 0
        public var failedWrites = 0
        public var largestBatch = 0
    }

    public let environment: Environment
    private let offload: Offload
    private let maxBatch: Int
    private var pending: [PendingWrite] = []
    private var committing = false
    public private(set) var statistics = Statistics()

    /// Writes waiting for the next batch, plus those being committed.
    public var queuedWrites: Int { pending.count }
    public var isCommitting: Bool { committing }

    public init(environment: Environment, maxBatch: Int = 1024, offload: @escaping Offload) {
        self.environment = environment
        self.maxBatch = maxBatch
        self.offload = offload
    }

    /// Queues `operation`; `completion` runs on the loop after the batch
    /// holding it committed durably (success) or with this write's own error.
    public func submit<T: Sendable>(_ operation: @escaping WriteOperation<T>,
                                    completion: @escaping (Result<T, any Error>) -> Void) {
        let box = ResultBox<T>()
        let write = PendingWrite(apply: { txn in box.value = try operation(txn) },
                                 complete: { error in
                                     if let error { completion(.failure(error)) }
                                     else if let value = box.value { completion(.success(value)) }
                                     else { completion(.failure(StoreError.badTransaction)) }
                                 })
        pending.append(write)
        startBatchIfIdle()
    }

    private func startBatchIfIdle() {
        guard !committing, !pending.isEmpty else { return }
        let take = min(pending.count, maxBatch)
        let batch = WriteBatch(writes: Array(pending.prefix(take)))
        pending.removeFirst(take)
        committing = true
        let environment = self.environment
        offload({ batch.run(in: environment) }, { [self] in
            statistics.batches += 1
            statistics.writes += batch.writes.count
            statistics.largestBatch = max(statistics.largestBatch, batch.writes.count)
            // Still `committing` while callers run: their resubmissions queue up.
            completeAll(batch)
            committing = false
            startBatchIfIdle()
        })
    }

    private func completeAll(_ batch: WriteBatch) {
        for write in batch.writes {
            if write.error != nil { statistics.failedWrites += 1 }
            write.complete(write.error)
        }
    }
}

/// Holds one write's result between the worker and the loop. Written on the
/// worker before the batch's completion is scheduled, read on the loop after:
/// the offload hand-over orders the two, so no lock is needed.
final class ResultBox<T>: @unchecked Sendable {
    var value: T?
}

/// See `ResultBox` for why crossing threads is safe: `apply` and `error` are
/// used by the worker only while the loop does not look, `complete` only on the loop.
final class PendingWrite: @unchecked Sendable {
    let apply: @Sendable (borrowing WriteTransaction) throws -> Void
    let complete: (Error?) -> Void
    var error: (any Error)?
    var settled = false

    init(apply: @escaping @Sendable (borrowing WriteTransaction) throws -> Void, complete: @escaping (Error?) -> Void) {
        self.apply = apply
        self.complete = complete
    }
}

/// A batch in flight; see `PendingWrite` for the threading argument.
final class WriteBatch: @unchecked Sendable {
    let writes: [PendingWrite]
    init(writes: [PendingWrite]) { self.writes = writes }

    /// Applies every write in one transaction and commits once.
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
                try txn.commit()
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
