import Foundation

/// A component named in a config: registry name plus hyperparameters (checked against the
/// plugin's schema when it is created).
public struct ComponentSpec: @unchecked Sendable {
    public var name: String
    public var values: [String: Any]
    public var keyPath: String
}

/// Optimizer, schedule and loop settings (`train` in a config).
public struct TrainConfig: Sendable, Equatable {
    public enum Optimizer: String, Sendable, CaseIterable { case adam, adamw, lion }
    public enum Schedule: String, Sendable, CaseIterable { case cosine, constant }
    public var steps = 1000
    public var batchSize = 16
    public var optimizer = Optimizer.adam
    public var lr: Float = 3.5e-4
    public var minLR: Float = 0
    public var warmupSteps = 0
    public var schedule = Schedule.cosine
    public var weightDecay: Float = 0
    public var beta1: Float = 0.9
    public var beta2: Float = 0.999
    /// Lion's default β2 (Chen et al. 2023); Adam's is `beta2`'s default.
    public static let lionBeta2: Float = 0.99
    public var eps: Float = 1e-8
    /// Clip the global gradient norm to this (0 = off). The paper's reference value is 0.25.
    public var gradClip: Float = 0.25
    public var evalEvery = 100
    /// Validation batches per evaluation (0 = the whole split).
    public var evalBatches = 0
    public var logEvery = 10
    /// Write the resumable `last` checkpoint every this many steps (default: eval_every).
    public var checkpointEvery = 100
    public var threads = 1
    /// Mirror `metrics.jsonl` into a TensorBoard event file in the run directory.
    public var tensorboard = true
    /// Warn when a codebook's code perplexity at an evaluation falls below this (per layer and
    /// level); nil = `CodeHealth.defaultThreshold(k:)` = max(1.5, K/4); 0 = no warning.
    public var collapseThreshold: Float?
    public init() {}
}

/// Fine-tuning settings (`finetune` in a config): where the pre-trained weights come from and
/// what stays frozen.
public struct FinetuneConfig: Sendable, Equatable {
    /// A checkpoint file (.safetensors) or a run directory (its best.safetensors).
    public var from: String
    /// Parts kept frozen: any of router, quantizer, gate, experts, attention, embeddings, norms.
    public var freeze: [String]
    /// No `freeze` list was given: router and quantizer, plus every plugin parameter flagged
    /// VQMOE_BUF_FREEZE_FT, are frozen.
    public var freezeIsDefault = false
    public static let defaultParts = ["router", "quantizer"]
    public static let parts = ["router", "quantizer", "gate", "experts", "attention", "embeddings", "norms"]
}

/// A whole run, read strictly from JSON (unknown keys, wrong types and out-of-range values are
/// errors naming the key path).
///
/// ```swift
/// let cfg = try RunConfig(json: ConfigReader.load(file: "configs/enwik8_smoe.json", overrides: ["train.steps": 50]))
/// ```
public struct RunConfig: @unchecked Sendable {
    public var name: String
    public var seed: UInt64
    public var data: ComponentSpec
    public var head: ComponentSpec
    public var model: TransformerConfig
    /// "transformer" (token model, causal), "transformer_xl" (segment memory, relative
    /// positions) or "vit" (images as patches + class token, full attention).
    public var backbone: String
    /// ViT patch side P.
    public var patchSize: Int
    public var router: ComponentSpec?
    public var quantizer: ComponentSpec?
    /// Codebook size requested from the quantizer (default: the number of experts, K = E).
    public var nCodes: Int
    public var train: TrainConfig
    /// Present in fine-tuning configs.
    public var finetune: FinetuneConfig?
    /// The config as read (with overrides), for the checkpoint sidecar.
    public var json: [String: Any]

