// Train-split sampling: an endless stream of epochs, each a seeded permutation.
import VQMoEABI

/// The order in which training examples are visited. Position p of the stream (p = i·B + r
/// for row r of train batch i) is example perm_e[p mod N] with e = p div N, and perm_e is a
/// Fisher–Yates shuffle of 0..<N drawn from the host RNG seeded (instance seed, stream e):
///
///     for j = N−1 down to 1:  k = ⌊u64 · (j+1) / 2^64⌋  (Lemire's multiply-shift);  swap(perm[j], perm[k])
///
/// so a batch is a pure function of (seed, index, batch size): any index can be read in any
/// order and a resumed run reads the same batches. The last two permutations are cached
/// (the cache never changes results).
public final class EpochSampler {
    public let host: Host
    public let seed: UInt64
    /// N: training examples.
    public let count: Int
    private var cache: [(epoch: Int64, perm: [Int32])] = []

    /// `who` prefixes the failure of a host without rng_next_u64.
    public init(host: Host, seed: UInt64, count: Int, who: String) throws(PluginFailure) {
        guard host.api.pointee.rng_next_u64 != nil else {
            throw .invalid("\(who): the host API table lacks rng_next_u64")
        }
        self.host = host; self.seed = seed; self.count = count
    }

    /// perm_e: a permutation of 0..<N (N).
    public func permutation(_ epoch: Int64) -> [Int32] {
        if let hit = cache.first(where: { $0.epoch == epoch }) { return hit.perm }
        var perm = (0..<count).map { Int32($0) }
        var rng = host.rng(seed: seed, stream: UInt64(epoch))
        let next = host.api.pointee.rng_next_u64!
        perm.withUnsafeMutableBufferPointer { p in
            var j = count - 1
            while j >= 1 {
                let k = Int(next(&rng).multipliedFullWidth(by: UInt64(j + 1)).high)
                p.swapAt(j, k)
                j -= 1
            }
        }
        if cache.count == 2 { cache.removeFirst() }
        cache.append((epoch, perm))
        return perm
    }

    /// The training examples at stream positions [start, start + n) (n).
    public func examples(from start: Int64, count n: Int) -> [Int] {
        var out: [Int] = []
        out.reserveCapacity(n)
        var p = start
        let N = Int64(count)
        while out.count < n {
            let epoch = p / N
            let perm = permutation(epoch)
            var k = Int(p % N)
            while k < count && out.count < n {
                out.append(Int(perm[k]))
                k += 1
                p += 1
            }
        }
        return out
    }
}

extension Batch {
    /// The examples this batch covers, for datasets of indexed examples: train batch i = stream
    /// positions [i·B, (i+1)·B) of `sampler`; a valid / test batch walks its split in order
    /// (the kit has checked the index), the last one possibly partial. Indices are into the
    /// split, plus `validOffset` for valid examples (a valid split that is the tail of the
    /// training file).
    public func examples(_ sampler: EpochSampler, validOffset: Int = 0) throws(PluginFailure) -> [Int] {
        if split == .train {
            let (start, overflow) = index.multipliedReportingOverflow(by: Int64(size))
            guard !overflow, start <= Int64.max - Int64(size) else {
                throw .invalid("train batch \(index) of \(size) is beyond the 2^63 stream positions")
            }
            return sampler.examples(from: start, count: size)
        }
        let first = Int(index) * size, offset = split == .valid ? validOffset : 0
        return (first..<min(first + size, splitSize)).map { offset + $0 }
    }
}
