// smoe forward: logits, top-k, softmax over the kept logits, Switch balance loss.
import Glibc
import PluginKit
import VQMoEABI

/// What backward needs, copied at forward time (host buffers may change afterwards).
final class RouterContext {
    let n: Int, d: Int, e: Int, k: Int
    /// (N,d) the input x.
    let x: UnsafeMutablePointer<Float>
    /// (E,d) the weight W the logits were computed with.
    let w: UnsafeMutablePointer<Float>
    /// (N,E) full softmax p_te over all logits (for the balance loss).
    let probs: UnsafeMutablePointer<Float>
    /// (N,k) kept experts, in descending-logit order.
    let index: UnsafeMutablePointer<Int32>
    /// (N,k) routing weights g = softmax over the kept logits.
    let gates: UnsafeMutablePointer<Float>
    /// (E) f_e, the fraction of the N*k assignments that went to e (a constant for gradients).
    let fraction: UnsafeMutablePointer<Float>
    /// VQMOE_STEP_FROZEN: no parameter gradients.
    let frozen: Bool

    init(n: Int, d: Int, e: Int, k: Int, frozen: Bool) {
        self.n = n; self.d = d; self.e = e; self.k = k; self.frozen = frozen
        x = .allocate(capacity: n * d)
        w = .allocate(capacity: e * d)
        probs = .allocate(capacity: n * e)
        index = .allocate(capacity: n * k)
        gates = .allocate(capacity: n * k)
        fraction = .allocate(capacity: e)
    }

    deinit {
        x.deallocate(); w.deallocate(); probs.deallocate()
        index.deallocate(); gates.deallocate(); fraction.deallocate()
    }
}

extension SMoERouter {
    func shape(_ out: UnsafeMutablePointer<vqmoe_router_shape>?) throws(PluginFailure) {
        guard let out else { throw .invalid("shape: out is NULL") }
        out.pointee.mode = VQMOE_ROUTE_TOPK
        out.pointee.k = Int32(config.k)
        out.pointee.slots_per_expert = 0
    }

    /// logits = x W^T (+ b)                                   (N,E)
    /// expert_index = top-k of logits, weights = softmax over the kept logits   (N,k)
    ///                (weights = full: p_{t,i_s}, the kept experts' full-softmax probabilities)
    /// aux_loss = balance_weight * E * sum_e f_e * P_e, f_e = assignments to e / (N*k),
    ///            P_e = mean_t softmax(logits_t)_e
    /// expert_load_e = assignments to e                        (E)
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
        let d = dModel, e = nExperts, k = config.k
        let n = try rowsOf(inPtr.pointee.x, cols: d, "x")
        let x = try requireF32(inPtr.pointee.x, [n, d], "x")
        let index = try requireI32(outPtr.pointee.expert_index, [n, k], "expert_index")
        let gates = try requireF32(outPtr.pointee.weights, [n, k], "weights")
        let load = try requireF32(outPtr.pointee.expert_load, [e], "expert_load")

        // logits (N,E) = x (N,d) @ W^T (d,E) [+ b]
        let logits = try host.scratchFloats(n * e, "router logits")
        host.gemm(
            transA: false, transB: true, m: n, n: e, k: d, alpha: 1, a: x, lda: d, b: W, ldb: d,
            beta: 0, c: logits, ldc: e)
        if let b = bias {
            for t in 0..<n { let row = logits + t * e; for j in 0..<e { row[j] += b[j] } }
        }
        for i in 0..<(n * e) where !logits[i].isFinite {
            throw .numeric(
                "non-finite router logit \(logits[i]) for token \(i / e), expert \(i % e) (non-finite x or weight?)")
        }

        let ctx = saveContext ? RouterContext(n: n, d: d, e: e, k: k, frozen: flags & VQMOE_STEP_FROZEN != 0) : nil
        let probs: UnsafeMutablePointer<Float>  // (N,E)
        if let ctx { probs = ctx.probs } else { probs = try host.scratchFloats(n * e, "router probabilities") }
        host.parallelFor(
            n, grain: max(1, 4096 / (e + 1)),
            RouteJob(logits: logits, probs: probs, index: index, gates: gates, e: e, k: k), routeTokens)
        if config.fullSoftmax {
            for t in 0..<n { for s in 0..<k { gates[t * k + s] = probs[t * e + Int(index[t * k + s])] } }
        }

        // expert_load_e = #assignments; f_e = load_e / (N k); P_e = mean_t p_te.
        load.update(repeating: 0, count: e)
        for i in 0..<(n * k) { load[Int(index[i])] += 1 }
        var aux: Double = 0
        if n > 0 {
            var meanP = [Double](repeating: 0, count: e)
            for t in 0..<n { let p = probs + t * e; for j in 0..<e { meanP[j] += Double(p[j]) } }
            let assignments = Double(n * k)
            for j in 0..<e { aux += Double(load[j]) / assignments * (meanP[j] / Double(n)) }
            aux *= Double(config.balanceWeight) * Double(e)
        }
        outPtr.pointee.aux_loss = Float(aux)

        if let ctx {
            ctx.x.update(from: x, count: n * d)
            ctx.w.update(from: W, count: e * d)
            ctx.index.update(from: index, count: n * k)
            ctx.gates.update(from: gates, count: n * k)
            for j in 0..<e { ctx.fraction[j] = n > 0 ? load[j] / Float(n * k) : 0 }
            ctxOut?.pointee = Unmanaged.passRetained(ctx).toOpaque()
        }
    }
}
