// One stablemoe router instance: its model facts, hyperparameters and the host buffers it
// declared (expert_embeddings (E,d); with distill also distilled_embedding (V,D_dist),
// distilled_centroids (E,D_dist) and the frozen stage-2 table stage2_assignment (V)).
import PluginKit
import VQMoEABI

/// Names of the declared buffers (static storage, as `vqmoe_buffer_spec.name` requires).
nonisolated(unsafe) let expertEmbeddingsName = staticCString("expert_embeddings")
nonisolated(unsafe) let distilledEmbeddingName = staticCString("distilled_embedding")
nonisolated(unsafe) let distilledCentroidsName = staticCString("distilled_centroids")
nonisolated(unsafe) let stage2AssignmentName = staticCString("stage2_assignment")

/// Routing statistics of the last forward, kept for `vqmoe.metrics/1` only (they never
/// change results, so they need not live in a declared buffer).
struct RoutingStats {
    /// 1 or 2.
    var stage: Int
    /// Fraction of tokens whose distilled decision equals the centroid router's argmax
    /// (nil with distill = false or an empty batch).
    var distillAccuracy: Double?
    /// Whether these come from a training forward (those win over eval forwards).
    var fromTraining: Bool
}

/// StableMoE (Dai et al. 2022): a top-1 router on l2-normalised expert centroids with a
/// sigmoid gate, and a distilled token-id router that takes over (frozen) in stage 2.
final class StableMoERouter {
    let host: Host
    let config: StableMoEConfig
    /// d: input width.
    let dModel: Int
    /// E: number of experts.
    let nExperts: Int
    /// V: token-id range of the distilled router (0 with distill = false).
    let vocabSize: Int
    /// D_dist.
    var distillDim: Int { config.distillDim }

    /// (E,d) expert centroids e_e and their gradient.
    private(set) var expertEmbeddings: UnsafeMutablePointer<Float>?
    private(set) var expertEmbeddingsGrad: UnsafeMutablePointer<Float>?
    /// (V,D_dist) distilled word embeddings and their gradient.
    private(set) var distilledEmbedding: UnsafeMutablePointer<Float>?
    private(set) var distilledEmbeddingGrad: UnsafeMutablePointer<Float>?
    /// (E,D_dist) distilled centroids and their gradient.
    private(set) var distilledCentroids: UnsafeMutablePointer<Float>?
    private(set) var distilledCentroidsGrad: UnsafeMutablePointer<Float>?
    /// (V) int32 STATE: the distilled router's expert per token id, frozen at the first
    /// stage-2 training forward; -1 everywhere until then.
    private(set) var stage2Assignment: UnsafeMutablePointer<Int32>?

    var stats: RoutingStats?

    init(info: UnsafePointer<vqmoe_create_info>?, hp: UnsafePointer<vqmoe_hparams>?) throws(PluginFailure) {
        guard let info else { throw .invalid("create_info is NULL") }
        try requireSize(info.pointee.struct_size, vqmoe_create_info.self, "create_info")
        host = try Host.checked(info.pointee.host)
        let i = info.pointee
        guard i.d_model >= 1 else { throw .invalid("d_model = \(i.d_model): the router needs d_model >= 1") }
        guard i.n_experts >= 1 else { throw .invalid("n_experts = \(i.n_experts): the router needs n_experts >= 1") }
        dModel = Int(i.d_model)
        nExperts = Int(i.n_experts)
        config = try StableMoEConfig(hp)
        if config.distill {
            guard i.vocab_size >= 1 else {
                throw .invalid(
                    "stablemoe's distilled router maps token ids to experts and needs create_info.vocab_size >= 1 "
                        + "(the token-id range), got \(i.vocab_size); give the model a vocabulary or set distill = false "
                        + "(the reference behaviour: stage 1 forever, no distilled router)")
            }
            vocabSize = Int(i.vocab_size)
        } else {
            vocabSize = 0
        }
    }

    var bufferCount: Int { config.distill ? 4 : 1 }

