import Foundation
import VQMoE

/// `vqmoe train CONFIG | --resume DIR`.
func trainCommand(_ args: inout Args) throws -> Int32 {
    let overrides = try args.overrides()
    let out = try args.take("--out").last, resume = try args.take("--resume").last, force = args.flag("--force")
    let usage =
        "train CONFIG [--set key.path=value ...] [--out DIR] [--force] [--stop-after N] [--dump-gradients STEP]  |  "
        + "vqmoe train --resume DIR [--stop-after N]"
    // --stop-after N: write `last` after step N and stop (a job's time slice; resume later).
    let stopAfter = try args.take("--stop-after").last.map { v -> Int in
        guard let n = Int(v), n >= 1 else {
            throw VQMoEError(.usage, "--stop-after needs a step count >= 1, got '\(v)'")
        }
        return n
    }
    // --dump-gradients N: OUT/gradients_step<N>.safetensors (summed over the ranks, before clipping).
    let dumpAt = try args.take("--dump-gradients").last.map { v -> Int in
        guard let n = Int(v), n >= 0 else { throw VQMoEError(.usage, "--dump-gradients needs a step >= 0, got '\(v)'") }
        return n
    }
    let dryRun = args.flag("--dry-run")
    let cfg: RunConfig, dir: String
    if let resume {
        guard args.rest.isEmpty, out == nil, !force else { throw VQMoEError(.usage, "usage: vqmoe \(usage)") }
        cfg = try RunConfig(json: try ConfigReader.load(file: "\(resume)/config.json", overrides: overrides))
        dir = resume
    } else {
        let file = try args.positional(1, usage: usage)[0]
        cfg = try RunConfig(json: try ConfigReader.load(file: file, overrides: overrides))
        dir = out ?? "runs/\(cfg.name)"
    }
    if dryRun {
        // The estimate and the limit; exit 65 (with the same message as a run) when it cannot fit.
        let estimate = try ModelBuilder(config: cfg, registry: try args.registry()).memoryEstimate()
        let (limit, source) = MemoryBudget.limit()
        print("\(cfg.name): \(estimate.text)\nlimit \(MemoryBudget.format(limit)) (\(source))")
        try estimate.check(localRanks: 1)
        return 0
    }
    let trainer = try Trainer(config: cfg, registry: try args.registry(), outDir: dir)
    trainer.dumpGradientsAt = dumpAt
    Trainer.installInterruptHandlers()
    let r = try trainer.run(resume: resume != nil, stopAfter: stopAfter, force: force)
    if trainer.comm.isRoot { print(trainSummary(cfg, r)) }
    return r.interrupted && r.steps != stopAfter ? 130 : 0  // a signal (on any rank): 130 on every rank
}

func trainSummary(_ cfg: RunConfig, _ r: TrainResult) -> String {
    if r.interrupted {
        return "run \(cfg.name) stopped after \(r.steps) steps; resume with: vqmoe train --resume \(r.outDir)"
    }
    var lines = [
        String(
            format: "run %@: %d steps in %.1f s (%.0f tokens/s), output in %@", cfg.name, r.steps, r.wallSeconds,
            r.tokensPerSecond, r.outDir)
    ]
    func line(_ label: String, _ e: EvalResult, _ tail: String) -> String {
        r.isLM
            ? String(format: "%@  loss %.4f  bpc %.4f  %@", label, e.loss, e.bpc, tail)
            : String(format: "%@  loss %.4f  accuracy %.4f  %@", label, e.loss, e.accuracy, tail)
    }
    if let v = r.bestValid { lines.append(line("best valid", v, "(step \(r.bestStep + 1))")) }
    if let t = r.test { lines.append(line("test      ", t, "(best-validation checkpoint)")) }
    return lines.joined(separator: "\n")
}

