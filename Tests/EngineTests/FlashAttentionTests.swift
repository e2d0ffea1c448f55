import Foundation
import VQMoE
import XCTest

/// `FlashAttention` (blockwise, O(T·d) saved) against `Attention` (saves the T×T probabilities),
/// the reference: outputs and every gradient to 1e-5 relative, causal and full, for lengths that
/// are and are not multiples of the 64-row query and 512-row key blocks (BLAS kernel) and of the
/// 6-row tiles, 16-key panels, 48- and 96-row blocks and 96 / 192 / 256-key chunks (register-tile
/// kernel; the larger backward blocks from 1,024 keys); and finite differences. Both kernels are checked where the CPU runs the register tiles.
final class FlashAttentionTests: XCTestCase {
    /// The kernels this CPU runs.
    var kernels: [FlashAttention.Kernel] { FlashAttention.registerTilesAvailable ? [.blas, .registerTiles] : [.blas] }

    /// Largest |a − b| over the largest |b| (at least 1: at T = 1, dQ and dK are 0 up to rounding).
    func relativeError(_ a: [Float], _ b: [Float]) -> Float {
        let scale = max(b.map { abs($0) }.max() ?? 0, 1)
        return zip(a, b).map { abs($0 - $1) }.max()! / scale
    }

    func compare(b: Int, t: Int, c: Int, heads: Int, causal: Bool, seed: UInt64) {
        for kernel in kernels where kernel == .blas || (c / heads) % 8 == 0 {
            compare(b: b, t: t, c: c, heads: heads, causal: causal, seed: seed, kernel: kernel)
        }
    }

    func compare(b: Int, t: Int, c: Int, heads: Int, causal: Bool, seed: UInt64, kernel: FlashAttention.Kernel) {
        let n = b * t
        // Scores of a few units: softmax rows far from uniform, as in a trained model.
        let qkv = normals(n * 3 * c, seed: seed).map { $0 * 1.5 }
        let dy = normals(n * c, seed: seed + 1)
        var yRef = [Float](repeating: 0, count: n * c), att = [Float](repeating: 0, count: b * heads * t * t)
        Attention.forward(y: &yRef, att: &att, qkv: qkv, b: b, t: t, c: c, heads: heads, causal: causal)
        var dRef = [Float](repeating: 0, count: n * 3 * c)
        Attention.backward(dqkv: &dRef, dy: dy, qkv: qkv, att: att, b: b, t: t, c: c, heads: heads, causal: causal)

        var y = [Float](repeating: .nan, count: n * c), lse = [Float](repeating: .nan, count: b * heads * t)
        FlashAttention.forward(
            y: &y, lse: &lse, qkv: qkv, b: b, t: t, c: c, heads: heads, causal: causal, kernel: kernel)
        // dqkv is accumulated into: start from ones, subtract them after
        var d = [Float](repeating: 1, count: n * 3 * c)
        FlashAttention.backward(
            dqkv: &d, dy: dy, y: y, lse: lse, qkv: qkv, b: b, t: t, c: c, heads: heads, causal: causal, kernel: kernel)
        d = d.map { $0 - 1 }
        let what = "B \(b) T \(t) C \(c) H \(heads) \(causal ? "causal" : "full") \(kernel)"
        XCTAssertLessThan(relativeError(y, yRef), 1e-5, "\(what): y")
        for (part, name) in ["dQ", "dK", "dV"].enumerated() {
            func pick(_ v: [Float]) -> [Float] {
                var out: [Float] = []
                for row in 0..<n {
                    let start = (row * 3 + part) * c
                    out += v[start..<(start + c)]
                }
                return out
            }
            XCTAssertLessThan(relativeError(pick(d), pick(dRef)), 1e-5, "\(what): \(name)")
        }
        // lse is log Σ_j exp(s_ij) of the reference's scores: P's row sums are 1 by it.
        let dh = c / heads, i = t - 1
        var s = [Double](repeating: 0, count: causal ? i + 1 : t)
        for j in s.indices {
            for k in 0..<dh { s[j] += Double(qkv[i * 3 * c + k]) * Double(qkv[j * 3 * c + c + k]) }
            s[j] /= Double(dh).squareRoot()
        }
        let m = s.max()!
        XCTAssertEqual(Double(lse[i]), m + log(s.reduce(0) { $0 + exp($1 - m) }), accuracy: 1e-5 * max(1, abs(m)))
    }

    func testMatchesTheReferenceAcrossBlockBoundaries() {
        for t in [1, 7, 64, 65, 200, 257, 512, 513, 1100] {
            for causal in [true, false] {
                compare(b: 2, t: t, c: 16, heads: 2, causal: causal, seed: UInt64(t))
            }
        }
        compare(b: 1, t: 600, c: 128, heads: 2, causal: true, seed: 7)  // Dh 64, three key blocks
    }

    /// Head sizes 16 · k and 16 · k + 8 (the register tiles' 8-column tile), and one that is not a
    /// multiple of 8 (BLAS only), at lengths around the tiles, panels, blocks and chunks.
    func testHeadSizes() {
        for (c, heads) in [(32, 2), (48, 2), (96, 3), (24, 2)] {
            for t in [5, 47, 97, 300] {
                for causal in [true, false] {
                    compare(b: 2, t: t, c: c, heads: heads, causal: causal, seed: UInt64(c * t))
                }
            }
        }
        compare(b: 1, t: 1030, c: 96, heads: 3, causal: true, seed: 9)  // Dh 32, the long blocks
    }

