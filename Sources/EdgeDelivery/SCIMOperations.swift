import EdgeHTTP
import EdgeTLS
import SCIM

/// The SCIM side of a delivery, apart from its scheduling: the requests a
/// worker sends to a target (POST, PATCH, PUT, DELETE, the look-ups before
/// a create and after a 409) and what each answer means for the change
/// (`DeliveryOutcome`), including the 409 adoption decision and the 501
/// fallbacks. Pure: no I/O and no clock, so each rule is tested on its own
/// (`SCIMOperationsTests`); `TargetWorker` strings them together.

/// What a target said it supports (`/ServiceProviderConfig`).
public struct TargetCapabilities: Sendable, Equatable {
    public var patch = false
    public var bulk = false
    public var filter = false
    public var etag = false

    public init(_ config: JSON) {
        patch = config["patch"]?["supported"]?.boolValue ?? false
        bulk = config["bulk"]?["supported"]?.boolValue ?? false
        filter = config["filter"]?["supported"]?.boolValue ?? false
        etag = config["etag"]?["supported"]?.boolValue ?? false
    }
}

/// What became of one delivery, as its last answer says.
package enum DeliveryOutcome {
    /// Done; record the mapping (nil inside: forget it) and the hop.
    case done(mapping: TargetMapping??, method: String?, status: Int?)
    case deadLetter(method: String, path: String, request: String, status: Int, response: String)
    case retry(String)
    /// The engine's own store could not be read: retried later, and not
    /// held against the target (its breaker and concurrency stay as they are).
    case storeError(String)
    case throttled(retryAfter: UInt64?, status: Int)
    /// Group members not yet at the target: try again shortly.
    case waitForMembers
    /// 401, a 403 the credentials check confirmed, or a TLS failure: the target's state, not the change's.
    case credentialsRefused(String)
    /// 403 to one change: a dead letter if the credentials work, else a credentials pause.
    case forbidden(method: String, path: String, request: String, response: String)
}

/// What a look-up by filter found: the one match, none, or no answer to go by.
package enum LookupResult {
    case found((id: String, externalId: String?))
    case absent
    /// The request failed (no answer, 5xx, 401/403, a body that is not a list): never "absent".
    case failed(DeliveryOutcome)
}

/// After a 409 to a create, the account found by its unique name: adopt
/// it, or refuse it because it is another resource's (invariant 6).
package enum AdoptionDecision: Equatable {
    case adopt
    /// The account belongs to this other delivery id.
    case collision(owner: String)
    /// Whose it is could not be read: try again (never adopt on a read error).
    case retry(String)
}

