// stablemoe forward: scores on l2-normalised expert centroids, top-1 by the stage's router,
// sigmoid gate, stage-1 balance and distillation losses.
import Glibc
import PluginKit
import VQMoEABI

/// What backward needs, copied at forward time (host buffers may change afterwards).
final class RouterContext {
    let n: Int, d: Int, e: Int, distillDim: Int
    /// 1 or 2 (stage 2 has no losses, so no balance or distillation gradient).
    let stage: Int
    /// VQMOE_STEP_FROZEN: no parameter gradients.
    let frozen: Bool
    /// (N,d) the input x.
    let x: UnsafeMutablePointer<Float>
    /// (E,d) ê_e = e_e / r_e and (E) r_e = sqrt(||e_e||^2 + 1e-12).
    let eHat: UnsafeMutablePointer<Float>
    let eNorm: UnsafeMutablePointer<Float>
    /// (N) the chosen expert a_t and (N) its gate g_t = sigmoid(s_{t,a_t}).
    let index: UnsafeMutablePointer<Int32>
    let gate: UnsafeMutablePointer<Float>
    /// Stage 1: (N,E) p_te = softmax(s_t)_e and (E) f_e = #{t : a_t = e} / N (a constant).
    let probs: UnsafeMutablePointer<Float>?
    let fraction: UnsafeMutablePointer<Float>?
    /// Stage 1 with distill: (N) token ids, (N,D) the gathered rows emb[id_t], (E,D) the
    /// distilled centroids, (N,E) q_t = softmax(z_t).
    let ids: UnsafeMutablePointer<Int32>?
    let rows: UnsafeMutablePointer<Float>?
    let centroids: UnsafeMutablePointer<Float>?
    let q: UnsafeMutablePointer<Float>?

    init(n: Int, d: Int, e: Int, distillDim: Int, stage: Int, distill: Bool, frozen: Bool) {
        self.n = n; self.d = d; self.e = e; self.distillDim = distillDim; self.stage = stage; self.frozen = frozen
        x = .allocate(capacity: n * d)
        eHat = .allocate(capacity: e * d)
        eNorm = .allocate(capacity: e)
        index = .allocate(capacity: n)
        gate = .allocate(capacity: n)
        let one = stage == 1, learn = stage == 1 && distill
        probs = one ? .allocate(capacity: n * e) : nil
        fraction = one ? .allocate(capacity: e) : nil
        ids = learn ? .allocate(capacity: n) : nil
        rows = learn ? .allocate(capacity: n * distillDim) : nil
        centroids = learn ? .allocate(capacity: e * distillDim) : nil
        q = learn ? .allocate(capacity: n * e) : nil
    }

    deinit {
        x.deallocate(); eHat.deallocate(); eNorm.deallocate(); index.deallocate(); gate.deallocate()
        probs?.deallocate(); fraction?.deallocate(); ids?.deallocate(); rows?.deallocate()
        centroids?.deallocate(); q?.deallocate()
    }
}

/// ê_i = v_i / r_i, r_i = sqrt(||v_i||^2 + 1e-12), for the `count` rows of `width` of v.
func normalizeRows(
    _ v: UnsafePointer<Float>, count: Int, width: Int,
    _ out: UnsafeMutablePointer<Float>, _ norms: UnsafeMutablePointer<Float>
) {
    for i in 0..<count {
        let row = v + i * width, o = out + i * width
        var ss: Double = 0
        for j in 0..<width { ss += Double(row[j]) * Double(row[j]) }
        let r = (ss + 1e-12).squareRoot()
        norms[i] = Float(r)
        for j in 0..<width { o[j] = Float(Double(row[j]) / r) }
    }
}

/// Index of the largest of `count` values (ties -> the lower index).
@inline(__always) func argmax(_ row: UnsafePointer<Float>, _ count: Int) -> Int {
    var best = 0
    for j in 1..<max(count, 1) where row[j] > row[best] { best = j }
    return best
}

