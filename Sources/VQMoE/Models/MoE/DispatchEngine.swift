import Foundation

/// The experts a layer's paths address, as one id space: bank b's expert j is global expert
/// offset_b + j (routed experts first, then e.g. a shared expert).
///
/// ```swift
/// let set = ExpertSet([routed, shared])      // ids 0..<E routed, E the shared expert
/// let (bank, local) = set.locate(E)
/// ```
public struct ExpertSet: @unchecked Sendable {
    public let banks: [ExpertBank]
    public let offsets: [Int]
    public var total: Int { offsets.last! }

    /// Banks of one width (d → d_inner → d).
    public init(_ banks: [ExpertBank]) {
        precondition(Set(banks.map(\.dInner)).count == 1 && Set(banks.map(\.dModel)).count == 1)
        self.banks = banks
        offsets = banks.reduce(into: [0]) { $0.append($0.last! + $1.globalCount) }
    }

    /// The bank of expert id `e` and its index there (a sharded bank: among this rank's experts).
    public func locate(_ e: Int) -> (bank: ExpertBank, local: Int) {
        var b = 0
        while offsets[b + 1] <= e { b += 1 }
        return (banks[b], e - offsets[b] - (banks[b].shard?.offset ?? 0))
    }

    public var parameters: [Parameter] { banks.flatMap(\.parameters) }
    public var dModel: Int { banks[0].dModel }
    public var dInner: Int { banks[0].dInner }
}

/// The mode-free part of an MoE layer: given an `AssignmentTable`, run every expert once over
/// the rows assigned to it and combine the results per token. No token is dropped.
///
///     gather    xg[slot_i] = source_p[token_i]                          (A,d), expert order
///     experts   yg[o_e ..< o_{e+1}] = E_e(xg[o_e ..< o_{e+1}])          one GEMM pair per expert
///     combine   y[t] = Σ_{i of t} weight_i · yg[slot_i]                  path order, then choice order
///     backward  dyg[slot_i] = weight_i·dy[t],  dweight_i = dy[t]·yg[slot_i],
///               dxg = experts backward,  dsource_p[t] += dxg[slot_i]
///
/// The combine and the scatter visit a token's assignments on one thread in a fixed order, so
/// results do not depend on the thread count. With expert parallelism (`exchange`), the routed
/// experts' rows go to the ranks that hold them and come back (`ExpertExchange`); the other
/// banks (a shared expert) run locally. A table of one path that sends every token to a
/// one-expert set with weight 1 (the dense FFN) runs the expert on the source directly.
///
/// ```swift
/// engine.forward(table, experts: set, y: y)
/// engine.backward(dy: dy, table, experts: set, dweight: dw, dsources: [dx, dxhat])
/// ```
public final class DispatchEngine: @unchecked Sendable {
    /// Saved for the backward: gathered inputs, pre-activations and expert outputs (expert order).
    let xg = Storage<Float>(), hpre = Storage<Float>(), yg = Storage<Float>()
    /// Temporaries shared by every layer of a model.
    let scratch: MoEScratch
    /// The table is the identity (dense FFN): no gather, no combine.
    private(set) var identity = false
    /// Expert parallelism: the exchange of the routed bank's rows (nil: every expert is here).
    let exchange: ExpertExchange?
    /// Pre-activations of the rows this rank's experts received (expert parallel), for the backward.
    let hpreReceived = Storage<Float>()

    public init(scratch: MoEScratch, exchange: ExpertExchange? = nil) {
        self.scratch = scratch
        self.exchange = exchange
    }

    public func forward(
        _ table: AssignmentTable, experts: ExpertSet, y: UnsafeMutablePointer<Float>, identity: Bool
    ) throws {
        let d = experts.dModel, a = table.count
        self.identity = identity
        let rowsIn: UnsafePointer<Float>, rowsOut: UnsafeMutablePointer<Float>
        if identity {
            rowsIn = table.ranges[0].source
            rowsOut = y
        } else {
            let g = xg.reserve(a * d), sources = table.ranges.map(\.source)
            nonisolated(unsafe) let (dst, slot) = (g, table.slot.pointer)
            table.forEachAssignment { p, t, i in (dst + Int(slot[i]) * d).update(from: sources[p] + t * d, count: d) }
            rowsIn = UnsafePointer(g)
            rowsOut = yg.reserve(a * d)
        }
        let f = experts.dInner, h = hpre.reserve(a * f)
        if let ex = exchange {
            // The routed bank's rows travel to their experts' ranks and back (ExpertExchange).
            try ex.plan(offsets: table.offsets.pointer, d: d)
            let xr = try ex.dispatch(rowsIn, into: ex.inputs), bank = experts.banks[0]
            let hr = hpreReceived.reserve(max(ex.received * f, 1)), yr = scratch.yr.reserve(max(ex.received * d, 1))
            for j in 0..<bank.count {
                let lo = ex.expertRows[j]
                bank.forward(
                    expert: j, rows: ex.expertRows[j + 1] - lo, x: xr + lo * d, hpre: hr + lo * f, y: yr + lo * d,
                    scratch: scratch.experts)
            }
            try ex.collect(yr, into: rowsOut)
        }
        forEachSegment(table, experts, from: exchange == nil ? 0 : experts.offsets[1]) { bank, local, lo, rows in
            bank.forward(
                expert: local, rows: rows, x: rowsIn + lo * d, hpre: h + lo * f,
                y: rowsOut + lo * d, scratch: scratch.experts)
        }
        if !identity { combine(table, d: d, y: y) }
    }

