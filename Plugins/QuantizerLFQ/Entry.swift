// The descriptor of the `lfq` quantizer plugin and its one exported entry point.
import Glibc
import PluginKit
import VQMoEABI

/// Run a call on the instance behind `inst`, turning failures into status codes.
func withQuantizer(_ inst: OpaquePointer?, _ body: (LFQQuantizer) throws(PluginFailure) -> Void) -> Int32 {
    guard let q = Handle.get(inst, as: LFQQuantizer.self) else { return VQMOE_ERR_INVALID_ARGUMENT }
    return guarded(q.host.api) { () throws(PluginFailure) in try body(q) }
}

/// vqmoe_quantizer_api: shape / forward / backward / free_ctx.
nonisolated(unsafe) let quantizerAPI: UnsafeMutablePointer<vqmoe_quantizer_api> = {
    let p = UnsafeMutablePointer<vqmoe_quantizer_api>.allocate(capacity: 1)
    p.initialize(
        to: vqmoe_quantizer_api(
            struct_size: UInt32(MemoryLayout<vqmoe_quantizer_api>.size),
            shape: { inst, out in withQuantizer(inst) { q throws(PluginFailure) in try q.shape(out) } },
            forward: { inst, step, input, output, ctx in
                ctx?.pointee = nil
                return withQuantizer(inst) { q throws(PluginFailure) in try q.forward(step, input, output, ctx) }
            },
            backward: { inst, ctx, gin, gout in
                withQuantizer(inst) { q throws(PluginFailure) in try q.backward(ctx, gin, gout) }
            },
            free_ctx: { _, ctx in Handle.releaseContext(ctx, as: QuantizerContext.self) }))
    return p
}()

/// "vqmoe.metrics/1": usage_perplexity, dead_codes, code_counts, per_sample_entropy, codebook_entropy.
nonisolated(unsafe) let metricsFeature: UnsafeMutablePointer<vqmoe_metrics_feature> = {
    let p = UnsafeMutablePointer<vqmoe_metrics_feature>.allocate(capacity: 1)
    p.initialize(
        to: vqmoe_metrics_feature(
            struct_size: UInt32(MemoryLayout<vqmoe_metrics_feature>.size),
            metrics: { inst, sink in withQuantizer(inst) { q throws(PluginFailure) in try q.metrics(sink) } }))
    return p
}()

/// The static descriptor (built once, never freed).
nonisolated(unsafe) let lfqDescriptor: UnsafeMutablePointer<vqmoe_plugin_desc> = {
    let schema = LFQConfig.schema
    var d = vqmoe_plugin_desc()
    d.abi_version = UInt32(VQMOE_ABI_VERSION)
    d.struct_size = UInt32(MemoryLayout<vqmoe_plugin_desc>.size)
    d.kind = VQMOE_KIND_QUANTIZER
    // No VQMOE_PLUGIN_STOPGRAD_LOSS: the entropy terms have no stop-gradient, and the
    // commitment term's sg(q) changes nothing (q is piecewise constant in z), so the backward
    // is the exact derivative of the loss.
    d.flags = 0
    d.name = staticCString("lfq")
    d.version = staticCString("1.0.0")
    d.description = staticCString(
        "Lookup-free quantizer (MAGVIT-v2): z = W_in x + b_in (d -> b = log2 K), q_i = scale * sign(z_i), "
            + "code = sum_i [z_i > 0] 2^i, quantized = W_out (z + sg(q - z)) + b_out; loss = entropy_weight * "
            + "(mean per-sample entropy - diversity_gamma * codebook entropy) + commitment * mse(z, sg(q)), "
            + "p(c|z) = softmax_c(2 z . code_c / temperature)")
    d.hparams = HyperparameterEntry.cArray(schema)
    d.n_hparams = Int32(schema.count)
    d.create = { info, hp, out in
        out?.pointee = nil
        return guarded(info?.pointee.host) { () throws(PluginFailure) in
            guard let out else { throw .invalid("create: out is NULL") }
            out.pointee = Handle.make(try LFQQuantizer(info: info, hp: hp))
        }
    }
    d.destroy = { inst in Handle.release(inst, as: LFQQuantizer.self) }
    d.num_buffers = { inst in Int32(Handle.get(inst, as: LFQQuantizer.self)?.bufferCount ?? 0) }
    d.buffer_spec = { inst, i, out in withQuantizer(inst) { q throws(PluginFailure) in try q.bufferSpec(Int(i), out) } }
    d.bind_buffers = { inst, bindings, n in
        withQuantizer(inst) { q throws(PluginFailure) in try q.bind(bindings, Int(n)) }
    }
    d.init_buffers = { inst, seed in withQuantizer(inst) { q throws(PluginFailure) in try q.initBuffers(seed: seed) } }
    d.begin_step = nil
    d.get_feature = { id in
        guard let id, strcmp(id, VQMOE_FEATURE_METRICS) == 0 else { return nil }
        return UnsafeRawPointer(metricsFeature)
    }
    d.kind_api = UnsafeRawPointer(quantizerAPI)
    let p = UnsafeMutablePointer<vqmoe_plugin_desc>.allocate(capacity: 1)
    p.initialize(to: d)
    return p
}()

/// The plugin's one exported symbol: the descriptor, or NULL for a host of another ABI major.
@_cdecl("vqmoe_plugin_entry")
public func vqmoeEntry(_ host: UnsafePointer<vqmoe_host_api>?) -> UnsafePointer<vqmoe_plugin_desc>? {
    if let host, host.pointee.abi_version >> 16 != UInt32(VQMOE_ABI_VERSION_MAJOR) {
        let msg =
            "lfq was built for plugin ABI \(VQMOE_ABI_VERSION_MAJOR).\(VQMOE_ABI_VERSION_MINOR), the host speaks \(host.pointee.abi_version >> 16).\(host.pointee.abi_version & 0xffff)"
        msg.withCString { m in "lfq".withCString { name in host.pointee.log?(VQMOE_LOG_ERROR, name, m) } }
        return nil
    }
    return UnsafePointer(lfqDescriptor)
}
