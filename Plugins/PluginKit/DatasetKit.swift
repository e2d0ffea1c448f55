// Datasets on the kit: `DatasetPlugin` and the vqmoe_dataset_api table that serves every one,
// plus what every dataset plugin shares (reading a data file, IO failures, split fractions).
import Glibc
import VQMoEABI

/// The splits of a batch request (VQMOE_SPLIT_*).
public enum Split: Int, CaseIterable, Sendable {
    case train = 0, valid = 1, test = 2

    public var name: String { ["train", "valid", "test"][rawValue] }
}

/// What a dataset's batches hold (VQMOE_TASK_*).
public enum DatasetTask: Sendable {
    /// inputs (B,T) int32 tokens < vocab, targets (B,T) the next tokens.
    case languageModel(vocab: Int)
    /// inputs (B,T) int32 tokens < vocab, targets (B) classes, lengths (B) real tokens per sample.
    case classifyTokens(vocab: Int, classes: Int)
    /// inputs (B, C, H, W) float32, targets (B) classes.
    case classifyImage(classes: Int)
}

extension DatasetTask {
    /// VQMOE_TASK_*, vocabulary and classes as vqmoe_dataset_info states them.
    var abi: (task: Int32, vocab: Int, classes: Int) {
        switch self {
        case .languageModel(let vocab): return (VQMOE_TASK_LM, vocab, 0)
        case .classifyTokens(let vocab, let classes): return (VQMOE_TASK_CLASSIFY_TOKENS, vocab, classes)
        case .classifyImage(let classes): return (VQMOE_TASK_CLASSIFY_IMAGE, 0, classes)
        }
    }
}

/// vqmoe_dataset_info in Swift form; fixed once the dataset is made.
public struct DatasetInfo: Sendable {
    public var task: DatasetTask
    /// One input sample: (T) or (C, H, W).
    public var sampleShape: [Int]
    /// Tokens (language models) or examples of train, valid, test.
    public var splitSizes: [Int]
    /// Every split is served as B parallel streams read in order (ABI 1.1).
    public var streams: Bool

    public init(_ task: DatasetTask, sample: [Int], splits: [Int], streams: Bool = false) {
        (self.task, sampleShape, splitSizes, self.streams) = (task, sample, splits, streams)
    }
}

/// One batch to fill, its tensors checked by the kit against the dataset's info: the request
/// (a valid index: any ≥ 0 for train, < `evalBatches` for valid/test) and the host's memory.
public struct Batch {
    public let split: Split
    public let index: Int64
    /// B: rows of the batch.
    public let size: Int
    /// Tokens (language models) or examples of the split.
    public let splitSize: Int
    /// Inputs of token tasks: (B,T) int32.
    public let tokens: UnsafeMutablePointer<Int32>!
    /// Inputs of image tasks: (B, C, H, W) float32.
    public let pixels: UnsafeMutablePointer<Float>!
    /// (B,T) for language models, (B) for classification.
    public let targets: UnsafeMutablePointer<Int32>
    /// (B) for VQMOE_TASK_CLASSIFY_TOKENS, when the host wants them.
    public let lengths: UnsafeMutablePointer<Int32>?
}

/// A dataset component: batches are a pure function of (seed, split, index, batch size). The
/// kit checks every struct and tensor, the split, batch size and index (VQMOE_ERR_END_OF_DATA
/// past an eval split's `evalBatches`), and pads the rows `read` leaves: inputs 0, targets
/// VQMOE_PAD_TARGET, lengths 1. Shared shapes: language models are `LanguageModelDataset`s
/// over a `TokenCorpus` (TokenBatches.swift), byte-text classifiers `TextClassificationDataset`s
/// (TextClassification.swift); datasets of indexed examples sample train batches with
/// `Batch.examples(_:)` over an `EpochSampler`.
///
/// ```swift
/// final class MyData: DatasetPlugin {
///     var info: DatasetInfo { DatasetInfo(.classifyImage(classes: 10), sample: [1, 28, 28], splits: sizes) }
///     func read(_ b: Batch) throws(PluginFailure) -> Int { … return rows }
/// }
/// ```
public protocol DatasetPlugin: PluginComponent {
    var info: DatasetInfo { get }
    /// Batches in an ordered pass over `split` (valid or test); by default ⌈split size / B⌉.
    func evalBatches(_ split: Split, batchSize: Int) -> Int
    /// Fill `b` and return its real rows (B for train, up to B for the last eval batch).
    func read(_ b: Batch) throws(PluginFailure) -> Int
}

