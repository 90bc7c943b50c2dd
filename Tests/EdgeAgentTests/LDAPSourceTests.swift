import EdgeAgent
import EdgeConfig
import EdgeLDAP
import EdgeTestSupport
import EdgeTools
import Foundation
import SCIM
import XCTest

/// A slapd of the test's own: configured in a temporary directory
/// (`LocalDirectory`'s slapd.conf, as the sandbox's: the syncprov overlay
/// and a small schema for the Active Directory attributes), loaded with
/// slapadd, listening on 127.0.0.1 on a free port. Never the system's slapd.
final class TestDirectory {
    static let slapd = "/usr/sbin/slapd"
    static let suffix = LocalDirectory.suffix
    static let admin = LocalDirectory.admin
    let dir: TempDirectory
    let port: Int
    /// With a certificate: LDAPS on this port too (StartTLS on `port`).
    let tlsPort: Int?
    private(set) var process: ChildProcess?
    var url: String { "ldap://127.0.0.1:\(port)" }
    var ldapsURL: String { "ldaps://127.0.0.1:\(tlsPort ?? 0)" }

    /// `pki`: serve TLS with its server certificate (127.0.0.1 and localhost).
    init(pki: TestPKI? = nil) throws {
        guard FileManager.default.isExecutableFile(atPath: Self.slapd) else {
            throw XCTSkip("slapd is not installed (make deps installs slapd and ldap-utils): the LDAP source tests need it")
        }
        dir = TempDirectory("edge-slapd")
        port = try freePort()
        tlsPort = try pki.map { _ in try freePort() }
        let tls =
            pki.map {
                "TLSCACertificateFile \($0.caFile)\nTLSCertificateFile \($0.serverCert)\nTLSCertificateKeyFile \($0.serverKey)\n"
            } ?? ""
        try FileManager.default.createDirectory(atPath: dir.file("db"), withIntermediateDirectories: true)
        _ = dir.write("slapd.conf", LocalDirectory.slapdConfig(database: dir.file("db"), pidFile: dir.file("slapd.pid"), tls: tls))
    }

    deinit {
        if let p = process, p.process.isRunning { p.signal(SIGKILL); _ = p.waitForExit() }
        dir.remove()
    }

    /// Loads LDIF offline (before the first start).
    func slapadd(_ ldif: String) throws {
        let file = dir.write("load.ldif", ldif)
        let c = try ChildProcess("/usr/sbin/slapadd", ["-q", "-f", dir.file("slapd.conf"), "-l", file])
        XCTAssertEqual(c.waitForExit(seconds: 120), 0, "slapadd: \(c.output)")
    }

    /// Loads `ldif` offline, then starts.
    func start(loading ldif: String) throws {
        try slapadd(ldif)
        try start()
    }

    func start() throws {
        let urls = "\(url)/" + (tlsPort == nil ? "" : " \(ldapsURL)/")
        process = try ChildProcess(Self.slapd, ["-d", "0", "-f", dir.file("slapd.conf"), "-h", urls])
        XCTAssertTrue(
            eventually(seconds: 20) { (try? self.ldap("/usr/bin/ldapsearch", ["-b", "", "-s", "base"], "")) == 0 }, "slapd answers")
    }

    func stop() {
        process?.signal(SIGTERM)
        XCTAssertNotNil(process?.waitForExit(seconds: 30))
        process = nil
    }

    /// Runs an ldap-utils tool bound as the directory's admin; its status.
    @discardableResult
    func ldap(_ tool: String, _ args: [String], _ input: String) throws -> Int32 {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: tool)
        p.arguments = ["-x", "-H", url, "-D", Self.admin, "-w", LocalDirectory.password] + args
        let pipe = Pipe()
        p.standardInput = pipe
        p.standardOutput = FileHandle.nullDevice
        p.standardError = FileHandle.nullDevice
        try p.run()
        pipe.fileHandleForWriting.write(Data(input.utf8))
        try pipe.fileHandleForWriting.close()
        p.waitUntilExit()
        return p.terminationStatus
    }

    func modify(_ ldif: String) throws {
        XCTAssertEqual(try ldap("/usr/bin/ldapmodify", [], ldif), 0, "ldapmodify:\n\(ldif)")
    }
}

func freePort() throws -> Int {
    let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
    defer { close(fd) }
    var addr = sockaddr_in()
    addr.sin_family = sa_family_t(AF_INET)
    addr.sin_port = 0
    inet_pton(AF_INET, "127.0.0.1", &addr.sin_addr)
    _ = withUnsafePointer(to: &addr) {
        $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
    }
    var len = socklen_t(MemoryLayout<sockaddr_in>.size)
    _ = withUnsafeMutablePointer(to: &addr) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(fd, $0, &len) } }
    return Int(UInt16(bigEndian: addr.sin_port))
}

/// A file only its owner reads (a password, a token), `text` on its first line; its path.
func secretFile(_ dir: TempDirectory, _ name: String, _ text: String) -> String {
    let path = dir.write(name, text + "\n")
    chmod(path, 0o600)
    return path
}

/// The configuration file of an agent with one pull source (`source`:
/// its `- name: …` entry, indented as an item of `sources:`), its SCIM
/// endpoint and operations listener on free ports, its outbox kept.
func sourceAgentConfig(_ dir: TempDirectory, source: String) -> String {
    let tokens = secretFile(dir, "tokens", "test-token-0123456789")
    return dir.write(
        "agent.yaml",
        """
        dataDir: \(dir.file("data"))
        listen: 127.0.0.1:0
        tokenFile: \(tokens)
        admin:
          listen: 127.0.0.1:0
        outbox:
          keep: true
        sources:
        \(source)
        """)
}

