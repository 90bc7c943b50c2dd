import EdgeAgent
import EdgeBroker
import EdgeTestSupport
import Foundation
import SCIM
import XCTest

/// The web console (`/console/` on the read API's listener): its JSON
/// endpoints over a real socket, then the page in a real browser, against
/// a real federation (broker and agent processes over mutual TLS).
extension FanoutTests {
    static let readToken = "console-read-token-1f4e9a7c"
    static let operatorToken = "console-operator-token-8b2d6e31"

    /// A broker whose read API serves the console, with target `app` (a
    /// standalone agent) that refuses users with a nickName (renamed to an
    /// attribute it does not know: a dead letter) and whose deletion guard
    /// holds the second removal within the hour; and acme-de's agent.
    func consoleFederation() throws -> (app: Int, agent: Int, api: Int, broker: ChildProcess) {
        let (_, appPort) = try startAppAgent("app")
        let reads = dir.write("read.tokens", Self.readToken + "\n")
        let operators = dir.write("operator.tokens", Self.operatorToken + "\n")
        let (broker, bp) = try startBroker(
            yaml: "targets:\n"
                + target("app", port: appPort, extra: Self.refusesNickNames + "\n    deleteGuard: {maxDeletes: 1, windowSeconds: 3600}")
                + "api: {listen: 127.0.0.1:0, tokenFile: \(reads), operatorTokenFile: \(operators)}\n")
        let api = try port(of: broker, "console at")
        let (_, dp) = try startAgent("de", cert: de, domain: "acme-de", brokerPort: bp)
        return (appPort, dp, api, broker)
    }

    /// One request to the console's listener: status, head and JSON body.
    func console(
        _ port: Int, _ method: String, _ path: String, token: String? = FanoutTests.readToken, body: String? = nil,
        headers: [String] = []
    ) throws -> (status: Int, head: String, json: JSON?) {
        let c = try RawClient(port: port)
        var head = "\(method) \(path) HTTP/1.1\r\nHost: 127.0.0.1:\(port)\r\nConnection: close\r\n"
        if let token { head += "Authorization: Bearer \(token)\r\n" }
        if let body { head += "Content-Type: application/json\r\nContent-Length: \(body.utf8.count)\r\n" }
        for h in headers { head += h + "\r\n" }
        c.send(head + "\r\n" + (body ?? ""))
        let r = try XCTUnwrap(c.readResponses(1).first, "\(method) \(path): no answer")
        return (r.status, r.head, try? JSONParser.parse(Array(r.body.utf8)))
    }

    func consoleAction(_ port: Int, _ path: String, _ body: String = "{}", token: String = FanoutTests.operatorToken) throws -> (
        status: Int, head: String, json: JSON?
    ) {
        try console(port, "POST", "/console/api/" + path, token: token, body: body)
    }

    /// A SCIM error body (RFC 7644 §3.12) with this status.
    func assertSCIMError(_ r: (status: Int, head: String, json: JSON?), _ status: Int, _ scimType: String? = nil, line: UInt = #line) {
        XCTAssertEqual(r.status, status, "\(r.head) \(r.json.map { String(decoding: $0.serialized(), as: UTF8.self) } ?? "")", line: line)
        XCTAssertEqual(r.json?["schemas"]?.arrayValue?.first?.stringValue, SCIMError.errorSchema, line: line)
        XCTAssertEqual(r.json?["status"]?.stringValue, String(status), line: line)
        XCTAssertNotNil(r.json?["detail"]?.stringValue, line: line)
        if let scimType { XCTAssertEqual(r.json?["scimType"]?.stringValue, scimType, line: line) }
        XCTAssertTrue(r.head.lowercased().contains("content-type: application/scim+json"), r.head, line: line)
    }

    func target(_ overview: JSON?, _ name: String) -> JSON? { overview?["targets"]?.arrayValue?.first { $0["target"] == .string(name) } }

