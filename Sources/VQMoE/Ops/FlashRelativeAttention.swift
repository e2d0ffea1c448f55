import CBLAS
import Foundation

/// Transformer-XL's relative attention (`RelativeAttention`'s equations) computed blockwise, as
/// `FlashAttention` computes plain attention: O(T·d) saved instead of the (B,H,T,K) probabilities.
///
///     S_ij = ((q_i + u)·k_j + (q_i + v)·r_{T−1−i+j}) / √Dh,  key j ≤ M + i (K = M + T keys)
///     per query block i (≤ 64 rows) and key block j (≤ 512 rows): AC = (Q_i + u) K_jᵀ, and the
///     position term from the r rows of the block's distances only, a slice of rows + cols − 1:
///         G = (Q_i + v) r[T − i1 + j0 ..]ᵀ,  BD_ij = G[i − i0, (i1 − 1 − i) + (j − j0)]
///     forward: the online softmax of `FlashAttention` → y (B,T,C), lse (B,H,T)
///     backward: P = exp(S − lse), dV_j += Pᵀ dY_i, dS = P ⊙ (dY_i V_jᵀ − D_i)/√Dh,
///               dK_j += dSᵀ (Q_i + u), dQ_i += dS K_j + dG r (du, dv: their row sums),
///               dG scatters dS back onto the distances, dr_slice += dGᵀ (Q_i + v)
///
/// dr and du, dv are summed per (batch, head) pair and then over the pairs in a fixed order, so
/// results do not depend on the thread count.
///
/// ```swift
/// FlashRelativeAttention.forward(y: y, lse: lse, qkv: qkv, r: r, u: u, v: v, b: B, t: T, mem: M, c: C, heads: H)
/// ```
public enum FlashRelativeAttention {
    static let queryBlock = 64, keyBlock = 512

    /// Whether `RelativeSelfAttention` runs this blockwise attention over `keys` (memory + segment):
    /// from `FlashAttention.minimumLength`, below which `RelativeAttention` is faster.
    public static func applies(keys: Int) -> Bool { keys >= FlashAttention.minimumLength }

    /// Pointers of one (batch, head) pair and its query block's biased queries.
    struct Pair {
        let q, k, v, r: UnsafePointer<Float>
        let qu, qv: UnsafeMutablePointer<Float>
    }

    /// S (rows, cols) of query rows i0..<i1 against keys j0..<j1 (row stride `keyBlock`), scaled
    /// where visible; `seen[r]` = how many leading keys row r sees (the rest of the row is left
    /// unset for the caller to zero). `g` receives the position term's slice (row stride
    /// queryBlock + keyBlock).
    @inline(__always) static func scores(
        _ x: Pair, s: UnsafeMutablePointer<Float>, g: UnsafeMutablePointer<Float>, i0: Int, i1: Int, j0: Int,
        j1: Int, t: Int, mem: Int, c: Int, dh: Int, scale: Float, seen: UnsafeMutablePointer<Int>
    ) {
        let rows = i1 - i0, cols = j1 - j0, ld = 3 * c, bk = keyBlock, ldg = queryBlock + keyBlock
        let keys = mem + t, rStart = t - i1 + j0, gRows = min(rows + cols - 1, keys - rStart)
        cblas_sgemm(
            CblasRowMajor, CblasNoTrans, CblasTrans, Int32(rows), Int32(cols), Int32(dh), 1,
            x.qu, Int32(dh), x.k + j0 * ld, Int32(ld), 0, s, Int32(bk))
        cblas_sgemm(
            CblasRowMajor, CblasNoTrans, CblasTrans, Int32(rows), Int32(gRows), Int32(dh), 1,
            x.qv, Int32(dh), x.r + rStart * c, Int32(c), 0, g, Int32(ldg))
        for rr in 0..<rows {
            let i = i0 + rr, n = max(0, min(cols, mem + i + 1 - j0))
            seen[rr] = n
            let row = s + rr * bk
            Vec.add(row, g + rr * ldg + (i1 - 1 - i), n)
            Vec.scale(row, scale, n)
        }
    }