/// The requests and answers of one target's SCIM API.
package enum SCIMOperations {
    static let patchSchema = "urn:ietf:params:scim:api:messages:2.0:PatchOp"

    /// The collection of a resource type under the target's base path.
    package static func endpoint(_ basePath: String, _ type: String) -> String { basePath + (type == "User" ? "/Users" : "/Groups") }

    /// The attribute a 409 is resolved by: the one the target keeps unique.
    package static func uniqueAttribute(_ type: String) -> String { type == "User" ? "userName" : "displayName" }

    /// Headers of every request: the bearer token, and a W3C `traceparent`
    /// carrying the change's trace id (a new one when it has none of 32 hex digits).
    package static func headers(token: String?, trace: String) -> HTTPHeaders {
        var h: HTTPHeaders = ["Accept": "application/scim+json"]
        if let token { h.set("Authorization", "Bearer \(token)") }
        let traceID = trace.count == 32 && trace.allSatisfy(\.isHexDigit) ? trace.lowercased() : hexString(secureRandomBytes(16))
        h.set("traceparent", "00-\(traceID)-\(hexString(secureRandomBytes(8)))-01")
        return h
    }

    package static func request(_ method: String, _ path: String, token: String?, trace: String, body: [UInt8]) -> HTTPRequest {
        var h = headers(token: token, trace: trace)
        if !body.isEmpty { h.set("Content-Type", "application/scim+json") }
        return HTTPRequest(method: method, target: path, headers: h, body: body)
    }

    /// A PATCH request's body (RFC 7644 §3.5.2).
    package static func patchBody(_ operations: [JSON]) -> [UInt8] {
        JSON.object(["schemas": [.string(patchSchema)], "Operations": .array(operations)]).serialized()
    }

    /// A PATCH's member operations: additions as one value list, removals
    /// in the form the target takes.
    package static func memberOperations(add: [JSON], remove: [String], form: MemberRemovalForm) -> [JSON] {
        var ops: [JSON] = []
        if !add.isEmpty { ops.append(["op": "add", "path": "members", "value": .array(add)]) }
        if !remove.isEmpty {
            if form == .valueList {
                ops.append(["op": "remove", "path": "members", "value": .array(remove.map { ["value": .string($0)] })])
            } else {
                for id in remove { ops.append(["op": "remove", "path": .string("members[value eq \"\(id)\"]")]) }
            }
        }
        return ops
    }

    /// Whether a PATCH holds only removals of members by value filter: then
    /// a 501 is the form's (django-scim2), not another operation's, and the
    /// value-list form may be tried. (On a server that ignored the value,
    /// `remove` of `members` would remove every member: only a target that
    /// refused the filter form is sent it.)
    package static func onlyFilteredMemberRemovals(_ bytes: [UInt8]) -> Bool {
        guard let ops = (try? JSONParser.parse(bytes))?["Operations"]?.arrayValue, !ops.isEmpty else { return false }
        return ops.allSatisfy { op in
            op["op"]?.stringValue == "remove" && (op["path"]?.stringValue?.hasPrefix("members[value eq ") ?? false)
        }
    }

    /// `GET …?filter=attribute eq "value"`, asking for the id and externalId only.
    package static func lookupPath(_ basePath: String, type: String, attribute: String, value: String) -> String {
        let escaped = value.replacing("\\", with: "\\\\").replacing("\"", with: "\\\"")
        return endpoint(basePath, type) + "?filter=" + percentEncode("\(attribute) eq \"\(escaped)\"") + "&attributes=id,externalId"
    }

    /// What a look-up's answer found. Several matches: none of them is known
    /// to be the one (absent). With no match a server may leave `Resources`
    /// out (RFC 7644 §3.4.2).
    package static func lookupResult(_ result: Result<HTTPResponse, HTTPClientError>, path: String) -> LookupResult {
        switch result {
        case .success(let r) where r.status == 200:
            let doc = try? JSONParser.parse(r.body)
            guard let list = doc?["Resources"]?.arrayValue ?? (doc?["totalResults"]?.numberValue?.integer == 0 ? [] : nil) else {
                return .failed(.retry("GET \(path): the answer is not a list"))
            }
            if list.count == 1, let id = list[0]["id"]?.stringValue { return .found((id, list[0]["externalId"]?.stringValue)) }
            return .absent
        case .success(let r):
            return .failed(classify(r, "GET", path, []))
        case .failure(let e):
            return .failed(transportFailure(e, "GET \(path)"))
        }
    }

    /// The account a create's answer (201 or 200) names, with the answer parsed; nil: it carries no id.
    package static func created(_ r: HTTPResponse) -> (id: String, doc: JSON)? {
        guard let doc = try? JSONParser.parse(r.body), let id = doc["id"]?.stringValue else { return nil }
        return (id, doc)
    }

    /// After a 409, the account found by its unique name, whose `owner` was
    /// read (nil: no delivery id's): adopted when it is nobody's or this
    /// resource's own, never when it is another resource's. Linked users
    /// (`linked`) share one account; a user that left its link (`leftLink`)
    /// adopts nothing of the others'.
    package static func adoption(owner: Result<String?, Error>, of account: String, me: String, leftLink: Bool, linked: [String])
        -> AdoptionDecision
    {
        switch owner {
        case .failure(let e): return .retry("cannot tell whose account \(account) is: \(e)")
        case .success(let other?) where (other != me || leftLink) && !linked.contains(other): return .collision(owner: other)
        case .success: return .adopt
        }
    }

    /// The ETag of an answer: its header, else the body's `meta.version`.
    package static func etag(_ r: HTTPResponse, _ doc: JSON?) -> String? {
        r.headers["ETag"] ?? doc?["meta"]?["version"]?.stringValue
    }

    /// A request that got no answer: TLS failures (a certificate the target
    /// refuses or that fails verification) pause the target like refused
    /// credentials; anything else is retried and counts toward the breaker.
    package static func transportFailure(_ e: HTTPClientError, _ what: String) -> DeliveryOutcome {
        if case .tls = e { return .credentialsRefused("\(what): TLS: \(e)") }
        return .retry("\(what): \(e)")
    }

    /// What an answer that is not the request's success means.
    package static func classify(_ r: HTTPResponse, _ method: String, _ path: String, _ request: [UInt8]) -> DeliveryOutcome {
        switch r.status {
        case 429, 503: return .throttled(retryAfter: RetrySchedule.retryAfter(r.headers["Retry-After"]), status: r.status)
        case 401:
            // The credentials, not the change: the target pauses with its queue kept.
            return .credentialsRefused("\(method) \(path) answered 401: \(String(decoding: r.body.prefix(300), as: UTF8.self))")
        case 403:
            // The credentials, or this one change ("operation not permitted",
            // RFC 7644 §3.12): the worker asks the target with a request about no resource.
            return .forbidden(
                method: method, path: path, request: String(decoding: request, as: UTF8.self),
                response: String(decoding: r.body.prefix(16 * 1024), as: UTF8.self))
        case 500...599 where r.status != 501, 408:
            return .retry("\(method) \(path) answered \(r.status)")
        default:
            // 501 too: not implemented (RFC 7644 §3.12) is a property of the
            // request form; retrying cannot help, and the target is up.
            return .deadLetter(
                method: method, path: path, request: String(decoding: request, as: UTF8.self), status: r.status,
                response: String(decoding: r.body.prefix(16 * 1024), as: UTF8.self))
        }
    }

    /// The request that tells a refused change from refused credentials
    /// after a 403: one page of one resource, about no change.
    package static func credentialsCheckPath(_ basePath: String, type: String) -> String {
        endpoint(basePath, type) + "?count=1&attributes=id"
    }

    /// A 403 to `method path`, then `check`'s answer: the change is refused
    /// (a dead letter) when the credentials work, else the target pauses.
    package static func afterForbidden(
        _ check: Result<HTTPResponse, HTTPClientError>, checkPath: String, method: String, path: String, request: String, response: String
    ) -> DeliveryOutcome {
        switch check {
        case .success(let r) where (200..<300).contains(r.status):
            return .deadLetter(method: method, path: path, request: request, status: 403, response: response)
        case .success(let r) where r.status == 401 || r.status == 403:
            return .credentialsRefused("\(method) \(path) answered 403, and so did GET \(checkPath) (\(r.status))")
        case .success(let r):
            return .retry("\(method) \(path) answered 403; GET \(checkPath) answered \(r.status)")
        case .failure(let e):
            return transportFailure(e, "GET \(checkPath) (after a 403 to \(method) \(path))")
        }
    }

    /// A user's deactivation: `active` false by PATCH, or the whole account
    /// by PUT (`sent` with `active` false) where PATCH is not taken.
    package static func deactivation(usesPatch: Bool, sent: JSONObject, targetID: String) -> (method: String, body: [UInt8]) {
        if usesPatch { return ("PATCH", patchBody([["op": "replace", "path": "active", "value": false]])) }
        var full = sent
        full["id"] = .string(targetID)
        return ("PUT", JSON.object(full).serialized())
    }

    /// The member list an answer carries: nil when it is not a resource or
    /// says nothing of members, [] when it names `members` as empty or null.
    package static func answeredMemberList(_ doc: JSON?) -> [JSON]? {
        guard let o = doc?.objectValue, o["id"] != nil else { return nil }
        return o["members"]?.arrayValue ?? (o.keys.contains("members") ? [] : nil)
    }

    package static func memberValues(_ members: JSON?) -> [String] { members?.arrayValue?.compactMap { $0["value"]?.stringValue } ?? [] }

    /// What a target's answer says of the members this request changed:
    /// nil when it took them all (or the answer cannot tell), else the
    /// members it holds of `sent` (those added that it dropped left out,
    /// those removed that it kept put back) and whether it took none of the
    /// change. Only the members of the change are judged, ids compared
    /// ASCII case-insensitively. An answer is believed only when it can
    /// tell: the answer to a POST or PUT (`whole`) when it lists none of
    /// the members sent (django-scim2 drops them all; a shorter list may be
    /// a capped one), a PATCH answer when it lists every member the change
    /// kept (else it is a partial or paged list). `before`: the members the
    /// target had (nil: none, a create). A `whole` answer without `members`
    /// holds none (a PATCH answer may leave them out) when PATCH can repair it.
    package static func answeredMembers(_ doc: JSON?, sent: JSONObject, before: JSON?, whole: Bool, absentMeansNone: Bool) -> (
        held: [JSON], tookNothing: Bool
    )? {
        guard let doc = doc?.objectValue, doc["id"] != nil else { return nil }
        let held = doc["members"]?.arrayValue ?? (doc.keys.contains("members") ? [] : nil)
        guard let answered = held ?? (absentMeansNone && doc["displayName"] != nil ? [] : nil) else { return nil }
        let holds = Set(memberValues(.array(answered)).map { $0.lowercased() })
        let want = sent["members"]?.arrayValue ?? []
        let had = Set(memberValues(before).map { $0.lowercased() }), wanted = Set(memberValues(sent["members"]).map { $0.lowercased() })
        if whole {
            guard holds.isDisjoint(with: wanted) else { return nil }
        } else {
            guard had.intersection(wanted).isSubset(of: holds) else { return nil }
        }
        let added = want.filter { !had.contains(($0["value"]?.stringValue ?? "").lowercased()) }
        let removed = memberValues(before).filter { !wanted.contains($0.lowercased()) }
        let dropped = Set(added.compactMap { $0["value"]?.stringValue?.lowercased() }.filter { !holds.contains($0) })
        let kept = removed.filter { holds.contains($0.lowercased()) }
        guard !dropped.isEmpty || !kept.isEmpty else { return nil }
        let actual = want.filter { !dropped.contains(($0["value"]?.stringValue ?? "").lowercased()) } + kept.map { ["value": .string($0)] }
        return (actual, dropped.count == added.count && kept.count == removed.count)
    }

    /// A dead letter for a PATCH step answered with success whose member changes the target took none of.
    package static func stepRefused(
        _ path: String, _ bytes: [UInt8], _ r: HTTPResponse, dropped: Int, of added: Int, kept: Int, of removed: Int
    ) -> DeliveryOutcome {
        .deadLetter(
            method: "PATCH", path: path, request: String(decoding: bytes.prefix(4096), as: UTF8.self), status: r.status,
            response: "the target answered \(r.status) but its member list shows none of the change: \(dropped) of \(added) members "
                + "added are missing and \(kept) of \(removed) removed are still there (after 3 tries); "
                + String(decoding: r.body.prefix(1024), as: UTF8.self))
    }

    /// A dead letter for a target that took the request (2xx) but not its members.
    package static func droppedMembers(
        _ method: String, _ path: String, _ bytes: [UInt8], _ r: HTTPResponse, sent: JSONObject, held: [JSON]
    ) -> DeliveryOutcome {
        let want = Set(memberValues(sent["members"])), have = Set(memberValues(.array(held)))
        return .deadLetter(
            method: method, path: path, request: String(decoding: bytes.prefix(4096), as: UTF8.self), status: r.status,
            response: "the target answered \(r.status) but holds \(have.count) of the \(want.count) members sent "
                + "(\(want.subtracting(have).count) missing, \(have.subtracting(want).count) not sent): it dropped them silently; "
                + String(decoding: r.body.prefix(1024), as: UTF8.self))
    }

    /// The dead letter of a change refused because its account is another
    /// resource's (`collisions: refuse`, or a namespace that still
    /// collides): it names both domains and both delivery ids.
    package static func collision(
        attribute: String, value: String, target: String, targetID: String, owner: String, ownerDomain: String, me: String,
        myDomain: String,
        path: String, _ bytes: [UInt8]
    ) -> DeliveryOutcome {
        let reason =
            "collision: \(attribute) '\(value)' at target \(target) is account \(targetID) of broker id \(owner) "
            + "(domain \(ownerDomain)); broker id \(me) (domain \(myDomain)) may not adopt it"
        return .deadLetter(method: "POST", path: path, request: String(decoding: bytes, as: UTF8.self), status: 409, response: reason)
    }
}

