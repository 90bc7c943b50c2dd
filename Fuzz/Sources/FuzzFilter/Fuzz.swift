import SCIM

let registry = SchemaRegistry.standard
let userType = registry.resourceType("User")!
let sample: JSONObject = [
    "schemas": [.string(SchemaURN.user)], "id": "1", "userName": "bjensen", "active": true, "title": "Tour Guide",
    "emails": [["value": "b@example.com", "type": "work", "primary": true]],
    "meta": ["lastModified": "2011-05-13T04:42:34Z"],
]

/// Any text either compiles to a filter or throws a 400 invalidFilter; a
/// compiled filter evaluates without trapping.
@_cdecl("LLVMFuzzerTestOneInput")
public func fuzz(_ data: UnsafePointer<UInt8>, _ size: Int) -> CInt {
    guard let text = String(validating: UnsafeBufferPointer(start: data, count: size), as: UTF8.self) else { return 0 }
    do throws(SCIMError) {
        let filter = try Filter(text, registry: registry, type: userType)
        _ = filter.matches(sample)
        _ = filter.indexLookup
    } catch {
        precondition(error.status == 400 && error.scimType == .invalidFilter, "unexpected error \(error)")
    }
    return 0
}
