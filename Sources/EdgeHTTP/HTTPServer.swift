import EdgeLoop
import EdgeTLS
import Glibc
import Synchronization

/// Limits of an HTTP server; every one has a status it answers with.
public struct HTTPServerLimits: Sendable {
    /// Request line plus header fields; above it: 431 and close.
    public var maxHeaderBytes = 16 * 1024
    /// Request body; above it: 413 and close, without reading the rest.
    public var maxBodyBytes = 1 << 20
    /// A request must arrive completely within this time after its first
    /// byte (slow clients): 408 and close.
    public var requestTimeoutMilliseconds: UInt64 = 30_000
    /// A kept-alive connection with nothing in flight is closed after this.
    public var idleTimeoutMilliseconds: UInt64 = 75_000
    /// Connections above this are closed at accept (the limit of the
    /// server's `ConnectionBudget` unless it is given one).
    public var maxConnections = 4096
    /// Parsed requests waiting for their responses on one connection; above
    /// it the connection stops reading until responses drain.
    public var maxPipelinedRequests = 64
    /// Queued response bytes that pause reading a connection, and the level
    /// at which reading resumes (write backpressure).
    public var writeHighWatermark = 1 << 20
    public var writeLowWatermark = 256 * 1024
    /// How long a closing connection may take to hand its last bytes to a
    /// peer before the socket is closed anyway.
    public var closeLingerMilliseconds: UInt64 = 5_000

    public init() {}
}

/// The open connections of one or more servers, counted against one limit:
/// an agent's serving loops share one, so `maxConnections` holds for the
/// agent, not per loop. Thread-safe (an atomic counter).
public final class ConnectionBudget: Sendable {
    public let limit: Int
    private let open = Atomic<Int>(0)

    public init(limit: Int) { self.limit = limit }

    /// Connections holding a slot now.
    public var count: Int { open.load(ordering: .relaxed) }

    /// Takes a slot; false when all `limit` are taken.
    public func take() -> Bool {
        var current = open.load(ordering: .relaxed)
        while current < limit {
            let (exchanged, seen) = open.compareExchange(expected: current, desired: current + 1, ordering: .relaxed)
            if exchanged { return true }
            current = seen
        }
        return false
    }

    /// Gives back a slot taken by `take()`.
    public func give() { open.subtract(1, ordering: .relaxed) }
}

/// What the handler knows about where a request came from.
public struct RequestContext {
    public let connectionID: UInt64
    public let peerAddress: SocketAddress?
    /// The verified client certificate's identity (mutual TLS only).
    public let peerIdentity: PeerIdentity?
    public let isSecure: Bool
}

/// Answers one request, now or later (e.g. after an LMDB commit). Answers
/// go out in request order on their connection; a second call is ignored,
/// and so is a call after the connection closed.
public final class Responder {
    private weak var connection: ServerConnection?
    private let slot: ResponseSlot
    init(connection: ServerConnection, slot: ResponseSlot) {
        self.connection = connection
        self.slot = slot
    }
    public func respond(_ response: HTTPResponse) {
        guard slot.response == nil else { return }
        slot.response = response
        connection?.flushResponses()
    }
    /// Whether the client is still there to receive an answer.
    public var isConnected: Bool { connection != nil && !(connection!.isClosed) }
}

final class ResponseSlot {
    var response: HTTPResponse?
    let keepAlive: Bool
    let omitBody: Bool
    /// HTTP/1.0: a streamed body is collected, not chunked.
    let chunkedAllowed: Bool
    /// A streamed body's head is out; its pieces follow as the connection drains.
    var streaming = false
    /// Decided when a streamed body's head went out (it said so).
    var streamKeepAlive = false
    init(response: HTTPResponse? = nil, keepAlive: Bool, omitBody: Bool, chunkedAllowed: Bool = true) {
        self.response = response
        self.keepAlive = keepAlive
        self.omitBody = omitBody
        self.chunkedAllowed = chunkedAllowed
    }
}

/// Counters of a server's life, for metrics and tests.
public struct HTTPServerStatistics: Sendable {
    public var acceptedConnections = 0
    public var rejectedConnections = 0
    public var openConnections = 0
    public var requests = 0
    public var protocolErrors = 0
    public var timeouts = 0
    public var tlsFailures = 0
    public var readPauses = 0
    /// Connections closed because the peer's certificate expired or no longer verifies.
    public var certificateClosures = 0
}

