import EdgeAgent
import EdgeStore
import EdgeTestSupport
import SCIM
import XCTest

/// An event whose keys LMDB cannot hold (over 511 bytes: a long broker id,
/// a userName that the inbound template makes longer) used to abort the
/// whole answer: the feed then stopped at it, every later event waiting
/// behind it, re-fetched forever. It is refused alone now, as a value the
/// boundary cannot store (`invalidValue`), and the others are applied.
extension InboundTests {
    func testAnEventTooLargeForTheStoresKeysIsRefusedAloneAndTheFeedGoesOn() throws {
        let dir = TempDirectory("inbound-keys")
        defer { dir.remove() }
        let store = try AgentStore(path: dir.path, registry: .standard)
        let policy = InboundPolicy(accept: [try InboundPolicy.Rule(domains: ["hq"])], userNameTemplate: "{userName}@{domain}")
        let ctx = WriteContext(newID: "local-1", now: "2026-12-01T00:00:00Z", epochSeconds: 0, eventID: "e", traceID: "t")
        let create = "urn:ietf:params:SCIM:event:prov:create:full"
        let long = String(repeating: "n", count: 509)  // 512 bytes with "@hq", as the template maps it
        let outcome = try store.environment.write { txn in
            try store.applyDownlink(
                [
                    event(1, create, "b1", data: user(long)), event(2, create, String(repeating: "i", count: 600), data: user("bo")),
                    event(3, create, "b3", data: user("carol")),
                ], policy: policy, ctx, in: txn)
        }
        XCTAssertEqual(outcome.appliedThrough, 3, "the feed goes past them")
        XCTAssertEqual(outcome.refused.keys.sorted(), [1, 2])
        XCTAssertEqual(outcome.report?.refused, [1: "invalidValue", 2: "invalidValue"])
        XCTAssertEqual(outcome.applied, 1)
        let users = store.registry.resourceType("User")!
        XCTAssertEqual(try store.get(users, "b3")?["userName"], "carol@hq")
        XCTAssertNil(try store.get(users, "b1"), "nothing of a refused event is kept")
        XCTAssertEqual(try store.foreignCounts(), ["hq": 1])
    }
}
