import Foundation

/// `vqmoe bench`: time the trainer's own training steps on a config's model and report tokens/s,
/// ms per step split into forward / backward / optimizer, training GFLOP/s and peak RSS.
/// Statistics are medians over the steps after `warmup`.
///
/// FLOPs are the model's analytic count (`Transformer.flopsPerToken`) with attention counted
/// over all T² scores, as the PyTorch reference (`../shared/bench/ref_moe.py`) counts them, so
/// the two GFLOP/s figures compare: training = 3 × forward.
///
/// ```swift
/// let report = try Bench(config: cfg, registry: reg, steps: 15).run()
/// print(report.json)
/// ```
public struct Bench {
    public let config: RunConfig
    public let registry: Registry
    public let steps: Int
    public let warmup: Int

    public init(config: RunConfig, registry: Registry, steps: Int, warmup: Int? = nil) {
        self.config = config
        self.registry = registry
        self.steps = steps
        self.warmup = warmup ?? min(5, steps / 3)
    }

    public struct Report {
        public var tokensPerSecond: Double
        public var msPerStep: Double
        public var msForward: Double
        public var msBackward: Double
        public var msOptimizer: Double
        public var msData: Double
        public var gflops: Double
        public var peakRSSMB: Double
        public var trainFlopsPerStep: Double
        public var lossFirst: Double
        public var lossLast: Double
        public var threads: Int
        /// Several ranks: the job's figures (nil in one process).
        public var distributed: DistributedReport?

        public var json: [String: Any] {
            var j: [String: Any] = [
                "tokens_per_s": tokensPerSecond, "ms_per_step": msPerStep, "ms_forward": msForward,
                "ms_backward": msBackward,
                "ms_optimizer": msOptimizer, "ms_data": msData, "gflops": gflops, "peak_rss_mb": peakRSSMB,
                "train_flops_per_step": trainFlopsPerStep, "loss_first": lossFirst, "loss_last": lossLast,
                "threads": threads,
            ]
            if let distributed { j.merge(distributed.json) { _, new in new } }
            return j
        }
    }

    /// A multi-rank bench (`mpirun -np N vqmoe bench ...`): the step time is the slowest rank's
    /// median, so `tokens_per_s` is the whole job's (global batch per step).
    public struct DistributedReport {
        public var ranks: Int
        public var expertParallel: Bool
        /// Share of the step the communication thread was busy, and the share the step waited
        /// for communication (exposed: not hidden behind compute); medians of the ranks' sums.
        public var commShare: Double, exposedShare: Double
        /// Of the gradient all-reduce's time, the part that ran while the backward computed.
        public var allreduceHidden: Double
        /// Per step and rank: gradient bytes all-reduced (the buffer; a ring all-reduce sends
        /// 2(N−1)/N of it), expert-exchange bytes sent to other ranks, and their sum as sent.
        public var allreduceBytes: Int, exchangeBytes: Int, sentBytes: Int
        public var peakRSSMBPerRank: [Double]

        public var json: [String: Any] {
            [
                "ranks": ranks, "expert_parallel": expertParallel, "comm_share": commShare,
                "comm_exposed_share": exposedShare, "allreduce_hidden": allreduceHidden,
                "allreduce_bytes_per_step": allreduceBytes, "exchange_bytes_per_step": exchangeBytes,
                "sent_bytes_per_step_per_rank": sentBytes, "peak_rss_mb_per_rank": peakRSSMBPerRank,
            ]
        }
    }

