import EdgeLoop

/// The delivery metrics of `workers`, named `<prefix>_target_…`: the
/// broker's (`scim_broker`) and an agent's (`scim_edge`) have the same names
/// under their program's prefix. `counters`: what a worker counted (the
/// broker adds those of the workers a resume replaced); `paused`: whether
/// an operator paused a target (nil: the program has no pause).
package func targetMetrics(
    _ workers: [TargetWorker], prefix: String, counters: (TargetWorker) -> TargetStatistics = { $0.statistics },
    paused: ((TargetWorker) -> Bool)? = nil
) -> String {
    var out = ""
    func header(_ name: String, _ type: String, _ help: String) { out += "# HELP \(name) \(help)\n# TYPE \(name) \(type)\n" }
    header("\(prefix)_target_requests_total", "counter", "Requests to targets by method and status class (error: no response).")
    for w in workers {
        for (key, n) in counters(w).requests.sorted(by: { $0.key < $1.key }) {
            let parts = key.split(separator: " ")
            out += "\(prefix)_target_requests_total{target=\"\(w.target.name)\",method=\"\(parts[0])\",class=\"\(parts[1])\"} \(n)\n"
        }
    }
    func perTarget(_ name: String, _ type: String, _ help: String, _ value: (TargetWorker) -> String) {
        header(name, type, help)
        for w in workers { out += "\(name){target=\"\(w.target.name)\"} \(value(w))\n" }
    }
    perTarget("\(prefix)_target_queue_depth", "gauge", "Changes queued for the target.") { String($0.depth) }
    perTarget("\(prefix)_target_queue_oldest_age_seconds", "gauge", "Age of the oldest queued change.") { w in
        w.oldestQueuedAt == 0 || w.depth == 0 ? "0" : String(Double(max(0, unixMilliseconds() - w.oldestQueuedAt)) / 1000)
    }
    perTarget("\(prefix)_target_delivered_total", "counter", "Changes delivered.") { String(counters($0).delivered) }
    perTarget("\(prefix)_target_dead_letters_total", "counter", "Changes the target refused for good (kept as dead letters).") {
        String(counters($0).deadLettered)
    }
    perTarget(
        "\(prefix)_target_retries_total", "counter",
        "Deliveries retried after a network error, a 5xx other than 501, or a store read error."
    ) { String(counters($0).retries) }
    perTarget("\(prefix)_target_throttled_total", "counter", "429/503 answers honoured.") { String(counters($0).throttled) }
    perTarget("\(prefix)_target_adopted_total", "counter", "Existing accounts adopted after 409.") { String(counters($0).adopted) }
    perTarget(
        "\(prefix)_target_member_steps_total", "counter",
        "Group PATCHes sent from the member index (only the members that changed)."
    ) { String(counters($0).memberSteps) }
    perTarget(
        "\(prefix)_target_whole_group_reads_total", "counter",
        "Group deliveries that read the whole group (a target without PATCH, collisions: link, routes on members, an old store)."
    ) { String(counters($0).wholeGroupReads) }
    perTarget(
        "\(prefix)_target_collisions_total", "counter",
        "Changes refused (dead letters) because the account at the target belongs to another resource."
    ) {
        String(counters($0).collisions)
    }
    perTarget(
        "\(prefix)_target_linked_accounts", "gauge",
        "Accounts two users or more of different domains share (collisions: link; read every second)."
    ) { String($0.linkedAccounts) }
    perTarget("\(prefix)_target_concurrency", "gauge", "Adaptive concurrency now.") { String(Int($0.limit)) }
    perTarget("\(prefix)_target_breaker_open", "gauge", "1 while the circuit breaker is open.") {
        $0.breakerState == .open ? "1" : "0"
    }
    if let paused {
        perTarget("\(prefix)_target_paused", "gauge", "1 while an operator paused the target (targets pause, the console).") {
            paused($0) ? "1" : "0"
        }
    }
    perTarget("\(prefix)_target_deletes_paused", "gauge", "1 while the deletion guard holds removals.") {
        $0.deletesPaused ? "1" : "0"
    }
    perTarget(
        "\(prefix)_target_credentials_refused", "gauge",
        "1 while the target refuses the credentials or the TLS handshake (paused, queue kept)."
    ) { $0.credentialsRefused ? "1" : "0" }
    header("\(prefix)_target_propagation_seconds", "summary", "From the agent accepting a change to the target's answer (last 10 s).")
    for w in workers {
        let (n, q) = w.recent.quantiles([0.5, 0.99])
        out += "\(prefix)_target_propagation_seconds{target=\"\(w.target.name)\",quantile=\"0.5\"} \(q[0])\n"
        out += "\(prefix)_target_propagation_seconds{target=\"\(w.target.name)\",quantile=\"0.99\"} \(q[1])\n"
        out += "\(prefix)_target_propagation_seconds_count{target=\"\(w.target.name)\"} \(n)\n"
    }
    header("\(prefix)_target_delivery_seconds", "histogram", "From the agent accepting a change to the target's answer.")
    for w in workers {
        let s = counters(w)
        for (i, b) in TargetStatistics.latencyBuckets.enumerated() {
            out += "\(prefix)_target_delivery_seconds_bucket{target=\"\(w.target.name)\",le=\"\(b)\"} \(s.latencyCounts[i])\n"
        }
        out += "\(prefix)_target_delivery_seconds_bucket{target=\"\(w.target.name)\",le=\"+Inf\"} \(s.latencyCount)\n"
        out += "\(prefix)_target_delivery_seconds_sum{target=\"\(w.target.name)\"} \(s.latencySum)\n"
        out += "\(prefix)_target_delivery_seconds_count{target=\"\(w.target.name)\"} \(s.latencyCount)\n"
    }
    return out
}