extension DatasetPlugin {
    public func evalBatches(_ split: Split, batchSize: Int) -> Int {
        (info.splitSizes[split.rawValue] + batchSize - 1) / batchSize
    }

    /// "dataset 'name' (instance)", the prefix of a dataset's messages.
    public static func who(_ model: ModelInfo) -> String {
        "dataset '\(name)' (\(model.instanceName.isEmpty ? name : model.instanceName))"
    }

    /// Tokens per sample: the dataset's own `seq_len` hyperparameter, else (0) the model's.
    public static func sequenceLength(_ hp: Int, _ model: ModelInfo) throws(PluginFailure) -> Int {
        let t = hp > 0 ? hp : model.seqLen
        guard t >= 1 else {
            throw .invalid(
                "\(who(model)): sequence length is \(t); set the dataset's seq_len or the model's seq_len to >= 1")
        }
        return t
    }
}

extension PluginFailure {
    /// A data problem (missing, unreadable or malformed file): VQMOE_ERR_IO.
    public static func io(_ m: String) -> PluginFailure { PluginFailure(status: VQMOE_ERR_IO, message: m) }
}

/// `body`'s failure with "`who`: " before its message.
public func prefixed<T>(_ who: String, _ body: () throws(PluginFailure) -> T) throws(PluginFailure) -> T {
    do { return try body() } catch { throw PluginFailure(status: error.status, message: "\(who): \(error.message)") }
}

/// The whole regular file at `path`. A missing file names the path and `hint` (where to get
/// the data); other failures give the system's reason. Messages start with "`who`: " (none
/// when empty).
public func readWholeFile(
    _ path: String, who: String = "", hint: @autoclosure () -> String
) throws(PluginFailure) -> [UInt8] {
    let at = who.isEmpty ? "" : "\(who): "
    let fd = open(path, O_RDONLY)
    if fd < 0 {
        let e = errno
        if e == ENOENT { throw .io("\(at)data file \(path) not found. \(hint())") }
        throw .io("\(at)cannot open \(path): \(String(cString: strerror(e)))")
    }
    defer { close(fd) }
    var st = stat()
    guard fstat(fd, &st) == 0 else { throw .io("\(at)cannot stat \(path): \(String(cString: strerror(errno)))") }
    guard (st.st_mode & S_IFMT) == S_IFREG else { throw .io("\(at)\(path) is not a regular file") }
    let size = Int(st.st_size)
    var failure: String?
    let bytes = [UInt8](unsafeUninitializedCapacity: max(size, 1)) { buf, count in
        var done = 0
        while done < size {
            let r = read(fd, buf.baseAddress! + done, size - done)
            if r < 0 {
                if errno == EINTR { continue }
                failure = String(cString: strerror(errno))
                break
            }
            if r == 0 { break }  // the file shrank while reading
            done += r
        }
        count = done
    }
    if let failure { throw .io("\(at)cannot read \(path): \(failure)") }
    return bytes
}

/// `floor(n * fraction)`, clamped to [0, n], with a guard against representation error
/// (0.29 * 100 must give 29, not 28).
public func fractionOf(_ n: Int, _ fraction: Double) -> Int {
    let x = (Double(n) * fraction + 1e-6).rounded(.down)
    return min(max(Int(x), 0), n)
}

// MARK: - the C table

private func dataset(_ inst: Instance) throws(PluginFailure) -> DatasetPlugin {
    guard let d = inst.component as? DatasetPlugin else { throw .state("not a dataset") }
    return d
}

/// The split of a request, and a batch size >= 1.
private func checked(_ split: Int32, _ batchSize: Int64, _ who: String) throws(PluginFailure) -> Split {
    guard let s = Split(rawValue: Int(split)) else { throw .invalid("\(who): unknown split \(split)") }
    guard batchSize >= 1 else { throw .invalid("\(who): batch_size \(batchSize) must be >= 1") }
    return s
}

private func who(_ ds: DatasetPlugin, _ inst: Instance) -> String { type(of: ds).who(inst.model) }

/// vqmoe_dataset_api of every kit dataset.
nonisolated(unsafe) let datasetTable: UnsafeRawPointer = {
    let p = UnsafeMutablePointer<vqmoe_dataset_api>.allocate(capacity: 1)
    p.initialize(
        to: vqmoe_dataset_api(
            struct_size: UInt32(MemoryLayout<vqmoe_dataset_api>.size),
            info: { inst, out in call(inst) { i throws(PluginFailure) in try writeInfo(try dataset(i).info, out) } },
            num_batches: { inst, split, batchSize, out in
                call(inst) { i throws(PluginFailure) in
                    guard let out else { throw .invalid("num_batches: out is NULL") }
                    let ds = try dataset(i), s = try checked(split, batchSize, who(ds, i))
                    out.pointee = s == .train ? Int64.max : Int64(ds.evalBatches(s, batchSize: Int(batchSize)))
                }
            },
            read_batch: { inst, req, out in call(inst) { i throws(PluginFailure) in try readBatch(i, req, out) } }))
    return UnsafeRawPointer(p)
}()

