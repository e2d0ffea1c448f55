// The vqgan_cos quantizer's hyperparameter schema and its resolved values.
import PluginKit
import VQMoEABI

/// Resolved hyperparameters of one vqgan_cos quantizer.
///
/// Initialisation is fixed and documented rather than configurable: proj_in.weight ~
/// N(0, 1/d), proj_out.weight ~ N(0, 1/d_c) (fan-in scaled, Xavier-like), biases 0, codebook
/// e_j ~ N(0, 1) (only its direction matters: codes are l2-normalised).
struct VQGANCosConfig {
    /// K: codes in the codebook (resolved: hyperparameter, else create_info.n_codes).
    var codebookSize: Int
    /// d_c: width of the factorised code space the codebook lives in.
    var codeDim: Int
    /// gamma: weight of the commitment term mse(ẑ, sg(ê_c)).
    var commitment: Float

    static let schema: [HyperparameterEntry] = [
        HyperparameterEntry(
            name: "codebook_size", type: VQMOE_HP_INT,
            description: "K, codes in the codebook; 0 = the model's n_codes",
            defaultValue: 0, min: 0),
        HyperparameterEntry(
            name: "code_dim", type: VQMOE_HP_INT,
            description: "d_c, the low-dimensional code space: z = W_in x + b_in (d -> d_c), l2-normalised",
            defaultValue: 16, min: 1, max: 1024),
        HyperparameterEntry(
            name: "commitment", type: VQMOE_HP_FLOAT,
            description: "commitment weight gamma: loss = mse(sg(ẑ), ê_c) + gamma * mse(ẑ, sg(ê_c))",
            defaultValue: 0.25, min: 0),
    ]

    /// Read the values the host resolved (defaults for anything missing) and check them.
    init(_ hp: UnsafePointer<vqmoe_hparams>?, nCodes: Int) throws(PluginFailure) {
        let requested = Int(vqmoe_hp_int(hp, "codebook_size", 0))
        guard requested >= 0 else {
            throw .invalid("codebook_size = \(requested) must be >= 0 (0 = the model's n_codes)")
        }
        codebookSize = requested > 0 ? requested : nCodes
        codeDim = Int(vqmoe_hp_int(hp, "code_dim", 16))
        commitment = Float(vqmoe_hp_float(hp, "commitment", 0.25))
        guard codebookSize >= 1 else {
            throw .invalid(
                "codebook size K = \(codebookSize): set hyperparameter codebook_size >= 1 or give the model n_codes >= 1 (got codebook_size = \(requested), n_codes = \(nCodes))"
            )
        }
        guard codeDim >= 1 && codeDim <= 1024 else { throw .invalid("code_dim = \(codeDim) must be in [1, 1024]") }
        guard commitment.isFinite && commitment >= 0 else {
            throw .invalid("commitment = \(commitment) must be finite and >= 0")
        }
    }
}
