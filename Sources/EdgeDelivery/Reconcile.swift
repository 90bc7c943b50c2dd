import EdgeHTTP
import EdgeLoop
import EdgeTLS
import SCIM

/// What `scim-broker targets reconcile` found at one target.
public struct ReconcileReport: Sendable {
    /// Broker ids the target should hold and does not.
    public var missing: [String] = []
    /// Broker ids whose account differs from what the broker would send.
    public var drifted: [(brokerID: String, attributes: [String])] = []
    /// Accounts the broker created that no route wants any more (target ids).
    public var strays: [(targetID: String, brokerID: String, type: String)] = []
    /// Accounts the broker did not create and leaves alone.
    public var foreign = 0
    /// Accounts found by `externalId` that the mapping had lost (recorded again).
    public var relinked = 0
    public var expected = 0
    public var seen = 0
    /// Fixes queued with `--apply`.
    public var queued = 0
    /// The trace id the fixes carry (`scim-broker trace`).
    public var trace = ""

    public var json: JSON {
        [
            "expected": .int(expected), "seen": .int(seen), "missing": .array(missing.map { .string($0) }),
            "drifted": .array(drifted.map { ["id": .string($0.brokerID), "attributes": .array($0.attributes.map { .string($0) })] }),
            "strays": .array(strays.map { ["targetId": .string($0.targetID), "id": .string($0.brokerID), "type": .string($0.type)] }),
            "foreign": .int(foreign), "relinked": .int(relinked), "queued": .int(queued), "trace": .string(trace),
        ]
    }
}

public enum ReconcileError: Error, CustomStringConvertible {
    case target(String)
    public var description: String {
        switch self {
        case .target(let m): return m
        }
    }
}

