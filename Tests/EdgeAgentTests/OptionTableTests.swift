import EdgeAgent
import EdgeConfig
import EdgeLoop
import EdgeTestSupport
import Foundation
import XCTest

/// The option tables are the one declaration of every option: these tests
/// fail when a generated reference is stale, when a flag exists that the
/// table does not declare (or the reverse), and when the defaults with a
/// file and without one disagree.
final class OptionTableTests: XCTestCase {
    static let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()

    func testConfigurationReferenceIsCurrent() throws {
        let file = Self.root.appendingPathComponent("docs/configuration.md")
        let stored = try String(contentsOf: file, encoding: .utf8)
        let generated = configurationReference()
        if stored != generated {
            let a = stored.split(separator: "\n", omittingEmptySubsequences: false)
            let b = generated.split(separator: "\n", omittingEmptySubsequences: false)
            let first = zip(a, b).enumerated().first { $0.element.0 != $0.element.1 }?.offset ?? min(a.count, b.count)
            XCTFail(
                "docs/configuration.md is stale (run make docs); first difference at line \(first + 1):\n"
                    + "  file:      \(first < a.count ? String(a[first]) : "(end)")\n  generated: \(first < b.count ? String(b[first]) : "(end)")"
            )
        }
        // Every key of both tables is in it, with its default.
        for (key, spec) in AgentOptions.reference.rows + BrokerOptions.reference.rows {
            if let key { XCTAssertTrue(generated.contains("`\(key)`"), key) }
            if let d = spec.defaultValue { XCTAssertTrue(generated.contains("`\(d)`"), "\(key ?? "?") default") }
        }
    }

    /// `serve`'s flags, as ArgumentParser knows them, are exactly the
    /// table's, with the table's help.
    func testServeFlagsAreTheTablesFlags() throws {
        for (program, specs) in [("scim-edge", AgentOptions.all), ("scim-broker", BrokerOptions.all)] {
            let child = try ChildProcess(productsDirectory + "/" + program, ["serve", "--experimental-dump-help"])
            XCTAssertEqual(child.waitForExit(), 0)
            let json = try JSONSerialization.jsonObject(with: Data(child.output.joined(separator: "\n").utf8)) as! [String: Any]
            let command = json["command"] as! [String: Any]
            var flags: [String: String] = [:]
            for argument in command["arguments"] as! [[String: Any]] {
                guard let names = argument["names"] as? [[String: Any]], let long = names.first(where: { $0["kind"] as? String == "long" })
                else { continue }
                flags[long["name"] as! String] = argument["abstract"] as? String ?? ""
            }
            flags["config"] = nil
            flags["help"] = nil
            flags["version"] = nil
            let declared = specs.compactMap(\.flag)
            XCTAssertEqual(Set(flags.keys), Set(declared), "\(program) serve: flags not in the table, or table flags without a flag")
            XCTAssertEqual(declared.count, Set(declared).count, "\(program): a flag declared twice")
            for spec in specs {
                guard let flag = spec.flag else { continue }
                let helpText = spec.kind == .boolean ? spec.help : spec.flagHelp
                XCTAssertEqual(flags[flag], helpText, "\(program) --\(flag)")
            }
        }
    }

    /// With a file and with flags only, a run starts from the same defaults,
    /// and they are the table's.
    func testDefaultsAreTheTablesWithAndWithoutAFile() throws {
        let d = ConfigDiagnostics()
        let fromFile = AgentConfiguration.decode(YAMLNode.parse("dataDir: /d\n", d), d)
        XCTAssertFalse(d.hasErrors, "\(d.problems)")
        var fromFlags = AgentConfiguration.defaults
        try agentOptionTable.apply(flags: [("data-dir", "/d")], to: &fromFlags)
        for c in [fromFile, fromFlags] {
            XCTAssertEqual("\(c.listen)", AgentOptions.listen.defaultValue)
            XCTAssertEqual(c.adminListen.map { "\($0)" }, AgentOptions.adminListen.defaultValue)
            XCTAssertEqual(String(c.limits.maxBodyBytes), AgentOptions.maxBodyBytes.defaultValue)
            XCTAssertEqual(String(c.limits.requestTimeoutMilliseconds), AgentOptions.requestTimeoutMs.defaultValue)
            XCTAssertEqual(String(c.maxStoreBytes), AgentOptions.storeMaxBytes.defaultValue)
            XCTAssertEqual(String(c.endpoint.outboxHighEvents), AgentOptions.outboxMaxEvents.defaultValue)
            XCTAssertEqual(c.endpoint.outboxLowEvents, EndpointOptions.lowWatermark(1_000_000))
            XCTAssertEqual(String(c.endpoint.scanBudget), AgentOptions.scanBudget.defaultValue)
            XCTAssertFalse(c.recordsOutbox, "standalone: nothing would drain the outbox")
            XCTAssertNil(c.relay)
        }
        // The library's own defaults (what a test or embedder gets) agree.
        let library = AgentConfiguration(dataDirectory: "/d", listen: AgentConfiguration.defaultListen)
        XCTAssertEqual(library.limits.maxBodyBytes, fromFile.limits.maxBodyBytes)
        XCTAssertEqual(library.endpoint.recordOutbox, fromFile.endpoint.recordOutbox)
        XCTAssertEqual(library.endpoint.outboxLowBytes, fromFile.endpoint.outboxLowBytes)
        XCTAssertEqual(library.maxStoreBytes, fromFile.maxStoreBytes)

        // A broker section gets the section's defaults when it is created,
        // from the file or from flags.
        let relayFile = try XCTUnwrap(
            AgentConfiguration.decode(
                YAMLNode.parse("dataDir: /d\nbroker: {url: 'https://127.0.0.1:1', ca: a, cert: b, key: c, domain: x}\n", d), d
            ).relay)
        var withFlags = AgentConfiguration.defaults
        try agentOptionTable.apply(
            flags: [("data-dir", "/d"), ("broker", "https://127.0.0.1:1"), ("ca", "a"), ("cert", "b"), ("key", "c"), ("domain", "x")],
            to: &withFlags)
        let relayFlags = try XCTUnwrap(withFlags.relay)
        for r in [relayFile, relayFlags] {
            XCTAssertEqual(r.agentName, AgentOptions.brokerAgent.defaultValue)
            XCTAssertEqual(String(r.window), AgentOptions.window.defaultValue)
            XCTAssertEqual(String(r.maxEventsPerBatch), AgentOptions.maxEventsPerBatch.defaultValue)
        }
        XCTAssertTrue(withFlags.recordsOutbox)
    }

