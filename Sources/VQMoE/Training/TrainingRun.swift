import Foundation

/// `Trainer.run`: the loop around `trainStep`, split into its phases (start or resume, log,
/// evaluate and observe, checkpoint, finish).
extension Trainer {
    /// Train from scratch, or continue a run from OUT/last.* (`resume`). The loss curve of an
    /// interrupted and resumed run equals the uninterrupted one: batches, dropout masks, plugin
    /// randomness and the learning rate follow from the step number, and the checkpoint holds
    /// every parameter, plugin state buffer and optimizer slot. `stopAfter` ends the loop early
    /// as an interrupt would (checkpoint `last`, no test evaluation). The output directory is
    /// locked for the run (`RunDirectory`); a fresh run refuses one that holds an earlier run
    /// unless `force` (which removes that run's files first).
    public func run(resume: Bool = false, stopAfter: Int? = nil, force: Bool = false) throws -> TrainResult {
        defer {
            runDirectory?.release()
            runDirectory = nil
        }
        var state = try start(resume: resume, force: force)
        do { return try loop(&state, stopAfter: stopAfter) } catch let e as VQMoEError where e.category == .io {
            // A full disk (or a lost mount): the checkpoint writes are atomic, so `last` is
            // whole and resumable.
            throw VQMoEError(.io, "\(e.message); \(lastCheckpointNote(then: "free space, then"))")
        }
    }

    /// The steps from `state.nextStep` on, then `finish`.
    private func loop(_ state: inout RunState, stopAfter: Int?) throws -> TrainResult {
        let t = config.train
        let tokensPerStep = t.batchSize * config.model.seqLen
        let start = Date()
        var window = (start: Date(), tokens: 0)
        var interrupted = false
        progress.begin(at: state.nextStep)
        for step in state.nextStep..<t.steps {
            let (parts, norm) = try trainStep(step)
            window.tokens += tokensPerStep
            let isLast = step == t.steps - 1
            if step % t.logEvery == 0 || isLast {
                let rate = Double(window.tokens) / max(Date().timeIntervalSince(window.start), 1e-9)
                window = (Date(), 0)
                try logTraining(step, parts: parts, norm: norm, tokensPerSecond: rate)
            }
            if (step + 1) % t.evalEvery == 0 || isLast { try evaluateAndObserve(step, state: &state) }
            state.nextStep = step + 1
            let stopNow = try interruptAgreed() || stopAfter == step + 1
            if stopNow || (step + 1) % t.checkpointEvery == 0 {
                observers.forEach { $0.save(into: &state) }
                try saveCheckpoint("last", step: step + 1, run: state)
                Trainer.lastCheckpointStep = step + 1
            }
            if stopNow && !isLast {
                interrupted = true
                progress.note(
                    "stopped after step \(step + 1): checkpoint \(outDir)/last.safetensors; continue with "
                        + "`vqmoe train --resume \(outDir)`"
                )
                break
            }
        }
        return try finish(state, wall: Date().timeIntervalSince(start), interrupted: interrupted)
    }

    /// A fresh run writes config.json and an empty metrics log; a resumed one loads OUT/last.*
    /// and keeps the metrics of the steps the checkpoint covers.
    /// Where training can continue from: "the last good checkpoint is OUT/last.safetensors
    /// (step N): <then> `vqmoe train --resume OUT`", or that there is none yet.
    func lastCheckpointNote(then: String) -> String {
        Trainer.lastCheckpointStep >= 0 && FileManager.default.fileExists(atPath: "\(outDir)/last.json")
            ? "the last good checkpoint is \(outDir)/last.safetensors (step \(Trainer.lastCheckpointStep)): \(then) "
                + "`vqmoe train --resume \(outDir)`"
            : "no checkpoint was written yet (one every train.checkpoint_every = \(config.train.checkpointEvery) steps)"
    }

