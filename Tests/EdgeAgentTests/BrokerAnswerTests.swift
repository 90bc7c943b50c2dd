import XCTest

@testable import EdgeAgent

/// What the agent takes from a broker's answer is bounded before it
/// becomes a timer: a `Retry-After` of 2^64 / 1000 s or more overflowed
/// the milliseconds and stopped the agent (relay and downlink alike).
final class BrokerAnswerTests: XCTestCase {
    func testABrokersRetryAfterIsCappedAtFiveMinutes() {
        XCTAssertEqual(brokerRetryAfter("7"), 7)
        XCTAssertEqual(brokerRetryAfter(" 0 "), 1, "at least a second: 0 would resend at once, in a loop")
        XCTAssertEqual(brokerRetryAfter("300"), 300)
        XCTAssertEqual(brokerRetryAfter("301"), 300)
        XCTAssertEqual(brokerRetryAfter("18446744073709552"), 300, "its milliseconds overflow 64 bits")
        XCTAssertEqual(brokerRetryAfter("18446744073709551615"), 300)
        XCTAssertNil(brokerRetryAfter("18446744073709551616"), "not a number of seconds: the default backoff")
        XCTAssertNil(brokerRetryAfter("Wed, 21 Oct 2026 07:28:00 GMT"))
        XCTAssertNil(brokerRetryAfter("-1"))
        XCTAssertNil(brokerRetryAfter(nil))
    }
}
