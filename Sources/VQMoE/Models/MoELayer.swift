import Foundation

/// How a feed-forward layer routes tokens (SPEC §2).
public struct FFNConfig: Sendable, Equatable {
    public enum Mode: String, Sendable, CaseIterable {
        /// One FFN d → d_inner → d, every token.
        case dense
        /// A router plugin picks top-k experts; y = Σ g_i E_i(x).
        case smoe
        /// VQMoE pre-training: y = g_c·SMoE(x) + g_d·E_{c(x) mod E}(x̂), [g_c, g_d] = softmax(W_g x).
        case vqmoe
        /// VQMoE fine-tuning: the discrete path only, quantizer frozen: y = E_{c(x)}(x̂).
        case vqmoeFinetune = "vqmoe_finetune"
    }

    /// What the discrete path's expert sees (SPEC §2).
    public enum DiscreteInput: String, Sendable, CaseIterable {
        /// x̂ = x + sg(q − x): value q, gradient to x (through the quantizer's straight-through backward).
        case ste
        /// x̂ = (1−c)·x + c·sg(q − x): mostly x; the code mostly chooses the expert (reference code).
        case mix
        /// x̂ = x: only the code index is used.
        case x
    }

    public var mode: Mode = .dense
    public var dInner: Int = 512
    public var nExperts: Int = 1
    public var activation: Activation = .gelu
    public var discreteInput: DiscreteInput = .mix
    public var mixC: Float = 0.05
    /// Weight of the quantizer loss in the total loss.
    public var beta: Float = 0.08
    /// Allow routers that mix the tokens of a group (SoftMoE's dense dispatch). Natural in a
    /// ViT; in a causal language model it lets a token see later tokens, so it must be asked for.
    public var allowTokenMixing = false

    public init(mode: Mode = .dense, dInner: Int = 512, nExperts: Int = 1, activation: Activation = .gelu,
                discreteInput: DiscreteInput = .mix, mixC: Float = 0.05, beta: Float = 0.08) {
        self.mode = mode; self.dInner = dInner; self.nExperts = mode == .dense ? 1 : nExperts
        self.activation = activation; self.discreteInput = discreteInput; self.mixC = mixC; self.beta = beta
    }

    public var usesRouter: Bool { mode == .smoe || mode == .vqmoe }

    /// Analytic forward FLOPs per token of a layer (multiply-add = 2): experts 4·d·d_inner each
    /// (k sparse + L discrete), router 2·d·E, quantizer distances 2·d·K, gate 4·d.
    public func flopsPerToken(dModel: Int, k: Int, levels: Int, codebookSize: Int) -> Double {
        let d = Double(dModel), f = Double(dInner), e = Double(nExperts), l = Double(max(levels, 1)), kk = Double(codebookSize)
        let expert = 4 * d * f
        switch mode {
        case .dense: return expert
        case .smoe: return Double(k) * expert + 2 * d * e
        case .vqmoe: return (Double(k) + l) * expert + 2 * d * e + 2 * d * kk + 4 * d
        case .vqmoeFinetune: return l * expert + 2 * d * kk
        }
    }
    public var usesQuantizer: Bool { mode == .vqmoe || mode == .vqmoeFinetune }
}

/// Losses and statistics of one MoE layer forward.
public struct MoEStats: Sendable {
    /// The router's weighted auxiliary (balance) loss.
    public var aux: Float = 0
    /// The quantizer's unweighted loss (the model adds β·vq).
    public var vq: Float = 0
    /// Tokens per expert in this batch (assignments of both paths).
    public var expertLoad: [Float] = []
    /// Uses of each code in this batch (VQMoE).
    public var codeCounts: [Float] = []
}

