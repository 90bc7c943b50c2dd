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

func percentDecode(_ s: Substring) -> String? {
    var bytes: [UInt8] = []
    var it = Array(s.utf8)[...]
    while let c = it.popFirst() {
        if c == UInt8(ascii: "+") { bytes.append(0x20); continue }
        guard c == UInt8(ascii: "%") else { bytes.append(c); continue }
        guard let h = it.popFirst(), let l = it.popFirst(), let hv = hexValue(h), let lv = hexValue(l) else { return nil }
        bytes.append(hv << 4 | lv)
    }
    return String(validating: bytes, as: UTF8.self)
}

private func hexValue(_ c: UInt8) -> UInt8? {
    switch c {
    case 48...57: return c - 48
    case 65...70: return c - 55
    case 97...102: return c - 87
    default: return nil
    }
}

public enum SortOrder: String, Sendable { case ascending, descending }

/// A list request: from the query string of `GET /Users` or the body of
/// `POST /Users/.search` (RFC 7644 §3.4.2, §3.4.3), with RFC 9865 cursors.
public struct ListQuery: Sendable {
    public var filter: Filter?
    public var sortBy: ResolvedAttribute?
    public var sortOrder: SortOrder = .ascending
    /// 1-based (index pagination).
    public var startIndex = 1
    public var count: Int
    /// Cursor pagination when non-nil; `""` asks for the first page.
    public var cursor: String?
    public var projection: Projection

    /// Parses the query parameters. `maxResults` caps `count`.
    public init(parameters: [String: String], registry: SchemaRegistry, type: ResourceType,
                maxResults: Int = 1000, profile: ClientProfile = .lenient) throws(SCIMError) {
        var body = JSONObject()
        for (k, v) in parameters { body[k] = .string(v) }
        try self.init(body, fromQuery: true, registry: registry, type: type, maxResults: maxResults, profile: profile)
    }

    /// Parses a `/.search` body.
    public init(searchBody: JSON, registry: SchemaRegistry, type: ResourceType, maxResults: Int = 1000,
                profile: ClientProfile = .lenient) throws(SCIMError) {
        guard let o = searchBody.objectValue else { throw .invalidSyntax("the search request must be a JSON object") }
        guard let schemas = o["schemas"]?.arrayValue,
              schemas.contains(where: { $0.stringValue.map { equalsIgnoringASCIICase($0, SchemaURN.searchRequest) } ?? false }) else {
            throw .invalidSyntax("'schemas' must contain \(SchemaURN.searchRequest)")
        }
        try self.init(o, fromQuery: false, registry: registry, type: type, maxResults: maxResults, profile: profile)
    }

    init(_ o: JSONObject, fromQuery: Bool, registry: SchemaRegistry, type: ResourceType, maxResults: Int,
         profile: ClientProfile) throws(SCIMError) {
        let known = ["schemas", "filter", "sortby", "sortorder", "startindex", "count", "cursor", "attributes", "excludedattributes"]
        for key in o.keys where !known.contains(key.asciiLowercased) {
            if !fromQuery { throw .invalidSyntax("unknown member '\(key)' in a search request") }
        }
        func text(_ key: String) throws(SCIMError) -> String? {
            guard let v = o[key] else { return nil }
            guard let s = v.stringValue else { throw .invalidValue("'\(key)' must be a string") }
            return s
        }
        func integer(_ key: String) throws(SCIMError) -> Int? {
            guard let v = o[key] else { return nil }
            if let n = v.numberValue?.integer { return Int(clamping: n) }
            if let s = v.stringValue, let n = Int(s) { return n }
            throw .invalidValue("'\(key)' must be an integer")
        }
        func names(_ key: String) throws(SCIMError) -> [String] {
            guard let v = o[key] else { return [] }
            if let s = v.stringValue {
                return s.split(separator: ",").map { String($0).trimmingSpaces }.filter { !$0.isEmpty }
            }
            if let a = v.arrayValue, a.allSatisfy({ $0.stringValue != nil }) { return a.compactMap(\.stringValue) }
            throw .invalidValue("'\(key)' must be a comma-separated string or an array of strings")
        }
        if let f = try text("filter"), !f.isEmpty {
            filter = try Filter(f, registry: registry, type: type, profile: profile)
        }
        if let s = try text("sortBy"), !s.isEmpty {
            guard let path = registry.parsePath(s, in: type), !path.attribute.isEmpty,
                  let resolved = registry.resolve(path, in: type) else {
                throw .invalidValue("sortBy: '\(s)' is not an attribute of resource type \(type.id)")
            }
            guard resolved.leaf.type != .complex || resolved.leaf.subAttribute("value") != nil else {
                throw .invalidValue("sortBy: '\(s)' is complex; name one of its sub-attributes")
            }
            sortBy = resolved
        }
        if let order = try text("sortOrder") {
            guard let o = SortOrder(rawValue: order.asciiLowercased) else {
                throw .invalidValue("sortOrder must be 'ascending' or 'descending'")
            }
            sortOrder = o
        }
        startIndex = max(1, try integer("startIndex") ?? 1)  // RFC 7644 §3.4.2.4: below 1 means 1
        count = min(max(0, try integer("count") ?? maxResults), maxResults)
        cursor = try text("cursor")
        if cursor != nil && o["startIndex"] != nil {
            throw .invalidValue("use either 'cursor' or 'startIndex', not both (RFC 9865)")
        }
        projection = try Projection(attributes: try names("attributes"), excluded: try names("excludedAttributes"),
                                    registry: registry, type: type)
    }

