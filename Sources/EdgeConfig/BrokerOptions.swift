/// Every option of `scim-broker serve`, declared once (see `OptionSpec`).
/// The broker binds them to `BrokerConfiguration` and its targets to
/// `TargetConfiguration` (EdgeBroker, `brokerOptionTable`); the sandbox
/// writes broker files through them; `docs/configuration.md` and
/// `scim-broker.yaml(5)` are rendered from them.
public enum BrokerOptions {
    public static let dataDir = OptionSpec(
        "dataDir", flag: "data-dir", .path, value: "DIR", required: .always, "The directory of the broker's LMDB file (created if missing)."
    )
    public static let listen = OptionSpec(
        "listen", flag: "listen", .address, default: "127.0.0.1:8443", "The federation listener agents relay to (mutual TLS).")
    public static let tlsCA = OptionSpec(
        "tls.ca", flag: "ca", .path, required: .always, "The federation CA (PEM): agents' certificates must chain to it.")
    public static let tlsCert = OptionSpec("tls.cert", flag: "cert", .path, required: .always, "The broker's certificate chain (PEM).")
    public static let tlsKey = OptionSpec("tls.key", flag: "key", .path, required: .always, "The broker's private key (PEM).")
    public static let tlsCRL = OptionSpec(
        "tls.crl", flag: "crl", .path, "The federation CA's certificate revocation list (PEM); re-read on SIGHUP.")
    public static let domains = OptionSpec(
        "domains", flag: "domain", .section, value: "NAME=IDENTITY", required: .always,
        "Which agents write into which domain: NAME: the certificate identity of its agents (their SAN URI, else DNS SAN; never the CN). A domain name holds letters, digits, '.', '_' and '-'; an identity names one domain. The flag, NAME=IDENTITY, is repeatable."
    )
    public static let apiListen = OptionSpec(
        "api.listen", flag: "api-listen", .address,
        "The SCIM read API over the federated directory, http://HOST:PORT/scim/v2: on loopback, behind a TLS-terminating proxy.")
    public static let apiTokens = OptionSpec(
        "api.tokens", flag: "api-token", .list, value: "TOKEN",
        "Bearer tokens of the read API (prefer api.tokenFile: a token in the file goes wherever the file is copied).")
    public static let apiTokenFile = OptionSpec(
        "api.tokenFile", flag: "api-token-file", .path, "The read API's bearer tokens, one per line (read at start); mode 0640 or stricter."
    )
    public static let apiOperatorTokens = OptionSpec(
        "api.operatorTokens", flag: "operator-token", .list, value: "TOKEN",
        "Bearer tokens of the web console's actions (retry, drop, confirm or reject held deletions, pause, resume, push); a read-API token only looks. Prefer api.operatorTokenFile."
    )
    public static let apiOperatorTokenFile = OptionSpec(
        "api.operatorTokenFile", flag: "operator-token-file", .path,
        "The console's operator tokens, one per line (read at start); mode 0640 or stricter.")
    public static let apiConsole = OptionSpec(
        "api.console", .boolean, default: "true",
        "Serve the web console at /console/ on the read API's listener (its data, dead letters' request and response bodies included, with the read API's tokens; its actions with an operator token)."
    )
    public static let apiScanBudget = OptionSpec(
        "api.scanBudget", .integer(1...100_000_000), default: "100000",
        "How many resources one page of a read-API filter without an index may examine before it answers with a cursor to go on.")
    public static let adminListen = OptionSpec(
        "admin.listen", flag: "admin-listen", .addressOrNone, default: "127.0.0.1:9190",
        "The operations listener (/healthz, /readyz, /metrics; no authentication): keep it on loopback; none turns it off.")
    public static let maxPendingBatches = OptionSpec(
        "maxPendingBatches", flag: "max-pending-batches", .integer(0...100_000), default: "256",
        "Backpressure: agents get 503 and Retry-After while this many batches wait to be applied.")

