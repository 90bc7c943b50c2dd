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
/// thread pool, and then tells the running workers.
/// Threading: loop-confined (the broker's loop).
final class BrokerConsole {
    unowned let service: BrokerService
    let readTokens: [String]
    let operatorTokens: [String]
    static let apiPrefix = "/console/api/"
    /// The most dead letters, held removals and hops one answer lists.
    static let maxListed = 200
    static let maxHops = 1000
    /// Counts that walk the store (resources per domain, dead letters and
    /// held removals per target).
    private var counts = CountCache()

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
            service.logger.warning(
                "console: refused",
                metadata: [
                    "method": .string(request.method), "path": .string(String(request.path)), "status": .stringConvertible(e.status),
                    "detail": .string(e.detail),
                ])
            responder.respond(Self.failure(e))
        } catch {
            responder.respond(Self.failure(SCIMError(500, nil, "internal error: \(error)")))
        }
    }

    static func failure(_ e: SCIMError) -> HTTPResponse {
        var r = answer(e.status, e.json, type: "application/scim+json")
        if e.status == 401 { r.headers.set("WWW-Authenticate", #"Bearer realm="scim-broker console""#) }
        return r
    }

    static func answer(_ status: Int, _ body: JSON, type: String = "application/json") -> HTTPResponse {
        var r = HTTPResponse(status: status, headers: ["Content-Type": type, "Cache-Control": "no-store"], body: body.serialized())
        r.headers.set("X-Content-Type-Options", "nosniff")
        return r
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
            let host = request.headers["Host"] ?? ""
            let named = origin.split(separator: "/", omittingEmptySubsequences: true).dropFirst().first.map(String.init) ?? ""
            guard !host.isEmpty, equalsIgnoringCase(named, host) else {
                throw SCIMError(403, nil, "a request from another origin (\(origin)) is refused")
            }
        }
        guard let type = request.headers["Content-Type"], type.lowercased().hasPrefix("application/json") else {
            throw SCIMError(415, nil, "an action's body is JSON: Content-Type: application/json")
        }
        guard !request.body.isEmpty else { return [:] }
        let body: JSON
        do { body = try JSONParser.parse(request.body) } catch { throw error.scimError }
        guard let o = body.objectValue else { throw SCIMError.invalidSyntax("an action's body is a JSON object") }
        return o
    }

    func route(_ request: HTTPRequest, _ responder: Responder) throws {
        let parts = request.path.dropFirst(Self.apiPrefix.count).split(separator: "/").map(String.init)
        let role = try self.role(request)
        guard let params = request.query.map(parseQueryString) ?? [:] else { throw SCIMError.invalidSyntax("malformed query string") }
        let read = request.method == "GET" || request.method == "HEAD"
        func only(_ method: String) throws {
            let allowed = method == "GET" ? read : request.method == method
            guard allowed else { throw SCIMError(405, nil, "\(request.path) takes \(method)") }
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
            return overview(responder)
        case "metrics":
            try only("GET")
            return responder.respond(Self.ok(metrics()))
        case "trace":
            try only("GET")
            guard let q = params["q"]?.trimmingSpaces, !q.isEmpty else {
                throw SCIMError.invalidValue("give q: a userName, an externalId, an email, a group's displayName, any id or a trace id")
            }
            return trace(q, responder)
        case "targets" where parts.count >= 3:
            let target = try configuredTarget(parts[1])
            let action = parts[2...].joined(separator: "/")
            switch action {
            case "deadletters":
                try only("GET")
                return deadLetters(target, responder)
            case "held":
                try only("GET")
                return held(target, responder)
            case "push" where read:
                guard let id = params["id"], let since = params["since"].flatMap({ Int64($0) }) else {
                    throw SCIMError.invalidValue("give id (the broker id the push queued) and since (its queuedAt)")
                }
                return pushAnswer(target, id, since, responder)
            case "pause", "resume", "push", "deadletters/retry", "deadletters/drop", "held/confirm", "held/reject":
                try only("POST")
                let body = try checkAction(request, role)
                return try act(action, target, body, responder)
            default:
                throw SCIMError.notFound("no console endpoint \(request.path)")
            }
        default:
            throw SCIMError.notFound("no console endpoint \(request.path)")
        }
    }

    func configuredTarget(_ name: String) throws -> TargetConfiguration {
        guard let t = service.configuration.targets.first(where: { $0.name == name }) else {
            let known = service.configuration.targets.map(\.name)
            throw SCIMError.notFound("no target named '\(name)' (configured: \(known.isEmpty ? "none" : known.joined(separator: ", ")))")
        }
        return t
    }

    /// Runs `work` (store reads and writes: they may block) on the thread
    /// pool; `then` answers on the loop.
    func offload<T>(
        _ responder: Responder, _ work: @escaping @Sendable () throws -> T, then: @escaping (T) throws -> HTTPResponse
    ) {
        let box = OffloadResult<T>()
        service.loop.offload({ box.result = Result { try work() } }) {
            do {
                responder.respond(try then(try box.result!.get()))
            } catch let e as SCIMError {
                self.service.logger.warning(
                    "console: refused", metadata: ["status": .stringConvertible(e.status), "detail": .string(e.detail)])
                responder.respond(Self.failure(e))
            } catch {
                responder.respond(Self.failure(SCIMError(503, nil, "the broker's store could not be read: \(error)")))
            }
        }
    }

    // MARK: what it shows

    func overview(_ responder: Responder) {
        let s = service, store = s.store, now = s.loop.now
        let targets = s.configuration.targets
        let due = Set(
            (s.configuration.domains.map { "domain/\($0.domain)" } + targets.flatMap { ["dead/\($0.name)", "held/\($0.name)"] })
                .filter { counts.due($0, now: now) })
        for (domain, t) in s.feeds.destinations { s.refreshBacklog(domain, t) }
        offload(
            responder,
            {
                var counted: [String: Int] = [:]
                var heldSince: [String: Int64] = [:]
                var feeds: [String: (BrokerStore.FeedPosition, Int64)] = [:]
                for t in targets {
                    let guardState = try store.deletionGuard(target: t.name)
                    heldSince[t.name] = guardState.pausedSince
                    if guardState.pausedSince == nil {
                        counted["held/\(t.name)"] = 0
                    } else if due.contains("held/\(t.name)") {
                        counted["held/\(t.name)"] = try store.heldRemovals(target: t.name).removals.count
                    }
                    if due.contains("dead/\(t.name)") { counted["dead/\(t.name)"] = try store.deadLetterCount(target: t.name) }
                    if t.destination != nil {
                        feeds[t.name] = (try store.feedPosition(target: t.name), try store.feedOldest(target: t.name))
                    }
                }
                for key in due where key.hasPrefix("domain/") {
                    counted[key] = try store.resourceCount(domain: String(key.dropFirst("domain/".count)))
                }
                return (try store.agentSequences(), heldSince, feeds, counted, try store.count("User"), try store.count("Group"))
            },
            then: { [self] (sequences, heldSince, feeds, counted, users, groups) in
                for (key, n) in counted { counts.set(key, n, now: now) }
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
            o["resources"] = counts.value("domain/\(b.domain)").map(JSON.int) ?? .null
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
        o["deadLetters"] = .int(counts.value("dead/\(t.name)") ?? 0)
        o["held"] = .int(counts.value("held/\(t.name)") ?? 0)
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

    func trace(_ q: String, _ responder: Responder) {
        let store = service.store
        offload(
            responder,
            {
                let hops = try store.trail(q)
                var resources: [JSON] = []
                for id in Set(hops.map(\.brokerID)).sorted().prefix(Self.maxListed) {
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
                return (hops, resources)
            },
            then: { hops, resources in
                Self.ok([
                    "query": .string(q), "total": .int(hops.count), "resources": .array(resources),
                    "hops": .array(
                        hops.prefix(Self.maxHops).map { h in
                            var o = h.hop
                            o["id"] = .string(h.brokerID)
                            return .object(o)
                        }),
                ])
            })
    }

    func deadLetters(_ t: TargetConfiguration, _ responder: Responder) {
        let store = service.store, name = t.name
        offload(
            responder, { (try store.deadLetterCount(target: name), try store.deadLetters(target: name, limit: Self.maxListed)) },
            then: { total, letters in
                Self.ok(["target": .string(name), "total": .int(total), "letters": .array(letters.map { .object($0.letter) })])
            })
    }

    func held(_ t: TargetConfiguration, _ responder: Responder) {
        let store = service.store, name = t.name
        offload(
            responder, { try store.heldRemovals(target: name) },
            then: { pausedSince, removals in
                Self.ok([
                    "target": .string(name), "pausedSince": pausedSince.map { .number(JSONNumber(integer: $0)) } ?? .null,
                    "total": .int(removals.count), "removals": .array(removals.prefix(Self.maxListed).map(\.json)),
                ])
            })
    }

    func pushAnswer(_ t: TargetConfiguration, _ id: String, _ since: Int64, _ responder: Responder) {
        let store = service.store, name = t.name
        offload(
            responder, { try store.pushAnswer(target: name, brokerID: id, since: since) },
            then: { hop in
                var o: JSONObject = ["target": .string(name), "id": .string(id), "done": .bool(hop != nil)]
                o["hop"] = hop.map(JSON.object) ?? .null
                o["delivered"] = hop.map { .bool(PushPlan.delivered($0)) } ?? .null
                return Self.ok(o)
            })
    }

    // MARK: actions

    /// One action of an operator, by the code the command line runs.
    func act(_ action: String, _ t: TargetConfiguration, _ body: JSONObject, _ responder: Responder) throws {
        let store = service.store, name = t.name
        func log(_ detail: String) {
            service.logger.notice("console: \(action)", metadata: ["target": .string(name), "detail": .string(detail)])
        }
        func seq(_ key: String) throws -> UInt64? {
            guard let v = body[key], !v.isNull else { return nil }
            guard let n = v.numberValue?.integer, n > 0 else { throw SCIMError.invalidValue("'\(key)' must be a positive integer (#N)") }
            return UInt64(n)
        }
        switch action {
        case "pause", "resume":
            guard t.destination == nil else {
                throw SCIMError(
                    409, nil, "\(name) is a boundary: its agent fetches the feed; pause it there (or stop its polling) instead")
            }
            var reason = "paused by an operator (console)"
            if let r = body["reason"] {
                guard let text = r.stringValue, !text.isEmpty, text.count <= 500 else {
                    throw SCIMError.invalidValue("'reason' must be a string of 1 to 500 characters")
                }
                reason = text
            }
            let why = reason
            offload(
                responder, { action == "pause" ? try store.pauseTarget(name, reason: why) : try store.resumeTarget(name) },
                then: { [self] pause in
                    service.followPauses()
                    log(action == "pause" ? reason : pause == nil ? "was not paused" : "resumed")
                    var o: JSONObject = ["target": .string(name), "paused": .bool(action == "pause")]
                    o["pause"] = pause.map { .object($0.json) } ?? .null
                    return Self.ok(o)
                })
        case "push":
            guard let resource = body["resource"]?.stringValue?.trimmingSpaces, !resource.isEmpty else {
                throw SCIMError.invalidValue("give 'resource': a userName, an externalId, an email, a displayName or any id")
            }
            offload(
                responder,
                {
                    do { return try store.push(resource, to: t) } catch let e as PushError {
                        if case .ambiguous = e { throw SCIMError(409, nil, e.description) }
                        throw SCIMError.notFound(e.description)
                    }
                },
                then: { [self] plan in
                    if plan.trace != nil { service.queuedByOperator(target: name, 1) }
                    log("\(resource): " + (plan.trace.map { "queued, trace \($0)" } ?? "out of scope"))
                    var o = plan.json
                    o["target"] = .string(name)
                    o["paused"] = .bool(service.pauses[name] != nil)
                    return Self.ok(o)
                })
        case "deadletters/retry", "deadletters/drop":
            let number = try seq("seq")
            let all = body["all"]?.boolValue ?? false
            let requeue = action == "deadletters/retry"
            // Forgetting is for good: every one only when asked in so many words (as `deadletter drop --all`).
            if !requeue && number == nil && !all { throw SCIMError.invalidValue("give 'seq' (#N), or 'all': true to drop every one") }
            if number != nil && all { throw SCIMError.invalidValue("give 'seq' or 'all', not both") }
            let link = t.collisions.linkPolicy
            offload(
                responder, { try store.settleDeadLetters(target: name, seq: number, requeue: requeue, linkPolicy: link) },
                then: { [self] n in
                    if requeue && n > 0 { service.queuedByOperator(target: name, n) }
                    log("\(n) " + (requeue ? "queued again" : "dropped"))
                    return Self.ok(["target": .string(name), requeue ? "retried" : "dropped": .int(n)])
                })
        case "held/confirm":
            offload(
                responder, { try store.confirmDeletes(target: name) },
                then: { _ in
                    log("removals released")
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
            let chosen = seqs
            offload(
                responder,
                {
                    do { return try store.rejectHeldRemovals(target: name, seqs: chosen) } catch let e as DeletionGuardError {
                        throw SCIMError(409, nil, e.description)
                    }
                },
                then: { result in
                    log("\(result.rejected.count) rejected")
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

/// A pool thread's result, read on the loop afterwards (libuv orders the two).
private final class OffloadResult<T>: @unchecked Sendable {
    var result: Result<T, Error>?
}

/// Counts that walk keys of the store, for the console's overview: taken
/// at every poll while small, at most every 30 s once large, so that an
/// open console costs little on a large store. Threading: loop-confined.
struct CountCache {
    static let small = 10_000
    private var counts: [String: (at: UInt64, value: Int)] = [:]

    func due(_ key: String, now: UInt64) -> Bool { counts[key].map { $0.value < Self.small || now >= $0.at + 30_000 } ?? true }
    func value(_ key: String) -> Int? { counts[key]?.value }
    mutating func set(_ key: String, _ value: Int, now: UInt64) { counts[key] = (now, value) }
}
