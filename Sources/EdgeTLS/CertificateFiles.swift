internal import COpenSSL
import Glibc

/// What `check-config` needs to know about a certificate file.
public struct CertificateSummary: Sendable {
    public var identity: PeerIdentity
    /// Validity, in Unix seconds.
    public var notBefore: Int64
    public var notAfter: Int64

    /// Reads the first certificate of a PEM file.
    public init(file path: String) throws(TLSError) {
        guard let f = fopen(path, "r") else { throw TLSError(operation: "open \(path)", reasons: [String(cString: strerror(errno))]) }
        defer { fclose(f) }
        guard let cert = PEM_read_X509(f, nil, nil, nil) else { throw TLSError.capture("read a PEM certificate from \(path)") }
        defer { X509_free(cert) }
        identity = PeerIdentity(certificate: cert)
        notBefore = unixTime(X509_get0_notBefore(cert))
        notAfter = unixTime(X509_get0_notAfter(cert))
    }

    /// Why the certificate is not valid at `now` (Unix seconds), or nil.
    public func validityProblem(now: Int64) -> String? {
        if now < notBefore { return "is not valid before \(formatUnix(notBefore))" }
        if now > notAfter { return "expired on \(formatUnix(notAfter))" }
        return nil
    }
}

/// Verifies that the certificate in `path` chains to a CA in `caFile`;
/// returns the reason when it does not.
public func certificateChainProblem(_ path: String, caFile: String) -> String? {
    guard let f = fopen(path, "r") else { return "cannot open \(path)" }
    defer { fclose(f) }
    guard let cert = PEM_read_X509(f, nil, nil, nil) else { return "\(path) holds no PEM certificate" }
    defer { X509_free(cert) }
    guard let store = X509_STORE_new() else { return "X509_STORE_new failed" }
    defer { X509_STORE_free(store) }
    guard X509_STORE_load_file(store, caFile) == 1 else { return "cannot read the CA file \(caFile)" }
    guard let ctx = X509_STORE_CTX_new() else { return "X509_STORE_CTX_new failed" }
    defer { X509_STORE_CTX_free(ctx) }
    guard X509_STORE_CTX_init(ctx, store, cert, nil) == 1 else { return "X509_STORE_CTX_init failed" }
    if X509_verify_cert(ctx) == 1 { return nil }
    return String(cString: X509_verify_cert_error_string(Int(X509_STORE_CTX_get_error(ctx))))
}

/// A new EC P-256 key and a certificate signing request for it (PEM), for
/// an organisation's own CA to sign.
public func makeSigningRequest(commonName: String, uris: [String] = [], dnsNames: [String] = [])
    throws(TLSError) -> (privateKeyPEM: String, requestPEM: String) {
    let key = try generateKey()
    defer { EVP_PKEY_free(key) }
    guard let req = X509_REQ_new() else { throw TLSError.capture("X509_REQ_new") }
    defer { X509_REQ_free(req) }
    X509_REQ_set_version(req, 0)
    guard X509_NAME_add_entry_by_txt(X509_REQ_get_subject_name(req), "CN", MBSTRING_ASC, commonName, -1, -1, 0) == 1 else {
        throw TLSError.capture("set subject CN")
    }
    X509_REQ_set_pubkey(req, key)
    let sans = uris.map { "URI:\($0)" } + dnsNames.map { "DNS:\($0)" }
    if !sans.isEmpty {
        guard edge_x509_req_add_san(req, sans.joined(separator: ",")) == 1 else { throw TLSError.capture("add subjectAltName") }
    }
    guard X509_REQ_sign(req, key, EVP_sha256()) > 0 else { throw TLSError.capture("sign the request") }
    return (pem { PEM_write_bio_PrivateKey($0, key, nil, nil, 0, nil, nil) }, pem { PEM_write_bio_X509_REQ($0, req) })
}

func unixTime(_ t: UnsafePointer<ASN1_TIME>?) -> Int64 {
    var tm = Glibc.tm()
    guard let t, ASN1_TIME_to_tm(t, &tm) == 1 else { return 0 }
    return Int64(timegm(&tm))
}

func formatUnix(_ seconds: Int64) -> String {
    var t = time_t(seconds)
    var tm = Glibc.tm()
    gmtime_r(&t, &tm)
    var buf = [CChar](repeating: 0, count: 32)
    strftime(&buf, buf.count, "%Y-%m-%dT%H:%M:%SZ", &tm)
    return String(decoding: buf.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
}

/// Collects every problem of a configuration's referenced files (for
/// `check-config`): existence, permissions of secrets, certificates that
/// are expired, not yet valid, not matching their key or not issued by
/// the configured CA.
public struct FileChecks: Sendable {
    public private(set) var problems: [String] = []
    public init() {}

    public mutating func problem(_ text: String) { problems.append(text) }

    /// A data directory: it exists, or its parent does (the service creates it).
    public mutating func dataDirectory(_ path: String) {
        var st = stat()
        guard stat(path, &st) != 0 else { return }
        let parent = path.contains("/") ? String(path[..<path.lastIndex(of: "/")!]) : "."
        if stat(parent.isEmpty ? "/" : parent, &st) != 0 {
            problems.append("dataDir \(path): neither it nor its parent directory exists")
        }
    }

    /// A file the service reads. A secret (key, token) must not be readable
    /// by every user.
    @discardableResult
    public mutating func file(_ path: String, _ what: String, secret: Bool = false) -> Bool {
        var st = stat()
        guard stat(path, &st) == 0 else {
            problems.append("\(what) \(path): \(String(cString: strerror(errno)))")
            return false
        }
        guard (st.st_mode & S_IFMT) == S_IFREG else {
            problems.append("\(what) \(path): not a regular file")
            return false
        }
        guard access(path, R_OK) == 0 else {
            problems.append("\(what) \(path): not readable (\(String(cString: strerror(errno))))")
            return false
        }
        if secret && (st.st_mode & 0o004) != 0 {
            problems.append("\(what) \(path): readable by every user; make it 0640 or stricter")
        }
        return true
    }

    /// A certificate (and its key): readable, valid now, matching its key,
    /// and issued by `ca` when given. Returns it for identity checks.
    @discardableResult
    public mutating func certificate(_ cert: String, key: String?, ca: String?, _ what: String) -> CertificateSummary? {
        let caOK = ca.map { file($0, "\(what) CA") } ?? false
        guard file(cert, "\(what) certificate") else {
            if let key { file(key, "\(what) key", secret: true) }
            return nil
        }
        var keyOK = true
        if let key { keyOK = file(key, "\(what) key", secret: true) }
        let summary: CertificateSummary
        do { summary = try CertificateSummary(file: cert) } catch {
            problems.append("\(what) certificate \(cert): \(error)")
            return nil
        }
        var now = timespec()
        clock_gettime(CLOCK_REALTIME, &now)
        if let p = summary.validityProblem(now: Int64(now.tv_sec)) { problems.append("\(what) certificate \(cert) \(p)") }
        if let key, keyOK {
            do { _ = try TLSContext(role: .client, configuration: TLSConfiguration(certificateChainFile: cert, privateKeyFile: key, verifyPeer: false)) }
            catch { problems.append("\(what) certificate \(cert) and key \(key): \(error)") }
        }
        if let ca, caOK, let p = certificateChainProblem(cert, caFile: ca) {
            problems.append("\(what) certificate \(cert) is not accepted by the CA \(ca): \(p)")
        }
        return summary
    }
}
