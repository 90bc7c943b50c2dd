import ArgumentParser
import EdgeConfig
import EdgeLoop
import EdgeTLS
import Glibc
import SCIM

/// `scim-broker pki`: the federation's own CA, kept in one directory whose
/// file names are the ones the example configurations use
/// (`federation-ca.crt`, `federation-ca.crl`; `agent.crt`/`agent.key`,
/// `broker.crt`/`broker.key`). docs/pki.md walks a deployment with it.
struct PKI: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "pki", abstract: "The federation CA: create it, sign agent and broker certificates, revoke them, issue the CRL.",
        discussion: """
            The CA lives in one directory (--dir): federation-ca.crt (give it to the broker's tls.ca and every agent's \
            broker.ca), federation-ca.key (0600: keep it off the broker when you can), federation-ca.crl (the broker's \
            tls.crl) and federation-ca.index (what was issued and revoked). See docs/pki.md.
            """,
        subcommands: [Init.self, Sign.self, Revoke.self, CRL.self, List.self])

    struct Init: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Create the federation CA (a new EC P-256 key) and an empty CRL.")
        @OptionGroup var ca: CADirectory
        @Option(help: "The SPIFFE-style trust domain: agent identities are spiffe://TRUST-DOMAIN/DOMAIN/AGENT.")
        var trustDomain = "scim-edge"
        @Option(help: "The CA certificate's subject CN.") var name = "scim-edge federation CA"
        @Option(help: "Validity of the CA certificate, in days.") var days = 3650

        func validate() throws {
            guard isName(trustDomain) else { throw ValidationError("--trust-domain may hold letters, digits, '-', '_' and '.' only") }
            guard days > 0 else { throw ValidationError("--days must be positive") }
        }

        func run() throws {
            guard access(ca.keyFile, F_OK) != 0 else {
                throw CommandFailure("\(ca.keyFile) exists: this directory holds a CA already (a new one would orphan every certificate)")
            }
            let authority = try CertificateAuthority(commonName: name, validDays: days, uris: ["spiffe://\(trustDomain)"])
            try writeFile(ca.keyFile, authority.privateKeyPEM, mode: 0o600)
            try writeFile(ca.certificateFile, authority.certificatePEM, mode: 0o644)
            var index = CAIndex()
            try index.issueCRL(authority, at: ca, validDays: CRL.defaultDays)
            emitLine("wrote \(ca.certificateFile) (the federation CA: broker tls.ca, agents' broker.ca)")
            emitLine("wrote \(ca.keyFile) (0600: the CA's key; keep it safe, off the broker if you can)")
            emitLine("wrote \(ca.crlFile) (no revocations; valid \(CRL.defaultDays) days: issue it again with `pki crl` before then)")
            emitLine("trust domain: spiffe://\(trustDomain)")
        }
    }

    struct Sign: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Issue an agent or a broker certificate.", subcommands: [SignAgent.self, SignBroker.self])
    }

    struct SignAgent: ParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "agent", abstract: "Issue an agent's client certificate (SAN URI spiffe://TRUST-DOMAIN/DOMAIN/AGENT, clientAuth).",
            discussion: """
                With --csr (from `scim-edge pki csr`), signs the appliance's own key and writes OUT/agent.crt; the \
                identity is the one the request asks for, which must be of this CA's trust domain (and match \
                --domain and --agent when given). Without --csr, also makes the key: OUT/agent.key (0600). \
                Prints the line that binds the identity to its domain in the broker's configuration.
                """)
        @OptionGroup var ca: CADirectory
        @Option(help: "The compliance domain the agent serves (default: from the request).") var domain: String?
        @Option(help: "The agent's name within the domain (default: from the request).") var agent: String?
        @Option(help: "A certificate signing request (PEM) to sign.") var csr: String?
        @OptionGroup var issue: IssueOptions

        func validate() throws {
            for v in [domain, agent].compactMap({ $0 }) where !isName(v) {
                throw ValidationError("--domain and --agent may hold letters, digits, '-', '_' and '.' only")
            }
            if csr == nil && (domain == nil || agent == nil) { throw ValidationError("give --domain and --agent (or --csr)") }
        }

        func run() throws {
            let authority = try ca.load()
            guard let trustDomain = ca.trustDomain(authority) else {
                throw CommandFailure(
                    "\(ca.certificateFile) names no trust domain (a SAN URI spiffe://TRUST-DOMAIN): not made by `pki init`")
            }
            let request = try csr.map { try SigningRequest(pem: readText($0)) }
            var (d, a) = (domain, agent)
            if let request {
                let asked = request.identity.uris
                guard asked.count == 1, let parts = agentIdentityParts(asked[0]) else {
                    throw CommandFailure(
                        "\(csr!) asks for \(asked.isEmpty ? "no SAN URI" : asked.joined(separator: ", ")), not one agent identity spiffe://TRUST-DOMAIN/DOMAIN/AGENT"
                    )
                }
                guard parts.trustDomain == trustDomain else {
                    throw CommandFailure(
                        "\(csr!) asks for \(asked[0]), of trust domain \(parts.trustDomain); this CA issues spiffe://\(trustDomain)/…")
                }
                guard (d ?? parts.domain) == parts.domain, (a ?? parts.agent) == parts.agent else {
                    throw CommandFailure("\(csr!) asks for \(asked[0]), not domain \(d ?? parts.domain) and agent \(a ?? parts.agent)")
                }
                (d, a) = (parts.domain, parts.agent)
            }
            let profile = CertificateRequest.agent(trustDomain: trustDomain, domain: d!, agent: a!, validDays: issue.days)
            let identity = profile.uris[0]
            try issue.write(authority, ca, profile, request: request, name: "agent")
            emitLine("identity: \(identity)")
            emitLine("broker config: domains: { \(d!): \"\(identity)\" }")
        }
    }

    struct SignBroker: ParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "broker", abstract: "Issue the broker's federation certificate (DNS and IP SANs, serverAuth).",
            discussion: """
                The names must include the host of every agent's broker.url: agents check it. With --csr, signs \
                that key and writes OUT/broker.crt; without, also makes the key: OUT/broker.key (0600).
                """)
        @OptionGroup var ca: CADirectory
        @Option(help: "A DNS name agents reach the broker by (repeatable).") var dns: [String] = []
        @Option(help: "An IP address agents reach the broker by (repeatable).") var ip: [String] = []
        @Option(help: "A certificate signing request (PEM) to sign.") var csr: String?
        @OptionGroup var issue: IssueOptions

        func validate() throws {
            guard !dns.isEmpty || !ip.isEmpty else { throw ValidationError("give --dns NAME or --ip ADDRESS: the name agents connect to") }
        }

        func run() throws {
            let authority = try ca.load()
            let request = try csr.map { try SigningRequest(pem: readText($0)) }
            try issue.write(
                authority, ca, .broker(dnsNames: dns, ipAddresses: ip, validDays: issue.days), request: request, name: "broker")
        }
    }

    struct Revoke: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Revoke a certificate this CA issued and write the CRL again.",
            discussion: """
                Give the certificate file or its serial (hex, as `pki list` and `openssl x509 -serial` show it). Then \
                copy federation-ca.crl to the broker's tls.crl and reload it (systemctl reload scim-broker): the \
                certificate is refused at the next handshake, and a live connection with it is closed at the reload.
                """)
        @OptionGroup var ca: CADirectory
        @Argument(help: "The certificate (PEM file) or its serial number (hex).") var certificate: String
        @Option(help: "Validity of the CRL written, in days.") var days = CRL.defaultDays

        func run() throws {
            let authority = try ca.load()
            let serial: Int
            if access(certificate, F_OK) == 0 {
                guard let n = parseSerial(try CertificateSummary(file: certificate).identity.serialNumber) else {
                    throw CommandFailure("\(certificate): a serial number this CA does not issue")
                }
                serial = n
            } else {
                guard let n = parseSerial(certificate) else {
                    throw CommandFailure("\(certificate): neither a file nor a serial number (hex)")
                }
                serial = n
            }
            var index = try CAIndex(ca)
            guard let issued = index.issued.first(where: { $0.serial == serial }) else {
                throw CommandFailure("serial \(hexSerial(serial)) was not issued by this CA (see `scim-broker pki list`)")
            }
            if let at = index.revoked[serial] {
                emitLine("\(hexSerial(serial)) was revoked already, at \(formatDateTime(secondsSinceEpoch: at))")
            } else {
                let now = unixSeconds()
                try index.append("revoked\t\(hexSerial(serial))\t\(now)", in: ca)
                index.revoked[serial] = now
                emitLine("revoked \(hexSerial(serial)) (\(issued.names))")
            }
            try index.issueCRL(authority, at: ca, validDays: days)
            emitLine("wrote \(ca.crlFile): install it as the broker's tls.crl, then `systemctl reload scim-broker`")
        }
    }

    struct CRL: ParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "crl", abstract: "Issue the CRL again (every revocation, a new validity).",
            discussion: """
                A CRL is valid until its next update: past it, the broker refuses every agent (OpenSSL treats an \
                expired CRL as a failed check). Issue it well before (a monthly timer for the default 30 days) and \
                reload the broker; scim_broker_crl_next_update_timestamp_seconds says when it runs out.
                """)
        static let defaultDays = 30
        @OptionGroup var ca: CADirectory
        @Option(help: "Validity of the CRL, in days.") var days = CRL.defaultDays

        func run() throws {
            var index = try CAIndex(ca)
            try index.issueCRL(try ca.load(), at: ca, validDays: days)
            emitLine(
                "wrote \(ca.crlFile): \(index.revoked.count) revoked, next update \(formatDateTime(secondsSinceEpoch: unixSeconds() + Int64(days) * 86400))"
            )
        }
    }

    struct List: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Every certificate this CA issued: serial, state, end of validity, names.")
        @OptionGroup var ca: CADirectory

        func run() throws {
            let index = try CAIndex(ca)
            guard !index.issued.isEmpty else {
                emitLine("nothing to show: this CA has issued no certificate yet")
                return
            }
            let now = unixSeconds()
            for c in index.issued {
                let state =
                    index.revoked[c.serial].map { "revoked \(formatDateTime(secondsSinceEpoch: $0))" }
                    ?? (c.notAfter < now ? "expired" : "valid")
                emitLine("\(hexSerial(c.serial))\t\(state)\tnot after \(formatDateTime(secondsSinceEpoch: c.notAfter))\t\(c.names)")
            }
        }
    }
}