/// Pointers for the per-token routing loop (run on the host's pool).
struct RouteJob {
    var scores: UnsafeMutablePointer<Float>  // (N,E) s
    var distilled: UnsafeMutablePointer<Float>?  // (N,E) z, when computed
    var table: UnsafeMutablePointer<Int32>?  // (V) frozen stage-2 experts, when used
    var ids: UnsafeMutablePointer<Int32>?  // (N)
    var stage: Int
    var index: UnsafeMutablePointer<Int32>  // (N)
    var gate: UnsafeMutablePointer<Float>  // (N)
    var probs: UnsafeMutablePointer<Float>?  // (N,E) softmax(s), stage 1
    var q: UnsafeMutablePointer<Float>?  // (N,E) softmax(z), stage 1 with distill
    var ce: UnsafeMutablePointer<Float>?  // (N) -log q_{t,a_t}, stage 1 with distill
    var agree: UnsafeMutablePointer<Float>?  // (N) 1 when the distilled choice = argmax s
    var e: Int
}

/// Softmax of `count` values into `out`; returns log(sum exp) of the row.
@inline(__always) func softmax(_ row: UnsafePointer<Float>, _ count: Int, _ out: UnsafeMutablePointer<Float>) -> Float {
    var m = row[0]
    for j in 1..<count where row[j] > m { m = row[j] }
    var sum: Float = 0
    for j in 0..<count { let v = expf(row[j] - m); out[j] = v; sum += v }
    let inv = 1 / sum
    for j in 0..<count { out[j] *= inv }
    return m + logf(sum)
}

/// For tokens [begin, end):
///   stage 1: a_t = argmax_e s_te;  stage 2: a_t = table[id_t] or argmax_e z_te
///   g_t = sigmoid(s_{t,a_t}) (the paper's gate); p_t = softmax(s_t); q_t = softmax(z_t),
///   ce_t = logsumexp(z_t) - z_{t,a_t}; agree_t = [distilled choice == argmax s_t].
func routeTokens(_ user: UnsafeMutableRawPointer?, _ begin: Int64, _ end: Int64) {
    let job = user!.assumingMemoryBound(to: RouteJob.self).pointee
    let e = job.e
    for t in Int(begin)..<Int(end) {
        let s = job.scores + t * e
        let sArg = argmax(s, e)
        var dArg = -1
        if let table = job.table, let ids = job.ids {
            dArg = Int(table[Int(ids[t])])
        } else if let z = job.distilled {
            dArg = argmax(z + t * e, e)
        }
        let a = job.stage == 1 ? sArg : dArg
        job.index[t] = Int32(a)
        job.gate[t] = 1 / (1 + expf(-s[a]))
        if let p = job.probs { _ = softmax(s, e, p + t * e) }
        if let q = job.q, let z = job.distilled, let ce = job.ce {
            let lse = softmax(z + t * e, e, q + t * e)
            ce[t] = lse - z[t * e + a]
        }
        job.agree?[t] = dArg == sArg ? 1 : 0
    }
}

extension StableMoERouter {
    /// The context's array when a context is saved, else host scratch of `count` floats.
    func saved(
        _ p: UnsafeMutablePointer<Float>?, _ count: Int, _ what: String
    ) throws(PluginFailure) -> UnsafeMutablePointer<Float> {
        if let p { return p }
        return try host.scratchFloats(count, what)
    }

    func shape(_ out: UnsafeMutablePointer<vqmoe_router_shape>?) throws(PluginFailure) {
        guard let out else { throw .invalid("shape: out is NULL") }
        out.pointee.mode = VQMOE_ROUTE_TOPK
        out.pointee.k = 1
        out.pointee.slots_per_expert = 0
    }

    /// Freeze the distilled router into stage2_assignment: table[v] = argmax_e (emb_v · c_e)
    /// for every token id v (ties -> lower expert).
    func freezeStage2Table() throws(PluginFailure) {
        guard let emb = distilledEmbedding, let cen = distilledCentroids, let table = stage2Assignment else { return }
        let v = vocabSize, e = nExperts, dd = distillDim
        let z = try host.scratchFloats(v * e, "distilled logits of the whole vocabulary")  // (V,E)
        host.gemm(
            transA: false, transB: true, m: v, n: e, k: dd, alpha: 1, a: emb, lda: dd, b: cen, ldb: dd,
            beta: 0, c: z, ldc: e)
        for i in 0..<(v * e) where !z[i].isFinite {
            throw .numeric(
                "non-finite distilled logit \(z[i]) for token id \(i / e), expert \(i % e) while freezing the stage-2 router"
            )
        }
        for t in 0..<v { table[t] = Int32(argmax(z + t * e, e)) }
    }

