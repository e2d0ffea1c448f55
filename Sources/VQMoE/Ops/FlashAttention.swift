import CBLAS
import CKernels
import Foundation

/// Blockwise ("flash") multi-head self-attention over a fused qkv buffer, causal or full, in
/// O(T·d) saved memory (FlashAttention, Dao et al. 2022, with FlashAttention-2's loop order):
///
///     qkv (B,T,3C) = [Q | K | V], head h uses columns h·Dh ..< (h+1)·Dh of each, Dh = C/H
///     forward, per query block Q_i, over key blocks K_j, V_j:
///         S = Q_i K_jᵀ/√Dh (causal: key ≤ query),  m' = max(m, rowmax S),
///         P = exp(S − m'),  ℓ = ℓ·e^(m−m') + rowsum P,  A = A·e^(m−m') + P V_j,  m = m'
///         y_i = A / ℓ,  lse_i = m + log ℓ            → y (B,T,C), lse (B,H,T) saved
///     backward, with D = rowsum(dY ⊙ Y), recomputing P = exp(Q_i K_jᵀ/√Dh − lse_i) per block:
///         dV_j += Pᵀ dY_i,  dP = dY_i V_jᵀ,  dS = P ⊙ (dP − D_i)/√Dh,
///         dQ_i += dS K_j,  dK_j += dSᵀ Q_i
///
/// Two kernels compute it (`Kernel`), on the host pool:
/// - `.registerTiles` (the default where the CPU has AVX2 + FMA and Dh is a multiple of 8):
///   CKernels' `vk_flash_forward` / `vk_flash_backward`, the same loop in C over 48- or 96-row
///   query blocks and key chunks, every product a 6 × 16 register tile, the scores of 6 query rows
///   at a time kept in L1, Kᵀ and Vᵀ packed once per pair, a causal mask applied per 6-row tile. No
///   BLAS call per block (with 32-dimensional heads OpenBLAS's packing and zeroing of C cost a third
///   of the time), so it is faster than `Attention` at every length measured, 256 included. The
///   forward is split over (batch, head, query block); the backward over (batch, head) pairs, as
///   PyTorch's CPU flash attention does: a split over query blocks would need a partial dK and dV
///   per split (memory) summed in an order that depends on the split (bits).
/// - `.blas`: the Swift loop below, 64-row query blocks × 512-key blocks through OpenBLAS, split
///   over (batch, head) pairs; a block of S (128 KiB) with its key and value rows stays in one
///   core's L2; causal key blocks after a query block skipped. Any CPU, any head size; used from
///   `minimumLength` keys.
///
/// Nothing of size T² is kept: the backward recomputes the scores (one more Q Kᵀ product) instead
/// of reading saved P. `Attention` (which saves P) is the reference the tests check both against.
///
/// ```swift
/// FlashAttention.forward(y: y, lse: lse, qkv: qkv, b: B, t: T, c: C, heads: H)
/// FlashAttention.backward(dqkv: dqkv, dy: dy, y: y, lse: lse, qkv: qkv, b: B, t: T, c: C, heads: H)
/// ```
public enum FlashAttention {
    /// Query rows and key rows per block of the `.blas` kernel.
    static let queryBlock = 64, keyBlock = 512
    /// The number of keys from which the BLAS kernels (this file's `.blas` loop and
    /// `FlashRelativeAttention`) beat the saved-probability ones (`Attention`, `RelativeAttention`):
    /// below it the saved probabilities are small (B·H·T·K floats) and need no recomputation of the
    /// scores in the backward (4% of a training step at T = 256 on the bench model).
    public static let minimumLength = 512

    /// Whether `SelfAttention` runs this blockwise attention for `t` tokens of head size `dh`:
    /// always with the register tiles (faster than `Attention` at every length measured, 256
    /// included), from `minimumLength` with BLAS.
    public static func applies(t: Int, dh: Int) -> Bool {
        defaultKernel(dh: dh) == .registerTiles || t >= minimumLength
    }

    /// How a call computes its blocks: `.registerTiles` runs CKernels' AVX2 + FMA register tiles
    /// (`vk_flash_forward` / `vk_flash_backward`: the same loop in C, each score tile kept in L1,
    /// no BLAS call per block); `.blas` runs the Swift loop below over OpenBLAS GEMMs, on any CPU
    /// and any head size.
    public enum Kernel: Sendable { case blas, registerTiles }

    /// Whether this CPU runs the AVX2 + FMA kernels.
    public static let registerTilesAvailable = vk_has_avx2_fma() != 0

