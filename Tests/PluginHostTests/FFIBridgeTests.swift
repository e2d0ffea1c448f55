import Foundation
import VQMoE
import XCTest

/// The libffi bridge: signature parsing, clear errors, and calls that match the C function.
final class FFIBridgeTests: XCTestCase {
    let hashLib = "\(buildDir)/libFFIHashRouter.so"

    func testSignatureParsing() throws {
        let s = try FFISignature("void route(const float *x, int64_t n, int64_t d, int64_t n_experts, int32_t *expert)")
        XCTAssertEqual(s.params.map(\.role), [.x, .n, .d, .n_experts, .expert])
        XCTAssertFalse(s.returnsStatus)
        XCTAssertTrue(
            try FFISignature("int32_t(const int32_t *ids, int n, int n_experts, int32_t *expert)").needsTokenIDs)
        let q = try FFISignature("void(const float *x, int64_t n, int64_t d, int64_t n_codes, int32_t *code)")
        XCTAssertEqual(q.kind, .quantizer)
        XCTAssertEqual(s.kind, .router)
    }

    func testMalformedSignaturesGiveClearErrors() {
        func msg(_ s: String) -> String { errorMessage { _ = try FFISignature(s) } }
        XCTAssertTrue(msg("void route const float *x").contains("expected RETURN_TYPE"))
        XCTAssertTrue(msg("float(const float *x, int32_t *expert)").contains("return type 'float' is not supported"))
        XCTAssertTrue(msg("void(const float *x, int64_t n)").contains("needs an output parameter 'int32_t *expert'"))
        XCTAssertTrue(
            msg("void(const float *x, int32_t *expert, int32_t *code)").contains("has both 'expert' and 'code'"))
        XCTAssertTrue(msg("void(int64_t n, int32_t *code)").contains("add 'const float *x'"))
        XCTAssertTrue(msg("void(double *x, int32_t *expert)").contains("type of 'x' ('double *') is not supported"))
        XCTAssertTrue(
            msg("void(const float *x, int64_t count, int32_t *expert)").contains(
                "parameter 'count' has no meaning to the host"))
        XCTAssertTrue(msg("void(int32_t *x, int32_t *expert)").contains("'x' must be const float *"))
        XCTAssertTrue(msg("void(const float *x, const float *x, int32_t *expert)").contains("'x' appears twice"))
    }

    private func entry(symbol: String, signature: String) throws -> FFISignatureEntry {
        let dir = try makeTempDir("ffi")
        let reg = try registry(
            dir,
            """
            {"plugins": [{"name": "r", "kind": "router", "ffi": {"library": "\(hashLib)", "symbol": "\(symbol)", "signature": "\(signature)"}}]}
            """)
        guard case .ffi(let e) = try reg.entry(named: "r").source else { throw VQMoEError(.internalError, "not ffi") }
        return e
    }

    func testMissingSymbolIsAClearError() throws {
        let e = try entry(
            symbol: "no_such_function",
            signature: "void(const int32_t *token_ids, int64_t n, int64_t n_experts, int32_t *expert)")
        let msg = errorMessage { _ = try FFIFunction(name: "r", entry: e) }
        XCTAssertTrue(msg.contains("has no symbol 'no_such_function'") && msg.contains("libFFIHashRouter.so"), msg)
    }

    func testMalformedSignatureInRegistryNamesTheEntry() throws {
        let dir = try makeTempDir("ffibad")
        let msg = errorMessage {
            _ = try registry(
                dir,
                """
                {"plugins": [{"name": "r", "kind": "router", "ffi": {"library": "x.so", "symbol": "f", "signature": "void(int32_t *expert"}}]}
                """)
        }
        XCTAssertTrue(msg.contains("plugins[0].ffi") && msg.contains("ffi signature"), msg)
    }

    /// SplitMix64 finaliser, as in Plugins/FFIHashRouter/hash_router.c.
    private func mix64(_ x: UInt64) -> UInt64 { HostRNG.mix64(x) }

