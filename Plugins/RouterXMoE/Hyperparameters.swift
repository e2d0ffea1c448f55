// The xmoe router's hyperparameter schema and its resolved values.
import PluginKit
import VQMoEABI

/// Resolved hyperparameters of one xmoe router.
struct XMoEConfig {
    /// Experts kept per token.
    var k: Int
    /// d_r: width of the low-dimensional routing space (the paper projects to 16 dims).
    var routerDim: Int
    /// The temperature tau: the fixed value, or the initial value of the learnable one.
    var temperature: Float
    /// Whether tau = exp(log_temperature) is a trained parameter ("learnable") or the
    /// constant `temperature` ("fixed", as in the reference code).
    var learnableTemperature: Bool
    /// > 0: rescale every expert embedding to this L2 norm at the start of each training
    /// step (the reference code's 1.5); 0: off.
    var embeddingNorm: Float
    /// Weight of the Switch balance loss in aux_loss.
    var balanceWeight: Float
    /// Standard deviation of the N(0, init_std^2) projection init.
    var initStd: Float

    static let schema: [HyperparameterEntry] = [
        HyperparameterEntry(
            name: "k", type: VQMOE_HP_INT,
            description: "experts kept per token (top-k; must be <= n_experts)",
            defaultValue: 2, min: 1, max: 64),
        HyperparameterEntry(
            name: "router_dim", type: VQMOE_HP_INT,
            description: "d_r: routing-space width; h = W_p x projects d -> d_r (no bias)",
            defaultValue: 16, min: 1, max: 4096),
        HyperparameterEntry(
            name: "temperature", type: VQMOE_HP_FLOAT,
            description: "tau in s_e = cos(h, e_e) / tau: the fixed value, or the learnable one's initial value (> 0)",
            defaultValue: 0.3, min: 0),
        HyperparameterEntry(
            name: "temperature_mode", type: VQMOE_HP_STRING,
            description: "learnable: tau = exp(log_temperature), a trained parameter; fixed: tau = temperature",
            defaultString: "learnable", choices: "learnable,fixed"),
        HyperparameterEntry(
            name: "embedding_norm", type: VQMOE_HP_FLOAT,
            description: "> 0: rescale each expert embedding to this L2 norm at the start of every training "
                + "step (reference code: 1.5); 0: off",
            defaultValue: 0, min: 0),
        HyperparameterEntry(
            name: "balance_weight", type: VQMOE_HP_FLOAT,
            description:
                "weight of the Switch balance loss E * sum_e f_e * P_e (P from the softmax over all scores) in aux_loss",
            defaultValue: 0.01, min: 0),
        HyperparameterEntry(
            name: "init_std", type: VQMOE_HP_FLOAT,
            description: "projection init: W_p ~ N(0, init_std^2)",
            defaultValue: 0.02, min: 0),
    ]

    /// Read the values the host resolved (defaults for anything missing) and check them
    /// against the model: 1 <= k <= n_experts, temperature > 0.
    init(_ hp: UnsafePointer<vqmoe_hparams>?, nExperts: Int) throws(PluginFailure) {
        k = Int(vqmoe_hp_int(hp, "k", 2))
        routerDim = Int(vqmoe_hp_int(hp, "router_dim", 16))
        temperature = Float(vqmoe_hp_float(hp, "temperature", 0.3))
        let mode = vqmoe_hp_string(hp, "temperature_mode", "learnable").map { String(cString: $0) } ?? "learnable"
        embeddingNorm = Float(vqmoe_hp_float(hp, "embedding_norm", 0))
        balanceWeight = Float(vqmoe_hp_float(hp, "balance_weight", 0.01))
        initStd = Float(vqmoe_hp_float(hp, "init_std", 0.02))
        guard k >= 1 && k <= 64 else { throw .invalid("hyperparameter k = \(k) must be in [1, 64]") }
        guard k <= nExperts else {
            throw .invalid(
                "hyperparameter k = \(k) is larger than n_experts = \(nExperts): top-k routing needs k <= n_experts")
        }
        guard routerDim >= 1 && routerDim <= 4096 else {
            throw .invalid("hyperparameter router_dim = \(routerDim) must be in [1, 4096]")
        }
        guard temperature.isFinite && temperature > 0 else {
            throw .invalid("temperature = \(temperature) must be finite and > 0 (scores are divided by it)")
        }
        switch mode {
        case "learnable": learnableTemperature = true
        case "fixed": learnableTemperature = false
        default: throw .invalid("temperature_mode = '\(mode)' must be 'learnable' or 'fixed'")
        }
        guard embeddingNorm.isFinite && embeddingNorm >= 0 else {
            throw .invalid("embedding_norm = \(embeddingNorm) must be finite and >= 0")
        }
        guard balanceWeight.isFinite && balanceWeight >= 0 else {
            throw .invalid("balance_weight = \(balanceWeight) must be finite and >= 0")
        }
        guard initStd.isFinite && initStd >= 0 else { throw .invalid("init_std = \(initStd) must be finite and >= 0") }
    }
}
