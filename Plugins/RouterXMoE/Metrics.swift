// The optional "vqmoe.metrics/1" feature: the current temperature and expert-embedding scale.
import PluginKit
import VQMoEABI

extension XMoERouter {
    /// temperature = tau (exp(log_temperature), or the fixed value);
    /// expert_embedding_norm = mean_e ||e_e|| (embedding_norm's target after each begin_step).
    func metrics(_ sinkPtr: UnsafePointer<vqmoe_metric_sink>?) throws(PluginFailure) {
        guard let sink = sinkPtr?.pointee else { throw .invalid("metrics: sink is NULL") }
        let (_, e) = try bound()
        let tau = try temperature()
        var total: Double = 0
        for j in 0..<nExperts {
            var sq: Double = 0
            for i in 0..<routerDim { let v = Double(e[j * routerDim + i]); sq += v * v }
            total += sq.squareRoot()
        }
        if let scalar = sink.scalar {
            scalar(sink.user, "temperature", Double(tau))
            scalar(sink.user, "expert_embedding_norm", total / Double(nExperts))
        }
    }
}
