import ArgumentParser
import EdgeBroker
import EdgeConfig
import EdgeLog
import EdgeLoop
import EdgeTLS
import Glibc
import Logging
import SCIM

struct ScimBroker: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "scim-broker",
        abstract: "Federated SCIM 2.0 provisioning: the central broker agents relay to.",
        version: scimEdgeVersion,
        subcommands: [Serve.self, CheckConfig.self, Status.self, Targets.self, DeadLetter.self, Trace.self, PKI.self])
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
            (BrokerOptions.apiTokenFile, apiTokenFile.list), (BrokerOptions.adminListen, adminListen.list),
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
        if let api = broker.apiServer { emitLine("read API at http://\(api.address)/scim/v2") }
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
struct StoreOptions: ParsableArguments {
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

func formatTime(_ ms: Int64?) -> String {
    guard let ms, ms > 0 else { return "-" }
    return formatDateTime(secondsSinceEpoch: ms / 1000, milliseconds: Int(ms % 1000))
}

struct Targets: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Downstream targets: status, the deletion guard, reconciliation, forgetting a removed target.",
        subcommands: [TargetStatus.self, Held.self, ConfirmDeletes.self, RejectDeletes.self, Reconcile.self, Push.self, Forget.self])
}

struct TargetStatus: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "status", abstract: "Per target: state, queue, dead letters, deletion guard.")
    @OptionGroup var options: StoreOptions
    @Flag(help: "One JSON document per line.") var json = false

    func run() throws {
        let (store, configured) = try options.open()
        let letters = try store.deadLetters(target: nil)
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
        let statuses = try store.targetStatuses()
        if statuses.isEmpty && !json && !configured.contains(where: { $0.destination != nil }) {
            emitLine("nothing to show: no target has state in this broker")
        }
        for (name, saved) in statuses {
            var status = saved
            // With --config: a target that left it keeps its queue until `targets forget`.
            let removed = options.config != nil && !configured.contains { $0.name == name }
            if removed { status["removed"] = .bool(true) }
            let depth = try store.queueDepth(target: name)
            status["queued"] = .int(depth.count)
            status["oldestQueuedAt"] = .number(JSONNumber(integer: depth.oldest))
            status["deadLetters"] = .int(letters.filter { $0.target == name }.count)
            status["deletesPaused"] = .bool(try store.deletionGuard(target: name).pausedSince != nil)
            if json { emitLine(JSON.object(status).serializedString); continue }
            let caps =
                status["capabilities"]?.objectValue.map { c in
                    c.members.filter { $0.value == .bool(true) }.map(\.key).joined(separator: ",")
                } ?? "-"
            emitLine(
                "\(name)\t\(status["state"]?.stringValue ?? "-")\tqueued \(depth.count) (oldest \(formatTime(depth.oldest)))"
                    + "\tdelivered \(status["delivered"]?.numberValue?.description ?? "0")\tdead letters \(status["deadLetters"]?.numberValue?.description ?? "0")"
                    + "\tretries \(status["retries"]?.numberValue?.description ?? "0")\tconcurrency \(status["concurrency"]?.numberValue?.description ?? "-")"
                    + "\tbreaker \(status["breaker"]?.stringValue ?? "-")\tdeletes \(status["deletesPaused"] == .bool(true) ? "PAUSED" : "flowing")"
                    + (status["linked"]?.numberValue.map { "\tlinked \($0.description)" } ?? "")
                    + "\tsupports \(caps)\tupdated \(formatTime(status["updatedAt"]?.numberValue?.integer))"
                    + (status["lastError"]?.stringValue.map { "\tlast error: \($0)" } ?? "")
                    + (removed ? "\tREMOVED from the configuration (scim-broker targets forget \(name) clears it)" : ""))
        }
    }
}

struct ConfirmDeletes: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "confirm-deletes", abstract: "Release the removals the deletion guard holds back for a target.")
    @OptionGroup var options: StoreOptions
    @Argument(help: "The target.") var name: String

    func run() throws {
        let (store, _) = try options.open(target: name)
        try store.confirmDeletes(target: name)
        emitLine("\(name): removals queued so far are released (the guard counts again from now)")
    }
}

