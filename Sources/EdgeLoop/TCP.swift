internal import CLibUV
import Glibc

/// An IPv4 or IPv6 socket address, parsed from `HOST:PORT` or `[V6]:PORT`.
/// `localhost` means 127.0.0.1 (no resolver: agents name their peers by address
/// or by a host name resolved by the caller).
public struct SocketAddress: Sendable, CustomStringConvertible, Equatable {
    public let host: String
    public let port: Int
    public var isIPv6: Bool { host.contains(":") }
    /// Reachable from this machine only (127.0.0.0/8, ::1).
    public var isLoopback: Bool { host == "::1" || host.hasPrefix("127.") }

    public init(host: String, port: Int) {
        self.host = host == "localhost" ? "127.0.0.1" : host
        self.port = port
    }

    /// Parses `127.0.0.1:8443`, `[::1]:8443`, `localhost:0`.
    public init?(_ text: String) {
        var host: Substring
        var portText: Substring
        if text.hasPrefix("[") {
            guard let close = text.firstIndex(of: "]") else { return nil }
            host = text[text.index(after: text.startIndex)..<close]
            let rest = text[text.index(after: close)...]
            guard rest.hasPrefix(":") else { return nil }
            portText = rest.dropFirst()
        } else {
            guard let colon = text.lastIndex(of: ":") else { return nil }
            host = text[..<colon]
            portText = text[text.index(after: colon)...]
        }
        guard let port = Int(portText), (0...65535).contains(port), !host.isEmpty else { return nil }
        self.init(host: String(host), port: port)
        var probe = sockaddr_storage()
        guard (try? withSockaddr(&probe)) != nil else { return nil }
    }

    public var description: String { isIPv6 ? "[\(host)]:\(port)" : "\(host):\(port)" }

    func withSockaddr(_ storage: inout sockaddr_storage) throws(LoopError) {
        let rc: Int32 = withUnsafeMutablePointer(to: &storage) { p in
            let raw = UnsafeMutableRawPointer(p)
            if isIPv6 {
                return uv_ip6_addr(host, Int32(port), raw.assumingMemoryBound(to: sockaddr_in6.self))
            }
            return uv_ip4_addr(host, Int32(port), raw.assumingMemoryBound(to: sockaddr_in.self))
        }
        try uvCheck(rc, "parse address \(description)")
    }

    static func from(_ storage: sockaddr_storage) -> SocketAddress? {
        var s = storage
        return withUnsafePointer(to: &s) { p -> SocketAddress? in
            var name = [CChar](repeating: 0, count: 64)
            let raw = UnsafeRawPointer(p)
            if Int32(storage.ss_family) == AF_INET6 {
                let a = raw.assumingMemoryBound(to: sockaddr_in6.self)
                uv_ip6_name(a, &name, name.count)
                return SocketAddress(host: cString(name), port: Int(UInt16(bigEndian: a.pointee.sin6_port)))
            } else if Int32(storage.ss_family) == AF_INET {
                let a = raw.assumingMemoryBound(to: sockaddr_in.self)
                uv_ip4_name(a, &name, name.count)
                return SocketAddress(host: cString(name), port: Int(UInt16(bigEndian: a.pointee.sin_port)))
            }
            return nil
        }
    }
}

/// What a read delivers. The bytes of `.data` are valid only during the
/// callback (they live in the loop's shared read buffer).
public enum ReadEvent {
    case data(UnsafeRawBufferPointer)
    case endOfStream
    case failed(LoopError)
}

/// A connected TCP stream (`uv_tcp_t` used as `uv_stream_t`).
///
/// Writes are queued in order; `queuedWriteBytes` is what libuv has not yet
/// handed to the kernel, the figure write backpressure looks at.
public final class TCPStream: LoopHandle {
    private var onRead: ((ReadEvent) -> Void)?
    public private(set) var queuedWriteBytes = 0
    public private(set) var isReading = false
    var stream: UnsafeMutablePointer<uv_stream_t> { memory.assumingMemoryBound(to: uv_stream_t.self) }
    var tcp: UnsafeMutablePointer<uv_tcp_t> { memory.assumingMemoryBound(to: uv_tcp_t.self) }

