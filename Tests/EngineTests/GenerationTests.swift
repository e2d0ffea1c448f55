import Foundation
import VQMoE
import XCTest

/// Generation with the key/value cache against full recomputation: at every step the cached
/// logits equal (to float rounding) those of an evaluation forward over the same context, and
/// greedy decoding picks the same token — for dense, SMoE and VQMoE layers, GPT-2 and
/// Transformer-XL backbones, across window shifts and segment ends. Then the sampling rules.
final class GenerationTests: XCTestCase {
    let seqLen = 16, memLen = 8

    func model(_ mode: String, xl: Bool, router: String = "smoe", quantizer: String = "vqvae") throws -> Transformer {
        guard DataLocator.defaultRoot() != nil else { throw XCTSkip("no data directory (run scripts/get-data.sh)") }
        var ffn: [String: Any] = ["mode": mode, "d_inner": 48]
        if mode != "dense" {
            ffn["n_experts"] = 4
            ffn["router"] = ["smoe", "xmoe"].contains(router) ? ["name": router, "k": 2] : ["name": router]
            ffn["allow_token_mixing"] = router == "softmoe"
        }
        if mode == "vqmoe" { ffn["quantizer"] = ["name": quantizer] }
        // A wide init spreads the logits, so greedy picks are far from ties.
        var model: [String: Any] = [
            "n_layer": 2, "n_head": 2, "d_model": 32, "seq_len": seqLen, "init_std": 0.3, "ffn": ffn,
        ]
        var data: [String: Any] = ["name": "char", "path": "$DATA/enwik8-mini/enwik8-mini"]
        if xl {
            model["backbone"] = "transformer_xl"
            model["mem_len"] = memLen
            data["order"] = "streams"
        }
        let json: [String: Any] = [
            "name": "gen_\(mode)", "seed": 5, "data": data, "model": model, "head": ["name": "lm"],
            "train": ["steps": 1, "batch_size": 2],
        ]
        let registry = try Registry.load(
            registryPath: "\(engineRepoRoot)/registry.json", binDir: Registry.executableDirectory(), searchPath: [])
        return try Trainer(
            config: try RunConfig(json: json), registry: registry, outDir: NSTemporaryDirectory(), quiet: true
        )
        .model
    }

    /// Logits (T, V) of an evaluation forward over `window` (padded to seq_len; causal, so the
    /// padding does not reach the rows before it).
    func forwardLogits(_ m: Transformer, _ window: [Int32]) throws -> [Float] {
        var tokens = window + [Int32](repeating: 0, count: seqLen - window.count)
        var out = [Float](repeating: 0, count: seqLen * m.head.nOut)
        try tokens.withUnsafeMutableBufferPointer { t in
            try out.withUnsafeMutableBufferPointer { o in
                _ = try m.forward(
                    tokens: t.baseAddress!, targets: nil, batch: 1, step: 0, train: false, logits: o.baseAddress!)
            }
        }
        return out
    }

    /// The logits predicting the token after `tokens` by recomputation: GPT-2 over the window
    /// the generator used; Transformer-XL over the whole sequence in segments with memory.
    func reference(_ m: Transformer, _ tokens: [Int32], windowStart: Int) throws -> [Float] {
        let v = m.head.nOut, last = tokens.count - 1
        if !m.config.relative {
            let out = try forwardLogits(m, Array(tokens[windowStart...]))
            return Array(out[((last - windowStart) * v)..<((last - windowStart + 1) * v)])
        }
        m.resetEvalMemory()
        var segment = 0, out: [Float] = []
        while segment * seqLen <= last {
            out = try forwardLogits(m, Array(tokens[(segment * seqLen)..<min((segment + 1) * seqLen, tokens.count)]))
            segment += 1
        }
        let row = last - (segment - 1) * seqLen
        return Array(out[(row * v)..<((row + 1) * v)])
    }

    func argmax(_ x: [Float]) -> Int32 { Int32(x.indices.max { x[$0] < x[$1] }!) }

    func checkCachedEqualsRecomputed(
        _ mode: String, xl: Bool, router: String = "smoe", quantizer: String = "vqvae", steps: Int = 45
    ) throws {
        let m = try model(mode, xl: xl, router: router, quantizer: quantizer)
        let gen = try Generator(model: m, batch: 1)
        var rng = HostRNG.make(seed: 9, stream: 0)
        let prompt = (0..<11).map { _ in Int32(HostRNG.next(&rng) % 256) }
        var logits = try gen.feed([prompt])
        var shifts = Set<Int>()
        for step in 0..<steps {  // 45 cross the window's moves (GPT-2) and three segment ends (Transformer-XL)
            let tokens = gen.sequences[0]
            let ref = try reference(m, tokens, windowStart: gen.windowStart)
            let scale = max(1, ref.map(abs).max()!)
            let diff = zip(ref, logits).map { abs($0 - $1) }.max()!
            XCTAssertLessThan(diff, 2e-5 * scale, "\(mode) xl=\(xl) step \(step): cached vs recomputed logits")
            XCTAssertEqual(argmax(logits), argmax(ref), "\(mode) xl=\(xl) step \(step): greedy token")
            shifts.insert(gen.windowStart)
            logits = try gen.feed([[argmax(logits)]])
        }
        // GPT-2: the window moved by seq_len/2 (to 8, 16, ... tokens before the end); Transformer-XL:
        // the segments start at 16, 32, 48 with 8 memory positions before them.
        if steps == 45 { XCTAssertEqual(shifts.sorted(), xl ? [0, 8, 24, 40] : [0, 8, 16, 24, 32, 40]) }
    }

