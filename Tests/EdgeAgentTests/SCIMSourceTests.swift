import EdgeAgent
import EdgeConfig
import EdgeHTTP
import EdgeLoop
import EdgeStore
import EdgeTestSupport
import Foundation
import SCIM
import XCTest

/// An HTTP proxy in front of a SCIM server, on its own loop: it records
/// every request (when, what, the status it got) and answers the next
/// ones from `refusals` (429 or 503 with `Retry-After: 1`) before
/// forwarding again; with `refuseFilters`, a filtered list gets 400.
final class ThrottlingProxy: @unchecked Sendable {  // state behind Locked; loop objects stay on the loop thread
    struct Seen { var at: Date; var target: String; var status: Int }
    let port: Int
    private let thread: LoopThread
    private final class Parts {
        let server: HTTPServer, client: HTTPClient
        init(_ server: HTTPServer, _ client: HTTPClient) { (self.server, self.client) = (server, client) }
    }
    private let parts: LoopBound<Parts>
    let refusals = Locked<[Int]>([])
    /// The refusals' `Retry-After`.
    let retryAfter = Locked("1")
    let refuseFilters = Locked(false)
    let seen = Locked<[Seen]>([])

    init(upstreamPort: Int) throws {
        let ready = OneShot<LoopBound<Parts>>()
        let refusals = self.refusals, refuseFilters = self.refuseFilters, seen = self.seen, retryAfter = self.retryAfter
        thread = try LoopThread.start { loop in
            let upstream = HTTPClient(loop: loop, address: SocketAddress(host: "127.0.0.1", port: upstreamPort))
            let server = try HTTPServer(loop: loop, address: SocketAddress(host: "127.0.0.1", port: 0)) { request, _, responder in
                let target = request.target
                if let status = refusals.withLock({ $0.isEmpty ? nil : $0.removeFirst() }) {
                    seen.withLock { $0.append(Seen(at: Date(), target: target, status: status)) }
                    responder.respond(HTTPResponse(status: status, headers: ["Retry-After": retryAfter.current], body: []))
                    return
                }
                if refuseFilters.current && target.contains("filter=") {
                    seen.withLock { $0.append(Seen(at: Date(), target: target, status: 400)) }
                    responder.respond(
                        HTTPResponse(
                            status: 400, contentType: "application/scim+json",
                            body: #"{"schemas":["urn:ietf:params:scim:api:messages:2.0:Error"],"status":"400","scimType":"invalidFilter"}"#)
                    )
                    return
                }
                upstream.send(request) { result in
                    switch result {
                    case .success(let r):
                        seen.withLock { $0.append(Seen(at: Date(), target: target, status: r.status)) }
                        var headers = HTTPHeaders()
                        if let t = r.headers["Content-Type"] { headers.set("Content-Type", t) }
                        responder.respond(HTTPResponse(status: r.status, headers: headers, body: r.body))
                    case .failure:
                        responder.respond(HTTPResponse(status: 502, contentType: "text/plain", body: "upstream"))
                    }
                }
            }
            ready.fulfil(LoopBound(Parts(server, upstream)))
        }
        parts = try XCTUnwrap(ready.wait(seconds: 10))
        let parts = self.parts
        port = thread.inbox.sendAndWait { parts.value.server.port } ?? 0
    }

    func stop() {
        let parts = self.parts
        thread.inbox.send {
            parts.value.server.shutdown()
            parts.value.client.close()
        }
        _ = thread.join()
    }
}

/// The value of one sample of a Prometheus text exposition.
func metric(_ text: String, _ sample: String) -> Double? {
    text.split(separator: "\n").first { $0.hasPrefix(sample + " ") }.flatMap { Double($0.split(separator: " ").last!) }
}

final class SCIMSourceTests: XCTestCase {
    let userSchema = "urn:ietf:params:scim:schemas:core:2.0:User"
    let groupSchema = "urn:ietf:params:scim:schemas:core:2.0:Group"

