import SCIM
import XCTest

/// RFC 7644 §3.4.2 (sort, pagination, projection), §3.4.3 (.search),
/// RFC 9865 (cursors), §3.14 (ETags), §3.7 (Bulk).
final class QueryTests: XCTestCase {
    func users(_ names: [(String, String?, Bool?)]) -> [JSONObject] {
        names.enumerated().map { k, n in
            var o: JSONObject = ["schemas": [.string(SchemaURN.user)], "id": .string("id-\(k)"), "userName": .string(n.0)]
            if let t = n.1 { o["title"] = .string(t) }
            if let a = n.2 { o["active"] = .bool(a) }
            return o
        }
    }

    func query(_ q: String) throws -> ListQuery {
        try ListQuery(parameters: parseQueryString(Substring(q))!, registry: registry, type: userType, maxResults: 50)
    }

    func testQueryStringDecoding() {
        let p = parseQueryString("filter=userName%20eq%20%22b%C3%A9a%22&count=5&attributes=userName,name.givenName&x=a+b")
        XCTAssertEqual(p?["filter"], #"userName eq "béa""#)
        XCTAssertEqual(p?["count"], "5")
        XCTAssertEqual(p?["x"], "a b")
        XCTAssertNil(parseQueryString("filter=%ZZ"), "a malformed escape is refused")
        XCTAssertNil(parseQueryString("filter=%C3%28"), "so is invalid UTF-8")
    }

    func testSortIsTypedCaseAwareAndStable() throws {
        let list = users([("carol", "b", true), ("Alice", nil, false), ("bob", "A", true), ("alice2", "a", nil)])
        XCTAssertEqual(
            try query("sortBy=userName").sorted(list).map { $0["userName"]!.stringValue! },
            ["Alice", "alice2", "bob", "carol"], "userName is caseExact false")
        XCTAssertEqual(
            try query("sortBy=userName&sortOrder=descending").sorted(list).map { $0["userName"]!.stringValue! },
            ["carol", "bob", "alice2", "Alice"])
        XCTAssertEqual(
            try query("sortBy=title").sorted(list).map { $0["userName"]!.stringValue! },
            ["bob", "alice2", "carol", "Alice"], "equal keys keep input order; missing values go last")
        XCTAssertEqual(
            try query("sortBy=active").sorted(list).map { $0["userName"]!.stringValue! },
            ["Alice", "carol", "bob", "alice2"], "false before true")
        XCTAssertThrowsError(try query("sortBy=shoeSize"))
        XCTAssertThrowsError(try query("sortBy=userName&sortOrder=sideways"))
    }

    func testIndexPagination() throws {
        let list = users((1...7).map { ("u\($0)", nil, nil) })
        XCTAssertEqual(try query("startIndex=3&count=2").page(list).map { $0["userName"]!.stringValue! }, ["u3", "u4"])
        XCTAssertEqual(try query("startIndex=0&count=2").startIndex, 1, "below 1 means 1")
        XCTAssertEqual(try query("startIndex=7&count=5").page(list).count, 1)
        XCTAssertEqual(try query("startIndex=9").page(list).count, 0)
        XCTAssertEqual(try query("count=-3").count, 0, "negative count means 0")
        XCTAssertEqual(try query("count=5000").count, 50, "capped at maxResults")
        XCTAssertEqual(try query("").count, 50)
        XCTAssertThrowsError(try query("count=many"))
        XCTAssertThrowsError(try query("cursor=&startIndex=2"), "cursor and index pagination are exclusive")
        XCTAssertEqual(try query("cursor=").cursor, "")
        let response = makeListResponse(resources: [["id": "a"]], totalResults: 7, startIndex: 3, nextCursor: "c2")
        XCTAssertEqual(response["totalResults"], 7)
        XCTAssertEqual(response["itemsPerPage"], 1)
        XCTAssertEqual(response["startIndex"], 3)
        XCTAssertEqual(response["nextCursor"], "c2")
        XCTAssertEqual(response["schemas"], [.string(SchemaURN.listResponse)])
    }

    /// Walks a list with cursors: every element exactly once, in order.
    func walk(
        _ list: [JSONObject], _ q: String, orderedByID: Bool,
        between: (Int, inout [JSONObject]) -> Void = { _, _ in }
    ) throws -> [String] {
        var list = list, seen: [String] = [], cursor = "", pages = 0
        while true {
            let page = try query(q + "&cursor=" + cursor).cursorPage(list, orderedByID: orderedByID) { $0["id"]!.stringValue! }
            seen += page.items.map { $0["id"]!.stringValue! }
            pages += 1
            guard let next = page.nextCursor, pages < 100 else { return seen }
            XCTAssertTrue(
                next.utf8.allSatisfy { "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~".utf8.contains($0) },
                "cursors use unreserved characters only: \(next)")
            between(pages, &list)
            cursor = next
        }
    }

    func testCursorPagination() throws {
        let list = (0..<10).map { k -> JSONObject in ["id": .string("id-\(k)"), "userName": .string("u\(9 - k)")] }
        XCTAssertEqual(try walk(list, "count=3", orderedByID: true), list.map { $0["id"]!.stringValue! })
        // Deleting the anchor (the last element served) does not skip its successor,
        // and inserting before the position does not repeat anything.
        let walked = try walk(list, "count=3", orderedByID: true) { page, l in
            if page == 1 { l.removeAll { $0["id"] == "id-2" } }
            if page == 2 { l.insert(["id": "id-0a", "userName": "new"], at: 1) }
        }
        XCTAssertEqual(walked, ["id-0", "id-1", "id-2", "id-3", "id-4", "id-5", "id-6", "id-7", "id-8", "id-9"])

        // Backwards: previousCursor of the last page leads to the page before.
        let q = try query("count=4&cursor=")
        let first = try q.cursorPage(list, orderedByID: true) { $0["id"]!.stringValue! }
        XCTAssertNil(first.previousCursor, "the first page has no previous page")
        var second = q
        second.cursor = first.nextCursor
        let p2 = try second.cursorPage(list, orderedByID: true) { $0["id"]!.stringValue! }
        XCTAssertEqual(p2.items.map { $0["id"]!.stringValue! }, ["id-4", "id-5", "id-6", "id-7"])
        var back = q
        back.cursor = p2.previousCursor
        XCTAssertEqual(
            try back.cursorPage(list, orderedByID: true) { $0["id"]!.stringValue! }.items.map { $0["id"]!.stringValue! },
            ["id-0", "id-1", "id-2", "id-3"])
        var third = q
        third.cursor = p2.nextCursor
        let last = try third.cursorPage(list, orderedByID: true) { $0["id"]!.stringValue! }
        XCTAssertEqual(last.items.count, 2)
        XCTAssertNil(last.nextCursor, "the last page has no next page")

        // Sorted: the walk follows the sort.
        let sorted = try query("sortBy=userName").sorted(list)
        XCTAssertEqual(try walk(sorted, "sortBy=userName&count=4", orderedByID: false), sorted.map { $0["id"]!.stringValue! })

        // A cursor from another query, a forged one, or one with bad characters is invalidCursor.
        var other = try query("filter=userName%20pr&count=4")
        other.cursor = first.nextCursor
        for bad in [other, try query("cursor=abc.n1.zz"), try query("cursor=nonsense")] {
            XCTAssertThrowsError(try bad.cursorPage(list, orderedByID: true) { $0["id"]!.stringValue! }) {
                XCTAssertEqual(($0 as? SCIMError)?.scimType, .invalidCursor, "\($0)")
            }
        }
        XCTAssertThrowsError(try query("cursor=a%2Fb")) { XCTAssertEqual(($0 as? SCIMError)?.scimType, .invalidCursor) }
    }

    func testSearchBody() throws {
        let q = try ListQuery(
            searchBody: json(
                #"""
                  {"schemas":["urn:ietf:params:scim:api:messages:2.0:SearchRequest"],"attributes":["displayName","userName"],
                   "filter":"displayName sw \"smith\"","startIndex":1,"count":10}
                """#), registry: registry, type: userType)
        XCTAssertEqual(q.count, 10)
        XCTAssertNotNil(q.filter)
        XCTAssertThrowsError(try ListQuery(searchBody: json(#"{"filter":"title pr"}"#), registry: registry, type: userType))
        XCTAssertThrowsError(
            try ListQuery(
                searchBody: json(#"{"schemas":["urn:ietf:params:scim:api:messages:2.0:SearchRequest"],"colour":"red"}"#),
                registry: registry, type: userType))
    }

    func testProjection() throws {
        var u = try userValidator.validateCreate(json(fullUser))
        u["id"] = "2819c223"
        u["meta"] = ["resourceType": "User", "version": "W/\"1\""]
        func project(_ q: String) throws -> JSONObject { try query(q).projection.apply(to: u) }

        let all = try project("")
        XCTAssertNil(all["password"], "returned: never")
        XCTAssertNotNil(all["meta"])
        XCTAssertNotNil(all[SchemaURN.enterpriseUser])

        let some = try project("attributes=userName,name.givenName,emails.value")
        XCTAssertEqual(some.keys.sorted(), ["emails", "id", "name", "schemas", "userName"], "id is returned always")
        XCTAssertEqual(some["name"], ["givenName": "Barbara"])
        XCTAssertEqual(some["emails"]?.arrayValue?.first, ["value": "bjensen@example.com"])

        let ext = try project("attributes=urn:ietf:params:scim:schemas:extension:enterprise:2.0:User:department")
        XCTAssertEqual(ext[SchemaURN.enterpriseUser], ["department": "Tour Operations"])
        let wholeExt = try project("attributes=urn:ietf:params:scim:schemas:extension:enterprise:2.0:User")
        XCTAssertEqual(wholeExt[SchemaURN.enterpriseUser]?.objectValue?.count, 6)

        let excluded = try project(
            "excludedAttributes=emails,name.middleName,id,urn:ietf:params:scim:schemas:extension:enterprise:2.0:User")
        XCTAssertNil(excluded["emails"])
        XCTAssertNil(excluded["name"]?["middleName"])
        XCTAssertEqual(excluded["name"]?["givenName"], "Barbara")
        XCTAssertEqual(excluded["id"], "2819c223", "id cannot be excluded (returned: always)")
        XCTAssertNil(excluded[SchemaURN.enterpriseUser])

        XCTAssertNil(try project("attributes=password")["password"], "never is never returned, even when asked")
        XCTAssertThrowsError(try project("attributes=shoeSize"))
    }

    func testETagPreconditions() {
        let v = ETag.make(version: 3)
        XCTAssertEqual(v, #"W/"3""#)
        let cases: [(String?, String?, String?, Bool, ETag.Outcome)] = [
            (nil, nil, v, false, ETag.Outcome.proceed),
            (#"W/"3""#, nil, v, false, .proceed),
            (#""3""#, nil, v, false, .proceed),  // weak comparison
            (#"W/"2", W/"3""#, nil, v, false, .proceed),
            (#"W/"2""#, nil, v, false, .preconditionFailed),
            ("*", nil, v, false, .proceed),
            ("*", nil, nil, false, .preconditionFailed),  // no resource
            (nil, #"W/"3""#, v, true, .notModified),
            (nil, #"W/"3""#, v, false, .preconditionFailed),
            (nil, #"W/"4""#, v, true, .proceed),
            (nil, "*", nil, false, .proceed),  // create only if absent
            (nil, "*", v, false, .preconditionFailed),
        ]
        for (ifMatch, ifNoneMatch, current, isRead, expected) in cases {
            XCTAssertEqual(
                ETag.evaluate(ifMatch: ifMatch, ifNoneMatch: ifNoneMatch, current: current, isRead: isRead), expected,
                "If-Match \(ifMatch ?? "-") If-None-Match \(ifNoneMatch ?? "-") current \(current ?? "-")")
        }
    }

    // MARK: Bulk

    func bulk(_ ops: String, failOnErrors: Int? = nil, maxOperations: Int = 10, maxPayload: Int = 1 << 20) throws -> BulkRequest {
        let f = failOnErrors.map { #","failOnErrors":\#($0)"# } ?? ""
        let text = #"{"schemas":["urn:ietf:params:scim:api:messages:2.0:BulkRequest"]"# + f + #","Operations":"# + ops + "}"
        return try BulkRequest(json(text), payloadSize: text.utf8.count, maxOperations: maxOperations, maxPayloadSize: maxPayload)
    }

    func testBulkForwardReferencesAreOrdered() throws {
        // The group (op 0) references a user created later (op 1): op 1 runs first.
        let req = try bulk(
            #"""
            [{"method":"POST","path":"/Groups","bulkId":"g1","data":{"schemas":["urn:ietf:params:scim:schemas:core:2.0:Group"],"displayName":"G","members":[{"type":"User","value":"bulkId:u1"}]}},
             {"method":"POST","path":"/Users","bulkId":"u1","data":{"schemas":["urn:ietf:params:scim:schemas:core:2.0:User"],"userName":"a"}},
             {"method":"PATCH","path":"/Users/bulkId:u1","data":{"schemas":["urn:ietf:params:scim:api:messages:2.0:PatchOp"],"Operations":[{"op":"add","path":"title","value":"x"}]}},
             {"method":"DELETE","path":"/Users/xyz"}]
            """#, failOnErrors: 2)
        XCTAssertEqual(req.failOnErrors, 2)
        let (ordered, failed) = req.executionOrder()
        XCTAssertEqual(ordered.map(\.index), [1, 0, 2, 3])
        XCTAssertTrue(failed.isEmpty)
        XCTAssertEqual(req.operations[0].references, ["u1"])
        XCTAssertEqual(req.operations[2].references, ["u1"], "bulkId in the path counts")
        let resolved = resolvingBulkIds(req.operations[0].data!, ["u1": "real-id-9"])
        XCTAssertEqual(resolved["members"]?.arrayValue?.first?["value"], "real-id-9")
        XCTAssertEqual(resolvingBulkIds(.string("/Users/bulkId:u1"), ["u1": "real"]), "/Users/real")
    }

    func testBulkCyclesAndUnknownReferencesFail() throws {
        let req = try bulk(
            #"""
            [{"method":"POST","path":"/Groups","bulkId":"a","data":{"members":[{"value":"bulkId:b"}]}},
             {"method":"POST","path":"/Groups","bulkId":"b","data":{"members":[{"value":"bulkId:a"}]}},
             {"method":"POST","path":"/Groups","bulkId":"c","data":{"members":[{"value":"bulkId:nope"}]}},
             {"method":"POST","path":"/Groups","bulkId":"d","data":{"members":[{"value":"bulkId:d"}]}},
             {"method":"POST","path":"/Users","bulkId":"e","data":{"userName":"e"}}]
            """#)
        let (ordered, failed) = req.executionOrder()
        XCTAssertEqual(ordered.map(\.index), [4])
        XCTAssertEqual(failed.map(\.0.index), [0, 1, 2, 3])
        XCTAssertEqual(failed.map(\.1.status), [409, 409, 400, 409])
        XCTAssertTrue(failed[2].1.detail.contains("unknown bulkId 'nope'"))
    }

    func testBulkLimitsAndShape() {
        XCTAssertThrowsError(try bulk(#"[{"method":"DELETE","path":"/Users/1"},{"method":"DELETE","path":"/Users/2"}]"#, maxOperations: 1))
        {
            XCTAssertEqual(($0 as! SCIMError).status, 413)
        }
        XCTAssertThrowsError(try bulk(#"[{"method":"DELETE","path":"/Users/1"}]"#, maxPayload: 20)) {
            XCTAssertEqual(($0 as! SCIMError).status, 413)
        }
        XCTAssertThrowsError(try bulk(#"[{"method":"POST","path":"/Users","data":{}}]"#)) {
            XCTAssertTrue(($0 as! SCIMError).detail.contains("a POST needs a 'bulkId'"))
        }
        XCTAssertThrowsError(
            try bulk(
                #"[{"method":"POST","path":"/Users","bulkId":"x","data":{}},{"method":"POST","path":"/Users","bulkId":"x","data":{}}]"#))
        XCTAssertThrowsError(try bulk(#"[{"method":"GET","path":"/Users"}]"#))
        XCTAssertThrowsError(try bulk("[]"))
        XCTAssertThrowsError(try bulk(#"[{"method":"DELETE","path":"/Users/1"}]"#, failOnErrors: 0))
    }

    func testBulkResponse() throws {
        let req = try bulk(
            #"[{"method":"POST","path":"/Users","bulkId":"q","data":{"userName":"x"}},{"method":"DELETE","path":"/Users/9"}]"#)
        let body = makeBulkResponse([
            BulkResult(operation: req.operations[1], status: 404, error: .notFound("resource 9 not found")),
            BulkResult(operation: req.operations[0], status: 201, location: "https://h/v2/Users/1", version: #"W/"1""#),
        ])
        let ops = try XCTUnwrap(body["Operations"]?.arrayValue)
        XCTAssertEqual(ops.map { $0["status"] }, ["201", "404"], "in request order")
        XCTAssertEqual(ops[0]["bulkId"], "q")
        XCTAssertEqual(ops[1]["response"]?["detail"], "resource 9 not found")
    }
}
