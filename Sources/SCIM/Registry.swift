/// `[URN ":"] attribute ["." subAttribute]` as written (RFC 7644 §3.10).
public struct AttributePath: Sendable, Equatable, CustomStringConvertible {
    /// The schema URN prefix, when the path was qualified with one.
    public var schema: String?
    public var attribute: String
    public var subAttribute: String?

    public init(schema: String? = nil, attribute: String, subAttribute: String? = nil) {
        self.schema = schema
        self.attribute = attribute
        self.subAttribute = subAttribute
    }

    public var description: String {
        (schema.map { $0 + ":" } ?? "") + attribute + (subAttribute.map { "." + $0 } ?? "")
    }
}

/// An attribute path resolved against a resource type's schemas.
public struct ResolvedAttribute: Sendable {
    /// The schema holding the attribute (`nil` for `id`, `externalId`, `meta`).
    public let schema: Schema?
    /// Extension attributes live under their schema URN in the resource.
    public let isExtension: Bool
    public let attribute: AttributeDefinition
    public let subAttribute: AttributeDefinition?

    /// The definition the path ends at.
    public var leaf: AttributeDefinition { subAttribute ?? attribute }
    /// Canonical spelling, URN-qualified for extensions.
    public var canonicalPath: String {
        (isExtension ? schema!.id + ":" : "") + attribute.name + (subAttribute.map { "." + $0.name } ?? "")
    }
}

/// The schemas and resource types a service provider knows.
public struct SchemaRegistry: Sendable {
    public private(set) var schemas: [Schema]
    public private(set) var resourceTypes: [ResourceType]

    /// User (with the EnterpriseUser extension) and Group.
    public static let standard = SchemaRegistry(
        schemas: [userSchema, enterpriseUserSchema, groupSchema],
        resourceTypes: [
            ResourceType(
                id: "User", endpoint: "/Users", description: "User Account", schema: SchemaURN.user,
                extensions: [.init(schema: SchemaURN.enterpriseUser, required: false)]),
            ResourceType(id: "Group", endpoint: "/Groups", description: "Group", schema: SchemaURN.group, extensions: []),
        ])

    public init(schemas: [Schema], resourceTypes: [ResourceType]) {
        self.schemas = schemas
        self.resourceTypes = resourceTypes
    }

    /// Adds a custom extension schema (read from `/Schemas` JSON) to a
    /// resource type; the same schema may extend several types.
    public mutating func addExtension(_ schema: Schema, to resourceType: String, required: Bool = false) throws(SCIMError) {
        if let known = self.schema(schema.id), known !== schema {
            throw .invalidValue("schema \(schema.id) is already defined")
        }
        guard let k = resourceTypes.firstIndex(where: { equalsIgnoringASCIICase($0.id, resourceType) }) else {
            throw .invalidValue("unknown resource type '\(resourceType)'")
        }
        guard !resourceTypes[k].extensions.contains(where: { equalsIgnoringASCIICase($0.schema, schema.id) }) else {
            throw .invalidValue("\(resourceType) already has the extension \(schema.id)")
        }
        if self.schema(schema.id) == nil { schemas.append(schema) }
        resourceTypes[k].extensions.append(.init(schema: schema.id, required: required))
    }

    public func schema(_ id: String) -> Schema? { schemas.first { equalsIgnoringASCIICase($0.id, id) } }

    public func resourceType(_ id: String) -> ResourceType? {
        resourceTypes.first { equalsIgnoringASCIICase($0.id, id) }
    }

    public func resourceType(endpoint: String) -> ResourceType? {
        resourceTypes.first { equalsIgnoringASCIICase($0.endpoint, endpoint) }
    }

    /// The schemas of a resource type: core first, then extensions.
    public func schemas(of type: ResourceType) -> [Schema] {
        ([type.schema] + type.extensions.map(\.schema)).compactMap { schema($0) }
    }

    /// The extension schema of `type` whose URN is `urn` (any case).
    public func extensionSchema(_ urn: String, of type: ResourceType) -> Schema? {
        guard type.extensions.contains(where: { equalsIgnoringASCIICase($0.schema, urn) }) else { return nil }
        return schema(urn)
    }

    /// Splits `text` into an attribute path: a URN prefix is recognised when
    /// it names one of `type`'s schemas. `nil` when the text is not a path.
    public func parsePath(_ text: String, in type: ResourceType) -> AttributePath? {
        var rest = Substring(text)
        var urn: String?
        if text.utf8.count > 4, equalsIgnoringASCIICase(String(text.prefix(4)), "urn:") {
            let candidates = schemas(of: type).map(\.id)
            guard
                let match = candidates.sorted(by: { $0.count > $1.count }).first(where: { id in
                    text.utf8.count > id.utf8.count + 1 && equalsIgnoringASCIICase(String(text.prefix(id.count)), id)
                        && text.utf8[text.utf8.index(text.utf8.startIndex, offsetBy: id.utf8.count)] == UInt8(ascii: ":")
                })
            else {
                // A bare extension URN (the whole extension object) is a path too.
                if let whole = candidates.first(where: { equalsIgnoringASCIICase($0, text) }) {
                    return AttributePath(schema: whole, attribute: "")
                }
                return nil
            }
            urn = match
            rest = text.dropFirst(match.count + 1)
        }
        let parts = rest.split(separator: ".", maxSplits: 1, omittingEmptySubsequences: false)
        guard let first = parts.first, isAttributeName(String(first)) else { return nil }
        if parts.count == 2 {
            guard isAttributeName(String(parts[1])) else { return nil }
            return AttributePath(schema: urn, attribute: String(first), subAttribute: String(parts[1]))
        }
        return AttributePath(schema: urn, attribute: String(first))
    }

