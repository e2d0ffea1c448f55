// my_router -- a vqmoe router plugin in Swift: a linear top-1 router. `vqmoe plugin new router
// NAME --lang swift` copies this folder with your NAME; it builds (./build.sh) and passes
// `vqmoe plugins check` as it is. Put your method where it says ">>> YOUR METHOD".
//
//   logits = x W^T (W (E,d) "weight" ~ N(0, init_std^2)),  p = softmax(logits)
//   expert = argmax_e p_e (ties -> lowest e),  weight = p_expert (the router learns through the
//   expert output it scales),  aux = 0,  load = tokens per expert
//   backward: dp_c/dlogit_j = p_c (delta_cj - p_j), then grad_x += G W, grad_W += G^T x
//
// PluginKit declares the schema and buffers from the data below, checks every argument, keeps
// contexts and turns thrown PluginFailures into status codes. The ABI's rules still hold:
// gradients ACCUMULATE (+=), everything that changes results lives in declared buffers.
import Glibc
import PluginKit

final class MyRouter: RouterPlugin {
    static let name = "my_router", version = "1.0.0"
    static let summary = "linear top-1 router, weight = softmax probability (template)"
    static let hyperparameters: [Hyper] = [
        .float("init_std", 0.02, min: 0, "standard deviation of the initial router weights")
        // >>> YOUR METHOD: your hyperparameters (name, default, range, doc); the host validates them.
    ]

    let host: Host
    let d: Int, e: Int, initStd: Float
    var weight: UnsafeMutablePointer<Float>!, weightGrad: UnsafeMutablePointer<Float>?

    init(_ model: ModelInfo, _ hp: HyperValues) throws(PluginFailure) {
        (host, d, e, initStd) = (model.host, model.dModel, model.nExperts, hp.float("init_std"))
        guard d >= 1, e >= 1 else { throw .invalid("needs d_model >= 1 and n_experts >= 1") }
    }

    /// weight (E,d). >>> YOUR METHOD: more buffers (expert embeddings, a temperature, state...).
    var buffers: [BufferDecl] { [.param("weight", [e, d])] }

    func bind(_ b: BoundBuffers) throws(PluginFailure) {
        (weight, weightGrad) = (try b.floats("weight"), b.grad("weight"))
    }

    /// W ~ N(0, init_std^2) from the host stream (seed, 0).
    func initBuffers(seed: UInt64) throws(PluginFailure) {
        var r = host.rng(seed: seed, stream: 0)
        for i in 0..<(e * d) { weight[i] = initStd * host.normal(&r) }
    }

    /// >>> YOUR METHOD: top-k, a k schedule from step.step, or .dense(slotsPerExpert:).
    func shape(_ step: Step) throws(PluginFailure) -> RouterShape { .topK(1) }

    /// What the backward needs: x (valid until the backward returns), p (N,E) and the choices.
    struct Saved { let x: UnsafePointer<Float>, probs: [Float], expert: [Int] }

    func forward(_ step: Step, _ io: RouterForward) throws(PluginFailure) -> (aux: Float, context: Any?) {
        let n = io.n
        var p = [Float](repeating: 0, count: n * e), expert = [Int](repeating: 0, count: n)
        // >>> YOUR METHOD: your scores (cosine, hashing, token ids...) and selection.
        p.withUnsafeMutableBufferPointer { host.matmul(n, e, d, io.x, weight, $0.baseAddress!, tb: true) }
        io.load.update(repeating: 0, count: e)
        for t in 0..<n {
            let row = t * e
            var best = 0
            for j in 1..<e where p[row + j] > p[row + best] { best = j }  // ties -> the lowest e
            let top = p[row + best]
            var sum: Float = 0
            for j in 0..<e { p[row + j] = exp(p[row + j] - top); sum += p[row + j] }
            for j in 0..<e { p[row + j] /= sum }
            (expert[t], io.index![t], io.weights![t]) = (best, Int32(best), p[row + best])
            io.load[best] += 1
        }
        return (0, Saved(x: io.x, probs: p, expert: expert))  // >>> YOUR METHOD: a weighted balance loss
    }

    func backward(_ context: Any, _ g: RouterBackward) throws(PluginFailure) {
        let s = context as! Saved, n = g.n
        guard let gw = g.gradWeights, n > 0 else { return }  // absent = zero, and aux is 0
        let dlogits = try host.scratchFloats(n * e, "router logit gradients")  // (N,E)
        for t in 0..<n {
            let c = s.expert[t], pc = s.probs[t * e + c]
            for j in 0..<e { dlogits[t * e + j] = gw[t] * pc * ((j == c ? 1 : 0) - s.probs[t * e + j]) }
        }
        host.matmul(n, d, e, dlogits, weight, g.gradX, beta: 1)  // grad_x (N,d) += G W
        if !g.frozen, let gW = weightGrad { host.matmul(e, d, n, dlogits, s.x, gW, ta: true, beta: 1) }  // += G^T x
    }
}

@_cdecl("vqmoe_plugin_entry")
public func vqmoePluginEntry(_ host: UnsafePointer<vqmoe_host_api>?) -> UnsafePointer<vqmoe_plugin_desc>? {
    pluginEntry(MyRouter.self, host)
}
