import Foundation
import VQMoE
import VQMoEABI
import XCTest

/// The `image_classifier` head plugin (ViT: class token or mean -> LayerNorm -> linear,
/// softmax cross-entropy) against a brute-force double-precision reference.
final class HeadImageClassifierTests: XCTestCase {
    let B = 4, T = 6, d = 5, C = 3
    let lengths: [Int32] = [1, 6, 3, 5]
    let targets: [Int32] = [2, -1, 0, 1]
    let eps = 1e-5

    func step(train: Bool, noGrad: Bool = false, frozen: Bool = false) -> StepInfo {
        StepInfo(step: 0, totalSteps: 10, train: train, noGrad: noGrad, frozen: frozen, seed: 3)
    }

    // MARK: reference

    /// norm.weight (d), norm.bias (d), head.weight (C,d), head.bias (C) as doubles.
    struct Params { var gamma: [Double], beta: [Double], w: [Double], c: [Double] }

    let names = ["norm.weight", "norm.bias", "head.weight", "head.bias"]

    /// A head with its parameters overwritten by seeded values (gamma around 1).
    func makeHead(
        _ hp: [String: Any] = [:], d: Int? = nil, C: Int? = nil, seed: UInt64 = 1,
        randomize: Bool = true
    ) throws -> (HeadInstance, Params) {
        let d = d ?? self.d, C = C ?? self.C
        let lib = try openPlugin("HeadImageClassifier")
        let core = try makeInstance(
            lib, dims: ModelDims(dModel: d, nClasses: C, seqLen: T), hyperparameters: hp, seed: seed)
        let head = try HeadInstance(core)
        var out: [[Double]] = []
        for (i, name) in names.enumerated() {
            let buf = try XCTUnwrap(core.buffer(name), name)
            if randomize {
                let v = randomNormal(buf.count, seed: seed &+ 100 &+ UInt64(i), scale: 0.6)
                buf.floats.update(from: i == 0 ? v.map { 1 + $0 } : v, count: buf.count)
            }
            out.append(UnsafeBufferPointer(start: buf.floats, count: buf.count).map(Double.init))
        }
        return (head, Params(gamma: out[0], beta: out[1], w: out[2], c: out[3]))
    }

    struct Reference {
        var pooled: [Double], xhat: [Double], rstd: [Double], normed: [Double], logits: [Double], probs: [Double]
        var lossSum: Double, count: Int, correct: Int
        var loss: Double { count > 0 ? lossSum / Double(count) : 0 }
    }

    func reference(
        h: [Float], B: Int, T: Int, d: Int, lengths: [Int32]?, pooling: String, params q: Params, C: Int,
        y: [Int32]?
    ) -> Reference {
        var pooled = [Double](repeating: 0, count: B * d), xhat = pooled, normed = pooled
        var rstd = [Double](repeating: 0, count: B)
        for b in 0..<B {
            let len = pooling == "cls" ? 1 : (lengths.map { Int($0[b]) } ?? T)
            for k in 0..<d {
                pooled[b * d + k] = (0..<len).reduce(0.0) { $0 + Double(h[(b * T + $1) * d + k]) } / Double(len)
            }
            let row = pooled[(b * d)..<(b * d + d)]
            let mu = row.reduce(0, +) / Double(d)
            let v = row.reduce(0) { $0 + ($1 - mu) * ($1 - mu) } / Double(d)
            rstd[b] = 1 / (v + eps).squareRoot()
            for k in 0..<d {
                xhat[b * d + k] = (pooled[b * d + k] - mu) * rstd[b]
                normed[b * d + k] = xhat[b * d + k] * q.gamma[k] + q.beta[k]
            }
        }
        var logits = [Double](repeating: 0, count: B * C), probs = logits
        var lossSum = 0.0, count = 0, correct = 0
        for b in 0..<B {
            for j in 0..<C {
                var s = q.c[j]
                for k in 0..<d { s += q.w[j * d + k] * normed[b * d + k] }
                logits[b * C + j] = s
            }
            let row = Array(logits[(b * C)..<(b * C + C)])
            let m = row.max()!, z = row.reduce(0.0) { $0 + exp($1 - m) }
            for j in 0..<C { probs[b * C + j] = exp(row[j] - m) / z }
            guard let y, y[b] >= 0 else { continue }
            lossSum += log(z) + m - row[Int(y[b])]
            count += 1
            if row.firstIndex(of: m)! == Int(y[b]) { correct += 1 }
        }
        return Reference(
            pooled: pooled, xhat: xhat, rstd: rstd, normed: normed, logits: logits, probs: probs,
            lossSum: lossSum, count: count, correct: correct)
    }

