// stablemoe forward and backward (the equations are in StableMoE.swift).
import PluginKit
import VQMoEABI

extension StableMoE {
    /// What the backward needs, copied at forward time (host buffers may change afterwards).
    struct Saved {
        /// 1 or 2 (stage 2 has no losses, so no balance or distillation gradient).
        let stage: Int
        /// x (N,d); ê_e = e_e / r_e (E,d) and r_e = sqrt(||e_e||^2 + 1e-12) (E); the chosen
        /// expert a_t (N) and its gate g_t = sigmoid(s_{t,a_t}) (N).
        let x: [Float], eHat: [Float], eNorm: [Float], index: [Int32], gate: [Float]
        /// Stage 1: p_te = softmax(s_t)_e (N,E) and f_e = #{t : a_t = e} / N (E), a constant
        /// (empty in stage 2); N is the global batch's tokens (every rank's).
        let probs: [Float], fraction: [Float], globalN: Int
        /// Stage 1 with distill: token ids (N), the gathered rows emb[id_t] (N,D), the distilled
        /// centroids (E,D), q_t = softmax(z_t) (N,E).
        let distilled: (ids: [Int32], rows: [Float], centroids: [Float], q: [Float])?
    }

    /// The token ids (N) with distill, each in [0, V); nil without.
    func tokenIDs(_ io: RouterForward) throws(PluginFailure) -> UnsafePointer<Int32>? {
        guard distill else { return nil }
        guard let ids = io.tokenIDs else {
            throw .invalid(
                "stablemoe's distilled router routes by token id, but token_ids is absent (data NULL): "
                    + "this layer has no token ids (use it in a token model, or set distill = false)")
        }
        for t in 0..<io.n where ids[t] < 0 || Int(ids[t]) >= v {
            throw .invalid(
                "token id \(ids[t]) of token \(t) is outside the distilled router's range [0, vocab_size = \(v))")
        }
        return ids
    }

    /// rows = emb[id] (N,D) and z (N,E) = rows @ C^T (D,E), the distilled logits.
    func distilledLogits(
        _ ids: UnsafePointer<Int32>, _ n: Int
    ) throws(PluginFailure) -> (rows: UnsafeMutablePointer<Float>, z: UnsafeMutablePointer<Float>) {
        let emb = distilledEmbedding!, rows = try host.scratchFloats(n * dd, "distilled embedding rows")
        for t in 0..<n { (rows + t * dd).update(from: emb + Int(ids[t]) * dd, count: dd) }
        let z = try host.scratchFloats(n * e, "distilled logits")
        host.matmul(n, e, dd, rows, distilledCentroids!, z, tb: true)
        for i in 0..<(n * e) where !z[i].isFinite {
            throw .numeric("non-finite distilled logit \(z[i]) for token \(i / e), expert \(i % e)")
        }
        return (rows, z)
    }

    func forward(_ step: Step, _ io: RouterForward) throws(PluginFailure) -> (aux: Float, context: Any?) {
        let n = io.n, stage = stage(step), learn = stage == 1 && distill, ids = try tokenIDs(io)
        let eHat = try host.scratchFloats(e * d, "normalised expert embeddings")  // ê (E,d)
        let eNorm = try host.scratchFloats(e, "expert embedding norms")  // r (E)
        normalizeRows(expertEmbeddings, count: e, width: d, eHat, eNorm)
        let scores = try host.scratchFloats(n * e, "routing scores")  // s (N,E) = x (N,d) @ ê^T (d,E)
        host.matmul(n, e, d, io.x, eHat, scores, tb: true)
        for i in 0..<(n * e) where !scores[i].isFinite {
            throw .numeric(
                "non-finite routing score \(scores[i]) for token \(i / e), expert \(i % e) "
                    + "(non-finite x or expert embedding?)")
        }
        // Stage 2 freezes the distilled router's decisions once, at its first training forward
        // (a state update, so not when this component is FROZEN).
        if distill && stage == 2 && step.train && !step.frozen && !stage2Frozen { try freezeStage2Table() }
        let useTable = distill && stage == 2 && stage2Frozen
        // z, when the distilled router learns or decides live.
        let distilled = distill && !useTable ? try distilledLogits(ids!, n) : nil
        let gate = try host.scratchFloats(n, "gates")
        let probs = stage == 1 ? try host.scratchFloats(n * e, "score probabilities") : nil
        let q = learn ? try host.scratchFloats(n * e, "distilled probabilities") : nil
        let ce = learn ? try host.scratchFloats(n, "distillation cross-entropy") : nil
        let agree = distill ? try host.scratchFloats(n, "distillation agreement") : nil
        let route = Route(
            scores: scores, distilled: distilled?.z, table: useTable ? stage2Assignment : nil, ids: ids, stage: stage,
            index: io.index!, gate: gate, probs: probs, q: q, ce: ce, agree: agree, e: e)
        host.parallelFor(n, grain: max(1, 4096 / (e + 1))) { route.run($0..<$1) }
        io.weights!.update(from: gate, count: n)
        // expert_load_e = #{a_t = e}; f_e = load_e / N; P_e = mean_t p_te.
        io.load.update(repeating: 0, count: e)
        for t in 0..<n { io.load[Int(io.index![t])] += 1 }
        var aux: Double = 0
        // Over the global batch: loads (E), probability sums (E), Σ CE and tokens, summed over the
        // ranks (one allreduce; a no-op in one process).
        var global = (0..<e).map { Double(io.load[$0]) } + [Double](repeating: 0, count: e) + [0, Double(n)]
        if stage == 1, let probs {
            for t in 0..<n { let p = probs + t * e; for j in 0..<e { global[e + j] += Double(p[j]) } }
            if let ce { global[2 * e] = (0..<n).reduce(0) { $0 + Double(ce[$1]) } }
            try host.allreduce(&global)
        }
        let globalN = Int(global[2 * e + 1])
        if stage == 1 && globalN > 0 && probs != nil {
            var balance: Double = 0
            for j in 0..<e { balance += global[j] / Double(globalN) * (global[e + j] / Double(globalN)) }
            aux += Double(balanceWeight) * Double(e) * balance
            if ce != nil { aux += Double(distillWeight) * global[2 * e] / Double(globalN) }
        }
        // Report-only statistics (training forwards win over eval forwards).
        if step.train || !(stats?.fromTraining ?? false) {
            let hits = agree.map { a in (0..<n).reduce(0.0) { $0 + Double(a[$1]) } }
            stats = (stage, n > 0 ? hits.map { $0 / Double(n) } : nil, step.train)
        }
        guard step.savesContext else { return (Float(aux), nil) }
        let copy = { (p: UnsafePointer<Float>, count: Int) in Array(UnsafeBufferPointer(start: p, count: count)) }
        return (
            Float(aux),
            Saved(
                stage: stage, x: copy(io.x, n * d), eHat: copy(eHat, e * d), eNorm: copy(eNorm, e),
                index: Array(UnsafeBufferPointer(start: io.index!, count: n)), gate: copy(gate, n),
                probs: probs.map { copy($0, n * e) } ?? [],
                fraction: stage == 1 ? (0..<e).map { j in globalN > 0 ? Float(global[j] / Double(globalN)) : 0 } : [],
                globalN: globalN,
                distilled: learn
                    ? (
                        Array(UnsafeBufferPointer(start: ids!, count: n)), copy(distilled!.rows, n * dd),
                        copy(distilledCentroids!, e * dd), copy(q!, n * e)
                    )
                    : nil)
        )
    }

