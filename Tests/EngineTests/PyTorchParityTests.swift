import Foundation
import VQMoE
import XCTest

/// The engine against PyTorch on the same weights (fixtures written by
/// scripts/make_parity_fixtures.py): logits, loss parts, every parameter gradient, and the
/// losses of 10 Adam steps, for dense, SMoE, a shared expert and VQMoE (three discrete-path inputs), the same
/// for Transformer-XL (relative attention over a memory), and the ViT.
/// Tolerances: 1e-4 relative on values, 1e-3 relative to each tensor's largest gradient.
final class PyTorchParityTests: XCTestCase {
    struct Fixture {
        let json: [String: Any]
        func int(_ k: String) -> Int { json[k] as! Int }
        func floats(_ v: Any?) -> [Float] { (v as! [Any]).map { Float(($0 as! NSNumber).doubleValue) } }
    }

    static let fixtureDir = URL(fileURLWithPath: #filePath).deletingLastPathComponent().appendingPathComponent(
        "Fixtures"
    ).path

    func load(_ mode: String) throws -> Fixture {
        let path = "\(Self.fixtureDir)/parity_\(mode).json"
        let data = try XCTUnwrap(
            FileManager.default.contents(atPath: path), "missing \(path): run scripts/make_parity_fixtures.py")
        return Fixture(json: try JSONSerialization.jsonObject(with: data) as! [String: Any])
    }

    func instance(_ product: String, dims: ModelDims, _ values: [String: Any] = [:]) throws -> PluginInstance {
        let lib = try PluginLibrary.open("\(Registry.executableDirectory())/lib\(product).so")
        // The PyTorch reference is plain VQ-VAE (vqvae's defaults add EMA, k-means init, restarts).
        let plain: [String: Any] =
            product == "QuantizerVQVAE" ? ["ema": false, "kmeans_init": false, "dead_code_threshold": 0.0] : [:]
        let hp = try ResolvedHyperparameters(
            schema: lib.schema, values: plain.merging(values) { _, given in given }, keyPath: product)
        return try PluginInstance(library: lib, instanceName: product, dims: dims, hyperparameters: hp, seed: 1)
    }

    func build(_ fx: Fixture, relative: Bool = false) throws -> Transformer {
        let mode = fx.json["mode"] as! String
        let d = fx.int("d_model"), e = fx.int("n_experts")
        var ffn = FFNConfig(mode: FFNConfig.Mode(rawValue: mode) ?? .vqmoe, dInner: fx.int("d_inner"), nExperts: e)
        if mode.hasPrefix("vqmoe") {
            ffn.discreteInput = FFNConfig.DiscreteInput(rawValue: String(mode.split(separator: "_")[1]))!
        }
        ffn.beta = 0.08
        ffn.mixC = 0.05
        var cfg = TransformerConfig(
            vocabSize: fx.int("vocab"), seqLen: fx.int("seq_len"), nLayer: fx.int("n_layer"),
            nHead: fx.int("n_head"), dModel: d, ffn: ffn)
        if relative {
            cfg.relative = true
            cfg.memLen = fx.int("mem_len")
        }
        let dims = ModelDims(
            dModel: d, nExperts: e, nCodes: e, vocabSize: fx.int("vocab"), seqLen: fx.int("seq_len"), totalSteps: 10)
        let head = try HeadInstance(instance("HeadLM", dims: dims))
        let model = try Transformer(
            config: cfg, head: head,
            components: { _ in
                LayerComponents(
                    router: ffn.usesRouter
                        ? try RouterInstance(self.instance("RouterSMoE", dims: dims, ["k": fx.int("k")])) : nil,
                    quantizer: ffn.usesQuantizer
                        ? try QuantizerInstance(self.instance("QuantizerVQVAE", dims: dims)) : nil)
            }, seed: 1)
        let params = fx.json["params"] as! [String: Any]
        XCTAssertEqual(Set(params.keys), Set(model.parameters.map(\.name)), "parameter names differ from the fixture's")
        for p in model.parameters {
            let entry = params[p.name] as! [String: Any]
            XCTAssertEqual(entry["shape"] as! [Int], p.shape, p.name)
            let values = fx.floats(entry["data"])
            for i in 0..<p.count { p.data[i] = values[i] }
        }
        return model
    }

    func assertClose(
        _ a: [Float], _ b: [Float], relTo scale: Float? = nil, tol: Float, _ what: String,
        file: StaticString = #filePath, line: UInt = #line
    ) {
        XCTAssertEqual(a.count, b.count, what, file: file, line: line)
        let s = scale ?? max(b.map { abs($0) }.max() ?? 1, 1e-6)
        var worst: Float = 0, at = 0
        for i in 0..<min(a.count, b.count) where abs(a[i] - b[i]) > worst { worst = abs(a[i] - b[i]); at = i }
        XCTAssertLessThanOrEqual(
            worst, tol * s, "\(what): worst |diff| \(worst) at \(at) (ours \(a[at]), torch \(b[at]), scale \(s))",
            file: file, line: line)
    }

