import Foundation

/// Creates a run's components from its config: the dataset and head plugins, one router and
/// one quantizer instance per layer, and the backbone.
///
/// ```swift
/// let built = try ModelBuilder(config: cfg, registry: try Registry.load()).build()
/// ```
public struct ModelBuilder {
    public let config: RunConfig
    public let registry: Registry
    public let dataRoot: String

    public init(config: RunConfig, registry: Registry, dataRoot: String? = nil) {
        self.config = config
        self.registry = registry
        self.dataRoot = dataRoot ?? DataLocator.defaultRoot() ?? ""
    }

    /// What `build()` returns.
    public struct Built {
        public let dataset: DatasetInstance
        public let model: Transformer
    }

    /// One plugin instance of `kind` from a config component (registry defaults under the
    /// config's values, both checked against the schema with the config's key path).
    public func instance(
        _ kind: PluginKind, _ spec: ComponentSpec, dims: ModelDims, seed: UInt64, name: String
    ) throws -> PluginInstance {
        let entry: Registry.Entry
        do { entry = try registry.entry(named: spec.name, kind: kind) } catch let e as VQMoEError {
            throw VQMoEError(e.category, "\(spec.keyPath).name: \(e.message)")
        }
        let lib = try registry.library(for: entry)
        let hp = try ResolvedHyperparameters(
            schema: lib.schema, layers: [entry.defaults.mapValues(\.value), spec.values], keyPath: spec.keyPath)
        return try PluginInstance(library: lib, instanceName: name, dims: dims, hyperparameters: hp, seed: seed)
    }

    /// Check every component name and hyperparameter of the config against the registry and
    /// the plugins' schemas, without creating anything (sweeps check all runs up front).
    public func validate() throws {
        let c = config
        var specs: [(PluginKind, ComponentSpec)] = [(.dataset, c.data), (.head, c.head)]
        if c.model.ffn.composition.needsRouter, let r = c.router { specs.append((.router, r)) }
        if c.model.ffn.composition.needsQuantizer, let q = c.quantizer { specs.append((.quantizer, q)) }
        for (kind, spec) in specs {
            let entry: Registry.Entry
            do { entry = try registry.entry(named: spec.name, kind: kind) } catch let e as VQMoEError {
                throw VQMoEError(e.category, "\(spec.keyPath).name: \(e.message)")
            }
            let lib = try registry.library(for: entry)
            _ = try ResolvedHyperparameters(
                schema: lib.schema, layers: [entry.defaults.mapValues(\.value), spec.values], keyPath: spec.keyPath)
        }
    }

    /// Analytic FFN FLOPs per token of one layer as configured, from the components' own
    /// answers: the router's experts per token in evaluation (its `shape()`, e.g. 1 for
    /// StableMoE, k_max for SMoE-Dropout), the quantizer's codes per token and codebook size.
    /// `vocabSize` is the model's token-id range, which routers keyed by token id (StableMoE's
    /// distilled router) need at create; it does not enter the count.
    ///
    /// ```swift
    /// let flops = try ModelBuilder(config: config, registry: registry).ffnFlopsPerToken(vocabSize: 256)
    /// ```
    public func ffnFlopsPerToken(vocabSize: Int) throws -> Double {
        let c = config
        var dims = ModelDims(
            dModel: c.model.dModel, seqLen: c.model.seqLen, totalSteps: c.train.steps, dataRoot: dataRoot)
        dims.vocabSize = vocabSize
        let comp = try components(dims: dims, seed: 1, name: "flops")
        let k =
            try comp.router?.shape(
                StepInfo(step: c.train.steps, totalSteps: c.train.steps, train: false, noGrad: true, seed: 0)
            ).k ?? 0
        return c.model.ffn.flopsPerToken(
            dModel: c.model.dModel, k: k, levels: comp.quantizer?.codesPerToken ?? 1,
            codebookSize: comp.quantizer?.codebookSize ?? 0)
    }

    /// The router and quantizer one layer of this config's mode needs (`dims` gets the layer's
    /// expert and code counts), named `<name>.router` and `<name>.quantizer`; seeds per component.
    public func components(
        dims: ModelDims, seed: UInt64, quantizerSeed: UInt64? = nil, name: String
    ) throws -> LayerComponents {
        let c = config, composition = c.model.ffn.composition
        var d = dims
        d.nExperts = c.model.ffn.nExperts
        d.nCodes = c.nCodes
        var comp = LayerComponents()
        if composition.needsRouter, let r = c.router {
            comp.router = try RouterInstance(instance(.router, r, dims: d, seed: seed, name: "\(name).router"))
        }
        if composition.needsQuantizer, let q = c.quantizer {
            let quantizer = try QuantizerInstance(
                instance(.quantizer, q, dims: d, seed: quantizerSeed ?? seed, name: "\(name).quantizer"))
            guard quantizer.codebookSize == c.nCodes else {
                throw VQMoEError(
                    .config,
                    "\(q.keyPath): '\(q.name)' reports K = \(quantizer.codebookSize) codes but model.ffn.n_codes is "
                        + "\(c.nCodes): set model.ffn.n_codes = \(quantizer.codebookSize) (a codebook_size of 0 takes the model's n_codes)"
                )
            }
            comp.quantizer = quantizer
        }
        return comp
    }

