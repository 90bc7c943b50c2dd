import EdgeConfig
import EdgeDelivery
import EdgeHTTP
import EdgeLog
import EdgeLoop
import EdgeStore
import EdgeTLS
import Glibc
import SCIM

/// Everything `scim-edge serve` runs: configuration in, a running agent out.
public struct AgentConfiguration: Sendable {
    public var dataDirectory: String
    public var listen: SocketAddress
    public var tokens: [String] = []
    /// One token per line (`#` comments); re-read on SIGHUP.
    public var tokenFile: String?
    public var tls: TLSConfiguration?
    public var endpoint = EndpointOptions()
    public var limits = HTTPServerLimits()
    public var maxStoreBytes = AgentOptions.storeMaxBytes.defaultInteger
    /// The operations listener (`/healthz`, `/readyz`, `/metrics`); nil: none.
    public var adminListen: SocketAddress?
    /// What may leave the boundary; nil: everything propagates.
    public var policy: LocalPolicy?
    /// Where the policy's pseudonym key came from (read when the
    /// configuration is; kept for check-config's permission checks).
    public var pseudonymKeyFile: String?
    /// The broker to relay to; nil: a standalone agent.
    public var relay: RelayConfiguration?
    /// Loops serving SCIM requests, each on its own thread (the main loop
    /// included); accepted connections are spread over them round-robin.
    /// Writes from every loop share one group-commit writer.
    public var servingLoops = 1
    /// What enters from other domains through the downlink; nil: nothing
    /// does, and the agent never polls (invariant 5).
    public var inbound: InboundPolicy?
    /// Directories the agent pulls from (docs/sources.md).
    public var sources: [SourceConfiguration] = []
    /// Apps inside the boundary the agent provisions (docs/agent.md, "Local targets").
    public var targets: [TargetConfiguration] = []
    /// Request lines straight to this sink (`serve`: standard output); nil: through swift-log.
    public var accessLog: LogSink?

    public init(dataDirectory: String, listen: SocketAddress) {
        self.dataDirectory = dataDirectory
        self.listen = listen
    }

    /// Whether writes append relay events: always with a broker, else only
    /// when asked (`outbox.keep`).
    public var recordsOutbox: Bool { endpoint.recordOutbox || relay != nil }

    /// The SCIM listener when none is given (flags and config file alike).
    public static let defaultListen = SocketAddress(AgentOptions.listen.defaultValue!)!
    /// The operations listener when none is given (`none` turns it off).
    public static let defaultAdminListen = SocketAddress(AgentOptions.adminListen.defaultValue!)!
}

public enum AgentError: Error, CustomStringConvertible {
    case noTokens
    case tokenFile(String)
    public var description: String {
        switch self {
        case .noTokens: return "no bearer token configured: give --token or --token-file"
        case .tokenFile(let m): return m
        }
    }
}

/// Reads a token file: one token per line, blank lines and `#` comments skipped.
public func readTokenFile(_ path: String) throws -> [String] {
    let tokens: [String]
    do throws(ConfigError) { tokens = try readTokenLines(path) } catch {
        throw AgentError.tokenFile("cannot read token file " + error.message.dropFirst("cannot read ".count))
    }
    guard !tokens.isEmpty else { throw AgentError.tokenFile("token file \(path) holds no token") }
    return tokens
}

/// A running agent on the calling thread's loop.
public final class AgentService {
    public let loop: EventLoop
    public let store: AgentStore
    public let writer: GroupCommitWriter
    /// The main loop's endpoint (writes, relay kicks and backpressure notes go through it).
    public let endpoint: SCIMEndpoint
    public let server: HTTPServer
    /// The other serving loops (`servingLoops - 1` of them).
    let servingLoops: [ServingLoop]
    public private(set) var adminServer: HTTPServer?
    public private(set) var relay: Relay?
    /// Fetches the downlink feed; only with an inbound policy (nothing else ever polls).
    public private(set) var downlink: DownlinkPoller?
    /// One delivery worker per local target (docs/agent.md, "Local targets").
    public private(set) var targetWorkers: [TargetWorker] = []
    /// Keeps the local targets' trail bounded (7 days), as the broker's.
    private var trailSweeper: TrailSweeper?
    /// What rare transitions leave for later (`AgentStore.deferredStep`): a
    /// removed group's index entries, the local targets' group indexes.
    private var deferred: DeferredWorkRunner<(swept: Int, delivery: DeferredProgress, relayed: Int)>?
    /// Entries of removed groups swept, of the local targets' group indexes
    /// forgotten, and members of groups back in a target's routes marked
    /// for comparison (`/metrics`).
    public private(set) var deferredCounts = (swept: 0, targetIndex: 0, compared: 0, relayed: 0)
    /// The pull sources (docs/sources.md): each reads on its own thread and writes through this loop.
    private(set) var sourceDrivers: [SourceDriver] = []
    private var sourceHolders: [SourceDriverHolder] = []
    private var signals: ServiceSignals?
    private let configuration: AgentConfiguration
    /// The SCIM listener's certificate and key (all serving loops share it): re-read on SIGHUP.
    private var listenerTLS: ReloadableTLSContext?
    /// Called with one line per notable event (start, drain, reload).
    public var log: (String) -> Void = { _ in } {
        didSet { startupNotes.forEach(log); startupNotes = [] }
    }
    private var startupNotes: [String] = []

