import Foundation

/// What a training step does differently when several ranks share each global batch (data
/// parallelism): every rank reads batch i whole and computes on its rows (`RowShare`), the loss
/// parts are summed over the ranks into the global batch's, each rank's losses get their share
/// of the gradient (`LossScale`), the gradients are summed (`GradientSync`), and every rank then
/// takes the same optimizer step, so the replicas stay equal.
extension Trainer {
    /// Every rank runs the same resolved config, and the global batch gives every rank a row.
    static func checkRanks(_ config: RunConfig, _ comm: Comm) throws {
        guard comm.isDistributed else { return }
        let json = try JSONSerialization.data(withJSONObject: config.json, options: [.sortedKeys])
        var all = [UInt8](repeating: 0, count: 32 * comm.size)
        try comm.allgatherEqual(SHA256.digest([UInt8](json)), into: &all)
        if let r = (1..<comm.size).first(where: { all[($0 * 32)..<($0 * 32 + 32)] != all[0..<32] }) {
            throw VQMoEError(
                .config,
                "the resolved config of rank \(r) differs from rank 0's (a --set, a config file or an environment "
                    + "variable given to some ranks only?): every rank of a run must train the same model")
        }
        guard config.train.batchSize >= comm.size else {
            throw VQMoEError(
                .config,
                "train.batch_size = \(config.train.batchSize) is smaller than the \(comm.size) ranks: the global batch "
                    + "is split over the ranks by rows, so each needs at least one")
        }
    }

    /// Sum the loss parts of every rank into the global batch's (in place), and return this
    /// rank's share of the loss: its targets' part of the task mean, and its tokens' part for
    /// plugin losses that are means over one rank's tokens. A plugin with
    /// VQMOE_PLUGIN_GLOBAL_BATCH reports the global value on every rank (its share is 1).
    func reduce(_ parts: inout LossParts, share: RowShare) throws -> LossScale {
        guard comm.isDistributed else { return LossScale() }
        let w = Double(share.fraction), n = Double(comm.size), localCount = parts.count
        func part(_ v: Float, global: Bool) -> Double { global ? Double(v) / n : w * Double(v) }
        var v: [Double] = [parts.lossSum, Double(parts.count), Double(parts.correct)]
        for (l, layer) in model.layers.enumerated() {
            let s = parts.layers[l]
            let r = layer.router?.core.library.computesGlobalBatch ?? true
            let q = layer.quantizer?.core.library.computesGlobalBatch ?? true
            v += [part(s.aux, global: r), part(s.vq, global: q), part(s.vqWeighted, global: q)]
            v += s.expertLoad.map(Double.init) + s.codeCounts.map(Double.init)
        }
        try comm.allreduce(&v)
        (parts.lossSum, parts.count, parts.correct) = (v[0], Int(v[1].rounded()), Int(v[2].rounded()))
        parts.task = parts.count > 0 ? Float(parts.lossSum / Double(parts.count)) : 0
        (parts.aux, parts.vq, parts.vqWeighted) = (0, 0, 0)
        var i = 3
        for l in parts.layers.indices {
            (parts.layers[l].aux, parts.layers[l].vq, parts.layers[l].vqWeighted) = (
                Float(v[i]), Float(v[i + 1]), Float(v[i + 2])
            )
            i += 3
            parts.aux += parts.layers[l].aux
            parts.vq += parts.layers[l].vq
            parts.vqWeighted += parts.layers[l].vqWeighted
            let e = parts.layers[l].expertLoad.count, c = parts.layers[l].codeCounts.count
            parts.layers[l].expertLoad = v[i..<(i + e)].map(Float.init)
            parts.layers[l].codeCounts = v[(i + e)..<(i + e + c)].map(Float.init)
            i += e + c
        }
        return LossScale(task: parts.count > 0 ? Float(localCount) / Float(parts.count) : 0, localShare: Float(w))
    }

