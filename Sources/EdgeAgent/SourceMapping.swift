import EdgeLDAP
import SCIM

/// How a source finds changes: content synchronisation (RFC 4533), polling,
/// or syncrepl when the server offers it and polling otherwise.
public enum SourceMode: String, Sendable, CaseIterable {
    case auto, syncrepl, poll
}

/// What a user deleted in the directory becomes here (groups are always deleted).
public enum SourceDeletion: String, Sendable, CaseIterable {
    case delete, deactivate
}

/// What a source reads: an LDAP directory, or a SCIM server polled (docs/sources.md).
public enum SourceKind: String, Sendable, CaseIterable {
    case ldap, scim
}

/// The attribute an LDAP poll compares with its high-water mark:
/// `modifyTimestamp` (a GeneralizedTime, any directory) or `uSNChanged`
/// (an integer, Active Directory, one domain controller: USNs are per DC).
public enum PollAttribute: String, Sendable, CaseIterable {
    case modifyTimestamp, uSNChanged
}

/// The directory's kind: the default filters, key and mapping.
public enum DirectorySchema: String, Sendable, CaseIterable {
    case inetOrgPerson, activeDirectory
}

/// One pull source: an LDAP directory or a SCIM server (docs/sources.md).
public struct SourceConfiguration: Sendable {
    public var name: String
    public var kind: SourceKind = .ldap
    public var url: String
    public var bindDN: String?
    /// The bind password on the file's first line; mode 0640 or stricter; read at every (re)connect.
    public var bindPasswordFile: String?
    public var baseDN: String
    public var userFilter: String?
    public var groupFilter: String?
    public var mode: SourceMode = .auto
    public var pollSeconds = 60
    /// LDAP polls: the change attribute.
    public var pollAttribute: PollAttribute = .modifyTimestamp
    /// SCIM: the bearer token on the file's first line; mode 0640 or stricter; read at every (re)connect.
    public var tokenFile: String?
    /// SCIM: requests per second at most (429 and 503 slow it further, per Retry-After).
    public var requestsPerSecond = 10
    /// SCIM: resources asked for per page.
    public var pageSize = 100
    /// Every this many polls, a full listing finds the entries deleted since.
    public var fullCompareEvery = 10
    public var onDelete: SourceDeletion = .deactivate
    public var schema: DirectorySchema = .inetOrgPerson
    /// The attribute that names an entry for good (renames keep it); nil: the schema's.
    public var keyAttribute: String?
    /// Overrides of the schema's mapping: SCIM path → LDAP attributes in order of precedence (empty: not mapped).
    public var userMapping: [(path: String, attributes: [String])] = []
    public var groupMapping: [(path: String, attributes: [String])] = []
    public var tls = LDAPTLSOptions()
    /// Changes per write transaction.
    public var batchSize = 500

    public init(name: String, url: String, baseDN: String) {
        self.name = name
        self.url = url
        self.baseDN = baseDN
    }

    /// The mapping in force: the schema's defaults with the overrides applied.
    public var mapping: SourceMapping {
        SourceMapping(
            schema: schema, key: keyAttribute, users: userMapping, groups: groupMapping, userFilter: userFilter, groupFilter: groupFilter)
    }
}

/// Why an entry could not become a SCIM resource.
public struct SourceMappingError: Error, Sendable, CustomStringConvertible {
    public let message: String
    public init(_ message: String) { self.message = message }
    public var description: String { message }
}

/// From directory entries to SCIM bodies: which SCIM path each LDAP
/// attribute feeds, how an entry's key, kind and members are read.
public struct SourceMapping: Sendable {
    public static let enterprise = "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User"
    public var keyAttribute: String
    public var userFilter: String
    public var groupFilter: String
    public var users: [(path: String, attributes: [String])]
    public var groups: [(path: String, attributes: [String])]
    /// The parsed filters, to tell users from groups.
    let userMatcher: LDAPFilter?
    let groupMatcher: LDAPFilter?

