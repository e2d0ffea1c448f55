// The softmoe router's hyperparameter schema and its resolved values.
import PluginKit
import VQMoEABI

/// Resolved hyperparameters of one softmoe router.
struct SoftMoEConfig {
    /// S: slots per expert (E*S slots in all).
    var slotsPerExpert: Int
    /// The paper's normalisation: logits = scale * (x/||x||) (Phi/||Phi||) (false: plain x Phi).
    var normalize: Bool

    static let schema: [HyperparameterEntry] = [
        HyperparameterEntry(
            name: "slots_per_expert", type: VQMOE_HP_INT,
            description: "S, slots per expert: E*S dispatch/combine columns, slot (e, s) is column e*S + s",
            defaultValue: 1, min: 1, max: 64),
        HyperparameterEntry(
            name: "normalize", type: VQMOE_HP_BOOL,
            description: "l2-normalise x per token and Phi per slot, times a learnable scale (false = plain x Phi)",
            defaultValue: 1),
    ]

    /// Read the values the host resolved (defaults for anything missing) and check them.
    init(_ hp: UnsafePointer<vqmoe_hparams>?) throws(PluginFailure) {
        slotsPerExpert = Int(vqmoe_hp_int(hp, "slots_per_expert", 1))
        normalize = vqmoe_hp_bool(hp, "normalize", 1) != 0
        guard slotsPerExpert >= 1 && slotsPerExpert <= 64 else {
            throw .invalid("hyperparameter slots_per_expert = \(slotsPerExpert) must be in [1, 64]")
        }
    }
}
