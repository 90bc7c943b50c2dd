import EdgeLoop
import EdgeStore
import EdgeTestSupport
import Foundation
import XCTest

final class StoreTests: XCTestCase {
    var dir: TempDirectory!
    override func setUp() { dir = TempDirectory("edge-store") }
    override func tearDown() { dir.remove() }

    func key(_ s: String) -> [UInt8] { Array(s.utf8) }

    func testCommitIsVisibleAndAbortIsNot() throws {
        let env = try Environment(EnvironmentOptions(path: dir.file("db")))
        let db = try env.openDatabase("things")
        try env.write { txn in try txn.put(db, key("a"), [1, 2, 3]) }
        do {
            let txn = try env.beginWrite()
            try txn.put(db, key("b"), [9])
            XCTAssertEqual(try txn.get(db, key("b")), [9], "a transaction sees its own writes")
            txn.abort()
        }
        let snapshot = try env.beginRead()
        XCTAssertEqual(try snapshot.get(db, key("a")), [1, 2, 3])
        XCTAssertNil(try snapshot.get(db, key("b")), "aborted write must not be visible")
        XCTAssertEqual(try snapshot.count(db), 1)
    }

    func testReadSnapshotIgnoresLaterCommits() throws {
        let env = try Environment(EnvironmentOptions(path: dir.file("db")))
        let db = try env.openDatabase("things")
        try env.write { txn in try txn.put(db, key("k"), [1]) }
        let snapshot = try env.beginRead()
        // A writer on another thread commits while the snapshot is open.
        let t = Thread { try? env.write { txn in try txn.put(db, Array("k".utf8), [2]) } }
        t.start()
        while !t.isFinished { usleep(1000) }
        XCTAssertEqual(try snapshot.get(db, key("k")), [1])
        _ = consume snapshot
        XCTAssertEqual(try env.read { try $0.get(db, key("k")) }, [2])
    }

    func testTypedErrorsAndNoOverwrite() throws {
        let env = try Environment(EnvironmentOptions(path: dir.file("db")))
        let db = try env.openDatabase("unique")
        try env.write { txn in try txn.put(db, key("x"), [1], flags: .noOverwrite) }
        XCTAssertThrowsError(try env.write { txn in try txn.put(db, key("x"), [2], flags: .noOverwrite) }) { error in
            XCTAssertEqual(error as? StoreError, .keyExists)
        }
        XCTAssertThrowsError(try env.write { txn in try txn.put(db, [], [2]) }) { error in
            XCTAssertEqual(error as? StoreError, .badValueSize, "empty keys are refused by LMDB")
        }
        XCTAssertEqual(try env.read { try $0.get(db, key("x")) }, [1])
    }

    func testBigEndianKeysIterateInNumericOrderWithRanges() throws {
        let env = try Environment(EnvironmentOptions(path: dir.file("db")))
        let outbox = try env.openDatabase("outbox")
        let numbers: [UInt64] = [300, 1, 70000, 2, 256, 65535, 1 << 40]
        try env.write { txn in for n in numbers { try txn.put(outbox, n.bigEndianBytes, Array("\(n)".utf8)) } }
        var seen: [UInt64] = []
        try env.read { txn in
            try txn.scan(outbox) { k, _ in
                seen.append(UInt64(bigEndianBytes: k)!); return true
            }
        }
        XCTAssertEqual(seen, numbers.sorted())
        var range: [UInt64] = []
        try env.read { txn in
            try txn.scan(outbox, from: UInt64(2).bigEndianBytes, to: UInt64(65535).bigEndianBytes) { k, v in
                XCTAssertEqual(String(decoding: v, as: UTF8.self), "\(UInt64(bigEndianBytes: k)!)")
                range.append(UInt64(bigEndianBytes: k)!)
                return true
            }
        }
        XCTAssertEqual(range, [2, 256, 300], "from is inclusive, to is exclusive")
        var reversed: [UInt64] = []
        try env.read { txn in
            try txn.scan(outbox, to: UInt64(70000).bigEndianBytes, reverse: true) { k, _ in
                reversed.append(UInt64(bigEndianBytes: k)!)
                return reversed.count < 3
            }
        }
        XCTAssertEqual(reversed, [65535, 300, 256])
        XCTAssertEqual(UInt64(bigEndianBytes: [0, 1]), nil, "wrong length is refused")
    }