    /// Sorts `resources` by `sortBy` (stable; resources without a value go last).
    public func sorted(_ resources: [JSONObject]) -> [JSONObject] {
        guard let sortBy else { return resources }
        let leaf = sortBy.leaf.type == .complex ? sortBy.leaf.subAttribute("value")! : sortBy.leaf
        let keyed = resources.enumerated().map { (offset: $0.offset, resource: $0.element, key: sortKey($0.element, sortBy)) }
        let ascending = sortOrder == .ascending
        return keyed.sorted { a, b in
            switch (a.key, b.key) {
            case (nil, nil): return a.offset < b.offset
            case (nil, _): return false
            case (_, nil): return true
            case (let x?, let y?):
                if sortEqual(x, y, leaf) { return a.offset < b.offset }
                return sortLess(x, y, leaf) == ascending
            }
        }.map(\.resource)
    }

    /// One page of already filtered and sorted resources (index pagination).
    public func page(_ resources: [JSONObject]) -> ArraySlice<JSONObject> {
        let from = min(startIndex - 1, resources.count)
        return resources[from..<min(from + count, resources.count)]
    }
}

extension String {
    /// Without leading and trailing spaces.
    public var trimmingSpaces: String {
        var s = Substring(self)
        while s.first == " " { s = s.dropFirst() }
        while s.last == " " { s = s.dropLast() }
        return String(s)
    }
}

/// The value a resource sorts by: for a multi-valued attribute, the primary
/// value, else the first (RFC 7644 §3.4.2.3).
func sortKey(_ resource: JSONObject, _ path: ResolvedAttribute) -> JSON? {
    let scope = path.isExtension ? resource[path.schema!.id]?.objectValue : resource
    guard let v = scope?[path.attribute.name] else { return nil }
    let sub = path.subAttribute?.name ?? (path.attribute.type == .complex ? "value" : nil)
    if let items = v.arrayValue {
        let chosen = items.first { $0["primary"] == .bool(true) } ?? items.first
        return sub.flatMap { chosen?[$0] } ?? (sub == nil ? chosen : nil)
    }
    return sub.map { v[$0] } ?? v
}

func sortEqual(_ a: JSON, _ b: JSON, _ def: AttributeDefinition) -> Bool {
    !sortLess(a, b, def) && !sortLess(b, a, def)
}

func sortLess(_ a: JSON, _ b: JSON, _ def: AttributeDefinition) -> Bool {
    switch (a, b) {
    case (.number(let x), .number(let y)): return x.double < y.double
    case (.bool(let x), .bool(let y)): return !x && y
    case (.string(let x), .string(let y)):
        if def.type == .dateTime, let dx = DateTimeValue(x), let dy = DateTimeValue(y) { return dx < dy }
        return def.caseExact ? x < y : x.lowercased() < y.lowercased()
    default: return false
    }
}

/// `attributes` / `excludedAttributes` (RFC 7644 §3.4.2.5, §3.9) combined
/// with each attribute's `returned` characteristic.
public struct Projection: Sendable {
    public let attributes: [ResolvedAttribute]
    public let excluded: [ResolvedAttribute]
    /// Extension URNs requested or excluded as a whole.
    let wholeExtensions: [String]
    let excludedExtensions: [String]
    let registry: SchemaRegistry
    let type: ResourceType

    public init(attributes: [String] = [], excluded: [String] = [], registry: SchemaRegistry,
                type: ResourceType) throws(SCIMError) {
        self.registry = registry
        self.type = type
        func resolve(_ names: [String], _ param: String) throws(SCIMError) -> ([ResolvedAttribute], [String]) {
            var attrs: [ResolvedAttribute] = [], exts: [String] = []
            for n in names {
                guard let p = registry.parsePath(n, in: type) else {
                    throw .invalidValue("\(param): '\(n)' is not an attribute of resource type \(type.id)")
                }
                if p.attribute.isEmpty { exts.append(p.schema!); continue }
                guard let r = registry.resolve(p, in: type) else {
                    throw .invalidValue("\(param): '\(n)' is not an attribute of resource type \(type.id)")
                }
                attrs.append(r)
            }
            return (attrs, exts)
        }
        (self.attributes, self.wholeExtensions) = try resolve(attributes, "attributes")
        (self.excluded, self.excludedExtensions) = try resolve(excluded, "excludedAttributes")
    }

    public static func none(registry: SchemaRegistry, type: ResourceType) -> Projection {
        try! Projection(registry: registry, type: type)
    }

