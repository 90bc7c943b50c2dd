import EdgeConfig
import EdgeDelivery
import EdgeHTTP
import EdgeStore
import SCIM

/// The federated directory's schemas: the standard ones, plus the source
/// extension every federated resource carries.
public let brokerRegistry: SchemaRegistry = federatedRegistry

/// The broker's SCIM read API over the federated directory (all domains):
/// GET by id, list with filter / sort / pagination / projection, `.search`,
/// discovery. Writes are refused: provisioning goes through an agent.
/// Threading: loop-confined.
public final class BrokerAPI {
    let store: BrokerStore
    let tokens: [String]
    let basePath = "/scim/v2"
    let maxResults = 1000
    /// Resources a list parses at most per request when its filter needs a
    /// scan (docs/scim.md, "The broker's read API"): a cursor pages on past it.
    let scanBudget: Int

    public init(store: BrokerStore, tokens: [String], scanBudget: Int = BrokerOptions.apiScanBudget.defaultInteger) {
        self.store = store
        self.tokens = tokens
        self.scanBudget = scanBudget
    }

    /// A GET of a large group (more than `streamedArrayAbove` members):
    /// its attributes (projected), then its members from the index, a chunk
    /// at a time as the connection drains (chunked coding), each projected
    /// when the projection keeps only some of their sub-attributes
    /// (`Projection.memberElement`). Memory holds a chunk, not the group.
    func streamedGroup(_ group: JSONObject, id: String, _ projection: Projection?) -> BodyPieces {
        streamedResource(projection?.apply(to: group) ?? group, members: store.memberPieces(of: id, element: projection?.memberElement))
    }

    static func streamed(_ pieces: @escaping BodyPieces) -> HTTPResponse {
        HTTPResponse(status: 200, headers: ["Content-Type": "application/scim+json"], stream: BodyStream(pieces))
    }

    static func respond(_ status: Int, _ body: JSON) -> HTTPResponse {
        HTTPResponse(status: status, headers: ["Content-Type": "application/scim+json"], body: body.serialized())
    }

