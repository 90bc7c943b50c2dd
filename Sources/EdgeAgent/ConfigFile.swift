import EdgeConfig
import EdgeHTTP
import EdgeLoop
import EdgeTLS
import Glibc
import SCIM

/// The agent's YAML file, read strictly: unknown keys, wrong types and
/// invalid values are errors with their line and column, all reported
/// together (`YAMLConfiguration.load`). The keys are documented in
/// `packaging/agent.example.yaml`.
extension AgentConfiguration: YAMLConfiguration {
    /// Decodes what is valid and records a problem for everything else,
    /// going on with the next key: the result is meaningful only when no
    /// error was recorded (check-config still checks its files).
    public static func decode(_ root: YAMLNode, _ d: ConfigDiagnostics) -> AgentConfiguration {
        var config = AgentConfiguration(dataDirectory: "", listen: AgentConfiguration.defaultListen)
        config.adminListen = AgentConfiguration.defaultAdminListen
        guard var top = YAMLMapping(root, path: "", d) else { return config }
        config.dataDirectory = top.required("dataDir", "the directory of the agent's LMDB file") ?? ""
        if let text = top.string("listen") {
            if let a = SocketAddress(text) { config.listen = a } else { top.problem("listen", "must be HOST:PORT, got '\(text)'") }
        }
        config.tokenFile = top.string("tokenFile")
        let workersText = top.string("workers") ?? "auto"
        if let workers = servingLoopCount(workersText) {
            config.servingLoops = workers
        } else {
            top.problem("workers", "must be auto or a number from 1 to 64, got '\(workersText)'")
        }
        if var tls = top.mapping("tls") {
            let cert = tls.required("cert"), key = tls.required("key")
            if let cert, let key { config.tls = TLSConfiguration(certificateChainFile: cert, privateKeyFile: key, verifyPeer: false) }
            tls.finish()
        }
        if !config.listen.isLoopback && config.tls == nil && !top.has("tls") {
            top.problem(
                "listen",
                "the SCIM listener is on \(config.listen.host) without TLS: bearer tokens and personal data would cross the network in the clear",
                fix: "add tls: {cert, key}, or listen on 127.0.0.1 behind a TLS-terminating proxy")
        }
        if var admin = top.mapping("admin") {
            if let listener = admin.operationsListener() { config.adminListen = listener }
            admin.finish()
        }
        if var limits = top.mapping("limits") {
            if let v = limits.int("maxBodyBytes") { config.limits.maxBodyBytes = v }
            if let v = limits.int("maxConnections") { config.limits.maxConnections = v }
            if let v = limits.int("requestTimeoutMs") { config.limits.requestTimeoutMilliseconds = UInt64(max(1, v)) }
            if let v = limits.int("idleTimeoutMs") { config.limits.idleTimeoutMilliseconds = UInt64(max(1, v)) }
            limits.finish()
        }
        if var store = top.mapping("store") {
            if let v = store.int("maxBytes") { config.maxStoreBytes = v }
            store.finish()
        }
        if var outbox = top.mapping("outbox") {
            if let v = outbox.bool("keep") { config.endpoint.recordOutbox = v }
            config.endpoint.limitOutbox(events: outbox.int("maxEvents"), bytes: outbox.int("maxBytes"))
            outbox.finish()
        } else {
            config.endpoint.recordOutbox = false  // standalone: no broker to drain it
        }
        if var scim = top.mapping("scim") {
            if let p = scim.string("profile") {
                switch p {
                case "lenient": config.endpoint.profile = .lenient
                case "strict": config.endpoint.profile = .strict
                default: scim.problem("profile", "must be lenient or strict, got '\(p)'")
                }
            }
            if let v = scim.int("maxResults") { config.endpoint.maxResults = max(1, v) }
            if let v = scim.int("scanBudget") { config.endpoint.scanBudget = max(1, v) }
            scim.finish()
        }
        if var broker = top.mapping("broker") {
            let url = broker.required("url", "https://HOST:PORT of the broker")
            let target = url.flatMap(RelayConfiguration.brokerAddress)
            if let url, target == nil { broker.problem("url", "must be https://HOST:PORT (an IP address or localhost), got '\(url)'") }
            let ca = broker.required("ca", "the federation CA"), cert = broker.required("cert", "this agent's certificate")
            let key = broker.required("key", "this agent's private key"), domain = broker.required("domain", "this agent's domain")
            let agent = broker.string("agent") ?? "agent"
            let batch = broker.int("maxEventsPerBatch"), window = broker.int("window")
            broker.finish()
            if let (address, name) = target, let ca, let cert, let key, let domain {
                var relay = RelayConfiguration(
                    broker: address, brokerName: name,
                    tls: TLSConfiguration(certificateChainFile: cert, privateKeyFile: key, trustRootsFile: ca),
                    domain: domain, agentName: agent)
                if let batch { relay.maxEventsPerBatch = max(1, batch) }
                if let window { relay.window = max(1, window) }
                config.relay = relay
            }
            config.endpoint.recordOutbox = true
        }
        if var policy = top.mapping("policy") {
            (config.policy, config.pseudonymKeyFile) = decodePolicy(&policy)
            policy.finish()
        }
        top.finish()
        return config
    }

