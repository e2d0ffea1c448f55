// The `xmoe` router (Chi et al. 2022, "On the Representation Collapse of Sparse Mixture of
// Experts"): route in a low-dimensional space by cosine similarity (the paper's dimension
// reduction + L2 normalisation + learnable temperature; the reference code's fixed tau = 0.3
// is temperature_mode = fixed):
//
//     h = x W_p^T  (d -> d_r, no bias)                                   (N,d_r)
//     s_te = (h_t / ||h_t||) . (e_e / ||e_e||) / tau                      (N,E)
//       (norms clamped below at eps; tau = exp(log_temperature), or the fixed temperature)
//     expert_index = top-k of s (ties -> lower expert), weights = softmax over the kept scores  (N,k)
//     aux_loss = balance_weight * E * sum_e f_e P_e, f_e = assignments to e / (N k),
//                P_e = mean_t softmax(s_t)_e
//     expert_load_e = assignments to e                                   (E)
//     backward: ds = dL/ds from the weights and the balance loss (TopKRouting); with dc = ds / tau:
//       d log tau  += -sum_te ds_te s_te                       (ds/d log tau = -s)
//       du (N,d_r)  = dc @ e^,   de^ (E,d_r) = dc^T @ u
//       dh, de      = backward of the L2 normalisations
//       grad_x (N,d) += dh @ W_p,   grad_W_p (d_r,d) += dh^T @ x,   grad_e += de
//       (no parameter gradients with VQMOE_STEP_FROZEN; log tau only when learnable)
// begin_step (embedding_norm = c > 0): e_e <- c e_e / ||e_e|| (the reference code's rescale).
import Glibc
import PluginKit
import VQMoEABI

final class XMoE: RouterPlugin {
    static let name = "xmoe", version = "1.0.0", reportsMetrics = true
    /// Batch statistics (the balance loss's f_e and P_e) over the global batch of a data-parallel run.
    static let flags = UInt32(VQMOE_PLUGIN_GLOBAL_BATCH)
    static let summary =
        "X-MoE router (Chi et al. 2022): h = W_p x (d -> d_r, no bias), scores s_e = cos(h, e_e) / tau with "
        + "L2-normalised expert embeddings and a learnable (or fixed) temperature; keep the k largest (ties -> lower "
        + "expert), weights = softmax over the kept scores; Switch balance loss balance_weight * E * sum_e f_e P_e"
    static let hyperparameters: [Hyper] = [
        .int("k", 2, min: 1, max: 64, "experts kept per token (top-k; must be <= n_experts)"),
        .int("router_dim", 16, min: 1, max: 4096, "d_r: routing-space width; h = W_p x projects d -> d_r (no bias)"),
        .float(
            "temperature", 0.3, min: 0,
            "tau in s_e = cos(h, e_e) / tau: the fixed value, or the learnable one's initial value (> 0)"),
        .string(
            "temperature_mode", "learnable", choices: ["learnable", "fixed"],
            "learnable: tau = exp(log_temperature), a trained parameter; fixed: tau = temperature"),
        .float(
            "embedding_norm", 0, min: 0,
            "> 0: rescale each expert embedding to this L2 norm at the start of every training "
                + "step (reference code: 1.5); 0: off"),
        .float(
            "balance_weight", 0.01, min: 0,
            "weight of the Switch balance loss E * sum_e f_e * P_e (P from the softmax over all scores) in aux_loss"),
        .float("init_std", 0.02, min: 0, "projection init: W_p ~ N(0, init_std^2)"),
    ]

    let host: Host
    /// d, E, k and d_r (the routing-space width).
    let d: Int, e: Int, k: Int, dr: Int
    /// tau: the fixed value, or the learnable one's initial value.
    let temperature: Float
    let learnableTemperature: Bool
    let embeddingNorm: Float, balanceWeight: Float, initStd: Float
    /// (d_r,d) projection W_p, (E,d_r) expert embeddings e_e, (1) log tau (learnable only),
    /// and their gradients (nil when the host freezes them).
    var proj: UnsafeMutablePointer<Float>!, projGrad: UnsafeMutablePointer<Float>?
    var embeddings: UnsafeMutablePointer<Float>!, embeddingsGrad: UnsafeMutablePointer<Float>?
    var logTemperature: UnsafeMutablePointer<Float>?, logTemperatureGrad: UnsafeMutablePointer<Float>?