    /// Resolves a path against `type`; `nil` when no such attribute exists.
    public func resolve(_ path: AttributePath, in type: ResourceType) -> ResolvedAttribute? {
        let schema: Schema?
        var isExtension = false
        if let urn = path.schema {
            guard let s = self.schema(urn), schemas(of: type).contains(where: { $0.id == s.id }) else { return nil }
            schema = s
            isExtension = !equalsIgnoringASCIICase(s.id, type.schema)
        } else {
            schema = self.schema(type.schema)
        }
        let definition: AttributeDefinition
        var owner = schema
        if let d = schema?.attribute(path.attribute) {
            definition = d
        } else if !isExtension, let d = commonAttributes.first(where: { equalsIgnoringASCIICase($0.name, path.attribute) }) {
            definition = d
            owner = nil
        } else if !isExtension, path.schema == nil, equalsIgnoringASCIICase(path.attribute, "schemas") {
            // Filterable like an attribute (RFC 7644 §3.4.2.2 filters on it), never writable.
            definition = schemasAttribute
            owner = nil
        } else {
            return nil
        }
        var sub: AttributeDefinition?
        if let name = path.subAttribute {
            guard definition.type == .complex, let s = definition.subAttribute(name) else { return nil }
            sub = s
        }
        return ResolvedAttribute(schema: owner, isExtension: isExtension, attribute: definition, subAttribute: sub)
    }

    // MARK: discovery documents (RFC 7644 §4)

    /// `/Schemas` as a ListResponse.
    public var schemasDocument: JSON {
        listResponse(schemas.map(\.json))
    }

    /// `/ResourceTypes` as a ListResponse.
    public var resourceTypesDocument: JSON {
        listResponse(resourceTypes.map(\.json))
    }
}

func listResponse(_ resources: [JSON]) -> JSON {
    [
        "schemas": [.string(SchemaURN.listResponse)], "totalResults": .int(resources.count),
        "itemsPerPage": .int(resources.count), "startIndex": 1, "Resources": .array(resources),
    ]
}

/// What the service provider supports, for `/ServiceProviderConfig`.
public struct ServiceProviderFeatures: Sendable {
    public var patch = true
    public var bulk = true
    public var bulkMaxOperations = 1000
    public var bulkMaxPayloadSize = 1 << 20
    public var filter = true
    public var filterMaxResults = 1000
    public var changePassword = false
    public var sort = true
    public var etag = true
    public var cursorPagination = true
    public var documentationURI: String?
    public init() {}

    public var json: JSON {
        var o: JSONObject = [
            "schemas": [.string(SchemaURN.serviceProviderConfig)],
            "patch": ["supported": .bool(patch)],
            "bulk": ["supported": .bool(bulk), "maxOperations": .int(bulkMaxOperations), "maxPayloadSize": .int(bulkMaxPayloadSize)],
            "filter": ["supported": .bool(filter), "maxResults": .int(filterMaxResults)],
            "changePassword": ["supported": .bool(changePassword)],
            "sort": ["supported": .bool(sort)],
            "etag": ["supported": .bool(etag)],
            // Cursors are positions, not server-side state, so they never
            // expire: no cursorTimeout (RFC 9865 §4).
            "pagination": [
                "cursor": .bool(cursorPagination), "index": true, "defaultPaginationMethod": "index",
                "defaultPageSize": .int(filterMaxResults), "maxPageSize": .int(filterMaxResults),
            ],
            "authenticationSchemes": [
                [
                    "type": "oauthbearertoken", "name": "OAuth Bearer Token", "primary": true,
                    "description": "Authentication with a bearer token (RFC 6750).",
                    "specUri": "https://www.rfc-editor.org/info/rfc6750",
                ]
            ],
            "meta": ["resourceType": "ServiceProviderConfig", "location": "/ServiceProviderConfig"],
        ]
        if let documentationURI { o["documentationUri"] = .string(documentationURI) }
        return .object(o)
    }
}

extension SchemaRegistry {
    /// `resource` without its writeOnly attributes and sub-attributes, core
    /// and extension (RFC 7643 §2.2: such values are never returned). The
    /// agent accepts them and drops them: it does not manage credentials, so
    /// a `password` is neither stored nor relayed.
    public func removingWriteOnly(_ resource: JSONObject, of type: ResourceType) -> JSONObject {
        /// A member's value without its writeOnly parts; nil: the member goes.
        func kept(_ key: String, _ value: JSON, _ defs: [AttributeDefinition]) -> JSON? {
            guard let def = defs.named(key) else { return value }
            if def.mutability == .writeOnly { return nil }
            let subs = def.subAttributes
            guard subs.contains(where: { $0.mutability == .writeOnly }) else { return value }
            switch value {
            case .object(let o): return .object(strip(o, subs))
            case .array(let items): return .array(items.map { $0.objectValue.map { .object(strip($0, subs)) } ?? $0 })
            default: return value
            }
        }
        func strip(_ object: JSONObject, _ defs: [AttributeDefinition]) -> JSONObject {
            var out = JSONObject()
            for (key, value) in object { if let v = kept(key, value, defs) { out[key] = v } }
            return out
        }
        let core = schema(type.schema)?.attributes ?? []
        var out = JSONObject()
        for (key, value) in resource {
            if let ext = extensionSchema(key, of: type), let inner = value.objectValue {
                out[key] = .object(strip(inner, ext.attributes))
            } else if let v = kept(key, value, core) {
                out[key] = v
            }
        }
        return out
    }
}
