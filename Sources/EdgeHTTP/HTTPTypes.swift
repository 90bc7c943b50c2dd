import Glibc

/// Header fields in arrival order; lookup by name is case-insensitive (RFC 9110 §5.1).
public struct HTTPHeaders: Sendable, Sequence, ExpressibleByDictionaryLiteral {
    public private(set) var fields: [(name: String, value: String)] = []

    public init() {}
    public init(dictionaryLiteral elements: (String, String)...) {
        fields = elements.map { (name: $0.0, value: $0.1) }
    }

    public mutating func add(_ name: String, _ value: String) { append(name, value) }

    /// Replaces every field called `name` with one.
    public mutating func set(_ name: String, _ value: String) {
        remove(name)
        append(name, value)
    }

    /// Room for a typical message's fields at once, rather than growing
    /// (three allocations) field by field.
    private mutating func append(_ name: String, _ value: String) {
        if fields.capacity == 0 { fields.reserveCapacity(8) }
        fields.append((name, value))
    }

    public mutating func remove(_ name: String) {
        fields.removeAll { equalsIgnoringCase($0.name, name) }
    }

    /// The first value of `name`.
    public subscript(name: String) -> String? {
        fields.first { equalsIgnoringCase($0.name, name) }?.value
    }

    public func values(_ name: String) -> [String] {
        fields.filter { equalsIgnoringCase($0.name, name) }.map(\.value)
    }

    public func contains(_ name: String) -> Bool { self[name] != nil }

    /// How many fields are called `name` (without building their list).
    public func count(_ name: String) -> Int {
        var n = 0
        for field in fields where equalsIgnoringCase(field.name, name) { n += 1 }
        return n
    }

    public func makeIterator() -> IndexingIterator<[(name: String, value: String)]> { fields.makeIterator() }

    /// Whether a comma-separated header (e.g. `Connection`) lists `token`.
    public func hasToken(_ name: String, _ token: String) -> Bool {
        values(name).contains { v in
            v.split(separator: ",").contains { equalsIgnoringCase(trimmed($0), token) }
        }
    }
}

func trimmed(_ s: Substring) -> String {
    var sub = s
    while let f = sub.first, f == " " || f == "\t" { sub = sub.dropFirst() }
    while let l = sub.last, l == " " || l == "\t" { sub = sub.dropLast() }
    return String(sub)
}

/// ASCII case-insensitive comparison (header names and tokens are ASCII).
public func equalsIgnoringCase(_ a: String, _ b: String) -> Bool {
    let x = a.utf8, y = b.utf8
    guard x.count == y.count else { return false }
    for (c, d) in zip(x, y) where c != d {
        let lc = c >= 65 && c <= 90 ? c + 32 : c
        let ld = d >= 65 && d <= 90 ? d + 32 : d
        if lc != ld { return false }
    }
    return true
}

public struct HTTPRequest: Sendable {
    public var method: String
    /// The request target as sent: path and optional `?query`.
    public var target: String
    public var headers: HTTPHeaders
    public var body: [UInt8]
    public var versionMajor: Int = 1
    public var versionMinor: Int = 1

    public init(method: String, target: String, headers: HTTPHeaders = HTTPHeaders(), body: [UInt8] = []) {
        self.method = method
        self.target = target
        self.headers = headers
        self.body = body
    }

    /// The path part of the target, without the query. (The search is on
    /// bytes: a Character search would run grapheme breaking on every request.)
    public var path: Substring {
        if let q = target.utf8.firstIndex(of: UInt8(ascii: "?")) { return target[..<q] }
        return target[...]
    }

    /// The raw query string after `?`, if any.
    public var query: Substring? {
        guard let q = target.utf8.firstIndex(of: UInt8(ascii: "?")) else { return nil }
        return target[target.utf8.index(after: q)...]
    }

    /// Serialises for the wire (client side). Adds `Content-Length` when the
    /// request has a body and no length of its own.
    public func serialized(host: String?) -> [UInt8] {
        var head = "\(method) \(target) HTTP/1.1\r\n"
        if let host, !headers.contains("Host") { head += "Host: \(host)\r\n" }
        for (n, v) in headers.fields { head += "\(n): \(v)\r\n" }
        if !headers.contains("Content-Length") && !headers.contains("Transfer-Encoding")
            && (!body.isEmpty || method == "POST" || method == "PUT" || method == "PATCH")
        {
            head += "Content-Length: \(body.count)\r\n"
        }
        head += "\r\n"
        var out = Array(head.utf8)
        out.append(contentsOf: body)
        return out
    }
}

/// A response body made piece by piece as the connection drains, sent with
/// the chunked transfer coding (RFC 9112 §7.1): memory holds a piece and
/// the connection's write buffer, not the whole body. `next` returns the
/// next piece, nil at the end; an error ends the connection (the client sees
/// an incomplete body, never a wrong one). Called on the server's loop.
public final class BodyStream: @unchecked Sendable {
    public let next: () throws -> [UInt8]?
    public init(_ next: @escaping () throws -> [UInt8]?) { self.next = next }
}

public struct HTTPResponse: Sendable {
    public var status: Int
    public var headers: HTTPHeaders
    public var body: [UInt8]
    /// When set, the body is streamed from it (`body` is not sent).
    public var stream: BodyStream?

    public init(status: Int, headers: HTTPHeaders = HTTPHeaders(), body: [UInt8] = []) {
        self.status = status
        self.headers = headers
        self.body = body
    }

    /// A response whose body is streamed from `stream`'s pieces.
    public init(status: Int, headers: HTTPHeaders = HTTPHeaders(), stream: BodyStream) {
        self.init(status: status, headers: headers)
        self.stream = stream
    }

