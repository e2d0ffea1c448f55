import Foundation

/// `vqmoe bench CONFIG --sample`: generation speed with the key/value cache on a config's model
/// (its initial weights: speed does not depend on them). A seeded random prompt of `promptLength`
/// tokens is prefilled, then `tokens` tokens are drawn per stream (temperature 1), each fed back
/// through `Generator`. Reports generated tokens per second over the generation loop (prefill
/// excluded, reported apart), the median ms per generated token, and peak RSS.
///
/// ```swift
/// let r = try GenerationBench(config: cfg, registry: reg, tokens: 256, batch: 1).run()
/// print(r.json)
/// ```
public struct GenerationBench {
    public let config: RunConfig
    public let registry: Registry
    public let tokens: Int, batch: Int, promptLength: Int

    public init(config: RunConfig, registry: Registry, tokens: Int, batch: Int, promptLength: Int = 64) {
        (self.config, self.registry, self.tokens, self.batch, self.promptLength) =
            (config, registry, tokens, batch, promptLength)
    }

    public struct Report {
        public var tokensPerSecond: Double, msPerToken: Double, msPrefill: Double, peakRSSMB: Double
        public var tokens: Int, batch: Int, promptLength: Int, threads: Int

        public var json: [String: Any] {
            [
                "mode": "sample", "tokens_per_s": tokensPerSecond, "ms_per_token": msPerToken,
                "ms_prefill": msPrefill, "peak_rss_mb": peakRSSMB, "tokens": tokens, "batch": batch,
                "prompt_tokens": promptLength, "threads": threads,
            ]
        }
    }

    public func run() throws -> Report {
        guard tokens >= 2, batch >= 1, promptLength >= 1 else {
            throw VQMoEError(.usage, "--tokens ≥ 2, --batch ≥ 1 and a prompt of ≥ 1 token")
        }
        let trainer = try Trainer(config: config, registry: registry, outDir: "bench", quiet: true)
        let generator = try Generator(model: trainer.model, batch: batch)
        var rng = HostRNG.make(seed: 7, stream: 0)
        let vocab = trainer.model.config.vocabSize
        let prompt = (0..<promptLength).map { _ in Int32(HostRNG.next(&rng) % UInt64(vocab)) }
        func now() -> Double { Double(DispatchTime.now().uptimeNanoseconds) / 1e6 }
        var options = SamplingOptions()
        options.tokens = tokens
        let start = now()
        var last = start, prefill = 0.0, steps: [Double] = []
        _ = try generator.generate(prompt: prompt, options: options) { _ in
            let t = now()
            if prefill == 0 { prefill = t - start } else { steps.append(t - last) }
            last = t
        }
        let loop = last - start - prefill  // tokens − 1 feeds: the first token came from the prefill's logits
        var usage = rusage()
        getrusage(RUSAGE_SELF.rawValue, &usage)
        return Report(
            tokensPerSecond: Double((tokens - 1) * batch) / (loop / 1000), msPerToken: median(steps),
            msPrefill: prefill, peakRSSMB: Double(usage.ru_maxrss) / 1024, tokens: tokens, batch: batch,
            promptLength: promptLength, threads: config.train.threads)
    }
}
