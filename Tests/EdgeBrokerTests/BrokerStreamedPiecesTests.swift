import EdgeHTTP
import EdgeStore
import EdgeTestSupport
import SCIM
import XCTest

@testable import EdgeBroker

/// What the read API holds while it streams a page of large groups: each
/// piece is at most one chunk of members from the index (4,096) and the
/// resources gathered before it (16 KiB), whatever the page's groups hold.
final class BrokerStreamedPiecesTests: XCTestCase {
    var dir: TempDirectory!
    override func setUp() { dir = TempDirectory("broker-pieces") }
    override func tearDown() { dir.remove() }

    func testAPageOfLargeGroupsIsSentAChunkOfMembersAtATime() throws {
        let store = try BrokerStore(path: dir.file("broker"))
        var fixture = ListFixture()
        try fixture.populate(store, users: 6_000)
        try fixture.apply(store, (0..<3).map { fixture.group($0, members: Array(0..<6_000)) }, ids: ["g-0", "g-1", "g-2"])
        let api = BrokerAPI(store: store, tokens: ["t"])
        for target in ["/scim/v2/Groups?count=3", "/scim/v2/Groups?attributes=members.value,displayName"] {
            let response = try api.route(HTTPRequest(method: "GET", target: target, headers: ["Authorization": "Bearer t"]))
            let stream = try XCTUnwrap(response.stream, "\(target): streamed")
            var body: [UInt8] = [], largest = 0, pieces = 0
            while let piece = try stream.next() {
                body += piece
                largest = max(largest, piece.count)
                pieces += 1
            }
            let page = try JSONParser.parse(body, limits: .stored)
            let groups = page["Resources"]?.arrayValue ?? []
            XCTAssertEqual(groups.map { $0["members"]?.arrayValue?.count }, [6_000, 6_000, 6_000], target)
            let member = groups.first?["members"]?.arrayValue?.map { $0.serialized().count }.max() ?? 0
            XCTAssertLessThanOrEqual(largest, 16_384 + 4_096 * (member + 1) + 1_024, "\(target): one chunk of members a piece")
            XCTAssertGreaterThanOrEqual(pieces, 18_000 / 4_096, target)
            XCTAssertLessThan(largest * 3, body.count, "\(target): no piece holds a group")
        }
        // A page without members is one body, its groups not read for members.
        let plain = try api.route(
            HTTPRequest(method: "GET", target: "/scim/v2/Groups?excludedAttributes=members", headers: ["Authorization": "Bearer t"]))
        XCTAssertNil(plain.stream)
        XCTAssertEqual(store.lastListCost.memberReads, 0)
    }
}
