import EdgeConfig
import EdgeHTTP
import EdgeLDAP
import EdgeLoop
import EdgeStore
import Glibc
import SCIM
import Synchronization

/// One LDAP source on its own thread (`SourceThread`: libldap's calls
/// block, so they never run on an event loop). It reads changes (syncrepl
/// or polling) and hands each batch to the agent's loop, one at a time
/// (TCP then pushes back on the server when the store is slow).
final class LDAPSourceRunner: SourceReader {
    let configuration: SourceConfiguration
    let mapping: SourceMapping
    let store: AgentStore
    let thread: SourceThread

    init(configuration: SourceConfiguration, store: AgentStore, thread: SourceThread) {
        self.configuration = configuration
        self.mapping = configuration.mapping
        self.store = store
        self.thread = thread
    }

    private var isStopping: Bool { thread.isStopping }
    private func log(_ line: String) { thread.log(line) }
    private func pause(_ seconds: Double) { thread.pause(seconds) }
    private func hand(_ batch: SourceBatch) throws -> Bool { try thread.hand(batch) }

    func start() { thread.start { [self] in run() } }

    private func run() {
        thread.runSessions {
            let connection = try connect()
            defer { connection.close() }
            let mode = try resolveMode(connection)
            thread.connected(mode: mode.rawValue, to: configuration.url)
            if mode == .syncrepl { try runSyncRepl(connection) } else { try runPoll(connection) }
        }
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
                    pending.append(mapping.change(entry, key: key))
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
                    pending.append(mapping.change(entry, key: key))
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

extension AgentConfiguration {
    /// `check-config --connect`: each pull source is reached, bound with its
    /// credentials and asked for its base DN, so that a wrong URL, password
    /// or base DN is found before the service starts. Each problem is
    /// reported at the key that causes it. (Not in the units' ExecStartPre:
    /// a directory that is down must not keep the agent from starting; the
    /// source retries.)
    public func checkSourceConnections(_ d: ConfigDiagnostics) {
        for (i, source) in sources.enumerated() where source.kind == .ldap {
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
