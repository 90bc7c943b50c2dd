import EdgeMetrics
import Glibc
import SCIM

func ms(_ micros: UInt64) -> String { fixed(Double(micros) / 1000, 2) }

func fixed(_ v: Double, _ digits: Int) -> String {
    guard v.isFinite else { return "0" }
    var scale = 1.0
    for _ in 0..<digits { scale *= 10 }
    let r = (abs(v) * scale).rounded()
    let whole = Int(r / scale), frac = Int(r) % Int(scale)
    var fracText = String(frac)
    while fracText.count < digits { fracText = "0" + fracText }
    return (v < 0 ? "-" : "") + String(whole) + (digits > 0 ? "." + fracText : "")
}

func grouped(_ n: Int) -> String {
    let s = String(n)
    var out = ""
    for (i, c) in s.reversed().enumerated() {
        if i > 0 && i % 3 == 0 { out.append(",") }
        out.append(c)
    }
    return String(out.reversed())
}

extension BenchReport {
    public static let quantiles: [(String, Double)] = [("p50", 0.5), ("p90", 0.9), ("p99", 0.99), ("p99.9", 0.999), ("max", 1)]

    /// The human report.
    public var text: String {
        var lines: [String] = []
        let mode = options.rate.map { "open loop at \(fixed($0, 0)) requests/s" } ?? "closed loop"
        lines.append("scim-edge bench \(options.url) (\(options.mix)), \(options.connections) connections, \(mode)")
        lines.append("\(grouped(completed)) requests in \(fixed(duration, 2)) s: \(fixed(throughput, 1)) requests/s")
        lines.append(
            "latency (ms): " + Self.quantiles.map { "\($0.0) \(ms(latency.quantile($0.1)))" }.joined(separator: "  ")
                + "  mean \(fixed(latency.mean / 1000, 2))")
        for (name, h) in byOperation.sorted(by: { $0.key < $1.key }) where byOperation.count > 1 {
            lines.append("  \(name): \(grouped(Int(h.count))) requests, p50 \(ms(h.quantile(0.5))) ms, p99 \(ms(h.quantile(0.99))) ms")
        }
        lines.append(
            "status: "
                + (statuses.isEmpty
                    ? "none" : statuses.sorted { $0.key < $1.key }.map { "\($0.key) ×\(grouped($0.value))" }.joined(separator: ", ")))
        if !errors.isEmpty {
            lines.append("errors: " + errors.sorted { $0.key < $1.key }.map { "\($0.key) ×\($0.value)" }.joined(separator: ", "))
        }
        if options.rate != nil && queuedBehind > 0 {
            lines.append("\(grouped(queuedBehind)) requests waited for a free connection (measured from their intended start)")
        }
        for (name, v) in propagation { lines.append("\(name): \(fixed(v * 1000, 1)) ms") }
        return lines.joined(separator: "\n") + "\n"
    }

    /// The machine report (`--json`).
    public var json: JSON {
        var latencyObject = JSONObject()
        for (name, q) in Self.quantiles { latencyObject[name] = .number(JSONNumber(fixed(Double(latency.quantile(q)) / 1000, 3))!) }
        latencyObject["mean"] = .number(JSONNumber(fixed(latency.mean / 1000, 3))!)
        var ops = JSONObject()
        for (name, h) in byOperation.sorted(by: { $0.key < $1.key }) {
            ops[name] = [
                "requests": .int(Int(h.count)), "p50": .number(JSONNumber(fixed(Double(h.quantile(0.5)) / 1000, 3))!),
                "p99": .number(JSONNumber(fixed(Double(h.quantile(0.99)) / 1000, 3))!),
            ]
        }
        var status = JSONObject()
        for (k, v) in statuses.sorted(by: { $0.key < $1.key }) { status[String(k)] = .int(v) }
        var errs = JSONObject()
        for (k, v) in errors.sorted(by: { $0.key < $1.key }) { errs[k] = .int(v) }
        var object: JSONObject = [
            "url": .string(options.url), "mix": .string(options.mix), "connections": .int(options.connections),
            "mode": .string(options.rate == nil ? "closed" : "open"),
            "requests": .int(completed), "durationSeconds": .number(JSONNumber(fixed(duration, 3))!),
            "throughput": .number(JSONNumber(fixed(throughput, 1))!), "latencyMs": .object(latencyObject),
            "operations": .object(ops), "status": .object(status), "errors": .object(errs),
            "timeline": .array(
                timeline.map {
                    [
                        "second": .int($0.second), "requests": .int($0.completed),
                        "p50": .number(JSONNumber(fixed(Double($0.p50Micros) / 1000, 3))!),
                        "p99": .number(JSONNumber(fixed(Double($0.p99Micros) / 1000, 3))!),
                    ]
                }),
        ]
        if let rate = options.rate {
            object["rate"] = .number(JSONNumber(fixed(rate, 1))!)
            object["queuedBehind"] = .int(queuedBehind)
        }
        if !propagation.isEmpty {
            var p = JSONObject()
            for (k, v) in propagation { p[k] = .number(JSONNumber(fixed(v * 1000, 3))!) }
            object["propagationMs"] = .object(p)
        }
        return .object(object)
    }