/// `--dir`: where the CA's files are.
struct CADirectory: ParsableArguments {
    @Option(help: "The CA's directory.") var dir = "."

    var certificateFile: String { "\(dir)/federation-ca.crt" }
    var keyFile: String { "\(dir)/federation-ca.key" }
    var crlFile: String { "\(dir)/federation-ca.crl" }
    var indexFile: String { "\(dir)/federation-ca.index" }

    func load() throws -> CertificateAuthority {
        guard access(keyFile, F_OK) == 0 else {
            throw CommandFailure("no CA in \(dir) (\(keyFile) is missing): `scim-broker pki init` makes one")
        }
        return try CertificateAuthority(certificatePEM: readText(certificateFile), privateKeyPEM: readText(keyFile))
    }

    /// The trust domain the CA certificate carries (`spiffe://TRUST-DOMAIN`).
    func trustDomain(_ authority: CertificateAuthority) -> String? {
        authority.identity.uris.lazy.filter { $0.hasPrefix("spiffe://") }.map { String($0.dropFirst(9)) }.first { !$0.contains("/") }
    }
}

/// What `sign agent` and `sign broker` share: validity, where to write.
struct IssueOptions: ParsableArguments {
    @Option(help: "Validity, in days.") var days = 365
    @Option(help: "Where to write the certificate (and the key, without --csr).") var out = "."

