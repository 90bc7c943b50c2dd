import ArgumentParser
import EdgeAgent
import EdgeConfig
import EdgeDelivery
import EdgeHTTP
import EdgeLog
import EdgeLoop
import EdgeTLS
import EdgeTools
import Glibc
import Logging
import SCIM

extension Optional where Wrapped == String {
    /// The value given, as a list of zero or one.
    var list: [String] { map { [$0] } ?? [] }
}

let version = scimEdgeVersion

struct ScimEdge: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "scim-edge",
        abstract: "Federated SCIM 2.0 provisioning: the agent inside a compliance boundary.",
        version: version,
        subcommands: [
            Serve.self, CheckConfig.self, Status.self, Sources.self, Outbox.self, DeadLetter.self, Targets.self, Resources.self,
            Policy.self,
            PKI.self,
            BenchCommand.self, SandboxCommand.self, Reference.self,
        ])
}

/// `--help` of an option, from its one declaration.
func help(_ spec: OptionSpec) -> ArgumentHelp { ArgumentHelp(spec.flagHelp, valueName: spec.valueName) }
/// Its flag's name, from the same declaration.
func flag(_ spec: OptionSpec) -> NameSpecification { .customLong(spec.flag!) }

struct Serve: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Run the agent: a SCIM 2.0 service provider at http://HOST:PORT/scim/v2.",
        discussion:
            "Settings come from --config (YAML: see scim-edge.yaml(5), docs/configuration.md, and the example in /usr/share/doc/scim-edge/examples/); flags given here override it. Without --config, the flags and the defaults shown are the whole configuration."
    )

    @Option(help: "YAML configuration file.")
    var config: String?

    // Each flag is one option of the table (AgentOptions): its name, help,
    // default and bounds come from there, and the table parses the value.
    @Option(name: flag(AgentOptions.dataDir), help: help(AgentOptions.dataDir)) var dataDir: String?
    @Option(name: flag(AgentOptions.listen), help: help(AgentOptions.listen)) var listen: String?
    @Option(name: flag(AgentOptions.workers), help: help(AgentOptions.workers)) var workers: String?
    @Option(name: flag(AgentOptions.tokenFile), help: help(AgentOptions.tokenFile)) var tokenFile: String?
    @Option(name: flag(AgentOptions.token), help: help(AgentOptions.token)) var token: [String] = []
    @Option(name: flag(AgentOptions.tlsCert), help: help(AgentOptions.tlsCert)) var tlsCert: String?
    @Option(name: flag(AgentOptions.tlsKey), help: help(AgentOptions.tlsKey)) var tlsKey: String?
    @Option(name: flag(AgentOptions.adminListen), help: help(AgentOptions.adminListen)) var adminListen: String?
    @Option(name: flag(AgentOptions.maxBodyBytes), help: help(AgentOptions.maxBodyBytes)) var maxBodyBytes: String?
    @Option(name: flag(AgentOptions.maxConnections), help: help(AgentOptions.maxConnections)) var maxConnections: String?
    @Flag(name: flag(AgentOptions.keepOutbox), help: ArgumentHelp(AgentOptions.keepOutbox.help)) var keepOutbox = false
    @Option(name: flag(AgentOptions.outboxMaxEvents), help: help(AgentOptions.outboxMaxEvents)) var outboxMaxEvents: String?
    @Option(name: flag(AgentOptions.outboxMaxBytes), help: help(AgentOptions.outboxMaxBytes)) var outboxMaxBytes: String?
    @Option(name: flag(AgentOptions.brokerURL), help: help(AgentOptions.brokerURL)) var broker: String?
    @Option(name: flag(AgentOptions.brokerCA), help: help(AgentOptions.brokerCA)) var ca: String?
    @Option(name: flag(AgentOptions.brokerCert), help: help(AgentOptions.brokerCert)) var cert: String?
    @Option(name: flag(AgentOptions.brokerKey), help: help(AgentOptions.brokerKey)) var key: String?
    @Option(name: flag(AgentOptions.brokerCRL), help: help(AgentOptions.brokerCRL)) var crl: String?
    @Option(name: flag(AgentOptions.brokerDomain), help: help(AgentOptions.brokerDomain)) var domain: String?
    @Option(name: flag(AgentOptions.brokerAgent), help: help(AgentOptions.brokerAgent)) var agentName: String?

    /// The flags given, in the table's order (so that `--broker` creates the
    /// relay before `--ca` fills it in).
    var given: [(name: String, value: String)] {
        let values: [(OptionSpec, [String])] = [
            (AgentOptions.dataDir, dataDir.list), (AgentOptions.listen, listen.list), (AgentOptions.workers, workers.list),
            (AgentOptions.tokenFile, tokenFile.list), (AgentOptions.token, token), (AgentOptions.tlsCert, tlsCert.list),
            (AgentOptions.tlsKey, tlsKey.list), (AgentOptions.adminListen, adminListen.list),
            (AgentOptions.maxBodyBytes, maxBodyBytes.list),
            (AgentOptions.maxConnections, maxConnections.list), (AgentOptions.keepOutbox, keepOutbox ? ["true"] : []),
            (AgentOptions.outboxMaxEvents, outboxMaxEvents.list), (AgentOptions.outboxMaxBytes, outboxMaxBytes.list),
            (AgentOptions.brokerURL, broker.list), (AgentOptions.brokerCA, ca.list), (AgentOptions.brokerCert, cert.list),
            (AgentOptions.brokerKey, key.list), (AgentOptions.brokerCRL, crl.list), (AgentOptions.brokerDomain, domain.list),
            (AgentOptions.brokerAgent, agentName.list),
        ]
        return AgentOptions.all.flatMap { spec in
            values.first { $0.0.flag == spec.flag && spec.flag != nil }.map { v in v.1.map { (spec.flag!, $0) } } ?? []
        }
    }

    func run() throws {
        var configuration: AgentConfiguration
        do {
            configuration = try agentOptionTable.configuration(defaults: .defaults, file: config, flags: given)
        } catch let e as OptionProblems { throw CommandFailure(e.description) }
        LoggingSystem.bootstrap { label in JSONLogHandler(label: label) }
        configuration.accessLog = .standardOutput
        let lifecycle = Logger(label: "scim-edge")
        let loop = try EventLoop()
        let agent: AgentService
        do {
            agent = try AgentService(loop: loop, configuration: configuration)
            agent.log = { line in lifecycle.info("\(line)") }
            try agent.installSignals()
        } catch {
            _ = loop.close()
            throw error
        }
        emit(
            "scim-edge \(version) listening on \(agent.server.address) (SCIM at \(configuration.tls == nil ? "http" : "https")://\(agent.server.address)/scim/v2)"
        )
        if let admin = agent.adminServer { emit("operations at http://\(admin.address)/metrics") }
        loop.run()
        let left = loop.close()
        if left != 0 { emit("warning: \(left) handles were still open at exit") }
        LogSink.standardOutput.flush()
    }
}

