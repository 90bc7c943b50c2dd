import EdgeHTTP
import EdgeLoop
import EdgeStore
import SCIM

/// A delivery's SCIM requests to the target: create (with the look-up
/// before it after a crash, and the 409 adoption), update (PATCH or PUT,
/// the 404/412/501 answers), removal and deactivation, and linked
/// accounts (`collisions: link`). What each answer means is
/// `SCIMOperations`'; this strings the requests of one delivery together.
extension TargetWorker {
    /// The target's collection for a resource type: `/Users` or `/Groups` under its base.
    func endpoint(_ type: String) -> String { SCIMOperations.endpoint(target.basePath, type) }

    /// Whether a group's members at this target are kept in the index
    /// (`TargetMembers.swift`), so that a change sends only what changed:
    /// with PATCH, without `collisions: link` (linked users share one
    /// account, which one member there stands for) and without routes that
    /// read members (those need the whole group anyway).
    var indexesGroupMembers: Bool {
        usesPatch("Group") && target.collisions.linkPolicy == nil && !target.groupRoutesReadMembers
    }

    func upsert(_ d: Delivery) {
        if d.item.type == "Group", d.mapping == nil {
            // Back at the target while the index of its last time there is still being forgotten: that
            // goes first, a chunk a transaction, so that the new index is never mistaken for the old.
            let store = self.store, name = target.name, group = d.item.brokerID
            let sweeping: Bool
            do { sweeping = try store.groupIndexSweepPending(target: name, group: group) } catch {
                finish(d, .storeError("cannot read the group's index: \(error)"))
                return
            }
            if sweeping {
                writer.submit(
                    { txn in try store.sweepGroupIndex(target: name, group: group, limit: deferredChunk, txn) }, weight: deferredChunk
                ) {
                    [weak self] r in
                    guard let self else { return }
                    if case .failure(let error) = r {
                        finish(d, .storeError("cannot forget the group's old index: \(error)"))
                    } else {
                        upsert(d)
                    }
                }
                return
            }
        }
        // A group already delivered from the index is read without its members, and so is a new one:
        // it is created with its first members and grown from the index (`growChunk`).
        let delta = d.item.type == "Group" && indexesGroupMembers && d.mapping?.members != nil && d.mapping?.sent != nil
        let fromIndex = delta || (d.item.type == "Group" && indexesGroupMembers && d.mapping == nil)
        // A read error is not a deletion: the item stays queued and is retried.
        let stored: (domain: String, type: String, resource: JSONObject)?
        if d.item.type == "Group" && !fromIndex { statistics.wholeGroupReads += 1 }
        do { stored = try store.deliveryEntry(d.item.brokerID, members: !fromIndex) } catch {
            finish(d, .storeError("cannot read the resource: \(error)"))
            return
        }
        guard let (domain, type, resource) = stored, target.routes(domain: domain, type: type, resource) else {
            // Deleted or out of the routes since: the removal queued after it does the work.
            finish(d, .done(mapping: .none, method: nil, status: nil))
            return
        }
        if delta, let mapping = d.mapping {
            var body = targetBody(resource, type: type, brokerID: d.item.brokerID, target: target)
            body["members"] = nil
            groupDelta(d, mapping: mapping, body: body)
            return
        }
        var d = d
        if fromIndex {
            // New at the target: created with its first members (as many as one request may add),
            // the rest added by PATCH from the index, a batch at a time, in the delivery queued after it.
            var body = targetBody(resource, type: type, brokerID: d.item.brokerID, target: target)
            do {
                let first = try store.growChunk(
                    target: target.name, group: d.item.brokerID, after: "", limit: max(1, target.maxMembersPerPatch))
                body["members"] = .array(first.adds.map { ["value": .string($0.targetID)] })
                d.growAfter = first.last != nil
            } catch {
                finish(d, .storeError("cannot read the group's members: \(error)"))
                return
            }
            deliver(d, type: type, body: body, externalID: d.item.brokerID)
            return
        }
        if type == "Group", var mapping = d.mapping, mapping.members != nil, var sent = mapping.sent {
            // Delivered from the index before, compared whole now (the target took `collisions: link` or
            // member-reading routes, or lost PATCH): the difference is taken from what it holds.
            do { sent["members"] = .array(try store.heldMembers(target: target.name, group: d.item.brokerID)) } catch {
                finish(d, .storeError("cannot read what the target holds of the group: \(error)"))
                return
            }
            mapping.sent = sent
            mapping.members = nil
            d.mapping = mapping
        }
        if type == "User", let link = target.collisions.linkPolicy {
            linkedUpsert(d, link, LinkedResource(brokerID: d.item.brokerID, domain: domain, resource: resource))
            return
        }
        var body = targetBody(resource, type: type, brokerID: d.item.brokerID, target: target)
        if type == "Group", let members = body["members"]?.arrayValue {
            var mapped: [JSON] = []
            var missing = false
            for m in members {
                guard var o = m.objectValue, let v = o["value"]?.stringValue else { continue }
                // An unreadable member must not drop out of the group: retry the group.
                let memberMapping: TargetMapping?, member: (domain: String, type: String, resource: JSONObject)?
                do {
                    memberMapping = try store.mapping(target: target.name, brokerID: v)
                    member = memberMapping == nil ? try store.deliveryEntry(v) : nil
                } catch {
                    finish(d, .storeError("cannot read group member \(v): \(error)"))
                    return
                }
                if let tid = memberMapping?.targetID {
                    o["value"] = .string(tid)
                    o["$ref"] = nil
                    o["display"] = nil
                    mapped.append(.object(o))
                } else if let (md, mt, mr) = member, target.routes(domain: md, type: mt, mr) {
                    missing = true  // routed here, not delivered yet
                }
            }
            if missing && d.waits < Self.maxMemberWaits {
                finish(d, .waitForMembers)
                return
            }
            body["members"] = .array(mapped)
        }
        deliver(d, type: type, body: body, externalID: d.item.brokerID)
    }

