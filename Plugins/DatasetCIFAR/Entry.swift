// The descriptor of the `cifar` dataset plugin (CIFAR-10 / CIFAR-100, binary version) and its
// one exported entry point.
import Glibc
import PluginKit
import VQMoEABI

extension CIFARDataset: LegacyDatasetPlugin {
    func batchCount(_ split: Int32, _ batchSize: Int64) throws(PluginFailure) -> Int64 {
        try numBatches(split, batchSize)
    }
}

/// The static descriptor (built once, never freed): the shared dataset tables of PluginKit.
nonisolated(unsafe) let cifarDescriptor: UnsafeMutablePointer<vqmoe_plugin_desc> = datasetDescriptor(
    name: "cifar",
    description:
        "CIFAR-10 / CIFAR-100 binary version (Krizhevsky 2009): (3,32,32) float32 pixels, per-channel (x/255 - mean)/std, "
        + "fine or coarse CIFAR-100 labels, last valid_fraction of the training records as the valid split",
    schema: CIFARConfig.schema,
    create: { info, hp, out in
        createInstance(info, out) { () throws(PluginFailure) in try CIFARDataset(info: info, hp: hp) }
    })

/// The plugin's one exported symbol: the descriptor, or NULL for a host of another ABI major.
@_cdecl("vqmoe_plugin_entry")
public func vqmoeEntry(_ host: UnsafePointer<vqmoe_host_api>?) -> UnsafePointer<vqmoe_plugin_desc>? {
    pluginEntry(host, name: "cifar", cifarDescriptor)
}
