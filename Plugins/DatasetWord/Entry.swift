// DatasetWord: the `word` dataset plugin -- a word-level language-modelling corpus in the
// WikiText-103 format (Merity et al. 2016): <dir>/wiki.{train,valid,test}.tokens, or one text
// file (`path`) split contiguously by tokens like `char` splits bytes.
//
// Tokens are each line's whitespace-separated words plus "<eos>" (Corpus.swift); the
// vocabulary comes from the train split only ("<unk>", "<eos>", then words by descending
// count, ties in byte order; min_count, max_vocab), and valid/test words outside it become
// "<unk>". Batches: Dataset.swift. The descriptor and its one exported entry point are here.
import Glibc
import PluginKit
import VQMoEABI

/// The instance behind an opaque handle (retained by create, released by destroy).
@inline(__always) func dataset(_ inst: OpaquePointer?) -> WordDataset? { Handle.get(inst, as: WordDataset.self) }

/// Run a call on the instance behind `inst`, turning failures into status codes.
func withDataset(_ inst: OpaquePointer?, _ body: (WordDataset) throws(PluginFailure) -> Void) -> Int32 {
    guard let ds = dataset(inst) else { return VQMOE_ERR_INVALID_ARGUMENT }
    return guarded(ds.host.api) { () throws(PluginFailure) in try body(ds) }
}

/// vqmoe_dataset_api: info / num_batches / read_batch.
nonisolated(unsafe) let datasetAPI: UnsafeMutablePointer<vqmoe_dataset_api> = {
    let p = UnsafeMutablePointer<vqmoe_dataset_api>.allocate(capacity: 1)
    p.initialize(
        to: vqmoe_dataset_api(
            struct_size: UInt32(MemoryLayout<vqmoe_dataset_api>.size),
            info: { inst, out in withDataset(inst) { ds throws(PluginFailure) in try ds.info(out) } },
            num_batches: { inst, split, batchSize, out in
                withDataset(inst) { ds throws(PluginFailure) in try ds.numBatches(split, batchSize, out) }
            },
            read_batch: { inst, req, out in withDataset(inst) { ds throws(PluginFailure) in try ds.readBatch(req, out) }
            }))
    return p
}()

/// "vqmoe.metrics/1": oov_rate_train, oov_rate_valid, oov_rate_test, vocab_size.
nonisolated(unsafe) let metricsFeature: UnsafeMutablePointer<vqmoe_metrics_feature> = {
    let p = UnsafeMutablePointer<vqmoe_metrics_feature>.allocate(capacity: 1)
    p.initialize(
        to: vqmoe_metrics_feature(
            struct_size: UInt32(MemoryLayout<vqmoe_metrics_feature>.size),
            metrics: { inst, sink in withDataset(inst) { ds throws(PluginFailure) in try ds.metrics(sink) } }))
    return p
}()

/// The static descriptor (built once, never freed).
nonisolated(unsafe) let wordDescriptor: UnsafeMutablePointer<vqmoe_plugin_desc> = {
    let schema = WordConfig.schema
    var d = vqmoe_plugin_desc()
    d.abi_version = UInt32(VQMOE_ABI_VERSION)
    d.struct_size = UInt32(MemoryLayout<vqmoe_plugin_desc>.size)
    d.kind = VQMOE_KIND_DATASET
    d.flags = 0
    d.name = staticCString("word")
    d.version = staticCString("1.1.0")
    d.description = staticCString(
        "word-level LM corpus in the WikiText-103 format (dir/wiki.{train,valid,test}.tokens) or one text file split "
            + "by tokens (path): each line's whitespace-separated words + <eos>; vocabulary from the train split "
            + "(<unk>, <eos>, then by descending count, ties in byte order; min_count, max_vocab), other words -> <unk>; "
            + "order=streams serves parallel streams in order (Transformer-XL)")
    d.hparams = HyperparameterEntry.cArray(schema)
    d.n_hparams = Int32(schema.count)
    d.create = { info, hp, out in
        out?.pointee = nil
        let host = info?.pointee.host
        return guarded(host) { () throws(PluginFailure) in
            guard let out else { throw .invalid("create: out is NULL") }
            out.pointee = Handle.make(try WordDataset(info: info, hp: hp))
        }
    }
    d.destroy = { inst in Handle.release(inst, as: WordDataset.self) }
    d.num_buffers = { _ in 0 }
    d.buffer_spec = { inst, i, _ in
        withDataset(inst) { _ throws(PluginFailure) in
            throw .invalid("word: declares no buffers (asked for buffer \(i))")
        }
    }
    d.bind_buffers = { inst, _, n in
        withDataset(inst) { _ throws(PluginFailure) in
            guard n == 0 else { throw .invalid("word: declares no buffers, got \(n) bindings") }
        }
    }
    d.init_buffers = { _, _ in VQMOE_OK }
    d.begin_step = nil
    d.get_feature = { id in
        guard let id, strcmp(id, VQMOE_FEATURE_METRICS) == 0 else { return nil }
        return UnsafeRawPointer(metricsFeature)
    }
    d.kind_api = UnsafeRawPointer(datasetAPI)
    let p = UnsafeMutablePointer<vqmoe_plugin_desc>.allocate(capacity: 1)
    p.initialize(to: d)
    return p
}()

/// The plugin's one exported symbol: the descriptor, or NULL for a host of another ABI major.
@_cdecl("vqmoe_plugin_entry")
public func vqmoeEntry(_ host: UnsafePointer<vqmoe_host_api>?) -> UnsafePointer<vqmoe_plugin_desc>? {
    if let host, host.pointee.abi_version >> 16 != UInt32(VQMOE_ABI_VERSION_MAJOR) {
        let msg =
            "word was built for plugin ABI \(VQMOE_ABI_VERSION_MAJOR).\(VQMOE_ABI_VERSION_MINOR), the host speaks \(host.pointee.abi_version >> 16).\(host.pointee.abi_version & 0xffff)"
        msg.withCString { m in "word".withCString { name in host.pointee.log?(VQMOE_LOG_ERROR, name, m) } }
        return nil
    }
    return UnsafePointer(wordDescriptor)
}
