import EdgeConfig
import EdgeHTTP
import EdgeLoop
import EdgeStore
import Glibc
import SCIM
import Synchronization

/// What became of a batch handed to the agent's loop.
enum SourceDelivery: Sendable {
    case committed(SourceBatchResult)
    /// Not written: the outbox is full or the write queue is (invariant 4); the same batch is offered again.
    case busy(String)
    /// The write failed (a store error): the source reconnects and resumes from the stored position.
    case failed(String)
    case stopped
}

/// What the source thread shares with the loop, under a mutex.
struct SourceLive: Sendable {
    var connected = false
    /// When the session connected (monotonic ms), while `connected`.
    var connectedAt: UInt64 = 0
    var mode = ""
    var lastError = ""
    var connectionFailures = 0
    /// Requests the source answered with 429 or 503 (waited out, then sent again).
    var throttled = 0
    /// Unix seconds up to which the source is known to be read, not yet stored
    /// (a persistent search that is idle); 0: none.
    var caughtUpAt: Int64 = 0
}

/// A pull source's reading side (an LDAP directory, a SCIM server): its
/// configuration and the thread it reads on.
protocol SourceReader: Sendable {
    var configuration: SourceConfiguration { get }
    var thread: SourceThread { get }
    func start()
}

extension SourceReader {
    func stop() { thread.stop() }
}

/// Thrown out of a source's reading when the agent stops it.
struct SourceStopping: Error {}

/// What every source shares: its own thread (a source's reads block, so
/// they never run on an event loop), reconnection with backoff, and the
/// handoff of each batch to the agent's loop through its inbox (`hand`),
/// waiting until the batch is committed before reading on: one batch in
/// flight, so memory stays bounded and a slow store slows the reading. The
/// position a source resumes from is always the one stored with the last
/// committed batch.
///
/// Threading: `start` and `stop` on any thread; everything else on the
/// source's thread. `Sendable`: its state is immutable or behind `Mutex`/`Atomic`.
final class SourceThread: Sendable {
    let name: String
    /// Posts a batch to the agent's loop, which fulfils the answer; false when the loop is gone.
    let submit: @Sendable (SourceBatch, OneShot<SourceDelivery>) -> Bool
    let log: @Sendable (String) -> Void
    let live = Mutex(SourceLive())
    private let stopping = Atomic<Bool>(false)
    private let stopSignal = OneShot<Bool>()
    /// Fulfilled when the thread has finished.
    let finished = OneShot<Bool>()

    init(
        name: String, submit: @escaping @Sendable (SourceBatch, OneShot<SourceDelivery>) -> Bool,
        log: @escaping @Sendable (String) -> Void
    ) {
        self.name = name
        self.submit = submit
        self.log = log
    }

    var isStopping: Bool { stopping.load(ordering: .relaxed) }

    /// Runs `body` on a new thread, then fulfils `finished`.
    func start(_ body: @escaping @Sendable () -> Void) {
        startDetachedThread("the thread of source \(name)") { [self] in
            body()
            finished.fulfil(true)
        }
    }

    /// Asks the thread to end: it notices within a second (its reads time out that often).
    func stop() {
        stopping.store(true, ordering: .relaxed)
        stopSignal.fulfil(true)
    }

    /// Waits `seconds` unless stopped meanwhile.
    func pause(_ seconds: Double) { _ = stopSignal.wait(seconds: seconds) }

    /// Runs `session` (connect, then read until an error) until stopped.
    /// After a failure it is recorded (`sources status`, metrics) and the
    /// next session waits 1 s doubling to 30 s, jittered; a session that
    /// stayed connected for a minute (`stableSessionMilliseconds`) starts
    /// the doubling again. One that failed sooner after connecting does
    /// not: a server that takes the connection and then fails the reading
    /// every time (a size limit, a page that always errs) had the whole
    /// source read again from the start about every second.
    func runSessions(_ session: () throws -> Void) {
        var attempt = 0
        while !isStopping {
            do {
                try session()
            } catch {
                guard !isStopping else { break }
                let stable = live.withLock { $0.connected && monotonicMilliseconds() - $0.connectedAt >= Self.stableSessionMilliseconds }
                if stable { attempt = 0 }
                attempt += 1
                let delay = min(30.0, Double(1 << min(attempt - 1, 5))) * (0.75 + Double(UInt32.random(in: 0...1000)) / 4000)
                live.withLock {
                    $0.connected = false
                    $0.lastError = "\(error)"
                    $0.connectionFailures += 1
                }
                log("source \(name): \(error); retrying in \(Int(delay * 1000)) ms")
                pause(delay)
            }
        }
        live.withLock { $0.connected = false }
    }

    /// How long a session must have stayed connected for its failure to start the backoff again.
    static let stableSessionMilliseconds: UInt64 = 60_000

    /// A session reached its server and reads in `mode`.
    func connected(mode: String, to url: String) {
        live.withLock {
            $0.connected = true
            $0.connectedAt = monotonicMilliseconds()
            $0.mode = mode
            $0.lastError = ""
        }
        log("source \(name): connected to \(url) (\(mode))")
    }

