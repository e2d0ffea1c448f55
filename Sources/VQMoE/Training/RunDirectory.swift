import Foundation

/// A training run's output directory, held for the run's lifetime: an exclusive lock (so two
/// processes never write one directory), and the rule that a fresh run never mixes with an
/// earlier run's files.
///
/// - The lock is `DIR/.vqmoe.lock`, taken with `flock(LOCK_EX | LOCK_NB)` and released when
///   the process ends (also by a crash or SIGKILL: the kernel drops it); the file records the
///   holder's PID and host, which the refusal names.
/// - A fresh run (`.fresh`) refuses a directory that holds an earlier run's output
///   (`config.json`, `metrics.jsonl`, checkpoints, `result.json`, TensorBoard event files) unless
///   `force`, which first removes exactly those files (and `repr/`), so no old checkpoint
///   survives under a new config.
///   Other files (a sweep's `config.input.json` and `train.log`, a user's notes) stay.
/// - `.resume` needs the earlier run's `last.*`.
///
/// ```swift
/// let dir = try RunDirectory(path: "runs/x", mode: .fresh(force: false))  // refused if runs/x holds a run
/// defer { dir.release() }
/// ```
public final class RunDirectory {
    public enum Mode: Sendable { case fresh(force: Bool), resume }

    public let path: String
    private var fd: Int32 = -1

    /// Files a run writes; their presence means "this directory holds a run".
    static let runFiles = [
        "config.json", "metrics.jsonl", "last.json", "last.safetensors", "best.json", "best.safetensors",
        "result.json",
    ]

    public init(path: String, mode: Mode) throws {
        self.path = path
        do { try FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: true) } catch {
            throw VQMoEError(.io, "\(path): cannot create the run directory (\(error.localizedDescription))")
        }
        try lock()
        do { try prepare(mode) } catch {
            release()
            throw error
        }
    }

    deinit { release() }

    /// Drop the lock (also done when the process ends).
    public func release() {
        guard fd >= 0 else { return }
        flock(fd, LOCK_UN)
        close(fd)
        fd = -1
    }

    private func lock() throws {
        let file = "\(path)/.vqmoe.lock"
        fd = open(file, O_RDWR | O_CREAT | O_CLOEXEC, 0o644)
        guard fd >= 0 else {
            throw VQMoEError(.io, "\(file): cannot open the run lock (\(String(cString: strerror(errno))))")
        }
        guard flock(fd, LOCK_EX | LOCK_NB) == 0 else {
            let holder = (try? String(contentsOfFile: file, encoding: .utf8))?
                .trimmingCharacters(in: .whitespacesAndNewlines)
            close(fd)
            fd = -1
            throw VQMoEError(
                .usage,
                "\(path) is in use by another vqmoe process (\(holder.map { $0.isEmpty ? "holder unknown" : $0 } ?? "holder unknown")): "
                    + "two runs never share a directory; wait for it to finish, or choose another --out")
        }
        var host = [UInt8](repeating: 0, count: 256)
        gethostname(&host, host.count - 1)
        let text = "pid \(getpid()) on \(String(decoding: host.prefix { $0 != 0 }, as: UTF8.self))\n"
        _ = ftruncate(fd, 0)
        _ = text.withCString { pwrite(fd, $0, strlen($0), 0) }
    }

    private func prepare(_ mode: Mode) throws {
        let fm = FileManager.default
        let events = ((try? fm.contentsOfDirectory(atPath: path)) ?? []).filter {
            $0.hasPrefix("events.out.tfevents.")
        }
        let present = RunDirectory.runFiles.filter { fm.fileExists(atPath: "\(path)/\($0)") } + events.sorted()
        switch mode {
        case .resume:
            guard fm.fileExists(atPath: "\(path)/last.safetensors"), fm.fileExists(atPath: "\(path)/last.json") else {
                throw VQMoEError(
                    .checkpoint,
                    "\(path): nothing to resume (no last.safetensors + last.json; a run writes them every "
                        + "train.checkpoint_every steps and when interrupted)")
            }
        case .fresh(let force):
            guard !present.isEmpty else { return }
            guard force else {
                throw VQMoEError(
                    .usage,
                    "\(path) already holds a run (\(present.joined(separator: ", "))): continue it with "
                        + "`vqmoe train --resume \(path)`, or pass --force to replace it (removes those files), "
                        + "or choose another --out")
            }
            for name in present + ["repr"] where fm.fileExists(atPath: "\(path)/\(name)") {
                do { try fm.removeItem(atPath: "\(path)/\(name)") } catch {
                    throw VQMoEError(.io, "\(path)/\(name): cannot remove (\(error.localizedDescription))")
                }
            }
        }
    }
}
