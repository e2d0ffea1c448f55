import Foundation
import VQMoE
import VQMoEABI
import XCTest

/// The `softmoe` router plugin against a brute-force double-precision reference: dispatch and
/// combine values and normalisation, groups independent, gradients of x, Phi and the scale.
final class RouterSoftMoETests: XCTestCase {
    let d = 5, E = 3

    /// A router whose Phi (d, E*S) (and scale) are overwritten with known random values.
    func makeRouter(
        E: Int, d: Int, hp: [String: Any] = [:], seed: UInt64 = 1, scale: Float = 1.7
    ) throws -> (RouterInstance, [Float], Float) {
        let lib = try openPlugin("RouterSoftMoE")
        let core = try makeInstance(lib, dims: ModelDims(dModel: d, nExperts: E), hyperparameters: hp, seed: seed)
        let r = try RouterInstance(core)
        let phi = try XCTUnwrap(core.buffer("phi"))
        phi.floats.update(from: randomNormal(phi.count, seed: seed &+ 100, scale: 0.8), count: phi.count)
        var s: Float = 1
        if let sb = core.buffer("scale") { sb.floats[0] = scale; s = scale }
        return (r, Array(UnsafeBufferPointer(start: phi.floats, count: phi.count)), s)
    }

    struct Outputs {
        var dispatch: [Float], combine: [Float], load: [Float], aux: Float, ctx: PluginContext?
    }

    func forward(
        _ r: RouterInstance, x: [Float], groups: Int,
        step: StepInfo = StepInfo(step: 0, totalSteps: 10, train: true, seed: 1)
    ) throws -> Outputs {
        let n = x.count / r.dModel
        let shape = try r.shape(step)
        XCTAssertEqual(shape.mode, .dense)
        let es = r.nExperts * shape.slotsPerExpert
        var disp = [Float](repeating: -1, count: n * es), comb = disp, load = [Float](repeating: -1, count: r.nExperts)
        let (aux, ctx) = try x.withUnsafeBufferPointer { xp in
            try disp.withUnsafeMutableBufferPointer { dp in
                try comb.withUnsafeMutableBufferPointer { cp in
                    try load.withUnsafeMutableBufferPointer { lp in
                        try r.forward(
                            step, x: xp.baseAddress!, tokenIDs: nil, nGroups: groups, groupSize: n / groups,
                            shape: shape,
                            outputs: RouterOutputs(
                                dispatch: dp.baseAddress, combine: cp.baseAddress, expertLoad: lp.baseAddress!))
                    }
                }
            }
        }
        return Outputs(dispatch: disp, combine: comb, load: load, aux: aux, ctx: ctx)
    }

    func backward(
        _ r: RouterInstance, _ ctx: PluginContext, n: Int, slots: Int, gd: [Float]?, gc: [Float]?, gradX: inout [Float]
    ) throws {
        let shape = RouterShape(mode: .dense, k: 0, slotsPerExpert: slots)
        try gradX.withUnsafeMutableBufferPointer { gp in
            try (gd ?? []).withUnsafeBufferPointer { dp in
                try (gc ?? []).withUnsafeBufferPointer { cp in
                    try r.backward(
                        ctx, n: n, shape: shape, gradDispatch: gd == nil ? nil : dp.baseAddress,
                        gradCombine: gc == nil ? nil : cp.baseAddress, gradAux: 1, gradX: gp.baseAddress!)
                }
            }
        }
    }

    // MARK: the brute-force reference

