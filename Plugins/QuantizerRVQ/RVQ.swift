// The `rvq` quantizer: residual VQ (Zeghidour et al. 2021, SoundStream; Lee et al. 2022, RQ-VAE):
//
//     r_0 = x,  c_l = argmin_j ||r_{l-1} - e^l_j||^2 (ties -> lowest j),  q_l = e^l_{c_l},
//     r_l = r_{l-1} - q_l,  quantized = x + sg(sum_l q_l - x)              (straight-through)
//     loss = sum_l [mse(sg(r_{l-1}), q_l) + commitment * mse(r_{l-1}, sg(q_l))]
//
// codes (N,L): level l's code picks the token's l-th expert (top-L routing). The codebooks
// (L,K,d) are one tensor, e^l_j ~ N(0, init_scale^2) from the host stream (seed, 0) in
// (L,K,d) order: a parameter (no weight decay, frozen when fine-tuning), or, with the default
// ema, state kept alive per level as SoundStream does (the kit's `CodebookUpkeep` on each
// level's input r_{l-1}): EMA updates, k-means init level by level on the first training batch,
// dead-code restart from rows of the level's input. Backward: Backward.swift.
import PluginKit
import VQMoEABI

/// How the codebook term of each level sends gradients to the codebooks (the loss VALUE and
/// the gradient to x are the same in both).
enum CodebookLoss: String {
    /// SoundStream / lucidrains: level l's term mse(sg(r_{l-1}), q_l) trains codebook l only
    /// (the residuals are built from detached quantized vectors).
    case residual
    /// RQ-VAE (Lee et al. 2022) with a learned codebook: level l's term is
    /// mse(sg(x), q_1 + ... + q_l), so codebook m also gets the terms of the levels l > m.
    case cumulative
}

final class RVQQuantizer: QuantizerPlugin {
    static let name = "rvq", version = "1.0.0", reportsMetrics = true
    /// The codebook + commitment terms use stop-gradients; the mse and the per-level code usage
    /// are those of the global batch of a data-parallel run.
    static let flags = UInt32(VQMOE_PLUGIN_STOPGRAD_LOSS | VQMOE_PLUGIN_GLOBAL_BATCH)
    static let summary =
        "Residual VQ (SoundStream; RQ-VAE): L levels, each a VQ-VAE codebook of K codes over the full width: r_0 = x, "
        + "c_l = argmin_j ||r_{l-1} - e^l_j||^2 (ties -> lowest index), q_l = e^l_{c_l}, r_l = r_{l-1} - q_l, q = sum_l q_l "
        + "with a straight-through gradient; codes (N,L): level l's code picks the l-th expert (top-L routing); "
        + "loss = sum_l mse(sg(r_{l-1}), q_l) + commitment * mse(r_{l-1}, sg(q_l)), residuals built from detached q"
    static let hyperparameters: [Hyper] = [
        .int(
            "levels", 2, min: 1, max: 16,
            "L, residual quantization levels; level l's code picks the token's l-th expert (top-L routing)"),
        .int("codebook_size", 0, min: 0, "K, codes in each level's codebook; 0 = the model's n_codes"),
        .float(
            "commitment", 0.25, min: 0,
            "commitment weight gamma: loss = sum_l mse(sg(r_{l-1}), q_l) + gamma * mse(r_{l-1}, sg(q_l))"),
        .float("init_scale", 1.0, min: 0, "codebook init: e^l_j ~ N(0, init_scale^2) at every level"),
        .bool(
            "ema", true,
            "EMA codebooks: e^l_j = EMA of the level inputs r_{l-1} assigned to j / EMA count, per level (the codebooks "
                + "become state; loss = commitment * sum_l mse(r_{l-1}, sg(q_l)))"),
        .float("ema_decay", 0.9, min: 0, max: 1, "EMA decay of the code counts and sums, in [0, 1)"),
        .float("ema_epsilon", 1e-5, min: 0, "Laplace smoothing of the EMA code counts"),
        .bool(
            "kmeans_init", true,
            "k-means init: the first training forward (state 'initialized' = 0, not frozen) runs Lloyd's k-means on "
                + "each level's input rows in turn (level l after levels < l are set) and uses the centres"),
        .int("kmeans_iters", 10, min: 1, max: 100, "Lloyd iterations of the k-means init"),
        .float(
            "dead_code_threshold", 4.0, min: 0,
            "dead-code restart per level, needs ema: after each training EMA update a code with EMA count below this "
                + "is replaced by a random row of its level's input (ema_sum = row, ema_count = 1); 0 = off"),
        .string(
            "codebook_loss", "residual", choices: ["residual", "cumulative"],
            "codebook gradient: residual = level l's term trains codebook l only (SoundStream/lucidrains, detached "
                + "residuals); cumulative = level l's term is mse(sg(x), q_1+..+q_l) and also trains the earlier "
                + "codebooks (RQ-VAE)"),
    ]

