import EdgeDelivery
import EdgeLoop
import EdgeStore
import EdgeTLS
import SCIM

/// What the operator's commands and the web console share: one function per
/// action, so that `scim-broker targets …` and `/console/api/…` do the same
/// thing. The store keeps the result; a running broker acts on it (the
/// console's actions also tell the running broker at once).

/// An operator's pause of a target (`targets pause`, the console): nothing is
/// sent to it until `targets resume`; its queue keeps growing meanwhile.
public struct TargetPause: Sendable, Equatable {
    /// Unix ms.
    public var since: Int64
    public var reason: String

    public var json: JSONObject { ["since": .number(JSONNumber(integer: since)), "reason": .string(reason)] }

    init?(_ bytes: [UInt8]) {
        guard let o = (try? JSONParser.parse(bytes, limits: .stored))?.objectValue, let since = o["since"]?.numberValue?.integer
        else { return nil }
        self.since = since
        reason = o["reason"]?.stringValue ?? ""
    }

    init(since: Int64, reason: String) {
        self.since = since
        self.reason = reason
    }
}

extension BrokerStore {
    static func pauseKey(_ target: String) -> [UInt8] { Array("paused/\(target)".utf8) }

    /// Pauses `target`: a pause already in place keeps its time and takes the new reason.
    @discardableResult
    public func pauseTarget(_ target: String, reason: String) throws -> TargetPause {
        let targetState = self.targetState
        return try environment.write { txn in
            var pause =
                try txn.get(targetState, BrokerStore.pauseKey(target)).flatMap(TargetPause.init)
                ?? TargetPause(since: unixMilliseconds(), reason: reason)
            pause.reason = reason
            try txn.put(targetState, BrokerStore.pauseKey(target), JSON.object(pause.json).serialized())
            return pause
        }
    }

    /// Lifts the pause of `target`; the pause lifted (nil: it was not paused).
    @discardableResult
    public func resumeTarget(_ target: String) throws -> TargetPause? {
        let targetState = self.targetState
        return try environment.write { txn in
            let pause = try txn.get(targetState, BrokerStore.pauseKey(target)).flatMap(TargetPause.init)
            _ = try txn.delete(targetState, BrokerStore.pauseKey(target))
            return pause
        }
    }

    /// The targets an operator paused (a running broker reads it every second).
    public func targetPauses() throws -> [String: TargetPause] {
        let targetState = self.targetState
        return try environment.read { txn in
            var out: [String: TargetPause] = [:]
            try txn.scan(targetState, from: Array("paused/".utf8), to: Array("paused0".utf8)) { k, v in
                if let p = TargetPause(v) { out[String(decoding: k.dropFirst(7), as: UTF8.self)] = p }
                return true
            }
            return out
        }
    }
}

/// Provision on demand (`targets push`, the console's push): what was
/// decided and queued.
public struct PushPlan: Sendable {
    public var brokerID: String
    public var type: String
    public var domain: String
    /// userName or displayName.
    public var label: String
    /// Whether the target's routes want it; out of scope, nothing is queued.
    public var inScope: Bool
    /// The account at the target, when there is one: it is sent again, whole.
    public var account: String?
    /// The push's own trace id (nil: not queued).
    public var trace: String?
    /// Unix ms: when it was queued.
    public var queuedAt: Int64 = 0

    public var json: JSONObject {
        var o: JSONObject = [
            "id": .string(brokerID), "type": .string(type), "domain": .string(domain), "name": .string(label),
            "inScope": .bool(inScope), "queuedAt": .number(JSONNumber(integer: queuedAt)),
        ]
        o["account"] = account.map(JSON.string) ?? .null
        o["trace"] = trace.map(JSON.string) ?? .null
        return o
    }

    /// Whether the target took it, from its hop (`pushAnswer`).
    public static func delivered(_ hop: JSONObject) -> Bool { hop["detail"]?.stringValue != "dead letter" }
}

/// Why a push was not queued.
public enum PushError: Error, CustomStringConvertible, Equatable {
    case noResource(String)
    case ambiguous(String, [String])
    case gone(String)

    public var description: String {
        switch self {
        case .noResource(let q): return "no resource named \(q)"
        case .ambiguous(let q, let ids): return "\(q) names \(ids.count) resources (\(ids.joined(separator: ", "))): give a broker id"
        case .gone(let id): return "\(id) is gone"
        }
    }
}

extension BrokerStore {
    /// Provision on demand: the resource `query` names (anything `trace`
    /// takes), checked against the target's routes, queued for the running
    /// broker with a trace id of its own. Its state at the target is taken as
    /// unknown: the whole resource is sent (a user by PUT; a group from the
    /// member index gets its attributes again), as reconcile does for drift.
    public func push(_ query: String, to target: TargetConfiguration) throws -> PushPlan {
        let ids = try resources(named: query)
        guard ids.count == 1, let brokerID = ids.first else {
            throw ids.isEmpty ? PushError.noResource(query) : PushError.ambiguous(query, ids)
        }
        guard let (domain, type, resource) = try resource(brokerID: brokerID) else { throw PushError.gone(brokerID) }
        var plan = PushPlan(
            brokerID: brokerID, type: type, domain: domain,
            label: resource[type == "User" ? "userName" : "displayName"]?.stringValue ?? "-",
            inScope: target.routes(domain: domain, type: type, resource))
        guard plan.inScope else { return plan }
        plan.account = try mapping(target: target.name, brokerID: brokerID)?.targetID
        let trace = "push-" + hexString(secureRandomBytes(12))
        plan.queuedAt = unixMilliseconds()
        try enqueue(target: target.name, brokerID: brokerID, type: type, .upsert, trace: trace, resend: true)
        plan.trace = trace
        return plan
    }

