import EdgeLoop
import EdgeStore

/// Keeps a store's trail bounded (`sweepTrail`: hops past the retention,
/// of resources that changed no more or were deleted, and their trace
/// index entries): a step of a few thousand keys of each table a second
/// through the group-commit writer; after a whole pass the next starts a
/// minute later (an idle process does not commit every second). The
/// broker runs one, and an agent with local targets. Threading: loop-confined.
package final class TrailSweeper {
    private let store: any DeliveryTables
    private let writer: GroupCommitWriter
    private let loop: EventLoop
    private var timer: LoopTimer?
    private var cursors: (trail: [UInt8]?, traces: [UInt8]?) = (nil, nil)
    private var sweeping = false
    private var nextPass: UInt64 = 0

    /// `ownTimer` false: the caller calls `step()` every second (the broker's timer does more).
    package init(store: any DeliveryTables, writer: GroupCommitWriter, loop: EventLoop, ownTimer: Bool = true) throws {
        self.store = store
        self.writer = writer
        self.loop = loop
        guard ownTimer else { return }
        let t = try LoopTimer(loop: loop)
        t.keepsLoopAlive = false
        timer = t
    }

    package func start() {
        timer?.start(after: 1000, repeatEvery: 1000) { [weak self] in self?.step() }
    }

    package func stop() {
        timer?.close()
        timer = nil
    }

    /// One step of the sweep (at most one under way).
    package func step() {
        guard !sweeping, loop.now >= nextPass else { return }
        sweeping = true
        let store = self.store, cursors = self.cursors
        writer.submit({ txn in try store.sweepTrail(trailFrom: cursors.trail, tracesFrom: cursors.traces, limit: 5000, txn) }) {
            [weak self] r in
            guard let self else { return }
            sweeping = false
            guard case .success(let next) = r else { return }
            self.cursors = (next.trail, next.traces)
            if next.trail == nil && next.traces == nil { nextPass = loop.now + 60_000 }
        }
    }
}
