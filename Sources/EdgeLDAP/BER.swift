/// The little of BER (X.690) that the LDAP controls of RFC 4533 and RFC 2696
/// need: definite lengths, OCTET STRING, BOOLEAN, ENUMERATED, INTEGER,
/// SEQUENCE/SET and context tags. libldap's `ber_scanf`/`ber_printf` are
/// variadic and cannot be called from Swift, and these values are small.
public enum BER {
    public static let sequence: UInt8 = 0x30
    public static let set: UInt8 = 0x31
    public static let octetString: UInt8 = 0x04
    public static let boolean: UInt8 = 0x01
    public static let integer: UInt8 = 0x02
    public static let enumerated: UInt8 = 0x0a

    /// One TLV with a definite length.
    public static func element(_ tag: UInt8, _ content: [UInt8]) -> [UInt8] {
        var out: [UInt8] = [tag]
        let n = content.count
        if n < 0x80 {
            out.append(UInt8(n))
        } else {
            var bytes: [UInt8] = []
            var v = n
            while v > 0 {
                bytes.insert(UInt8(v & 0xff), at: 0)
                v >>= 8
            }
            out.append(0x80 | UInt8(bytes.count))
            out += bytes
        }
        return out + content
    }

    /// A non-negative INTEGER or ENUMERATED value, in the fewest octets.
    public static func integerContent(_ value: Int) -> [UInt8] {
        precondition(value >= 0, "only non-negative integers are encoded")
        var bytes: [UInt8] = []
        var v = value
        repeat {
            bytes.insert(UInt8(v & 0xff), at: 0)
            v >>= 8
        } while v > 0
        if bytes[0] & 0x80 != 0 { bytes.insert(0, at: 0) }
        return bytes
    }
}

/// Why a BER value could not be read.
public struct BERError: Error, Sendable, CustomStringConvertible {
    public let message: String
    public init(_ message: String) { self.message = message }
    public var description: String { "malformed BER: \(message)" }
}

/// Reads TLVs from a byte array, front to back.
public struct BERReader: Sendable {
    let bytes: [UInt8]
    var position: Int
    let end: Int

    public init(_ bytes: [UInt8]) {
        self.bytes = bytes
        position = 0
        end = bytes.count
    }

    init(_ bytes: [UInt8], from: Int, to: Int) {
        self.bytes = bytes
        position = from
        end = to
    }

    public var atEnd: Bool { position >= end }

    /// The next element's tag, without consuming it.
    public var peekTag: UInt8? { atEnd ? nil : bytes[position] }

    /// The next element: its tag and a reader over its content.
    public mutating func next() throws(BERError) -> (tag: UInt8, content: BERReader) {
        guard position + 2 <= end else { throw BERError("truncated element at \(position)") }
        let tag = bytes[position]
        var length = Int(bytes[position + 1])
        var at = position + 2
        if length & 0x80 != 0 {
            let count = length & 0x7f
            guard count > 0, count <= 4, at + count <= end else { throw BERError("bad length at \(position)") }
            length = 0
            for i in 0..<count { length = length << 8 | Int(bytes[at + i]) }
            at += count
        }
        guard at + length <= end else { throw BERError("element at \(position) runs past its container") }
        position = at + length
        return (tag, BERReader(bytes, from: at, to: at + length))
    }

    /// The next element, which must have `tag`.
    public mutating func next(_ tag: UInt8) throws(BERError) -> BERReader {
        let (t, content) = try next()
        guard t == tag else { throw BERError("expected tag 0x\(hex(tag)), found 0x\(hex(t))") }
        return content
    }

    /// The rest of the content as bytes.
    public var remaining: [UInt8] { Array(bytes[position..<end]) }

    /// The content read as an unsigned integer (INTEGER, ENUMERATED).
    public var integerValue: Int {
        var v = 0
        for b in bytes[position..<end] { v = v << 8 | Int(b) }
        return v
    }

    /// The content read as a BOOLEAN.
    public var booleanValue: Bool { bytes[position..<end].contains { $0 != 0 } }
}

func hex(_ b: UInt8) -> String {
    let digits = Array("0123456789abcdef")
    return String([digits[Int(b >> 4)], digits[Int(b & 0xf)]])
}
