/// Every option of `scim-edge serve`, declared once (see `OptionSpec`). The
/// agent binds them to `AgentConfiguration` (EdgeAgent, `agentOptionTable`);
/// the sandbox writes agent files through them; `docs/configuration.md` and
/// `scim-edge.yaml(5)` are rendered from them.
public enum AgentOptions {
    public static let dataDir = OptionSpec(
        "dataDir", flag: "data-dir", .path, value: "DIR", required: .always,
        "The directory of the agent's LMDB file (created if missing).")
    public static let listen = OptionSpec(
        "listen", flag: "listen", .address, default: "127.0.0.1:8080",
        "The SCIM endpoint the IdP provisions to (port 0 picks a free port). Off loopback it needs tls.")
    public static let workers = OptionSpec(
        "workers", flag: "workers", .text, default: "auto", value: "auto|N",
        "Threads serving SCIM requests: auto (one per CPU, at most 16) or 1 to 64.")
    public static let tokenFile = OptionSpec(
        "tokenFile", flag: "token-file", .path,
        "Bearer tokens accepted from the IdP, one per line (# comments; at least 16 characters, no placeholders); re-read on SIGHUP; mode 0640 or stricter."
    )
    public static let token = OptionSpec(
        nil, flag: "token", .list, value: "TOKEN",
        "A bearer token accepted by the SCIM endpoint (repeatable; a token file keeps it out of the process list).")
    public static let tlsCert = OptionSpec(
        "tls.cert", flag: "tls-cert", .path, required: .withSection,
        "TLS on the SCIM listener: the certificate chain (PEM); re-read on SIGHUP.")
    public static let tlsKey = OptionSpec(
        "tls.key", flag: "tls-key", .path, required: .withSection, "TLS on the SCIM listener: the private key (PEM).")
    public static let adminListen = OptionSpec(
        "admin.listen", flag: "admin-listen", .addressOrNone, default: "127.0.0.1:9180",
        "The operations listener (/healthz, /readyz, /metrics; no authentication): keep it on loopback; none turns it off.")
    public static let maxBodyBytes = OptionSpec(
        "limits.maxBodyBytes", flag: "max-body-bytes", .integer(1024...(1 << 30)), default: "1048576",
        "The largest request body in bytes (the largest /Bulk too).")
    public static let maxConnections = OptionSpec(
        "limits.maxConnections", flag: "max-connections", .integer(1...1_000_000), default: "4096",
        "Connections open at once, for the whole agent; past it new ones wait in the kernel's backlog.")
    public static let requestTimeoutMs = OptionSpec(
        "limits.requestTimeoutMs", .integer(100...3_600_000), default: "30000",
        "How long a client may take to send one request, in milliseconds.")
    public static let idleTimeoutMs = OptionSpec(
        "limits.idleTimeoutMs", .integer(100...3_600_000), default: "75000", "How long an idle keep-alive connection stays open.")
    public static let storeMaxBytes = OptionSpec(
        "store.maxBytes", .integer((1 << 20)...(1 << 44)), default: "17179869184",
        "The largest the LMDB map may grow (the file grows as it fills; writes past it get 507).")
    public static let keepOutbox = OptionSpec(
        "outbox.keep", flag: "keep-outbox", .boolean, default: "false",
        "Record relay events in the outbox even without a broker (inspection, tests); with a broker they always are.")
    public static let outboxMaxEvents = OptionSpec(
        "outbox.maxEvents", flag: "outbox-max-events", .integer(1...1_000_000_000), default: "1000000",
        "Backpressure: from this many unrelayed events writes get 503 and Retry-After, until the outbox drains to four fifths of it.")
    public static let outboxMaxBytes = OptionSpec(
        "outbox.maxBytes", flag: "outbox-max-bytes", .integer(1024...(1 << 40)), default: "1073741824",
        "Backpressure: the same limit in bytes of unrelayed events.")
    public static let profile = OptionSpec(
        "scim.profile", .choice(["lenient", "strict"]), default: "lenient",
        "lenient accepts Microsoft Entra ID's PATCH forms (\"True\" for booleans, paths with filters on add); strict refuses them.")
    public static let maxResults = OptionSpec(
        "scim.maxResults", .integer(1...100_000), default: "1000", "The largest page of a list (itemsPerPage never exceeds it).")
    public static let scanBudget = OptionSpec(
        "scim.scanBudget", .integer(1...100_000_000), default: "100000",
        "How many resources one page of a filter without an index may examine before it answers with a cursor to go on.")
    public static let patchResponseMaxMembers = OptionSpec(
        "scim.patchResponseMaxMembers", .integer(0...1_000_000), default: "1000",
        "A PATCH of a group with more members than this answers 204 with its ETag instead of the whole group (RFC 7644 §3.5.2), unless attributes or excludedAttributes leave members out."
    )
    public static let brokerURL = OptionSpec(
        "broker.url", flag: "broker", .url, value: "https://HOST:PORT", required: .withSection,
        "The broker to relay to, https://HOST:PORT (an IP address or localhost). Without broker the agent is a standalone SCIM server.")
    public static let brokerCA = OptionSpec(
        "broker.ca", flag: "ca", .path, required: .withSection, "The federation CA (PEM) the broker's certificate must chain to.")
    public static let brokerCert = OptionSpec(
        "broker.cert", flag: "cert", .path, required: .withSection,
        "This agent's certificate (PEM): its SAN URI carries the identity the broker binds to the domain.")
    public static let brokerKey = OptionSpec("broker.key", flag: "key", .path, required: .withSection, "This agent's private key (PEM).")
    public static let brokerCRL = OptionSpec(
        "broker.crl", flag: "crl", .path,
        "The federation CA's certificate revocation list (PEM): a revoked broker certificate is refused; re-read on SIGHUP. Optional; once given, issue it again before its next update (scim-broker pki crl): past it every handshake fails."
    )
    public static let brokerDomain = OptionSpec(
        "broker.domain", flag: "domain", .text, value: "NAME", required: .withSection,
        "This agent's domain (the broker checks it against the certificate).")
    public static let brokerAgent = OptionSpec(
        "broker.agent", flag: "agent-name", .text, default: "agent", value: "NAME",
        "This agent's name in batches (informational: the broker names agents by their certificate).")
    public static let maxEventsPerBatch = OptionSpec(
        "broker.maxEventsPerBatch", .integer(1...5000), default: "500", "The most events the relay sends in one batch.")
    public static let window = OptionSpec(
        "broker.window", .integer(1...256), default: "16", "Batches the relay keeps in flight before it waits for acknowledgements.")
    public static let policyResourceTypes = OptionSpec(
        "resourceTypes", .section, "Per resource type (User, Group): propagate or keep-local (never leaves this agent).")
    public static let policyAttributes = OptionSpec(
        "attributes", .section,
        "Per attribute path (name.givenName, phoneNumbers, the enterprise extension's manager): propagate, keep-local or pseudonymize (an HMAC with the key file, stable per value)."
    )
    public static let policyScope = OptionSpec(
        "scope", .section, "Per resource type, a SCIM filter: only what matches leaves the boundary.")
    public static let policyKeyFile = OptionSpec(
        "pseudonymKeyFile", .path, "The HMAC key of pseudonymize: at least 32 bytes, mode 0600 or 0640.")
    public static let policy = OptionSpec(
        "policy", .section,
        "What may leave the boundary, decided here before the outbox. Read at start only: a changed policy needs a restart, where it is applied to everything stored before the agent serves.",
        children: [policyResourceTypes, policyAttributes, policyScope, policyKeyFile])

