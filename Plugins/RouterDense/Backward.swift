// dense backward: the weights are the constant 1 and the aux loss is 0, so nothing flows
// back; the call only checks its arguments (grad_x is left as it is: += 0).
import PluginKit
import VQMoEABI

extension DenseRouter {
    func backward(
        _ ctxPtr: UnsafeMutableRawPointer?, _ ginPtr: UnsafePointer<vqmoe_router_grad_in>?,
        _ goutPtr: UnsafePointer<vqmoe_router_grad_out>?
    ) throws(PluginFailure) {
        guard let ctx = Handle.context(ctxPtr, as: RouterContext.self) else {
            throw .state("backward got a NULL context (forward saves one only in train mode without NO_GRAD)")
        }
        guard let ginPtr, let goutPtr else { throw .invalid("backward: grad_in or grad_out is NULL") }
        try requireSize(ginPtr.pointee.struct_size, vqmoe_router_grad_in.self, "router grad_in")
        try requireSize(goutPtr.pointee.struct_size, vqmoe_router_grad_out.self, "router grad_out")
        let gin = ginPtr.pointee
        if gin.grad_weights.data != nil { _ = try requireF32(gin.grad_weights, [ctx.n, 1], "grad_weights") }
        _ = try requireF32(goutPtr.pointee.grad_x, [ctx.n, ctx.d], "grad_x")
        guard gin.grad_aux_loss.isFinite else { throw .numeric("grad_aux_loss is \(gin.grad_aux_loss)") }
    }
}
