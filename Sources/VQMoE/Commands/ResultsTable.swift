import Foundation

/// `vqmoe results RUN_DIR...`: one markdown table row per run, read from each run's
/// `result.json` (written by `vqmoe train`).
///
/// ```swift
/// print(try ResultsTable.markdown(runs: ["runs/main/dense", "runs/main/smoe"]))
/// ```
public enum ResultsTable {
    public static func markdown(runs: [String]) throws -> String {
        var rows: [[String]] = []
        for dir in runs {
            let path = "\(dir)/result.json"
            guard let data = FileManager.default.contents(atPath: path),
                let r = try JSONSerialization.jsonObject(with: data) as? [String: Any]
            else {
                throw VQMoEError(.io, "\(path): missing or unreadable (did `vqmoe train ... --out \(dir)` finish?)")
            }
            func num(_ k: String, _ f: String) -> String { (r[k] as? Double).map { String(format: f, $0) } ?? "-" }
            rows.append([
                r["name"] as? String ?? dir, r["ffn"] as? String ?? "-",
                (r["params_total"] as? Int).map { String(format: "%.2fM", Double($0) / 1e6) } ?? "-",
                num("flops_per_token_forward", "%.2f"), num("valid_bpc", "%.4f"), num("test_bpc", "%.4f"),
                ResultsTable.codePerplexity(r), (r["steps"] as? Int).map(String.init) ?? "-", num("wall_s", "%.0f"),
                num("tokens_per_s", "%.0f"),
            ])
        }
        for i in rows.indices {
            rows[i][3] = rows[i][3] == "-" ? "-" : String(format: "%.2fM", (Double(rows[i][3]) ?? 0) / 1e6)
        }
        let header = [
            "run", "ffn", "params", "fwd FLOPs/token", "valid BPC", "test BPC", "min code ppl / K", "steps", "wall s",
            "tokens/s",
        ]
        var lines = [
            "| " + header.joined(separator: " | ") + " |", "|" + header.map { _ in "---" }.joined(separator: "|") + "|",
        ]
        lines += rows.map { "| " + $0.joined(separator: " | ") + " |" }
        return lines.joined(separator: "\n")
    }

    /// "7.06 / 8" (the best-validation evaluation's lowest code perplexity over layers and
    /// levels, of K), "1.01 / 8 collapsed" below the default threshold, "-" without codes.
    static func codePerplexity(_ r: [String: Any]) -> String {
        guard let p = r["code_perplexity_min"] as? Double, let k = r["codebook_size"] as? Int else { return "-" }
        return String(format: "%.2f / %d", p, k) + (p < CodeHealth.defaultThreshold(k: k) ? " collapsed" : "")
    }
}
