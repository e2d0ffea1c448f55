import Foundation

/// Losses and statistics of one MoE layer forward.
public struct MoEStats: Sendable {
    /// The router's weighted auxiliary (balance) loss.
    public var aux: Float = 0
    /// The quantizer's unweighted loss.
    public var vq: Float = 0
    /// β·vq where the quantizer is trained (what enters the total loss).
    public var vqWeighted: Float = 0
    /// Tokens per expert in this batch (assignments of every path; a shared expert last).
    public var expertLoad: [Float] = []
    /// Uses of each code in this batch (VQMoE).
    public var codeCounts: [Float] = []
    /// Uses of each code per code level (L,K): one row for a single-code quantizer, one per
    /// residual level for RVQ (the collapse check looks at each).
    public var levelCodeCounts: [[Float]] = []
    public init() {}
}

/// A mixture-of-experts feed-forward layer, composed of paths (`MoEComposition`): each path
/// assigns tokens to experts (`RoutedPath`: a router plugin; `DiscretePath`: a quantizer plugin's
/// codes; `SharedExpertPath`; `DensePath`), an optional `PathGate` scales each path's weights, and
/// the mode-free `DispatchEngine` runs the experts (counting sort, gather, one GEMM pair per
/// expert, combine per token in a fixed order). No token is dropped; results do not depend on
/// the thread count.
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
    /// The routed experts (`<name>.experts`); every expert the paths address (a shared one too).
    public let experts: ExpertBank
    public let expertSet: ExpertSet
    public let paths: [ExpertPath]
    public let gate: PathGate?
    let table = AssignmentTable()
    let engine: DispatchEngine
    let scratch: MoEScratch
    /// The last forward's input and step.
    private var input: PathInput?
    /// Each path's soft output of the last forward (nil for assignment paths).
    private var softOutputs: [UnsafePointer<Float>?] = []

    public init(
        config: FFNConfig, dModel: Int, name: String, router: RouterInstance?, quantizer: QuantizerInstance?,
        seed: UInt64, initStd: Float = 0.02, scratch: MoEScratch = MoEScratch()
    ) throws {
        let composition = config.composition
        try MoELayer.check(config, composition, dModel: dModel, name: name, router: router, quantizer: quantizer)
        self.config = config
        self.dModel = dModel
        self.name = name
        self.scratch = scratch
        // Expert parallelism over the ranks of the run: this rank holds a block of the routed experts.
        let comm = Comm.world
        let shard =
            config.expertParallel && comm.isDistributed
            ? ExpertExchange.owned(rank: comm.rank, ranks: comm.size, experts: config.nExperts) : nil
        experts = ExpertBank(
            name: "\(name).experts", count: config.nExperts, dModel: dModel, dInner: config.dInner,
            activation: config.activation, initStd: initStd,
            seeds: (HostRNG.derive(seed, 1), HostRNG.derive(seed, 2)), shard: shard)
        engine = DispatchEngine(scratch: scratch, exchange: shard.map { ExpertExchange(shard: $0, comm: comm) })
        paths = composition.paths.map { kind in
            switch kind {
            case .dense: return DensePath()
            case .routed:
                return RoutedPath(
                    router: router!, layerName: name, nExperts: config.nExperts,
                    allowTokenMixing: config.allowTokenMixing)
            case .discrete(let frozen):
                return DiscretePath(
                    quantizer: quantizer!, layerName: name, nExperts: config.nExperts, input: config.discreteInput,
                    mixC: config.mixC, beta: config.beta, frozen: frozen)
            case .shared:
                let bank = ExpertBank(
                    name: "\(name).shared_expert", count: 1, dModel: dModel, dInner: config.dInner,
                    activation: config.activation, initStd: initStd,
                    seeds: (HostRNG.derive(seed, 4), HostRNG.derive(seed, 5)))
                return SharedExpertPath(bank: bank, expertID: config.nExperts)
            }
        }
        expertSet = ExpertSet([experts] + paths.flatMap(\.banks))
        gate =
            composition.gated
            ? PathGate(
                name: "\(name).gate", paths: paths.count, dModel: dModel, initStd: initStd,
                seed: HostRNG.derive(seed, 3)) : nil
    }

    /// The components a composition needs, with matching widths and expert counts.
    static func check(
        _ config: FFNConfig, _ c: MoEComposition, dModel: Int, name: String, router: RouterInstance?,
        quantizer: QuantizerInstance?
    ) throws {
        if c.needsRouter && router == nil {
            throw VQMoEError(.config, "\(name): mode \(config.mode.rawValue) needs a router")
        }
        if c.needsQuantizer && quantizer == nil {
            throw VQMoEError(.config, "\(name): mode \(config.mode.rawValue) needs a quantizer")
        }
        if c.needsRouter, let router {
            if router.nExperts != config.nExperts {
                throw VQMoEError(
                    .config, "\(name): router has \(router.nExperts) experts, the layer \(config.nExperts)")
            }
            if router.dModel != dModel {
                throw VQMoEError(.config, "\(name): router width \(router.dModel) != d_model \(dModel)")
            }
        }
        if config.expertParallel {
            guard
                c.paths.contains(.routed) || c.paths.contains(where: { if case .discrete = $0 { true } else { false } })
            else {
                throw VQMoEError(
                    .config,
                    "\(name): model.ffn.expert_parallel needs routed experts (mode \(config.mode.rawValue) has none)")
            }
            let ranks = Comm.world.size
            guard config.nExperts >= ranks else {
                throw VQMoEError(
                    .config,
                    "\(name): model.ffn.expert_parallel shares \(config.nExperts) experts over \(ranks) ranks: every "
                        + "rank needs at least one (n_experts >= ranks)")
            }
        }
        if c.needsQuantizer, let quantizer, quantizer.dModel != dModel {
            throw VQMoEError(.config, "\(name): quantizer width \(quantizer.dModel) != d_model \(dModel)")
        }
    }

    // MARK: components

    /// The router of the routed path, the quantizer of the discrete path (nil when absent).
    public var router: RouterInstance? { paths.lazy.compactMap { ($0 as? RoutedPath)?.router }.first }
    public var quantizer: QuantizerInstance? { paths.lazy.compactMap { ($0 as? DiscretePath)?.quantizer }.first }
    public var fc1Weight: Parameter { experts.fc1Weight }
    public var fc1Bias: Parameter { experts.fc1Bias }
    public var fc2Weight: Parameter { experts.fc2Weight }
    public var fc2Bias: Parameter { experts.fc2Bias }
    public var gateWeight: Parameter? { gate?.weight }
    public var gateBias: Parameter? { gate?.bias }

    /// Every trainable tensor of the layer: experts (routed, then the paths' own), gate, then
    /// plugin parameters in path order.
    public var parameters: [Parameter] {
        expertSet.parameters + (gate?.parameters ?? []) + paths.flatMap(\.parameters)
    }

    /// Plugin state buffers (EMA counts, ...), named for checkpoints.
    public var stateBuffers: [StateBuffer] { paths.flatMap(\.stateBuffers) }

    /// Analytic forward FLOPs per token of this layer (multiply-add = 2), for the current mode.
    public func flopsPerToken(k: Int) -> Double {
        config.flopsPerToken(
            dModel: dModel, k: k, levels: quantizer?.codesPerToken ?? 1, codebookSize: quantizer?.codebookSize ?? 0)
    }

    // MARK: forward

    /// y (N,d) = layer(x (N,d)), N = groups·groupSize. `x` must stay valid until backward.
    public func forward(
        x: UnsafePointer<Float>, y: UnsafeMutablePointer<Float>, groups: Int, groupSize: Int,
        tokenIDs: UnsafePointer<Int32>?, step: StepInfo
    ) throws -> MoEStats {
        let n = groups * groupSize, d = dModel
        let inp = PathInput(
            x: x, groups: groups, groupSize: groupSize, tokenIDs: tokenIDs, step: step, experts: expertSet,
            scratch: scratch)
        input = inp
        var stats = MoEStats()
        stats.expertLoad = [Float](repeating: 0, count: expertSet.total)
        // 1. Each path runs its component; 2. the gate; 3. the assignment table.
        let layouts = try paths.map { try $0.forward(inp, stats: &stats) }
        let g = gate?.forward(x: x, n: n)
        let slots = table.begin(tokens: n, paths: layouts)
        for (path, slot) in zip(paths, slots) { path.fill(expert: slot.expert, raw: slot.raw) }
        table.finish(experts: expertSet.total, gate: g)
        // 4. Experts over their segments and the combine.
        try engine.forward(table, experts: expertSet, y: y, identity: composition.paths == [.dense])
        for (e, load) in table.load.enumerated() { stats.expertLoad[e] += load }
        // 5. Dense (SoftMoE) outputs: y += g_p·Y_soft.
        softOutputs = paths.map { $0.softForward(inp, stats: &stats) }
        for (p, soft) in softOutputs.enumerated() {
            guard let soft else { continue }
            if let g {
                for t in 0..<n { Vec.axpy(y + t * d, g[t * paths.count + p], soft + t * d, d) }
            } else {
                Vec.add(y, soft, n * d)
            }
        }
        return stats
    }

    var composition: MoEComposition { config.composition }

    // MARK: backward

    /// Accumulate dx (N,d) from dy (N,d), and every parameter gradient (plugins included).
    /// `auxGrad` is dL/d(aux) (1 for the training loss); a plugin loss that is a mean over this
    /// process's tokens only (no VQMOE_PLUGIN_GLOBAL_BATCH) weighs `localShare` more (see `LossScale`).
    public func backward(
        dy: UnsafePointer<Float>, dx: UnsafeMutablePointer<Float>, auxGrad: Float = 1, localShare: Float = 1
    ) throws {
        guard let inp = input else { throw VQMoEError(.internalError, "\(name): backward before forward") }
        let n = inp.n, d = dModel
        let dweight = scratch.dweight.reserve(table.count)
        let dsources = paths.map { $0.sourceGradient(inp, dx: dx) }
        try engine.backward(dy: dy, table, experts: expertSet, dweight: dweight, dsources: dsources)
        // dL/d raw weight = g_p(t)·dL/d weight; soft outputs get g_p·dy.
        let draw = scratch.draw.reserve(table.count)
        var dsoft: [UnsafePointer<Float>?] = softOutputs.map { $0 == nil ? nil : dy }
        if let gate {
            backwardGate(gate, dy: dy, dweight: dweight, dx: dx)
            let g = gate.values.pointer, np = paths.count
            for (p, r) in table.ranges.enumerated() {
                for i in 0..<r.count { draw[r.start + i] = g[(i / r.perToken) * np + p] * dweight[r.start + i] }
            }
            for p in 0..<np where softOutputs[p] != nil {
                let buf = scratch.soft.gated.reserve(n * d)
                for t in 0..<n { for j in 0..<d { buf[t * d + j] = g[t * np + p] * dy[t * d + j] } }
                dsoft[p] = UnsafePointer(buf)
            }
        } else {
            draw.update(from: dweight, count: table.count)
        }
        for (p, path) in paths.enumerated() {
            let grads = PathGradients(
                rawWeights: draw + table.ranges[p].start, softOutput: dsoft[p], dx: dx, auxGrad: auxGrad,
                localShare: localShare)
            try path.backward(inp, grads)
        }
        input = nil
    }

    /// dL/dg_p(t) from the assignments' raw weights and the soft outputs, then the gate's backward.
    private func backwardGate(
        _ gate: PathGate, dy: UnsafePointer<Float>, dweight: UnsafePointer<Float>,
        dx: UnsafeMutablePointer<Float>
    ) {
        guard let inp = input else { return }
        let n = inp.n, d = dModel, np = paths.count, raw = table.raw.pointer
        let dg = scratch.dgate.reserve(n * np)
        for t in 0..<n {
            for (p, r) in table.ranges.enumerated() {
                var s: Float = softOutputs[p].map { Vec.dot(dy + t * d, $0 + t * d, d) } ?? 0
                for j in 0..<r.perToken {
                    s += raw[r.start + t * r.perToken + j] * dweight[r.start + t * r.perToken + j]
                }
                dg[t * np + p] = s
            }
        }
        gate.backward(dg: dg, x: inp.x, dx: dx, dz: scratch.dz.reserve(n * np))
    }

    /// Top-1 expert of each token of the last forward, per path: the router's (top-k: its first
    /// choice; SoftMoE: the expert of the token's largest combine weight) and the discrete
    /// path's (first code mod E). Nil where the path is absent. For the consistency score.
    public func lastTop1() -> (router: [Int32]?, discrete: [Int32]?) {
        let n = table.tokens
        let r = paths.lazy.compactMap { $0 as? RoutedPath }.first?.top1(n: n)
        let q = paths.lazy.compactMap { $0 as? DiscretePath }.first?.top1(n: n)
        return (r, q)
    }

    /// Bytes of saved activations held by the layer (plugins and shared scratch aside).
    public var workspaceBytes: Int { engine.bytes }
}
