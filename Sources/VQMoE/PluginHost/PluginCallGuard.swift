import Foundation

/// Which plugin call is running, so that a fatal signal inside a plugin (a segfault in its
/// forward, an abort in its create) names the plugin, its instance and the call before the
/// process ends: `vqmoe: fatal signal SIGSEGV inside router 'x' (layers.0.ffn.router) in forward`.
///
/// `enter` copies the text into a fixed buffer before each call (`PluginInstance.call`) and
/// `leave` clears it; the handler, installed once with `install()`, only calls `write(2)` and
/// `sigaction` (async-signal-safe). It then puts back the handler it replaced and returns, so
/// the faulting instruction runs again and the previous handler (Swift's backtracer, or the
/// default action) ends the process as before. `vqmoe plugins check` reads the line from a child
/// process to report "crashed with SIGSEGV in forward".
///
/// ```swift
/// PluginCallGuard.install()
/// PluginCallGuard.enter("router 'smoe' (layers.0.ffn.router)", call: "forward")
/// defer { PluginCallGuard.leave() }
/// ```
public enum PluginCallGuard {
    static let capacity = 512
    nonisolated(unsafe) static let text = UnsafeMutablePointer<UInt8>.allocate(capacity: capacity)
    nonisolated(unsafe) static var length = 0
    /// The replaced actions, by signal number.
    nonisolated(unsafe) static let previous = UnsafeMutablePointer<sigaction>.allocate(capacity: 65)
    nonisolated(unsafe) static var installed = false
    /// The signals a crash raises, and their names for the message (static, NUL-free).
    static let signals: [(Int32, StaticString)] = [
        (SIGSEGV, "SIGSEGV"), (SIGBUS, "SIGBUS"), (SIGFPE, "SIGFPE"), (SIGILL, "SIGILL"), (SIGABRT, "SIGABRT"),
    ]
    /// The line's prefix; the signal name and the call follow.
    static let prefix: StaticString = "vqmoe: fatal signal "

    /// Install the handler for SIGSEGV, SIGBUS, SIGFPE, SIGILL and SIGABRT (once).
    public static func install() {
        guard !installed else { return }
        installed = true
        for (sig, _) in signals {
            var action = sigaction()
            action.__sigaction_handler.sa_handler = { sig in PluginCallGuard.handle(sig) }
            sigemptyset(&action.sa_mask)
            action.sa_flags = 0
            sigaction(sig, &action, previous + Int(sig))
        }
    }

    /// A plugin call starts: "<who> in <call>".
    public static func enter(_ who: String, call: String) {
        let bytes = Array(" inside \(who) in \(call)\n".utf8.prefix(capacity))
        length = 0  // never half-written when a signal arrives
        bytes.withUnsafeBufferPointer { text.update(from: $0.baseAddress!, count: bytes.count) }
        length = bytes.count
    }

    /// The plugin call returned.
    public static func leave() { length = 0 }

    static func handle(_ sig: Int32) {
        if length > 0, let name = signals.first(where: { $0.0 == sig })?.1 {
            _ = write(2, prefix.utf8Start, prefix.utf8CodeUnitCount)
            _ = write(2, name.utf8Start, name.utf8CodeUnitCount)
            _ = write(2, text, length)
            length = 0
        }
        sigaction(sig, previous + Int(sig), nil)
    }

    /// From a crashed child's standard error: the signal name, the plugin instance and the call
    /// of the guard's line, if there is one.
    public static func parse(_ stderr: String) -> (signal: String, plugin: String, call: String)? {
        guard let line = stderr.split(separator: "\n").last(where: { $0.hasPrefix("vqmoe: fatal signal ") }) else {
            return nil
        }
        let rest = line.dropFirst("vqmoe: fatal signal ".count)
        guard let sig = rest.split(separator: " ").first, let inside = rest.range(of: " inside "),
            let inRange = rest.range(of: " in ", options: .backwards), inside.upperBound <= inRange.lowerBound
        else { return nil }
        return (String(sig), String(rest[inside.upperBound..<inRange.lowerBound]), String(rest[inRange.upperBound...]))
    }
}
