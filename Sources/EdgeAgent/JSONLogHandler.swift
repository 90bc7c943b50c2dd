import Glibc
import Logging
import SCIM

/// swift-log handler writing one JSON object per line:
/// `{"ts":…,"level":…,"msg":…,"logger":…,<metadata>}`.
///
/// Request lines carry the trace id, method, path (without the query, which
/// may hold filter values), status and duration: never attribute values.
public struct JSONLogHandler: LogHandler {
    public var metadata: Logger.Metadata = [:]
    public var logLevel: Logger.Level = .info
    public var metadataProvider: Logger.MetadataProvider?
    let label: String
    let fd: Int32

    public init(label: String, fd: Int32 = 1) {
        self.label = label
        self.fd = fd
    }

    public subscript(metadataKey key: String) -> Logger.Metadata.Value? {
        get { metadata[key] }
        set { metadata[key] = newValue }
    }

    public func log(event: LogEvent) {
        var ts = timespec()
        clock_gettime(CLOCK_REALTIME, &ts)
        var line = JSONObject([
            ("ts", .string(formatDateTime(secondsSinceEpoch: Int64(ts.tv_sec), milliseconds: ts.tv_nsec / 1_000_000))),
            ("level", .string(event.level.rawValue)),
            ("msg", .string(event.message.description)),
            ("logger", .string(label)),
        ])
        var all = metadata
        if let extra = event.metadata { all.merge(extra) { _, new in new } }
        for (key, value) in all.sorted(by: { $0.key < $1.key }) { line[key] = JSONLogHandler.json(value) }
        var bytes = JSON.object(line).serialized()
        bytes.append(10)
        _ = bytes.withUnsafeBytes { write(fd, $0.baseAddress, $0.count) }
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
