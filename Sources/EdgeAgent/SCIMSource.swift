import EdgeConfig
import EdgeDelivery
import EdgeHTTP
import EdgeLoop
import EdgeTLS
import SCIM

/// A SCIM server that cannot push, polled on the source's own thread
/// (`SourceThread`), through the same write path as every source. Each
/// poll lists `/Users` then `/Groups`, by cursor (RFC 9865) when the
/// server's `/ServiceProviderConfig` advertises it, else by `startIndex`
/// (sorted by id when the server sorts, so pages are stable). Between full
/// listings only `meta.lastModified gt "<high-water>"` is asked for; a
/// full listing (the first poll, every `fullCompareEvery`, or every poll
/// when the server refuses that filter) also finds deletions, but only
/// when it is consistent (docs/sources.md).
final class SCIMSourceRunner: SourceReader {
    let configuration: SourceConfiguration
    let store: AgentStore
    let thread: SourceThread

    init(configuration: SourceConfiguration, store: AgentStore, thread: SourceThread) {
        self.configuration = configuration
        self.store = store
        self.thread = thread
    }

    func start() { thread.start { [self] in run() } }

    private func run() {
        thread.runSessions {
            let token = String(decoding: try readSecretLine(configuration.tokenFile ?? ""), as: UTF8.self).trimmingSpaces
            guard !token.isEmpty else { throw SourceMappingError("\(configuration.tokenFile ?? ""): no token on its first line") }
            let client = try SCIMPollClient(configuration: configuration, token: token, thread: thread)
            defer { client.close() }
            let server = try client.capabilities()
            thread.connected(mode: "poll by \(server.cursor ? "cursor" : "startIndex")", to: configuration.url)
            try poll(client, server)
        }
    }

    private func poll(_ client: SCIMPollClient, _ server: SCIMServerCapabilities) throws {
        let name = configuration.name
        var mark = try store.sourcePosition(name).map { String(decoding: $0, as: UTF8.self) }
        var filters = server.filter
        var polls = 0
        while !thread.isStopping {
            let started = unixSeconds()
            let full = mark == nil || !filters || polls % configuration.fullCompareEvery == 0
            var newest = mark.flatMap(DateTimeValue.init).map { ($0, mark!) }
            var pending: [SourceChange] = []
            var keys = Set<String>()
            var consistent = true
            do {
                for (endpoint, group) in [("Users", false), ("Groups", true)] {
                    let filter = full ? nil : mark.map(SCIMPollClient.changedSince)
                    consistent =
                        try client.list(endpoint, filter: filter, sortable: server.sort, cursor: server.cursor) { resource in
                            if let t = resource["meta"]?["lastModified"]?.stringValue, let v = DateTimeValue(t),
                                newest.map({ v > $0.0 }) ?? true
                            {
                                newest = (v, t)
                            }
                            let change = scimChange(resource, group: group, endpoint: endpoint)
                            if case .upsert(let e) = change { keys.insert(e.key) }
                            pending.append(change)
                            if pending.count >= configuration.batchSize {
                                try thread.handOrStop(SourceBatch(source: name, mode: "scim", changes: pending))
                                pending = []
                            }
                        } && consistent
                }
            } catch SCIMPollError.filterRefused(let why) {
                thread.log("source \(name): the server refuses meta.lastModified filters (\(why)); every poll lists everything")
                filters = false
                continue
            } catch is SourceStopping {
                return
            }
            if full && !consistent {
                thread.log("source \(name): the listing changed while it was read; deletions are looked for at the next full listing")
            }
            var batch = SourceBatch(
                source: name, mode: "scim", changes: pending, position: newest.map { Array($0.1.utf8) },
                keepOnly: full && consistent ? keys : nil)
            // Everything changed before this poll started is in it.
            batch.caughtUpAt = started
            batch.newestChange = newest?.0.secondsSinceEpoch
            guard try thread.hand(batch) else { return }
            mark = newest?.1
            polls += 1
            thread.pause(Double(configuration.pollSeconds))
        }
    }
}

