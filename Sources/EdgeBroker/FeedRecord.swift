import EdgeStore
import SCIM

/// What the hop of a downlink event's commit needs (`recordCommits`): the
/// resource, its trace, the kind of event and its times (Unix ms). Kept in
/// `downlinkTrail` beside the event until it is acknowledged.
///
/// Stored in binary: `0x01`, then brokerID, trace and event kind, each a
/// 4-byte big-endian length and its UTF-8, then issued, accepted and
/// applied as 8-byte big-endian integers; or JSON, as brokers before
/// 2026-12-03 wrote it. Both are read; JSON is still what is written,
/// because an older broker fails its poll on a binary record (a downgrade
/// would wedge the feed): the writer switches one release later.
struct FeedTrail: Equatable {
    var brokerID: String
    var trace: String
    var event: String
    var issued: Int64
    var accepted: Int64
    var applied: Int64

    static let marker: UInt8 = 0x01

    init(brokerID: String, trace: String, event: String, issued: Int64, accepted: Int64, applied: Int64) {
        (self.brokerID, self.trace, self.event) = (brokerID, trace, event)
        (self.issued, self.accepted, self.applied) = (issued, accepted, applied)
    }

    /// The JSON record brokers before 2026-12-03 read, which is what is
    /// written until a release that reads `encoded` has been out: an older
    /// broker's `recordCommits` throws on a binary record, which would
    /// wedge its feed after a downgrade.
    var json: [UInt8] {
        let r: JSONObject = [
            "id": .string(brokerID), "trace": .string(trace), "event": .string(event),
            "issued": .number(JSONNumber(integer: issued)), "accepted": .number(JSONNumber(integer: accepted)),
            "applied": .number(JSONNumber(integer: applied)),
        ]
        return JSON.object(r).serialized()
    }

    /// The binary record, read since 2026-12-03 (not yet written: `json`).
    var encoded: [UInt8] {
        let id = brokerID.utf8, trace = trace.utf8, event = event.utf8
        var out: [UInt8] = []
        out.reserveCapacity(1 + 12 + id.count + trace.count + event.count + 24)
        out.append(Self.marker)
        for s in [id, trace, event] {
            out += UInt32(s.count).bigEndianBytes  // traps past 4 GiB rather than write a record that reads back wrong
            out += s
        }
        for t in [issued, accepted, applied] { out += UInt64(bitPattern: t).bigEndianBytes }
        return out
    }

    /// A stored record, binary or (an older broker's) JSON; nil when it is neither.
    init?(_ value: [UInt8]) {
        guard let first = value.first else { return nil }
        if first == UInt8(ascii: "{") {
            self.init(json: value)
            return
        }
        guard first == Self.marker else { return nil }
        var at = 1
        func integer(_ width: Int) -> UInt64? {
            guard value.count - at >= width else { return nil }
            var v: UInt64 = 0
            for b in value[at..<at + width] { v = v << 8 | UInt64(b) }
            at += width
            return v
        }
        func string() -> String? {
            guard let n = integer(4).map(Int.init), n <= value.count - at else { return nil }
            defer { at += n }
            return String(decoding: value[at..<at + n], as: UTF8.self)
        }
        guard let id = string(), let trace = string(), let event = string(), let issued = integer(8), let accepted = integer(8),
            let applied = integer(8), at == value.count
        else { return nil }
        self.init(
            brokerID: id, trace: trace, event: event, issued: Int64(bitPattern: issued), accepted: Int64(bitPattern: accepted),
            applied: Int64(bitPattern: applied))
    }

    /// The record again from the feed event itself (`appendFeedEvent`),
    /// for an acknowledged event whose record is missing or cannot be read
    /// (a newer broker's format after a downgrade, a damaged value): its
    /// resource from `ref` (`/Users/<id>` or `/Groups/<id>`), its trace
    /// from `txn`, its kind from the event URI, its times from `ts` and
    /// `queued`; `issued` only to the second (`iat`). Nil for an event
    /// that names no resource (the end of a resync) or cannot be read.
    init?(event bytes: [UInt8]) {
        guard let e = try? JSONParser.parse(bytes, limits: .stored).objectValue,
            let (uri, body) = e["events"]?.objectValue?.members.first, let ref = body["ref"]?.stringValue
        else { return nil }
        let id = ref.hasPrefix("/Users/") ? ref.dropFirst(7) : ref.hasPrefix("/Groups/") ? ref.dropFirst(8) : ""
        guard !id.isEmpty, !id.contains("/") else { return nil }
        func time(_ k: String) -> Int64 { e[k]?.numberValue?.integer ?? 0 }
        let (issued, overflow) = time("iat").multipliedReportingOverflow(by: 1000)
        self.init(
            brokerID: String(id), trace: e["txn"]?.stringValue ?? "", event: BrokerStore.feedEventKinds[uri] ?? uri,
            issued: overflow ? 0 : issued, accepted: time("ts"), applied: time("queued"))
    }

    /// Whether a stored feed event is the end of a resync (which has no record).
    static func isResyncEnd(_ bytes: [UInt8]) -> Bool {
        guard let e = try? JSONParser.parse(bytes, limits: .stored).objectValue else { return false }
        return e["events"]?.objectValue?.members.first?.key == BrokerStore.resyncCompleteEvent
    }

    private init?(json bytes: [UInt8]) {
        guard let r = try? JSONParser.parse(bytes, limits: .stored).objectValue, let id = r["id"]?.stringValue else { return nil }
        func time(_ k: String) -> Int64 { r[k]?.numberValue?.integer ?? 0 }
        self.init(
            brokerID: id, trace: r["trace"]?.stringValue ?? "", event: r["event"]?.stringValue ?? "change", issued: time("issued"),
            accepted: time("accepted"), applied: time("applied"))
    }
}

/// Appends `n` in decimal, as `JSONNumber(integer:)` writes it.
func appendDecimal(_ n: Int64, to out: inout [UInt8]) {
    if n < 0 { out.append(UInt8(ascii: "-")) }
    var m = n.magnitude
    var digits: (UInt64, UInt64, UInt64) = (0, 0, 0)  // 24 bytes: Int64's 19 digits fit
    withUnsafeMutableBytes(of: &digits) { d in
        var count = 0
        repeat {
            d[d.count - 1 - count] = UInt8(ascii: "0") + UInt8(m % 10)
            m /= 10
            count += 1
        } while m > 0
        out.append(contentsOf: d[(d.count - count)...])
    }
}
