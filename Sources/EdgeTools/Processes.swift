import EdgeConfig
import Glibc

/// A child process whose output goes to a log file (for the sandbox).
public final class ServiceProcess {
    public let name: String
    public let pid: pid_t
    public let logPath: String
    private var exitStatus: Int32?

    /// Starts `executable` with `arguments`; stdout and stderr go to `logPath`.
    public init(name: String, executable: String, arguments: [String], logPath: String, environment: [String] = []) throws {
        self.name = name
        self.logPath = logPath
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        posix_spawn_file_actions_addopen(&actions, 1, logPath, O_WRONLY | O_CREAT | O_TRUNC, 0o640)
        posix_spawn_file_actions_adddup2(&actions, 1, 2)
        posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0)
        var attributes = posix_spawnattr_t()
        posix_spawnattr_init(&attributes)
        defer { posix_spawnattr_destroy(&attributes) }
        // Its own process group: a Ctrl-C at the terminal reaches the sandbox only, which then stops the children in order.
        posix_spawnattr_setflags(&attributes, Int16(POSIX_SPAWN_SETPGROUP))
        posix_spawnattr_setpgroup(&attributes, 0)
        // A parent-death signal (set by util-linux `setpriv`, which then execs
        // the program under the same pid): if the sandbox is killed with
        // SIGKILL and cannot stop its children, they get SIGTERM and drain.
        guard access(executable, X_OK) == 0 else {
            throw BenchError("cannot start \(executable): \(String(cString: strerror(errno)))")
        }
        // The signal goes when the spawning thread ends: the sandbox spawns
        // from its main thread, which lives until the sandbox exits.
        let launcher = ServiceProcess.deathSignalLauncher
        let command = launcher.map { [$0, "--pdeathsig", "TERM", "--", executable] } ?? [executable]
        let argv = (command + arguments).map { strdup($0) } + [nil]
        defer { for p in argv { free(p) } }
        var env: [UnsafeMutablePointer<CChar>?] = []
        var p = environ
        while let e = p.pointee { env.append(strdup(e)); p += 1 }
        for e in environment { env.append(strdup(e)) }
        env.append(nil)
        defer { for e in env { free(e) } }
        var child: pid_t = 0
        let rc = posix_spawn(&child, command[0], &actions, &attributes, argv, env)
        guard rc == 0 else { throw BenchError("cannot start \(executable): \(String(cString: strerror(rc)))") }
        pid = child
    }

    /// `setpriv` when the machine has it (util-linux, essential on Debian).
    static let deathSignalLauncher: String? = access("/usr/bin/setpriv", X_OK) == 0 ? "/usr/bin/setpriv" : nil

    public var isRunning: Bool {
        guard exitStatus == nil else { return false }
        var status: Int32 = 0
        let r = waitpid(pid, &status, WNOHANG)
        if r == pid { exitStatus = status; return false }
        return r == 0
    }

    public func signal(_ sig: Int32) { if isRunning { kill(pid, sig) } }

    /// SIGTERM, then SIGKILL after `grace` seconds; waits for the exit.
    public func stop(grace: Double = 5) {
        signal(SIGTERM)
        let deadline = monotonicMicros() + UInt64(grace * 1_000_000)
        while isRunning && monotonicMicros() < deadline { usleep(20_000) }
        if isRunning {
            kill(pid, SIGKILL)
            var status: Int32 = 0
            waitpid(pid, &status, 0)
            exitStatus = status
        }
    }

    /// Waits up to `seconds` for the exit: the exit status (128 + the
    /// signal when killed by one), nil if still running then.
    public func waitForExit(seconds: Double) -> Int32? {
        let deadline = monotonicMicros() + UInt64(seconds * 1_000_000)
        while isRunning {
            if monotonicMicros() >= deadline { return nil }
            usleep(10_000)
        }
        guard let s = exitStatus else { return nil }
        return s & 0x7f == 0 ? (s >> 8) & 0xff : 128 + (s & 0x7f)
    }

    /// The log so far.
    public var log: String { (try? readText(logPath)) ?? "" }

    /// Waits until the log holds `text`; false on timeout or exit.
    public func waitForLog(_ text: String, seconds: Double = 15) -> Bool {
        let deadline = monotonicMicros() + UInt64(seconds * 1_000_000)
        while monotonicMicros() < deadline {
            if log.contains(text) { return true }
            if !isRunning { return log.contains(text) }
            usleep(20_000)
        }
        return false
    }
}

func readText(_ path: String) throws -> String { String(decoding: try readFileBytes(path), as: UTF8.self) }

func writeText(_ path: String, _ text: String, mode: mode_t = 0o640) throws {
    let fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, mode)
    guard fd >= 0 else { throw BenchError("cannot write \(path): \(String(cString: strerror(errno)))") }
    defer { close(fd) }
    let bytes = Array(text.utf8)
    _ = bytes.withUnsafeBytes { write(fd, $0.baseAddress, $0.count) }
    fchmod(fd, mode)
}

/// A free TCP port on 127.0.0.1 (bound, then released).
public func freeLoopbackPort() -> Int {
    let (fd, port) = boundLoopbackPort()
    close(fd)
    return port
}

/// A TCP socket bound to a free port on 127.0.0.1 and not listening:
/// connections to it are refused while the caller holds it (and no other
/// process can take the port). The caller closes `fd`.
public func boundLoopbackPort() -> (fd: Int32, port: Int) {
    let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
    var a = sockaddr_in()
    a.sin_family = sa_family_t(AF_INET)
    a.sin_addr.s_addr = inet_addr("127.0.0.1")
    var len = socklen_t(MemoryLayout<sockaddr_in>.size)
    _ = withUnsafeMutablePointer(to: &a) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, len) } }
    _ = withUnsafeMutablePointer(to: &a) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(fd, $0, &len) } }
    return (fd, Int(UInt16(bigEndian: a.sin_port)))
}

/// `rm -rf`, without a shell.
func removeTree(_ path: String) {
    guard let dir = opendir(path) else { unlink(path); return }
    while let entry = readdir(dir) {
        let name = withUnsafeBytes(of: entry.pointee.d_name) { raw in
            String(decoding: raw.prefix { $0 != 0 }, as: UTF8.self)
        }
        if name == "." || name == ".." { continue }
        let child = path + "/" + name
        var st = stat()
        if lstat(child, &st) == 0 && (st.st_mode & S_IFMT) == S_IFDIR { removeTree(child) } else { unlink(child) }
    }
    closedir(dir)
    rmdir(path)
}

/// The first executable named `name` in `candidates` or on PATH.
func findExecutable(_ name: String, candidates: [String]) -> String? {
    for c in candidates where access(c, X_OK) == 0 { return c }
    let path = getenv("PATH").map { String(cString: $0) } ?? "/usr/bin:/bin"
    for dir in path.split(separator: ":") where access("\(dir)/\(name)", X_OK) == 0 { return "\(dir)/\(name)" }
    return nil
}

/// The directory of the running executable.
func executableDirectory() -> String {
    var buf = [CChar](repeating: 0, count: 4096)
    let n = readlink("/proc/self/exe", &buf, buf.count - 1)
    guard n > 0 else { return "." }
    let path = String(decoding: buf.prefix(n).map { UInt8(bitPattern: $0) }, as: UTF8.self)
    return String(path[..<(path.lastIndex(of: "/") ?? path.endIndex)])
}
