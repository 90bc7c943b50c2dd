import EdgeLoop
import EdgeTestSupport
import SCIM
import XCTest

@testable import EdgeDelivery

/// The body a target receives and the PATCH that brings it up to date.
final class TargetMappingTests: XCTestCase {
    let user: JSONObject = [
        "schemas": ["urn:ietf:params:scim:schemas:core:2.0:User", .string(sourceExtensionSchema)],
        "id": "broker-1", "userName": "ana", "title": "Engineer", "nickName": "an",
        "name": ["givenName": "Ana", "familyName": "Lima"],
        "phoneNumbers": [["value": "+1 555", "type": "work"]],
        "meta": ["resourceType": "User"], .init(sourceExtensionSchema): ["domain": "acme-de"],
    ]

    func testTargetBodyDropsBrokerFieldsSetsExternalIdAndAppliesTheMapping() {
        var mapping = AttributeMapping()
        mapping.rename = [("title", "jobTitle"), ("name.givenName", "name.formatted")]
        mapping.drop = ["phoneNumbers"]
        mapping.constant = [("userType", "Federated"), ("name.honorificPrefix", "Dr")]
        let body = targetBody(user, brokerID: "broker-1", mapping: mapping)
        XCTAssertNil(body["id"])
        XCTAssertNil(body["meta"])
        XCTAssertNil(body[sourceExtensionSchema])
        XCTAssertEqual(body["schemas"], ["urn:ietf:params:scim:schemas:core:2.0:User"])
        XCTAssertEqual(body["externalId"], "broker-1", "the broker is the target's provisioning client")
        XCTAssertNil(body["title"])
        XCTAssertEqual(body["jobTitle"], "Engineer")
        XCTAssertNil(body["phoneNumbers"])
        XCTAssertEqual(body["userType"], "Federated")
        XCTAssertEqual(body["name"], ["familyName": "Lima", "formatted": "Ana", "honorificPrefix": "Dr"])
    }

    func testPatchOperationsReplaceAddAndRemove() {
        let old: JSONObject = ["schemas": ["u"], "userName": "ana", "title": "Engineer", "nickName": "an", "active": true]
        let new: JSONObject = ["schemas": ["u"], "userName": "ana", "title": "Manager", "active": true, "locale": "pt-BR"]
        let ops = patchOperations(from: old, to: new)
        XCTAssertEqual(
            ops,
            [
                ["op": "replace", "path": "title", "value": "Manager"],
                ["op": "replace", "path": "locale", "value": "pt-BR"],
                ["op": "remove", "path": "nickName"],
            ])
        XCTAssertEqual(patchOperations(from: new, to: new), [], "nothing changed: nothing to send")
    }

    /// A replace of a complex attribute leaves the sub-attributes it does not
    /// name (RFC 7644 §3.5.2.3): those dropped are removed by path.
    func testPatchRemovesSubAttributesDroppedFromAComplexValue() {
        let ext = "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User"
        let old: JSONObject = ["name": ["givenName": "Ana", "middleName": "M"], ext: ["employeeNumber": "1", "department": "d"]]
        let new: JSONObject = ["name": ["givenName": "Ana"], ext: ["employeeNumber": "1"]]
        XCTAssertEqual(
            patchOperations(from: old, to: new),
            [
                ["op": "replace", "path": "name", "value": ["givenName": "Ana"]],
                ["op": "remove", "path": "name.middleName"],
                ["op": "replace", "path": .string(ext), "value": ["employeeNumber": "1"]],
                ["op": "remove", "path": .string(ext + ":department")],
            ])
    }

    func testGroupMembersAreAddedAndRemovedByValue() {
        let old: JSONObject = ["displayName": "g", "members": [["value": "a"], ["value": "b"]]]
        let new: JSONObject = ["displayName": "g", "members": [["value": "b"], ["value": "c"]]]
        XCTAssertEqual(
            patchOperations(from: old, to: new),
            [
                ["op": "add", "path": "members", "value": [["value": "c"]]],
                ["op": "remove", "path": "members[value eq \"a\"]"],
            ])
    }

    func testTargetURLs() throws {
        let t = try TargetConfiguration(name: "app", url: "http://localhost:8080/scim/v2/")
        XCTAssertEqual(t.resolveAddress()?.host, "127.0.0.1")
        XCTAssertEqual(t.port, 8080)
        XCTAssertEqual(t.basePath, "/scim/v2")
        XCTAssertFalse(t.useTLS)
        let s = try TargetConfiguration(name: "saas", url: "https://[::1]/tenant/42/scim")
        XCTAssertEqual(s.port, 443)
        XCTAssertEqual(s.resolveAddress()?.host, "::1")
        XCTAssertEqual(s.basePath, "/tenant/42/scim")
        XCTAssertThrowsError(try TargetConfiguration(name: "x", url: "http://:80"))
        XCTAssertThrowsError(try TargetConfiguration(name: "x", url: "http://h:0"))
        XCTAssertNil(
            try TargetConfiguration(name: "x", url: "http://no-such-host.invalid:80").resolveAddress(),
            "names resolve when the worker connects, not when the config is read")
    }

    func testReconcileComparesWhatTheBrokerSends() {
        XCTAssertTrue(sameValue(["givenName": "Ana"], ["givenName": "Ana", "formatted": "Ana Lima"]), "targets may add")
        XCTAssertFalse(sameValue(["givenName": "Ana"], ["givenName": "Anna"]))
        XCTAssertTrue(sameValue([["value": "a", "type": "work"]], [["value": "a", "type": "work", "primary": false]]))
        XCTAssertFalse(sameValue([["value": "a"]], []))
        XCTAssertTrue(sameValue(.array([]), nil), "an empty list and an absent attribute are the same")
        XCTAssertFalse(sameValue("x", nil))
    }

}

/// The trail stays bounded: hops past the retention go, with their trace index.
