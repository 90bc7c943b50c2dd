import SCIM
import XCTest

/// RFC 7644 §3.4.2.2: the grammar, precedence, typed comparison, errors with positions.
final class FilterTests: XCTestCase {
    /// The full user as stored: normalised, with id and meta.
    lazy var barbara: JSONObject = {
        var u = try! userValidator.validateCreate(json(fullUser))
        u["id"] = "2819c223-7f76-453a-919d-413861904646"
        u["meta"] = [
            "resourceType": "User", "created": "2010-01-23T04:56:22Z", "lastModified": "2011-05-13T04:42:34Z",
            "version": "W/\"3694e05e9dff591\"",
        ]
        return u
    }()

    lazy var intern: JSONObject = {
        var u = try! userValidator.validateCreate(
            json(
                #"""
                  {"schemas":["urn:ietf:params:scim:schemas:core:2.0:User"],"userName":"JSmith","userType":"Intern",
                   "name":{"familyName":"O'Malley"},"emails":[{"value":"js@example.org","type":"home"}],
                   "ims":[{"value":"js@foo.com","type":"xmpp"}],"active":false}
                """#))
        u["id"] = "abc"
        u["meta"] = ["lastModified": "2011-05-13T06:42:34+02:00"]
        return u
    }()

    func matches(_ filter: String, _ resource: JSONObject) throws -> Bool {
        try Filter(filter, registry: registry, type: userType).matches(resource)
    }

    /// Each filter with whether it matches Barbara and the intern.
    func testFilterTable() throws {
        let table: [(String, Bool, Bool)] = [
            // RFC 7644 §3.4.2.2 examples
            (#"userName eq "bjensen@example.com""#, true, false),
            (#"name.familyName co "O'Malley""#, false, true),
            (#"userName sw "J""#, false, true),
            (#"urn:ietf:params:scim:schemas:core:2.0:User:userName sw "J""#, false, true),
            ("title pr", true, false),
            (#"meta.lastModified gt "2011-05-13T04:42:34Z""#, false, false),
            (#"meta.lastModified ge "2011-05-13T04:42:34Z""#, true, true),
            (#"meta.lastModified lt "2011-05-13T04:42:34Z""#, false, false),
            (#"meta.lastModified le "2011-05-13T04:42:34Z""#, true, true),
            (#"title pr and userType eq "Employee""#, true, false),
            (#"title pr or userType eq "Intern""#, true, true),
            (#"schemas eq "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User""#, true, false),
            (#"userType eq "Employee" and (emails co "example.com" or emails.value co "example.org")"#, true, false),
            (#"userType ne "Employee" and not (emails co "example.com" or emails.value co "example.org")"#, false, false),
            (#"userType eq "Employee" and (emails.type eq "work")"#, true, false),
            (#"userType eq "Employee" and emails[type eq "work" and value co "@example.com"]"#, true, false),
            (#"emails[type eq "work" and value co "@example.com"] or ims[type eq "xmpp" and value co "@foo.com"]"#, true, true),
            // case rules: userName is caseExact false, id is caseExact true
            (#"USERNAME EQ "BJENSEN@EXAMPLE.COM""#, true, false),
            (#"id eq "ABC""#, false, false),
            (#"id eq "abc""#, false, true),
            // precedence: not > and > or
            (#"userType eq "Intern" or userType eq "Employee" and active eq false"#, false, true),
            (#"(userType eq "Intern" or userType eq "Employee") and active eq true"#, true, false),
            (#"not (active eq true)"#, false, true),
            (#"not(title pr)"#, false, true),
            // typed comparisons
            ("active eq true", true, false),
            ("active ne true", false, true),
            (#"emails[primary eq true]"#, true, false),
            (#"urn:ietf:params:scim:schemas:extension:enterprise:2.0:User:employeeNumber eq "701984""#, true, false),
            (#"urn:ietf:params:scim:schemas:extension:enterprise:2.0:User:manager.value sw "2611""#, true, false),
            (#"emails ew ".org""#, true, true),
            (#"name.givenName gt "A" and name.givenName lt "C""#, true, false),
            ("nickName eq null", false, true),
            ("nickName ne null", true, false),
            (#"meta.lastModified eq "2011-05-13T04:42:34.000Z""#, true, true),
            (#"displayName co """#, true, false),
            (#"title eq "tour guide""#, true, false),
        ]
        for (filter, b, i) in table {
            XCTAssertEqual(try matches(filter, barbara), b, "\(filter) on Barbara")
            XCTAssertEqual(try matches(filter, intern), i, "\(filter) on the intern")
        }
    }

    func testErrorsAreInvalidFilterWithPositions() {
        let bad: [(String, String)] = [
            ("", "empty filter"),
            ("userName eq", "expected a comparison value after 'eq' at position 12"),
            (#"userName xx "a""#, "unknown operator 'xx' at position 10"),
            (#"(userName eq "a""#, "expected ')' but found the end of the filter at position 17"),
            (#"foo eq "a""#, "unknown attribute 'foo' for resource type User at position 1"),
            ("active gt true", "'gt' cannot compare booleans"),
            (#"active eq "maybe""#, "is a boolean"),
            (#"meta.lastModified gt "soon""#, "compare it with a quoted xsd:dateTime"),
            ("userName eq bjensen", "strings need double quotes"),
            (#"emails[type eq "work""#, "expected ']'"),
            (#"emails[type eq "work"] and"#, "expected an attribute, '(' or 'not' but found the end"),
            (#"emails[kind eq "work"]"#, "'kind' is not a sub-attribute of 'emails'"),
            (#"userName eq "a" xor title pr"#, "unexpected 'xor' at position 17"),
            (#"userName eq "unterminated"#, "unterminated string at position 13"),
            (#"not userName eq "a""#, "expected '(' after 'not'"),
            (#"displayName[value eq "x"]"#, "not a complex attribute"),
            (#"x509Certificates.value eq "AAAA""#, "binary attribute"),
            (#"emails[type eq "w" and emails[type eq "x"]]"#, "'emails' is not a sub-attribute"),
            (String(repeating: "(", count: 100) + "title pr" + String(repeating: ")", count: 100), "nested too deeply"),
        ]
        for (filter, fragment) in bad {
            XCTAssertThrowsError(try Filter(filter, registry: registry, type: userType), filter) { error in
                let e = error as! SCIMError
                XCTAssertEqual(e.status, 400)
                XCTAssertEqual(e.scimType, .invalidFilter)
                XCTAssertTrue(e.detail.contains(fragment), "'\(e.detail)' should contain '\(fragment)'")
            }
        }
    }

    func testIndexLookupHints() throws {
        func hint(_ f: String) throws -> String {
            guard let h = try Filter(f, registry: registry, type: userType).indexLookup else { return "scan" }
            return "\(h.lookup) \(h.exact ? "exact" : "then-filter")"
        }
        XCTAssertEqual(try hint(#"userName eq "bjensen""#), #"userName("bjensen") exact"#)
        XCTAssertEqual(try hint(#"USERNAME Eq "bjensen""#), #"userName("bjensen") exact"#)
        XCTAssertEqual(try hint(#"externalId eq "701984""#), #"externalId("701984") exact"#)
        XCTAssertEqual(try hint(#"id eq "x""#), #"id("x") exact"#)
        XCTAssertEqual(try hint(#"active eq true and userName eq "b""#), #"userName("b") then-filter"#)
        XCTAssertEqual(try hint(#"userName eq "a" or userName eq "b""#), "scan")
        XCTAssertEqual(try hint(#"userName co "b""#), "scan")
        XCTAssertEqual(try hint(#"not (userName eq "b")"#), "scan")
        XCTAssertEqual(try hint(#"urn:ietf:params:scim:schemas:extension:enterprise:2.0:User:employeeNumber eq "1""#), "scan")
    }

    func testGroupFilters() throws {
        let g = try ResourceValidator(registry: registry, type: groupType).validateCreate(
            json(
                #"{"schemas":["urn:ietf:params:scim:schemas:core:2.0:Group"],"displayName":"Tour Guides","members":[{"value":"2819c223","type":"User"},{"value":"g-2","type":"Group"}]}"#
            ))
        func m(_ f: String) throws -> Bool { try Filter(f, registry: registry, type: groupType).matches(g) }
        XCTAssertTrue(try m(#"members[value eq "2819c223"]"#))
        XCTAssertFalse(try m(#"members[value eq "2819C223"]"#), "members.value is caseExact")
        XCTAssertTrue(try m(#"members.type eq "Group""#))
        XCTAssertTrue(try m(#"displayName eq "tour guides""#))
        XCTAssertThrowsError(try Filter(#"userName eq "x""#, registry: registry, type: groupType))
    }

    func testStringLiteralEscapes() throws {
        var u = barbara
        u["displayName"] = "say \"hi\" \\ o/"
        XCTAssertTrue(try matches(#"displayName eq "say \"hi\" \\ o/""#, u))
        XCTAssertTrue(try matches(#"displayName sw "say \u0022hi""#, u))
    }
}