    func testHashRouterMatchesTheCFunction() throws {
        let router = try FFIFunction(
            name: "hash",
            entry: try entry(
                symbol: "vqmoe_hash_route",
                signature: "void(const int32_t *token_ids, int64_t n, int64_t n_experts, int32_t *expert)"))
        let ids: [Int32] = [0, 1, 2, 3, 97, 1000, 65535, 7]
        var out = [Int32](repeating: -1, count: ids.count)
        try ids.withUnsafeBufferPointer { ip in
            try out.withUnsafeMutableBufferPointer {
                try router.call(
                    x: nil, tokenIDs: ip.baseAddress, n: ids.count, d: 0, nExperts: 5, nCodes: 0, seed: 0,
                    output: $0.baseAddress!)
            }
        }
        XCTAssertEqual(out, ids.map { Int32(mix64(UInt64(UInt32(bitPattern: $0))) % 5) })
        // Routing by token id without token ids is refused with a clear message.
        var none = [Int32](repeating: 0, count: 1)
        let msg = errorMessage {
            try none.withUnsafeMutableBufferPointer {
                try router.call(
                    x: nil, tokenIDs: nil, n: 1, d: 0, nExperts: 5, nCodes: 0, seed: 0, output: $0.baseAddress!)
            }
        }
        XCTAssertTrue(msg.contains("routes by token id"), msg)
    }

    func testLSHRouterSendsNearbyVectorsToTheSameExpert() throws {
        let router = try FFIFunction(
            name: "lsh",
            entry: try entry(
                symbol: "vqmoe_lsh_route",
                signature: "void(const float *x, int64_t n, int64_t d, int64_t n_experts, int32_t *expert)"))
        let d = 16
        var r = HostRNG.make(seed: 3, stream: 0)
        let base = (0..<(8 * d)).map { _ in HostRNG.normal(&r) }
        let near = base.map { $0 * 1.5 }  // same directions: same signs against every hyperplane
        var a = [Int32](repeating: -1, count: 8), b = a
        try base.withUnsafeBufferPointer { xp in
            try a.withUnsafeMutableBufferPointer {
                try router.call(
                    x: xp.baseAddress, tokenIDs: nil, n: 8, d: d, nExperts: 4, nCodes: 0, seed: 0,
                    output: $0.baseAddress!)
            }
        }
        try near.withUnsafeBufferPointer { xp in
            try b.withUnsafeMutableBufferPointer {
                try router.call(
                    x: xp.baseAddress, tokenIDs: nil, n: 8, d: d, nExperts: 4, nCodes: 0, seed: 0,
                    output: $0.baseAddress!)
            }
        }
        XCTAssertEqual(a, b)
        XCTAssertGreaterThan(Set(a).count, 1)
    }

    /// The registry's kind must agree with the signature's output.
    func testKindMustMatchTheOutput() throws {
        let dir = try makeTempDir("ffikind")
        let msg = errorMessage {
            _ = try registry(
                dir,
                """
                {"plugins": [{"name": "q", "kind": "router", "ffi": {"library": "\(hashLib)", "symbol": "vqmoe_lsh_code", "signature": "void(const float *x, int64_t n, int64_t d, int64_t n_codes, int32_t *code)"}}]}
                """)
        }
        XCTAssertTrue(msg.contains("kind 'router' but the signature's output makes it a quantizer"), msg)
    }

