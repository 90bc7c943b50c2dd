import EdgeConfig
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
    package var compiled: [String: Filter] = [:]

    /// `registry`: the schemas of the resources the route judges (the
    /// broker's directory, or an agent's schemas), with the source extension.
    public init(domains: [String] = [], types: [String] = [], filter: String? = nil, registry: SchemaRegistry = federatedRegistry)
        throws(SCIMError)
    {
        self.domains = domains
        self.types = types
        self.filter = filter
        for t in types where t != "User" && t != "Group" {
            throw SCIMError.invalidValue("route type '\(t)' must be User or Group")
        }
        if let filter {
            func compile(_ type: String) throws(SCIMError) -> Filter {
                try Filter(filter, registry: registry, type: registry.resourceType(type)!)
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

/// The deletion guard: more than `maxDeletes` removals within
/// `windowSeconds` pause the target's removals until an operator runs
/// `scim-broker targets confirm-deletes NAME`.
public struct DeletionGuard: Sendable, Equatable {
    public var maxDeletes: Int
    public var windowSeconds: Int
    public init(
        maxDeletes: Int = BrokerOptions.Target.maxDeletes.defaultInteger,
        windowSeconds: Int = BrokerOptions.Target.windowSeconds.defaultInteger
    ) {
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
    /// Users only: the same person in two domains is one account when the
    /// link attribute matches (see `LinkPolicy`). Groups are refused as with
    /// `refuse`.
    case link(LinkPolicy)

    /// The link settings, when the policy is `link`.
    public var linkPolicy: LinkPolicy? {
        if case .link(let l) = self { return l }
        return nil
    }

    public static let defaultUserNameTemplate = BrokerOptions.Target.namespaceUserName.defaultValue!
    public static let defaultDisplayNameTemplate = BrokerOptions.Target.namespaceDisplayName.defaultValue!

    /// The name the target sees for `name` of `domain`.
    package static func expand(_ template: String, _ placeholder: String, _ name: String, domain: String) -> String {
        template.replacing(placeholder, with: name).replacing("{domain}", with: domain)
    }

    package func apply(to body: inout JSONObject, type: String, domain: String) {
        guard case .namespace(let userName, let displayName) = self else { return }
        let (attribute, template) = type == "User" ? ("userName", userName) : ("displayName", displayName)
        if let name = body[attribute]?.stringValue {
            body[attribute] = .string(Self.expand(template, "{\(attribute)}", name, domain: domain))
        }
    }
}

/// `collisions: link`: which attribute says two domains' users are the same
/// person, and which domain's data wins.
public struct LinkPolicy: Sendable, Equatable {
    /// The attribute as configured (`employeeNumber`, the full URN path, or
    /// `emails[type eq "work"].value`).
    public let attribute: String
    /// An extension URN; nil: the core schema.
    let schema: String?
    let name: String
    /// A complex attribute's sub-attribute (`name.familyName`, `emails[…].value`).
    let subAttribute: String?
    /// Multi-valued: the element whose `type` is this (case-insensitive).
    let elementType: String?
    /// The domains that link, in order of precedence: each attribute of a
    /// linked account comes from the first of them that has it. Users of
    /// other domains are never linked (their accounts are their own, and a
    /// collision with a linked account is refused): a domain not listed
    /// cannot join, and later take over, another domain's account by giving
    /// a user the same link value.
    public let sourceOfRecord: [String]

    /// Parses and resolves `attribute` against the federated User schema: a
    /// core or extension attribute (a short name not in the core schema is
    /// looked up in the User's extensions, so `employeeNumber` is the
    /// enterprise extension's), a complex one's `attr.sub`, or a
    /// multi-valued one's element by type, `emails[type eq "work"].value`.
    public init(attribute: String, sourceOfRecord: [String], registry: SchemaRegistry = federatedRegistry) throws(SCIMError) {
        self.attribute = attribute
        self.sourceOfRecord = sourceOfRecord
        guard let userType = registry.resourceType("User") else { throw SCIMError.invalidValue("no User resource type") }
        var text = attribute.trimmingSpaces
        var elementType: String?
        if let open = text.firstIndex(of: "[") {
            // `attr[type eq "X"].sub`: only this form of value filter (a link needs one value).
            guard let close = text.firstIndex(of: "]"), open < close else {
                throw SCIMError.invalidValue("link attribute '\(attribute)': unbalanced '['")
            }
            let selector = text[text.index(after: open)..<close].split(separator: " ", omittingEmptySubsequences: true)
            guard selector.count == 3, equalsIgnoringASCIICase(String(selector[0]), "type"),
                equalsIgnoringASCIICase(String(selector[1]), "eq"),
                selector[2].count >= 2, selector[2].first == "\"", selector[2].last == "\""
            else {
                throw SCIMError.invalidValue("link attribute '\(attribute)': the only value filter allowed is [type eq \"…\"]")
            }
            elementType = String(selector[2].dropFirst().dropLast())
            let rest = text[text.index(after: close)...]
            guard rest.isEmpty || rest.first == "." else {
                throw SCIMError.invalidValue("link attribute '\(attribute)': expected '.sub-attribute' after ']'")
            }
            text = String(text[..<open]) + (rest.isEmpty ? ".value" : String(rest))
        }
        guard let path = registry.parsePath(text, in: userType) else {
            throw SCIMError.invalidValue("link attribute '\(attribute)' is not an attribute path")
        }
        var resolved = registry.resolve(path, in: userType)
        var schema = path.schema
        if resolved == nil, path.schema == nil {
            for ext in userType.extensions where ext.schema != sourceExtensionSchema {
                var p = path
                p.schema = ext.schema
                if let r = registry.resolve(p, in: userType) { resolved = r; schema = ext.schema; break }
            }
        }
        guard let resolved, !path.attribute.isEmpty else {
            throw SCIMError.invalidValue("link attribute '\(attribute)': no such User attribute")
        }
        if schema.map({ equalsIgnoringASCIICase($0, sourceExtensionSchema) }) ?? false {
            throw SCIMError.invalidValue("link attribute '\(attribute)': the source extension differs per domain by design")
        }
        guard resolved.leaf.type != .complex, resolved.attribute.multiValued == (elementType != nil) else {
            throw SCIMError.invalidValue(
                resolved.attribute.multiValued
                    ? "link attribute '\(attribute)' is multi-valued: pick one element, e.g. \(path.attribute)[type eq \"work\"].value"
                    : "link attribute '\(attribute)' must name a single value")
        }
        if elementType != nil, resolved.attribute.subAttribute("type") == nil {
            throw SCIMError.invalidValue("link attribute '\(attribute)': \(path.attribute) has no 'type' to select by")
        }
        if resolved.schema.map({ equalsIgnoringASCIICase($0.id, userType.schema) }) ?? true { schema = nil }
        self.schema = schema
        name = resolved.attribute.name
        subAttribute = resolved.subAttribute?.name
        self.elementType = elementType
        if sourceOfRecord.isEmpty { throw SCIMError.invalidValue("link 'sourceOfRecord' must list at least one domain") }
    }

    public static func == (a: LinkPolicy, b: LinkPolicy) -> Bool { a.attribute == b.attribute && a.sourceOfRecord == b.sourceOfRecord }

    /// The value users are linked by: trimmed and lower-cased, so that
    /// `E123 ` and `e123` are one person; nil when the user has none (nothing
    /// links on a missing or empty value) or it holds a NUL (the index's key
    /// separator).
    public func value(of resource: JSONObject) -> String? {
        var holder = resource
        if let schema {
            guard let ext = resource[schema]?.objectValue else { return nil }
            holder = ext
        }
        var v = holder[name]
        if let elementType {
            v = v?.arrayValue?.first { element in
                element["type"]?.stringValue.map { equalsIgnoringASCIICase($0, elementType) } ?? false
            }
        }
        if let subAttribute { v = v?.objectValue?[subAttribute] }
        let text: String
        switch v {
        case .string(let s)?: text = s
        case .number(let n)?: text = n.description
        default: return nil
        }
        let key = trimmingWhitespace(text).lowercased()
        return key.isEmpty || key.utf8.contains(0) ? nil : key
    }

    /// The link value of a user of `domain`: nil when the domain is not in
    /// `sourceOfRecord` (it does not link).
    public func value(of resource: JSONObject, domain: String) -> String? {
        sourceOfRecord.contains(domain) ? value(of: resource) : nil
    }

    /// Precedence of a domain: its place in `sourceOfRecord` (only listed domains link).
    package func rank(_ domain: String) -> Int { sourceOfRecord.firstIndex(of: domain) ?? sourceOfRecord.count }

    /// Linked resources in precedence order: source of record, then broker
    /// id (stable whatever the order read).
    package func ordered(_ members: [LinkedResource]) -> [LinkedResource] {
        members.sorted { a, b in
            let (ra, rb) = (rank(a.domain), rank(b.domain))
            if ra != rb { return ra < rb }
            if a.domain != b.domain { return a.domain < b.domain }
            return a.brokerID < b.brokerID
        }
    }
}

package func trimmingWhitespace(_ s: String) -> String {
    var t = Substring(s)
    while let c = t.first, c.isWhitespace { t = t.dropFirst() }
    while let c = t.last, c.isWhitespace { t = t.dropLast() }
    return String(t)
}

/// One federated user of a linked account.
package struct LinkedResource {
    package let brokerID: String
    package let domain: String
    package let resource: JSONObject

    package init(brokerID: String, domain: String, resource: JSONObject) {
        self.brokerID = brokerID
        self.domain = domain
        self.resource = resource
    }
}

/// The body of a linked account (`collisions: link`): the linked users'
/// attributes merged, each from the first source (in source-of-record
/// order) that has it; an extension's attributes one by one. While any
/// source is active, only the active ones supply data and the account is
/// active; when none is, all supply it and the account is inactive.
/// `externalId` is the broker id of the first source that supplies data
/// (the anchor). Then the target's attribute mapping. Nil: no members.
package func linkedTargetBody(_ members: [LinkedResource], link: LinkPolicy, target: TargetConfiguration) -> (
    anchor: String, body: JSONObject
)? {
    let ordered = link.ordered(members)
    let active = ordered.filter { $0.resource["active"]?.boolValue != false }
    let sources = active.isEmpty ? ordered : active
    guard let anchor = sources.first?.brokerID else { return nil }
    func empty(_ v: JSON) -> Bool {
        switch v {
        case .null: return true
        case .string(let s): return s.isEmpty
        case .array(let a): return a.isEmpty
        case .object(let o): return o.isEmpty
        default: return false
        }
    }
    var body = JSONObject()
    var schemas: [JSON] = []
    for source in sources {
        let b = targetBody(source.resource, brokerID: anchor, mapping: AttributeMapping())
        for (key, value) in b {
            if key == "schemas" {
                for s in value.arrayValue ?? [] where !schemas.contains(s) { schemas.append(s) }
            } else if key.hasPrefix("urn:"), let ext = value.objectValue {
                var merged = body[key]?.objectValue ?? JSONObject()
                for (k, v) in ext where merged[k] == nil && !empty(v) { merged[k] = v }
                if !merged.isEmpty { body[key] = .object(merged) }
            } else if body[key] == nil, !empty(value) {
                body[key] = value
            }
        }
    }
    if !schemas.isEmpty { body["schemas"] = .array(schemas) }
    body["externalId"] = .string(anchor)
    body["active"] = .bool(!active.isEmpty)
    target.mapping.apply(to: &body)
    return (anchor, body)
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
    public var requestsPerSecond = Double(BrokerOptions.Target.requestsPerSecond.defaultInteger)
    public var concurrency = BrokerOptions.Target.concurrency.defaultInteger
    public var removal: RemovalMode = .deactivate
    public var mapping = AttributeMapping()
    public var routes: [Route] = []
    public var deletionGuard = DeletionGuard()
    public var collisions: CollisionPolicy = .refuse
    /// Group members one request may add or remove at most (AWS IAM Identity
    /// Center takes 100 per PATCH, some apps fewer): larger changes go as
    /// several PATCHes, a new large group as a POST of the first ones and
    /// PATCHes for the rest.
    public var maxMembersPerPatch = BrokerOptions.Target.maxMembersPerPatch.defaultInteger
    /// Consecutive failures (network, 5xx) that open the circuit breaker.
    public var breakerThreshold = BrokerOptions.Target.breakerThreshold.defaultInteger
    public var requestTimeoutMilliseconds = UInt64(BrokerOptions.Target.timeoutMs.defaultInteger)
    /// A boundary instead of an app (`domain:`): that domain's agent
    /// fetches the target's queue as its downlink feed (`Downlink.swift`);
    /// no `TargetWorker` runs for it. Nil: an app at `url`.
    public var destination: String?

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

    /// Every route matching means the target should hold the resource. A
    /// destination never gets its own domain's resources back.
    public func routes(domain: String, type: String, _ resource: JSONObject) -> Bool {
        domain != destination && routes.contains { $0.matches(domain: domain, type: type, resource) }
    }

    /// Whether a route decides on a group's members (then the apply reads them to route it).
    public var groupRoutesReadMembers: Bool { routes.contains { $0.compiled["Group"]?.root.reads("members") ?? false } }

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
package func targetBody(_ resource: JSONObject, type: String, brokerID: String, target: TargetConfiguration) -> JSONObject {
    var body = targetBody(resource, brokerID: brokerID, mapping: AttributeMapping())
    if let domain = resource[sourceExtensionSchema]?["domain"]?.stringValue {
        target.collisions.apply(to: &body, type: type, domain: domain)
    }
    target.mapping.apply(to: &body)
    return body
}

package func targetBody(_ resource: JSONObject, brokerID: String, mapping: AttributeMapping) -> JSONObject {
    var body = resource
    _ = body.removeValue(forKey: "id")
    _ = body.removeValue(forKey: "meta")
    _ = body.removeValue(forKey: "groups")
    _ = body.removeValue(forKey: sourceExtensionSchema)
    if let schemas = body["schemas"]?.arrayValue {
        body["schemas"] = .array(schemas.filter { $0.stringValue != sourceExtensionSchema })
    }
    body["externalId"] = .string(brokerID)
    mapping.apply(to: &body)
    return body
}
