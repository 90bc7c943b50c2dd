import EdgeConfig
import EdgeHTTP
import EdgeLoop
import EdgeMetrics
import EdgeTLS
import Glibc
import SCIM

public struct SandboxOptions {
    /// A smaller burst, for `make test`.
    public var short = false
    /// Users created by the load burst (default 3,000; 200 when short).
    public var burst: Int?
    /// Keep the temporary directory (configs, logs, data) for inspection.
    public var keep = false
    /// The live view redraws in place (a terminal) or prints plain lines.
    public var live = false
    /// After the verification, keep the federation running (and say where
    /// it is) until Ctrl-C: `make demo` on a terminal.
    public var stay = false
    /// Where the reference scim2-server is; nil: `$SCIM2_SERVER`, `.venv/bin`, PATH.
    public var referenceServer: String?
    /// The slapd of the LDAP domain; nil: /usr/sbin/slapd or PATH. Without
    /// one (or its tools) the domain is skipped.
    public var slapd: String?
    public var output: (String) -> Void = { _ in }
    public init() {}
}

/// Set by SIGINT/SIGTERM; the sandbox notices it in its waits and cleans up.
nonisolated(unsafe) var sandboxInterrupted: sig_atomic_t = 0

struct SandboxInterrupted: Error {}

/// `scim-edge sandbox`: a throwaway federation on loopback. A PKI, a broker,
/// three agents in three domains (a fourth whose source of record is an
/// LDAP directory, a slapd of the sandbox's own, when slapd is installed),
/// two downstream targets; a scripted scenario as three IdPs and the
/// directory's administrator would drive it; a live view of each hop; and a
/// verification report. Every process and file is removed at the end, on
/// Ctrl-C too.
public final class Sandbox {
    let options: SandboxOptions
    let dir: String
    var processes: [ServiceProcess] = []
    var agents: [(domain: String, port: Int, admin: Int)] = []
    var brokerAdmin = 0, brokerAPI = 0
    var targets: [(name: String, url: ServiceURL, token: String)] = []
    /// subsidiary-eu's own app, inside its boundary: the broker is not
    /// configured to reach it; subsidiary-eu's agent provisions it (its
    /// local target), HQ's employees included, through the downlink.
    var localApp: (name: String, url: ServiceURL, token: String)!
    var edgeBinary = "scim-edge"
    let localDomain = "subsidiary-eu"
    /// The processes that answer SCIM when they are up (the reference servers).
    var scimServers: [String: (name: String, url: ServiceURL, token: String)] = [:]
    let idpToken = "sandbox-idp-token", apiToken = "sandbox-api-token"
    /// The console's actions: a token of this run's own.
    let operatorToken = "sandbox-operator-" + hexString(secureRandomBytes(8))
    var viewLines = 0
    var lastSample: UInt64 = 0
    var previous: [String: Double] = [:]
    var lastPlain: UInt64 = 0
    let started = monotonicMicros()
    var results: [(ok: Bool, text: String)] = []
    /// The LDAP domain's directory, when it runs.
    var directory: (url: String, ldapmodify: String)?
    let directoryDomain = "directory"

    /// Whether a signal stopped the run.
    public var interrupted: Bool { sandboxInterrupted != 0 }

    public init(options: SandboxOptions) throws {
        self.options = options
        var template = Array("/tmp/scim-edge-sandbox.XXXXXX".utf8CString)
        guard let made = mkdtemp(&template) else { throw BenchError("cannot create a temporary directory") }
        dir = String(cString: made)
    }

    /// Runs everything; true when every check holds.
    public func run() -> Bool {
        signal(SIGINT) { _ in sandboxInterrupted = 1 }
        signal(SIGTERM) { _ in sandboxInterrupted = 1 }
        signal(SIGPIPE, SIG_IGN)
        defer { cleanUp() }
        do {
            try start()
            try scenario()
            let verified = report()
            if options.stay { try stayUntilInterrupted() }
            return verified
        } catch is SandboxInterrupted {
            say("interrupted: stopping the sandbox")
            return false
        } catch {
            say("sandbox failed: \(error)")
            for p in processes where !p.isRunning {
                // A crash's backtrace ends the log: its first lines say why.
                let lines = p.log.split(separator: "\n")
                let why = lines.firstIndex { $0.contains("Fatal error") || $0.contains("crashed") || $0.hasPrefix("Error:") }
                say(
                    "  \(p.name) exited; its log:\n"
                        + (why.map { lines[$0..<min(lines.count, $0 + 4)].joined(separator: "\n") + "\n  …\n" } ?? "")
                        + lines.suffix(8).joined(separator: "\n"))
            }
            return false
        }
    }

    // MARK: set-up

