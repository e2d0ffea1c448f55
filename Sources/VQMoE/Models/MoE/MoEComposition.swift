import Foundation

/// What one FFN mode is: the paths that send tokens to experts, in the order their outputs are
/// summed, and whether a gate mixes them. `MoELayer` builds one path object per kind; the
/// FLOPs count below is the one that `vqmoe bench`, `vqmoe finetune` and `vqmoe results` use.
///
///     dense           [dense]                       y = E_0(x)
///     smoe            [routed]                      y = Σ_{i∈topk} w_i E_i(x)
///     vqmoe           [routed, discrete], gated     y = g_c Σ_i w_i E_i(x) + g_d E_{c mod E}(x̂)
///     vqmoe_finetune  [discrete (frozen)]           y = E_{c mod E}(x̂)
///     shared          [routed, shared]              y = Σ_i w_i E_i(x) + E_shared(x)
///
/// Adding a mode is one case here (and in `FFNConfig.Mode`), plus a path type if it needs a new one.
///
/// ```swift
/// let c = MoEComposition.of(.vqmoe)
/// c.paths        // [.routed, .discrete(frozen: false)]
/// c.gated        // true
/// ```
public struct MoEComposition: Sendable, Equatable {
    /// One way tokens reach experts (see the path types: `DensePath`, `RoutedPath`,
    /// `DiscretePath`, `SharedExpertPath`).
    public enum PathKind: Sendable, Equatable {
        /// Every token to the single expert, weight 1.
        case dense
        /// A router plugin's top-k (or SoftMoE's dense dispatch) over the layer's experts.
        case routed
        /// A quantizer plugin's codes pick experts (code mod E); frozen: fine-tuning, no β·vq.
        case discrete(frozen: Bool)
        /// One always-on expert of its own (DeepSeekMoE's shared expert), weight 1.
        case shared
    }

    public var paths: [PathKind]
    /// A softmax gate over the paths' outputs (VQMoE's [g_c, g_d]).
    public var gated: Bool

    public static func of(_ mode: FFNConfig.Mode) -> MoEComposition {
        switch mode {
        case .dense: return MoEComposition(paths: [.dense], gated: false)
        case .smoe: return MoEComposition(paths: [.routed], gated: false)
        case .vqmoe: return MoEComposition(paths: [.routed, .discrete(frozen: false)], gated: true)
        case .vqmoeFinetune: return MoEComposition(paths: [.discrete(frozen: true)], gated: false)
        case .shared: return MoEComposition(paths: [.routed, .shared], gated: false)
        }
    }

    public var needsRouter: Bool { paths.contains(.routed) }
    public var needsQuantizer: Bool { paths.contains { if case .discrete = $0 { return true } else { return false } } }
    /// Whether the layer routes at all (the probe, consistency and expert-load records).
    public var routes: Bool { paths != [.dense] }
    /// The quantizer loss enters the total loss (a trained discrete path).
    public var trainsQuantizer: Bool { paths.contains(.discrete(frozen: false)) }

    /// Layer sizes a FLOPs count needs; `k` is the router's experts per token, `levels` and
    /// `codebookSize` the quantizer's L and K.
    public struct Sizes: Sendable {
        public var dModel, dInner, nExperts, k, levels, codebookSize: Int
        public init(dModel: Int, dInner: Int, nExperts: Int, k: Int, levels: Int, codebookSize: Int) {
            self.dModel = dModel
            self.dInner = dInner
            self.nExperts = nExperts
            self.k = k
            self.levels = levels
            self.codebookSize = codebookSize
        }
    }

    /// Experts each token visits (the active expert count a dense FFN of equal FLOPs needs).
    public func expertsPerToken(k: Int, levels: Int) -> Int {
        paths.reduce(0) { sum, kind in
            switch kind {
            case .dense, .shared: return sum + 1
            case .routed: return sum + k
            case .discrete: return sum + max(levels, 1)
            }
        }
    }

    /// Analytic forward FLOPs per token of one layer (multiply-add = 2): each expert visit
    /// 4·d·d_inner; the router's logits 2·d·E; the quantizer's distances 2·d·K; the gate 2·d·P.
    public func flopsPerToken(_ s: Sizes) -> Double {
        let d = Double(s.dModel), expert = 4 * d * Double(s.dInner)
        var flops = Double(expertsPerToken(k: s.k, levels: s.levels)) * expert
        for kind in paths {
            switch kind {
            case .routed: flops += 2 * d * Double(s.nExperts)
            case .discrete: flops += 2 * d * Double(s.codebookSize)
            case .dense, .shared: break
            }
        }
        return flops + (gated ? 2 * d * Double(paths.count) : 0)
    }
}
