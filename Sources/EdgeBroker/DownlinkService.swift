import EdgeDelivery
import EdgeHTTP
import EdgeLoop
import EdgeStore
import SCIM

/// The feeds of the targets that are boundaries (`domain:`), and the polls
/// parked on them (long poll, RFC 8936 §2.4 without `returnImmediately`).
/// At most one poll is parked per destination: a newer one answers the
/// older with nothing (bounded, and a dead connection's poll goes).
/// Threading: loop-confined (the broker's loop).
final class BrokerFeeds {
    struct Parked {
        let responder: Responder
        let timer: LoopTimer
        let epoch: String
        let ack: UInt64
        let after: UInt64?
        let limit: Int
        let speaks: Int
        /// When it is answered with nothing (loop time, ms).
        let deadline: UInt64
    }
    /// By destination domain.
    let destinations: [String: TargetConfiguration]
    private(set) var parked: [String: Parked] = [:]
    /// Per destination: queue depth and the oldest item's time, counted at
    /// most every 10 s (the count walks the queue), for metrics.
    var backlog: [String: (count: Int, oldest: Int64, countedAt: UInt64)] = [:]
    /// Events served (each delivery of an event counts: resends too).
    var served: [String: Int] = [:]
    /// Destinations whose feed is starting again for a new store.
    var resyncing: Set<String> = []
    /// Per destination: the poll (epoch, acknowledgement, `after`) that started its last resync, and when.
    var lastResync: [String: (epoch: String, ack: UInt64, after: UInt64?, at: UInt64)] = [:]
    /// Per destination: resyncs started, and stale polls answered `resync` without starting one again.
    var resyncs: [String: (started: Int, repeated: Int)] = [:]
    /// How long the same stale poll gets `resync` again without the work being done again.
    static let resyncRepeatMilliseconds: UInt64 = 60_000
    /// Destinations whose feed is being materialised ahead of the next poll (`materializeAhead`).
    var ahead: Set<String> = []
    /// Destinations whose backlog is being counted (on the thread pool).
    var counting: Set<String> = []
    /// Per destination: the events its agent acknowledged, by outcome, and
    /// from the source agent's acceptance to the boundary's commit.
    var outcomes: [String: [String: Int]] = [:]
    /// Per destination: its local apps' answers recorded, by outcome (and `unmatched`).
    var appOutcomes: [String: [String: Int]] = [:]
    /// Per destination: acknowledged events whose trail record could not be
    /// read, their hop made from the event itself (`recovered`) or not made.
    var untraced: [String: [String: Int]] = [:]
    /// Per destination: queue items that could not be read (dead letters now).
    var unreadableItems: [String: Int] = [:]
    var propagation: [String: RecentSamples] = [:]
    /// Per destination: the store (epoch) that polled last, and when (loop ms).
    var lastPoll: [String: (epoch: String, at: UInt64)] = [:]
    /// Per destination: polls refused because another store of it is polling.
    var storeConflicts: [String: Int] = [:]
    var conflictLog = RateLimitedLog()
    /// Per destination and part (`outcomes`, `appOutcomes`): poll reports refused (400 invalid_report).
    var reportsRefused: [String: [String: Int]] = [:]
    var reportLog = RateLimitedLog()
    /// A store that polled within this long is live, and so is one with a poll parked on a connection still open.
    static let liveStoreMilliseconds: UInt64 = 5000

    /// Whether a store other than `epoch` is polling this destination's feed
    /// now: two agents with their own stores and one certificate (an HA pair
    /// both active, a clone started by mistake). Each would make the other's
    /// next poll start the feed again, a pass over the directory each time;
    /// the newcomer is refused instead, until the other has been silent for
    /// `liveStoreMilliseconds` (a re-imaged appliance's old process is gone).
    func anotherStoreIsLive(_ domain: String, epoch: String, now: UInt64) -> Bool {
        guard !epoch.isEmpty else { return false }
        if let p = parked[domain], !p.epoch.isEmpty, p.epoch != epoch, p.responder.isConnected { return true }
        if let last = lastPoll[domain], !last.epoch.isEmpty, last.epoch != epoch, now < last.at + Self.liveStoreMilliseconds { return true }
        return false
    }

