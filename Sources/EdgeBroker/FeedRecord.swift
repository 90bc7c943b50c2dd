import EdgeStore
import SCIM

/// What the hop of a downlink event's commit needs (`recordCommits`): the
/// resource, its trace, the kind of event and its times (Unix ms).
///
/// Stored in front of the event's JSON in the `downlink` value, so that one
/// record is written and one deleted per event and nothing is parsed at
/// the acknowledgement (`FeedRecord`). Brokers before 2026-12 kept it as
/// JSON in `downlinkTrail`; such records are still read (`legacy`).
struct FeedTrail: Equatable {
    var brokerID: String
    var trace: String
    var event: String
    var issued: Int64
    var accepted: Int64
    var applied: Int64

    /// A `downlinkTrail` record of an older broker (JSON).
    init?(legacy bytes: [UInt8]) {
        guard let r = try? JSONParser.parse(bytes, limits: .stored).objectValue, let id = r["id"]?.stringValue else { return nil }
        func time(_ k: String) -> Int64 { r[k]?.numberValue?.integer ?? 0 }
        self.init(
            brokerID: id, trace: r["trace"]?.stringValue ?? "", event: r["event"]?.stringValue ?? "change", issued: time("issued"),
            accepted: time("accepted"), applied: time("applied"))
    }

    init(brokerID: String, trace: String, event: String, issued: Int64, accepted: Int64, applied: Int64) {
        (self.brokerID, self.trace, self.event) = (brokerID, trace, event)
        (self.issued, self.accepted, self.applied) = (issued, accepted, applied)
    }
}

/// A `downlink` value: the event's JSON as the destination receives it,
/// after a binary `FeedTrail` when the event names a resource.
///
/// Layout: `0x01`, then brokerID, trace and event kind, each a 4-byte
/// big-endian length and its UTF-8, then issued, accepted and applied as
/// 8-byte big-endian integers, then the JSON. A value that starts with `{`
/// is JSON alone (the end of a resync, which names no resource, or an
/// event stored by an older broker, whose trail is in `downlinkTrail`).
enum FeedRecord {
    static let marker: UInt8 = 0x01

    /// Starts a value with `trail` (nil: JSON alone); the caller appends the JSON.
    static func start(_ trail: FeedTrail?, jsonCapacity: Int) -> [UInt8] {
        var out: [UInt8] = []
        guard let trail else {
            out.reserveCapacity(jsonCapacity)
            return out
        }
        let id = trail.brokerID.utf8, trace = trail.trace.utf8, event = trail.event.utf8
        out.reserveCapacity(1 + 12 + id.count + trace.count + event.count + 24 + jsonCapacity)
        out.append(marker)
        for s in [id, trace, event] {
            out += UInt32(clamping: s.count).bigEndianBytes
            out += s
        }
        for t in [trail.issued, trail.accepted, trail.applied] { out += UInt64(bitPattern: t).bigEndianBytes }
        return out
    }

    /// The trail of a value (nil: none in it) and where its JSON starts;
    /// nil when the value is neither layout.
    static func split(_ value: [UInt8]) -> (trail: FeedTrail?, json: Int)? {
        guard let first = value.first else { return nil }
        guard first == marker else { return first == UInt8(ascii: "{") ? (nil, 0) : nil }
        var at = 1
        func string() -> String? {
            guard let n = integer(4).map(Int.init), n <= value.count - at else { return nil }
            defer { at += n }
            return String(decoding: value[at..<at + n], as: UTF8.self)
        }
        func integer(_ width: Int) -> UInt64? {
            guard value.count - at >= width else { return nil }
            var v: UInt64 = 0
            for b in value[at..<at + width] { v = v << 8 | UInt64(b) }
            at += width
            return v
        }
        guard let id = string(), let trace = string(), let event = string(), let issued = integer(8), let accepted = integer(8),
            let applied = integer(8), at < value.count
        else { return nil }
        let trail = FeedTrail(
            brokerID: id, trace: trace, event: event, issued: Int64(bitPattern: issued), accepted: Int64(bitPattern: accepted),
            applied: Int64(bitPattern: applied))
        return (trail, at)
    }

    /// The event's JSON of a value (the whole value when it is neither layout).
    static func json(_ value: [UInt8]) -> ArraySlice<UInt8> {
        value[(split(value)?.json ?? 0)...]
    }
}

/// Appends `n` in decimal, as `JSONNumber(integer:)` writes it.
func appendDecimal(_ n: Int64, to out: inout [UInt8]) {
    if n < 0 { out.append(UInt8(ascii: "-")) }
    var m = n.magnitude
    var digits:
        (
            UInt8, UInt8, UInt8, UInt8, UInt8, UInt8, UInt8, UInt8, UInt8, UInt8, UInt8, UInt8, UInt8, UInt8, UInt8, UInt8, UInt8, UInt8,
            UInt8, UInt8
        ) =
            (0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0)
    var count = 0
    withUnsafeMutableBytes(of: &digits) { d in
        repeat {
            d[19 - count] = UInt8(ascii: "0") + UInt8(m % 10)
            m /= 10
            count += 1
        } while m > 0
        out.append(contentsOf: d[(20 - count)...])
    }
}
