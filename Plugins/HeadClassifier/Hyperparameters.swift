// The classifier head's hyperparameter schema and its resolved values.
import Glibc
import PluginKit
import VQMoEABI

/// How the (B,T,d) hidden states become one vector per sequence.
enum Pooling: String, CaseIterable {
    /// Mean over the real tokens t < len_b.
    case mean
    /// Position 0 (a [CLS]-style first token).
    case first
    /// The last real token, t = len_b - 1 (the natural summary of a causal decoder).
    case last
    /// Per feature, the maximum over the real tokens.
    case max
}

/// The nonlinearity between the two fully connected layers.
enum Activation: String, CaseIterable {
    /// max(0, u).
    case relu
    /// Exact GELU u * Phi(u) = u/2 (1 + erf(u/sqrt 2)), as torch.nn.functional.gelu and the host's FFN.
    case gelu
    /// tanh(u), as BERT's pooler (dense + tanh over [CLS]).
    case tanh
}

/// Resolved hyperparameters of one classifier head.
struct ClassifierConfig {
    var pooling: Pooling
    /// Width of FC1's output; the hyperparameter 0 resolves to d_model.
    var hidden: Int
    var activation: Activation
    /// Inverted-dropout probability on the activated FC1 output (training forwards only).
    var dropout: Float
    /// Standard deviation of the N(0, init_std^2) init of fc1.weight and fc2.weight.
    var initStd: Float

    static let schema: [HyperparameterEntry] = [
        HyperparameterEntry(
            name: "pooling", type: VQMOE_HP_STRING,
            description:
                "sequence -> vector: mean / max over the real tokens (t < lengths[b]), first token, or last real token",
            defaultString: "mean", choices: Pooling.allCases.map(\.rawValue).joined(separator: ",")),
        HyperparameterEntry(
            name: "hidden", type: VQMOE_HP_INT,
            description: "width of the first fully connected layer; 0 = d_model",
            defaultValue: 0, min: 0, max: Double(1 << 20)),
        HyperparameterEntry(
            name: "activation", type: VQMOE_HP_STRING,
            description: "activation after FC1 (tanh = BERT-style pooler; gelu is the exact erf form)",
            defaultString: "tanh", choices: Activation.allCases.map(\.rawValue).joined(separator: ",")),
        HyperparameterEntry(
            name: "dropout", type: VQMOE_HP_FLOAT,
            description:
                "inverted dropout on the activated FC1 output in training forwards (mask from the step seed, kept units scaled by 1/(1-p))",
            defaultValue: 0.1, min: 0, max: 0.9),
        HyperparameterEntry(
            name: "init_std", type: VQMOE_HP_FLOAT,
            description: "fc1.weight, fc2.weight ~ N(0, init_std^2); biases start at 0",
            defaultValue: 0.02, min: 0),
    ]

    /// Read the values the host resolved (defaults for anything missing) and check them.
    init(_ hp: UnsafePointer<vqmoe_hparams>?, dModel: Int) throws(PluginFailure) {
        let poolingText = String(cString: vqmoe_hp_string(hp, "pooling", "mean"))
        guard let p = Pooling(rawValue: poolingText) else {
            throw .invalid(
                "pooling = '\(poolingText)' is not one of \(Pooling.allCases.map(\.rawValue).joined(separator: ", "))")
        }
        pooling = p
        let activationText = String(cString: vqmoe_hp_string(hp, "activation", "tanh"))
        guard let a = Activation(rawValue: activationText) else {
            throw .invalid(
                "activation = '\(activationText)' is not one of \(Activation.allCases.map(\.rawValue).joined(separator: ", "))"
            )
        }
        activation = a
        let requested = Int(vqmoe_hp_int(hp, "hidden", 0))
        guard requested >= 0 && requested <= 1 << 20 else {
            throw .invalid("hidden = \(requested) must be in [0, \(1 << 20)] (0 = d_model)")
        }
        hidden = requested == 0 ? dModel : requested
        dropout = Float(vqmoe_hp_float(hp, "dropout", 0.1))
        guard dropout.isFinite && dropout >= 0 && dropout <= 0.9 else {
            throw .invalid("dropout = \(dropout) must be in [0, 0.9]")
        }
        initStd = Float(vqmoe_hp_float(hp, "init_std", 0.02))
        guard initStd.isFinite && initStd >= 0 else { throw .invalid("init_std = \(initStd) must be finite and >= 0") }
    }
}