    func committed(_ domain: String, _ c: BrokerStore.CommittedEvents) {
        for (k, n) in c.outcomes { outcomes[domain, default: [:]][k, default: 0] += n }
        for (k, n) in c.apps { appOutcomes[domain, default: [:]][k, default: 0] += n }
        for u in c.untraced { untraced[domain, default: [:]][u.recovered ? "true" : "false", default: 0] += 1 }
        guard !c.latencies.isEmpty else { return }
        let now = unixMilliseconds()
        for ms in c.latencies { propagation[domain, default: RecentSamples()].add(at: now, seconds: Double(max(0, ms)) / 1000) }
    }

    init(destinations: [TargetConfiguration]) {
        var byDomain: [String: TargetConfiguration] = [:]
        for t in destinations { if let d = t.destination { byDomain[d] = t } }
        self.destinations = byDomain
    }

    func park(_ domain: String, _ poll: Parked) -> Parked? {
        let older = parked[domain]
        parked[domain] = poll
        return older
    }

    func unpark(_ domain: String) -> Parked? {
        guard let p = parked.removeValue(forKey: domain) else { return nil }
        p.timer.close()
        return p
    }

    /// The destinations among `targets` (names) with a parked poll.
    func waiting(among targets: some Sequence<String>) -> [String] {
        let names = Set(targets)
        return destinations.filter { names.contains($0.value.name) && parked[$0.key] != nil }.map(\.key)
    }

    /// Set by `closeAll` (the broker stops): no poll is held after it.
    private(set) var closing = false

    func closeAll() {
        closing = true
        for d in Array(parked.keys) {
            if let p = unpark(d) { p.responder.respond(BrokerService.feedAnswer(nil, limit: 0)) }
        }
    }

    /// The changes queued for the destinations just now woke these parked polls.
    var onChange: ((String) -> Void)?
    func changed(_ targets: some Sequence<String>) {
        for d in waiting(among: targets) { onChange?(d) }
    }
}

extension BrokerService {
    public static let feedPath = "/federation/v1/feed"
    /// Events a poll may ask for, and the longest wait it may ask for.
    static let maxFeedEvents = 1000
    static let maxFeedWaitMilliseconds = 60_000
    /// Unacknowledged events a feed holds at most (the rest waits as queue items): room for an
    /// agent that fetches the next pages while it commits the last (protocol 2, `after`).
    static let feedWindow = 5000

    /// A poll whose report (`outcomes` or `appOutcomes`) is malformed: 400
    /// `invalid_report`, naming the part and (for `appOutcomes`) the entry,
    /// and nothing acknowledged; logged (at most 20 a minute) and counted.
    /// The report only annotates the trace, so an agent of this version
    /// drops what was named and sends the poll again, and the feed goes on
    /// (docs/protocol.md).
    func refuseReport(_ part: String, _ error: BrokerStore.FeedOutcomesError, _ domain: String, _ responder: Responder) {
        feeds.reportsRefused[domain, default: [:]][part, default: 0] += 1
        if let notLogged = feeds.reportLog.admit(now: loop.now) {
            logger.warning(
                "downlink: a poll's report is refused (the agent drops what was named and polls again)",
                metadata: [
                    "domain": .string(domain), "report": .string(part), "detail": .string(error.description),
                    "notLogged": .stringConvertible(notLogged),
                ])
        }
        var body: JSONObject = ["error": "invalid_report", "report": .string(part), "description": .string(error.description)]
        if let i = error.entry { body["entry"] = .int(i) }
        responder.respond(Self.json(400, .object(body)))
    }

