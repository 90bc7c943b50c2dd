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

    /// The end of validity of the first certificate in `path` (Unix
    /// seconds), for expiry metrics; 0 when there is no file or it cannot be read.
    public static func expiry(ofFile path: String?) -> Int64 {
        guard let path else { return 0 }
        return (try? CertificateSummary(file: path).notAfter) ?? 0
    }

    /// Why the certificate is not valid at `now` (Unix seconds), or nil.
    public func validityProblem(now: Int64) -> String? {
        if now < notBefore { return "is not valid before \(formatUnix(notBefore))" }
        if now > notAfter { return "expired on \(formatUnix(notAfter))" }
        return nil
    }
}

/// The nextUpdate of the first CRL in a PEM file (Unix seconds), for the
/// CRL expiry metric: past it, a peer checking CRLs refuses every
/// certificate. 0 when there is no file, no CRL or no nextUpdate.
public func revocationListNextUpdate(ofFile path: String?) -> Int64 {
    guard let path, let bio = BIO_new_file(path, "r") else { return 0 }
    defer { BIO_free(bio) }
    guard let crl = PEM_read_bio_X509_CRL(bio, nil, nil, nil) else {
        ERR_clear_error()
        return 0
    }
    defer { X509_CRL_free(crl) }
    return unixTime(X509_CRL_get0_nextUpdate(crl))
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
    throws(TLSError) -> (privateKeyPEM: String, requestPEM: String)
{
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

/// A problem of a file a configuration names: the YAML key naming it (so
/// that it can be reported at that key's line), what is wrong, what to do.
public struct FileProblem: Sendable, Equatable {
    public let key: String
    public let message: String
    public let fix: String?
}

/// Collects every problem of a configuration's referenced files (for
/// `check-config`): existence, permissions of secrets, readability by the
/// service's user, certificates that are expired, not yet valid, not
/// matching their key or not issued by the configured CA.
public struct FileChecks: Sendable {
    public private(set) var problems: [FileProblem] = []
    /// When set (`--as-user`), files are checked as this user can reach
    /// them, not as the user running the check.
    public let serviceUser: ServiceUser?
    public init(serviceUser: ServiceUser? = nil) { self.serviceUser = serviceUser }

    public mutating func problem(_ key: String, _ message: String, fix: String? = nil) {
        problems.append(FileProblem(key: key, message: message, fix: fix))
    }

    /// A data directory: it exists, or its parent does (the service creates
    /// it); the service's user can read and write it (or create it).
    public mutating func dataDirectory(_ path: String, at key: String = "dataDir") {
        var st = stat()
        if stat(path, &st) == 0 {
            guard (st.st_mode & S_IFMT) == S_IFDIR else { return problem(key, "\(path): not a directory") }
            if let user = serviceUser, let e = user.access(path, R_OK | W_OK | X_OK) {
                problem(
                    key, "\(path): user \(user.name) cannot read and write it (\(String(cString: strerror(e))); \(modeText(st)))",
                    fix: "chown \(user.name):\(user.groupName) \(path) && chmod 0750 \(path)")
            }
            return
        }
        let parent = path.contains("/") ? String(path[..<path.lastIndex(of: "/")!]) : "."
        let dir = parent.isEmpty ? "/" : parent
        if stat(dir, &st) != 0 {
            problem(key, "\(path): neither it nor its parent directory exists", fix: "create it, owned by the service's user")
        } else if let user = serviceUser, let e = user.access(dir, W_OK | X_OK) {
            problem(
                key, "\(path) does not exist and user \(user.name) cannot create it in \(dir) (\(String(cString: strerror(e))))",
                fix: "install -d -o \(user.name) -g \(user.groupName) -m 0750 \(path)")
        }
    }

    /// A file the service reads. A secret (key, token) must not be readable
    /// by every user, nor (with a service user known) by a group the service
    /// is not in: nothing beyond what the service needs.
    @discardableResult
    public mutating func file(_ path: String, at key: String, secret: Bool = false) -> Bool {
        var st = stat()
        guard stat(path, &st) == 0 else {
            problem(key, "\(path): \(String(cString: strerror(errno)))", fix: "create it, or correct the path")
            return false
        }
        guard (st.st_mode & S_IFMT) == S_IFREG else {
            problem(key, "\(path): not a regular file")
            return false
        }
        if let user = serviceUser {
            if let e = user.access(path, R_OK) {
                problem(
                    key, "\(path): user \(user.name) cannot read it (\(String(cString: strerror(e))); \(modeText(st)))",
                    fix: "chgrp \(user.groupName) \(path) && chmod g+r \(path), and let \(user.name) search every directory above it")
                return false
            }
        } else if access(path, R_OK) != 0 {
            problem(key, "\(path): not readable (\(String(cString: strerror(errno))))")
            return false
        }
        if secret && (st.st_mode & 0o006) != 0 {
            problem(
                key, "\(path): a secret \((st.st_mode & 0o004) != 0 ? "readable" : "writable") by every user (\(modeText(st)))",
                fix: "chmod 0640 \(path) (or 0600)")
        } else if secret, (st.st_mode & 0o040) != 0, let user = serviceUser, st.st_uid != user.uid, !user.groups.contains(st.st_gid) {
            problem(
                key, "\(path): a secret readable by group \(nameOfGroup(st.st_gid)), which user \(user.name) is not in (\(modeText(st)))",
                fix: "chgrp \(user.groupName) \(path), or chmod g-r \(path)")
        }
        return true
    }

    /// A certificate (and its key): readable, valid now, matching its key,
    /// and issued by `ca` when given. Returns it for identity checks.
    /// `at` names the YAML keys of the three files.
    @discardableResult
    public mutating func certificate(_ cert: String, key: String?, ca: String?, at keys: (cert: String, key: String, ca: String))
        -> CertificateSummary?
    {
        let caOK = ca.map { file($0, at: keys.ca) } ?? false
        guard file(cert, at: keys.cert) else {
            if let key { file(key, at: keys.key, secret: true) }
            return nil
        }
        var keyOK = true
        if let key { keyOK = file(key, at: keys.key, secret: true) }
        let summary: CertificateSummary
        do { summary = try CertificateSummary(file: cert) } catch {
            problem(keys.cert, "\(cert): \(error)", fix: "give a PEM certificate")
            return nil
        }
        var now = timespec()
        clock_gettime(CLOCK_REALTIME, &now)
        if let p = summary.validityProblem(now: Int64(now.tv_sec)) { problem(keys.cert, "\(cert) \(p)", fix: "renew the certificate") }
        if let key, keyOK {
            do {
                _ = try TLSContext(
                    role: .client, configuration: TLSConfiguration(certificateChainFile: cert, privateKeyFile: key, verifyPeer: false))
            } catch {
                problem(
                    keys.key, "\(key) does not go with the certificate \(cert): \(error)",
                    fix: "give the key the certificate was issued for")
            }
        }
        if let ca, caOK, let p = certificateChainProblem(cert, caFile: ca) {
            problem(
                keys.cert, "\(cert) is not accepted by the CA \(ca): \(p)",
                fix: "have the certificate issued by that CA, or name its issuer's CA")
        }
        return summary
    }

    /// A CRL file: readable, and a CRL of the CA in `ca` (loadable beside it).
    public mutating func revocationList(_ crl: String, ca: String?, at key: String) {
        guard file(crl, at: key), let ca else { return }
        do { _ = try TLSContext(role: .server, configuration: TLSConfiguration(trustRootsFile: ca, crlFile: crl)) } catch {
            problem(key, "\(crl): \(error)", fix: "give the CRL the federation CA issued (PEM)")
        }
    }
}

func modeText(_ st: stat) -> String {
    let mode = String(st.st_mode & 0o7777, radix: 8)
    return "mode 0\(mode), owner \(nameOfUser(st.st_uid)):\(nameOfGroup(st.st_gid))"
}

func nameOfUser(_ uid: uid_t) -> String { getpwuid(uid).map { String(cString: $0.pointee.pw_name) } ?? "\(uid)" }
func nameOfGroup(_ gid: gid_t) -> String { getgrgid(gid).map { String(cString: $0.pointee.gr_name) } ?? "\(gid)" }

/// Why `--as-user NAME` cannot check.
public enum ServiceUserError: Error, Sendable, CustomStringConvertible {
    case unknown(String)
    case notPermitted(String)
    public var description: String {
        switch self {
        case .unknown(let name): return "--as-user: no user '\(name)' on this system"
        case .notPermitted(let name): return "--as-user \(name): checking as another user needs root (or run it as \(name))"
        }
    }
}

/// The user a service runs as (`check-config --as-user NAME`): can it reach
/// the files its configuration names?
///
/// access(2) answers for the real user and group IDs and the supplementary
/// groups, with the kernel's own rules: ACLs, search permission on every
/// directory of the path, capabilities dropped for a non-root real UID. So,
/// run as root, a check sets the real IDs and the groups to the user's for
/// the one call and back after (setreuid/setregid of the real IDs only);
/// the effective UID stays 0, which is what allows setting them back. That is simpler and more exact than
/// re-implementing the permission rules from the mode bits, and needs no
/// child process. Run as the user itself (the units' ExecStartPre, with
/// User= set), it just asks. check-config runs on one thread, so the
/// switch is seen by nothing else.
public struct ServiceUser: Sendable {
    public let name: String
    public let uid: UInt32
    public let gid: UInt32
    public let groupName: String
    /// The user's groups (primary and supplementary).
    public let groups: [UInt32]

    public init(name: String) throws(ServiceUserError) {
        guard let pw = getpwnam(name) else { throw .unknown(name) }
        uid = pw.pointee.pw_uid
        gid = pw.pointee.pw_gid
        self.name = name
        groupName = nameOfGroup(gid)
        var count: Int32 = 64
        var list = [gid_t](repeating: 0, count: Int(count))
        if getgrouplist(name, gid, &list, &count) < 0 {
            list = [gid_t](repeating: 0, count: Int(count))
            _ = getgrouplist(name, gid, &list, &count)
        }
        groups = Array(list.prefix(Int(max(0, count))))
        guard geteuid() == 0 || (getuid() == uid && geteuid() == uid) else { throw .notPermitted(name) }
    }

    /// nil when the user may access `path` with `mode` (R_OK, W_OK, X_OK), else the errno.
    public func access(_ path: String, _ mode: Int32) -> Int32? {
        if getuid() == uid && getgid() == gid { return Glibc.access(path, mode) == 0 ? nil : errno }
        let realUID = getuid(), realGID = getgid()
        var saved = [gid_t](repeating: 0, count: Int(max(0, getgroups(0, nil))))
        let savedCount = getgroups(Int32(saved.count), &saved)
        let keep = uid_t.max  // -1: leave this ID as it is
        guard setgroups(groups.count, groups) == 0 else { return errno }
        defer { _ = setgroups(Int(max(0, savedCount)), saved) }
        guard setregid(gid, keep) == 0 else { return errno }
        defer { _ = setregid(realGID, keep) }
        guard setreuid(uid, keep) == 0 else { return errno }
        defer { _ = setreuid(realUID, keep) }
        return Glibc.access(path, mode) == 0 ? nil : errno
    }
}
