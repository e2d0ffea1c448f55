// The descriptor of the `smoe_dropout` router plugin and its one exported entry point.
import Glibc
import PluginKit
import VQMoEABI

/// The instance behind an opaque handle (retained by create, released by destroy).
@inline(__always) func router(_ inst: OpaquePointer?) -> SMoEDropoutRouter? {
    Handle.get(inst, as: SMoEDropoutRouter.self)
}

/// Run a call on the instance behind `inst`, turning failures into status codes.
func withRouter(_ inst: OpaquePointer?, _ body: (SMoEDropoutRouter) throws(PluginFailure) -> Void) -> Int32 {
    guard let r = router(inst) else { return VQMOE_ERR_INVALID_ARGUMENT }
    return guarded(r.host.api) { () throws(PluginFailure) in try body(r) }
}

/// vqmoe_router_api: shape / forward / backward / free_ctx.
nonisolated(unsafe) let routerAPI: UnsafeMutablePointer<vqmoe_router_api> = {
    let p = UnsafeMutablePointer<vqmoe_router_api>.allocate(capacity: 1)
    p.initialize(
        to: vqmoe_router_api(
            struct_size: UInt32(MemoryLayout<vqmoe_router_api>.size),
            shape: { inst, step, out in withRouter(inst) { r throws(PluginFailure) in try r.shape(step, out) } },
            forward: { inst, step, input, output, ctx in
                ctx?.pointee = nil
                return withRouter(inst) { r throws(PluginFailure) in try r.forward(step, input, output, ctx) }
            },
            backward: { inst, ctx, gin, gout in
                withRouter(inst) { r throws(PluginFailure) in try r.backward(ctx, gin, gout) }
            },
            free_ctx: { _, ctx in Handle.releaseContext(ctx, as: RouterContext.self) }))
    return p
}()

/// The static descriptor (built once, never freed).
nonisolated(unsafe) let smoeDropoutDescriptor: UnsafeMutablePointer<vqmoe_plugin_desc> = {
    let schema = SMoEDropoutConfig.schema
    var d = vqmoe_plugin_desc()
    d.abi_version = UInt32(VQMOE_ABI_VERSION)
    d.struct_size = UInt32(MemoryLayout<vqmoe_plugin_desc>.size)
    d.kind = VQMOE_KIND_ROUTER
    d.flags = 0
    d.name = staticCString("smoe_dropout")
    d.version = staticCString("1.0.0")
    d.description = staticCString(
        "SMoE-Dropout (Chen et al. 2023): a randomly initialised, frozen linear router (state, never trained); "
            + "k grows linearly from k_min to k_max over training, k = round((k_max - k_min) step / total_steps) + k_min; "
            + "evaluation uses k_max; weights = softmax over the kept logits")
    d.hparams = HyperparameterEntry.cArray(schema)
    d.n_hparams = Int32(schema.count)
    d.create = { info, hp, out in
        out?.pointee = nil
        let host = info?.pointee.host
        return guarded(host) { () throws(PluginFailure) in
            guard let out else { throw .invalid("create: out is NULL") }
            out.pointee = Handle.make(try SMoEDropoutRouter(info: info, hp: hp))
        }
    }
    d.destroy = { inst in Handle.release(inst, as: SMoEDropoutRouter.self) }
    d.num_buffers = { inst in router(inst) == nil ? 0 : 1 }
    d.buffer_spec = { inst, i, out in withRouter(inst) { r throws(PluginFailure) in try r.bufferSpec(Int(i), out) } }
    d.bind_buffers = { inst, bindings, n in withRouter(inst) { r throws(PluginFailure) in try r.bind(bindings, Int(n)) }
    }
    d.init_buffers = { inst, seed in withRouter(inst) { r throws(PluginFailure) in try r.initBuffers(seed: seed) } }
    d.begin_step = nil
    d.get_feature = nil
    d.kind_api = UnsafeRawPointer(routerAPI)
    let p = UnsafeMutablePointer<vqmoe_plugin_desc>.allocate(capacity: 1)
    p.initialize(to: d)
    return p
}()

/// The plugin's one exported symbol: the descriptor, or NULL for a host of another ABI major.
@_cdecl("vqmoe_plugin_entry")
public func vqmoeEntry(_ host: UnsafePointer<vqmoe_host_api>?) -> UnsafePointer<vqmoe_plugin_desc>? {
    if let host, host.pointee.abi_version >> 16 != UInt32(VQMOE_ABI_VERSION_MAJOR) {
        let msg =
            "smoe_dropout was built for plugin ABI \(VQMOE_ABI_VERSION_MAJOR).\(VQMOE_ABI_VERSION_MINOR), the host speaks \(host.pointee.abi_version >> 16).\(host.pointee.abi_version & 0xffff)"
        msg.withCString { m in "smoe_dropout".withCString { name in host.pointee.log?(VQMOE_LOG_ERROR, name, m) } }
        return nil
    }
    return UnsafePointer(smoeDropoutDescriptor)
}