    /// s = x ê^T, ê_e = e_e / ||e_e||                                   (N,E)
    /// z = emb[id] C^T (distilled logits)                                (N,E)
    /// stage 1: a = argmax s; aux = balance_weight * E * sum_e f_e P_e + distill_weight * mean_t CE(z_t, sg(a_t))
    ///          with f_e = #{a_t = e} / N, P_e = mean_t softmax(s_t)_e
    /// stage 2: a = argmax z (frozen as stage2_assignment at the first stage-2 training forward);
    ///          aux = 0
    /// weights = sigmoid(s_{t,a_t}) (N,1); expert_load_e = #{a_t = e}  (E)
    func forward(
        _ stepPtr: UnsafePointer<vqmoe_step_info>?, _ inPtr: UnsafePointer<vqmoe_router_input>?,
        _ outPtr: UnsafeMutablePointer<vqmoe_router_output>?,
        _ ctxOut: UnsafeMutablePointer<UnsafeMutableRawPointer?>?
    ) throws(PluginFailure) {
        ctxOut?.pointee = nil
        guard let stepPtr, let inPtr, let outPtr else { throw .invalid("forward: step, input or output is NULL") }
        try requireSize(stepPtr.pointee.struct_size, vqmoe_step_info.self, "step info")
        try requireSize(inPtr.pointee.struct_size, vqmoe_router_input.self, "router input")
        try requireSize(outPtr.pointee.struct_size, vqmoe_router_output.self, "router output")
        let step = stepPtr.pointee
        let training = step.flags & VQMOE_STEP_TRAIN != 0
        let frozen = step.flags & VQMOE_STEP_FROZEN != 0
        let saveContext = training && step.flags & VQMOE_STEP_NO_GRAD == 0
        let stage = config.stage(step)
        let emb0 = try boundEmbeddings()
        let d = dModel, e = nExperts, dd = distillDim
        let n = try rowsOf(inPtr.pointee.x, cols: d, "x")
        let x = try requireF32(inPtr.pointee.x, [n, d], "x")
        let index = try requireI32(outPtr.pointee.expert_index, [n, 1], "expert_index")
        let weights = try requireF32(outPtr.pointee.weights, [n, 1], "weights")
        let load = try requireF32(outPtr.pointee.expert_load, [e], "expert_load")
        var ids: UnsafeMutablePointer<Int32>? = nil  // (N)
        if config.distill {
            guard inPtr.pointee.token_ids.data != nil else {
                throw .invalid(
                    "stablemoe's distilled router routes by token id, but token_ids is absent (data NULL): "
                        + "this layer has no token ids (use it in a token model, or set distill = false)")
            }
            let p = try requireI32(inPtr.pointee.token_ids, [n], "token_ids")
            for t in 0..<n where p[t] < 0 || Int(p[t]) >= vocabSize {
                throw .invalid(
                    "token id \(p[t]) of token \(t) is outside the distilled router's range [0, vocab_size = \(vocabSize))"
                )
            }
            ids = p
        }

        let ctx =
            saveContext
            ? RouterContext(n: n, d: d, e: e, distillDim: dd, stage: stage, distill: config.distill, frozen: frozen)
            : nil
        // ê (E,d) and r (E)
        let eHat = try saved(ctx?.eHat, e * d, "normalised expert embeddings")
        let eNorm = try saved(ctx?.eNorm, e, "expert embedding norms")
        normalizeRows(emb0, count: e, width: d, eHat, eNorm)
        // s (N,E) = x (N,d) @ ê^T (d,E)
        let scores = try host.scratchFloats(n * e, "routing scores")
        host.gemm(
            transA: false, transB: true, m: n, n: e, k: d, alpha: 1, a: x, lda: d, b: eHat, ldb: d,
            beta: 0, c: scores, ldc: e)
        for i in 0..<(n * e) where !scores[i].isFinite {
            throw .numeric(
                "non-finite routing score \(scores[i]) for token \(i / e), expert \(i % e) (non-finite x or expert embedding?)"
            )
        }

        // Stage 2 freezes the distilled router's decisions once, at its first training forward
        // (a state update, so not when this component is FROZEN).
        if config.distill && stage == 2 && training && !frozen && !stage2Frozen { try freezeStage2Table() }
        let useTable = config.distill && stage == 2 && stage2Frozen
        // z (N,E) = emb[id] (N,D) @ C^T (D,E), when the distilled router learns or decides live.
        var z: UnsafeMutablePointer<Float>? = nil
        if config.distill && !useTable, let ids, let embD = distilledEmbedding, let cen = distilledCentroids {
            let rows = try saved(ctx?.rows, n * dd, "distilled embedding rows")
            for t in 0..<n { (rows + t * dd).update(from: embD + Int(ids[t]) * dd, count: dd) }
            let zz = try host.scratchFloats(n * e, "distilled logits")
            host.gemm(
                transA: false, transB: true, m: n, n: e, k: dd, alpha: 1, a: rows, lda: dd, b: cen, ldb: dd,
                beta: 0, c: zz, ldc: e)
            for i in 0..<(n * e) where !zz[i].isFinite {
                throw .numeric("non-finite distilled logit \(zz[i]) for token \(i / e), expert \(i % e)")
            }
            z = zz
        }

        let learn = stage == 1 && config.distill
        let gate = try saved(ctx?.gate, n, "gates")
        var probs: UnsafeMutablePointer<Float>? = nil, q: UnsafeMutablePointer<Float>? = nil
        var ce: UnsafeMutablePointer<Float>? = nil, agree: UnsafeMutablePointer<Float>? = nil
        if stage == 1 { probs = try saved(ctx?.probs, n * e, "score probabilities") }
        if learn {
            q = try saved(ctx?.q, n * e, "distilled probabilities")
            ce = try host.scratchFloats(n, "distillation cross-entropy")
        }
        if config.distill { agree = try host.scratchFloats(n, "distillation agreement") }
        host.parallelFor(
            n, grain: max(1, 4096 / (e + 1)),
            RouteJob(
                scores: scores, distilled: z, table: useTable ? stage2Assignment : nil, ids: ids, stage: stage,
                index: index, gate: gate, probs: probs, q: q, ce: ce, agree: agree, e: e), routeTokens)
        for t in 0..<n { weights[t] = gate[t] }

        // expert_load_e = #{a_t = e}; f_e = load_e / N; P_e = mean_t p_te.
        load.update(repeating: 0, count: e)
        for t in 0..<n { load[Int(index[t])] += 1 }
        var aux: Double = 0
        if stage == 1 && n > 0, let probs {
            var meanP = [Double](repeating: 0, count: e)
            for t in 0..<n { let p = probs + t * e; for j in 0..<e { meanP[j] += Double(p[j]) } }
            var balance: Double = 0
            for j in 0..<e { balance += Double(load[j]) / Double(n) * (meanP[j] / Double(n)) }
            aux += Double(config.balanceWeight) * Double(e) * balance
            if let ce {
                var sum: Double = 0
                for t in 0..<n { sum += Double(ce[t]) }
                aux += Double(config.distillWeight) * sum / Double(n)
            }
        }
        outPtr.pointee.aux_loss = Float(aux)

        // Report-only statistics (training forwards win over eval forwards).
        if training || !(stats?.fromTraining ?? false) {
            var accuracy: Double? = nil
            if let agree, n > 0 {
                var hits: Double = 0
                for t in 0..<n { hits += Double(agree[t]) }
                accuracy = hits / Double(n)
            }
            stats = RoutingStats(stage: stage, distillAccuracy: accuracy, fromTraining: training)
        }

        if let ctx {
            ctx.x.update(from: x, count: n * d)
            ctx.index.update(from: index, count: n)
            if let f = ctx.fraction { for j in 0..<e { f[j] = n > 0 ? load[j] / Float(n) : 0 } }
            if learn, let ids, let cids = ctx.ids, let cc = ctx.centroids, let cen = distilledCentroids {
                cids.update(from: ids, count: n)
                cc.update(from: cen, count: e * dd)
            }
            ctxOut?.pointee = Unmanaged.passRetained(ctx).toOpaque()
        }
    }
}
