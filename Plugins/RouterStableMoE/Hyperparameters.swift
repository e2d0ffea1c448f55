// The stablemoe router's hyperparameter schema and its resolved values.
import PluginKit
import VQMoEABI

/// Resolved hyperparameters of one stablemoe router.
struct StableMoEConfig {
    /// First step of stage 2; 0 = round(0.1 * total_steps).
    var stage2Step: Int
    /// D_dist: width of the distilled router's word embeddings and centroids.
    var distillDim: Int
    /// Weight of the Switch balance loss E * sum_e f_e P_e in aux_loss (stage 1).
    var balanceWeight: Float
    /// Weight of the distillation cross-entropy in aux_loss (stage 1).
    var distillWeight: Float
    /// Standard deviation of the N(0, init_std^2) init of the distilled router's parameters.
    var initStd: Float
    /// The method paper's two stages with a distilled router (false: the reference code's
    /// behaviour, stage 1 forever and no distillation loss).
    var distill: Bool

    static let schema: [HyperparameterEntry] = [
        HyperparameterEntry(
            name: "stage2_step", type: VQMOE_HP_INT,
            description: "first training step of stage 2 (frozen distilled router); 0 = round(0.1 * total_steps)",
            defaultValue: 0, min: 0),
        HyperparameterEntry(
            name: "distill_dim", type: VQMOE_HP_INT,
            description: "D_dist, width of the distilled router's token embeddings and centroids",
            defaultValue: 16, min: 1, max: 4096),
        HyperparameterEntry(
            name: "balance_weight", type: VQMOE_HP_FLOAT,
            description: "weight of the stage-1 balance loss E * sum_e f_e * P_e (P from softmax of the scores)",
            defaultValue: 0.01, min: 0),
        HyperparameterEntry(
            name: "distill_weight", type: VQMOE_HP_FLOAT,
            description: "weight of the stage-1 distillation cross-entropy towards the stage-1 assignment",
            defaultValue: 1.0, min: 0),
        HyperparameterEntry(
            name: "init_std", type: VQMOE_HP_FLOAT,
            description:
                "init of the distilled router's token embeddings and centroids: N(0, init_std^2) (expert centroids: N(0, 1/d))",
            defaultValue: 0.02, min: 0),
        HyperparameterEntry(
            name: "distill", type: VQMOE_HP_BOOL,
            description:
                "two stages with a distilled token-id router (false = reference code: stage 1 forever, no distillation)",
            defaultValue: 1),
    ]

    /// Read the values the host resolved (defaults for anything missing) and check them.
    init(_ hp: UnsafePointer<vqmoe_hparams>?) throws(PluginFailure) {
        stage2Step = Int(vqmoe_hp_int(hp, "stage2_step", 0))
        distillDim = Int(vqmoe_hp_int(hp, "distill_dim", 16))
        balanceWeight = Float(vqmoe_hp_float(hp, "balance_weight", 0.01))
        distillWeight = Float(vqmoe_hp_float(hp, "distill_weight", 1.0))
        initStd = Float(vqmoe_hp_float(hp, "init_std", 0.02))
        distill = vqmoe_hp_bool(hp, "distill", 1) != 0
        guard stage2Step >= 0 else {
            throw .invalid("stage2_step = \(stage2Step) must be >= 0 (0 = at 10% of total_steps)")
        }
        guard distillDim >= 1 && distillDim <= 4096 else {
            throw .invalid("distill_dim = \(distillDim) must be in [1, 4096]")
        }
        guard balanceWeight.isFinite && balanceWeight >= 0 else {
            throw .invalid("balance_weight = \(balanceWeight) must be finite and >= 0")
        }
        guard distillWeight.isFinite && distillWeight >= 0 else {
            throw .invalid("distill_weight = \(distillWeight) must be finite and >= 0")
        }
        guard initStd.isFinite && initStd >= 0 else { throw .invalid("init_std = \(initStd) must be finite and >= 0") }
    }

    /// The first step of stage 2: stage2_step, or round(0.1 * total_steps) (half away from
    /// zero) when stage2_step = 0. A run with total_steps < 5 and stage2_step = 0 therefore
    /// starts in stage 2.
    func switchStep(totalSteps: Int64) -> Int64 {
        if stage2Step > 0 { return Int64(stage2Step) }
        return Int64((0.1 * Double(max(totalSteps, 0))).rounded())
    }

    /// The stage of a forward: 1 (centroid router decides, distilled router learns) while
    /// training before the switch, 2 (frozen distilled router decides) from the switch on and
    /// in every non-training forward; always 1 with distill = false.
    func stage(_ step: vqmoe_step_info) -> Int {
        guard distill else { return 1 }
        let training = step.flags & VQMOE_STEP_TRAIN != 0
        return training && step.step < switchStep(totalSteps: step.total_steps) ? 1 : 2
    }
}
