// The `vqgan_cos` quantizer: ViT-VQGAN (Yu et al. 2022, "Vector-quantized Image Modeling with
// Improved VQGAN", §3.2 factorised and l2-normalised codes):
//
//     z = W_in x + b_in (d -> d_c),  ẑ = z/‖z‖,  ê_j = e_j/‖e_j‖
//     c = argmax_j ẑ·ê_j (ties -> lowest j),  quantized = W_out (ẑ + sg(ê_c − ẑ)) + b_out (d_c -> d)
//     loss = mse(sg(ẑ), ê_c) + commitment * mse(ẑ, sg(ê_c)) = (1 + gamma) Σ‖ẑ_t − ê_c‖² / (N d_c)
//
// By default the codebook stays alive as vector-quantize-pytorch's cosine codebooks do (the
// kit's `CodebookUpkeep`, on the normalised codes ẑ): an EMA codebook (ema; the codebook is then
// state and the loss is commitment * mse(ẑ, sg(ê_c)) alone), spherical k-means init on the first
// training batch (kmeans_init) and dead-code restart from batch rows of ẑ (dead_code_threshold).
// The restart threshold is 16 (an EMA count of tokens per batch), higher than vqvae's 4: with
// threshold 4 one of three seeds of the enwik8-mini ablation (K = 8, 2,048 tokens per batch)
// let a layer drift to perplexity 3.6 of 8 with every code still above 4 tokens; with 16 all
// three stay above 6.0 at the same test BPC (docs/results.md, quantizer ablation).
//
// Initialisation is fixed and documented rather than configurable: proj_in.weight ~ N(0, 1/d)
// (stream 0), proj_out.weight ~ N(0, 1/d_c) (stream 1) (fan-in scaled, Xavier-like), biases 0,
// codebook e_j ~ N(0, 1) (stream 2; only its direction matters: codes are l2-normalised). Every
// buffer is a parameter frozen when fine-tuning (the VQMoE fine-tuning stage freezes the whole
// quantizer). Backward: Backward.swift.
import Glibc
import PluginKit
import VQMoEABI

/// ‖v‖ below this is clamped before dividing (as torch.nn.functional.normalize).
let normEpsilon: Float = 1e-12

final class VQGANCosQuantizer: QuantizerPlugin {
    static let name = "vqgan_cos", version = "1.0.0", reportsMetrics = true
    /// The codebook + commitment terms use stop-gradients; the mse and the code usage are those
    /// of the global batch of a data-parallel run.
    static let flags = UInt32(VQMOE_PLUGIN_STOPGRAD_LOSS | VQMOE_PLUGIN_GLOBAL_BATCH)
    static let summary =
        "ViT-VQGAN quantizer (factorised, l2-normalised codes): z = W_in x + b_in (d -> code_dim), "
        + "code = argmax_j cos(z, e_j) (ties -> lowest index), quantized = W_out (ẑ + sg(ê_c - ẑ)) + b_out; "
        + "loss = mse(sg(ẑ), ê_c) + commitment * mse(ẑ, sg(ê_c))"
    static let hyperparameters: [Hyper] = [
        .int("codebook_size", 0, min: 0, "K, codes in the codebook; 0 = the model's n_codes"),
        .int(
            "code_dim", 16, min: 1, max: 1024,
            "d_c, the low-dimensional code space: z = W_in x + b_in (d -> d_c), l2-normalised"),
        .float("commitment", 0.25, min: 0, "commitment weight gamma: loss = mse(sg(ẑ), ê_c) + gamma * mse(ẑ, sg(ê_c))"),
        .bool(
            "ema", true,
            "EMA codebook on the normalised codes: e_j = EMA of the ẑ assigned to j / EMA count (the codebook becomes "
                + "state; loss = gamma * mse(ẑ, sg(ê_c)))"),
        .float("ema_decay", 0.9, min: 0, max: 1, "EMA decay of the code counts and sums, in [0, 1)"),
        .float("ema_epsilon", 1e-5, min: 0, "Laplace smoothing of the EMA code counts"),
        .bool(
            "kmeans_init", true,
            "spherical k-means init: the first training forward (state 'initialized' = 0, not frozen) clusters its "
                + "batch's ẑ (K distinct rows chosen by the step seed as initial centres, centres normalised) and uses "
                + "the centres as the codebook"),
        .int("kmeans_iters", 10, min: 1, max: 100, "Lloyd iterations of the k-means init"),
        .float(
            "dead_code_threshold", 16.0, min: 0,
            "dead-code restart, needs ema: after each training EMA update a code with EMA count below this is replaced "
                + "by a random batch row of ẑ (ema_sum = row, ema_count = 1); 0 = off. 16 (not vqvae's 4): on the "
                + "sphere a rare code starves slowly, and 16 of a 2,048-token batch restarts it before it does"),
    ]