    public init(loop: EventLoop, configuration: AgentConfiguration) throws {
        self.loop = loop
        self.configuration = configuration
        var endpointOptions = configuration.endpoint
        endpointOptions.recordOutbox = configuration.recordsOutbox
        if let file = configuration.tokenFile { endpointOptions.tokens += try readTokenFile(file) }
        endpointOptions.tokens += configuration.tokens
        guard !endpointOptions.tokens.isEmpty else { throw AgentError.noTokens }
        // What /ServiceProviderConfig advertises is what is enforced: a Bulk body is also an HTTP body.
        endpointOptions.bulkMaxPayloadSize = min(endpointOptions.bulkMaxPayloadSize, configuration.limits.maxBodyBytes)
        let maxStore = configuration.maxStoreBytes
        store = try AgentStore(
            path: configuration.dataDirectory, registry: .standard, policy: configuration.policy, targets: configuration.targets,
            domain: configuration.relay?.domain ?? AgentStore.standaloneDomain, reportApps: configuration.inbound?.reportApps ?? .none
        ) { $0.maxMapSize = maxStore }
        writer = GroupCommitWriter(environment: store.environment, inbox: loop.inbox)
        let shared = EndpointShared()
        let endpoint = SCIMEndpoint(store: store, writer: writer, options: endpointOptions, shared: shared)
        self.endpoint = endpoint
        endpoint.accessLog = configuration.accessLog
        let tls = try configuration.tls.map { try ReloadableTLSContext(role: .server, configuration: $0) }
        listenerTLS = tls
        // One budget for every serving loop: `maxConnections` is the agent's limit.
        let budget = ConnectionBudget(limit: configuration.limits.maxConnections)
        server = try HTTPServer(
            loop: loop, address: configuration.listen, tls: tls, limits: configuration.limits,
            connectionBudget: budget
        ) { request, _, responder in endpoint.handle(request, responder) }
        server.errorBody = SCIMEndpoint.errorResponse
        let store = self.store, writer = self.writer
        let committed =
            configuration.relay == nil && configuration.targets.isEmpty ? nil : LoopBound<() -> Void>({ endpoint.onCommitted?() })
        servingLoops = try (1..<max(1, configuration.servingLoops)).map { _ in
            try ServingLoop(
                store: store, writer: writer, options: endpointOptions, shared: shared, tls: tls,
                limits: configuration.limits, connectionBudget: budget, mainInbox: loop.inbox, committed: committed,
                logger: endpoint.logger, accessLog: configuration.accessLog)
        }
        if !servingLoops.isEmpty {
            let spreader = ConnectionSpreader(loops: servingLoops, budget: budget)  // kept by the closure
            server.handOver = { spreader.handOver($0) }
        }
        if let admin = configuration.adminListen {
            let adminEndpoint = AdminEndpoint(agent: self)
            adminServer = try HTTPServer(loop: loop, address: admin) { request, _, responder in
                adminEndpoint.handle(request, responder)
            }
        }
        if endpointOptions.recordOutbox {
            // A changed policy is applied to what is already stored before serving.
            var ctx = endpoint.makeContext(HTTPRequest(method: "POST", target: "/policy"))
            ctx.traceID = "policy-" + store.policy.fingerprint.prefix(16)
            let events = try store.reconcilePolicy(ctx)
            if events > 0 { startupNotes.append("policy changed: \(events) events for resources whose outbound state changed") }
        }
        for t in configuration.targets {
            if try store.rebuildLinkIndexIfNeeded(t) {
                startupNotes.append(
                    "target \(t.name): link index built (collisions: link is new or changed): `scim-edge targets reconcile \(t.name) --apply` merges the accounts of users now linked"
                )
            }
            targetWorkers.append(
                try TargetWorker(target: t, store: store, writer: writer, loop: loop, logLabel: "scim-edge.target", command: "scim-edge"))
        }
        for w in targetWorkers { try w.start() }
        if !targetWorkers.isEmpty {
            trailSweeper = try TrailSweeper(store: store, writer: writer, loop: loop)
            trailSweeper?.start()
        }
        let workers = targetWorkers
        deferred = try DeferredWorkRunner(
            writer: writer, loop: loop, ownTimer: true, weight: deferredChunk,
            pending: { (try? store.deferredWorkPending()) ?? false },
            step: { txn in try store.deferredStep(limit: deferredChunk, txn) },
            didSomething: { $0.swept > 0 || $0.delivery.found || $0.relayed > 0 },
            done: { [weak self] p in
                guard let self else { return }
                deferredCounts.swept += p.swept
                deferredCounts.relayed += p.relayed
                // Members of a group that entered the boundary: their events are in the outbox.
                if p.relayed > 0 { relay?.kick() }
                deferredCounts.targetIndex += p.delivery.swept
                deferredCounts.compared += p.delivery.marked
                for w in workers where p.delivery.queued.contains(w.target.name) { w.kick() }
            })
        deferred?.poke()
        // A commit may leave work for later (a group entering the boundary
        // sends its members after it): started at once, not at the next
        // tick; other commits cost no look for it.
        let runner = deferred
        func pokeIfNew() { if store.takeNewDeferredWork() { runner?.poke() } }
        // A commit (on any serving loop, or by a source): its queue entries are counted and sent now.
        endpoint.onCommitted = {
            for w in workers { w.kick() }
            pokeIfNew()
        }
        if let relayConfig = configuration.relay {
            let relay = try Relay(loop: loop, store: store, writer: writer, configuration: relayConfig)
            self.relay = relay
            endpoint.onCommitted = {
                relay.kick()
                for w in workers { w.kick() }
                pokeIfNew()
            }
            relay.onAcknowledged = { [unowned endpoint] in endpoint.outboxShrank() }
            try relay.start()
            if let inbound = configuration.inbound {
                let poller = try DownlinkPoller(
                    loop: loop, store: store, writer: writer, relay: relayConfig, policy: inbound,
                    makeContext: { [unowned endpoint] trace in
                        endpoint.makeContext(HTTPRequest(method: "POST", target: "/downlink"), trace: trace)
                    })
                downlink = poller
                poller.onCommitted = { for w in workers { w.kick() } }
                try poller.start()
            }
        }
        // Noticed on any serving loop, logged on this one.
        let me = LoopBound(Unmanaged.passUnretained(self))
        let inbox: LoopInbox = loop.inbox
        for source in configuration.sources {
            let holder = SourceDriverHolder()
            let bound = LoopBound(holder)
            let thread = SourceThread(
                name: source.name,
                submit: { batch, answer in
                    inbox.send {
                        guard let driver = bound.value.driver else { return answer.fulfil(.stopped) }
                        driver.submit(batch) { answer.fulfil($0) }
                    }
                },
                log: { line in _ = inbox.send { bound.value.driver?.log(line) } })
            let runner: any SourceReader =
                switch source.kind {
                case .ldap: LDAPSourceRunner(configuration: source, store: store, thread: thread)
                case .scim: SCIMSourceRunner(configuration: source, store: store, thread: thread)
                }
            let driver = SourceDriver(runner: runner, endpoint: endpoint, writer: writer, store: store)
            driver.log = { [weak self] line in self?.log(line) }
            holder.driver = driver
            sourceHolders.append(holder)
            sourceDrivers.append(driver)
        }
        for driver in sourceDrivers { driver.runner.start() }
        shared.onChange.withLock {
            $0 = { on, events, bytes in
                inbox.send {
                    me.value.takeUnretainedValue().log(
                        on
                            ? "backpressure on: outbox holds \(events) events, \(bytes) bytes; writes get 503"
                            : "backpressure off: outbox down to \(events) events, \(bytes) bytes")
                }
            }
        }
    }

