internal import COpenSSL

/// A certificate and its private key, both PEM.
public struct Credential: Sendable {
    public var certificatePEM: String
    public var privateKeyPEM: String
    public var serial: Int
}

/// What a leaf certificate is for.
public struct CertificateRequest: Sendable {
    public var commonName: String
    public var dnsNames: [String] = []
    public var ipAddresses: [String] = []
    /// SAN URIs, e.g. `spiffe://acme/agent/agent-1`: the identity the broker maps to a domain.
    public var uris: [String] = []
    /// Validity window relative to now, in seconds (negative = in the past).
    public var notBeforeOffset: Int = -300
    public var notAfterOffset: Int = 365 * 86400
    public var serverAuth = true
    public var clientAuth = true

    public init(
        commonName: String, dnsNames: [String] = [], ipAddresses: [String] = [], uris: [String] = [],
        notBeforeOffset: Int = -300, notAfterOffset: Int = 365 * 86400
    ) {
        self.commonName = commonName
        self.dnsNames = dnsNames
        self.ipAddresses = ipAddresses
        self.uris = uris
        self.notBeforeOffset = notBeforeOffset
        self.notAfterOffset = notAfterOffset
    }
}

extension CertificateRequest {
    /// An agent's client certificate: the SAN URI the broker binds to a
    /// domain (`agentIdentity`), CN AGENT.DOMAIN (for people; never bound),
    /// extended key usage clientAuth only: it cannot serve as a broker.
    public static func agent(trustDomain: String, domain: String, agent: String, validDays: Int) -> CertificateRequest {
        var r = CertificateRequest(
            commonName: "\(agent).\(domain)", uris: [agentIdentity(trustDomain: trustDomain, domain: domain, agent: agent)],
            notAfterOffset: validDays * 86400)
        r.serverAuth = false
        return r
    }

    /// The broker's federation listener: the DNS names and IP addresses the
    /// agents' `broker.url` uses (they check it), extended key usage
    /// serverAuth only: it cannot pass as an agent.
    public static func broker(dnsNames: [String], ipAddresses: [String], validDays: Int) -> CertificateRequest {
        var r = CertificateRequest(
            commonName: dnsNames.first ?? ipAddresses.first ?? "scim-broker", dnsNames: dnsNames, ipAddresses: ipAddresses,
            notAfterOffset: validDays * 86400)
        r.clientAuth = false
        return r
    }
}

/// The certificate identity an agent is expected to carry:
/// `spiffe://TRUST-DOMAIN/DOMAIN/AGENT` (SAN URI). `scim-edge pki csr`
/// requests it, `scim-broker pki sign agent` issues it, the broker binds it
/// to the domain (`domains:` in its config).
public func agentIdentity(trustDomain: String, domain: String, agent: String) -> String {
    "spiffe://\(trustDomain)/\(domain)/\(agent)"
}

/// The parts of an agent identity (`agentIdentity`), or nil for another URI.
public func agentIdentityParts(_ uri: String) -> (trustDomain: String, domain: String, agent: String)? {
    guard uri.hasPrefix("spiffe://") else { return nil }
    let parts = uri.dropFirst(9).split(separator: "/", omittingEmptySubsequences: false)
    guard parts.count == 3, parts.allSatisfy({ !$0.isEmpty }) else { return nil }
    return (String(parts[0]), String(parts[1]), String(parts[2]))
}

/// A small certificate authority (EC P-256, SHA-256): throwaway PKIs for the
/// sandbox and tests, the federation CA of `scim-broker pki` (loaded from
/// its files), and the building blocks of `pki csr`.
///
/// Threading: not shared; use from one thread.
public final class CertificateAuthority {
    private let key: OpaquePointer
    private let cert: OpaquePointer

