/// The messages of LDAP content synchronisation (RFC 4533, "syncrepl") and
/// of the simple paged results control (RFC 2696), encoded and decoded in
/// Swift (`BER`).
public enum SyncRepl {
    public static let requestControl = "1.3.6.1.4.1.4203.1.9.1.1"
    public static let stateControl = "1.3.6.1.4.1.4203.1.9.1.2"
    public static let doneControl = "1.3.6.1.4.1.4203.1.9.1.3"
    public static let infoMessage = "1.3.6.1.4.1.4203.1.9.1.4"
    /// RFC 2696.
    public static let pagedResultsControl = "1.2.840.113556.1.4.319"
    /// `e-syncRefreshRequired` (RFC 4533 §2.6): the cookie is too old; start again without it.
    public static let refreshRequired: Int32 = 0x1000

    public enum Mode: Int, Sendable {
        case refreshOnly = 1
        case refreshAndPersist = 3
    }

    /// syncRequestValue.
    public static func request(mode: Mode, cookie: [UInt8]?, reloadHint: Bool = false) -> [UInt8] {
        var content = BER.element(BER.enumerated, BER.integerContent(mode.rawValue))
        if let cookie { content += BER.element(BER.octetString, cookie) }
        if reloadHint { content += BER.element(BER.boolean, [0xff]) }
        return BER.element(BER.sequence, content)
    }

    /// What a Sync State control says about one entry.
    public enum EntryState: Int, Sendable {
        case present = 0
        case add = 1
        case modify = 2
        case delete = 3
    }

    public struct State: Sendable, Equatable {
        public var state: EntryState
        /// The entry's UUID, 16 bytes (`uuidString` formats it as entryUUID does).
        public var entryUUID: [UInt8]
        public var cookie: [UInt8]?
        public init(state: EntryState, entryUUID: [UInt8], cookie: [UInt8]?) {
            self.state = state
            self.entryUUID = entryUUID
            self.cookie = cookie
        }
    }

    /// syncStateValue.
    public static func state(_ value: [UInt8]) throws(BERError) -> State {
        var outer = BERReader(value)
        var seq = try outer.next(BER.sequence)
        let raw = try seq.next(BER.enumerated).integerValue
        guard let state = EntryState(rawValue: raw) else { throw BERError("unknown sync state \(raw)") }
        let uuid = try seq.next(BER.octetString).remaining
        var cookie: [UInt8]?
        if seq.peekTag == BER.octetString { cookie = try seq.next(BER.octetString).remaining }
        return State(state: state, entryUUID: uuid, cookie: cookie)
    }

    /// A Sync Info message (an intermediate response).
    public enum Info: Sendable, Equatable {
        case newCookie([UInt8])
        /// The refresh phase sent deletes (entries not sent are unchanged).
        case refreshDelete(cookie: [UInt8]?, done: Bool)
        /// The refresh phase sent every entry present: the ones not sent are gone.
        case refreshPresent(cookie: [UInt8]?, done: Bool)
        /// Many UUIDs at once: deleted (`refreshDeletes`) or present.
        case idSet(cookie: [UInt8]?, refreshDeletes: Bool, uuids: [[UInt8]])
    }

    /// syncInfoValue.
    public static func info(_ value: [UInt8]) throws(BERError) -> Info {
        var outer = BERReader(value)
        let (tag, content) = try outer.next()
        var c = content
        switch tag {
        case 0x80:
            return .newCookie(c.remaining)
        case 0xa1, 0xa2:
            var cookie: [UInt8]?
            var done = true
            if c.peekTag == BER.octetString { cookie = try c.next(BER.octetString).remaining }
            if c.peekTag == BER.boolean { done = try c.next(BER.boolean).booleanValue }
            return tag == 0xa1 ? .refreshDelete(cookie: cookie, done: done) : .refreshPresent(cookie: cookie, done: done)
        case 0xa3:
            var cookie: [UInt8]?
            var deletes = false
            if c.peekTag == BER.octetString { cookie = try c.next(BER.octetString).remaining }
            if c.peekTag == BER.boolean { deletes = try c.next(BER.boolean).booleanValue }
            var set = try c.next(BER.set)
            var uuids: [[UInt8]] = []
            while !set.atEnd { uuids.append(try set.next(BER.octetString).remaining) }
            return .idSet(cookie: cookie, refreshDeletes: deletes, uuids: uuids)
        default:
            throw BERError("unknown sync info choice 0x\(hex(tag))")
        }
    }

    /// syncDoneValue: the cookie, and whether the refresh sent deletes.
    public static func done(_ value: [UInt8]) throws(BERError) -> (cookie: [UInt8]?, refreshDeletes: Bool) {
        var outer = BERReader(value)
        var seq = try outer.next(BER.sequence)
        var cookie: [UInt8]?
        var deletes = false
        if seq.peekTag == BER.octetString { cookie = try seq.next(BER.octetString).remaining }
        if seq.peekTag == BER.boolean { deletes = try seq.next(BER.boolean).booleanValue }
        return (cookie, deletes)
    }

    /// The paged results control's value (RFC 2696).
    public static func pagedRequest(size: Int, cookie: [UInt8]) -> [UInt8] {
        BER.element(BER.sequence, BER.element(BER.integer, BER.integerContent(size)) + BER.element(BER.octetString, cookie))
    }

    /// The server's paged results answer: the cookie of the next page (empty: the last page).
    public static func pagedResponse(_ value: [UInt8]) throws(BERError) -> [UInt8] {
        var outer = BERReader(value)
        var seq = try outer.next(BER.sequence)
        _ = try seq.next(BER.integer)
        return try seq.next(BER.octetString).remaining
    }
}

/// 16 bytes as `8-4-4-4-12` lower-case hex digits in byte order: the form of
/// OpenLDAP's `entryUUID` attribute (RFC 4530).
public func uuidString(_ bytes: [UInt8]) -> String {
    guard bytes.count == 16 else { return bytes.map(hex).joined() }
    var s = ""
    for (i, b) in bytes.enumerated() {
        if i == 4 || i == 6 || i == 8 || i == 10 { s += "-" }
        s += hex(b)
    }
    return s
}

/// Active Directory's `objectGUID` (16 bytes) in its usual text form: the
/// first three groups are little-endian (as `Get-ADUser` prints it).
public func guidString(_ bytes: [UInt8]) -> String {
    guard bytes.count == 16 else { return bytes.map(hex).joined() }
    let order = [3, 2, 1, 0, 5, 4, 7, 6, 8, 9, 10, 11, 12, 13, 14, 15]
    return uuidString(order.map { bytes[$0] })
}
