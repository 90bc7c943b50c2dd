import EdgeAgent
import EdgeTestSupport
import SCIM
import XCTest

/// A pull source's batches against the store, in process.
final class SourceStoreTests: XCTestCase {
    /// A group read again as it is (a poll's newest second, a full listing,
    /// a refresh replayed) is unchanged: no new version, nothing written.
    /// The stored group holds no members (they are an index), so they are
    /// compared with the index; a member really added is a change.
    func testAGroupReadAgainAsItIsIsUnchanged() throws {
        let dir = TempDirectory("source-store")
        defer { dir.remove() }
        let store = try AgentStore(path: dir.path, registry: .standard)
        var n = 0
        func apply(_ changes: [SourceChange]) throws -> SourceBatchResult {
            let contexts = (0...changes.count).map { _ -> WriteContext in
                n += 1
                return WriteContext(newID: "id-\(n)", now: "2026-12-02T00:00:00Z", epochSeconds: 0, eventID: "e\(n)", traceID: "t\(n)")
            }
            return try store.environment.write { txn in
                try store.applySource(
                    SourceBatch(source: "dir", mode: "poll", changes: changes), onDelete: .delete, contexts: contexts, profile: .lenient,
                    in: txn)
            }
        }
        func user(_ k: Int) -> SourceChange {
            .upsert(
                SourceEntry(
                    key: "u\(k)", reference: "uid=u\(k)", name: "uid=u\(k)", group: false,
                    body: ["schemas": ["urn:ietf:params:scim:schemas:core:2.0:User"], "userName": .string("u\(k)")]))
        }
        func group(_ members: [String]) -> SourceChange {
            .upsert(
                SourceEntry(
                    key: "g", reference: "cn=g", name: "cn=g", group: true,
                    body: ["schemas": ["urn:ietf:params:scim:schemas:core:2.0:Group"], "displayName": "staff"], members: members))
        }
        XCTAssertEqual(try apply([user(1), user(2), user(3), group(["uid=u1", "uid=u2"])]).written, 4)
        let groups = store.registry.resourceType("Group")!
        func version() throws -> String? {
            // The fourth change of the first batch: created under its context's id.
            try store.get(groups, "id-4")?["meta"]?["version"]?.stringValue
        }
        let before = try XCTUnwrap(try version())
        let again = try apply([group(["uid=u2", "uid=u1"])])
        XCTAssertEqual(again.written, 0, "the same members, in another order")
        XCTAssertEqual(again.unchanged, 1)
        XCTAssertEqual(try version(), before, "no new version")
        let grown = try apply([group(["uid=u1", "uid=u2", "uid=u3"])])
        XCTAssertEqual(grown.written, 1, "a member added is a change")
        XCTAssertNotEqual(try version(), before)
    }
}