    /// Flags are checked by the table: bounds, kinds, and what a section
    /// needs, every problem in one run.
    func testFlagsAreCheckedByTheTable() {
        var c = AgentConfiguration.defaults
        XCTAssertThrowsError(
            try agentOptionTable.apply(
                flags: [("max-body-bytes", "10"), ("listen", "nowhere"), ("workers", "99"), ("broker", "https://127.0.0.1:9")], to: &c)
        ) { error in
            let lines = (error as! OptionProblems).lines
            XCTAssertTrue(lines.contains("--max-body-bytes must be 1,024 to 1,073,741,824, got 10"), "\(lines)")
            XCTAssertTrue(lines.contains("--listen must be HOST:PORT, got 'nowhere'"), "\(lines)")
            XCTAssertTrue(lines.contains { $0.hasPrefix("--workers 99: must be auto or a number from 1 to 64") }, "\(lines)")
            XCTAssertTrue(lines.contains { $0.hasPrefix("--broker needs --ca:") }, "\(lines)")
            XCTAssertTrue(lines.contains { $0.hasPrefix("--broker needs --domain:") }, "\(lines)")
        }
        // From a file, a section's options may come from the file.
        var fromFile = AgentConfiguration.defaults
        XCTAssertNoThrow(
            try agentOptionTable.apply(
                flags: [("broker", "https://127.0.0.1:9")], to: &fromFile,
                fromFile: ["dataDir", "broker.ca", "broker.cert", "broker.key", "broker.domain"]))
        // Out of bounds in the file is an error at its line, never clamped.
        let d = ConfigDiagnostics()
        _ = AgentConfiguration.decode(YAMLNode.parse("dataDir: /d\nscim:\n  maxResults: 0\nbroker: {window: 0}\n", d), d)
        XCTAssertTrue(
            d.problems.contains { $0.description.contains("3:15: scim.maxResults: must be 1 to 100,000, got 0") }, "\(d.problems)")
        XCTAssertTrue(d.problems.contains { $0.description.contains("broker.url: is required") }, "\(d.problems)")
    }

    /// A file written through the table is one the agent reads back as
    /// written; a value the agent would refuse fails when it is written.
    func testConfigDocumentRoundTrips() throws {
        var doc = ConfigDocument()
        try doc.set(AgentOptions.dataDir, "/var/lib/x y")
        try doc.set(AgentOptions.listen, "127.0.0.1:8081")
        try doc.set(AgentOptions.maxBodyBytes, 4096)
        try doc.set(AgentOptions.keepOutbox, "true")
        try doc.set(AgentOptions.profile, "strict")
        var policy = ConfigDocument()
        policy.set(AgentOptions.policyScope, map: [("User", #"userType eq "Contractor""#)])
        doc.set(AgentOptions.policy, policy)
        let d = ConfigDiagnostics()
        let c = AgentConfiguration.decode(YAMLNode.parse(doc.yaml(), d), d)
        XCTAssertFalse(d.hasErrors, "\(d.problems)\n\(doc.yaml())")
        XCTAssertEqual(c.dataDirectory, "/var/lib/x y")
        XCTAssertEqual(c.listen.port, 8081)
        XCTAssertEqual(c.limits.maxBodyBytes, 4096)
        XCTAssertTrue(c.recordsOutbox)
        XCTAssertEqual(c.endpoint.profile, .strict)
        XCTAssertNotNil(c.policy)
        XCTAssertThrowsError(try doc.set(AgentOptions.maxBodyBytes, 1)) { XCTAssertTrue("\($0)".contains("must be 1,024 to")) }
        XCTAssertThrowsError(try doc.set(AgentOptions.profile, "strikt")) { XCTAssertTrue("\($0)".contains("did you mean 'strict'")) }
    }
}