/// `vqmoe finetune CONFIG`.
func finetuneCommand(_ args: inout Args) throws -> Int32 {
    let overrides = try args.overrides()
    let out = try args.take("--out").last, from = try args.take("--from").last, force = args.flag("--force")
    let file = try args.positional(
        1, usage: "finetune CONFIG [--from CHECKPOINT|RUN_DIR] [--out DIR] [--force] [--set key.path=value ...]")[0]
    let cfg = try RunConfig(json: try ConfigReader.load(file: file, overrides: overrides))
    let ft = try Finetune(config: cfg, registry: try args.registry(), outDir: out ?? "runs/\(cfg.name)", from: from)
    Trainer.installInterruptHandlers()
    let r = try ft.run(force: force)
    guard Comm.world.isRoot else { return r.result.interrupted ? 130 : 0 }  // rank 0 reports
    print("fine-tuned \(cfg.name) from \(ft.checkpoint): \(r.trainable) trainable parameters, \(r.frozen) frozen")
    if let v = r.result.bestValid {
        print(
            String(format: "best valid  accuracy %.4f  loss %.4f  (step %d)", v.accuracy, v.loss, r.result.bestStep + 1)
        )
    }
    if let t = r.result.test { print(String(format: "test        accuracy %.4f  loss %.4f", t.accuracy, t.loss)) }
    print(r.flops.text)
    return r.result.interrupted ? 130 : 0
}

/// `vqmoe eval RUN_DIR`.
func evalCommand(_ args: inout Args) throws -> Int32 {
    let split = try args.take("--split").last ?? "test", name = try args.take("--checkpoint").last ?? "best"
    let text = try args.take("--text").last, strideText = try args.take("--stride").last
    let batchText = try args.take("--batch").last
    let logitsFile = try args.take("--logits").last, batchesText = try args.take("--batches").last
    let usage =
        "eval RUN_DIR [--split train|valid|test] [--checkpoint NAME] [--logits FILE [--batches N]] | "
        + "eval RUN_DIR --text FILE [--stride S] [--batch B]"
    let dir = try args.positional(1, usage: usage)[0]
    guard let sp = Split.allCases.first(where: { $0.name == split }) else {
        throw VQMoEError(.usage, "usage: vqmoe \(usage)")
    }
    let cfg = try RunConfig(json: try ConfigReader.load(file: "\(dir)/config.json", overrides: try args.overrides()))
    let trainer = try Trainer(config: cfg, registry: try args.registry(), outDir: dir, quiet: true)
    if let text {
        return try evalText(
            trainer, file: text, checkpoint: "\(dir)/\(name).safetensors", stride: strideText, batch: batchText)
    }
    if let logitsFile {
        guard let n = Int(batchesText ?? "1"), n >= 1 else {
            throw VQMoEError(.usage, "--batches takes an integer >= 1")
        }
        let path = "\(dir)/\(name).safetensors"
        try trainer.model.load(try Checkpoint.read(path: path), path: path)
        try trainer.exportLogits(sp, batches: n, path: logitsFile)
        print("\(logitsFile): inputs, targets and logits of the first \(n) \(split) batch(es) (checkpoint \(path))")
        return 0
    }
    let r = try trainer.evaluateCheckpoint(name, sp)
    guard trainer.comm.isRoot else { return 0 }  // rank 0 reports
    print(
        String(
            format: "%@ %@: loss %.4f  bpc %.4f  accuracy %.4f  (%d targets, checkpoint %@)", cfg.name, split, r.loss,
            r.bpc,
            r.accuracy, r.count, "\(dir)/\(name).safetensors"))
    return 0
}

/// `vqmoe eval RUN_DIR --text FILE`: bits per character (char models) or perplexity (word
/// models) of any text, tokenised by the run's dataset (see `TextScore`).
func evalText(_ trainer: Trainer, file: String, checkpoint: String, stride: String?, batch: String?) throws -> Int32 {
    let model = trainer.model
    guard let s = Int(stride ?? "\(model.config.seqLen / 2)"), let b = Int(batch ?? "8"), b >= 1 else {
        throw VQMoEError(.usage, "--stride and --batch take positive integers")
    }
    try model.load(try Checkpoint.read(path: checkpoint), path: checkpoint)
    let tokenizer = try Tokenizer(dataset: trainer.dataset, vocab: model.head.nOut)
    guard let data = FileManager.default.contents(atPath: file) else {
        throw VQMoEError(.data, "\(file): cannot read the text file")
    }
    let tokens = try tokenizer.encode(bytes: Array(data))
    let r = try TextScore.score(
        model: model, tokens: tokens, stride: model.config.relative ? model.config.seqLen : s, batch: b)
    let nats = r.lossSum / Double(r.count)
    let how =
        model.config.relative
        ? "segments of \(model.config.seqLen) with memory \(model.config.memLen)"
        : "windows of \(model.config.seqLen), stride \(s)"
    switch tokenizer.unit {
    case .character:
        print(
            String(
                format: "%@: %d characters, loss %.4f nats  bpc %.4f  (checkpoint %@, %@)", file, r.count + 1, nats,
                nats / log(2.0), checkpoint, how))
    case .word:
        print(
            String(
                format: "%@: %d tokens (words and <eos>), loss %.4f nats  perplexity %.2f  (checkpoint %@, %@)", file,
                r.count + 1, nats, exp(nats), checkpoint, how))
    }
    return 0
}

