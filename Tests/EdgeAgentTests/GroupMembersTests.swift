import EdgeAgent
import EdgeStore
import EdgeTestSupport
import Foundation
import SCIM
import XCTest

let groupSchema = #"["urn:ietf:params:scim:schemas:core:2.0:Group"]"#
let patchSchema = #"["urn:ietf:params:scim:api:messages:2.0:PatchOp"]"#

func patchBody(_ operations: String) -> String { #"{"schemas":\#(patchSchema),"Operations":[\#(operations)]}"# }

func membersJSON(_ ids: some Sequence<String>) -> String {
    "[" + ids.map { #"{"value":"\#($0)"}"# }.joined(separator: ",") + "]"
}

/// A group's members kept as an index (`groupMembers`) rather than an array
/// inside the stored group: large groups read back, PATCH forms work from
/// the index, projections and filters on members, and the migration of a
/// store that held members inline.
final class GroupMembersTests: XCTestCase {
    /// Creates `n` users through `/Bulk` (1,000 per request); returns their ids.
    func users(_ n: Int, prefix: String, post: (String) throws -> (Int, String)) throws -> [String] {
        var ids: [String] = []
        var k = 0
        while k < n {
            let batch = k..<min(n, k + 1000)
            let ops = batch.map { i in
                #"{"method":"POST","path":"/Users","bulkId":"b\#(i)","data":\#(userBody(prefix + String(i)))}"#
            }.joined(separator: ",")
            let (status, body) = try post(#"{"schemas":["urn:ietf:params:scim:api:messages:2.0:BulkRequest"],"Operations":[\#(ops)]}"#)
            XCTAssertEqual(status, 200)
            let r = try JSONParser.parse(Array(body.utf8), limits: .stored)
            for op in r["Operations"]?.arrayValue ?? [] {
                if let location = op["location"]?.stringValue { ids.append(String(location.split(separator: "/").last!)) }
            }
            k = batch.upperBound
        }
        XCTAssertEqual(ids.count, n)
        return ids
    }

    /// The member ids of a group response body, parsed without request limits.
    func memberIDs(_ body: String) throws -> [String] {
        let group = try JSONParser.parse(Array(body.utf8), limits: .stored)
        return group["members"]?.arrayValue?.compactMap { $0["value"]?.stringValue } ?? []
    }

    /// A group grown by PATCH in chunks past every request limit (more than
    /// 10,000 members, the parser's array limit) reads back whole, its
    /// members' GETs and a user list answer 200, the stored group stays
    /// small (the members are not in it, so a change does not rewrite
    /// them), and after a SIGKILL and a restart it reads back whole again.
    func testAGroupGrownPastEveryLimitReadsBackAndSurvivesARestart() throws {
        let dir = TempDirectory("edge-members")
        defer { dir.remove() }
        func start() throws -> (ChildProcess, Int) {
            let child = try ChildProcess(
                productsDirectory + "/scim-edge",
                ["serve", "--data-dir", dir.file("data"), "--listen", "127.0.0.1:0", "--token", "t", "--admin-listen", "none"])
            let line = try XCTUnwrap(child.waitForLine("scim-edge"))
            return (child, Int(line.split(separator: " ")[4].split(separator: ":")[1])!)
        }
        var (child, port) = try start()
        var lastHead = ""
        func call(_ method: String, _ path: String, _ body: String? = nil) throws -> (Int, String) {
            let client = try RawClient(port: port, timeoutSeconds: 30)
            var head = "\(method) /scim/v2\(path) HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer t\r\nConnection: close\r\n"
            if let body { head += "Content-Type: application/scim+json\r\nContent-Length: \(body.utf8.count)\r\n" }
            _ = client.send(head + "\r\n" + (body ?? ""))
            let r = try XCTUnwrap(client.readResponses(1).first)
            lastHead = r.head
            return (r.status, r.body)
        }
        let n = 10_500
        let ids = try users(n, prefix: "m") { try call("POST", "/Bulk", $0) }
        let created = try call("POST", "/Groups", #"{"schemas":\#(groupSchema),"displayName":"all staff"}"#)
        XCTAssertEqual(created.0, 201)
        let gid = try XCTUnwrap(try JSONParser.parse(Array(created.1.utf8))["id"]?.stringValue)
        for chunk in stride(from: 0, to: n, by: 2_500) {
            let value = membersJSON(ids[chunk..<min(n, chunk + 2_500)])
            let r = try call("PATCH", "/Groups/\(gid)", patchBody(#"{"op":"add","path":"members","value":\#(value)}"#))
            XCTAssertTrue(r.0 == 200 || r.0 == 204, "PATCH at \(chunk) members: \(r.0) \(r.1.prefix(300))")
        }
        func checkReadsBack(_ when: String) throws {
            let group = try call("GET", "/Groups/\(gid)")
            XCTAssertEqual(group.0, 200, when)
            XCTAssertTrue(lastHead.contains("Transfer-Encoding: chunked"), "\(when): the members are streamed: \(lastHead)")
            XCTAssertTrue(lastHead.contains("ETag: "), lastHead)
            XCTAssertEqual(Set(try memberIDs(group.1)), Set(ids), "\(when): every member reads back")
            let member = try call("GET", "/Users/\(ids[n - 1])")
            XCTAssertEqual(member.0, 200, when)
            let groups = try JSONParser.parse(Array(member.1.utf8))["groups"]?.arrayValue ?? []
            XCTAssertEqual(groups.compactMap { $0["value"]?.stringValue }, [gid], when)
            XCTAssertEqual(groups.first?["display"], "all staff", when)
            let list = try call("GET", "/Users?count=5")
            XCTAssertEqual(list.0, 200, when)
            XCTAssertEqual(try JSONParser.parse(Array(list.1.utf8))["Resources"]?.arrayValue?.count, 5, when)
            let listed = try call("GET", "/Groups?filter=displayName%20eq%20%22all%20staff%22")
            XCTAssertEqual(listed.0, 200, when)
            let listedGroup = try JSONParser.parse(Array(listed.1.utf8), limits: .stored)["Resources"]?.arrayValue?.first
            XCTAssertEqual(listedGroup?["members"]?.arrayValue?.count, n, "\(when): a list renders the members too")
        }
        try checkReadsBack("before the restart")
        // One more member, and one fewer, at this size.
        let removed = ids[17]
        XCTAssertEqual(
            try call("PATCH", "/Groups/\(gid)", patchBody(#"{"op":"remove","path":"members[value eq \"\#(removed)\"]"}"#)).0, 204)
        XCTAssertEqual(
            try call("PATCH", "/Groups/\(gid)", patchBody(#"{"op":"add","path":"members","value":[{"value":"\#(removed)"}]}"#)).0, 204)

        // The stored group holds no members: a change rewrites a few hundred bytes, not the 10,500 members.
        do {
            let store = try AgentStore(path: dir.file("data"), registry: .standard)
            let resources = try store.environment.openDatabase("resources")
            let stored = try XCTUnwrap(try store.environment.read { txn in try txn.get(resources, Array("Group/\(gid)".utf8)) })
            XCTAssertLessThan(stored.count, 1024, String(decoding: stored, as: UTF8.self).prefix(300).description)
            XCTAssertFalse(String(decoding: stored, as: UTF8.self).contains("members"))
        }

        child.signal(SIGKILL)
        XCTAssertNotNil(child.waitForExit())
        (child, port) = try start()
        try checkReadsBack("after SIGKILL and a restart")
        child.signal(SIGTERM)
        XCTAssertEqual(child.waitForExit(), 0)
    }

    func makeGroup(_ agent: AgentHarness, _ name: String, _ members: [String]) throws -> String {
        let r = try agent.call(
            "POST", "/Groups", #"{"schemas":\#(groupSchema),"displayName":"\#(name)","members":\#(membersJSON(members))}"#)
        XCTAssertEqual(r.status, 201, r.raw)
        return try XCTUnwrap(r.body?["id"]?.stringValue)
    }

    func members(_ agent: AgentHarness, _ gid: String) throws -> Set<String> {
        let r = try agent.call("GET", "/Groups/\(gid)")
        XCTAssertEqual(r.status, 200, r.raw)
        return Set(try memberIDs(r.raw))
    }

    /// PATCH forms IdPs send, each answered from the index: remove by
    /// `members[value eq "…"]` (Okta), by a value list (Entra), by a filter
    /// on another sub-attribute; add of a member already there; an operation
    /// that fails leaves every member as it was.
    func testPatchRemovesByValueFilterAndByValueList() throws {
        let agent = try AgentHarness()
        defer { XCTAssertEqual(agent.stop(), 0) }
        let u = try users(6, prefix: "p") { body in
            let r = try agent.call("POST", "/Bulk", body)
            return (r.status, r.raw)
        }
        let other = try makeGroup(agent, "other", [u[0]])
        let gid = try makeGroup(agent, "g", Array(u[0..<5]))
        XCTAssertEqual(try members(agent, gid), Set(u[0..<5]))

        let byFilter = try agent.call("PATCH", "/Groups/\(gid)", patchBody(#"{"op":"remove","path":"members[value eq \"\#(u[1])\"]"}"#))
        XCTAssertEqual(byFilter.status, 200, byFilter.raw)
        XCTAssertEqual(Set(try memberIDs(byFilter.raw)), [u[0], u[2], u[3], u[4]], "the response renders the members from the index")
        XCTAssertEqual(try members(agent, gid), [u[0], u[2], u[3], u[4]])

        let byList = try agent.call(
            "PATCH", "/Groups/\(gid)", patchBody(#"{"op":"Remove","path":"members","value":[{"value":"\#(u[2])"},{"value":"\#(u[3])"}]}"#))
        XCTAssertEqual(byList.status, 200, byList.raw)
        XCTAssertEqual(try members(agent, gid), [u[0], u[4]])

        // Adding a member already there keeps one entry; a path-less add with members and displayName does both.
        let again = try agent.call(
            "PATCH", "/Groups/\(gid)",
            patchBody(#"{"op":"add","value":{"displayName":"g2","members":[{"value":"\#(u[0])"},{"value":"\#(u[5])"}]}}"#))
        XCTAssertEqual(again.status, 200, again.raw)
        XCTAssertEqual(again.body?["displayName"], "g2")
        XCTAssertEqual(try memberIDs(again.raw).sorted(), [u[0], u[4], u[5]].sorted())

        // All or nothing: a valid add, then a member that does not exist.
        let failed = try agent.call(
            "PATCH", "/Groups/\(gid)",
            patchBody(
                #"{"op":"add","path":"members","value":[{"value":"\#(u[1])"}]},{"op":"add","path":"members","value":[{"value":"nobody"}]}"#)
        )
        XCTAssertEqual(failed.status, 400)
        XCTAssertEqual(failed.body?["scimType"], "invalidValue")
        XCTAssertTrue(failed.body?["detail"]?.stringValue?.contains("Operations[1]") ?? false, failed.raw)
        XCTAssertEqual(try members(agent, gid), [u[0], u[4], u[5]], "the failed PATCH changed nothing")
        let bad = try agent.call(
            "PATCH", "/Groups/\(gid)", patchBody(#"{"op":"add","path":"members","value":[{"value":"\#(u[1])","type":"Robot"}]}"#))
        XCTAssertEqual(bad.status, 400, bad.raw)
        XCTAssertEqual(try members(agent, gid), [u[0], u[4], u[5]])

        // `members.value` without a filter names no member: refused, nothing changes.
        let unfiltered = try agent.call(
            "PATCH", "/Groups/\(gid)", patchBody(#"{"op":"replace","path":"members.value","value":"\#(u[1])"}"#))
        XCTAssertEqual(unfiltered.status, 400, unfiltered.raw)
        XCTAssertEqual(try members(agent, gid), [u[0], u[4], u[5]])

        // A filter on another sub-attribute walks the group.
        XCTAssertEqual(
            try agent.call(
                "PATCH", "/Groups/\(gid)", patchBody(#"{"op":"add","path":"members","value":[{"value":"\#(other)","type":"Group"}]}"#)
            ).status, 200)
        XCTAssertEqual(
            try agent.call("PATCH", "/Groups/\(gid)", patchBody(#"{"op":"remove","path":"members[type eq \"Group\"]"}"#)).status, 200)
        XCTAssertEqual(try members(agent, gid), [u[0], u[4], u[5]])

        // The user's groups follow; deleting a user removes it from every group.
        let user0 = try agent.call("GET", "/Users/\(u[0])")
        XCTAssertEqual(Set(user0.body?["groups"]?.arrayValue?.compactMap { $0["value"]?.stringValue } ?? []), [gid, other])
        XCTAssertEqual(try agent.call("DELETE", "/Users/\(u[0])").status, 204)
        XCTAssertEqual(try members(agent, gid), [u[4], u[5]])
        XCTAssertEqual(try members(agent, other), [])

        // PUT replaces the whole set; remove without a value empties it.
        let put = try agent.call(
            "PUT", "/Groups/\(gid)", #"{"schemas":\#(groupSchema),"displayName":"g","members":\#(membersJSON([u[1], u[5]]))}"#)
        XCTAssertEqual(put.status, 200, put.raw)
        XCTAssertEqual(try members(agent, gid), [u[1], u[5]])
        XCTAssertEqual(try agent.call("GET", "/Users/\(u[4])").body?["groups"], nil, "u4 left with the PUT")
        XCTAssertEqual(try agent.call("PATCH", "/Groups/\(gid)", patchBody(#"{"op":"remove","path":"members"}"#)).status, 200)
        XCTAssertEqual(try members(agent, gid), [])
        XCTAssertEqual(try agent.call("GET", "/Users/\(u[1])").body?["groups"], nil)
    }

    /// `excludedAttributes=members` and `attributes=displayName` never read
    /// the members index (shown with an index entry that cannot be parsed:
    /// those reads answer 200, a read of the members does not);
    /// `filter=members.value eq "X"` lists the groups holding X; a PATCH of a
    /// group above `patchResponseMaxMembers` answers 204.
    func testProjectionsAndFiltersOnMembers() throws {
        var agent: AgentHarness? = try AgentHarness { $0.endpoint.patchResponseMaxMembers = 3 }
        let u = try users(5, prefix: "f") { body in
            let r = try agent!.call("POST", "/Bulk", body)
            return (r.status, r.raw)
        }
        let g1 = try makeGroup(agent!, "g1", [u[0], u[1]])
        let g2 = try makeGroup(agent!, "g2", [u[1], u[2], u[3], u[4]])
        _ = try makeGroup(agent!, "g3", [u[2]])

        func ids(_ query: String) throws -> [String] {
            let r = try agent!.call("GET", "/Groups?\(query)")
            XCTAssertEqual(r.status, 200, r.raw)
            return (r.body?["Resources"]?.arrayValue ?? []).compactMap { $0["id"]?.stringValue }.sorted()
        }
        let q = { (s: String) in s.addingPercentEncoding(withAllowedCharacters: .alphanumerics)! }
        XCTAssertEqual(try ids("filter=" + q(#"members.value eq "\#(u[1])""#)), [g1, g2].sorted())
        XCTAssertEqual(try ids("filter=" + q(#"members eq "\#(u[0])""#)), [g1])
        XCTAssertEqual(try ids("filter=" + q(#"members[value eq "\#(u[4])"]"#)), [g2])
        XCTAssertEqual(try ids("filter=" + q(#"members.value eq "\#(u[1])" and displayName eq "g2""#)), [g2])
        XCTAssertEqual(try ids("filter=" + q(#"members.value eq "\#(u[0])" or members.value eq "\#(u[4])""#)), [g1, g2].sorted())
        XCTAssertEqual(try ids("filter=" + q(#"not (members.value eq "\#(u[2])")"#)), [g1], "a scan that reads the members")

        // Above the response limit, PATCH answers 204; asking for no members gives 200 without them.
        let big = try agent!.call("PATCH", "/Groups/\(g2)", patchBody(#"{"op":"add","path":"members","value":[{"value":"\#(u[0])"}]}"#))
        XCTAssertEqual(big.status, 204, big.raw)
        XCTAssertNotNil(big.header("ETag"))
        let small = try agent!.call(
            "PATCH", "/Groups/\(g2)?excludedAttributes=members", patchBody(#"{"op":"replace","path":"displayName","value":"two"}"#))
        XCTAssertEqual(small.status, 200, small.raw)
        XCTAssertNil(small.body?["members"])
        XCTAssertEqual(small.body?["displayName"], "two")
        XCTAssertEqual(agent!.stop(), 0)

        // An entry of g2's members that cannot be parsed: what does not read members still answers.
        let path = agent!.dir.file("data")
        do {
            let store = try agent!.openStore()
            let index = try store.environment.openDatabase("groupMembers")
            try store.environment.write { txn in try txn.put(index, Array(g2.utf8) + [0] + Array(u[1].utf8), Array("{not json".utf8)) }
        }
        let again = try AgentHarness { $0.dataDirectory = path }
        for query in ["excludedAttributes=members", "attributes=displayName"] {
            let r = try again.call("GET", "/Groups/\(g2)?\(query)")
            XCTAssertEqual(r.status, 200, "\(query): \(r.raw)")
            XCTAssertNil(r.body?["members"], query)
            XCTAssertEqual(r.body?["displayName"], "two")
            let list = try again.call("GET", "/Groups?\(query)")
            XCTAssertEqual(list.status, 200, "\(query): \(list.raw)")
            XCTAssertEqual(list.body?["Resources"]?.arrayValue?.count, 3)
        }
        XCTAssertEqual(try again.call("GET", "/Users/\(u[1])").status, 200, "a member's groups do not read the groups' members")
        XCTAssertEqual(try again.call("GET", "/Groups/\(g2)?attributes=members").status, 500, "the members are read here")
        XCTAssertEqual(again.stop(), 0)
        agent = nil
    }

    /// A store written before the index (layout 1: `members` inline in the
    /// stored group, including a member the index cannot key) is migrated
    /// once when opened: the groups read back with their members, the
    /// stored groups no longer hold them, and writes work on the index.
    func testAStoreWithInlineMembersIsMigratedAtOpen() throws {
        var agent: AgentHarness? = try AgentHarness()
        let u = try users(3, prefix: "o") { body in
            let r = try agent!.call("POST", "/Bulk", body)
            return (r.status, r.raw)
        }
        let gid = try makeGroup(agent!, "old", [u[0], u[1], u[2]])
        let version = try XCTUnwrap(try agent!.call("GET", "/Groups/\(gid)").header("ETag"))
        XCTAssertEqual(agent!.stop(), 0)
        let path = agent!.dir.file("data")

        // Rewrite it as layout 1 wrote it: the members inside the group's JSON, meta last, no index.
        do {
            let store = try agent!.openStore()
            let env = store.environment
            let resources = try env.openDatabase("resources"), meta = try env.openDatabase("meta")
            let index = try env.openDatabase("groupMembers")
            try env.write { txn in
                let key = Array("Group/\(gid)".utf8)
                var group = try XCTUnwrap(try JSONParser.parse(XCTUnwrap(try txn.get(resources, key))).objectValue)
                let metaValue = group["meta"]
                group["meta"] = nil
                group["members"] = .array(u.map { ["value": .string($0), "type": "User"] })
                group["meta"] = metaValue
                try txn.put(resources, key, JSON.object(group).serialized())
                try txn.clear(index)
                try txn.put(meta, Array("schema".utf8), UInt64(1).bigEndianBytes)
            }
        }
        let migrated = try AgentHarness { $0.dataDirectory = path }
        let read = try migrated.call("GET", "/Groups/\(gid)")
        XCTAssertEqual(read.status, 200, read.raw)
        XCTAssertEqual(Set(try memberIDs(read.raw)), Set(u))
        XCTAssertEqual(read.header("ETag"), version, "the migration is not a change of the group")
        XCTAssertEqual(
            try migrated.call("GET", "/Users/\(u[2])").body?["groups"]?.arrayValue?.first?["value"]?.stringValue, gid)
        XCTAssertEqual(
            try migrated.call("PATCH", "/Groups/\(gid)", patchBody(#"{"op":"remove","path":"members[value eq \"\#(u[0])\"]"}"#)).status,
            200)
        XCTAssertEqual(try members(migrated, gid), [u[1], u[2]])
        XCTAssertEqual(migrated.stop(), 0)

        let store = try AgentStore(path: path, registry: .standard)
        let resources = try store.environment.openDatabase("resources"), meta = try store.environment.openDatabase("meta")
        try store.environment.read { txn in
            let stored = String(decoding: try txn.get(resources, Array("Group/\(gid)".utf8)) ?? [], as: UTF8.self)
            XCTAssertFalse(stored.contains("members"), stored)
            XCTAssertEqual(try txn.get(meta, Array("schema".utf8)), UInt64(2).bigEndianBytes)
        }
        XCTAssertEqual(
            Set(
                try store.get(SchemaRegistry.standard.resourceType("Group")!, gid)?["members"]?.arrayValue?.compactMap {
                    $0["value"]?.stringValue
                } ?? []), [u[1], u[2]])
        agent = nil
    }
}
