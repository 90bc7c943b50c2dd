import ArgumentParser
import EdgeBroker
import EdgeConfig
import EdgeDelivery
import EdgeLog
import EdgeLoop
import EdgeTLS
import EdgeTargetCommands
import Glibc
import Logging
import SCIM

struct ScimBroker: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "scim-broker",
        abstract: "Federated SCIM 2.0 provisioning: the central broker agents relay to.",
        version: scimEdgeVersion,
        subcommands: [
            Serve.self, CheckConfig.self, Status.self, Targets.self, TargetDeadLetters<StoreOptions>.self, TargetTrace<StoreOptions>.self,
            PKI.self,
        ])
}

/// `--help` of an option, from its one declaration.
func help(_ spec: OptionSpec) -> ArgumentHelp { ArgumentHelp(spec.flagHelp, valueName: spec.valueName) }
/// Its flag's name, from the same declaration.
func flag(_ spec: OptionSpec) -> NameSpecification { .customLong(spec.flag!) }

extension Optional where Wrapped == String {
    /// The value given, as a list of zero or one.
    var list: [String] { map { [$0] } ?? [] }
}

struct Serve: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Run the federation listener (POST /federation/v1/events over mutual TLS).",
        discussion:
            "Settings come from --config (YAML: see scim-broker.yaml(5), docs/configuration.md, and the example in /usr/share/doc/scim-broker/examples/); flags given here override it. Without --config, the flags and the defaults shown are the whole configuration."
    )

    @Option(help: "YAML configuration file.") var config: String?
    // Each flag is one option of the table (BrokerOptions): its name, help,
    // default and bounds come from there, and the table parses the value.
    @Option(name: flag(BrokerOptions.dataDir), help: help(BrokerOptions.dataDir)) var dataDir: String?
    @Option(name: flag(BrokerOptions.listen), help: help(BrokerOptions.listen)) var listen: String?
    @Option(name: flag(BrokerOptions.tlsCA), help: help(BrokerOptions.tlsCA)) var ca: String?
    @Option(name: flag(BrokerOptions.tlsCert), help: help(BrokerOptions.tlsCert)) var cert: String?
    @Option(name: flag(BrokerOptions.tlsKey), help: help(BrokerOptions.tlsKey)) var key: String?
    @Option(name: flag(BrokerOptions.tlsCRL), help: help(BrokerOptions.tlsCRL)) var crl: String?
    @Option(name: flag(BrokerOptions.domains), help: help(BrokerOptions.domains)) var domain: [String] = []
    @Option(name: flag(BrokerOptions.apiListen), help: help(BrokerOptions.apiListen)) var apiListen: String?
    @Option(name: flag(BrokerOptions.apiTokens), help: help(BrokerOptions.apiTokens)) var apiToken: [String] = []
    @Option(name: flag(BrokerOptions.apiTokenFile), help: help(BrokerOptions.apiTokenFile)) var apiTokenFile: String?
    @Option(name: flag(BrokerOptions.apiOperatorTokens), help: help(BrokerOptions.apiOperatorTokens)) var operatorToken: [String] = []
    @Option(name: flag(BrokerOptions.apiOperatorTokenFile), help: help(BrokerOptions.apiOperatorTokenFile)) var operatorTokenFile: String?
    @Option(name: flag(BrokerOptions.adminListen), help: help(BrokerOptions.adminListen)) var adminListen: String?
    @Option(name: flag(BrokerOptions.maxPendingBatches), help: help(BrokerOptions.maxPendingBatches)) var maxPendingBatches: String?
    @Option(name: flag(BrokerOptions.targets), help: help(BrokerOptions.targets)) var target: [String] = []
    @Option(name: flag(BrokerOptions.targetToken), help: help(BrokerOptions.targetToken)) var targetToken: [String] = []

    /// The flags given, in the table's order (targets before their tokens).
    var given: [(name: String, value: String)] {
        let values: [(OptionSpec, [String])] = [
            (BrokerOptions.dataDir, dataDir.list), (BrokerOptions.listen, listen.list), (BrokerOptions.tlsCA, ca.list),
            (BrokerOptions.tlsCert, cert.list), (BrokerOptions.tlsKey, key.list), (BrokerOptions.tlsCRL, crl.list),
            (BrokerOptions.domains, domain), (BrokerOptions.apiListen, apiListen.list), (BrokerOptions.apiTokens, apiToken),
            (BrokerOptions.apiTokenFile, apiTokenFile.list), (BrokerOptions.apiOperatorTokens, operatorToken),
            (BrokerOptions.apiOperatorTokenFile, operatorTokenFile.list), (BrokerOptions.adminListen, adminListen.list),
            (BrokerOptions.maxPendingBatches, maxPendingBatches.list), (BrokerOptions.targets, target),
            (BrokerOptions.targetToken, targetToken),
        ]
        return BrokerOptions.all.flatMap { spec in
            values.first { $0.0.flag == spec.flag && spec.flag != nil }.map { v in v.1.map { (spec.flag!, $0) } } ?? []
        }
    }

    func run() throws {
        let config: BrokerConfiguration
        do {
            config = try brokerOptionTable.configuration(defaults: .defaults, file: self.config, flags: given)
        } catch let e as OptionProblems { throw CommandFailure(e.description) }
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
        emitLine("scim-broker \(scimEdgeVersion) listening on \(broker.server.address) (federation over mutual TLS)")
        if let api = broker.apiServer {
            emitLine("read API at http://\(api.address)/scim/v2")
            if config.console { emitLine("console at http://\(api.address)/console/") }
        }
        if let admin = broker.adminServer { emitLine("operations at http://\(admin.address)/metrics") }
        loop.run()
        _ = loop.close()
        LogSink.standardOutput.flush()
    }
}