    /// Creates a self-signed root CA. `uris` become its SAN URIs: the
    /// federation CA carries its trust domain (`spiffe://acme.example`), as
    /// SPIFFE CAs do, so that `pki sign` knows which identities it issues.
    public init(commonName: String, validDays: Int = 3650, uris: [String] = []) throws(TLSError) {
        ERR_clear_error()
        key = try generateKey()
        guard let x = X509_new() else { EVP_PKEY_free(key); throw TLSError.capture("X509_new") }
        cert = x
        try fill(
            x, serial: randomSerial(), commonName: commonName, notBefore: -300, notAfter: validDays * 86400,
            publicKey: key, issuer: nil)
        try addExtension(x, issuer: x, NID_basic_constraints, "critical,CA:TRUE")
        try addExtension(x, issuer: x, NID_key_usage, "critical,keyCertSign,cRLSign")
        try addExtension(x, issuer: x, NID_subject_key_identifier, "hash")
        if !uris.isEmpty { try addExtension(x, issuer: x, NID_subject_alt_name, uris.map { "URI:\($0)" }.joined(separator: ",")) }
        guard X509_sign(x, key, EVP_sha256()) > 0 else { throw TLSError.capture("sign CA certificate") }
    }

    /// A CA from its certificate and private key (PEM), as `pki init` wrote them.
    public init(certificatePEM: String, privateKeyPEM: String) throws(TLSError) {
        ERR_clear_error()
        guard let x = withBIO(certificatePEM, { PEM_read_bio_X509($0, nil, nil, nil) }) else {
            throw TLSError.capture("read the CA certificate")
        }
        guard let k = withBIO(privateKeyPEM, { PEM_read_bio_PrivateKey($0, nil, nil, nil) }) else {
            X509_free(x)
            throw TLSError.capture("read the CA key")
        }
        cert = x
        key = k
        guard X509_check_private_key(x, k) == 1 else { throw TLSError.capture("the CA key does not go with the CA certificate") }
        guard X509_check_ca(x) >= 1 else { throw TLSError(operation: "load the CA", reasons: ["the certificate is not a CA's"]) }
    }

    deinit {
        X509_free(cert)
        EVP_PKEY_free(key)
    }

    public var certificatePEM: String { pem { PEM_write_bio_X509($0, cert) } }
    /// The CA's own key: for `pki init` to write it once, nothing else.
    public var privateKeyPEM: String { pem { PEM_write_bio_PrivateKey($0, key, nil, nil, 0, nil, nil) } }
    /// The CA certificate's names (its SAN URIs hold the trust domain) and validity.
    public var identity: PeerIdentity { PeerIdentity(certificate: cert) }

    /// Issues a leaf certificate with a fresh key.
    public func issue(_ request: CertificateRequest) throws(TLSError) -> Credential {
        ERR_clear_error()
        let leafKey = try generateKey()
        defer { EVP_PKEY_free(leafKey) }
        let (certificatePEM, serial) = try certify(publicKey: leafKey, request)
        return Credential(
            certificatePEM: certificatePEM,
            privateKeyPEM: pem { PEM_write_bio_PrivateKey($0, leafKey, nil, nil, 0, nil, nil) },
            serial: serial)
    }

    /// Issues a certificate for the key of a signing request. The names and
    /// usages are `request`'s, never the ones the requester asked for: the
    /// CA decides what an identity is (compare `csr.identity` first).
    public func sign(_ csr: SigningRequest, _ request: CertificateRequest) throws(TLSError) -> (certificatePEM: String, serial: Int) {
        ERR_clear_error()
        guard let publicKey = X509_REQ_get0_pubkey(csr.req) else { throw TLSError.capture("read the request's public key") }
        return try certify(publicKey: publicKey, request)
    }

    private func certify(publicKey: OpaquePointer, _ request: CertificateRequest) throws(TLSError) -> (String, Int) {
        guard let x = X509_new() else { throw TLSError.capture("X509_new") }
        defer { X509_free(x) }
        let serial = randomSerial()
        try fill(
            x, serial: serial, commonName: request.commonName, notBefore: request.notBeforeOffset,
            notAfter: request.notAfterOffset, publicKey: publicKey, issuer: cert)
        try addExtension(x, issuer: cert, NID_basic_constraints, "critical,CA:FALSE")
        try addExtension(x, issuer: cert, NID_key_usage, "critical,digitalSignature,keyEncipherment")
        var usages: [String] = []
        if request.serverAuth { usages.append("serverAuth") }
        if request.clientAuth { usages.append("clientAuth") }
        if !usages.isEmpty { try addExtension(x, issuer: cert, NID_ext_key_usage, usages.joined(separator: ",")) }
        let sans =
            request.dnsNames.map { "DNS:\($0)" } + request.ipAddresses.map { "IP:\($0)" }
            + request.uris.map { "URI:\($0)" }
        if !sans.isEmpty { try addExtension(x, issuer: cert, NID_subject_alt_name, sans.joined(separator: ",")) }
        try addExtension(x, issuer: cert, NID_authority_key_identifier, "keyid:always")
        guard X509_sign(x, key, EVP_sha256()) > 0 else { throw TLSError.capture("sign certificate") }
        return (pem { PEM_write_bio_X509($0, x) }, serial)
    }

