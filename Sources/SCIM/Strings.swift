extension String {
    /// Without leading and trailing spaces.
    public var trimmingSpaces: String {
        var s = Substring(self)
        while s.first == " " { s = s.dropFirst() }
        while s.last == " " { s = s.dropLast() }
        return String(s)
    }
}

/// The non-empty parts of `path` between slashes: `path.split(separator: "/")`
/// without its generic, grapheme-aware machinery (a few thousand instructions
/// for an event's `ref`, on every event applied). "/" is ASCII, so a byte
/// split never cuts a character.
public func slashParts(_ path: String) -> [Substring] {
    var parts: [Substring] = []
    let u = path.utf8
    var start = u.startIndex
    var i = u.startIndex
    while i != u.endIndex {
        if u[i] == UInt8(ascii: "/") {
            if start != i { parts.append(Substring(u[start..<i])) }
            start = u.index(after: i)
        }
        i = u.index(after: i)
    }
    if start != u.endIndex { parts.append(Substring(u[start...])) }
    return parts
}