    /// `POST /federation/v1/feed`: the destination is the certificate's
    /// domain (never the request's): acknowledges what the agent committed,
    /// then answers up to `maxEvents` events, waiting up to `timeoutMs` when
    /// there are none.
    func poll(_ request: HTTPRequest, _ bound: DomainBinding, _ responder: Responder) {
        guard let target = feeds.destinations[bound.domain] else {
            responder.respond(
                Self.failure(
                    404, "no_feed", "no route of this broker names domain '\(bound.domain)' as a destination: there is nothing to fetch"))
            return
        }
        guard let body = try? JSONParser.parse(request.body), body.objectValue != nil else {
            responder.respond(Self.failure(400, "invalid_request", "the poll must be a JSON object"))
            return
        }
        guard let ack = body["ackedThrough"]?.numberValue?.integer, ack >= 0 else {
            responder.respond(Self.failure(400, "invalid_request", "'ackedThrough' must be the last feed sequence committed (0: none)"))
            return
        }
        let limit = Int(body["maxEvents"]?.numberValue?.integer ?? 100)
        guard (1...Self.maxFeedEvents).contains(limit) else {
            responder.respond(Self.failure(400, "invalid_request", "'maxEvents' must be 1 to \(Self.maxFeedEvents)"))
            return
        }
        let epoch = body["epoch"]?.stringValue ?? ""
        guard epoch.isEmpty || Self.validEpoch(epoch) else {
            responder.respond(Self.failure(400, "invalid_request", "'epoch' must be 1 to 64 letters, digits, '-' or '_'"))
            return
        }
        var after: UInt64?
        if let a = body["after"] {
            guard let n = a.numberValue?.integer, n >= ack else {
                responder.respond(
                    Self.failure(400, "invalid_request", "'after' must be the last feed sequence received, at least 'ackedThrough'"))
                return
            }
            after = UInt64(n)
        }
        var outcomes: BrokerStore.FeedOutcomes?
        if let o = body["outcomes"] {
            do throws(BrokerStore.FeedOutcomesError) {
                outcomes = try BrokerStore.FeedOutcomes(o, ack: UInt64(ack))
            } catch {
                return refuseReport("outcomes", error, bound.domain, responder)
            }
        }
        var apps: [BrokerStore.AppOutcome] = []
        if let a = body["appOutcomes"] {
            do throws(BrokerStore.FeedOutcomesError) { apps = try BrokerStore.AppOutcome.parse(a) } catch {
                return refuseReport("appOutcomes", error, bound.domain, responder)
            }
        }
        // The protocol the agent speaks (4: it takes a group's attributes without its members); none said: 1.
        let speaks = Int(body["protocol"]?.numberValue?.integer ?? 1)
        if feeds.anotherStoreIsLive(bound.domain, epoch: epoch, now: loop.now) {
            feeds.storeConflicts[bound.domain, default: 0] += 1
            if let notLogged = feeds.conflictLog.admit(now: loop.now) {
                logger.error(
                    "downlink: two stores poll one boundary's feed (two agents with its certificate, each with its own data directory?); the newer is refused while the other polls",
                    metadata: ["domain": .string(bound.domain), "epoch": .string(epoch), "notLogged": .stringConvertible(notLogged)])
            }
            return responder.respond(
                Self.failure(
                    409, "another_store",
                    "another store of domain '\(bound.domain)' polls this feed now: one agent (one data directory) per boundary polls it; this poll is refused until the other has been silent for \(BrokerFeeds.liveStoreMilliseconds / 1000) s"
                ).withHeader("Retry-After", "5"))
        }
        if !epoch.isEmpty { feeds.lastPoll[bound.domain] = (epoch, loop.now) }
        if feeds.resyncing.contains(bound.domain) { return responder.respond(Self.resyncAnswer) }
        let immediately = body["returnImmediately"]?.boolValue ?? false
        let wait = Int(body["timeoutMs"]?.numberValue?.integer ?? 25_000)
        guard (0...Self.maxFeedWaitMilliseconds).contains(wait) else {
            responder.respond(Self.failure(400, "invalid_request", "'timeoutMs' must be 0 to \(Self.maxFeedWaitMilliseconds)"))
            return
        }
        if refusedBusy(responder) { return }
        if let older = feeds.unpark(bound.domain) { older.responder.respond(Self.feedAnswer(nil, limit: 0)) }
        let deadline = loop.now + UInt64(wait)
        fetch(
            bound.domain, target, epoch: epoch, ack: UInt64(ack), after: after, limit: limit, outcomes: outcomes, apps: apps,
            speaks: speaks, responder
        ) {
            [self] page in
            guard !immediately, wait > 0 else { return false }
            return hold(bound.domain, page, responder, epoch: epoch, after: after, limit: limit, speaks: speaks, until: deadline)
        }
    }

