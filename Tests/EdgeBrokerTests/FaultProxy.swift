import EdgeLoop
import EdgeTestSupport
import Foundation

/// A TCP proxy on its own loop that misbehaves on purpose, one fault per
/// connection, chosen by a seeded generator (reproducible):
/// pass, drop at accept, delay every chunk, reset after some bytes, or stall
/// (stop forwarding, close later). `healthy()` turns the faults off.
final class FaultProxy: @unchecked Sendable {  // state behind `faults`; loop objects stay on the loop thread
    enum Fault: CaseIterable { case pass, drop, delay, reset, stall }

    let port: Int
    private let thread: LoopThread
    private let listener: OneShot<LoopBound<TCPListener>>
    private let faultsOn = Locked(true)
    private let counts = Locked([String: Int]())

    init(upstreamPort: Int, seed: UInt64) throws {
        let ready = OneShot<LoopBound<TCPListener>>()
        let faultsOn = self.faultsOn, counts = self.counts
        thread = try LoopThread.start { loop in
            var rng = SplitMix(seed: seed)
            let listener = try TCPListener(loop: loop, address: SocketAddress(host: "127.0.0.1", port: 0)) { client in
                let faulty = faultsOn.current
                let fault: Fault = faulty ? Fault.allCases[Int(rng.next() % 5)] : .pass
                counts.withLock { $0["\(fault)", default: 0] += 1 }
                if fault == .drop { client.close(); return }
                // While faults are on, even a passing connection ends (after more bytes), so the relay keeps reconnecting.
                let budget =
                    fault == .pass
                    ? (faulty ? Int(rng.next() % 200_000) + 50_000 : Int.max)
                    : fault == .delay ? Int(rng.next() % 100_000) + 10_000 : Int(rng.next() % 20_000) + 200
                TCPStream.connect(loop: loop, to: SocketAddress(host: "127.0.0.1", port: upstreamPort)) { result in
                    guard case .success(let upstream) = result else { client.close(); return }
                    Pipe(loop: loop, a: client, b: upstream, fault: fault, budget: budget, delayMs: rng.next() % 40 + 1).start()
                }
            }
            ready.fulfil(LoopBound(listener))
        }
        listener = ready
        let l = ready.wait()!
        port = thread.inbox.sendAndWait { l.value.port } ?? 0
    }

    func healthy() { faultsOn.withLock { $0 = false } }
    var faultCounts: [String: Int] { counts.current }

    func stop() {
        let l = listener.wait()!
        thread.inbox.send { l.value.close() }
    }
}

/// Both directions of one proxied connection.
private final class Pipe {
    let loop: EventLoop
    let a: TCPStream, b: TCPStream
    let fault: FaultProxy.Fault
    var budget: Int
    let delayMs: UInt64
    var closed = false
    var timers: [LoopTimer] = []

    init(loop: EventLoop, a: TCPStream, b: TCPStream, fault: FaultProxy.Fault, budget: Int, delayMs: UInt64) {
        self.loop = loop
        self.a = a
        self.b = b
        self.fault = fault
        self.budget = budget
        self.delayMs = delayMs
    }

    func start() {
        forward(from: a, to: b)
        forward(from: b, to: a)
    }

    func forward(from src: TCPStream, to dst: TCPStream) {
        src.startReading { [self] event in
            guard !closed else { return }
            guard case .data(let bytes) = event else { close(); return }
            let chunk = Array(bytes)
            switch fault {
            case .pass, .drop:
                budget -= min(chunk.count, budget)
                if budget == 0 { close(); return }
                dst.write(chunk)
            case .delay:
                budget -= chunk.count
                if budget < 0 { close(); return }
                guard let t = try? LoopTimer(loop: loop) else { close(); return }
                timers.append(t)
                t.start(after: delayMs) { [self] in
                    if !closed { dst.write(chunk) }
                    t.close()
                    timers.removeAll { $0 === t }
                }
            case .reset:
                budget -= chunk.count
                if budget < 0 { close(); return }
                dst.write(chunk)
            case .stall:
                budget -= chunk.count
                if budget < 0 {
                    // Stop forwarding in both directions; close a little later.
                    a.pauseReading()
                    b.pauseReading()
                    guard let t = try? LoopTimer(loop: loop) else { close(); return }
                    timers.append(t)
                    t.start(after: 1500) { [self] in
                        t.close(); timers.removeAll { $0 === t }; close()
                    }
                    return
                }
                dst.write(chunk)
            }
        }
    }

    func close() {
        guard !closed else { return }
        closed = true
        a.close()
        b.close()
        for t in timers { t.close() }
        timers.removeAll()
    }
}