    func testNestedTransactionRollsBackOnlyItself() throws {
        let env = try Environment(EnvironmentOptions(path: dir.file("db")))
        let db = try env.openDatabase("n")
        struct Boom: Error {}
        try env.write { txn in
            try txn.put(db, key("outer"), [1])
            XCTAssertThrowsError(
                try txn.nested { sub in
                    try sub.put(db, self.key("inner"), [2])
                    throw Boom()
                })
            try txn.nested { sub in try sub.put(db, self.key("kept"), [3]) }
        }
        try env.read { txn in
            XCTAssertEqual(try txn.get(db, key("outer")), [1])
            XCTAssertNil(try txn.get(db, key("inner")))
            XCTAssertEqual(try txn.get(db, key("kept")), [3])
        }
    }

    func testMapGrowsThenReportsStoreFullAtTheCap() throws {
        var options = EnvironmentOptions(path: dir.file("db"))
        options.mapSize = 1 << 20
        options.maxMapSize = 4 << 20
        let env = try Environment(options)
        let db = try env.openDatabase("big")
        let value = [UInt8](repeating: 7, count: 4096)
        var stored = 0
        var lastError: Error?
        for i in 0..<4000 {
            do {
                try env.write { txn in try txn.put(db, UInt32(i).bigEndianBytes, value) }
                stored += 1
            } catch {
                lastError = error
                break
            }
        }
        XCTAssertGreaterThan(env.info.mapSize, 1 << 20, "the map grew past its initial size")
        XCTAssertEqual(env.info.mapSize, 4 << 20, "the map stopped at its cap")
        XCTAssertEqual(lastError as? StoreError, .storeFull(limitBytes: 4 << 20))
        XCTAssertGreaterThan(stored, 256, "the initial 1 MiB map alone holds fewer than 256 such values")
        // Everything written before the error is intact, and reads still work.
        XCTAssertEqual(try env.count(db), stored)
        // A reopened environment adopts the grown map.
        let reopened = try Environment(EnvironmentOptions(path: dir.file("db")))
        XCTAssertEqual(reopened.info.mapSize, 4 << 20)
    }

    func testGroupCommitBatchesAndIsolatesAFailingWrite() throws {
        let path = dir.file("db")
        struct Refused: Error {}
        let (results, leftOpen) = try runOnLoop { (loop: EventLoop, finish: @escaping @Sendable ([String]) -> Void) in
            let env = try Environment(EnvironmentOptions(path: path))
            let db = try env.openDatabase("g")
            let writer = GroupCommitWriter(environment: env, inbox: loop.inbox)
            var outcomes: [String] = Array(repeating: "", count: 40)
            var remaining = 40
            // A slow first write holds the writer thread while the others queue.
            writer.submit({ _ in
                usleep(50_000); return -1
            }) { _ in }
            while writer.statistics.batches == 0 { usleep(100) }
            for i in 0..<40 {
                writer.submit({ txn in
                    try txn.put(db, UInt32(i).bigEndianBytes, [UInt8(i)])
                    // After its own put: that put must be undone. Six failures in
                    // one batch exercise both the optimistic retry and the nested fallback.
                    if [3, 5, 7, 9, 11, 17].contains(i) { throw Refused() }
                    return i
                }) { result in
                    switch result {
                    case .success(let v): outcomes[i] = "ok \(v)"
                    case .failure(let e): outcomes[i] = e is Refused ? "refused" : "error \(e)"
                    }
                    remaining -= 1
                    if remaining == 0 {
                        let stats = writer.statistics
                        outcomes.append("batches \(stats.batches) largest \(stats.largestBatch) failed \(stats.failedWrites)")
                        finish(outcomes)
                    }
                }
            }
        }
        XCTAssertEqual(leftOpen, 0, "loop closed with handles open")
        let outcomes = try XCTUnwrap(results)
        let refused: Set = [3, 5, 7, 9, 11, 17]
        for i in 0..<40 { XCTAssertEqual(outcomes[i], refused.contains(i) ? "refused" : "ok \(i)") }
        let stats = outcomes[40]
        // The slow write's batch ends after the other 40 were queued: they share one batch.
        XCTAssertTrue(stats.hasPrefix("batches 2 largest 40 failed 6"), stats)
        let env = try Environment(EnvironmentOptions(path: path))
        let db = try env.openDatabase("g")
        XCTAssertEqual(try env.count(db), 34)
        for i in refused {
            XCTAssertNil(try env.read { try $0.get(db, UInt32(i).bigEndianBytes) }, "failing write \(i) left nothing")
        }
        XCTAssertEqual(try env.read { try $0.get(db, UInt32(39).bigEndianBytes) }, [39])
    }

