import PluginKit
import VQMoEABI

// DatasetChar: the `char` dataset plugin -- a byte-level language-modelling corpus.
//
// The whole file is read into memory at create() and split contiguously into train /
// valid / test (enwik8: 90/5/5; nanoGPT's tiny Shakespeare: 90/10/0). The vocabulary is the
// 256 raw byte values. With clean = "text8" the file is first turned into text8-style text by
// a port of Matt Mahoney's wikifil.pl (Text8.swift): only [a-z ] remains, and the splits apply
// to that cleaned text. compact_vocab = true renumbers such text to 27 tokens (space -> 0,
// a..z -> 1..26). Batches are a pure function of (instance seed, split, index, batch_size),
// cut by PluginKit's TokenBatches: random train windows and ordered eval windows, or with
// order = "streams" (Transformer-XL) batch_size parallel streams read in order.
//
// Depends only on the C ABI (vqmoe_plugin.h), PluginKit and Glibc.
#if canImport(Glibc)
    import Glibc
#elseif canImport(Darwin)
    import Darwin
#endif

// MARK: - small helpers

/// Where to get the data, appended to "file missing" errors.
private let dataHint =
    "enwik8-mini ships in the gensim 4.4.0 wheel as gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2 (pip download --no-deps gensim==4.4.0, then bunzip2), or use ../shared/data; enwik8 / enwik9: http://mattmahoney.net/dc/enwik8.zip, enwik9.zip (clean=text8 derives text8 / fil9 from them); text8 itself: http://mattmahoney.net/dc/text8.zip (clean=none, compact_vocab=true); tiny Shakespeare: https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"

private let splitNames = ["train", "valid", "test"]

/// Report `message` through host->set_error and return `status`.
@inline(never)
private func fail(_ host: UnsafePointer<vqmoe_host_api>?, _ status: Int32, _ message: String) -> Int32 {
    if let setError = host?.pointee.set_error {
        message.withCString { setError($0) }
    }
    return status
}

/// Number of elements of a tensor view (shape product).
private func numel(_ t: vqmoe_tensor) -> Int64 {
    guard let shape = t.shape else { return t.ndim == 0 ? 1 : 0 }
    var n: Int64 = 1
    for i in 0..<Int(t.ndim) { n *= shape[i] }
    return n
}

/// True when `t` is a contiguous int32 tensor with exactly `dims` as its shape.
private func isI32(_ t: vqmoe_tensor, _ dims: [Int64]) -> Bool {
    guard t.data != nil, t.dtype.code == UInt8(VQMOE_DTYPE_INT), t.dtype.bits == 32, t.dtype.lanes == 1,
        t.strides == nil, t.byte_offset == 0, Int(t.ndim) == dims.count, let shape = t.shape
    else { return false }
    for i in 0..<dims.count where shape[i] != dims[i] { return false }
    return true
}

/// `floor(n * fraction)`, clamped to [0, n], with a guard against representation error
/// (0.29 * 100 must give 29, not 28).
private func fractionOf(_ n: Int, _ fraction: Double) -> Int {
    let x = (Double(n) * fraction + 1e-6).rounded(.down)
    return min(max(Int(x), 0), n)
}

/// Read a whole regular file. Returns (bytes, count) or an errno-style message.
private func readWholeFile(_ path: String) -> (UnsafeMutablePointer<UInt8>?, Int, String?, Bool) {
    let fd = open(path, O_RDONLY)
    if fd < 0 {
        let e = errno
        return (nil, 0, String(cString: strerror(e)), e == ENOENT)
    }
    defer { close(fd) }
    var st = stat()
    guard fstat(fd, &st) == 0 else { return (nil, 0, String(cString: strerror(errno)), false) }
    guard (st.st_mode & S_IFMT) == S_IFREG else { return (nil, 0, "not a regular file", false) }
    let size = Int(st.st_size)
    let buf = UnsafeMutablePointer<UInt8>.allocate(capacity: max(size, 1))
    var done = 0
    while done < size {
        let r = read(fd, buf + done, size - done)
        if r < 0 {
            if errno == EINTR { continue }
            let msg = String(cString: strerror(errno))
            buf.deallocate()
            return (nil, 0, msg, false)
        }
        if r == 0 { break }  // file shrank while reading
        done += r
    }
    return (buf, done, nil, false)
}

// MARK: - the instance

