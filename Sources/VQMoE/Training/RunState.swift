import Foundation

/// Result of an evaluation pass.
public struct EvalResult: Codable, Sendable, Equatable {
    public var loss: Double
    public var bpc: Double { loss / log(2.0) }
    public var count: Int
    public var accuracy: Double
    /// Uses of each code over the evaluation, per layer and code level (layer, L, K); nil for a
    /// model without a discrete path.
    public var codeCounts: [[[Double]]]?
    public init(loss: Double, count: Int, accuracy: Double, codeCounts: [[[Double]]]? = nil) {
        self.loss = loss
        self.count = count
        self.accuracy = accuracy
        self.codeCounts = codeCounts
    }

    /// Code health per layer and level (nil without a discrete path).
    public var codeHealth: [[CodeHealth]]? { codeCounts?.map { $0.map(CodeHealth.init) } }
}

/// Result of `vqmoe train`.
public struct TrainResult: Sendable {
    public var steps: Int
    public var bestValid: EvalResult?
    public var bestStep: Int
    public var test: EvalResult?
    public var wallSeconds: Double
    public var tokensPerSecond: Double
    public var outDir: String
    /// Stopped early (interrupt or `stopAfter`); `last` holds the state to resume from.
    public var interrupted = false
    /// Language model (loss/BPC) or classifier (accuracy).
    public var isLM = true
}

/// The top-1 expert of every probe token, per layer, for the router path and the discrete path.
public struct ProbeAssignments: Codable, Sendable, Equatable {
    public var router: [[Int32]]
    public var discrete: [[Int32]]
    public init(router: [[Int32]], discrete: [[Int32]]) {
        self.router = router
        self.discrete = discrete
    }
}

/// Run state saved as `run` in `last.json` beside `last.safetensors`: enough to continue exactly.
/// The evaluation observers keep their state here (`probe`, `routing`).
public struct RunState: Codable, Sendable {
    public var nextStep = 0
    public var bestStep = -1
    public var bestValid: EvalResult?
    /// The probe assignments of the last evaluation (consistency).
    public var probe: ProbeAssignments?
    /// Routing parameters at the last evaluation ("router" / "codebook" → per layer, flattened).
    public var routing: [String: [[Float]]]?

    enum CodingKeys: String, CodingKey {
        case probe, routing
        case nextStep = "next_step", bestStep = "best_step", bestValid = "best_valid"
    }

    public init() {}
}

/// The JSON sidecar of a checkpoint (`NAME.json` beside `NAME.safetensors`): the resolved config,
/// the model as built, the step, the optimizer's step count and, for `last`, the run state.
public struct CheckpointSidecar: Codable, Sendable {
    public var format = Checkpoint.format
    public var step: Int
    public var config: JSONValue
    public var checkpoint: String
    public var optimizerSteps: Int
    public var run: RunState?
    /// The validation result a `best` checkpoint was kept for.
    public var validLoss, validBPC, validAccuracy: Double?
    /// The checksum of the tensor file written with this sidecar (its metadata's sha256): pairs
    /// the two files, so a crash between their writes is detected (`checkPaired`).
    public var tensorsSHA256: String?
    /// The model as built (`Architecture`): backbone shape, FFN composition, each plugin's
    /// resolved hyperparameters; what a loader outside the engine rebuilds the model from.
    public var model: JSONValue?

    enum CodingKeys: String, CodingKey {
        case format, step, config, checkpoint, run, model
        case tensorsSHA256 = "tensors_sha256"
        case optimizerSteps = "optimizer_steps", validLoss = "valid_loss", validBPC = "valid_bpc", validAccuracy =
            "valid_accuracy"
    }

