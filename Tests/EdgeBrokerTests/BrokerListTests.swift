import EdgeBroker
import EdgeStore
import EdgeTestSupport
import Foundation
import SCIM
import XCTest

/// Events of one agent store for list tests: users `u<k>` with broker ids
/// `b-<k, 5 digits>` (so broker id order is k's order), written through
/// `BrokerStore.apply` in batches.
struct ListFixture {
    static let agent = AgentKey(identity: "spiffe://t/acme-de/agent-1", epoch: "e1")
    var seq: UInt64 = 0

    static func brokerID(_ k: Int) -> String { String(format: "b-%05d", k) }

    mutating func event(_ uri: String, _ body: JSONObject) -> RelayEvent {
        seq += 1
        return RelayEvent(seq: seq, body: ["seq": .number(JSONNumber(integer: Int64(seq))), "events": .object([uri: .object(body)])])
    }

    /// User k: `active` unless k % 4 == 0, `userType` Contractor when
    /// k % 100 == 3 (else Employee), two e-mails (one from the userName).
    mutating func user(_ k: Int, userName: String? = nil, active: Bool? = nil) -> RelayEvent {
        let name = userName ?? "User-\(k)"
        var data: JSONObject = [
            "schemas": ["urn:ietf:params:scim:schemas:core:2.0:User"], "id": .string("u\(k)"),
            "userName": .string(name), "externalId": .string("ext-\(k)"), "active": .bool(active ?? (k % 4 != 0)),
            "userType": .string(k % 100 == 3 ? "Contractor" : "Employee"),
            "emails": [["value": .string("\(name)@Acme.example"), "primary": true], ["value": .string("u\(k)@alt.example")]],
        ]
        if k % 1000 == 7 { data["title"] = "Lead" }
        return event("urn:ietf:params:SCIM:event:prov:create:full", ["ref": .string("/Users/u\(k)"), "data": .object(data)])
    }

    mutating func group(_ k: Int, members: [Int], displayName: String? = nil) -> RelayEvent {
        event(
            "urn:ietf:params:SCIM:event:prov:create:full",
            [
                "ref": .string("/Groups/g\(k)"),
                "data": [
                    "schemas": ["urn:ietf:params:scim:schemas:core:2.0:Group"], "id": .string("g\(k)"),
                    "displayName": .string(displayName ?? "G\(k)"),
                    "members": .array(members.map { .object(["value": .string("u\($0)")]) }),
                ],
            ])
    }

    /// Applies `events`, the k-th new resource getting broker id `ids[k]`.
    func apply(_ store: BrokerStore, _ events: [RelayEvent], ids: [String]) throws {
        let outcome = try store.environment.write { txn in
            try store.apply(domain: "acme-de", agent: ListFixture.agent, events: events, newIDs: ids, in: txn)
        }
        XCTAssertEqual(outcome.rejected, [:])
        XCTAssertEqual(outcome.applied, events.count)
    }

    /// `users` users (in batches of 1,000) and `groups` groups holding users 0..<10.
    mutating func populate(_ store: BrokerStore, users: Int, groups: Int = 0) throws {
        var k = 0
        while k < users {
            let batch = k..<min(k + 1000, users)
            try apply(store, batch.map { user($0) }, ids: batch.map(ListFixture.brokerID))
            k = batch.upperBound
        }
        if groups > 0 {
            try apply(store, (0..<groups).map { group($0, members: Array(0..<10)) }, ids: (0..<groups).map { "g-\($0)" })
        }
    }
}

/// The broker's read API at scale (issue 15 point 3), against a real LMDB
/// file: counts, pages by index and by cursor, lookups and scans cost what
/// the page costs, not what the directory holds.
final class BrokerListTests: XCTestCase {
    var dir: TempDirectory!
    override func setUp() { dir = TempDirectory("broker-lists") }
    override func tearDown() { dir.remove() }

    let users = brokerRegistry.resourceType("User")!
    let groups = brokerRegistry.resourceType("Group")!

    func list(
        _ store: BrokerStore, _ params: [String: String], type: ResourceType? = nil, scanBudget: Int = 100_000
    ) throws -> ListPage<JSONObject> {
        let type = type ?? users
        let query = try ListQuery(parameters: params, registry: brokerRegistry, type: type)
        let members = type.id == "Group" && query.projection.apply(to: ["members": [["value": "x"]]])["members"] != nil
        return try store.list(type, query, scanBudget: scanBudget, members: members)
    }

    func ids(_ page: ListPage<JSONObject>) -> [String] { page.items.compactMap { $0["id"]?.stringValue } }

