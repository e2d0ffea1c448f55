import Foundation

/// Autoregressive inference with a key/value cache: the rows after the cached positions go
/// through every layer once, their keys and values join the cache, and the head runs on the
/// last row of each stream only. With an empty cache and t = T this computes what `forward`
/// computes (in evaluation mode) for the last position; one token at a time it recomputes
/// nothing of the prefix.
///
/// ```swift
/// let cache = KVCache(model: model, batch: 1)
/// try model.decode(tokens: prompt, batch: 1, t: prompt.count, cache: cache, logits: next)   // (1, V)
/// try model.decode(tokens: [token], batch: 1, t: 1, cache: cache, logits: next)
/// ```
extension Transformer {
    /// tokens (B,t) at the positions after `cache.length` → logits (B, V) of each stream's last
    /// row. A token model with causal attention only (GPT-2 or Transformer-XL); the positions
    /// must fit the cache (`KVCache.capacity`; learned absolute positions: `seq_len`).
    public func decode(
        tokens: UnsafePointer<Int32>, batch: Int, t: Int, cache: KVCache, logits: UnsafeMutablePointer<Float>,
        step: Int = 0
    ) throws {
        guard let embedding = input as? TokenEmbedding, config.attention != .full else {
            throw VQMoEError(.config, "generation needs a token model with causal attention (not a ViT)")
        }
        guard t >= 1, batch == cache.batch, cache.length + t <= cache.capacity else {
            throw VQMoEError(
                .internalError,
                "decode: \(t) positions after \(cache.length) do not fit the cache (\(cache.capacity) per stream)")
        }
        for i in 0..<batch * t where tokens[i] < 0 || Int(tokens[i]) >= config.vocabSize {
            throw VQMoEError(.usage, "token \(tokens[i]) is outside the model's vocabulary [0, \(config.vocabSize))")
        }
        var ctx = ForwardContext(
            batch: batch, seqLen: t, step: step, train: false, runSeed: runSeed, totalSteps: totalSteps, dropout: 0)
        let c = config.dModel, n = batch * t
        embedding.embed(
            tokens: tokens, x: stream[0].reserve(n * c), batch: batch, t: t,
            position: config.relative ? 0 : cache.length)
        ctx.tokenIDs = embedding.tokenIDs
        for (l, block) in blocks.enumerated() {
            _ = try block.forward(x: stream[l].pointer, out: stream[l + 1].reserve(n * c), ctx, cache: cache)
        }
        cache.length += t
        // LN_f and the head over the last row of each stream.
        let last = dx.reserve(batch * c)
        for bi in 0..<batch {
            (last + bi * c).update(from: stream[config.nLayer].pointer + (bi * t + t - 1) * c, count: c)
        }
        lnfSaved.forward(last, lnf, n: batch, c: c)
        _ = try head.forward(
            ctx.stepInfo(.head, layer: 0), h: lnfSaved.out.pointer, batch: batch, seq: 1, targets: nil, logits: logits)
    }
}
