import EdgeLoop
import EdgeTLS

public enum HTTPClientError: Error, Sendable, Equatable, CustomStringConvertible {
    case connectFailed(String)
    /// The connection ended before this request's response arrived. The
    /// request may or may not have been processed: retry only idempotent work.
    case connectionLost(String)
    case tls(TLSError)
    case timeout
    case malformedResponse(String)
    /// More than `maxQueued` requests were waiting: push back on the caller.
    case queueFull(Int)
    /// The reader of a streamed body (`stream`) threw: the connection was
    /// dropped after this response.
    case bodyRefused(String)
    case closed

    public var description: String {
        switch self {
        case .connectFailed(let s): return "connect failed: \(s)"
        case .connectionLost(let s): return "connection lost: \(s)"
        case .tls(let e): return e.description
        case .timeout: return "timed out"
        case .malformedResponse(let s): return "malformed response: \(s)"
        case .queueFull(let n): return "more than \(n) requests waiting"
        case .bodyRefused(let s): return "response body refused: \(s)"
        case .closed: return "client closed"
        }
    }
}

public struct HTTPClientOptions: Sendable {
    /// Requests written ahead of their responses on the connection.
    public var maxPipelined = 16
    /// Requests waiting to be written; beyond this `send` fails at once with
    /// `.queueFull` (bounded memory: the caller holds the rest).
    public var maxQueued = 1024
    public var connectTimeoutMilliseconds: UInt64 = 10_000
    /// Per request, from the moment it is written.
    public var responseTimeoutMilliseconds: UInt64 = 30_000
    /// The largest body `send` holds; `stream` holds none, so this does not apply to it.
    public var maxResponseBodyBytes = 64 << 20
    public var maxHeaderBytes = 64 * 1024
    public init() {}
}

/// An HTTP/1.1 client for one origin over a kept-alive TCP or TLS
/// connection: requests are pipelined up to `maxPipelined`, responses are
/// matched in order, and a lost connection is re-established on the next
/// request. Threading: loop-confined.
public final class HTTPClient {
    public let loop: EventLoop
    public let address: SocketAddress
    /// The context each new connection uses (a reloadable one changes on SIGHUP).
    private let tls: (() -> TLSContext)?
    private let peerName: String?
    public let options: HTTPClientOptions
    private let hostHeader: String
    private let scratch: UnsafeMutableRawBufferPointer

    private var transport: Transport?
    private var parser: MessageParser?
    private var connecting = false
    private var queued: [PendingRequest] = []
    private var inFlight: [PendingRequest] = []
    private var timer: LoopTimer?
    private var connectStartedAt: UInt64 = 0
    private var isClosed = false
    /// Why the reader of the streamed body in flight refused it.
    private var refusal: HTTPClientError?
    /// Connections opened so far (reconnects show up here).
    public private(set) var connectionsOpened = 0
    /// The server certificate identity of the current connection.
    public private(set) var serverIdentity: PeerIdentity?

    public convenience init(
        loop: EventLoop, address: SocketAddress, tls: TLSContext? = nil, serverName: String? = nil,
        options: HTTPClientOptions = HTTPClientOptions()
    ) {
        self.init(loop: loop, address: address, tlsSource: tls.map { context in { context } }, serverName: serverName, options: options)
    }

    /// A client whose new connections use `tls` as it is at the time:
    /// after `reload()` (certificate rotation), the next connection presents
    /// the new certificate (`resetConnection()` makes that now).
    public convenience init(
        loop: EventLoop, address: SocketAddress, reloadableTLS tls: ReloadableTLSContext, serverName: String? = nil,
        options: HTTPClientOptions = HTTPClientOptions()
    ) {
        self.init(loop: loop, address: address, tlsSource: { tls.context }, serverName: serverName, options: options)
    }

    private init(
        loop: EventLoop, address: SocketAddress, tlsSource: (() -> TLSContext)?, serverName: String?,
        options: HTTPClientOptions
    ) {
        self.loop = loop
        self.address = address
        self.tls = tlsSource
        self.peerName = serverName ?? address.host
        self.options = options
        self.hostHeader = serverName.map { "\($0):\(address.port)" } ?? address.description
        scratch = .allocate(byteCount: 16 * 1024, alignment: 16)
    }

    deinit {
        timer?.close()
        if let transport {
            transport.onEnd = nil
            transport.close()
        }
        scratch.deallocate()
    }

    /// Requests not yet answered (queued or in flight).
    public var outstanding: Int { queued.count + inFlight.count }
    public var isConnected: Bool { transport?.isReady ?? false }

