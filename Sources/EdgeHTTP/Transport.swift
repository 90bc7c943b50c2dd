import EdgeLoop
import EdgeTLS

/// Why a transport ended.
public enum TransportEnd: Sendable, Equatable, CustomStringConvertible {
    case closedByPeer
    case closedLocally
    case networkError(String)
    case tlsError(TLSError)

    public var description: String {
        switch self {
        case .closedByPeer: return "closed by peer"
        case .closedLocally: return "closed locally"
        case .networkError(let e): return "network error: \(e)"
        case .tlsError(let e): return e.description
        }
    }
}

/// A byte stream over TCP, optionally TLS over memory BIOs.
///
/// Plaintext goes in and out; ciphertext only ever touches the socket.
/// Writes before the TLS handshake completes are held and sent after it.
/// Threading: loop-confined.
final class Transport {
    let stream: TCPStream
    let tls: TLSSession?
    /// Scratch space for decrypted bytes, owned by the server or client and
    /// shared by its transports (consumed synchronously, loop-confined).
    private let scratch: UnsafeMutableRawBufferPointer
    private var heldUntilHandshake: [UInt8] = []
    private(set) var ended = false
    private var readyFired = false
    /// The peer ended the stream properly: a TCP close without TLS, or a TLS
    /// close_notify. (A bare TCP close under TLS may be a truncation.)
    private(set) var endedCleanly = false

    var onReady: (() -> Void)?
    var onData: ((UnsafeRawBufferPointer) -> Void)?
    var onEnd: ((TransportEnd) -> Void)?
    var onWriteDrained: (() -> Void)?

    init(stream: TCPStream, tls: TLSSession?, scratch: UnsafeMutableRawBufferPointer) {
        self.stream = stream
        self.tls = tls
        self.scratch = scratch
    }

    var isSecure: Bool { tls != nil }
    var peerIdentity: PeerIdentity? { tls?.peerIdentity }
    var queuedWriteBytes: Int { stream.queuedWriteBytes + heldUntilHandshake.count }
    var isReady: Bool { readyFired }

    func start() {
        stream.writeDrained = { [unowned self] in onWriteDrained?() }
        stream.startReading { [unowned self] event in
            switch event {
            case .data(let bytes): received(bytes)
            case .endOfStream:
                if tls == nil { endedCleanly = true }
                end(.closedByPeer)
            case .failed(let e): end(.networkError(e.description))
            }
        }
        if let tls {
            if tls.role == .client { advanceHandshake() }
        } else {
            fireReady()
        }
    }

    private func fireReady() {
        guard !readyFired else { return }
        readyFired = true
        onReady?()
    }

    private func received(_ bytes: UnsafeRawBufferPointer) {
        guard let tls else { onData?(bytes); return }
        tls.feed(bytes)
        if !tls.handshakeComplete {
            advanceHandshake()
            if ended || !tls.handshakeComplete { return }
        }
        drainPlaintext(tls)
    }

    private func advanceHandshake() {
        guard let tls, !ended else { return }
        switch tls.handshake() {
        case .needsInput:
            flushCiphertext()
        case .complete:
            flushCiphertext()
            fireReady()
            if !heldUntilHandshake.isEmpty {
                let held = heldUntilHandshake
                heldUntilHandshake = []
                write(held)
            }
            // Application data may have arrived with the last handshake flight.
            if !ended { drainPlaintext(tls) }
        case .failed(let e):
            flushCiphertext()  // the alert, so the peer learns why
            end(.tlsError(e))
        }
    }

    private func drainPlaintext(_ tls: TLSSession) {
        while !ended {
            switch tls.read(into: scratch) {
            case .data(let n):
                onData?(UnsafeRawBufferPointer(rebasing: scratch[0..<n]))
            case .needsInput:
                flushCiphertext()
                return
            case .closed:
                endedCleanly = true
                end(.closedByPeer)
                return
            case .failed(let e):
                flushCiphertext()
                end(.tlsError(e))
                return
            }
        }
    }

    private func flushCiphertext() {
        guard let tls, tls.pendingOutput > 0 else { return }
        let out = tls.takeOutput()
        stream.write(out)
    }

    func write(_ bytes: [UInt8]) {
        guard !ended, !bytes.isEmpty else { return }
        guard let tls else { stream.write(bytes); return }
        guard tls.handshakeComplete else { heldUntilHandshake.append(contentsOf: bytes); return }
        let failure = bytes.withUnsafeBytes { buf -> TLSError? in
            do throws(TLSError) { try tls.write(buf); return nil } catch { return error }
        }
        if let failure { end(.tlsError(failure)); return }
        flushCiphertext()
    }

    func pauseReading() { stream.pauseReading() }
    func resumeReading() { if !ended { stream.resumeReading() } }

    /// Sends close_notify (TLS), flushes queued writes, then closes the
    /// socket; after `lingerMilliseconds` it closes anyway (a peer that stops
    /// reading would otherwise hold the connection open for ever).
    func closeAfterWrites(lingerMilliseconds: UInt64) {
        guard !ended else { return }
        tls?.close()
        flushCiphertext()
        ended = true
        stream.pauseReading()
        let stream = self.stream
        let linger = try? LoopTimer(loop: stream.loop)
        linger?.start(after: lingerMilliseconds) {
            stream.close()
            linger?.close()
        }
        stream.shutdown {
            stream.close()
            linger?.close()
        }
        onEnd?(.closedLocally)
        clearCallbacks()
    }

    /// Closes at once, dropping queued writes.
    func close() { end(.closedLocally) }

    private func end(_ reason: TransportEnd) {
        guard !ended else { return }
        ended = true
        stream.close()
        onEnd?(reason)
        clearCallbacks()
    }

    private func clearCallbacks() {
        // Writes still queued complete after this transport may be gone.
        stream.writeDrained = nil
        onReady = nil
        onData = nil
        onEnd = nil
        onWriteDrained = nil
    }
}