    /// The kernel calls without an explicit `kernel` run: register tiles where the CPU has them and
    /// the head size Dh is a multiple of 8, else BLAS.
    public static func defaultKernel(dh: Int) -> Kernel {
        registerTilesAvailable && dh % 8 == 0 ? .registerTiles : .blas
    }

    /// y (B,T,C) and the log-sum-exp of every score row, lse (B,H,T), for qkv (B,T,3C).
    public static func forward(
        y: UnsafeMutablePointer<Float>, lse: UnsafeMutablePointer<Float>, qkv: UnsafePointer<Float>,
        b: Int, t: Int, c: Int, heads: Int, causal: Bool = true, kernel: Kernel? = nil
    ) {
        let dh = c / heads, scale = 1 / Float(dh).squareRoot(), ld = 3 * c
        let bq = queryBlock, bk = keyBlock
        nonisolated(unsafe) let (y, lse) = (y, lse)
        if checkedKernel(kernel, dh: dh) == .registerTiles {
            registerTileForward(y: y, lse: lse, qkv: qkv, b: b, t: t, c: c, heads: heads, causal: causal)
            return
        }
        HostRuntime.parallelFor(Int64(b * heads)) { lo, hi in
            // S (bq,bk), the accumulator A (bq,Dh), the running max m and sum ℓ (bq)
            let s = UnsafeMutablePointer<Float>.allocate(capacity: bq * bk + bq * dh + 2 * bq)
            defer { s.deallocate() }
            let acc = s + bq * bk, m = acc + bq * dh, l = m + bq
            for pair in Int(lo)..<Int(hi) {
                let bi = pair / heads, h = pair % heads
                let q = qkv + bi * t * ld + h * dh, k = q + c, v = q + 2 * c
                let out = y + bi * t * c + h * dh, rowLSE = lse + pair * t
                var i0 = 0
                while i0 < t {
                    let i1 = min(i0 + bq, t), rows = i1 - i0
                    let keys = causal ? i1 : t
                    var j0 = 0
                    while j0 < keys {
                        let j1 = min(j0 + bk, keys), cols = j1 - j0
                        scoreBlock(s, q: q, k: k, ld: ld, i0: i0, rows: rows, j0: j0, cols: cols, dh: dh, scale: scale)
                        for r in 0..<rows {
                            onlineSoftmaxRow(
                                s + r * bk, seen: visible(i0 + r, j0: j0, cols: cols, causal: causal), cols: cols,
                                first: j0 == 0, m: m + r, l: l + r, acc: acc + r * dh, dh: dh)
                        }
                        // A (+)= P V_j
                        cblas_sgemm(
                            CblasRowMajor, CblasNoTrans, CblasNoTrans, Int32(rows), Int32(dh), Int32(cols), 1,
                            s, Int32(bk), v + j0 * ld, Int32(ld), j0 == 0 ? 0 : 1, acc, Int32(dh))
                        j0 = j1
                    }
                    finishRows(out: out + i0 * c, ld: c, lse: rowLSE + i0, acc: acc, m: m, l: l, rows: rows, dh: dh)
                    i0 = i1
                }
            }
        }
    }

    /// The forward on register tiles, split over (batch, head, query block): Kᵀ of every pair is
    /// packed first (B·H·T·Dh floats, freed on return), then each item computes one block of
    /// `VK_FLASH_QUERY_BLOCK` query rows. Rows are independent, so the split changes no bits. A
    /// pair's blocks are taken in zig-zag order (first, last, second, second-to-last, …) so a
    /// thread's contiguous range of items mixes cheap and costly causal blocks when B·H is small.
    static func registerTileForward(
        y: UnsafeMutablePointer<Float>, lse: UnsafeMutablePointer<Float>, qkv: UnsafePointer<Float>,
        b: Int, t: Int, c: Int, heads: Int, causal: Bool
    ) {
        let dh = c / heads, scale = 1 / Float(dh).squareRoot(), ld = 3 * c, pairs = b * heads
        let rows = Int(VK_FLASH_QUERY_BLOCK), blocks = (t + rows - 1) / rows
        let panels = vk_flash_panels(Int32(t), Int32(dh))
        nonisolated(unsafe) let kt = UnsafeMutablePointer<Float>.allocate(capacity: pairs * panels)
        defer { kt.deallocate() }
        HostRuntime.parallelFor(Int64(pairs)) { lo, hi in
            for pair in Int(lo)..<Int(hi) {
                let bi = pair / heads, h = pair % heads
                vk_flash_pack(qkv + bi * t * ld + c + h * dh, ld, Int32(t), Int32(dh), kt + pair * panels)
            }
        }
        HostRuntime.parallelFor(Int64(pairs * blocks)) { lo, hi in
            let work = UnsafeMutablePointer<Float>.allocate(capacity: vk_flash_forward_workspace(Int32(dh)))
            defer { work.deallocate() }
            for item in Int(lo)..<Int(hi) {
                let pair = item / blocks, j = item % blocks, bi = pair / heads, h = pair % heads
                let block = j % 2 == 0 ? j / 2 : blocks - 1 - j / 2
                let row0 = block * rows, row1 = min(t, row0 + rows)
                let q = qkv + bi * t * ld + h * dh
                vk_flash_forward(
                    q, kt + pair * panels, q + 2 * c, ld, Int32(t), Int32(dh), scale, causal ? 1 : 0, Int32(row0),
                    Int32(row1), y + bi * t * c + h * dh, c, lse + pair * t, work)
            }
        }
    }

