internal import CLDAP
import Glibc

/// An LDAP operation that failed: libldap's result code, its text and the
/// server's diagnostic message when there is one.
public struct LDAPError: Error, Sendable, CustomStringConvertible {
    /// An LDAP result code (RFC 4511) or one of libldap's negative client codes.
    public let code: Int32
    public let operation: String
    public let detail: String

    public init(code: Int32, operation: String, detail: String = "") {
        self.code = code
        self.operation = operation
        self.detail = detail
    }

    /// The connection is gone (server down, network): reconnect.
    public var isConnectionLost: Bool { code == -1 || code == -11 /* LDAP_CONNECT_ERROR */ }
    public var description: String {
        let text = String(cString: ldap_err2string(code))
        return "\(operation): \(text) (\(code))" + (detail.isEmpty ? "" : ": \(detail)")
    }
}

/// How to reach the server over TLS: `ldaps://` URLs always use it; with
/// `startTLS` an `ldap://` connection is upgraded before the bind.
public struct LDAPTLSOptions: Sendable, Equatable {
    /// The CA (PEM) the server's certificate must chain to; nil: the system's.
    public var caFile: String?
    public var startTLS: Bool
    public init(caFile: String? = nil, startTLS: Bool = false) {
        self.caFile = caFile
        self.startTLS = startTLS
    }
}

/// A control sent with a request or returned with a message.
public struct LDAPControlValue: Sendable, Equatable {
    public var oid: String
    public var value: [UInt8]
    public var critical: Bool
    public init(oid: String, value: [UInt8], critical: Bool = false) {
        self.oid = oid
        self.value = value
        self.critical = critical
    }
}

/// One entry as read: its DN and its attributes by lower-cased name (values are bytes: `objectGUID` is binary).
public struct LDAPEntry: Sendable, Equatable {
    public var dn: String
    public var attributes: [String: [[UInt8]]]

    public init(dn: String, attributes: [String: [[UInt8]]]) {
        self.dn = dn
        var a: [String: [[UInt8]]] = [:]
        for (k, v) in attributes { a[k.lowercased(), default: []] += v }
        self.attributes = a
    }

    public func values(_ name: String) -> [[UInt8]] { attributes[name.lowercased()] ?? [] }
    public func strings(_ name: String) -> [String] { values(name).map { String(decoding: $0, as: UTF8.self) } }
    public func first(_ name: String) -> String? { strings(name).first }
}

/// What `LDAPConnection.next` read for a search.
public enum LDAPMessageEvent: Sendable, Equatable {
    case entry(LDAPEntry, controls: [LDAPControlValue])
    case intermediate(oid: String, value: [UInt8])
    /// SearchResultDone: the result code, the server's message, its controls.
    case done(code: Int32, message: String, controls: [LDAPControlValue])
    case reference
}

/// The search scopes of RFC 4511.
public enum LDAPScope: Int32, Sendable {
    case base = 0
    case oneLevel = 1
    case subtree = 2
}

/// One connection to a directory server through libldap, used by one
/// thread (the calls block). Not `Sendable`: it is made, used and closed
/// on the source's own thread. `close()` (or `deinit`) unbinds.
public final class LDAPConnection {
    private var ld: OpaquePointer?
    public let url: String

