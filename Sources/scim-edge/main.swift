import ArgumentParser
import EdgeAgent
import EdgeLoop
import EdgeTLS
import Glibc

let version = "0.1.0"

struct ScimEdge: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "scim-edge",
        abstract: "Federated SCIM 2.0 provisioning: the agent inside a compliance boundary.",
        version: version,
        subcommands: [Serve.self])
}

struct Serve: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Run the agent: a SCIM 2.0 service provider at http://HOST:PORT/scim/v2.")

    @Option(help: "Directory of the agent's LMDB file (created if missing).")
    var dataDir: String

    @Option(help: "Address of the SCIM listener, HOST:PORT (port 0 picks a free port).")
    var listen = "127.0.0.1:8080"

    @Option(help: "A bearer token accepted by the SCIM endpoint (repeatable).")
    var token: [String] = []

    @Option(help: "File with bearer tokens, one per line; re-read on SIGHUP.")
    var tokenFile: String?

    @Option(help: "Serve TLS with this certificate chain (PEM) ...")
    var tlsCert: String?

    @Option(help: "... and this private key (PEM).")
    var tlsKey: String?

    @Option(help: "Largest request body in bytes.")
    var maxBodyBytes = 1 << 20

    @Option(help: "YAML configuration file (not read by this version yet).")
    var config: String?

    func run() throws {
        if let config {
            throw ValidationError("--config \(config): YAML configuration is not supported by this version yet; use the flags")
        }
        guard let address = SocketAddress(listen) else { throw ValidationError("--listen \(listen) is not HOST:PORT") }
        var configuration = AgentConfiguration(dataDirectory: dataDir, listen: address)
        configuration.tokens = token
        configuration.tokenFile = tokenFile
        configuration.limits.maxBodyBytes = maxBodyBytes
        switch (tlsCert, tlsKey) {
        case let (cert?, key?):
            configuration.tls = TLSConfiguration(certificateChainFile: cert, privateKeyFile: key, verifyPeer: false)
        case (nil, nil): break
        default: throw ValidationError("--tls-cert and --tls-key go together")
        }
        let loop = try EventLoop()
        let agent: AgentService
        do {
            agent = try AgentService(loop: loop, configuration: configuration)
            agent.log = { line in emit(line) }
            try agent.installSignals()
        } catch {
            _ = loop.close()
            throw error
        }
        emit("scim-edge \(version) listening on \(agent.server.address) (SCIM at \(configuration.tls == nil ? "http" : "https")://\(agent.server.address)/scim/v2)")
        loop.run()
        let left = loop.close()
        if left != 0 { emit("warning: \(left) handles were still open at exit") }
    }
}

/// One line to standard output, unbuffered.
func emit(_ line: String) {
    let bytes = Array((line + "\n").utf8)
    _ = bytes.withUnsafeBytes { write(1, $0.baseAddress, $0.count) }
}

ScimEdge.main()
