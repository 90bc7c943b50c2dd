import EdgeConfig
import EdgeDelivery
import EdgeHTTP
import EdgeLoop
import EdgeMetrics
import EdgeStore
import EdgeTLS
import Glibc
import Logging
import SCIM

/// A domain and the certificate identity of its agents: a SAN URI, or a DNS
/// SAN for certificates without a URI (a subject CN never binds).
public struct DomainBinding: Sendable, Equatable {
    public var domain: String
    public var identity: String
    public init(domain: String, identity: String) {
        self.domain = domain
        self.identity = identity
    }

    /// Parses `NAME=CERT-IDENTITY`; nil when NAME is not a valid domain name.
    public init?(_ text: String) {
        guard let eq = text.firstIndex(of: "="), eq != text.startIndex, text.index(after: eq) != text.endIndex,
            DomainBinding.validName(String(text[..<eq]))
        else { return nil }
        self.init(domain: String(text[..<eq]), identity: String(text[text.index(after: eq)...]))
    }

    /// Letters, digits, `.`, `_` and `-`, at most 64: a domain name is part
    /// of the broker's LMDB keys (`<domain>/…`), where a `/` would let one
    /// domain's key range take in another's.
    public static func validName(_ name: String) -> Bool {
        !name.isEmpty && name.utf8.count <= 64
            && name.utf8.allSatisfy { c in
                (c >= 48 && c <= 57) || (c >= 65 && c <= 90) || (c >= 97 && c <= 122) || c == 45 || c == 46 || c == 95
            }
    }
}

public struct BrokerConfiguration: Sendable {
    public var dataDirectory: String
    public var listen: SocketAddress
    /// Server certificate, key, federation CA (and CRL): client certificates required.
    public var tls: TLSConfiguration
    public var domains: [DomainBinding] = []
    public var limits = HTTPServerLimits()
    public var maxEventsPerBatch = 5000
    /// The SCIM read API over the federated directory (`--api-listen`); nil: none.
    public var apiListen: SocketAddress?
    public var apiTokens: [String] = []
    /// Read-API tokens, one per line (`api.tokenFile`), read at start: so
    /// that no token needs to sit in the configuration file.
    public var apiTokenFile: String?
    /// The web console's operator tokens (`api.operatorTokens`): its actions
    /// need one of them; the read-API tokens only read.
    public var operatorTokens: [String] = []
    /// Operator tokens, one per line (`api.operatorTokenFile`), read at start.
    public var operatorTokenFile: String?
    /// Whether the read API's listener serves the web console at `/console/`.
    public var console = true
    /// Resources one page of a read-API filter without an index may examine.
    public var apiScanBudget = BrokerOptions.apiScanBudget.defaultInteger
    /// `/healthz`, `/readyz`, `/metrics`; nil: none.
    public var adminListen: SocketAddress?
    /// Backpressure: with this many batches waiting to be applied, agents get
    /// 503 + Retry-After (their outboxes hold the events meanwhile).
    public var maxPendingBatches = BrokerOptions.maxPendingBatches.defaultInteger
    public var retryAfterSeconds = 2
    /// Downstream SCIM targets the directory fans out to.
    public var targets: [TargetConfiguration] = []

    public init(dataDirectory: String, listen: SocketAddress = BrokerConfiguration.defaultListen, tls: TLSConfiguration) {
        self.dataDirectory = dataDirectory
        self.listen = listen
        self.tls = tls
    }

    /// The federation listener when none is given (flags and config file alike).
    public static let defaultListen = SocketAddress(BrokerOptions.listen.defaultValue!)!
}

/// Counters of the federation listener.
public struct FederationStatistics: Sendable {
    public var batches = 0
    public var eventsApplied = 0
    /// Index entries of removed groups' members swept (`sweepRemovedGroups`).
    public var sweptMembers = 0
    /// Entries of the targets' group indexes forgotten after the group left
    /// the target, and members marked for a whole-group comparison after it
    /// came back into its routes (`deferredDeliveryStep`).
    public var sweptTargetIndexEntries = 0
    public var comparedMembers = 0
    public var membershipDeltas = 0
    public var duplicates = 0
    public var rejectedEvents = 0
    public var gaps = 0
    public var domainMismatches = 0
    public var unknownIdentities = 0
    public var ambiguousIdentities = 0
    public var busyRefusals = 0
    /// Failed TLS handshakes on the federation listener, by reason.
    public var handshakeFailures: [TLSFailureReason: Int] = [:]
}

