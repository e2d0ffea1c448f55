import Foundation

/// Dense (SoftMoE) dispatch, for routers that return dispatch and combine weights instead of
/// top-k indices (Puigcerver et al. 2024):
///
///     per group g (a sequence or an image, T tokens):  D_g, C_g (T, E·S) from the router
///     slots      X̃_g (E·S, d) = D_gᵀ X_g            (each slot a convex mix of the group's tokens)
///     experts    Ỹ_{e,g,s} = E_e(X̃_{e,g,s})         (expert e runs on its S slots of every group)
///     output     Y_g (T, d) = C_g Ỹ_g                (each token a convex mix of the slot outputs)
///     backward   dC_g = dY_g Ỹ_gᵀ,  dỸ_g = C_gᵀ dY_g,  dD_g = X_g dX̃_gᵀ,  dX_g += D_g dX̃_g
///
/// Slot rows are stored expert-major, (e, g, s), so each expert is one GEMM pair.
///
/// ```swift
/// let soft = SoftDispatch()
/// let y = soft.forward(x: x, dispatch: d, combine: c, groups: B, groupSize: T, slots: S, bank: bank, scratch: s)
/// let (dD, dC) = soft.backward(dy: dy, x: x, dx: dx, bank: bank, scratch: s)
/// ```
public final class SoftDispatch: @unchecked Sendable {
    /// Dispatch and combine weights (N, E·S), written by the router.
    public let dispatch = Storage<Float>(), combine = Storage<Float>()
    /// Saved for the backward: slot inputs, pre-activations, slot outputs, and the output Y.
    let xslots = Storage<Float>(), hpre = Storage<Float>(), yslots = Storage<Float>(), out = Storage<Float>()
    private var groups = 0, groupSize = 0, slots = 0

    public init() {}

    /// Row of slot j (= e·S + s) of group g in the expert-major slot buffers.
    @inline(__always) func slotRow(_ j: Int, _ g: Int) -> Int { ((j / slots) * groups + g) * slots + j % slots }

    /// The soft path's output Y (N,d) for N = groups·groupSize tokens of x; keeps what the backward needs.
    public func forward(
        x: UnsafePointer<Float>, groups: Int, groupSize: Int, slots: Int, bank: ExpertBank,
        scratch: MoEScratch
    ) -> UnsafePointer<Float> {
        (self.groups, self.groupSize, self.slots) = (groups, groupSize, slots)
        let d = bank.dModel, f = bank.dInner, es = bank.count * slots, t = groupSize, n = groups * t,
            per = groups * slots
        let rows = bank.count * per
        let xs = xslots.reserve(rows * d), hp = hpre.reserve(rows * f), ys = yslots.reserve(rows * d)
        let tm = scratch.soft.tmp.reserve(es * d), y = out.reserve(n * d), disp = dispatch.pointer,
            comb = combine.pointer
        for g in 0..<groups {
            // X̃_g = D_gᵀ X_g  (E·S, d), then rows to (e, g, s)
            HostRuntime.sgemm(
                transA: true, transB: false, m: es, n: d, k: t, alpha: 1, a: disp + g * t * es, lda: es,
                b: x + g * t * d, ldb: d, beta: 0, c: tm, ldc: d)
            for j in 0..<es { (xs + slotRow(j, g) * d).update(from: tm + j * d, count: d) }
        }
        for e in 0..<bank.count {
            bank.forward(
                expert: e, rows: per, x: xs + e * per * d, hpre: hp + e * per * f, y: ys + e * per * d,
                scratch: scratch.experts)
        }
        for g in 0..<groups {
            for j in 0..<es { (tm + j * d).update(from: ys + slotRow(j, g) * d, count: d) }
            // Y_g = C_g Ỹ_g  (T, d)
            HostRuntime.sgemm(
                transA: false, transB: false, m: t, n: d, k: es, alpha: 1, a: comb + g * t * es, lda: es,
                b: tm, ldb: d, beta: 0, c: y + g * t * d, ldc: d)
        }
        return UnsafePointer(y)
    }

