// The optional "vqmoe.metrics/1" feature: the stage and how well the distilled router agrees
// with the centroid router.
import PluginKit
import VQMoEABI

extension StableMoERouter {
    /// stage = 1 or 2 of the last training forward; distill_accuracy = fraction of its tokens
    /// whose distilled decision (argmax z, or the frozen stage-2 table) equals the centroid
    /// router's argmax s (the stage-1 assignment), only with distill = true. From the last
    /// training forward (the last forward of any kind before the first training one); nothing
    /// is reported before the first forward.
    func metrics(_ sinkPtr: UnsafePointer<vqmoe_metric_sink>?) throws(PluginFailure) {
        guard let sink = sinkPtr?.pointee else { throw .invalid("metrics: sink is NULL") }
        guard let stats, let scalar = sink.scalar else { return }
        scalar(sink.user, "stage", Double(stats.stage))
        if let accuracy = stats.distillAccuracy { scalar(sink.user, "distill_accuracy", accuracy) }
    }
}
