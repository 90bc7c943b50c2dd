import EdgeConfig
import EdgeHTTP
import EdgeLoop
import EdgeTLS
import SCIM

/// The broker's YAML file, read strictly (see `packaging/broker.example.yaml`):
/// every problem is reported together, each with its line and column
/// (`YAMLConfiguration.load`).
extension BrokerConfiguration: YAMLConfiguration {
    /// Decodes what is valid and records a problem for everything else,
    /// going on with the next key or entry; then the checks across fields
    /// (an identity bound twice, a route to a domain not bound, a read API
    /// off loopback, placeholder tokens). The result is meaningful only
    /// when no error was recorded.
    public static func decode(_ root: YAMLNode, _ d: ConfigDiagnostics) -> BrokerConfiguration {
        var config = BrokerConfiguration(dataDirectory: "", tls: TLSConfiguration(verifyPeer: true))
        guard var top = YAMLMapping(root, path: "", d) else { return config }
        config.dataDirectory = top.required("dataDir", "the directory of the broker's LMDB file") ?? ""
        if let text = top.string("listen") {
            if let a = SocketAddress(text) { config.listen = a } else { top.problem("listen", "must be HOST:PORT, got '\(text)'") }
        }
        if var tls = top.mapping("tls") {
            config.tls.trustRootsFile = tls.required("ca", "the federation CA agents' certificates chain to")
            config.tls.certificateChainFile = tls.required("cert", "the broker's certificate")
            config.tls.privateKeyFile = tls.required("key", "the broker's private key")
            config.tls.crlFile = tls.string("crl")
            tls.finish()
        } else if !top.has("tls") && !d.truncated {
            d.error("tls", "is required: the federation listener is mutual TLS", at: top.mark, fix: "add tls: {ca, cert, key}")
        }
        if var domains = top.mapping("domains") {
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
        } else if !top.has("domains") && !d.truncated {
            d.error(
                "domains", "is required: NAME: certificate identity of its agents", at: top.mark,
                fix: "add domains: {acme-de: spiffe://acme.example/acme-de/agent-1}")
        }
        if var api = top.mapping("api") {
            if let l = api.string("listen") {
                if let a = SocketAddress(l) { config.apiListen = a } else { api.problem("listen", "must be HOST:PORT, got '\(l)'") }
            }
            if let tokens = api.strings("tokens") {
                config.apiTokens = tokens
                api.warning(
                    "tokens", "a token in the configuration file goes wherever the file is copied (backups, tickets, version control)",
                    fix: "move them to a file named by api.tokenFile (mode 0640, one token per line)")
                for (i, token) in tokens.enumerated() {
                    if let weak = weakTokenReason(token) { d.error("\(api.full("tokens"))[\(i)]", "the token \(weak)", fix: tokenFix) }
                }
            }
            config.apiTokenFile = api.string("tokenFile")
            if let a = config.apiListen, !a.isLoopback {
                api.problem(
                    "listen",
                    "the read API has no TLS: on \(a.host), bearer tokens and the federated directory would cross the network in the clear",
                    fix: "listen on 127.0.0.1 and put a TLS-terminating proxy in front")
            }
            api.finish()
        }
        if var admin = top.mapping("admin") {
            if let listener = admin.operationsListener() { config.adminListen = listener }
            admin.finish()
        }
        if let v = top.int("maxPendingBatches") { config.maxPendingBatches = max(0, v) }
        if let items = top.sequence("targets") {
            var names: [String: Int] = [:]
            for (i, item) in items.enumerated() {
                guard let t = decodeTarget(item, path: "targets[\(i)]", domains: config.domains.map(\.domain), d) else { continue }
                if let line = names[t.name] {
                    d.error(
                        "targets[\(i)].name", "target '\(t.name)' is defined twice (first at line \(line))",
                        fix: "give each target its own name")
                    continue
                }
                names[t.name] = d.mark("targets[\(i)].name")?.line ?? 0
                config.targets.append(t)
            }
            // A route naming a domain not bound would never carry anything: a typo, most likely.
            let known = config.domains.map(\.domain)
            for (i, item) in items.enumerated() {
                guard case .mapping(let members, _) = item, let routes = members.first(where: { $0.key == "routes" })?.value,
                    case .sequence(let list, _) = routes
                else { continue }
                for (r, route) in list.enumerated() {
                    guard case .mapping(let fields, _) = route, let domains = fields.first(where: { $0.key == "domains" })?.value,
                        case .sequence(let names, _) = domains
                    else { continue }
                    for (j, node) in names.enumerated() {
                        guard case .scalar(let name, _, let mark) = node, !known.contains(name), !known.isEmpty || !top.has("domains")
                        else { continue }
                        d.error(
                            "targets[\(i)].routes[\(r)].domains[\(j)]",
                            "domain '\(name)' is not bound in 'domains'"
                                + (closestKey(to: name, among: known).map { "; did you mean '\($0)'?" } ?? ""), at: mark,
                            fix: "name one of " + (known.isEmpty ? "the domains under 'domains'" : known.joined(separator: ", ")))
                    }
                }
            }
        }
        top.finish()
        return config
    }

