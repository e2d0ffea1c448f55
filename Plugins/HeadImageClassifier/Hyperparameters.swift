// The image classifier head's hyperparameter schema and its resolved values.
import Glibc
import PluginKit
import VQMoEABI

/// How the (B,T,d) token states become one vector per image.
enum Pooling: String, CaseIterable {
    /// Position 0, the class token ViT prepends to the patch tokens.
    case cls
    /// Mean over all positions (class token included; positions t >= lengths[b] excluded
    /// when the host passes lengths).
    case mean
}

/// Resolved hyperparameters of one image classifier head.
struct ImageClassifierConfig {
    var pooling: Pooling
    /// Standard deviation of the N(0, init_std^2) init of head.weight.
    var initStd: Float

    static let schema: [HyperparameterEntry] = [
        HyperparameterEntry(
            name: "pooling", type: VQMOE_HP_STRING,
            description: "image -> vector: cls = the class token (position 0), mean = mean over all positions",
            defaultString: "cls", choices: Pooling.allCases.map(\.rawValue).joined(separator: ",")),
        HyperparameterEntry(
            name: "init_std", type: VQMOE_HP_FLOAT,
            description:
                "head.weight ~ N(0, init_std^2) (ViT zero-initialises it, which makes the first gradients to h vanish); head.bias = 0",
            defaultValue: 0.02, min: 0),
    ]

    /// Read the values the host resolved (defaults for anything missing) and check them.
    init(_ hp: UnsafePointer<vqmoe_hparams>?) throws(PluginFailure) {
        let poolingText = String(cString: vqmoe_hp_string(hp, "pooling", "cls"))
        guard let p = Pooling(rawValue: poolingText) else {
            throw .invalid(
                "pooling = '\(poolingText)' is not one of \(Pooling.allCases.map(\.rawValue).joined(separator: ", "))")
        }
        pooling = p
        initStd = Float(vqmoe_hp_float(hp, "init_std", 0.02))
        guard initStd.isFinite && initStd >= 0 else { throw .invalid("init_std = \(initStd) must be finite and >= 0") }
    }
}
