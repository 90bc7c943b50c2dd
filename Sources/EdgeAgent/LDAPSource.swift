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
        // Past the refresh: an idle moment means everything up to it has been read.
        var persisting = false
        func flush(keepOnly: Set<String>? = nil, caughtUp: Bool = false) throws -> Bool {
            guard !pending.isEmpty || position != nil || keepOnly != nil else { return true }
            var batch = SourceBatch(source: name, mode: "syncrepl", changes: pending, position: position, keepOnly: keepOnly)
            batch.caughtUpAt = caughtUp ? unixSeconds() : nil
            batch.newestChange = position.flatMap(cookieChangeSeconds)
            guard try hand(batch) else { return false }
            pending = []
            position = nil
            return true
        }
        while !isStopping {
            guard let event = try c.next(msgid, timeoutMilliseconds: pending.isEmpty && position == nil ? 1000 : 50) else {
                if persisting {
                    let now = unixSeconds()
                    thread.live.withLock { $0.caughtUpAt = now }
                }
                guard try flush(caughtUp: persisting) else { return .stopped }
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
                case .refreshDelete(let c, let done):
                    if let c { position = c }
                    refreshKeys = []
                    persisting = persisting || done
                    guard try flush() else { return .stopped }
                case .refreshPresent(let c, let done):
                    if let c { position = c }
                    persisting = persisting || done
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

    // MARK: polling (modifyTimestamp or uSNChanged, full comparison for deletions)

    private func runPoll(_ c: LDAPConnection) throws {
        let name = configuration.name
        let poll = PollHighWater(attribute: configuration.pollAttribute)
        var highWater = try store.sourcePosition(name).map { String(decoding: $0, as: UTF8.self) }
        var polls = 0
        while !isStopping {
            let started = unixSeconds()
            let full = highWater == nil || polls % configuration.fullCompareEvery == 0
            var pending: [SourceChange] = []
            var newest = highWater
            let attributes = mapping.attributes + [poll.attribute.rawValue]
            try c.search(
                base: configuration.baseDN, filter: poll.filter(mapping.searchFilter, since: highWater), attributes: attributes,
                pageSize: 500
            ) {
                entry in
                if let value = entry.first(poll.attribute.rawValue), poll.isNewer(value, than: newest) { newest = value }
                if let key = mapping.key(of: entry) {
                    pending.append(mapping.change(entry, key: key))
                } else {
                    pending.append(.unmappable(dn: entry.dn, reason: "no \(mapping.keyAttribute) (the key attribute)"))
                }
                if pending.count >= configuration.batchSize {
                    try thread.handOrStop(SourceBatch(source: name, mode: "poll", changes: pending))
                    pending = []
                }
            }
            if isStopping { return }
            var keep: Set<String>?
            if full {
                var keys = Set<String>()
                try c.search(base: configuration.baseDN, filter: mapping.searchFilter, attributes: [mapping.keyAttribute], pageSize: 500) {
                    entry in
                    if let key = mapping.key(of: entry) { keys.insert(key) }
                }
                keep = keys
            }
            var batch = SourceBatch(source: name, mode: "poll", changes: pending, position: newest.map { Array($0.utf8) }, keepOnly: keep)
            // Everything changed before this poll started is in it.
            batch.caughtUpAt = started
            batch.newestChange = newest.flatMap(poll.seconds)
            guard try hand(batch) else { return }
            highWater = newest
            polls += 1
            pause(Double(configuration.pollSeconds))
        }
    }
}

/// An LDAP poll's high-water mark: the largest value of the change
/// attribute seen, and the filter of what changed since. `modifyTimestamp`
/// is a GeneralizedTime (its text orders like its time, for the same
/// form), compared with `>=` (a change in the same second as the mark is
/// read again, found unchanged); `uSNChanged` is an integer, compared as
/// one (9 < 10), asked for from the mark plus one.
public struct PollHighWater: Sendable {
    public let attribute: PollAttribute
    public init(attribute: PollAttribute) { self.attribute = attribute }

    /// The search filter: `base` alone without a mark, else `base` and changed since `mark`.
    public func filter(_ base: String, since mark: String?) -> String {
        guard let mark else { return base }
        switch attribute {
        case .modifyTimestamp: return "(&\(base)(modifyTimestamp>=\(escapedFilterValue(mark))))"
        case .uSNChanged:
            // A mark that is not a number cannot have come from this mode: read everything again.
            guard let n = UInt64(mark) else { return base }
            return "(&\(base)(uSNChanged>=\(n + 1)))"
        }
    }

    /// Whether `value` is past `mark` (any value is, without a mark).
    public func isNewer(_ value: String, than mark: String?) -> Bool {
        guard let mark else { return true }
        switch attribute {
        case .modifyTimestamp: return value > mark
        case .uSNChanged:
            guard let v = UInt64(value) else { return false }
            return UInt64(mark).map { v > $0 } ?? true
        }
    }

    /// When the change at `mark` happened (Unix seconds), if the attribute says.
    public func seconds(_ mark: String) -> Int64? {
        attribute == .modifyTimestamp ? generalizedTimeSeconds(mark) : nil
    }
}

/// Unix seconds of a GeneralizedTime (`YYYYMMDDhhmmss[.f]Z`, as
/// `modifyTimestamp` and OpenLDAP's CSNs write it); nil when it is not one.
public func generalizedTimeSeconds<S: StringProtocol>(_ text: S) -> Int64? {
    let d = Array(text.utf8)
    guard d.count >= 15, d[0..<14].allSatisfy({ $0 >= 0x30 && $0 <= 0x39 }) else { return nil }
    let t = String(decoding: d[0..<14], as: UTF8.self)
    func part(_ from: Int, _ n: Int) -> Substring { t.dropFirst(from).prefix(n) }
    let iso = "\(part(0, 4))-\(part(4, 2))-\(part(6, 2))T\(part(8, 2)):\(part(10, 2)):\(part(12, 2))Z"
    return DateTimeValue(iso)?.secondsSinceEpoch
}

/// When the change an OpenLDAP sync cookie stands for happened: the time
/// of its CSN (`rid=000,csn=20261201165330.123456Z#000000#000#000000`);
/// nil for another server's cookie.
public func cookieChangeSeconds(_ cookie: [UInt8]) -> Int64? {
    let marker = Array("csn=".utf8)
    guard cookie.count > marker.count,
        let at = (0...(cookie.count - marker.count)).first(where: { cookie[$0..<$0 + marker.count].elementsEqual(marker) })
    else { return nil }
    return generalizedTimeSeconds(String(decoding: cookie[(at + marker.count)...], as: UTF8.self))
}

/// A value in an LDAP filter, escaped (RFC 4515 §3).
func escapedFilterValue(_ value: String) -> String {
    var out = ""
    for c in value {
        switch c {
        case "*": out += "\\2a"
        case "(": out += "\\28"
        case ")": out += "\\29"
        case "\\": out += "\\5c"
        case "\u{0}": out += "\\00"
        default: out.append(c)
        }
    }
    return out
}

extension AgentConfiguration {
    /// `check-config --connect`: each LDAP source is reached, bound with its
    /// credentials and asked for its base DN (each SCIM source: `checkSCIMSourceConnections`), so that a wrong URL, password
    /// or base DN is found before the service starts. Each problem is
    /// reported at the key that causes it. (Not in the units' ExecStartPre:
    /// a directory that is down must not keep the agent from starting; the
    /// source retries.)
    public func checkSourceConnections(_ d: ConfigDiagnostics) {
        checkSCIMSourceConnections(d)
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
            } catch let e where [-1, -5, -11].contains(e.code) {
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
