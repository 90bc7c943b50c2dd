import EdgeConfig
import EdgeDelivery
import EdgeHTTP
import EdgeLoop
import EdgeTLS
import SCIM

/// The broker's options (`BrokerOptions`, one declaration each) bound to
/// `BrokerConfiguration`: what `serve`'s flags and the YAML file set.
public let brokerOptionTable = OptionTable<BrokerConfiguration>(
    BrokerOptions.all,
    [
        .init(BrokerOptions.dataDir) { c, v in
            c.dataDirectory = v.text; return nil
        },
        .init(BrokerOptions.listen) { c, v in
            c.listen = v.address!; return nil
        },
        .init(BrokerOptions.tlsCA) { c, v in
            c.tls.trustRootsFile = v.text; return nil
        },
        .init(BrokerOptions.tlsCert) { c, v in
            c.tls.certificateChainFile = v.text; return nil
        },
        .init(BrokerOptions.tlsKey) { c, v in
            c.tls.privateKeyFile = v.text; return nil
        },
        .init(BrokerOptions.tlsCRL) { c, v in
            c.tls.crlFile = v.text; return nil
        },
        .init(
            section: BrokerOptions.domains,
            flag: { c, v in
                guard let b = DomainBinding(v.text) else {
                    return OptionProblem("is not NAME=CERT-IDENTITY (NAME: letters, digits, '.', '_' and '-')")
                }
                c.domains.append(b)
                return nil
            }, BrokerConfiguration.decodeDomains),
        .init(BrokerOptions.apiListen) { c, v in
            c.apiListen = v.address; return nil
        },
        .init(BrokerOptions.apiTokens) { c, v in
            c.apiTokens += v.list; return nil
        },
        .init(BrokerOptions.apiTokenFile) { c, v in
            c.apiTokenFile = v.text; return nil
        },
        .init(BrokerOptions.apiOperatorTokens) { c, v in
            c.operatorTokens += v.list; return nil
        },
        .init(BrokerOptions.apiOperatorTokenFile) { c, v in
            c.operatorTokenFile = v.text; return nil
        },
        .init(BrokerOptions.apiConsole) { c, v in
            c.console = v.boolean; return nil
        },
        .init(BrokerOptions.apiScanBudget) { c, v in
            c.apiScanBudget = v.integer
            return nil
        },
        .init(BrokerOptions.adminListen) { c, v in
            c.adminListen = v.address; return nil
        },
        .init(BrokerOptions.maxPendingBatches) { c, v in
            c.maxPendingBatches = v.integer; return nil
        },
        .init(
            section: BrokerOptions.targets,
            flag: { c, v in
                let text = v.text
                guard let eq = text.firstIndex(of: "=") else { return OptionProblem("is not NAME=URL") }
                do throws(SCIMError) {
                    var t = targetOptionTable.defaults(
                        try TargetConfiguration(name: String(text[..<eq]), url: String(text[text.index(after: eq)...])))
                    t.routes = [try Route()]
                    c.targets.removeAll { $0.name == t.name }
                    c.targets.append(t)
                } catch { return OptionProblem(error.detail) }
                return nil
            }, BrokerConfiguration.decodeTargets),
        .init(BrokerOptions.targetToken) { c, v in
            let t = v.text
            guard let eq = t.firstIndex(of: "="), let i = c.targets.firstIndex(where: { $0.name == t[..<eq] }) else {
                return OptionProblem("is not NAME=TOKEN for a configured target")
            }
            c.targets[i].token = String(t[t.index(after: eq)...])
            return nil
        },
    ])

/// The keys of one entry of the broker's `targets` bound to
/// `TargetConfiguration`: an app's (`targetOptionTable(domain:)`), and
/// `domain`, a boundary instead of an app.
public let targetOptionTable = makeTargetOptionTable(
    domain: .init(BrokerOptions.Target.domain) { t, v in
        guard DomainBinding.validName(v.text) else {
            return OptionProblem("a domain name holds letters, digits, '.', '_' and '-' only (at most 64), got '\(v.text)'")
        }
        t.destination = v.text
        return nil
    })

extension BrokerConfiguration {
    /// Where every run starts, with a file or with flags only: the table's
    /// defaults (`BrokerOptions`).
    public static var defaults: BrokerConfiguration {
        brokerOptionTable.defaults(BrokerConfiguration(dataDirectory: "", tls: TLSConfiguration(verifyPeer: true)))
    }
}

