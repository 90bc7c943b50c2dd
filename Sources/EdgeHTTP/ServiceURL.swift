import EdgeLoop
import Glibc

/// An `http://` or `https://` URL of a service (a SCIM base, a broker): the
/// scheme, host, port and base path. Host names resolve when connecting.
public struct ServiceURL: Sendable, Equatable {
    public var tls: Bool
    public var host: String
    public var port: Int
    /// The base path, without a trailing `/` ("" for the root).
    public var path: String

    public init(tls: Bool, host: String, port: Int, path: String) {
        self.tls = tls
        self.host = host
        self.port = port
        self.path = path
    }

    /// Parses `http(s)://HOST[:PORT][/PATH]` (`[V6]` hosts too); a trailing `/` is dropped.
    public init?(_ url: String) {
        let tls: Bool
        var rest: Substring
        if url.hasPrefix("https://") {
            tls = true; rest = url.dropFirst(8)
        } else if url.hasPrefix("http://") {
            tls = false; rest = url.dropFirst(7)
        } else {
            return nil
        }
        var path = ""
        if let slash = rest.firstIndex(of: "/") {
            path = String(rest[slash...])
            rest = rest[..<slash]
        }
        while path.hasSuffix("/") { path.removeLast() }
        var host: Substring
        var portText: Substring?
        if rest.hasPrefix("[") {
            guard let close = rest.firstIndex(of: "]") else { return nil }
            host = rest[rest.index(after: rest.startIndex)..<close]
            let after = rest[rest.index(after: close)...]
            if !after.isEmpty {
                guard after.hasPrefix(":") else { return nil }
                portText = after.dropFirst()
            }
        } else if let colon = rest.lastIndex(of: ":") {
            host = rest[..<colon]
            portText = rest[rest.index(after: colon)...]
        } else {
            host = rest
        }
        let port = portText.map { Int($0) ?? -1 } ?? (tls ? 443 : 80)
        guard !host.isEmpty, port > 0, port < 65536 else { return nil }
        self.init(tls: tls, host: String(host), port: port, path: path)
    }

    /// The address to connect to: an IP address as is, a host name resolved
    /// now (callers resolve again when they cannot connect).
    public func resolveAddress() -> SocketAddress? {
        if host == "localhost" { return SocketAddress(host: "127.0.0.1", port: port) }
        if SocketAddress(host.contains(":") ? "[\(host)]:\(port)" : "\(host):\(port)") != nil {
            return SocketAddress(host: host, port: port)
        }
        return resolve(host).map { SocketAddress(host: $0, port: port) }
    }
}

/// The first address of a host name (blocking: called when connecting after a failure, not per request).
func resolve(_ host: String) -> String? {
    var hints = addrinfo()
    hints.ai_socktype = Int32(SOCK_STREAM.rawValue)
    var result: UnsafeMutablePointer<addrinfo>?
    guard getaddrinfo(host, nil, &hints, &result) == 0, let first = result else { return nil }
    defer { freeaddrinfo(result) }
    var name = [CChar](repeating: 0, count: 64)
    if first.pointee.ai_family == AF_INET6 {
        var a = first.pointee.ai_addr.withMemoryRebound(to: sockaddr_in6.self, capacity: 1) { $0.pointee.sin6_addr }
        inet_ntop(AF_INET6, &a, &name, socklen_t(name.count))
    } else {
        var a = first.pointee.ai_addr.withMemoryRebound(to: sockaddr_in.self, capacity: 1) { $0.pointee.sin_addr }
        inet_ntop(AF_INET, &a, &name, socklen_t(name.count))
    }
    return String(decoding: name.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
}
