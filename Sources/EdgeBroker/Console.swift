import EdgeConfig
import EdgeDelivery
import EdgeHTTP
import EdgeLoop
import EdgeStore
import Logging
import SCIM

/// What the broker remembers of an agent's traffic, for the console.
struct AgentActivity {
    /// Unix ms of its last request (a batch or a feed poll).
    var lastSeen: Int64 = 0
    /// Unix ms of its last batch applied, and how many events it held.
    var lastBatchAt: Int64 = 0
    var lastBatchEvents = 0
    /// Seconds from the agent's acceptance of the oldest event of that
    /// batch to its commit here: how far behind the broker was then.
    var lagSeconds = 0.0

    mutating func batch(_ outcome: ApplyOutcome) {
        let now = unixMilliseconds()
        lastBatchAt = now
        lastBatchEvents = outcome.applied + outcome.duplicates
        if let oldest = outcome.acceptedAt.filter({ $0 > 0 }).min() { lagSeconds = Double(max(0, now - oldest)) / 1000 }
    }
}

/// The web console (`/console/` on the read API's listener): one static
/// page (`ConsoleAssets`) whose script polls the JSON endpoints under
/// `/console/api/`. Reading takes a read-API token or an operator token;
/// an action (a POST) takes an operator token. The token always travels in
/// the `Authorization` header, set by the page's script, never in a cookie:
/// a page of another site cannot make the browser send it, so a forged
/// request carries no credentials (no CSRF). The page itself holds no data
/// and is served without a token: a browser's navigation cannot carry one.
/// Each action calls what the command line calls (`OperatorActions.swift`,
/// the dead-letter and deletion-guard functions of the store), on the
/// thread pool, and then tells the running workers. What one request reads
/// is bounded (`TrailLimits.console`, `heldBudget`, `letterBytes`), and so
/// is how many wait for the pool (`maxInFlight`: then 503).
/// Threading: loop-confined (the broker's loop).
final class BrokerConsole {
    unowned let service: BrokerService
    let readTokens: [String]
    let operatorTokens: [String]
    static let apiPrefix = "/console/api/"
    /// The most dead letters, held removals and resources one answer lists.
    static let maxListed = 200
    /// Queue entries one walk for held removals reads at most (the overview's count, the list).
    static let heldBudget = 100_000
    /// A dead letter's request or response is shown up to this many bytes.
    static let bodyBytes = 16 << 10
    /// Stored bytes of dead letters one list reads at most (after the first letter).
    static let letterBytes = 8 << 20
    /// Console requests on the thread pool, running or waiting, at most: more get 503.
    static let maxInFlight = 4
    /// Counts that walk the store (resources per domain, dead letters and
    /// held removals per target).
    private var counts = CountCache()
    private var inFlight = 0
    private var refusals = RateLimitedLog()

    init(service: BrokerService, readTokens: [String], operatorTokens: [String]) {
        self.service = service
        self.readTokens = readTokens
        self.operatorTokens = operatorTokens
    }

    static func serves(_ request: HTTPRequest) -> Bool { request.path == "/console" || request.path.hasPrefix("/console/") }

    enum Role: String { case reader, `operator` }

    func handle(_ request: HTTPRequest, _ responder: Responder) {
        guard request.path.hasPrefix(Self.apiPrefix) else { return responder.respond(ConsoleAssets.response(for: request)) }
        do {
            try route(request, responder)
        } catch let e as SCIMError {
            refused(e, request)
            responder.respond(Self.failure(e))
        } catch {
            responder.respond(Self.failure(SCIMError(500, nil, "internal error: \(error)")))
        }
    }

    /// A refused request, logged at most `RateLimitedLog.perMinute` times a
    /// minute (many come before any token is checked), its path cut short.
    func refused(_ e: SCIMError, _ request: HTTPRequest? = nil) {
        guard let notLogged = refusals.admit(now: service.loop.now) else { return }
        var metadata: Logger.Metadata = [
            "status": .stringConvertible(e.status), "detail": .string(Self.shown(e.detail, 300)),
        ]
        if let request {
            metadata["method"] = .string(Self.shown(request.method, 16))
            metadata["path"] = .string(Self.shown(request.path))
        }
        if notLogged > 0 { metadata["notLogged"] = .stringConvertible(notLogged) }
        service.logger.warning("console: refused", metadata: metadata)
    }

