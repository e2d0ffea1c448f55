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
    /// k-means initialisation: Lloyd's algorithm on the first training batch (STATE
    /// "initialized" records that it happened).
    var kmeansInit: Bool
    /// Lloyd iterations of the k-means initialisation, in [1, 100].
    var kmeansIters: Int
    /// Dead-code restart (needs ema): after a training EMA update, a code whose EMA count
    /// N_j < threshold is replaced by a random row of the batch. 0 = off.
    var deadCodeThreshold: Float

    static let schema: [HyperparameterEntry] = [
        HyperparameterEntry(
            name: "codebook_size", type: VQMOE_HP_INT,
            description: "K, codes in the codebook; 0 = the model's n_codes",
            defaultValue: 0, min: 0),
        HyperparameterEntry(
            name: "commitment", type: VQMOE_HP_FLOAT,
            description: "commitment weight gamma: loss = mse(sg(x), q) + gamma * mse(x, sg(q))",
            defaultValue: 0.25, min: 0),
        HyperparameterEntry(
            name: "init_scale", type: VQMOE_HP_FLOAT,
            description: "codebook init: e_j ~ N(0, init_scale^2)",
            defaultValue: 1.0, min: 0),
        HyperparameterEntry(
            name: "ema", type: VQMOE_HP_BOOL,
            description: "EMA codebook updates (codebook becomes state, loss = gamma * mse(x, sg(q)))",
            defaultValue: 0),
        HyperparameterEntry(
            name: "ema_decay", type: VQMOE_HP_FLOAT,
            description: "EMA decay of the code counts and sums, in [0, 1)",
            defaultValue: 0.99, min: 0, max: 1),
        HyperparameterEntry(
            name: "ema_epsilon", type: VQMOE_HP_FLOAT,
            description: "Laplace smoothing of the EMA code counts",
            defaultValue: 1e-5, min: 0),
        HyperparameterEntry(
            name: "kmeans_init", type: VQMOE_HP_BOOL,
            description:
                "k-means init: the first training forward (state 'initialized' = 0, not frozen) runs Lloyd's k-means on its batch (K distinct rows chosen by the step seed as initial centres) and uses the centres as the codebook",
            defaultValue: 0),
        HyperparameterEntry(
            name: "kmeans_iters", type: VQMOE_HP_INT,
            description:
                "Lloyd iterations of the k-means init (assign, then move each centre to its mean; empty clusters keep their centre)",
            defaultValue: 10, min: 1, max: 100),
        HyperparameterEntry(
            name: "dead_code_threshold", type: VQMOE_HP_FLOAT,
            description:
                "dead-code restart, needs ema: after each training EMA update a code with EMA count below this is replaced by a random batch row (ema_sum = row, ema_count = 1); 0 = off",
            defaultValue: 0, min: 0),
    ]

    /// Read the values the host resolved (defaults for anything missing) and check them.
    init(_ hp: UnsafePointer<vqmoe_hparams>?, nCodes: Int) throws(PluginFailure) {
        let requested = Int(vqmoe_hp_int(hp, "codebook_size", 0))
        guard requested >= 0 else {
            throw .invalid("codebook_size = \(requested) must be >= 0 (0 = the model's n_codes)")
        }
        codebookSize = requested > 0 ? requested : nCodes
        commitment = Float(vqmoe_hp_float(hp, "commitment", 0.25))
        initScale = Float(vqmoe_hp_float(hp, "init_scale", 1.0))
        ema = vqmoe_hp_bool(hp, "ema", 0) != 0
        emaDecay = Float(vqmoe_hp_float(hp, "ema_decay", 0.99))
        emaEpsilon = Float(vqmoe_hp_float(hp, "ema_epsilon", 1e-5))
        kmeansInit = vqmoe_hp_bool(hp, "kmeans_init", 0) != 0
        kmeansIters = Int(vqmoe_hp_int(hp, "kmeans_iters", 10))
        deadCodeThreshold = Float(vqmoe_hp_float(hp, "dead_code_threshold", 0))
        guard codebookSize >= 1 else {
            throw .invalid(
                "codebook size K = \(codebookSize): set hyperparameter codebook_size >= 1 or give the model n_codes >= 1 (got codebook_size = \(requested), n_codes = \(nCodes))"
            )
        }
        guard commitment.isFinite && commitment >= 0 else {
            throw .invalid("commitment = \(commitment) must be finite and >= 0")
        }
        guard initScale.isFinite && initScale >= 0 else {
            throw .invalid("init_scale = \(initScale) must be finite and >= 0")
        }
        guard emaDecay >= 0 && emaDecay < 1 else { throw .invalid("ema_decay = \(emaDecay) must be in [0, 1)") }
        guard emaEpsilon.isFinite && emaEpsilon >= 0 else {
            throw .invalid("ema_epsilon = \(emaEpsilon) must be finite and >= 0")
        }
        guard kmeansIters >= 1 && kmeansIters <= 100 else {
            throw .invalid("kmeans_iters = \(kmeansIters) must be in [1, 100]")
        }
        guard deadCodeThreshold.isFinite && deadCodeThreshold >= 0 else {
            throw .invalid("dead_code_threshold = \(deadCodeThreshold) must be finite and >= 0 (0 = off)")
        }
        guard deadCodeThreshold == 0 || ema else {
            throw .invalid(
                "dead_code_threshold = \(deadCodeThreshold) needs ema = true: dead codes are found by their EMA counts (set ema = true, or dead_code_threshold = 0 to turn the restart off)"
            )
        }
    }
}