/// A configuration whose `sources:` are `entries` (its items, indented as
/// under `sources:`), read as `check-config` reads it: what was bound and
/// the problems found.
func readSources(_ entries: String) throws -> (AgentConfiguration, ConfigDiagnostics) {
    let dir = TempDirectory("edge-sources-config")
    defer { dir.remove() }
    let file = dir.write("agent.yaml", "dataDir: \(dir.file("data"))\ntoken: [test-token-0123456789]\nsources:\n" + entries)
    let d = ConfigDiagnostics(file: file)
    return (try XCTUnwrap(AgentConfiguration.read(file: file, d)), d)
}

/// The resources the outbox says were created (their refs), after checking
/// that nothing was lost or doubled: the sequence has no gap, and no
/// resource was created twice.
func createdOnce(_ store: AgentStore, file: StaticString = #filePath, line: UInt = #line) throws -> [String] {
    let events = try store.outboxEntries(after: 0, limit: 1_000_000)
    XCTAssertEqual(events.map(\.0), Array(1...UInt64(events.count)), "outbox sequence contiguous", file: file, line: line)
    let created = events.compactMap { $0.1["events"]?["urn:ietf:params:SCIM:event:prov:create:full"]?["ref"]?.stringValue }
    XCTAssertEqual(created.count, Set(created).count, "no resource created twice", file: file, line: line)
    return created
}

/// A running agent (`scim-edge serve --config`) and its SCIM answers.
final class SourceAgent {
    let child: ChildProcess
    let port: Int
    let adminPort: Int

    init(config: String) throws {
        child = try ChildProcess(productsDirectory + "/scim-edge", ["serve", "--config", config])
        let line = try XCTUnwrap(child.waitForLine("scim-edge"), "agent started: \(child.output)")
        port = Int(line.split(separator: " ")[4].split(separator: ":")[1])!
        let ops = try XCTUnwrap(child.waitForLine("operations at"))
        adminPort = Int(ops.split(separator: ":").last!.split(separator: "/")[0])!
    }

    func get(_ target: String, port: Int? = nil) -> (Int, [String: Any]) {
        guard let client = try? RawClient(port: port ?? self.port) else { return (0, [:]) }
        client.send("GET \(target) HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer test-token-0123456789\r\nConnection: close\r\n\r\n")
        guard let r = client.readResponses(1).first else { return (0, [:]) }
        let json = (try? JSONSerialization.jsonObject(with: Data(r.body.utf8))) as? [String: Any] ?? [:]
        return (r.status, json)
    }

    /// A write to its SCIM endpoint, as an IdP would push it; the status.
    @discardableResult
    func send(_ method: String, _ target: String, _ body: String = "") -> Int {
        guard let client = try? RawClient(port: port) else { return 0 }
        client.send(
            "\(method) \(target) HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer test-token-0123456789\r\n"
                + "Content-Type: application/scim+json\r\nConnection: close\r\nContent-Length: \(body.utf8.count)\r\n\r\n\(body)")
        return client.readResponses(1).first?.status ?? 0
    }

    func metrics() -> String {
        guard let client = try? RawClient(port: adminPort) else { return "" }
        client.send("GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        return client.readResponses(1).first?.body ?? ""
    }

    func total(_ type: String, filter: String? = nil) -> Int {
        let q = filter.map { "?filter=" + $0.addingPercentEncoding(withAllowedCharacters: .alphanumerics)! + "&count=0" } ?? "?count=0"
        return get("/scim/v2/\(type)\(q)").1["totalResults"] as? Int ?? -1
    }

    func user(_ userName: String) -> [String: Any]? {
        let q = "userName eq \"\(userName)\"".addingPercentEncoding(withAllowedCharacters: .alphanumerics)!
        return (get("/scim/v2/Users?filter=\(q)").1["Resources"] as? [[String: Any]])?.first
    }

    func group(_ name: String) -> [String: Any]? {
        let q = "displayName eq \"\(name)\"".addingPercentEncoding(withAllowedCharacters: .alphanumerics)!
        return (get("/scim/v2/Groups?filter=\(q)").1["Resources"] as? [[String: Any]])?.first
    }

    func memberIDs(_ group: String) -> Set<String> {
        Set((self.group(group)?["members"] as? [[String: Any]] ?? []).compactMap { $0["value"] as? String })
    }

    func kill() {
        child.signal(SIGKILL)
        XCTAssertNotNil(child.waitForExit())
    }

    func stop() {
        child.signal(SIGTERM)
        XCTAssertEqual(child.waitForExit(seconds: 20), 0, "clean exit: \(child.output.suffix(5))")
    }
}

func person(_ uid: String, ou: String = "people", extra: String = "") -> String {
    // Object classes first: slapadd -q wants them together.
    let classes = extra.split(separator: "\n").filter { $0.hasPrefix("objectClass:") }
    let rest = extra.split(separator: "\n").filter { !$0.hasPrefix("objectClass:") }
    return
        (["dn: uid=\(uid),ou=\(ou),\(TestDirectory.suffix)", "objectClass: inetOrgPerson"] + classes.map(String.init)
        + ["uid: \(uid)", "cn: Person \(uid)", "givenName: Given\(uid)", "sn: Family\(uid)", "mail: \(uid)@example.org"]
        + rest.map(String.init)).joined(separator: "\n") + "\n\n"
}

/// An entry's LDIF as an add for ldapmodify.
func added(_ entry: String) -> String {
    let lines = entry.split(separator: "\n", omittingEmptySubsequences: false)
    return ([lines[0], "changetype: add"] + lines.dropFirst()).joined(separator: "\n")
}

func skeleton(_ ous: [String]) -> String {
    """
    dn: \(TestDirectory.suffix)
    objectClass: dcObject
    objectClass: organization
    o: Example
    dc: example
    """ + "\n\n" + ous.map { "dn: ou=\($0),\(TestDirectory.suffix)\nobjectClass: organizationalUnit\nou: \($0)\n\n" }.joined()
}

final class LDAPSourceTests: XCTestCase {
    func agentConfig(_ dir: TempDirectory, _ directory: TestDirectory, url: String? = nil, source: String) -> String {
        let password = secretFile(dir, "bind.pw", LocalDirectory.password)
        return sourceAgentConfig(
            dir,
            source: """
                  - name: corp
                    url: \(url ?? directory.url)
                    bindDN: \(TestDirectory.admin)
                    bindPasswordFile: \(password)
                    baseDN: \(TestDirectory.suffix)
                \(source)
                """)
    }