    let host: Host
    /// d input width, d_c code width, K codes; gamma the commitment weight.
    let d: Int, dc: Int, k: Int
    let commitment: Float
    let ema: Bool, emaDecay: Float, emaEpsilon: Float, kmeansInit: Bool, kmeansIters: Int, deadCodeThreshold: Float
    /// ema: ema_count (K), ema_sum (K,d_c); kmeans_init: initialized (1).
    var emaCount: UnsafeMutablePointer<Float>?, emaSum: UnsafeMutablePointer<Float>?
    var initialized: UnsafeMutablePointer<Int32>?
    /// (d_c,d) W_in, (d_c) b_in, (d,d_c) W_out, (d) b_out, (K,d_c) codebook, and their gradients.
    var wIn: UnsafeMutablePointer<Float>!, bIn: UnsafeMutablePointer<Float>!
    var wOut: UnsafeMutablePointer<Float>!, bOut: UnsafeMutablePointer<Float>!
    var codebook: UnsafeMutablePointer<Float>!
    var wInGrad: UnsafeMutablePointer<Float>?, bInGrad: UnsafeMutablePointer<Float>?
    var wOutGrad: UnsafeMutablePointer<Float>?, bOutGrad: UnsafeMutablePointer<Float>?
    var codebookGrad: UnsafeMutablePointer<Float>?
    /// Code usage of the last training forward (or of the last forward before the first
    /// training one), for "vqmoe.metrics/1" only: it never changes results.
    var usage: (usage: CodeUsage, training: Bool)?

    init(_ model: ModelInfo, _ hp: HyperValues) throws(PluginFailure) {
        (host, d) = (model.host, model.dModel)
        guard d >= 1 else { throw .invalid("d_model = \(d): the quantizer needs d_model >= 1") }
        let requested = hp.int("codebook_size")
        k = requested > 0 ? requested : model.nCodes
        guard k >= 1 else {
            throw .invalid(
                "codebook size K = \(k): set hyperparameter codebook_size >= 1 or give the model n_codes >= 1 "
                    + "(got codebook_size = \(requested), n_codes = \(model.nCodes))")
        }
        (dc, commitment) = (hp.int("code_dim"), hp.float("commitment"))
        let upkeep = try CodebookUpkeep.Settings(hp, host: host)
        (ema, emaDecay, emaEpsilon) = (upkeep.ema, upkeep.decay, upkeep.epsilon)
        (kmeansInit, kmeansIters, deadCodeThreshold) = (upkeep.kmeansInit, upkeep.kmeansIters, upkeep.deadCodeThreshold)
    }

    /// The kit's EMA, k-means and restart, on the normalised codes ẑ (width d_c).
    var upkeep: CodebookUpkeep {
        CodebookUpkeep(
            host: host, k: k, width: dc, decay: emaDecay, epsilon: emaEpsilon, kmeansIters: kmeansIters,
            deadCodeThreshold: deadCodeThreshold)
    }

    var codebookSize: Int { k }

    var buffers: [BufferDecl] {
        [
            .param("proj_in.weight", [dc, d], freezeWhenFineTuning: true),
            .param("proj_in.bias", [dc], noDecay: true, freezeWhenFineTuning: true),
            .param("proj_out.weight", [d, dc], freezeWhenFineTuning: true),
            .param("proj_out.bias", [d], noDecay: true, freezeWhenFineTuning: true),
            ema
                ? .state("codebook", [k, dc]) : .param("codebook", [k, dc], noDecay: true, freezeWhenFineTuning: true),
        ] + (ema ? [.state("ema_count", [k]), .state("ema_sum", [k, dc])] : [])
            + (kmeansInit ? [.state("initialized", [1], .int32)] : [])
    }

