import SCIM

let registry = SchemaRegistry.standard
let userType = registry.resourceType("User")!
let validator = ResourceValidator(registry: registry, type: userType)
let base: JSONObject = try! validator.validateCreate([
    "schemas": [.string(SchemaURN.user), .string(SchemaURN.enterpriseUser)], "userName": "bjensen",
    "name": ["givenName": "Barbara", "familyName": "Jensen"],
    "emails": [["value": "b@example.com", "type": "work", "primary": true], ["value": "b@home.org", "type": "home"]],
    "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User": ["department": "Tours", "manager": ["value": "m1"]],
])

/// A PATCH body either applies (and the result is valid: validating it
/// again changes nothing) or fails with a 4xx SCIM error; nothing traps.
@_cdecl("LLVMFuzzerTestOneInput")
public func fuzz(_ data: UnsafePointer<UInt8>, _ size: Int) -> CInt {
    guard let body = try? JSONParser.parse(Array(UnsafeBufferPointer(start: data, count: size))) else { return 0 }
    do throws(SCIMError) {
        let request = try PatchRequest(body, registry: registry, type: userType)
        let patched = try request.apply(to: base)
        let again = try validator.validateReplace(.object(patched), existing: patched)
        precondition(again.sameMembers(as: patched), "a patched resource is not stable under validation")
    } catch {
        precondition((400..<500).contains(error.status), "unexpected error \(error)")
    }
    return 0
}
