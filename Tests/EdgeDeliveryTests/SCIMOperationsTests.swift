import EdgeHTTP
import EdgeTLS
import SCIM
import XCTest

@testable import EdgeDelivery

/// The SCIM side of a delivery alone: what each request looks like and
/// what each answer means, with answers written here (no server, no clock).
final class SCIMOperationsTests: XCTestCase {
    func answer(_ status: Int, _ body: String = "", headers: HTTPHeaders = [:]) -> HTTPResponse {
        HTTPResponse(status: status, headers: headers, body: Array(body.utf8))
    }

    /// One line per outcome, to compare.
    func describe(_ o: DeliveryOutcome) -> String {
        switch o {
        case .done(let m, let method, let status):
            return "done \(m.map { $0?.targetID ?? "forget" } ?? "-") \(method ?? "-") \(status ?? 0)"
        case .deadLetter(let method, let path, _, let status, _): return "dead \(method) \(path) \(status)"
        case .retry: return "retry"
        case .storeError: return "store"
        case .throttled(let after, let status): return "throttled \(status) \(after.map(String.init) ?? "-")"
        case .waitForMembers: return "wait"
        case .credentialsRefused: return "credentials"
        case .forbidden(let method, let path, _, _): return "forbidden \(method) \(path)"
        }
    }