    /// In double, from the definitions: L = scale (x_t/||x_t||) · (Φ_j/||Φ_j||) (or x Φ),
    /// D = softmax over the tokens of each group per column, C = softmax over columns per row.
    func reference(
        x: [Double], phi: [Double], scale: Double, d: Int, es: Int, groups: Int, normalize: Bool = true
    )
        -> (logits: [Double], dispatch: [Double], combine: [Double])
    {
        let n = x.count / d, tg = n / groups
        var L = [Double](repeating: 0, count: n * es)
        var colNorm = [Double](repeating: 0, count: es)
        for j in 0..<es {
            colNorm[j] = ((0..<d).map { phi[$0 * es + j] * phi[$0 * es + j] }.reduce(0, +) + 1e-12).squareRoot()
        }
        for t in 0..<n {
            let rn = ((0..<d).map { x[t * d + $0] * x[t * d + $0] }.reduce(0, +) + 1e-12).squareRoot()
            for j in 0..<es {
                var v = 0.0
                for i in 0..<d {
                    v +=
                        normalize
                        ? (x[t * d + i] / rn) * (phi[i * es + j] / colNorm[j]) : x[t * d + i] * phi[i * es + j]
                }
                L[t * es + j] = normalize ? scale * v : v
            }
        }
        var D = L, C = L
        for g in 0..<groups {
            for j in 0..<es {
                let rows = (g * tg)..<((g + 1) * tg)
                let m = rows.map { L[$0 * es + j] }.max()!
                let z = rows.map { exp(L[$0 * es + j] - m) }.reduce(0, +)
                for t in rows { D[t * es + j] = exp(L[t * es + j] - m) / z }
            }
        }
        for t in 0..<n {
            let row = L[(t * es)..<(t * es + es)], m = row.max()!
            let z = row.map { exp($0 - m) }.reduce(0, +)
            for j in 0..<es { C[t * es + j] = exp(L[t * es + j] - m) / z }
        }
        return (L, D, C)
    }

    /// Central differences (h = 1e-6, double) of J = Σ r⊙D + Σ s⊙C with respect to x, Phi
    /// and the scale.
    func referenceGradients(
        x: [Double], phi: [Double], scale: Double, d: Int, es: Int, groups: Int, normalize: Bool,
        gd: [Float]?, gc: [Float]?
    ) -> (gx: [Double], gphi: [Double], gscale: Double) {
        var vars = [x, phi, [scale]]
        func objective() -> Double {
            let ref = reference(
                x: vars[0], phi: vars[1], scale: vars[2][0], d: d, es: es, groups: groups, normalize: normalize)
            var j = 0.0
            if let gd { for i in 0..<gd.count { j += Double(gd[i]) * ref.dispatch[i] } }
            if let gc { for i in 0..<gc.count { j += Double(gc[i]) * ref.combine[i] } }
            return j
        }
        var grads: [[Double]] = []
        let h = 1e-6
        for v in 0..<3 {
            var g = [Double](repeating: 0, count: vars[v].count)
            for i in 0..<vars[v].count {
                let orig = vars[v][i]
                vars[v][i] = orig + h; let plus = objective()
                vars[v][i] = orig - h; let minus = objective()
                vars[v][i] = orig
                g[i] = (plus - minus) / (2 * h)
            }
            grads.append(g)
        }
        return (grads[0], grads[1], grads[2][0])
    }

    // MARK: descriptor, schema, buffers

    func testDescriptorAndSchema() throws {
        let lib = try openPlugin("RouterSoftMoE")
        XCTAssertEqual(lib.name, "softmoe")
        XCTAssertEqual(lib.version, "1.0.0")
        XCTAssertEqual(lib.kind, .router)
        XCTAssertFalse(lib.needsTokenIDs)
        XCTAssertFalse(lib.hasNoGrad)
        XCTAssertEqual(lib.schema.map(\.name), ["slots_per_expert", "normalize"])
        let byName = Dictionary(uniqueKeysWithValues: lib.schema.map { ($0.name, $0) })
        XCTAssertEqual(byName["slots_per_expert"]?.type, .int)
        XCTAssertEqual(byName["slots_per_expert"]?.defaultNumber, 1)
        XCTAssertEqual(byName["slots_per_expert"]?.min, 1)
        XCTAssertEqual(byName["slots_per_expert"]?.max, 64)
        XCTAssertEqual(byName["normalize"]?.type, .bool)
        XCTAssertEqual(byName["normalize"]?.defaultNumber, 1)
        XCTAssertTrue(lib.schema.allSatisfy { !$0.description.isEmpty })
    }

