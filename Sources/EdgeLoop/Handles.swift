internal import CLibUV
import Glibc

/// Base of every libuv handle owned by Swift.
///
/// Ownership: the handle's memory is allocated here and freed only in libuv's
/// close callback. While open, the object keeps itself alive through
/// `handle->data` (one `passRetained`, balanced by the release in the close
/// callback), so callers may drop their reference; they must call `close()`.
/// Threading: loop-confined.
public class LoopHandle {
    let memory: UnsafeMutableRawPointer
    var handle: UnsafeMutablePointer<uv_handle_t> { memory.assumingMemoryBound(to: uv_handle_t.self) }
    public unowned let loop: EventLoop
    public private(set) var isClosing = false
    private var closeHandlers: [() -> Void] = []

    init(loop: EventLoop, type: uv_handle_type) {
        self.loop = loop
        memory = .allocate(byteCount: uv_handle_size(type), alignment: 16)
        memory.initializeMemory(as: UInt8.self, repeating: 0, count: uv_handle_size(type))
    }

    /// Call once the uv_*_init succeeded: from then on libuv owns a reference.
    func adopt() {
        handle.pointee.data = Unmanaged.passRetained(self).toOpaque()
    }

    /// Frees memory when the init call failed (libuv never saw the handle).
    func discardUninitialised() {
        memory.deallocate()
        isClosing = true
    }

    deinit {
        assert(isClosing, "libuv handle dropped without close()")
    }

    /// Closes the handle; `then` runs once libuv has released it.
    public func close(then: (() -> Void)? = nil) {
        if let then { closeHandlers.append(then) }
        guard !isClosing else { return }
        isClosing = true
        willClose()
        uv_close(handle, LoopHandle.closeCallback)
    }

    /// Subclasses stop their work here (e.g. fail pending callbacks).
    func willClose() {}

    static let closeCallback: uv_close_cb = { handle in
        guard let handle, let data = handle.pointee.data else { return }
        let owner = Unmanaged<LoopHandle>.fromOpaque(data).takeRetainedValue()
        owner.isClosing = true
        owner.memory.deallocate()
        let handlers = owner.closeHandlers
        owner.closeHandlers = []
        for h in handlers { h() }
    }

    /// Whether this handle keeps the loop running (`uv_ref` / `uv_unref`).
    public var keepsLoopAlive: Bool {
        get { uv_has_ref(handle) != 0 }
        set { if newValue { uv_ref(handle) } else { uv_unref(handle) } }
    }
}

/// A one-shot or repeating timer (`uv_timer_t`).
public final class LoopTimer: LoopHandle {
    private var callback: (() -> Void)?

    public init(loop: EventLoop) throws(LoopError) {
        super.init(loop: loop, type: UV_TIMER)
        let rc = uv_timer_init(loop.raw, memory.assumingMemoryBound(to: uv_timer_t.self))
        guard rc == 0 else { discardUninitialised(); throw LoopError(code: rc, operation: "uv_timer_init") }
        adopt()
    }

    /// Fires after `milliseconds`, then every `repeatEvery` ms if non-zero.
    /// Restarting replaces the previous schedule.
    public func start(after milliseconds: UInt64, repeatEvery: UInt64 = 0, _ callback: @escaping () -> Void) {
        precondition(!isClosing, "timer started after close")
        self.callback = callback
        uv_timer_start(
            memory.assumingMemoryBound(to: uv_timer_t.self),
            { t in
                let timer = Unmanaged<LoopTimer>.fromOpaque(t!.pointee.data!).takeUnretainedValue()
                timer.callback?()
            }, milliseconds, repeatEvery)
    }

    public func stop() {
        guard !isClosing else { return }
        uv_timer_stop(memory.assumingMemoryBound(to: uv_timer_t.self))
    }

    override func willClose() { callback = nil }
}

/// A POSIX signal delivered on the loop (`uv_signal_t`), e.g. SIGTERM for a
/// graceful drain or SIGHUP for a reload.
public final class SignalWatcher: LoopHandle {
    private var callback: ((Int32) -> Void)?
    public let signal: Int32

    public init(loop: EventLoop, signal: Int32, _ callback: @escaping (Int32) -> Void) throws(LoopError) {
        self.signal = signal
        super.init(loop: loop, type: UV_SIGNAL)
        let sig = memory.assumingMemoryBound(to: uv_signal_t.self)
        var rc = uv_signal_init(loop.raw, sig)
        guard rc == 0 else { discardUninitialised(); throw LoopError(code: rc, operation: "uv_signal_init") }
        adopt()
        self.callback = callback
        rc = uv_signal_start(
            sig,
            { s, signum in
                let watcher = Unmanaged<SignalWatcher>.fromOpaque(s!.pointee.data!).takeUnretainedValue()
                watcher.callback?(signum)
            }, signal)
        if rc != 0 { close(); throw LoopError(code: rc, operation: "uv_signal_start") }
        // A signal watcher alone does not keep a loop running.
        keepsLoopAlive = false
    }

    override func willClose() { callback = nil }
}

/// The process-level signals of a service, delivered on its loop:
/// SIGTERM or SIGINT starts a graceful drain (a second one exits at once with
/// status 1: everything acknowledged is already durable), SIGHUP asks for a
/// reload (certificates, tokens, policy). Ignores SIGPIPE, which a peer that
/// closes early would otherwise turn into a crash.
public final class ServiceSignals {
    private var watchers: [SignalWatcher] = []
    public private(set) var drainRequested = false

    public init(loop: EventLoop, onDrain: @escaping () -> Void, onReload: @escaping () -> Void) throws(LoopError) {
        signal(SIGPIPE, SIG_IGN)
        let drain: (Int32) -> Void = { [unowned self] _ in
            if drainRequested { _exit(1) }
            drainRequested = true
            onDrain()
        }
        do {
            watchers.append(try SignalWatcher(loop: loop, signal: SIGTERM, drain))
            watchers.append(try SignalWatcher(loop: loop, signal: SIGINT, drain))
            watchers.append(try SignalWatcher(loop: loop, signal: SIGHUP) { _ in onReload() })
        } catch {
            close()
            throw error
        }
    }

    /// Stops watching (call when the drain has finished, so the loop can end).
    public func close() {
        watchers.forEach { $0.close() }
        watchers = []
    }
}