    init(loop: EventLoop, uninitialised: Void) throws(LoopError) {
        super.init(loop: loop, type: UV_TCP)
        let rc = uv_tcp_init(loop.raw, memory.assumingMemoryBound(to: uv_tcp_t.self))
        guard rc == 0 else { discardUninitialised(); throw LoopError(code: rc, operation: "uv_tcp_init") }
        adopt()
    }

    /// A stream over an already connected socket, such as one `detach()`ed
    /// from another loop. The stream owns `descriptor` from then on.
    public static func adopting(loop: EventLoop, descriptor: Int32) throws(LoopError) -> TCPStream {
        let stream = try TCPStream(loop: loop, uninitialised: ())
        let rc = uv_tcp_open(stream.tcp, uv_os_sock_t(descriptor))
        guard rc == 0 else {
            Glibc.close(descriptor)
            stream.close()
            throw LoopError(code: rc, operation: "uv_tcp_open")
        }
        uv_tcp_nodelay(stream.tcp, 1)
        return stream
    }

    /// Hands the connection over to another loop: returns a duplicate of the
    /// socket (for `adopting(loop:descriptor:)`) and closes this handle. Only
    /// before anything was read or written.
    public func detach() throws(LoopError) -> Int32 {
        var fd: uv_os_fd_t = -1
        let rc = uv_fileno(handle, &fd)
        guard rc == 0 else { close(); throw LoopError(code: rc, operation: "uv_fileno") }
        let copy = dup(fd)
        close()
        guard copy >= 0 else { throw LoopError(code: -errno, operation: "dup") }
        return copy
    }

    /// Connects to `address`; `completion` gets the stream or the error.
    public static func connect(
        loop: EventLoop, to address: SocketAddress,
        _ completion: @escaping (Result<TCPStream, LoopError>) -> Void
    ) {
        let stream: TCPStream
        do { stream = try TCPStream(loop: loop, uninitialised: ()) } catch { completion(.failure(error)); return }
        var storage = sockaddr_storage()
        do { try address.withSockaddr(&storage) } catch { stream.close(); completion(.failure(error)); return }
        let req = UnsafeMutablePointer<uv_connect_t>.allocate(capacity: 1)
        let box = ConnectBox(stream: stream, completion: completion)
        req.pointee.data = Unmanaged.passRetained(box).toOpaque()
        let rc = withUnsafePointer(to: &storage) { p in
            uv_tcp_connect(req, stream.tcp, UnsafeRawPointer(p).assumingMemoryBound(to: sockaddr.self)) { req, status in
                let box = Unmanaged<ConnectBox>.fromOpaque(req!.pointee.data!).takeRetainedValue()
                req!.deallocate()
                if status < 0 {
                    box.stream.close()
                    box.completion(.failure(LoopError(code: status, operation: "connect")))
                } else {
                    uv_tcp_nodelay(box.stream.tcp, 1)
                    box.completion(.success(box.stream))
                }
            }
        }
        if rc < 0 {
            Unmanaged<ConnectBox>.fromOpaque(req.pointee.data!).release()
            req.deallocate()
            stream.close()
            completion(.failure(LoopError(code: rc, operation: "uv_tcp_connect \(address)")))
        }
    }

    /// Starts delivering reads to `handler` (replacing any earlier handler).
    public func startReading(_ handler: @escaping (ReadEvent) -> Void) {
        onRead = handler
        resumeReading()
    }

    /// Resumes reads after `pauseReading()` (backpressure).
    public func resumeReading() {
        guard !isReading, !isClosing, onRead != nil else { return }
        isReading = true
        uv_read_start(
            stream,
            { handle, _, buf in
                let loop = EventLoop.from(handle!.pointee.loop)
                buf!.pointee = uv_buf_init(
                    loop.readBuffer.baseAddress!.assumingMemoryBound(to: CChar.self),
                    UInt32(loop.readBuffer.count))
            },
            { s, nread, buf in
                let me = Unmanaged<TCPStream>.fromOpaque(s!.pointee.data!).takeUnretainedValue()
                if nread > 0 {
                    me.onRead?(.data(UnsafeRawBufferPointer(start: buf!.pointee.base, count: nread)))
                } else if nread == Int(UV_EOF.rawValue) {
                    me.pauseReading()
                    me.onRead?(.endOfStream)
                } else if nread < 0 {
                    me.pauseReading()
                    me.onRead?(.failed(LoopError(code: Int32(nread), operation: "read")))
                }
            })
    }

