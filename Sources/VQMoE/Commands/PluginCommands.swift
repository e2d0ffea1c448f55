import Foundation

/// The `vqmoe plugins …` and `vqmoe plugin new` commands, as library functions that return
/// their text (the CLI prints it; tests read it).
///
/// ```swift
/// let reg = try Registry.load()
/// print(try PluginCommands.list(reg, json: false).text)
/// ```
public enum PluginCommands {
    /// Output of a command and whether it succeeded.
    public struct Output: Sendable {
        public var text: String
        public var ok: Bool
    }

    /// One row of `plugins list`.
    public struct Row: Sendable {
        public var kind: String, name: String, version: String, library: String, abi: String, source: String
        public var description: String
        /// The registry entry (or plugin-path library) that declared it.
        public var origin = ""
        public var error: String?
    }

    /// Load every entry (libraries and ffi functions) and describe it; load errors become rows.
    public static func rows(_ reg: Registry) -> [Row] {
        reg.entries.map { e in
            var row = row(reg, e)
            row.origin = e.origin
            return row
        }
    }

    private static func row(_ reg: Registry, _ e: Registry.Entry) -> Row {
        switch e.source {
        case .library(let path):
            do {
                let lib = try reg.library(for: e)
                return Row(
                    kind: e.kind.rawValue, name: e.name, version: lib.version, library: path,
                    abi: abiString(lib.abiVersion), source: "plugin", description: lib.summary)
            } catch {
                return Row(
                    kind: e.kind.rawValue, name: e.name, version: "-", library: path, abi: "-", source: "plugin",
                    description: "", error: "\(error)")
            }
        case .ffi(let f):
            var row = Row(
                kind: e.kind.rawValue, name: e.name, version: "ffi", library: f.library, abi: "ffi", source: "ffi",
                description: "C function \(f.symbol): \(f.signatureText)")
            do { _ = try reg.library(for: e) } catch { row.error = "\(error)" }
            return row
        }
    }

    public static func list(_ reg: Registry, json: Bool) throws -> Output {
        let rows = rows(reg).sorted { ($0.kind, $0.name) < ($1.kind, $1.name) }
        let ok = rows.allSatisfy { $0.error == nil }
        if json {
            let objects: [[String: Any]] = rows.map { r in
                var o: [String: Any] = [
                    "kind": r.kind, "name": r.name, "version": r.version, "library": r.library,
                    "abi": r.abi, "source": r.source, "description": r.description, "origin": r.origin,
                ]
                if let e = r.error { o["error"] = e }
                return o
            }
            let data = try JSONSerialization.data(withJSONObject: objects, options: [.prettyPrinted, .sortedKeys])
            return Output(text: String(decoding: data, as: UTF8.self), ok: ok)
        }
        let header = ["KIND", "NAME", "VERSION", "ABI", "LIBRARY", "ORIGIN"]
        let table = rows.map { [$0.kind, $0.name, $0.version, $0.abi, $0.library, $0.origin] }
        var text = formatTable(header: header, rows: table)
        for r in rows { if let e = r.error { text += "\nerror: \(r.name): \(e)" } }
        if rows.isEmpty { text += "\n(no plugins registered: see registry.json and VQMOE_PLUGIN_PATH)" }
        return Output(text: text, ok: ok)
    }

    /// Description, flags and the hyperparameter schema (registry defaults shown where they
    /// override the plugin's).
    public static func inspect(_ reg: Registry, name: String) throws -> Output {
        let e = try reg.entry(named: name)
        let lib = try reg.library(for: e)
        var lines: [String]
        switch e.source {
        case .ffi(let f):
            let what =
                e.kind == .router
                ? "the function's expert (and the next k-1), non-trainable (no parameters, no gradient)"
                : "one code per token, K = the model's n_codes, quantized = x (straight-through), no parameters, loss 0"
            lines = [
                "\(e.name) (\(e.kind.rawValue), libffi bridge)", "  library:    \(f.library)",
                "  symbol:     \(f.symbol)",
                "  signature:  \(f.signatureText)", "  token ids:  \(lib.needsTokenIDs ? "required" : "not used")",
                "  behaviour:  \(what)",
            ]
        case .library(let path):
            lines = [
                "\(lib.name) (\(lib.kind.rawValue)) \(lib.version)", "  \(lib.summary)", "  library:  \(path)",
                "  abi:      \(abiString(lib.abiVersion))",
            ]
            var flags: [String] = []
            if lib.needsTokenIDs { flags.append("needs token ids") }
            if lib.hasNoGrad { flags.append("no backward") }
            if !flags.isEmpty { lines.append("  flags:    " + flags.joined(separator: ", ")) }
        }
        lines.append("")
        if lib.schema.isEmpty {
            lines.append("  (no hyperparameters)")
        } else {
            lines.append("  hyperparameters:")
            let rows = lib.schema.map { s -> [String] in
                let override = e.defaults[s.name].map { "\(HyperparameterSpec.text($0.value)) (registry)" }
                return [s.name, s.type.rawValue, override ?? s.defaultText, s.rangeText, s.description]
            }
            lines.append(
                formatTable(header: ["NAME", "TYPE", "DEFAULT", "RANGE", "DESCRIPTION"], rows: rows, indent: "    "))
        }
        return Output(text: lines.joined(separator: "\n"), ok: true)
    }