    /// Two plots (`--svg`): latency over time (p50, p99 per second) and the
    /// latency by percentile (log scale of 1/(1-q)).
    public var svg: String {
        let w = 720.0, h = 260.0, pad = 48.0
        var out = #"<svg xmlns="http://www.w3.org/2000/svg" width="720" height="560" font-family="sans-serif" font-size="11">"#
        out += #"<rect width="720" height="560" fill="white"/>"#
        func panel(
            _ y0: Double, _ title: String, _ xLabel: String, _ xs: [Double], _ series: [(String, String, [Double])],
            _ xTicks: [(Double, String)]
        ) {
            let maxY = max(0.001, series.flatMap(\.2).max() ?? 1) * 1.1
            let minX = xs.first ?? 0, maxX = max(minX + 1e-9, xs.last ?? 1)
            func px(_ x: Double) -> Double { pad + (x - minX) / (maxX - minX) * (w - 2 * pad) }
            func py(_ y: Double) -> Double { y0 + h - pad / 2 - y / maxY * (h - pad) }
            out += #"<text x="\#(pad)" y="\#(y0 + 16)" font-size="13">\#(title)</text>"#
            out += #"<line x1="\#(pad)" y1="\#(py(0))" x2="\#(w - pad)" y2="\#(py(0))" stroke="dimgray"/>"#
            out += #"<line x1="\#(pad)" y1="\#(py(0))" x2="\#(pad)" y2="\#(py(maxY))" stroke="dimgray"/>"#
            for k in 0...4 {
                let v = maxY * Double(k) / 4
                out += #"<text x="\#(pad - 4)" y="\#(py(v) + 4)" text-anchor="end">\#(fixed(v, 1))</text>"#
                out += #"<line x1="\#(pad)" y1="\#(py(v))" x2="\#(w - pad)" y2="\#(py(v))" stroke="gainsboro"/>"#
            }
            for (x, label) in xTicks { out += #"<text x="\#(px(x))" y="\#(py(0) + 14)" text-anchor="middle">\#(label)</text>"# }
            out += #"<text x="\#(w / 2)" y="\#(y0 + h + 4)" text-anchor="middle">\#(xLabel)</text>"#
            out += #"<text x="12" y="\#(y0 + h / 2)" transform="rotate(-90 12 \#(y0 + h / 2))" text-anchor="middle">ms</text>"#
            for (i, (name, color, ys)) in series.enumerated() {
                let points = zip(xs, ys).map { "\(fixed(px($0), 1)),\(fixed(py($1), 1))" }.joined(separator: " ")
                out += #"<polyline fill="none" stroke="\#(color)" stroke-width="1.5" points="\#(points)"/>"#
                out += #"<text x="\#(w - pad - 60)" y="\#(y0 + 16 + Double(i) * 14)" fill="\#(color)">\#(name)</text>"#
            }
        }
        let seconds = timeline.map { Double($0.second) }
        panel(
            0, "Latency over time (\(options.mix), \(options.rate.map { "\(fixed($0, 0))/s" } ?? "closed loop"))", "seconds",
            seconds,
            [
                ("p50", "#1f77b4", timeline.map { Double($0.p50Micros) / 1000 }),
                ("p99", "#d62728", timeline.map { Double($0.p99Micros) / 1000 }),
            ],
            timeline.filter { $0.second % max(1, timeline.count / 10) == 0 }.map { (Double($0.second), String($0.second)) })
        let qs: [Double] = (0...60).map { 1 - pow(10, -Double($0) / 15) }  // 0 … 99.99 %
        let xs = qs.map { -log10(max(1e-6, 1 - $0)) }
        panel(
            290, "Latency by percentile", "percentile", xs, [("latency", "#2ca02c", qs.map { Double(latency.quantile($0)) / 1000 })],
            [(0, "0%"), (1, "90%"), (2, "99%"), (3, "99.9%"), (4, "99.99%")])
        return out + "</svg>\n"
    }
}