    /// Parks a poll whose page is empty until `deadline` (answered then with
    /// that page), or until a change wakes it (`wake`); false when the page
    /// has events or no time is left. A poll parked meanwhile is newer than
    /// this one's arrival only when this one was woken (`woken`): this one
    /// then yields to it, answered with nothing; otherwise the one parked
    /// meanwhile is the older, answered with nothing (before, it was dropped
    /// unanswered, and its timer answered this one).
    func hold(
        _ domain: String, _ page: BrokerStore.FeedPage, _ responder: Responder, epoch: String, after: UInt64?, limit: Int,
        speaks: Int, until deadline: UInt64, woken: Bool = false
    ) -> Bool {
        let now = loop.now
        guard page.events.isEmpty, deadline > now else { return false }
        // A fetch that was on the writer when the broker began to stop, or a resync began: not held past them.
        if feeds.closing {
            responder.respond(Self.feedAnswer(nil, limit: 0))
            return true
        }
        if feeds.resyncing.contains(domain) {
            responder.respond(Self.resyncAnswer)
            return true
        }
        if woken, feeds.parked[domain] != nil {
            responder.respond(Self.feedAnswer(nil, limit: 0))
            return true
        }
        guard let timer = try? LoopTimer(loop: loop) else { return false }
        timer.keepsLoopAlive = false
        timer.start(after: deadline - now) { [weak self, weak timer] in
            guard let self, feeds.parked[domain]?.timer === timer, let p = feeds.unpark(domain) else { return }
            // Answered now: the store stays live until its next poll (`anotherStoreIsLive`).
            if !p.epoch.isEmpty { feeds.lastPoll[domain] = (p.epoch, loop.now) }
            p.responder.respond(Self.feedAnswer(page, limit: p.limit))
        }
        let parked = BrokerFeeds.Parked(
            responder: responder, timer: timer, epoch: epoch, ack: page.position.acked, after: after, limit: limit, speaks: speaks,
            deadline: deadline)
        if let older = feeds.park(domain, parked) {
            older.timer.close()
            older.responder.respond(Self.feedAnswer(nil, limit: 0))
        }
        return true
    }

