import EdgeTestSupport
import Foundation
import XCTest

/// Debian's Chromium, headless, driven over the DevTools protocol (a
/// WebSocket of its own on loopback): the test loads a page, runs the
/// page's own event handlers (a click is `element.click()` in the page),
/// reads the rendered DOM and takes a screenshot. The DevTools port is the
/// one Chromium picked and wrote into its profile (`DevToolsActivePort`).
final class HeadlessChromium {
    let process = Process()
    let profile = TempDirectory("edge-chromium")
    private var socket: RawClient!
    private var buffer: [UInt8] = []
    private var nextID = 1

    /// The Chromium of the machine (`make deps` installs Debian's), or nil.
    static var executable: String? {
        for dir in (ProcessInfo.processInfo.environment["PATH"] ?? "/usr/bin").split(separator: ":") {
            let path = "\(dir)/chromium"
            if FileManager.default.isExecutableFile(atPath: path) { return path }
        }
        return nil
    }

    init(width: Int, height: Int) throws {
        guard let executable = Self.executable else { throw TestSetupError("chromium is not installed") }
        process.executableURL = URL(fileURLWithPath: executable)
        process.arguments = [
            "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--no-default-browser-check", "--disable-extensions",
            "--disable-background-networking", "--disable-sync", "--disable-dev-shm-usage", "--hide-scrollbars", "--mute-audio",
            "--user-data-dir=\(profile.path)", "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0",
            "--window-size=\(width),\(height)", "about:blank",
        ]
        let log = FileHandle(forWritingAtPath: profile.write("chromium.log", ""))
        process.standardOutput = log
        process.standardError = log
        try process.run()
        let portFile = profile.file("DevToolsActivePort")
        var port = 0
        guard
            eventually(
                seconds: 30,
                {
                    port = (try? String(contentsOfFile: portFile, encoding: .utf8))?.split(separator: "\n").first.flatMap { Int($0) } ?? 0
                    return port > 0
                })
        else { throw TestSetupError("chromium did not start: \(log_)") }
        // The page's WebSocket, from the list of targets.
        var page: String?
        _ = eventually(seconds: 10) {
            guard let c = try? RawClient(port: port) else { return false }
            c.send("GET /json/list HTTP/1.1\r\nHost: 127.0.0.1:\(port)\r\nConnection: close\r\n\r\n")
            guard let body = c.readResponses(1).first?.body,
                let list = try? JSONSerialization.jsonObject(with: Data(body.utf8)) as? [[String: Any]]
            else { return false }
            page = list.first { $0["type"] as? String == "page" }?["webSocketDebuggerUrl"] as? String
            return page != nil
        }
        guard let page, let path = page.range(of: "/devtools/").map({ String(page[$0.lowerBound...]) }) else {
            throw TestSetupError("no page in chromium's targets")
        }
        socket = try RawClient(port: port, timeoutSeconds: 30)
        socket.send(
            "GET \(path) HTTP/1.1\r\nHost: 127.0.0.1:\(port)\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                + "Sec-WebSocket-Key: \(Data((0..<16).map { _ in UInt8.random(in: 0...255) }).base64EncodedString())\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        while !buffer.contains(subsequence: [13, 10, 13, 10]) { try fill() }
        let end = buffer.firstRange(of: [13, 10, 13, 10])!.upperBound
        let head = String(decoding: buffer[..<end], as: UTF8.self)
        buffer.removeFirst(end)
        guard head.hasPrefix("HTTP/1.1 101") else { throw TestSetupError("no WebSocket: \(head)") }
    }

    private var log_: String { (try? String(contentsOfFile: profile.file("chromium.log"), encoding: .utf8)) ?? "" }

    deinit { close() }

    /// Asks the browser to close, then kills what is left of it.
    func close() {
        if process.isRunning {
            _ = try? send("Browser.close", [:], wait: false)
            let deadline = Date().addingTimeInterval(5)
            while process.isRunning && Date() < deadline { usleep(20_000) }
            if process.isRunning { kill(process.processIdentifier, SIGKILL) }
            process.waitUntilExit()
        }
        profile.remove()
    }

    private func fill() throws {
        var chunk = [UInt8](repeating: 0, count: 65536)
        let n = recv(socket.fd, &chunk, chunk.count, 0)
        guard n > 0 else { throw TestSetupError("the DevTools connection closed") }
        buffer.append(contentsOf: chunk[0..<n])
    }

    /// One text message (a client's frames are masked, RFC 6455 §5.3).
    private func sendFrame(_ text: String) {
        let payload = Array(text.utf8)
        var frame: [UInt8] = [0x81]
        if payload.count < 126 {
            frame.append(0x80 | UInt8(payload.count))
        } else if payload.count < 65536 {
            frame += [0x80 | 126, UInt8(payload.count >> 8), UInt8(payload.count & 0xff)]
        } else {
            frame.append(0x80 | 127)
            for i in (0..<8).reversed() { frame.append(UInt8((payload.count >> (8 * i)) & 0xff)) }
        }
        let mask = (0..<4).map { _ in UInt8.random(in: 0...255) }
        frame += mask
        for (i, b) in payload.enumerated() { frame.append(b ^ mask[i % 4]) }
        socket.send(frame)
    }

    /// The next whole message from the browser (continuations joined; pings answered).
    private func receiveMessage() throws -> [UInt8] {
        var message: [UInt8] = []
        while true {
            while buffer.count < 2 { try fill() }
            let opcode = buffer[0] & 0x0f, fin = buffer[0] & 0x80 != 0
            var length = Int(buffer[1] & 0x7f), offset = 2
            if length == 126 {
                while buffer.count < 4 { try fill() }
                length = Int(buffer[2]) << 8 | Int(buffer[3])
                offset = 4
            } else if length == 127 {
                while buffer.count < 10 { try fill() }
                length = (2..<10).reduce(0) { $0 << 8 | Int(buffer[$1]) }
                offset = 10
            }
            while buffer.count < offset + length { try fill() }
            let payload = Array(buffer[offset..<(offset + length)])
            buffer.removeFirst(offset + length)
            switch opcode {
            case 0x8: throw TestSetupError("the browser closed the DevTools connection")
            case 0x9: socket.send([0x8a, 0x80, 0, 0, 0, 0])  // pong, empty, masked with zeros
            case 0xa: break
            default:
                message += payload
                if fin { return message }
            }
        }
    }

    /// A DevTools command and its result (events in between are skipped).
    @discardableResult
    func send(_ method: String, _ params: [String: Any], wait: Bool = true) throws -> [String: Any] {
        let id = nextID
        nextID += 1
        let data = try JSONSerialization.data(withJSONObject: ["id": id, "method": method, "params": params])
        sendFrame(String(decoding: data, as: UTF8.self))
        guard wait else { return [:] }
        while true {
            let message = try receiveMessage()
            guard let o = try JSONSerialization.jsonObject(with: Data(message)) as? [String: Any], o["id"] as? Int == id else { continue }
            if let error = o["error"] { throw TestSetupError("\(method): \(error)") }
            return o["result"] as? [String: Any] ?? [:]
        }
    }

    func navigate(_ url: String) throws { try send("Page.navigate", ["url": url]) }

    /// `expression` evaluated in the page (a promise awaited): its value.
    func evaluate(_ expression: String) throws -> Any? {
        let r = try send("Runtime.evaluate", ["expression": expression, "returnByValue": true, "awaitPromise": true])
        if let e = r["exceptionDetails"] { throw TestSetupError("the page threw: \(e)") }
        return (r["result"] as? [String: Any])?["value"]
    }

    /// The text of the element `selector` names ("" when there is none).
    func text(_ selector: String) -> String {
        (try? evaluate("(document.querySelector(\(quoted(selector))) || {}).innerText || ''")) as? String ?? ""
    }

    /// Whether `condition` (a JavaScript expression) holds within `seconds`.
    func waitFor(_ condition: String, seconds: Double = 20) -> Bool {
        eventually(seconds: seconds) { (try? evaluate("!!(\(condition))")) as? Bool == true }
    }

    /// The viewport as a PNG.
    func screenshot() throws -> Data {
        let r = try send("Page.captureScreenshot", ["format": "png"])
        guard let b64 = r["data"] as? String, let data = Data(base64Encoded: b64) else { throw TestSetupError("no screenshot") }
        return data
    }
}

/// A JavaScript string literal.
func quoted(_ s: String) -> String {
    String(decoding: try! JSONSerialization.data(withJSONObject: [s]), as: UTF8.self).dropFirst().dropLast().description
}

extension Array where Element == UInt8 {
    func contains(subsequence: [UInt8]) -> Bool { firstRange(of: subsequence) != nil }
}