    /// Stops reading: the kernel buffer fills and TCP pushes back on the peer.
    public func pauseReading() {
        guard isReading, !isClosing else { return }
        isReading = false
        uv_read_stop(stream)
    }

    /// Writes `bytes` (copied only if the kernel does not take them at once);
    /// `completion` runs when written or failed.
    public func write(_ bytes: UnsafeRawBufferPointer, completion: ((LoopError?) -> Void)? = nil) {
        guard !isClosing else { completion?(LoopError(code: UV_ECANCELED.rawValue, operation: "write")); return }
        var offset = 0
        if queuedWriteBytes == 0 && bytes.count > 0 {
            var buf = uv_buf_init(
                UnsafeMutablePointer(mutating: bytes.baseAddress!.assumingMemoryBound(to: CChar.self)),
                UInt32(bytes.count))
            let n = uv_try_write(stream, &buf, 1)
            if n > 0 { offset = Int(n) }
            if n < 0 && n != UV_EAGAIN.rawValue {
                completion?(LoopError(code: n, operation: "write"))
                return
            }
        }
        let remaining = bytes.count - offset
        if remaining == 0 { completion?(nil); return }
        let copy = UnsafeMutableRawBufferPointer.allocate(byteCount: remaining, alignment: 1)
        copy.copyMemory(from: UnsafeRawBufferPointer(rebasing: bytes[offset...]))
        let req = UnsafeMutablePointer<uv_write_t>.allocate(capacity: 1)
        let box = WriteBox(stream: self, buffer: copy, completion: completion)
        req.pointee.data = Unmanaged.passRetained(box).toOpaque()
        queuedWriteBytes += remaining
        var buf = uv_buf_init(copy.baseAddress!.assumingMemoryBound(to: CChar.self), UInt32(remaining))
        let rc = uv_write(req, stream, &buf, 1) { req, status in
            let box = Unmanaged<WriteBox>.fromOpaque(req!.pointee.data!).takeRetainedValue()
            req!.deallocate()
            box.buffer.deallocate()
            box.stream.queuedWriteBytes -= box.buffer.count
            box.completion?(status < 0 ? LoopError(code: status, operation: "write") : nil)
            box.stream.writeDrained?()
        }
        if rc < 0 {
            Unmanaged<WriteBox>.fromOpaque(req.pointee.data!).release()
            req.deallocate()
            copy.deallocate()
            queuedWriteBytes -= remaining
            completion?(LoopError(code: rc, operation: "uv_write"))
        }
    }

    public func write(_ bytes: [UInt8], completion: ((LoopError?) -> Void)? = nil) {
        bytes.withUnsafeBytes { write($0, completion: completion) }
    }

    /// Called after each queued write completes: where write backpressure is released.
    public var writeDrained: (() -> Void)?

    /// Half-closes after queued writes (`uv_shutdown`).
    public func shutdown(_ completion: (() -> Void)? = nil) {
        guard !isClosing else { completion?(); return }
        let req = UnsafeMutablePointer<uv_shutdown_t>.allocate(capacity: 1)
        let box = ShutdownBox(completion: completion)
        req.pointee.data = Unmanaged.passRetained(box).toOpaque()
        let rc = uv_shutdown(req, stream) { req, _ in
            let box = Unmanaged<ShutdownBox>.fromOpaque(req!.pointee.data!).takeRetainedValue()
            req!.deallocate()
            box.completion?()
        }
        if rc < 0 {
            Unmanaged<ShutdownBox>.fromOpaque(req.pointee.data!).release()
            req.deallocate()
            completion?()
        }
    }