    /// Syncrepl end to end against a real slapd: the initial refresh, then
    /// adds, modifies, deletes, a rename (same SCIM id), membership
    /// changes, a disabled account and an unmappable entry (counted, the
    /// next ones still arrive); the agent SIGKILLed and restarted resumes
    /// from its cookie with nothing lost or doubled; slapd restarted under
    /// the agent (it reconnects).
    func testSyncReplFollowsTheDirectoryAndResumesFromItsCookie() throws {
        let directory = try TestDirectory()
        let dir = TempDirectory("edge-ldap-sync")
        defer { dir.remove() }
        let count = 10_000
        var ldif = skeleton(["people", "groups"])
        for i in 0..<count {
            // An enterprise attribute for every user; a phone (kept local by the policy) for a few.
            ldif += person(
                String(format: "u%04d", i), extra: "employeeNumber: E\(i)" + (i % 1000 == 0 ? "\ntelephoneNumber: +49 30 555 \(i)" : ""))
            if i == 1000 {
                // An entry that cannot be mapped (no uid for userName), in the middle of the load.
                ldif += "dn: cn=No Uid,ou=people,\(TestDirectory.suffix)\nobjectClass: inetOrgPerson\ncn: No Uid\nsn: Uid\n\n"
            }
        }
        ldif += person("disabled", extra: "objectClass: adAccount\nuserAccountControl: 512")
        ldif += "dn: cn=staff,ou=groups,\(TestDirectory.suffix)\nobjectClass: groupOfNames\ncn: staff\n"
        ldif += (0..<10).map { "member: uid=u\(String(format: "%04d", $0)),ou=people,\(TestDirectory.suffix)\n" }.joined()
        // A member that arrives later (pending until then).
        ldif += "member: uid=late,ou=people,\(TestDirectory.suffix)\n\n"
        try directory.slapadd(ldif)
        try directory.start()

        let config = agentConfig(
            dir, directory,
            source: """
                    mode: syncrepl
                    onDelete: delete
                    mapping:
                      users:
                        active: userAccountControl
                policy:
                  attributes:
                    phoneNumbers: keep-local
                """)
        var agent = try SourceAgent(config: config)
        let started = Date()
        XCTAssertTrue(eventually(seconds: 60) { agent.total("Users") == count + 1 }, "initial sync: \(agent.total("Users")) users")
        let took = Date().timeIntervalSince(started)
        print("initial sync of \(count + 1) users: \(String(format: "%.1f", took)) s")
        XCTAssertTrue(eventually(seconds: 10) { agent.memberIDs("staff").count == 10 }, "the group and its members")
        let u0 = try XCTUnwrap(agent.user("u0000"))
        XCTAssertEqual(u0["externalId"] as? String, (u0["externalId"] as? String)?.lowercased())
        XCTAssertEqual((u0["name"] as? [String: Any])?["familyName"] as? String, "Familyu0000")
        XCTAssertEqual((u0["emails"] as? [[String: Any]])?.first?["value"] as? String, "u0000@example.org")
        XCTAssertEqual(agent.user("disabled")?["active"] as? Bool, true)
        // The enterprise extension mapped; the phone stored here, but kept out of the outbox by the policy
        // (the same write path as the SCIM endpoint's).
        XCTAssertEqual((u0[SourceMapping.enterprise] as? [String: Any])?["employeeNumber"] as? String, "E0")
        XCTAssertEqual((u0["phoneNumbers"] as? [[String: Any]])?.first?["value"] as? String, "+49 30 555 0")
        do {
            let store = try AgentStore(path: dir.file("data"), registry: .standard)
            let events = try store.outboxEntries(after: 0, limit: 100_000)
            let created = events.compactMap { $0.1["events"]?["urn:ietf:params:SCIM:event:prov:create:full"] }
            let u0Event = try XCTUnwrap(created.first { $0["ref"]?.stringValue == "/Users/\(u0["id"] as? String ?? "")" })
            XCTAssertEqual(u0Event["data"]?[SourceMapping.enterprise]?["employeeNumber"]?.stringValue, "E0", "the extension leaves")
            XCTAssertGreaterThanOrEqual(created.count, count, "an event per user")
            let text = events.map { $0.1.text }.joined()
            XCTAssertFalse(text.contains("+49 30 555"), "a keep-local value reached the outbox")
            XCTAssertFalse(text.contains("phoneNumbers"), "a keep-local attribute reached the outbox")
        }
        XCTAssertTrue(eventually { agent.metrics().contains("scim_edge_source_errors_total{source=\"corp\"} 1") }, agent.metrics())
        XCTAssertTrue(agent.child.output.contains { $0.contains("cn=No Uid") && $0.contains("no value for userName") })

        // Add, modify, rename, membership, disable, delete: each arrives.
        try directory.modify(added(person("late")))
        XCTAssertTrue(eventually(seconds: 10) { agent.user("late") != nil }, "add")
        let late = try XCTUnwrap(agent.user("late")?["id"] as? String)
        XCTAssertTrue(
            eventually(seconds: 10) { agent.memberIDs("staff").contains(late) }, "a pending member joins its group when it arrives")
        try directory.modify(
            "dn: uid=u0001,ou=people,\(TestDirectory.suffix)\nchangetype: modify\nreplace: mail\nmail: changed@example.org\n")
        XCTAssertTrue(
            eventually(seconds: 10) {
                (agent.user("u0001")?["emails"] as? [[String: Any]])?.first?["value"] as? String == "changed@example.org"
            })
        let u2 = try XCTUnwrap(agent.user("u0002")?["id"] as? String)
        try directory.modify(
            "dn: uid=u0002,ou=people,\(TestDirectory.suffix)\nchangetype: modrdn\nnewrdn: uid=u0002-renamed\ndeleteoldrdn: 1\n")
        XCTAssertTrue(eventually(seconds: 10) { agent.user("u0002-renamed")?["id"] as? String == u2 }, "a rename keeps the SCIM id")
        XCTAssertNil(agent.user("u0002"))
        XCTAssertTrue(agent.memberIDs("staff").contains(u2), "the renamed member stays in its group")
        let u0id = try XCTUnwrap(u0["id"] as? String)
        let u100 = try XCTUnwrap(agent.user("u0100")?["id"] as? String)
        try directory.modify(
            """
            dn: cn=staff,ou=groups,\(TestDirectory.suffix)
            changetype: modify
            add: member
            member: uid=u0100,ou=people,\(TestDirectory.suffix)
            -
            delete: member
            member: uid=u0000,ou=people,\(TestDirectory.suffix)

            """)
        XCTAssertTrue(
            eventually(seconds: 10) {
                let m = agent.memberIDs("staff"); return m.contains(u100) && !m.contains(u0id)
            }, "membership")
        try directory.modify(
            "dn: uid=disabled,ou=people,\(TestDirectory.suffix)\nchangetype: modify\nreplace: userAccountControl\nuserAccountControl: 514\n"
        )
        XCTAssertTrue(eventually(seconds: 10) { agent.user("disabled")?["active"] as? Bool == false }, "the disabled bit")
        try directory.modify("dn: uid=u0003,ou=people,\(TestDirectory.suffix)\nchangetype: delete\n")
        XCTAssertTrue(eventually(seconds: 10) { agent.user("u0003") == nil }, "delete")
        // The next entry after a failing one still arrives.
        try directory.modify(
            "dn: cn=Another No Uid,ou=people,\(TestDirectory.suffix)\nchangetype: add\nobjectClass: inetOrgPerson\ncn: Another No Uid\nsn: X\n"
        )
        try directory.modify(added(person("after-bad")))
        XCTAssertTrue(eventually(seconds: 10) { agent.user("after-bad") != nil })
        XCTAssertTrue(eventually { agent.metrics().contains("scim_edge_source_errors_total{source=\"corp\"} 2") })
        // An idle persistent search is caught up: the lag stays within a few seconds.
        XCTAssertTrue(eventually(seconds: 5) { (metric(agent.metrics(), "scim_edge_source_lag_seconds{source=\"corp\"}") ?? 99) <= 2 })

        // SIGKILL; the directory changes meanwhile; the restarted agent resumes from its cookie.
        agent.kill()
        try directory.modify(added(person("while-down")))
        try directory.modify("dn: uid=u0004,ou=people,\(TestDirectory.suffix)\nchangetype: delete\n")
        agent = try SourceAgent(config: config)
        XCTAssertTrue(eventually(seconds: 20) { agent.user("while-down") != nil && agent.user("u0004") == nil }, "changes while down")
        // Resumed from the cookie, not read again from the start: the directory sent only what changed
        // (a full refresh would find its 10,000 entries unchanged).
        let metrics = agent.metrics()
        let unchanged = metric(metrics, "scim_edge_source_unchanged_total{source=\"corp\"}") ?? -1
        let changed = metric(metrics, "scim_edge_source_changes_total{source=\"corp\"}") ?? -1
        print("after the restart: \(Int(changed)) changes, \(Int(unchanged)) unchanged")
        XCTAssertTrue((0..<100).contains(unchanged), "entries read again after the restart: \(unchanged)")
        XCTAssertTrue((2..<100).contains(changed), "changes applied after the restart: \(changed)")

        // slapd restarted under the agent: it reconnects and follows again.
        directory.stop()
        XCTAssertTrue(eventually(seconds: 10) { agent.metrics().contains("scim_edge_source_connected{source=\"corp\"} 0") })
        try directory.start()
        try directory.modify(added(person("after-restart")))
        XCTAssertTrue(
            eventually(seconds: 40) { agent.user("after-restart") != nil }, "after slapd's restart: \(agent.child.output.suffix(5))")
        let expected = count + 1 - 2 + 4  // - u0003, u0004; + late, after-bad, while-down, after-restart
        XCTAssertTrue(eventually(seconds: 10) { agent.total("Users") == expected }, "\(agent.total("Users")) users")
        agent.stop()

        // Nothing lost, nothing doubled: one create event per user, the outbox contiguous; the cookie stored.
        let store = try AgentStore(path: dir.file("data"), registry: .standard)
        let users = try createdOnce(store).filter { $0.hasPrefix("/Users/") }
        XCTAssertEqual(users.count, count + 1 + 4, "every user created once (the deleted ones included)")
        let status = try store.sourceStatus("corp")
        XCTAssertEqual(status.mode, "syncrepl")
        XCTAssertTrue(status.position?.contains("csn=") == true, "the cookie: \(status.position ?? "none")")
        XCTAssertEqual(status.entries, expected + 1, "users and the group")
        XCTAssertEqual(status.errors, 2)

        let c = try ChildProcess(productsDirectory + "/scim-edge", ["sources", "status", "--data-dir", dir.file("data")])
        XCTAssertEqual(c.waitForExit(), 0)
        XCTAssertTrue(c.output.contains { $0.contains("cn=No Uid") }, "\(c.output)")
        XCTAssertTrue(c.output.contains("  mode           syncrepl"), "\(c.output)")
        XCTAssertTrue(c.output.contains { $0.hasPrefix("  lag            ") && $0.hasSuffix("/metrics has it live)") }, "\(c.output)")
        directory.stop()
    }