    /// Every router (the hash router reads token ids) with every quantizer generates at batch 1
    /// as it evaluates, through a window move; SoftMoE, whose slots mix a sequence's tokens, is
    /// refused with the reason.
    func testEveryRouterAndQuantizerGenerates() throws {
        for r in ["smoe", "xmoe", "stablemoe", "smoe_dropout", "dense", "hash"] {
            for q in ["vqvae", "vqgan_cos", "lfq", "rvq"] {
                try checkCachedEqualsRecomputed("vqmoe", xl: false, router: r, quantizer: q, steps: 12)
            }
        }
        let message = errorMessage { _ = try Generator(model: try model("smoe", xl: false, router: "softmoe")) }
        XCTAssertTrue(message.contains("model.ffn.allow_token_mixing"), message)
    }

    func errorMessage(_ body: () throws -> Void) -> String {
        do { try body() } catch let e as VQMoEError { return e.message } catch { return "\(error)" }
        XCTFail("expected an error")
        return ""
    }

    func testCachedGenerationEqualsRecomputationDense() throws { try checkCachedEqualsRecomputed("dense", xl: false) }
    func testCachedGenerationEqualsRecomputationSMoE() throws { try checkCachedEqualsRecomputed("smoe", xl: false) }
    func testCachedGenerationEqualsRecomputationVQMoE() throws { try checkCachedEqualsRecomputed("vqmoe", xl: false) }
    func testCachedGenerationEqualsRecomputationXLDense() throws { try checkCachedEqualsRecomputed("dense", xl: true) }
    func testCachedGenerationEqualsRecomputationXLSMoE() throws { try checkCachedEqualsRecomputed("smoe", xl: true) }
    func testCachedGenerationEqualsRecomputationXLVQMoE() throws { try checkCachedEqualsRecomputed("vqmoe", xl: true) }

    /// A batch of streams is the streams one by one.
    func testBatchOfStreamsEqualsEachStream() throws {
        for xl in [false, true] {
            let m = try model("vqmoe", xl: xl)
            let a: [Int32] = Array("hello, world".utf8).map(Int32.init)
            let b: [Int32] = Array("HELLO? WORLD".utf8).map(Int32.init)
            let both = try Generator(model: m, batch: 2)
            var pair = try both.feed([a, b])
            let one = try Generator(model: m, batch: 1), other = try Generator(model: m, batch: 1)
            var single = try one.feed([a]) + (try other.feed([b]))
            for step in 0..<30 {
                let diff = zip(pair, single).map { abs($0 - $1) }.max()!
                XCTAssertLessThan(diff, 1e-4, "xl=\(xl) step \(step)")
                let v = m.head.nOut
                let next = [argmax(Array(pair[0..<v])), argmax(Array(pair[v...]))]
                pair = try both.feed([[next[0]], [next[1]]])
                single = try one.feed([[next[0]]]) + (try other.feed([[next[1]]]))
            }
        }
    }

    /// Same seed, same text; top-k 1 and a tiny top-p are greedy; temperature 0 is greedy.
    func testSamplingRules() throws {
        let m = try model("smoe", xl: false)
        let prompt: [Int32] = Array("The ".utf8).map(Int32.init)
        func run(_ configure: (inout SamplingOptions) -> Void) throws -> [Int32] {
            var o = SamplingOptions()
            o.tokens = 40
            configure(&o)
            return try Generator(model: m, batch: 1).generate(prompt: prompt, options: o)[0]
        }
        let greedy = try run { $0.temperature = 0 }
        XCTAssertEqual(try run { $0.topK = 1 }, greedy)
        XCTAssertEqual(try run { $0.topP = 1e-6 }, greedy)
        let s1 = try run { $0.seed = 1 }
        XCTAssertEqual(try run { $0.seed = 1 }, s1)
        XCTAssertNotEqual(try run { $0.seed = 2 }, s1)
        XCTAssertNotEqual(s1, greedy)
        // Every streamed token is the returned one, in order.
        var streamed: [Int32] = []
        var o = SamplingOptions()
        o.tokens = 20
        let out = try Generator(model: m, batch: 1).generate(prompt: prompt, options: o) { streamed += $0 }
        XCTAssertEqual(streamed, out[0])
    }
}