public typealias HTTPHandler = (HTTPRequest, RequestContext, Responder) -> Void

/// An HTTP/1.1 server over TCP or TLS on one event loop.
///
/// Keep-alive, pipelining (answered in order), `Content-Length` and chunked
/// bodies, `Expect: 100-continue`, limits with their statuses, write
/// backpressure and a connection cap. Threading: loop-confined.
/// Lifetime: like a libuv handle, a listening server keeps itself alive
/// until `shutdown()` has completed; callers may drop their reference.
public final class HTTPServer {
    public let loop: EventLoop
    public let limits: HTTPServerLimits
    /// Every connection of this server holds one slot of it while open.
    public let connectionBudget: ConnectionBudget
    private let tls: ReloadableTLSContext?
    private let handler: HTTPHandler
    private var listener: TCPListener?
    private var sweeper: LoopTimer?
    private var connections: [UInt64: ServerConnection] = [:]
    private var nextID: UInt64 = 1
    private var draining = false
    private var drained: (() -> Void)?
    let scratch: UnsafeMutableRawBufferPointer
    private(set) var date = httpDate()
    public internal(set) var statistics = HTTPServerStatistics()
    /// Builds the body of responses the server itself sends (400, 408, 413,
    /// 431, 505…). The SCIM endpoints set one that returns a SCIM error.
    public var errorBody: (Int, String) -> HTTPResponse = { status, detail in
        HTTPResponse(status: status, contentType: "text/plain; charset=utf-8", body: detail + "\n")
    }
    /// Called with each TLS handshake failure (for logs and metrics).
    public var onTLSFailure: ((TLSError, SocketAddress?) -> Void)?
    /// Called when a live connection is closed because its peer's
    /// certificate expired or no longer verifies (after a CRL reload).
    public var onCertificateClosure: ((String, PeerIdentity?, SocketAddress?) -> Void)?

    /// Checks every live TLS connection's peer certificate against the TLS
    /// context as it is now (after `ReloadableTLSContext.reload()`: new CRLs,
    /// new trust roots) and closes those that no longer verify. Returns how
    /// many it closed.
    @discardableResult
    public func revalidatePeerCertificates() -> Int {
        guard let context = tls?.context else { return 0 }
        var closed = 0
        for connection in Array(connections.values) {
            if let problem = connection.certificateProblem(context) {
                connection.closeForCertificate(problem)
                closed += 1
            }
        }
        return closed
    }

    /// The peer certificates of the open connections whose TLS handshake is
    /// done: who is connected now (one entry per connection).
    public var connectedPeers: [PeerIdentity] {
        connections.values.compactMap { $0.handshakeDone && !$0.isClosed ? $0.transport.peerIdentity : nil }
    }

    public convenience init(
        loop: EventLoop, address: SocketAddress, tls: ReloadableTLSContext? = nil,
        limits: HTTPServerLimits = HTTPServerLimits(), connectionBudget: ConnectionBudget? = nil,
        handler: @escaping HTTPHandler
    ) throws {
        try self.init(loop: loop, tls: tls, limits: limits, connectionBudget: connectionBudget, handler: handler)
        do {
            listener = try TCPListener(loop: loop, address: address) { [unowned self] stream in accept(stream) }
        } catch {
            // Undo what only a drain would undo (`deinit` frees `scratch` alone):
            // the timer and the self-reference, so the throw releases the server.
            sweeper?.close()
            sweeper = nil
            selfReference?.release()
            selfReference = nil
            throw error
        }
        sweeper?.keepsLoopAlive = false
    }

    /// A server without a listener of its own: it serves the connections
    /// another loop's server hands it (`handOver`, then `adopt(descriptor:)`).
    /// `connectionBudget`: shared with other servers to limit their
    /// connections together; nil: one of its own, of `limits.maxConnections`.
    public init(
        loop: EventLoop, tls: ReloadableTLSContext? = nil,
        limits: HTTPServerLimits = HTTPServerLimits(), connectionBudget: ConnectionBudget? = nil,
        handler: @escaping HTTPHandler
    ) throws {
        self.loop = loop
        self.limits = limits
        self.connectionBudget = connectionBudget ?? ConnectionBudget(limit: limits.maxConnections)
        self.tls = tls
        self.handler = handler
        scratch = .allocate(byteCount: 16 * 1024, alignment: 16)
        let timer = try LoopTimer(loop: loop)
        let tick = max(50, min(1000, min(limits.requestTimeoutMilliseconds, limits.idleTimeoutMilliseconds) / 4))
        timer.start(after: tick, repeatEvery: tick) { [unowned self] in sweep() }
        // Without a listener the timer keeps the loop running until the drain ends.
        sweeper = timer
        selfReference = Unmanaged.passRetained(self)
    }