    /// A CRL (PEM) revoking the given serial numbers now, valid for `validDays`.
    public func revocationList(revoking serials: [Int], validDays: Int = 30) throws(TLSError) -> String {
        try revocationList(serials.map { Revocation(serial: $0, at: nil) }, validDays: validDays)
    }

    /// A CRL (PEM) listing `revoked`, numbered `number` (the crlNumber
    /// extension: each issue is larger), valid for `validDays`: past its
    /// nextUpdate, a peer checking CRLs refuses every certificate, so it
    /// must be issued again before then (`pki crl`).
    public func revocationList(_ revoked: [Revocation], validDays: Int = 30, number: Int = 1) throws(TLSError) -> String {
        ERR_clear_error()
        guard let crl = X509_CRL_new() else { throw TLSError.capture("X509_CRL_new") }
        defer { X509_CRL_free(crl) }
        X509_CRL_set_version(crl, 1)
        X509_CRL_set_issuer_name(crl, X509_get_subject_name(cert))
        let now = X509_gmtime_adj(nil, 0)
        let next = X509_gmtime_adj(nil, validDays * 86400)
        defer { ASN1_TIME_free(now); ASN1_TIME_free(next) }
        X509_CRL_set1_lastUpdate(crl, now)
        X509_CRL_set1_nextUpdate(crl, next)
        for r in revoked {
            guard let entry = X509_REVOKED_new() else { throw TLSError.capture("X509_REVOKED_new") }
            let serial = ASN1_INTEGER_new()
            ASN1_INTEGER_set(serial, r.serial)
            X509_REVOKED_set_serialNumber(entry, serial)
            ASN1_INTEGER_free(serial)
            if let at = r.at {
                let date = ASN1_TIME_set(nil, time_t(at))
                X509_REVOKED_set_revocationDate(entry, date)
                ASN1_TIME_free(date)
            } else {
                X509_REVOKED_set_revocationDate(entry, now)
            }
            X509_CRL_add0_revoked(crl, entry)
        }
        let crlNumber = ASN1_INTEGER_new()
        defer { ASN1_INTEGER_free(crlNumber) }
        ASN1_INTEGER_set(crlNumber, number)
        guard X509_CRL_add1_ext_i2d(crl, NID_crl_number, crlNumber, 0, 0) == 1 else { throw TLSError.capture("add crlNumber") }
        X509_CRL_sort(crl)
        guard X509_CRL_sign(crl, key, EVP_sha256()) > 0 else { throw TLSError.capture("sign CRL") }
        return pem { PEM_write_bio_X509_CRL($0, crl) }
    }
}

/// A certificate the CA revoked: its serial and when (Unix seconds; nil: now).
public struct Revocation: Sendable, Equatable {
    public var serial: Int
    public var at: Int64?
    public init(serial: Int, at: Int64?) {
        self.serial = serial
        self.at = at
    }
}

/// A certificate signing request (PEM) whose signature verified: the key
/// holder asked for these names.
public final class SigningRequest {
    let req: OpaquePointer
    /// The names asked for (SAN URIs, DNS names, the subject CN); no fingerprint or serial.
    public let identity: PeerIdentity