    /// Sends `body` to the account the mapping names, or creates it.
    func deliver(_ d: Delivery, type: String, body: JSONObject, externalID: String) {
        guard let mapping = d.mapping else {
            if (d.recovered || d.attempts > 0), capabilities?.filter == true, !d.leftLink {
                // A POST may have succeeded without its answer being recorded: look first.
                lookup(d, type: type, attribute: "externalId", value: externalID) { [weak self] result in
                    guard let self else { return }
                    switch result {
                    case .found(let found): adopt(d, found.id, body: body)
                    case .absent: create(d, type: type, body: body)
                    case .failed(let outcome): finish(d, outcome)  // never "absent" on a failed look: that could create it twice
                    }
                }
            } else {
                create(d, type: type, body: body)
            }
            return
        }
        update(d, type: type, mapping: mapping, body: body)
    }

    /// The users linked under `value` as they are now: those that still
    /// exist, are routed here and have that value (the index is kept in the
    /// apply; an entry that no longer fits is a user that changed since,
    /// whose own queued change re-sends what it must).
    func linkedResources(_ link: LinkPolicy, value: String) throws -> [LinkedResource] {
        var out: [LinkedResource] = []
        for id in try store.linkMembers(target: target.name, value: value) {
            guard let (domain, type, resource) = try store.deliveryEntry(id), type == "User",
                target.routes(domain: domain, type: type, resource), link.value(of: resource, domain: domain) == value
            else { continue }
            out.append(LinkedResource(brokerID: id, domain: domain, resource: resource))
        }
        return out
    }