    func start() throws {
        say("scim-edge sandbox \(scimEdgeVersion): a federation on 127.0.0.1, files in \(dir)")
        let ca = try CertificateAuthority(commonName: "sandbox federation CA", validDays: 2)
        try writeText("\(dir)/ca.crt", ca.certificatePEM)
        let brokerCert = try ca.issue(CertificateRequest(commonName: "broker", dnsNames: ["localhost"], ipAddresses: ["127.0.0.1"]))
        try writeText("\(dir)/broker.crt", brokerCert.certificatePEM)
        try writeText("\(dir)/broker.key", brokerCert.privateKeyPEM, mode: 0o600)
        var domains = ["hq", "subsidiary-eu", "partner"]
        let ldapPrograms = LocalDirectory.programs(slapd: options.slapd)
        switch ldapPrograms {
        case .success: domains.append(directoryDomain)
        case .failure(let why): say("▶ the LDAP domain is skipped: \(why)")
        }
        for d in domains {
            let c = try ca.issue(CertificateRequest(commonName: "agent-1.\(d)", uris: ["spiffe://sandbox/\(d)/agent-1"]))
            try writeText("\(dir)/\(d).crt", c.certificatePEM)
            try writeText("\(dir)/\(d).key", c.privateKeyPEM, mode: 0o600)
        }
        say("▶ PKI: a federation CA, the broker's certificate, one agent certificate per domain (spiffe://sandbox/DOMAIN/agent-1)")
        // The directory first: its port is bound before the other ports are picked.
        if case .success(let programs) = ldapPrograms { try startDirectory(programs) }

        let agentBinary = executableDirectory() + "/scim-edge"
        let self_ = access(agentBinary, X_OK) == 0 ? agentBinary : (findExecutable("scim-edge", candidates: []) ?? agentBinary)
        edgeBinary = self_
        guard let brokerBinary = findExecutable("scim-broker", candidates: [executableDirectory() + "/scim-broker"]) else {
            throw BenchError("scim-broker not found next to scim-edge nor on PATH")
        }

        // Targets: a standalone agent as an "app", and the reference scim2-server when it is installed.
        targets.append(try startAgentApp("app", agent: self_))
        let reference =
            options.referenceServer
            ?? findExecutable(
                "scim2-server",
                candidates: [
                    getenv("SCIM2_SERVER").map { String(cString: $0) } ?? "", ".venv/bin/scim2-server",
                ])
        if let reference { targets.append(try startSCIMServer("reference", reference)) }
        // subsidiary-eu's own app: a scim2-server like the others (an agent without it), which only its agent reaches.
        localApp = try reference.map { try startSCIMServer("eu-app", $0) } ?? startAgentApp("eu-app", agent: self_)

        // The broker.
        let brokerPort = freeLoopbackPort()
        brokerAdmin = freeLoopbackPort()
        brokerAPI = freeLoopbackPort()
        // The configuration files are written through the option tables, so
        // a key or value the programs would refuse fails here, at once.
        var broker = ConfigDocument()
        try broker.set(BrokerOptions.dataDir, "\(dir)/broker")
        try broker.set(BrokerOptions.listen, "127.0.0.1:\(brokerPort)")
        try broker.set(BrokerOptions.tlsCA, "\(dir)/ca.crt")
        try broker.set(BrokerOptions.tlsCert, "\(dir)/broker.crt")
        try broker.set(BrokerOptions.tlsKey, "\(dir)/broker.key")
        broker.set(BrokerOptions.domains, map: domains.map { ($0, "spiffe://sandbox/\($0)/agent-1") })
        try broker.set(BrokerOptions.apiListen, "127.0.0.1:\(brokerAPI)")
        broker.set(BrokerOptions.apiTokens, list: [apiToken])
        broker.set(BrokerOptions.apiOperatorTokens, list: [operatorToken])
        try broker.set(BrokerOptions.adminListen, "127.0.0.1:\(brokerAdmin)")
        for t in targets {
            var target = ConfigDocument()
            try target.set(BrokerOptions.Target.name, t.name)
            try target.set(BrokerOptions.Target.url, "http://127.0.0.1:\(t.url.port)\(t.url.path)")
            try target.set(BrokerOptions.Target.tokenFile, "\(dir)/\(t.name).token")
            try target.set(BrokerOptions.Target.requestsPerSecond, 20000)
            try target.set(BrokerOptions.Target.concurrency, t.name == "app" ? 16 : 4)
            try target.set(BrokerOptions.Target.onRemove, "delete")
            target.append(BrokerOptions.Target.routes, ConfigDocument())
            broker.append(BrokerOptions.targets, target)
        }
        // A boundary as a destination: HQ's users go to subsidiary-eu's agent, which fetches them (the downlink).
        var boundary = ConfigDocument()
        try boundary.set(BrokerOptions.Target.name, "\(localDomain)-boundary")
        try boundary.set(BrokerOptions.Target.domain, localDomain)
        var route = ConfigDocument()
        route.set(BrokerOptions.Target.routeDomains, list: ["hq"])
        route.set(BrokerOptions.Target.routeTypes, list: ["User"])
        boundary.append(BrokerOptions.Target.routes, route)
        broker.append(BrokerOptions.targets, boundary)
        let yaml = broker.yaml()
        try writeText("\(dir)/broker.yaml", yaml)
        processes.append(
            try ServiceProcess(
                name: "broker", executable: brokerBinary, arguments: ["serve", "--config", "\(dir)/broker.yaml"],
                logPath: "\(dir)/broker.log"))

        // Three agents, three policies (and the directory's agent).
        try writeText("\(dir)/idp.tokens", idpToken + "\n", mode: 0o600)
        for d in domains {
            let port = freeLoopbackPort(), admin = freeLoopbackPort()
            var agent = ConfigDocument()
            try agent.set(AgentOptions.dataDir, "\(dir)/\(d)")
            try agent.set(AgentOptions.listen, "127.0.0.1:\(port)")
            try agent.set(AgentOptions.tokenFile, "\(dir)/idp.tokens")
            try agent.set(AgentOptions.adminListen, "127.0.0.1:\(admin)")
            try agent.set(AgentOptions.brokerURL, "https://127.0.0.1:\(brokerPort)")
            try agent.set(AgentOptions.brokerCA, "\(dir)/ca.crt")
            try agent.set(AgentOptions.brokerCert, "\(dir)/\(d).crt")
            try agent.set(AgentOptions.brokerKey, "\(dir)/\(d).key")
            try agent.set(AgentOptions.brokerDomain, d)
            try agent.set(AgentOptions.brokerAgent, "agent-1")
            var policy = ConfigDocument()
            if d == localDomain {
                policy.set(AgentOptions.policyAttributes, map: [("phoneNumbers", "keep-local"), ("addresses", "keep-local")])
                try localBoundary(&agent)
            }
            if d == "partner" { policy.set(AgentOptions.policyScope, map: [("User", #"userType eq "Contractor""#)]) }
            if !policy.isEmpty { agent.set(AgentOptions.policy, policy) }
            if d == directoryDomain, let url = directory?.url { agent.append(AgentOptions.sources, try directorySource(url)) }
            let a = agent.yaml()
            try writeText("\(dir)/\(d).yaml", a)
            processes.append(
                try ServiceProcess(
                    name: d, executable: self_, arguments: ["serve", "--config", "\(dir)/\(d).yaml"],
                    logPath: "\(dir)/\(d).log"))
            agents.append((d, port, admin))
        }
        for p in processes where p.name != "slapd" {
            let up =
                scimServers[p.name].map(waitHTTP)
                ?? p.waitForLog(p.name == "broker" ? "operations at" : "listening", seconds: 20)
            guard up else {
                throw BenchError("\(p.name) did not start (its log: \(p.logPath))")
            }
            try checkInterrupt()
        }
        say(
            "▶ started: broker (mutual TLS, read API, metrics), agents hq / subsidiary-eu (phones and addresses stay local) / "
                + "partner (only userType \"Contractor\" leaves), targets " + targets.map(\.name).joined(separator: " and ")
                + (reference == nil ? " (scim2-server not installed: `make venv` adds it)" : "")
                + "; inside subsidiary-eu, its own app eu-app, which the broker cannot reach: subsidiary-eu's agent takes HQ's employees "
                + "from the broker's feed (as guests, without their phones) and provisions eu-app with them and its own"
                + (directory == nil ? "" : "; agent directory follows slapd (syncrepl)"))
    }

    /// A standalone agent as an app (`serve` without a broker).
    func startAgentApp(_ name: String, agent: String) throws -> (name: String, url: ServiceURL, token: String) {
        let port = freeLoopbackPort()
        try writeText("\(dir)/\(name).token", "\(name)-token\n", mode: 0o600)
        processes.append(
            try ServiceProcess(
                name: name, executable: agent,
                arguments: ["serve"]
                    + [
                        (AgentOptions.dataDir, "\(dir)/\(name)"), (AgentOptions.listen, "127.0.0.1:\(port)"),
                        (AgentOptions.token, "\(name)-token"),
                        (AgentOptions.adminListen, "none"),
                    ].flatMap { ["--" + $0.0.flag!, $0.1] },
                logPath: "\(dir)/\(name).log"))
        return (name, ServiceURL(tls: false, host: "127.0.0.1", port: port, path: "/scim/v2"), "\(name)-token")
    }

    /// The reference scim2-server as an app.
    func startSCIMServer(_ name: String, _ executable: String) throws -> (name: String, url: ServiceURL, token: String) {
        let port = freeLoopbackPort()
        try writeText("\(dir)/\(name).token", "\(name)-token\n", mode: 0o600)
        processes.append(
            try ServiceProcess(
                name: name, executable: executable, arguments: ["--port", String(port), "--bearer-token", "\(name)-token"],
                logPath: "\(dir)/\(name).log", environment: ["PYTHONUNBUFFERED=1"]))
        let app = (name, ServiceURL(tls: false, host: "127.0.0.1", port: port, path: ""), "\(name)-token")
        scimServers[name] = app
        return app
    }

    /// subsidiary-eu's side of the downlink: its inbound policy (HQ's users
    /// enter as guests, without their phones) and its own app as a local
    /// target, for its own users and those that entered.
    func localBoundary(_ agent: inout ConfigDocument) throws {
        typealias I = AgentOptions.Inbound
        var inbound = ConfigDocument()
        var accept = ConfigDocument()
        accept.set(I.domains, list: ["hq"])
        accept.set(I.types, list: ["User"])
        // HQ's employees; the load burst's users (burst-N) stay out: the judgement is subsidiary-eu's.
        try accept.set(I.filter, #"userName ew "@hq.example""#)
        inbound.append(I.accept, accept)
        inbound.set(I.set, map: [("userType", "Guest")])
        inbound.set(I.drop, list: ["phoneNumbers"])
        try inbound.set(I.waitMs, 5000)
        agent.set(AgentOptions.inbound, inbound)
        typealias T = BrokerOptions.Target
        var target = ConfigDocument()
        try target.set(T.name, localApp.name)
        try target.set(T.url, "http://127.0.0.1:\(localApp.url.port)\(localApp.url.path)")
        try target.set(T.tokenFile, "\(dir)/\(localApp.name).token")
        try target.set(T.requestsPerSecond, 20000)
        try target.set(T.concurrency, 4)
        var route = ConfigDocument()
        route.set(T.routeDomains, list: ["hq", localDomain])
        target.append(T.routes, route)
        agent.append(AgentOptions.targets, target)
    }

    // MARK: the LDAP domain

    /// The directory's people: uid, given name, family name.
    let directoryPeople = [
        ("lena", "Lena", "Lindqvist"), ("mike", "Mike", "Moreau"), ("nina", "Nina", "Novak"), ("omar", "Omar", "Okafor"),
    ]

    func personDN(_ uid: String) -> String { "uid=\(uid),ou=people,\(LocalDirectory.suffix)" }

    /// A person's entry; `add`: as an add for ldapmodify.
    func personLDIF(_ p: (String, String, String), add: Bool = false) -> String {
        "dn: \(personDN(p.0))\n" + (add ? "changetype: add\n" : "")
            + "objectClass: inetOrgPerson\nobjectClass: adAccount\nuid: \(p.0)\ncn: \(p.1) \(p.2)\n"
            + "givenName: \(p.1)\nsn: \(p.2)\nmail: \(p.0)@directory.example\ntitle: Engineer\nuserAccountControl: 512\n"
    }

    /// A slapd of the sandbox's own on loopback, configured in its
    /// directory and loaded offline (slapadd) with four users and a group.
    func startDirectory(_ programs: (slapd: String, slapadd: String, ldapsearch: String, ldapmodify: String)) throws {
        let base = "\(dir)/ldap"
        guard mkdir(base, 0o700) == 0, mkdir(base + "/db", 0o700) == 0 else { throw BenchError("cannot create \(base)") }
        let conf = base + "/slapd.conf"
        try writeText(conf, LocalDirectory.slapdConfig(database: base + "/db", pidFile: base + "/slapd.pid"))
        let s = LocalDirectory.suffix
        var ldif = "dn: \(s)\nobjectClass: dcObject\nobjectClass: organization\no: Sandbox\ndc: example\n\n"
        for ou in ["people", "groups"] { ldif += "dn: ou=\(ou),\(s)\nobjectClass: organizationalUnit\nou: \(ou)\n\n" }
        for p in directoryPeople { ldif += personLDIF(p) + "\n" }
        ldif += "dn: cn=directory-staff,ou=groups,\(s)\nobjectClass: groupOfNames\ncn: directory-staff\n"
        ldif += ["lena", "mike", "nina"].map { "member: \(personDN($0))\n" }.joined()
        try writeText(base + "/load.ldif", ldif)
        guard try runTool("slapadd", programs.slapadd, ["-q", "-f", conf, "-l", base + "/load.ldif"]) == 0 else {
            throw BenchError("slapadd failed: \((try? readText("\(dir)/slapadd.log")) ?? "")")
        }
        let url = "ldap://127.0.0.1:\(freeLoopbackPort())"
        let slapd = try ServiceProcess(
            name: "slapd", executable: programs.slapd, arguments: ["-d", "0", "-f", conf, "-h", url + "/"], logPath: "\(dir)/slapd.log")
        processes.append(slapd)
        let deadline = monotonicMicros() + 20_000_000
        while try runTool("ldapsearch", programs.ldapsearch, ["-x", "-H", url, "-b", "", "-s", "base"]) != 0 {
            try checkInterrupt()
            guard slapd.isRunning, monotonicMicros() < deadline else {
                throw BenchError(
                    "slapd did not answer on \(url); \(slapd.logPath):\n\(slapd.log.split(separator: "\n").suffix(6).joined(separator: "\n"))"
                )
            }
            usleep(100_000)
        }
        try writeText("\(dir)/ldap.pw", LocalDirectory.password + "\n", mode: 0o600)
        directory = (url, programs.ldapmodify)
        say(
            "▶ LDAP: a slapd of the sandbox's own on \(url) (syncprov), loaded with \(directoryPeople.count) users and the group directory-staff"
        )
    }

    /// The `sources:` entry of the directory's agent: syncrepl, the mail as
    /// userName, Active Directory's disabled bit as active.
    func directorySource(_ url: String) throws -> ConfigDocument {
        typealias S = AgentOptions.Source
        var source = ConfigDocument()
        try source.set(S.name, "corp-directory")
        try source.set(S.url, url)
        try source.set(S.bindDN, LocalDirectory.admin)
        try source.set(S.bindPasswordFile, "\(dir)/ldap.pw")
        try source.set(S.baseDN, LocalDirectory.suffix)
        try source.set(S.mode, "syncrepl")
        try source.set(S.onDelete, "deactivate")
        source.set(S.mappingUsers, map: [("userName", "mail"), ("active", "userAccountControl")])
        return source
    }

    /// Runs a program to its end (its output in DIR/NAME.log); its exit status.
    func runTool(_ name: String, _ executable: String, _ arguments: [String], seconds: Double = 60) throws -> Int32 {
        let p = try ServiceProcess(name: name, executable: executable, arguments: arguments, logPath: "\(dir)/\(name).log")
        guard let status = p.waitForExit(seconds: seconds) else {
            p.stop(grace: 1)
            throw BenchError("\(name) did not finish within \(Int(seconds)) s")
        }
        return status
    }

    /// The directory's administrator at work: `ldif` through ldapmodify.
    func ldapModify(_ ldif: String) throws {
        guard let d = directory else { return }
        try writeText("\(dir)/ldap/change.ldif", ldif)
        let args = ["-x", "-H", d.url, "-D", LocalDirectory.admin, "-w", LocalDirectory.password, "-f", "\(dir)/ldap/change.ldif"]
        guard try runTool("ldapmodify", d.ldapmodify, args) == 0 else {
            throw BenchError("ldapmodify failed: \((try? readText("\(dir)/ldapmodify.log")) ?? "")")
        }
    }

    /// Waits until `holds` is true of the users and groups at `url`.
    func waitFor(
        _ what: String, at url: ServiceURL, token: String, seconds: Double = 30, _ holds: ([String: JSONObject], [JSONObject]) -> Bool
    ) throws {
        let deadline = monotonicMicros() + UInt64(seconds * 1_000_000)
        while true {
            try checkInterrupt()
            monitor()
            let users = try list(url, token, "/Users")
            let byName = Dictionary(users.compactMap { u in u["userName"]?.stringValue.map { ($0, u) } }, uniquingKeysWith: { a, _ in a })
            if holds(byName, try list(url, token, "/Groups")) { return }
            if monotonicMicros() > deadline { throw BenchError("\(what) within \(Int(seconds)) s: not so") }
            usleep(20_000)
        }
    }

    /// The directory's part of the scenario: its initial load reaches the
    /// agent; then a hire, a modify, a disabled account and a membership
    /// change made in the directory reach the app.
    func directoryScenario() throws {
        guard directory != nil else { return }
        let s = LocalDirectory.suffix
        try waitFor("the directory's agent holds its 4 users and directory-staff", at: agentURL(directoryDomain), token: idpToken) {
            users, groups in
            users.count == 4 && groups.first { $0["displayName"]?.stringValue == "directory-staff" }?["members"]?.arrayValue?.count == 3
        }
        say(
            "▶ in the directory (ldapmodify): pia hired and added to directory-staff, nina leaves it, mike's title changes, "
                + "omar's account disabled (userAccountControl 514)")
        let t0 = monotonicMicros()
        try ldapModify(
            personLDIF(("pia", "Pia", "Petrova"), add: true) + "\n"
                + "dn: \(personDN("mike"))\nchangetype: modify\nreplace: title\ntitle: Staff Engineer\n\n"
                + "dn: \(personDN("omar"))\nchangetype: modify\nreplace: userAccountControl\nuserAccountControl: 514\n\n"
                + "dn: cn=directory-staff,ou=groups,\(s)\nchangetype: modify\nadd: member\nmember: \(personDN("pia"))\n-\n"
                + "delete: member\nmember: \(personDN("nina"))\n")
        let app = targets[0]
        try waitFor("the directory's changes at the app", at: app.url, token: app.token) { users, _ in
            users["omar@directory.example"]?["active"] == .bool(false) && users["pia@directory.example"] != nil
                && users["mike@directory.example"]?["title"] == "Staff Engineer"
        }
        say(
            "  at the app after \(fixed(Double(monotonicMicros() - t0) / 1000, 1)) ms (ldapmodify → slapd → agent (syncrepl) → broker → app)"
        )
    }

    func waitHTTP(_ t: (name: String, url: ServiceURL, token: String)) -> Bool {
        for _ in 0..<200 {
            if httpGet(t.url, "/ServiceProviderConfig", headers: ["Authorization": "Bearer \(t.token)"]).status == 200 { return true }
            usleep(50_000)
        }
        return false
    }

    func checkInterrupt() throws { if sandboxInterrupted != 0 { throw SandboxInterrupted() } }

    /// The federation as the scenario left it, for an operator to look at
    /// and drive: where each part listens and with which token, then the
    /// live view, until Ctrl-C (or until a process of it stops).
    func stayUntilInterrupted() throws {
        guard sandboxInterrupted == 0 else { return }
        say("▶ the federation keeps running until Ctrl-C")
        say("  broker console    http://127.0.0.1:\(brokerAPI)/console/#token=\(operatorToken)   (operator; read-only: #token=\(apiToken))")
        say("  broker read API   http://127.0.0.1:\(brokerAPI)/scim/v2   (Authorization: Bearer \(apiToken))")
        say("  broker metrics    http://127.0.0.1:\(brokerAdmin)/metrics")
        for a in agents {
            say(
                "  agent \(pad(a.domain, 13)) http://127.0.0.1:\(a.port)/scim/v2   (Bearer \(idpToken)), metrics http://127.0.0.1:\(a.admin)/metrics"
            )
        }
        say(
            "  \(localDomain)'s app \(localApp.url.tls ? "https" : "http")://\(localApp.url.host):\(localApp.url.port)\(localApp.url.path)   "
                + "(Bearer \(localApp.token); provisioned by its agent only)")
        for t in targets {
            say("  target \(pad(t.name, 12)) http\(t.url.tls ? "s" : "")://\(t.url.host):\(t.url.port)\(t.url.path)   (Bearer \(t.token))")
        }
        if let d = directory {
            say(
                "  directory (slapd) \(d.url)   (bind \(LocalDirectory.admin), password \(LocalDirectory.password); base \(LocalDirectory.suffix))"
            )
        }
        say("  configs, logs and data in \(dir)" + (options.keep ? "" : " (removed at the end; --keep keeps them)"))
        while sandboxInterrupted == 0 {
            if let stopped = processes.first(where: { !$0.isRunning }) {
                say("\(stopped.name) stopped; the sandbox ends")
                return
            }
            if options.live { monitor() }
            usleep(100_000)
        }
        say("Ctrl-C: stopping the sandbox")
    }

    func cleanUp() {
        if options.live && viewLines > 0 { emitRaw("\n") }
        for p in processes.reversed() { p.stop(grace: 5) }
        if options.keep { say("kept \(dir) (configs, logs, data)") } else { removeTree(dir) }
    }

    // MARK: the IdPs' side

    func agentURL(_ domain: String) -> ServiceURL {
        ServiceURL(tls: false, host: "127.0.0.1", port: agents.first { $0.domain == domain }!.port, path: "/scim/v2")
    }

    @discardableResult
    func idp(_ domain: String, _ method: String, _ path: String, _ body: JSON? = nil) throws -> JSON? {
        try checkInterrupt()
        var h: HTTPHeaders = ["Authorization": "Bearer \(idpToken)", "Accept": "application/scim+json"]
        if body != nil { h.set("Content-Type", "application/scim+json") }
        let url = agentURL(domain)
        let r = httpRequest(url, HTTPRequest(method: method, target: url.path + path, headers: h, body: body?.serialized() ?? []))
        guard (200..<300).contains(r.status) else {
            throw BenchError("\(domain): \(method) \(path) answered \(r.status): \(String(decoding: r.body.prefix(300), as: UTF8.self))")
        }
        monitor()
        return r.body.isEmpty ? nil : try JSONParser.parse(r.body)
    }

    func user(_ userName: String, given: String, family: String, extra: JSONObject = [:]) -> JSON {
        var o: JSONObject = [
            "schemas": ["urn:ietf:params:scim:schemas:core:2.0:User"], "userName": .string(userName),
            "name": ["givenName": .string(given), "familyName": .string(family)],
            "emails": [["value": .string(userName), "type": "work", "primary": true]], "active": true,
        ]
        for (k, v) in extra { o[k] = v }
        return .object(o)
    }

    func patch(_ ops: [JSON]) -> JSON { ["schemas": ["urn:ietf:params:scim:api:messages:2.0:PatchOp"], "Operations": .array(ops)] }

    var ids: [String: String] = [:]  // userName → id at its agent

    func hire(_ domain: String, _ userName: String, _ given: String, _ family: String, _ extra: JSONObject = [:]) throws {
        ids[userName] = try idp(domain, "POST", "/Users", user(userName, given: given, family: family, extra: extra))?["id"]?.stringValue
    }

    var deactivationMs: Double = 0
    /// HQ IdP's write ack → visible at subsidiary-eu's own app: a hire, a deactivation (ms).
    var localAppMs: [Double] = []

    /// Polls `app` (every 0.5 ms) until its user `userName` exists and
    /// `holds`, for at most 30 s from `since`.
    func waitAtApp(
        _ app: (name: String, url: ServiceURL, token: String), _ userName: String, _ what: String, since: UInt64,
        _ holds: (JSON) -> Bool
    ) throws {
        while true {
            try checkInterrupt()
            let r = httpGet(
                app.url, "/Users?filter=" + percentEncode("userName eq \"\(userName)\""),
                headers: ["Authorization": "Bearer \(app.token)"], timeoutMilliseconds: 5000)
            if r.status == 200, let u = (try? JSONParser.parse(r.body))?["Resources"]?.arrayValue?.first, holds(u) { return }
            if monotonicMicros() - since > 30_000_000 { throw BenchError("\(what) did not reach \(app.name) within 30 s") }
            usleep(500)
        }
    }
    /// The metrics when the federation last drained (the latency windows cover the burst).
    var drainedMetrics: [String: Double] = [:]
    var burstReport: BenchReport?

    func scenario() throws {
        let phone: JSONObject = ["phoneNumbers": [["value": "+49 30 1234567", "type": "work"]]]
        let address: JSONObject = [
            "addresses": [["streetAddress": "Unter den Linden 1", "locality": "Berlin", "country": "DE", "type": "work"]]
        ]
        say("▶ hires: 5 at hq, 4 at subsidiary-eu (with phones and addresses), 4 at partner (3 contractors, 1 employee)")
        for (n, g, f) in [
            ("alice", "Alice", "Adams"), ("bob", "Bob", "Brown"), ("carol", "Carol", "Clark"), ("dan", "Dan", "Diaz"),
            ("erin", "Erin", "Evans"),
        ] {
            try hire("hq", "\(n)@hq.example", g, f, ["title": "Engineer", "phoneNumbers": [["value": "+1 555 0100", "type": "work"]]])
        }
        for (n, g, f) in [
            ("franz", "Franz", "Fischer"), ("greta", "Greta", "Graf"), ("hans", "Hans", "Huber"), ("ines", "Ines", "Iglesias"),
        ] {
            var extra = phone
            for (k, v) in address { extra[k] = v }
            extra["title"] = "Analyst"
            try hire("subsidiary-eu", "\(n)@eu.example", g, f, extra)
        }
        for (n, g, f, type) in [
            ("pat", "Pat", "Park", "Contractor"), ("quinn", "Quinn", "Quaid", "Contractor"),
            ("ravi", "Ravi", "Rao", "Contractor"), ("sam", "Sam", "Sato", "Employee"),
        ] {
            try hire("partner", "\(n)@partner.example", g, f, ["userType": .string(type)])
        }
        say("▶ updates: a promotion at hq, a new title and phone at subsidiary-eu")
        try idp(
            "hq", "PATCH", "/Users/\(ids["bob@hq.example"]!)", patch([["op": "replace", "path": "title", "value": "Engineering Manager"]]))
        try idp(
            "subsidiary-eu", "PATCH", "/Users/\(ids["greta@eu.example"]!)",
            patch([
                ["op": "replace", "path": "title", "value": "Senior Analyst"],
                ["op": "replace", "path": "phoneNumbers", "value": [["value": "+49 30 7654321", "type": "work"]]],
            ]))
        say("▶ group changes: engineering (alice, bob, carol; then + dan, − carol), eu-staff (franz, greta)")
        let eng = try idp(
            "hq", "POST", "/Groups",
            [
                "schemas": ["urn:ietf:params:scim:schemas:core:2.0:Group"], "displayName": "engineering",
                "members": .array(["alice", "bob", "carol"].map { ["value": .string(ids["\($0)@hq.example"]!)] }),
            ])
        let engID = try eng?["id"]?.stringValue ?? { throw BenchError("no group id") }()
        try idp(
            "hq", "PATCH", "/Groups/\(engID)",
            patch([
                ["op": "add", "path": "members", "value": [["value": .string(ids["dan@hq.example"]!)]]],
                ["op": "remove", "path": .string("members[value eq \"\(ids["carol@hq.example"]!)\"]")],
            ]))
        try idp(
            "subsidiary-eu", "POST", "/Groups",
            [
                "schemas": ["urn:ietf:params:scim:schemas:core:2.0:Group"], "displayName": "eu-staff",
                "members": .array(["franz", "greta"].map { ["value": .string(ids["\($0)@eu.example"]!)] }),
            ])
        try directoryScenario()
        say("▶ quinn@partner.example becomes an employee: out of the partner's scope, so removed everywhere")
        try idp(
            "partner", "PATCH", "/Users/\(ids["quinn@partner.example"]!)",
            patch([["op": "replace", "path": "userType", "value": "Employee"]]))
        try waitDrained(seconds: 30)

        say("▶ contractor ravi@partner.example deactivated at the partner's IdP")
        let t0 = monotonicMicros()
        try idp("partner", "PATCH", "/Users/\(ids["ravi@partner.example"]!)", patch([["op": "replace", "path": "active", "value": false]]))
        try waitAtApp(targets[0], "ravi@partner.example", "the deactivation", since: t0) { $0["active"] == .bool(false) }
        deactivationMs = Double(monotonicMicros() - t0) / 1000
        say("  inactive at the app after \(fixed(deactivationMs, 1)) ms (IdP request → agent → broker → app)")

        // Into another boundary: from HQ's IdP to subsidiary-eu's own app, timed from the IdP's write ack.
        say("▶ hana@hq.example hired at hq; then erin@hq.example deactivated at hq's IdP")
        try hire("hq", "hana@hq.example", "Hana", "Hahn", ["title": "Engineer"])
        var t = monotonicMicros()
        try waitAtApp(localApp, "hana@hq.example", "HQ's hire", since: t) { _ in true }
        localAppMs.append(Double(monotonicMicros() - t) / 1000)
        try idp("hq", "PATCH", "/Users/\(ids["erin@hq.example"]!)", patch([["op": "replace", "path": "active", "value": false]]))
        t = monotonicMicros()
        try waitAtApp(localApp, "erin@hq.example", "HQ's deactivation", since: t) { $0["active"] == .bool(false) }
        localAppMs.append(Double(monotonicMicros() - t) / 1000)
        say(
            "  at eu-app after \(fixed(localAppMs[0], 1)) ms, inactive there after \(fixed(localAppMs[1], 1)) ms "
                + "(HQ IdP's ack → hq agent → broker → subsidiary-eu's agent (its feed) → eu-app)")

        let n = options.burst ?? (options.short ? 200 : 3000)
        say("▶ load burst: \(n) hires at hq as fast as 16 connections go")
        let loop = try EventLoop()
        var bench = BenchOptions(url: agentURL("hq"))
        bench.token = idpToken
        bench.requests = n
        bench.prefix = "burst"
        var cancel: () -> Void = {}
        bench.progress = { [weak self] _ in
            if sandboxInterrupted != 0 { cancel() }
            self?.monitor(force: true)
        }
        var result: BenchReport?
        let b = try Bench(loop: loop, options: bench)
        cancel = { b.cancel() }
        b.run {
            result = $0; loop.stop()
        }
        loop.run()
        _ = loop.close()
        try checkInterrupt()
        burstReport = result
        if let r = result {
            say(
                "  \(r.completed) requests in \(fixed(r.duration, 2)) s (\(fixed(r.throughput, 0))/s), p99 \(ms(r.latency.quantile(0.99))) ms at the agent; "
                    + r.statuses.sorted { $0.key < $1.key }.map { "\($0.key) ×\($0.value)" }.joined(separator: ", "))
        }
        try waitDrained(seconds: options.short ? 60 : 90)
    }

    /// Waits until every agent's outbox and every target's queue is empty.
    func waitDrained(seconds: Double) throws {
        let deadline = monotonicMicros() + UInt64(seconds * 1_000_000)
        usleep(100_000)
        while monotonicMicros() < deadline {
            try checkInterrupt()
            monitor(force: true)
            let m = sample()
            let outboxes = agents.map { m["\($0.domain) scim_edge_outbox_events"] ?? 1 }.reduce(0, +)
            let queues = targets.map { m["broker scim_broker_target_queue_depth{target=\"\($0.name)\"}"] ?? 1 }.reduce(0, +)
            let pending = m["broker scim_broker_pending_batches"] ?? 1
            // Into subsidiary-eu: its feed acknowledged, its agent's queue for its own app empty.
            let eu = "\(localDomain) scim_edge_"
            let downlink =
                (m["broker scim_broker_downlink_unacked_events{domain=\"\(localDomain)\",target=\"\(localDomain)-boundary\"}"] ?? 1)
                + (m[eu + "downlink_lag_events"] ?? 1) + (m[eu + "target_queue_depth{target=\"\(localApp.name)\"}"] ?? 1)
            if outboxes == 0 && queues == 0 && pending == 0 && downlink == 0 { drainedMetrics = m; return }
            usleep(200_000)
        }
        throw BenchError("the federation did not drain within \(Int(seconds)) s")
    }

    // MARK: the live view

    /// Every metric of every hop, keyed "process metric{labels}".
    func sample() -> [String: Double] {
        var out: [String: Double] = [:]
        var sources = agents.map { ($0.domain, $0.admin) }
        sources.append(("broker", brokerAdmin))
        for (name, port) in sources {
            let r = httpGet(ServiceURL(tls: false, host: "127.0.0.1", port: port, path: ""), "/metrics", timeoutMilliseconds: 2000)
            guard r.status == 200 else { continue }
            for line in String(decoding: r.body, as: UTF8.self).split(separator: "\n") where !line.hasPrefix("#") {
                guard let space = line.lastIndex(of: " "), let v = Double(line[line.index(after: space)...]) else { continue }
                out["\(name) \(line[..<space])"] = v
            }
        }
        return out
    }

    func monitor(force: Bool = false) {
        let now = monotonicMicros()
        guard force || now - lastSample >= 500_000 else { return }
        let elapsed = Double(now - lastSample) / 1e6
        lastSample = now
        let m = sample()
        func rate(_ key: String) -> String {
            let v = m[key] ?? 0
            defer { previous[key] = v }
            guard let p = previous[key], elapsed > 0, elapsed < 30 else { return "-" }
            return fixed(max(0, v - p) / elapsed, 0)
        }
        var lines: [String] = []
        for a in agents {
            let k = "\(a.domain) scim_edge_"
            lines.append(
                pad(a.domain, 14) + " outbox " + pad(int(m[k + "outbox_events"]), 6) + " relayed "
                    + pad(int(m[k + "relay_events_acknowledged_total"]), 7)
                    + " (" + pad(rate(k + "relay_events_acknowledged_total"), 5) + "/s)  window " + pad(int(m[k + "relay_window"]), 3)
                    + "  lag " + fixed(m[k + "outbox_oldest_age_seconds"] ?? 0, 1) + " s  relay errors " + int(m[k + "relay_errors_total"])
                    + "  IdP 503s " + int(m[k + "backpressure_rejections_total"]))
        }
        let b = "broker scim_broker_"
        lines.append(
            pad("broker", 14) + " applied " + pad(int(m[b + "events_applied_total"]), 7) + " (" + pad(rate(b + "events_applied_total"), 5)
                + "/s)  pending " + int(m[b + "pending_batches"]) + "  agent → broker p99 "
                + fixed((m[b + "propagation_seconds{quantile=\"0.99\"}"] ?? 0) * 1000, 1) + " ms")
        for t in targets {
            let l = "{target=\"\(t.name)\"}"
            lines.append(
                pad("  → " + t.name, 14) + " queued " + pad(int(m[b + "target_queue_depth" + l]), 6) + " delivered "
                    + pad(int(m[b + "target_delivered_total" + l]), 7) + " (" + pad(rate(b + "target_delivered_total" + l), 5) + "/s)"
                    + "  dead letters " + int(m[b + "target_dead_letters_total" + l]) + "  retries "
                    + int(m[b + "target_retries_total" + l])
                    + "  agent → target p99 "
                    + fixed((m[b + "target_propagation_seconds{target=\"\(t.name)\",quantile=\"0.99\"}"] ?? 0) * 1000, 1) + " ms")
        }
        // Into subsidiary-eu: its feed at the broker, its agent's commits, its own app.
        let eu = "\(localDomain) scim_edge_", app = "{target=\"\(localApp.name)\"}"
        let feed = "{domain=\"\(localDomain)\",target=\"\(localDomain)-boundary\"}"
        lines.append(
            pad("  ⇣ " + localDomain, 14) + " feed unacked " + pad(int(m[b + "downlink_unacked_events" + feed]), 5) + " committed "
                + pad(int(m[eu + "downlink_applied_sequence"]), 7) + "  → \(localApp.name) queued "
                + int(m[eu + "target_queue_depth" + app])
                + " delivered " + pad(int(m[eu + "target_delivered_total" + app]), 7) + " ("
                + pad(rate(eu + "target_delivered_total" + app), 5)
                + "/s)  dead letters " + int(m[eu + "target_dead_letters_total" + app]))
        if options.live {
            var text = viewLines > 0 ? "\u{1B}[\(viewLines)A" : ""
            for l in lines { text += "\u{1B}[K" + l + "\n" }
            emitRaw(text)
            viewLines = lines.count
        } else if now - lastPlain >= 2_000_000 {
            lastPlain = now
            var parts = agents.map { "\($0.domain) outbox \(int(m["\($0.domain) scim_edge_outbox_events"]))" }
            parts.append("broker applied \(int(m[b + "events_applied_total"])) pending \(int(m[b + "pending_batches"]))")
            for t in targets {
                let l = "{target=\"\(t.name)\"}"
                parts.append(
                    "\(t.name) queued \(int(m[b + "target_queue_depth" + l])) delivered \(int(m[b + "target_delivered_total" + l]))"
                        + " dead \(int(m[b + "target_dead_letters_total" + l]))")
            }
            parts.append(
                "\(localDomain) feed committed \(int(m[eu + "downlink_applied_sequence"])) → \(localApp.name) delivered "
                    + "\(int(m[eu + "target_delivered_total" + app])) dead \(int(m[eu + "target_dead_letters_total" + app]))")
            emitRaw("  [\(fixed(Double(now - started) / 1e6, 1)) s] " + parts.joined(separator: " | ") + "\n")
        }
    }

    func int(_ v: Double?) -> String { String(Int(v ?? 0)) }
    func pad(_ s: String, _ n: Int) -> String { s.count >= n ? s : s + String(repeating: " ", count: n - s.count) }

    func say(_ line: String) {
        if options.live && viewLines > 0 {
            emitRaw("\u{1B}[\(viewLines)A\u{1B}[J" + line + "\n")
            viewLines = 0
            monitor(force: true)
        } else {
            emitRaw(line + "\n")
        }
    }

    func emitRaw(_ text: String) { options.output(text) }

    // MARK: verification

    func list(_ url: ServiceURL, _ token: String, _ endpoint: String) throws -> [JSONObject] {
        var out: [JSONObject] = []
        var start = 1
        while true {
            let r = httpGet(
                url, "\(endpoint)?startIndex=\(start)&count=500", headers: ["Authorization": "Bearer \(token)"], timeoutMilliseconds: 30_000
            )
            guard r.status == 200, let page = try? JSONParser.parse(r.body) else {
                throw BenchError("GET \(endpoint) at \(url.host):\(url.port) answered \(r.status)")
            }
            let resources = page["Resources"]?.arrayValue?.compactMap(\.objectValue) ?? []
            out += resources
            start += resources.count
            if resources.isEmpty || start > Int(page["totalResults"]?.numberValue?.integer ?? 0) { return out }
        }
    }

    func check(_ ok: Bool, _ text: String) {
        results.append((ok, text))
        say((ok ? "  ✔ " : "  ✘ ") + text)
    }

    /// subsidiary-eu's own app, which only its agent reaches: HQ's users
    /// there once each, as its inbound policy maps them, its own users once,
    /// nothing of its own back through the downlink, HQ's deactivation shown.
    func verifyLocalBoundary() throws {
        let hq = Set(
            try list(agentURL("hq"), idpToken, "/Users").compactMap { $0["userName"]?.stringValue }.filter { $0.hasSuffix("@hq.example") })
        let own = Set(
            try list(agentURL(localDomain), idpToken, "/Users").compactMap { $0["userName"]?.stringValue }.filter {
                $0.hasSuffix("@eu.example")
            })
        let expected = hq.union(own)
        try? waitFor("\(localApp.name) holds hq's users and subsidiary-eu's", at: localApp.url, token: localApp.token) { users, _ in
            Set(users.keys) == expected
        }
        let users = try list(localApp.url, localApp.token, "/Users")
        let names = users.compactMap { $0["userName"]?.stringValue }
        let held = Set(names)
        let name = "\(localApp.name) (inside subsidiary-eu, not reachable by the broker)"
        check(
            names.count == held.count && held == expected,
            "\(name): hq's employees and subsidiary-eu's own users are there exactly once (\(held.count) of \(expected.count), "
                + "\(names.count - held.count) duplicates)")
        let fromHQ = users.filter { hq.contains($0["userName"]?.stringValue ?? "") }
        check(
            !fromHQ.isEmpty && fromHQ.allSatisfy { $0["userType"] == "Guest" && $0["phoneNumbers"] == nil }
                && users.filter { own.contains($0["userName"]?.stringValue ?? "") }.allSatisfy { $0["userType"] != "Guest" },
            "\(localApp.name): hq's employees arrived as subsidiary-eu's inbound policy maps them (userType Guest, phones dropped; the burst's users not accepted); its own are not guests"
        )
        check(
            users.first { $0["userName"] == "erin@hq.example" }?["active"] == .bool(false),
            "\(localApp.name): hq's deactivation shows there (erin@hq.example inactive)")
        let m = sample(), eu = "\(localDomain) scim_edge_"
        _ = try runTool("status", edgeBinary, ["status", "--data-dir", "\(dir)/\(localDomain)"])
        let status = (try? readText("\(dir)/status.log")) ?? ""
        let foreign =
            status.split(separator: "\n").first { $0.hasPrefix("foreign ") }.map {
                $0.split(separator: " ", omittingEmptySubsequences: true).dropFirst().joined(separator: " ")
            } ?? "?"
        check(
            foreign == "\(hq.count) from hq" && m[eu + "downlink_events_refused_total"] == 0,
            "\(localDomain): none of its own users came back through the downlink (foreign: \(foreign); refused \(int(m[eu + "downlink_events_refused_total"])))"
        )
        let dead = m[eu + "target_dead_letters_total{target=\"\(localApp.name)\"}"] ?? -1
        check(dead == 0, "\(localApp.name): no change refused (dead letters \(Int(dead)))")
    }

    func report() -> Bool {
        if options.live && viewLines > 0 { monitor(force: true); emitRaw("\n"); viewLines = 0 }
        say("▶ verification")
        do {
            // What should have left each domain: everything at hq and subsidiary-eu, the partner's contractors.
            var expected: [String: JSONObject] = [:]
            for a in agents {
                for u in try list(agentURL(a.domain), idpToken, "/Users") {
                    guard let name = u["userName"]?.stringValue else { continue }
                    if a.domain == "partner" && u["userType"]?.stringValue != "Contractor" { continue }
                    expected[name] = u
                }
            }
            let euLocal = try list(agentURL("subsidiary-eu"), idpToken, "/Users").filter {
                $0["phoneNumbers"] != nil && $0["addresses"] != nil
            }
            check(euLocal.count == 4, "subsidiary-eu still holds its users' phones and addresses locally (\(euLocal.count) of 4)")
            let api = ServiceURL(tls: false, host: "127.0.0.1", port: brokerAPI, path: "/scim/v2")
            var holders: [(String, [JSONObject], [JSONObject])] = [
                ("broker", try list(api, apiToken, "/Users"), try list(api, apiToken, "/Groups"))
            ]
            for t in targets { holders.append((t.name, try list(t.url, t.token, "/Users"), try list(t.url, t.token, "/Groups"))) }
            for (name, users, groups) in holders {
                let names = users.compactMap { $0["userName"]?.stringValue }
                let unique = Set(names)
                check(
                    names.count == unique.count && unique == Set(expected.keys),
                    "\(name): every user that should be there is there exactly once (\(unique.count) of \(expected.count), \(names.count - unique.count) duplicates"
                        + (unique == Set(expected.keys)
                            ? ")"
                            : "; missing \(Set(expected.keys).subtracting(unique).sorted().prefix(3)), extra \(unique.subtracting(expected.keys).sorted().prefix(3)))")
                )
                let byName = Dictionary(
                    users.compactMap { u in u["userName"]?.stringValue.map { ($0, u) } }, uniquingKeysWith: { a, _ in a })
                let eu = users.filter { $0["userName"]?.stringValue?.hasSuffix("@eu.example") == true }
                check(
                    !eu.isEmpty && eu.allSatisfy { $0["phoneNumbers"] == nil && $0["addresses"] == nil },
                    "\(name): subsidiary-eu's phones and addresses never arrived (keep-local)")
                check(byName["alice@hq.example"]?["phoneNumbers"] != nil, "\(name): hq's phones did (they propagate)")
                check(byName["ravi@partner.example"]?["active"] == .bool(false), "\(name): the deactivated contractor is inactive")
                check(
                    byName["quinn@partner.example"] == nil && byName["sam@partner.example"] == nil,
                    "\(name): the partner's employees (out of scope) are absent")
                check(
                    byName["bob@hq.example"]?["title"] == "Engineering Manager" && byName["greta@eu.example"]?["title"] == "Senior Analyst",
                    "\(name): updates arrived")
                let idToName = Dictionary(
                    users.compactMap { u in u["id"]?.stringValue.flatMap { id in u["userName"]?.stringValue.map { (id, $0) } } },
                    uniquingKeysWith: { a, _ in a })
                func members(_ g: String) -> Set<String> {
                    Set(
                        groups.first { $0["displayName"]?.stringValue == g }?["members"]?.arrayValue?.compactMap {
                            $0["value"]?.stringValue.flatMap { idToName[$0] }
                        } ?? [])
                }
                if directory != nil {
                    check(
                        byName["omar@directory.example"]?["active"] == .bool(false)
                            && byName["mike@directory.example"]?["title"] == "Staff Engineer"
                            && byName["lena@directory.example"]?["title"] == "Engineer",
                        "\(name): the directory's users arrived, its modify and its disabled account too")
                }
                let groupNames = groups.compactMap { $0["displayName"]?.stringValue }
                check(
                    groupNames.count == Set(groupNames).count
                        && (directory == nil
                            || members("directory-staff") == ["lena@directory.example", "mike@directory.example", "pia@directory.example"]),
                    "\(name): every group is there once" + (directory == nil ? "" : ", directory-staff with the directory's members"))
                check(
                    groups.count == (directory == nil ? 2 : 3)
                        && members("engineering") == ["alice@hq.example", "bob@hq.example", "dan@hq.example"]
                        && members("eu-staff") == ["franz@eu.example", "greta@eu.example"], "\(name): groups and their members are right")
            }
            var m = sample()
            for t in targets {
                let dead = m["broker scim_broker_target_dead_letters_total{target=\"\(t.name)\"}"] ?? -1
                check(dead == 0, "\(t.name): no change refused (dead letters \(Int(dead)))")
            }
            try verifyLocalBoundary()
            m = drainedMetrics
            say("▶ latencies (the last 10 s before the federation drained, burst included: changes queued behind it wait)")
            say("  deactivation, IdP request → visible at the app: \(fixed(deactivationMs, 1)) ms")
            say(
                "  HQ IdP's ack → visible at subsidiary-eu's own app (another boundary): hire \(fixed(localAppMs.first ?? 0, 1)) ms, "
                    + "deactivation \(fixed(localAppMs.last ?? 0, 1)) ms")
            let b = "broker scim_broker_"
            say(
                "  agent acceptance → broker commit: p50 \(fixed((m[b + "propagation_seconds{quantile=\"0.5\"}"] ?? 0) * 1000, 1)) ms, "
                    + "p99 \(fixed((m[b + "propagation_seconds{quantile=\"0.99\"}"] ?? 0) * 1000, 1)) ms")
            for t in targets {
                let q = { (x: String) in fixed((m[b + "target_propagation_seconds{target=\"\(t.name)\",quantile=\"\(x)\"}"] ?? 0) * 1000, 1)
                }
                say("  agent acceptance → \(t.name)'s answer: p50 \(q("0.5")) ms, p99 \(q("0.99")) ms")
            }
        } catch {
            check(false, "verification could not complete: \(error)")
        }
        let failed = results.filter { !$0.ok }.count
        say(
            failed == 0
                ? "sandbox: all \(results.count) checks passed in \(fixed(Double(monotonicMicros() - started) / 1e6, 1)) s"
                : "sandbox: \(failed) of \(results.count) checks FAILED")
        return failed == 0
    }
}
