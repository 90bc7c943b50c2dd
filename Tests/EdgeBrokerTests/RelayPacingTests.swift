import EdgeBroker
import EdgeHTTP
import EdgeTLS
import EdgeTestSupport
import Foundation
import SCIM
import XCTest

/// The relay against a broker (or a proxy before it) that answers busy
/// with `Retry-After: 0`: the batch goes again after a second, not at once
/// (it was sent again in a loop for as long as the answer came), and once
/// the broker takes it, it is acknowledged.
final class RelayPacingTests: FederationTestCase {
    func testABusyAnswerWithARetryAfterOfZeroWaitsASecond() throws {
        let batches = Locked<[Date]>([])
        let fake = try ServerHarness(tls: TLSConfiguration(certificateChainFile: broker.0, privateKeyFile: broker.1, trustRootsFile: ca)) {
            request, _, responder in
            let n = batches.withLock { b in
                b.append(Date())
                return b.count
            }
            guard n > 4, let batch = try? JSONParser.parse(request.body),
                let last = batch["events"]?.arrayValue?.last?["seq"]?.numberValue?.integer
            else {
                return responder.respond(
                    HTTPResponse(
                        status: 503, headers: ["Content-Type": "application/json", "Retry-After": "0"],
                        body: Array(#"{"error":"busy","description":"scripted"}"#.utf8)))
            }
            responder.respond(
                HTTPResponse(
                    status: 200, headers: ["Content-Type": "application/json"],
                    body: Array(#"{"ackedThrough":\#(last),"rejected":{},"protocol":3}"#.utf8)))
        }
        defer { _ = fake.stop() }
        let (agent, port) = try startAgent("de", cert: de, domain: "acme-de", brokerPort: fake.port)
        XCTAssertEqual(try create(port, "alice"), 201)
        XCTAssertTrue(eventually(seconds: 30) { batches.current.count >= 5 }, "\(batches.current.count) \(agent.output.suffix(5))")
        let times = batches.current.prefix(5)
        for (a, b) in zip(times, times.dropFirst()) {
            XCTAssertGreaterThanOrEqual(b.timeIntervalSince(a), 0.9, "a busy batch was sent again after \(b.timeIntervalSince(a)) s")
        }
        XCTAssertTrue(eventually(seconds: 10) { (try? self.outboxEvents("de")) == 0 }, "acknowledged once taken")
    }

    /// A 409 that expects exactly the batch's first event (no honest broker
    /// answers so: it applies what continues its sequence) is a protocol
    /// error, backed off; resent at once, the batch looped.
    func testA409ExpectingTheBatchsOwnFirstEventBacksOff() throws {
        let batches = Locked<[Date]>([])
        let fake = try ServerHarness(tls: TLSConfiguration(certificateChainFile: broker.0, privateKeyFile: broker.1, trustRootsFile: ca)) {
            request, _, responder in
            batches.withLock { $0.append(Date()) }
            let first = (try? JSONParser.parse(request.body))?["events"]?.arrayValue?.first?["seq"]?.numberValue?.integer ?? 1
            responder.respond(
                HTTPResponse(
                    status: 409, headers: ["Content-Type": "application/json"], body: Array(#"{"expectedSeq":\#(first)}"#.utf8)))
        }
        defer { _ = fake.stop() }
        let (agent, port) = try startAgent("de", cert: de, domain: "acme-de", brokerPort: fake.port)
        XCTAssertEqual(try create(port, "alice"), 201)
        XCTAssertTrue(eventually(seconds: 20) { batches.current.count >= 2 }, "\(agent.output.suffix(5))")
        Thread.sleep(forTimeInterval: 4)
        // Backing off (jittered, doubling): a handful in 4 s; resent at once, thousands.
        XCTAssertLessThanOrEqual(batches.current.count, 15, "\(batches.current.count) batches in about 4 s")
        XCTAssertTrue(
            agent.output.contains { $0.contains("protocol error") || $0.contains("out of sequence") }, "\(agent.output.suffix(5))")
        XCTAssertEqual(try outboxEvents("de"), 1, "nothing pruned on the broker's word")
    }
}
