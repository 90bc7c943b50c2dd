import EdgeConfig
import EdgeDelivery
import EdgeHTTP
import EdgeLDAP
import EdgeLoop
import EdgeTLS
import Glibc
import SCIM

/// The agent's options (`AgentOptions`, one declaration each) bound to
/// `AgentConfiguration`: what `serve`'s flags and the YAML file set.
public let agentOptionTable = OptionTable<AgentConfiguration>(
    AgentOptions.all,
    [
        .init(AgentOptions.dataDir) { c, v in
            c.dataDirectory = v.text; return nil
        },
        .init(AgentOptions.listen) { c, v in
            c.listen = v.address!; return nil
        },
        .init(AgentOptions.workers) { c, v in
            guard let n = servingLoopCount(v.text) else { return OptionProblem("must be auto or a number from 1 to 64, got '\(v.text)'") }
            c.servingLoops = n
            return nil
        },
        .init(AgentOptions.tokenFile) { c, v in
            c.tokenFile = v.text; return nil
        },
        .init(AgentOptions.token) { c, v in
            c.tokens += v.list; return nil
        },
        .init(AgentOptions.tlsCert) { c, v in
            c.tls = c.tls ?? TLSConfiguration(verifyPeer: false)
            c.tls!.certificateChainFile = v.text
            return nil
        },
        .init(AgentOptions.tlsKey) { c, v in
            c.tls = c.tls ?? TLSConfiguration(verifyPeer: false)
            c.tls!.privateKeyFile = v.text
            return nil
        },
        .init(AgentOptions.adminListen) { c, v in
            c.adminListen = v.address; return nil
        },
        .init(AgentOptions.maxBodyBytes) { c, v in
            c.limits.maxBodyBytes = v.integer; return nil
        },
        .init(AgentOptions.maxConnections) { c, v in
            c.limits.maxConnections = v.integer; return nil
        },
        .init(AgentOptions.requestTimeoutMs) { c, v in
            c.limits.requestTimeoutMilliseconds = UInt64(v.integer); return nil
        },
        .init(AgentOptions.idleTimeoutMs) { c, v in
            c.limits.idleTimeoutMilliseconds = UInt64(v.integer); return nil
        },
        .init(AgentOptions.storeMaxBytes) { c, v in
            c.maxStoreBytes = v.integer; return nil
        },
        .init(AgentOptions.keepOutbox) { c, v in
            c.endpoint.recordOutbox = v.boolean; return nil
        },
        .init(AgentOptions.outboxMaxEvents) { c, v in
            c.endpoint.limitOutbox(events: v.integer); return nil
        },
        .init(AgentOptions.outboxMaxBytes) { c, v in
            c.endpoint.limitOutbox(bytes: v.integer); return nil
        },
        .init(AgentOptions.profile) { c, v in
            c.endpoint.profile = v.text == "strict" ? .strict : .lenient; return nil
        },
        .init(AgentOptions.maxResults) { c, v in
            c.endpoint.maxResults = v.integer; return nil
        },
        .init(AgentOptions.scanBudget) { c, v in
            c.endpoint.scanBudget = v.integer; return nil
        },
        .init(AgentOptions.patchResponseMaxMembers) { c, v in
            c.endpoint.patchResponseMaxMembers = v.integer; return nil
        },
        .init(AgentOptions.brokerURL) { c, v in
            guard let (address, name) = RelayConfiguration.brokerAddress(v.text) else {
                return OptionProblem("must be https://HOST:PORT (an IP address or localhost), got '\(v.text)'")
            }
            if c.relay == nil {
                c.relay = RelayConfiguration(broker: address, brokerName: name, tls: TLSConfiguration(), domain: "", agentName: "")
                agentOptionTable.applyDefaults(section: AgentOptions.brokerURL.section, to: &c)
            }
            (c.relay!.broker, c.relay!.brokerName) = (address, name)
            return nil
        },
        .init(AgentOptions.brokerCA) { c, v in
            c.relay?.tls.trustRootsFile = v.text; return nil
        },
        .init(AgentOptions.brokerCert) { c, v in
            c.relay?.tls.certificateChainFile = v.text; return nil
        },
        .init(AgentOptions.brokerKey) { c, v in
            c.relay?.tls.privateKeyFile = v.text; return nil
        },
        .init(AgentOptions.brokerCRL) { c, v in
            c.relay?.tls.crlFile = v.text; return nil
        },
        .init(AgentOptions.brokerDomain) { c, v in
            c.relay?.domain = v.text; return nil
        },
        .init(AgentOptions.brokerAgent) { c, v in
            c.relay?.agentName = v.text; return nil
        },
        .init(AgentOptions.maxEventsPerBatch) { c, v in
            c.relay?.maxEventsPerBatch = v.integer; return nil
        },
        .init(AgentOptions.window) { c, v in
            c.relay?.window = v.integer; return nil
        },
        .init(section: AgentOptions.policy) { node, path, d, c in
            guard var policy = YAMLMapping(node, path: path, d) else { return }
            (c.policy, c.pseudonymKeyFile) = AgentConfiguration.decodePolicy(&policy)
            policy.finish()
        },
        .init(section: AgentOptions.inbound) { node, path, d, c in
            guard var inbound = YAMLMapping(node, path: path, d) else { return }
            c.inbound = AgentConfiguration.decodeInbound(&inbound)
            inbound.finish()
        },
        .init(section: AgentOptions.sources, AgentConfiguration.decodeSources),
        .init(section: AgentOptions.targets, AgentConfiguration.decodeTargets),
    ])