/// The broker's YAML file, read strictly through `brokerOptionTable`:
/// every problem is reported together, each with its line and column
/// (`YAMLConfiguration.load`). The keys: `docs/configuration.md`.
extension BrokerConfiguration: YAMLConfiguration {
    /// Decodes what is valid and records a problem for everything else,
    /// going on with the next key or entry; then the checks across fields
    /// (an identity bound twice, a route to a domain not bound, a read API
    /// off loopback, placeholder tokens). The result is meaningful only
    /// when no error was recorded.
    public static func decode(_ root: YAMLNode, _ d: ConfigDiagnostics) -> BrokerConfiguration {
        var config = BrokerConfiguration.defaults
        guard var top = YAMLMapping(root, path: "", d) else { return config }
        brokerOptionTable.decode(&top, into: &config)
        top.finish()
        if !top.has("tls") && !d.truncated {
            d.error("tls", "is required: the federation listener is mutual TLS", at: top.mark, fix: "add tls: {ca, cert, key}")
        }
        for (key, tokens, fileKey) in [
            ("api.tokens", config.apiTokens, "api.tokenFile"), ("api.operatorTokens", config.operatorTokens, "api.operatorTokenFile"),
        ] where !tokens.isEmpty {
            d.warning(
                key, "a token in the configuration file goes wherever the file is copied (backups, tickets, version control)",
                at: d.mark(key), fix: "move them to a file named by \(fileKey) (mode 0640, one token per line)")
            for (i, token) in tokens.enumerated() {
                if let weak = weakTokenReason(token) { d.error("\(key)[\(i)]", "the token \(weak)", fix: tokenFix) }
            }
        }
        if config.operatorTokens.contains(where: config.apiTokens.contains) {
            d.error(
                "api.operatorTokens", "a token is both a read-API token and an operator token: every reader could act",
                at: d.mark("api.operatorTokens"), fix: "give operators tokens of their own")
        }
        if let a = config.apiListen, !a.isLoopback {
            d.error(
                "api.listen",
                "the read API has no TLS: on \(a.host), bearer tokens and the federated directory would cross the network in the clear",
                at: d.mark("api.listen"), fix: "listen on 127.0.0.1 and put a TLS-terminating proxy in front")
        }
        return config
    }

    /// `domains:`, each entry at its own line; an identity bound twice is refused.
    static func decodeDomains(_ node: YAMLNode, _ path: String, _ d: ConfigDiagnostics, _ config: inout BrokerConfiguration) {
        guard var domains = YAMLMapping(node, path: path, d) else { return }
        var bound: [String: (domain: String, line: Int)] = [:]
        for (name, mark, value) in domains.entries() {
            guard DomainBinding.validName(name) else {
                d.error(domains.full(name), "a domain name holds letters, digits, '.', '_' and '-' only (at most 64)", at: mark)
                continue
            }
            guard case .scalar(let identity, _, _) = value, !identity.isEmpty else {
                d.error(domains.full(name), "must be a certificate identity: the agents' SAN URI (or DNS SAN; never the CN)", at: mark)
                continue
            }
            if let other = bound[identity] {
                d.error(
                    domains.full(name),
                    "'\(identity)' is already bound to domain '\(other.domain)' (line \(other.line)); an agent's certificate must name one domain",
                    at: mark, fix: "give each domain the identity its own agents' certificates carry")
                continue
            }
            bound[identity] = (name, mark.line)
            config.domains.append(DomainBinding(domain: name, identity: identity))
        }
        domains.finish()
    }

    /// `targets:`, each entry through `targetOptionTable`; a name defined
    /// twice and a route to a domain not bound (a typo, most likely: it
    /// would never carry anything) are refused at their own line.
    static func decodeTargets(_ node: YAMLNode, _ path: String, _ d: ConfigDiagnostics, _ config: inout BrokerConfiguration) {
        guard case .sequence(let items, _) = node else {
            d.error(path, "must be a list ('- …' entries)", at: node.mark)
            return
        }
        var names: [String: Int] = [:]
        let known = config.domains.map(\.domain)
        for (i, item) in items.enumerated() {
            d.record("\(path)[\(i)]", item.mark)
            guard let t = decodeTarget(item, path: "\(path)[\(i)]", domains: known, d) else { continue }
            if let line = names[t.name] {
                d.error(
                    "\(path)[\(i)].name", "target '\(t.name)' is defined twice (first at line \(line))",
                    fix: "give each target its own name")
                continue
            }
            if let destination = t.destination, config.targets.contains(where: { $0.destination == destination }) {
                d.error(
                    "\(path)[\(i)].domain", "domain '\(destination)' is already the destination of another target",
                    fix: "one target per boundary: give it several routes")
                continue
            }
            names[t.name] = d.mark("\(path)[\(i)].name")?.line ?? 0
            config.targets.append(t)
        }
        for (i, item) in items.enumerated() {
            guard case .mapping(let members, _) = item, let routes = members.first(where: { $0.key == "routes" })?.value,
                case .sequence(let list, _) = routes
            else { continue }
            for (r, route) in list.enumerated() {
                guard case .mapping(let fields, _) = route, let domains = fields.first(where: { $0.key == "domains" })?.value,
                    case .sequence(let names, _) = domains
                else { continue }
                for (j, node) in names.enumerated() {
                    guard case .scalar(let name, _, let mark) = node, !known.contains(name), !known.isEmpty || d.mark("domains") == nil
                    else { continue }
                    d.error(
                        "\(path)[\(i)].routes[\(r)].domains[\(j)]",
                        "domain '\(name)' is not bound in 'domains'"
                            + (closestKey(to: name, among: known).map { "; did you mean '\($0)'?" } ?? ""),
                        at: mark, fix: "name one of " + (known.isEmpty ? "the domains under 'domains'" : known.joined(separator: ", ")))
                }
            }
        }
    }