    /// A batch takes writes up to `maxWeight` of their weights (a heavier
    /// write alone): ten writes of weight 4 waiting together, with a budget
    /// of 10, commit in batches of two, in order.
    func testGroupCommitBoundsABatchByTheWeightOfItsWrites() throws {
        let path = dir.file("db")
        let (results, leftOpen) = try runOnLoop { (loop: EventLoop, finish: @escaping @Sendable ([String]) -> Void) in
            let env = try Environment(EnvironmentOptions(path: path))
            let db = try env.openDatabase("g")
            let writer = GroupCommitWriter(environment: env, maxWeight: 10, inbox: loop.inbox)
            var order: [String] = []
            writer.submit({ _ in
                usleep(50_000); return -1
            }) { _ in }
            while writer.statistics.batches == 0 { usleep(100) }
            let weights = [4, 4, 4, 4, 4, 4, 4, 4, 25, 1]
            for (i, w) in weights.enumerated() {
                writer.submit(
                    { txn in
                        try txn.put(db, UInt32(i).bigEndianBytes, [UInt8(i)])
                        return i
                    }, weight: w
                ) { result in
                    order.append((try? result.get()).map(String.init) ?? "failed")
                    if order.count == weights.count {
                        let stats = writer.statistics
                        order.append("batches \(stats.batches) largest \(stats.largestBatch)")
                        finish(order)
                    }
                }
            }
        }
        XCTAssertEqual(leftOpen, 0)
        let order = try XCTUnwrap(results)
        XCTAssertEqual(Array(order.prefix(10)), (0..<10).map(String.init), "in order, none failed")
        // The slow write, then 4+4 four times, 25 alone (over the budget), 1.
        XCTAssertEqual(order.last, "batches 7 largest 2")
    }

    func testGroupCommitReportsStoreFullToTheWriteThatOverflows() throws {
        let path = dir.file("db")
        let (outcome, leftOpen) = try runOnLoop { (loop: EventLoop, finish: @escaping @Sendable ([String]) -> Void) in
            var options = EnvironmentOptions(path: path)
            options.mapSize = 1 << 20
            options.maxMapSize = 2 << 20
            let env = try Environment(options)
            let db = try env.openDatabase("g")
            let writer = GroupCommitWriter(environment: env, inbox: loop.inbox)
            var outcomes: [String] = []
            let small = [UInt8](repeating: 1, count: 100)
            let huge = [UInt8](repeating: 2, count: 3 << 20)
            writer.submit({ txn in try txn.put(db, [1], small) }) { r in outcomes.append("small1 \(r)") }
            writer.submit({ txn in try txn.put(db, [2], huge) }) { r in outcomes.append("huge \(r)") }
            writer.submit({ txn in try txn.put(db, [3], small) }) { r in
                outcomes.append("small3 \(r)")
                finish(outcomes)
            }
        }
        XCTAssertEqual(leftOpen, 0)
        let o = try XCTUnwrap(outcome)
        XCTAssertEqual(o.count, 3)
        XCTAssertTrue(o[0].hasPrefix("small1 success"), o[0])
        XCTAssertTrue(o[1].hasPrefix("huge failure(store full"), o[1])
        XCTAssertTrue(o[2].hasPrefix("small3 success"), o[2])
    }