    /// Runs the poll's transaction and answers, unless `park` keeps the
    /// responder waiting (it returns true).
    func fetch(
        _ domain: String, _ target: TargetConfiguration, epoch: String, ack: UInt64, after: UInt64? = nil, limit: Int,
        outcomes: BrokerStore.FeedOutcomes? = nil, apps: [BrokerStore.AppOutcome] = [], speaks: Int = 1, _ responder: Responder,
        park: @escaping (BrokerStore.FeedPage) -> Bool = { _ in false }
    ) {
        let store = self.store, window = Self.feedWindow
        writer.submit({ txn in
            try store.pollFeed(
                target: target, epoch: epoch, ack: ack, after: after, limit: limit, window: window, outcomes: outcomes, apps: apps,
                speaks: speaks, txn)
        }) { [self] result in
            switch result {
            case .success(let page):
                feeds.committed(domain, page.committed)
                if !page.committed.untraced.isEmpty { logUntraced(domain, page.committed.untraced) }
                if page.committed.unreadableItems > 0 { unreadableItems(domain, page.committed.unreadableItems) }
                refreshBacklog(domain, target)
                if park(page) { return }
                if !epoch.isEmpty { feeds.lastPoll[domain] = (epoch, loop.now) }  // answered: live until its next poll
                feeds.served[domain, default: 0] += page.events.count
                responder.respond(Self.feedAnswer(page, limit: limit))
                if page.queued { materializeAhead(domain, target, limit: limit, speaks: speaks) }
            case .failure(BrokerStore.FeedError.newStore(let acked, let issued)):
                // The very poll that started the last resync, again within a minute: the agent could not record
                // its restart (a full store, say) and polls as before. The feed has started again already; doing
                // it again would rewrite the whole destination each time. It is answered as before, counted.
                if let last = feeds.lastResync[domain], last.epoch == epoch, last.ack == ack, last.after == after,
                    loop.now - last.at < BrokerFeeds.resyncRepeatMilliseconds
                {
                    feeds.resyncs[domain, default: (0, 0)].repeated += 1
                    return responder.respond(Self.resyncAnswer)
                }
                feeds.lastResync[domain] = (epoch, ack, after, loop.now)
                feeds.resyncs[domain, default: (0, 0)].started += 1
                logger.warning(
                    "downlink: the agent's store and the feed disagree (a re-imaged or restored store, or a restored broker): the feed starts again with the destination's current state",
                    metadata: [
                        "domain": .string(domain), "ackedThrough": .stringConvertible(ack), "acknowledged": .stringConvertible(acked),
                        "issued": .stringConvertible(issued),
                    ])
                resync(domain, target, epoch: epoch)
                responder.respond(Self.resyncAnswer)
            case .failure(let error):
                logger.error("downlink poll failed", metadata: ["domain": .string(domain), "error": .string("\(error)")])
                responder.respond(
                    Self.failure(503, "unavailable", "the feed could not be read: \(error)").withHeader("Retry-After", "5"))
            }
        }
    }

    /// While the answer travels and the agent commits it, the next page is
    /// materialised in a transaction of its own, so the next poll finds it
    /// ready and its own transaction only acknowledges and reads. One at a
    /// time per destination, never during a resync (the writer runs in
    /// order: one submitted before a resync began runs before its first step).
    func materializeAhead(_ domain: String, _ target: TargetConfiguration, limit: Int, speaks: Int) {
        guard !feeds.resyncing.contains(domain), feeds.ahead.insert(domain).inserted else { return }
        let store = self.store, window = Self.feedWindow
        writer.submit({ txn in try store.materializeAhead(target: target, limit: limit, window: window, speaks: speaks, txn) }) {
            [self] result in
            feeds.ahead.remove(domain)
            switch result {
            case .success(let made):
                if made.unreadable > 0 { unreadableItems(domain, made.unreadable) }
                if made.made { wake(domain) }  // a poll parked meanwhile has its events now
            case .failure(let error):
                // Nothing lost: the items stay queued, and the next poll materialises what its page lacks.
                logger.warning("downlink: materialising ahead failed", metadata: ["domain": .string(domain), "error": .string("\(error)")])
            }
        }
    }

    /// The feed starts again: the agent counts from 0 and polls after a second.
    static let resyncAnswer = failure(
        503, "resync", "the feed starts again from sequence 1 with the destination's current state: count from 0"
    ).withHeader("Retry-After", "1")

