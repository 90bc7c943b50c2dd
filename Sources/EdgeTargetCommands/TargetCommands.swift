import ArgumentParser
import EdgeConfig
import EdgeDelivery
import EdgeLog

/// The operator commands about targets, one definition for both programs:
/// `scim-broker targets …`, `deadletter …`, `trace` and `scim-edge targets
/// …` are these commands over their own store (`TargetStoreOptions`). What
/// they print is `TargetReports`'.

/// How a program's commands find its store and its configured targets.
package protocol TargetStoreOptions: ParsableArguments {
    /// The program, in hints (`scim-broker`, `scim-edge`).
    static var program: String { get }
    /// The process that runs the targets (`broker`, `agent`).
    static var service: String { get }
    /// What `trace` takes.
    static var traceHelp: String { get }
    /// Whether a configuration file was given (then its targets are the known ones).
    var configFile: String? { get }
    /// The store and the configured targets.
    func openTargets() throws -> (any DeliveryTables, [TargetConfiguration])
    /// `openTargets()` for a command about target `name`, which must be known: a mistyped name must not look like success.
    func openTargets(for name: String) throws -> (any DeliveryTables, [TargetConfiguration])
}

func emit(_ line: String) { writeLine(line) }

package struct TargetHeld<Store: TargetStoreOptions>: ParsableCommand {
    package static var configuration: CommandConfiguration {
        CommandConfiguration(
            commandName: "held", abstract: "List the removals the deletion guard holds back for a target.",
            discussion: """
                One line each: the queue sequence (#N, for reject-deletes), the operation, the type and id, \
                the userName or displayName, the source domain, when it was queued, and the trace id.
                """)
    }
    @OptionGroup var options: Store
    @Argument(help: "The target.") var name: String
    @Flag(help: "One JSON document per line.") var json = false

    package init() {}

    package func run() throws {
        let (store, _) = try options.openTargets(for: name)
        for line in try TargetReports.held(store, target: name, json: json) { emit(line) }
    }
}

package struct TargetConfirmDeletes<Store: TargetStoreOptions>: ParsableCommand {
    package static var configuration: CommandConfiguration {
        CommandConfiguration(commandName: "confirm-deletes", abstract: "Release the removals the deletion guard holds back for a target.")
    }
    @OptionGroup var options: Store
    @Argument(help: "The target.") var name: String

    package init() {}

    package func run() throws {
        let (store, _) = try options.openTargets(for: name)
        try store.confirmDeletes(target: name)
        emit("\(name): removals queued so far are released (the guard counts again from now)")
    }
}

package struct TargetRejectDeletes<Store: TargetStoreOptions>: ParsableCommand {
    package static var configuration: CommandConfiguration {
        CommandConfiguration(
            commandName: "reject-deletes", abstract: "Drop removals the deletion guard holds back for a target: they are never sent.",
            discussion: """
                Drops the given held removals (#N from `targets held`), or all of them, from the target's queue and \
                records the rejection in each change's trail. When nothing stays held, the target's removals resume \
                and the guard counts again from then; the accounts stay at the target (reconcile reports them as strays).
                """)
    }
    @OptionGroup var options: Store
    @Argument(help: "The target.") var name: String
    @Argument(help: "Queue sequences of held removals (#N or N); none: all held removals.") var seq: [String] = []

    package init() {}

    package func run() throws {
        let (seqs, bad) = TargetReports.queueSequences(seq)
        if let bad { throw ValidationError("\(bad) is not a queue sequence (#N)") }
        let (store, _) = try options.openTargets(for: name)
        for line in try TargetReports.reject(store, target: name, seqs: seqs) { emit(line) }
    }
}

package struct TargetForget<Store: TargetStoreOptions>: ParsableCommand {
    package static var configuration: CommandConfiguration {
        CommandConfiguration(
            commandName: "forget", abstract: "Clear what the \(Store.service) keeps for a target removed from the configuration.",
            discussion: """
                Removes the target's queued changes, account mappings, dead letters, status and deletion guard. \
                Needs --config, to check that the target is no longer there; run it once the \(Store.service) runs \
                without the target.
                """)
    }
    @OptionGroup var options: Store
    @Argument(help: "The removed target.") var name: String

    package init() {}

    package func run() throws {
        guard let file = options.configFile else {
            throw ValidationError("give --config FILE: forget checks that \(name) is no longer configured")
        }
        let (store, targets) = try options.openTargets()
        guard !targets.contains(where: { $0.name == name }) else {
            throw CommandFailure("\(name) is still a target in \(file); remove it there and restart the \(Store.service) first")
        }
        let stored = try store.storedTargetNames()
        guard stored.contains(name) else {
            throw CommandFailure(
                "nothing stored for a target named '\(name)' (with stored state: \(stored.isEmpty ? "none" : stored.joined(separator: ", ")))"
            )
        }
        emit(TargetReports.forgotten(name, try store.forgetTarget(name)))
    }
}

