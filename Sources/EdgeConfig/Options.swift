import EdgeLoop

/// What an option takes, and so how its YAML value and its flag are read,
/// checked and documented.
public enum OptionKind: Sendable, Equatable {
    /// Free text (a name, a filter).
    case text
    /// A file or directory.
    case path
    /// `HOST:PORT`.
    case address
    /// `HOST:PORT`, or `none` to turn the listener off.
    case addressOrNone
    /// A URL (its form is checked by the option's binding).
    case url
    /// An integer within these bounds (`_` separators allowed in YAML).
    case integer(ClosedRange<Int>)
    /// `true` or `false` in YAML; a flag without a value.
    case boolean
    /// One of these words.
    case choice([String])
    /// A list of strings in YAML; a repeatable flag.
    case list
    /// A mapping of its own, decoded by the program (a policy, the domains):
    /// listed here so that it is documented and known; its `children`
    /// document its keys.
    case section
    /// A list of mappings (the targets), each entry with the `children` keys.
    case sections
}

/// When an option must be given.
public enum OptionRequirement: Sendable, Equatable {
    case optional
    /// Always (the data directory).
    case always
    /// Whenever its mapping is there (`broker.url` once there is a `broker:`).
    case withSection
}

/// One option of a program, declared once: its YAML path, its flag, what it
/// takes, its default, its bounds and its help. The program's table of
/// these drives flag parsing, YAML decoding, the defaults, `--help`, the
/// configuration file's man page and `docs/configuration.md`.
public struct OptionSpec: Sendable {
    /// Dotted YAML path (`limits.maxBodyBytes`); nil for a flag-only option.
    public let key: String?
    /// The long flag without its dashes (`max-body-bytes`); nil for a file-only option.
    public let flag: String?
    public let kind: OptionKind
    /// The default, written as in YAML; nil when there is none.
    public let defaultValue: String?
    /// The value's placeholder in `--help` (`HOST:PORT`, `FILE`, `N`).
    public let valueName: String
    public let help: String
    public let required: OptionRequirement
    /// A section's keys, relative to it (for the reference and for writing
    /// a file; the section's own decoding reads them).
    public let children: [OptionSpec]

    public init(
        _ key: String?, flag: String? = nil, _ kind: OptionKind, default defaultValue: String? = nil, value valueName: String? = nil,
        required: OptionRequirement = .optional, _ help: String, children: [OptionSpec] = []
    ) {
        self.key = key
        self.children = children
        self.flag = flag
        self.kind = kind
        self.defaultValue = defaultValue
        self.help = help
        self.required = required
        self.valueName = valueName ?? OptionSpec.placeholder(kind)
    }

    static func placeholder(_ kind: OptionKind) -> String {
        switch kind {
        case .text, .list: return "TEXT"
        case .path: return "FILE"
        case .address, .addressOrNone: return "HOST:PORT"
        case .url: return "URL"
        case .integer: return "N"
        case .boolean: return ""
        case .choice(let words): return words.joined(separator: "|")
        case .section, .sections: return "…"
        }
    }

    /// The last component of the key (what is written in its mapping).
    public var name: String { key.map { String($0.split(separator: ".").last ?? "") } ?? "" }
    /// The mapping the key is in (`limits` for `limits.maxBodyBytes`; "" at the top).
    public var section: String {
        guard let key, let dot = key.lastIndex(of: ".") else { return "" }
        return String(key[..<dot])
    }

    /// What the value may be, in words (for errors and the reference).
    public var accepted: String {
        switch kind {
        case .text: return "text"
        case .path: return "a path"
        case .address: return "HOST:PORT"
        case .addressOrNone: return "HOST:PORT or none"
        case .url: return "a URL"
        case .integer(let r): return "\(grouped(r.lowerBound)) to \(grouped(r.upperBound))"
        case .boolean: return "true or false"
        case .choice(let words): return words.count == 2 ? "\(words[0]) or \(words[1])" : words.joined(separator: ", ")
        case .list: return "a list"
        case .section: return "a mapping"
        case .sections: return "a list of mappings"
        }
    }

    /// The default of an integer option, for the library's own defaults
    /// (`EndpointOptions.maxResults`…), so that it is written here only.
    public var defaultInteger: Int { Int(defaultValue!.replacingUnderscores)! }

    /// The help as `--help` shows it: the text, then the default.
    public var flagHelp: String { help + (defaultValue.map { " (default \($0))" } ?? "") }

