// Reading IDX files (LeCun et al., the MNIST format), gzip-compressed or plain, through zlib.
//
// An IDX file is a 4-byte magic number 0x0000TTNN (TT = element type, 0x08 = unsigned byte;
// NN = number of dimensions), NN big-endian uint32 dimension sizes, then the elements in
// row-major order. Image files are 0x00000803 (count, rows, cols); label files 0x00000801
// (count).
import CZlib
import Glibc
import PluginKit
import VQMoEABI

/// Where to get the data, appended to "file missing" errors.
let idxDataHint =
    "Fashion-MNIST: use ../shared/data/fashion-mnist (the default $DATA/fashion-mnist, $DATA being $VQMOE_DATA or a shared/data folder beside the checkout), "
    + "or install Debian's dataset-fashion-mnist package (files in /usr/share/datasets/fashion-mnist/), "
    + "or download the four *-ubyte.gz files of the Fashion-MNIST GitHub release "
    + "(https://github.com/zalandoresearch/fashion-mnist, folder data/fashion; MIT licence). "
    + "MNIST ships the same four file names in the same format."

/// IDX magic numbers: unsigned-byte elements, 3 dimensions (images) or 1 (labels).
let idxImageMagic: UInt32 = 0x0000_0803
let idxLabelMagic: UInt32 = 0x0000_0801

/// "0x00000803".
func hex32(_ v: UInt32) -> String {
    let s = String(v, radix: 16)
    return "0x" + String(repeating: "0", count: max(0, 8 - s.count)) + s
}

/// True when `path` names a regular file (following links).
private func isRegularFile(_ path: String) -> Bool {
    var st = stat()
    return stat(path, &st) == 0 && (st.st_mode & S_IFMT) == S_IFREG
}

/// The file to open for `path`: the path itself, else the same path without (or with) ".gz",
/// so that both the compressed release files and unpacked copies are found. Throws an IO
/// error naming every path tried and where the data comes from.
func locateDataFile(_ path: String, what: String) throws(PluginFailure) -> String {
    let other = path.hasSuffix(".gz") ? String(path.dropLast(3)) : path + ".gz"
    for candidate in [path, other] where isRegularFile(candidate) { return candidate }
    throw .io("\(what) file \(path) not found (also tried \(other)). \(idxDataHint)")
}

/// A sequential reader over a gzip or plain file (zlib's gzread passes plain files through).
final class GzipReader {
    let path: String
    private let file: gzFile

    init(path: String) throws(PluginFailure) {
        guard let f = gzopen(path, "rb") else {
            throw .io("cannot open \(path): \(String(cString: strerror(errno)))")
        }
        self.path = path
        file = f
        gzbuffer(file, 1 << 17)
    }

    deinit { gzclose(file) }

    /// Read up to `count` bytes into `dst`; returns how many were read (fewer only at the end
    /// of the file). Decompression errors (a corrupt or truncated gzip stream) throw.
    func read(into dst: UnsafeMutableRawPointer, count: Int) throws(PluginFailure) -> Int {
        var done = 0
        while done < count {
            let want = UInt32(min(count - done, 1 << 24))
            let got = gzread(file, dst + done, want)
            if got < 0 { throw .io("\(path): cannot decompress: \(zlibError().message)") }
            if got == 0 { break }
            done += Int(got)
        }
        if done < count {
            // A short read: the end of the data, or of a gzip stream cut short (Z_BUF_ERROR).
            let (code, why) = zlibError()
            if code == Z_BUF_ERROR {
                throw .io("\(path): truncated: the gzip stream is cut short (\(why)); the download is incomplete")
            }
            if code != Z_OK { throw .io("\(path): cannot decompress: \(why)") }
        }
        return done
    }

    /// zlib's error code and message for this file (Z_OK when none); the message without the
    /// path zlib puts in front of it.
    private func zlibError() -> (code: Int32, message: String) {
        var code: Int32 = 0
        var why = gzerror(file, &code).map { String(cString: $0) } ?? ""
        if why.hasPrefix(path + ": ") { why.removeFirst(path.count + 2) }
        return (code, why.isEmpty ? "unknown zlib error \(code)" : why)
    }

