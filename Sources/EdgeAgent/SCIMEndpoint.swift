import EdgeConfig
import EdgeHTTP
import EdgeLog
import EdgeLoop
import EdgeStore
import EdgeTLS
import Glibc
import Logging
import SCIM
import Synchronization

/// Settings of the SCIM endpoint.
public struct EndpointOptions: Sendable {
    /// Path prefix of the SCIM API.
    public var basePath = "/scim/v2"
    /// Bearer tokens accepted (any of them).
    public var tokens: [String] = []
    public var profile = ClientProfile.lenient
    public var maxResults = AgentOptions.maxResults.defaultInteger
    /// Filters without an index lookup scan at most this many resources.
    public var scanBudget = AgentOptions.scanBudget.defaultInteger
    public var bulkMaxOperations = 1000
    public var bulkMaxPayloadSize = 1 << 20
    /// Append relay events to the outbox: with a broker always
    /// (`AgentConfiguration.recordsOutbox`); off by default, as for a
    /// standalone agent nothing would drain it (`outbox.keep`).
    public var recordOutbox = false
    /// Backpressure: at or above either high watermark writes get 503 +
    /// Retry-After until the outbox is at or below both low watermarks. The
    /// configuration sets the high ones through `limitOutbox`, which derives
    /// the low ones by the one rule (`lowWatermark`).
    public var outboxHighEvents = AgentOptions.outboxMaxEvents.defaultInteger
    public var outboxLowEvents = EndpointOptions.lowWatermark(AgentOptions.outboxMaxEvents.defaultInteger)
    public var outboxHighBytes = AgentOptions.outboxMaxBytes.defaultInteger
    public var outboxLowBytes = EndpointOptions.lowWatermark(AgentOptions.outboxMaxBytes.defaultInteger)

    /// Four fifths of a high watermark: writes resume when the outbox has
    /// drained a fifth of its limit, so backpressure does not flap.
    public static func lowWatermark(_ high: Int) -> Int { high - high / 5 }

    /// Sets the outbox's high watermarks (nil: unchanged) and their low ones.
    public mutating func limitOutbox(events: Int? = nil, bytes: Int? = nil) {
        if let events { (outboxHighEvents, outboxLowEvents) = (events, Self.lowWatermark(events)) }
        if let bytes { (outboxHighBytes, outboxLowBytes) = (bytes, Self.lowWatermark(bytes)) }
    }
    public var retryAfterSeconds = 5
    /// A PATCH of a group answers 200 with the whole group (members from the
    /// index) while it has at most this many members, else 204 No Content
    /// (RFC 7644 §3.5.2 allows either): rendering every member into each
    /// PATCH response would make adding one member cost O(n). A request
    /// whose `attributes` / `excludedAttributes` leave members out gets 200.
    public var patchResponseMaxMembers = AgentOptions.patchResponseMaxMembers.defaultInteger
    /// Writes waiting for group commit; past this, writes get 503 at once
    /// (a bounded queue: invariant 4).
    public var maxQueuedWrites = 10_000
    public init() {}
}

/// Request counters and a latency histogram, rendered by `/metrics`.
public struct EndpointMetrics: Sendable {
    public static let buckets: [Double] = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5]
    /// `method|resource|status` → count.
    public var requests: [String: Int] = [:]
    public var latencyBuckets = [Int](repeating: 0, count: EndpointMetrics.buckets.count)
    public var latencyCount = 0
    public var latencySum = 0.0
    public var backpressureRejections = 0

    mutating func record(method: String, resource: String, status: Int, seconds: Double) {
        requests["\(method)|\(resource)|\(status)", default: 0] += 1
        latencyCount += 1
        latencySum += seconds
        for (k, le) in EndpointMetrics.buckets.enumerated() where seconds <= le { latencyBuckets[k] += 1 }
    }

    /// Adds another serving loop's figures to these.
    public mutating func merge(_ other: EndpointMetrics) {
        requests.merge(other.requests, uniquingKeysWith: +)
        for k in latencyBuckets.indices { latencyBuckets[k] += other.latencyBuckets[k] }
        latencyCount += other.latencyCount
        latencySum += other.latencySum
        backpressureRejections += other.backpressureRejections
    }
}

/// One endpoint's metrics, recorded on its loop and read by the operations
/// listener on another.
public final class MetricsCell: Sendable {
    let state = Mutex(EndpointMetrics())
    public init() {}
    public var snapshot: EndpointMetrics { state.withLock { $0 } }
    func update(_ body: (inout EndpointMetrics) -> Void) { state.withLock { body(&$0) } }
}

/// Answers a request and records it in the endpoint's metrics.
final class Reply {
    let responder: Responder
    let started: UInt64
    let method: String
    let path: Substring
    let resource: String
    /// From the request's `traceparent`, or new: on the log line and the relay event.
    let traceID: String
    unowned let endpoint: SCIMEndpoint

