import EdgeAgent
import EdgeTestSupport
import Foundation
import SCIM
import XCTest

/// `group` without the member `id` (the one a later PATCH removed).
func without(member id: String, _ group: JSON?) -> JSON? {
    guard var o = group?.objectValue, let members = o["members"]?.arrayValue else { return group }
    o["members"] = .array(members.filter { $0["value"]?.stringValue != id })
    return .object(o)
}

extension GroupMembersTests {
    /// A response over a real socket: whether it came chunked, and its body parsed without request limits.
    func streamedCall(
        _ agent: AgentHarness, _ method: String, _ path: String, _ body: String? = nil, headers: [String: String] = [:]
    ) throws -> (status: Int, chunked: Bool, head: String, json: JSON?) {
        let r = try agent.call(method, path, body, headers: headers)
        let json = r.raw.isEmpty ? nil : try JSONParser.parse(Array(r.raw.utf8), limits: .stored)
        return (r.status, r.head.contains("Transfer-Encoding: chunked"), r.head, json)
    }

    /// A GET whose projection keeps the members of a group of more than
    /// 1,000 (`streamedArrayAbove`) is streamed, as the unprojected one:
    /// chunked, every member, only what the projection keeps, the ETag of
    /// the unprojected GET (`If-None-Match` answers 304); a list or search
    /// page whose groups hold more than 1,000 members together is streamed
    /// too, each group as its GET by id gives it. Each streamed body is the
    /// one the in-memory build gives once the group is back to 1,000
    /// members; a page that does not return members is not streamed.
    func testProjectedGetsAndPagesOfLargeGroupsAreStreamed() throws {
        let agent = try AgentHarness()
        let u = try users(1_200, prefix: "s") { body in
            let r = try agent.call("POST", "/Bulk", body)
            return (r.status, r.raw)
        }
        let big = try makeGroup(agent, "big", Array(u[0..<1_001]))
        let mid0 = try makeGroup(agent, "mid 0", Array(u[0..<600]))
        let mid1 = try makeGroup(agent, "mid 1", Array(u[600..<1_001]))
        let none = try makeGroup(agent, "none", [])
        let q = { (s: String) in s.addingPercentEncoding(withAllowedCharacters: .alphanumerics)! }

        let whole = try streamedCall(agent, "GET", "/Groups/\(big)")
        XCTAssertTrue(whole.chunked, whole.head)
        let etag = try XCTUnwrap(agent.call("GET", "/Groups/\(big)").header("ETag"))

        // Projected GETs of the big group: (query, its top-level names, each member's names or nil: as stored).
        let projected: [(String, Set<String>, [String]?)] = [
            ("attributes=members,displayName", ["schemas", "id", "displayName", "members"], nil),
            ("attributes=members.value", ["schemas", "id", "members"], ["value"]),
            ("excludedAttributes=displayName", ["schemas", "id", "meta", "members"], nil),
            ("excludedAttributes=members.type", ["schemas", "id", "displayName", "meta", "members"], nil),
        ]
        var streamedBodies: [String: JSON?] = [:]
        for (query, names, memberNames) in projected {
            let got = try streamedCall(agent, "GET", "/Groups/\(big)?\(query)")
            XCTAssertEqual(got.status, 200, query)
            XCTAssertTrue(got.chunked, "\(query): the members are streamed: \(got.head)")
            XCTAssertTrue(got.head.contains("ETag: \(etag)"), "\(query): the version of the unprojected GET: \(got.head)")
            let doc = try XCTUnwrap(got.json?.objectValue, query)
            XCTAssertEqual(Set(doc.members.map(\.key)), names, query)
            let members = doc["members"]?.arrayValue ?? []
            XCTAssertEqual(members.compactMap { $0["value"]?.stringValue }, u[0..<1_001].sorted(), "\(query): every member")
            if let memberNames {
                XCTAssertTrue(members.allSatisfy { $0.objectValue?.members.map(\.key) == memberNames }, query)
            } else if query.hasSuffix("members.type") {
                XCTAssertTrue(members.allSatisfy { $0["type"] == nil && $0["value"] != nil }, query)
            } else {
                XCTAssertTrue(sameJSON(doc["members"], whole.json?["members"]), "\(query): the members as stored")
            }
            let unchanged = try agent.call("GET", "/Groups/\(big)?\(query)", headers: ["If-None-Match": etag])
            XCTAssertEqual(unchanged.status, 304, query)
            streamedBodies[query] = got.json
        }

        // Pages: (path, method, body, the groups it returns).
        let pages: [(String, String, String?, [String])] = [
            ("/Groups?filter=" + q(#"displayName eq "big""#), "GET", nil, [big]),
            ("/Groups?filter=" + q(#"displayName eq "big""#) + "&attributes=members.value,displayName", "GET", nil, [big]),
            ("/Groups?count=10", "GET", nil, [big, mid0, mid1, none]),
            ("/Groups?startIndex=2&count=3", "GET", nil, [mid0, mid1, none]),
            ("/Groups?startIndex=2&count=3&excludedAttributes=members.display", "GET", nil, [mid0, mid1, none]),
            (
                "/Groups/.search", "POST",
                #"{"schemas":["urn:ietf:params:scim:api:messages:2.0:SearchRequest"],"filter":"displayName sw \"mid\"","count":5}"#,
                [mid0, mid1]
            ),
            (
                "/.search", "POST",
                #"{"schemas":["urn:ietf:params:scim:api:messages:2.0:SearchRequest"],"filter":"displayName eq \"big\""}"#, [big]
            ),
        ]
        for (path, method, body, groups) in pages {
            let got = try streamedCall(agent, method, path, body)
            XCTAssertEqual(got.status, 200, "\(path): \(String(describing: got.json))")
            XCTAssertTrue(got.chunked, "\(path): the page's groups hold more than 1,000 members: \(got.head)")
            let resources = got.json?["Resources"]?.arrayValue ?? []
            XCTAssertEqual(resources.compactMap { $0["id"]?.stringValue }, groups, path)
            XCTAssertEqual(got.json?["itemsPerPage"], .int(groups.count), path)
            // Each group as its GET by id answers it, with the page's projection (the small ones built in memory).
            let projection =
                path.split(separator: "?").dropFirst().first?.split(separator: "&")
                .filter { $0.hasPrefix("attributes=") || $0.hasPrefix("excludedAttributes=") }.joined(separator: "&") ?? ""
            for (gid, listed) in zip(groups, resources) {
                let byID = try streamedCall(agent, "GET", "/Groups/\(gid)" + (projection.isEmpty ? "" : "?\(projection)"))
                XCTAssertEqual(byID.chunked, gid == big, "\(path): \(gid)")
                XCTAssertTrue(sameJSON(listed, byID.json), "\(path): \(gid) as its GET gives it")
            }
        }
        let streamedPage = try streamedCall(agent, "GET", "/Groups?filter=" + q(#"displayName eq "big""#))

        // Pages that do not return members stay in memory (and never read the members index).
        for path in ["/Groups?excludedAttributes=members", "/Groups?attributes=displayName", "/Users?count=50"] {
            let got = try streamedCall(agent, "GET", path)
            XCTAssertEqual(got.status, 200, path)
            XCTAssertFalse(got.chunked, path)
        }
        // A page of groups holding 1,000 members or fewer in all is built in memory.
        let small = try streamedCall(agent, "GET", "/Groups?startIndex=3&count=2")
        XCTAssertFalse(small.chunked, small.head)
        XCTAssertEqual(small.json?["Resources"]?.arrayValue?.count, 2)

        // Back to 1,000 members: built in memory, the same as streamed but for the member removed.
        let removed = u[1_000]
        let patched = try agent.call("PATCH", "/Groups/\(big)", patchBody(#"{"op":"remove","path":"members[value eq \"\#(removed)\"]"}"#))
        XCTAssertTrue([200, 204].contains(patched.status), "\(patched.status)")
        for (query, _, _) in projected {
            let got = try streamedCall(agent, "GET", "/Groups/\(big)?\(query)")
            XCTAssertFalse(got.chunked, query)
            XCTAssertTrue(
                sameJSON(withoutMeta(got.json), withoutMeta(without(member: removed, streamedBodies[query] ?? nil))),
                "\(query): the streamed body is the in-memory one")
        }
        let inMemoryPage = try streamedCall(agent, "GET", "/Groups?filter=" + q(#"displayName eq "big""#))
        XCTAssertFalse(inMemoryPage.chunked)
        let strip = { (page: JSON?) in
            JSON.array((page?["Resources"]?.arrayValue ?? []).map { withoutMeta(without(member: removed, $0)) ?? .null })
        }
        XCTAssertTrue(sameJSON(strip(inMemoryPage.json), strip(streamedPage.json)), "the streamed page is the in-memory one")
        var envelope = try XCTUnwrap(inMemoryPage.json?.objectValue), streamedEnvelope = try XCTUnwrap(streamedPage.json?.objectValue)
        envelope["Resources"] = nil
        streamedEnvelope["Resources"] = nil
        XCTAssertEqual(envelope, streamedEnvelope, "the same envelope, in the same order")
        XCTAssertEqual(agent.stop(), 0)
    }
}
