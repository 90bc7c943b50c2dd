import EdgeLoop
import EdgeStore
import EdgeTestSupport
import SCIM
import XCTest

@testable import EdgeBroker
@testable import EdgeDelivery

/// The store's side of `collisions: link`: the link index across policy
/// changes, whose a shared account is, and what a dead letter's retry queues.
final class LinkStoreTests: XCTestCase {
    let enterprise = "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User"

    func target(link: Bool, name: String = "app") throws -> TargetConfiguration {
        var t = try TargetConfiguration(name: name, url: "http://127.0.0.1:9/scim/v2")
        t.routes = [try Route()]
        if link { t.collisions = .link(try LinkPolicy(attribute: "employeeNumber", sourceOfRecord: ["acme-de", "acme-us"])) }
        return t
    }

    /// Writes a federated user as the apply would (resource and broker id), without queuing anything.
    func putUser(_ store: BrokerStore, domain: String, sourceID: String, brokerID: String, employeeNumber: String) throws {
        let user: JSONObject = [
            "schemas": ["urn:ietf:params:scim:schemas:core:2.0:User", .string(enterprise), .string(BrokerStore.sourceExtension)],
            "id": .string(brokerID), "userName": .string(sourceID), .init(enterprise): ["employeeNumber": .string(employeeNumber)],
            .init(BrokerStore.sourceExtension): ["domain": .string(domain)],
        ]
        let key = Array("\(domain)/User/\(sourceID)".utf8)
        try store.environment.write { txn in
            try txn.put(store.resources, key, JSON.object(user).serialized())
            try txn.put(store.brokerIds, Array(brokerID.utf8), key)
        }
    }

    /// #4: link off, then on again: the index is built again, with the users
    /// created while the target ran without link (the apply kept no index then).
    func testLinkTurnedOffAndOnAgainRebuildsTheIndex() throws {
        let dir = TempDirectory("edge-link-index")
        defer { dir.remove() }
        let store = try BrokerStore(path: dir.path)
        try putUser(store, domain: "acme-de", sourceID: "bob", brokerID: "b-de", employeeNumber: "E-1")
        XCTAssertTrue(try store.rebuildLinkIndexIfNeeded(target(link: true)))
        XCTAssertFalse(try store.rebuildLinkIndexIfNeeded(target(link: true)), "unchanged: not rebuilt")
        XCTAssertEqual(try store.linkMembers(target: "app", value: "e-1"), ["b-de"])
        // Without link: no index kept.
        XCTAssertFalse(try store.rebuildLinkIndexIfNeeded(target(link: false)))
        XCTAssertEqual(try store.linkMembers(target: "app", value: "e-1"), [], "the index goes with link")
        try putUser(store, domain: "acme-us", sourceID: "bob", brokerID: "b-us", employeeNumber: "e-1")
        // Link again: rebuilt from the directory, with the user created meanwhile.
        XCTAssertTrue(try store.rebuildLinkIndexIfNeeded(target(link: true)), "turned on again: rebuilt")
        XCTAssertEqual(try store.linkMembers(target: "app", value: "e-1"), ["b-de", "b-us"])
        XCTAssertEqual(try store.linkedAccounts(target: "app"), 1)
    }

    /// #5: the reverse index of a shared account follows the users that
    /// still share it: dropping or changing the mapping of the broker id it
    /// names hands the account to another linked user's mapping.
    func testASharedAccountStaysOwnedWhileALinkedMappingNamesIt() throws {
        let dir = TempDirectory("edge-link-owner")
        defer { dir.remove() }
        let store = try BrokerStore(path: dir.path)
        let shared = TargetMapping(targetID: "acct-1", etag: nil, sent: nil, link: "e-1")
        try store.environment.write { txn in
            for id in ["b-de", "b-us", "b-fr"] { try store.addLink(target: "app", value: "e-1", brokerID: id, txn) }
            for id in ["b-de", "b-us", "b-fr"] { try store.setMapping(target: "app", type: "User", brokerID: id, shared, txn) }
        }
        XCTAssertEqual(try store.accountOwner(target: "app", type: "User", targetID: "acct-1"), "b-fr")
        // b-fr deleted (the apply removed its link first): the account is still the others'.
        try store.environment.write { txn in
            _ = try store.removeLink(target: "app", value: "e-1", brokerID: "b-fr", txn)
            try store.setMapping(target: "app", type: "User", brokerID: "b-fr", nil, txn)
        }
        let afterDelete = try store.accountOwner(target: "app", type: "User", targetID: "acct-1")
        XCTAssertNotNil(afterDelete, "another linked mapping names the account")
        XCTAssertTrue(["b-de", "b-us"].contains(afterDelete ?? ""), "\(afterDelete ?? "nil")")
        // The owner leaves the link for an account of its own: the last one sharing it owns it.
        let leaving = try XCTUnwrap(afterDelete), staying = leaving == "b-de" ? "b-us" : "b-de"
        try store.environment.write { txn in
            _ = try store.removeLink(target: "app", value: "e-1", brokerID: leaving, txn)
            try store.setMapping(
                target: "app", type: "User", brokerID: leaving, TargetMapping(targetID: "acct-2", etag: nil, sent: nil), txn)
        }
        XCTAssertEqual(try store.accountOwner(target: "app", type: "User", targetID: "acct-1"), staying)
        XCTAssertEqual(try store.accountOwner(target: "app", type: "User", targetID: "acct-2"), leaving)
        // The last one gone: nobody's.
        try store.environment.write { txn in
            _ = try store.removeLink(target: "app", value: "e-1", brokerID: staying, txn)
            try store.setMapping(target: "app", type: "User", brokerID: staying, nil, txn)
        }
        XCTAssertNil(try store.accountOwner(target: "app", type: "User", targetID: "acct-1"))
    }

