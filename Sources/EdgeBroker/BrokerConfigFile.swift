import EdgeConfig
import EdgeHTTP
import EdgeLoop
import EdgeTLS
import SCIM

extension BrokerConfiguration {
    /// Reads the broker's YAML configuration strictly (see
    /// `packaging/broker.example.yaml`); errors name their line and column.
    public static func load(file path: String) throws(ConfigError) -> BrokerConfiguration {
        try loadYAMLFile(path, decode)
    }

    public static func decode(_ root: YAMLNode) throws(ConfigError) -> BrokerConfiguration {
        var top = try YAMLMapping(root, path: "")
        guard let dataDir = try top.string("dataDir") else { throw ConfigError("'dataDir' is required", at: root.mark) }
        let listenText = try top.string("listen") ?? "127.0.0.1:8443"
        guard let listen = SocketAddress(listenText) else { throw ConfigError("'listen' must be HOST:PORT", at: top.node("listen")?.mark) }
        guard var tls = try top.mapping("tls") else { throw ConfigError("'tls' (ca, cert, key) is required", at: root.mark) }
        guard let ca = try tls.string("ca"), let cert = try tls.string("cert"), let key = try tls.string("key") else {
            throw ConfigError("'tls' needs ca, cert and key", at: tls.mark)
        }
        let crl = try tls.string("crl")
        try tls.finish()
        var config = BrokerConfiguration(dataDirectory: dataDir, listen: listen, tls: TLSConfiguration(
            certificateChainFile: cert, privateKeyFile: key, trustRootsFile: ca, crlFile: crl, verifyPeer: true))
        guard var domains = try top.mapping("domains") else {
            throw ConfigError("'domains' (NAME: certificate identity) is required", at: root.mark)
        }
        for (name, mark, value) in domains.entries() {
            guard case .scalar(let identity, _, _) = value, !identity.isEmpty else {
                throw ConfigError("'domains.\(name)' must be a certificate identity (SAN URI, DNS name or CN)", at: mark)
            }
            config.domains.append(DomainBinding(domain: name, identity: identity))
        }
        try domains.finish()
        if var api = try top.mapping("api") {
            if let l = try api.string("listen") {
                guard let a = SocketAddress(l) else { throw ConfigError("'api.listen' must be HOST:PORT", at: api.node("listen")?.mark) }
                config.apiListen = a
            }
            config.apiTokens = try api.strings("tokens") ?? []
            try api.finish()
        }
        if var admin = try top.mapping("admin") {
            if let l = try admin.string("listen"), l != "none" {
                guard let a = SocketAddress(l) else { throw ConfigError("'admin.listen' must be HOST:PORT or none", at: admin.node("listen")?.mark) }
                config.adminListen = a
            }
            try admin.finish()
        }
        if let v = try top.int("maxPendingBatches") { config.maxPendingBatches = max(0, v) }
        if let node = top.node("targets") {
            guard case .sequence(let items, _) = node else { throw ConfigError("'targets' must be a list", at: node.mark) }
            for item in items {
                let t = try decodeTarget(item, domains: config.domains.map(\.domain))
                if config.targets.contains(where: { $0.name == t.name }) {
                    throw ConfigError("target '\(t.name)' is defined twice", at: item.mark)
                }
                config.targets.append(t)
            }
        }
        try top.finish()
        return config
    }