    /// Gradients of grad_loss * loss: (h, gamma, beta, W, c). The LayerNorm backward is
    /// written out per element: dp_k = sum_m dxhat_m dxhat_m/dp_k with
    /// dxhat_m/dp_k = rstd (δ_mk - 1/d - xhat_m xhat_k / d).
    func referenceGrads(
        _ r: Reference, B: Int, T: Int, d: Int, lengths: [Int32]?, pooling: String, params q: Params, C: Int,
        y: [Int32], gradLoss: Double
    ) -> (h: [Double], gamma: [Double], beta: [Double], w: [Double], c: [Double]) {
        var gh = [Double](repeating: 0, count: B * T * d), gg = [Double](repeating: 0, count: d), gbeta = gg
        var gw = [Double](repeating: 0, count: C * d), gc = [Double](repeating: 0, count: C)
        guard r.count > 0 else { return (gh, gg, gbeta, gw, gc) }
        for b in 0..<B where y[b] >= 0 {
            var dy = [Double](repeating: 0, count: d)
            for j in 0..<C {
                let dz = gradLoss / Double(r.count) * (r.probs[b * C + j] - (j == Int(y[b]) ? 1 : 0))
                gc[j] += dz
                for k in 0..<d { gw[j * d + k] += dz * r.normed[b * d + k]; dy[k] += dz * q.w[j * d + k] }
            }
            var dp = [Double](repeating: 0, count: d)
            for m in 0..<d {
                gg[m] += dy[m] * r.xhat[b * d + m]
                gbeta[m] += dy[m]
                let dxh = dy[m] * q.gamma[m]
                for k in 0..<d {
                    dp[k] +=
                        dxh * r.rstd[b]
                        * ((m == k ? 1 : 0) - 1 / Double(d) - r.xhat[b * d + m] * r.xhat[b * d + k] / Double(d))
                }
            }
            let len = pooling == "cls" ? 1 : (lengths.map { Int($0[b]) } ?? T)
            for t in 0..<len { for k in 0..<d { gh[(b * T + t) * d + k] += dp[k] / Double(len) } }
        }
        return (gh, gg, gbeta, gw, gc)
    }

    // MARK: calls

    func forward(
        _ head: HeadInstance, _ step: StepInfo, h: [Float], B: Int, T: Int, y: [Int32]?,
        lengths: [Int32]?
    ) throws -> (HeadInstance.Result, [Float]) {
        var logits = [Float](repeating: .nan, count: B * head.nOut)
        let r = try h.withUnsafeBufferPointer { hp in
            try logits.withUnsafeMutableBufferPointer { lp in
                try withOptional(y) { yp in
                    try withOptional(lengths) { lenp in
                        try head.forward(
                            step, h: hp.baseAddress!, batch: B, seq: T, targets: yp, lengths: lenp,
                            logits: lp.baseAddress!)
                    }
                }
            }
        }
        return (r, logits)
    }

    func withOptional<R>(_ a: [Int32]?, _ body: (UnsafePointer<Int32>?) throws -> R) rethrows -> R {
        guard let a else { return try body(nil) }
        return try a.withUnsafeBufferPointer { try body($0.baseAddress!) }
    }

