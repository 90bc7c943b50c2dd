import EdgeHTTP
import EdgeLoop
import EdgeStore
import EdgeTLS
import Glibc
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
    /// Members of drifted groups the target lacks, and members of the broker's it holds that it should not.
    public var membersMissing = 0
    public var membersExtra = 0
    /// Fixes queued with `--apply` (queue items: a group's members repaired
    /// in chunks take one a chunk).
    public var queued = 0
    /// The trace id the fixes carry (`scim-broker trace`).
    public var trace = ""

    public var json: JSON {
        [
            "expected": .int(expected), "seen": .int(seen), "missing": .array(missing.map { .string($0) }),
            "drifted": .array(drifted.map { ["id": .string($0.brokerID), "attributes": .array($0.attributes.map { .string($0) })] }),
            "strays": .array(strays.map { ["targetId": .string($0.targetID), "id": .string($0.brokerID), "type": .string($0.type)] }),
            "membersMissing": .int(membersMissing), "membersExtra": .int(membersExtra),
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
/// `client` sets the HTTP client's limits (its body limit bounds a page of
/// the listings; a group's members are streamed past it); `repairChunk`,
/// how many differing members of a group one repair transaction holds.
package func reconcile(
    store: some DeliveryTables, target: TargetConfiguration, apply: Bool, pageSize: Int = 200,
    client clientOptions: HTTPClientOptions = HTTPClientOptions(), repairChunk: Int = 1000
) throws -> ReconcileReport {
    let loop = try EventLoop()
    defer { _ = loop.close() }
    var tls: TLSContext?
    if target.useTLS {
        var c = target.tls
        c.verifyPeer = true
        tls = try TLSContext(role: .client, configuration: c)
    }
    guard let address = target.resolveAddress() else { throw ReconcileError.target("cannot resolve \(target.host)") }
    let client = HTTPClient(
        loop: loop, address: address, tls: tls, serverName: target.useTLS ? target.host : nil, options: clientOptions)
    defer { client.close() }

    func request(_ path: String) -> HTTPRequest {
        var headers: HTTPHeaders = ["Accept": "application/scim+json"]
        if let token { headers.set("Authorization", "Bearer \(token)") }
        return HTTPRequest(method: "GET", target: target.basePath + path, headers: headers)
    }

    func get(_ path: String) throws -> JSON {
        var result: Result<HTTPResponse, HTTPClientError>?
        client.send(request(path)) { result = $0 }
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
    // Memory holds a page of accounts and a chunk of resources, whatever the
    // target's size: the accounts go to a scratch LMDB file of this run's.
    let scratch = try ReconcileScratch(in: store.environment.options.path)
    defer { scratch.remove() }

    /// A GET of one group at the target, its body streamed: the values of
    /// its `members` go into the scratch file a chunk at a time (memory
    /// holds one member element and one chunk, whatever the group's size).
    /// Returns false when the target left `members` out.
    func streamMembers(_ path: String) throws -> Bool {
        try scratch.clearMembers()
        var scanner = MemberScanner()
        var status = 0
        var errorText: [UInt8] = []
        var chunk: [String] = []
        var failure: (any Error)?
        var result: Result<HTTPResponse, HTTPClientError>?
        client.stream(
            request(path), head: { status = $0.status },
            body: { bytes in
                guard status == 200 else {
                    errorText.append(contentsOf: bytes.prefix(max(0, 300 - errorText.count)))
                    return
                }
                do {
                    try scanner.feed(bytes) { element in
                        guard let value = element["value"]?.stringValue else { return }
                        chunk.append(value)
                        if chunk.count == 1000 {
                            try scratch.addMembers(chunk)
                            chunk.removeAll(keepingCapacity: true)
                        }
                    }
                } catch {
                    failure = error
                    throw error
                }
            }
        ) { result = $0 }
        while result == nil { _ = loop.runOnce() }
        if let failure = failure as? JSONError { throw ReconcileError.target("GET \(path): not JSON: \(failure)") }
        if let failure { throw failure }
        switch result! {
        case .failure(let e): throw ReconcileError.target("GET \(path): \(e)")
        case .success(let r) where r.status == 200:
            do { try scanner.finish() } catch { throw ReconcileError.target("GET \(path): not JSON: \(error)") }
            try scratch.addMembers(chunk)
            return scanner.sawMembers
        case .success(let r): throw ReconcileError.target("GET \(path) answered \(r.status): \(String(decoding: errorText, as: UTF8.self))")
        }
    }
    func mapping(_ brokerID: String) throws -> TargetMapping? { try store.mapping(target: target.name, brokerID: brokerID) }
    // Groups are listed and compared without their members (a route that
    // reads members needs them); each group's members are then compared one
    // group at a time (`reconcileMembers`).
    let groupsWithMembers = target.groupRoutesReadMembers
    for (type, endpoint) in [("User", "/Users"), ("Group", "/Groups")] {
        // The target's accounts, page by page (RFC 7644 §3.4.2.4).
        try scratch.clear()
        var start = 1
        let listing = type == "Group" ? "&excludedAttributes=members" : ""
        while true {
            let page = try get("\(endpoint)?startIndex=\(start)&count=\(pageSize)\(listing)")
            let resources = page["Resources"]?.arrayValue ?? []
            try scratch.add(resources.compactMap { $0.objectValue })
            let total = page["totalResults"]?.numberValue?.integer.map(Int.init) ?? 0
            start += resources.count
            if resources.isEmpty || start > total { break }
        }
        report.seen += try scratch.count()

        // What the routes want there: one account per resource, and with
        // `collisions: link` one per link value, holding the merged state
        // and named by its anchor (the other linked users are neither
        // missing nor strays: their mappings name the same account).
        var linkedUsers: [String: [LinkedResource]] = [:]
        let link = type == "User" ? target.collisions.linkPolicy : nil
        func compare(_ brokerID: String, _ want: JSONObject, _ candidates: [String], _ linkValue: String?) throws {
            report.expected += 1
            // The account: the first candidate's whose mapping names one the target has.
            var targetID = try candidates.lazy.compactMap { try mapping($0)?.targetID }.first { try scratch.account($0) != nil }
            if targetID == nil { targetID = try mapping(brokerID)?.targetID }
            if try targetID.map({ try scratch.account($0) == nil }) ?? true, let found = try scratch.byExternal(brokerID) {
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
            guard let tid = targetID, let account = try scratch.account(tid) else {
                report.missing.append(brokerID)
                if apply {
                    for id in candidates { try store.forgetMapping(target: target.name, type: type, brokerID: id) }
                    try store.enqueue(target: target.name, brokerID: brokerID, type: type, .upsert, linkPolicy: link, trace: trace)
                    report.queued += 1
                }
                return
            }
            try scratch.claim(tid)
            var differing = want.compactMap { key, value -> String? in
                key == "schemas" || sameValue(value, account[key]) ? nil : key
            }
            let groupMapping = type == "Group" ? try mapping(brokerID) : nil
            // A group's members: compared (and with `apply` queued) one group at a time.
            let members =
                type == "Group"
                ? try reconcileMembers(
                    store: store, target: target, group: brokerID, mapping: groupMapping,
                    held: try streamMembers("\(endpoint)/\(tid)") ? scratch : nil, apply: apply, trace: trace, repairChunk: repairChunk)
                : MemberDifference()
            let membersDrift = members.differs
            report.membersMissing += members.missing
            report.membersExtra += members.extra
            report.queued += members.queued
            if membersDrift { differing.append("members") }
            if !differing.isEmpty {
                report.drifted.append((brokerID, differing))
                // A full PUT queued for the members sends the attributes too.
                let putQueued = membersDrift && groupMapping?.members == nil
                if apply && differing != ["members"] && !putQueued {
                    // Unknown target state: the next delivery is a full PUT; a
                    // group delivered from the member index keeps its index and
                    // gets its attributes sent again (`sent` empty).
                    if type == "Group" && groupMapping?.members != nil && groupMapping?.targetID == tid {
                        // Its index and count stand (read in the enqueue's transaction): the attributes go again.
                        try store.enqueue(target: target.name, brokerID: brokerID, type: type, .upsert, trace: trace, resend: true)
                    } else {
                        try store.enqueue(
                            target: target.name, brokerID: brokerID, type: type, .upsert,
                            mapping: TargetMapping(targetID: tid, etag: nil, sent: nil, link: linkValue),
                            linked: candidates, linkPolicy: link, trace: trace)
                    }
                    report.queued += 1
                }
            }
        }
        try store.forEachDirectoryEntry(type, members: type == "User" || groupsWithMembers) { (domain, _, resource) in
            guard let brokerID = resource["id"]?.stringValue, target.routes(domain: domain, type: type, resource) else { return }
            if let link, let value = link.value(of: resource, domain: domain) {
                // Linked users are merged by link value: they are kept until all are known (O(linked users)).
                linkedUsers[value, default: []].append(LinkedResource(brokerID: brokerID, domain: domain, resource: resource))
                return
            }
            var want = targetBody(resource, type: type, brokerID: brokerID, target: target)
            want["members"] = nil  // compared by `reconcileMembers`
            try compare(brokerID, want, [brokerID], nil)
        }
        if let link {
            for value in linkedUsers.keys.sorted() {
                let members = link.ordered(linkedUsers[value]!)
                guard let (anchor, want) = linkedTargetBody(members, link: link, target: target) else { continue }
                try compare(anchor, want, [anchor] + members.map(\.brokerID).filter { $0 != anchor }, value)
            }
        }
        try scratch.forEachUnclaimed { id, account in
            // Created by the broker: its owner entry names it, or its externalId is a broker id the broker mapped.
            let owner = try store.accountOwner(target: target.name, type: type, targetID: id)
            let brokerID = try owner ?? account["externalId"]?.stringValue.flatMap { try mapping($0) != nil ? $0 : nil }
            guard let brokerID else {
                report.foreign += 1
                return
            }
            if type == "User" && account["active"]?.boolValue == false { return }  // already deactivated
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

/// What `reconcileMembers` found of one group's members, and queued.
struct MemberDifference {
    /// Members the target lacks, and members of the broker's it holds that it should not.
    var missing = 0, extra = 0
    /// Queue items (with `apply`): one per repaired chunk, or one full PUT.
    var queued = 0
    var differs: Bool { missing + extra > 0 }
}

/// Compares one group's members at the target (`held`: their values as it
/// answered a GET of that group, in the scratch file; nil when it left
/// `members` out) with the directory's, read a chunk at a time, each member
/// named by its account there and claimed in the scratch file: what nothing
/// claims is extra. Members of its own that the target holds (not created by
/// the broker) are left alone. Memory holds a chunk, not the group nor the
/// differences.
/// With `apply`, a group delivered from the member index gets just the
/// differing members queued, `repairChunk` of them a transaction
/// (`repairGroupMembers`, each its own commit with its own queue item: a
/// run killed in the middle leaves what it committed queued, and a rerun
/// finds the rest); any other gets a full PUT.
func reconcileMembers(
    store: some DeliveryTables, target: TargetConfiguration, group: String, mapping: TargetMapping?, held: ReconcileScratch?, apply: Bool,
    trace: String, repairChunk: Int = 1000
) throws -> MemberDifference {
    // A target that leaves `members` out of a GET of the group says nothing of them.
    guard let held else { return MemberDifference() }
    var difference = MemberDifference()
    let repair = apply && mapping?.members != nil
    var missing: [String] = []
    var extra: [(member: String, targetID: String)] = []
    func flush() throws {
        guard repair, !missing.isEmpty || !extra.isEmpty else { return }
        try store.repairGroupMembers(target: target.name, group: group, missing: missing, extra: extra, trace: trace)
        difference.queued += 1
        missing.removeAll(keepingCapacity: true)
        extra.removeAll(keepingCapacity: true)
    }
    try store.forEachMemberID(of: group) { ids in
        // As delivery does: a member is sent once it has an account there.
        let accounts = try ids.compactMap { id -> (member: String, targetID: String)? in
            try store.mapping(target: target.name, brokerID: id).map { (id, $0.targetID) }
        }
        // Linked users share one account there: one member stands for them all (claiming twice is harmless).
        let found = try held.claimMembers(accounts.map(\.targetID))
        for (k, account) in accounts.enumerated() where !found[k] {
            difference.missing += 1
            guard repair else { continue }
            missing.append(account.member)
            if missing.count == repairChunk { try flush() }
        }
    }
    // Only users the broker created there are the broker's to remove (an id is a user's by its owner entry,
    // never by another type's account that happens to share the id).
    try held.forEachUnclaimedMember { tids in
        for tid in tids {
            guard let owner = try store.accountOwner(target: target.name, type: "User", targetID: tid) else { continue }
            difference.extra += 1
            guard repair else { continue }
            extra.append((owner, tid))
            if missing.count + extra.count == repairChunk { try flush() }
        }
    }
    try flush()
    if apply, difference.differs, let mapping, mapping.members == nil {
        try store.enqueue(
            target: target.name, brokerID: group, type: "Group", .upsert,
            mapping: TargetMapping(targetID: mapping.targetID, etag: nil, sent: nil), trace: trace)
        difference.queued += 1
    }
    return difference
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

/// A target's accounts as one reconcile run listed them, in an LMDB file of
/// the run's own (removed at the end, never synced): `accounts` (target id →
/// the account), `external` (externalId → target id), `claimed` (target
/// ids a resource of the broker's accounts for), and `members` (of the one
/// group being compared: a member's key → 1 when a member of the broker's
/// accounts for it, else 0, then its id at the target). Memory holds one
/// page.
final class ReconcileScratch {
    let path: String
    let environment: Environment
    let accounts: Database
    let external: Database
    let claimed: Database
    let members: Database

    /// In `directory` (the store's data directory: storage meant for the
    /// program's data, not a tmpfs), named by this process, so a run that was
    /// killed leaves nothing for long: the next one removes the scratch of
    /// processes that are gone.
    init(in directory: String) throws {
        ReconcileScratch.removeAbandoned(in: directory)
        var template = Array("\(directory)/reconcile.\(getpid()).XXXXXX".utf8CString)
        guard let made = template.withUnsafeMutableBufferPointer({ mkdtemp($0.baseAddress!) }) else {
            throw ReconcileError.target("cannot create a scratch directory for reconcile in \(directory): errno \(errno)")
        }
        path = String(cString: made)
        do {
            var o = EnvironmentOptions(path: path)
            o.unsafeNoSync = true  // scratch: nothing here must survive the run
            environment = try Environment(o)
            accounts = try environment.openDatabase("accounts")
            external = try environment.openDatabase("external")
            claimed = try environment.openDatabase("claimed")
            members = try environment.openDatabase("members")
        } catch {
            ReconcileScratch.remove(path)
            throw error
        }
    }

    static func remove(_ path: String) {
        for f in ["data.mdb", "lock.mdb"] { unlink(path + "/" + f) }
        rmdir(path)
    }

    /// Scratch directories of reconcile runs whose process is gone.
    static func removeAbandoned(in directory: String) {
        guard let dir = opendir(directory) else { return }
        var abandoned: [String] = []
        while let entry = readdir(dir) {
            let name = withUnsafeBytes(of: entry.pointee.d_name) { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) }
            let parts = name.split(separator: ".")
            guard parts.count == 3, parts[0] == "reconcile", let pid = Int32(parts[1]) else { continue }
            if kill(pid, 0) != 0 && errno == ESRCH { abandoned.append(directory + "/" + name) }
        }
        closedir(dir)
        for path in abandoned { remove(path) }
    }

    func remove() { ReconcileScratch.remove(path) }

    /// Empties it for the next type.
    func clear() throws { try clear([accounts, external, claimed]) }

    /// Empties the members table for the next group.
    func clearMembers() throws { try clear([members]) }

    private func clear(_ dbs: [Database]) throws {
        for db in dbs {
            while true {
                var keys: [[UInt8]] = []
                try environment.read { txn in
                    try txn.scanKeys(db) { k in
                        keys.append(Array(k))
                        return keys.count < 1000
                    }
                }
                if keys.isEmpty { break }
                try environment.write { txn in for k in keys { _ = try txn.delete(db, k) } }
            }
        }
    }

    func add(_ page: [JSONObject]) throws {
        try environment.write { txn in
            for o in page {
                guard let id = o["id"]?.stringValue, !id.isEmpty else { continue }
                try txn.put(accounts, ReconcileScratch.key(id), JSON.object(o).serialized())
                if let e = o["externalId"]?.stringValue, !e.isEmpty {
                    try txn.put(external, ReconcileScratch.key(e), Array(id.utf8))
                }
            }
        }
    }

    func count() throws -> Int { try environment.count(accounts) }

    func account(_ id: String) throws -> JSONObject? {
        try environment.read { txn in
            try txn.get(accounts, ReconcileScratch.key(id)).flatMap { try JSONParser.parse($0, limits: .stored).objectValue }
        }
    }

    func byExternal(_ externalID: String) throws -> String? {
        try environment.read { txn in try txn.get(external, ReconcileScratch.key(externalID)).map { String(decoding: $0, as: UTF8.self) } }
    }

    func claim(_ id: String) throws { try environment.write { txn in try txn.put(claimed, ReconcileScratch.key(id), []) } }

    /// Values of the group's members at the target, one chunk of them.
    func addMembers(_ ids: [String]) throws {
        guard !ids.isEmpty else { return }
        try environment.write { txn in
            for id in ids where !id.isEmpty { try txn.put(members, ReconcileScratch.key(id), [0] + Array(id.utf8)) }
        }
    }

    /// For each of `ids` (one chunk), whether the group at the target holds
    /// it; those it holds are marked claimed.
    func claimMembers(_ ids: [String]) throws -> [Bool] {
        try environment.write { txn in
            try ids.map { id in
                let key = ReconcileScratch.key(id)
                guard var value = try txn.get(members, key) else { return false }
                if value.first != 1 {
                    value[0] = 1
                    try txn.put(members, key, value)
                }
                return true
            }
        }
    }

    /// The group's members at the target nothing claimed, in key order, a chunk at a time.
    func forEachUnclaimedMember(_ body: ([String]) throws -> Void) throws {
        try forEachChunk(of: members, size: 1000, pick: { _, _, v in v.first == 0 ? String(decoding: v.dropFirst(), as: UTF8.self) : nil })
        {
            try body($0)
        }
    }

    /// The entries of `db` in key order, `size` of them read at a time:
    /// `body` gets what `pick` returned for each chunk's, outside its transaction.
    private func forEachChunk<T>(
        of db: Database, size: Int, pick: (borrowing ReadTransaction, [UInt8], [UInt8]) throws -> T?, _ body: ([T]) throws -> Void
    ) throws {
        var from: [UInt8]?
        while true {
            var chunk: [T] = []
            var last: [UInt8]?
            try environment.read { txn in
                var seen = 0
                try txn.scan(db, from: from) { k, v in
                    seen += 1
                    last = k
                    if let picked = try pick(txn, k, v) { chunk.append(picked) }
                    return seen < size
                }
                if seen < size { last = nil }
            }
            try body(chunk)
            guard let l = last else { return }
            from = l + [0]
        }
    }

    /// The key of an id (or externalId) in every table of the scratch file,
    /// for storing and looking up alike (`boundedKey`: a long id under its digest).
    static func key(_ id: String) -> [UInt8] { boundedKey(id) }

    /// The accounts nothing claimed, in id order, a chunk at a time.
    func forEachUnclaimed(_ body: (String, JSONObject) throws -> Void) throws {
        let claimed = self.claimed
        try forEachChunk(
            of: accounts, size: 500,
            pick: { txn, k, v -> (String, JSONObject)? in
                guard try txn.get(claimed, k) == nil, let o = try JSONParser.parse(v, limits: .stored).objectValue,
                    let id = o["id"]?.stringValue
                else { return nil }
                return (id, o)
            }
        ) { chunk in
            for (id, o) in chunk { try body(id, o) }
        }
    }
}