    /// One entry of `targets:` (see `packaging/broker.example.yaml`).
    /// `domains`: the broker's domains, for the link's source-of-record order.
    static func decodeTarget(_ node: YAMLNode, domains: [String] = []) throws(ConfigError) -> TargetConfiguration {
        var m = try YAMLMapping(node, path: "targets[]")
        guard let name = try m.string("name"), let url = try m.string("url") else {
            throw ConfigError("a target needs 'name' and 'url'", at: node.mark)
        }
        var t: TargetConfiguration
        do throws(SCIMError) { t = try TargetConfiguration(name: name, url: url) } catch {
            throw ConfigError(error.detail, at: m.node("url")?.mark)
        }
        t.tokenFile = try m.string("tokenFile")
        if var tls = try m.mapping("tls") {
            t.tls.trustRootsFile = try tls.string("ca")
            t.tls.certificateChainFile = try tls.string("cert")
            t.tls.privateKeyFile = try tls.string("key")
            if (t.tls.certificateChainFile == nil) != (t.tls.privateKeyFile == nil) {
                throw ConfigError("'tls' needs both cert and key for a client certificate", at: tls.mark)
            }
            t.tls.minimumVersion = (try tls.string("minVersion")) == "1.3" ? .tls13 : .tls12
            try tls.finish()
        }
        if var rate = try m.mapping("rate") {
            if let r = try rate.int("requestsPerSecond") {
                guard r > 0 else { throw ConfigError("'rate.requestsPerSecond' must be positive", at: rate.node("requestsPerSecond")?.mark) }
                t.requestsPerSecond = Double(r)
            }
            if let c = try rate.int("concurrency") {
                guard (1...256).contains(c) else { throw ConfigError("'rate.concurrency' must be 1 to 256", at: rate.node("concurrency")?.mark) }
                t.concurrency = c
            }
            try rate.finish()
        }
        if let r = try m.string("onRemove") {
            guard let mode = RemovalMode(rawValue: r) else {
                throw ConfigError("'onRemove' must be delete or deactivate", at: m.node("onRemove")?.mark)
            }
            t.removal = mode
        }
        if var g = try m.mapping("deleteGuard") {
            if let n = try g.int("maxDeletes") { t.deletionGuard.maxDeletes = max(0, n) }
            if let w = try g.int("windowSeconds") { t.deletionGuard.windowSeconds = max(1, w) }
            try g.finish()
        }
        if let c = try m.string("collisions") {
            switch c {
            case "refuse": t.collisions = .refuse
            case "namespace":
                var userName = CollisionPolicy.defaultUserNameTemplate, displayName = CollisionPolicy.defaultDisplayNameTemplate
                if var n = try m.mapping("namespace") {
                    for (key, placeholder) in [("userName", "{userName}"), ("displayName", "{displayName}")] {
                        guard let template = try n.string(key) else { continue }
                        guard template.contains(placeholder), template.contains("{domain}") else {
                            throw ConfigError("'namespace.\(key)' must hold \(placeholder) and {domain}, so that names stay unique per domain",
                                              at: n.node(key)?.mark)
                        }
                        if key == "userName" { userName = template } else { displayName = template }
                    }
                    try n.finish()
                }
                t.collisions = .namespace(userName: userName, displayName: displayName)
            case "link":
                guard var l = try m.mapping("link") else {
                    throw ConfigError("'collisions: link' needs 'link: {attribute: …, sourceOfRecord: [domains]}'", at: m.node("collisions")?.mark)
                }
                guard let attribute = try l.string("attribute") else {
                    throw ConfigError("'link.attribute' (the attribute that says two users are one person) is required", at: l.mark)
                }
                guard let order = try l.strings("sourceOfRecord"), !order.isEmpty else {
                    throw ConfigError("'link.sourceOfRecord' (domains, the first one's data wins) must list at least one domain",
                                      at: l.node("sourceOfRecord")?.mark ?? l.mark)
                }
                if let unknown = order.first(where: { d in !domains.isEmpty && !domains.contains(d) }) {
                    throw ConfigError("'link.sourceOfRecord' names '\(unknown)', which is not one of the broker's domains (\(domains.joined(separator: ", ")))",
                                      at: l.node("sourceOfRecord")?.mark)
                }
                if let twice = order.enumerated().first(where: { order[..<$0.offset].contains($0.element) })?.element {
                    throw ConfigError("'link.sourceOfRecord' names '\(twice)' twice", at: l.node("sourceOfRecord")?.mark)
                }
                do throws(SCIMError) { t.collisions = .link(try LinkPolicy(attribute: attribute, sourceOfRecord: order)) } catch {
                    throw ConfigError(error.detail, at: l.node("attribute")?.mark)
                }
                try l.finish()
            default:
                throw ConfigError("'collisions' must be refuse, namespace or link", at: m.node("collisions")?.mark)
            }
        }
        if m.node("namespace") != nil, t.collisions == .refuse || t.collisions.linkPolicy != nil {
            throw ConfigError("'namespace' applies only with 'collisions: namespace'", at: m.node("namespace")?.mark)
        }
        if m.node("link") != nil, t.collisions.linkPolicy == nil {
            throw ConfigError("'link' applies only with 'collisions: link'", at: m.node("link")?.mark)
        }
        if let n = try m.int("breakerThreshold") { t.breakerThreshold = max(1, n) }
        if let n = try m.int("timeoutMs") { t.requestTimeoutMilliseconds = UInt64(max(100, n)) }
        if var mapping = try m.mapping("mapping") {
            if var rename = try mapping.mapping("rename") {
                for (from, mark, value) in rename.entries() {
                    guard case .scalar(let to, _, _) = value, !to.isEmpty else {
                        throw ConfigError("'mapping.rename.\(from)' must name an attribute", at: mark)
                    }
                    t.mapping.rename.append((from, to))
                }
                try rename.finish()
            }
            t.mapping.drop = try mapping.strings("drop") ?? []
            if var constant = try mapping.mapping("constant") {
                for (path, mark, value) in constant.entries() {
                    guard case .scalar(let text, let plain, _) = value else {
                        throw ConfigError("'mapping.constant.\(path)' must be a scalar", at: mark)
                    }
                    let json: JSON
                    if plain && (text == "true" || text == "false") { json = .bool(text == "true") }
                    else if plain, let n = JSONNumber(text) { json = .number(n) }
                    else { json = .string(text) }
                    t.mapping.constant.append((path, json))
                }
                try constant.finish()
            }
            try mapping.finish()
        }
        guard let routes = m.node("routes") else {
            throw ConfigError("target '\(name)' needs 'routes' (which domains and resources flow to it)", at: node.mark)
        }
        guard case .sequence(let items, _) = routes else { throw ConfigError("'routes' must be a list", at: routes.mark) }
        for item in items {
            var r = try YAMLMapping(item, path: "routes[]")
            let domains = try r.strings("domains") ?? [], types = try r.strings("types") ?? [], filter = try r.string("filter")
            do throws(SCIMError) {
                t.routes.append(try Route(domains: domains, types: types, filter: filter))
            } catch {
                throw ConfigError("target '\(name)': \(error.detail)", at: item.mark)
            }
            try r.finish()
        }
        try m.finish()
        return t
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
    /// files, permissions of secrets, certificates (dates, key, federation
    /// CA, CRL), and each target's token and TLS files.
    public func fileProblems() -> [String] {
        var checks = FileChecks()
        checks.dataDirectory(dataDirectory)
        if let cert = tls.certificateChainFile {
            checks.certificate(cert, key: tls.privateKeyFile, ca: tls.trustRootsFile, "tls")
        }
        if let crl = tls.crlFile, checks.file(crl, "tls.crl"), let ca = tls.trustRootsFile {
            do { _ = try TLSContext(role: .server, configuration: TLSConfiguration(trustRootsFile: ca, crlFile: crl)) }
            catch { checks.problem("tls.crl \(crl): \(error)") }
        }
        for d in domains where d.identity.isEmpty { checks.problem("domain \(d.domain): no certificate identity") }
        for t in targets {
            if let file = t.tokenFile, checks.file(file, "target \(t.name) tokenFile", secret: true) {
                do { _ = try t.resolveToken() } catch { checks.problem(error.description) }
            }
            if t.token == nil && t.tokenFile == nil && t.tls.certificateChainFile == nil {
                checks.problem("target \(t.name): no tokenFile and no client certificate: the app would be called without credentials")
            }
            if let ca = t.tls.trustRootsFile { checks.file(ca, "target \(t.name) tls.ca") }
            if let cert = t.tls.certificateChainFile { checks.certificate(cert, key: t.tls.privateKeyFile, ca: nil, "target \(t.name) tls") }
        }
        return checks.problems
    }
}