/// A SCIM resource as the write path takes it: its id is its key, its
/// externalId and the name its groups' members use; `id`, `meta` and the
/// read-only `groups` are the server's own and are dropped.
public func scimChange(_ resource: JSON, group: Bool, endpoint: String) -> SourceChange {
    guard var body = resource.objectValue, let id = body["id"]?.stringValue, !id.isEmpty else {
        return .unmappable(dn: "\(endpoint)/?", reason: "a resource without an id")
    }
    body["id"] = nil
    body["meta"] = nil
    body["groups"] = nil
    body["externalId"] = .string(id)
    var members: [String] = []
    if group {
        members = (body["members"]?.arrayValue ?? []).compactMap { $0["value"]?.stringValue }
        body["members"] = nil
    }
    let label = (body["userName"] ?? body["displayName"])?.stringValue.map { " (\($0))" } ?? ""
    return .upsert(SourceEntry(key: id, reference: id, name: "\(endpoint)/\(id)\(label)", group: group, body: body, members: members))
}

/// What a SCIM server says it does (`/ServiceProviderConfig`).
public struct SCIMServerCapabilities: Equatable, Sendable {
    public var filter = false
    public var sort = false
    /// RFC 9865 cursor pagination.
    public var cursor = false

    public init(filter: Bool = false, sort: Bool = false, cursor: Bool = false) {
        self.filter = filter
        self.sort = sort
        self.cursor = cursor
    }

    public init(_ config: JSON) {
        filter = config["filter"]?["supported"]?.boolValue ?? false
        sort = config["sort"]?["supported"]?.boolValue ?? false
        cursor = config["pagination"]?["cursor"]?.boolValue ?? false
    }
}

enum SCIMPollError: Error, CustomStringConvertible {
    /// The server answered a filtered list with 400 or 501: it cannot filter on meta.lastModified.
    case filterRefused(String)
    var description: String {
        switch self {
        case .filterRefused(let why): return "filter refused: \(why)"
        }
    }
}

/// Blocking GETs to one SCIM server from the source's thread, through the
/// project's `HTTPClient` on a loop of this thread's own (run only while a
/// request waits). At most `requestsPerSecond`; a 429 or 503 is waited
/// out as its `Retry-After` says (delta-seconds, 1 to 600: a `0` would send
/// it again at once, in a loop; without one 1 s doubling to 60 s) and sent
/// again.
public final class SCIMPollClient {
    let base: ServiceURL
    let token: String
    let thread: SourceThread
    let pageSize: Int
    private let loop: EventLoop
    private let client: HTTPClient
    private let spacingMs: UInt64
    private var nextAt: UInt64 = 0
    /// A 429 or 503 is an answer (`SCIMPollStatus.refused`), not waited out: for `check-config`.
    var waitsWhenThrottled = true

    init(configuration: SourceConfiguration, token: String, thread: SourceThread) throws {
        guard let base = ServiceURL(configuration.url) else { throw SourceMappingError("not an http(s) URL: \(configuration.url)") }
        guard let address = base.resolveAddress() else { throw SourceMappingError("cannot resolve \(base.host)") }
        self.base = base
        self.token = token
        self.thread = thread
        pageSize = configuration.pageSize
        spacingMs = UInt64(1000 / max(1, configuration.requestsPerSecond))
        var options = HTTPClientOptions()
        options.maxPipelined = 1
        options.connectTimeoutMilliseconds = 10_000
        options.responseTimeoutMilliseconds = 60_000
        loop = try EventLoop()
        if base.tls {
            let tls: TLSContext
            do {
                tls = try TLSContext(
                    role: .client, configuration: TLSConfiguration(trustRootsFile: configuration.tls.caFile, minimumVersion: .tls12))
            } catch {
                loop.close()
                throw SourceMappingError("TLS: \(error)")
            }
            client = HTTPClient(loop: loop, address: address, tls: tls, serverName: base.host, options: options)
        } else {
            client = HTTPClient(loop: loop, address: address, options: options)
        }
    }

    func close() {
        client.close()
        loop.close()
    }

    func capabilities() throws -> SCIMServerCapabilities {
        SCIMServerCapabilities(try get("/ServiceProviderConfig"))
    }

    /// The filter of the resources changed since `mark` (a lastModified the server gave).
    public static func changedSince(_ mark: String) -> String {
        var escaped = ""
        for c in mark {
            if c == "\\" || c == "\"" { escaped.append("\\") }
            escaped.append(c)
        }
        return "meta.lastModified gt \"\(escaped)\""
    }