    /// A plugin that keeps state without VQMOE_PLUGIN_GLOBAL_BATCH updated it from this rank's
    /// rows only: rank 0's state wins, so the replicas (and a checkpoint) stay one model.
    func keepLocalStatesInStep() throws {
        guard comm.isDistributed else { return }
        for layer in model.layers {
            for core in [layer.router?.core, layer.quantizer?.core].compactMap({ $0 })
            where !core.library.computesGlobalBatch {
                for s in core.states { try comm.broadcast(s.data, bytes: s.byteCount) }
            }
        }
    }
}

extension Trainer {
    /// Clip to `train.grad_clip` by the global gradient norm and return the norm. With expert
    /// parallelism the sharded experts' squared norms are summed over the ranks (every rank then
    /// has the whole model's norm and scales alike).
    func clipGlobalNorm() throws -> Float {
        let params = optimizer.parameters
        guard comm.isDistributed, params.contains(where: { $0.shard != nil }) else {
            return clipGradients(params, maxNorm: config.train.gradClip)
        }
        var sums = [0.0, 0.0]  // replicated (equal on every rank), this rank's shards
        for p in params where !p.frozen { sums[p.shard == nil ? 0 : 1] += Double(Vec.dot(p.grad, p.grad, p.count)) }
        var sharded = [sums[1]]
        try comm.allreduce(&sharded)
        let norm = Float((sums[0] + sharded[0]).squareRoot()), maxNorm = config.train.gradClip
        if maxNorm > 0 && norm > maxNorm {
            let s = maxNorm / (norm + 1e-6)
            for p in params where !p.frozen { Vec.scale(p.grad, s, p.count) }
        }
        return norm
    }

    /// OUT/gradients_step<N>.safetensors: every trainable parameter's gradient (rank 0 writes the
    /// whole tensors; expert shards gathered).
    func dumpGradients(_ step: Int) throws {
        let tensors = optimizer.parameters.map {
            Checkpoint.Tensor(
                name: $0.name, dtype: "F32", shape: $0.shape,
                bytes: UnsafeRawBufferPointer(start: $0.grad, count: $0.count * 4), shard: $0.shard)
        }
        let (whole, gathered) = try gatherShards(tensors)
        defer { gathered.forEach { $0.deallocate() } }
        guard comm.isRoot else { return }
        try Checkpoint.write(
            path: "\(outDir)/gradients_step\(step).safetensors", tensors: whole, metadata: ["step": String(step)])
    }

    /// The checkpoint tensors with every expert-parallel shard replaced, on rank 0, by the whole
    /// tensor gathered from the ranks (rank order is expert order), so the file is the one a
    /// single process writes. Returns the gathered buffers, which the caller frees after writing.
    func gatherShards(_ tensors: [Checkpoint.Tensor]) throws -> ([Checkpoint.Tensor], [UnsafeMutableRawBufferPointer]) {
        guard comm.isDistributed else { return (tensors, []) }
        var out = tensors, owned: [UnsafeMutableRawBufferPointer] = []
        for (i, t) in tensors.enumerated() {
            guard let shard = t.shard else { continue }
            let (all, _) = try comm.allgather(t.bytes)
            guard comm.isRoot else { continue }
            let buf = UnsafeMutableRawBufferPointer.allocate(byteCount: max(all.count, 1), alignment: 64)
            all.withUnsafeBytes { buf.baseAddress!.copyMemory(from: $0.baseAddress!, byteCount: all.count) }
            owned.append(buf)
            out[i].bytes = UnsafeRawBufferPointer(rebasing: buf[0..<all.count])
            out[i].shape[0] = shard.global
            out[i].shard = nil
        }
        return (out, owned)
    }
}

extension Comm {
    /// Every rank's values in rank order (rank r's rows of a batch follow rank r − 1's).
    public func allgatherRows(_ mine: [Int32]) throws -> [Int32] {
        guard isDistributed else { return mine }
        let (bytes, _) = try mine.withUnsafeBytes { try allgather($0) }
        return bytes.withUnsafeBytes { Array($0.bindMemory(to: Int32.self)) }
    }
}
