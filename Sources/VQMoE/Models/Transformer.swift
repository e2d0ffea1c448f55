import Foundation

/// Shape of a decoder-only Transformer language model.
public struct TransformerConfig: Sendable, Equatable {
    public var vocabSize = 256
    public var seqLen = 128
    public var nLayer = 4
    public var nHead = 4
    public var dModel = 128
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

    public init(vocabSize: Int = 256, seqLen: Int = 128, nLayer: Int = 4, nHead: Int = 4, dModel: Int = 128,
                dropout: Float = 0, initStd: Float = 0.02, ffn: FFNConfig = FFNConfig()) {
        self.vocabSize = vocabSize; self.seqLen = seqLen; self.nLayer = nLayer; self.nHead = nHead
        self.dModel = dModel; self.dropout = dropout; self.initStd = initStd; self.ffn = ffn
    }
}

/// The parts of one training or evaluation loss.
public struct LossParts: Sendable {
    /// Task loss (mean cross-entropy, nats).
    public var task: Float = 0
    /// Σ_layers router aux losses (already weighted by each router).
    public var aux: Float = 0
    /// Σ_layers quantizer losses (unweighted).
    public var vq: Float = 0
    /// β·vq (what enters the total).
    public var vqWeighted: Float = 0
    /// Exact aggregation: Σ per-target losses, targets, correct predictions.
    public var lossSum: Double = 0
    public var count = 0
    public var correct = 0
    /// Per-layer statistics (expert load, code counts).
    public var layers: [MoEStats] = []
    public var total: Float { task + aux + vqWeighted }
}

/// The plugin components one layer needs, created by the caller (e.g. from a config).
public struct LayerComponents {
    public var router: RouterInstance?
    public var quantizer: QuantizerInstance?
    public init(router: RouterInstance? = nil, quantizer: QuantizerInstance? = nil) { self.router = router; self.quantizer = quantizer }
}

/// Decoder-only Transformer LM (pre-LN, GPT-2 layout): token + position embeddings, blocks of
/// x += attn(LN(x)); x += FFN(LN(x)) with an MoE feed-forward (dense, SMoE, VQMoE), a final
/// LayerNorm and a head plugin (the `lm` head: logits, cross-entropy).
///
/// Each layer is a forward/backward pair over preallocated activation buffers (llm.c style).
///
/// ```swift
/// let model = try Transformer(config: cfg, head: head, components: { _ in LayerComponents(router: r) }, seed: 1)
/// let parts = try model.forward(tokens: x, targets: y, batch: B, step: step, train: true)
/// try model.backward()
/// ```
public final class Transformer: @unchecked Sendable {
    public let config: TransformerConfig
    public let head: HeadInstance
    public let layers: [MoELayer]
    public let runSeed: UInt64

    /// Token embedding (token models) or patch projection + class token (ViT); learned
    /// positions, except in Transformer-XL (relative positions).
    public let wte: Parameter?
    public let wpe: Parameter?
    public let patchWeight, patchBias, cls: Parameter?
    let ln1w: [Parameter], ln1b: [Parameter], qkvw: [Parameter], qkvb: [Parameter]
    let projw: [Parameter], projb: [Parameter], ln2w: [Parameter], ln2b: [Parameter]
    /// Transformer-XL, per layer: W_r (C,C) projecting the relative encodings, biases u, v (C = H·Dh).
    let relw: [Parameter], relu: [Parameter], relv: [Parameter]
    /// Transformer-XL memories (nil without memory).
    public let trainMemory, evalMemory: SegmentMemory?
    /// Memory rows used by the last forward, and the key count the sinusoid table holds.
    var xlMemoryUsed = 0, xlTableKeys = 0
    public let lnfw, lnfb: Parameter
    public let headParameters: [Parameter]

    let ws = Workspace()
    /// Temporaries shared by all layers (backward scratch).
    private let scratch: Workspace
    var b = 0, t = 0
    private var tokens: UnsafeMutablePointer<Int32>?
    private var headCtx: PluginContext?
    private var trained = false
    private var step = 0