    func validate() throws {
        guard days > 0 else { throw ValidationError("--days must be positive") }
    }

    /// Issues `profile` (for `request`'s key, or a new one), writes
    /// OUT/NAME.crt (and NAME.key), records it in the index, says so.
    func write(_ authority: CertificateAuthority, _ ca: CADirectory, _ profile: CertificateRequest, request: SigningRequest?, name: String)
        throws
    {
        var index = try CAIndex(ca)
        let certFile = "\(out)/\(name).crt", keyFile = "\(out)/\(name).key"
        for f in [certFile] + (request == nil ? [keyFile] : []) where access(f, F_OK) == 0 {
            throw CommandFailure("\(f) exists: give another --out (a rotation installs the new files over the old ones afterwards)")
        }
        let (pem, serial, key): (String, Int, String?)
        if let request {
            (pem, serial) = try authority.sign(request, profile)
            key = nil
        } else {
            let c = try authority.issue(profile)
            (pem, serial, key) = (c.certificatePEM, c.serial, c.privateKeyPEM)
        }
        let notAfter = unixSeconds() + Int64(profile.notAfterOffset)
        let names = (profile.uris + profile.dnsNames + profile.ipAddresses).joined(separator: ",")
        if let key { try writeFile(keyFile, key, mode: 0o600) }
        try writeFile(certFile, pem, mode: 0o644)
        try index.append("issued\t\(hexSerial(serial))\t\(notAfter)\t\(names)", in: ca)
        if key != nil { emitLine("wrote \(keyFile) (0600: install it where only the service reads it)") }
        emitLine("wrote \(certFile): serial \(hexSerial(serial)), valid until \(formatDateTime(secondsSinceEpoch: notAfter))")
    }
}

