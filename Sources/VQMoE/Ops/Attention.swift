import CBLAS
import Foundation

/// Multi-head self-attention core over a fused qkv buffer, causal (language models) or full
/// (`causal: false`, ViT).
///
///     qkv (B,T,3C) = [Q | K | V], head h uses columns h·Dh ..< (h+1)·Dh of each, Dh = C/H
///     S = Q Kᵀ / √Dh (causal: key j ≤ query i),  P = softmax_rows(S),  Y = P V   → y (B,T,C)
///     backward: dV = Pᵀ dY,  dP = dY Vᵀ,  dS = P ⊙ (dP − rowsum(dP ⊙ P)),
///               dQ = dS K / √Dh,  dK = dSᵀ Q / √Dh
///
/// Work is split over (batch, head) pairs on the host pool, each pair's GEMMs single-threaded
/// (OpenBLAS runs on one thread; see `HostRuntime.sgemm`). Query rows go in blocks of 64 that only
/// multiply the keys they can see, so the masked half of S is never computed. P is saved
/// (B,H,T,T) for the backward.
///
/// ```swift
/// Attention.forward(y: y, att: p, qkv: qkv, b: B, t: T, c: C, heads: H)
/// ```
public enum Attention {
    static let block = 64

    public static func forward(
        y: UnsafeMutablePointer<Float>, att: UnsafeMutablePointer<Float>, qkv: UnsafePointer<Float>,
        b: Int, t: Int, c: Int, heads: Int, causal: Bool = true
    ) {
        let dh = c / heads, scale = 1 / Float(dh).squareRoot(), ld = 3 * c
        nonisolated(unsafe) let (y, att) = (y, att)
        do {
            HostRuntime.parallelFor(Int64(b * heads)) { lo, hi in
                for pair in Int(lo)..<Int(hi) {
                    let bi = pair / heads, h = pair % heads
                    let q = qkv + bi * t * ld + h * dh, k = q + c, v = q + 2 * c
                    let p = att + pair * t * t
                    let out = y + bi * t * c + h * dh
                    var i0 = 0
                    while i0 < t {
                        let i1 = min(i0 + block, t), rows = i1 - i0
                        let keys = causal ? i1 : t  // keys the block's queries may see
                        // S[i0..<i1, 0..<keys] = Q Kᵀ·scale, written into P's rows
                        cblas_sgemm(
                            CblasRowMajor, CblasNoTrans, CblasTrans, Int32(rows), Int32(keys), Int32(dh), scale,
                            q + i0 * ld, Int32(ld), k, Int32(ld), 0, p + i0 * t, Int32(t))
                        for i in i0..<i1 { softmaxRow(p + i * t, seen: causal ? i + 1 : t, width: t) }
                        // Y[i0..<i1] = P[i0..<i1, 0..<keys] V[0..<keys]
                        cblas_sgemm(
                            CblasRowMajor, CblasNoTrans, CblasNoTrans, Int32(rows), Int32(dh), Int32(keys), 1,
                            p + i0 * t, Int32(t), v, Int32(ld), 0, out + i0 * c, Int32(c))
                        i0 = i1
                    }
                }
            }
        }
    }

    /// Inference with a key/value cache: the `t` new rows of each stream attend causally over
    /// the `past` cached rows before them and over themselves.
    ///
    ///     cache (B, capacity, 3C): rows 0..<past + t of each stream hold [Q | K | V] (the new rows
    ///     last); query past + i sees keys 0...past + i;  y (B,t,C) = softmax(Q Kᵀ/√Dh) V
    ///
    /// `att` (B·H, t, past + t) receives the probabilities. Work is split over (batch, head) pairs
    /// as in `forward`; with `past` = 0 and t = T this is `forward`'s causal attention.
    public static func decode(
        y: UnsafeMutablePointer<Float>, att: UnsafeMutablePointer<Float>, cache: UnsafePointer<Float>,
        capacity: Int, past: Int, b: Int, t: Int, c: Int, heads: Int
    ) {
        let dh = c / heads, scale = 1 / Float(dh).squareRoot(), ld = 3 * c, keys = past + t
        nonisolated(unsafe) let (y, att) = (y, att)
        HostRuntime.parallelFor(Int64(b * heads)) { lo, hi in
            for pair in Int(lo)..<Int(hi) {
                let bi = pair / heads, h = pair % heads
                let k = cache + bi * capacity * ld + h * dh + c, v = k + c, q = k - c + past * ld
                let p = att + pair * t * keys, out = y + bi * t * c + h * dh
                // S (t, keys) = Q Kᵀ·scale; row i sees keys 0...past + i (one token: matrix-vector products)
                HostRuntime.gemm(false, true, t, keys, dh, scale, q, ld, k, ld, 0, p, keys)
                for i in 0..<t { softmaxRow(p + i * keys, seen: past + i + 1, width: keys) }
                HostRuntime.gemm(false, false, t, dh, keys, 1, p, keys, v, ld, 0, out, c)
            }
        }
    }