/// One `char` dataset: the file's bytes and the split boundaries.
final class CharDataset {
    let host: UnsafePointer<vqmoe_host_api>
    let seed: UInt64
    let path: String
    /// The whole file. Owned; freed in deinit.
    let bytes: UnsafeMutablePointer<UInt8>
    let count: Int
    /// Tokens per window (T).
    let seqLen: Int
    /// Token range: 256 (bytes) or 27 (compact_vocab: space 0, a..z 1..26).
    var vocabSize = 256
    /// order = "streams": batch rows are parallel streams read in order (Transformer-XL).
    var streams = false
    /// Start offset and length of each split in `bytes` (train, valid, test).
    let splitStart: [Int]
    let splitLen: [Int]

    init(
        host: UnsafePointer<vqmoe_host_api>, seed: UInt64, path: String, bytes: UnsafeMutablePointer<UInt8>,
        count: Int, seqLen: Int, splitStart: [Int], splitLen: [Int]
    ) {
        self.host = host; self.seed = seed; self.path = path; self.bytes = bytes; self.count = count
        self.seqLen = seqLen; self.splitStart = splitStart; self.splitLen = splitLen
    }

    deinit { bytes.deallocate() }

    /// How batches are cut from the splits (windows or streams).
    var batches: TokenBatches { TokenBatches(seqLen: seqLen, streams: streams, name: "char") }
}

/// Unwrap an instance handle (borrowed, not retained).
@inline(__always)
private func dataset(_ inst: OpaquePointer?) -> CharDataset? {
    guard let inst else { return nil }
    return Unmanaged<CharDataset>.fromOpaque(UnsafeRawPointer(inst)).takeUnretainedValue()
}

// MARK: - create

