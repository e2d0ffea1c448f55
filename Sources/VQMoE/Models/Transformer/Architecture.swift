import Foundation

/// The model as built, every default resolved: the backbone's shape, the FFN composition, and
/// each plugin's name, resolved hyperparameters and creation facts. Written as `model` in every
/// checkpoint sidecar (`NAME.json`), so a loader outside the engine (`python/vqmoe_torch`)
/// rebuilds exactly this model without knowing the engine's or the plugins' defaults.
///
/// ```swift
/// let arch = Architecture(model)          // after Transformer(...)
/// arch.json["backbone"]                   // "transformer" | "transformer_xl" | "vit"
/// ```
public struct Architecture {
    /// JSON-ready dictionary (String / Int / Double / Bool / arrays / dictionaries / NSNull).
    public let json: [String: Any]

    public init(_ model: Transformer) {
        let c = model.config, f = c.ffn
        var j: [String: Any] = [
            "format": "vqmoe-architecture-1",
            "backbone": c.relative ? "transformer_xl" : (c.image != nil ? "vit" : "transformer"),
            "attention": c.relative ? "relative" : (c.causal ? "causal" : "full"),
            "vocab_size": c.vocabSize, "seq_len": c.seqLen, "n_layer": c.nLayer, "n_head": c.nHead,
            "d_model": c.dModel, "mem_len": c.memLen, "layer_norm_eps": Double(LayerNorm.eps),
            "image": c.image.map {
                ["channels": $0.channels, "height": $0.height, "width": $0.width, "patch": $0.patch]
            }
                as Any? ?? NSNull(),
            "ffn": [
                "mode": f.mode.rawValue, "d_inner": f.dInner, "n_experts": f.nExperts,
                "activation": f.activation.rawValue, "discrete_input": f.discreteInput.rawValue,
                "mix_c": Double(f.mixC), "beta": Double(f.beta), "gated": f.composition.gated,
                "paths": f.composition.paths.map(Architecture.pathName),
            ] as [String: Any],
        ]
        let first = model.layers.first
        j["router"] = first?.router.map { Architecture.plugin($0.core) } as Any? ?? NSNull()
        j["quantizer"] = first?.quantizer.map { Architecture.plugin($0.core) } as Any? ?? NSNull()
        var head = Architecture.plugin(model.head.core)
        head["n_out"] = model.head.nOut
        head["per_token"] = model.head.perToken
        j["head"] = head
        json = j
    }

    /// "dense", "routed", "discrete", "discrete_frozen" or "shared" (`MoEComposition.PathKind`).
    static func pathName(_ k: MoEComposition.PathKind) -> String {
        switch k {
        case .dense: return "dense"
        case .routed: return "routed"
        case .discrete(let frozen): return frozen ? "discrete_frozen" : "discrete"
        case .shared: return "shared"
        }
    }

    /// A plugin instance: its registry name, resolved hyperparameters and creation facts.
    static func plugin(_ p: PluginInstance) -> [String: Any] {
        var hp: [String: Any] = [:]
        for name in p.hyperparameters.names { hp[name] = p.hyperparameters.values[name] }
        let d = p.dims
        return [
            "name": p.library.name, "version": p.library.version, "hyperparameters": hp,
            "create_info": [
                "d_model": d.dModel, "n_experts": d.nExperts, "n_codes": d.nCodes, "vocab_size": d.vocabSize,
                "n_classes": d.nClasses, "seq_len": d.seqLen, "total_steps": d.totalSteps,
            ],
        ]
    }
}