struct Reference: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Print the configuration reference, rendered from the option tables (make docs, packaging).",
        shouldDisplay: false)
    @Flag(help: "docs/configuration.md (both programs).") var markdown = false
    @Option(help: ArgumentHelp("The configuration file's man page (section 5) of PROGRAM: scim-edge or scim-broker.", valueName: "PROGRAM"))
    var man: String?
    @Option(help: "The man page's date.") var date = "2026-12-01"

    func run() throws {
        switch (markdown, man) {
        case (true, nil): emit(configurationReference(), newline: false)
        case (false, "scim-edge"?): emit(AgentOptions.reference.manPage(date: date), newline: false)
        case (false, "scim-broker"?): emit(BrokerOptions.reference.manPage(date: date), newline: false)
        default: throw ValidationError("give --markdown, or --man scim-edge|scim-broker")
        }
    }
}

struct CheckConfig: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "check-config", abstract: "Validate a configuration file (exit 0 when it is usable).",
        discussion: """
            Reports every problem in one run, one per line as FILE:LINE:COLUMN: KEY: PROBLEM (fix: WHAT TO DO): \
            unknown keys (with the key probably meant), wrong values, policy entries, missing or unreadable files, \
            secrets readable beyond the service, weak or placeholder tokens, certificates (dates, key, CA, identity). \
            Warnings are printed too but do not fail the check. Exit status 1 when there is an error.
            """)
    @Argument(help: "The YAML file.") var file = "/etc/scim-edge/agent.yaml"
    @Option(
        help: ArgumentHelp(
            "Check that user NAME (the service's) can read every file and write the data directory; needs root, or to run as NAME.",
            valueName: "NAME"))
    var asUser: String?
    @Flag(
        help:
            "Also connect to every pull source: bind with its credentials and read its base DN (a network check: not run by the service's unit, so that a directory that is down does not keep the agent from starting)."
    )
    var connect = false

    func run() throws {
        let user = try asUser.map { name throws(ServiceUserError) in try ServiceUser(name: name) }
        let d = ConfigDiagnostics(file: file)
        let config = AgentConfiguration.read(file: file, d)
        config?.checkFiles(d, configFile: file, serviceUser: user)
        if connect { config?.checkSourceConnections(d) }
        let (lines, passed) = d.report {
            "ok (data in \(config!.dataDirectory), SCIM on \(config!.listen)"
                + (config!.relay.map { ", relaying domain \($0.domain) as \($0.agentName)" } ?? ", standalone")
                + (user.map { ", readable by \($0.name)" } ?? "") + ")"
        }
        for line in lines { emit(line) }
        if !passed { throw ExitCode(1) }
    }
}

