import Foundation

/// Transformer-XL segment memory (Dai et al. 2019, §3.2): for every layer, the hidden states
/// that entered it in the last `capacity` positions of the previous segments, (B, M, C). No
/// gradient flows into them (sg(·) in the paper); the next segment's keys and values are
/// computed over [memory; segment].
///
/// Training and evaluation keep separate memories, so an evaluation in the middle of
/// training leaves the training stream's memory as it was. The training memory is part of
/// the resumable checkpoint.
///
/// ```swift
/// let mem = SegmentMemory(layers: 4, capacity: 128, width: 256)
/// mem.prepare(batch: 16)        // a new batch size empties it
/// mem.reset()                   // start of an evaluation pass
/// ```
public final class SegmentMemory: @unchecked Sendable {
    public let layers: Int, capacity: Int, width: Int
    public private(set) var batch = 0
    /// Valid rows per stream (the same for every layer): 0 at the start, then min(M, seen).
    public internal(set) var length: Int {
        get { Int(lengthCell.pointee) }
        set { lengthCell.pointee = Int32(newValue) }
    }
    /// `length` as the int32 the checkpoint stores.
    let lengthCell = UnsafeMutablePointer<Int32>.allocate(capacity: 1)
    var data: [UnsafeMutablePointer<Float>] = []

    public init(layers: Int, capacity: Int, width: Int) {
        self.layers = layers; self.capacity = capacity; self.width = width
        lengthCell.initialize(to: 0)
    }

    deinit {
        data.forEach { $0.deallocate() }
        lengthCell.deallocate()
    }

    /// Allocate for `batch` streams; a batch size other than the current one empties the memory.
    public func prepare(batch b: Int) {
        guard b != batch else { return }
        data.forEach { $0.deallocate() }
        data = (0..<layers).map { _ in
            let p = UnsafeMutablePointer<Float>.allocate(capacity: max(b * capacity * width, 1))
            p.initialize(repeating: 0, count: max(b * capacity * width, 1))
            return p
        }
        batch = b
        length = 0
    }

    public func reset() { length = 0 }

    /// Layer l's memory, (B, M, C); rows 0..<length of each stream are valid.
    public func layer(_ l: Int) -> UnsafeMutablePointer<Float> { data[l] }

    /// cat (B, length + T, C) = [memory; x]; x (B, T, C).
    func concat(_ l: Int, x: UnsafePointer<Float>, t: Int, into cat: UnsafeMutablePointer<Float>) {
        let c = width, m = length, k = m + t
        for bi in 0..<batch {
            (cat + bi * k * c).update(from: data[l] + bi * capacity * c, count: m * c)
            (cat + (bi * k + m) * c).update(from: x + bi * t * c, count: t * c)
        }
    }

    /// Keep the last min(M, length + T) rows of cat (B, length + T, C) as layer l's memory.
    /// Call for every layer, then `advance(t:)`.
    func store(_ l: Int, cat: UnsafePointer<Float>, t: Int) {
        let c = width, k = length + t, keep = min(capacity, k)
        for bi in 0..<batch {
            (data[l] + bi * capacity * c).update(from: cat + (bi * k + k - keep) * c, count: keep * c)
        }
    }

    func advance(t: Int) { length = min(capacity, length + t) }
}

/// Transformer-XL attention sublayer of the `Transformer` (backbone "transformer_xl"):
/// pre-LN over [memory; segment], fused qkv, relative positional attention
/// (`RelativeAttention`, learned u, v per layer, positions projected by W_r per layer), output
/// projection as in the Transformer. There is no absolute position embedding.
extension Transformer {
    /// Keys per query block this forward: memory rows + segment rows.
    var xlKeys: Int { xlMemoryUsed + t }

    /// The memory of the current mode (training or evaluation).
    func xlMemory(train: Bool) -> SegmentMemory? { train ? trainMemory : evalMemory }

    /// Forget the evaluation memory (the start of an ordered evaluation pass).
    public func resetEvalMemory() { evalMemory?.reset() }

    /// Forget the training memory.
    public func resetTrainMemory() { trainMemory?.reset() }

    /// Before the layers: fix the memory length of this forward and the projected relative
    /// encodings' sinusoid table (K, C) shared by every layer.
    func xlBegin(batch: Int, train: Bool) {
        let memory = xlMemory(train: train)
        memory?.prepare(batch: batch)
        xlMemoryUsed = memory?.length ?? 0
        if xlTableKeys != xlKeys {   // the table depends on K only: K = T at a stream's start, then M + T
            RelativeAttention.positions(out: ws.floats("xl.table", xlKeys * config.dModel), keys: xlKeys, c: config.dModel)
            xlTableKeys = xlKeys
        }
    }

    /// After the layers: the memory moves on by one segment.
    func xlEnd(train: Bool) { xlMemory(train: train)?.advance(t: t) }