    /// Polling against the same kind of slapd with the default Active
    /// Directory mapping (sAMAccountName/userPrincipalName,
    /// userAccountControl, employeeID and department into the enterprise
    /// extension, the binary objectGUID as the key, in its usual text form:
    /// the test's schema gives slapd these attributes): changes arrive at
    /// the next poll, renames keep the id, deletions at the full comparison.
    func testPollingWithTheActiveDirectoryMapping() throws {
        let directory = try TestDirectory()
        let dir = TempDirectory("edge-ldap-poll")
        defer { dir.remove() }
        /// A GUID of its own per entry, no two bytes alike in the swapped parts (so the byte order shows).
        func guid(_ n: Int) -> [UInt8] { (0..<16).map { UInt8(truncatingIfNeeded: $0 * 17 + n * 31 + 7) } }
        func guidLine(_ n: Int) -> String { "objectGUID:: " + Data(guid(n)).base64EncodedString() }
        func adUser(_ name: String, _ n: Int, uac: Int = 512) -> String {
            """
            dn: cn=\(name),ou=ad,\(TestDirectory.suffix)
            objectClass: inetOrgPerson
            objectClass: adAccount
            cn: \(name)
            sn: S\(name)
            sAMAccountName: \(name)
            userPrincipalName: \(name)@corp.example.org
            userAccountControl: \(uac)
            employeeID: E\(n)
            department: D\(n % 3)
            \(guidLine(n))
            """ + "\n\n"
        }
        var ldif = skeleton(["ad"])
        for i in 0..<50 { ldif += adUser("ad\(i)", i) }
        ldif += "dn: cn=ops,ou=ad,\(TestDirectory.suffix)\nobjectClass: groupOfNames\nobjectClass: adAccount\ncn: ops\n\(guidLine(1000))\n"
        ldif += "member: cn=ad3,ou=ad,\(TestDirectory.suffix)\nmember: cn=ad4,ou=ad,\(TestDirectory.suffix)\n\n"
        // An entry without the key attribute cannot be named for good: refused, counted, the others arrive.
        ldif += "dn: cn=noguid,ou=ad,\(TestDirectory.suffix)\nobjectClass: inetOrgPerson\nobjectClass: adAccount\ncn: noguid\nsn: N\n"
        ldif += "sAMAccountName: noguid\n\n"
        try directory.slapadd(ldif)
        try directory.start()
        let config = agentConfig(
            dir, directory,
            source: """
                    mode: poll
                    pollSeconds: 1
                    fullCompareEvery: 2
                    schema: activeDirectory
                    userFilter: (&(objectClass=adAccount)(!(objectClass=groupOfNames)))
                    groupFilter: (objectClass=groupOfNames)
                """)
        let agent = try SourceAgent(config: config)
        XCTAssertTrue(eventually(seconds: 20) { agent.total("Users") == 50 }, "\(agent.total("Users"))")
        let ad1 = try XCTUnwrap(agent.user("ad1@corp.example.org"))
        XCTAssertEqual(ad1["active"] as? Bool, true)
        XCTAssertEqual(ad1["externalId"] as? String, guidString(guid(1)), "objectGUID as Active Directory writes it")
        XCTAssertNotEqual(guidString(guid(1)), uuidString(guid(1)), "its first three parts little-endian")
        let enterprise = ad1[SourceMapping.enterprise] as? [String: Any]
        XCTAssertEqual(enterprise?["employeeNumber"] as? String, "E1", "employeeID into the enterprise extension")
        XCTAssertEqual(enterprise?["department"] as? String, "D1")
        XCTAssertTrue((ad1["schemas"] as? [String] ?? []).contains(SourceMapping.enterprise), "\(ad1)")
        XCTAssertEqual(agent.group("ops")?["externalId"] as? String, guidString(guid(1000)))
        XCTAssertNil(agent.user("noguid"))
        XCTAssertTrue(
            eventually { (metric(agent.metrics(), "scim_edge_source_errors_total{source=\"corp\"}") ?? 0) >= 1 }, "the entry without a key")
        XCTAssertTrue(
            eventually { agent.child.output.contains { $0.contains("cn=noguid") && $0.contains("no objectGUID (the key attribute)") } },
            "logged with its DN: \(agent.child.output.suffix(5))")
        try directory.modify(
            "dn: cn=ad1,ou=ad,\(TestDirectory.suffix)\nchangetype: modify\nreplace: userAccountControl\nuserAccountControl: 514\n")
        XCTAssertTrue(eventually(seconds: 10) { agent.user("ad1@corp.example.org")?["active"] as? Bool == false }, "disabled bit")
        try directory.modify(added(adUser("ad-new", 500)))
        XCTAssertTrue(eventually(seconds: 10) { agent.user("ad-new@corp.example.org") != nil }, "add")
        let ad2 = try XCTUnwrap(agent.user("ad2@corp.example.org")?["id"] as? String)
        try directory.modify(
            "dn: cn=ad2,ou=ad,\(TestDirectory.suffix)\nchangetype: modrdn\nnewrdn: cn=ad2-renamed\ndeleteoldrdn: 1\n\n"
                + "dn: cn=ad2-renamed,ou=ad,\(TestDirectory.suffix)\nchangetype: modify\nreplace: userPrincipalName\nuserPrincipalName: ad2-renamed@corp.example.org\n"
        )
        XCTAssertTrue(
            eventually(seconds: 10) { agent.user("ad2-renamed@corp.example.org")?["id"] as? String == ad2 }, "rename keeps the id")
        XCTAssertEqual(agent.user("ad2-renamed@corp.example.org")?["externalId"] as? String, guidString(guid(2)))
        try directory.modify("dn: cn=ad3,ou=ad,\(TestDirectory.suffix)\nchangetype: delete\n")
        // onDelete: deactivate (the default): kept, with active false, at the next full comparison.
        XCTAssertTrue(eventually(seconds: 15) { agent.user("ad3@corp.example.org")?["active"] as? Bool == false }, "deletion seen")
        XCTAssertEqual(agent.total("Users"), 51)
        // Membership follows the directory's group: while it still lists the
        // deleted entry (slapd without refint), the deactivated user stays a
        // member, as Entra keeps a disabled user's groups; when the group
        // drops it (Active Directory does at deletion), it leaves.
        let ad3 = try XCTUnwrap(agent.user("ad3@corp.example.org")?["id"] as? String)
        let ad4 = try XCTUnwrap(agent.user("ad4@corp.example.org")?["id"] as? String)
        XCTAssertEqual(agent.memberIDs("ops"), [ad3, ad4])
        try directory.modify(
            "dn: cn=ops,ou=ad,\(TestDirectory.suffix)\nchangetype: modify\ndelete: member\nmember: cn=ad3,ou=ad,\(TestDirectory.suffix)\n")
        XCTAssertTrue(eventually(seconds: 10) { agent.memberIDs("ops") == [ad4] }, "\(agent.memberIDs("ops"))")
        agent.stop()
        let status = try AgentStore(path: dir.file("data"), registry: .standard).sourceStatus("corp")
        XCTAssertEqual(status.mode, "poll")
        XCTAssertTrue(status.position?.hasSuffix("Z") == true, "the high-water mark: \(status.position ?? "none")")
        XCTAssertEqual(status.entries, 51, "51 users, one deactivated, and the group")
        directory.stop()
    }