    public init(json: [String: Any]) throws {
        self.json = json
        let r = ConfigReader(json, path: "")
        name = try r.string("name", default: "run")
        seed = UInt64(try r.int("seed", default: 1, min: 0))
        _ = try r.string("comment", default: "")
        data = try RunConfig.component(r.child("data", required: true))
        head = try RunConfig.component(r.child("head", required: true))

        let m = try r.child("model", required: true)
        backbone = try m.string("backbone", default: "transformer", choices: ["transformer", "transformer_xl", "vit"])
        patchSize = try m.int("patch_size", default: 4, min: 1)
        let f: ConfigReader
        (model, f) = try RunConfig.model(m, backbone: backbone)
        nCodes = try f.int("n_codes", default: model.ffn.nExperts, min: 1)
        router = f.has("router") ? try RunConfig.component(f.child("router")) : nil
        quantizer = f.has("quantizer") ? try RunConfig.component(f.child("quantizer")) : nil
        let composition = model.ffn.composition
        if composition.needsRouter && router == nil {
            throw VQMoEError(
                .config,
                "model.ffn.router: mode '\(model.ffn.mode.rawValue)' needs a router, e.g. {\"name\": \"smoe\", "
                    + "\"k\": 2}"
            )
        }
        if composition.needsQuantizer && quantizer == nil {
            throw VQMoEError(
                .config,
                "model.ffn.quantizer: mode '\(model.ffn.mode.rawValue)' needs a quantizer, e.g. {\"name\": \"vqvae\"}")
        }
        try f.finish()
        try m.finish()
        train = try RunConfig.train(r.child("train"))
        if r.has("finetune") {
            let f = try r.child("finetune")
            let freeze = f.object["freeze"] as? [Any] ?? FinetuneConfig.defaultParts
            f.accept(["freeze"])
            let names = try freeze.map { v -> String in
                guard let s = v as? String, FinetuneConfig.parts.contains(s) else {
                    throw VQMoEError(
                        .config,
                        "finetune.freeze: \(describeJSON(v)) is not one of "
                            + "\(FinetuneConfig.parts.joined(separator: ", "))"
                    )
                }
                return s
            }
            finetune = FinetuneConfig(
                from: try f.string("from", default: ""), freeze: names, freezeIsDefault: !f.has("freeze"))
            try f.finish()
        }
        try r.finish()
    }

    /// The model section (defaults: `TransformerConfig()`, `FFNConfig`'s), and the reader of its
    /// ffn object (the caller reads the components from it).
    static func model(_ m: ConfigReader, backbone: String) throws -> (TransformerConfig, ConfigReader) {
        var mc = TransformerConfig()
        mc.nLayer = try m.int("n_layer", default: mc.nLayer, min: 1, max: 64)
        mc.nHead = try m.int("n_head", default: mc.nHead, min: 1)
        mc.dModel = try m.int("d_model", default: mc.dModel, min: 1)
        mc.seqLen = try m.int("seq_len", default: mc.seqLen, min: 1)
        mc.dropout = try m.float("dropout", default: mc.dropout, min: 0, max: 0.99)
        mc.initStd = try m.float("init_std", default: mc.initStd, min: 0)
        mc.relative = backbone == "transformer_xl"
        if mc.relative {
            mc.memLen = try m.int("mem_len", default: mc.seqLen, min: 0, max: 1 << 20)
        } else if m.has("mem_len") {
            throw VQMoEError(
                .config,
                "model.mem_len: a memory needs model.backbone = \"transformer_xl\" (backbone is \"\(backbone)\")")
        }
        guard mc.dModel % mc.nHead == 0 else {
            throw VQMoEError(.config, "model.d_model (\(mc.dModel)) must be divisible by model.n_head (\(mc.nHead))")
        }
        let f = try m.child("ffn")
        mc.ffn = try ffn(f, dModel: mc.dModel)
        return (mc, f)
    }

