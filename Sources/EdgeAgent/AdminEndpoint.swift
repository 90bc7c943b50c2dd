import EdgeConfig
import EdgeDelivery
import EdgeHTTP
import EdgeLoop
import EdgeStore
import Glibc
import SCIM

/// The operations listener (loopback by default): `/healthz`, `/readyz` and
/// `/metrics` in the Prometheus text format (version 0.0.4).
/// Threading: loop-confined, like the endpoint it reports on.
public final class AdminEndpoint {
    unowned let agent: AgentService

    init(agent: AgentService) { self.agent = agent }

    public func handle(_ request: HTTPRequest, _ responder: Responder) {
        guard request.method == "GET" || request.method == "HEAD" else {
            responder.respond(HTTPResponse(status: 405, contentType: "text/plain", body: "GET only\n"))
            return
        }
        switch request.path {
        case "/healthz":
            responder.respond(HTTPResponse(status: 200, contentType: "text/plain", body: "ok\n"))
        case "/readyz":
            if agent.server.isDraining {
                responder.respond(HTTPResponse(status: 503, contentType: "text/plain", body: "draining\n"))
            } else if agent.endpoint.backpressure {
                responder.respond(
                    HTTPResponse(status: 503, contentType: "text/plain", body: "backpressure: the outbox is over its high watermark\n"))
            } else if let error = outboxUnreadable() {
                responder.respond(HTTPResponse(status: 503, contentType: "text/plain", body: "cannot read the outbox: \(error)\n"))
            } else {
                responder.respond(HTTPResponse(status: 200, contentType: "text/plain", body: "ready\n"))
            }
        case "/metrics":
            agent.openConnections { [self] connections in
                responder.respond(
                    HTTPResponse(
                        status: 200, contentType: "text/plain; version=0.0.4; charset=utf-8",
                        body: metricsText(openConnections: connections)))
            }
        default:
            responder.respond(HTTPResponse(status: 404, contentType: "text/plain", body: "try /healthz, /readyz or /metrics\n"))
        }
    }

    /// Why writes would be refused for an unreadable outbox (see
    /// `SCIMEndpoint.checkBackpressure`); nil when it reads, or none is kept.
    func outboxUnreadable() -> String? {
        guard agent.endpoint.options.recordOutbox else { return nil }
        do { _ = try agent.store.outboxUsage(); return nil } catch { return "\(error)" }
    }

