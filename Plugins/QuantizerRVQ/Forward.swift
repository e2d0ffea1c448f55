// rvq forward: the residual levels' nearest codes, the summed quantized vector, the VQ loss
// and code counts.
import PluginKit
import VQMoEABI

/// What backward needs, copied at forward time.
final class RVQContext {
    let n: Int, d: Int, levels: Int
    /// (L,N) c_l per level.
    let codes: UnsafeMutablePointer<Int32>
    /// (L,N,d) r_l = r_{l-1} - q_l, the residual left after each level.
    let residuals: UnsafeMutablePointer<Float>
    /// VQMOE_STEP_FROZEN: no parameter gradients.
    let frozen: Bool

    init(n: Int, d: Int, levels: Int, frozen: Bool) {
        self.n = n; self.d = d; self.levels = levels; self.frozen = frozen
        codes = .allocate(capacity: max(levels * n, 1))
        residuals = .allocate(capacity: max(levels * n * d, 1))
    }

    deinit { codes.deallocate(); residuals.deallocate() }
}

extension RVQQuantizer {
    /// `count` int32 of host scratch memory, valid until the current plugin call returns.
    func scratchInts(_ count: Int, _ what: String) throws(PluginFailure) -> UnsafeMutablePointer<Int32> {
        guard let p = host.api.pointee.scratch!(max(count, 1) * MemoryLayout<Int32>.stride) else {
            throw .outOfMemory("could not get \(count * 4) bytes of scratch memory for \(what)")
        }
        return p.bindMemory(to: Int32.self, capacity: max(count, 1))
    }

    /// For l = 1..L (codebook index l-1): r_0 = x, c_l = argmin_j ||r_{l-1} - e^l_j||^2 (ties ->
    /// lowest j), q_l = e^l_{c_l}, r_l = r_{l-1} - q_l.
    /// quantized = sum_l q_l (SURROGATE: x); codes (N,L) with codes[t][l-1] = c_l(t);
    /// code_counts_j = #{(t, l) : c_l(t) = j} (summed over levels, so it sums to N L);
    /// loss = sum_l [mse(sg(r_{l-1}), q_l) + commitment * mse(r_{l-1}, sg(q_l))]
    ///      = (1 + commitment) * sum_l sum_t ||r_{l-1,t} - q_{l,t}||^2 / (N d).
    /// No state changes (the codebooks are parameters).
    func forward(
        _ stepPtr: UnsafePointer<vqmoe_step_info>?, _ inPtr: UnsafePointer<vqmoe_quantizer_input>?,
        _ outPtr: UnsafeMutablePointer<vqmoe_quantizer_output>?,
        _ ctxOut: UnsafeMutablePointer<UnsafeMutableRawPointer?>?
    ) throws(PluginFailure) {
        ctxOut?.pointee = nil
        guard let stepPtr, let inPtr, let outPtr else { throw .invalid("forward: step, input or output is NULL") }
        try requireSize(inPtr.pointee.struct_size, vqmoe_quantizer_input.self, "quantizer input")
        try requireSize(outPtr.pointee.struct_size, vqmoe_quantizer_output.self, "quantizer output")
        let flags = stepPtr.pointee.flags
        let train = flags & VQMOE_STEP_TRAIN != 0
        let frozen = flags & VQMOE_STEP_FROZEN != 0
        let saveContext = train && flags & VQMOE_STEP_NO_GRAD == 0
        let C = try boundCodebook()  // (L,K,d)
        let d = dModel, k = nCodes, levels = nLevels
        let n = try rowsOf(inPtr.pointee.x, cols: d, "x")
        let x = try requireF32(inPtr.pointee.x, [n, d], "x")  // (N,d)
        let quantized = try requireF32(outPtr.pointee.quantized, [n, d], "quantized")  // (N,d)
        let codes = try requireI32(outPtr.pointee.codes, [n, levels], "codes")  // (N,L)
        let counts = try requireF32(outPtr.pointee.code_counts, [k], "code_counts")  // (K)
        for i in 0..<(n * d) where !x[i].isFinite {
            throw .numeric("non-finite input x[\(i / d)][\(i % d)] = \(x[i])")
        }
        for i in 0..<(levels * k * d) where !C[i].isFinite {
            throw .numeric("non-finite codebook entry [\(i / (k * d))][\(i / d % k)][\(i % d)] = \(C[i])")
        }

        let r = try host.scratchFloats(n * d, "residuals")  // (N,d) r_{l-1}, then r_l
        r.update(from: x, count: n * d)
        quantized.update(repeating: 0, count: n * d)
        let levelCodes = try scratchInts(n, "level codes")  // (N)
        let sqError = try host.scratchDoubles(n, "squared errors")  // (N)
        let ctx = saveContext ? RVQContext(n: n, d: d, levels: levels, frozen: frozen) : nil
        var levelCounts: [[Float]] = []
        var sse: Double = 0
        for l in 0..<levels {
            let Cl = C + l * k * d  // (K,d) codebook of level l+1
            try assignNearest(r: r, n: n, codebook: Cl, codes: levelCodes, sqError: sqError)
            var used = [Float](repeating: 0, count: k)
            for t in 0..<n {
                let c = Int(levelCodes[t])
                codes[t * levels + l] = Int32(c)
                used[c] += 1
                sse += sqError[t]
                let e = Cl + c * d, rt = r + t * d, qt = quantized + t * d
                for i in 0..<d { rt[i] -= e[i]; qt[i] += e[i] }
            }
            if let ctx {
                (ctx.codes + l * n).update(from: levelCodes, count: n)
                (ctx.residuals + l * n * d).update(from: r, count: n * d)
            }
            levelCounts.append(used)
        }
        if flags & VQMOE_STEP_SURROGATE != 0 { quantized.update(from: x, count: n * d) }  // straight-through surrogate
        for j in 0..<k { counts[j] = levelCounts.reduce(0) { $0 + $1[j] } }
        let mse = n > 0 ? sse / Double(n * d) : 0
        outPtr.pointee.loss = Float((1 + Double(config.commitment)) * mse)

        // Published last: a failed forward hands the host no context.
        if let ctx { ctxOut?.pointee = Unmanaged.passRetained(ctx).toOpaque() }
        if train || !(stats?.fromTraining ?? false) {
            stats = UsageStats(levelCounts: levelCounts, tokens: n, fromTraining: train)
        }
    }
}