    /// `collisions: link`: a user's change re-sends the merged state of
    /// every user linked to it, to their one account.
    func linkedUpsert(_ given: Delivery, _ link: LinkPolicy, _ me: LinkedResource) {
        var d = given
        // Only the domains in `sourceOfRecord` link: another domain's user has no link value.
        let value = link.value(of: me.resource, domain: me.domain)
        do {
            if let shared = d.mapping?.link, shared != value,
                try linkedResources(link, value: shared).contains(where: { $0.brokerID != me.brokerID })
            {
                // It left an account others still share: that one stays theirs
                // (their merged state is queued); this user needs one of its own.
                d.mapping = nil
                d.leftLink = true
            }
            guard let value else {
                // Nothing to link by: the user's own account, as under refuse.
                deliver(
                    d, type: "User", body: targetBody(me.resource, type: "User", brokerID: me.brokerID, target: target),
                    externalID: me.brokerID)
                return
            }
            var members = try linkedResources(link, value: value)
            if !members.contains(where: { $0.brokerID == me.brokerID }) { members.append(me) }
            guard let (anchor, body) = linkedTargetBody(members, link: link, target: target) else {
                // No member to take data from (never: `me` is one): nothing to send, and the delivery ends.
                finish(d, .done(mapping: .none, method: nil, status: nil))
                return
            }
            // The account: that of the first user, in source-of-record order, that has one.
            var chosen: TargetMapping?
            for m in link.ordered(members) {
                let mapping = m.brokerID == me.brokerID ? d.mapping : try store.mapping(target: target.name, brokerID: m.brokerID)
                if let mapping { chosen = mapping; break }
            }
            if let mine = d.mapping, let chosen, mine.targetID != chosen.targetID {
                logger.warning(
                    "a linked user had an account of its own: its data now goes to the linked account; the other one is left as it is",
                    metadata: ["brokerId": .string(me.brokerID), "targetId": .string(mine.targetID), "linkedTo": .string(chosen.targetID)])
            }
            // Its own mapping of that account may say more (none of the body
            // sent: reconciliation found drift, and a full PUT is due).
            d.mapping = d.mapping.flatMap { $0.targetID == chosen?.targetID ? $0 : nil } ?? chosen
            d.linkValue = value
            d.linked = members.map(\.brokerID)
            deliver(d, type: "User", body: body, externalID: anchor)
        } catch {
            finish(d, .storeError("cannot read the linked users: \(error)"))
        }
    }

    func create(_ d: Delivery, type: String, body full: JSONObject) {
        let path = endpoint(type)
        // A group larger than one request may carry is created with its first
        // members and grown by PATCH (`update`, in steps).
        let first = usesPatch(type) ? membershipStep(from: nil, to: full, limit: target.maxMembersPerPatch) : nil
        let body = first ?? full
        let bytes = JSON.object(body).serialized()
        send(request("POST", path, d, body: bytes), method: "POST", d) { [weak self] result in
            guard let self else { return }
            switch result {
            case .success(let r) where r.status == 201 || r.status == 200:
                guard let (id, doc) = SCIMOperations.created(r) else {
                    finish(
                        d,
                        .deadLetter(
                            method: "POST", path: path, request: String(decoding: bytes, as: UTF8.self), status: r.status,
                            response: "the response carries no id: " + r.bodyText))
                    return
                }
                var created = TargetMapping(targetID: id, etag: SCIMOperations.etag(r, doc), sent: body)
                if type == "Group",
                    let (held, _) = SCIMOperations.answeredMembers(
                        doc, sent: body, before: nil, whole: true, absentMeansNone: usesPatch(type))
                {
                    // Created without (some of) the members it was sent (django-scim2
                    // drops members on POST): the rest goes by PATCH, or, without
                    // PATCH, the membership cannot be delivered.
                    guard usesPatch(type) else {
                        finish(d, droppedMembers("POST", path, bytes, r, sent: body, held: held))
                        return
                    }
                    var actual = body
                    actual["members"] = .array(held)
                    created = TargetMapping(targetID: id, etag: SCIMOperations.etag(r, doc), sent: actual)
                    var next = d
                    next.mapping = created
                    next.readBacks += 1
                    update(next, type: type, mapping: created, body: full)
                    return
                }
                if first != nil {
                    var next = d
                    next.mapping = created
                    update(next, type: type, mapping: created, body: full)
                    return
                }
                finish(d, .done(mapping: .some(created), method: "POST", status: r.status))
            case .success(let r) where r.status == 409 && capabilities?.filter == true && !d.adopted:
                // The account exists already: adopt it (userName for users, displayName for groups).
                let attribute = SCIMOperations.uniqueAttribute(type)
                guard let value = body[attribute]?.stringValue else {
                    finish(d, SCIMOperations.classify(r, "POST", path, bytes))
                    return
                }
                lookup(d, type: type, attribute: attribute, value: value) { [weak self] result in
                    guard let self else { return }
                    let found: (id: String, externalId: String?)
                    switch result {
                    case .found(let f): found = f
                    case .absent:
                        finish(d, SCIMOperations.classify(r, "POST", path, bytes))
                        return
                    case .failed(let outcome):
                        finish(d, outcome)
                        return
                    }
                    // Never adopt an account that is another resource's (invariant 6).
                    switch SCIMOperations.adoption(
                        owner: owner(of: found, type: type), of: found.id, me: d.item.brokerID, leftLink: d.leftLink, linked: d.linked)
                    {
                    case .retry(let why): finish(d, .retry(why))
                    case .collision(let other):
                        finish(d, collision(d, attribute: attribute, value: value, targetID: found.id, other: other, path: path, bytes))
                    case .adopt: adopt(d, found.id, body: full)
                    }
                }
            case .success(let r):
                finish(d, SCIMOperations.classify(r, "POST", path, bytes))
            case .failure(let e):
                finish(d, SCIMOperations.transportFailure(e, "POST \(path)"))
            }
        }
    }