    /// SCIM request metrics of every serving loop.
    public var requestMetrics: EndpointMetrics {
        var m = endpoint.metrics
        for s in servingLoops { m.merge(s.metrics.snapshot) }
        return m
    }

    /// Open SCIM connections on every serving loop; `answer` runs on this loop.
    func openConnections(_ answer: @escaping (Int) -> Void) {
        let tally = LoopBound(Tally(count: server.statistics.openConnections, waiting: servingLoops.count, answer: answer))
        guard !servingLoops.isEmpty else { answer(tally.value.count); return }
        let inbox: LoopInbox = loop.inbox
        for s in servingLoops {
            inbox.hold()
            s.openConnections { n in
                inbox.send {
                    inbox.release()
                    let t = tally.value
                    t.count += n
                    t.waiting -= 1
                    if t.waiting == 0 { t.answer(t.count) }
                }
            }
        }
    }

    /// Stops accepting, finishes in-flight requests, then closes the listeners.
    public func shutdown(_ completion: @escaping () -> Void = {}) {
        relay?.stop()
        downlink?.stop()
        for w in targetWorkers { w.stop() }
        trailSweeper?.stop()
        deferred?.stop()
        // Sources stop reading; a batch they hand over from now on is not written (it is read again at the next start).
        for d in sourceDrivers { d.runner.stop() }
        for h in sourceHolders { h.driver = nil }
        // The main server stops accepting; every serving loop drains; then the operations listener closes.
        var waiting = servingLoops.count + 1
        let finished: () -> Void = { [self] in
            waiting -= 1
            guard waiting == 0 else { return }
            if let adminServer { adminServer.shutdown(completion) } else { completion() }
        }
        let inbox: LoopInbox = loop.inbox
        let back = LoopBound(finished)
        for s in servingLoops {
            inbox.hold()  // this loop keeps running until the serving loop answers
            s.shutdown {
                inbox.send {
                    inbox.release(); back.value()
                }
            }
        }
        server.shutdown(finished)
    }

