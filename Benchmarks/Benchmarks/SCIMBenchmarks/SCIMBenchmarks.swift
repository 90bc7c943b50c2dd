// SCIM core benchmarks: the per-request work of the agent's endpoint.
import Benchmark
import SCIM

/// A typical enterprise user as an IdP sends it: about 1 KiB.
let userJSON = Array("""
{"schemas":["urn:ietf:params:scim:schemas:core:2.0:User","urn:ietf:params:scim:schemas:extension:enterprise:2.0:User"],\
"externalId":"00u1a2b3c4d5e6f7g8h9","userName":"barbara.jensen@example.com","active":true,\
"name":{"formatted":"Ms. Barbara J Jensen III","familyName":"Jensen","givenName":"Barbara","middleName":"Jane"},\
"displayName":"Barbara Jensen","nickName":"Babs","title":"Tour Guide","userType":"Employee",\
"preferredLanguage":"en-US","locale":"en-US","timezone":"America/Los_Angeles",\
"emails":[{"value":"barbara.jensen@example.com","type":"work","primary":true},{"value":"babs@jensen.org","type":"home"}],\
"phoneNumbers":[{"value":"+1 555 555 5555","type":"work"},{"value":"+1 555 555 4444","type":"mobile"}],\
"addresses":[{"type":"work","streetAddress":"100 Universal City Plaza","locality":"Hollywood","region":"CA",\
"postalCode":"91608","country":"US","primary":true}],\
"urn:ietf:params:scim:schemas:extension:enterprise:2.0:User":{"employeeNumber":"701984","costCenter":"4130",\
"organization":"Universal Studios","division":"Theme Park","department":"Tour Operations",\
"manager":{"value":"26118915-6090-4610-87e4-49d8ca9f808d"}}}
""".utf8)

let registry = SchemaRegistry.standard
let userType = registry.resourceType("User")!
let validator = ResourceValidator(registry: registry, type: userType)

let benchmarks: @Sendable () -> Void = {
    let config = Benchmark.Configuration(metrics: [.wallClock, .throughput, .mallocCountTotal],
                                         scalingFactor: .kilo, maxDuration: .seconds(3))
    precondition(userJSON.count > 900 && userJSON.count < 1200, "the sample user should be about 1 KiB")

    Benchmark("parse + validate + serialize a 1 KiB User", configuration: config) { benchmark in
        for _ in benchmark.scaledIterations {
            let parsed = try JSONParser.parse(userJSON)
            let valid = try validator.validateCreate(parsed)
            blackHole(JSON.object(valid).serialized())
        }
    }

    let parsedUser = try! JSONParser.parse(userJSON)
    Benchmark("  part: parse a 1 KiB User", configuration: config) { benchmark in
        for _ in benchmark.scaledIterations { blackHole(try JSONParser.parse(userJSON)) }
    }
    Benchmark("  part: validate a 1 KiB User", configuration: config) { benchmark in
        for _ in benchmark.scaledIterations { blackHole(try validator.validateCreate(parsedUser)) }
    }
    Benchmark("  part: serialize a 1 KiB User", configuration: config) { benchmark in
        for _ in benchmark.scaledIterations { blackHole(parsedUser.serialized()) }
    }

    let user = try! validator.validateCreate(parsedUser)
    let filter = try! Filter(#"userType eq "Employee" and emails[type eq "work" and value ew "@example.com"] and not (active eq false)"#,
                             registry: registry, type: userType)
    precondition(filter.matches(user))
    Benchmark("evaluate a 3-clause filter", configuration: config) { benchmark in
        for _ in benchmark.scaledIterations { blackHole(filter.matches(user)) }
    }

    let patch = try! PatchRequest(JSONParser.parse(#"""
        {"schemas":["urn:ietf:params:scim:api:messages:2.0:PatchOp"],"Operations":[
         {"op":"replace","path":"title","value":"Lead Guide"},
         {"op":"add","path":"emails","value":[{"value":"b.jensen@example.com","type":"other"}]},
         {"op":"remove","path":"phoneNumbers[type eq \"mobile\"]"}]}
        """#), registry: registry, type: userType)
    Benchmark("apply a 3-op PATCH (and validate the result)", configuration: config) { benchmark in
        for _ in benchmark.scaledIterations { blackHole(try patch.apply(to: user)) }
    }
}