    /// Sends `request`; `completion` runs on the loop with the response or an error.
    public func send(_ request: HTTPRequest, completion: @escaping (Result<HTTPResponse, HTTPClientError>) -> Void) {
        guard !isClosed else { completion(.failure(.closed)); return }
        guard queued.count < options.maxQueued else { completion(.failure(.queueFull(options.maxQueued))); return }
        queued.append(PendingRequest(request: request, completion: completion))
        ensureTimer()
        pump()
    }

    /// Sends `request` and hands its response's body to `body` piece by
    /// piece as it arrives (chunked, `Content-Length` or until the close),
    /// never holding it: each piece is a view of the loop's read buffer (at
    /// most 64 KiB; 16 KiB over TLS), valid during the call only, and the next
    /// read waits until `body` returns. `head` runs first, with the status and
    /// headers (an empty body); `completion` runs once the body ended (the
    /// same response again) or failed. If `body` throws, the connection is
    /// dropped and `completion` gets `.bodyRefused`. The response timeout
    /// counts from the request's writing to the head, then between pieces.
    public func stream(
        _ request: HTTPRequest, head: @escaping (HTTPResponse) -> Void, body: @escaping (UnsafeRawBufferPointer) throws -> Void,
        completion: @escaping (Result<HTTPResponse, HTTPClientError>) -> Void
    ) {
        guard !isClosed else { completion(.failure(.closed)); return }
        guard queued.count < options.maxQueued else { completion(.failure(.queueFull(options.maxQueued))); return }
        queued.append(PendingRequest(request: request, completion: completion, stream: ResponseStream(head: head, body: body)))
        ensureTimer()
        pump()
    }

    /// Fails everything outstanding with `.closed` and closes the connection.
    public func close() {
        guard !isClosed else { return }
        isClosed = true
        timer?.close()
        timer = nil
        dropConnection(reason: .closed, failQueued: true)
    }

    /// Drops the connection and fails everything outstanding with
    /// `.connectionLost`, and stays usable: the next request connects anew
    /// (for a peer whose answers can no longer be trusted on this connection).
    public func resetConnection() {
        guard !isClosed else { return }
        dropConnection(reason: .connectionLost("reset by the client"), failQueued: true)
    }

    private func ensureTimer() {
        guard timer == nil, let t = try? LoopTimer(loop: loop) else { return }
        t.start(after: 100, repeatEvery: 100) { [weak self] in self?.checkTimeouts() }
        t.keepsLoopAlive = false
        timer = t
    }

    private func pump() {
        guard !isClosed else { return }
        guard let transport, transport.isReady else {
            if transport == nil && !connecting && !queued.isEmpty { connect() }
            return
        }
        var batch: [UInt8] = []
        while inFlight.count < options.maxPipelined, !queued.isEmpty {
            var next = queued.removeFirst()
            next.writtenAt = loop.now
            batch.append(contentsOf: next.request.serialized(host: hostHeader))
            inFlight.append(next)
        }
        if !batch.isEmpty { transport.write(batch) }
    }

    private func connect() {
        connecting = true
        connectStartedAt = loop.now
        TCPStream.connect(loop: loop, to: address) { [weak self] result in
            guard let self else {
                if case .success(let s) = result { s.close() }
                return
            }
            connecting = false
            switch result {
            case .failure(let e):
                failAll(.connectFailed(e.description), queuedToo: true)
            case .success(let stream):
                if isClosed { stream.close(); return }
                established(stream)
            }
        }
    }

    private func established(_ stream: TCPStream) {
        let session: TLSSession?
        if let tls {
            do { session = try tls().makeSession(peerName: peerName) } catch {
                stream.close()
                failAll(.tls(error), queuedToo: true)
                return
            }
        } else {
            session = nil
        }
        connectionsOpened += 1
        let t = Transport(stream: stream, tls: session, scratch: scratch)
        let p = MessageParser(
            kind: .response, maxHeaderBytes: options.maxHeaderBytes,
            maxBodyBytes: options.maxResponseBodyBytes)
        p.onHead = { [unowned self] head in  // the parser dies with this client
            // 1xx are interim; HEAD responses and 204/304 have no body.
            let first = inFlight.first
            if head.status >= 200, let stream = first?.stream {
                stream.head(HTTPResponse(status: head.status, headers: head.headers))
            }
            if head.status == 204 || head.status == 304 { return .skipBody }
            if first?.request.method == "HEAD" { return .skipBody }
            return head.status >= 200 && first?.stream != nil ? .streamBody : .readBody
        }
        p.onBodyChunk = { [unowned self] bytes in
            guard let stream = inFlight.first?.stream else { return false }
            inFlight[0].writtenAt = loop.now  // the timeout runs between pieces
            do { try stream.body(bytes) } catch {
                refusal = .bodyRefused("\(error)")
                return false
            }
            return true
        }
        p.onMessage = { [unowned self] head, body, keepAlive in response(head, body, keepAlive) }
        transport = t
        parser = p
        t.onReady = { [weak self] in
            guard let self else { return }
            serverIdentity = transport?.peerIdentity
            pump()
        }
        t.onData = { [weak self] bytes in self?.received(bytes) }
        t.onEnd = { [weak self] reason in self?.lost(reason) }
        t.start()
    }