    public init(config: TransformerConfig, head: HeadInstance, components: (Int) throws -> LayerComponents, seed: UInt64) throws {
        guard config.dModel % config.nHead == 0 else {
            throw VQMoEError(.config, "model.d_model (\(config.dModel)) must be divisible by model.n_head (\(config.nHead))")
        }
        guard head.dModel == config.dModel else { throw VQMoEError(.config, "head width \(head.dModel) != d_model \(config.dModel)") }
        self.config = config
        self.head = head
        runSeed = seed
        let c = config.dModel, std = config.initStd
        let scratch = Workspace()
        self.scratch = scratch
        if config.relative {
            guard c % 2 == 0 else { throw VQMoEError(.config, "model.d_model (\(c)) must be even for Transformer-XL's sinusoid position encodings") }
            wpe = nil
        } else {
            let p = Parameter(name: "wpe", shape: [config.seqLen, c])
            p.fillNormal(std: std, seed: HostRNG.derive(seed, 102))
            wpe = p
        }
        if let image = config.image {
            guard !config.relative else { throw VQMoEError(.config, "model.backbone: Transformer-XL takes tokens, not images") }
            guard image.height % image.patch == 0, image.width % image.patch == 0, config.seqLen == image.tokens else {
                throw VQMoEError(.config, "model.patch_size (\(image.patch)) must divide the image (\(image.height)×\(image.width)); seq_len must be 1 + patches = \(image.tokens)")
            }
            let pw = Parameter(name: "patch.weight", shape: [c, image.patchSize])
            pw.fillNormal(std: std, seed: HostRNG.derive(seed, 103))
            let token = Parameter(name: "cls", shape: [c], noDecay: true)
            token.fillNormal(std: std, seed: HostRNG.derive(seed, 104))
            (wte, patchWeight, patchBias, cls) = (nil, pw, Parameter(name: "patch.bias", shape: [c], noDecay: true), token)
        } else {
            let w = Parameter(name: "wte", shape: [config.vocabSize, c])
            w.fillNormal(std: std, seed: HostRNG.derive(seed, 101))
            (wte, patchWeight, patchBias, cls) = (w, nil, nil, nil)
        }
        func ln(_ n: String) -> (Parameter, Parameter) {
            let w = Parameter(name: "\(n).weight", shape: [c], noDecay: true)
            w.fill(1)
            return (w, Parameter(name: "\(n).bias", shape: [c], noDecay: true))
        }
        var l1w: [Parameter] = [], l1b: [Parameter] = [], qw: [Parameter] = [], qb: [Parameter] = []
        var pw: [Parameter] = [], pb: [Parameter] = [], l2w: [Parameter] = [], l2b: [Parameter] = []
        var rw: [Parameter] = [], ru: [Parameter] = [], rv: [Parameter] = []
        var ls: [MoELayer] = []
        for i in 0..<config.nLayer {
            let p = "layers.\(i)"
            let (a, bb) = ln("\(p).ln1"); l1w.append(a); l1b.append(bb)
            let w1 = Parameter(name: "\(p).attn.qkv.weight", shape: [3 * c, c])
            w1.fillNormal(std: std, seed: HostRNG.derive(seed, UInt64(i), 1))
            qw.append(w1); qb.append(Parameter(name: "\(p).attn.qkv.bias", shape: [3 * c], noDecay: true))
            let w2 = Parameter(name: "\(p).attn.proj.weight", shape: [c, c])
            w2.fillNormal(std: std, seed: HostRNG.derive(seed, UInt64(i), 2))
            pw.append(w2); pb.append(Parameter(name: "\(p).attn.proj.bias", shape: [c], noDecay: true))
            if config.relative {
                let w = Parameter(name: "\(p).attn.r.weight", shape: [c, c])
                w.fillNormal(std: std, seed: HostRNG.derive(seed, UInt64(i), 4))
                let u = Parameter(name: "\(p).attn.u", shape: [c], noDecay: true), v = Parameter(name: "\(p).attn.v", shape: [c], noDecay: true)
                u.fillNormal(std: std, seed: HostRNG.derive(seed, UInt64(i), 5))
                v.fillNormal(std: std, seed: HostRNG.derive(seed, UInt64(i), 6))
                rw.append(w); ru.append(u); rv.append(v)
            }
            let (d2, e2) = ln("\(p).ln2"); l2w.append(d2); l2b.append(e2)
            let comp = try components(i)
            ls.append(try MoELayer(config: config.ffn, dModel: c, name: "\(p).ffn", router: comp.router, quantizer: comp.quantizer,
                                   seed: HostRNG.derive(seed, UInt64(i), 3), initStd: std, scratch: scratch))
        }
        ln1w = l1w; ln1b = l1b; qkvw = qw; qkvb = qb; projw = pw; projb = pb; ln2w = l2w; ln2b = l2b
        relw = rw; relu = ru; relv = rv
        if config.relative && config.memLen > 0 {
            trainMemory = SegmentMemory(layers: config.nLayer, capacity: config.memLen, width: c)
            evalMemory = SegmentMemory(layers: config.nLayer, capacity: config.memLen, width: c)
        } else {
            (trainMemory, evalMemory) = (nil, nil)
        }
        layers = ls
        (lnfw, lnfb) = ln("lnf")
        headParameters = head.core.parameters.map { Parameter(view: $0, prefix: "head") }
    }

