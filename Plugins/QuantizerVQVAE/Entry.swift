// The descriptor of the `vqvae` quantizer plugin and its one exported entry point.
import Glibc
import PluginKit
import VQMoEABI

/// The instance behind an opaque handle (retained by create, released by destroy).
@inline(__always) func quantizer(_ inst: OpaquePointer?) -> VQVAEQuantizer? {
    inst.map { Unmanaged<VQVAEQuantizer>.fromOpaque(UnsafeRawPointer($0)).takeUnretainedValue() }
}

/// Run a call on the instance behind `inst`, turning failures into status codes.
func withQuantizer(_ inst: OpaquePointer?, _ body: (VQVAEQuantizer) throws(PluginFailure) -> Void) -> Int32 {
    guard let q = quantizer(inst) else { return VQMOE_ERR_INVALID_ARGUMENT }
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
            free_ctx: { _, ctx in
                guard let ctx else { return }
                Unmanaged<QuantizerContext>.fromOpaque(ctx).release()
            }))
    return p
}()

/// "vqmoe.metrics/1": usage_perplexity, dead_codes, code_counts (+ restarted_codes).
nonisolated(unsafe) let metricsFeature: UnsafeMutablePointer<vqmoe_metrics_feature> = {
    let p = UnsafeMutablePointer<vqmoe_metrics_feature>.allocate(capacity: 1)
    p.initialize(
        to: vqmoe_metrics_feature(
            struct_size: UInt32(MemoryLayout<vqmoe_metrics_feature>.size),
            metrics: { inst, sink in withQuantizer(inst) { q throws(PluginFailure) in try q.metrics(sink) } }))
    return p
}()

/// The static descriptor (built once, never freed).
nonisolated(unsafe) let vqvaeDescriptor: UnsafeMutablePointer<vqmoe_plugin_desc> = {
    let schema = VQVAEConfig.schema
    let specs = UnsafeMutablePointer<vqmoe_hparam_spec>.allocate(capacity: schema.count)
    for (i, entry) in schema.enumerated() { (specs + i).initialize(to: entry.cSpec) }
    var d = vqmoe_plugin_desc()
    d.abi_version = UInt32(VQMOE_ABI_VERSION)
    d.struct_size = UInt32(MemoryLayout<vqmoe_plugin_desc>.size)
    d.kind = VQMOE_KIND_QUANTIZER
    d.flags = UInt32(VQMOE_PLUGIN_STOPGRAD_LOSS)  // codebook + commitment terms use stop-gradients
    d.name = staticCString("vqvae")
    d.version = staticCString("1.0.0")
    d.description = staticCString(
        "VQ-VAE quantizer: nearest code by L2 (ties -> lowest index), q = e_c with a straight-through "
            + "gradient; loss = mse(sg(x), q) + commitment * mse(x, sg(q)); optional EMA codebook (ema); optional "
            + "k-means init (kmeans_init: Lloyd's k-means on the first training batch, kmeans_iters iterations from K distinct "
            + "batch rows chosen by the step seed; state 'initialized' records it); optional dead-code restart "
            + "(dead_code_threshold, needs ema: after each training EMA update, codes with EMA count below the threshold "
            + "become random batch rows)")
    d.hparams = UnsafePointer(specs)
    d.n_hparams = Int32(schema.count)
    d.create = { info, hp, out in
        out?.pointee = nil
        let host = info?.pointee.host
        return guarded(host) { () throws(PluginFailure) in
            guard let out else { throw .invalid("create: out is NULL") }
            let q = try VQVAEQuantizer(info: info, hp: hp)
            out.pointee = OpaquePointer(Unmanaged.passRetained(q).toOpaque())
        }
    }
    d.destroy = { inst in
        guard let inst else { return }
        Unmanaged<VQVAEQuantizer>.fromOpaque(UnsafeRawPointer(inst)).release()
    }
    d.num_buffers = { inst in Int32(quantizer(inst)?.bufferCount ?? 0) }
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
            "vqvae was built for plugin ABI \(VQMOE_ABI_VERSION_MAJOR).\(VQMOE_ABI_VERSION_MINOR), the host speaks \(host.pointee.abi_version >> 16).\(host.pointee.abi_version & 0xffff)"
        msg.withCString { m in "vqvae".withCString { name in host.pointee.log?(VQMOE_LOG_ERROR, name, m) } }
        return nil
    }
    return UnsafePointer(vqvaeDescriptor)
}
