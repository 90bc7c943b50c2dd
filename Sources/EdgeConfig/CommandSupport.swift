import Glibc

/// A command that could not do its work (a missing record, a file it cannot
/// write, a refused request): the message and exit status 1, without the
/// usage text. Argument mistakes stay ArgumentParser's validation errors
/// (usage, status 64); this is for everything else.
public struct CommandFailure: Error, Sendable, CustomStringConvertible {
    public let description: String
    public init(_ description: String) { self.description = description }
}

/// Creates `path` with `mode` (refusing to overwrite unless `replace`) and writes `text`.
public func writeFile(_ path: String, _ text: String, mode: mode_t, replace: Bool = false) throws(CommandFailure) {
    let fd = open(path, O_WRONLY | O_CREAT | (replace ? O_TRUNC : O_EXCL), mode)
    guard fd >= 0 else { throw CommandFailure("cannot create \(path): \(String(cString: strerror(errno)))") }
    defer { close(fd) }
    let bytes = Array(text.utf8)
    guard bytes.withUnsafeBytes({ write(fd, $0.baseAddress, $0.count) }) == bytes.count else {
        throw CommandFailure("cannot write \(path): \(String(cString: strerror(errno)))")
    }
}

/// Replaces `path` with `text` atomically (a temporary file renamed over
/// it), so that a reader (the broker re-reading its CRL) never sees half a file.
public func replaceFile(_ path: String, _ text: String, mode: mode_t) throws(CommandFailure) {
    let temporary = "\(path).new"
    unlink(temporary)
    try writeFile(temporary, text, mode: mode)
    guard rename(temporary, path) == 0 else {
        throw CommandFailure("cannot replace \(path): \(String(cString: strerror(errno)))")
    }
}
