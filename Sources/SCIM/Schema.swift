public enum AttributeType: String, Sendable, Equatable {
    case string, boolean, decimal, integer, dateTime, binary, reference, complex
}

public enum Mutability: String, Sendable, Equatable {
    case readOnly, readWrite, immutable, writeOnly
}

public enum Returned: String, Sendable, Equatable {
    case always, never, `default`, request
}

public enum Uniqueness: String, Sendable, Equatable {
    case none, server, global
}

/// One attribute's definition with every characteristic of RFC 7643 §7.
/// Immutable and shared: a class, so passing one around costs one retain.
public final class AttributeDefinition: Sendable {
    public let name: String
    public let type: AttributeType
    public let multiValued: Bool
    public let description: String
    public let required: Bool
    public let caseExact: Bool
    public let mutability: Mutability
    public let returned: Returned
    public let uniqueness: Uniqueness
    public let canonicalValues: [String]
    /// Refuse values outside `canonicalValues` (RFC 7643 lets providers
    /// accept others; we enforce it only where a value has a meaning to us,
    /// e.g. a member's `type`).
    public let enforceCanonicalValues: Bool
    public let referenceTypes: [String]
    public let subAttributes: [AttributeDefinition]
    /// The required sub-attributes (usually none), for validation's hot path.
    let requiredSubAttributes: [AttributeDefinition]

    public init(
        _ name: String, _ type: AttributeType = .string, multiValued: Bool = false, description: String = "",
        required: Bool = false, caseExact: Bool = false, mutability: Mutability = .readWrite,
        returned: Returned = .default, uniqueness: Uniqueness = .none, canonicalValues: [String] = [],
        enforceCanonicalValues: Bool = false, referenceTypes: [String] = [],
        subAttributes: [AttributeDefinition] = []
    ) {
        self.name = name
        self.type = type
        self.multiValued = multiValued
        self.description = description
        self.required = required
        self.caseExact = caseExact
        self.mutability = mutability
        self.returned = returned
        self.uniqueness = uniqueness
        self.canonicalValues = canonicalValues
        self.enforceCanonicalValues = enforceCanonicalValues
        self.referenceTypes = referenceTypes
        self.subAttributes = subAttributes
        requiredSubAttributes = subAttributes.filter(\.required)
    }

    public func subAttribute(_ name: String) -> AttributeDefinition? { subAttributes.named(name) }

    /// The representation used by `/Schemas` (RFC 7643 §7): every
    /// characteristic the section lists, for every attribute (clients such
    /// as Entra's and Okta's importers read them rather than assume the
    /// defaults); `canonicalValues` where there are some, `referenceTypes`
    /// for references, `subAttributes` for complex attributes. Generated
    /// from the definitions the validator uses, so it cannot drift from it.
    public var json: JSON {
        var o: JSONObject = [
            "name": .string(name), "type": .string(type.rawValue), "multiValued": .bool(multiValued),
            "description": .string(description), "required": .bool(required), "caseExact": .bool(caseExact),
        ]
        if !canonicalValues.isEmpty { o["canonicalValues"] = .array(canonicalValues.map(JSON.string)) }
        if type == .reference { o["referenceTypes"] = .array(referenceTypes.map(JSON.string)) }
        if type == .complex { o["subAttributes"] = .array(subAttributes.map(\.json)) }
        o["mutability"] = .string(mutability.rawValue)
        o["returned"] = .string(returned.rawValue)
        o["uniqueness"] = .string(uniqueness.rawValue)
        return .object(o)
    }

