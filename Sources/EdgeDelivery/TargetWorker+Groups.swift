import EdgeHTTP
import EdgeLoop
import EdgeStore
import SCIM

/// A group's delivery by PATCH: the membership change of a whole group
/// in steps (`updateGroup`), or from the member index (`groupDelta`,
/// `TargetMembers.swift`).
extension TargetWorker {
    /// What a group delivery still has to send: the attribute operations
    /// (first step only), the members to add and to remove, and how many
    /// members the target should hold so far (to tell a complete answer
    /// from a partial one).
    struct MemberPlan {
        var attributeOps: [JSON]
        var added: ArraySlice<JSON>
        var removed: ArraySlice<String>
        /// The members (lowercased) the target should hold so far.
        var expected: Set<String>
    }

    /// What a group delivery from the index still has to send: the
    /// attribute operations (first step only), and the pending members read
    /// so far, as removals and additions. Pending members are read in
    /// batches (`deltaBatch`) after `cursor`: memory holds a batch, not the group.
    struct DeltaPlan {
        var attributeOps: [JSON]
        /// Growing a new group (`TargetMapping.growFrom`): the last member whose chunk is recorded
        /// (nil: grown), the end of the chunk being sent (nil: the last), and whether one is loaded.
        var grow: String?
        var growNext: String?
        var growLoaded = false
        var cursor: String?
        var exhausted = false
        var removes: [(member: String, targetID: String)] = []
        var adds: [(member: String, targetID: String)] = []
        /// Pending entries to clear: of members found as the target holds
        /// them, and, once their operations are sent, of the others.
        var done: [(member: String, mark: [UInt8])] = []
        /// Per member with operations: its pending mark and how many of its operations are left.
        var open: [String: (mark: [UInt8], left: Int)] = [:]
    }
    static let deltaBatch = 1024

