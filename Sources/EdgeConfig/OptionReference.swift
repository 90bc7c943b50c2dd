/// A program's configuration reference, rendered from its option table:
/// the section of `docs/configuration.md` and the configuration file's man
/// page (`scim-edge.yaml(5)`, `scim-broker.yaml(5)`) come from here, so they
/// cannot say something the program does not do.
public struct ConfigReference: Sendable {
    public let program: String
    /// The configuration file's usual place.
    public let file: String
    /// The man page's one-line description.
    public let title: String
    /// Paragraphs before the keys.
    public let about: [String]
    public let specs: [OptionSpec]
    /// Pages named in SEE ALSO besides the program's own.
    public let seeAlso: [String]

    public init(program: String, file: String, title: String, about: [String], specs: [OptionSpec], seeAlso: [String]) {
        self.program = program
        self.file = file
        self.title = title
        self.about = about
        self.specs = specs
        self.seeAlso = seeAlso
    }

    /// Every key in order, sections followed by their children
    /// (`targets[].rate.concurrency`), flag-only options last.
    public var rows: [(key: String?, spec: OptionSpec)] {
        var out: [(String?, OptionSpec)] = []
        func walk(_ s: OptionSpec, _ prefix: String) {
            let key = s.key.map { prefix + $0 }
            out.append((key, s))
            let inner = (key ?? "") + (s.kind == .sections ? "[]." : ".")
            for c in s.children { walk(c, inner) }
        }
        for s in specs where s.key != nil { walk(s, "") }
        for s in specs where s.key == nil { out.append((nil, s)) }
        return out
    }

    /// The part of `docs/configuration.md` for this program (Markdown).
    public func markdown() -> String {
        var out = "## \(program): `\(file)`\n\n"
        for p in about { out += p + "\n\n" }
        out += "| key | flag | value | default | what it does |\n|---|---|---|---|---|\n"
        for (key, s) in rows {
            let value = s.kind == .section || s.kind == .sections ? s.accepted : s.accepted.replacingPipes
            out +=
                "| \(key.map { "`\($0)`" } ?? "(flag only)") | \(s.flag.map { "`--\($0)`" } ?? "") | \(value) | "
                + "\(s.defaultValue.map { "`\($0)`" } ?? s.requiredText) | \(s.help.replacingPipes) |\n"
        }
        return out + "\n"
    }