struct CheckConfig: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "check-config", abstract: "Validate a configuration file (exit 0 when it is usable).",
        discussion: """
            Reports every problem in one run, one per line as FILE:LINE:COLUMN: KEY: PROBLEM (fix: WHAT TO DO): \
            unknown keys (with the key probably meant), wrong values, an identity bound to two domains, routes to \
            domains not bound, a read API off loopback, placeholder tokens, missing or unreadable files, secrets \
            readable beyond the service, certificates (dates, key, federation CA, CRL). Warnings (tokens written in \
            the file) are printed too but do not fail the check. Exit status 1 when there is an error.
            """)
    @Argument(help: "The YAML file.") var file = "/etc/scim-broker/broker.yaml"
    @Option(
        help: ArgumentHelp(
            "Check that user NAME (the service's) can read every file and write the data directory; needs root, or to run as NAME.",
            valueName: "NAME"))
    var asUser: String?

    func run() throws {
        let user = try asUser.map { name throws(ServiceUserError) in try ServiceUser(name: name) }
        let d = ConfigDiagnostics(file: file)
        let config = BrokerConfiguration.read(file: file, d)
        config?.checkFiles(d, configFile: file, serviceUser: user)
        let (lines, passed) = d.report {
            "ok (\(config!.domains.count) domains, \(config!.targets.count) targets, federation on \(config!.listen)"
                + (user.map { ", readable by \($0.name)" } ?? "") + ")"
        }
        for line in lines { emitLine(line) }
        if !passed { throw ExitCode(1) }
    }
}

struct Status: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Per domain, agent and store epoch: the applied sequence; resources per domain.")
    @Option(help: "Directory of the broker's LMDB file.") var dataDir: String

    func run() throws {
        let store = try BrokerStore(path: dataDir)
        let agents = try store.agentSequences()
        if agents.isEmpty { emitLine("nothing to show: no agent has relayed to this broker yet") }
        for a in agents {
            let epoch = a.agent.epoch.isEmpty ? "-" : a.agent.epoch
            emitLine(
                "\(a.domain)/\(a.agent.identity)\tepoch \(epoch)\tapplied through \(a.sequence)\t\(try store.resourceCount(domain: a.domain)) resources in \(a.domain)"
            )
        }
    }
}

/// `--target NAME=URL` and `--target-token NAME=TOKEN`: flag targets take every domain's users and groups.
/// `--target NAME=URL` and `--target-token NAME=TOKEN` of the other
/// commands, read as `serve` reads them (`brokerOptionTable`).
func applyTargetFlags(_ targets: inout [TargetConfiguration], _ flags: [String], _ tokens: [String]) throws {
    var config = BrokerConfiguration.defaults
    config.targets = targets
    do throws(OptionProblems) {
        try brokerOptionTable.apply(
            flags: flags.map { (BrokerOptions.targets.flag!, $0) } + tokens.map { (BrokerOptions.targetToken.flag!, $0) }, to: &config,
            fromFile: [])
    } catch {
        throw ValidationError(error.description)
    }
    targets = config.targets
}

/// Where the CLI finds the broker's data: `--data-dir`, or the config's `dataDir` (and targets).
struct StoreOptions: TargetStoreOptions {
    static let program = "scim-broker"
    static let service = "broker"
    static let traceHelp =
        "A trace id, a broker id, a userName, an externalId, an id at a target or at the source, or a group's displayName."
    var configFile: String? { config }
    func openTargets() throws -> (any DeliveryTables, [TargetConfiguration]) { try open() }
    func openTargets(for name: String) throws -> (any DeliveryTables, [TargetConfiguration]) { try open(target: name) }