    public init(pem text: String) throws(TLSError) {
        ERR_clear_error()
        guard let r = withBIO(text, { PEM_read_bio_X509_REQ($0, nil, nil, nil) }) else {
            throw TLSError.capture("read a PEM certificate signing request")
        }
        req = r
        // Proof that the requester holds the key it asks a certificate for.
        guard let key = X509_REQ_get0_pubkey(r), X509_REQ_verify(r, key) == 1 else {
            throw TLSError.capture("verify the request's signature")
        }
        var cn: String?
        var buf = [CChar](repeating: 0, count: 256)
        if let subject = X509_REQ_get_subject_name(r), X509_NAME_get_text_by_NID(subject, NID_commonName, &buf, Int32(buf.count)) > 0 {
            cn = string(buf)
        }
        let sans = SANs(edge_x509_req_get_sans(r))
        identity = PeerIdentity(
            commonName: cn, dnsNames: sans.dns, uris: sans.uris, ipAddresses: sans.ips, sha256Fingerprint: "", serialNumber: "")
    }

    deinit { X509_REQ_free(req) }
}

/// A serial number: 63 random bits (RFC 5280 §4.1.2.2 asks for unique
/// positive serials; random ones need no counter on disk and cannot be guessed).
func randomSerial() -> Int {
    let bytes = secureRandomBytes(8)
    let n = bytes.reduce(0) { $0 << 8 | UInt64($1) } & 0x7FFF_FFFF_FFFF_FFFF
    return n == 0 ? 1 : Int(n)
}

/// Runs an OpenSSL PEM reader over `text` in a memory BIO.
func withBIO<T>(_ text: String, _ read: (OpaquePointer) -> T?) -> T? {
    let bytes = Array(text.utf8)
    return bytes.withUnsafeBytes { b -> T? in
        guard let bio = BIO_new_mem_buf(b.baseAddress, Int32(b.count)) else { return nil }
        defer { BIO_free(bio) }
        return read(bio)
    }
}

func generateKey() throws(TLSError) -> OpaquePointer {
    guard let ctx = EVP_PKEY_CTX_new_from_name(nil, "EC", nil) else { throw TLSError.capture("EVP_PKEY_CTX_new") }
    defer { EVP_PKEY_CTX_free(ctx) }
    var key: OpaquePointer?
    guard EVP_PKEY_keygen_init(ctx) == 1, EVP_PKEY_CTX_set_group_name(ctx, "P-256") == 1,
        EVP_PKEY_generate(ctx, &key) == 1, let key
    else {
        throw TLSError.capture("generate EC P-256 key")
    }
    return key
}

private func fill(
    _ x: OpaquePointer, serial: Int, commonName: String, notBefore: Int, notAfter: Int,
    publicKey: OpaquePointer, issuer: OpaquePointer?
) throws(TLSError) {
    X509_set_version(x, 2)
    ASN1_INTEGER_set(X509_get_serialNumber(x), serial)
    X509_gmtime_adj(X509_getm_notBefore(x), notBefore)
    X509_gmtime_adj(X509_getm_notAfter(x), notAfter)
    X509_set_pubkey(x, publicKey)
    let name = X509_get_subject_name(x)
    guard X509_NAME_add_entry_by_txt(name, "CN", MBSTRING_ASC, commonName, -1, -1, 0) == 1 else {
        throw TLSError.capture("set subject CN")
    }
    X509_set_issuer_name(x, issuer.map { X509_get_subject_name($0) } ?? name)
}

private func addExtension(_ x: OpaquePointer, issuer: OpaquePointer, _ nid: Int32, _ value: String) throws(TLSError) {
    var ctx = X509V3_CTX()
    X509V3_set_ctx(&ctx, issuer, x, nil, nil, 0)
    guard let ext = X509V3_EXT_conf_nid(nil, &ctx, nid, value) else {
        throw TLSError.capture("certificate extension \(value)")
    }
    defer { X509_EXTENSION_free(ext) }
    guard X509_add_ext(x, ext, -1) == 1 else { throw TLSError.capture("add extension \(value)") }
}

/// Runs a PEM writer against a memory BIO and returns the text.
func pem(_ write: (OpaquePointer) -> Int32) -> String {
    guard let bio = BIO_new(BIO_s_mem()) else { return "" }
    defer { BIO_free(bio) }
    _ = write(bio)
    let n = edge_bio_pending(bio)
    var bytes = [UInt8](repeating: 0, count: n)
    let got = bytes.withUnsafeMutableBytes { BIO_read(bio, $0.baseAddress, Int32(n)) }
    return String(decoding: bytes.prefix(Int(max(got, 0))), as: UTF8.self)
}
