import Foundation

/// One pre-LN Transformer block over the residual stream (B,T,C):
///
///     mid = x + drop(attention(x))            (the sublayer applies its own LN1)
///     out = mid + drop(FFN(LN2(mid)))         (FFN: an `MoELayer` of any mode)
///
/// Saved per block: the dropout masks, mid and LN2 (the MoE layer and the attention sublayer keep
/// their own saved state).
///
/// ```swift
/// let block = TransformerBlock(attention: attn, ln2: LayerNormParameters(name: "layers.0.ln2", c: c), ffn: moe, ...)
/// let stats = try block.forward(x: x, out: next, ctx)
/// try block.backward(dx: d, x: x, ctx)      // d: dL/d out in, dL/dx out
/// ```
public final class TransformerBlock: @unchecked Sendable {
    public let index: Int
    public let attention: AttentionSublayer
    public let ln2: LayerNormParameters
    public let ffn: MoELayer
    let saved = Saved()
    let scratch: BlockScratch

    /// What the backward reads.
    final class Saved {
        let attentionMask = Storage<Float>(), mid = Storage<Float>(), ln2 = LayerNormSaved(), ffnMask = Storage<Float>()
        var bytes: Int { attentionMask.bytes + mid.bytes + ln2.bytes + ffnMask.bytes }
    }

    public init(
        index: Int, attention: AttentionSublayer, ln2: LayerNormParameters, ffn: MoELayer, scratch: BlockScratch
    ) {
        self.index = index
        self.attention = attention
        self.ln2 = ln2
        self.ffn = ffn
        self.scratch = scratch
    }

    /// attention, LN2, then the FFN's parameters (the checkpoint order).
    public var parameters: [Parameter] { attention.parameters + ln2.parameters + ffn.parameters }

    /// out (B,T,C) = the block applied to x (B,T,C); returns the MoE layer's statistics. With
    /// `cache` (inference), x holds the T positions after the cached ones (`AttentionSublayer.decode`).
    public func forward(
        x: UnsafePointer<Float>, out: UnsafeMutablePointer<Float>, _ ctx: ForwardContext, cache: KVCache? = nil
    ) throws -> MoEStats {
        let n = ctx.n, c = ln2.weight.count
        let a = scratch.sublayerOut.reserve(n * c)
        if let cache {
            attention.decode(x: x, out: a, batch: ctx.batch, t: ctx.seqLen, cache: cache, layer: index)
        } else {
            attention.forward(x: x, out: a, ctx)
        }
        if ctx.drops {
            Dropout.forward(
                out: a, mask: saved.attentionMask.reserve(n * c), inp: a, count: n * c, p: ctx.dropout,
                seed: ctx.dropoutSeed(.attentionDropout, layer: index), offset: ctx.tokenOffset * c)
        }
        let mid = saved.mid.reserve(n * c)
        Vec.sum(mid, x, a, n * c)
        saved.ln2.forward(mid, ln2, n: n, c: c)
        let f = scratch.sublayerOut.pointer  // the attention output is consumed: reuse it
        let stats = try ffn.forward(
            x: saved.ln2.out.pointer, y: f, groups: ctx.batch, groupSize: ctx.seqLen,
            tokenIDs: ctx.tokenIDs, step: ctx.stepInfo(.moe, layer: index))
        if ctx.drops {
            Dropout.forward(
                out: f, mask: saved.ffnMask.reserve(n * c), inp: f, count: n * c, p: ctx.dropout,
                seed: ctx.dropoutSeed(.ffnDropout, layer: index), offset: ctx.tokenOffset * c)
        }
        Vec.sum(out, mid, f, n * c)
        return stats
    }

    /// In place: dx holds dL/d out on entry and dL/dx on return; every parameter gradient accumulates.
    public func backward(
        dx: UnsafeMutablePointer<Float>, x: UnsafePointer<Float>, _ ctx: ForwardContext, localShare: Float = 1
    ) throws {
        let n = ctx.n, c = ln2.weight.count
        let masked = scratch.masked.reserve(n * c), dln = scratch.dln.zeros(n * c)
        // out = mid + drop(FFN(LN2(mid)))
        if ctx.dropout > 0 { Dropout.backward(dinp: masked, dout: dx, mask: saved.ffnMask.pointer, count: n * c) }
        try ffn.backward(dy: ctx.dropout > 0 ? masked : dx, dx: dln, localShare: localShare)
        saved.ln2.backward(dinp: dx, dout: dln, inp: saved.mid.pointer, ln2, n: n, c: c)
        // mid = x + drop(attention(x))
        if ctx.dropout > 0 { Dropout.backward(dinp: masked, dout: dx, mask: saved.attentionMask.pointer, count: n * c) }
        attention.backward(dout: ctx.dropout > 0 ? masked : dx, x: x, dx: dx, ctx)
    }

    /// The FFN's input of the last forward (LN2 output, (B,T,C)).
    public var ffnInput: UnsafePointer<Float> { UnsafePointer(saved.ln2.out.pointer) }

    var bytes: Int { saved.bytes + attention.bytes + ffn.workspaceBytes }
}

/// Temporaries of the blocks, shared by every block of a model.
public final class BlockScratch: @unchecked Sendable {
    /// A sublayer's output before the residual add; dropout-masked gradients; dL/d LN2 output.
    let sublayerOut = Storage<Float>(), masked = Storage<Float>(), dln = Storage<Float>()
    public init() {}
    var bytes: Int { sublayerOut.bytes + masked.bytes + dln.bytes }
}