/// Why a TLS handshake failed, in a few kinds (a metric label).
public enum TLSFailureReason: String, Sendable, CaseIterable {
    case revoked, expired, untrusted, noCertificate = "no_certificate", other

    public init(_ error: TLSError) {
        let text = ((error.verifyError.map { [$0] } ?? []) + error.reasons).joined(separator: " ").lowercased()
        if text.contains("revoked") {
            self = .revoked
        } else if text.contains("expired") || text.contains("not yet valid") {
            self = .expired
        } else if text.contains("did not return a certificate") || text.contains("peer did not return") {
            self = .noCertificate
        } else if text.contains("issuer") || text.contains("self-signed") || text.contains("self signed") || text.contains("unknown ca")
            || text.contains("certificate verify failed")
        {
            self = .untrusted
        } else {
            self = .other
        }
    }
}

/// `scim-broker serve`: the federation listener (relay protocol v1) over
/// mutual TLS, applying batches exactly once. Threading: loop-confined.
public final class BrokerService {
    public let loop: EventLoop
    public let store: BrokerStore
    public let writer: GroupCommitWriter
    public let server: HTTPServer
    public private(set) var apiServer: HTTPServer?
    public private(set) var adminServer: HTTPServer?
    /// One delivery worker per target (app).
    public internal(set) var workers: [TargetWorker] = []
    /// The downlink feeds of the targets that are boundaries, and their parked polls.
    var feeds = BrokerFeeds(destinations: [])
    /// Keeps the trail bounded: a few thousand keys per second, in the background.
    /// The trail's part of it (7 days); the timer also sweeps removed groups and follows pauses.
    private var sweeper: TrailSweeper?
    private var sweepTimer: LoopTimer?
    /// What rare transitions leave for later (`deferredStep`): removed groups' members, the targets' group indexes.
    private var deferred: DeferredWorkRunner<(swept: Int, delivery: DeferredProgress)>?
    public let configuration: BrokerConfiguration
    public private(set) var statistics = FederationStatistics()
    /// Propagation samples (commit time, seconds from the agent's acceptance), newest last, bounded.
    private var propagation = RecentSamples()
    public var logger = Logger(label: "scim-broker.federation")
    private var signals: ServiceSignals?
    private let tls: ReloadableTLSContext
    /// The federation listener's certificate's end of validity (Unix seconds; 0: unknown).
    private var certificateNotAfter: Int64 = 0
    /// The CRL's next update (Unix seconds; 0: no CRL): past it every agent is refused.
    private var crlNextUpdate: Int64 = 0
    /// Per bound agent (`<domain>/<identity>`): its certificate's end of validity, from its last request.
    private(set) var agentCertificates: [String: Int64] = [:]
    /// Per bound agent (`<domain>/<identity>`): its last request and batch (the console).
    private(set) var agentActivity: [String: AgentActivity] = [:]
    /// The targets an operator paused, as the running workers follow them
    /// (`TargetPause`: from the store, re-read every second).
    var pauses: [String: TargetPause] = [:]
    /// Targets whose resume failed (logged once; tried again every second).
    var resuming: Set<String> = []
    /// The counters of workers replaced at a resume (`followPauses`): the
    /// metrics add them, so that a counter never goes back.
    var retiredCounters: [String: TargetStatistics] = [:]
    /// The web console on the read API's listener (nil: none).
    private(set) var console: BrokerConsole?
    /// Unix ms: when this broker started.
    public let startedAt = unixMilliseconds()

