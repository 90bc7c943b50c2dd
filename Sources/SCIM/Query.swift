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
    /// What a cursor is bound to: resource type, filter and sort.
    var signature = ""

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
        if let c = cursor, let bad = c.utf8.first(where: { !isUnreserved($0) }) {
            throw SCIMError(400, .invalidCursor, "cursor: character '\(Unicode.Scalar(bad))' is not allowed; a cursor is empty "
                            + "(first page) or a nextCursor / previousCursor value (RFC 9865 §2)")
        }
        let filterText = try text("filter") ?? ""
        let sortText = (try text("sortBy") ?? "").asciiLowercased
        signature = "\(type.id)\u{0}\(filterText)\u{0}\(sortText)\u{0}\(sortOrder.rawValue)"
        projection = try Projection(attributes: try names("attributes"), excluded: try names("excludedAttributes"),
                                    registry: registry, type: type)
    }

    /// Sorts `resources` by `sortBy` (stable; resources without a value go last).
    public func sorted(_ resources: [JSONObject]) -> [JSONObject] {
        sorted(resources) { $0 }
    }

    func sorted<Element>(_ items: [Element], resource: (Element) -> JSONObject) -> [Element] {
        guard let sortBy else { return items }
        let leaf = sortBy.leaf.type == .complex ? sortBy.leaf.subAttribute("value")! : sortBy.leaf
        let keyed = items.enumerated().map { (offset: $0.offset, item: $0.element, key: sortKey(resource($0.element), sortBy)) }
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
        }.map(\.item)
    }

    /// One page of already filtered and sorted resources (index pagination).
    public func page(_ resources: [JSONObject]) -> ArraySlice<JSONObject> {
        let from = min(startIndex - 1, resources.count)
        return resources[from..<min(from + count, resources.count)]
    }

    /// The page this request asks for out of `matches` (filtered, in any
    /// order): sorted by `sortBy` when `sortable`, then cut by cursor or by
    /// index. Cursor positions need a total order, so with a cursor the
    /// matches go by `id` first and `sortBy` (stable) breaks nothing.
    public func paginate<Element>(_ matches: [Element], sortable: Bool = true,
                                  resource: (Element) -> JSONObject) throws(SCIMError) -> ListPage<Element> {
        func id(_ e: Element) -> String { resource(e)["id"]?.stringValue ?? "" }
        let sortsBy = sortable && sortBy != nil
        var ordered = matches
        if cursor != nil { ordered.sort { id($0).utf8.lexicographicallyPrecedes(id($1).utf8) } }
        if sortsBy { ordered = sorted(ordered, resource: resource) }
        if cursor != nil { return try cursorPage(ordered, orderedByID: !sortsBy, id: id) }
        let from = min(startIndex - 1, ordered.count)
        return ListPage(items: ordered[from..<min(from + count, ordered.count)], totalResults: ordered.count, startIndex: startIndex)
    }
}

/// One page of a list, with what its ListResponse reports.
public struct ListPage<Element> {
    public var items: ArraySlice<Element>
    public var totalResults: Int
    /// Index pagination only.
    public var startIndex: Int?
    public var nextCursor: String?
    public var previousCursor: String?
}

// MARK: cursor pagination (RFC 9865)

/// RFC 3986 §2.3 unreserved characters: all a cursor may contain.
func isUnreserved(_ c: UInt8) -> Bool {
    switch c {
    case UInt8(ascii: "A")...UInt8(ascii: "Z"), UInt8(ascii: "a")...UInt8(ascii: "z"), UInt8(ascii: "0")...UInt8(ascii: "9"),
         UInt8(ascii: "-"), UInt8(ascii: "."), UInt8(ascii: "_"), UInt8(ascii: "~"): return true
    default: return false
    }
}

