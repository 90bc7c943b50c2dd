import EdgeTestSupport
import Foundation
import XCTest

/// `scim-edge sandbox --short`: the whole federation (real processes, real
/// mutual TLS, real LMDB files, scim2-server as a target) and its own
/// verification, as `make demo` runs it with a larger burst.
final class SandboxTests: XCTestCase {
    func testShortSandboxPassesItsVerificationAndCleansUp() throws {
        let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent().path
        let reference = root + "/.venv/bin/scim2-server"
        XCTAssertTrue(FileManager.default.isExecutableFile(atPath: reference), "make venv installs scim2-server")
        let c = try ChildProcess(productsDirectory + "/scim-edge", ["sandbox", "--short", "--plain", "--reference", reference])
        let status = c.waitForExit(seconds: 180)
        let out = c.output
        XCTAssertEqual(status, 0, out.joined(separator: "\n"))
        XCTAssertTrue(out.last?.hasPrefix("sandbox: all ") ?? false, out.joined(separator: "\n"))
        XCTAssertFalse(out.contains { $0.contains("✘") })
        for holder in ["broker", "app", "reference"] {
            XCTAssertTrue(
                out.contains("  ✔ \(holder): every user that should be there is there exactly once (211 of 211, 0 duplicates)"),
                "\(holder): \(out.joined(separator: "\n"))")
        }
        XCTAssertTrue(out.contains { $0.hasPrefix("  inactive at the app after ") })
        XCTAssertTrue(out.contains { $0.hasPrefix("  agent acceptance → app's answer: p50 ") })
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
        let c = try ChildProcess(productsDirectory + "/scim-edge", ["sandbox", "--plain", "--burst", "100000"])
        XCTAssertNotNil(c.waitForLine("▶ load burst", seconds: 60), "\(c.output)")
        let dir = String(try XCTUnwrap(c.output.first?.split(separator: " ").last))
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let children = try childProcesses(of: c.process.processIdentifier)
        XCTAssertGreaterThanOrEqual(children.count, 5, "app, broker and three agents: \(children)")
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
        let c = try ChildProcess(productsDirectory + "/scim-edge", ["sandbox", "--plain", "--burst", "100000"])
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
