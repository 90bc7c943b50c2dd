import EdgeDelivery
import EdgeStore
import SCIM

/// The broker's store as the delivery engine sees it (`DeliveryTables`):
/// the engine's databases are the broker's own, and a resource is named by
/// its broker id (`brokerIds` → `<domain>/<Type>/<source id>`).
extension BrokerStore: DeliveryTables {
    package var otherTargetTables: [Database] { [downlink] }

    package func deliveryEntry(_ id: String, members: Bool, _ txn: borrowing some StoreReading & ~Copyable) throws -> DirectoryEntry? {
        guard let key = try txn.get(brokerIds, Array(id.utf8)), let bytes = try txn.get(resources, key),
            let o = try JSONParser.parse(bytes, limits: .stored).objectValue
        else { return nil }
        let parts = String(decoding: key, as: UTF8.self).split(separator: "/", maxSplits: 2)
        return (String(parts[0]), String(parts[1]), parts[1] == "Group" && members ? try withMembers(txn, o) : o)
    }

    package func groupMemberEntry(group: String, member: String, _ txn: borrowing some StoreReading & ~Copyable) throws -> JSONObject? {
        try txn.get(groupMembers, BrokerStore.memberKey(group, member)).flatMap { try JSONParser.parse($0, limits: .stored).objectValue }
    }

    package func groupMemberIDs(_ group: String, after cursor: String?, limit: Int, _ txn: borrowing some StoreReading & ~Copyable) throws
        -> [String]
    {
        try EdgeDelivery.groupMemberIDs(in: groupMembers, group, after: cursor, limit: limit, txn)
    }

    package func groupsHolding(_ member: String, _ txn: borrowing some StoreReading & ~Copyable) throws -> [String] {
        try groups(of: member, txn)
    }

    package func forEachDirectoryEntry(
        _ type: String, members: Bool, from: [UInt8]?, _ txn: borrowing some StoreReading & ~Copyable,
        _ body: (_ position: [UInt8], DirectoryEntry) throws -> Bool
    ) throws {
        try txn.scan(resources, from: from) { k, v in
            let parts = String(decoding: k, as: UTF8.self).split(separator: "/", maxSplits: 2)
            guard parts.count == 3, parts[1] == type, let o = try JSONParser.parse(v, limits: .stored).objectValue else { return true }
            return try body(k, (String(parts[0]), type, type == "Group" && members ? try withMembers(txn, o) : o))
        }
    }
}

extension BrokerStore {
    /// The broker ids `query` names (`trail`): those a trace id touched
    /// (`byTrace`), or the one resource a broker id, `userName`,
    /// `externalId`, email, group `displayName`, id at a target or id at the
    /// source names (several when several resources share that name).
    package func resolveTrail(_ idOrTrace: String, _ txn: borrowing some StoreReading & ~Copyable) throws -> (ids: [String], byTrace: Bool)
    {
        let trail = self.trail, traces = self.traces, resources = self.resources, brokerIds = self.brokerIds
        let byValue = self.byValue, targetOwners = self.targetOwners, targetState = self.targetState
        // The configured targets, and those a running broker saved a status for (a CLI opens the store without them).
        var targetNames = Set(targets.map(\.name))
        try txn.scanKeys(targetState, from: Array("status/".utf8), to: Array("status0".utf8)) { k in
            targetNames.insert(String(decoding: k.dropFirst(7), as: UTF8.self))
            return true
        }
        var ids: [String] = []
        try txn.scan(traces, from: prefixed(idOrTrace, []), to: prefixEnd(idOrTrace)) { k, _ in
            ids.append(String(decoding: k[(idOrTrace.utf8.count + 1)...], as: UTF8.self))
            return true
        }
        var byTrace = !ids.isEmpty
        if !byTrace {
            var hasTrail = false
            try txn.scan(trail, from: prefixed(idOrTrace, []), to: prefixEnd(idOrTrace)) { _, _ in
                hasTrail = true; return false
            }
            let known = try txn.get(brokerIds, Array(idOrTrace.utf8)) != nil
            if hasTrail || known {
                ids = [idOrTrace]
            } else {
                // A userName, an externalId, an email or a group's displayName, from the list indexes.
                for type in ["User", "Group"] {
                    for attribute in [IndexedAttribute.userName, .externalId, .email, .displayName] where attribute.applies(to: type) {
                        guard let value = attribute.normalized(.string(idOrTrace)) else { continue }
                        let p = BrokerStore.valuePrefix(type, attribute, value)
                        try txn.scan(byValue, from: p, to: p.dropLast() + [1]) { _, key in
                            if let bytes = try txn.get(resources, key),
                                let id = try JSONParser.parse(bytes, limits: .stored)["id"]?.stringValue,
                                !ids.contains(id)
                            {
                                ids.append(id)
                            }
                            return true
                        }
                    }
                }
                // An account at a target.
                for name in targetNames.sorted() {
                    for type in ["User", "Group"] {
                        if let owner = try txn.get(targetOwners, prefixed(name, "\(type)/\(idOrTrace)")) {
                            let id = String(decoding: owner, as: UTF8.self)
                            if !ids.contains(id) { ids.append(id) }
                        }
                    }
                }
            }
            if ids.isEmpty {
                // A trace that reached no target yet (the directory knows its latest change), or a source id.
                var named: [String] = []
                try txn.scan(resources) { _, v in
                    if let o = try JSONParser.parse(v, limits: .stored).objectValue, let id = o["id"]?.stringValue {
                        let source = o[BrokerStore.sourceExtension]
                        if source?["trace"]?.stringValue == idOrTrace {
                            ids.append(id)
                        } else if source?["id"]?.stringValue == idOrTrace {
                            named.append(id)
                        }
                    }
                    return true
                }
                byTrace = !ids.isEmpty
                if !byTrace { ids = named }
            }
        }
        return (ids, byTrace)
    }

    /// The resources `query` names (not a trace id): for `targets push`.
    public func resources(named query: String) throws -> [String] {
        try environment.read { txn in
            let (ids, byTrace) = try resolveTrail(query, txn)
            return byTrace ? [] : ids
        }
    }

    /// The broker id of a domain's user by its source id.
    func memberBrokerID(domain: String, sourceID: String, _ txn: borrowing WriteTransaction) throws -> String? {
        guard let bytes = try txn.get(resources, Array("\(domain)/User/\(sourceID)".utf8)) else { return nil }
        return try JSONParser.parse(bytes, limits: .stored)["id"]?.stringValue
    }
}
