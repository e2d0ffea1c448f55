// The descriptor of the `image_classifier` head plugin and its one exported entry point.
import Glibc
import PluginKit
import VQMoEABI

/// The instance behind an opaque handle (retained by create, released by destroy).
@inline(__always) func imageClassifierHead(_ inst: OpaquePointer?) -> ImageClassifierHead? {
    inst.map { Unmanaged<ImageClassifierHead>.fromOpaque(UnsafeRawPointer($0)).takeUnretainedValue() }
}

/// Run a call on the instance behind `inst`, turning failures into status codes.
func withHead(_ inst: OpaquePointer?, _ body: (ImageClassifierHead) throws(PluginFailure) -> Void) -> Int32 {
    guard let h = imageClassifierHead(inst) else { return VQMOE_ERR_INVALID_ARGUMENT }
    return guarded(h.host.api) { () throws(PluginFailure) in try body(h) }
}

/// vqmoe_head_api: shape / forward / backward / free_ctx.
nonisolated(unsafe) let headAPI: UnsafeMutablePointer<vqmoe_head_api> = {
    let p = UnsafeMutablePointer<vqmoe_head_api>.allocate(capacity: 1)
    p.initialize(
        to: vqmoe_head_api(
            struct_size: UInt32(MemoryLayout<vqmoe_head_api>.size),
            shape: { inst, out in withHead(inst) { h throws(PluginFailure) in try h.shape(out) } },
            forward: { inst, step, input, output, ctx in
                ctx?.pointee = nil
                return withHead(inst) { h throws(PluginFailure) in try h.forward(step, input, output, ctx) }
            },
            backward: { inst, ctx, gin, gout in
                withHead(inst) { h throws(PluginFailure) in try h.backward(ctx, gin, gout) }
            },
            free_ctx: { _, ctx in
                guard let ctx else { return }
                Unmanaged<ImageClassifierContext>.fromOpaque(ctx).release()
            }))
    return p
}()

/// The static descriptor (built once, never freed).
nonisolated(unsafe) let imageClassifierDescriptor: UnsafeMutablePointer<vqmoe_plugin_desc> = {
    let schema = ImageClassifierConfig.schema
    var d = vqmoe_plugin_desc()
    d.abi_version = UInt32(VQMOE_ABI_VERSION)
    d.struct_size = UInt32(MemoryLayout<vqmoe_plugin_desc>.size)
    d.kind = VQMOE_KIND_HEAD
    d.flags = 0
    d.name = staticCString("image_classifier")
    d.version = staticCString("1.0.0")
    d.description = staticCString(
        "ViT image classifier head (Dosovitskiy et al. 2021): p = the class token (position 0) or the mean over "
            + "positions, logits = W LayerNorm(p) + c (LayerNorm eps 1e-5, head.weight ~ N(0, init_std^2)), "
            + "mean softmax cross-entropy over non-pad targets")
    d.hparams = HyperparameterEntry.cArray(schema)
    d.n_hparams = Int32(schema.count)
    d.create = { info, hp, out in
        out?.pointee = nil
        let host = info?.pointee.host
        return guarded(host) { () throws(PluginFailure) in
            guard let out else { throw .invalid("create: out is NULL") }
            let h = try ImageClassifierHead(info: info, hp: hp)
            out.pointee = OpaquePointer(Unmanaged.passRetained(h).toOpaque())
        }
    }
    d.destroy = { inst in
        guard let inst else { return }
        Unmanaged<ImageClassifierHead>.fromOpaque(UnsafeRawPointer(inst)).release()
    }
    d.num_buffers = { inst in Int32(imageClassifierHead(inst)?.bufferCount ?? 0) }
    d.buffer_spec = { inst, i, out in withHead(inst) { h throws(PluginFailure) in try h.bufferSpec(Int(i), out) } }
    d.bind_buffers = { inst, bindings, n in withHead(inst) { h throws(PluginFailure) in try h.bind(bindings, Int(n)) } }
    d.init_buffers = { inst, seed in withHead(inst) { h throws(PluginFailure) in try h.initBuffers(seed: seed) } }
    d.begin_step = nil
    d.get_feature = nil
    d.kind_api = UnsafeRawPointer(headAPI)
    let p = UnsafeMutablePointer<vqmoe_plugin_desc>.allocate(capacity: 1)
    p.initialize(to: d)
    return p
}()

/// The plugin's one exported symbol: the descriptor, or NULL for a host of another ABI major.
@_cdecl("vqmoe_plugin_entry")
public func vqmoeEntry(_ host: UnsafePointer<vqmoe_host_api>?) -> UnsafePointer<vqmoe_plugin_desc>? {
    if let host, host.pointee.abi_version >> 16 != UInt32(VQMOE_ABI_VERSION_MAJOR) {
        let msg =
            "image_classifier was built for plugin ABI \(VQMOE_ABI_VERSION_MAJOR).\(VQMOE_ABI_VERSION_MINOR), the host speaks \(host.pointee.abi_version >> 16).\(host.pointee.abi_version & 0xffff)"
        msg.withCString { m in "image_classifier".withCString { name in host.pointee.log?(VQMOE_LOG_ERROR, name, m) } }
        return nil
    }
    return UnsafePointer(imageClassifierDescriptor)
}
