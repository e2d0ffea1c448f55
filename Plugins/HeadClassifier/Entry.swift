// The descriptor of the `classifier` head plugin and its one exported entry point.
import Glibc
import PluginKit
import VQMoEABI

/// The instance behind an opaque handle (retained by create, released by destroy).
@inline(__always) func classifierHead(_ inst: OpaquePointer?) -> ClassifierHead? {
    inst.map { Unmanaged<ClassifierHead>.fromOpaque(UnsafeRawPointer($0)).takeUnretainedValue() }
}

/// Run a call on the instance behind `inst`, turning failures into status codes.
func withHead(_ inst: OpaquePointer?, _ body: (ClassifierHead) throws(PluginFailure) -> Void) -> Int32 {
    guard let h = classifierHead(inst) else { return VQMOE_ERR_INVALID_ARGUMENT }
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
                Unmanaged<ClassifierContext>.fromOpaque(ctx).release()
            }))
    return p
}()

/// The static descriptor (built once, never freed).
nonisolated(unsafe) let classifierDescriptor: UnsafeMutablePointer<vqmoe_plugin_desc> = {
    let schema = ClassifierConfig.schema
    var d = vqmoe_plugin_desc()
    d.abi_version = UInt32(VQMOE_ABI_VERSION)
    d.struct_size = UInt32(MemoryLayout<vqmoe_plugin_desc>.size)
    d.kind = VQMOE_KIND_HEAD
    d.flags = 0
    d.name = staticCString("classifier")
    d.version = staticCString("1.0.0")
    d.description = staticCString(
        "Sequence classifier, the VQMoE fine-tuning head (the last layer replaced by two fully connected layers): "
            + "p = pool(h) over the real tokens (mean / first / last / max), logits = W2 dropout(act(W1 p + b1)) + b2 "
            + "(act tanh by default, as BERT's pooler), mean softmax cross-entropy over non-pad targets")
    d.hparams = HyperparameterEntry.cArray(schema)
    d.n_hparams = Int32(schema.count)
    d.create = { info, hp, out in
        out?.pointee = nil
        let host = info?.pointee.host
        return guarded(host) { () throws(PluginFailure) in
            guard let out else { throw .invalid("create: out is NULL") }
            let h = try ClassifierHead(info: info, hp: hp)
            out.pointee = OpaquePointer(Unmanaged.passRetained(h).toOpaque())
        }
    }
    d.destroy = { inst in
        guard let inst else { return }
        Unmanaged<ClassifierHead>.fromOpaque(UnsafeRawPointer(inst)).release()
    }
    d.num_buffers = { inst in Int32(classifierHead(inst)?.bufferCount ?? 0) }
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
            "classifier was built for plugin ABI \(VQMOE_ABI_VERSION_MAJOR).\(VQMOE_ABI_VERSION_MINOR), the host speaks \(host.pointee.abi_version >> 16).\(host.pointee.abi_version & 0xffff)"
        msg.withCString { m in "classifier".withCString { name in host.pointee.log?(VQMOE_LOG_ERROR, name, m) } }
        return nil
    }
    return UnsafePointer(classifierDescriptor)
}
