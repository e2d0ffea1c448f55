import VQMoEABI

// HeadLM: the `lm` head plugin -- a linear layer to the vocabulary with softmax
// cross-entropy.
//
//   forward   logits (N,V) = h (N,d) W^T + b, N = B*T; with targets: mean cross-entropy in
//             nats over non-pad targets (VQMOE_PAD_TARGET = -1), exact loss_sum, count and
//             argmax-correct for aggregation. Without targets (data NULL): logits only.
//   backward  dlogits = grad_loss * (softmax - onehot) / count on non-pad rows;
//             grad_h += dlogits W, grad_W += dlogits^T h, grad_b += column sums of dlogits.
//
// Parameters "weight" (V,d) ~ N(0, init_std^2) and "bias" (V) = 0 (when bias=true) are
// declared here and owned by the host. Matmuls go through host->sgemm; the per-row softmax
// runs on host->parallel_for and reduces serially, so results do not depend on threads.
//
// Depends only on the C ABI (vqmoe_plugin.h) and Glibc.
#if canImport(Glibc)
    import Glibc
#elseif canImport(Darwin)
    import Darwin
#endif

// MARK: - small helpers

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

/// True when `t` is contiguous with the given element type (code, 32 bits, 1 lane).
private func isContiguous32(_ t: vqmoe_tensor, code: Int32) -> Bool {
    t.data != nil && t.dtype.code == UInt8(code) && t.dtype.bits == 32 && t.dtype.lanes == 1
        && t.strides == nil && t.byte_offset == 0
}

/// Shape as a string, for messages: "(2, 3, 4)".
private func shapeText(_ t: vqmoe_tensor) -> String {
    guard let shape = t.shape else { return "()" }
    return "(" + (0..<Int(t.ndim)).map { String(shape[$0]) }.joined(separator: ", ") + ")"
}

// MARK: - the instance

/// One `lm` head: sizes, hyperparameters and the host-bound buffers.
final class LMHead {
    let host: UnsafePointer<vqmoe_host_api>
    let name: String
    /// Vocabulary (V) and input width (d).
    let vocab: Int
    let dModel: Int
    let useBias: Bool
    let initStd: Float
    /// Bound by bind_buffers; valid until destroy. weight (V,d), bias (V); grads may be nil.
    var weight: UnsafeMutablePointer<Float>?
    var bias: UnsafeMutablePointer<Float>?
    var gradWeight: UnsafeMutablePointer<Float>?
    var gradBias: UnsafeMutablePointer<Float>?

    init(host: UnsafePointer<vqmoe_host_api>, name: String, vocab: Int, dModel: Int, useBias: Bool, initStd: Float) {
        self.host = host; self.name = name; self.vocab = vocab; self.dModel = dModel
        self.useBias = useBias; self.initStd = initStd
    }

    var who: String { "head 'lm' (\(name))" }
    var bufferCount: Int32 { useBias ? 2 : 1 }
}

/// What a training forward saves for backward: h (N,d), softmax probabilities (N,V) and
/// targets (N), in host->alloc memory owned by this object (released in free_ctx).
final class LMContext {
    let host: UnsafePointer<vqmoe_host_api>
    let rows: Int
    /// Non-pad targets in the batch (the loss is their mean).
    let count: Int
    /// VQMOE_STEP_FROZEN was set: no parameter gradients.
    let frozen: Bool
    let h: UnsafeMutablePointer<Float>?  // (N,d)
    let probs: UnsafeMutablePointer<Float>?  // (N,V)
    let targets: UnsafeMutablePointer<Int32>?  // (N)

    /// Allocates the arrays (when rows > 0); check `ok` afterwards.
    init(host: UnsafePointer<vqmoe_host_api>, rows: Int, vocab: Int, dModel: Int, count: Int, frozen: Bool) {
        self.host = host; self.rows = rows; self.count = count; self.frozen = frozen
        if rows > 0 && count > 0 {
            h = host.pointee.alloc!(rows * dModel * 4)?.bindMemory(to: Float.self, capacity: rows * dModel)
            probs = host.pointee.alloc!(rows * vocab * 4)?.bindMemory(to: Float.self, capacity: rows * vocab)
            targets = host.pointee.alloc!(rows * 4)?.bindMemory(to: Int32.self, capacity: rows)
        } else {
            h = nil; probs = nil; targets = nil
        }
    }

