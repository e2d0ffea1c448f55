// The smoe router's hyperparameter schema and its resolved values.
import PluginKit
import VQMoEABI

/// Resolved hyperparameters of one smoe router.
struct SMoEConfig {
    /// Experts kept per token.
    var k: Int
    /// Weight of the Switch balance loss in aux_loss.
    var balanceWeight: Float
    /// Standard deviation of the N(0, init_std^2) router weight init.
    var initStd: Float
    /// Whether logits get a learned bias b (E).
    var bias: Bool
    /// weights = "full": the kept experts' probabilities under the softmax over all E logits
    /// (Switch / GShard) instead of the softmax over the kept logits (Mixtral, "kept").
    var fullSoftmax: Bool

    static let schema: [HyperparameterEntry] = [
        HyperparameterEntry(
            name: "k", type: VQMOE_HP_INT,
            description: "experts kept per token (top-k; must be <= n_experts)",
            defaultValue: 2, min: 1, max: 64),
        HyperparameterEntry(
            name: "balance_weight", type: VQMOE_HP_FLOAT,
            description: "weight of the Switch balance loss E * sum_e f_e * P_e in aux_loss",
            defaultValue: 0.01, min: 0),
        HyperparameterEntry(
            name: "init_std", type: VQMOE_HP_FLOAT,
            description: "router weight init: W ~ N(0, init_std^2)",
            defaultValue: 0.02, min: 0),
        HyperparameterEntry(
            name: "bias", type: VQMOE_HP_BOOL,
            description: "add a learned bias to the router logits (initialised to 0)",
            defaultValue: 0),
        HyperparameterEntry(
            name: "weights", type: VQMOE_HP_STRING,
            description:
                "kept: softmax over the k kept logits (Mixtral; with k = 1 every weight is 1 and the router learns from the balance loss only); full: the kept experts' probabilities under the softmax over all E logits (Switch, GShard)",
            defaultString: "kept", choices: "kept,full"),
    ]

    /// Read the values the host resolved (defaults for anything missing) and check them
    /// against the model: 1 <= k <= n_experts.
    init(_ hp: UnsafePointer<vqmoe_hparams>?, nExperts: Int) throws(PluginFailure) {
        k = Int(vqmoe_hp_int(hp, "k", 2))
        balanceWeight = Float(vqmoe_hp_float(hp, "balance_weight", 0.01))
        initStd = Float(vqmoe_hp_float(hp, "init_std", 0.02))
        bias = vqmoe_hp_bool(hp, "bias", 0) != 0
        let weights = vqmoe_hp_string(hp, "weights", nil).map { String(cString: $0) } ?? "kept"
        guard weights == "kept" || weights == "full" else {
            throw .invalid("weights '\(weights)' must be one of kept, full")
        }
        fullSoftmax = weights == "full"
        guard k >= 1 && k <= 64 else { throw .invalid("hyperparameter k = \(k) must be in [1, 64]") }
        guard k <= nExperts else {
            throw .invalid(
                "hyperparameter k = \(k) is larger than n_experts = \(nExperts): top-k routing needs k <= n_experts")
        }
        guard balanceWeight.isFinite && balanceWeight >= 0 else {
            throw .invalid("balance_weight = \(balanceWeight) must be finite and >= 0")
        }
        guard initStd.isFinite && initStd >= 0 else { throw .invalid("init_std = \(initStd) must be finite and >= 0") }
    }
}
