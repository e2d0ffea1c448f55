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
    }

    func testMalformedSignaturesGiveClearErrors() {
        func msg(_ s: String) -> String { errorMessage { _ = try FFISignature(s) } }
        XCTAssertTrue(msg("void route const float *x").contains("expected RETURN_TYPE"))
        XCTAssertTrue(msg("float(const float *x, int32_t *expert)").contains("return type 'float' is not supported"))
        XCTAssertTrue(msg("void(const float *x, int64_t n)").contains("needs an output parameter 'int32_t *expert'"))
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
        let msg = errorMessage { _ = try FFIRouter(name: "r", entry: e) }
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
        let router = try FFIRouter(
            name: "hash",
            entry: try entry(
                symbol: "vqmoe_hash_route",
                signature: "void(const int32_t *token_ids, int64_t n, int64_t n_experts, int32_t *expert)"))
        let ids: [Int32] = [0, 1, 2, 3, 97, 1000, 65535, 7]
        var out = [Int32](repeating: -1, count: ids.count)
        try ids.withUnsafeBufferPointer { ip in
            try out.withUnsafeMutableBufferPointer {
                try router.route(
                    x: nil, tokenIDs: ip.baseAddress, n: ids.count, d: 0, nExperts: 5, seed: 0, expert: $0.baseAddress!)
            }
        }
        XCTAssertEqual(out, ids.map { Int32(mix64(UInt64(UInt32(bitPattern: $0))) % 5) })
        // Routing by token id without token ids is refused with a clear message.
        var none = [Int32](repeating: 0, count: 1)
        let msg = errorMessage {
            try none.withUnsafeMutableBufferPointer {
                try router.route(x: nil, tokenIDs: nil, n: 1, d: 0, nExperts: 5, seed: 0, expert: $0.baseAddress!)
            }
        }
        XCTAssertTrue(msg.contains("routes by token id"), msg)
    }

    func testLSHRouterSendsNearbyVectorsToTheSameExpert() throws {
        let router = try FFIRouter(
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
                try router.route(
                    x: xp.baseAddress, tokenIDs: nil, n: 8, d: d, nExperts: 4, seed: 0, expert: $0.baseAddress!)
            }
        }
        try near.withUnsafeBufferPointer { xp in
            try b.withUnsafeMutableBufferPointer {
                try router.route(
                    x: xp.baseAddress, tokenIDs: nil, n: 8, d: d, nExperts: 4, seed: 0, expert: $0.baseAddress!)
            }
        }
        XCTAssertEqual(a, b)
        XCTAssertGreaterThan(Set(a).count, 1)
    }
}