    /// `pollAttribute: uSNChanged` against slapd, which has no USNs: the
    /// test's schema declares an integer `uSNChanged` and the test keeps
    /// it as a domain controller would (one more at every change). What
    /// the test shows: the poll asks for `uSNChanged>=mark+1` and keeps
    /// the mark as an integer (9 then 10, where text would stop at 9);
    /// a change that does not raise the USN is not read, so the filter is
    /// the one in force. Not shown: Active Directory itself.
    func testPollingByUSNChanged() throws {
        let directory = try TestDirectory()
        let dir = TempDirectory("edge-ldap-usn")
        defer { dir.remove() }
        var ldif = skeleton(["people"])
        for i in 1...9 { ldif += person("n\(i)", extra: "objectClass: adAccount\nuSNChanged: \(i)") }
        try directory.start(loading: ldif)
        let config = agentConfig(
            dir, directory,
            source: """
                    mode: poll
                    pollSeconds: 1
                    fullCompareEvery: 1000
                    pollAttribute: uSNChanged
                """)
        let agent = try SourceAgent(config: config)
        XCTAssertTrue(eventually(seconds: 20) { agent.total("Users") == 9 }, "\(agent.total("Users"))")
        func change(_ uid: String, title: String, usn: Int?) throws {
            try directory.modify(
                "dn: uid=\(uid),ou=people,\(TestDirectory.suffix)\nchangetype: modify\nreplace: title\ntitle: \(title)\n"
                    + (usn.map { "-\nreplace: uSNChanged\nuSNChanged: \($0)\n" } ?? ""))
        }
        try change("n1", title: "ten", usn: 10)
        XCTAssertTrue(eventually(seconds: 10) { agent.user("n1")?["title"] as? String == "ten" }, "USN 10 after 9")
        try change("n2", title: "unseen", usn: nil)
        try change("n3", title: "eleven", usn: 11)
        XCTAssertTrue(eventually(seconds: 10) { agent.user("n3")?["title"] as? String == "eleven" }, "USN 11")
        XCTAssertNil(agent.user("n2")?["title"], "a change without a higher USN is not asked for")
        XCTAssertTrue(eventually(seconds: 5) { (metric(agent.metrics(), "scim_edge_source_lag_seconds{source=\"corp\"}") ?? 99) <= 5 })
        agent.stop()
        let status = try AgentStore(path: dir.file("data"), registry: .standard).sourceStatus("corp")
        XCTAssertEqual(status.position, "11", "the mark, an integer")
        XCTAssertEqual(status.newestChange, 0, "a USN says no time: lag counts from the last poll")
        XCTAssertGreaterThan(status.caughtUpAt, 0)
        directory.stop()
    }