    func assertClose(
        _ a: [Float], _ b: [Double], tol: Double = 1e-4, _ what: String, file: StaticString = #filePath,
        line: UInt = #line
    ) {
        XCTAssertEqual(a.count, b.count, what, file: file, line: line)
        var worst = 0.0, at = 0
        for i in 0..<min(a.count, b.count) where !(abs(Double(a[i]) - b[i]) <= worst) {
            worst = abs(Double(a[i]) - b[i]); at = i
        }
        XCTAssertLessThanOrEqual(worst, tol, "\(what): worst |diff| \(worst) at \(at)", file: file, line: line)
    }

    func grad(_ head: HeadInstance, _ name: String) -> [Float] {
        let b = head.core.buffer(name)!
        return Array(UnsafeBufferPointer(start: b.grad!, count: b.count))
    }

    // MARK: shape, buffers, init

    func testShapeAndBuffers() throws {
        let (head, _) = try makeHead()
        XCTAssertFalse(head.perToken)
        XCTAssertFalse(head.isLM)
        XCTAssertEqual(head.nOut, C)
        XCTAssertEqual(head.core.library.name, "image_classifier")
        XCTAssertEqual(head.core.library.version, "1.0.0")
        let bufs = head.core.buffers
        XCTAssertEqual(bufs.map(\.name), names)
        XCTAssertEqual(bufs.map(\.shape), [[d], [d], [C, d], [C]])
        XCTAssertTrue(bufs.allSatisfy(\.isParameter))
        XCTAssertEqual(bufs.map { $0.flags & VQMOE_BUF_NO_DECAY != 0 }, [true, true, false, true])
        let schema = Dictionary(uniqueKeysWithValues: head.core.library.schema.map { ($0.name, $0) })
        XCTAssertEqual(schema["pooling"]?.choices, ["cls", "mean"])
    }

    func testInitUnitGammaZeroBetaNormalWeightZeroBias() throws {
        func initial(_ seed: UInt64, _ hp: [String: Any] = ["init_std": 0.05]) throws -> [String: [Float]] {
            let (head, _) = try makeHead(hp, d: 48, C: 40, seed: seed, randomize: false)
            return Dictionary(
                uniqueKeysWithValues: head.core.buffers.map {
                    ($0.name, Array(UnsafeBufferPointer(start: $0.floats, count: $0.count)))
                })
        }
        let a = try initial(9), b = try initial(9), c = try initial(10)
        XCTAssertEqual(a, b)
        XCTAssertNotEqual(a["head.weight"], c["head.weight"])
        XCTAssertEqual(a["norm.weight"], [Float](repeating: 1, count: 48))
        XCTAssertEqual(a["norm.bias"], [Float](repeating: 0, count: 48))
        XCTAssertEqual(a["head.bias"], [Float](repeating: 0, count: 40))
        let w = a["head.weight"]!.map(Double.init)
        let mean = w.reduce(0, +) / Double(w.count)
        XCTAssertEqual(mean, 0, accuracy: 0.006)
        XCTAssertEqual(
            (w.reduce(0) { $0 + ($1 - mean) * ($1 - mean) } / Double(w.count)).squareRoot(), 0.05, accuracy: 0.005)
        let w2 = try initial(9, [:])["head.weight"]!
        XCTAssertEqual(
            (w2.reduce(0.0) { $0 + Double($1) * Double($1) } / Double(w2.count)).squareRoot(), 0.02, accuracy: 0.002)
    }

    // MARK: forward

    func testForwardMatchesReferenceForBothPoolings() throws {
        for pooling in ["cls", "mean"] {
            let (head, q) = try makeHead(["pooling": pooling])
            let h = randomNormal(B * T * d, seed: 11)
            for lens in [lengths, nil] as [[Int32]?] {
                let ref = reference(
                    h: h, B: B, T: T, d: d, lengths: lens, pooling: pooling, params: q, C: C, y: targets)
                let label = "\(pooling)/\(lens == nil ? "no lengths" : "lengths")"
                for st in [step(train: false), step(train: true)] {
                    let (r, logits) = try forward(head, st, h: h, B: B, T: T, y: targets, lengths: lens)
                    assertClose(logits, ref.logits, "logits \(label)")
                    XCTAssertEqual(r.count, 3, label)
                    XCTAssertEqual(r.correct, ref.correct, label)
                    XCTAssertEqual(r.lossSum, ref.lossSum, accuracy: 1e-4 * 3, label)
                    XCTAssertEqual(Double(r.loss), ref.loss, accuracy: 1e-4, label)
                }
            }
        }
    }