    /// Installs SIGTERM/SIGINT (drain) and SIGHUP (`reload()`).
    public func installSignals(onDrained: @escaping () -> Void = {}) throws {
        signals = try ServiceSignals(
            loop: loop,
            onDrain: { [unowned self] in
                log("draining")
                shutdown { [unowned self] in
                    signals?.close()
                    log("drained")
                    onDrained()
                }
            }, onReload: { [unowned self] in reload() })
    }

    /// SIGHUP: re-reads the token file, the SCIM listener's certificate and
    /// key, and the relay's client certificate, key and federation CA (the
    /// relay reconnects with them at once). Each part that fails to load
    /// keeps what it had, and says so. The policy is read at start only: a
    /// changed policy needs a restart, where it is re-evaluated against
    /// everything stored before the agent serves.
    public func reload() {
        var done: [String] = [], failed: [String] = []
        if let file = configuration.tokenFile {
            do {
                endpoint.options.tokens = try readTokenFile(file) + configuration.tokens
                for s in servingLoops { s.setTokens(endpoint.options.tokens) }
                done.append("\(endpoint.options.tokens.count) tokens")
            } catch {
                failed.append("tokens (\(error))")
            }
        }
        if let listenerTLS {
            do { try listenerTLS.reload(); done.append("the listener certificate") } catch {
                failed.append("the listener certificate (\(error))")
            }
        }
        if let relay {
            do { try relay.reloadTLS(); done.append("the relay certificate, key and CA") } catch {
                failed.append("the relay certificate (\(error))")
            }
        }
        if let downlink {
            do { try downlink.reloadTLS(); done.append("the downlink's certificate") } catch {
                failed.append("the downlink's certificate (\(error))")
            }
        }
        if !targetWorkers.isEmpty {
            for w in targetWorkers { w.reload() }
            done.append("the tokens and TLS files of targets " + targetWorkers.map(\.target.name).joined(separator: ", "))
        }
        if done.isEmpty && failed.isEmpty { log("reload: nothing to reload (no token file, no TLS)"); return }
        if !done.isEmpty {
            log("reloaded " + done.joined(separator: ", ") + " (the policy is read at start: restart to apply a changed one)")
        }
        if !failed.isEmpty { log("reload failed, keeping the old " + failed.joined(separator: ", ")) }
    }
}

/// Answers gathered from the serving loops, on the main loop.
private final class Tally {
    var count: Int
    var waiting: Int
    let answer: (Int) -> Void
    init(count: Int, waiting: Int, answer: @escaping (Int) -> Void) {
        self.count = count
        self.waiting = waiting
        self.answer = answer
    }
}