    /// #6: a dead letter keeps the item's `account` and `link`, and a retry
    /// queues them again; a letter without them (and reconciliation's
    /// items) get the user's current link value.
    func testRetriedDeadLettersAndReconcileItemsKeepAccountAndLink() throws {
        let dir = TempDirectory("edge-link-dead")
        defer { dir.remove() }
        let store = try BrokerStore(path: dir.path, targets: [target(link: true)])
        try putUser(store, domain: "acme-de", sourceID: "bob", brokerID: "b-de", employeeNumber: "E-1")
        func letter(_ extra: JSONObject) -> JSONObject {
            var o: JSONObject = ["id": "b-de", "type": "User", "op": "deactivate", "trace": "t", "status": 400]
            for (k, v) in extra { o[k] = v }
            return o
        }
        try store.environment.write { txn in
            try store.completeDelivery(
                target: "app", keys: [], brokerID: "b-de", type: "User", mapping: .none,
                deadLetter: letter(["account": "acct-9", "link": "e-1"]), hop: nil, trace: "t", txn)
            try store.completeDelivery(
                target: "app", keys: [], brokerID: "b-de", type: "User", mapping: .none,
                deadLetter: letter(["op": "upsert"]), hop: nil, trace: "t", txn)
        }
        XCTAssertEqual(try store.settleDeadLetters(target: "app", seq: nil, requeue: true), 2)
        let items = try store.queued(target: "app", after: nil, limit: 10).map(\.item)
        XCTAssertEqual(items.count, 2)
        XCTAssertEqual(items.first?.operation, .deactivate)
        XCTAssertEqual(items.first?.account, "acct-9", "the stray's account, not the user's mapping")
        XCTAssertEqual(items.first?.link, "e-1")
        XCTAssertEqual(items.last?.link, "e-1", "an older letter: the user's link value now")
        XCTAssertNil(items.last?.account)

        try store.enqueue(target: "app", brokerID: "b-de", type: "User", .upsert)
        XCTAssertEqual(try store.queued(target: "app", after: nil, limit: 10).last?.item.link, "e-1", "reconciliation's item")
    }

    /// #11: only the domains in `sourceOfRecord` link.
    func testOnlySourceOfRecordDomainsLink() throws {
        let policy = try LinkPolicy(attribute: "employeeNumber", sourceOfRecord: ["acme-de"])
        let user: JSONObject = [.init(enterprise): ["employeeNumber": "E-1"]]
        XCTAssertEqual(policy.value(of: user, domain: "acme-de"), "e-1")
        XCTAssertNil(policy.value(of: user, domain: "acme-us"))
        let dir = TempDirectory("edge-link-sor")
        defer { dir.remove() }
        let store = try BrokerStore(path: dir.path)
        try putUser(store, domain: "acme-de", sourceID: "bob", brokerID: "b-de", employeeNumber: "E-1")
        try putUser(store, domain: "acme-us", sourceID: "bob", brokerID: "b-us", employeeNumber: "E-1")
        var t = try target(link: true)
        t.collisions = .link(policy)
        XCTAssertTrue(try store.rebuildLinkIndexIfNeeded(t))
        XCTAssertEqual(try store.linkMembers(target: "app", value: "e-1"), ["b-de"], "acme-us is not a source of record")
    }
}