    /// The keys of one entry of `sources` (docs/sources.md).
    public enum Source {
        public static let name = OptionSpec(
            "name", .text, required: .always, "The source's name (letters, digits, '.', '_' and '-'), in metrics, logs and sources status.")
        public static let kind = OptionSpec(
            "kind", .choice(["ldap", "scim"]), default: "ldap",
            "ldap (a directory: LDAP, Active Directory) or scim (a SCIM 2.0 server that cannot push, polled: meta.lastModified for changes, a full listing for deletions)."
        )
        public static let url = OptionSpec(
            "url", .url, required: .always,
            "ldap: the directory, ldap://HOST[:PORT] or ldaps://HOST[:PORT] (one server: a poll's position is that server's); scim: the SCIM base, http(s)://HOST[:PORT][/PATH]."
        )
        public static let bindDN = OptionSpec("bindDN", .text, "The DN to bind as (none: an anonymous bind).")
        public static let bindPasswordFile = OptionSpec(
            "bindPasswordFile", .path, "The bind password, on the file's first line; read at every connection; mode 0640 or stricter.")
        public static let baseDN = OptionSpec(
            "baseDN", .text, "ldap (required): where the users and groups are (searched with scope subtree).")
        public static let userFilter = OptionSpec(
            "userFilter", .text, "The users, an LDAP filter (default: the schema's, (objectClass=inetOrgPerson) or AD's person users).")
        public static let groupFilter = OptionSpec(
            "groupFilter", .text, "The groups, an LDAP filter (default: the schema's, (objectClass=groupOfNames) or (objectClass=group)).")
        public static let mode = OptionSpec(
            "mode", .choice(["auto", "syncrepl", "poll"]), default: "auto",
            "syncrepl (RFC 4533 refreshAndPersist: changes as they happen, deletions included), poll (modifyTimestamp, deletions at each full comparison) or auto (syncrepl when the server offers it)."
        )
        public static let pollSeconds = OptionSpec(
            "pollSeconds", .integer(1...86_400), default: "60", "With poll (and scim): seconds between two polls.")
        public static let pollAttribute = OptionSpec(
            "pollAttribute", .choice(["modifyTimestamp", "uSNChanged"]), default: "modifyTimestamp",
            "With poll: the change attribute, modifyTimestamp (any directory) or uSNChanged (Active Directory, compared as an integer; USNs are per domain controller: the url must name one fixed DC)."
        )
        public static let tokenFile = OptionSpec(
            "tokenFile", .path, "scim: the bearer token, on the file's first line; read at every connection; mode 0640 or stricter.")
        public static let requestsPerSecond = OptionSpec(
            "requestsPerSecond", .integer(1...1000), default: "10",
            "scim: requests per second at most; a 429 or 503 waits as its Retry-After says (1 s to 10 minutes).")
        public static let pageSize = OptionSpec(
            "pageSize", .integer(1...1000), default: "100", "scim: resources asked for per page (count).")
        public static let fullCompareEvery = OptionSpec(
            "fullCompareEvery", .integer(1...100_000), default: "10",
            "With poll (and scim): every this many polls (and the first), a listing of every key finds the entries deleted since.")
        public static let onDelete = OptionSpec(
            "onDelete", .choice(["delete", "deactivate"]), default: "deactivate",
            "What a user deleted in the directory (or gone out of the filter) becomes: deleted, or kept with active false. Groups are deleted."
        )
        public static let schema = OptionSpec(
            "schema", .choice(["inetOrgPerson", "activeDirectory"]), default: "inetOrgPerson",
            "The default filters, key and mapping: inetOrgPerson/groupOfNames (entryUUID) or Active Directory (objectGUID, userAccountControl)."
        )
        public static let keyAttribute = OptionSpec(
            "keyAttribute", .text,
            "The attribute that names an entry for good, the resource's externalId (default: entryUUID, or objectGUID for activeDirectory); renames keep it."
        )
        public static let mappingUsers = OptionSpec(
            "mapping.users", .section,
            "SCIM path: LDAP attributes (comma-separated, first present wins) over the schema's defaults; an empty value unmaps the path.")
        public static let mappingGroups = OptionSpec("mapping.groups", .section, "The same for groups (displayName, members).")
        public static let tlsCA = OptionSpec(
            "tls.ca", .path, "The CA (PEM) the server's certificate must chain to (ldaps://, startTLS or https://; default: the system's).")
        public static let startTLS = OptionSpec(
            "tls.startTLS", .boolean, default: "false", "Upgrade an ldap:// connection with StartTLS before the bind.")
        public static let batchSize = OptionSpec(
            "batchSize", .integer(1...10_000), default: "500", "Changes written in one transaction (with the position they reach).")