    /// The high-water logic of both poll attributes, the times read from
    /// GeneralizedTime and from OpenLDAP's cookies, and the lag.
    func testPollHighWaterAndLag() throws {
        let usn = PollHighWater(attribute: .uSNChanged)
        XCTAssertEqual(usn.filter("(objectClass=user)", since: nil), "(objectClass=user)")
        XCTAssertEqual(usn.filter("(objectClass=user)", since: "41"), "(&(objectClass=user)(uSNChanged>=42))")
        XCTAssertEqual(usn.filter("(objectClass=user)", since: "2024"), "(&(objectClass=user)(uSNChanged>=2025))")
        XCTAssertEqual(usn.filter("(o=x)", since: "20240101000000Z"), "(o=x)", "a mark of another mode reads everything again")
        XCTAssertTrue(usn.isNewer("10", than: "9"), "compared as integers")
        XCTAssertFalse(usn.isNewer("9", than: "10"))
        XCTAssertFalse(usn.isNewer("x", than: "10"))
        XCTAssertTrue(usn.isNewer("1", than: nil))
        XCTAssertNil(usn.seconds("10"))
        let ts = PollHighWater(attribute: .modifyTimestamp)
        XCTAssertEqual(ts.filter("(o=x)", since: "20240101000000Z"), "(&(o=x)(modifyTimestamp>=20240101000000Z))")
        XCTAssertEqual(ts.filter("(o=x)", since: "2024*)"), "(&(o=x)(modifyTimestamp>=2024\\2a\\29))", "escaped, never spliced")
        XCTAssertTrue(ts.isNewer("20240101000001Z", than: "20240101000000Z"))
        XCTAssertEqual(ts.seconds("19700101000100Z"), 60)
        XCTAssertEqual(generalizedTimeSeconds("20240229235959.5Z"), 1_709_251_199)
        XCTAssertNil(generalizedTimeSeconds("2024"))
        XCTAssertEqual(cookieChangeSeconds(Array("rid=000,csn=19700101000200.000000Z#000000#000#000000".utf8)), 120)
        XCTAssertNil(cookieChangeSeconds(Array("opaque".utf8)))

        var status = SourceStatus(name: "s")
        XCTAssertNil(status.lag(now: 1000), "nothing says")
        status.newestChange = 900
        XCTAssertEqual(status.lag(now: 1000), 100, "since the newest change, when that is all that is known")
        status.caughtUpAt = 990
        XCTAssertEqual(status.lag(now: 1000), 10, "since the moment everything was read")
        XCTAssertEqual(status.lag(now: 1000, live: 999), 1, "a running source's later moment")
        XCTAssertEqual(status.lag(now: 980), 0, "never negative (clocks differ)")
    }