    /// Reads a definition in the `/Schemas` format (custom extensions).
    public convenience init(json: JSON, path: String) throws(SCIMError) {
        guard let o = json.objectValue else { throw .invalidValue("\(path): attribute definition must be an object") }
        guard let name = o["name"]?.stringValue, !name.isEmpty, isAttributeName(name) else {
            throw .invalidValue("\(path).name: missing or not a valid attribute name")
        }
        func text(_ key: String, _ fallback: String) throws(SCIMError) -> String {
            guard let v = o[key] else { return fallback }
            guard let s = v.stringValue else { throw .invalidValue("\(path).\(key): must be a string") }
            return s
        }
        func flag(_ key: String) throws(SCIMError) -> Bool {
            guard let v = o[key] else { return false }
            guard let b = v.boolValue else { throw .invalidValue("\(path).\(key): must be a boolean") }
            return b
        }
        func strings(_ key: String) throws(SCIMError) -> [String] {
            guard let v = o[key] else { return [] }
            guard let a = v.arrayValue, a.allSatisfy({ $0.stringValue != nil }) else {
                throw .invalidValue("\(path).\(key): must be an array of strings")
            }
            return a.compactMap(\.stringValue)
        }
        guard let type = AttributeType(rawValue: try text("type", "string")) else {
            throw .invalidValue("\(path).type: unknown type '\(try text("type", ""))'")
        }
        guard let mutability = Mutability(rawValue: try text("mutability", "readWrite")) else {
            throw .invalidValue("\(path).mutability: unknown value")
        }
        guard let returned = Returned(rawValue: try text("returned", "default")) else {
            throw .invalidValue("\(path).returned: unknown value")
        }
        guard let uniqueness = Uniqueness(rawValue: try text("uniqueness", "none")) else {
            throw .invalidValue("\(path).uniqueness: unknown value")
        }
        var subs: [AttributeDefinition] = []
        if type == .complex {
            guard let list = o["subAttributes"]?.arrayValue, !list.isEmpty else {
                throw .invalidValue("\(path).subAttributes: a complex attribute needs sub-attributes")
            }
            for (k, s) in list.enumerated() {
                let sub = try AttributeDefinition(json: s, path: "\(path).subAttributes[\(k)]")
                guard sub.type != .complex else { throw .invalidValue("\(path).subAttributes[\(k)]: complex attributes cannot nest") }
                subs.append(sub)
            }
        }
        self.init(
            name, type, multiValued: try flag("multiValued"), description: try text("description", ""),
            required: try flag("required"), caseExact: try flag("caseExact"), mutability: mutability,
            returned: returned, uniqueness: uniqueness, canonicalValues: try strings("canonicalValues"),
            referenceTypes: try strings("referenceTypes"), subAttributes: subs)
    }
}

/// ATTRNAME = ALPHA *(nameChar), nameChar = "-" / "_" / DIGIT / ALPHA (RFC 7643 §2.1); `$ref` is allowed too.
func isAttributeName(_ s: String) -> Bool {
    if s == "$ref" { return true }
    guard let first = s.utf8.first, isAlpha(first) else { return false }
    return s.utf8.allSatisfy { isAlpha($0) || ($0 >= 48 && $0 <= 57) || $0 == 45 || $0 == 95 }
}

@inline(__always) func isAlpha(_ c: UInt8) -> Bool { (c >= 65 && c <= 90) || (c >= 97 && c <= 122) }

/// A schema: its URN and attributes. Immutable and shared.
extension [AttributeDefinition] {
    /// The definition called `name`: the exact spelling (what clients almost
    /// always send) first, then ignoring ASCII case (attribute names are
    /// case-insensitive, RFC 7643 §2.1). A length-first scan beats hashing
    /// the name for a schema's few dozen attributes.
    func named(_ name: String) -> AttributeDefinition? {
        first { sameUTF8($0.name, name) } ?? first { equalsIgnoringASCIICase($0.name, name) }
    }
}

public final class Schema: Sendable {
    public let id: String
    public let name: String
    public let description: String
    public let attributes: [AttributeDefinition]

    public init(id: String, name: String, description: String, attributes: [AttributeDefinition]) {
        self.id = id
        self.name = name
        self.description = description
        self.attributes = attributes
        requiredInput = attributes.filter { $0.required && $0.mutability != .readOnly }
    }

    /// Attributes a create or replace must carry.
    let requiredInput: [AttributeDefinition]

    public func attribute(_ name: String) -> AttributeDefinition? { attributes.named(name) }

    /// The `/Schemas` representation.
    public var json: JSON {
        [
            "schemas": ["urn:ietf:params:scim:schemas:core:2.0:Schema"],
            "id": .string(id), "name": .string(name), "description": .string(description),
            "attributes": .array(attributes.map(\.json)),
            "meta": ["resourceType": "Schema", "location": .string("/Schemas/\(id)")],
        ]
    }

    /// Reads a schema in the `/Schemas` format (custom extensions at start).
    public convenience init(json: JSON) throws(SCIMError) {
        guard let o = json.objectValue else { throw .invalidValue("schema must be a JSON object") }
        guard let id = o["id"]?.stringValue, id.hasPrefix("urn:") else { throw .invalidValue("schema id must be a URN") }
        guard let list = o["attributes"]?.arrayValue else { throw .invalidValue("\(id): 'attributes' must be an array") }
        var attributes: [AttributeDefinition] = []
        for (k, a) in list.enumerated() {
            let def = try AttributeDefinition(json: a, path: "\(id).attributes[\(k)]")
            guard !attributes.contains(where: { equalsIgnoringASCIICase($0.name, def.name) }) else {
                throw .invalidValue("\(id): attribute '\(def.name)' defined twice")
            }
            attributes.append(def)
        }
        self.init(
            id: id, name: o["name"]?.stringValue ?? id, description: o["description"]?.stringValue ?? "",
            attributes: attributes)
    }
}

