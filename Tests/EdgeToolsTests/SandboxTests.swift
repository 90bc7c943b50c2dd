import EdgeTestSupport
import Foundation
import XCTest

/// `scim-edge sandbox --short`: the whole federation (real processes, real
/// mutual TLS, real LMDB files, scim2-server as a target) and its own
/// verification, as `make demo` runs it with a larger burst.
final class SandboxTests: XCTestCase {
    /// On a terminal (standard input a TTY: `script` gives it one) the
    /// sandbox verifies, then stays up saying where everything is, serves
    /// what it says, and on Ctrl-C stops with the verification's status.
    /// Without slapd (here: none where --slapd says) the LDAP domain is
    /// skipped with one line and the rest runs as without it.
    func testOnATerminalTheFederationStaysUpUntilCtrlC() throws {
        let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent().path
        let reference = root + "/.venv/bin/scim2-server"
        // `exec`: whatever $SHELL `script` starts (dash stays as the parent
        // of its command, bash does not), the sandbox is script's own child.
        let command = "exec \(productsDirectory)/scim-edge sandbox --short --plain --reference \(reference) --slapd /nonexistent/slapd"
        let c = try ChildProcess("/usr/bin/script", ["-qefc", command, "/dev/null"])
        defer { c.signal(SIGKILL) }
        XCTAssertNotNil(c.waitForLine("▶ the federation keeps running until Ctrl-C", seconds: 180), c.output.joined(separator: "\n"))
        XCTAssertTrue(c.output.contains { $0.hasPrefix("sandbox: all ") }, "verified first: \(c.output.joined(separator: "\n"))")
        XCTAssertEqual(
            c.output.filter { $0.contains("LDAP") || $0.contains("slapd") },
            ["▶ the LDAP domain is skipped: no slapd at /nonexistent/slapd"])
        // The console, with the operator token of this run.
        let console = try XCTUnwrap(c.waitForLine("  broker console", seconds: 5))
        let consolePort = try XCTUnwrap(Int(console.split(separator: ":")[2].prefix { $0.isNumber }), console)
        let token = try XCTUnwrap(console.split(separator: "#token=").dropFirst().first?.split(separator: " ").first, console)
        let session = try RawClient(port: consolePort)
        session.send("GET /console/api/session HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer \(token)\r\nConnection: close\r\n\r\n")
        XCTAssertTrue(try XCTUnwrap(session.readResponses(1).first).body.contains(#""role":"operator""#), console)
        let api = try XCTUnwrap(c.waitForLine("  broker read API", seconds: 5))
        let port = try XCTUnwrap(Int(api.split(separator: ":")[2].prefix { $0.isNumber }), api)
        let client = try RawClient(port: port)
        client.send("GET /scim/v2/Users?count=0 HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer sandbox-api-token\r\n\r\n")
        let answer = try XCTUnwrap(client.readResponses(1).first)
        XCTAssertEqual(answer.status, 200)
        // 212: 14 hires, 2 out of the partner's scope, the burst of 200 (no directory here).
        XCTAssertTrue(answer.body.contains(#""totalResults":212"#), "the federation as the scenario left it: \(answer.body)")
        // subsidiary-eu's own app, with HQ's employees its agent provisioned and its own users.
        let euApp = try XCTUnwrap(c.waitForLine("  subsidiary-eu's app ", seconds: 5))
        let euPort = try XCTUnwrap(Int(euApp.split(separator: ":")[2].prefix { $0.isNumber }), euApp)
        let euClient = try RawClient(port: euPort)
        euClient.send("GET /Users?count=0 HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer eu-app-token\r\nConnection: close\r\n\r\n")
        let held = try XCTUnwrap(euClient.readResponses(1).first)
        XCTAssertTrue(held.body.contains(#""totalResults": 10"#), "hq's 6 employees and subsidiary-eu's 4: \(held.body)")
        // Ctrl-C reaches the sandbox (the child of `script` on the terminal).
        let pgrep = try ChildProcess("/usr/bin/pgrep", ["-P", String(c.process.processIdentifier), "-f", "scim-edge sandbox"])
        XCTAssertEqual(pgrep.waitForExit(), 0)
        let pid = try XCTUnwrap(pgrep.output.first.flatMap { Int32($0.trimmingCharacters(in: .whitespaces)) })
        kill(pid, SIGINT)
        XCTAssertEqual(c.waitForExit(seconds: 30), 0, "the verification's status: \(c.output.suffix(5))")
        XCTAssertTrue(c.output.contains { $0.contains("Ctrl-C: stopping the sandbox") })
    }

    /// With slapd installed (make deps), the LDAP domain runs too: its
    /// four users and group loaded into the sandbox's own slapd, then a
    /// hire, a modify, a disabled account and a membership change made
    /// there, each verified at the broker and both targets, exactly once.
    func testShortSandboxPassesItsVerificationAndCleansUp() throws {
        let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent().path
        let reference = root + "/.venv/bin/scim2-server"
        XCTAssertTrue(FileManager.default.isExecutableFile(atPath: reference), "make venv installs scim2-server")
        let c = try ChildProcess(
            productsDirectory + "/scim-edge", ["sandbox", "--short", "--plain", "--no-stay", "--reference", reference])
        let status = c.waitForExit(seconds: 180)
        let out = c.output
        XCTAssertEqual(status, 0, out.joined(separator: "\n"))
        XCTAssertTrue(out.last?.hasPrefix("sandbox: all ") ?? false, out.joined(separator: "\n"))
        XCTAssertFalse(out.contains { $0.contains("✘") })
        XCTAssertTrue(FileManager.default.isExecutableFile(atPath: "/usr/sbin/slapd"), "make deps installs slapd")
        XCTAssertTrue(
            out.contains { $0.hasPrefix("▶ LDAP: a slapd of the sandbox's own on ldap://127.0.0.1:") }, out.joined(separator: "\n"))
        XCTAssertTrue(
            out.contains { $0.hasPrefix("  at the app after ") && $0.hasSuffix("(ldapmodify → slapd → agent (syncrepl) → broker → app)") })
        for holder in ["broker", "app", "reference"] {
            // 217: the terminal test's 212 and the directory's 5 (4 loaded, 1 hired by ldapmodify).
            XCTAssertTrue(
                out.contains("  ✔ \(holder): every user that should be there is there exactly once (217 of 217, 0 duplicates)"),
                "\(holder): \(out.joined(separator: "\n"))")
            XCTAssertTrue(out.contains("  ✔ \(holder): the directory's users arrived, its modify and its disabled account too"))
            XCTAssertTrue(out.contains("  ✔ \(holder): every group is there once, directory-staff with the directory's members"))
        }
        XCTAssertTrue(out.contains { $0.hasPrefix("  inactive at the app after ") })
        XCTAssertTrue(out.contains { $0.hasPrefix("  agent acceptance → app's answer: p50 ") })
        // Into another boundary: subsidiary-eu's own app, which the broker does not reach, provisioned by its agent.
        // 10: hq's 6 employees (the burst's users are not accepted) and subsidiary-eu's own 4.
        for line in [
            "  ✔ eu-app (inside subsidiary-eu, not reachable by the broker): hq's employees and subsidiary-eu's own users are there exactly once (10 of 10, 0 duplicates)",
            "  ✔ eu-app: hq's employees arrived as subsidiary-eu's inbound policy maps them (userType Guest, phones dropped; the burst's users not accepted); its own are not guests",
            "  ✔ eu-app: hq's deactivation shows there (erin@hq.example inactive)",
            "  ✔ subsidiary-eu: none of its own users came back through the downlink (foreign: 6 from hq; refused 0)",
            "  ✔ eu-app: no change refused (dead letters 0)",
        ] {
            XCTAssertTrue(out.contains(line), "\(line)\n\(out.joined(separator: "\n"))")
        }
        XCTAssertTrue(
            out.contains {
                $0.hasPrefix("  HQ IdP's ack → visible at subsidiary-eu's own app (another boundary): hire ") && $0.hasSuffix(" ms")
            })
        // Nothing left behind.
        let first = try XCTUnwrap(out.first)
        let dir = String(try XCTUnwrap(first.split(separator: " ").last))
        XCTAssertTrue(dir.hasPrefix("/tmp/scim-edge-sandbox."))
        XCTAssertFalse(FileManager.default.fileExists(atPath: dir), "the sandbox removes its files")
        let leftover = try ChildProcess("/usr/bin/pgrep", ["-f", dir])
        XCTAssertEqual(leftover.waitForExit(), 1, "no process of the sandbox is left")
    }

    /// SIGKILL leaves the sandbox no chance to stop its children: they get a
    /// parent-death signal instead and end on their own.
    func testChildrenEndWhenTheSandboxIsKilled() throws {
        let c = try ChildProcess(productsDirectory + "/scim-edge", ["sandbox", "--plain", "--no-stay", "--burst", "100000"])
        XCTAssertNotNil(c.waitForLine("▶ load burst", seconds: 60), "\(c.output)")
        let dir = String(try XCTUnwrap(c.output.first?.split(separator: " ").last))
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let children = try childProcesses(of: c.process.processIdentifier)
        XCTAssertGreaterThanOrEqual(children.count, 6, "app, eu-app, broker and three agents: \(children)")
        c.signal(SIGKILL)
        _ = c.waitForExit(seconds: 10)
        let deadline = Date().addingTimeInterval(20)
        var alive = children
        while !alive.isEmpty && Date() < deadline {
            alive = alive.filter { kill($0, 0) == 0 && !isZombie($0) }
            usleep(100_000)
        }
        XCTAssertEqual(alive, [], "every child of the killed sandbox ended")
    }

    func childProcesses(of parent: pid_t) throws -> [pid_t] {
        try FileManager.default.contentsOfDirectory(atPath: "/proc").compactMap { Int32($0) }.filter { pid in
            guard let stat = try? String(contentsOfFile: "/proc/\(pid)/stat", encoding: .utf8),
                let close = stat.lastIndex(of: ")")
            else { return false }
            let fields = stat[stat.index(after: close)...].split(separator: " ")
            return fields.count > 2 && Int32(fields[1]) == parent
        }
    }

    func isZombie(_ pid: pid_t) -> Bool {
        guard let stat = try? String(contentsOfFile: "/proc/\(pid)/stat", encoding: .utf8),
            let close = stat.lastIndex(of: ")")
        else { return true }
        return stat[stat.index(after: close)...].split(separator: " ").first == "Z"
    }

    /// Ctrl-C: every process stops and the directory goes; exit status 130.
    func testInterruptStopsEverythingAndCleansUp() throws {
        let c = try ChildProcess(productsDirectory + "/scim-edge", ["sandbox", "--plain", "--no-stay", "--burst", "100000"])
        XCTAssertNotNil(c.waitForLine("▶ load burst", seconds: 60), "\(c.output)")
        let dir = String(try XCTUnwrap(c.output.first?.split(separator: " ").last))
        XCTAssertTrue(FileManager.default.fileExists(atPath: dir))
        c.signal(SIGINT)
        XCTAssertEqual(c.waitForExit(seconds: 30), 130, "\(c.output)")
        XCTAssertTrue(c.output.contains("interrupted: stopping the sandbox"))
        XCTAssertFalse(FileManager.default.fileExists(atPath: dir))
        let leftover = try ChildProcess("/usr/bin/pgrep", ["-f", dir])
        XCTAssertEqual(leftover.waitForExit(), 1, "no process of the sandbox is left")
    }
}
