import Foundation

/// Sizes that come from outside (a plugin's buffer declaration, a file, a config) are multiplied
/// with overflow checks, and a run's memory is estimated before anything big is allocated: a run
/// that cannot fit is refused with the estimate and the limit instead of being OOM-killed.
///
/// The estimate (`MemoryEstimate`) counts, per rank: parameters, their gradients and the
/// optimizer's moments (Adam 2, Lion 1 per parameter); the plugins' buffers (measured on one
/// layer's instances); the activations a training step keeps for its backward (per layer: about
/// 10 (B,T,d) tensors, the attention's softmax state (blockwise attention from 512 keys: one
/// log-sum-exp per score row, (B,H,T); below: the probabilities (B,H,T,T+M)), 2 (B,T,v,d_inner + d) expert
/// tensors for v expert visits per token over the paths, Transformer-XL memory) and the head's
/// logits with their gradient (B,T,V). It is a model of the engine's buffers, not a measurement:
/// on the bench configs it is 1.00–1.14× the measured peak RSS (README "Reliability").
///
/// ```swift
/// let (count, bytes) = try MemoryBudget.checkedSize([k, d], elementBytes: 4, what: "buffer 'codebook'")
/// MemoryBudget.limitOverride = 8 << 30        // vqmoe ... --max-memory 8G
/// ```
public enum MemoryBudget {
    /// `--max-memory`: the limit used instead of the machine's available memory.
    nonisolated(unsafe) public static var limitOverride: Int?

    /// Elements and bytes of a tensor of `shape` (overflow-checked); `copies` × bytes must fit
    /// the machine's physical memory (a parameter also has a gradient).
    public static func checkedSize(
        _ shape: [Int], elementBytes: Int, copies: Int = 1, what: String,
        category: VQMoEError.Category = .plugin
    ) throws -> (count: Int, bytes: Int) {
        var count = 1
        for d in shape {
            let (p, overflow) = count.multipliedReportingOverflow(by: d)
            guard d >= 0, !overflow else {
                throw VQMoEError(category, "\(what): shape \(shape) has more elements than a 64-bit size holds")
            }
            count = p
        }
        let (bytes, o1) = count.multipliedReportingOverflow(by: elementBytes)
        let (total, o2) = bytes.multipliedReportingOverflow(by: copies)
        guard !o1, !o2, total <= physicalMemory else {
            throw VQMoEError(
                category,
                "\(what): shape \(shape) needs \(o1 || o2 ? "more than 2^63" : format(total)) bytes, more than "
                    + "this machine's memory (\(format(physicalMemory)))")
        }
        return (count, bytes)
    }

    /// Installed memory.
    public static var physicalMemory: Int { Int(sysconf(Int32(_SC_PHYS_PAGES))) * Int(sysconf(Int32(_SC_PAGESIZE))) }

    /// What a new run may use: `--max-memory` if given, else the kernel's MemAvailable, lowered
    /// by a cgroup v2 limit (containers, Slurm) when there is one. Returns the value and where
    /// it came from.
    public static func limit() -> (bytes: Int, source: String) {
        if let l = limitOverride { return (l, "--max-memory") }
        var best = (physicalMemory, "installed memory")
        if let meminfo = try? String(contentsOfFile: "/proc/meminfo", encoding: .utf8),
            let line = meminfo.split(separator: "\n").first(where: { $0.hasPrefix("MemAvailable:") }),
            let kb = line.split(separator: " ").dropFirst().first.flatMap({ Int($0) })
        {
            best = (kb * 1024, "available memory (MemAvailable)")
        }
        if let maxText = try? String(contentsOfFile: "/sys/fs/cgroup/memory.max", encoding: .utf8),
            let cap = Int(maxText.trimmingCharacters(in: .whitespacesAndNewlines))
        {
            let used =
                (try? String(contentsOfFile: "/sys/fs/cgroup/memory.current", encoding: .utf8)).flatMap {
                    Int($0.trimmingCharacters(in: .whitespacesAndNewlines))
                } ?? 0
            if cap - used < best.0 { best = (cap - used, "the cgroup's memory.max") }
        }
        return best
    }

    /// "1.23 GB" (decimal units, as `--max-memory` reads them).
    public static func format(_ bytes: Int) -> String {
        let b = Double(bytes)
        if b >= 1e9 { return String(format: "%.2f GB", b / 1e9) }
        if b >= 1e6 { return String(format: "%.1f MB", b / 1e6) }
        return String(format: "%.0f kB", b / 1e3)
    }

    /// "8G", "512M", "2000000000" → bytes (decimal units: K = 10^3, M = 10^6, G = 10^9, T = 10^12).
    public static func parse(_ text: String) -> Int? {
        let units: [Character: Double] = ["K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12]
        var t = text.uppercased()
        if t.hasSuffix("B") { t.removeLast() }
        let scale = t.last.flatMap { units[$0] } ?? 1
        if units[t.last ?? " "] != nil { t.removeLast() }
        guard let v = Double(t), v > 0, v * scale < 9e18 else { return nil }
        return Int(v * scale)
    }
}

/// A run's estimated memory per rank, by part (bytes), and the check against the limit.
public struct MemoryEstimate: Sendable {
    public var parameters = 0, gradients = 0, optimizer = 0, pluginBuffers = 0, activations = 0, logits = 0
    /// The process itself: runtime, BLAS, libraries, the dataset's arrays.
    public var baseline = 0
    public var total: Int { parameters + gradients + optimizer + pluginBuffers + activations + logits + baseline }

