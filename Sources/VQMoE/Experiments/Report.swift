import Foundation

/// `vqmoe report RUN_DIR... [--out DIR]`: `report.md` and SVG plots from runs' metrics —
/// loss / BPC (or accuracy) curves, consistency of routing on the probe batch, expert load over
/// time, code usage, routing-parameter movement, and a PCA of the expert inputs coloured by the
/// expert each token went to (the paper's representation-collapse figure).
///
/// ```swift
/// let files = try Report(runs: ["runs/main/smoe", "runs/main/vqmoe"], outDir: "runs/report").write()
/// ```
public struct Report {
    public let runs: [String]
    public let outDir: String

    public init(runs: [String], outDir: String) {
        self.runs = runs
        self.outDir = outDir
    }

    /// One run's records.
    struct Run {
        var dir: String
        var name: String
        var lines: [[String: Any]]
        var result: [String: Any]
        var isLM: Bool
        func split(_ s: String) -> [[String: Any]] { lines.filter { $0["split"] as? String == s } }
    }

    func load(_ dir: String) throws -> Run {
        guard let text = try? String(contentsOfFile: "\(dir)/metrics.jsonl", encoding: .utf8) else {
            throw VQMoEError(.io, "\(dir)/metrics.jsonl: missing (is \(dir) a run directory of `vqmoe train`?)")
        }
        let lines = text.split(separator: "\n").compactMap {
            try? JSONSerialization.jsonObject(with: Data($0.utf8)) as? [String: Any]
        }
        let result =
            (FileManager.default.contents(atPath: "\(dir)/result.json")).flatMap {
                try? JSONSerialization.jsonObject(with: $0) as? [String: Any]
            } ?? [:]
        let name = result["name"] as? String ?? URL(fileURLWithPath: dir).lastPathComponent
        let isLM = lines.contains { $0["split"] as? String == "valid" && $0["bpc"] != nil }
        return Run(dir: dir, name: name, lines: lines, result: result, isLM: isLM)
    }

    static func num(_ v: Any?) -> Double? { (v as? NSNumber)?.doubleValue ?? (v as? Double) }
    static func mean(_ v: Any?) -> Double? {
        guard let a = v as? [Any], !a.isEmpty else { return nil }
        let xs = a.compactMap(num)
        return xs.isEmpty ? nil : xs.reduce(0, +) / Double(xs.count)
    }

    /// Perplexity of a count vector.
    static func perplexity(_ counts: [Double]) -> Double {
        let total = counts.reduce(0, +)
        guard total > 0 else { return 0 }
        var h = 0.0
        for c in counts where c > 0 { let p = c / total; h -= p * log(p) }
        return exp(h)
    }

    /// Top-2 principal components of rows (M,d) by power iteration with deflation.
    public static func pca2(_ rows: [[Double]]) -> [[Double]] {
        guard let d = rows.first?.count, rows.count > 2, d > 1 else { return rows.map { _ in [0, 0] } }
        let m = Double(rows.count)
        let mean = (0..<d).map { j in rows.reduce(0) { $0 + $1[j] } / m }
        let x = rows.map { r in (0..<d).map { r[$0] - mean[$0] } }
        var cov = [Double](repeating: 0, count: d * d)
        for r in x { for i in 0..<d where r[i] != 0 { for j in 0..<d { cov[i * d + j] += r[i] * r[j] } } }
        var comps: [[Double]] = []
        for c in 0..<2 {
            var v = (0..<d).map { Double(($0 * 7 + c * 3) % 11) - 5 }
            for _ in 0..<200 {
                var w = (0..<d).map { i in (0..<d).reduce(0) { $0 + cov[i * d + $1] * v[$1] } }
                for p in comps {
                    let dot = zip(w, p).reduce(0) { $0 + $1.0 * $1.1 }; w = zip(w, p).map { $0 - dot * $1 }
                }
                let norm = w.reduce(0) { $0 + $1 * $1 }.squareRoot()
                guard norm > 0 else { break }
                v = w.map { $0 / norm }
            }
            comps.append(v)
        }
        return x.map { r in comps.map { p in zip(r, p).reduce(0) { $0 + $1.0 * $1.1 } } }
    }

