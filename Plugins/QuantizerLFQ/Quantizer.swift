// One lfq quantizer instance: model facts, hyperparameters, the host buffers it declared
// (proj_in (b,d) + (b), proj_out (d,b) + (d); the codebook is implicit) and report-only
// usage statistics.
import Glibc
import PluginKit
import VQMoEABI

/// One declared buffer: its name (static storage, as `vqmoe_buffer_spec.name` requires),
/// shape and flags. Every buffer is a PARAM frozen when fine-tuning (the VQMoE fine-tuning
/// stage freezes the whole quantizer).
struct BufferDecl {
    let name: UnsafePointer<CChar>
    let shape: [Int]
    let flags: UInt32
}

/// The buffer names, made once.
nonisolated(unsafe) let bufferNames = (
    projInWeight: staticCString("proj_in.weight"), projInBias: staticCString("proj_in.bias"),
    projOutWeight: staticCString("proj_out.weight"), projOutBias: staticCString("proj_out.bias")
)

/// What the last reported forward measured, for "vqmoe.metrics/1" only (never changes results).
struct UsageReport {
    var usage: CodeUsage
    /// mean_t H(p(.|z_t)) and H(mean_t p(.|z_t)), in nats.
    var perSampleEntropy: Double
    var codebookEntropy: Double
    var fromTraining: Bool
}

/// Lookup-free quantization (Yu et al. 2023, "Language Model Beats Diffusion -- Tokenizer is
/// Key to Visual Generation", §3.1, MAGVIT-v2):
///   z = W_in x + b_in (d -> b = log2 K),  q_i = scale · sign(z_i),  index = Σ_i [z_i > 0] 2^i,
///   quantized = W_out (z + sg(q − z)) + b_out (b -> d).
final class LFQQuantizer {
    let host: Host
    let config: LFQConfig
    /// d: input width.
    let dModel: Int
    /// K = 2^b codes.
    var nCodes: Int { config.codebookSize }
    /// b: bits per code.
    var nBits: Int { config.bits }

    /// (b,d) W_in, (b) b_in, (d,b) W_out, (d) b_out and their gradients (nil when frozen by
    /// the host).
    private(set) var wIn: UnsafeMutablePointer<Float>?, bIn: UnsafeMutablePointer<Float>?
    private(set) var wOut: UnsafeMutablePointer<Float>?, bOut: UnsafeMutablePointer<Float>?
    private(set) var wInGrad: UnsafeMutablePointer<Float>?, bInGrad: UnsafeMutablePointer<Float>?
    private(set) var wOutGrad: UnsafeMutablePointer<Float>?, bOutGrad: UnsafeMutablePointer<Float>?

    /// Code usage and entropies of the last training forward (or of the last forward before
    /// the first training one).
    var report: UsageReport?

    init(info: UnsafePointer<vqmoe_create_info>?, hp: UnsafePointer<vqmoe_hparams>?) throws(PluginFailure) {
        guard let info else { throw .invalid("create_info is NULL") }
        try requireSize(info.pointee.struct_size, vqmoe_create_info.self, "create_info")
        host = try Host.checked(info.pointee.host)
        let i = info.pointee
        guard i.d_model >= 1 else { throw .invalid("d_model = \(i.d_model): the quantizer needs d_model >= 1") }
        dModel = Int(i.d_model)
        config = try LFQConfig(hp, nCodes: Int(i.n_codes))
    }

    /// The declared buffers, in order.
    var buffers: [BufferDecl] {
        let ft = VQMOE_BUF_FREEZE_FT, noDecay = VQMOE_BUF_NO_DECAY
        return [
            BufferDecl(name: bufferNames.projInWeight, shape: [nBits, dModel], flags: ft),
            BufferDecl(name: bufferNames.projInBias, shape: [nBits], flags: ft | noDecay),
            BufferDecl(name: bufferNames.projOutWeight, shape: [dModel, nBits], flags: ft),
            BufferDecl(name: bufferNames.projOutBias, shape: [dModel], flags: ft | noDecay),
        ]
    }

    var bufferCount: Int { 4 }

    /// 0 "proj_in.weight" (b,d), 1 "proj_in.bias" (b), 2 "proj_out.weight" (d,b),
    /// 3 "proj_out.bias" (d): all PARAM, float32.
    func bufferSpec(_ i: Int, _ out: UnsafeMutablePointer<vqmoe_buffer_spec>?) throws(PluginFailure) {
        guard let out else { throw .invalid("buffer_spec: out is NULL") }
        guard i >= 0 && i < bufferCount else { throw .invalid("buffer index \(i) outside [0, \(bufferCount))") }
        let b = buffers[i]
        var s = vqmoe_buffer_spec()
        s.struct_size = UInt32(MemoryLayout<vqmoe_buffer_spec>.size)
        s.name = b.name
        s.role = VQMOE_BUF_PARAM
        s.flags = b.flags
        s.dtype = vqmoe_f32()
        s.ndim = Int32(b.shape.count)
        s.shape = (Int64(b.shape[0]), b.shape.count > 1 ? Int64(b.shape[1]) : 0, 0, 0, 0, 0)
        out.pointee = s
    }

    func bind(_ bindings: UnsafePointer<vqmoe_buffer_binding>?, _ n: Int) throws(PluginFailure) {
        guard n == bufferCount else {
            throw .invalid("bind_buffers got \(n) bindings, the quantizer declared \(bufferCount)")
        }
        guard let bindings else { throw .invalid("bind_buffers: bindings is NULL") }
        let decl = buffers
        for i in 0..<n where bindings[i].data == nil {
            throw .invalid("bind_buffers: '\(String(cString: decl[i].name))' has no data")
        }
        func data(_ i: Int) -> UnsafeMutablePointer<Float> { bindings[i].data!.assumingMemoryBound(to: Float.self) }
        wIn = data(0); bIn = data(1); wOut = data(2); bOut = data(3)
        wInGrad = bindings[0].grad; bInGrad = bindings[1].grad
        wOutGrad = bindings[2].grad; bOutGrad = bindings[3].grad
    }

    /// The bound parameters, or a STATE error before bind_buffers.
    func bound() throws(PluginFailure) -> (
        wIn: UnsafeMutablePointer<Float>, bIn: UnsafeMutablePointer<Float>,
        wOut: UnsafeMutablePointer<Float>, bOut: UnsafeMutablePointer<Float>
    ) {
        guard let wIn, let bIn, let wOut, let bOut else { throw .state("called before bind_buffers") }
        return (wIn, bIn, wOut, bOut)
    }

    /// W_in ~ N(0, 1/d) (host stream (seed, 0)), W_out ~ N(0, 1/b) (stream 1), biases 0.
    func initBuffers(seed: UInt64) throws(PluginFailure) {
        let p = try bound()
        let d = dModel, b = nBits
        var r = host.rng(seed: seed, stream: 0)
        let sIn = Float(1 / Double(d).squareRoot())
        for i in 0..<(b * d) { p.wIn[i] = sIn * host.normal(&r) }
        r = host.rng(seed: seed, stream: 1)
        let sOut = Float(1 / Double(b).squareRoot())
        for i in 0..<(d * b) { p.wOut[i] = sOut * host.normal(&r) }
        p.bIn.update(repeating: 0, count: b)
        p.bOut.update(repeating: 0, count: d)
        report = nil
    }

    func shape(_ out: UnsafeMutablePointer<vqmoe_quantizer_shape>?) throws(PluginFailure) {
        guard let out else { throw .invalid("shape: out is NULL") }
        out.pointee.codebook_size = Int64(nCodes)
        out.pointee.codes_per_token = 1
    }
}