private func writeInfo(_ info: DatasetInfo, _ out: UnsafeMutablePointer<vqmoe_dataset_info>?) throws(PluginFailure) {
    guard let out else { throw .invalid("info: out is NULL") }
    // ABI 1.0's dataset_info ends where 1.1's streams begins.
    let streamsAt = MemoryLayout<vqmoe_dataset_info>.offset(of: \.streams)!
    guard Int(out.pointee.struct_size) >= streamsAt else {
        throw .invalid("dataset_info: struct_size \(out.pointee.struct_size) is smaller than ABI 1.0's \(streamsAt)")
    }
    let t = info.task.abi, shape = info.sampleShape.map(Int64.init) + [0, 0, 0, 0], n = info.splitSizes.map(Int64.init)
    (out.pointee.task, out.pointee.vocab_size, out.pointee.n_classes) = (t.task, Int64(t.vocab), Int64(t.classes))
    out.pointee.sample_ndim = Int32(info.sampleShape.count)
    out.pointee.sample_shape = (shape[0], shape[1], shape[2], shape[3])
    out.pointee.split_size = (n[0], n[1], n[2])
    if Int(out.pointee.struct_size) >= streamsAt + 4 { out.pointee.streams = info.streams ? 1 : 0 }
}

/// read_batch: check the request and the host's tensors, read, pad the rows left.
private func readBatch(
    _ inst: Instance, _ req: UnsafePointer<vqmoe_batch_request>?, _ out: UnsafeMutablePointer<vqmoe_batch>?
) throws(PluginFailure) {
    guard let req, let out else { throw .invalid("read_batch: request or batch is NULL") }
    try requireSize(req.pointee.struct_size, vqmoe_batch_request.self, "batch request")
    try requireSize(out.pointee.struct_size, vqmoe_batch.self, "batch")
    let ds = try dataset(inst), info = ds.info, r = req.pointee, who = who(ds, inst)
    let split = try checked(r.split, r.batch_size, who)
    guard r.index >= 0 else { throw .invalid("\(who): batch index \(r.index) must be >= 0") }
    let b = Int(r.batch_size)
    if split != .train {
        let n = ds.evalBatches(split, batchSize: b)
        guard r.index < Int64(n) else {
            throw PluginFailure(
                status: VQMOE_ERR_END_OF_DATA,
                message: "\(who): \(split.name) batch \(r.index) is past the end (\(n) batches of \(b))")
        }
    }
    let o = out.pointee, shape = [b] + info.sampleShape, sample = info.sampleShape.reduce(1, *),
        task = info.task.abi.task
    let image = task == VQMOE_TASK_CLASSIFY_IMAGE, lm = task == VQMOE_TASK_LM
    let batch = Batch(
        split: split, index: r.index, size: b, splitSize: info.splitSizes[split.rawValue],
        tokens: image ? nil : try requireI32(o.inputs, shape, "\(who): batch inputs"),
        pixels: image ? try requireF32(o.inputs, shape, "\(who): batch inputs") : nil,
        targets: try requireI32(o.targets, lm ? shape : [b], "\(who): batch targets"),
        lengths: task == VQMOE_TASK_CLASSIFY_TOKENS && o.lengths.data != nil
            ? try requireI32(o.lengths, [b], "\(who): batch lengths") : nil)
    let rows = try ds.read(batch)
    guard rows >= 0 && rows <= b else { throw .state("\(who): read \(rows) rows for a batch of \(b)") }
    if rows < b {
        if let t = batch.tokens { (t + rows * sample).update(repeating: 0, count: (b - rows) * sample) }
        if let x = batch.pixels { (x + rows * sample).update(repeating: 0, count: (b - rows) * sample) }
        let perRow = lm ? sample : 1
        (batch.targets + rows * perRow).update(repeating: Int32(VQMOE_PAD_TARGET), count: (b - rows) * perRow)
        if let l = batch.lengths { (l + rows).update(repeating: 1, count: b - rows) }
    }
    out.pointee.rows = Int64(rows)
}