    func testClsReadsTheClassTokenAndMeanHonoursLengths() throws {
        let h = randomNormal(B * T * d, seed: 12)
        var others = h, padding = h
        for b in 0..<B {
            for t in 1..<T { for k in 0..<d { others[(b * T + t) * d + k] += 3 } }
            for t in Int(lengths[b])..<T { for k in 0..<d { padding[(b * T + t) * d + k] += 3 } }
        }
        let (cls, _) = try makeHead(["pooling": "cls"])
        let base = try forward(cls, step(train: false), h: h, B: B, T: T, y: nil, lengths: lengths).1
        XCTAssertEqual(base, try forward(cls, step(train: false), h: others, B: B, T: T, y: nil, lengths: lengths).1)
        XCTAssertEqual(base, try forward(cls, step(train: false), h: others, B: B, T: T, y: nil, lengths: nil).1)
        let (mean, _) = try makeHead(["pooling": "mean"])
        let m = try forward(mean, step(train: false), h: h, B: B, T: T, y: nil, lengths: lengths).1
        XCTAssertEqual(m, try forward(mean, step(train: false), h: padding, B: B, T: T, y: nil, lengths: lengths).1)
        let all = try forward(mean, step(train: false), h: h, B: B, T: T, y: nil, lengths: nil).1
        XCTAssertEqual(
            all,
            try forward(
                mean, step(train: false), h: h, B: B, T: T, y: nil, lengths: [Int32](repeating: Int32(T), count: B)
            ).1)
        XCTAssertNotEqual(all, m)
        // Length 1: mean pooling is the class token.
        XCTAssertEqual(try forward(mean, step(train: false), h: h, B: B, T: T, y: nil, lengths: [1, 1, 1, 1]).1, base)
    }

    func testLayerNormEpsAndConstantVectors() throws {
        // A constant pooled vector normalises to 0, so the logits are W beta + c; a vector with
        // variance 1e-5 has rstd 1/sqrt(2e-5), which distinguishes eps 1e-5 from 1e-6.
        let (head, q) = try makeHead()
        var h = [Float](repeating: 0, count: B * T * d)
        for b in 0..<B { for k in 0..<d { h[(b * T) * d + k] = Float(b) + 0.5 } }
        let s = Float(1e-5).squareRoot()
        for k in 0..<d { h[(1 * T) * d + k] = 1 + (k % 2 == 0 ? s : -s) * (k == d - 1 ? 0 : 1) }
        let ref = reference(h: h, B: B, T: T, d: d, lengths: nil, pooling: "cls", params: q, C: C, y: nil)
        let (r, logits) = try forward(head, step(train: false), h: h, B: B, T: T, y: nil, lengths: nil)
        XCTAssertEqual(r.count, 0)
        assertClose(logits, ref.logits, tol: 2e-3, "logits")
        for j in 0..<C {
            let wb = q.c[j] + (0..<d).reduce(0.0) { $0 + q.w[j * d + $1] * q.beta[$1] }
            XCTAssertEqual(Double(logits[j]), wb, accuracy: 1e-5)
        }
    }

    // MARK: backward

