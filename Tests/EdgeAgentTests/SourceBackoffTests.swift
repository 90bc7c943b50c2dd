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
        let token = secretFile(dir, "source.token", "ref-token")
        let config = sourceAgentConfig(
            dir,
            source: """
                  - name: hr
                    kind: scim
                    url: http://127.0.0.1:\(server.port)
                    tokenFile: \(token)
                    pollSeconds: 1
                """)
        let agent = try SourceAgent(config: config)
        defer { agent.stop() }
        XCTAssertTrue(eventually(seconds: 20) { sessions.current.count >= 1 }, "\(agent.child.output.suffix(5))")
        Thread.sleep(forTimeInterval: 8)
        // Waits of 0.75–1, 1.5–2, 3–4, 6–8 s: about 4 sessions in 8 s; started again each time, about 9.
        let first = sessions.current[0]
        let within = sessions.current.filter { $0.timeIntervalSince(first) <= 8 }.count
        XCTAssertLessThanOrEqual(within, 6, "\(within) sessions in 8 s")
        XCTAssertGreaterThanOrEqual(within, 2, "retried")
        let gaps = zip(sessions.current, sessions.current.dropFirst()).map { $1.timeIntervalSince($0) }
        XCTAssertTrue(gaps.count < 2 || gaps[1] > gaps[0], "the waits grow: \(gaps)")
    }
}