    public static func forward(
        y: UnsafeMutablePointer<Float>, lse: UnsafeMutablePointer<Float>, qkv: UnsafePointer<Float>,
        r: UnsafePointer<Float>, u: UnsafePointer<Float>, v: UnsafePointer<Float>,
        b: Int, t: Int, mem: Int, c: Int, heads: Int
    ) {
        let dh = c / heads, scale = 1 / Float(dh).squareRoot(), ld = 3 * c, keys = mem + t
        let bq = queryBlock, bk = keyBlock, ldg = bq + bk
        nonisolated(unsafe) let (y, lse) = (y, lse)
        HostRuntime.parallelFor(Int64(b * heads)) { lo, hi in
            let work = UnsafeMutablePointer<Float>.allocate(capacity: bq * bk + bq * ldg + 3 * bq * dh + 2 * bq)
            let seen = UnsafeMutablePointer<Int>.allocate(capacity: bq)
            defer { work.deallocate(); seen.deallocate() }
            let s = work, g = s + bq * bk, qu = g + bq * ldg, qv = qu + bq * dh, acc = qv + bq * dh
            let m = acc + bq * dh, l = m + bq
            for pair in Int(lo)..<Int(hi) {
                let bi = pair / heads, h = pair % heads
                let kb = qkv + bi * keys * ld + h * dh
                let x = Pair(q: kb + mem * ld, k: kb + c, v: kb + 2 * c, r: r + h * dh, qu: qu, qv: qv)
                let out = y + bi * t * c + h * dh, rowLSE = lse + pair * t
                var i0 = 0
                while i0 < t {
                    let i1 = min(i0 + bq, t), rows = i1 - i0, seenMax = mem + i1
                    RelativeAttention.biased(qu, x.q + i0 * ld, ld: ld, u + h * dh, rows: rows, dh: dh)
                    RelativeAttention.biased(qv, x.q + i0 * ld, ld: ld, v + h * dh, rows: rows, dh: dh)
                    var j0 = 0
                    while j0 < seenMax {
                        let j1 = min(j0 + bk, seenMax), cols = j1 - j0
                        scores(
                            x, s: s, g: g, i0: i0, i1: i1, j0: j0, j1: j1, t: t, mem: mem, c: c, dh: dh, scale: scale,
                            seen: seen)
                        for rr in 0..<rows {
                            FlashAttention.onlineSoftmaxRow(
                                s + rr * bk, seen: seen[rr], cols: cols, first: j0 == 0, m: m + rr, l: l + rr,
                                acc: acc + rr * dh, dh: dh)
                        }
                        cblas_sgemm(
                            CblasRowMajor, CblasNoTrans, CblasNoTrans, Int32(rows), Int32(dh), Int32(cols), 1,
                            s, Int32(bk), x.v + j0 * ld, Int32(ld), j0 == 0 ? 0 : 1, acc, Int32(dh))
                        j0 = j1
                    }
                    FlashAttention.finishRows(
                        out: out + i0 * c, ld: c, lse: rowLSE + i0, acc: acc, m: m, l: l, rows: rows, dh: dh)
                    i0 = i1
                }
            }
        }
    }

    /// Floats of backward scratch: per pair dr (K,Dh) and du, dv (Dh each).
    public static func scratchCount(b: Int, t: Int, mem: Int, c: Int, heads: Int) -> Int {
        b * heads * ((mem + t) * (c / heads) + 2 * (c / heads))
    }

