import VQMoEABI

/// The three splits of a dataset.
public enum Split: Int32, CaseIterable, Sendable {
    case train = 0, valid = 1, test = 2
    public var name: String { ["train", "valid", "test"][Int(rawValue)] }
}

/// A dataset plugin instance. Batches are a pure function of (seed, split, index), so the
/// host's cursor is just the next index: seeking and resuming need no dataset state.
///
/// ```swift
/// let ds = try DatasetInstance(core)
/// let batch = try ds.read(.train, index: step, batchSize: 12)   // inputs (B,T), targets (B,T)
/// ```
public final class DatasetInstance: @unchecked Sendable {
    public let core: PluginInstance
    let api: vqmoe_dataset_api
    public let task: Int32
    public let vocabSize: Int
    public let nClasses: Int
    public let sampleShape: [Int]
    public let splitSizes: [Int]
    public let inputIsFloat: Bool
    /// Row b of batch i+1 continues row b of batch i (ABI 1.1 `streams`; Transformer-XL memory).
    public let streams: Bool

    /// One batch in host memory.
    public struct Batch {
        public var inputsInt: [Int32]
        public var inputsFloat: [Float]
        public var targets: [Int32]
        /// Real tokens per sample (token classification); empty for other tasks.
        public var lengths: [Int32]
        public var rows: Int
        public var inputShape: [Int]
        public var targetShape: [Int]
    }

    public init(_ core: PluginInstance) throws {
        guard core.library.kind == .dataset else { throw VQMoEError(.plugin, "\(core.describe) is not a dataset") }
        self.core = core
        let api = core.library.desc.pointee.kind_api!.load(as: vqmoe_dataset_api.self)
        self.api = api
        var info = vqmoe_dataset_info()
        info.struct_size = structSize(vqmoe_dataset_info.self)
        try core.call("info") { api.info!(core.handle, &info) }
        task = info.task
        guard [VQMOE_TASK_LM, VQMOE_TASK_CLASSIFY_TOKENS, VQMOE_TASK_CLASSIFY_IMAGE].contains(task) else {
            throw VQMoEError(.plugin, "\(core.describe): info() gave unknown task \(task)")
        }
        vocabSize = Int(info.vocab_size)
        nClasses = Int(info.n_classes)
        guard info.sample_ndim >= 1 && info.sample_ndim <= 4 else {
            throw VQMoEError(.plugin, "\(core.describe): info() gave sample_ndim \(info.sample_ndim)")
        }
        sampleShape = withUnsafeBytes(of: info.sample_shape) { raw in
            (0..<Int(info.sample_ndim)).map { Int(raw.load(fromByteOffset: $0 * 8, as: Int64.self)) }
        }
        splitSizes = withUnsafeBytes(of: info.split_size) { raw in
            (0..<3).map { Int(raw.load(fromByteOffset: $0 * 8, as: Int64.self)) }
        }
        inputIsFloat = task == VQMOE_TASK_CLASSIFY_IMAGE
        streams = info.streams != 0
        guard sampleShape.allSatisfy({ $0 >= 1 }) else {
            throw VQMoEError(.plugin, "\(core.describe): sample shape \(sampleShape)")
        }
        if task != VQMOE_TASK_CLASSIFY_IMAGE && vocabSize < 1 {
            throw VQMoEError(.plugin, "\(core.describe): vocab_size \(vocabSize)")
        }
        if task != VQMOE_TASK_LM && nClasses < 1 {
            throw VQMoEError(.plugin, "\(core.describe): n_classes \(nClasses)")
        }
        // A sample must be addressable: the batch arrays multiply its shape by the batch size.
        _ = try MemoryBudget.checkedSize(sampleShape, elementBytes: 4, what: "\(core.describe): sample")
    }

    public var isLM: Bool { task == VQMOE_TASK_LM }

    /// Batches in an ordered pass over `split` (train: Int.max).
    public func numBatches(_ split: Split, batchSize: Int) throws -> Int {
        var n: Int64 = 0
        try core.call("num_batches(\(split.name))") {
            api.num_batches!(core.handle, split.rawValue, Int64(batchSize), &n)
        }
        return Int(n)
    }

