import Foundation

/// A pre-LN Transformer (GPT-2 layout) with mixture-of-experts feed-forward layers:
///
///     x = input(tokens | images)  (+ embedding dropout);  x = block_l(x) for l < L;  h = LN_f(x);  head(h)
///
/// The input layer is a `TokenEmbedding` (token models) or a `PatchInput` (ViT); each block's
/// attention is a `SelfAttention` (causal or full) or a `RelativeSelfAttention` (Transformer-XL,
/// with a `SegmentMemory`); each FFN an `MoELayer` of the config's mode; the head a plugin (the
/// `lm` head: logits, cross-entropy). Every layer is a forward/backward pair over buffers it
/// keeps (llm.c style).
///
/// ```swift
/// let model = try Transformer(config: cfg, head: head, components: { _ in LayerComponents(router: r) }, seed: 1)
/// let parts = try model.forward(tokens: x, targets: y, batch: B, step: step, train: true)
/// try model.backward()
/// ```
public final class Transformer: @unchecked Sendable {
    public let config: TransformerConfig
    public let head: HeadInstance
    public let input: InputLayer
    public let blocks: [TransformerBlock]
    public let lnf: LayerNormParameters
    public let headParameters: [Parameter]
    public let runSeed: UInt64
    /// Transformer-XL memories (nil without memory): training and evaluation streams apart.
    public let trainMemory, evalMemory: SegmentMemory?
    /// Total training steps, passed to plugins (schedules such as SMoE-Dropout's k).
    public var totalSteps = 0

    /// The residual stream: x_0 (the input) … x_L (before LN_f), (B,T,C) each.
    let stream: [Storage<Float>]
    let lnfSaved = LayerNormSaved()
    /// Model-wide temporaries and gradient buffers.
    let moeScratch = MoEScratch(), attentionScratch = AttentionScratch(), blockScratch = BlockScratch()
    let embeddingMask = Storage<Float>(), logits = Storage<Float>(), dx = Storage<Float>(), dlnf = Storage<Float>()
    let relativePositions = RelativePositions()
    /// The last forward: its context, and the head's saved context (training only).
    private var last: ForwardContext?
    private var headCtx: PluginContext?

    public init(
        config: TransformerConfig, head: HeadInstance, components: (Int) throws -> LayerComponents, seed: UInt64
    ) throws {
        try Transformer.check(config, head: head)
        self.config = config
        self.head = head
        runSeed = seed
        let c = config.dModel, std = config.initStd
        if let image = config.image {
            input = PatchInput(image: image, c: c, initStd: std, seed: seed)
        } else {
            input = TokenEmbedding(
                vocabSize: config.vocabSize, seqLen: config.seqLen, c: c, positions: !config.relative,
                initStd: std, seed: seed)
        }
        if config.relative && config.memLen > 0 {
            trainMemory = SegmentMemory(layers: config.nLayer, capacity: config.memLen, width: c)
            evalMemory = SegmentMemory(layers: config.nLayer, capacity: config.memLen, width: c)
        } else {
            (trainMemory, evalMemory) = (nil, nil)
        }
        var blocks: [TransformerBlock] = []
        for i in 0..<config.nLayer {
            let attention = Transformer.makeAttention(
                config, layer: i, seed: seed, memory: (trainMemory, evalMemory),
                positions: relativePositions, scratch: attentionScratch)
            let ln2 = LayerNormParameters(name: "layers.\(i).ln2", c: c)
            let comp = try components(i)
            let ffn = try MoELayer(
                config: config.ffn, dModel: c, name: "layers.\(i).ffn", router: comp.router,
                quantizer: comp.quantizer, seed: HostRNG.derive(seed, UInt64(i), 3), initStd: std, scratch: moeScratch)
            blocks.append(TransformerBlock(index: i, attention: attention, ln2: ln2, ffn: ffn, scratch: blockScratch))
        }
        self.blocks = blocks
        stream = (0...config.nLayer).map { _ in Storage<Float>() }
        lnf = LayerNormParameters(name: "lnf", c: c)
        headParameters = head.core.parameters.map { Parameter(view: $0, prefix: "head") }
    }

    /// Widths, heads and the input kind must fit together.
    static func check(_ config: TransformerConfig, head: HeadInstance) throws {
        let c = config.dModel
        guard c % config.nHead == 0 else {
            throw VQMoEError(.config, "model.d_model (\(c)) must be divisible by model.n_head (\(config.nHead))")
        }
        guard head.dModel == c else { throw VQMoEError(.config, "head width \(head.dModel) != d_model \(c)") }
        if config.relative {
            guard c % 2 == 0 else {
                throw VQMoEError(
                    .config, "model.d_model (\(c)) must be even for Transformer-XL's sinusoid position encodings")
            }
        }
        if let image = config.image {
            guard !config.relative else {
                throw VQMoEError(.config, "model.backbone: Transformer-XL takes tokens, not images")
            }
            guard image.height % image.patch == 0, image.width % image.patch == 0, config.seqLen == image.tokens else {
                throw VQMoEError(
                    .config,
                    "model.patch_size (\(image.patch)) must divide the image (\(image.height)×\(image.width)); "
                        + "seq_len must be 1 + patches = \(image.tokens)"
                )
            }
        }
    }

