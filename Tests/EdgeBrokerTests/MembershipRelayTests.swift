import EdgeAgent
import EdgeBroker
import EdgeTestSupport
import Foundation
import SCIM
import XCTest

/// Membership deltas over the real relay: an agent and a broker (real
/// processes, mutual TLS, LMDB files), the broker SIGKILLed while an IdP
/// grows and shrinks a group one member at a time. Every change arrives
/// exactly once: the broker's group ends with exactly the agent's members,
/// and the changes travelled as deltas.
final class MembershipRelayTests: FederationTestCase {
    let patchSchema = #"["urn:ietf:params:scim:api:messages:2.0:PatchOp"]"#

    func testMembershipDeltasReplayedAfterABrokerSIGKILLApplyExactlyOnce() throws {
        var (broker, bp) = try startBroker()
        let (agent, dp) = try startAgent("de", cert: de, domain: "acme-de", brokerPort: bp)
        let users = try (0..<60).map { k -> String in
            let (status, body) = try scim(
                dp, "POST", "/Users", #"{"schemas":["urn:ietf:params:scim:schemas:core:2.0:User"],"userName":"m\#(k)"}"#)
            XCTAssertEqual(status, 201)
            return try XCTUnwrap(body?["id"]?.stringValue)
        }
        let (status, group) = try scim(
            dp, "POST", "/Groups", #"{"schemas":["urn:ietf:params:scim:schemas:core:2.0:Group"],"displayName":"all staff"}"#)
        XCTAssertEqual(status, 201)
        let gid = try XCTUnwrap(group?["id"]?.stringValue)
        XCTAssertTrue(
            eventually(seconds: 20) { agent.output.contains { $0.contains("the broker speaks relay protocol 3") } },
            "the agent learns the broker's protocol from its answers")

        // One member at a time: add all 60, remove every third; the broker is killed halfway.
        let done = Locked(0), patchSchema = self.patchSchema
        let writer = Thread {
            for (k, id) in users.enumerated() {
                let add = #"{"schemas":\#(patchSchema),"Operations":[{"op":"add","path":"members","value":[{"value":"\#(id)"}]}]}"#
                if (try? scim(dp, "PATCH", "/Groups/\(gid)", add).0) == 200 { done.withLock { $0 += 1 } }
                if k % 3 == 0 {
                    let remove = #"{"schemas":\#(patchSchema),"Operations":[{"op":"remove","path":"members[value eq \"\#(id)\"]"}]}"#
                    if (try? scim(dp, "PATCH", "/Groups/\(gid)", remove).0) == 200 { done.withLock { $0 += 1 } }
                }
            }
        }
        writer.start()
        XCTAssertTrue(eventually(seconds: 30) { done.current >= 20 })
        broker.signal(SIGKILL)
        _ = broker.waitForExit()
        let atKill = done.current
        XCTAssertTrue(
            eventually(seconds: 20) { done.current >= atKill + 10 || writer.isFinished }, "the agent accepts while the broker is away")
        (broker, _) = try startBroker(port: bp)
        XCTAssertTrue(eventually(seconds: 30) { writer.isFinished })
        XCTAssertEqual(done.current, 80, "60 adds and 20 removals accepted")
        let expected = Set(users.enumerated().filter { $0.offset % 3 != 0 }.map(\.element))

        // The broker's group, in agent ids (its members are broker ids of this domain's users).
        func atBroker(_ name: String = "all staff") -> Set<String>? {
            guard let store = try? BrokerStore(path: dir.file("broker")), let all = try? store.resources(domain: "acme-de") else {
                return nil
            }
            var sourceOf: [String: String] = [:]
            for r in all {
                if let id = r["id"]?.stringValue, let source = r[BrokerStore.sourceExtension]?["id"]?.stringValue { sourceOf[id] = source }
            }
            guard let g = all.first(where: { $0["displayName"]?.stringValue == name }) else { return nil }
            return Set((g["members"]?.arrayValue ?? []).compactMap { $0["value"]?.stringValue.flatMap { sourceOf[$0] } })
        }
        XCTAssertTrue(eventually(seconds: 60) { atBroker() == expected }, "broker has \(atBroker()?.count ?? -1) of \(expected.count)")
        let metrics = try brokerMetrics(broker)
        let deltas =
            metrics.split(separator: "\n").first { $0.hasPrefix("scim_broker_membership_deltas_total ") }
            .flatMap { Double($0.split(separator: " ").last!) } ?? 0
        XCTAssertGreaterThan(deltas, 0, "changes after the restart came as deltas: \(metrics)")
        // Protocol 3: a rename goes as the attributes alone, and the broker keeps the members it holds.
        let rename = #"{"schemas":\#(patchSchema),"Operations":[{"op":"replace","path":"displayName","value":"everyone"}]}"#
        XCTAssertEqual(try scim(dp, "PATCH", "/Groups/\(gid)", rename).0, 200)
        XCTAssertTrue(eventually(seconds: 30) { atBroker("everyone") == expected }, "renamed: \(atBroker("everyone")?.count ?? -1)")
        for c in children where c.process.isRunning { c.signal(SIGTERM); _ = c.waitForExit() }
        // And the agent agrees with it.
        let (_, agentGroup) = try { () throws -> (Int, JSON?) in
            let (_, p) = try startAgent("de", cert: de, domain: "acme-de", brokerPort: bp)
            return try scim(p, "GET", "/Groups/\(gid)")
        }()
        XCTAssertEqual(Set(agentGroup?["members"]?.arrayValue?.compactMap { $0["value"]?.stringValue } ?? []), expected)
    }
}
