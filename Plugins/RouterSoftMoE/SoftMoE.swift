// The `softmoe` router (Puigcerver et al. 2024, "From Sparse to Soft Mixtures of Experts"): every
// slot is a convex combination of a group's tokens (dispatch), every token output a convex
// combination of the slot outputs (combine):
//
//     normalize: L = scale * (x̂ Φ̂), x̂_t = x_t/||x_t||, Φ̂_j = Φ_j/||Φ_j||     (N,E*S); else L = x Φ
//     dispatch D[t,j] = softmax over the tokens t of t's group of L[·,j]        (N,E*S)
//     combine  C[t,j] = softmax over the slots j of L[t,·]                      (N,E*S)
//     expert_load_e = sum_t sum_s C[t, e*S+s]: the combine mass each expert contributes to the
//       tokens' outputs (sums to N, like top-k token counts; the dispatch mass would be the same
//       n_groups for every expert), aux_loss = 0
//     backward: dL from the column softmax (dispatch) and the row softmax (combine), then
//       normalize: dx̂ = scale dL Φ̂^T, grad_x_t += (dx̂_t - x̂_t (x̂_t·dx̂_t)) / r_t;
//                  dΦ̂ = scale x̂^T dL, grad_Φ_j += (dΦ̂_j - Φ̂_j (Φ̂_j·dΦ̂_j)) / ρ_j;
//                  grad_scale += sum dL ⊙ (x̂ Φ̂)
//       plain:     grad_x += dL Φ^T, grad_Φ += x^T dL
//       (no parameter gradients when frozen; aux_loss is 0, so grad_aux_loss is unused)
import Glibc
import PluginKit
import VQMoEABI

final class SoftMoE: RouterPlugin {
    static let name = "softmoe", version = "1.0.0"
    /// No batch statistics (dispatch normalises within a group): the same on every rank of a data-parallel run.
    static let flags = UInt32(VQMOE_PLUGIN_GLOBAL_BATCH)
    static let summary =
        "Soft MoE (Puigcerver et al. 2024): dense routing over E*S slots; logits = scale * (x/||x||) (Phi/||Phi||), "
        + "dispatch = softmax over a group's tokens per slot, combine = softmax over the slots per token"
    static let hyperparameters: [Hyper] = [
        .int(
            "slots_per_expert", 1, min: 1, max: 64,
            "S, slots per expert: E*S dispatch/combine columns, slot (e, s) is column e*S + s"),
        .bool(
            "normalize", true,
            "l2-normalise x per token and Phi per slot, times a learnable scale (false = plain x Phi)"),
    ]

    let host: Host
    /// d, E, S (slots per expert) and E*S (dispatch/combine columns).
    let d: Int, e: Int, slots: Int, es: Int
    /// The paper's normalisation (false: plain x Phi).
    let normalize: Bool
    /// (d, E*S) slot parameters Phi, (1) the learnable logit scale (normalize only), and their gradients.
    var phi: UnsafeMutablePointer<Float>!, phiGrad: UnsafeMutablePointer<Float>?
    var scale: UnsafeMutablePointer<Float>?, scaleGrad: UnsafeMutablePointer<Float>?

    init(_ model: ModelInfo, _ hp: HyperValues) throws(PluginFailure) {
        (host, d, e) = (model.host, model.dModel, model.nExperts)
        guard d >= 1 else { throw .invalid("d_model = \(d): the router needs d_model >= 1") }
        guard e >= 1 else { throw .invalid("n_experts = \(e): the router needs n_experts >= 1") }
        (slots, normalize) = (hp.int("slots_per_expert"), hp.bool("normalize"))
        es = e * slots
    }

    /// "phi" (d, E*S) PARAM; with normalize "scale" (1) PARAM, no decay.
    var buffers: [BufferDecl] { [.param("phi", [d, es])] + (normalize ? [.param("scale", [1], noDecay: true)] : []) }

