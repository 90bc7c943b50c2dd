import EdgeTLS

/// The identifiers the agent makes: resource ids (UUIDv7), and trace ids
/// (the IdP's `traceparent`, or a fast generator of the agent's own).

/// The trace id of a W3C `traceparent` header (`00-<32 hex>-<16 hex>-<2 hex>`).
func traceID(_ header: String?) -> String? {
    guard let parts = header?.split(separator: "-"), parts.count == 4, parts[1].count == 32,
        parts[1].allSatisfy({ $0.isHexDigit })
    else { return nil }
    return String(parts[1])
}

/// A time-ordered (version 7, RFC 9562) UUID: 48 bits of Unix milliseconds,
/// then 74 random bits from `random` (16 bytes; the first 6 are replaced).
/// Resources created together get neighbouring keys, so a batch of creates
/// changes a few B-tree pages instead of one random page each: about half the
/// pages each durable commit writes. The creation time it reveals is already
/// in `meta.created`.
func uuidV7(milliseconds: UInt64, random: ArraySlice<UInt8>) -> String {
    var b = Array(random)
    for k in 0..<6 { b[k] = UInt8(truncatingIfNeeded: milliseconds >> UInt64(40 - 8 * k)) }
    b[6] = (b[6] & 0x0F) | 0x70
    b[8] = (b[8] & 0x3F) | 0x80
    let h = hexString(b)
    var out = ""
    out.reserveCapacity(36)
    for (k, c) in h.enumerated() {
        if k == 8 || k == 12 || k == 16 || k == 20 { out.append("-") }
        out.append(c)
    }
    return out
}

/// xoshiro256** (Blackman and Vigna), seeded from the system's secure source:
/// fast, well-distributed 64-bit values for identifiers that must be unique
/// but are not secrets (trace ids). Not for keys or tokens.
struct Xoshiro256 {
    private var s: (UInt64, UInt64, UInt64, UInt64)

    init() {
        let b = secureRandomBytes(32)
        func word(_ k: Int) -> UInt64 { (0..<8).reduce(0) { $0 | UInt64(b[k * 8 + $1]) << UInt64($1 * 8) } }
        s = (word(0), word(1), word(2), word(3))
        if s == (0, 0, 0, 0) { s.0 = 1 }
    }

    mutating func next() -> UInt64 {
        let result = rotl(s.1 &* 5, 7) &* 9
        let t = s.1 << 17
        s.2 ^= s.0
        s.3 ^= s.1
        s.1 ^= s.2
        s.0 ^= s.3
        s.2 ^= t
        s.3 = rotl(s.3, 45)
        return result
    }

    private func rotl(_ x: UInt64, _ k: UInt64) -> UInt64 { (x << k) | (x >> (64 - k)) }
}
