import Foundation
import VQMoEABI

/// One line of a plugin check.
public struct CheckResult: Sendable, CustomStringConvertible {
    public let name: String
    public let passed: Bool
    public let detail: String
    public var description: String { "\(passed ? "PASS" : "FAIL")  \(name)\(detail.isEmpty ? "" : "  \(detail)")" }
}

/// `vqmoe plugins check`: load a plugin, validate its descriptor and buffers, run forward and
/// backward on seeded random inputs, and compare every gradient with central finite
/// differences. Offered to plugin authors as the framework's gradcheck.
///
/// The objective is a random linear function of the outputs (plus the losses), so every
/// output's backward is exercised: routers Σ r⊙weights + c·aux (top-k) or
/// Σ r⊙dispatch + Σ s⊙combine + c·aux (dense); quantizers c·loss, and Σ r⊙quantized on the
/// straight-through surrogate (VQMOE_STEP_SURROGATE); heads c·loss. State buffers are restored
/// before every evaluation (EMA updates do not leak into the differences), and coordinates
/// whose perturbation changes a discrete output (top-k set, code) are skipped and counted:
/// the function is not differentiable there.
///
/// ```swift
/// let results = PluginChecker(library: try PluginLibrary.open("libRouterSMoE.so")).run()
/// results.forEach { print($0) }            // PASS  gradcheck x  max rel err 3e-4 ...
/// ```
public struct PluginChecker {
    public var library: PluginLibrary
    public var hyperparameters: [[String: Any]]
    public var dims: ModelDims
    public var seed: UInt64
    /// Finite-difference step and tolerance: |a − f| ≤ rtol·max(|a|,|f|) + atol·max(1, max|a|).
    public var eps: Float = 1e-2
    public var rtol: Double = 2e-2
    public var atol: Double = 2e-3
    /// At most this many coordinates of each parameter buffer are checked.
    public var coordinatesPerBuffer = 48

    /// The model's n_codes was set to the quantizer's K (the shape line says so).
    var nCodesFromQuantizer = false

    /// Groups × tokens per group used for router / quantizer / head inputs.
    public var groups = 2, groupSize = 5

    public init(library: PluginLibrary, hyperparameters: [[String: Any]] = [], dims: ModelDims? = nil, seed: UInt64 = 1)
    {
        self.library = library
        self.hyperparameters = hyperparameters
        self.dims = dims ?? PluginChecker.defaultDims
        self.seed = seed
    }

    /// The model a component is checked in unless told otherwise (`--set model.n_codes=16`).
    public static var defaultDims: ModelDims {
        ModelDims(
            dModel: 8, nExperts: 4, nCodes: 8, vocabSize: 7, nClasses: 3, seqLen: 5, totalSteps: 100,
            dataRoot: DataLocator.defaultRoot() ?? "")
    }

    public init(library: PluginLibrary, hyperparameters: [String: Any]) {
        self.init(library: library, hyperparameters: [hyperparameters])
    }