/// The keys of one entry of `targets` (an app's: no `domain`), the broker's
/// bindings (`makeTargetOptionTable`).
public let localTargetOptionTable = makeTargetOptionTable(domain: nil)

/// The keys of one entry of `sources` bound to `SourceConfiguration`.
public let sourceOptionTable = OptionTable<SourceConfiguration>(
    AgentOptions.Source.all,
    [
        .init(AgentOptions.Source.name) { s, v in
            guard isSourceName(v.text) else { return OptionProblem("must be letters, digits, '.', '_' and '-', got '\(v.text)'") }
            s.name = v.text
            return nil
        },
        .init(AgentOptions.Source.kind, \.kind),
        .init(AgentOptions.Source.url) { s, v in
            // The kind is checked against the scheme once the entry is read (decodeSources).
            let ldap = (v.text.hasPrefix("ldap://") || v.text.hasPrefix("ldaps://")) && v.text.split(separator: "/").count >= 2
            guard ldap || ServiceURL(v.text) != nil else {
                return OptionProblem(
                    "must be ldap://HOST[:PORT], ldaps://HOST[:PORT] or (kind: scim) http(s)://HOST[:PORT][/PATH], got '\(v.text)'")
            }
            s.url = v.text
            return nil
        },
        .init(AgentOptions.Source.bindDN, \.bindDN),
        .init(AgentOptions.Source.bindPasswordFile, \.bindPasswordFile),
        .init(AgentOptions.Source.baseDN, \.baseDN),
        .init(AgentOptions.Source.userFilter) { s, v in
            guard (try? LDAPFilter(v.text)) != nil else { return OptionProblem("is not an LDAP filter (RFC 4515): '\(v.text)'") }
            s.userFilter = v.text
            return nil
        },
        .init(AgentOptions.Source.groupFilter) { s, v in
            guard (try? LDAPFilter(v.text)) != nil else { return OptionProblem("is not an LDAP filter (RFC 4515): '\(v.text)'") }
            s.groupFilter = v.text
            return nil
        },
        .init(AgentOptions.Source.mode, \.mode),
        .init(AgentOptions.Source.pollSeconds, \.pollSeconds),
        .init(AgentOptions.Source.pollAttribute, \.pollAttribute),
        .init(AgentOptions.Source.fullCompareEvery, \.fullCompareEvery),
        .init(AgentOptions.Source.onDelete, \.onDelete),
        .init(AgentOptions.Source.schema, \.schema),
        .init(AgentOptions.Source.keyAttribute, \.keyAttribute),
        .init(section: AgentOptions.Source.mappingUsers) { node, path, d, s in
            s.userMapping = decodeSourceMapping(node, path, d)
        },
        .init(section: AgentOptions.Source.mappingGroups) { node, path, d, s in
            s.groupMapping = decodeSourceMapping(node, path, d)
        },
        .init(AgentOptions.Source.tlsCA) { s, v in
            s.tls.caFile = v.text; return nil
        },
        .init(AgentOptions.Source.startTLS) { s, v in
            s.tls.startTLS = v.boolean; return nil
        },
        .init(AgentOptions.Source.tokenFile, \.tokenFile),
        .init(AgentOptions.Source.requestsPerSecond, \.requestsPerSecond),
        .init(AgentOptions.Source.pageSize, \.pageSize),
        .init(AgentOptions.Source.batchSize, \.batchSize),
    ])