struct SandboxCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "sandbox", abstract: "A multi-IdP federation on loopback, driven by a scripted scenario, then verified.",
        discussion: """
            Creates a throwaway PKI; starts a broker, three agents (hq; subsidiary-eu keeping phone numbers and \
            addresses local; partner where only contractors leave), when slapd is installed a fourth whose source of \
            record is an LDAP directory (a slapd of the sandbox's own, followed with syncrepl), and two targets (a standalone agent as an app, \
            and the reference scim2-server when installed); plays hires, updates, group changes, a user leaving the \
            partner's scope, a contractor's deactivation, a hire, a modify, a disabled account and a membership \
            change made in the directory, and a load burst; shows each hop live; and verifies that \
            everything arrived exactly once where it should, and nothing local left its domain. Exit status 0 only \
            when every check holds. Everything is removed at the end, on Ctrl-C too.
            """)
    @Flag(help: "A short run (a smaller burst), as `make test` runs it.") var short = false
    @Option(help: "Users created by the load burst (default 3000; 200 with --short).") var burst: Int?
    @Flag(help: "Keep the temporary directory (configs, logs, data).") var keep = false
    @Flag(help: "Plain lines instead of a live view, even on a terminal.") var plain = false
    @Flag(
        inversion: .prefixedNo,
        help: "After the verification, keep the federation running until Ctrl-C (default: when standard input is a terminal).")
    var stay: Bool?
    @Option(help: "The reference scim2-server executable (default: $SCIM2_SERVER, .venv/bin, PATH).") var reference: String?
    @Option(help: "The slapd of the LDAP domain (default: /usr/sbin/slapd, PATH); without it the domain is skipped.") var slapd: String?

    func run() throws {
        var options = SandboxOptions()
        options.short = short
        options.burst = burst
        options.keep = keep
        options.live = !plain && isatty(1) == 1
        options.stay = stay ?? (isatty(0) == 1)
        options.referenceServer = reference
        options.slapd = slapd
        options.output = { emit($0, newline: false) }
        let sandbox = try Sandbox(options: options)
        if !sandbox.run() { throw ExitCode(sandbox.interrupted ? 130 : 1) }
    }
}