    func testListsOfTwentyThousandUsersCostThePage() throws {
        let store = try BrokerStore(path: dir.file("broker"))
        var fixture = ListFixture()
        try fixture.populate(store, users: 20_000, groups: 5)
        XCTAssertEqual(try store.count("User"), 20_000)
        XCTAssertEqual(try store.count("Group"), 5)

        // count=0: the maintained count, nothing parsed.
        var page = try list(store, ["count": "0"])
        XCTAssertEqual(page.totalResults, 20_000)
        XCTAssertEqual(page.items.count, 0)
        XCTAssertEqual(store.lastListCost.parsed, 0, "count=0 parses nothing")

        // startIndex: first and last page, each parsing only its resources.
        page = try list(store, ["startIndex": "1", "count": "100"])
        XCTAssertEqual(ids(page).first, ListFixture.brokerID(0))
        XCTAssertEqual(ids(page).last, ListFixture.brokerID(99))
        XCTAssertEqual(page.totalResults, 20_000)
        XCTAssertEqual(store.lastListCost.parsed, 100)
        page = try list(store, ["startIndex": "19901", "count": "100"])
        XCTAssertEqual(ids(page), (19_900..<20_000).map(ListFixture.brokerID))
        XCTAssertEqual(page.startIndex, 19_901)
        XCTAssertEqual(store.lastListCost.parsed, 100, "a deep startIndex walks keys, it parses only the page")
        XCTAssertLessThanOrEqual(store.lastListCost.startIndexSteps, 19_901)
        page = try list(store, ["startIndex": "19901", "count": "100"])
        XCTAssertLessThanOrEqual(store.lastListCost.startIndexSteps, PositionIndex.stride, "warm: from the nearest checkpoint")
        page = try list(store, ["startIndex": "20001", "count": "100"])
        XCTAssertEqual(page.items.count, 0)
        XCTAssertEqual(page.totalResults, 20_000)

        // Cursors: every user once, each page parsing only itself.
        var walked: [String] = [], cursor = "", pages = 0
        while true {
            page = try list(store, ["cursor": cursor, "count": "500"])
            pages += 1
            XCTAssertEqual(store.lastListCost.parsed, page.items.count, "a cursor page parses only itself")
            XCTAssertEqual(page.totalResults, 20_000)
            XCTAssertNil(page.startIndex)
            walked += ids(page)
            guard let next = page.nextCursor else { break }
            cursor = next
        }
        XCTAssertEqual(pages, 40)
        XCTAssertEqual(walked, (0..<20_000).map(ListFixture.brokerID), "in broker id order, none twice, none skipped")
        // From the last page back: previousCursor.
        let back = try list(store, ["cursor": try XCTUnwrap(page.previousCursor), "count": "500"])
        XCTAssertEqual(ids(back), (19_000..<19_500).map(ListFixture.brokerID))
        XCTAssertThrowsError(try list(store, ["cursor": "bogus", "count": "5"])) { e in
            XCTAssertEqual((e as? SCIMError)?.scimType, .invalidCursor)
        }

        // Lookups by key: the candidates only.
        page = try list(store, ["filter": #"userName eq "user-12345""#])
        XCTAssertEqual(ids(page), [ListFixture.brokerID(12_345)], "userName is case-insensitive")
        XCTAssertEqual(store.lastListCost.parsed, 1)
        page = try list(store, ["filter": #"externalId eq "ext-777""#])
        XCTAssertEqual(ids(page), [ListFixture.brokerID(777)])
        XCTAssertEqual(store.lastListCost.parsed, 1)
        page = try list(store, ["filter": #"externalId eq "EXT-777""#])
        XCTAssertEqual(page.totalResults, 0, "externalId is caseExact")
        page = try list(store, ["filter": #"id eq "\#(ListFixture.brokerID(4242))""#])
        XCTAssertEqual(ids(page), [ListFixture.brokerID(4242)])
        XCTAssertEqual(store.lastListCost.parsed, 1)
        page = try list(store, ["filter": #"userName eq "User-5" and title eq "Lead""#])
        XCTAssertEqual(page.totalResults, 0)
        XCTAssertEqual(store.lastListCost.parsed, 1, "an and with an indexed equality reads its candidates only")

        // A scanned filter pages by cursor past a budget of 3,000 per request: 20 matches.
        var found: [String] = []
        cursor = ""
        pages = 0
        while true {
            page = try list(store, ["filter": #"title eq "Lead""#, "cursor": cursor, "count": "4"], scanBudget: 3_000)
            pages += 1
            XCTAssertLessThanOrEqual(store.lastListCost.parsed, 3_000)
            XCTAssertLessThanOrEqual(page.items.count, 4)
            found += ids(page)
            XCTAssertEqual(page.totalResults, found.count, "matches so far")
            guard let next = page.nextCursor else { break }
            cursor = next
        }
        XCTAssertEqual(found, (0..<20).map { ListFixture.brokerID($0 * 1000 + 7) })
        XCTAssertGreaterThanOrEqual(pages, 7)
        // Without cursor or startIndex: the first cursor page instead of 400.
        page = try list(store, ["filter": #"title eq "Lead""#, "count": "100"], scanBudget: 3_000)
        XCTAssertEqual(ids(page), (0..<3).map { ListFixture.brokerID($0 * 1000 + 7) })
        XCTAssertNotNil(page.nextCursor)
        // Within the budget: exact.
        page = try list(store, ["filter": #"title eq "Lead""#, "count": "100"], scanBudget: 100_000)
        XCTAssertEqual(page.totalResults, 20)
        XCTAssertNil(page.nextCursor)
        // startIndex over the budget: tooMany, advising a cursor.
        XCTAssertThrowsError(try list(store, ["filter": #"title eq "Lead""#, "startIndex": "1"], scanBudget: 3_000)) { e in
            XCTAssertEqual((e as? SCIMError)?.scimType, .tooMany)
            XCTAssertTrue((e as? SCIMError)?.detail.contains("cursor") ?? false)
        }

        // Groups: members from the index, read only when returned.
        page = try list(store, ["count": "10"], type: groups)
        XCTAssertEqual(page.items.count, 5)
        XCTAssertEqual(page.items.first?["members"]?.arrayValue?.count, 10)
        XCTAssertEqual(store.lastListCost.memberReads, 5)
        page = try list(store, ["count": "10", "excludedAttributes": "members"], type: groups)
        XCTAssertEqual(page.items.count, 5)
        XCTAssertEqual(store.lastListCost.memberReads, 0, "excludedAttributes=members leaves the members index unread")
        page = try list(store, ["count": "10", "attributes": "displayName"], type: groups)
        XCTAssertEqual(store.lastListCost.memberReads, 0, "attributes=displayName leaves the members index unread")
        page = try list(store, ["filter": #"members.value eq "\#(ListFixture.brokerID(3))""#], type: groups)
        XCTAssertEqual(page.totalResults, 5, "a filter on members sees them")
        // As Entra and Okta ask it: from the member → groups index, not a scan of every group's members.
        let more = (5..<60).map { fixture.group($0, members: [100 + $0]) }
        try fixture.apply(store, more, ids: (5..<60).map { "g-\($0)" })
        for filter in [#"members.value eq "\#(ListFixture.brokerID(3))""#, #"members[value eq "\#(ListFixture.brokerID(3))"]"#] {
            page = try list(store, ["filter": filter, "attributes": "displayName"], type: groups)
            XCTAssertEqual(ids(page), (0..<5).map { "g-\($0)" }, filter)
            XCTAssertEqual(store.lastListCost.parsed, 5, "only the member's groups are read: \(filter)")
            XCTAssertEqual(store.lastListCost.memberReads, 0, filter)
        }
        page = try list(store, ["filter": #"members.value eq "\#(ListFixture.brokerID(159))""#, "attributes": "displayName"], type: groups)
        XCTAssertEqual(ids(page), ["g-59"])
        page = try list(store, ["filter": #"members.value eq "\#(ListFixture.brokerID(160))""#, "attributes": "displayName"], type: groups)
        XCTAssertEqual(ids(page), [], "no group holds user 160")

        // Deletes and renames keep the indexes and the count.
        let deleted = fixture.event("urn:ietf:params:SCIM:event:prov:delete", ["ref": "/Users/u12345"])
        try fixture.apply(store, [deleted], ids: [])
        XCTAssertEqual(try list(store, ["count": "0"]).totalResults, 19_999)
        XCTAssertEqual(try list(store, ["filter": #"userName eq "User-12345""#]).totalResults, 0)
        XCTAssertEqual(try list(store, ["filter": #"externalId eq "ext-12345""#]).totalResults, 0)
        let renamed = fixture.user(42, userName: "Renamed")
        try fixture.apply(store, [renamed], ids: [])
        XCTAssertEqual(try list(store, ["filter": #"userName eq "User-42""#]).totalResults, 0)
        XCTAssertEqual(ids(try list(store, ["filter": #"userName eq "renamed""#])), [ListFixture.brokerID(42)])
        XCTAssertEqual(try store.count("User"), 19_999, "a replace is no new resource")
        page = try list(store, ["startIndex": "19900", "count": "100"])
        XCTAssertEqual(ids(page), (19_900..<20_000).filter { $0 != 12_345 }.map(ListFixture.brokerID), "stale checkpoints are dropped")
    }

    /// A store written before the list indexes gets them when it is opened,
    /// a chunk per transaction, with counts and lookups right.
    func testAStoreWithoutListIndexesIsIndexedAtOpen() throws {
        let old = dir.file("old")
        do {
            let env = try Environment(EnvironmentOptions(path: old))
            let resources = try env.openDatabase("resources"), ids = try env.openDatabase("brokerIds")
            try env.write { txn in
                for k in 0..<2_500 {
                    let key = Array("acme-de/User/u\(k)".utf8)
                    let doc = #"{"id":"\#(ListFixture.brokerID(k))","userName":"User-\#(k)","externalId":"ext-\#(k)"}"#
                    try txn.put(resources, key, Array(doc.utf8))
                    try txn.put(ids, Array(ListFixture.brokerID(k).utf8), key)
                }
                try txn.put(resources, Array("acme-us/Group/g1".utf8), Array(#"{"id":"bg","displayName":"G"}"#.utf8))
                try txn.put(ids, Array("bg".utf8), Array("acme-us/Group/g1".utf8))
            }
        }
        let store = try BrokerStore(path: old)
        XCTAssertEqual(try store.count("User"), 2_500)
        XCTAssertEqual(try store.count("Group"), 1)
        XCTAssertEqual(try list(store, ["count": "0"]).totalResults, 2_500)
        XCTAssertEqual(ids(try list(store, ["startIndex": "2500", "count": "10"])), [ListFixture.brokerID(2_499)])
        XCTAssertEqual(ids(try list(store, ["filter": #"userName eq "user-2048""#])), [ListFixture.brokerID(2_048)])
        XCTAssertEqual(ids(try list(store, ["count": "10"], type: groups)), ["bg"])
        // Opened again: built once, nothing counted twice.
        let again = try BrokerStore(path: old)
        XCTAssertEqual(try again.count("User"), 2_500)
    }
    /// `active`, `userType`, `emails.value` (users) and `displayName`
    /// (groups) answer an equality from `byValue`: a page parses only itself,
    /// `totalResults` is exact, and writes keep entries and counts right.
    func testIndexedAttributesAnswerTheirEqualitiesAtThePagesCost() throws {
        let store = try BrokerStore(path: dir.file("broker"))
        var fixture = ListFixture()
        try fixture.populate(store, users: 20_000, groups: 5)
        let inactive = (0..<20_000).filter { $0 % 4 == 0 }, active = (0..<20_000).filter { $0 % 4 != 0 }
        // A budget of 1,000 resources: a scan of 20,000 could not answer any of this.
        func indexed(_ params: [String: String], type: ResourceType? = nil) throws -> ListPage<JSONObject> {
            try list(store, params, type: type, scanBudget: 1_000)
        }

        // active: a maintained count per value, pages by startIndex and by cursor.
        var page = try indexed(["filter": "active eq true", "count": "0"])
        XCTAssertEqual(page.totalResults, 15_000)
        XCTAssertEqual(store.lastListCost.parsed, 0)
        page = try indexed(["filter": "active eq true", "startIndex": "1", "count": "100"])
        XCTAssertEqual(ids(page), active.prefix(100).map(ListFixture.brokerID))
        XCTAssertEqual(page.totalResults, 15_000)
        XCTAssertEqual(store.lastListCost.parsed, 100)
        page = try indexed(["filter": "active eq true", "startIndex": "14901", "count": "100"])
        XCTAssertEqual(ids(page), active.suffix(100).map(ListFixture.brokerID))
        XCTAssertEqual(store.lastListCost.parsed, 100, "a deep startIndex walks keys, it parses only the page")
        var walked: [String] = [], cursor = ""
        while true {
            page = try indexed(["filter": "active eq false", "cursor": cursor, "count": "1000"])
            XCTAssertEqual(store.lastListCost.parsed, page.items.count, "a cursor page parses only itself")
            XCTAssertEqual(page.totalResults, 5_000)
            walked += ids(page)
            guard let next = page.nextCursor else { break }
            cursor = next
        }
        XCTAssertEqual(walked, inactive.map(ListFixture.brokerID))

        // userType (counted per value) and the e-mails (one entry each), case-insensitive.
        page = try indexed(["filter": #"userType eq "contractor""#, "count": "50"])
        XCTAssertEqual(page.totalResults, 200)
        XCTAssertEqual(ids(page), (0..<50).map { ListFixture.brokerID($0 * 100 + 3) })
        XCTAssertEqual(store.lastListCost.parsed, 50)
        for filter in [
            #"emails.value eq "USER-777@acme.example""#, #"emails eq "u777@ALT.example""#, #"emails[value eq "u777@alt.example"]"#,
        ] {
            page = try indexed(["filter": filter])
            XCTAssertEqual(ids(page), [ListFixture.brokerID(777)], filter)
            XCTAssertEqual(page.totalResults, 1, filter)
            XCTAssertEqual(store.lastListCost.parsed, 1, filter)
        }
        page = try indexed(["filter": #"displayName eq "g3""#], type: groups)
        XCTAssertEqual(ids(page), ["g-3"])
        XCTAssertEqual(store.lastListCost.parsed, 1)

        // An and: the more selective side's candidates, each checked.
        page = try indexed(["filter": #"active eq true and userType eq "Contractor""#, "count": "10"])
        XCTAssertEqual(page.totalResults, 200)
        XCTAssertEqual(store.lastListCost.parsed, 200, "userType's 200 candidates, not active's 15,000")
        page = try indexed(["filter": #"emails[type eq "work" and value eq "u5@alt.example"]"#])
        XCTAssertEqual(page.totalResults, 0, "the candidate is checked: it has no work e-mail")
        XCTAssertEqual(store.lastListCost.parsed, 1)

        // Writes keep entries and counts: a flip, a delete, a rename.
        let writes = [
            fixture.user(4, active: true), fixture.event("urn:ietf:params:SCIM:event:prov:delete", ["ref": "/Users/u8"]),
            fixture.user(42, userName: "Renamed"),
        ]
        try fixture.apply(store, writes, ids: [])
        XCTAssertEqual(try indexed(["filter": "active eq true", "count": "0"]).totalResults, 15_001)
        XCTAssertEqual(try indexed(["filter": "active eq false", "count": "0"]).totalResults, 4_998)
        page = try indexed(["filter": "active eq false", "count": "2"])
        XCTAssertEqual(ids(page), [0, 12].map(ListFixture.brokerID))
        XCTAssertEqual(try indexed(["filter": #"emails eq "user-42@acme.example""#]).totalResults, 0)
        XCTAssertEqual(ids(try indexed(["filter": #"emails eq "renamed@acme.example""#])), [ListFixture.brokerID(42)])
        XCTAssertEqual(ids(try indexed(["filter": #"emails eq "u42@alt.example""#])), [ListFixture.brokerID(42)])
        XCTAssertEqual(try indexed(["filter": #"emails eq "u8@alt.example""#]).totalResults, 0)
    }

    /// `sortBy=userName` (users) and `displayName` (groups) walk the
    /// attribute's range of `byValue`, both ways, by startIndex and cursor;
    /// another sortBy sorts in memory within the budget, as before.
    func testSortByUserNameOrDisplayNameWalksTheIndex() throws {
        let store = try BrokerStore(path: dir.file("broker"))
        var fixture = ListFixture()
        try fixture.populate(store, users: 20_000)
        let names = ["Zeta", "alpha", "Mu", "beta", "Omega"]
        let created = names.indices.map { fixture.group($0, members: [], displayName: names[$0]) }
        try fixture.apply(store, created, ids: names.indices.map { "g-\($0)" })
        let order = (0..<20_000).sorted { "user-\($0)".utf8.lexicographicallyPrecedes("user-\($1)".utf8) }.map(ListFixture.brokerID)
        func sorted(_ params: [String: String], budget: Int = 1_000, type: ResourceType? = nil) throws -> ListPage<JSONObject> {
            try list(store, params.merging(["sortBy": "userName"]) { a, _ in a }, type: type, scanBudget: budget)
        }

        var page = try sorted(["startIndex": "1", "count": "100"])
        XCTAssertEqual(ids(page), Array(order.prefix(100)))
        XCTAssertEqual(page.totalResults, 20_000)
        XCTAssertEqual(store.lastListCost.parsed, 100)
        page = try sorted(["startIndex": "19901", "count": "100"])
        XCTAssertEqual(ids(page), Array(order.suffix(100)))
        XCTAssertEqual(store.lastListCost.parsed, 100)
        page = try sorted(["startIndex": "1", "count": "100", "sortOrder": "descending"])
        XCTAssertEqual(ids(page), Array(order.reversed().prefix(100)))
        XCTAssertEqual(store.lastListCost.parsed, 100)
        page = try sorted(["startIndex": "19991", "count": "100", "sortOrder": "descending"])
        XCTAssertEqual(ids(page), Array(order.prefix(10).reversed()))

        // By cursor, descending: every user once, each page parsing itself.
        var walked: [String] = [], cursor = ""
        while true {
            page = try sorted(["cursor": cursor, "count": "1000", "sortOrder": "descending"])
            XCTAssertEqual(store.lastListCost.parsed, page.items.count)
            walked += ids(page)
            guard let next = page.nextCursor else { break }
            cursor = next
        }
        XCTAssertEqual(walked, order.reversed())
        let back = try sorted(["cursor": try XCTUnwrap(page.previousCursor), "count": "1000", "sortOrder": "descending"])
        XCTAssertEqual(ids(back), Array(order.reversed()[18_000..<19_000]))
        XCTAssertThrowsError(try sorted(["cursor": cursor, "count": "10"]), "a descending cursor is not an ascending one") { e in
            XCTAssertEqual((e as? SCIMError)?.scimType, .invalidCursor)
        }

        // Groups by displayName, case-insensitive.
        page = try list(store, ["sortBy": "displayName", "excludedAttributes": "members"], type: groups, scanBudget: 1)
        XCTAssertEqual(page.items.compactMap { $0["displayName"]?.stringValue }, ["alpha", "beta", "Mu", "Omega", "Zeta"])
        page = try list(store, ["sortBy": "displayName", "sortOrder": "descending", "count": "2"], type: groups, scanBudget: 1)
        XCTAssertEqual(page.items.compactMap { $0["displayName"]?.stringValue }, ["Zeta", "Omega"])
        XCTAssertEqual(page.totalResults, 5)

        // Another attribute: sorted in memory, within the budget or tooMany.
        XCTAssertThrowsError(try list(store, ["sortBy": "title"], scanBudget: 1_000)) { e in
            XCTAssertEqual((e as? SCIMError)?.scimType, .tooMany)
        }
        page = try list(store, ["sortBy": "title", "count": "3"], scanBudget: 100_000)
        XCTAssertEqual(ids(page), [7, 1007, 2007].map(ListFixture.brokerID))

        // A user without a userName is in no range: sorted in memory until it goes.
        let nameless = fixture.event(
            "urn:ietf:params:SCIM:event:prov:create:full", ["ref": "/Users/nameless", "data": ["id": "nameless"]])
        try fixture.apply(store, [nameless], ids: ["b-99999"])
        XCTAssertThrowsError(try sorted(["count": "10"])) { e in XCTAssertEqual((e as? SCIMError)?.scimType, .tooMany) }
        page = try sorted(["startIndex": "20001", "count": "10"], budget: 100_000)
        XCTAssertEqual(ids(page), ["b-99999"], "without a value: last")
        let gone = fixture.event("urn:ietf:params:SCIM:event:prov:delete", ["ref": "/Users/nameless"])
        try fixture.apply(store, [gone], ids: [])
        page = try sorted(["count": "10"])
        XCTAssertEqual(ids(page), Array(order.prefix(10)))
        XCTAssertEqual(store.lastListCost.parsed, 10)
    }

    /// A store of the first list layout (byType, userName and externalId
    /// only) gets the attribute entries and their counts when it is opened,
    /// a chunk per transaction, with nothing counted twice.
    func testAStoreOfTheFirstListLayoutGetsTheAttributeIndexesAtOpen() throws {
        let old = dir.file("old")
        do {
            let env = try Environment(EnvironmentOptions(path: old))
            let resources = try env.openDatabase("resources"), brokerIds = try env.openDatabase("brokerIds")
            let byType = try env.openDatabase("byType"), byValue = try env.openDatabase("byValue"), meta = try env.openDatabase("meta")
            try env.write { txn in
                for k in 0..<2_500 {
                    let key = Array("acme-de/User/u\(k)".utf8), id = Array(ListFixture.brokerID(k).utf8)
                    let doc = #"""
                        {"id":"\#(ListFixture.brokerID(k))","userName":"User-\#(k)","externalId":"ext-\#(k)","active":\#(k % 4 != 0),
                        "emails":[{"value":"User-\#(k)@Acme.example"}]}
                        """#
                    try txn.put(resources, key, Array(doc.utf8))
                    try txn.put(brokerIds, id, key)
                    try txn.put(byType, Array("User\0".utf8) + id, key)
                    try txn.put(byValue, Array("User\0u\0user-\(k)\0".utf8) + id, key)
                    try txn.put(byValue, Array("User\0e\0ext-\(k)\0".utf8) + id, key)
                }
                try txn.put(meta, Array("count/User".utf8), UInt64(2_500).bigEndianBytes)
                try txn.put(meta, Array("lists".utf8), UInt64(1).bigEndianBytes)
            }
        }
        let store = try BrokerStore(path: old)
        XCTAssertEqual(try store.count("User"), 2_500, "counted once")
        var page = try list(store, ["filter": "active eq false", "count": "10"], scanBudget: 100)
        XCTAssertEqual(page.totalResults, 625)
        XCTAssertEqual(ids(page), (0..<10).map { ListFixture.brokerID($0 * 4) })
        XCTAssertEqual(store.lastListCost.parsed, 10)
        page = try list(store, ["filter": #"emails eq "user-2048@acme.example""#], scanBudget: 100)
        XCTAssertEqual(ids(page), [ListFixture.brokerID(2_048)])
        page = try list(store, ["sortBy": "userName", "sortOrder": "descending", "count": "1"], scanBudget: 100)
        XCTAssertEqual(ids(page), [ListFixture.brokerID(999)], "user-999 sorts last")
        XCTAssertEqual(store.lastListCost.parsed, 1)
        let again = try BrokerStore(path: old)
        XCTAssertEqual(try list(again, ["filter": "active eq true", "count": "0"]).totalResults, 1_875, "built once")
        XCTAssertEqual(try again.count("User"), 2_500)
    }
}

/// The same over the read API socket of a broker process.
final class BrokerListAPITests: FederationTestCase {
    /// A broker over a store of 20,000 users and `groups` groups, its read
    /// API configured with `api` (YAML flow members) besides its listener
    /// and token file: the process and the API's port.
    /// `more`: further groups (broker id, display name, members).
    func startAPI(
        groups: Int, api: String = "", bigGroup: Int = 0, more: [(id: String, name: String, members: Range<Int>)] = []
    ) throws -> (ChildProcess, Int) {
        do {
            let store = try BrokerStore(path: dir.file("broker"))
            var fixture = ListFixture()
            try fixture.populate(store, users: 20_000, groups: groups)
            if bigGroup > 0 {
                let big = fixture.group(1_000, members: Array(0..<bigGroup), displayName: "all staff")
                try fixture.apply(store, [big], ids: ["g-big"])
            }
            for (k, g) in more.enumerated() {
                try fixture.apply(store, [fixture.group(2_000 + k, members: Array(g.members), displayName: g.name)], ids: [g.id])
            }
        }
        let tokens = dir.write("api.tokens", "api-token\n")
        XCTAssertEqual(chmod(tokens, 0o600), 0)
        let (process, _) = try startBroker(yaml: "api: {listen: 127.0.0.1:0, tokenFile: \(tokens)\(api)}\n")
        let apiLine = try XCTUnwrap(process.waitForLine("read API at"), "\(process.output)")
        return (process, Int(apiLine.split(separator: ":").last!.split(separator: "/").first!)!)
    }

    func ids(_ r: (Int, JSON?)) -> [String] { r.1?["Resources"]?.arrayValue?.compactMap { $0["id"]?.stringValue } ?? [] }

    func testReadAPIPagesTwentyThousandUsers() throws {
        let (process, apiPort) = try startAPI(groups: 2, bigGroup: 5_000)
        // A group of more than 1,000 members is streamed (chunked), whole.
        let raw = try RawClient(port: apiPort)
        raw.send("GET /scim/v2/Groups/g-big HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer api-token\r\nConnection: close\r\n\r\n")
        let big = try XCTUnwrap(raw.readResponses(1).first)
        XCTAssertEqual(big.status, 200)
        XCTAssertTrue(big.head.contains("Transfer-Encoding: chunked"), big.head)
        let doc = try JSONParser.parse(Array(big.body.utf8))
        XCTAssertEqual(doc["displayName"], "all staff")
        XCTAssertEqual(
            Set(doc["members"]?.arrayValue?.compactMap { $0["value"]?.stringValue } ?? []), Set((0..<5_000).map(ListFixture.brokerID)))
        // So is a GET with a projection that keeps the members: whole, or each member projected.
        for (query, displayName, keys) in [
            ("attributes=members", false, nil), ("excludedAttributes=displayName", false, nil),
            ("attributes=members.value,displayName", true, ["value"]), ("excludedAttributes=members.display", true, nil),
        ] as [(String, Bool, [String]?)] {
            let raw = try RawClient(port: apiPort)
            raw.send(
                "GET /scim/v2/Groups/g-big?\(query) HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer api-token\r\nConnection: close\r\n\r\n")
            let got = try XCTUnwrap(raw.readResponses(1).first)
            XCTAssertEqual(got.status, 200, query)
            XCTAssertTrue(got.head.contains("Transfer-Encoding: chunked"), "\(query): \(got.head)")
            let doc = try JSONParser.parse(Array(got.body.utf8))
            XCTAssertEqual(doc["id"], "g-big", query)
            XCTAssertEqual(doc["displayName"] != nil, displayName, query)
            let members = doc["members"]?.arrayValue ?? []
            XCTAssertEqual(Set(members.compactMap { $0["value"]?.stringValue }), Set((0..<5_000).map(ListFixture.brokerID)), query)
            if let keys { XCTAssertEqual(members.first?.objectValue?.members.map(\.key), keys, query) }
            if query.hasSuffix("members.display") { XCTAssertNil(members.first?["display"], query) }
        }

        var r = try api(apiPort, "/Users?count=0")
        XCTAssertEqual(r.0, 200, "\(String(describing: r.1))")
        XCTAssertEqual(r.1?["totalResults"], 20_000)
        r = try api(apiPort, "/Users?startIndex=1&count=100")
        XCTAssertEqual(ids(r).count, 100)
        XCTAssertEqual(ids(r).first, ListFixture.brokerID(0))
        r = try api(apiPort, "/Users?startIndex=19901&count=100")
        XCTAssertEqual(ids(r), (19_900..<20_000).map(ListFixture.brokerID))
        XCTAssertEqual(r.1?["startIndex"], 19_901)
        r = try api(apiPort, "/Users?cursor=&count=100")
        XCTAssertEqual(ids(r).first, ListFixture.brokerID(0))
        let next = try XCTUnwrap(r.1?["nextCursor"]?.stringValue)
        r = try api(apiPort, "/Users?cursor=\(next)&count=100")
        XCTAssertEqual(ids(r).first, ListFixture.brokerID(100))
        r = try api(apiPort, "/Users?filter=userName%20eq%20%22USER-19999%22")
        XCTAssertEqual(ids(r), [ListFixture.brokerID(19_999)])
        // A scanned filter paged by cursor (5 matches a page, 20 in all).
        var found: [String] = [], cursor = ""
        for _ in 0..<20 {
            r = try api(apiPort, "/Users?filter=title%20eq%20%22Lead%22&count=5&cursor=\(cursor)")
            XCTAssertEqual(r.0, 200)
            found += ids(r)
            guard let n = r.1?["nextCursor"]?.stringValue else { break }
            cursor = n
        }
        XCTAssertEqual(found.count, 20)
        XCTAssertEqual(r.1?["totalResults"], 20)
        // Groups without members on request; a GET by id too.
        r = try api(apiPort, "/Groups?excludedAttributes=members")
        XCTAssertEqual(ids(r), ["g-0", "g-1", "g-big"])
        XCTAssertNil(r.1?["Resources"]?.arrayValue?.first?["members"])
        r = try api(apiPort, "/Groups/g-0")
        XCTAssertEqual(r.1?["members"]?.arrayValue?.count, 10)
        r = try api(apiPort, "/Groups/g-0?attributes=displayName")
        XCTAssertEqual(r.1?["displayName"], "G0")
        XCTAssertNil(r.1?["members"])
        process.signal(SIGTERM)
        XCTAssertEqual(process.waitForExit(), 0)
    }
}

extension BrokerListAPITests {
    /// The attribute indexes and index-served sorts over the socket, with a
    /// scan budget of 100: a scan of the 20,000 users could answer none of it.
    func testReadAPIAnswersIndexedFiltersAndSortsWithoutScanning() throws {
        let (process, apiPort) = try startAPI(groups: 3, api: ", scanBudget: 100")
        let order = (0..<20_000).sorted { "user-\($0)".utf8.lexicographicallyPrecedes("user-\($1)".utf8) }.map(ListFixture.brokerID)

        var r = try api(apiPort, "/Users?filter=active%20eq%20false&count=0")
        XCTAssertEqual(r.0, 200, "\(String(describing: r.1))")
        XCTAssertEqual(r.1?["totalResults"], 5_000)
        r = try api(apiPort, "/Users?filter=active%20eq%20true&startIndex=14998&count=5")
        XCTAssertEqual(ids(r), [19_997, 19_998, 19_999].map(ListFixture.brokerID))
        XCTAssertEqual(r.1?["totalResults"], 15_000)
        r = try api(apiPort, "/Users?filter=userType%20eq%20%22Contractor%22&cursor=&count=150")
        XCTAssertEqual(ids(r).count, 150)
        r = try api(
            apiPort, "/Users?cursor=\(try XCTUnwrap(r.1?["nextCursor"]?.stringValue))&filter=userType%20eq%20%22Contractor%22&count=150")
        XCTAssertEqual(ids(r), (150..<200).map { ListFixture.brokerID($0 * 100 + 3) })
        XCTAssertEqual(r.1?["totalResults"], 200)
        r = try api(apiPort, "/Users?filter=emails%5Bvalue%20eq%20%22USER-19999%40acme.example%22%5D")
        XCTAssertEqual(ids(r), [ListFixture.brokerID(19_999)])
        r = try api(apiPort, "/Users?sortBy=userName&sortOrder=descending&count=3")
        XCTAssertEqual(ids(r), Array(order.reversed().prefix(3)))
        r = try api(apiPort, "/Users?sortBy=userName&startIndex=19999&count=5")
        XCTAssertEqual(ids(r), Array(order.suffix(2)))
        XCTAssertEqual(r.1?["totalResults"], 20_000)
        r = try api(apiPort, "/Groups?filter=displayName%20eq%20%22g2%22&excludedAttributes=members")
        XCTAssertEqual(ids(r), ["g-2"])
        r = try api(apiPort, "/Groups?sortBy=displayName&sortOrder=descending&attributes=displayName")
        XCTAssertEqual(ids(r), ["g-2", "g-1", "g-0"])
        // Not indexed: within the budget or tooMany, as before.
        r = try api(apiPort, "/Users?sortBy=title&count=5")
        XCTAssertEqual(r.0, 400)
        XCTAssertEqual(r.1?["scimType"], "tooMany")
        process.signal(SIGTERM)
        XCTAssertEqual(process.waitForExit(), 0)
    }
}
