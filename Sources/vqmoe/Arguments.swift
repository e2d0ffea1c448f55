import Foundation
import VQMoE

/// The command line after the global options (`--registry FILE`, `--threads N`), consumed flag by flag.
struct Args {
    var rest: [String]
    /// `--registry FILE[:FILE...]`, repeatable: registry overlays, stacked after `$VQMOE_REGISTRY`.
    var registryPaths: [String] = []
    var threads: Int?

    init(_ argv: [String]) throws {
        var out: [String] = []
        var i = 0
        while i < argv.count {
            let a = argv[i]
            guard a == "--registry" || a == "--threads" || a == "--max-memory" else {
                out.append(a)
                i += 1
                continue
            }
            guard i + 1 < argv.count else { throw VQMoEError(.usage, "\(a) needs a value") }
            if a == "--registry" {
                registryPaths += argv[i + 1].split(separator: ":").map(String.init)
            } else if a == "--max-memory" {
                guard let bytes = MemoryBudget.parse(argv[i + 1]) else {
                    throw VQMoEError(.usage, "--max-memory: expected a size such as 8G or 512M, got '\(argv[i + 1])'")
                }
                MemoryBudget.limitOverride = bytes
            } else {
                guard let n = Int(argv[i + 1]), n >= 1 else {
                    throw VQMoEError(.usage, "--threads: expected a positive integer, got '\(argv[i + 1])'")
                }
                threads = n
            }
            i += 2
        }
        rest = out
    }

    /// Remove `--flag VALUE` pairs (repeatable) and return the values.
    mutating func take(_ flag: String) throws -> [String] {
        var values: [String] = []
        var i = 0
        while i < rest.count {
            if rest[i] == flag {
                guard i + 1 < rest.count else { throw VQMoEError(.usage, "\(flag) needs a value") }
                values.append(rest[i + 1])
                rest.removeSubrange(i...(i + 1))
            } else {
                i += 1
            }
        }
        return values
    }

    mutating func flag(_ name: String) -> Bool {
        guard let i = rest.firstIndex(of: name) else { return false }
        rest.remove(at: i)
        return true
    }

    /// `--set key=value` settings, plus `train.threads` from `--threads`.
    mutating func overrides(threads: Bool = true) throws -> [String: Any] {
        var o = try parseSettings(try take("--set"))
        if threads, let t = self.threads { o["train.threads"] = t }
        return o
    }

    /// The registry stack: the built-in registry, VQMOE_PLUGIN_PATH folders, then the overlays
    /// (`$VQMOE_REGISTRY`, then `--registry`); its warnings go to standard error.
    func registry() throws -> Registry {
        let env = (ProcessInfo.processInfo.environment["VQMOE_REGISTRY"] ?? "").split(separator: ":").map(String.init)
        return try Registry.load(overlays: env + registryPaths, printWarnings: true)
    }

    /// Exactly `count` positional arguments, else the command's usage as an error.
    func positional(_ count: Int, usage: String) throws -> [String] {
        guard rest.count == count else { throw VQMoEError(.usage, "usage: vqmoe \(usage)") }
        return rest
    }
}

/// `key=value` settings (`ConfigReader.parseSettings`).
func parseSettings(_ items: [String]) throws -> [String: Any] { try ConfigReader.parseSettings(items) }