/// A resource type: its endpoint, core schema and extensions (RFC 7643 §6).
public struct ResourceType: Sendable {
    public struct Extension: Sendable {
        public var schema: String
        public var required: Bool
    }
    public var id: String
    public var endpoint: String
    public var description: String
    public var schema: String
    public var extensions: [Extension]

    public var json: JSON {
        [
            "schemas": ["urn:ietf:params:scim:schemas:core:2.0:ResourceType"],
            "id": .string(id), "name": .string(id), "endpoint": .string(endpoint),
            "description": .string(description), "schema": .string(schema),
            "schemaExtensions": .array(extensions.map { ["schema": .string($0.schema), "required": .bool($0.required)] }),
            "meta": ["resourceType": "ResourceType", "location": .string("/ResourceTypes/\(id)")],
        ]
    }
}

public enum SchemaURN {
    public static let user = "urn:ietf:params:scim:schemas:core:2.0:User"
    public static let group = "urn:ietf:params:scim:schemas:core:2.0:Group"
    public static let enterpriseUser = "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User"
    public static let listResponse = "urn:ietf:params:scim:api:messages:2.0:ListResponse"
    public static let searchRequest = "urn:ietf:params:scim:api:messages:2.0:SearchRequest"
    public static let patchOp = "urn:ietf:params:scim:api:messages:2.0:PatchOp"
    public static let bulkRequest = "urn:ietf:params:scim:api:messages:2.0:BulkRequest"
    public static let bulkResponse = "urn:ietf:params:scim:api:messages:2.0:BulkResponse"
    public static let serviceProviderConfig = "urn:ietf:params:scim:schemas:core:2.0:ServiceProviderConfig"
}

// MARK: the standard definitions (RFC 7643 §4, §8.7.1)

private func multi(
    _ name: String, _ description: String, value: AttributeDefinition? = nil,
    types: [String], enforceTypes: Bool = false, primary: Bool = true,
    mutability: Mutability = .readWrite
) -> AttributeDefinition {
    var subs = [
        value ?? AttributeDefinition("value", description: "The value.", mutability: mutability),
        AttributeDefinition("display", description: "A human-readable name.", mutability: mutability),
        AttributeDefinition(
            "type", description: "A label indicating the attribute's function.",
            mutability: mutability, canonicalValues: types, enforceCanonicalValues: enforceTypes),
    ]
    if primary {
        subs.append(AttributeDefinition("primary", .boolean, description: "The primary value, at most one.", mutability: mutability))
    }
    return AttributeDefinition(
        name, .complex, multiValued: true, description: description, mutability: mutability,
        subAttributes: subs)
}

/// `id`, `externalId` and `meta`: on every resource, outside any schema (RFC 7643 §3.1).
/// `schemas` seen as an attribute, for filters (`schemas eq "urn:…"`).
let schemasAttribute = AttributeDefinition(
    "schemas", .reference, multiValued: true, mutability: .readOnly,
    returned: .always, referenceTypes: ["uri"])

public let commonAttributes: [AttributeDefinition] = [
    AttributeDefinition(
        "id", description: "Identifier assigned by the service provider.", caseExact: true,
        mutability: .readOnly, returned: .always, uniqueness: .server),
    AttributeDefinition("externalId", description: "Identifier assigned by the provisioning client.", caseExact: true),
    AttributeDefinition(
        "meta", .complex, description: "Resource metadata.", mutability: .readOnly,
        subAttributes: [
            AttributeDefinition("resourceType", caseExact: true, mutability: .readOnly),
            AttributeDefinition("created", .dateTime, mutability: .readOnly),
            AttributeDefinition("lastModified", .dateTime, mutability: .readOnly),
            AttributeDefinition("location", .reference, caseExact: true, mutability: .readOnly, referenceTypes: ["uri"]),
            AttributeDefinition("version", caseExact: true, mutability: .readOnly),
        ]),
]

