import Foundation
import VQMoE
import VQMoEABI
import XCTest

/// The `stablemoe` router plugin against a brute-force double-precision reference: stage 1
/// (centroid router + balance loss + distillation), the stage switch, stage 2 (the frozen
/// distilled router decides), and the token-id requirement.
final class RouterStableMoETests: XCTestCase {
    let d = 5, E = 4, V = 6, D = 3

    struct Params {
        var experts: [Float], emb: [Float], centroids: [Float]
    }

    /// A router whose parameters are overwritten with known random values (distilled logits of
    /// order 1, so the distilled argmax often differs from the centroid router's).
    func makeRouter(
        E: Int, d: Int, V: Int, D: Int, hp: [String: Any] = [:], seed: UInt64 = 1,
        totalSteps: Int = 100
    ) throws -> (RouterInstance, Params) {
        let lib = try openPlugin("RouterStableMoE")
        var hp = hp
        if hp["distill_dim"] == nil { hp["distill_dim"] = D }
        let core = try makeInstance(
            lib, dims: ModelDims(dModel: d, nExperts: E, vocabSize: V, totalSteps: totalSteps),
            hyperparameters: hp, seed: seed)
        let router = try RouterInstance(core)
        let eBuf = try XCTUnwrap(core.buffer("expert_embeddings"))
        eBuf.floats.update(from: randomNormal(E * d, seed: seed &+ 100, scale: 0.7), count: E * d)
        var p = Params(experts: Array(UnsafeBufferPointer(start: eBuf.floats, count: E * d)), emb: [], centroids: [])
        if let emb = core.buffer("distilled_embedding"), let cen = core.buffer("distilled_centroids") {
            emb.floats.update(from: randomNormal(V * D, seed: seed &+ 200, scale: 1.1), count: V * D)
            cen.floats.update(from: randomNormal(E * D, seed: seed &+ 300, scale: 0.9), count: E * D)
            p.emb = Array(UnsafeBufferPointer(start: emb.floats, count: V * D))
            p.centroids = Array(UnsafeBufferPointer(start: cen.floats, count: E * D))
        }
        return (router, p)
    }

    struct Outputs {
        var index: [Int32], weights: [Float], load: [Float], aux: Float, ctx: PluginContext?
    }

    func forward(_ r: RouterInstance, x: [Float], ids: [Int32]?, step: StepInfo) throws -> Outputs {
        let n = x.count / r.dModel
        var index = [Int32](repeating: -1, count: n), weights = [Float](repeating: -1, count: n)
        var load = [Float](repeating: -1, count: r.nExperts)
        let shape = try r.shape(step)
        XCTAssertEqual(shape, RouterShape(mode: .topK, k: 1))
        let (aux, ctx) = try x.withUnsafeBufferPointer { xp in
            try index.withUnsafeMutableBufferPointer { ip in
                try weights.withUnsafeMutableBufferPointer { wp in
                    try load.withUnsafeMutableBufferPointer { lp in
                        let o = RouterOutputs(
                            expertIndex: ip.baseAddress, weights: wp.baseAddress, expertLoad: lp.baseAddress!)
                        if let ids {
                            return try ids.withUnsafeBufferPointer {
                                try r.forward(
                                    step, x: xp.baseAddress!, tokenIDs: $0.baseAddress, nGroups: 1, groupSize: n,
                                    shape: shape, outputs: o)
                            }
                        }
                        return try r.forward(
                            step, x: xp.baseAddress!, tokenIDs: nil, nGroups: 1, groupSize: n, shape: shape, outputs: o)
                    }
                }
            }
        }
        return Outputs(index: index, weights: weights, load: load, aux: aux, ctx: ctx)
    }

    func backward(
        _ r: RouterInstance, _ ctx: PluginContext, n: Int, gw: [Float]?, gaux: Float, gradX: inout [Float]
    ) throws {
        let shape = RouterShape(mode: .topK, k: 1)
        try gradX.withUnsafeMutableBufferPointer { gp in
            if let gw {
                try gw.withUnsafeBufferPointer {
                    try r.backward(
                        ctx, n: n, shape: shape, gradWeights: $0.baseAddress, gradAux: gaux, gradX: gp.baseAddress!)
                }
            } else {
                try r.backward(ctx, n: n, shape: shape, gradAux: gaux, gradX: gp.baseAddress!)
            }
        }
    }

    func step(_ s: Int, total: Int = 100, train: Bool = true, noGrad: Bool = false, frozen: Bool = false) -> StepInfo {
        StepInfo(step: s, totalSteps: total, train: train, noGrad: noGrad, frozen: frozen, seed: 3)
    }

    // MARK: the brute-force reference

    struct Reference {
        /// (N,E) scores and distilled logits; per token argmax of each, the assignment, gate.
        var s: [Double], z: [Double], sArg: [Int], dArg: [Int], index: [Int], gate: [Double]
        var load: [Double], balance: Double, distillation: Double, aux: Double
    }

    func argmax(_ row: ArraySlice<Double>) -> Int {
        var best = row.startIndex
        for j in row.indices where row[j] > row[best] { best = j }
        return best - row.startIndex
    }

