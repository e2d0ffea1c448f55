import Foundation

/// The first layer of a `Transformer`: model inputs (B,T) → x (B,T,C).
///
/// ```swift
/// let input: InputLayer = TokenEmbedding(vocabSize: 256, seqLen: 128, c: 128, positions: true, initStd: 0.02,
///                                        seed: s)
/// ```
public protocol InputLayer: AnyObject {
    /// Trainable tensors, in checkpoint order.
    var parameters: [Parameter] { get }
    /// Learned absolute positions (T,C), nil for relative attention.
    var positions: Parameter? { get }
    /// x (B,T,C) from token ids (B,T) or images (B,C,H,W).
    func forward(
        tokens: UnsafePointer<Int32>?, images: UnsafePointer<Float>?, x: UnsafeMutablePointer<Float>, batch: Int, t: Int
    ) throws
    /// Accumulate the parameter gradients from dx (B,T,C).
    func backward(dx: UnsafePointer<Float>, batch: Int, t: Int)
    /// The token ids of the last forward (B,T), for routers that use them.
    var tokenIDs: UnsafePointer<Int32>? { get }
    var bytes: Int { get }
}

/// Token embedding plus learned positions (GPT-2), or tokens alone (Transformer-XL):
///
///     x[b,t] = wte[tok[b,t]] (+ wpe[t])
///
/// ```swift
/// let emb = TokenEmbedding(vocabSize: 256, seqLen: 128, c: 128, positions: true, initStd: 0.02, seed: 7)
/// ```
public final class TokenEmbedding: InputLayer {
    public let wte: Parameter
    public let positions: Parameter?
    /// The token ids of the last forward (B,T).
    let ids = Storage<Int32>()

    public init(vocabSize: Int, seqLen: Int, c: Int, positions: Bool, initStd: Float, seed: UInt64) {
        wte = Parameter(name: "wte", shape: [vocabSize, c])
        wte.fillNormal(std: initStd, seed: HostRNG.derive(seed, 101))
        if positions {
            let p = Parameter(name: "wpe", shape: [seqLen, c])
            p.fillNormal(std: initStd, seed: HostRNG.derive(seed, 102))
            self.positions = p
        } else {
            self.positions = nil
        }
    }

    public var parameters: [Parameter] { [wte] + [positions].compactMap { $0 } }
    public var tokenIDs: UnsafePointer<Int32>? { UnsafePointer(ids.pointer) }

    public func forward(
        tokens: UnsafePointer<Int32>?, images: UnsafePointer<Float>?, x: UnsafeMutablePointer<Float>,
        batch: Int, t: Int
    ) throws {
        guard let tokens else { throw VQMoEError(.internalError, "a token model's forward needs tokens") }
        let c = wte.shape[1], tok = ids.reserve(batch * t)
        tok.update(from: tokens, count: batch * t)
        Embedding.forward(out: x, tokens: tok, wte: wte.data, wpe: positions?.data, b: batch, t: t, c: c)
    }

    public func backward(dx: UnsafePointer<Float>, batch: Int, t: Int) {
        Embedding.backward(
            dwte: wte.grad, dwpe: positions?.grad, dout: dx, tokens: ids.pointer, b: batch, t: t, c: wte.shape[1])
    }

    /// Inference: x (B,t,C) for tokens (B,t) at positions `position ..< position + t` (the
    /// caller keeps them below `seq_len` and the tokens inside the vocabulary).
    func embed(tokens: UnsafePointer<Int32>, x: UnsafeMutablePointer<Float>, batch: Int, t: Int, position: Int) {
        let tok = ids.reserve(batch * t)
        tok.update(from: tokens, count: batch * t)
        Embedding.forward(
            out: x, tokens: tok, wte: wte.data, wpe: positions?.data, b: batch, t: t, c: wte.shape[1],
            position: position)
    }

    public var bytes: Int { ids.bytes }
}

/// ViT input (Dosovitskiy et al. 2021): P×P patches projected to C, a learned class token in
/// front, learned positions (see `PatchEmbedding`).
///
/// ```swift
/// let image = ImageShape(channels: 1, height: 28, width: 28, patch: 7)
/// let input = PatchInput(image: image, c: 64, initStd: 0.02, seed: 7)
/// ```
public final class PatchInput: InputLayer {
    public let image: ImageShape
    public let weight: Parameter, bias: Parameter, cls: Parameter
    public let positions: Parameter?
    /// The patches of the last forward (B·N_p, C·P·P), and the projection scratch.
    let patches = Storage<Float>(), projected = Storage<Float>()

    public init(image: ImageShape, c: Int, initStd: Float, seed: UInt64) {
        self.image = image
        let pos = Parameter(name: "wpe", shape: [image.tokens, c])
        pos.fillNormal(std: initStd, seed: HostRNG.derive(seed, 102))
        positions = pos
        weight = Parameter(name: "patch.weight", shape: [c, image.patchSize])
        weight.fillNormal(std: initStd, seed: HostRNG.derive(seed, 103))
        bias = Parameter(name: "patch.bias", shape: [c], noDecay: true)
        cls = Parameter(name: "cls", shape: [c], noDecay: true)
        cls.fillNormal(std: initStd, seed: HostRNG.derive(seed, 104))
    }

    /// patch.weight, patch.bias, cls, wpe (the checkpoint order).
    public var parameters: [Parameter] { [weight, bias, cls, positions!] }
    public var tokenIDs: UnsafePointer<Int32>? { nil }

    public func forward(
        tokens: UnsafePointer<Int32>?, images: UnsafePointer<Float>?, x: UnsafeMutablePointer<Float>,
        batch: Int, t: Int
    ) throws {
        guard let images else { throw VQMoEError(.internalError, "a ViT forward needs images") }
        let c = weight.shape[0]
        PatchEmbedding.forward(
            out: x, patches: patches.reserve(batch * image.patches * image.patchSize), images: images,
            shape: image, batch: batch, weight: weight.data, bias: bias.data, cls: cls.data,
            pos: positions!.data, d: c, scratch: projected.reserve(batch * image.patches * c))
    }

    public func backward(dx: UnsafePointer<Float>, batch: Int, t: Int) {
        PatchEmbedding.backward(
            dx: dx, patches: patches.pointer, shape: image, batch: batch, dweight: weight.grad,
            dbias: bias.grad, dcls: cls.grad, dpos: positions!.grad, d: weight.shape[0],
            scratch: projected.reserve(batch * image.patches * weight.shape[0]))
    }

    public var bytes: Int { patches.bytes + projected.bytes }
}
