// The descriptor of the `idx` dataset plugin (MNIST / Fashion-MNIST in IDX format) and its
// one exported entry point.
import Glibc
import PluginKit
import VQMoEABI

extension IDXDataset: LegacyDatasetPlugin {
    func batchCount(_ split: Int32, _ batchSize: Int64) throws(PluginFailure) -> Int64 {
        try numBatches(split, batchSize)
    }
}

/// The static descriptor (built once, never freed): the shared dataset tables of PluginKit.
nonisolated(unsafe) let idxDescriptor: UnsafeMutablePointer<vqmoe_plugin_desc> = datasetDescriptor(
    name: "idx",
    description:
        "MNIST / Fashion-MNIST images in IDX format (LeCun et al.; Fashion-MNIST: Zalando Research, MIT), gzip or plain: "
        + "(1,H,W) float32 pixels (x/255 - mean)/std, last valid_fraction of the training file as the valid split",
    schema: IDXConfig.schema,
    create: { info, hp, out in
        createInstance(info, out) { () throws(PluginFailure) in try IDXDataset(info: info, hp: hp) }
    })

/// The plugin's one exported symbol: the descriptor, or NULL for a host of another ABI major.
@_cdecl("vqmoe_plugin_entry")
public func vqmoeEntry(_ host: UnsafePointer<vqmoe_host_api>?) -> UnsafePointer<vqmoe_plugin_desc>? {
    pluginEntry(host, name: "idx", idxDescriptor)
}