    /// `plugins docs`: markdown for every registered component, generated from the descriptors
    /// and schemas (the README's plugin section is this text, so it cannot drift).
    public static func docs(_ reg: Registry) throws -> Output {
        var lines: [String] = []
        for kind in PluginKind.allCases {
            let entries = reg.entries.filter { $0.kind == kind }.sorted { $0.name < $1.name }
            guard !entries.isEmpty else { continue }
            lines.append("### \(kind.rawValue.prefix(1).uppercased() + kind.rawValue.dropFirst())s")
            lines.append("")
            for e in entries {
                let lib = try reg.library(for: e)
                switch e.source {
                case .ffi(let f):
                    let what =
                        e.kind == .router
                        ? "the function's expert and, with k > 1, the next k-1 (weights 1/k); not trainable"
                        : "one code per token in [0, n_codes), quantized = x, not trainable"
                    lines.append(
                        "**`\(e.name)`** (libffi bridge) — C function `\(f.symbol)`: `\(f.signatureText)`; \(what).")
                case .library:
                    lines.append("**`\(lib.name)`** \(lib.version) — \(lib.summary)")
                }
                lines.append("")
                if !lib.schema.isEmpty {
                    lines.append("| hyperparameter | type | default | range | description |")
                    lines.append("|---|---|---|---|---|")
                    for h in lib.schema {
                        let def = e.defaults[h.name].map { HyperparameterSpec.text($0.value) } ?? h.defaultText
                        lines.append(
                            "| `\(h.name)` | \(h.type.rawValue) | `\(def)` | "
                                + "\(h.rangeText.replacingOccurrences(of: "|", with: "/")) | "
                                + "\(h.description.replacingOccurrences(of: "|", with: "/")) |"
                        )
                    }
                    lines.append("")
                }
            }
        }
        return Output(text: lines.joined(separator: "\n"), ok: true)
    }

    /// `plugins check NAME|PATH`: one line per check; ok only if all pass. Settings are
    /// hyperparameters, except `model.KEY` (d_model, n_experts, n_codes, vocab_size, n_classes,
    /// seq_len, total_steps), which sets the model the component is checked in.
    public static func check(_ reg: Registry?, target: String, settings all: [String: Any] = [:]) throws -> Output {
        var results: [CheckResult]
        var title: String
        var dims = PluginChecker.defaultDims, settings = all
        for (key, value) in all where key.hasPrefix("model.") {
            settings[key] = nil
            try dims.set(String(key.dropFirst(6)), value)
        }
        if target.contains("/") || target.hasSuffix(".so") {
            let lib = try PluginLibrary.open(target)
            title = "\(lib.kind.rawValue) '\(lib.name)' from \(target)"
            results = PluginChecker(library: lib, hyperparameters: [settings], dims: dims).run()
        } else {
            guard let reg else { throw VQMoEError(.registry, "no registry to look up '\(target)' in") }
            let e = try reg.entry(named: target)
            let lib = try reg.library(for: e)
            switch e.source {
            case .ffi(let f): title = "\(e.kind.rawValue) '\(e.name)' (libffi bridge: \(f.symbol) in \(f.library))"
            case .library(let path): title = "\(lib.kind.rawValue) '\(lib.name)' from \(path)"
            }
            results = PluginChecker(
                library: lib, hyperparameters: [e.defaults.mapValues(\.value), settings], dims: dims
            ).run()
        }
        let failed = results.filter { !$0.passed }.count
        let text =
            (["checking \(title)"] + results.map(\.description)
            + ["\(results.count - failed) passed, \(failed) failed"]).joined(separator: "\n")
        return Output(text: text, ok: failed == 0)
    }

    /// `plugin new KIND NAME [--lang c|swift] [--dir DIR]`.
    public static func scaffold(
        kind: String, name: String, language: String, directory: String?, root: String
    ) throws -> Output {
        guard let k = PluginKind(name: kind) else {
            throw VQMoEError(
                .usage,
                "unknown kind '\(kind)'; kinds: "
                    + "\(closestFirst(kind, among: PluginKind.allCases.map(\.rawValue)).joined(separator: ", "))"
            )
        }
        guard let lang = ScaffoldLanguage(rawValue: language) else {
            throw VQMoEError(.usage, "unknown language '\(language)'; use c or swift")
        }
        let s = try Scaffold(kind: k, name: name, language: lang, root: root)
        let dir = directory ?? name
        let written = try s.write(to: dir)
        let text =
            (["wrote a \(lang == .c ? "C" : "Swift") \(kind) plugin '\(name)' in \(dir):"] + written.map { "  \($0)" }
            + [
                "",
                "build it:     \(dir)/build.sh",
                "check it:     vqmoe plugins check \(dir)/\(s.libraryFile)",
                "register it:  export VQMOE_PLUGIN_PATH=\(URL(fileURLWithPath: dir).standardizedFileURL.path)  "
                    + " (or add a registry.json entry; see \(dir)/README.md)",
            ]).joined(separator: "\n")
        return Output(text: text, ok: true)
    }
}

/// A plain left-aligned text table.
public func formatTable(header: [String], rows: [[String]], indent: String = "") -> String {
    let all = [header] + rows
    let widths = header.indices.map { c in all.map { $0.indices.contains(c) ? $0[c].count : 0 }.max() ?? 0 }
    return all.map { row in
        indent
            + row.enumerated().map { c, v in
                c == row.count - 1 ? v : v.padding(toLength: widths[c], withPad: " ", startingAt: 0)
            }
            .joined(separator: "  ")
    }.joined(separator: "\n")
}