    /// Accumulates into dqkv (B,K,3C), dr (K,C), du and dv (C); `scratch` holds `scratchCount` floats.
    public static func backward(
        dqkv: UnsafeMutablePointer<Float>, dr: UnsafeMutablePointer<Float>,
        du: UnsafeMutablePointer<Float>, dv: UnsafeMutablePointer<Float>,
        dy: UnsafePointer<Float>, y: UnsafePointer<Float>, lse: UnsafePointer<Float>, qkv: UnsafePointer<Float>,
        r: UnsafePointer<Float>, u: UnsafePointer<Float>, v: UnsafePointer<Float>,
        b: Int, t: Int, mem: Int, c: Int, heads: Int, scratch: UnsafeMutablePointer<Float>
    ) {
        let dh = c / heads, keys = mem + t, per = keys * dh + 2 * dh, ld = 3 * c
        scratch.update(repeating: 0, count: b * heads * per)
        nonisolated(unsafe) let (dqkv, sums) = (dqkv, scratch)
        HostRuntime.parallelFor(Int64(b * heads)) { lo, hi in
            let bq = queryBlock, bk = keyBlock, ldg = bq + bk
            let work = UnsafeMutablePointer<Float>.allocate(capacity: 2 * bq * bk + 2 * bq * ldg + 3 * bq * dh + t)
            let seen = UnsafeMutablePointer<Int>.allocate(capacity: bq)
            defer { work.deallocate(); seen.deallocate() }
            let p = work, ds = p + bq * bk, g = ds + bq * bk, dg = g + bq * ldg
            let qu = dg + bq * ldg, qv = qu + bq * dh, tmp = qv + bq * dh, dd = tmp + bq * dh
            for pair in Int(lo)..<Int(hi) {
                let bi = pair / heads, h = pair % heads
                let kb = qkv + bi * keys * ld + h * dh, dkb = dqkv + bi * keys * ld + h * dh
                let x = Pair(q: kb + mem * ld, k: kb + c, v: kb + 2 * c, r: r + h * dh, qu: qu, qv: qv)
                let own = sums + pair * per
                let w = Work(p: p, ds: ds, g: g, dg: dg, tmp: tmp, dd: dd, seen: seen, dr: own, du: own + keys * dh)
                let grads = Grads(
                    dq: dkb + mem * ld, dk: dkb + c, dv: dkb + 2 * c, dy: dy + bi * t * c + h * dh,
                    y: y + bi * t * c + h * dh, lse: lse + pair * t)
                pairBackward(x, grads, w, u: u + h * dh, v: v + h * dh, t: t, mem: mem, c: c, dh: dh)
            }
        }
        // Per-pair sums added in a fixed order (independent of the thread count).
        for pair in 0..<(b * heads) {
            let h = pair % heads, own = sums + pair * per
            for j in 0..<keys { Vec.add(dr + j * c + h * dh, own + j * dh, dh) }
            Vec.add(du + h * dh, own + keys * dh, dh)
            Vec.add(dv + h * dh, own + keys * dh + dh, dh)
        }
    }

    /// A pair's gradient pointers: dQ of the segment rows, dK and dV of every key row, dY, y, lse.
    struct Grads {
        let dq, dk, dv: UnsafeMutablePointer<Float>
        let dy, y, lse: UnsafePointer<Float>
    }

    /// A thread's blocks (P, dS, G, dG, a (rows,Dh) temporary, D) and the pair's dr (K,Dh), du, dv (Dh).
    struct Work {
        let p, ds, g, dg, tmp, dd: UnsafeMutablePointer<Float>
        let seen: UnsafeMutablePointer<Int>
        let dr, du: UnsafeMutablePointer<Float>
    }