    /// Every trainable tensor, in a fixed order (checkpoints, optimizer state).
    public var parameters: [Parameter] {
        var ps = [wte, patchWeight, patchBias, cls, wpe].compactMap { $0 }
        for i in 0..<config.nLayer {
            ps += [ln1w[i], ln1b[i], qkvw[i], qkvb[i], projw[i], projb[i]]
            if config.relative { ps += [relw[i], relu[i], relv[i]] }
            ps += [ln2w[i], ln2b[i]]
            ps += layers[i].parameters
        }
        return ps + [lnfw, lnfb] + headParameters
    }

    /// Plugin state buffers (EMA statistics, ...), for checkpoints.
    public var stateBuffers: [StateBuffer] {
        layers.flatMap(\.stateBuffers) + head.core.states.map { StateBuffer(name: "head.\($0.name)", buffer: $0) }
    }

    public func zeroGrads() { parameters.forEach { $0.zeroGrad() } }

    /// Analytic forward FLOPs per token (matmuls; attention at the average causal length;
    /// Transformer-XL: over the memory too, for a batch of `batch` streams).
    public func flopsPerToken(k: Int, batch: Int = 1) -> Double {
        let c = Double(config.dModel), t = Double(config.seqLen)
        var f = 0.0
        for l in layers { f += (config.relative ? xlAttentionFlopsPerToken(batch: batch) : 2 * 4 * c * c + 2 * t * c) + l.flopsPerToken(k: k) }
        return f + 2 * c * Double(head.nOut)
    }

    /// Experts per token the routers pick in evaluation (0 without a router).
    public func evalK() throws -> Int {
        try layers.first?.router?.shape(StepInfo(step: totalSteps, totalSteps: totalSteps, train: false, noGrad: true, seed: 0)).k ?? 0
    }

    // MARK: per-step info for plugins

    private func stepInfo(_ tag: UInt64, layer: Int, train: Bool, frozen: Bool = false) -> StepInfo {
        StepInfo(step: step, totalSteps: 0, train: train, noGrad: !train, frozen: frozen,
                 seed: HostRNG.derive(runSeed, tag, UInt64(layer), UInt64(step)))
    }

    /// Total training steps, passed to plugins (schedules such as SMoE-Dropout's k).
    public var totalSteps = 0

    /// Call every plugin's per-step hook.
    public func beginStep(_ step: Int) throws {
        self.step = step
        for (i, l) in layers.enumerated() {
            var s = stepInfo(7, layer: i, train: true)
            s.totalSteps = totalSteps
            try l.router?.core.beginStep(s)
            try l.quantizer?.core.beginStep(s)
        }
    }

    // MARK: forward

    func act(_ key: String, _ l: Int, _ count: Int) -> UnsafeMutablePointer<Float> { ws.floats("\(key).\(l)", count) }