    func bind(_ b: BoundBuffers) throws(PluginFailure) {
        (phi, phiGrad) = (try b.floats("phi"), b.grad("phi"))
        if normalize { (scale, scaleGrad) = (try b.floats("scale"), b.grad("scale")) }
    }

    /// Phi ~ N(0, 1/d) from the host stream (seed, 0); scale = 1.
    func initBuffers(seed: UInt64) throws(PluginFailure) {
        var r = host.rng(seed: seed, stream: 0)
        let std = 1 / Float(d).squareRoot()
        for i in 0..<(d * es) { phi[i] = std * host.normal(&r) }
        scale?.pointee = 1
    }

    func shape(_ step: Step) throws(PluginFailure) -> RouterShape { .dense(slotsPerExpert: slots) }

    /// What the backward needs, copied: x̂ (N,d) and r (N) (plain: x), Φ̂ (d,E*S) and ρ (E*S)
    /// (plain: Φ), P = x̂ Φ̂ (N,E*S) (the logits before the scale), D and C (N,E*S), the groups
    /// and the scale (1 without normalize).
    struct Saved {
        let xHat: [Float], xNorm: [Float], phiHat: [Float], phiNorm: [Float]
        let cosine: [Float], dispatch: [Float], combine: [Float]
        let groups: Int, groupSize: Int, scale: Float
    }

    func forward(_ step: Step, _ io: RouterForward) throws(PluginFailure) -> (aux: Float, context: Any?) {
        let n = io.n, groups = io.nGroups, groupSize = io.groupSize
        let s: Float = scale?.pointee ?? 1
        guard s.isFinite else { throw .numeric("the logit scale is \(s)") }
        // normalize: x̂ = x / r, Φ̂ = Φ / ρ; plain: x and Φ as they are.
        var xHat: UnsafePointer<Float> = io.x, phiHat = UnsafePointer<Float>(phi!)
        var xNorm: UnsafeMutablePointer<Float>? = nil, phiNorm: UnsafeMutablePointer<Float>? = nil
        if normalize {
            let xh = try host.scratchFloats(n * d, "normalised x")
            let ph = try host.scratchFloats(d * es, "normalised phi")
            (xNorm, phiNorm) = (try host.scratchFloats(n, "token norms"), try host.scratchFloats(es, "slot norms"))
            normalizeRows(io.x, count: n, width: d, xh, xNorm!)
            normalizeColumns(phi, rows: d, cols: es, ph, phiNorm!)
            (xHat, phiHat) = (UnsafePointer(xh), UnsafePointer(ph))
        }
        // P (N,ES) = x̂ (N,d) @ Φ̂ (d,ES);  L = scale * P (plain: L = P = x Φ)
        let cosine = try host.scratchFloats(n * es, "cosine logits")
        host.matmul(n, es, d, xHat, phiHat, cosine)
        let logits = normalize ? try host.scratchFloats(n * es, "slot logits") : cosine
        if normalize { for i in 0..<(n * es) { logits[i] = s * cosine[i] } }
        for i in 0..<(n * es) where !logits[i].isFinite {
            throw .numeric(
                "non-finite slot logit \(logits[i]) for token \(i / es), slot \(i % es) (non-finite x or phi?)")
        }
        let dispatch = io.dispatch!, combine = io.combine!
        let work = try host.scratchFloats(2 * groups * es, "dispatch column statistics")
        host.parallelFor(groups, grain: max(1, 4096 / max(1, groupSize * es))) {
            dispatchSoftmax(
                logits, dispatch, colMax: work, colSum: work + groups * es, groupSize: groupSize, es: es, $0..<$1)
        }
        host.parallelFor(n, grain: max(1, 4096 / (es + 1))) { combineSoftmax(logits, combine, es: es, $0..<$1) }
        // expert_load_e = combine mass of e's slots over the tokens.
        io.load.update(repeating: 0, count: e)
        for t in 0..<n { for j in 0..<es { io.load[j / slots] += combine[t * es + j] } }
        guard step.savesContext else { return (0, nil) }
        let copy = { (p: UnsafePointer<Float>, count: Int) in Array(UnsafeBufferPointer(start: p, count: count)) }
        return (
            0,
            Saved(
                xHat: copy(xHat, n * d), xNorm: xNorm.map { copy($0, n) } ?? [], phiHat: copy(phiHat, d * es),
                phiNorm: phiNorm.map { copy($0, es) } ?? [], cosine: copy(cosine, n * es),
                dispatch: copy(dispatch, n * es),
                combine: copy(combine, n * es), groups: groups, groupSize: groupSize, scale: s)
        )
    }

