import Foundation

/// VQMoE's discrete path: a quantizer plugin gives each token L codes, and code c picks expert
/// c mod E, which reads x̂:
///
///     q (N,d), codes (N,L) = quantizer(x);   token t → experts codes[t, l] mod E, weight 1/L
///     x̂ = x + sg(q − x)  (ste)   |   (1−c)·x + c·sg(q − x)  (mix)   |   x  (x)
///     backward: dL/dx̂ → ste: the quantizer's straight-through gradient;  mix: dx += (1−c)·dL/dx̂;
///               x: dx += dL/dx̂;  and β·dL/d(vq loss) to the quantizer (0 when frozen)
///
/// Frozen (fine-tuning): the quantizer runs with VQMOE_STEP_FROZEN, its loss is left out of the
/// total and gets no gradient.
///
/// ```swift
/// let path = DiscretePath(quantizer: q, layerName: "layers.0.ffn", nExperts: 8, input: .mix, mixC: 0.05,
///                         beta: 0.08, frozen: false)
/// ```
public final class DiscretePath: ExpertPath {
    public let quantizer: QuantizerInstance
    let layerName: String, nExperts: Int, input: FFNConfig.DiscreteInput, mixC: Float, beta: Float
    public let frozen: Bool
    /// The quantizer's parameter views and state buffers, named `<layer>.quantizer.<buffer>`.
    public let parameters: [Parameter], stateBuffers: [StateBuffer]
    /// Quantized vectors (N,d), codes (N,L), code counts (K), x̂ (N,d).
    let quantized = Storage<Float>(), codes = Storage<Int32>(), counts = Storage<Float>(), xhat = Storage<Float>()
    private var ctx: PluginContext?
    private var n = 0

    public init(
        quantizer: QuantizerInstance, layerName: String, nExperts: Int, input: FFNConfig.DiscreteInput, mixC: Float,
        beta: Float, frozen: Bool
    ) {
        self.quantizer = quantizer
        self.layerName = layerName
        self.nExperts = nExperts
        self.input = input
        self.mixC = mixC
        self.beta = beta
        self.frozen = frozen
        parameters = quantizer.core.parameters.map { Parameter(view: $0, prefix: "\(layerName).quantizer") }
        stateBuffers = quantizer.core.states.map { StateBuffer(name: "\(layerName).quantizer.\($0.name)", buffer: $0) }
    }

    var levels: Int { quantizer.codesPerToken }
    /// dL/d(vq loss): β for a trained quantizer, 0 when frozen.
    var lossWeight: Float { frozen ? 0 : beta }

    public func forward(
        _ input: PathInput, stats: inout MoEStats
    ) throws -> (perToken: Int, source: UnsafePointer<Float>) {
        let x = input.x, d = quantizer.dModel, k = quantizer.codebookSize
        n = input.n
        var step = input.step
        step.frozen = frozen || step.frozen
        let q = quantized.reserve(n * d), c = counts.reserve(k)
        let r = try quantizer.forward(step, x: x, n: n, quantized: q, codes: codes.reserve(n * levels), codeCounts: c)
        ctx = r.ctx
        stats.vq += r.loss
        stats.vqWeighted += lossWeight * r.loss
        stats.codeCounts = Array(UnsafeBufferPointer(start: c, count: k))
        var perLevel = [[Float]](repeating: [Float](repeating: 0, count: k), count: levels)
        let codes = codes.pointer
        for t in 0..<n { for l in 0..<levels { perLevel[l][Int(codes[t * levels + l])] += 1 } }
        stats.levelCodeCounts = perLevel
        switch self.input {
        case .x: return (levels, x)
        case .ste: return (levels, UnsafePointer(q))
        case .mix:
            let xh = xhat.reserve(n * d), cc = mixC
            for i in 0..<(n * d) { xh[i] = (1 - cc) * x[i] + cc * (q[i] - x[i]) }
            return (levels, UnsafePointer(xh))
        }
    }

    public func fill(expert: UnsafeMutablePointer<Int32>, raw: UnsafeMutablePointer<Float>) {
        let perLevel = 1 / Float(levels), e = nExperts, c = codes.pointer
        for i in 0..<(n * levels) {
            expert[i] = Int32(Int(c[i]) % e)
            raw[i] = perLevel
        }
    }

    /// dL/dx̂ is gathered apart from dx: it reaches x through the quantizer (ste) or scaled (mix).
    public func sourceGradient(_ input: PathInput, dx: UnsafeMutablePointer<Float>) -> UnsafeMutablePointer<Float> {
        input.scratch.dxhat.zeros(n * quantizer.dModel)
    }

    public func backward(_ input: PathInput, _ g: PathGradients) throws {
        defer { ctx = nil }
        let d = quantizer.dModel, dxh = UnsafePointer(input.scratch.dxhat.pointer)
        var gradQ: UnsafePointer<Float>?
        switch self.input {
        case .ste: gradQ = dxh
        case .x: Vec.add(g.dx, dxh, n * d)
        case .mix: Vec.axpy(g.dx, 1 - mixC, dxh, n * d)
        }
        guard let ctx else { return }
        let share = quantizer.core.library.computesGlobalBatch ? 1 : g.localShare
        try quantizer.backward(ctx, n: n, gradQuantized: gradQ, gradLoss: lossWeight * share, gradX: g.dx)
    }

    /// The expert of each token's first code.
    public func top1(n: Int) -> [Int32]? {
        guard n > 0 else { return nil }
        let c = codes.pointer, l = levels
        return (0..<n).map { Int32(Int(c[$0 * l]) % nExperts) }
    }
}
