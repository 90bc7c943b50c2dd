import EdgeLoop
import EdgeStore
import SCIM

/// What the broker's trace learns of the local targets' answers to what
/// entered through the downlink (`inbound.reportApps`).
public enum AppOutcomeReporting: String, Sendable {
    /// Status, time and `scimType` under the target's name.
    case named
    /// The same, the target's name withheld.
    case anonymous
    /// Nothing.
    case none
}

/// The last hop of one trace (docs/protocol.md, "One trace across
/// boundaries"): a local target answered a change that entered through the
/// downlink. In the transaction that records the delivery, the agent keeps
/// a small record of the answer in a durable, bounded outbox (`meta`
/// `appOutcome/<seq BE>`), and a later poll carries it up (`appOutcomes`,
/// downlink protocol 3); the broker's 200 to that poll takes it, and the
/// agent drops it. What goes up is the resource's broker id (the broker's
/// own name for it), the trace id, the operation, the status, a `scimType`
/// at most, the time and (unless withheld) the target's name: never the
/// app's detail, nor anything about this boundary's own resources
/// (invariant 5). When the outbox is full (`maxAppOutcomes`, a broker away
/// for long) the newest answers are not kept, and counted: a trace then
/// ends at the boundary, and no change waits for it.
extension AgentStore {
    static let appOutcomePrefix = Array("appOutcome/".utf8)
    static let appOutcomeSeqKey = Array("appOutcomeSeq".utf8)
    static let appOutcomeCountKey = Array("appOutcomeCount".utf8)
    static let appOutcomeDroppedKey = Array("appOutcomeDropped".utf8)
    /// Answers kept for the broker at most.
    static let maxAppOutcomes: UInt64 = 10_000
    /// Answers one poll carries at most.
    public static let appOutcomesPerPoll = 500

    /// The delivery engine's hook (`DeliveryTables`): a foreign resource's
    /// delivery to a local target ended; its answer is kept for the broker.
    package func deliveryEnded(
        target: String, brokerID: String, type: String, trace: String, domain: String?, hop: JSONObject, deadLetter: JSONObject?,
        _ txn: borrowing WriteTransaction
    ) throws {
        guard reportApps != .none, !trace.isEmpty, let t = registry.resourceType(type) else { return }
        // A removal knows its domain as queued (the resource may be gone); otherwise it is foreign while held.
        guard let source = try domain ?? foreignDomain(t, brokerID, txn), source != ownDomain else { return }
        let count = try counter(AgentStore.appOutcomeCountKey, txn)
        guard count < AgentStore.maxAppOutcomes else {
            try txn.put(meta, AgentStore.appOutcomeDroppedKey, (try counter(AgentStore.appOutcomeDroppedKey, txn) + 1).bigEndianBytes)
            return
        }
        var o: JSONObject = [
            "id": .string(brokerID), "trace": .string(trace), "event": hop["event"] ?? "upsert",
            "at": .number(JSONNumber(integer: unixMilliseconds())),
        ]
        if reportApps == .named { o["target"] = .string(target) }
        if let status = hop["status"] { o["status"] = status }
        if let letter = deadLetter {
            o["outcome"] = "refused"
            // The app's scimType, if it gave one; its detail stays here.
            let answer = letter["response"]?.stringValue.flatMap { try? JSONParser.parse(Array($0.utf8)) }
            if let s = answer?["scimType"]?.stringValue, AgentStore.isSCIMTypeWord(s) { o["scimType"] = .string(s) }
        } else {
            o["outcome"] = hop["method"] == nil ? "unchanged" : "delivered"
        }
        let seq = try counter(AgentStore.appOutcomeSeqKey, txn) + 1
        try txn.put(meta, AgentStore.appOutcomeSeqKey, seq.bigEndianBytes)
        try txn.put(meta, AgentStore.appOutcomePrefix + seq.bigEndianBytes, JSON.object(o).serialized())
        try txn.put(meta, AgentStore.appOutcomeCountKey, (count + 1).bigEndianBytes)
    }

    func counter(_ key: [UInt8], _ txn: borrowing some StoreReading & ~Copyable) throws -> UInt64 {
        try txn.get(meta, key).flatMap(UInt64.init(bigEndianBytes:)) ?? 0
    }

    /// 1 to 64 ASCII letters (what the broker takes as a `scimType`).
    static func isSCIMTypeWord(_ s: String) -> Bool {
        (1...64).contains(s.utf8.count) && s.utf8.allSatisfy { ($0 >= 0x41 && $0 <= 0x5A) || ($0 >= 0x61 && $0 <= 0x7A) }
    }

    /// The answers one poll carries: their outbox sequences beside them, and
    /// those of records that could not be read (damaged), which go with the
    /// batch when the broker takes it (counted) instead of holding the rest.
    public struct PendingAppOutcomes: Sendable {
        public var through: UInt64 = 0
        public var entries: [(seq: UInt64, item: JSON)] = []
        public var unreadable: [UInt64] = []
        public var items: [JSON] { entries.map(\.item) }
    }

    /// The oldest answers kept for the broker after outbox sequence `after`
    /// (at most `limit`, damaged records included), through the last of
    /// them; nil: none.
    public func appOutcomes(after: UInt64 = 0, limit: Int = AgentStore.appOutcomesPerPoll) throws -> PendingAppOutcomes? {
        let meta = self.meta, prefix = AgentStore.appOutcomePrefix
        return try environment.read { txn in
            var out = PendingAppOutcomes()
            try txn.scan(meta, from: prefix + (after + 1).bigEndianBytes, to: Array(prefix.dropLast()) + [UInt8(ascii: "/") + 1]) { k, v in
                guard k.count == prefix.count + 8, let seq = UInt64(bigEndianBytes: Array(k.suffix(8))) else { return true }
                if let item = try? JSONParser.parse(v, limits: .stored), item.objectValue != nil {
                    out.entries.append((seq, item))
                } else {
                    out.unreadable.append(seq)
                }
                out.through = seq
                return out.entries.count + out.unreadable.count < limit
            }
            return out.through == 0 ? nil : out
        }
    }

    /// One answer the broker refused (the poll's others are sent again).
    public func dropAppOutcome(_ seq: UInt64, in txn: borrowing WriteTransaction) throws {
        guard try txn.delete(meta, AgentStore.appOutcomePrefix + seq.bigEndianBytes) else { return }
        let count = try counter(AgentStore.appOutcomeCountKey, txn)
        try txn.put(meta, AgentStore.appOutcomeCountKey, (count - min(count, 1)).bigEndianBytes)
    }

    /// The broker took the answers through `through`: they go.
    public func dropAppOutcomes(through: UInt64, in txn: borrowing WriteTransaction) throws {
        let prefix = AgentStore.appOutcomePrefix
        var keys: [[UInt8]] = []
        try txn.scanKeys(meta, from: prefix, to: prefix + (through + 1).bigEndianBytes) { k in
            keys.append(k)
            return true
        }
        for k in keys { _ = try txn.delete(meta, k) }
        let count = try counter(AgentStore.appOutcomeCountKey, txn)
        try txn.put(meta, AgentStore.appOutcomeCountKey, (count - min(count, UInt64(keys.count))).bigEndianBytes)
    }

    /// Answers kept for the broker, and those not kept (the outbox was full).
    public func appOutcomeCounts() throws -> (pending: UInt64, dropped: UInt64) {
        try environment.read { txn in
            (try counter(AgentStore.appOutcomeCountKey, txn), try counter(AgentStore.appOutcomeDroppedKey, txn))
        }
    }
}