    /// The peer's address, if connected.
    public var peerAddress: SocketAddress? {
        guard !isClosing else { return nil }
        var storage = sockaddr_storage()
        var len = Int32(MemoryLayout<sockaddr_storage>.size)
        let rc = withUnsafeMutablePointer(to: &storage) { p in
            uv_tcp_getpeername(tcp, UnsafeMutableRawPointer(p).assumingMemoryBound(to: sockaddr.self), &len)
        }
        return rc == 0 ? SocketAddress.from(storage) : nil
    }

    override func willClose() {
        onRead = nil
        writeDrained = nil
    }
}

private final class ConnectBox {
    let stream: TCPStream
    let completion: (Result<TCPStream, LoopError>) -> Void
    init(stream: TCPStream, completion: @escaping (Result<TCPStream, LoopError>) -> Void) {
        self.stream = stream
        self.completion = completion
    }
}

private final class WriteBox {
    let stream: TCPStream
    let buffer: UnsafeMutableRawBufferPointer
    let completion: ((LoopError?) -> Void)?
    init(stream: TCPStream, buffer: UnsafeMutableRawBufferPointer, completion: ((LoopError?) -> Void)?) {
        self.stream = stream
        self.buffer = buffer
        self.completion = completion
    }
}

private final class ShutdownBox {
    let completion: (() -> Void)?
    init(completion: (() -> Void)?) { self.completion = completion }
}

/// A listening TCP socket. `port` reports the real port after binding port 0.
public final class TCPListener: LoopHandle {
    private var onConnection: ((TCPStream) -> Void)?
    public private(set) var address: SocketAddress

    public init(
        loop: EventLoop, address: SocketAddress, backlog: Int32 = 511,
        _ onConnection: @escaping (TCPStream) -> Void
    ) throws(LoopError) {
        self.address = address
        super.init(loop: loop, type: UV_TCP)
        let tcp = memory.assumingMemoryBound(to: uv_tcp_t.self)
        let rc0 = uv_tcp_init(loop.raw, tcp)
        guard rc0 == 0 else { discardUninitialised(); throw LoopError(code: rc0, operation: "uv_tcp_init") }
        adopt()
        self.onConnection = onConnection
        do {
            var storage = sockaddr_storage()
            try address.withSockaddr(&storage)
            let flags: UInt32 = address.isIPv6 ? UInt32(UV_TCP_IPV6ONLY.rawValue) : 0
            let rc = withUnsafePointer(to: &storage) { p in
                uv_tcp_bind(tcp, UnsafeRawPointer(p).assumingMemoryBound(to: sockaddr.self), flags)
            }
            try uvCheck(rc, "bind \(address)")
            let stream = memory.assumingMemoryBound(to: uv_stream_t.self)
            try uvCheck(
                uv_listen(stream, backlog) { server, status in
                    let me = Unmanaged<TCPListener>.fromOpaque(server!.pointee.data!).takeUnretainedValue()
                    guard status == 0 else { return }
                    me.acceptOne()
                }, "listen \(address)")
            var bound = sockaddr_storage()
            var len = Int32(MemoryLayout<sockaddr_storage>.size)
            _ = withUnsafeMutablePointer(to: &bound) { p in
                uv_tcp_getsockname(tcp, UnsafeMutableRawPointer(p).assumingMemoryBound(to: sockaddr.self), &len)
            }
            if let real = SocketAddress.from(bound) { self.address = real }
        } catch {
            close()
            throw error
        }
    }

    public var port: Int { address.port }

    private func acceptOne() {
        guard let client = try? TCPStream(loop: loop, uninitialised: ()) else { return }
        let rc = uv_accept(memory.assumingMemoryBound(to: uv_stream_t.self), client.stream)
        guard rc == 0 else { client.close(); return }
        uv_tcp_nodelay(client.tcp, 1)
        onConnection?(client)
    }

    override func willClose() { onConnection = nil }
}

/// The text of a NUL-terminated C buffer.
func cString(_ buffer: [CChar]) -> String {
    let bytes = buffer.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }
    return String(decoding: bytes, as: UTF8.self)
}
