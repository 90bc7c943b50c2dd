import EdgeConfig
import EdgeHTTP
import EdgeLDAP
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
    var mode = ""
    var lastError = ""
    var connectionFailures = 0
}

/// One LDAP source on its own thread: libldap's calls block, so they never
/// run on an event loop. It reads changes (syncrepl or polling), and hands
/// each batch to the agent's loop through its inbox (`deliver`), waiting
/// until the batch is committed before it reads on: one batch in flight,
/// so memory stays bounded and a slow store slows the reading (TCP then
/// pushes back on the server). The position it resumes from is always the
/// one stored with the last committed batch.
///
/// Threading: `start` and `stop` on any thread; everything else on the
/// source's thread. `Sendable`: its state is immutable or behind `Mutex`/`Atomic`.
final class LDAPSourceRunner: Sendable {
    let configuration: LDAPSourceConfiguration
    let mapping: SourceMapping
    let store: AgentStore
    /// Posts a batch to the agent's loop, which fulfils the answer; false when the loop is gone.
    let submit: @Sendable (SourceBatch, OneShot<SourceDelivery>) -> Bool
    let log: @Sendable (String) -> Void
    let live = Mutex(SourceLive())
    private let stopping = Atomic<Bool>(false)
    private let stopSignal = OneShot<Bool>()
    /// Fulfilled when the thread has finished.
    let finished = OneShot<Bool>()

    init(
        configuration: LDAPSourceConfiguration, store: AgentStore,
        submit: @escaping @Sendable (SourceBatch, OneShot<SourceDelivery>) -> Bool, log: @escaping @Sendable (String) -> Void
    ) {
        self.configuration = configuration
        self.mapping = configuration.mapping
        self.store = store
        self.submit = submit
        self.log = log
    }

    var isStopping: Bool { stopping.load(ordering: .relaxed) }

    func start() {
        var thread = pthread_t()
        let context = Unmanaged.passRetained(self).toOpaque()
        let rc = pthread_create(
            &thread, nil,
            { arg in
                let runner = Unmanaged<LDAPSourceRunner>.fromOpaque(arg!).takeRetainedValue()
                runner.run()
                runner.finished.fulfil(true)
                return nil
            }, context)
        precondition(rc == 0, "cannot start the thread of source \(configuration.name): \(rc)")
        pthread_detach(thread)
    }

    /// Asks the thread to end: it notices within a second (its reads time out that often).
    func stop() {
        stopping.store(true, ordering: .relaxed)
        stopSignal.fulfil(true)
    }

    /// Waits `seconds` unless stopped meanwhile.
    private func pause(_ seconds: Double) { _ = stopSignal.wait(seconds: seconds) }

    private func run() {
        var attempt = 0
        while !isStopping {
            do {
                let connection = try connect()
                defer { connection.close() }
                let mode = try resolveMode(connection)
                live.withLock {
                    $0.connected = true
                    $0.mode = mode.rawValue
                    $0.lastError = ""
                }
                log("source \(configuration.name): connected to \(configuration.url) (\(mode.rawValue))")
                attempt = 0
                if mode == .syncrepl { try runSyncRepl(connection) } else { try runPoll(connection) }
            } catch {
                guard !isStopping else { break }
                attempt += 1
                let delay = min(30.0, Double(1 << min(attempt - 1, 5))) * (0.75 + Double(UInt32.random(in: 0...1000)) / 4000)
                live.withLock {
                    $0.connected = false
                    $0.lastError = "\(error)"
                    $0.connectionFailures += 1
                }
                log("source \(configuration.name): \(error); retrying in \(Int(delay * 1000)) ms")
                pause(delay)
            }
        }
        live.withLock { $0.connected = false }
    }

    private func connect() throws -> LDAPConnection {
        let connection = try LDAPConnection(url: configuration.url, tls: configuration.tls)
        var password: [UInt8] = []
        if let file = configuration.bindPasswordFile { password = try readSecretLine(file) }
        try connection.bind(dn: configuration.bindDN, password: password)
        return connection
    }

