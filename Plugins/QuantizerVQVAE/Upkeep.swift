// vqvae's codebook upkeep: EMA updates, k-means initialisation and dead-code restart, all in the
// kit (`CodebookUpkeep`, PluginKit/CodebookUpkeep.swift, shared with vqgan_cos and rvq), applied
// to the input vectors x and the codebook (K,d).
import PluginKit
import VQMoEABI

extension VQVAE {
    var upkeep: CodebookUpkeep {
        CodebookUpkeep(
            host: host, k: k, width: d, decay: emaDecay, epsilon: emaEpsilon, kmeansIters: kmeansIters,
            deadCodeThreshold: deadCodeThreshold)
    }

    /// The EMA update of `CodebookUpkeep.emaUpdate` on this rank's x and codes (no EMA: nothing).
    func emaUpdate(
        x: UnsafePointer<Float>, codes: UnsafePointer<Int32>, globalCounts counts: [Float], n: Int, globalN: Int
    ) throws(PluginFailure) {
        guard let emaCount, let emaSum else { return }
        try upkeep.emaUpdate(
            codebook: codebook, count: emaCount, sum: emaSum, x: x, codes: codes, globalCounts: counts, n: n,
            globalN: globalN)
    }

    /// `CodebookUpkeep.restartDeadCodes` on the global batch rows x (n,d).
    func restartDeadCodes(x: UnsafePointer<Float>, n: Int, seed: UInt64) throws(PluginFailure) -> Int {
        guard let emaCount, let emaSum else { return 0 }
        return try upkeep.restartDeadCodes(codebook: codebook, count: emaCount, sum: emaSum, x: x, n: n, seed: seed)
    }

    /// `CodebookUpkeep.kmeans` on the global batch rows x (n,d); with EMA its state restarts from the centres.
    func kmeansInitialize(x: UnsafePointer<Float>, n: Int, seed: UInt64) throws(PluginFailure) {
        try upkeep.kmeans(codebook: codebook, count: emaCount, sum: emaSum, x: x, n: n, seed: seed)
    }
}
