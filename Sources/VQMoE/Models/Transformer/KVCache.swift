import Foundation

/// The keys and values of every layer for autoregressive inference (`Transformer.decode`): per
/// layer the [Q | K | V] rows of every cached position, (B, capacity, 3C) (the Q third is the
/// projection's output kept in place; only K and V are read back), and how many positions each
/// stream holds. Transformer-XL layers also keep their projected relative encodings for every
/// distance the cache can hold, computed once.
///
/// The positions are those the attention sees: for learned absolute positions, the window of
/// the sequence since its start (at most `seq_len`); for Transformer-XL, the memory and the
/// current segment (at most `mem_len + seq_len`), `keepLast(mem_len)` when a segment ends.
///
/// ```swift
/// let cache = KVCache(model: model, batch: 1)
/// try model.decode(tokens: prompt, batch: 1, t: 64, cache: cache, logits: out)   // then one token at a time
/// ```
public final class KVCache {
    public let batch: Int, capacity: Int, width: Int
    /// Cached positions of every stream (every layer holds the same).
    public internal(set) var length = 0
    let rows: [Storage<Float>]
    /// Transformer-XL: per layer, r (capacity, C) = the sinusoid encodings of the distances
    /// capacity−1 … 0 projected by the layer's W_r (nil until first used).
    var relative: [Storage<Float>?]

    /// A cache for `model`'s layers: `seq_len` positions, or `mem_len + seq_len` for Transformer-XL.
    public init(model: Transformer, batch: Int) {
        let cfg = model.config
        self.batch = batch
        capacity = cfg.seqLen + (cfg.relative ? cfg.memLen : 0)
        width = cfg.dModel
        rows = (0..<cfg.nLayer).map { _ in
            let s = Storage<Float>()
            s.reserve(batch * (cfg.seqLen + (cfg.relative ? cfg.memLen : 0)) * 3 * cfg.dModel)
            return s
        }
        relative = Array(repeating: nil, count: cfg.nLayer)
    }

    /// Layer l's rows, (B, capacity, 3C).
    func layer(_ l: Int) -> UnsafeMutablePointer<Float> { rows[l].pointer }

    /// Write the [Q | K | V] rows (B, t, 3C) of the positions after the cached ones into layer l.
    func append(_ l: Int, qkv: UnsafePointer<Float>, t: Int) {
        let ld = 3 * width
        for bi in 0..<batch {
            (layer(l) + (bi * capacity + length) * ld).update(from: qkv + bi * t * ld, count: t * ld)
        }
    }

    /// Forget every position (a new sequence, or a new window of one).
    public func reset() { length = 0 }

    /// Keep the last `n` positions of every stream, moved to the front (Transformer-XL: the
    /// memory a new segment starts with).
    public func keepLast(_ n: Int) {
        let keep = min(n, length), ld = 3 * width
        guard keep < length else { return }
        for r in rows {
            for bi in 0..<batch {
                let base = r.pointer + bi * capacity * ld
                base.update(from: base + (length - keep) * ld, count: keep * ld)  // forward copy: regions may overlap
            }
        }
        length = keep
    }

    /// Bytes held.
    public var bytes: Int { rows.reduce(0) { $0 + $1.bytes } + relative.reduce(0) { $0 + ($1?.bytes ?? 0) } }
}
