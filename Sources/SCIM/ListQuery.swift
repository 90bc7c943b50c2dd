public enum SortOrder: String, Sendable { case ascending, descending }

/// A list request: from the query string of `GET /Users` or the body of
/// `POST /Users/.search` (RFC 7644 §3.4.2, §3.4.3), with RFC 9865 cursors.
public struct ListQuery: Sendable {
    public var filter: Filter?
    public var sortBy: ResolvedAttribute?
    public var sortOrder: SortOrder = .ascending
    /// 1-based (index pagination).
    public var startIndex = 1
    /// Whether the request named `startIndex` (index pagination asked for),
    /// as opposed to naming neither `startIndex` nor `cursor`.
    public var namesStartIndex = false
    public var count: Int
    /// Cursor pagination when non-nil; `""` asks for the first page.
    public var cursor: String?
    public var projection: Projection
    /// What a cursor is bound to: resource type, filter and sort.
    var signature = ""

    /// Parses the query parameters. `maxResults` caps `count`.
    public init(
        parameters: [String: String], registry: SchemaRegistry, type: ResourceType,
        maxResults: Int = 1000, profile: ClientProfile = .lenient
    ) throws(SCIMError) {
        var body = JSONObject()
        for (k, v) in parameters { body[k] = .string(v) }
        try self.init(body, fromQuery: true, registry: registry, type: type, maxResults: maxResults, profile: profile)
    }

    /// Parses a `/.search` body.
    public init(
        searchBody: JSON, registry: SchemaRegistry, type: ResourceType, maxResults: Int = 1000,
        profile: ClientProfile = .lenient
    ) throws(SCIMError) {
        guard let o = searchBody.objectValue else { throw .invalidSyntax("the search request must be a JSON object") }
        guard let schemas = o["schemas"]?.arrayValue,
            schemas.contains(where: { $0.stringValue.map { equalsIgnoringASCIICase($0, SchemaURN.searchRequest) } ?? false })
        else {
            throw .invalidSyntax("'schemas' must contain \(SchemaURN.searchRequest)")
        }
        try self.init(o, fromQuery: false, registry: registry, type: type, maxResults: maxResults, profile: profile)
    }

    init(
        _ o: JSONObject, fromQuery: Bool, registry: SchemaRegistry, type: ResourceType, maxResults: Int,
        profile: ClientProfile
    ) throws(SCIMError) {
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
                let resolved = registry.resolve(path, in: type)
            else {
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
        namesStartIndex = o["startIndex"] != nil
        count = min(max(0, try integer("count") ?? maxResults), maxResults)
        cursor = try text("cursor")
        if cursor != nil && o["startIndex"] != nil {
            throw .invalidValue("use either 'cursor' or 'startIndex', not both (RFC 9865)")
        }
        if let c = cursor, let bad = c.utf8.first(where: { !isUnreserved($0) }) {
            throw SCIMError(
                400, .invalidCursor,
                "cursor: character '\(Unicode.Scalar(bad))' is not allowed; a cursor is empty "
                    + "(first page) or a nextCursor / previousCursor value (RFC 9865 §2)")
        }
        let filterText = try text("filter") ?? ""
        let sortText = (try text("sortBy") ?? "").asciiLowercased
        signature = "\(type.id)\u{0}\(filterText)\u{0}\(sortText)\u{0}\(sortOrder.rawValue)"
        projection = try Projection(
            attributes: try names("attributes"), excluded: try names("excludedAttributes"),
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
    public func paginate<Element>(
        _ matches: [Element], sortable: Bool = true,
        resource: (Element) -> JSONObject
    ) throws(SCIMError) -> ListPage<Element> {
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

    public init(
        items: ArraySlice<Element>, totalResults: Int, startIndex: Int? = nil, nextCursor: String? = nil,
        previousCursor: String? = nil
    ) {
        self.items = items
        self.totalResults = totalResults
        self.startIndex = startIndex
        self.nextCursor = nextCursor
        self.previousCursor = previousCursor
    }
}
