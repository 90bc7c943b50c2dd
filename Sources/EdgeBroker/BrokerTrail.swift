import EdgeDelivery
import EdgeStore
import SCIM

/// The broker's store as the delivery engine sees it (`DeliveryTables`):
/// the engine's databases are the broker's own, and a resource is named by
/// its broker id (`brokerIds` → `<domain>/<Type>/<source id>`).
extension BrokerStore: DeliveryTables {
    package var otherTargetTables: [(Database, WritableKeyPath<ForgottenTarget, Int>)] {
        [(downlink, \.queued), (downlinkTrail, \.feedRecords)]
    }

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
    /// (`byTrace`; the first `limits.resources`, `traceTouched`), or the one
    /// resource a broker id, `userName`, `externalId`, email, group
    /// `displayName`, id at a target or id at the source names (several when
    /// several resources share that name). A trace id that reached no target
    /// yet is known only to the directory's latest change: found by a scan
    /// of at most `limits.scan` resources (`scanStopped`: the scan stopped
    /// there without finding it).
    package func resolveTrail(_ idOrTrace: String, limits: TrailLimits, _ txn: borrowing some StoreReading & ~Copyable) throws
        -> TrailNames
    {
        let limit = limits.resources, budget = limits.scan
        let trail = self.trail, resources = self.resources, brokerIds = self.brokerIds
        let byValue = self.byValue, targetOwners = self.targetOwners, targetState = self.targetState
        // The configured targets, and those a running broker saved a status for (a CLI opens the store without them).
        var targetNames = Set(targets.map(\.name))
        try txn.scanKeys(targetState, from: Array("status/".utf8), to: Array("status0".utf8)) { k in
            targetNames.insert(String(decoding: k.dropFirst(7), as: UTF8.self))
            return true
        }
        let touched = try traceTouched(idOrTrace, limit: limit, txn)
        var ids = touched.ids, total = touched.total
        var byTrace = touched.byTrace
        var scanStopped: Int?
        if !byTrace {
            var hasTrail = false
            try txn.scanKeys(trail, from: prefixed(idOrTrace, []), to: prefixEnd(idOrTrace)) { _ in
                hasTrail = true; return false
            }
            let known = try txn.get(brokerIds, Array(idOrTrace.utf8)) != nil
            func add(_ id: String) { if !ids.contains(id) { ids.append(id) } }
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
                                let id = try JSONParser.parse(bytes, limits: .stored)["id"]?.stringValue
                            {
                                add(id)
                            }
                            return true
                        }
                    }
                }
                // An account at a target.
                for name in targetNames.sorted() {
                    for type in ["User", "Group"] {
                        if let owner = try txn.get(targetOwners, ownerKey(name, type, idOrTrace)) {
                            add(String(decoding: owner, as: UTF8.self))
                        }
                    }
                }
            }
            if ids.isEmpty, !idOrTrace.utf8.contains(UInt8(ascii: "/")) {
                // An id at the source: the directory's key (`<domain>/<type>/<source id>`), one read per domain.
                for domain in try storedDomains(txn) {
                    for type in ["User", "Group"] {
                        if let bytes = try txn.get(resources, Array("\(domain)/\(type)/\(idOrTrace)".utf8)),
                            let id = try JSONParser.parse(bytes, limits: .stored)["id"]?.stringValue
                        {
                            add(id)
                        }
                    }
                }
            }
            if ids.isEmpty && budget > 0 {
                // A trace that reached no target yet: the directory's latest change knows it.
                var read = 0
                try txn.scan(resources) { _, v in
                    guard read < budget else {
                        scanStopped = read
                        return false
                    }
                    read += 1
                    if let o = try JSONParser.parse(v, limits: .stored).objectValue, let id = o["id"]?.stringValue,
                        o[BrokerStore.sourceExtension]?["trace"]?.stringValue == idOrTrace
                    {
                        ids.append(id)
                    }
                    return ids.count < limit
                }
                byTrace = !ids.isEmpty
                if byTrace { scanStopped = nil }
            }
            total = ids.count
        }
        return TrailNames(ids: ids, byTrace: byTrace, total: total, scanStopped: scanStopped)
    }

    /// The domains the directory holds resources of: one seek each.
    func storedDomains(_ txn: borrowing some StoreReading & ~Copyable) throws -> [String] {
        var out: [String] = []
        var from: [UInt8]?
        while true {
            var next: [UInt8]?
            try txn.scanKeys(resources, from: from) { k in
                next = Array(k.prefix { $0 != UInt8(ascii: "/") })
                return false
            }
            guard let domain = next else { return out }
            out.append(String(decoding: domain, as: UTF8.self))
            from = domain + [UInt8(ascii: "0")]  // past `<domain>/…` ("0" follows "/")
        }
    }

    /// The resources `query` names (not a trace id): for `targets push`.
    public func resources(named query: String) throws -> [String] {
        try environment.read { txn in
            let r = try resolveTrail(query, limits: TrailLimits(scan: 0), txn)
            return r.byTrace ? [] : r.ids
        }
    }

    /// The broker id of a domain's user by its source id.
    func memberBrokerID(domain: String, sourceID: String, _ txn: borrowing WriteTransaction) throws -> String? {
        guard let bytes = try txn.get(resources, Array("\(domain)/User/\(sourceID)".utf8)) else { return nil }
        return try JSONParser.parse(bytes, limits: .stored)["id"]?.stringValue
    }
}
