// The smoe_dropout router's hyperparameter schema, its resolved values and the k schedule.
import PluginKit
import VQMoEABI

/// Resolved hyperparameters of one smoe_dropout router.
struct SMoEDropoutConfig {
    /// Experts per token at step 0.
    var kMin: Int
    /// Experts per token at the end of training and in evaluation (k_max = 0 resolved to E).
    var kMax: Int
    /// Weight of the Switch balance loss in aux_loss (0: the router is frozen, nothing to balance).
    var balanceWeight: Float
    /// Standard deviation of the N(0, init_std^2) router weight.
    var initStd: Float

    static let schema: [HyperparameterEntry] = [
        HyperparameterEntry(
            name: "k_min", type: VQMOE_HP_INT,
            description: "experts per token at the start of training (the schedule's first value)",
            defaultValue: 1, min: 1, max: 64),
        HyperparameterEntry(
            name: "k_max", type: VQMOE_HP_INT,
            description: "experts per token at the end of training and in evaluation (0 = n_experts)",
            defaultValue: 2, min: 0, max: 64),
        HyperparameterEntry(
            name: "balance_weight", type: VQMOE_HP_FLOAT,
            description: "weight of the Switch balance loss E * sum_e f_e * P_e in aux_loss (0: off; "
                + "its gradient reaches x only, the router is frozen)",
            defaultValue: 0, min: 0),
        HyperparameterEntry(
            name: "init_std", type: VQMOE_HP_FLOAT,
            description: "frozen random router weight: W ~ N(0, init_std^2)",
            defaultValue: 0.02, min: 0),
    ]

    /// Read the values the host resolved (defaults for anything missing) and check them
    /// against the model: 1 <= k_min <= k_max <= n_experts (after k_max = 0 -> n_experts).
    init(_ hp: UnsafePointer<vqmoe_hparams>?, nExperts: Int) throws(PluginFailure) {
        kMin = Int(vqmoe_hp_int(hp, "k_min", 1))
        let rawMax = Int(vqmoe_hp_int(hp, "k_max", 2))
        balanceWeight = Float(vqmoe_hp_float(hp, "balance_weight", 0))
        initStd = Float(vqmoe_hp_float(hp, "init_std", 0.02))
        guard kMin >= 1 && kMin <= 64 else { throw .invalid("hyperparameter k_min = \(kMin) must be in [1, 64]") }
        guard rawMax >= 0 && rawMax <= 64 else {
            throw .invalid("hyperparameter k_max = \(rawMax) must be in [0, 64] (0 = n_experts)")
        }
        kMax = rawMax == 0 ? nExperts : rawMax
        guard kMax <= nExperts else {
            throw .invalid(
                "hyperparameter k_max = \(kMax) is larger than n_experts = \(nExperts): top-k routing needs k <= n_experts"
            )
        }
        guard kMin <= kMax else {
            throw .invalid(
                "hyperparameter k_min = \(kMin) is larger than k_max = \(kMax)\(rawMax == 0 ? " (k_max = 0 means n_experts)" : "")"
            )
        }
        guard balanceWeight.isFinite && balanceWeight >= 0 else {
            throw .invalid("balance_weight = \(balanceWeight) must be finite and >= 0")
        }
        guard initStd.isFinite && initStd >= 0 else { throw .invalid("init_std = \(initStd) must be finite and >= 0") }
    }

    /// The paper's linear schedule (the reference code's `linear_increase`):
    ///   k(step) = clamp(round((k_max - k_min) * step / total_steps) + k_min, k_min, k_max)
    /// with round-half-to-even (Python's round, as the reference code uses); k_max when
    /// total_steps <= 0 (no plan to spread the schedule over) and in evaluation (no TRAIN
    /// flag: the paper evaluates at full capacity).
    func k(step: Int64, totalSteps: Int64, train: Bool) -> Int {
        guard train, totalSteps > 0 else { return kMax }
        let grown = (Double(kMax - kMin) * Double(step) / Double(totalSteps)).rounded(.toNearestOrEven)
        guard !grown.isNaN else { return kMax }
        // Clamp in Double first: a step far past total_steps must not overflow Int.
        return Int(Swift.min(Swift.max(grown + Double(kMin), Double(kMin)), Double(kMax)))
    }
}
