import Foundation

/// Dense (SoftMoE) dispatch of the MoE layer, for routers that return dispatch and combine
/// weights instead of top-k indices (Puigcerver et al. 2024):
///
///     per group g (a sequence or an image, T tokens):  D_g, C_g (T, E·S) from the router
///     slots      X̃_g (E·S, d) = D_gᵀ X_g            (each slot a convex mix of the group's tokens)
///     experts    Ỹ_{e,g,s} = E_e(X̃_{e,g,s})         (expert e runs on its S slots of every group)
///     output     Y_g (T, d) = C_g Ỹ_g                (each token a convex mix of the slot outputs)
///     backward   dC_g = dY_g Ỹ_gᵀ,  dỸ_g = C_gᵀ dY_g,  dD_g = X_g dX̃_gᵀ,  dX_g += D_g dX̃_g
///
/// Slot rows are stored expert-major, (e, g, s), so each expert is one GEMM pair.
extension MoELayer {
    /// Slots per expert of the current step's dense routing.
    var softSlots: Int { routerShape.slotsPerExpert }

    /// The soft path's output (N,d) for N = groups·groupSize; keeps what the backward needs.
    func softForward(x: UnsafePointer<Float>, groups: Int, groupSize: Int) -> UnsafeMutablePointer<Float> {
        let d = dModel, f = config.dInner, e = config.nExperts, s = softSlots, es = e * s, t = groupSize
        let rows = e * groups * s
        let disp = ws.floats("soft.dispatch", n * es), comb = ws.floats("soft.combine", n * es)
        let xs = ws.floats("soft.xslots", rows * d), hpre = ws.floats("soft.hpre", rows * f)
        let ys = ws.floats("soft.yslots", rows * d), h = scratch.floats("h", rows * f)
        let tmp = scratch.floats("soft.tmp", es * d), out = ws.floats("soft.out", n * d)
        for g in 0..<groups {
            // X̃_g = D_gᵀ X_g  (E·S, d), then rows to (e, g, s)
            HostRuntime.sgemm(transA: true, transB: false, m: es, n: d, k: t, alpha: 1, a: disp + g * t * es, lda: es,
                              b: x + g * t * d, ldb: d, beta: 0, c: tmp, ldc: d)
            for j in 0..<es { (xs + slotRow(j, g, groups) * d).update(from: tmp + j * d, count: d) }
        }
        let per = groups * s
        for ex in 0..<e {
            let lo = ex * per
            Linear.forward(out: hpre + lo * f, inp: xs + lo * d, weight: fc1Weight.data + ex * f * d, bias: fc1Bias.data + ex * f,
                           n: per, inFeatures: d, outFeatures: f)
            config.activation.forward(out: h + lo * f, inp: hpre + lo * f, count: per * f)
            Linear.forward(out: ys + lo * d, inp: h + lo * f, weight: fc2Weight.data + ex * d * f, bias: fc2Bias.data + ex * d,
                           n: per, inFeatures: f, outFeatures: d)
        }
        for g in 0..<groups {
            for j in 0..<es { (tmp + j * d).update(from: ys + slotRow(j, g, groups) * d, count: d) }
            // Y_g = C_g Ỹ_g  (T, d)
            HostRuntime.sgemm(transA: false, transB: false, m: t, n: d, k: es, alpha: 1, a: comb + g * t * es, lda: es,
                              b: tmp, ldb: d, beta: 0, c: out + g * t * d, ldc: d)
        }
        return out
    }

    /// Row of slot j (= e·S + s) of group g in the expert-major slot buffers.
    @inline(__always) func slotRow(_ j: Int, _ g: Int, _ groups: Int) -> Int {
        let s = softSlots
        return ((j / s) * groups + g) * s + j % s
    }

