internal import COpenSSL
import Synchronization

/// An OpenSSL failure with the whole error queue it left.
public struct TLSError: Error, CustomStringConvertible, Sendable, Equatable {
    public var operation: String
    /// Every entry of OpenSSL's error queue, oldest first (`ERR_error_string_n`).
    public var reasons: [String]
    /// The certificate verification result, when verification failed
    /// (`X509_verify_cert_error_string`).
    public var verifyError: String?

    public init(operation: String, reasons: [String] = [], verifyError: String? = nil) {
        self.operation = operation
        self.reasons = reasons
        self.verifyError = verifyError
    }

    public var description: String {
        var s = "TLS \(operation) failed"
        if let verifyError { s += ": certificate verify: \(verifyError)" }
        if !reasons.isEmpty { s += " [" + reasons.joined(separator: "; ") + "]" }
        return s
    }

    /// Drains OpenSSL's (thread-local) error queue into an error.
    static func capture(_ operation: String, verifyError: String? = nil) -> TLSError {
        var reasons: [String] = []
        var buf = [CChar](repeating: 0, count: 256)
        while true {
            let code = ERR_get_error()
            if code == 0 { break }
            ERR_error_string_n(code, &buf, buf.count)
            reasons.append(string(buf))
        }
        return TLSError(operation: operation, reasons: reasons, verifyError: verifyError)
    }
}

