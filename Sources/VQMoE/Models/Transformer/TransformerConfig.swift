import Foundation

/// Shape of a Transformer model (token LM, Transformer-XL or ViT). The defaults here are the
/// config file's defaults too (`RunConfig` reads them from a default instance).
///
/// ```swift
/// var cfg = TransformerConfig(vocabSize: 256, seqLen: 128, nLayer: 4, nHead: 4, dModel: 128,
///                             ffn: FFNConfig(mode: .smoe, dInner: 512, nExperts: 8))
/// cfg.attention      // .causal
/// ```
public struct TransformerConfig: Sendable, Equatable {
    public static let defaultDModel = 128

    public var vocabSize = 256
    public var seqLen = 128
    public var nLayer = 4
    public var nHead = 4
    public var dModel = TransformerConfig.defaultDModel
    /// Residual / embedding dropout probability (training only).
    public var dropout: Float = 0
    public var initStd: Float = 0.02
    public var ffn = FFNConfig()
    /// Causal self-attention (language models) or full (ViT).
    public var causal = true
    /// ViT input: images cut into patches (seqLen = 1 + patches); nil = token input.
    public var image: ImageShape?
    /// Transformer-XL: relative positional attention (no absolute position embedding).
    public var relative = false
    /// Transformer-XL memory length M (previous positions each segment attends to; 0 = none).
    public var memLen = 0

    public init() {}

    public init(
        vocabSize: Int = 256, seqLen: Int = 128, nLayer: Int = 4, nHead: Int = 4,
        dModel: Int = TransformerConfig.defaultDModel, dropout: Float = 0, initStd: Float = 0.02,
        ffn: FFNConfig = FFNConfig()
    ) {
        self.vocabSize = vocabSize
        self.seqLen = seqLen
        self.nLayer = nLayer
        self.nHead = nHead
        self.dModel = dModel
        self.dropout = dropout
        self.initStd = initStd
        self.ffn = ffn
    }

    /// Which attention sublayer the blocks use.
    public enum Attention: Sendable, Equatable {
        /// Causal, absolute learned positions (GPT-2): `SelfAttention(mask: .causal)`.
        case causal
        /// Full, absolute learned positions (ViT): `SelfAttention(mask: .full)`.
        case full
        /// Causal relative positional attention over a segment memory (Transformer-XL): `RelativeSelfAttention`.
        case relative
    }

    public var attention: Attention { relative ? .relative : (causal ? .causal : .full) }
}

/// The parts of one training or evaluation loss.
public struct LossParts: Sendable {
    /// Task loss (mean cross-entropy, nats).
    public var task: Float = 0
    /// Σ_layers router aux losses (already weighted by each router).
    public var aux: Float = 0
    /// Σ_layers quantizer losses (unweighted).
    public var vq: Float = 0
    /// Σ_layers β·vq of the trained quantizers (what enters the total).
    public var vqWeighted: Float = 0
    /// Exact aggregation: Σ per-target losses, targets, correct predictions.
    public var lossSum: Double = 0
    public var count = 0
    public var correct = 0
    /// Per-layer statistics (expert load, code counts).
    public var layers: [MoEStats] = []
    public var total: Float { task + aux + vqWeighted }
    public init() {}
}

/// What one process's losses weigh in the loss being minimised: 1 and 1 in one process. In a
/// data-parallel step over a global batch, `task` = this rank's targets / all targets (its mean
/// cross-entropy's share of the global mean) and `localShare` = this rank's tokens / all tokens,
/// the weight of a plugin loss that is a mean over this rank's tokens (a plugin without
/// VQMOE_PLUGIN_GLOBAL_BATCH); a global-batch plugin's loss weighs 1 on every rank.
///
/// ```swift
/// try model.backward(scale: LossScale(task: Float(count) / Float(globalCount), localShare: 0.5))
/// ```
public struct LossScale: Sendable {
    public var task: Float = 1
    public var localShare: Float = 1
    public init(task: Float = 1, localShare: Float = 1) { (self.task, self.localShare) = (task, localShare) }
}

/// The plugin components one layer needs, created by the caller (e.g. from a config).
public struct LayerComponents {
    public var router: RouterInstance?
    public var quantizer: QuantizerInstance?
    public init(router: RouterInstance? = nil, quantizer: QuantizerInstance? = nil) {
        self.router = router
        self.quantizer = quantizer
    }
}

/// How attention FLOPs are counted: `visible` counts the score and value products a causal
/// mask leaves (what the engine computes); `square` counts all T² of them, as the PyTorch
/// reference benchmark does, so that the two GFLOP/s figures compare.
public enum AttentionFlops: Sendable { case visible, square }

/// What every sublayer of one forward needs to know: the batch layout, the step (which seeds
/// dropout and the plugins' per-step randomness) and whether it trains.
///
/// ```swift
/// let ctx = ForwardContext(batch: 8, seqLen: 128, step: 10, train: true, runSeed: seed, totalSteps: 1000,
///                          dropout: 0.1)
/// ```
public struct ForwardContext: Sendable {
    public var batch: Int, seqLen: Int, step: Int
    public var train: Bool
    public var runSeed: UInt64
    public var totalSteps: Int
    /// Dropout probability (applied in training forwards only).
    public var dropout: Float
    /// Token ids (B,T) of a token model, for routers that use them.
    public nonisolated(unsafe) var tokenIDs: UnsafePointer<Int32>?
    /// This forward's rows within the global batch of a data-parallel step: the first row's
    /// index and the global batch's rows (0 = `batch`, one process).
    public var rowOffset = 0, globalBatch = 0

    public var n: Int { batch * seqLen }
    /// The first token's index in the global batch (dropout masks and plugins' per-token randomness).
    public var tokenOffset: Int { rowOffset * seqLen }
    public var drops: Bool { train && dropout > 0 }

    /// Seeds per purpose: plugins' per-step hook, MoE layer, head; dropout sites.
    enum Tag: UInt64 {
        case moe = 5, beginStep = 7, head = 9, embeddingDropout = 11, attentionDropout = 12, ffnDropout = 13
    }

    /// The step as plugins see it, seeded per purpose and layer.
    func stepInfo(_ tag: Tag, layer: Int) -> StepInfo {
        var s = StepInfo(
            step: step, totalSteps: totalSteps, train: train, noGrad: !train,
            seed: HostRNG.derive(runSeed, tag.rawValue, UInt64(layer), UInt64(step)))
        (s.tokenOffset, s.globalTokens) = tag == .beginStep ? (0, 0) : (tokenOffset, max(globalBatch, batch) * seqLen)
        return s
    }

    /// The dropout mask seed of a site (the embedding's has no layer).
    func dropoutSeed(_ tag: Tag, layer: Int? = nil) -> UInt64 {
        layer.map { HostRNG.derive(runSeed, tag.rawValue, UInt64($0), UInt64(step)) }
            ?? HostRNG.derive(runSeed, tag.rawValue, UInt64(step))
    }
}
