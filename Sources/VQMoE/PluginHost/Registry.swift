import Foundation

/// Where each component name comes from. Registries stack, later ones overriding earlier
/// entries of the same name (with a warning naming both origins):
///
/// 1. the base registry: `registry.json` found from the current directory or the executable's
///    directory upwards (the built-in components);
/// 2. each `VQMOE_PLUGIN_PATH` folder: its own `registry.json` (if any), then every plugin library
///    in it that no entry names (registered by its descriptor's name);
/// 3. the overlays: `$VQMOE_REGISTRY`, then each `--registry` file (both colon-separated lists).
///
/// A registry file:
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
/// libraries), `$ROOT` the directory holding the registry file that names it.
///
/// ```swift
/// let reg = try Registry.load(overlays: ["my/registry.json"])
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
        /// Where it was declared, for messages and `plugins list`: "FILE#plugins[3]", or the
        /// library found in a `VQMOE_PLUGIN_PATH` folder.
        public let origin: String
    }

    public let binDir: String
    /// The registry files read, in stacking order (the base first, when there is one).
    public private(set) var files: [String] = []
    /// The base registry file (whose folder is `$ROOT` for `expand`).
    public let registryPath: String?
    public var root: String {
        registryPath.map { URL(fileURLWithPath: $0).deletingLastPathComponent().path }
            ?? FileManager.default.currentDirectoryPath
    }
    public private(set) var entries: [Entry] = []
    /// What stacking overrode and which libraries of a search-path folder were skipped.
    public private(set) var warnings: [String] = []

    /// - Parameters:
    ///   - registryPath: the base registry; nil → `registry.json` found from the current
    ///     directory or the executable's directory upwards.
    ///   - overlays: registry files stacked last, in order; nil → `$VQMOE_REGISTRY` (colon-separated).
    ///   - binDir: where `$BIN` points; nil → `$VQMOE_BIN`, else the executable's directory.
    ///   - searchPath: plugin folders; nil → `$VQMOE_PLUGIN_PATH`.
    ///   - printWarnings: write each warning to standard error (the CLI does).
    public static func load(
        registryPath: String? = nil, overlays: [String]? = nil, binDir: String? = nil, searchPath: [String]? = nil,
        printWarnings: Bool = false
    ) throws -> Registry {
        let env = ProcessInfo.processInfo.environment
        let bin = binDir ?? env["VQMOE_BIN"] ?? Registry.executableDirectory()
        let base = registryPath ?? Registry.findRegistry(from: [FileManager.default.currentDirectoryPath, bin])
        let dirs = searchPath ?? (env["VQMOE_PLUGIN_PATH"] ?? "").split(separator: ":").map(String.init)
        let extra = overlays ?? (env["VQMOE_REGISTRY"] ?? "").split(separator: ":").map(String.init)
        let reg = try Registry(base: base, overlays: extra, binDir: bin, searchPath: dirs)
        if printWarnings { reg.warnings.forEach { FileHandle.standardError.write(Data("warning: \($0)\n".utf8)) } }
        return reg
    }

    init(base: String?, overlays: [String], binDir: String, searchPath: [String]) throws {
        registryPath = base
        self.binDir = binDir
        if let base { try stack(try readRegistry(base)) }
        // A folder listed twice (also as "dir" and "dir/") is scanned once.
        var scanned: [String] = []
        for dir in searchPath where !dir.isEmpty {
            guard !scanned.contains(where: { Registry.same($0, dir) }) else { continue }
            scanned.append(dir)
            try stack(try scan(directory: dir))
        }
        for file in overlays where !file.isEmpty && !files.contains(where: { Registry.same($0, file) }) {
            try stack(try readRegistry(file))
        }
    }

    static func same(_ a: String, _ b: String) -> Bool {
        URL(fileURLWithPath: a).resolvingSymlinksInPath().path == URL(fileURLWithPath: b).resolvingSymlinksInPath().path
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

    /// Expand `$BIN` and `$ROOT` (and `${BIN}`, `${ROOT}`) in a path; `$ROOT` is the folder of
    /// `registryFile` (default: the base registry).
    public func expand(_ path: String, registryFile: String? = nil) -> String {
        let root = registryFile.map { URL(fileURLWithPath: $0).deletingLastPathComponent().path } ?? self.root
        var p = path
        for (key, value) in [("BIN", binDir), ("ROOT", root)] {
            p = p.replacingOccurrences(of: "${\(key)}", with: value).replacingOccurrences(of: "$\(key)", with: value)
        }
        return p
    }

    /// Add entries on top of the stack: a name already present is overridden, with a warning.
    private func stack(_ new: [Entry]) throws {
        for e in new {
            if let i = entries.firstIndex(where: { $0.name == e.name }) {
                let old = entries[i]
                warnings.append(
                    "plugin '\(e.name)': \(e.kind.rawValue) from \(e.origin) overrides the \(old.kind.rawValue) from \(old.origin)"
                )
                entries[i] = e
            } else {
                entries.append(e)
            }
        }
    }

    /// One registry file's entries (a name twice in one file is an error).
    private func readRegistry(_ path: String) throws -> [Entry] {
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
        for key in top.keys.sorted() where !["version", "plugins", "comment"].contains(key) {
            throw VQMoEError(
                .registry,
                "\(path).\(key): unknown key; known: version, plugins, comment (registries stack instead of including "
                    + "each other: put a file in a VQMOE_PLUGIN_PATH folder or pass it with --registry / VQMOE_REGISTRY)"
            )
        }
        files.append(path)
        var out: [Entry] = []
        for (i, item) in list.enumerated() {
            let e = try entry(item, origin: "\(path)#plugins[\(i)]", file: path)
            if let other = out.first(where: { $0.name == e.name }) {
                throw VQMoEError(
                    .registry,
                    "duplicate plugin name '\(e.name)': declared by \(other.origin) (\(other.kind.rawValue)) and "
                        + "by \(e.origin) (\(e.kind.rawValue)); names must be unique within a registry file")
            }
            out.append(e)
        }
        return out
    }

    /// One `plugins` item.
    private func entry(_ item: Any, origin: String, file: String) throws -> Entry {
        guard let obj = item as? [String: Any] else { throw VQMoEError(.registry, "\(origin): expected an object") }
        let allowed = ["name", "kind", "library", "ffi", "sha256", "defaults", "comment"]
        if let bad = obj.keys.sorted().first(where: { !allowed.contains($0) }) {
            throw VQMoEError(
                .registry,
                "\(origin).\(bad): unknown key; known: \(closestFirst(bad, among: allowed).joined(separator: ", "))")
        }
        guard let name = obj["name"] as? String, !name.isEmpty else {
            throw VQMoEError(.registry, "\(origin).name: missing or not a string")
        }
        guard let kindName = obj["kind"] as? String else {
            throw VQMoEError(.registry, "\(origin).kind: missing or not a string")
        }
        guard let kind = PluginKind(name: kindName) else {
            throw VQMoEError(.registry, "\(origin).kind: '\(kindName)' is not one of router, quantizer, dataset, head")
        }
        let defaults = try (obj["defaults"] as? [String: Any] ?? [:]).mapValues { try SendableJSON($0) }
        let source: Entry.Source
        if let lib = obj["library"] as? String {
            source = .library(path: expand(lib, registryFile: file))
        } else if let ffi = obj["ffi"] as? [String: Any] {
            let f = try FFISignatureEntry(json: ffi, origin: "\(origin).ffi") { self.expand($0, registryFile: file) }
            guard kind == f.signature.kind else {
                throw VQMoEError(
                    .registry,
                    "\(origin): kind '\(kind.rawValue)' but the signature's output makes it a \(f.signature.kind.rawValue) "
                        + "(a router writes 'int32_t *expert', a quantizer 'int32_t *code')")
            }
            source = .ffi(f)
        } else {
            throw VQMoEError(.registry, "\(origin): needs \"library\" (a plugin .so) or \"ffi\" (a plain C function)")
        }
        var pin: String?
        if let raw = obj["sha256"] {
            guard let text = raw as? String, text.count == 64, text.allSatisfy(\.isHexDigit) else {
                throw VQMoEError(
                    .registry, "\(origin).sha256: expected a string of 64 hex digits, got \(describeJSON(raw))")
            }
            guard case .library = source else {
                throw VQMoEError(.registry, "\(origin).sha256: pins a plugin \"library\"; an \"ffi\" entry has none")
            }
            pin = text.lowercased()
        }
        return Entry(name: name, kind: kind, source: source, sha256: pin, defaults: defaults, origin: origin)
    }

    /// A plugin folder: its registry.json, then each library in it that no entry names. A library
    /// that is not a vqmoe plugin (or fails to load) is skipped with a warning naming it.
    private func scan(directory: String) throws -> [Entry] {
        guard let files = try? FileManager.default.contentsOfDirectory(atPath: directory) else {
            throw VQMoEError(.registry, "VQMOE_PLUGIN_PATH: \(directory) is not a readable directory")
        }
        let local = URL(fileURLWithPath: directory).appendingPathComponent("registry.json").path
        var out = FileManager.default.fileExists(atPath: local) ? try readRegistry(local) : []
        let named = out.map { e -> String in
            switch e.source {
            case .library(let path): return path
            case .ffi(let f): return f.library
            }
        }
        for file in files.sorted() where file.hasSuffix(".so") || file.hasSuffix(".dylib") {
            let path = URL(fileURLWithPath: directory).appendingPathComponent(file).path
            guard !named.contains(where: { Registry.same($0, path) }) else { continue }
            do {
                let lib = try PluginLibrary.open(path)
                out.append(
                    Entry(
                        name: lib.name, kind: lib.kind, source: .library(path: path), sha256: nil, defaults: [:],
                        origin: path))
            } catch let e as VQMoEError {
                warnings.append("VQMOE_PLUGIN_PATH: skipping \(path): \(e.message)")
            }
        }
        return out
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
        // The bytes checked are the bytes loaded (PluginLibrary loads this copy), once per library.
        let check: (() throws -> [UInt8])? = e.sha256.map { pin in
            {
                guard let data = FileManager.default.contents(atPath: path) else {
                    throw VQMoEError(.registry, "\(path): cannot read the pinned library of '\(e.name)' (\(e.origin))")
                }
                let bytes = [UInt8](data), actual = SHA256.hex(of: bytes)
                guard actual == pin else {
                    throw VQMoEError(
                        .registry,
                        "\(path): sha256 mismatch for '\(e.name)' (\(e.origin)): pinned \(pin), file has "
                            + "\(actual); refusing to load it"
                    )
                }
                return bytes
            }
        }
        let lib = try PluginLibrary.open(path, pin: e.sha256, bytes: check)
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