    /// The broker id an account at the target belongs to, if any: the one
    /// whose mapping names it, else its `externalId` when that is a broker
    /// id the directory holds (an account the broker created for another
    /// resource). An account of neither kind was made outside the broker and
    /// may be adopted.
    func owner(of account: (id: String, externalId: String?), type: String) -> Result<String?, Error> {
        Result {
            if let mapped = try store.accountOwner(target: target.name, type: type, targetID: account.id) { return mapped }
            if let e = account.externalId, !e.isEmpty, try store.deliveryEntry(e) != nil { return e }
            return nil
        }
    }

    /// An account that is another resource's: with `collisions: refuse` (and
    /// when a namespace still collides) the change becomes a dead letter
    /// that names both domains and both broker ids.
    func collision(
        _ d: Delivery, attribute: String, value: String, targetID: String, other: String,
        path: String, _ bytes: [UInt8]
    ) -> Outcome {
        statistics.collisions += 1
        func domain(_ id: String) -> String { ((try? store.deliveryEntry(id, members: false)) ?? nil)?.domain ?? "unknown" }
        logger.error(
            "cross-resource collision: refused",
            metadata: [
                "brokerId": .string(d.item.brokerID), "owner": .string(other), "targetId": .string(targetID),
                "attribute": .string(attribute),
            ])
        return SCIMOperations.collision(
            attribute: attribute, value: value, target: target.name, targetID: targetID, owner: other, ownerDomain: domain(other),
            me: d.item.brokerID, myDomain: domain(d.item.brokerID), path: path, bytes)
    }

    /// Takes over an existing account and brings it to the broker's state
    /// with a full PUT (its current state is not known).
    func adopt(_ d: Delivery, _ targetID: String, body: JSONObject) {
        var next = d
        next.adopted = true
        next.mapping = TargetMapping(targetID: targetID, etag: nil, sent: nil)
        statistics.adopted += 1
        logger.info("adopted an existing account", metadata: ["brokerId": .string(d.item.brokerID), "targetId": .string(targetID)])
        update(next, type: d.item.type, mapping: next.mapping!, body: body)
    }

    /// Removal by value filter is not implemented there (django-scim2): the
    /// same removal with a value list, remembered for this target.
    func learnValueListRemoval(_ r: HTTPResponse) {
        memberRemoval = .valueList
        logger.warning(
            "the target does not implement member removal by filter (501): members are removed with a value list",
            metadata: ["response": .string(String(decoding: r.body.prefix(300), as: UTF8.self))])
    }

    func update(_ d: Delivery, type: String, mapping: TargetMapping, body: JSONObject) {
        if type == "Group", usesPatch(type), let sent = mapping.sent {
            updateGroup(d, mapping: mapping, sent: sent, body: body)
            return
        }
        let path = endpoint(type) + "/" + mapping.targetID
        var method = "PUT"
        var bytes: [UInt8]
        // A membership change larger than the target takes in one request goes in steps.
        var step = body
        if usesPatch(type), let sent = mapping.sent {
            step = membershipStep(from: sent, to: body, limit: target.maxMembersPerPatch) ?? body
            let ops = patchOperations(from: sent, to: step, removal: memberRemoval)
            if ops.isEmpty {
                finish(d, .done(mapping: .some(mapping), method: nil, status: nil))
                return
            }
            method = "PATCH"
            bytes = SCIMOperations.patchBody(ops)
        } else {
            var full = body
            full["id"] = .string(mapping.targetID)
            bytes = JSON.object(full).serialized()
        }
        var req = request(method, path, d, body: bytes)
        if capabilities?.etag == true, let etag = mapping.etag { req.headers.set("If-Match", etag) }
        send(req, method: method, d) { [weak self] result in
            self?.updateAnswered(result, d, type: type, mapping: mapping, body: body, method: method, path: path, bytes: bytes, step: step)
        }
    }

