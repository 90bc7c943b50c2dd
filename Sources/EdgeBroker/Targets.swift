import EdgeHTTP
import EdgeLoop
import EdgeTLS
import SCIM

/// What a target does when a resource is deleted at its source or leaves
/// the target's routes.
public enum RemovalMode: String, Sendable, Equatable {
    /// `DELETE` the account.
    case delete
    /// Set `active` to false (users; groups are always deleted).
    case deactivate
}

/// Which federated resources flow to a target: a resource goes to it when
/// any of its routes matches.
public struct Route: Sendable {
    /// Source domains; empty: all.
    public var domains: [String] = []
    /// `User`, `Group`; empty: both.
    public var types: [String] = []
    /// A SCIM filter over the federated resource; nil: everything.
    public var filter: String?
    var compiled: [String: Filter] = [:]

    public init(domains: [String] = [], types: [String] = [], filter: String? = nil) throws(SCIMError) {
        self.domains = domains
        self.types = types
        self.filter = filter
        for t in types where t != "User" && t != "Group" {
            throw SCIMError.invalidValue("route type '\(t)' must be User or Group")
        }
        if let filter {
            func compile(_ type: String) throws(SCIMError) -> Filter {
                try Filter(filter, registry: brokerRegistry, type: brokerRegistry.resourceType(type)!)
            }
            for type in ["User", "Group"] where types.isEmpty || types.contains(type) {
                do throws(SCIMError) { compiled[type] = try compile(type) } catch {
                    // A filter on one type's attributes: say which type the route should name.
                    let other = type == "User" ? "Group" : "User"
                    let hint = types.isEmpty && (try? compile(other)) != nil ? " (give the route `types: [\(other)]`)" : ""
                    throw SCIMError.invalidValue(error.detail + hint)
                }
            }
        }
    }

    public func matches(domain: String, type: String, _ resource: JSONObject) -> Bool {
        guard domains.isEmpty || domains.contains(domain), types.isEmpty || types.contains(type) else { return false }
        guard filter != nil else { return true }
        return compiled[type]?.matches(resource) ?? false
    }
}

/// Per-target attribute mapping, applied to the body sent to the target.
/// Paths are `attr` or `attr.sub` (a complex attribute's sub-attribute).
public struct AttributeMapping: Sendable, Equatable {
    /// from → to (the value moves).
    public var rename: [(from: String, to: String)] = []
    public var drop: [String] = []
    /// path → value set on every resource.
    public var constant: [(path: String, value: JSON)] = []
    public init() {}

    public static func == (a: AttributeMapping, b: AttributeMapping) -> Bool {
        a.rename.elementsEqual(b.rename, by: { $0 == $1 }) && a.drop == b.drop
            && a.constant.elementsEqual(b.constant, by: { $0.path == $1.path && $0.value == $1.value })
    }

    public var isEmpty: Bool { rename.isEmpty && drop.isEmpty && constant.isEmpty }

    func apply(to body: inout JSONObject) {
        for (from, to) in rename {
            if let v = Self.remove(from, in: &body) { Self.set(to, v, in: &body) }
        }
        for path in drop { _ = Self.remove(path, in: &body) }
        for (path, value) in constant { Self.set(path, value, in: &body) }
    }

    static func split(_ path: String) -> (String, String?) {
        guard let dot = path.firstIndex(of: "."), !path.hasPrefix("urn:") else { return (path, nil) }
        return (String(path[..<dot]), String(path[path.index(after: dot)...]))
    }

    static func remove(_ path: String, in body: inout JSONObject) -> JSON? {
        let (attr, sub) = split(path)
        guard let sub else { return body.removeValue(forKey: attr) }
        guard var inner = body[attr]?.objectValue, let v = inner.removeValue(forKey: sub) else { return nil }
        body[attr] = inner.isEmpty ? nil : .object(inner)
        return v
    }

    static func set(_ path: String, _ value: JSON, in body: inout JSONObject) {
        let (attr, sub) = split(path)
        guard let sub else { body[attr] = value; return }
        var inner = body[attr]?.objectValue ?? JSONObject()
        inner[sub] = value
        body[attr] = .object(inner)
    }
}

/// The deletion guard: more than `maxDeletes` removals within
/// `windowSeconds` pause the target's removals until an operator runs
/// `scim-broker targets confirm-deletes NAME`.
public struct DeletionGuard: Sendable, Equatable {
    public var maxDeletes = 100
    public var windowSeconds = 300
    public init(maxDeletes: Int = 100, windowSeconds: Int = 300) {
        self.maxDeletes = maxDeletes
        self.windowSeconds = windowSeconds
    }
}

/// What a target does when a change would land on an account that already
/// belongs to another federated resource (another broker id, most often of
/// another domain: the same `userName` in two domains).
public enum CollisionPolicy: Sendable, Equatable {
    /// Never adopt it: the change becomes a dead letter naming both domains
    /// and both broker ids.
    case refuse
    /// Make the target's unique names unique per domain: users' `userName`
    /// and groups' `displayName` are rewritten by these templates
    /// (`{userName}`, `{displayName}`, `{domain}`), on every create, update,
    /// reconciliation and adoption alike.
    case namespace(userName: String, displayName: String)

    public static let defaultUserNameTemplate = "{userName}@{domain}"
    public static let defaultDisplayNameTemplate = "{displayName} ({domain})"

    /// The name the target sees for `name` of `domain`.
    static func expand(_ template: String, _ placeholder: String, _ name: String, domain: String) -> String {
        template.replacing(placeholder, with: name).replacing("{domain}", with: domain)
    }