    /// Run every check for the plugin's kind. Never throws: failures are results.
    public func run() -> [CheckResult] {
        var results: [CheckResult] = [
            CheckResult(
                name: "descriptor", passed: true,
                detail:
                    "\(library.kind.rawValue) '\(library.name)' \(library.version), ABI "
                    + "\(abiString(library.abiVersion)), \(library.schema.count) hyperparameters"
            )
        ]
        let hp: ResolvedHyperparameters
        do {
            hp = try ResolvedHyperparameters(schema: library.schema, layers: hyperparameters, keyPath: library.name)
            results.append(
                CheckResult(
                    name: "hyperparameters", passed: true,
                    detail: hp.names.map { "\($0)=\(HyperparameterSpec.text(hp.values[$0]!))" }.joined(separator: " ")))
        } catch {
            return results + [CheckResult(name: "hyperparameters", passed: false, detail: "\(error)")]
        }
        let make = { (s: UInt64) in
            try PluginInstance(library: library, instanceName: "check", dims: dims, hyperparameters: hp, seed: s)
        }
        let inst: PluginInstance
        do {
            inst = try make(seed)
            // A quantizer is checked in a model whose n_codes is its K (training refuses any other).
            if library.kind == .quantizer, let k = try? QuantizerInstance(inst).codebookSize, k != dims.nCodes, k >= 1 {
                var matched = self
                (matched.dims.nCodes, matched.nCodesFromQuantizer) = (k, true)
                return matched.run()
            }
            results.append(
                CheckResult(
                    name: "create + buffers", passed: true,
                    detail: inst.buffers.map { "\($0.name)\($0.shape)\($0.isParameter ? "" : " state")" }.joined(
                        separator: " ")))
            let again = try make(seed)
            let same = zip(inst.buffers, again.buffers).allSatisfy { memcmp($0.data, $1.data, $0.byteCount) == 0 }
            results.append(
                CheckResult(
                    name: "init deterministic", passed: same,
                    detail: same
                        ? "same seed, same initial buffers"
                        : "two instances with the same seed got different initial buffers"))
        } catch {
            return results + [CheckResult(name: "create + buffers", passed: false, detail: "\(error)")]
        }
        do {
            switch library.kind {
            case .router: results += try checkRouter(RouterInstance(inst))
            case .quantizer: results += try checkQuantizer(QuantizerInstance(inst))
            case .head: results += try checkHead(HeadInstance(inst))
            case .dataset: results += try checkDataset(DatasetInstance(inst))
            }
        } catch {
            results.append(CheckResult(name: "\(library.kind.rawValue) calls", passed: false, detail: "\(error)"))
        }
        return results
    }

    // MARK: shared machinery

    private var n: Int { groups * groupSize }

    private func step(train: Bool = true, noGrad: Bool = false, surrogate: Bool = false) -> StepInfo {
        StepInfo(
            step: 3, totalSteps: dims.totalSteps, train: train, noGrad: noGrad, surrogate: surrogate, seed: seed &+ 17)
    }

    /// Objective value and the discrete outputs (for switch detection) of one evaluation.
    private typealias Eval = () throws -> (value: Double, discrete: [Int32])

    /// Compare `analytic` gradients of `target` with central differences of `eval`.
    private func gradcheck(
        _ label: String, target: UnsafeMutablePointer<Float>, count: Int,
        analytic: [Float], coordinates: [Int], restore: () -> Void, eval: Eval,
        directionOnly: Bool = false
    ) throws -> CheckResult {
        // Every element, not only the sampled coordinates (a NaN compares false with any tolerance).
        if let bad = analytic.firstIndex(where: { !$0.isFinite }) {
            return CheckResult(
                name: "gradcheck \(label)", passed: false,
                detail: "backward wrote a non-finite gradient (element \(bad) = \(analytic[bad]))")
        }
        restore()
        let base = try eval().discrete
        var maxErr = 0.0, worst = "", checked = 0, skipped = 0, failures = 0
        var dotAF = 0.0, dotAA = 0.0, dotFF = 0.0
        let scale = max(1.0, Double(analytic.map { abs($0) }.max() ?? 0))
        for i in coordinates {
            let orig = target[i]
            target[i] = orig + eps; restore(); let plus = try eval()
            target[i] = orig - eps; restore(); let minus = try eval()
            target[i] = orig
            if plus.discrete != base || minus.discrete != base { skipped += 1; continue }
            var fd = (plus.value - minus.value) / Double(2 * eps)
            let a = Double(analytic[i])
            var tol = rtol * max(abs(a), abs(fd)) + atol * scale
            if abs(a - fd) > tol {
                // A kink inside the plugin (ReLU, max pooling) within ±eps of the point spoils the
                // central difference: look again with a step ten times smaller.
                let small = eps / 10
                target[i] = orig + small; restore(); let p2 = try eval()
                target[i] = orig - small; restore(); let m2 = try eval()
                target[i] = orig
                if p2.discrete == base && m2.discrete == base {
                    let fd2 = (p2.value - m2.value) / Double(2 * small)
                    let tol2 = rtol * max(abs(a), abs(fd2)) + atol * scale
                    if abs(a - fd2) <= tol2 { fd = fd2; tol = tol2 }
                }
            }
            dotAF += a * fd; dotAA += a * a; dotFF += fd * fd
            let err = abs(a - fd)
            checked += 1
            let rel = err / max(tol, 1e-30)
            if rel > maxErr { maxErr = rel; worst = "at \(i): analytic \(fmt(a)) vs numeric \(fmt(fd))" }
            if err > tol { failures += 1 }
        }
        restore()
        let enough = checked > 0 || coordinates.isEmpty
        if directionOnly {
            // Stop-gradient loss: the backward is a positive multiple of the value's derivative
            // per buffer (e.g. γ/(1+γ) for x in VQ-VAE), so compare directions.
            let both = dotAA > 1e-20 && dotFF > 1e-20, neither = dotAA <= 1e-20 && dotFF <= 1e-20
            if dotAA <= 1e-20 && !neither {
                // The backward gives this buffer nothing from the loss (its terms are detached,
                // e.g. a zero commitment weight), while the value still moves with it.
                return CheckResult(
                    name: "gradcheck \(label) (direction: stop-gradient loss)", passed: enough,
                    detail:
                        "\(checked) coords: no gradient from the loss (detached terms); the value's slope is "
                        + "\(fmt(dotFF.squareRoot()))"
                )
            }
            let cosine = both ? dotAF / (dotAA.squareRoot() * dotFF.squareRoot()) : (neither ? 1 : 0)
            let ratio = both ? (dotAA / dotFF).squareRoot() : 0
            return CheckResult(
                name: "gradcheck \(label) (direction: stop-gradient loss)", passed: cosine >= 0.999 && enough,
                detail: "\(checked) coords" + (skipped > 0 ? " (\(skipped) skipped at discrete switches)" : "")
                    + String(format: ", cosine %.6f, |analytic|/|numeric| %.4f", cosine, ratio))
        }
        return CheckResult(
            name: "gradcheck \(label)", passed: failures == 0 && enough,
            detail: "\(checked) coords" + (skipped > 0 ? " (\(skipped) skipped at discrete switches)" : "")
                + ", worst err/tol \(String(format: "%.3f", maxErr))" + (worst.isEmpty ? "" : " \(worst)")
                + (enough ? "" : "; every coordinate sat at a switch"))
    }