    /// The Prometheus exposition of the agent's state.
    public func metricsText(openConnections: Int) -> String {
        var out = ""
        func metric(_ name: String, _ type: String, _ help: String, _ samples: [(String, String)]) {
            out += "# HELP \(name) \(help)\n# TYPE \(name) \(type)\n"
            for (labels, value) in samples { out += "\(name)\(labels) \(value)\n" }
        }
        metric(
            "scim_edge_build_info", "gauge", "Always 1; the version of this agent (from VERSION) as a label.",
            [("{version=\"\(scimEdgeVersion)\"}", "1")])
        let m = agent.requestMetrics
        metric(
            "scim_edge_requests_total", "counter", "SCIM requests by method, resource type and status.",
            m.requests.sorted { $0.key < $1.key }.map { key, count in
                let p = key.split(separator: "|", omittingEmptySubsequences: false)
                return ("{method=\"\(p[0])\",resource=\"\(p[1])\",status=\"\(p[2])\"}", String(count))
            })
        var perLoop = [("{loop=\"0\"}", String(agent.endpoint.metrics.latencyCount))]
        for (k, loop) in agent.servingLoops.enumerated() {
            perLoop.append(("{loop=\"\(k + 1)\"}", String(loop.metrics.snapshot.latencyCount)))
        }
        metric("scim_edge_loop_requests_total", "counter", "SCIM requests answered by each serving loop (0: the main loop).", perLoop)
        var buckets: [(String, String)] = []
        for (k, le) in EndpointMetrics.buckets.enumerated() { buckets.append(("_bucket{le=\"\(le)\"}", String(m.latencyBuckets[k]))) }
        buckets.append(("_bucket{le=\"+Inf\"}", String(m.latencyCount)))
        buckets.append(("_sum", String(m.latencySum)))
        buckets.append(("_count", String(m.latencyCount)))
        out += "# HELP scim_edge_request_duration_seconds Time from request to response, commit included.\n"
        out += "# TYPE scim_edge_request_duration_seconds histogram\n"
        for (suffix, v) in buckets { out += "scim_edge_request_duration_seconds\(suffix) \(v)\n" }

        // An unreadable outbox has no sample (absent, not a misleading 0).
        let usage = try? agent.store.outboxUsage()
        metric(
            "scim_edge_outbox_events", "gauge", "Relay events not yet acknowledged by the broker.",
            usage.map { [("", String($0.events))] } ?? [])
        metric("scim_edge_outbox_bytes", "gauge", "Bytes of the outbox in the store.", usage.map { [("", String($0.bytes))] } ?? [])
        var age: [(String, String)] = []
        do {
            var seconds = 0.0
            if let oldest = try agent.store.oldestOutboxEvent() {
                seconds = Double(max(0, unixSeconds() - oldest.issuedAt))
            }
            age = [("", String(seconds))]
        } catch {}  // unreadable: no sample, like the outbox gauges
        metric("scim_edge_outbox_oldest_age_seconds", "gauge", "Age of the oldest unacknowledged event.", age)
        metric(
            "scim_edge_backpressure", "gauge", "1 while writes are refused because the outbox is full.",
            [("", agent.endpoint.backpressure ? "1" : "0")])
        metric(
            "scim_edge_backpressure_rejections_total", "counter", "Writes answered 503 because of backpressure.",
            [("", String(m.backpressureRejections))])
        let info = agent.store.environment.info
        metric("scim_edge_store_map_bytes", "gauge", "Size of the LMDB map.", [("", String(info.mapSize))])
        metric("scim_edge_store_used_bytes", "gauge", "Bytes of the LMDB map in use.", [("", String(info.usedBytes))])
        metric(
            "scim_edge_store_map_limit_bytes", "gauge", "The map's configured maximum.",
            [("", String(agent.store.environment.options.maxMapSize))])
        let g = agent.writer.statistics
        metric("scim_edge_commit_batches_total", "counter", "Durable group commits.", [("", String(g.batches))])
        metric(
            "scim_edge_commit_flushes_total", "counter", "Syncs that made committed batches durable (one per batch).",
            [("", String(g.flushes))])
        metric(
            "scim_edge_committed_writes_total", "counter", "Writes through group commit (failed ones included).", [("", String(g.writes))])
        metric("scim_edge_http_connections", "gauge", "Open SCIM connections.", [("", String(openConnections))])
        metric(
            "scim_edge_store_commit_entries_max", "gauge",
            "The most entries (puts and deletes) one committed write transaction wrote since start.",
            [("", String(agent.store.environment.heaviestCommitEntries))])
        let d = agent.deferredCounts
        metric(
            "scim_edge_removed_group_members_swept_total", "counter",
            "Index entries of removed groups removed after the group, and relay records of groups that left the boundary, 1,000 a transaction.",
            [("", String(d.swept))])
        metric(
            "scim_edge_relay_entering_members_total", "counter",
            "Members of groups that entered the boundary sent after the group (members events, 1,000 a transaction), and earlier relay records of them forgotten first.",
            [("", String(d.relayed))])
        if !agent.targetWorkers.isEmpty {
            metric(
                "scim_edge_target_group_index_swept_total", "counter",
                "Entries of a local target's group member index removed after the group left the target, 1,000 a transaction.",
                [("", String(d.targetIndex))])
            metric(
                "scim_edge_target_group_members_compared_total", "counter",
                "Members of groups back in a local target's routes marked for comparison, 1,000 a transaction.",
                [("", String(d.compared))])
        }
        if !agent.sourceDrivers.isEmpty {
            let sources = agent.sourceDrivers.map { d in
                (label: "{source=\"\(d.runner.configuration.name)\"}", stats: d.statistics, live: d.runner.thread.live.withLock { $0 })
            }
            metric(
                "scim_edge_source_connected", "gauge", "1 while the source's directory connection is up.",
                sources.map { ($0.label, $0.live.connected ? "1" : "0") })
            metric(
                "scim_edge_source_entries", "gauge", "Directory entries the source holds as resources (deactivated ones not counted).",
                sources.map { ($0.label, String($0.stats.entries)) })
            metric(
                "scim_edge_source_batches_total", "counter", "Batches of the source committed (each with the position it reached).",
                sources.map { ($0.label, String($0.stats.batches)) })
            metric(
                "scim_edge_source_changes_total", "counter", "Resources the source created, changed, deactivated or deleted.",
                sources.map { ($0.label, String($0.stats.written)) })
            metric(
                "scim_edge_source_unchanged_total", "counter", "Entries read again that were already stored as they are.",
                sources.map { ($0.label, String($0.stats.unchanged)) })
            metric(
                "scim_edge_source_errors_total", "counter", "Entries that could not be mapped or were refused (logged with their DN).",
                sources.map { ($0.label, String($0.stats.failures)) })
            metric(
                "scim_edge_source_backpressure_total", "counter",
                "Batches the agent pushed back (the outbox or the write queue full): the source waits a second and offers the same batch again.",
                sources.map { ($0.label, String($0.stats.pushedBack)) })
            metric(
                "scim_edge_source_connection_failures_total", "counter", "Failed connections, binds and searches (retried with backoff).",
                sources.map { ($0.label, String($0.live.connectionFailures)) })
            metric(
                "scim_edge_source_throttled_total", "counter",
                "Requests a SCIM source answered with 429 or 503 (waited out per Retry-After, sent again).",
                sources.map { ($0.label, String($0.live.throttled)) })
            let now = unixSeconds()
            metric(
                "scim_edge_source_lag_seconds", "gauge",
                "How far behind its source the store may be: since every change of the source up to then is known committed (docs/sources.md); absent until the source says.",
                sources.compactMap { s in s.stats.stored?.lag(now: now, live: s.live.caughtUpAt).map { (s.label, String($0)) } })
            metric(
                "scim_edge_source_last_success_timestamp_seconds", "gauge",
                "When the source's last batch was committed (Unix time; 0: never).",
                sources.map { ($0.label, String($0.stats.lastSuccess)) })
        }
        if let relay = agent.relay {
            let r = relay.statistics
            metric("scim_edge_relay_batches_sent_total", "counter", "Batches sent to the broker.", [("", String(r.batchesSent))])
            metric(
                "scim_edge_relay_events_acknowledged_total", "counter", "Events the broker acknowledged.",
                [("", String(r.eventsAcknowledged))])
            metric(
                "scim_edge_relay_events_rejected_total", "counter", "Events the broker refused for good (dead letters).",
                [("", String(r.eventsRejected))])
            metric("scim_edge_relay_errors_total", "counter", "Failed relay attempts (retried).", [("", String(r.errors))])
            metric("scim_edge_relay_rewinds_total", "counter", "409 expectedSeq answers.", [("", String(r.rewinds))])
            metric(
                "scim_edge_relay_protocol_errors_total", "counter",
                "Broker answers acknowledging more than was sent (connection reset, nothing skipped).", [("", String(r.protocolErrors))])
            metric(
                "scim_edge_relay_splits_total", "counter", "Batches the broker refused as a whole, split to isolate the event.",
                [("", String(r.splits))])
            metric(
                "scim_edge_relay_tls_failures_total", "counter",
                "Failed TLS handshakes with the broker (a refused, revoked or expired certificate; another CA).",
                [("", String(r.tlsFailures))])
            if let downlink = agent.downlink {
                let s = downlink.statistics
                metric(
                    "scim_edge_downlink_polls_total", "counter", "Polls of the broker's feed for this boundary.", [("", String(s.polls))])
                metric(
                    "scim_edge_downlink_events_applied_total", "counter", "Feed events accepted and stored (foreign resources).",
                    [("", String(s.eventsApplied))])
                metric(
                    "scim_edge_downlink_membership_deltas_total", "counter",
                    "Of them, group membership changes as members added and removed.",
                    [("", String(s.membershipDeltas))])
                metric(
                    "scim_edge_downlink_events_not_accepted_total", "counter", "Feed events the inbound policy did not accept.",
                    [("", String(s.notAccepted))])
                metric(
                    "scim_edge_downlink_events_refused_total", "counter",
                    "Feed events accepted but not storable here (a userName taken, an invalid value): logged.", [("", String(s.refused))])
                metric(
                    "scim_edge_downlink_duplicates_total", "counter", "Feed events received again after they were committed (skipped).",
                    [("", String(s.duplicates))])
                metric("scim_edge_downlink_errors_total", "counter", "Failed polls (retried).", [("", String(s.errors))])
                metric(
                    "scim_edge_downlink_idle_answers_total", "counter",
                    "Answers that brought nothing new (empty before the wait asked for, or only events committed already); in a row, the polls after them are spaced out.",
                    [("", String(s.idleAnswers))])
                metric(
                    "scim_edge_downlink_protocol_errors_total", "counter", "Feed answers no honest broker gives (nothing applied).",
                    [("", String(s.protocolErrors))])
                metric(
                    "scim_edge_downlink_resyncs_total", "counter", "Times the broker started this boundary's feed again (counting from 0).",
                    [("", String(s.resyncs))])
                metric(
                    "scim_edge_downlink_stale_removed_total", "counter",
                    "Foreign resources removed at the end of a resync because the broker did not send them again (deleted at their source or out of the routes while this store was away).",
                    [("", String(s.staleRemoved))])
                metric(
                    "scim_edge_downlink_applied_sequence", "gauge", "The feed sequence committed here.", [("", String(s.appliedThrough))])
                metric(
                    "scim_edge_downlink_lag_events", "gauge", "Feed events the broker issued that are not committed here.",
                    [("", String(s.brokerLastSeq > s.appliedThrough ? s.brokerLastSeq - s.appliedThrough : 0))])
                metric(
                    "scim_edge_downlink_app_outcomes_reported_total", "counter",
                    "Local targets' answers to foreign changes the broker took for its trace (downlink protocol 3).",
                    [("", String(s.appOutcomesReported))])
                metric(
                    "scim_edge_downlink_reports_refused_total", "counter",
                    "Poll reports (the boundary's outcomes, the local apps' answers) the broker refused: dropped, logged, the poll sent again without them, so those traces end at the boundary.",
                    ["outcomes", "appOutcomes"].map { ("{report=\"\($0)\"}", String(s.reportsRefused[$0, default: 0])) })
                metric(
                    "scim_edge_downlink_app_outcomes_refused_total", "counter",
                    "Local targets' answers dropped because the broker refused them (invalid_report) or their stored record could not be read (reason).",
                    [("{reason=\"refused\"}", String(s.appOutcomesRefused)), ("{reason=\"unreadable\"}", String(s.appOutcomesUnreadable))])
                if let (pending, dropped) = try? agent.store.appOutcomeCounts() {
                    metric(
                        "scim_edge_downlink_app_outcomes_pending", "gauge", "Local targets' answers kept for the broker, not yet taken.",
                        [("", String(pending))])
                    metric(
                        "scim_edge_downlink_app_outcomes_dropped_total", "counter",
                        "Local targets' answers not kept because the outbox of answers was full (their traces end at the boundary).",
                        [("", String(dropped))])
                }
            }
            if let relay = agent.relay {
                metric(
                    "scim_edge_relay_certificate_expiry_timestamp_seconds", "gauge",
                    "When this agent's client certificate expires (Unix time).",
                    [("", String(relay.certificateNotAfter))])
                if relay.configuration.tls.crlFile != nil {
                    metric(
                        "scim_edge_relay_crl_next_update_timestamp_seconds", "gauge",
                        "When the CRL (broker.crl) runs out (Unix time): past it every handshake with the broker fails.",
                        [("", String(relay.crlNextUpdate))])
                }
                metric(
                    "scim_edge_broker_certificate_expiry_timestamp_seconds", "gauge",
                    "When the broker's certificate (from the last handshake) expires (Unix time; 0: not connected yet).",
                    [("", String(relay.brokerCertificateNotAfter))])
            }
            metric(
                "scim_edge_relay_connected", "gauge",
                "1 while the connection to the broker is up and the broker takes batches on it (0 while it refuses them).",
                [("", relay.isConnected ? "1" : "0")])
            metric("scim_edge_relay_window", "gauge", "Batches allowed in flight (adaptive).", [("", String(r.window))])
            out += "# HELP scim_edge_relay_rtt_seconds Round trip of a batch to the broker.\n# TYPE scim_edge_relay_rtt_seconds histogram\n"
            for (k, le) in RelayStatistics.rttBuckets.enumerated() {
                out += "scim_edge_relay_rtt_seconds_bucket{le=\"\(le)\"} \(r.rttBucketCounts[k])\n"
            }
            out +=
                "scim_edge_relay_rtt_seconds_bucket{le=\"+Inf\"} \(r.rttCount)\nscim_edge_relay_rtt_seconds_sum \(r.rttSum)\nscim_edge_relay_rtt_seconds_count \(r.rttCount)\n"
        }
        // Local targets: the broker's delivery metrics, under the agent's prefix.
        if !agent.targetWorkers.isEmpty { out += targetMetrics(agent.targetWorkers, prefix: "scim_edge") }
        return out
    }
}