    func apply(to body: inout JSONObject, type: String, domain: String) {
        guard case .namespace(let userName, let displayName) = self else { return }
        let (attribute, template) = type == "User" ? ("userName", userName) : ("displayName", displayName)
        if let name = body[attribute]?.stringValue {
            body[attribute] = .string(Self.expand(template, "{\(attribute)}", name, domain: domain))
        }
    }
}

/// A downstream SCIM service provider the broker provisions.
public struct TargetConfiguration: Sendable {
    public var name: String
    /// `http(s)://host:port/base/path` (the SCIM base, e.g. `/scim/v2`).
    public var url: String
    public var port: Int
    public var useTLS: Bool
    public var basePath: String
    public var host: String
    /// Bearer token given literally (`--target-token`), or a file holding it.
    public var token: String?
    public var tokenFile: String?
    /// CA to verify the target (https), and a client certificate for mTLS.
    public var tls = TLSConfiguration(minimumVersion: .tls12)
    public var requestsPerSecond: Double = 50
    public var concurrency = 4
    public var removal: RemovalMode = .deactivate
    public var mapping = AttributeMapping()
    public var routes: [Route] = []
    public var deletionGuard = DeletionGuard()
    public var collisions: CollisionPolicy = .refuse
    /// Consecutive failures (network, 5xx) that open the circuit breaker.
    public var breakerThreshold = 10
    public var requestTimeoutMilliseconds: UInt64 = 15_000

    public init(name: String, url: String) throws(SCIMError) {
        guard !name.isEmpty, name.allSatisfy({ $0.isLetter || $0.isNumber || $0 == "-" || $0 == "_" }) else {
            throw SCIMError.invalidValue("target name '\(name)' may hold letters, digits, '-' and '_' only")
        }
        guard let parsed = ServiceURL(url) else {
            throw SCIMError.invalidValue("target '\(name)': '\(url)' is not http(s)://HOST:PORT/PATH")
        }
        self.name = name
        self.url = url
        (useTLS, host, port, basePath) = (parsed.tls, parsed.host, parsed.port, parsed.path)
    }

    /// Every route matching means the target should hold the resource.
    public func routes(domain: String, type: String, _ resource: JSONObject) -> Bool {
        routes.contains { $0.matches(domain: domain, type: type, resource) }
    }

    /// The address to connect to: an IP address as is, a host name
    /// resolved now (the worker resolves again when it cannot connect).
    public func resolveAddress() -> SocketAddress? {
        ServiceURL(tls: useTLS, host: host, port: port, path: basePath).resolveAddress()
    }
}

/// Turns a federated resource into the body a target receives: no broker
/// `id`/`meta`, no source extension, `externalId` set to the broker id (the
/// broker is the target's provisioning client, RFC 7643 §3.1), the
/// target's collision namespace, then its attribute mapping.
func targetBody(_ resource: JSONObject, type: String, brokerID: String, target: TargetConfiguration) -> JSONObject {
    var body = targetBody(resource, brokerID: brokerID, mapping: AttributeMapping())
    if let domain = resource[BrokerStore.sourceExtension]?["domain"]?.stringValue {
        target.collisions.apply(to: &body, type: type, domain: domain)
    }
    target.mapping.apply(to: &body)
    return body
}

func targetBody(_ resource: JSONObject, brokerID: String, mapping: AttributeMapping) -> JSONObject {
    var body = resource
    _ = body.removeValue(forKey: "id")
    _ = body.removeValue(forKey: "meta")
    _ = body.removeValue(forKey: "groups")
    _ = body.removeValue(forKey: BrokerStore.sourceExtension)
    if let schemas = body["schemas"]?.arrayValue {
        body["schemas"] = .array(schemas.filter { $0.stringValue != BrokerStore.sourceExtension })
    }
    body["externalId"] = .string(brokerID)
    mapping.apply(to: &body)
    return body
}

/// PATCH operations (RFC 7644 §3.5.2) that turn `old` into `new`: replace
/// changed or added attributes, remove dropped ones; group members as
/// value-filtered adds and removes so large groups stay cheap.
func patchOperations(from old: JSONObject, to new: JSONObject) -> [JSON] {
    var ops: [JSON] = []
    for (key, value) in new where key != "schemas" {
        let before = old[key]
        if before == value { continue }
        if equalsIgnoringASCIICase(key, "members"), let b = before?.arrayValue, let a = value.arrayValue {
            let bv = Set(b.compactMap { $0["value"]?.stringValue }), av = Set(a.compactMap { $0["value"]?.stringValue })
            let added = a.filter { av.subtracting(bv).contains($0["value"]?.stringValue ?? "") }
            if !added.isEmpty { ops.append(["op": "add", "path": "members", "value": .array(added)]) }
            for gone in bv.subtracting(av).sorted() {
                ops.append(["op": "remove", "path": .string("members[value eq \"\(gone)\"]")])
            }
            continue
        }
        ops.append(["op": "replace", "path": .string(key), "value": value])
        if let b = before?.objectValue, let a = value.objectValue {
            // A replace of a complex attribute (or an extension) leaves the
            // sub-attributes it does not name as they were (RFC 7644
            // §3.5.2.3): the ones dropped are removed.
            for (sub, _) in b where a[sub] == nil {
                ops.append(["op": "remove", "path": .string(key.hasPrefix("urn:") ? "\(key):\(sub)" : "\(key).\(sub)")])
            }
        }
    }
    for (key, _) in old where key != "schemas" && new[key] == nil {
        ops.append(["op": "remove", "path": .string(key)])
    }
    return ops
}
