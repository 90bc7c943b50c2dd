import EdgeAgent
import EdgeHTTP
import EdgeLoop
import EdgeStore
import EdgeTestSupport
import Foundation
import SCIM
import XCTest

/// A running agent in this process (its own loop thread) on a temp LMDB file.
final class AgentHarness: @unchecked Sendable {  // fields are immutable after init
    let dir = TempDirectory("edge-agent")
    let token = "test-token-\(UInt32.random(in: 0...UInt32.max))"
    let port: Int
    let thread: LoopThread
    let service: OneShot<LoopBound<AgentService>>

    let adminPort: Int

    init(
        scanBudget: Int = 100_000, maxBody: Int = 1 << 20,
        configure: @escaping @Sendable (inout AgentConfiguration) -> Void = { _ in }
    ) throws {
        let ready = OneShot<LoopBound<AgentService>>()
        let path = dir.file("data"), token = self.token
        thread = try LoopThread.start { loop in
            var config = AgentConfiguration(dataDirectory: path, listen: SocketAddress(host: "127.0.0.1", port: 0))
            config.tokens = [token]
            config.endpoint.recordOutbox = true  // the tests read what a broker would get
            config.endpoint.scanBudget = scanBudget
            config.limits.maxBodyBytes = maxBody
            config.adminListen = SocketAddress(host: "127.0.0.1", port: 0)
            configure(&config)
            ready.fulfil(LoopBound(try AgentService(loop: loop, configuration: config)))
        }
        service = ready
        let bound = ready.wait()!
        port = thread.inbox.sendAndWait { bound.value.server.port } ?? 0
        adminPort = thread.inbox.sendAndWait { bound.value.adminServer?.port ?? 0 } ?? 0
    }