    /// Balanced by the release in `finishDrain`.
    private var selfReference: Unmanaged<HTTPServer>?

    deinit { scratch.deallocate() }

    /// The bound address (the real port after binding port 0); a server
    /// without a listener has none.
    public var address: SocketAddress { listener!.address }
    public var port: Int { address.port }

    /// Spreads accepted connections over other loops: returns true when it
    /// took the stream (detached it and handed it to another server), false
    /// to serve it here. Connections past the budget are refused first; a
    /// stream handed over keeps its slot, which the adopting server (sharing
    /// the budget) gives back when the connection ends, or the taker gives
    /// back if the stream never gets there.
    public var handOver: ((TCPStream) -> Bool)?

    /// Serves a connection detached from another loop's server (on this
    /// server's loop), with the budget slot that server took for it.
    public func adopt(descriptor: Int32) {
        guard !draining else {
            Glibc.close(descriptor)
            connectionBudget.give()
            return
        }
        guard let stream = try? TCPStream.adopting(loop: loop, descriptor: descriptor) else {
            connectionBudget.give()
            return
        }
        serve(stream)
    }

    private func accept(_ stream: TCPStream) {
        guard !draining, connectionBudget.take() else {
            statistics.rejectedConnections += 1
            stream.close()
            return
        }
        if let handOver, handOver(stream) { return }
        serve(stream)
    }

    /// Serves a stream that holds a budget slot (given back when it ends).
    private func serve(_ stream: TCPStream) {
        let session: TLSSession?
        if let tls {
            do { session = try tls.context.makeSession() } catch {
                statistics.tlsFailures += 1
                stream.close()
                connectionBudget.give()
                return
            }
        } else {
            session = nil
        }
        let id = nextID
        nextID += 1
        let connection = ServerConnection(id: id, server: self, transport: Transport(stream: stream, tls: session, scratch: scratch))
        connections[id] = connection
        statistics.acceptedConnections += 1
        statistics.openConnections = connections.count
        connection.start()
    }

    func connectionEnded(_ connection: ServerConnection, _ reason: TransportEnd) {
        connections[connection.id] = nil
        connectionBudget.give()
        statistics.openConnections = connections.count
        if case .tlsError(let e) = reason, !connection.handshakeDone {
            statistics.tlsFailures += 1
            onTLSFailure?(e, connection.peerAddress)
        }
        if draining && connections.isEmpty { finishDrain() }
    }

    func dispatch(_ request: HTTPRequest, _ connection: ServerConnection, _ responder: Responder) {
        statistics.requests += 1
        handler(request, connection.context, responder)
    }

    private func sweep() {
        date = httpDate()
        let now = loop.now
        let unixNow = unixSeconds()  // once per sweep, not per connection
        for connection in Array(connections.values) { connection.checkTimeouts(now: now, unixNow: unixNow) }
    }

    /// Graceful drain (SIGTERM): stop accepting, close idle connections,
    /// let in-flight requests finish (their connections then close), then
    /// close the listener and timer and call `completion`.
    public func shutdown(_ completion: (() -> Void)? = nil) {
        guard !draining else { return }
        draining = true
        drained = completion
        listener?.close()
        listener = nil
        for connection in Array(connections.values) { connection.drain() }
        if connections.isEmpty { finishDrain() }
    }

    public var isDraining: Bool { draining }

    private func finishDrain() {
        sweeper?.close()
        sweeper = nil
        let done = drained
        drained = nil
        done?()
        selfReference?.release()
        selfReference = nil
    }
}

/// One accepted connection: parser, response queue, timers' state.
final class ServerConnection {
    let id: UInt64
    unowned let server: HTTPServer
    let transport: Transport
    private let parser: MessageParser
    private var slots: [ResponseSlot] = []
    /// A protocol error was answered: read nothing more, close after it.
    private var failed = false
    private(set) var isClosed = false
    private var lastActivity: UInt64
    private var messageStartedAt: UInt64?
    private var readingPaused = false
    private var continueSent = false
    private(set) var handshakeDone = false
    /// When the peer's certificate stops being valid (Unix seconds; 0: no certificate).
    private var peerNotAfter: Int64 = 0
    let peerAddress: SocketAddress?
    lazy var context = RequestContext(
        connectionID: id, peerAddress: peerAddress,
        peerIdentity: transport.peerIdentity, isSecure: transport.isSecure)