    var ok: Bool { rows == 0 || count == 0 || (h != nil && probs != nil && targets != nil) }

    deinit {
        if let h { host.pointee.free!(h) }
        if let probs { host.pointee.free!(probs) }
        if let targets { host.pointee.free!(targets) }
    }
}

/// Unwrap an instance handle (borrowed, not retained).
@inline(__always)
private func head(_ inst: OpaquePointer?) -> LMHead? {
    guard let inst else { return nil }
    return Unmanaged<LMHead>.fromOpaque(UnsafeRawPointer(inst)).takeUnretainedValue()
}

// MARK: - the per-row loss kernel

/// Work shared by the parallel_for chunks of the softmax / cross-entropy pass.
struct RowJob {
    var logits: UnsafePointer<Float>  // (N,V)
    var targets: UnsafePointer<Int32>  // (N)
    var rowLoss: UnsafeMutablePointer<Double>  // (N) out: -log p[target], 0 on pad rows
    var rowCorrect: UnsafeMutablePointer<UInt8>  // (N) out: argmax == target
    var probs: UnsafeMutablePointer<Float>?  // (N,V) out when saving a context
    var vocab: Int
}

/// Rows [begin, end): stable softmax (row max subtracted), -log p[target], argmax.
private func lossRows(_ job: RowJob, _ begin: Int, _ end: Int) {
    let V = job.vocab
    for i in begin..<end {
        let row = job.logits + i * V
        // Max and argmax (first index on ties).
        var m = row[0], am = 0
        for v in 1..<V where row[v] > m { m = row[v]; am = v }
        // Sum of exp(l - m) in double: every term is <= 1 and the max term is 1.
        var s = 0.0
        if let probs = job.probs {
            let p = probs + i * V
            for v in 0..<V {
                let e = expf(row[v] - m)
                p[v] = e
                s += Double(e)
            }
            let inv = Float(1.0 / s)
            for v in 0..<V { p[v] *= inv }
        } else {
            for v in 0..<V { s += Double(expf(row[v] - m)) }
        }
        let t = Int(job.targets[i])
        if t < 0 {
            job.rowLoss[i] = 0
            job.rowCorrect[i] = 0
        } else {
            // -log softmax = log(sum exp(l - m)) - (l_t - m).
            job.rowLoss[i] = log(s) - Double(row[t] - m)
            job.rowCorrect[i] = am == t ? 1 : 0
        }
    }
}

// MARK: - forward / backward

/// The validated tensors of one forward: h (N,d), logits (N,V), targets (N) or none.
private struct ForwardIO {
    let rows: Int
    let h: UnsafePointer<Float>
    let logits: UnsafeMutablePointer<Float>
    let targets: UnsafePointer<Int32>?
}

/// Check the forward's structs and tensors; nil after reporting the error through the host.
private func forwardIO(
    _ hd: LMHead, _ step: UnsafePointer<vqmoe_step_info>, _ input: UnsafePointer<vqmoe_head_input>,
    _ out: UnsafeMutablePointer<vqmoe_head_output>, status: inout Int32
) -> ForwardIO? {
    let host = hd.host, V = hd.vocab, d = hd.dModel
    guard step.pointee.struct_size >= UInt32(MemoryLayout<vqmoe_step_info>.size),
        input.pointee.struct_size >= UInt32(MemoryLayout<vqmoe_head_input>.size),
        out.pointee.struct_size >= UInt32(MemoryLayout<vqmoe_head_output>.size)
    else {
        status = fail(host, VQMOE_ERR_INVALID_ARGUMENT, "\(hd.who): forward got a struct with a too small struct_size")
        return nil
    }
    guard hd.weight != nil, !hd.useBias || hd.bias != nil else {
        status = fail(host, VQMOE_ERR_STATE, "\(hd.who): forward before bind_buffers")
        return nil
    }
    let hT = input.pointee.h, yT = input.pointee.targets, lT = out.pointee.logits
    // h (B,T,d) float32 (any leading dims), N = rows.
    guard isContiguous32(hT, code: VQMOE_DTYPE_FLOAT), hT.ndim >= 1, hT.shape![Int(hT.ndim) - 1] == Int64(d) else {
        status = fail(
            host, VQMOE_ERR_SHAPE, "\(hd.who): h must be contiguous float32 (..., \(d)), got \(shapeText(hT))")
        return nil
    }
    let N = Int(numel(hT)) / d
    guard isContiguous32(lT, code: VQMOE_DTYPE_FLOAT), numel(lT) == Int64(N * V) else {
        status = fail(
            host, VQMOE_ERR_SHAPE, "\(hd.who): logits must be contiguous float32 (\(N), \(V)), got \(shapeText(lT))")
        return nil
    }
    if yT.data != nil {
        guard isContiguous32(yT, code: VQMOE_DTYPE_INT), numel(yT) == Int64(N) else {
            status = fail(
                host, VQMOE_ERR_SHAPE,
                "\(hd.who): targets must be contiguous int32 with \(N) elements, got \(shapeText(yT))")
            return nil
        }
    }
    return ForwardIO(
        rows: N, h: UnsafePointer(hT.data!.assumingMemoryBound(to: Float.self)),
        logits: lT.data!.assumingMemoryBound(to: Float.self),
        targets: yT.data.map { UnsafePointer($0.assumingMemoryBound(to: Int32.self)) })
}

