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

    private var head = ParsedHead()
    private var body: [UInt8] = []
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

    /// Parses `bytes`; messages are delivered through the callbacks. Throws
    /// the status to answer with when the input is malformed or over a limit.
    func execute(_ bytes: UnsafeRawBufferPointer) throws(ParseFailure) {
        guard rejection == nil else { throw rejection! }
        let n = http_parser_execute(parser, &MessageParser.settings.pointee,
                                    bytes.baseAddress?.assumingMemoryBound(to: CChar.self), bytes.count)
        let errno = edge_hp_errno(parser)
        if errno != HPE_OK.rawValue {
            if let rejection { throw rejection }
            let failure = MessageParser.failure(errno)
            rejection = failure
            throw failure
        }
        if edge_hp_upgrade(parser) != 0 {
            let failure = ParseFailure(status: 501, detail: "protocol upgrade is not supported")
            rejection = failure
            throw failure
        }
        if n != bytes.count {
            let failure = ParseFailure(status: 400, detail: "unparsed bytes after message")
            rejection = failure
            throw failure
        }
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
            if let length = m.head.contentLength, length > UInt64(m.maxBodyBytes) {
                return m.fail(413, "body of \(length) bytes is over the limit of \(m.maxBodyBytes) bytes")
            }
            switch m.onHead?(&m.head) ?? .readBody {
            case .readBody: return 0
            case .skipBody: return 1
            case .reject(let status, let detail): return m.fail(status, detail)
            }
        }
        s.pointee.on_body = { p, at, n in
            let m = me(p)
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
            return 0
        }
        return s
    }()
}