    /// body(bank, local expert, first row, rows) for every expert id from `first` with rows, in id order.
    private func forEachSegment(
        _ table: AssignmentTable, _ experts: ExpertSet, from first: Int = 0, _ body: (ExpertBank, Int, Int, Int) -> Void
    ) {
        let off = table.offsets.pointer
        for e in first..<experts.total {
            let lo = Int(off[e]), rows = Int(off[e + 1]) - lo
            guard rows > 0 else { continue }
            let (bank, local) = experts.locate(e)
            body(bank, local, lo, rows)
        }
    }

    /// y[t] = Σ over t's assignments of weight·yg[slot].
    private func combine(_ table: AssignmentTable, d: Int, y: UnsafeMutablePointer<Float>) {
        y.update(repeating: 0, count: table.tokens * d)
        nonisolated(unsafe) let (y, yg, slot, w) = (y, yg.pointer, table.slot.pointer, table.weight.pointer)
        table.forEachToken { _, t, i in Vec.axpy(y + t * d, w[i], yg + Int(slot[i]) * d, d) }
    }

    /// From dy (N,d): dweight (A) = dL/d weight_i, every expert gradient, and dsources[p] (N,d)
    /// += dL/d source_p for each path p of the table.
    public func backward(
        dy: UnsafePointer<Float>, _ table: AssignmentTable, experts: ExpertSet,
        dweight: UnsafeMutablePointer<Float>, dsources: [UnsafeMutablePointer<Float>]
    ) throws {
        let d = experts.dModel, a = table.count
        let dyg: UnsafePointer<Float>, dxg: UnsafeMutablePointer<Float>
        if identity {
            dyg = dy
            dxg = dsources[0]
        } else {
            let g = scratch.dyg.reserve(a * d)
            nonisolated(unsafe) let (g2, dw, yg, slot, w) = (
                g, dweight, yg.pointer, table.slot.pointer, table.weight.pointer
            )
            table.forEachAssignment { _, t, i in
                let s = Int(slot[i]), src = dy + t * d, out = g2 + s * d
                out.update(from: src, count: d)
                Vec.scale(out, w[i], d)
                dw[i] = Vec.dot(src, yg + s * d, d)
            }
            dyg = UnsafePointer(g)
            dxg = scratch.dxg.zeros(a * d)
        }
        let rowsIn = identity ? table.ranges[0].source : UnsafePointer(xg.pointer), f = experts.dInner
        if let ex = exchange {
            // dL/dy rows go to the experts' ranks as the inputs did; dL/dx rows come back.
            let dyr = try ex.dispatch(dyg, into: scratch.dyr), bank = experts.banks[0]
            let dxr = scratch.dxr.zeros(max(ex.received * d, 1))
            for j in 0..<bank.count {
                let lo = ex.expertRows[j]
                bank.backward(
                    expert: j, rows: ex.expertRows[j + 1] - lo, x: ex.inputs.pointer + lo * d,
                    hpre: hpreReceived.pointer + lo * f, dy: dyr + lo * d, dx: dxr + lo * d, scratch: scratch.experts)
            }
            try ex.collect(dxr, into: dxg)
        }
        forEachSegment(table, experts, from: exchange == nil ? 0 : experts.offsets[1]) { bank, local, lo, rows in
            bank.backward(
                expert: local, rows: rows, x: rowsIn + lo * d, hpre: hpre.pointer + lo * f,
                dy: dyg + lo * d, dx: dxg + lo * d, scratch: scratch.experts)
        }
        guard !identity else { return }
        nonisolated(unsafe) let (dxgp, slot, targets) = (dxg, table.slot.pointer, dsources)
        table.forEachToken { p, t, i in Vec.add(targets[p] + t * d, dxgp + Int(slot[i]) * d, d) }
    }

    var bytes: Int { xg.bytes + hpre.bytes + yg.bytes + hpreReceived.bytes + (exchange?.inputs.bytes ?? 0) }
}

/// Temporaries of the MoE layers, shared by every layer of a model (only live within one
/// layer's forward or backward).
///
/// ```swift
/// let scratch = MoEScratch()
/// let engine = DispatchEngine(scratch: scratch)
/// ```
public final class MoEScratch: @unchecked Sendable {
    public let experts = ExpertScratch()
    public let soft = SoftScratch()
    /// Expert-ordered dL/dy and dL/dx rows; dL/d weight and dL/d raw weight per assignment.
    public let dyg = Storage<Float>(), dxg = Storage<Float>(), dweight = Storage<Float>(), draw = Storage<Float>()
    /// Expert parallelism: outputs, dL/dy and dL/dx of the rows this rank's experts received.
    public let yr = Storage<Float>(), dyr = Storage<Float>(), dxr = Storage<Float>()
    /// dL/dx̂ of the discrete path; the gate's dL/dg and dL/dz (N,P).
    public let dxhat = Storage<Float>(), dgate = Storage<Float>(), dz = Storage<Float>()
    public init() {}

    var bytes: Int {
        experts.bytes + soft.bytes
            + [dyg, dxg, dweight, draw, dxhat, dgate, dz, yr, dyr, dxr].reduce(0) { $0 + $1.bytes }
    }
}
