/// Query strings and percent-encoding (RFC 3986, and the form encoding of
/// query strings).

/// Decodes an `application/x-www-form-urlencoded` query string
/// (`%XX` and `+`); repeated names keep the last value. `nil` when an
/// escape is malformed or the result is not UTF-8.
public func parseQueryString(_ query: Substring) -> [String: String]? {
    var out: [String: String] = [:]
    for pair in query.split(separator: "&", omittingEmptySubsequences: true) {
        let parts = pair.split(separator: "=", maxSplits: 1, omittingEmptySubsequences: false)
        guard let name = percentDecode(parts[0]), let value = percentDecode(parts.count > 1 ? parts[1] : "") else { return nil }
        out[name] = value
    }
    return out
}

/// Decodes `%XX` escapes and `+` (a space; with `plusIsSpace` false, as
/// in a path segment, `+` stays); nil when an escape is malformed or the
/// result is not UTF-8.
public func percentDecode(_ s: Substring, plusIsSpace: Bool = true) -> String? {
    var bytes: [UInt8] = []
    var it = Array(s.utf8)[...]
    while let c = it.popFirst() {
        if plusIsSpace && c == UInt8(ascii: "+") { bytes.append(0x20); continue }
        guard c == UInt8(ascii: "%") else { bytes.append(c); continue }
        guard let h = it.popFirst(), let l = it.popFirst(), let hv = hexValue(h), let lv = hexValue(l) else { return nil }
        bytes.append(hv << 4 | lv)
    }
    return String(validating: bytes, as: UTF8.self)
}

/// The value of one hexadecimal digit.
func hexValue(_ c: UInt8) -> UInt8? {
    switch c {
    case 48...57: return c - 48
    case 65...70: return c - 55
    case 97...102: return c - 87
    default: return nil
    }
}

/// Percent-encodes everything but RFC 3986 unreserved characters (for query values).
public func percentEncode(_ s: String) -> String {
    let hex = Array("0123456789ABCDEF".utf8)
    var out: [UInt8] = []
    out.reserveCapacity(s.utf8.count)
    for b in s.utf8 {
        if isUnreserved(b) { out.append(b) } else { out += [UInt8(ascii: "%"), hex[Int(b >> 4)], hex[Int(b & 15)]] }
    }
    return String(decoding: out, as: UTF8.self)
}

/// RFC 3986 §2.3 unreserved characters: what `percentEncode` leaves as it is, and all a cursor may contain.
func isUnreserved(_ c: UInt8) -> Bool {
    switch c {
    case UInt8(ascii: "A")...UInt8(ascii: "Z"), UInt8(ascii: "a")...UInt8(ascii: "z"), UInt8(ascii: "0")...UInt8(ascii: "9"),
        UInt8(ascii: "-"), UInt8(ascii: "."), UInt8(ascii: "_"), UInt8(ascii: "~"):
        return true
    default: return false
    }
}