    public init(loop: EventLoop, configuration: BrokerConfiguration) throws {
        guard configuration.tls.verifyPeer, configuration.tls.trustRootsFile != nil else {
            throw BrokerError.configuration("the federation listener needs the federation CA: agents must present certificates")
        }
        guard !configuration.domains.isEmpty else { throw BrokerError.configuration("no --domain NAME=CERT-IDENTITY given") }
        self.loop = loop
        self.configuration = configuration
        store = try BrokerStore(path: configuration.dataDirectory, targets: configuration.targets)
        writer = GroupCommitWriter(environment: store.environment, maxWeight: BrokerStore.applyWeightPerTransaction, inbox: loop.inbox)
        for t in configuration.targets where try store.rebuildLinkIndexIfNeeded(t) {
            logger.notice(
                "link index built from the directory (collisions: link is new or changed): run `scim-broker targets reconcile --apply \(t.name)` to merge accounts of users now linked",
                metadata: [
                    "target": .string(t.name), "linkedAccounts": .stringConvertible((try? store.linkedAccounts(target: t.name)) ?? 0),
                ])
        }
        // A destination's "worker" is its polling agent (`BrokerFeeds`): no HTTP push into a boundary.
        for t in configuration.targets where t.destination == nil {
            workers.append(try TargetWorker(target: t, store: store, writer: writer, loop: loop))
        }
        feeds = BrokerFeeds(destinations: configuration.targets.filter { $0.destination != nil })
        pauses = try store.targetPauses()
        // A target an operator paused stays paused across the restart: its worker is not started.
        for w in workers where pauses[w.target.name] == nil { try w.start() }
        sweeper = try TrailSweeper(store: store, writer: writer, loop: loop, ownTimer: false)
        sweepTimer = try LoopTimer(loop: loop)
        sweepTimer?.keepsLoopAlive = false
        let store = self.store
        weak var weakSelf: BrokerService?
        deferred = try DeferredWorkRunner(
            writer: writer, loop: loop, ownTimer: false, weight: deferredChunk,
            pending: { (try? store.deferredWorkPending()) ?? false },
            step: { txn in try store.deferredStep(limit: deferredChunk, txn) },
            didSomething: { $0.swept > 0 || $0.delivery.found },
            done: { progress in weakSelf?.deferredWorkDone(progress) })
        tls = try ReloadableTLSContext(role: .server, configuration: configuration.tls)
        var limits = configuration.limits
        limits.maxBodyBytes = max(limits.maxBodyBytes, JSONLimits.relayBatch.maxBytes)  // the one batch limit (docs/protocol.md)
        server = try HTTPServer(loop: loop, address: configuration.listen, tls: tls, limits: limits) { request, context, responder in
            weakSelf?.handle(request, context, responder)
        }
        server.onTLSFailure = { error, address in
            let reason = TLSFailureReason(error)
            weakSelf?.statistics.handshakeFailures[reason, default: 0] += 1
            weakSelf?.logger.warning(
                "refused a TLS handshake",
                metadata: [
                    "reason": .string(reason.rawValue), "error": .string(error.description), "peer": .string(address?.description ?? "-"),
                ])
        }
        server.onCertificateClosure = { reason, peer, address in
            weakSelf?.logger.error(
                "closed an agent connection: its certificate is no longer valid",
                metadata: [
                    "reason": .string(reason), "identities": .string(peer?.names.joined(separator: ",") ?? "-"),
                    "peer": .string(address?.description ?? "-"),
                ])
        }
        server.errorBody = { status, detail in
            HTTPResponse(
                status: status, headers: ["Content-Type": "application/json"],
                body: JSON.object(["error": .string("http"), "description": .string(detail)]).serialized())
        }
        weakSelf = self
        feeds.onChange = { weakSelf?.wake($0) }
        certificateNotAfter = CertificateSummary.expiry(ofFile: configuration.tls.certificateChainFile)
        crlNextUpdate = revocationListNextUpdate(ofFile: configuration.tls.crlFile)
        if let api = configuration.apiListen {
            var tokens = configuration.apiTokens
            if let file = configuration.apiTokenFile {
                do throws(ConfigError) { tokens += try readTokenLines(file) } catch {
                    throw BrokerError.configuration("api.tokenFile: \(error.message)")
                }
            }
            guard !tokens.isEmpty else { throw BrokerError.configuration("--api-listen needs --api-token or --api-token-file") }
            var operators = configuration.operatorTokens
            if let file = configuration.operatorTokenFile {
                do throws(ConfigError) { operators += try readTokenLines(file) } catch {
                    throw BrokerError.configuration("api.operatorTokenFile: \(error.message)")
                }
            }
            guard !operators.contains(where: tokens.contains) else {
                throw BrokerError.configuration(
                    "a token is both a read-API token and an operator token: give operators tokens of their own")
            }
            let handler = BrokerAPI(store: store, tokens: tokens, scanBudget: configuration.apiScanBudget)
            if configuration.console { console = BrokerConsole(service: self, readTokens: tokens, operatorTokens: operators) }
            apiServer = try HTTPServer(loop: loop, address: api) { request, _, responder in
                if let console = weakSelf?.console, BrokerConsole.serves(request) {
                    console.handle(request, responder)
                } else {
                    handler.handle(request, responder)
                }
            }
        }
        if let admin = configuration.adminListen {
            adminServer = try HTTPServer(loop: loop, address: admin) { request, _, responder in
                weakSelf?.admin(request, responder)
            }
        }
        sweepTimer?.start(after: 1000, repeatEvery: 1000) {
            weakSelf?.sweeper?.step()
            weakSelf?.deferred?.poke()
            weakSelf?.followPauses()
        }
    }

