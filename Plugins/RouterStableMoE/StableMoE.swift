// The `stablemoe` router (Dai et al. 2022, "StableMoE: Stable Routing Strategy for Mixture of
// Experts"): a top-1 router on l2-normalised expert centroids with a sigmoid gate, and a
// distilled token-id router that takes over, frozen, in stage 2:
//
//     s = x ê^T, ê_e = e_e / ||e_e||                                   (N,E)
//     z = emb[id] C^T (distilled logits)                                (N,E)
//     stage 1: a = argmax s; aux = balance_weight * E * sum_e f_e P_e + distill_weight * mean_t CE(z_t, sg(a_t))
//              with f_e = #{a_t = e} / N, P_e = mean_t softmax(s_t)_e
//     stage 2: a = argmax z (frozen as stage2_assignment at the first stage-2 training forward); aux = 0
//     weights = sigmoid(s_{t,a_t}) (N,1); expert_load_e = #{a_t = e}  (E)
//     backward: ds from the gate and the stage-1 balance loss (Route / scoreGrads), then
//       grad_x (N,d) += ds (N,E) @ ê (E,d);  dê = ds^T x (E,d),
//       grad_e_e += (dê_e - ê_e (ê_e · dê_e)) / r_e;
//       stage 1 with distill: dz_t = grad_aux * distill_weight / N * (q_t - onehot(a_t)),
//       grad_C += dz^T emb[id] (E,D), grad_emb[id_t] += dz_t C (scatter-add; the assignment is a
//       stop-gradient target). No parameter gradients when frozen; none ever for the distilled
//       router in stage 2.
// distill = false is the reference code's behaviour: stage 1 forever, no distilled router.
import Glibc
import PluginKit
import VQMoEABI

final class StableMoE: RouterPlugin {
    static let name = "stablemoe", version = "1.0.0", reportsMetrics = true
    /// The distilled router maps token ids to experts.
    static let flags = UInt32(VQMOE_PLUGIN_NEEDS_TOKEN_IDS | VQMOE_PLUGIN_GLOBAL_BATCH)
    static let summary =
        "StableMoE (Dai et al. 2022): top-1 routing on l2-normalised expert centroids with a sigmoid gate; "
        + "stage 1 adds a balance loss and distils the assignment into a token-id router, which decides, frozen, "
        + "from stage2_step on"
    static let hyperparameters: [Hyper] = [
        .int(
            "stage2_step", 0, min: 0,
            "first training step of stage 2 (frozen distilled router); 0 = round(0.1 * total_steps)"),
        .int(
            "distill_dim", 16, min: 1, max: 4096,
            "D_dist, width of the distilled router's token embeddings and centroids"),
        .float(
            "balance_weight", 0.01, min: 0,
            "weight of the stage-1 balance loss E * sum_e f_e * P_e (P from softmax of the scores)"),
        .float(
            "distill_weight", 1.0, min: 0,
            "weight of the stage-1 distillation cross-entropy towards the stage-1 assignment"),
        .float(
            "init_std", 0.02, min: 0,
            "init of the distilled router's token embeddings and centroids: N(0, init_std^2) "
                + "(expert centroids: N(0, 1/d))"),
        .bool(
            "distill", true,
            "two stages with a distilled token-id router (false = reference code: stage 1 forever, no distillation)"),
    ]

    let host: Host
    /// d, E, V (the distilled router's token-id range; 0 with distill = false) and D_dist.
    let d: Int, e: Int, v: Int, dd: Int
    /// stage2_step (0 = round(0.1 * total_steps)).
    let stage2Step: Int
    let balanceWeight: Float, distillWeight: Float, initStd: Float
    let distill: Bool
    /// (E,d) expert centroids e_e, (V,D_dist) distilled word embeddings, (E,D_dist) distilled
    /// centroids, and their gradients; (V) int32 state: the distilled router's expert per token
    /// id, frozen at the first stage-2 training forward, -1 everywhere until then.
    var expertEmbeddings: UnsafeMutablePointer<Float>!, expertEmbeddingsGrad: UnsafeMutablePointer<Float>?
    var distilledEmbedding: UnsafeMutablePointer<Float>?, distilledEmbeddingGrad: UnsafeMutablePointer<Float>?
    var distilledCentroids: UnsafeMutablePointer<Float>?, distilledCentroidsGrad: UnsafeMutablePointer<Float>?
    var stage2Assignment: UnsafeMutablePointer<Int32>?
    /// Routing statistics of the last forward, for metrics only (they never change results, so
    /// they need not live in a declared buffer): the stage, the fraction of tokens whose distilled
    /// decision equals the centroid router's argmax (nil with distill = false or an empty batch),
    /// and whether they come from a training forward (those win over eval forwards).
    var stats: (stage: Int, distillAccuracy: Double?, fromTraining: Bool)?

    init(_ model: ModelInfo, _ hp: HyperValues) throws(PluginFailure) {
        (host, d, e) = (model.host, model.dModel, model.nExperts)
        guard d >= 1 else { throw .invalid("d_model = \(d): the router needs d_model >= 1") }
        guard e >= 1 else { throw .invalid("n_experts = \(e): the router needs n_experts >= 1") }
        (stage2Step, dd, distill) = (hp.int("stage2_step"), hp.int("distill_dim"), hp.bool("distill"))
        (balanceWeight, distillWeight, initStd) = (
            hp.float("balance_weight"), hp.float("distill_weight"), hp.float("init_std")
        )
        guard !distill || model.vocabSize >= 1 else {
            throw .invalid(
                "stablemoe's distilled router maps token ids to experts and needs create_info.vocab_size >= 1 "
                    + "(the token-id range), got \(model.vocabSize); give the model a vocabulary or set "
                    + "distill = false (the reference behaviour: stage 1 forever, no distilled router)")
        }
        v = distill ? model.vocabSize : 0
    }

