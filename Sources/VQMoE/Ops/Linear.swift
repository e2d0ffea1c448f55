/// Fully connected layer over raw buffers, PyTorch layout (weight (Out,In), bias (Out)).
///
///     forward   out (N,Out) = inp (N,In) · Wᵀ + b
///     backward  dinp += dout · W;  dW += doutᵀ · inp;  db += Σ_rows dout
///
/// ```swift
/// Linear.forward(out: y, inp: x, weight: w, bias: b, n: 64, inFeatures: 128, outFeatures: 512)
/// ```
public enum Linear {
    public static func forward(
        out: UnsafeMutablePointer<Float>, inp: UnsafePointer<Float>, weight: UnsafePointer<Float>,
        bias: UnsafePointer<Float>?, n: Int, inFeatures: Int, outFeatures: Int
    ) {
        guard n > 0 else { return }
        if let bias {
            for r in 0..<n { (out + r * outFeatures).update(from: bias, count: outFeatures) }
        }
        HostRuntime.sgemm(
            transA: false, transB: true, m: n, n: outFeatures, k: inFeatures, alpha: 1, a: inp, lda: inFeatures,
            b: weight, ldb: inFeatures, beta: bias == nil ? 0 : 1, c: out, ldc: outFeatures)
    }

    /// Accumulates into `dinp` (when non-nil), `dweight` and `dbias`.
    public static func backward(
        dinp: UnsafeMutablePointer<Float>?, dweight: UnsafeMutablePointer<Float>?,
        dbias: UnsafeMutablePointer<Float>?, dout: UnsafePointer<Float>,
        inp: UnsafePointer<Float>, weight: UnsafePointer<Float>,
        n: Int, inFeatures: Int, outFeatures: Int
    ) {
        guard n > 0 else { return }
        if let dinp {
            HostRuntime.sgemm(
                transA: false, transB: false, m: n, n: inFeatures, k: outFeatures, alpha: 1, a: dout, lda: outFeatures,
                b: weight, ldb: inFeatures, beta: 1, c: dinp, ldc: inFeatures)
        }
        if let dweight {
            HostRuntime.sgemm(
                transA: true, transB: false, m: outFeatures, n: inFeatures, k: n, alpha: 1, a: dout, lda: outFeatures,
                b: inp, ldb: inFeatures, beta: 1, c: dweight, ldc: inFeatures)
        }
        if let dbias { columnSums(dbias, dout, rows: n, cols: outFeatures) }
    }

    /// acc (cols) += Σ_r m (rows,cols)[r], in fixed 256-row chunks summed in order (the result
    /// does not depend on the thread count).
    static func columnSums(_ acc: UnsafeMutablePointer<Float>, _ m: UnsafePointer<Float>, rows: Int, cols: Int) {
        let chunk = 256, chunks = (rows + chunk - 1) / chunk
        if chunks <= 1 {
            for r in 0..<rows { Vec.add(acc, m + r * cols, cols) }
            return
        }
        let partial = UnsafeMutablePointer<Float>.allocate(capacity: chunks * cols)
        defer { partial.deallocate() }
        partial.initialize(repeating: 0, count: chunks * cols)
        nonisolated(unsafe) let part = partial
        HostRuntime.parallelFor(Int64(chunks)) { lo, hi in
            for k in Int(lo)..<Int(hi) {
                for r in (k * chunk)..<min(rows, (k + 1) * chunk) { Vec.add(part + k * cols, m + r * cols, cols) }
            }
        }
        for k in 0..<chunks { Vec.add(acc, partial + k * cols, cols) }
    }
}

/// Small SIMD helpers over raw float buffers (the optimizer does not vectorize reductions).
public enum Vec {
    /// a[i] += b[i]
    @inline(__always) public static func add(_ a: UnsafeMutablePointer<Float>, _ b: UnsafePointer<Float>, _ n: Int) {
        var i = 0
        while i + 8 <= n {
            let va = UnsafeRawPointer(a + i).loadUnaligned(as: SIMD8<Float>.self)
            let vb = UnsafeRawPointer(b + i).loadUnaligned(as: SIMD8<Float>.self)
            UnsafeMutableRawPointer(a + i).storeBytes(of: va + vb, as: SIMD8<Float>.self)
            i += 8
        }
        while i < n { a[i] += b[i]; i += 1 }
    }

