import Foundation

/// Result of an evaluation pass.
public struct EvalResult: Sendable {
    public var loss: Double
    public var bpc: Double { loss / log(2.0) }
    public var count: Int
    public var accuracy: Double
}

/// Result of `vqmoe train`.
public struct TrainResult: Sendable {
    public var steps: Int
    public var bestValid: EvalResult?
    public var bestStep: Int
    public var test: EvalResult?
    public var wallSeconds: Double
    public var tokensPerSecond: Double
    public var outDir: String
    /// Stopped early (interrupt or `stopAfter`); `last` holds the state to resume from.
    public var interrupted = false
}

/// The training loop: Adam(W) with warmup + cosine schedule and global-norm clipping,
/// validation every `eval_every` steps, the best-validation checkpoint kept (safetensors +
/// JSON sidecar), and the test split evaluated with it at the end. Writes
/// `OUT/metrics.jsonl` (one JSON object per line) and `OUT/config.json`.
///
/// ```swift
/// let result = try Trainer(config: cfg, registry: reg, outDir: "runs/x").run()
/// print(result.test!.bpc)
/// ```
public final class Trainer {
    public let config: RunConfig
    public let outDir: String
    public let dataset: DatasetInstance
    public let model: Transformer
    public let optimizer: AdamOptimizer
    /// Where progress goes (a progress bar on a terminal, plain lines otherwise).
    public var progress: ProgressReporter
    private var metrics: FileHandle?
    private var previousProbe: (router: [[Int32]], discrete: [[Int32]])?

    public init(config: RunConfig, registry: Registry, outDir: String, dataRoot: String? = nil, quiet: Bool = false) throws {
        self.config = config
        self.outDir = outDir
        HostRuntime.configure(threads: config.train.threads)
        let built = try ModelBuilder(config: config, registry: registry, dataRoot: dataRoot).build()
        dataset = built.dataset
        model = built.model
        optimizer = AdamOptimizer(parameters: model.parameters.filter { !$0.frozen }, config: config.train)
        progress = ProgressReporter(total: config.train.steps, quiet: quiet)
    }

    private func log(_ object: [String: Any]) {
        guard let metrics, let data = try? JSONSerialization.data(withJSONObject: object, options: [.sortedKeys]) else { return }
        metrics.write(data)
        metrics.write(Data("\n".utf8))
    }

    /// Mean loss over `split` (at most `maxBatches` batches; 0 = the whole split).
    public func evaluate(_ split: Split, maxBatches: Int = 0) throws -> EvalResult {
        let bs = config.train.batchSize
        var sum = 0.0, count = 0, correct = 0, index = 0
        while maxBatches == 0 || index < maxBatches {
            guard let batch = try dataset.read(split, index: index, batchSize: bs) else { break }
            let parts = try batch.inputsInt.withUnsafeBufferPointer { x in
                try batch.targets.withUnsafeBufferPointer { y in
                    try model.forward(tokens: x.baseAddress!, targets: y.baseAddress!, batch: bs, step: index, train: false)
                }
            }
            sum += parts.lossSum
            count += parts.count
            correct += parts.correct
            index += 1
        }
        guard count > 0 else { throw VQMoEError(.data, "the \(split.name) split of '\(config.data.name)' has no targets to evaluate") }
        return EvalResult(loss: sum / Double(count), count: count, accuracy: Double(correct) / Double(count))
    }

    /// Load OUT/NAME.safetensors into the model and evaluate `split` in full.
    public func evaluateCheckpoint(_ name: String, _ split: Split) throws -> EvalResult {
        let path = "\(outDir)/\(name).safetensors"
        try model.load(try Checkpoint.read(path: path), path: path)
        return try evaluate(split)
    }

    /// Top-1 expert of every token of a fixed probe batch (validation batch 0), per layer and
    /// path (router, discrete), from an eval-mode forward.
    public func probeAssignments() throws -> (router: [[Int32]], discrete: [[Int32]]) {
        let bs = config.train.batchSize
        guard let batch = try dataset.read(.valid, index: 0, batchSize: bs) ?? dataset.read(.train, index: 0, batchSize: bs) else { return ([], []) }
        _ = try batch.inputsInt.withUnsafeBufferPointer { x in
            try batch.targets.withUnsafeBufferPointer { y in
                try model.forward(tokens: x.baseAddress!, targets: y.baseAddress!, batch: bs, step: 0, train: false)
            }
        }
        let tops = model.layers.map { $0.lastTop1() }
        return (tops.compactMap(\.router), tops.compactMap(\.discrete))
    }