    public static func defaults(_ schema: DirectorySchema) -> (
        key: String, userFilter: String, groupFilter: String, users: [(String, [String])], groups: [(String, [String])]
    ) {
        switch schema {
        case .inetOrgPerson:
            return (
                "entryUUID", "(objectClass=inetOrgPerson)", "(objectClass=groupOfNames)",
                [
                    ("userName", ["uid"]), ("name.formatted", ["cn"]), ("name.givenName", ["givenName"]), ("name.familyName", ["sn"]),
                    ("displayName", ["displayName", "cn"]), ("emails", ["mail"]), ("phoneNumbers", ["telephoneNumber"]),
                    ("title", ["title"]), ("\(enterprise):employeeNumber", ["employeeNumber"]),
                ],
                [("displayName", ["cn"]), ("members", ["member", "uniqueMember"])]
            )
        case .activeDirectory:
            return (
                "objectGUID", "(&(objectCategory=person)(objectClass=user))", "(objectClass=group)",
                [
                    ("userName", ["userPrincipalName", "sAMAccountName"]), ("name.formatted", ["cn"]),
                    ("name.givenName", ["givenName"]), ("name.familyName", ["sn"]), ("displayName", ["displayName", "cn"]),
                    ("emails", ["mail"]), ("phoneNumbers", ["telephoneNumber"]), ("title", ["title"]),
                    ("active", ["userAccountControl"]), ("\(enterprise):employeeNumber", ["employeeID"]),
                    ("\(enterprise):department", ["department"]),
                ],
                [("displayName", ["cn"]), ("members", ["member"])]
            )
        }
    }

    public init(
        schema: DirectorySchema, key: String? = nil, users: [(path: String, attributes: [String])] = [],
        groups: [(path: String, attributes: [String])] = [], userFilter: String? = nil, groupFilter: String? = nil
    ) {
        let d = Self.defaults(schema)
        keyAttribute = key ?? d.key
        self.userFilter = userFilter ?? d.userFilter
        self.groupFilter = groupFilter ?? d.groupFilter
        func merge(_ base: [(String, [String])], _ overrides: [(path: String, attributes: [String])]) -> [(
            path: String, attributes: [String]
        )] {
            var out = base.map { (path: $0.0, attributes: $0.1) }
            for o in overrides {
                if let i = out.firstIndex(where: { $0.path.lowercased() == o.path.lowercased() }) {
                    out[i].attributes = o.attributes
                } else {
                    out.append(o)
                }
            }
            return out.filter { !$0.attributes.isEmpty }
        }
        self.users = merge(d.users, users)
        self.groups = merge(d.groups, groups)
        userMatcher = try? LDAPFilter(self.userFilter)
        groupMatcher = try? LDAPFilter(self.groupFilter)
    }

    /// The one search of a source: its users and its groups.
    public var searchFilter: String { "(|\(userFilter)\(groupFilter))" }

    /// Every attribute a search must return.
    public var attributes: [String] {
        var names = ["objectClass", keyAttribute]
        for m in users + groups { names += m.attributes }
        for f in [userMatcher, groupMatcher].compactMap({ $0 }) { names += f.attributeNames }
        var seen = Set<String>()
        return names.filter { seen.insert($0.lowercased()).inserted }
    }

    /// The path of the group members' DNs (`members`).
    var memberAttributes: [String] { groups.first { $0.path == "members" }?.attributes ?? [] }

    /// The entry's key: the text of its key attribute (`objectGUID` in its
    /// usual form, as it is binary); nil when it has none.
    public func key(of entry: LDAPEntry) -> String? {
        guard let raw = entry.values(keyAttribute).first, !raw.isEmpty else { return nil }
        if keyAttribute.lowercased() == "objectguid" { return guidString(raw) }
        return String(decoding: raw, as: UTF8.self).lowercased()
    }

    /// Whether the entry is a group: it matches the group filter. Whatever
    /// else the source's search returned matched the user filter (which
    /// the server evaluates: Active Directory's `objectCategory=person`
    /// cannot be checked here).
    public func isGroup(_ entry: LDAPEntry) -> Bool { groupMatcher?.matches(entry) == true }