    /// Connects lazily (libldap connects at the first operation, or at StartTLS).
    public init(url: String, tls: LDAPTLSOptions = LDAPTLSOptions(), timeoutSeconds: Int = 10) throws(LDAPError) {
        self.url = url
        var handle: OpaquePointer?
        try check(ldap_initialize(&handle, url), "ldap_initialize \(url)")
        ld = handle
        var version: Int32 = LDAP_VERSION3
        try check(ldap_set_option(handle, LDAP_OPT_PROTOCOL_VERSION, &version), "protocol version")
        // Referrals are not chased: a referral would carry the bind elsewhere.
        try check(ldap_set_option(handle, LDAP_OPT_REFERRALS, nil), "referrals off")
        var timeout = timeval(tv_sec: timeoutSeconds, tv_usec: 0)
        try check(ldap_set_option(handle, LDAP_OPT_NETWORK_TIMEOUT, &timeout), "network timeout")
        try check(ldap_set_option(handle, LDAP_OPT_TIMEOUT, &timeout), "timeout")
        if url.hasPrefix("ldaps://") || tls.startTLS {
            var demand: Int32 = LDAP_OPT_X_TLS_DEMAND
            try check(ldap_set_option(handle, LDAP_OPT_X_TLS_REQUIRE_CERT, &demand), "TLS: require a valid certificate")
            if let ca = tls.caFile {
                let rc = ca.withCString { p in ldap_set_option(handle, LDAP_OPT_X_TLS_CACERTFILE, p) }
                try check(rc, "TLS: CA file \(ca)")
            }
            var isServer: Int32 = 0
            try check(ldap_set_option(handle, LDAP_OPT_X_TLS_NEWCTX, &isServer), "TLS context")
        }
        if tls.startTLS && !url.hasPrefix("ldaps://") {
            try check(ldap_start_tls_s(handle, nil, nil), "StartTLS with \(url)")
        }
    }

    deinit { close() }

    /// Unbinds and frees the handle (once).
    public func close() {
        guard let h = ld else { return }
        ld = nil
        ldap_unbind_ext(h, nil, nil)
    }

    private var handle: OpaquePointer {
        guard let ld else { preconditionFailure("LDAPConnection used after close()") }
        return ld
    }

    /// A simple bind; no DN: an anonymous bind.
    public func bind(dn: String?, password: [UInt8]) throws(LDAPError) {
        var copy = password
        let rc = copy.withUnsafeMutableBufferPointer { buf in
            var credentials = berval(
                bv_len: ber_len_t(buf.count), bv_val: UnsafeMutableRawPointer(buf.baseAddress)?.assumingMemoryBound(to: CChar.self))
            return scim_edge_ldap_simple_bind(handle, dn, &credentials)
        }
        for i in copy.indices { copy[i] = 0 }
        try check(rc, "bind as \(dn ?? "anonymous")")
    }

    /// Starts a search; its messages come from `next(msgid)`.
    public func startSearch(
        base: String, scope: LDAPScope = .subtree, filter: String, attributes: [String], controls: [LDAPControlValue] = []
    ) throws(LDAPError) -> Int32 {
        var msgid: Int32 = 0
        let rc = withCStrings(attributes) { attrs in
            withControls(controls) { ctrls in
                ldap_search_ext(handle, base, scope.rawValue, filter, attrs, 0, ctrls, nil, nil, 0, &msgid)
            }
        }
        try check(rc, "search \(base) \(filter)")
        return msgid
    }

    /// The next message of search `msgid`, waiting up to `timeoutMilliseconds`; nil when none came.
    public func next(_ msgid: Int32, timeoutMilliseconds: Int) throws(LDAPError) -> LDAPMessageEvent? {
        var timeout = timeval(tv_sec: timeoutMilliseconds / 1000, tv_usec: (timeoutMilliseconds % 1000) * 1000)
        var message: OpaquePointer?
        let type = ldap_result(handle, msgid, LDAP_MSG_ONE, &timeout, &message)
        if type == 0 { return nil }
        guard type > 0, let message else { throw LDAPError(code: resultCode(), operation: "reading results", detail: diagnostic()) }
        defer { ldap_msgfree(message) }
        switch type {
        case 0x64:  // SearchResultEntry
            let dnPointer = ldap_get_dn(handle, message)
            defer { ldap_memfree(dnPointer) }
            let dn = dnPointer.map { String(cString: $0) } ?? ""
            var controls: UnsafeMutablePointer<UnsafeMutablePointer<LDAPControl>?>?
            try check(ldap_get_entry_controls(handle, message, &controls), "entry controls of \(dn)")
            defer { ldap_controls_free(controls) }
            return .entry(LDAPEntry(dn: dn, attributes: attributes(of: message)), controls: Self.controls(controls))
        case 0x79:  // IntermediateResponse
            var oid: UnsafeMutablePointer<CChar>?
            var data: UnsafeMutablePointer<berval>?
            try check(ldap_parse_intermediate(handle, message, &oid, &data, nil, 0), "intermediate response")
            defer {
                ldap_memfree(oid)
                ber_bvfree(data)
            }
            return .intermediate(oid: oid.map { String(cString: $0) } ?? "", value: data.map(Self.bytes) ?? [])
        case 0x65:  // SearchResultDone
            var code: Int32 = 0
            var text: UnsafeMutablePointer<CChar>?
            var controls: UnsafeMutablePointer<UnsafeMutablePointer<LDAPControl>?>?
            try check(ldap_parse_result(handle, message, &code, nil, &text, nil, &controls, 0), "search result")
            defer {
                ldap_memfree(text)
                ldap_controls_free(controls)
            }
            return .done(code: code, message: text.map { String(cString: $0) } ?? "", controls: Self.controls(controls))
        default:
            return .reference
        }
    }