    @Option(help: "The broker's YAML configuration (its dataDir and targets).") var config: String?
    @Option(help: "Directory of the broker's LMDB file.") var dataDir: String?
    @Option(help: "NAME=URL: a target not in the config (reconcile).") var target: [String] = []
    @Option(help: "NAME=TOKEN: the bearer token for target NAME.") var targetToken: [String] = []

    func open() throws -> (BrokerStore, [TargetConfiguration]) {
        var targets: [TargetConfiguration] = []
        var dir = dataDir
        if let config {
            let c = try BrokerConfiguration.load(file: config)
            targets = c.targets
            if dir == nil { dir = c.dataDirectory }
        }
        try applyTargetFlags(&targets, target, targetToken)
        guard let dir else { throw ValidationError("give --config FILE or --data-dir DIR") }
        return (try BrokerStore(path: dir), targets)
    }

    /// `open()` for a command about target `name`, which must be known: with
    /// --config (or --target), a configured target; with only --data-dir,
    /// one the store holds state for (a queue, mappings, dead letters, a
    /// status or a guard). A mistyped name must not look like success.
    func open(target name: String) throws -> (BrokerStore, [TargetConfiguration]) {
        let (store, targets) = try open()
        if config != nil || !target.isEmpty {
            guard targets.contains(where: { $0.name == name }) else {
                let stored = try store.storedTargetNames().contains(name)
                throw UnknownTarget(name: name, known: targets.map(\.name), configured: true, storedButRemoved: stored)
            }
        } else {
            let stored = try store.storedTargetNames()
            guard stored.contains(name) else { throw UnknownTarget(name: name, known: stored, configured: false) }
        }
        return (store, targets)
    }
}

/// A target name the CLI does not know (exit status 1).
struct UnknownTarget: Error, CustomStringConvertible {
    var name: String
    var known: [String]
    /// The names are the configured targets (else: the targets the store holds state for).
    var configured: Bool
    var storedButRemoved = false
    /// `forget`: the name must be one the store holds state for.
    var forgetting = false

    var description: String {
        let list = known.isEmpty ? "none" : known.joined(separator: ", ")
        if forgetting { return "nothing stored for a target named '\(name)' (with stored state: \(list))" }
        guard configured else {
            return "no target named '\(name)' (with stored state: \(list); give --config to check the configured ones)"
        }
        return "no target named '\(name)' (configured: \(list))"
            + (storedButRemoved ? "; the store still holds state for it: `scim-broker targets forget \(name)` clears it" : "")
    }
}

func formatTime(_ ms: Int64?) -> String { TargetReports.time(ms) }

struct Targets: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Downstream targets: status, the deletion guard, reconciliation, push, pause and resume, forgetting a removed target.",
        subcommands: [
            TargetStatus.self, TargetHeld<StoreOptions>.self, TargetConfirmDeletes<StoreOptions>.self,
            TargetRejectDeletes<StoreOptions>.self, TargetReconcile<StoreOptions>.self, Push.self, Pause.self, Resume.self,
            TargetForget<StoreOptions>.self,
        ])
}

struct TargetStatus: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "status", abstract: "Per target: state, queue, dead letters, deletion guard.")
    @OptionGroup var options: StoreOptions
    @Flag(help: "One JSON document per line.") var json = false

    func run() throws {
        let (store, configured) = try options.open()
        // Boundaries (`domain:`): their agent fetches the queue; no worker saves a status for them.
        for t in configured where t.destination != nil {
            let depth = try store.queueDepth(target: t.name), feed = try store.feedPosition(target: t.name)
            let oldestFeed = try store.feedOldest(target: t.name)
            if json {
                emitLine(
                    JSON.object([
                        "target": .string(t.name), "destination": .string(t.destination!), "queued": .int(depth.count),
                        "oldestQueuedAt": .number(JSONNumber(integer: depth.oldest)), "feedIssued": .int(Int(feed.issued)),
                        "feedAcked": .int(Int(feed.acked)), "feedUnacked": .int(feed.unacked),
                        "oldestUnackedAt": .number(JSONNumber(integer: oldestFeed)),
                    ]).serializedString)
                continue
            }
            emitLine(
                "\(t.name)\tdownlink to \(t.destination!)\tqueued \(depth.count) (oldest \(formatTime(depth.oldest)))"
                    + "\tfeed issued \(feed.issued), acknowledged \(feed.acked), unacknowledged \(feed.unacked) (oldest \(formatTime(oldestFeed)))"
            )
        }
        // An operator's pause is the store's (the running broker follows it): shown even while no broker runs.
        let pauses = try store.targetPauses()
        let lines = try TargetReports.status(
            store, configured: options.config != nil ? configured.map(\.name) : nil, json: json, command: "scim-broker",
            noneYet: !configured.contains(where: { $0.destination != nil })
        ) { name in pauses[name].map { ($0.json, " (since \(formatTime($0.since)): \($0.reason))") } }
        for line in lines { emitLine(line) }
    }
}