    /// The target's answer to a push: the resource's first hop at the target
    /// since it was queued (a change queued before may fold the push into its
    /// own delivery, under its own trace id). Nil: not answered yet.
    /// One range of the resource's trail (its keys are in time order): what
    /// came before `since` is not read.
    public func pushAnswer(target: String, brokerID: String, since: Int64) throws -> JSONObject? {
        let trail = self.trail, name = "target \(target)"
        return try environment.read { txn in
            var answer: JSONObject?
            let (micros, overflow) = max(0, since).multipliedReportingOverflow(by: 1000)  // a time past the trail's: nothing
            let from = prefixed(brokerID, UInt64(overflow ? .max : micros).bigEndianBytes)
            try txn.scan(trail, from: from, to: prefixEnd(brokerID)) { _, v in
                guard let o = try JSONParser.parse(v, limits: .stored).objectValue, o["hop"]?.stringValue == name else { return true }
                answer = o
                answer?["accepted"] = nil
                answer?["applied"] = nil
                return false
            }
            return answer
        }
    }
}

extension BrokerService {
    /// The workers follow the operator's pauses in the store: every second
    /// (`targets pause` writes them from another process) and at once after
    /// the console's pause or resume. A paused target's worker is stopped
    /// (its requests in flight are abandoned: the queue keeps them, and they
    /// are sent again after the resume); a resumed one gets a new worker,
    /// once the old one has recorded what was in flight. A boundary
    /// (`domain:`) has no worker: its agent fetches the feed.
    func followPauses() {
        guard let stored = try? store.targetPauses() else { return }  // unreadable now: as it was, until the next second
        for i in workers.indices {
            let w = workers[i], name = w.target.name
            switch (pauses[name], stored[name]) {
            case (nil, let pause?):
                pauses[name] = pause
                w.stop()
                logger.notice(
                    "target paused by an operator: nothing is sent until `scim-broker targets resume \(name)`",
                    metadata: ["target": .string(name), "reason": .string(pause.reason)])
                var snapshot = w.statusDocument()
                snapshot["state"] = "paused"
                snapshot["paused"] = .object(pause.json)
                let store = self.store, saved = snapshot
                writer.submit({ txn in try store.saveStatus(target: name, saved, txn) }) { _ in }
            case (let was?, nil):
                // What was in flight is recorded (or failed) first: the new worker reads the queue after it.
                let inFlight = w.statusDocument()["inFlight"]?.numberValue?.integer ?? 0
                if inFlight > 0 && unixMilliseconds() - was.since < 60_000 + Int64(w.target.requestTimeoutMilliseconds) {
                    continue
                }
                do {
                    let fresh = try TargetWorker(target: w.target, store: store, writer: writer, loop: loop)
                    try fresh.start()
                    retiredCounters[name] = counters(w)
                    workers[i] = fresh
                    pauses[name] = nil
                    resuming.remove(name)
                    logger.notice(
                        "target resumed by an operator",
                        metadata: ["target": .string(name), "pausedSeconds": .stringConvertible((unixMilliseconds() - was.since) / 1000)])
                } catch {
                    if resuming.insert(name).inserted {
                        logger.error(
                            "cannot resume the target; trying again every second",
                            metadata: ["target": .string(name), "error": .string("\(error)")])
                    }
                }
            case (_?, let pause?):
                pauses[name] = pause  // a new reason
            case (nil, nil):
                break
            }
        }
    }

    /// An operator queued `count` changes for `target` (a push, a retry):
    /// its worker, or the boundary's parked poll, takes them now.
    func queuedByOperator(target: String, _ count: Int) {
        if let w = workers.first(where: { $0.target.name == target }), pauses[target] == nil { w.kick() }
        feeds.changed([target])
    }

    /// A target's counters since the broker started: its worker's, and
    /// those of the workers it replaced.
    func counters(_ w: TargetWorker) -> TargetStatistics {
        retiredCounters[w.target.name].map { $0.adding(w.statistics) } ?? w.statistics
    }
}

extension TargetStatistics {
    /// Both counters added (the last error: the newer one's).
    func adding(_ o: TargetStatistics) -> TargetStatistics {
        var s = self
        for (k, n) in o.requests { s.requests[k, default: 0] += n }
        s.delivered += o.delivered
        s.deadLettered += o.deadLettered
        s.retries += o.retries
        s.throttled += o.throttled
        s.adopted += o.adopted
        s.memberSteps += o.memberSteps
        s.wholeGroupReads += o.wholeGroupReads
        s.collisions += o.collisions
        for i in s.latencyCounts.indices where i < o.latencyCounts.count { s.latencyCounts[i] += o.latencyCounts[i] }
        s.latencyCount += o.latencyCount
        s.latencySum += o.latencySum
        s.breakerOpened += o.breakerOpened
        s.lastError = o.lastError ?? lastError
        return s
    }
}