    /// The model.ffn section's own keys (the router and quantizer are read by the caller).
    static func ffn(_ f: ConfigReader, dModel: Int) throws -> FFNConfig {
        var fc = FFNConfig()
        let modes = FFNConfig.Mode.allCases.map(\.rawValue)
        fc.mode = FFNConfig.Mode(rawValue: try f.string("mode", default: fc.mode.rawValue, choices: modes))!
        fc.dInner = try f.int("d_inner", default: FFNConfig.defaultInner(dModel: dModel), min: 1)
        fc.nExperts =
            fc.mode == .dense ? 1 : try f.int("n_experts", default: FFNConfig.defaultExperts, min: 1, max: 4096)
        if fc.mode == .dense { _ = try f.int("n_experts", default: 1, min: 1) }
        fc.activation = Activation(
            rawValue: try f.string(
                "activation", default: fc.activation.rawValue,
                choices: Activation.allCases.map(\.rawValue)))!
        fc.discreteInput = FFNConfig.DiscreteInput(
            rawValue: try f.string(
                "discrete_input", default: fc.discreteInput.rawValue,
                choices: FFNConfig.DiscreteInput.allCases.map(\.rawValue)))!
        fc.mixC = try f.float("mix_c", default: fc.mixC, min: 0, max: 1)
        fc.beta = try f.float("beta", default: fc.beta, min: 0)
        fc.allowTokenMixing = try f.bool("allow_token_mixing", default: fc.allowTokenMixing)
        fc.expertParallel = try f.bool("expert_parallel", default: fc.expertParallel)
        return fc
    }

    /// The train section (defaults: `TrainConfig()`; Lion's β2 when optimizer = "lion").
    static func train(_ t: ConfigReader) throws -> TrainConfig {
        var tc = TrainConfig()
        tc.steps = try t.int("steps", default: tc.steps, min: 1)
        tc.batchSize = try t.int("batch_size", default: tc.batchSize, min: 1)
        tc.optimizer = TrainConfig.Optimizer(
            rawValue: try t.string(
                "optimizer", default: tc.optimizer.rawValue,
                choices: TrainConfig.Optimizer.allCases.map(\.rawValue)))!
        tc.lr = try t.float("lr", default: tc.lr, min: 0)
        tc.minLR = try t.float("min_lr", default: tc.minLR, min: 0)
        tc.warmupSteps = try t.int("warmup_steps", default: tc.warmupSteps, min: 0)
        tc.schedule = TrainConfig.Schedule(
            rawValue: try t.string(
                "schedule", default: tc.schedule.rawValue,
                choices: TrainConfig.Schedule.allCases.map(\.rawValue)))!
        tc.weightDecay = try t.float("weight_decay", default: tc.weightDecay, min: 0)
        tc.beta1 = try t.float("beta1", default: tc.beta1, min: 0, max: 0.999999)
        tc.beta2 = try t.float(
            "beta2", default: tc.optimizer == .lion ? TrainConfig.lionBeta2 : tc.beta2, min: 0, max: 0.999999)
        tc.eps = try t.float("eps", default: tc.eps, min: 0)
        tc.gradClip = try t.float("grad_clip", default: tc.gradClip, min: 0)
        tc.evalEvery = try t.int("eval_every", default: tc.evalEvery, min: 1)
        tc.evalBatches = try t.int("eval_batches", default: tc.evalBatches, min: 0)
        tc.logEvery = try t.int("log_every", default: tc.logEvery, min: 1)
        tc.checkpointEvery = try t.int("checkpoint_every", default: tc.evalEvery, min: 1)
        tc.threads = try t.int("threads", default: tc.threads, min: 1, max: 256)
        tc.tensorboard = try t.bool("tensorboard", default: tc.tensorboard)
        if t.has("collapse_threshold") { tc.collapseThreshold = try t.float("collapse_threshold", default: 0, min: 0) }
        // Several ranks (mpirun/srun) split each global batch by rows; expert parallelism is
        // model.ffn.expert_parallel on top of it.
        _ = try t.string("parallel", default: "data", choices: ["data"])
        try t.finish()
        return tc
    }

    /// {"name": ..., hyperparameters...}
    static func component(_ r: ConfigReader) throws -> ComponentSpec {
        let name = try r.string("name", default: nil)
        return ComponentSpec(name: name, values: r.remaining(excluding: ["name"]), keyPath: r.path)
    }
}