    func backward(_ context: Any, _ g: RouterBackward) throws(PluginFailure) {
        let c = context as! Saved, n = g.n
        guard n > 0, g.gradDispatch != nil || g.gradCombine != nil else { return }  // nothing flows back
        let dl = try host.scratchFloats(n * es, "slot logit gradients")  // (N,ES)
        dl.update(repeating: 0, count: n * es)
        if let gD = g.gradDispatch {
            let dots = try host.scratchFloats(c.groups * es, "dispatch gradient column sums")
            host.parallelFor(c.groups, grain: max(1, 4096 / max(1, c.groupSize * es))) {
                dispatchGrads(dl, c.dispatch, gD, dots: dots, groupSize: c.groupSize, es: es, $0..<$1)
            }
        }
        if let gC = g.gradCombine {
            host.parallelFor(n, grain: max(1, 4096 / (es + 1))) { combineGrads(dl, c.combine, gC, es: es, $0..<$1) }
        }
        guard normalize else {
            host.matmul(n, d, es, dl, c.phiHat, g.gradX, tb: true, beta: 1)  // grad_x (N,d) += dL (N,ES) @ Φ^T (ES,d)
            if !g.frozen, let gPhi = phiGrad {  // grad_Φ (d,ES) += x^T (d,N) @ dL (N,ES)
                host.matmul(d, es, n, c.xHat, dl, gPhi, ta: true, beta: 1)
            }
            return
        }
        // dx̂ (N,d) = scale * dL (N,ES) @ Φ̂^T (ES,d), then back through x̂ = x / r.
        let dxHat = try host.scratchFloats(n * d, "normalised x gradients")
        host.matmul(n, d, es, dl, c.phiHat, dxHat, alpha: c.scale, tb: true)
        for t in 0..<n {
            let h = t * d, gx = dxHat + t * d, out = g.gradX + t * d
            var dot: Float = 0
            for i in 0..<d { dot += c.xHat[h + i] * gx[i] }
            let inv = 1 / c.xNorm[t]
            for i in 0..<d { out[i] += (gx[i] - c.xHat[h + i] * dot) * inv }
        }
        guard !g.frozen else { return }
        if let gPhi = phiGrad {
            // dΦ̂ (d,ES) = scale * x̂^T (d,N) @ dL (N,ES), then back through Φ̂_j = Φ_j / ρ_j.
            let dPhiHat = try host.scratchFloats(d * es, "normalised phi gradients")
            host.matmul(d, es, n, c.xHat, dl, dPhiHat, alpha: c.scale, ta: true)
            var dots = [Float](repeating: 0, count: es)
            for i in 0..<(d * es) { dots[i % es] += c.phiHat[i] * dPhiHat[i] }
            for i in 0..<(d * es) { gPhi[i] += (dPhiHat[i] - c.phiHat[i] * dots[i % es]) / c.phiNorm[i % es] }
        }
        if let gScale = scaleGrad {
            var sum: Double = 0
            for i in 0..<(n * es) { sum += Double(dl[i]) * Double(c.cosine[i]) }
            gScale.pointee += Float(sum)
        }
    }
}

@_cdecl("vqmoe_plugin_entry")
public func vqmoePluginEntry(_ host: UnsafePointer<vqmoe_host_api>?) -> UnsafePointer<vqmoe_plugin_desc>? {
    pluginEntry(SoftMoE.self, host)
}
