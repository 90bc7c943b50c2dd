import EdgeHTTP
import EdgeLoop

/// One blocking GET on a loop of its own (for command-line tools), returning
/// the status and body; 0 and the error text when there is no answer.
public func httpGet(
    _ url: ServiceURL, _ path: String, headers extra: HTTPHeaders = HTTPHeaders(),
    timeoutMilliseconds: UInt64 = 10_000
) -> (status: Int, body: [UInt8]) {
    httpRequest(url, HTTPRequest(method: "GET", target: url.path + path, headers: extra), timeoutMilliseconds: timeoutMilliseconds)
}

/// One blocking request on a loop of its own.
public func httpRequest(_ url: ServiceURL, _ request: HTTPRequest, timeoutMilliseconds: UInt64 = 10_000) -> (status: Int, body: [UInt8]) {
    guard let loop = try? EventLoop() else { return (0, Array("cannot start a loop".utf8)) }
    defer { _ = loop.close() }
    guard let address = url.resolveAddress() else { return (0, Array("cannot resolve \(url.host)".utf8)) }
    var o = HTTPClientOptions()
    o.responseTimeoutMilliseconds = timeoutMilliseconds
    o.connectTimeoutMilliseconds = timeoutMilliseconds
    let client = HTTPClient(loop: loop, address: address, options: o)
    var result: Result<HTTPResponse, HTTPClientError>?
    client.send(request) { result = $0 }
    while result == nil { _ = loop.runOnce() }
    client.close()
    while loop.runOnce(wait: false) {}
    switch result! {
    case .success(let r): return (r.status, r.body)
    case .failure(let e): return (0, Array("\(e)".utf8))
    }
}

/// The body of `GET url` as text; throws unless 200.
public func httpGetText(_ url: String) throws -> String {
    guard let parsed = ServiceURL(url) else { throw BenchError("\(url) is not http://HOST:PORT/PATH") }
    let r = httpGet(ServiceURL(tls: false, host: parsed.host, port: parsed.port, path: ""), parsed.path)
    guard r.status == 200 else {
        throw BenchError("GET \(url): \(r.status == 0 ? String(decoding: r.body, as: UTF8.self) : "status \(r.status)")")
    }
    return String(decoding: r.body, as: UTF8.self)
}