    init(id: UInt64, server: HTTPServer, transport: Transport) {
        self.id = id
        self.server = server
        self.transport = transport
        self.peerAddress = transport.stream.peerAddress
        parser = MessageParser(
            kind: .request, maxHeaderBytes: server.limits.maxHeaderBytes,
            maxBodyBytes: server.limits.maxBodyBytes)
        lastActivity = server.loop.now
    }

    func start() {
        parser.onHead = { [unowned self] head in decideHead(&head) }
        parser.onMessage = { [unowned self] head, body, keepAlive in message(head, body, keepAlive) }
        transport.onReady = { [unowned self] in
            handshakeDone = true
            peerNotAfter = transport.peerIdentity?.notAfter ?? 0
        }
        transport.onData = { [unowned self] bytes in received(bytes) }
        transport.onEnd = { [unowned self] reason in ended(reason) }
        transport.onWriteDrained = { [unowned self] in writeDrained() }
        transport.start()
    }

    private func received(_ bytes: UnsafeRawBufferPointer) {
        lastActivity = server.loop.now
        if messageStartedAt == nil { messageStartedAt = lastActivity }
        do {
            try parser.execute(bytes)
        } catch {
            server.statistics.protocolErrors += 1
            fail(status: error.status, detail: error.detail)
            return
        }
        // The request timeout runs from a request's first byte, request line
        // included; a pipelined request begun in these bytes starts its own.
        if !parser.isMidMessage {
            messageStartedAt = nil
        } else if messageStartedAt == nil {
            messageStartedAt = lastActivity
        }
        applyBackpressure()
    }

    private func decideHead(_ head: inout ParsedHead) -> HeadDecision {
        if let expect = head.headers["Expect"] {
            guard equalsIgnoringCase(expect, "100-continue") else {
                return .reject(status: 417, detail: "unsupported expectation '\(expect)'")
            }
            // Only when nothing earlier is waiting: a 100 must not overtake earlier responses.
            if slots.isEmpty && !continueSent {
                continueSent = true
                transport.write(Array("HTTP/1.1 100 Continue\r\n\r\n".utf8))
            }
        }
        return .readBody
    }

    private func message(_ head: ParsedHead, _ body: [UInt8], _ keepAlive: Bool) {
        continueSent = false
        messageStartedAt = nil
        var request = HTTPRequest(
            method: head.method, target: String(decoding: head.target, as: UTF8.self),
            headers: head.headers, body: body)
        request.versionMajor = head.versionMajor
        request.versionMinor = head.versionMinor
        let slot = ResponseSlot(
            keepAlive: keepAlive && !server.isDraining, omitBody: head.method == "HEAD",
            chunkedAllowed: head.versionMajor > 1 || (head.versionMajor == 1 && head.versionMinor >= 1))
        slots.append(slot)
        if !keepAlive {
            // Nothing after this request is read (RFC 9112 §9.6).
            transport.pauseReading()
            readingPaused = true
        }
        server.dispatch(request, self, Responder(connection: self, slot: slot))
    }

    /// Writes the answered responses at the head of the queue, in order.
    func flushResponses() {
        guard !isClosed else { return }
        while let head = slots.first, var response = head.response {
            // While draining, the last owed response says goodbye.
            let keepAlive = head.keepAlive && !(slots.count == 1 && server.isDraining)
            if let stream = response.stream {
                // Chunked (RFC 9112 §7.1); an HTTP/1.0 client has no chunked coding: its body ends with the
                // connection. The head decides keep-alive once, for the whole stream.
                let chunked = head.chunkedAllowed
                if !head.streaming {
                    head.streaming = true
                    head.streamKeepAlive = keepAlive && (chunked || head.omitBody)
                    transport.write(
                        response.serialized(
                            date: server.date, keepAlive: head.streamKeepAlive, omitBody: true, framing: chunked ? .chunked : .untilClose))
                }
                guard head.omitBody || pump(stream, chunked: chunked) else {
                    applyBackpressure()
                    return  // more when the writes drain
                }
                slots.removeFirst()
                if !head.streamKeepAlive {
                    closeNow()
                    return
                }
                continue
            }
            slots.removeFirst()
            transport.write(response.serialized(date: server.date, keepAlive: keepAlive, omitBody: head.omitBody))
            if !keepAlive {
                closeNow()
                return
            }
        }
        if slots.isEmpty {
            lastActivity = server.loop.now
            if server.isDraining { closeNow(); return }
        }
        applyBackpressure()
    }