    /// Hands a batch over until it is committed; false when stopping.
    /// Throws when the write failed (the caller reconnects and resumes
    /// from the stored position).
    func hand(_ batch: SourceBatch) throws -> Bool {
        while !isStopping {
            switch deliver(batch) {
            case .committed: return true
            case .busy: pause(1)
            case .failed(let why): throw SourceMappingError("writing a batch failed: \(why)")
            case .stopped: return false
            }
        }
        return false
    }

    /// `hand`, throwing `SourceStopping` when stopping (from inside a listing's callback).
    func handOrStop(_ batch: SourceBatch) throws {
        guard try hand(batch) else { throw SourceStopping() }
    }

    /// One batch to the loop and its answer (waiting in steps of a second, to notice `stop`).
    private func deliver(_ batch: SourceBatch) -> SourceDelivery {
        let answer = OneShot<SourceDelivery>()
        guard submit(batch, answer) else { return .stopped }
        while true {
            if let a = answer.wait(seconds: 1) { return a }
            if isStopping { return .stopped }
        }
    }
}

/// The first line of a secret file (a bind password), after checking that
/// only its owner and group may read it (like token files).
func readSecretLine(_ path: String) throws -> [UInt8] {
    var st = stat()
    guard stat(path, &st) == 0 else { throw SourceMappingError("cannot read \(path): \(String(cString: strerror(errno)))") }
    guard st.st_mode & 0o007 == 0 else {
        throw SourceMappingError("\(path) is readable by others (mode \(String(st.st_mode & 0o777, radix: 8))); chmod 0640 \(path)")
    }
    let bytes: [UInt8]
    do throws(ConfigError) { bytes = try readFileBytes(path) } catch { throw SourceMappingError(error.message) }
    return Array(bytes.prefix { $0 != 0x0a && $0 != 0x0d })
}

/// What the source thread's closures reach on the loop: the driver, until
/// the agent shuts down. Loop-bound (opened through `LoopBound`).
final class SourceDriverHolder {
    var driver: SourceDriver?
}

/// The loop side of a source: takes its batches on the agent's main loop,
/// checks backpressure, submits them to the group-commit writer, logs
/// what could not be mapped and keeps the figures for `/metrics`.
/// Loop-bound (the agent's main loop).
final class SourceDriver {
    let runner: any SourceReader
    unowned let endpoint: SCIMEndpoint
    let writer: GroupCommitWriter
    let store: AgentStore
    var log: (String) -> Void = { _ in }
    var statistics = SourceStatistics()

    struct SourceStatistics {
        var batches = 0
        var written = 0
        var unchanged = 0
        var failures = 0
        /// Batches refused by backpressure (offered again).
        var pushedBack = 0
        var entries = 0
        var lastSuccess: Int64 = 0
        /// As stored: the source's entries and what its lag is reckoned from.
        var stored: SourceStatus?
    }

    init(runner: any SourceReader, endpoint: SCIMEndpoint, writer: GroupCommitWriter, store: AgentStore) {
        self.runner = runner
        self.endpoint = endpoint
        self.writer = writer
        self.store = store
        if let s = try? store.sourceStatus(runner.configuration.name) {
            (statistics.entries, statistics.lastSuccess, statistics.stored) = (s.entries, s.lastSuccess, s)
        }
    }

    func submit(_ batch: SourceBatch, _ completion: @escaping (SourceDelivery) -> Void) {
        if let refusal = endpoint.checkBackpressure() {
            statistics.pushedBack += 1
            completion(.busy(refusal.detail))
            return
        }
        var base = endpoint.makeContext(HTTPRequest(method: "POST", target: "/sources/\(batch.source)"))
        base.traceID = "source-" + base.traceID.prefix(24)
        let contexts = (0...batch.changes.count).map { i -> WriteContext in
            guard i > 0 else { return base }
            var c = endpoint.makeContext(HTTPRequest(method: "POST", target: "/sources/\(batch.source)"))
            c.traceID = base.traceID
            return c
        }
        let store = self.store, onDelete = runner.configuration.onDelete
        let profile = endpoint.options.profile
        let operation: WriteOperation<SourceBatchResult> = { (txn: borrowing WriteTransaction) throws -> SourceBatchResult in
            try store.applySource(batch, onDelete: onDelete, contexts: contexts, profile: profile, in: txn)
        }
        writer.submit(operation, inbox: endpoint.inbox) { [self] result in
            switch result {
            case .success(let r):
                statistics.batches += 1
                statistics.written += r.written
                statistics.unchanged += r.unchanged
                statistics.failures += r.failures.count
                statistics.lastSuccess = base.epochSeconds
                if let s = try? store.sourceStatus(batch.source) { (statistics.entries, statistics.stored) = (s.entries, s) }
                for f in r.failures { log("source \(batch.source): entry \(f.dn) not applied: \(f.reason)") }
                if r.written > 0 { endpoint.onCommitted?() }
                completion(.committed(r))
            case .failure(StoreError.storeFull(let limit)):
                statistics.pushedBack += 1
                completion(.busy("the store is full (\(limit) bytes)"))
            case .failure(let e):
                log("source \(batch.source): writing a batch failed: \(e)")
                completion(.failed("\(e)"))
            }
        }
    }
}
