// The dense router's hyperparameter schema (empty: "no routing" has nothing to tune).
import PluginKit
import VQMoEABI

/// Resolved hyperparameters of one dense router: none. The layer's width is the model's
/// d_inner; the router only fixes k = 1 and sends every token to expert 0.
struct DenseConfig {
    static let schema: [HyperparameterEntry] = []

    init(_ hp: UnsafePointer<vqmoe_hparams>?) {}
}