    /// "expert_embeddings" (E,d) PARAM; with distill "distilled_embedding" (V,D_dist) and
    /// "distilled_centroids" (E,D_dist) PARAM (both no weight decay, so a frozen router does
    /// not shrink), "stage2_assignment" (V) int32 STATE.
    var buffers: [BufferDecl] {
        [.param("expert_embeddings", [e, d])]
            + (distill
                ? [
                    .param("distilled_embedding", [v, dd], noDecay: true),
                    .param("distilled_centroids", [e, dd], noDecay: true), .state("stage2_assignment", [v], .int32),
                ] : [])
    }

    func bind(_ b: BoundBuffers) throws(PluginFailure) {
        (expertEmbeddings, expertEmbeddingsGrad) = (try b.floats("expert_embeddings"), b.grad("expert_embeddings"))
        guard distill else { return }
        (distilledEmbedding, distilledEmbeddingGrad) = (
            try b.floats("distilled_embedding"), b.grad("distilled_embedding")
        )
        (distilledCentroids, distilledCentroidsGrad) = (
            try b.floats("distilled_centroids"), b.grad("distilled_centroids")
        )
        stage2Assignment = try b.ints("stage2_assignment")
    }

    /// From the host stream (seed, 0), in buffer order: expert centroids ~ N(0, 1/d) (rows of
    /// about unit norm: the scores only see their direction, and a unit scale keeps an
    /// optimizer step small against it), the distilled embedding and centroids
    /// ~ N(0, init_std^2); stage2_assignment = -1 (not frozen yet).
    func initBuffers(seed: UInt64) throws(PluginFailure) {
        var r = host.rng(seed: seed, stream: 0)
        let std = 1 / Float(d).squareRoot()
        for i in 0..<(e * d) { expertEmbeddings[i] = std * host.normal(&r) }
        if let emb = distilledEmbedding, let cen = distilledCentroids, let table = stage2Assignment {
            for i in 0..<(v * dd) { emb[i] = initStd * host.normal(&r) }
            for i in 0..<(e * dd) { cen[i] = initStd * host.normal(&r) }
            table.update(repeating: -1, count: v)
        }
        stats = nil
    }

    /// stage = 1 or 2 of the last training forward; distill_accuracy = fraction of its tokens
    /// whose distilled decision (argmax z, or the frozen stage-2 table) equals the centroid
    /// router's argmax s (the stage-1 assignment), only with distill = true. From the last
    /// training forward (the last forward of any kind before the first training one); nothing
    /// is reported before the first forward.
    func metrics(_ sink: MetricSink) throws(PluginFailure) {
        guard let stats else { return }
        sink.scalar("stage", Double(stats.stage))
        if let accuracy = stats.distillAccuracy { sink.scalar("distill_accuracy", accuracy) }
    }

    func shape(_ step: Step) throws(PluginFailure) -> RouterShape { .topK(1) }

    /// The stage of a forward: 1 (centroid router decides, distilled router learns) while
    /// training before the switch -- stage2_step, or round(0.1 * total_steps) (half away from
    /// zero) when stage2_step = 0, so a run with total_steps < 5 and stage2_step = 0 starts in
    /// stage 2 -- and 2 (frozen distilled router decides) from the switch on and in every
    /// non-training forward; always 1 with distill = false.
    func stage(_ step: Step) -> Int {
        guard distill else { return 1 }
        let switchStep = stage2Step > 0 ? stage2Step : Int((0.1 * Double(max(step.totalSteps, 0))).rounded())
        return step.train && step.step < switchStep ? 1 : 2
    }

    /// Whether the stage-2 table has been frozen (it is filled all at once).
    var stage2Frozen: Bool { stage2Assignment.map { v > 0 && $0[0] >= 0 } ?? false }

    /// Freeze the distilled router into stage2_assignment: table[v] = argmax_e (emb_v · c_e)
    /// for every token id v (ties -> lower expert).
    func freezeStage2Table() throws(PluginFailure) {
        guard let emb = distilledEmbedding, let cen = distilledCentroids, let table = stage2Assignment else { return }
        let z = try host.scratchFloats(v * e, "distilled logits of the whole vocabulary")  // (V,E)
        host.matmul(v, e, dd, emb, cen, z, tb: true)
        for i in 0..<(v * e) where !z[i].isFinite {
            throw .numeric(
                "non-finite distilled logit \(z[i]) for token id \(i / e), expert \(i % e) while freezing the stage-2 "
                    + "router")
        }
        for t in 0..<v { table[t] = Int32(argmax(z + t * e, e)) }
    }
}

@_cdecl("vqmoe_plugin_entry")
public func vqmoePluginEntry(_ host: UnsafePointer<vqmoe_host_api>?) -> UnsafePointer<vqmoe_plugin_desc>? {
    pluginEntry(StableMoE.self, host)
}