    /// tokens, targets (B,T) int32 → loss parts. In training mode the activations are kept for
    /// `backward()`; `step` seeds dropout and the plugins' per-step randomness.
    public func forward(tokens: UnsafePointer<Int32>?, images: UnsafePointer<Float>? = nil, targets: UnsafePointer<Int32>?, batch: Int, step: Int,
                        train: Bool, lengths: UnsafePointer<Int32>? = nil, logits: UnsafeMutablePointer<Float>? = nil) throws -> LossParts {
        let c = config.dModel, t = config.seqLen, n = batch * t, h = config.nHead
        b = batch
        self.t = t
        self.step = step
        trained = train
        var parts = LossParts()
        let p = config.dropout
        let drop = train && p > 0
        var x = act("x", 0, n * c)
        var tok: UnsafeMutablePointer<Int32>?
        if let image = config.image, let pw = patchWeight, let pb = patchBias, let cls, let wpe {
            guard let images else { throw VQMoEError(.internalError, "a ViT forward needs images") }
            PatchEmbedding.forward(out: x, patches: ws.floats("patches", batch * image.patches * image.patchSize), images: images, shape: image,
                                   batch: batch, weight: pw.data, bias: pb.data, cls: cls.data, pos: wpe.data, d: c,
                                   scratch: scratch.floats("patchemb", batch * image.patches * c))
        } else {
            guard let tokens, let wte else { throw VQMoEError(.internalError, "a token model's forward needs tokens") }
            let ids = ws.ints("tokens", n)
            ids.update(from: tokens, count: n)
            tok = ids
            Embedding.forward(out: x, tokens: ids, wte: wte.data, wpe: wpe?.data, b: batch, t: t, c: c)
        }
        if config.relative { xlBegin(batch: batch, train: train) }
        self.tokens = tok
        if drop { Dropout.forward(out: x, mask: act("embmask", 0, n * c), inp: x, count: n * c, p: p, seed: HostRNG.derive(runSeed, 11, UInt64(step))) }
        for l in 0..<config.nLayer {
            let atty = act("atty", l, n * c)
            if config.relative {
                xlAttentionForward(l, x: x, atty: atty, batch: batch, train: train)
            } else {
                let ln1 = act("ln1", l, n * c), m1 = act("ln1m", l, n), r1 = act("ln1r", l, n)
                LayerNorm.forward(out: ln1, mean: m1, rstd: r1, inp: x, weight: ln1w[l].data, bias: ln1b[l].data, n: n, c: c)
                let qkv = act("qkv", l, n * 3 * c)
                Linear.forward(out: qkv, inp: ln1, weight: qkvw[l].data, bias: qkvb[l].data, n: n, inFeatures: c, outFeatures: 3 * c)
                Attention.forward(y: atty, att: act("att", l, batch * h * t * t), qkv: qkv, b: batch, t: t, c: c, heads: h, causal: config.causal)
            }
            let proj = act("proj", l, n * c)
            Linear.forward(out: proj, inp: atty, weight: projw[l].data, bias: projb[l].data, n: n, inFeatures: c, outFeatures: c)
            if drop { Dropout.forward(out: proj, mask: act("projmask", l, n * c), inp: proj, count: n * c, p: p, seed: HostRNG.derive(runSeed, 12, UInt64(l), UInt64(step))) }
            let mid = act("mid", l, n * c)
            Vec.sum(mid, x, proj, n * c)
            let ln2 = act("ln2", l, n * c), m2 = act("ln2m", l, n), r2 = act("ln2r", l, n)
            LayerNorm.forward(out: ln2, mean: m2, rstd: r2, inp: mid, weight: ln2w[l].data, bias: ln2b[l].data, n: n, c: c)
            let ffn = act("ffn", l, n * c)
            let frozenQ = config.ffn.mode == .vqmoeFinetune
            var s = stepInfo(5, layer: l, train: train, frozen: false)
            s.totalSteps = totalSteps
            if frozenQ { s.flags |= 0x4 }  // VQMOE_STEP_FROZEN: the quantizer is frozen when fine-tuning
            let stats = try layers[l].forward(x: ln2, y: ffn, groups: batch, groupSize: t, tokenIDs: tok, step: s)
            parts.aux += stats.aux
            parts.vq += stats.vq
            parts.layers.append(stats)
            if drop { Dropout.forward(out: ffn, mask: act("ffnmask", l, n * c), inp: ffn, count: n * c, p: p, seed: HostRNG.derive(runSeed, 13, UInt64(l), UInt64(step))) }
            let next = act("x", l + 1, n * c)
            Vec.sum(next, mid, ffn, n * c)
            x = next
        }
        if config.relative { xlEnd(train: train) }
        let lnf = act("lnf", 0, n * c), mf = act("lnfm", 0, n), rf = act("lnfr", 0, n)
        LayerNorm.forward(out: lnf, mean: mf, rstd: rf, inp: x, weight: lnfw.data, bias: lnfb.data, n: n, c: c)
        let out = logits ?? ws.floats("logits", head.rows(batch: batch, seq: t) * head.nOut)
        let r = try head.forward(stepInfo(9, layer: 0, train: train), h: lnf, batch: batch, seq: t, targets: targets, lengths: lengths, logits: out)
        headCtx = r.ctx
        parts.task = r.loss
        parts.lossSum = r.lossSum
        parts.count = r.count
        parts.correct = r.correct
        parts.vqWeighted = config.ffn.mode == .vqmoe ? config.ffn.beta * parts.vq : 0
        guard parts.total.isFinite else {
            let bad = parts.layers.firstIndex { !$0.aux.isFinite || !$0.vq.isFinite }
            throw VQMoEError(.numeric, "non-finite loss at step \(step): task \(parts.task), aux \(parts.aux), vq \(parts.vq)"
                + (bad.map { " (first non-finite layer: layers.\($0).ffn)" } ?? ""))
        }
        return parts
    }

    /// The input of layer `l`'s feed-forward (LN2 output, (B,T,C)) from the last forward.
    public func moeInput(layer l: Int) -> UnsafePointer<Float>? {
        guard l < config.nLayer, b > 0 else { return nil }
        return UnsafePointer(act("ln2", l, b * t * config.dModel))
    }

    // MARK: backward

