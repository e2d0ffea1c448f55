// The descriptor of the `vqgan_cos` quantizer plugin and its one exported entry point.
import Glibc
import PluginKit
import VQMoEABI

/// Run a call on the instance behind `inst`, turning failures into status codes.
func withQuantizer(_ inst: OpaquePointer?, _ body: (VQGANCosQuantizer) throws(PluginFailure) -> Void) -> Int32 {
    guard let q = Handle.get(inst, as: VQGANCosQuantizer.self) else { return VQMOE_ERR_INVALID_ARGUMENT }
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

/// "vqmoe.metrics/1": usage_perplexity, dead_codes, code_counts.
nonisolated(unsafe) let metricsFeature: UnsafeMutablePointer<vqmoe_metrics_feature> = {
    let p = UnsafeMutablePointer<vqmoe_metrics_feature>.allocate(capacity: 1)
    p.initialize(
        to: vqmoe_metrics_feature(
            struct_size: UInt32(MemoryLayout<vqmoe_metrics_feature>.size),
            metrics: { inst, sink in withQuantizer(inst) { q throws(PluginFailure) in try q.metrics(sink) } }))
    return p
}()

/// The static descriptor (built once, never freed).
nonisolated(unsafe) let vqganCosDescriptor: UnsafeMutablePointer<vqmoe_plugin_desc> = {
    let schema = VQGANCosConfig.schema
    var d = vqmoe_plugin_desc()
    d.abi_version = UInt32(VQMOE_ABI_VERSION)
    d.struct_size = UInt32(MemoryLayout<vqmoe_plugin_desc>.size)
    d.kind = VQMOE_KIND_QUANTIZER
    d.flags = UInt32(VQMOE_PLUGIN_STOPGRAD_LOSS)  // codebook + commitment terms use stop-gradients
    d.name = staticCString("vqgan_cos")
    d.version = staticCString("1.0.0")
    d.description = staticCString(
        "ViT-VQGAN quantizer (factorised, l2-normalised codes): z = W_in x + b_in (d -> code_dim), "
            + "code = argmax_j cos(z, e_j) (ties -> lowest index), quantized = W_out (ẑ + sg(ê_c - ẑ)) + b_out; "
            + "loss = mse(sg(ẑ), ê_c) + commitment * mse(ẑ, sg(ê_c))")
    d.hparams = HyperparameterEntry.cArray(schema)
    d.n_hparams = Int32(schema.count)
    d.create = { info, hp, out in
        out?.pointee = nil
        return guarded(info?.pointee.host) { () throws(PluginFailure) in
            guard let out else { throw .invalid("create: out is NULL") }
            out.pointee = Handle.make(try VQGANCosQuantizer(info: info, hp: hp))
        }
    }
    d.destroy = { inst in Handle.release(inst, as: VQGANCosQuantizer.self) }
    d.num_buffers = { inst in Int32(Handle.get(inst, as: VQGANCosQuantizer.self)?.bufferCount ?? 0) }
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
            "vqgan_cos was built for plugin ABI \(VQMOE_ABI_VERSION_MAJOR).\(VQMOE_ABI_VERSION_MINOR), the host speaks \(host.pointee.abi_version >> 16).\(host.pointee.abi_version & 0xffff)"
        msg.withCString { m in "vqgan_cos".withCString { name in host.pointee.log?(VQMOE_LOG_ERROR, name, m) } }
        return nil
    }
    return UnsafePointer(vqganCosDescriptor)
}