    /// Runs a resync (`ResyncPhase`) a chunk per group-commit write, so the
    /// loop stays free; polls of the destination get 503 meanwhile.
    func resync(_ domain: String, _ target: TargetConfiguration, epoch: String) {
        guard feeds.resyncing.insert(domain).inserted else { return }
        if let p = feeds.unpark(domain) { p.responder.respond(Self.feedAnswer(nil, limit: 0)) }
        func step(_ phase: ResyncPhase, _ from: [UInt8]?) {
            let store = self.store
            writer.submit({ txn in try store.resyncStep(target, epoch: epoch, phase, from: from, txn) }) { [self] result in
                switch result {
                case .success((.done, _)):
                    feeds.resyncing.remove(domain)
                    feeds.backlog[domain] = nil
                    logger.notice("downlink: the feed starts again", metadata: ["domain": .string(domain)])
                case .success(let (next, from)):
                    step(next, from)
                case .failure(let error):
                    // Tried again from the start at the store's next poll (every step is idempotent).
                    feeds.resyncing.remove(domain)
                    feeds.lastResync[domain] = nil
                    logger.error("downlink: resync failed", metadata: ["domain": .string(domain), "error": .string("\(error)")])
                }
            }
        }
        step(.clear(0), nil)
    }

    /// A parked poll's destination got changes: materialise and answer, or,
    /// when they made no event (a user created and deleted before it was in
    /// the feed, a change of members the route does not send, a queue item
    /// that became a dead letter), park it again for the time it has left.
    /// Before, it was answered at once with an empty page: an agent can
    /// only take an empty answer before its wait as its poll replaced.
    func wake(_ domain: String) {
        // During a resync no page is made between its steps (its start answered the polls held).
        guard !feeds.resyncing.contains(domain), let target = feeds.destinations[domain], let p = feeds.unpark(domain) else { return }
        fetch(domain, target, epoch: p.epoch, ack: p.ack, after: p.after, limit: p.limit, speaks: p.speaks, p.responder) {
            [self] page in
            hold(
                domain, page, p.responder, epoch: p.epoch, after: p.after, limit: p.limit, speaks: p.speaks, until: p.deadline,
                woken: true)
        }
    }