    /// The loss parts of a forward against the fixture's.
    func assertLosses(
        _ parts: LossParts, _ fx: Fixture, _ what: String, file: StaticString = #filePath, line: UInt = #line
    ) {
        let loss = fx.json["loss"] as! [String: Double]
        XCTAssertEqual(
            Double(parts.task), loss["task"]!, accuracy: 1e-4 * max(1, loss["task"]!), "\(what) task loss", file: file,
            line: line)
        XCTAssertEqual(Double(parts.aux), loss["aux"]!, accuracy: 1e-5, "\(what) aux loss", file: file, line: line)
        XCTAssertEqual(
            Double(parts.vq), loss["vq"]!, accuracy: 1e-4 * max(1, loss["vq"]!), "\(what) vq loss", file: file,
            line: line)
        XCTAssertEqual(
            Double(parts.total), loss["total"]!, accuracy: 1e-4 * max(1, loss["total"]!), "\(what) total loss",
            file: file, line: line)
    }

    /// Every parameter gradient of the last backward against the fixture's.
    func assertGradients(_ model: Transformer, _ fx: Fixture, _ what: String) {
        let grads = fx.json["grads"] as! [String: Any]
        for p in model.parameters {
            assertClose(
                Array(UnsafeBufferPointer(start: p.grad, count: p.count)), fx.floats(grads[p.name]), tol: 1e-3,
                "\(what) grad \(p.name)")
        }
    }

    /// The total losses of 10 Adam steps (lr 1e-2, clipping at 1.0), `forward(step)` running
    /// the training forward, against the fixture's.
    func assertAdamLosses(
        _ model: Transformer, _ fx: Fixture, _ what: String, forward: (Int) throws -> LossParts
    ) throws {
        var tc = TrainConfig()
        tc.lr = 1e-2
        tc.gradClip = 1
        let opt = AdamOptimizer(parameters: model.parameters, config: tc)
        model.zeroGrads()
        var ours: [Float] = []
        for s in 0..<10 {
            ours.append(try forward(s).total)
            try model.backward()
            clipGradients(model.parameters, maxNorm: 1)
            opt.step(lr: 1e-2)
            model.zeroGrads()
        }
        assertClose(ours, fx.floats(fx.json["adam_losses"]), relTo: 1, tol: 2e-3, "\(what) Adam losses")
    }

    func check(_ mode: String) throws {
        let fx = try load(mode)
        let model = try build(fx)
        let b = fx.int("batch"), t = fx.int("seq_len"), v = fx.int("vocab")
        let tokens = (fx.json["tokens"] as! [Int]).map(Int32.init),
            targets = (fx.json["targets"] as! [Int]).map(Int32.init)
        var logits = [Float](repeating: 0, count: b * t * v)
        let parts = try model.forward(tokens: tokens, targets: targets, batch: b, step: 0, train: true, logits: &logits)
        assertClose(logits, fx.floats(fx.json["logits"]), tol: 1e-4, "\(mode) logits")
        assertLosses(parts, fx, mode)
        model.zeroGrads()
        try model.backward()
        assertGradients(model, fx, mode)
        // 10 Adam steps on the same batch.
        try assertAdamLosses(model, fx, mode) { s in
            try model.forward(tokens: tokens, targets: targets, batch: b, step: s, train: true)
        }
    }

    func testDense() throws { try check("dense") }
    func testSMoE() throws { try check("smoe") }
    func testVQMoEMix() throws { try check("vqmoe_mix") }
    func testVQMoESTE() throws { try check("vqmoe_ste") }
    func testVQMoEX() throws { try check("vqmoe_x") }
    /// DeepSeekMoE's shared expert beside the routed ones (y = SMoE(x) + S(x)).
    func testSharedExpert() throws { try check("shared") }

    // MARK: Transformer-XL

