internal import CYAML
import Glibc

/// A position in a YAML file (1-based).
public struct YAMLMark: Sendable, Equatable, CustomStringConvertible {
    public let line: Int
    public let column: Int
    public var description: String { "line \(line), column \(column)" }
}

/// A configuration error with where it is.
public struct ConfigError: Error, Sendable, CustomStringConvertible, Equatable {
    public let message: String
    public let mark: YAMLMark?
    public var file: String?
    public init(_ message: String, at mark: YAMLMark?, file: String? = nil) {
        self.message = message
        self.mark = mark
        self.file = file
    }
    public var description: String {
        (file.map { "\($0): " } ?? "") + message + (mark.map { " (at \($0))" } ?? "")
    }
}

/// A YAML node read by libyaml: scalars stay text until a field decides their type.
public indirect enum YAMLNode: Sendable {
    case scalar(String, plain: Bool, YAMLMark)
    case sequence([YAMLNode], YAMLMark)
    case mapping([(key: String, keyMark: YAMLMark, value: YAMLNode)], YAMLMark)

    public var mark: YAMLMark {
        switch self {
        case .scalar(_, _, let m), .sequence(_, let m), .mapping(_, let m): return m
        }
    }

    /// Parses one YAML document. Aliases, duplicate keys and non-scalar keys
    /// are refused: a configuration must say what it means once.
    public static func parse(_ text: String) throws(ConfigError) -> YAMLNode {
        // Heap-allocated: libyaml keeps pointers into the parser between calls.
        let parser = UnsafeMutablePointer<yaml_parser_t>.allocate(capacity: 1)
        parser.initialize(to: yaml_parser_t())
        defer { parser.deallocate() }
        guard yaml_parser_initialize(parser) == 1 else { throw ConfigError("cannot initialise the YAML parser", at: nil) }
        defer { yaml_parser_delete(parser) }
        let bytes = Array(text.utf8)
        return try bytes.withUnsafeBufferPointer { buf throws(ConfigError) in
            yaml_parser_set_input_string(parser, buf.baseAddress, buf.count)
            var reader = EventReader(parser: parser)
            return try reader.document()
        }
    }
}

private struct EventReader {
    let parser: UnsafeMutablePointer<yaml_parser_t>

    mutating func next() throws(ConfigError) -> (type: yaml_event_type_t, value: String, plain: Bool, mark: YAMLMark) {
        var event = yaml_event_t()
        guard yaml_parser_parse(parser, &event) == 1 else {
            let p = parser.pointee
            let problem = p.problem.map { String(cString: $0) } ?? "invalid YAML"
            throw ConfigError("YAML: \(problem)", at: YAMLMark(line: p.problem_mark.line + 1, column: p.problem_mark.column + 1))
        }
        defer { yaml_event_delete(&event) }
        let mark = YAMLMark(line: event.start_mark.line + 1, column: event.start_mark.column + 1)
        var value = ""
        var plain = false
        if event.type == YAML_SCALAR_EVENT {
            let s = event.data.scalar
            value = String(decoding: UnsafeBufferPointer(start: s.value, count: s.length), as: UTF8.self)
            plain = s.style == YAML_PLAIN_SCALAR_STYLE
        }
        return (event.type, value, plain, mark)
    }

    mutating func document() throws(ConfigError) -> YAMLNode {
        var e = try next()
        guard e.type == YAML_STREAM_START_EVENT else { throw ConfigError("expected a YAML stream", at: e.mark) }
        e = try next()
        if e.type == YAML_STREAM_END_EVENT { return .mapping([], e.mark) }  // an empty file
        guard e.type == YAML_DOCUMENT_START_EVENT else { throw ConfigError("expected a YAML document", at: e.mark) }
        let root = try node(try next())
        e = try next()
        guard e.type == YAML_DOCUMENT_END_EVENT else { throw ConfigError("expected the end of the document", at: e.mark) }
        e = try next()
        guard e.type == YAML_STREAM_END_EVENT else { throw ConfigError("only one YAML document is allowed", at: e.mark) }
        return root
    }

    mutating func node(_ e: (type: yaml_event_type_t, value: String, plain: Bool, mark: YAMLMark)) throws(ConfigError) -> YAMLNode {
        switch e.type {
        case YAML_SCALAR_EVENT:
            return .scalar(e.value, plain: e.plain, e.mark)
        case YAML_SEQUENCE_START_EVENT:
            var items: [YAMLNode] = []
            while true {
                let n = try next()
                if n.type == YAML_SEQUENCE_END_EVENT { break }
                items.append(try node(n))
            }
            return .sequence(items, e.mark)
        case YAML_MAPPING_START_EVENT:
            var members: [(key: String, keyMark: YAMLMark, value: YAMLNode)] = []
            while true {
                let k = try next()
                if k.type == YAML_MAPPING_END_EVENT { break }
                guard k.type == YAML_SCALAR_EVENT else { throw ConfigError("keys must be plain scalars", at: k.mark) }
                if members.contains(where: { $0.key == k.value }) {
                    throw ConfigError("key '\(k.value)' appears twice", at: k.mark)
                }
                members.append((k.value, k.mark, try node(try next())))
            }
            return .mapping(members, e.mark)
        case YAML_ALIAS_EVENT:
            throw ConfigError("YAML aliases are not supported in configuration files", at: e.mark)
        default:
            throw ConfigError("unexpected YAML content", at: e.mark)
        }
    }
}

