import ArgumentParser
import EdgeAgent
import EdgeConfig
import EdgeDelivery
import Glibc

/// `scim-edge targets …`: the local targets, read (and, where asked,
/// changed) in the LMDB file beside a running agent, as `scim-broker
/// targets …` does for the broker's (the same reports, `TargetReports`).
struct Targets: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Local targets (apps inside the boundary): status, dead letters, the deletion guard, reconciliation, trace.",
        subcommands: [
            TargetStatus.self, TargetDeadLetters.self, TargetRetry.self, TargetDrop.self, TargetHeld.self, TargetConfirmDeletes.self,
            TargetRejectDeletes.self, TargetReconcile.self, TargetTrace.self, TargetForget.self,
        ])
}

/// Where the commands find the agent's data and its targets: `--config`
/// (its dataDir and targets), or `--data-dir` alone (the targets the store
/// holds state for).
struct TargetStore: ParsableArguments {
    @Option(help: "The agent's YAML configuration (its dataDir and targets).") var config: String?
    @Option(help: "The agent's data directory.") var dataDir: String?

    func open() throws -> (AgentStore, [TargetConfiguration]) {
        var targets: [TargetConfiguration] = []
        var dir = dataDir
        var domain = AgentStore.standaloneDomain
        if let config {
            let c = try AgentConfiguration.load(file: config)
            targets = c.targets
            domain = c.relay?.domain ?? domain
            if dir == nil { dir = c.dataDirectory }
        }
        guard let dir else { throw ValidationError("give --config FILE or --data-dir DIR") }
        guard access(dir + "/data.mdb", R_OK) == 0 else { throw CommandFailure("no agent data in \(dir)") }
        return (try AgentStore(path: dir, registry: .standard, targets: targets, domain: domain), targets)
    }

    /// `open()` for a command about target `name`, which must be known
    /// (configured, or with state in the store): a mistyped name must not
    /// look like success.
    func open(target name: String) throws -> (AgentStore, [TargetConfiguration]) {
        let (store, targets) = try open()
        let known = config != nil ? targets.map(\.name) : try store.storedTargetNames()
        guard known.contains(name) else {
            throw CommandFailure(
                "no local target named '\(name)' (\(config != nil ? "configured" : "with stored state"): "
                    + (known.isEmpty ? "none" : known.joined(separator: ", ")) + ")")
        }
        return (store, targets)
    }
}

struct TargetStatus: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "status", abstract: "Per target: state, queue, dead letters, breaker, deletion guard (as the agent last saved it).")
    @OptionGroup var options: TargetStore
    @Flag(help: "One JSON document per line.") var json = false

    func run() throws {
        let (store, targets) = try options.open()
        let lines = try TargetReports.status(
            store, configured: options.config != nil ? targets.map(\.name) : nil, json: json, command: "scim-edge", noneYet: true)
        for line in lines { emit(line) }
    }
}

struct TargetDeadLetters: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "deadletter", abstract: "Changes a local target refused for good: the request, the status and the response of each.")
    @OptionGroup var options: TargetStore
    @Option(name: .customLong("for"), help: "Only this target.") var only: String?
    @Flag(help: "One JSON document per line.") var json = false

    func run() throws {
        let (store, _) = try only.map { try options.open(target: $0) } ?? options.open()
        for line in try TargetReports.deadLetters(store, only: only, json: json) { emit(line) }
    }
}

/// Which dead letters `retry` and `drop` settle.
struct TargetDeadLetterSelection: ParsableArguments {
    @OptionGroup var options: TargetStore
    @Argument(help: "The target.") var name: String
    @Argument(help: "The dead letter's number (#N in deadletter); none: all of the target's (drop asks for --all then).") var seq: UInt64?

    func settle(requeue: Bool) throws -> Int {
        let (store, targets) = try options.open(target: name)
        return try store.settleDeadLetters(
            target: name, seq: seq, requeue: requeue, linkPolicy: targets.first { $0.name == name }?.collisions.linkPolicy)
    }
}

struct TargetRetry: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "retry", abstract: "Queue dead-lettered resources again (their current state is delivered).")
    @OptionGroup var selection: TargetDeadLetterSelection
    func run() throws { emit("\(try selection.settle(requeue: true)) queued again for \(selection.name)") }
}

