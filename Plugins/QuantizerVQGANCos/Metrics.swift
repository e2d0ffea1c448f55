// The optional "vqmoe.metrics/1" feature: code usage of the last training forward.
import PluginKit
import VQMoEABI

extension VQGANCosQuantizer {
    /// usage_perplexity = exp(−Σ_j p_j log p_j), p_j = n_j / N (1 .. K; 0 for an empty
    /// batch); dead_codes = #{j : n_j = 0}; code_counts = n (K). From the last training
    /// forward (the last forward of any kind before the first training one); nothing is
    /// reported before the first forward.
    func metrics(_ sinkPtr: UnsafePointer<vqmoe_metric_sink>?) throws(PluginFailure) {
        guard sinkPtr != nil else { throw .invalid("metrics: sink is NULL") }
        try usage?.report(sinkPtr)
    }
}
