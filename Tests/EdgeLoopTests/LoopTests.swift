import EdgeLoop
import EdgeTestSupport
import Foundation
import XCTest

final class LoopTests: XCTestCase {
    func testTimersFireInOrderAndTheLoopClosesClean() throws {
        let (order, leftOpen) = try runOnLoop { (loop: EventLoop, finish: @escaping @Sendable ([Int]) -> Void) in
            var fired: [Int] = []
            let slow = try LoopTimer(loop: loop)
            let fast = try LoopTimer(loop: loop)
            let repeating = try LoopTimer(loop: loop)
            var ticks = 0
            repeating.start(after: 1, repeatEvery: 1) {
                ticks += 1
                if ticks == 3 { repeating.close(); fired.append(3) }
            }
            slow.start(after: 40) {
                fired.append(40)
                slow.close()
                fast.close()
                finish(fired)
            }
            fast.start(after: 10) { fired.append(10) }
        }
        XCTAssertEqual(order, [3, 10, 40])
        XCTAssertEqual(leftOpen, 0, "every handle was closed")
    }

    func testCloseReportsHandlesLeftOpen() throws {
        let loop = try EventLoop()
        let timer = try LoopTimer(loop: loop)
        timer.start(after: 100_000) {}
        XCTAssertEqual(loop.liveHandles, 1)
        XCTAssertEqual(loop.liveHandleTypes, ["timer"])
        XCTAssertEqual(loop.close(), 1, "a forgotten timer is reported")
    }