    private func fmt(_ v: Double) -> String { String(format: "%.6g", v) }

    /// A count vector for a result line: in full up to 16 entries, else its first 8 and a summary.
    static func summary(_ v: [Float]) -> String {
        let text = { (x: Float) in x == x.rounded() && abs(x) < 1e9 ? String(Int(x)) : String(format: "%.3g", x) }
        guard v.count > 16 else { return "[" + v.map(text).joined(separator: ", ") + "]" }
        let used = v.filter { $0 != 0 }.count
        return "[" + v.prefix(8).map(text).joined(separator: ", ") + ", …] (\(v.count) entries, \(used) nonzero, "
            + "sum \(text(v.reduce(0, +))), max \(text(v.max()!)))"
    }

    private func coords(_ count: Int, salt: UInt64) -> [Int] {
        if count <= coordinatesPerBuffer { return Array(0..<count) }
        var r = HostRNG.make(seed: seed, stream: salt)
        var set = Set<Int>()
        while set.count < coordinatesPerBuffer { set.insert(Int(HostRNG.next(&r) % UInt64(count))) }
        return set.sorted()
    }

    /// Snapshot of every state buffer, and a closure that puts it back.
    private func stateRestorer(_ inst: PluginInstance) -> () -> Void {
        let snaps = inst.states.map { b -> [UInt8] in Array(UnsafeRawBufferPointer(start: b.data, count: b.byteCount)) }
        let states = inst.states
        return {
            for (b, s) in zip(states, snaps) { s.withUnsafeBytes { _ = memcpy(b.data, $0.baseAddress!, b.byteCount) } }
        }
    }

    /// Gradchecks of the input and of every parameter buffer.
    private func gradchecks(
        _ inst: PluginInstance, inputName: String, input: UnsafeMutablePointer<Float>, inputCount: Int,
        inputGrad: [Float], restore: @escaping () -> Void, eval: Eval,
        directionOnly: Bool = false
    ) throws -> [CheckResult] {
        var out = [
            try gradcheck(
                inputName, target: input, count: inputCount, analytic: inputGrad,
                coordinates: coords(inputCount, salt: 1), restore: restore, eval: eval, directionOnly: directionOnly)
        ]
        for (bi, b) in inst.parameters.enumerated() {
            out.append(
                try gradcheck(
                    b.name, target: b.floats, count: b.count,
                    analytic: Array(UnsafeBufferPointer(start: b.grad!, count: b.count)),
                    coordinates: coords(b.count, salt: 10 + UInt64(bi)), restore: restore, eval: eval,
                    directionOnly: directionOnly))
        }
        return out
    }

