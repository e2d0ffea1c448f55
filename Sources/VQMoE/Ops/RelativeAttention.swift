import CBLAS
import Foundation

/// Transformer-XL attention core (Dai et al. 2019, §3.3): causal multi-head attention of a
/// segment over its memory and itself, with relative positional scores.
///
///     keys K = M + T: rows 0..<M are the memory (the previous segment), M..<K the segment
///     qkv (B,K,3C) = [Q | K | V] of every key row (Q of the memory rows is not used)
///     query i (absolute position M + i) sees keys j ≤ M + i, at distance d = M + i − j
///     r (K,C): projected relative encodings in Transformer-XL order, row m = distance K−1−m
///     S_ij = ((q_i + u)·k_j  +  (q_i + v)·r_{M+i−j}) / √Dh        terms (a)+(c) and (b)+(d)
///     P = softmax_rows(S),  Y = P V                                 → y (B,T,C)
///
/// With r in that order the position term of row i is a contiguous slice: G = (Q + v) rᵀ,
/// BD_ij = G[i, T−1−i+j] (the "relative shift" of the reference code, without the padding).
///
///     backward: dV = Pᵀ dY,  dS = P ⊙ (dP − rowsum(dP ⊙ P)) / √Dh,  dP = dY Vᵀ
///               dK = dSᵀ (Q + u),  dQ = dS K + dG r,  dG[i, T−1−i+j] = dS_ij
///               du = Σ_i (dS K)_i,  dv = Σ_i (dG r)_i,  dr = Σ_batch dGᵀ (Q + v)
///
/// Work is split over (batch, head) pairs on the host pool; query rows go in blocks of 64 that
/// only multiply the keys they can see. P is saved (B,H,T,K) for the backward.
///
/// ```swift
/// RelativeAttention.positions(out: table, keys: M + T, c: C)          // then r = table W_rᵀ
/// RelativeAttention.forward(y: y, att: p, qkv: qkv, r: r, u: u, v: v, b: B, t: T, mem: M, c: C, heads: H)
/// ```
public enum RelativeAttention {
    static let block = 64

    /// Sinusoid encodings of the distances K−1, …, 0 (Transformer-XL's `pos_seq`), row m =
    /// [sin(d f_0) … sin(d f_{C/2−1}), cos(d f_0) … cos(d f_{C/2−1})], d = K−1−m, f_i = 10000^(−2i/C).
    public static func positions(out: UnsafeMutablePointer<Float>, keys: Int, c: Int) {
        let half = c / 2
        for m in 0..<keys {
            let d = Double(keys - 1 - m)
            for i in 0..<half {
                let a = d * Foundation.pow(10000, -Double(2 * i) / Double(c))
                out[m * c + i] = Float(Foundation.sin(a))
                out[m * c + half + i] = Float(Foundation.cos(a))
            }
        }
    }

    /// dst (rows, dh) = src rows (stride ld) + bias.
    @inline(__always) static func biased(
        _ dst: UnsafeMutablePointer<Float>, _ src: UnsafePointer<Float>, ld: Int,
        _ bias: UnsafePointer<Float>, rows: Int, dh: Int
    ) {
        for r in 0..<rows {
            let o = dst + r * dh
            o.update(from: src + r * ld, count: dh)
            Vec.add(o, bias, dh)
        }
    }

