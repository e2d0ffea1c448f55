import Foundation
import VQMoE
import VQMoEABI
import XCTest

/// The `classifier` head plugin (pool -> FC1 -> act -> dropout -> FC2, softmax cross-entropy)
/// against a brute-force double-precision reference.
final class HeadClassifierTests: XCTestCase {
    let B = 4, T = 6, d = 5, C = 3
    /// Real tokens per sequence: length 1, full, and two in between.
    let lengths: [Int32] = [1, 6, 3, 5]
    /// Targets with one pad row.
    let targets: [Int32] = [2, -1, 0, 1]

    let poolings = ["mean", "first", "last", "max"]
    let activations = ["relu", "gelu", "tanh"]

    func step(train: Bool, noGrad: Bool = false, frozen: Bool = false, seed: UInt64 = 3) -> StepInfo {
        StepInfo(step: 0, totalSteps: 10, train: train, noGrad: noGrad, frozen: frozen, seed: seed)
    }

    // MARK: reference

    /// Parameters as doubles: fc1.weight (H,d), fc1.bias (H), fc2.weight (C,H), fc2.bias (C).
    struct Params { var w1: [Double], b1: [Double], w2: [Double], b2: [Double], hidden: Int }

    /// A head with its parameters overwritten by seeded N(0, scale^2) values.
    func makeHead(
        _ hp: [String: Any] = [:], d: Int? = nil, C: Int? = nil, seed: UInt64 = 1,
        scale: Float = 0.6
    ) throws -> (HeadInstance, Params) {
        let d = d ?? self.d, C = C ?? self.C
        let lib = try openPlugin("HeadClassifier")
        let core = try makeInstance(
            lib, dims: ModelDims(dModel: d, nClasses: C, seqLen: T), hyperparameters: hp, seed: seed)
        let head = try HeadInstance(core)
        var out: [[Double]] = []
        for (i, name) in ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"].enumerated() {
            let buf = try XCTUnwrap(core.buffer(name), name)
            if scale > 0 {
                buf.floats.update(
                    from: randomNormal(buf.count, seed: seed &+ 100 &+ UInt64(i), scale: scale), count: buf.count)
            }
            out.append(UnsafeBufferPointer(start: buf.floats, count: buf.count).map(Double.init))
        }
        return (head, Params(w1: out[0], b1: out[1], w2: out[2], b2: out[3], hidden: out[1].count))
    }

    struct Reference {
        var pooled: [Double], argmax: [Int], pre: [Double], act: [Double], logits: [Double], probs: [Double]
        var lossSum: Double, count: Int, correct: Int
        var loss: Double { count > 0 ? lossSum / Double(count) : 0 }
    }

    func activation(_ name: String, _ u: Double) -> Double {
        switch name {
        case "relu": return max(u, 0)
        case "gelu": return 0.5 * u * (1 + erf(u / 2.0.squareRoot()))
        default: return tanh(u)
        }
    }

    func activationSlope(_ name: String, _ u: Double) -> Double {
        switch name {
        case "relu": return u > 0 ? 1 : 0
        case "gelu": return 0.5 * (1 + erf(u / 2.0.squareRoot())) + u * exp(-u * u / 2) / (2 * Double.pi).squareRoot()
        default: return 1 - tanh(u) * tanh(u)
        }
    }

    /// The dropout mask a training forward with `seed` uses: host stream (seed, 0), one
    /// uniform per (b, unit) in row-major order, kept (scaled by 1/(1-p)) when u >= p.
    func dropoutMask(seed: UInt64, count: Int, p: Double) -> [Double] {
        var r = HostRNG.make(seed: seed, stream: 0)
        return (0..<count).map { _ in HostRNG.uniform(&r) >= Float(p) ? 1 / (1 - p) : 0 }
    }

    func reference(
        h: [Float], B: Int, T: Int, d: Int, lengths: [Int32]?, pooling: String, activation act: String,
        params q: Params, C: Int, mask: [Double]?, y: [Int32]?
    ) -> Reference {
        let H = q.hidden
        var pooled = [Double](repeating: 0, count: B * d), argmax = [Int](repeating: 0, count: B * d)
        for b in 0..<B {
            let len = lengths.map { Int($0[b]) } ?? T
            for k in 0..<d {
                func x(_ t: Int) -> Double { Double(h[(b * T + t) * d + k]) }
                switch pooling {
                case "mean": pooled[b * d + k] = (0..<len).reduce(0.0) { $0 + x($1) } / Double(len)
                case "first": pooled[b * d + k] = x(0)
                case "last": pooled[b * d + k] = x(len - 1)
                default:
                    var best = 0
                    for t in 1..<len where x(t) > x(best) { best = t }
                    pooled[b * d + k] = x(best); argmax[b * d + k] = best
                }
            }
        }
        var pre = [Double](repeating: 0, count: B * H), a = pre
        for b in 0..<B {
            for i in 0..<H {
                var s = q.b1[i]
                for k in 0..<d { s += q.w1[i * d + k] * pooled[b * d + k] }
                pre[b * H + i] = s
                a[b * H + i] = activation(act, s) * (mask?[b * H + i] ?? 1)
            }
        }
        var logits = [Double](repeating: 0, count: B * C), probs = logits
        var lossSum = 0.0, count = 0, correct = 0
        for b in 0..<B {
            for j in 0..<C {
                var s = q.b2[j]
                for i in 0..<H { s += q.w2[j * H + i] * a[b * H + i] }
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
            pooled: pooled, argmax: argmax, pre: pre, act: a, logits: logits, probs: probs,
            lossSum: lossSum, count: count, correct: correct)
    }

    /// Gradients of grad_loss * loss: (h, W1, b1, W2, b2).
    func referenceGrads(
        _ r: Reference, h: [Float], B: Int, T: Int, d: Int, lengths: [Int32]?, pooling: String,
        activation act: String, params q: Params, C: Int, mask: [Double]?, y: [Int32], gradLoss: Double
    )
        -> (h: [Double], w1: [Double], b1: [Double], w2: [Double], b2: [Double])
    {
        let H = q.hidden
        var gh = [Double](repeating: 0, count: B * T * d), gw1 = [Double](repeating: 0, count: H * d)
        var gb1 = [Double](repeating: 0, count: H), gw2 = [Double](repeating: 0, count: C * H),
            gb2 = [Double](repeating: 0, count: C)
        guard r.count > 0 else { return (gh, gw1, gb1, gw2, gb2) }
        for b in 0..<B where y[b] >= 0 {
            var dz = [Double](repeating: 0, count: C)
            for j in 0..<C { dz[j] = gradLoss / Double(r.count) * (r.probs[b * C + j] - (j == Int(y[b]) ? 1 : 0)) }
            var du = [Double](repeating: 0, count: H)
            for j in 0..<C {
                gb2[j] += dz[j]
                for i in 0..<H { gw2[j * H + i] += dz[j] * r.act[b * H + i]; du[i] += dz[j] * q.w2[j * H + i] }
            }
            for i in 0..<H { du[i] *= (mask?[b * H + i] ?? 1) * activationSlope(act, r.pre[b * H + i]) }
            var dp = [Double](repeating: 0, count: d)
            for i in 0..<H {
                gb1[i] += du[i]
                for k in 0..<d { gw1[i * d + k] += du[i] * r.pooled[b * d + k]; dp[k] += du[i] * q.w1[i * d + k] }
            }
            let len = lengths.map { Int($0[b]) } ?? T
            for k in 0..<d {
                switch pooling {
                case "mean": for t in 0..<len { gh[(b * T + t) * d + k] += dp[k] / Double(len) }
                case "first": gh[(b * T) * d + k] += dp[k]
                case "last": gh[(b * T + len - 1) * d + k] += dp[k]
                default: gh[(b * T + r.argmax[b * d + k]) * d + k] += dp[k]
                }
            }
        }
        return (gh, gw1, gb1, gw2, gb2)
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

    // MARK: shape and buffers

    func testShapeAndBuffers() throws {
        let (head, _) = try makeHead()
        XCTAssertFalse(head.perToken)
        XCTAssertFalse(head.isLM)
        XCTAssertEqual(head.nOut, C)
        XCTAssertEqual(head.core.library.name, "classifier")
        XCTAssertEqual(head.core.library.version, "1.0.0")
        XCTAssertEqual(head.rows(batch: B, seq: T), B)
        let bufs = head.core.buffers
        XCTAssertEqual(bufs.map(\.name), ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"])
        XCTAssertEqual(bufs.map(\.shape), [[d, d], [d], [C, d], [C]])  // hidden 0 = d_model
        XCTAssertTrue(bufs.allSatisfy(\.isParameter))
        XCTAssertEqual(bufs.map { $0.flags & VQMOE_BUF_NO_DECAY != 0 }, [false, true, false, true])
        let (wide, _) = try makeHead(["hidden": 7])
        XCTAssertEqual(wide.core.buffers.map(\.shape), [[7, d], [7], [C, 7], [C]])
        let schema = Dictionary(uniqueKeysWithValues: head.core.library.schema.map { ($0.name, $0) })
        XCTAssertEqual(schema["pooling"]?.choices, ["mean", "first", "last", "max"])
        XCTAssertEqual(schema["activation"]?.choices, ["relu", "gelu", "tanh"])
    }

    func testInitNormalWeightsZeroBiasesDeterministic() throws {
        func initial(
            _ seed: UInt64, _ hp: [String: Any] = ["init_std": 0.05, "hidden": 64]
        ) throws -> [String: [Float]] {
            let (head, _) = try makeHead(hp, d: 40, C: 30, seed: seed, scale: 0)
            return Dictionary(
                uniqueKeysWithValues: head.core.buffers.map {
                    ($0.name, Array(UnsafeBufferPointer(start: $0.floats, count: $0.count)))
                })
        }
        let a = try initial(9), b = try initial(9), c = try initial(10)
        XCTAssertEqual(a, b)
        XCTAssertNotEqual(a["fc1.weight"], c["fc1.weight"])
        XCTAssertEqual(a["fc1.bias"], [Float](repeating: 0, count: 64))
        XCTAssertEqual(a["fc2.bias"], [Float](repeating: 0, count: 30))
        for name in ["fc1.weight", "fc2.weight"] {
            let w = a[name]!.map(Double.init)
            let mean = w.reduce(0, +) / Double(w.count)
            let std = (w.reduce(0) { $0 + ($1 - mean) * ($1 - mean) } / Double(w.count)).squareRoot()
            XCTAssertEqual(mean, 0, accuracy: 0.006, name)
            XCTAssertEqual(std, 0.05, accuracy: 0.005, name)
        }
        XCTAssertNotEqual(Array(a["fc1.weight"]!.prefix(20)), Array(a["fc2.weight"]!.prefix(20)), "independent streams")
        let std = try initial(9, ["hidden": 64])["fc1.weight"]!.reduce(0.0) { $0 + Double($1) * Double($1) }
        XCTAssertEqual((std / Double(64 * 40)).squareRoot(), 0.02, accuracy: 0.002)
    }

    // MARK: forward

    func testForwardMatchesReferenceForEveryPoolingAndActivation() throws {
        for pooling in poolings {
            for act in activations {
                let hp: [String: Any] = ["pooling": pooling, "activation": act, "hidden": 7]
                let (head, q) = try makeHead(hp)
                let h = randomNormal(B * T * d, seed: 11)
                for lens in [lengths, nil] as [[Int32]?] {
                    let ref = reference(
                        h: h, B: B, T: T, d: d, lengths: lens, pooling: pooling, activation: act, params: q,
                        C: C, mask: nil, y: targets)
                    XCTAssertEqual(ref.count, 3)
                    let (r, logits) = try forward(head, step(train: false), h: h, B: B, T: T, y: targets, lengths: lens)
                    let label = "\(pooling)/\(act)/\(lens == nil ? "no lengths" : "lengths")"
                    assertClose(logits, ref.logits, "logits \(label)")
                    XCTAssertEqual(r.count, ref.count, label)
                    XCTAssertEqual(r.correct, ref.correct, label)
                    XCTAssertEqual(r.lossSum, ref.lossSum, accuracy: 1e-4 * Double(ref.count), label)
                    XCTAssertEqual(Double(r.loss), ref.loss, accuracy: 1e-4, label)
                    XCTAssertEqual(r.lossSum / Double(r.count), Double(r.loss), accuracy: 1e-5, label)
                }
            }
        }
    }

    func testPoolingReadsOnlyRealTokens() throws {
        // Changing padding positions (t >= lengths[b]) never changes the logits; lengths of all
        // T equal absent lengths; "first" reads only position 0 and "last" only len - 1.
        let h = randomNormal(B * T * d, seed: 12)
        var padded = h
        for b in 0..<B { for t in Int(lengths[b])..<T { for k in 0..<d { padded[(b * T + t) * d + k] += 5 } } }
        for pooling in poolings {
            let (head, _) = try makeHead(["pooling": pooling])
            let (_, base) = try forward(head, step(train: false), h: h, B: B, T: T, y: nil, lengths: lengths)
            let (_, moved) = try forward(head, step(train: false), h: padded, B: B, T: T, y: nil, lengths: lengths)
            XCTAssertEqual(base, moved, pooling)
            let (_, absent) = try forward(head, step(train: false), h: h, B: B, T: T, y: nil, lengths: nil)
            let (_, full) = try forward(
                head, step(train: false), h: h, B: B, T: T, y: nil, lengths: [Int32](repeating: Int32(T), count: B))
            XCTAssertEqual(absent, full, pooling)
            if pooling != "first" { XCTAssertNotEqual(absent, base, "\(pooling): lengths matter") }
        }
        // With length 1 every pooling reads position 0 only: all four agree on that row.
        let ones = [Int32](repeating: 1, count: B)
        var rows: [[Float]] = []
        for pooling in poolings {
            let (head, _) = try makeHead(["pooling": pooling])
            rows.append(try forward(head, step(train: false), h: h, B: B, T: T, y: nil, lengths: ones).1)
        }
        for r in rows.dropFirst() { XCTAssertEqual(r, rows[0]) }
    }

    func testCorrectCountsArgmaxHitsAndLogitsOnly() throws {
        let (head, q) = try makeHead()
        let h = randomNormal(B * T * d, seed: 13)
        let ref = reference(
            h: h, B: B, T: T, d: d, lengths: lengths, pooling: "mean", activation: "tanh", params: q, C: C, mask: nil,
            y: nil)
        var y = [Int32](repeating: 0, count: B)
        for b in 0..<B {
            let row = Array(ref.logits[(b * C)..<(b * C + C)])
            let am = row.firstIndex(of: row.max()!)!
            y[b] = Int32(b % 2 == 0 ? am : (am + 1) % C)
        }
        let (r, _) = try forward(head, step(train: false), h: h, B: B, T: T, y: y, lengths: lengths)
        XCTAssertEqual(r.count, B)
        XCTAssertEqual(r.correct, 2)
        let (none, logits) = try forward(head, step(train: true), h: h, B: B, T: T, y: nil, lengths: lengths)
        XCTAssertEqual(none.count, 0)
        XCTAssertEqual(none.loss, 0)
        XCTAssertEqual(none.lossSum, 0)
        XCTAssertNotNil(none.ctx, "a training forward without targets still saves a (no-op) context")
        var gh = [Float](repeating: 0, count: B * T * d)
        try gh.withUnsafeMutableBufferPointer {
            try head.backward(none.ctx!, batch: B, seq: T, gradLoss: 1, gradH: $0.baseAddress!)
        }
        XCTAssertTrue(gh.allSatisfy { $0 == 0 })
        // Logits-only forward in train mode includes dropout; in eval mode it equals the reference.
        XCTAssertEqual(logits.count, B * C)
        let (_, evalLogits) = try forward(head, step(train: false), h: h, B: B, T: T, y: nil, lengths: lengths)
        assertClose(evalLogits, ref.logits, "eval logits")
    }

    // MARK: dropout

    func testDropoutEvalHasNoneTrainIsDeterministicPerSeed() throws {
        let p = 0.3
        let hp: [String: Any] = ["dropout": p, "hidden": 9, "activation": "gelu", "pooling": "max"]
        let (head, q) = try makeHead(hp)
        let h = randomNormal(B * T * d, seed: 14)
        let noMask = reference(
            h: h, B: B, T: T, d: d, lengths: lengths, pooling: "max", activation: "gelu", params: q, C: C, mask: nil,
            y: targets)
        // Eval: no dropout, whatever the seed.
        for seed in [UInt64(3), 4] {
            let (r, logits) = try forward(
                head, step(train: false, seed: seed), h: h, B: B, T: T, y: targets, lengths: lengths)
            assertClose(logits, noMask.logits, "eval logits")
            XCTAssertEqual(Double(r.loss), noMask.loss, accuracy: 1e-4)
        }
        // Train: the mask of host stream (seed, 0), kept units scaled by 1/(1-p).
        var seen: [[Float]] = []
        for seed in [UInt64(3), 4] {
            let mask = dropoutMask(seed: seed, count: B * 9, p: p)
            XCTAssertTrue(mask.contains(0) && mask.contains { $0 > 1 })
            let ref = reference(
                h: h, B: B, T: T, d: d, lengths: lengths, pooling: "max", activation: "gelu", params: q, C: C,
                mask: mask, y: targets)
            let (r1, l1) = try forward(
                head, step(train: true, seed: seed), h: h, B: B, T: T, y: targets, lengths: lengths)
            let (r2, l2) = try forward(
                head, step(train: true, noGrad: true, seed: seed), h: h, B: B, T: T, y: targets, lengths: lengths)
            assertClose(l1, ref.logits, "train logits, seed \(seed)")
            XCTAssertEqual(Double(r1.loss), ref.loss, accuracy: 1e-4)
            XCTAssertEqual(l1, l2, "same seed, same mask (with or without a context)")
            XCTAssertEqual(r1.loss, r2.loss)
            seen.append(l1)
        }
        XCTAssertNotEqual(seen[0], seen[1], "another step seed drops other units")
        XCTAssertNotEqual(seen[0].map(Double.init), noMask.logits)
    }

    func testDropoutScalesKeptUnitsAndDropsAboutP() throws {
        // fc2 = identity, b2 = 0, so the logits ARE the dropped-out activations: each is 0 or
        // tanh(u)/(1-p); about a fraction p of 64 x 32 units is dropped.
        let p = 0.25, H = 32, Bs = 64
        let (head, q) = try makeHead(["dropout": p, "hidden": H], C: H)
        let w2 = head.core.buffer("fc2.weight")!.floats, b2 = head.core.buffer("fc2.bias")!.floats
        for j in 0..<H { for i in 0..<H { w2[j * H + i] = i == j ? 1 : 0 } }
        b2.update(repeating: 0, count: H)
        var q2 = q
        q2.w2 = (0..<(H * H)).map { $0 / H == $0 % H ? 1 : 0 }
        q2.b2 = [Double](repeating: 0, count: H)
        let h = randomNormal(Bs * T * d, seed: 15)
        let plain = reference(
            h: h, B: Bs, T: T, d: d, lengths: nil, pooling: "mean", activation: "tanh", params: q2, C: H, mask: nil,
            y: nil)
        let (_, logits) = try forward(head, step(train: true, seed: 77), h: h, B: Bs, T: T, y: nil, lengths: nil)
        var dropped = 0
        for i in 0..<(Bs * H) {
            if logits[i] == 0 { dropped += 1; continue }
            XCTAssertEqual(Double(logits[i]), plain.act[i] / (1 - p), accuracy: 1e-5, "unit \(i)")
        }
        XCTAssertEqual(Double(dropped) / Double(Bs * H), p, accuracy: 0.04)
        let (_, evalLogits) = try forward(head, step(train: false, seed: 77), h: h, B: Bs, T: T, y: nil, lengths: nil)
        assertClose(evalLogits, plain.act, tol: 1e-5, "eval = no dropout")
    }

    // MARK: backward

    func testBackwardMatchesReferenceEverywhereAndAccumulates() throws {
        let gradLoss = 0.7
        for pooling in poolings {
            for act in activations {
                let p = 0.2, H = 7
                let (head, q) = try makeHead(["pooling": pooling, "activation": act, "hidden": H, "dropout": p])
                let h = randomNormal(B * T * d, seed: 16)
                let label = "\(pooling)/\(act)"
                let mask = dropoutMask(seed: 5, count: B * H, p: p)
                let ref = reference(
                    h: h, B: B, T: T, d: d, lengths: lengths, pooling: pooling, activation: act, params: q, C: C,
                    mask: mask, y: targets)
                let g = referenceGrads(
                    ref, h: h, B: B, T: T, d: d, lengths: lengths, pooling: pooling, activation: act, params: q,
                    C: C, mask: mask, y: targets, gradLoss: gradLoss)
                // Gradients accumulate: start from non-zero values.
                let names = ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"]
                var start: [String: [Float]] = [:]
                for (i, name) in names.enumerated() {
                    let b = head.core.buffer(name)!
                    start[name] = randomNormal(b.count, seed: 40 + UInt64(i), scale: 0.1)
                    b.grad!.update(from: start[name]!, count: b.count)
                }
                let gh0 = randomNormal(B * T * d, seed: 39, scale: 0.1)
                let (r, logits) = try forward(
                    head, step(train: true, seed: 5), h: h, B: B, T: T, y: targets, lengths: lengths)
                assertClose(logits, ref.logits, "train logits \(label)")
                var gh = gh0
                try gh.withUnsafeMutableBufferPointer {
                    try head.backward(
                        try XCTUnwrap(r.ctx), batch: B, seq: T, gradLoss: Float(gradLoss), gradH: $0.baseAddress!)
                }
                func plus(_ a: [Float], _ b: [Double]) -> [Double] { zip(a, b).map { Double($0) + $1 } }
                assertClose(gh, plus(gh0, g.h), "grad_h \(label)")
                assertClose(grad(head, "fc1.weight"), plus(start["fc1.weight"]!, g.w1), "grad fc1.weight \(label)")
                assertClose(grad(head, "fc1.bias"), plus(start["fc1.bias"]!, g.b1), "grad fc1.bias \(label)")
                assertClose(grad(head, "fc2.weight"), plus(start["fc2.weight"]!, g.w2), "grad fc2.weight \(label)")
                assertClose(grad(head, "fc2.bias"), plus(start["fc2.bias"]!, g.b2), "grad fc2.bias \(label)")
                // Padding positions and the pad row get no gradient.
                for b in 0..<B {
                    for t in 0..<T where t >= Int(lengths[b]) || targets[b] < 0 {
                        let at = (b * T + t) * d
                        XCTAssertEqual(Array(gh[at..<(at + d)]), Array(gh0[at..<(at + d)]), "\(label) b \(b) t \(t)")
                    }
                }
                XCTAssertGreaterThan(g.h.map(abs).max()!, 1e-3, "the reference gradient is not trivially zero")
            }
        }
    }

    func testFrozenBackwardGivesInputGradientOnly() throws {
        let (head, q) = try makeHead(["dropout": 0])
        let h = randomNormal(B * T * d, seed: 17)
        let ref = reference(
            h: h, B: B, T: T, d: d, lengths: lengths, pooling: "mean", activation: "tanh", params: q, C: C, mask: nil,
            y: targets)
        let g = referenceGrads(
            ref, h: h, B: B, T: T, d: d, lengths: lengths, pooling: "mean", activation: "tanh", params: q,
            C: C, mask: nil, y: targets, gradLoss: 1)
        let (r, _) = try forward(head, step(train: true, frozen: true), h: h, B: B, T: T, y: targets, lengths: lengths)
        var gh = [Float](repeating: 0, count: B * T * d)
        try gh.withUnsafeMutableBufferPointer {
            try head.backward(try XCTUnwrap(r.ctx), batch: B, seq: T, gradLoss: 1, gradH: $0.baseAddress!)
        }
        assertClose(gh, g.h, "grad_h")
        for b in head.core.buffers {
            XCTAssertTrue(UnsafeBufferPointer(start: b.grad!, count: b.count).allSatisfy { $0 == 0 }, b.name)
        }
    }

    func testAllTargetsPaddedGivesZeroLossAndNoGradient() throws {
        let (head, _) = try makeHead()
        let h = randomNormal(B * T * d, seed: 18)
        let (r, _) = try forward(
            head, step(train: true), h: h, B: B, T: T, y: [Int32](repeating: -1, count: B), lengths: lengths)
        XCTAssertEqual(r.count, 0)
        XCTAssertEqual(r.loss, 0)
        var gh = [Float](repeating: 0, count: B * T * d)
        try gh.withUnsafeMutableBufferPointer {
            try head.backward(try XCTUnwrap(r.ctx), batch: B, seq: T, gradLoss: 1, gradH: $0.baseAddress!)
        }
        XCTAssertTrue(gh.allSatisfy { $0 == 0 })
        XCTAssertTrue(grad(head, "fc1.weight").allSatisfy { $0 == 0 })
    }

    func testContextOnlyForTrainingForwardsWithGrad() throws {
        let (head, _) = try makeHead()
        let h = randomNormal(B * T * d, seed: 19)
        XCTAssertNotNil(try forward(head, step(train: true), h: h, B: B, T: T, y: targets, lengths: lengths).0.ctx)
        XCTAssertNil(try forward(head, step(train: false), h: h, B: B, T: T, y: targets, lengths: lengths).0.ctx)
        XCTAssertNil(
            try forward(head, step(train: true, noGrad: true), h: h, B: B, T: T, y: targets, lengths: lengths).0.ctx)
    }

    // MARK: errors

    func testErrors() throws {
        let lib = try openPlugin("HeadClassifier")
        XCTAssertThrowsError(try makeInstance(lib, dims: ModelDims(dModel: 8, nClasses: 1))) { e in
            XCTAssertTrue("\(e)".contains("n_classes = 1"), "\(e)")
        }
        XCTAssertThrowsError(try makeInstance(lib, dims: ModelDims(dModel: 0, nClasses: 3))) { e in
            XCTAssertTrue("\(e)".contains("d_model"), "\(e)")
        }
        XCTAssertThrowsError(
            try makeInstance(lib, dims: ModelDims(dModel: 8, nClasses: 3), hyperparameters: ["pooling": "cls"])
        ) { e in
            XCTAssertTrue("\(e)".contains("pooling") && "\(e)".contains("mean, first, last, max"), "\(e)")
        }
        XCTAssertThrowsError(
            try makeInstance(lib, dims: ModelDims(dModel: 8, nClasses: 3), hyperparameters: ["activation": "swish"])
        ) { e in
            XCTAssertTrue("\(e)".contains("activation"), "\(e)")
        }
        XCTAssertThrowsError(
            try makeInstance(lib, dims: ModelDims(dModel: 8, nClasses: 3), hyperparameters: ["dropout": 0.95])
        ) { e in
            XCTAssertTrue("\(e)".contains("dropout"), "\(e)")
        }
        let (head, _) = try makeHead()
        let h = randomNormal(B * T * d, seed: 20)
        for bad in [[Int32](arrayLiteral: 1, 0, 3, 5), [1, 7, 3, 5]] {
            XCTAssertThrowsError(try forward(head, step(train: true), h: h, B: B, T: T, y: targets, lengths: bad)) {
                e in
                XCTAssertTrue("\(e)".contains("lengths[1] = \(bad[1]) is outside [1, \(T)]"), "\(e)")
            }
        }
        XCTAssertThrowsError(
            try forward(head, step(train: true), h: h, B: B, T: T, y: [0, 1, Int32(C), 2], lengths: lengths)
        ) { e in
            XCTAssertTrue("\(e)".contains("target \(C) at row 2"), "\(e)")
        }
    }

    // MARK: the generic checker

    func testGradientCheckerPassesForEveryPoolingAndActivation() throws {
        let lib = try openPlugin("HeadClassifier")
        var configs: [[String: Any]] = [[:], ["dropout": 0.0], ["hidden": 5], ["init_std": 0.5]]
        configs += poolings.map { ["pooling": $0] }
        configs += poolings.map { ["pooling": $0, "init_std": 0.5, "activation": "gelu"] }
        configs += [["activation": "gelu"], ["activation": "tanh"]]
        // ReLU: with init_std 0.02 the FC1 outputs are ~0.05, so the checker's ±0.01 steps on
        // fc1 cross ReLU's kink and central differences stop measuring the derivative;
        // larger weights keep the pre-activations away from 0.
        configs += poolings.map { ["pooling": $0, "activation": "relu", "init_std": 1.0] }
        for hp in configs {
            let results = PluginChecker(library: lib, hyperparameters: hp).run()
            XCTAssertTrue(results.allSatisfy(\.passed), "\(hp):\n" + results.map(\.description).joined(separator: "\n"))
            XCTAssertEqual(results.filter { $0.name.hasPrefix("gradcheck") }.count, 5, "\(hp)")
        }
        // ReLU at the default init_std: a 10x smaller finite-difference step stays off the kink.
        for pooling in poolings {
            var checker = PluginChecker(library: lib, hyperparameters: ["pooling": pooling, "activation": "relu"])
            checker.eps = 1e-3
            let results = checker.run()
            XCTAssertTrue(
                results.allSatisfy(\.passed),
                "relu/\(pooling), eps 1e-3:\n" + results.map(\.description).joined(separator: "\n"))
        }
    }
}
