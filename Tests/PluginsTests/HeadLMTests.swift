import Foundation
import VQMoE
import XCTest

/// The `lm` head plugin against a brute-force double-precision reference.
final class HeadLMTests: XCTestCase {
    let B = 3, T = 5, d = 8, V = 11
    var N: Int { B * T }

    /// A head whose weight (V,d) and bias (V) are overwritten with known random values.
    func makeHead(
        V: Int, d: Int, hp: [String: Any] = [:], seed: UInt64 = 1,
        randomize: Bool = true
    ) throws -> (HeadInstance, [Float], [Float]?) {
        let lib = try openPlugin("HeadLM")
        let core = try makeInstance(
            lib, dims: ModelDims(dModel: d, vocabSize: V, seqLen: T), hyperparameters: hp, seed: seed)
        let head = try HeadInstance(core)
        let wBuf = try XCTUnwrap(core.buffer("weight"))
        XCTAssertEqual(wBuf.shape, [V, d])
        XCTAssertTrue(wBuf.isParameter)
        if randomize {
            let w = randomNormal(V * d, seed: seed &+ 100, scale: 0.6)
            wBuf.floats.update(from: w, count: V * d)
        }
        let w = Array(UnsafeBufferPointer(start: wBuf.floats, count: V * d))
        var b: [Float]?
        if let bBuf = core.buffer("bias") {
            XCTAssertEqual(bBuf.shape, [V])
            if randomize { bBuf.floats.update(from: randomNormal(V, seed: seed &+ 200, scale: 0.4), count: V) }
            b = Array(UnsafeBufferPointer(start: bBuf.floats, count: V))
        }
        return (head, w, b)
    }

    /// Targets with pads at rows 2, 7 and the last.
    func makeTargets(_ n: Int, V: Int, seed: UInt64 = 5) -> [Int32] {
        var x = seed
        var t = (0..<n).map { _ -> Int32 in
            x = x &* 6_364_136_223_846_793_005 &+ 1
            return Int32((x >> 33) % UInt64(V))
        }
        for i in [2, 7, n - 1] where i < n { t[i] = -1 }
        return t
    }

    /// Brute-force forward in double: logits (N,V), softmax (N,V), loss sum, count, correct.
    struct Reference {
        var logits: [Double], probs: [Double], lossSum: Double, count: Int, correct: Int
        var loss: Double { count > 0 ? lossSum / Double(count) : 0 }
    }

    func reference(h: [Float], w: [Float], b: [Float]?, y: [Int32]?, n: Int, V: Int, d: Int) -> Reference {
        var logits = [Double](repeating: 0, count: n * V), probs = logits
        var lossSum = 0.0, count = 0, correct = 0
        for i in 0..<n {
            for v in 0..<V {
                var s = b.map { Double($0[v]) } ?? 0
                for k in 0..<d { s += Double(h[i * d + k]) * Double(w[v * d + k]) }
                logits[i * V + v] = s
            }
            let row = Array(logits[(i * V)..<(i * V + V)])
            let m = row.max()!
            let z = row.reduce(0) { $0 + exp($1 - m) }
            for v in 0..<V { probs[i * V + v] = exp(row[v] - m) / z }
            guard let y, y[i] >= 0 else { continue }
            let t = Int(y[i])
            lossSum += log(z) + m - row[t]
            count += 1
            if row.firstIndex(of: m)! == t { correct += 1 }
        }
        return Reference(logits: logits, probs: probs, lossSum: lossSum, count: count, correct: correct)
    }

    func forward(
        _ head: HeadInstance, _ step: StepInfo, h: [Float], targets: [Int32]?, batch: Int, seq: Int
    )
        throws -> (HeadInstance.Result, [Float])
    {
        var logits = [Float](repeating: .nan, count: batch * seq * head.nOut)
        let r = try h.withUnsafeBufferPointer { hp in
            try logits.withUnsafeMutableBufferPointer { lp in
                if let targets {
                    return try targets.withUnsafeBufferPointer { tp in
                        try head.forward(
                            step, h: hp.baseAddress!, batch: batch, seq: seq, targets: tp.baseAddress,
                            logits: lp.baseAddress!)
                    }
                }
                return try head.forward(
                    step, h: hp.baseAddress!, batch: batch, seq: seq, targets: nil, logits: lp.baseAddress!)
            }
        }
        return (r, logits)
    }