    public func run() throws -> Report {
        guard steps > warmup else { throw VQMoEError(.usage, "--steps must exceed the \(warmup) warm-up steps") }
        let trainer = try Trainer(config: config, registry: registry, outDir: "bench", quiet: true)
        var timings: [StepTimings] = [], losses: [Double] = [], comm = CommTotals()
        var k = 0
        for step in 0..<steps {
            if step == warmup { comm = CommTotals(start: trainer) }
            var t = StepTimings()
            let (parts, _) = try trainer.trainStep(step, timings: &t)
            losses.append(Double(parts.total))
            if let r = trainer.model.layers.first?.router {
                k = try r.shape(StepInfo(step: step, totalSteps: steps, train: true, seed: 0)).k
            }
            if step >= warmup { timings.append(t) }
        }
        var usage = rusage()
        getrusage(RUSAGE_SELF.rawValue, &usage)
        let tokens = Double(config.train.batchSize * config.model.seqLen)
        let flops = 3 * tokens * trainer.model.flopsPerToken(k: k, batch: config.train.batchSize, attention: .square)
        var step = median(timings.map(\.total))
        var distributed: DistributedReport? = nil
        if trainer.comm.isDistributed {
            let stepSum = timings.reduce(0) { $0 + $1.total } / 1000
            distributed = try comm.report(
                trainer, steps: timings.count, stepSeconds: stepSum, rss: Double(usage.ru_maxrss) / 1024)
            var all = [Double](repeating: 0, count: trainer.comm.size)
            try trainer.comm.allgatherEqual([step], into: &all)
            step = all.max()!  // the job moves at its slowest rank
        }
        return Report(
            tokensPerSecond: tokens / (step / 1000), msPerStep: step, msForward: median(timings.map(\.forward)),
            msBackward: median(timings.map(\.backward)), msOptimizer: median(timings.map(\.optimizer)),
            msData: median(timings.map(\.data)), gflops: flops / (step / 1000) / 1e9,
            peakRSSMB: Double(usage.ru_maxrss) / 1024, trainFlopsPerStep: flops, lossFirst: losses.first ?? 0,
            lossLast: losses.last ?? 0, threads: config.train.threads, distributed: distributed)
    }
}

func median(_ xs: [Double]) -> Double {
    let s = xs.sorted()
    guard !s.isEmpty else { return 0 }
    return s.count % 2 == 1 ? s[s.count / 2] : (s[s.count / 2 - 1] + s[s.count / 2]) / 2
}

/// The communication counters of a multi-rank bench, from the end of the warm-up on.
struct CommTotals {
    init() {}

    /// Reset every counter.
    init(start trainer: Trainer) {
        trainer.comm.resetTiming()
        trainer.gradientSync?.resetBytes()
        trainer.model.layers.forEach { $0.engine.exchange?.resetBytes() }
    }

    /// The ranks' figures over `steps` timed steps that took `stepSeconds` in all on this rank.
    func report(_ trainer: Trainer, steps: Int, stepSeconds: Double, rss: Double) throws -> Bench.DistributedReport {
        let comm = trainer.comm, n = Double(comm.size), per = Double(max(steps, 1))
        let (busy, waited) = comm.timing
        let grads = trainer.gradientSync
        let exchange = trainer.model.layers.reduce(0) { $0 + ($1.engine.exchange?.bytes ?? 0) }
        let allreduce = grads?.bytes ?? 0
        let mine = [
            busy / stepSeconds, waited / stepSeconds,
            (grads?.busySeconds ?? 0) > 0 ? 1 - min(grads!.waitedSeconds / grads!.busySeconds, 1) : 0, rss,
        ]
        var all = [Double](repeating: 0, count: mine.count * comm.size)
        try comm.allgatherEqual(mine, into: &all)
        func column(_ i: Int) -> [Double] { (0..<comm.size).map { all[$0 * mine.count + i] } }
        return Bench.DistributedReport(
            ranks: comm.size, expertParallel: trainer.config.model.ffn.expertParallel, commShare: median(column(0)),
            exposedShare: median(column(1)), allreduceHidden: median(column(2)),
            allreduceBytes: Int(Double(allreduce) / per), exchangeBytes: Int(Double(exchange) / per),
            sentBytes: Int((Double(allreduce) * 2 * (n - 1) / n + Double(exchange)) / per),
            peakRSSMBPerRank: column(3))
    }
}