/// Strict access to a mapping: every key must be read by the decoder, so
/// a misspelt or unknown key is an error with its line and column.
public struct YAMLMapping {
    let members: [(key: String, keyMark: YAMLMark, value: YAMLNode)]
    public let mark: YAMLMark
    let path: String
    private var used: Set<String> = []

    public init(_ node: YAMLNode, path: String) throws(ConfigError) {
        guard case .mapping(let m, let mark) = node else { throw ConfigError("'\(path)' must be a mapping", at: node.mark) }
        members = m
        self.mark = mark
        self.path = path
    }

    func full(_ key: String) -> String { path.isEmpty ? key : "\(path).\(key)" }

    public mutating func node(_ key: String) -> YAMLNode? {
        used.insert(key)
        return members.first { $0.key == key }?.value
    }

    public mutating func string(_ key: String) throws(ConfigError) -> String? {
        guard let n = node(key) else { return nil }
        guard case .scalar(let s, _, _) = n else { throw ConfigError("'\(full(key))' must be a string", at: n.mark) }
        return s
    }

    public mutating func int(_ key: String) throws(ConfigError) -> Int? {
        guard let n = node(key) else { return nil }
        guard case .scalar(let s, true, _) = n, let v = Int(s.replacingUnderscores) else {
            throw ConfigError("'\(full(key))' must be an integer", at: n.mark)
        }
        return v
    }

    public mutating func bool(_ key: String) throws(ConfigError) -> Bool? {
        guard let n = node(key) else { return nil }
        guard case .scalar(let s, true, _) = n, s == "true" || s == "false" else {
            throw ConfigError("'\(full(key))' must be true or false", at: n.mark)
        }
        return s == "true"
    }

    public mutating func strings(_ key: String) throws(ConfigError) -> [String]? {
        guard let n = node(key) else { return nil }
        guard case .sequence(let items, _) = n else { throw ConfigError("'\(full(key))' must be a list", at: n.mark) }
        var out: [String] = []
        for item in items {
            guard case .scalar(let s, _, _) = item else { throw ConfigError("'\(full(key))' must hold strings", at: item.mark) }
            out.append(s)
        }
        return out
    }

    public mutating func mapping(_ key: String) throws(ConfigError) -> YAMLMapping? {
        guard let n = node(key) else { return nil }
        return try YAMLMapping(n, path: full(key))
    }

    /// All entries, for free-form maps (e.g. attribute → rule).
    public mutating func entries() -> [(key: String, mark: YAMLMark, value: YAMLNode)] {
        for m in members { used.insert(m.key) }
        return members.map { ($0.key, $0.keyMark, $0.value) }
    }

    /// Throws for the first key nobody read.
    public func finish() throws(ConfigError) {
        if let unknown = members.first(where: { !used.contains($0.key) }) {
            throw ConfigError("unknown key '\(full(unknown.key))'", at: unknown.keyMark)
        }
    }
}

extension String {
    /// `1_000_000` → `1000000` (YAML-style digit grouping).
    var replacingUnderscores: String { String(filter { $0 != "_" }) }
}

/// Reads a whole file (configuration, keys, tokens).
public func readFileBytes(_ path: String) throws(ConfigError) -> [UInt8] {
    guard let f = fopen(path, "rb") else {
        throw ConfigError("cannot read \(path): \(String(cString: strerror(errno)))", at: nil)
    }
    defer { fclose(f) }
    var out: [UInt8] = []
    var buf = [UInt8](repeating: 0, count: 65536)
    while true {
        let n = fread(&buf, 1, buf.count, f)
        if n > 0 { out.append(contentsOf: buf[0..<n]) }
        if n < buf.count { break }
    }
    return out
}


/// Reads the YAML file at `path` and decodes it; every error names the file.
public func loadYAMLFile<T>(_ path: String, _ decode: (YAMLNode) throws(ConfigError) -> T) throws(ConfigError) -> T {
    do throws(ConfigError) {
        let text = String(decoding: try readFileBytes(path), as: UTF8.self)
        return try decode(try YAMLNode.parse(text))
    } catch {
        var e = error
        if e.file == nil { e.file = path }
        throw e
    }
}