struct BenchCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "bench", abstract: "Load-test any SCIM 2.0 endpoint: throughput, latency percentiles, status codes.",
        discussion: """
            Closed loop by default (each connection sends its next request when the previous one is answered); \
            with --rate, an open loop at a constant rate whose latencies are measured from each request's intended \
            start (free of coordinated omission). --e2e-metrics adds the propagation a broker measured \
            (agent → broker → targets) from its /metrics after the run.
            """)
    @Option(help: "The SCIM base URL, e.g. http://127.0.0.1:8080/scim/v2.") var url: String
    @Option(help: "Bearer token.") var token: String?
    @Option(help: "Kept-alive connections (one request in flight each).") var connections = 16
    @Option(help: "Seconds to run (default 10 unless --requests is given).") var duration: Double?
    @Option(help: "Requests to send.") var requests: Int?
    @Option(help: "Open loop: requests per second.") var rate: Double?
    @Option(help: "Operation weights: post, get, patch, filter (e.g. post=70,get=20,patch=10).") var mix = "post=1"
    @Option(help: "Users created before measuring when the mix reads or patches.") var seedUsers = 200
    @Option(help: "https: CA file to verify the server (default: the system's).") var ca: String?
    @Option(help: "https: client certificate (PEM), for mutual TLS.") var cert: String?
    @Option(help: "https: client key (PEM).") var key: String?
    @Flag(help: "Print the report as JSON.") var json = false
    @Option(help: "Write latency plots (over time, by percentile) to this SVG file.") var svg: String?
    @Option(help: "After the run, read propagation quantiles from a broker's metrics URL (http://HOST:PORT/metrics).")
    var e2eMetrics: String?
    @Option(help: "Seconds to wait before reading --e2e-metrics (changes still propagating).") var settle = 2.0
    @Flag(help: "No progress line.") var quiet = false

    func run() throws {
        guard let base = ServiceURL(url) else { throw ValidationError("--url \(url) is not http(s)://HOST:PORT/PATH") }
        guard let parsedMix = BenchOptions.parseMix(mix) else {
            throw ValidationError("--mix \(mix): give OPERATION=WEIGHT pairs of post, get, patch, filter")
        }
        var options = BenchOptions(url: base)
        options.token = token
        options.connections = max(1, connections)
        options.duration = duration
        options.requests = requests
        options.rate = rate
        options.mix = parsedMix
        options.seedUsers = seedUsers
        if let ca { options.tls.trustRootsFile = ca }
        options.tls.certificateChainFile = cert
        options.tls.privateKeyFile = key
        let tty = isatty(2) == 1
        if !quiet {
            options.progress = { p in
                let line =
                    "\(fixed1(p.elapsed)) s  \(p.completed) requests  \(p.errors) errors  p99 \(fixed1(Double(p.recentP99Micros) / 1000)) ms (last second)"
                writeStderr(tty ? "\r\u{1B}[K" + line : line + "\n")
            }
        }
        let loop = try EventLoop()
        var result: BenchReport?
        let bench = try Bench(loop: loop, options: options)
        bench.run {
            result = $0; loop.stop()
        }
        loop.run()
        if tty && !quiet { writeStderr("\r\u{1B}[K") }
        guard var report = result else { throw CommandFailure("the run did not finish") }
        if let e2eMetrics {
            report.propagation = try readPropagation(e2eMetrics, settle: settle)
        }
        _ = loop.close()
        if json { emit(String(decoding: report.json.serialized(), as: UTF8.self)) } else { emit(report.text, newline: false) }
        if let svg { try writeFile(svg, report.svg, mode: 0o644, replace: true) }
        if report.completed == 0 { throw ExitCode(1) }
    }
}

func fixed1(_ v: Double) -> String { String(Double(Int(v * 10)) / 10) }

func writeStderr(_ text: String) {
    let bytes = Array(text.utf8)
    _ = bytes.withUnsafeBytes { write(2, $0.baseAddress, $0.count) }
}