    private func evalModeLeavesNoContext(_ ctx: PluginContext?) -> CheckResult {
        CheckResult(
            name: "eval forward saves no context", passed: ctx == nil,
            detail: ctx == nil ? "" : "forward without VQMOE_STEP_TRAIN returned a ctx")
    }

    // MARK: router

    /// The router's inputs and outputs, as heap buffers the plugin writes into.
    private struct RouterIO {
        let x: Storage<Float>, ids: Storage<Int32>, index: Storage<Int32>, weights: Storage<Float>
        let dispatch: Storage<Float>, combine: Storage<Float>, load: Storage<Float>
        /// The objective's random coefficients for weights (or dispatch) and combine.
        let rw: [Float], rc: [Float]

        var outputs: RouterOutputs {
            RouterOutputs(
                expertIndex: index.pointer, weights: weights.pointer, dispatch: dispatch.pointer,
                combine: combine.pointer,
                expertLoad: load.pointer)
        }
    }

    private func checkRouter(_ r: RouterInstance) throws -> [CheckResult] {
        let e = dims.nExperts, d = dims.dModel
        let shape = try r.shape(step())
        var results = [
            CheckResult(
                name: "shape", passed: true,
                detail: shape.mode == .topK ? "top-k, k=\(shape.k)" : "dense, \(shape.slotsPerExpert) slots per expert")
        ]
        // Buffers at the largest width any step may ask for; each forward asks shape() for its
        // own step (k may change per step, e.g. SMoE-Dropout's schedule or eval at k_max).
        let maxWidth = n * (shape.mode == .topK ? e : e * shape.slotsPerExpert)
        let io = RouterIO(
            x: Storage(randomNormal(n * d, stream: 2)),
            ids: Storage((0..<n).map { Int32($0 % max(dims.vocabSize, 1)) }),
            index: Storage(zeros: maxWidth), weights: Storage(zeros: maxWidth), dispatch: Storage(zeros: maxWidth),
            combine: Storage(zeros: maxWidth), load: Storage(zeros: e),
            rw: randomNormal(maxWidth, stream: 3), rc: randomNormal(maxWidth, stream: 4))
        let cAux: Float = 1.5
        func forward(_ s: StepInfo) throws -> (Double, [Int32], PluginContext?) {
            let shape = try r.shape(s)
            let (aux, ctx) = try r.forward(
                s, x: io.x.pointer, tokenIDs: io.ids.pointer, nGroups: groups, groupSize: groupSize,
                shape: shape, outputs: io.outputs)
            var v = Double(cAux) * Double(aux)
            if shape.mode == .topK {
                for i in 0..<(n * shape.k) { v += Double(io.rw[i]) * Double(io.weights.pointer[i]) }
                return (v, Array(UnsafeBufferPointer(start: io.index.pointer, count: n * shape.k)), ctx)
            }
            for i in 0..<(n * e * shape.slotsPerExpert) {
                v +=
                    Double(io.rw[i]) * Double(io.dispatch.pointer[i]) + Double(io.rc[i]) * Double(io.combine.pointer[i])
            }
            return (v, [], ctx)
        }
        let restore = stateRestorer(r.core)
        let (v1, d1, ctx) = try forward(step())
        restore()
        let (v2, d2, _) = try forward(step(noGrad: true))
        results.append(
            CheckResult(name: "forward deterministic", passed: v1 == v2 && d1 == d2, detail: "objective \(fmt(v1))"))
        if shape.mode == .topK { results += topKChecks(io, shape: shape) }
        restore()
        results.append(
            try batchStatistics(restore: restore) { first, count, s in
                let (aux, _) = try r.forward(
                    s, x: io.x.pointer + first * d, tokenIDs: io.ids.pointer + first, nGroups: count / groupSize,
                    groupSize: groupSize, shape: try r.shape(s), outputs: io.outputs)
                return Double(aux)
            })
        restore()
        results.append(evalModeLeavesNoContext(try forward(step(train: false)).2))
        if library.hasNoGrad || r.api.backward == nil {
            return results + [
                CheckResult(name: "backward", passed: true, detail: "declared non-trainable (no backward)")
            ]
        }
        guard let ctx else {
            return results + [CheckResult(name: "train forward saves a context", passed: false, detail: "ctx was NULL")]
        }
        r.core.zeroGrads()
        let gx = Storage<Float>(zeros: n * d)
        if shape.mode == .topK {
            try r.backward(ctx, n: n, shape: shape, gradWeights: io.rw, gradAux: cAux, gradX: gx.pointer)
        } else {
            try r.backward(
                ctx, n: n, shape: shape, gradDispatch: io.rw, gradCombine: io.rc, gradAux: cAux, gradX: gx.pointer)
        }
        let eval: Eval = {
            let (v, dsc, _) = try forward(step(noGrad: true)); return (v, dsc)
        }
        return results
            + (try gradchecks(
                r.core, inputName: "x", input: io.x.pointer, inputCount: n * d,
                inputGrad: Array(UnsafeBufferPointer(start: gx.pointer, count: n * d)), restore: restore, eval: eval))
    }

