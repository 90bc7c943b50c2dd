import EdgeConfig
import EdgeTLS
import SCIM

/// The keys of one entry of `targets` bound to `TargetConfiguration`:
/// those of an app (every key of `BrokerOptions.Target` but `domain`), and
/// `domain` when the program takes a boundary as a target (the broker).
/// `collisions`, `namespace` and `link` depend on each other: declared
/// here, read by `decodeCollisions`.
public func makeTargetOptionTable(domain: OptionBinding<TargetConfiguration>?) -> OptionTable<TargetConfiguration> {
    var bindings: [OptionBinding<TargetConfiguration>] = [

        .init(BrokerOptions.Target.name) { t, v in
            do throws(SCIMError) { t.name = try TargetConfiguration(name: v.text, url: "http://127.0.0.1:1").name } catch {
                return OptionProblem(error.detail)
            }
            return nil
        },
        .init(BrokerOptions.Target.url) { t, v in
            do throws(SCIMError) {
                let parsed = try TargetConfiguration(name: "unnamed", url: v.text)
                (t.url, t.port, t.useTLS, t.basePath, t.host) = (parsed.url, parsed.port, parsed.useTLS, parsed.basePath, parsed.host)
            } catch { return OptionProblem(error.detail) }
            return nil
        },
        .init(BrokerOptions.Target.tokenFile) { t, v in
            t.tokenFile = v.text; return nil
        },
        .init(BrokerOptions.Target.tlsCA) { t, v in
            t.tls.trustRootsFile = v.text; return nil
        },
        .init(BrokerOptions.Target.tlsCert) { t, v in
            t.tls.certificateChainFile = v.text; return nil
        },
        .init(BrokerOptions.Target.tlsKey) { t, v in
            t.tls.privateKeyFile = v.text; return nil
        },
        .init(BrokerOptions.Target.tlsMinVersion) { t, v in
            t.tls.minimumVersion = v.text == "1.3" ? .tls13 : .tls12; return nil
        },
        .init(BrokerOptions.Target.requestsPerSecond) { t, v in
            t.requestsPerSecond = Double(v.integer); return nil
        },
        .init(BrokerOptions.Target.concurrency) { t, v in
            t.concurrency = v.integer; return nil
        },
        .init(BrokerOptions.Target.onRemove) { t, v in
            t.removal = RemovalMode(rawValue: v.text)!; return nil
        },
        .init(BrokerOptions.Target.maxDeletes) { t, v in
            t.deletionGuard.maxDeletes = v.integer; return nil
        },
        .init(BrokerOptions.Target.windowSeconds) { t, v in
            t.deletionGuard.windowSeconds = v.integer; return nil
        },
        .init(manual: BrokerOptions.Target.collisions),
        .init(manual: BrokerOptions.Target.namespaceUserName),
        .init(manual: BrokerOptions.Target.namespaceDisplayName),
        .init(manual: BrokerOptions.Target.linkAttribute),
        .init(manual: BrokerOptions.Target.linkSourceOfRecord),
        .init(BrokerOptions.Target.maxMembersPerPatch) { t, v in
            t.maxMembersPerPatch = v.integer; return nil
        },
        .init(BrokerOptions.Target.breakerThreshold) { t, v in
            t.breakerThreshold = v.integer; return nil
        },
        .init(BrokerOptions.Target.timeoutMs) { t, v in
            t.requestTimeoutMilliseconds = UInt64(v.integer); return nil
        },
        .init(section: BrokerOptions.Target.rename) { node, path, d, t in
            guard var rename = YAMLMapping(node, path: path, d) else { return }
            for (from, mark, value) in rename.entries() {
                guard case .scalar(let to, _, _) = value, !to.isEmpty else {
                    d.error(rename.full(from), "must name an attribute", at: mark)
                    continue
                }
                t.mapping.rename.append((from, to))
            }
            rename.finish()
        },
        .init(BrokerOptions.Target.drop) { t, v in
            t.mapping.drop = v.list; return nil
        },
        .init(section: BrokerOptions.Target.constant) { node, path, d, t in
            guard var constant = YAMLMapping(node, path: path, d) else { return }
            for (path, mark, value) in constant.entries() {
                guard case .scalar(let text, let plain, _) = value else {
                    d.error(constant.full(path), "must be a scalar", at: mark)
                    continue
                }
                t.mapping.constant.append((path, AttributeMapping.constantValue(text, plain: plain)))
            }
            constant.finish()
        },
        .init(section: BrokerOptions.Target.routes) { node, path, d, t in
            guard case .sequence(let routes, _) = node else {
                d.error(path, "must be a list ('- …' entries)", at: node.mark)
                return
            }
            for (i, item) in routes.enumerated() {
                d.record("\(path)[\(i)]", item.mark)
                guard var r = YAMLMapping(item, path: "\(path)[\(i)]", d) else { continue }
                let domains = r.strings("domains") ?? [], filter = r.string("filter")
                var types = r.strings("types") ?? []
                for (j, type) in types.enumerated() where type != "User" && type != "Group" {
                    d.error("\(r.full("types"))[\(j)]", "route type '\(type)' must be User or Group")
                }
                types = types.filter { $0 == "User" || $0 == "Group" }
                do throws(SCIMError) {
                    t.routes.append(try Route(domains: domains, types: types, filter: filter))
                } catch {
                    // What Route refuses, with the types already checked above, is the filter.
                    r.problem("filter", "target '\(t.name)': \(error.detail)")
                }
                r.finish()
            }
        },
    ]
    if let domain { bindings.insert(domain, at: 2) }
    return OptionTable(domain == nil ? BrokerOptions.Target.app : BrokerOptions.Target.all, bindings)
}