struct Held: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "List the removals the deletion guard holds back for a target.",
        discussion: """
            One line each: the queue sequence (#N, for reject-deletes), the operation, the type and broker id, \
            the userName or displayName, the source domain, when it was queued, and the trace id.
            """)
    @OptionGroup var options: StoreOptions
    @Argument(help: "The target.") var name: String
    @Flag(help: "One JSON document per line.") var json = false

    func run() throws {
        let (store, _) = try options.open(target: name)
        let (pausedSince, held) = try store.heldRemovals(target: name)
        if json {
            for h in held { emitLine(h.json.serializedString) }
            return
        }
        guard let pausedSince else {
            emitLine("\(name): the deletion guard holds nothing (removals flow)")
            return
        }
        emitLine(
            "\(name): \(held.count) removal\(held.count == 1 ? "" : "s") held by the deletion guard since \(formatTime(pausedSince))"
                + " (targets confirm-deletes \(name) sends them, targets reject-deletes \(name) [SEQ…] drops them)")
        for h in held { emitLine(describe(h)) }
    }
}

/// One held removal, one line (`held`, `reject-deletes`).
func describe(_ h: HeldRemoval) -> String {
    "#\(h.seq)\t\(h.item.operation.rawValue) \(h.item.type) \(h.item.brokerID)\t\(h.nameAttribute) \(h.name ?? "-")"
        + "\tdomain \(h.domain ?? "-")\tqueued \(formatTime(h.item.queuedAt))\ttrace \(h.item.trace.isEmpty ? "-" : h.item.trace)"
}

struct RejectDeletes: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "reject-deletes", abstract: "Drop removals the deletion guard holds back for a target: they are never sent.",
        discussion: """
            Drops the given held removals (#N from `targets held`), or all of them, from the target's queue and \
            records the rejection in each change's trail. When nothing stays held, the target's removals resume \
            and the guard counts again from then; the accounts stay at the target (reconcile reports them as strays).
            """)
    @OptionGroup var options: StoreOptions
    @Argument(help: "The target.") var name: String
    @Argument(help: "Queue sequences of held removals (#N or N); none: all held removals.") var seq: [String] = []

    func run() throws {
        var seqs: [UInt64] = []
        for s in seq {
            guard let n = UInt64(s.hasPrefix("#") ? String(s.dropFirst()) : s) else {
                throw ValidationError("\(s) is not a queue sequence (#N)")
            }
            seqs.append(n)
        }
        let (store, _) = try options.open(target: name)
        let result = try store.rejectHeldRemovals(target: name, seqs: seqs.isEmpty ? nil : seqs)
        guard !result.rejected.isEmpty else {
            emitLine("\(name): the deletion guard holds nothing; nothing rejected")
            return
        }
        for h in result.rejected { emitLine("rejected \(describe(h))") }
        emitLine(
            "\(name): \(result.rejected.count) held removal\(result.rejected.count == 1 ? "" : "s") rejected; "
                + (result.resumed
                    ? "nothing held any more: removals resume (the guard counts again from now)"
                    : "\(result.stillHeld) still held (confirm-deletes or reject-deletes)"))
    }
}

struct Forget: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Clear what the broker keeps for a target removed from the configuration.",
        discussion: """
            Removes the target's queued changes, account mappings, dead letters, status and deletion guard. \
            Needs --config, to check that the target is no longer there; run it once the broker runs \
            without the target.
            """)
    @OptionGroup var options: StoreOptions
    @Argument(help: "The removed target.") var name: String

    func run() throws {
        guard options.config != nil else { throw ValidationError("give --config FILE: forget checks that \(name) is no longer configured") }
        let (store, targets) = try options.open()
        guard !targets.contains(where: { $0.name == name }) else {
            throw CommandFailure("\(name) is still a target in \(options.config!); remove it there and restart the broker first")
        }
        let stored = try store.storedTargetNames()
        guard stored.contains(name) else {
            throw UnknownTarget(name: name, known: stored, configured: false, forgetting: true)
        }
        let gone = try store.forgetTarget(name)
        emitLine(
            "\(name): forgot \(gone.queued) queued changes, \(gone.mappings) account mappings, "
                + "\(gone.deadLetters) dead letters, \(gone.stateEntries) state entries")
    }
}

