/// The members of a compact JSON object this program serialised itself
/// (stored bytes), as their names and the byte ranges of their values,
/// without building the values: for copying most of a stored resource into
/// another document as it is. nil when `bytes` is not such an object, or a
/// member name holds an escape (the caller then parses).
public func storedObjectMembers(_ bytes: [UInt8]) -> [(key: String, value: Range<Int>)]? {
    bytes.withUnsafeBufferPointer { b -> [(key: String, value: Range<Int>)]? in
        var i = 0
        let n = b.count
        guard n >= 2, b[0] == UInt8(ascii: "{"), b[n - 1] == UInt8(ascii: "}") else { return nil }
        i = 1
        var out: [(key: String, value: Range<Int>)] = []
        if b[i] == UInt8(ascii: "}") { return i == n - 1 ? out : nil }
        while i < n {
            guard b[i] == UInt8(ascii: "\"") else { return nil }
            let keyStart = i + 1
            var k = keyStart
            while k < n, b[k] != UInt8(ascii: "\"") {
                if b[k] == UInt8(ascii: "\\") { return nil }
                k += 1
            }
            guard k + 1 < n, b[k + 1] == UInt8(ascii: ":") else { return nil }
            let key = String(decoding: UnsafeBufferPointer(rebasing: b[keyStart..<k]), as: UTF8.self)
            let valueStart = k + 2
            guard let end = skipStoredValue(b, valueStart) else { return nil }
            out.append((key, valueStart..<end))
            guard end < n else { return nil }
            if b[end] == UInt8(ascii: "}") { return end == n - 1 ? out : nil }
            guard b[end] == UInt8(ascii: ",") else { return nil }
            i = end + 1
        }
        return nil
    }
}

/// The index after the compact JSON value starting at `start` (nil: none there).
private func skipStoredValue(_ b: UnsafeBufferPointer<UInt8>, _ start: Int) -> Int? {
    var i = start, depth = 0
    let n = b.count
    while i < n {
        switch b[i] {
        case UInt8(ascii: "\""):
            i += 1
            while i < n, b[i] != UInt8(ascii: "\"") {
                // Eight bytes at a time while none is a quote or a backslash.
                while i + 8 <= n, !mayEndStoredString(UnsafeRawPointer(b.baseAddress! + i).loadUnaligned(as: UInt64.self)) { i += 8 }
                guard i < n, b[i] != UInt8(ascii: "\"") else { break }
                i += b[i] == UInt8(ascii: "\\") ? 2 : 1
            }
            guard i < n else { return nil }
            i += 1
        case UInt8(ascii: "{"), UInt8(ascii: "["):
            depth += 1
            i += 1
        case UInt8(ascii: "}"), UInt8(ascii: "]"):
            if depth == 0 { return i == start ? nil : i }
            depth -= 1
            i += 1
        case UInt8(ascii: ","):
            if depth == 0 { return i == start ? nil : i }
            i += 1
        default:
            i += 1
        }
        if depth == 0, i > start, b[start] == UInt8(ascii: "\"") || b[start] == UInt8(ascii: "{") || b[start] == UInt8(ascii: "[") {
            return i
        }
    }
    return depth == 0 && i > start ? i : nil
}

/// Whether one of the eight bytes of `w` is `"` or `\\` (never false when one is).
@inline(__always)
private func mayEndStoredString(_ w: UInt64) -> Bool {
    hasZeroByte(w ^ 0x2222_2222_2222_2222) || hasZeroByte(w ^ 0x5C5C_5C5C_5C5C_5C5C)
}