    /// What an update's answer means (`update`, and `updateGroup` for what
    /// is not a step's success).
    func updateAnswered(
        _ result: Result<HTTPResponse, HTTPClientError>, _ d: Delivery, type: String, mapping: TargetMapping, body: JSONObject,
        method: String, path: String, bytes: [UInt8], step: JSONObject
    ) {
        switch result {
        case .success(let r) where (200..<300).contains(r.status):
            let doc = try? JSONParser.parse(r.body)
            let tag = SCIMOperations.etag(r, doc) ?? (r.status == 204 ? nil : mapping.etag)
            var now = TargetMapping(targetID: mapping.targetID, etag: tag, sent: step)
            if type == "Group",
                let (held, tookNothing) = SCIMOperations.answeredMembers(
                    doc, sent: step, before: mapping.sent?["members"], whole: method == "PUT",
                    absentMeansNone: method == "PUT" && usesPatch(type))
            {
                // The target did not take (all) the members of this change:
                // what it answered is what it has, and the rest goes by PATCH.
                guard usesPatch(type), d.readBacks < 3, !(method == "PATCH" && tookNothing) else {
                    finish(d, droppedMembers(method, path, bytes, r, sent: step, held: held))
                    return
                }
                var actual = step
                actual["members"] = .array(held)
                now = TargetMapping(targetID: mapping.targetID, etag: tag, sent: actual)
                var next = d
                next.readBacks += 1
                update(next, type: type, mapping: now, body: body)
                return
            }
            if step != body {
                update(d, type: type, mapping: now, body: body)  // the next step
                return
            }
            finish(d, .done(mapping: .some(now), method: method, status: r.status))
        case .success(let r) where r.status == 404 && d.redirected < 2:
            // Gone at the target (deleted there): create it again.
            var next = d
            next.mapping = nil
            next.redirected += 1
            create(next, type: type, body: body)
        case .success(let r) where r.status == 412 && d.redirected < 2:
            // Changed at the target since: the broker's state wins, without If-Match.
            var next = d
            next.redirected += 1
            update(next, type: type, mapping: TargetMapping(targetID: mapping.targetID, etag: nil, sent: nil), body: body)
        case .success(let r)
        where r.status == 501 && method == "PATCH" && memberRemoval == .filter && SCIMOperations.onlyFilteredMemberRemovals(bytes):
            learnValueListRemoval(r)
            update(d, type: type, mapping: mapping, body: body)
        case .success(let r) where r.status == 501 && method == "PATCH":
            // This PATCH form is not implemented there (RFC 7644 §3.12): a
            // property of the request, not a fault. A full PUT says the same.
            patchRefused(type, r)
            update(d, type: type, mapping: mapping, body: body)
        case .success(let r):
            finish(d, SCIMOperations.classify(r, method, path, bytes))
        case .failure(let e):
            finish(d, SCIMOperations.transportFailure(e, "\(method) \(path)"))
        }
    }

