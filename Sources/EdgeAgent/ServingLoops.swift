import EdgeHTTP
import EdgeLog
import EdgeLoop
import EdgeStore
import EdgeTLS
import Glibc
import Logging
import SCIM
import Synchronization

/// One more loop serving SCIM requests, on its own thread: an `HTTPServer`
/// without a listener (the main loop's server hands it connections) and an
/// endpoint sharing the agent's store and group-commit writer.
///
/// Everything on the serving loop is reached through its inbox; the
/// `Sendable` parts (`metrics`, the thread) are read from the main loop.
final class ServingLoop: Sendable {
    let thread: LoopThread
    let metrics: MetricsCell
    private let parts: LoopBound<(server: HTTPServer, endpoint: SCIMEndpoint)>

    /// Starts the loop; `committed` (the relay's kick) runs on the main loop
    /// (through `mainInbox`) after each successful write.
    init(
        store: AgentStore, writer: GroupCommitWriter, options: EndpointOptions, shared: EndpointShared,
        tls: ReloadableTLSContext?, limits: HTTPServerLimits, connectionBudget: ConnectionBudget, mainInbox: LoopInbox,
        committed: LoopBound<() -> Void>?, logger: Logger, accessLog: LogSink?
    ) throws {
        let made = OneShot<Made>()
        thread = try LoopThread.start { loop in
            let inbox: LoopInbox = loop.inbox
            let endpoint = SCIMEndpoint(store: store, writer: writer, inbox: inbox, options: options, shared: shared)
            endpoint.logger = logger
            endpoint.accessLog = accessLog
            if let committed { endpoint.onCommitted = { mainInbox.send { committed.value() } } }
            let server = try HTTPServer(loop: loop, tls: tls, limits: limits, connectionBudget: connectionBudget) { request, _, responder in
                endpoint.handle(request, responder)
            }
            server.errorBody = SCIMEndpoint.errorResponse
            made.fulfil(Made(parts: LoopBound((server, endpoint)), metrics: endpoint.metricsCell))
        }
        // `LoopThread.start` returns after the setup ran.
        let m = made.wait(seconds: 0)!
        parts = m.parts
        metrics = m.metrics
    }

    private struct Made: Sendable {
        let parts: LoopBound<(server: HTTPServer, endpoint: SCIMEndpoint)>
        let metrics: MetricsCell
    }

    /// Serves a connection detached from the main loop; false (the
    /// descriptor closed) when this loop has ended.
    func adopt(_ descriptor: Int32) -> Bool {
        let parts = self.parts
        if thread.inbox.send({ parts.value.server.adopt(descriptor: descriptor) }) { return true }
        close(descriptor)
        return false
    }

    /// Sets the accepted tokens (after a reload).
    func setTokens(_ tokens: [String]) {
        let parts = self.parts
        thread.inbox.send { parts.value.endpoint.options.tokens = tokens }
    }

    /// Drains the server (SIGTERM); `done` runs on the serving loop once it
    /// has drained, after which the loop ends.
    func shutdown(_ done: @escaping @Sendable () -> Void) {
        let parts = self.parts
        if !thread.inbox.send({ parts.value.server.shutdown { done() } }) { done() }
    }

    /// Open connections, read on the serving loop; `answer` runs there.
    func openConnections(_ answer: @escaping @Sendable (Int) -> Void) {
        let parts = self.parts
        if !thread.inbox.send({ answer(parts.value.server.statistics.openConnections) }) { answer(0) }
    }
}

/// Round-robin of accepted connections over the main loop and the serving loops.
final class ConnectionSpreader {
    let loops: [ServingLoop]
    /// The agent's one budget: the stream's slot, taken at accept, goes with it.
    let budget: ConnectionBudget
    private var next = 0

    init(loops: [ServingLoop], budget: ConnectionBudget) {
        self.loops = loops
        self.budget = budget
    }

    /// True when the stream went to a serving loop (or was closed on the
    /// way), false to serve it on the main loop.
    func handOver(_ stream: TCPStream) -> Bool {
        next = (next + 1) % (loops.count + 1)
        guard next > 0 else { return false }
        guard let fd = try? stream.detach(), loops[next - 1].adopt(fd) else {
            budget.give()  // the connection is gone before a server took it
            return true
        }
        return true
    }
}