    /// The reference scim2-server on a free port, killed when the test ends; its port.
    func referenceServer() throws -> Int {
        let port = try freePort()
        let server = try startReferenceSCIMServer(port: port)
        addTeardownBlock {
            server.signal(SIGKILL)
            _ = server.waitForExit()
        }
        return port
    }

    /// One request to the reference server (directly, not through the proxy).
    @discardableResult
    func ref(_ port: Int, _ method: String, _ path: String, _ body: String = "") -> (Int, [String: Any]) {
        guard let c = try? RawClient(port: port) else { return (0, [:]) }
        c.send(
            "\(method) \(path) HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer ref-token\r\n"
                + "Content-Type: application/scim+json\r\nConnection: close\r\nContent-Length: \(body.utf8.count)\r\n\r\n\(body)")
        guard let r = c.readResponses(1).first else { return (0, [:]) }
        return (r.status, (try? JSONSerialization.jsonObject(with: Data(r.body.utf8))) as? [String: Any] ?? [:])
    }

    func createUser(_ port: Int, _ userName: String, extra: String = "") -> String {
        let (status, body) = ref(port, "POST", "/Users", #"{"schemas":["\#(userSchema)"],"userName":"\#(userName)"\#(extra)}"#)
        XCTAssertEqual(status, 201, "\(body)")
        return body["id"] as? String ?? ""
    }

    func agentConfig(_ dir: TempDirectory, proxyPort: Int, extra: String = "") -> String {
        let token = secretFile(dir, "source.token", "ref-token")
        return sourceAgentConfig(
            dir,
            source: """
                  - name: hr
                    kind: scim
                    url: http://127.0.0.1:\(proxyPort)
                    tokenFile: \(token)
                    pollSeconds: 1
                    fullCompareEvery: 3
                    pageSize: 40
                    requestsPerSecond: 20
                    onDelete: delete
                \(extra)
                """)
    }

    /// Polling the reference scim2-server end to end: the initial load
    /// (paged by startIndex: it offers no cursor), a modification seen
    /// through `meta.lastModified gt`, a deletion seen by the full listing,
    /// group members by the server's ids, a resource the agent refuses
    /// (logged, counted, the next ones still arrive), 429 and 503 waited
    /// out per Retry-After, the request rate bounded, a server refusing
    /// the filter (every poll then a full listing), and the agent
    /// SIGKILLed and restarted with changes meanwhile: nothing lost,
    /// nothing doubled.
    func testPollingTheReferenceServer() throws {
        let dir = TempDirectory("edge-scim-poll")
        defer { dir.remove() }
        let refPort = try referenceServer()
        let proxy = try ThrottlingProxy(upstreamPort: refPort)
        defer { proxy.stop() }

        let count = 150
        var ids: [String] = []
        for i in 0..<count { ids.append(createUser(refPort, String(format: "p%03d", i), extra: #","title":"T\#(i)""#)) }
        let members = ids.prefix(5).map { #"{"value":"\#($0)"}"# }.joined(separator: ",")
        let (gs, group) = ref(refPort, "POST", "/Groups", #"{"schemas":["\#(groupSchema)"],"displayName":"staff","members":[\#(members)]}"#)
        XCTAssertEqual(gs, 201)
        let groupID = try XCTUnwrap(group["id"] as? String)

        let config = agentConfig(dir, proxyPort: proxy.port)
        var agent = try SourceAgent(config: config)
        XCTAssertTrue(eventually(seconds: 60) { agent.total("Users") == count }, "initial load: \(agent.total("Users"))")
        XCTAssertTrue(eventually(seconds: 10) { agent.memberIDs("staff").count == 5 }, "the group and its members")
        let p0 = try XCTUnwrap(agent.user("p000"))
        XCTAssertEqual(p0["externalId"] as? String, ids[0], "the source's id is the externalId")
        XCTAssertEqual(p0["title"] as? String, "T0")
        XCTAssertEqual(agent.memberIDs("staff").count, 5)
        XCTAssertTrue(proxy.seen.current.contains { $0.target.contains("startIndex=41") }, "paged by startIndex")
        XCTAssertTrue(
            eventually(seconds: 5) { (metric(agent.metrics(), "scim_edge_source_lag_seconds{source=\"hr\"}") ?? 99) <= 4 },
            "lag: a poll a second")

        // A modification, seen through the lastModified filter.
        XCTAssertEqual(
            ref(refPort, "PUT", "/Users/\(ids[1])", #"{"schemas":["\#(userSchema)"],"userName":"p001","title":"Changed"}"#).0, 200)
        XCTAssertTrue(eventually(seconds: 15) { agent.user("p001")?["title"] as? String == "Changed" }, "modify")
        XCTAssertTrue(
            proxy.seen.current.contains { $0.target.contains("filter=meta.lastModified%20gt%20") }, "changes asked for by lastModified")

        // A deletion, seen at the next full listing; group membership by the server's ids.
        XCTAssertEqual(ref(refPort, "DELETE", "/Users/\(ids[2])").0, 204)
        XCTAssertTrue(eventually(seconds: 20) { agent.user("p002") == nil }, "delete")
        let p10 = try XCTUnwrap(agent.user("p010")?["id"] as? String)
        let patched = ref(
            refPort, "PATCH", "/Groups/\(groupID)",
            #"{"schemas":["urn:ietf:params:scim:api:messages:2.0:PatchOp"],"Operations":[{"op":"add","path":"members","value":[{"value":"\#(ids[10])"}]}]}"#
        ).0
        XCTAssertTrue([200, 204].contains(patched), "\(patched)")
        XCTAssertTrue(eventually(seconds: 15) { agent.memberIDs("staff").contains(p10) }, "a member added")

        // A resource the agent refuses (its userName taken here by an IdP's push), then one after it.
        XCTAssertEqual(agent.send("POST", "/scim/v2/Users", #"{"schemas":["\#(userSchema)"],"userName":"taken"}"#), 201)
        _ = createUser(refPort, "taken")
        _ = createUser(refPort, "after-refused")
        XCTAssertTrue(eventually(seconds: 15) { agent.user("after-refused") != nil }, "the next resource still arrives")
        XCTAssertTrue(eventually(seconds: 5) { metric(agent.metrics(), "scim_edge_source_errors_total{source=\"hr\"}") ?? 0 >= 1 })
        XCTAssertTrue(
            eventually(seconds: 10) { agent.child.output.contains { $0.contains("(taken)") && $0.contains("not applied") } }, "logged")

        // 429 and 503 with Retry-After: 1 are waited out, then the same request goes again.
        let before = proxy.seen.current.count
        proxy.refusals.withLock { $0 = [429, 503, 429] }
        _ = createUser(refPort, "after-throttle")
        XCTAssertTrue(eventually(seconds: 30) { agent.user("after-throttle") != nil }, "after throttling")
        let throttled = Array(proxy.seen.current[before...])
        let refused = throttled.enumerated().filter { [429, 503].contains($0.element.status) }
        XCTAssertEqual(refused.count, 3)
        for (i, r) in refused {
            let next = try XCTUnwrap(throttled.dropFirst(i + 1).first, "a request after each refusal")
            XCTAssertEqual(next.target, r.target, "the refused request is sent again")
            XCTAssertGreaterThanOrEqual(next.at.timeIntervalSince(r.at), 0.9, "not before Retry-After")
        }
        XCTAssertTrue(agent.metrics().contains("scim_edge_source_throttled_total{source=\"hr\"} 3"), agent.metrics())
        // A Retry-After of 0 is waited out as 1 s: sent again at once, it looped for as long as the server answered so.
        let beforeZero = proxy.seen.current.count
        proxy.retryAfter.withLock { $0 = "0" }
        proxy.refusals.withLock { $0 = [429, 503] }
        _ = createUser(refPort, "after-zero")
        XCTAssertTrue(eventually(seconds: 30) { agent.user("after-zero") != nil }, "after throttling with Retry-After: 0")
        let zero = Array(proxy.seen.current[beforeZero...])
        for (i, r) in zero.enumerated() where [429, 503].contains(r.status) {
            let next = try XCTUnwrap(zero.dropFirst(i + 1).first, "a request after each refusal")
            XCTAssertGreaterThanOrEqual(next.at.timeIntervalSince(r.at), 0.9, "Retry-After: 0 waited out as a second")
        }
        XCTAssertEqual(zero.filter { [429, 503].contains($0.status) }.count, 2)

        // The rate limit: never more than 20 requests within a second (21 with the edges).
        let times = proxy.seen.current.map(\.at)
        for (i, t) in times.enumerated() {
            let window = times[i...].prefix { $0.timeIntervalSince(t) < 1 }.count
            XCTAssertLessThanOrEqual(window, 21, "requests in the second from request \(i)")
        }

        // A server that refuses the filter: the agent falls back to full listings and still sees changes.
        proxy.refuseFilters.withLock { $0 = true }
        XCTAssertEqual(
            ref(refPort, "PUT", "/Users/\(ids[3])", #"{"schemas":["\#(userSchema)"],"userName":"p003","title":"Unfiltered"}"#).0, 200)
        XCTAssertTrue(eventually(seconds: 20) { agent.user("p003")?["title"] as? String == "Unfiltered" }, "without filters")
        XCTAssertTrue(agent.child.output.contains { $0.contains("refuses meta.lastModified filters") })
        proxy.refuseFilters.withLock { $0 = false }

        // SIGKILL; changes meanwhile; the restarted agent resumes from its high-water mark.
        agent.kill()
        _ = createUser(refPort, "while-down")
        XCTAssertEqual(
            ref(refPort, "PUT", "/Users/\(ids[4])", #"{"schemas":["\#(userSchema)"],"userName":"p004","title":"While down"}"#).0, 200)
        XCTAssertEqual(ref(refPort, "DELETE", "/Users/\(ids[5])").0, 204)
        agent = try SourceAgent(config: config)
        XCTAssertTrue(
            eventually(seconds: 30) {
                agent.user("while-down") != nil && agent.user("p004")?["title"] as? String == "While down" && agent.user("p005") == nil
            }, "changes while down")
        let expected = count - 2 + 5  // - p002, p005; + taken (the IdP's), after-refused, after-throttle, after-zero, while-down
        XCTAssertTrue(eventually(seconds: 10) { agent.total("Users") == expected }, "\(agent.total("Users")) users")
        agent.stop()

        let store = try AgentStore(path: dir.file("data"), registry: .standard)
        XCTAssertEqual(try createdOnce(store).filter { $0.hasPrefix("/Users/") }.count, count + 5, "every user created once")
        let status = try store.sourceStatus("hr")
        XCTAssertEqual(status.mode, "scim")
        XCTAssertNotNil(status.position.flatMap(DateTimeValue.init), "the high-water mark: \(status.position ?? "none")")
        XCTAssertEqual(status.entries, expected - 1 + 1, "the source's users (not the IdP's) and the group")
        // Refused again at each full listing (it heals when the conflict is resolved), counted each time.
        XCTAssertGreaterThanOrEqual(status.errors, 1)
        XCTAssertGreaterThan(status.newestChange, 0, "the newest lastModified committed")
        XCTAssertGreaterThanOrEqual(status.caughtUpAt, status.newestChange - 5)
    }

    /// Another scim-edge agent as the source: it offers cursor pagination
    /// (RFC 9865) and filters on meta.lastModified, so the poll pages by
    /// cursor and asks for changes only; a modification and a deletion
    /// there arrive here.
    func testPollingAServerThatPagesByCursor() throws {
        let upstreamDir = TempDirectory("edge-scim-upstream")
        defer { upstreamDir.remove() }
        let tokens = secretFile(upstreamDir, "tokens", "test-token-0123456789")
        let upstream = try SourceAgent(
            config: upstreamDir.write(
                "agent.yaml",
                "dataDir: \(upstreamDir.file("data"))\nlisten: 127.0.0.1:0\ntokenFile: \(tokens)\nadmin:\n  listen: 127.0.0.1:0\n"))
        defer { upstream.stop() }
        var ids: [String] = []
        for i in 0..<120 {
            XCTAssertEqual(upstream.send("POST", "/scim/v2/Users", #"{"schemas":["\#(userSchema)"],"userName":"c\#(i)"}"#), 201)
            ids.append(try XCTUnwrap(upstream.user("c\(i)")?["id"] as? String))
        }
        let dir = TempDirectory("edge-scim-cursor")
        defer { dir.remove() }
        let token = secretFile(dir, "source.token", "test-token-0123456789")
        let agent = try SourceAgent(
            config: sourceAgentConfig(
                dir,
                source: """
                      - name: peer
                        kind: scim
                        url: http://127.0.0.1:\(upstream.port)/scim/v2
                        tokenFile: \(token)
                        pollSeconds: 1
                        fullCompareEvery: 2
                        pageSize: 50
                        onDelete: delete
                    """))
        XCTAssertTrue(eventually(seconds: 30) { agent.total("Users") == 120 }, "\(agent.total("Users"))")
        XCTAssertTrue(agent.child.output.contains { $0.contains("(poll by cursor)") }, "\(agent.child.output.prefix(20))")
        XCTAssertEqual(
            upstream.send("PUT", "/scim/v2/Users/\(ids[7])", #"{"schemas":["\#(userSchema)"],"userName":"c7","title":"Moved"}"#), 200)
        XCTAssertTrue(eventually(seconds: 10) { agent.user("c7")?["title"] as? String == "Moved" }, "modify")
        XCTAssertEqual(upstream.send("DELETE", "/scim/v2/Users/\(ids[8])"), 204)
        XCTAssertTrue(eventually(seconds: 10) { agent.user("c8") == nil }, "delete")
        XCTAssertEqual(agent.total("Users"), 119)
        XCTAssertFalse(agent.child.output.contains { $0.contains("refuses meta.lastModified filters") }, "the filter is taken")
        agent.stop()
    }

    /// `check-config --connect` reads each SCIM source's
    /// /ServiceProviderConfig with its token: a right configuration passes;
    /// a refused token, a wrong base path and a port nobody listens on are
    /// each reported at their key.
    func testCheckConfigConnectsToSCIMSources() throws {
        let dir = TempDirectory("edge-scim-check")
        defer { dir.remove() }
        let refPort = try referenceServer()
        let nobody = try freePort()
        func check(url: String, token: String = "ref-token") throws -> (Int32?, [String]) {
            let file = secretFile(dir, "source.token", token)
            let config = sourceAgentConfig(dir, source: "  - {name: hr, kind: scim, url: \"\(url)\", tokenFile: \(file)}\n")
            let c = try ChildProcess(productsDirectory + "/scim-edge", ["check-config", "--connect", config])
            return (c.waitForExit(seconds: 60), c.output)
        }
        var (status, out) = try check(url: "http://127.0.0.1:\(refPort)")
        XCTAssertEqual(status, 0, "\(out)")
        (status, out) = try check(url: "http://127.0.0.1:\(refPort)", token: "wrong-token")
        XCTAssertEqual(status, 1)
        XCTAssertTrue(out.contains { $0.contains("sources[0].tokenFile:") && $0.contains("refused the token") }, "\(out)")
        (status, out) = try check(url: "http://127.0.0.1:\(refPort)/nope")
        XCTAssertEqual(status, 1)
        XCTAssertTrue(out.contains { $0.contains("sources[0].url:") && $0.contains("ServiceProviderConfig") }, "\(out)")
        (status, out) = try check(url: "http://127.0.0.1:\(nobody)")
        XCTAssertEqual(status, 1)
        XCTAssertTrue(out.contains { $0.contains("sources[0].url:") && $0.contains("cannot reach") }, "\(out)")
        // A server throttling now (429, then 503): reachable, a warning each, never waited out.
        let proxy = try ThrottlingProxy(upstreamPort: refPort)
        for code in [429, 503] {
            proxy.refusals.withLock { $0 = Array(repeating: code, count: 50) }
            (status, out) = try check(url: "http://127.0.0.1:\(proxy.port)")
            XCTAssertEqual(status, 0, "\(code): \(out)")
            XCTAssertTrue(out.contains { $0.contains("sources[0].url:") && $0.contains("answered \(code)") }, "\(code): \(out)")
        }
    }

    /// A source's secret readable by others (a SCIM token, an LDAP bind
    /// password) is refused: by `check-config` at its key, and by the
    /// running source at every connection (nothing is sent with it).
    func testSourceSecretsReadableByOthersAreRefused() throws {
        let dir = TempDirectory("edge-source-secrets")
        defer { dir.remove() }
        let token = dir.write("open.token", "ref-token\n")
        chmod(token, 0o644)
        let password = dir.write("open.pw", "secret\n")
        chmod(password, 0o644)
        let port = try freePort()
        let config = sourceAgentConfig(
            dir,
            source: """
                  - name: hr
                    kind: scim
                    url: http://127.0.0.1:\(port)
                    tokenFile: \(token)
                  - name: corp
                    url: ldap://127.0.0.1:\(port)
                    baseDN: dc=example,dc=org
                    bindPasswordFile: \(password)
                """)
        let check = try ChildProcess(productsDirectory + "/scim-edge", ["check-config", config])
        XCTAssertEqual(check.waitForExit(seconds: 30), 1)
        XCTAssertTrue(check.output.contains { $0.contains("sources[0].tokenFile") }, "\(check.output)")
        XCTAssertTrue(check.output.contains { $0.contains("sources[1].bindPasswordFile") }, "\(check.output)")
        let agent = try SourceAgent(config: config)
        XCTAssertTrue(
            eventually(seconds: 10) {
                agent.child.output.contains { $0.contains("source hr:") && $0.contains("readable by others") }
                    && agent.child.output.contains { $0.contains("source corp:") && $0.contains("readable by others") }
            }, "\(agent.child.output.suffix(5))")
        agent.stop()
    }

    /// A scim entry of `sources:` is read strictly: its URL must be
    /// http(s), it needs a token file; an ldap entry needs ldap(s) and a
    /// base DN; what is valid is bound.
    func testSCIMSourceConfigurationIsReadStrictly() throws {
        let (config, d) = try readSources(
            """
              - name: hr
                kind: scim
                url: https://hr.example.org/scim/v2
                tokenFile: /etc/scim-edge/hr.token
                requestsPerSecond: 5
                pageSize: 200
                pollSeconds: 300
              - name: no-token
                kind: scim
                url: https://hr.example.org/scim/v2
              - name: ldap-url
                kind: scim
                url: ldap://10.0.0.5
                tokenFile: /etc/scim-edge/hr.token
              - name: http-ldap
                url: http://10.0.0.5
                baseDN: dc=example,dc=org
              - name: no-base
                url: ldap://10.0.0.5
              - name: too-fast
                kind: scim
                url: https://hr.example.org
                tokenFile: /etc/scim-edge/hr.token
                requestsPerSecond: 0
            """)
        let keys = Set(d.problems.compactMap(\.key).filter { $0.hasPrefix("sources") })
        XCTAssertEqual(
            keys, ["sources[1].tokenFile", "sources[2].url", "sources[3].url", "sources[4].baseDN", "sources[5].requestsPerSecond"],
            "\(d.problems)")
        XCTAssertEqual(config.sources.map(\.name), ["hr"])
        let hr = try XCTUnwrap(config.sources.first)
        XCTAssertEqual(hr.kind, .scim)
        XCTAssertEqual(hr.requestsPerSecond, 5)
        XCTAssertEqual(hr.pageSize, 200)
        XCTAssertEqual(hr.pollSeconds, 300)
        XCTAssertEqual(hr.fullCompareEvery, 10, "the default")
    }

    /// What the SCIM source takes from a resource, what it reads of a
    /// server's configuration, and the filter it asks with.
    func testSCIMResourceMappingCapabilitiesAndFilter() throws {
        let user = try JSONParser.parse(
            #"{"schemas":["urn:ietf:params:scim:schemas:core:2.0:User"],"id":"u1","externalId":"theirs","userName":"a","#
                + #""meta":{"lastModified":"2026-01-01T00:00:00Z"},"groups":[{"value":"g1"}]}"#)
        guard case .upsert(let e) = scimChange(user, group: false, endpoint: "Users") else { return XCTFail("mapped") }
        XCTAssertEqual(e.key, "u1")
        XCTAssertEqual(e.reference, "u1", "members name it by its id")
        XCTAssertEqual(e.body["externalId"]?.stringValue, "u1", "the source's id, not its own externalId")
        XCTAssertNil(e.body["meta"])
        XCTAssertNil(e.body["id"])
        XCTAssertNil(e.body["groups"], "read-only at the source")
        XCTAssertEqual(e.name, "Users/u1 (a)")
        let group = try JSONParser.parse(#"{"id":"g1","displayName":"staff","members":[{"value":"u1"},{"value":"u2"}]}"#)
        guard case .upsert(let g) = scimChange(group, group: true, endpoint: "Groups") else { return XCTFail("mapped") }
        XCTAssertEqual(g.members, ["u1", "u2"])
        XCTAssertNil(g.body["members"], "resolved in the write transaction")
        XCTAssertEqual(
            scimChange(try JSONParser.parse(#"{"userName":"x"}"#), group: false, endpoint: "Users"),
            .unmappable(dn: "Users/?", reason: "a resource without an id"))

        // A listing is taken for deletions only when its pages agree.
        var whole = ListingTally()
        whole.page(total: 3, resources: 2)
        whole.page(total: 3, resources: 1)
        XCTAssertTrue(whole.consistent)
        var shifted = ListingTally()
        shifted.page(total: 3, resources: 2)
        shifted.page(total: 2, resources: 0)  // one deleted meanwhile: the third resource moved to page one
        XCTAssertFalse(shifted.consistent, "a skipped resource must not be taken for a deletion")
        var short = ListingTally()
        short.page(total: 5, resources: 4)
        XCTAssertFalse(short.consistent, "fewer than counted")
        var uncounted = ListingTally()
        uncounted.page(total: nil, resources: 4)
        XCTAssertTrue(uncounted.consistent, "a cursor listing without totalResults")

        let full = SCIMServerCapabilities(
            try JSONParser.parse(#"{"filter":{"supported":true},"sort":{"supported":false},"pagination":{"cursor":true,"index":true}}"#))
        XCTAssertEqual(full, SCIMServerCapabilities(filter: true, sort: false, cursor: true))
        XCTAssertEqual(
            SCIMServerCapabilities(try JSONParser.parse(#"{"filter":{"supported":true}}"#)), SCIMServerCapabilities(filter: true))
        XCTAssertEqual(SCIMPollClient.changedSince(#"2026-01-01T00:00:00Z"#), #"meta.lastModified gt "2026-01-01T00:00:00Z""#)
        XCTAssertEqual(SCIMPollClient.changedSince(#"a"b\"#), #"meta.lastModified gt "a\"b\\""#, "escaped, never spliced")
    }
}