    func testShapeBuffersAndInit() throws {
        let lib = try openPlugin("RouterSoftMoE")
        let d = 64, E = 8
        let core = try makeInstance(
            lib, dims: ModelDims(dModel: d, nExperts: E), hyperparameters: ["slots_per_expert": 4], seed: 7)
        let r = try RouterInstance(core)
        XCTAssertEqual(
            try r.shape(StepInfo(step: 0, totalSteps: 1, train: true, seed: 1)),
            RouterShape(mode: .dense, k: 0, slotsPerExpert: 4))
        XCTAssertEqual(core.buffers.map(\.name), ["phi", "scale"])
        XCTAssertEqual(core.buffers.map(\.shape), [[d, E * 4], [1]])
        XCTAssertTrue(core.buffers.allSatisfy(\.isParameter))
        XCTAssertEqual(core.buffer("scale")!.flags & VQMOE_BUF_NO_DECAY, VQMOE_BUF_NO_DECAY)
        XCTAssertEqual(core.buffer("scale")!.floats[0], 1)
        // Phi ~ N(0, 1/d).
        let phi = core.buffer("phi")!
        let v = (0..<phi.count).map { Double(phi.floats[$0]) }
        let mean = v.reduce(0, +) / Double(v.count)
        let std = (v.map { ($0 - mean) * ($0 - mean) }.reduce(0, +) / Double(v.count)).squareRoot()
        XCTAssertEqual(std, 1 / Double(d).squareRoot(), accuracy: 0.01)
        XCTAssertEqual(mean, 0, accuracy: 0.01)
        let again = try makeInstance(
            lib, dims: ModelDims(dModel: d, nExperts: E), hyperparameters: ["slots_per_expert": 4], seed: 7)
        XCTAssertEqual(memcmp(phi.data, again.buffer("phi")!.data, phi.byteCount), 0)
        // normalize = false: plain x Phi, no scale.
        let plain = try makeInstance(
            lib, dims: ModelDims(dModel: d, nExperts: E), hyperparameters: ["normalize": false])
        XCTAssertEqual(plain.buffers.map(\.name), ["phi"])
        XCTAssertEqual(plain.buffers.map(\.shape), [[d, E]])
    }

    func testErrors() throws {
        let lib = try openPlugin("RouterSoftMoE")
        for bad in [0, 65] {
            XCTAssertThrowsError(
                try makeInstance(
                    lib, dims: ModelDims(dModel: 4, nExperts: 2), hyperparameters: ["slots_per_expert": bad])
            ) { error in
                XCTAssertTrue("\(error)".contains("slots_per_expert"), "\(error)")
            }
        }
        XCTAssertThrowsError(try makeInstance(lib, dims: ModelDims(dModel: 4, nExperts: 0))) { error in
            XCTAssertTrue("\(error)".contains("n_experts"), "\(error)")
        }
        XCTAssertThrowsError(try makeInstance(lib, dims: ModelDims(dModel: 0, nExperts: 2))) { error in
            XCTAssertTrue("\(error)".contains("d_model"), "\(error)")
        }
        let (r, _, _) = try makeRouter(E: E, d: d)
        var x = randomNormal(4 * d, seed: 3)
        x[2] = .infinity
        XCTAssertThrowsError(try forward(r, x: x, groups: 2)) { error in
            XCTAssertEqual((error as? VQMoEError)?.category, .numeric, "\(error)")
        }
    }