    func testConsoleAPIReadsWithAnyTokenAndActsOnlyWithAnOperatorToken() throws {
        let (appPort, dp, api, broker) = try consoleFederation()
        let dora = try newUser(dp, "dora", extra: #","externalId":"hr-4711""#)
        XCTAssertTrue(eventually(seconds: 20) { self.users(appPort, token: "t", prefix: "/scim/v2")["dora"] != nil })

        // The page: no token (a browser's navigation carries none), nothing but its own files.
        let moved = try console(api, "GET", "/console", token: nil)
        XCTAssertEqual(moved.status, 301)
        XCTAssertTrue(moved.head.contains("Location: /console/"), moved.head)
        let page = try console(api, "GET", "/console/", token: nil)
        XCTAssertEqual(page.status, 200)
        XCTAssertTrue(page.head.contains("Content-Type: text/html"), page.head)
        XCTAssertTrue(page.head.contains("Content-Security-Policy: default-src 'none'; script-src 'self'"), page.head)
        XCTAssertTrue(page.head.contains("frame-ancestors 'none'"), page.head)
        for (file, type) in [("console.js", "text/javascript"), ("console.css", "text/css")] {
            let r = try console(api, "GET", "/console/" + file, token: nil)
            XCTAssertEqual(r.status, 200)
            XCTAssertTrue(r.head.contains("Content-Type: \(type)"), r.head)
        }
        // Every answer under /console/, files, errors and JSON alike: no sniffing, no framing, no referrer.
        let missing = try console(api, "GET", "/console/nothing.js?<script>", token: nil)
        XCTAssertEqual(missing.status, 404)
        let notFound = try RawClient(port: api)
        notFound.send("GET /console/\(String(repeating: "x", count: 2000)) HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        XCTAssertFalse(try XCTUnwrap(notFound.readResponses(1).first).body.contains("xxxxxxxx"), "a 404 does not echo the path")
        for r in [
            page, moved, missing, try console(api, "POST", "/console/", token: nil, body: "{}"),
            try console(api, "GET", "/console/api/session"), try console(api, "GET", "/console/api/overview", token: nil),
        ] {
            for header in [
                "X-Content-Type-Options: nosniff", "X-Frame-Options: DENY", "Referrer-Policy: no-referrer",
                "Content-Security-Policy: default-src 'none'",
            ] {
                XCTAssertTrue(r.head.contains(header), "\(header) missing: \(r.head)")
            }
        }
        XCTAssertEqual(try console(api, "POST", "/console/", token: nil, body: "{}").status, 405)
        // The SCIM read API is still there, beside it.
        XCTAssertEqual(
            try console(
                api, "GET",
                "/scim/v2/Users/\(try XCTUnwrap(users(appPort, token: "t", prefix: "/scim/v2")["dora"]?["externalId"]?.stringValue))"
            ).status, 200)

        // The data: 401 without a valid token, 400 with two.
        for token in [nil, "wrong-token-000000000000"] {
            let r = try console(api, "GET", "/console/api/overview", token: token)
            assertSCIMError(r, 401)
            XCTAssertTrue(r.head.contains(#"WWW-Authenticate: Bearer realm="scim-broker console""#), r.head)
        }
        assertSCIMError(
            try console(
                api, "GET", "/console/api/overview", token: nil,
                headers: ["Authorization: Bearer \(Self.readToken)", "Authorization: Bearer \(Self.operatorToken)"]), 400, "invalidSyntax")
        XCTAssertEqual(try console(api, "GET", "/console/api/session").json?["role"], "reader")
        XCTAssertEqual(try console(api, "GET", "/console/api/session", token: Self.operatorToken).json?["role"], "operator")

        // The federation and the targets, with the read token.
        var overview: JSON?
        XCTAssertTrue(
            eventually(seconds: 10) {
                overview = try? self.console(api, "GET", "/console/api/overview").json
                let de = overview?["federation"]?["domains"]?.arrayValue?.first { $0["domain"] == "acme-de" }
                // The app answered before the broker recorded it: the count follows.
                return de?["connected"] == .bool(true) && (de?["stores"]?.arrayValue?.first?["applied"]?.numberValue?.integer ?? 0) >= 1
                    && (self.target(overview, "app")?["delivered"]?.numberValue?.integer ?? 0) >= 1
            }, "\(String(describing: overview))")
        let de = overview?["federation"]?["domains"]?.arrayValue?.first { $0["domain"] == "acme-de" }
        XCTAssertEqual(de?["identity"]?.stringValue, deID)
        XCTAssertGreaterThan(de?["certificateExpiry"]?.numberValue?.integer ?? 0, Int64(Date().timeIntervalSince1970))
        XCTAssertNotNil(de?["lagSeconds"]?.numberValue)
        XCTAssertEqual(overview?["federation"]?["domains"]?.arrayValue?.first { $0["domain"] == "acme-us" }?["connected"], .bool(false))
        XCTAssertEqual(target(overview, "app")?["state"], "closed")
        XCTAssertEqual(target(overview, "app")?["paused"], .null)
        let metrics = try console(api, "GET", "/console/api/metrics").json
        XCTAssertGreaterThanOrEqual(metrics?["eventsApplied"]?.numberValue?.integer ?? 0, 1)
        XCTAssertEqual(metrics?["targets"]?.arrayValue?.first?["target"], "app")

        // The provisioning log, by userName, externalId and the id at the source.
        for q in ["dora", "hr-4711", dora] {
            var hops: [JSON] = []
            XCTAssertTrue(
                eventually(seconds: 10) {
                    hops = (try? self.console(api, "GET", "/console/api/trace?q=\(q)").json?["hops"]?.arrayValue) ?? []
                    return Set(hops.compactMap { $0["hop"]?.stringValue }) == ["agent accept", "broker apply", "target app"]
                }, "trace \(q): \(hops)")
        }
        XCTAssertEqual(try console(api, "GET", "/console/api/trace?q=nobody-at-all").json?["hops"], .array([]))
        assertSCIMError(try console(api, "GET", "/console/api/trace"), 400, "invalidValue")
        assertSCIMError(try console(api, "GET", "/console/api/targets/nope/deadletters"), 404)
        assertSCIMError(try console(api, "GET", "/console/api/nothing"), 404)

        // An action: 403 with the read token, and nothing changes.
        assertSCIMError(try consoleAction(api, "targets/app/pause", token: Self.readToken), 403)
        XCTAssertEqual(target(try console(api, "GET", "/console/api/overview").json, "app")?["paused"], .null)
        // Not JSON, another site's page, a GET, bad JSON, a bad value: refused, and nothing changes.
        let noType = try console(api, "POST", "/console/api/targets/app/pause", token: Self.operatorToken)
        assertSCIMError(noType, 415)
        // The Origin is compared by scheme, host and port.
        for origin in ["http://evil.example", "https://127.0.0.1:\(api)", "http://127.0.0.1:\(api + 1)", "http://127.0.0.1", "null"] {
            assertSCIMError(
                try console(
                    api, "POST", "/console/api/targets/app/resume", token: Self.operatorToken, body: "{}", headers: ["Origin: \(origin)"]),
                403)
        }
        XCTAssertEqual(
            try console(
                api, "POST", "/console/api/targets/app/resume", token: Self.operatorToken, body: "{}",
                headers: ["Origin: http://127.0.0.1:\(api)"]
            ).status, 200)
        // Exactly JSON, with parameters or not.
        for (type, status) in [("application/jsonp", 415), ("application/json-seq", 415), ("application/json; charset=utf-8", 200)] {
            let c = try RawClient(port: api)
            c.send(
                "POST /console/api/targets/app/resume HTTP/1.1\r\nHost: 127.0.0.1:\(api)\r\nConnection: close\r\nAuthorization: Bearer \(Self.operatorToken)\r\nContent-Type: \(type)\r\nContent-Length: 2\r\n\r\n{}"
            )
            XCTAssertEqual(try XCTUnwrap(c.readResponses(1).first).status, status, type)
        }
        assertSCIMError(try console(api, "GET", "/console/api/targets/app/pause", token: Self.operatorToken), 405)
        assertSCIMError(try consoleAction(api, "targets/app/pause", "{nope"), 400, "invalidSyntax")
        assertSCIMError(try consoleAction(api, "targets/app/pause", #"{"reason":7}"#), 400, "invalidValue")
        XCTAssertEqual(target(try console(api, "GET", "/console/api/overview").json, "app")?["paused"], .null)

        // Pause with the operator token: 200; the broker stops sending and says why; the CLI shows it too.
        let paused = try consoleAction(api, "targets/app/pause", #"{"reason":"change freeze"}"#, token: Self.operatorToken)
        XCTAssertEqual(paused.status, 200, "\(String(describing: paused.json))")
        XCTAssertEqual(paused.json?["pause"]?["reason"], "change freeze")
        let status = try brokerCLI(["targets", "status", "--data-dir", dir.file("broker")]).1
        XCTAssertTrue(status.contains("app\tpaused (since ") && status.contains("change freeze"), status)
        overview = try console(api, "GET", "/console/api/overview").json
        XCTAssertEqual(target(overview, "app")?["state"], "paused")
        XCTAssertEqual(target(overview, "app")?["paused"]?["reason"], "change freeze")
        _ = try newUser(dp, "erin")
        XCTAssertTrue(
            eventually(seconds: 10) {
                (self.target(try? self.console(api, "GET", "/console/api/overview").json, "app")?["queued"]?.numberValue?.integer ?? 0) >= 1
            })
        XCTAssertNil(users(appPort, token: "t", prefix: "/scim/v2")["erin"], "a paused target receives nothing")
        XCTAssertEqual(try consoleAction(api, "targets/app/resume").status, 200)
        XCTAssertTrue(eventually(seconds: 20) { self.users(appPort, token: "t", prefix: "/scim/v2")["erin"] != nil })
        XCTAssertEqual(target(try console(api, "GET", "/console/api/overview").json, "app")?["paused"], .null)

        // Push: queued with a trace of its own, and the target's answer.
        let push = try consoleAction(api, "targets/app/push", #"{"resource":"dora"}"#)
        XCTAssertEqual(push.status, 200, "\(String(describing: push.json))")
        XCTAssertEqual(push.json?["inScope"], .bool(true))
        XCTAssertTrue(push.json?["trace"]?.stringValue?.hasPrefix("push-") ?? false)
        let pushed = try XCTUnwrap(push.json?["id"]?.stringValue), since = try XCTUnwrap(push.json?["queuedAt"]?.numberValue?.integer)
        var answer: JSON?
        XCTAssertTrue(
            eventually(seconds: 20) {
                answer = try? self.console(api, "GET", "/console/api/targets/app/push?id=\(pushed)&since=\(since)").json
                return answer?["done"] == .bool(true)
            })
        XCTAssertEqual(answer?["delivered"], .bool(true))
        XCTAssertTrue(
            (answer?["hop"]?["steps"]?.arrayValue ?? []).contains { $0["method"] == "PUT" && $0["status"] == 200 },
            "\(String(describing: answer))")
        assertSCIMError(try consoleAction(api, "targets/app/push", #"{"resource":"nobody"}"#), 404)
        assertSCIMError(try consoleAction(api, "targets/app/push", "{}"), 400, "invalidValue")

        // A dead letter with its request and response; retried, then dropped.
        _ = try newUser(dp, "mallory", extra: #","nickName":"mal""#)
        var letters: [JSON] = []
        XCTAssertTrue(
            eventually(seconds: 20) {
                letters = (try? self.console(api, "GET", "/console/api/targets/app/deadletters").json?["letters"]?.arrayValue) ?? []
                return !letters.isEmpty
            })
        XCTAssertEqual(letters[0]["status"], 400)
        XCTAssertTrue(letters[0]["request"]?.stringValue?.contains("bogusAttribute") ?? false)
        XCTAssertTrue(letters[0]["response"]?.stringValue?.contains("invalidSyntax") ?? false)
        let first = try XCTUnwrap(letters[0]["seq"]?.numberValue?.integer)
        XCTAssertEqual(try console(api, "GET", "/console/api/targets/app/deadletters").json?["lastSeq"]?.numberValue?.integer, first)
        assertSCIMError(try consoleAction(api, "targets/app/deadletters/retry", #"{"through":\#(first)}"#, token: Self.readToken), 403)
        // "Retry all" names what it was shown: the page sends the highest number it listed.
        assertSCIMError(try consoleAction(api, "targets/app/deadletters/retry"), 400, "invalidValue")
        XCTAssertEqual(try consoleAction(api, "targets/app/deadletters/retry", #"{"through":\#(first)}"#).json?["retried"], 1)
        var lastSeq: Int64 = 0
        XCTAssertTrue(
            eventually(seconds: 20) {
                let d = try? self.console(api, "GET", "/console/api/targets/app/deadletters").json
                let l = d?["letters"]?.arrayValue ?? []
                lastSeq = d?["lastSeq"]?.numberValue?.integer ?? 0
                return l.count == 1 && l[0]["seq"] != letters[0]["seq"]
            }, "the retry is refused again: one dead letter, a new one")
        assertSCIMError(try consoleAction(api, "targets/app/deadletters/drop"), 400, "invalidValue")
        assertSCIMError(try consoleAction(api, "targets/app/deadletters/drop", #"{"all":true}"#), 400, "invalidValue")
        // Shown up to #first: the newer one is not dropped unseen.
        assertSCIMError(try consoleAction(api, "targets/app/deadletters/drop", #"{"through":\#(first)}"#), 409)
        XCTAssertEqual(try BrokerStore(path: dir.file("broker")).deadLetters(target: "app").count, 1)
        XCTAssertEqual(try consoleAction(api, "targets/app/deadletters/drop", #"{"through":\#(lastSeq)}"#).json?["dropped"], 1)
        XCTAssertEqual(try BrokerStore(path: dir.file("broker")).deadLetters(target: "app").count, 0)
        XCTAssertTrue(
            eventually(seconds: 5) {
                broker.output.contains { $0.contains(#""msg":"console: deadletters/drop""#) && $0.contains(#""count":"1""#) }
            }, "the audit line says how many: \(broker.output.suffix(5))")

        // Held removals: the guard lets one through and holds the next; one is rejected by its number.
        let ids = [try newUser(dp, "leaver1"), try newUser(dp, "leaver2")]
        XCTAssertTrue(eventually(seconds: 20) { self.users(appPort, token: "t", prefix: "/scim/v2")["leaver2"] != nil })
        for id in ids { XCTAssertEqual(try idp(dp, "DELETE", "/Users/\(id)").0, 204) }
        var held: JSON?
        XCTAssertTrue(
            eventually(seconds: 20) {
                held = try? self.console(api, "GET", "/console/api/targets/app/held").json
                return held?["total"] == 1
            }, "\(String(describing: held))")
        XCTAssertNotEqual(held?["pausedSince"], .null)
        XCTAssertEqual(target(try console(api, "GET", "/console/api/overview").json, "app")?["held"], 1)
        let seq = try XCTUnwrap(held?["removals"]?.arrayValue?.first?["seq"]?.numberValue?.integer)
        XCTAssertEqual(held?["lastSeq"]?.numberValue?.integer, seq)
        XCTAssertEqual(held?["complete"], .bool(true))
        assertSCIMError(try consoleAction(api, "targets/app/held/reject", #"{"seqs":[\#(seq)]}"#, token: Self.readToken), 403)
        assertSCIMError(try consoleAction(api, "targets/app/held/reject", #"{"seqs":[999999]}"#), 409)
        // Confirming or rejecting "all" names the last one shown: a removal held after it is not released unseen.
        assertSCIMError(try consoleAction(api, "targets/app/held/confirm"), 400, "invalidValue")
        assertSCIMError(try consoleAction(api, "targets/app/held/reject"), 400, "invalidValue")
        assertSCIMError(try consoleAction(api, "targets/app/held/confirm", #"{"through":\#(seq - 1)}"#), 409)
        assertSCIMError(try consoleAction(api, "targets/app/held/reject", #"{"through":\#(seq - 1)}"#), 409)
        XCTAssertEqual(try console(api, "GET", "/console/api/targets/app/held").json?["total"], 1, "nothing changed")
        let rejected = try consoleAction(api, "targets/app/held/reject", #"{"seqs":[\#(seq)]}"#)
        XCTAssertEqual(rejected.status, 200)
        XCTAssertEqual(rejected.json?["rejected"]?.arrayValue?.count, 1)
        XCTAssertEqual(rejected.json?["resumed"], .bool(true))
        XCTAssertEqual(try console(api, "GET", "/console/api/targets/app/held").json?["total"], 0)
        // Nothing held: nothing to confirm.
        assertSCIMError(try consoleAction(api, "targets/app/held/confirm", #"{"through":\#(seq)}"#), 409)

        // The command line pauses and resumes too: the running broker follows within a second.
        let cli = try brokerCLI(["targets", "pause", "--data-dir", dir.file("broker"), "app", "--reason", "from the shell"])
        XCTAssertEqual(cli.0, 0, cli.1)
        XCTAssertTrue(
            eventually(seconds: 5) {
                self.target(try? self.console(api, "GET", "/console/api/overview").json, "app")?["paused"]?["reason"] == "from the shell"
            })
        XCTAssertTrue(try brokerMetrics(broker).contains(#"scim_broker_target_paused{target="app"} 1"#))
        XCTAssertTrue(try brokerCLI(["targets", "resume", "--data-dir", dir.file("broker"), "app"]).1.contains("app: resumed"))
        XCTAssertTrue(
            eventually(seconds: 5) { self.target(try? self.console(api, "GET", "/console/api/overview").json, "app")?["paused"] == .null })
        XCTAssertTrue(try brokerCLI(["targets", "resume", "--data-dir", dir.file("broker"), "app"]).1.contains("not paused"))
    }

    /// The console in Debian's Chromium against a running federation: it
    /// lists the domains and their agent, a search finds a user's hops, and
    /// the page's Pause and Resume buttons pause and resume the target at the
    /// broker. The screenshot is kept (`.build/console.png`; with
    /// SCIM_EDGE_UPDATE_SCREENSHOT=1, `docs/console.png` too).
    func testConsoleInABrowserListsTheFederationFindsAUserAndPausesATarget() throws {
        guard HeadlessChromium.executable != nil else {
            throw XCTSkip("chromium is not installed (make deps installs Debian's): the console's browser test needs it")
        }
        let (appPort, dp, api, _) = try consoleFederation()
        _ = try newUser(dp, "dora", extra: #","externalId":"hr-4711","name":{"givenName":"Dora","familyName":"Diaz"}"#)
        for i in 1...3 { _ = try newUser(dp, "user\(i)") }
        // A name from an IdP is data, never markup.
        let markup = "<img src=x onerror=document.body.dataset.pwned=1>"
        _ = try newUser(dp, markup)
        XCTAssertTrue(eventually(seconds: 20) { self.users(appPort, token: "t", prefix: "/scim/v2").count == 5 })
        let browser = try HeadlessChromium(width: 1280, height: 1500)
        defer { browser.close() }
        try browser.navigate("http://127.0.0.1:\(api)/console/#token=\(Self.operatorToken)")

        // The federation: both domains, acme-de's agent connected with its applied sequence.
        XCTAssertTrue(browser.waitFor("document.body.dataset.loaded === 'true'"), browser.text("body"))
        XCTAssertTrue(browser.waitFor("document.querySelector('#domains').innerText.includes('connected')"), browser.text("#domains"))
        let domains = browser.text("#domains")
        XCTAssertTrue(domains.contains("acme-de") && domains.contains("acme-us") && domains.contains(deID), domains)
        XCTAssertTrue(domains.contains("not connected"), "acme-us has no agent: \(domains)")
        XCTAssertEqual(browser.text("#role"), "operator: may act")
        XCTAssertEqual(try browser.evaluate("location.hash") as? String, "", "the token leaves the address bar")
        XCTAssertTrue(browser.text("#target-table").contains("app"), browser.text("#target-table"))

        // A search finds dora's hops: accepted, applied, delivered to the app.
        try browser.evaluate("document.querySelector('#q').value = 'hr-4711'; document.querySelector('#search').requestSubmit()")
        XCTAssertTrue(
            browser.waitFor("document.querySelector('#hops') && document.querySelector('#hops').innerText.includes('target app')"),
            browser.text("#results"))
        let hops = browser.text("#hops")
        XCTAssertTrue(
            hops.contains("accepted by the agent") && hops.contains("relayed and applied by the broker") && hops.contains("delivered"), hops
        )
        XCTAssertTrue(hops.contains("dora"), hops)

        try browser.evaluate("document.querySelector('#q').value = \(quoted(markup)); document.querySelector('#search').requestSubmit()")
        XCTAssertTrue(
            browser.waitFor("document.querySelector('#hops') && document.querySelector('#hops').innerText.includes('target app')"))
        XCTAssertTrue(browser.text("#hops").contains(markup), browser.text("#hops"))
        XCTAssertEqual(try browser.evaluate("document.querySelectorAll('#results img').length") as? Int, 0)
        XCTAssertNil(try browser.evaluate("document.body.dataset.pwned"))

        // Pause from the page: the broker's state says so, and the page shows it.
        try browser.evaluate("document.querySelector('button[data-action=pause][data-target=app]').click()")
        XCTAssertTrue(browser.waitFor("document.querySelector('#pause-reason')"))
        try browser.evaluate(
            "document.querySelector('#pause-reason').value = 'maintenance window'; document.querySelector('#pause-now').click()")
        XCTAssertTrue(
            eventually(seconds: 10) {
                ((try? self.brokerCLI(["targets", "status", "--data-dir", self.dir.file("broker")]).1) ?? "").contains("maintenance window")
            })
        XCTAssertEqual(try BrokerStore(path: dir.file("broker")).targetPauses()["app"]?.reason, "maintenance window")
        XCTAssertTrue(
            browser.waitFor("document.querySelector('tr[data-target=app]').innerText.includes('maintenance window')"),
            browser.text("#target-table"))
        _ = try newUser(dp, "erin")
        XCTAssertTrue(
            browser.waitFor("document.querySelector('tr[data-target=app]').cells[3].innerText === '1'"), browser.text("#target-table"))
        XCTAssertNil(users(appPort, token: "t", prefix: "/scim/v2")["erin"])

        // Resume from the page: erin arrives.
        try browser.evaluate("document.querySelector('button[data-action=resume][data-target=app]').click()")
        XCTAssertTrue(eventually(seconds: 20) { self.users(appPort, token: "t", prefix: "/scim/v2")["erin"] != nil })
        XCTAssertNil(try BrokerStore(path: dir.file("broker")).targetPauses()["app"])
        XCTAssertTrue(browser.waitFor("!document.querySelector('tr[data-target=app]').innerText.includes('maintenance window')"))

        // Traffic for the chart, a little between each of the page's polls (every 2 s), then the picture:
        // the counters carried over the resume, and the search for dora again.
        var created = 6
        for poll in 0..<8 {
            let seen = Int(try browser.evaluate("document.body.dataset.samples") as? String ?? "") ?? 0
            XCTAssertTrue(browser.waitFor("Number(document.body.dataset.samples) > \(seen)"))
            for _ in 0..<(1 + poll % 3 * 2) {
                created += 1
                _ = try newUser(dp, "user\(created)")
            }
        }
        XCTAssertTrue(eventually(seconds: 20) { self.users(appPort, token: "t", prefix: "/scim/v2").count == created })
        XCTAssertTrue(
            browser.waitFor("document.querySelector('tr[data-target=app]').cells[6].innerText === '\(created)'"),
            "delivered, across the pause: \(browser.text("#target-table"))")
        try browser.evaluate("document.querySelector('#q').value = 'dora'; document.querySelector('#search').requestSubmit()")
        XCTAssertTrue(
            browser.waitFor("document.querySelector('#hops') && document.querySelector('#hops').innerText.includes('target app')"))
        XCTAssertTrue(
            browser.waitFor(
                "document.querySelectorAll('#rates polyline').length >= 2 && document.querySelector('#rates-legend').innerText.includes('app')"
            ))
        let png = try browser.screenshot()
        XCTAssertEqual(Array(png.prefix(8)), [0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a], "a PNG")
        XCTAssertGreaterThan(png.count, 20_000, "a page, not a blank")
        let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
        try png.write(to: root.appendingPathComponent(".build/console.png"))
        if ProcessInfo.processInfo.environment["SCIM_EDGE_UPDATE_SCREENSHOT"] == "1" {
            try png.write(to: root.appendingPathComponent("docs/console.png"))
        }

        // A slow broker (each answer 2.5 s late, longer than the 2 s between polls): the page
        // polls again only once the last poll answered, so its requests never pile up.
        _ = try browser.evaluate(
            """
            window.slow = { now: 0, most: 0, polls: 0 };
            const plain = window.fetch;
            window.fetch = (...a) => {
              slow.now++; slow.most = Math.max(slow.most, slow.now);
              if (String(a[0]).includes('overview')) slow.polls++;
              return new Promise((r) => setTimeout(r, 2500)).then(() => plain(...a)).finally(() => { slow.now--; });
            };
            0
            """)
        XCTAssertTrue(browser.waitFor("window.slow.polls >= 3", seconds: 30))
        XCTAssertEqual(try browser.evaluate("window.slow.most") as? Int, 2, "one poll (overview and metrics) at a time")
    }
}