    /// The keys of one entry of `targets`.
    public enum Target {
        public static let name = OptionSpec(
            "name", .text, required: .always, "The target's name (letters, digits, '.', '_' and '-'), in metrics, logs and the CLI.")
        public static let url = OptionSpec(
            "url", .url, "The app's SCIM base URL, http(s)://HOST[:PORT]/PATH (a broker's target gives url, or domain for a boundary).")
        public static let domain = OptionSpec(
            "domain", .text,
            "Instead of url: a boundary. The domain whose agent fetches what the routes send here over its own outbound connection (the downlink, docs/protocol.md), never its own domain's resources; the agent's inbound policy decides what it takes. Only name, routes and maxMembersPerPatch apply."
        )
        public static let tokenFile = OptionSpec(
            "tokenFile", .path, "The bearer token for the app, on the file's first line; re-read on SIGHUP; mode 0640 or stricter.")
        public static let tlsCA = OptionSpec("tls.ca", .path, "The CA (PEM) the app's certificate must chain to (default: the system's).")
        public static let tlsCert = OptionSpec("tls.cert", .path, "A client certificate (PEM) for apps that want one, with tls.key.")
        public static let tlsKey = OptionSpec("tls.key", .path, "The client certificate's private key (PEM).")
        public static let tlsMinVersion = OptionSpec(
            "tls.minVersion", .choice(["1.2", "1.3"]), default: "1.2", "The oldest TLS version accepted.")
        public static let requestsPerSecond = OptionSpec(
            "rate.requestsPerSecond", .integer(1...1_000_000), default: "50", "The most requests a second sent to the app.")
        public static let concurrency = OptionSpec("rate.concurrency", .integer(1...256), default: "4", "Requests in flight at once.")
        public static let onRemove = OptionSpec(
            "onRemove", .choice(["delete", "deactivate"]), default: "deactivate",
            "What a user deleted upstream becomes in the app: deleted, or kept with active false.")
        public static let maxDeletes = OptionSpec(
            "deleteGuard.maxDeletes", .integer(0...10_000_000), default: "100",
            "Deletion guard: more removals than this within the window pause the target's removals until an operator releases them.")
        public static let windowSeconds = OptionSpec(
            "deleteGuard.windowSeconds", .integer(1...31_536_000), default: "300", "The deletion guard's window.")
        public static let collisions = OptionSpec(
            "collisions", .choice(["refuse", "namespace", "link"]), default: "refuse",
            "An account in the app that is another domain's: refuse (a dead letter naming both), namespace (per-domain names) or link (one account per person)."
        )
        public static let namespaceUserName = OptionSpec(
            "namespace.userName", .text, default: "{userName}@{domain}",
            "With collisions: namespace, the app's userName (holds {userName} and {domain}).")
        public static let namespaceDisplayName = OptionSpec(
            "namespace.displayName", .text, default: "{displayName} ({domain})",
            "With collisions: namespace, a group's displayName (holds {displayName} and {domain}).")
        public static let linkAttribute = OptionSpec(
            "link.attribute", .text,
            "With collisions: link, the attribute that says two domains' users are one person (never userName alone).")
        public static let linkSourceOfRecord = OptionSpec(
            "link.sourceOfRecord", .list,
            "With collisions: link, the domains in order of precedence: the first one's data wins; the account is deactivated only when every linked source is."
        )
        public static let maxMembersPerPatch = OptionSpec(
            "maxMembersPerPatch", .integer(1...10_000), default: "100",
            "The most members one PATCH (or a new group's POST) carries; larger changes are sent in chunks (AWS IAM Identity Center takes 100)."
        )
        public static let breakerThreshold = OptionSpec(
            "breakerThreshold", .integer(1...1_000_000), default: "10", "Failures in a row that open the target's circuit breaker.")
        public static let timeoutMs = OptionSpec(
            "timeoutMs", .integer(100...600_000), default: "15000", "How long one request to the app may take, in milliseconds.")
        public static let rename = OptionSpec("mapping.rename", .section, "Attribute paths renamed on the way to the app: FROM: TO.")
        public static let drop = OptionSpec("mapping.drop", .list, "Attribute paths the app never receives.")
        public static let constant = OptionSpec(
            "mapping.constant", .section, "Attribute paths set to a constant for this app: PATH: VALUE.")
        public static let routeDomains = OptionSpec("domains", .list, "The domains this route carries (empty: all).")
        public static let routeTypes = OptionSpec("types", .list, "User, Group or both (empty: both).")
        public static let routeFilter = OptionSpec("filter", .text, "A SCIM filter: only the resources matching it.")
        public static let routes = OptionSpec(
            "routes", .sections, required: .always, "What flows to the app: a list of {domains, types, filter}; [{}] carries everything.",
            children: [routeDomains, routeTypes, routeFilter])

        public static let all: [OptionSpec] = [
            name, url, domain, tokenFile, tlsCA, tlsCert, tlsKey, tlsMinVersion, requestsPerSecond, concurrency, onRemove, maxDeletes,
            windowSeconds, collisions, namespaceUserName, namespaceDisplayName, linkAttribute, linkSourceOfRecord, maxMembersPerPatch,
            breakerThreshold, timeoutMs, rename, drop, constant, routes,
        ]
        /// The keys of an app target (all but `domain`): an agent's local targets take these.
        public static let app: [OptionSpec] = all.filter { $0.key != "domain" }
    }

    public static let targets = OptionSpec(
        "targets", flag: "target", .sections, value: "NAME=URL",
        "The downstream apps. The flag, NAME=URL (repeatable), adds a target receiving every domain's users and groups; routes, mapping and limits need the file.",
        children: Target.all)
    public static let targetToken = OptionSpec(
        nil, flag: "target-token", .list, value: "NAME=TOKEN", "The bearer token for target NAME (repeatable).")

    public static let all: [OptionSpec] = [
        dataDir, listen, tlsCA, tlsCert, tlsKey, tlsCRL, domains, apiListen, apiTokens, apiTokenFile, apiOperatorTokens,
        apiOperatorTokenFile, apiConsole, apiScanBudget,
        adminListen,
        maxPendingBatches,
        targets, targetToken,
    ]

    public static let reference = ConfigReference(
        program: "scim-broker", file: "/etc/scim-broker/broker.yaml", title: "configuration of the scim-broker",
        about: [
            "scim-broker serve --config FILE reads its settings from a YAML file (/etc/scim-broker/broker.yaml for the service). It is read strictly: an unknown key, a value of the wrong type or out of bounds, an alias or a duplicate key is an error, and scim-broker check-config reports every problem in one run, each with its line, column, key and a fix, including an identity bound to two domains, a route naming a domain not bound, a read API off loopback and placeholder tokens. Flags given to scim-broker serve override the file."
        ], specs: all, seeAlso: ["scim-edge.yaml(5)"])
}