/// A mixture-of-experts feed-forward layer: experts are 2-layer MLPs d → d_inner → d, routed
/// by a router plugin (SMoE), a quantizer plugin (the VQMoE discrete path), both (VQMoE
/// pre-training), or not at all (dense).
///
/// Dispatch drops no token: every (token, expert) assignment is sorted by expert with a
/// counting sort, each expert runs one GEMM pair over its contiguous segment, and outputs are
/// combined per token in a fixed order (no per-token loops over GEMMs, results independent of
/// the thread count).
///
/// ```swift
/// let layer = try MoELayer(config: FFNConfig(mode: .smoe, dInner: 512, nExperts: 8), dModel: 256,
///                          name: "layers.0.ffn", router: router, quantizer: nil, seed: 1)
/// let stats = try layer.forward(x: x, y: y, groups: B, groupSize: T, tokenIDs: ids, step: step)
/// try layer.backward(dy: dy, dx: dx)
/// ```
public final class MoELayer: @unchecked Sendable {
    public let config: FFNConfig
    public let dModel: Int
    public let name: String
    public let router: RouterInstance?
    public let quantizer: QuantizerInstance?
    /// Expert weights, all experts in one tensor each: fc1 (E,d_inner,d), (E,d_inner); fc2 (E,d,d_inner), (E,d).
    public let fc1Weight, fc1Bias, fc2Weight, fc2Bias: Parameter
    /// VQMoE gate W_g (2,d), b_g (2).
    public let gateWeight, gateBias: Parameter?
    /// Plugin parameters, as views of their host buffers.
    public let pluginParameters: [Parameter]

    let ws = Workspace()
    /// Temporaries shared by every layer of a model (only live within one forward or backward).
    let scratch: Workspace
    // Saved by forward for backward.
    var n = 0, k = 0, levels = 0, nAssign = 0, nSparse = 0, groups = 0, groupSize = 0
    private var x: UnsafePointer<Float>?
    var routerShape = RouterShape(mode: .topK, k: 0)
    private var routerCtx: PluginContext?, quantCtx: PluginContext?
    private var step = StepInfo(step: 0, totalSteps: 0, train: false, seed: 0)

    public init(config: FFNConfig, dModel: Int, name: String, router: RouterInstance?, quantizer: QuantizerInstance?,
                seed: UInt64, initStd: Float = 0.02, scratch: Workspace = Workspace()) throws {
        self.scratch = scratch
        self.config = config
        self.dModel = dModel
        self.name = name
        if config.usesRouter && router == nil { throw VQMoEError(.config, "\(name): mode \(config.mode.rawValue) needs a router") }
        if config.usesQuantizer && quantizer == nil { throw VQMoEError(.config, "\(name): mode \(config.mode.rawValue) needs a quantizer") }
        if let router, router.nExperts != config.nExperts {
            throw VQMoEError(.config, "\(name): router has \(router.nExperts) experts, the layer \(config.nExperts)")
        }
        if let router, router.dModel != dModel { throw VQMoEError(.config, "\(name): router width \(router.dModel) != d_model \(dModel)") }
        if let quantizer, quantizer.dModel != dModel { throw VQMoEError(.config, "\(name): quantizer width \(quantizer.dModel) != d_model \(dModel)") }
        self.router = config.usesRouter ? router : nil
        self.quantizer = config.usesQuantizer ? quantizer : nil
        let e = config.nExperts, f = config.dInner
        fc1Weight = Parameter(name: "\(name).experts.fc1.weight", shape: [e, f, dModel])
        fc1Bias = Parameter(name: "\(name).experts.fc1.bias", shape: [e, f], noDecay: true)
        fc2Weight = Parameter(name: "\(name).experts.fc2.weight", shape: [e, dModel, f])
        fc2Bias = Parameter(name: "\(name).experts.fc2.bias", shape: [e, dModel], noDecay: true)
        fc1Weight.fillNormal(std: initStd, seed: HostRNG.derive(seed, 1))
        fc2Weight.fillNormal(std: initStd, seed: HostRNG.derive(seed, 2))
        if config.mode == .vqmoe {
            let gw = Parameter(name: "\(name).gate.weight", shape: [2, dModel])
            gw.fillNormal(std: initStd, seed: HostRNG.derive(seed, 3))
            gateWeight = gw
            gateBias = Parameter(name: "\(name).gate.bias", shape: [2], noDecay: true)
        } else {
            gateWeight = nil
            gateBias = nil
        }
        var views: [Parameter] = []
        if let r = self.router { views += r.core.parameters.map { Parameter(view: $0, prefix: "\(name).router") } }
        if let q = self.quantizer { views += q.core.parameters.map { Parameter(view: $0, prefix: "\(name).quantizer") } }
        pluginParameters = views
    }