    /// The register-tile forward is split over (batch, head, query block), its backward over pairs:
    /// 1, 2 and 3 threads (3: split points inside a pair's blocks) give the same bits.
    func testThreadCountChangesNoBits() throws {
        guard FlashAttention.registerTilesAvailable else { throw XCTSkip("no AVX2 + FMA on this CPU") }
        let b = 1, t = 300, c = 64, heads = 2, n = b * t
        let qkv = normals(n * 3 * c, seed: 41), dy = normals(n * c, seed: 42)
        let threads = HostRuntime.threads
        defer { HostRuntime.configure(threads: threads) }
        var first: [Float]?
        for count in [1, 2, 3] {
            HostRuntime.configure(threads: count)
            var y = [Float](repeating: 0, count: n * c), lse = [Float](repeating: 0, count: b * heads * t)
            FlashAttention.forward(y: &y, lse: &lse, qkv: qkv, b: b, t: t, c: c, heads: heads, kernel: .registerTiles)
            var d = [Float](repeating: 0, count: n * 3 * c)
            FlashAttention.backward(
                dqkv: &d, dy: dy, y: y, lse: lse, qkv: qkv, b: b, t: t, c: c, heads: heads, kernel: .registerTiles)
            let all = y + lse + d
            if let first { XCTAssertEqual(all, first, "\(count) threads") } else { first = all }
        }
    }

    /// Register tiles run by default where the CPU has them and Dh is a multiple of 8.
    func testDefaultKernel() {
        XCTAssertEqual(FlashAttention.defaultKernel(dh: 12), .blas)
        XCTAssertEqual(
            FlashAttention.defaultKernel(dh: 32), FlashAttention.registerTilesAvailable ? .registerTiles : .blas)
    }

    func testFiniteDifferences() {
        let cases: [(Int, Bool, Int, FlashAttention.Kernel)] =
            [(70, true, 8, .blas), (530, true, 8, .blas), (530, false, 8, .blas)]
            + (FlashAttention.registerTilesAvailable
                ? [(70, true, 48, .registerTiles), (300, false, 48, .registerTiles)] : [])
        for (t, causal, c, kernel) in cases {
            let b = 1, h = 2, n = b * t
            var qkv = normals(n * 3 * c, seed: 21)
            let r = normals(n * c, seed: 22)
            var y = [Float](repeating: 0, count: n * c), lse = [Float](repeating: 0, count: b * h * t)
            func f() -> Double {
                FlashAttention.forward(
                    y: &y, lse: &lse, qkv: qkv, b: b, t: t, c: c, heads: h, causal: causal, kernel: kernel)
                return weightedSum(y, r)
            }
            _ = f()
            var dqkv = [Float](repeating: 0, count: n * 3 * c)
            FlashAttention.backward(
                dqkv: &dqkv, dy: r, y: y, lse: lse, qkv: qkv, b: b, t: t, c: c, heads: h, causal: causal,
                kernel: kernel)
            assertGradient(
                "qkv T \(t) \(kernel)", target: &qkv, count: n * 3 * c, analytic: dqkv, eps: 1e-3, sample: 96,
                objective: f)
        }
    }

    /// In a model: a Transformer at seq_len 520 (the blockwise path of `SelfAttention`) has the
    /// loss gradient finite differences give, on the attention weights of both layers.
    func testModelGradientsAtLongContext() throws {
        guard DataLocator.defaultRoot() != nil else { throw XCTSkip("no data directory (run scripts/get-data.sh)") }
        let json: [String: Any] = [
            "name": "long", "seed": 3, "data": ["name": "char", "path": "$DATA/enwik8-mini/enwik8-mini"],
            "model": [
                "n_layer": 2, "n_head": 2, "d_model": 16, "seq_len": 520, "init_std": 0.3,
                "ffn": ["mode": "dense", "d_inner": 16],
            ],
            "head": ["name": "lm"], "train": ["steps": 1, "batch_size": 2],
        ]
        let registry = try Registry.load(
            registryPath: "\(engineRepoRoot)/registry.json", binDir: Registry.executableDirectory(), searchPath: [])
        let trainer = try Trainer(
            config: try RunConfig(json: json), registry: registry, outDir: NSTemporaryDirectory(), quiet: true)
        XCTAssertTrue(FlashAttention.applies(t: 520, dh: 8))
        let model = trainer.model
        let batch = try XCTUnwrap(trainer.dataset.read(.train, index: 0, batchSize: 2))
        func loss(train: Bool) throws -> Double {
            try batch.inputsInt.withUnsafeBufferPointer { x in
                try batch.targets.withUnsafeBufferPointer { y in
                    Double(
                        try model.forward(
                            tokens: x.baseAddress!, targets: y.baseAddress!, batch: 2, step: 0, train: train
                        ).task)
                }
            }
        }
        model.zeroGrads()
        _ = try loss(train: true)
        try model.backward()
        for name in ["layers.0.attn.qkv.weight", "layers.1.attn.qkv.weight", "layers.1.attn.qkv.bias"] {
            let p = try XCTUnwrap(model.parameters.first { $0.name == name })
            for i in stride(from: 1, to: p.count, by: max(1, p.count / 12)) {
                let keep = p.data[i], eps: Float = 1e-2
                p.data[i] = keep + eps
                let up = try loss(train: false)
                p.data[i] = keep - eps
                let down = try loss(train: false)
                p.data[i] = keep
                let numeric = (up - down) / Double(2 * eps), analytic = Double(p.grad[i])
                XCTAssertEqual(analytic, numeric, accuracy: 2e-3 * max(1, abs(numeric)), "\(name)[\(i)]")
            }
        }
    }
}