    private func resolveMode(_ c: LDAPConnection) throws -> SourceMode {
        switch configuration.mode {
        case .poll: return .poll
        case .syncrepl:
            guard try c.offersSyncRepl() else {
                throw SourceMappingError("the server does not offer content synchronisation (RFC 4533); use mode: poll")
            }
            return .syncrepl
        case .auto: return try c.offersSyncRepl() ? .syncrepl : .poll
        }
    }

    /// Hands a batch over until it is committed; false when stopping.
    /// Throws when the write failed (the caller reconnects and resumes
    /// from the stored position).
    private func hand(_ batch: SourceBatch) throws -> Bool {
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

    /// One batch to the loop and its answer (waiting in steps of a second, to notice `stop`).
    private func deliver(_ batch: SourceBatch) -> SourceDelivery {
        let answer = OneShot<SourceDelivery>()
        guard submit(batch, answer) else { return .stopped }
        while true {
            if let a = answer.wait(seconds: 1) { return a }
            if isStopping { return .stopped }
        }
    }

    // MARK: syncrepl (RFC 4533, refreshAndPersist)

    private func runSyncRepl(_ c: LDAPConnection) throws {
        var cookie = try store.sourcePosition(configuration.name)
        while !isStopping {
            switch try syncSession(c, cookie: cookie) {
            case .stopped: return
            case .refreshRequired:
                log("source \(configuration.name): the server no longer knows the stored cookie; full refresh")
                cookie = nil
            }
        }
    }

    enum SessionEnd { case stopped, refreshRequired }

    private func syncSession(_ c: LDAPConnection, cookie: [UInt8]?) throws -> SessionEnd {
        let control = LDAPControlValue(
            oid: SyncRepl.requestControl, value: SyncRepl.request(mode: .refreshAndPersist, cookie: cookie), critical: true)
        let msgid = try c.startSearch(
            base: configuration.baseDN, filter: mapping.searchFilter, attributes: mapping.attributes, controls: [control])
        defer { c.abandon(msgid) }
        let name = configuration.name
        var pending: [SourceChange] = []
        var position: [UInt8]?
        // Every key the refresh sent (added, modified or present): at the end
        // of a present phase the entries not in it are gone.
        var refreshKeys = Set<String>()
        func flush(keepOnly: Set<String>? = nil) throws -> Bool {
            guard !pending.isEmpty || position != nil || keepOnly != nil else { return true }
            let batch = SourceBatch(source: name, mode: "syncrepl", changes: pending, position: position, keepOnly: keepOnly)
            guard try hand(batch) else { return false }
            pending = []
            position = nil
            return true
        }
        while !isStopping {
            guard let event = try c.next(msgid, timeoutMilliseconds: pending.isEmpty && position == nil ? 1000 : 50) else {
                guard try flush() else { return .stopped }
                continue
            }
            switch event {
            case .entry(let entry, let controls):
                guard let state = controls.first(where: { $0.oid == SyncRepl.stateControl }) else {
                    pending.append(.unmappable(dn: entry.dn, reason: "no Sync State control"))
                    continue
                }
                let s = try SyncRepl.state(state.value)
                let key = uuidString(s.entryUUID)
                switch s.state {
                case .add, .modify:
                    pending.append(.upsert(entry, key: key))
                    refreshKeys.insert(key)
                case .present: refreshKeys.insert(key)
                case .delete: pending.append(.delete(key: key))
                }
                if let c = s.cookie { position = c }
                if pending.count >= configuration.batchSize { guard try flush() else { return .stopped } }
            case .intermediate(let oid, let value):
                guard oid == SyncRepl.infoMessage else { continue }
                switch try SyncRepl.info(value) {
                case .newCookie(let c):
                    position = c
                case .refreshDelete(let c, _):
                    if let c { position = c }
                    refreshKeys = []
                    guard try flush() else { return .stopped }
                case .refreshPresent(let c, _):
                    if let c { position = c }
                    let keep = refreshKeys
                    refreshKeys = []
                    guard try flush(keepOnly: keep) else { return .stopped }
                case .idSet(let c, let deletes, let uuids):
                    if deletes {
                        pending += uuids.map { .delete(key: uuidString($0)) }
                    } else {
                        refreshKeys.formUnion(uuids.map(uuidString))
                    }
                    if let c { position = c }
                }
            case .done(let code, let message, let controls):
                if code == SyncRepl.refreshRequired {
                    _ = try flush()
                    return .refreshRequired
                }
                guard code == 0 else { throw LDAPError(code: code, operation: "syncrepl search", detail: message) }
                if let done = controls.first(where: { $0.oid == SyncRepl.doneControl }), let c = try SyncRepl.done(done.value).cookie {
                    position = c
                }
                _ = try flush()
                throw LDAPError(code: -1, operation: "syncrepl search", detail: "the server ended the persistent search")
            case .reference:
                continue
            }
        }
        return .stopped
    }

    // MARK: polling (modifyTimestamp, full comparison for deletions)

    private func runPoll(_ c: LDAPConnection) throws {
        let name = configuration.name
        var highWater = try store.sourcePosition(name).map { String(decoding: $0, as: UTF8.self) }
        var polls = 0
        while !isStopping {
            let full = highWater == nil || polls % configuration.fullCompareEvery == 0
            let filter = highWater.map { "(&\(mapping.searchFilter)(modifyTimestamp>=\($0)))" } ?? mapping.searchFilter
            var pending: [SourceChange] = []
            var newest = highWater
            var stopped = false
            try c.search(base: configuration.baseDN, filter: filter, attributes: mapping.attributes + ["modifyTimestamp"], pageSize: 500) {
                entry in
                if let ts = entry.first("modifyTimestamp"), newest.map({ ts > $0 }) ?? true { newest = ts }
                if let key = mapping.key(of: entry) {
                    pending.append(.upsert(entry, key: key))
                } else {
                    pending.append(.unmappable(dn: entry.dn, reason: "no \(mapping.keyAttribute) (the key attribute)"))
                }
                if pending.count >= configuration.batchSize {
                    guard try hand(SourceBatch(source: name, mode: "poll", changes: pending)) else {
                        stopped = true
                        throw SourceMappingError("stopping")
                    }
                    pending = []
                }
            }
            if stopped || isStopping { return }
            var keep: Set<String>?
            if full {
                var keys = Set<String>()
                try c.search(base: configuration.baseDN, filter: mapping.searchFilter, attributes: [mapping.keyAttribute], pageSize: 500) {
                    entry in
                    if let key = mapping.key(of: entry) { keys.insert(key) }
                }
                keep = keys
            }
            let position = newest.map { Array($0.utf8) }
            guard try hand(SourceBatch(source: name, mode: "poll", changes: pending, position: position, keepOnly: keep)) else { return }
            highWater = newest
            polls += 1
            pause(Double(configuration.pollSeconds))
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
    let runner: LDAPSourceRunner
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
        var entries = 0
        var lastSuccess: Int64 = 0
    }

    init(runner: LDAPSourceRunner, endpoint: SCIMEndpoint, writer: GroupCommitWriter, store: AgentStore) {
        self.runner = runner
        self.endpoint = endpoint
        self.writer = writer
        self.store = store
        if let s = try? store.sourceStatus(runner.configuration.name) {
            (statistics.entries, statistics.lastSuccess) = (s.entries, s.lastSuccess)
        }
    }

    func submit(_ batch: SourceBatch, _ completion: @escaping (SourceDelivery) -> Void) {
        if let refusal = endpoint.checkBackpressure() {
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
        let store = self.store, mapping = runner.mapping, onDelete = runner.configuration.onDelete
        let profile = endpoint.options.profile
        let operation: WriteOperation<SourceBatchResult> = { (txn: borrowing WriteTransaction) throws -> SourceBatchResult in
            try store.applySource(batch, mapping: mapping, onDelete: onDelete, contexts: contexts, profile: profile, in: txn)
        }
        writer.submit(operation, inbox: endpoint.inbox) { [self] result in
            switch result {
            case .success(let r):
                statistics.batches += 1
                statistics.written += r.written
                statistics.unchanged += r.unchanged
                statistics.failures += r.failures.count
                statistics.lastSuccess = base.epochSeconds
                if let s = try? store.sourceStatus(batch.source) { statistics.entries = s.entries }
                for f in r.failures { log("source \(batch.source): entry \(f.dn) not applied: \(f.reason)") }
                if r.written > 0 { endpoint.onCommitted?() }
                completion(.committed(r))
            case .failure(StoreError.storeFull(let limit)):
                completion(.busy("the store is full (\(limit) bytes)"))
            case .failure(let e):
                log("source \(batch.source): writing a batch failed: \(e)")
                completion(.failed("\(e)"))
            }
        }
    }
}

extension AgentConfiguration {
    /// `check-config --connect`: each pull source is reached, bound with its
    /// credentials and asked for its base DN, so that a wrong URL, password
    /// or base DN is found before the service starts. Each problem is
    /// reported at the key that causes it. (Not in the units' ExecStartPre:
    /// a directory that is down must not keep the agent from starting; the
    /// source retries.)
    public func checkSourceConnections(_ d: ConfigDiagnostics) {
        for (i, source) in sources.enumerated() {
            let at = "sources[\(i)]"
            let connection: LDAPConnection
            do throws(LDAPError) {
                connection = try LDAPConnection(url: source.url, tls: source.tls, timeoutSeconds: 10)
            } catch {
                let ca = error.operation.hasPrefix("TLS: CA file")
                d.error(
                    "\(at).\(ca ? "tls.ca" : "url")", "cannot use \(source.url): \(error)",
                    fix: ca ? "give the CA (PEM) the directory's certificate chains to" : "check the URL and the TLS settings")
                continue
            }
            defer { connection.close() }
            var password: [UInt8] = []
            if let file = source.bindPasswordFile {
                // Its problems (missing, readable by others) are reported at bindPasswordFile by the file checks.
                guard let secret = try? readSecretLine(file) else { continue }
                password = secret
            }
            do {
                try connection.bind(dn: source.bindDN, password: password)
            } catch let e as LDAPError where [-1, -5, -11].contains(e.code) {
                // LDAP_SERVER_DOWN, LDAP_TIMEOUT, LDAP_CONNECT_ERROR: libldap connects at the first operation.
                d.error("\(at).url", "cannot reach \(source.url): \(e)", fix: "check the host, the port and the TLS settings")
                continue
            } catch {
                d.error(
                    "\(at).bindDN", "\(source.url) refused the bind as \(source.bindDN ?? "anonymous"): \(error)",
                    fix: "check bindDN and the password in bindPasswordFile")
                continue
            }
            do {
                var found = false
                try connection.search(base: source.baseDN, scope: .base, filter: "(objectClass=*)", attributes: ["1.1"]) { _ in found = true
                }
                if !found { d.error("\(at).baseDN", "\(source.url) has no entry \(source.baseDN) readable by this bind") }
            } catch let e as LDAPError where [-1, -5, -11].contains(e.code) {
                d.error("\(at).url", "\(source.url) went away while reading \(source.baseDN): \(e)", fix: "check the directory")
            } catch {
                d.error(
                    "\(at).baseDN", "\(source.url): cannot read \(source.baseDN): \(error)",
                    fix: "check baseDN (the directory's suffix or a subtree of it)")
            }
        }
    }
}