    /// Top-k outputs of the last forward: distinct experts per token, load summing to N·k.
    private func topKChecks(_ io: RouterIO, shape: RouterShape) -> [CheckResult] {
        let k = shape.k, idx = io.index.pointer
        let distinct = (0..<n).allSatisfy { t in Set(UnsafeBufferPointer(start: idx + t * k, count: k)).count == k }
        let load = Array(UnsafeBufferPointer(start: io.load.pointer, count: dims.nExperts))
        let loadOK = abs(Double(load.reduce(0, +)) - Double(n * k)) < 1e-3
        return [
            CheckResult(name: "top-k experts distinct per token", passed: distinct, detail: ""),
            CheckResult(name: "expert load sums to N·k", passed: loadOK, detail: "load \(PluginChecker.summary(load))"),
        ]
    }

    /// Data parallelism: does the plugin's loss depend on the batch as a whole? Two "ranks" each
    /// run a training forward on one half of the check batch (the groups split between them); a
    /// loss that is a mean over tokens gives the whole batch's loss as the mean of the halves'.
    /// A plugin that declares VQMOE_PLUGIN_GLOBAL_BATCH is trusted (it reduces over the ranks
    /// through the host's collectives); one that does not, and whose halves disagree, gets a note:
    /// under `mpirun` it sees one rank's rows. A note, never a failure: such a plugin still trains.
    private func batchStatistics(
        restore: () -> Void, loss: (_ first: Int, _ count: Int, StepInfo) throws -> Double
    ) throws -> CheckResult {
        let name = "batch statistics (data parallel)"
        if library.computesGlobalBatch {
            return CheckResult(
                name: name, passed: true,
                detail: "declares VQMOE_PLUGIN_GLOBAL_BATCH: its batch statistics are the global batch's")
        }
        let half = (groups / 2) * groupSize
        guard half > 0 && half < n else { return CheckResult(name: name, passed: true, detail: "not measured") }
        var s = step(noGrad: true)
        (s.tokenOffset, s.globalTokens) = (0, n)
        let whole = try loss(0, n, s)
        restore()
        s.globalTokens = n
        let first = try loss(0, half, s)
        restore()
        s.tokenOffset = half
        let second = try loss(half, n - half, s)
        restore()
        let mean = (Double(half) * first + Double(n - half) * second) / Double(n)
        if abs(whole - mean) <= 1e-5 * max(1, abs(whole)) {
            return CheckResult(
                name: name, passed: true,
                detail:
                    "the loss is a mean over tokens (the halves' losses average to the batch's): data parallel as is")
        }
        let states = library.kind == .router || library.kind == .quantizer ? " and any state kept from rank 0's" : ""
        return CheckResult(
            name: name, passed: true,
            detail: "note: the loss over a batch (\(fmt(whole))) is not the mean of its halves' (\(fmt(mean))) and "
                + "the plugin does not declare VQMOE_PLUGIN_GLOBAL_BATCH: under data parallelism each rank computes "
                + "it over its own rows (the ranks' losses averaged\(states)); use the host's allreduce_sum_f64 / "
                + "allgather to make it the global batch's (README, \"Running on several machines\")")
    }

