import EdgeLoop
import EdgeStore
import SCIM

/// A removal the deletion guard holds back: in a paused target's queue,
/// queued after the last confirmation (`TargetWorker.removalAllowed` holds
/// exactly these).
public struct HeldRemoval: Sendable {
    public var target: String
    /// The queue sequence (`targets held` shows it as `#N`; `reject-deletes` takes it).
    public var seq: UInt64
    public var item: DeliveryItem
    /// userName (users) or displayName (groups), from the broker's data: what
    /// the removal kept, else the directory, else the body last sent to the
    /// target. Nil when none of them knows.
    public var name: String?
    public var domain: String?
    /// Unix ms: the later of its queueing and the guard's trip.
    public var heldSince: Int64
    package let key: [UInt8]

    public var nameAttribute: String { item.type == "User" ? "userName" : "displayName" }

    public var json: JSON {
        var o: JSONObject = [
            "target": .string(target), "seq": .number(JSONNumber(integer: Int64(seq))), "id": .string(item.brokerID),
            "type": .string(item.type), "op": .string(item.operation.rawValue), "trace": .string(item.trace),
            "queuedAt": .number(JSONNumber(integer: item.queuedAt)), "heldSince": .number(JSONNumber(integer: heldSince)),
        ]
        if item.acceptedAt > 0 { o["acceptedAt"] = .number(JSONNumber(integer: item.acceptedAt)) }
        o[nameAttribute] = name.map(JSON.string) ?? .null
        o["domain"] = domain.map(JSON.string) ?? .null
        return .object(o)
    }
}

/// What `rejectHeldRemovals` did.
public struct RejectedRemovals: Sendable {
    public var rejected: [HeldRemoval] = []
    /// Removals the guard still holds after the rejection.
    public var stillHeld = 0
    /// Nothing is held any more: the pause is lifted and the guard counts anew.
    public var resumed = false
}

public enum DeletionGuardError: Error, CustomStringConvertible, Equatable {
    /// `reject-deletes` named queue sequences the guard does not hold (nothing was changed).
    case notHeld(target: String, seqs: [UInt64], held: [UInt64])
    /// The console confirmed or rejected what it showed, and more is held now (nothing was changed).
    case moreHeld(target: String, through: UInt64, more: Int)
    /// The console confirmed, and the guard holds nothing (nothing was changed).
    case nothingHeld(target: String)

    public var description: String {
        switch self {
        case .notHeld(let target, let seqs, let held):
            let which = seqs.map { "#\($0)" }.joined(separator: ", ")
            let now =
                held.isEmpty
                ? "the guard holds nothing for \(target)"
                : "held for \(target): " + held.map { "#\($0)" }.joined(separator: ", ")
            return "\(which) \(seqs.count == 1 ? "is" : "are") not held by the deletion guard (\(now)); nothing was rejected"
        case .moreHeld(let target, let through, let more):
            return
                "\(more) more \(more == 1 ? "removal is" : "removals are") held for \(target) after #\(through), the last one shown: look at the list again (nothing was changed)"
        case .nothingHeld(let target):
            return "the deletion guard holds nothing for \(target): there is nothing to confirm"
        }
    }
}

/// A walk of a paused target's queue for the removals the deletion guard
/// holds: how many it found, the first ones (with their names), and whether
/// it read the whole queue.
public struct HeldScan: Sendable {
    public var pausedSince: Int64?
    /// The first held removals found (at most the walk's `listed`), in queue order.
    public var removals: [HeldRemoval] = []
    /// Held removals found (all of them when `complete`, else at least these).
    public var total = 0
    /// The highest queue sequence of a held removal found (0: none).
    public var lastSeq: UInt64 = 0
    /// Queue entries read.
    public var scanned = 0
    /// The whole queue was read (false: the walk stopped at its budget).
    public var complete = true

    package init(pausedSince: Int64? = nil, total: Int = 0, scanned: Int = 0) {
        (self.pausedSince, self.total, self.scanned) = (pausedSince, total, scanned)
    }
}

