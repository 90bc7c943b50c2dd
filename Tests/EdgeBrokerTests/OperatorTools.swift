import EdgeTestSupport
import Foundation
import XCTest

/// What one run of a command-line tool did.
struct ToolRun: CustomStringConvertible {
    var status: Int32
    var stdout: String
    var stderr: String
    var description: String { "exit \(status)\nstdout: \(stdout)\nstderr: \(stderr)" }
}

/// Runs `scim-broker` or `scim-edge` (a product of this build) to the end,
/// with standard output and standard error apart.
func runTool(_ program: String, _ arguments: [String], seconds: Double = 30) throws -> ToolRun {
    let p = Process()
    p.executableURL = URL(fileURLWithPath: productsDirectory + "/" + program)
    p.arguments = arguments
    let out = Pipe(), err = Pipe()
    p.standardOutput = out
    p.standardError = err
    p.standardInput = FileHandle.nullDevice
    try p.run()
    // Both pipes are drained at once: a full one would block the tool.
    let stderrText = Locked("")
    let reader = Thread { stderrText.withLock { $0 = String(decoding: err.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self) } }
    reader.start()
    let stdout = String(decoding: out.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
    let deadline = Date().addingTimeInterval(seconds)
    while p.isRunning && Date() < deadline { usleep(5_000) }
    if p.isRunning { kill(p.processIdentifier, SIGKILL) }
    p.waitUntilExit()
    _ = eventually(seconds: 5) { !reader.isExecuting }
    return ToolRun(status: p.terminationStatus, stdout: stdout, stderr: stderrText.current)
}

/// Runs any program (promtool, openssl) to the end; its status and its
/// standard output and error together.
func runProgram(_ executable: String, _ arguments: [String], in directory: String? = nil) throws -> (status: Int32, output: String) {
    let p = Process()
    p.executableURL = URL(fileURLWithPath: executable)
    p.arguments = arguments
    if let directory { p.currentDirectoryURL = URL(fileURLWithPath: directory) }
    let out = Pipe()
    p.standardOutput = out
    p.standardError = out
    try p.run()
    let text = String(decoding: out.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
    p.waitUntilExit()
    return (p.terminationStatus, text)
}

/// The port of a process's operations listener (its "operations at" line).
func adminPort(_ child: ChildProcess) throws -> Int {
    let line = try XCTUnwrap(child.waitForLine("operations at"), "no operations listener: \(child.output)")
    return try XCTUnwrap(Int(line.split(separator: ":").last!.split(separator: "/").first!))
}

/// `GET /metrics` of the operations listener on `port`.
func scrapeMetrics(_ port: Int) throws -> String {
    let c = try RawClient(port: port)
    c.send("GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    return try XCTUnwrap(c.readResponses(1).first).body
}

/// The value of the sample `name` (with its labels, if any) in an exposition.
func sample(_ text: String, _ name: String) -> Double? {
    text.split(separator: "\n").first { $0.hasPrefix(name + " ") }.flatMap { Double($0.split(separator: " ").last!) }
}