    // MARK: quantizer

    private func checkQuantizer(_ q: QuantizerInstance) throws -> [CheckResult] {
        // Training refuses a quantizer whose K is not the model's n_codes: so does the check.
        let matches = q.codebookSize == dims.nCodes
        var results = [
            CheckResult(
                name: "shape", passed: matches,
                detail: "K=\(q.codebookSize), codes per token L=\(q.codesPerToken)"
                    + (matches
                        ? (nCodesFromQuantizer
                            ? " (checked with n_codes = K: training needs model.ffn.n_codes = \(dims.nCodes))" : "")
                        : " -- but the model's n_codes is \(dims.nCodes), which training refuses "
                            + "(check with --set model.n_codes=\(q.codebookSize), or fix the codebook size)"))
        ]
        let d = dims.dModel, l = q.codesPerToken
        let x = Storage(randomNormal(n * d, stream: 5)), qo = Storage<Float>(zeros: n * d),
            codes = Storage<Int32>(zeros: n * l)
        let counts = Storage<Float>(zeros: q.codebookSize), rq = randomNormal(n * d, stream: 6)
        func forward(
            _ s: StepInfo, lossWeight: Double, outWeight: Bool, _ first: Int = 0, _ rows: Int? = nil
        ) throws -> (Double, [Int32], PluginContext?) {
            let n = rows ?? n
            let (loss, ctx) = try q.forward(
                s, x: x.pointer + first * d, n: n, quantized: qo.pointer, codes: codes.pointer,
                codeCounts: counts.pointer)
            var v = lossWeight * Double(loss)
            if outWeight { for i in 0..<(n * d) { v += Double(rq[i]) * Double(qo.pointer[i]) } }
            return (v, Array(UnsafeBufferPointer(start: codes.pointer, count: n * l)), ctx)
        }
        let restore = stateRestorer(q.core)
        let (v1, c1, ctx) = try forward(step(), lossWeight: 1, outWeight: true)
        let used = Array(UnsafeBufferPointer(start: counts.pointer, count: q.codebookSize))
        restore()
        let (v2, c2, _) = try forward(step(noGrad: true), lossWeight: 1, outWeight: true)
        results.append(
            CheckResult(name: "forward deterministic", passed: v1 == v2 && c1 == c2, detail: "objective \(fmt(v1))"))
        results.append(
            CheckResult(
                name: "code counts sum to N·L", passed: abs(Double(used.reduce(0, +)) - Double(n * l)) < 1e-3,
                detail: "counts \(PluginChecker.summary(used))"))
        restore()
        results.append(
            try batchStatistics(restore: restore) { try forward($2, lossWeight: 1, outWeight: false, $0, $1).0 })
        restore()
        results.append(evalModeLeavesNoContext(try forward(step(train: false), lossWeight: 1, outWeight: true).2))
        guard ctx != nil else {
            return results + [CheckResult(name: "train forward saves a context", passed: false, detail: "ctx was NULL")]
        }
        // (1) the loss: exact gradient where the codes do not change; (2) the straight-through surrogate.
        for (label, lossWeight, surrogate) in [("loss", Double(Float(1.7)), false), ("straight-through", 0.0, true)] {
            restore()
            q.core.zeroGrads()
            guard let c = try forward(step(surrogate: surrogate), lossWeight: lossWeight, outWeight: surrogate).2 else {
                continue
            }
            let gx = Storage<Float>(zeros: n * d)
            try q.backward(c, n: n, gradQuantized: surrogate ? rq : nil, gradLoss: Float(lossWeight), gradX: gx.pointer)
            let eval: Eval = {
                let (v, dsc, _) = try forward(
                    step(noGrad: true, surrogate: surrogate), lossWeight: lossWeight, outWeight: surrogate)
                return (v, dsc)
            }
            let directionOnly = !surrogate && library.hasStopGradientLoss
            let checks = try gradchecks(
                q.core, inputName: "x", input: x.pointer, inputCount: n * d,
                inputGrad: Array(UnsafeBufferPointer(start: gx.pointer, count: n * d)), restore: restore, eval: eval,
                directionOnly: directionOnly)
            results += checks.enumerated().map { i, r in
                // With several codes per token (residual VQ), later levels' residuals detach the
                // earlier levels' codes, so the value's slope in a codebook is not even parallel to
                // the method's gradient: reported, not judged (the plugin's own tests cover it).
                if directionOnly && l > 1 && i > 0 && !r.passed {
                    return CheckResult(
                        name: "\(r.name) [\(label)]", passed: true,
                        detail: r.detail + " (not comparable with \(l) residual levels: reported only)")
                }
                return CheckResult(name: "\(r.name) [\(label)]", passed: r.passed, detail: r.detail)
            }
        }
        return results
    }

