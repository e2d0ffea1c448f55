// The descriptor of the `cifar` dataset plugin (CIFAR-10 / CIFAR-100, binary version) and its
// one exported entry point.
import Glibc
import PluginKit
import VQMoEABI

/// The instance behind an opaque handle (retained by create, released by destroy).
@inline(__always) func dataset(_ inst: OpaquePointer?) -> CIFARDataset? {
    Handle.get(inst, as: CIFARDataset.self)
}

/// Run a call on the instance behind `inst`, turning failures into status codes.
func withDataset(_ inst: OpaquePointer?, _ body: (CIFARDataset) throws(PluginFailure) -> Void) -> Int32 {
    guard let ds = dataset(inst) else { return VQMOE_ERR_INVALID_ARGUMENT }
    return guarded(ds.host.api) { () throws(PluginFailure) in try body(ds) }
}

/// vqmoe_dataset_api: info / num_batches / read_batch.
nonisolated(unsafe) let datasetAPI: UnsafeMutablePointer<vqmoe_dataset_api> = {
    let p = UnsafeMutablePointer<vqmoe_dataset_api>.allocate(capacity: 1)
    p.initialize(to: vqmoe_dataset_api(
        struct_size: UInt32(MemoryLayout<vqmoe_dataset_api>.size),
        info: { inst, out in withDataset(inst) { ds throws(PluginFailure) in try ds.info(out) } },
        num_batches: { inst, split, batchSize, out in
            withDataset(inst) { ds throws(PluginFailure) in
                guard let out else { throw .invalid("num_batches: out is NULL") }
                out.pointee = try ds.numBatches(split, batchSize)
            }
        },
        read_batch: { inst, req, out in withDataset(inst) { ds throws(PluginFailure) in try ds.readBatch(req, out) } }))
    return p
}()

/// The static descriptor (built once, never freed).
nonisolated(unsafe) let cifarDescriptor: UnsafeMutablePointer<vqmoe_plugin_desc> = {
    let schema = CIFARConfig.schema
    var d = vqmoe_plugin_desc()
    d.abi_version = UInt32(VQMOE_ABI_VERSION)
    d.struct_size = UInt32(MemoryLayout<vqmoe_plugin_desc>.size)
    d.kind = VQMOE_KIND_DATASET
    d.flags = 0
    d.name = staticCString("cifar")
    d.version = staticCString("1.0.0")
    d.description = staticCString(
        "CIFAR-10 / CIFAR-100 binary version (Krizhevsky 2009): (3,32,32) float32 pixels, per-channel (x/255 - mean)/std, " +
        "fine or coarse CIFAR-100 labels, last valid_fraction of the training records as the valid split")
    d.hparams = HyperparameterEntry.cArray(schema)
    d.n_hparams = Int32(schema.count)
    d.create = { info, hp, out in
        out?.pointee = nil
        return guarded(info?.pointee.host) { () throws(PluginFailure) in
            guard let out else { throw .invalid("create: out is NULL") }
            out.pointee = Handle.make(try CIFARDataset(info: info, hp: hp))
        }
    }
    d.destroy = { inst in Handle.release(inst, as: CIFARDataset.self) }
    d.num_buffers = { _ in 0 }
    d.buffer_spec = { inst, i, _ in
        withDataset(inst) { _ throws(PluginFailure) in throw .invalid("cifar declares no buffers (asked for buffer \(i))") }
    }
    d.bind_buffers = { inst, _, n in
        withDataset(inst) { _ throws(PluginFailure) in
            guard n == 0 else { throw .invalid("cifar declares no buffers, got \(n) bindings") }
        }
    }
    d.init_buffers = { _, _ in VQMOE_OK }
    d.begin_step = nil
    d.get_feature = nil
    d.kind_api = UnsafeRawPointer(datasetAPI)
    let p = UnsafeMutablePointer<vqmoe_plugin_desc>.allocate(capacity: 1)
    p.initialize(to: d)
    return p
}()

/// The plugin's one exported symbol: the descriptor, or NULL for a host of another ABI major.
@_cdecl("vqmoe_plugin_entry")
public func vqmoeEntry(_ host: UnsafePointer<vqmoe_host_api>?) -> UnsafePointer<vqmoe_plugin_desc>? {
    if let host, host.pointee.abi_version >> 16 != UInt32(VQMOE_ABI_VERSION_MAJOR) {
        let msg = "cifar was built for plugin ABI \(VQMOE_ABI_VERSION_MAJOR).\(VQMOE_ABI_VERSION_MINOR), the host speaks \(host.pointee.abi_version >> 16).\(host.pointee.abi_version & 0xffff)"
        msg.withCString { m in "cifar".withCString { name in host.pointee.log?(VQMOE_LOG_ERROR, name, m) } }
        return nil
    }
    return UnsafePointer(cifarDescriptor)
}