/// `federation-ca.index`: one line per event, appended (issued SERIAL
/// NOT-AFTER NAMES; revoked SERIAL AT; crl NUMBER AT). A log rather than a
/// table: nothing is ever rewritten, so a crash cannot lose what was issued.
struct CAIndex {
    struct Issued {
        var serial: Int
        var notAfter: Int64
        var names: String
    }
    var issued: [Issued] = []
    var revoked: [Int: Int64] = [:]
    var crlNumber = 0

    init() {}

    init(_ ca: CADirectory) throws {
        guard access(ca.indexFile, F_OK) == 0 else {
            guard access(ca.keyFile, F_OK) == 0 else {
                throw CommandFailure("no CA in \(ca.dir) (\(ca.keyFile) is missing): `scim-broker pki init` makes one")
            }
            return
        }
        for line in try readText(ca.indexFile).split(separator: "\n") {
            let f = line.split(separator: "\t", omittingEmptySubsequences: false).map(String.init)
            switch (f.first, f.count) {
            case ("issued", 4):
                if let s = parseSerial(f[1]), let t = Int64(f[2]) { issued.append(Issued(serial: s, notAfter: t, names: f[3])) }
            case ("revoked", 3):
                if let s = parseSerial(f[1]), let t = Int64(f[2]) { revoked[s] = t }
            case ("crl", 3):
                crlNumber = max(crlNumber, Int(f[1]) ?? 0)
            default:
                throw CommandFailure("\(ca.indexFile): cannot read the line '\(line)'")
            }
        }
    }

    func append(_ line: String, in ca: CADirectory) throws {
        let fd = open(ca.indexFile, O_WRONLY | O_CREAT | O_APPEND, 0o644)
        guard fd >= 0 else { throw CommandFailure("cannot open \(ca.indexFile): \(String(cString: strerror(errno)))") }
        defer { close(fd) }
        let bytes = Array((line + "\n").utf8)
        guard bytes.withUnsafeBytes({ write(fd, $0.baseAddress, $0.count) }) == bytes.count, fsync(fd) == 0 else {
            throw CommandFailure("cannot write \(ca.indexFile): \(String(cString: strerror(errno)))")
        }
    }

    /// Writes the CRL (every revocation, the next number) over the old one.
    mutating func issueCRL(_ authority: CertificateAuthority, at ca: CADirectory, validDays: Int) throws {
        crlNumber += 1
        let crl = try authority.revocationList(
            revoked.sorted { $0.key < $1.key }.map { Revocation(serial: $0.key, at: $0.value) }, validDays: validDays, number: crlNumber)
        try append("crl\t\(crlNumber)\t\(unixSeconds())", in: ca)
        try replaceFile(ca.crlFile, crl, mode: 0o644)
    }
}

func isName(_ s: String) -> Bool { !s.isEmpty && s.allSatisfy { $0.isLetter || $0.isNumber || "-_.".contains($0) } }

/// A serial as people and openssl write it: hex, any case, maybe with colons or 0x.
func parseSerial(_ text: String) -> Int? {
    var t = text.lowercased().replacing(":", with: "")
    if t.hasPrefix("serial=") { t = String(t.dropFirst(7)) }
    if t.hasPrefix("0x") { t = String(t.dropFirst(2)) }
    guard let n = Int(t, radix: 16), n > 0 else { return nil }
    return n
}

func hexSerial(_ serial: Int) -> String { String(serial, radix: 16) }

func readText(_ path: String) throws -> String {
    do { return String(decoding: try readFileBytes(path), as: UTF8.self) } catch { throw CommandFailure(error.message) }
}