extension ListQuery {
    /// A cursor is a position, not server state: `<query>.<n|p><offset>.<id>`,
    /// where `<query>` binds it to the type, filter and sort it came from,
    /// `n` means "after the resource `id`" and `p` "before it" (both hex),
    /// and `offset` is where that resource was, used only when it has gone.
    /// Positions survive inserts and deletes elsewhere in the list, so a walk
    /// neither repeats nor skips a resource that stays put, and cursors never
    /// expire.
    ///
    /// `ordered` must be in a total order that does not depend on the page:
    /// by `id` when `orderedByID` (then a vanished anchor still has an exact
    /// successor), or sorted by `sortBy` with `id` as the tie-break.
    public func cursorPage<Element>(_ ordered: [Element], orderedByID: Bool,
                                    id: (Element) -> String) throws(SCIMError) -> ListPage<Element> {
        let tag = Self.hex(fnv1a(signature))
        var start = 0, end = min(count, ordered.count)
        if let cursor, !cursor.isEmpty {
            let parts = cursor.split(separator: ".", omittingEmptySubsequences: false)
            guard parts.count == 3, let kind = parts[1].first, kind == "n" || kind == "p",
                  let offset = Int(parts[1].dropFirst(), radix: 16), offset >= 0,
                  let anchorBytes = Self.unhex(parts[2]) else {
                throw SCIMError(400, .invalidCursor, "cursor '\(cursor)' was not issued by this server; start again with an empty cursor")
            }
            guard parts[0] == tag else {
                throw SCIMError(400, .invalidCursor, "cursor '\(cursor)' belongs to another query (resource type, filter "
                                + "or sort changed); start again with an empty cursor")
            }
            let anchor = String(decoding: anchorBytes, as: UTF8.self)
            // Where the anchor is now; else where it would be.
            let position: Int
            if let i = ordered.firstIndex(where: { id($0) == anchor }) {
                position = i
            } else if orderedByID {
                let after = ordered.firstIndex(where: { id($0).utf8.lexicographicallyPrecedes(anchor.utf8) == false }) ?? ordered.count
                position = kind == "n" ? after - 1 : after
            } else {
                position = min(offset, ordered.count)
            }
            if kind == "n" {
                start = min(position + 1, ordered.count)
                end = min(start + count, ordered.count)
            } else {
                end = max(0, min(position, ordered.count))
                start = max(0, end - count)
            }
        }
        var page = ListPage(items: ordered[start..<end], totalResults: ordered.count)
        if end < ordered.count, end > start {
            page.nextCursor = "\(tag).n\(String(end - 1, radix: 16)).\(Self.hex(Array(id(ordered[end - 1]).utf8)))"
        }
        if start > 0, start < ordered.count, count > 0 {
            page.previousCursor = "\(tag).p\(String(start, radix: 16)).\(Self.hex(Array(id(ordered[start]).utf8)))"
        }
        return page
    }

    static func hex(_ bytes: [UInt8]) -> String {
        let digits = Array("0123456789abcdef".utf8)
        var out: [UInt8] = []
        out.reserveCapacity(bytes.count * 2)
        for b in bytes { out.append(digits[Int(b >> 4)]); out.append(digits[Int(b & 15)]) }
        return String(decoding: out, as: UTF8.self)
    }

    static func hex(_ value: UInt64) -> String {
        hex((0..<8).map { UInt8(truncatingIfNeeded: value >> (56 - 8 * $0)) })
    }

    static func unhex(_ text: Substring) -> [UInt8]? {
        let u = Array(text.utf8)
        guard u.count % 2 == 0 else { return nil }
        var out: [UInt8] = []
        var i = 0
        while i < u.count {
            guard let h = hexValue(u[i]), let l = hexValue(u[i + 1]) else { return nil }
            out.append(h << 4 | l)
            i += 2
        }
        return out
    }
}

/// FNV-1a, 64 bits: a stable fingerprint (not a security measure; a cursor
/// only says where to continue a query the client may run anyway).
func fnv1a(_ text: String) -> UInt64 {
    var h: UInt64 = 0xcbf2_9ce4_8422_2325
    for b in text.utf8 { h = (h ^ UInt64(b)) &* 0x0000_0100_0000_01b3 }
    return h
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

    /// The names of every attribute and sub-attribute of `type` (its schemas
    /// and the common attributes) that a request without `attributes` or
    /// `excludedAttributes` never gets back (`returned: never` or `request`).
    /// A validated resource naming none of them is returned as it is.
    public static func namesHiddenByDefault(registry: SchemaRegistry, type: ResourceType) -> [String] {
        func hidden(_ defs: [AttributeDefinition]) -> [String] {
            defs.flatMap { def in
                (def.returned == .never || def.returned == .request ? [def.name] : []) + hidden(def.subAttributes)
            }
        }
        return hidden(commonAttributes + registry.schemas(of: type).flatMap(\.attributes))
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

/// The ListResponse of one page, its resources already rendered.
public func makeListResponse<Element>(_ page: ListPage<Element>, render: (Element) throws -> JSON) rethrows -> JSON {
    makeListResponse(resources: try page.items.map(render), totalResults: page.totalResults, startIndex: page.startIndex,
                     nextCursor: page.nextCursor, previousCursor: page.previousCursor)
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