    /// Layer i's attention sublayer, by the config's attention kind.
    private static func makeAttention(
        _ config: TransformerConfig, layer i: Int, seed: UInt64,
        memory: (train: SegmentMemory?, eval: SegmentMemory?), positions: RelativePositions,
        scratch: AttentionScratch
    ) -> AttentionSublayer {
        let c = config.dModel, std = config.initStd, l = UInt64(i)
        let p = AttentionProjections(
            layer: "layers.\(i)", c: c, initStd: std,
            seeds: (HostRNG.derive(seed, l, 1), HostRNG.derive(seed, l, 2)))
        switch config.attention {
        case .causal: return SelfAttention(projections: p, heads: config.nHead, mask: .causal, scratch: scratch)
        case .full: return SelfAttention(projections: p, heads: config.nHead, mask: .full, scratch: scratch)
        case .relative:
            return RelativeSelfAttention(
                projections: p, layer: i, heads: config.nHead, initStd: std,
                seeds: (HostRNG.derive(seed, l, 4), HostRNG.derive(seed, l, 5), HostRNG.derive(seed, l, 6)),
                memory: memory, positions: positions, scratch: scratch)
        }
    }

    // MARK: parameters and state

    /// The MoE layers, one per block.
    public var layers: [MoELayer] { blocks.map(\.ffn) }
    /// Learned absolute positions (nil in Transformer-XL).
    public var wpe: Parameter? { input.positions }

    /// Every trainable tensor, in a fixed order (checkpoints, optimizer state).
    public var parameters: [Parameter] {
        input.parameters + blocks.flatMap(\.parameters) + lnf.parameters + headParameters
    }

    /// Plugin state buffers (EMA statistics, ...), for checkpoints.
    public var stateBuffers: [StateBuffer] {
        layers.flatMap(\.stateBuffers) + head.core.states.map { StateBuffer(name: "head.\($0.name)", buffer: $0) }
    }

    public func zeroGrads() { parameters.forEach { $0.zeroGrad() } }

    /// Analytic forward FLOPs per token (matmuls): attention (see `AttentionFlops`; Transformer-XL
    /// over its memory too, for a batch of `batch` streams), each FFN as its mode counts it, the head.
    public func flopsPerToken(k: Int, batch: Int = 1, attention accounting: AttentionFlops = .visible) -> Double {
        let c = Double(config.dModel)
        let perLayer = blocks.map {
            $0.attention.flopsPerToken(seqLen: config.seqLen, batch: batch, accounting: accounting)
                + $0.ffn.flopsPerToken(k: k)
        }
        return perLayer.reduce(0, +) + 2 * c * Double(head.nOut)
    }

    /// Experts per token the routers pick in evaluation (0 without a router).
    public func evalK() throws -> Int {
        try layers.first?.router?.shape(
            StepInfo(step: totalSteps, totalSteps: totalSteps, train: false, noGrad: true, seed: 0)
        ).k ?? 0
    }

    /// Call every plugin's per-step hook.
    public func beginStep(_ step: Int) throws {
        let ctx = ForwardContext(
            batch: 0, seqLen: config.seqLen, step: step, train: true, runSeed: runSeed, totalSteps: totalSteps,
            dropout: config.dropout)
        for (i, l) in layers.enumerated() {
            let s = ctx.stepInfo(.beginStep, layer: i)
            try l.router?.core.beginStep(s)
            try l.quantizer?.core.beginStep(s)
        }
    }

    /// Forget the evaluation memory (the start of an ordered evaluation pass).
    public func resetEvalMemory() { evalMemory?.reset() }
    /// Forget the training memory.
    public func resetTrainMemory() { trainMemory?.reset() }

    // MARK: forward

    /// tokens (B,T) int32 or images (B,C,H,W), targets → loss parts. In training mode the
    /// activations are kept for `backward()`; `step` seeds dropout and the plugins' per-step randomness.
    /// A data-parallel rank passes its rows' place in the global batch (`rowOffset`, `globalBatch`):
    /// dropout masks and the plugins' token indices are then those of the single-process forward.
    public func forward(
        tokens: UnsafePointer<Int32>?, images: UnsafePointer<Float>? = nil, targets: UnsafePointer<Int32>?,
        batch: Int, step: Int, train: Bool, lengths: UnsafePointer<Int32>? = nil,
        logits out: UnsafeMutablePointer<Float>? = nil, rowOffset: Int = 0, globalBatch: Int = 0
    ) throws -> LossParts {
        var ctx = ForwardContext(
            batch: batch, seqLen: config.seqLen, step: step, train: train, runSeed: runSeed,
            totalSteps: totalSteps, dropout: config.dropout)
        (ctx.rowOffset, ctx.globalBatch) = (rowOffset, globalBatch)
        let c = config.dModel, n = ctx.n
        let x0 = stream[0].reserve(n * c)
        try input.forward(tokens: tokens, images: images, x: x0, batch: batch, t: ctx.seqLen)
        ctx.tokenIDs = input.tokenIDs
        last = ctx
        (train ? trainMemory : evalMemory)?.prepare(batch: batch)
        (train ? trainMemory : evalMemory)?.rows =
            globalBatch > batch ? AxisShard(offset: rowOffset, count: batch, global: globalBatch) : nil
        if ctx.drops {
            Dropout.forward(
                out: x0, mask: embeddingMask.reserve(n * c), inp: x0, count: n * c, p: ctx.dropout,
                seed: ctx.dropoutSeed(.embeddingDropout), offset: ctx.tokenOffset * c)
        }
        var parts = LossParts()
        for (l, block) in blocks.enumerated() {
            let stats = try block.forward(x: stream[l].pointer, out: stream[l + 1].reserve(n * c), ctx)
            parts.aux += stats.aux
            parts.vq += stats.vq
            parts.vqWeighted += stats.vqWeighted
            parts.layers.append(stats)
        }
        (train ? trainMemory : evalMemory)?.advance(t: ctx.seqLen)
        try headForward(ctx, targets: targets, lengths: lengths, logits: out, parts: &parts)
        return parts
    }