    func testEachAnswerClassIsRetriedThrottledPausedOrDeadLettered() {
        func c(_ r: HTTPResponse) -> String { describe(SCIMOperations.classify(r, "POST", "/Users", Array("{}".utf8))) }
        XCTAssertEqual(c(answer(429, headers: ["Retry-After": "2"])), "throttled 429 2")
        XCTAssertEqual(c(answer(503)), "throttled 503 -", "no Retry-After: the default pause")
        XCTAssertEqual(c(answer(401)), "credentials", "the credentials, not the change: a pause")
        XCTAssertEqual(c(answer(403)), "forbidden POST /Users", "asked again about no change before deciding")
        for s in [500, 502, 504, 408] { XCTAssertEqual(c(answer(s)), "retry", "\(s)") }
        for s in [400, 404, 409, 413, 501] { XCTAssertEqual(c(answer(s)), "dead POST /Users \(s)", "\(s): retrying cannot help") }
        if case .deadLetter(_, _, let request, _, let response) = SCIMOperations.classify(
            answer(400, #"{"detail":"bad"}"#), "POST", "/Users", Array(#"{"userName":"x"}"#.utf8))
        {
            XCTAssertEqual(request, #"{"userName":"x"}"#, "the letter keeps the request")
            XCTAssertEqual(response, #"{"detail":"bad"}"#, "and the answer")
        } else {
            XCTFail("400 is a dead letter")
        }
        XCTAssertEqual(describe(SCIMOperations.transportFailure(.timeout, "POST /Users")), "retry")
        XCTAssertEqual(describe(SCIMOperations.transportFailure(.connectionLost("reset"), "POST /Users")), "retry")
        XCTAssertEqual(
            describe(
                SCIMOperations.transportFailure(
                    .tls(TLSError(operation: "handshake", verifyError: "certificate has expired")), "POST /Users")),
            "credentials", "a refused certificate pauses the target like refused credentials")
    }

    func testA403IsADeadLetterWhenTheCredentialsWorkAndAPauseWhenTheyDoNot() {
        func after(_ check: Result<HTTPResponse, HTTPClientError>) -> String {
            describe(
                SCIMOperations.afterForbidden(
                    check, checkPath: "/Users?count=1", method: "PATCH", path: "/Users/1", request: "", response: ""))
        }
        XCTAssertEqual(after(.success(answer(200))), "dead PATCH /Users/1 403", "the target refuses this one change")
        XCTAssertEqual(after(.success(answer(403))), "credentials")
        XCTAssertEqual(after(.success(answer(401))), "credentials")
        XCTAssertEqual(after(.success(answer(500))), "retry", "no telling yet")
        XCTAssertEqual(after(.failure(.timeout)), "retry")
        XCTAssertEqual(SCIMOperations.credentialsCheckPath("/scim/v2", type: "Group"), "/scim/v2/Groups?count=1&attributes=id")
    }

    func testALookupFindsOneMatchNeverTakesAFailureForAbsenceAndIsEscaped() {
        let path = SCIMOperations.lookupPath("/scim/v2", type: "User", attribute: "userName", value: #"a"b\c"#)
        XCTAssertEqual(path, "/scim/v2/Users?filter=" + percentEncode(#"userName eq "a\"b\\c""#) + "&attributes=id,externalId")
        func look(_ r: Result<HTTPResponse, HTTPClientError>) -> String {
            switch SCIMOperations.lookupResult(r, path: path) {
            case .found(let f): return "found \(f.id) \(f.externalId ?? "-")"
            case .absent: return "absent"
            case .failed(let o): return "failed " + describe(o)
            }
        }
        XCTAssertEqual(look(.success(answer(200, #"{"totalResults":1,"Resources":[{"id":"t1","externalId":"b1"}]}"#))), "found t1 b1")
        XCTAssertEqual(look(.success(answer(200, #"{"totalResults":0}"#))), "absent", "no match: Resources may be left out")
        XCTAssertEqual(look(.success(answer(200, #"{"totalResults":0,"Resources":[]}"#))), "absent")
        XCTAssertEqual(
            look(.success(answer(200, #"{"totalResults":2,"Resources":[{"id":"a"},{"id":"b"}]}"#))), "absent",
            "two matches: neither is known to be the one")
        XCTAssertEqual(look(.success(answer(200, "<html>"))), "failed retry", "not a list: never absent (that could create twice)")
        XCTAssertEqual(look(.success(answer(503))), "failed throttled 503 -")
        XCTAssertEqual(look(.success(answer(401))), "failed credentials")
        XCTAssertEqual(look(.failure(.timeout)), "failed retry")
    }

    func testA409IsAdoptedOnlyWhenTheAccountIsNobodysOrOwnOrLinked() {
        struct ReadError: Error {}
        func decide(_ owner: Result<String?, Error>, leftLink: Bool = false, linked: [String] = []) -> AdoptionDecision {
            SCIMOperations.adoption(owner: owner, of: "t9", me: "me", leftLink: leftLink, linked: linked)
        }
        XCTAssertEqual(decide(.success(nil)), .adopt, "made outside the engine: adopted")
        XCTAssertEqual(decide(.success("me")), .adopt, "its own account (a create whose answer was lost)")
        XCTAssertEqual(decide(.success("other")), .collision(owner: "other"), "another resource's: never (invariant 6)")
        XCTAssertEqual(decide(.success("other"), linked: ["me", "other"]), .adopt, "users linked into one account share it")
        XCTAssertEqual(decide(.success("me"), leftLink: true), .collision(owner: "me"), "it left that account to the others")
        guard case .retry(let why) = decide(.failure(ReadError())) else { return XCTFail("a read error adopts nothing") }
        XCTAssertTrue(why.contains("t9"), why)
        XCTAssertEqual(SCIMOperations.uniqueAttribute("User"), "userName")
        XCTAssertEqual(SCIMOperations.uniqueAttribute("Group"), "displayName")
        guard
            case .deadLetter(_, _, _, let status, let reason) = SCIMOperations.collision(
                attribute: "userName", value: "ann", target: "app", targetID: "t9", owner: "b2", ownerDomain: "acme-fr", me: "b1",
                myDomain: "acme-de", path: "/Users", [])
        else { return XCTFail() }
        XCTAssertEqual(status, 409)
        XCTAssertTrue(reason.contains("acme-fr") && reason.contains("acme-de") && reason.contains("b1") && reason.contains("b2"), reason)
    }

    func testACreateAnswerWithoutAnIdIsNotTakenForSuccess() {
        XCTAssertEqual(SCIMOperations.created(answer(201, #"{"id":"t1","userName":"a"}"#))?.id, "t1")
        XCTAssertNil(SCIMOperations.created(answer(201, #"{"userName":"a"}"#)))
        XCTAssertNil(SCIMOperations.created(answer(201, "")))
        XCTAssertEqual(SCIMOperations.etag(answer(200, headers: ["ETag": #"W/"3""#]), nil), #"W/"3""#)
        XCTAssertEqual(SCIMOperations.etag(answer(200), try! JSONParser.parse(Array(#"{"meta":{"version":"W/\"4\""}}"#.utf8))), #"W/"4""#)
    }

    func testA501ToTheFilterFormOfRemovalFallsBackToTheValueListForm() {
        let filtered = SCIMOperations.patchBody(SCIMOperations.memberOperations(add: [], remove: ["u1", "u2"], form: .filter))
        XCTAssertTrue(SCIMOperations.onlyFilteredMemberRemovals(filtered), "only removals by filter: the form can be changed")
        let mixed = SCIMOperations.patchBody(SCIMOperations.memberOperations(add: [["value": "u3"]], remove: ["u1"], form: .filter))
        XCTAssertFalse(SCIMOperations.onlyFilteredMemberRemovals(mixed), "with an add, the 501 may be the add's")
        XCTAssertFalse(SCIMOperations.onlyFilteredMemberRemovals(SCIMOperations.patchBody([])))
        let ops = SCIMOperations.memberOperations(add: [], remove: ["u1", "u2"], form: .valueList)
        XCTAssertEqual(ops.count, 1, "one removal with a value list")
        XCTAssertEqual(ops[0]["path"]?.stringValue, "members")
        XCTAssertEqual(ops[0]["value"]?.arrayValue?.compactMap { $0["value"]?.stringValue }, ["u1", "u2"])
        XCTAssertFalse(SCIMOperations.onlyFilteredMemberRemovals(SCIMOperations.patchBody(ops)), "never sent twice")
        let parsed = try! JSONParser.parse(filtered)
        XCTAssertEqual(parsed["schemas"]?.arrayValue?.first?.stringValue, "urn:ietf:params:scim:api:messages:2.0:PatchOp")
        XCTAssertEqual(
            parsed["Operations"]?.arrayValue?.compactMap { $0["path"]?.stringValue },
            [#"members[value eq "u1"]"#, #"members[value eq "u2"]"#])
    }

    func testWhatAnAnswerSaysOfTheMembersSent() {
        let sent: JSONObject = ["displayName": "g", "members": [["value": "a"], ["value": "b"]]]
        // django-scim2: a POST answered 201 with no members at all.
        let none = SCIMOperations.answeredMembers(
            try! JSONParser.parse(Array(#"{"id":"g1","displayName":"g"}"#.utf8)), sent: sent, before: nil, whole: true,
            absentMeansNone: true)
        XCTAssertEqual(none?.held.count, 0)
        XCTAssertEqual(none?.tookNothing, true)
        XCTAssertNil(
            SCIMOperations.answeredMembers(
                try! JSONParser.parse(Array(#"{"id":"g1","displayName":"g"}"#.utf8)), sent: sent, before: nil, whole: true,
                absentMeansNone: false), "without PATCH to repair it, a missing list says nothing")
        XCTAssertNil(
            SCIMOperations.answeredMembers(
                try! JSONParser.parse(Array(#"{"id":"g1","members":[{"value":"A"}]}"#.utf8)), sent: sent, before: nil, whole: true,
                absentMeansNone: true), "a shorter list after a POST may be a capped one (ids compared case-insensitively)")
        // A PATCH answer that lists what the target kept, without the member added.
        let partial = SCIMOperations.answeredMembers(
            try! JSONParser.parse(Array(#"{"id":"g1","members":[{"value":"a"}]}"#.utf8)), sent: sent, before: [["value": "a"]],
            whole: false, absentMeansNone: false)
        XCTAssertEqual(partial?.held.compactMap { $0["value"]?.stringValue }, ["a"])
        XCTAssertEqual(partial?.tookNothing, true)
        XCTAssertNil(
            SCIMOperations.answeredMembers(
                try! JSONParser.parse(Array(#"{"id":"g1","members":[]}"#.utf8)), sent: sent, before: [["value": "a"]], whole: false,
                absentMeansNone: false), "a list without what it kept is partial: believed for nothing")
        XCTAssertEqual(
            SCIMOperations.answeredMemberList(try! JSONParser.parse(Array(#"{"id":"g","members":null}"#.utf8)))?.count, 0)
        XCTAssertNil(SCIMOperations.answeredMemberList(try! JSONParser.parse(Array(#"{"id":"g"}"#.utf8))))
        XCTAssertNil(SCIMOperations.answeredMemberList(try! JSONParser.parse(Array(#"{"members":[]}"#.utf8))), "not a resource")
    }

    func testADeactivationIsAPatchOfActiveOrAWholePut() {
        let (m1, b1) = SCIMOperations.deactivation(usesPatch: true, sent: ["userName": "a", "active": false], targetID: "t1")
        XCTAssertEqual(m1, "PATCH")
        XCTAssertEqual(try JSONParser.parse(b1)["Operations"]?.arrayValue?.first?["path"]?.stringValue, "active")
        let (m2, b2) = SCIMOperations.deactivation(usesPatch: false, sent: ["userName": "a", "active": false], targetID: "t1")
        XCTAssertEqual(m2, "PUT")
        let put = try? JSONParser.parse(b2)
        XCTAssertEqual(put?["id"]?.stringValue, "t1")
        XCTAssertEqual(put?["userName"]?.stringValue, "a", "the whole account: a PUT replaces it")
        XCTAssertEqual(put?["active"]?.boolValue, false)
    }

    func testEveryRequestCarriesTheTokenAndTheChangesTraceContext() {
        let trace = String(repeating: "ab", count: 16)
        let r = SCIMOperations.request("POST", "/Users", token: "tok", trace: trace.uppercased(), body: Array("{}".utf8))
        XCTAssertEqual(r.headers["Authorization"], "Bearer tok")
        XCTAssertEqual(r.headers["Content-Type"], "application/scim+json")
        let parts = (r.headers["traceparent"] ?? "").split(separator: "-")
        XCTAssertEqual(parts.count, 4)
        XCTAssertEqual(String(parts[1]), trace, "the trace id, lowercased")
        let fresh = SCIMOperations.headers(token: nil, trace: "reconcile-1")["traceparent"] ?? ""
        XCTAssertEqual(fresh.split(separator: "-")[1].count, 32, "not a trace id: a new one")
        XCTAssertNil(SCIMOperations.headers(token: nil, trace: "")["Authorization"])
        XCTAssertNil(SCIMOperations.request("GET", "/Users", token: nil, trace: "", body: []).headers["Content-Type"])
    }
}