    var selective: Bool { !attributes.isEmpty || !wholeExtensions.isEmpty }

    /// The resource as returned to a client.
    public func apply(to resource: JSONObject) -> JSONObject {
        var out = JSONObject()
        for (key, value) in resource {
            if equalsIgnoringASCIICase(key, "schemas") { out[key] = value; continue }
            if let ext = registry.extensionSchema(key, of: type) {
                guard let inner = value.objectValue else { continue }
                let whole = wholeExtensions.contains { equalsIgnoringASCIICase($0, ext.id) }
                if excludedExtensions.contains(where: { equalsIgnoringASCIICase($0, ext.id) }) { continue }
                var kept = JSONObject()
                for (k2, v2) in inner {
                    guard let def = ext.attribute(k2) else { continue }
                    if let v = project(v2, def, schema: ext.id, isExtension: true, forceWhole: whole) { kept[k2] = v }
                }
                if !kept.isEmpty { out[key] = .object(kept) }
                continue
            }
            guard let def = registry.schema(type.schema)?.attribute(key)
                    ?? commonAttributes.first(where: { equalsIgnoringASCIICase($0.name, key) }) else { continue }
            if let v = project(value, def, schema: nil, isExtension: false, forceWhole: false) { out[key] = v }
        }
        return out
    }

    private func matches(_ r: ResolvedAttribute, _ def: AttributeDefinition, _ isExtension: Bool, _ schema: String?) -> Bool {
        equalsIgnoringASCIICase(r.attribute.name, def.name) && r.isExtension == isExtension
            && (!isExtension || equalsIgnoringASCIICase(r.schema?.id ?? "", schema ?? ""))
    }

    private func project(_ value: JSON, _ def: AttributeDefinition, schema: String?, isExtension: Bool,
                         forceWhole: Bool) -> JSON? {
        switch def.returned {
        case .never: return nil
        case .always: return value
        default: break
        }
        let requested = attributes.filter { matches($0, def, isExtension, schema) }
        if selective && !forceWhole {
            guard !requested.isEmpty else { return nil }
            if requested.contains(where: { $0.subAttribute == nil }) { return stripNever(value, def) }
            let subs = requested.compactMap(\.subAttribute?.name)
            return keepSubAttributes(value, def, subs)
        }
        if def.returned == .request && !forceWhole { return nil }
        let excludedHere = excluded.filter { matches($0, def, isExtension, schema) }
        if excludedHere.contains(where: { $0.subAttribute == nil }) { return nil }
        let dropSubs = excludedHere.compactMap(\.subAttribute?.name)
        return dropSubAttributes(stripNever(value, def), def, dropSubs)
    }

    private func stripNever(_ value: JSON, _ def: AttributeDefinition) -> JSON {
        let never = def.subAttributes.filter { $0.returned == .never || $0.returned == .request }.map(\.name)
        return never.isEmpty ? value : dropSubAttributes(value, def, never) ?? value
    }

    private func keepSubAttributes(_ value: JSON, _ def: AttributeDefinition, _ subs: [String]) -> JSON? {
        let always = def.subAttributes.filter { $0.returned == .always }.map(\.name)
        func keep(_ v: JSON) -> JSON? {
            guard let o = v.objectValue else { return v }
            let kept = JSONObject(o.members.filter { m in (subs + always).contains { equalsIgnoringASCIICase($0, m.key) } })
            return kept.isEmpty ? nil : .object(kept)
        }
        if let items = value.arrayValue {
            let kept = items.compactMap(keep)
            return kept.isEmpty ? nil : .array(kept)
        }
        return keep(value)
    }

    private func dropSubAttributes(_ value: JSON, _ def: AttributeDefinition, _ subs: [String]) -> JSON? {
        guard !subs.isEmpty else { return value }
        func drop(_ v: JSON) -> JSON? {
            guard let o = v.objectValue else { return v }
            let kept = JSONObject(o.members.filter { m in
                !subs.contains { equalsIgnoringASCIICase($0, m.key) }
                    || def.subAttribute(m.key)?.returned == .always
            })
            return kept.isEmpty ? nil : .object(kept)
        }
        if let items = value.arrayValue {
            let kept = items.compactMap(drop)
            return kept.isEmpty ? nil : .array(kept)
        }
        return drop(value)
    }
}

/// A ListResponse (RFC 7644 §3.4.2), with RFC 9865 cursors when given.
public func makeListResponse(resources: [JSON], totalResults: Int, startIndex: Int?, nextCursor: String? = nil,
                             previousCursor: String? = nil) -> JSON {
    var o: JSONObject = ["schemas": [.string(SchemaURN.listResponse)], "totalResults": .int(totalResults)]
    o["itemsPerPage"] = .int(resources.count)
    if let startIndex { o["startIndex"] = .int(startIndex) }
    if let nextCursor { o["nextCursor"] = .string(nextCursor) }
    if let previousCursor { o["previousCursor"] = .string(previousCursor) }
    o["Resources"] = .array(resources)
    return .object(o)
}

// MARK: ETags (RFC 7644 §3.14)

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
