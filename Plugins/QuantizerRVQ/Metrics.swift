// The optional "vqmoe.metrics/1" feature: code usage of the last forward, per level and in total.
import PluginKit
import VQMoEABI

extension RVQQuantizer {
    /// Per level l (0-based, the column of `codes` and the first index of the codebook):
    /// usage_perplexity_l<l> = exp(-sum_j p_j log p_j), p_j = n^l_j / N; dead_codes_l<l> =
    /// #{j : n^l_j = 0}; code_counts_l<l> = n^l (K). Totals over the summed counts
    /// n_j = sum_l n^l_j: usage_perplexity, dead_codes, code_counts. From the last training
    /// forward (the last forward of any kind before the first training one); nothing is
    /// reported before the first forward.
    func metrics(_ sinkPtr: UnsafePointer<vqmoe_metric_sink>?) throws(PluginFailure) {
        guard let sink = sinkPtr?.pointee else { throw .invalid("metrics: sink is NULL") }
        guard let stats else { return }
        for (l, counts) in stats.levelCounts.enumerated() {
            let usage = CodeUsage(counts: counts, tokens: stats.tokens)
            sink.scalar?(sink.user, "usage_perplexity_l\(l)", usage.perplexity)
            sink.scalar?(sink.user, "dead_codes_l\(l)", Double(usage.deadCodes))
            counts.withUnsafeBufferPointer {
                sink.vector?(sink.user, "code_counts_l\(l)", $0.baseAddress, Int64($0.count))
            }
        }
        let total = (0..<nCodes).map { j in stats.levelCounts.reduce(Float(0)) { $0 + $1[j] } }
        try CodeUsage(counts: total, tokens: stats.tokens * nLevels).report(sinkPtr)
    }
}
