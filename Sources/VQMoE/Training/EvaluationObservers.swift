import Foundation

/// What an evaluation observer sees after a validation pass of a routed model: the step, the
/// model (its last forward was the probe batch), the probe's top-1 experts, and the run directory.
public struct EvaluationEvent {
    public let step: Int
    public let model: Transformer
    public let probe: ProbeAssignments
    public let outDir: String
    public let config: RunConfig
}

/// A measurement taken at every evaluation of a routed model (the paper's analyses), kept out of
/// the training step. Observers add their fields to the evaluation's probe record and keep any
/// state they need across evaluations in the run state, so that a resumed run measures the same.
///
/// ```swift
/// final class MyObserver: EvaluationObserver {
///     func observe(_ e: EvaluationEvent, record: inout ProbeRecord) throws { ... }
/// }
/// trainer.observers.append(MyObserver())
/// ```
public protocol EvaluationObserver: AnyObject {
    func observe(_ event: EvaluationEvent, record: inout ProbeRecord) throws
    /// Put the state a resumed run needs into `state`, and take it back.
    func save(into state: inout RunState)
    func restore(from state: RunState)
}

extension EvaluationObserver {
    public func save(into state: inout RunState) {}
    public func restore(from state: RunState) {}
}

/// Routing consistency (the complement of StableMoE's routing fluctuation): per layer and path,
/// the fraction of probe tokens whose top-1 expert is unchanged since the previous evaluation.
///
/// ```swift
/// ConsistencyObserver.consistency([[0, 1, 2]], [[0, 1, 3]])    // [0.667]
/// ```
public final class ConsistencyObserver: EvaluationObserver {
    private var previous: ProbeAssignments?
    public init() {}

    public func observe(_ e: EvaluationEvent, record: inout ProbeRecord) throws {
        if let previous {
            record.consistencyRouter = ConsistencyObserver.consistency(previous.router, e.probe.router)
            record.consistencyDiscrete = ConsistencyObserver.consistency(previous.discrete, e.probe.discrete)
        }
        previous = e.probe
    }

    public func save(into state: inout RunState) { state.probe = previous }
    public func restore(from state: RunState) { previous = state.probe }

    /// Fraction of positions whose value is unchanged, per layer.
    public static func consistency(_ a: [[Int32]], _ b: [[Int32]]) -> [Double] {
        zip(a, b).map { x, y in Double(zip(x, y).filter { $0 == $1 }.count) / Double(max(x.count, 1)) }
    }
}

/// How far the routing parameters moved since the previous evaluation, per layer:
/// ‖now − before‖ / ‖before‖ of the router's parameters and of the quantizer's float buffers
/// (the codebook, learned or EMA).
public final class MovementObserver: EvaluationObserver {
    private var previous: [String: [[Float]]]?
    public init() {}

    public func observe(_ e: EvaluationEvent, record: inout ProbeRecord) throws {
        let now = MovementObserver.snapshot(e.model)
        if let previous {
            func move(_ key: String) -> [Double]? {
                guard let before = previous[key], let after = now[key] else { return nil }
                return zip(before, after).map { MovementObserver.relativeChange($0, $1) }
            }
            record.movementRouter = move("router")
            record.movementCodebook = move("codebook")
        }
        previous = now
    }

    public func save(into state: inout RunState) { state.routing = previous }
    public func restore(from state: RunState) { previous = state.routing }

    /// "router" (all router plugin parameters) and "codebook" (all float buffers of the
    /// quantizer), flattened per layer; a key only when every layer has some.
    static func snapshot(_ model: Transformer) -> [String: [[Float]]] {
        func flat(_ buffers: [HostBuffer]) -> [Float] {
            buffers.flatMap { Array(UnsafeBufferPointer(start: $0.floats, count: $0.count)) }
        }
        let routers = model.layers.compactMap { $0.router.map { flat($0.core.parameters) } }
        let codebooks = model.layers.compactMap {
            $0.quantizer.map { flat($0.core.buffers.filter { $0.dtype.code == 2 }) }
        }
        var out: [String: [[Float]]] = [:]
        if !routers.isEmpty && routers.allSatisfy({ !$0.isEmpty }) { out["router"] = routers }
        if !codebooks.isEmpty && codebooks.allSatisfy({ !$0.isEmpty }) { out["codebook"] = codebooks }
        return out
    }

    /// ‖now − before‖ / ‖before‖.
    public static func relativeChange(_ before: [Float], _ now: [Float]) -> Double {
        var d = 0.0, b = 0.0
        for (x, y) in zip(before, now) {
            d += Double(y - x) * Double(y - x)
            b += Double(x) * Double(x)
        }
        return b > 0 ? (d / b).squareRoot() : 0
    }
}

/// The MoE-layer inputs of (up to 256) probe tokens per layer with their top-1 experts, for the
/// representation-collapse PCA of `vqmoe report`: `OUT/repr/step_<S>.json`.
public final class RepresentationObserver: EvaluationObserver {
    public init() {}

    struct Layer: Codable {
        var x: [[Float]]
        var expert: [Int32]
        var codeExpert: [Int32]
        enum CodingKeys: String, CodingKey { case x, expert, codeExpert = "code_expert" }
    }

    struct Dump: Codable {
        var step: Int
        var layers: [Layer]
    }

    public func observe(_ e: EvaluationEvent, record: inout ProbeRecord) throws {
        let keep = min(256, e.model.lastForwardTokens), d = e.model.config.dModel, p = e.probe
        var layers: [Layer] = []
        for l in 0..<e.model.layers.count {
            guard let x = e.model.moeInput(layer: l) else { continue }
            let experts = l < p.router.count ? p.router[l] : (l < p.discrete.count ? p.discrete[l] : [])
            layers.append(
                Layer(
                    x: (0..<keep).map { t in Array(UnsafeBufferPointer(start: x + t * d, count: d)) },
                    expert: Array(experts.prefix(keep)),
                    codeExpert: l < p.discrete.count ? Array(p.discrete[l].prefix(keep)) : []))
        }
        try FileManager.default.createDirectory(atPath: "\(e.outDir)/repr", withIntermediateDirectories: true)
        try Checkpoint.atomicWrite(
            try JSONEncoder().encode(Dump(step: e.step, layers: layers)), to: "\(e.outDir)/repr/step_\(e.step).json")
    }
}
