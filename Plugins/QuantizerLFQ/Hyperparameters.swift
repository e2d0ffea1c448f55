// The lfq quantizer's hyperparameter schema and its resolved values.
import PluginKit
import VQMoEABI

/// Resolved hyperparameters of one lfq quantizer.
///
/// Initialisation is fixed and documented rather than configurable: proj_in.weight ~
/// N(0, 1/d), proj_out.weight ~ N(0, 1/b) (fan-in scaled, Xavier-like), biases 0.
struct LFQConfig {
    /// K = 2^b codes (resolved: hyperparameter, else create_info.n_codes).
    var codebookSize: Int
    /// b = log2 K: sign bits per token.
    var bits: Int
    /// Weight of the entropy terms (mean per-sample entropy − gamma_div · codebook entropy).
    var entropyWeight: Double
    /// gamma_div: weight of the entropy of the batch-mean code distribution.
    var diversityGamma: Double
    /// tau: temperature of p(c|z) = softmax_c(2 z·code_c / tau).
    var temperature: Double
    /// Weight of the commitment term mse(z, sg(q)).
    var commitment: Double
    /// q_i = ±scale.
    var scale: Float

    /// Largest codebook: 2^16 codes (the entropy terms cost O(N K log2 K)).
    static let maxCodebookSize = 1 << 16

    static let schema: [HyperparameterEntry] = [
        HyperparameterEntry(
            name: "codebook_size", type: VQMOE_HP_INT,
            description: "K = 2^b codes (a power of two >= 2, b sign bits); 0 = the model's n_codes",
            defaultValue: 0, min: 0, max: Double(maxCodebookSize)),
        HyperparameterEntry(
            name: "entropy_weight", type: VQMOE_HP_FLOAT,
            description: "weight of the entropy loss: mean_t H(p(.|z_t)) - diversity_gamma * H(mean_t p(.|z_t))",
            defaultValue: 0.1, min: 0),
        HyperparameterEntry(
            name: "diversity_gamma", type: VQMOE_HP_FLOAT,
            description: "gamma_div: weight of the codebook (batch-mean) entropy, which rewards using every code",
            defaultValue: 1.0, min: 0),
        HyperparameterEntry(
            name: "temperature", type: VQMOE_HP_FLOAT,
            description: "tau in p(c|z) = softmax_c(2 z . code_c / tau)",
            defaultValue: 1.0, min: 1e-6),
        HyperparameterEntry(
            name: "commitment", type: VQMOE_HP_FLOAT,
            description: "weight of the commitment term mse(z, sg(q))",
            defaultValue: 0.25, min: 0),
        HyperparameterEntry(
            name: "scale", type: VQMOE_HP_FLOAT,
            description: "code magnitude: q_i = +scale if z_i > 0 else -scale",
            defaultValue: 1.0, min: 1e-6),
    ]

    /// Read the values the host resolved (defaults for anything missing) and check them;
    /// K must be a power of two >= 2.
    init(_ hp: UnsafePointer<vqmoe_hparams>?, nCodes: Int) throws(PluginFailure) {
        let requested = Int(vqmoe_hp_int(hp, "codebook_size", 0))
        guard requested >= 0 else {
            throw .invalid("codebook_size = \(requested) must be >= 0 (0 = the model's n_codes)")
        }
        let k = requested > 0 ? requested : nCodes
        let source = requested > 0 ? "hyperparameter codebook_size" : "the model's n_codes"
        guard k >= 2 && k & (k - 1) == 0 else {
            throw .invalid(
                "codebook size K = \(k) (from \(source)) must be a power of two >= 2: lfq codes are b = log2(K) sign bits"
            )
        }
        guard k <= LFQConfig.maxCodebookSize else {
            throw .invalid(
                "codebook size K = \(k) (from \(source)) is larger than lfq's maximum \(LFQConfig.maxCodebookSize) (2^16)"
            )
        }
        codebookSize = k
        bits = k.trailingZeroBitCount
        entropyWeight = vqmoe_hp_float(hp, "entropy_weight", 0.1)
        diversityGamma = vqmoe_hp_float(hp, "diversity_gamma", 1.0)
        temperature = vqmoe_hp_float(hp, "temperature", 1.0)
        commitment = vqmoe_hp_float(hp, "commitment", 0.25)
        scale = Float(vqmoe_hp_float(hp, "scale", 1.0))
        guard entropyWeight.isFinite && entropyWeight >= 0 else {
            throw .invalid("entropy_weight = \(entropyWeight) must be finite and >= 0")
        }
        guard diversityGamma.isFinite && diversityGamma >= 0 else {
            throw .invalid("diversity_gamma = \(diversityGamma) must be finite and >= 0")
        }
        guard temperature.isFinite && temperature > 0 else {
            throw .invalid("temperature = \(temperature) must be finite and > 0")
        }
        guard commitment.isFinite && commitment >= 0 else {
            throw .invalid("commitment = \(commitment) must be finite and >= 0")
        }
        guard scale.isFinite && scale > 0 else { throw .invalid("scale = \(scale) must be finite and > 0") }
    }

    /// 4 · scale / tau: the logit gap of one bit, a_i = logit(+) − logit(−) = (4 scale / tau) z_i.
    var bitLogitScale: Double { 4 * Double(scale) / temperature }
}
