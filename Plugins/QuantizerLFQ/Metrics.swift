// The optional "vqmoe.metrics/1" feature: code usage and entropies of the last training forward.
import PluginKit
import VQMoEABI

extension LFQQuantizer {
    /// usage_perplexity = exp(−Σ_j p_j log p_j), p_j = n_j / N (1 .. K; 0 for an empty
    /// batch); dead_codes = #{j : n_j = 0}; code_counts = n (K); per_sample_entropy =
    /// mean_t H(p(.|z_t)) and codebook_entropy = H(mean_t p(.|z_t)) (nats). From the last
    /// training forward (the last forward of any kind before the first training one);
    /// nothing is reported before the first forward.
    func metrics(_ sinkPtr: UnsafePointer<vqmoe_metric_sink>?) throws(PluginFailure) {
        guard let sink = sinkPtr?.pointee else { throw .invalid("metrics: sink is NULL") }
        guard let report else { return }
        try report.usage.report(sinkPtr)
        sink.scalar?(sink.user, "per_sample_entropy", report.perSampleEntropy)
        sink.scalar?(sink.user, "codebook_entropy", report.codebookEntropy)
    }
}
