// The vqvae quantizer's hyperparameter schema and its resolved values.
import PluginKit
import VQMoEABI


/// Resolved hyperparameters of one vqvae quantizer.
struct VQVAEConfig {
    /// K: codes in the codebook (resolved: hyperparameter, else create_info.n_codes).
    var codebookSize: Int
    /// gamma: weight of the commitment term mse(x, sg(q)).
    var commitment: Float
    /// Codebook init e_j ~ N(0, init_scale^2).
    var initScale: Float
    /// EMA codebook (a STATE buffer updated in training forwards) instead of a codebook loss.
    var ema: Bool
    var emaDecay: Float
    /// Laplace smoothing of the EMA counts.
    var emaEpsilon: Float

    static let schema: [HyperparameterEntry] = [
        HyperparameterEntry(name: "codebook_size", type: VQMOE_HP_INT,
                            description: "K, codes in the codebook; 0 = the model's n_codes",
                            defaultValue: 0, min: 0),
        HyperparameterEntry(name: "commitment", type: VQMOE_HP_FLOAT,
                            description: "commitment weight gamma: loss = mse(sg(x), q) + gamma * mse(x, sg(q))",
                            defaultValue: 0.25, min: 0),
        HyperparameterEntry(name: "init_scale", type: VQMOE_HP_FLOAT,
                            description: "codebook init: e_j ~ N(0, init_scale^2)",
                            defaultValue: 1.0, min: 0),
        HyperparameterEntry(name: "ema", type: VQMOE_HP_BOOL,
                            description: "EMA codebook updates (codebook becomes state, loss = gamma * mse(x, sg(q)))",
                            defaultValue: 0),
        HyperparameterEntry(name: "ema_decay", type: VQMOE_HP_FLOAT,
                            description: "EMA decay of the code counts and sums, in [0, 1)",
                            defaultValue: 0.99, min: 0, max: 1),
        HyperparameterEntry(name: "ema_epsilon", type: VQMOE_HP_FLOAT,
                            description: "Laplace smoothing of the EMA code counts",
                            defaultValue: 1e-5, min: 0),
    ]

    /// Read the values the host resolved (defaults for anything missing) and check them.
    init(_ hp: UnsafePointer<vqmoe_hparams>?, nCodes: Int) throws(PluginFailure) {
        let requested = Int(vqmoe_hp_int(hp, "codebook_size", 0))
        guard requested >= 0 else { throw .invalid("codebook_size = \(requested) must be >= 0 (0 = the model's n_codes)") }
        codebookSize = requested > 0 ? requested : nCodes
        commitment = Float(vqmoe_hp_float(hp, "commitment", 0.25))
        initScale = Float(vqmoe_hp_float(hp, "init_scale", 1.0))
        ema = vqmoe_hp_bool(hp, "ema", 0) != 0
        emaDecay = Float(vqmoe_hp_float(hp, "ema_decay", 0.99))
        emaEpsilon = Float(vqmoe_hp_float(hp, "ema_epsilon", 1e-5))
        guard codebookSize >= 1 else {
            throw .invalid("codebook size K = \(codebookSize): set hyperparameter codebook_size >= 1 or give the model n_codes >= 1 (got codebook_size = \(requested), n_codes = \(nCodes))")
        }
        guard commitment.isFinite && commitment >= 0 else { throw .invalid("commitment = \(commitment) must be finite and >= 0") }
        guard initScale.isFinite && initScale >= 0 else { throw .invalid("init_scale = \(initScale) must be finite and >= 0") }
        guard emaDecay >= 0 && emaDecay < 1 else { throw .invalid("ema_decay = \(emaDecay) must be in [0, 1)") }
        guard emaEpsilon.isFinite && emaEpsilon >= 0 else { throw .invalid("ema_epsilon = \(emaEpsilon) must be finite and >= 0") }
    }
}