func isSourceName(_ name: String) -> Bool {
    !name.isEmpty
        && name.utf8.allSatisfy { c in
            (c >= 0x30 && c <= 0x39) || (c >= 0x41 && c <= 0x5a) || (c >= 0x61 && c <= 0x7a) || c == 0x2e || c == 0x5f || c == 0x2d
        }
}

/// `mapping.users` / `mapping.groups`: SCIM path → LDAP attributes, a
/// comma-separated string or a list; empty unmaps the path.
func decodeSourceMapping(_ node: YAMLNode, _ path: String, _ d: ConfigDiagnostics) -> [(path: String, attributes: [String])] {
    guard var m = YAMLMapping(node, path: path, d) else { return [] }
    var out: [(path: String, attributes: [String])] = []
    for (key, mark, value) in m.entries() {
        switch value {
        case .scalar(let text, _, _):
            out.append((key, text.split(separator: ",").map { String($0).trimmingSpaces }.filter { !$0.isEmpty }))
        case .sequence(let items, _):
            var names: [String] = []
            for item in items {
                guard case .scalar(let t, _, _) = item else { d.error(m.full(key), "must list attribute names", at: mark); continue }
                names.append(t)
            }
            out.append((key, names))
        default:
            d.error(m.full(key), "must be an LDAP attribute name, a comma-separated list of them, or a list", at: mark)
        }
    }
    m.finish()
    return out
}

extension AgentConfiguration {
    /// A list of named entries (`sources:`, `targets:`): each decoded by
    /// `entry` (nil, or a problem recorded: unusable), a name defined twice
    /// refused at its line (`what`: "source", "target").
    static func decodeNamedList<Entry>(
        _ node: YAMLNode, _ path: String, _ d: ConfigDiagnostics, what: String, name: (Entry) -> String,
        _ entry: (inout YAMLMapping, _ at: String) -> Entry?
    ) -> [Entry] {
        guard case .sequence(let items, _) = node else {
            d.error(path, "must be a list ('- …' entries)", at: node.mark)
            return []
        }
        var names: [String: Int] = [:]
        var out: [Entry] = []
        for (i, item) in items.enumerated() {
            let at = "\(path)[\(i)]"
            d.record(at, item.mark)
            guard var m = YAMLMapping(item, path: at, d) else { continue }
            let before = d.problems.count
            guard let e = entry(&m, at), d.problems.count == before else { continue }
            if let line = names[name(e)] {
                d.error(
                    "\(at).name", "\(what) '\(name(e))' is defined twice (first at line \(line))", fix: "give each \(what) its own name")
                continue
            }
            names[name(e)] = d.mark("\(at).name")?.line ?? 0
            out.append(e)
        }
        return out
    }

