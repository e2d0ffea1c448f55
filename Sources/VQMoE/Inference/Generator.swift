import Foundation
import VQMoEABI

/// Sampling settings of `vqmoe sample`.
public struct SamplingOptions: Sendable {
    /// Tokens to generate after the prompt.
    public var tokens = 256
    /// Softmax temperature; 0 = greedy (argmax).
    public var temperature: Float = 1
    /// Keep only the k most likely tokens (0 = all).
    public var topK = 0
    /// Keep the smallest set of most likely tokens whose probability reaches p (1 = all).
    public var topP: Float = 1
    /// Stream b draws from HostRNG stream (seed, b): the same seed gives the same text.
    public var seed: UInt64 = 1
    public init() {}
}

/// Token-by-token generation with a key/value cache (`Transformer.decode`): each new token goes
/// through the layers once, attending to the cached keys and values of the tokens before it.
///
/// What each token sees, as in training:
/// - learned absolute positions (GPT-2): the window since `windowStart`, at most `seq_len`
///   tokens; when the window is full it moves to the last ⌊seq_len/2⌋ tokens, which are
///   recomputed at positions 0 … (their keys depend on their positions), so the cost stays one
///   token's pass plus a half-window prefill every ⌈seq_len/2⌉ tokens;
/// - Transformer-XL: the segment recurrence of an evaluation pass from the first token on —
///   segments of `seq_len` tokens, each seeing the memory of the last `mem_len` positions before
///   it (the cache keeps their keys and values, which equal the ones the memory's hidden states
///   give) and the segment so far.
///
/// ```swift
/// let gen = try Generator(model: model, batch: 1)
/// var options = SamplingOptions(); options.temperature = 0.8; options.topK = 40
/// let out = try gen.generate(prompt: Array("The ".utf8).map(Int32.init), options: options) { print($0) }
/// ```
public final class Generator {
    public let model: Transformer
    public let batch: Int
    public let cache: KVCache
    /// Every stream's tokens so far: the prompt, then what was generated.
    public private(set) var sequences: [[Int32]]
    /// The first token the cache holds (absolute positions: the window's start).
    public private(set) var windowStart = 0
    /// Transformer-XL: tokens of the current segment so far.
    private var segmentFill = 0
    let vocab: Int
    /// The last fed row's logits (B, V), and the sampling scratch.
    private var logits: [Float]
    private var order: [Int32] = []
    private var probabilities: [Float] = []
    private var chunk: [Int32] = []

    public init(model: Transformer, batch: Int = 1) throws {
        guard model.input is TokenEmbedding, model.config.attention != .full else {
            throw VQMoEError(.config, "generation needs a token model with causal attention (not a ViT)")
        }
        guard !model.config.ffn.allowTokenMixing else {
            throw VQMoEError(
                .config,
                "this model was trained with model.ffn.allow_token_mixing (a router such as SoftMoE mixes the "
                    + "tokens of a sequence, so a token's output depends on later tokens): it cannot generate one "
                    + "token at a time")
        }
        self.model = model
        self.batch = batch
        cache = KVCache(model: model, batch: batch)
        vocab = model.head.nOut
        sequences = Array(repeating: [], count: batch)
        logits = [Float](repeating: 0, count: batch * vocab)
    }

    /// The logits (B, V) after the last fed token.
    public var lastLogits: [Float] { logits }

    /// Append `tokens[b]` to stream b (the same count for every stream) and run them through the
    /// model; returns the logits (B, V) that predict the token after them.
    @discardableResult
    public func feed(_ tokens: [[Int32]]) throws -> [Float] {
        guard tokens.count == batch, let n = tokens.first?.count, n > 0, tokens.allSatisfy({ $0.count == n }) else {
            throw VQMoEError(.usage, "feed: give every one of the \(batch) streams the same number (≥ 1) of tokens")
        }
        var i = sequences[0].count
        for b in 0..<batch { sequences[b] += tokens[b] }
        let total = sequences[0].count, t = model.config.seqLen
        while i < total {
            if model.config.relative {
                if segmentFill == t {  // the segment ends: its last mem_len positions become the memory
                    cache.keepLast(model.config.memLen)
                    windowStart = i - cache.length
                    segmentFill = 0
                }
                let n = min(total - i, t - segmentFill)
                try run(i..<i + n)
                segmentFill += n
                i += n
            } else {
                if cache.length == t {  // the window is full: keep its last half, recomputed from position 0
                    windowStart = i - t / 2
                    cache.reset()
                    if t / 2 > 0 { try run(windowStart..<i) }
                }
                let n = min(total - i, t - cache.length)
                try run(i..<i + n)
                i += n
            }
        }
        return logits
    }