    /// One entry of `targets:` (see `packaging/broker.example.yaml`); nil
    /// when it is unusable (its problems are recorded). `domains`: the
    /// broker's domains, for the link's source-of-record order.
    static func decodeTarget(_ node: YAMLNode, path: String, domains: [String] = [], _ d: ConfigDiagnostics) -> TargetConfiguration? {
        guard var m = YAMLMapping(node, path: path, d) else { return nil }
        let name = m.required("name"), url = m.required("url", "the app's SCIM base URL")
        var t: TargetConfiguration?
        if let name, let url {
            do throws(SCIMError) { t = try TargetConfiguration(name: name, url: url) } catch {
                m.problem(error.detail.hasPrefix("target name") ? "name" : "url", error.detail)
            }
        }
        // Every key is read even when the target is already unusable, so
        // that its other problems are reported in the same run.
        var target = t ?? (try! TargetConfiguration(name: "unnamed", url: "http://127.0.0.1:1"))
        target.tokenFile = m.string("tokenFile")
        if var tls = m.mapping("tls") {
            target.tls.trustRootsFile = tls.string("ca")
            target.tls.certificateChainFile = tls.string("cert")
            target.tls.privateKeyFile = tls.string("key")
            if (target.tls.certificateChainFile == nil) != (target.tls.privateKeyFile == nil) {
                d.error(tls.path, "needs both cert and key for a client certificate", at: tls.mark)
            }
            if let v = tls.string("minVersion") {
                if v == "1.3" {
                    target.tls.minimumVersion = .tls13
                } else if v == "1.2" {
                    target.tls.minimumVersion = .tls12
                } else {
                    tls.problem("minVersion", "must be 1.2 or 1.3, got '\(v)'")
                }
            }
            tls.finish()
        }
        if var rate = m.mapping("rate") {
            if let r = rate.int("requestsPerSecond") {
                if r > 0 { target.requestsPerSecond = Double(r) } else { rate.problem("requestsPerSecond", "must be positive") }
            }
            if let c = rate.int("concurrency") {
                if (1...256).contains(c) { target.concurrency = c } else { rate.problem("concurrency", "must be 1 to 256, got \(c)") }
            }
            rate.finish()
        }
        if let r = m.string("onRemove") {
            if let mode = RemovalMode(rawValue: r) {
                target.removal = mode
            } else {
                m.problem("onRemove", "must be delete or deactivate, got '\(r)'")
            }
        }
        if var g = m.mapping("deleteGuard") {
            if let n = g.int("maxDeletes") { target.deletionGuard.maxDeletes = max(0, n) }
            if let w = g.int("windowSeconds") { target.deletionGuard.windowSeconds = max(1, w) }
            g.finish()
        }
        let namespace = m.mapping("namespace"), link = m.mapping("link"), collisions = m.string("collisions")
        if let c = collisions {
            switch c {
            case "refuse": target.collisions = .refuse
            case "namespace":
                var userName = CollisionPolicy.defaultUserNameTemplate, displayName = CollisionPolicy.defaultDisplayNameTemplate
                if var n = namespace {
                    for (key, placeholder) in [("userName", "{userName}"), ("displayName", "{displayName}")] {
                        guard let template = n.string(key) else { continue }
                        guard template.contains(placeholder), template.contains("{domain}") else {
                            n.problem(key, "must hold \(placeholder) and {domain}, so that names stay unique per domain")
                            continue
                        }
                        if key == "userName" { userName = template } else { displayName = template }
                    }
                    n.finish()
                }
                target.collisions = .namespace(userName: userName, displayName: displayName)
            case "link":
                guard var l = link else {
                    m.problem(
                        "collisions", "'collisions: link' needs 'link: {attribute: …, sourceOfRecord: [domains]}'",
                        fix: "add link: {attribute: employeeNumber, sourceOfRecord: [your domains, first one's data wins]}")
                    break
                }
                let attribute = l.required("attribute", "the attribute that says two users are one person")
                let order = l.strings("sourceOfRecord")
                var usable = attribute != nil && order != nil
                if let order {
                    if order.isEmpty {
                        l.problem("sourceOfRecord", "must list at least one domain (the first one's data wins)")
                        usable = false
                    } else if let unknown = order.first(where: { !domains.isEmpty && !domains.contains($0) }) {
                        l.problem(
                            "sourceOfRecord",
                            "names '\(unknown)', which is not one of the broker's domains (\(domains.joined(separator: ", ")))")
                        usable = false
                    } else if let twice = order.enumerated().first(where: { order[..<$0.offset].contains($0.element) })?.element {
                        l.problem("sourceOfRecord", "names '\(twice)' twice")
                        usable = false
                    }
                } else if !l.has("sourceOfRecord") {
                    l.problem("sourceOfRecord", "is required: the domains in order of precedence (the first one's data wins)")
                }
                if usable, let attribute, let order {
                    do throws(SCIMError) { target.collisions = .link(try LinkPolicy(attribute: attribute, sourceOfRecord: order)) } catch {
                        l.problem("attribute", error.detail)
                    }
                }
                l.finish()
            default:
                m.problem("collisions", "must be refuse, namespace or link, got '\(c)'")
            }
        }
        // Not when 'collisions' is itself wrong: that is the one problem to report.
        if namespace != nil, collisions == nil || collisions == "refuse" || collisions == "link" {
            m.problem("namespace", "applies only with 'collisions: namespace'", fix: "add collisions: namespace, or remove it")
        }
        if link != nil, collisions == nil || collisions == "refuse" || collisions == "namespace" {
            m.problem("link", "applies only with 'collisions: link'", fix: "add collisions: link, or remove it")
        }
        if let n = m.int("maxMembersPerPatch") {
            if (1...10_000).contains(n) {
                target.maxMembersPerPatch = n
            } else {
                m.problem("maxMembersPerPatch", "must be 1 to 10,000, got \(n)")
            }
        }
        if let n = m.int("breakerThreshold") { target.breakerThreshold = max(1, n) }
        if let n = m.int("timeoutMs") { target.requestTimeoutMilliseconds = UInt64(max(100, n)) }
        if var mapping = m.mapping("mapping") {
            if var rename = mapping.mapping("rename") {
                for (from, mark, value) in rename.entries() {
                    guard case .scalar(let to, _, _) = value, !to.isEmpty else {
                        d.error(rename.full(from), "must name an attribute", at: mark)
                        continue
                    }
                    target.mapping.rename.append((from, to))
                }
                rename.finish()
            }
            target.mapping.drop = mapping.strings("drop") ?? []
            if var constant = mapping.mapping("constant") {
                for (path, mark, value) in constant.entries() {
                    guard case .scalar(let text, let plain, _) = value else {
                        d.error(constant.full(path), "must be a scalar", at: mark)
                        continue
                    }
                    let json: JSON
                    if plain && (text == "true" || text == "false") {
                        json = .bool(text == "true")
                    } else if plain, let n = JSONNumber(text) {
                        json = .number(n)
                    } else {
                        json = .string(text)
                    }
                    target.mapping.constant.append((path, json))
                }
                constant.finish()
            }
            mapping.finish()
        }
        if let routes = m.sequence("routes") {
            for (i, item) in routes.enumerated() {
                guard var r = YAMLMapping(item, path: "\(m.full("routes"))[\(i)]", d) else { continue }
                let domains = r.strings("domains") ?? [], filter = r.string("filter")
                var types = r.strings("types") ?? []
                for (j, type) in types.enumerated() where type != "User" && type != "Group" {
                    d.error("\(r.full("types"))[\(j)]", "route type '\(type)' must be User or Group")
                }
                types = types.filter { $0 == "User" || $0 == "Group" }
                do throws(SCIMError) {
                    target.routes.append(try Route(domains: domains, types: types, filter: filter))
                } catch {
                    // What Route refuses, with the types already checked above, is the filter.
                    r.problem("filter", "target '\(name ?? "?")': \(error.detail)")
                }
                r.finish()
            }
        } else if !m.has("routes") && !d.truncated {
            d.error(
                m.full("routes"), "target '\(name ?? "?")' needs 'routes' (which domains and resources flow to it)", at: m.mark,
                fix: "add routes: [{}] for every domain's users and groups")
        }
        m.finish()
        return t == nil ? nil : target
    }
}

