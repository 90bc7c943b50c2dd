import ArgumentParser
import EdgeAgent
import EdgeConfig
import EdgeDelivery
import EdgeTargetCommands
import Glibc

/// `scim-edge targets …`: the local targets, read (and, where asked,
/// changed) in the LMDB file beside a running agent: the commands of
/// `scim-broker` (`EdgeTargetCommands`), over the agent's store.
struct Targets: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Local targets (apps inside the boundary): status, dead letters, the deletion guard, reconciliation, trace.",
        subcommands: [
            TargetStatus.self, TargetDeadLetters<TargetStore>.self, TargetHeld<TargetStore>.self, TargetConfirmDeletes<TargetStore>.self,
            TargetRejectDeletes<TargetStore>.self, TargetReconcile<TargetStore>.self, TargetTrace<TargetStore>.self,
            TargetForget<TargetStore>.self,
        ])
}

/// Where the commands find the agent's data and its targets: `--config`
/// (its dataDir and targets), or `--data-dir` alone (the targets the store
/// holds state for).
struct TargetStore: TargetStoreOptions {
    static let program = "scim-edge"
    static let service = "agent"
    static let traceHelp = "A trace id, a resource id here, or a userName."
    @Option(help: "The agent's YAML configuration (its dataDir and targets).") var config: String?
    @Option(help: "The agent's data directory.") var dataDir: String?

    var configFile: String? { config }
    func openTargets() throws -> (any DeliveryTables, [TargetConfiguration]) { try open() }
    func openTargets(for name: String) throws -> (any DeliveryTables, [TargetConfiguration]) { try open(target: name) }

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
