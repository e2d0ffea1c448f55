import Foundation

/// `vqmoe bench`: time training steps of a config's model and report tokens/s, ms per step
/// split into forward / backward / optimizer, training GFLOP/s and peak RSS. Statistics are
/// medians over the steps after `warmup`.
///
/// FLOPs are analytic and counted exactly as the PyTorch reference (`../shared/bench/ref_moe.py`)
/// counts them, so the two GFLOP/s figures compare: forward = 2·P_active·N + L·4·N·T·d,
/// training = 3 × forward, with P_active per layer = 4d² + n_ffn·2·d·d_ff + routing.
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

        public var json: [String: Any] {
            ["tokens_per_s": tokensPerSecond, "ms_per_step": msPerStep, "ms_forward": msForward, "ms_backward": msBackward,
             "ms_optimizer": msOptimizer, "ms_data": msData, "gflops": gflops, "peak_rss_mb": peakRSSMB,
             "train_flops_per_step": trainFlopsPerStep, "loss_first": lossFirst, "loss_last": lossLast, "threads": threads]
        }
    }

    /// Analytic training FLOPs of one step, as ref_moe.py's flops_per_step.
    public static func trainFlops(_ m: TransformerConfig, batch: Int, k: Int) -> Double {
        let d = Double(m.dModel), f = Double(m.ffn.dInner), l = Double(m.nLayer), v = Double(m.vocabSize)
        let e = Double(m.ffn.nExperts), t = Double(m.seqLen), n = Double(batch) * t
        let nFFN: Double, route: Double
        switch m.ffn.mode {
        case .dense: nFFN = 1; route = 0
        case .smoe: nFFN = Double(k); route = d * e
        case .vqmoe: nFFN = Double(k + 1); route = 2 * d * e + 2 * d
        case .vqmoeFinetune: nFFN = 1; route = d * e
        }
        let pActive = l * (4 * d * d + nFFN * 2 * d * f + route) + d * v
        return 3 * (2 * pActive * n + l * 4 * n * t * d)
    }

    public func run() throws -> Report {
        guard steps > warmup else { throw VQMoEError(.usage, "--steps must exceed the \(warmup) warm-up steps") }
        HostRuntime.configure(threads: config.train.threads)
        let built = try ModelBuilder(config: config, registry: registry).build()
        let model = built.model, ds = built.dataset
        let opt = AdamOptimizer(parameters: model.parameters.filter { !$0.frozen }, config: config.train)
        let bs = config.train.batchSize
        var tData: [Double] = [], tFwd: [Double] = [], tBwd: [Double] = [], tOpt: [Double] = [], tStep: [Double] = []
        var losses: [Double] = []
        var k = 0
        func now() -> Double { Double(DispatchTime.now().uptimeNanoseconds) / 1e6 }
        for step in 0..<steps {
            let t0 = now()
            try model.beginStep(step)
            guard let batch = try ds.read(.train, index: step, batchSize: bs) else { throw VQMoEError(.data, "no train batch") }
            let t1 = now()
            let parts = try batch.inputsInt.withUnsafeBufferPointer { x in
                try batch.targets.withUnsafeBufferPointer { y in
                    try model.forward(tokens: x.baseAddress!, targets: y.baseAddress!, batch: bs, step: step, train: true)
                }
            }
            let t2 = now()
            try model.backward()
            let t3 = now()
            clipGradients(opt.parameters, maxNorm: config.train.gradClip)
            opt.step(lr: learningRate(step: step, config: config.train))
            model.zeroGrads()
            let t4 = now()
            losses.append(Double(parts.total))
            if let r = model.layers.first?.router { k = try r.shape(StepInfo(step: step, totalSteps: steps, train: true, seed: 0)).k }
            if step >= warmup {
                tData.append(t1 - t0); tFwd.append(t2 - t1); tBwd.append(t3 - t2); tOpt.append(t4 - t3); tStep.append(t4 - t0)
            }
        }
        func median(_ xs: [Double]) -> Double { let s = xs.sorted(); return s.count % 2 == 1 ? s[s.count / 2] : (s[s.count / 2 - 1] + s[s.count / 2]) / 2 }
        var usage = rusage()
        getrusage(RUSAGE_SELF.rawValue, &usage)
        var mc = config.model
        mc.vocabSize = ds.vocabSize
        let flops = Bench.trainFlops(mc, batch: bs, k: k)
        let step = median(tStep)
        return Report(tokensPerSecond: Double(bs * config.model.seqLen) / (step / 1000), msPerStep: step, msForward: median(tFwd),
                      msBackward: median(tBwd), msOptimizer: median(tOpt), msData: median(tData), gflops: flops / (step / 1000) / 1e9,
                      peakRSSMB: Double(usage.ru_maxrss) / 1024, trainFlopsPerStep: flops, lossFirst: losses.first ?? 0,
                      lossLast: losses.last ?? 0, threads: config.train.threads)
    }
}