    /// Every resource of `endpoint` (matching `filter`), page by page, each
    /// to `each`. Returns whether the listing is consistent: as many
    /// resources as the server counted, the count the same on every page
    /// (by startIndex, a resource deleted meanwhile shifts the rest, and
    /// one could be skipped: such a listing must not be taken for deletions).
    func list(_ endpoint: String, filter: String?, sortable: Bool, cursor: Bool, _ each: (JSON) throws -> Void) throws -> Bool {
        var query = "count=\(pageSize)"
        if let filter { query += "&filter=" + percentEncode(filter) }
        if sortable && !cursor { query += "&sortBy=id" }
        var startIndex = 1
        var next: String? = cursor ? "" : nil
        var tally = ListingTally()
        // A server that ignores the cursor or startIndex answers the same page again and again: the listing would
        // never end (at the request rate, the poll never finishing, deletions never found). Refused, so the session
        // fails and is retried with backoff.
        var cursorsSeen = Set<String>()
        var previousFirst: String?
        while !thread.isStopping {
            let page: String
            if let n = next {
                page = n.isEmpty ? "cursor&\(query)" : "cursor=\(percentEncode(n))&\(query)"
            } else {
                page = "startIndex=\(startIndex)&\(query)"
            }
            let list: JSON
            do { list = try get("/\(endpoint)?\(page)") } catch SCIMPollStatus.refused(let status, let detail)
                where filter != nil
                && (status == 400 || status == 501)
            {
                throw SCIMPollError.filterRefused("\(status) \(detail)")
            }
            let resources = list["Resources"]?.arrayValue ?? []
            let pageTotal = list["totalResults"]?.numberValue?.integer.map(Int.init)
            let first = resources.first?["id"]?.stringValue
            if !cursor, let first, first == previousFirst {
                throw SourceMappingError(
                    "GET /\(endpoint) at startIndex \(startIndex) answered the page before it again (it starts with \(first)): the server does not page by startIndex"
                )
            }
            previousFirst = first
            tally.page(total: pageTotal, resources: resources.count)
            if let total = tally.total, tally.seen > 2 * total + 2 * pageSize {
                throw SourceMappingError(
                    "GET /\(endpoint): \(tally.seen) resources listed where the first page counted \(total): the listing does not end")
            }
            for r in resources { try each(r) }
            if cursor {
                guard let n = list["nextCursor"]?.stringValue, !n.isEmpty, !resources.isEmpty else { break }
                guard cursorsSeen.insert(n).inserted else {
                    throw SourceMappingError("GET /\(endpoint): the server's nextCursor \(n) came before: its listing would not end")
                }
                next = n
            } else {
                guard !resources.isEmpty, tally.seen < (pageTotal ?? 0) else { break }
                startIndex += resources.count
            }
        }
        if thread.isStopping { throw SourceStopping() }
        return tally.consistent
    }

    /// One GET, its JSON body; 429 and 503 waited out and sent again.
    func get(_ pathAndQuery: String) throws -> JSON {
        var throttledBackoff = 1.0
        while true {
            if thread.isStopping { throw SourceStopping() }
            let now = monotonicMilliseconds()
            if nextAt > now { thread.pause(Double(nextAt - now) / 1000) }
            nextAt = max(now, nextAt) + spacingMs
            var headers = HTTPHeaders()
            headers.set("Authorization", "Bearer \(token)")
            headers.set("Accept", "application/scim+json")
            let response = try send(HTTPRequest(method: "GET", target: base.path + pathAndQuery, headers: headers))
            switch response.status {
            case 200:
                var limits = JSONLimits()
                limits.maxBytes = 64 << 20
                limits.maxStringBytes = 1 << 20
                limits.maxContainerEntries = 1 << 22
                do { return try JSONParser.parse(response.body, limits: limits) } catch {
                    throw SourceMappingError("GET \(pathAndQuery): the answer is not JSON: \(error)")
                }
            case 429 where waitsWhenThrottled, 503 where waitsWhenThrottled:
                let wait =
                    RetrySchedule.retryAfter(response.headers["Retry-After"]).map { Double(RetrySchedule.bounded($0, atMost: 600)) }
                    ?? throttledBackoff
                throttledBackoff = min(60, throttledBackoff * 2)
                thread.live.withLock { $0.throttled += 1 }
                thread.log("source \(thread.name): \(response.status) for GET \(pathAndQuery); again in \(wait) s")
                thread.pause(wait)
            default:
                let detail = (try? JSONParser.parse(response.body))?["detail"]?.stringValue ?? ""
                throw SCIMPollStatus.refused(response.status, detail)
            }
        }
    }

