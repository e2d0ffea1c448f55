import Foundation

/// Where each component name comes from: `registry.json` entries plus every library found in
/// the directories of `VQMOE_PLUGIN_PATH`.
///
/// `registry.json`:
/// ```json
/// {"version": 1, "plugins": [
///   {"name": "smoe", "kind": "router", "library": "$BIN/libRouterSMoE.so",
///    "sha256": "…optional pin…", "defaults": {"k": 2}},
///   {"name": "hash", "kind": "router",
///    "ffi": {"library": "$BIN/libFFIHashRouter.so", "symbol": "vqmoe_hash_route",
///            "signature": "void(const int32_t *token_ids, int64_t n, int64_t n_experts, int32_t *expert)"}}
/// ]}
/// ```
/// `$BIN` is the directory of the running executable (where SwiftPM puts the plugin
/// libraries), `$ROOT` the directory holding `registry.json`.
///
/// ```swift
/// let reg = try Registry.load()
/// let lib = try reg.library(named: "smoe", kind: .router)
/// ```
public final class Registry: @unchecked Sendable {
    /// One registered component.
    public struct Entry: Sendable {
        public enum Source: Sendable {
            case library(path: String)
            case ffi(FFISignatureEntry)
        }
        public let name: String
        public let kind: PluginKind
        public let source: Source
        public let sha256: String?
        /// Default hyperparameters from the registry (override the plugin's own defaults).
        public let defaults: [String: SendableJSON]
        /// Where it was declared, for messages: "registry.json#3" or a search-path file.
        public let origin: String
    }

    public let root: String
    public let binDir: String
    public let registryPath: String?
    public private(set) var entries: [Entry] = []

    /// - Parameters:
    ///   - registryPath: a registry file; nil → `$VQMOE_REGISTRY`, else `registry.json` found
    ///     from the current directory or the executable's directory upwards.
    ///   - binDir: where `$BIN` points; nil → `$VQMOE_BIN`, else the executable's directory.
    ///   - searchPath: directories to scan for plugin libraries; nil → `$VQMOE_PLUGIN_PATH`.
    public static func load(
        registryPath: String? = nil, binDir: String? = nil,
        searchPath: [String]? = nil
    ) throws -> Registry {
        let env = ProcessInfo.processInfo.environment
        let bin = binDir ?? env["VQMOE_BIN"] ?? Registry.executableDirectory()
        let path =
            registryPath ?? env["VQMOE_REGISTRY"]
            ?? Registry.findRegistry(from: [
                FileManager.default.currentDirectoryPath, bin,
            ])
        let dirs = searchPath ?? (env["VQMOE_PLUGIN_PATH"] ?? "").split(separator: ":").map(String.init)
        return try Registry(registryPath: path, binDir: bin, searchPath: dirs)
    }

    init(registryPath: String?, binDir: String, searchPath: [String]) throws {
        self.registryPath = registryPath
        self.binDir = binDir
        self.root =
            registryPath.map { URL(fileURLWithPath: $0).deletingLastPathComponent().path }
            ?? FileManager.default.currentDirectoryPath
        if let registryPath { try readRegistry(registryPath) }
        for dir in searchPath where !dir.isEmpty { try scan(directory: dir) }
    }