struct Reconcile: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Compare a target's users and groups with what the routes say it should hold.",
        discussion: "Reports missing, drifted and stray accounts; --apply queues the fixes for the running broker.")
    @OptionGroup var options: StoreOptions
    @Argument(help: "The target.") var name: String
    @Flag(help: "Queue the fixes: create the missing, fix drift, deactivate the strays the broker created.") var apply = false
    @Flag(help: "Print the report as JSON.") var json = false

    func run() throws {
        let (store, targets) = try options.open()
        guard let target = targets.first(where: { $0.name == name }) else {
            throw CommandFailure("no target \(name) in the configuration (give --config or --target \(name)=URL)")
        }
        let report = try EdgeBroker.reconcile(store: store, target: target, apply: apply)
        if json { emitLine(report.json.serializedString); return }
        emitLine(
            "\(name): \(report.expected) expected, \(report.seen) at the target: \(report.missing.count) missing, "
                + "\(report.drifted.count) drifted, \(report.strays.count) strays, \(report.foreign) not created by the broker"
                + (report.relinked > 0 ? ", \(report.relinked) relinked by externalId" : ""))
        for id in report.missing { emitLine("missing\t\(id)") }
        for d in report.drifted { emitLine("drifted\t\(d.brokerID)\t\(d.attributes.joined(separator: ","))") }
        for s in report.strays { emitLine("stray\t\(s.targetID)\t(broker id \(s.brokerID))") }
        if apply { emitLine("\(report.queued) fixes queued (trace \(report.trace))") }
    }
}

struct DeadLetter: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "deadletter", abstract: "Changes a target refused for good: list, retry or drop them.",
        subcommands: [DeadLetterList.self, DeadLetterRetry.self, DeadLetterDrop.self])
}

struct DeadLetterList: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "list", abstract: "The request, the status and the response of each.")
    @OptionGroup var options: StoreOptions
    @Option(name: .customLong("for"), help: "Only this target.") var only: String?
    @Flag(help: "One JSON document per line.") var json = false

    func run() throws {
        let (store, _) = try only.map { try options.open(target: $0) } ?? options.open()
        let letters = try store.deadLetters(target: only)
        if letters.isEmpty && !json { emitLine("nothing to show: no dead letters" + (only.map { " for \($0)" } ?? "")) }
        for (target, letter) in letters {
            if json { emitLine(JSON.object(letter.merging(["target": .string(target)])).serializedString); continue }
            emitLine(
                "\(target)\t#\(letter["seq"]?.numberValue?.description ?? "?")\t\(formatTime(letter["at"]?.numberValue?.integer))"
                    + "\t\(letter["method"]?.stringValue ?? "") \(letter["path"]?.stringValue ?? "") → \(letter["status"]?.numberValue?.description ?? "")"
                    + "\t\(letter["type"]?.stringValue ?? "") \(letter["id"]?.stringValue ?? "")\ttrace \(letter["trace"]?.stringValue ?? "-")"
            )
            emitLine("  request:  \(letter["request"]?.stringValue ?? "")")
            emitLine("  response: \(letter["response"]?.stringValue ?? "")")
        }
    }
}

/// Which dead letters `retry` and `drop` settle.
struct DeadLetterSelection: ParsableArguments {
    @OptionGroup var options: StoreOptions
    @Argument(help: "The target.") var name: String
    @Argument(help: "The dead letter's number (#N in list); none: all of the target's (drop asks for --all then).") var seq: UInt64?

    func settle(requeue: Bool) throws -> Int {
        let (store, targets) = try options.open(target: name)
        return try store.settleDeadLetters(
            target: name, seq: seq, requeue: requeue, linkPolicy: targets.first { $0.name == name }?.collisions.linkPolicy)
    }
}

struct DeadLetterRetry: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "retry", abstract: "Queue dead-lettered resources again (their current state is delivered).")
    @OptionGroup var selection: DeadLetterSelection
    func run() throws { emitLine("\(try selection.settle(requeue: true)) queued again for \(selection.name)") }
}

struct DeadLetterDrop: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "drop", abstract: "Forget dead letters: one (#N), or every one of the target with --all.")
    @OptionGroup var selection: DeadLetterSelection
    @Flag(help: "Drop every dead letter of the target (without a number).") var all = false

    /// Forgetting is for good: all of a target's only when asked in so many words.
    func validate() throws {
        if selection.seq == nil && !all {
            throw ValidationError("give the dead letter's number (#N in deadletter list), or --all to drop every one of \(selection.name)")
        }
        if selection.seq != nil && all { throw ValidationError("give a number or --all, not both") }
    }

    func run() throws { emitLine("\(try selection.settle(requeue: false)) dropped for \(selection.name)") }
}