    /// The SCIM body of a user (without members for a group: those are DNs,
    /// resolved in the write transaction). Throws when the entry cannot be mapped.
    public func body(of entry: LDAPEntry, group: Bool, key: String) throws(SourceMappingError) -> JSONObject {
        var body = JSONObject()
        var schemas: [JSON] = [
            .string(group ? "urn:ietf:params:scim:schemas:core:2.0:Group" : "urn:ietf:params:scim:schemas:core:2.0:User")
        ]
        body["externalId"] = .string(key)
        for m in group ? groups : users where m.path != "members" {
            guard let attribute = m.attributes.first(where: { !entry.values($0).isEmpty }) else { continue }
            let values = entry.strings(attribute)
            let value: JSON
            switch m.path {
            case "emails", "phoneNumbers":
                value = .array(
                    values.enumerated().map { i, v in ["value": .string(v), "type": "work", "primary": .bool(i == 0)] })
            case "active":
                guard let active = Self.active(values[0]) else {
                    throw SourceMappingError("\(attribute) '\(values[0])' is neither a number (userAccountControl) nor TRUE/FALSE")
                }
                value = .bool(active)
            default:
                value = .string(values[0])
            }
            if m.path.hasPrefix(Self.enterprise + ":") {
                let name = String(m.path.dropFirst(Self.enterprise.count + 1))
                var ext = body[Self.enterprise]?.objectValue ?? JSONObject()
                ext[name] = value
                body[Self.enterprise] = .object(ext)
                if !schemas.contains(.string(Self.enterprise)) { schemas.append(.string(Self.enterprise)) }
            } else if let dot = m.path.firstIndex(of: ".") {
                let outer = String(m.path[..<dot]), inner = String(m.path[m.path.index(after: dot)...])
                var o = body[outer]?.objectValue ?? JSONObject()
                o[inner] = value
                body[outer] = .object(o)
            } else {
                body[m.path] = value
            }
        }
        let required = group ? "displayName" : "userName"
        guard body[required] != nil else {
            let from = (group ? groups : users).first { $0.path == required }?.attributes.joined(separator: " or ") ?? "no attribute"
            throw SourceMappingError("no value for \(required) (mapped from \(from))")
        }
        body["schemas"] = .array(schemas)
        return body
    }

    /// The entry as the write path takes it: mapped, or unmappable with the reason.
    public func change(_ entry: LDAPEntry, key: String) -> SourceChange {
        let group = isGroup(entry)
        do throws(SourceMappingError) {
            let body = try body(of: entry, group: group, key: key)
            return .upsert(
                SourceEntry(
                    key: key, reference: normalizedDN(entry.dn), name: entry.dn, group: group, body: body,
                    members: group ? memberDNs(of: entry) : []))
        } catch {
            return .unmappable(dn: entry.dn, reason: error.message)
        }
    }

    /// The member DNs of a group entry, normalised.
    public func memberDNs(of entry: LDAPEntry) -> [String] {
        var seen = Set<String>()
        return memberAttributes.flatMap { entry.strings($0) }.map(normalizedDN).filter { seen.insert($0).inserted }
    }

    /// `active` from `userAccountControl` (bit 2, ACCOUNTDISABLE, clear) or a boolean attribute.
    static func active(_ text: String) -> Bool? {
        if let n = Int(text) { return n & 2 == 0 }
        switch text.uppercased() {
        case "TRUE": return true
        case "FALSE": return false
        default: return nil
        }
    }
}

/// A DN compared as directories compare them for our purposes: lower-cased,
/// without spaces around the separators. (Attribute types with other
/// matching rules and multi-valued RDNs in another order are not unified.)
public func normalizedDN(_ dn: String) -> String {
    var out = ""
    var pendingSpaces = ""
    var afterSeparator = true
    var escaped = false
    for c in dn.lowercased() {
        if escaped {
            out += pendingSpaces
            pendingSpaces = ""
            out.append(c)
            escaped = false
            afterSeparator = false
            continue
        }
        switch c {
        case "\\":
            out += pendingSpaces
            pendingSpaces = ""
            out.append(c)
            escaped = true
            afterSeparator = false
        case ",", "=", "+":
            pendingSpaces = ""
            out.append(c)
            afterSeparator = true
        case " ":
            if !afterSeparator { pendingSpaces.append(c) }
        default:
            out += pendingSpaces
            pendingSpaces = ""
            out.append(c)
            afterSeparator = false
        }
    }
    return out
}

extension LDAPFilter {
    /// The attributes the filter tests.
    var attributeNames: [String] {
        switch self {
        case .and(let fs), .or(let fs): return fs.flatMap(\.attributeNames)
        case .not(let f): return f.attributeNames
        case .present(let a), .equal(let a, _), .greaterOrEqual(let a, _), .lessOrEqual(let a, _), .substring(let a, _, _, _): return [a]
        }
    }
}