    func backward(_ context: Any, _ g: RouterBackward) throws(PluginFailure) {
        let s = context as! Saved, n = g.n
        guard n > 0 else { return }
        var balanceCoef: UnsafeMutablePointer<Float>? = nil
        if s.stage == 1 && g.gradAux != 0 && balanceWeight != 0 {
            let c = try host.scratchFloats(e, "balance-loss coefficients")
            let scale = g.gradAux * balanceWeight * Float(e) / Float(s.globalN)
            for j in 0..<e { c[j] = scale * s.fraction[j] }
            balanceCoef = c
        }
        if g.gradWeights != nil || balanceCoef != nil {
            let ds = try host.scratchFloats(n * e, "routing score gradients")  // (N,E)
            ds.update(repeating: 0, count: n * e)
            host.parallelFor(n, grain: max(1, 4096 / (e + 1))) {
                scoreGrads(
                    ds, gradWeights: g.gradWeights, gate: s.gate, index: s.index, probs: s.probs,
                    balanceCoef: balanceCoef, e: e, $0..<$1)
            }
            host.matmul(n, d, e, ds, s.eHat, g.gradX, beta: 1)  // grad_x (N,d) += ds (N,E) @ ê (E,d)
            if !g.frozen, let gE = expertEmbeddingsGrad {
                // dê (E,d) = ds^T (E,N) @ x (N,d), then back through ê = e / r.
                let dHat = try host.scratchFloats(e * d, "normalised embedding gradients")
                host.matmul(e, d, n, ds, s.x, dHat, ta: true)
                for j in 0..<e {
                    let h = j * d, gj = dHat + j * d, out = gE + j * d
                    var dot: Float = 0
                    for i in 0..<d { dot += s.eHat[h + i] * gj[i] }
                    let inv = 1 / s.eNorm[j]
                    for i in 0..<d { out[i] += (gj[i] - s.eHat[h + i] * dot) * inv }
                }
            }
        }
        // Distillation: only stage 1 saved the distilled rows (stage 2: the router is frozen).
        guard !g.frozen, g.gradAux != 0, distillWeight != 0, let dist = s.distilled else { return }
        let dz = try host.scratchFloats(n * e, "distilled logit gradients")  // (N,E)
        let scale = g.gradAux * distillWeight / Float(s.globalN)
        for t in 0..<n {
            for j in 0..<e { dz[t * e + j] = scale * dist.q[t * e + j] }
            dz[t * e + Int(s.index[t])] -= scale
        }
        // grad_C (E,D) += dz^T (E,N) @ rows (N,D)
        if let gC = distilledCentroidsGrad { host.matmul(e, dd, n, dz, dist.rows, gC, ta: true, beta: 1) }
        // grad_emb[id_t] += (dz (N,E) @ C (E,D))_t
        if let gEmb = distilledEmbeddingGrad {
            let gRows = try host.scratchFloats(n * dd, "distilled embedding row gradients")
            host.matmul(n, dd, e, dz, dist.centroids, gRows)
            for t in 0..<n { for i in 0..<dd { gEmb[Int(dist.ids[t]) * dd + i] += gRows[t * dd + i] } }
        }
    }
}