        public static let all: [OptionSpec] = [
            name, kind, url, bindDN, bindPasswordFile, baseDN, userFilter, groupFilter, mode, pollSeconds, pollAttribute, fullCompareEvery,
            onDelete, schema, keyAttribute, mappingUsers, mappingGroups, tlsCA, startTLS, tokenFile, requestsPerSecond, pageSize, batchSize,
        ]
    }

    public static let sources = OptionSpec(
        "sources", .sections,
        "Directories and SCIM servers the agent pulls users and groups from (LDAP, Active Directory, SCIM polling): their changes take the same write path as the SCIM endpoint's (docs/sources.md).",
        children: Source.all)

    /// The keys of `inbound` (docs/agent.md, "Inbound policy").
    public enum Inbound {
        public static let domains = OptionSpec(
            "domains", .list, required: .always, "The source domains this entry accepts (at least one).")
        public static let types = OptionSpec("types", .list, "User, Group or both (empty: both).")
        public static let filter = OptionSpec(
            "filter", .text,
            "A SCIM scoping filter over the resource as it arrives: only what matches enters (and what stops matching goes).")
        public static let accept = OptionSpec(
            "accept", .sections, required: .always,
            "What enters: a list of {domains, types, filter}; a resource enters when any entry matches.",
            children: [domains, types, filter])
        public static let set = OptionSpec(
            "map.set", .section, "Attribute paths set on every resource that enters, PATH: VALUE (userType: Guest).")
        public static let userName = OptionSpec(
            "map.userName", .text, default: "{userName}",
            "The userName a foreign user gets here: a template of {userName} and {domain} ({userName}@{domain} keeps domains apart).")
        public static let drop = OptionSpec("map.drop", .list, "Attribute paths that never enter.")
        public static let maxEventsPerPoll = OptionSpec(
            "maxEventsPerPoll", .integer(1...1000), default: "100", "The most events one poll of the downlink asks for.")
        public static let waitMs = OptionSpec(
            "waitMs", .integer(0...60_000), default: "25000",
            "How long the broker may hold a poll open when nothing is waiting (long poll), in milliseconds.")
        public static let reportApps = OptionSpec(
            "reportApps", .choice(["named", "anonymous", "none"]), default: "named",
            "What the broker's trace learns of the local targets' answers to what entered: named (status, time and scimType under the target's name), anonymous (the same, the name withheld) or none. Never the answer's detail."
        )
        public static let all: [OptionSpec] = [accept, set, userName, drop, maxEventsPerPoll, waitMs, reportApps]
    }