/// logits (N,V) = h W^T + b.
private func computeLogits(_ hd: LMHead, _ io: ForwardIO) {
    let V = hd.vocab, d = hd.dModel, N = io.rows
    if hd.useBias, let b = hd.bias {
        for i in 0..<N { (io.logits + i * V).update(from: b, count: V) }
    } else {
        io.logits.update(repeating: 0, count: N * V)
    }
    guard N > 0 else { return }
    hd.host.pointee.sgemm!(
        Int32(VQMOE_NO_TRANS), Int32(VQMOE_TRANS), Int64(N), Int64(V), Int64(d),
        1, io.h, Int64(d), hd.weight!, Int64(d), 1, io.logits, Int64(V))
}

/// Targets other than the pad target; nil (error reported) for one outside [0, V).
private func countTargets(_ hd: LMHead, _ y: UnsafePointer<Int32>, rows: Int) -> Int? {
    var count = 0
    for i in 0..<rows {
        let t = y[i]
        if t == Int32(VQMOE_PAD_TARGET) { continue }
        guard t >= 0 && Int(t) < hd.vocab else {
            _ = fail(
                hd.host, VQMOE_ERR_INVALID_ARGUMENT,
                "\(hd.who): target \(t) at row \(i) is outside [0, \(hd.vocab)) and not the pad target -1")
            return nil
        }
        count += 1
    }
    return count
}

/// Σ per-row cross-entropy and correct predictions (rows on the host pool, summed in row order so
/// that the result does not depend on the thread count); the softmax into `probs` when given.
private func crossEntropy(
    _ hd: LMHead, _ io: ForwardIO, _ y: UnsafePointer<Int32>, probs: UnsafeMutablePointer<Float>?
)
    -> (lossSum: Double, correct: Int)?
{
    let N = io.rows, host = hd.host
    guard let lossRaw = host.pointee.scratch!(N * 8), let correctRaw = host.pointee.scratch!(N) else {
        _ = fail(host, VQMOE_ERR_OUT_OF_MEMORY, "\(hd.who): out of scratch memory for \(N) rows")
        return nil
    }
    var job = RowJob(
        logits: io.logits, targets: y,
        rowLoss: lossRaw.bindMemory(to: Double.self, capacity: N),
        rowCorrect: correctRaw.bindMemory(to: UInt8.self, capacity: N),
        probs: probs, vocab: hd.vocab)
    withUnsafeMutablePointer(to: &job) { jp in
        host.pointee.parallel_for!(Int64(N), 16, UnsafeMutableRawPointer(jp)) { user, begin, end in
            lossRows(user!.assumingMemoryBound(to: RowJob.self).pointee, Int(begin), Int(end))
        }
    }
    var lossSum = 0.0, correct = 0
    for i in 0..<N {
        lossSum += job.rowLoss[i]
        correct += Int(job.rowCorrect[i])
    }
    return (lossSum, correct)
}

