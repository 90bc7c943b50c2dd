import SCIM
import XCTest

/// RFC 7644 §3.5.2: add / remove / replace, paths, atomicity, the Entra profile.
final class PatchTests: XCTestCase {
    let group: JSONObject = try! ResourceValidator(registry: registry, type: groupType).validateCreate(
        json(
            #"""
              {"schemas":["urn:ietf:params:scim:schemas:core:2.0:Group"],"displayName":"Tour Guides",
               "members":[{"value":"2819c223","type":"User","$ref":"https://example.com/v2/Users/2819c223"},
                          {"value":"902c246b","type":"User"}]}
            """#))

    lazy var user: JSONObject = try! userValidator.validateCreate(json(fullUser))

    func patch(
        _ resource: JSONObject, _ ops: String, type: ResourceType = userType,
        profile: ClientProfile = .lenient
    ) throws -> JSONObject {
        let body = json(#"{"schemas":["urn:ietf:params:scim:api:messages:2.0:PatchOp"],"Operations":"# + ops + "}")
        return try PatchRequest(body, registry: registry, type: type, profile: profile).apply(to: resource)
    }

    func fails(
        _ resource: JSONObject, _ ops: String, _ type: SCIMType, _ fragment: String, rt: ResourceType = userType,
        profile: ClientProfile = .lenient, file: StaticString = #filePath, line: UInt = #line
    ) {
        XCTAssertThrowsError(try patch(resource, ops, type: rt, profile: profile), file: file, line: line) { error in
            let e = error as! SCIMError
            XCTAssertEqual(e.status, 400, file: file, line: line)
            XCTAssertEqual(e.scimType, type, "\(e)", file: file, line: line)
            XCTAssertTrue(e.detail.contains(fragment), "'\(e.detail)' should contain '\(fragment)'", file: file, line: line)
        }
    }

    func members(_ g: JSONObject) -> [String] { g["members"]?.arrayValue?.compactMap { $0["value"]?.stringValue } ?? [] }

    // MARK: RFC 7644 §3.5.2.1 add

    func testAddMembersAppendsNewAndUpdatesKnownValues() throws {
        let out = try patch(
            group,
            #"[{"op":"add","path":"members","value":[{"display":"Babs","$ref":"https://example.com/v2/Users/x","value":"2819c223","type":"User"},{"value":"new-1","type":"User"}]}]"#,
            type: groupType)
        XCTAssertEqual(members(out), ["2819c223", "902c246b", "new-1"], "a known member is not added twice")
        let first = out["members"]?.arrayValue?.first
        XCTAssertEqual(first?["$ref"], "https://example.com/v2/Users/x", "it is updated instead")
        XCTAssertNil(first?["display"], "display is read-only: ignored on input")
    }

    func testAddWithoutPathMergesAttributes() throws {
        let out = try patch(
            user,
            #"[{"op":"add","value":{"emails":[{"value":"babs@jensen.org","type":"home"},{"value":"b@new.org","type":"other"}],"nickName":"Babsy","name":{"givenName":"Barb"}}}]"#
        )
        XCTAssertEqual(out["emails"]?.arrayValue?.count, 3, "duplicate email not added twice")
        XCTAssertEqual(out["nickName"], "Babsy")
        XCTAssertEqual(out["name"]?["givenName"], "Barb")
        XCTAssertEqual(out["name"]?["familyName"], "Jensen", "other sub-attributes unchanged")
    }

    func testAddPrimaryEmailClearsTheOtherPrimary() throws {
        let out = try patch(user, #"[{"op":"add","path":"emails","value":[{"value":"new@example.com","type":"work","primary":true}]}]"#)
        let primaries = out["emails"]?.arrayValue?.filter { $0["primary"] == true }.compactMap { $0["value"]?.stringValue }
        XCTAssertEqual(primaries, ["new@example.com"])
    }

    func testAddToExtensionByURNPath() throws {
        var plain = user
        plain[SchemaURN.enterpriseUser] = nil
        plain["schemas"] = [.string(SchemaURN.user)]
        let out = try patch(
            plain, #"[{"op":"add","path":"urn:ietf:params:scim:schemas:extension:enterprise:2.0:User:department","value":"Ops"}]"#)
        XCTAssertEqual(out[SchemaURN.enterpriseUser]?["department"], "Ops")
        XCTAssertEqual(out["schemas"]?.arrayValue?.count, 2, "the extension joins 'schemas'")
    }

    // MARK: §3.5.2.2 remove

    func testRemoveMemberByValueFilter() throws {
        let out = try patch(group, #"[{"op":"remove","path":"members[value eq \"2819c223\"]"}]"#, type: groupType)
        XCTAssertEqual(members(out), ["902c246b"])
    }

    func testRemoveAllMembersAndSingleAttributes() throws {
        let out = try patch(group, #"[{"op":"remove","path":"members"}]"#, type: groupType)
        XCTAssertNil(out["members"])
        let u = try patch(
            user,
            #"[{"op":"remove","path":"name.middleName"},{"op":"remove","path":"nickName"},{"op":"remove","path":"emails[type eq \"home\"]"}]"#
        )
        XCTAssertNil(u["name"]?["middleName"])
        XCTAssertNil(u["nickName"])
        XCTAssertEqual(u["emails"]?.arrayValue?.count, 1)
    }

    func testRemoveSubAttributeThroughAFilter() throws {
        let u = try patch(user, #"[{"op":"remove","path":"emails[type eq \"work\"].primary"}]"#)
        XCTAssertNil(u["emails"]?.arrayValue?.first?["primary"])
    }

    // MARK: §3.5.2.3 replace

    func testReplaceMembersAndFilteredSubAttribute() throws {
        let g = try patch(group, #"[{"op":"replace","path":"members","value":[{"value":"only-1","type":"User"}]}]"#, type: groupType)
        XCTAssertEqual(members(g), ["only-1"])
        let u = try patch(
            user,
            #"[{"op":"replace","path":"emails[type eq \"work\"].value","value":"barbara@example.com"},{"op":"replace","path":"addresses[type eq \"work\"]","value":{"streetAddress":"911 Universal City Plaza"}}]"#
        )
        XCTAssertEqual(u["emails"]?.arrayValue?.first?["value"], "barbara@example.com")
        XCTAssertEqual(u["addresses"]?.arrayValue?.first?["streetAddress"], "911 Universal City Plaza")
        XCTAssertEqual(u["addresses"]?.arrayValue?.first?["locality"], "Hollywood", "lenient profile merges")
    }

    func testReplaceWithoutPath() throws {
        let u = try patch(
            user, #"[{"op":"replace","value":{"displayName":"Barbara J.","active":false,"name":{"familyName":"Jensen-Smith"}}}]"#)
        XCTAssertEqual(u["displayName"], "Barbara J.")
        XCTAssertEqual(u["active"], false)
        XCTAssertEqual(u["name"]?["familyName"], "Jensen-Smith")
        XCTAssertEqual(u["name"]?["givenName"], "Barbara", "sub-attributes not given are left unchanged")
    }

    // MARK: errors and atomicity

    func testErrorsNameTheOperation() {
        fails(user, #"[{"op":"add","path":"nickName","value":"x"},{"op":"remove"}]"#, .noTarget, "Operations[1]: 'remove' needs a 'path'")
        fails(user, #"[{"op":"move","path":"nickName"}]"#, .invalidSyntax, "Operations[0]: 'op' must be add, remove or replace")
        fails(user, #"[{"op":"add","path":"favouriteColour","value":"x"}]"#, .invalidPath, "does not name an attribute")
        fails(user, #"[{"op":"replace","path":"id","value":"x"}]"#, .mutability, "'id' is read-only")
        fails(user, #"[{"op":"replace","path":"groups","value":[]}]"#, .mutability, "read-only")
        fails(user, #"[{"op":"add","path":"nickName"}]"#, .invalidValue, "needs a 'value'")
        fails(user, #"[{"op":"add","value":"x"}]"#, .invalidValue, "needs an object of attributes")
        fails(user, #"[{"op":"remove","path":"emails[type eq \"pager\"]"}]"#, .noTarget, "matches no value", profile: .strict)
        fails(
            user, #"[{"op":"replace","path":"emails[type eq \"pager\"].value","value":"x"}]"#, .noTarget, "matches no value",
            profile: .strict)
        fails(user, #"[{"op":"add","path":"emails[type eq ]","value":"x"}]"#, .invalidFilter, "expected a comparison value")
        fails(
            user, #"[{"op":"replace","path":"active","value":"perhaps"}]"#, .invalidValue,
            "after applying the operations: 'active' must be a boolean")
        fails(user, #"[{"op":"remove","path":"userName"}]"#, .invalidValue, "'userName' is required")
        fails(
            group, #"[{"op":"add","path":"members","value":[{"value":"x","type":"Printer"}]}]"#, .invalidValue,
            "must be one of User, Group", rt: groupType)
        fails(
            user, #"[{"op":"add","path":"emails","value":[{"value":"a@x","primary":true},{"value":"b@x","primary":true}]}]"#,
            .invalidValue, "at most one is allowed")
    }

    func testAtomicity() throws {
        let before = user
        XCTAssertThrowsError(
            try patch(user, #"[{"op":"replace","path":"nickName","value":"changed"},{"op":"replace","path":"active","value":3}]"#))
        XCTAssertEqual(user, before, "a failing operation changes nothing (the input is a value)")
        let body = json(#"{"schemas":["urn:ietf:params:scim:api:messages:2.0:PatchOp"],"Operations":[]}"#)
        XCTAssertThrowsError(try PatchRequest(body, registry: registry, type: userType))
        XCTAssertThrowsError(
            try PatchRequest(
                json(#"{"Operations":[{"op":"add","path":"nickName","value":"x"}]}"#),
                registry: registry, type: userType), "PatchOp schema is required")
    }

    // MARK: Microsoft Entra ID forms (profile on by default)

    func testEntraForms() throws {
        // Capitalised op names and "True"/"False" strings.
        var u = try patch(user, #"[{"op":"Replace","path":"active","value":"False"},{"op":"Add","path":"title","value":"Lead"}]"#)
        XCTAssertEqual(u["active"], false)
        XCTAssertEqual(u["title"], "Lead")
        // Path-less replace with dotted keys.
        u = try patch(user, #"[{"op":"Replace","value":{"name.givenName":"Babs","name.familyName":"J","active":"True"}}]"#)
        XCTAssertEqual(u["name"]?["givenName"], "Babs")
        XCTAssertEqual(u["name"]?["familyName"], "J")
        XCTAssertEqual(u["active"], true)
        // manager as a plain string.
        u = try patch(
            user, #"[{"op":"Replace","path":"urn:ietf:params:scim:schemas:extension:enterprise:2.0:User:manager","value":"m-42"}]"#)
        XCTAssertEqual(u[SchemaURN.enterpriseUser]?["manager"], ["value": "m-42"])
        // Members removed with a value array.
        let g = try patch(group, #"[{"op":"Remove","path":"members","value":[{"value":"2819c223"}]}]"#, type: groupType)
        XCTAssertEqual(members(g), ["902c246b"])
        // Add through a filter that matches nothing creates the element.
        u = try patch(user, #"[{"op":"Add","path":"phoneNumbers[type eq \"fax\"].value","value":"555-1234"}]"#)
        XCTAssertTrue(u["phoneNumbers"]?.arrayValue?.contains(["type": "fax", "value": "555-1234"]) ?? false)
        // The strict profile refuses each form.
        fails(user, #"[{"op":"Replace","path":"active","value":false}]"#, .invalidSyntax, "'op' must be", profile: .strict)
        fails(user, #"[{"op":"replace","value":{"name.givenName":"Babs"}}]"#, .invalidPath, "not paths", profile: .strict)
        fails(user, #"[{"op":"replace","path":"active","value":"False"}]"#, .invalidValue, "must be a boolean", profile: .strict)
        fails(
            group, #"[{"op":"remove","path":"members","value":[{"value":"2819c223"}]}]"#, .invalidSyntax, "takes no 'value'",
            rt: groupType, profile: .strict)
    }
}