    /// The policy, with each invalid entry reported at its own line.
    static func decodePolicy(_ m: inout YAMLMapping) -> (LocalPolicy?, keyFile: String?) {
        let d = m.diagnostics
        var types: [String: Bool] = [:]
        if var t = m.mapping("resourceTypes") {
            for (name, mark, value) in t.entries() {
                guard case .scalar(let s, _, _) = value, s == "propagate" || s == "keep-local" else {
                    d.error(t.full(name), "must be propagate or keep-local", at: mark)
                    continue
                }
                types[name] = s == "propagate"
            }
            t.finish()
        }
        var rules: [(String, AttributeRule)] = []
        if var a = m.mapping("attributes") {
            for (path, mark, value) in a.entries() {
                guard case .scalar(let s, _, _) = value, let rule = AttributeRule(rawValue: s) else {
                    d.error(a.full(path), "must be propagate, keep-local or pseudonymize", at: mark)
                    continue
                }
                rules.append((path, rule))
            }
            a.finish()
        }
        var scopes: [String: String] = [:]
        if var s = m.mapping("scope") {
            for (name, mark, value) in s.entries() {
                guard case .scalar(let text, _, _) = value else { d.error(s.full(name), "must be a SCIM filter", at: mark); continue }
                scopes[name] = text
            }
            s.finish()
        }
        var key: [UInt8]?
        let keyFile = m.string("pseudonymKeyFile")
        if let keyFile {
            do throws(ConfigError) {
                key = try readFileBytes(keyFile)
                if key!.count < 32 {
                    m.problem(
                        "pseudonymKeyFile", "\(keyFile) holds \(key!.count) bytes; at least 32 are needed",
                        fix: "head -c 32 /dev/urandom > \(keyFile)")
                }
            } catch {
                m.problem("pseudonymKeyFile", error.message, fix: "create it: head -c 32 /dev/urandom > \(keyFile)")
            }
            // A key that could not be read is reported above; the rules are
            // still checked as if it were there, not reported a second time.
            if key == nil || key!.count < 32 { key = [UInt8](repeating: 0, count: 32) }
        }
        var problems: [ConfigError] = []
        let policy = LocalPolicy(
            registry: .standard, resourceTypes: types, attributes: rules, scopes: scopes, pseudonymKey: key, problems: &problems)
        for p in problems { d.add(p) }
        return (problems.isEmpty ? policy : nil, keyFile)
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
    /// files, permissions of every secret, readability by the service's user
    /// (`serviceUser`), weak tokens, certificates (dates, key, CA) and the
    /// relay certificate's identity against the configured domain and agent.
    /// Each is reported at the line of the key naming the file.
    public func checkFiles(_ d: ConfigDiagnostics, configFile: String? = nil, serviceUser: ServiceUser? = nil) {
        var checks = FileChecks(serviceUser: serviceUser)
        if let configFile, serviceUser != nil { checks.file(configFile, at: "") }
        if !dataDirectory.isEmpty { checks.dataDirectory(dataDirectory) }
        if let tokenFile, checks.file(tokenFile, at: "tokenFile", secret: true) {
            do {
                for (i, token) in try readTokenFile(tokenFile).enumerated() {
                    if let weak = weakTokenReason(token) {
                        checks.problem("tokenFile", "\(tokenFile): token \(i + 1) \(weak)", fix: tokenFix)
                    }
                }
            } catch { checks.problem("tokenFile", "\(error)", fix: "write one token per line") }
        }
        if let tls, let cert = tls.certificateChainFile {
            checks.certificate(cert, key: tls.privateKeyFile, ca: nil, at: ("tls.cert", "tls.key", "tls.ca"))
        }
        // Not when reading it already failed: that is reported once, by the decoding.
        if let pseudonymKeyFile, !d.problems.contains(where: { $0.key == "policy.pseudonymKeyFile" }) {
            checks.file(pseudonymKeyFile, at: "policy.pseudonymKeyFile", secret: true)
        }
        if let relay, let cert = relay.tls.certificateChainFile,
            let summary = checks.certificate(
                cert, key: relay.tls.privateKeyFile, ca: relay.tls.trustRootsFile, at: ("broker.cert", "broker.key", "broker.ca")),
            !identityNames(summary.identity, domain: relay.domain, agent: relay.agentName)
        {
            checks.problem(
                "broker.cert",
                "\(cert) names \(summary.identity.names.joined(separator: ", ")), not domain '\(relay.domain)' and agent '\(relay.agentName)'",
                fix: "a certificate with a SAN URI ending in /\(relay.domain)/\(relay.agentName), e.g. "
                    + agentIdentity(trustDomain: "example.org", domain: relay.domain, agent: relay.agentName) + " (scim-edge pki csr)")
        }
        for p in checks.problems { d.error(p.key.isEmpty ? nil : p.key, p.message, fix: p.fix) }
    }
}

/// The number of serving loops for `workers`: `auto` is one per online CPU
/// (at most 16), or a number from 1 to 64.
public func servingLoopCount(_ text: String) -> Int? {
    if text == "auto" { return max(1, min(16, Int(sysconf(Int32(_SC_NPROCESSORS_ONLN))))) }
    guard let n = Int(text), (1...64).contains(n) else { return nil }
    return n
}
