import Foundation

/// One line of `metrics.jsonl` after a logged training step.
public struct TrainRecord: Codable, Sendable {
    public var step: Int
    public var split = "train"
    public var loss, taskLoss, bpc, auxLoss, vqLoss, lr, gradNorm, tokensPerSecond: Double
    /// Per layer: assignments per expert, uses per code (routed layers only).
    public var expertLoad: [[Double]]?
    public var codeCounts: [[Double]]?

    public init(
        step: Int, loss: Double, taskLoss: Double, bpc: Double, auxLoss: Double, vqLoss: Double, lr: Double,
        gradNorm: Double, tokensPerSecond: Double
    ) {
        self.step = step
        (self.loss, self.taskLoss, self.bpc, self.auxLoss, self.vqLoss) = (loss, taskLoss, bpc, auxLoss, vqLoss)
        (self.lr, self.gradNorm, self.tokensPerSecond) = (lr, gradNorm, tokensPerSecond)
    }

    enum CodingKeys: String, CodingKey {
        case step, split, loss, bpc, lr
        case taskLoss = "task_loss", auxLoss = "aux_loss", vqLoss = "vq_loss", gradNorm = "grad_norm"
        case tokensPerSecond = "tokens_per_s", expertLoad = "expert_load", codeCounts = "code_counts"
    }
}

/// One line of `metrics.jsonl` after an evaluation (split "valid" or "test"): the loss and BPC
/// (language models) or accuracy (classifiers).
public struct EvalRecord: Codable, Sendable {
    public var step: Int
    public var split: String
    public var loss: Double
    public var bpc: Double?
    public var accuracy: Double?
    /// Per layer and code level (VQMoE): code perplexity exp(H(p)) of the codes used over the
    /// evaluation, codes used, dead codes (K − used).
    public var codePerplexity: [[Double]]?
    public var codesUsed: [[Int]]?
    public var deadCodes: [[Int]]?

    public init(step: Int, split: Split, result: EvalResult, isLM: Bool) {
        self.step = step
        self.split = split.name
        loss = result.loss
        if isLM { bpc = result.bpc } else { accuracy = result.accuracy }
        if let h = result.codeHealth {
            codePerplexity = h.map { $0.map(\.perplexity) }
            codesUsed = h.map { $0.map(\.used) }
            deadCodes = h.map { $0.map(\.dead) }
        }
    }

    enum CodingKeys: String, CodingKey {
        case step, split, loss, bpc, accuracy
        case codePerplexity = "code_perplexity", codesUsed = "codes_used", deadCodes = "dead_codes"
    }
}

/// One line of `metrics.jsonl` per evaluation of a routed model (split "probe"): the top-1
/// expert of each probe token per layer and path, and what the evaluation observers measured.
public struct ProbeRecord: Codable, Sendable {
    public var step: Int
    public var split = "probe"
    public var routerTop1: [[Int32]]
    public var discreteTop1: [[Int32]]
    /// Per layer: the fraction of probe tokens keeping their top-1 expert since the last evaluation.
    public var consistencyRouter: [Double]?
    public var consistencyDiscrete: [Double]?
    /// Per layer: ‖Δ‖/‖before‖ of the router's and the codebook's parameters since the last evaluation.
    public var movementRouter: [Double]?
    public var movementCodebook: [Double]?

    enum CodingKeys: String, CodingKey {
        case step, split
        case routerTop1 = "router_top1", discreteTop1 = "discrete_top1"
        case consistencyRouter = "consistency_router", consistencyDiscrete = "consistency_discrete"
        case movementRouter = "movement_router", movementCodebook = "movement_codebook"
    }
}

/// `OUT/metrics.jsonl`: one JSON object per line, keys sorted. A non-finite number is written
/// as null (the line is never dropped); a failed write is an I/O error naming the file. With
/// `events`, every line is mirrored into a TensorBoard event file as scalars.
///
/// ```swift
/// let log = try MetricsLog(path: "runs/x/metrics.jsonl", keepingStepsBelow: nil)   // a new, empty log
/// try log.append(EvalRecord(...))
/// ```
public final class MetricsLog {
    public let path: String
    /// The TensorBoard event file the lines are mirrored into (`train.tensorboard`).
    public let events: TensorBoardEvents?
    private let handle: FileHandle
    private let encoder = JSONEncoder()
    /// What a non-finite number is encoded as before it becomes null.
    private static let nonFinite = "__vqmoe_non_finite__"
    /// Lines written with a non-finite value (as null); the first is reported on standard error.
    public private(set) var nonFiniteLines = 0

    /// Open the log: empty, or (resuming) keeping only the lines of steps below `keepingStepsBelow`.
    public init(path: String, keepingStepsBelow: Int?, events: TensorBoardEvents? = nil) throws {
        self.path = path
        self.events = events
        var kept = ""
        if let next = keepingStepsBelow {
            let old = (try? String(contentsOfFile: path, encoding: .utf8)) ?? ""
            let lines = old.split(separator: "\n").filter { line in
                guard let o = try? JSONSerialization.jsonObject(with: Data(line.utf8)) as? [String: Any],
                    let st = o["step"] as? Int
                else { return false }
                return st < next
            }
            kept = lines.map { $0 + "\n" }.joined()
        }
        try Checkpoint.atomicWrite(Data(kept.utf8), to: path)
        guard let h = FileHandle(forWritingAtPath: path) else {
            throw VQMoEError(.io, "\(path): cannot open for writing")
        }
        handle = h
        try handle.seekToEnd()
        encoder.outputFormatting = [.sortedKeys]
        encoder.nonConformingFloatEncodingStrategy = .convertToString(
            positiveInfinity: MetricsLog.nonFinite, negativeInfinity: MetricsLog.nonFinite, nan: MetricsLog.nonFinite)
    }

    deinit { try? handle.close() }

    public func append<R: Encodable>(_ record: R) throws {
        var line = String(decoding: try encoder.encode(record), as: UTF8.self)
        if line.contains(MetricsLog.nonFinite) {
            if nonFiniteLines == 0 {
                let step = line.range(of: #""step":(-?[0-9]+)"#, options: .regularExpression).map { String(line[$0]) }
                FileHandle.standardError.write(
                    Data(
                        ("warning: \(path): a non-finite value (NaN or ±Inf) written as null (\(step ?? "no step")); "
                            + "later ones are not reported\n").utf8))
            }
            nonFiniteLines += 1
        }
        line = line.replacingOccurrences(of: "\"\(MetricsLog.nonFinite)\"", with: "null") + "\n"
        // POSIX writes, so a full disk is named by errno ("No space left on device").
        try appendAll(handle.fileDescriptor, Array(line.utf8), path: path, what: "a metrics line")
        if let events, let object = try? JSONSerialization.jsonObject(with: Data(line.utf8)) as? [String: Any],
            let (step, values) = TensorBoardEvents.scalars(of: object)
        {
            try events.write(values, step: step)
        }
    }
}