    /// Read `path`, naming it in errors.
    public static func read(_ path: String) throws -> CheckpointSidecar {
        guard let data = FileManager.default.contents(atPath: path) else {
            throw VQMoEError(.checkpoint, "\(path): missing (the sidecar of a vqmoe checkpoint)")
        }
        guard (try? JSONSerialization.jsonObject(with: data)) is [String: Any] else {
            throw VQMoEError(
                .checkpoint, "\(path): not a vqmoe checkpoint sidecar: not a JSON object (truncated or overwritten?)")
        }
        do { return try JSONDecoder().decode(CheckpointSidecar.self, from: data) } catch DecodingError.keyNotFound(
            let key, _)
        {
            throw VQMoEError(.checkpoint, "\(path): not a vqmoe checkpoint sidecar: missing key '\(key.stringValue)'")
        } catch DecodingError.typeMismatch(_, let context), DecodingError.valueNotFound(_, let context) {
            let where_ = context.codingPath.map(\.stringValue).joined(separator: ".")
            throw VQMoEError(.checkpoint, "\(path): not a vqmoe checkpoint sidecar: '\(where_)' has the wrong type")
        } catch {
            throw VQMoEError(.checkpoint, "\(path): not a vqmoe checkpoint sidecar")
        }
    }

    /// This sidecar (read from `path`) and the checkpoint `ck` (read from `ckPath`) were
    /// written by one save: same step and, when recorded, the tensor file's checksum.
    public func checkPaired(with ck: Checkpoint.Loaded, path: String, ckPath: String) throws {
        let ckStep = ck.metadata["step"].flatMap { Int($0) }
        let shaMatches = tensorsSHA256.map { $0 == ck.metadata["sha256"] } ?? true
        guard ckStep == step, shaMatches else {
            throw VQMoEError(
                .checkpoint,
                "\(path) (step \(step)) and \(ckPath) (step \(ckStep.map(String.init) ?? "unknown")) were not written "
                    + "by the same save (a crash or a full disk between the two writes?): refusing to resume from a "
                    + "mixed state. Start again (--force), or fine-tune from best.safetensors")
        }
    }

    public func write(_ path: String) throws {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.prettyPrinted, .sortedKeys]
        try Checkpoint.atomicWrite(try encoder.encode(self), to: path)
    }
}

/// `OUT/result.json` of a finished run.
public struct RunSummary: Codable, Sendable {
    public var name: String
    public var ffn: String
    public var steps, bestStep, paramsTotal, threads: Int
    public var flopsPerTokenForward, wallSeconds, tokensPerSecond: Double
    public var validLoss, validBPC, validAccuracy, testLoss, testBPC, testAccuracy: Double?
    /// Fine-tuning: where the weights came from, both paths' FFN FLOPs, what was trained.
    public var pretrainedFrom: String?
    public var ffnFlopsPretrain, ffnFlopsFinetune, ffnFlopsSaving: Double?
    public var paramsFrozen, paramsTrainable: Int?
    /// The best-validation evaluation's lowest code perplexity over layers and levels, and K.
    public var codePerplexityMin: Double?
    public var codebookSize: Int?

    enum CodingKeys: String, CodingKey {
        case name, ffn, steps, threads
        case bestStep = "best_step", paramsTotal = "params_total", flopsPerTokenForward = "flops_per_token_forward"
        case wallSeconds = "wall_s", tokensPerSecond = "tokens_per_s"
        case validLoss = "valid_loss", validBPC = "valid_bpc", validAccuracy = "valid_accuracy"
        case testLoss = "test_loss", testBPC = "test_bpc", testAccuracy = "test_accuracy"
        case pretrainedFrom = "pretrained_from", ffnFlopsPretrain = "ffn_flops_per_token_pretrain"
        case ffnFlopsFinetune = "ffn_flops_per_token_finetune", ffnFlopsSaving = "ffn_flops_saving"
        case paramsFrozen = "params_frozen", paramsTrainable = "params_trainable"
        case codePerplexityMin = "code_perplexity_min", codebookSize = "codebook_size"
    }

    /// Record an evaluation of the valid or test split (BPC for language models, else accuracy).
    mutating func set(_ split: Split, _ r: EvalResult, isLM: Bool) {
        if split == .test {
            testLoss = r.loss
            if isLM { testBPC = r.bpc } else { testAccuracy = r.accuracy }
        } else {
            validLoss = r.loss
            if isLM { validBPC = r.bpc } else { validAccuracy = r.accuracy }
            if let health = r.codeHealth?.joined(), let worst = health.min(by: { $0.perplexity < $1.perplexity }) {
                (codePerplexityMin, codebookSize) = (worst.perplexity, worst.codebookSize)
            }
        }
    }
}