/// `vqmoe bench CONFIG --ffn`: the dispatch cost of the config's MoE layer. Times forward +
/// backward of one layer on N = batch·seq random tokens against a dense FFN with the same
/// active FLOPs (d_inner = k·d_inner per expert, plus one more expert for VQMoE's discrete
/// path), medians over the steps after warm-up.
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
        var dims = ModelDims(dModel: d, nExperts: c.ffn.nExperts, nCodes: config.nCodes, vocabSize: 256, seqLen: c.seqLen,
                             totalSteps: steps, dataRoot: builder.dataRoot)
        dims.vocabSize = 256
        let router = try config.router.map { try RouterInstance(builder.instance(.router, $0, dims: dims, seed: 1, name: "bench.router")) }
        let quantizer = try config.quantizer.map { try QuantizerInstance(builder.instance(.quantizer, $0, dims: dims, seed: 2, name: "bench.quantizer")) }
        let moe = try MoELayer(config: c.ffn, dModel: d, name: "bench.ffn", router: c.ffn.usesRouter ? router : nil,
                               quantizer: c.ffn.usesQuantizer ? quantizer : nil, seed: 3)
        let k = try router?.shape(StepInfo(step: 0, totalSteps: steps, train: true, seed: 0)).k ?? 1
        let active = c.ffn.mode == .dense ? 1 : (c.ffn.usesRouter ? k : 0) + (c.ffn.usesQuantizer ? 1 : 0)
        let denseInner = max(active, 1) * c.ffn.dInner
        let dense = try MoELayer(config: FFNConfig(mode: .dense, dInner: denseInner), dModel: d, name: "bench.dense",
                                 router: nil, quantizer: nil, seed: 4)
        var r = HostRNG.make(seed: 5, stream: 0)
        let x = (0..<(n * d)).map { _ in HostRNG.normal(&r) }
        var y = [Float](repeating: 0, count: n * d), dx = y
        let dy = (0..<(n * d)).map { _ in HostRNG.normal(&r) }
        let ids = (0..<n).map { Int32($0 % 256) }
        func time(_ layer: MoELayer) throws -> Double {
            var ms: [Double] = []
            for s in 0..<steps {
                let t0 = DispatchTime.now().uptimeNanoseconds
                let step = StepInfo(step: s, totalSteps: steps, train: true, seed: UInt64(s))
                _ = try y.withUnsafeMutableBufferPointer { yp in
                    try layer.forward(x: x, y: yp.baseAddress!, groups: config.train.batchSize, groupSize: c.seqLen, tokenIDs: ids, step: step)
                }
                try dx.withUnsafeMutableBufferPointer { try layer.backward(dy: dy, dx: $0.baseAddress!) }
                layer.parameters.forEach { $0.zeroGrad() }
                if s >= min(3, steps / 3) { ms.append(Double(DispatchTime.now().uptimeNanoseconds - t0) / 1e6) }
            }
            return ms.sorted()[ms.count / 2]
        }
        _ = try time(dense)  // warm both code paths once
        let moeMs = try time(moe), denseMs = try time(dense)
        return Report(moeMs: moeMs, denseMs: denseMs, denseInner: denseInner, tokens: n)
    }
}
