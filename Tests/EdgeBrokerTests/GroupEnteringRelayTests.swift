import EdgeAgent
import EdgeBroker
import EdgeTestSupport
import Foundation
import SCIM
import XCTest

/// A local group entering the boundary over the real relay (an agent and a
/// broker, real processes, mutual TLS, LMDB files): a group of 2,500
/// members kept inside by the agent's policy is let out by a policy change
/// at a restart, and arrives at the broker with all its members, no relay
/// event naming more than 1,000 of them (the broker's heaviest apply) and
/// no agent commit writing more than a chunk, while the IdP changes the
/// group meanwhile.
final class GroupEnteringRelayTests: FederationTestCase {
    let n = 2_500

    func agent(_ extra: [String], brokerPort: Int) throws -> (ChildProcess, Int, Int) {
        let child = try ChildProcess(
            productsDirectory + "/scim-edge",
            [
                "serve", "--data-dir", dir.file("de"), "--listen", "127.0.0.1:0", "--token", "t", "--admin-listen", "127.0.0.1:0",
                "--broker", "https://127.0.0.1:\(brokerPort)", "--ca", ca, "--cert", de.0, "--key", de.1,
                "--domain", "acme-de", "--agent-name", "de",
            ] + extra)
        children.append(child)
        let port = try self.port(of: child, "scim-edge")
        let line = try XCTUnwrap(child.waitForLine("operations at"), "\(child.output)")
        let admin = try XCTUnwrap(Int(line.split(separator: ":").last!.split(separator: "/").first!))
        return (child, port, admin)
    }

    func metric(_ text: String, _ name: String) -> Double? {
        text.split(separator: "\n").first { $0.hasPrefix(name + " ") }.flatMap { Double($0.split(separator: " ").last!) }
    }

    func metrics(_ adminPort: Int) -> String {
        guard let c = try? RawClient(port: adminPort) else { return "" }
        c.send("GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        return c.readResponses(1).first?.body ?? ""
    }

    /// The broker's group "all staff", in agent ids (nil: it holds no such group).
    func atBroker() -> Set<String>? {
        guard let store = try? BrokerStore(path: dir.file("broker")), let all = try? store.resources(domain: "acme-de") else { return nil }
        var sourceOf: [String: String] = [:]
        for r in all {
            if let id = r["id"]?.stringValue, let source = r[BrokerStore.sourceExtension]?["id"]?.stringValue { sourceOf[id] = source }
        }
        guard let g = all.first(where: { $0["displayName"]?.stringValue == "all staff" }) else { return nil }
        return Set((g["members"]?.arrayValue ?? []).compactMap { $0["value"]?.stringValue.flatMap { sourceOf[$0] } })
    }

    func usersAtBroker() -> Int {
        guard let store = try? BrokerStore(path: dir.file("broker")), let all = try? store.resources(domain: "acme-de") else { return 0 }
        return all.filter { $0["userName"] != nil }.count
    }

    func testALocalGroupOf2500EnteringTheBoundaryArrivesWholeInBoundedEvents() throws {
        let (broker, bp) = try startBroker()
        let policy = dir.write(
            "inside.yaml",
            """
            dataDir: \(dir.file("de"))
            policy:
              scope:
                Group: displayName eq "nobody"
            """)
        var (first, dp, _) = try agent(["--config", policy], brokerPort: bp)
        var ids: [String] = []
        for start in stride(from: 0, to: n, by: 1000) {
            let ops = (start..<min(n, start + 1000)).map { k in
                #"{"method":"POST","path":"/Users","bulkId":"b\#(k)","data":{"schemas":["urn:ietf:params:scim:schemas:core:2.0:User"],"userName":"m\#(k)"}}"#
            }
            let (status, body) = try scim(
                dp, "POST", "/Bulk",
                #"{"schemas":["urn:ietf:params:scim:api:messages:2.0:BulkRequest"],"Operations":[\#(ops.joined(separator: ","))]}"#)
            XCTAssertEqual(status, 200)
            ids += try XCTUnwrap(body?["Operations"]?.arrayValue).compactMap {
                $0["location"]?.stringValue?.split(separator: "/").last.map(String.init)
            }
        }
        XCTAssertEqual(ids.count, n)
        let members = ids.map { #"{"value":"\#($0)"}"# }.joined(separator: ",")
        let (status, group) = try scim(
            dp, "POST", "/Groups",
            #"{"schemas":["urn:ietf:params:scim:schemas:core:2.0:Group"],"displayName":"all staff","members":[\#(members)]}"#)
        XCTAssertEqual(status, 201)
        let gid = try XCTUnwrap(group?["id"]?.stringValue)
        XCTAssertTrue(
            eventually(seconds: 30) { first.output.contains { $0.contains("the broker speaks relay protocol 3") } }, "\(first.output)")
        XCTAssertTrue(eventually(seconds: 60) { self.usersAtBroker() == self.n }, "users at the broker: \(usersAtBroker())")
        XCTAssertNil(atBroker(), "the group stays inside")
        first.signal(SIGTERM)
        XCTAssertNotNil(first.waitForExit(seconds: 30))

        // The policy that keeps it inside is gone: at the restart the group enters the boundary.
        var admin = 0
        (first, dp, admin) = try agent([], brokerPort: bp)
        // The IdP meanwhile: one member out, a new user in.
        let patchSchema = #"["urn:ietf:params:scim:api:messages:2.0:PatchOp"]"#
        let remove = #"{"schemas":\#(patchSchema),"Operations":[{"op":"remove","path":"members[value eq \"\#(ids[2400])\"]"}]}"#
        XCTAssertTrue([200, 204].contains(try scim(dp, "PATCH", "/Groups/\(gid)", remove).0))
        let (created, late) = try scim(
            dp, "POST", "/Users", #"{"schemas":["urn:ietf:params:scim:schemas:core:2.0:User"],"userName":"late"}"#)
        XCTAssertEqual(created, 201)
        let lateID = try XCTUnwrap(late?["id"]?.stringValue)
        let add = #"{"schemas":\#(patchSchema),"Operations":[{"op":"add","path":"members","value":[{"value":"\#(lateID)"}]}]}"#
        XCTAssertTrue([200, 204].contains(try scim(dp, "PATCH", "/Groups/\(gid)", add).0))
        var expected = Set(ids)
        expected.remove(ids[2400])
        expected.insert(lateID)
        XCTAssertTrue(
            eventually(seconds: 60) { self.atBroker() == expected }, "the broker has \(atBroker()?.count ?? -1) of \(expected.count)")

        let agentMetrics = metrics(admin)
        let heaviest = try XCTUnwrap(metric(agentMetrics, "scim_edge_store_commit_entries_max"), agentMetrics)
        XCTAssertLessThanOrEqual(heaviest, 2_100, "no agent commit writes more than a chunk (it wrote the 2,500 members at once)")
        XCTAssertGreaterThanOrEqual(
            metric(agentMetrics, "scim_edge_relay_entering_members_total") ?? 0, 1000, "members sent after the group: \(agentMetrics)")
        let brokerSide = try brokerMetrics(broker)
        let weight = try XCTUnwrap(metric(brokerSide, "scim_broker_store_commit_weight_max"), brokerSide)
        XCTAssertLessThanOrEqual(weight, 1_001, "no relay event names more than 1,000 members (one of 2,500 weighed 2,501)")
    }
}