    /// Abandons search `msgid` (a persistent search has no end of its own).
    public func abandon(_ msgid: Int32) {
        _ = ldap_abandon_ext(handle, msgid, nil, nil)
    }

    /// A whole search, page by page (RFC 2696) when `pageSize` is given
    /// (Active Directory answers at most 1,000 entries otherwise); `body`
    /// sees each entry. Throws the first error, including a result code
    /// other than success.
    public func search(
        base: String, scope: LDAPScope = .subtree, filter: String, attributes: [String], pageSize: Int? = nil,
        timeoutMilliseconds: Int = 60_000, _ body: (LDAPEntry) throws -> Void
    ) throws {
        var cookie: [UInt8] = []
        repeat {
            let controls = pageSize.map {
                [LDAPControlValue(oid: SyncRepl.pagedResultsControl, value: SyncRepl.pagedRequest(size: $0, cookie: cookie))]
            }
            let msgid = try startSearch(base: base, scope: scope, filter: filter, attributes: attributes, controls: controls ?? [])
            cookie = []
            reading: while true {
                guard let event = try next(msgid, timeoutMilliseconds: timeoutMilliseconds) else {
                    abandon(msgid)
                    throw LDAPError(code: -5, operation: "search \(base) \(filter)", detail: "no answer within \(timeoutMilliseconds) ms")
                }
                switch event {
                case .entry(let e, _): try body(e)
                case .intermediate, .reference: continue
                case .done(let code, let message, let controls):
                    guard code == 0 else { throw LDAPError(code: code, operation: "search \(base) \(filter)", detail: message) }
                    if pageSize != nil, let paged = controls.first(where: { $0.oid == SyncRepl.pagedResultsControl }) {
                        cookie = try SyncRepl.pagedResponse(paged.value)
                    }
                    break reading
                }
            }
        } while !cookie.isEmpty
    }

    private func attributes(of entry: OpaquePointer) -> [String: [[UInt8]]] {
        var out: [String: [[UInt8]]] = [:]
        var ber: OpaquePointer?
        var name = ldap_first_attribute(handle, entry, &ber)
        while let n = name {
            let key = String(cString: n)
            if let values = ldap_get_values_len(handle, entry, n) {
                var i = 0
                var list: [[UInt8]] = []
                while let v = values[i] {
                    list.append(Self.bytes(v))
                    i += 1
                }
                ldap_value_free_len(values)
                out[key.lowercased(), default: []] += list
            }
            ldap_memfree(n)
            name = ldap_next_attribute(handle, entry, ber)
        }
        if let ber { ber_free(ber, 0) }
        return out
    }

    private static func bytes(_ v: UnsafeMutablePointer<berval>) -> [UInt8] {
        guard let p = v.pointee.bv_val, v.pointee.bv_len > 0 else { return [] }
        return Array(UnsafeRawBufferPointer(start: p, count: Int(v.pointee.bv_len)))
    }