    /// The last forward's output Y (N,d).
    public var output: UnsafePointer<Float> { UnsafePointer(out.pointer) }

    /// Backward given dL/dY (N,d): accumulates dx and the expert gradients; returns dD, dC (N, E·S).
    public func backward(
        dy: UnsafePointer<Float>, x: UnsafePointer<Float>, dx: UnsafeMutablePointer<Float>, bank: ExpertBank,
        scratch: MoEScratch
    ) -> (dDispatch: UnsafePointer<Float>, dCombine: UnsafePointer<Float>) {
        let d = bank.dModel, f = bank.dInner, es = bank.count * slots, t = groupSize, n = groups * t,
            per = groups * slots
        let rows = bank.count * per
        let disp = dispatch.pointer, comb = combine.pointer, xs = xslots.pointer, hp = hpre.pointer, ys = yslots.pointer
        let sc = scratch.soft
        let dDp = sc.dD.reserve(n * es), dCp = sc.dC.reserve(n * es), dy2 = sc.dys.reserve(rows * d),
            dx2 = sc.dxs.zeros(rows * d)
        let tm = sc.tmp.reserve(es * d), tm2 = sc.tmp2.reserve(es * d)
        for g in 0..<groups {
            for j in 0..<es { (tm + j * d).update(from: ys + slotRow(j, g) * d, count: d) }
            // dC_g = dY_g Ỹ_gᵀ  (T, E·S);  dỸ_g = C_gᵀ dY_g  (E·S, d)
            HostRuntime.sgemm(
                transA: false, transB: true, m: t, n: es, k: d, alpha: 1, a: dy + g * t * d, lda: d,
                b: tm, ldb: d, beta: 0, c: dCp + g * t * es, ldc: es)
            HostRuntime.sgemm(
                transA: true, transB: false, m: es, n: d, k: t, alpha: 1, a: comb + g * t * es, lda: es,
                b: dy + g * t * d, ldb: d, beta: 0, c: tm2, ldc: d)
            for j in 0..<es { (dy2 + slotRow(j, g) * d).update(from: tm2 + j * d, count: d) }
        }
        for e in 0..<bank.count {
            bank.backward(
                expert: e, rows: per, x: xs + e * per * d, hpre: hp + e * per * f, dy: dy2 + e * per * d,
                dx: dx2 + e * per * d, scratch: scratch.experts)
        }
        for g in 0..<groups {
            for j in 0..<es { (tm + j * d).update(from: dx2 + slotRow(j, g) * d, count: d) }
            // dD_g = X_g dX̃_gᵀ  (T, E·S);  dX_g += D_g dX̃_g  (T, d)
            HostRuntime.sgemm(
                transA: false, transB: true, m: t, n: es, k: d, alpha: 1, a: x + g * t * d, lda: d,
                b: tm, ldb: d, beta: 0, c: dDp + g * t * es, ldc: es)
            HostRuntime.sgemm(
                transA: false, transB: false, m: t, n: d, k: es, alpha: 1, a: disp + g * t * es, lda: es,
                b: tm, ldb: d, beta: 1, c: dx + g * t * d, ldc: d)
        }
        return (UnsafePointer(dDp), UnsafePointer(dCp))
    }
}

/// Temporaries of the soft dispatch, shared by every layer of a model.
public final class SoftScratch: @unchecked Sendable {
    /// dL/dD, dL/dC (N, E·S); slot gradients (E·G·S, d); one group's slots (E·S, d) twice.
    let dD = Storage<Float>(), dC = Storage<Float>(), dys = Storage<Float>(), dxs = Storage<Float>()
    let tmp = Storage<Float>(), tmp2 = Storage<Float>()
    /// g_p·dL/dy for a gated soft output (N,d).
    let gated = Storage<Float>()
    var bytes: Int { [dD, dC, dys, dxs, tmp, tmp2, gated].reduce(0) { $0 + $1.bytes } }
}
