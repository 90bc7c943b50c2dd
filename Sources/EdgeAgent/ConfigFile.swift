import EdgeConfig
import EdgeHTTP
import EdgeLoop
import EdgeTLS
import Glibc
import SCIM

extension AgentConfiguration {
    /// Reads a YAML configuration file strictly: unknown keys, wrong types
    /// and invalid values are errors with their line and column.
    /// The keys are documented in `packaging/agent.example.yaml`.
    public static func load(file path: String) throws(ConfigError) -> AgentConfiguration {
        try loadYAMLFile(path, decode)
    }

    public static func decode(_ root: YAMLNode) throws(ConfigError) -> AgentConfiguration {
        var top = try YAMLMapping(root, path: "")
        guard let dataDir = try top.string("dataDir") else { throw ConfigError("'dataDir' is required", at: root.mark) }
        let listenText = try top.string("listen") ?? "127.0.0.1:8080"
        guard let listen = SocketAddress(listenText) else {
            throw ConfigError("'listen' must be HOST:PORT, got '\(listenText)'", at: top.node("listen")?.mark)
        }
        var config = AgentConfiguration(dataDirectory: dataDir, listen: listen)
        config.tokenFile = try top.string("tokenFile")
        let workersText = try top.string("workers") ?? "auto"
        guard let workers = servingLoopCount(workersText) else {
            throw ConfigError("'workers' must be auto or a number from 1 to 64, got '\(workersText)'", at: top.node("workers")?.mark)
        }
        config.servingLoops = workers
        if var tls = try top.mapping("tls") {
            guard let cert = try tls.string("cert"), let key = try tls.string("key") else {
                throw ConfigError("'tls' needs 'cert' and 'key'", at: tls.mark)
            }
            config.tls = TLSConfiguration(certificateChainFile: cert, privateKeyFile: key, verifyPeer: false)
            try tls.finish()
        }
        if var admin = try top.mapping("admin") {
            if let l = try admin.string("listen"), l != "none" {
                guard let a = SocketAddress(l) else { throw ConfigError("'admin.listen' must be HOST:PORT or none", at: admin.node("listen")?.mark) }
                config.adminListen = a
            }
            try admin.finish()
        } else {
            config.adminListen = SocketAddress(host: "127.0.0.1", port: 9180)
        }
        if var limits = try top.mapping("limits") {
            if let v = try limits.int("maxBodyBytes") { config.limits.maxBodyBytes = v }
            if let v = try limits.int("maxConnections") { config.limits.maxConnections = v }
            if let v = try limits.int("requestTimeoutMs") { config.limits.requestTimeoutMilliseconds = UInt64(max(1, v)) }
            if let v = try limits.int("idleTimeoutMs") { config.limits.idleTimeoutMilliseconds = UInt64(max(1, v)) }
            try limits.finish()
        }
        if var store = try top.mapping("store") {
            if let v = try store.int("maxBytes") { config.maxStoreBytes = v }
            try store.finish()
        }
        if var outbox = try top.mapping("outbox") {
            if let v = try outbox.bool("keep") { config.endpoint.recordOutbox = v }
            if let v = try outbox.int("maxEvents") {
                config.endpoint.outboxHighEvents = v
                config.endpoint.outboxLowEvents = v * 4 / 5
            }
            if let v = try outbox.int("maxBytes") {
                config.endpoint.outboxHighBytes = v
                config.endpoint.outboxLowBytes = v / 5 * 4
            }
            try outbox.finish()
        } else {
            config.endpoint.recordOutbox = false  // standalone: no broker to drain it
        }
        if var scim = try top.mapping("scim") {
            if let p = try scim.string("profile") {
                switch p {
                case "lenient": config.endpoint.profile = .lenient
                case "strict": config.endpoint.profile = .strict
                default: throw ConfigError("'scim.profile' must be lenient or strict", at: scim.node("profile")?.mark)
                }
            }
            if let v = try scim.int("maxResults") { config.endpoint.maxResults = max(1, v) }
            if let v = try scim.int("scanBudget") { config.endpoint.scanBudget = max(1, v) }
            try scim.finish()
        }
        if var broker = try top.mapping("broker") {
            guard let url = try broker.string("url"), let (address, name) = RelayConfiguration.brokerAddress(url) else {
                throw ConfigError("'broker.url' must be https://HOST:PORT", at: broker.mark)
            }
            guard let ca = try broker.string("ca"), let cert = try broker.string("cert"), let key = try broker.string("key"),
                  let domain = try broker.string("domain") else {
                throw ConfigError("'broker' needs url, ca, cert, key and domain", at: broker.mark)
            }
            var relay = RelayConfiguration(broker: address, brokerName: name,
                                           tls: TLSConfiguration(certificateChainFile: cert, privateKeyFile: key, trustRootsFile: ca),
                                           domain: domain, agentName: try broker.string("agent") ?? "agent")
            if let v = try broker.int("maxEventsPerBatch") { relay.maxEventsPerBatch = max(1, v) }
            if let v = try broker.int("window") { relay.window = max(1, v) }
            try broker.finish()
            config.relay = relay
            config.endpoint.recordOutbox = true
        }
        if var policy = try top.mapping("policy") {
            config.policy = try decodePolicy(&policy)
            try policy.finish()
        }
        try top.finish()
        return config
    }

