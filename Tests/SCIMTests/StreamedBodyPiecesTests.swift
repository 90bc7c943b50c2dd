import SCIM
import XCTest

/// The pieces the agent and the broker stream large groups with
/// (`StreamedBody.swift`): what they join to is what the in-memory build
/// serialises.
final class StreamedBodyPiecesTests: XCTestCase {
    func joined(_ pieces: BodyPieces) throws -> (body: [UInt8], count: Int) {
        var body: [UInt8] = [], n = 0
        while let piece = try pieces() {
            body += piece
            n += 1
        }
        return (body, n)
    }

    /// A page whose items are each one piece joins to the bytes
    /// `makeListResponse` gives (envelope, order, cursors, empty page).
    func testAStreamedListResponseIsTheInMemoryOne() throws {
        let items: [JSONObject] = (0..<500).map { ["id": .string("id-\($0)"), "displayName": .string("group \($0)")] }
        for page in [
            ListPage(items: items[...], totalResults: 900, startIndex: 3),
            ListPage(items: items[..<1], totalResults: 1, nextCursor: "n1", previousCursor: "p0"),
            ListPage(items: items[..<0], totalResults: 0, startIndex: 1),
        ] {
            let streamed = try joined(streamedListResponse(page) { onePiece(JSON.object($0).serialized()) })
            XCTAssertEqual(
                String(decoding: streamed.body, as: UTF8.self),
                String(decoding: makeListResponse(page) { .object($0) }.serialized(), as: UTF8.self))
            // Small resources are gathered into pieces of about 16 KiB, not one each.
            XCTAssertLessThanOrEqual(streamed.count, 1 + streamed.body.count / 16_384)
        }
    }

    /// A resource whose members follow it, as `storedArrayPieces` sends them.
    func testAStreamedResourceIsTheResourceWithItsMembers() throws {
        let group: JSONObject = ["schemas": [.string(SchemaURN.group)], "id": "g", "displayName": "G"]
        let members = onePiece(Array(#","members":[{"value":"a"},{"value":"b"}]}"#.utf8))
        var expected = group
        expected["members"] = [["value": "a"], ["value": "b"]]
        XCTAssertEqual(
            try JSONParser.parse(joined(streamedResource(group, members: members)).body), .object(expected))
    }

    /// `memberElement` applied to each member is what the projection does to
    /// the whole array; nil when it keeps the members whole.
    func testMemberElementProjectsOneMemberAsTheWholeArray() throws {
        let members: [JSON] = [
            ["value": "a", "display": "A", "type": "User", "$ref": "https://x/Users/a"], ["value": "b", "type": "Group"],
            ["value": "c"],
        ]
        let group: JSONObject = ["schemas": [.string(SchemaURN.group)], "id": "g", "displayName": "G", "members": .array(members)]
        for (attributes, excluded, whole) in [
            ([], [], true), (["members"], [], true), ([], ["displayName"], true), (["members.value"], [], false),
            (["members.display"], [], false), ([], ["members.display"], false), ([], ["members.type", "members.$ref"], false),
        ] as [([String], [String], Bool)] {
            let projection = try Projection(attributes: attributes, excluded: excluded, registry: registry, type: groupType)
            XCTAssertTrue(projection.returnsMembers, "\(attributes) \(excluded)")
            let element = projection.memberElement
            XCTAssertEqual(element == nil, whole, "\(attributes) \(excluded)")
            let one = try members.compactMap { m in try element.map { try $0(m.serialized()) } ?? m.serialized() }
            let streamed =
                one.isEmpty
                ? nil
                : try JSONParser.parse(Array(("[" + one.map { String(decoding: $0, as: UTF8.self) }.joined(separator: ",") + "]").utf8))
            XCTAssertEqual(streamed, projection.apply(to: group)["members"], "\(attributes) \(excluded)")
        }
        for (attributes, excluded) in [(["displayName"], []), ([], ["members"])] as [([String], [String])] {
            XCTAssertFalse(try Projection(attributes: attributes, excluded: excluded, registry: registry, type: groupType).returnsMembers)
        }
        XCTAssertFalse(Projection.none(registry: registry, type: userType).returnsMembers, "a user has no members")
    }
}