    func assertClose(
        _ a: [Float], _ b: [Double], tol: Double = 1e-4, _ what: String, file: StaticString = #filePath,
        line: UInt = #line
    ) {
        XCTAssertEqual(a.count, b.count, what, file: file, line: line)
        var worst = 0.0, at = 0
        for i in 0..<min(a.count, b.count) where abs(Double(a[i]) - b[i]) > worst {
            worst = abs(Double(a[i]) - b[i]); at = i
        }
        XCTAssertLessThanOrEqual(worst, tol, "\(what): worst |diff| \(worst) at \(at)", file: file, line: line)
    }

    let train = StepInfo(step: 0, totalSteps: 10, train: true, seed: 3)
    let eval = StepInfo(step: 0, totalSteps: 10, train: false, seed: 3)

    // MARK: forward

    func testShape() throws {
        let (head, _, _) = try makeHead(V: V, d: d)
        XCTAssertTrue(head.perToken)
        XCTAssertTrue(head.isLM)
        XCTAssertEqual(head.nOut, V)
        XCTAssertEqual(head.core.library.name, "lm")
        XCTAssertEqual(head.core.library.version, "1.0.0")
    }

    func testForwardMatchesReferenceWithPadTargets() throws {
        let (head, w, b) = try makeHead(V: V, d: d)
        let h = randomNormal(N * d, seed: 11)
        let y = makeTargets(N, V: V)
        let ref = reference(h: h, w: w, b: b, y: y, n: N, V: V, d: d)
        XCTAssertEqual(ref.count, N - 3)
        for step in [train, eval] {
            let (r, logits) = try forward(head, step, h: h, targets: y, batch: B, seq: T)
            assertClose(logits, ref.logits, "logits")
            XCTAssertEqual(r.count, ref.count)
            XCTAssertEqual(r.correct, ref.correct)
            XCTAssertEqual(r.lossSum, ref.lossSum, accuracy: 1e-4 * Double(ref.count))
            XCTAssertEqual(Double(r.loss), ref.loss, accuracy: 1e-4)
            XCTAssertEqual(r.lossSum / Double(r.count), Double(r.loss), accuracy: 1e-5)
        }
    }

    func testCorrectCountsArgmaxHits() throws {
        // Targets set to the reference argmax on some rows: correct counts exactly those.
        let (head, w, b) = try makeHead(V: V, d: d)
        let h = randomNormal(N * d, seed: 12)
        let ref = reference(h: h, w: w, b: b, y: nil, n: N, V: V, d: d)
        var y = [Int32](repeating: -1, count: N)
        for i in 0..<N {
            let row = Array(ref.logits[(i * V)..<(i * V + V)])
            let am = row.firstIndex(of: row.max()!)!
            y[i] = Int32(i % 3 == 0 ? am : (am + 1) % V)
        }
        let (r, _) = try forward(head, eval, h: h, targets: y, batch: B, seq: T)
        XCTAssertEqual(r.count, N)
        XCTAssertEqual(r.correct, (0..<N).filter { $0 % 3 == 0 }.count)
    }

    func testLogitsOnlyWithoutTargets() throws {
        let (head, w, b) = try makeHead(V: V, d: d)
        let h = randomNormal(N * d, seed: 13)
        let ref = reference(h: h, w: w, b: b, y: nil, n: N, V: V, d: d)
        let (r, logits) = try forward(head, eval, h: h, targets: nil, batch: B, seq: T)
        assertClose(logits, ref.logits, "logits")
        XCTAssertEqual(r.count, 0)
        XCTAssertEqual(r.correct, 0)
        XCTAssertEqual(r.loss, 0)
        XCTAssertEqual(r.lossSum, 0)
        XCTAssertNil(r.ctx)
    }

    func testStableSoftmaxWithLargeLogits() throws {
        // Logits around +-400: a naive exp overflows; the row-max shift keeps the loss exact.
        let (head, w, b) = try makeHead(V: V, d: d)
        let h = randomNormal(N * d, seed: 14, scale: 300)
        let y = makeTargets(N, V: V)
        let ref = reference(h: h, w: w, b: b, y: y, n: N, V: V, d: d)
        XCTAssertGreaterThan(ref.logits.map { abs($0) }.max()!, 100)
        let (r, _) = try forward(head, eval, h: h, targets: y, batch: B, seq: T)
        XCTAssertTrue(r.loss.isFinite)
        XCTAssertEqual(r.lossSum, ref.lossSum, accuracy: 1e-5 * max(1, abs(ref.lossSum)) * 10)
    }

    func testNoBiasHyperparameter() throws {
        let (head, w, b) = try makeHead(V: V, d: d, hp: ["bias": false])
        XCTAssertNil(b)
        XCTAssertEqual(head.core.buffers.map(\.name), ["weight"])
        let h = randomNormal(N * d, seed: 15)
        let y = makeTargets(N, V: V)
        let ref = reference(h: h, w: w, b: nil, y: y, n: N, V: V, d: d)
        let (r, logits) = try forward(head, eval, h: h, targets: y, batch: B, seq: T)
        assertClose(logits, ref.logits, "logits")
        XCTAssertEqual(Double(r.loss), ref.loss, accuracy: 1e-4)
    }