    // MARK: head

    private func checkHead(_ h: HeadInstance) throws -> [CheckResult] {
        var results = [
            CheckResult(
                name: "shape", passed: true,
                detail: "\(h.perToken ? "per token" : "per sequence"), \(h.nOut) outputs\(h.isLM ? ", LM" : "")")
        ]
        let d = dims.dModel, b = groups, t = groupSize, rows = h.rows(batch: b, seq: t)
        // Stable buffers (Storage): the gradcheck perturbs hs while forward reads it.
        let hs = Storage(randomNormal(b * t * d, stream: 7))
        var r = HostRNG.make(seed: seed, stream: 8)
        var targetValues = (0..<rows).map { _ in Int32(HostRNG.next(&r) % UInt64(h.nOut)) }
        if rows > 2 { targetValues[1] = Int32(VQMOE_PAD_TARGET) }  // one ignored target
        let targets = Storage(targetValues), logits = Storage<Float>(zeros: rows * h.nOut)
        let cLoss: Float = 1.3
        // Pooled heads also get padded sequences: sample i has t − i real tokens.
        let lengths: [Int32]? = h.perToken ? nil : (0..<b).map { Int32(max(1, t - $0)) }
        func forward(_ s: StepInfo) throws -> (Double, [Int32], HeadInstance.Result) {
            let res = try h.forward(
                s, h: hs.pointer, batch: b, seq: t, targets: targets.pointer, lengths: lengths, logits: logits.pointer)
            return (Double(cLoss) * Double(res.loss), [], res)
        }
        let restore = stateRestorer(h.core)
        let (v1, _, res) = try forward(step())
        let (v2, _, _) = try forward(step(noGrad: true))
        results.append(
            CheckResult(name: "forward deterministic", passed: v1 == v2, detail: "loss \(fmt(Double(res.loss)))"))
        let expectCount = targetValues.filter { $0 != Int32(VQMOE_PAD_TARGET) }.count
        let sumsOK =
            res.count == expectCount
            && abs(res.lossSum / Double(max(res.count, 1)) - Double(res.loss)) < 1e-4 * max(1, Double(res.loss))
        results.append(
            CheckResult(
                name: "loss_sum / count = loss, pad targets ignored", passed: sumsOK,
                detail: "count \(res.count) (expected \(expectCount)), loss_sum \(fmt(res.lossSum))"))
        let (_, _, evalRes) = try forward(step(train: false))
        results.append(evalModeLeavesNoContext(evalRes.ctx))
        guard let ctx = res.ctx else {
            return results + [CheckResult(name: "train forward saves a context", passed: false, detail: "ctx was NULL")]
        }
        h.core.zeroGrads()
        var gh = [Float](repeating: 0, count: b * t * d)
        try gh.withUnsafeMutableBufferPointer {
            try h.backward(ctx, batch: b, seq: t, gradLoss: cLoss, gradH: $0.baseAddress!)
        }
        let eval: Eval = {
            let (v, dsc, _) = try forward(step(noGrad: true)); return (v, dsc)
        }
        results += try gradchecks(
            h.core, inputName: "h", input: hs.pointer, inputCount: b * t * d, inputGrad: gh, restore: restore,
            eval: eval)
        return results
    }

    // MARK: dataset