    public static func forward(
        y: UnsafeMutablePointer<Float>, att: UnsafeMutablePointer<Float>, qkv: UnsafePointer<Float>,
        r: UnsafePointer<Float>, u: UnsafePointer<Float>, v: UnsafePointer<Float>,
        b: Int, t: Int, mem: Int, c: Int, heads: Int
    ) {
        let dh = c / heads, scale = 1 / Float(dh).squareRoot(), ld = 3 * c, keys = mem + t
        nonisolated(unsafe) let (y, att) = (y, att)
        HostRuntime.parallelFor(Int64(b * heads)) { lo, hi in
            let qu = UnsafeMutablePointer<Float>.allocate(capacity: 2 * block * dh + block * keys)
            defer { qu.deallocate() }
            let qv = qu + block * dh, g = qv + block * dh
            for pair in Int(lo)..<Int(hi) {
                let bi = pair / heads, h = pair % heads
                let kb = qkv + bi * keys * ld + h * dh  // key row 0, head h
                let q = kb + mem * ld, k = kb + c, vv = kb + 2 * c
                let rh = r + h * dh, uh = u + h * dh, vh = v + h * dh
                let p = att + pair * t * keys
                let out = y + bi * t * c + h * dh
                var i0 = 0
                while i0 < t {
                    let i1 = min(i0 + block, t), rows = i1 - i0
                    let seenMax = mem + i1  // keys the block's queries may see
                    biased(qu, q + i0 * ld, ld: ld, uh, rows: rows, dh: dh)
                    biased(qv, q + i0 * ld, ld: ld, vh, rows: rows, dh: dh)
                    // AC = (Q+u) Kᵀ into P's rows;  G = (Q+v) r[T−i1 ..< K]ᵀ  (rows, seenMax)
                    cblas_sgemm(
                        CblasRowMajor, CblasNoTrans, CblasTrans, Int32(rows), Int32(seenMax), Int32(dh), 1,
                        qu, Int32(dh), k, Int32(ld), 0, p + i0 * keys, Int32(keys))
                    cblas_sgemm(
                        CblasRowMajor, CblasNoTrans, CblasTrans, Int32(rows), Int32(seenMax), Int32(dh), 1,
                        qv, Int32(dh), rh + (t - i1) * c, Int32(c), 0, g, Int32(seenMax))
                    for i in i0..<i1 {
                        let row = p + i * keys, seen = mem + i + 1
                        Vec.add(row, g + (i - i0) * seenMax + (i1 - 1 - i), seen)  // BD_ij = G[i, T−1−i+j]
                        Vec.scale(row, scale, seen)
                        Attention.softmaxRow(row, seen: seen, width: keys)
                    }
                    // Y[i0..<i1] = P[i0..<i1, 0..<seenMax] V[0..<seenMax]
                    cblas_sgemm(
                        CblasRowMajor, CblasNoTrans, CblasNoTrans, Int32(rows), Int32(dh), Int32(seenMax), 1,
                        p + i0 * keys, Int32(keys), vv, Int32(ld), 0, out + i0 * c, Int32(c))
                    i0 = i1
                }
            }
        }
    }

    /// Floats of backward scratch: dG (H,B,T,K), Q+v (H,B,T,Dh), per-pair du/dv sums (B·H, 2·Dh).
    public static func scratchCount(b: Int, t: Int, mem: Int, c: Int, heads: Int) -> Int {
        let dh = c / heads
        return heads * b * t * (mem + t) + b * t * c + b * heads * 2 * dh
    }

    /// Accumulates into dqkv (B,K,3C) (Q columns of the segment rows, K and V columns of every
    /// row), dr (K,C), du and dv (C). `scratch` holds `scratchCount(...)` floats.
    public static func backward(
        dqkv: UnsafeMutablePointer<Float>, dr: UnsafeMutablePointer<Float>,
        du: UnsafeMutablePointer<Float>, dv: UnsafeMutablePointer<Float>,
        dy: UnsafePointer<Float>, qkv: UnsafePointer<Float>, r: UnsafePointer<Float>,
        u: UnsafePointer<Float>, v: UnsafePointer<Float>, att: UnsafePointer<Float>,
        b: Int, t: Int, mem: Int, c: Int, heads: Int, scratch: UnsafeMutablePointer<Float>
    ) {
        let dh = c / heads, scale = 1 / Float(dh).squareRoot(), ld = 3 * c, keys = mem + t
        let dgAll = scratch, qvAll = dgAll + heads * b * t * keys, sums = qvAll + b * t * c
        dgAll.update(repeating: 0, count: heads * b * t * keys)
        sums.update(repeating: 0, count: b * heads * 2 * dh)
        nonisolated(unsafe) let (dqkv, dgAll2, qvAll2, sums2) = (dqkv, dgAll, qvAll, sums)
        HostRuntime.parallelFor(Int64(b * heads)) { lo, hi in
            let work = UnsafeMutablePointer<Float>.allocate(capacity: 2 * block * dh + block * keys)
            defer { work.deallocate() }
            for pair in Int(lo)..<Int(hi) {
                let bi = pair / heads, h = pair % heads
                let kb = qkv + bi * keys * ld + h * dh, dkb = dqkv + bi * keys * ld + h * dh
                let head = HeadPointers(
                    q: kb + mem * ld, k: kb + c, v: kb + 2 * c, dq: dkb + mem * ld, dk: dkb + c, dv: dkb + 2 * c,
                    r: r + h * dh, u: u + h * dh, vBias: v + h * dh, p: att + pair * t * keys,
                    dy: dy + bi * t * c + h * dh,
                    dg: dgAll2 + (h * b + bi) * t * keys, qv: qvAll2 + (h * b + bi) * t * dh, du: sums2 + pair * 2 * dh,
                    dvBias: sums2 + pair * 2 * dh + dh)
                var i0 = 0
                while i0 < t {
                    backwardBlock(
                        head, rows: i0..<min(i0 + block, t), t: t, mem: mem, c: c, dh: dh, scale: scale, work: work)
                    i0 += block
                }
            }
        }
        // du, dv: per-pair sums added in a fixed order (independent of the thread count).
        for pair in 0..<(b * heads) {
            let h = pair % heads
            Vec.add(du + h * dh, sums + pair * 2 * dh, dh)
            Vec.add(dv + h * dh, sums + pair * 2 * dh + dh, dh)
        }
        // dr_h (K,Dh) += Σ_b dG_{b,h}ᵀ (Q+v)_{b,h}: one GEMM per head over the B·T rows.
        nonisolated(unsafe) let dr = dr
        HostRuntime.parallelFor(Int64(heads)) { lo, hi in
            for h in Int(lo)..<Int(hi) {
                cblas_sgemm(
                    CblasRowMajor, CblasTrans, CblasNoTrans, Int32(keys), Int32(dh), Int32(b * t), 1,
                    dgAll + h * b * t * keys, Int32(keys), qvAll + h * b * t * dh, Int32(dh), 1, dr + h * dh, Int32(c))
            }
        }
    }

