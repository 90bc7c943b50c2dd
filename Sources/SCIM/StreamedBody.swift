/// The pieces of a response body produced one at a time, nil after the
/// last: for a body streamed as the connection drains (EdgeHTTP's
/// `BodyStream`), so that memory holds a piece, not the body. The agent's
/// and the broker's reads of large groups share these.
public typealias BodyPieces = () throws -> [UInt8]?

/// `bytes` as the one piece of a body.
public func onePiece(_ bytes: [UInt8]) -> BodyPieces {
    var sent = false
    return {
        if sent { return nil }
        sent = true
        return bytes
    }
}

/// `head`, then the pieces of `rest`.
public func pieces(head: [UInt8], then rest: @escaping BodyPieces) -> BodyPieces {
    var sentHead = false
    return {
        if sentHead { return try rest() }
        sentHead = true
        return head
    }
}

/// The opening of a streamed `members` array after a resource's other
/// attributes (`storedArrayPieces` in EdgeStore sends it, then the
/// elements, then `]}`, or just `}` when no element is sent).
public let streamedMembersOpening = Array(#","members":["#.utf8)

/// A resource whose `members` follow streamed: `resource` (projected,
/// without its members) serialised up to its closing brace, then the
/// pieces of `members`, which open the array (`streamedMembersOpening`)
/// and close the object. `resource` always holds `id` (returned always), so
/// the members follow a member of it.
public func streamedResource(_ resource: JSONObject, members: @escaping BodyPieces) -> BodyPieces {
    var head = JSON.object(resource).serialized()
    head.removeLast()  // the closing brace: the members follow
    return pieces(head: head, then: members)
}

extension Projection {
    /// A member of a group with every sub-attribute `members` has.
    var everyMemberSubAttribute: JSON {
        .object(
            JSONObject(
                (registry.schema(type.schema)?.attribute("members")?.subAttributes ?? []).map {
                    (key: $0.name, value: JSON.string("x"))
                }))
    }

    /// Whether it returns a group's `members` (false for any other type):
    /// when it does not, the members index is never read. Asked of a member
    /// with every sub-attribute, so that `attributes=members.display` does.
    public var returnsMembers: Bool {
        type.id == "Group" && apply(to: ["members": [everyMemberSubAttribute]])["members"] != nil
    }

    /// How each member of a group streamed from the index is sent: nil when
    /// the projection keeps a member whole (as stored: `attributes=members`,
    /// `excludedAttributes=displayName`, none), else a function from a stored
    /// member to the one sent, projected (`attributes=members.value`,
    /// `excludedAttributes=members.display`; nil: nothing of it is kept).
    /// What `apply` does to the whole array, one member at a time.
    public var memberElement: (([UInt8]) throws -> [UInt8]?)? {
        // If the projection keeps a member with every sub-attribute whole, members go as stored.
        let every = everyMemberSubAttribute
        guard apply(to: ["members": [every]])["members"] != [every] else { return nil }
        return { [self] stored in
            apply(to: ["members": [try JSONParser.parse(stored, limits: .stored)]])["members"]?.arrayValue?.first?.serialized()
        }
    }
}

/// A ListResponse sent a resource at a time: the envelope `makeListResponse`
/// makes (its `Resources` last), then each item's pieces (`render`, called
/// as the body reaches it), then `]}`. Pieces are gathered to about 16 KiB,
/// so that small resources do not each make a chunk. Memory holds the
/// page's items as `render` takes them (a group without its members) and
/// the piece being made.
public func streamedListResponse<Element>(_ page: ListPage<Element>, render: @escaping (Element) throws -> BodyPieces) -> BodyPieces {
    var head = makeListResponse(
        resources: [], itemsPerPage: page.items.count, totalResults: page.totalResults, startIndex: page.startIndex,
        nextCursor: page.nextCursor, previousCursor: page.previousCursor
    ).serialized()
    head.removeLast(2)  // `]}`: the resources follow
    var items = page.items, current: BodyPieces?, first = true, finished = false
    let gather = 16_384
    return {
        guard !finished else { return nil }
        var out = head
        head = []
        while out.count < gather {
            if let pieces = current {
                if let piece = try pieces() {
                    out.append(contentsOf: piece)
                    continue
                }
                current = nil
            }
            guard let item = items.popFirst() else {
                out.append(contentsOf: Array("]}".utf8))
                finished = true
                break
            }
            if !first { out.append(UInt8(ascii: ",")) }
            first = false
            current = try render(item)
        }
        return out
    }
}