    /// TLS to the directory, against a slapd serving a certificate the
    /// test issued: LDAPS with its CA carries a sync end to end; StartTLS
    /// with it connects, binds and reads; either with another CA is
    /// refused (so StartTLS really upgrades and verifies before the bind).
    func testLDAPSAndStartTLSVerifyTheDirectorysCertificate() throws {
        let dir = TempDirectory("edge-ldap-tls")
        defer { dir.remove() }
        let pki = try TestPKI(in: dir)
        let directory = try TestDirectory(pki: pki)
        try directory.start(loading: skeleton(["people"]) + person("tls1") + person("tls2"))
        func source(_ url: String, ca: String, startTLS: Bool = false) -> String {
            agentConfig(
                dir, directory, url: url, source: "    mode: poll\n    pollSeconds: 1\n    tls: {ca: \(ca), startTLS: \(startTLS)}\n")
        }
        func connect(_ config: String) throws -> (Int32?, [String]) {
            let c = try ChildProcess(productsDirectory + "/scim-edge", ["check-config", "--connect", config])
            return (c.waitForExit(seconds: 60), c.output)
        }

        let agent = try SourceAgent(config: source(directory.ldapsURL, ca: pki.caFile))
        XCTAssertTrue(eventually(seconds: 20) { agent.total("Users") == 2 }, "over LDAPS: \(agent.child.output.suffix(5))")
        agent.stop()
        var (status, out) = try connect(source(directory.url, ca: pki.caFile, startTLS: true))
        XCTAssertEqual(status, 0, "StartTLS with the right CA: \(out)")
        for (url, startTLS) in [(directory.ldapsURL, false), (directory.url, true)] {
            (status, out) = try connect(source(url, ca: pki.otherCAFile, startTLS: startTLS))
            XCTAssertEqual(status, 1, "\(url) startTLS \(startTLS) with another CA: \(out)")
            XCTAssertTrue(out.contains { $0.contains("sources[0].url") }, "\(out)")
        }
        // The agent itself refuses too: nothing is read, the failure is in the metrics.
        let refused = try SourceAgent(config: source(directory.ldapsURL, ca: pki.otherCAFile))
        XCTAssertTrue(
            eventually(seconds: 10) {
                (metric(refused.metrics(), "scim_edge_source_connection_failures_total{source=\"corp\"}") ?? 0) >= 1
            })
        XCTAssertEqual(refused.total("Users"), 2, "what the first run stored, nothing more")
        refused.stop()
        directory.stop()
    }

    /// `sources:` is read strictly: each problem at its key, and what is valid is bound.
    /// `check-config --connect` reaches the directory: a right
    /// configuration passes; a wrong password, a base DN that does not
    /// exist and a port nobody listens on are each reported at their key.
    func testCheckConfigConnectsBindsAndReadsTheBaseDN() throws {
        let directory = try TestDirectory()
        let dir = TempDirectory("edge-ldap-check")
        defer { dir.remove() }
        try directory.slapadd(skeleton(["people"]))
        try directory.start()
        let good = agentConfig(dir, directory, source: "    mode: poll\n")
        func check(_ file: String) throws -> (Int32?, [String]) {
            let c = try ChildProcess(productsDirectory + "/scim-edge", ["check-config", "--connect", file])
            return (c.waitForExit(seconds: 60), c.output)
        }
        var (status, out) = try check(good)
        XCTAssertEqual(status, 0, "\(out)")
        let text = try String(contentsOfFile: good, encoding: .utf8)
        let wrong = dir.write("wrong.pw", "not-the-password\n")
        chmod(wrong, 0o600)
        let badPassword = dir.write("bad-password.yaml", text.replacingOccurrences(of: dir.file("bind.pw"), with: wrong))
        (status, out) = try check(badPassword)
        XCTAssertEqual(status, 1)
        XCTAssertTrue(out.contains { $0.contains("sources[0].bindDN:") && $0.contains("refused the bind") }, "\(out)")
        let badBase = dir.write(
            "bad-base.yaml",
            text.replacingOccurrences(of: "baseDN: \(TestDirectory.suffix)", with: "baseDN: ou=nowhere,\(TestDirectory.suffix)"))
        (status, out) = try check(badBase)
        XCTAssertEqual(status, 1)
        XCTAssertTrue(out.contains { $0.contains("sources[0].baseDN:") }, "\(out)")
        let nobody = try freePort()
        let badURL = dir.write("bad-url.yaml", text.replacingOccurrences(of: directory.url, with: "ldap://127.0.0.1:\(nobody)"))
        (status, out) = try check(badURL)
        XCTAssertEqual(status, 1)
        XCTAssertTrue(out.contains { $0.contains("sources[0].url:") && $0.contains("cannot reach") }, "\(out)")
        // Without --connect nothing is dialled: the unreachable one passes the file checks.
        let offline = try ChildProcess(productsDirectory + "/scim-edge", ["check-config", badURL])
        XCTAssertEqual(offline.waitForExit(seconds: 60), 0, "\(offline.output)")
    }