    /// atty (B,T,C) = relative attention of layer l's input x (B,T,C) over [memory; x].
    func xlAttentionForward(_ l: Int, x: UnsafePointer<Float>, atty: UnsafeMutablePointer<Float>, batch: Int, train: Bool) {
        let c = config.dModel, h = config.nHead, k = xlKeys, nk = batch * k
        let cat = act("xl.cat", l, nk * c)
        if let memory = xlMemory(train: train) {
            memory.concat(l, x: x, t: t, into: cat)
            memory.store(l, cat: cat, t: t)
        } else {
            cat.update(from: x, count: nk * c)
        }
        let ln1 = act("ln1", l, nk * c), m1 = act("ln1m", l, nk), r1 = act("ln1r", l, nk)
        LayerNorm.forward(out: ln1, mean: m1, rstd: r1, inp: cat, weight: ln1w[l].data, bias: ln1b[l].data, n: nk, c: c)
        let qkv = act("qkv", l, nk * 3 * c)
        Linear.forward(out: qkv, inp: ln1, weight: qkvw[l].data, bias: qkvb[l].data, n: nk, inFeatures: c, outFeatures: 3 * c)
        let r = act("xl.r", l, k * c)
        Linear.forward(out: r, inp: ws.floats("xl.table", k * c), weight: relw[l].data, bias: nil, n: k, inFeatures: c, outFeatures: c)
        RelativeAttention.forward(y: atty, att: act("att", l, batch * h * t * k), qkv: qkv, r: r, u: relu[l].data, v: relv[l].data,
                                  b: batch, t: t, mem: xlMemoryUsed, c: c, heads: h)
    }

    /// Given datty (B,T,C), accumulate layer l's attention parameter gradients and add the
    /// gradient of its input x to dx (the memory rows get none).
    func xlAttentionBackward(_ l: Int, datty: UnsafePointer<Float>, dx: UnsafeMutablePointer<Float>) {
        let c = config.dModel, h = config.nHead, k = xlKeys, nk = b * k, m = xlMemoryUsed
        let dqkv = ws.zeros("xl.dqkv", nk * 3 * c), dr = ws.zeros("xl.dr", k * c)
        let scratch = ws.floats("xl.scratch", RelativeAttention.scratchCount(b: b, t: t, mem: m, c: c, heads: h))
        RelativeAttention.backward(dqkv: dqkv, dr: dr, du: relu[l].grad, dv: relv[l].grad, dy: datty, qkv: act("qkv", l, nk * 3 * c),
                                   r: act("xl.r", l, k * c), u: relu[l].data, v: relv[l].data, att: act("att", l, b * h * t * k),
                                   b: b, t: t, mem: m, c: c, heads: h, scratch: scratch)
        Linear.backward(dinp: nil, dweight: relw[l].grad, dbias: nil, dout: dr, inp: ws.floats("xl.table", k * c), weight: relw[l].data,
                        n: k, inFeatures: c, outFeatures: c)
        let dln = ws.zeros("xl.dln", nk * c)
        Linear.backward(dinp: dln, dweight: qkvw[l].grad, dbias: qkvb[l].grad, dout: dqkv, inp: act("ln1", l, nk * c),
                        weight: qkvw[l].data, n: nk, inFeatures: c, outFeatures: 3 * c)
        let dcat = ws.zeros("xl.dcat", nk * c)
        LayerNorm.backward(dinp: dcat, dweight: ln1w[l].grad, dbias: ln1b[l].grad, dout: dln, inp: act("xl.cat", l, nk * c),
                           weight: ln1w[l].data, mean: act("ln1m", l, nk), rstd: act("ln1r", l, nk), n: nk, c: c)
        for bi in 0..<b { Vec.add(dx + bi * t * c, dcat + (bi * k + m) * c, t * c) }   // the segment rows only
    }

    /// Analytic forward FLOPs per token of one relative attention sublayer (matmuls): qkv and
    /// output projections, (Q+u)Kᵀ, (Q+v)rᵀ and PV at the average visible length M + (T+1)/2,
    /// and W_r over the K position rows shared by the batch.
    func xlAttentionFlopsPerToken(batch: Int) -> Double {
        let c = Double(config.dModel), t = Double(config.seqLen), m = Double(config.memLen)
        return 2 * 4 * c * c + 3 * 2 * (m + (t + 1) / 2) * c + 2 * (m + t) * c * c / (Double(batch) * t)
    }

    /// The training memory as checkpoint tensors (resume continues the stream exactly).
    func memoryTensors() -> [Checkpoint.Tensor] {
        guard let memory = trainMemory, memory.batch > 0 else { return [] }
        var out = (0..<memory.layers).map { l in
            Checkpoint.Tensor(name: "memory.layers.\(l)", dtype: "F32", shape: [memory.batch, memory.capacity, memory.width],
                              bytes: UnsafeRawBufferPointer(start: memory.layer(l), count: memory.batch * memory.capacity * memory.width * 4))
        }
        out.append(Checkpoint.Tensor(name: "memory.length", dtype: "I32", shape: [1], bytes: UnsafeRawBufferPointer(start: memory.lengthCell, count: 4)))
        return out
    }

    /// Restore the training memory from a resumable checkpoint (absent: it starts empty).
    func loadMemory(_ ck: Checkpoint.Loaded, path: String) throws {
        guard let memory = trainMemory else { return }
        guard let len = ck.tensors["memory.length"], let first = ck.tensors["memory.layers.0"], first.shape.count == 3 else {
            memory.reset()
            return
        }
        memory.prepare(batch: first.shape[0])
        for l in 0..<memory.layers {
            guard let tensor = ck.tensors["memory.layers.\(l)"], tensor.shape == [memory.batch, memory.capacity, memory.width] else {
                throw VQMoEError(.checkpoint, "\(path): tensor 'memory.layers.\(l)' is missing or not (\(memory.batch), \(memory.capacity), \(memory.width))")
            }
            tensor.data.withUnsafeBytes { _ = memcpy(memory.layer(l), $0.baseAddress!, tensor.data.count) }
        }
        memory.length = len.data.withUnsafeBytes { Int($0.load(as: Int32.self)) }
        guard memory.length >= 0 && memory.length <= memory.capacity else {
            throw VQMoEError(.checkpoint, "\(path): memory.length \(memory.length) is outside 0...\(memory.capacity)")
        }
    }
}
