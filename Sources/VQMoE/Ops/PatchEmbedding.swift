/// ViT input layer (Dosovitskiy et al. 2021): non-overlapping P×P patches, a linear projection
/// (the same as a stride-P convolution with weight (d, C, P, P)), a learned class token in front,
/// learned positions.
///
///     patches (B·N_p, C·P·P): row b·N_p + (py·W/P + px), column c·P·P + dy·P + dx = img[b, c, py·P+dy, px·P+dx]
///     x[b, 0]   = cls + pos[0]
///     x[b, 1+i] = patches[b·N_p+i] · Wᵀ + bias + pos[1+i]                        (B, 1+N_p, d)
///     backward: dcls += Σ_b dx[b,0];  dpos[t] += Σ_b dx[b,t];  dW, dbias from dx[b,1+i] (no image grad)
///
/// ```swift
/// let shape = ImageShape(channels: 1, height: 28, width: 28, patch: 4)   // 49 patches, T = 50
/// PatchEmbedding.forward(out: x, patches: buf, images: px, shape: shape, batch: B, weight: w, bias: b, cls: cls,
///                        pos: pos, d: 64, scratch: s)
/// ```
public struct ImageShape: Sendable, Equatable {
    public var channels: Int, height: Int, width: Int, patch: Int
    public init(channels: Int, height: Int, width: Int, patch: Int) {
        self.channels = channels; self.height = height; self.width = width; self.patch = patch
    }
    public var patches: Int { (height / patch) * (width / patch) }
    public var patchSize: Int { channels * patch * patch }
    /// Sequence length: the class token and the patches.
    public var tokens: Int { 1 + patches }
}

public enum PatchEmbedding {
    public static func forward(
        out: UnsafeMutablePointer<Float>, patches: UnsafeMutablePointer<Float>, images: UnsafePointer<Float>,
        shape s: ImageShape, batch: Int, weight: UnsafePointer<Float>, bias: UnsafePointer<Float>,
        cls: UnsafePointer<Float>, pos: UnsafePointer<Float>, d: Int, scratch: UnsafeMutablePointer<Float>
    ) {
        let np = s.patches, k = s.patchSize, p = s.patch, across = s.width / p, t = s.tokens
        for b in 0..<batch {
            let img = images + b * s.channels * s.height * s.width
            for i in 0..<np {
                let py = i / across, px = i % across
                let row = patches + (b * np + i) * k
                for c in 0..<s.channels {
                    for dy in 0..<p {
                        let src = img + (c * s.height + py * p + dy) * s.width + px * p
                        (row + c * p * p + dy * p).update(from: src, count: p)
                    }
                }
            }
        }
        Linear.forward(
            out: scratch, inp: patches, weight: weight, bias: bias, n: batch * np, inFeatures: k, outFeatures: d)
        for b in 0..<batch {
            let x = out + b * t * d
            for j in 0..<d { x[j] = cls[j] + pos[j] }
            for i in 0..<np {
                let dst = x + (1 + i) * d, src = scratch + (b * np + i) * d, pp = pos + (1 + i) * d
                for j in 0..<d { dst[j] = src[j] + pp[j] }
            }
        }
    }

    /// Accumulates dW, dbias, dcls, dpos from dx (B,T,d). `scratch` holds B·N_p·d floats.
    public static func backward(
        dx: UnsafePointer<Float>, patches: UnsafePointer<Float>, shape s: ImageShape, batch: Int,
        dweight: UnsafeMutablePointer<Float>?, dbias: UnsafeMutablePointer<Float>?,
        dcls: UnsafeMutablePointer<Float>?, dpos: UnsafeMutablePointer<Float>?, d: Int,
        scratch: UnsafeMutablePointer<Float>
    ) {
        let np = s.patches, t = s.tokens
        for b in 0..<batch {
            let g = dx + b * t * d
            if let dcls { Vec.add(dcls, g, d) }
            if let dpos { Vec.add(dpos, g, t * d) }
            (scratch + b * np * d).update(from: g + d, count: np * d)
        }
        Linear.backward(
            dinp: nil, dweight: dweight, dbias: dbias, dout: scratch, inp: patches,
            weight: dweight.map { UnsafePointer($0) } ?? patches,
            n: batch * np, inFeatures: s.patchSize, outFeatures: d)
    }
}