    /// Segment 1 of each stream over the memory segment 0 left (logits, losses, every gradient),
    /// then 10 Adam steps on segments 0, 1, 2, 0, … with the memory carried between steps.
    func checkTXL(_ mode: String) throws {
        let fx = try load("txl_\(mode)")
        let model = try build(fx, relative: true)
        let b = fx.int("batch"), t = fx.int("seq_len"), v = fx.int("vocab"), segs = fx.int("segments")
        let tokens = (fx.json["tokens"] as! [Int]).map(Int32.init),
            targets = (fx.json["targets"] as! [Int]).map(Int32.init)
        func segment(_ all: [Int32], _ s: Int) -> [Int32] {
            var out: [Int32] = []
            for row in 0..<b {
                let start = (row * segs + s) * t
                out += all[start..<(start + t)]
            }
            return out
        }
        _ = try model.forward(tokens: segment(tokens, 0), targets: segment(targets, 0), batch: b, step: 0, train: true)
        try model.backward()
        model.zeroGrads()
        XCTAssertEqual(model.trainMemory?.length, fx.int("mem_len"))
        var logits = [Float](repeating: 0, count: b * t * v)
        let parts = try model.forward(
            tokens: segment(tokens, 1), targets: segment(targets, 1), batch: b, step: 1, train: true, logits: &logits)
        assertClose(logits, fx.floats(fx.json["logits"]), tol: 1e-4, "txl \(mode) logits")
        assertLosses(parts, fx, "txl \(mode)")
        try model.backward()
        assertGradients(model, fx, "txl \(mode)")
        model.resetTrainMemory()
        try assertAdamLosses(model, fx, "txl \(mode)") { s in
            try model.forward(
                tokens: segment(tokens, s % segs), targets: segment(targets, s % segs), batch: b, step: s, train: true)
        }
    }

    func testTXLDense() throws { try checkTXL("dense") }
    func testTXLSMoE() throws { try checkTXL("smoe") }
    func testTXLVQMoE() throws { try checkTXL("vqmoe_mix") }

    // MARK: ViT

    func checkViT(_ mode: String) throws {
        let fx = try load(mode)
        let d = fx.int("d_model"), e = fx.int("n_experts"), img = fx.json["image"] as! [Int],
            classes = fx.int("classes")
        let shape = ImageShape(channels: img[0], height: img[1], width: img[2], patch: fx.int("patch"))
        var ffn = FFNConfig(
            mode: mode == "vit_dense" ? .dense : mode == "vit_vqmoe" ? .vqmoe : .smoe, dInner: fx.int("d_inner"),
            nExperts: e)
        ffn.discreteInput = .mix
        ffn.allowTokenMixing = true
        var cfg = TransformerConfig(
            vocabSize: 0, seqLen: shape.tokens, nLayer: fx.int("n_layer"), nHead: fx.int("n_head"), dModel: d, ffn: ffn)
        cfg.image = shape
        cfg.causal = false
        let dims = ModelDims(dModel: d, nExperts: e, nCodes: e, nClasses: classes, seqLen: shape.tokens, totalSteps: 10)
        let head = try HeadInstance(instance("HeadImageClassifier", dims: dims))
        let model = try Transformer(
            config: cfg, head: head,
            components: { _ in
                switch mode {
                case "vit_softmoe":
                    return LayerComponents(
                        router: try RouterInstance(
                            self.instance("RouterSoftMoE", dims: dims, ["slots_per_expert": fx.int("slots")])))
                case "vit_smoe":
                    return LayerComponents(
                        router: try RouterInstance(self.instance("RouterSMoE", dims: dims, ["k": fx.int("k")])))
                case "vit_vqmoe":
                    return LayerComponents(
                        router: try RouterInstance(self.instance("RouterSMoE", dims: dims, ["k": fx.int("k")])),
                        quantizer: try QuantizerInstance(self.instance("QuantizerVQVAE", dims: dims)))
                default: return LayerComponents()
                }
            }, seed: 1)
        let params = fx.json["params"] as! [String: Any]
        XCTAssertEqual(Set(params.keys), Set(model.parameters.map(\.name)), "parameter names differ from the fixture's")
        for p in model.parameters {
            let entry = params[p.name] as! [String: Any]
            XCTAssertEqual(entry["shape"] as! [Int], p.shape, p.name)
            let values = fx.floats(entry["data"])
            for i in 0..<p.count { p.data[i] = values[i] }
        }
        let b = fx.int("batch")
        let images = fx.floats(fx.json["images"]), targets = (fx.json["targets"] as! [Int]).map(Int32.init)
        var logits = [Float](repeating: 0, count: b * classes)
        let parts = try model.forward(
            tokens: nil, images: images, targets: targets, batch: b, step: 0, train: true, logits: &logits)
        assertClose(logits, fx.floats(fx.json["logits"]), tol: 1e-4, "\(mode) logits")
        assertLosses(parts, fx, mode)
        model.zeroGrads()
        try model.backward()
        assertGradients(model, fx, mode)
    }

    func testViTDense() throws { try checkViT("vit_dense") }
    func testViTSMoE() throws { try checkViT("vit_smoe") }
    func testViTVQMoE() throws { try checkViT("vit_vqmoe") }
    func testViTSoftMoE() throws { try checkViT("vit_softmoe") }
}
