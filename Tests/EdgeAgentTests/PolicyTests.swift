import EdgeAgent
import EdgeConfig
import EdgeDelivery
import EdgeHTTP
import EdgeLoop
import EdgeTLS
import EdgeTestSupport
import Foundation
import SCIM
import XCTest

let enterprise = "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User"
let pseudonymKey = Array("0123456789abcdef0123456789abcdef".utf8)

/// Invariant 5: data marked local never leaves its boundary.
final class PolicyTests: XCTestCase {
    func policy(
        _ attributes: [(String, AttributeRule)] = [], types: [String: Bool] = [:],
        scopes: [String: String] = [:]
    ) throws -> LocalPolicy {
        try LocalPolicy(registry: .standard, resourceTypes: types, attributes: attributes, scopes: scopes, pseudonymKey: pseudonymKey)
    }

    func events(_ agent: AgentHarness) throws -> [(kind: String, ref: String, data: JSON?)] {
        try agent.openStore().outboxEntries(after: 0, limit: 10_000).map { _, e in
            let (uri, body) = e["events"]!.objectValue!.members.first!
            return (String(uri.dropFirst("urn:ietf:params:SCIM:event:".count)), body["ref"]!.stringValue!, body["data"])
        }
    }

    func testKeepLocalNeverLeavesAndPseudonymsAreStable() throws {
        let p = try policy([
            ("phoneNumbers", .keepLocal), ("addresses", .keepLocal),
            ("\(enterprise):employeeNumber", .pseudonymize), ("emails.type", .keepLocal),
        ])
        let agent = try AgentHarness { $0.policy = p }
        let body =
            #"{"schemas":["urn:ietf:params:scim:schemas:core:2.0:User","\#(enterprise)"],"userName":"sec","phoneNumbers":[{"value":"+41 555 0100","type":"work"}],"addresses":[{"locality":"Zug"}],"emails":[{"value":"sec@x.ch","type":"work"}],"\#(enterprise)":{"employeeNumber":"E-7","department":"Ops"}}"#
        let id = try XCTUnwrap(try agent.call("POST", "/Users", body).body?["id"]?.stringValue)
        // A change that stays inside the boundary sends nothing.
        XCTAssertEqual(
            try agent.call(
                "PATCH", "/Users/\(id)",
                #"{"schemas":["urn:ietf:params:scim:api:messages:2.0:PatchOp"],"Operations":[{"op":"replace","path":"phoneNumbers","value":[{"value":"+41 555 0199"}]}]}"#
            ).status, 200)
        XCTAssertEqual(
            try agent.call(
                "PATCH", "/Users/\(id)",
                #"{"schemas":["urn:ietf:params:scim:api:messages:2.0:PatchOp"],"Operations":[{"op":"replace","path":"title","value":"Head"}]}"#
            ).status, 200)
        XCTAssertEqual(agent.stop(), 0)

        let e = try events(agent)
        XCTAssertEqual(e.map(\.kind), ["prov:create:full", "prov:patch:full"], "the phone change sent nothing")
        let data = try XCTUnwrap(e[0].data)
        XCTAssertNil(data["phoneNumbers"])
        XCTAssertNil(data["addresses"])
        XCTAssertEqual(data["emails"], [["value": "sec@x.ch"]], "a kept-local sub-attribute is removed")
        let expected = hexString(hmacSHA256(key: pseudonymKey, message: Array("E-7".utf8)))
        XCTAssertEqual(data[enterprise]?["employeeNumber"]?.stringValue, expected)
        XCTAssertEqual(data[enterprise]?["department"], "Ops", "other attributes propagate")
        // Nothing local anywhere in the outbox, byte for byte.
        let outbox = try agent.openStore().outboxEntries(after: 0, limit: 100).map { $0.1.text }.joined()
        for secret in ["555 0100", "555 0199", "Zug", "E-7", "\"work\""] {
            XCTAssertFalse(outbox.contains(secret), "'\(secret)' reached the outbox")
        }

        // Stable across restarts: the same key gives the same pseudonym.
        let again = try AgentHarness { $0.policy = p }
        _ = try again.call(
            "POST", "/Users",
            #"{"schemas":["urn:ietf:params:scim:schemas:core:2.0:User","\#(enterprise)"],"userName":"other","\#(enterprise)":{"employeeNumber":"E-7"}}"#
        )
        XCTAssertEqual(again.stop(), 0)
        XCTAssertEqual(try events(again).first?.data?[enterprise]?["employeeNumber"]?.stringValue, expected)
    }

