import Foundation

/// What a path's forward sees: the layer input, its grouping, the step, and the layer's experts
/// (for paths that run them themselves, e.g. SoftMoE's dense dispatch).
public struct PathInput {
    /// x (N,d), N = groups·groupSize; valid until the layer's backward.
    public var x: UnsafePointer<Float>
    public var groups: Int, groupSize: Int
    public var tokenIDs: UnsafePointer<Int32>?
    public var step: StepInfo
    public var experts: ExpertSet
    public var scratch: MoEScratch
    public var n: Int { groups * groupSize }
}

/// What a path's backward gets: dL/d raw weight of its assignments (the gate's factor applied),
/// dL/d its soft output (SoftMoE), and dx (N,d) to accumulate into.
public struct PathGradients {
    public var rawWeights: UnsafePointer<Float>
    public var softOutput: UnsafePointer<Float>?
    public var dx: UnsafeMutablePointer<Float>
    /// dL/d(aux loss) (1 in training).
    public var auxGrad: Float
    /// The extra weight of a plugin loss that averages this process's tokens only (`LossScale`).
    public var localShare: Float = 1
}

/// One way tokens reach experts inside an `MoELayer`. A path runs its component (a router or a
/// quantizer plugin, or nothing), then hands the layer N·perToken (token, expert, weight)
/// assignments over rows of its source (x, or the discrete path's x̂); the `DispatchEngine` runs
/// the experts and gives back dL/d weight and dL/d source, which the path takes to its component.
/// Paths whose routing is dense (SoftMoE) produce an output of their own instead.
///
/// ```swift
/// final class MyPath: ExpertPath { ... }     // then a `MoEComposition.PathKind` case that builds it
/// ```
public protocol ExpertPath: AnyObject {
    /// Trainable tensors of the path's component (plugin parameter views), named for checkpoints.
    var parameters: [Parameter] { get }
    var stateBuffers: [StateBuffer] { get }
    /// Expert banks the path owns (a shared expert), placed after the routed experts.
    var banks: [ExpertBank] { get }
    /// Run the component on the input; add its losses and counts to `stats`. Returns the
    /// assignments per token (0: none this step) and the rows the experts read (N,d).
    func forward(_ input: PathInput, stats: inout MoEStats) throws -> (perToken: Int, source: UnsafePointer<Float>)
    /// Expert ids (in the layer's id space) and raw weights of the N·perToken assignments.
    func fill(expert: UnsafeMutablePointer<Int32>, raw: UnsafeMutablePointer<Float>)
    /// A dense output (N,d) of this step (SoftMoE's soft dispatch), nil for assignment paths.
    func softForward(_ input: PathInput, stats: inout MoEStats) -> UnsafePointer<Float>?
    /// Where the dispatch engine accumulates dL/d source: dx itself when the source is x.
    func sourceGradient(_ input: PathInput, dx: UnsafeMutablePointer<Float>) -> UnsafeMutablePointer<Float>
    /// Take the gradients back to the component and into dx.
    func backward(_ input: PathInput, _ grads: PathGradients) throws
    /// Each token's first expert in the last forward (the consistency probe); nil if the path does not choose.
    func top1(n: Int) -> [Int32]?
}

extension ExpertPath {
    public var parameters: [Parameter] { [] }
    public var stateBuffers: [StateBuffer] { [] }
    public var banks: [ExpertBank] { [] }
    public func softForward(_ input: PathInput, stats: inout MoEStats) -> UnsafePointer<Float>? { nil }
    public func sourceGradient(_ input: PathInput, dx: UnsafeMutablePointer<Float>) -> UnsafeMutablePointer<Float> {
        dx
    }
    public func backward(_ input: PathInput, _ grads: PathGradients) throws {}
    public func top1(n: Int) -> [Int32]? { nil }
}

/// A path that sends every token to one fixed expert with weight 1 (no component, nothing to
/// learn about routing): the base of `DensePath` and `SharedExpertPath`.
public class FixedExpertPath: ExpertPath {
    /// The expert every token visits, in the layer's id space.
    public let expertID: Int32
    private var n = 0

    init(expertID: Int) { self.expertID = Int32(expertID) }

    public var banks: [ExpertBank] { [] }

    public func forward(
        _ input: PathInput, stats: inout MoEStats
    ) throws -> (perToken: Int, source: UnsafePointer<Float>) {
        n = input.n
        return (1, input.x)
    }

    public func fill(expert: UnsafeMutablePointer<Int32>, raw: UnsafeMutablePointer<Float>) {
        expert.update(repeating: expertID, count: n)
        raw.update(repeating: 1, count: n)
    }
}

/// Every token to expert 0 with weight 1: the dense FFN (a one-expert layer).
///
/// ```swift
/// let path = DensePath()
/// ```
public final class DensePath: FixedExpertPath {
    public init() { super.init(expertID: 0) }
}

/// DeepSeekMoE's shared expert (Dai et al. 2024): one expert of its own that every token visits
/// with weight 1, beside the routed ones: y = E_shared(x) + Σ_{top-k} w_i E_i(x). Its weights are
/// `<layer>.shared_expert.{fc1,fc2}.{weight,bias}`, a bank of one expert of the layer's width.
///
/// ```swift
/// let path = SharedExpertPath(bank: ExpertBank(name: "layers.0.ffn.shared_expert", count: 1, ...), expertID: 8)
/// ```
public final class SharedExpertPath: FixedExpertPath {
    public let bank: ExpertBank

    /// `expertID`: the shared expert's id in the layer (after the routed experts).
    public init(bank: ExpertBank, expertID: Int) {
        self.bank = bank
        super.init(expertID: expertID)
    }

    public override var banks: [ExpertBank] { [bank] }
}