    /// a[i] += s * b[i]
    @inline(__always) public static func axpy(
        _ a: UnsafeMutablePointer<Float>, _ s: Float, _ b: UnsafePointer<Float>, _ n: Int
    ) {
        var i = 0
        let vs = SIMD8<Float>(repeating: s)
        while i + 8 <= n {
            let va = UnsafeRawPointer(a + i).loadUnaligned(as: SIMD8<Float>.self)
            let vb = UnsafeRawPointer(b + i).loadUnaligned(as: SIMD8<Float>.self)
            UnsafeMutableRawPointer(a + i).storeBytes(of: va + vs * vb, as: SIMD8<Float>.self)
            i += 8
        }
        while i < n { a[i] += s * b[i]; i += 1 }
    }

    /// Σ a[i]·b[i]
    @inline(__always) public static func dot(_ a: UnsafePointer<Float>, _ b: UnsafePointer<Float>, _ n: Int) -> Float {
        var acc = SIMD8<Float>(repeating: 0)
        var i = 0
        while i + 8 <= n {
            acc +=
                UnsafeRawPointer(a + i).loadUnaligned(as: SIMD8<Float>.self)
                * UnsafeRawPointer(b + i).loadUnaligned(as: SIMD8<Float>.self)
            i += 8
        }
        var s = acc.sum()
        while i < n { s += a[i] * b[i]; i += 1 }
        return s
    }

    /// Σ a[i]
    @inline(__always) public static func sum(_ a: UnsafePointer<Float>, _ n: Int) -> Float {
        var acc = SIMD8<Float>(repeating: 0)
        var i = 0
        while i + 8 <= n { acc += UnsafeRawPointer(a + i).loadUnaligned(as: SIMD8<Float>.self); i += 8 }
        var s = acc.sum()
        while i < n { s += a[i]; i += 1 }
        return s
    }

    /// out[i] = a[i] + b[i], in parallel chunks.
    public static func sum(
        _ out: UnsafeMutablePointer<Float>, _ a: UnsafePointer<Float>, _ b: UnsafePointer<Float>, _ n: Int
    ) {
        nonisolated(unsafe) let out = out
        HostRuntime.parallelFor(Int64(n), grain: 1 << 16) { lo, hi in
            var i = Int(lo)
            while i + 8 <= Int(hi) {
                let v =
                    UnsafeRawPointer(a + i).loadUnaligned(as: SIMD8<Float>.self)
                    + UnsafeRawPointer(b + i).loadUnaligned(as: SIMD8<Float>.self)
                UnsafeMutableRawPointer(out + i).storeBytes(of: v, as: SIMD8<Float>.self)
                i += 8
            }
            while i < Int(hi) { out[i] = a[i] + b[i]; i += 1 }
        }
    }

    /// a[i] *= b[i], in parallel chunks.
    public static func multiply(_ a: UnsafeMutablePointer<Float>, _ b: UnsafePointer<Float>, _ n: Int) {
        nonisolated(unsafe) let a = a
        HostRuntime.parallelFor(Int64(n), grain: 1 << 16) { lo, hi in
            var i = Int(lo)
            while i + 8 <= Int(hi) {
                let v =
                    UnsafeRawPointer(a + i).loadUnaligned(as: SIMD8<Float>.self)
                    * UnsafeRawPointer(b + i).loadUnaligned(as: SIMD8<Float>.self)
                UnsafeMutableRawPointer(a + i).storeBytes(of: v, as: SIMD8<Float>.self)
                i += 8
            }
            while i < Int(hi) { a[i] *= b[i]; i += 1 }
        }
    }

    /// a[i] *= s
    @inline(__always) public static func scale(_ a: UnsafeMutablePointer<Float>, _ s: Float, _ n: Int) {
        var i = 0
        let vs = SIMD8<Float>(repeating: s)
        while i + 8 <= n {
            let va = UnsafeRawPointer(a + i).loadUnaligned(as: SIMD8<Float>.self)
            UnsafeMutableRawPointer(a + i).storeBytes(of: va * vs, as: SIMD8<Float>.self)
            i += 8
        }
        while i < n { a[i] *= s; i += 1 }
    }
}