    func bind(_ b: BoundBuffers) throws(PluginFailure) {
        (wIn, bIn, wOut, bOut, codebook) = (
            try b.floats("proj_in.weight"), try b.floats("proj_in.bias"), try b.floats("proj_out.weight"),
            try b.floats("proj_out.bias"), try b.floats("codebook")
        )
        (wInGrad, bInGrad, wOutGrad, bOutGrad) = (
            b.grad("proj_in.weight"), b.grad("proj_in.bias"), b.grad("proj_out.weight"), b.grad("proj_out.bias")
        )
        codebookGrad = b.grad("codebook")
        if ema { (emaCount, emaSum) = (try b.floats("ema_count"), try b.floats("ema_sum")) }
        if kmeansInit { initialized = try b.ints("initialized") }
    }

    /// W_in ~ N(0, 1/d) (host stream (seed, 0)), W_out ~ N(0, 1/d_c) (stream 1), biases 0,
    /// e_j ~ N(0, 1) (stream 2).
    func initBuffers(seed: UInt64) throws(PluginFailure) {
        var r = host.rng(seed: seed, stream: 0)
        let sIn = Float(1 / Double(d).squareRoot())
        for i in 0..<(dc * d) { wIn[i] = sIn * host.normal(&r) }
        r = host.rng(seed: seed, stream: 1)
        let sOut = Float(1 / Double(dc).squareRoot())
        for i in 0..<(d * dc) { wOut[i] = sOut * host.normal(&r) }
        bIn.update(repeating: 0, count: dc)
        bOut.update(repeating: 0, count: d)
        r = host.rng(seed: seed, stream: 2)
        for i in 0..<(k * dc) { codebook[i] = host.normal(&r) }
        emaSum?.update(from: codebook, count: k * dc)
        emaCount?.update(repeating: 1, count: k)
        initialized?.pointee = 0
        usage = nil
    }

    /// What the backward needs, copied at forward time (the optimizer may change the host's
    /// buffers before backward runs).
    struct Saved {
        /// x (N,d); ẑ = z/max(‖z‖, eps) (N,d_c) and ‖z‖ (N); z_q (N,d_c), the value fed to
        /// proj_out: ê_c (SURROGATE: ẑ); ê = e/max(‖e‖, eps) (K,d_c) and ‖e‖ (K); c(x) (N);
        /// W_in (d_c,d) and W_out (d,d_c) as the forward used them.
        let x: [Float], zHat: [Float], zNorm: [Float], zq: [Float], eHat: [Float], eNorm: [Float]
        let codes: [Int32], wIn: [Float], wOut: [Float]
        /// The global batch's tokens (every rank's; N in one process): M = globalN d_c.
        let globalN: Int
        /// This forward ran the k-means init (the codebook parameter had no effect on it).
        let kmeansHere: Bool
    }

