internal import CLibUV
import Synchronization

/// A libuv error (`uv_err_name` / `uv_strerror` of a negative return code).
public struct LoopError: Error, CustomStringConvertible, Sendable, Equatable {
    public let code: Int32
    public let operation: String
    public init(code: Int32, operation: String) {
        self.code = code
        self.operation = operation
    }
    /// The libuv name, e.g. `ECONNREFUSED`.
    public var name: String { String(cString: uv_err_name(code)) }
    public var description: String { "\(operation): \(name) (\(String(cString: uv_strerror(code))))" }
    public var isEOF: Bool { code == UV_EOF.rawValue }
}

/// The one C-call helper for libuv: a negative return code becomes a `LoopError`.
@inline(__always)
func uvCheck(_ rc: Int32, _ operation: @autoclosure () -> String) throws(LoopError) {
    if rc < 0 { throw LoopError(code: rc, operation: operation()) }
}

/// One libuv loop, run by one thread.
///
/// Threading: every method must be called on the loop's thread, except
/// through `inbox`, which is the only way in from other threads.
/// Lifetime: `close()` runs the loop until every handle is closed and then
/// closes the loop; it reports any handle still open.
public final class EventLoop {
    let raw: UnsafeMutablePointer<uv_loop_t>
    /// One read buffer per loop: libuv calls alloc then read back to back, and
    /// readers consume the bytes before returning.
    let readBuffer: UnsafeMutableRawBufferPointer
    public private(set) var inbox: LoopInbox!
    private var closed = false

    public init() throws(LoopError) {
        raw = .allocate(capacity: 1)
        readBuffer = .allocate(byteCount: 64 * 1024, alignment: 16)
        // Every stored property is set: from here a throw runs `deinit`, the
        // one place that frees `raw` and `readBuffer`. A failed init has
        // nothing to close (`closed`), except the libuv loop once it is initialised.
        let rc = uv_loop_init(raw)
        guard rc == 0 else {
            closed = true
            throw LoopError(code: rc, operation: "uv_loop_init")
        }
        raw.pointee.data = Unmanaged.passUnretained(self).toOpaque()
        do {
            inbox = try LoopInbox(loop: self)
        } catch {
            // No handle was opened (LoopInbox registers none when it fails): the loop closes at once.
            uv_loop_close(raw)
            closed = true
            throw error
        }
    }

    deinit {
        assert(closed, "EventLoop dropped without close()")
        raw.deallocate()
        readBuffer.deallocate()
    }

    static func from(_ loop: UnsafeMutablePointer<uv_loop_t>?) -> EventLoop {
        Unmanaged<EventLoop>.fromOpaque(loop!.pointee.data!).takeUnretainedValue()
    }

    /// Runs until no active, referenced handle is left (or `stop()`).
    public func run() {
        uv_run(raw, UV_RUN_DEFAULT)
    }

    /// Runs one iteration; with `wait`, blocks for at least one event.
    @discardableResult
    public func runOnce(wait: Bool = true) -> Bool {
        uv_run(raw, wait ? UV_RUN_ONCE : UV_RUN_NOWAIT) != 0
    }

    /// Makes `run()` return after the current iteration.
    public func stop() { uv_stop(raw) }

    /// Milliseconds of the loop's cached clock.
    public var now: UInt64 { uv_now(raw) }

    /// Handles that are open and not closing (the inbox's own handle excluded).
    public var liveHandles: Int { liveHandleTypes.count }

    /// Type names of the live handles (`tcp`, `timer`, …), the inbox's own excluded.
    public var liveHandleTypes: [String] {
        var found: [(UnsafeMutableRawPointer, String)] = []
        withUnsafeMutablePointer(to: &found) { p in
            uv_walk(
                raw,
                { handle, arg in
                    guard let handle, uv_is_closing(handle) == 0 else { return }
                    let name = String(cString: uv_handle_type_name(handle.pointee.type))
                    arg!.assumingMemoryBound(to: [(UnsafeMutableRawPointer, String)].self).pointee
                        .append((UnsafeMutableRawPointer(handle), name))
                }, p)
        }
        let inboxHandle = inbox.handleAddress
        return found.filter { $0.0 != inboxHandle }.map(\.1)
    }

    /// Closes the inbox, runs the loop until every close callback has run and
    /// closes the loop. Returns the number of handles that were still open
    /// (0 for a clean shutdown); those are force-closed first so the loop can end.
    @discardableResult
    public func close() -> Int {
        precondition(!closed, "EventLoop closed twice")
        let leftOpen = liveHandles
        inbox.close()
        if leftOpen > 0 {
            uv_walk(
                raw,
                { handle, _ in
                    guard let handle, uv_is_closing(handle) == 0 else { return }
                    uv_close(handle, LoopHandle.closeCallback)
                }, nil)
        }
        uv_run(raw, UV_RUN_DEFAULT)
        let rc = uv_loop_close(raw)
        closed = true
        return rc == 0 ? leftOpen : max(leftOpen, 1)
    }