    /// Every trainable tensor of the layer: experts, gate, then plugin parameters.
    public var parameters: [Parameter] {
        [fc1Weight, fc1Bias, fc2Weight, fc2Bias] + [gateWeight, gateBias].compactMap { $0 } + pluginParameters
    }

    /// Plugin state buffers (EMA counts, ...), named for checkpoints.
    public var stateBuffers: [StateBuffer] {
        (router.map { r in r.core.states.map { StateBuffer(name: "\(name).router.\($0.name)", buffer: $0) } } ?? [])
            + (quantizer.map { q in q.core.states.map { StateBuffer(name: "\(name).quantizer.\($0.name)", buffer: $0) } } ?? [])
    }

    /// Analytic forward FLOPs per token of this layer (multiply-add = 2), for the current mode.
    public func flopsPerToken(k: Int) -> Double {
        config.flopsPerToken(dModel: dModel, k: k, levels: quantizer?.codesPerToken ?? 1, codebookSize: quantizer?.codebookSize ?? 0)
    }

    // MARK: forward

    /// y (N,d) = layer(x (N,d)), N = groups·groupSize. `x` must stay valid until backward.
    public func forward(x: UnsafePointer<Float>, y: UnsafeMutablePointer<Float>, groups: Int, groupSize: Int,
                        tokenIDs: UnsafePointer<Int32>?, step: StepInfo) throws -> MoEStats {
        let n = groups * groupSize, d = dModel, e = config.nExperts
        self.n = n
        self.groups = groups
        self.groupSize = groupSize
        self.x = x
        self.step = step
        routerCtx = nil
        quantCtx = nil
        var stats = MoEStats()

        // 1. Router (SMoE path).
        k = 0
        if let router {
            routerShape = try router.shape(step)
            let load = ws.floats("router.load", e)
            let outputs: RouterOutputs
            if routerShape.mode == .topK {
                k = routerShape.k
                outputs = RouterOutputs(expertIndex: ws.ints("idx", n * k), weights: ws.floats("w", n * k), expertLoad: load)
            } else {
                guard config.allowTokenMixing else {
                    throw VQMoEError(.config, "\(name): router '\(router.core.library.name)' dispatches densely (SoftMoE), mixing the tokens of a sequence: in a causal language model a token would see later tokens. Use it in a ViT, or set model.ffn.allow_token_mixing = true for an ablation")
                }
                let es = e * routerShape.slotsPerExpert
                outputs = RouterOutputs(dispatch: ws.floats("soft.dispatch", n * es), combine: ws.floats("soft.combine", n * es), expertLoad: load)
            }
            let r = try router.forward(step, x: x, tokenIDs: tokenIDs, nGroups: groups, groupSize: groupSize, shape: routerShape,
                                       outputs: outputs)
            stats.aux = r.aux
            routerCtx = r.ctx
        }
        // 2. Quantizer (discrete path) and the expert input x̂.
        levels = 0
        if let quantizer {
            levels = quantizer.codesPerToken
            let q = ws.floats("q", n * d)
            let counts = ws.floats("codeCounts", quantizer.codebookSize)
            let r = try quantizer.forward(step, x: x, n: n, quantized: q, codes: ws.ints("codes", n * levels), codeCounts: counts)
            stats.vq = r.loss
            stats.codeCounts = Array(UnsafeBufferPointer(start: counts, count: quantizer.codebookSize))
            quantCtx = r.ctx
            let xh = ws.floats("xhat", n * d)
            switch config.discreteInput {
            case .ste: xh.update(from: q, count: n * d)
            case .x: xh.update(from: x, count: n * d)
            case .mix:
                let c = config.mixC
                for i in 0..<(n * d) { xh[i] = (1 - c) * x[i] + c * (q[i] - x[i]) }
            }
        }
        // 3. Gate (VQMoE pre-training).
        if config.mode == .vqmoe, let gw = gateWeight, let gb = gateBias {
            let g = ws.floats("gate", n * 2)
            Linear.forward(out: g, inp: x, weight: gw.data, bias: gb.data, n: n, inFeatures: d, outFeatures: 2)
            for t in 0..<n {
                let m = max(g[2 * t], g[2 * t + 1])
                let a = expf(g[2 * t] - m), b = expf(g[2 * t + 1] - m)
                g[2 * t] = a / (a + b)
                g[2 * t + 1] = b / (a + b)
            }
        }
        // 4. Assignments: (token, expert, weight, source) — sparse first, then discrete.
        buildAssignments(n: n)
        // 5. Experts over their segments, 6. combine per token.
        runExperts(y: y)
        combine(y: y)
        let offsets = ws.ints("offsets", e + 1)
        stats.expertLoad = (0..<e).map { Float(offsets[$0 + 1] - offsets[$0]) }
        // 7. Dense (SoftMoE) routing: y += g_c·Y_soft (g_c = 1 outside VQMoE).
        if usesSoftDispatch {
            let soft = softForward(x: x, groups: groups, groupSize: groupSize)
            if config.mode == .vqmoe {
                let g = ws.floats("gate", n * 2)
                for t in 0..<n { Vec.axpy(y + t * d, g[2 * t], soft + t * d, d) }
            } else {
                Vec.add(y, soft, n * d)
            }
            let load = ws.floats("router.load", e)
            for i in 0..<e { stats.expertLoad[i] += load[i] }
        }
        return stats
    }