    private func start(resume: Bool, force: Bool) throws -> RunState {
        Trainer.lastCheckpointStep = -1
        if comm.isRoot {
            runDirectory = try RunDirectory(path: outDir, mode: resume ? .resume : .fresh(force: force))
        } else {
            try FileManager.default.createDirectory(atPath: outDir, withIntermediateDirectories: true)
        }
        var state = RunState()
        if resume {
            let ckPath = "\(outDir)/last.safetensors", sidePath = "\(outDir)/last.json"
            let ck = try Checkpoint.read(path: ckPath)
            let side = try CheckpointSidecar.read(sidePath)
            try side.checkPaired(with: ck, path: sidePath, ckPath: ckPath)
            try model.load(ck, optimizer: optimizer, path: ckPath)
            guard let run = side.run else {
                throw VQMoEError(.checkpoint, "\(outDir)/last.json: no run state (not a resumable checkpoint)")
            }
            state = run
            guard state.nextStep <= config.train.steps else {
                throw VQMoEError(
                    .config,
                    "\(outDir) is at step \(state.nextStep), past train.steps = \(config.train.steps): a resumed run "
                        + "only continues to a later step (--set train.steps=N with N > \(state.nextStep)); to train "
                        + "again from scratch use --out with a new directory, or --force")
            }
            Trainer.lastCheckpointStep = state.nextStep
            optimizer.t = side.optimizerSteps
            observers.forEach { $0.restore(from: state) }
            progress.note("resuming \(config.name) at step \(state.nextStep) from \(ckPath)")
        } else if comm.isRoot {
            let cfgData = try JSONSerialization.data(
                withJSONObject: config.json, options: [.prettyPrinted, .sortedKeys])
            try Checkpoint.atomicWrite(cfgData, to: "\(outDir)/config.json")
        }
        if comm.isRoot {
            metricsLog = try MetricsLog(
                path: "\(outDir)/metrics.jsonl", keepingStepsBelow: resume ? state.nextStep : nil,
                events: config.train.tensorboard
                    ? try TensorBoardEvents(directory: outDir, resumingAt: resume ? state.nextStep : nil) : nil)
        }
        return state
    }

    /// SIGINT/SIGTERM reached any rank (every rank stops after the same step).
    private func interruptAgreed() throws -> Bool {
        guard comm.isDistributed else { return Trainer.interruptRequested != 0 }
        var flag = [Double(Trainer.interruptRequested)]
        try comm.allreduce(&flag)
        return flag[0] > 0
    }

    /// A train record, and the progress line.
    private func logTraining(_ step: Int, parts: LossParts, norm: Float, tokensPerSecond: Double) throws {
        let lr = learningRate(step: step, config: config.train)
        var record = TrainRecord(
            step: step, loss: Double(parts.total), taskLoss: Double(parts.task),
            bpc: Double(parts.task) / Foundation.log(2.0), auxLoss: Double(parts.aux), vqLoss: Double(parts.vq),
            lr: Double(lr), gradNorm: Double(norm), tokensPerSecond: tokensPerSecond)
        if !parts.layers.isEmpty, config.model.ffn.composition.routes {
            record.expertLoad = parts.layers.map { $0.expertLoad.map(Double.init) }
            if config.model.ffn.usesQuantizer {
                record.codeCounts = parts.layers.map { $0.codeCounts.map(Double.init) }
            }
        }
        try metricsLog?.append(record)
        progress.update(
            step: step + 1, text: String(format: "loss %.4f  lr %.2e  %.0f tok/s", parts.total, lr, tokensPerSecond))
    }

    /// Validation, the observers (routed models), and the best checkpoint when it improved.
    private func evaluateAndObserve(_ step: Int, state: inout RunState) throws {
        let v = try evaluate(.valid, maxBatches: config.train.evalBatches)
        try metricsLog?.append(EvalRecord(step: step, split: .valid, result: v, isLM: dataset.isLM))
        progress.note(
            dataset.isLM
                ? String(format: "step %d  valid loss %.4f  bpc %.4f", step + 1, v.loss, v.bpc)
                : String(format: "step %d  valid loss %.4f  accuracy %.4f", step + 1, v.loss, v.accuracy))
        progress.validation =
            dataset.isLM ? String(format: "valid bpc %.4f", v.bpc) : String(format: "valid acc %.4f", v.accuracy)
        warnCollapse(v, step: step)
        if config.model.ffn.composition.routes {
            let probe = try probeAssignments()
            var record = ProbeRecord(step: step, routerTop1: probe.router, discreteTop1: probe.discrete)
            let event = EvaluationEvent(step: step, model: model, probe: probe, outDir: outDir, config: config)
            if comm.isRoot { for observer in observers { try observer.observe(event, record: &record) } }
            try metricsLog?.append(record)
        }
        if state.bestValid.map({ isBetter(v, than: $0) }) ?? true {
            state.bestValid = v
            state.bestStep = step
            try saveCheckpoint("best", step: step + 1, valid: v)
        }
    }

