// k-means initialisation of the codebook: Lloyd's algorithm on the first training batch
// (as in lucidrains' vector-quantize-pytorch `kmeans_init`; Zeghidour et al. 2021, SoundStream,
// initialise their codebooks the same way).
import PluginKit
import VQMoEABI

extension VQVAE {
    /// Host stream of the k-means initial rows: rng_init(step seed, kmeansStream).
    static let kmeansStream: UInt64 = 0x6B6D_6561_6E73  // "kmeans"

    /// Lloyd's k-means on the batch x (N,d), written into the codebook.
    ///
    /// Initial centres: K distinct rows of x, chosen by a partial Fisher-Yates shuffle of the
    /// row indices with the host stream (seed, kmeansStream): for j = 0..<min(K, N),
    /// p = j + next_u64 % (N - j), swap rows[j] and rows[p], c_j = x[rows[j]]. When N < K the
    /// codes j >= N start from their current codebook value.
    /// Then `kmeans_iters` times: a_t = argmin_j ||x_t - c_j||^2 (ties -> lowest j);
    /// c_j = mean{x_t : a_t = j} (sums in double; an empty cluster keeps its centre). The loop
    /// stops early once an assignment repeats the previous one (the centres are then fixed).
    /// Finally e_j = c_j and, with ema, ema_sum_j = c_j, ema_count_j = 1.
    func kmeansInitialize(x: UnsafePointer<Float>, n: Int, seed: UInt64) throws(PluginFailure) {
        let C = codebook!

        guard n > 0 else { return }
        let centres = try host.scratchFloats(k * d, "k-means centres")  // (K,d)
        centres.update(from: C, count: k * d)
        var r = host.rng(seed: seed, stream: Self.kmeansStream)
        var rows = Array(0..<n)
        for j in 0..<min(k, n) {
            let p = j + Int(host.next(&r) % UInt64(n - j))
            rows.swapAt(j, p)
            (centres + j * d).update(from: x + rows[j] * d, count: d)
        }

        let assign = try host.scratchInts(n, "k-means assignment")  // (N)
        let previous = try host.scratchInts(n, "k-means assignment")  // (N)
        let sqError = try host.scratchDoubles(n, "k-means distances")
        let sums = try host.scratchDoubles(k * d, "k-means sums")  // (K,d)
        let counts = try host.scratchDoubles(k, "k-means counts")  // (K)
        for iter in 0..<kmeansIters {
            try host.nearestCodes(x: x, n: n, d: d, codebook: centres, k: k, codes: assign, sqError: sqError)
            if iter > 0 && (0..<n).allSatisfy({ assign[$0] == previous[$0] }) { break }
            previous.update(from: assign, count: n)
            sums.update(repeating: 0, count: k * d)
            counts.update(repeating: 0, count: k)
            for t in 0..<n {
                let j = Int(assign[t])
                let s = sums + j * d, xt = x + t * d
                for i in 0..<d { s[i] += Double(xt[i]) }
                counts[j] += 1
            }
            for j in 0..<k where counts[j] > 0 {
                let c = centres + j * d, s = sums + j * d
                for i in 0..<d { c[i] = Float(s[i] / counts[j]) }
            }
        }
        C.update(from: centres, count: k * d)
        if let emaSum, let emaCount {
            emaSum.update(from: centres, count: k * d)
            emaCount.update(repeating: 1, count: k)
        }
    }
}
