import Foundation

/// `vqmoe finetune CONFIG --from CHECKPOINT`: start from pre-trained weights, replace the head,
/// freeze what the config says (the paper: router and quantizer frozen, experts trained; VQMoE
/// fine-tunes its discrete path only, `model.ffn.mode = vqmoe_finetune`), train on the task and
/// report accuracy with the analytic FLOPs per token of the pre-training and fine-tuning paths.
///
/// ```swift
/// let r = try Finetune(config: cfg, registry: reg, outDir: "runs/sst2").run()
/// print(r.result.test!.accuracy, r.flops)
/// ```
public struct Finetune {
    public let config: RunConfig
    public let registry: Registry
    public let outDir: String
    public let checkpoint: String

    /// FFN FLOPs per token, pre-training path vs fine-tuning path.
    public struct Flops {
        public var pretrainFFN: Double
        public var finetuneFFN: Double
        public var pretrainMode: String
        public var finetuneMode: String
        public var saving: Double { 1 - finetuneFFN / pretrainFFN }
        public var text: String {
            String(
                format: "FFN FLOPs per token per layer: pre-training (%@) %.0f, fine-tuning (%@) %.0f: %.1f%% less",
                pretrainMode, pretrainFFN, finetuneMode, finetuneFFN, 100 * saving)
        }
    }

    public init(config: RunConfig, registry: Registry, outDir: String, from: String? = nil) throws {
        guard let ft = config.finetune else {
            throw VQMoEError(
                .config,
                "finetune: the config needs a \"finetune\" object ({\"from\": CHECKPOINT, \"freeze\": "
                    + "[\"router\", \"quantizer\"]})"
            )
        }
        let source = from ?? ft.from
        guard !source.isEmpty else {
            throw VQMoEError(
                .usage, "finetune: say where the pre-trained weights are (--from CHECKPOINT or finetune.from)")
        }
        var isDir: ObjCBool = false
        let path =
            FileManager.default.fileExists(atPath: source, isDirectory: &isDir) && isDir.boolValue
            ? "\(source)/best.safetensors" : source
        guard FileManager.default.fileExists(atPath: path) else {
            throw VQMoEError(
                .checkpoint,
                "finetune: no checkpoint at \(path) (pre-train first: vqmoe train CONFIG --out DIR, then --from DIR)")
        }
        self.config = config
        self.registry = registry
        self.outDir = outDir
        checkpoint = path
    }

    /// Which parameters a freeze part names.
    static func matches(_ name: String, part: String) -> Bool {
        switch part {
        case "router": return name.contains(".ffn.router.")
        case "quantizer": return name.contains(".ffn.quantizer.")
        case "gate": return name.contains(".ffn.gate.")
        case "experts": return name.contains(".ffn.experts.") || name.contains(".ffn.shared_expert.")
        case "attention": return name.contains(".attn.")
        case "embeddings": return name == "wte" || name == "wpe"
        case "norms": return name.contains(".ln1.") || name.contains(".ln2.") || name.hasPrefix("lnf.")
        default: return false
        }
    }

    /// Copy every pre-trained tensor the new model has (all but the new head must be there,
    /// with their shapes), and freeze the configured parts.
    func load(into model: Transformer) throws {
        let ck = try Checkpoint.read(path: checkpoint)
        var missing: [String] = []
        for p in model.parameters where !p.name.hasPrefix("head.") {
            guard let t = ck.tensors[p.name] else { missing.append(p.name); continue }
            // An expert-parallel shard takes its rows of the whole tensor.
            let whole = p.shard.map { [$0.global] + p.shape.dropFirst() } ?? p.shape
            let first = (p.shard?.offset ?? 0) * (p.count / max(p.shape.first ?? 1, 1))
            guard t.shape == whole, t.dtype == "F32", t.data.count == whole.reduce(1, *) * 4 else {
                throw VQMoEError(
                    .checkpoint,
                    "\(checkpoint): tensor '\(p.name)' is \(t.dtype) \(t.shape), the fine-tuning model needs "
                        + "F32 \(whole): the model section must match the pre-training config"
                )
            }
            t.data.withUnsafeBytes { _ = memcpy(p.data, $0.baseAddress! + first * 4, p.count * 4) }
        }
        guard missing.isEmpty else {
            let names =
                missing.prefix(4).joined(separator: ", ") + (missing.count > 4 ? " (+\(missing.count - 4) more)" : "")
            throw VQMoEError(
                .checkpoint,
                "\(checkpoint): no pre-trained value for \(names): the model section must match the pre-training config"
            )
        }
        for s in model.stateBuffers {
            if let t = ck.tensors["state.\(s.name)"], t.data.count == s.buffer.byteCount,
                t.dtype == Checkpoint.dtypeName(s.buffer)
            {
                t.data.withUnsafeBytes { _ = memcpy(s.buffer.data, $0.baseAddress!, s.buffer.byteCount) }
            }
        }
        for p in model.parameters {
            let ft = config.finetune!
            p.frozen =
                ft.freeze.contains { Finetune.matches(p.name, part: $0) }
                || (ft.freezeIsDefault && p.freezeWhenFineTuning)
        }
    }

    /// Analytic FFN FLOPs of the pre-training config (read from the checkpoint's sidecar) and of
    /// this one; `vocabSize` is the model's token-id range (both models share the embedding).
    func flops(vocabSize: Int) throws -> Flops {
        let side = checkpoint.replacingOccurrences(of: ".safetensors", with: ".json")
        guard let pre = (try? CheckpointSidecar.read(side))?.config.any as? [String: Any] else {
            throw VQMoEError(.checkpoint, "\(side): missing sidecar with the pre-training config")
        }
        let p = try RunConfig(json: pre)
        func count(_ c: RunConfig) throws -> Double {
            try ModelBuilder(config: c, registry: registry).ffnFlopsPerToken(vocabSize: vocabSize)
        }
        return Flops(
            pretrainFFN: try count(p), finetuneFFN: try count(config), pretrainMode: p.model.ffn.mode.rawValue,
            finetuneMode: config.model.ffn.mode.rawValue)
    }

    public func run(
        quiet: Bool = false, force: Bool = false
    ) throws -> (
        result: TrainResult, flops: Flops, frozen: Int, trainable: Int
    ) {
        let trainer = try Trainer(config: config, registry: registry, outDir: outDir, quiet: quiet) { model in
            try self.load(into: model)
        }
        let flops = try self.flops(vocabSize: trainer.model.config.vocabSize)
        let frozen = trainer.model.parameters.filter(\.frozen).reduce(0) { $0 + $1.count }
        let trainable = trainer.model.parameters.filter { !$0.frozen }.reduce(0) { $0 + $1.count }
        let from = checkpoint
        trainer.finetuneSummary = { s in
            s.pretrainedFrom = from
            (s.ffnFlopsPretrain, s.ffnFlopsFinetune, s.ffnFlopsSaving) = (
                flops.pretrainFFN, flops.finetuneFFN, flops.saving
            )
            (s.paramsFrozen, s.paramsTrainable) = (frozen, trainable)
        }
        let result = try trainer.run(force: force)
        return (result, flops, frozen, trainable)
    }
}
