import SCIM
import XCTest

let registry = SchemaRegistry.standard
let userType = registry.resourceType("User")!
let groupType = registry.resourceType("Group")!
let userValidator = ResourceValidator(registry: registry, type: userType)
let strictValidator = ResourceValidator(registry: registry, type: userType, profile: .strict)

func json(_ s: String) -> JSON { try! JSONParser.parse(s) }

/// A full enterprise user in the style of RFC 7643 §8.3.
let fullUser = """
    {
      "schemas": ["urn:ietf:params:scim:schemas:core:2.0:User",
                  "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User"],
      "id": "ignored-on-input", "externalId": "701984", "userName": "bjensen@example.com",
      "name": {"formatted": "Ms. Barbara J Jensen, III", "familyName": "Jensen", "givenName": "Barbara",
               "middleName": "Jane", "honorificPrefix": "Ms.", "honorificSuffix": "III"},
      "displayName": "Babs Jensen", "nickName": "Babs", "profileUrl": "https://login.example.com/bjensen",
      "emails": [{"value": "bjensen@example.com", "type": "work", "primary": true},
                 {"value": "babs@jensen.org", "type": "home"}],
      "addresses": [{"type": "work", "streetAddress": "100 Universal City Plaza", "locality": "Hollywood",
                     "region": "CA", "postalCode": "91608", "country": "USA", "primary": true}],
      "phoneNumbers": [{"value": "555-555-5555", "type": "work"}, {"value": "555-555-4444", "type": "mobile"}],
      "ims": [{"value": "someaimhandle", "type": "aim"}],
      "photos": [{"value": "https://photos.example.com/profilephoto/72930000000Ccne/F", "type": "photo"}],
      "userType": "Employee", "title": "Tour Guide", "preferredLanguage": "en-US", "locale": "en-US",
      "timezone": "America/Los_Angeles", "active": true, "password": "t1meMa$heen",
      "groups": [{"value": "e9e30dba-f08f-4109-8486-d5c6a331660a", "display": "Tour Guides"}],
      "x509Certificates": [{"value": "MIIDQzCCAqygAwIBAgICEAAwDQYJKoZIhvcNAQEFBQAwTjELMAkGA1UEBhMCVVMx"}],
      "meta": {"resourceType": "User", "version": "W/\\"3694e05e9dff591\\""},
      "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User": {
        "employeeNumber": "701984", "costCenter": "4130", "organization": "Universal Studios",
        "division": "Theme Park", "department": "Tour Operations",
        "manager": {"value": "26118915-6090-4610-87e4-49d8ca9f808d", "$ref": "../Users/26118915-6090-4610-87e4-49d8ca9f808d",
                    "displayName": "John Smith"}
      }
    }
    """

final class ValidationTests: XCTestCase {
    func invalid(
        _ body: String, _ type: SCIMType, _ fragment: String, validator: ResourceValidator = userValidator,
        file: StaticString = #filePath, line: UInt = #line
    ) {
        XCTAssertThrowsError(try validator.validateCreate(json(body)), file: file, line: line) { error in
            let e = error as! SCIMError
            XCTAssertEqual(e.status, 400, file: file, line: line)
            XCTAssertEqual(e.scimType, type, "\(e)", file: file, line: line)
            XCTAssertTrue(e.detail.contains(fragment), "'\(e.detail)' should contain '\(fragment)'", file: file, line: line)
        }
    }

    func testFullEnterpriseUserIsAcceptedAndNormalised() throws {
        let out = try userValidator.validateCreate(json(fullUser))
        XCTAssertNil(out["id"], "id is readOnly: ignored on input")
        XCTAssertNil(out["meta"], "meta is readOnly")
        XCTAssertNil(out["groups"], "groups is readOnly on User")
        XCTAssertEqual(out["password"], "t1meMa$heen", "writeOnly is stored (never returned)")
        let ext = try XCTUnwrap(out[SchemaURN.enterpriseUser]?.objectValue)
        XCTAssertNil(ext["manager"]?["displayName"], "manager.displayName is readOnly")
        XCTAssertEqual(ext["manager"]?["value"], "26118915-6090-4610-87e4-49d8ca9f808d")
        XCTAssertEqual(out["schemas"], [.string(SchemaURN.user), .string(SchemaURN.enterpriseUser)])
    }