    /// Fill token/expert/weight per assignment and sort them by expert (counting sort):
    /// slot[a] is the row of assignment a in the expert-ordered buffers.
    private func buildAssignments(n: Int) {
        let e = config.nExperts
        nSparse = config.mode == .dense ? n : n * k
        let nDiscrete = quantizer == nil ? 0 : n * levels
        nAssign = nSparse + nDiscrete
        let a = nAssign
        let expert = ws.ints("expert", a), weight = ws.floats("weight", a), slot = ws.ints("slot", a)
        let offsets = ws.ints("offsets", e + 1)
        switch config.mode {
        case .dense:
            for t in 0..<n { expert[t] = 0; weight[t] = 1 }
        case .smoe:
            let idx = ws.ints("idx", n * k), w = ws.floats("w", n * k)
            for i in 0..<(n * k) { expert[i] = idx[i]; weight[i] = w[i] }
        case .vqmoe:
            let idx = ws.ints("idx", n * k), w = ws.floats("w", n * k), g = ws.floats("gate", n * 2)
            for i in 0..<(n * k) { expert[i] = idx[i]; weight[i] = g[2 * (i / k)] * w[i] }
        case .vqmoeFinetune:
            break
        }
        if nDiscrete > 0 {
            let codes = ws.ints("codes", n * levels)
            let g = config.mode == .vqmoe ? ws.floats("gate", n * 2) : nil
            let perLevel = 1 / Float(levels)
            for i in 0..<nDiscrete {
                let t = i / levels
                expert[nSparse + i] = Int32(Int(codes[i]) % e)
                weight[nSparse + i] = (g.map { $0[2 * t + 1] } ?? 1) * perLevel
            }
        }
        // Counting sort by expert (stable: assignment order within an expert).
        for i in 0...e { offsets[i] = 0 }
        for i in 0..<a { offsets[Int(expert[i]) + 1] += 1 }
        for i in 0..<e { offsets[i + 1] += offsets[i] }
        let cursor = ws.ints("cursor", e)
        for i in 0..<e { cursor[i] = offsets[i] }
        for i in 0..<a {
            let ex = Int(expert[i])
            slot[i] = cursor[ex]
            cursor[ex] += 1
        }
    }

