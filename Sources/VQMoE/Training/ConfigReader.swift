import Foundation

/// Strict reading of a JSON config object: every key is typed, range-checked and named by
/// its full key path in errors; keys nobody read are errors too (never ignored silently).
///
/// ```swift
/// let r = ConfigReader(json, path: "train")
/// let steps = try r.int("steps", default: 1000, min: 1)
/// try r.finish()                           // "train.stpes: unknown key; known: steps, ..."
/// ```
public final class ConfigReader {
    public let object: [String: Any]
    public let path: String
    private var known: [String] = []

    public init(_ object: [String: Any], path: String) {
        self.object = object
        self.path = path
    }

    /// Read a JSON object from a file, with `--set a.b.c=value` overrides applied.
    public static func load(file: String, overrides: [String: Any] = [:]) throws -> [String: Any] {
        guard let data = FileManager.default.contents(atPath: file) else {
            throw VQMoEError(.config, "\(file): cannot read the config file")
        }
        let json: Any
        do { json = try JSONSerialization.jsonObject(with: data) } catch {
            throw VQMoEError(.config, "\(file): not valid JSON (\(error.localizedDescription))")
        }
        guard var obj = json as? [String: Any] else { throw VQMoEError(.config, "\(file): expected a JSON object") }
        try apply(overrides, to: &obj)
        return obj
    }

    /// `--set key=value` items → overrides; values parse as JSON when they can (numbers,
    /// true/false, null, strings in quotes), else they are strings.
    public static func parseSettings(_ items: [String]) throws -> [String: Any] {
        var out: [String: Any] = [:]
        for item in items {
            guard let eq = item.firstIndex(of: "=") else {
                throw VQMoEError(.usage, "--set \(item): expected key=value")
            }
            let key = String(item[..<eq]), raw = String(item[item.index(after: eq)...])
            if let data = raw.data(using: .utf8),
                let v = try? JSONSerialization.jsonObject(with: data, options: [.fragmentsAllowed]),
                !(v is [Any]), !(v is [String: Any])
            {
                out[key] = v
            } else {
                out[key] = raw
            }
        }
        return out
    }

    /// Apply overrides (key paths → values) to a config object, in key order.
    public static func apply(_ overrides: [String: Any], to obj: inout [String: Any]) throws {
        for (key, value) in overrides.sorted(by: { $0.key < $1.key }) {
            let path = key.split(separator: ".", omittingEmptySubsequences: false).map(String.init)
            guard !path.contains(where: \.isEmpty) else {
                throw VQMoEError(.config, "--set \(key): empty key segment (keys are names joined by single dots)")
            }
            try set(&obj, path: path, value: value, full: key)
        }
    }

    static func set(_ obj: inout [String: Any], path: [String], value: Any, full: String) throws {
        guard let first = path.first, !first.isEmpty else { throw VQMoEError(.config, "--set \(full): empty key") }
        if path.count == 1 { obj[first] = value; return }
        var child = (obj[first] as? [String: Any]) ?? [:]
        if obj[first] != nil && !(obj[first] is [String: Any]) {
            throw VQMoEError(.config, "--set \(full): '\(first)' is not an object")
        }
        try set(&child, path: Array(path.dropFirst()), value: value, full: full)
        obj[first] = child
    }

    private func key(_ k: String) -> String { path.isEmpty ? k : "\(path).\(k)" }
    private func mark(_ k: String) { if !known.contains(k) { known.append(k) } }

    public func has(_ k: String) -> Bool { object[k] != nil }

    public func number(_ k: String, default def: Double?, min: Double? = nil, max: Double? = nil) throws -> Double {
        mark(k)
        guard let v = object[k] else {
            guard let def else { throw VQMoEError(.config, "\(key(k)): missing (a number is required)") }
            return def
        }
        guard let n = jsonNumber(v) else {
            throw VQMoEError(.config, "\(key(k)): expected a number, got \(describeJSON(v))")
        }
        if let min, n < min { throw VQMoEError(.config, "\(key(k)): \(n) is below the minimum \(min)") }
        if let max, n > max { throw VQMoEError(.config, "\(key(k)): \(n) is above the maximum \(max)") }
        return n
    }

    public func float(_ k: String, default def: Float?, min: Double? = nil, max: Double? = nil) throws -> Float {
        Float(try number(k, default: def.map(Double.init), min: min, max: max))
    }

    public func int(_ k: String, default def: Int?, min: Int? = nil, max: Int? = nil) throws -> Int {
        mark(k)
        guard let v = object[k] else {
            guard let def else { throw VQMoEError(.config, "\(key(k)): missing (an integer is required)") }
            return def
        }
        guard let n = jsonNumber(v), n == n.rounded(), abs(n) < 1e15 else {
            throw VQMoEError(.config, "\(key(k)): expected an integer, got \(describeJSON(v))")
        }
        let i = Int(n)
        if let min, i < min { throw VQMoEError(.config, "\(key(k)): \(i) is below the minimum \(min)") }
        if let max, i > max { throw VQMoEError(.config, "\(key(k)): \(i) is above the maximum \(max)") }
        return i
    }

    public func bool(_ k: String, default def: Bool) throws -> Bool {
        mark(k)
        guard let v = object[k] else { return def }
        guard let b = jsonBool(v) else {
            throw VQMoEError(.config, "\(key(k)): expected true or false, got \(describeJSON(v))")
        }
        return b
    }

    public func string(_ k: String, default def: String?, choices: [String]? = nil) throws -> String {
        mark(k)
        guard let v = object[k] else {
            guard let def else { throw VQMoEError(.config, "\(key(k)): missing (a string is required)") }
            return def
        }
        guard let s = v as? String else {
            throw VQMoEError(.config, "\(key(k)): expected a string, got \(describeJSON(v))")
        }
        if let choices, !choices.contains(s) {
            throw VQMoEError(
                .config, "\(key(k)): '\(s)' is not one of \(closestFirst(s, among: choices).joined(separator: ", "))")
        }
        return s
    }

    /// A nested object (empty when absent and `required` is false).
    public func child(_ k: String, required: Bool = false) throws -> ConfigReader {
        mark(k)
        guard let v = object[k] else {
            if required { throw VQMoEError(.config, "\(key(k)): missing (an object is required)") }
            return ConfigReader([:], path: key(k))
        }
        guard let o = v as? [String: Any] else {
            throw VQMoEError(.config, "\(key(k)): expected an object, got \(describeJSON(v))")
        }
        return ConfigReader(o, path: key(k))
    }

    /// Mark keys as read by someone else (e.g. a plugin's hyperparameters).
    public func accept(_ keys: [String]) { keys.forEach(mark) }

    /// Everything except `keys`, for handing to a plugin schema.
    public func remaining(excluding keys: [String]) -> [String: Any] {
        object.filter { !keys.contains($0.key) }
    }

    /// Throw for the first key that was never read.
    public func finish() throws {
        for k in object.keys.sorted() where !known.contains(k) {
            throw VQMoEError(
                .config, "\(key(k)): unknown key; known: \(closestFirst(k, among: known).joined(separator: ", "))")
        }
    }
}