    /// `sources:`, each entry through `sourceOptionTable`; a name defined twice is refused at its line.
    static func decodeSources(_ node: YAMLNode, _ path: String, _ d: ConfigDiagnostics, _ config: inout AgentConfiguration) {
        config.sources += decodeNamedList(node, path, d, what: "source", name: \.name) { m, at in
            var source = sourceOptionTable.defaults(SourceConfiguration(name: "", url: "", baseDN: ""))
            sourceOptionTable.decode(&m, into: &source)
            m.finish()
            // The kind against the scheme and the keys it needs, even when other keys have problems.
            let ldapURL = source.url.hasPrefix("ldap://") || source.url.hasPrefix("ldaps://")
            switch source.kind {
            case .ldap where !ldapURL && !source.url.isEmpty:
                d.error("\(at).url", "an ldap source needs ldap:// or ldaps://, got '\(source.url)'", fix: "or set kind: scim")
            case .ldap where source.baseDN.isEmpty:
                d.error("\(at).baseDN", "an ldap source needs baseDN (where its users and groups are)")
            case .scim where ldapURL:
                d.error("\(at).url", "a scim source needs http:// or https://, got '\(source.url)'", fix: "or set kind: ldap")
            case .scim where source.tokenFile == nil:
                d.error("\(at).tokenFile", "a scim source needs tokenFile (its bearer token)")
            default: break
            }
            return source
        }
    }

    /// `targets:`, each entry through `localTargetOptionTable` and the
    /// collision keys; a name defined twice, a missing url and a route on
    /// group members (the agent routes a group by its attributes) are
    /// refused at their own line.
    static func decodeTargets(_ node: YAMLNode, _ path: String, _ d: ConfigDiagnostics, _ config: inout AgentConfiguration) {
        config.targets += decodeNamedList(node, path, d, what: "target", name: \.name) { m, _ in
            var target = localTargetOptionTable.defaults(try! TargetConfiguration(name: "unnamed", url: "http://127.0.0.1:1"))
            localTargetOptionTable.decode(&m, into: &target)
            target.decodeCollisions(&m, domains: [])
            if !m.has("url") {
                m.problem("url", "is required: the app's SCIM base URL", fix: "add 'url: https://…/scim/v2'")
            }
            if target.groupRoutesReadMembers {
                m.problem(
                    "routes", "a local target's route cannot filter groups on their members (the agent routes a group by its attributes)",
                    fix: "filter on displayName or externalId, or route the group whole")
            }
            m.finish()
            return target
        }
    }
}

extension AgentConfiguration {
    /// Where every run starts, with a file or with flags only: the table's
    /// defaults (`AgentOptions`).
    public static var defaults: AgentConfiguration {
        agentOptionTable.defaults(AgentConfiguration(dataDirectory: "", listen: AgentConfiguration.defaultListen))
    }
}

/// The agent's YAML file, read strictly through `agentOptionTable`:
/// unknown keys, wrong types, values out of bounds and invalid values are
/// errors with their line and column, all reported together
/// (`YAMLConfiguration.load`). The keys: `docs/configuration.md`.
extension AgentConfiguration: YAMLConfiguration {
    /// Decodes what is valid and records a problem for everything else,
    /// going on with the next key: the result is meaningful only when no
    /// error was recorded (check-config still checks its files).
    public static func decode(_ root: YAMLNode, _ d: ConfigDiagnostics) -> AgentConfiguration {
        var config = AgentConfiguration.defaults
        guard var top = YAMLMapping(root, path: "", d) else { return config }
        agentOptionTable.decode(&top, into: &config)
        top.finish()
        if top.has("inbound") && config.relay == nil {
            top.problem(
                "inbound", "needs broker: the downlink is fetched over the relay's connection",
                fix: "add broker: {url, ca, cert, key, domain}")
        }
        // A local target's route names source domains: this agent's own, or one that enters through inbound.
        let known = [config.relay?.domain ?? AgentStore.standaloneDomain] + (config.inbound?.accept.flatMap(\.domains) ?? [])
        for (i, t) in config.targets.enumerated() {
            for (r, route) in t.routes.enumerated() {
                for (j, domain) in route.domains.enumerated() where !known.contains(domain) {
                    let key = "targets[\(i)].routes[\(r)].domains[\(j)]"
                    d.warning(
                        key,
                        "domain '\(domain)' is neither this agent's (\(known[0])) nor one its inbound policy accepts: the route carries nothing of it",
                        at: d.mark(key) ?? d.mark("targets[\(i)]"), fix: "name one of " + known.joined(separator: ", "))
                }
            }
        }
        if !config.listen.isLoopback && config.tls == nil && !top.has("tls") {
            top.problem(
                "listen",
                "the SCIM listener is on \(config.listen.host) without TLS: bearer tokens and personal data would cross the network in the clear",
                fix: "add tls: {cert, key}, or listen on 127.0.0.1 behind a TLS-terminating proxy")
        }
        return config
    }