    /// GET on the operations listener: (status, body).
    func admin(_ path: String) throws -> (Int, String) {
        let client = try RawClient(port: adminPort)
        client.send("GET \(path) HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        let r = try XCTUnwrap(client.readResponses(1).first)
        return (r.status, r.body)
    }

    /// Stops the agent; returns the handles left open (0 = clean).
    func stop() -> Int {
        let s = service.wait()!
        thread.inbox.send { s.value.shutdown() }
        let left = thread.join()
        return left
    }

    deinit { dir.remove() }

    struct Reply {
        let status: Int
        let head: String
        let body: JSON?
        let raw: String
        func header(_ name: String) -> String? {
            head.split(separator: "\r\n").first { $0.lowercased().hasPrefix(name.lowercased() + ":") }
                .map { String($0.dropFirst(name.count + 1)).trimmingCharacters(in: .whitespaces) }
        }
    }

    /// One request on its own connection.
    func call(
        _ method: String, _ path: String, _ body: String? = nil, headers: [String: String] = [:],
        token: String? = nil
    ) throws -> Reply {
        let client = try RawClient(port: port)
        var head = "\(method) /scim/v2\(path) HTTP/1.1\r\nHost: 127.0.0.1:\(port)\r\nConnection: close\r\n"
        head += "Authorization: Bearer \(token ?? self.token)\r\n"
        for (k, v) in headers { head += "\(k): \(v)\r\n" }
        if let body {
            if headers["Content-Type"] == nil { head += "Content-Type: application/scim+json\r\n" }
            head += "Content-Length: \(body.utf8.count)\r\n"
        }
        client.send(head + "\r\n" + (body ?? ""))
        guard let r = client.readResponses(1).first else { throw POSIXError(.EIO) }
        return Reply(status: r.status, head: r.head, body: r.body.isEmpty ? nil : try? JSONParser.parse(r.body), raw: r.body)
    }

    /// The store, opened after the agent stopped (or read-only alongside).
    func openStore() throws -> AgentStore { try AgentStore(path: dir.file("data"), registry: .standard) }
}

let userSchema = #"["urn:ietf:params:scim:schemas:core:2.0:User"]"#
func userBody(_ name: String, extra: String = "") -> String {
    #"{"schemas":\#(userSchema),"userName":"\#(name)"\#(extra)}"#
}

final class AgentTests: XCTestCase {
    func testUserLifecycleWithETagsAndOutboxEvents() throws {
        let agent = try AgentHarness()
        let created = try agent.call(
            "POST", "/Users", userBody("bjensen", extra: #","name":{"givenName":"Barbara"}"#),
            headers: ["traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"])
        XCTAssertEqual(created.status, 201)
        let id = try XCTUnwrap(created.body?["id"]?.stringValue)
        let parts = id.split(separator: "-").map(\.count)
        XCTAssertEqual(parts, [8, 4, 4, 4, 12], "a UUID: \(id)")
        XCTAssertTrue(id.allSatisfy { $0.isHexDigit || $0 == "-" } && Array(id)[14] == "7", "version 7: \(id)")
        let etag = try XCTUnwrap(created.header("ETag"))
        XCTAssertEqual(created.header("Location"), "http://127.0.0.1:\(agent.port)/scim/v2/Users/\(id)")
        XCTAssertEqual(created.body?["meta"]?["version"]?.stringValue, etag)

        XCTAssertEqual(try agent.call("GET", "/Users/\(id)", headers: ["If-None-Match": etag]).status, 304)
        let stale = try agent.call("PUT", "/Users/\(id)", userBody("bjensen", extra: #","title":"x""#), headers: ["If-Match": #"W/"999""#])
        XCTAssertEqual(stale.status, 412)
        let replaced = try agent.call("PUT", "/Users/\(id)", userBody("bjensen", extra: #","title":"Guide""#), headers: ["If-Match": etag])
        XCTAssertEqual(replaced.status, 200)
        XCTAssertNotEqual(replaced.header("ETag"), etag, "a new version")
        XCTAssertNil(replaced.body?["name"], "PUT replaces: name is gone")
        let patched = try agent.call(
            "PATCH", "/Users/\(id)",
            #"{"schemas":["urn:ietf:params:scim:api:messages:2.0:PatchOp"],"Operations":[{"op":"replace","path":"title","value":"Lead"}]}"#)
        XCTAssertEqual(patched.body?["title"], "Lead")
        XCTAssertEqual(try agent.call("DELETE", "/Users/\(id)").status, 204)
        XCTAssertEqual(try agent.call("GET", "/Users/\(id)").status, 404)
        XCTAssertEqual(agent.stop(), 0)

        let events = try agent.openStore().outboxEntries(after: 0, limit: 100)
        XCTAssertEqual(events.map(\.0), [1, 2, 3, 4], "one event per write, in order")
        let kinds = events.map { $0.1["events"]!.objectValue!.keys.first! }
        XCTAssertEqual(
            kinds,
            [
                "urn:ietf:params:SCIM:event:prov:create:full", "urn:ietf:params:SCIM:event:prov:put:full",
                "urn:ietf:params:SCIM:event:prov:patch:full", "urn:ietf:params:SCIM:event:prov:delete",
            ])
        XCTAssertEqual(events[0].1["txn"], "4bf92f3577b34da6a3ce929d0e0e4736", "trace id from traceparent")
        let first = events[0].1["events"]!["urn:ietf:params:SCIM:event:prov:create:full"]!
        XCTAssertEqual(first["ref"]?.stringValue, "/Users/\(id)")
        XCTAssertEqual(first["data"]?["userName"], "bjensen", "full state in the event")
        XCTAssertEqual(first["version"]?.stringValue, etag)
    }

    /// Ids are RFC 9562 version 7 UUIDs: creation time first, so ids sort by
    /// creation and a batch of creates lands on neighbouring B-tree pages.
    /// `maxConnections` is the agent's limit, not each serving loop's: with
    /// two loops and a limit of 2, a third connection is closed at accept
    /// (round-robin would hand it to a loop holding only one), and a slot
    /// freed on either loop admits the next.
    func testTheConnectionLimitHoldsAcrossServingLoops() throws {
        let agent = try AgentHarness { config in
            config.servingLoops = 2
            config.limits.maxConnections = 2
        }
        let request = "GET /scim/v2/ServiceProviderConfig HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer \(agent.token)\r\n\r\n"
        var open: [RawClient] = []
        for _ in 0..<2 {
            let client = try RawClient(port: agent.port)
            client.send(request)
            XCTAssertEqual(client.readResponses(1).first?.status, 200)
            open.append(client)
        }
        for _ in 0..<2 {
            let refused = try RawClient(port: agent.port)
            refused.send(request)
            XCTAssertEqual(refused.readToEnd(), "", "closed at accept: the agent holds 2 connections")
        }
        open.removeFirst()  // closes it: its slot comes back once its loop sees the end
        XCTAssertTrue(
            eventually(seconds: 10) {
                guard let next = try? RawClient(port: agent.port, timeoutSeconds: 2) else { return false }
                next.send(request)
                return next.readResponses(1).first?.status == 200
            }, "a freed slot admits a new connection")
        open.removeAll()
        XCTAssertEqual(agent.stop(), 0)
    }

    func testIDsAreTimeOrderedVersion7UUIDs() throws {
        let agent = try AgentHarness()
        var ids: [String] = []
        for k in 0..<3 {
            if k > 0 { usleep(2000) }
            let reply = try agent.call("POST", "/Users", userBody("ordered\(k)"))
            XCTAssertEqual(reply.status, 201)
            let id = try XCTUnwrap(reply.body?["id"]?.stringValue)
            let hex = Array(id.replacingOccurrences(of: "-", with: ""))
            XCTAssertEqual(hex[12], "7", "version 7: \(id)")
            XCTAssertTrue("89ab".contains(hex[16]), "RFC 9562 variant: \(id)")
            let millis = try XCTUnwrap(UInt64(String(hex[0..<12]), radix: 16))
            let created = try XCTUnwrap(reply.body?["meta"]?["created"]?.stringValue)
            let format = ISO8601DateFormatter()
            format.formatOptions = [.withInternetDateTime, .withFractionalSeconds]
            let createdMillis = UInt64((try XCTUnwrap(format.date(from: created)).timeIntervalSince1970 * 1000).rounded())
            XCTAssertEqual(millis, createdMillis, "the id starts with meta.created in ms: \(id) \(created)")
            ids.append(id)
        }
        XCTAssertEqual(ids, ids.sorted(), "later creates sort later")
        XCTAssertEqual(Set(ids).count, 3)
        XCTAssertEqual(agent.stop(), 0)
    }

    func testUserNameUniquenessIsCaseInsensitiveUnderConcurrentCreates() throws {
        let agent = try AgentHarness()
        let statuses = Locked<[Int]>([])
        let threads = (0..<16).map { k in
            Thread {
                let name = k % 2 == 0 ? "Racer@Example.com" : "racer@example.COM"
                let r = try? agent.call("POST", "/Users", userBody(name))
                statuses.withLock { $0.append(r?.status ?? 0) }
                if r?.status == 409 { XCTAssertEqual(r?.body?["scimType"], "uniqueness") }
            }
        }
        threads.forEach { $0.start() }
        XCTAssertTrue(eventually(seconds: 30) { statuses.current.count == 16 })
        XCTAssertEqual(statuses.current.filter { $0 == 201 }.count, 1, "exactly one create wins: \(statuses.current)")
        XCTAssertEqual(statuses.current.filter { $0 == 409 }.count, 15)
        XCTAssertEqual(agent.stop(), 0)
        XCTAssertEqual(try agent.openStore().outboxCount(), 1, "refused creates leave no event")
    }

    func testServingLoopsShareOneStoreOneWriterAndOneUniqueness() throws {
        // Three loops: connections are spread round-robin, so these requests
        // land on every loop; writes from all of them go through one writer.
        let agent = try AgentHarness { $0.servingLoops = 3 }
        let statuses = Locked<[Int]>([])
        let ids = Locked<[String]>([])
        let threads = (0..<12).map { k in
            Thread {
                // Half race for one userName, half create their own.
                let name = k % 2 == 0 ? "Shared@Example.com" : "own-\(k)"
                let r = try? agent.call("POST", "/Users", userBody(name))
                statuses.withLock { $0.append(r?.status ?? 0) }
                if r?.status == 201, let id = r?.body?["id"]?.stringValue { ids.withLock { $0.append(id) } }
            }
        }
        threads.forEach { $0.start() }
        XCTAssertTrue(eventually(seconds: 30) { statuses.current.count == 12 })
        XCTAssertEqual(statuses.current.filter { $0 == 201 }.count, 7, "6 own names and one winner of the race: \(statuses.current)")
        XCTAssertEqual(statuses.current.filter { $0 == 409 }.count, 5)
        // Every loop reads what any loop wrote (one GET per connection: each lands on the next loop).
        for id in ids.current {
            for _ in 0..<3 { XCTAssertEqual(try agent.call("GET", "/Users/\(id)").status, 200) }
        }
        // One keep-alive connection stays on its loop for all its requests.
        var client: RawClient? = try RawClient(port: agent.port)
        for _ in 0..<3 {
            client!.send(
                "GET /scim/v2/Users?filter=userName%20eq%20%22own-1%22 HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer \(agent.token)\r\n\r\n")
        }
        let answers = client!.readResponses(3)
        XCTAssertEqual(answers.map(\.status), [200, 200, 200])
        XCTAssertTrue(answers.allSatisfy { $0.body.contains("own-1") })
        // The metrics add up every loop's requests and connections.
        let (_, metrics) = try agent.admin("/metrics")
        let total = metrics.split(separator: "\n").filter { $0.hasPrefix("scim_edge_requests_total{") }
            .compactMap { Int($0.split(separator: " ").last!) }.reduce(0, +)
        XCTAssertEqual(total, 12 + 3 * 7 + 3, metrics)
        for loop in 0..<3 {
            let line = metrics.split(separator: "\n").first { $0.hasPrefix("scim_edge_loop_requests_total{loop=\"\(loop)\"}") }
            XCTAssertGreaterThan(Int(line?.split(separator: " ").last ?? "") ?? 0, 5, "loop \(loop) served its share: \(metrics)")
        }
        XCTAssertTrue(metrics.contains("scim_edge_committed_writes_total 12\n"), metrics)
        XCTAssertTrue(
            eventually(seconds: 10) { (try? agent.admin("/metrics").1.contains("scim_edge_http_connections 1\n")) == true },
            "the kept-alive connection is counted on its loop")
        client = nil
        // Draining ends every loop; the main one closes clean.
        XCTAssertEqual(agent.stop(), 0)
        XCTAssertEqual(try agent.openStore().outboxCount(), 7, "one event per accepted create")
    }

    func testFiltersByIndexAndByScan() throws {
        let agent = try AgentHarness(scanBudget: 30)
        for k in 0..<40 {
            let r = try agent.call(
                "POST", "/Users", userBody("user\(k)", extra: #","externalId":"ext-\#(k)","title":"\#(k % 4 == 0 ? "Lead" : "Guide")""#))
            XCTAssertEqual(r.status, 201)
        }
        func q(_ filter: String) throws -> AgentHarness.Reply {
            try agent.call("GET", "/Users?filter=" + filter.addingPercentEncoding(withAllowedCharacters: .alphanumerics)!)
        }
        XCTAssertEqual(try q(#"userName eq "USER7""#).body?["totalResults"], 1, "userName index, case-insensitive")
        XCTAssertEqual(try q(#"externalId eq "ext-12""#).body?["Resources"]?.arrayValue?.first?["userName"], "user12")
        XCTAssertEqual(try q(#"externalId eq "EXT-12""#).body?["totalResults"], 0, "externalId is caseExact")
        XCTAssertEqual(try q(#"userName eq "user8" and title eq "Lead""#).body?["totalResults"], 1, "index then filter")
        XCTAssertEqual(try q(#"userName eq "user9" and title eq "Lead""#).body?["totalResults"], 0)
        let scan = try q(#"title eq "Lead""#)
        XCTAssertEqual(scan.status, 200, "a scan over the budget pages by cursor")
        XCTAssertNotNil(scan.body?["nextCursor"])
        let indexed = try agent.call("GET", "/Users?filter=title%20eq%20%22Lead%22&startIndex=1")
        XCTAssertEqual(indexed.status, 400, "an index page of a scan over the budget is refused")
        XCTAssertEqual(indexed.body?["scimType"], "tooMany")
        let page = try agent.call("GET", "/Users?filter=userName%20sw%20%22user1%22&sortBy=userName&startIndex=2&count=3")
        XCTAssertEqual(page.status, 400, "userName sw scans too")
        XCTAssertEqual(agent.stop(), 0)

        let wide = try AgentHarness()
        for k in 0..<12 { _ = try wide.call("POST", "/Users", userBody("u\(k)", extra: #","title":"\#(k % 3 == 0 ? "Lead" : "Guide")""#)) }
        let leads = try wide.call(
            "GET", "/Users?filter=title%20eq%20%22lead%22&sortBy=userName&sortOrder=descending&count=2&attributes=userName")
        XCTAssertEqual(leads.body?["totalResults"], 4)
        XCTAssertEqual(leads.body?["Resources"]?.arrayValue?.compactMap { $0["userName"]?.stringValue }, ["u9", "u6"])
        XCTAssertNil(leads.body?["Resources"]?.arrayValue?.first?["title"], "projection")
        let search = try wide.call(
            "POST", "/Users/.search",
            #"{"schemas":["urn:ietf:params:scim:api:messages:2.0:SearchRequest"],"filter":"title eq \"Lead\"","startIndex":4}"#)
        XCTAssertEqual(search.body?["itemsPerPage"], 1)
        XCTAssertEqual(wide.stop(), 0)
    }

    func testCursorPaginationOverHTTP() throws {
        let agent = try AgentHarness()
        var ids: [String] = [], names: [String: String] = [:]
        for k in 0..<23 {
            let r = try agent.call("POST", "/Users", userBody("walker\(k)"))
            ids.append(try XCTUnwrap(r.body?["id"]?.stringValue))
            names[ids.last!] = "walker\(k)"
        }
        let config = try agent.call("GET", "/ServiceProviderConfig")
        XCTAssertEqual(config.body?["pagination"]?["cursor"], true)
        XCTAssertNil(config.body?["pagination"]?["cursorTimeout"], "cursors never expire")

        var seen: [String] = [], cursor = "", deleted: String?
        for _ in 0..<20 {
            let page = try agent.call("GET", "/Users?count=5&attributes=userName&cursor=" + cursor)
            XCTAssertEqual(page.status, 200)
            XCTAssertNil(page.body?["startIndex"], "no startIndex with cursors")
            XCTAssertEqual(page.body?["totalResults"], .int(ids.count - (deleted == nil ? 0 : 1)))
            seen += page.body?["Resources"]?.arrayValue?.compactMap { $0["id"]?.stringValue } ?? []
            guard let next = page.body?["nextCursor"]?.stringValue else { break }
            if deleted == nil {
                // Delete the last user served: the walk goes on after it.
                deleted = seen.last
                XCTAssertEqual(try agent.call("DELETE", "/Users/\(deleted!)").status, 204)
            }
            cursor = next
        }
        XCTAssertEqual(seen, ids.sorted(), "every user once, in id order")

        let search = try agent.call(
            "POST", "/Users/.search",
            #"{"schemas":["urn:ietf:params:scim:api:messages:2.0:SearchRequest"],"cursor":"","count":4,"sortBy":"userName"}"#)
        let remaining = names.filter { $0.key != deleted }.values.sorted()
        XCTAssertEqual(
            search.body?["Resources"]?.arrayValue?.compactMap { $0["userName"]?.stringValue },
            Array(remaining.prefix(4)), "sorted by userName")
        let next = try XCTUnwrap(search.body?["nextCursor"]?.stringValue)
        let wrong = try agent.call("GET", "/Users?cursor=\(next)&count=4", headers: [:])
        XCTAssertEqual(wrong.status, 400, "a cursor belongs to its sort and filter")
        XCTAssertEqual(wrong.body?["scimType"], "invalidCursor")
        XCTAssertEqual(try agent.call("GET", "/Users?cursor=x%2Fy").body?["scimType"], "invalidCursor")
        XCTAssertEqual(agent.stop(), 0)
    }

    func testGroupMembershipAndUserDeletion() throws {
        let agent = try AgentHarness()
        let u1 = try XCTUnwrap(try agent.call("POST", "/Users", userBody("a")).body?["id"]?.stringValue)
        let u2 = try XCTUnwrap(try agent.call("POST", "/Users", userBody("b")).body?["id"]?.stringValue)
        let g = try agent.call(
            "POST", "/Groups",
            #"{"schemas":["urn:ietf:params:scim:schemas:core:2.0:Group"],"displayName":"Guides","members":[{"value":"\#(u1)"},{"value":"\#(u2)"}]}"#
        )
        XCTAssertEqual(g.status, 201)
        let gid = try XCTUnwrap(g.body?["id"]?.stringValue)
        let user = try agent.call("GET", "/Users/\(u1)")
        XCTAssertEqual(user.body?["groups"]?.arrayValue?.first?["value"]?.stringValue, gid)
        XCTAssertEqual(user.body?["groups"]?.arrayValue?.first?["display"], "Guides")
        let bad = try agent.call(
            "POST", "/Groups",
            #"{"schemas":["urn:ietf:params:scim:schemas:core:2.0:Group"],"displayName":"X","members":[{"value":"nobody"}]}"#)
        XCTAssertEqual(bad.status, 400)
        XCTAssertTrue(bad.body?["detail"]?.stringValue?.contains("'nobody' is not a User or Group") ?? false)

        let before = try XCTUnwrap(try agent.call("GET", "/Groups/\(gid)").header("ETag"))
        XCTAssertEqual(try agent.call("DELETE", "/Users/\(u1)").status, 204)
        let after = try agent.call("GET", "/Groups/\(gid)")
        XCTAssertEqual(after.body?["members"]?.arrayValue?.compactMap { $0["value"]?.stringValue }, [u2])
        XCTAssertNotEqual(after.header("ETag"), before, "the group changed, so its version did")
        XCTAssertEqual(try agent.call("GET", "/Users/\(u2)").body?["groups"]?.arrayValue?.count, 1, "the other member keeps its group")
        XCTAssertEqual(agent.stop(), 0)
        let kinds = try agent.openStore().outboxEntries(after: 0, limit: 100).map { $0.1["events"]!.objectValue!.keys.first! }
        XCTAssertEqual(
            kinds.suffix(2), ["urn:ietf:params:SCIM:event:prov:patch:full", "urn:ietf:params:SCIM:event:prov:delete"],
            "deleting a member emits the group's change, then the delete")
    }

    /// GET by id without a query answers from the stored bytes; it must give
    /// exactly what the general path (asReturned, meta.location, the default
    /// projection) gives, which a filtered list still uses.
    func testReadFromStoredBytesMatchesTheGeneralPath() throws {
        let agent = try AgentHarness()
        let enterprise = "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User"
        let bodies = [
            userBody("plain"),
            #"{"schemas":["urn:ietf:params:scim:schemas:core:2.0:User","\#(enterprise)"],"userName":"ext","externalId":"e-1","name":{"givenName":"Zoë","familyName":"O\"Brien \\ \u0001"},"emails":[{"value":"x@example.com","type":"work","primary":true}],"title":"\"meta\":{","active":true,"\#(enterprise)":{"employeeNumber":"42","manager":{"value":"m-1"}}}"#,
            #"{"schemas":["urn:ietf:params:scim:schemas:core:2.0:User"],"userName":"secret","password":"hunter2","nickName":"s"}"#,
            #"{"schemas":["urn:ietf:params:scim:schemas:core:2.0:User"],"UserName":"MixedCase","displayName":"meta"}"#,
            #"{"schemas":["urn:ietf:params:scim:schemas:core:2.0:User"],"userName":"shouting","PASSWORD":"hunter3"}"#,
        ]
        var ids: [String] = []
        for body in bodies {
            let created = try agent.call("POST", "/Users", body)
            XCTAssertEqual(created.status, 201, created.raw)
            ids.append(try XCTUnwrap(created.body?["id"]?.stringValue))
        }
        let g = try agent.call(
            "POST", "/Groups",
            #"{"schemas":["urn:ietf:params:scim:schemas:core:2.0:Group"],"displayName":"Crew \"1\"","members":[{"value":"\#(ids[0])"},{"value":"\#(ids[1])"}]}"#
        )
        XCTAssertEqual(g.status, 201)
        let gid = try XCTUnwrap(g.body?["id"]?.stringValue)
        let second = try agent.call(
            "POST", "/Groups",
            #"{"schemas":["urn:ietf:params:scim:schemas:core:2.0:Group"],"displayName":"Two","members":[{"value":"\#(ids[1])"}]}"#)
        XCTAssertEqual(second.status, 201)
        let patched = try agent.call(
            "PATCH", "/Users/\(ids[0])",
            #"{"schemas":["urn:ietf:params:scim:api:messages:2.0:PatchOp"],"Operations":[{"op":"add","path":"title","value":"after"}]}"#)
        XCTAssertEqual(patched.status, 200)

        for (type, id) in ids.map({ ("Users", $0) }) + [("Groups", gid)] {
            let direct = try agent.call("GET", "/\(type)/\(id)")
            XCTAssertEqual(direct.status, 200)
            let listed = try agent.call("GET", "/\(type)?filter=id%20eq%20%22\(id)%22")
            let general = try XCTUnwrap(listed.body?["Resources"]?.arrayValue?.first, listed.raw)
            XCTAssertEqual(
                direct.raw, String(decoding: general.serialized(), as: UTF8.self), "\(type)/\(id): same bytes as the general path")
            XCTAssertEqual(direct.header("ETag"), general["meta"]?["version"]?.stringValue)
            XCTAssertEqual(direct.header("Location"), general["meta"]?["location"]?.stringValue)
            XCTAssertEqual(direct.header("Content-Type"), "application/scim+json")
            XCTAssertFalse(direct.raw.contains("hunter"), "password is never returned, in any case")
        }
        let withGroups = try agent.call("GET", "/Users/\(ids[1])")
        XCTAssertEqual(withGroups.body?["groups"]?.arrayValue?.count, 2)
        XCTAssertEqual(withGroups.body?["groups"]?.arrayValue?.first?["display"], #"Crew "1""#)
        XCTAssertEqual(withGroups.body?["meta"]?["location"]?.stringValue, "http://127.0.0.1:\(agent.port)/scim/v2/Users/\(ids[1])")
        XCTAssertNil(try agent.call("GET", "/Users/\(ids[2])").body?["password"])
        let etag = try XCTUnwrap(withGroups.header("ETag"))
        XCTAssertEqual(try agent.call("GET", "/Users/\(ids[1])", headers: ["If-None-Match": etag]).status, 304)
        XCTAssertEqual(try agent.call("GET", "/Users/\(ids[1])", headers: ["If-Match": #"W/"0""#]).status, 412)
        XCTAssertEqual(try agent.call("GET", "/Users/nope").status, 404)
        XCTAssertEqual(agent.stop(), 0)
    }

    /// The agent does not manage credentials: a `password` (writeOnly) is
    /// accepted on create, replace and patch, and dropped: it is not in the
    /// store, not in any relay event, never returned.
    func testPasswordIsAcceptedButNeitherStoredNorRelayed() throws {
        let agent = try AgentHarness()
        let created = try agent.call(
            "POST", "/Users", #"{"schemas":["urn:ietf:params:scim:schemas:core:2.0:User"],"userName":"pw","password":"s3cret-create"}"#)
        XCTAssertEqual(created.status, 201, created.raw)
        let id = try XCTUnwrap(created.body?["id"]?.stringValue)
        XCTAssertEqual(
            try agent.call(
                "PUT", "/Users/\(id)",
                #"{"schemas":["urn:ietf:params:scim:schemas:core:2.0:User"],"userName":"pw","password":"s3cret-put","title":"t"}"#
            ).status, 200)
        XCTAssertEqual(
            try agent.call(
                "PATCH", "/Users/\(id)",
                #"{"schemas":["urn:ietf:params:scim:api:messages:2.0:PatchOp"],"Operations":[{"op":"replace","path":"password","value":"s3cret-patch"}]}"#
            ).status, 200)
        for path in ["/Users/\(id)", "/Users?filter=userName%20eq%20%22pw%22", "/Users/\(id)?attributes=password"] {
            let r = try agent.call("GET", path)
            XCTAssertEqual(r.status, 200)
            XCTAssertFalse(r.raw.contains("s3cret"), "\(path): \(r.raw)")
        }
        XCTAssertEqual(agent.stop(), 0)
        let store = try agent.openStore()
        let stored = try XCTUnwrap(try store.get(SchemaRegistry.standard.resourceType("User")!, id))
        XCTAssertNil(stored["password"])
        XCTAssertEqual(stored["title"], "t")
        let events = try store.outboxEntries(after: 0, limit: 100)
        XCTAssertEqual(events.count, 2, "create and put; the patch changed nothing that is kept")
        for (_, event) in events { XCTAssertFalse(event.text.contains("s3cret"), event.text) }
    }

    func testBulkWithForwardBulkIdReference() throws {
        let agent = try AgentHarness()
        let r = try agent.call(
            "POST", "/Bulk",
            #"""
            {"schemas":["urn:ietf:params:scim:api:messages:2.0:BulkRequest"],"Operations":[
              {"method":"POST","path":"/Groups","bulkId":"g","data":{"schemas":["urn:ietf:params:scim:schemas:core:2.0:Group"],"displayName":"Crew","members":[{"type":"User","value":"bulkId:u"}]}},
              {"method":"POST","path":"/Users","bulkId":"u","data":{"schemas":["urn:ietf:params:scim:schemas:core:2.0:User"],"userName":"crew1"}},
              {"method":"POST","path":"/Users","bulkId":"dup","data":{"schemas":["urn:ietf:params:scim:schemas:core:2.0:User"],"userName":"CREW1"}},
              {"method":"DELETE","path":"/Users/missing"}]}
            """#)
        XCTAssertEqual(r.status, 200)
        let ops = try XCTUnwrap(r.body?["Operations"]?.arrayValue)
        XCTAssertEqual(ops.map { $0["status"]?.stringValue }, ["201", "201", "409", "404"], "results in request order")
        let groupLocation = try XCTUnwrap(ops[0]["location"]?.stringValue)
        let gid = String(groupLocation.split(separator: "/").last!)
        let group = try agent.call("GET", "/Groups/\(gid)")
        let uid = String(try XCTUnwrap(ops[1]["location"]?.stringValue).split(separator: "/").last!)
        XCTAssertEqual(group.body?["members"]?.arrayValue?.first?["value"]?.stringValue, uid, "bulkId:u was resolved")
        let failFast = try agent.call(
            "POST", "/Bulk",
            #"{"schemas":["urn:ietf:params:scim:api:messages:2.0:BulkRequest"],"failOnErrors":1,"Operations":[{"method":"DELETE","path":"/Users/x1"},{"method":"DELETE","path":"/Users/x2"}]}"#
        )
        XCTAssertEqual(failFast.body?["Operations"]?.arrayValue?.count, 1, "stops after failOnErrors errors")
        XCTAssertEqual(agent.stop(), 0)
    }

    func testAuthenticationAndErrorBodies() throws {
        let agent = try AgentHarness(maxBody: 2048)
        let anonymous = try agent.call("GET", "/Users", token: "wrong")
        XCTAssertEqual(anonymous.status, 401)
        XCTAssertEqual(anonymous.header("WWW-Authenticate"), #"Bearer realm="scim-edge""#)
        XCTAssertEqual(anonymous.body?["schemas"], ["urn:ietf:params:scim:api:messages:2.0:Error"])
        let wrongType = try agent.call("POST", "/Users", userBody("x"), headers: ["Content-Type": "text/plain"])
        XCTAssertEqual(wrongType.status, 415)
        let broken = try agent.call("POST", "/Users", #"{"schemas":"#)
        XCTAssertEqual(broken.status, 400)
        XCTAssertEqual(broken.body?["scimType"], "invalidSyntax")
        XCTAssertTrue(broken.body?["detail"]?.stringValue?.contains("line 1, column") ?? false)
        XCTAssertEqual(try agent.call("GET", "/Me").status, 501)
        XCTAssertEqual(try agent.call("DELETE", "/Schemas").status, 405)
        XCTAssertEqual(try agent.call("GET", "/Printers").status, 404)
        let huge = try agent.call("POST", "/Users", userBody(String(repeating: "x", count: 4000)))
        XCTAssertEqual(huge.status, 413, "HTTP-level limits answer with SCIM error bodies too")
        XCTAssertEqual(huge.body?["status"], "413")
        XCTAssertEqual(try agent.call("GET", "/ServiceProviderConfig").body?["patch"]?["supported"], true)
        // /Schemas over the socket is the validator's own definitions, every characteristic included.
        let served = try XCTUnwrap(try agent.call("GET", "/Schemas").body?["Resources"]?.arrayValue)
        for schema in SchemaRegistry.standard.schemasDocument["Resources"]?.arrayValue ?? [] {
            XCTAssertEqual(served.first { $0["id"] == schema["id"] }?["attributes"], schema["attributes"], "\(schema["id"] ?? .null)")
        }
        XCTAssertEqual(served.count, 3)
        XCTAssertEqual(agent.stop(), 0)
        XCTAssertEqual(try agent.openStore().outboxCount(), 0, "nothing was written by refused requests")
    }

    /// Two `Authorization` fields are a malformed request: 400 invalidSyntax
    /// whichever of them holds the token, and nothing changes.
    func testTwoAuthorizationHeadersAre400AndChangeNothing() throws {
        let agent = try AgentHarness()
        let body = userBody("twice")
        for pair in [(agent.token, "wrong"), ("wrong", agent.token), (agent.token, agent.token)] {
            let client = try RawClient(port: agent.port)
            client.send(
                "POST /scim/v2/Users HTTP/1.1\r\nHost: x\r\nConnection: close\r\nAuthorization: Bearer \(pair.0)\r\n"
                    + "Authorization: Bearer \(pair.1)\r\nContent-Type: application/scim+json\r\nContent-Length: \(body.utf8.count)\r\n\r\n\(body)"
            )
            let r = try XCTUnwrap(client.readResponses(1).first)
            XCTAssertEqual(r.status, 400, r.body)
            let error = try JSONParser.parse(r.body)
            XCTAssertEqual(error["scimType"], "invalidSyntax")
            XCTAssertEqual(error["schemas"], ["urn:ietf:params:scim:api:messages:2.0:Error"])
        }
        XCTAssertEqual(try agent.call("GET", "/Users?filter=userName%20eq%20%22twice%22").body?["totalResults"], 0)
        XCTAssertEqual(try agent.call("POST", "/Users", body).status, 201, "one field with the token still works")
        XCTAssertEqual(agent.stop(), 0)
        XCTAssertEqual(try agent.openStore().outboxCount(), 1)
    }

    /// SIGKILL the agent process during a write load: after a restart every
    /// acknowledged create is in the store and in the outbox, in order, once.
    /// A Bulk request is one commit: after a SIGKILL in the middle of a
    /// stream of Bulk requests, every acknowledged request's operations are
    /// all stored (acknowledged means durable, per operation), and every
    /// other request is there whole or not at all, never in part.
    func testBulkRequestsAreAtomicUnderSIGKILL() throws {
        let dir = TempDirectory("edge-bulk-crash")
        defer { dir.remove() }
        let child = try ChildProcess(
            productsDirectory + "/scim-edge",
            [
                "serve", "--data-dir", dir.file("data"), "--listen", "127.0.0.1:0",
                "--token", "t", "--keep-outbox", "--admin-listen", "none",
            ])
        let line = try XCTUnwrap(child.waitForLine("scim-edge"))
        let port = Int(line.split(separator: " ")[4].split(separator: ":")[1])!
        let perBulk = 50
        let acked = Locked<Set<Int>>([]), sent = Locked<Set<Int>>([])
        let writers = (0..<2).map { w in
            Thread {
                for k in 0..<10_000 {
                    guard let client = try? RawClient(port: port, timeoutSeconds: 5) else { return }
                    let request = w * 100_000 + k
                    let ops = (0..<perBulk).map { n in
                        #"{"method":"POST","path":"/Users","bulkId":"b\#(n)","data":\#(userBody("bulk-\(request)-\(n)"))}"#
                    }.joined(separator: ",")
                    let body = #"{"schemas":["urn:ietf:params:scim:api:messages:2.0:BulkRequest"],"Operations":[\#(ops)]}"#
                    sent.withLock { _ = $0.insert(request) }
                    client.send(
                        "POST /scim/v2/Bulk HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer t\r\nContent-Type: application/scim+json\r\nContent-Length: \(body.utf8.count)\r\n\r\n\(body)"
                    )
                    guard let r = client.readResponses(1).first, r.status == 200,
                        r.body.components(separatedBy: #""status":"201""#).count == perBulk + 1
                    else { return }
                    acked.withLock { _ = $0.insert(request) }
                }
            }
        }
        writers.forEach { $0.start() }
        XCTAssertTrue(eventually(seconds: 60) { acked.current.count >= 20 })
        child.signal(SIGKILL)
        XCTAssertNotNil(child.waitForExit())
        while writers.contains(where: { !$0.isFinished }) { usleep(10_000) }

        let store = try AgentStore(path: dir.file("data"), registry: .standard)
        let users = try store.query(SchemaRegistry.standard.resourceType("User")!, filter: nil, scanBudget: 10_000_000)
        var perRequest: [Int: Int] = [:]
        for name in users.compactMap({ $0["userName"]?.stringValue }) {
            let parts = name.split(separator: "-")
            if parts.count == 3, let request = Int(parts[1]) { perRequest[request, default: 0] += 1 }
        }
        for request in acked.current { XCTAssertEqual(perRequest[request], perBulk, "acknowledged Bulk \(request) lost operations") }
        for (request, n) in perRequest { XCTAssertEqual(n, perBulk, "Bulk \(request) stored in part") }
        XCTAssertTrue(Set(perRequest.keys).isSubset(of: sent.current))
        XCTAssertGreaterThanOrEqual(perRequest.count, acked.current.count)
        let events = try store.outboxEntries(after: 0, limit: 10_000_000)
        XCTAssertEqual(events.count, users.count, "one create event per stored user")
    }

    func testAcknowledgedWritesSurviveSIGKILL() throws {
        let dir = TempDirectory("edge-crash")
        defer { dir.remove() }
        let bin = productsDirectory + "/scim-edge"
        func start() throws -> (ChildProcess, Int) {
            let child = try ChildProcess(
                bin,
                [
                    "serve", "--data-dir", dir.file("data"), "--listen", "127.0.0.1:0", "--token", "t", "--keep-outbox", "--admin-listen",
                    "none",
                ])
            let line = try XCTUnwrap(child.waitForLine("scim-edge"))
            let port = Int(line.split(separator: " ")[4].split(separator: ":")[1])!
            return (child, port)
        }
        let (child, port) = try start()
        let acked = Locked<[String]>([])
        let writers = (0..<4).map { w in
            Thread {
                for k in 0..<10_000 {
                    guard let client = try? RawClient(port: port, timeoutSeconds: 5) else { return }
                    let name = "w\(w)-\(k)"
                    let body = userBody(name)
                    client.send(
                        "POST /scim/v2/Users HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer t\r\nContent-Type: application/scim+json\r\nContent-Length: \(body.utf8.count)\r\n\r\n\(body)"
                    )
                    guard let r = client.readResponses(1).first, r.status == 201 else { return }
                    acked.withLock { $0.append(name) }
                }
            }
        }
        writers.forEach { $0.start() }
        XCTAssertTrue(eventually(seconds: 60) { acked.current.count >= 200 })
        child.signal(SIGKILL)
        XCTAssertNotNil(child.waitForExit())
        while writers.contains(where: { !$0.isFinished }) { usleep(10_000) }
        let acknowledged = Set(acked.current)
        XCTAssertGreaterThanOrEqual(acknowledged.count, 200)

        let store = try AgentStore(path: dir.file("data"), registry: .standard)
        let users = try store.query(SchemaRegistry.standard.resourceType("User")!, filter: nil, scanBudget: 1_000_000)
        let stored = Set(users.compactMap { $0["userName"]?.stringValue })
        XCTAssertTrue(acknowledged.isSubset(of: stored), "\(acknowledged.subtracting(stored).count) acknowledged users lost")
        let events = try store.outboxEntries(after: 0, limit: 1_000_000)
        XCTAssertEqual(events.map(\.0), Array(1...UInt64(events.count)), "outbox sequence contiguous")
        let created = events.compactMap {
            $0.1["events"]?["urn:ietf:params:SCIM:event:prov:create:full"]?["data"]?["userName"]?.stringValue
        }
        XCTAssertEqual(created.count, Set(created).count, "no event twice")
        XCTAssertEqual(Set(created), stored, "every stored user has exactly its create event")

        // And the restarted agent serves them.
        let (again, port2) = try start()
        let client = try RawClient(port: port2)
        let name = acked.current.first!
        client.send(
            "GET /scim/v2/Users?filter=userName%20eq%20%22\(name)%22 HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer t\r\nConnection: close\r\n\r\n"
        )
        XCTAssertTrue(client.readToEnd().contains(#""totalResults":1"#))
        again.signal(SIGTERM)
        XCTAssertEqual(again.waitForExit(), 0)
    }

    func testBackpressureRefusesWritesPastTheWatermarkAndRecovers() throws {
        let agent = try AgentHarness { config in
            config.endpoint.outboxHighEvents = 5
            config.endpoint.outboxLowEvents = 3
            config.endpoint.retryAfterSeconds = 7
        }
        for k in 0..<5 { XCTAssertEqual(try agent.call("POST", "/Users", userBody("bp\(k)")).status, 201) }
        let refused = try agent.call("POST", "/Users", userBody("bp5"))
        XCTAssertEqual(refused.status, 503)
        XCTAssertEqual(refused.header("Retry-After"), "7")
        XCTAssertTrue(refused.body?["detail"]?.stringValue?.contains("outbox holds 5 events") ?? false)
        XCTAssertEqual(try agent.call("GET", "/Users?filter=userName%20eq%20%22bp1%22").body?["totalResults"], 1, "reads keep working")
        XCTAssertEqual(try agent.admin("/readyz").0, 503)
        XCTAssertTrue(try agent.admin("/metrics").1.contains("scim_edge_backpressure 1"))
        // The relay acknowledges two events: 3 left, at the low watermark: writes resume.
        let store = agent.service.wait()!
        let acked = agent.thread.inbox.sendAndWait { (try? store.value.store.acknowledge(through: 2)) ?? -1 }
        XCTAssertEqual(acked, 2)
        XCTAssertEqual(try agent.call("POST", "/Users", userBody("bp5")).status, 201)
        XCTAssertEqual(try agent.admin("/readyz").0, 200)
        XCTAssertEqual(agent.stop(), 0)
        let events = try agent.openStore().outboxEntries(after: 0, limit: 100).map(\.0)
        XCTAssertEqual(events, [3, 4, 5, 6], "nothing dropped: acknowledged events left, the rest stayed in order")
        XCTAssertEqual(try agent.openStore().acknowledgedSequence(), 2)
    }

    /// While the outbox cannot be read (every LMDB reader slot taken: a real
    /// MDB_READERS_FULL; write transactions need no slot), its size is
    /// unknown: writes are refused with 503 and a SCIM error, not let through,
    /// and /readyz says 503. Once it reads again, all is as before.
    func testAnUnreadableOutboxRefusesWritesAndIsNotReady() throws {
        let agent = try AgentHarness()
        XCTAssertEqual(try agent.call("POST", "/Users", userBody("before")).status, 201)
        let bound = agent.service.wait()!
        let environment = try XCTUnwrap(agent.thread.inbox.sendAndWait { bound.value.store.environment })
        try whileEveryReaderSlotIsTaken(environment) {
            let refused = try agent.call("POST", "/Users", userBody("blind"))
            XCTAssertEqual(refused.status, 503, refused.raw)
            XCTAssertNotNil(refused.header("Retry-After"))
            XCTAssertEqual(refused.body?["schemas"], ["urn:ietf:params:scim:api:messages:2.0:Error"])
            XCTAssertTrue(refused.body?["detail"]?.stringValue?.contains("cannot read the outbox") ?? false, refused.raw)
            let (ready, why) = try agent.admin("/readyz")
            XCTAssertEqual(ready, 503)
            XCTAssertTrue(why.contains("cannot read the outbox"), why)
            let metrics = try agent.admin("/metrics").1
            XCTAssertFalse(metrics.contains("scim_edge_outbox_events 0"), "no made-up size")
        }
        XCTAssertEqual(try agent.call("POST", "/Users", userBody("after")).status, 201)
        XCTAssertEqual(try agent.admin("/readyz").0, 200)
        XCTAssertEqual(agent.stop(), 0)
        let store = try agent.openStore()
        XCTAssertEqual(try store.outboxCount(), 2, "the refused write left nothing")
    }

    func testTheWriteQueueIsBounded() throws {
        let agent = try AgentHarness { $0.endpoint.maxQueuedWrites = 0 }
        let refused = try agent.call("POST", "/Users", userBody("queued"))
        XCTAssertEqual(refused.status, 503)
        XCTAssertNotNil(refused.header("Retry-After"))
        XCTAssertTrue(refused.body?["detail"]?.stringValue?.contains("waiting for the store") ?? false)
        XCTAssertEqual(try agent.call("GET", "/Users").status, 200, "reads are not queued")
        XCTAssertEqual(agent.stop(), 0)
    }

    func testOperationsEndpointsAndMetrics() throws {
        let agent = try AgentHarness()
        XCTAssertEqual(try agent.call("POST", "/Users", userBody("m1")).status, 201)
        XCTAssertEqual(try agent.call("POST", "/Users", userBody("M1")).status, 409)
        XCTAssertEqual(try agent.call("GET", "/Groups").status, 200)
        XCTAssertEqual(try agent.admin("/healthz").0, 200)
        XCTAssertEqual(try agent.admin("/readyz").0, 200)
        let (status, metrics) = try agent.admin("/metrics")
        XCTAssertEqual(status, 200)
        for line in [
            #"scim_edge_requests_total{method="POST",resource="User",status="201"} 1"#,
            #"scim_edge_requests_total{method="POST",resource="User",status="409"} 1"#,
            #"scim_edge_requests_total{method="GET",resource="Group",status="200"} 1"#,
            #"scim_edge_request_duration_seconds_count 3"#, "scim_edge_outbox_events 1",
            "scim_edge_backpressure 0", "# TYPE scim_edge_request_duration_seconds histogram",
        ] {
            XCTAssertTrue(metrics.contains(line), "metrics should contain \(line)")
        }
        XCTAssertEqual(try agent.admin("/nothing").0, 404)
        XCTAssertEqual(agent.stop(), 0)
    }

    func testStandaloneAgentKeepsNoOutbox() throws {
        let agent = try AgentHarness { $0.endpoint.recordOutbox = false }
        XCTAssertEqual(try agent.call("POST", "/Users", userBody("solo")).status, 201)
        XCTAssertEqual(agent.stop(), 0)
        XCTAssertEqual(try agent.openStore().outboxCount(), 0)
    }

    func testReadOnlySubcommands() throws {
        let agent = try AgentHarness()
        let id = try XCTUnwrap(
            try agent.call(
                "POST", "/Users", userBody("cli-user"),
                headers: ["traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"]
            ).body?["id"]?.stringValue)
        XCTAssertEqual(agent.stop(), 0)
        func run(_ args: [String]) throws -> (Int32, String) {
            let child = try ChildProcess(productsDirectory + "/scim-edge", args)
            let status = child.waitForExit() ?? -1  // also waits for the last lines
            return (status, child.output.joined(separator: "\n"))
        }
        let dataDir = agent.dir.file("data")
        let status = try run(["status", "--data-dir", dataDir])
        XCTAssertEqual(status.0, 0)
        XCTAssertTrue(status.1.contains("1 users, 0 groups"), status.1)
        XCTAssertTrue(status.1.contains("outbox           1 events"), status.1)
        let list = try run(["outbox", "list", "--data-dir", dataDir])
        XCTAssertEqual(list.1, "1\tprov:create:full\t/Users/\(id)\t0af7651916cd43dd8448eb211c80319c")
        let show = try run(["outbox", "show", "1", "--data-dir", dataDir])
        XCTAssertTrue(show.1.contains(#""userName":"cli-user""#))
        let get = try run(["resources", "get", id, "--data-dir", dataDir])
        XCTAssertTrue(get.1.hasPrefix("{") && get.1.contains(id))
        let missing = try run(["resources", "get", "nope", "--data-dir", dataDir])
        XCTAssertNotEqual(missing.0, 0)
    }
}

/// Runs `body` while every reader slot of `environment` is held by this
/// thread: LMDB then refuses new read transactions with MDB_READERS_FULL.
func whileEveryReaderSlotIsTaken<R>(_ environment: Environment, _ body: () throws -> R) throws -> R {
    let txn: ReadTransaction
    do throws(StoreError) {
        txn = try environment.beginRead()
    } catch {
        guard error == .readersFull else { throw error }
        return try body()
    }
    let result = try whileEveryReaderSlotIsTaken(environment, body)
    _ = consume txn
    return result
}