/// Reads `scim_broker_propagation_seconds` and `scim_broker_target_propagation_seconds` quantiles.
func readPropagation(_ url: String, settle: Double) throws -> [(String, Double)] {
    usleep(UInt32(max(0, settle) * 1_000_000))
    let text = try httpGetText(url)
    var out: [(String, Double)] = []
    for line in text.split(separator: "\n")
    where line.hasPrefix("scim_broker_propagation_seconds{")
        || line.hasPrefix("scim_broker_target_propagation_seconds{")
    {
        let parts = line.split(separator: " ")
        guard parts.count == 2, let v = Double(parts[1]) else { continue }
        let name = String(parts[0]).replacing("scim_broker_", with: "").replacing("_seconds", with: "")
        out.append((name, v))
    }
    guard !out.isEmpty else { throw CommandFailure("\(url) reports no propagation quantiles (is it a broker's /metrics?)") }
    return out
}

struct PKI: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "pki", abstract: "Certificates for the federation.", subcommands: [CSR.self])

    struct CSR: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Write a new key and a certificate signing request carrying the identity the broker expects.",
            discussion: """
                Writes OUT/agent.key (0600) and OUT/agent.csr: the file names the configuration's broker.key and \
                broker.cert expect (/etc/scim-edge/agent.key, agent.crt). The request names \
                spiffe://TRUST-DOMAIN/DOMAIN/AGENT (SAN URI) and CN AGENT.DOMAIN. Have the federation CA sign it \
                (scim-broker pki sign agent --csr agent.csr, or your organisation's CA: clientAuth, that SAN URI), \
                install the certificate as OUT/agent.crt, and bind the identity to DOMAIN in the broker's \
                configuration (domains: DOMAIN: spiffe://…). See docs/pki.md.
                """)
        @Option(help: "The compliance domain the agent serves (as the broker names it).") var domain: String
        @Option(help: "This agent's name within the domain.") var agent: String
        @Option(help: "The SPIFFE-style trust domain of the federation.") var trustDomain = "scim-edge"
        @Option(help: "Where to write agent.key (0600) and agent.csr.") var out = "."

        func validate() throws {
            let ok: (String) -> Bool = { !$0.isEmpty && $0.allSatisfy { $0.isLetter || $0.isNumber || "-_.".contains($0) } }
            guard ok(domain), ok(agent), ok(trustDomain) else {
                throw ValidationError("--domain, --agent and --trust-domain may hold letters, digits, '-', '_' and '.' only")
            }
        }

        func run() throws {
            let identity = agentIdentity(trustDomain: trustDomain, domain: domain, agent: agent)
            let (key, csr) = try makeSigningRequest(commonName: "\(agent).\(domain)", uris: [identity])
            // The names of the example configuration, whatever the agent's name (several
            // agents of a domain are several appliances, each with its own /etc/scim-edge).
            let keyPath = "\(out)/agent.key", csrPath = "\(out)/agent.csr"
            try writeFile(keyPath, key, mode: 0o600)
            try writeFile(csrPath, csr, mode: 0o644)
            emit("wrote \(keyPath) (keep it on this appliance) and \(csrPath)")
            emit("identity: \(identity)")
            emit("broker config: domains: { \(domain): \"\(identity)\" }")
        }
    }
}

struct Policy: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Local-control policy tools.", subcommands: [Explain.self])

    struct Explain: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Show what of one stored resource would leave the boundary under the configured policy.")
        @Option(help: "The agent's YAML configuration (for its policy and data directory).") var config: String
        @Argument(help: "The resource id.") var id: String

        func run() throws {
            let c = try AgentConfiguration.load(file: config)
            let store = try AgentStore(path: c.dataDirectory, registry: .standard, policy: c.policy)
            for type in store.registry.resourceTypes {
                if let r = try store.get(type, id) {
                    store.policy.explain(r, type: type).forEach { emit($0) }
                    return
                }
            }
            throw CommandFailure("no User or Group with id \(id)")
        }
    }
}

