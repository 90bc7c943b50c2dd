import EdgeHTTP
import EdgeTestSupport
import Foundation
import SCIM
import XCTest

/// A SCIM source that takes the session (its capabilities answer) and then
/// fails every listing: each session connected, and a connected session
/// used to start the backoff again, so the source was read again from the
/// start about every second for as long as the server failed. Now only a
/// session that stayed connected for a minute does: the retries double.
final class SourceBackoffTests: XCTestCase {
    /// An agent with SCIM source `hr` reading the server on `serverPort` every second (`extra`: another setting).
    func startAgent(_ dir: TempDirectory, serverPort: Int, extra: String = "") throws -> SourceAgent {
        let token = secretFile(dir, "source.token", "ref-token")
        return try SourceAgent(
            config: sourceAgentConfig(
                dir,
                source: """
                      - name: hr
                        kind: scim
                        url: http://127.0.0.1:\(serverPort)
                        tokenFile: \(token)
                        pollSeconds: 1
                        \(extra)
                    """))
    }

    func testASourceThatFailsRightAfterConnectingIsRetriedWithGrowingBackoff() throws {
        let dir = TempDirectory("edge-source-backoff")
        defer { dir.remove() }
        let sessions = Locked<[Date]>([])
        let server = try ServerHarness { request, _, responder in
            if request.path.hasSuffix("/ServiceProviderConfig") {
                sessions.withLock { $0.append(Date()) }
                return responder.respond(
                    HTTPResponse(
                        status: 200, contentType: "application/scim+json",
                        body:
                            #"{"schemas":["urn:ietf:params:scim:schemas:core:2.0:ServiceProviderConfig"],"filter":{"supported":false},"sort":{"supported":false}}"#
                    ))
            }
            responder.respond(
                HTTPResponse(
                    status: 500, contentType: "application/scim+json",
                    body: #"{"schemas":["urn:ietf:params:scim:api:messages:2.0:Error"],"status":"500","detail":"scripted"}"#))
        }
        defer { _ = server.stop() }
        let agent = try startAgent(dir, serverPort: server.port)
        defer { agent.stop() }
        XCTAssertTrue(eventually(seconds: 20) { sessions.current.count >= 1 }, "\(agent.child.output.suffix(5))")
        Thread.sleep(forTimeInterval: 8)
        // Waits of 0.75–1, 1.5–2, 3–4, 6–8 s: about 4 sessions in 8 s; started again each time, about 9.
        let first = try XCTUnwrap(sessions.current.first)
        let within = sessions.current.filter { $0.timeIntervalSince(first) <= 8 }.count
        XCTAssertLessThanOrEqual(within, 6, "\(within) sessions in 8 s")
        XCTAssertGreaterThanOrEqual(within, 2, "retried")
        let gaps = zip(sessions.current, sessions.current.dropFirst()).map { $1.timeIntervalSince($0) }
        XCTAssertTrue(gaps.count < 2 || gaps[1] > gaps[0], "the waits grow: \(gaps)")
    }

    /// A SCIM server that ignores the cursor (the same page and `nextCursor`
    /// again), or startIndex (the same page at every startIndex): the
    /// listing never ended, one GET after another at the request rate, the
    /// poll never finished and deletions were never found. Now the repeat is
    /// refused with a precise error, and the session retried with backoff.
    func testAListingThatRepeatsItsPagesIsRefusedInsteadOfReadForever() throws {
        for cursor in [true, false] {
            let dir = TempDirectory("edge-source-pages")
            defer { dir.remove() }
            let lists = Locked<[Date]>([])
            let page: JSON = [
                "schemas": ["urn:ietf:params:scim:api:messages:2.0:ListResponse"], "totalResults": 1000, "itemsPerPage": 2,
                "nextCursor": "c1",
                "Resources": [
                    [
                        "schemas": ["urn:ietf:params:scim:schemas:core:2.0:User"], "id": "a1", "userName": "alice",
                        "meta": ["resourceType": "User", "lastModified": "2026-12-01T00:00:00Z"],
                    ],
                    [
                        "schemas": ["urn:ietf:params:scim:schemas:core:2.0:User"], "id": "b2", "userName": "bob",
                        "meta": ["resourceType": "User", "lastModified": "2026-12-01T00:00:00Z"],
                    ],
                ],
            ]
            let body = page.serialized()
            let config =
                #"{"schemas":["urn:ietf:params:scim:schemas:core:2.0:ServiceProviderConfig"],"filter":{"supported":false},"sort":{"supported":false},"pagination":{"cursor":\#(cursor)}}"#
            let server = try ServerHarness { request, _, responder in
                if request.path.hasSuffix("/ServiceProviderConfig") {
                    return responder.respond(HTTPResponse(status: 200, contentType: "application/scim+json", body: config))
                }
                lists.withLock { $0.append(Date()) }
                responder.respond(HTTPResponse(status: 200, headers: ["Content-Type": "application/scim+json"], body: body))
            }
            defer { _ = server.stop() }
            let agent = try startAgent(dir, serverPort: server.port, extra: "pageSize: 2")
            defer { agent.stop() }
            let said = cursor ? "nextCursor c1 came before" : "answered the page before it again"
            XCTAssertTrue(
                eventually(seconds: 20) { agent.child.output.contains { $0.contains(said) } }, "\(cursor): \(agent.child.output.suffix(5))")
            let first = try XCTUnwrap(lists.current.first)
            Thread.sleep(forTimeInterval: 5)
            // Two pages a session, sessions 1, 2, 4 s apart: a handful; read forever, 10 a second (the request rate).
            let within = lists.current.filter { $0.timeIntervalSince(first) <= 5 }.count
            XCTAssertLessThanOrEqual(within, 20, "cursor \(cursor): \(within) pages in 5 s")
        }
    }
}