struct Trace: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract:
            "Every hop of a change, with timestamps: agent acceptance, broker apply, each target's answer, each boundary's feed and commit."
    )
    @OptionGroup var options: StoreOptions
    @Argument(
        help: "A trace id, a broker id, a userName, an externalId, an id at a target or at the source, or a group's displayName.")
    var id: String
    @Flag(help: "One JSON document per line.") var json = false

    func run() throws {
        let (store, _) = try options.open()
        let hops = try store.trail(id)
        guard !hops.isEmpty else { throw CommandFailure("nothing recorded for \(id)") }
        for (brokerID, hop) in hops {
            if json { emitLine(JSON.object(hop.merging(["id": .string(brokerID)])).serializedString); continue }
            var hop = hop
            if let since = hop["heldSince"]?.numberValue?.integer, let target = hop["target"]?.stringValue {
                hop["detail"] = .string(
                    "held by the deletion guard of target \(target) since \(formatTime(since))"
                        + (hop["queueSeq"]?.numberValue.map { " (#\($0))" } ?? ""))
            }
            var detail: [String] = []
            for key in ["domain", "sourceId", "seq", "feedSeq", "event", "outcome", "method", "status", "detail", "trace"] {
                if let v = hop[key], !v.isNull { detail.append("\(key) \(v.stringValue ?? v.serializedString)") }
            }
            emitLine(
                "\(formatTime(hop["at"]?.numberValue?.integer))\t\(brokerID)\t\(hop["hop"]?.stringValue ?? "")\t\(detail.joined(separator: " "))"
            )
            for step in hop["steps"]?.arrayValue ?? [] { emitLine("\t\t  " + describeStep(step)) }
        }
    }
}

/// One request of a delivery: `PATCH /scim/v2/Groups/… → 200`.
func describeStep(_ step: JSON) -> String {
    "\(step["method"]?.stringValue ?? "?") \(step["path"]?.stringValue ?? "?") → "
        + (step["status"]?.numberValue.map { "\($0)" } ?? "no answer: \(step["error"]?.stringValue ?? "")")
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
        let ids = try store.resources(named: id)
        guard ids.count == 1, let brokerID = ids.first else {
            throw CommandFailure(
                ids.isEmpty
                    ? "no resource named \(id)" : "\(id) names \(ids.count) resources (\(ids.joined(separator: ", "))): give a broker id")
        }
        guard let (domain, type, resource) = try store.resource(brokerID: brokerID) else { throw CommandFailure("\(brokerID) is gone") }
        let label = resource[type == "User" ? "userName" : "displayName"]?.stringValue ?? "-"
        emitLine("resource\t\(type) \(brokerID) (\(label), domain \(domain))")
        guard target.routes(domain: domain, type: type, resource) else {
            emitLine("scope\tout of scope: the routes of target \(name) do not want it; nothing is sent")
            throw ExitCode(1)
        }
        emitLine("scope\tin scope for target \(name)")
        // Its state at the target is taken as unknown: the whole resource is sent (a user by PUT; a group
        // from the member index gets its attributes again), as reconcile does for drift.
        let account = try store.mapping(target: name, brokerID: brokerID)?.targetID
        emitLine("account\t" + (account.map { "\(type) \($0) at the target: sent again, whole" } ?? "none at the target yet: created"))
        let trace = "push-" + hexString(secureRandomBytes(12))
        let queuedAt = unixMilliseconds()
        try store.enqueue(target: name, brokerID: brokerID, type: type, .upsert, trace: trace, resend: true)
        emitLine("queued\ttrace \(trace)")
        // The running broker picks it up within a second. Its hop is the resource's first at this target
        // since now (a change queued before may fold the push into its own delivery, under its trace id).
        let deadline = monotonicMilliseconds() + UInt64(max(1, wait)) * 1000
        while monotonicMilliseconds() < deadline {
            if let hop = try store.trail(brokerID).first(where: {
                $0.hop["hop"]?.stringValue == "target \(name)" && ($0.hop["at"]?.numberValue?.integer ?? 0) >= queuedAt
            })?.hop {
                for step in hop["steps"]?.arrayValue ?? [] { emitLine("step\t" + describeStep(step)) }
                let ok = hop["detail"]?.stringValue != "dead letter"
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
