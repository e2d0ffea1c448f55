import Foundation
import VQMoE
import XCTest

/// TensorBoard event files: CRC-32C, TFRecord framing, the scalars of a metrics line, and the
/// progress bar's timing fields. (Tests/python/test_tensorboard.py reads a real run's file with
/// TensorBoard's own reader.)
final class TensorBoardEventsTests: XCTestCase {
    func testCRC32CKnownValues() {
        // The check value of CRC-32C, and RFC 3720's test vectors (32 bytes of 0x00, of 0xFF).
        XCTAssertEqual(CRC32C.checksum(Array("123456789".utf8)), 0xE306_9283)
        XCTAssertEqual(CRC32C.checksum([UInt8](repeating: 0, count: 32)), 0x8A91_36AA)
        XCTAssertEqual(CRC32C.checksum([UInt8](repeating: 0xFF, count: 32)), 0x62A8_AB43)
        XCTAssertEqual(CRC32C.checksum([UInt8]()), 0)
        let c = CRC32C.checksum(Array("123456789".utf8))
        XCTAssertEqual(CRC32C.masked(Array("123456789".utf8)), ((c >> 15) | (c << 17)) &+ 0xA282_EAD8)
    }

    /// The records of an event file: (data) after checking both masked CRCs of each.
    func records(_ path: String) throws -> [[UInt8]] {
        let bytes = [UInt8](try Data(contentsOf: URL(fileURLWithPath: path)))
        var out: [[UInt8]] = [], at = 0
        while at < bytes.count {
            let lengthBytes = Array(bytes[at..<at + 8])
            let length = Int(lengthBytes.enumerated().reduce(UInt64(0)) { $0 | UInt64($1.element) << (8 * $1.offset) })
            let crc = { (i: Int) in (0..<4).reduce(UInt32(0)) { $0 | UInt32(bytes[i + $1]) << (8 * $1) } }
            XCTAssertEqual(crc(at + 8), CRC32C.masked(lengthBytes))
            let data = Array(bytes[at + 12..<at + 12 + length])
            XCTAssertEqual(crc(at + 12 + length), CRC32C.masked(data))
            out.append(data)
            at += 16 + length
        }
        XCTAssertEqual(at, bytes.count)
        return out
    }

    func testEventFileFramingAndFields() throws {
        let dir = NSTemporaryDirectory() + "vqmoe-tb-\(UUID().uuidString)"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let events = try TensorBoardEvents(directory: dir, resumingAt: 7)
        try events.write([("train/loss", 1.5)], step: 9)
        XCTAssertTrue(URL(fileURLWithPath: events.path).lastPathComponent.hasPrefix("events.out.tfevents."))
        let r = try records(events.path)
        XCTAssertEqual(r.count, 3)
        // 1: wall_time (field 1, fixed64), file_version (field 3) = "brain.Event:2".
        XCTAssertEqual(r[0][0], 0x09)
        XCTAssertEqual(Array(r[0][9...]), [0x1A, 13] + Array("brain.Event:2".utf8))
        // 2: step 7 (field 2, varint), session_log (field 7) { status (1) = START (1) }.
        XCTAssertEqual(Array(r[1][9...]), [0x10, 7, 0x3A, 2, 0x08, 1])
        // 3: step 9, summary (5) { value (1) { tag (1) = "train/loss", simple_value (2) = 1.5f } }.
        let tag = Array("train/loss".utf8), value: [UInt8] = [0x0A, UInt8(tag.count)] + tag + [0x15, 0, 0, 0xC0, 0x3F]
        XCTAssertEqual(Array(r[2][9...]), [0x10, 9, 0x2A, UInt8(value.count + 2), 0x0A, UInt8(value.count)] + value)
    }

    func testScalarsOfMetricsLines() throws {
        let line = #"""
            {"bpc": 2.5, "code_counts": [[1, 2]], "code_perplexity": [[3.5], [4.0]], "codes_used": [[7, 6], [8, 8]],
             "consistency_router": [0.9, null], "loss": 1.75, "split": "valid", "step": 12}
            """#
        let object = try XCTUnwrap(JSONSerialization.jsonObject(with: Data(line.utf8)) as? [String: Any])
        let s = try XCTUnwrap(TensorBoardEvents.scalars(of: object))
        XCTAssertEqual(s.step, 12)
        XCTAssertEqual(
            s.values.map(\.tag),
            [
                "valid/bpc", "valid/code_perplexity/layer_0", "valid/code_perplexity/layer_1",
                "valid/codes_used/layer_0/level_0", "valid/codes_used/layer_0/level_1",
                "valid/codes_used/layer_1/level_0", "valid/codes_used/layer_1/level_1",
                "valid/consistency_router/layer_0", "valid/consistency_router/layer_1", "valid/loss",
            ])
        XCTAssertEqual(s.values.map(\.value).filter { !$0.isNaN }, [2.5, 3.5, 4.0, 7, 6, 8, 8, 0.9, 1.75])
        XCTAssertTrue(s.values[8].value.isNaN)
        XCTAssertNil(TensorBoardEvents.scalars(of: ["loss": 1]))
    }

    func testProgressTiming() {
        XCTAssertEqual(ProgressReporter.clock(0), "00:00")
        XCTAssertEqual(ProgressReporter.clock(59.6), "01:00")
        XCTAssertEqual(ProgressReporter.clock(3725), "1:02:05")
        // 100 of 1,000 steps in 30 s: 900 steps left take 270 s.
        XCTAssertEqual(ProgressReporter.timing(step: 100, total: 1000, startStep: 0, elapsed: 30), "00:30<04:30")
        // Resumed at 500: the pace counts this process's steps only.
        XCTAssertEqual(ProgressReporter.timing(step: 600, total: 1000, startStep: 500, elapsed: 10), "00:10<00:40")
        XCTAssertEqual(ProgressReporter.timing(step: 500, total: 1000, startStep: 500, elapsed: 0), "00:00<?")
    }
}