/// Opens the agent's LMDB file directly (also while the agent runs: LMDB
/// readers never wait for the writer).
struct DataDirectory: ParsableArguments {
    @Option(help: "The agent's data directory.")
    var dataDir: String

    func open() throws -> AgentStore {
        guard access(dataDir + "/data.mdb", R_OK) == 0 else { throw CommandFailure("no agent data in \(dataDir)") }
        return try AgentStore(path: dataDir, registry: .standard)
    }
}

struct Status: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Show the store, the outbox and the relay position.")
    @OptionGroup var data: DataDirectory

    func run() throws {
        let store = try data.open()
        let info = store.environment.info
        let usage = try store.outboxUsage()
        let users = try store.count(store.registry.resourceType("User")!)
        let groups = try store.count(store.registry.resourceType("Group")!)
        emit("data directory   \(data.dataDir)")
        emit("store            \(info.usedBytes) of \(info.mapSize) bytes mapped (limit \(store.environment.options.maxMapSize))")
        emit("store epoch      \(store.epoch.isEmpty ? "none (made before store epochs: one sequence per certificate)" : store.epoch)")
        let spoken = try store.brokerProtocol()
        emit(
            "relay protocol   \(spoken)"
                + (spoken >= 2 ? " (membership changes go as deltas)" : " (the broker has not said it speaks 2: groups go as full state)"))
        emit("resources        \(users) users, \(groups) groups")
        emit("outbox           \(usage.events) events, \(usage.bytes) bytes")
        emit("acknowledged     through sequence \(try store.acknowledgedSequence())")
        if let oldest = try store.oldestOutboxEvent() {
            emit(
                "oldest event     sequence \(oldest.seq), issued at \(formatDateTime(secondsSinceEpoch: oldest.issuedAt))"
                    + " (\(max(0, unixSeconds() - oldest.issuedAt)) s ago)")
        }
        let foreign = try store.foreignCounts()
        emit("downlink         committed through feed sequence \(try store.downlinkSequence())")
        emit(
            "foreign          "
                + (foreign.isEmpty
                    ? "none" : foreign.sorted { $0.key < $1.key }.map { "\($0.value) from \($0.key)" }.joined(separator: ", ")))
        let targets = try store.storedTargetNames()
        let letters = try store.deadLetters(target: nil)
        emit(
            "local targets    "
                + (targets.isEmpty
                    ? "none"
                    : try targets.map { t in
                        "\(t): \(try store.queueDepth(target: t).count) queued, \(letters.filter { $0.target == t }.count) dead letters"
                    }.joined(separator: "; ")))
    }
}

struct Sources: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Pull sources (LDAP, Active Directory): their state in the store.", subcommands: [SourceStatus.self])

    struct SourceStatus: ParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "status", abstract: "Per source: mode, position, last success, lag, entries, errors and the last failures.")
        @OptionGroup var data: DataDirectory

        func run() throws {
            let store = try data.open()
            let statuses = try store.sourceStatuses()
            if statuses.isEmpty { emit("nothing to show: no source has written to \(data.dataDir)") }
            let now = unixSeconds()
            for s in statuses {
                emit("source \(s.name)")
                emit("  mode           \(s.mode)")
                emit("  position       \(s.position ?? "none (the next start reads everything)")")
                emit(
                    "  last success   "
                        + (s.lastSuccess == 0
                            ? "never" : "\(formatDateTime(secondsSinceEpoch: s.lastSuccess)) (\(max(0, now - s.lastSuccess)) s ago)"))
                emit(
                    "  lag            "
                        + (s.lag(now: now).map { "\($0) s (as of the last committed batch; /metrics has it live)" }
                            ?? "unknown (nothing committed says)"))
                emit("  entries        \(s.entries)")
                emit("  changes        \(s.written)")
                emit("  errors         \(s.errors)")
                for f in s.lastFailures { emit("  failed         \(f.dn): \(f.reason) (at \(formatDateTime(secondsSinceEpoch: f.at)))") }
            }
        }
    }
}