    private static func controls(_ list: UnsafeMutablePointer<UnsafeMutablePointer<LDAPControl>?>?) -> [LDAPControlValue] {
        guard let list else { return [] }
        var out: [LDAPControlValue] = []
        var i = 0
        while let c = list[i] {
            var value: [UInt8] = []
            if let p = c.pointee.ldctl_value.bv_val, c.pointee.ldctl_value.bv_len > 0 {
                value = Array(UnsafeRawBufferPointer(start: p, count: Int(c.pointee.ldctl_value.bv_len)))
            }
            out.append(LDAPControlValue(oid: String(cString: c.pointee.ldctl_oid), value: value, critical: c.pointee.ldctl_iscritical != 0))
            i += 1
        }
        return out
    }

    private func resultCode() -> Int32 {
        var code: Int32 = -1
        _ = ldap_get_option(ld, LDAP_OPT_RESULT_CODE, &code)
        return code
    }

    private func diagnostic() -> String {
        var text: UnsafeMutablePointer<CChar>?
        guard ldap_get_option(ld, LDAP_OPT_DIAGNOSTIC_MESSAGE, &text) == 0, let text else { return "" }
        defer { ldap_memfree(text) }
        return String(cString: text)
    }

    /// libldap's one C-call helper: a non-zero code becomes an `LDAPError`
    /// with the server's diagnostic message.
    private func check(_ rc: Int32, _ operation: @autoclosure () -> String) throws(LDAPError) {
        guard rc != 0 else { return }
        throw LDAPError(code: rc, operation: operation(), detail: ld == nil ? "" : diagnostic())
    }
}

/// A NULL-terminated `char **` for the duration of `body`.
private func withCStrings<R>(_ strings: [String], _ body: (UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>?) -> R) -> R {
    guard !strings.isEmpty else { return body(nil) }
    let pointers = strings.map { strdup($0) } + [nil]
    defer { pointers.forEach { free($0) } }
    var array = pointers
    return array.withUnsafeMutableBufferPointer { body($0.baseAddress) }
}

/// A NULL-terminated `LDAPControl **` for the duration of `body`.
private func withControls<R>(_ controls: [LDAPControlValue], _ body: (UnsafeMutablePointer<UnsafeMutablePointer<LDAPControl>?>?) -> R) -> R
{
    guard !controls.isEmpty else { return body(nil) }
    var made: [UnsafeMutablePointer<LDAPControl>?] = []
    var buffers: [UnsafeMutableRawPointer] = []
    for c in controls {
        let value = UnsafeMutableRawPointer.allocate(byteCount: max(1, c.value.count), alignment: 1)
        value.copyMemory(from: c.value, byteCount: c.value.count)
        buffers.append(value)
        let control = UnsafeMutablePointer<LDAPControl>.allocate(capacity: 1)
        control.initialize(
            to: LDAPControl(
                ldctl_oid: strdup(c.oid),
                ldctl_value: berval(bv_len: ber_len_t(c.value.count), bv_val: value.assumingMemoryBound(to: CChar.self)),
                ldctl_iscritical: c.critical ? 1 : 0))
        made.append(control)
    }
    defer {
        for c in made {
            free(c!.pointee.ldctl_oid)
            c!.deinitialize(count: 1)
            c!.deallocate()
        }
        buffers.forEach { $0.deallocate() }
    }
    var array = made + [nil]
    return array.withUnsafeMutableBufferPointer { body($0.baseAddress) }
}

/// Whether the server offers content synchronisation (its root DSE lists
/// the Sync Request control).
extension LDAPConnection {
    public func offersSyncRepl() throws -> Bool {
        var offered = false
        try search(base: "", scope: .base, filter: "(objectClass=*)", attributes: ["supportedControl"]) { e in
            offered = e.strings("supportedControl").contains(SyncRepl.requestControl)
        }
        return offered
    }
}