    func testAttributeNamesAreCaseInsensitiveAndNormalised() throws {
        let out = try userValidator.validateCreate(
            json(
                #"""
                {"SCHEMAS":["URN:IETF:PARAMS:SCIM:SCHEMAS:CORE:2.0:USER"],"USERNAME":"a","NAME":{"GIVENNAME":"x"},
                 "Emails":[{"VALUE":"a@x.org","Type":"work"}]}
                """#))
        XCTAssertEqual(out.keys, ["schemas", "userName", "name", "emails"])
        XCTAssertEqual(out["name"]?.objectValue?.keys, ["givenName"])
        XCTAssertEqual(out["emails"]?.arrayValue?.first?.objectValue?.keys, ["value", "type"])
    }

    func testSchemasRules() {
        invalid(#"{"userName":"a"}"#, .invalidValue, "'schemas' is required")
        invalid(#"{"schemas":[],"userName":"a"}"#, .invalidValue, "non-empty array")
        invalid(
            #"{"schemas":["urn:ietf:params:scim:schemas:core:2.0:Group"],"userName":"a"}"#, .invalidValue,
            "not a schema of resource type User")
        invalid(
            #"{"schemas":["urn:ietf:params:scim:schemas:extension:enterprise:2.0:User"],"userName":"a"}"#,
            .invalidValue, "must include the core schema")
        invalid(
            #"{"schemas":["urn:ietf:params:scim:schemas:core:2.0:User"],"userName":"a","urn:ietf:params:scim:schemas:extension:enterprise:2.0:User":{"department":"x"}}"#,
            .invalidValue, "used but not listed in 'schemas'")
        invalid(
            #"{"schemas":["urn:ietf:params:scim:schemas:core:2.0:User"],"userName":"a","urn:example:custom":{"x":1}}"#,
            .invalidSyntax, "unknown schema extension 'urn:example:custom'")
    }

    func testUnknownAndRequiredAttributes() {
        invalid(
            #"{"schemas":["urn:ietf:params:scim:schemas:core:2.0:User"],"userName":"a","favouriteColour":"blue"}"#,
            .invalidSyntax, "unknown attribute 'favouriteColour'")
        invalid(
            #"{"schemas":["urn:ietf:params:scim:schemas:core:2.0:User"],"userName":"a","name":{"nick":"x"}}"#,
            .invalidSyntax, "unknown sub-attribute 'nick' of 'name'")
        invalid(
            #"{"schemas":["urn:ietf:params:scim:schemas:core:2.0:User"],"displayName":"x"}"#,
            .invalidValue, "attribute 'userName' is required")
        invalid(
            #"{"schemas":["urn:ietf:params:scim:schemas:core:2.0:User"],"userName":null}"#,
            .invalidValue, "attribute 'userName' is required")
        invalid(
            #"{"schemas":["urn:ietf:params:scim:schemas:core:2.0:Group"],"members":[]}"#,
            .invalidValue, "attribute 'displayName' is required",
            validator: ResourceValidator(registry: registry, type: groupType))
    }

    func testTypes() {
        let base = #"{"schemas":["urn:ietf:params:scim:schemas:core:2.0:User"],"userName":"a","#
        invalid(base + #""active":"yes"}"#, .invalidValue, "'active' must be a boolean, got string")
        invalid(base + #""displayName":42}"#, .invalidValue, "'displayName' must be a string, got integer")
        invalid(base + #""name":"Barbara"}"#, .invalidValue, "'name' must be a complex, got string")
        invalid(base + #""emails":{"value":"a@b"}}"#, .invalidValue, "'emails' is multi-valued: expected an array")
        invalid(base + #""emails":[{"value":"a@b"},null]}"#, .invalidValue, "'emails[1]' is null")
        invalid(base + #""emails":[{"value":7}]}"#, .invalidValue, "'emails[0].value' must be a string")
        invalid(base + #""x509Certificates":[{"value":"not base64!"}]}"#, .invalidValue, "'x509Certificates[0].value' must be base64")
        invalid(base + #""profileUrl":"has space"}"#, .invalidValue, "URI reference")
        invalid(base + #""name":{"givenName":1}}"#, .invalidValue, "'name.givenName' must be a string, got integer")
        let enterprise =
            #"{"schemas":["urn:ietf:params:scim:schemas:core:2.0:User","urn:ietf:params:scim:schemas:extension:enterprise:2.0:User"],"userName":"u","#
        invalid(
            enterprise + #""urn:ietf:params:scim:schemas:extension:enterprise:2.0:User":{"manager":{"value":7}}}"#, .invalidValue,
            "'urn:ietf:params:scim:schemas:extension:enterprise:2.0:User:manager.value' must be a string")
        invalid(base + #""displayName":["a","b"]}"#, .invalidValue, "single-valued")
        invalid(
            base + #""emails":[{"value":"a@x","primary":true},{"value":"b@x","primary":true}]}"#,
            .invalidValue, "2 values with \"primary\": true")
    }

    func testDateTimeAndCustomSchemaTypes() throws {
        var reg = SchemaRegistry.standard
        let custom = try Schema(
            json: json(
                #"""
                  {"id":"urn:example:params:scim:schemas:extension:badge:2.0:User","name":"Badge","attributes":[
                    {"name":"issued","type":"dateTime"},{"name":"level","type":"integer","required":true},
                    {"name":"ratio","type":"decimal"},{"name":"photo","type":"binary"},
                    {"name":"doors","type":"complex","multiValued":true,"subAttributes":[{"name":"code","type":"string","caseExact":true}]}]}
                """#))
        try reg.addExtension(custom, to: "User")
        let v = ResourceValidator(registry: reg, type: reg.resourceType("User")!)
        let urn = "urn:example:params:scim:schemas:extension:badge:2.0:User"
        func body(_ ext: String) -> String {
            #"{"schemas":["urn:ietf:params:scim:schemas:core:2.0:User",""# + urn + #""],"userName":"a",""# + urn + #"":"# + ext + "}"
        }
        let ok = try v.validateCreate(
            json(
                body(
                    #"{"issued":"2025-02-28T23:59:59.123+02:00","level":2,"ratio":0.25,"photo":"aGk=","doors":[{"code":"A1"}]}"#)))
        XCTAssertEqual(ok[urn]?["level"], 2)
        invalid(body(#"{"issued":"2025-02-30T10:00:00Z","level":1}"#), .invalidValue, "xsd:dateTime", validator: v)
        invalid(body(#"{"issued":"yesterday","level":1}"#), .invalidValue, "xsd:dateTime", validator: v)
        invalid(body(#"{"level":1.5}"#), .invalidValue, "must be an integer", validator: v)
        invalid(body(#"{"ratio":"0.5","level":1}"#), .invalidValue, "must be a decimal", validator: v)
        invalid(body(#"{"issued":"2025-01-01T00:00:00Z"}"#), .invalidValue, "'\(urn):level' is required", validator: v)
        // The new schema is in the discovery documents.
        XCTAssertTrue(reg.schemasDocument.text.contains(urn))
        XCTAssertTrue(reg.resourceTypesDocument.text.contains(urn))
        XCTAssertThrowsError(try Schema(json: json(#"{"id":"urn:x","attributes":[{"name":"1bad"}]}"#)))
        XCTAssertThrowsError(try Schema(json: json(#"{"id":"urn:x","attributes":[{"name":"a","type":"float"}]}"#)))
    }

    func testCanonicalValuesWhereEnforced() throws {
        let groups = ResourceValidator(registry: registry, type: groupType)
        let out = try groups.validateCreate(
            json(#"{"schemas":["urn:ietf:params:scim:schemas:core:2.0:Group"],"displayName":"G","members":[{"value":"1","type":"user"}]}"#))
        XCTAssertEqual(out["members"]?.arrayValue?.first?["type"], "User", "canonical spelling")
        invalid(
            #"{"schemas":["urn:ietf:params:scim:schemas:core:2.0:Group"],"displayName":"G","members":[{"value":"1","type":"Robot"}]}"#,
            .invalidValue, "must be one of User, Group", validator: groups)
        // Advisory canonical values (emails.type) accept other labels (RFC 7643 §2.4).
        XCTAssertNoThrow(
            try userValidator.validateCreate(
                json(
                    #"{"schemas":["urn:ietf:params:scim:schemas:core:2.0:User"],"userName":"a","emails":[{"value":"a@x","type":"alias"}]}"#)
            ))
    }

    func testEntraProfileCoercionsAndStrictMode() throws {
        let body =
            #"{"schemas":["urn:ietf:params:scim:schemas:core:2.0:User","urn:ietf:params:scim:schemas:extension:enterprise:2.0:User"],"userName":"a","active":"True","urn:ietf:params:scim:schemas:extension:enterprise:2.0:User":{"manager":"m-1"}}"#
        let out = try userValidator.validateCreate(json(body))
        XCTAssertEqual(out["active"], .bool(true))
        XCTAssertEqual(out[SchemaURN.enterpriseUser]?["manager"], ["value": "m-1"])
        XCTAssertThrowsError(try strictValidator.validateCreate(json(body)), "the strict profile refuses both")

        // Normalisation reaches inside multi-valued complex values: a coerced
        // sub-attribute, a respelled name, a dropped read-only one, a null.
        let nested = try userValidator.validateCreate(
            json(
                #"""
                  {"schemas":["urn:ietf:params:scim:schemas:core:2.0:User"],"userName":"a",
                   "emails":[{"value":"a@x","type":"work"},{"VALUE":"b@x","primary":"True","display":null}],
                   "groups":[{"value":"g1"}],
                   "name":{"givenName":"A","FamilyName":"B"}}
                """#))
        XCTAssertEqual(nested["emails"], [["value": "a@x", "type": "work"], ["value": "b@x", "primary": true]])
        XCTAssertNil(nested["groups"], "read-only on input: ignored")
        XCTAssertEqual(nested["name"], ["givenName": "A", "familyName": "B"])
        let untouched = try userValidator.validateCreate(
            json(#"{"schemas":["urn:ietf:params:scim:schemas:core:2.0:User"],"userName":"a","emails":[{"value":"a@x"},{"value":"a@x"}]}"#))
        XCTAssertEqual(untouched["emails"], [["value": "a@x"]], "exact duplicates collapse")
    }

    func testNullsAndEmptyArraysAreUnassigned() throws {
        let out = try userValidator.validateCreate(
            json(
                #"{"schemas":["urn:ietf:params:scim:schemas:core:2.0:User"],"userName":"a","nickName":null,"emails":[],"name":{"givenName":null}}"#
            ))
        XCTAssertEqual(out.keys, ["schemas", "userName"])
    }

    func testImmutableOnReplace() throws {
        let groups = ResourceValidator(registry: registry, type: groupType)
        var schema = registry
        let ext = try Schema(json: json(#"{"id":"urn:example:hr","attributes":[{"name":"hireId","mutability":"immutable"}]}"#))
        try schema.addExtension(ext, to: "User")
        let v = ResourceValidator(registry: schema, type: schema.resourceType("User")!)
        let existing = try v.validateCreate(
            json(
                #"{"schemas":["urn:ietf:params:scim:schemas:core:2.0:User","urn:example:hr"],"userName":"a","urn:example:hr":{"hireId":"H1"}}"#
            ))
        XCTAssertThrowsError(
            try v.validateReplace(
                json(
                    #"{"schemas":["urn:ietf:params:scim:schemas:core:2.0:User","urn:example:hr"],"userName":"a","urn:example:hr":{"hireId":"H2"}}"#
                ),
                existing: existing)
        ) { error in
            XCTAssertEqual((error as! SCIMError).scimType, .mutability)
            XCTAssertTrue((error as! SCIMError).detail.contains("urn:example:hr:hireId"))
        }
        let kept = try v.validateReplace(
            json(#"{"schemas":["urn:ietf:params:scim:schemas:core:2.0:User"],"userName":"b"}"#), existing: existing)
        XCTAssertEqual(kept["urn:example:hr"]?["hireId"], "H1", "an omitted immutable value is kept")
        XCTAssertEqual(kept["schemas"]?.arrayValue?.count, 2)
        _ = groups
    }

    func testDiscoveryDocuments() {
        let schemas = registry.schemasDocument
        XCTAssertEqual(schemas["totalResults"], 3)
        let user = schemas["Resources"]?.arrayValue?.first { $0["id"] == .string(SchemaURN.user) }
        let userName = user?["attributes"]?.arrayValue?.first { $0["name"] == "userName" }
        XCTAssertEqual(userName?["uniqueness"], "server")
        XCTAssertEqual(userName?["required"], true)
        XCTAssertEqual(userName?["caseExact"], false)
        let password = user?["attributes"]?.arrayValue?.first { $0["name"] == "password" }
        XCTAssertEqual(password?["returned"], "never")
        XCTAssertEqual(password?["mutability"], "writeOnly")
        let emails = user?["attributes"]?.arrayValue?.first { $0["name"] == "emails" }
        XCTAssertEqual(emails?["subAttributes"]?.arrayValue?.count, 4)
        let types = registry.resourceTypesDocument["Resources"]?.arrayValue
        XCTAssertEqual(types?.first?["schemaExtensions"]?.arrayValue?.first?["schema"], .string(SchemaURN.enterpriseUser))
        let config = ServiceProviderFeatures().json
        XCTAssertEqual(config["patch"]?["supported"], true)
        XCTAssertEqual(config["bulk"]?["maxOperations"], 1000)
        XCTAssertEqual(config["authenticationSchemes"]?.arrayValue?.first?["type"], "oauthbearertoken")
    }

    func testErrorBody() {
        let e = SCIMError.invalidValue("attribute 'userName' is required")
        XCTAssertEqual(
            e.json.text,
            #"{"schemas":["urn:ietf:params:scim:api:messages:2.0:Error"],"status":"400","scimType":"invalidValue","detail":"attribute 'userName' is required"}"#
        )
        XCTAssertEqual(SCIMError.notFound("no").json["scimType"], nil)
    }

    /// `/Schemas` describes every attribute, sub-attributes included, with
    /// every characteristic of RFC 7643 §7, and reads back into the same
    /// definitions the validator uses.
    func testSchemasDescribeEveryAttributeWithEveryCharacteristic() throws {
        let types = ["string", "boolean", "decimal", "integer", "dateTime", "reference", "complex", "binary"]
        var walked = 0
        func walk(_ attribute: JSON, _ path: String) {
            walked += 1
            for key in ["name", "type", "multiValued", "description", "required", "caseExact", "mutability", "returned", "uniqueness"] {
                XCTAssertNotNil(attribute[key], "\(path) has no \(key)")
            }
            let type = attribute["type"]?.stringValue ?? ""
            XCTAssertTrue(types.contains(type), "\(path): type \(type)")
            XCTAssertNotNil(attribute["multiValued"]?.boolValue, path)
            XCTAssertNotNil(attribute["required"]?.boolValue, path)
            XCTAssertNotNil(attribute["caseExact"]?.boolValue, path)
            XCTAssertTrue(["readOnly", "readWrite", "immutable", "writeOnly"].contains(attribute["mutability"]?.stringValue ?? ""), path)
            XCTAssertTrue(["always", "never", "default", "request"].contains(attribute["returned"]?.stringValue ?? ""), path)
            XCTAssertTrue(["none", "server", "global"].contains(attribute["uniqueness"]?.stringValue ?? ""), path)
            XCTAssertEqual(attribute["referenceTypes"] != nil, type == "reference", "\(path): referenceTypes where they apply")
            if type == "reference" { XCTAssertFalse(attribute["referenceTypes"]?.arrayValue?.isEmpty ?? true, path) }
            XCTAssertEqual(attribute["subAttributes"] != nil, type == "complex", path)
            for sub in attribute["subAttributes"]?.arrayValue ?? [] { walk(sub, path + "." + (sub["name"]?.stringValue ?? "?")) }
        }
        let document = registry.schemasDocument
        let resources = try XCTUnwrap(document["Resources"]?.arrayValue)
        XCTAssertEqual(resources.count, 3)
        for schema in resources {
            let id = try XCTUnwrap(schema["id"]?.stringValue)
            for a in schema["attributes"]?.arrayValue ?? [] { walk(a, id + ":" + (a["name"]?.stringValue ?? "?")) }
            // The document is the definitions: parsed back, it serialises the same.
            XCTAssertEqual(try Schema(json: schema).json["attributes"], schema["attributes"], id)
        }
        XCTAssertGreaterThan(walked, 60, "users, groups and the enterprise extension, sub-attributes included")
        let members = resources.first { $0["id"] == .string(SchemaURN.group) }?["attributes"]?.arrayValue?.first { $0["name"] == "members" }
        XCTAssertEqual(members?["subAttributes"]?.arrayValue?.first { $0["name"] == "type" }?["canonicalValues"], ["User", "Group"])
        let active = resources.first { $0["id"] == .string(SchemaURN.user) }?["attributes"]?.arrayValue?.first { $0["name"] == "active" }
        XCTAssertEqual(active?["uniqueness"], "none", "booleans carry uniqueness too")
        XCTAssertEqual(active?["caseExact"], false)
    }
}