    /// The configuration file's man page (mdoc).
    public func manPage(date: String) -> String {
        let upper = String(decoding: Array("\(program).yaml".utf8).map { $0 >= 97 && $0 <= 122 ? $0 - 32 : $0 }, as: UTF8.self)
        var out = """
            .\\" Generated from the option table of \(program) (scim-edge reference); do not edit.
            .Dd \(date)
            .Dt \(upper) 5
            .Os
            .Sh NAME
            .Nm \(program).yaml
            .Nd \(title)
            .Sh DESCRIPTION

            """
        for (i, p) in about.enumerated() {
            if i > 0 { out += ".Pp\n" }
            out += roff(p) + "\n"
        }
        out += ".Sh KEYS\n.Bl -tag -width Ds\n"
        for (key, s) in rows where key != nil {
            out += ".It Ic \(key!)" + (s.kind == .boolean || s.kind == .section || s.kind == .sections ? "" : " Ar \(s.valueName)") + "\n"
            var text = s.help
            if s.kind != .section && s.kind != .sections && s.kind != .text && s.kind != .path { text += " Takes \(s.accepted)." }
            if let d = s.defaultValue { text += " Default \(d)." }
            if s.required != .optional { text += " \(s.requiredText.prefix(1).uppercased())\(s.requiredText.dropFirst())." }
            out += roff(text) + "\n"
            if let flag = s.flag {
                out +=
                    "The flag\n.Fl -\(flag)\n"
                    + (s.kind == .list || s.kind == .section || s.kind == .sections ? "adds to it.\n" : "overrides it.\n")
            }
        }
        out += ".El\n.Sh FILES\n.Bl -tag -width Ds\n.It Pa \(file)\n"
        out += ".It Pa /usr/share/doc/\(program)/examples/\(exampleName)\nA commented example.\n.El\n"
        out += ".Sh SEE ALSO\n.Xr \(program) 1"
        for page in seeAlso { out += " ,\n.Xr \(page.split(separator: "(")[0]) \(page.split(separator: "(").last!.dropLast())" }
        return out + "\n"
    }

    var exampleName: String { program == "scim-edge" ? "agent.example.yaml" : "broker.example.yaml" }

    /// Text for roff: no line may start with a dot or quote, backslashes doubled.
    func roff(_ text: String) -> String {
        var out = ""
        for c in text {
            if c == "\\" { out += "\\e"; continue }
            out.append(c)
        }
        if out.hasPrefix(".") || out.hasPrefix("'") { out = "\\&" + out }
        return out
    }
}

extension OptionSpec {
    /// When it must be given, in words ("" when it need not be).
    var requiredText: String {
        switch required {
        case .optional: return ""
        case .always: return "required"
        case .withSection: return "required with its section"
        }
    }
}

extension String {
    /// `|` escaped for a Markdown table cell.
    var replacingPipes: String {
        var out = ""
        for c in self { if c == "|" { out += "\\|" } else { out.append(c) } }
        return out
    }
}

/// A configuration file written through the option table (the sandbox, the
/// tests): every value is checked against its option's kind and bounds, and
/// the YAML is rendered with every key in its place, so a file written here
/// is one the program reads.
public struct ConfigDocument: Sendable {
    enum Value: Sendable {
        case scalar(String)
        /// A number or boolean, written as such (not a string).
        case plain(String)
        case list([String])
        case map([(String, String)])
        case document(ConfigDocument)
        case documents([ConfigDocument])
    }
    var entries: [(path: [String], value: Value)] = []

    public init() {}

    public var isEmpty: Bool { entries.isEmpty }

    /// Sets `spec` to `value` (checked as the program would).
    public mutating func set(_ spec: OptionSpec, _ value: String) throws(OptionProblem) {
        if case .failure(let p) = spec.parse(value) { throw OptionProblem("\(spec.key ?? "?") \(p.message)") }
        switch spec.kind {
        case .list: put(spec, .list([value]))
        case .integer, .boolean: put(spec, .plain(value))
        default: put(spec, .scalar(value))
        }
    }
    public mutating func set(_ spec: OptionSpec, _ value: Int) throws(OptionProblem) { try set(spec, String(value)) }
    public mutating func set(_ spec: OptionSpec, list: [String]) { put(spec, .list(list)) }
    /// A free-form mapping section (`domains`, `policy.attributes`).
    public mutating func set(_ spec: OptionSpec, map: [(String, String)]) { put(spec, .map(map)) }
    /// A section written with its own keys (`policy`).
    public mutating func set(_ spec: OptionSpec, _ section: ConfigDocument) { put(spec, .document(section)) }
    /// One more entry of a list section (`targets`).
    public mutating func append(_ spec: OptionSpec, _ entry: ConfigDocument) {
        let path = spec.key!.split(separator: ".").map(String.init)
        if let i = entries.firstIndex(where: { $0.path == path }), case .documents(var list) = entries[i].value {
            list.append(entry)
            entries[i].value = .documents(list)
        } else {
            entries.append((path, .documents([entry])))
        }
    }

    private mutating func put(_ spec: OptionSpec, _ value: Value) {
        let path = spec.key!.split(separator: ".").map(String.init)
        entries.removeAll { $0.path == path }
        entries.append((path, value))
    }

    /// The YAML text (values double-quoted, so that none is read as another type).
    public func yaml() -> String { render(indent: "") }

    func render(indent: String) -> String {
        var out = ""
        var open: [String] = []
        for (path, value) in entries {
            // Share the mappings already open with the previous entry.
            var common = 0
            while common < open.count && common < path.count - 1 && open[common] == path[common] { common += 1 }
            open = Array(open[..<common])
            for i in common..<(path.count - 1) {
                out += indent + String(repeating: "  ", count: i) + path[i] + ":\n"
                open.append(path[i])
            }
            let pad = indent + String(repeating: "  ", count: path.count - 1)
            let name = path.last!
            switch value {
            case .scalar(let s): out += "\(pad)\(name): \(quoted(s))\n"
            case .plain(let s): out += "\(pad)\(name): \(s)\n"
            case .list(let l): out += "\(pad)\(name): [\(l.map(quoted).joined(separator: ", "))]\n"
            case .map(let m):
                out += m.isEmpty ? "\(pad)\(name): {}\n" : "\(pad)\(name):\n"
                for (k, v) in m { out += "\(pad)  \(quoted(k)): \(quoted(v))\n" }
            case .document(let d): out += "\(pad)\(name):\n" + d.render(indent: pad + "  ")
            case .documents(let list):
                out += "\(pad)\(name):\n"
                for d in list {
                    let body = d.render(indent: pad + "    ")
                    out += pad + "  - " + (body.isEmpty ? "{}\n" : body.dropFirst(pad.count + 4))
                }
            }
        }
        return out
    }

    func quoted(_ s: String) -> String {
        var out = "\""
        for c in s.unicodeScalars {
            switch c {
            case "\"": out += "\\\""
            case "\\": out += "\\\\"
            case "\n": out += "\\n"
            case "\t": out += "\\t"
            default: out.unicodeScalars.append(c)
            }
        }
        return out + "\""
    }
}

/// `docs/configuration.md`: both programs' references, from their tables
/// (`make docs` writes it; a test fails when the file is stale).
public func configurationReference() -> String {
    """
    # Configuration reference

    Generated from the option tables in `Sources/EdgeConfig/AgentOptions.swift` and
    `Sources/EdgeConfig/BrokerOptions.swift` by `make docs` (`scim-edge reference --markdown`);
    do not edit: a test fails when this file is stale. The same tables drive the flags of
    `serve`, the YAML decoding, the defaults, `--help` and the man pages `scim-edge.yaml(5)` and
    `scim-broker.yaml(5)`. Every option is a YAML key, a flag of `serve`, or both; flags override
    the file. Values out of bounds are errors (`check-config` reports them all, with line and
    column), never clamped silently. Commented examples: `packaging/agent.example.yaml` and
    `packaging/broker.example.yaml` (installed under `/usr/share/doc/PACKAGE/examples/`).


    """ + AgentOptions.reference.markdown() + BrokerOptions.reference.markdown()
}
