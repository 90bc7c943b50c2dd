internal import CYAML
import Glibc

/// A position in a YAML file (1-based).
public struct YAMLMark: Sendable, Equatable, CustomStringConvertible {
    public let line: Int
    public let column: Int
    public init(line: Int, column: Int) {
        self.line = line
        self.column = column
    }
    public var description: String { "line \(line), column \(column)" }
}

/// One configuration problem: where it is (file, line, column, YAML key),
/// what is wrong, and what to change.
public struct ConfigError: Error, Sendable, CustomStringConvertible, Equatable {
    public let message: String
    public let mark: YAMLMark?
    public var file: String?
    /// The YAML key it concerns, as a path: `broker.cert`, `targets[0].routes[1].filter`.
    public var key: String?
    /// What to change, when there is something better to say than the message.
    public var fix: String?
    /// A warning does not stop the service; check-config prints it and still exits 0.
    public var isWarning = false
    public init(_ message: String, at mark: YAMLMark?, file: String? = nil, key: String? = nil, fix: String? = nil, warning: Bool = false) {
        self.message = message
        self.mark = mark
        self.file = file
        self.key = key
        self.fix = fix
        self.isWarning = warning
    }
    /// `file:line:col: [warning: ]key: message (fix: …)`, leaving out what is not known:
    /// the form compilers use, so that editors and grep find the place.
    public var description: String {
        var place = file ?? ""
        if let mark { place += (place.isEmpty ? "" : ":") + "\(mark.line):\(mark.column)" }
        return (place.isEmpty ? "" : place + ": ") + (isWarning ? "warning: " : "") + (key.map { $0.isEmpty ? "" : "\($0): " } ?? "")
            + message + (fix.map { " (fix: \($0))" } ?? "")
    }
}

/// Every problem one reading of a configuration found: decoding goes on
/// after a problem, so that one run names them all.
public struct ConfigProblems: Error, Sendable, CustomStringConvertible {
    public var all: [ConfigError]
    public init(_ all: [ConfigError]) { self.all = all }
    public var errors: [ConfigError] { all.filter { !$0.isWarning } }
    public var description: String { all.map(\.description).joined(separator: "\n") }
}

/// Collects problems while a configuration is decoded and checked, with the
/// position of every key read, so that checks made after decoding (files,
/// cross-field) can still point at the line they concern.
/// One reading on one thread: not shared.
public final class ConfigDiagnostics {
    public private(set) var problems: [ConfigError] = []
    public let file: String?
    /// key path → the position of its value.
    public private(set) var marks: [String: YAMLMark] = [:]
    /// The YAML ended at a syntax error: keys after it are unread, not absent,
    /// so "is required" would be a false report.
    public internal(set) var truncated = false

    public init(file: String? = nil) { self.file = file }

    public var hasErrors: Bool { problems.contains { !$0.isWarning } }

    public func add(_ problem: ConfigError) {
        var p = problem
        if p.file == nil { p.file = file }
        if p.mark == nil, let key = p.key, let m = mark(key) {
            p = ConfigError(p.message, at: m, file: p.file, key: key, fix: p.fix, warning: p.isWarning)
        }
        problems.append(p)
    }

    /// A problem of `key`; without `mark`, at the value of `key` (or the nearest enclosing key read).
    public func error(_ key: String?, _ message: String, at mark: YAMLMark? = nil, fix: String? = nil) {
        add(ConfigError(message, at: mark, key: key, fix: fix))
    }

    public func warning(_ key: String?, _ message: String, at mark: YAMLMark? = nil, fix: String? = nil) {
        add(ConfigError(message, at: mark, key: key, fix: fix, warning: true))
    }

    public func record(_ key: String, _ mark: YAMLMark) { marks[key] = mark }

    /// Where `key` is, or the nearest enclosing key that was read (`targets[0].tokenFile` → `targets[0]`).
    public func mark(_ key: String) -> YAMLMark? {
        var k = Substring(key)
        while !k.isEmpty {
            if let m = marks[String(k)] { return m }
            guard let cut = k.lastIndex(where: { $0 == "." || $0 == "[" }) else { break }
            k = k[..<cut]
        }
        return nil
    }

    /// The problems in file order (those without a line last, in the order found).
    public var sorted: [ConfigError] {
        problems.enumerated().sorted { a, b in
            let la = a.element.mark.map { ($0.line, $0.column) } ?? (Int.max, 0),
                lb = b.element.mark.map { ($0.line, $0.column) } ?? (Int.max, 0)
            return la != lb ? la < lb : a.offset < b.offset
        }.map(\.element)
    }