    /// 0: "expert_embeddings" (E,d) PARAM; with distill 1: "distilled_embedding" (V,D_dist)
    /// PARAM, 2: "distilled_centroids" (E,D_dist) PARAM (both no weight decay, so a frozen
    /// router does not shrink), 3: "stage2_assignment" (V) int32 STATE.
    func bufferSpec(_ i: Int, _ out: UnsafeMutablePointer<vqmoe_buffer_spec>?) throws(PluginFailure) {
        guard let out else { throw .invalid("buffer_spec: out is NULL") }
        guard i >= 0 && i < bufferCount else { throw .invalid("buffer index \(i) outside [0, \(bufferCount))") }
        var s = vqmoe_buffer_spec()
        s.struct_size = UInt32(MemoryLayout<vqmoe_buffer_spec>.size)
        s.role = VQMOE_BUF_PARAM
        s.dtype = vqmoe_f32()
        s.ndim = 2
        switch i {
        case 0:
            s.name = expertEmbeddingsName
            s.shape = (Int64(nExperts), Int64(dModel), 0, 0, 0, 0)
        case 1:
            s.name = distilledEmbeddingName
            s.flags = VQMOE_BUF_NO_DECAY
            s.shape = (Int64(vocabSize), Int64(distillDim), 0, 0, 0, 0)
        case 2:
            s.name = distilledCentroidsName
            s.flags = VQMOE_BUF_NO_DECAY
            s.shape = (Int64(nExperts), Int64(distillDim), 0, 0, 0, 0)
        default:
            s.name = stage2AssignmentName
            s.role = VQMOE_BUF_STATE
            s.dtype = vqmoe_i32()
            s.ndim = 1
            s.shape = (Int64(vocabSize), 0, 0, 0, 0, 0)
        }
        out.pointee = s
    }

    func bind(_ bindings: UnsafePointer<vqmoe_buffer_binding>?, _ n: Int) throws(PluginFailure) {
        guard n == bufferCount else {
            throw .invalid("bind_buffers got \(n) bindings, the router declared \(bufferCount)")
        }
        guard let bindings else { throw .invalid("bind_buffers: bindings is NULL") }
        guard let e = bindings[0].data else { throw .invalid("bind_buffers: 'expert_embeddings' has no data") }
        expertEmbeddings = e.assumingMemoryBound(to: Float.self)
        expertEmbeddingsGrad = bindings[0].grad
        if config.distill {
            guard let emb = bindings[1].data, let cen = bindings[2].data, let table = bindings[3].data else {
                throw .invalid(
                    "bind_buffers: 'distilled_embedding', 'distilled_centroids' or 'stage2_assignment' has no data")
            }
            distilledEmbedding = emb.assumingMemoryBound(to: Float.self)
            distilledEmbeddingGrad = bindings[1].grad
            distilledCentroids = cen.assumingMemoryBound(to: Float.self)
            distilledCentroidsGrad = bindings[2].grad
            stage2Assignment = table.assumingMemoryBound(to: Int32.self)
        }
    }

    /// The bound expert embeddings, or a STATE error before bind_buffers.
    func boundEmbeddings() throws(PluginFailure) -> UnsafeMutablePointer<Float> {
        guard let expertEmbeddings else { throw .state("called before bind_buffers") }
        return expertEmbeddings
    }

    /// From the host stream (seed, 0), in buffer order: expert centroids ~ N(0, 1/d) (rows of
    /// about unit norm: the scores only see their direction, and a unit scale keeps an
    /// optimizer step small against it), the distilled embedding and centroids
    /// ~ N(0, init_std^2); stage2_assignment = -1 (not frozen yet).
    func initBuffers(seed: UInt64) throws(PluginFailure) {
        let e = try boundEmbeddings()
        var r = host.rng(seed: seed, stream: 0)
        let std = 1 / Float(dModel).squareRoot()
        for i in 0..<(nExperts * dModel) { e[i] = std * host.normal(&r) }
        if let emb = distilledEmbedding, let cen = distilledCentroids, let table = stage2Assignment {
            for i in 0..<(vocabSize * distillDim) { emb[i] = config.initStd * host.normal(&r) }
            for i in 0..<(nExperts * distillDim) { cen[i] = config.initStd * host.normal(&r) }
            table.update(repeating: -1, count: vocabSize)
        }
        stats = nil
    }

    /// Whether the stage-2 table has been frozen (it is filled all at once).
    var stage2Frozen: Bool { stage2Assignment.map { vocabSize > 0 && $0[0] >= 0 } ?? false }
}
