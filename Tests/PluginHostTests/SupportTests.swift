import VQMoE
import XCTest

final class SupportTests: XCTestCase {
    func testSHA256KnownVectors() {
        XCTAssertEqual(SHA256.hex(of: []), "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855")
        XCTAssertEqual(
            SHA256.hex(of: Array("abc".utf8)), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad")
        XCTAssertEqual(
            SHA256.hex(of: Array("abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq".utf8)),
            "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1")
        XCTAssertEqual(
            SHA256.hex(of: [UInt8](repeating: 0x61, count: 1000)),
            "41edece42d63e8d9bf515a9ba6932e1c20cbc9f5a5d134645adb5db1b9737ea3")
    }

    func testClosestFirst() {
        XCTAssertEqual(editDistance("kitten", "sitting"), 3)
        XCTAssertEqual(closestFirst("smo", among: ["vqvae", "smoe", "lm"]), ["smoe", "lm", "vqvae"])
    }

    func testRNGIsReproducibleAndRoughlyNormal() {
        var a = HostRNG.make(seed: 9, stream: 1), b = HostRNG.make(seed: 9, stream: 1),
            c = HostRNG.make(seed: 9, stream: 2)
        XCTAssertEqual(HostRNG.next(&a), HostRNG.next(&b))
        XCTAssertNotEqual(HostRNG.next(&a), HostRNG.next(&c))
        var r = HostRNG.make(seed: 1, stream: 0)
        let xs = (0..<20000).map { _ in Double(HostRNG.normal(&r)) }
        let mean = xs.reduce(0, +) / Double(xs.count)
        let variance = xs.map { ($0 - mean) * ($0 - mean) }.reduce(0, +) / Double(xs.count)
        XCTAssertEqual(mean, 0, accuracy: 0.03)
        XCTAssertEqual(variance, 1, accuracy: 0.05)
    }

    func testParallelForCoversEveryItemOnce() {
        HostRuntime.configure(threads: 2)
        defer { HostRuntime.configure(threads: 1) }
        let n = 1000
        let hits = UnsafeMutablePointer<Int32>.allocate(capacity: n)
        hits.initialize(repeating: 0, count: n)
        defer { hits.deallocate() }
        nonisolated(unsafe) let h = hits
        HostRuntime.parallelFor(Int64(n), grain: 10) { b, e in for i in b..<e { h[Int(i)] += 1 } }
        XCTAssertTrue((0..<n).allSatisfy { hits[$0] == 1 })
    }
}