    func testManyRowsOnTwoThreadsMatchReferenceAndOneThread() throws {
        // 64 rows: the softmax pass is split over the host pool; the reduction is serial.
        let (B2, T2, d2, V2) = (4, 16, 24, 256)
        let (head, w, b) = try makeHead(V: V2, d: d2)
        let h = randomNormal(B2 * T2 * d2, seed: 23)
        let y = makeTargets(B2 * T2, V: V2)
        let ref = reference(h: h, w: w, b: b, y: y, n: B2 * T2, V: V2, d: d2)
        let before = HostRuntime.threads
        defer { HostRuntime.configure(threads: before) }
        HostRuntime.configure(threads: 2)
        let (r2, logits2) = try forward(head, train, h: h, targets: y, batch: B2, seq: T2)
        HostRuntime.configure(threads: 1)
        let (r1, _) = try forward(head, train, h: h, targets: y, batch: B2, seq: T2)
        assertClose(logits2, ref.logits, "logits")
        XCTAssertEqual(r2.lossSum, ref.lossSum, accuracy: 1e-4 * Double(ref.count))
        XCTAssertEqual(r2.count, ref.count)
        XCTAssertEqual(r2.correct, ref.correct)
        XCTAssertEqual(r1.count, r2.count)
        // The host's threaded sgemm may round logits differently (ulps), nothing more.
        XCTAssertEqual(r1.lossSum, r2.lossSum, accuracy: 1e-6 * Double(ref.count))
    }

    // MARK: init

    func testInitNormalWeightZeroBiasDeterministic() throws {
        let (_, w1, b1) = try makeHead(V: 64, d: 50, hp: ["init_std": 0.05], seed: 9, randomize: false)
        let (_, w2, _) = try makeHead(V: 64, d: 50, hp: ["init_std": 0.05], seed: 9, randomize: false)
        let (_, w3, _) = try makeHead(V: 64, d: 50, hp: ["init_std": 0.05], seed: 10, randomize: false)
        XCTAssertEqual(w1, w2)
        XCTAssertNotEqual(w1, w3)
        XCTAssertEqual(try XCTUnwrap(b1), [Float](repeating: 0, count: 64))
        let mean = w1.reduce(0.0) { $0 + Double($1) } / Double(w1.count)
        let std = (w1.reduce(0.0) { $0 + (Double($1) - mean) * (Double($1) - mean) } / Double(w1.count)).squareRoot()
        XCTAssertEqual(mean, 0, accuracy: 0.005)
        XCTAssertEqual(std, 0.05, accuracy: 0.005)
        let (_, wDefault, _) = try makeHead(V: 64, d: 50, seed: 9, randomize: false)
        let stdDefault = (wDefault.reduce(0.0) { $0 + Double($1) * Double($1) } / Double(wDefault.count)).squareRoot()
        XCTAssertEqual(stdDefault, 0.02, accuracy: 0.002)
    }

    // MARK: context rules

    func testContextOnlyForTrainingForwardsWithGrad() throws {
        let (head, _, _) = try makeHead(V: V, d: d)
        let h = randomNormal(N * d, seed: 16)
        let y = makeTargets(N, V: V)
        XCTAssertNotNil(try forward(head, train, h: h, targets: y, batch: B, seq: T).0.ctx)
        XCTAssertNil(try forward(head, eval, h: h, targets: y, batch: B, seq: T).0.ctx)
        let noGrad = StepInfo(step: 0, totalSteps: 10, train: true, noGrad: true, seed: 3)
        XCTAssertNil(try forward(head, noGrad, h: h, targets: y, batch: B, seq: T).0.ctx)
    }

    // MARK: backward