    /// After a step of deferred work: counted, and the targets it queued items for are woken.
    func deferredWorkDone(_ progress: (swept: Int, delivery: DeferredProgress)) {
        statistics.sweptMembers += progress.swept
        statistics.sweptTargetIndexEntries += progress.delivery.swept
        statistics.comparedMembers += progress.delivery.marked
        let queued = Set(progress.delivery.queued)
        guard !queued.isEmpty else { return }
        for w in workers where queued.contains(w.target.name) { w.kick() }
        feeds.changed(queued)
    }

    /// The operations listener: health, readiness and Prometheus metrics.
    func admin(_ request: HTTPRequest, _ responder: Responder) {
        switch request.path {
        case "/healthz":
            responder.respond(HTTPResponse(status: 200, contentType: "text/plain", body: "ok\n"))
        case "/readyz":
            let busy = writer.queuedWrites >= configuration.maxPendingBatches
            responder.respond(
                HTTPResponse(
                    status: server.isDraining || busy ? 503 : 200, contentType: "text/plain",
                    body: server.isDraining ? "draining\n" : busy ? "busy\n" : "ready\n"))
        case "/metrics":
            responder.respond(HTTPResponse(status: 200, contentType: "text/plain; version=0.0.4; charset=utf-8", body: metricsText()))
        default:
            responder.respond(HTTPResponse(status: 404, contentType: "text/plain", body: "try /healthz, /readyz or /metrics\n"))
        }
    }

    func recordPropagation(_ acceptedAt: [Int64]) {
        let now = unixMilliseconds()
        for a in acceptedAt { propagation.add(at: now, seconds: Double(max(0, now - a)) / 1000) }
    }

    /// Quantiles of propagation (agent acceptance → broker commit) over the last 10 s.
    public func propagationQuantiles(_ qs: [Double] = [0.5, 0.99]) -> (count: Int, values: [Double]) {
        propagation.quantiles(qs)
    }