/// The text of a NUL-terminated C buffer.
func string(_ buffer: [CChar]) -> String {
    String(decoding: buffer.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
}

/// The identity a peer proved with its certificate.
public struct PeerIdentity: Sendable, Equatable, CustomStringConvertible {
    public var commonName: String?
    public var dnsNames: [String]
    public var uris: [String]
    public var ipAddresses: [String]
    /// SHA-256 of the DER certificate, lowercase hex.
    public var sha256Fingerprint: String
    public var serialNumber: String
    /// The end of the certificate's validity, in Unix seconds (0: unknown).
    public var notAfter: Int64 = 0

    /// The names this certificate may be bound by: its SAN URIs when it has
    /// any, else its DNS SANs, and never the subject CN. A CN is free text
    /// that any CA-signed certificate can spell; letting it stand beside a
    /// SAN would let one certificate claim two identities (RFC 6125 §6.4.4
    /// deprecates it for the same reason). A certificate with neither kind
    /// of SAN has no identity to bind.
    public var bindingNames: [String] { uris.isEmpty ? dnsNames : uris }

    /// Every name the certificate carries, for logs and diagnostics: SAN
    /// URIs, DNS names, then the subject CN (marked).
    public var names: [String] { uris + dnsNames + (commonName.map { ["CN=\($0)"] } ?? []) }

    public var description: String {
        "PeerIdentity(cn: \(commonName ?? "-"), uris: \(uris), dns: \(dnsNames), sha256: \(sha256Fingerprint))"
    }
}

/// Where a TLS context takes its keys, trust and policy from. Files are PEM.
public struct TLSConfiguration: Sendable, Equatable {
    /// Our certificate followed by its intermediates.
    public var certificateChainFile: String?
    public var privateKeyFile: String?
    /// CA certificates to verify the peer against.
    public var trustRootsFile: String?
    /// Certificate revocation lists (PEM, one or more) from the trusted CA.
    public var crlFile: String?
    /// Server: require and verify a client certificate (mutual TLS).
    /// Client: verify the server (should always be on).
    public var verifyPeer: Bool = true
    /// TLS 1.3 unless lowered on purpose for an old peer.
    public var minimumVersion: TLSVersion = .tls13

    public init(
        certificateChainFile: String? = nil, privateKeyFile: String? = nil, trustRootsFile: String? = nil,
        crlFile: String? = nil, verifyPeer: Bool = true, minimumVersion: TLSVersion = .tls13
    ) {
        self.certificateChainFile = certificateChainFile
        self.privateKeyFile = privateKeyFile
        self.trustRootsFile = trustRootsFile
        self.crlFile = crlFile
        self.verifyPeer = verifyPeer
        self.minimumVersion = minimumVersion
    }
}

public enum TLSVersion: Sendable, Equatable {
    case tls12, tls13
    var raw: Int32 { self == .tls13 ? TLS1_3_VERSION : TLS1_2_VERSION }
}

public enum TLSRole: Sendable { case server, client }

/// An `SSL_CTX`: keys, trust and policy shared by many connections.
///
/// Threading: OpenSSL contexts are safe to share once configured, so this
/// class is `Sendable`; it is never mutated after `init`.
public final class TLSContext: @unchecked Sendable {
    let ctx: OpaquePointer
    public let role: TLSRole
    public let configuration: TLSConfiguration

    public init(role: TLSRole, configuration: TLSConfiguration) throws(TLSError) {
        self.role = role
        self.configuration = configuration
        ERR_clear_error()
        guard let ctx = SSL_CTX_new(role == .server ? TLS_server_method() : TLS_client_method()) else {
            throw TLSError.capture("SSL_CTX_new")
        }
        self.ctx = ctx
        guard edge_ssl_ctx_set_min_proto(ctx, configuration.minimumVersion.raw) == 1 else {
            throw TLSError.capture("set minimum protocol version")
        }
        // Per-connection buffers are released when idle: bounded memory per connection.
        _ = edge_ssl_ctx_set_mode(ctx, Int(SSL_MODE_RELEASE_BUFFERS))
        if role == .server {
            // Agents keep one long connection; tickets would only cost bytes.
            SSL_CTX_set_num_tickets(ctx, 0)
            _ = edge_ssl_ctx_set_session_cache_mode(ctx, Int(SSL_SESS_CACHE_OFF))
        }
        if let chain = configuration.certificateChainFile {
            guard SSL_CTX_use_certificate_chain_file(ctx, chain) == 1 else {
                throw TLSError.capture("load certificate chain \(chain)")
            }
        }
        if let key = configuration.privateKeyFile {
            guard SSL_CTX_use_PrivateKey_file(ctx, key, SSL_FILETYPE_PEM) == 1 else {
                throw TLSError.capture("load private key \(key)")
            }
            guard SSL_CTX_check_private_key(ctx) == 1 else {
                throw TLSError.capture("private key \(key) does not match the certificate")
            }
        }
        if let roots = configuration.trustRootsFile {
            guard SSL_CTX_load_verify_locations(ctx, roots, nil) == 1 else {
                throw TLSError.capture("load trust roots \(roots)")
            }
        } else if role == .client && configuration.verifyPeer {
            guard SSL_CTX_set_default_verify_paths(ctx) == 1 else { throw TLSError.capture("default trust roots") }
        }
        if let crlPath = configuration.crlFile {
            try Self.loadCRLs(crlPath, into: ctx)
        }
        if configuration.verifyPeer {
            let mode = role == .server ? (SSL_VERIFY_PEER | SSL_VERIFY_FAIL_IF_NO_PEER_CERT) : SSL_VERIFY_PEER
            SSL_CTX_set_verify(ctx, mode, nil)
        } else {
            SSL_CTX_set_verify(ctx, SSL_VERIFY_NONE, nil)
        }
    }

    deinit { SSL_CTX_free(ctx) }

    private static func loadCRLs(_ path: String, into ctx: OpaquePointer) throws(TLSError) {
        guard let bio = BIO_new_file(path, "r") else { throw TLSError.capture("open CRL file \(path)") }
        defer { BIO_free(bio) }
        guard let infos = PEM_X509_INFO_read_bio(bio, nil, nil, nil) else {
            throw TLSError.capture("read CRL file \(path)")
        }
        defer { edge_x509_info_free_all(infos) }
        let store = SSL_CTX_get_cert_store(ctx)
        var loaded = 0
        for i in 0..<edge_x509_info_count(infos) {
            if let crl = edge_x509_info_crl(edge_x509_info_at(infos, i)) {
                guard X509_STORE_add_crl(store, crl) == 1 else { throw TLSError.capture("add CRL from \(path)") }
                loaded += 1
            }
        }
        guard loaded > 0 else { throw TLSError(operation: "load CRL", reasons: ["no CRL found in \(path)"]) }
        // Check the leaf against its issuer's CRL (the federation CA issues leaves directly).
        X509_STORE_set_flags(store, UInt(X509_V_FLAG_CRL_CHECK))
    }

    /// A new connection's TLS state. For a client, `peerName` is the host
    /// name or IP address the server certificate must carry (and the SNI).
    public func makeSession(peerName: String? = nil) throws(TLSError) -> TLSSession {
        try TLSSession(context: self, peerName: peerName)
    }
}

/// A context that can be rebuilt from its files without a restart (SIGHUP):
/// new connections use the new one, live connections keep theirs.
public final class ReloadableTLSContext: Sendable {
    private let current: Mutex<TLSContext>
    public init(role: TLSRole, configuration: TLSConfiguration) throws(TLSError) {
        current = Mutex(try TLSContext(role: role, configuration: configuration))
    }
    public var context: TLSContext { current.withLock { $0 } }
    /// Re-reads certificate, key, trust roots and CRL. On error the old context stays.
    public func reload() throws(TLSError) {
        let old = context
        let fresh = try TLSContext(role: old.role, configuration: old.configuration)
        current.withLock { $0 = fresh }
    }
}

/// What a non-blocking TLS step achieved.
public enum TLSProgress: Equatable, Sendable {
    /// Needs more bytes from the peer; send `takeOutput()` first.
    case needsInput
    case complete
    case failed(TLSError)
}

/// What a plaintext read produced.
public enum TLSReadResult: Equatable, Sendable {
    case data(Int)
    case needsInput
    /// The peer sent close_notify.
    case closed
    case failed(TLSError)
}

/// One connection's TLS over two memory BIOs: ciphertext from the network is
/// fed in with `feed`, ciphertext for the network is taken with `takeOutput`.
///
/// Threading: confined to the thread (event loop) that uses the connection.
public final class TLSSession {
    let ssl: OpaquePointer
    private let networkIn: OpaquePointer  // ciphertext from the peer → OpenSSL
    private let networkOut: OpaquePointer  // OpenSSL → ciphertext for the peer
    public let role: TLSRole
    public private(set) var handshakeComplete = false

    init(context: TLSContext, peerName: String?) throws(TLSError) {
        ERR_clear_error()
        guard let ssl = SSL_new(context.ctx) else { throw TLSError.capture("SSL_new") }
        guard let rbio = BIO_new(BIO_s_mem()), let wbio = BIO_new(BIO_s_mem()) else {
            SSL_free(ssl)
            throw TLSError.capture("BIO_new")
        }
        // An empty memory BIO means "retry later", not end of file.
        edge_bio_set_mem_eof_return(rbio, -1)
        edge_bio_set_mem_eof_return(wbio, -1)
        SSL_set_bio(ssl, rbio, wbio)  // the SSL now owns both BIOs
        self.ssl = ssl
        self.networkIn = rbio
        self.networkOut = wbio
        self.role = context.role
        if context.role == .server {
            SSL_set_accept_state(ssl)
        } else {
            SSL_set_connect_state(ssl)
            if let peerName, context.configuration.verifyPeer {
                if isIPAddress(peerName) {
                    guard X509_VERIFY_PARAM_set1_ip_asc(SSL_get0_param(ssl), peerName) == 1 else {
                        throw TLSError.capture("expect peer IP \(peerName)")
                    }
                } else {
                    guard SSL_set1_host(ssl, peerName) == 1 else { throw TLSError.capture("expect peer host \(peerName)") }
                    _ = edge_ssl_set_sni(ssl, peerName)
                }
            }
        }
    }

    deinit { SSL_free(ssl) }

    /// Hands ciphertext received from the network to OpenSSL.
    public func feed(_ bytes: UnsafeRawBufferPointer) {
        guard bytes.count > 0 else { return }
        let n = BIO_write(networkIn, bytes.baseAddress, Int32(bytes.count))
        precondition(n == Int32(bytes.count), "memory BIO refused input")
    }

    /// Bytes waiting to be sent to the peer.
    public var pendingOutput: Int { edge_bio_pending(networkOut) }

    /// Takes the ciphertext OpenSSL produced, to write to the network.
    public func takeOutput() -> [UInt8] {
        let n = edge_bio_pending(networkOut)
        guard n > 0 else { return [] }
        var out = [UInt8](repeating: 0, count: n)
        let got = out.withUnsafeMutableBytes { BIO_read(networkOut, $0.baseAddress, Int32(n)) }
        if got < Int32(n) { out.removeLast(n - Int(max(got, 0))) }
        return out
    }

    /// Advances the handshake.
    public func handshake() -> TLSProgress {
        if handshakeComplete { return .complete }
        ERR_clear_error()
        let rc = SSL_do_handshake(ssl)
        if rc == 1 {
            handshakeComplete = true
            return .complete
        }
        return progress(rc, "handshake")
    }

    private func progress(_ rc: Int32, _ operation: String) -> TLSProgress {
        switch SSL_get_error(ssl, rc) {
        case SSL_ERROR_WANT_READ, SSL_ERROR_WANT_WRITE: return .needsInput
        default: return .failed(failure(operation))
        }
    }

    private func failure(_ operation: String) -> TLSError {
        let verify = SSL_get_verify_result(ssl)
        let verifyText = verify == X509_V_OK ? nil : String(cString: X509_verify_cert_error_string(verify))
        return TLSError.capture(operation, verifyError: verifyText)
    }

    /// Decrypts into `buffer`. Also advances a handshake that is not complete.
    public func read(into buffer: UnsafeMutableRawBufferPointer) -> TLSReadResult {
        ERR_clear_error()
        let n = SSL_read(ssl, buffer.baseAddress, Int32(buffer.count))
        if n > 0 { handshakeComplete = true; return .data(Int(n)) }
        switch SSL_get_error(ssl, n) {
        case SSL_ERROR_WANT_READ, SSL_ERROR_WANT_WRITE: return .needsInput
        case SSL_ERROR_ZERO_RETURN: return .closed
        default: return .failed(failure("read"))
        }
    }

    /// Encrypts `bytes`; the ciphertext is then in `takeOutput()`.
    public func write(_ bytes: UnsafeRawBufferPointer) throws(TLSError) {
        var offset = 0
        while offset < bytes.count {
            ERR_clear_error()
            let chunk = min(bytes.count - offset, 1 << 30)
            let n = SSL_write(ssl, bytes.baseAddress! + offset, Int32(chunk))
            guard n > 0 else { throw failure("write") }
            offset += Int(n)
        }
    }

    /// Queues a close_notify alert (send `takeOutput()` afterwards).
    public func close() {
        if handshakeComplete { _ = SSL_shutdown(ssl) }
    }

    /// The peer's certificate identity, once the handshake completed and only
    /// if the certificate verified.
    public var peerIdentity: PeerIdentity? {
        guard SSL_get_verify_result(ssl) == X509_V_OK, let cert = SSL_get1_peer_certificate(ssl) else { return nil }
        defer { X509_free(cert) }
        return PeerIdentity(certificate: cert)
    }

    /// Verifies the peer's certificate again, against `context`'s trust
    /// roots and CRLs as they are now and at the current time: nil while it
    /// still verifies, else why not (e.g. "certificate revoked" after a CRL
    /// reload, "certificate has expired"). A live connection proved its
    /// identity once; this is how it is held to a revocation made since.
    public func reverifyPeer(against context: TLSContext) -> String? {
        guard handshakeComplete, let cert = SSL_get1_peer_certificate(ssl) else { return "no peer certificate" }
        defer { X509_free(cert) }
        guard let store = SSL_CTX_get_cert_store(context.ctx), let check = X509_STORE_CTX_new() else { return "cannot verify" }
        defer { X509_STORE_CTX_free(check) }
        guard X509_STORE_CTX_init(check, store, cert, SSL_get_peer_cert_chain(ssl)) == 1 else { return "cannot verify" }
        // The purpose the handshake checked: a client certificate at a server, a server's at a client.
        _ = X509_STORE_CTX_set_default(check, role == .server ? "ssl_client" : "ssl_server")
        if X509_verify_cert(check) == 1 { return nil }
        return String(cString: X509_verify_cert_error_string(Int(X509_STORE_CTX_get_error(check))))
    }

    /// The negotiated protocol, e.g. `TLSv1.3`.
    public var protocolVersion: String { String(cString: SSL_get_version(ssl)) }
}

func isIPAddress(_ s: String) -> Bool {
    if s.contains(":") { return true }  // IPv6 literal
    let parts = s.split(separator: ".", omittingEmptySubsequences: false)
    return parts.count == 4 && parts.allSatisfy { UInt8($0) != nil }
}

extension PeerIdentity {
    init(certificate cert: OpaquePointer) {
        var cn: String?
        if let subject = X509_get_subject_name(cert) {
            var buf = [CChar](repeating: 0, count: 256)
            if X509_NAME_get_text_by_NID(subject, NID_commonName, &buf, Int32(buf.count)) > 0 { cn = string(buf) }
        }
        let sans = SANs(edge_x509_get_sans(cert))
        var md = [UInt8](repeating: 0, count: 32)
        var mdLen: UInt32 = 0
        X509_digest(cert, EVP_sha256(), &md, &mdLen)
        var serial = ""
        if let bn = ASN1_INTEGER_to_BN(X509_get0_serialNumber(cert), nil) {
            if let hex = BN_bn2hex(bn) { serial = String(cString: hex).lowercased(); edge_openssl_free(hex) }
            BN_free(bn)
        }
        self.init(
            commonName: cn, dnsNames: sans.dns, uris: sans.uris, ipAddresses: sans.ips,
            sha256Fingerprint: hex(md.prefix(Int(mdLen))), serialNumber: serial, notAfter: unixTime(X509_get0_notAfter(cert)))
    }
}

/// The DNS, URI and IP names of a subjectAltName extension (a
/// certificate's or a request's), which it frees.
struct SANs {
    var dns: [String] = [], uris: [String] = [], ips: [String] = []
    init(_ names: OpaquePointer?) {
        guard let names else { return }
        defer { edge_general_names_free(names) }
        for i in 0..<edge_san_count(names) {
            var len: Int32 = 0
            guard let p = edge_san_bytes(names, i, &len) else { continue }
            let bytes = Array(UnsafeBufferPointer(start: p, count: Int(len)))
            switch edge_san_type(names, i) {
            case GEN_DNS: dns.append(String(decoding: bytes, as: UTF8.self))
            case GEN_URI: uris.append(String(decoding: bytes, as: UTF8.self))
            case GEN_IPADD: ips.append(formatIP(bytes))
            default: break
            }
        }
    }
}

private let hexDigits: [UInt8] = Array("0123456789abcdef".utf8)

func hex<C: Collection>(_ bytes: C) -> String where C.Element == UInt8 {
    var out = [UInt8]()
    out.reserveCapacity(bytes.count * 2)
    for b in bytes {
        out.append(hexDigits[Int(b >> 4)])
        out.append(hexDigits[Int(b & 15)])
    }
    return String(decoding: out, as: UTF8.self)
}

func formatIP(_ b: [UInt8]) -> String {
    if b.count == 4 { return b.map(String.init).joined(separator: ".") }
    if b.count == 16 {
        return stride(from: 0, to: 16, by: 2).map { String(UInt16(b[$0]) << 8 | UInt16(b[$0 + 1]), radix: 16) }
            .joined(separator: ":")
    }
    return hex(b)
}

/// Cryptographically secure random bytes (OpenSSL `RAND_bytes`): ids,
/// event ids, trace ids.
public func secureRandomBytes(_ count: Int) -> [UInt8] {
    var out = [UInt8](repeating: 0, count: count)
    let ok = out.withUnsafeMutableBytes { RAND_bytes($0.baseAddress!.assumingMemoryBound(to: UInt8.self), Int32(count)) }
    precondition(ok == 1, "RAND_bytes failed: the OpenSSL random generator is not seeded")
    return out
}

/// SHA-256 of `bytes` (OpenSSL `EVP_Digest`).
public func sha256(_ bytes: [UInt8]) -> [UInt8] {
    var out = [UInt8](repeating: 0, count: 32)
    var len: UInt32 = 0
    bytes.withUnsafeBytes { b in _ = EVP_Digest(b.baseAddress, b.count, &out, &len, EVP_sha256(), nil) }
    return out
}

/// HMAC-SHA256 of `message` under `key` (OpenSSL `HMAC`): stable pseudonyms.
public func hmacSHA256(key: [UInt8], message: [UInt8]) -> [UInt8] {
    var out = [UInt8](repeating: 0, count: 32)
    var len: UInt32 = 0
    key.withUnsafeBytes { k in
        message.withUnsafeBytes { m in
            _ = HMAC(EVP_sha256(), k.baseAddress, Int32(k.count), m.baseAddress?.assumingMemoryBound(to: UInt8.self), m.count, &out, &len)
        }
    }
    return out
}

/// Lowercase hex of `bytes`.
public func hexString(_ bytes: [UInt8]) -> String { hex(bytes) }