    /// Through the component wrapper the `hash` router is an ordinary RouterInstance: k = 2 gives
    /// the hashed expert and the next, weights 1/2, and it has no backward.
    func testHashRouterAsAComponent() throws {
        let dir = try makeTempDir("fficomp")
        let reg = try registry(
            dir,
            """
            {"plugins": [{"name": "hash", "kind": "router", "ffi": {"library": "\(hashLib)", "symbol": "vqmoe_hash_route", "signature": "void(const int32_t *token_ids, int64_t n, int64_t n_experts, int32_t *expert)"}}]}
            """)
        let lib = try reg.library(named: "hash", kind: .router)
        XCTAssertEqual(lib.schema.map(\.name), ["k"])
        XCTAssertTrue(lib.hasNoGrad && lib.needsTokenIDs)
        let hp = try ResolvedHyperparameters(schema: lib.schema, values: ["k": 2], keyPath: "router")
        let router = try RouterInstance(
            PluginInstance(
                library: lib, instanceName: "r", dims: ModelDims(dModel: 4, nExperts: 5), hyperparameters: hp, seed: 1))
        let step = StepInfo(step: 0, totalSteps: 1, train: true, seed: 0)
        let shape = try router.shape(step)
        XCTAssertEqual(shape, RouterShape(mode: .topK, k: 2))
        let ids: [Int32] = [0, 1, 2, 97]
        let x = [Float](repeating: 0, count: 16)
        var idx = [Int32](repeating: -1, count: 8), w = [Float](repeating: 0, count: 8),
            load = [Float](repeating: 0, count: 5)
        let (aux, ctx) = try router.forward(
            step, x: x, tokenIDs: ids, nGroups: 1, groupSize: 4, shape: shape,
            outputs: RouterOutputs(expertIndex: &idx, weights: &w, expertLoad: &load))
        XCTAssertEqual(aux, 0)
        XCTAssertNil(ctx)
        let first = ids.map { Int32(HostRNG.mix64(UInt64(UInt32(bitPattern: $0))) % 5) }
        XCTAssertEqual(idx, first.flatMap { [$0, ($0 + 1) % 5] })
        XCTAssertEqual(w, [Float](repeating: 0.5, count: 8))
        XCTAssertEqual(load.reduce(0, +), 8)
        let tooMany = try ResolvedHyperparameters(schema: lib.schema, values: ["k": 6], keyPath: "router")
        let err = errorMessage {
            _ = try PluginInstance(
                library: lib, instanceName: "r", dims: ModelDims(dModel: 4, nExperts: 5), hyperparameters: tooMany,
                seed: 1)
        }
        XCTAssertTrue(err.contains("k = 6 exceeds the 5 experts"), err)
    }

    /// `lsh_code` as a quantizer: codes in [0, K), quantized = x, straight-through backward.
    func testLSHCodeAsAQuantizer() throws {
        let dir = try makeTempDir("ffiq")
        let reg = try registry(
            dir,
            """
            {"plugins": [{"name": "lsh_code", "kind": "quantizer", "ffi": {"library": "\(hashLib)", "symbol": "vqmoe_lsh_code", "signature": "void(const float *x, int64_t n, int64_t d, int64_t n_codes, int32_t *code)"}}]}
            """)
        let lib = try reg.library(named: "lsh_code", kind: .quantizer)
        let hp = try ResolvedHyperparameters(schema: lib.schema, values: [:], keyPath: "quantizer")
        let q = try QuantizerInstance(
            PluginInstance(
                library: lib, instanceName: "q", dims: ModelDims(dModel: 8, nCodes: 4), hyperparameters: hp, seed: 1))
        XCTAssertEqual(q.codebookSize, 4)
        let n = 6, d = 8
        var r = HostRNG.make(seed: 4, stream: 0)
        let x = (0..<(n * d)).map { _ in HostRNG.normal(&r) }
        var quantized = [Float](repeating: 0, count: n * d), codes = [Int32](repeating: -1, count: n)
        var counts = [Float](repeating: 0, count: 4)
        let (loss, ctx) = try q.forward(
            StepInfo(step: 0, totalSteps: 1, train: true, seed: 0), x: x, n: n, quantized: &quantized, codes: &codes,
            codeCounts: &counts)
        XCTAssertEqual(loss, 0)
        XCTAssertEqual(quantized, x)
        XCTAssertEqual(counts.reduce(0, +), Float(n))
        let f = try FFIFunction(
            name: "lsh",
            entry: {
                guard case .ffi(let e) = try reg.entry(named: "lsh_code").source else { fatalError() }; return e
            }())
        var direct = [Int32](repeating: -1, count: n)
        try f.call(x: x, tokenIDs: nil, n: n, d: d, nExperts: 0, nCodes: 4, seed: 0, output: &direct)
        XCTAssertEqual(codes, direct)
        var gx = [Float](repeating: 1, count: n * d)
        let gq = (0..<(n * d)).map { Float($0) }
        try q.backward(try XCTUnwrap(ctx), n: n, gradQuantized: gq, gradLoss: 0.08, gradX: &gx)
        XCTAssertEqual(gx, gq.map { $0 + 1 })
    }
}