    public func metricsText() -> String {
        var out = ""
        func metric(_ name: String, _ type: String, _ help: String, _ samples: [(String, String)]) {
            out += "# HELP \(name) \(help)\n# TYPE \(name) \(type)\n"
            for (labels, value) in samples { out += "\(name)\(labels) \(value)\n" }
        }
        metric(
            "scim_broker_build_info", "gauge", "Always 1; the version of this broker (from VERSION) as a label.",
            [("{version=\"\(scimEdgeVersion)\"}", "1")])
        let s = statistics
        metric("scim_broker_batches_total", "counter", "Batches received from agents.", [("", String(s.batches))])
        metric("scim_broker_events_applied_total", "counter", "Events applied to the directory.", [("", String(s.eventsApplied))])
        metric(
            "scim_broker_removed_group_members_swept_total", "counter",
            "Member index entries of removed groups removed after the group, 1,000 a transaction.", [("", String(s.sweptMembers))])
        metric(
            "scim_broker_target_group_index_swept_total", "counter",
            "Entries of a target's group member index removed after the group left the target, 1,000 a transaction.",
            [("", String(s.sweptTargetIndexEntries))])
        metric(
            "scim_broker_target_group_members_compared_total", "counter",
            "Members of groups back in a target's routes marked for comparison, 1,000 a transaction.", [("", String(s.comparedMembers))])
        metric(
            "scim_broker_store_commit_entries_max", "gauge",
            "The most entries (puts and deletes) one committed write transaction wrote since start.",
            [("", String(store.environment.heaviestCommitEntries))])
        let commits = writer.statistics
        metric(
            "scim_broker_store_commits_total", "counter", "Write transactions committed (group commits).", [("", String(commits.batches))])
        metric(
            "scim_broker_store_commit_weight_max", "gauge",
            "The heaviest commit since start: about how many index entries it changed (bounded, docs/protocol.md).",
            [("", String(commits.heaviestBatch))])
        metric(
            "scim_broker_membership_deltas_total", "counter", "Of them, group membership changes relayed as members added and removed.",
            [("", String(s.membershipDeltas))])
        metric(
            "scim_broker_events_duplicate_total", "counter", "Events acknowledged again without re-applying.", [("", String(s.duplicates))])
        metric("scim_broker_events_rejected_total", "counter", "Events refused for good.", [("", String(s.rejectedEvents))])
        metric("scim_broker_sequence_gaps_total", "counter", "Batches answered 409 expectedSeq.", [("", String(s.gaps))])
        metric(
            "scim_broker_refused_total", "counter", "Batches refused, by reason.",
            [
                ("{reason=\"domain_mismatch\"}", String(s.domainMismatches)), ("{reason=\"unknown_agent\"}", String(s.unknownIdentities)),
                ("{reason=\"ambiguous_identity\"}", String(s.ambiguousIdentities)),
                ("{reason=\"busy\"}", String(s.busyRefusals)),
            ])
        metric("scim_broker_pending_batches", "gauge", "Batches waiting to be applied.", [("", String(writer.queuedWrites))])
        metric(
            "scim_broker_tls_handshake_failures_total", "counter", "Refused TLS handshakes on the federation listener, by reason.",
            TLSFailureReason.allCases.map { ("{reason=\"\($0.rawValue)\"}", String(s.handshakeFailures[$0] ?? 0)) })
        metric(
            "scim_broker_certificate_closures_total", "counter",
            "Agent connections closed because their certificate expired or was revoked (checked on SIGHUP).",
            [("", String(server.statistics.certificateClosures))])
        metric(
            "scim_broker_certificate_expiry_timestamp_seconds", "gauge", "When the federation listener's certificate expires (Unix time).",
            [("", String(certificateNotAfter))])
        if configuration.tls.crlFile != nil {
            metric(
                "scim_broker_crl_next_update_timestamp_seconds", "gauge",
                "When the CRL loaded runs out (Unix time): past it OpenSSL refuses every agent, so issue it again before (scim-broker pki crl).",
                [("", String(crlNextUpdate))])
        }
        metric(
            "scim_broker_agent_certificate_expiry_timestamp_seconds", "gauge",
            "Per bound agent: when the certificate it last presented expires (Unix time).",
            agentCertificates.sorted { $0.key < $1.key }.map { ("{agent=\"\($0.key)\"}", String($0.value)) })
        let sequences = (try? store.agentSequences()) ?? []
        metric(
            "scim_broker_agent_applied_sequence", "gauge",
            "Per agent store (certificate identity and store epoch): the last sequence applied.",
            sequences.map { ("{agent=\"\($0.domain)/\($0.agent.identity)\",epoch=\"\($0.agent.epoch)\"}", String($0.sequence)) })
        out += propagation.summary(
            "scim_broker_propagation_seconds", "From the agent accepting a change to the broker's commit (last 10 s).")
        if !workers.isEmpty {
            out += targetMetrics(workers, prefix: "scim_broker", counters: counters, paused: { [pauses] in pauses[$0.target.name] != nil })
        }
        if !feeds.destinations.isEmpty { out += downlinkMetrics() }
        let info = store.environment.info
        metric("scim_broker_store_used_bytes", "gauge", "Bytes of the LMDB map in use.", [("", String(info.usedBytes))])
        return out
    }

    /// Stops both listeners after in-flight requests.
    public func shutdown(_ completion: @escaping () -> Void = {}) {
        let extra = [apiServer, adminServer].compactMap { $0 }
        sweepTimer?.close()
        sweepTimer = nil
        sweeper = nil
        deferred = nil
        feeds.closeAll()
        server.shutdown { [workers] in
            for w in workers { w.stop() }
            var remaining = extra.count
            if remaining == 0 { completion(); return }
            for s in extra {
                s.shutdown {
                    remaining -= 1; if remaining == 0 { completion() }
                }
            }
        }
    }