    /// z = x W_inᵀ + b_in (N,d_c); ẑ, ê l2-normalised; codes_t = argmax_j ẑ_t·ê_j;
    /// quantized = z_q W_outᵀ + b_out (N,d) with z_q = ẑ + sg(ê_c − ẑ) (value ê_c;
    /// SURROGATE: ẑ); code_counts_j = #{t : c_t = j};
    /// loss = mse(sg(ẑ), ê_c) + gamma * mse(ẑ, sg(ê_c)) = (1 + gamma) Σ‖ẑ_t − ê_c‖² / (N d_c).
    func forward(_ step: Step, _ io: QuantizerForward) throws(PluginFailure) -> (loss: Float, context: Any?) {
        let n = io.n, x = io.x, C = codebook!
        for i in 0..<(n * d) where !x[i].isFinite { throw .numeric("non-finite input x[\(i / d)][\(i % d)] = \(x[i])") }
        for i in 0..<(k * dc) where !C[i].isFinite {
            throw .numeric("non-finite codebook entry [\(i / dc)][\(i % dc)] = \(C[i])")
        }
        let z = try host.scratchFloats(n * dc, "projected inputs")
        host.matmul(n, dc, d, x, wIn, z, tb: true)  // z (N,d_c) = x (N,d) @ W_inᵀ (d,d_c) + b_in
        for t in 0..<n { let row = z + t * dc; for i in 0..<dc { row[i] += bIn[i] } }
        for i in 0..<(n * dc) where !z[i].isFinite {
            throw .numeric("non-finite projection z[\(i / dc)][\(i % dc)] = \(z[i]) (non-finite proj_in?)")
        }
        // ẑ (N,d_c), ‖z‖ (N); ê (K,d_c), ‖e‖ (K)
        let zHat = try host.scratchFloats(n * dc, "normalised inputs"), zNorm = try host.scratchFloats(n, "input norms")
        normalizeRows(z, rows: n, cols: dc, out: zHat, norms: zNorm)
        // Spherical k-means init: once (the state records it), on the ẑ rows of the global batch.
        var kmeansHere = false, batchRows: [Float]? = nil
        if kmeansInit && step.train && !step.frozen, let initialized, initialized.pointee == 0 {
            let rows = try host.allgatherRows(zHat, rows: n, width: dc)
            batchRows = rows
            if rows.count >= dc {
                try rows.withUnsafeBufferPointer { (b) throws(PluginFailure) in
                    try upkeep.kmeans(
                        codebook: C, count: emaCount, sum: emaSum, x: b.baseAddress!, n: rows.count / dc,
                        seed: step.seed, spherical: true)
                }
                (initialized.pointee, kmeansHere) = (1, true)
            }
        }
        let eHat = try host.scratchFloats(k * dc, "normalised codes"), eNorm = try host.scratchFloats(k, "code norms")
        normalizeRows(C, rows: k, cols: dc, out: eHat, norms: eNorm)
        // codes, z_q, ‖ẑ − ê_c‖²
        let zq = try host.scratchFloats(n * dc, "quantized codes")
        let sqError = try host.scratchDoubles(n, "squared errors")
        try nearestCosine(zHat, n: n, eHat, codes: io.codes, zq: zq, sqError: sqError, surrogate: step.surrogate)
        host.matmul(n, d, dc, zq, wOut, io.quantized, tb: true)  // quantized (N,d) = z_q (N,d_c) @ W_outᵀ (d_c,d)
        for t in 0..<n { let row = io.quantized + t * d; for i in 0..<d { row[i] += bOut[i] } }  // + b_out

        io.counts.update(repeating: 0, count: k)
        // Σ squared errors, code counts (K) and tokens of the global batch (one allreduce).
        var global = [Double](repeating: 0, count: k + 2)
        for t in 0..<n { io.counts[Int(io.codes[t])] += 1; global[0] += sqError[t] }
        for j in 0..<k { global[1 + j] = Double(io.counts[j]) }
        global[k + 1] = Double(n)
        try host.allreduce(&global)
        let globalN = Int(global[k + 1])
        let mse = globalN > 0 ? global[0] / Double(globalN * dc) : 0
        let counts = global[1...k].map(Float.init)
        if step.train || !(usage?.training ?? false) {
            usage = (CodeUsage(counts: counts, tokens: globalN), step.train)
        }
        // EMA: the codebook term is replaced by the EMA update; the commitment term stays.
        let loss = Float((ema ? Double(commitment) : 1 + Double(commitment)) * mse)
        func copy<T>(_ p: UnsafePointer<T>, _ count: Int) -> [T] { Array(UnsafeBufferPointer(start: p, count: count)) }
        let saved =
            step.savesContext
            ? Saved(
                x: copy(x, n * d), zHat: copy(zHat, n * dc), zNorm: copy(zNorm, n), zq: copy(zq, n * dc),
                eHat: copy(eHat, k * dc), eNorm: copy(eNorm, k), codes: copy(io.codes, n), wIn: copy(wIn, dc * d),
                wOut: copy(wOut, d * dc), globalN: globalN, kmeansHere: kmeansHere) : nil
        if ema && step.train && !step.frozen, let emaCount, let emaSum {
            try upkeep.emaUpdate(
                codebook: C, count: emaCount, sum: emaSum, x: zHat, codes: io.codes, globalCounts: counts, n: n,
                globalN: globalN)
            if deadCodeThreshold > 0 {
                var rows = batchRows ?? []
                if batchRows == nil { rows = try host.allgatherRows(zHat, rows: n, width: dc) }
                _ = try rows.withUnsafeBufferPointer { (b) throws(PluginFailure) in
                    try upkeep.restartDeadCodes(
                        codebook: C, count: emaCount, sum: emaSum, x: b.baseAddress!, n: rows.count / dc,
                        seed: step.seed)
                }
            }
        }
        return (loss, saved)
    }