    /// One line per part and the total.
    public var text: String {
        let f = MemoryBudget.format
        return [
            "parameters \(f(parameters)), gradients \(f(gradients)), optimizer moments \(f(optimizer)), "
                + "plugin buffers \(f(pluginBuffers)),",
            "activations kept for the backward \(f(activations)), logits \(f(logits)), process and data \(f(baseline))",
            "estimated peak \(f(total)) per process",
        ].joined(separator: "\n")
    }

    /// Refuse when the estimate (times the processes sharing this machine) exceeds the limit.
    public func check(localRanks: Int) throws {
        let (limit, source) = MemoryBudget.limit()
        let (need, overflow) = total.multipliedReportingOverflow(by: max(localRanks, 1))
        guard overflow || need > limit else { return }
        throw VQMoEError(
            .config,
            "this run needs an estimated \(MemoryBudget.format(total))"
                + (localRanks > 1 ? " per process × \(localRanks) processes on this machine" : "")
                + ", more than the limit of \(MemoryBudget.format(limit)) (\(source)):\n\(text)\n"
                + "reduce train.batch_size, model.seq_len or the model's size, or raise --max-memory if the limit is "
                + "wrong")
    }
}

extension ModelBuilder {
    /// The estimate for this config with its dataset (vocabulary, sequence length) and head
    /// created, and one layer's router and quantizer (their buffers × layers).
    func estimate(
        model mc: TransformerConfig, dims: ModelDims, head: HeadInstance, dataset: DatasetInstance, ranks: Int
    ) throws -> MemoryEstimate {
        let c = config
        func mul(_ xs: Int...) throws -> Int {
            var p = 1
            for x in xs {
                let (r, o) = p.multipliedReportingOverflow(by: x)
                guard !o, x >= 0 else {
                    throw VQMoEError(.config, "model: the configured sizes overflow a 64-bit byte count")
                }
                p = r
            }
            return p
        }
        let d = mc.dModel, L = mc.nLayer, T = mc.seqLen, f = mc.ffn.dInner, M = mc.relative ? mc.memLen : 0
        let rows = (c.train.batchSize + ranks - 1) / ranks
        let composition = mc.ffn.composition
        let experts = composition.routes ? mc.ffn.nExperts : 1
        let localExperts = mc.ffn.expertParallel ? (experts + ranks - 1) / ranks : experts
        let shared = composition.paths.contains(.shared) ? 1 : 0
        // Host parameters: embeddings (or patch embedding), per layer attention, norms, experts.
        let embed = try mc.image.map { try mul($0.channels, $0.patch, $0.patch, d) } ?? mul(mc.vocabSize, d)
        let attention = try mul(4, d, d) + 8 * d + (mc.relative ? try mul(d, d) + 2 * d : 0)
        let ffn = try mul(localExperts + shared, 2, d, f) + (localExperts + shared) * (f + d)
        var params = embed + (try mul(T, d)) + 2 * d + (try mul(L, attention + ffn))
        // Plugin buffers: the head's, and one layer's router and quantizer times the layers.
        var plugin = head.core.buffers.reduce(0) { $0 + $1.byteCount }
        let comp = try components(dims: dims, seed: 1, name: "estimate")
        let layerPlugin = [comp.router?.core, comp.quantizer?.core].compactMap { $0 }
            .flatMap(\.buffers).reduce(0) { $0 + $1.byteCount }
        plugin += try mul(L, layerPlugin)
        params = try mul(params, 4)
        let slots = c.train.optimizer == .lion ? 1 : 2
        let heads = mc.nHead
        // Activations kept per layer for the backward, and the paths' expert tensors.
        // Expert visits per token over the paths: the router's k, the quantizer's codes, 1 each
        // for a dense or shared expert.
        let k = try comp.router?.shape(StepInfo(step: 0, totalSteps: 1, train: true, noGrad: false, seed: 0)).k ?? 1
        let visits = composition.paths.reduce(0) { n, path in
            switch path {
            case .routed: return n + max(k, 1)
            case .discrete: return n + (comp.quantizer?.codesPerToken ?? 1)
            case .dense, .shared: return n + 1
            }
        }
        // The attention's softmax state: blockwise row log-sum-exps, or the probabilities (B,H,T,K).
        let attentionSaved =
            (mc.relative ? FlashRelativeAttention.applies(keys: T + M) : FlashAttention.applies(t: T, dh: d / heads))
            ? try mul(rows, heads, T) : try mul(rows, heads, T, T + M)
        let perLayer =
            try mul(10, rows, T, d) + attentionSaved
            + (try mul(2, rows, T, visits, f + d))
            + (try mul(rows, M, d))
        let vocab = head.isLM ? head.nOut : 0
        return MemoryEstimate(
            parameters: params, gradients: params, optimizer: try mul(slots, params), pluginBuffers: plugin,
            activations: try mul(L, perLayer, 4), logits: try mul(3, rows, T, vocab, 4),
            baseline: 60_000_000 + dataset.core.buffers.reduce(0) { $0 + $1.byteCount })
    }
}