    /// Runs `work` on libuv's thread pool, then `completion` on this loop.
    /// Used for blocking work such as LMDB commits.
    public func offload(_ work: @escaping @Sendable () -> Void, then completion: @escaping () -> Void) {
        let req = UnsafeMutablePointer<uv_work_t>.allocate(capacity: 1)
        let box = OffloadBox(work: work, completion: completion)
        req.pointee.data = Unmanaged.passRetained(box).toOpaque()
        let rc = uv_queue_work(
            raw, req,
            { req in
                let box = Unmanaged<OffloadBox>.fromOpaque(req!.pointee.data!).takeUnretainedValue()
                box.work()
            },
            { req, _ in
                let box = Unmanaged<OffloadBox>.fromOpaque(req!.pointee.data!).takeRetainedValue()
                req!.deallocate()
                box.completion()
            })
        precondition(rc == 0, "uv_queue_work failed: \(rc)")
    }
}

/// `work` runs on a pool thread, `completion` on the loop; libuv orders them.
private final class OffloadBox: @unchecked Sendable {
    let work: @Sendable () -> Void
    let completion: () -> Void
    init(work: @escaping @Sendable () -> Void, completion: @escaping () -> Void) {
        self.work = work
        self.completion = completion
    }
}

/// The one way into a loop from another thread: jobs queue under a mutex and
/// one `uv_async_send` wakes the loop, which drains the whole queue (libuv
/// coalesces sends). After the loop closed, `send` returns `false`.
public final class LoopInbox: Sendable {
    private struct State: ~Copyable {
        var jobs: [@Sendable () -> Void] = []
        var open = true
    }
    // Only touched with the mutex held: the pointer is not used after close
    // sets `open = false` under that mutex.
    private nonisolated(unsafe) let async: UnsafeMutablePointer<uv_async_t>
    private let state = Mutex(State())

    init(loop: EventLoop) throws(LoopError) {
        async = .allocate(capacity: 1)
        let rc = uv_async_init(loop.raw, async) { handle in
            let inbox = Unmanaged<LoopInbox>.fromOpaque(handle!.pointee.data!).takeUnretainedValue()
            inbox.drain()
        }
        guard rc == 0 else {
            async.deallocate()
            throw LoopError(code: rc, operation: "uv_async_init")
        }
        async.pointee.data = Unmanaged.passRetained(self).toOpaque()
        // The inbox alone does not keep the loop running.
        uv_unref(UnsafeMutableRawPointer(async).assumingMemoryBound(to: uv_handle_t.self))
    }

    var isOpen: Bool { state.withLock { $0.open } }

    /// Work started from this loop whose result will come through the inbox
    /// (loop thread only). While any is outstanding, the loop keeps running.
    private nonisolated(unsafe) var holds = 0

    /// Keeps the loop running until the matching `release()` (loop thread only).
    public func hold() {
        holds += 1
        if holds == 1 { uv_ref(UnsafeMutableRawPointer(async).assumingMemoryBound(to: uv_handle_t.self)) }
    }

    /// Ends one `hold()` (loop thread only).
    public func release() {
        holds -= 1
        if holds == 0 { uv_unref(UnsafeMutableRawPointer(async).assumingMemoryBound(to: uv_handle_t.self)) }
    }
    var handleAddress: UnsafeMutableRawPointer { UnsafeMutableRawPointer(async) }

    /// Queues `job` to run on the loop thread. Returns `false` if the loop is closed.
    @discardableResult
    public func send(_ job: @escaping @Sendable () -> Void) -> Bool {
        state.withLock { st in
            guard st.open else { return false }
            st.jobs.append(job)
            uv_async_send(async)
            return true
        }
    }

    private func drain() {
        while true {
            let jobs = state.withLock { st in
                let j = st.jobs
                st.jobs.removeAll(keepingCapacity: true)
                return j
            }
            if jobs.isEmpty { return }
            for job in jobs { job() }
        }
    }

    /// Called by `EventLoop.close()` on the loop thread.
    func close() {
        let wasOpen = state.withLock { st in
            let was = st.open
            st.open = false
            return was
        }
        guard wasOpen else { return }
        drain()
        uv_close(UnsafeMutableRawPointer(async).assumingMemoryBound(to: uv_handle_t.self)) { handle in
            let inbox = Unmanaged<LoopInbox>.fromOpaque(handle!.pointee.data!)
            handle!.deallocate()  // uv_async_t memory, freed only in the close callback
            inbox.release()
        }
    }
}