    /// The 200 of a poll (nil: nothing, for a poll replaced or at shutdown).
    static func feedAnswer(_ page: BrokerStore.FeedPage?, limit: Int) -> HTTPResponse {
        var body: [UInt8] = Array(#"{"protocol":\#(BrokerStore.downlinkVersion),"#.utf8)
        if let p = page {
            body += Array(#""lastSeq":\#(p.position.issued),"ackedThrough":\#(p.position.acked),"moreAvailable":\#(p.more),"#.utf8)
        }
        // The events' stored bytes, as they are (JSON already).
        body += Array(#""events":["#.utf8)
        for (i, e) in (page?.events ?? []).prefix(max(0, limit)).enumerated() {
            if i > 0 { body.append(UInt8(ascii: ",")) }
            body += e
        }
        body += [UInt8(ascii: "]"), UInt8(ascii: "}")]
        return HTTPResponse(status: 200, headers: ["Content-Type": "application/json"], body: body)
    }

    /// Acknowledged events whose trail record was missing or could not be read (a newer
    /// broker's format after a downgrade, a damaged value): never skipped
    /// in silence, even when the hop could be made from the event itself.
    func logUntraced(_ domain: String, _ untraced: [(seq: UInt64, recovered: Bool)]) {
        let lost = untraced.filter { !$0.recovered }.map(\.seq)
        let recovered = untraced.filter(\.recovered).map(\.seq)
        if !recovered.isEmpty {
            logger.warning(
                "downlink: acknowledged events had no readable trail record; their hop was made from the event itself (issued only to the second)",
                metadata: ["domain": .string(domain), "feedSeqs": .string(Self.sequences(recovered))])
        }
        if !lost.isEmpty {
            logger.error(
                "downlink: acknowledged events had no readable trail record or event: no boundary hop was recorded for them (trace ends at the broker), a refused group delta is not sent whole again",
                metadata: ["domain": .string(domain), "feedSeqs": .string(Self.sequences(lost))])
        }
    }

    /// Queue items the destination's materialising could not read: dead letters now, logged and counted.
    func unreadableItems(_ domain: String, _ n: Int) {
        feeds.unreadableItems[domain, default: 0] += n
        logger.error(
            "downlink: queue items this broker cannot read (a newer broker's after a downgrade, or damaged) became dead letters; the items after them go on",
            metadata: ["domain": .string(domain), "count": .stringConvertible(n)])
    }

    /// `1-3,7`: a log line stays short however many events an answer acknowledged.
    static func sequences(_ seqs: [UInt64]) -> String {
        var parts: [String] = []
        var i = 0
        while i < seqs.count {
            var j = i
            while j + 1 < seqs.count, seqs[j + 1] == seqs[j] + 1 { j += 1 }
            parts.append(i == j ? "\(seqs[i])" : "\(seqs[i])-\(seqs[j])")
            i = j + 1
        }
        return parts.count > 20 ? parts.prefix(20).joined(separator: ",") + ",… (\(seqs.count) events)" : parts.joined(separator: ",")
    }

    /// Counts a destination's queue at most every 10 s, on the thread pool
    /// (the count walks the queue's keys): what is shown is the last count.
    func refreshBacklog(_ domain: String, _ target: TargetConfiguration) {
        if let b = feeds.backlog[domain], loop.now < b.countedAt + 10_000 { return }
        guard feeds.counting.insert(domain).inserted else { return }
        let store = self.store, name = target.name, box = BacklogCount()
        loop.offload({ box.depth = try? store.queueDepth(target: name) }) { [weak self] in
            guard let self else { return }
            feeds.counting.remove(domain)
            if let d = box.depth { feeds.backlog[domain] = (d.count, d.oldest, loop.now) }
        }
    }

    func downlinkMetrics() -> String {
        for (domain, t) in feeds.destinations { refreshBacklog(domain, t) }  // also while no agent polls
        var out = ""
        func metric(_ name: String, _ type: String, _ help: String, _ value: (String, TargetConfiguration) -> String) {
            out += "# HELP \(name) \(help)\n# TYPE \(name) \(type)\n"
            for (domain, t) in feeds.destinations.sorted(by: { $0.key < $1.key }) {
                out += "\(name){domain=\"\(domain)\",target=\"\(t.name)\"} \(value(domain, t))\n"
            }
        }
        let now = unixMilliseconds()
        func age(_ at: Int64) -> String { at == 0 ? "0" : String(Double(max(0, now - at)) / 1000) }
        metric("scim_broker_downlink_queue_depth", "gauge", "Changes queued for the destination, not yet in its feed (counted every 10 s).")
        {
            d, _ in String(feeds.backlog[d]?.count ?? 0)
        }
        metric("scim_broker_downlink_queue_oldest_age_seconds", "gauge", "Age of the oldest change queued for the destination.") { d, _ in
            (feeds.backlog[d]?.count ?? 0) == 0 ? "0" : age(feeds.backlog[d]?.oldest ?? 0)
        }
        metric("scim_broker_downlink_unacked_events", "gauge", "Feed events issued and not yet acknowledged by the agent.") { _, t in
            String((try? store.feedPosition(target: t.name).unacked) ?? 0)
        }
        metric("scim_broker_downlink_unacked_oldest_age_seconds", "gauge", "Age of the oldest unacknowledged feed event.") { _, t in
            age((try? store.feedOldest(target: t.name)) ?? 0)
        }
        metric("scim_broker_downlink_acked_sequence", "gauge", "The feed sequence the agent acknowledged.") { _, t in
            String((try? store.feedPosition(target: t.name).acked) ?? 0)
        }
        metric("scim_broker_downlink_events_served_total", "counter", "Feed events answered to polls (resends included).") { d, _ in
            String(feeds.served[d] ?? 0)
        }
        metric("scim_broker_downlink_polls_waiting", "gauge", "1 while the destination's agent has a poll parked (connected).") { d, _ in
            feeds.parked[d] == nil ? "0" : "1"
        }
        metric(
            "scim_broker_downlink_resyncs_total", "counter",
            "Times the destination's feed started again for a store that disagreed with it (re-imaged, restored, or a restored broker)."
        ) { d, _ in String(feeds.resyncs[d]?.started ?? 0) }
        metric(
            "scim_broker_downlink_resyncs_repeated_total", "counter",
            "Polls that repeated the one that started the last resync, within a minute (the agent did not record its restart): answered resync again, nothing redone."
        ) { d, _ in String(feeds.resyncs[d]?.repeated ?? 0) }
        metric(
            "scim_broker_downlink_unreadable_items_total", "counter",
            "Queue items this broker could not read (a newer broker's after a downgrade, or damaged): dead letters, not sent."
        ) { d, _ in String(feeds.unreadableItems[d] ?? 0) }
        metric(
            "scim_broker_downlink_store_conflicts_total", "counter",
            "Polls refused (409 another_store) because another store of the destination was polling its feed."
        ) { d, _ in String(feeds.storeConflicts[d] ?? 0) }
        /// A counter per destination and outcome (`_` for a space in the label; `label`: the label's name).
        func byOutcome(_ name: String, _ help: String, _ outcomes: [String], _ counts: [String: [String: Int]], label: String = "outcome") {
            out += "# HELP \(name) \(help)\n# TYPE \(name) counter\n"
            for (domain, t) in feeds.destinations.sorted(by: { $0.key < $1.key }) {
                for outcome in outcomes {
                    let value = outcome.replacing(" ", with: "_")
                    out += "\(name){domain=\"\(domain)\",target=\"\(t.name)\",\(label)=\"\(value)\"} \(counts[domain]?[outcome] ?? 0)\n"
                }
            }
        }
        byOutcome(
            "scim_broker_downlink_untraced_events_total",
            "Acknowledged feed events whose trail record could not be read: their hop made from the event (recovered=\"true\") or not recorded (logged).",
            ["true", "false"], feeds.untraced, label: "recovered")
        byOutcome(
            "scim_broker_downlink_reports_refused_total",
            "Poll reports refused (400 invalid_report: the boundary's outcomes, its local apps' answers); the agent drops what was named and polls again.",
            ["outcomes", "appOutcomes"], feeds.reportsRefused, label: "report")
        byOutcome(
            "scim_broker_downlink_events_committed_total",
            "Feed events the destination's agent committed, by its outcome (accepted, not accepted, refused, unreported).",
            ["accepted", "not accepted", "refused", "unreported"], feeds.outcomes)
        byOutcome(
            "scim_broker_downlink_app_outcomes_total",
            "The destination's local apps' answers its agent reported (delivered, unchanged, refused; unmatched: about no change this feed carried, not recorded).",
            ["delivered", "unchanged", "refused", "unmatched"], feeds.appOutcomes)
        let p = "scim_broker_downlink_propagation_seconds"
        out += "# HELP \(p) From the source agent accepting a change to the destination's agent committing it (its clock; last 10 s).\n"
        out += "# TYPE \(p) summary\n"
        for (domain, t) in feeds.destinations.sorted(by: { $0.key < $1.key }) {
            let (n, q) = (feeds.propagation[domain] ?? RecentSamples()).quantiles([0.5, 0.99])
            let labels = "domain=\"\(domain)\",target=\"\(t.name)\""
            out += "\(p){\(labels),quantile=\"0.5\"} \(q[0])\n\(p){\(labels),quantile=\"0.99\"} \(q[1])\n\(p)_count{\(labels)} \(n)\n"
        }
        return out
    }
}

/// A backlog count, made on a pool thread and read on the loop afterwards (libuv orders the two).
private final class BacklogCount: @unchecked Sendable {
    var depth: (count: Int, oldest: Int64)?
}
