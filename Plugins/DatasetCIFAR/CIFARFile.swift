// Reading the binary version of CIFAR-10 / CIFAR-100 (Krizhevsky 2009).
//
// A file is a sequence of fixed-size records: the label byte(s) then 3072 pixel bytes, the
// 1024 red values of the 32×32 image (row-major), then the 1024 green, then the 1024 blue.
// CIFAR-10: 1 label byte (0..9), records of 3073 bytes, files data_batch_1..5.bin and
// test_batch.bin (10,000 records each). CIFAR-100: 2 label bytes (coarse 0..19, fine 0..99),
// records of 3074 bytes, files train.bin (50,000) and test.bin (10,000).
import Glibc
import PluginKit
import VQMoEABI

/// Where to get the data, appended to "file missing" errors.
func cifarDataHint(_ variant: CIFARVariant) -> String {
    let archive =
        variant == .cifar10
        ? "cifar-10-binary.tar.gz, which unpacks to cifar-10-batches-bin/ (data_batch_1..5.bin, test_batch.bin): put it at $DATA/cifar-10-batches-bin (the default) or set dir to it"
        : "cifar-100-binary.tar.gz, which unpacks to cifar-100-binary/ (train.bin, test.bin): set dir to that folder"
    return
        "Get the \(variant.displayName) binary version (\"for C programs\") from https://www.cs.toronto.edu/~kriz/cifar.html: \(archive)."
}

/// Images decoded from one or more record files: pixels (count, 3, 32, 32) bytes in CHW
/// order (the records' plane order) and the chosen label of each.
struct ImageSet {
    var pixels: [UInt8] = []
    var labels: [Int32] = []
    var count: Int { labels.count }
}

/// A note for a missing "X.bin" when "X" exists: the Python version instead of the binary one.
private func pickleNote(_ path: String) -> String {
    var st = stat()
    guard path.hasSuffix(".bin"), stat(String(path.dropLast(4)), &st) == 0 else { return "" }
    return
        "\(String(path.dropLast(4))) exists: that is the Python (pickle) version, this plugin reads the binary version. "
}

/// Append the records of `path` to `set`: check the size is a positive multiple of the record
/// size and every label byte is in range; keep the fine (or coarse) label.
func appendRecords(_ path: String, variant: CIFARVariant, coarse: Bool, to set: inout ImageSet) throws(PluginFailure) {
    let bytes = try readWholeFile(path, hint: pickleNote(path) + cifarDataHint(variant))
    let R = variant.recordSize, L = variant.labelBytes, P = 3 * 32 * 32
    guard !bytes.isEmpty else { throw .io("\(path) is empty (\(variant.displayName) records are \(R) bytes)") }
    guard bytes.count % R == 0 else {
        let hint =
            variant == .cifar10 && bytes.count % (R + 1) == 0
            ? " (it divides into 3074-byte records: a CIFAR-100 file? set variant = cifar100)"
            : variant == .cifar100 && bytes.count % (R - 1) == 0
                ? " (it divides into 3073-byte records: a CIFAR-10 file? set variant = cifar10)" : ""
        throw .io(
            "\(path): size \(bytes.count) bytes is not a multiple of the \(variant.displayName) record size \(R) (\(L) label byte\(L == 1 ? "" : "s") + 3072 pixels)\(hint)"
        )
    }
    let n = bytes.count / R
    set.pixels.reserveCapacity(set.pixels.count + n * P)
    set.labels.reserveCapacity(set.labels.count + n)
    // (name, limit) of each label byte in a record.
    let labelKinds: [(String, Int)] =
        variant == .cifar10 ? [("label", 10)] : [("coarse label", 20), ("fine label", 100)]
    for i in 0..<n {
        let base = i * R
        for (k, (name, limit)) in labelKinds.enumerated() where Int(bytes[base + k]) >= limit {
            throw .io(
                "\(path): record \(i) (byte offset \(base + k)): \(name) \(bytes[base + k]) is outside [0, \(limit))")
        }
        let label = variant == .cifar10 ? bytes[base] : (coarse ? bytes[base] : bytes[base + 1])
        set.labels.append(Int32(label))
        set.pixels.append(contentsOf: bytes[(base + L)..<(base + R)])
    }
}