/// `vqmoe bench CONFIG --ffn`: the dispatch cost of the config's MoE layer. Times forward +
/// backward of one layer on N = batch·seq random tokens against a dense FFN with the same
/// active FLOPs (d_inner = experts per token × d_inner), medians over the steps after warm-up.
///
/// ```swift
/// let r = try FFNBench(config: cfg, registry: reg, steps: 10).run()   // r.ratio: MoE / dense time
/// ```
public struct FFNBench {
    public let config: RunConfig
    public let registry: Registry
    public let steps: Int

    public init(config: RunConfig, registry: Registry, steps: Int) {
        self.config = config
        self.registry = registry
        self.steps = steps
    }

    public struct Report {
        public var moeMs: Double
        public var denseMs: Double
        public var ratio: Double { moeMs / denseMs }
        public var denseInner: Int
        public var tokens: Int
        public var json: [String: Any] {
            ["moe_ms": moeMs, "dense_ms": denseMs, "ratio": ratio, "dense_d_inner": denseInner, "tokens": tokens]
        }
    }

    public func run() throws -> Report {
        HostRuntime.configure(threads: config.train.threads)
        let c = config.model, d = c.dModel, n = config.train.batchSize * c.seqLen
        let builder = ModelBuilder(config: config, registry: registry)
        let dims = ModelDims(
            dModel: d, nExperts: c.ffn.nExperts, nCodes: config.nCodes, vocabSize: 256, seqLen: c.seqLen,
            totalSteps: steps, dataRoot: builder.dataRoot)
        let comp = try builder.components(dims: dims, seed: 1, quantizerSeed: 2, name: "bench")
        let moe = try MoELayer(
            config: c.ffn, dModel: d, name: "bench.ffn", router: comp.router, quantizer: comp.quantizer, seed: 3)
        let k = try comp.router?.shape(StepInfo(step: 0, totalSteps: steps, train: true, seed: 0)).k ?? 1
        let denseInner =
            max(c.ffn.composition.expertsPerToken(k: k, levels: comp.quantizer?.codesPerToken ?? 1), 1) * c.ffn.dInner
        let dense = try MoELayer(
            config: FFNConfig(mode: .dense, dInner: denseInner), dModel: d, name: "bench.dense",
            router: nil, quantizer: nil, seed: 4)
        _ = try time(dense, n: n)  // warm both code paths once
        let moeMs = try time(moe, n: n), denseMs = try time(dense, n: n)
        return Report(moeMs: moeMs, denseMs: denseMs, denseInner: denseInner, tokens: n)
    }

    /// Median ms of forward + backward of `layer` on n seeded random tokens.
    private func time(_ layer: MoELayer, n: Int) throws -> Double {
        let d = layer.dModel
        var r = HostRNG.make(seed: 5, stream: 0)
        let x = (0..<(n * d)).map { _ in HostRNG.normal(&r) }, dy = (0..<(n * d)).map { _ in HostRNG.normal(&r) }
        var y = [Float](repeating: 0, count: n * d), dx = y
        let ids = (0..<n).map { Int32($0 % 256) }
        var ms: [Double] = []
        for s in 0..<steps {
            let t0 = DispatchTime.now().uptimeNanoseconds
            let step = StepInfo(step: s, totalSteps: steps, train: true, seed: UInt64(s))
            _ = try y.withUnsafeMutableBufferPointer { yp in
                try layer.forward(
                    x: x, y: yp.baseAddress!, groups: config.train.batchSize, groupSize: config.model.seqLen,
                    tokenIDs: ids, step: step)
            }
            try dx.withUnsafeMutableBufferPointer { try layer.backward(dy: dy, dx: $0.baseAddress!) }
            layer.parameters.forEach { $0.zeroGrad() }
            if s >= min(3, steps / 3) { ms.append(Double(DispatchTime.now().uptimeNanoseconds - t0) / 1e6) }
        }
        return ms.sorted()[ms.count / 2]
    }
}
