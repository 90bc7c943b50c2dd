/// An instant parsed from an `xsd:dateTime` (RFC 7643 §2.3.5), comparable
/// across time zones. A value without a zone is taken as UTC.
public struct DateTimeValue: Sendable, Comparable, Equatable {
    public let secondsSinceEpoch: Int64
    public let nanoseconds: Int

    public static func < (a: DateTimeValue, b: DateTimeValue) -> Bool {
        (a.secondsSinceEpoch, a.nanoseconds) < (b.secondsSinceEpoch, b.nanoseconds)
    }

    /// Parses `YYYY-MM-DDThh:mm:ss[.f+][Z|±hh:mm]`; `nil` if malformed or out of range.
    public init?(_ text: String) {
        let b = Array(text.utf8)
        var i = 0
        func digits(_ n: Int) -> Int? {
            guard i + n <= b.count else { return nil }
            var v = 0
            for k in 0..<n {
                let c = b[i + k]
                guard c >= 48 && c <= 57 else { return nil }
                v = v * 10 + Int(c - 48)
            }
            i += n
            return v
        }
        func expect(_ c: Character) -> Bool {
            guard i < b.count, b[i] == c.asciiValue! else { return false }
            i += 1
            return true
        }
        guard let year = digits(4), expect("-"), let month = digits(2), expect("-"), let day = digits(2),
            i < b.count, b[i] == UInt8(ascii: "T") || b[i] == UInt8(ascii: "t")
        else { return nil }
        i += 1
        guard let hour = digits(2), expect(":"), let minute = digits(2), expect(":"), let second = digits(2) else { return nil }
        var nanos = 0
        if i < b.count && b[i] == UInt8(ascii: ".") {
            i += 1
            var scale = 100_000_000, count = 0
            while i < b.count && b[i] >= 48 && b[i] <= 57 {
                nanos += Int(b[i] - 48) * scale
                scale /= 10
                count += 1
                i += 1
            }
            guard count > 0 else { return nil }
        }
        var offset = 0
        if i < b.count {
            if b[i] == UInt8(ascii: "Z") || b[i] == UInt8(ascii: "z") {
                i += 1
            } else if b[i] == UInt8(ascii: "+") || b[i] == UInt8(ascii: "-") {
                let sign = b[i] == UInt8(ascii: "-") ? -1 : 1
                i += 1
                guard let oh = digits(2), expect(":"), let om = digits(2), oh <= 14, om < 60 else { return nil }
                offset = sign * (oh * 3600 + om * 60)
            } else {
                return nil
            }
        }
        guard i == b.count, (1...12).contains(month), day >= 1, day <= daysIn(month, year),
            hour < 24 || (hour == 24 && minute == 0 && second == 0 && nanos == 0), minute < 60, second < 60
        else { return nil }
        let days = daysFromCivil(year, month, day)
        secondsSinceEpoch = Int64(days) * 86400 + Int64(hour * 3600 + minute * 60 + second - offset)
        nanoseconds = nanos
    }
}

private func isLeap(_ y: Int) -> Bool { (y % 4 == 0 && y % 100 != 0) || y % 400 == 0 }

private func daysIn(_ m: Int, _ y: Int) -> Int {
    switch m {
    case 2: return isLeap(y) ? 29 : 28
    case 4, 6, 9, 11: return 30
    default: return 31
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date.
private func daysFromCivil(_ year: Int, _ month: Int, _ day: Int) -> Int {
    let y = month <= 2 ? year - 1 : year
    let era = (y >= 0 ? y : y - 399) / 400
    let yoe = y - era * 400
    let mp = (month + 9) % 12
    let doy = (153 * mp + 2) / 5 + day - 1
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy
    return era * 146_097 + doe - 719_468
}

/// Whether `text` is canonical base64 (RFC 4648 §4, padding required).
public func isBase64(_ text: String) -> Bool {
    let b = Array(text.utf8)
    guard b.count % 4 == 0 else { return false }
    var padding = 0
    for (k, c) in b.enumerated() {
        switch c {
        case 65...90, 97...122, 48...57, 43, 47:
            if padding > 0 { return false }
        case 61:
            padding += 1
            if k < b.count - 2 || padding > 2 { return false }
        default:
            return false
        }
    }
    return true
}

/// The current time as an `xsd:dateTime` in UTC with milliseconds.
public func formatDateTime(secondsSinceEpoch: Int64, milliseconds: Int = 0) -> String {
    let days = Int(secondsSinceEpoch >= 0 ? secondsSinceEpoch / 86400 : (secondsSinceEpoch - 86399) / 86400)
    let secs = Int(secondsSinceEpoch - Int64(days) * 86400)
    // civil from days (inverse of daysFromCivil)
    let z = days + 719_468
    let era = (z >= 0 ? z : z - 146_096) / 146_097
    let doe = z - era * 146_097
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100)
    let mp = (5 * doy + 2) / 153
    let d = doy - (153 * mp + 2) / 5 + 1
    let m = mp < 10 ? mp + 3 : mp - 9
    let y = yoe + era * 400 + (m <= 2 ? 1 : 0)
    func pad(_ v: Int, _ n: Int) -> String {
        let s = String(v)
        return String(repeating: "0", count: max(0, n - s.count)) + s
    }
    return
        "\(pad(y, 4))-\(pad(m, 2))-\(pad(d, 2))T\(pad(secs / 3600, 2)):\(pad(secs / 60 % 60, 2)):\(pad(secs % 60, 2)).\(pad(milliseconds, 3))Z"
}