    init(_ responder: Responder, request: HTTPRequest, resource: String, endpoint: SCIMEndpoint) {
        self.responder = responder
        self.started = monotonicNanoseconds()
        self.method = request.method
        self.path = request.path
        self.resource = resource
        self.traceID = EdgeAgent.traceID(request.headers["traceparent"]) ?? endpoint.newTraceID()
        self.endpoint = endpoint
    }

    func respond(_ response: HTTPResponse) {
        let seconds = Double(monotonicNanoseconds() - started) / 1e9
        endpoint.metricsCell.update { $0.record(method: method, resource: resource, status: response.status, seconds: seconds) }
        if let sink = endpoint.accessLog {
            if endpoint.logger.logLevel <= .info {
                sink.request(
                    logger: endpoint.logger.label, method: method, path: path, status: response.status,
                    milliseconds: Int(seconds * 1000), trace: traceID, clock: &endpoint.logClock)
            }
        } else {
            endpoint.logger.info(
                "request",
                metadata: [
                    "trace": .string(traceID), "method": .string(method), "path": .string(String(path)),
                    "status": .string(String(response.status)), "ms": .string(String(Int(seconds * 1000))),
                ])
        }
        responder.respond(response)
    }
}

/// What the endpoints of one agent share across their loops: the count of
/// writes not yet answered (bounded queue) and the backpressure state.
public final class EndpointShared: Sendable {
    /// Writes submitted and not yet answered, on every loop.
    public let queuedWrites = Atomic<Int>(0)
    let refusingWrites = Atomic<Bool>(false)
    /// Called (on whichever loop noticed) when backpressure starts or ends.
    let onChange: Mutex<(@Sendable (Bool, Int, Int) -> Void)?> = Mutex(nil)

    public init() {}

    public var backpressure: Bool { refusingWrites.load(ordering: .relaxed) }

    /// Flips the state; only the caller that flipped it reports the change.
    func change(to on: Bool, events: Int, bytes: Int) {
        guard refusingWrites.compareExchange(expected: !on, desired: on, ordering: .relaxed).exchanged else { return }
        onChange.withLock { $0 }?(on, events, bytes)
    }
}

/// The agent's SCIM 2.0 service provider over HTTP (RFC 7644).
///
/// Every write is answered only after its resource and outbox event are
/// committed durably (group commit). An agent runs one endpoint per serving
/// loop; they share the store, the writer and `shared`. Threading: loop-confined.
public final class SCIMEndpoint {
    public let store: AgentStore
    public let writer: GroupCommitWriter
    /// This endpoint's loop, for write completions; nil: the writer's own loop.
    let inbox: LoopInbox?
    public let shared: EndpointShared
    public var options: EndpointOptions
    let registry: SchemaRegistry
    let features: ServiceProviderFeatures
    public private(set) var requestCount = 0
    /// Trace ids for requests without `traceparent` (loop-confined).
    var traceRandom = Xoshiro256()
    /// Read by the operations listener on another loop, hence the lock.
    public let metricsCell = MetricsCell()
    public var metrics: EndpointMetrics { metricsCell.snapshot }
    /// Request log: one line per request (see `JSONLogHandler`).
    public var logger = Logger(label: "scim-edge.scim")
    /// When set, request lines go straight to this sink (the same JSON as
    /// `JSONLogHandler`, built faster) instead of through `logger`.
    public var accessLog: LogSink?
    var logClock = LogClock()
    var defaultProjections: [String: Projection] = [:]
    /// True while writes are refused because the outbox is over its watermark.
    public var backpressure: Bool { shared.backpressure }
    /// Called after each successful write commit (the relay sends soon after).
    public var onCommitted: (() -> Void)?

    /// `inbox`: this endpoint's loop, when that is not the writer's own.
    public init(
        store: AgentStore, writer: GroupCommitWriter, inbox: LoopInbox? = nil, options: EndpointOptions,
        shared: EndpointShared = EndpointShared()
    ) {
        self.store = store
        self.writer = writer
        self.inbox = inbox
        self.shared = shared
        self.options = options
        self.registry = store.registry
        var f = ServiceProviderFeatures()
        f.filterMaxResults = options.maxResults
        f.bulkMaxOperations = options.bulkMaxOperations
        f.bulkMaxPayloadSize = options.bulkMaxPayloadSize
        features = f
    }

    /// The SCIM error body for protocol errors of the HTTP layer (400, 413, …).
    public static func errorResponse(_ status: Int, _ detail: String) -> HTTPResponse {
        respond(SCIMError(status, status == 400 ? .invalidSyntax : nil, detail))
    }