struct TargetDrop: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "drop", abstract: "Forget dead letters: one (#N), or every one of the target with --all.")
    @OptionGroup var selection: TargetDeadLetterSelection
    @Flag(help: "Drop every dead letter of the target (without a number).") var all = false

    func validate() throws {
        if selection.seq == nil && !all {
            throw ValidationError(
                "give the dead letter's number (#N in targets deadletter), or --all to drop every one of \(selection.name)")
        }
        if selection.seq != nil && all { throw ValidationError("give a number or --all, not both") }
    }

    func run() throws { emit("\(try selection.settle(requeue: false)) dropped for \(selection.name)") }
}

struct TargetHeld: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "held", abstract: "List the removals the deletion guard holds back for a target.")
    @OptionGroup var options: TargetStore
    @Argument(help: "The target.") var name: String
    @Flag(help: "One JSON document per line.") var json = false

    func run() throws {
        let (store, _) = try options.open(target: name)
        for line in try TargetReports.held(store, target: name, json: json) { emit(line) }
    }
}

struct TargetConfirmDeletes: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "confirm-deletes", abstract: "Release the removals the deletion guard holds back for a target.")
    @OptionGroup var options: TargetStore
    @Argument(help: "The target.") var name: String

    func run() throws {
        let (store, _) = try options.open(target: name)
        try store.confirmDeletes(target: name)
        emit("\(name): removals queued so far are released (the guard counts again from now)")
    }
}

struct TargetRejectDeletes: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "reject-deletes", abstract: "Drop removals the deletion guard holds back for a target: they are never sent.")
    @OptionGroup var options: TargetStore
    @Argument(help: "The target.") var name: String
    @Argument(help: "Queue sequences of held removals (#N or N); none: all held removals.") var seq: [String] = []

    func run() throws {
        let (seqs, bad) = TargetReports.queueSequences(seq)
        if let bad { throw ValidationError("\(bad) is not a queue sequence (#N)") }
        let (store, _) = try options.open(target: name)
        for line in try TargetReports.reject(store, target: name, seqs: seqs) { emit(line) }
    }
}

struct TargetReconcile: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "reconcile", abstract: "Compare a target's users and groups with what its routes say it should hold.",
        discussion: "Reports missing, drifted and stray accounts; --apply queues the fixes for the running agent. Needs --config.")
    @OptionGroup var options: TargetStore
    @Argument(help: "The target.") var name: String
    @Flag(help: "Queue the fixes: create the missing, fix drift, deactivate the strays the agent created.") var apply = false
    @Flag(help: "Print the report as JSON.") var json = false

    func run() throws {
        let (store, targets) = try options.open()
        guard let target = targets.first(where: { $0.name == name }) else {
            throw CommandFailure("no target \(name) in the configuration (give --config)")
        }
        let report = try EdgeDelivery.reconcile(store: store, target: target, apply: apply)
        for line in TargetReports.reconciled(name, report, apply: apply, json: json) { emit(line) }
    }
}

struct TargetTrace: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "trace", abstract: "Every hop of a change to the local targets, with timestamps and each request's answer.")
    @OptionGroup var options: TargetStore
    @Argument(help: "A trace id, a resource id, or a userName.") var id: String
    @Flag(help: "One JSON document per line.") var json = false

    func run() throws {
        let (store, _) = try options.open()
        guard let lines = try TargetReports.trail(store, id, json: json) else { throw CommandFailure("nothing recorded for \(id)") }
        for line in lines { emit(line) }
    }
}

struct TargetForget: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "forget", abstract: "Clear what the agent keeps for a target removed from the configuration.",
        discussion: "Needs --config, to check that the target is no longer there; run it once the agent runs without the target.")
    @OptionGroup var options: TargetStore
    @Argument(help: "The removed target.") var name: String

    func run() throws {
        guard options.config != nil else { throw ValidationError("give --config FILE: forget checks that \(name) is no longer configured") }
        let (store, targets) = try options.open()
        guard !targets.contains(where: { $0.name == name }) else {
            throw CommandFailure("\(name) is still a target in \(options.config!); remove it there and restart the agent first")
        }
        guard try store.storedTargetNames().contains(name) else { throw CommandFailure("nothing stored for a target named '\(name)'") }
        emit(TargetReports.forgotten(name, try store.forgetTarget(name)))
    }
}