    /// Legend names: the runs' names without what they all share at the start and at the end
    /// (cut at '_', '[', ',' or ']'), e.g. table1_smoe[backbone=x,seed=1] and
    /// table1_xmoe[backbone=x,seed=1] become smoe and xmoe. One run keeps its whole name.
    public static func shortNames(_ names: [String]) -> [String] {
        guard names.count > 1, Set(names).count == names.count else { return names }
        let cuts: Set<Character> = ["_", "[", ",", "]"]
        let chars = names.map(Array.init)
        var prefix = 0
        while chars.allSatisfy({ prefix < $0.count }) && Set(chars.map { $0[prefix] }).count == 1 { prefix += 1 }
        while prefix > 0 && !cuts.contains(chars[0][prefix - 1]) { prefix -= 1 }
        var suffix = 0
        while chars.allSatisfy({ suffix < $0.count - prefix })
            && Set(chars.map { $0[$0.count - 1 - suffix] }).count == 1
        { suffix += 1 }
        while suffix > 0 && !cuts.contains(chars[0][chars[0].count - suffix]) { suffix -= 1 }
        let short = chars.map { String($0[prefix..<($0.count - suffix)]) }
        return short.contains(where: \.isEmpty) || Set(short).count != short.count ? names : short
    }

    /// Write the SVGs and report.md; returns the files written.
    @discardableResult
    public func write() throws -> [String] {
        try FileManager.default.createDirectory(atPath: outDir, withIntermediateDirectories: true)
        var data = try runs.map(load)
        for (i, name) in Report.shortNames(data.map(\.name)).enumerated() { data[i].name = name }
        var doc = Document(outDir: outDir)
        doc.md += ["# Report", "", "Runs: " + data.map { "`\($0.dir)`" }.joined(separator: ", "), ""]
        doc.md += Report.resultsTable(data) + [""]
        try Report.curves(data, into: &doc)
        try Report.consistency(data, into: &doc)
        try Report.movement(data, into: &doc)
        for (i, r) in data.enumerated() {
            try Report.expertLoad(r, index: i, into: &doc)
            try Report.codeUsage(r, index: i, into: &doc)
            try Report.pca(r, index: i, into: &doc)
        }
        try doc.md.joined(separator: "\n").write(toFile: "\(outDir)/report.md", atomically: true, encoding: .utf8)
        return doc.files + ["\(outDir)/report.md"]
    }

    /// report.md's lines and the plots written so far.
    struct Document {
        let outDir: String
        var md: [String] = []
        var files: [String] = []

        /// Write a plot and link it from report.md with its caption.
        mutating func save(_ name: String, _ plot: SVGPlot, _ caption: String) throws {
            try plot.render().write(toFile: "\(outDir)/\(name)", atomically: true, encoding: .utf8)
            files.append("\(outDir)/\(name)")
            md += ["![\(caption)](\(name))", "", caption, ""]
        }
    }

    /// The runs' results: parameters, valid and test metric, steps, wall time.
    static func resultsTable(_ data: [Run]) -> [String] {
        var md = [
            "| run | ffn | params | valid | test | min code ppl / K | steps | wall s |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in data {
            let key = r.isLM ? "bpc" : "accuracy"
            func f(_ k: String) -> String { num(r.result[k]).map { String(format: "%.4f", $0) } ?? "-" }
            let params = (r.result["params_total"] as? Int).map { String(format: "%.2fM", Double($0) / 1e6) } ?? "-"
            let wall = num(r.result["wall_s"]).map { String(format: "%.0f", $0) } ?? "-"
            md.append(
                "| \(r.name) | \(r.result["ffn"] as? String ?? "-") | \(params) | \(f("valid_\(key)")) \(key) | "
                    + "\(f("test_\(key)")) \(key) | \(ResultsTable.codePerplexity(r.result)) | "
                    + "\(r.result["steps"] as? Int ?? 0) | \(wall) |")
        }
        return md
    }

