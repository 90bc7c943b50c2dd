import SCIM

/// What the operator commands about targets print, the same at the broker
/// (`scim-broker targets …`, `deadletter`, `trace`) and at an agent with
/// local targets (`scim-edge targets …`): each function reads the store
/// and returns the lines. `command` names the program in the hints.
package enum TargetReports {
    package static func time(_ ms: Int64?) -> String {
        guard let ms, ms > 0 else { return "-" }
        return formatDateTime(secondsSinceEpoch: ms / 1000, milliseconds: Int(ms % 1000))
    }

    /// One line per target a worker saved a status for: state, queue, counters,
    /// breaker, guard. `configured`: the configured targets (nil: not known,
    /// a removed one is then not marked). `pause`: an operator's pause of a
    /// target (the broker's `targets pause`), as JSON and for its line.
    package static func status(
        _ store: some DeliveryTables, configured: [String]?, json: Bool, command: String, noneYet: Bool,
        pause: (String) -> (json: JSONObject, line: String)? = { _ in nil }
    ) throws -> [String] {
        var out: [String] = []
        let letters = try store.deadLetters(target: nil)
        let statuses = try store.targetStatuses()
        if statuses.isEmpty && !json && noneYet {
            out.append("nothing to show: no target has state in this \(command == "scim-edge" ? "agent" : "broker")")
        }
        for (name, saved) in statuses {
            var status = saved
            // A target that left the configuration keeps its queue until `targets forget`.
            let removed = configured.map { !$0.contains(name) } ?? false
            if removed { status["removed"] = .bool(true) }
            let depth = try store.queueDepth(target: name)
            status["queued"] = .int(depth.count)
            status["oldestQueuedAt"] = .number(JSONNumber(integer: depth.oldest))
            status["deadLetters"] = .int(letters.filter { $0.target == name }.count)
            status["deletesPaused"] = .bool(try store.deletionGuard(target: name).pausedSince != nil)
            let paused = pause(name)
            if let paused {
                status["state"] = "paused"
                status["paused"] = .object(paused.json)
            }
            if json { out.append(JSON.object(status).serializedString); continue }
            let caps =
                status["capabilities"]?.objectValue.map { c in
                    c.members.filter { $0.value == .bool(true) }.map(\.key).joined(separator: ",")
                } ?? "-"
            out.append(
                "\(name)\t\(status["state"]?.stringValue ?? "-")" + (paused?.line ?? "")
                    + "\tqueued \(depth.count) (oldest \(time(depth.oldest)))"
                    + "\tdelivered \(status["delivered"]?.numberValue?.description ?? "0")\tdead letters \(status["deadLetters"]?.numberValue?.description ?? "0")"
                    + "\tretries \(status["retries"]?.numberValue?.description ?? "0")\tconcurrency \(status["concurrency"]?.numberValue?.description ?? "-")"
                    + "\tbreaker \(status["breaker"]?.stringValue ?? "-")\tdeletes \(status["deletesPaused"] == .bool(true) ? "PAUSED" : "flowing")"
                    + (status["linked"]?.numberValue.map { "\tlinked \($0.description)" } ?? "")
                    + "\tsupports \(caps)\tupdated \(time(status["updatedAt"]?.numberValue?.integer))"
                    + (status["lastError"]?.stringValue.map { "\tlast error: \($0)" } ?? "")
                    + (removed ? "\tREMOVED from the configuration (\(command) targets forget \(name) clears it)" : ""))
        }
        return out
    }

    /// One held removal, one line (`held`, `reject-deletes`).
    package static func describe(_ h: HeldRemoval) -> String {
        "#\(h.seq)\t\(h.item.operation.rawValue) \(h.item.type) \(h.item.brokerID)\t\(h.nameAttribute) \(h.name ?? "-")"
            + "\tdomain \(h.domain ?? "-")\tqueued \(time(h.item.queuedAt))\ttrace \(h.item.trace.isEmpty ? "-" : h.item.trace)"
    }

    package static func held(_ store: some DeliveryTables, target name: String, json: Bool) throws -> [String] {
        let (pausedSince, held) = try store.heldRemovals(target: name)
        if json { return held.map { $0.json.serializedString } }
        guard let pausedSince else { return ["\(name): the deletion guard holds nothing (removals flow)"] }
        return [
            "\(name): \(held.count) removal\(held.count == 1 ? "" : "s") held by the deletion guard since \(time(pausedSince))"
                + " (targets confirm-deletes \(name) sends them, targets reject-deletes \(name) [SEQ…] drops them)"
        ] + held.map(describe)
    }

    package static func reject(_ store: some DeliveryTables, target name: String, seqs: [UInt64]) throws -> [String] {
        let result = try store.rejectHeldRemovals(target: name, seqs: seqs.isEmpty ? nil : seqs)
        guard !result.rejected.isEmpty else { return ["\(name): the deletion guard holds nothing; nothing rejected"] }
        return result.rejected.map { "rejected \(describe($0))" } + [
            "\(name): \(result.rejected.count) held removal\(result.rejected.count == 1 ? "" : "s") rejected; "
                + (result.resumed
                    ? "nothing held any more: removals resume (the guard counts again from now)"
                    : "\(result.stillHeld) still held (confirm-deletes or reject-deletes)")
        ]
    }

    package static func forgotten(_ name: String, _ gone: ForgottenTarget) -> String {
        "\(name): forgot \(gone.queued) queued changes, \(gone.mappings) account mappings, "
            + "\(gone.deadLetters) dead letters, \(gone.stateEntries) state entries"
    }

    package static func reconciled(_ name: String, _ report: ReconcileReport, apply: Bool, json: Bool) -> [String] {
        if json { return [report.json.serializedString] }
        var out = [
            "\(name): \(report.expected) expected, \(report.seen) at the target: \(report.missing.count) missing, "
                + "\(report.drifted.count) drifted, \(report.strays.count) strays, \(report.foreign) not created by the broker"
                + (report.relinked > 0 ? ", \(report.relinked) relinked by externalId" : "")
                + (report.membersMissing + report.membersExtra > 0
                    ? "; members of drifted groups: \(report.membersMissing) missing, \(report.membersExtra) extra" : "")
        ]
        out += report.missing.map { "missing\t\($0)" }
        out += report.drifted.map { "drifted\t\($0.brokerID)\t\($0.attributes.joined(separator: ","))" }
        out += report.strays.map { "stray\t\($0.targetID)\t(broker id \($0.brokerID))" }
        if apply { out.append("\(report.queued) fixes queued (trace \(report.trace))") }
        return out
    }

    /// Each dead letter: its target, number, time, request, status and response.
    package static func deadLetters(_ store: some DeliveryTables, only: String?, json: Bool) throws -> [String] {
        let letters = try store.deadLetters(target: only)
        if letters.isEmpty && !json { return ["nothing to show: no dead letters" + (only.map { " for \($0)" } ?? "")] }
        var out: [String] = []
        for (target, letter) in letters {
            if json {
                var o = letter
                o["target"] = .string(target)
                out.append(JSON.object(o).serializedString)
                continue
            }
            out.append(
                "\(target)\t#\(letter["seq"]?.numberValue?.description ?? "?")\t\(time(letter["at"]?.numberValue?.integer))"
                    + "\t\(letter["method"]?.stringValue ?? "") \(letter["path"]?.stringValue ?? "") → \(letter["status"]?.numberValue?.description ?? "")"
                    + "\t\(letter["type"]?.stringValue ?? "") \(letter["id"]?.stringValue ?? "")\ttrace \(letter["trace"]?.stringValue ?? "-")"
            )
            out.append("  request:  \(letter["request"]?.stringValue ?? "")")
            out.append("  response: \(letter["response"]?.stringValue ?? "")")
        }
        return out
    }

    /// The hops of a change (`trace`), the earliest `limit`, and, when
    /// there are more or not everything was read, a note that says so (for
    /// standard error); nil: nothing recorded. What it reads is bounded by
    /// `limit` (`TrailLimits`: the hops of at least 1,000 resources, at
    /// least 100,000 trail entries).
    package static func trail(_ store: some DeliveryTables, _ id: String, json: Bool, limit: Int = 1_000) throws
        -> (lines: [String], note: String?)?
    {
        let reads = limit > Int.max / 10 ? Int.max : max(100_000, limit * 10)
        let found = try store.trail(id, limits: TrailLimits(resources: max(1_000, limit), hops: limit, reads: reads))
        let hops = found.hops
        guard !hops.isEmpty else { return nil }
        var note: String?
        if found.total > hops.count || !found.complete {
            note =
                "the earliest \(hops.count) of \(found.complete ? "" : "at least ")\(found.total) hops, of \(found.resourcesTotal)\(found.complete ? "" : " or more") resources: --limit N prints more"
        }
        var out: [String] = []
        for (deliveryID, hop) in hops {
            if json {
                var o = hop
                o["id"] = .string(deliveryID)
                out.append(JSON.object(o).serializedString)
                continue
            }
            var hop = hop
            if let since = hop["heldSince"]?.numberValue?.integer, let target = hop["target"]?.stringValue {
                hop["detail"] = .string(
                    "held by the deletion guard of target \(target) since \(time(since))"
                        + (hop["queueSeq"]?.numberValue.map { " (#\($0))" } ?? ""))
            }
            var detail: [String] = []
            for key in ["domain", "sourceId", "seq", "feedSeq", "event", "outcome", "method", "status", "scimType", "detail", "trace"] {
                if let v = hop[key], !v.isNull { detail.append("\(key) \(v.stringValue ?? v.serializedString)") }
            }
            out.append(
                "\(time(hop["at"]?.numberValue?.integer))\t\(deliveryID)\t\(hop["hop"]?.stringValue ?? "")\t\(detail.joined(separator: " "))"
            )
            for step in hop["steps"]?.arrayValue ?? [] { out.append("\t\t  " + describeStep(step)) }
        }
        return (out, note)
    }

    /// One request of a delivery: `PATCH /scim/v2/Groups/… → 200`.
    package static func describeStep(_ step: JSON) -> String {
        "\(step["method"]?.stringValue ?? "?") \(step["path"]?.stringValue ?? "?") → "
            + (step["status"]?.numberValue.map { "\($0)" } ?? "no answer: \(step["error"]?.stringValue ?? "")")
    }

    /// `reject-deletes`' arguments: queue sequences, `#N` or `N`; nil names the one that is not.
    package static func queueSequences(_ args: [String]) -> (seqs: [UInt64], bad: String?) {
        var seqs: [UInt64] = []
        for s in args {
            guard let n = UInt64(s.hasPrefix("#") ? String(s.dropFirst()) : s) else { return (seqs, s) }
            seqs.append(n)
        }
        return (seqs, nil)
    }
}

extension JSON {
    fileprivate var serializedString: String { String(decoding: serialized(), as: UTF8.self) }
}