    public static let inbound = OptionSpec(
        "inbound", .section,
        "What this boundary accepts from other domains, fetched from the broker over the relay's outbound mutual TLS (the downlink): stored as read-only foreign resources. Without it the agent never polls and nothing enters. Needs broker.",
        children: Inbound.all)

    /// `targets`: the apps inside this boundary the agent provisions (docs/agent.md, "Local targets"); the keys of an app
    /// target of the broker (`BrokerOptions.Target.app`), the same delivery engine.
    public static let targets = OptionSpec(
        "targets", .sections,
        "Apps and secondary IdPs inside this boundary that the agent provisions from what it stores: its own IdP's users and groups and the foreign ones its inbound policy accepted. Each has a durable queue in the agent's LMDB file, filled in the write's own transaction, and the broker's delivery engine: retries with Retry-After, rate limit, circuit breaker, dead letters, deletion guard, reconcile, collisions. Routes name source domains: this agent's own (broker.domain; local without a broker) and those that enter through inbound.",
        children: BrokerOptions.Target.app)

    /// In the order of the reference and of `--help`.
    public static let all: [OptionSpec] = [
        dataDir, listen, workers, tokenFile, token, tlsCert, tlsKey, adminListen, maxBodyBytes, maxConnections, requestTimeoutMs,
        idleTimeoutMs, storeMaxBytes, keepOutbox, outboxMaxEvents, outboxMaxBytes, profile, maxResults, scanBudget, patchResponseMaxMembers,
        brokerURL, brokerCA, brokerCert, brokerKey, brokerCRL, brokerDomain, brokerAgent, maxEventsPerBatch, window, policy, inbound,
        sources,
        targets,
    ]

    public static let reference = ConfigReference(
        program: "scim-edge", file: "/etc/scim-edge/agent.yaml", title: "configuration of the scim-edge agent",
        about: [
            "scim-edge serve --config FILE reads its settings from a YAML file (/etc/scim-edge/agent.yaml for the service). It is read strictly: an unknown key, a value of the wrong type or out of bounds, an alias or a duplicate key is an error, and scim-edge check-config reports every problem of the file in one run, each with its line, column, key and a fix. Flags given to scim-edge serve override the file; without a file the flags and these defaults are the whole configuration."
        ], specs: all, seeAlso: ["scim-broker.yaml(5)"])
}
