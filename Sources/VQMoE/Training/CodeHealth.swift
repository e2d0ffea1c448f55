import Foundation

/// How well a codebook is used over an evaluation: code perplexity exp(H(p)), p_j = n_j / Σ n
/// (1 = every token on one code, K = all codes equally used), codes used and dead codes. A
/// perplexity below the collapse threshold (default max(1.5, K/4), `train.collapse_threshold`)
/// means the discrete path routes almost every token to the same expert: VQMoE degenerates to
/// SMoE plus one always-on expert, and its routing consistency says nothing.
///
/// ```swift
/// let h = CodeHealth([2046, 2, 0, 0, 0, 0, 0, 0])
/// h.perplexity                                   // ≈ 1.01
/// h.isCollapsed(threshold: CodeHealth.defaultThreshold(k: 8))   // true
/// ```
public struct CodeHealth: Sendable, Equatable {
    public let perplexity: Double
    public let used: Int
    public let codebookSize: Int
    public var dead: Int { codebookSize - used }

    public init(_ counts: [Double]) {
        let total = counts.reduce(0, +)
        var h = 0.0
        for c in counts where c > 0 { let p = c / total; h -= p * log(p) }
        perplexity = total > 0 ? exp(h) : 0
        used = counts.filter { $0 > 0 }.count
        codebookSize = counts.count
    }

    /// max(1.5, K/4): a quarter of the codebook in effective use.
    public static func defaultThreshold(k: Int) -> Double { max(1.5, Double(k) / 4) }

    public func isCollapsed(threshold: Double) -> Bool { threshold > 0 && perplexity < threshold }

    /// The quantizer options that usually keep a codebook alive, for the warning.
    public static func remedy(quantizer: String) -> String {
        switch quantizer {
        case "vqvae":
            return "model.ffn.quantizer.ema = true, kmeans_init = true, dead_code_threshold = 4, ema_decay = 0.9 "
                + "(vqvae's defaults: EMA codebook, k-means init, dead-code restart)"
        case "vqgan_cos", "rvq":
            return "model.ffn.quantizer.ema = true, kmeans_init = true, dead_code_threshold = 4, ema_decay = 0.9 "
                + "(\(quantizer)'s defaults: EMA codebook\(quantizer == "rvq" ? "s per level" : " of the normalised codes"), "
                + "k-means init, dead-code restart)"
        case "lfq":
            return "a larger model.ffn.quantizer.diversity_gamma or entropy_weight (the codebook-entropy term "
                + "rewards using every code)"
        default:
            return "EMA codebook updates, k-means initialisation and dead-code restart (as vqvae's ema, kmeans_init, "
                + "dead_code_threshold)"
        }
    }
}

extension Trainer {
    /// The collapse threshold of this run for codebooks of `k` codes (0 = off).
    func collapseThreshold(k: Int) -> Double {
        config.train.collapseThreshold.map(Double.init) ?? CodeHealth.defaultThreshold(k: k)
    }

    /// A warning per layer and level whose codebook collapsed at this evaluation.
    func warnCollapse(_ v: EvalResult, step: Int) {
        guard let health = v.codeHealth else { return }
        for (l, levels) in health.enumerated() {
            for (level, h) in levels.enumerated() where h.isCollapsed(threshold: collapseThreshold(k: h.codebookSize)) {
                let name = model.layers[l].quantizer?.core.library.name ?? "quantizer"
                let where_ = "layers.\(l).ffn" + (levels.count > 1 ? " level \(level)" : "")
                progress.note(
                    String(
                        format:
                            "warning: %@: the %@ codebook collapsed at step %d: code perplexity %.2f of K = %d "
                            + "(%d codes used, below %.2f), so the discrete path sends nearly every token to one "
                            + "expert; usually fixed by %@ (train.collapse_threshold = 0 silences this)",
                        where_, name, step + 1, h.perplexity, h.codebookSize, h.used,
                        collapseThreshold(k: h.codebookSize), CodeHealth.remedy(quantizer: name)))
            }
        }
    }
}