    /// Reads a value as written on the command line (or in YAML, as text);
    /// the problem, in words, when it is not acceptable.
    public func parse(_ text: String) -> Result<OptionValue, OptionProblem> {
        switch kind {
        case .text, .path, .url, .section, .sections:
            return .success(.text(text))
        case .list:
            return .success(.list([text]))
        case .address, .addressOrNone:
            if kind == .addressOrNone && text == "none" { return .success(.address(nil)) }
            guard let a = SocketAddress(text) else { return .failure(OptionProblem("must be \(accepted), got '\(text)'")) }
            return .success(.address(a))
        case .integer(let r):
            guard let n = Int(text.replacingUnderscores) else { return .failure(OptionProblem("must be an integer, got '\(text)'")) }
            guard r.contains(n) else { return .failure(OptionProblem("must be \(accepted), got \(grouped(n))")) }
            return .success(.integer(n))
        case .boolean:
            guard text == "true" || text == "false" else { return .failure(OptionProblem("must be true or false, got '\(text)'")) }
            return .success(.boolean(text == "true"))
        case .choice(let words):
            guard words.contains(text) else {
                return .failure(
                    OptionProblem(
                        "must be \(accepted), got '\(text)'" + (closestKey(to: text, among: words).map { "; did you mean '\($0)'?" } ?? ""))
                )
            }
            return .success(.text(text))
        }
    }
}

/// A value read for an option, already checked against its kind.
public enum OptionValue: Sendable, Equatable {
    case text(String)
    case integer(Int)
    case boolean(Bool)
    /// nil: `none`.
    case address(SocketAddress?)
    case list([String])

    public var text: String {
        switch self {
        case .text(let s): return s
        case .integer(let n): return String(n)
        case .boolean(let b): return b ? "true" : "false"
        case .address(let a): return a.map { "\($0)" } ?? "none"
        case .list(let l): return l.joined(separator: ",")
        }
    }
    public var integer: Int {
        if case .integer(let n) = self { return n }
        return 0
    }
    public var boolean: Bool {
        if case .boolean(let b) = self { return b }
        return false
    }
    public var address: SocketAddress? {
        if case .address(let a) = self { return a }
        return nil
    }
    public var list: [String] {
        if case .list(let l) = self { return l }
        return [text]
    }
}

/// Why a value was refused, in words, with what to do when there is more to
/// say than the accepted values.
public struct OptionProblem: Error, Sendable, CustomStringConvertible {
    public let message: String
    public let fix: String?
    public init(_ message: String, fix: String? = nil) {
        self.message = message
        self.fix = fix
    }
    public var description: String { message + (fix.map { " (fix: \($0))" } ?? "") }
}

/// An option with what it does to a configuration.
public struct OptionBinding<Config>: Sendable {
    public let spec: OptionSpec
    /// Sets the value; a problem refuses it (reported at the key or flag).
    let apply: @Sendable (inout Config, OptionValue) -> OptionProblem?
    /// For a section: decodes the node itself, reporting into the diagnostics.
    let decodeSection: (@Sendable (YAMLNode, String, ConfigDiagnostics, inout Config) -> Void)?
    /// Read by the caller after the table's pass (options whose meaning
    /// depends on each other, such as a target's collisions and namespace).
    let manual: Bool

    public init(_ spec: OptionSpec, _ apply: @escaping @Sendable (inout Config, OptionValue) -> OptionProblem?) {
        self.spec = spec
        self.apply = apply
        self.decodeSection = nil
        self.manual = false
    }

    /// An option that sets one property to its text as it is.
    public init(_ spec: OptionSpec, _ property: WritableKeyPath<Config, String> & Sendable) {
        self.init(spec) { c, v in
            c[keyPath: property] = v.text
            return nil
        }
    }

    /// An option that sets one optional property to its text.
    public init(_ spec: OptionSpec, _ property: WritableKeyPath<Config, String?> & Sendable) {
        self.init(spec) { c, v in
            c[keyPath: property] = v.text
            return nil
        }
    }

    /// An option that sets one property to its integer (the spec checks the bounds).
    public init(_ spec: OptionSpec, _ property: WritableKeyPath<Config, Int> & Sendable) {
        self.init(spec) { c, v in
            c[keyPath: property] = v.integer
            return nil
        }
    }