    /// One entry of `targets:`; nil when it is unusable (its problems are
    /// recorded). `domains`: the broker's domains, for the link's
    /// source-of-record order.
    static func decodeTarget(_ node: YAMLNode, path: String, domains: [String] = [], _ d: ConfigDiagnostics) -> TargetConfiguration? {
        guard var m = YAMLMapping(node, path: path, d) else { return nil }
        // Every key is read even when the target is already unusable, so
        // that its other problems are reported in the same run.
        var target = targetOptionTable.defaults(try! TargetConfiguration(name: "unnamed", url: "http://127.0.0.1:1"))
        let problemsBefore = d.problems.count
        targetOptionTable.decode(&m, into: &target)
        let usable =
            m.has("name") && m.has("url") != m.has("domain")
            && !d.problems[problemsBefore...].contains { [m.full("name"), m.full("url"), m.full("domain")].contains($0.key) }
        if m.has("url") == m.has("domain") {
            d.error(
                m.full(m.has("url") ? "domain" : "url"),
                m.has("url")
                    ? "a target is an app (url) or a boundary (domain), not both"
                    : "is required: the app's SCIM base URL (or domain: a boundary)",
                at: m.mark, fix: m.has("url") ? "make two targets" : "add 'url: https://…/scim/v2', or 'domain: NAME' for a boundary")
        } else if let destination = target.destination, !domains.isEmpty, !domains.contains(destination) {
            d.error(
                m.full("domain"), "domain '\(destination)' is not bound in 'domains': no agent could fetch its feed",
                fix: "name one of " + domains.joined(separator: ", "))
        }
        if target.destination != nil {
            // A boundary's agent fetches and maps for itself: an app's delivery settings would silently do nothing.
            for key in [
                "tokenFile", "tls", "rate", "onRemove", "deleteGuard", "collisions", "namespace", "link", "breakerThreshold", "timeoutMs",
                "mapping",
            ]
            where m.has(key) {
                m.warning(key, "applies to apps (url), not to a boundary (domain): its agent's inbound policy maps what enters")
            }
        }
        target.decodeCollisions(&m, domains: domains)
        m.finish()
        return usable ? target : nil
    }
}

extension BrokerConfiguration {
    /// Problems with what the configuration refers to (`check-config`):
    /// files, permissions of every secret, readability by the service's
    /// user (`serviceUser`), certificates (dates, key, federation CA, CRL),
    /// the read API's tokens, and each target's token and TLS files. Each
    /// is reported at the line of the key naming the file.
    public func checkFiles(_ d: ConfigDiagnostics, configFile: String? = nil, serviceUser: ServiceUser? = nil) {
        var checks = FileChecks(serviceUser: serviceUser)
        if let configFile, serviceUser != nil { checks.file(configFile, at: "") }
        if !dataDirectory.isEmpty { checks.dataDirectory(dataDirectory) }
        if let cert = tls.certificateChainFile {
            checks.certificate(cert, key: tls.privateKeyFile, ca: tls.trustRootsFile, at: ("tls.cert", "tls.key", "tls.ca"))
        }
        if let crl = tls.crlFile { checks.revocationList(crl, ca: tls.trustRootsFile, at: "tls.crl") }
        var read = apiTokens, acting = operatorTokens
        for (file, key) in [(apiTokenFile, "api.tokenFile"), (operatorTokenFile, "api.operatorTokenFile")] {
            guard let file, checks.file(file, at: key, secret: true) else { continue }
            do throws(ConfigError) {
                let tokens = try readTokenLines(file)
                for (i, token) in tokens.enumerated() {
                    if let weak = weakTokenReason(token) { checks.problem(key, "\(file): token \(i + 1) \(weak)", fix: tokenFix) }
                }
                if key == "api.tokenFile" { read += tokens } else { acting += tokens }
            } catch { checks.problem(key, error.message, fix: "write one token per line") }
        }
        // Both in the file itself: `decode` reported it.
        if acting.contains(where: { read.contains($0) && !(operatorTokens.contains($0) && apiTokens.contains($0)) }) {
            checks.problem(
                operatorTokenFile != nil ? "api.operatorTokenFile" : "api.operatorTokens",
                "a token is both a read-API token and an operator token: every reader could act", fix: "give operators tokens of their own")
        }
        if apiListen != nil && apiTokens.isEmpty && apiTokenFile == nil {
            checks.problem("api.listen", "the read API needs a bearer token", fix: "set api.tokenFile")
        }
        for (i, t) in targets.enumerated() { t.checkFiles(&checks, at: "targets[\(i)]") }
        for p in checks.problems { d.error(p.key.isEmpty ? nil : p.key, p.message, fix: p.fix) }
    }
}
