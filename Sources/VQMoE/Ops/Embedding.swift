/// Token + learned position embedding.
///
///     forward   x[b,t] = wte[tok[b,t]] + wpe[position + t]   (B,T,C); position > 0 when decoding
///     backward  dwte[tok[b,t]] += dx[b,t];  dwpe[t] += dx[b,t]
///
/// ```swift
/// Embedding.forward(out: x, tokens: ids, wte: wte, wpe: wpe, b: B, t: T, c: C)
/// ```
public enum Embedding {
    public static func forward(
        out: UnsafeMutablePointer<Float>, tokens: UnsafePointer<Int32>, wte: UnsafePointer<Float>,
        wpe: UnsafePointer<Float>?, b: Int, t: Int, c: Int, position: Int = 0
    ) {
        for bi in 0..<b {
            for ti in 0..<t {
                let o = out + (bi * t + ti) * c
                o.update(from: wte + Int(tokens[bi * t + ti]) * c, count: c)
                if let wpe { Vec.add(o, wpe + (position + ti) * c, c) }
            }
        }
    }

    public static func backward(
        dwte: UnsafeMutablePointer<Float>?, dwpe: UnsafeMutablePointer<Float>?, dout: UnsafePointer<Float>,
        tokens: UnsafePointer<Int32>, b: Int, t: Int, c: Int
    ) {
        for bi in 0..<b {
            for ti in 0..<t {
                let g = dout + (bi * t + ti) * c
                if let dwte { Vec.add(dwte + Int(tokens[bi * t + ti]) * c, g, c) }
                if let dwpe { Vec.add(dwpe + ti * c, g, c) }
            }
        }
    }
}

/// Inverted dropout with a mask drawn from the host RNG (seeded per step and site, so resumed
/// runs draw the same masks): y = x·m/(1−p), m ~ Bernoulli(1−p).
///
/// ```swift
/// Dropout.forward(out: y, mask: m, inp: x, count: n, p: 0.1, seed: s)
/// ```
public enum Dropout {
    public static func forward(
        out: UnsafeMutablePointer<Float>, mask: UnsafeMutablePointer<Float>, inp: UnsafePointer<Float>,
        count: Int, p: Float, seed: UInt64, offset: Int = 0
    ) {
        // Element i draws the stream's value number offset + i: a slice of a larger activation
        // (one rank's rows of a global batch) gets the same mask as in the whole.
        var r = HostRNG.make(seed: seed, stream: 0xd20)
        r.counter = UInt64(offset)
        let keep = 1 / (1 - p)
        for i in 0..<count {
            let m: Float = HostRNG.uniform(&r) >= p ? keep : 0
            mask[i] = m
            out[i] = inp[i] * m
        }
    }

    /// dinp = dout·mask (overwrites; may alias).
    public static func backward(
        dinp: UnsafeMutablePointer<Float>, dout: UnsafePointer<Float>, mask: UnsafePointer<Float>, count: Int
    ) {
        for i in 0..<count { dinp[i] = dout[i] * mask[i] }
    }
}