    /// Everything in double, straight from the definitions: ê_e = e_e/||e_e||, s = x ê^T,
    /// z_t = emb[id_t] C^T; stage 1: a = argmax s, aux = bw E Σ f_e P_e + dw mean_t CE(z_t, a_t);
    /// stage 2: a = table[id] or argmax z, aux = 0; gate = sigmoid(s_{t,a_t}). `fixed` pins the
    /// assignment (for finite differences, where a is a stop-gradient).
    func reference(
        x: [Double], ids: [Int], p: (experts: [Double], emb: [Double], centroids: [Double]),
        E: Int, d: Int, D: Int, stage: Int, distill: Bool = true, bw: Double = 0.01, dw: Double = 1,
        table: [Int]? = nil, fixed: [Int]? = nil
    ) -> Reference {
        let n = x.count / d
        var eh = [Double](repeating: 0, count: E * d)
        for e in 0..<E {
            let r = ((0..<d).map { p.experts[e * d + $0] * p.experts[e * d + $0] }.reduce(0, +) + 1e-12).squareRoot()
            for i in 0..<d { eh[e * d + i] = p.experts[e * d + i] / r }
        }
        var s = [Double](repeating: 0, count: n * E), z = s
        for t in 0..<n {
            for e in 0..<E {
                for i in 0..<d { s[t * E + e] += x[t * d + i] * eh[e * d + i] }
                if distill { for k in 0..<D { z[t * E + e] += p.emb[ids[t] * D + k] * p.centroids[e * D + k] } }
            }
        }
        let sArg = (0..<n).map { argmax(s[($0 * E)..<($0 * E + E)]) }
        let dArg = (0..<n).map { t in distill ? (table?[ids[t]] ?? argmax(z[(t * E)..<(t * E + E)])) : -1 }
        let index = fixed ?? (stage == 1 ? sArg : dArg)
        let gate = (0..<n).map { 1 / (1 + exp(-s[$0 * E + index[$0]])) }
        var load = [Double](repeating: 0, count: E)
        for a in index { load[a] += 1 }
        var balance = 0.0, distillation = 0.0
        if stage == 1 {
            var meanP = [Double](repeating: 0, count: E)
            for t in 0..<n {
                let row = s[(t * E)..<(t * E + E)], m = row.max()!
                let zsum = row.map { exp($0 - m) }.reduce(0, +)
                for e in 0..<E { meanP[e] += exp(s[t * E + e] - m) / zsum / Double(n) }
            }
            balance = bw * Double(E) * (0..<E).map { load[$0] / Double(n) * meanP[$0] }.reduce(0, +)
            if distill {
                for t in 0..<n {
                    let row = z[(t * E)..<(t * E + E)], m = row.max()!
                    let lse = m + log(row.map { exp($0 - m) }.reduce(0, +))
                    distillation += (lse - z[t * E + index[t]]) / Double(n)
                }
                distillation *= dw
            }
        }
        return Reference(
            s: s, z: z, sArg: sArg, dArg: dArg, index: index, gate: gate, load: load,
            balance: balance, distillation: distillation, aux: balance + distillation)
    }

