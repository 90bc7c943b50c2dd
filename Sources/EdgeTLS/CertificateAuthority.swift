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

/// A small certificate authority (EC P-256, SHA-256): throwaway PKIs for the
/// sandbox and tests, and the building blocks of `pki csr`.
///
/// Threading: not shared; use from one thread.
public final class CertificateAuthority {
    private let key: OpaquePointer
    private let cert: OpaquePointer
    private var nextSerial = 2

    /// Creates a self-signed root CA.
    public init(commonName: String, validDays: Int = 3650) throws(TLSError) {
        ERR_clear_error()
        key = try generateKey()
        guard let x = X509_new() else { EVP_PKEY_free(key); throw TLSError.capture("X509_new") }
        cert = x
        try fill(
            x, serial: 1, commonName: commonName, notBefore: -300, notAfter: validDays * 86400,
            publicKey: key, issuer: nil)
        try addExtension(x, issuer: x, NID_basic_constraints, "critical,CA:TRUE")
        try addExtension(x, issuer: x, NID_key_usage, "critical,keyCertSign,cRLSign")
        try addExtension(x, issuer: x, NID_subject_key_identifier, "hash")
        guard X509_sign(x, key, EVP_sha256()) > 0 else { throw TLSError.capture("sign CA certificate") }
    }

    deinit {
        X509_free(cert)
        EVP_PKEY_free(key)
    }

    public var certificatePEM: String { pem { PEM_write_bio_X509($0, cert) } }

    /// Issues a leaf certificate with a fresh key.
    public func issue(_ request: CertificateRequest) throws(TLSError) -> Credential {
        ERR_clear_error()
        let leafKey = try generateKey()
        defer { EVP_PKEY_free(leafKey) }
        guard let x = X509_new() else { throw TLSError.capture("X509_new") }
        defer { X509_free(x) }
        let serial = nextSerial
        nextSerial += 1
        try fill(
            x, serial: serial, commonName: request.commonName, notBefore: request.notBeforeOffset,
            notAfter: request.notAfterOffset, publicKey: leafKey, issuer: cert)
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
        return Credential(
            certificatePEM: pem { PEM_write_bio_X509($0, x) },
            privateKeyPEM: pem { PEM_write_bio_PrivateKey($0, leafKey, nil, nil, 0, nil, nil) },
            serial: serial)
    }

    /// A CRL (PEM) revoking the given serial numbers, valid for `validDays`.
    public func revocationList(revoking serials: [Int], validDays: Int = 30) throws(TLSError) -> String {
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
        for serial in serials {
            guard let revoked = X509_REVOKED_new() else { throw TLSError.capture("X509_REVOKED_new") }
            let number = ASN1_INTEGER_new()
            ASN1_INTEGER_set(number, serial)
            X509_REVOKED_set_serialNumber(revoked, number)
            ASN1_INTEGER_free(number)
            X509_REVOKED_set_revocationDate(revoked, now)
            X509_CRL_add0_revoked(crl, revoked)
        }
        X509_CRL_sort(crl)
        guard X509_CRL_sign(crl, key, EVP_sha256()) > 0 else { throw TLSError.capture("sign CRL") }
        return pem { PEM_write_bio_X509_CRL($0, crl) }
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
