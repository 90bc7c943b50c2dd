/// The ListResponse of one page, its resources already rendered.
public func makeListResponse<Element>(_ page: ListPage<Element>, render: (Element) throws -> JSON) rethrows -> JSON {
    makeListResponse(
        resources: try page.items.map(render), totalResults: page.totalResults, startIndex: page.startIndex,
        nextCursor: page.nextCursor, previousCursor: page.previousCursor)
}

/// A ListResponse (RFC 7644 §3.4.2), with RFC 9865 cursors when given.
/// `itemsPerPage` is the number of `resources` unless given (a streamed
/// response: its resources follow the envelope, `streamedListResponse`).
public func makeListResponse(
    resources: [JSON], itemsPerPage: Int? = nil, totalResults: Int, startIndex: Int?, nextCursor: String? = nil,
    previousCursor: String? = nil
) -> JSON {
    var o: JSONObject = ["schemas": [.string(SchemaURN.listResponse)], "totalResults": .int(totalResults)]
    o["itemsPerPage"] = .int(itemsPerPage ?? resources.count)
    if let startIndex { o["startIndex"] = .int(startIndex) }
    if let nextCursor { o["nextCursor"] = .string(nextCursor) }
    if let previousCursor { o["previousCursor"] = .string(previousCursor) }
    o["Resources"] = .array(resources)
    return .object(o)
}