    public func installSignals(onDrained: @escaping () -> Void = {}) throws {
        signals = try ServiceSignals(
            loop: loop,
            onDrain: { [unowned self] in
                logger.info("draining")
                shutdown { [unowned self] in
                    signals?.close()
                    logger.info("drained")
                    onDrained()
                }
            }, onReload: { [unowned self] in reload() })
    }

    /// SIGHUP: re-reads the federation certificate, key, CA and CRL, then
    /// holds every live agent connection to them (one whose certificate was
    /// revoked since, or no longer chains, is closed at once), and re-reads
    /// each target's token file. Says what it reloaded.
    public func reload() {
        var parts: [String] = []
        do {
            try tls.reload()
            certificateNotAfter = CertificateSummary.expiry(ofFile: configuration.tls.certificateChainFile)
            crlNextUpdate = revocationListNextUpdate(ofFile: configuration.tls.crlFile)
            let closed = server.revalidatePeerCertificates()
            parts.append(
                "the federation certificate, key, CA\(configuration.tls.crlFile == nil ? "" : " and CRL")"
                    + " (\(closed) agent connection\(closed == 1 ? "" : "s") closed: certificate no longer valid)")
        } catch {
            logger.error("reload failed, keeping the old federation certificates: \(error)")
        }
        for w in workers { w.reload() }
        if !workers.isEmpty { parts.append("the tokens of targets " + workers.map(\.target.name).joined(separator: ", ")) }
        logger.notice("reloaded \(parts.isEmpty ? "nothing" : parts.joined(separator: "; "))")
    }

    /// What a peer's certificate is bound to.
    enum Binding: Equatable {
        case bound(DomainBinding)
        /// The certificate names no configured identity (or none that binds: a CN never does).
        case unbound
        /// It names identities of two bindings: it cannot be told which agent it is.
        case ambiguous([DomainBinding])
    }

    /// The binding whose identity one of the certificate's binding names
    /// (`PeerIdentity.bindingNames`: SAN URIs, else DNS SANs, never the CN)
    /// spells. A certificate that matches two bindings is refused: it could
    /// otherwise write as either agent.
    func binding(for peer: PeerIdentity?) -> Binding {
        guard let peer else { return .unbound }
        let names = peer.bindingNames
        var matches: [DomainBinding] = []
        for b in configuration.domains where names.contains(b.identity) && !matches.contains(b) { matches.append(b) }
        switch matches.count {
        case 0: return .unbound
        case 1: return .bound(matches[0])
        default: return .ambiguous(matches)
        }
    }

    /// A store epoch as agents send it: 1 to 64 letters, digits, `-` or `_`.
    static func validEpoch(_ s: String) -> Bool {
        !s.isEmpty && s.utf8.count <= 64
            && s.utf8.allSatisfy { c in
                (c >= 48 && c <= 57) || (c >= 65 && c <= 90) || (c >= 97 && c <= 122) || c == 45 || c == 95
            }
    }

    static func json(_ status: Int, _ body: JSON, headers: HTTPHeaders = HTTPHeaders()) -> HTTPResponse {
        var h = headers
        h.set("Content-Type", "application/json")
        return HTTPResponse(status: status, headers: h, body: body.serialized())
    }

    static func failure(_ status: Int, _ error: String, _ description: String) -> HTTPResponse {
        json(status, ["error": .string(error), "description": .string(description)])
    }

    func handle(_ request: HTTPRequest, _ context: RequestContext, _ responder: Responder) {
        guard request.path == "/federation/v1/events" || request.path == BrokerService.feedPath else {
            responder.respond(
                Self.failure(
                    404, "not_found", "the relay endpoint is POST /federation/v1/events, the downlink POST \(BrokerService.feedPath)"))
            return
        }
        guard request.method == "POST" else {
            responder.respond(Self.failure(405, "method_not_allowed", "use POST"))
            return
        }
        guard let bound = bind(context, responder) else { return }
        agentActivity["\(bound.domain)/\(bound.identity)", default: AgentActivity()].lastSeen = unixMilliseconds()
        if request.path == BrokerService.feedPath { return poll(request, bound, responder) }
        relay(request, context, bound, responder)
    }