/// create(): read the hyperparameters, load the file, compute the splits.
private func createDataset(
    _ info: UnsafePointer<vqmoe_create_info>?, _ hp: UnsafePointer<vqmoe_hparams>?,
    _ out: UnsafeMutablePointer<OpaquePointer?>?
) -> Int32 {
    guard let out else { return VQMOE_ERR_INVALID_ARGUMENT }
    out.pointee = nil
    guard let info, let host = info.pointee.host else { return VQMOE_ERR_INVALID_ARGUMENT }
    guard info.pointee.struct_size >= UInt32(MemoryLayout<vqmoe_create_info>.size) else {
        return fail(
            host, VQMOE_ERR_INVALID_ARGUMENT, "char: create_info struct_size \(info.pointee.struct_size) is too small")
    }
    let name = info.pointee.instance_name.map { String(cString: $0) } ?? "char"
    let who = "dataset 'char' (\(name))"

    guard let pathC = vqmoe_hp_string(hp, "path", nil), pathC.pointee != 0 else {
        return fail(host, VQMOE_ERR_INVALID_ARGUMENT, "\(who): hyperparameter 'path' is empty")
    }
    let path = String(cString: pathC)
    let trainFraction = vqmoe_hp_float(hp, "train_fraction", 0.9)
    let validFraction = vqmoe_hp_float(hp, "valid_fraction", 0.05)
    let seqLenHP = vqmoe_hp_int(hp, "seq_len", 0)
    guard trainFraction > 0 && trainFraction <= 1 else {
        return fail(host, VQMOE_ERR_INVALID_ARGUMENT, "\(who): train_fraction \(trainFraction) must be in (0, 1]")
    }
    guard validFraction >= 0 && validFraction < 1 else {
        return fail(host, VQMOE_ERR_INVALID_ARGUMENT, "\(who): valid_fraction \(validFraction) must be in [0, 1)")
    }
    guard trainFraction + validFraction <= 1 + 1e-9 else {
        return fail(
            host, VQMOE_ERR_INVALID_ARGUMENT,
            "\(who): train_fraction + valid_fraction = \(trainFraction + validFraction) exceeds 1")
    }
    let cleanC = vqmoe_hp_string(hp, "clean", "none")
    let clean = cleanC.map { String(cString: $0) } ?? "none"
    let compact = vqmoe_hp_bool(hp, "compact_vocab", 0) != 0
    let order = vqmoe_hp_string(hp, "order", "windows").map { String(cString: $0) } ?? "windows"
    guard order == "windows" || order == "streams" else {
        return fail(host, VQMOE_ERR_INVALID_ARGUMENT, "\(who): order '\(order)' must be one of windows, streams")
    }
    guard clean == "none" || clean == "text8" else {
        return fail(host, VQMOE_ERR_INVALID_ARGUMENT, "\(who): clean '\(clean)' must be one of none, text8")
    }
    guard seqLenHP >= 0 else {
        return fail(host, VQMOE_ERR_INVALID_ARGUMENT, "\(who): seq_len \(seqLenHP) must be >= 0 (0 = the model's)")
    }
    let T = seqLenHP > 0 ? Int(seqLenHP) : Int(info.pointee.seq_len)
    guard T >= 1 else {
        return fail(
            host, VQMOE_ERR_INVALID_ARGUMENT,
            "\(who): sequence length is \(T); set the dataset's seq_len or the model's seq_len to >= 1")
    }

    let (raw, rawCount, why, missing) = readWholeFile(path)
    guard var bytes = raw else {
        let msg =
            missing
            ? "\(who): data file \(path) not found. \(dataHint)"
            : "\(who): cannot read \(path): \(why ?? "unknown error")"
        return fail(host, VQMOE_ERR_IO, msg)
    }
    guard rawCount > 0 else {
        bytes.deallocate()
        return fail(host, VQMOE_ERR_IO, "\(who): data file \(path) is empty")
    }
    var n = rawCount
    if clean == "text8" {
        // wikifil.pl: the visible text of the dump's articles, in [a-z ].
        let cleaned = wikifilText8(UnsafeBufferPointer(start: bytes, count: rawCount))
        bytes.deallocate()
        guard !cleaned.isEmpty else {
            return fail(
                host, VQMOE_ERR_IO,
                "\(who): \(path): clean=text8 left no text (\(rawCount) bytes in; wikifil.pl keeps only the <text ...> ... </text> of non-#REDIRECT pages: is this a MediaWiki XML dump like enwik8?)"
            )
        }
        n = cleaned.count
        bytes = UnsafeMutablePointer<UInt8>.allocate(capacity: n)
        cleaned.withUnsafeBufferPointer { bytes.initialize(from: $0.baseAddress!, count: n) }
    }
    if compact {
        // text8's 27 symbols: space -> 0, a..z -> 1..26; anything else is an error.
        for i in 0..<n {
            let c = bytes[i]
            if c == 0x20 { bytes[i] = 0; continue }
            guard c >= 0x61 && c <= 0x7A else {
                bytes.deallocate()
                let source = clean == "text8" ? "the cleaned text of \(path)" : path
                return fail(
                    host, VQMOE_ERR_IO,
                    "\(who): \(source): byte \(i) is 0x\(String(c, radix: 16)), not a-z or space; compact_vocab needs text8-style text (set clean=text8 for a Wikipedia XML dump)"
                )
            }
            bytes[i] = c - 0x60
        }
    }

    // Contiguous splits from cumulative fractions (so 0.9 + 0.1 leaves exactly 0 for test).
    let trainEnd = fractionOf(n, trainFraction)
    let validEnd = max(trainEnd, fractionOf(n, trainFraction + validFraction))
    let starts = [0, trainEnd, validEnd]
    let lens = [trainEnd, validEnd - trainEnd, n - validEnd]
    let sizes =
        "train \(lens[0]), valid \(lens[1]), test \(lens[2]) of \(n) bytes\(clean == "text8" ? " after clean=text8" : "")"
    guard lens[0] >= T + 1 else {
        bytes.deallocate()
        return fail(
            host, VQMOE_ERR_IO,
            "\(who): \(path): the train split has \(lens[0]) bytes (\(sizes)), too short for one window of seq_len \(T) plus its target byte (\(T + 1) bytes)"
        )
    }
    for s in 1...2 where lens[s] == 1 {
        bytes.deallocate()
        return fail(
            host, VQMOE_ERR_IO,
            "\(who): \(path): the \(splitNames[s]) split has 1 byte (\(sizes)), too short for one window (an input byte and its target); change train_fraction / valid_fraction"
        )
    }

    let ds = CharDataset(
        host: host, seed: info.pointee.seed, path: path, bytes: bytes, count: n,
        seqLen: T, splitStart: starts, splitLen: lens)
    ds.vocabSize = compact ? 27 : 256
    ds.streams = order == "streams"
    out.pointee = OpaquePointer(Unmanaged.passRetained(ds).toOpaque())
    return VQMOE_OK
}

// MARK: - the descriptor

/// Build one hyperparameter spec with C strings that live for the process.
private func spec(
    _ name: String, _ type: Int32, _ flags: UInt32, _ description: String,
    number: Double = 0, string: String? = nil, min: Double = 0, max: Double = 0,
    choices: String? = nil
) -> vqmoe_hparam_spec {
    vqmoe_hparam_spec(
        name: UnsafePointer(strdup(name)), type: type, flags: flags,
        description: UnsafePointer(strdup(description)), default_number: number,
        default_string: string.map { UnsafePointer(strdup($0)) }, min_value: min, max_value: max,
        choices: choices.map { UnsafePointer(strdup($0)) })
}

