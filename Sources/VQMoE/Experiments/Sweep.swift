import Foundation

/// `vqmoe sweep CONFIG`: a grid of runs from one config. The config is a run config plus
///
/// ```json
/// "sweep": {"grid": {"model.ffn.quantizer.name": ["vqvae", "lfq"], "model.ffn.beta": [0.01, 0.1]},
///           "seeds": [1, 2, 3], "parallel": 1, "out": "runs/sweeps/quantizers"}
/// ```
///
/// Settings that must change together go in named variants, one axis per name; every axis
/// picks one variant (in list order), crossed with the grid:
///
/// ```json
/// "variants": {"data": [{"name": "enwik8", "set": {"data.path": "$DATA/enwik8-mini/enwik8-mini"}},
///                       {"name": "text8", "set": {"data.clean": "text8", "data.compact_vocab": true}}],
///              "backbone": [{"name": "transformer", "set": {}},
///                           {"name": "xl", "set": {"model.backbone": "transformer_xl", "data.order": "streams"}}]}
/// ```
///
/// Every combination (× seeds) becomes `vqmoe train` with those `--set` overrides (variants
/// first, then the grid) in OUT/<name>, run sequentially or `parallel` at a time as separate
/// processes; runs whose `result.json` exists are skipped. The results — one row per
/// combination, mean ± std over seeds — go to OUT/results.md and OUT/results.csv.
///
/// A config with a `finetune` object runs `vqmoe finetune` instead; `{seed}` in
/// `finetune.from` becomes the run's seed, so each seed fine-tunes its own pre-trained run:
/// `"from": "runs/pretrain/seed={seed}"`.
public struct Sweep {
    public struct Run {
        public var name: String
        public var overrides: [(key: String, value: Any)]
        public var group: String
        public var dir: String
    }

    /// A named set of overrides on one variant axis.
    public struct Variant {
        public var name: String
        public var overrides: [(key: String, value: Any)]
    }

    public let base: [String: Any]
    /// Variant axes (sorted by name), each a list of variants in the config's order.
    public let axes: [(name: String, variants: [Variant])]
    public let keys: [String]
    public let values: [[Any]]
    public let seeds: [Int]
    public let parallel: Int
    public let outDir: String

    public init(configFile: String, overrides: [String: Any] = [:], registry: Registry? = nil) throws {
        var json = try ConfigReader.load(file: configFile, overrides: overrides)
        guard let sweep = json.removeValue(forKey: "sweep") as? [String: Any] else {
            throw VQMoEError(
                .config, "\(configFile): a sweep config needs a \"sweep\" object with a \"grid\" and/or \"variants\"")
        }
        let r = ConfigReader(sweep, path: "sweep")
        var axes: [(name: String, variants: [Variant])] = []
        if let v = sweep["variants"] {
            guard let obj = v as? [String: Any] else {
                throw VQMoEError(.config, "sweep.variants: expected an object of axes")
            }
            for axis in obj.keys.sorted() {
                guard let list = obj[axis] as? [Any], !list.isEmpty else {
                    throw VQMoEError(
                        .config, "sweep.variants.\(axis): expected a non-empty list of {\"name\": ..., \"set\": {...}}")
                }
                let variants = try list.enumerated().map { i, item -> Variant in
                    let path = "sweep.variants.\(axis)[\(i)]"
                    guard let o = item as? [String: Any], let name = o["name"] as? String, !name.isEmpty,
                        let set = o["set"] as? [String: Any] ?? (o["set"] == nil ? [:] : nil)
                    else {
                        throw VQMoEError(
                            .config, "\(path): expected {\"name\": \"...\", \"set\": {\"key.path\": value, ...}}")
                    }
                    if let extra = o.keys.first(where: { $0 != "name" && $0 != "set" }) {
                        throw VQMoEError(.config, "\(path).\(extra): unknown key; known: name, set")
                    }
                    return Variant(name: name, overrides: set.keys.sorted().map { (key: $0, value: set[$0]!) })
                }
                let names = variants.map(\.name)
                if let dup = names.first(where: { n in names.filter { $0 == n }.count > 1 }) {
                    throw VQMoEError(.config, "sweep.variants.\(axis): variant name '\(dup)' appears twice")
                }
                axes.append((axis, variants))
            }
            r.accept(["variants"])
        }
        self.axes = axes
        let grid = try r.child("grid")
        keys = grid.object.keys.sorted()
        values = try keys.map { k in
            guard let list = grid.object[k] as? [Any], !list.isEmpty else {
                throw VQMoEError(.config, "sweep.grid.\(k): expected a non-empty list of values")
            }
            return list
        }
        grid.accept(keys)
        seeds = try (sweep["seeds"] as? [Any] ?? [json["seed"] ?? 1]).map {
            guard let n = jsonNumber($0), n == n.rounded() else {
                throw VQMoEError(.config, "sweep.seeds: expected integers")
            }
            return Int(n)
        }
        r.accept(["seeds"])
        parallel = try r.int("parallel", default: 1, min: 1, max: 64)
        let name = json["name"] as? String ?? "sweep"
        outDir = try r.string("out", default: "runs/sweeps/\(name)")
        try r.finish()
        base = json
        // Every combination must make a valid run config (unknown keys and bad values fail now).
        for run in runs() {
            let cfg = try RunConfig(json: try apply(run))
            if let registry { try ModelBuilder(config: cfg, registry: registry).validate() }
        }
    }

