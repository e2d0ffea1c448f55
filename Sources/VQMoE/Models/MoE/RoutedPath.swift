import Foundation

/// The router path: a router plugin scores the layer input and picks experts.
///
///     top-k routers:  token t → experts idx[t, 0..<k] with weights w[t, 0..<k]   (assignments)
///     dense routers:  SoftMoE's dispatch/combine over E·S slots                 (a soft output)
///     backward:       dL/dw (or dL/dD, dL/dC) and dL/d aux to the router, which adds dL/dx
///
/// A router whose dispatch mixes the tokens of a sequence is refused in causal language models
/// unless `allowTokenMixing` (a token would see later tokens).
///
/// ```swift
/// let path = RoutedPath(router: router, layerName: "layers.0.ffn", nExperts: 8, allowTokenMixing: false)
/// ```
public final class RoutedPath: ExpertPath {
    public let router: RouterInstance
    let layerName: String, nExperts: Int, allowTokenMixing: Bool
    /// This step's routing (top-k or dense) and the router's saved context.
    private(set) var shape = RouterShape(mode: .topK, k: 0)
    private var ctx: PluginContext?
    /// Top-k choices (N,k), weights (N,k), and the router's expert load (E).
    let index = Storage<Int32>(), weights = Storage<Float>(), load = Storage<Float>()
    let soft = SoftDispatch()
    private var n = 0

    /// The router's parameter views and state buffers, named `<layer>.router.<buffer>`.
    public let parameters: [Parameter], stateBuffers: [StateBuffer]

    public init(router: RouterInstance, layerName: String, nExperts: Int, allowTokenMixing: Bool) {
        self.router = router
        self.layerName = layerName
        self.nExperts = nExperts
        self.allowTokenMixing = allowTokenMixing
        parameters = router.core.parameters.map { Parameter(view: $0, prefix: "\(layerName).router") }
        stateBuffers = router.core.states.map { StateBuffer(name: "\(layerName).router.\($0.name)", buffer: $0) }
    }

    public func forward(
        _ input: PathInput, stats: inout MoEStats
    ) throws -> (perToken: Int, source: UnsafePointer<Float>) {
        n = input.n
        ctx = nil
        shape = try router.shape(input.step)
        let outputs: RouterOutputs
        if shape.mode == .topK {
            outputs = RouterOutputs(
                expertIndex: index.reserve(n * shape.k), weights: weights.reserve(n * shape.k),
                expertLoad: load.reserve(nExperts))
        } else {
            guard allowTokenMixing else {
                throw VQMoEError(
                    .config,
                    "\(layerName): router '\(router.core.library.name)' dispatches densely (SoftMoE), mixing "
                        + "the tokens of a sequence: in a causal language model a token would see later "
                        + "tokens. Use it in a ViT, or set model.ffn.allow_token_mixing = true for an ablation"
                )
            }
            guard input.experts.banks[0].shard == nil else {
                throw VQMoEError(
                    .config,
                    "\(layerName): router '\(router.core.library.name)' dispatches densely (SoftMoE): every expert "
                        + "runs on slots of every group, which expert parallelism does not exchange; set "
                        + "model.ffn.expert_parallel = false (data parallel)")
            }
            let es = nExperts * shape.slotsPerExpert
            outputs = RouterOutputs(
                dispatch: soft.dispatch.reserve(n * es), combine: soft.combine.reserve(n * es),
                expertLoad: load.reserve(nExperts))
        }
        let r = try router.forward(
            input.step, x: input.x, tokenIDs: input.tokenIDs, nGroups: input.groups,
            groupSize: input.groupSize, shape: shape, outputs: outputs)
        stats.aux += r.aux
        ctx = r.ctx
        return (shape.mode == .topK ? shape.k : 0, input.x)
    }

    public func fill(expert: UnsafeMutablePointer<Int32>, raw: UnsafeMutablePointer<Float>) {
        guard shape.mode == .topK else { return }
        expert.update(from: index.pointer, count: n * shape.k)
        raw.update(from: weights.pointer, count: n * shape.k)
    }

    public func softForward(_ input: PathInput, stats: inout MoEStats) -> UnsafePointer<Float>? {
        guard shape.mode == .dense else { return nil }
        let y = soft.forward(
            x: input.x, groups: input.groups, groupSize: input.groupSize, slots: shape.slotsPerExpert,
            bank: input.experts.banks[0], scratch: input.scratch)
        for e in 0..<nExperts { stats.expertLoad[e] += load.pointer[e] }
        return y
    }

    public func backward(_ input: PathInput, _ g: PathGradients) throws {
        defer { ctx = nil }
        guard let ctx else { return }
        let gradAux = g.auxGrad * (router.core.library.computesGlobalBatch ? 1 : g.localShare)
        if shape.mode == .dense, let dsoft = g.softOutput {
            let (dD, dC) = soft.backward(
                dy: dsoft, x: input.x, dx: g.dx, bank: input.experts.banks[0], scratch: input.scratch)
            try router.backward(
                ctx, n: n, shape: shape, gradDispatch: dD, gradCombine: dC, gradAux: gradAux, gradX: g.dx)
        } else {
            try router.backward(ctx, n: n, shape: shape, gradWeights: g.rawWeights, gradAux: gradAux, gradX: g.dx)
        }
    }

    /// Top-k: the first choice; SoftMoE: the expert of the token's largest combine weight.
    public func top1(n: Int) -> [Int32]? {
        guard n > 0 else { return nil }
        if shape.mode == .topK {
            let k = shape.k, idx = index.pointer
            return (0..<n).map { idx[$0 * k] }
        }
        let s = shape.slotsPerExpert, es = nExperts * s, comb = soft.combine.pointer
        return (0..<n).map { t in
            var best = 0
            for j in 1..<es where comb[t * es + j] > comb[t * es + best] { best = j }
            return Int32(best / s)
        }
    }
}