    /// `inbound:`, each problem at its own line; nil when unusable.
    static func decodeInbound(_ m: inout YAMLMapping) -> InboundPolicy? {
        let d = m.diagnostics, before = d.problems.count
        var rules: [InboundPolicy.Rule] = []
        if let entries = m.sequence("accept") {
            for (i, item) in entries.enumerated() {
                guard var e = YAMLMapping(item, path: "\(m.full("accept"))[\(i)]", d) else { continue }
                let domains = e.strings("domains") ?? [], types = e.strings("types") ?? [], filter = e.string("filter")
                do throws(SCIMError) { rules.append(try InboundPolicy.Rule(domains: domains, types: types, filter: filter)) } catch {
                    e.problem(filter != nil && !domains.isEmpty ? "filter" : "domains", error.detail)
                }
                e.finish()
            }
        } else if !m.has("accept") {
            m.problem(
                "accept", "is required: which source domains (and types, and a filter) may enter", fix: "add accept: [{domains: [hq]}]")
        }
        var policy = InboundPolicy(accept: rules)
        if var map = m.mapping("map") {
            if var set = map.mapping("set") {
                for (path, mark, value) in set.entries() {
                    guard case .scalar(let text, let plain, _) = value else {
                        d.error(set.full(path), "must be a scalar", at: mark); continue
                    }
                    policy.mapping.constant.append((path, AttributeMapping.constantValue(text, plain: plain)))
                }
                set.finish()
            }
            if let template = map.string("userName") {
                if template.contains("{userName}") {
                    policy.userNameTemplate = template
                } else {
                    map.problem("userName", "must hold {userName} (and, to keep domains apart, {domain})")
                }
            }
            policy.mapping.drop = map.strings("drop") ?? []
            for path in policy.unknownPaths() {
                map.problem(policy.mapping.drop.contains(path) ? "drop" : "set", "'\(path)' is an attribute of neither User nor Group")
            }
            map.finish()
        }
        for (key, spec, keyPath) in [
            ("maxEventsPerPoll", AgentOptions.Inbound.maxEventsPerPoll, \InboundPolicy.maxEventsPerPoll),
            ("waitMs", AgentOptions.Inbound.waitMs, \InboundPolicy.waitMilliseconds),
        ] {
            guard let n = m.int(key), case .integer(let range) = spec.kind else { continue }
            guard range.contains(n) else {
                m.problem(key, "must be from \(range.lowerBound) to \(range.upperBound), got \(n)")
                continue
            }
            policy[keyPath: keyPath] = n
        }
        if let report = m.string("reportApps") {
            if let r = AppOutcomeReporting(rawValue: report) {
                policy.reportApps = r
            } else {
                m.problem("reportApps", "must be named, anonymous or none, got '\(report)'")
            }
        }
        return d.problems.count == before ? policy : nil
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
        for (i, source) in sources.enumerated() {
            if let file = source.bindPasswordFile { checks.file(file, at: "sources[\(i)].bindPasswordFile", secret: true) }
            if let file = source.tokenFile { checks.file(file, at: "sources[\(i)].tokenFile", secret: true) }
            if let ca = source.tls.caFile { checks.file(ca, at: "sources[\(i)].tls.ca") }
        }
        for (i, t) in targets.enumerated() { t.checkFiles(&checks, at: "targets[\(i)]") }
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
        if let relay, let crl = relay.tls.crlFile { checks.revocationList(crl, ca: relay.tls.trustRootsFile, at: "broker.crl") }
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
