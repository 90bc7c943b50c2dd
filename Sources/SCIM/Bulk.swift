/// One operation of a Bulk request (RFC 7644 §3.7).
public struct BulkOperation: Sendable {
    public enum Method: String, Sendable { case POST, PUT, PATCH, DELETE }
    /// Position in the request, for errors and the response.
    public let index: Int
    public let method: Method
    public let bulkId: String?
    public let version: String?
    public let path: String
    public let data: JSON?
    /// The `bulkId`s this operation refers to (in `path` or `data`).
    public let references: Set<String>
}

/// A parsed Bulk request, checked against the service provider's limits.
public struct BulkRequest: Sendable {
    public let operations: [BulkOperation]
    /// Stop after this many errors (`nil`: process everything).
    public let failOnErrors: Int?

    /// `payloadSize` is the request body's size in bytes; over the limits the
    /// answer is `413` (RFC 7644 §3.7.4).
    public init(_ body: JSON, payloadSize: Int, maxOperations: Int, maxPayloadSize: Int) throws(SCIMError) {
        guard payloadSize <= maxPayloadSize else {
            throw SCIMError(413, nil, "the bulk request is \(payloadSize) bytes; the limit is \(maxPayloadSize) bytes")
        }
        guard let o = body.objectValue else { throw .invalidSyntax("the bulk request must be a JSON object") }
        guard let schemas = o["schemas"]?.arrayValue,
            schemas.contains(where: { $0.stringValue.map { equalsIgnoringASCIICase($0, SchemaURN.bulkRequest) } ?? false })
        else {
            throw .invalidSyntax("'schemas' must contain \(SchemaURN.bulkRequest)")
        }
        if let f = o["failOnErrors"] {
            guard let n = f.numberValue?.integer, n >= 1 else { throw .invalidValue("'failOnErrors' must be an integer ≥ 1") }
            failOnErrors = Int(clamping: n)
        } else {
            failOnErrors = nil
        }
        guard let list = o["Operations"]?.arrayValue, !list.isEmpty else {
            throw .invalidValue("'Operations' must be a non-empty array")
        }
        guard list.count <= maxOperations else {
            throw SCIMError(413, nil, "the bulk request has \(list.count) operations; the limit is \(maxOperations)")
        }
        var ops: [BulkOperation] = []
        var seen: Set<String> = []
        for (k, item) in list.enumerated() {
            guard let op = item.objectValue else { throw .invalidSyntax("Operations[\(k)] must be an object") }
            guard let m = op["method"]?.stringValue, let method = BulkOperation.Method(rawValue: m.uppercased()) else {
                throw .invalidValue("Operations[\(k)].method must be POST, PUT, PATCH or DELETE")
            }
            guard let path = op["path"]?.stringValue, path.hasPrefix("/") else {
                throw .invalidValue("Operations[\(k)].path must be a resource path such as /Users")
            }
            let bulkId = op["bulkId"]?.stringValue
            if method == .POST {
                guard let bulkId, !bulkId.isEmpty else { throw .invalidValue("Operations[\(k)]: a POST needs a 'bulkId'") }
            }
            if let bulkId {
                guard seen.insert(bulkId).inserted else { throw .invalidValue("Operations[\(k)]: bulkId '\(bulkId)' is used twice") }
            }
            let data = op["data"]
            if method != .DELETE && data == nil { throw .invalidValue("Operations[\(k)]: \(method.rawValue) needs 'data'") }
            var refs = bulkReferences(in: data ?? .null)
            if let r = bulkIdReference(path) { refs.insert(r) }
            ops.append(
                BulkOperation(
                    index: k, method: method, bulkId: bulkId, version: op["version"]?.stringValue,
                    path: path, data: data, references: refs))
        }
        operations = ops
    }

