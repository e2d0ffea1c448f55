// The rvq quantizer's hyperparameter schema and its resolved values.
import PluginKit
import VQMoEABI

/// How the codebook term of each level sends gradients to the codebooks (the loss VALUE and
/// the gradient to x are the same in both).
enum CodebookLoss: String {
    /// SoundStream / lucidrains: level l's term mse(sg(r_{l-1}), q_l) trains codebook l only
    /// (the residuals are built from detached quantized vectors).
    case residual
    /// RQ-VAE (Lee et al. 2022) with a learned codebook: level l's term is
    /// mse(sg(x), q_1 + ... + q_l), so codebook m also gets the terms of the levels l > m.
    case cumulative
}

/// Resolved hyperparameters of one rvq quantizer.
struct RVQConfig {
    /// L: quantization levels (codes per token).
    var levels: Int
    /// K: codes per level's codebook (resolved: hyperparameter, else create_info.n_codes).
    var codebookSize: Int
    /// gamma: weight of the commitment terms mse(r_{l-1}, sg(q_l)).
    var commitment: Float
    /// Codebook init e^l_j ~ N(0, init_scale^2) for every level.
    var initScale: Float
    var codebookLoss: CodebookLoss

    static let schema: [HyperparameterEntry] = [
        HyperparameterEntry(
            name: "levels", type: VQMOE_HP_INT,
            description:
                "L, residual quantization levels; level l's code picks the token's l-th expert (top-L routing)",
            defaultValue: 2, min: 1, max: 16),
        HyperparameterEntry(
            name: "codebook_size", type: VQMOE_HP_INT,
            description: "K, codes in each level's codebook; 0 = the model's n_codes",
            defaultValue: 0, min: 0),
        HyperparameterEntry(
            name: "commitment", type: VQMOE_HP_FLOAT,
            description: "commitment weight gamma: loss = sum_l mse(sg(r_{l-1}), q_l) + gamma * mse(r_{l-1}, sg(q_l))",
            defaultValue: 0.25, min: 0),
        HyperparameterEntry(
            name: "init_scale", type: VQMOE_HP_FLOAT,
            description: "codebook init: e^l_j ~ N(0, init_scale^2) at every level",
            defaultValue: 1.0, min: 0),
        HyperparameterEntry(
            name: "codebook_loss", type: VQMOE_HP_STRING,
            description:
                "codebook gradient: residual = level l's term trains codebook l only (SoundStream/lucidrains, detached residuals); cumulative = level l's term is mse(sg(x), q_1+..+q_l) and also trains the earlier codebooks (RQ-VAE)",
            defaultString: "residual", choices: "residual,cumulative"),
    ]

    /// Read the values the host resolved (defaults for anything missing) and check them.
    init(_ hp: UnsafePointer<vqmoe_hparams>?, nCodes: Int) throws(PluginFailure) {
        levels = Int(vqmoe_hp_int(hp, "levels", 2))
        let requested = Int(vqmoe_hp_int(hp, "codebook_size", 0))
        guard requested >= 0 else {
            throw .invalid("codebook_size = \(requested) must be >= 0 (0 = the model's n_codes)")
        }
        codebookSize = requested > 0 ? requested : nCodes
        commitment = Float(vqmoe_hp_float(hp, "commitment", 0.25))
        initScale = Float(vqmoe_hp_float(hp, "init_scale", 1.0))
        let lossName = String(cString: vqmoe_hp_string(hp, "codebook_loss", "residual"))
        guard let loss = CodebookLoss(rawValue: lossName) else {
            throw .invalid("codebook_loss = '\(lossName)' must be 'residual' or 'cumulative'")
        }
        codebookLoss = loss
        guard levels >= 1 && levels <= 16 else { throw .invalid("levels = \(levels) must be in [1, 16]") }
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
    }
}