    /// Writes a streamed body's pieces while the write buffer is under its
    /// high watermark; true once the last one is out. A failing stream
    /// closes the connection.
    private func pump(_ stream: BodyStream, chunked: Bool) -> Bool {
        // A connection gone queues nothing: stop producing (the pieces would be read and thrown away).
        while !isClosed && !transport.ended && transport.queuedWriteBytes <= server.limits.writeHighWatermark {
            let piece: [UInt8]?
            do { piece = try stream.next() } catch {
                transport.close()
                return false
            }
            guard let piece else {
                if chunked { transport.write(lastChunk) }
                return true
            }
            if !piece.isEmpty { transport.write(chunked ? chunk(piece) : piece) }
        }
        return false
    }

    /// Answers a protocol error after the responses already owed, then closes.
    private func fail(status: Int, detail: String) {
        transport.pauseReading()
        readingPaused = true
        failed = true
        slots.append(ResponseSlot(response: server.errorBody(status, detail), keepAlive: false, omitBody: false))
        flushResponses()
    }

    private func applyBackpressure() {
        guard !isClosed, !failed, !server.isDraining else { return }
        let limits = server.limits
        let overWrites = transport.queuedWriteBytes > limits.writeHighWatermark
        let overPipeline = slots.count >= limits.maxPipelinedRequests
        if (overWrites || overPipeline) && !readingPaused {
            readingPaused = true
            server.statistics.readPauses += 1
            transport.pauseReading()
        } else if readingPaused && !overPipeline && transport.queuedWriteBytes <= limits.writeLowWatermark
            && (slots.last?.keepAlive ?? true)
        {
            readingPaused = false
            transport.resumeReading()
        }
    }

    private func writeDrained() {
        if slots.first?.streaming == true { flushResponses() } else { applyBackpressure() }
    }

    func checkTimeouts(now: UInt64, unixNow: Int64) {
        guard !isClosed else { return }
        if peerNotAfter > 0, unixNow > peerNotAfter {
            // A connection is no better than the certificate that opened it.
            closeForCertificate("certificate has expired")
            return
        }
        let limits = server.limits
        if let started = messageStartedAt, now - started > limits.requestTimeoutMilliseconds {
            server.statistics.timeouts += 1
            messageStartedAt = nil
            fail(status: 408, detail: "request not received within \(limits.requestTimeoutMilliseconds) ms")
        } else if slots.isEmpty, messageStartedAt == nil, now - lastActivity > limits.idleTimeoutMilliseconds {
            // Idle keep-alive connection: close quietly (nothing is owed).
            closeNow()
        } else if !transport.isReady, now - lastActivity > limits.requestTimeoutMilliseconds {
            server.statistics.timeouts += 1
            transport.close()  // TLS handshake never completed
        }
    }

    /// Closes at once (in-flight requests are not answered): the peer's
    /// certificate no longer holds.
    func closeForCertificate(_ reason: String) {
        guard !isClosed else { return }
        server.statistics.certificateClosures += 1
        server.onCertificateClosure?(reason, transport.peerIdentity, peerAddress)
        transport.close()
    }

    /// Why the peer's certificate no longer verifies against `context`, or nil.
    func certificateProblem(_ context: TLSContext) -> String? {
        guard handshakeDone, let tls = transport.tls else { return nil }
        return tls.reverifyPeer(against: context)
    }

    /// Server shutdown: close now if nothing is owed, else after the last answer.
    func drain() {
        transport.pauseReading()
        readingPaused = true
        if slots.isEmpty { closeNow() }
    }

    private func closeNow() {
        guard !isClosed else { return }
        transport.closeAfterWrites(lingerMilliseconds: server.limits.closeLingerMilliseconds)
    }

    private func ended(_ reason: TransportEnd) {
        isClosed = true
        server.connectionEnded(self, reason)
    }
}
