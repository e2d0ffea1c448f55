// The `smoe` router (Mixtral; Switch/GShard weights on request):
//
//     logits = x W^T (+ b)                                              (N,E)
//     expert_index = top-k of logits (ties -> lower expert), weights = softmax over the kept
//       logits (weights = full: p_{t,i}, their probabilities under the softmax over all E)
//     aux_loss = balance_weight * E * sum_e f_e P_e   (f_e: share of the N*k assignments, P_e: mean p_te)
//     backward: dlogits from the weights and the balance loss (TopKRouting), then
//               grad_x += dlogits W,  grad_W += dlogits^T x,  grad_b += sum_t dlogits_t
import PluginKit
import VQMoEABI

final class SMoE: RouterPlugin {
    static let name = "smoe", version = "1.1.0"
    /// Batch statistics (the balance loss's f_e and P_e) over the global batch of a data-parallel run.
    static let flags = UInt32(VQMOE_PLUGIN_GLOBAL_BATCH)
    static let summary =
        "Mixtral-style top-k router: logits = x W^T (+ b), keep the k largest (ties -> lower expert), "
        + "weights = softmax over the kept logits (weights = full: their probabilities under the softmax over all E, "
        + "as Switch); Switch balance loss balance_weight * E * sum_e f_e P_e"
    static let hyperparameters: [Hyper] = [
        .int("k", 2, min: 1, max: 64, "experts kept per token (top-k; must be <= n_experts)"),
        .float("balance_weight", 0.01, min: 0, "weight of the Switch balance loss E * sum_e f_e * P_e in aux_loss"),
        .float("init_std", 0.02, min: 0, "router weight init: W ~ N(0, init_std^2)"),
        .bool("bias", false, "add a learned bias to the router logits (initialised to 0)"),
        .string(
            "weights", "kept", choices: ["kept", "full"],
            "kept: softmax over the k kept logits (Mixtral; with k = 1 every weight is 1 and the router learns from "
                + "the balance loss only); full: the kept experts' probabilities under the softmax over all E logits "
                + "(Switch, GShard)"),
    ]

    let host: Host
    let d: Int, e: Int, k: Int
    let balanceWeight: Float, initStd: Float
    let hasBias: Bool, fullSoftmax: Bool
    var weight: UnsafeMutablePointer<Float>?, weightGrad: UnsafeMutablePointer<Float>?
    var bias: UnsafeMutablePointer<Float>?, biasGrad: UnsafeMutablePointer<Float>?

    init(_ model: ModelInfo, _ hp: HyperValues) throws(PluginFailure) {
        (host, d, e) = (model.host, model.dModel, model.nExperts)
        guard d >= 1 else { throw .invalid("d_model = \(d): the router needs d_model >= 1") }
        guard e >= 1 else { throw .invalid("n_experts = \(e): the router needs n_experts >= 1") }
        k = hp.int("k")
        guard k <= e else {
            throw .invalid(
                "hyperparameter k = \(k) is larger than n_experts = \(e): top-k routing needs k <= n_experts")
        }
        (balanceWeight, initStd) = (hp.float("balance_weight"), hp.float("init_std"))
        (hasBias, fullSoftmax) = (hp.bool("bias"), hp.string("weights") == "full")
    }

    var buffers: [BufferDecl] { [.param("weight", [e, d])] + (hasBias ? [.param("bias", [e], noDecay: true)] : []) }

    func bind(_ b: BoundBuffers) throws(PluginFailure) {
        (weight, weightGrad) = (try b.floats("weight"), b.grad("weight"))
        if hasBias { (bias, biasGrad) = (try b.floats("bias"), b.grad("bias")) }
    }

    /// W ~ N(0, init_std^2) from the host stream (seed, 0); bias = 0.
    func initBuffers(seed: UInt64) throws(PluginFailure) {
        var r = host.rng(seed: seed, stream: 0)
        for i in 0..<(e * d) { weight![i] = initStd * host.normal(&r) }
        bias?.update(repeating: 0, count: e)
    }

    func shape(_ step: Step) throws(PluginFailure) -> RouterShape { .topK(k) }

    /// What the backward needs: the routing state, and copies of x and W as the forward saw them.
    struct Saved { let routing: TopKRoutingState, x: [Float], w: [Float] }

    func forward(_ step: Step, _ io: RouterForward) throws(PluginFailure) -> (aux: Float, context: Any?) {
        let n = io.n, W = weight!
        let logits = try host.scratchFloats(n * e, "router logits")  // (N,E) = x W^T [+ b]
        host.matmul(n, e, d, io.x, W, logits, tb: true)
        if let b = bias { for t in 0..<n { for j in 0..<e { logits[t * e + j] += b[j] } } }
        for i in 0..<(n * e) where !logits[i].isFinite {
            throw .numeric(
                "non-finite router logit \(logits[i]) for token \(i / e), expert \(i % e) (non-finite x or weight?)")
        }
        let (aux, state) = try TopKRouting.forward(
            host, scores: logits, n: n, e: e, k: k, io: io, balanceWeight: balanceWeight, fullSoftmax: fullSoftmax,
            save: step.savesContext)
        let copy = { (p: UnsafePointer<Float>, count: Int) in Array(UnsafeBufferPointer(start: p, count: count)) }
        return (aux, state.map { Saved(routing: $0, x: copy(io.x, n * d), w: copy(W, e * d)) })
    }

    func backward(_ context: Any, _ g: RouterBackward) throws(PluginFailure) {
        let s = context as! Saved, n = g.n
        guard
            let dlogits = try TopKRouting.backward(
                host, s.routing, gradWeights: g.gradWeights, gradAux: g.gradAux, balanceWeight: balanceWeight)
        else { return }
        // grad_x (N,d) += dlogits (N,E) W (E,d)
        host.matmul(n, d, e, dlogits, s.w, g.gradX, beta: 1)
        guard !g.frozen else { return }
        if let gW = weightGrad {  // grad_W (E,d) += dlogits^T x
            host.matmul(e, d, n, dlogits, s.x, gW, ta: true, beta: 1)
        }
        if let gb = biasGrad { for t in 0..<n { for j in 0..<e { gb[j] += dlogits[t * e + j] } } }
    }
}

@_cdecl("vqmoe_plugin_entry")
public func vqmoePluginEntry(_ host: UnsafePointer<vqmoe_host_api>?) -> UnsafePointer<vqmoe_plugin_desc>? {
    pluginEntry(SMoE.self, host)
}
