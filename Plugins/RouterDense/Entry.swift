// The descriptor of the `dense` router plugin ("no routing") and its one exported entry point.
import Glibc
import PluginKit
import VQMoEABI

/// The instance behind an opaque handle (retained by create, released by destroy).
@inline(__always) func router(_ inst: OpaquePointer?) -> DenseRouter? { Handle.get(inst, as: DenseRouter.self) }

/// Run a call on the instance behind `inst`, turning failures into status codes.
func withRouter(_ inst: OpaquePointer?, _ body: (DenseRouter) throws(PluginFailure) -> Void) -> Int32 {
    guard let r = router(inst) else { return VQMOE_ERR_INVALID_ARGUMENT }
    return guarded(r.host.api) { () throws(PluginFailure) in try body(r) }
}

/// vqmoe_router_api: shape / forward / backward / free_ctx.
nonisolated(unsafe) let routerAPI: UnsafeMutablePointer<vqmoe_router_api> = {
    let p = UnsafeMutablePointer<vqmoe_router_api>.allocate(capacity: 1)
    p.initialize(
        to: vqmoe_router_api(
            struct_size: UInt32(MemoryLayout<vqmoe_router_api>.size),
            shape: { inst, _, out in withRouter(inst) { r throws(PluginFailure) in try r.shape(out) } },
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
nonisolated(unsafe) let denseDescriptor: UnsafeMutablePointer<vqmoe_plugin_desc> = {
    let schema = DenseConfig.schema
    var d = vqmoe_plugin_desc()
    d.abi_version = UInt32(VQMOE_ABI_VERSION)
    d.struct_size = UInt32(MemoryLayout<vqmoe_plugin_desc>.size)
    d.kind = VQMOE_KIND_ROUTER
    d.flags = 0
    d.name = staticCString("dense")
    d.version = staticCString("1.0.0")
    d.description = staticCString(
        "no routing: every token goes to expert 0 with weight 1 (k = 1, no parameters, aux 0); with n_experts = 1 "
            + "the MoE layer is a plain dense FFN (the dense baseline: match active compute with d_inner, total parameters "
            + "with d_inner = E * d_inner)")
    d.hparams = HyperparameterEntry.cArray(schema)
    d.n_hparams = Int32(schema.count)
    d.create = { info, hp, out in
        out?.pointee = nil
        let host = info?.pointee.host
        return guarded(host) { () throws(PluginFailure) in
            guard let out else { throw .invalid("create: out is NULL") }
            out.pointee = Handle.make(try DenseRouter(info: info, hp: hp))
        }
    }
    d.destroy = { inst in Handle.release(inst, as: DenseRouter.self) }
    d.num_buffers = { _ in 0 }
    d.buffer_spec = { inst, i, _ in
        withRouter(inst) { _ throws(PluginFailure) in
            throw .invalid("buffer index \(i): the dense router declares no buffers")
        }
    }
    d.bind_buffers = { inst, _, n in withRouter(inst) { r throws(PluginFailure) in try r.bind(Int(n)) } }
    d.init_buffers = { inst, _ in withRouter(inst) { _ throws(PluginFailure) in } }
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
            "dense was built for plugin ABI \(VQMOE_ABI_VERSION_MAJOR).\(VQMOE_ABI_VERSION_MINOR), the host speaks \(host.pointee.abi_version >> 16).\(host.pointee.abi_version & 0xffff)"
        msg.withCString { m in "dense".withCString { name in host.pointee.log?(VQMOE_LOG_ERROR, name, m) } }
        return nil
    }
    return UnsafePointer(denseDescriptor)
}