    /// The dataset and head, the completed model config and the dims the layers' plugins get.
    func start() throws -> (dataset: DatasetInstance, head: HeadInstance, model: TransformerConfig, dims: ModelDims) {
        let c = config
        var dims = ModelDims(
            dModel: c.model.dModel, seqLen: c.model.seqLen, totalSteps: c.train.steps, dataRoot: dataRoot)
        let dataset = try DatasetInstance(
            instance(.dataset, c.data, dims: dims, seed: HostRNG.derive(c.seed, 201), name: "data"))
        let mc = try modelConfig(for: dataset)
        dims.vocabSize = dataset.vocabSize
        dims.nClasses = dataset.nClasses
        dims.seqLen = mc.seqLen
        let head = try HeadInstance(
            instance(.head, c.head, dims: dims, seed: HostRNG.derive(c.seed, 202), name: "head"))
        try check(head, for: dataset)
        return (dataset, head, mc, dims)
    }

    /// The run's estimated memory per process (`vqmoe train --dry-run`), without building the model.
    public func memoryEstimate(ranks: Int = Comm.world.size) throws -> MemoryEstimate {
        let s = try start()
        return try estimate(model: s.model, dims: s.dims, head: s.head, dataset: s.dataset, ranks: ranks)
    }

    /// Processes of this job on this machine (Open MPI / Slurm tell; else 1).
    static var localRanks: Int {
        let env = ProcessInfo.processInfo.environment
        return ["OMPI_COMM_WORLD_LOCAL_SIZE", "SLURM_NTASKS_PER_NODE", "MPI_LOCALNRANKS"].lazy
            .compactMap { env[$0].flatMap { Int($0) } }.first ?? 1
    }

    /// Everything for a run; refused before the model is allocated when its memory estimate
    /// exceeds the limit (`MemoryEstimate.check`).
    public func build() throws -> Built {
        let c = config
        let (dataset, head, mc, dims) = try start()
        try estimate(model: mc, dims: dims, head: head, dataset: dataset, ranks: Comm.world.size)
            .check(localRanks: ModelBuilder.localRanks)
        let model = try Transformer(
            config: mc, head: head,
            components: { layer in
                try self.components(
                    dims: dims, seed: HostRNG.derive(c.seed, 300, UInt64(layer)),
                    quantizerSeed: HostRNG.derive(c.seed, 400, UInt64(layer)), name: "layers.\(layer).ffn")
            }, seed: HostRNG.derive(c.seed, 100))
        model.totalSteps = c.train.steps
        return Built(dataset: dataset, model: model)
    }

    /// The model config completed from what the dataset serves: a ViT's image shape and
    /// sequence length, the vocabulary; inputs the backbone cannot take are refused with the fix.
    func modelConfig(for dataset: DatasetInstance) throws -> TransformerConfig {
        let c = config
        var mc = c.model
        mc.vocabSize = dataset.vocabSize
        if c.backbone == "vit" {
            guard dataset.inputIsFloat, dataset.sampleShape.count == 3 else {
                throw VQMoEError(
                    .config,
                    "model.backbone: 'vit' needs an image dataset (C,H,W), '\(c.data.name)' serves "
                        + "\(dataset.sampleShape)"
                )
            }
            let image = ImageShape(
                channels: dataset.sampleShape[0], height: dataset.sampleShape[1], width: dataset.sampleShape[2],
                patch: c.patchSize)
            guard image.height % image.patch == 0, image.width % image.patch == 0 else {
                throw VQMoEError(
                    .config,
                    "model.patch_size: \(c.patchSize) does not divide the \(image.height)×\(image.width) images")
            }
            mc.image = image
            mc.seqLen = image.tokens
            mc.causal = false
            mc.ffn.allowTokenMixing = true
        } else {
            guard !dataset.inputIsFloat else {
                throw VQMoEError(.config, "data.name: '\(c.data.name)' serves images; set model.backbone = \"vit\"")
            }
            guard dataset.sampleShape == [c.model.seqLen] else {
                throw VQMoEError(
                    .config,
                    "data: the dataset serves sequences of \(dataset.sampleShape), the model expects "
                        + "\(c.model.seqLen) (model.seq_len)"
                )
            }
            if mc.relative && mc.memLen > 0 {
                guard dataset.isLM, dataset.streams else {
                    throw VQMoEError(
                        .config,
                        "model.mem_len: Transformer-XL's memory needs a language-model dataset served as "
                            + "parallel streams in order (for char: data.order = \"streams\"); "
                            + "'\(c.data.name)' serves independent samples. Set model.mem_len = 0 for "
                            + "relative attention without memory"
                    )
                }
            }
        }
        return mc
    }

    /// A language-model dataset needs a per-token head over its vocabulary, a classification
    /// dataset a pooled head over its classes.
    func check(_ head: HeadInstance, for dataset: DatasetInstance) throws {
        let c = config
        if dataset.isLM {
            guard head.isLM, head.perToken, head.nOut == dataset.vocabSize else {
                throw VQMoEError(
                    .config,
                    "head.name: '\(c.head.name)' predicts \(head.nOut) "
                        + "outputs\(head.perToken ? "" : " per sequence"); the language-model dataset needs a "
                        + "per-token head over its \(dataset.vocabSize)-token vocabulary (e.g. lm)"
                )
            }
        } else {
            guard !head.perToken, head.nOut == dataset.nClasses else {
                throw VQMoEError(
                    .config,
                    "head.name: '\(c.head.name)' predicts \(head.nOut) "
                        + "outputs\(head.perToken ? " per token" : ""); the classification dataset has "
                        + "\(dataset.nClasses) classes per sequence (use a pooled head, e.g. classifier)"
                )
            }
        }
    }
}
