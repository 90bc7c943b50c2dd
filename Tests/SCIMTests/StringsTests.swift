import SCIM
import XCTest

/// The byte-level split of an event's `ref` (on every event applied, at the broker and at the agent).
final class SlashPartsTests: XCTestCase {
    func testSlashPartsAreSplitsParts() {
        for ref in [
            "/Users/u1", "Users/u1", "//Users//u1/", "/Groups/g-é/x", "", "/", "//", "/Users/", "a", "/a/b/c", "ü/ö", "/e\u{301}/x",
        ] {
            XCTAssertEqual(slashParts(ref), ref.split(separator: "/"), ref)
        }
        XCTAssertEqual(slashParts("/Users/2819c223"), ["Users", "2819c223"])
    }
}
