// smoe_dropout forward: logits through the frozen router, top-k(step), softmax over the
// kept logits, optional Switch balance loss.
import Glibc
import PluginKit
import VQMoEABI

/// What backward needs, copied at forward time (host buffers may change afterwards).
final class RouterContext {
    let n: Int, d: Int, e: Int, k: Int
    /// (E,d) the frozen weight W the logits were computed with.
    let w: UnsafeMutablePointer<Float>
    /// (N,E) full softmax p_te over all logits (only with a balance loss).
    let probs: UnsafeMutablePointer<Float>?
    /// (N,k) kept experts, in descending-logit order.
    let index: UnsafeMutablePointer<Int32>
    /// (N,k) routing weights g = softmax over the kept logits.
    let gates: UnsafeMutablePointer<Float>
    /// (E) f_e, the fraction of the N*k assignments that went to e (a constant for gradients).
    let fraction: UnsafeMutablePointer<Float>

    init(n: Int, d: Int, e: Int, k: Int, balance: Bool) {
        self.n = n; self.d = d; self.e = e; self.k = k
        w = .allocate(capacity: e * d)
        probs = balance ? .allocate(capacity: n * e) : nil
        index = .allocate(capacity: n * k)
        gates = .allocate(capacity: n * k)
        fraction = .allocate(capacity: e)
    }

    deinit {
        w.deallocate(); probs?.deallocate()
        index.deallocate(); gates.deallocate(); fraction.deallocate()
    }
}

extension SMoEDropoutRouter {
    /// k for this step (see `SMoEDropoutConfig.k`).
    func k(_ step: vqmoe_step_info) -> Int {
        config.k(step: step.step, totalSteps: step.total_steps, train: step.flags & VQMOE_STEP_TRAIN != 0)
    }

    func shape(
        _ stepPtr: UnsafePointer<vqmoe_step_info>?, _ out: UnsafeMutablePointer<vqmoe_router_shape>?
    ) throws(PluginFailure) {
        guard let stepPtr else { throw .invalid("shape: step is NULL") }
        guard let out else { throw .invalid("shape: out is NULL") }
        out.pointee.mode = VQMOE_ROUTE_TOPK
        out.pointee.k = Int32(k(stepPtr.pointee))
        out.pointee.slots_per_expert = 0
    }

    /// logits = x W^T, W frozen                                  (N,E)
    /// expert_index = top-k of logits, weights = softmax over the kept logits   (N,k)
    /// aux_loss = balance_weight * E * sum_e f_e * P_e, f_e = assignments to e / (N*k),
    ///            P_e = mean_t softmax(logits_t)_e (0 when balance_weight = 0)
    /// expert_load_e = assignments to e                          (E)
    ///
    /// k is the width of the host's expert_index / weights: the k shape() gave for this step
    /// in the normal flow. Any k in [k_min, k_max] is accepted, because a host may size the
    /// outputs from another call of shape() in the same run (the framework's checker sizes
    /// them once from a training step and reuses them for an eval forward); anything else
    /// is a SHAPE error.
    func forward(
        _ stepPtr: UnsafePointer<vqmoe_step_info>?, _ inPtr: UnsafePointer<vqmoe_router_input>?,
        _ outPtr: UnsafeMutablePointer<vqmoe_router_output>?,
        _ ctxOut: UnsafeMutablePointer<UnsafeMutableRawPointer?>?
    ) throws(PluginFailure) {
        ctxOut?.pointee = nil
        guard let stepPtr, let inPtr, let outPtr else { throw .invalid("forward: step, input or output is NULL") }
        try requireSize(inPtr.pointee.struct_size, vqmoe_router_input.self, "router input")
        try requireSize(outPtr.pointee.struct_size, vqmoe_router_output.self, "router output")
        let flags = stepPtr.pointee.flags
        let saveContext = flags & VQMOE_STEP_TRAIN != 0 && flags & VQMOE_STEP_NO_GRAD == 0
        let W = try boundWeight()
        let d = dModel, e = nExperts
        let n = try rowsOf(inPtr.pointee.x, cols: d, "x")
        let x = try requireF32(inPtr.pointee.x, [n, d], "x")
        let k = try allocatedK(outPtr.pointee.expert_index, expected: k(stepPtr.pointee))
        let index = try requireI32(outPtr.pointee.expert_index, [n, k], "expert_index")
        let gates = try requireF32(outPtr.pointee.weights, [n, k], "weights")
        let load = try requireF32(outPtr.pointee.expert_load, [e], "expert_load")

        // logits (N,E) = x (N,d) @ W^T (d,E)
        let logits = try host.scratchFloats(n * e, "router logits")
        host.gemm(
            transA: false, transB: true, m: n, n: e, k: d, alpha: 1, a: x, lda: d, b: W, ldb: d,
            beta: 0, c: logits, ldc: e)
        for i in 0..<(n * e) where !logits[i].isFinite {
            throw .numeric(
                "non-finite router logit \(logits[i]) for token \(i / e), expert \(i % e) (non-finite x or weight?)")
        }

        let balance = config.balanceWeight != 0
        let ctx = saveContext ? RouterContext(n: n, d: d, e: e, k: k, balance: balance) : nil
        var probs: UnsafeMutablePointer<Float>? = nil  // (N,E)
        if balance {
            if let ctxProbs = ctx?.probs {
                probs = ctxProbs
            } else {
                probs = try host.scratchFloats(n * e, "router probabilities")
            }
        }
        host.parallelFor(
            n, grain: max(1, 4096 / (e + 1)),
            RouteJob(logits: logits, probs: probs, index: index, gates: gates, e: e, k: k), routeTokens)

        // expert_load_e = #assignments; f_e = load_e / (N k); P_e = mean_t p_te.
        load.update(repeating: 0, count: e)
        for i in 0..<(n * k) { load[Int(index[i])] += 1 }
        var aux: Double = 0
        if let probs, n > 0 {
            var meanP = [Double](repeating: 0, count: e)
            for t in 0..<n { let p = probs + t * e; for j in 0..<e { meanP[j] += Double(p[j]) } }
            let assignments = Double(n * k)
            for j in 0..<e { aux += Double(load[j]) / assignments * (meanP[j] / Double(n)) }
            aux *= Double(config.balanceWeight) * Double(e)
        }
        outPtr.pointee.aux_loss = Float(aux)

        if let ctx {
            ctx.w.update(from: W, count: e * d)
            ctx.index.update(from: index, count: n * k)
            ctx.gates.update(from: gates, count: n * k)
            for j in 0..<e { ctx.fraction[j] = n > 0 ? load[j] / Float(n * k) : 0 }
            ctxOut?.pointee = Handle.context(ctx)
        }
    }

    /// The k of the host-allocated (N,k) expert_index: `expected` normally; any value in
    /// [k_min, k_max] is accepted (see forward).
    func allocatedK(_ t: vqmoe_tensor, expected: Int) throws(PluginFailure) -> Int {
        guard t.ndim == 2, let s = t.shape else {
            throw .shape("expert_index must be 2-D (N, k) with k = \(expected) for this step, got \(shapeText(t))")
        }
        let k = Int(s[1])
        guard k == expected || (k >= config.kMin && k <= config.kMax) else {
            throw .shape(
                "expert_index has k = \(k); this step routes to k = \(expected) experts "
                    + "(schedule k_min = \(config.kMin) .. k_max = \(config.kMax))")
        }
        return k
    }
}