    /// Source row (in x or x̂) of assignment i.
    @inline(__always) private func source(_ i: Int) -> UnsafePointer<Float> {
        if i < nSparse {
            let t = config.mode == .dense ? i : i / max(k, 1)
            return x! + t * dModel
        }
        return UnsafePointer(ws.floats("xhat", n * dModel)) + ((i - nSparse) / levels) * dModel
    }

    /// Token of assignment i.
    @inline(__always) private func token(_ i: Int) -> Int {
        i < nSparse ? (config.mode == .dense ? i : i / max(k, 1)) : (i - nSparse) / levels
    }

    /// body(token, assignment) for every assignment, tokens split over the pool: a token's
    /// assignments are visited by one thread, in assignment order (sparse, then discrete).
    private func forEachToken(_ body: (Int, Int) -> Void) {
        let k = self.k, levels = self.levels, nSparse = self.nSparse, hasDiscrete = quantizer != nil
        let sparsePerToken = config.mode == .vqmoeFinetune ? 0 : k
        nonisolated(unsafe) let body = body
        HostRuntime.parallelFor(Int64(n), grain: 64) { lo, hi in
            for t in Int(lo)..<Int(hi) {
                for j in 0..<sparsePerToken { body(t, t * sparsePerToken + j) }
                if hasDiscrete { for l in 0..<levels { body(t, nSparse + t * levels + l) } }
            }
        }
    }

    /// Whether this step's router returned dispatch/combine weights (SoftMoE).
    var usesSoftDispatch: Bool { router != nil && routerShape.mode == .dense }

    /// Top-1 expert of each token of the last forward, per path: the router's (top-k: its first
    /// choice; SoftMoE: the expert of the token's largest combine weight) and the discrete
    /// path's (first code mod E). Nil where the path is absent. For the consistency score.
    public func lastTop1() -> (router: [Int32]?, discrete: [Int32]?) {
        var r: [Int32]?
        if router != nil && n > 0 {
            if routerShape.mode == .topK {
                let idx = ws.ints("idx", n * k)
                r = (0..<n).map { idx[$0 * k] }
            } else {
                let es = config.nExperts * routerShape.slotsPerExpert, comb = ws.floats("soft.combine", n * es)
                r = (0..<n).map { t in
                    var best = 0
                    for j in 1..<es where comb[t * es + j] > comb[t * es + best] { best = j }
                    return Int32(best / routerShape.slotsPerExpert)
                }
            }
        }
        var q: [Int32]?
        if quantizer != nil && n > 0 {
            let codes = ws.ints("codes", n * levels)
            q = (0..<n).map { Int32(Int(codes[$0 * levels]) % config.nExperts) }
        }
        return (r, q)
    }

    /// Dense mode runs its one expert on x and writes y directly (no gather, no combine).
    private var isDense: Bool { config.mode == .dense }

    private func runExperts(y: UnsafeMutablePointer<Float>) {
        let d = dModel, f = config.dInner, e = config.nExperts, a = nAssign
        let hpre = ws.floats("hpre", a * f), h = scratch.floats("h", a * f)
        let slot = ws.ints("slot", a), offsets = ws.ints("offsets", e + 1)
        let xg: UnsafePointer<Float>, yg: UnsafeMutablePointer<Float>
        if isDense {
            xg = x!
            yg = y
        } else {
            // Gather: xg[slot[i]] = source(i)   (A,d)
            let g = ws.floats("xg", a * d)
            nonisolated(unsafe) let dst = g
            HostRuntime.parallelFor(Int64(a), grain: 256) { lo, hi in
                for i in Int(lo)..<Int(hi) { (dst + Int(slot[i]) * d).update(from: self.source(i), count: d) }
            }
            xg = UnsafePointer(g)
            yg = ws.floats("yg", a * d)
        }
        for ex in 0..<e {
            let lo = Int(offsets[ex]), rows = Int(offsets[ex + 1]) - lo
            guard rows > 0 else { continue }
            Linear.forward(out: hpre + lo * f, inp: xg + lo * d, weight: fc1Weight.data + ex * f * d, bias: fc1Bias.data + ex * f,
                           n: rows, inFeatures: d, outFeatures: f)
            config.activation.forward(out: h + lo * f, inp: hpre + lo * f, count: rows * f)
            Linear.forward(out: yg + lo * d, inp: h + lo * f, weight: fc2Weight.data + ex * d * f, bias: fc2Bias.data + ex * d,
                           n: rows, inFeatures: f, outFeatures: d)
        }
    }