    /// Decode the tokens `range` of every stream (they follow the cached ones).
    private func run(_ range: Range<Int>) throws {
        chunk.removeAll(keepingCapacity: true)
        for b in 0..<batch { chunk += sequences[b][range] }
        try chunk.withUnsafeBufferPointer { tok in
            try logits.withUnsafeMutableBufferPointer { out in
                try model.decode(
                    tokens: tok.baseAddress!, batch: batch, t: range.count, cache: cache, logits: out.baseAddress!)
            }
        }
    }

    /// Generate `options.tokens` tokens after `prompt` (every stream starts from it); `onTokens`
    /// hears each step's new token of every stream as soon as it is drawn. Returns each stream's
    /// generated tokens.
    public func generate(
        prompt: [Int32], options: SamplingOptions, onTokens: ([Int32]) throws -> Void = { _ in }
    ) throws -> [[Int32]] {
        guard !prompt.isEmpty else { throw VQMoEError(.usage, "the prompt is empty: give at least one token") }
        var out = [[Int32]](repeating: [], count: batch)
        var rngs = (0..<batch).map { HostRNG.make(seed: options.seed, stream: UInt64($0)) }
        try feed(Array(repeating: prompt, count: batch))
        for step in 0..<options.tokens {
            var next = [Int32](repeating: 0, count: batch)
            for b in 0..<batch { next[b] = draw(stream: b, options, &rngs[b]) }
            for b in 0..<batch { out[b].append(next[b]) }
            try onTokens(next)
            if step + 1 < options.tokens { try feed(next.map { [$0] }) }
        }
        return out
    }

    /// One token of stream b from its logits: greedy at temperature 0, else a draw from the
    /// softmax of logits/temperature restricted to the top-k and then the top-p nucleus (ties:
    /// the lower token id first). Without top-k/top-p nothing is sorted: O(V) per token.
    func draw(stream b: Int, _ o: SamplingOptions, _ rng: inout vqmoe_rng) -> Int32 {
        logits.withUnsafeBufferPointer { all in
            draw(UnsafeBufferPointer(rebasing: all[(b * vocab)..<((b + 1) * vocab)]), o, &rng)
        }
    }

    private func draw(_ row: UnsafeBufferPointer<Float>, _ o: SamplingOptions, _ rng: inout vqmoe_rng) -> Int32 {
        var best = 0
        for i in 1..<vocab where row[i] > row[best] { best = i }
        guard o.temperature > 0 else { return Int32(best) }
        let top = row[best]
        if o.topK == 0 && o.topP >= 1 {
            probabilities.removeAll(keepingCapacity: true)
            for x in row { probabilities.append(Foundation.exp((x - top) / o.temperature)) }
            var u = HostRNG.uniform(&rng) * probabilities.reduce(0, +)
            for (i, p) in probabilities.enumerated() {
                u -= p
                if u < 0 { return Int32(i) }
            }
            return Int32(best)
        }
        order = (0..<Int32(vocab)).sorted { row[Int($0)] > row[Int($1)] || (row[Int($0)] == row[Int($1)] && $0 < $1) }
        var keep = o.topK > 0 ? min(o.topK, vocab) : vocab
        probabilities = order[0..<keep].map { Foundation.exp((row[Int($0)] - top) / o.temperature) }
        var sum = probabilities.reduce(0, +)
        if o.topP < 1 {
            var mass: Float = 0
            for (i, p) in probabilities.enumerated() {
                mass += p / sum
                if mass >= o.topP {
                    keep = i + 1
                    break
                }
            }
            probabilities.removeLast(probabilities.count - keep)
            sum = probabilities.reduce(0, +)
        }
        var u = HostRNG.uniform(&rng) * sum
        for (i, p) in probabilities.enumerated() {
            u -= p
            if u < 0 { return order[i] }
        }
        return order[keep - 1]
    }
}
