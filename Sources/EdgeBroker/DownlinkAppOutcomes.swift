import EdgeDelivery
import EdgeLoop
import EdgeStore
import SCIM

/// The last hop of a trace into a boundary (downlink protocol 3,
/// docs/protocol.md "One trace across boundaries"): the destination's agent
/// reports how its local apps answered the changes that entered, and the
/// broker records each answer in the change's trail as `app <target>`
/// (`app` when the agent withholds the name), at the agent's time.
extension BrokerStore {
    /// One answer of a local app, as the agent reports it (`appOutcomes`).
    public struct AppOutcome: Sendable, Equatable {
        public var id: String
        public var trace: String
        /// The delivery's operation: `upsert`, `remove` or `deactivate`.
        public var event: String
        /// The local target's name; nil: withheld by the agent.
        public var target: String?
        /// `delivered` (the app answered 2xx), `unchanged` (nothing to send) or `refused` (a dead letter there).
        public var outcome: String
        public var status: Int?
        public var scimType: String?
        /// Unix ms, the agent's clock.
        public var at: Int64

        /// At most this many answers per poll.
        static let maxPerPoll = 1000
        static let events: Set<String> = ["upsert", "remove", "deactivate"]
        static let outcomes: Set<String> = ["delivered", "unchanged", "refused"]

        /// Parses a poll's `appOutcomes`; the error is the 400's description.
        public static func parse(_ json: JSON) throws(FeedOutcomesError) -> [AppOutcome] {
            guard let items = json.arrayValue, items.count <= maxPerPoll else {
                throw FeedOutcomesError("'appOutcomes' must be an array of at most \(maxPerPoll) answers")
            }
            var out: [AppOutcome] = []
            for (i, item) in items.enumerated() {
                func bad(_ what: String) -> FeedOutcomesError { FeedOutcomesError("'appOutcomes[\(i)]': \(what)", entry: i) }
                guard item.objectValue != nil else { throw bad("must be an object") }
                guard let id = item["id"]?.stringValue, (1...128).contains(id.utf8.count), !id.contains("\0") else {
                    throw bad("'id' must be the broker id the feed named the resource by")
                }
                guard let trace = item["trace"]?.stringValue, (1...128).contains(trace.utf8.count), !trace.contains("\0") else {
                    throw bad("'trace' must be the change's trace id")
                }
                guard let event = item["event"]?.stringValue, events.contains(event) else {
                    throw bad("'event' must be upsert, remove or deactivate")
                }
                guard let outcome = item["outcome"]?.stringValue, outcomes.contains(outcome) else {
                    throw bad("'outcome' must be delivered, unchanged or refused")
                }
                // Bounded (year 9999) like `outcomes.committed`: the hop's key is the time in µs.
                guard let at = item["at"]?.numberValue?.integer, at > 0, at <= BrokerStore.FeedOutcomes.latestCommit else {
                    throw bad("'at' must be the answer's time in Unix milliseconds (at most \(BrokerStore.FeedOutcomes.latestCommit))")
                }
                var o = AppOutcome(id: id, trace: trace, event: event, outcome: outcome, at: at)
                if let t = item["target"] {
                    guard let name = t.stringValue, (1...64).contains(name.utf8.count),
                        name.utf8.allSatisfy({ isLetterOrDigit($0) || $0 == 0x2D || $0 == 0x2E || $0 == 0x5F })
                    else { throw bad("'target' must be the local target's name (1 to 64 letters, digits, '-', '.' or '_')") }
                    o.target = name
                }
                if let s = item["status"] {
                    guard let n = s.numberValue?.integer, (100...599).contains(n) else { throw bad("'status' must be an HTTP status") }
                    o.status = Int(n)
                }
                if let s = item["scimType"] {
                    guard let t = s.stringValue, (1...64).contains(t.utf8.count), t.utf8.allSatisfy({ isLetterOrDigit($0) && $0 > 0x39 })
                    else { throw bad("'scimType' must be a scimType (letters only)") }
                    o.scimType = t
                }
                out.append(o)
            }
            return out
        }

        static func isLetterOrDigit(_ c: UInt8) -> Bool { (c >= 0x30 && c <= 0x39) || (c >= 0x41 && c <= 0x5A) || (c >= 0x61 && c <= 0x7A) }

        init(id: String, trace: String, event: String, outcome: String, at: Int64) {
            (self.id, self.trace, self.event, self.outcome, self.at) = (id, trace, event, outcome, at)
        }
    }

    /// Records the answers in the trails of the changes they answer, in the
    /// poll's transaction. Only a change this feed carried into `target`'s
    /// boundary under that trace id is annotated (its `boundary <domain>` hop
    /// is in the trail, and the trace index names it): an agent can tell how
    /// its apps took what it received, nothing about other resources. An
    /// answer sent again (its poll's answer lost) writes the same key.
    /// Returns how many of each outcome were recorded, and `unmatched`.
    func recordAppOutcomes(_ target: TargetConfiguration, _ answers: [AppOutcome], _ txn: borrowing WriteTransaction) throws
        -> [String: Int]
    {
        let domain = target.destination ?? target.name
        let boundaryHop = Array("boundary \(domain)".utf8)
        var counts: [String: Int] = [:]
        for a in answers {
            var carried = false
            if try txn.get(traces, prefixed(a.trace, a.id)) != nil {
                let prefix = prefixed(a.id, [])
                try txn.scanKeys(trail, from: prefix, to: prefixEnd(a.id)) { k in
                    carried = k.count == prefix.count + 8 + boundaryHop.count && k.suffix(boundaryHop.count).elementsEqual(boundaryHop)
                    return !carried
                }
            }
            guard carried else {
                counts["unmatched", default: 0] += 1
                continue
            }
            let where_ = "a local app of boundary \(domain)"
            var hop: JSONObject = [
                "hop": .string(a.target.map { "app \($0)" } ?? "app"), "event": .string(a.event), "outcome": .string(a.outcome),
                "boundary": .string(domain),
                "detail": .string(
                    a.outcome == "refused"
                        ? "refused by \(where_)\(a.scimType.map { " (\($0))" } ?? ""); the answer is in that agent's dead letters"
                        : a.outcome == "unchanged" ? "\(where_) already held it as it is: nothing to send" : "answered by \(where_)"),
            ]
            if let s = a.status { hop["status"] = .int(s) }
            if let t = a.scimType { hop["scimType"] = .string(t) }
            // Within 5 minutes of the broker's clock, as a boundary hop (`hopTime`).
            try recordHop(brokerID: a.id, trace: a.trace, hop, txn, now: BrokerStore.hopTime(a.at, now: unixMilliseconds()) * 1000 + 999)
            counts[a.outcome, default: 0] += 1
        }
        return counts
    }
}