/// Forward: logits, and with targets the loss, sums and (train) a saved context.
private func headForward(
    _ inst: OpaquePointer?, _ step: UnsafePointer<vqmoe_step_info>?,
    _ input: UnsafePointer<vqmoe_head_input>?, _ out: UnsafeMutablePointer<vqmoe_head_output>?,
    _ ctxOut: UnsafeMutablePointer<UnsafeMutableRawPointer?>?
) -> Int32 {
    ctxOut?.pointee = nil
    guard let hd = head(inst), let step, let input, let out, let ctxOut else { return VQMOE_ERR_INVALID_ARGUMENT }
    var status = VQMOE_OK
    guard let io = forwardIO(hd, step, input, out, status: &status) else { return status }
    let host = hd.host, V = hd.vocab, d = hd.dModel, N = io.rows
    computeLogits(hd, io)
    (out.pointee.loss, out.pointee.loss_sum, out.pointee.count, out.pointee.correct) = (0, 0, 0, 0)
    let flags = step.pointee.flags
    let saves = flags & VQMOE_STEP_TRAIN != 0 && flags & VQMOE_STEP_NO_GRAD == 0
    let frozen = flags & VQMOE_STEP_FROZEN != 0
    guard let y = io.targets else {
        // No loss: a training forward still saves an (empty) context so backward is a no-op.
        if saves {
            ctxOut.pointee = Unmanaged.passRetained(
                LMContext(host: host, rows: N, vocab: V, dModel: d, count: 0, frozen: frozen)
            ).toOpaque()
        }
        return VQMOE_OK
    }
    guard let count = countTargets(hd, y, rows: N) else { return VQMOE_ERR_INVALID_ARGUMENT }
    var ctx: LMContext?
    if saves {
        let c = LMContext(host: host, rows: N, vocab: V, dModel: d, count: count, frozen: frozen)
        guard c.ok else {
            return fail(host, VQMOE_ERR_OUT_OF_MEMORY, "\(hd.who): cannot allocate the saved context for \(N) rows")
        }
        c.h?.update(from: io.h, count: N * d)
        c.targets?.update(from: y, count: N)
        ctx = c
    }
    if N > 0 {
        // probs is nil unless a context saves them.
        guard let (lossSum, correct) = crossEntropy(hd, io, y, probs: ctx?.probs) else {
            return VQMOE_ERR_OUT_OF_MEMORY
        }
        guard lossSum.isFinite else {
            return fail(
                host, VQMOE_ERR_NUMERIC,
                "\(hd.who): non-finite cross-entropy (\(lossSum)); the logits or h hold NaN/Inf")
        }
        out.pointee.loss_sum = lossSum
        out.pointee.count = Int64(count)
        out.pointee.correct = Int64(correct)
        out.pointee.loss = count > 0 ? Float(lossSum / Double(count)) : 0
    }
    if let ctx { ctxOut.pointee = Unmanaged.passRetained(ctx).toOpaque() }
    return VQMOE_OK
}