    init(_ model: ModelInfo, _ hp: HyperValues) throws(PluginFailure) {
        (host, d, e) = (model.host, model.dModel, model.nExperts)
        guard d >= 1 else { throw .invalid("d_model = \(d): the router needs d_model >= 1") }
        guard e >= 1 else { throw .invalid("n_experts = \(e): the router needs n_experts >= 1") }
        (k, dr) = (hp.int("k"), hp.int("router_dim"))
        guard k <= e else {
            throw .invalid(
                "hyperparameter k = \(k) is larger than n_experts = \(e): top-k routing needs k <= n_experts")
        }
        (temperature, learnableTemperature) = (hp.float("temperature"), hp.string("temperature_mode") == "learnable")
        guard temperature > 0 else {
            throw .invalid("temperature = \(temperature) must be finite and > 0 (scores are divided by it)")
        }
        (embeddingNorm, balanceWeight, initStd) = (
            hp.float("embedding_norm"), hp.float("balance_weight"), hp.float("init_std")
        )
    }

    /// "proj.weight" (d_r,d); "expert_embeddings" (E,d_r), no weight decay (the scores only see
    /// their directions, so decay would only shrink them, i.e. raise the effective step size);
    /// with a learnable temperature "log_temperature" (1), no weight decay. All PARAM.
    var buffers: [BufferDecl] {
        [.param("proj.weight", [dr, d]), .param("expert_embeddings", [e, dr], noDecay: true)]
            + (learnableTemperature ? [.param("log_temperature", [1], noDecay: true)] : [])
    }

    func bind(_ b: BoundBuffers) throws(PluginFailure) {
        (proj, projGrad) = (try b.floats("proj.weight"), b.grad("proj.weight"))
        (embeddings, embeddingsGrad) = (try b.floats("expert_embeddings"), b.grad("expert_embeddings"))
        if learnableTemperature {
            (logTemperature, logTemperatureGrad) = (try b.floats("log_temperature"), b.grad("log_temperature"))
        }
    }

    /// W_p ~ N(0, init_std^2) from the host stream (seed, 0); expert embeddings ~ N(0, 1)
    /// from stream (seed, 1) -- the scores only see their directions, which are uniform on
    /// the sphere, and with embedding_norm > 0 the first begin_step rescales them; the
    /// learnable log_temperature = log(temperature).
    func initBuffers(seed: UInt64) throws(PluginFailure) {
        var r = host.rng(seed: seed, stream: 0)
        for i in 0..<(dr * d) { proj[i] = initStd * host.normal(&r) }
        var re = host.rng(seed: seed, stream: 1)
        for i in 0..<(e * dr) { embeddings[i] = host.normal(&re) }
        logTemperature?[0] = logf(temperature)
    }

    /// tau: exp(log_temperature) (learnable) or the `temperature` hyperparameter (fixed).
    func tau() throws(PluginFailure) -> Float {
        guard let logTemperature else { return temperature }
        let tau = expf(logTemperature[0])
        guard tau.isFinite && tau > 0 else {
            throw .numeric(
                "temperature exp(log_temperature = \(logTemperature[0])) = \(tau) is not a finite positive number")
        }
        return tau
    }

    /// With embedding_norm = c > 0, e_e <- c * e_e / ||e_e|| for every expert (the reference
    /// code does this under no_grad before each forward). The scores are invariant to it; it
    /// fixes the embeddings' scale, and so the size of an optimizer step relative to them. A
    /// pure function of the parameters, so a resumed run repeats it exactly. Skipped with
    /// VQMOE_STEP_FROZEN and for an all-zero row.
    func beginStep(_ step: Step) throws(PluginFailure) {
        guard embeddingNorm > 0, !step.frozen else { return }
        for j in 0..<e {
            let row = embeddings + j * dr
            var sq: Double = 0
            for i in 0..<dr { sq += Double(row[i]) * Double(row[i]) }
            let norm = sq.squareRoot()
            guard norm.isFinite else { throw .numeric("expert embedding \(j) has a non-finite norm") }
            guard norm > 0 else { continue }
            let scale = Float(Double(embeddingNorm) / norm)
            for i in 0..<dr { row[i] *= scale }
        }
    }

    /// temperature = tau (exp(log_temperature), or the fixed value);
    /// expert_embedding_norm = mean_e ||e_e|| (embedding_norm's target after each begin_step).
    func metrics(_ sink: MetricSink) throws(PluginFailure) {
        let tau = try tau()
        var total: Double = 0
        for j in 0..<e {
            var sq: Double = 0
            for i in 0..<dr { let v = Double(embeddings[j * dr + i]); sq += v * v }
            total += sq.squareRoot()
        }
        sink.scalar("temperature", Double(tau))
        sink.scalar("expert_embedding_norm", total / Double(e))
    }

    func shape(_ step: Step) throws(PluginFailure) -> RouterShape { .topK(k) }

    /// What the backward needs, copied (host buffers may change afterwards): the routing state;
    /// x (N,d) and W_p (d_r,d); u (N,d_r) and ||h|| (N); e^ (E,d_r) and ||e|| (E); the scores
    /// s (N,E) (for d/d log tau); tau.
    struct Saved {
        let routing: TopKRoutingState
        let x: [Float], proj: [Float], unitH: [Float], normH: [Float], unitE: [Float], normE: [Float]
        let scores: [Float], tau: Float
    }