    /// One (batch, head) pair's rows in the backward: its slices of qkv, dqkv, r, u, v, P, dY,
    /// its dG (T,K) and Q+v (T,Dh), and its du/dv partial sums.
    struct HeadPointers {
        let q, k, v: UnsafePointer<Float>
        let dq, dk, dv: UnsafeMutablePointer<Float>
        let r, u, vBias, p, dy: UnsafePointer<Float>
        let dg, qv, du, dvBias: UnsafeMutablePointer<Float>
    }

    /// The backward of query rows `rows` (a block) of one pair; `work` holds 2·block·Dh + block·K floats.
    static func backwardBlock(
        _ x: HeadPointers, rows range: Range<Int>, t: Int, mem: Int, c: Int, dh: Int, scale: Float,
        work: UnsafeMutablePointer<Float>
    ) {
        let (i0, i1, rows) = (range.lowerBound, range.upperBound, range.count)
        let ld = 3 * c, keys = mem + t, seenMax = mem + i1
        let qu = work, dq = work + block * dh, ds = dq + block * dh
        biased(qu, x.q + i0 * ld, ld: ld, x.u, rows: rows, dh: dh)
        biased(x.qv + i0 * dh, x.q + i0 * ld, ld: ld, x.vBias, rows: rows, dh: dh)
        // dV[0..<seenMax] += P[i0..<i1]ᵀ dY[i0..<i1]
        cblas_sgemm(
            CblasRowMajor, CblasTrans, CblasNoTrans, Int32(seenMax), Int32(dh), Int32(rows), 1,
            x.p + i0 * keys, Int32(keys), x.dy + i0 * c, Int32(c), 1, x.dv, Int32(ld))
        // dP = dY[i0..<i1] V[0..<seenMax]ᵀ  (rows, seenMax) → dS in place
        cblas_sgemm(
            CblasRowMajor, CblasNoTrans, CblasTrans, Int32(rows), Int32(seenMax), Int32(dh), 1,
            x.dy + i0 * c, Int32(c), x.v, Int32(ld), 0, ds, Int32(seenMax))
        for i in i0..<i1 {
            let seen = mem + i + 1, prow = x.p + i * keys, drow = ds + (i - i0) * seenMax
            let dot = Vec.dot(prow, drow, seen)
            Attention.softmaxBackwardRow(drow, prow, dot: dot, scale: scale, count: seen)
            (drow + seen).update(repeating: 0, count: seenMax - seen)
            // dG[i, T−1−i+j] = dS_ij
            (x.dg + i * keys + (t - 1 - i)).update(from: drow, count: seen)
        }
        // dK[0..<seenMax] += dSᵀ (Q+u)
        cblas_sgemm(
            CblasRowMajor, CblasTrans, CblasNoTrans, Int32(seenMax), Int32(dh), Int32(rows), 1,
            ds, Int32(seenMax), qu, Int32(dh), 1, x.dk, Int32(ld))
        // dQ via u: dS K;  via v: dG[i0..<i1, T−i1 ..< K] r[T−i1 ..< K]
        cblas_sgemm(
            CblasRowMajor, CblasNoTrans, CblasNoTrans, Int32(rows), Int32(dh), Int32(seenMax), 1,
            ds, Int32(seenMax), x.k, Int32(ld), 0, dq, Int32(dh))
        for rr in 0..<rows {
            Vec.add(x.du, dq + rr * dh, dh)
            Vec.add(x.dq + (i0 + rr) * ld, dq + rr * dh, dh)
        }
        cblas_sgemm(
            CblasRowMajor, CblasNoTrans, CblasNoTrans, Int32(rows), Int32(dh), Int32(seenMax), 1,
            x.dg + i0 * keys + (t - i1), Int32(keys), x.r + (t - i1) * c, Int32(c), 0, dq, Int32(dh))
        for rr in 0..<rows {
            Vec.add(x.dvBias, dq + rr * dh, dh)
            Vec.add(x.dq + (i0 + rr) * ld, dq + rr * dh, dh)
        }
    }
}
