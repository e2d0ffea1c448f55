// The `vqvae` quantizer (van den Oord et al. 2017):
//
//     c(x) = argmin_j ||x - e_j||^2 (ties -> lowest j),  q = e_c,  quantized = x + sg(q - x)
//     loss = mse(sg(x), q) + commitment * mse(x, sg(q))          (ema: commitment * mse(x, sg(q)))
//     backward: grad_x += grad_q + g * commitment * 2/M * (x - q);  grad_e_c += g * 2/M * (q - x)
//               (g = grad_loss, M = N d; no codebook gradient with ema, when frozen, or after the
//               forward that ran the k-means initialisation)
// Options: EMA codebook updates (EMA.swift), k-means initialisation (KMeans.swift), dead-code restart.
import Glibc
import PluginKit
import VQMoEABI

final class VQVAE: QuantizerPlugin {
    static let name = "vqvae", version = "1.0.0", reportsMetrics = true
    /// Stop-gradient loss terms; the mse, EMA statistics, k-means rows and dead-code rows are those
    /// of the global batch of a data-parallel run.
    static let flags = UInt32(VQMOE_PLUGIN_STOPGRAD_LOSS | VQMOE_PLUGIN_GLOBAL_BATCH)
    static let summary =
        "VQ-VAE quantizer: nearest code by L2 (ties -> lowest index), q = e_c with a straight-through gradient; loss "
        + "= mse(sg(x), q) + commitment * mse(x, sg(q)); by default the codebook stays alive with an EMA codebook "
        + "(ema), k-means init (kmeans_init: Lloyd's k-means on the first training batch, kmeans_iters iterations from "
        + "K distinct batch rows chosen by the step seed; state 'initialized' records it) and dead-code restart "
        + "(dead_code_threshold, needs ema: after each training EMA update, codes with EMA count below the threshold "
        + "become random batch rows); ema = false, kmeans_init = false, dead_code_threshold = 0 is plain VQ-VAE"
    static let hyperparameters: [Hyper] = [
        .int("codebook_size", 0, min: 0, "K, codes in the codebook; 0 = the model's n_codes"),
        .float("commitment", 0.25, min: 0, "commitment weight gamma: loss = mse(sg(x), q) + gamma * mse(x, sg(q))"),
        .float("init_scale", 1.0, min: 0, "codebook init: e_j ~ N(0, init_scale^2)"),
        .bool("ema", true, "EMA codebook updates (codebook becomes state, loss = gamma * mse(x, sg(q)))"),
        .float("ema_decay", 0.9, min: 0, max: 1, "EMA decay of the code counts and sums, in [0, 1)"),
        .float("ema_epsilon", 1e-5, min: 0, "Laplace smoothing of the EMA code counts"),
        .bool(
            "kmeans_init", true,
            "k-means init: the first training forward (state 'initialized' = 0, not frozen) runs Lloyd's k-means on "
                + "its batch (K distinct rows chosen by the step seed as initial centres) and uses the centres as the codebook"
        ),
        .int(
            "kmeans_iters", 10, min: 1, max: 100,
            "Lloyd iterations of the k-means init (assign, then move each centre to its mean; empty clusters keep their centre)"
        ),
        .float(
            "dead_code_threshold", 4.0, min: 0,
            "dead-code restart, needs ema: after each training EMA update a code with EMA count below this is replaced "
                + "by a random batch row (ema_sum = row, ema_count = 1); 0 = off"),
    ]

