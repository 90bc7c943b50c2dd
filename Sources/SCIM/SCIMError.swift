/// `scimType` values of RFC 7644 §3.12, plus RFC 9865's cursor errors.
public enum SCIMType: String, Sendable, Equatable {
    case invalidFilter, tooMany, uniqueness, mutability, invalidSyntax, invalidPath, noTarget, invalidValue
    case invalidVers, sensitive
    case invalidCursor, expiredCursor
}

/// A SCIM error response (RFC 7644 §3.12): the HTTP status, the `scimType`
/// where one applies, and a `detail` that names what was wrong and where.
public struct SCIMError: Error, Sendable, Equatable, CustomStringConvertible {
    public var status: Int
    public var scimType: SCIMType?
    public var detail: String

    public init(_ status: Int, _ scimType: SCIMType?, _ detail: String) {
        self.status = status
        self.scimType = scimType
        self.detail = detail
    }

    public static let errorSchema = "urn:ietf:params:scim:api:messages:2.0:Error"

    public static func invalidValue(_ detail: String) -> SCIMError { SCIMError(400, .invalidValue, detail) }
    public static func invalidSyntax(_ detail: String) -> SCIMError { SCIMError(400, .invalidSyntax, detail) }
    public static func invalidFilter(_ detail: String) -> SCIMError { SCIMError(400, .invalidFilter, detail) }
    public static func invalidPath(_ detail: String) -> SCIMError { SCIMError(400, .invalidPath, detail) }
    public static func noTarget(_ detail: String) -> SCIMError { SCIMError(400, .noTarget, detail) }
    public static func mutability(_ detail: String) -> SCIMError { SCIMError(400, .mutability, detail) }
    public static func uniqueness(_ detail: String) -> SCIMError { SCIMError(409, .uniqueness, detail) }
    public static func notFound(_ detail: String) -> SCIMError { SCIMError(404, nil, detail) }

    /// The body: `{"schemas":[Error],"status":"400","scimType":…,"detail":…}`.
    public var json: JSON {
        var o: JSONObject = ["schemas": [.string(SCIMError.errorSchema)], "status": .string(String(status))]
        if let scimType { o["scimType"] = .string(scimType.rawValue) }
        o["detail"] = .string(detail)
        return .object(o)
    }

    public var description: String {
        "\(status)\(scimType.map { " \($0.rawValue)" } ?? ""): \(detail)"
    }

    /// Prefixes the detail, e.g. with the operation it happened in.
    public func prefixed(_ context: String) -> SCIMError {
        SCIMError(status, scimType, "\(context): \(detail)")
    }
}

extension JSONError {
    /// Unparsable JSON is `400 invalidSyntax` with the position.
    public var scimError: SCIMError { .invalidSyntax("request body is not valid JSON: \(description)") }
}