package extension DeliveryTables {
    /// The removals the deletion guard holds for `target`, in queue order,
    /// and since when the target is paused (nil: not paused, nothing held).
    func heldRemovals(target: String) throws -> (pausedSince: Int64?, removals: [HeldRemoval]) {
        try environment.read { txn in try heldRemovals(target: target, txn) }
    }

    func heldRemovals(target: String, _ txn: borrowing some StoreReading & ~Copyable) throws
        -> (pausedSince: Int64?, removals: [HeldRemoval])
    {
        let scan = try scanHeld(target: target, txn)
        return (scan.pausedSince, scan.removals)
    }

    /// The console's walk: at most `budget` queue entries read, the first
    /// `listed` held removals named.
    func scanHeld(target: String, listed: Int = .max, budget: Int = .max) throws -> HeldScan {
        try environment.read { txn in try scanHeld(target: target, listed: listed, budget: budget, txn) }
    }

    /// Walks `target`'s queue (after `after`, a queue sequence) for held
    /// removals (`matching` them, when given): reads at most `budget`
    /// entries, keeps and names the first `listed`.
    func scanHeld(
        target: String, listed: Int = .max, budget: Int = .max, after: UInt64 = 0,
        matching: ((DeliveryItem) -> Bool)? = nil, _ txn: borrowing some StoreReading & ~Copyable
    ) throws -> HeldScan {
        let g = try deletionGuard(target: target, txn)
        var scan = HeldScan(pausedSince: g.pausedSince)
        guard let pausedSince = g.pausedSince else { return scan }
        var items: [([UInt8], DeliveryItem)] = []
        try txn.scan(fanout, from: prefixed(target, (after + 1).bigEndianBytes), to: prefixEnd(target)) { k, v in
            guard scan.scanned < budget else {
                scan.complete = false
                return false
            }
            scan.scanned += 1
            // A removal queued up to the confirmation passes the guard (see `TargetWorker.removalAllowed`).
            if let item = DeliveryItem(v), item.operation != .upsert, item.queuedAt > g.confirmedAt, matching?(item) ?? true {
                scan.total += 1
                scan.lastSeq = UInt64(bigEndianBytes: Array(k.suffix(8))) ?? scan.lastSeq
                if items.count < listed { items.append((k, item)) }
            }
            return true
        }
        for (key, item) in items {
            guard let seq = UInt64(bigEndianBytes: Array(key.suffix(8))) else { continue }
            var held = HeldRemoval(
                target: target, seq: seq, item: item, name: item.name, domain: item.domain,
                heldSince: max(item.queuedAt, pausedSince), key: key)
            if held.name == nil || held.domain == nil, let entry = try deliveryEntry(item.brokerID, members: false, txn) {
                // Out of the routes rather than deleted (or queued before removals kept the name): the directory knows.
                if held.domain == nil { held.domain = entry.domain }
                if held.name == nil { held.name = entry.resource[held.nameAttribute]?.stringValue }
            }
            if held.name == nil, let m = try txn.get(targetIds, prefixed(target, item.brokerID)).flatMap(TargetMapping.init) {
                held.name = m.sent?[held.nameAttribute]?.stringValue
            }
            scan.removals.append(held)
        }
        return scan
    }

    /// Held removals, of every paused target, of the broker id or trace id
    /// `idOrTrace` (for `trace`): each target's queue read up to `budget`
    /// entries (`complete` false: one was not read to its end).
    func heldRemovals(matching idOrTrace: String, budget: Int = .max, _ txn: borrowing some StoreReading & ~Copyable) throws
        -> (removals: [HeldRemoval], complete: Bool)
    {
        var paused: [String] = []
        try txn.scan(targetState, from: Array("guard/".utf8), to: Array("guard0".utf8)) { k, v in
            if (try JSONParser.parse(v, limits: .stored))["pausedSince"]?.numberValue != nil {
                paused.append(String(decoding: k.dropFirst(6), as: UTF8.self))
            }
            return true
        }
        var out: [HeldRemoval] = []
        var complete = true
        for target in paused {
            let scan = try scanHeld(
                target: target, listed: 1_000, budget: budget, matching: { $0.brokerID == idOrTrace || $0.trace == idOrTrace }, txn)
            out += scan.removals
            complete = complete && scan.complete && scan.total == scan.removals.count
        }
        return (out, complete)
    }

    /// `confirm-deletes` from the console: releases the removals held back
    /// only when none is held beyond queue sequence `through` (the highest
    /// the operator was shown), and only when the guard holds any: throws
    /// `DeletionGuardError` otherwise, changing nothing. The queue after
    /// `through` is read first in a read transaction; the write transaction
    /// reads only what was queued after that.
    func confirmDeletes(target: String, through: UInt64) throws {
        var after = through
        for write in [false, true] {
            func check(_ txn: borrowing some StoreReading & ~Copyable) throws -> UInt64 {
                guard try deletionGuard(target: target, txn).pausedSince != nil else {
                    throw DeletionGuardError.nothingHeld(target: target)
                }
                let newer = try scanHeld(target: target, listed: 0, after: after, txn)
                guard newer.total == 0 else { throw DeletionGuardError.moreHeld(target: target, through: through, more: newer.total) }
                var last = after
                try txn.scanKeys(fanout, from: prefixed(target, []), to: prefixEnd(target), reverse: true) { k in
                    last = max(last, UInt64(bigEndianBytes: Array(k.suffix(8))) ?? last)
                    return false
                }
                return last
            }
            if write {
                try environment.write { txn in
                    _ = try check(txn)
                    try setDeletionGuard(target: target, pausedSince: nil, confirmedAt: unixMilliseconds(), txn)
                }
            } else {
                after = try environment.read { txn in try check(txn) }
            }
        }
    }

    /// `scim-broker targets reject-deletes NAME [SEQ…]`: drops held removals
    /// (`seqs` nil: all) from the target's queue, records a hop for each in
    /// the trail, and lifts the pause when nothing stays held, all in one
    /// transaction. Marks the guard (`rejectedAt`) so that a running worker
    /// forgets the copies it loaded. Throws, changing nothing, when a given
    /// sequence is not held.
    /// With `through` (the console's "reject them all"), throws when a
    /// removal beyond that queue sequence is held: the operator saw less.
    func rejectHeldRemovals(target: String, seqs: [UInt64]?, through: UInt64? = nil) throws -> RejectedRemovals {
        try environment.write { txn in
            let (pausedSince, held) = try heldRemovals(target: target, txn)
            var result = RejectedRemovals()
            if let through {
                let more = held.filter { $0.seq > through }.count
                if more > 0 { throw DeletionGuardError.moreHeld(target: target, through: through, more: more) }
            }
            if let seqs {
                let unknown = Set(seqs).subtracting(held.map(\.seq)).sorted()
                guard unknown.isEmpty else { throw DeletionGuardError.notHeld(target: target, seqs: unknown, held: held.map(\.seq)) }
                result.rejected = held.filter { seqs.contains($0.seq) }
            } else {
                result.rejected = held
            }
            guard let pausedSince, !result.rejected.isEmpty else { return result }
            let now = unixMicroseconds()
            for (i, h) in result.rejected.enumerated() {
                _ = try txn.delete(fanout, h.key)
                var hop: JSONObject = [
                    "hop": .string("target \(target)"), "event": .string(h.item.operation.rawValue),
                    "detail": "rejected by the operator: the deletion guard held it",
                    "applied": .number(JSONNumber(integer: h.item.queuedAt)),
                ]
                if h.item.acceptedAt > 0 { hop["accepted"] = .number(JSONNumber(integer: h.item.acceptedAt)) }
                // One µs apart: two removals of one resource get a hop each (the time is in the key).
                try recordHop(brokerID: h.item.brokerID, trace: h.item.trace, hop, txn, now: now + Int64(i))
            }
            result.stillHeld = held.count - result.rejected.count
            result.resumed = result.stillHeld == 0
            let g = try deletionGuard(target: target, txn)
            // The confirmation time stays: rejecting confirms nothing. Removals
            // queued from now on are counted by the guard afresh.
            try setDeletionGuard(
                target: target, pausedSince: result.resumed ? nil : pausedSince, confirmedAt: g.confirmedAt,
                rejectedAt: max(now / 1000, g.rejectedAt + 1), txn)
            return result
        }
    }

    /// Which of `keys` (a target's queue keys) are no longer queued.
    func missingQueueKeys(_ keys: [[UInt8]]) throws -> Set<[UInt8]> {
        try environment.read { txn in
            var gone: Set<[UInt8]> = []
            for k in keys where try txn.get(fanout, k) == nil { gone.insert(k) }
            return gone
        }
    }

    /// Targets the store holds anything for: a queue, account mappings, dead
    /// letters, a status, a deletion guard or counters (sorted).
    func storedTargetNames() throws -> [String] {
        try environment.read { txn in
            var names: Set<String> = []
            for db in [fanout, targetIds, targetDead] {
                // One seek per target: the keys are `<target> 0x00 …`.
                var from: [UInt8]? = nil
                while true {
                    var next: String?
                    try txn.scan(db, from: from) { k, _ in
                        next = String(decoding: k.prefix { $0 != 0 }, as: UTF8.self)
                        return false
                    }
                    guard let name = next else { break }
                    names.insert(name)
                    from = prefixEnd(name)
                }
            }
            try txn.scan(targetState) { k, _ in
                let key = String(decoding: k, as: UTF8.self)
                if let slash = key.firstIndex(of: "/") { names.insert(String(key[key.index(after: slash)...])) }
                return true
            }
            return names.sorted()
        }
    }
}