    private func received(_ bytes: UnsafeRawBufferPointer) {
        guard let parser else { return }
        do { try parser.execute(bytes) } catch {
            if let refusal, !inFlight.isEmpty {
                // Its reader refused this one; what was in flight behind it may or may not have been processed.
                self.refusal = nil
                let refused = inFlight.removeFirst()
                dropConnection(reason: .connectionLost("dropped after a refused response body"), failQueued: false)
                refused.completion(.failure(refusal))
            } else {
                dropConnection(reason: .malformedResponse(error.detail), failQueued: false)
            }
            pump()
        }
    }

    private func response(_ head: ParsedHead, _ body: [UInt8], _ keepAlive: Bool) {
        if head.status >= 100 && head.status < 200 { return }  // interim (100 Continue)
        guard !inFlight.isEmpty else {
            dropConnection(reason: .malformedResponse("response without a request"), failQueued: false)
            return
        }
        let pending = inFlight.removeFirst()
        let response = HTTPResponse(status: head.status, headers: head.headers, body: body)
        pending.completion(.success(response))
        if !keepAlive {
            // The server closes after this one: what else was in flight is resent on a new connection.
            let retry = inFlight
            inFlight = []
            queued.insert(contentsOf: retry, at: 0)
            dropConnection(reason: .connectionLost("server closed the connection"), failQueued: false)
        }
        pump()
    }

    private func lost(_ reason: TransportEnd) {
        let ended = transport
        transport = nil
        // Ended before it was ready (the peer closed or reset it during the TLS
        // handshake: a server at its connection budget, a balancer without a
        // backend): a connect failure for what waits, left to the callers'
        // backoff. Nothing was in flight to fail, so connecting again at once
        // looped, and the requests never completed.
        if ended?.isReady == false {
            parser = nil
            let error: HTTPClientError =
                if case .tlsError(let e) = reason { .tls(e) } else {
                    .connectFailed("\(reason.description) before the connection was ready")
                }
            failAll(error, queuedToo: true)
            return
        }
        // A response delimited by the end of the connection (no Content-Length,
        // not chunked: RFC 9112 §6.3) is complete now: tell the parser (EOF).
        // One cut short (a Content-Length not reached) fails below as lost.
        if let parser, ended?.endedCleanly == true { try? parser.finish() }
        parser = nil
        let error: HTTPClientError
        if case .tlsError(let e) = reason { error = .tls(e) } else { error = .connectionLost(reason.description) }
        failAll(error, queuedToo: false)
        // A failed handshake would fail again at once: fail what waits too.
        if case .tls = error { failAll(error, queuedToo: true) }
        pump()
    }

    private func dropConnection(reason: HTTPClientError, failQueued: Bool) {
        let t = transport
        transport = nil
        parser = nil
        t?.onEnd = nil
        t?.close()
        failAll(reason, queuedToo: failQueued)
    }

    private func failAll(_ error: HTTPClientError, queuedToo: Bool) {
        let failed = inFlight + (queuedToo ? queued : [])
        inFlight = []
        if queuedToo { queued = [] }
        for p in failed { p.completion(.failure(error)) }
    }

    private func checkTimeouts() {
        let now = loop.now
        if connecting || (transport != nil && !(transport!.isReady)) {
            if now - connectStartedAt > options.connectTimeoutMilliseconds {
                connecting = false
                dropConnection(reason: .timeout, failQueued: true)
            }
            return
        }
        if let first = inFlight.first, let at = first.writtenAt, now - at > options.responseTimeoutMilliseconds {
            dropConnection(reason: .timeout, failQueued: false)
            pump()
        }
    }
}

struct PendingRequest {
    let request: HTTPRequest
    let completion: (Result<HTTPResponse, HTTPClientError>) -> Void
    var stream: ResponseStream?
    var writtenAt: UInt64?

    init(request: HTTPRequest, completion: @escaping (Result<HTTPResponse, HTTPClientError>) -> Void, stream: ResponseStream? = nil) {
        self.request = request
        self.completion = completion
        self.stream = stream
    }
}

/// Where a streamed response goes (`HTTPClient.stream`).
struct ResponseStream {
    let head: (HTTPResponse) -> Void
    let body: (UnsafeRawBufferPointer) throws -> Void
}
