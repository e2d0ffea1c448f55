// One softmoe router instance: its model facts, hyperparameters and the host buffers it
// declared (phi (d, E*S); with normalize also the scalar scale (1)).
import PluginKit
import VQMoEABI

/// Names of the declared buffers (static storage, as `vqmoe_buffer_spec.name` requires).
nonisolated(unsafe) let phiBufferName = staticCString("phi")
nonisolated(unsafe) let scaleBufferName = staticCString("scale")

/// Soft MoE (Puigcerver et al. 2024): every slot is a convex combination of a group's tokens
/// (dispatch), every token output a convex combination of the slot outputs (combine).
final class SoftMoERouter {
    let host: Host
    let config: SoftMoEConfig
    /// d: input width.
    let dModel: Int
    /// E: number of experts.
    let nExperts: Int
    /// E*S: dispatch/combine columns.
    var nSlots: Int { nExperts * config.slotsPerExpert }

    /// (d, E*S) slot parameters Phi and their gradient.
    private(set) var phi: UnsafeMutablePointer<Float>?
    private(set) var phiGrad: UnsafeMutablePointer<Float>?
    /// (1) the learnable logit scale (normalize only) and its gradient.
    private(set) var scale: UnsafeMutablePointer<Float>?
    private(set) var scaleGrad: UnsafeMutablePointer<Float>?

    init(info: UnsafePointer<vqmoe_create_info>?, hp: UnsafePointer<vqmoe_hparams>?) throws(PluginFailure) {
        guard let info else { throw .invalid("create_info is NULL") }
        try requireSize(info.pointee.struct_size, vqmoe_create_info.self, "create_info")
        host = try Host.checked(info.pointee.host)
        let i = info.pointee
        guard i.d_model >= 1 else { throw .invalid("d_model = \(i.d_model): the router needs d_model >= 1") }
        guard i.n_experts >= 1 else { throw .invalid("n_experts = \(i.n_experts): the router needs n_experts >= 1") }
        dModel = Int(i.d_model)
        nExperts = Int(i.n_experts)
        config = try SoftMoEConfig(hp)
    }

    var bufferCount: Int { config.normalize ? 2 : 1 }

    /// Buffer 0: "phi" (d, E*S) PARAM; buffer 1 (normalize): "scale" (1) PARAM, no decay.
    func bufferSpec(_ i: Int, _ out: UnsafeMutablePointer<vqmoe_buffer_spec>?) throws(PluginFailure) {
        guard let out else { throw .invalid("buffer_spec: out is NULL") }
        guard i >= 0 && i < bufferCount else { throw .invalid("buffer index \(i) outside [0, \(bufferCount))") }
        var s = vqmoe_buffer_spec()
        s.struct_size = UInt32(MemoryLayout<vqmoe_buffer_spec>.size)
        s.role = VQMOE_BUF_PARAM
        s.dtype = vqmoe_f32()
        if i == 0 {
            s.name = phiBufferName
            s.ndim = 2
            s.shape = (Int64(dModel), Int64(nSlots), 0, 0, 0, 0)
        } else {
            s.name = scaleBufferName
            s.flags = VQMOE_BUF_NO_DECAY
            s.ndim = 1
            s.shape = (1, 0, 0, 0, 0, 0)
        }
        out.pointee = s
    }

    func bind(_ bindings: UnsafePointer<vqmoe_buffer_binding>?, _ n: Int) throws(PluginFailure) {
        guard n == bufferCount else {
            throw .invalid("bind_buffers got \(n) bindings, the router declared \(bufferCount)")
        }
        guard let bindings else { throw .invalid("bind_buffers: bindings is NULL") }
        guard let p = bindings[0].data else { throw .invalid("bind_buffers: 'phi' has no data") }
        phi = p.assumingMemoryBound(to: Float.self)
        phiGrad = bindings[0].grad
        if config.normalize {
            guard let s = bindings[1].data else { throw .invalid("bind_buffers: 'scale' has no data") }
            scale = s.assumingMemoryBound(to: Float.self)
            scaleGrad = bindings[1].grad
        }
    }

    /// The bound Phi, or a STATE error before bind_buffers.
    func boundPhi() throws(PluginFailure) -> UnsafeMutablePointer<Float> {
        guard let phi else { throw .state("called before bind_buffers") }
        return phi
    }

    /// Phi ~ N(0, 1/d) from the host stream (seed, 0); scale = 1.
    func initBuffers(seed: UInt64) throws(PluginFailure) {
        let p = try boundPhi()
        var r = host.rng(seed: seed, stream: 0)
        let std = 1 / Float(dModel).squareRoot()
        for i in 0..<(dModel * nSlots) { p[i] = std * host.normal(&r) }
        scale?.pointee = 1
    }

    func shape(_ out: UnsafeMutablePointer<vqmoe_router_shape>?) throws(PluginFailure) {
        guard let out else { throw .invalid("shape: out is NULL") }
        out.pointee.mode = VQMOE_ROUTE_DENSE
        out.pointee.k = 0
        out.pointee.slots_per_expert = Int32(config.slotsPerExpert)
    }
}