/// The descriptor, built once on first use; never freed (the host never unloads plugins).
nonisolated(unsafe) let charDescriptor: UnsafeMutablePointer<vqmoe_plugin_desc> = {
    let specs: [vqmoe_hparam_spec] = [
        spec(
            "path", VQMOE_HP_STRING, VQMOE_HP_PATH,
            "byte corpus to read (the host expands $DATA and $ROOT)",
            string: "$DATA/enwik8-mini/enwik8-mini"),
        spec(
            "train_fraction", VQMOE_HP_FLOAT, VQMOE_HP_HAS_MIN | VQMOE_HP_HAS_MAX,
            "leading fraction of the bytes used for training, in (0, 1]", number: 0.9, min: 0, max: 1),
        spec(
            "valid_fraction", VQMOE_HP_FLOAT, VQMOE_HP_HAS_MIN | VQMOE_HP_HAS_MAX,
            "next fraction used for validation, in [0, 1); the test split is the rest", number: 0.05, min: 0, max: 1),
        spec(
            "seq_len", VQMOE_HP_INT, VQMOE_HP_HAS_MIN,
            "tokens per window; 0 = the model's seq_len", number: 0, min: 0),
        spec(
            "clean", VQMOE_HP_STRING, 0,
            "none: the file's bytes as they are; text8: Matt Mahoney's wikifil.pl on a MediaWiki XML dump (enwik8/enwik9 -> text8-style [a-z ] text, splits taken on the cleaned text)",
            string: "none", choices: "none,text8"),
        spec(
            "compact_vocab", VQMOE_HP_BOOL, 0,
            "vocabulary of 27 (space -> 0, a..z -> 1..26) instead of 256 bytes; needs text of only a-z and space (text8, or clean=text8)",
            number: 0),
        spec("order", VQMOE_HP_STRING, 0, TokenBatches.orderHelp, string: "windows", choices: "windows,streams"),
    ]
    let hp = UnsafeMutablePointer<vqmoe_hparam_spec>.allocate(capacity: specs.count)
    hp.initialize(from: specs, count: specs.count)

    let api = UnsafeMutablePointer<vqmoe_dataset_api>.allocate(capacity: 1)
    api.initialize(
        to: vqmoe_dataset_api(
            struct_size: UInt32(MemoryLayout<vqmoe_dataset_api>.size),
            info: { inst, out in
                guard let ds = dataset(inst), let out else { return VQMOE_ERR_INVALID_ARGUMENT }
                guard out.pointee.struct_size >= UInt32(MemoryLayout<vqmoe_dataset_info>.offset(of: \.streams)!) else {
                    return fail(
                        ds.host, VQMOE_ERR_INVALID_ARGUMENT,
                        "char: dataset_info struct_size \(out.pointee.struct_size) is too small")
                }
                out.pointee.task = VQMOE_TASK_LM
                out.pointee.vocab_size = Int64(ds.vocabSize)
                out.pointee.n_classes = 0
                out.pointee.sample_ndim = 1
                out.pointee.sample_shape = (Int64(ds.seqLen), 0, 0, 0)
                out.pointee.split_size = (Int64(ds.splitLen[0]), Int64(ds.splitLen[1]), Int64(ds.splitLen[2]))
                ds.batches.writeInfo(out)  // ABI 1.1: streams
                return VQMOE_OK
            },
            num_batches: { inst, split, batchSize, out in
                guard let ds = dataset(inst), let out else { return VQMOE_ERR_INVALID_ARGUMENT }
                guard (0...2).contains(split) else {
                    return fail(ds.host, VQMOE_ERR_INVALID_ARGUMENT, "char: unknown split \(split)")
                }
                guard batchSize >= 1 else {
                    return fail(ds.host, VQMOE_ERR_INVALID_ARGUMENT, "char: batch_size \(batchSize) must be >= 1")
                }
                out.pointee =
                    split == VQMOE_SPLIT_TRAIN
                    ? Int64.max
                    : ds.batches.evalBatches(splitLength: ds.splitLen[Int(split)], batchSize: Int(batchSize))
                return VQMOE_OK
            },
            read_batch: { inst, req, out in
                guard let ds = dataset(inst), let req, let out else { return VQMOE_ERR_INVALID_ARGUMENT }
                let r = req.pointee
                guard r.struct_size >= UInt32(MemoryLayout<vqmoe_batch_request>.size),
                    out.pointee.struct_size >= UInt32(MemoryLayout<vqmoe_batch>.size)
                else {
                    return fail(
                        ds.host, VQMOE_ERR_INVALID_ARGUMENT, "char: batch request / batch struct_size too small")
                }
                guard (0...2).contains(r.split) else {
                    return fail(ds.host, VQMOE_ERR_INVALID_ARGUMENT, "char: unknown split \(r.split)")
                }
                guard r.batch_size >= 1, r.index >= 0 else {
                    return fail(
                        ds.host, VQMOE_ERR_INVALID_ARGUMENT,
                        "char: batch_size \(r.batch_size) must be >= 1 and index \(r.index) >= 0")
                }
                let B = r.batch_size, T = Int64(ds.seqLen)
                // inputs (B,T) int32, targets (B,T) int32, host-allocated.
                guard isI32(out.pointee.inputs, [B, T]), isI32(out.pointee.targets, [B, T]) else {
                    return fail(
                        ds.host, VQMOE_ERR_SHAPE,
                        "char: read_batch expects contiguous int32 inputs and targets of shape (\(B), \(T))")
                }
                let inputs = out.pointee.inputs.data!.assumingMemoryBound(to: Int32.self)
                let targets = out.pointee.targets.data!.assumingMemoryBound(to: Int32.self)
                let split = Int(r.split)
                do throws(PluginFailure) {
                    out.pointee.rows = Int64(
                        try ds.batches.read(
                            UnsafePointer(ds.bytes), splitStart: ds.splitStart[split], splitLength: ds.splitLen[split],
                            split: split, index: r.index, batchSize: Int(B), host: ds.host, seed: ds.seed,
                            inputs: inputs, targets: targets))
                    return VQMOE_OK
                } catch {
                    return fail(ds.host, error.status, error.message)
                }
            }))

    let d = UnsafeMutablePointer<vqmoe_plugin_desc>.allocate(capacity: 1)
    d.initialize(
        to: vqmoe_plugin_desc(
            abi_version: UInt32(VQMOE_ABI_VERSION),
            struct_size: UInt32(MemoryLayout<vqmoe_plugin_desc>.size),
            kind: VQMOE_KIND_DATASET,
            flags: 0,
            name: UnsafePointer(strdup("char")),
            version: UnsafePointer(strdup("1.1.0")),
            description: UnsafePointer(
                strdup(
                    "byte-level LM corpus (enwik8 format or any raw text): vocabulary of 256 bytes, contiguous train/valid/test split; clean=text8 derives text8 from a Wikipedia XML dump (wikifil.pl), compact_vocab=true gives text8's 27 symbols; order=streams serves parallel streams in order (Transformer-XL)"
                )),
            hparams: UnsafePointer(hp),
            n_hparams: Int32(specs.count),
            create: { info, hp, out in createDataset(info, hp, out) },
            destroy: { inst in
                guard let inst else { return }
                Unmanaged<CharDataset>.fromOpaque(UnsafeRawPointer(inst)).release()
            },
            num_buffers: { _ in 0 },
            buffer_spec: { inst, i, _ in
                fail(
                    dataset(inst)?.host, VQMOE_ERR_INVALID_ARGUMENT, "char: declares no buffers (asked for buffer \(i))"
                )
            },
            bind_buffers: { inst, _, n in
                n == 0
                    ? VQMOE_OK
                    : fail(
                        dataset(inst)?.host, VQMOE_ERR_INVALID_ARGUMENT, "char: declares no buffers, got \(n) bindings")
            },
            init_buffers: { _, _ in VQMOE_OK },
            begin_step: nil,
            get_feature: nil,
            kind_api: UnsafeRawPointer(api),
            hparam_spec_size: UInt32(MemoryLayout<vqmoe_hparam_spec>.stride)))
    return d
}()

/// The plugin entry point: the descriptor of the `char` dataset. Refuses hosts of another
/// ABI major.
@_cdecl("vqmoe_plugin_entry")
public func vqmoeEntry(_ host: UnsafePointer<vqmoe_host_api>?) -> UnsafePointer<vqmoe_plugin_desc>? {
    if let host, host.pointee.abi_version >> 16 != UInt32(VQMOE_ABI_VERSION_MAJOR) {
        let msg =
            "char: built for plugin ABI major \(VQMOE_ABI_VERSION_MAJOR), host has major \(host.pointee.abi_version >> 16)"
        msg.withCString { m in "char".withCString { n in host.pointee.log?(VQMOE_LOG_ERROR, n, m) } }
        return nil
    }
    return UnsafePointer(charDescriptor)
}
