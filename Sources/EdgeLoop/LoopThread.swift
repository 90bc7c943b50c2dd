import Glibc
import Synchronization

/// A value handed from one thread to another once, with a bounded wait.
public final class OneShot<Value: Sendable>: Sendable {
    private let state = Mutex<Value?>(nil)
    // POSIX semaphores are thread-safe; the pointer itself never changes.
    private nonisolated(unsafe) let signal: UnsafeMutablePointer<sem_t>

    public init() {
        signal = .allocate(capacity: 1)
        sem_init(signal, 0, 0)
    }

    deinit {
        sem_destroy(signal)
        signal.deallocate()
    }

    /// Sets the value (the first call wins) and wakes a waiter.
    public func fulfil(_ value: Value) {
        let first = state.withLock { st -> Bool in
            guard st == nil else { return false }
            st = value
            return true
        }
        if first { sem_post(signal) }
    }

    /// Waits up to `seconds` for the value.
    public func wait(seconds: Double = 30) -> Value? {
        var deadline = timespec()
        clock_gettime(CLOCK_REALTIME, &deadline)
        let whole = Int(seconds)
        deadline.tv_sec += whole
        deadline.tv_nsec += Int((seconds - Double(whole)) * 1e9)
        if deadline.tv_nsec >= 1_000_000_000 { deadline.tv_sec += 1; deadline.tv_nsec -= 1_000_000_000 }
        while sem_timedwait(signal, &deadline) != 0 {
            if errno != EINTR { break }
        }
        let v = state.withLock { $0 }
        if v != nil { sem_post(signal) }  // later waiters see it too
        return v
    }
}

/// A thread running one `EventLoop` until it has nothing left to do.
///
/// `setup` runs on the new thread with its loop; it creates listeners,
/// timers and connections. The loop is closed when `run()` returns, and
/// `join()` reports the handles that were still open then (0 = clean).
public final class LoopThread: Sendable {
    public let inbox: LoopInbox
    private let thread: pthread_t
    private let result: OneShot<Int>

    public static func start(_ setup: @escaping @Sendable (EventLoop) throws -> Void) throws -> LoopThread {
        let ready = OneShot<LoopInboxOrError>()
        let result = OneShot<Int>()
        let context = ThreadContext {
            do {
                let loop = try EventLoop()
                do { try setup(loop) } catch {
                    ready.fulfil(.failed("\(error)"))
                    result.fulfil(loop.close())
                    return
                }
                ready.fulfil(.ready(loop.inbox))
                loop.run()
                result.fulfil(loop.close())
            } catch {
                ready.fulfil(.failed("\(error)"))
                result.fulfil(-1)
            }
        }
        var tid = pthread_t()
        let rc = spawnThread(&tid, context)
        guard rc == 0 else { throw LoopError(code: -rc, operation: "pthread_create") }
        switch ready.wait(seconds: 60) {
        case .ready(let inbox)?:
            return LoopThread(thread: tid, inbox: inbox, result: result)
        case .failed(let message)?:
            pthread_join(tid, nil)
            throw LoopThreadError.setupFailed(message)
        case nil:
            throw LoopThreadError.setupFailed("loop thread did not start within 60 s")
        }
    }

    private init(thread: pthread_t, inbox: LoopInbox, result: OneShot<Int>) {
        self.thread = thread
        self.inbox = inbox
        self.result = result
    }

    /// Waits for the loop to finish; returns the handles left open (0 = clean).
    @discardableResult
    public func join() -> Int {
        pthread_join(thread, nil)
        return result.wait(seconds: 0) ?? -1
    }
}

public enum LoopThreadError: Error, Sendable {
    case setupFailed(String)
}

enum LoopInboxOrError: Sendable {
    case ready(LoopInbox)
    case failed(String)
}

private final class ThreadContext: @unchecked Sendable {  // handed to exactly one new thread
    let body: () -> Void
    init(_ body: @escaping () -> Void) { self.body = body }
}

/// Starts a thread running `context`'s body; pthread_create's status.
private func spawnThread(_ tid: inout pthread_t, _ context: ThreadContext) -> Int32 {
    pthread_create(
        &tid, nil,
        { arg in
            Unmanaged<ThreadContext>.fromOpaque(arg!).takeRetainedValue().body()
            return nil
        }, Unmanaged.passRetained(context).toOpaque())
}

/// Runs `body` on a new detached thread: blocking work that must never run
/// on a loop (LMDB commits, libldap, a pull source's reads). `what` names
/// it if the system refuses a thread (a precondition: nothing can go on).
public func startDetachedThread(_ what: String, _ body: @escaping @Sendable () -> Void) {
    var tid = pthread_t()
    let rc = spawnThread(&tid, ThreadContext(body))
    precondition(rc == 0, "cannot start \(what): \(rc)")
    pthread_detach(tid)
}

/// A loop-confined value that may be passed around between threads but only
/// opened on the thread that created it (checked at every access).
public final class LoopBound<Value>: @unchecked Sendable {  // access is checked against the owning thread
    private let owner: pthread_t
    private let stored: Value

    public init(_ value: Value) {
        owner = pthread_self()
        stored = value
    }

    /// The value; traps when called from another thread.
    public var value: Value {
        precondition(pthread_equal(owner, pthread_self()) != 0, "LoopBound value used off its loop thread")
        return stored
    }
}