    func testBackwardMatchesReferenceAndAccumulates() throws {
        let gradLoss = 0.7
        for pooling in ["cls", "mean"] {
            for lens in [lengths, nil] as [[Int32]?] {
                let (head, q) = try makeHead(["pooling": pooling])
                let h = randomNormal(B * T * d, seed: 16)
                let label = "\(pooling)/\(lens == nil ? "no lengths" : "lengths")"
                let ref = reference(
                    h: h, B: B, T: T, d: d, lengths: lens, pooling: pooling, params: q, C: C, y: targets)
                let g = referenceGrads(
                    ref, B: B, T: T, d: d, lengths: lens, pooling: pooling, params: q, C: C, y: targets,
                    gradLoss: gradLoss)
                var start: [String: [Float]] = [:]
                for (i, name) in names.enumerated() {
                    let b = head.core.buffer(name)!
                    start[name] = randomNormal(b.count, seed: 40 + UInt64(i), scale: 0.1)
                    b.grad!.update(from: start[name]!, count: b.count)
                }
                let gh0 = randomNormal(B * T * d, seed: 39, scale: 0.1)
                let (r, _) = try forward(head, step(train: true), h: h, B: B, T: T, y: targets, lengths: lens)
                var gh = gh0
                try gh.withUnsafeMutableBufferPointer {
                    try head.backward(
                        try XCTUnwrap(r.ctx), batch: B, seq: T, gradLoss: Float(gradLoss), gradH: $0.baseAddress!)
                }
                func plus(_ a: [Float], _ b: [Double]) -> [Double] { zip(a, b).map { Double($0) + $1 } }
                assertClose(gh, plus(gh0, g.h), "grad_h \(label)")
                assertClose(
                    grad(head, "norm.weight"), plus(start["norm.weight"]!, g.gamma), "grad norm.weight \(label)")
                assertClose(grad(head, "norm.bias"), plus(start["norm.bias"]!, g.beta), "grad norm.bias \(label)")
                assertClose(grad(head, "head.weight"), plus(start["head.weight"]!, g.w), "grad head.weight \(label)")
                assertClose(grad(head, "head.bias"), plus(start["head.bias"]!, g.c), "grad head.bias \(label)")
                XCTAssertGreaterThan(g.h.map(abs).max()!, 1e-3, label)
                // Positions the pooling does not read, and the pad row, get nothing.
                for b in 0..<B {
                    let read = pooling == "cls" ? 1 : (lens.map { Int($0[b]) } ?? T)
                    for t in 0..<T where t >= read || targets[b] < 0 {
                        let at = (b * T + t) * d
                        XCTAssertEqual(Array(gh[at..<(at + d)]), Array(gh0[at..<(at + d)]), "\(label) b \(b) t \(t)")
                    }
                }
            }
        }
    }

    func testZeroInitialisedHeadWouldBlockTheInputGradient() throws {
        // Why head.weight is N(0, init_std^2) rather than ViT's zeros: with W = 0 nothing
        // reaches h on the first step.
        let (head, _) = try makeHead(["init_std": 0.0], randomize: false)
        let h = randomNormal(B * T * d, seed: 21)
        let (r, _) = try forward(head, step(train: true), h: h, B: B, T: T, y: targets, lengths: nil)
        XCTAssertEqual(Double(r.loss), log(Double(C)), accuracy: 1e-6)
        var gh = [Float](repeating: 0, count: B * T * d)
        try gh.withUnsafeMutableBufferPointer {
            try head.backward(try XCTUnwrap(r.ctx), batch: B, seq: T, gradLoss: 1, gradH: $0.baseAddress!)
        }
        XCTAssertTrue(gh.allSatisfy { $0 == 0 })
        let (seeded, _) = try makeHead([:], randomize: false)
        let (r2, _) = try forward(seeded, step(train: true), h: h, B: B, T: T, y: targets, lengths: nil)
        var gh2 = [Float](repeating: 0, count: B * T * d)
        try gh2.withUnsafeMutableBufferPointer {
            try seeded.backward(try XCTUnwrap(r2.ctx), batch: B, seq: T, gradLoss: 1, gradH: $0.baseAddress!)
        }
        XCTAssertGreaterThan(gh2.map(abs).max()!, 1e-4)
    }