    /// Training loss and validation metric per logged step.
    static func curves(_ data: [Run], into doc: inout Document) throws {
        let lm = data.allSatisfy(\.isLM)
        var train = SVGPlot(title: "training loss", xLabel: "step", yLabel: "task loss (nats)")
        var valid = SVGPlot(
            title: lm ? "validation bits per character" : "validation", xLabel: "step",
            yLabel: lm ? "BPC" : "accuracy / BPC")
        for r in data {
            let t = r.split("train"), v = r.split("valid")
            train.line(r.name, xs: t.compactMap { num($0["step"]) }, ys: t.compactMap { num($0["task_loss"]) })
            valid.line(
                r.name, xs: v.compactMap { num($0["step"]) }, ys: v.compactMap { num($0[r.isLM ? "bpc" : "accuracy"]) })
        }
        try doc.save("curves_train.svg", train, "Training loss (task cross-entropy) per logged step.")
        try doc.save(
            "curves_valid.svg", valid,
            "Validation metric at each evaluation (BPC for language models, accuracy for classifiers).")
    }

    /// (step, mean over layers) of a per-layer probe field, where present.
    static func probeSeries(_ r: Run, _ key: String) -> (xs: [Double], ys: [Double]) {
        let pts = r.split("probe").compactMap { l -> (Double, Double)? in
            guard let s = num(l["step"]), let m = mean(l[key]) else { return nil }
            return (s, m)
        }
        return (pts.map(\.0), pts.map(\.1))
    }

    /// Consistency of the routing on the probe batch, per path.
    static func consistency(_ data: [Run], into doc: inout Document) throws {
        var plot = SVGPlot(
            title: "routing consistency on the probe batch", xLabel: "step",
            yLabel: "fraction of tokens keeping their top-1 expert")
        plot.yRange = (0, 1)
        var any = false
        for r in data {
            let collapsed = collapsedAt(r)
            for (key, label) in [("consistency_router", "router"), ("consistency_discrete", "discrete")] {
                let s = probeSeries(r, key)
                let mark = label == "discrete" && collapsed != nil ? " †" : ""  // † a collapsed codebook
                if !s.xs.isEmpty { plot.line("\(r.name) \(label)\(mark)", xs: s.xs, ys: s.ys); any = true }
            }
        }
        guard any else { return }
        try doc.save(
            "consistency.svg", plot,
            "Consistency score: the fraction of probe tokens whose top-1 expert is unchanged since the "
                + "previous evaluation (mean over layers; the complement of StableMoE's routing fluctuation)."
                + (data.contains { collapsedAt($0) != nil }
                    ? " † the discrete path's codebook collapsed: not meaningful." : "")
        )
        for r in data {
            guard let (step, p, k) = collapsedAt(r) else { continue }
            doc.md += [
                String(
                    format:
                        "**%@: the discrete path's consistency is not meaningful**: its codebook collapsed (code "
                        + "perplexity %.2f of K = %d at the last evaluation, step %d), so nearly every token keeps the "
                        + "same code and expert whatever the model learns.",
                    r.name, p, k, step),
                "",
            ]
        }
    }

    /// (step, lowest code perplexity, K) of a run's last validation when below the default
    /// collapse threshold; nil when healthy or without codes.
    static func collapsedAt(_ r: Run) -> (Int, Double, Int)? {
        guard let v = r.split("valid").last, let ppl = v["code_perplexity"] as? [[Any]],
            let used = v["codes_used"] as? [[Any]], let dead = v["dead_codes"] as? [[Any]]
        else { return nil }
        let p = ppl.joined().compactMap(num),
            k = zip(used.joined(), dead.joined()).compactMap { u, d in
                (num(u) ?? 0) + (num(d) ?? 0)
            }
        guard let worst = p.min(), let size = k.first, worst < CodeHealth.defaultThreshold(k: Int(size)) else {
            return nil
        }
        return ((v["step"] as? Int ?? 0) + 1, worst, Int(size))
    }

    /// Movement of the router and codebook parameters between evaluations.
    static func movement(_ data: [Run], into doc: inout Document) throws {
        var plot = SVGPlot(
            title: "routing parameter movement", xLabel: "step", yLabel: "‖Δ‖ / ‖before‖ since the previous evaluation")
        var any = false
        for r in data {
            for key in ["movement_router", "movement_codebook"] {
                let s = probeSeries(r, key)
                if !s.xs.isEmpty { plot.line("\(r.name) \(key.dropFirst(9))", xs: s.xs, ys: s.ys); any = true }
            }
        }
        guard any else { return }
        try doc.save(
            "movement.svg", plot,
            "Relative change of the router and codebook parameters between evaluations (mean over layers).")
    }