    /// Accumulate every parameter gradient of the last training forward (dL/d total = 1).
    public func backward() throws {
        guard trained, let ctx = headCtx else {
            throw VQMoEError(.internalError, "backward needs a training forward first")
        }
        let c = config.dModel, t = self.t, n = b * t, h = config.nHead
        let drop = config.dropout > 0
        let dx = ws.zeros("dx", n * c)
        // head → lnf
        let dlnf = ws.zeros("dlnf", n * c)
        try head.backward(ctx, batch: b, seq: t, gradLoss: 1, gradH: dlnf)
        headCtx = nil
        LayerNorm.backward(dinp: dx, dweight: lnfw.grad, dbias: lnfb.grad, dout: dlnf, inp: act("x", config.nLayer, n * c),
                           weight: lnfw.data, mean: act("lnfm", 0, n), rstd: act("lnfr", 0, n), n: n, c: c)
        let dtmp = ws.floats("dtmp", n * c), dln = ws.floats("dln", n * c)
        let datty = ws.floats("datty", n * c)
        for l in stride(from: config.nLayer - 1, through: 0, by: -1) {
            // x_{l+1} = mid + drop(ffn(LN2(mid)))
            let dffn: UnsafePointer<Float>
            if drop {
                Dropout.backward(dinp: dtmp, dout: dx, mask: act("ffnmask", l, n * c), count: n * c)
                dffn = UnsafePointer(dtmp)
            } else { dffn = UnsafePointer(dx) }
            dln.update(repeating: 0, count: n * c)
            try layers[l].backward(dy: dffn, dx: dln)
            let mid = act("mid", l, n * c)
            LayerNorm.backward(dinp: dx, dweight: ln2w[l].grad, dbias: ln2b[l].grad, dout: dln, inp: mid, weight: ln2w[l].data,
                               mean: act("ln2m", l, n), rstd: act("ln2r", l, n), n: n, c: c)
            // mid = x_l + drop(proj(attn(LN1(x_l))))
            let dproj: UnsafePointer<Float>
            if drop {
                Dropout.backward(dinp: dtmp, dout: dx, mask: act("projmask", l, n * c), count: n * c)
                dproj = UnsafePointer(dtmp)
            } else { dproj = UnsafePointer(dx) }
            datty.update(repeating: 0, count: n * c)
            Linear.backward(dinp: datty, dweight: projw[l].grad, dbias: projb[l].grad, dout: dproj, inp: act("atty", l, n * c),
                            weight: projw[l].data, n: n, inFeatures: c, outFeatures: c)
            if config.relative {
                xlAttentionBackward(l, datty: datty, dx: dx)
                continue
            }
            let dqkv = ws.zeros("dqkv", n * 3 * c)
            Attention.backward(dqkv: dqkv, dy: datty, qkv: act("qkv", l, n * 3 * c), att: act("att", l, b * h * t * t), b: b, t: t, c: c, heads: h,
                               causal: config.causal)
            dln.update(repeating: 0, count: n * c)
            Linear.backward(dinp: dln, dweight: qkvw[l].grad, dbias: qkvb[l].grad, dout: dqkv, inp: act("ln1", l, n * c),
                            weight: qkvw[l].data, n: n, inFeatures: c, outFeatures: 3 * c)
            LayerNorm.backward(dinp: dx, dweight: ln1w[l].grad, dbias: ln1b[l].grad, dout: dln, inp: act("x", l, n * c), weight: ln1w[l].data,
                               mean: act("ln1m", l, n), rstd: act("ln1r", l, n), n: n, c: c)
        }
        if drop { Dropout.backward(dinp: dx, dout: dx, mask: act("embmask", 0, n * c), count: n * c) }
        if let image = config.image {
            PatchEmbedding.backward(dx: dx, patches: ws.floats("patches", b * image.patches * image.patchSize), shape: image, batch: b,
                                    dweight: patchWeight?.grad, dbias: patchBias?.grad, dcls: cls?.grad, dpos: wpe!.grad, d: c,
                                    scratch: scratch.floats("patchemb", b * image.patches * c))
        } else if let tok = tokens, let wte {
            Embedding.backward(dwte: wte.grad, dwpe: wpe?.grad, dout: dx, tokens: tok, b: b, t: t, c: c)
        }
        trained = false
    }

    /// Bytes of activation and scratch memory held by the model (not counting plugins).
    public var workspaceBytes: Int { ws.bytes + scratch.bytes + layers.reduce(0) { $0 + $1.workspaceBytes } }
}

extension MoELayer {
    /// Scratch bytes held by the layer.
    public var workspaceBytes: Int { ws.bytes }
}