    let host: Host
    /// d input width, K codes per level, L levels.
    let d: Int, k: Int, levels: Int
    let commitment: Float, initScale: Float
    let codebookLoss: CodebookLoss
    let ema: Bool, emaDecay: Float, emaEpsilon: Float, kmeansInit: Bool, kmeansIters: Int, deadCodeThreshold: Float
    /// ema: ema_count (L,K), ema_sum (L,K,d); kmeans_init: initialized (1).
    var emaCount: UnsafeMutablePointer<Float>?, emaSum: UnsafeMutablePointer<Float>?
    var initialized: UnsafeMutablePointer<Int32>?
    /// (L,K,d) codebooks and their gradient (nil when the host freezes them).
    var codebook: UnsafeMutablePointer<Float>!, codebookGrad: UnsafeMutablePointer<Float>?
    /// Code usage of the last forward, (L) per level: (K) uses of each code; for
    /// "vqmoe.metrics/1" only (it never changes results). Training forwards win over eval ones.
    var stats: (levelCounts: [[Float]], tokens: Int, training: Bool)?

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
        (levels, commitment, initScale) = (hp.int("levels"), hp.float("commitment"), hp.float("init_scale"))
        codebookLoss = CodebookLoss(rawValue: hp.string("codebook_loss"))!
        let upkeep = try CodebookUpkeep.Settings(hp, host: host)
        (ema, emaDecay, emaEpsilon) = (upkeep.ema, upkeep.decay, upkeep.epsilon)
        (kmeansInit, kmeansIters, deadCodeThreshold) = (upkeep.kmeansInit, upkeep.kmeansIters, upkeep.deadCodeThreshold)
    }

    /// The kit's EMA, k-means and restart for level l (its own random streams).
    func upkeep(level l: Int) -> CodebookUpkeep {
        CodebookUpkeep(
            host: host, k: k, width: d, decay: emaDecay, epsilon: emaEpsilon, kmeansIters: kmeansIters,
            deadCodeThreshold: deadCodeThreshold, salt: UInt64(l) &* 0x9E37_79B9)
    }

    var codebookSize: Int { k }
    var codesPerToken: Int { levels }

    var buffers: [BufferDecl] {
        [
            ema
                ? .state("codebook", [levels, k, d])
                : .param("codebook", [levels, k, d], noDecay: true, freezeWhenFineTuning: true)
        ] + (ema ? [.state("ema_count", [levels, k]), .state("ema_sum", [levels, k, d])] : [])
            + (kmeansInit ? [.state("initialized", [1], .int32)] : [])
    }

    func bind(_ b: BoundBuffers) throws(PluginFailure) {
        (codebook, codebookGrad) = (try b.floats("codebook"), b.grad("codebook"))
        if ema { (emaCount, emaSum) = (try b.floats("ema_count"), try b.floats("ema_sum")) }
        if kmeansInit { initialized = try b.ints("initialized") }
    }

    /// e^l_j ~ N(0, init_scale^2) for every level, from the host stream (seed, 0), in (L,K,d) order.
    func initBuffers(seed: UInt64) throws(PluginFailure) {
        var r = host.rng(seed: seed, stream: 0)
        for i in 0..<(levels * k * d) { codebook[i] = initScale * host.normal(&r) }
        emaSum?.update(from: codebook, count: levels * k * d)
        emaCount?.update(repeating: 1, count: levels * k)
        initialized?.pointee = 0
        stats = nil
    }

    /// What backward needs, copied at forward time: c_l per level (L,N) and
    /// r_l = r_{l-1} - q_l, the residual left after each level (L,N,d).
    /// globalN: the global batch's tokens (every rank's; N in one process).
    /// kmeansHere: this forward ran the k-means init (the codebook parameter had no effect on it).
    struct Saved { let codes: [Int32], residuals: [Float], globalN: Int, kmeansHere: Bool }

    /// For l = 1..L (codebook index l-1): r_0 = x, c_l = argmin_j ||r_{l-1} - e^l_j||^2 (ties ->
    /// lowest j), q_l = e^l_{c_l}, r_l = r_{l-1} - q_l.
    /// quantized = sum_l q_l (SURROGATE: x); codes (N,L) with codes[t][l-1] = c_l(t);
    /// code_counts_j = #{(t, l) : c_l(t) = j} (summed over levels, so it sums to N L);
    /// loss = sum_l [mse(sg(r_{l-1}), q_l) + commitment * mse(r_{l-1}, sg(q_l))]
    ///      = (1 + commitment) * sum_l sum_t ||r_{l-1,t} - q_{l,t}||^2 / (N d).
    /// No state changes (the codebooks are parameters).
    func forward(_ step: Step, _ io: QuantizerForward) throws(PluginFailure) -> (loss: Float, context: Any?) {
        let n = io.n, x = io.x, C = codebook!
        for i in 0..<(n * d) where !x[i].isFinite { throw .numeric("non-finite input x[\(i / d)][\(i % d)] = \(x[i])") }
        for i in 0..<(levels * k * d) where !C[i].isFinite {
            throw .numeric("non-finite codebook entry [\(i / (k * d))][\(i / d % k)][\(i % d)] = \(C[i])")
        }
        let r = try host.scratchFloats(n * d, "residuals")  // (N,d) r_{l-1}, then r_l
        r.update(from: x, count: n * d)
        io.quantized.update(repeating: 0, count: n * d)
        let levelCodes = try host.scratchInts(n, "level codes")  // (N)
        let sqError = try host.scratchDoubles(n, "squared errors")  // (N)
        var savedCodes: [Int32] = [], residuals: [Float] = []
        var levelCounts: [[Float]] = []
        var sse: Double = 0
        // Codebook upkeep (training forwards): k-means init once, level by level; EMA and restarts
        // after the forward, on each level's input r_{l-1} (this rank's, and every rank's rows).
        let upkeeping = ema && step.train && !step.frozen
        let kmeansHere = kmeansInit && step.train && !step.frozen && initialized?.pointee == 0
        var inputs: [[Float]] = [], inputCodes: [[Int32]] = [], gathered: [[Float]?] = []
        for l in 0..<levels {
            let Cl = C + l * k * d  // (K,d) codebook of level l+1
            let rows =
                kmeansHere || (upkeeping && deadCodeThreshold > 0) ? try host.allgatherRows(r, rows: n, width: d) : nil
            if kmeansHere, let rows, rows.count >= d {
                try rows.withUnsafeBufferPointer { (b) throws(PluginFailure) in
                    try upkeep(level: l).kmeans(
                        codebook: Cl, count: emaCount.map { $0 + l * k }, sum: emaSum.map { $0 + l * k * d },
                        x: b.baseAddress!, n: rows.count / d, seed: step.seed)
                }
            }
            if upkeeping { inputs.append(Array(UnsafeBufferPointer(start: r, count: n * d))) }
            gathered.append(rows)
            try host.nearestCodes(x: r, n: n, d: d, codebook: Cl, k: k, codes: levelCodes, sqError: sqError)
            if upkeeping { inputCodes.append(Array(UnsafeBufferPointer(start: levelCodes, count: n))) }
            var used = [Float](repeating: 0, count: k)
            for t in 0..<n {
                let c = Int(levelCodes[t])
                io.codes[t * levels + l] = Int32(c)
                used[c] += 1
                sse += sqError[t]
                let e = Cl + c * d, rt = r + t * d, qt = io.quantized + t * d
                for i in 0..<d { rt[i] -= e[i]; qt[i] += e[i] }
            }
            if step.savesContext {
                savedCodes += UnsafeBufferPointer(start: levelCodes, count: n)
                residuals += UnsafeBufferPointer(start: r, count: n * d)
            }
            levelCounts.append(used)
        }
        if kmeansHere && gathered.first??.isEmpty == false { initialized?.pointee = 1 }
        if step.surrogate { io.quantized.update(from: x, count: n * d) }  // straight-through surrogate
        for j in 0..<k { io.counts[j] = levelCounts.reduce(0) { $0 + $1[j] } }
        // Σ squared errors, per-level code counts (L,K) and tokens of the global batch (one allreduce).
        var global = [sse] + levelCounts.joined().map(Double.init) + [Double(n)]
        try host.allreduce(&global)
        let globalN = Int(global[levels * k + 1])
        let mse = globalN > 0 ? global[0] / Double(globalN * d) : 0
        let counts = (0..<levels).map { l in global[(1 + l * k)..<(1 + (l + 1) * k)].map(Float.init) }
        if step.train || !(stats?.training ?? false) { stats = (counts, globalN, step.train) }
        if upkeeping {
            try updateCodebooks(inputs, inputCodes, gathered, counts: counts, n: n, globalN: globalN, seed: step.seed)
        }
        // EMA: the codebook terms are replaced by the EMA updates; the commitment terms stay.
        return (
            Float((ema ? Double(commitment) : 1 + Double(commitment)) * mse),
            step.savesContext
                ? Saved(codes: savedCodes, residuals: residuals, globalN: globalN, kmeansHere: kmeansHere) : nil
        )
    }

    /// After a training forward, per level l: the EMA update on this rank's inputs r_{l-1} and
    /// codes with the global counts, then the dead-code restart from every rank's input rows.
    func updateCodebooks(
        _ inputs: [[Float]], _ codes: [[Int32]], _ gathered: [[Float]?], counts: [[Float]], n: Int, globalN: Int,
        seed: UInt64
    ) throws(PluginFailure) {
        guard let emaCount, let emaSum else { return }
        let C = codebook!
        let empty = try host.scratchFloats(d, "empty batch")  // a valid pointer when this rank has no rows
        let noCode = try host.scratchInts(1, "empty batch")
        for l in 0..<levels {
            let u = upkeep(level: l), Cl = C + l * k * d, count = emaCount + l * k, sum = emaSum + l * k * d
            try inputs[l].withUnsafeBufferPointer { (xi) throws(PluginFailure) in
                try codes[l].withUnsafeBufferPointer { (ci) throws(PluginFailure) in
                    try u.emaUpdate(
                        codebook: Cl, count: count, sum: sum, x: xi.baseAddress ?? UnsafePointer(empty),
                        codes: ci.baseAddress ?? UnsafePointer(noCode), globalCounts: counts[l], n: n, globalN: globalN)
                }
            }
            guard deadCodeThreshold > 0, let rows = gathered[l], rows.count >= d else { continue }
            _ = try rows.withUnsafeBufferPointer { (b) throws(PluginFailure) in
                try u.restartDeadCodes(
                    codebook: Cl, count: count, sum: sum, x: b.baseAddress!, n: rows.count / d, seed: seed)
            }
        }
    }

    /// Per level l (0-based, the column of `codes` and the first index of the codebook):
    /// usage_perplexity_l<l> = exp(-sum_j p_j log p_j), p_j = n^l_j / N; dead_codes_l<l> =
    /// #{j : n^l_j = 0}; code_counts_l<l> = n^l (K). Totals over the summed counts
    /// n_j = sum_l n^l_j: usage_perplexity, dead_codes, code_counts. From the last training
    /// forward (the last forward of any kind before the first training one); nothing is
    /// reported before the first forward.
    func metrics(_ sink: MetricSink) throws(PluginFailure) {
        guard let stats else { return }
        for (l, counts) in stats.levelCounts.enumerated() {
            let usage = CodeUsage(counts: counts, tokens: stats.tokens)
            sink.scalar("usage_perplexity_l\(l)", usage.perplexity)
            sink.scalar("dead_codes_l\(l)", Double(usage.deadCodes))
            sink.vector("code_counts_l\(l)", counts)
        }
        let total = (0..<k).map { j in stats.levelCounts.reduce(Float(0)) { $0 + $1[j] } }
        CodeUsage(counts: total, tokens: stats.tokens * levels).report(sink)
    }
}

@_cdecl("vqmoe_plugin_entry")
public func vqmoePluginEntry(_ host: UnsafePointer<vqmoe_host_api>?) -> UnsafePointer<vqmoe_plugin_desc>? {
    pluginEntry(RVQQuantizer.self, host)
}