/// Compares a target's accounts with what the broker's routes say it
/// should hold; with `apply`, queues the fixes: create the missing, fix
/// drift (full PUT), deactivate the strays the broker created.
/// Runs its own loop: for the CLI, beside (or without) a running broker.
package func reconcile(store: some DeliveryTables, target: TargetConfiguration, apply: Bool, pageSize: Int = 200) throws -> ReconcileReport
{
    let loop = try EventLoop()
    defer { _ = loop.close() }
    var tls: TLSContext?
    if target.useTLS {
        var c = target.tls
        c.verifyPeer = true
        tls = try TLSContext(role: .client, configuration: c)
    }
    guard let address = target.resolveAddress() else { throw ReconcileError.target("cannot resolve \(target.host)") }
    let client = HTTPClient(loop: loop, address: address, tls: tls, serverName: target.useTLS ? target.host : nil)
    defer { client.close() }

    func get(_ path: String) throws -> JSON {
        var result: Result<HTTPResponse, HTTPClientError>?
        var headers: HTTPHeaders = ["Accept": "application/scim+json"]
        if let token { headers.set("Authorization", "Bearer \(token)") }
        client.send(HTTPRequest(method: "GET", target: target.basePath + path, headers: headers)) { result = $0 }
        while result == nil { _ = loop.runOnce() }
        switch result! {
        case .failure(let e): throw ReconcileError.target("GET \(path): \(e)")
        case .success(let r) where r.status == 200:
            do { return try JSONParser.parse(r.body) } catch { throw ReconcileError.target("GET \(path): not JSON: \(error)") }
        case .success(let r): throw ReconcileError.target("GET \(path) answered \(r.status): \(r.bodyText.prefix(300))")
        }
    }

    let token = try target.resolveToken()
    var report = ReconcileReport()
    // One trace id for the run: every fix it queues carries it, so its hops can be followed.
    let trace = "reconcile-" + hexString(secureRandomBytes(12))
    report.trace = trace
    let mappings = try store.mappings(target: target.name)
    var byTargetID: [String: String] = [:]
    for (b, m) in mappings { byTargetID[m.targetID] = b }
    // Groups are listed and compared without their members (a route that
    // reads members needs them); each group's members are then compared one
    // group at a time (`reconcileMembers`).
    let groupsWithMembers = target.groupRoutesReadMembers
    for (type, endpoint) in [("User", "/Users"), ("Group", "/Groups")] {
        // The target's accounts, page by page (RFC 7644 §3.4.2.4).
        var accounts: [String: JSONObject] = [:]
        var start = 1
        let listing = type == "Group" ? "&excludedAttributes=members" : ""
        while true {
            let page = try get("\(endpoint)?startIndex=\(start)&count=\(pageSize)\(listing)")
            let resources = page["Resources"]?.arrayValue ?? []
            for r in resources { if let o = r.objectValue, let id = o["id"]?.stringValue { accounts[id] = o } }
            let total = page["totalResults"]?.numberValue?.integer.map(Int.init) ?? 0
            start += resources.count
            if resources.isEmpty || start > total { break }
        }
        report.seen += accounts.count
        var byExternal: [String: String] = [:]
        for (id, o) in accounts { if let e = o["externalId"]?.stringValue { byExternal[e] = id } }

        // What the routes want there: one account per resource, and with
        // `collisions: link` one per link value, holding the merged state
        // and named by its anchor (the other linked users are neither
        // missing nor strays: their mappings name the same account).
        var claimed: Set<String> = []
        var wanted: [(brokerID: String, want: JSONObject, candidates: [String], link: String?)] = []
        var linkedUsers: [String: [LinkedResource]] = [:]
        let link = type == "User" ? target.collisions.linkPolicy : nil
        for (domain, _, resource) in try store.directoryEntries(type, members: type == "User" || groupsWithMembers) {
            guard let brokerID = resource["id"]?.stringValue, target.routes(domain: domain, type: type, resource) else { continue }
            if let link, let value = link.value(of: resource, domain: domain) {
                linkedUsers[value, default: []].append(LinkedResource(brokerID: brokerID, domain: domain, resource: resource))
                continue
            }
            var want = targetBody(resource, type: type, brokerID: brokerID, target: target)
            want["members"] = nil  // compared by `reconcileMembers`
            wanted.append((brokerID, want, [brokerID], nil))
        }
        if let link {
            for value in linkedUsers.keys.sorted() {
                let members = link.ordered(linkedUsers[value]!)
                guard let (anchor, want) = linkedTargetBody(members, link: link, target: target) else { continue }
                wanted.append((anchor, want, [anchor] + members.map(\.brokerID).filter { $0 != anchor }, value))
            }
        }
        for (brokerID, want, candidates, linkValue) in wanted {
            report.expected += 1
            // The account: the first candidate's whose mapping names one the target has.
            var targetID =
                candidates.lazy.compactMap { mappings[$0]?.targetID }.first { accounts[$0] != nil }
                ?? mappings[brokerID]?.targetID
            if targetID.map({ accounts[$0] == nil }) ?? true, let found = byExternal[brokerID] {
                targetID = found
                report.relinked += 1
                if apply {
                    try store.enqueue(
                        target: target.name, brokerID: brokerID, type: type, .upsert,
                        mapping: TargetMapping(targetID: found, etag: nil, sent: nil, link: linkValue), linked: candidates,
                        linkPolicy: link, trace: trace);
                    report.queued += 1
                }
            }
            guard let tid = targetID, let account = accounts[tid] else {
                report.missing.append(brokerID)
                if apply {
                    for id in candidates { try store.forgetMapping(target: target.name, type: type, brokerID: id) }
                    try store.enqueue(target: target.name, brokerID: brokerID, type: type, .upsert, linkPolicy: link, trace: trace)
                    report.queued += 1
                }
                continue
            }
            claimed.insert(tid)
            var differing = want.compactMap { key, value -> String? in
                key == "schemas" || sameValue(value, account[key]) ? nil : key
            }
            // A group's members: compared (and with `apply` queued) one group at a time.
            let membersDrift =
                try type == "Group"
                && (reconcileMembers(
                    store: store, target: target, group: brokerID, mapping: mappings[brokerID], mappings: mappings,
                    byTargetID: byTargetID, held: try get("\(endpoint)/\(tid)")["members"], apply: apply, trace: trace))
            if membersDrift { differing.append("members") }
            if !differing.isEmpty {
                report.drifted.append((brokerID, differing))
                // A full PUT queued for the members sends the attributes too.
                let putQueued = membersDrift && mappings[brokerID]?.members == nil
                if apply && membersDrift { report.queued += 1 }
                if apply && differing != ["members"] && !putQueued {
                    // Unknown target state: the next delivery is a full PUT; a
                    // group delivered from the member index keeps its index and
                    // gets its attributes sent again (`sent` empty).
                    if type == "Group" && mappings[brokerID]?.members != nil && mappings[brokerID]?.targetID == tid {
                        // Its index and count stand (read in the enqueue's transaction): the attributes go again.
                        try store.enqueue(target: target.name, brokerID: brokerID, type: type, .upsert, trace: trace, resend: true)
                    } else {
                        try store.enqueue(
                            target: target.name, brokerID: brokerID, type: type, .upsert,
                            mapping: TargetMapping(targetID: tid, etag: nil, sent: nil, link: linkValue),
                            linked: candidates, linkPolicy: link, trace: trace)
                    }
                    if !membersDrift { report.queued += 1 }
                }
            }
        }
        for (id, account) in accounts.sorted(by: { $0.key < $1.key }) where !claimed.contains(id) {
            // Created by the broker: its mapping names it, or its externalId is a broker id the broker mapped.
            let brokerID = byTargetID[id] ?? account["externalId"]?.stringValue.flatMap { mappings[$0] != nil ? $0 : nil }
            guard let brokerID else { report.foreign += 1; continue }
            if type == "User" && account["active"]?.boolValue == false { continue }  // already deactivated
            report.strays.append((id, brokerID, type))
            if apply {
                if link != nil {
                    // Named by the account: the user's mapping may name the account it shares.
                    try store.enqueue(
                        target: target.name, brokerID: brokerID, type: type, .deactivate, account: id, linkPolicy: link, trace: trace)
                } else {
                    try store.enqueue(
                        target: target.name, brokerID: brokerID, type: type, .deactivate,
                        mapping: TargetMapping(targetID: id, etag: nil, sent: nil), trace: trace)
                }
                report.queued += 1
            }
        }
    }
    return report
}