    /// A loop whose `uv_loop_init` fails (out of descriptors: RLIMIT_NOFILE
    /// binds root too) throws EMFILE and frees its memory once (`deinit`
    /// used to free it a second time, after asserting on a loop never closed).
    func testALoopThatCannotBeCreatedThrowsAndLeaksNothing() throws {
        try EventLoop().close()  // libuv's process-wide signal pipe exists before descriptors run out
        func openDescriptors() -> [Int32] {
            ((try? FileManager.default.contentsOfDirectory(atPath: "/proc/self/fd")) ?? []).compactMap { Int32($0) }
        }
        func target(_ fd: Int32) -> String {
            (try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/fd/\(fd)")) ?? "?"
        }
        let before = openDescriptors()
        var saved = rlimit()
        XCTAssertEqual(getrlimit(Int32(RLIMIT_NOFILE.rawValue), &saved), 0)
        var low = saved
        low.rlim_cur = rlim_t((before.max() ?? 0) + 64)
        XCTAssertEqual(setrlimit(Int32(RLIMIT_NOFILE.rawValue), &low), 0)
        defer { _ = setrlimit(Int32(RLIMIT_NOFILE.rawValue), &saved) }
        var fillers: [Int32] = []
        func fill() { while true { let fd = open("/dev/null", O_RDONLY); if fd < 0 { break }; fillers.append(fd) } }
        var failures = 0, successes = 0
        // Free 0, 1, 2, … descriptors: uv_loop_init fails at each of its
        // steps (epoll, the signal pipe, the thread pool's eventfd) until it fits.
        for free in 0..<6 {
            fill()
            for _ in 0..<free { close(fillers.removeLast()) }
            do {
                let loop = try EventLoop()
                successes += 1
                XCTAssertEqual(loop.close(), 0)
            } catch {
                failures += 1
                XCTAssertEqual(error.name, "EMFILE", "\(error)")
            }
        }
        for fd in fillers { close(fd) }
        _ = setrlimit(Int32(RLIMIT_NOFILE.rawValue), &saved)
        XCTAssertGreaterThanOrEqual(failures, 3)
        XCTAssertGreaterThanOrEqual(successes, 1)
        // libuv 1.44 itself leaves the epoll descriptor open when uv_loop_init
        // fails after creating it (its error path does not close backend_fd);
        // nothing else may be left. A timerfd is never the loop's (libuv times
        // with epoll_wait): libdispatch opens one for this process when it
        // first needs a timer, which a background job of an earlier test
        // (Foundation's Process) may do while this test runs.
        let left = Set(openDescriptors()).subtracting(before).map(target)
        XCTAssertEqual(left.filter { $0 != "anon_inode:[eventpoll]" && $0 != "anon_inode:[timerfd]" }, [], "descriptors leaked")
        try EventLoop().close()
    }

    func testInboxRunsJobsFromOtherThreadsOnTheLoopThread() throws {
        let counter = Locked(0)
        let loopThreadID = Locked<UInt>(0)
        let wrongThread = Locked(false)
        let stopper = OneShot<LoopBound<LoopTimer>>()
        let thread = try LoopThread.start { loop in
            loopThreadID.withLock { $0 = UInt(bitPattern: Int(pthread_self())) }
            let keepAlive = try LoopTimer(loop: loop)
            keepAlive.start(after: 60_000) {}
            stopper.fulfil(LoopBound(keepAlive))
        }
        let senders = (0..<4).map { _ in
            Thread {
                for _ in 0..<250 {
                    thread.inbox.send {
                        if UInt(bitPattern: Int(pthread_self())) != loopThreadID.current { wrongThread.withLock { $0 = true } }
                        counter.withLock { $0 += 1 }
                    }
                }
            }
        }
        senders.forEach { $0.start() }
        while senders.contains(where: { !$0.isFinished }) { usleep(1000) }
        let total: Int? = thread.inbox.sendAndWait { counter.current }
        XCTAssertEqual(total, 1000, "every job ran exactly once")
        XCTAssertFalse(wrongThread.current)
        let timer = try XCTUnwrap(stopper.wait())
        thread.inbox.send { timer.value.close() }
        XCTAssertEqual(thread.join(), 0)
        XCTAssertFalse(thread.inbox.send {}, "a closed loop refuses jobs")
    }

    func testOffloadRunsWorkOffTheLoopAndCompletesOnIt() throws {
        let (result, leftOpen) = try runOnLoop { (loop: EventLoop, finish: @escaping @Sendable ([Bool]) -> Void) in
            let loopThread = pthread_self()
            let workThread = Locked<pthread_t?>(nil)
            loop.offload(
                {
                    usleep(20_000)  // blocking work must not block the loop
                    workThread.withLock { $0 = pthread_self() }
                },
                then: {
                    let onLoop = pthread_equal(pthread_self(), loopThread) != 0
                    let offLoop = pthread_equal(workThread.current!, loopThread) == 0
                    finish([onLoop, offLoop])
                })
        }
        XCTAssertEqual(result, [true, true])
        XCTAssertEqual(leftOpen, 0)
    }

    func testSignalsAreDeliveredOnTheLoop() throws {
        let (got, leftOpen) = try runOnLoop { (loop: EventLoop, finish: @escaping @Sendable ([Int32]) -> Void) in
            var received: [Int32] = []
            var watchers: [SignalWatcher] = []
            let keep = try LoopTimer(loop: loop)
            keep.start(after: 10_000) {}
            func done() {
                watchers.forEach { $0.close() }
                keep.close()
                finish(received)
            }
            watchers.append(
                try SignalWatcher(loop: loop, signal: SIGHUP) { sig in
                    received.append(sig)
                    kill(getpid(), SIGUSR2)
                })
            watchers.append(
                try SignalWatcher(loop: loop, signal: SIGUSR2) { sig in
                    received.append(sig)
                    done()
                })
            kill(getpid(), SIGHUP)
        }
        XCTAssertEqual(got, [SIGHUP, SIGUSR2])
        XCTAssertEqual(leftOpen, 0)
    }

    func testTCPEchoOverIPv4AndIPv6WithPortZero() throws {
        for host in ["127.0.0.1", "::1"] {
            let (echoed, leftOpen) = try runOnLoop { (loop: EventLoop, finish: @escaping @Sendable (String) -> Void) in
                var serverSide: TCPStream?
                let listener = try TCPListener(loop: loop, address: SocketAddress(host: host, port: 0)) { stream in
                    serverSide = stream
                    stream.startReading { event in
                        if case .data(let bytes) = event { stream.write(bytes) }
                        if case .endOfStream = event { stream.close() }
                    }
                }
                XCTAssertNotEqual(listener.port, 0, "port 0 reports the real port")
                TCPStream.connect(loop: loop, to: listener.address) { result in
                    guard case .success(let client) = result else { XCTFail("connect: \(result)"); return }
                    var got: [UInt8] = []
                    client.startReading { event in
                        guard case .data(let bytes) = event else { return }
                        got.append(contentsOf: bytes)
                        if got.count == 11 {
                            let peer = client.peerAddress?.host ?? "?"
                            client.close()
                            listener.close()
                            serverSide?.close()
                            finish(String(decoding: got, as: UTF8.self) + " from \(peer)")
                        }
                    }
                    client.write(Array("hello ".utf8))
                    client.write(Array("world".utf8))
                }
            }
            XCTAssertEqual(echoed, "hello world from \(host)")
            XCTAssertEqual(leftOpen, 0)
        }
    }

    func testConnectToAClosedPortFails() throws {
        let (error, leftOpen) = try runOnLoop { (loop: EventLoop, finish: @escaping @Sendable (String) -> Void) in
            // Bind a port, learn it, close it: nothing listens there any more.
            let probe = try TCPListener(loop: loop, address: SocketAddress(host: "127.0.0.1", port: 0)) { $0.close() }
            let address = probe.address
            probe.close {
                TCPStream.connect(loop: loop, to: address) { result in
                    if case .failure(let e) = result { finish(e.name) } else { finish("connected") }
                }
            }
        }
        XCTAssertEqual(error, "ECONNREFUSED")
        XCTAssertEqual(leftOpen, 0)
    }

    func testAddressParsing() {
        XCTAssertEqual(SocketAddress("127.0.0.1:8443")?.port, 8443)
        XCTAssertEqual(SocketAddress("[::1]:80")?.host, "::1")
        XCTAssertEqual(SocketAddress("localhost:0")?.host, "127.0.0.1")
        XCTAssertNil(SocketAddress("127.0.0.1"))
        XCTAssertNil(SocketAddress("127.0.0.1:99999"))
        XCTAssertNil(SocketAddress("not-an-ip:80"))
        XCTAssertNil(SocketAddress("[::1:80"))
    }
}