    /// check-config's output: every problem in file order, then
    /// `FILE: N problems[, M warnings]`, or `FILE: ` + `ok()` when no
    /// problem is an error.
    public func report(ok: () -> String) -> (lines: [String], passed: Bool) {
        let errors = problems.filter { !$0.isWarning }.count, warnings = problems.count - errors
        let noted = warnings == 0 ? "" : ", \(warnings) warning\(warnings == 1 ? "" : "s")"
        let summary = errors == 0 ? ok() : "\(errors) problem\(errors == 1 ? "" : "s")"
        return (sorted.map(\.description) + ["\(file ?? "configuration"): \(summary)\(noted)"], errors == 0)
    }

    /// Throws every problem when one of them is an error (warnings alone do not stop the service).
    public func failIfErrors() throws(ConfigProblems) {
        if hasErrors { throw ConfigProblems(sorted) }
    }
}

/// A YAML node read by libyaml: scalars stay text until a field decides their type.
public indirect enum YAMLNode: Sendable {
    case scalar(String, plain: Bool, YAMLMark)
    case sequence([YAMLNode], YAMLMark)
    case mapping([(key: String, keyMark: YAMLMark, value: YAMLNode)], YAMLMark)
    /// Content already reported as a problem (an alias): decoders skip it
    /// without a second message.
    case invalid(YAMLMark)

    public var mark: YAMLMark {
        switch self {
        case .scalar(_, _, let m), .sequence(_, let m), .mapping(_, let m), .invalid(let m): return m
        }
    }

    /// Parses one YAML document, throwing every problem. Aliases, duplicate
    /// keys and non-scalar keys are refused: a configuration must say what it means once.
    public static func parse(_ text: String) throws(ConfigProblems) -> YAMLNode {
        let d = ConfigDiagnostics()
        let node = parse(text, d)
        try d.failIfErrors()
        return node
    }

    /// Parses one YAML document, recording problems in `diagnostics` and going
    /// on past those that are ours (a duplicate key, an alias). A syntax error
    /// ends it (libyaml cannot go on), but what was read before it is returned,
    /// so that its problems are reported too.
    public static func parse(_ text: String, _ diagnostics: ConfigDiagnostics) -> YAMLNode {
        // Heap-allocated: libyaml keeps pointers into the parser between calls.
        let parser = UnsafeMutablePointer<yaml_parser_t>.allocate(capacity: 1)
        parser.initialize(to: yaml_parser_t())
        defer { parser.deallocate() }
        guard yaml_parser_initialize(parser) == 1 else {
            diagnostics.error(nil, "cannot initialise the YAML parser")
            return .mapping([], YAMLMark(line: 1, column: 1))
        }
        defer { yaml_parser_delete(parser) }
        let bytes = Array(text.utf8)
        return bytes.withUnsafeBufferPointer { buf in
            yaml_parser_set_input_string(parser, buf.baseAddress, buf.count)
            var reader = EventReader(parser: parser, diagnostics: diagnostics)
            return reader.document()
        }
    }
}

private struct EventReader {
    typealias Event = (type: yaml_event_type_t, value: String, plain: Bool, mark: YAMLMark)
    let parser: UnsafeMutablePointer<yaml_parser_t>
    let diagnostics: ConfigDiagnostics

