internal import CHTTPParser

/// A request or response head as parsed, before its body.
struct ParsedHead {
    var method = ""
    var target: [UInt8] = []
    var status = 0
    var versionMajor = 1
    var versionMinor = 1
    var headers = HTTPHeaders()
    var contentLength: UInt64?
    var chunked = false
}

/// What the owner decides once a head is complete.
enum HeadDecision {
    case readBody
    /// No body follows (responses to HEAD, 1xx/204/304).
    case skipBody
    /// Hand the body to `onBodyChunk` piece by piece as it arrives (no
    /// `maxBodyBytes`: nothing is held); the message ends with an empty body.
    case streamBody
    /// Stop: answer with this status and detail, then close.
    case reject(status: Int, detail: String)
}

/// A parse failure mapped to the status a server answers with.
struct ParseFailure: Error {
    var status: Int
    var detail: String
}

/// http_parser (Debian's libhttp-parser 2.9) driving one connection's
/// messages, with the byte limits enforced in its callbacks.
///
/// The C parser keeps a pointer back to this object in `parser->data`
/// (unretained: the owner keeps both alive together). Loop-confined.
final class MessageParser {
    enum Kind { case request, response }

    private let parser: UnsafeMutablePointer<http_parser>
    let kind: Kind
    var maxHeaderBytes: Int
    var maxBodyBytes: Int

    var onHead: ((inout ParsedHead) -> HeadDecision)?
    var onMessage: ((ParsedHead, [UInt8], _ keepAlive: Bool) -> Void)?
    /// A piece of a streamed body (`.streamBody`), valid during the call
    /// only; returning false stops the parser (`execute` throws).
    var onBodyChunk: ((UnsafeRawBufferPointer) -> Bool)?

    private var head = ParsedHead()
    private var body: [UInt8] = []
    /// This message's body goes to `onBodyChunk`.
    private var streaming = false
    private var headerBytes = 0
    private var field: [UInt8] = []
    private var value: [UInt8] = []
    private var inValue = false
    private var rejection: ParseFailure?
    /// True between the first byte of a message and its end.
    private(set) var inMessage = false

    init(kind: Kind, maxHeaderBytes: Int, maxBodyBytes: Int) {
        self.kind = kind
        self.maxHeaderBytes = maxHeaderBytes
        self.maxBodyBytes = maxBodyBytes
        parser = .allocate(capacity: 1)
        http_parser_init(parser, kind == .request ? HTTP_REQUEST : HTTP_RESPONSE)
        parser.pointee.data = Unmanaged.passUnretained(self).toOpaque()
    }

    deinit { parser.deallocate() }

    /// The request line being collected before http_parser sees it (requests only).
    private var requestLine: [UInt8] = []

    /// True from the first byte of a message (its request line included)
    /// to its end: what the server's request timeout measures.
    var isMidMessage: Bool { inMessage || !requestLine.isEmpty }
    private var blankLinesSkipped = 0

    /// Parses `bytes`; messages are delivered through the callbacks. Throws
    /// the status to answer with when the input is malformed or over a limit.
    ///
    /// Debian builds http_parser in its lenient mode, so for requests this
    /// method pauses it at every message boundary and checks each request
    /// line itself (RFC 9112 §3) before handing it over.
    func execute(_ bytes: UnsafeRawBufferPointer) throws(ParseFailure) {
        guard rejection == nil else { throw rejection! }
        // Callbacks may lead the owner to drop this parser; keep it alive until we return.
        let retained = self
        defer { withExtendedLifetime(retained) {} }
        do {
            var offset = 0
            while offset < bytes.count {
                if kind == .request && !inMessage {
                    guard let lineEnd = try takeRequestLine(bytes, from: offset) else { return }
                    offset = lineEnd
                    if requestLine.isEmpty { continue }  // a blank line between messages
                    let line = requestLine
                    requestLine = []
                    let failure = line.withUnsafeBytes { l -> ParseFailure? in
                        do throws(ParseFailure) { try run(l); return nil } catch { return error }
                    }
                    if let failure { throw failure }
                    continue
                }
                offset += try run(UnsafeRawBufferPointer(rebasing: bytes[offset...]))
            }
        }
    }