public let userSchema = Schema(
    id: SchemaURN.user, name: "User", description: "User Account",
    attributes: [
        AttributeDefinition(
            "userName", description: "Unique identifier for the User, used to authenticate.",
            required: true, uniqueness: .server),
        AttributeDefinition(
            "name", .complex, description: "The components of the user's real name.",
            subAttributes: [
                AttributeDefinition("formatted"), AttributeDefinition("familyName"), AttributeDefinition("givenName"),
                AttributeDefinition("middleName"), AttributeDefinition("honorificPrefix"), AttributeDefinition("honorificSuffix"),
            ]),
        AttributeDefinition("displayName", description: "The name of the User, suitable for display."),
        AttributeDefinition("nickName"),
        AttributeDefinition("profileUrl", .reference, referenceTypes: ["external"]),
        AttributeDefinition("title"),
        AttributeDefinition("userType", description: "Relationship to the organisation, e.g. Employee, Contractor."),
        AttributeDefinition("preferredLanguage"),
        AttributeDefinition("locale"),
        AttributeDefinition("timezone"),
        AttributeDefinition("active", .boolean, description: "The User's administrative status."),
        AttributeDefinition("password", description: "The User's cleartext password.", mutability: .writeOnly, returned: .never),
        multi("emails", "Email addresses.", types: ["work", "home", "other"]),
        multi("phoneNumbers", "Phone numbers.", types: ["work", "home", "mobile", "fax", "pager", "other"]),
        multi("ims", "Instant messaging addresses.", types: ["aim", "gtalk", "icq", "xmpp", "msn", "skype", "qq", "yahoo"]),
        multi(
            "photos", "URLs of images of the User.",
            value: AttributeDefinition("value", .reference, referenceTypes: ["external"]), types: ["photo", "thumbnail"]),
        AttributeDefinition(
            "addresses", .complex, multiValued: true, description: "Physical mailing addresses.",
            subAttributes: [
                AttributeDefinition("formatted"), AttributeDefinition("streetAddress"), AttributeDefinition("locality"),
                AttributeDefinition("region"), AttributeDefinition("postalCode"), AttributeDefinition("country"),
                AttributeDefinition("type", canonicalValues: ["work", "home", "other"]),
                AttributeDefinition("primary", .boolean),
            ]),
        AttributeDefinition(
            "groups", .complex, multiValued: true, description: "Groups the user belongs to.",
            mutability: .readOnly,
            subAttributes: [
                AttributeDefinition("value", mutability: .readOnly),
                AttributeDefinition("$ref", .reference, mutability: .readOnly, referenceTypes: ["User", "Group"]),
                AttributeDefinition("display", mutability: .readOnly),
                AttributeDefinition("type", mutability: .readOnly, canonicalValues: ["direct", "indirect"], enforceCanonicalValues: true),
            ]),
        multi("entitlements", "Entitlements.", types: []),
        multi("roles", "Roles.", types: []),
        multi(
            "x509Certificates", "DER-encoded X.509 certificates.",
            value: AttributeDefinition("value", .binary), types: []),
    ])

public let groupSchema = Schema(
    id: SchemaURN.group, name: "Group", description: "Group",
    attributes: [
        // RFC 7643 §4.2 calls displayName REQUIRED (the §8.7.1 listing disagrees; we follow §4.2).
        AttributeDefinition("displayName", description: "A human-readable name for the Group.", required: true),
        AttributeDefinition(
            "members", .complex, multiValued: true, description: "A list of members of the Group.",
            subAttributes: [
                AttributeDefinition("value", caseExact: true, mutability: .immutable, description: "Identifier of the member."),
                AttributeDefinition("$ref", .reference, mutability: .immutable, referenceTypes: ["User", "Group"]),
                AttributeDefinition("display", mutability: .readOnly),
                AttributeDefinition("type", mutability: .immutable, canonicalValues: ["User", "Group"], enforceCanonicalValues: true),
            ]),
    ])

public let enterpriseUserSchema = Schema(
    id: SchemaURN.enterpriseUser, name: "EnterpriseUser",
    description: "Enterprise User",
    attributes: [
        AttributeDefinition("employeeNumber"),
        AttributeDefinition("costCenter"),
        AttributeDefinition("organization"),
        AttributeDefinition("division"),
        AttributeDefinition("department"),
        AttributeDefinition(
            "manager", .complex, description: "The User's manager.",
            subAttributes: [
                AttributeDefinition("value", caseExact: true, description: "The id of the manager."),
                AttributeDefinition("$ref", .reference, referenceTypes: ["User"]),
                AttributeDefinition("displayName", mutability: .readOnly),
            ]),
    ])

extension AttributeDefinition {
    convenience init(
        _ name: String, _ type: AttributeType = .string, caseExact: Bool = false, mutability: Mutability = .readWrite,
        description: String
    ) {
        self.init(name, type, description: description, caseExact: caseExact, mutability: mutability)
    }
}