    /// The cartesian product of the variant axes × the grid × seeds.
    public func runs() -> [Run] {
        // (group label, overrides) per combination: variants first, then grid values.
        var combos: [([String], [(key: String, value: Any)])] = [([], [])]
        for axis in axes {
            combos = combos.flatMap { c in
                axis.variants.map { v in (c.0 + ["\(axis.name)=\(v.name)"], c.1 + v.overrides) }
            }
        }
        for (k, vs) in zip(keys, values) {
            let label = k.split(separator: ".").last!
            combos = combos.flatMap { c in
                vs.map {
                    (
                        c.0 + ["\(label)=\(describeJSON($0).replacingOccurrences(of: "\"", with: ""))"],
                        c.1 + [(key: k, value: $0)]
                    )
                }
            }
        }
        return combos.flatMap { labels, overrides -> [Run] in
            let group = labels.joined(separator: ",")
            return seeds.map { seed in
                let name = (group.isEmpty ? "" : group + ",") + "seed=\(seed)"
                return Run(
                    name: name, overrides: overrides + [(key: "seed", value: seed)], group: group,
                    dir: "\(outDir)/\(name.replacingOccurrences(of: "/", with: "_"))")
            }
        }
    }

    func apply(_ run: Run) throws -> [String: Any] {
        var json = base
        for (k, v) in run.overrides {
            try ConfigReader.set(&json, path: k.split(separator: ".").map(String.init), value: v, full: k)
        }
        json["name"] = "\(base["name"] as? String ?? "run")[\(run.name)]"
        if var ft = json["finetune"] as? [String: Any], let from = ft["from"] as? String, from.contains("{seed}"),
            let seed = run.overrides.last(where: { $0.key == "seed" })?.value
        {
            ft["from"] = from.replacingOccurrences(of: "{seed}", with: describeJSON(seed))
            json["finetune"] = ft
        }
        return json
    }

    /// Run every missing combination with `vqmoe` (the executable at `executable`), then write
    /// the results tables. Returns the markdown table.
    public func execute(executable: String, registries: [String] = [], log: (String) -> Void) throws -> String {
        try FileManager.default.createDirectory(atPath: outDir, withIntermediateDirectories: true)
        let all = runs()
        let todo = all.filter { !FileManager.default.fileExists(atPath: "\($0.dir)/result.json") }
        log(
            "sweep: \(all.count) runs, \(all.count - todo.count) already finished, \(todo.count) to run, "
                + "\(parallel) at a time, in \(outDir)"
        )
        var pending = todo[...]
        var active: [(Run, Process)] = []
        var failed: [String] = []
        while !pending.isEmpty || !active.isEmpty {
            while active.count < parallel, let run = pending.popFirst() {
                try FileManager.default.createDirectory(atPath: run.dir, withIntermediateDirectories: true)
                let cfgPath = "\(run.dir)/config.input.json"
                try JSONSerialization.data(withJSONObject: try apply(run), options: [.prettyPrinted, .sortedKeys])
                    .write(to: URL(fileURLWithPath: cfgPath))
                let p = Process()
                p.executableURL = URL(fileURLWithPath: executable)
                // An unfinished earlier attempt: continue it from its `last` checkpoint when
                // there is one, else start it over (--force removes its partial files).
                let resumable =
                    base["finetune"] == nil && FileManager.default.fileExists(atPath: "\(run.dir)/last.json")
                p.arguments =
                    registries.flatMap { ["--registry", $0] }
                    + (resumable
                        ? ["train", "--resume", run.dir]
                        : [base["finetune"] == nil ? "train" : "finetune", cfgPath, "--out", run.dir, "--force"])
                _ = FileManager.default.createFile(atPath: "\(run.dir)/train.log", contents: nil)
                let logHandle = FileHandle(forWritingAtPath: "\(run.dir)/train.log")
                p.standardOutput = logHandle
                p.standardError = logHandle
                try p.run()
                log("started \(run.name)")
                active.append((run, p))
            }
            Thread.sleep(forTimeInterval: 0.2)
            active.removeAll { run, p in
                guard !p.isRunning else { return false }
                if p.terminationStatus == 0 {
                    log("finished \(run.name)")
                } else {
                    failed.append(run.name)
                    log("FAILED \(run.name) (exit \(p.terminationStatus)); see \(run.dir)/train.log")
                }
                return true
            }
        }
        let (md, csv) = try results()
        try md.write(toFile: "\(outDir)/results.md", atomically: true, encoding: .utf8)
        try csv.write(toFile: "\(outDir)/results.csv", atomically: true, encoding: .utf8)
        if !failed.isEmpty {
            throw VQMoEError(.internalError, "sweep: \(failed.count) runs failed: \(failed.joined(separator: "; "))")
        }
        return md
    }

    /// One row per combination: mean ± std over seeds of test/valid BPC (or accuracy), tokens/s
    /// and, for VQMoE runs, the lowest code perplexity over layers (`code_perplexity_min`); params.
    public func results() throws -> (markdown: String, csv: String) {
        var groups: [(String, [[String: Any]])] = []
        for run in runs() {
            guard let data = FileManager.default.contents(atPath: "\(run.dir)/result.json"),
                let r = try JSONSerialization.jsonObject(with: data) as? [String: Any]
            else { continue }
            if let i = groups.firstIndex(where: { $0.0 == run.group }) {
                groups[i].1.append(r)
            } else {
                groups.append((run.group, [r]))
            }
        }
        // BPC for language models, accuracy for classifiers: the columns some run has.
        let metrics = [
            "test_bpc", "valid_bpc", "test_accuracy", "valid_accuracy", "tokens_per_s", "code_perplexity_min",
        ].filter { k in
            groups.contains { $0.1.contains { $0[k] != nil } }
        }
        func stats(_ rs: [[String: Any]], _ k: String) -> (Double, Double)? {
            let xs = rs.compactMap { $0[k] as? Double }
            guard !xs.isEmpty else { return nil }
            let m = xs.reduce(0, +) / Double(xs.count)
            let sd =
                xs.count > 1 ? (xs.map { ($0 - m) * ($0 - m) }.reduce(0, +) / Double(xs.count - 1)).squareRoot() : 0
            return (m, sd)
        }
        let header = ["run"] + metrics + ["params", "seeds"]
        var md = [
            "| " + header.joined(separator: " | ") + " |", "|" + header.map { _ in "---" }.joined(separator: "|") + "|",
        ]
        var csv = [
            (["run"] + metrics.flatMap { [$0 + "_mean", $0 + "_std"] } + ["params", "seeds"]).joined(separator: ",")
        ]
        for (g, rs) in groups {
            let params = (rs.first?["params_total"] as? Int).map { String(format: "%.2fM", Double($0) / 1e6) } ?? "-"
            var cells: [String] = [g.isEmpty ? "(base)" : g]
            var csvCells: [String] = ["\"\(g)\""]
            for k in metrics {
                let format =
                    k == "tokens_per_s" ? "%.0f ± %.0f" : k == "code_perplexity_min" ? "%.2f ± %.2f" : "%.4f ± %.4f"
                if let (m, sd) = stats(rs, k) {
                    cells.append(String(format: format, m, sd))
                    csvCells += [String(m), String(sd)]
                } else {
                    cells.append("-")
                    csvCells += ["", ""]
                }
            }
            cells += [params, String(rs.count)]
            csvCells += [String(rs.first?["params_total"] as? Int ?? 0), String(rs.count)]
            md.append("| " + cells.joined(separator: " | ") + " |")
            csv.append(csvCells.joined(separator: ","))
        }
        return (md.joined(separator: "\n") + "\n", csv.joined(separator: "\n") + "\n")
    }
}
