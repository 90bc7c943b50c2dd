import EdgeBroker
import EdgeTestSupport
import Foundation
import SCIM
import XCTest

/// Where two documents differ, briefly (their top-level names, else the first name whose values differ).
func difference(_ a: JSON?, _ b: JSON?) -> String {
    let x = a?.objectValue ?? [:], y = b?.objectValue ?? [:]
    if Set(x.members.map(\.key)) != Set(y.members.map(\.key)) { return "\(x.members.map(\.key)) vs \(y.members.map(\.key))" }
    guard let name = x.members.first(where: { !sameJSON($0.value, y[$0.key]) })?.key else { return "none" }
    return "\(name): \(String(describing: x[name]).prefix(300)) vs \(String(describing: y[name]).prefix(300))"
}

extension BrokerListAPITests {
    /// A response of the read API over its socket: whether it came chunked, and its body parsed without request limits.
    func streamedAPI(_ port: Int, _ path: String, method: String = "GET", body: String = "") throws -> (
        status: Int, chunked: Bool, head: String, json: JSON?
    ) {
        let c = try RawClient(port: port)
        c.send(
            "\(method) /scim/v2\(path) HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer api-token\r\nConnection: close\r\n"
                + "Content-Type: application/scim+json\r\nContent-Length: \(body.utf8.count)\r\n\r\n\(body)")
        let r = try XCTUnwrap(c.readResponses(1).first)
        let json = r.body.isEmpty ? nil : try JSONParser.parse(Array(r.body.utf8), limits: .stored)
        return (r.status, r.head.contains("Transfer-Encoding: chunked"), r.head, json)
    }

    /// A list or search page of the read API whose groups hold more than
    /// 1,000 members together (`streamedArrayAbove`) is streamed: chunked,
    /// every member of each, each group as its GET by id gives it (built in
    /// memory for a small group, streamed for a large one), with or without
    /// a projection of the members; a group without members too. A page of
    /// groups holding 1,000 or fewer, or without members, is built in memory.
    func testReadAPIStreamsPagesWhoseGroupsHoldManyMembers() throws {
        let (process, apiPort) = try startAPI(
            groups: 2, bigGroup: 3_000,
            more: [("g-m0", "mid 0", 0..<600), ("g-m1", "mid 1", 600..<1_001), ("g-none", "none", 0..<0)])
        let everyone = Set((0..<3_000).map(ListFixture.brokerID))
        let search = #"{"schemas":["urn:ietf:params:scim:api:messages:2.0:SearchRequest"],"#
        // (path, method, body, the page's groups, the projection its GETs by id take)
        let pages: [(String, String, String, [String], String)] = [
            ("/Groups?filter=displayName%20eq%20%22all%20staff%22", "GET", "", ["g-big"], ""),
            (
                "/Groups?filter=displayName%20eq%20%22all%20staff%22&attributes=members.value", "GET", "", ["g-big"],
                "attributes=members.value"
            ),
            ("/Groups?count=10", "GET", "", ["g-0", "g-1", "g-big", "g-m0", "g-m1", "g-none"], ""),
            ("/Groups?startIndex=4&count=3", "GET", "", ["g-m0", "g-m1", "g-none"], ""),
            (
                "/Groups?startIndex=4&count=3&excludedAttributes=members.display", "GET", "", ["g-m0", "g-m1", "g-none"],
                "excludedAttributes=members.display"
            ),
            ("/Groups?startIndex=4&count=3&attributes=members.value", "GET", "", ["g-m0", "g-m1", "g-none"], "attributes=members.value"),
            ("/Groups/.search", "POST", search + #""filter":"displayName sw \"mid\"","count":5}"#, ["g-m0", "g-m1"], ""),
            (
                "/Groups/.search", "POST", search + #""filter":"displayName eq \"all staff\"","attributes":["displayName","members"]}"#,
                ["g-big"], "attributes=displayName,members"
            ),
        ]
        for (path, method, body, groups, projection) in pages {
            let got = try streamedAPI(apiPort, path, method: method, body: body)
            XCTAssertEqual(got.status, 200, "\(path): \(String(describing: got.json))")
            XCTAssertTrue(got.chunked, "\(path): the page's groups hold more than 1,000 members: \(got.head)")
            let resources = got.json?["Resources"]?.arrayValue ?? []
            XCTAssertEqual(resources.compactMap { $0["id"]?.stringValue }, groups, path)
            XCTAssertEqual(got.json?["itemsPerPage"], .int(groups.count), path)
            for (gid, listed) in zip(groups, resources) {
                // The page of that group alone: built in memory but for g-big's (streamed alone too).
                let alone = try streamedAPI(apiPort, "/Groups?filter=id%20eq%20%22\(gid)%22" + (projection.isEmpty ? "" : "&\(projection)"))
                XCTAssertEqual(alone.status, 200)
                XCTAssertEqual(alone.chunked, gid == "g-big", "\(path): \(gid)")
                let one = alone.json?["Resources"]?.arrayValue?.first
                XCTAssertTrue(sameJSON(listed, one), "\(path): \(gid) as a page of its own gives it: \(difference(listed, one))")
                if !projection.isEmpty {
                    // A GET by id without a query answers the group as stored (the source extension whole):
                    // with a projection, as a list does.
                    let byID = try streamedAPI(apiPort, "/Groups/\(gid)?\(projection)")
                    XCTAssertEqual(byID.chunked, gid == "g-big", "\(path): \(gid)")
                    XCTAssertTrue(sameJSON(listed, byID.json), "\(path): \(gid) as its GET gives it: \(difference(listed, byID.json))")
                }
                if gid == "g-big" {
                    XCTAssertEqual(Set(listed["members"]?.arrayValue?.compactMap { $0["value"]?.stringValue } ?? []), everyone, path)
                }
                if projection.hasPrefix("attributes=members.value") {
                    XCTAssertTrue(
                        (listed["members"]?.arrayValue ?? []).allSatisfy { $0.objectValue?.members.map(\.key) == ["value"] }, path)
                }
            }
        }
        // Built in memory: pages of groups holding 1,000 members or fewer, pages without members.
        for path in ["/Groups?startIndex=5&count=2", "/Groups?excludedAttributes=members", "/Groups?attributes=displayName"] {
            let got = try streamedAPI(apiPort, path)
            XCTAssertEqual(got.status, 200, path)
            XCTAssertFalse(got.chunked, "\(path): \(got.head)")
        }
        let small = try streamedAPI(apiPort, "/Groups?startIndex=5&count=2")
        XCTAssertEqual(small.json?["Resources"]?.arrayValue?.map { $0["members"]?.arrayValue?.count }, [401, 0])
        // The streamed page of the small groups is the in-memory one of each, envelope and all.
        let streamed = try streamedAPI(apiPort, "/Groups?startIndex=4&count=3")
        let oneByOne = try (4...6).map { try streamedAPI(apiPort, "/Groups?startIndex=\($0)&count=1") }
        XCTAssertTrue(oneByOne.allSatisfy { !$0.chunked })
        XCTAssertTrue(
            sameJSON(
                streamed.json?["Resources"], .array(oneByOne.compactMap { $0.json?["Resources"]?.arrayValue?.first })))
        var envelope = try XCTUnwrap(streamed.json?.objectValue)
        envelope["Resources"] = nil
        XCTAssertEqual(envelope.members.map(\.key), ["schemas", "totalResults", "itemsPerPage", "startIndex"])
        XCTAssertEqual(envelope["totalResults"], 6)
        XCTAssertEqual(envelope["startIndex"], 4)
        process.signal(SIGTERM)
        XCTAssertEqual(process.waitForExit(), 0)
    }
}
