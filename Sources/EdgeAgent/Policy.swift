import EdgeConfig
import EdgeTLS
import SCIM

/// What may leave the compliance boundary, decided inside it (invariant 5).
public enum AttributeRule: String, Sendable, CaseIterable {
    case propagate
    /// Never leaves: removed from every event.
    case keepLocal = "keep-local"
    /// Leaves as HMAC-SHA256 under a local key: stable, not reversible outside.
    case pseudonymize
}

/// The local-control policy: per resource type on/off, per attribute rule,
/// and a scoping filter per resource type. Compiled against the schemas.
public struct LocalPolicy: Sendable {
    struct CompiledRule: Sendable {
        let type: String
        let attribute: ResolvedAttribute
        let rule: AttributeRule
        let text: String
    }

    let registry: SchemaRegistry
    let disabledTypes: Set<String>
    let rules: [CompiledRule]
    let scopes: [String: Filter]
    let pseudonymKey: [UInt8]?
    /// A digest of the policy, kept in the store to notice a changed policy.
    public let fingerprint: String

    /// Everything propagates.
    public static func propagateAll(_ registry: SchemaRegistry = .standard) -> LocalPolicy {
        try! LocalPolicy(registry: registry)
    }

    /// - Parameters:
    ///   - resourceTypes: type id → propagate (`true`) or keep local (`false`); unlisted types propagate.
    ///   - attributes: attribute path (`phoneNumbers`, `name.givenName`, URN-qualified) → rule.
    ///   - scopes: type id → SCIM filter; only matching resources leave.
    /// - Throws: every problem, each with the YAML key of its entry (`policy.scope.User`).
    public init(
        registry: SchemaRegistry, resourceTypes: [String: Bool] = [:], attributes: [(String, AttributeRule)] = [],
        scopes: [String: String] = [:], pseudonymKey: [UInt8]? = nil
    ) throws(ConfigProblems) {
        var problems: [ConfigError] = []
        self.init(
            registry: registry, resourceTypes: resourceTypes, attributes: attributes, scopes: scopes, pseudonymKey: pseudonymKey,
            problems: &problems)
        if !problems.isEmpty { throw ConfigProblems(problems) }
    }

    /// Compiles the valid entries and records a problem for each other one,
    /// keyed by its YAML key, so that a configuration reports them all at
    /// their own lines. Used only when `problems` stays empty.
    public init(
        registry: SchemaRegistry, resourceTypes: [String: Bool], attributes: [(String, AttributeRule)],
        scopes: [String: String], pseudonymKey: [UInt8]?, problems: inout [ConfigError]
    ) {
        func problem(_ key: String, _ message: String, fix: String? = nil) {
            problems.append(ConfigError(message, at: nil, key: "policy.\(key)", fix: fix))
        }
        self.registry = registry
        var disabled: Set<String> = []
        for (name, on) in resourceTypes {
            guard let t = registry.resourceType(name) else {
                problem(
                    "resourceTypes.\(name)", "unknown resource type",
                    fix: "use one of " + registry.resourceTypes.map(\.id).joined(separator: ", "))
                continue
            }
            if !on { disabled.insert(t.id) }
        }
        disabledTypes = disabled
        var compiled: [CompiledRule] = []
        rules: for (path, rule) in attributes {
            var matched = false
            for type in registry.resourceTypes {
                guard let p = registry.parsePath(path, in: type), !p.attribute.isEmpty,
                    let r = registry.resolve(p, in: type)
                else { continue }
                matched = true
                let name = r.attribute.name.asciiLowercased
                guard !["id", "meta", "schemas"].contains(name) else {
                    problem("attributes.\(path)", "identifies the resource and always leaves with it", fix: "remove this rule")
                    continue rules
                }
                if rule == .keepLocal && r.subAttribute == nil && r.attribute.required {
                    problem(
                        "attributes.\(path)", "is required by \(type.id): pseudonymize it instead of keeping it local", fix: "pseudonymize")
                    continue rules
                }
                if rule == .pseudonymize {
                    let leaf = r.subAttribute ?? (r.attribute.type == .complex ? r.attribute.subAttribute("value") : r.attribute)
                    guard let leaf, leaf.type == .string || leaf.type == .reference else {
                        problem("attributes.\(path)", "is not a string and cannot be pseudonymized", fix: "keep-local")
                        continue rules
                    }
                    guard pseudonymKey != nil else {
                        problem(
                            "attributes.\(path)", "pseudonymizing needs a pseudonym key file",
                            fix: "set policy.pseudonymKeyFile (head -c 32 /dev/urandom > FILE)")
                        continue rules
                    }
                }
                compiled.append(CompiledRule(type: type.id, attribute: r, rule: rule, text: path))
            }
            if !matched {
                problem(
                    "attributes.\(path)", "is not an attribute of any resource type",
                    fix: "check the spelling (name.givenName, URN:attribute)")
            }
        }
        rules = compiled
        var filters: [String: Filter] = [:]
        for (name, text) in scopes {
            guard let t = registry.resourceType(name) else {
                problem(
                    "scope.\(name)", "unknown resource type in scope",
                    fix: "use one of " + registry.resourceTypes.map(\.id).joined(separator: ", "))
                continue
            }
            do throws(SCIMError) {
                filters[t.id] = try Filter(text, registry: registry, type: t)
            } catch {
                problem("scope.\(name)", "not a valid SCIM filter for \(t.id): \(error.detail)")
            }
        }
        self.scopes = filters
        self.pseudonymKey = pseudonymKey
        var description = "types:" + disabled.sorted().joined(separator: ",")
        description += ";rules:" + attributes.map { "\($0.0.asciiLowercased)=\($0.1.rawValue)" }.sorted().joined(separator: ",")
        description += ";scopes:" + scopes.map { "\($0.key)=\($0.value)" }.sorted().joined(separator: ",")
        description += ";key:" + (pseudonymKey.map { hexString(sha256($0)) } ?? "-")
        fingerprint = hexString(sha256(Array(description.utf8)))
    }