    public init(status: Int, contentType: String, body: String) {
        self.init(status: status, headers: ["Content-Type": contentType], body: Array(body.utf8))
    }

    public var bodyText: String { String(decoding: body, as: UTF8.self) }

    /// Serialises for the wire (server side).
    /// How the body's end is known: its `Content-Length`, the chunked
    /// coding, or (an HTTP/1.0 client, a streamed body) the connection's end.
    enum Framing { case length, chunked, untilClose }

    /// The response as sent: status line, headers, blank line, body. Built
    /// straight into one byte array (no intermediate strings). With a framing
    /// other than `.length`, only the head (the body is streamed after it).
    func serialized(date: String, keepAlive: Bool, omitBody: Bool, framing: Framing = .length) -> [UInt8] {
        var out: [UInt8] = []
        out.reserveCapacity(160 + headers.fields.count * 48 + (omitBody ? 0 : body.count))
        func field(_ name: String, _ value: String) {
            out.append(contentsOf: name.utf8)
            out.append(contentsOf: fieldSeparator)
            out.append(contentsOf: value.utf8)
            out.append(contentsOf: lineEnd)
        }
        out.append(contentsOf: statusLinePrefix)
        out.append(contentsOf: String(status).utf8)
        out.append(UInt8(ascii: " "))
        out.append(contentsOf: reasonPhrase(status).utf8)
        out.append(contentsOf: lineEnd)
        for (n, v) in headers.fields { field(n, v) }
        switch framing {
        case .chunked: field("Transfer-Encoding", "chunked")
        case .untilClose: break
        case .length: if !headers.contains("Content-Length") { field("Content-Length", String(body.count)) }
        }
        if !headers.contains("Date") { field("Date", date) }
        if !keepAlive { field("Connection", "close") }
        out.append(contentsOf: lineEnd)
        if !omitBody && framing == .length { out.append(contentsOf: body) }
        return out
    }
}

/// One piece of a chunked body: size in hex, CRLF, the bytes, CRLF.
func chunk(_ piece: [UInt8]) -> [UInt8] {
    var out = Array(String(piece.count, radix: 16).utf8)
    out.reserveCapacity(out.count + piece.count + 4)
    out.append(contentsOf: lineEnd)
    out.append(contentsOf: piece)
    out.append(contentsOf: lineEnd)
    return out
}

let lastChunk = Array("0\r\n\r\n".utf8)

private let statusLinePrefix = Array("HTTP/1.1 ".utf8)
private let fieldSeparator = Array(": ".utf8)
private let lineEnd = Array("\r\n".utf8)

public func reasonPhrase(_ status: Int) -> String {
    switch status {
    case 100: return "Continue"
    case 200: return "OK"
    case 201: return "Created"
    case 202: return "Accepted"
    case 204: return "No Content"
    case 304: return "Not Modified"
    case 400: return "Bad Request"
    case 401: return "Unauthorized"
    case 403: return "Forbidden"
    case 404: return "Not Found"
    case 405: return "Method Not Allowed"
    case 408: return "Request Timeout"
    case 409: return "Conflict"
    case 411: return "Length Required"
    case 412: return "Precondition Failed"
    case 413: return "Content Too Large"
    case 415: return "Unsupported Media Type"
    case 417: return "Expectation Failed"
    case 429: return "Too Many Requests"
    case 431: return "Request Header Fields Too Large"
    case 500: return "Internal Server Error"
    case 501: return "Not Implemented"
    case 502: return "Bad Gateway"
    case 503: return "Service Unavailable"
    case 504: return "Gateway Timeout"
    case 505: return "HTTP Version Not Supported"
    default: return "Status \(status)"
    }
}

/// The current time as an IMF-fixdate (RFC 9110 §5.6.7), e.g. `Sun, 06 Nov 1994 08:49:37 GMT`.
func httpDate() -> String {
    var t = time(nil)
    var tmv = tm()
    gmtime_r(&t, &tmv)
    var buf = [CChar](repeating: 0, count: 40)
    let n = strftime(&buf, buf.count, "%a, %d %b %Y %H:%M:%S GMT", &tmv)
    return String(decoding: buf.prefix(n).map { UInt8(bitPattern: $0) }, as: UTF8.self)
}

/// Compares without an early exit, so the time does not reveal how much of
/// a secret matched.
public func constantTimeEquals(_ a: [UInt8], _ b: [UInt8]) -> Bool {
    var diff = UInt8(truncatingIfNeeded: a.count ^ b.count)
    for i in 0..<b.count { diff |= (i < a.count ? a[i] : 0) ^ b[i] }
    return diff == 0 && a.count == b.count
}

extension HTTPRequest {
    /// More than one `Authorization` field: a malformed request (the field
    /// is not a list, RFC 9110 §11.6.2), to be answered 400, never
    /// resolved by picking one of them.
    public var hasRepeatedAuthorization: Bool { headers.count("Authorization") > 1 }

    /// Whether `Authorization: Bearer <token>` names one of `tokens`
    /// (every token compared in constant time). Never with two
    /// `Authorization` fields.
    public func hasBearerToken(in tokens: [String]) -> Bool {
        guard !hasRepeatedAuthorization, let header = headers["Authorization"], header.utf8.count > 7,
            equalsIgnoringCase(String(header.prefix(7)), "bearer ")
        else { return false }
        let presented = Array(header.utf8.dropFirst(7))
        var ok = false
        for token in tokens where constantTimeEquals(Array(token.utf8), presented) { ok = true }
        return ok
    }
}