extension TargetConfiguration {
    /// `collisions`, `namespace` and `link` of one entry (`m`), which depend
    /// on each other; `domains`: the source domains a link's
    /// `sourceOfRecord` may name (empty: any).
    public mutating func decodeCollisions(_ m: inout YAMLMapping, domains: [String]) {
        let namespace = m.mapping("namespace"), link = m.mapping("link"), collisions = m.string("collisions")
        if let c = collisions {
            switch c {
            case "refuse": self.collisions = .refuse
            case "namespace":
                var userName = CollisionPolicy.defaultUserNameTemplate, displayName = CollisionPolicy.defaultDisplayNameTemplate
                if var n = namespace {
                    for (key, placeholder) in [("userName", "{userName}"), ("displayName", "{displayName}")] {
                        guard let template = n.string(key) else { continue }
                        guard template.contains(placeholder), template.contains("{domain}") else {
                            n.problem(key, "must hold \(placeholder) and {domain}, so that names stay unique per domain")
                            continue
                        }
                        if key == "userName" { userName = template } else { displayName = template }
                    }
                    n.finish()
                }
                self.collisions = .namespace(userName: userName, displayName: displayName)
            case "link":
                guard var l = link else {
                    m.problem(
                        "collisions", "'collisions: link' needs 'link: {attribute: …, sourceOfRecord: [domains]}'",
                        fix: "add link: {attribute: employeeNumber, sourceOfRecord: [your domains, first one's data wins]}")
                    break
                }
                let attribute = l.required("attribute", "the attribute that says two users are one person")
                let order = l.strings("sourceOfRecord")
                var usable = attribute != nil && order != nil
                if let order {
                    if order.isEmpty {
                        l.problem("sourceOfRecord", "must list at least one domain (the first one's data wins)")
                        usable = false
                    } else if let unknown = order.first(where: { !domains.isEmpty && !domains.contains($0) }) {
                        l.problem(
                            "sourceOfRecord",
                            "names '\(unknown)', which is not one of the broker's domains (\(domains.joined(separator: ", ")))")
                        usable = false
                    } else if let twice = order.enumerated().first(where: { order[..<$0.offset].contains($0.element) })?.element {
                        l.problem("sourceOfRecord", "names '\(twice)' twice")
                        usable = false
                    }
                } else if !l.has("sourceOfRecord") {
                    l.problem("sourceOfRecord", "is required: the domains in order of precedence (the first one's data wins)")
                }
                if usable, let attribute, let order {
                    do throws(SCIMError) { self.collisions = .link(try LinkPolicy(attribute: attribute, sourceOfRecord: order)) } catch {
                        l.problem("attribute", error.detail)
                    }
                }
                l.finish()
            default:
                m.problem("collisions", "must be refuse, namespace or link, got '\(c)'")
            }
        }
        // Not when 'collisions' is itself wrong: that is the one problem to report.
        if namespace != nil, collisions == nil || collisions == "refuse" || collisions == "link" {
            m.problem("namespace", "applies only with 'collisions: namespace'", fix: "add collisions: namespace, or remove it")
        }
        if link != nil, collisions == nil || collisions == "refuse" || collisions == "namespace" {
            m.problem("link", "applies only with 'collisions: link'", fix: "add collisions: link, or remove it")
        }
    }

    /// The bearer token: `--target-token`, or the first line of `tokenFile`
    /// (read at start and on SIGHUP, so that it can rotate).
    public func resolveToken() throws(ConfigError) -> String? {
        if let token { return token }
        guard let tokenFile else { return nil }
        let text = String(decoding: try readFileBytes(tokenFile), as: UTF8.self)
        let token = text.split(whereSeparator: \.isNewline).first.map { String($0).trimmingSpaces } ?? ""
        guard !token.isEmpty else { throw ConfigError("target '\(name)': \(tokenFile) holds no token", at: nil, file: tokenFile) }
        return token
    }

    /// Problems with the files the target names (`check-config`): its token
    /// file (permissions, a token on the first line), credentials at all,
    /// its CA and client certificate; each reported at `key` (`targets[i]`).
    public func checkFiles(_ checks: inout FileChecks, at key: String) {
        if let file = tokenFile, checks.file(file, at: "\(key).tokenFile", secret: true) {
            do { _ = try resolveToken() } catch {
                checks.problem("\(key).tokenFile", error.message, fix: "write the app's token on the first line")
            }
        }
        if token == nil && tokenFile == nil && tls.certificateChainFile == nil {
            checks.problem(
                "\(key)",
                "target \(name): no tokenFile and no client certificate: the app would be called without credentials",
                fix: "set tokenFile, or tls: {cert, key}")
        }
        if let ca = tls.trustRootsFile { checks.file(ca, at: "\(key).tls.ca") }
        if let cert = tls.certificateChainFile {
            checks.certificate(
                cert, key: tls.privateKeyFile, ca: nil,
                at: ("\(key).tls.cert", "\(key).tls.key", "\(key).tls.ca"))
        }
    }
}