/// Backward: accumulate grad_h and (unless frozen) grad_weight / grad_bias.
private func headBackward(
    _ inst: OpaquePointer?, _ ctxRaw: UnsafeMutableRawPointer?,
    _ gin: UnsafePointer<vqmoe_head_grad_in>?, _ gout: UnsafeMutablePointer<vqmoe_head_grad_out>?
) -> Int32 {
    guard let hd = head(inst), let gin, let gout else { return VQMOE_ERR_INVALID_ARGUMENT }
    let host = hd.host
    guard let ctxRaw else {
        return fail(
            host, VQMOE_ERR_STATE, "\(hd.who): backward without a saved context (forward was not a training forward)")
    }
    guard gin.pointee.struct_size >= UInt32(MemoryLayout<vqmoe_head_grad_in>.size),
        gout.pointee.struct_size >= UInt32(MemoryLayout<vqmoe_head_grad_out>.size)
    else {
        return fail(host, VQMOE_ERR_INVALID_ARGUMENT, "\(hd.who): backward got a struct with a too small struct_size")
    }
    let ctx = Unmanaged<LMContext>.fromOpaque(UnsafeRawPointer(ctxRaw)).takeUnretainedValue()
    guard let W = hd.weight else { return fail(host, VQMOE_ERR_STATE, "\(hd.who): backward before bind_buffers") }
    let V = hd.vocab, d = hd.dModel, N = ctx.rows
    let gT = gout.pointee.grad_h
    guard isContiguous32(gT, code: VQMOE_DTYPE_FLOAT), numel(gT) == Int64(N * d) else {
        return fail(
            host, VQMOE_ERR_SHAPE,
            "\(hd.who): grad_h must be contiguous float32 with \(N)x\(d) elements, got \(shapeText(gT))")
    }
    // No targets (or all padded): the loss is the constant 0, nothing to add.
    guard N > 0, ctx.count > 0, let probs = ctx.probs, let hSaved = ctx.h, let y = ctx.targets else { return VQMOE_OK }
    let gradH = gT.data!.assumingMemoryBound(to: Float.self)  // (N,d)

    // dlogits (N,V) = grad_loss / count * (p - onehot(target)); 0 on pad rows.
    guard let dRaw = host.pointee.scratch!(N * V * 4) else {
        return fail(host, VQMOE_ERR_OUT_OF_MEMORY, "\(hd.who): out of scratch memory for dlogits (\(N), \(V))")
    }
    let dl = dRaw.bindMemory(to: Float.self, capacity: N * V)
    let scale = gin.pointee.grad_loss / Float(ctx.count)
    for i in 0..<N {
        let row = dl + i * V
        let t = Int(y[i])
        if t < 0 {
            row.update(repeating: 0, count: V)
            continue
        }
        let p = probs + i * V
        for v in 0..<V { row[v] = scale * p[v] }
        row[t] -= scale
    }

    // grad_h (N,d) += dlogits (N,V) W (V,d).
    host.pointee.sgemm!(
        Int32(VQMOE_NO_TRANS), Int32(VQMOE_NO_TRANS), Int64(N), Int64(d), Int64(V),
        1, dl, Int64(V), W, Int64(d), 1, gradH, Int64(d))
    if ctx.frozen { return VQMOE_OK }
    // grad_W (V,d) += dlogits^T (V,N) h (N,d).
    if let gW = hd.gradWeight {
        host.pointee.sgemm!(
            Int32(VQMOE_TRANS), Int32(VQMOE_NO_TRANS), Int64(V), Int64(d), Int64(N),
            1, dl, Int64(V), hSaved, Int64(d), 1, gW, Int64(d))
    }
    // grad_b (V) += column sums of dlogits, summed in double, rows in order.
    if hd.useBias, let gb = hd.gradBias {
        guard let accRaw = host.pointee.scratch!(V * 8) else {
            return fail(host, VQMOE_ERR_OUT_OF_MEMORY, "\(hd.who): out of scratch memory")
        }
        let acc = accRaw.bindMemory(to: Double.self, capacity: V)
        acc.initialize(repeating: 0, count: V)
        for i in 0..<N {
            let row = dl + i * V
            for v in 0..<V { acc[v] += Double(row[v]) }
        }
        for v in 0..<V { gb[v] += Float(acc[v]) }
    }
    return VQMOE_OK
}

// MARK: - create and buffers

/// create(): check the sizes and read the hyperparameters.
private func createHead(
    _ info: UnsafePointer<vqmoe_create_info>?, _ hp: UnsafePointer<vqmoe_hparams>?,
    _ out: UnsafeMutablePointer<OpaquePointer?>?
) -> Int32 {
    guard let out else { return VQMOE_ERR_INVALID_ARGUMENT }
    out.pointee = nil
    guard let info, let host = info.pointee.host else { return VQMOE_ERR_INVALID_ARGUMENT }
    guard info.pointee.struct_size >= UInt32(MemoryLayout<vqmoe_create_info>.size) else {
        return fail(
            host, VQMOE_ERR_INVALID_ARGUMENT, "lm: create_info struct_size \(info.pointee.struct_size) is too small")
    }
    let name = info.pointee.instance_name.map { String(cString: $0) } ?? "lm"
    let V = info.pointee.vocab_size, d = info.pointee.d_model
    guard V >= 1 else {
        return fail(
            host, VQMOE_ERR_INVALID_ARGUMENT,
            "head 'lm' (\(name)): vocab_size is \(V); an LM head needs the dataset's vocabulary (>= 1)")
    }
    guard d >= 1 else {
        return fail(host, VQMOE_ERR_INVALID_ARGUMENT, "head 'lm' (\(name)): d_model is \(d); it must be >= 1")
    }
    let initStd = vqmoe_hp_float(hp, "init_std", 0.02)
    guard initStd >= 0 && initStd.isFinite else {
        return fail(
            host, VQMOE_ERR_INVALID_ARGUMENT, "head 'lm' (\(name)): init_std \(initStd) must be a finite number >= 0")
    }
    let useBias = vqmoe_hp_bool(hp, "bias", 1) != 0
    let hd = LMHead(host: host, name: name, vocab: Int(V), dModel: Int(d), useBias: useBias, initStd: Float(initStd))
    out.pointee = OpaquePointer(Unmanaged.passRetained(hd).toOpaque())
    return VQMOE_OK
}