    /// Backward of the soft path given dL/dY (N,d): accumulates dx, the expert gradients, and
    /// writes dD, dC (N, E·S) for the router.
    func softBackward(dy: UnsafePointer<Float>, x: UnsafePointer<Float>, dx: UnsafeMutablePointer<Float>, groups: Int, groupSize: Int)
        -> (dDispatch: UnsafeMutablePointer<Float>, dCombine: UnsafeMutablePointer<Float>) {
        let d = dModel, f = config.dInner, e = config.nExperts, s = softSlots, es = e * s, t = groupSize
        let rows = e * groups * s, per = groups * s
        let disp = ws.floats("soft.dispatch", n * es), comb = ws.floats("soft.combine", n * es)
        let xs = ws.floats("soft.xslots", rows * d), hpre = ws.floats("soft.hpre", rows * f), ys = ws.floats("soft.yslots", rows * d)
        let dD = scratch.floats("soft.dD", n * es), dC = scratch.floats("soft.dC", n * es)
        let dys = scratch.floats("soft.dyslots", rows * d), dxs = scratch.zeros("soft.dxslots", rows * d)
        let tmp = scratch.floats("soft.tmp", es * d), tmp2 = scratch.floats("soft.tmp2", es * d)
        for g in 0..<groups {
            for j in 0..<es { (tmp + j * d).update(from: ys + slotRow(j, g, groups) * d, count: d) }
            // dC_g = dY_g Ỹ_gᵀ  (T, E·S);  dỸ_g = C_gᵀ dY_g  (E·S, d)
            HostRuntime.sgemm(transA: false, transB: true, m: t, n: es, k: d, alpha: 1, a: dy + g * t * d, lda: d,
                              b: tmp, ldb: d, beta: 0, c: dC + g * t * es, ldc: es)
            HostRuntime.sgemm(transA: true, transB: false, m: es, n: d, k: t, alpha: 1, a: comb + g * t * es, lda: es,
                              b: dy + g * t * d, ldb: d, beta: 0, c: tmp2, ldc: d)
            for j in 0..<es { (dys + slotRow(j, g, groups) * d).update(from: tmp2 + j * d, count: d) }
        }
        let h = scratch.floats("h", rows * f), dh = scratch.floats("dh", rows * f), slope = scratch.floats("slope", rows * f)
        for ex in 0..<e {
            let lo = ex * per
            config.activation.forwardWithSlope(out: h + lo * f, slope: slope + lo * f, inp: hpre + lo * f, count: per * f)
            (dh + lo * f).update(repeating: 0, count: per * f)
            Linear.backward(dinp: dh + lo * f, dweight: fc2Weight.frozen ? nil : fc2Weight.grad + ex * d * f,
                            dbias: fc2Bias.frozen ? nil : fc2Bias.grad + ex * d, dout: dys + lo * d, inp: h + lo * f,
                            weight: fc2Weight.data + ex * d * f, n: per, inFeatures: f, outFeatures: d)
            Vec.multiply(dh + lo * f, slope + lo * f, per * f)
            Linear.backward(dinp: dxs + lo * d, dweight: fc1Weight.frozen ? nil : fc1Weight.grad + ex * f * d,
                            dbias: fc1Bias.frozen ? nil : fc1Bias.grad + ex * f, dout: dh + lo * f, inp: xs + lo * d,
                            weight: fc1Weight.data + ex * f * d, n: per, inFeatures: d, outFeatures: f)
        }
        for g in 0..<groups {
            for j in 0..<es { (tmp + j * d).update(from: dxs + slotRow(j, g, groups) * d, count: d) }
            // dD_g = X_g dX̃_gᵀ  (T, E·S);  dX_g += D_g dX̃_g  (T, d)
            HostRuntime.sgemm(transA: false, transB: true, m: t, n: es, k: d, alpha: 1, a: x + g * t * d, lda: d,
                              b: tmp, ldb: d, beta: 0, c: dD + g * t * es, ldc: es)
            HostRuntime.sgemm(transA: false, transB: false, m: t, n: d, k: es, alpha: 1, a: disp + g * t * es, lda: es,
                              b: tmp, ldb: d, beta: 1, c: dx + g * t * d, ldc: d)
        }
        return (dD, dC)
    }
}