    static func decodePolicy(_ m: inout YAMLMapping) throws(ConfigError) -> LocalPolicy {
        var types: [String: Bool] = [:]
        if var t = try m.mapping("resourceTypes") {
            for (name, mark, value) in t.entries() {
                guard case .scalar(let s, _, _) = value, s == "propagate" || s == "keep-local" else {
                    throw ConfigError("'policy.resourceTypes.\(name)' must be propagate or keep-local", at: mark)
                }
                types[name] = s == "propagate"
            }
            try t.finish()
        }
        var rules: [(String, AttributeRule)] = []
        if var a = try m.mapping("attributes") {
            for (path, mark, value) in a.entries() {
                guard case .scalar(let s, _, _) = value, let rule = AttributeRule(rawValue: s) else {
                    throw ConfigError("'policy.attributes.\(path)' must be propagate, keep-local or pseudonymize", at: mark)
                }
                rules.append((path, rule))
            }
            try a.finish()
        }
        var scopes: [String: String] = [:]
        if var s = try m.mapping("scope") {
            for (name, mark, value) in s.entries() {
                guard case .scalar(let text, _, _) = value else { throw ConfigError("'policy.scope.\(name)' must be a SCIM filter", at: mark) }
                scopes[name] = text
            }
            try s.finish()
        }
        var key: [UInt8]?
        if let keyFile = try m.string("pseudonymKeyFile") {
            key = try readFileBytes(keyFile)
            guard key!.count >= 32 else {
                throw ConfigError("pseudonym key file \(keyFile) must hold at least 32 bytes", at: m.node("pseudonymKeyFile")?.mark)
            }
        }
        do throws(ConfigError) {
            return try LocalPolicy(registry: .standard, resourceTypes: types, attributes: rules, scopes: scopes, pseudonymKey: key)
        } catch {
            throw ConfigError(error.message, at: m.mark)
        }
    }
}

/// The certificate identity an agent is expected to carry:
/// `spiffe://TRUST-DOMAIN/DOMAIN/AGENT` (SAN URI). `scim-edge pki csr`
/// requests it; the broker binds it to the domain (`domains:` in its config).
public func agentIdentity(trustDomain: String, domain: String, agent: String) -> String {
    "spiffe://\(trustDomain)/\(domain)/\(agent)"
}

/// Whether a certificate names this domain and agent: a SAN URI whose path
/// ends in `/DOMAIN/AGENT`, or a DNS name `AGENT.DOMAIN.…`.
public func identityNames(_ identity: PeerIdentity, domain: String, agent: String) -> Bool {
    identity.uris.contains { $0.hasSuffix("/\(domain)/\(agent)") && $0.contains("://") }
        || identity.dnsNames.contains { $0.hasPrefix("\(agent).\(domain).") }
}

extension AgentConfiguration {
    /// Problems with what the configuration refers to (`check-config`):
    /// files, permissions of secrets, certificates (dates, key, CA) and the
    /// relay certificate's identity against the configured domain and agent.
    public func fileProblems() -> [String] {
        var checks = FileChecks()
        checks.dataDirectory(dataDirectory)
        if let tokenFile, checks.file(tokenFile, "tokenFile", secret: true) {
            do { if try readTokenFile(tokenFile).isEmpty { checks.problem("tokenFile \(tokenFile): holds no token") } }
            catch { checks.problem("tokenFile \(tokenFile): \(error)") }
        }
        if let tls, let cert = tls.certificateChainFile {
            checks.certificate(cert, key: tls.privateKeyFile, ca: nil, "tls")
        }
        if let relay {
            if let cert = relay.tls.certificateChainFile,
               let summary = checks.certificate(cert, key: relay.tls.privateKeyFile, ca: relay.tls.trustRootsFile, "broker") {
                if !identityNames(summary.identity, domain: relay.domain, agent: relay.agentName) {
                    checks.problem("broker certificate \(cert) names \(summary.identity.names.joined(separator: ", ")), not domain '\(relay.domain)' and agent '\(relay.agentName)' "
                                   + "(expected a SAN URI ending in /\(relay.domain)/\(relay.agentName), e.g. \(agentIdentity(trustDomain: "example.org", domain: relay.domain, agent: relay.agentName)))")
                }
            } else if relay.tls.certificateChainFile == nil {
                checks.problem("broker: a client certificate (cert, key) is required for mutual TLS")
            }
        }
        return checks.problems
    }
}

/// The number of serving loops for `workers`: `auto` is one per online CPU
/// (at most 16), or a number from 1 to 64.
public func servingLoopCount(_ text: String) -> Int? {
    if text == "auto" { return max(1, min(16, Int(sysconf(Int32(_SC_NPROCESSORS_ONLN))))) }
    guard let n = Int(text), (1...64).contains(n) else { return nil }
    return n
}