    /// LN_f and the head plugin: the task loss and its aggregates; a non-finite total is an error naming the layer.
    private func headForward(
        _ ctx: ForwardContext, targets: UnsafePointer<Int32>?, lengths: UnsafePointer<Int32>?,
        logits out: UnsafeMutablePointer<Float>?, parts: inout LossParts
    ) throws {
        let c = config.dModel, n = ctx.n, t = ctx.seqLen
        lnfSaved.forward(stream[config.nLayer].pointer, lnf, n: n, c: c)
        let logits = out ?? self.logits.reserve(head.rows(batch: ctx.batch, seq: t) * head.nOut)
        let r = try head.forward(
            ctx.stepInfo(.head, layer: 0), h: lnfSaved.out.pointer, batch: ctx.batch, seq: t, targets: targets,
            lengths: lengths, logits: logits)
        headCtx = r.ctx
        parts.task = r.loss
        parts.lossSum = r.lossSum
        parts.count = r.count
        parts.correct = r.correct
        guard parts.total.isFinite else {
            let bad = parts.layers.firstIndex { !$0.aux.isFinite || !$0.vq.isFinite }
            throw VQMoEError(
                .numeric,
                "non-finite loss at step \(ctx.step): task \(parts.task), aux \(parts.aux), vq \(parts.vq)"
                    + (bad.map { " (first non-finite layer: layers.\($0).ffn)" } ?? ""))
        }
    }

    /// Tokens of the last forward (this rank's rows in a data-parallel run).
    public var lastForwardTokens: Int { last?.n ?? 0 }

    /// The input of layer `l`'s feed-forward (LN2 output, (B,T,C)) from the last forward.
    public func moeInput(layer l: Int) -> UnsafePointer<Float>? {
        guard l < config.nLayer, last != nil else { return nil }
        return blocks[l].ffnInput
    }

    // MARK: backward

    /// Accumulate every parameter gradient of the last training forward. `scale` says what this
    /// process's share of the loss is (one process: dL/d total = 1); `ready` hears of each group
    /// of parameters whose gradients are final (head and LN_f, each block from the last, the
    /// input layer), so a data-parallel step can reduce them while the backward goes on.
    public func backward(scale: LossScale = LossScale(), ready: (([Parameter]) -> Void)? = nil) throws {
        guard let ctx = last, ctx.train, let hctx = headCtx else {
            throw VQMoEError(.internalError, "backward needs a training forward first")
        }
        headCtx = nil
        let c = config.dModel, n = ctx.n
        let dx = self.dx.zeros(n * c), dlnf = self.dlnf.zeros(n * c)
        try head.backward(hctx, batch: ctx.batch, seq: ctx.seqLen, gradLoss: scale.task, gradH: dlnf)
        lnfSaved.backward(dinp: dx, dout: dlnf, inp: stream[config.nLayer].pointer, lnf, n: n, c: c)
        ready?(lnf.parameters + headParameters)
        for (l, block) in blocks.enumerated().reversed() {
            try block.backward(dx: dx, x: stream[l].pointer, ctx, localShare: scale.localShare)
            ready?(block.parameters)
        }
        if ctx.dropout > 0 { Dropout.backward(dinp: dx, dout: dx, mask: embeddingMask.pointer, count: n * c) }
        input.backward(dx: dx, batch: ctx.batch, t: ctx.seqLen)
        ready?(input.parameters)
        last?.train = false
    }

    /// Bytes of activation and scratch memory held by the model (not counting plugins).
    public var workspaceBytes: Int {
        let shared = moeScratch.bytes + attentionScratch.bytes + blockScratch.bytes + input.bytes + lnfSaved.bytes
        return shared + stream.reduce(0) { $0 + $1.bytes } + blocks.reduce(0) { $0 + $1.bytes }
            + [embeddingMask, logits, dx, dlnf].reduce(0) { $0 + $1.bytes }
    }
}
