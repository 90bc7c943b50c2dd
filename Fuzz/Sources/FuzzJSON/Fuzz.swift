import SCIM

/// Any input either parses or throws a JSONError; what parses serialises to
/// bytes that parse to the same value, and serialises the same again.
@_cdecl("LLVMFuzzerTestOneInput")
public func fuzz(_ data: UnsafePointer<UInt8>, _ size: Int) -> CInt {
    let bytes = Array(UnsafeBufferPointer(start: data, count: size))
    var limits = JSONLimits()
    limits.maxDepth = 32
    guard let value = try? JSONParser.parse(bytes, limits: limits) else { return 0 }
    let once = value.serialized()
    guard let again = try? JSONParser.parse(once, limits: limits) else { fatalError("serialised output does not parse") }
    precondition(again == value, "parse ∘ serialize is not the identity")
    precondition(again.serialized() == once, "serialisation is not stable")
    return 0
}