    func testSourcesConfigurationIsReadStrictly() throws {
        let (config, d) = try readSources(
            """
              - name: corp
                url: ldaps://10.0.0.5
                baseDN: dc=example,dc=org
                mode: poll
                mapping:
                  users: {userName: "sAMAccountName, uid", title: ""}
              - name: corp
                url: ldap://10.0.0.6
                baseDN: dc=example,dc=org
              - name: bad
                url: http://10.0.0.7
                baseDN: dc=example,dc=org
                userFilter: (uid=a
                mode: sync
            """)
        let keys = d.problems.compactMap(\.key)
        XCTAssertTrue(keys.contains("sources[1].name"), "\(d.problems)")
        XCTAssertTrue(keys.contains("sources[2].url"), "\(d.problems)")
        XCTAssertTrue(keys.contains("sources[2].userFilter"), "\(d.problems)")
        XCTAssertTrue(keys.contains("sources[2].mode"), "\(d.problems)")
        XCTAssertEqual(config.sources.count, 1)
        let corp = try XCTUnwrap(config.sources.first)
        XCTAssertEqual(corp.mode, .poll)
        XCTAssertEqual(corp.onDelete, .deactivate, "the default")
        XCTAssertEqual(corp.mapping.users.first { $0.path == "userName" }?.attributes, ["sAMAccountName", "uid"])
        XCTAssertNil(corp.mapping.users.first { $0.path == "title" }, "unmapped")
    }

    func testSyncReplMessagesFilterAndMapping() throws {
        // syncRequestValue: SEQUENCE { ENUMERATED 3, OCTET STRING "c" }
        XCTAssertEqual(
            SyncRepl.request(mode: .refreshAndPersist, cookie: Array("c".utf8)), [0x30, 0x06, 0x0a, 0x01, 0x03, 0x04, 0x01, 0x63])
        let uuid: [UInt8] = Array(0..<16)
        let state = BER.element(0x30, BER.element(0x0a, [1]) + BER.element(0x04, uuid) + BER.element(0x04, Array("k".utf8)))
        XCTAssertEqual(try SyncRepl.state(state), SyncRepl.State(state: .add, entryUUID: uuid, cookie: Array("k".utf8)))
        XCTAssertEqual(uuidString(uuid), "00010203-0405-0607-0809-0a0b0c0d0e0f")
        XCTAssertEqual(guidString(uuid), "03020100-0504-0706-0809-0a0b0c0d0e0f")
        XCTAssertEqual(try SyncRepl.info(BER.element(0x80, [0x61])), .newCookie([0x61]))
        XCTAssertEqual(try SyncRepl.info(BER.element(0xa2, BER.element(0x04, [0x61]))), .refreshPresent(cookie: [0x61], done: true))
        XCTAssertEqual(
            try SyncRepl.info(BER.element(0xa3, BER.element(0x01, [0xff]) + BER.element(0x31, BER.element(0x04, uuid)))),
            .idSet(cookie: nil, refreshDeletes: true, uuids: [uuid]))
        XCTAssertThrowsError(try SyncRepl.state([0x30, 0x05, 0x0a]), "truncated input is an error, not a crash")
        let long = [UInt8](repeating: 7, count: 300)
        var reader = BERReader(BER.element(0x04, long))
        XCTAssertEqual(try reader.next(0x04).remaining, long)

        let entry = LDAPEntry(
            dn: "uid=a,ou=people,dc=example,dc=org", attributes: ["objectClass": [Array("inetOrgPerson".utf8)], "uid": [Array("a".utf8)]])
        XCTAssertTrue(try LDAPFilter("(&(objectClass=inetorgperson)(uid=*))").matches(entry))
        XCTAssertFalse(try LDAPFilter("(|(objectClass=groupOfNames)(!(uid=a)))").matches(entry))
        XCTAssertTrue(try LDAPFilter("(uid=\\61)").matches(entry))
        XCTAssertThrowsError(try LDAPFilter("(uid=a"))
        XCTAssertEqual(normalizedDN("UID=A, OU=People,dc=Example"), "uid=a,ou=people,dc=example")

        let mapping = SourceMapping(schema: .inetOrgPerson)
        XCTAssertFalse(mapping.isGroup(entry))
        let body = try mapping.body(of: entry, group: false, key: "k1")
        XCTAssertEqual(body["userName"]?.stringValue, "a")
        XCTAssertEqual(body["externalId"]?.stringValue, "k1")
        let noUid = LDAPEntry(dn: "cn=x", attributes: ["cn": [Array("x".utf8)]])
        XCTAssertThrowsError(try mapping.body(of: noUid, group: false, key: "k2")) { e in
            XCTAssertTrue("\(e)".contains("no value for userName"), "\(e)")
        }
        let ad = SourceMapping(schema: .activeDirectory, users: [(path: "title", attributes: [])])
        let adEntry = LDAPEntry(
            dn: "cn=b",
            attributes: ["sAMAccountName": [Array("b".utf8)], "userAccountControl": [Array("514".utf8)], "title": [Array("t".utf8)]])
        let adBody = try ad.body(of: adEntry, group: false, key: "k3")
        XCTAssertEqual(adBody["userName"]?.stringValue, "b", "sAMAccountName when there is no userPrincipalName")
        XCTAssertEqual(adBody["active"]?.boolValue, false, "ACCOUNTDISABLE")
        XCTAssertNil(adBody["title"], "an empty override unmaps the path")
    }
}