/// How a target takes the removal of group members in a PATCH.
public enum MemberRemovalForm: Sendable, Equatable {
    /// One `{"op":"remove","path":"members[value eq \"ID\"]"}` per member (RFC 7644 §3.5.2.2).
    case filter
    /// One `{"op":"remove","path":"members","value":[{"value":"ID"}, …]}`, as
    /// Entra ID and authentik send it and django-scim2 takes it.
    case valueList
}

/// PATCH operations (RFC 7644 §3.5.2) that turn `old` into `new`: replace
/// changed or added attributes, remove dropped ones; group members as
/// adds and removes of the members that changed, so large groups stay
/// cheap, removals in the form the target takes.
package func patchOperations(from old: JSONObject, to new: JSONObject, removal: MemberRemovalForm = .filter) -> [JSON] {
    var ops: [JSON] = []
    for (key, value) in new where key != "schemas" {
        let before = old[key]
        if before == value { continue }
        if equalsIgnoringASCIICase(key, "members"), let b = before?.arrayValue, let a = value.arrayValue {
            let bv = Set(b.compactMap { $0["value"]?.stringValue }), av = Set(a.compactMap { $0["value"]?.stringValue })
            let added = a.filter { av.subtracting(bv).contains($0["value"]?.stringValue ?? "") }
            if !added.isEmpty { ops.append(["op": "add", "path": "members", "value": .array(added)]) }
            let gone = bv.subtracting(av).sorted()
            if removal == .valueList && !gone.isEmpty {
                ops.append(["op": "remove", "path": "members", "value": .array(gone.map { ["value": .string($0)] })])
            } else {
                for id in gone { ops.append(["op": "remove", "path": .string("members[value eq \"\(id)\"]")]) }
            }
            continue
        }
        ops.append(["op": "replace", "path": .string(key), "value": value])
        if let b = before?.objectValue, let a = value.objectValue {
            // A replace of a complex attribute (or an extension) leaves the
            // sub-attributes it does not name as they were (RFC 7644
            // §3.5.2.3): the ones dropped are removed.
            for (sub, _) in b where a[sub] == nil {
                ops.append(["op": "remove", "path": .string(key.hasPrefix("urn:") ? "\(key):\(sub)" : "\(key).\(sub)")])
            }
        }
    }
    for (key, _) in old where key != "schemas" && new[key] == nil {
        ops.append(["op": "remove", "path": .string(key)])
    }
    return ops
}

/// A body on the way from `sent` (nil: nothing at the target yet) to `body`
/// whose members differ from `sent`'s by at most `limit` additions and
/// removals (removals first: they free room at a target with a cap), or nil
/// when `body` is within the limit already. Every other attribute is
/// `body`'s: only the members are spread over requests.
package func membershipStep(from sent: JSONObject?, to body: JSONObject, limit: Int) -> JSONObject? {
    func values(_ members: [JSON]) -> Set<String> { Set(members.compactMap { $0["value"]?.stringValue }) }
    let want = body["members"]?.arrayValue ?? [], have = sent?["members"]?.arrayValue ?? []
    let wantIDs = values(want), haveIDs = values(have)
    let added = want.filter { !haveIDs.contains($0["value"]?.stringValue ?? "") }
    let removed = have.filter { !wantIDs.contains($0["value"]?.stringValue ?? "") }
    guard added.count + removed.count > max(1, limit) else { return nil }
    let removeNow = values(Array(removed.prefix(max(1, limit))))
    let addNow = added.prefix(max(0, max(1, limit) - removeNow.count))
    var step = body
    step["members"] = .array(have.filter { !removeNow.contains($0["value"]?.stringValue ?? "") } + addNow)
    return step
}