/// `vqmoe sample RUN_DIR`: text from a trained language model, streamed as it is generated.
func sampleCommand(_ args: inout Args) throws -> Int32 {
    let usage =
        "sample RUN_DIR [--prompt TEXT | --prompt-file F] [--tokens N] [--temperature T] [--top-k K] [--top-p P] "
        + "[--seed S] [--batch B] [--checkpoint best|last]"
    func number<T: LosslessStringConvertible>(_ flag: String, _ def: T) throws -> T {
        guard let s = try args.take(flag).last else { return def }
        guard let v = T(s) else { throw VQMoEError(.usage, "\(flag) \(s): not a number") }
        return v
    }
    var o = SamplingOptions()
    o.tokens = try number("--tokens", o.tokens)
    o.temperature = try number("--temperature", o.temperature)
    o.topK = try number("--top-k", o.topK)
    o.topP = try number("--top-p", o.topP)
    o.seed = try number("--seed", o.seed)
    let batch: Int = try number("--batch", 1), name = try args.take("--checkpoint").last ?? "best"
    let promptText = try args.take("--prompt").last, promptFile = try args.take("--prompt-file").last
    let dir = try args.positional(1, usage: usage)[0]
    guard o.tokens >= 0, o.temperature >= 0, o.topK >= 0, o.topP > 0, o.topP <= 1, batch >= 1 else {
        throw VQMoEError(.usage, "--tokens, --temperature, --top-k ≥ 0, --top-p in (0, 1], --batch ≥ 1")
    }
    let cfg = try RunConfig(json: try ConfigReader.load(file: "\(dir)/config.json", overrides: try args.overrides()))
    let trainer = try Trainer(config: cfg, registry: try args.registry(), outDir: dir, quiet: true)
    let path = "\(dir)/\(name).safetensors"
    try trainer.model.load(try Checkpoint.read(path: path), path: path)
    let tokenizer = try Tokenizer(dataset: trainer.dataset, vocab: trainer.model.head.nOut)
    var text = promptText ?? "\n"
    if let promptFile {
        guard let t = try? String(contentsOfFile: promptFile, encoding: .utf8) else {
            throw VQMoEError(.data, "\(promptFile): cannot read the prompt file as UTF-8 text")
        }
        text = t
    }
    // No prompt: a new line, or a space where the vocabulary has no line break (text8).
    let prompt =
        promptText == nil && promptFile == nil
        ? try ((try? tokenizer.encode(prompt: "\n")) ?? tokenizer.encode(prompt: " "))
        : try tokenizer.encode(prompt: text)
    let generator = try Generator(model: trainer.model, batch: batch)
    let out = FileHandle.standardOutput
    if batch == 1 { out.write(Data(try tokenizer.decode(prompt))) }
    var previous = prompt.last ?? -1
    let samples = try generator.generate(prompt: prompt, options: o) { next in
        guard batch == 1 else { return }
        out.write(Data(try tokenizer.decode(next[0], after: previous)))  // streamed as drawn
        previous = next[0]
    }
    if batch > 1 {
        for (i, s) in samples.enumerated() {
            out.write(
                Data("--- sample \(i + 1) (seed \(o.seed), stream \(i))\n".utf8)
                    + Data(try tokenizer.decode(prompt + s))
                    + Data("\n".utf8))
        }
    } else {
        out.write(Data("\n".utf8))
    }
    return 0
}

/// `vqmoe sweep CONFIG`.
func sweepCommand(_ args: inout Args) throws -> Int32 {
    let overrides = try args.overrides(threads: false)
    let file = try args.positional(1, usage: "sweep CONFIG [--set key.path=value ...]")[0]
    let sweep = try Sweep(configFile: file, overrides: overrides, registry: try args.registry())
    let exe = URL(fileURLWithPath: Registry.executableDirectory()).appendingPathComponent("vqmoe").path
    let table = try sweep.execute(executable: exe, registries: args.registryPaths) {
        print($0); fflush(nil)
    }
    print(table)
    return 0
}