    /// row[0..<seen] = softmax(row[0..<seen]); row[seen..<width] = 0 (the masked keys).
    @inline(__always) static func softmaxRow(_ row: UnsafeMutablePointer<Float>, seen: Int, width: Int) {
        let m = VecMath.max(row, count: seen)
        let s = VecMath.expInPlace(row, count: seen, subtracting: m)
        Vec.scale(row, 1 / s, seen)
        (row + seen).update(repeating: 0, count: width - seen)
    }

    /// d[j] = p[j]·(d[j] − dot)·scale
    @inline(__always) static func softmaxBackwardRow(
        _ d: UnsafeMutablePointer<Float>, _ p: UnsafePointer<Float>, dot: Float, scale: Float, count: Int
    ) {
        var j = 0
        let vdot = SIMD8<Float>(repeating: dot), vs = SIMD8<Float>(repeating: scale)
        while j + 8 <= count {
            let pv = UnsafeRawPointer(p + j).loadUnaligned(as: SIMD8<Float>.self)
            let dv = UnsafeRawPointer(d + j).loadUnaligned(as: SIMD8<Float>.self)
            UnsafeMutableRawPointer(d + j).storeBytes(of: pv * (dv - vdot) * vs, as: SIMD8<Float>.self)
            j += 8
        }
        while j < count { d[j] = p[j] * (d[j] - dot) * scale; j += 1 }
    }

    /// Accumulates into dqkv (B,T,3C).
    public static func backward(
        dqkv: UnsafeMutablePointer<Float>, dy: UnsafePointer<Float>, qkv: UnsafePointer<Float>,
        att: UnsafePointer<Float>, b: Int, t: Int, c: Int, heads: Int, causal: Bool = true
    ) {
        let dh = c / heads, scale = 1 / Float(dh).squareRoot(), ld = 3 * c
        nonisolated(unsafe) let dqkv = dqkv
        do {
            HostRuntime.parallelFor(Int64(b * heads)) { lo, hi in
                let ds = UnsafeMutablePointer<Float>.allocate(capacity: block * t)
                defer { ds.deallocate() }
                for pair in Int(lo)..<Int(hi) {
                    let bi = pair / heads, h = pair % heads
                    let q = qkv + bi * t * ld + h * dh, k = q + c, v = q + 2 * c
                    let dq = dqkv + bi * t * ld + h * dh, dk = dq + c, dv = dq + 2 * c
                    let p = att + pair * t * t
                    let g = dy + bi * t * c + h * dh
                    var i0 = 0
                    while i0 < t {
                        let i1 = min(i0 + block, t), rows = i1 - i0
                        let keys = causal ? i1 : t
                        // dV[0..<keys] += P[i0..<i1]ᵀ dY[i0..<i1]
                        cblas_sgemm(
                            CblasRowMajor, CblasTrans, CblasNoTrans, Int32(keys), Int32(dh), Int32(rows), 1,
                            p + i0 * t, Int32(t), g + i0 * c, Int32(c), 1, dv, Int32(ld))
                        // dP = dY[i0..<i1] V[0..<keys]ᵀ  (rows, keys)
                        cblas_sgemm(
                            CblasRowMajor, CblasNoTrans, CblasTrans, Int32(rows), Int32(keys), Int32(dh), 1,
                            g + i0 * c, Int32(c), v, Int32(ld), 0, ds, Int32(keys))
                        for r in 0..<rows {
                            let i = i0 + r, seen = causal ? i + 1 : t
                            let prow = p + i * t, drow = ds + r * keys
                            let dot = Vec.dot(prow, drow, seen)
                            Attention.softmaxBackwardRow(drow, prow, dot: dot, scale: scale, count: seen)
                            (drow + seen).update(repeating: 0, count: keys - seen)
                        }
                        // dQ[i0..<i1] += dS K[0..<keys];  dK[0..<keys] += dSᵀ Q[i0..<i1]
                        cblas_sgemm(
                            CblasRowMajor, CblasNoTrans, CblasNoTrans, Int32(rows), Int32(dh), Int32(keys), 1,
                            ds, Int32(keys), k, Int32(ld), 1, dq + i0 * ld, Int32(ld))
                        cblas_sgemm(
                            CblasRowMajor, CblasTrans, CblasNoTrans, Int32(keys), Int32(dh), Int32(rows), 1,
                            ds, Int32(keys), q + i0 * ld, Int32(ld), 1, dk, Int32(ld))
                        i0 = i1
                    }
                }
            }
        }
    }
}