    let host: Host
    let d: Int, k: Int
    let commitment: Float, initScale: Float, ema: Bool, emaDecay: Float, emaEpsilon: Float
    let kmeansInit: Bool, kmeansIters: Int, deadCodeThreshold: Float
    var codebook: UnsafeMutablePointer<Float>!, codebookGrad: UnsafeMutablePointer<Float>?
    var emaCount: UnsafeMutablePointer<Float>?, emaSum: UnsafeMutablePointer<Float>?
    var initialized: UnsafeMutablePointer<Int32>?
    /// Code usage of the last training forward (of any forward before the first), for metrics only.
    var usage: (counts: [Float], tokens: Int, training: Bool, restarted: Int?)?

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
        (commitment, initScale) = (hp.float("commitment"), hp.float("init_scale"))
        let upkeep = try CodebookUpkeep.Settings(hp, host: host)
        (ema, emaDecay, emaEpsilon) = (upkeep.ema, upkeep.decay, upkeep.epsilon)
        (kmeansInit, kmeansIters, deadCodeThreshold) = (upkeep.kmeansInit, upkeep.kmeansIters, upkeep.deadCodeThreshold)
    }

    var codebookSize: Int { k }

    /// codebook (K,d): a parameter (no decay, frozen in fine-tuning), or state with ema; ema:
    /// ema_count (K), ema_sum (K,d); kmeans_init: initialized (1) int32.
    var buffers: [BufferDecl] {
        [ema ? .state("codebook", [k, d]) : .param("codebook", [k, d], noDecay: true, freezeWhenFineTuning: true)]
            + (ema ? [.state("ema_count", [k]), .state("ema_sum", [k, d])] : [])
            + (kmeansInit ? [.state("initialized", [1], .int32)] : [])
    }

    func bind(_ b: BoundBuffers) throws(PluginFailure) {
        (codebook, codebookGrad) = (try b.floats("codebook"), b.grad("codebook"))
        if ema { (emaCount, emaSum) = (try b.floats("ema_count"), try b.floats("ema_sum")) }
        if kmeansInit { initialized = try b.ints("initialized") }
    }

    /// e_j ~ N(0, init_scale^2) from the host stream (seed, 0); ema: ema_sum = codebook,
    /// ema_count = 1; kmeans_init: initialized = 0.
    func initBuffers(seed: UInt64) throws(PluginFailure) {
        var r = host.rng(seed: seed, stream: 0)
        for i in 0..<(k * d) { codebook[i] = initScale * host.normal(&r) }
        emaSum?.update(from: codebook, count: k * d)
        emaCount?.update(repeating: 1, count: k)
        initialized?.pointee = 0
        usage = nil
    }

    /// What the backward needs, copied (the EMA update of this very forward may move the codebook).
    struct Saved {
        /// x (N,d), q = e_c (N,d) before this forward's EMA update, codes (N).
        let x: [Float], q: [Float], codes: [Int32], kmeansHere: Bool
        /// M / d: the global batch's tokens (every rank's; N in one process).
        let globalN: Int
    }

    func forward(_ step: Step, _ io: QuantizerForward) throws(PluginFailure) -> (loss: Float, context: Any?) {
        let n = io.n, x = io.x, C = codebook!
        for i in 0..<(n * d) where !x[i].isFinite { throw .numeric("non-finite input x[\(i / d)][\(i % d)] = \(x[i])") }
        // k-means initialisation: once (the state records it), on the rows of the global batch.
        var kmeansHere = false, batchRows: [Float]? = nil
        if kmeansInit && step.train && !step.frozen, let initialized, initialized.pointee == 0 {
            let rows = try host.allgatherRows(x, rows: n, width: d)
            batchRows = rows
            if rows.count >= d {
                try rows.withUnsafeBufferPointer { (b) throws(PluginFailure) in
                    try kmeansInitialize(x: b.baseAddress!, n: rows.count / d, seed: step.seed)
                }
                (initialized.pointee, kmeansHere) = (1, true)
            }
        }
        for i in 0..<(k * d) where !C[i].isFinite {
            throw .numeric("non-finite codebook entry [\(i / d)][\(i % d)] = \(C[i])")
        }
        let sqError = try host.scratchDoubles(n, "squared errors")
        try host.nearestCodes(
            x: x, n: n, d: d, codebook: C, k: k, codes: io.codes, sqError: sqError, quantized: io.quantized,
            surrogate: step.surrogate)
        io.counts.update(repeating: 0, count: k)
        // Σ squared errors, code counts (K) and tokens of the global batch (one allreduce).
        var global = [Double](repeating: 0, count: k + 2)
        for t in 0..<n { io.counts[Int(io.codes[t])] += 1; global[0] += sqError[t] }
        for j in 0..<k { global[1 + j] = Double(io.counts[j]) }
        global[k + 1] = Double(n)
        try host.allreduce(&global)
        let globalN = Int(global[k + 1]), counts = global[1...k].map(Float.init)
        let mse = globalN > 0 ? global[0] / Double(globalN * d) : 0
        let saved =
            step.savesContext
            ? Saved(
                x: Array(UnsafeBufferPointer(start: x, count: n * d)),
                q: (0..<n).flatMap { Array(UnsafeBufferPointer(start: C + Int(io.codes[$0]) * d, count: d)) },
                codes: Array(UnsafeBufferPointer(start: io.codes, count: n)), kmeansHere: kmeansHere,
                globalN: globalN) : nil
        var restarted: Int? = nil
        if ema && step.train && !step.frozen {
            try emaUpdate(x: x, codes: io.codes, globalCounts: counts, n: n, globalN: globalN)
            if deadCodeThreshold > 0 {
                var rows = batchRows ?? []
                if batchRows == nil { rows = try host.allgatherRows(x, rows: n, width: d) }
                restarted = try rows.withUnsafeBufferPointer { (b) throws(PluginFailure) in
                    try restartDeadCodes(x: b.baseAddress!, n: rows.count / d, seed: step.seed)
                }
            }
        }
        if step.train || !(usage?.training ?? false) { usage = (counts, globalN, step.train, restarted) }
        return (Float(ema ? Double(commitment) * mse : (1 + Double(commitment)) * mse), saved)
    }

    func backward(_ context: Any, _ g: QuantizerBackward) throws(PluginFailure) {
        let s = context as! Saved, n = g.n
        guard n > 0 else { return }
        let scale = 2 / Float(s.globalN * d) * g.gradLoss, commit = scale * commitment
        for t in 0..<n {
            let gx = g.gradX + t * d, o = t * d
            if let gq = g.gradQuantized.map({ $0 + t * d }) {
                for i in 0..<d { gx[i] += gq[i] + commit * (s.x[o + i] - s.q[o + i]) }
            } else if commit != 0 {
                for i in 0..<d { gx[i] += commit * (s.x[o + i] - s.q[o + i]) }
            }
        }
        guard !ema, !g.frozen, !s.kmeansHere, let gC = codebookGrad, scale != 0 else { return }
        for t in 0..<n {
            let ge = gC + Int(s.codes[t]) * d, o = t * d
            for i in 0..<d { ge[i] += scale * (s.q[o + i] - s.x[o + i]) }
        }
    }

    /// usage_perplexity, dead_codes, code_counts (+ restarted_codes with dead_code_threshold).
    func metrics(_ sink: MetricSink) throws(PluginFailure) {
        guard let usage else { return }
        let u = CodeUsage(counts: usage.counts, tokens: usage.tokens)
        sink.scalar("usage_perplexity", usage.tokens > 0 ? u.perplexity : 0)
        sink.scalar("dead_codes", Double(u.deadCodes))
        if let r = usage.restarted { sink.scalar("restarted_codes", Double(r)) }
        sink.vector("code_counts", usage.counts)
    }
}

@_cdecl("vqmoe_plugin_entry")
public func vqmoePluginEntry(_ host: UnsafePointer<vqmoe_host_api>?) -> UnsafePointer<vqmoe_plugin_desc>? {
    pluginEntry(VQVAE.self, host)
}