    /// The certificate's binding (invariant 6), or nil when the request was
    /// refused for it (answered, logged and counted here).
    func bind(_ context: RequestContext, _ responder: Responder) -> DomainBinding? {
        switch binding(for: context.peerIdentity) {
        case .bound(let b):
            return b
        case .unbound:
            statistics.unknownIdentities += 1
            logger.warning(
                "refused: certificate identity is bound to no domain",
                metadata: ["identities": .string(context.peerIdentity?.names.joined(separator: ",") ?? "-")])
            responder.respond(
                Self.failure(
                    403, "unknown_agent",
                    "this certificate's identity is not bound to any domain (bindings match SAN URIs, else DNS SANs; never the subject CN)")
            )
            return nil
        case .ambiguous(let bindings):
            statistics.ambiguousIdentities += 1
            let named = bindings.map { "\($0.domain)=\($0.identity)" }.joined(separator: ", ")
            logger.error(
                "refused: certificate matches more than one binding",
                metadata: ["identities": .string(context.peerIdentity?.names.joined(separator: ",") ?? "-"), "bindings": .string(named)])
            responder.respond(
                Self.failure(
                    403, "ambiguous_identity",
                    "this certificate matches more than one binding (\(named)); give each agent a certificate of its own"))
            return nil
        }
    }

    /// Backpressure (invariant 4): with `maxPendingBatches` writes waiting,
    /// answers 503 + Retry-After (counted) and returns true.
    func refusedBusy(_ responder: Responder) -> Bool {
        guard writer.queuedWrites >= configuration.maxPendingBatches else { return false }
        statistics.busyRefusals += 1
        responder.respond(
            Self.failure(503, "busy", "the broker has \(writer.queuedWrites) writes waiting; retry later")
                .withHeader("Retry-After", String(configuration.retryAfterSeconds)))
        return true
    }

    /// `POST /federation/v1/events`: a batch of the uplink (relay protocol).
    func relay(_ request: HTTPRequest, _ context: RequestContext, _ bound: DomainBinding, _ responder: Responder) {
        let body: JSON
        do { body = try JSONParser.parse(request.body, limits: .relayBatch) } catch {
            responder.respond(Self.failure(400, "invalid_request", "the batch is not valid JSON: \(error)"))
            return
        }
        // The store epoch: the agent store's own identity. A re-imaged or a
        // second agent with this certificate has another one and so a
        // sequence of its own; no epoch is the single sequence of stores
        // made before epochs existed.
        var epoch = ""
        if let e = body["epoch"] {
            guard let text = e.stringValue, Self.validEpoch(text) else {
                responder.respond(Self.failure(400, "invalid_request", "'epoch' must be 1 to 64 letters, digits, '-' or '_'"))
                return
            }
            epoch = text
        }
        // Invariant 6: the domain is the certificate's; a batch claiming another is refused.
        guard body["domain"]?.stringValue == bound.domain else {
            statistics.domainMismatches += 1
            logger.warning(
                "refused: batch claims another domain",
                metadata: ["certificateDomain": .string(bound.domain), "claimed": .string(body["domain"]?.stringValue ?? "-")])
            responder.respond(
                Self.failure(
                    403, "domain_mismatch",
                    "this certificate belongs to domain '\(bound.domain)', not '\(body["domain"]?.stringValue ?? "")'"))
            return
        }
        guard let list = body["events"]?.arrayValue, !list.isEmpty, list.count <= configuration.maxEventsPerBatch else {
            responder.respond(Self.failure(400, "invalid_request", "'events' must hold 1 to \(configuration.maxEventsPerBatch) events"))
            return
        }
        var events: [RelayEvent] = []
        for e in list {
            guard let n = e["seq"]?.numberValue?.integer, n > 0 else {
                responder.respond(Self.failure(400, "invalid_request", "every event needs a positive 'seq'"))
                return
            }
            events.append(RelayEvent(seq: UInt64(n), body: e))
        }
        // Backpressure: refuse while too much waits to be applied; the agent's outbox holds it.
        if refusedBusy(responder) { return }
        if let notAfter = context.peerIdentity?.notAfter, notAfter > 0 { agentCertificates["\(bound.domain)/\(bound.identity)"] = notAfter }
        let store = self.store, domain = bound.domain, agent = bound.identity, key = AgentKey(identity: agent, epoch: epoch)
        statistics.batches += 1
        // A batch is applied in transactions of bounded weight (events and the
        // members they change): LMDB holds a transaction's dirty pages in
        // memory, so a batch of large membership changes must not become one
        // huge transaction. The parts go one after another, each once the one
        // before committed (one queued write per batch, as for backpressure);
        // each applies only what continues the sequence. A part that fails, or
        // does not cover all its events, ends the batch: the answer is what
        // committed (a 200 acknowledging that prefix, with its rejections, so
        // nothing refused is lost; the agent sends the rest again), or the
        // failure when nothing did.
        let parts = BrokerStore.applyParts(events.sorted { $0.seq < $1.seq }, maxWeight: BrokerStore.applyWeightPerTransaction)
        var done: [ApplyOutcome] = []
        func submit(_ k: Int) {
            let batch = parts[k].events, ids = newBrokerIDs(batch.count)
            writer.submit(
                { txn in try store.apply(domain: domain, agent: key, events: batch, newIDs: ids, in: txn) }, weight: parts[k].weight
            ) { [self] result in
                switch result {
                case .success(let o):
                    done.append(o)
                    if k + 1 < parts.count, o.ackedThrough >= batch[batch.count - 1].seq {
                        submit(k + 1)
                        return
                    }
                    answerBatch(.success(ApplyOutcome.merged(done)), domain: domain, agent: agent, key, responder)
                case .failure(let error):
                    if !done.isEmpty {
                        logger.error(
                            "apply failed part-way: the committed part is acknowledged",
                            metadata: ["domain": .string(domain), "error": .string("\(error)")])
                    }
                    answerBatch(
                        done.isEmpty ? .failure(error) : .success(ApplyOutcome.merged(done)), domain: domain, agent: agent, key, responder)
                }
            }
        }
        submit(0)
    }

