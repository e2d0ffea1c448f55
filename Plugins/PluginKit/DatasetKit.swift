// Datasets on the kit: `DatasetPlugin` and the vqmoe_dataset_api table that serves every one.
import Glibc
import VQMoEABI

/// A dataset component: batches are a pure function of (seed, split, index, batch size). The
/// kit checks the structs' sizes; the dataset fills them.
///
/// ```swift
/// final class MyData: DatasetPlugin {
///     func info(_ out: UnsafeMutablePointer<vqmoe_dataset_info>?) throws(PluginFailure) { … }
///     func batchCount(_ split: Int32, _ batchSize: Int64) throws(PluginFailure) -> Int64 { … }
///     func readBatch(_ req: UnsafePointer<vqmoe_batch_request>?, _ out: UnsafeMutablePointer<vqmoe_batch>?) throws(PluginFailure) { … }
/// }
/// ```
public protocol DatasetPlugin: PluginComponent {
    func info(_ out: UnsafeMutablePointer<vqmoe_dataset_info>?) throws(PluginFailure)
    /// Batches in an ordered pass over `split` (train: Int64.max).
    func batchCount(_ split: Int32, _ batchSize: Int64) throws(PluginFailure) -> Int64
    func readBatch(
        _ req: UnsafePointer<vqmoe_batch_request>?, _ out: UnsafeMutablePointer<vqmoe_batch>?)
        throws(PluginFailure)
}

private func dataset(_ inst: Instance) throws(PluginFailure) -> DatasetPlugin {
    guard let d = inst.component as? DatasetPlugin else { throw .state("not a dataset") }
    return d
}

/// vqmoe_dataset_api of every kit dataset.
nonisolated(unsafe) let datasetTable: UnsafeRawPointer = {
    let p = UnsafeMutablePointer<vqmoe_dataset_api>.allocate(capacity: 1)
    p.initialize(
        to: vqmoe_dataset_api(
            struct_size: UInt32(MemoryLayout<vqmoe_dataset_api>.size),
            info: { inst, out in call(inst) { i throws(PluginFailure) in try dataset(i).info(out) } },
            num_batches: { inst, split, batchSize, out in
                call(inst) { i throws(PluginFailure) in
                    guard let out else { throw .invalid("num_batches: out is NULL") }
                    out.pointee = try dataset(i).batchCount(split, batchSize)
                }
            },
            read_batch: { inst, req, out in call(inst) { i throws(PluginFailure) in try dataset(i).readBatch(req, out) }
            }))
    return UnsafeRawPointer(p)
}()