    /// The order to run operations in: each after the POSTs whose `bulkId`s
    /// it references (forward references allowed), otherwise in request order.
    /// Operations that cannot be ordered come back as failures: an unknown
    /// `bulkId` is `400 invalidValue`, a circular reference `409` (RFC 7644
    /// §3.7.1 lets the provider stop at cycles with 409).
    public func executionOrder() -> (ordered: [BulkOperation], failed: [(BulkOperation, SCIMError)]) {
        let producers = Dictionary(operations.compactMap { op in op.bulkId.map { ($0, op.index) } }, uniquingKeysWith: { a, _ in a })
        var failed: [(BulkOperation, SCIMError)] = []
        var pending: [BulkOperation] = []
        for op in operations {
            if let unknown = op.references.first(where: { producers[$0] == nil }) {
                failed.append((op, .invalidValue("Operations[\(op.index)]: unknown bulkId '\(unknown)'")))
            } else {
                pending.append(op)
            }
        }
        // Always run the earliest operation whose references are satisfied.
        var done: Set<Int> = []
        var ordered: [BulkOperation] = []
        while let next = pending.firstIndex(where: { op in op.references.allSatisfy { done.contains(producers[$0]!) } }) {
            let op = pending.remove(at: next)
            ordered.append(op)
            done.insert(op.index)
        }
        for op in pending {
            failed.append((op, SCIMError(409, nil, "Operations[\(op.index)]: circular bulkId references cannot be resolved")))
        }
        return (ordered, failed.sorted { $0.0.index < $1.0.index })
    }
}

/// `bulkId:xyz` strings anywhere in `value`.
func bulkReferences(in value: JSON) -> Set<String> {
    switch value {
    case .string(let s): return bulkIdReference(s).map { [$0] } ?? []
    case .array(let a): return a.reduce(into: []) { $0.formUnion(bulkReferences(in: $1)) }
    case .object(let o): return o.members.reduce(into: []) { $0.formUnion(bulkReferences(in: $1.value)) }
    default: return []
    }
}

/// The bulkId in `bulkId:xyz`, or in a path ending with `/bulkId:xyz`.
func bulkIdReference(_ s: String) -> String? {
    let text = s.split(separator: "/").last.map(String.init) ?? s
    guard text.hasPrefix("bulkId:") else { return nil }
    let id = String(text.dropFirst(7))
    return id.isEmpty ? nil : id
}

/// Replaces `bulkId:xyz` references with the ids of the created resources.
public func resolvingBulkIds(_ value: JSON, _ ids: [String: String]) -> JSON {
    switch value {
    case .string(let s):
        if let r = bulkIdReference(s), let id = ids[r] {
            return .string(s.hasPrefix("bulkId:") ? id : String(s.dropLast(r.count + 7)) + id)
        }
        return value
    case .array(let a): return .array(a.map { resolvingBulkIds($0, ids) })
    case .object(let o): return .object(JSONObject(o.members.map { ($0.key, resolvingBulkIds($0.value, ids)) }))
    default: return value
    }
}

/// One entry of a BulkResponse.
public struct BulkResult: Sendable {
    public var operation: BulkOperation
    public var status: Int
    public var location: String?
    public var version: String?
    public var error: SCIMError?
    public init(operation: BulkOperation, status: Int, location: String? = nil, version: String? = nil, error: SCIMError? = nil) {
        self.operation = operation
        self.status = status
        self.location = location
        self.version = version
        self.error = error
    }

    var json: JSON {
        var o: JSONObject = ["method": .string(operation.method.rawValue)]
        if let b = operation.bulkId { o["bulkId"] = .string(b) }
        if let version { o["version"] = .string(version) }
        if let location { o["location"] = .string(location) }
        o["status"] = .string(String(status))
        if let error { o["response"] = error.json }
        return .object(o)
    }
}

/// The BulkResponse body: results in request order.
public func makeBulkResponse(_ results: [BulkResult]) -> JSON {
    [
        "schemas": [.string(SchemaURN.bulkResponse)],
        "Operations": .array(results.sorted { $0.operation.index < $1.operation.index }.map(\.json)),
    ]
}