    /// A writer process is SIGKILLed mid-load; everything it reported as
    /// committed is there after reopening, and the data is consistent.
    func testCrashConsistencyAfterSIGKILL() throws {
        for mode in [[], ["--group"]] {
            let path = dir.file("crash\(mode.count)")
            let fixture = productsDirectory + "/edge-fixture"
            XCTAssertTrue(FileManager.default.isExecutableFile(atPath: fixture), "build edge-fixture first: \(fixture)")
            let process = Process()
            process.executableURL = URL(fileURLWithPath: fixture)
            process.arguments = ["lmdb-writer", path] + mode
            let pipe = Pipe()
            process.standardOutput = pipe
            try process.run()
            var lastReported: UInt64 = 0
            var buffer = ""
            let handle = pipe.fileHandleForReading
            let deadline = Date().addingTimeInterval(60)
            while lastReported < 300 && Date() < deadline {
                let chunk = handle.availableData
                if chunk.isEmpty { break }
                buffer += String(decoding: chunk, as: UTF8.self)
                let lines = buffer.split(separator: "\n", omittingEmptySubsequences: false)
                buffer = String(lines.last ?? "")
                for line in lines.dropLast() where line.hasPrefix("committed ") {
                    lastReported = max(lastReported, UInt64(line.dropFirst(10)) ?? 0)
                }
            }
            kill(process.processIdentifier, SIGKILL)
            process.waitUntilExit()
            XCTAssertEqual(process.terminationReason, .uncaughtSignal)
            XCTAssertGreaterThanOrEqual(lastReported, 300, "writer made progress before the kill")

            let env = try Environment(EnvironmentOptions(path: path))
            let data = try env.openDatabase("data")
            let meta = try env.openDatabase("meta")
            try env.read { txn in
                let counter = try XCTUnwrap(txn.get(meta, Array("counter".utf8)).flatMap(UInt64.init(bigEndianBytes:)))
                XCTAssertGreaterThanOrEqual(counter, lastReported, "a reported commit was lost (\(mode))")
                var expected: UInt64 = 1
                try txn.scan(data) { k, v in
                    let n = UInt64(bigEndianBytes: k)!
                    XCTAssertEqual(n, expected, "records are contiguous")
                    XCTAssertEqual(v, (0..<1024).map { UInt8(truncatingIfNeeded: n &* 31 &+ UInt64($0)) }, "record \(n) intact")
                    expected += 1
                    return true
                }
                XCTAssertEqual(expected - 1, counter, "data and counter were committed together")
            }
        }
    }

    /// An open that fails after `mdb_env_create` (here in `mkdir` and in
    /// `mdb_env_open`; the tests run as root, so no permission bits would
    /// stop it) throws its error and frees the environment once: a second
    /// free would abort the process. A good open afterwards still works.
    func testAnOpenThatFailsAfterCreatingTheEnvironmentFreesItOnce() throws {
        let file = dir.write("plain-file", "not a directory\n")
        for _ in 0..<3 {
            // The data directory is a regular file: mkdir says EEXIST, mdb_env_open ENOTDIR.
            XCTAssertThrowsError(try Environment(EnvironmentOptions(path: file))) { error in
                XCTAssertEqual(error as? StoreError, .system(ENOTDIR))
            }
            // Its parent is a regular file: mkdir fails with ENOTDIR.
            XCTAssertThrowsError(try Environment(EnvironmentOptions(path: file + "/db"))) { error in
                XCTAssertEqual(error as? StoreError, .system(ENOTDIR))
            }
        }
        let env = try Environment(EnvironmentOptions(path: dir.file("db")))
        let db = try env.openDatabase("things")
        try env.write { txn in try txn.put(db, key("k"), [1]) }
        XCTAssertEqual(try env.read { try $0.get(db, key("k")) }, [1])
    }

    func testStaleReaderSlotsAreClearedAtOpen() throws {
        // Process A holds a read transaction and is SIGKILLed while process B
        // keeps the file open (so LMDB does not reset its reader table): A's
        // slot stays behind until the next opener checks for stale readers.
        let path = dir.file("db")
        _ = try Environment(EnvironmentOptions(path: path)).openDatabase("x")
        func start(_ args: [String], expect: String) throws -> Process {
            let process = Process()
            process.executableURL = URL(fileURLWithPath: productsDirectory + "/edge-fixture")
            process.arguments = args
            let pipe = Pipe()
            process.standardOutput = pipe
            try process.run()
            let line = String(decoding: pipe.fileHandleForReading.availableData, as: UTF8.self)
            XCTAssertTrue(line.hasPrefix(expect), line)
            return process
        }
        let holder = try start(["lmdb-reader", path, "--idle"], expect: "open")
        defer { kill(holder.processIdentifier, SIGKILL); holder.waitUntilExit() }
        let reader = try start(["lmdb-reader", path], expect: "reading")
        kill(reader.processIdentifier, SIGKILL)
        reader.waitUntilExit()
        let env = try Environment(EnvironmentOptions(path: path))
        XCTAssertEqual(env.staleReadersCleared, 1, "the dead reader's slot was cleared at open")
        XCTAssertEqual(env.info.readersUsed, 1, "slots are reused, not freed: one slot was ever taken")
        let x = try env.openDatabase("x")
        try env.read { txn in XCTAssertEqual(try txn.count(x), 0) }
    }
}