    /// Fraction of positions whose value is unchanged, per layer (the consistency score).
    static func consistency(_ a: [[Int32]], _ b: [[Int32]]) -> [Double] {
        zip(a, b).map { x, y in Double(zip(x, y).filter { $0 == $1 }.count) / Double(max(x.count, 1)) }
    }

    /// One optimizer step on train batch `step`; returns the loss parts and the gradient norm.
    public func trainStep(_ step: Int) throws -> (LossParts, Float) {
        let bs = config.train.batchSize
        try model.beginStep(step)
        guard let batch = try dataset.read(.train, index: step, batchSize: bs) else {
            throw VQMoEError(.data, "the train split of '\(config.data.name)' gave no batch \(step)")
        }
        let parts = try batch.inputsInt.withUnsafeBufferPointer { x in
            try batch.targets.withUnsafeBufferPointer { y in
                try model.forward(tokens: x.baseAddress!, targets: y.baseAddress!, batch: bs, step: step, train: true)
            }
        }
        try model.backward()
        let norm = clipGradients(optimizer.parameters, maxNorm: config.train.gradClip)
        guard norm.isFinite else { throw VQMoEError(.numeric, "non-finite gradient norm at step \(step)") }
        optimizer.step(lr: learningRate(step: step, config: config.train))
        model.zeroGrads()
        return (parts, norm)
    }

    /// Checkpoint the model (and optimizer) to OUT/NAME.safetensors + OUT/NAME.json.
    public func saveCheckpoint(_ name: String, step: Int, extra: [String: Any] = [:]) throws {
        let path = "\(outDir)/\(name).safetensors"
        try Checkpoint.write(path: path, tensors: model.checkpointTensors(optimizer: optimizer), metadata: ["step": String(step)])
        var side: [String: Any] = ["format": Checkpoint.format, "step": step, "config": config.json,
                                   "checkpoint": "\(name).safetensors", "optimizer_steps": optimizer.t]
        side.merge(extra) { _, new in new }
        let data = try JSONSerialization.data(withJSONObject: side, options: [.prettyPrinted, .sortedKeys])
        try Checkpoint.atomicWrite(data, to: "\(outDir)/\(name).json")
    }

    /// Set by SIGINT/SIGTERM (see `installInterruptHandlers`); the loop checkpoints and stops.
    nonisolated(unsafe) public static var interruptRequested: sig_atomic_t = 0

    /// SIGINT and SIGTERM ask the training loop to write `last` and stop after the current step.
    public static func installInterruptHandlers() {
        signal(SIGINT) { _ in Trainer.interruptRequested = 1 }
        signal(SIGTERM) { _ in Trainer.interruptRequested = 1 }
    }

    /// Run state saved in `last.json` beside `last.safetensors`, enough to continue exactly.
    struct RunState {
        var nextStep = 0
        var best: EvalResult?
        var bestStep = -1
        var probe: (router: [[Int32]], discrete: [[Int32]])?

        var json: [String: Any] {
            var o: [String: Any] = ["next_step": nextStep, "best_step": bestStep]
            if let best { o["best_valid"] = ["loss": best.loss, "count": best.count, "accuracy": best.accuracy] }
            if let probe { o["probe"] = ["router": probe.router.map { $0.map(Int.init) }, "discrete": probe.discrete.map { $0.map(Int.init) }] }
            return o
        }

        init() {}
        init(json o: [String: Any], path: String) throws {
            guard let n = o["next_step"] as? Int, let bs = o["best_step"] as? Int else {
                throw VQMoEError(.checkpoint, "\(path): missing next_step / best_step")
            }
            nextStep = n
            bestStep = bs
            if let b = o["best_valid"] as? [String: Any], let l = b["loss"] as? Double, let c = b["count"] as? Int {
                best = EvalResult(loss: l, count: c, accuracy: b["accuracy"] as? Double ?? 0)
            }
            if let p = o["probe"] as? [String: Any], let r = p["router"] as? [[Int]], let d = p["discrete"] as? [[Int]] {
                probe = (r.map { $0.map(Int32.init) }, d.map { $0.map(Int32.init) })
            }
        }
    }