    private func answerBatch(
        _ result: Result<ApplyOutcome, any Error>, domain: String, agent: String, _ key: AgentKey, _ responder: Responder
    ) {
        switch result {
        case .failure(let error):
            logger.error("apply failed", metadata: ["domain": .string(domain), "error": .string("\(error)")])
            responder.respond(
                Self.failure(503, "unavailable", "the batch could not be stored: \(error)")
                    .withHeader("Retry-After", "5"))
        case .success(let outcome):
            if outcome.newSequence {
                logger.notice(
                    "a new agent store: its sequence starts at 1",
                    metadata: ["domain": .string(domain), "agent": .string(agent), "epoch": .string(key.epoch)])
            }
            statistics.eventsApplied += outcome.applied
            agentActivity["\(domain)/\(agent)", default: AgentActivity()].batch(outcome)
            statistics.membershipDeltas += outcome.membershipDeltas
            for w in workers where outcome.fanout[w.target.name] != nil { w.kick() }
            feeds.changed(outcome.fanout.keys)
            recordPropagation(outcome.acceptedAt)
            statistics.duplicates += outcome.duplicates
            statistics.rejectedEvents += outcome.rejected.count
            if let expected = outcome.expectedSequence {
                statistics.gaps += 1
                responder.respond(Self.json(409, ["expectedSeq": .number(JSONNumber(integer: Int64(expected)))]))
                return
            }
            var rejected = JSONObject()
            for (seq, description) in outcome.rejected.sorted(by: { $0.key < $1.key }) {
                rejected[String(seq)] = ["err": "invalid_request", "description": .string(description)]
            }
            responder.respond(
                Self.json(
                    200,
                    [
                        "ackedThrough": .number(JSONNumber(integer: Int64(outcome.ackedThrough))),
                        "rejected": .object(rejected),
                        // What this broker understands: agents send membership deltas once they see 2.
                        "protocol": .number(JSONNumber(integer: Int64(BrokerStore.protocolVersion))),
                    ]))
        }
    }
}

public enum BrokerError: Error, CustomStringConvertible {
    case configuration(String)
    public var description: String {
        switch self {
        case .configuration(let m): return m
        }
    }
}

extension HTTPResponse {
    func withHeader(_ name: String, _ value: String) -> HTTPResponse {
        var r = self
        r.headers.set(name, value)
        return r
    }
}