    /// Central differences (h = 1e-6, double) of J = Σ_t gw_t gate_t + gaux aux with the
    /// assignment pinned, with respect to x, the expert embeddings, the distilled embedding
    /// and the distilled centroids.
    func referenceGradients(
        x: [Double], ids: [Int], p: Params, E: Int, d: Int, D: Int, stage: Int, gw: [Float]?,
        gaux: Double, bw: Double = 0.01, dw: Double = 1, distill: Bool = true
    )
        -> (gx: [Double], ge: [Double], gemb: [Double], gc: [Double])
    {
        var vars = [x, p.experts.map(Double.init), p.emb.map(Double.init), p.centroids.map(Double.init)]
        let fixed = reference(
            x: x, ids: ids, p: (vars[1], vars[2], vars[3]), E: E, d: d, D: D, stage: stage,
            distill: distill, bw: bw, dw: dw
        ).index
        func objective() -> Double {
            let ref = reference(
                x: vars[0], ids: ids, p: (vars[1], vars[2], vars[3]), E: E, d: d, D: D, stage: stage,
                distill: distill, bw: bw, dw: dw, fixed: fixed)
            var j = gaux * ref.aux
            if let gw { for t in 0..<ref.gate.count { j += Double(gw[t]) * ref.gate[t] } }
            return j
        }
        var grads: [[Double]] = []
        let h = 1e-6
        for v in 0..<4 {
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
        return (grads[0], grads[1], grads[2], grads[3])
    }

    func assertClose(
        _ got: UnsafePointer<Float>, _ want: [Double], base: Float = 0, _ what: String,
        file: StaticString = #filePath, line: UInt = #line
    ) {
        for i in 0..<want.count {
            XCTAssertEqual(
                Double(got[i]), Double(base) + want[i], accuracy: 1e-4 * max(1, abs(want[i])), "\(what)[\(i)]",
                file: file, line: line)
        }
    }

    // MARK: descriptor, schema, buffers

    func testDescriptorAndSchema() throws {
        let lib = try openPlugin("RouterStableMoE")
        XCTAssertEqual(lib.name, "stablemoe")
        XCTAssertEqual(lib.version, "1.0.0")
        XCTAssertEqual(lib.kind, .router)
        XCTAssertTrue(lib.needsTokenIDs)
        XCTAssertFalse(lib.hasNoGrad)
        XCTAssertNotNil(lib.feature(VQMOE_FEATURE_METRICS))
        XCTAssertNil(lib.feature("vqmoe.nothing/1"))
        XCTAssertEqual(
            lib.schema.map(\.name),
            ["stage2_step", "distill_dim", "balance_weight", "distill_weight", "init_std", "distill"])
        let byName = Dictionary(uniqueKeysWithValues: lib.schema.map { ($0.name, $0) })
        XCTAssertEqual(byName["stage2_step"]?.type, .int)
        XCTAssertEqual(byName["stage2_step"]?.defaultNumber, 0)
        XCTAssertEqual(byName["stage2_step"]?.min, 0)
        XCTAssertEqual(byName["distill_dim"]?.type, .int)
        XCTAssertEqual(byName["distill_dim"]?.defaultNumber, 16)
        XCTAssertEqual(byName["distill_dim"]?.min, 1)
        XCTAssertEqual(byName["balance_weight"]?.type, .float)
        XCTAssertEqual(byName["balance_weight"]?.defaultNumber, 0.01)
        XCTAssertEqual(byName["distill_weight"]?.defaultNumber, 1.0)
        XCTAssertEqual(byName["init_std"]?.defaultNumber, 0.02)
        XCTAssertEqual(byName["distill"]?.type, .bool)
        XCTAssertEqual(byName["distill"]?.defaultNumber, 1)
        XCTAssertTrue(lib.schema.allSatisfy { !$0.description.isEmpty })
    }

    func testBuffersAndInit() throws {
        let lib = try openPlugin("RouterStableMoE")
        let E = 8, d = 64, V = 50
        let dims = ModelDims(dModel: d, nExperts: E, vocabSize: V, totalSteps: 100)
        let core = try makeInstance(lib, dims: dims, seed: 7)
        XCTAssertEqual(
            core.buffers.map(\.name),
            ["expert_embeddings", "distilled_embedding", "distilled_centroids", "stage2_assignment"])
        XCTAssertEqual(core.buffers.map(\.shape), [[E, d], [V, 16], [E, 16], [V]])
        XCTAssertEqual(core.buffers.map(\.isParameter), [true, true, true, false])
        let table = try XCTUnwrap(core.buffer("stage2_assignment"))
        XCTAssertEqual(table.dtype.code, UInt8(VQMOE_DTYPE_INT))
        XCTAssertEqual(table.dtype.bits, 32)
        let t = table.data.bindMemory(to: Int32.self, capacity: V)
        XCTAssertTrue((0..<V).allSatisfy { t[$0] == -1 }, "the stage-2 table starts unfrozen (-1)")
        // Distilled router parameters are never weight-decayed (a frozen router must not shrink).
        XCTAssertEqual(core.buffer("distilled_embedding")!.flags & VQMOE_BUF_NO_DECAY, VQMOE_BUF_NO_DECAY)
        XCTAssertEqual(core.buffer("distilled_centroids")!.flags & VQMOE_BUF_NO_DECAY, VQMOE_BUF_NO_DECAY)
        func stats(_ name: String) -> (mean: Double, std: Double) {
            let b = core.buffer(name)!
            let v = (0..<b.count).map { Double(b.floats[$0]) }
            let mean = v.reduce(0, +) / Double(v.count)
            return (mean, (v.map { ($0 - mean) * ($0 - mean) }.reduce(0, +) / Double(v.count)).squareRoot())
        }
        // Expert centroids ~ N(0, 1/d), distilled parameters ~ N(0, init_std^2).
        XCTAssertEqual(stats("expert_embeddings").std, 1 / Double(d).squareRoot(), accuracy: 0.015)
        XCTAssertEqual(stats("distilled_embedding").std, 0.02, accuracy: 0.002)
        XCTAssertEqual(stats("distilled_centroids").std, 0.02, accuracy: 0.004)
        let wide = try makeInstance(lib, dims: dims, hyperparameters: ["init_std": 0.2], seed: 7)
        for i in 0..<(V * 16) {
            XCTAssertEqual(
                wide.buffer("distilled_embedding")!.floats[i], 10 * core.buffer("distilled_embedding")!.floats[i],
                accuracy: 1e-6)
        }
        let again = try makeInstance(lib, dims: dims, seed: 7)
        for (a, b) in zip(core.buffers, again.buffers) {
            XCTAssertEqual(memcmp(a.data, b.data, a.byteCount), 0, a.name)
        }

        // distill = false: the reference code's router, no distilled buffers, no vocabulary needed.
        let plain = try makeInstance(
            lib, dims: ModelDims(dModel: d, nExperts: E, vocabSize: 0), hyperparameters: ["distill": false])
        XCTAssertEqual(plain.buffers.map(\.name), ["expert_embeddings"])
        let narrow = try makeInstance(lib, dims: dims, hyperparameters: ["distill_dim": 3])
        XCTAssertEqual(narrow.buffer("distilled_embedding")?.shape, [V, 3])
        XCTAssertEqual(narrow.buffer("distilled_centroids")?.shape, [E, 3])
    }

    // MARK: errors

    func testErrors() throws {
        let lib = try openPlugin("RouterStableMoE")
        XCTAssertThrowsError(try makeInstance(lib, dims: ModelDims(dModel: 4, nExperts: 3, vocabSize: 0))) { error in
            let msg = "\(error)"
            XCTAssertTrue(msg.contains("vocab_size"), msg)
            XCTAssertTrue(msg.contains("distill = false"), msg)
            XCTAssertTrue(msg.contains("INVALID_ARGUMENT") || msg.lowercased().contains("invalid"), msg)
        }
        XCTAssertThrowsError(try makeInstance(lib, dims: ModelDims(dModel: 4, nExperts: 0, vocabSize: 5))) { error in
            XCTAssertTrue("\(error)".contains("n_experts"), "\(error)")
        }
        XCTAssertThrowsError(try makeInstance(lib, dims: ModelDims(dModel: 0, nExperts: 4, vocabSize: 5))) { error in
            XCTAssertTrue("\(error)".contains("d_model"), "\(error)")
        }
        XCTAssertThrowsError(
            try makeInstance(
                lib, dims: ModelDims(dModel: 4, nExperts: 3, vocabSize: 5), hyperparameters: ["distill_dim": 0])
        ) { error in
            XCTAssertTrue("\(error)".contains("distill_dim"), "\(error)")
        }
        XCTAssertThrowsError(
            try makeInstance(
                lib, dims: ModelDims(dModel: 4, nExperts: 3, vocabSize: 5), hyperparameters: ["balance_weight": -1])
        ) { error in
            XCTAssertTrue("\(error)".contains("balance_weight"), "\(error)")
        }
    }

    func testTokenIDsAreRequired() throws {
        let (r, _) = try makeRouter(E: E, d: d, V: V, D: D)
        let x = randomNormal(4 * d, seed: 2)
        // The host refuses to call a NEEDS_TOKEN_IDS router without ids...
        XCTAssertThrowsError(try forward(r, x: x, ids: nil, step: step(0))) { error in
            XCTAssertTrue("\(error)".contains("token id"), "\(error)")
        }
        // ... and the plugin refuses ids outside [0, V).
        XCTAssertThrowsError(try forward(r, x: x, ids: [0, 1, Int32(V), 2], step: step(0))) { error in
            let msg = "\(error)"
            XCTAssertTrue(msg.contains("token id \(V)"), msg)
            XCTAssertTrue(msg.contains("vocab_size = \(V)"), msg)
        }
        XCTAssertThrowsError(try forward(r, x: x, ids: [0, -1, 1, 2], step: step(0))) { error in
            XCTAssertTrue("\(error)".contains("token id -1"), "\(error)")
        }
    }

    /// Straight through the C ABI (no host wrapper in between): a forward whose token_ids
    /// tensor is absent fails with INVALID_ARGUMENT and says why.
    func testPluginRefusesAbsentTokenIDsThroughTheABI() throws {
        let lib = try openPlugin("RouterStableMoE")
        let desc = lib.desc.pointee
        let api = desc.kind_api!.load(as: vqmoe_router_api.self)
        let d = 4, E = 3, n = 2
        var inst: OpaquePointer?
        let created: Int32 = "abi.test".withCString { name in
            "".withCString { root in
                var info = vqmoe_create_info(
                    abi_version: UInt32(VQMOE_ABI_VERSION), struct_size: UInt32(MemoryLayout<vqmoe_create_info>.size),
                    host: UnsafePointer(HostRuntime.api), instance_name: name, seed: 1, d_model: Int64(d),
                    n_experts: Int64(E),
                    n_codes: 0, vocab_size: 5, n_classes: 0, seq_len: 0, total_steps: 100, data_root: root,
                    binding_size: 0)
                return desc.create!(&info, nil, &inst)
            }
        }
        XCTAssertEqual(created, VQMOE_OK)
        let h = try XCTUnwrap(inst)
        defer { desc.destroy!(h) }
        let count = Int(desc.num_buffers!(h))
        XCTAssertEqual(count, 4)
        var storage: [UnsafeMutableRawPointer] = []
        defer { storage.forEach { $0.deallocate() } }
        var bindings: [vqmoe_buffer_binding] = []
        for i in 0..<count {
            var spec = vqmoe_buffer_spec()
            spec.struct_size = UInt32(MemoryLayout<vqmoe_buffer_spec>.size)
            XCTAssertEqual(desc.buffer_spec!(h, Int32(i), &spec), VQMOE_OK)
            let elems = withUnsafeBytes(of: spec.shape) { raw in
                (0..<Int(spec.ndim)).map { Int(raw.load(fromByteOffset: $0 * 8, as: Int64.self)) }
            }
            .reduce(1, *)
            let data = UnsafeMutableRawPointer.allocate(byteCount: max(elems * 4, 4), alignment: 64)
            let grad = UnsafeMutableRawPointer.allocate(byteCount: max(elems * 4, 4), alignment: 64)
            storage += [data, grad]
            bindings.append(
                vqmoe_buffer_binding(
                    data: data,
                    grad: spec.role == VQMOE_BUF_PARAM ? grad.bindMemory(to: Float.self, capacity: elems) : nil))
        }
        XCTAssertEqual(desc.bind_buffers!(h, bindings, Int32(count)), VQMOE_OK)
        XCTAssertEqual(desc.init_buffers!(h, 1), VQMOE_OK)

        var x = randomNormal(n * d, seed: 1)
        var index = [Int32](repeating: 0, count: n), weights = [Float](repeating: 0, count: n),
            load = [Float](repeating: 0, count: E)
        let xShape: [Int64] = [Int64(n), Int64(d)], kShape: [Int64] = [Int64(n), 1], eShape: [Int64] = [Int64(E)]
        func view(
            _ p: UnsafeMutableRawPointer, _ dtype: vqmoe_dtype, _ s: UnsafePointer<Int64>, _ ndim: Int32
        ) -> vqmoe_tensor {
            vqmoe_tensor(
                data: p, device: vqmoe_device(device_type: VQMOE_DEVICE_CPU, device_id: 0), ndim: ndim, dtype: dtype,
                shape: s, strides: nil, byte_offset: 0)
        }
        var ctx: UnsafeMutableRawPointer?
        _ = HostRuntime.takeError()
        let status: Int32 = x.withUnsafeMutableBytes { xb in
            index.withUnsafeMutableBytes { ib in
                weights.withUnsafeMutableBytes { wb in
                    load.withUnsafeMutableBytes { lb in
                        xShape.withUnsafeBufferPointer { xs in
                            kShape.withUnsafeBufferPointer { ks in
                                eShape.withUnsafeBufferPointer { es in
                                    var input = vqmoe_router_input(
                                        struct_size: UInt32(MemoryLayout<vqmoe_router_input>.size),
                                        x: view(xb.baseAddress!, vqmoe_f32(), xs.baseAddress!, 2),
                                        token_ids: vqmoe_tensor(),
                                        n_groups: 1, group_size: Int64(n))
                                    var out = vqmoe_router_output(
                                        struct_size: UInt32(MemoryLayout<vqmoe_router_output>.size),
                                        expert_index: view(ib.baseAddress!, vqmoe_i32(), ks.baseAddress!, 2),
                                        weights: view(wb.baseAddress!, vqmoe_f32(), ks.baseAddress!, 2),
                                        dispatch: vqmoe_tensor(), combine: vqmoe_tensor(),
                                        expert_load: view(lb.baseAddress!, vqmoe_f32(), es.baseAddress!, 1), aux_loss: 0
                                    )
                                    var s = vqmoe_step_info(
                                        struct_size: UInt32(MemoryLayout<vqmoe_step_info>.size),
                                        flags: VQMOE_STEP_TRAIN, step: 0, total_steps: 100, seed: 1, token_offset: 0,
                                        global_tokens: 0)
                                    return api.forward!(h, &s, &input, &out, &ctx)
                                }
                            }
                        }
                    }
                }
            }
        }
        HostRuntime.releaseScratch()
        XCTAssertEqual(status, VQMOE_ERR_INVALID_ARGUMENT)
        XCTAssertNil(ctx)
        let msg = HostRuntime.takeError() ?? ""
        XCTAssertTrue(msg.contains("token_ids is absent"), msg)
        XCTAssertTrue(msg.contains("distill = false"), msg)
    }

    // MARK: stage 1

    func testStage1ForwardMatchesReference() throws {
        for (bw, dw) in [(0.01, 1.0), (0.5, 0.3), (0.0, 2.0), (1.0, 0.0)] {
            let n = 13
            let (r, p) = try makeRouter(
                E: E, d: d, V: V, D: D, hp: ["balance_weight": bw, "distill_weight": dw], seed: 5)
            let x = randomNormal(n * d, seed: 11)
            let ids = (0..<n).map { Int32(($0 * 5 + 1) % V) }
            let out = try forward(r, x: x, ids: ids, step: step(3))
            let ref = reference(
                x: x.map(Double.init), ids: ids.map(Int.init),
                p: (p.experts.map(Double.init), p.emb.map(Double.init), p.centroids.map(Double.init)),
                E: E, d: d, D: D, stage: 1, bw: bw, dw: dw)
            XCTAssertEqual(
                out.index.map(Int.init), ref.sArg, "stage 1 routes by argmax of the normalised-centroid scores")
            for t in 0..<n { XCTAssertEqual(Double(out.weights[t]), ref.gate[t], accuracy: 1e-5) }
            XCTAssertEqual(out.load.map(Double.init), ref.load)
            XCTAssertEqual(Double(out.aux), ref.aux, accuracy: 1e-5 * max(1, ref.aux))
            if dw > 0 { XCTAssertGreaterThan(ref.distillation, 0.1) }
            XCTAssertNotNil(out.ctx)
        }
    }

    func testScoresUseOnlyTheDirectionOfTheCentroids() throws {
        // Scaling expert e's embedding by any positive factor changes nothing.
        let n = 9
        let (r, p) = try makeRouter(E: E, d: d, V: V, D: D)
        let x = randomNormal(n * d, seed: 3), ids = (0..<n).map { Int32($0 % V) }
        let a = try forward(r, x: x, ids: ids, step: step(0))
        let buf = r.core.buffer("expert_embeddings")!
        for e in 0..<E { for i in 0..<d { buf.floats[e * d + i] = p.experts[e * d + i] * Float(e + 1) * 3 } }
        let b = try forward(r, x: x, ids: ids, step: step(0))
        XCTAssertEqual(a.index, b.index)
        for t in 0..<n { XCTAssertEqual(a.weights[t], b.weights[t], accuracy: 1e-6) }
        XCTAssertEqual(a.aux, b.aux, accuracy: 1e-6)
    }

    func testStage1GradientsMatchReference() throws {
        for (bw, dw, gaux, withWeights) in [
            (0.01, 1.0, Float(1), true), (0.7, 0.4, Float(1.5), true),
            (0.3, 2.0, Float(1), false), (0.2, 1.0, Float(0), true),
        ] {
            let n = 11
            let (r, p) = try makeRouter(
                E: E, d: d, V: V, D: D, hp: ["balance_weight": bw, "distill_weight": dw], seed: 9)
            let x = randomNormal(n * d, seed: 21)
            let ids = (0..<n).map { Int32(($0 * 3 + 2) % V) }  // repeated ids: the embedding gradient scatter-adds
            let out = try forward(r, x: x, ids: ids, step: step(2))
            let gw = withWeights ? randomNormal(n, seed: 31) : nil
            // Gradients accumulate: start from non-zero values everywhere.
            for b in r.core.parameters { b.grad!.update(repeating: 0.25, count: b.count) }
            var gx = [Float](repeating: 1, count: n * d)
            try backward(r, try XCTUnwrap(out.ctx), n: n, gw: gw, gaux: gaux, gradX: &gx)
            let want = referenceGradients(
                x: x.map(Double.init), ids: ids.map(Int.init), p: p, E: E, d: d, D: D, stage: 1,
                gw: gw, gaux: Double(gaux), bw: bw, dw: dw)
            gx.withUnsafeBufferPointer { assertClose($0.baseAddress!, want.gx, base: 1, "grad_x") }
            assertClose(r.core.buffer("expert_embeddings")!.grad!, want.ge, base: 0.25, "grad expert_embeddings")
            assertClose(r.core.buffer("distilled_embedding")!.grad!, want.gemb, base: 0.25, "grad distilled_embedding")
            assertClose(r.core.buffer("distilled_centroids")!.grad!, want.gc, base: 0.25, "grad distilled_centroids")
            if gaux != 0 && dw != 0 {
                XCTAssertGreaterThan(want.gemb.map(abs).max()!, 1e-3, "the distillation loss trains the embedding")
            }
        }
    }

    func testDistillationGradientOnHandExample() throws {
        // One token, E = 2, D = 1: z = (c_0 w, c_1 w) for the token's embedding w. With
        // a = 0 (fixed by the scores) the loss is dw * (log(e^{z0} + e^{z1}) - z0), so
        // dL/dw = dw * (q_0 c_0 + q_1 c_1 - c_0) and dL/dc_e = dw * (q_e - [e = 0]) w.
        let lib = try openPlugin("RouterStableMoE")
        let core = try makeInstance(
            lib, dims: ModelDims(dModel: 2, nExperts: 2, vocabSize: 3, totalSteps: 100),
            hyperparameters: ["distill_dim": 1, "balance_weight": 0.0, "distill_weight": 0.5])
        let r = try RouterInstance(core)
        core.buffer("expert_embeddings")!.floats.update(from: [1, 0, 0, 1], count: 4)
        core.buffer("distilled_embedding")!.floats.update(from: [0, 2, 0], count: 3)
        core.buffer("distilled_centroids")!.floats.update(from: [0.3, -0.4], count: 2)
        let out = try forward(r, x: [3, 1], ids: [1], step: step(0))
        XCTAssertEqual(out.index, [0])
        let z0 = 0.6, z1 = -0.8
        let q0 = exp(z0) / (exp(z0) + exp(z1)), q1 = 1 - q0
        XCTAssertEqual(Double(out.aux), 0.5 * (log(exp(z0) + exp(z1)) - z0), accuracy: 1e-6)
        XCTAssertEqual(Double(out.weights[0]), 1 / (1 + exp(-3.0)), accuracy: 1e-6)
        var gx: [Float] = [0, 0]
        try backward(r, try XCTUnwrap(out.ctx), n: 1, gw: nil, gaux: 1, gradX: &gx)
        let gemb = core.buffer("distilled_embedding")!.grad!, gc = core.buffer("distilled_centroids")!.grad!
        XCTAssertEqual(gemb[0], 0)
        XCTAssertEqual(gemb[2], 0)
        XCTAssertEqual(Double(gemb[1]), 0.5 * (q0 * 0.3 + q1 * -0.4 - 0.3), accuracy: 1e-6)
        XCTAssertEqual(Double(gc[0]), 0.5 * (q0 - 1) * 2, accuracy: 1e-6)
        XCTAssertEqual(Double(gc[1]), 0.5 * q1 * 2, accuracy: 1e-6)
        // The assignment is a stop-gradient target: no balance weight, no weights gradient -> no grad_x.
        XCTAssertEqual(gx, [0, 0])
    }

    // MARK: the stage switch

    /// Stage of a training forward at `s`: 1 routes by argmax s and has a loss, 2 routes by
    /// the distilled router and has none; the metrics say which.
    func checkStage(
        _ r: RouterInstance, _ p: Params, step s: Int, total: Int, expect: Int, file: StaticString = #filePath,
        line: UInt = #line
    ) throws {
        let n = 12
        let x = randomNormal(n * d, seed: 40), ids = (0..<n).map { Int32($0 % V) }
        let out = try forward(r, x: x, ids: ids, step: step(s, total: total))
        let ref = reference(
            x: x.map(Double.init), ids: ids.map(Int.init),
            p: (p.experts.map(Double.init), p.emb.map(Double.init), p.centroids.map(Double.init)),
            E: E, d: d, D: D, stage: expect)
        XCTAssertNotEqual(
            ref.sArg, ref.dArg, "the test needs the two routers to disagree somewhere", file: file, line: line)
        XCTAssertEqual(out.index.map(Int.init), ref.index, "step \(s) of \(total)", file: file, line: line)
        XCTAssertEqual(Double(out.aux), ref.aux, accuracy: 1e-5, "step \(s) of \(total)", file: file, line: line)
        if expect == 2 {
            XCTAssertEqual(out.aux, 0, file: file, line: line)
        } else {
            XCTAssertGreaterThan(out.aux, 0, file: file, line: line)
        }
        XCTAssertEqual(try r.core.metrics()["stage"], [Double(expect)], "step \(s) of \(total)", file: file, line: line)
    }

    func testStageSwitchesExactlyAtTheConfiguredStep() throws {
        let (r, p) = try makeRouter(E: E, d: d, V: V, D: D, hp: ["stage2_step": 7], seed: 3)
        for s in [0, 5, 6] { try checkStage(r, p, step: s, total: 100, expect: 1) }
        for s in [7, 8, 50] { try checkStage(r, p, step: s, total: 100, expect: 2) }
        // stage2_step wins over total_steps.
        try checkStage(r, p, step: 6, total: 10, expect: 1)
    }

    func testStageSwitchesAtTenPercentOfTotalStepsByDefault() throws {
        for (total, switchAt) in [(100, 10), (45, 5), (44, 4), (1000, 100)] {
            let (r, p) = try makeRouter(E: E, d: d, V: V, D: D, seed: 3, totalSteps: total)
            try checkStage(r, p, step: 0, total: total, expect: 1)
            try checkStage(r, p, step: switchAt - 1, total: total, expect: 1)
            try checkStage(r, p, step: switchAt, total: total, expect: 2)
            try checkStage(r, p, step: switchAt + 1, total: total, expect: 2)
        }
    }

    func testDistillFalseStaysInStage1WithBalanceOnly() throws {
        let lib = try openPlugin("RouterStableMoE")
        let core = try makeInstance(
            lib, dims: ModelDims(dModel: d, nExperts: E, vocabSize: 0, totalSteps: 100),
            hyperparameters: ["distill": false, "balance_weight": 0.3])
        let r = try RouterInstance(core)
        let experts = Array(UnsafeBufferPointer(start: core.buffer("expert_embeddings")!.floats, count: E * d))
        let n = 10
        let x = randomNormal(n * d, seed: 6), ids = [Int32](repeating: 0, count: n)  // never read
        for s in [0, 10, 99, 5000] {
            for train in [true, false] {
                let out = try forward(r, x: x, ids: ids, step: step(s, train: train))
                let ref = reference(
                    x: x.map(Double.init), ids: ids.map(Int.init), p: (experts.map(Double.init), [], []),
                    E: E, d: d, D: D, stage: 1, distill: false, bw: 0.3)
                XCTAssertEqual(out.index.map(Int.init), ref.sArg)
                XCTAssertEqual(Double(out.aux), ref.balance, accuracy: 1e-6)
                for t in 0..<n { XCTAssertEqual(Double(out.weights[t]), ref.gate[t], accuracy: 1e-5) }
            }
        }
        let m = try core.metrics()
        XCTAssertEqual(m["stage"], [1])
        XCTAssertNil(m["distill_accuracy"])
    }

    // MARK: stage 2

    func testStage2DistilledRouterIsFrozen() throws {
        let n = 10
        let (r, p) = try makeRouter(E: E, d: d, V: V, D: D, hp: ["stage2_step": 4], seed: 8)
        let x = randomNormal(n * d, seed: 12), ids = (0..<n).map { Int32(($0 * 7) % V) }
        let out = try forward(r, x: x, ids: ids, step: step(4))
        XCTAssertEqual(out.aux, 0)
        // The first stage-2 training forward froze the distilled router into the table.
        let table = r.core.buffer("stage2_assignment")!.data.bindMemory(to: Int32.self, capacity: V)
        for v in 0..<V {
            var z = [Double](repeating: 0, count: E)
            for e in 0..<E { for k in 0..<D { z[e] += Double(p.emb[v * D + k]) * Double(p.centroids[e * D + k]) } }
            XCTAssertEqual(Int(table[v]), argmax(z[...]), "table[\(v)]")
        }
        // Backward: the gate trains x and the centroids; the distilled router gets nothing,
        // even with grad_aux_loss = 1.
        let gw = randomNormal(n, seed: 13)
        for b in r.core.parameters { b.zeroGrad() }
        var gx = [Float](repeating: 0, count: n * d)
        try backward(r, try XCTUnwrap(out.ctx), n: n, gw: gw, gaux: 1, gradX: &gx)
        let want = referenceGradients(
            x: x.map(Double.init), ids: ids.map(Int.init), p: p, E: E, d: d, D: D, stage: 2, gw: gw, gaux: 1)
        gx.withUnsafeBufferPointer { assertClose($0.baseAddress!, want.gx, "grad_x") }
        assertClose(r.core.buffer("expert_embeddings")!.grad!, want.ge, "grad expert_embeddings")
        XCTAssertGreaterThan(want.ge.map(abs).max()!, 1e-3)
        for name in ["distilled_embedding", "distilled_centroids"] {
            let b = r.core.buffer(name)!
            XCTAssertTrue((0..<b.count).allSatisfy { b.grad![$0] == 0 }, "\(name) got a gradient in stage 2")
        }
        // Assignments stay fixed even if the distilled parameters move afterwards (e.g. the
        // optimizer's momentum): training and eval forwards read the frozen table.
        let before = out.index
        let cen = r.core.buffer("distilled_centroids")!
        for i in 0..<(E * D) { cen.floats[i] = -3 * cen.floats[i] + 0.5 }
        XCTAssertEqual(try forward(r, x: x, ids: ids, step: step(9)).index, before)
        XCTAssertEqual(try forward(r, x: x, ids: ids, step: step(9, train: false)).index, before)
        XCTAssertEqual(try forward(r, x: x, ids: ids, step: step(2, train: false)).index, before)
    }

    func testEvalUsesTheLiveDistilledRouterBeforeTheSwitch() throws {
        let n = 10
        let (r, p) = try makeRouter(E: E, d: d, V: V, D: D, hp: ["stage2_step": 50], seed: 4)
        let x = randomNormal(n * d, seed: 14), ids = (0..<n).map { Int32(($0 * 5) % V) }
        let ev = try forward(r, x: x, ids: ids, step: step(3, train: false))
        let ref = reference(
            x: x.map(Double.init), ids: ids.map(Int.init),
            p: (p.experts.map(Double.init), p.emb.map(Double.init), p.centroids.map(Double.init)),
            E: E, d: d, D: D, stage: 2)
        XCTAssertNotEqual(ref.sArg, ref.dArg)
        XCTAssertEqual(ev.index.map(Int.init), ref.dArg, "inference routes with the distilled router")
        for t in 0..<n { XCTAssertEqual(Double(ev.weights[t]), ref.gate[t], accuracy: 1e-5) }
        XCTAssertEqual(ev.aux, 0)
        XCTAssertNil(ev.ctx)
        // No state changes outside training: the table is still unfrozen.
        let table = r.core.buffer("stage2_assignment")!.data.bindMemory(to: Int32.self, capacity: V)
        XCTAssertTrue((0..<V).allSatisfy { table[$0] == -1 })
        // NO_GRAD training forwards save no context.
        XCTAssertNil(try forward(r, x: x, ids: ids, step: step(3, noGrad: true)).ctx)
    }

    func testFrozenStepNoParameterGradientsNoStateUpdate() throws {
        let n = 9
        let (r, p) = try makeRouter(E: E, d: d, V: V, D: D, hp: ["stage2_step": 5, "balance_weight": 0.4], seed: 6)
        let x = randomNormal(n * d, seed: 15), ids = (0..<n).map { Int32($0 % V) }
        // Stage 1, frozen: grad_x from the gate and the balance loss, no parameter gradients.
        let out = try forward(r, x: x, ids: ids, step: step(1, frozen: true))
        let gw = randomNormal(n, seed: 16)
        var gx = [Float](repeating: 0, count: n * d)
        try backward(r, try XCTUnwrap(out.ctx), n: n, gw: gw, gaux: 1, gradX: &gx)
        let want = referenceGradients(
            x: x.map(Double.init), ids: ids.map(Int.init), p: p, E: E, d: d, D: D, stage: 1,
            gw: gw, gaux: 1, bw: 0.4)
        gx.withUnsafeBufferPointer { assertClose($0.baseAddress!, want.gx, "grad_x") }
        for b in r.core.parameters { XCTAssertTrue((0..<b.count).allSatisfy { b.grad![$0] == 0 }, b.name) }
        // Stage 2, frozen: the table is not written; the live distilled router decides.
        let s2 = try forward(r, x: x, ids: ids, step: step(6, frozen: true))
        let table = r.core.buffer("stage2_assignment")!.data.bindMemory(to: Int32.self, capacity: V)
        XCTAssertTrue((0..<V).allSatisfy { table[$0] == -1 })
        let ref = reference(
            x: x.map(Double.init), ids: ids.map(Int.init),
            p: (p.experts.map(Double.init), p.emb.map(Double.init), p.centroids.map(Double.init)),
            E: E, d: d, D: D, stage: 2)
        XCTAssertEqual(s2.index.map(Int.init), ref.dArg)
    }

    // MARK: metrics

    func testMetrics() throws {
        let n = 12
        let (r, p) = try makeRouter(E: E, d: d, V: V, D: D, hp: ["stage2_step": 3], seed: 3)
        XCTAssertEqual(try r.core.metrics(), [:])  // nothing before the first forward
        let x = randomNormal(n * d, seed: 17), ids = (0..<n).map { Int32(($0 * 5 + 3) % V) }
        let ref = reference(
            x: x.map(Double.init), ids: ids.map(Int.init),
            p: (p.experts.map(Double.init), p.emb.map(Double.init), p.centroids.map(Double.init)),
            E: E, d: d, D: D, stage: 1)
        let agree = Double((0..<n).filter { ref.sArg[$0] == ref.dArg[$0] }.count) / Double(n)
        XCTAssertGreaterThan(agree, 0)
        XCTAssertLessThan(agree, 1)
        _ = try forward(r, x: x, ids: ids, step: step(1))
        var m = try r.core.metrics()
        XCTAssertEqual(m["stage"], [1])
        XCTAssertEqual(try XCTUnwrap(m["distill_accuracy"]?.first), agree, accuracy: 1e-12)
        // An eval forward does not replace the training statistics.
        _ = try forward(r, x: Array(x.prefix(2 * d)), ids: Array(ids.prefix(2)), step: step(1, train: false))
        XCTAssertEqual(try r.core.metrics()["stage"], [1])
        XCTAssertEqual(try XCTUnwrap(try r.core.metrics()["distill_accuracy"]?.first), agree, accuracy: 1e-12)
        // Stage 2: the frozen router's decisions against the centroid router's argmax.
        _ = try forward(r, x: x, ids: ids, step: step(3))
        m = try r.core.metrics()
        XCTAssertEqual(m["stage"], [2])
        XCTAssertEqual(try XCTUnwrap(m["distill_accuracy"]?.first), agree, accuracy: 1e-12)
    }

    // MARK: threads and the framework's gradcheck

    func testLargerProblemOnTwoThreads() throws {
        let threads = HostRuntime.threads
        HostRuntime.configure(threads: 2)
        defer { HostRuntime.configure(threads: threads) }
        let n = 700, E = 16, d = 24, V = 40, D = 8
        let (r, p) = try makeRouter(E: E, d: d, V: V, D: D, hp: ["balance_weight": 0.1], seed: 2)
        let x = randomNormal(n * d, seed: 5), ids = (0..<n).map { Int32(($0 * 13) % V) }
        let out = try forward(r, x: x, ids: ids, step: step(0))
        let ref = reference(
            x: x.map(Double.init), ids: ids.map(Int.init),
            p: (p.experts.map(Double.init), p.emb.map(Double.init), p.centroids.map(Double.init)),
            E: E, d: d, D: D, stage: 1, bw: 0.1)
        XCTAssertEqual(out.index.map(Int.init), ref.sArg)
        for t in 0..<n { XCTAssertEqual(Double(out.weights[t]), ref.gate[t], accuracy: 1e-5) }
        XCTAssertEqual(Double(out.aux), ref.aux, accuracy: 1e-5 * ref.aux)
    }

    func testPluginChecker() throws {
        let lib = try openPlugin("RouterStableMoE")
        let modes: [[String: Any]] = [
            [:],  // stage 1 at the checker's step 3 (switch at 10)
            ["stage2_step": 1],  // stage 2
            ["distill": false],  // the reference code's behaviour
            ["balance_weight": 0.5, "distill_weight": 2.0, "distill_dim": 3],
        ]
        for hp in modes {
            let results = PluginChecker(library: lib, hyperparameters: hp).run()
            XCTAssertTrue(
                results.allSatisfy(\.passed),
                "\(hp): " + results.filter { !$0.passed }.map { "\($0)" }.joined(separator: "\n"))
            XCTAssertTrue(results.contains { $0.name == "gradcheck expert_embeddings" }, "\(hp)")
        }
    }
}