    /// `text` cut to at most `bytes` bytes (on a character's boundary), with "…" when cut.
    static func shown(_ text: some StringProtocol, _ bytes: Int = 120) -> String {
        let utf8 = Array(text.utf8)
        guard utf8.count > bytes else { return String(text) }
        var n = bytes
        while n > 0 && utf8[n] & 0xC0 == 0x80 { n -= 1 }
        return String(decoding: utf8[..<n], as: UTF8.self) + "…"
    }

    static func failure(_ e: SCIMError) -> HTTPResponse {
        var r = answer(e.status, e.json, type: "application/scim+json")
        if e.status == 401 { r.headers.set("WWW-Authenticate", #"Bearer realm="scim-broker console""#) }
        if e.status == 503 { r.headers.set("Retry-After", "2") }
        return r
    }

    static func answer(_ status: Int, _ body: JSON, type: String = "application/json") -> HTTPResponse {
        ConsoleAssets.secured(
            HTTPResponse(status: status, headers: ["Content-Type": type, "Cache-Control": "no-store"], body: body.serialized()))
    }

    static func ok(_ body: JSONObject) -> HTTPResponse { answer(200, .object(body)) }

    /// Who the request's token makes it: 401 without a valid one.
    func role(_ request: HTTPRequest) throws -> Role {
        guard !request.hasRepeatedAuthorization else { throw SCIMError.invalidSyntax("more than one Authorization header field") }
        if !operatorTokens.isEmpty && request.hasBearerToken(in: operatorTokens) { return .operator }
        if request.hasBearerToken(in: readTokens) { return .reader }
        throw SCIMError(401, nil, "a valid bearer token is required (a read-API token, or an operator token for actions)")
    }

    /// An action: an operator's token, JSON, and no other site's page behind
    /// it (a browser names the page's origin; it must be this listener's).
    func checkAction(_ request: HTTPRequest, _ role: Role) throws -> JSONObject {
        guard role == .operator else {
            throw SCIMError(
                403, nil,
                operatorTokens.isEmpty
                    ? "actions need an operator token, and this broker has none (api.operatorTokens or api.operatorTokenFile)"
                    : "this token only reads: actions need an operator token")
        }
        if let origin = request.headers["Origin"] {
            guard
                Self.sameOrigin(origin, host: request.headers["Host"], forwardedProto: request.headers["X-Forwarded-Proto"])
            else {
                throw SCIMError(403, nil, "a request from another origin (\(Self.shown(origin))) is refused")
            }
        }
        let type = request.headers["Content-Type"]?.split(separator: ";", maxSplits: 1).first.map { String($0).trimmingSpaces }
        guard let type, type.lowercased() == "application/json" else {
            throw SCIMError(415, nil, "an action's body is JSON: Content-Type: application/json")
        }
        guard !request.body.isEmpty else { return [:] }
        let body: JSON
        do { body = try JSONParser.parse(request.body) } catch { throw error.scimError }
        guard let o = body.objectValue else { throw SCIMError.invalidSyntax("an action's body is a JSON object") }
        return o
    }

    /// Whether a browser's `Origin` is this listener as the browser reached
    /// it: the same scheme (http, or what a TLS-terminating proxy says in
    /// `X-Forwarded-Proto`), host and port (the scheme's default when not
    /// given) as `Host`.
    static func sameOrigin(_ origin: String, host: String?, forwardedProto: String?) -> Bool {
        let proto = forwardedProto?.split(separator: ",").first.map { String($0).trimmingSpaces.lowercased() }
        let scheme = proto == "https" ? "https" : "http"
        let parts = origin.split(separator: "/", omittingEmptySubsequences: false)
        guard parts.count == 3, parts[1].isEmpty, parts[0].lowercased() == scheme + ":", let host,
            let a = hostAndPort(parts[2], scheme: scheme), let b = hostAndPort(Substring(host), scheme: scheme)
        else { return false }
        return equalsIgnoringCase(a.host, b.host) && a.port == b.port
    }

    /// `host[:port]` or `[v6]:port`, the port defaulting to the scheme's; nil when malformed.
    static func hostAndPort(_ s: Substring, scheme: String) -> (host: String, port: Int)? {
        var host = s, port: Substring?
        if s.hasPrefix("[") {
            guard let close = s.firstIndex(of: "]") else { return nil }
            host = s[...close]
            let rest = s[s.index(after: close)...]
            if !rest.isEmpty {
                guard rest.first == ":" else { return nil }
                port = rest.dropFirst()
            }
        } else if let colon = s.firstIndex(of: ":") {
            host = s[..<colon]
            port = s[s.index(after: colon)...]
        }
        guard !host.isEmpty, !host.contains("@"), !host.contains(" ") else { return nil }
        guard let port else { return (String(host), scheme == "https" ? 443 : 80) }
        guard !port.isEmpty, port.count <= 5, port.allSatisfy(\.isASCII), let n = Int(port), n > 0, n <= 65535 else { return nil }
        return (String(host), n)
    }

    func route(_ request: HTTPRequest, _ responder: Responder) throws {
        let raw = request.path.dropFirst(Self.apiPrefix.count).split(separator: "/")
        let role = try self.role(request)
        // A target's name may hold any letter: the page percent-encodes it.
        let decoded = raw.map { percentDecode($0, plusIsSpace: false) }
        guard !decoded.contains(nil) else { throw SCIMError.invalidSyntax("malformed percent-encoding in the path") }
        let parts = decoded.map { $0! }
        guard let params = request.query.map(parseQueryString) ?? [:] else { throw SCIMError.invalidSyntax("malformed query string") }
        let read = request.method == "GET" || request.method == "HEAD"
        let path = Self.shown(request.path)
        func only(_ method: String) throws {
            let allowed = method == "GET" ? read : request.method == method
            guard allowed else { throw SCIMError(405, nil, "\(path) takes \(method)") }
        }
        switch parts.first {
        case "session":
            try only("GET")
            return responder.respond(
                Self.ok([
                    "role": .string(role.rawValue), "version": .string(scimEdgeVersion),
                    "actions": .bool(role == .operator),
                ]))
        case "overview":
            try only("GET")
            return try overview(responder)
        case "metrics":
            try only("GET")
            return responder.respond(Self.ok(metrics()))
        case "trace":
            try only("GET")
            guard let q = params["q"]?.trimmingSpaces, !q.isEmpty else {
                throw SCIMError.invalidValue("give q: a userName, an externalId, an email, a group's displayName, any id or a trace id")
            }
            return try trace(q, responder)
        case "targets" where parts.count >= 3:
            let target = try configuredTarget(parts[1])
            let action = parts[2...].joined(separator: "/")
            switch action {
            case "deadletters":
                try only("GET")
                return try deadLetters(target, responder)
            case "held":
                try only("GET")
                return try held(target, responder)
            case "push" where read:
                guard let id = params["id"], let since = params["since"].flatMap({ Int64($0) }) else {
                    throw SCIMError.invalidValue("give id (the broker id the push queued) and since (its queuedAt)")
                }
                return try pushAnswer(target, id, since, responder)
            case "pause", "resume", "push", "deadletters/retry", "deadletters/drop", "held/confirm", "held/reject":
                try only("POST")
                let body = try checkAction(request, role)
                return try act(action, target, body, responder)
            default:
                throw SCIMError.notFound("no console endpoint \(path)")
            }
        default:
            throw SCIMError.notFound("no console endpoint \(path)")
        }
    }

    func configuredTarget(_ name: String) throws -> TargetConfiguration {
        guard let t = service.configuration.targets.first(where: { $0.name == name }) else {
            let known = service.configuration.targets.map(\.name)
            throw SCIMError.notFound(
                "no target named '\(Self.shown(name))' (configured: \(known.isEmpty ? "none" : known.joined(separator: ", ")))")
        }
        return t
    }

    /// Runs `work` (store reads and writes: they may block) on the thread
    /// pool; `then` answers on the loop. At most `maxInFlight` wait or run:
    /// beyond, 503 with Retry-After (nothing is done).
    func offload<T>(
        _ responder: Responder, _ work: @escaping @Sendable () throws -> T, then: @escaping (T) throws -> HTTPResponse
    ) throws {
        guard inFlight < Self.maxInFlight else {
            throw SCIMError(503, nil, "the console has \(inFlight) requests on the broker's store already: try again shortly")
        }
        inFlight += 1
        let box = OffloadResult<T>()
        service.loop.offload({ box.result = Result { try work() } }) {
            self.inFlight -= 1
            do {
                responder.respond(try then(try box.result!.get()))
            } catch let e as SCIMError {
                self.refused(e)
                responder.respond(Self.failure(e))
            } catch {
                responder.respond(Self.failure(SCIMError(503, nil, "the broker's store could not be read: \(error)")))
            }
        }
    }

    /// A view built and serialized on the thread pool: the loop only sends it.
    func offloadAnswer(_ responder: Responder, _ work: @escaping @Sendable () throws -> JSONObject) throws {
        try offload(responder, { Self.ok(try work()) }, then: { $0 })
    }

    // MARK: what it shows

    func overview(_ responder: Responder) throws {
        let s = service, store = s.store, now = s.loop.now
        let targets = s.configuration.targets
        let due = Set(
            (s.configuration.domains.map { "domain/\($0.domain)" } + targets.flatMap { ["dead/\($0.name)", "held/\($0.name)"] })
                .filter { counts.due($0, now: now) })
        for (domain, t) in s.feeds.destinations { s.refreshBacklog(domain, t) }
        try offload(
            responder,
            {
                var counted: [String: HeldScan] = [:]
                var heldSince: [String: Int64] = [:]
                var feeds: [String: (BrokerStore.FeedPosition, Int64)] = [:]
                func count(_ n: Int) -> HeldScan { HeldScan(total: n, scanned: n) }
                for t in targets {
                    let guardState = try store.deletionGuard(target: t.name)
                    heldSince[t.name] = guardState.pausedSince
                    if guardState.pausedSince == nil {
                        counted["held/\(t.name)"] = count(0)
                    } else if due.contains("held/\(t.name)") {
                        // The walk's cost is what it read of the queue, however few it found.
                        counted["held/\(t.name)"] = try store.scanHeld(target: t.name, listed: 0, budget: Self.heldBudget)
                    }
                    if due.contains("dead/\(t.name)") { counted["dead/\(t.name)"] = count(try store.deadLetterCount(target: t.name)) }
                    if t.destination != nil {
                        feeds[t.name] = (try store.feedPosition(target: t.name), try store.feedOldest(target: t.name))
                    }
                }
                for key in due where key.hasPrefix("domain/") {
                    counted[key] = count(try store.resourceCount(domain: String(key.dropFirst("domain/".count))))
                }
                return (try store.agentSequences(), heldSince, feeds, counted, try store.count("User"), try store.count("Group"))
            },
            then: { [self] (sequences, heldSince, feeds, counted, users, groups) in
                for (key, c) in counted {
                    counts.set(key, c.total, cost: c.scanned, complete: c.complete, now: now, at: unixMilliseconds())
                }
                return Self.ok([
                    "now": .number(JSONNumber(integer: unixMilliseconds())), "version": .string(scimEdgeVersion),
                    "startedAt": .number(JSONNumber(integer: s.startedAt)),
                    "resources": ["User": .int(users), "Group": .int(groups)],
                    "federation": .object(federation(sequences, feeds)),
                    "targets": .array(
                        targets.filter { $0.destination == nil }.map { .object(targetSummary($0, heldSince: heldSince[$0.name])) }),
                ])
            })
    }

    func federation(_ sequences: [AgentSequence], _ feeds: [String: (BrokerStore.FeedPosition, Int64)]) -> JSONObject {
        let s = service
        let connected = s.server.connectedPeers.map(\.bindingNames)
        let destinations = s.configuration.targets.filter { $0.destination != nil }
        let domains: [JSON] = s.configuration.domains.map { b in
            let key = "\(b.domain)/\(b.identity)"
            let activity = s.agentActivity[key]
            let connections = connected.filter { $0.contains(b.identity) }.count
            let stores: [JSON] = sequences.filter { $0.domain == b.domain && $0.agent.identity == b.identity }.map {
                ["epoch": .string($0.agent.epoch), "applied": .number(JSONNumber(integer: Int64($0.sequence)))]
            }
            var o: JSONObject = [
                "domain": .string(b.domain), "identity": .string(b.identity), "connected": .bool(connections > 0),
                "connections": .int(connections), "stores": .array(stores),
                "destinationOf": .array(destinations.filter { $0.destination == b.domain }.map { .string($0.name) }),
            ]
            counts.describe("domain/\(b.domain)", as: "resources", in: &o)
            o["lastSeen"] = activity.map { .number(JSONNumber(integer: $0.lastSeen)) } ?? .null
            o["lastBatch"] = activity.flatMap { $0.lastBatchAt > 0 ? .number(JSONNumber(integer: $0.lastBatchAt)) : nil } ?? .null
            o["lastBatchEvents"] = activity.map { .int($0.lastBatchEvents) } ?? .null
            o["lagSeconds"] = activity.flatMap { $0.lastBatchAt > 0 ? Self.number($0.lagSeconds) : nil } ?? .null
            o["certificateExpiry"] = s.agentCertificates[key].map { .number(JSONNumber(integer: $0)) } ?? .null
            return .object(o)
        }
        let feedList: [JSON] = destinations.map { t in
            let domain = t.destination!
            let backlog = s.feeds.backlog[domain]
            var o: JSONObject = [
                "target": .string(t.name), "domain": .string(domain), "queued": .int(backlog?.count ?? 0),
                "oldestQueuedAt": .number(JSONNumber(integer: backlog?.oldest ?? 0)),
                "polling": .bool(s.feeds.parked[domain] != nil), "served": .int(s.feeds.served[domain] ?? 0),
            ]
            if let (position, oldest) = feeds[t.name] {
                o["feed"] = [
                    "issued": .number(JSONNumber(integer: Int64(position.issued))),
                    "acked": .number(JSONNumber(integer: Int64(position.acked))), "unacked": .int(position.unacked),
                    "oldestUnackedAt": .number(JSONNumber(integer: oldest)),
                ]
            }
            return .object(o)
        }
        return [
            "listen": .string(s.server.address.description), "pendingBatches": .int(s.writer.queuedWrites),
            "domains": .array(domains), "destinations": .array(feedList),
        ]
    }

    /// A target as its worker sees it, with the operator's pause, the dead
    /// letters and the deletion guard.
    func targetSummary(_ t: TargetConfiguration, heldSince: Int64?) -> JSONObject {
        let worker = service.workers.first { $0.target.name == t.name }
        var o: JSONObject = worker?.statusDocument() ?? ["target": .string(t.name)]
        o["updatedAt"] = nil
        if let worker {
            // Since the broker started: a resume replaces the worker, and its counters carry over.
            let c = service.counters(worker)
            for (key, n) in [
                ("delivered", c.delivered), ("deadLettered", c.deadLettered), ("retries", c.retries), ("throttled", c.throttled),
                ("adopted", c.adopted),
            ] { o[key] = .int(n) }
        }
        if let pause = service.pauses[t.name] {
            o["state"] = "paused"
            o["paused"] = .object(pause.json)
        } else {
            o["paused"] = .null
        }
        counts.describe("dead/\(t.name)", as: "deadLetters", in: &o)
        counts.describe("held/\(t.name)", as: "held", in: &o)
        o["heldSince"] = heldSince.map { .number(JSONNumber(integer: $0)) } ?? .null
        return o
    }

    /// Counters and recent latencies: the page draws its chart from the
    /// differences between two polls.
    func metrics() -> JSONObject {
        let s = service
        let (n, q) = s.propagationQuantiles([0.5, 0.99])
        let targets: [JSON] = s.workers.map { w in
            let (count, tq) = w.recent.quantiles([0.5, 0.99])
            let c = s.counters(w)
            return [
                "target": .string(w.target.name), "delivered": .int(c.delivered), "deadLettered": .int(c.deadLettered),
                "retries": .int(c.retries), "throttled": .int(c.throttled), "queued": .int(w.depth),
                "latency": ["count": .int(count), "p50": Self.number(tq[0]), "p99": Self.number(tq[1])],
            ]
        }
        return [
            "at": .number(JSONNumber(integer: unixMilliseconds())), "batches": .int(s.statistics.batches),
            "eventsApplied": .int(s.statistics.eventsApplied), "duplicates": .int(s.statistics.duplicates),
            "rejected": .int(s.statistics.rejectedEvents), "busy": .int(s.statistics.busyRefusals),
            "pendingBatches": .int(s.writer.queuedWrites),
            "propagation": ["count": .int(n), "p50": Self.number(q[0]), "p99": Self.number(q[1])],
            "targets": .array(targets),
        ]
    }

    static func number(_ d: Double) -> JSON {
        guard d.isFinite else { return .int(0) }
        return .number(JSONNumber(String((d * 1_000_000).rounded() / 1_000_000)) ?? JSONNumber(integer: 0))
    }

    func trace(_ q: String, _ responder: Responder) throws {
        let store = service.store
        try offloadAnswer(responder) {
            let found = try store.trail(q, limits: .console)
            var resources: [JSON] = []
            for id in Set(found.hops.map(\.brokerID)).sorted().prefix(Self.maxListed) {
                var o: JSONObject = ["id": .string(id)]
                if let (domain, type, r) = try store.resource(brokerID: id, members: false) {
                    o["type"] = .string(type)
                    o["domain"] = .string(domain)
                    o["name"] = r[type == "User" ? "userName" : "displayName"] ?? .null
                    o["externalId"] = r["externalId"] ?? .null
                } else {
                    o["gone"] = true
                }
                resources.append(.object(o))
            }
            var answer: JSONObject = [
                "query": .string(q), "total": .int(found.total), "complete": .bool(found.complete),
                "resourcesTotal": .int(found.resourcesTotal), "resourcesRead": .int(found.resources.count),
                "resources": .array(resources),
                "hops": .array(
                    found.hops.map { h in
                        var o = h.hop
                        o["id"] = .string(h.brokerID)
                        return .object(o)
                    }),
            ]
            if found.hops.isEmpty, let read = found.scanStopped {
                answer["notFound"] = .string(
                    "nothing names \(Self.shown(q)); a trace id that reached no target yet is looked for in the first \(read) of the directory's resources only: give a broker id, a userName, an externalId or an id at the source"
                )
            }
            return answer
        }
    }

    func deadLetters(_ t: TargetConfiguration, _ responder: Responder) throws {
        let store = service.store, name = t.name
        try offloadAnswer(responder) {
            let page = try store.consoleDeadLetters(
                target: name, limit: Self.maxListed, bytes: Self.letterBytes, bodyBytes: Self.bodyBytes)
            return [
                "target": .string(name), "total": .int(page.total), "lastSeq": .number(JSONNumber(integer: Int64(page.lastSeq))),
                "letters": .array(page.letters.map(JSON.object)),
            ]
        }
    }

    func held(_ t: TargetConfiguration, _ responder: Responder) throws {
        let store = service.store, name = t.name
        try offloadAnswer(responder) {
            let scan = try store.scanHeld(target: name, listed: Self.maxListed, budget: Self.heldBudget)
            return [
                "target": .string(name), "pausedSince": scan.pausedSince.map { .number(JSONNumber(integer: $0)) } ?? .null,
                "total": .int(scan.total), "complete": .bool(scan.complete), "scanned": .int(scan.scanned),
                "lastSeq": .number(JSONNumber(integer: Int64(scan.lastSeq))), "removals": .array(scan.removals.map(\.json)),
            ]
        }
    }

    func pushAnswer(_ t: TargetConfiguration, _ id: String, _ since: Int64, _ responder: Responder) throws {
        let store = service.store, name = t.name
        try offload(
            responder, { try store.pushAnswer(target: name, brokerID: id, since: since) },
            then: { hop in
                var o: JSONObject = ["target": .string(name), "id": .string(id), "done": .bool(hop != nil)]
                o["hop"] = hop.map(JSON.object) ?? .null
                o["delivered"] = hop.map { .bool(PushPlan.delivered($0)) } ?? .null
                return Self.ok(o)
            })
    }

    // MARK: actions

    /// An action refused because the store holds more, or less, than the operator was shown: 409.
    static func conflicts<T>(_ work: () throws -> T) throws -> T {
        do { return try work() } catch let e as DeletionGuardError {
            throw SCIMError(409, nil, e.description)
        } catch let e as DeadLetterError {
            throw SCIMError(409, nil, e.description)
        }
    }

    /// One action of an operator, by the code the command line runs. An
    /// action on everything listed names the highest queue or dead-letter
    /// sequence the operator was shown (`through`): 409, and nothing done,
    /// when there is more now.
    func act(_ action: String, _ t: TargetConfiguration, _ body: JSONObject, _ responder: Responder) throws {
        let store = service.store, name = t.name
        func log(_ count: Int, _ detail: String) {
            service.logger.notice(
                "console: \(action)", metadata: ["target": .string(name), "count": .stringConvertible(count), "detail": .string(detail)])
        }
        func seq(_ key: String) throws -> UInt64? {
            guard let v = body[key], !v.isNull else { return nil }
            guard let n = v.numberValue?.integer, n > 0 else { throw SCIMError.invalidValue("'\(key)' must be a positive integer (#N)") }
            return UInt64(n)
        }
        if body["all"] != nil && action != "push" {
            throw SCIMError.invalidValue(
                "give 'through': the highest #N you were shown (the list's lastSeq); 'all' is for the command line")
        }
        switch action {
        case _ where t.destination != nil && ["pause", "resume", "push"].contains(action):
            throw SCIMError(
                409, nil, "\(name) is a boundary: its agent fetches the feed; \(action) it there (or stop its polling) instead")
        case "pause", "resume":
            var reason = "paused by an operator (console)"
            if let r = body["reason"] {
                guard let text = r.stringValue, !text.isEmpty, text.count <= 500 else {
                    throw SCIMError.invalidValue("'reason' must be a string of 1 to 500 characters")
                }
                reason = text
            }
            let why = reason
            try offload(
                responder, { action == "pause" ? try store.pauseTarget(name, reason: why) : try store.resumeTarget(name) },
                then: { [self] pause in
                    service.followPauses()
                    log(action == "pause" || pause != nil ? 1 : 0, action == "pause" ? reason : pause == nil ? "was not paused" : "resumed")
                    var o: JSONObject = ["target": .string(name), "paused": .bool(action == "pause")]
                    o["pause"] = pause.map { .object($0.json) } ?? .null
                    return Self.ok(o)
                })
        case "push":
            guard let resource = body["resource"]?.stringValue?.trimmingSpaces, !resource.isEmpty else {
                throw SCIMError.invalidValue("give 'resource': a userName, an externalId, an email, a displayName or any id")
            }
            try offload(
                responder,
                {
                    do { return try store.push(resource, to: t) } catch let e as PushError {
                        if case .ambiguous = e { throw SCIMError(409, nil, e.description) }
                        throw SCIMError.notFound(e.description)
                    }
                },
                then: { [self] plan in
                    if plan.trace != nil { service.queuedByOperator(target: name, 1) }
                    log(
                        plan.trace == nil ? 0 : 1,
                        "\(Self.shown(resource)): " + (plan.trace.map { "queued, trace \($0)" } ?? "out of scope"))
                    var o = plan.json
                    o["target"] = .string(name)
                    o["paused"] = .bool(service.pauses[name] != nil)
                    return Self.ok(o)
                })
        case "deadletters/retry", "deadletters/drop":
            let number = try seq("seq"), through = try seq("through")
            let requeue = action == "deadletters/retry"
            guard (number == nil) != (through == nil) else {
                throw SCIMError.invalidValue(
                    "give 'seq' (#N) for one, or 'through' (the highest #N you were shown) for every one up to it; not both")
            }
            let link = t.collisions.linkPolicy
            try offload(
                responder,
                {
                    try Self.conflicts {
                        try store.settleDeadLetters(target: name, seq: number, requeue: requeue, linkPolicy: link, through: through)
                    }
                },
                then: { [self] n in
                    if requeue && n > 0 { service.queuedByOperator(target: name, n) }
                    log(n, (requeue ? "queued again" : "dropped") + (number.map { " #\($0)" } ?? through.map { " up to #\($0)" } ?? ""))
                    return Self.ok(["target": .string(name), requeue ? "retried" : "dropped": .int(n)])
                })
        case "held/confirm":
            guard let through = try seq("through") else {
                throw SCIMError.invalidValue(
                    "give 'through': the highest queue sequence (#N) of the held removals you were shown (lastSeq)")
            }
            try offload(
                responder, { try Self.conflicts { try store.confirmDeletes(target: name, through: through) } },
                then: { _ in
                    log(0, "removals up to #\(through) released")
                    return Self.ok(["target": .string(name), "confirmed": true])
                })
        case "held/reject":
            var seqs: [UInt64]?
            if let list = body["seqs"], !list.isNull {
                guard let items = list.arrayValue, !items.isEmpty else {
                    throw SCIMError.invalidValue("'seqs' must be a list of queue sequences (#N of the held removals)")
                }
                seqs = try items.map { v in
                    guard let n = v.numberValue?.integer, n > 0 else { throw SCIMError.invalidValue("'seqs' holds positive integers") }
                    return UInt64(n)
                }
            }
            let through = try seq("through")
            guard (seqs == nil) != (through == nil) else {
                throw SCIMError.invalidValue(
                    "give 'seqs' (the queue sequences to reject), or 'through' (the highest #N you were shown) for every one; not both")
            }
            let chosen = seqs
            try offload(
                responder, { try Self.conflicts { try store.rejectHeldRemovals(target: name, seqs: chosen, through: through) } },
                then: { result in
                    log(result.rejected.count, "rejected" + (through.map { " up to #\($0)" } ?? ""))
                    return Self.ok([
                        "target": .string(name), "rejected": .array(result.rejected.map(\.json)), "stillHeld": .int(result.stillHeld),
                        "resumed": .bool(result.resumed),
                    ])
                })
        default:
            throw SCIMError.notFound("no console action \(action)")
        }
    }
}

extension BrokerStore {
    /// The console's page of dead letters: the oldest `limit`, read until
    /// `bytes` stored bytes (at least one letter), each request and response
    /// cut to `bodyBytes` (`truncated` names those, `requestBytes` and
    /// `responseBytes` their size); how many there are (keys only), and the
    /// highest sequence (what "Retry all" and "Drop all" name).
    func consoleDeadLetters(target: String, limit: Int, bytes: Int, bodyBytes: Int) throws
        -> (letters: [JSONObject], total: Int, lastSeq: UInt64)
    {
        let targetDead = self.targetDead
        return try environment.read { txn in
            var total = 0
            var lastSeq: UInt64 = 0
            try txn.scanKeys(targetDead, from: prefixed(target, []), to: prefixEnd(target)) { k in
                total += 1
                lastSeq = UInt64(bigEndianBytes: Array(k.suffix(8))) ?? lastSeq
                return true
            }
            var letters: [JSONObject] = []
            var read = 0
            try txn.scan(targetDead, from: prefixed(target, []), to: prefixEnd(target)) { _, v in
                guard letters.count < limit, letters.isEmpty || read + v.count <= bytes else { return false }
                read += v.count
                guard var o = try JSONParser.parse(v, limits: .stored).objectValue else { return true }
                var cut: [JSON] = []
                for field in ["request", "response"] {
                    guard let text = o[field]?.stringValue, text.utf8.count > bodyBytes else { continue }
                    o[field] = .string(BrokerConsole.shown(text, bodyBytes))
                    o[field + "Bytes"] = .int(text.utf8.count)
                    cut.append(.string(field))
                }
                if !cut.isEmpty { o["truncated"] = .array(cut) }
                letters.append(o)
                return true
            }
            return (letters, total, lastSeq)
        }
    }
}

/// A pool thread's result, read on the loop afterwards (libuv orders the two).
private final class OffloadResult<T>: @unchecked Sendable {
    var result: Result<T, Error>?
}

/// Counts that walk keys of the store, for the console's overview: taken
/// at every poll while the walk is short, at most every 30 s once it read
/// more than 10,000 entries (a count of held removals walks the whole
/// queue, however few it finds), so that an open console costs little on a
/// large store. The overview says when each was taken, and `≥` for one that
/// stopped at its budget. Threading: loop-confined.
struct CountCache {
    static let small = 10_000
    static let interval: UInt64 = 30_000
    struct Count {
        var at: UInt64
        /// Unix ms, for the page.
        var takenAt: Int64
        var value: Int
        var cost: Int
        var complete: Bool
    }
    private var counts: [String: Count] = [:]

    func due(_ key: String, now: UInt64) -> Bool { counts[key].map { $0.cost < Self.small || now >= $0.at + Self.interval } ?? true }
    func value(_ key: String) -> Int? { counts[key]?.value }
    mutating func set(_ key: String, _ value: Int, cost: Int, complete: Bool = true, now: UInt64, at: Int64) {
        counts[key] = Count(at: now, takenAt: at, value: value, cost: cost, complete: complete)
    }

    /// `name` (the count, or null), `nameComplete` (false: at least that
    /// many) and `nameCountedAt` (Unix ms) in `o`.
    func describe(_ key: String, as name: String, in o: inout JSONObject) {
        let c = counts[key]
        o[name] = c.map { .int($0.value) } ?? .null
        o[name + "Complete"] = .bool(c?.complete ?? true)
        o[name + "CountedAt"] = c.map { .number(JSONNumber(integer: $0.takenAt)) } ?? .null
    }
}

/// A log line that may come from anyone (a refused request): at most
/// `perMinute` a minute; the next one logged says how many were not.
/// Threading: loop-confined.
struct RateLimitedLog {
    static let perMinute = 20
    private var windowStart: UInt64 = 0
    private var logged = 0
    private var dropped = 0

    /// Nil: do not log this one. Else how many were not logged before it.
    mutating func admit(now: UInt64) -> Int? {
        if now >= windowStart + 60_000 {
            windowStart = now
            logged = 0
        }
        guard logged < Self.perMinute else {
            dropped += 1
            return nil
        }
        logged += 1
        defer { dropped = 0 }
        return dropped
    }
}