    /// Collects the request line; returns the offset after its LF, or `nil`
    /// when more bytes are needed. Leaves `requestLine` empty for a blank line.
    private func takeRequestLine(_ bytes: UnsafeRawBufferPointer, from offset: Int) throws(ParseFailure) -> Int? {
        var i = offset
        while i < bytes.count && bytes[i] != 10 { i += 1 }
        requestLine.append(contentsOf: bytes[offset..<min(i + 1, bytes.count)])
        if requestLine.count > maxHeaderBytes {
            throw reject(431, "request line longer than \(maxHeaderBytes) bytes")
        }
        guard i < bytes.count else { return nil }
        if requestLine == [13, 10] || requestLine == [10] {
            // RFC 9112 §2.2: ignore at least one empty line before a request.
            blankLinesSkipped += 1
            if blankLinesSkipped > 4 { throw reject(400, "too many empty lines before the request line") }
            requestLine = []
            return i + 1
        }
        blankLinesSkipped = 0
        if let failure = validateRequestLine(requestLine) {
            throw reject(failure.status, failure.detail)
        }
        return i + 1
    }

    private func reject(_ status: Int, _ detail: String) -> ParseFailure {
        let failure = ParseFailure(status: status, detail: detail)
        rejection = failure
        return failure
    }

    /// One http_parser call; returns the bytes consumed. A pause means a
    /// message ended (requests pause there so the next line is checked).
    @discardableResult
    private func run(_ bytes: UnsafeRawBufferPointer) throws(ParseFailure) -> Int {
        let n = http_parser_execute(
            parser, &MessageParser.settings.pointee,
            bytes.baseAddress?.assumingMemoryBound(to: CChar.self), bytes.count)
        if edge_hp_upgrade(parser) != 0 {
            // RFC 9110 §7.8: a server may ignore Upgrade. The request was
            // answered as plain HTTP; keep parsing HTTP/1.1 after it.
            http_parser_init(parser, kind == .request ? HTTP_REQUEST : HTTP_RESPONSE)
            parser.pointee.data = Unmanaged.passUnretained(self).toOpaque()
            inMessage = false
            return n > 0 ? n : bytes.count
        }
        let errno = edge_hp_errno(parser)
        if errno == HPE_PAUSED.rawValue {
            http_parser_pause(parser, 0)
            return n
        }
        if errno != HPE_OK.rawValue {
            if let rejection { throw rejection }
            let failure = MessageParser.failure(errno)
            throw reject(failure.status, failure.detail)
        }
        return n == 0 && bytes.count > 0 ? bytes.count : n
    }

    /// Tells the parser the peer closed: completes a body delimited by close
    /// (responses only).
    func finish() throws(ParseFailure) {
        http_parser_execute(parser, &MessageParser.settings.pointee, nil, 0)
        let errno = edge_hp_errno(parser)
        if errno != HPE_OK.rawValue, rejection == nil { throw MessageParser.failure(errno) }
    }

    private static func failure(_ code: UInt32) -> ParseFailure {
        let e = http_errno(rawValue: code)
        let detail = String(cString: http_errno_description(e))
        switch e {
        case HPE_HEADER_OVERFLOW: return ParseFailure(status: 431, detail: detail)
        case HPE_UNEXPECTED_CONTENT_LENGTH:
            return ParseFailure(status: 400, detail: "conflicting Content-Length and Transfer-Encoding, or duplicate Content-Length")
        default: return ParseFailure(status: 400, detail: "malformed HTTP: \(detail)")
        }
    }

    private func fail(_ status: Int, _ detail: String) -> Int32 {
        rejection = ParseFailure(status: status, detail: detail)
        return -1
    }

    private func countHeader(_ n: Int) -> Int32 {
        headerBytes += n
        if headerBytes > maxHeaderBytes {
            return fail(431, "request header block larger than \(maxHeaderBytes) bytes")
        }
        return 0
    }

