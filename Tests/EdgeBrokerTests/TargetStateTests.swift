import EdgeAgent
import EdgeBroker
import EdgeHTTP
import EdgeTestSupport
import Foundation
import SCIM
import XCTest

/// Answers that say something about the target, not about one change:
/// refused credentials pause it, 501 is a property of a request form.
extension FanoutTests {
    /// A target whose token expired answers 401 to everything: the target
    /// pauses with its queue kept (no dead letters), `targets status` and
    /// `/metrics` say so, and after the token file is rotated and the broker
    /// gets SIGHUP every queued change arrives.
    func testRefusedCredentialsPauseTheTargetAndSIGHUPResumesIt() throws {
        let (_, appPort) = try startAppAgent("app")
        let accepted = Locked("Bearer new-token")
        let proxy = try ServerHarness { request, _, responder in
            guard request.headers["Authorization"] == accepted.current || request.path.hasSuffix("/ServiceProviderConfig") else {
                responder.respond(
                    HTTPResponse(
                        status: 401, headers: ["Content-Type": "application/scim+json"],
                        body: Array(
                            #"{"schemas":["urn:ietf:params:scim:api:messages:2.0:Error"],"status":"401","detail":"token expired"}"#.utf8)))
                return
            }
            var forwarded = request
            forwarded.headers.set("Authorization", "Bearer t")
            responder.respond(forward(forwarded, to: appPort))
        }
        defer { _ = proxy.stop() }
        let (broker, bp) = try startBroker(yaml: "targets:\n" + target("app", port: proxy.port, token: "old-token"))
        let (_, dp) = try startAgent("de", cert: de, domain: "acme-de", brokerPort: bp)
        for k in 0..<5 { _ = try newUser(dp, "waiting-\(k)") }
        XCTAssertTrue(
            eventually(seconds: 20) {
                (try? self.brokerMetrics(broker)).flatMap { self.metric($0, #"scim_broker_target_credentials_refused{target="app"}"#) } == 1
            }, (try? brokerMetrics(broker)) ?? "")
        XCTAssertTrue(
            eventually(seconds: 10) {
                ((try? self.brokerCLI(["targets", "status", "--data-dir", self.dir.file("broker")]).1) ?? "").contains(
                    "app\tcredentials-refused\tqueued 5")
            }, (try? brokerCLI(["targets", "status", "--data-dir", dir.file("broker")]).1) ?? "")
        XCTAssertTrue(
            eventually(seconds: 5) {
                broker.output.contains { $0.contains("refused the credentials") && $0.contains("\"level\":\"error\"") }
            },
            "\(broker.output)")
        let metrics = try brokerMetrics(broker)
        XCTAssertEqual(metric(metrics, #"scim_broker_target_dead_letters_total{target="app"}"#), 0, "no change is blamed for the token")
        XCTAssertEqual(metric(metrics, #"scim_broker_target_breaker_open{target="app"}"#), 0)
        XCTAssertTrue(users(appPort, token: "t", prefix: "/scim/v2").isEmpty)

        _ = dir.write("app.token", "new-token\n")
        broker.signal(SIGHUP)
        XCTAssertTrue(
            eventually(seconds: 20) { self.users(appPort, token: "t", prefix: "/scim/v2").count == 5 },
            "\(users(appPort, token: "t", prefix: "/scim/v2").keys)")
        XCTAssertTrue(
            eventually(seconds: 10) {
                (try? self.brokerMetrics(broker)).flatMap { self.metric($0, #"scim_broker_target_credentials_refused{target="app"}"#) } == 0
            })
        XCTAssertTrue(
            eventually(seconds: 5) { broker.output.contains { $0.contains("accepts the credentials again") } }, "\(broker.output)")
        XCTAssertEqual(try brokerCLI(["deadletter", "list", "--data-dir", dir.file("broker")]).1, "nothing to show: no dead letters\n")
    }

    /// A 403 to one change ("operation not permitted", RFC 7644 §3.12) is
    /// that change's: the credentials still work (the broker asks the target
    /// a request about no resource), so it becomes a dead letter with the
    /// target's answer, the target does not pause, and the changes after it
    /// are delivered.
    func testA403ForOneChangeIsADeadLetterNotAPause() throws {
        let (_, appPort) = try startAppAgent("app")
        let proxy = try ServerHarness { request, _, responder in
            if request.method == "POST", String(decoding: request.body, as: UTF8.self).contains("protected-admin") {
                responder.respond(
                    HTTPResponse(
                        status: 403, headers: ["Content-Type": "application/scim+json"],
                        body: Array(
                            #"{"schemas":["urn:ietf:params:scim:api:messages:2.0:Error"],"status":"403","detail":"not permitted for this account"}"#
                                .utf8)))
                return
            }
            responder.respond(forward(request, to: appPort))
        }
        defer { _ = proxy.stop() }
        let (broker, bp) = try startBroker(yaml: "targets:\n" + target("app", port: proxy.port))
        let (_, dp) = try startAgent("de", cert: de, domain: "acme-de", brokerPort: bp)
        _ = try newUser(dp, "protected-admin")
        for k in 0..<3 { _ = try newUser(dp, "after-\(k)") }
        XCTAssertTrue(
            eventually(seconds: 20) { self.users(appPort, token: "t", prefix: "/scim/v2").count == 3 },
            "\(users(appPort, token: "t", prefix: "/scim/v2").keys)")
        XCTAssertTrue(
            eventually(seconds: 10) {
                ((try? self.brokerCLI(["deadletter", "list", "--data-dir", self.dir.file("broker")]).1) ?? "").contains("403")
            }, (try? brokerCLI(["deadletter", "list", "--data-dir", dir.file("broker")]).1) ?? "")
        let metrics = try brokerMetrics(broker)
        XCTAssertEqual(metric(metrics, #"scim_broker_target_credentials_refused{target="app"}"#), 0, "no pause for one change's 403")
        XCTAssertEqual(metric(metrics, #"scim_broker_target_dead_letters_total{target="app"}"#), 1)
    }

    /// `maxMembersPerPatch: 2`: the target receives no request that adds or
    /// removes more than 2 members; a new group of 5 is created with 2 and
    /// grown by PATCH, a change of 5 members goes as 3 PATCHes, and the group
    /// at the target ends exactly right.
    func testMembershipChangesGoInChunksOfMaxMembersPerPatch() throws {
        let (_, appPort) = try startAppAgent("app")
        let sizes = Locked<[(String, Int)]>([])
        let proxy = try ServerHarness { request, _, responder in
            if request.path.contains("/Groups"), request.method == "POST" || request.method == "PATCH",
                let doc = try? JSONParser.parse(request.body)
            {
                let n: Int
                if request.method == "POST" {
                    n = doc["members"]?.arrayValue?.count ?? 0
                } else {
                    n = (doc["Operations"]?.arrayValue ?? []).reduce(0) { total, op in
                        let path = op["path"]?.stringValue ?? ""
                        if path.hasPrefix("members[") { return total + 1 }
                        if path == "members" { return total + (op["value"]?.arrayValue?.count ?? 1) }
                        return total
                    }
                }
                sizes.withLock { $0.append((request.method, n)) }
            }
            responder.respond(forward(request, to: appPort))
        }
        defer { _ = proxy.stop() }
        let (_, bp) = try startBroker(yaml: "targets:\n" + target("app", port: proxy.port, extra: "    maxMembersPerPatch: 2"))
        let (_, dp) = try startAgent("de", cert: de, domain: "acme-de", brokerPort: bp)
        let ids = try (0..<8).map { try newUser(dp, "member\($0)") }
        let members = ids[0..<5].map { #"{"value":"\#($0)"}"# }.joined(separator: ",")
        let (status, group) = try idp(
            dp, "POST", "/Groups", #"{"schemas":["\#(groupSchema)"],"displayName":"big","members":[\#(members)]}"#)
        XCTAssertEqual(status, 201)
        let gid = try XCTUnwrap(group?["id"]?.stringValue)
        func atTarget() -> Set<String> {
            let appUsers = users(appPort, token: "t", prefix: "/scim/v2")
            let byTargetID = Dictionary(uniqueKeysWithValues: appUsers.compactMap { name, u in u["id"]?.stringValue.map { ($0, name) } })
            return Set(
                groups(appPort, token: "t", prefix: "/scim/v2")["big"]?["members"]?.arrayValue?.compactMap {
                    $0["value"]?.stringValue.flatMap { byTargetID[$0] }
                } ?? [])
        }
        XCTAssertTrue(eventually(seconds: 20) { atTarget() == Set((0..<5).map { "member\($0)" }) }, "\(atTarget())")
        // Remove two, add three: five member changes.
        let ops =
            #"[{"op":"remove","path":"members[value eq \"\#(ids[0])\"]"},{"op":"remove","path":"members[value eq \"\#(ids[1])\"]"},"#
            + #"{"op":"add","path":"members","value":[{"value":"\#(ids[5])"},{"value":"\#(ids[6])"},{"value":"\#(ids[7])"}]}]"#
        XCTAssertEqual(
            try idp(dp, "PATCH", "/Groups/\(gid)", #"{"schemas":["urn:ietf:params:scim:api:messages:2.0:PatchOp"],"Operations":\#(ops)}"#)
                .0, 200)
        XCTAssertTrue(eventually(seconds: 20) { atTarget() == Set((2..<8).map { "member\($0)" }) }, "\(atTarget())")
        let seen = sizes.current
        XCTAssertTrue(seen.allSatisfy { $0.1 <= 2 }, "no request changes more than 2 members: \(seen)")
        XCTAssertEqual(seen.first?.0, "POST")
        XCTAssertGreaterThanOrEqual(seen.filter { $0.0 == "PATCH" }.count, 5, "2 + 1 PATCHes to grow it, 3 for the change: \(seen)")
    }

    /// A target answering 501 to every group PATCH that removes members
    /// (by `members[value eq …]` and by a value list): the broker tries the
    /// other form once, then sends the group as a full PUT, never retries a
    /// 501 as a fault and never opens the breaker; a create answered 501
    /// becomes a dead letter with the target's answer at once.
    func testNotImplementedIsNeverRetriedAndAPatchFallsBackToPut() throws {
        let (_, appPort) = try startAppAgent("app")
        let notImplemented =
            #"{"schemas":["urn:ietf:params:scim:api:messages:2.0:Error"],"status":"501","detail":"filtered member removal is not implemented"}"#
        let refusals = Locked(0)
        let proxy = try ServerHarness { request, _, responder in
            let body = String(decoding: request.body, as: UTF8.self)
            let removesMembers = body.contains("members[value eq") || (body.contains(#""op":"remove","path":"members","value""#))
            if (request.method == "PATCH" && removesMembers) || (request.method == "POST" && body.contains("unimplemented")) {
                refusals.withLock { $0 += 1 }
                responder.respond(
                    HTTPResponse(status: 501, headers: ["Content-Type": "application/scim+json"], body: Array(notImplemented.utf8)))
                return
            }
            responder.respond(forward(request, to: appPort))
        }
        defer { _ = proxy.stop() }
        let (broker, bp) = try startBroker(yaml: "targets:\n" + target("app", port: proxy.port, extra: "    breakerThreshold: 2"))
        let (_, dp) = try startAgent("de", cert: de, domain: "acme-de", brokerPort: bp)
        let alice = try newUser(dp, "alice"), bob = try newUser(dp, "bob")
        let (status, group) = try idp(
            dp, "POST", "/Groups",
            #"{"schemas":["\#(groupSchema)"],"displayName":"team","members":[{"value":"\#(alice)"},{"value":"\#(bob)"}]}"#)
        XCTAssertEqual(status, 201)
        let groupID = try XCTUnwrap(group?["id"]?.stringValue)
        XCTAssertTrue(
            eventually(seconds: 20) { self.groups(appPort, token: "t", prefix: "/scim/v2")["team"]?["members"]?.arrayValue?.count == 2 })
        XCTAssertEqual(
            try idp(
                dp, "PATCH", "/Groups/\(groupID)",
                #"{"schemas":["urn:ietf:params:scim:api:messages:2.0:PatchOp"],"Operations":[{"op":"remove","path":"members[value eq \"\#(alice)\"]"}]}"#
            ).0, 200)
        XCTAssertTrue(
            eventually(seconds: 20) { self.groups(appPort, token: "t", prefix: "/scim/v2")["team"]?["members"]?.arrayValue?.count == 1 },
            "the removal arrives as a PUT: \(groups(appPort, token: "t", prefix: "/scim/v2"))")
        XCTAssertEqual(refusals.current, 2, "each removal form was tried once, then PUT")
        _ = try newUser(dp, "unimplemented")
        XCTAssertTrue(
            eventually(seconds: 20) {
                ((try? self.brokerCLI(["deadletter", "list", "--data-dir", self.dir.file("broker")]).1) ?? "").contains("501")
            }, (try? brokerCLI(["deadletter", "list", "--data-dir", dir.file("broker")]).1) ?? "")
        let metrics = try brokerMetrics(broker)
        XCTAssertEqual(metric(metrics, #"scim_broker_target_retries_total{target="app"}"#), 0, metrics)
        XCTAssertEqual(metric(metrics, #"scim_broker_target_breaker_open{target="app"}"#), 0)
        XCTAssertEqual(metric(metrics, #"scim_broker_target_dead_letters_total{target="app"}"#), 1)
        XCTAssertEqual(refusals.current, 3, "the create answered 501 was not retried")
    }

    /// A target that behaves like django-scim2: it drops `members` given on
    /// POST and PUT (answering success with no members) and answers 501 to
    /// removal by `members[value eq …]`, but takes PATCH adds and removal
    /// with a value list. The broker sees from the answers what the target
    /// holds, grows the group by PATCH, removes with the value-list form
    /// after one 501 and keeps using it, and the group at the target ends
    /// exactly right, with no dead letter.
    func testMembersDroppedOnCreateAreSeenAndTheRemovalFormIsLearnt() throws {
        let (_, appPort) = try startAppAgent("app")
        let filterRemovals = Locked(0), valueListRemovals = Locked(0)
        let proxy = try ServerHarness { request, _, responder in
            let body = String(decoding: request.body, as: UTF8.self)
            if request.path.contains("/Groups"), request.method == "PATCH", body.contains("members[value eq") {
                filterRemovals.withLock { $0 += 1 }
                let error = #"{"schemas":["urn:ietf:params:scim:api:messages:2.0:Error"],"status":"501","detail":"not implemented"}"#
                responder.respond(HTTPResponse(status: 501, headers: ["Content-Type": "application/scim+json"], body: Array(error.utf8)))
                return
            }
            if request.path.contains("/Groups"), request.method == "PATCH", body.contains(#""op":"remove","path":"members","value""#) {
                valueListRemovals.withLock { $0 += 1 }
            }
            var forwarded = request
            if request.path.contains("/Groups"), request.method == "POST" || request.method == "PUT",
                var doc = (try? JSONParser.parse(request.body))?.objectValue
            {
                doc["members"] = nil  // dropped, as django-scim2 does
                forwarded.body = JSON.object(doc).serialized()
            }
            responder.respond(forward(forwarded, to: appPort))
        }
        defer { _ = proxy.stop() }
        let (broker, bp) = try startBroker(yaml: "targets:\n" + target("app", port: proxy.port))
        let (_, dp) = try startAgent("de", cert: de, domain: "acme-de", brokerPort: bp)
        let ids = try (0..<4).map { try newUser(dp, "m\($0)") }
        func atTarget() -> Set<String> {
            let appUsers = users(appPort, token: "t", prefix: "/scim/v2")
            let byTargetID = Dictionary(uniqueKeysWithValues: appUsers.compactMap { name, u in u["id"]?.stringValue.map { ($0, name) } })
            return Set(
                groups(appPort, token: "t", prefix: "/scim/v2")["crew"]?["members"]?.arrayValue?.compactMap {
                    $0["value"]?.stringValue.flatMap { byTargetID[$0] }
                } ?? [])
        }
        XCTAssertTrue(eventually(seconds: 20) { self.users(appPort, token: "t", prefix: "/scim/v2").count == 4 })
        let members = ids[0..<3].map { #"{"value":"\#($0)"}"# }.joined(separator: ",")
        let (status, group) = try idp(
            dp, "POST", "/Groups", #"{"schemas":["\#(groupSchema)"],"displayName":"crew","members":[\#(members)]}"#)
        XCTAssertEqual(status, 201)
        let gid = try XCTUnwrap(group?["id"]?.stringValue)
        XCTAssertTrue(
            eventually(seconds: 20) { atTarget() == ["m0", "m1", "m2"] }, "members dropped on POST arrive by PATCH: \(atTarget())")
        // Two removals, one after the other: the first learns the form, the second uses it at once.
        for (n, id) in [ids[0], ids[1]].enumerated() {
            let remove = #"[{"op":"remove","path":"members[value eq \"\#(id)\"]"}]"#
            XCTAssertEqual(
                try idp(
                    dp, "PATCH", "/Groups/\(gid)", #"{"schemas":["urn:ietf:params:scim:api:messages:2.0:PatchOp"],"Operations":\#(remove)}"#
                ).0,
                200)
            let want: Set<String> = n == 0 ? ["m1", "m2"] : ["m2"]
            XCTAssertTrue(eventually(seconds: 20) { atTarget() == want }, "\(atTarget())")
        }
        XCTAssertEqual(filterRemovals.current, 1, "one 501, then the value-list form is remembered")
        XCTAssertEqual(valueListRemovals.current, 2)
        // A PUT of the group (a replace by the IdP) drops the members again: seen and repaired by PATCH.
        let put = #"{"schemas":["\#(groupSchema)"],"displayName":"crew","members":[{"value":"\#(ids[2])"},{"value":"\#(ids[3])"}]}"#
        XCTAssertEqual(try idp(dp, "PUT", "/Groups/\(gid)", put).0, 200)
        XCTAssertTrue(eventually(seconds: 20) { atTarget() == ["m2", "m3"] }, "\(atTarget())")
        let metrics = try brokerMetrics(broker)
        XCTAssertEqual(metric(metrics, #"scim_broker_target_dead_letters_total{target="app"}"#), 0, metrics)
    }

    /// A target that answers with a partial member list (the first member
    /// only, as a paging or capping server might) but holds them all: only
    /// the members of each change are judged, so nothing is re-sent as
    /// dropped and nothing becomes a dead letter.
    func testAPartialMemberListInAnswersIsNotTakenForDroppedMembers() throws {
        let (_, appPort) = try startAppAgent("app")
        let proxy = try ServerHarness { request, _, responder in
            var r = forward(request, to: appPort)
            if request.path.contains("/Groups"), var doc = (try? JSONParser.parse(r.body))?.objectValue,
                let members = doc["members"]?.arrayValue, members.count > 1
            {
                doc["members"] = .array([members[0]])
                r.body = JSON.object(doc).serialized()
            }
            responder.respond(r)
        }
        defer { _ = proxy.stop() }
        let (broker, bp) = try startBroker(yaml: "targets:\n" + target("app", port: proxy.port))
        let (_, dp) = try startAgent("de", cert: de, domain: "acme-de", brokerPort: bp)
        let ids = try (0..<4).map { try newUser(dp, "p\($0)") }
        XCTAssertTrue(eventually(seconds: 20) { self.users(appPort, token: "t", prefix: "/scim/v2").count == 4 })
        let members = ids[0..<3].map { #"{"value":"\#($0)"}"# }.joined(separator: ",")
        let (status, group) = try idp(
            dp, "POST", "/Groups", #"{"schemas":["\#(groupSchema)"],"displayName":"paged","members":[\#(members)]}"#)
        XCTAssertEqual(status, 201)
        let gid = try XCTUnwrap(group?["id"]?.stringValue)
        let add = #"[{"op":"add","path":"members","value":[{"value":"\#(ids[3])"}]}]"#
        XCTAssertEqual(
            try idp(dp, "PATCH", "/Groups/\(gid)", #"{"schemas":["urn:ietf:params:scim:api:messages:2.0:PatchOp"],"Operations":\#(add)}"#)
                .0, 200)
        XCTAssertTrue(
            eventually(seconds: 20) { self.groups(appPort, token: "t", prefix: "/scim/v2")["paged"]?["members"]?.arrayValue?.count == 4 })
        let metrics = try brokerMetrics(broker)
        XCTAssertEqual(metric(metrics, #"scim_broker_target_dead_letters_total{target="app"}"#), 0, metrics)
    }

    /// A target that drops a member from an add the first time it sees it,
    /// and holds a member the broker never sent: its complete answer is
    /// believed (every member it kept is listed), the dropped member is sent
    /// again, and the group ends right, the target's own member untouched.
    func testADroppedMemberIsSentAgainWhenTheTargetHoldsOthersToo() throws {
        let (_, appPort) = try startAppAgent("app")
        let seen = Locked(Set<String>()), drops = Locked(0)
        let proxy = try ServerHarness { request, _, responder in
            var forwarded = request
            if request.path.contains("/Groups"), request.method == "PATCH", var doc = (try? JSONParser.parse(request.body))?.objectValue,
                var ops = doc["Operations"]?.arrayValue
            {
                for (k, op) in ops.enumerated() where op["op"]?.stringValue == "add" {
                    guard var o = op.objectValue, var values = o["value"]?.arrayValue, values.count > 1,
                        let v = values.last?["value"]?.stringValue
                    else { continue }
                    if seen.withLock({ $0.insert(v).inserted }) {
                        values.removeLast()  // dropped, silently, once
                        drops.withLock { $0 += 1 }
                    }
                    o["value"] = .array(values)
                    ops[k] = .object(o)
                }
                doc["Operations"] = .array(ops)
                forwarded.body = JSON.object(doc).serialized()
            }
            // No If-Match: the app's own member is a change the broker's ETag would otherwise overwrite (412, then PUT).
            forwarded.headers.remove("If-Match")
            responder.respond(forward(forwarded, to: appPort))
        }
        defer { _ = proxy.stop() }
        let (broker, bp) = try startBroker(yaml: "targets:\n" + target("app", port: proxy.port))
        let (_, dp) = try startAgent("de", cert: de, domain: "acme-de", brokerPort: bp)
        let ids = try (0..<4).map { try newUser(dp, "d\($0)") }
        XCTAssertTrue(eventually(seconds: 20) { self.users(appPort, token: "t", prefix: "/scim/v2").count == 4 })
        let (status, group) = try idp(
            dp, "POST", "/Groups", #"{"schemas":["\#(groupSchema)"],"displayName":"mixed","members":[{"value":"\#(ids[0])"}]}"#)
        XCTAssertEqual(status, 201)
        let gid = try XCTUnwrap(group?["id"]?.stringValue)
        XCTAssertTrue(eventually(seconds: 20) { self.groups(appPort, token: "t", prefix: "/scim/v2")["mixed"] != nil })
        // A member of the app's own, added there directly.
        let (_, own) = try scim(appPort, "POST", "/Users", #"{"schemas":["\#(userSchema)"],"userName":"app-own"}"#)
        let ownID = try XCTUnwrap(own?["id"]?.stringValue)
        let appGroup = try XCTUnwrap(groups(appPort, token: "t", prefix: "/scim/v2")["mixed"]?["id"]?.stringValue)
        let addOwn = #"[{"op":"add","path":"members","value":[{"value":"\#(ownID)"}]}]"#
        XCTAssertEqual(
            try scim(
                appPort, "PATCH", "/Groups/\(appGroup)",
                #"{"schemas":["urn:ietf:params:scim:api:messages:2.0:PatchOp"],"Operations":\#(addOwn)}"#
            ).0,
            200)
        let add = ids[1...].map { #"{"value":"\#($0)"}"# }.joined(separator: ",")
        XCTAssertEqual(
            try idp(
                dp, "PATCH", "/Groups/\(gid)",
                #"{"schemas":["urn:ietf:params:scim:api:messages:2.0:PatchOp"],"Operations":[{"op":"add","path":"members","value":[\#(add)]}]}"#
            ).0, 200)
        XCTAssertTrue(
            eventually(seconds: 20) { self.groups(appPort, token: "t", prefix: "/scim/v2")["mixed"]?["members"]?.arrayValue?.count == 5 },
            "\(groups(appPort, token: "t", prefix: "/scim/v2")["mixed"] ?? .null)")
        XCTAssertEqual(drops.current, 1, "one member was dropped once")
        let metrics = try brokerMetrics(broker)
        XCTAssertEqual(metric(metrics, #"scim_broker_target_dead_letters_total{target="app"}"#), 0, metrics)
    }
}