    /// Share of layer 0's assignments per expert over training.
    static func expertLoad(_ r: Run, index i: Int, into doc: inout Document) throws {
        let t = r.split("train")
        guard let loads = t.last?["expert_load"] as? [[Any]], let first = loads.first, first.count > 1 else { return }
        var plot = SVGPlot(title: "\(r.name): expert load, layer 0", xLabel: "step", yLabel: "share of assignments")
        for e in 0..<first.count {
            let pts = t.compactMap { l -> (Double, Double)? in
                guard let s = num(l["step"]), let ls = l["expert_load"] as? [[Any]],
                    let row = ls.first?.compactMap(num),
                    e < row.count
                else { return nil }
                let total = row.reduce(0, +)
                return (s, total > 0 ? row[e] / total : 0)
            }
            plot.line("expert \(e)", xs: pts.map(\.0), ys: pts.map(\.1))
        }
        try doc.save(
            "expert_load_\(i).svg", plot,
            "\(r.name): share of layer 0's assignments each expert received, over training.")
    }

    /// Code counts of the last logged batch, and the perplexity of code use over training.
    static func codeUsage(_ r: Run, index i: Int, into doc: inout Document) throws {
        let t = r.split("train")
        guard let counts = t.last?["code_counts"] as? [[Any]], !counts.isEmpty else { return }
        var usage = SVGPlot(title: "\(r.name): code usage, last logged batch", xLabel: "code", yLabel: "uses")
        let k = counts[0].count
        for (l, row) in counts.enumerated() {
            usage.bars("layer \(l)", labels: (0..<k).map(String.init), values: row.compactMap(num))
        }
        try doc.save(
            "code_usage_\(i).svg", usage,
            "\(r.name): how often each code was chosen per layer (dead codes have no bar).")
        var ppl = SVGPlot(title: "\(r.name): code usage perplexity", xLabel: "step", yLabel: "exp(entropy of code use)")
        for l in 0..<counts.count {
            let pts = t.compactMap { line -> (Double, Double)? in
                guard let s = num(line["step"]), let c = line["code_counts"] as? [[Any]], l < c.count else {
                    return nil
                }
                return (s, perplexity(c[l].compactMap(num)))
            }
            ppl.line("layer \(l)", xs: pts.map(\.0), ys: pts.map(\.1))
        }
        try doc.save(
            "code_perplexity_\(i).svg", ppl,
            "\(r.name): perplexity of code use per layer (K means every code equally used).")
    }

    /// PCA of the last representation dump, first and last layer, coloured by top-1 expert.
    static func pca(_ r: Run, index i: Int, into doc: inout Document) throws {
        let dir = "\(r.dir)/repr"
        func step(_ f: String) -> Int { Int(f.dropFirst(5).dropLast(5)) ?? 0 }
        guard let names = try? FileManager.default.contentsOfDirectory(atPath: dir),
            let last = names.filter({ $0.hasPrefix("step_") }).max(by: { step($0) < step($1) }),
            let d = FileManager.default.contents(atPath: "\(dir)/\(last)"),
            let obj = try JSONSerialization.jsonObject(with: d) as? [String: Any],
            let layers = obj["layers"] as? [[String: Any]]
        else { return }
        for l in Set([0, layers.count - 1]).sorted() where l < layers.count {
            guard let x = layers[l]["x"] as? [[Any]], let ex = layers[l]["expert"] as? [Any] else { continue }
            let pc = pca2(x.map { $0.compactMap(num) })
            var scatter = SVGPlot(title: "\(r.name): expert inputs, layer \(l) (PCA)", xLabel: "PC 1", yLabel: "PC 2")
            let experts = ex.compactMap(num).map(Int.init)
            for e in Set(experts).sorted() {
                let idx = experts.indices.filter { experts[$0] == e && $0 < pc.count }
                scatter.points("expert \(e)", xs: idx.map { pc[$0][0] }, ys: idx.map { pc[$0][1] }, colorIndex: e)
            }
            try doc.save(
                "pca_\(i)_layer\(l).svg", scatter,
                "\(r.name): the inputs of layer \(l)'s experts (probe tokens, \(last)) projected on their top "
                    + "two principal components, coloured by the top-1 expert. Overlapping clouds are the "
                    + "representation collapse the paper describes."
            )
        }
    }
}
