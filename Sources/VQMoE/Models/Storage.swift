import Foundation

/// A grow-only, 64-byte aligned array of `Element` that one layer keeps across steps: saved
/// activations and temporaries live in named fields of these (never looked up by a string key),
/// so hot paths allocate nothing after the first step.
///
/// `reserve(n)` returns a pointer to at least `n` elements; it reallocates (dropping the
/// contents) only when `n` exceeds the capacity, so a backward reads what its forward wrote.
///
/// ```swift
/// let h = Storage<Float>()
/// let p = h.reserve(n * d)          // (N,d); the same memory on later steps of the same size
/// let z = h.zeros(n * d)            // reserved and zero-filled
/// ```
public final class Storage<Element>: @unchecked Sendable {
    public private(set) var pointer: UnsafeMutablePointer<Element>
    public private(set) var capacity: Int

    public init() {
        capacity = 64 / max(MemoryLayout<Element>.stride, 1)
        pointer = Storage.allocate(capacity)
    }

    deinit { free(pointer) }

    private static func allocate(_ count: Int) -> UnsafeMutablePointer<Element> {
        HostRuntime.mustAllocate(
            max(count, 64 / max(MemoryLayout<Element>.stride, 1)), of: Element.self, for: "activations")
    }

    /// At least `count` elements (contents kept unless the storage had to grow).
    @discardableResult
    public func reserve(_ count: Int) -> UnsafeMutablePointer<Element> {
        if count > capacity {
            free(pointer)
            pointer = Storage.allocate(count)
            capacity = count
        }
        return pointer
    }

    /// Bytes held.
    public var bytes: Int { max(capacity * MemoryLayout<Element>.stride, 64) }
}

extension Storage {
    /// Storage holding a copy of `values`.
    public convenience init(_ values: [Element]) {
        self.init()
        let p = reserve(values.count)
        values.withUnsafeBufferPointer { if let base = $0.baseAddress { p.update(from: base, count: values.count) } }
    }
}

extension Storage where Element: Numeric {
    /// Storage holding `count` zeros.
    public convenience init(zeros count: Int) { self.init([Element](repeating: 0, count: count)) }
}

extension Storage where Element == Float {
    /// At least `count` floats, the first `count` set to 0.
    public func zeros(_ count: Int) -> UnsafeMutablePointer<Float> {
        let p = reserve(count)
        p.update(repeating: 0, count: count)
        return p
    }
}

/// Saved state of a LayerNorm forward: the output and the per-row mean and 1/std its backward needs.
///
/// ```swift
/// let s = LayerNormSaved()
/// LayerNorm.forward(out: s.out.reserve(n * c), mean: s.mean.reserve(n), rstd: s.rstd.reserve(n), ...)
/// ```
public final class LayerNormSaved: @unchecked Sendable {
    public let out = Storage<Float>(), mean = Storage<Float>(), rstd = Storage<Float>()
    public init() {}

    /// out (N,C) = LN(inp (N,C)) with `w`, keeping the statistics.
    func forward(_ inp: UnsafePointer<Float>, _ w: LayerNormParameters, n: Int, c: Int) {
        LayerNorm.forward(
            out: out.reserve(n * c), mean: mean.reserve(n), rstd: rstd.reserve(n), inp: inp,
            weight: w.weight.data, bias: w.bias.data, n: n, c: c)
    }

    /// dinp += LN backward of dout, given the forward's input; accumulates the parameter gradients.
    func backward(
        dinp: UnsafeMutablePointer<Float>, dout: UnsafePointer<Float>, inp: UnsafePointer<Float>,
        _ w: LayerNormParameters, n: Int, c: Int
    ) {
        LayerNorm.backward(
            dinp: dinp, dweight: w.weight.grad, dbias: w.bias.grad, dout: dout, inp: inp,
            weight: w.weight.data, mean: mean.pointer, rstd: rstd.pointer, n: n, c: c)
    }

    var bytes: Int { out.bytes + mean.bytes + rstd.bytes }
}

/// The weight (initialised to 1) and bias (0) of a LayerNorm over C features, named
/// `<name>.weight` and `<name>.bias`.
///
/// ```swift
/// let ln = LayerNormParameters(name: "layers.0.ln1", c: 256)
/// ```
public struct LayerNormParameters: @unchecked Sendable {
    public let weight: Parameter, bias: Parameter

    public init(name: String, c: Int) {
        weight = Parameter(name: "\(name).weight", shape: [c], noDecay: true)
        weight.fill(1)
        bias = Parameter(name: "\(name).bias", shape: [c], noDecay: true)
    }

    public var parameters: [Parameter] { [weight, bias] }
}
