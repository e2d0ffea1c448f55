import Foundation

/// Wall-clock milliseconds of the phases of one training step (`vqmoe bench` reports their medians).
public struct StepTimings: Sendable {
    public var data = 0.0, forward = 0.0, backward = 0.0, optimizer = 0.0
    public var total: Double { data + forward + backward + optimizer }
    public init() {}
}

/// The training loop: an `Optimizer` (Adam, AdamW, Lion) with warmup + cosine schedule and
/// global-norm clipping, validation every `eval_every` steps, the best-validation checkpoint kept
/// (safetensors + JSON sidecar), and the test split evaluated with it at the end. Routed models
/// get the evaluation observers' measurements (probe consistency, routing movement, expert
/// inputs for the PCA). Writes `OUT/metrics.jsonl` (one JSON object per line), `OUT/config.json`
/// and `OUT/result.json`.
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
    public let optimizer: Optimizer
    /// Measurements at every evaluation of a routed model, in order.
    public var observers: [EvaluationObserver] = [ConsistencyObserver(), MovementObserver(), RepresentationObserver()]
    /// Where progress goes (a progress bar on a terminal, plain lines otherwise).
    public var progress: ProgressReporter
    /// Fine-tuning facts for result.json (set by `Finetune`).
    public var finetuneSummary: ((inout RunSummary) -> Void)?
    /// The open metrics log of a running `run()` (rank 0 only).
    var metricsLog: MetricsLog?
    /// The locked output directory of a running `run()` (rank 0 only).
    var runDirectory: RunDirectory?
    /// Write every parameter's gradient of this step (summed over the ranks, before clipping)
    /// to OUT/gradients_step<N>.safetensors (`vqmoe train --dump-gradients N`): the data- and
    /// expert-parallel tests compare them with a single process's.
    public var dumpGradientsAt: Int?
    /// The ranks of the run (one process: a single rank) and this rank's gradient reduction.
    public let comm: Comm
    let gradientSync: GradientSync?

    /// `prepare` runs on the built model before the optimizer is made (fine-tuning loads
    /// pre-trained weights and freezes parameters there).
    public init(
        config: RunConfig, registry: Registry, outDir: String, dataRoot: String? = nil, quiet: Bool = false,
        prepare: ((Transformer) throws -> Void)? = nil
    ) throws {
        self.config = config
        self.outDir = outDir
        comm = Comm.world
        HostRuntime.configure(threads: config.train.threads)
        try Trainer.checkRanks(config, comm)
        let built = try ModelBuilder(config: config, registry: registry, dataRoot: dataRoot).build()
        dataset = built.dataset
        model = built.model
        try prepare?(model)
        optimizer = makeOptimizer(parameters: model.parameters.filter { !$0.frozen }, config: config.train)
        progress = ProgressReporter(total: config.train.steps, quiet: quiet || !comm.isRoot)
        if comm.isDistributed {  // a resumed Transformer-XL memory takes this rank's streams
            let rows = RowShare(global: config.train.batchSize, rank: comm.rank, ranks: comm.size)
            model.trainMemory?.rows = AxisShard(offset: rows.offset, count: rows.count, global: rows.global)
        }
        // Expert-parallel shards have complete gradients on their rank: no all-reduce.
        gradientSync =
            comm.isDistributed ? GradientSync(comm: comm, excluding: model.parameters.filter { $0.shard != nil }) : nil
    }

    /// This rank's rows of a global batch of `b` rows.
    func share(_ b: Int) -> RowShare { RowShare(global: b, rank: comm.rank, ranks: comm.size) }

    // MARK: one step

    /// One optimizer step on train batch `step`; returns the loss parts and the gradient norm.
    public func trainStep(_ step: Int) throws -> (LossParts, Float) {
        var timings = StepTimings()
        return try trainStep(step, timings: &timings)
    }

    /// One optimizer step, timing its phases: data, forward, backward, optimizer (clipping included).
    public func trainStep(_ step: Int, timings: inout StepTimings) throws -> (LossParts, Float) {
        func now() -> Double { Double(DispatchTime.now().uptimeNanoseconds) / 1e6 }
        let t0 = now()
        comm.step = step
        noteStep(step)
        try model.beginStep(step)
        guard let batch = try dataset.read(.train, index: step, batchSize: config.train.batchSize) else {
            throw VQMoEError(.data, "the train split of '\(config.data.name)' gave no batch \(step)")
        }
        let t1 = now()
        var parts: LossParts
        do {
            let rows = share(config.train.batchSize)
            parts = try forward(batch.rows(rows), step: step, train: true, share: rows)
            let scale = try reduce(&parts, share: rows)
            timings.forward = now() - t1
            try model.backward(scale: scale, ready: gradientSync?.ready)
            try gradientSync?.finish()
        } catch let e as VQMoEError where e.category == .numeric && !e.message.contains("at step") {
            throw VQMoEError(
                .numeric,
                "training step \(step): \(e.message); "
                    + lastCheckpointNote(then: "lower the learning rate or clip harder, then")
            )
        }
        let t3 = now()
        if dumpGradientsAt == step { try dumpGradients(step) }
        let norm = try clipGlobalNorm()
        guard norm.isFinite else { throw VQMoEError(.numeric, "non-finite gradient norm at step \(step)") }
        optimizer.step(lr: learningRate(step: step, config: config.train))
        model.zeroGrads()
        try keepLocalStatesInStep()
        timings.data = t1 - t0
        timings.backward = t3 - t1 - timings.forward
        timings.optimizer = now() - t3
        return (parts, norm)
    }

    /// One model forward on a dataset batch (with the sample lengths of text classification):
    /// this rank's rows of it, which are rows `share.offset ...` of the global batch.
    func forward(
        _ batch: DatasetInstance.Batch, step: Int, train: Bool, share: RowShare,
        logits: UnsafeMutablePointer<Float>? = nil
    ) throws -> LossParts {
        let bs = share.count
        if dataset.inputIsFloat {
            return try batch.inputsFloat.withUnsafeBufferPointer { x in
                try batch.targets.withUnsafeBufferPointer { y in
                    try model.forward(
                        tokens: nil, images: x.baseAddress!, targets: y.baseAddress!, batch: bs, step: step,
                        train: train, logits: logits, rowOffset: share.offset, globalBatch: share.global)
                }
            }
        }
        return try batch.inputsInt.withUnsafeBufferPointer { x in
            try batch.targets.withUnsafeBufferPointer { y in
                try batch.lengths.withUnsafeBufferPointer { l in
                    try model.forward(
                        tokens: x.baseAddress!, targets: y.baseAddress!, batch: bs, step: step, train: train,
                        lengths: batch.lengths.isEmpty ? nil : l.baseAddress, logits: logits,
                        rowOffset: share.offset, globalBatch: share.global)
                }
            }
        }
    }

    // MARK: evaluation

    /// Mean loss over `split` (at most `maxBatches` batches; 0 = the whole split).
    public func evaluate(_ split: Split, maxBatches: Int = 0) throws -> EvalResult {
        var sum = 0.0, count = 0, correct = 0, index = 0
        var codes: [[[Double]]]? = nil  // (layer, level, K) uses over the evaluation
        model.resetEvalMemory()  // Transformer-XL: the ordered pass starts with an empty memory
        let rows = share(config.train.batchSize)
        while maxBatches == 0 || index < maxBatches {
            guard let batch = try dataset.read(split, index: index, batchSize: config.train.batchSize) else { break }
            let parts = try forward(batch.rows(rows), step: index, train: false, share: rows)
            sum += parts.lossSum
            count += parts.count
            correct += parts.correct
            index += 1
            if config.model.ffn.usesQuantizer {
                let now = parts.layers.map { $0.levelCodeCounts.map { $0.map(Double.init) } }
                codes = codes.map { zip($0, now).map { zip($0, $1).map { zip($0, $1).map(+) } } } ?? now
            }
        }
        if comm.isDistributed {
            var sums = [sum, Double(count), Double(correct)] + (codes.map { Array($0.joined().joined()) } ?? [])
            try comm.allreduce(&sums)
            (sum, count, correct) = (sums[0], Int(sums[1]), Int(sums[2]))
            var i = 3
            codes = codes?.map {
                $0.map { level in
                    defer { i += level.count }; return Array(sums[i..<(i + level.count)])
                }
            }
        }
        guard count > 0 else {
            throw VQMoEError(.data, "the \(split.name) split of '\(config.data.name)' has no targets to evaluate")
        }
        return EvalResult(
            loss: sum / Double(count), count: count, accuracy: Double(correct) / Double(count), codeCounts: codes)
    }

    /// The first `batches` batches of `split` in evaluation mode (Transformer-XL: in order, the
    /// memory carried from batch to batch from empty, as `evaluate`), written to `path` as a
    /// safetensors file: `inputs` (tokens int32 (N,T) or images float32 (N,C,H,W)), `targets`,
    /// `lengths` (text classification), `logits` (rows, n_out) float32; metadata `split`,
    /// `batches`, `batch_size`. What a loader outside the engine checks its logits against.
    public func exportLogits(_ split: Split, batches: Int, path: String) throws {
        guard !comm.isDistributed else { throw VQMoEError(.usage, "--logits runs in one process") }
        model.resetEvalMemory()
        let bs = config.train.batchSize, rows = share(bs)
        var inputsInt: [Int32] = [], inputsFloat: [Float] = [], targets: [Int32] = [], lengths: [Int32] = []
        var logits: [Float] = [], inputShape: [Int] = [], targetShape: [Int] = []
        var read = 0
        while read < batches, let batch = try dataset.read(split, index: read, batchSize: bs) {
            let n = model.head.rows(batch: bs, seq: model.config.seqLen) * model.head.nOut
            var out = [Float](repeating: 0, count: n)
            _ = try out.withUnsafeMutableBufferPointer { o in
                try forward(batch, step: read, train: false, share: rows, logits: o.baseAddress)
            }
            inputsInt += batch.inputsInt
            inputsFloat += batch.inputsFloat
            targets += batch.targets
            lengths += batch.lengths
            logits += out
            (inputShape, targetShape) = (batch.inputShape, batch.targetShape)
            read += 1
        }
        guard read > 0 else { throw VQMoEError(.data, "the \(split.name) split has no batch") }
        func stacked(_ shape: [Int]) -> [Int] { [shape[0] * read] + shape.dropFirst() }
        func bytes<T>(_ a: [T]) -> [UInt8] { a.withUnsafeBytes { Array($0) } }
        var parts: [(name: String, dtype: String, shape: [Int], bytes: [UInt8])] = [
            dataset.inputIsFloat
                ? ("inputs", "F32", stacked(inputShape), bytes(inputsFloat))
                : ("inputs", "I32", stacked(inputShape), bytes(inputsInt)),
            ("targets", "I32", stacked(targetShape), bytes(targets)),
        ]
        if !lengths.isEmpty { parts.append(("lengths", "I32", [lengths.count], bytes(lengths))) }
        parts.append(("logits", "F32", [logits.count / model.head.nOut, model.head.nOut], bytes(logits)))
        let blob = parts.flatMap(\.bytes)
        try blob.withUnsafeBytes { raw in
            var offset = 0
            let tensors = parts.map { p -> Checkpoint.Tensor in
                defer { offset += p.bytes.count }
                return Checkpoint.Tensor(
                    name: p.name, dtype: p.dtype, shape: p.shape,
                    bytes: UnsafeRawBufferPointer(rebasing: raw[offset..<(offset + p.bytes.count)]))
            }
            _ = try Checkpoint.write(
                path: path, tensors: tensors,
                metadata: ["split": split.name, "batches": String(read), "batch_size": String(bs)])
        }
    }

    /// Load OUT/NAME.safetensors into the model and evaluate `split` in full.
    public func evaluateCheckpoint(_ name: String, _ split: Split) throws -> EvalResult {
        let path = "\(outDir)/\(name).safetensors"
        try model.load(try Checkpoint.read(path: path), path: path)
        return try evaluate(split)
    }

    /// Language models keep the lowest validation loss; classifiers the highest accuracy.
    func isBetter(_ a: EvalResult, than b: EvalResult) -> Bool {
        dataset.isLM ? a.loss < b.loss : (a.accuracy > b.accuracy || (a.accuracy == b.accuracy && a.loss < b.loss))
    }

    /// Top-1 expert of every token of a fixed probe batch (validation batch 0), per layer and
    /// path (router, discrete), from an eval-mode forward.
    public func probeAssignments() throws -> ProbeAssignments {
        let bs = config.train.batchSize
        guard
            let batch = try dataset.read(.valid, index: 0, batchSize: bs)
                ?? dataset.read(.train, index: 0, batchSize: bs)
        else {
            return ProbeAssignments(router: [], discrete: [])
        }
        model.resetEvalMemory()
        let rows = share(bs)
        _ = try forward(batch.rows(rows), step: 0, train: false, share: rows)
        let tops = model.layers.map { $0.lastTop1() }
        return ProbeAssignments(
            router: try tops.compactMap(\.router).map(comm.allgatherRows),
            discrete: try tops.compactMap(\.discrete).map(comm.allgatherRows))
    }

    // MARK: checkpoints

    /// Checkpoint the model (and optimizer) to OUT/NAME.safetensors + OUT/NAME.json (rank 0
    /// writes; every rank calls it).
    public func saveCheckpoint(_ name: String, step: Int, run: RunState? = nil, valid: EvalResult? = nil) throws {
        defer { try? comm.barrier() }  // no rank reads it before rank 0 has written it
        let (tensors, gathered) = try gatherShards(model.checkpointTensors(optimizer: optimizer))
        defer { gathered.forEach { $0.deallocate() } }
        guard comm.isRoot else { return }
        let path = "\(outDir)/\(name).safetensors"
        let sha = try Checkpoint.write(path: path, tensors: tensors, metadata: ["step": String(step)])
        var side = CheckpointSidecar(
            step: step, config: JSONValue(any: config.json), checkpoint: "\(name).safetensors",
            optimizerSteps: optimizer.t, run: run)
        side.tensorsSHA256 = sha
        side.model = JSONValue(any: Architecture(model).json)
        if let valid { (side.validLoss, side.validBPC, side.validAccuracy) = (valid.loss, valid.bpc, valid.accuracy) }
        try side.write("\(outDir)/\(name).json")
    }

    /// Set by SIGINT/SIGTERM (see `installInterruptHandlers`); the loop checkpoints and stops.
    nonisolated(unsafe) public static var interruptRequested: sig_atomic_t = 0

    /// SIGINT and SIGTERM ask the training loop to write `last` and stop after the current step.
    /// A rank of a multi-rank run also says, from the handler, which step it was in and where the
    /// last good checkpoint is: when a rank dies, the launcher ends the others with SIGTERM (and
    /// then SIGKILL), and this line is what names the step.
    public static func installInterruptHandlers() {
        signal(SIGINT) { _ in
            Trainer.interruptRequested = 1; Trainer.writeSignalNote()
        }
        signal(SIGTERM) { _ in
            Trainer.interruptRequested = 1; Trainer.writeSignalNote()
        }
    }

    /// The line the signal handler writes to stderr (async-signal-safe: a preformatted buffer).
    nonisolated(unsafe) static let signalNote = UnsafeMutablePointer<CChar>.allocate(capacity: 1024)
    nonisolated(unsafe) static var signalNoteLength = 0
    nonisolated(unsafe) static var lastCheckpointStep = -1

    static func writeSignalNote() {
        if signalNoteLength > 0 { _ = write(2, signalNote, signalNoteLength) }
    }

    /// Prepare the signal line for `step` (multi-rank runs only).
    func noteStep(_ step: Int) {
        guard comm.isDistributed else { return }
        let last =
            Trainer.lastCheckpointStep >= 0
            ? "\(outDir)/last.safetensors (step \(Trainer.lastCheckpointStep))" : "none yet"
        let line = Array(
            "\nvqmoe \(comm.describe): signal during training step \(step); stopping (last good checkpoint: \(last))\n"
                .utf8.prefix(1023))
        Trainer.signalNoteLength = 0
        line.withUnsafeBufferPointer {
            UnsafeMutableRawPointer(Trainer.signalNote).copyMemory(from: $0.baseAddress!, byteCount: $0.count)
        }
        Trainer.signalNoteLength = line.count
    }
}