    func remove(_ d: Delivery, deactivate: Bool) {
        guard let mapping = d.mapping else {
            finish(d, .done(mapping: .none, method: nil, status: nil))  // never reached the target
            return
        }
        if d.item.type == "User", let link = target.collisions.linkPolicy, let shared = mapping.link {
            // A linked account is removed only when every user sharing it is gone.
            do {
                if try linkedResources(link, value: shared).contains(where: { $0.brokerID != d.item.brokerID }) {
                    // The others' merged state is queued (by the apply); only this user's mapping goes.
                    finish(d, .done(mapping: .some(nil), method: nil, status: nil))
                    return
                }
            } catch {
                finish(d, .storeError("cannot read the linked users: \(error)"))
                return
            }
        }
        let path = endpoint(d.item.type) + "/" + mapping.targetID
        if !deactivate {
            send(request("DELETE", path, d, body: []), method: "DELETE", d) { [weak self] result in
                guard let self else { return }
                switch result {
                case .success(let r) where (200..<300).contains(r.status) || r.status == 404:
                    finish(d, .done(mapping: .some(nil), method: "DELETE", status: r.status))
                case .success(let r): finish(d, SCIMOperations.classify(r, "DELETE", path, []))
                case .failure(let e): finish(d, SCIMOperations.transportFailure(e, "DELETE \(path)"))
                }
            }
            return
        }
        if !usesPatch(d.item.type) && mapping.sent == nil {
            // A PUT replaces the whole account: without PATCH and without the
            // body last sent (an adopted or stray account), read it first.
            send(request("GET", path, d, body: []), method: "GET", d) { [weak self] result in
                guard let self else { return }
                switch result {
                case .success(let r) where r.status == 200:
                    guard var current = (try? JSONParser.parse(r.body))?.objectValue else {
                        finish(d, SCIMOperations.classify(r, "GET", path, []))
                        return
                    }
                    current["meta"] = nil
                    current["id"] = nil
                    var next = d
                    next.mapping = TargetMapping(targetID: mapping.targetID, etag: mapping.etag, sent: current)
                    remove(next, deactivate: true)
                case .success(let r) where r.status == 404:
                    finish(d, .done(mapping: .some(nil), method: "GET", status: 404))
                case .success(let r): finish(d, SCIMOperations.classify(r, "GET", path, []))
                case .failure(let e): finish(d, SCIMOperations.transportFailure(e, "GET \(path)"))
                }
            }
            return
        }
        var sent = mapping.sent ?? JSONObject()
        sent["active"] = .bool(false)
        let (method, bytes) = SCIMOperations.deactivation(usesPatch: usesPatch(d.item.type), sent: sent, targetID: mapping.targetID)
        send(request(method, path, d, body: bytes), method: method, d) { [weak self] result in
            guard let self else { return }
            switch result {
            case .success(let r) where (200..<300).contains(r.status):
                let tag = SCIMOperations.etag(r, try? JSONParser.parse(r.body))
                finish(
                    d,
                    .done(
                        mapping: .some(TargetMapping(targetID: mapping.targetID, etag: tag, sent: sent)), method: method, status: r.status))
            case .success(let r) where r.status == 404:
                finish(d, .done(mapping: .some(nil), method: method, status: 404))
            case .success(let r) where r.status == 501 && method == "PATCH":
                patchRefused(d.item.type, r)
                remove(d, deactivate: true)
            case .success(let r): finish(d, SCIMOperations.classify(r, method, path, bytes))
            case .failure(let e): finish(d, SCIMOperations.transportFailure(e, "\(method) \(path)"))
            }
        }
    }

    /// `GET /Users?filter=attribute eq "value"`: the one match's id and externalId.
    func lookup(_ d: Delivery, type: String, attribute: String, value: String, _ done: @escaping (LookupResult) -> Void) {
        let path = SCIMOperations.lookupPath(target.basePath, type: type, attribute: attribute, value: value)
        send(request("GET", path, d, body: []), method: "GET", d) { result in done(SCIMOperations.lookupResult(result, path: path)) }
    }

    /// The target answered 501 to a PATCH: updates of this type go as full PUTs from now on.
    func patchRefused(_ type: String, _ r: HTTPResponse) {
        guard !patchNotImplemented.contains(type) else { return }
        patchNotImplemented.insert(type)
        logger.warning(
            "the target does not implement this PATCH (501): \(type) updates are sent as PUT",
            metadata: ["response": .string(String(decoding: r.body.prefix(300), as: UTF8.self))])
    }

    /// A dead letter for a target that took the request (2xx) but not its members.
    func droppedMembers(_ method: String, _ path: String, _ bytes: [UInt8], _ r: HTTPResponse, sent: JSONObject, held: [JSON])
        -> Outcome
    {
        let want = Set(SCIMOperations.memberValues(sent["members"])), have = Set(SCIMOperations.memberValues(.array(held)))
        logger.error(
            "the target answered success but did not take the group's members",
            metadata: ["method": .string(method), "path": .string(path), "missing": .string(String(want.subtracting(have).count))])
        return SCIMOperations.droppedMembers(method, path, bytes, r, sent: sent, held: held)
    }

    /// Whether updates of `type` go as PATCH.
    func usesPatch(_ type: String) -> Bool { capabilities?.patch == true && !patchNotImplemented.contains(type) }

}
