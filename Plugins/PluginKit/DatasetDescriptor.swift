// The descriptor and C function tables every buffer-less dataset plugin shares: a dataset
// class conforms to `DatasetPlugin`, and its entry point returns
// `datasetDescriptor(name:description:schema:create:)`, which dispatches through the protocol.
import Glibc
import VQMoEABI

/// A dataset instance: the three calls of vqmoe_dataset_api, with failures as PluginFailure.
public protocol LegacyDatasetPlugin: AnyObject {
    var host: Host { get }
    func info(_ out: UnsafeMutablePointer<vqmoe_dataset_info>?) throws(PluginFailure)
    /// Batches in an ordered pass over `split` (train: Int64.max).
    func batchCount(_ split: Int32, _ batchSize: Int64) throws(PluginFailure) -> Int64
    func readBatch(
        _ req: UnsafePointer<vqmoe_batch_request>?, _ out: UnsafeMutablePointer<vqmoe_batch>?) throws(PluginFailure)
}

/// The dataset behind an opaque handle (any class retained by `Handle.make`).
func datasetInstance(_ inst: OpaquePointer?) -> LegacyDatasetPlugin? {
    inst.map { Unmanaged<AnyObject>.fromOpaque(UnsafeRawPointer($0)).takeUnretainedValue() } as? LegacyDatasetPlugin
}

/// Run a call on the dataset behind `inst`, turning failures into status codes.
func withDatasetPlugin(_ inst: OpaquePointer?, _ body: (LegacyDatasetPlugin) throws(PluginFailure) -> Void) -> Int32 {
    guard let ds = datasetInstance(inst) else { return VQMOE_ERR_INVALID_ARGUMENT }
    return guarded(ds.host.api) { () throws(PluginFailure) in try body(ds) }
}

/// vqmoe_dataset_api shared by every `DatasetPlugin`.
nonisolated(unsafe) let sharedDatasetAPI: UnsafeMutablePointer<vqmoe_dataset_api> = {
    let p = UnsafeMutablePointer<vqmoe_dataset_api>.allocate(capacity: 1)
    p.initialize(
        to: vqmoe_dataset_api(
            struct_size: UInt32(MemoryLayout<vqmoe_dataset_api>.size),
            info: { inst, out in withDatasetPlugin(inst) { ds throws(PluginFailure) in try ds.info(out) } },
            num_batches: { inst, split, batchSize, out in
                withDatasetPlugin(inst) { ds throws(PluginFailure) in
                    guard let out else { throw .invalid("num_batches: out is NULL") }
                    out.pointee = try ds.batchCount(split, batchSize)
                }
            },
            read_batch: { inst, req, out in
                withDatasetPlugin(inst) { ds throws(PluginFailure) in try ds.readBatch(req, out) }
            }))
    return p
}()

/// Put a freshly made instance behind `out` for create(), or report why it could not be made.
public func createInstance(
    _ info: UnsafePointer<vqmoe_create_info>?, _ out: UnsafeMutablePointer<OpaquePointer?>?,
    _ make: () throws(PluginFailure) -> AnyObject
) -> Int32 {
    out?.pointee = nil
    return guarded(info?.pointee.host) { () throws(PluginFailure) in
        guard let out else { throw .invalid("create: out is NULL") }
        out.pointee = OpaquePointer(Unmanaged.passRetained(try make()).toOpaque())
    }
}

/// The descriptor of a dataset plugin with no buffers (built once by the caller, never freed).
/// `create` is the plugin's C create function (usually `{ createInstance($0, $2) { try MyDataset(info: $0, hp: $1) } }`).
public func datasetDescriptor(
    name: String, description: String, schema: [HyperparameterEntry],
    create:
        @escaping @convention(c) (
            UnsafePointer<vqmoe_create_info>?, UnsafePointer<vqmoe_hparams>?,
            UnsafeMutablePointer<OpaquePointer?>?
        ) -> Int32
)
    -> UnsafeMutablePointer<vqmoe_plugin_desc>
{
    var d = vqmoe_plugin_desc()
    d.abi_version = UInt32(VQMOE_ABI_VERSION)
    d.struct_size = UInt32(MemoryLayout<vqmoe_plugin_desc>.size)
    d.kind = VQMOE_KIND_DATASET
    d.flags = 0
    d.name = staticCString(name)
    d.version = staticCString("1.0.0")
    d.description = staticCString(description)
    d.hparams = HyperparameterEntry.cArray(schema)
    d.n_hparams = Int32(schema.count)
    d.create = create
    d.destroy = { inst in
        guard let inst else { return }
        Unmanaged<AnyObject>.fromOpaque(UnsafeRawPointer(inst)).release()
    }
    d.num_buffers = { _ in 0 }
    d.buffer_spec = { inst, i, _ in
        withDatasetPlugin(inst) { _ throws(PluginFailure) in
            throw .invalid("this dataset declares no buffers (asked for buffer \(i))")
        }
    }
    d.bind_buffers = { inst, _, n in
        withDatasetPlugin(inst) { _ throws(PluginFailure) in
            guard n == 0 else { throw .invalid("this dataset declares no buffers, got \(n) bindings") }
        }
    }
    d.init_buffers = { _, _ in VQMOE_OK }
    d.begin_step = nil
    d.get_feature = nil
    d.kind_api = UnsafeRawPointer(sharedDatasetAPI)
    let p = UnsafeMutablePointer<vqmoe_plugin_desc>.allocate(capacity: 1)
    p.initialize(to: d)
    return p
}

/// The entry point's body: the descriptor, or NULL (with a log line) for a host of another ABI major.
public func pluginEntry(
    _ host: UnsafePointer<vqmoe_host_api>?, name: String,
    _ descriptor: UnsafeMutablePointer<vqmoe_plugin_desc>
) -> UnsafePointer<vqmoe_plugin_desc>? {
    if let host, host.pointee.abi_version >> 16 != UInt32(VQMOE_ABI_VERSION_MAJOR) {
        let msg =
            "\(name) was built for plugin ABI \(VQMOE_ABI_VERSION_MAJOR).\(VQMOE_ABI_VERSION_MINOR), the host speaks \(host.pointee.abi_version >> 16).\(host.pointee.abi_version & 0xffff)"
        msg.withCString { m in name.withCString { n in host.pointee.log?(VQMOE_LOG_ERROR, n, m) } }
        return nil
    }
    return UnsafePointer(descriptor)
}