    /// The next event, or nil after a syntax error (recorded once).
    mutating func next() -> Event? {
        guard !diagnostics.truncated else { return nil }
        var event = yaml_event_t()
        guard yaml_parser_parse(parser, &event) == 1 else {
            let p = parser.pointee
            let problem = p.problem.map { String(cString: $0) } ?? "invalid YAML"
            let context = p.context.map { " " + String(cString: $0) } ?? ""
            diagnostics.error(
                nil, "YAML syntax: \(problem)\(context); nothing after this point was checked",
                at: YAMLMark(line: p.problem_mark.line + 1, column: p.problem_mark.column + 1),
                fix: "check the indentation and quoting here (a value holding ': ' or ' #' needs quotes)")
            diagnostics.truncated = true
            return nil
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

    mutating func document() -> YAMLNode {
        let empty = YAMLNode.mapping([], YAMLMark(line: 1, column: 1))
        guard let start = next() else { return empty }
        guard start.type == YAML_STREAM_START_EVENT else { diagnostics.error(nil, "expected a YAML stream", at: start.mark); return empty }
        guard let doc = next() else { return empty }
        if doc.type == YAML_STREAM_END_EVENT { return .mapping([], doc.mark) }  // an empty file
        guard doc.type == YAML_DOCUMENT_START_EVENT else { diagnostics.error(nil, "expected a YAML document", at: doc.mark); return empty }
        guard let first = next() else { return empty }
        let root = node(first, path: "")
        if let end = next(), end.type != YAML_DOCUMENT_END_EVENT {
            diagnostics.error(nil, "expected the end of the document", at: end.mark)
        } else if let end = next(), end.type != YAML_STREAM_END_EVENT {
            diagnostics.error(
                nil, "only one YAML document is allowed", at: end.mark, fix: "remove the '---' and what follows, or merge the documents")
        }
        return root
    }

    /// A node and everything in it; a container cut short by a syntax error
    /// holds what came before the error.
    mutating func node(_ e: Event, path: String) -> YAMLNode {
        switch e.type {
        case YAML_SCALAR_EVENT:
            return .scalar(e.value, plain: e.plain, e.mark)
        case YAML_SEQUENCE_START_EVENT:
            var items: [YAMLNode] = []
            while let n = next(), n.type != YAML_SEQUENCE_END_EVENT {
                items.append(node(n, path: "\(path)[\(items.count)]"))
            }
            return .sequence(items, e.mark)
        case YAML_MAPPING_START_EVENT:
            var members: [(key: String, keyMark: YAMLMark, value: YAMLNode)] = []
            while let k = next(), k.type != YAML_MAPPING_END_EVENT {
                guard k.type == YAML_SCALAR_EVENT else {
                    diagnostics.error(path.isEmpty ? nil : path, "keys must be plain scalars", at: k.mark)
                    _ = node(k, path: path)
                    if let v = next() { _ = node(v, path: path) }
                    continue
                }
                let key = path.isEmpty ? k.value : "\(path).\(k.value)"
                guard let v = next() else { break }
                let value = node(v, path: key)
                if let first = members.first(where: { $0.key == k.value }) {
                    diagnostics.error(
                        key, "appears twice (first at line \(first.keyMark.line)); the second is ignored", at: k.mark,
                        fix: "keep one of them")
                    continue
                }
                members.append((k.value, k.mark, value))
            }
            return .mapping(members, e.mark)
        case YAML_ALIAS_EVENT:
            diagnostics.error(
                path.isEmpty ? nil : path, "YAML aliases are not supported in configuration files", at: e.mark,
                fix: "write the value out")
            return .invalid(e.mark)
        default:
            diagnostics.error(path.isEmpty ? nil : path, "unexpected YAML content", at: e.mark)
            return .invalid(e.mark)
        }
    }
}

/// Strict access to a mapping: every key must be read by the decoder, so
/// a misspelt or unknown key is reported with its line and column (and the
/// key it probably meant). A value of the wrong type is reported and read
/// as absent, so that decoding goes on with the next key.
public struct YAMLMapping {
    let members: [(key: String, keyMark: YAMLMark, value: YAMLNode)]
    public let mark: YAMLMark
    public let path: String
    public let diagnostics: ConfigDiagnostics
    private var used: [String] = []

    /// Nil (reported unless already reported) when `node` is not a mapping.
    public init?(_ node: YAMLNode, path: String, _ diagnostics: ConfigDiagnostics) {
        if !path.isEmpty { diagnostics.record(path, node.mark) }
        switch node {
        case .mapping(let m, let mark):
            members = m
            self.mark = mark
            self.path = path
            self.diagnostics = diagnostics
        case .invalid:
            return nil
        default:
            diagnostics.error(path, "must be a mapping (KEY: VALUE lines, indented under it)", at: node.mark)
            return nil
        }
    }

    public func full(_ key: String) -> String { path.isEmpty ? key : "\(path).\(key)" }

    /// Whether `key` is written, even with a value already reported as invalid.
    public func has(_ key: String) -> Bool { members.contains { $0.key == key } }

    /// The value of `key`; nil when absent or already reported.
    public mutating func node(_ key: String) -> YAMLNode? {
        if !used.contains(key) { used.append(key) }
        guard let value = members.first(where: { $0.key == key })?.value else { return nil }
        diagnostics.record(full(key), value.mark)
        if case .invalid = value { return nil }
        return value
    }

    /// Reports a problem of the value of `key` (or of this mapping when it is absent).
    public func problem(_ key: String, _ message: String, fix: String? = nil) {
        diagnostics.error(full(key), message, at: members.first { $0.key == key }?.value.mark ?? mark, fix: fix)
    }

    public func warning(_ key: String, _ message: String, fix: String? = nil) {
        diagnostics.warning(full(key), message, at: members.first { $0.key == key }?.value.mark ?? mark, fix: fix)
    }

    public mutating func string(_ key: String) -> String? {
        guard let n = node(key) else { return nil }
        guard case .scalar(let s, _, _) = n else { problem(key, "must be a string"); return nil }
        return s
    }

    /// A string that must be there: its absence is reported (unless the file
    /// was cut short by a syntax error, when it may just not have been read).
    public mutating func required(_ key: String, _ what: String? = nil) -> String? {
        let s = string(key)
        if s == nil && !has(key) && !diagnostics.truncated {
            diagnostics.error(full(key), "is required" + (what.map { ": \($0)" } ?? ""), at: mark, fix: "add '\(key): …' here")
        }
        return s
    }

    public mutating func int(_ key: String) -> Int? {
        guard let n = node(key) else { return nil }
        guard case .scalar(let s, true, _) = n, let v = Int(s.replacingUnderscores) else {
            problem(key, "must be an integer"); return nil
        }
        return v
    }

    public mutating func bool(_ key: String) -> Bool? {
        guard let n = node(key) else { return nil }
        guard case .scalar(let s, true, _) = n, s == "true" || s == "false" else {
            problem(key, "must be true or false"); return nil
        }
        return s == "true"
    }

    /// A list of strings; an item that is not a string is reported and left out.
    public mutating func strings(_ key: String) -> [String]? {
        guard let n = node(key) else { return nil }
        let name = full(key)
        guard case .sequence(let items, _) = n else { problem(key, "must be a list ([a, b] or '- a' lines)"); return nil }
        var out: [String] = []
        for (i, item) in items.enumerated() {
            diagnostics.record("\(name)[\(i)]", item.mark)
            switch item {
            case .scalar(let s, _, _): out.append(s)
            case .invalid: break
            default: diagnostics.error("\(name)[\(i)]", "must be a string", at: item.mark)
            }
        }
        return out
    }

    /// The items of a list (each recorded as `key[i]`).
    public mutating func sequence(_ key: String) -> [YAMLNode]? {
        guard let n = node(key) else { return nil }
        guard case .sequence(let items, _) = n else { problem(key, "must be a list ('- …' entries)"); return nil }
        for (i, item) in items.enumerated() { diagnostics.record("\(full(key))[\(i)]", item.mark) }
        return items
    }

    public mutating func mapping(_ key: String) -> YAMLMapping? {
        guard let n = node(key) else { return nil }
        return YAMLMapping(n, path: full(key), diagnostics)
    }

    /// All entries, for free-form maps (e.g. attribute → rule); entries whose
    /// value was already reported are left out.
    public mutating func entries() -> [(key: String, mark: YAMLMark, value: YAMLNode)] {
        for m in members where !used.contains(m.key) { used.append(m.key) }
        var out: [(key: String, mark: YAMLMark, value: YAMLNode)] = []
        for m in members {
            diagnostics.record(full(m.key), m.value.mark)
            if case .invalid = m.value { continue }
            out.append((m.key, m.value.mark, m.value))
        }
        return out
    }

    /// Reports every key nobody read, with the key it probably meant among
    /// those read here (`also`: valid keys this decoding did not ask for).
    public func finish(also: [String] = []) {
        let known = used + also
        for m in members where !known.contains(m.key) {
            if let guess = closestKey(to: m.key, among: known) {
                diagnostics.error(full(m.key), "unknown key; did you mean '\(guess)'?", at: m.keyMark, fix: "rename it to '\(guess)'")
            } else {
                diagnostics.error(
                    full(m.key), "unknown key", at: m.keyMark,
                    fix: known.isEmpty ? "remove it" : "remove it; the keys here are " + known.joined(separator: ", "))
            }
        }
    }
}

/// The candidate `key` was most likely meant to be: an edit distance of at
/// most 2 (ignoring case), or one a prefix of the other (at least 3
/// characters); the closest wins, the first on a tie. Nil when none is close.
public func closestKey(to key: String, among candidates: [String]) -> String? {
    let k = Array(key.asciiLowercasedBytes)
    var best: (String, Int)?
    for c in candidates {
        let cb = Array(c.asciiLowercasedBytes)
        var d = editDistance(k, cb)
        let shorter = min(k.count, cb.count)
        if d > 2, shorter >= 3, k.starts(with: cb) || cb.starts(with: k) { d = 2 }
        if d <= 2, d < (best?.1 ?? Int.max), d < max(k.count, cb.count) { best = (c, d) }
    }
    return best?.0
}

/// Levenshtein distance (insertions, deletions, substitutions).
func editDistance(_ a: [UInt8], _ b: [UInt8]) -> Int {
    guard !a.isEmpty else { return b.count }
    guard !b.isEmpty else { return a.count }
    var previous = Array(0...b.count), current = [Int](repeating: 0, count: b.count + 1)
    for i in 1...a.count {
        current[0] = i
        for j in 1...b.count {
            current[j] = Swift.min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (a[i - 1] == b[j - 1] ? 0 : 1))
        }
        swap(&previous, &current)
    }
    return previous[b.count]
}

extension String {
    /// `1_000_000` → `1000000` (YAML-style digit grouping).
    var replacingUnderscores: String { String(filter { $0 != "_" }) }
    var asciiLowercasedBytes: [UInt8] { utf8.map { $0 >= 65 && $0 <= 90 ? $0 + 32 : $0 } }
}

/// Why a bearer token this service accepts is too weak to keep, or nil: a
/// placeholder left from an example (`change-me`, `changeme`, `secret`,
/// `token`, `password`, `example`, `test`, any case), or shorter than 16
/// characters (a guessable secret: `head -c 32 /dev/urandom | base64` gives 44).
public func weakTokenReason(_ token: String) -> String? {
    let lower = String(decoding: token.asciiLowercasedBytes, as: UTF8.self)
    let placeholders = ["change-me", "changeme", "change_me", "secret", "token", "password", "example", "test"]
    if placeholders.contains(lower) || lower.contains("change-me") || lower.contains("changeme") { return "is a placeholder" }
    if token.count < 16 { return "is shorter than 16 characters" }
    return nil
}

/// How to make a token that `weakTokenReason` accepts.
public let tokenFix = "generate one with: head -c 32 /dev/urandom | base64"

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

/// The tokens in a token file: one per line; blank lines and `#` comments
/// are skipped, surrounding spaces trimmed.
public func readTokenLines(_ path: String) throws(ConfigError) -> [String] {
    let text = String(decoding: try readFileBytes(path), as: UTF8.self)
    var tokens: [String] = []
    for line in text.split(whereSeparator: { $0 == "\n" || $0 == "\r\n" || $0 == "\r" }) {
        let token = String(line.drop { $0 == " " || $0 == "\t" }.reversed().drop { $0 == " " || $0 == "\t" || $0 == "\r" }.reversed())
        if !token.isEmpty && !token.hasPrefix("#") { tokens.append(token) }
    }
    return tokens
}

/// Reads and parses the YAML file at `path`, recording its problems; nil
/// when it cannot be read.
public func readYAMLFile(_ path: String, _ diagnostics: ConfigDiagnostics) -> YAMLNode? {
    do throws(ConfigError) {
        return YAMLNode.parse(String(decoding: try readFileBytes(path), as: UTF8.self), diagnostics)
    } catch {
        diagnostics.error(nil, error.message)
        return nil
    }
}

/// A configuration read from one YAML file: a type says how to decode its
/// document (recording every problem and going on), and gets the ways to
/// load it from this one place.
public protocol YAMLConfiguration {
    /// Decodes what is valid and records a problem for everything else; the
    /// result is meaningful only when no error was recorded.
    static func decode(_ root: YAMLNode, _ diagnostics: ConfigDiagnostics) -> Self
}

extension YAMLConfiguration {
    /// Reads the file strictly: every problem is thrown together, each with
    /// its line and column.
    public static func load(file path: String) throws(ConfigProblems) -> Self {
        let d = ConfigDiagnostics(file: path)
        let config = read(file: path, d)
        try d.failIfErrors()
        return config!
    }

    /// Reads and decodes `path`, recording every problem in `diagnostics`
    /// (nil only when the file cannot be read at all).
    public static func read(file path: String, _ diagnostics: ConfigDiagnostics) -> Self? {
        readYAMLFile(path, diagnostics).map { decode($0, diagnostics) }
    }

    /// Decodes a parsed document, throwing every problem.
    public static func decode(_ root: YAMLNode) throws(ConfigProblems) -> Self {
        let d = ConfigDiagnostics()
        let config = decode(root, d)
        try d.failIfErrors()
        return config
    }
}