    func testFrozenAndContextRules() throws {
        let (head, q) = try makeHead()
        let h = randomNormal(B * T * d, seed: 17)
        XCTAssertNil(try forward(head, step(train: false), h: h, B: B, T: T, y: targets, lengths: nil).0.ctx)
        XCTAssertNil(
            try forward(head, step(train: true, noGrad: true), h: h, B: B, T: T, y: targets, lengths: nil).0.ctx)
        let ref = reference(h: h, B: B, T: T, d: d, lengths: nil, pooling: "cls", params: q, C: C, y: targets)
        let g = referenceGrads(
            ref, B: B, T: T, d: d, lengths: nil, pooling: "cls", params: q, C: C, y: targets, gradLoss: 1)
        let (r, _) = try forward(head, step(train: true, frozen: true), h: h, B: B, T: T, y: targets, lengths: nil)
        var gh = [Float](repeating: 0, count: B * T * d)
        try gh.withUnsafeMutableBufferPointer {
            try head.backward(try XCTUnwrap(r.ctx), batch: B, seq: T, gradLoss: 1, gradH: $0.baseAddress!)
        }
        assertClose(gh, g.h, "grad_h")
        for b in head.core.buffers {
            XCTAssertTrue(UnsafeBufferPointer(start: b.grad!, count: b.count).allSatisfy { $0 == 0 }, b.name)
        }
        // All targets padded: loss 0, nothing flows back.
        let (pad, _) = try forward(head, step(train: true), h: h, B: B, T: T, y: [-1, -1, -1, -1], lengths: nil)
        XCTAssertEqual(pad.count, 0)
        XCTAssertEqual(pad.loss, 0)
        var gh2 = [Float](repeating: 0, count: B * T * d)
        try gh2.withUnsafeMutableBufferPointer {
            try head.backward(try XCTUnwrap(pad.ctx), batch: B, seq: T, gradLoss: 1, gradH: $0.baseAddress!)
        }
        XCTAssertTrue(gh2.allSatisfy { $0 == 0 })
    }

    // MARK: errors

    func testErrors() throws {
        let lib = try openPlugin("HeadImageClassifier")
        XCTAssertThrowsError(try makeInstance(lib, dims: ModelDims(dModel: 8, nClasses: 0))) { e in
            XCTAssertTrue("\(e)".contains("n_classes = 0"), "\(e)")
        }
        XCTAssertThrowsError(
            try makeInstance(lib, dims: ModelDims(dModel: 8, nClasses: 10), hyperparameters: ["pooling": "max"])
        ) { e in
            XCTAssertTrue("\(e)".contains("pooling") && "\(e)".contains("cls, mean"), "\(e)")
        }
        let (head, _) = try makeHead()
        let h = randomNormal(B * T * d, seed: 20)
        XCTAssertThrowsError(try forward(head, step(train: true), h: h, B: B, T: T, y: targets, lengths: [1, 2, 0, 4]))
        { e in
            XCTAssertTrue("\(e)".contains("lengths[2] = 0 is outside [1, \(T)]"), "\(e)")
        }
        XCTAssertThrowsError(try forward(head, step(train: true), h: h, B: B, T: T, y: [0, 1, -2, 2], lengths: nil)) {
            e in
            XCTAssertTrue("\(e)".contains("target -2 at row 2"), "\(e)")
        }
    }

    // MARK: the generic checker

    func testGradientCheckerPassesForBothPoolings() throws {
        let lib = try openPlugin("HeadImageClassifier")
        for hp in [[:], ["pooling": "mean"], ["init_std": 0.5], ["pooling": "mean", "init_std": 0.5]] as [[String: Any]]
        {
            let results = PluginChecker(library: lib, hyperparameters: hp).run()
            XCTAssertTrue(results.allSatisfy(\.passed), "\(hp):\n" + results.map(\.description).joined(separator: "\n"))
            XCTAssertEqual(results.filter { $0.name.hasPrefix("gradcheck") }.count, 5, "\(hp)")
        }
    }
}