    static func respond(_ error: SCIMError, headers: HTTPHeaders = HTTPHeaders()) -> HTTPResponse {
        var h = headers
        h.set("Content-Type", "application/scim+json")
        return HTTPResponse(status: error.status, headers: h, body: error.json.serialized())
    }

    static func respond(_ status: Int, _ body: JSON, headers: HTTPHeaders = HTTPHeaders()) -> HTTPResponse {
        var h = headers
        h.set("Content-Type", "application/scim+json")
        return HTTPResponse(status: status, headers: h, body: body.serialized())
    }

    // MARK: routing

    public func handle(_ request: HTTPRequest, _ httpResponder: Responder) {
        requestCount += 1
        let path = request.path
        let inBase = path.hasPrefix(options.basePath)
        // Path segments split on bytes (a Character split runs grapheme breaking).
        let parts =
            inBase ? path.dropFirst(options.basePath.count).utf8.split(separator: UInt8(ascii: "/")).map { String(Substring($0)) } : []
        let responder = Reply(httpResponder, request: request, resource: resourceLabel(inBase, parts), endpoint: self)
        guard inBase else {
            responder.respond(Self.respond(.notFound("no such endpoint: \(path)")))
            return
        }
        guard !request.hasRepeatedAuthorization else {
            responder.respond(Self.respond(.invalidSyntax("more than one Authorization header field")))
            return
        }
        guard authorized(request) else {
            responder.respond(
                Self.respond(
                    SCIMError(401, nil, "a valid bearer token is required"),
                    headers: ["WWW-Authenticate": #"Bearer realm="scim-edge""#]))
            return
        }
        let base = baseURL(request)
        if isWrite(request, parts), let refusal = checkBackpressure() {
            metricsCell.update { $0.backpressureRejections += 1 }
            responder.respond(Self.respond(refusal, headers: ["Retry-After": String(options.retryAfterSeconds)]))
            return
        }
        do {
            try route(request, parts, base, responder)
        } catch let error as SCIMError {
            responder.respond(Self.respond(error))
        } catch {
            responder.respond(Self.respond(SCIMError(500, nil, "internal error: \(error)")))
        }
    }

    /// The metrics label of a path: its resource type or endpoint name.
    func resourceLabel(_ inBase: Bool, _ parts: [String]) -> String {
        guard inBase else { return "other" }
        let first = parts.first ?? ""
        return registry.resourceType(endpoint: "/" + first)?.id ?? (first.isEmpty ? "root" : first)
    }

    /// A new trace id (128 random bits, W3C trace context) for a request that
    /// brought none: from a fast generator seeded once from the system's
    /// secure source (a trace id identifies, it does not authorise).
    func newTraceID() -> String {
        var bytes = [UInt8](repeating: 0, count: 16)
        for k in 0..<2 {
            let v = traceRandom.next()
            for b in 0..<8 { bytes[k * 8 + b] = UInt8(truncatingIfNeeded: v >> UInt64(b * 8)) }
        }
        return hexString(bytes)
    }

    func isWrite(_ request: HTTPRequest, _ parts: [String]) -> Bool {
        switch request.method {
        case "PUT", "PATCH", "DELETE": return true
        case "POST": return parts.last != ".search"
        default: return false
        }
    }

    /// Writes are refused (503) from a high watermark of the outbox down to
    /// its low watermark: pushback to the IdP, never dropping an event.
    func checkBackpressure() -> SCIMError? {
        let queued = shared.queuedWrites.load(ordering: .relaxed)
        if queued >= options.maxQueuedWrites {
            return SCIMError(503, nil, "\(queued) writes are waiting for the store; retry after \(options.retryAfterSeconds) s")
        }
        guard options.recordOutbox else { return nil }
        let events: Int, bytes: Int
        do {
            (events, bytes) = try updateBackpressure()
        } catch {
            // The outbox's size is unknown: refuse the write rather than let
            // the outbox grow unbounded (the shared state stays as it was).
            logger.error("cannot read the outbox's size; refusing the write", metadata: ["error": .string("\(error)")])
            return SCIMError(503, nil, "cannot read the outbox's size (\(error)); retry after \(options.retryAfterSeconds) s")
        }
        guard backpressure else { return nil }
        return SCIMError(
            503, nil,
            "the outbox holds \(events) events (\(bytes) bytes) not yet relayed; writes resume when it drains below \(options.outboxLowEvents) events; retry after \(options.retryAfterSeconds) s"
        )
    }

    /// Reads the outbox's size and moves the backpressure state across the
    /// watermarks (on for every loop of the agent: `shared`).
    @discardableResult
    func updateBackpressure() throws -> (events: Int, bytes: Int) {
        let (events, bytes) = try store.outboxUsage()
        if backpressure {
            if events <= options.outboxLowEvents && bytes <= options.outboxLowBytes {
                shared.change(to: false, events: events, bytes: bytes)
            }
        } else if events >= options.outboxHighEvents || bytes >= options.outboxHighBytes {
            shared.change(to: true, events: events, bytes: bytes)
        }
        return (events, bytes)
    }

    /// The relay pruned acknowledged events: backpressure may end now, not
    /// only at the next write (so /readyz and the metric follow the drain).
    public func outboxShrank() {
        guard options.recordOutbox, backpressure else { return }
        do { try updateBackpressure() } catch {
            logger.error("cannot read the outbox's size after an acknowledgement", metadata: ["error": .string("\(error)")])
        }
    }

    func route(_ request: HTTPRequest, _ parts: [String], _ base: String, _ responder: Reply) throws {
        let method = request.method
        switch parts.first {
        case nil:
            throw SCIMError.notFound("name a resource endpoint such as /Users")
        case "ServiceProviderConfig":
            guard parts.count == 1 else { throw SCIMError.notFound("no such endpoint") }
            try onlyGET(method)
            var config = features.json
            if case .object(var o) = config {
                o["meta"] = ["resourceType": "ServiceProviderConfig", "location": .string("\(base)/ServiceProviderConfig")];
                config = .object(o)
            }
            responder.respond(Self.respond(200, config))
        case "Schemas":
            try discovery(method, parts, "schema", list: registry.schemasDocument) { registry.schema($0)?.json }
                .map { responder.respond(Self.respond(200, $0)) }
        case "ResourceTypes":
            try discovery(method, parts, "resource type", list: registry.resourceTypesDocument) { registry.resourceType($0)?.json }
                .map { responder.respond(Self.respond(200, $0)) }
        case "Me":
            throw SCIMError(501, nil, "/Me is not supported: the agent does not authenticate end users")
        case "Bulk":
            guard parts.count == 1 else { throw SCIMError.notFound("no such endpoint") }
            guard method == "POST" else { throw methodNotAllowed(method, "POST") }
            try bulk(request, base, responder)
        case ".search":
            guard method == "POST" else { throw methodNotAllowed(method, "POST") }
            try search(request, types: registry.resourceTypes, base: base, responder)
        case let endpoint?:
            guard let type = registry.resourceType(endpoint: "/" + endpoint) else {
                throw SCIMError.notFound("no such endpoint: /\(endpoint)")
            }
            try resource(request, type, Array(parts.dropFirst()), base, responder)
        }
    }

    func resource(
        _ request: HTTPRequest, _ type: ResourceType, _ rest: [String], _ base: String,
        _ responder: Reply
    ) throws {
        let method = request.method
        switch rest.count {
        case 0:
            switch method {
            case "GET": try list(request, type, base, responder)
            case "POST": try create(request, type, base, responder)
            default: throw methodNotAllowed(method, "GET, POST")
            }
        case 1 where rest[0] == ".search":
            guard method == "POST" else { throw methodNotAllowed(method, "POST") }
            try search(request, types: [type], base: base, responder)
        case 1:
            let id = rest[0]
            switch method {
            case "GET": try read(request, type, id, base, responder)
            case "PUT": try replace(request, type, id, base, responder)
            case "PATCH": try patch(request, type, id, base, responder)
            case "DELETE": try delete(request, type, id, responder)
            default: throw methodNotAllowed(method, "GET, PUT, PATCH, DELETE")
            }
        default:
            throw SCIMError.notFound("no such endpoint")
        }
    }

    /// `/Schemas` and `/ResourceTypes`: the list, or one entry by id.
    func discovery(
        _ method: String, _ parts: [String], _ what: String, list: JSON,
        entry: (String) -> JSON?
    ) throws -> JSON? {
        try onlyGET(method)
        guard parts.count <= 2 else { throw SCIMError.notFound("no such endpoint") }
        guard parts.count == 2 else { return list }
        guard let found = entry(parts[1]) else { throw SCIMError.notFound("no \(what) \(parts[1])") }
        return found
    }

    func onlyGET(_ method: String) throws {
        guard method == "GET" || method == "HEAD" else { throw methodNotAllowed(method, "GET") }
    }

    func methodNotAllowed(_ method: String, _ allowed: String) -> SCIMError {
        SCIMError(405, nil, "\(method) is not allowed here; use \(allowed)")
    }

    // MARK: reads

    func read(_ request: HTTPRequest, _ type: ResourceType, _ id: String, _ base: String, _ responder: Reply) throws {
        var stored: JSONObject = [:]
        if request.query == nil {
            // The common case: the body straight from the stored bytes.
            switch try store.getForDefaultRead(type, id, baseURL: base) {
            case .notFound: throw SCIMError.notFound("\(type.id) \(id) not found")
            case .general(let returned): stored = returned
            case .body(let body, let version):
                guard try passesPreconditions(request, version, responder) else { return }
                var headers = resourceHeaders(version: version, type, id: id, base)
                headers.set("Content-Type", "application/scim+json")
                responder.respond(HTTPResponse(status: 200, headers: headers, body: body))
                return
            case .streamed(let head, let version):
                // A large group: its members follow as the connection drains (bounded memory).
                guard try passesPreconditions(request, version, responder) else { return }
                responder.respond(
                    Self.streamed(
                        pieces(head: head, then: store.memberPieces(of: id)), headers: resourceHeaders(version: version, type, id: id, base)
                    ))
                return
            }
        }
        let projection: Projection
        if request.query == nil {
            projection = defaultProjection(type)
        } else {
            let params = try queryParameters(request)
            projection = try ListQuery(
                parameters: params.filter { ["attributes", "excludedattributes"].contains($0.key.asciiLowercased) },
                registry: registry, type: type, maxResults: options.maxResults, profile: options.profile
            ).projection
            // A projection without members never reads the members index.
            guard let (returned, streamMembers) = try store.getForProjectedRead(type, id, baseURL: base, members: projection.returnsMembers)
            else {
                throw SCIMError.notFound("\(type.id) \(id) not found")
            }
            if streamMembers {
                // A large group whose members the projection keeps: its attributes, then its members
                // from the index (each projected), as the unprojected GET streams them.
                guard try passesPreconditions(request, returned["meta"]?["version"]?.stringValue, responder) else { return }
                responder.respond(
                    Self.streamed(
                        streamedResource(
                            try output(returned, type, base, projection),
                            members: store.memberPieces(of: id, element: projection.memberElement)),
                        headers: etagHeaders(returned, type, base)))
                return
            }
            stored = returned
        }
        guard try passesPreconditions(request, stored["meta"]?["version"]?.stringValue, responder) else { return }
        responder.respond(
            Self.respond(
                200, .object(try output(stored, type, base, projection)),
                headers: etagHeaders(stored, type, base)))
    }

    /// `If-None-Match` / `If-Match` on a read: false when answered (304) here.
    func passesPreconditions(_ request: HTTPRequest, _ version: String?, _ responder: Reply) throws -> Bool {
        switch ETag.evaluate(
            ifMatch: request.headers["If-Match"], ifNoneMatch: request.headers["If-None-Match"],
            current: version, isRead: true)
        {
        case .notModified:
            responder.respond(HTTPResponse(status: 304, headers: ["ETag": version ?? ""]))
            return false
        case .preconditionFailed:
            throw SCIMError(412, nil, "If-Match does not match the current version \(version ?? "-")")
        case .proceed:
            return true
        }
    }

    func list(_ request: HTTPRequest, _ type: ResourceType, _ base: String, _ responder: Reply) throws {
        let query = try ListQuery(
            parameters: try queryParameters(request), registry: registry, type: type,
            maxResults: options.maxResults, profile: options.profile)
        try answer(query, types: [type], base, responder)
    }

    func search(_ request: HTTPRequest, types: [ResourceType], base: String, _ responder: Reply) throws {
        let body = try parseBody(request)
        var queries: [(ResourceType, ListQuery)] = []
        var firstError: SCIMError?
        for type in types {
            // A root search skips the types the filter does not fit.
            do throws(SCIMError) {
                queries.append(
                    (
                        type,
                        try ListQuery(
                            searchBody: body, registry: registry, type: type,
                            maxResults: options.maxResults, profile: options.profile)
                    ))
            } catch {
                if firstError == nil { firstError = error }
            }
        }
        guard !queries.isEmpty else { throw firstError! }
        try answer(
            queries[0].1, types: queries.map(\.0), base, responder,
            perType: Dictionary(queries.map { ($0.0.id, $0.1) }, uniquingKeysWith: { a, _ in a }))
    }

    func answer(
        _ query: ListQuery, types: [ResourceType], _ base: String, _ responder: Reply,
        perType: [String: ListQuery] = [:]
    ) throws {
        if types.count == 1 {
            // One type: walked from where the page starts (AgentStore.list).
            let type = types[0], q = perType[type.id] ?? query
            let page = try store.list(type, q, scanBudget: options.scanBudget)
            try respondList(page, base, responder) { (type, $0, q.projection) }
            return
        }
        // A root search over several types: each within the budget, merged in memory.
        var matches: [(ResourceType, JSONObject)] = []
        for type in types {
            let q = perType[type.id] ?? query
            matches += try store.query(type, filter: q.filter, scanBudget: options.scanBudget).map { (type, $0) }
        }
        let page = try query.paginate(matches, sortable: types.count == 1) { $0.1 }
        try respondList(page, base, responder) { ($0.0, $0.1, (perType[$0.0.id] ?? query).projection) }
    }

    /// The ListResponse of a page of stored resources, each of its type and
    /// projection (`shape`): built in memory, or, when the groups whose
    /// members it returns hold more than `streamedArrayAbove` members
    /// together, streamed: each resource in turn, each such group's
    /// attributes then its members from the index a chunk at a time (each
    /// chunk in a read snapshot of its own), so that memory holds a chunk,
    /// not the groups. A page whose projection drops the members never
    /// reads the members index.
    func respondList<Element>(
        _ page: ListPage<Element>, _ base: String, _ responder: Reply,
        _ shape: @escaping (Element) -> (ResourceType, JSONObject, Projection)
    ) throws {
        func streamsMembers(_ r: JSONObject, _ projection: Projection) -> String? {
            projection.returnsMembers && r["members"] == nil ? r["id"]?.stringValue : nil
        }
        let groups = page.items.compactMap { e in
            let (_, r, projection) = shape(e)
            return streamsMembers(r, projection)
        }
        if !groups.isEmpty, try store.hasMoreMembers(groups, than: streamedArrayAbove) {
            let store = self.store
            responder.respond(
                Self.streamed(
                    streamedListResponse(page) { [self] e in
                        let (type, r, projection) = shape(e)
                        if let id = streamsMembers(r, projection) {
                            return streamedResource(
                                try output(r, type, base, projection),
                                members: store.memberPieces(of: id, element: projection.memberElement))
                        }
                        let returned = try store.asReturned(r, type, baseURL: base, members: false)
                        return onePiece(JSON.object(try output(returned, type, base, projection)).serialized())
                    }))
            return
        }
        responder.respond(
            Self.respond(
                200,
                try makeListResponse(page) { e in
                    let (type, r, projection) = shape(e)
                    return JSON.object(
                        try output(
                            try store.asReturned(r, type, baseURL: base, members: projection.returnsMembers), type, base, projection))
                }))
    }

    /// A 200 whose body is streamed from `pieces`.
    static func streamed(_ pieces: @escaping BodyPieces, headers: HTTPHeaders = HTTPHeaders()) -> HTTPResponse {
        var h = headers
        h.set("Content-Type", "application/scim+json")
        return HTTPResponse(status: 200, headers: h, stream: BodyStream(pieces))
    }

    /// A resource as returned (`AgentStore.asReturned`) with its
    /// `meta.location`, projected.
    func output(_ returned: JSONObject, _ type: ResourceType, _ base: String, _ projection: Projection) throws -> JSONObject {
        var r = returned
        if var meta = r["meta"]?.objectValue, let id = r["id"]?.stringValue {
            meta["location"] = .string("\(base)\(type.endpoint)/\(id)")
            r["meta"] = .object(meta)
        }
        return projection.apply(to: r)
    }

    /// The projection of a request without `attributes` or `excludedAttributes`, per type.
    func defaultProjection(_ type: ResourceType) -> Projection {
        if let p = defaultProjections[type.id] { return p }
        let p = Projection.none(registry: registry, type: type)
        defaultProjections[type.id] = p
        return p
    }

    func etagHeaders(_ stored: JSONObject, _ type: ResourceType, _ base: String) -> HTTPHeaders {
        resourceHeaders(version: stored["meta"]?["version"]?.stringValue, type, id: stored["id"]?.stringValue, base)
    }

    /// `ETag` and `Location` of a resource response.
    func resourceHeaders(version: String?, _ type: ResourceType, id: String?, _ base: String) -> HTTPHeaders {
        var h = HTTPHeaders()
        if let version { h.set("ETag", version) }
        if let id { h.set("Location", "\(base)\(type.endpoint)/\(id)") }
        return h
    }

    // MARK: writes

    func create(_ request: HTTPRequest, _ type: ResourceType, _ base: String, _ responder: Reply) throws {
        let body = try parseBody(request)
        let validated = try ResourceValidator(registry: registry, type: type, profile: options.profile).validateCreate(body)
        submit(.create(type, validated: validated), request, type, base, status: 201, responder)
    }

    func replace(_ request: HTTPRequest, _ type: ResourceType, _ id: String, _ base: String, _ responder: Reply) throws {
        submit(.replace(type, id: id, body: try parseBody(request)), request, type, base, status: 200, responder)
    }

    func patch(_ request: HTTPRequest, _ type: ResourceType, _ id: String, _ base: String, _ responder: Reply) throws {
        let patch = try PatchRequest(try parseBody(request), registry: registry, type: type, profile: options.profile)
        submit(.patch(type, id: id, request: patch), request, type, base, status: 200, responder)
    }

    func delete(_ request: HTTPRequest, _ type: ResourceType, _ id: String, _ responder: Reply) throws {
        submit(.delete(type, id: id), request, type, "", status: 204, responder)
    }

    /// Commits `write` through group commit; answers after the durable commit.
    func submit(
        _ write: AgentWrite, _ request: HTTPRequest, _ type: ResourceType, _ base: String, status: Int,
        _ responder: Reply, projection: Projection? = nil
    ) {
        let ctx = makeContext(request, trace: responder.traceID)
        perform(write, ctx) { [self] result in
            switch result {
            case .failure(let error):
                responder.respond(Self.respond(error))
            case .success(nil):
                responder.respond(HTTPResponse(status: status))
            case .success(let stored?):
                do {
                    let params = try queryParameters(request)
                    let shape =
                        try projection
                        ?? ListQuery(
                            parameters: params.filter { ["attributes", "excludedattributes"].contains($0.key.asciiLowercased) },
                            registry: registry, type: type, maxResults: options.maxResults
                        ).projection
                    let members = shape.returnsMembers
                    if members, case .patch = write,
                        try store.hasMoreMembers(stored["id"]?.stringValue ?? "", than: options.patchResponseMaxMembers)
                    {
                        // A large group: 204, so that one member's change is not answered with all of them.
                        responder.respond(HTTPResponse(status: 204, headers: etagHeaders(stored, type, base)))
                        return
                    }
                    responder.respond(
                        Self.respond(
                            status,
                            .object(try output(try store.asReturned(stored, type, baseURL: base, members: members), type, base, shape)),
                            headers: etagHeaders(stored, type, base)))
                } catch let e as SCIMError {
                    responder.respond(Self.respond(e))
                } catch {
                    responder.respond(Self.respond(SCIMError(500, nil, "\(error)")))
                }
            }
        }
    }

    /// Runs one write through the group-commit writer.
    func perform(_ write: AgentWrite, _ ctx: WriteContext, _ completion: @escaping (Result<JSONObject?, SCIMError>) -> Void) {
        let store = self.store, profile = options.profile
        let operation: WriteOperation<JSONObject?> = { (txn: borrowing WriteTransaction) throws -> JSONObject? in
            try store.apply(write, ctx, profile: profile, in: txn)
        }
        shared.queuedWrites.add(1, ordering: .relaxed)
        let finished: (Result<JSONObject?, any Error>) -> Void = { [self] result in
            shared.queuedWrites.subtract(1, ordering: .relaxed)
            switch result {
            case .success(let stored):
                onCommitted?()
                completion(.success(stored))
            case .failure(let e as SCIMError): completion(.failure(e))
            case .failure(StoreError.storeFull(let limit)):
                completion(.failure(SCIMError(503, nil, "the store is full (\(limit) bytes); retry later")))
            case .failure(let e): completion(.failure(SCIMError(500, nil, "store error: \(e)")))
            }
        }
        writer.submit(operation, inbox: inbox, completion: finished)
    }

    func makeContext(_ request: HTTPRequest, trace given: String? = nil) -> WriteContext {
        let ts = unixTimespec()
        // One call to the random generator for every id this write needs.
        let random = secureRandomBytes(given == nil ? 40 : 24)
        let trace = given ?? traceID(request.headers["traceparent"]) ?? hexString(Array(random[24..<40]))
        let milliseconds = UInt64(ts.tv_sec) * 1000 + UInt64(ts.tv_nsec / 1_000_000)
        var ctx = WriteContext(
            newID: uuidV7(milliseconds: milliseconds, random: random[0..<16]),
            now: formatDateTime(secondsSinceEpoch: Int64(ts.tv_sec), milliseconds: ts.tv_nsec / 1_000_000),
            epochSeconds: Int64(ts.tv_sec), eventID: hexString(Array(random[16..<24])), traceID: trace,
            ifMatch: request.headers["If-Match"])
        ctx.recordEvents = options.recordOutbox
        ctx.epochMilliseconds = Int64(milliseconds)
        return ctx
    }

    // MARK: Bulk (RFC 7644 §3.7)

    /// Every operation of one request in **one** group-commit write: one
    /// transaction and one sync for the lot, so a Bulk of 1,000 creates
    /// costs about one commit instead of 1,000. Each operation runs in a
    /// nested transaction, so a failing one undoes only itself (per-operation
    /// results, `bulkId` references resolved in order, `failOnErrors` as
    /// before); all of them are answered after the one durable commit.
    func bulk(_ request: HTTPRequest, _ base: String, _ responder: Reply) throws {
        let body = try parseBody(request)
        let bulk = try BulkRequest(
            body, payloadSize: request.body.count, maxOperations: options.bulkMaxOperations,
            maxPayloadSize: options.bulkMaxPayloadSize)
        let (ordered, failed) = bulk.executionOrder()
        let refused = failed.map { BulkResult(operation: $0.0, status: $0.1.status, error: $0.1) }
        // The contexts (ids, times, trace) are made here: the write must be
        // deterministic, as the writer may run it again (map growth).
        let contexts = ordered.map { op -> WriteContext in
            var ctx = makeContext(request, trace: responder.traceID)
            ctx.ifMatch = op.version
            return ctx
        }
        let store = self.store, registry = self.registry, profile = options.profile, failOnErrors = bulk.failOnErrors
        let operation: WriteOperation<[BulkResult]> = { (txn: borrowing WriteTransaction) throws -> [BulkResult] in
            var results = refused, ids: [String: String] = [:], errors = refused.count
            for (op, ctx) in zip(ordered, contexts) {
                if let limit = failOnErrors, errors >= limit { break }
                do {
                    let (write, type) = try Self.bulkWrite(op, ids, registry: registry, profile: profile)
                    let stored = try txn.nested { sub in try store.apply(write, ctx, profile: profile, in: sub) }
                    if let b = op.bulkId, let id = stored?["id"]?.stringValue { ids[b] = id }
                    let location = stored?["id"]?.stringValue.map { "\(base)\(type.endpoint)/\($0)" }
                    results.append(
                        BulkResult(
                            operation: op, status: op.method == .POST ? 201 : (op.method == .DELETE ? 204 : 200),
                            location: location, version: stored?["meta"]?["version"]?.stringValue))
                } catch let e as SCIMError {
                    errors += 1
                    results.append(BulkResult(operation: op, status: e.status, error: e))
                }
                // Store errors (a full map, an I/O error) end the whole write: the writer grows the map and runs it again, or fails it.
            }
            return results
        }
        shared.queuedWrites.add(1, ordering: .relaxed)
        writer.submit(operation, inbox: inbox) { [self] result in
            shared.queuedWrites.subtract(1, ordering: .relaxed)
            switch result {
            case .success(let results):
                if results.contains(where: { $0.error == nil }) { onCommitted?() }
                responder.respond(Self.respond(200, makeBulkResponse(results)))
            case .failure(StoreError.storeFull(let limit)):
                responder.respond(Self.respond(SCIMError(503, nil, "the store is full (\(limit) bytes); retry later")))
            case .failure(let e):
                responder.respond(Self.respond(SCIMError(500, nil, "store error: \(e)")))
            }
        }
    }

    static func bulkWrite(
        _ op: BulkOperation, _ ids: [String: String], registry: SchemaRegistry,
        profile: ClientProfile
    ) throws -> (AgentWrite, ResourceType) {
        let path = resolvingBulkIds(.string(op.path), ids).stringValue ?? op.path
        let parts = path.split(separator: "/").map(String.init)
        guard let first = parts.first, let type = registry.resourceType(endpoint: "/" + first) else {
            throw SCIMError.invalidValue("Operations[\(op.index)].path '\(op.path)' names no resource type")
        }
        let data = op.data.map { resolvingBulkIds($0, ids) }
        switch (op.method, parts.count) {
        case (.POST, 1):
            return (
                .create(
                    type,
                    validated: try ResourceValidator(registry: registry, type: type, profile: profile)
                        .validateCreate(data ?? .null)), type
            )
        case (.PUT, 2): return (.replace(type, id: parts[1], body: data ?? .null), type)
        case (.PATCH, 2):
            return (
                .patch(
                    type, id: parts[1],
                    request: try PatchRequest(
                        data ?? .null, registry: registry, type: type,
                        profile: profile)), type
            )
        case (.DELETE, 2): return (.delete(type, id: parts[1]), type)
        default: throw SCIMError.invalidValue("Operations[\(op.index)]: \(op.method.rawValue) \(op.path) is not a valid target")
        }
    }

    // MARK: request helpers

    func authorized(_ request: HTTPRequest) -> Bool { request.hasBearerToken(in: options.tokens) }

    func parseBody(_ request: HTTPRequest) throws -> JSON {
        if let type = request.headers["Content-Type"] {
            let mime = type.split(separator: ";").first.map { String($0).trimmingSpaces.asciiLowercased } ?? ""
            guard mime == "application/scim+json" || mime == "application/json" else {
                throw SCIMError(415, nil, "Content-Type must be application/scim+json or application/json, not \(mime)")
            }
        }
        do throws(JSONError) {
            return try JSONParser.parse(request.body)
        } catch {
            throw error.scimError
        }
    }

    func queryParameters(_ request: HTTPRequest) throws -> [String: String] {
        guard let q = request.query else { return [:] }
        guard let p = parseQueryString(q) else { throw SCIMError.invalidSyntax("malformed query string") }
        return p
    }

    func baseURL(_ request: HTTPRequest) -> String {
        let host = request.headers["Host"] ?? "localhost"
        return "http://\(host)\(options.basePath)"
    }
}
