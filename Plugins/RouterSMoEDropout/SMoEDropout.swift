// The `smoe_dropout` router (Chen et al. 2023, "Sparse MoE as the New Dropout"):
//
//     logits = x W^T, W a randomly initialised router that is never updated       (N,E)
//     k(step) = clamp(round((k_max - k_min) * step / total_steps) + k_min, k_min, k_max)
//               (round half to even, as the reference code's `linear_increase`); k_max in
//               evaluation (the paper evaluates at full capacity) and when total_steps <= 0
//     expert_index = top-k of logits (ties -> lower expert), weights = softmax over the kept
//       logits                                                                    (N,k)
//     aux_loss = balance_weight * E * sum_e f_e P_e, f_e = assignments to e / (N k),
//                P_e = mean_t softmax(logits_t)_e (0 when balance_weight = 0)
//     expert_load_e = assignments to e                                            (E)
//     backward: dlogits from the weights and the balance loss (TopKRouting), then
//               grad_x (N,d) += dlogits (N,E) W (E,d) -- the only gradient (also without
//               VQMOE_STEP_FROZEN): W is frozen state
//
// W is declared as STATE, not PARAM: the optimizer never sees it and checkpoints keep it, so
// a resumed run routes exactly as before. Gradients still flow through W to x.
import PluginKit
import VQMoEABI

final class SMoEDropout: RouterPlugin {
    static let name = "smoe_dropout", version = "1.0.0"
    /// Batch statistics (the balance loss's f_e and P_e) over the global batch of a data-parallel run.
    static let flags = UInt32(VQMOE_PLUGIN_GLOBAL_BATCH)
    static let summary =
        "SMoE-Dropout (Chen et al. 2023): a randomly initialised, frozen linear router (state, never trained); "
        + "k grows linearly from k_min to k_max over training, k = round((k_max - k_min) step / total_steps) + k_min; "
        + "evaluation uses k_max; weights = softmax over the kept logits"
    static let hyperparameters: [Hyper] = [
        .int("k_min", 1, min: 1, max: 64, "experts per token at the start of training (the schedule's first value)"),
        .int("k_max", 2, min: 0, max: 64, "experts per token at the end of training and in evaluation (0 = n_experts)"),
        .float(
            "balance_weight", 0, min: 0,
            "weight of the Switch balance loss E * sum_e f_e * P_e in aux_loss (0: off; "
                + "its gradient reaches x only, the router is frozen)"),
        .float("init_std", 0.02, min: 0, "frozen random router weight: W ~ N(0, init_std^2)"),
    ]

    let host: Host
    let d: Int, e: Int
    /// The schedule's ends (k_max = 0 resolved to E): 1 <= k_min <= k_max <= E.
    let kMin: Int, kMax: Int
    let balanceWeight: Float, initStd: Float
    /// (E,d) the frozen router weight (state).
    var weight: UnsafeMutablePointer<Float>!

    init(_ model: ModelInfo, _ hp: HyperValues) throws(PluginFailure) {
        (host, d, e) = (model.host, model.dModel, model.nExperts)
        guard d >= 1 else { throw .invalid("d_model = \(d): the router needs d_model >= 1") }
        guard e >= 1 else { throw .invalid("n_experts = \(e): the router needs n_experts >= 1") }
        let rawMax = hp.int("k_max")
        (kMin, kMax) = (hp.int("k_min"), rawMax == 0 ? e : rawMax)
        guard kMax <= e else {
            throw .invalid(
                "hyperparameter k_max = \(kMax) is larger than n_experts = \(e): top-k routing needs k <= n_experts")
        }
        guard kMin <= kMax else {
            throw .invalid(
                "hyperparameter k_min = \(kMin) is larger than k_max = \(kMax)"
                    + (rawMax == 0 ? " (k_max = 0 means n_experts)" : ""))
        }
        (balanceWeight, initStd) = (hp.float("balance_weight"), hp.float("init_std"))
    }

    /// "weight" (E,d) float32 STATE.
    var buffers: [BufferDecl] { [.state("weight", [e, d])] }

    func bind(_ b: BoundBuffers) throws(PluginFailure) { weight = try b.floats("weight") }

    /// W ~ N(0, init_std^2) from the host stream (seed, 0) -- the reference code's
    /// normal(0, 0.02) init of every linear layer; its router bias starts at 0 and is frozen
    /// too, so it is left out.
    func initBuffers(seed: UInt64) throws(PluginFailure) {
        var r = host.rng(seed: seed, stream: 0)
        for i in 0..<(e * d) { weight[i] = initStd * host.normal(&r) }
    }

    /// The linear schedule k(step) above (clamped in Double first: a step far past
    /// total_steps must not overflow Int).
    func shape(_ step: Step) throws(PluginFailure) -> RouterShape {
        guard step.train, step.totalSteps > 0 else { return .topK(kMax) }
        let grown = (Double(kMax - kMin) * Double(step.step) / Double(step.totalSteps)).rounded(.toNearestOrEven)
        guard !grown.isNaN else { return .topK(kMax) }
        return .topK(Int(min(max(grown + Double(kMin), Double(kMin)), Double(kMax))))
    }

    /// Any k in [k_min, k_max] is accepted, because a host may size the outputs from another
    /// call of shape() in the same run (the framework's checker sizes them once from a
    /// training step and reuses them for an eval forward); anything else is a SHAPE error.
    func topKWidth(_ allocated: Int, k: Int) throws(PluginFailure) -> Int {
        guard allocated >= kMin && allocated <= kMax else {
            throw .shape(
                "expert_index has k = \(allocated); this step routes to k = \(k) experts "
                    + "(schedule k_min = \(kMin) .. k_max = \(kMax))")
        }
        return allocated
    }

    /// What the backward needs: the routing state, and W as the forward saw it.
    struct Saved { let routing: TopKRoutingState, w: [Float] }

    func forward(_ step: Step, _ io: RouterForward) throws(PluginFailure) -> (aux: Float, context: Any?) {
        let n = io.n
        let logits = try host.scratchFloats(n * e, "router logits")  // (N,E) = x W^T
        host.matmul(n, e, d, io.x, weight, logits, tb: true)
        for i in 0..<(n * e) where !logits[i].isFinite {
            throw .numeric(
                "non-finite router logit \(logits[i]) for token \(i / e), expert \(i % e) (non-finite x or weight?)")
        }
        let (aux, state) = try TopKRouting.forward(
            host, scores: logits, n: n, e: e, k: io.width, io: io, balanceWeight: balanceWeight,
            needProbs: balanceWeight != 0, save: step.savesContext)
        return (aux, state.map { Saved(routing: $0, w: Array(UnsafeBufferPointer(start: weight, count: e * d))) })
    }

    func backward(_ context: Any, _ g: RouterBackward) throws(PluginFailure) {
        let s = context as! Saved
        guard
            let dlogits = try TopKRouting.backward(
                host, s.routing, gradWeights: g.gradWeights, gradAux: g.gradAux, balanceWeight: balanceWeight)
        else { return }
        host.matmul(g.n, d, e, dlogits, s.w, g.gradX, beta: 1)  // grad_x (N,d) += dlogits (N,E) W (E,d)
    }
}

@_cdecl("vqmoe_plugin_entry")
public func vqmoePluginEntry(_ host: UnsafePointer<vqmoe_host_api>?) -> UnsafePointer<vqmoe_plugin_desc>? {
    pluginEntry(SMoEDropout.self, host)
}