    private func checkDataset(_ ds: DatasetInstance) throws -> [CheckResult] {
        var results = [
            CheckResult(
                name: "info", passed: true,
                detail:
                    "task \(ds.task), vocab \(ds.vocabSize), classes \(ds.nClasses), sample \(ds.sampleShape), "
                    + "splits \(ds.splitSizes)"
            )
        ]
        let bs = 4
        guard let a = try ds.read(.train, index: 0, batchSize: bs),
            let a2 = try ds.read(.train, index: 0, batchSize: bs),
            let b = try ds.read(.train, index: 1, batchSize: bs)
        else {
            return results + [
                CheckResult(name: "train batches", passed: false, detail: "the train split gave no batch")
            ]
        }
        let same = a.inputsInt == a2.inputsInt && a.inputsFloat == a2.inputsFloat && a.targets == a2.targets
        results.append(CheckResult(name: "seek: same index, same batch", passed: same, detail: ""))
        let differ = a.inputsInt != b.inputsInt || a.inputsFloat != b.inputsFloat || a.targets != b.targets
        results.append(CheckResult(name: "different index, different batch", passed: differ, detail: ""))
        let limit = ds.isLM || ds.task == VQMOE_TASK_CLASSIFY_TOKENS ? ds.vocabSize : Int.max
        let inRange = a.inputsInt.allSatisfy { $0 >= 0 && Int($0) < limit }
        let classes = ds.isLM ? ds.vocabSize : ds.nClasses
        let targetsOK = a.targets.allSatisfy { ($0 >= 0 && Int($0) < classes) || $0 == Int32(VQMOE_PAD_TARGET) }
        results.append(
            CheckResult(
                name: "inputs and targets in range",
                passed: inRange && targetsOK && a.inputsFloat.allSatisfy(\.isFinite),
                detail: "tokens < \(limit), targets < \(classes) or pad"))
        if ds.isLM && ds.core.library.feature(VQMOE_FEATURE_TOKENIZER) != nil {
            results.append(tokenizerRoundTrip(ds, a))
        }
        for split in [Split.valid, .test] {
            let nb = try ds.numBatches(split, batchSize: bs)
            if nb == 0 {
                results.append(CheckResult(name: "\(split.name) split", passed: true, detail: "empty")); continue
            }
            let last = try ds.read(split, index: nb - 1, batchSize: bs)
            let past = try ds.read(split, index: nb, batchSize: bs)
            results.append(
                CheckResult(
                    name: "\(split.name) split ends after num_batches", passed: last != nil && past == nil,
                    detail: "\(nb) batches of \(bs)"))
        }
        return results
    }

    /// "vqmoe.tokenizer/1": every row of a train batch, decoded and encoded again as a prompt,
    /// gives the row back (the text a sample is written as reads back as the same tokens).
    private func tokenizerRoundTrip(_ ds: DatasetInstance, _ batch: DatasetInstance.Batch) -> CheckResult {
        let name = "tokenizer: encode(decode(row)) = row"
        do {
            let tok = try Tokenizer(dataset: ds, vocab: ds.vocabSize)
            let T = batch.inputsInt.count / max(batch.rows, 1)
            for r in 0..<batch.rows {
                let row = Array(batch.inputsInt[(r * T)..<((r + 1) * T)])
                let text = try tok.decode(row)
                let back = try tok.encode(prompt: String(decoding: text, as: UTF8.self))
                guard back == row else {
                    let i = (0..<min(back.count, row.count)).first { back[$0] != row[$0] } ?? min(back.count, row.count)
                    return CheckResult(
                        name: name, passed: false,
                        detail:
                            "row \(r): \(row.count) tokens decode to \(text.count) bytes that encode to \(back.count) tokens, first difference at \(i)"
                    )
                }
            }
            return CheckResult(name: name, passed: true, detail: "\(batch.rows) rows of \(T) tokens, \(tok.unit)")
        } catch {
            return CheckResult(name: name, passed: false, detail: "\(error)")
        }
    }

    private func randomNormal(_ count: Int, stream: UInt64) -> [Float] {
        var r = HostRNG.make(seed: seed, stream: stream)
        return (0..<count).map { _ in HostRNG.normal(&r) }
    }
}
