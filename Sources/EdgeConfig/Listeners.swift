import EdgeLoop

extension YAMLMapping {
    /// The operations listener (`/healthz`, `/readyz`, `/metrics`) at `key`:
    /// nil when the key is absent, `.some(nil)` for `none`, else its address,
    /// with a warning off loopback (it has neither authentication nor TLS).
    /// One reading for both programs' `admin.listen`.
    public mutating func operationsListener(_ key: String = "listen") -> SocketAddress?? {
        guard let text = string(key) else { return nil }
        if text == "none" { return .some(nil) }
        guard let address = SocketAddress(text) else {
            problem(key, "must be HOST:PORT or none, got '\(text)'")
            return nil
        }
        if !address.isLoopback {
            warning(
                key, "the operations listener (no authentication, no TLS) is on \(address.host): anyone who reaches it reads /metrics",
                fix: "listen on 127.0.0.1 and scrape through a proxy, or firewall the port")
        }
        return .some(address)
    }
}