extension TargetConfiguration {
    /// The bearer token: `--target-token`, or the first line of `tokenFile`
    /// (read at start and on SIGHUP, so that it can rotate).
    public func resolveToken() throws(ConfigError) -> String? {
        if let token { return token }
        guard let tokenFile else { return nil }
        let text = String(decoding: try readFileBytes(tokenFile), as: UTF8.self)
        let token = text.split(whereSeparator: \.isNewline).first.map { String($0).trimmingSpaces } ?? ""
        guard !token.isEmpty else { throw ConfigError("target '\(name)': \(tokenFile) holds no token", at: nil, file: tokenFile) }
        return token
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
        if let crl = tls.crlFile, checks.file(crl, at: "tls.crl"), let ca = tls.trustRootsFile {
            do { _ = try TLSContext(role: .server, configuration: TLSConfiguration(trustRootsFile: ca, crlFile: crl)) } catch {
                checks.problem("tls.crl", "\(crl): \(error)", fix: "give the CRL the federation CA issued (PEM)")
            }
        }
        if let apiTokenFile, checks.file(apiTokenFile, at: "api.tokenFile", secret: true) {
            do throws(ConfigError) {
                for (i, token) in try readTokenLines(apiTokenFile).enumerated() {
                    if let weak = weakTokenReason(token) {
                        checks.problem("api.tokenFile", "\(apiTokenFile): token \(i + 1) \(weak)", fix: tokenFix)
                    }
                }
            } catch { checks.problem("api.tokenFile", error.message, fix: "write one token per line") }
        }
        if apiListen != nil && apiTokens.isEmpty && apiTokenFile == nil {
            checks.problem("api.listen", "the read API needs a bearer token", fix: "set api.tokenFile")
        }
        for (i, t) in targets.enumerated() {
            if let file = t.tokenFile, checks.file(file, at: "targets[\(i)].tokenFile", secret: true) {
                do { _ = try t.resolveToken() } catch {
                    checks.problem("targets[\(i)].tokenFile", error.message, fix: "write the app's token on the first line")
                }
            }
            if t.token == nil && t.tokenFile == nil && t.tls.certificateChainFile == nil {
                checks.problem(
                    "targets[\(i)]",
                    "target \(t.name): no tokenFile and no client certificate: the app would be called without credentials",
                    fix: "set tokenFile, or tls: {cert, key}")
            }
            if let ca = t.tls.trustRootsFile { checks.file(ca, at: "targets[\(i)].tls.ca") }
            if let cert = t.tls.certificateChainFile {
                checks.certificate(
                    cert, key: t.tls.privateKeyFile, ca: nil,
                    at: ("targets[\(i)].tls.cert", "targets[\(i)].tls.key", "targets[\(i)].tls.ca"))
            }
        }
        for p in checks.problems { d.error(p.key.isEmpty ? nil : p.key, p.message, fix: p.fix) }
    }
}