    /// A choice option that sets one property of an enumeration of the
    /// choices (the spec has checked the text is one of them).
    public init<Choice: RawRepresentable & SendableMetatype>(_ spec: OptionSpec, _ property: WritableKeyPath<Config, Choice> & Sendable)
    where Choice.RawValue == String {
        self.init(spec) { c, v in
            guard let choice = Choice(rawValue: v.text) else { return OptionProblem("is not one of the choices: '\(v.text)'") }
            c[keyPath: property] = choice
            return nil
        }
    }

    /// A section: its own decoding from the YAML node at `path`; `flag`
    /// applies the section's flag (`--domain NAME=IDENTITY`), when it has one.
    public init(
        section spec: OptionSpec, flag: @escaping @Sendable (inout Config, OptionValue) -> OptionProblem? = { _, _ in nil },
        _ decode: @escaping @Sendable (YAMLNode, _ path: String, ConfigDiagnostics, inout Config) -> Void
    ) {
        self.spec = spec
        self.apply = flag
        self.decodeSection = decode
        self.manual = false
    }

    /// Declared here (documented, known), read by the caller.
    public init(manual spec: OptionSpec) {
        self.spec = spec
        self.apply = { _, _ in nil }
        self.decodeSection = nil
        self.manual = true
    }
}

/// A program's options bound to its configuration type: built once from its
/// table of `OptionSpec`s (every spec must be bound, in the table's order,
/// which `init` checks).
public struct OptionTable<Config>: Sendable {
    public let specs: [OptionSpec]
    let bindings: [OptionBinding<Config>]

    public init(_ specs: [OptionSpec], _ bindings: [OptionBinding<Config>]) {
        let declared = specs.map { $0.key ?? "--" + ($0.flag ?? "") }
        let bound = bindings.map { $0.spec.key ?? "--" + ($0.spec.flag ?? "") }
        precondition(declared == bound, "option table and bindings disagree: \(declared) vs \(bound)")
        self.specs = specs
        self.bindings = bindings
    }

    /// `base` with every default of the table applied: the one place a
    /// program's defaults come from, with or without a configuration file.
    /// Options of a section that exists only when given (one with
    /// `.withSection` keys, such as `broker`) get theirs from
    /// `applyDefaults(section:)` when it is created.
    public func defaults(_ base: Config) -> Config {
        var config = base
        let optional = Set(bindings.filter { $0.spec.required == .withSection }.map(\.spec.section))
        for b in bindings where !optional.contains(b.spec.section) { applyDefault(b, &config) }
        return config
    }

    /// The defaults of the options in `section` (`broker`).
    public func applyDefaults(section: String, to config: inout Config) {
        for b in bindings where b.spec.section == section { applyDefault(b, &config) }
    }

    private func applyDefault(_ b: OptionBinding<Config>, _ config: inout Config) {
        guard !b.manual, let text = b.spec.defaultValue, case .success(let v) = b.spec.parse(text) else { return }
        if let problem = b.apply(&config, v) { preconditionFailure("default of \(b.spec.key ?? "?"): \(problem)") }
    }

    /// Decodes the keys of the table in `m` (the document, or one entry of
    /// a list) into `config`: each checked against its kind and bounds,
    /// sections by their own decoding, nested mappings finished (their
    /// unknown keys reported). The caller reads its manual keys and then
    /// calls `m.finish()`.
    public func decode(_ m: inout YAMLMapping, into config: inout Config) {
        decode(&m, at: [], into: &config)
    }

    private func decode(_ m: inout YAMLMapping, at prefix: [Substring], into config: inout Config) {
        var visited: [Substring] = []
        for b in bindings where !b.manual {
            guard let key = b.spec.key else { continue }
            let parts = key.split(separator: ".")
            guard parts.count > prefix.count, Array(parts[..<prefix.count]) == prefix else { continue }
            let name = String(parts[prefix.count])
            if parts.count > prefix.count + 1 {
                guard !visited.contains(parts[prefix.count]) else { continue }
                visited.append(parts[prefix.count])
                if var sub = m.mapping(name) {
                    decode(&sub, at: prefix + [parts[prefix.count]], into: &config)
                    sub.finish()
                }
                continue
            }
            if let section = b.decodeSection {
                if let node = m.node(name) { section(node, m.full(name), m.diagnostics, &config) }
            } else if let value = m.read(b.spec, name) {
                if let problem = b.apply(&config, value) { m.problem(name, problem.message, fix: problem.fix) }
            }
            let needed = b.spec.required == .always || (b.spec.required == .withSection && !prefix.isEmpty)
            if needed && !m.has(name) && !m.diagnostics.truncated {
                m.diagnostics.error(m.full(name), "is required: \(b.spec.help)", at: m.mark, fix: "add '\(name): …' here")
            }
        }
    }