struct Push: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Provision on demand: deliver one resource to a target now, and print each step's result.",
        discussion: """
            The resource is named by anything `trace` takes (a broker id, a userName, an externalId, an email, a \
            group's displayName, an id at a target or at the source). It is checked against the target's routes, \
            queued for the running broker with a trace id of its own, and followed until the target answered \
            (--wait seconds). Exit status 0 when the target took it.
            """)
    @OptionGroup var options: StoreOptions
    @Argument(help: "The target.") var name: String
    @Argument(help: "The resource.") var id: String
    @Option(help: "How long to wait for the target's answer, in seconds.") var wait = 30

    func run() throws {
        let (store, targets) = try options.open(target: name)
        guard let target = targets.first(where: { $0.name == name }) else {
            throw CommandFailure("give --config: the target's routes decide whether \(id) goes to \(name)")
        }
        let plan: PushPlan
        do { plan = try store.push(id, to: target) } catch let e as PushError { throw CommandFailure(e.description) }
        emitLine("resource\t\(plan.type) \(plan.brokerID) (\(plan.label), domain \(plan.domain))")
        guard let trace = plan.trace else {
            emitLine("scope\tout of scope: the routes of target \(name) do not want it; nothing is sent")
            throw ExitCode(1)
        }
        emitLine("scope\tin scope for target \(name)")
        emitLine(
            "account\t" + (plan.account.map { "\(plan.type) \($0) at the target: sent again, whole" } ?? "none at the target yet: created"))
        emitLine("queued\ttrace \(trace)")
        // The running broker picks it up within a second.
        let deadline = monotonicMilliseconds() + UInt64(max(1, wait)) * 1000
        while monotonicMilliseconds() < deadline {
            if let hop = try store.pushAnswer(target: name, brokerID: plan.brokerID, since: plan.queuedAt) {
                for step in hop["steps"]?.arrayValue ?? [] { emitLine("step\t" + TargetReports.describeStep(step)) }
                let ok = PushPlan.delivered(hop)
                emitLine(
                    "result\t" + (ok ? "delivered" : "refused: a dead letter (`scim-broker deadletter list --for \(name)`)")
                        + (hop["status"]?.numberValue.map { " (\($0))" } ?? "") + (hop["detail"]?.stringValue.map { ": \($0)" } ?? ""))
                if !ok { throw ExitCode(1) }
                return
            }
            usleep(100_000)
        }
        throw CommandFailure(
            "no answer from target \(name) within \(wait) s: the push stays queued (is the broker running? `scim-broker targets status`)")
    }
}

struct Pause: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Stop sending to a target until `targets resume`: its queue is kept and keeps growing.",
        discussion: """
            The running broker stops the target's deliveries within a second (requests in flight are \
            abandoned and sent again after the resume; the target applies them idempotently). The pause \
            survives a restart; `targets status` and the console show it with its reason.
            """)
    @OptionGroup var options: StoreOptions
    @Argument(help: "The target.") var name: String
    @Option(help: "Why, shown with the pause.") var reason = "paused by an operator"

    func run() throws {
        let (store, targets) = try options.open(target: name)
        if let domain = targets.first(where: { $0.name == name })?.destination {
            throw CommandFailure("\(name) is a boundary: the agent of \(domain) fetches its feed; nothing is sent to pause")
        }
        let pause = try store.pauseTarget(name, reason: reason)
        emitLine("\(name): paused since \(formatTime(pause.since)) (\(pause.reason)); `scim-broker targets resume \(name)` resumes it")
    }
}

struct Resume: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Resume a target an operator paused: its queue is sent from where it stopped.")
    @OptionGroup var options: StoreOptions
    @Argument(help: "The target.") var name: String

    func run() throws {
        let (store, _) = try options.open(target: name)
        guard let pause = try store.resumeTarget(name) else {
            emitLine("\(name): not paused; nothing to resume")
            return
        }
        emitLine("\(name): resumed (paused since \(formatTime(pause.since)): \(pause.reason))")
    }
}

extension JSONObject {
    func merging(_ other: JSONObject) -> JSONObject {
        var out = self
        for (k, v) in other { out[k] = v }
        return out
    }
}

/// One line to standard output, unbuffered (`writeLine`).
func emitLine(_ line: String) { writeLine(line) }

extension JSON {
    var serializedString: String { String(decoding: serialized(), as: UTF8.self) }
}

ScimBroker.main()