package struct TargetReconcile<Store: TargetStoreOptions>: ParsableCommand {
    package static var configuration: CommandConfiguration {
        CommandConfiguration(
            commandName: "reconcile", abstract: "Compare a target's users and groups with what the routes say it should hold.",
            discussion: "Reports missing, drifted and stray accounts; --apply queues the fixes for the running \(Store.service).")
    }
    @OptionGroup var options: Store
    @Argument(help: "The target.") var name: String
    @Flag(help: "Queue the fixes: create the missing, fix drift, deactivate the strays the \(Store.service) created.") var apply = false
    @Flag(help: "Print the report as JSON.") var json = false

    package init() {}

    package func run() throws {
        let (store, targets) = try options.openTargets()
        guard let target = targets.first(where: { $0.name == name }) else {
            throw CommandFailure(
                "no target \(name) in the configuration (give --config"
                    + (Store.program == "scim-broker" ? " or --target \(name)=URL)" : ")"))
        }
        let report = try reconcile(store: store, target: target, apply: apply)
        for line in TargetReports.reconciled(name, report, apply: apply, json: json) { emit(line) }
    }
}

package struct TargetTrace<Store: TargetStoreOptions>: ParsableCommand {
    package static var configuration: CommandConfiguration {
        CommandConfiguration(
            commandName: "trace",
            abstract: Store.program == "scim-broker"
                ? "Every hop of a change, with timestamps: agent acceptance, broker apply, each target's answer, each boundary's feed and commit."
                : "Every hop of a change to the local targets, with timestamps and each request's answer.")
    }
    @OptionGroup var options: Store
    @Argument(help: ArgumentHelp(Store.traceHelp)) var id: String
    @Flag(help: "One JSON document per line.") var json = false
    @Option(help: "Print the earliest N hops (the trace of a large change touches many resources).") var limit = 1000

    package init() {}

    package func validate() throws { if limit < 1 { throw ValidationError("--limit must be at least 1") } }

    package func run() throws {
        let (store, _) = try options.openTargets()
        guard let found = try TargetReports.trail(store, id, json: json, limit: limit) else {
            throw CommandFailure("nothing recorded for \(id)")
        }
        if let note = found.note { writeLine(note, fd: 2) }
        for line in found.lines { emit(line) }
    }
}

/// `deadletter list|retry|drop`: changes a target refused for good.
package struct TargetDeadLetters<Store: TargetStoreOptions>: ParsableCommand {
    package static var configuration: CommandConfiguration {
        CommandConfiguration(
            commandName: "deadletter", abstract: "Changes a target refused for good: list, retry or drop them.",
            subcommands: [List.self, Retry.self, Drop.self])
    }

    package init() {}

    package struct List: ParsableCommand {
        package static var configuration: CommandConfiguration {
            CommandConfiguration(commandName: "list", abstract: "The request, the status and the response of each.")
        }
        @OptionGroup var options: Store
        @Option(name: .customLong("for"), help: "Only this target.") var only: String?
        @Flag(help: "One JSON document per line.") var json = false

        package init() {}

        package func run() throws {
            let (store, _) = try only.map { try options.openTargets(for: $0) } ?? options.openTargets()
            for line in try TargetReports.deadLetters(store, only: only, json: json) { emit(line) }
        }
    }

    /// Which dead letters `retry` and `drop` settle.
    package struct Selection: ParsableArguments {
        @OptionGroup var options: Store
        @Argument(help: "The target.") var name: String
        @Argument(help: "The dead letter's number (#N in list); none: all of the target's (drop asks for --all then).") var seq: UInt64?

        package init() {}

        func settle(requeue: Bool) throws -> Int {
            let (store, targets) = try options.openTargets(for: name)
            return try store.settleDeadLetters(
                target: name, seq: seq, requeue: requeue, linkPolicy: targets.first { $0.name == name }?.collisions.linkPolicy)
        }
    }

    package struct Retry: ParsableCommand {
        package static var configuration: CommandConfiguration {
            CommandConfiguration(commandName: "retry", abstract: "Queue dead-lettered resources again (their current state is delivered).")
        }
        @OptionGroup var selection: Selection

        package init() {}

        package func run() throws { emit("\(try selection.settle(requeue: true)) queued again for \(selection.name)") }
    }

    package struct Drop: ParsableCommand {
        package static var configuration: CommandConfiguration {
            CommandConfiguration(commandName: "drop", abstract: "Forget dead letters: one (#N), or every one of the target with --all.")
        }
        @OptionGroup var selection: Selection
        @Flag(help: "Drop every dead letter of the target (without a number).") var all = false

        package init() {}

        /// Forgetting is for good: all of a target's only when asked in so many words.
        package func validate() throws {
            if selection.seq == nil && !all {
                throw ValidationError(
                    "give the dead letter's number (#N in deadletter list), or --all to drop every one of \(selection.name)")
            }
            if selection.seq != nil && all { throw ValidationError("give a number or --all, not both") }
        }

        package func run() throws { emit("\(try selection.settle(requeue: false)) dropped for \(selection.name)") }
    }
}