    func testScopeTransitionsAndGroupMembers() throws {
        let p = try policy(scopes: ["User": #"userType eq "Contractor""#])
        let agent = try AgentHarness { $0.policy = p }
        func patchType(_ id: String, _ t: String) throws {
            XCTAssertEqual(
                try agent.call(
                    "PATCH", "/Users/\(id)",
                    #"{"schemas":["urn:ietf:params:scim:api:messages:2.0:PatchOp"],"Operations":[{"op":"replace","path":"userType","value":"\#(t)"}]}"#
                ).status, 200)
        }
        let emp = try XCTUnwrap(
            try agent.call("POST", "/Users", userBody("emp", extra: #","userType":"Employee""#)).body?["id"]?.stringValue)
        let con = try XCTUnwrap(
            try agent.call("POST", "/Users", userBody("con", extra: #","userType":"Contractor""#)).body?["id"]?.stringValue)
        let gid = try XCTUnwrap(
            try agent.call(
                "POST", "/Groups",
                #"{"schemas":["urn:ietf:params:scim:schemas:core:2.0:Group"],"displayName":"Mixed","members":[{"value":"\#(emp)"},{"value":"\#(con)"}]}"#
            ).body?["id"]?.stringValue)
        try patchType(emp, "Contractor")  // enters the scope
        try patchType(con, "Employee")  // leaves it
        XCTAssertEqual(try agent.call("DELETE", "/Users/\(con)").status, 204)  // already outside: nothing
        XCTAssertEqual(agent.stop(), 0)

        let e = try events(agent)
        XCTAssertEqual(
            e.map { "\($0.kind) \($0.ref)" },
            [
                "prov:create:full /Users/\(con)",
                "prov:create:full /Groups/\(gid)",
                "prov:create:full /Users/\(emp)",
                "prov:patch:full /Groups/\(gid)",
                // Leaving: the group loses it before it goes (the broker names the member while it holds it).
                "prov:patch:full /Groups/\(gid)",
                "prov:delete /Users/\(con)",
            ])
        func members(_ k: Int) -> [String] { e[k].data?["members"]?.arrayValue?.compactMap { $0["value"]?.stringValue } ?? [] }
        XCTAssertEqual(members(1), [con], "the employee never left, so the group lists only the contractor")
        XCTAssertEqual(Set(members(3)), [emp, con], "entering the scope adds the member to the group's event")
        XCTAssertEqual(members(4), [emp], "leaving the scope removes it")
    }

    func testTypeKeptLocalAndChangedPolicyReconciledAtStart() throws {
        let agent = try AgentHarness()  // everything propagates
        _ = try agent.call("POST", "/Users", userBody("r1", extra: #","phoneNumbers":[{"value":"555"}]"#))
        _ = try agent.call("POST", "/Groups", #"{"schemas":["urn:ietf:params:scim:schemas:core:2.0:Group"],"displayName":"G"}"#)
        XCTAssertEqual(agent.stop(), 0)
        XCTAssertEqual(try events(agent).count, 2)

        // Same data, stricter policy: phones stay, groups stay inside.
        let p = try policy([("phoneNumbers", .keepLocal)], types: ["Group": false])
        let path = agent.dir.file("data"), token = agent.token
        let thread = try LoopThread.start { loop in
            var config = AgentConfiguration(dataDirectory: path, listen: SocketAddress(host: "127.0.0.1", port: 0))
            config.tokens = [token]
            config.endpoint.recordOutbox = true
            config.policy = p
            let service = try AgentService(loop: loop, configuration: config)
            service.shutdown()
        }
        XCTAssertEqual(thread.join(), 0)
        let e = try events(agent)
        XCTAssertEqual(
            e.suffix(2).map(\.kind), ["prov:put:full", "prov:delete"], "the user is re-sent without phones, the group withdrawn")
        XCTAssertNil(e[e.count - 2].data?["phoneNumbers"])
        // A second start with the same policy changes nothing.
        let count = e.count
        let second = try LoopThread.start { loop in
            var config = AgentConfiguration(dataDirectory: path, listen: SocketAddress(host: "127.0.0.1", port: 0))
            config.tokens = [token]
            config.endpoint.recordOutbox = true
            config.policy = p
            try AgentService(loop: loop, configuration: config).shutdown()
        }
        XCTAssertEqual(second.join(), 0)
        XCTAssertEqual(try events(agent).count, count)
    }

    func testPolicyErrors() {
        XCTAssertThrowsError(try policy([("userName", .keepLocal)])) { XCTAssertTrue("\($0)".contains("pseudonymize it instead")) }
        XCTAssertThrowsError(try policy([("id", .pseudonymize)])) { XCTAssertTrue("\($0)".contains("always leaves")) }
        XCTAssertThrowsError(try policy([("shoeSize", .keepLocal)])) { XCTAssertTrue("\($0)".contains("not an attribute")) }
        XCTAssertThrowsError(try policy([("active", .pseudonymize)])) { XCTAssertTrue("\($0)".contains("not a string")) }
        XCTAssertThrowsError(try policy(scopes: ["User": "userType eq"])) {
            XCTAssertTrue("\($0)".contains("policy.scope.User: not a valid SCIM filter"))
        }
        XCTAssertThrowsError(try LocalPolicy(registry: .standard, attributes: [("userName", .pseudonymize)])) {
            XCTAssertTrue("\($0)".contains("needs a pseudonym key"))
        }
        XCTAssertNoThrow(try policy([("userName", .pseudonymize), ("name.givenName", .keepLocal)]))
    }
}

final class ConfigTests: XCTestCase {
    /// Decodes as `serve` does: every problem of the text, YAML and configuration alike.
    func decode(_ yaml: String) throws -> AgentConfiguration {
        let d = ConfigDiagnostics()
        let config = AgentConfiguration.decode(YAMLNode.parse(yaml, d), d)
        try d.failIfErrors()
        return config
    }

    /// One of the problems holds `fragment` (and is at `line`, `column`).
    func fails(
        _ yaml: String, _ fragment: String, line: Int? = nil, column: Int? = nil,
        file: StaticString = #filePath, lineNo: UInt = #line
    ) {
        XCTAssertThrowsError(try decode(yaml), file: file, line: lineNo) { error in
            let all = (error as! ConfigProblems).errors
            guard let e = all.first(where: { $0.description.contains(fragment) }) else {
                return XCTFail("'\(fragment)' not in \(all)", file: file, line: lineNo)
            }
            if let line { XCTAssertEqual(e.mark?.line, line, "\(e)", file: file, line: lineNo) }
            if let column { XCTAssertEqual(e.mark?.column, column, "\(e)", file: file, line: lineNo) }
        }
    }

    func testWorkersIsAutoOrABoundedNumber() throws {
        XCTAssertEqual(try decode("dataDir: /tmp/x\nworkers: 3\n").servingLoops, 3)
        let cpus = Int(sysconf(Int32(_SC_NPROCESSORS_ONLN)))
        XCTAssertEqual(try decode("dataDir: /tmp/x\n").servingLoops, max(1, min(16, cpus)), "auto by default")
        XCTAssertEqual(try decode("dataDir: /tmp/x\nworkers: auto\n").servingLoops, max(1, min(16, cpus)))
        fails("dataDir: /tmp/x\nworkers: 0\n", "workers: must be auto or a number from 1 to 64", line: 2)
        fails("dataDir: /tmp/x\nworkers: many\n", "got 'many'", line: 2)
    }

    /// `targets:` takes the broker's keys for an app; a url, a name of its
    /// own and routes a local agent can judge are required; a route naming
    /// a domain that never reaches this boundary is a warning.
    func testLocalTargetsTakeTheBrokersAppKeys() throws {
        let config = try decode(
            """
            dataDir: /tmp/x
            targets:
              - name: wiki
                url: https://wiki.internal:8443/scim/v2
                rate: {requestsPerSecond: 5, concurrency: 2}
                onRemove: delete
                deleteGuard: {maxDeletes: 3}
                collisions: namespace
                maxMembersPerPatch: 50
                routes: [{domains: [local], types: [User]}, {filter: "displayName sw \\"eng\\"", types: [Group]}]

            """)
        let t = try XCTUnwrap(config.targets.first)
        XCTAssertEqual(t.name, "wiki")
        XCTAssertEqual(t.host, "wiki.internal")
        XCTAssertTrue(t.useTLS)
        XCTAssertEqual(t.basePath, "/scim/v2")
        XCTAssertEqual(t.requestsPerSecond, 5)
        XCTAssertEqual(t.removal, .delete)
        XCTAssertEqual(t.deletionGuard.maxDeletes, 3)
        XCTAssertEqual(t.maxMembersPerPatch, 50)
        XCTAssertEqual(t.collisions, .namespace(userName: "{userName}@{domain}", displayName: "{displayName} ({domain})"))
        XCTAssertEqual(t.routes.count, 2)
        fails("dataDir: /tmp/x\ntargets:\n  - name: a\n    routes: [{}]\n", "targets[0].url: is required")
        fails("dataDir: /tmp/x\ntargets:\n  - url: http://127.0.0.1:1\n    routes: [{}]\n", "targets[0].name: is required")
        fails(
            "dataDir: /tmp/x\ntargets:\n  - {name: a, url: http://127.0.0.1:1, routes: [{}]}\n  - {name: a, url: http://127.0.0.1:2, routes: [{}]}\n",
            "target 'a' is defined twice", line: 4)
        fails(
            "dataDir: /tmp/x\ntargets:\n  - {name: a, url: http://127.0.0.1:1, routes: [{types: [Group], filter: 'members pr'}]}\n",
            "cannot filter groups on their members")
        fails("dataDir: /tmp/x\ntargets:\n  - {name: a, url: http://127.0.0.1:1, domain: hq, routes: [{}]}\n", "domain")
        let d = ConfigDiagnostics()
        _ = AgentConfiguration.decode(
            YAMLNode.parse("dataDir: /tmp/x\ntargets:\n  - {name: a, url: http://127.0.0.1:1, routes: [{domains: [hq]}]}\n", d), d)
        XCTAssertNoThrow(try d.failIfErrors())
        XCTAssertTrue(
            d.problems.contains {
                $0.isWarning && $0.description.contains("neither this agent's (local) nor one its inbound policy accepts")
            },
            "\(d.problems)")
    }

    /// `pki csr` → the organisation's CA (openssl here) signs → check-config
    /// accepts the certificate as this domain's agent.
    func testSigningRequestCarriesTheIdentityCheckConfigExpects() throws {
        let dir = TempDirectory("edge-csr")
        defer { dir.remove() }
        func run(_ exe: String, _ args: [String]) throws -> (Int32, [String]) {
            let c = try ChildProcess(exe, args)
            let status = c.waitForExit(seconds: 30)
            return (status ?? -1, c.output)
        }
        let csr = try run(
            productsDirectory + "/scim-edge",
            [
                "pki", "csr", "--domain", "acme-de", "--agent", "agent-7",
                "--trust-domain", "acme.example", "--out", dir.path,
            ])
        XCTAssertEqual(csr.0, 0, "\(csr.1)")
        XCTAssertTrue(csr.1.contains("identity: spiffe://acme.example/acme-de/agent-7"), "\(csr.1)")
        var st = stat()
        XCTAssertEqual(stat(dir.file("agent.key"), &st), 0)
        XCTAssertEqual(st.st_mode & 0o777, 0o600, "the key is private")
        XCTAssertNotEqual(
            try run(
                productsDirectory + "/scim-edge",
                [
                    "pki", "csr", "--domain", "acme-de", "--agent", "agent-7",
                    "--out", dir.path,
                ]
            ).0, 0, "never overwrites a key")
        // The organisation's CA, made and used with the openssl CLI.
        let openssl = "/usr/bin/openssl"
        XCTAssertEqual(
            try run(
                openssl,
                [
                    "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                    "-keyout", dir.file("ca.key"), "-out", dir.file("ca.crt"), "-subj", "/CN=Acme CA", "-days", "2",
                ]
            ).0, 0)
        XCTAssertEqual(
            try run(
                openssl,
                [
                    "x509", "-req", "-in", dir.file("agent.csr"), "-CA", dir.file("ca.crt"), "-CAkey", dir.file("ca.key"),
                    "-CAcreateserial", "-out", dir.file("agent.crt"), "-days", "1", "-copy_extensions", "copy",
                ]
            ).0, 0)
        let config = dir.write(
            "agent.yaml",
            """
            dataDir: \(dir.file("data"))
            broker:
              url: https://127.0.0.1:8443
              ca: \(dir.file("ca.crt"))
              cert: \(dir.file("agent.crt"))
              key: \(dir.file("agent.key"))
              domain: acme-de
              agent: agent-7

            """)
        let ok = try run(productsDirectory + "/scim-edge", ["check-config", config])
        XCTAssertEqual(ok.0, 0, "\(ok.1)")
        let other = dir.write(
            "other.yaml",
            try String(contentsOfFile: config, encoding: .utf8).replacingOccurrences(of: "agent: agent-7", with: "agent: agent-8"))
        let wrong = try run(productsDirectory + "/scim-edge", ["check-config", other])
        XCTAssertEqual(wrong.0, 1)
        XCTAssertTrue(
            wrong.1.contains {
                $0.contains("names spiffe://acme.example/acme-de/agent-7") && $0.contains("not domain 'acme-de' and agent 'agent-8'")
            },
            "\(wrong.1)")
    }

    func testShippedExampleConfigIsValid() throws {
        let source = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
            .deletingLastPathComponent().appendingPathComponent("packaging/agent.example.yaml")
        let dir = TempDirectory("edge-config")
        defer { dir.remove() }
        _ = dir.write("pseudonym.key", String(repeating: "k", count: 32))
        _ = dir.write("tokens", "# comment\nabcdefghijklmnop-1\n\nabcdefghijklmnop-2\n")
        let text = try String(contentsOf: source, encoding: .utf8).replacingOccurrences(of: "/etc/scim-edge", with: dir.path)
        let path = dir.write("agent.yaml", text)
        let config = try AgentConfiguration.load(file: path)
        XCTAssertEqual(config.dataDirectory, "/var/lib/scim-edge")
        XCTAssertEqual(config.listen.port, 8080)
        XCTAssertEqual(config.adminListen?.port, 9180)
        XCTAssertEqual(config.endpoint.outboxHighEvents, 1_000_000)
        XCTAssertTrue(config.recordsOutbox)
        XCTAssertNotNil(config.policy)
        XCTAssertEqual(config.relay?.domain, "acme-de")
        XCTAssertEqual(config.relay?.broker.port, 8443)
        XCTAssertEqual(config.relay?.window, 16)
        XCTAssertEqual(try readTokenFile(config.tokenFile!), ["abcdefghijklmnop-1", "abcdefghijklmnop-2"])
        // check-config also checks the files: with none of them there, it fails and names each.
        let missing = try ChildProcess(productsDirectory + "/scim-edge", ["check-config", path])
        XCTAssertEqual(missing.waitForExit(), 1)
        XCTAssertTrue(
            missing.output.contains { $0.contains("agent.yaml:39:9: broker.cert: \(dir.path)/agent.crt: No such file or directory") },
            "\(missing.output)")
        XCTAssertTrue(missing.output.contains { $0.contains("agent.yaml:38:7: broker.ca: \(dir.path)/federation-ca.crt: No such file") })
        // A federation PKI made here: the agent's certificate names its domain and agent.
        let ca = try CertificateAuthority(commonName: "federation CA")
        _ = dir.write("federation-ca.crt", ca.certificatePEM)
        func install(_ c: Credential) {
            _ = dir.write("agent.crt", c.certificatePEM)
            _ = dir.write("agent.key", c.privateKeyPEM)
            chmod(dir.file("agent.key"), 0o600)
        }
        chmod(dir.file("tokens"), 0o640)
        chmod(dir.file("pseudonym.key"), 0o600)
        install(
            try ca.issue(
                CertificateRequest(
                    commonName: "agent-1.acme-de", uris: [agentIdentity(trustDomain: "acme.example", domain: "acme-de", agent: "agent-1")]))
        )
        let ok = try ChildProcess(productsDirectory + "/scim-edge", ["check-config", path])
        XCTAssertEqual(ok.waitForExit(), 0, "\(ok.output)")
        XCTAssertTrue(ok.output.first?.hasSuffix("relaying domain acme-de as agent-1)") ?? false, "\(ok.output)")

        func problems(_ fragment: String) throws {
            let c = try ChildProcess(productsDirectory + "/scim-edge", ["check-config", path])
            XCTAssertEqual(c.waitForExit(), 1)
            XCTAssertTrue(c.output.contains { $0.contains(fragment) }, "'\(fragment)' not in \(c.output)")
        }
        install(try ca.issue(CertificateRequest(commonName: "x", uris: ["spiffe://acme.example/acme-us/agent-1"])))
        try problems("not domain 'acme-de' and agent 'agent-1'")
        install(
            try ca.issue(
                CertificateRequest(
                    commonName: "x", uris: ["spiffe://acme.example/acme-de/agent-1"],
                    notBeforeOffset: -20 * 86400, notAfterOffset: -86400)))
        try problems("expired on")
        install(
            try CertificateAuthority(commonName: "someone else").issue(
                CertificateRequest(commonName: "x", uris: ["spiffe://acme.example/acme-de/agent-1"])))
        try problems("is not accepted by the CA")
        install(try ca.issue(CertificateRequest(commonName: "x", uris: ["spiffe://acme.example/acme-de/agent-1"])))
        chmod(dir.file("agent.key"), 0o644)
        try problems("broker.key: \(dir.path)/agent.key: a secret readable by every user")
        chmod(dir.file("agent.key"), 0o600)
        chmod(dir.file("tokens"), 0o604)
        try problems("tokenFile: \(dir.path)/tokens: a secret readable by every user")
    }

    /// One run names every problem at its own line, where the
    /// first one used to hide the rest.
    func testCheckConfigReportsEveryProblemInOneRun() throws {
        let dir = TempDirectory("edge-check-all")
        defer { dir.remove() }
        _ = dir.write("pseudonym.key", String(repeating: "k", count: 32))
        chmod(dir.file("pseudonym.key"), 0o644)
        _ = dir.write("tokens", "a-long-enough-idp-token-1234\n")
        chmod(dir.file("tokens"), 0o640)
        let config = dir.write(
            "agent.yaml",
            """
            dataDir: \(dir.file("data"))
            tokenFile: \(dir.file("tokens"))
            lisen: 127.0.0.1:8080
            broker:
              url: https://127.0.0.1:8443
              ca: \(dir.file("ca.crt"))
              cert: \(dir.file("agent.crt"))
              key: \(dir.file("agent.key"))
              domain: acme-de
            policy:
              scope:
                User: 'userType eq'
              pseudonymKeyFile: \(dir.file("pseudonym.key"))
            admin: {listen: 127.0.0.1:9180}
            admin: {listen: none}
            limits: {maxBodyBytes: *size}

            """)
        let c = try ChildProcess(productsDirectory + "/scim-edge", ["check-config", config])
        XCTAssertEqual(c.waitForExit(), 1)
        for expected in [
            "\(config):3:1: lisen: unknown key; did you mean 'listen'? (fix: rename it to 'listen')",
            "\(config):6:7: broker.ca: \(dir.file("ca.crt")): No such file or directory",
            "\(config):7:9: broker.cert: \(dir.file("agent.crt")): No such file or directory",
            "\(config):12:11: policy.scope.User: not a valid SCIM filter for User",
            "\(config):13:21: policy.pseudonymKeyFile: \(dir.file("pseudonym.key")): a secret readable by every user (mode 0644",
            "\(config):15:1: admin: appears twice (first at line 14)",
            "\(config):16:24: limits.maxBodyBytes: YAML aliases are not supported",
        ] {
            XCTAssertTrue(c.output.contains { $0.hasPrefix(expected) }, "'\(expected)' not in \(c.output)")
        }
        XCTAssertEqual(c.output.last, "\(config): 8 problems", "the key file is missing too: \(c.output)")

        // A syntax error ends the parse, but what came before it is still checked.
        let broken = dir.write("broken.yaml", "dataDir: \(dir.file("data"))\nworkers: many\nlimits: {maxBodyBytes: 1\n")
        let b = try ChildProcess(productsDirectory + "/scim-edge", ["check-config", broken])
        XCTAssertEqual(b.waitForExit(), 1)
        XCTAssertTrue(b.output.contains { $0.hasPrefix("\(broken):2:10: workers: must be auto or a number from 1 to 64") }, "\(b.output)")
        XCTAssertTrue(b.output.contains { $0.hasPrefix("\(broken):4:1: YAML syntax:") }, "\(b.output)")
        // And serve refuses to start with all of them, not just the first.
        let serve = try ChildProcess("/bin/sh", ["-c", "'\(productsDirectory)/scim-edge' serve --config '\(config)' 2>&1"])
        XCTAssertNotEqual(serve.waitForExit(), 0)
        XCTAssertTrue(
            serve.output.joined(separator: "\n").contains("policy.scope.User") && serve.output.joined(separator: "\n").contains("lisen"),
            "\(serve.output)")
    }

    /// `--as-user`: root reads everything; the service's user may not. A
    /// root-owned 0600 key passes for root and fails for `nobody`, at its line.
    func testCheckConfigAsTheServiceUser() throws {
        guard getuid() == 0 else { throw XCTSkip("checking as another user needs root") }
        let nobody = try XCTUnwrap(getpwnam("nobody")?.pointee)
        let dir = TempDirectory("edge-as-user")
        defer { dir.remove() }
        chmod(dir.path, 0o755)
        _ = dir.write("pseudonym.key", String(repeating: "k", count: 32))
        chmod(dir.file("pseudonym.key"), 0o600)
        mkdir(dir.file("data"), 0o750)
        chown(dir.file("data"), nobody.pw_uid, nobody.pw_gid)
        let config = dir.write(
            "agent.yaml",
            """
            dataDir: \(dir.file("data"))
            policy:
              attributes:
                externalId: pseudonymize
              pseudonymKeyFile: \(dir.file("pseudonym.key"))

            """)
        chmod(config, 0o644)
        func check(_ args: [String]) throws -> (Int32?, [String]) {
            let c = try ChildProcess(productsDirectory + "/scim-edge", ["check-config"] + args + [config])
            return (c.waitForExit(), c.output)
        }
        let root = try check([])
        XCTAssertEqual(root.0, 0, "\(root.1)")
        let denied = try check(["--as-user", "nobody"])
        XCTAssertEqual(denied.0, 1, "\(denied.1)")
        XCTAssertTrue(
            denied.1.contains {
                $0.hasPrefix("\(config):5:21: policy.pseudonymKeyFile: \(dir.file("pseudonym.key")): user nobody cannot read it")
            },
            "\(denied.1)")
        XCTAssertEqual(denied.1.count, 2, "only the key: \(denied.1)")
        // Given to the user's group, it passes (and root is still itself afterwards: the key is read as root again).
        chown(dir.file("pseudonym.key"), 0, nobody.pw_gid)
        chmod(dir.file("pseudonym.key"), 0o640)
        let allowed = try check(["--as-user", "nobody"])
        XCTAssertEqual(allowed.0, 0, "\(allowed.1)")
        XCTAssertTrue(allowed.1.last?.hasSuffix("readable by nobody)") ?? false, "\(allowed.1)")
        XCTAssertNotEqual(try check(["--as-user", "no-such-user-here"]).0, 0)
    }

    func testStrictErrorsWithLineAndColumn() throws {
        fails("dataDir: /d\nlisten: 127.0.0.1:1\nlsten: x\n", "lsten: unknown key; did you mean 'listen'?", line: 3, column: 1)
        fails("dataDir: /d\nlimits:\n  maxBodyBytes: lots\n", "limits.maxBodyBytes: must be an integer", line: 3, column: 17)
        fails(
            "dataDir: /d\nlimits:\n  maxBodyByte: 1\n", "limits.maxBodyByte: unknown key; did you mean 'maxBodyBytes'?", line: 3, column: 3)
        fails("dataDir: /d\ndataDir: /e\n", "appears twice", line: 2)
        fails("listen: 127.0.0.1:1\n", "dataDir: is required")
        fails("dataDir: /d\nlisten: nowhere\n", "listen: must be HOST:PORT")
        fails("dataDir: /d\noutbox:\n  keep: maybe\n", "must be true or false")
        fails("dataDir: /d\nscim:\n  profile: loose\n", "lenient or strict")
        fails("dataDir: /d\npolicy:\n  attributes:\n    phoneNumbers: hide\n", "keep-local or pseudonymize", line: 4)
        fails("dataDir: /d\npolicy:\n  attributes:\n    userName: keep-local\n", "pseudonymize it instead")
        fails("dataDir: &a /d\nlisten: *a\n", "aliases are not supported")
        fails("dataDir: [unclosed\n", "YAML syntax:")
        fails("dataDir: /d\nbroker:\n  url: http://x:1\n", "https://HOST:PORT")
        fails("dataDir: /d\nbroker:\n  url: https://127.0.0.1:1\n  ca: a\n", "broker.cert: is required")
        XCTAssertEqual(try decode("dataDir: /d\noutbox:\n  maxEvents: 1_000\n").endpoint.outboxLowEvents, 800)
        // One rule for the low watermarks, whoever sets the high ones: the built-in defaults, the file, the flags.
        let defaults = EndpointOptions()
        XCTAssertEqual(defaults.outboxLowEvents, EndpointOptions.lowWatermark(defaults.outboxHighEvents))
        XCTAssertEqual(defaults.outboxLowBytes, EndpointOptions.lowWatermark(defaults.outboxHighBytes))
        let fromFile = try decode("dataDir: /d\noutbox:\n  maxEvents: 1_000_003\n  maxBytes: 1_073_741_827\n").endpoint
        var fromFlags = EndpointOptions()
        fromFlags.limitOutbox(events: 1_000_003, bytes: 1_073_741_827)
        XCTAssertEqual(fromFile.outboxLowEvents, fromFlags.outboxLowEvents)
        XCTAssertEqual(fromFile.outboxLowBytes, fromFlags.outboxLowBytes)
        XCTAssertEqual(fromFile.outboxLowBytes, 1_073_741_827 - 1_073_741_827 / 5)
        XCTAssertEqual(try decode("dataDir: /d\n").adminListen, AgentConfiguration.defaultAdminListen)
        XCTAssertEqual(try decode("dataDir: /d\n").listen, AgentConfiguration.defaultListen)
    }
}

final class AgentProcessTests: XCTestCase {
    func start(_ args: [String]) throws -> (ChildProcess, Int) {
        let child = try ChildProcess(
            productsDirectory + "/scim-edge", ["serve", "--listen", "127.0.0.1:0", "--admin-listen", "none"] + args)
        let line = try XCTUnwrap(child.waitForLine("scim-edge"), "agent did not start: \(child.output)")
        return (child, Int(line.split(separator: " ")[4].split(separator: ":")[1])!)
    }

    func status(_ port: Int, token: String) throws -> Int {
        let c = try RawClient(port: port)
        c.send("GET /scim/v2/Users HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer \(token)\r\nConnection: close\r\n\r\n")
        return c.readResponses(1).first?.status ?? 0
    }

    func testServingLoopsTakeTurnsAndAllDrainOnSIGTERM() throws {
        let dir = TempDirectory("edge-loops")
        defer { dir.remove() }
        let tokens = dir.write("tokens", "first-token\n")
        let (child, port) = try start(["--data-dir", dir.file("data"), "--token-file", tokens, "--workers", "3"])
        // Consecutive connections go to the next loop: all of them see the reloaded tokens.
        _ = dir.write("tokens", "second-token\n")
        child.signal(SIGHUP)
        XCTAssertNotNil(child.waitForLine("reloaded 1 tokens"), "\(child.output)")
        for _ in 0..<6 {
            XCTAssertEqual(try status(port, token: "second-token"), 200)
            XCTAssertEqual(try status(port, token: "first-token"), 401)
        }
        // A connection kept open on a serving loop does not stop the drain.
        let idle = try RawClient(port: port)
        idle.send("GET /scim/v2/Users HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer second-token\r\n\r\n")
        XCTAssertEqual(idle.readResponses(1).first?.status, 200)
        child.signal(SIGTERM)
        XCTAssertEqual(child.waitForExit(), 0)
        XCTAssertTrue(child.output.contains { $0.contains("\"drained\"") }, "\(child.output)")
        XCTAssertFalse(child.output.contains { $0.contains("still open") }, "every loop closed its handles: \(child.output)")
        XCTAssertThrowsError(try RawClient(port: port), "nothing listens any more")
    }

    func testTokensAreReloadedOnSIGHUP() throws {
        let dir = TempDirectory("edge-hup")
        defer { dir.remove() }
        let tokens = dir.write("tokens", "first-token\n")
        let (child, port) = try start(["--data-dir", dir.file("data"), "--token-file", tokens])
        XCTAssertEqual(try status(port, token: "first-token"), 200)
        XCTAssertEqual(try status(port, token: "second-token"), 401)
        _ = dir.write("tokens", "# rotated\nsecond-token\n")
        child.signal(SIGHUP)
        XCTAssertNotNil(child.waitForLine("reloaded 1 tokens"))
        XCTAssertEqual(try status(port, token: "second-token"), 200)
        XCTAssertEqual(try status(port, token: "first-token"), 401, "the old token is gone")
        _ = dir.write("tokens", "")
        child.signal(SIGHUP)
        XCTAssertNotNil(child.waitForLine("reload failed"))
        XCTAssertEqual(try status(port, token: "second-token"), 200, "a broken file keeps the old tokens")
        child.signal(SIGTERM)
        XCTAssertEqual(child.waitForExit(), 0)
    }

    func testSCIMOverTLSAndClearErrorsAtStart() throws {
        let dir = TempDirectory("edge-tls-agent")
        defer { dir.remove() }
        let pki = try TestPKI(in: dir)
        let (child, port) = try start([
            "--data-dir", dir.file("data"), "--token", "t", "--tls-cert", pki.serverCert, "--tls-key", pki.serverKey,
        ])
        let (line, left) = try runOnLoop { (loop: EventLoop, finish: @escaping @Sendable (String) -> Void) in
            let ctx = try TLSContext(role: .client, configuration: pki.clientConfig(noCert: true))
            let client = HTTPClient(loop: loop, address: SocketAddress(host: "127.0.0.1", port: port), tls: ctx, serverName: "localhost")
            client.send(HTTPRequest(method: "GET", target: "/scim/v2/ServiceProviderConfig", headers: ["Authorization": "Bearer t"])) { r in
                client.close()
                finish((try? r.get()).map { "\($0.status) \($0.headers["Content-Type"] ?? "")" } ?? "error \(r)")
            }
        }
        XCTAssertEqual(left, 0)
        XCTAssertEqual(line, "200 application/scim+json")
        child.signal(SIGTERM)
        XCTAssertEqual(child.waitForExit(), 0)

        // Start-up problems are reported and exit non-zero, without a crash.
        let bad = try ChildProcess(productsDirectory + "/scim-edge", ["serve", "--data-dir", dir.file("d2"), "--listen", "127.0.0.1:0"])
        XCTAssertNotEqual(bad.waitForExit(), 0)
        let noTLS = try ChildProcess(
            productsDirectory + "/scim-edge",
            [
                "serve", "--data-dir", dir.file("d3"), "--token", "t", "--listen", "127.0.0.1:0",
                "--admin-listen", "none", "--tls-cert", "/nonexistent.pem", "--tls-key", "/nonexistent.key",
            ])
        XCTAssertEqual(noTLS.waitForExit(), 1)
    }

    func testRequestLogIsJSONWithTraceIDsAndNoAttributeValues() throws {
        let dir = TempDirectory("edge-log")
        defer { dir.remove() }
        let (child, port) = try start(["--data-dir", dir.file("data"), "--token", "t"])
        let c = try RawClient(port: port)
        let body = userBody("secret.person@example.com", extra: #","phoneNumbers":[{"value":"+1 555 0123"}]"#)
        c.send(
            "POST /scim/v2/Users?attributes=userName HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer t\r\nContent-Type: application/scim+json\r\ntraceparent: 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01\r\nConnection: close\r\nContent-Length: \(body.utf8.count)\r\n\r\n\(body)"
        )
        XCTAssertEqual(c.readResponses(1).first?.status, 201)
        let filter = try RawClient(port: port)
        filter.send(
            "GET /scim/v2/Users?filter=userName%20eq%20%22secret.person%40example.com%22 HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer t\r\nConnection: close\r\n\r\n"
        )
        XCTAssertEqual(filter.readResponses(1).first?.status, 200)
        let line = try XCTUnwrap(child.waitForLine("request"))
        let entry = try JSONParser.parse(line)
        XCTAssertEqual(entry["trace"], "4bf92f3577b34da6a3ce929d0e0e4736")
        XCTAssertEqual(entry["method"], "POST")
        XCTAssertEqual(entry["path"], "/scim/v2/Users", "no query string in the log")
        XCTAssertEqual(entry["status"], 201)
        XCTAssertNotNil(entry["ms"])
        XCTAssertNotNil(entry["ts"])
        XCTAssertTrue(eventually { child.output.filter { $0.contains("\"msg\":\"request\"") }.count == 2 })
        let all = child.output.joined(separator: "\n")
        XCTAssertFalse(all.contains("secret.person"), "attribute values never reach the log")
        XCTAssertFalse(all.contains("555 0123"))
        child.signal(SIGTERM)
        XCTAssertEqual(child.waitForExit(), 0)
    }
}