    /// A group's update by PATCH, in steps of at most `maxMembersPerPatch`
    /// members: the difference from what was sent is worked out once (O(n)),
    /// each step sends its chunk (O(chunk)), and the mapping records `body`
    /// when the last step is done. What the target answers for members is
    /// believed when its list is complete (as many members as it should
    /// hold): members it dropped are sent again (at most 3 times), a step it
    /// took none of is a dead letter.
    func updateGroup(_ d: Delivery, mapping: TargetMapping, sent: JSONObject, body: JSONObject) {
        var d = d
        if d.plan == nil {
            var a = sent, b = body
            let had = sent["members"]?.arrayValue ?? [], want = body["members"]?.arrayValue ?? []
            a["members"] = nil
            b["members"] = nil
            let hadIDs = Set(had.compactMap { $0["value"]?.stringValue }), wantIDs = Set(want.compactMap { $0["value"]?.stringValue })
            // Each value once (two linked users share one account: one member there).
            var seen = Set<String>()
            let added = want.filter { m in
                guard let v = m["value"]?.stringValue, !hadIDs.contains(v) else { return false }
                return seen.insert(v).inserted
            }
            d.plan = MemberPlan(
                attributeOps: patchOperations(from: a, to: b, removal: memberRemoval), added: added[...],
                removed: hadIDs.subtracting(wantIDs).sorted()[...], expected: Set(hadIDs.map { $0.lowercased() }))
        }
        var plan = d.plan!
        let limit = max(1, target.maxMembersPerPatch)
        // Removals first: they free room at a target with a cap.
        let removeNow = Array(plan.removed.prefix(limit)), addNow = Array(plan.added.prefix(limit - removeNow.count))
        let ops = plan.attributeOps + SCIMOperations.memberOperations(add: addNow, remove: removeNow, form: memberRemoval)
        let done = TargetMapping(targetID: mapping.targetID, etag: mapping.etag, sent: body)
        if ops.isEmpty {
            finish(d, .done(mapping: .some(done), method: nil, status: nil))
            return
        }
        plan.attributeOps = []
        plan.added = plan.added.dropFirst(addNow.count)
        plan.removed = plan.removed.dropFirst(removeNow.count)
        // What the target should still hold of what it had: an answer that lists all of it is complete.
        let keptOld = plan.expected.subtracting(removeNow.map { $0.lowercased() })
        plan.expected = keptOld.union(addNow.compactMap { $0["value"]?.stringValue?.lowercased() })
        let path = endpoint("Group") + "/" + mapping.targetID
        let bytes = SCIMOperations.patchBody(ops)
        var req = request("PATCH", path, d, body: bytes)
        if capabilities?.etag == true, let etag = mapping.etag { req.headers.set("If-Match", etag) }
        send(req, method: "PATCH", d) { [weak self] result in
            guard let self else { return }
            switch result {
            case .success(let r) where (200..<300).contains(r.status):
                let doc = try? JSONParser.parse(r.body)
                let tag = SCIMOperations.etag(r, doc) ?? (r.status == 204 ? nil : mapping.etag)
                var next = d
                if let held = SCIMOperations.answeredMemberList(doc) {
                    let holds = Set(held.compactMap { $0["value"]?.stringValue?.lowercased() })
                    let dropped = addNow.filter { !holds.contains(($0["value"]?.stringValue ?? "").lowercased()) }
                    let kept = removeNow.filter { holds.contains($0.lowercased()) }
                    // Believed only when the list is complete: every member the target kept from before is in it
                    // (a shorter list is a partial or capped one, and says nothing of the change).
                    if (!dropped.isEmpty || !kept.isEmpty) && keptOld.isSubset(of: holds) {
                        guard next.readBacks < 3, dropped.count + kept.count < addNow.count + removeNow.count else {
                            finish(
                                d,
                                stepRefused(path, bytes, r, dropped: dropped.count, of: addNow.count, kept: kept.count, of: removeNow.count)
                            )
                            return
                        }
                        next.readBacks += 1
                        plan.added = dropped[...] + plan.added
                        plan.removed = kept[...] + plan.removed
                        plan.expected.subtract(dropped.compactMap { $0["value"]?.stringValue?.lowercased() })
                        plan.expected.formUnion(kept.map { $0.lowercased() })
                    }
                }
                next.plan = plan
                let now = TargetMapping(targetID: mapping.targetID, etag: tag, sent: mapping.sent)
                if plan.added.isEmpty && plan.removed.isEmpty {
                    finish(
                        next,
                        .done(
                            mapping: .some(TargetMapping(targetID: mapping.targetID, etag: tag, sent: body)), method: "PATCH",
                            status: r.status))
                } else {
                    updateGroup(next, mapping: now, sent: sent, body: body)  // the next step
                }
            case .success(let r)
            where r.status == 501 && memberRemoval == .filter && SCIMOperations.onlyFilteredMemberRemovals(bytes):
                learnValueListRemoval(r)
                updateGroup(d, mapping: mapping, sent: sent, body: body)
            default:
                // Anything else is decided as for any update, from a fresh start.
                var fresh = d
                fresh.plan = nil
                self.updateAnswered(
                    result, fresh, type: "Group", mapping: mapping, body: body, method: "PATCH", path: path, bytes: bytes, step: body)
            }
        }
    }

    /// Above this many members at the target, a step asks for its answer
    /// without them (RFC 7644 §3.9 allows `excludedAttributes` on PATCH):
    /// an answer of the whole group would make a step O(n). Such a step's
    /// members are then not read back; reconcile compares them.
    static let readBackMembers = 1000