    /// Applies flags (`name` without dashes, value as typed; a boolean flag
    /// given is `true`) over `config`, in the order given. `fromFile`: the
    /// keys a configuration file set, so that an option another needs may
    /// come from either. Every problem is reported, one line each, naming
    /// the flag.
    public func apply(flags: [(name: String, value: String)], to config: inout Config, fromFile: Set<String>? = nil) throws(OptionProblems)
    {
        var problems: [String] = []
        var given = fromFile ?? []
        for (name, value) in flags {
            guard let b = bindings.first(where: { $0.spec.flag == name }) else {
                problems.append("--\(name): not an option of this command")
                continue
            }
            switch b.spec.parse(value) {
            case .failure(let p): problems.append("--\(name) \(p)")
            case .success(let v):
                if let p = b.apply(&config, v) { problems.append("--\(name) \(value): \(p)") }
                if let key = b.spec.key { given.insert(key) }
            }
        }
        for b in bindings {
            guard let key = b.spec.key, !given.contains(key) else { continue }
            let what = b.spec.flag.map { "--\($0)" } ?? "'\(key)' in a configuration file"
            if b.spec.required == .always && fromFile == nil {
                problems.append("\(what) is required: \(b.spec.help)")
            } else if b.spec.required == .withSection {
                // A section's required options, once anything of the section is given.
                let section = b.spec.section + "."
                guard let cause = bindings.first(where: { ($0.spec.key.map { given.contains($0) && $0.hasPrefix(section) }) ?? false })
                else { continue }
                let by = cause.spec.flag.map { "--\($0)" } ?? "'\(cause.spec.key!)'"
                problems.append("\(by) needs \(what): \(b.spec.help)")
            }
        }
        if !problems.isEmpty { throw OptionProblems(problems) }
    }
}

/// Every problem with the flags given, one per line.
public struct OptionProblems: Error, Sendable, CustomStringConvertible {
    public let lines: [String]
    public init(_ lines: [String]) { self.lines = lines }
    public var description: String { lines.joined(separator: "\n") }
}

extension YAMLMapping {
    /// The value of `key` read as `spec` takes it, nil (reported) when it is not.
    public mutating func read(_ spec: OptionSpec, _ key: String) -> OptionValue? {
        switch spec.kind {
        case .section, .sections:
            return nil
        case .list:
            return strings(key).map(OptionValue.list)
        case .integer:
            guard let n = int(key) else { return nil }
            return checked(spec, key, String(n))
        case .boolean:
            return bool(key).map(OptionValue.boolean)
        case .text, .path, .url, .address, .addressOrNone, .choice:
            guard let s = string(key) else { return nil }
            return checked(spec, key, s)
        }
    }

    private func checked(_ spec: OptionSpec, _ key: String, _ text: String) -> OptionValue? {
        switch spec.parse(text) {
        case .success(let v): return v
        case .failure(let p):
            problem(key, p.message, fix: p.fix)
            return nil
        }
    }
}

/// 1,048,576: digits in groups of three, as the reference writes numbers.
func grouped(_ n: Int) -> String {
    let digits = Array(String(n.magnitude))
    var out = ""
    for (i, c) in digits.enumerated() {
        if i > 0 && (digits.count - i) % 3 == 0 { out.append(",") }
        out.append(c)
    }
    return (n < 0 ? "-" : "") + out
}

extension OptionTable where Config: YAMLConfiguration {
    /// What a program runs with: `defaults`, or the file when one is given
    /// (its problems thrown together, `ConfigProblems`), then the flags over
    /// it (`OptionProblems`; options a section needs may come from either).
    public func configuration(defaults: Config, file: String?, flags: [(name: String, value: String)]) throws -> Config {
        var config = defaults
        var fromFile: Set<String>?
        if let file {
            let d = ConfigDiagnostics(file: file)
            let read = Config.read(file: file, d)
            try d.failIfErrors()
            guard let read else { throw ConfigProblems([ConfigError("cannot read \(file)", at: nil, file: file)]) }
            config = read
            fromFile = Set(d.marks.keys)
        }
        try apply(flags: flags, to: &config, fromFile: fromFile)
        return config
    }
}