    /// `kernel`, or the default for `dh`; register tiles need the CPU's AVX2 + FMA and Dh % 8 = 0.
    static func checkedKernel(_ kernel: Kernel?, dh: Int) -> Kernel {
        let chosen = kernel ?? defaultKernel(dh: dh)
        precondition(
            chosen == .blas || (registerTilesAvailable && dh % 8 == 0),
            "register-tile attention needs AVX2 + FMA and a head size that is a multiple of 8 (Dh = \(dh))")
        return chosen
    }

    /// S (rows, cols) = Q_i K_jᵀ / √Dh for query rows i0 ..< i0 + rows and keys j0 ..< j0 + cols,
    /// row stride `keyBlock` (the `.blas` kernel's forward and backward).
    @inline(__always) static func scoreBlock(
        _ s: UnsafeMutablePointer<Float>, q: UnsafePointer<Float>, k: UnsafePointer<Float>, ld: Int, i0: Int,
        rows: Int, j0: Int, cols: Int, dh: Int, scale: Float
    ) {
        cblas_sgemm(
            CblasRowMajor, CblasNoTrans, CblasTrans, Int32(rows), Int32(cols), Int32(dh), scale,
            q + i0 * ld, Int32(ld), k + j0 * ld, Int32(ld), 0, s, Int32(keyBlock))
    }

    /// How many of the `cols` keys from j0 query row i sees (causal: keys ≤ i).
    @inline(__always) static func visible(_ i: Int, j0: Int, cols: Int, causal: Bool) -> Int {
        causal ? Swift.max(0, min(cols, i + 1 - j0)) : cols
    }

    /// One row of an S block in the online softmax: its first `seen` scores become
    /// P = exp(S − m') (the rest of the `cols` 0), the running max m and sum ℓ move on, and the
    /// row's accumulator A is rescaled by e^(m − m') (`first`: the row's first block, nothing to rescale).
    @inline(__always) static func onlineSoftmaxRow(
        _ row: UnsafeMutablePointer<Float>, seen: Int, cols: Int, first: Bool, m: UnsafeMutablePointer<Float>,
        l: UnsafeMutablePointer<Float>, acc: UnsafeMutablePointer<Float>, dh: Int
    ) {
        guard seen > 0 else {
            row.update(repeating: 0, count: cols)
            return
        }
        let mOld = first ? -Float.infinity : m.pointee
        let mNew = Swift.max(mOld, VecMath.max(row, count: seen))
        let sum = VecMath.expInPlace(row, count: seen, subtracting: mNew)
        (row + seen).update(repeating: 0, count: cols - seen)
        if first {
            l.pointee = sum
        } else {
            let corr = expf(mOld - mNew)
            l.pointee = l.pointee * corr + sum
            if corr != 1 { Vec.scale(acc, corr, dh) }
        }
        m.pointee = mNew
    }

    /// The outputs of a query block's `rows` (row stride `ld`): y = A / ℓ, lse = m + log ℓ.
    @inline(__always) static func finishRows(
        out: UnsafeMutablePointer<Float>, ld: Int, lse: UnsafeMutablePointer<Float>, acc: UnsafePointer<Float>,
        m: UnsafePointer<Float>, l: UnsafePointer<Float>, rows: Int, dh: Int
    ) {
        for r in 0..<rows {
            let o = out + r * ld
            o.update(from: acc + r * dh, count: dh)
            Vec.scale(o, 1 / l[r], dh)
            lse[r] = m[r] + logf(l[r])
        }
    }

