// One `word` dataset instance: the token ids of the three splits, the vocabulary size, and
// the batch readers.
//
// Batches are a pure function of (instance seed, split, index, batch_size), cut as in `char`
// by PluginKit's TokenBatches: random train windows and ordered eval windows, or with
// order = "streams" (Transformer-XL) batch_size parallel streams read in order.
import Glibc
import PluginKit
import VQMoEABI

let splitNames = ["train", "valid", "test"]

/// `floor(n * fraction)`, clamped to [0, n], with a guard against representation error
/// (0.29 * 100 must give 29, not 28) -- `char`'s rule.
func fractionOf(_ n: Int, _ fraction: Double) -> Int {
    let x = (Double(n) * fraction + 1e-6).rounded(.down)
    return min(max(Int(x), 0), n)
}

final class WordDataset {
    let host: Host
    let seed: UInt64
    let config: WordConfig
    /// What was read, for messages: "dir D" or "path P".
    let source: String
    /// Tokens per window (T).
    let seqLen: Int
    /// Vocabulary size (<unk>, <eos>, then the kept train words).
    let vocabSize: Int
    /// Token ids of all splits, one after another.
    let tokens: [Int32]
    /// Start and length of each split in `tokens` (train, valid, test).
    let splitStart: [Int]
    let splitLen: [Int]
    /// Tokens of each split mapped to <unk> although their text was not "<unk>".
    let oovCount: [Int]

    init(info: UnsafePointer<vqmoe_create_info>?, hp: UnsafePointer<vqmoe_hparams>?) throws(PluginFailure) {
        guard let info else { throw .invalid("create_info is NULL") }
        try requireSize(info.pointee.struct_size, vqmoe_create_info.self, "create_info")
        host = try Host.checked(info.pointee.host)
        seed = info.pointee.seed
        let name = info.pointee.instance_name.map { String(cString: $0) } ?? "word"
        let who = "dataset 'word' (\(name))"
        let config: WordConfig
        do { config = try WordConfig(hp) } catch { throw .invalid("\(who): \(error.message)") }
        self.config = config
        let T = config.seqLen > 0 ? config.seqLen : Int(info.pointee.seq_len)
        guard T >= 1 else {
            throw .invalid("\(who): sequence length is \(T); set the dataset's seq_len or the model's seq_len to >= 1")
        }
        seqLen = T

        // Which data: dir when it holds all three WikiText files, else path.
        let dirFiles = splitNames.map { "\(config.dir)/wiki.\($0).tokens" }
        let missing = config.dir.isEmpty ? dirFiles : dirFiles.filter { !isRegularFile($0) }
        let table = WordTable()
        var stream: [Int32] = []
        var starts = [0, 0, 0], lens = [0, 0, 0]
        if !config.dir.isEmpty && missing.isEmpty {
            source = "dir \(config.dir)"
            for s in 0..<3 {
                let file: FileBytes
                do { file = try FileBytes(dirFiles[s], missingHint: dataHint) } catch {
                    throw PluginFailure(status: error.status, message: "\(who): \(error.message)")
                }
                if s == 0 { stream.reserveCapacity(file.count / 5 + 16) }
                starts[s] = stream.count
                do { _ = try tokenize(file, into: &stream, table: table) } catch {
                    throw PluginFailure(status: error.status, message: "\(who): \(error.message)")
                }
                lens[s] = stream.count - starts[s]
                if s == 0 && lens[0] == 0 { throw ioFailure("\(who): \(dirFiles[0]) is empty (\(source))") }
            }
        } else {
            let why =
                config.dir.isEmpty
                ? "dir is empty"
                : "dir \(config.dir) lacks \(missing.map { String($0.split(separator: "/").last ?? "") }.joined(separator: ", "))"
            guard !config.path.isEmpty else {
                throw ioFailure(
                    "\(who): no data: \(config.dir.isEmpty ? "dir is empty" : "WikiText files not found: " + missing.joined(separator: ", ")) and hyperparameter 'path' is empty. \(dataHint)"
                )
            }
            source = "path \(config.path) (\(why))"
            if !config.dir.isEmpty && isDirectory(config.dir), let log = host.api.pointee.log {
                "\(who): \(why); reading path \(config.path)".withCString { m in
                    "word".withCString { log(VQMOE_LOG_WARN, $0, m) }
                }
            }
            let file: FileBytes
            do { file = try FileBytes(config.path, missingHint: "(\(why).) \(dataHint)") } catch {
                throw PluginFailure(status: error.status, message: "\(who): \(error.message)")
            }
            guard file.count > 0 else { throw ioFailure("\(who): data file \(config.path) is empty (\(why))") }
            stream.reserveCapacity(file.count / 5 + 16)
            do { _ = try tokenize(file, into: &stream, table: table) } catch {
                throw PluginFailure(status: error.status, message: "\(who): \(error.message)")
            }
            // Contiguous splits of the token stream from cumulative fractions.
            let n = stream.count
            let trainEnd = fractionOf(n, config.trainFraction)
            let validEnd = max(trainEnd, fractionOf(n, config.trainFraction + config.validFraction))
            starts = [0, trainEnd, validEnd]
            lens = [trainEnd, validEnd - trainEnd, n - validEnd]
        }
        let sizes = "train \(lens[0]), valid \(lens[1]), test \(lens[2]) tokens"
        guard lens[0] >= T + 1 else {
            throw ioFailure(
                "\(who): \(source): the train split has \(lens[0]) tokens (\(sizes)), too short for one window of seq_len \(T) plus its target token (\(T + 1) tokens)"
            )
        }
        for s in 1...2 where lens[s] == 1 {
            throw ioFailure(
                "\(who): \(source): the \(splitNames[s]) split has 1 token (\(sizes)), too short for one window (an input token and its target)\(config.dir.isEmpty || !missing.isEmpty ? "; change train_fraction / valid_fraction" : "")"
            )
        }
        splitStart = starts
        splitLen = lens

        // Vocabulary from the train split only; provisional ids -> final ids, counting OOVs.
        let vocab = stream.withUnsafeBufferPointer {
            Vocabulary(
                table: table, trainTokens: UnsafeBufferPointer(rebasing: $0[starts[0]..<(starts[0] + lens[0])]),
                minCount: config.minCount, maxVocab: config.maxVocab)
        }
        vocabSize = vocab.size
        // In place: the stream becomes the final token ids.
        var oov = [0, 0, 0]
        stream.withUnsafeMutableBufferPointer { ids in
            vocab.finalID.withUnsafeBufferPointer { map in
                for s in 0..<3 {
                    var k = 0
                    for i in starts[s]..<(starts[s] + lens[s]) {
                        let p = ids[i], f = map[Int(p)]
                        ids[i] = f
                        if f == 0 && p != 0 { k += 1 }
                    }
                    oov[s] = k
                }
            }
        }
        oovCount = oov
        tokens = stream
    }

