import EdgeTestSupport
import SCIM
import XCTest

@testable import EdgeBroker

/// A user's feed event copies the stored resource's bytes instead of
/// parsing and serialising it: the bytes are the ones serialising
/// `downlinkData` of the parsed resource gives, whatever the resource holds.
final class DownlinkBytesTests: XCTestCase {
    func testDownlinkBytesAreTheSerialisedDownlinkData() throws {
        let dir = TempDirectory()
        defer { dir.remove() }
        let store = try BrokerStore(path: dir.file("broker"))
        let ext = BrokerStore.sourceExtension
        let source: JSON = ["domain": "de", "agent": "spiffe://x", "id": "u1", "seq": 7]
        let resources: [JSONObject] = [
            ["schemas": ["urn:ietf:params:scim:schemas:core:2.0:User", .string(ext)], "id": "b1", "userName": "a", String(ext): source],
            [
                "id": "b2", "meta": ["resourceType": "User", "version": "W/\"3\""], "userName": "q\"uo}te{,[]\\",
                "name": ["givenName": "A", "familyName": "B {x}"], "emails": [["value": "a@b", "primary": true], ["value": "c,d"]],
                String(ext): source, "groups": [["value": "g1"]], "active": false, "n": .number(JSONNumber("-1.5e3")!), "nothing": .null,
            ],
            ["id": "b3", "userName": "no extension", "x-é": "ü", "META": "kept? no"],
            [
                "id": "b4", "Groups": [], "empty": [:], "list": [], ext.uppercased(): source,
                "title": .string(String(repeating: "x", count: 900)),
            ],
            [:],
        ]
        for r in resources {
            let stored = JSON.object(r).serialized()
            XCTAssertEqual(
                store.downlinkBytes(stored, domain: "de").map { String(decoding: $0, as: UTF8.self) },
                JSON.object(store.downlinkData(r, domain: "de")).text, JSON.object(r).text)
        }
        // Not such an object: the caller parses.
        XCTAssertNil(store.downlinkBytes(Array(#"{"a\"b":1}"#.utf8), domain: "de"))
        XCTAssertNil(store.downlinkBytes(Array("[1]".utf8), domain: "de"))
    }
}