    /// Up to `count` bytes (fewer only at the end of the file).
    func readBytes(_ count: Int) throws(PluginFailure) -> [UInt8] {
        let buf = UnsafeMutableRawPointer.allocate(byteCount: max(count, 1), alignment: 16)
        defer { buf.deallocate() }
        let n = try read(into: buf, count: count)
        return [UInt8](UnsafeRawBufferPointer(start: buf, count: n))
    }
}

/// One IDX file of unsigned bytes: its dimensions and its elements.
struct IDXArray {
    let path: String
    /// Dimension sizes from the header, e.g. (count, rows, cols).
    let dims: [Int]
    /// The elements, row-major, product(dims) bytes.
    let bytes: [UInt8]
}

/// What a magic number announces, for error messages.
private func magicMeaning(_ m: UInt32) -> String {
    switch m {
    case idxImageMagic: return "an IDX image file"
    case idxLabelMagic: return "an IDX label file"
    default: return "an IDX file of unsigned bytes"
    }
}

/// Read a whole IDX file with the `expected` magic number (which fixes the number of
/// dimensions). Checks the magic, that every dimension is >= 1, that the file holds exactly
/// the bytes its header declares, and nothing after them.
func readIDX(_ requested: String, what: String, magic expected: UInt32) throws(PluginFailure) -> IDXArray {
    let path = try locateDataFile(requested, what: what)
    let reader = try GzipReader(path: path)
    let ndims = Int(expected & 0xff)

    // Header: magic, then ndims big-endian uint32 sizes.
    let header = try reader.readBytes(4 + 4 * ndims)
    let got = header.count
    func be32(_ at: Int) -> UInt32 {
        UInt32(header[at]) << 24 | UInt32(header[at + 1]) << 16 | UInt32(header[at + 2]) << 8 | UInt32(header[at + 3])
    }
    guard got >= 4 else {
        throw .io(
            "\(path): truncated: expected a \(4 + 4 * ndims)-byte IDX header, the file has \(got) bytes (\(what))")
    }
    let magic = be32(0)
    guard magic == expected else {
        var msg = "\(path): bad magic \(hex32(magic)) (expected \(hex32(expected)): \(magicMeaning(expected)))"
        if magic == idxImageMagic || magic == idxLabelMagic {
            msg += "; this is \(magicMeaning(magic)): are the image and label file names swapped?"
        } else if magic >> 16 == 0x1f8b {
            msg += "; this looks like a damaged gzip file"
        } else {
            msg += "; not an IDX file of unsigned bytes (\(what))"
        }
        throw .io(msg)
    }
    guard got == 4 + 4 * ndims else {
        throw .io(
            "\(path): truncated: expected a \(4 + 4 * ndims)-byte IDX header, the file has \(got) bytes (\(what))")
    }
    var dims: [Int] = []
    var total = 1
    for k in 0..<ndims {
        let d = Int(be32(4 + 4 * k))
        guard d >= 1 else { throw .io("\(path): dimension \(k) of the IDX header is 0 (\(what) holds no data)") }
        let (t, overflow) = total.multipliedReportingOverflow(by: d)
        guard !overflow, t <= 1 << 40 else {
            throw .io("\(path): the IDX header declares an impossible size \(dims + [d])")
        }
        dims.append(d)
        total = t
    }

    // Elements, read in chunks so a header that overstates the size fails on the data, not
    // on an allocation.
    var bytes: [UInt8] = []
    bytes.reserveCapacity(min(total, 1 << 28))
    while bytes.count < total {
        let chunk = try reader.readBytes(min(1 << 22, total - bytes.count))
        if chunk.isEmpty { break }
        bytes.append(contentsOf: chunk)
    }
    let shape = dims.map(String.init).joined(separator: " x ")
    guard bytes.count == total else {
        throw .io(
            "\(path): truncated: expected \(total) bytes of data after the header (\(shape)), the file has \(bytes.count)"
        )
    }
    guard try reader.readBytes(16).isEmpty else {
        throw .io("\(path): trailing data: the header declares \(shape) = \(total) bytes but the file holds more")
    }
    return IDXArray(path: path, dims: dims, bytes: bytes)
}
