import Foundation
import VQMoE
import VQMoEABI
import XCTest

/// The `dense` router plugin ("no routing"): every token to expert 0 with weight 1.
final class RouterDenseTests: XCTestCase {
    func makeRouter(E: Int, d: Int) throws -> RouterInstance {
        let lib = try openPlugin("RouterDense")
        return try RouterInstance(makeInstance(lib, dims: ModelDims(dModel: d, nExperts: E)))
    }

    struct Outputs {
        var index: [Int32], weights: [Float], load: [Float], aux: Float, ctx: PluginContext?
    }

    func forward(_ r: RouterInstance, x: [Float], n: Int, step: StepInfo) throws -> Outputs {
        let shape = try r.shape(step)
        XCTAssertEqual(shape, RouterShape(mode: .topK, k: 1))
        var index = [Int32](repeating: -1, count: n), weights = [Float](repeating: -1, count: n)
        var load = [Float](repeating: -1, count: r.nExperts)
        let (aux, ctx) = try x.withUnsafeBufferPointer { xp in
            try index.withUnsafeMutableBufferPointer { ip in
                try weights.withUnsafeMutableBufferPointer { wp in
                    try load.withUnsafeMutableBufferPointer { lp in
                        try r.forward(
                            step, x: xp.baseAddress!, tokenIDs: nil, nGroups: 1, groupSize: n, shape: shape,
                            outputs: RouterOutputs(
                                expertIndex: ip.baseAddress, weights: wp.baseAddress,
                                expertLoad: lp.baseAddress!))
                    }
                }
            }
        }
        return Outputs(index: index, weights: weights, load: load, aux: aux, ctx: ctx)
    }

    func testDescriptorHasNoHyperparametersAndNoBuffers() throws {
        let lib = try openPlugin("RouterDense")
        XCTAssertEqual(lib.name, "dense")
        XCTAssertEqual(lib.version, "1.0.0")
        XCTAssertEqual(lib.kind, .router)
        XCTAssertFalse(lib.hasNoGrad)
        XCTAssertFalse(lib.needsTokenIDs)
        XCTAssertTrue(lib.schema.isEmpty)
        let core = try makeInstance(lib, dims: ModelDims(dModel: 8, nExperts: 1))
        XCTAssertTrue(core.buffers.isEmpty)
        XCTAssertThrowsError(try makeInstance(lib, dims: ModelDims(dModel: 8, nExperts: 1), hyperparameters: ["k": 2]))
        XCTAssertThrowsError(try makeInstance(lib, dims: ModelDims(dModel: 8, nExperts: 0))) { error in
            XCTAssertTrue("\(error)".contains("n_experts"), "\(error)")
        }
    }

    func testEveryTokenGoesToExpertZeroWithWeightOne() throws {
        for E in [1, 4] {
            let r = try makeRouter(E: E, d: 6)
            let n = 13, x = randomNormal(n * 6, seed: 3, scale: 5)
            for step in [
                StepInfo(step: 0, totalSteps: 10, train: true, seed: 1),
                StepInfo(step: 5, totalSteps: 10, train: false, seed: 1),
                StepInfo(step: 5, totalSteps: 10, train: true, noGrad: true, seed: 1),
            ] {
                let out = try forward(r, x: x, n: n, step: step)
                XCTAssertEqual(out.index, [Int32](repeating: 0, count: n))
                XCTAssertEqual(out.weights, [Float](repeating: 1, count: n))
                XCTAssertEqual(out.load, [Float(n)] + [Float](repeating: 0, count: E - 1))
                XCTAssertEqual(out.aux, 0)
                XCTAssertEqual(out.ctx != nil, step.flags == VQMOE_STEP_TRAIN)
            }
        }
    }

    func testBackwardAddsNothing() throws {
        let r = try makeRouter(E: 1, d: 4)
        let n = 6
        let out = try forward(
            r, x: randomNormal(n * 4, seed: 1), n: n, step: StepInfo(step: 0, totalSteps: 1, train: true, seed: 1))
        let start = randomNormal(n * 4, seed: 2)
        var gx = start
        let gw = randomNormal(n, seed: 3)
        try gx.withUnsafeMutableBufferPointer { gp in
            try gw.withUnsafeBufferPointer { wp in
                try r.backward(
                    try XCTUnwrap(out.ctx), n: n, shape: RouterShape(mode: .topK, k: 1), gradWeights: wp.baseAddress,
                    gradAux: 1, gradX: gp.baseAddress!)
            }
        }
        XCTAssertEqual(gx, start)
    }

    func testPluginChecker() throws {
        let lib = try openPlugin("RouterDense")
        for E in [4, 1] {
            let dims = ModelDims(
                dModel: 8, nExperts: E, nCodes: 8, vocabSize: 7, nClasses: 3, seqLen: 5, totalSteps: 100)
            let results = PluginChecker(library: lib, hyperparameters: [[:]], dims: dims).run()
            XCTAssertTrue(
                results.allSatisfy(\.passed), results.filter { !$0.passed }.map(\.description).joined(separator: "\n"))
            XCTAssertTrue(results.contains { $0.name == "gradcheck x" && $0.passed })
        }
    }
}