/// buffer_spec(): 0 = "weight" (V,d), 1 = "bias" (V) when bias=true.
private func headBufferSpec(
    _ inst: OpaquePointer?, _ i: Int32, _ out: UnsafeMutablePointer<vqmoe_buffer_spec>?
) -> Int32 {
    guard let hd = head(inst), let out else { return VQMOE_ERR_INVALID_ARGUMENT }
    guard out.pointee.struct_size >= UInt32(MemoryLayout<vqmoe_buffer_spec>.size) else {
        return fail(hd.host, VQMOE_ERR_INVALID_ARGUMENT, "\(hd.who): buffer_spec struct_size too small")
    }
    guard i >= 0 && i < hd.bufferCount else {
        return fail(hd.host, VQMOE_ERR_INVALID_ARGUMENT, "\(hd.who): no buffer \(i) (it declares \(hd.bufferCount))")
    }
    out.pointee.role = VQMOE_BUF_PARAM
    out.pointee.dtype = vqmoe_dtype(code: UInt8(VQMOE_DTYPE_FLOAT), bits: 32, lanes: 1)
    if i == 0 {
        out.pointee.name = UnsafePointer(weightName)
        out.pointee.flags = 0
        out.pointee.ndim = 2
        out.pointee.shape = (Int64(hd.vocab), Int64(hd.dModel), 0, 0, 0, 0)
    } else {
        out.pointee.name = UnsafePointer(biasName)
        out.pointee.flags = VQMOE_BUF_NO_DECAY
        out.pointee.ndim = 1
        out.pointee.shape = (Int64(hd.vocab), 0, 0, 0, 0, 0)
    }
    return VQMOE_OK
}

/// Static buffer names (the spec's `name` must outlive the call).
nonisolated(unsafe) let weightName: UnsafeMutablePointer<CChar> = strdup("weight")
nonisolated(unsafe) let biasName: UnsafeMutablePointer<CChar> = strdup("bias")

// MARK: - the descriptor

/// Build one hyperparameter spec with C strings that live for the process.
private func spec(
    _ name: String, _ type: Int32, _ flags: UInt32, _ description: String,
    number: Double = 0, min: Double = 0, max: Double = 0
) -> vqmoe_hparam_spec {
    vqmoe_hparam_spec(
        name: UnsafePointer(strdup(name)), type: type, flags: flags,
        description: UnsafePointer(strdup(description)), default_number: number,
        default_string: nil, min_value: min, max_value: max, choices: nil)
}