/// `vqmoe bench CONFIG [--ffn]`.
func benchCommand(_ args: inout Args) throws -> Int32 {
    let overrides = try args.overrides()
    let steps =
        try args.take("--steps").last.map { s -> Int in
            guard let n = Int(s), n >= 2 else {
                throw VQMoEError(.usage, "--steps: expected an integer >= 2, got '\(s)'")
            }
            return n
        } ?? 15
    let json = args.flag("--json"), ffnOnly = args.flag("--ffn"), sample = args.flag("--sample")
    let sampleTokens = try args.take("--tokens").last, sampleBatch = try args.take("--batch").last
    let promptTokens = try args.take("--prompt-tokens").last
    let file = try args.positional(
        1, usage: "bench CONFIG [--steps N] [--threads T] [--json] [--ffn | --sample [--tokens N] [--batch B]]")[0]
    let cfg = try RunConfig(json: try ConfigReader.load(file: file, overrides: overrides))
    if sample {
        guard let n = Int(sampleTokens ?? "256"), let b = Int(sampleBatch ?? "1"), let p = Int(promptTokens ?? "64")
        else { throw VQMoEError(.usage, "--tokens, --batch and --prompt-tokens take integers") }
        let r = try GenerationBench(config: cfg, registry: try args.registry(), tokens: n, batch: b, promptLength: p)
            .run()
        print(
            json
                ? try jsonLine(r.json)
                : String(
                    format:
                        "%@ generation: %.0f tokens/s, %.3f ms/token (batch %d, %d tokens after a %d-token prompt, "
                        + "prefill %.1f ms), peak RSS %.0f MB, %d threads",
                    cfg.name, r.tokensPerSecond, r.msPerToken, b, n, p, r.msPrefill, r.peakRSSMB, r.threads))
        return 0
    }
    if ffnOnly {
        let r = try FFNBench(config: cfg, registry: try args.registry(), steps: steps).run()
        print(
            json
                ? try jsonLine(r.json)
                : String(
                    format:
                        "%@ FFN layer (%@), %d tokens: %.2f ms forward+backward; dense FFN with the same "
                        + "active FLOPs (d_inner %d): %.2f ms; ratio %.3f",
                    cfg.name, cfg.model.ffn.mode.rawValue, r.tokens, r.moeMs, r.denseInner, r.denseMs, r.ratio))
        return 0
    }
    let r = try Bench(config: cfg, registry: try args.registry(), steps: steps).run()
    guard Comm.world.isRoot else { return 0 }
    if let d = r.distributed, !json {
        print(
            String(
                format:
                    "%@ over %d ranks (%@): %.0f tokens/s for the job, %.1f ms/step; communication %.1f%% of the step "
                    + "(%.1f%% exposed), gradient all-reduce %.0f%% hidden behind the backward; per rank and step "
                    + "%.2f MB all-reduced, %.2f MB exchanged, ~%.2f MB sent; peak RSS per rank %@ MB",
                cfg.name, d.ranks, d.expertParallel ? "data + expert parallel" : "data parallel", r.tokensPerSecond,
                r.msPerStep, 100 * d.commShare, 100 * d.exposedShare, 100 * d.allreduceHidden,
                Double(d.allreduceBytes) / 1e6, Double(d.exchangeBytes) / 1e6, Double(d.sentBytes) / 1e6,
                d.peakRSSMBPerRank.map { String(format: "%.0f", $0) }.joined(separator: "/")))
        return 0
    }
    print(
        json
            ? try jsonLine(r.json)
            : String(
                format:
                    "%@: %.0f tokens/s, %.1f ms/step (forward %.1f, backward %.1f, optimizer %.1f, data %.1f), "
                    + "%.1f GFLOP/s, peak RSS %.0f MB, %d threads",
                cfg.name, r.tokensPerSecond, r.msPerStep, r.msForward, r.msBackward, r.msOptimizer, r.msData, r.gflops,
                r.peakRSSMB, r.threads))
    return 0
}

/// One JSON object on one line, keys sorted.
func jsonLine(_ object: [String: Any]) throws -> String {
    String(decoding: try JSONSerialization.data(withJSONObject: object, options: [.sortedKeys]), as: UTF8.self)
}