    /// What of `resource` leaves the boundary, or nil when nothing does
    /// (type kept local, or out of scope).
    /// Whether the scope of `type` looks at members (then whether a group
    /// leaves depends on them, and its events are decided on the whole group).
    func scopeReadsMembers(_ type: ResourceType) -> Bool {
        scopes[type.id].map { filterReadsMembers($0.root) } ?? false
    }

    public func outbound(_ resource: JSONObject, type: ResourceType) -> JSONObject? {
        guard !disabledTypes.contains(type.id) else { return nil }
        if let scope = scopes[type.id], !scope.matches(resource) { return nil }
        var out = resource
        out["groups"] = nil  // computed by each side from memberships
        for r in rules where r.type == type.id {
            apply(r, to: &out)
        }
        // Extensions emptied by the rules leave `schemas` too.
        if let schemas = out["schemas"]?.arrayValue {
            let kept = schemas.filter { s in
                guard let urn = s.stringValue, urn != type.schema else { return true }
                return out[urn] != nil
            }
            out["schemas"] = .array(kept)
        }
        return out
    }

    func apply(_ r: CompiledRule, to resource: inout JSONObject) {
        let name = r.attribute.attribute.name
        let container = r.attribute.isExtension ? r.attribute.schema!.id : nil
        var scope = container.map { resource[$0]?.objectValue ?? JSONObject() } ?? resource
        defer {
            if let container {
                resource[container] = scope.isEmpty ? nil : .object(scope)
            } else {
                resource = scope
            }
        }
        guard let value = scope[name] else { return }
        let sub = r.attribute.subAttribute?.name ?? (r.attribute.attribute.type == .complex ? "value" : nil)
        switch r.rule {
        case .propagate:
            return
        case .keepLocal:
            guard let s = r.attribute.subAttribute?.name else { scope[name] = nil; return }
            scope[name] = mapElements(value) { e in
                var o = e
                o[s] = nil
                return o.isEmpty ? nil : o
            }
        case .pseudonymize:
            guard let sub else { scope[name] = pseudonym(value); return }
            scope[name] = mapElements(value) { e in
                var o = e
                if let v = o[sub] { o[sub] = pseudonym(v) }
                return o
            }
        }
    }

    func mapElements(_ value: JSON, _ f: (JSONObject) -> JSONObject?) -> JSON? {
        if let items = value.arrayValue {
            let mapped = items.compactMap { $0.objectValue.flatMap(f).map(JSON.object) }
            return mapped.isEmpty ? nil : .array(mapped)
        }
        return value.objectValue.flatMap(f).map(JSON.object)
    }

    func pseudonym(_ value: JSON) -> JSON {
        guard let s = value.stringValue, let key = pseudonymKey else { return value }
        return .string(hexString(hmacSHA256(key: key, message: Array(s.utf8))))
    }

    /// A human-readable account of what leaves for one resource.
    public func explain(_ resource: JSONObject, type: ResourceType) -> [String] {
        var lines: [String] = []
        let id = resource["id"]?.stringValue ?? "?"
        if disabledTypes.contains(type.id) {
            return ["\(type.id) \(id): kept local (the policy keeps every \(type.id) inside the boundary)"]
        }
        if let scope = scopes[type.id] {
            let inScope = scope.matches(resource)
            lines.append(
                "\(type.id) \(id): scope '\(scope.text)' \(inScope ? "matches: it leaves the boundary" : "does not match: nothing leaves")")
            if !inScope { return lines }
        } else {
            lines.append("\(type.id) \(id): no scope filter: it leaves the boundary")
        }
        for r in rules where r.type == type.id && r.rule != .propagate {
            lines.append("  \(r.text): \(r.rule == .keepLocal ? "kept local" : "pseudonymized (HMAC-SHA256)")")
        }
        if let out = outbound(resource, type: type) { lines.append("  leaves as: " + JSON.object(out).text) }
        return lines
    }
}