    /// y[t] = Σ over t's assignments of weight·yg[slot], in assignment order.
    private func combine(y: UnsafeMutablePointer<Float>) {
        guard !isDense else { return }
        let d = dModel
        y.update(repeating: 0, count: n * d)
        let yg = ws.floats("yg", nAssign * d), slot = ws.ints("slot", nAssign), weight = ws.floats("weight", nAssign)
        nonisolated(unsafe) let y = y
        forEachToken { t, i in Vec.axpy(y + t * d, weight[i], yg + Int(slot[i]) * d, d) }
    }

    // MARK: backward

    /// Accumulate dx (N,d) from dy (N,d), and every parameter gradient (plugins included).
    /// `auxGrad` and `vqGrad` are dL/d(aux) and dL/d(vq) (1 and β for the training loss).
    public func backward(dy: UnsafePointer<Float>, dx: UnsafeMutablePointer<Float>, auxGrad: Float = 1) throws {
        let d = dModel, f = config.dInner, e = config.nExperts, a = nAssign
        guard let x else { throw VQMoEError(.internalError, "\(name): backward before forward") }
        let hpre = ws.floats("hpre", a * f), h = scratch.floats("h", a * f)
        let slot = ws.ints("slot", a), offsets = ws.ints("offsets", e + 1), weight = ws.floats("weight", a)
        let dweight = scratch.floats("dweight", a)
        let xg: UnsafePointer<Float>, dyg: UnsafePointer<Float>, dxg: UnsafeMutablePointer<Float>
        if isDense {
            xg = x
            dyg = dy
            dxg = dx
        } else {
            // Combine backward: dyg[slot] = w·dy[t];  dw = dy[t]·yg[slot]
            let yg = ws.floats("yg", a * d), g = scratch.floats("dyg", a * d)
            nonisolated(unsafe) let (gg, dw) = (g, dweight)
            HostRuntime.parallelFor(Int64(a), grain: 256) { lo, hi in
                for i in Int(lo)..<Int(hi) {
                    let s = Int(slot[i])
                    let src = dy + self.token(i) * d
                    let out = gg + s * d
                    out.update(from: src, count: d)
                    Vec.scale(out, weight[i], d)
                    dw[i] = Vec.dot(src, yg + s * d, d)
                }
            }
            xg = UnsafePointer(ws.floats("xg", a * d))
            dyg = UnsafePointer(g)
            dxg = scratch.zeros("dxg", a * d)
        }
        // Experts backward, segment by segment (h recomputed from hpre instead of kept).
        let dh = scratch.floats("dh", a * f), slope = scratch.floats("slope", a * f)
        for ex in 0..<e {
            let lo = Int(offsets[ex]), rows = Int(offsets[ex + 1]) - lo
            guard rows > 0 else { continue }
            config.activation.forwardWithSlope(out: h + lo * f, slope: slope + lo * f, inp: hpre + lo * f, count: rows * f)
            (dh + lo * f).update(repeating: 0, count: rows * f)
            Linear.backward(dinp: dh + lo * f, dweight: fc2Weight.frozen ? nil : fc2Weight.grad + ex * d * f,
                            dbias: fc2Bias.frozen ? nil : fc2Bias.grad + ex * d, dout: dyg + lo * d, inp: h + lo * f,
                            weight: fc2Weight.data + ex * d * f, n: rows, inFeatures: f, outFeatures: d)
            Vec.multiply(dh + lo * f, slope + lo * f, rows * f)
            Linear.backward(dinp: dxg + lo * d, dweight: fc1Weight.frozen ? nil : fc1Weight.grad + ex * f * d,
                            dbias: fc1Bias.frozen ? nil : fc1Bias.grad + ex * f, dout: dh + lo * f, inp: xg + lo * d,
                            weight: fc1Weight.data + ex * f * d, n: rows, inFeatures: d, outFeatures: f)
        }
        // Scatter to the sources: x for sparse assignments, x̂ for discrete ones.
        let dxh = quantizer == nil ? nil : scratch.zeros("dxhat", n * d)
        if !isDense {
            nonisolated(unsafe) let (dxp, dxhp) = (dx, dxh)
            forEachToken { t, i in
                let src = dxg + Int(slot[i]) * d
                if i < self.nSparse { Vec.add(dxp + t * d, src, d) } else { Vec.add(dxhp! + t * d, src, d) }
            }
        }
        // Routing weights → router and gate.
        if usesSoftDispatch, let router, let ctx = routerCtx {
            // SoftMoE: dY_soft = g_c·dy (VQMoE) or dy.
            var dsoft = dy
            if config.mode == .vqmoe {
                let g = ws.floats("gate", n * 2), buf = scratch.floats("soft.dy", n * d)
                for t in 0..<n { for j in 0..<d { buf[t * d + j] = g[2 * t] * dy[t * d + j] } }
                dsoft = UnsafePointer(buf)
            }
            let (dD, dC) = softBackward(dy: dsoft, x: x, dx: dx, groups: groups, groupSize: groupSize)
            try router.backward(ctx, n: n, shape: routerShape, gradDispatch: dD, gradCombine: dC, gradAux: auxGrad, gradX: dx)
        } else if config.mode == .smoe || config.mode == .vqmoe, let router, let ctx = routerCtx {
            let gw = scratch.floats("gradW", n * k)
            if config.mode == .smoe {
                gw.update(from: dweight, count: n * k)
            } else {
                let g = ws.floats("gate", n * 2)
                for i in 0..<(n * k) { gw[i] = g[2 * (i / k)] * dweight[i] }
            }
            try router.backward(ctx, n: n, shape: routerShape, gradWeights: gw, gradAux: auxGrad, gradX: dx)
        }
        if config.mode == .vqmoe, let gwP = gateWeight, let gbP = gateBias {
            // dg_c = Σ_j w_j·dweight_j (sparse), dg_d = Σ_l dweight_l / L (discrete); softmax backward.
            let g = ws.floats("gate", n * 2), w = ws.floats("w", n * k), dz = scratch.floats("dgate", n * 2)
            let perLevel = 1 / Float(levels)
            let soft: UnsafeMutablePointer<Float>? = usesSoftDispatch ? ws.floats("soft.out", n * d) : nil
            for t in 0..<n {
                var dgc: Float = soft.map { Vec.dot(dy + t * d, $0 + t * d, d) } ?? 0, dgd: Float = 0
                for j in 0..<k { dgc += w[t * k + j] * dweight[t * k + j] }
                for l in 0..<levels { dgd += dweight[nSparse + t * levels + l] * perLevel }
                let gc = g[2 * t], gd = g[2 * t + 1]
                let dot = gc * dgc + gd * dgd
                dz[2 * t] = gc * (dgc - dot)
                dz[2 * t + 1] = gd * (dgd - dot)
            }
            Linear.backward(dinp: dx, dweight: gwP.frozen ? nil : gwP.grad, dbias: gbP.frozen ? nil : gbP.grad, dout: dz, inp: x,
                            weight: gwP.data, n: n, inFeatures: d, outFeatures: 2)
        }
        // x̂ → x (and the quantizer).
        if let quantizer, let dxh {
            var gradQ: UnsafePointer<Float>? = nil
            switch config.discreteInput {
            case .ste: gradQ = UnsafePointer(dxh)
            case .x: Vec.add(dx, dxh, n * d)
            case .mix: Vec.axpy(dx, 1 - config.mixC, dxh, n * d)
            }
            if let ctx = quantCtx {
                try quantizer.backward(ctx, n: n, gradQuantized: gradQ, gradLoss: config.mode == .vqmoeFinetune ? 0 : config.beta, gradX: dx)
            }
        }
        routerCtx = nil
        quantCtx = nil
    }
}