    /// Fraction of a split's tokens (every word and <eos>) mapped to <unk> whose text was not
    /// "<unk>"; 0 for an empty split.
    func oovRate(_ split: Int) -> Double {
        splitLen[split] == 0 ? 0 : Double(oovCount[split]) / Double(splitLen[split])
    }

    /// How batches are cut from the splits (windows or streams).
    var batches: TokenBatches { TokenBatches(seqLen: seqLen, streams: config.streams, name: "word") }

    // MARK: dataset API

    func info(_ out: UnsafeMutablePointer<vqmoe_dataset_info>?) throws(PluginFailure) {
        guard let out else { throw .invalid("word: info: out is NULL") }
        try requireSize(out.pointee.struct_size, vqmoe_dataset_info.self, "word: dataset_info")
        out.pointee.task = VQMOE_TASK_LM
        out.pointee.vocab_size = Int64(vocabSize)
        out.pointee.n_classes = 0
        out.pointee.sample_ndim = 1
        out.pointee.sample_shape = (Int64(seqLen), 0, 0, 0)
        out.pointee.split_size = (Int64(splitLen[0]), Int64(splitLen[1]), Int64(splitLen[2]))
        batches.writeInfo(out)  // ABI 1.1: streams
    }

    func numBatches(_ split: Int32, _ batchSize: Int64, _ out: UnsafeMutablePointer<Int64>?) throws(PluginFailure) {
        guard let out else { throw .invalid("word: num_batches: out is NULL") }
        guard (0...2).contains(split) else { throw .invalid("word: unknown split \(split)") }
        guard batchSize >= 1 else { throw .invalid("word: batch_size \(batchSize) must be >= 1") }
        out.pointee =
            split == VQMOE_SPLIT_TRAIN
            ? Int64.max : batches.evalBatches(splitLength: splitLen[Int(split)], batchSize: Int(batchSize))
    }

    func readBatch(
        _ req: UnsafePointer<vqmoe_batch_request>?, _ out: UnsafeMutablePointer<vqmoe_batch>?
    ) throws(PluginFailure) {
        guard let req, let out else { throw .invalid("word: read_batch: request or batch is NULL") }
        let r = req.pointee
        try requireSize(r.struct_size, vqmoe_batch_request.self, "word: batch request")
        try requireSize(out.pointee.struct_size, vqmoe_batch.self, "word: batch")
        guard (0...2).contains(r.split) else { throw .invalid("word: unknown split \(r.split)") }
        guard r.batch_size >= 1, r.index >= 0 else {
            throw .invalid("word: batch_size \(r.batch_size) must be >= 1 and index \(r.index) >= 0")
        }
        let B = Int(r.batch_size), T = seqLen
        // inputs (B,T) int32, targets (B,T) int32, host-allocated.
        let inputs = try requireI32(out.pointee.inputs, [B, T], "word: batch inputs")
        let targets = try requireI32(out.pointee.targets, [B, T], "word: batch targets")
        let split = Int(r.split)
        out.pointee.rows = Int64(
            try tokens.withUnsafeBufferPointer { all throws(PluginFailure) in
                try batches.read(
                    all.baseAddress!, splitStart: splitStart[split], splitLength: splitLen[split], split: split,
                    index: r.index,
                    batchSize: B, host: host.api, seed: seed, inputs: inputs, targets: targets)
            })
    }

    // MARK: metrics

    /// "vqmoe.metrics/1": oov_rate_train / oov_rate_valid / oov_rate_test (see oovRate) and
    /// vocab_size.
    func metrics(_ sinkPtr: UnsafePointer<vqmoe_metric_sink>?) throws(PluginFailure) {
        guard let sink = sinkPtr?.pointee else { throw .invalid("word: metrics: sink is NULL") }
        guard let scalar = sink.scalar else { return }
        for s in 0..<3 { scalar(sink.user, "oov_rate_\(splitNames[s])", oovRate(s)) }
        scalar(sink.user, "vocab_size", Double(vocabSize))
    }
}
