import Glibc
import Logging
import SCIM
import Synchronization

/// swift-log handler writing one JSON object per line:
/// `{"ts":…,"level":…,"msg":…,"logger":…,<metadata>}`.
///
/// Request lines carry the trace id, method, path (without the query, which
/// may hold filter values), status and duration: never attribute values.
/// Lines go through a shared `LogSink`, which batches them into few writes.
public struct JSONLogHandler: LogHandler {
    public var metadata: Logger.Metadata = [:]
    public var logLevel: Logger.Level = .info
    public var metadataProvider: Logger.MetadataProvider?
    let label: String
    let sink: LogSink

    public init(label: String, sink: LogSink = .standardOutput) {
        self.label = label
        self.sink = sink
    }

    public subscript(metadataKey key: String) -> Logger.Metadata.Value? {
        get { metadata[key] }
        set { metadata[key] = newValue }
    }

    public func log(event: LogEvent) {
        var ts = timespec()
        clock_gettime(CLOCK_REALTIME, &ts)
        var line: [UInt8] = []
        line.reserveCapacity(256)
        func field(_ key: String, _ value: String) {
            line.append(line.isEmpty ? UInt8(ascii: "{") : UInt8(ascii: ","))
            appendJSONString(key, to: &line)
            line.append(UInt8(ascii: ":"))
            appendJSONString(value, to: &line)
        }
        field("ts", formatDateTime(secondsSinceEpoch: Int64(ts.tv_sec), milliseconds: ts.tv_nsec / 1_000_000))
        field("level", event.level.rawValue)
        field("msg", event.message.description)
        field("logger", label)
        var all = metadata
        if let extra = event.metadata { all.merge(extra) { _, new in new } }
        for (key, value) in all.sorted(by: { $0.key < $1.key }) {
            line.append(UInt8(ascii: ","))
            appendJSONString(key, to: &line)
            line.append(UInt8(ascii: ":"))
            line += JSONLogHandler.json(value).serialized()
        }
        line.append(UInt8(ascii: "}"))
        line.append(10)
        sink.append(line, urgent: event.level >= .warning)
    }

    static func json(_ value: Logger.Metadata.Value) -> JSON {
        switch value {
        case .string(let s): return Int64(s).map { .number(JSONNumber(integer: $0)) } ?? .string(s)
        case .stringConvertible(let c): return .string(c.description)
        case .array(let a): return .array(a.map(json))
        case .dictionary(let d): return .object(JSONObject(d.sorted { $0.key < $1.key }.map { ($0.key, json($0.value)) }))
        }
    }
}

/// Where log lines go: a buffer written out when it holds 32 KiB, when a
/// warning or error arrives, and at least every 100 ms by a background
/// thread (and by `flush()`, which `serve` calls before it exits). A request
/// then costs no write of its own; a crash loses at most the last 100 ms of
/// request lines, never anything acknowledged to a client.
public final class LogSink: Sendable {
    public static let standardOutput = LogSink(fd: 1)

    private let fd: Int32
    private let buffer = Mutex<[UInt8]>([])
    /// Serialises the writes themselves, so lines keep their order.
    private let writing = Mutex<Void>(())
    static let limit = 32 * 1024

    private init(fd: Int32) {
        self.fd = fd
        let context = Unmanaged.passRetained(self).toOpaque()
        var thread = pthread_t()
        if pthread_create(
            &thread, nil,
            { arg in
                let sink = Unmanaged<LogSink>.fromOpaque(arg!).takeRetainedValue()
                while true {
                    usleep(100_000)
                    sink.flush()
                }
            }, context) == 0
        {
            pthread_detach(thread)
        }
    }

    func append(_ line: [UInt8], urgent: Bool) {
        let full = buffer.withLock { b in
            b += line
            return b.count >= LogSink.limit
        }
        if full || urgent { flush() }
    }

    /// Writes out whatever is buffered.
    public func flush() {
        writing.withLock { _ in
            let pending = buffer.withLock { b -> [UInt8] in
                let out = b
                b.removeAll(keepingCapacity: true)
                return out
            }
            var offset = 0
            pending.withUnsafeBytes { raw in
                while offset < raw.count {
                    let n = write(fd, raw.baseAddress! + offset, raw.count - offset)
                    if n > 0 { offset += n } else if n < 0 && errno == EINTR { continue } else { break }
                }
            }
        }
    }
}

extension LogSink {
    /// One request line of the access log: the JSON `JSONLogHandler` writes
    /// for `logger.info("request", metadata: [method, ms, path, status,
    /// trace])`, same fields in the same order, built straight into bytes
    /// (no metadata dictionary, no sorting; the time's seconds cached).
    public func request(
        logger: String, method: String, path: Substring, status: Int, milliseconds: Int, trace: String,
        clock: inout LogClock
    ) {
        var line: [UInt8] = []
        line.reserveCapacity(160 + path.utf8.count)
        line += RequestLine.open
        clock.stamp(into: &line)
        line += RequestLine.level
        appendJSONString(logger, to: &line)
        line += RequestLine.method
        appendJSONString(method, to: &line)
        line += RequestLine.ms
        line += String(milliseconds).utf8
        line += RequestLine.path
        appendJSONString(String(path), to: &line)
        line += RequestLine.status
        line += String(status).utf8
        line += RequestLine.trace
        appendJSONString(trace, to: &line)
        line.append(UInt8(ascii: "}"))
        line.append(10)
        append(line, urgent: false)
    }
}

/// The fixed parts of an access-log line.
private enum RequestLine {
    static let open = Array(#"{"ts":""#.utf8)
    static let level = Array(#","level":"info","msg":"request","logger":"#.utf8)
    static let method = Array(#","method":"#.utf8)
    static let ms = Array(#","ms":"#.utf8)
    static let path = Array(#","path":"#.utf8)
    static let status = Array(#","status":"#.utf8)
    static let trace = Array(#","trace":"#.utf8)
}

/// The access log's timestamp, with the formatted second cached (one per loop).
public struct LogClock {
    private var second: Int = -1
    private var prefix: [UInt8] = []

    public init() {}

    /// Appends `2026-11-29T18:14:18.065Z"` (the closing quote included).
    public mutating func stamp(into out: inout [UInt8]) {
        var ts = timespec()
        clock_gettime(CLOCK_REALTIME, &ts)
        if ts.tv_sec != second {
            second = ts.tv_sec
            prefix = Array(formatDateTime(secondsSinceEpoch: Int64(ts.tv_sec), milliseconds: 0).utf8.dropLast(4))  // "….SSS" → up to the dot
        }
        out += prefix
        let ms = ts.tv_nsec / 1_000_000
        out.append(UInt8(48 + ms / 100))
        out.append(UInt8(48 + ms / 10 % 10))
        out.append(UInt8(48 + ms % 10))
        out.append(UInt8(ascii: "Z"))
        out.append(UInt8(ascii: "\""))
    }
}

/// One line to a file descriptor (standard output by default), unbuffered:
/// a SIGKILL must not eat a line a parent process waits for. Log lines
/// buffered in `LogSink.standardOutput` go first, so standard output keeps
/// its order. The programs' one writer of plain output lines.
public func writeLine(_ line: String, newline: Bool = true, fd: Int32 = 1) {
    LogSink.standardOutput.flush()
    let bytes = Array((line + (newline ? "\n" : "")).utf8)
    _ = bytes.withUnsafeBytes { write(fd, $0.baseAddress, $0.count) }
}