/// Compares one group's members at the target (`held`, as it answered a
/// GET of that group: memory holds one group) with the directory's, read a
/// chunk at a time, each member named by its account there. Members of its
/// own that the target holds (not created by the broker) are left alone.
/// With `apply`, a group delivered from the member index gets just the
/// differing members queued (`repairGroupMembers`); any other gets a full
/// PUT. Returns whether they differ.
func reconcileMembers(
    store: some DeliveryTables, target: TargetConfiguration, group: String, mapping: TargetMapping?, mappings: [String: TargetMapping],
    byTargetID: [String: String], held: JSON?, apply: Bool, trace: String
) throws -> Bool {
    // A target that leaves `members` out of a GET of the group says nothing of them.
    guard let listed = held?.arrayValue else { return false }
    var remaining = Set(listed.compactMap { $0["value"]?.stringValue })
    var missing: [String] = [], matched: Set<String> = []
    try store.forEachMemberID(of: group) { ids in
        for id in ids {
            // As delivery does: a member is sent once it has an account there.
            guard let tid = mappings[id]?.targetID else { continue }
            // Linked users share one account there: one member stands for them all.
            if remaining.remove(tid) != nil || matched.contains(tid) {
                matched.insert(tid)
            } else {
                missing.append(id)
            }
        }
    }
    // Only users the broker created there are the broker's to remove (an id is a user's by its owner entry,
    // never by another type's account that happens to share the id).
    let extra = try remaining.sorted().compactMap { tid in
        try store.accountOwner(target: target.name, type: "User", targetID: tid).map { (member: $0, targetID: tid) }
    }
    guard !missing.isEmpty || !extra.isEmpty else { return false }
    if apply, let mapping {
        if mapping.members != nil {
            try store.repairGroupMembers(target: target.name, group: group, missing: missing, extra: extra, trace: trace)
        } else {
            try store.enqueue(
                target: target.name, brokerID: group, type: "Group", .upsert,
                mapping: TargetMapping(targetID: mapping.targetID, etag: nil, sent: nil), trace: trace)
        }
    }
    return true
}

/// Whether the target's value holds what the broker sends: objects by
/// the broker's members (a target may add defaults), lists element by
/// element in any order, strings and numbers exactly.
package func sameValue(_ want: JSON, _ have: JSON?) -> Bool {
    guard let have else { return want.isNull || want.arrayValue?.isEmpty == true }
    switch (want, have) {
    case (.object(let w), .object(let h)):
        return w.allSatisfy { sameValue($0.value, h[$0.key]) }
    case (.array(let w), .array(let h)):
        return w.count == h.count && w.allSatisfy { e in h.contains { sameValue(e, $0) } }
    case (.number(let a), .number(let b)):
        return a.numericallyEquals(b)
    default:
        return want == have
    }
}

package extension DeliveryTables {
    func forgetMapping(target: String, type: String, brokerID: String) throws {
        try environment.write { txn in try setMapping(target: target, type: type, brokerID: brokerID, nil, txn) }
    }
}