    /// Batch `index` of `split`; nil past the end of a finite split.
    public func read(_ split: Split, index: Int, batchSize: Int) throws -> Batch? {
        let inputCount = try MemoryBudget.checkedSize(
            [batchSize] + sampleShape, elementBytes: 4, what: "\(core.describe): a batch of \(batchSize)"
        ).count
        // The arrays the plugin fills, as separate variables (one exclusive access each; nested
        // accesses to fields of one struct would overlap).
        var inputsInt = inputIsFloat ? [] : [Int32](repeating: 0, count: inputCount)
        var inputsFloat = inputIsFloat ? [Float](repeating: 0, count: inputCount) : []
        var targetValues = [Int32](
            repeating: Int32(VQMOE_PAD_TARGET), count: isLM ? batchSize * sampleShape[0] : batchSize)
        var lengthValues =
            task == VQMOE_TASK_CLASSIFY_TOKENS ? [Int32](repeating: Int32(sampleShape[0]), count: batchSize) : []
        let inputShape = [batchSize] + sampleShape, targetShape = isLM ? [batchSize, sampleShape[0]] : [batchSize]
        var status: Int32 = 0, rows = 0
        let a = TensorArena()
        var req = vqmoe_batch_request(
            struct_size: structSize(vqmoe_batch_request.self), split: split.rawValue,
            index: Int64(index), batch_size: Int64(batchSize))
        let hasLengths = !lengthValues.isEmpty
        targetValues.withUnsafeMutableBufferPointer { t in
            lengthValues.withUnsafeMutableBufferPointer { l in
                let targets = a.i32(t.baseAddress, targetShape)
                let lengths = hasLengths ? a.i32(l.baseAddress, [batchSize]) : TensorArena.absent
                func run(_ inputs: vqmoe_tensor) {
                    var out = vqmoe_batch(
                        struct_size: structSize(vqmoe_batch.self), inputs: inputs, targets: targets, rows: 0,
                        lengths: lengths)
                    _ = HostRuntime.takeError()
                    PluginCallGuard.enter(core.describe, call: "read_batch")
                    status = api.read_batch!(core.handle, &req, &out)
                    PluginCallGuard.leave()
                    HostRuntime.releaseScratch()
                    rows = Int(out.rows)
                }
                if inputIsFloat {
                    inputsFloat.withUnsafeMutableBufferPointer { run(a.f32($0.baseAddress, inputShape)) }
                } else {
                    inputsInt.withUnsafeMutableBufferPointer { run(a.i32($0.baseAddress, inputShape)) }
                }
            }
        }
        let b = Batch(
            inputsInt: inputsInt, inputsFloat: inputsFloat, targets: targetValues, lengths: lengthValues, rows: rows,
            inputShape: inputShape, targetShape: targetShape)
        if status == VQMOE_ERR_END_OF_DATA { _ = HostRuntime.takeError(); return nil }
        if status != VQMOE_OK {
            let msg = HostRuntime.takeError() ?? "no message"
            throw VQMoEError(
                status == VQMOE_ERR_IO ? .data : .plugin,
                "\(core.describe) failed in read_batch(\(split.name), \(index)): \(statusName(status)): \(msg)")
        }
        if hasLengths, let bad = b.lengths.first(where: { $0 < 1 || Int($0) > sampleShape[0] }) {
            throw VQMoEError(
                .plugin, "\(core.describe): read_batch gave a sample length \(bad) outside [1, \(sampleShape[0])]")
        }
        guard b.rows >= 1 && b.rows <= batchSize else {
            throw VQMoEError(.plugin, "\(core.describe): read_batch gave rows = \(b.rows) for batch size \(batchSize)")
        }
        try checkValues(b, split: split, index: index)
        return b
    }

    /// Every value a batch hands to the model is one it can use: token inputs in [0, vocab),
    /// image inputs finite, targets in [0, vocab) (language models) or [0, classes), or
    /// VQMOE_PAD_TARGET. An embedding row or a loss class outside the table would be read out of
    /// bounds, so a dataset's mistake stops here, named.
    private func checkValues(_ b: Batch, split: Split, index: Int) throws {
        let at = "\(core.describe): read_batch(\(split.name), \(index))"
        if let i = b.inputsInt.firstIndex(where: { $0 < 0 || Int($0) >= vocabSize }) {
            throw VQMoEError(
                .plugin, "\(at) gave input token \(b.inputsInt[i]) at \(i), outside the vocabulary [0, \(vocabSize))")
        }
        if !b.inputsFloat.isEmpty,
            !b.inputsFloat.withUnsafeBufferPointer({ VecMath.allFinite($0.baseAddress!, count: $0.count) })
        {
            let i = b.inputsFloat.firstIndex { !$0.isFinite }!
            throw VQMoEError(.plugin, "\(at) gave input value \(b.inputsFloat[i]) at \(i)")
        }
        let limit = isLM ? vocabSize : nClasses, pad = Int32(VQMOE_PAD_TARGET)
        if let i = b.targets.firstIndex(where: { $0 != pad && ($0 < 0 || Int($0) >= limit) }) {
            throw VQMoEError(
                .plugin,
                "\(at) gave target \(b.targets[i]) at \(i), outside [0, \(limit)) (\(isLM ? "vocabulary" : "classes")) and not VQMOE_PAD_TARGET"
            )
        }
    }
}