    private func finishHeaderField() {
        guard inValue else { return }
        if rejection == nil {
            if field.isEmpty || !field.allSatisfy(isTokenChar) {
                rejection = ParseFailure(
                    status: 400, detail: "invalid header field name '\(String(decoding: field.prefix(64), as: UTF8.self))'")
            } else if value.contains(where: { ($0 < 32 && $0 != 9) || $0 == 127 }) {
                rejection = ParseFailure(
                    status: 400, detail: "control character in header field '\(String(decoding: field, as: UTF8.self))'")
            }
        }
        head.headers.add(String(decoding: field, as: UTF8.self), String(decoding: value, as: UTF8.self))
        field.removeAll(keepingCapacity: true)
        value.removeAll(keepingCapacity: true)
        inValue = false
    }

    // MARK: callbacks

    private static func me(_ p: UnsafeMutablePointer<http_parser>?) -> MessageParser {
        Unmanaged<MessageParser>.fromOpaque(p!.pointee.data!).takeUnretainedValue()
    }

    nonisolated(unsafe) static let settings: UnsafeMutablePointer<http_parser_settings> = {
        // Written once here, then only read by http_parser_execute on loop threads.
        let s = UnsafeMutablePointer<http_parser_settings>.allocate(capacity: 1)
        s.initialize(to: http_parser_settings())
        s.pointee.on_message_begin = { p in
            let m = me(p)
            m.inMessage = true
            m.head = ParsedHead()
            m.body = []
            m.streaming = false
            m.headerBytes = 0
            m.inValue = false
            return 0
        }
        s.pointee.on_url = { p, at, n in
            let m = me(p)
            m.head.target.append(contentsOf: UnsafeRawBufferPointer(start: at, count: n))
            return m.countHeader(n)
        }
        s.pointee.on_status = { p, _, n in me(p).countHeader(n) }
        s.pointee.on_header_field = { p, at, n in
            let m = me(p)
            m.finishHeaderField()
            if m.rejection != nil { return -1 }
            m.field.append(contentsOf: UnsafeRawBufferPointer(start: at, count: n))
            return m.countHeader(n + 4)  // ": " and CRLF count towards the limit
        }
        s.pointee.on_header_value = { p, at, n in
            let m = me(p)
            m.inValue = true
            m.value.append(contentsOf: UnsafeRawBufferPointer(start: at, count: n))
            return m.countHeader(n)
        }
        s.pointee.on_headers_complete = { p in
            let m = me(p)
            m.finishHeaderField()
            if m.rejection != nil { return -1 }
            let parser = p!
            m.head.versionMajor = Int(parser.pointee.http_major)
            m.head.versionMinor = Int(parser.pointee.http_minor)
            if m.kind == .request {
                m.head.method = String(cString: http_method_str(http_method(rawValue: edge_hp_method(parser))))
            } else {
                m.head.status = Int(edge_hp_status(parser))
            }
            let flags = edge_hp_flags(parser)
            m.head.chunked = flags & F_CHUNKED.rawValue != 0
            if flags & F_CONTENTLENGTH.rawValue != 0 { m.head.contentLength = edge_hp_content_length(parser) }
            if m.kind == .request, !(m.head.versionMajor == 1 && (m.head.versionMinor == 0 || m.head.versionMinor == 1)) {
                return m.fail(505, "HTTP/\(m.head.versionMajor).\(m.head.versionMinor) is not supported; use HTTP/1.1")
            }
            let tooLong = m.head.contentLength.map { $0 > UInt64(m.maxBodyBytes) } ?? false
            if tooLong && m.kind == .request {
                return m.fail(413, "body of \(m.head.contentLength!) bytes is over the limit of \(m.maxBodyBytes) bytes")
            }
            let decision = m.onHead?(&m.head) ?? .readBody
            if tooLong, case .readBody = decision {
                return m.fail(413, "body of \(m.head.contentLength!) bytes is over the limit of \(m.maxBodyBytes) bytes")
            }
            switch decision {
            case .readBody: return 0
            case .streamBody:
                m.streaming = true
                return 0
            case .skipBody: return 1
            case .reject(let status, let detail): return m.fail(status, detail)
            }
        }
        s.pointee.on_body = { p, at, n in
            let m = me(p)
            if m.streaming {
                return m.onBodyChunk?(UnsafeRawBufferPointer(start: at, count: n)) ?? false ? 0 : m.fail(400, "body refused by its reader")
            }
            if m.body.count + n > m.maxBodyBytes {
                return m.fail(413, "body over the limit of \(m.maxBodyBytes) bytes")
            }
            m.body.append(contentsOf: UnsafeRawBufferPointer(start: at, count: n))
            return 0
        }
        s.pointee.on_message_complete = { p in
            let m = me(p)
            m.inMessage = false
            let keepAlive = http_should_keep_alive(p) != 0
            let head = m.head
            let body = m.body
            m.head = ParsedHead()
            m.body = []
            m.onMessage?(head, body, keepAlive)
            if m.kind == .request { http_parser_pause(p, 1) }
            return 0
        }
        return s
    }()
}