    /// The backward of one (batch, head) pair, query block by query block.
    static func pairBackward(
        _ x: Pair, _ gr: Grads, _ w: Work, u: UnsafePointer<Float>, v: UnsafePointer<Float>, t: Int, mem: Int,
        c: Int, dh: Int
    ) {
        let scale = 1 / Float(dh).squareRoot(), ld = 3 * c, keys = mem + t
        let bq = queryBlock, bk = keyBlock, ldg = bq + bk, dvBias = w.du + dh
        for i in 0..<t { w.dd[i] = Vec.dot(gr.dy + i * c, gr.y + i * c, dh) }
        var i0 = 0
        while i0 < t {
            let i1 = min(i0 + bq, t), rows = i1 - i0, seenMax = mem + i1
            RelativeAttention.biased(x.qu, x.q + i0 * ld, ld: ld, u, rows: rows, dh: dh)
            RelativeAttention.biased(x.qv, x.q + i0 * ld, ld: ld, v, rows: rows, dh: dh)
            var j0 = 0
            while j0 < seenMax {
                let j1 = min(j0 + bk, seenMax), cols = j1 - j0
                let rStart = t - i1 + j0, gRows = min(rows + cols - 1, keys - rStart)
                scores(
                    x, s: w.p, g: w.g, i0: i0, i1: i1, j0: j0, j1: j1, t: t, mem: mem, c: c, dh: dh, scale: scale,
                    seen: w.seen)
                for rr in 0..<rows {
                    let row = w.p + rr * bk, n = w.seen[rr]
                    _ = VecMath.expInPlace(row, count: n, subtracting: gr.lse[i0 + rr])
                    (row + n).update(repeating: 0, count: cols - n)
                }
                // dV_j += Pᵀ dY_i;  dP = dY_i V_jᵀ → dS
                cblas_sgemm(
                    CblasRowMajor, CblasTrans, CblasNoTrans, Int32(cols), Int32(dh), Int32(rows), 1,
                    w.p, Int32(bk), gr.dy + i0 * c, Int32(c), 1, gr.dv + j0 * ld, Int32(ld))
                cblas_sgemm(
                    CblasRowMajor, CblasNoTrans, CblasTrans, Int32(rows), Int32(cols), Int32(dh), 1,
                    gr.dy + i0 * c, Int32(c), x.v + j0 * ld, Int32(ld), 0, w.ds, Int32(bk))
                w.dg.update(repeating: 0, count: rows * ldg)
                for rr in 0..<rows {
                    let i = i0 + rr, drow = w.ds + rr * bk
                    Attention.softmaxBackwardRow(drow, w.p + rr * bk, dot: w.dd[i], scale: scale, count: cols)
                    (w.dg + rr * ldg + (i1 - 1 - i)).update(from: drow, count: w.seen[rr])  // dG[i, i1−1−i+j] = dS_ij
                }
                // dK_j += dSᵀ (Q_i + u)
                cblas_sgemm(
                    CblasRowMajor, CblasTrans, CblasNoTrans, Int32(cols), Int32(dh), Int32(rows), 1,
                    w.ds, Int32(bk), x.qu, Int32(dh), 1, gr.dk + j0 * ld, Int32(ld))
                // dQ via u: dS K_j (its row sums: du);  via v: dG r_slice (row sums: dv)
                cblas_sgemm(
                    CblasRowMajor, CblasNoTrans, CblasNoTrans, Int32(rows), Int32(dh), Int32(cols), 1,
                    w.ds, Int32(bk), x.k + j0 * ld, Int32(ld), 0, w.tmp, Int32(dh))
                for rr in 0..<rows {
                    Vec.add(w.du, w.tmp + rr * dh, dh)
                    Vec.add(gr.dq + (i0 + rr) * ld, w.tmp + rr * dh, dh)
                }
                cblas_sgemm(
                    CblasRowMajor, CblasNoTrans, CblasNoTrans, Int32(rows), Int32(dh), Int32(gRows), 1,
                    w.dg, Int32(ldg), x.r + rStart * c, Int32(c), 0, w.tmp, Int32(dh))
                for rr in 0..<rows {
                    Vec.add(dvBias, w.tmp + rr * dh, dh)
                    Vec.add(gr.dq + (i0 + rr) * ld, w.tmp + rr * dh, dh)
                }
                // dr_slice += dGᵀ (Q_i + v)
                cblas_sgemm(
                    CblasRowMajor, CblasTrans, CblasNoTrans, Int32(gRows), Int32(dh), Int32(rows), 1,
                    w.dg, Int32(ldg), x.qv, Int32(dh), 1, w.dr + rStart * dh, Int32(dh))
                j0 = j1
            }
            i0 = i1
        }
    }
}