    /// For each token: c = argmax_j ẑ·ê_j (ties -> lowest j). The GEMM similarities
    /// sims (N,K) = ẑ (N,d_c) @ êᵀ (d_c,K) screen the codes; every code within float rounding
    /// of the best is re-ranked by its exact dot product in double precision, so equal codes
    /// tie exactly and the lowest index wins. z_q = ê_c (SURROGATE: ẑ, the straight-through
    /// surrogate); sqError_t = ‖ẑ_t − ê_c‖².
    func nearestCosine(
        _ zHat: UnsafePointer<Float>, n: Int, _ eHat: UnsafePointer<Float>, codes: UnsafeMutablePointer<Int32>,
        zq: UnsafeMutablePointer<Float>, sqError: UnsafeMutablePointer<Double>, surrogate: Bool
    ) throws(PluginFailure) {
        let sims = try host.scratchFloats(n * k, "cosine similarities")
        host.matmul(n, k, dc, zHat, eHat, sims, tb: true)
        host.parallelFor(n, grain: max(1, 16384 / (k * dc + 1))) { begin, end in
            for t in begin..<end {
                let zt = zHat + t * dc, st = sims + t * k
                var bestApprox = st[0]
                for j in 1..<k where st[j] > bestApprox { bestApprox = st[j] }
                let cutoff = bestApprox - 1e-4  // |ẑ·ê| <= 1: float error is far below this
                var best = 0, bestDot = -Double.infinity
                for j in 0..<k where st[j] >= cutoff {
                    let e = eHat + j * dc
                    var s: Double = 0
                    for i in 0..<dc { s += Double(zt[i]) * Double(e[i]) }
                    if s > bestDot { bestDot = s; best = j }
                }
                codes[t] = Int32(best)
                let e = eHat + best * dc
                var sq: Double = 0
                for i in 0..<dc { let diff = Double(zt[i]) - Double(e[i]); sq += diff * diff }
                sqError[t] = sq
                (zq + t * dc).update(from: surrogate ? zt : e, count: dc)
            }
        }
    }

    /// usage_perplexity = exp(−Σ_j p_j log p_j), p_j = n_j / N (1 .. K; 0 for an empty
    /// batch); dead_codes = #{j : n_j = 0}; code_counts = n (K). From the last training
    /// forward (the last forward of any kind before the first training one); nothing is
    /// reported before the first forward.
    func metrics(_ sink: MetricSink) throws(PluginFailure) { usage?.usage.report(sink) }
}

/// Row-wise l2 normalisation: out_r = v_r / max(‖v_r‖, eps), norms_r = ‖v_r‖ (in double).
func normalizeRows(
    _ v: UnsafePointer<Float>, rows: Int, cols: Int, out: UnsafeMutablePointer<Float>,
    norms: UnsafeMutablePointer<Float>
) {
    for r in 0..<rows {
        let src = v + r * cols, dst = out + r * cols
        var s: Double = 0
        for i in 0..<cols { s += Double(src[i]) * Double(src[i]) }
        let norm = s.squareRoot()
        norms[r] = Float(norm)
        let inv = 1 / max(norm, Double(normEpsilon))
        for i in 0..<cols { dst[i] = Float(Double(src[i]) * inv) }
    }
}

@_cdecl("vqmoe_plugin_entry")
public func vqmoePluginEntry(_ host: UnsafePointer<vqmoe_host_api>?) -> UnsafePointer<vqmoe_plugin_desc>? {
    pluginEntry(VQGANCosQuantizer.self, host)
}