/// RFC 9110 §5.6.2 `tchar`.
func isTokenChar(_ c: UInt8) -> Bool {
    switch c {
    case UInt8(ascii: "a")...UInt8(ascii: "z"), UInt8(ascii: "A")...UInt8(ascii: "Z"), UInt8(ascii: "0")...UInt8(ascii: "9"):
        return true
    default:
        return tokenPunctuation.contains(c)
    }
}

private let tokenPunctuation = Array("!#$%&'*+-.^_`|~".utf8)

/// Checks `method SP request-target SP HTTP-version CRLF` (RFC 9112 §3).
/// Returns the status to answer with, or `nil` when the line is well formed.
func validateRequestLine(_ line: [UInt8]) -> ParseFailure? {
    // One pass over the bytes, no allocation: this runs for every request.
    line.withUnsafeBufferPointer { b -> ParseFailure? in
        let n = b.count
        guard n >= 2, b[n - 2] == 13, b[n - 1] == 10 else {
            return ParseFailure(status: 400, detail: "request line must end with CRLF")
        }
        let end = n - 2
        guard let firstSpace = b[0..<end].firstIndex(of: 32),
            let secondSpace = b[(firstSpace + 1)..<end].firstIndex(of: 32),
            !b[(secondSpace + 1)..<end].contains(32)
        else {
            return ParseFailure(status: 400, detail: "request line must be 'METHOD target HTTP/1.1'")
        }
        guard firstSpace > 0, b[0..<firstSpace].allSatisfy(isTokenChar) else {
            return ParseFailure(status: 400, detail: "invalid method")
        }
        let target = b[(firstSpace + 1)..<secondSpace]
        guard !target.isEmpty, !target.contains(where: { $0 <= 32 || $0 == 127 }) else {
            return ParseFailure(status: 400, detail: "invalid request target")
        }
        let version = b[(secondSpace + 1)..<end]
        let v = version.startIndex
        guard version.count == 8, b[v] == UInt8(ascii: "H"), b[v + 1] == UInt8(ascii: "T"), b[v + 2] == UInt8(ascii: "T"),
            b[v + 3] == UInt8(ascii: "P"), b[v + 4] == UInt8(ascii: "/"), b[v + 6] == UInt8(ascii: "."),
            (48...57).contains(b[v + 5]), (48...57).contains(b[v + 7])
        else {
            return ParseFailure(status: 400, detail: "invalid HTTP version '\(String(decoding: version.prefix(16), as: UTF8.self))'")
        }
        guard b[v + 5] == UInt8(ascii: "1"), b[v + 7] == UInt8(ascii: "0") || b[v + 7] == UInt8(ascii: "1") else {
            return ParseFailure(
                status: 505,
                detail: "HTTP/\(Character(UnicodeScalar(b[v + 5]))).\(Character(UnicodeScalar(b[v + 7]))) is not supported; use HTTP/1.1")
        }
        return nil
    }
}
