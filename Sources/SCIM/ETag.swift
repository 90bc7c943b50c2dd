/// Weak entity tags from resource versions, and precondition checks.
///
/// RFC 7644's own examples send weak tags in `If-Match`, so both `If-Match`
/// and `If-None-Match` use the weak comparison (RFC 9110 §8.8.3.2).
public enum ETag {
    /// `W/"<version>"`, the value of `meta.version` and the `ETag` header.
    public static func make(version: UInt64) -> String { "W/\"\(version)\"" }

    public enum Outcome: Sendable, Equatable {
        case proceed
        /// 412 Precondition Failed.
        case preconditionFailed
        /// 304 Not Modified (reads only).
        case notModified
    }

    /// Evaluates `If-Match` and `If-None-Match` against the current tag
    /// (`nil` when the resource does not exist). `isRead` for GET/HEAD.
    public static func evaluate(ifMatch: String?, ifNoneMatch: String?, current: String?, isRead: Bool) -> Outcome {
        if let ifMatch {
            guard let current else { return .preconditionFailed }
            let tags = list(ifMatch)
            if !(tags.contains("*") || tags.contains { weakEqual($0, current) }) { return .preconditionFailed }
        }
        if let ifNoneMatch {
            let tags = list(ifNoneMatch)
            let matched = current != nil && (tags.contains("*") || tags.contains { weakEqual($0, current!) })
            if matched { return isRead ? .notModified : .preconditionFailed }
        }
        return .proceed
    }

    static func list(_ header: String) -> [String] {
        header.split(separator: ",").map { String($0).trimmingSpaces }.filter { !$0.isEmpty }
    }

    static func opaque(_ tag: String) -> Substring {
        var t = Substring(tag)
        if t.hasPrefix("W/") { t = t.dropFirst(2) }
        return t
    }

    /// Weak comparison: the opaque tags are equal, `W/` or not.
    public static func weakEqual(_ a: String, _ b: String) -> Bool { opaque(a) == opaque(b) }
}
