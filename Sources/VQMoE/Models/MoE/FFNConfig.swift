import Foundation

/// How a feed-forward layer routes tokens (docs/design.md, "The method"): which paths it runs
/// and how they are mixed (`MoEComposition`), the experts' shape and the discrete path's input.
///
/// ```swift
/// let ffn = FFNConfig(mode: .vqmoe, dInner: 512, nExperts: 8)
/// ffn.composition.needsQuantizer        // true
/// ```
public struct FFNConfig: Sendable, Equatable {
    /// A mode names one composition of paths (see `MoEComposition.of(_:)`).
    public enum Mode: String, Sendable, CaseIterable {
        /// One FFN d → d_inner → d, every token.
        case dense
        /// A router plugin picks top-k experts; y = Σ g_i E_i(x).
        case smoe
        /// VQMoE pre-training: y = g_c·SMoE(x) + g_d·E_{c(x) mod E}(x̂), [g_c, g_d] = softmax(W_g x + b_g).
        case vqmoe
        /// VQMoE fine-tuning: the discrete path only, quantizer frozen: y = E_{c(x) mod E}(x̂).
        case vqmoeFinetune = "vqmoe_finetune"
        /// DeepSeekMoE-style shared expert: y = E_shared(x) + Σ_{top-k} g_i E_i(x).
        case shared
    }

    /// What the discrete path's expert sees.
    public enum DiscreteInput: String, Sendable, CaseIterable {
        /// x̂ = x + sg(q − x): value q, gradient to x (through the quantizer's straight-through backward).
        case ste
        /// x̂ = (1−c)·x + c·sg(q − x): mostly x; the code mostly chooses the expert (reference code).
        case mix
        /// x̂ = x: only the code index is used.
        case x
    }

    /// The expert width a layer gets when none is given: 4·d_model (GPT-2).
    public static func defaultInner(dModel: Int) -> Int { 4 * dModel }
    /// Experts of a routed layer when none is given.
    public static let defaultExperts = 8

    public var mode: Mode = .dense
    public var dInner: Int = FFNConfig.defaultInner(dModel: TransformerConfig.defaultDModel)
    /// Experts the router chooses among (1 in dense mode; a shared expert comes on top).
    public var nExperts: Int = 1
    public var activation: Activation = .gelu
    public var discreteInput: DiscreteInput = .mix
    public var mixC: Float = 0.05
    /// Weight β of the quantizer loss in the total loss (the discrete path of a trained quantizer).
    public var beta: Float = 0.08
    /// Allow routers that mix the tokens of a group (SoftMoE's dense dispatch). Natural in a
    /// ViT; in a causal language model it lets a token see later tokens, so it must be asked for.
    public var allowTokenMixing = false
    /// Expert parallelism over the ranks of a multi-rank run: rank r holds the routed experts
    /// ⌊r·E/N⌋ ..< ⌊(r+1)·E/N⌋ and tokens travel to them with all-to-all (`ExpertExchange`); the
    /// rest of the model is data parallel. No effect in one process.
    public var expertParallel = false

    public init() {}

    public init(
        mode: Mode, dInner: Int, nExperts: Int = 1, activation: Activation = .gelu,
        discreteInput: DiscreteInput = .mix, mixC: Float = 0.05, beta: Float = 0.08
    ) {
        self.mode = mode
        self.dInner = dInner
        self.nExperts = mode == .dense ? 1 : nExperts
        self.activation = activation
        self.discreteInput = discreteInput
        self.mixC = mixC
        self.beta = beta
    }

    /// The paths this mode runs.
    public var composition: MoEComposition { MoEComposition.of(mode) }
    public var usesRouter: Bool { composition.needsRouter }
    public var usesQuantizer: Bool { composition.needsQuantizer }

    /// Analytic forward FLOPs per token of one layer (multiply-add = 2); see `MoEComposition`.
    public func flopsPerToken(dModel: Int, k: Int, levels: Int, codebookSize: Int) -> Double {
        composition.flopsPerToken(
            MoEComposition.Sizes(
                dModel: dModel, dInner: dInner, nExperts: nExperts, k: k,
                levels: levels, codebookSize: codebookSize))
    }
}