    /// Directory of the running executable (`/proc/self/exe`).
    public static func executableDirectory() -> String {
        let exe =
            (try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/exe")) ?? CommandLine.arguments[0]
        return URL(fileURLWithPath: exe).deletingLastPathComponent().path
    }

    static func findRegistry(from starts: [String]) -> String? {
        for start in starts {
            var dir = URL(fileURLWithPath: start).standardizedFileURL
            for _ in 0..<8 {
                let candidate = dir.appendingPathComponent("registry.json").path
                if FileManager.default.fileExists(atPath: candidate) { return candidate }
                let parent = dir.deletingLastPathComponent()
                if parent.path == dir.path { break }
                dir = parent
            }
        }
        return nil
    }

    /// Expand `$BIN` and `$ROOT` (and `${BIN}`, `${ROOT}`) in a path.
    public func expand(_ path: String) -> String {
        var p = path
        for (key, value) in [("BIN", binDir), ("ROOT", root)] {
            p = p.replacingOccurrences(of: "${\(key)}", with: value).replacingOccurrences(of: "$\(key)", with: value)
        }
        return p
    }

    private func readRegistry(_ path: String) throws {
        guard let data = FileManager.default.contents(atPath: path) else {
            throw VQMoEError(.registry, "\(path): cannot read the plugin registry")
        }
        let json: Any
        do { json = try JSONSerialization.jsonObject(with: data) } catch {
            throw VQMoEError(.registry, "\(path): not valid JSON: \(error.localizedDescription)")
        }
        guard let top = json as? [String: Any], let list = top["plugins"] as? [Any] else {
            throw VQMoEError(.registry, "\(path): expected an object with a \"plugins\" array")
        }
        if let v = top["version"], jsonNumber(v) != 1 {
            throw VQMoEError(.registry, "\(path): registry version \(describeJSON(v)) is not supported (expected 1)")
        }
        for (i, item) in list.enumerated() {
            let origin = "\(path)#plugins[\(i)]"
            guard let obj = item as? [String: Any] else { throw VQMoEError(.registry, "\(origin): expected an object") }
            let allowed = ["name", "kind", "library", "ffi", "sha256", "defaults", "comment"]
            if let bad = obj.keys.sorted().first(where: { !allowed.contains($0) }) {
                throw VQMoEError(
                    .registry,
                    "\(origin).\(bad): unknown key; known: \(closestFirst(bad, among: allowed).joined(separator: ", "))"
                )
            }
            guard let name = obj["name"] as? String, !name.isEmpty else {
                throw VQMoEError(.registry, "\(origin).name: missing or not a string")
            }
            guard let kindName = obj["kind"] as? String else {
                throw VQMoEError(.registry, "\(origin).kind: missing or not a string")
            }
            guard let kind = PluginKind(name: kindName) else {
                throw VQMoEError(
                    .registry, "\(origin).kind: '\(kindName)' is not one of router, quantizer, dataset, head")
            }
            let defaults = try (obj["defaults"] as? [String: Any] ?? [:]).mapValues { try SendableJSON($0) }
            let source: Entry.Source
            if let lib = obj["library"] as? String {
                source = .library(path: expand(lib))
            } else if let ffi = obj["ffi"] as? [String: Any] {
                let f = try FFISignatureEntry(json: ffi, origin: "\(origin).ffi", expand: expand)
                guard kind == f.signature.kind else {
                    throw VQMoEError(
                        .registry,
                        "\(origin): kind '\(kind.rawValue)' but the signature's output makes it a \(f.signature.kind.rawValue) "
                            + "(a router writes 'int32_t *expert', a quantizer 'int32_t *code')")
                }
                guard kind == .router || kind == .quantizer else {
                    throw VQMoEError(.registry, "\(origin): ffi entries are routers or quantizers")
                }
                source = .ffi(f)
            } else {
                throw VQMoEError(
                    .registry, "\(origin): needs \"library\" (a plugin .so) or \"ffi\" (a plain C function)")
            }
            try add(
                Entry(
                    name: name, kind: kind, source: source, sha256: (obj["sha256"] as? String)?.lowercased(),
                    defaults: defaults, origin: origin))
        }
    }

    private func scan(directory: String) throws {
        guard let files = try? FileManager.default.contentsOfDirectory(atPath: directory) else {
            throw VQMoEError(.registry, "VQMOE_PLUGIN_PATH: \(directory) is not a readable directory")
        }
        for file in files.sorted() where file.hasSuffix(".so") || file.hasSuffix(".dylib") {
            let path = URL(fileURLWithPath: directory).appendingPathComponent(file).path
            let lib = try PluginLibrary.open(path)
            try add(
                Entry(
                    name: lib.name, kind: lib.kind, source: .library(path: path), sha256: nil,
                    defaults: [:], origin: path))
        }
    }

    private func add(_ e: Entry) throws {
        if let other = entries.first(where: { $0.name == e.name }) {
            throw VQMoEError(
                .registry,
                "duplicate plugin name '\(e.name)': declared by \(other.origin) (\(other.kind.rawValue)) and "
                    + "by \(e.origin) (\(e.kind.rawValue)); names must be unique"
            )
        }
        entries.append(e)
    }

    /// The entry called `name`; when missing, an error that names the kind and lists the
    /// known names of that kind, closest first.
    public func entry(named name: String, kind: PluginKind? = nil) throws -> Entry {
        if let e = entries.first(where: { $0.name == name }) {
            if let kind, e.kind != kind {
                throw VQMoEError(
                    .registry,
                    "'\(name)' is a \(e.kind.rawValue), not a \(kind.rawValue); known \(kind.rawValue)s: "
                        + "\(names(of: kind, closestTo: name).joined(separator: ", "))"
                )
            }
            return e
        }
        if let kind {
            let known = names(of: kind, closestTo: name)
            throw VQMoEError(
                .registry,
                "unknown \(kind.rawValue) '\(name)'; known \(kind.rawValue)s: "
                    + (known.isEmpty ? "(none registered)" : known.joined(separator: ", ")))
        }
        let known = closestFirst(name, among: entries.map(\.name))
        throw VQMoEError(
            .registry,
            "unknown plugin '\(name)'; known plugins: "
                + (known.isEmpty ? "(none registered)" : known.joined(separator: ", ")))
    }

    public func names(of kind: PluginKind, closestTo query: String) -> [String] {
        closestFirst(query, among: entries.filter { $0.kind == kind }.map(\.name))
    }

    /// The library of an entry: a native plugin (its sha256 pin checked, its descriptor agreeing
    /// with the registry on name and kind), or the host's wrapper of an `ffi` C function.
    public func library(for e: Entry) throws -> PluginLibrary {
        let path: String
        switch e.source {
        case .ffi(let f): return try FFIComponent.library(name: e.name, entry: f)
        case .library(let p): path = p
        }
        if let pin = e.sha256 {
            let actual = try SHA256.hex(ofFile: path)
            guard actual == pin else {
                throw VQMoEError(
                    .registry,
                    "\(path): sha256 mismatch for '\(e.name)' (\(e.origin)): pinned \(pin), file has "
                        + "\(actual); refusing to load it"
                )
            }
        }
        let lib = try PluginLibrary.open(path)
        guard lib.name == e.name, lib.kind == e.kind else {
            throw VQMoEError(
                .registry,
                "\(e.origin): registered as \(e.kind.rawValue) '\(e.name)', but \(path) is "
                    + "\(lib.kind.rawValue) '\(lib.name)'"
            )
        }
        return lib
    }

    public func library(named name: String, kind: PluginKind? = nil) throws -> PluginLibrary {
        try library(for: try entry(named: name, kind: kind))
    }
}

/// A JSON value that can cross concurrency domains (registry defaults, configs).
public struct SendableJSON: @unchecked Sendable {
    public let value: Any
    init(_ v: Any) throws {
        guard jsonNumber(v) != nil || jsonBool(v) != nil || v is String else {
            throw VQMoEError(.registry, "default values must be numbers, booleans or strings, got \(describeJSON(v))")
        }
        value = v
    }
}
