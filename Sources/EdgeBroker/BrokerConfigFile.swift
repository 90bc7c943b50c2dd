import EdgeConfig
import EdgeHTTP
import EdgeLoop
import EdgeTLS

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
        try top.finish()
        return config
    }
}