    /// Accumulates into dqkv (B,T,3C) from dy (B,T,C), the forward's y and lse.
    public static func backward(
        dqkv: UnsafeMutablePointer<Float>, dy: UnsafePointer<Float>, y: UnsafePointer<Float>,
        lse: UnsafePointer<Float>, qkv: UnsafePointer<Float>, b: Int, t: Int, c: Int, heads: Int,
        causal: Bool = true, kernel: Kernel? = nil
    ) {
        let dh = c / heads, scale = 1 / Float(dh).squareRoot(), ld = 3 * c
        let bq = queryBlock, bk = keyBlock
        nonisolated(unsafe) let dqkv = dqkv
        if checkedKernel(kernel, dh: dh) == .registerTiles {
            HostRuntime.parallelFor(Int64(b * heads)) { lo, hi in
                let work = UnsafeMutablePointer<Float>.allocate(
                    capacity: vk_flash_backward_workspace(Int32(t), Int32(dh)))
                defer { work.deallocate() }
                for pair in Int(lo)..<Int(hi) {
                    let bi = pair / heads, h = pair % heads
                    let q = qkv + bi * t * ld + h * dh, dq = dqkv + bi * t * ld + h * dh, row = bi * t * c + h * dh
                    vk_flash_backward(
                        q, q + c, q + 2 * c, ld, dy + row, y + row, c, lse + pair * t, dq, dq + c, dq + 2 * c, Int32(t),
                        Int32(dh), scale, causal ? 1 : 0, work)
                }
            }
            return
        }
        HostRuntime.parallelFor(Int64(b * heads)) { lo, hi in
            // P and dP/dS blocks (bq,bk), D = rowsum(dY ⊙ Y) of the pair's rows (T)
            let p = UnsafeMutablePointer<Float>.allocate(capacity: 2 * bq * bk + t)
            defer { p.deallocate() }
            let ds = p + bq * bk, dd = ds + bq * bk
            for pair in Int(lo)..<Int(hi) {
                let bi = pair / heads, h = pair % heads
                let q = qkv + bi * t * ld + h * dh, k = q + c, v = q + 2 * c
                let dq = dqkv + bi * t * ld + h * dh, dk = dq + c, dv = dq + 2 * c
                let g = dy + bi * t * c + h * dh, o = y + bi * t * c + h * dh, rowLSE = lse + pair * t
                for i in 0..<t { dd[i] = Vec.dot(g + i * c, o + i * c, dh) }
                var i0 = 0
                while i0 < t {
                    let i1 = min(i0 + bq, t), rows = i1 - i0
                    let keys = causal ? i1 : t
                    var j0 = 0
                    while j0 < keys {
                        let j1 = min(j0 + bk, keys), cols = j1 - j0
                        // P = exp(Q_i K_jᵀ/√Dh − lse_i), masked keys 0
                        scoreBlock(p, q: q, k: k, ld: ld, i0: i0, rows: rows, j0: j0, cols: cols, dh: dh, scale: scale)
                        for r in 0..<rows {
                            let row = p + r * bk
                            let seen = visible(i0 + r, j0: j0, cols: cols, causal: causal)
                            _ = VecMath.expInPlace(row, count: seen, subtracting: rowLSE[i0 + r])
                            (row + seen).update(repeating: 0, count: cols - seen)
                        }
                        // dV_j += Pᵀ dY_i;  dP = dY_i V_jᵀ
                        cblas_sgemm(
                            CblasRowMajor, CblasTrans, CblasNoTrans, Int32(cols), Int32(dh), Int32(rows), 1,
                            p, Int32(bk), g + i0 * c, Int32(c), 1, dv + j0 * ld, Int32(ld))
                        cblas_sgemm(
                            CblasRowMajor, CblasNoTrans, CblasTrans, Int32(rows), Int32(cols), Int32(dh), 1,
                            g + i0 * c, Int32(c), v + j0 * ld, Int32(ld), 0, ds, Int32(bk))
                        // dS = P ⊙ (dP − D_i) / √Dh  (masked entries: P = 0)
                        for r in 0..<rows {
                            Attention.softmaxBackwardRow(
                                ds + r * bk, p + r * bk, dot: dd[i0 + r], scale: scale, count: cols)
                        }
                        // dQ_i += dS K_j;  dK_j += dSᵀ Q_i
                        cblas_sgemm(
                            CblasRowMajor, CblasNoTrans, CblasNoTrans, Int32(rows), Int32(dh), Int32(cols), 1,
                            ds, Int32(bk), k + j0 * ld, Int32(ld), 1, dq + i0 * ld, Int32(ld))
                        cblas_sgemm(
                            CblasRowMajor, CblasTrans, CblasNoTrans, Int32(cols), Int32(dh), Int32(rows), 1,
                            ds, Int32(bk), q + i0 * ld, Int32(ld), 1, dk + j0 * ld, Int32(ld))
                        j0 = j1
                    }
                    i0 = i1
                }
            }
        }
    }
}