struct Outbox: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Inspect relay events not yet acknowledged.",
        subcommands: [List.self, Show.self])

    struct List: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "One line per event: sequence, kind, resource, trace id.")
        @OptionGroup var data: DataDirectory
        @Option(help: "Start after this sequence.") var after: UInt64 = 0
        @Option(help: "At most this many events.") var limit = 50

        func run() throws {
            let entries = try data.open().outboxEntries(after: after, limit: limit)
            if entries.isEmpty { emit("nothing to show: no event waits for the broker" + (after > 0 ? " after sequence \(after)" : "")) }
            for (seq, event) in entries {
                let (uri, body) = event["events"]?.objectValue?.members.first ?? ("?", .null)
                let kind = uri.hasPrefix("urn:ietf:params:SCIM:event:") ? String(uri.dropFirst(27)) : uri
                emit("\(seq)\t\(kind)\t\(body["ref"]?.stringValue ?? "-")\t\(event["txn"]?.stringValue ?? "-")")
            }
        }
    }

    struct Show: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Print one event as JSON.")
        @OptionGroup var data: DataDirectory
        @Argument(help: "The event's sequence number.") var sequence: UInt64

        func run() throws {
            guard let (seq, event) = try data.open().outboxEntries(after: sequence &- 1, limit: 1).first, seq == sequence else {
                throw CommandFailure("no event \(sequence) in the outbox (acknowledged events are pruned)")
            }
            emit(event.text)
        }
    }
}

struct DeadLetter: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "deadletter", abstract: "Events the broker refused for good.", subcommands: [List.self, Retry.self, Drop.self])

    struct List: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "One line per dead letter: sequence, resource, reason.")
        @OptionGroup var data: DataDirectory
        func run() throws {
            let letters = try data.open().deadLetterEntries()
            if letters.isEmpty { emit("nothing to show: no dead letters") }
            for (seq, reason, event) in letters {
                let ref = event["events"]?.objectValue?.members.first?.value["ref"]?.stringValue ?? "-"
                emit("\(seq)\t\(ref)\t\(reason)")
            }
        }
    }

    struct Retry: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Send the resource again as it is now (a new event).")
        @OptionGroup var data: DataDirectory
        @Argument(help: "The dead letter's sequence.") var sequence: UInt64
        func run() throws {
            let now = unixSeconds()
            let ctx = WriteContext(
                newID: "", now: formatDateTime(secondsSinceEpoch: now), epochSeconds: now,
                eventID: "retry-\(sequence)", traceID: "deadletter-retry-\(sequence)")
            guard try data.open().retryDeadLetter(sequence, ctx) else { throw CommandFailure("no dead letter \(sequence)") }
            emit("dead letter \(sequence): resource queued again")
        }
    }

    struct Drop: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Forget a dead letter.")
        @OptionGroup var data: DataDirectory
        @Argument(help: "The dead letter's sequence.") var sequence: UInt64
        func run() throws {
            guard try data.open().dropDeadLetter(sequence) else { throw CommandFailure("no dead letter \(sequence)") }
            emit("dead letter \(sequence) dropped")
        }
    }
}

struct Resources: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Read stored resources.", subcommands: [Get.self])

    struct Get: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Print a stored User or Group by id.")
        @OptionGroup var data: DataDirectory
        @Argument(help: "The resource id.") var id: String

        func run() throws {
            let store = try data.open()
            for type in store.registry.resourceTypes {
                if let r = try store.get(type, id) { emit(JSON.object(r).text); return }
            }
            throw CommandFailure("no User or Group with id \(id)")
        }
    }
}

/// One line to standard output, unbuffered (`writeLine`).
func emit(_ line: String, newline: Bool = true) { writeLine(line, newline: newline) }

ScimEdge.main()