/// The descriptor, built once on first use; never freed (the host never unloads plugins).
nonisolated(unsafe) let lmDescriptor: UnsafeMutablePointer<vqmoe_plugin_desc> = {
    let specs: [vqmoe_hparam_spec] = [
        spec(
            "init_std", VQMOE_HP_FLOAT, VQMOE_HP_HAS_MIN, "standard deviation of the N(0, std^2) weight init",
            number: 0.02, min: 0),
        spec("bias", VQMOE_HP_BOOL, 0, "learn an output bias (zero-initialised)", number: 1),
    ]
    let hp = UnsafeMutablePointer<vqmoe_hparam_spec>.allocate(capacity: specs.count)
    hp.initialize(from: specs, count: specs.count)

    let api = UnsafeMutablePointer<vqmoe_head_api>.allocate(capacity: 1)
    api.initialize(
        to: vqmoe_head_api(
            struct_size: UInt32(MemoryLayout<vqmoe_head_api>.size),
            shape: { inst, out in
                guard let hd = head(inst), let out else { return VQMOE_ERR_INVALID_ARGUMENT }
                guard out.pointee.struct_size >= UInt32(MemoryLayout<vqmoe_head_shape>.size) else {
                    return fail(hd.host, VQMOE_ERR_INVALID_ARGUMENT, "\(hd.who): head_shape struct_size too small")
                }
                out.pointee.per_token = 1
                out.pointee.n_out = Int64(hd.vocab)
                out.pointee.is_lm = 1
                return VQMOE_OK
            },
            forward: { inst, step, input, out, ctx in headForward(inst, step, input, out, ctx) },
            backward: { inst, ctx, gin, gout in headBackward(inst, ctx, gin, gout) },
            free_ctx: { _, ctx in
                guard let ctx else { return }
                Unmanaged<LMContext>.fromOpaque(UnsafeRawPointer(ctx)).release()
            }))

    let d = UnsafeMutablePointer<vqmoe_plugin_desc>.allocate(capacity: 1)
    d.initialize(
        to: vqmoe_plugin_desc(
            abi_version: UInt32(VQMOE_ABI_VERSION),
            struct_size: UInt32(MemoryLayout<vqmoe_plugin_desc>.size),
            kind: VQMOE_KIND_HEAD,
            flags: 0,
            name: UnsafePointer(strdup("lm")),
            version: UnsafePointer(strdup("1.0.0")),
            description: UnsafePointer(
                strdup("language-model head: linear layer to the vocabulary, softmax cross-entropy in nats")),
            hparams: UnsafePointer(hp),
            n_hparams: Int32(specs.count),
            create: { info, hp, out in createHead(info, hp, out) },
            destroy: { inst in
                guard let inst else { return }
                Unmanaged<LMHead>.fromOpaque(UnsafeRawPointer(inst)).release()
            },
            num_buffers: { inst in head(inst)?.bufferCount ?? 0 },
            buffer_spec: { inst, i, out in headBufferSpec(inst, i, out) },
            bind_buffers: { inst, bindings, n in
                guard let hd = head(inst) else { return VQMOE_ERR_INVALID_ARGUMENT }
                guard n == hd.bufferCount, let bindings, let w = bindings[0].data else {
                    return fail(
                        hd.host, VQMOE_ERR_INVALID_ARGUMENT,
                        "\(hd.who): bind_buffers expects \(hd.bufferCount) bound buffers, got \(n)")
                }
                hd.weight = w.bindMemory(to: Float.self, capacity: hd.vocab * hd.dModel)
                hd.gradWeight = bindings[0].grad
                if hd.useBias {
                    guard let b = bindings[1].data else {
                        return fail(hd.host, VQMOE_ERR_INVALID_ARGUMENT, "\(hd.who): bias buffer has no memory")
                    }
                    hd.bias = b.bindMemory(to: Float.self, capacity: hd.vocab)
                    hd.gradBias = bindings[1].grad
                }
                return VQMOE_OK
            },
            init_buffers: { inst, seed in
                guard let hd = head(inst) else { return VQMOE_ERR_INVALID_ARGUMENT }
                guard let w = hd.weight else {
                    return fail(hd.host, VQMOE_ERR_STATE, "\(hd.who): init_buffers before bind_buffers")
                }
                // weight ~ N(0, init_std^2) from stream 0 of the given seed; bias = 0.
                var rng = vqmoe_rng(key: 0, counter: 0)
                hd.host.pointee.rng_init!(&rng, seed, 0)
                for i in 0..<(hd.vocab * hd.dModel) { w[i] = hd.host.pointee.rng_normal!(&rng) * hd.initStd }
                hd.bias?.update(repeating: 0, count: hd.vocab)
                return VQMOE_OK
            },
            begin_step: nil,
            get_feature: nil,
            kind_api: UnsafeRawPointer(api),
            hparam_spec_size: UInt32(MemoryLayout<vqmoe_hparam_spec>.stride)))
    return d
}()

/// The plugin entry point: the descriptor of the `lm` head. Refuses hosts of another ABI
/// major.
@_cdecl("vqmoe_plugin_entry")
public func vqmoeEntry(_ host: UnsafePointer<vqmoe_host_api>?) -> UnsafePointer<vqmoe_plugin_desc>? {
    if let host, host.pointee.abi_version >> 16 != UInt32(VQMOE_ABI_VERSION_MAJOR) {
        let msg =
            "lm: built for plugin ABI major \(VQMOE_ABI_VERSION_MAJOR), host has major \(host.pointee.abi_version >> 16)"
        msg.withCString { m in "lm".withCString { n in host.pointee.log?(VQMOE_LOG_ERROR, n, m) } }
        return nil
    }
    return UnsafePointer(lmDescriptor)
}