    /// Sends and runs this thread's loop until the answer (the client's timeouts bound the wait).
    private func send(_ request: HTTPRequest) throws -> HTTPResponse {
        var result: Result<HTTPResponse, HTTPClientError>?
        client.send(request) { result = $0 }
        while result == nil { loop.runOnce() }
        switch result! {
        case .success(let r): return r
        case .failure(let e): throw SourceMappingError("GET \(base.host):\(base.port)\(request.target): \(e)")
        }
    }
}

/// What the pages of one listing said: whether it can be taken for the
/// whole collection (for deletions). It can when every page gave the same
/// `totalResults` and as many resources arrived; by `startIndex`, a
/// deletion meanwhile shifts the later pages by one, so a resource is
/// skipped and the counts disagree.
public struct ListingTally: Sendable, Equatable {
    public private(set) var total: Int?
    public private(set) var seen = 0
    private var sameTotal = true
    public init() {}

    public mutating func page(total pageTotal: Int?, resources: Int) {
        if let t = total, let p = pageTotal, t != p { sameTotal = false }
        total = total ?? pageTotal
        seen += resources
    }

    /// Without a `totalResults` (allowed with cursors) only the pages' agreement counts.
    public var consistent: Bool { sameTotal && (total.map { $0 == seen } ?? true) }
}

/// A status other than 200, 429 or 503.
enum SCIMPollStatus: Error, CustomStringConvertible {
    case refused(Int, String)
    var description: String {
        switch self {
        case .refused(let status, let detail): return "the server answered \(status)\(detail.isEmpty ? "" : ": \(detail)")"
        }
    }
}

extension AgentConfiguration {
    /// `check-config --connect` for each SCIM source: its
    /// `/ServiceProviderConfig` and a page of `/Users` are read with its token, so that a wrong URL,
    /// a refused token or a CA that does not fit is found before the service
    /// starts; each problem at its key. A server that throttles the check is
    /// reachable: a warning.
    public func checkSCIMSourceConnections(_ d: ConfigDiagnostics) {
        for (i, source) in sources.enumerated() where source.kind == .scim {
            let at = "sources[\(i)]"
            // A token file that is missing or readable by others is reported at tokenFile by the file checks.
            guard let file = source.tokenFile, let secret = try? readSecretLine(file) else { continue }
            let thread = SourceThread(name: source.name, submit: { _, _ in false }, log: { _ in })
            do {
                let client = try SCIMPollClient(
                    configuration: source, token: String(decoding: secret, as: UTF8.self).trimmingSpaces, thread: thread)
                defer { client.close() }
                client.waitsWhenThrottled = false
                _ = try client.capabilities()
                // /ServiceProviderConfig may be served without authentication (RFC 7644 §4): the token is tried on a list.
                _ = try client.get("/Users?count=1")
            } catch SCIMPollStatus.refused(let status, let detail) where status == 401 || status == 403 {
                d.error(
                    "\(at).tokenFile", "\(source.url) refused the token (\(status)\(detail.isEmpty ? "" : ": \(detail)"))",
                    fix: "check the token in tokenFile")
            } catch SCIMPollStatus.refused(let status, _) where status == 429 || status == 503 {
                d.warning("\(at).url", "\(source.url) answered \(status): reachable, but throttling now")
            } catch let e as SCIMPollStatus {
                d.error(
                    "\(at).url", "\(source.url)/ServiceProviderConfig: \(e)", fix: "check the SCIM base URL (up to /scim/v2 or the like)")
            } catch {
                d.error("\(at).url", "cannot reach \(source.url): \(error)", fix: "check the host, the port and tls.ca")
            }
        }
    }
}