    /// Straight through the C ABI: n_groups * group_size must equal N.
    func testGroupsMustCoverTheTokens() throws {
        let lib = try openPlugin("RouterSoftMoE")
        let desc = lib.desc.pointee
        let api = desc.kind_api!.load(as: vqmoe_router_api.self)
        var inst: OpaquePointer?
        let created: Int32 = "abi.test".withCString { name in
            "".withCString { root in
                var info = vqmoe_create_info(
                    abi_version: UInt32(VQMOE_ABI_VERSION), struct_size: UInt32(MemoryLayout<vqmoe_create_info>.size),
                    host: UnsafePointer(HostRuntime.api), instance_name: name, seed: 1, d_model: 2, n_experts: 2,
                    n_codes: 0, vocab_size: 0, n_classes: 0, seq_len: 0, total_steps: 10, data_root: root,
                    binding_size: 0)
                return desc.create!(&info, nil, &inst)
            }
        }
        XCTAssertEqual(created, VQMOE_OK)
        let h = try XCTUnwrap(inst)
        defer { desc.destroy!(h) }
        var phi: [Float] = [1, 0, 0, 1], scale: [Float] = [1], gphi = [Float](repeating: 0, count: 4),
            gscale: [Float] = [0]
        var x: [Float] = [1, 2, 3, 4, 5, 6], disp = [Float](repeating: 0, count: 6), comb = disp,
            load: [Float] = [0, 0]
        let xs: [Int64] = [3, 2], ls: [Int64] = [2]
        var ctx: UnsafeMutableRawPointer?
        func view(_ p: UnsafeMutableRawPointer, _ s: UnsafePointer<Int64>, _ nd: Int32) -> vqmoe_tensor {
            vqmoe_tensor(
                data: p, device: vqmoe_device(device_type: VQMOE_DEVICE_CPU, device_id: 0), ndim: nd,
                dtype: vqmoe_f32(),
                shape: s, strides: nil, byte_offset: 0)
        }
        _ = HostRuntime.takeError()
        let status: Int32 = phi.withUnsafeMutableBytes { pb in
            scale.withUnsafeMutableBytes { sb in
                gphi.withUnsafeMutableBufferPointer { gp in
                    gscale.withUnsafeMutableBufferPointer { gs in
                        x.withUnsafeMutableBytes { xb in
                            disp.withUnsafeMutableBytes { db in
                                comb.withUnsafeMutableBytes { cb in
                                    load.withUnsafeMutableBytes { lb in
                                        xs.withUnsafeBufferPointer { xsp in
                                            ls.withUnsafeBufferPointer { lsp in
                                                let bindings = [
                                                    vqmoe_buffer_binding(data: pb.baseAddress, grad: gp.baseAddress),
                                                    vqmoe_buffer_binding(data: sb.baseAddress, grad: gs.baseAddress),
                                                ]
                                                guard desc.bind_buffers!(h, bindings, 2) == VQMOE_OK else { return -1 }
                                                var input = vqmoe_router_input(
                                                    struct_size: UInt32(MemoryLayout<vqmoe_router_input>.size),
                                                    x: view(xb.baseAddress!, xsp.baseAddress!, 2),
                                                    token_ids: vqmoe_tensor(),
                                                    n_groups: 2, group_size: 2)  // 2 * 2 != 3 tokens
                                                var out = vqmoe_router_output(
                                                    struct_size: UInt32(MemoryLayout<vqmoe_router_output>.size),
                                                    expert_index: vqmoe_tensor(), weights: vqmoe_tensor(),
                                                    dispatch: view(db.baseAddress!, xsp.baseAddress!, 2),
                                                    combine: view(cb.baseAddress!, xsp.baseAddress!, 2),
                                                    expert_load: view(lb.baseAddress!, lsp.baseAddress!, 1), aux_loss: 0
                                                )
                                                var s = vqmoe_step_info(
                                                    struct_size: UInt32(MemoryLayout<vqmoe_step_info>.size),
                                                    flags: VQMOE_STEP_TRAIN,
                                                    step: 0, total_steps: 10, seed: 1, token_offset: 0, global_tokens: 0
                                                )
                                                return api.forward!(h, &s, &input, &out, &ctx)
                                            }
                                        }
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
        HostRuntime.releaseScratch()
        XCTAssertEqual(status, VQMOE_ERR_SHAPE)
        XCTAssertNil(ctx)
        let msg = HostRuntime.takeError() ?? ""
        XCTAssertTrue(msg.contains("n_groups = 2") && msg.contains("group_size = 2") && msg.contains("3 tokens"), msg)
    }

    // MARK: forward

    func checkForward(slots: Int, normalize: Bool, groups: Int, groupSize: Int, seed: UInt64 = 1) throws {
        let (r, phi, scale) = try makeRouter(
            E: E, d: d, hp: ["slots_per_expert": slots, "normalize": normalize], seed: seed)
        let n = groups * groupSize, es = E * slots
        let x = randomNormal(n * d, seed: seed &+ 11, scale: 1.5)
        let out = try forward(r, x: x, groups: groups)
        let ref = reference(
            x: x.map(Double.init), phi: phi.map(Double.init), scale: Double(scale), d: d, es: es, groups: groups,
            normalize: normalize)
        for i in 0..<(n * es) {
            XCTAssertEqual(Double(out.dispatch[i]), ref.dispatch[i], accuracy: 1e-5, "dispatch[\(i)]")
            XCTAssertEqual(Double(out.combine[i]), ref.combine[i], accuracy: 1e-5, "combine[\(i)]")
        }
        // Normalisation: each slot's column sums to 1 within every group, each token's row to 1.
        for g in 0..<groups {
            for j in 0..<es {
                let col = (g * groupSize..<(g + 1) * groupSize).map { Double(out.dispatch[$0 * es + j]) }
                XCTAssertEqual(col.reduce(0, +), 1, accuracy: 1e-5, "group \(g) slot \(j)")
            }
        }
        for t in 0..<n {
            XCTAssertEqual(out.combine[(t * es)..<(t * es + es)].map(Double.init).reduce(0, +), 1, accuracy: 1e-5)
        }
        XCTAssertTrue(out.dispatch.allSatisfy { $0 > 0 } && out.combine.allSatisfy { $0 > 0 })
        // expert_load_e = combine mass of e's slots over the tokens (sums to N).
        for e in 0..<E {
            var mass = 0.0
            for t in 0..<n { for s in 0..<slots { mass += Double(out.combine[t * es + e * slots + s]) } }
            XCTAssertEqual(Double(out.load[e]), mass, accuracy: 1e-4)
        }
        XCTAssertEqual(out.load.map(Double.init).reduce(0, +), Double(n), accuracy: 1e-3)
        XCTAssertEqual(out.aux, 0)
        XCTAssertNotNil(out.ctx)
    }

    func testForwardMatchesReference() throws {
        try checkForward(slots: 1, normalize: true, groups: 2, groupSize: 5)
        try checkForward(slots: 3, normalize: true, groups: 3, groupSize: 4, seed: 2)
        try checkForward(slots: 2, normalize: false, groups: 2, groupSize: 6, seed: 3)
        try checkForward(slots: 1, normalize: true, groups: 1, groupSize: 7, seed: 4)
        try checkForward(slots: 2, normalize: true, groups: 4, groupSize: 1, seed: 5)  // one token: dispatch = 1
    }

    func testNormalizationIgnoresScaleOfXAndPhi() throws {
        // With normalize, scaling a token or a slot column by a positive factor changes nothing.
        let (r, phi, _) = try makeRouter(E: E, d: d, hp: ["slots_per_expert": 2])
        let n = 6, es = 2 * E
        var x = randomNormal(n * d, seed: 4)
        let a = try forward(r, x: x, groups: 2)
        for i in 0..<d { x[2 * d + i] *= 7 }
        let buf = r.core.buffer("phi")!
        for i in 0..<d { buf.floats[i * es + 3] = phi[i * es + 3] * 0.1 }
        let b = try forward(r, x: x, groups: 2)
        for i in 0..<(n * es) {
            XCTAssertEqual(a.dispatch[i], b.dispatch[i], accuracy: 1e-6)
            XCTAssertEqual(a.combine[i], b.combine[i], accuracy: 1e-6)
        }
    }

    func testGroupsAreIndependent() throws {
        // Routing two groups together equals routing each alone, and changing one group's
        // tokens leaves the other group's dispatch and combine unchanged.
        let (r, _, _) = try makeRouter(E: E, d: d, hp: ["slots_per_expert": 2], seed: 6)
        let tg = 4, es = 2 * E
        let x = randomNormal(2 * tg * d, seed: 8)
        let both = try forward(r, x: x, groups: 2)
        let first = try forward(r, x: Array(x[0..<(tg * d)]), groups: 1)
        let second = try forward(r, x: Array(x[(tg * d)...]), groups: 1)
        for i in 0..<(tg * es) {
            XCTAssertEqual(both.dispatch[i], first.dispatch[i], accuracy: 1e-6)
            XCTAssertEqual(both.dispatch[tg * es + i], second.dispatch[i], accuracy: 1e-6)
            XCTAssertEqual(both.combine[tg * es + i], second.combine[i], accuracy: 1e-6)
        }
        var y = x
        for i in (tg * d)..<(2 * tg * d) { y[i] = -2 * y[i] + 0.3 }
        let changed = try forward(r, x: y, groups: 2)
        XCTAssertEqual(Array(changed.dispatch[0..<(tg * es)]), Array(both.dispatch[0..<(tg * es)]))
        XCTAssertNotEqual(Array(changed.dispatch[(tg * es)...]), Array(both.dispatch[(tg * es)...]))
        // One pooled group differs from two: the dispatch softmax runs over the group's tokens only.
        let pooled = try forward(r, x: x, groups: 1)
        XCTAssertGreaterThan(zip(pooled.dispatch, both.dispatch).map { abs($0 - $1) }.max()!, 1e-3)
        // And the gradient of group 0's outputs does not reach group 1's tokens.
        let gd = (0..<(2 * tg * es)).map { $0 < tg * es ? Float(($0 % 5)) - 2 : 0 }
        var gx = [Float](repeating: 0, count: 2 * tg * d)
        try backward(r, try XCTUnwrap(both.ctx), n: 2 * tg, slots: 2, gd: gd, gc: gd, gradX: &gx)
        XCTAssertTrue(gx[(tg * d)...].allSatisfy { $0 == 0 })
        XCTAssertGreaterThan(gx[0..<(tg * d)].map(abs).max()!, 1e-3)
    }

    func testEvalAndNoGradSaveNoContext() throws {
        let (r, _, _) = try makeRouter(E: E, d: d)
        let x = randomNormal(6 * d, seed: 4)
        let eval = try forward(r, x: x, groups: 2, step: StepInfo(step: 0, totalSteps: 10, train: false, seed: 1))
        XCTAssertNil(eval.ctx)
        XCTAssertNil(
            try forward(r, x: x, groups: 2, step: StepInfo(step: 0, totalSteps: 10, train: true, noGrad: true, seed: 1))
                .ctx)
        let tr = try forward(r, x: x, groups: 2)
        XCTAssertNotNil(tr.ctx)
        XCTAssertEqual(eval.dispatch, tr.dispatch)
        XCTAssertEqual(eval.combine, tr.combine)
    }

    // MARK: backward

    func checkBackward(
        slots: Int, normalize: Bool, groups: Int, groupSize: Int, withDispatch: Bool, withCombine: Bool,
        seed: UInt64 = 1
    ) throws {
        let (r, phi, scale) = try makeRouter(
            E: E, d: d, hp: ["slots_per_expert": slots, "normalize": normalize], seed: seed)
        let n = groups * groupSize, es = E * slots
        let x = randomNormal(n * d, seed: seed &+ 21, scale: 1.2)
        let out = try forward(r, x: x, groups: groups)
        let gd = withDispatch ? randomNormal(n * es, seed: seed &+ 31) : nil
        let gc = withCombine ? randomNormal(n * es, seed: seed &+ 41) : nil
        // Gradients accumulate: start from non-zero values.
        for b in r.core.parameters { b.grad!.update(repeating: 0.5, count: b.count) }
        var gx = [Float](repeating: -1, count: n * d)
        try backward(r, try XCTUnwrap(out.ctx), n: n, slots: slots, gd: gd, gc: gc, gradX: &gx)
        let want = referenceGradients(
            x: x.map(Double.init), phi: phi.map(Double.init), scale: Double(scale), d: d, es: es,
            groups: groups, normalize: normalize, gd: gd, gc: gc)
        for i in 0..<(n * d) {
            XCTAssertEqual(Double(gx[i]), -1 + want.gx[i], accuracy: 1e-4 * max(1, abs(want.gx[i])), "grad_x[\(i)]")
        }
        let gphi = r.core.buffer("phi")!.grad!
        for i in 0..<(d * es) {
            XCTAssertEqual(
                Double(gphi[i]), 0.5 + want.gphi[i], accuracy: 1e-4 * max(1, abs(want.gphi[i])), "grad_phi[\(i)]")
        }
        if normalize {
            XCTAssertEqual(
                Double(r.core.buffer("scale")!.grad![0]), 0.5 + want.gscale, accuracy: 1e-4 * max(1, abs(want.gscale)))
            XCTAssertGreaterThan(abs(want.gscale), 1e-4)
        }
        XCTAssertGreaterThan(want.gx.map(abs).max()!, 1e-3)
    }

    func testBackwardMatchesReference() throws {
        try checkBackward(slots: 1, normalize: true, groups: 2, groupSize: 5, withDispatch: true, withCombine: true)
        try checkBackward(
            slots: 3, normalize: true, groups: 3, groupSize: 3, withDispatch: true, withCombine: true, seed: 2)
        try checkBackward(
            slots: 2, normalize: true, groups: 2, groupSize: 4, withDispatch: true, withCombine: false, seed: 3)
        try checkBackward(
            slots: 2, normalize: true, groups: 2, groupSize: 4, withDispatch: false, withCombine: true, seed: 4)
        try checkBackward(
            slots: 2, normalize: false, groups: 2, groupSize: 5, withDispatch: true, withCombine: true, seed: 5)
        try checkBackward(
            slots: 1, normalize: false, groups: 1, groupSize: 6, withDispatch: true, withCombine: false, seed: 6)
    }

    func testFrozenGivesInputGradientOnly() throws {
        let (r, phi, scale) = try makeRouter(E: E, d: d, hp: ["slots_per_expert": 2], seed: 7)
        let n = 8, es = 2 * E
        let x = randomNormal(n * d, seed: 9)
        let out = try forward(
            r, x: x, groups: 2, step: StepInfo(step: 0, totalSteps: 10, train: true, frozen: true, seed: 1))
        let gd = randomNormal(n * es, seed: 10), gc = randomNormal(n * es, seed: 11)
        var gx = [Float](repeating: 0, count: n * d)
        try backward(r, try XCTUnwrap(out.ctx), n: n, slots: 2, gd: gd, gc: gc, gradX: &gx)
        let want = referenceGradients(
            x: x.map(Double.init), phi: phi.map(Double.init), scale: Double(scale), d: d, es: es,
            groups: 2, normalize: true, gd: gd, gc: gc)
        for i in 0..<(n * d) { XCTAssertEqual(Double(gx[i]), want.gx[i], accuracy: 1e-4 * max(1, abs(want.gx[i]))) }
        for b in r.core.parameters { XCTAssertTrue((0..<b.count).allSatisfy { b.grad![$0] == 0 }, b.name) }
    }

    func testBackwardUsesForwardTimeValues() throws {
        let (r, phi, scale) = try makeRouter(E: E, d: d, seed: 8)
        let n = 6, es = E
        let x = randomNormal(n * d, seed: 12)
        let out = try forward(r, x: x, groups: 2)
        r.core.buffer("phi")!.floats.update(repeating: 3, count: d * es)
        r.core.buffer("scale")!.floats[0] = -2
        let gd = randomNormal(n * es, seed: 13)
        var gx = [Float](repeating: 0, count: n * d)
        try backward(r, try XCTUnwrap(out.ctx), n: n, slots: 1, gd: gd, gc: nil, gradX: &gx)
        let want = referenceGradients(
            x: x.map(Double.init), phi: phi.map(Double.init), scale: Double(scale), d: d, es: es,
            groups: 2, normalize: true, gd: gd, gc: nil)
        for i in 0..<(n * d) { XCTAssertEqual(Double(gx[i]), want.gx[i], accuracy: 1e-4 * max(1, abs(want.gx[i]))) }
    }

    func testLargerProblemOnTwoThreadsMatchesOneThread() throws {
        let threads = HostRuntime.threads
        defer { HostRuntime.configure(threads: threads) }
        let groups = 12, tg = 40, E = 8, S = 4, d = 16, n = groups * tg, es = E * S
        let x = randomNormal(n * d, seed: 5)
        let gd = randomNormal(n * es, seed: 6), gc = randomNormal(n * es, seed: 7)
        var results: [(Outputs, [Float], [Float], Float)] = []
        for t in [1, 2] {
            HostRuntime.configure(threads: t)
            let (r, phi, scale) = try makeRouter(E: E, d: d, hp: ["slots_per_expert": S], seed: 2)
            let out = try forward(r, x: x, groups: groups)
            if t == 2 {
                let ref = reference(
                    x: x.map(Double.init), phi: phi.map(Double.init), scale: Double(scale), d: d, es: es, groups: groups
                )
                for i in 0..<(n * es) {
                    XCTAssertEqual(Double(out.dispatch[i]), ref.dispatch[i], accuracy: 1e-5)
                    XCTAssertEqual(Double(out.combine[i]), ref.combine[i], accuracy: 1e-5)
                }
            }
            var gx = [Float](repeating: 0, count: n * d)
            try backward(r, try XCTUnwrap(out.ctx), n: n, slots: S, gd: gd, gc: gc, gradX: &gx)
            results.append(
                (
                    out, gx, Array(UnsafeBufferPointer(start: r.core.buffer("phi")!.grad!, count: d * es)),
                    r.core.buffer("scale")!.grad![0]
                ))
        }
        let (a, b) = (results[0], results[1])
        XCTAssertEqual(a.0.dispatch, b.0.dispatch)
        XCTAssertEqual(a.0.combine, b.0.combine)
        for i in 0..<(n * d) { XCTAssertEqual(a.1[i], b.1[i], accuracy: 1e-5 * max(1, abs(a.1[i]))) }
        for i in 0..<(d * es) { XCTAssertEqual(a.2[i], b.2[i], accuracy: 1e-5 * max(1, abs(a.2[i]))) }
        XCTAssertEqual(a.3, b.3, accuracy: 1e-4 * max(1, abs(a.3)))
    }

    // MARK: the framework's gradcheck

    func testPluginChecker() throws {
        let lib = try openPlugin("RouterSoftMoE")
        for hp: [String: Any] in [
            [:], ["slots_per_expert": 3], ["normalize": false], ["normalize": false, "slots_per_expert": 2],
        ] {
            let results = PluginChecker(library: lib, hyperparameters: hp).run()
            XCTAssertTrue(
                results.allSatisfy(\.passed),
                "\(hp): " + results.filter { !$0.passed }.map { "\($0)" }.joined(separator: "\n"))
            XCTAssertTrue(results.contains { $0.name == "gradcheck phi" }, "\(hp)")
        }
    }
}
