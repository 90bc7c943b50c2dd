import ArgumentParser
import EdgeAgent
import EdgeBroker
import EdgeLoop
import EdgeTLS
import Glibc
import Logging

struct ScimBroker: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "scim-broker",
        abstract: "Federated SCIM 2.0 provisioning: the central broker agents relay to.",
        version: "0.1.0",
        subcommands: [Serve.self, CheckConfig.self, Status.self])
}

struct Serve: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Run the federation listener (POST /federation/v1/events over mutual TLS).")

    @Option(help: "YAML configuration file (packaging/broker.example.yaml); flags override it.") var config: String?
    @Option(help: "Directory of the broker's LMDB file.") var dataDir: String?
    @Option(help: "Federation listener, HOST:PORT (default 127.0.0.1:8443).") var listen: String?
    @Option(help: "The federation CA (PEM): agents' certificates must chain to it.") var ca: String?
    @Option(help: "The broker's certificate chain (PEM).") var cert: String?
    @Option(help: "The broker's private key (PEM).") var key: String?
    @Option(help: "Certificate revocation list of the federation CA (PEM).") var crl: String?
    @Option(help: "NAME=CERT-IDENTITY: agents whose certificate carries this identity (SAN URI, DNS name or CN) write into domain NAME (repeatable).")
    var domain: [String] = []
    @Option(help: "SCIM read API over the federated directory at http://HOST:PORT/scim/v2 (keep it on loopback or behind TLS).")
    var apiListen: String?
    @Option(help: "A bearer token for the read API (repeatable).")
    var apiToken: [String] = []
    @Option(help: "Operations listener for /healthz, /readyz and /metrics (HOST:PORT, or 'none'; default 127.0.0.1:9190).")
    var adminListen: String?
    @Option(help: "Backpressure: agents get 503 + Retry-After while this many batches wait to be applied (default 256).")
    var maxPendingBatches: Int?

    func run() throws {
        var config: BrokerConfiguration
        if let file = self.config {
            config = try BrokerConfiguration.load(file: file)
        } else {
            guard let dataDir, let ca, let cert, let key else { throw ValidationError("give --config FILE, or --data-dir, --ca, --cert and --key") }
            config = BrokerConfiguration(dataDirectory: dataDir, listen: SocketAddress(host: "127.0.0.1", port: 8443), tls: TLSConfiguration(
                certificateChainFile: cert, privateKeyFile: key, trustRootsFile: ca, crlFile: crl, verifyPeer: true))
            config.adminListen = SocketAddress(host: "127.0.0.1", port: 9190)
        }
        if let dataDir { config.dataDirectory = dataDir }
        if let listen {
            guard let address = SocketAddress(listen) else { throw ValidationError("--listen \(listen) is not HOST:PORT") }
            config.listen = address
        }
        if self.config != nil {
            if let ca { config.tls.trustRootsFile = ca }
            if let cert { config.tls.certificateChainFile = cert }
            if let key { config.tls.privateKeyFile = key }
            if let crl { config.tls.crlFile = crl }
        }
        for d in domain {
            guard let b = DomainBinding(d) else { throw ValidationError("--domain \(d) is not NAME=CERT-IDENTITY") }
            config.domains.append(b)
        }
        if let maxPendingBatches { config.maxPendingBatches = maxPendingBatches }
        if let adminListen {
            if adminListen == "none" { config.adminListen = nil } else {
                guard let a = SocketAddress(adminListen) else { throw ValidationError("--admin-listen \(adminListen) is not HOST:PORT") }
                config.adminListen = a
            }
        }
        if let apiListen {
            guard let a = SocketAddress(apiListen) else { throw ValidationError("--api-listen \(apiListen) is not HOST:PORT") }
            config.apiListen = a
        }
        config.apiTokens += apiToken
        LoggingSystem.bootstrap { label in JSONLogHandler(label: label) }
        let loop = try EventLoop()
        let broker: BrokerService
        do {
            broker = try BrokerService(loop: loop, configuration: config)
            try broker.installSignals()
        } catch {
            _ = loop.close()
            throw error
        }
        emitLine("scim-broker 0.1.0 listening on \(broker.server.address) (federation over mutual TLS)")
        if let api = broker.apiServer { emitLine("read API at http://\(api.address)/scim/v2") }
        if let admin = broker.adminServer { emitLine("operations at http://\(admin.address)/metrics") }
        loop.run()
        _ = loop.close()
    }
}

struct CheckConfig: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "check-config", abstract: "Validate a configuration file.")
    @Argument(help: "The YAML file.") var file = "/etc/scim-broker/broker.yaml"
    func run() throws {
        let config = try BrokerConfiguration.load(file: file)
        emitLine("\(file): ok (\(config.domains.count) domains, federation on \(config.listen))")
    }
}

struct Status: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Per domain and agent: the applied sequence; resources per domain.")
    @Option(help: "Directory of the broker's LMDB file.") var dataDir: String

    func run() throws {
        let store = try BrokerStore(path: dataDir)
        for (agent, seq) in try store.agentSequences() {
            let domain = String(agent.split(separator: "/", maxSplits: 1).first ?? "")
            emitLine("\(agent)\tapplied through \(seq)\t\(try store.resources(domain: domain).count) resources in \(domain)")
        }
    }
}

func emitLine(_ line: String) {
    let bytes = Array((line + "\n").utf8)
    _ = bytes.withUnsafeBytes { write(1, $0.baseAddress, $0.count) }
}

ScimBroker.main()