    public func handle(_ request: HTTPRequest, _ responder: Responder) {
        do {
            responder.respond(try route(request))
        } catch let e as SCIMError {
            var r = Self.respond(e.status, e.json)
            if e.status == 401 { r.headers.set("WWW-Authenticate", #"Bearer realm="scim-broker""#) }
            responder.respond(r)
        } catch {
            responder.respond(Self.respond(500, SCIMError(500, nil, "internal error: \(error)").json))
        }
    }

    func route(_ request: HTTPRequest) throws -> HTTPResponse {
        guard !request.hasRepeatedAuthorization else { throw SCIMError.invalidSyntax("more than one Authorization header field") }
        guard request.hasBearerToken(in: tokens) else { throw SCIMError(401, nil, "a valid bearer token is required") }
        guard request.path.hasPrefix(basePath) else { throw SCIMError.notFound("no such endpoint: \(request.path)") }
        let parts = request.path.dropFirst(basePath.count).split(separator: "/").map(String.init)
        let isSearch = request.method == "POST" && parts.last == ".search"
        guard request.method == "GET" || request.method == "HEAD" || isSearch else {
            throw SCIMError(405, nil, "the federated directory is read-only here: provision through an agent")
        }
        switch parts.first {
        case "ServiceProviderConfig":
            var f = ServiceProviderFeatures()
            f.patch = false
            f.bulk = false
            f.etag = false
            return Self.respond(200, f.json)
        case "Schemas":
            if parts.count == 2 {
                guard let s = brokerRegistry.schema(parts[1]) else { throw SCIMError.notFound("no schema \(parts[1])") }
                return Self.respond(200, s.json)
            }
            return Self.respond(200, brokerRegistry.schemasDocument)
        case "ResourceTypes":
            if parts.count == 2 {
                guard let t = brokerRegistry.resourceType(parts[1]) else { throw SCIMError.notFound("no resource type \(parts[1])") }
                return Self.respond(200, t.json)
            }
            return Self.respond(200, brokerRegistry.resourceTypesDocument)
        case let endpoint?:
            guard let type = brokerRegistry.resourceType(endpoint: "/" + endpoint) else {
                throw SCIMError.notFound("no such endpoint: /\(endpoint)")
            }
            if parts.count == 2 && !isSearch {
                guard let params = request.query.map(parseQueryString) ?? [:] else {
                    throw SCIMError.invalidSyntax("malformed query string")
                }
                // As stored, with its members, when no projection is asked for.
                let projection =
                    request.query == nil
                    ? nil
                    : try ListQuery(
                        parameters: params.filter { ["attributes", "excludedattributes"].contains($0.key.asciiLowercased) },
                        registry: brokerRegistry, type: type, maxResults: maxResults
                    ).projection
                // A projection without members never reads the members index.
                let members = type.id == "Group" && projection.map(\.returnsMembers) ?? true
                guard let r = try store.resource(brokerID: parts[1], members: false), r.type == type.id else {
                    throw SCIMError.notFound("\(type.id) \(parts[1]) not found")
                }
                if members, try store.hasMoreMembers(parts[1], than: streamedArrayAbove) {
                    return Self.streamed(streamedGroup(r.resource, id: parts[1], projection))
                }
                let resource = members ? try store.withMembers(r.resource) : r.resource
                return Self.respond(200, .object(projection?.apply(to: resource) ?? resource))
            }
            let query: ListQuery
            if isSearch {
                query = try ListQuery(
                    searchBody: try JSONParser.parse(request.body), registry: brokerRegistry, type: type,
                    maxResults: maxResults)
            } else {
                guard let params = request.query.map(parseQueryString) ?? [:] else {
                    throw SCIMError.invalidSyntax("malformed query string")
                }
                query = try ListQuery(parameters: params, registry: brokerRegistry, type: type, maxResults: maxResults)
            }
            let (page, streamMembers) = try store.list(
                type, query, scanBudget: scanBudget, members: query.projection.returnsMembers, streamAbove: streamedArrayAbove)
            if streamMembers {
                // The page's groups hold more than `streamedArrayAbove` members: each group's
                // attributes, then its members from the index, a chunk at a time.
                let element = query.projection.memberElement
                return Self.streamed(
                    streamedListResponse(page) { [store] g in
                        streamedResource(
                            query.projection.apply(to: g), members: store.memberPieces(of: g["id"]?.stringValue ?? "", element: element))
                    })
            }
            return Self.respond(200, makeListResponse(page) { .object(query.projection.apply(to: $0)) })
        case nil:
            throw SCIMError.notFound("name a resource endpoint such as /Users")
        }
    }
}

extension BrokerStore {
    /// A federated resource by broker id, with its source domain and type.
    /// `members: false` leaves a group's members unread.
    public func resource(brokerID: String, members: Bool = true) throws -> (domain: String, type: String, resource: JSONObject)? {
        try deliveryEntry(brokerID, members: members)
    }

    /// Every federated resource of a type, across domains, a chunk at a
    /// time, each chunk read in a snapshot of its own (reconcile: memory
    /// holds a chunk); groups with their members when `members` is true.
    func forEachResource(_ type: String, members: Bool, chunk: Int = 500, _ body: (JSONObject) throws -> Void) throws {
        let resources = self.resources
        var from: [UInt8] = []
        while true {
            let (found, last): ([JSONObject], [UInt8]?) = try environment.read { txn in
                var out: [JSONObject] = []
                var last: [UInt8]?, seen = 0
                try txn.scan(resources, from: from.isEmpty ? nil : from) { k, v in
                    seen += 1
                    last = Array(k)
                    let parts = String(decoding: k, as: UTF8.self).split(separator: "/", maxSplits: 2)
                    if parts.count == 3, parts[1] == type, let o = try JSONParser.parse(v, limits: .stored).objectValue {
                        out.append(type == "Group" && members ? try withMembers(txn, o) : o)
                    }
                    return seen < chunk
                }
                return (out, seen == chunk ? last : nil)
            }
            for r in found { try body(r) }
            guard let last else { return }
            from = last + [0]
        }
    }

    /// Every federated resource of a type, across domains (at most
    /// `budget`); groups with their members unless `members` is false.
    public func all(_ type: String, budget: Int, members: Bool = true) throws -> [JSONObject] {
        let resources = self.resources
        return try environment.read { txn in
            var out: [JSONObject] = []
            var seen = 0
            try txn.scan(resources) { k, v in
                seen += 1
                if seen > budget { throw SCIMError(400, .tooMany, "more than \(budget) resources to scan") }
                let parts = String(decoding: k, as: UTF8.self).split(separator: "/", maxSplits: 2)
                if parts.count == 3, parts[1] == type, let o = try JSONParser.parse(v, limits: .stored).objectValue {
                    out.append(type == "Group" && members ? try withMembers(txn, o) : o)
                }
                return true
            }
            return out
        }
    }
}