    /// Train from scratch, or continue a run from OUT/last.* (`resume`). The loss curve of an
    /// interrupted and resumed run equals the uninterrupted one: batches, dropout masks, plugin
    /// randomness and the learning rate follow from the step number, and the checkpoint holds
    /// every parameter, plugin state buffer and optimizer moment. `stopAfter` ends the loop
    /// early as an interrupt would (checkpoint `last`, no test evaluation).
    public func run(resume: Bool = false, stopAfter: Int? = nil) throws -> TrainResult {
        try FileManager.default.createDirectory(atPath: outDir, withIntermediateDirectories: true)
        var state = RunState()
        let metricsPath = "\(outDir)/metrics.jsonl"
        if resume {
            let ckPath = "\(outDir)/last.safetensors"
            try model.load(try Checkpoint.read(path: ckPath), optimizer: optimizer, path: ckPath)
            guard let data = FileManager.default.contents(atPath: "\(outDir)/last.json"),
                  let side = try JSONSerialization.jsonObject(with: data) as? [String: Any],
                  let run = side["run"] as? [String: Any], let t = side["optimizer_steps"] as? Int else {
                throw VQMoEError(.checkpoint, "\(outDir)/last.json: missing or not a vqmoe checkpoint sidecar")
            }
            state = try RunState(json: run, path: "\(outDir)/last.json")
            optimizer.t = t
            // Keep the metrics of the steps the checkpoint covers; drop anything logged after it.
            let old = (try? String(contentsOfFile: metricsPath, encoding: .utf8)) ?? ""
            let kept = old.split(separator: "\n").filter { line in
                guard let o = try? JSONSerialization.jsonObject(with: Data(line.utf8)) as? [String: Any], let st = o["step"] as? Int else { return false }
                return st < state.nextStep
            }
            try (kept.joined(separator: "\n") + (kept.isEmpty ? "" : "\n")).write(toFile: metricsPath, atomically: true, encoding: .utf8)
            progress.note("resuming \(config.name) at step \(state.nextStep) from \(ckPath)")
        } else {
            let cfgData = try JSONSerialization.data(withJSONObject: config.json, options: [.prettyPrinted, .sortedKeys])
            try cfgData.write(to: URL(fileURLWithPath: "\(outDir)/config.json"))
            _ = FileManager.default.createFile(atPath: metricsPath, contents: nil)
        }
        metrics = FileHandle(forWritingAtPath: metricsPath)
        metrics?.seekToEndOfFile()
        defer { try? metrics?.close() }

        let t = config.train
        let tokensPerStep = t.batchSize * config.model.seqLen
        let start = Date()
        var windowStart = Date(), windowTokens = 0
        var lastTokensPerSecond = 0.0
        previousProbe = state.probe
        var interrupted = false
        for step in state.nextStep..<t.steps {
            let (parts, norm) = try trainStep(step)
            windowTokens += tokensPerStep
            let isLast = step == t.steps - 1
            if step % t.logEvery == 0 || isLast {
                let elapsed = Date().timeIntervalSince(windowStart)
                lastTokensPerSecond = Double(windowTokens) / max(elapsed, 1e-9)
                windowStart = Date()
                windowTokens = 0
                var line: [String: Any] = ["step": step, "split": "train", "loss": Double(parts.total), "task_loss": Double(parts.task),
                                           "bpc": Double(parts.task) / Foundation.log(2.0), "aux_loss": Double(parts.aux), "vq_loss": Double(parts.vq),
                                           "lr": Double(learningRate(step: step, config: t)), "grad_norm": Double(norm),
                                           "tokens_per_s": lastTokensPerSecond]
                if !parts.layers.isEmpty, config.model.ffn.mode != .dense {
                    line["expert_load"] = parts.layers.map { $0.expertLoad.map(Double.init) }
                    if config.model.ffn.usesQuantizer { line["code_counts"] = parts.layers.map { $0.codeCounts.map(Double.init) } }
                }
                log(line)
                progress.update(step: step + 1, text: String(format: "loss %.4f  lr %.2e  %.0f tok/s", parts.total,
                                                             learningRate(step: step, config: t), lastTokensPerSecond))
            }
            if (step + 1) % t.evalEvery == 0 || isLast {
                let v = try evaluate(.valid, maxBatches: t.evalBatches)
                log(["step": step, "split": "valid", "loss": v.loss, "bpc": v.bpc])
                progress.note(String(format: "step %d  valid loss %.4f  bpc %.4f", step + 1, v.loss, v.bpc))
                if config.model.ffn.mode != .dense {
                    let probe = try probeAssignments()
                    var line: [String: Any] = ["step": step, "split": "probe", "router_top1": probe.router.map { $0.map(Int.init) },
                                               "discrete_top1": probe.discrete.map { $0.map(Int.init) }]
                    if let prev = previousProbe {
                        line["consistency_router"] = Trainer.consistency(prev.router, probe.router)
                        line["consistency_discrete"] = Trainer.consistency(prev.discrete, probe.discrete)
                    }
                    previousProbe = probe
                    log(line)
                }
                if state.best == nil || v.loss < state.best!.loss {
                    state.best = v
                    state.bestStep = step
                    try saveCheckpoint("best", step: step + 1, extra: ["valid_loss": v.loss, "valid_bpc": v.bpc])
                }
            }
            state.nextStep = step + 1
            state.probe = previousProbe
            let stopNow = Trainer.interruptRequested != 0 || stopAfter == step + 1
            if stopNow || (step + 1) % t.checkpointEvery == 0 {
                try saveCheckpoint("last", step: step + 1, extra: ["run": state.json])
            }
            if stopNow && !isLast {
                interrupted = true
                progress.note("stopped after step \(step + 1): checkpoint \(outDir)/last.safetensors; continue with `vqmoe train --resume \(outDir)`")
                break
            }
        }
        let wall = Date().timeIntervalSince(start)
        progress.finish()
        var test: EvalResult?
        if !interrupted && state.bestStep >= 0 && dataset.splitSizes[Int(Split.test.rawValue)] > 1 {
            // Test with the best-validation checkpoint.
            try model.load(Checkpoint.read(path: "\(outDir)/best.safetensors"), path: "\(outDir)/best.safetensors")
            test = try evaluate(.test)
            log(["step": state.bestStep, "split": "test", "loss": test!.loss, "bpc": test!.bpc])
        }
        let done = state.nextStep
        let result = TrainResult(steps: done, bestValid: state.best, bestStep: state.bestStep, test: test, wallSeconds: wall,
                                 tokensPerSecond: Double(max(done, 1) * tokensPerStep) / max(wall, 1e-9), outDir: outDir, interrupted: interrupted)
        if !interrupted {
            var summary: [String: Any] = ["name": config.name, "ffn": config.model.ffn.mode.rawValue, "steps": t.steps, "best_step": state.bestStep + 1,
                                          "params_total": model.parameters.reduce(0) { $0 + $1.count },
                                          "flops_per_token_forward": model.flopsPerToken(k: config.router.flatMap { $0.values["k"] as? Int } ?? 2),
                                          "wall_s": wall, "tokens_per_s": result.tokensPerSecond, "threads": t.threads]
            if let best = state.best { summary["valid_loss"] = best.loss; summary["valid_bpc"] = best.bpc }
            if let test { summary["test_loss"] = test.loss; summary["test_bpc"] = test.bpc }
            try Checkpoint.atomicWrite(try JSONSerialization.data(withJSONObject: summary, options: [.prettyPrinted, .sortedKeys]),
                                       to: "\(outDir)/result.json")
        }
        return result
    }
}

/// A progress bar on a terminal; plain lines when stdout is not a terminal.
public struct ProgressReporter {
    public let total: Int
    public let quiet: Bool
    let tty = isatty(1) != 0
    var lastLine = ""

    public init(total: Int, quiet: Bool) {
        self.total = total
        self.quiet = quiet
    }

    public mutating func update(step: Int, text: String) {
        guard !quiet else { return }
        if tty {
            let width = 30, filled = width * step / max(total, 1)
            lastLine = "[" + String(repeating: "#", count: filled) + String(repeating: ".", count: width - filled) + "] \(step)/\(total)  \(text)"
            print("\r\u{1B}[K" + lastLine, terminator: "")
            fflush(nil)
        } else {
            print("step \(step)/\(total)  \(text)")
        }
    }

    public func note(_ text: String) {
        guard !quiet else { return }
        if tty { print("\r\u{1B}[K" + text); print(lastLine, terminator: ""); fflush(nil) } else { print(text) }
    }

    public func finish() { if tty && !quiet { print("") } }
}