    func forward(_ step: Step, _ io: RouterForward) throws(PluginFailure) -> (aux: Float, context: Any?) {
        let n = io.n, tau = try tau()
        // h (N,d_r) = x (N,d) @ W_p^T (d,d_r); u = h / max(||h||, eps).
        let h = try host.scratchFloats(n * dr, "token projections")
        host.matmul(n, dr, d, io.x, proj, h, tb: true)
        let unitH = try host.scratchFloats(n * dr, "unit token projections")
        let normH = try host.scratchFloats(n, "token projection norms")
        host.parallelFor(n, grain: max(1, 4096 / (dr + 1))) { normalizeRows(h, unitH, normH, cols: dr, $0..<$1) }
        // e^ = e / max(||e||, eps) (E rows; serial: E is small).
        let unitE = try host.scratchFloats(e * dr, "unit expert embeddings")
        let normE = try host.scratchFloats(e, "expert embedding norms")
        normalizeRows(embeddings, unitE, normE, cols: dr, 0..<e)
        // s (N,E) = u (N,d_r) @ e^T (d_r,E) / tau.
        let scores = try host.scratchFloats(n * e, "router scores")
        host.matmul(n, e, dr, unitH, unitE, scores, alpha: 1 / tau, tb: true)
        for i in 0..<(n * e) where !scores[i].isFinite {
            throw .numeric(
                "non-finite router score \(scores[i]) for token \(i / e), expert \(i % e) "
                    + "(non-finite x, weights or temperature?)")
        }
        let (aux, state) = try TopKRouting.forward(
            host, scores: scores, n: n, e: e, k: k, io: io, balanceWeight: balanceWeight,
            needProbs: balanceWeight != 0, save: step.savesContext)
        guard let state else { return (aux, nil) }
        let copy = { (p: UnsafePointer<Float>, count: Int) in Array(UnsafeBufferPointer(start: p, count: count)) }
        return (
            aux,
            Saved(
                routing: state, x: copy(io.x, n * d), proj: copy(proj, dr * d), unitH: copy(unitH, n * dr),
                normH: copy(normH, n), unitE: copy(unitE, e * dr), normE: copy(normE, e),
                scores: copy(scores, n * e), tau: tau)
        )
    }

    func backward(_ context: Any, _ g: RouterBackward) throws(PluginFailure) {
        let s = context as! Saved, n = g.n
        guard
            let ds = try TopKRouting.backward(
                host, s.routing, gradWeights: g.gradWeights, gradAux: g.gradAux, balanceWeight: balanceWeight)
        else { return }
        // d log tau = sum_te ds_te * ds_te/d log tau = -sum_te ds_te s_te.
        if !g.frozen, let gT = logTemperatureGrad {
            var acc: Double = 0
            for i in 0..<(n * e) { acc -= Double(ds[i]) * Double(s.scores[i]) }
            gT[0] += Float(acc)
        }
        // du (N,d_r) = ds (N,E) @ e^ (E,d_r) / tau; dh = backward of u = h / ||h|| (in place in du).
        let du = try host.scratchFloats(n * dr, "unit projection gradients")
        host.matmul(n, dr, e, ds, s.unitE, du, alpha: 1 / s.tau)
        host.parallelFor(n, grain: max(1, 4096 / (dr + 1))) { normalizeGrads(du, s.unitH, s.normH, cols: dr, $0..<$1) }
        host.matmul(n, d, dr, du, s.proj, g.gradX, beta: 1)  // grad_x (N,d) += dh (N,d_r) @ W_p (d_r,d)
        guard !g.frozen else { return }
        if let gP = projGrad { host.matmul(dr, d, n, du, s.x, gP, ta: true, beta: 1) }  // grad_W_p += dh^T x
        // de^ (E,d_r) = ds^T (E,N) @ u (N,d_r) / tau; de = backward of e^ = e / ||e||.
        if let gE = embeddingsGrad {
            let de = try host.scratchFloats(e * dr, "unit embedding gradients")
            host.matmul(e, dr, n, ds, s.unitH, de, alpha: 1 / s.tau, ta: true)
            normalizeGrads(de, s.unitE, s.normE, cols: dr, 0..<e)
            for i in 0..<(e * dr) { gE[i] += de[i] }
        }
    }
}

@_cdecl("vqmoe_plugin_entry")
public func vqmoePluginEntry(_ host: UnsafePointer<vqmoe_host_api>?) -> UnsafePointer<vqmoe_plugin_desc>? {
    pluginEntry(XMoE.self, host)
}