    /// A group's change from the member index (`TargetMembers.swift`): the
    /// attribute operations, then the members marked pending, in PATCH
    /// steps of at most `maxMembersPerPatch`. Each step the target took is
    /// recorded at once (index, pending marks, count), so a retry sends
    /// only what was not taken. O(k log n) for k changed members, whatever
    /// the group's size. What the target answers for members is checked as
    /// in `updateGroup`, when its list is complete.
    func groupDelta(_ d: Delivery, mapping: TargetMapping, body: JSONObject) {
        var d = d
        var plan =
            d.delta
            ?? DeltaPlan(attributeOps: patchOperations(from: mapping.sent ?? [:], to: body, removal: memberRemoval), grow: mapping.growFrom)
        let group = d.item.brokerID, target = self.target
        // A new group's growth first, then the pending members, a batch at a time, until there is something
        // to send or none are left (or a batch of settled marks to record first: memory and each
        // transaction hold a batch).
        while plan.removes.isEmpty && plan.adds.isEmpty && !plan.exhausted && plan.done.count < Self.deltaBatch {
            if let from = plan.grow {
                if plan.growLoaded {
                    // The chunk is sent: the walk goes on after it (the next step records that).
                    plan.grow = plan.growNext
                    plan.growLoaded = false
                    continue
                }
                do {
                    let chunk = try store.growChunk(target: target.name, group: group, after: from, limit: Self.deltaBatch)
                    plan.adds = chunk.adds
                    plan.growNext = chunk.last
                    plan.growLoaded = true
                } catch {
                    finish(d, .storeError("cannot read the group's members: \(error)"))
                    return
                }
                continue
            }
            let changes: [MemberChange]
            do {
                changes = try store.pendingMemberChanges(target: target.name, group: group, after: plan.cursor, limit: Self.deltaBatch) {
                    target.routes(domain: $0, type: $1, $2)
                }
            } catch {
                finish(d, .storeError("cannot read the group's pending members: \(error)"))
                return
            }
            plan.cursor = changes.last?.member ?? plan.cursor
            plan.exhausted = changes.count < Self.deltaBatch
            for c in changes {
                var left = 0
                if let held = c.held, held != c.want {
                    plan.removes.append((c.member, held))
                    left += 1
                }
                if let want = c.want, want != c.held {
                    plan.adds.append((c.member, want))
                    left += 1
                }
                // Routed here and not there yet: it stays pending (its delivery marks it again).
                if c.waiting { continue }
                if left == 0 { plan.done.append((c.member, c.mark)) } else { plan.open[c.member] = (c.mark, left) }
            }
        }
        let limit = max(1, target.maxMembersPerPatch)
        let removeNow = Array(plan.removes.prefix(limit)), addNow = Array(plan.adds.prefix(limit - removeNow.count))
        let ops =
            plan.attributeOps
            + SCIMOperations.memberOperations(
                add: addNow.map { ["value": .string($0.targetID)] }, remove: removeNow.map(\.targetID), form: memberRemoval)
        d.delta = plan
        if ops.isEmpty && !plan.exhausted {
            // Marks found settled, more to read: record them, then go on from the loop.
            var next = d
            next.delta?.done = []
            let store = self.store, name = target.name, settled = plan.done
            var unchanged = TargetMapping(targetID: mapping.targetID, etag: mapping.etag, sent: mapping.sent, members: mapping.members)
            unchanged.growFrom = plan.grow
            let same = unchanged
            writer.submit({ txn in
                try store.recordMemberStep(target: name, group: group, added: [], removed: [], done: settled, mapping: same, txn)
            }) { [weak self] recorded in
                guard let self else { return }
                switch recorded {
                case .success(let now): groupDelta(next, mapping: now, body: body)
                case .failure(let error): finish(d, .storeError("cannot record a group's settled members: \(error)"))
                }
            }
            return
        }
        if ops.isEmpty {
            var same = TargetMapping(targetID: mapping.targetID, etag: mapping.etag, sent: body, members: mapping.members)
            same.growFrom = plan.grow
            finish(d, .done(mapping: .some(same), method: nil, status: nil))
            return
        }
        let large = (mapping.members ?? 0) > Self.readBackMembers
        // An answer's member list is believed complete when it holds a sample of what the target holds
        // (a capped or partial list misses some; the target's own members do not count).
        let sample: [String]
        do { sample = large ? [] : try store.heldSample(target: target.name, group: group, limit: 32) } catch {
            finish(d, .storeError("cannot read what the target holds of the group: \(error)"))
            return
        }
        let path = endpoint("Group") + "/" + mapping.targetID
        let bytes = SCIMOperations.patchBody(ops)
        var req = request("PATCH", path + (large ? "?excludedAttributes=members" : ""), d, body: bytes)
        if capabilities?.etag == true, let etag = mapping.etag { req.headers.set("If-Match", etag) }
        statistics.memberSteps += 1
        send(req, method: "PATCH", d) { [weak self] result in
            guard let self else { return }
            switch result {
            case .success(let r) where (200..<300).contains(r.status):
                let doc = r.body.isEmpty ? nil : try? JSONParser.parse(r.body)
                let tag = SCIMOperations.etag(r, doc) ?? (r.status == 204 ? nil : mapping.etag)
                var dropped: [(member: String, targetID: String)] = [], kept: [(member: String, targetID: String)] = []
                if !large, let held = SCIMOperations.answeredMemberList(doc) {
                    let holds = Set(held.compactMap { $0["value"]?.stringValue?.lowercased() })
                    // Believed only when complete: at least as many as the target kept from before, the sample
                    // of what it held among them (a partial or capped list says nothing of the change).
                    let removing = Set(removeNow.map { $0.targetID.lowercased() })
                    if holds.count >= (mapping.members ?? 0) - removeNow.count,
                        sample.allSatisfy({ removing.contains($0.lowercased()) || holds.contains($0.lowercased()) })
                    {
                        dropped = addNow.filter { !holds.contains($0.targetID.lowercased()) }
                        kept = removeNow.filter { holds.contains($0.targetID.lowercased()) }
                    }
                }
                var next = d
                if !dropped.isEmpty || !kept.isEmpty {
                    guard next.readBacks < 3, dropped.count + kept.count < addNow.count + removeNow.count else {
                        finish(
                            d, stepRefused(path, bytes, r, dropped: dropped.count, of: addNow.count, kept: kept.count, of: removeNow.count))
                        return
                    }
                    next.readBacks += 1
                }
                var plan = plan
                plan.attributeOps = []
                plan.removes = kept + plan.removes.dropFirst(removeNow.count)
                plan.adds = dropped + plan.adds.dropFirst(addNow.count)
                var done = plan.done
                plan.done = []
                let again = Set((dropped + kept).map(\.member))
                for m in (removeNow + addNow).map(\.member) where !again.contains(m) {
                    guard var o = plan.open[m] else { continue }
                    o.left -= 1
                    if o.left == 0 {
                        done.append((m, o.mark))
                        plan.open[m] = nil
                    } else {
                        plan.open[m] = o
                    }
                }
                let added = addNow.filter { !again.contains($0.member) },
                    removed = removeNow.filter { !again.contains($0.member) }.map(\.member)
                var recordedStep = TargetMapping(targetID: mapping.targetID, etag: tag, sent: body, members: mapping.members)
                recordedStep.growFrom = plan.grow  // the chunk's start until it is all recorded: a restart walks it again
                let step = recordedStep
                let store = self.store, name = target.name, cleared = done
                writer.submit({ txn in
                    try store.recordMemberStep(
                        target: name, group: group, added: added, removed: removed, done: cleared, mapping: step, txn)
                }) { [weak self] recorded in
                    guard let self else { return }
                    switch recorded {
                    case .success(let now):
                        next.delta = plan
                        next.mapping = now
                        if plan.removes.isEmpty && plan.adds.isEmpty && plan.exhausted && plan.grow == nil {
                            finish(next, .done(mapping: .some(now), method: "PATCH", status: r.status))
                        } else {
                            groupDelta(next, mapping: now, body: body)  // the next step
                        }
                    case .failure(let error):
                        finish(d, .storeError("cannot record a group's step: \(error)"))
                    }
                }
            case .success(let r)
            where r.status == 501 && memberRemoval == .filter && SCIMOperations.onlyFilteredMemberRemovals(bytes):
                learnValueListRemoval(r)
                groupDelta(d, mapping: mapping, body: body)
            case .success(let r) where r.status == 501:
                // No PATCH there: the whole group by PUT (its completion drops the index).
                patchRefused("Group", r)
                var next = d
                next.delta = nil
                upsert(next)
            case .success(let r) where r.status == 404 && d.redirected < 2:
                // Gone at the target (deleted there): created again, whole.
                var next = d
                next.delta = nil
                next.mapping = nil
                next.redirected += 1
                upsert(next)
            case .success(let r) where r.status == 412 && d.redirected < 2:
                // Changed at the target since: the broker's state wins, without If-Match, its attributes
                // all sent again (as a full update would), with the pending members.
                var next = d
                next.redirected += 1
                next.delta?.attributeOps = patchOperations(from: [:], to: body, removal: memberRemoval)
                var m = mapping
                m.etag = nil
                m.sent = [:]
                groupDelta(next, mapping: m, body: body)
            case .success(let r):
                finish(d, SCIMOperations.classify(r, "PATCH", path, bytes))
            case .failure(let e):
                finish(d, SCIMOperations.transportFailure(e, "PATCH \(path)"))
            }
        }
    }

    /// Removal by value filter is not implemented there (django-scim2): the

    /// A dead letter for a PATCH step answered with success whose member changes the target took none of.
    func stepRefused(_ path: String, _ bytes: [UInt8], _ r: HTTPResponse, dropped: Int, of added: Int, kept: Int, of removed: Int)
        -> Outcome
    {
        logger.error(
            "the target answered success but did not take the group's member changes",
            metadata: ["path": .string(path), "dropped": .string("\(dropped)/\(added)"), "kept": .string("\(kept)/\(removed)")])
        return SCIMOperations.stepRefused(path, bytes, r, dropped: dropped, of: added, kept: kept, of: removed)
    }
}