    func testBackwardMatchesAnalyticGradientsAndAccumulates() throws {
        let (head, w, b) = try makeHead(V: V, d: d)
        let h = randomNormal(N * d, seed: 17)
        let y = makeTargets(N, V: V)
        let ref = reference(h: h, w: w, b: b, y: y, n: N, V: V, d: d)
        let gradLoss: Float = 0.7
        // Gradients accumulate: start from non-zero values.
        let gh0 = randomNormal(N * d, seed: 18, scale: 0.1)
        let gw0 = randomNormal(V * d, seed: 19, scale: 0.1)
        let gb0 = randomNormal(V, seed: 20, scale: 0.1)
        let core = head.core
        let gW = try XCTUnwrap(core.buffer("weight")?.grad), gB = try XCTUnwrap(core.buffer("bias")?.grad)
        gW.update(from: gw0, count: V * d)
        gB.update(from: gb0, count: V)

        let (r, _) = try forward(head, train, h: h, targets: y, batch: B, seq: T)
        let ctx = try XCTUnwrap(r.ctx)
        var gh = gh0
        try gh.withUnsafeMutableBufferPointer {
            try head.backward(ctx, batch: B, seq: T, gradLoss: gradLoss, gradH: $0.baseAddress!)
        }

        // dlogits = grad_loss / count * (p - onehot), zero on pad rows.
        var dl = [Double](repeating: 0, count: N * V)
        for i in 0..<N where y[i] >= 0 {
            for v in 0..<V {
                dl[i * V + v] = Double(gradLoss) / Double(ref.count) * (ref.probs[i * V + v] - (v == Int(y[i]) ? 1 : 0))
            }
        }
        var eh = gh0.map(Double.init), ew = gw0.map(Double.init), eb = gb0.map(Double.init)
        for i in 0..<N {
            for v in 0..<V {
                let g = dl[i * V + v]
                eb[v] += g
                for k in 0..<d {
                    eh[i * d + k] += g * Double(w[v * d + k])
                    ew[v * d + k] += g * Double(h[i * d + k])
                }
            }
        }
        assertClose(gh, eh, "grad_h")
        assertClose(Array(UnsafeBufferPointer(start: gW, count: V * d)), ew, "grad_weight")
        assertClose(Array(UnsafeBufferPointer(start: gB, count: V)), eb, "grad_bias")
        // Pad rows get no input gradient.
        for i in [2, 7, N - 1] {
            XCTAssertEqual(Array(gh[(i * d)..<(i * d + d)]), Array(gh0[(i * d)..<(i * d + d)]))
        }
        // The softmax-minus-onehot gradient of each row sums to 0 over the vocabulary, so
        // the bias gradient's total is unchanged.
        XCTAssertEqual(eb.reduce(0, +), gb0.reduce(0.0) { $0 + Double($1) }, accuracy: 1e-6)
    }

    func testBackwardWithAllTargetsPaddedIsZero() throws {
        let (head, _, _) = try makeHead(V: V, d: d)
        let h = randomNormal(N * d, seed: 21)
        let y = [Int32](repeating: -1, count: N)
        let (r, _) = try forward(head, train, h: h, targets: y, batch: B, seq: T)
        XCTAssertEqual(r.count, 0)
        XCTAssertEqual(r.loss, 0)
        var gh = [Float](repeating: 0, count: N * d)
        try gh.withUnsafeMutableBufferPointer {
            try head.backward(try XCTUnwrap(r.ctx), batch: B, seq: T, gradLoss: 1, gradH: $0.baseAddress!)
        }
        XCTAssertTrue(gh.allSatisfy { $0 == 0 })
        XCTAssertTrue(UnsafeBufferPointer(start: head.core.buffer("weight")!.grad, count: V * d).allSatisfy { $0 == 0 })
    }

    func testGradientCheckerPasses() throws {
        let lib = try openPlugin("HeadLM")
        let results = PluginChecker(library: lib).run()
        XCTAssertTrue(results.allSatisfy(\.passed), results.map(\.description).joined(separator: "\n"))
        XCTAssertTrue(results.contains { $0.name.hasPrefix("gradcheck") })
        let noBias = PluginChecker(library: lib, hyperparameters: ["bias": false]).run()
        XCTAssertTrue(noBias.allSatisfy(\.passed), noBias.map(\.description).joined(separator: "\n"))
    }

    // MARK: errors

    func testTargetOutOfRangeIsAnError() throws {
        let (head, _, _) = try makeHead(V: V, d: d)
        let h = randomNormal(N * d, seed: 22)
        var y = makeTargets(N, V: V)
        y[4] = Int32(V)
        XCTAssertThrowsError(try forward(head, train, h: h, targets: y, batch: B, seq: T)) { e in
            XCTAssertTrue("\(e)".contains("target \(V)"), "\(e)")
        }
    }

    func testCreateNeedsVocabularyAndWidth() throws {
        let lib = try openPlugin("HeadLM")
        XCTAssertThrowsError(try makeInstance(lib, dims: ModelDims(dModel: 8, vocabSize: 0))) { e in
            XCTAssertTrue("\(e)".contains("vocab_size"), "\(e)")
        }
        XCTAssertThrowsError(try makeInstance(lib, dims: ModelDims(dModel: 0, vocabSize: 10))) { e in
            XCTAssertTrue("\(e)".contains("d_model"), "\(e)")
        }
    }
}
