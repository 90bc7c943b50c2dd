import XCTest

@testable import EdgeBroker

/// Broker ids come in creation order (so the tables keyed by them grow at
/// their end), stay 32 hex digits, and never repeat, also past 65,536 ids in
/// one millisecond.
final class BrokerIDTests: XCTestCase {
    func testIDsAscendAreHexAndUnique() {
        var all: [String] = []
        for n in [1, 3, 70_000, 1, 500] { all += newBrokerIDs(n) }
        all.append(secureID())
        XCTAssertEqual(all.count, 70_506)
        XCTAssertTrue(all.allSatisfy { $0.utf8.count == 32 && $0.utf8.allSatisfy { (48...57).contains($0) || (97...102).contains($0) } })
        for k in 1..<all.count where all[k - 1] >= all[k] {
            XCTFail("id \(k) (\(all[k])) does not follow \(all[k - 1])")
            break
        }
        XCTAssertEqual(Set(all).count, all.count)
        // The random half differs between ids of the same millisecond.
        XCTAssertNotEqual(all[0].suffix(16), all[1].suffix(16))
    }
}
