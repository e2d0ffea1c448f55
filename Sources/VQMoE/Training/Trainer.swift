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
    /// Language model (loss/BPC) or classifier (accuracy).
    public var isLM = true
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

    /// `prepare` runs on the built model before the optimizer is made (fine-tuning loads
    /// pre-trained weights and freezes parameters there).
    public init(config: RunConfig, registry: Registry, outDir: String, dataRoot: String? = nil, quiet: Bool = false,
                prepare: ((Transformer) throws -> Void)? = nil) throws {
        self.config = config
        self.outDir = outDir
        HostRuntime.configure(threads: config.train.threads)
        let built = try ModelBuilder(config: config, registry: registry, dataRoot: dataRoot).build()
        dataset = built.dataset
        model = built.model
        try prepare?(model)
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
        model.resetEvalMemory()   // Transformer-XL: the ordered pass starts with an empty memory
        while maxBatches == 0 || index < maxBatches {
            guard let batch = try dataset.read(split, index: index, batchSize: bs) else { break }
            let parts = try forward(batch, step: index, train: false)
            sum += parts.lossSum
            count += parts.count
            correct += parts.correct
            index += 1
        }
        guard count > 0 else { throw VQMoEError(.data, "the \(split.name) split of '\(config.data.name)' has no targets to evaluate") }
        return EvalResult(loss: sum / Double(count), count: count, accuracy: Double(correct) / Double(count))
    }

    /// Extra fields for result.json (fine-tuning adds its FLOPs comparison).
    public var extraSummary: [String: Any] = [:]

    /// Language models keep the lowest validation loss; classifiers the highest accuracy.
    func isBetter(_ a: EvalResult, than b: EvalResult) -> Bool {
        dataset.isLM ? a.loss < b.loss : (a.accuracy > b.accuracy || (a.accuracy == b.accuracy && a.loss < b.loss))
    }

    /// One model forward on a dataset batch (with the sample lengths of text classification).
    func forward(_ batch: DatasetInstance.Batch, step: Int, train: Bool) throws -> LossParts {
        if dataset.inputIsFloat {
            return try batch.inputsFloat.withUnsafeBufferPointer { x in
                try batch.targets.withUnsafeBufferPointer { y in
                    try model.forward(tokens: nil, images: x.baseAddress!, targets: y.baseAddress!, batch: config.train.batchSize,
                                      step: step, train: train)
                }
            }
        }
        return try batch.inputsInt.withUnsafeBufferPointer { x in
            try batch.targets.withUnsafeBufferPointer { y in
                try batch.lengths.withUnsafeBufferPointer { l in
                    try model.forward(tokens: x.baseAddress!, targets: y.baseAddress!, batch: config.train.batchSize, step: step, train: train,
                                      lengths: batch.lengths.isEmpty ? nil : l.baseAddress)
                }
            }
        }
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
        model.resetEvalMemory()
        _ = try forward(batch, step: 0, train: false)
        let tops = model.layers.map { $0.lastTop1() }
        return (tops.compactMap(\.router), tops.compactMap(\.discrete))
    }

    /// Current routing parameters per layer: "router" (all router plugin parameters) and
    /// "codebook" (all quantizer parameters), flattened.
    func routingSnapshot() -> [String: [[Float]]] {
        var out: [String: [[Float]]] = [:]
        let routers = model.layers.compactMap { l in l.router.map { r in r.core.parameters.flatMap { Array(UnsafeBufferPointer(start: $0.floats, count: $0.count)) } } }
        let codebooks = model.layers.compactMap { l in l.quantizer.map { q in q.core.buffers.filter { $0.dtype.code == 2 }.flatMap { Array(UnsafeBufferPointer(start: $0.floats, count: $0.count)) } } }
        if !routers.isEmpty && routers.allSatisfy({ !$0.isEmpty }) { out["router"] = routers }
        if !codebooks.isEmpty && codebooks.allSatisfy({ !$0.isEmpty }) { out["codebook"] = codebooks }
        return out
    }

    /// ‖now − before‖ / ‖before‖.
    static func relativeChange(_ before: [Float], _ now: [Float]) -> Double {
        var d = 0.0, b = 0.0
        for (x, y) in zip(before, now) { d += Double(y - x) * Double(y - x); b += Double(x) * Double(x) }
        return b > 0 ? (d / b).squareRoot() : 0
    }

    /// The MoE-layer inputs of (up to 256) probe tokens per layer with their top-1 expert, for
    /// the representation-collapse PCA: OUT/repr/step_<S>.json.
    func dumpRepresentations(step: Int, probe: (router: [[Int32]], discrete: [[Int32]])) throws {
        let keep = min(256, config.train.batchSize * config.model.seqLen), d = config.model.dModel
        var layers: [[String: Any]] = []
        for l in 0..<model.layers.count {
            guard let x = model.moeInput(layer: l) else { continue }
            let experts = l < probe.router.count ? probe.router[l] : (l < probe.discrete.count ? probe.discrete[l] : [])
            layers.append(["x": (0..<keep).map { t in (0..<d).map { Double(x[t * d + $0]) } },
                           "expert": experts.prefix(keep).map(Int.init),
                           "code_expert": l < probe.discrete.count ? probe.discrete[l].prefix(keep).map(Int.init) : []])
        }
        try FileManager.default.createDirectory(atPath: "\(outDir)/repr", withIntermediateDirectories: true)
        let data = try JSONSerialization.data(withJSONObject: ["step": step, "layers": layers])
        try Checkpoint.atomicWrite(data, to: "\(outDir)/repr/step_\(step).json")
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
        let parts: LossParts
        do {
            parts = try forward(batch, step: step, train: true)
            try model.backward()
        } catch let e as VQMoEError where e.category == .numeric && !e.message.contains("at step") {
            throw VQMoEError(.numeric, "training step \(step): \(e.message); the last good checkpoint is \(outDir)/last.safetensors (resume with a lower learning rate or stronger clipping)")
        }
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
        /// Routing parameters at the last evaluation ("router" / "codebook" → per layer).
        var routing: [String: [[Float]]]?

        var json: [String: Any] {
            var o: [String: Any] = ["next_step": nextStep, "best_step": bestStep]
            if let best { o["best_valid"] = ["loss": best.loss, "count": best.count, "accuracy": best.accuracy] }
            if let probe { o["probe"] = ["router": probe.router.map { $0.map(Int.init) }, "discrete": probe.discrete.map { $0.map(Int.init) }] }
            if let routing { o["routing"] = routing.mapValues { $0.map { $0.map(Double.init) } } }
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
            if let r = o["routing"] as? [String: [[Double]]] { routing = r.mapValues { $0.map { $0.map(Float.init) } } }
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
                log(["step": step, "split": "valid", "loss": v.loss] + (dataset.isLM ? ["bpc": v.bpc] : ["accuracy": v.accuracy]))
                progress.note(dataset.isLM ? String(format: "step %d  valid loss %.4f  bpc %.4f", step + 1, v.loss, v.bpc)
                                           : String(format: "step %d  valid loss %.4f  accuracy %.4f", step + 1, v.loss, v.accuracy))
                if config.model.ffn.mode != .dense {
                    let probe = try probeAssignments()
                    var line: [String: Any] = ["step": step, "split": "probe", "router_top1": probe.router.map { $0.map(Int.init) },
                                               "discrete_top1": probe.discrete.map { $0.map(Int.init) }]
                    if let prev = previousProbe {
                        line["consistency_router"] = Trainer.consistency(prev.router, probe.router)
                        line["consistency_discrete"] = Trainer.consistency(prev.discrete, probe.discrete)
                    }
                    // Movement of the routing parameters since the previous evaluation: ‖Δ‖/‖before‖.
                    let snapshot = routingSnapshot()
                    if let prev = state.routing {
                        for (key, now) in snapshot {
                            guard let before = prev[key] else { continue }
                            line["movement_\(key)"] = zip(before, now).map { b, n in Trainer.relativeChange(b, n) }
                        }
                    }
                    state.routing = snapshot
                    previousProbe = probe
                    log(line)
                    try dumpRepresentations(step: step, probe: probe)
                }
                if state.best == nil || isBetter(v, than: state.best!) {
                    state.best = v
                    state.bestStep = step
                    try saveCheckpoint("best", step: step + 1, extra: ["valid_loss": v.loss, "valid_bpc": v.bpc, "valid_accuracy": v.accuracy])
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
            log(["step": state.bestStep, "split": "test", "loss": test!.loss] + (dataset.isLM ? ["bpc": test!.bpc] : ["accuracy": test!.accuracy]))
        }
        let done = state.nextStep
        let result = TrainResult(steps: done, bestValid: state.best, bestStep: state.bestStep, test: test, wallSeconds: wall,
                                 tokensPerSecond: Double(max(done, 1) * tokensPerStep) / max(wall, 1e-9), outDir: outDir, interrupted: interrupted,
                                 isLM: dataset.isLM)
        if !interrupted {
            var summary: [String: Any] = ["name": config.name, "ffn": config.model.ffn.mode.rawValue, "steps": t.steps, "best_step": state.bestStep + 1,
                                          "params_total": model.parameters.reduce(0) { $0 + $1.count },
                                          "flops_per_token_forward": model.flopsPerToken(k: try model.evalK(), batch: t.batchSize),
                                          "wall_s": wall, "tokens_per_s": result.tokensPerSecond, "threads": t.threads]
            if let best = state.best {
                summary["valid_loss"] = best.loss
                if dataset.isLM { summary["valid_bpc"] = best.bpc } else { summary["valid_accuracy"] = best.accuracy }
            }
            if let test {
                summary["test_loss"] = test.loss
                if dataset.isLM { summary["test_bpc"] = test.bpc } else { summary["test_accuracy"] = test.accuracy }
            }
            summary.merge(extraSummary) { _, new in new }
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

/// `+` for JSON-like dictionaries (right side wins).
func + (a: [String: Any], b: [String: Any]) -> [String: Any] { a.merging(b) { _, new in new } }