    /// The test split with the best checkpoint, and result.json (not for an interrupted run).
    private func finish(_ state: RunState, wall: Double, interrupted: Bool) throws -> TrainResult {
        progress.finish()
        let t = config.train
        var test: EvalResult?
        if !interrupted && state.bestStep >= 0 && dataset.splitSizes[Int(Split.test.rawValue)] > 1 {
            test = try evaluateCheckpoint("best", .test)
            try metricsLog?.append(EvalRecord(step: state.bestStep, split: .test, result: test!, isLM: dataset.isLM))
        }
        let done = state.nextStep
        let result = TrainResult(
            steps: done, bestValid: state.bestValid, bestStep: state.bestStep, test: test, wallSeconds: wall,
            tokensPerSecond: Double(max(done, 1) * t.batchSize * config.model.seqLen) / max(wall, 1e-9),
            outDir: outDir, interrupted: interrupted, isLM: dataset.isLM)
        metricsLog = nil
        guard !interrupted else { return result }
        var summary = RunSummary(
            name: config.name, ffn: config.model.ffn.mode.rawValue, steps: t.steps, bestStep: state.bestStep + 1,
            paramsTotal: model.parameters.reduce(0) { $0 + $1.count }, threads: t.threads,
            flopsPerTokenForward: model.flopsPerToken(k: try model.evalK(), batch: t.batchSize),
            wallSeconds: wall, tokensPerSecond: result.tokensPerSecond)
        if let best = state.bestValid { summary.set(.valid, best, isLM: dataset.isLM) }
        if let test { summary.set(.test, test, isLM: dataset.isLM) }
        finetuneSummary?(&summary)
        guard comm.isRoot else { return result }
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.prettyPrinted, .sortedKeys]
        try Checkpoint.atomicWrite(try encoder.encode(summary), to: "\(outDir)/result.json")
        return result
    }
}

/// A progress bar on a terminal, like tqdm's: steps done, elapsed time and the estimated time
/// left, the last logged training numbers and the last validation result; plain lines (one per
/// logged step, with the same fields) when stdout is not a terminal.
///
///     [#########.....................] 600/2000  00:42<01:38  loss 2.3102  lr 9.1e-04  5120 tok/s  valid bpc 2.1034
///
/// ```swift
/// var progress = ProgressReporter(total: 2000, quiet: false)
/// progress.begin(at: 0)
/// progress.update(step: 600, text: "loss 2.3102")
/// ```
public struct ProgressReporter {
    public let total: Int
    public let quiet: Bool
    let tty = isatty(1) != 0
    var lastLine = ""
    /// Where this process started counting (a resumed run's first step) and when.
    var started = (step: 0, time: Date())
    /// The last validation result, shown after the training numbers ("valid bpc 2.1034").
    public var validation: String?

    public init(total: Int, quiet: Bool) {
        self.total = total
        self.quiet = quiet
    }

    /// Start the clock at `step` (the ETA extrapolates from the steps this process has run).
    public mutating func begin(at step: Int) { started = (step, Date()) }

    public mutating func update(step: Int, text: String) {
        guard !quiet else { return }
        let timing = ProgressReporter.timing(
            step: step, total: total, startStep: started.step, elapsed: Date().timeIntervalSince(started.time))
        let fields = [timing, text] + (validation.map { [$0] } ?? [])
        if tty {
            let width = 30, filled = width * min(step, total) / max(total, 1)
            lastLine =
                "[" + String(repeating: "#", count: filled) + String(repeating: ".", count: width - filled)
                + "] \(step)/\(total)  " + fields.joined(separator: "  ")
            print("\r\u{1B}[K" + lastLine, terminator: "")
            fflush(nil)
        } else {
            print("step \(step)/\(total)  " + fields.joined(separator: "  "))
        }
    }

    /// "elapsed<left" as tqdm writes it: the time since `startStep`, and the rest at that pace
    /// ("?" before the first step is done).
    public static func timing(step: Int, total: Int, startStep: Int, elapsed: Double) -> String {
        let done = step - startStep
        let left = done > 0 ? clock(elapsed / Double(done) * Double(max(total - step, 0))) : "?"
        return "\(clock(elapsed))<\(left)"
    }

    /// MM:SS, or H:MM:SS from an hour on.
    public static func clock(_ seconds: Double) -> String {
        let s = Int(max(seconds, 0).rounded()), h = s / 3600, m = s / 60 % 60
        return h > 0 ? String(format: "%d:%02d:%02d", h, m, s % 60) : String(format: "%02d:%02d", m, s % 60)
    }

    public func note(_ text: String) {
        guard !quiet else { return }
        if tty {
            print("\r\u{1B}[K" + text)
            print(lastLine, terminator: "")
            fflush(nil)
        } else {
            print(text)
        }
    }

    public func finish() { if tty && !quiet { print("") } }
}
