// The optional "vqmoe.metrics/1" feature: code usage of the last forward.
import Glibc
import PluginKit
import VQMoEABI

extension VQVAEQuantizer {
    /// usage_perplexity = exp(-sum_j p_j log p_j), p_j = n_j / N (1 .. K; 0 for an empty
    /// batch); dead_codes = #{j : n_j = 0}; code_counts = n (K); with dead_code_threshold > 0
    /// also restarted_codes (codes the dead-code restart replaced). From the last training
    /// forward (the last forward of any kind before the first training one); nothing is
    /// reported before the first forward.
    func metrics(_ sinkPtr: UnsafePointer<vqmoe_metric_sink>?) throws(PluginFailure) {
        guard let sink = sinkPtr?.pointee else { throw .invalid("metrics: sink is NULL") }
        guard let stats else { return }
        var entropy: Double = 0
        var dead = 0
        for c in stats.counts {
            if c == 0 { dead += 1; continue }
            let p = Double(c) / Double(stats.tokens)
            entropy -= p * log(p)
        }
        let perplexity = stats.tokens > 0 ? exp(entropy) : 0
        if let scalar = sink.scalar {
            scalar(sink.user, "usage_perplexity", perplexity)
            scalar(sink.user, "dead_codes", Double(dead))
            if let restarted = stats.restarted { scalar(sink.user, "restarted_codes", Double(restarted)) }
        }
        if let vector = sink.vector {
            stats.counts.withUnsafeBufferPointer { vector(sink.user, "code_counts", $0.baseAddress, Int64($0.count)) }
        }
    }
}
