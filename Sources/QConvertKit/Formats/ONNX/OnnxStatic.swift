import Foundation

/// Static quantization of activations: a QuantizeLinear/DequantizeLinear pair per calibrated activation,
/// on its edges into the quantizable ops only (other consumers keep the float value). With the weights'
/// DequantizeLinear this is the QDQ pattern onnxruntime fuses into integer kernels (QLinearMatMul,
/// QLinearConv).
extension OnnxSink {
    /// Returns the activations given a pair (those still feeding one of `ops` as the graph now is).
    @discardableResult
    func applyActivations(_ params: [ActivationParameters], ops: Set<String>) -> Set<String> {
        var applied = Set<String>()
        guard let g = mainGraph, !params.isEmpty else { return applied }
        for a in params {
            // the consumers among the quantizable ops, as the graph is now (weights' forms applied)
            var uses: [(Proto.NodeP, Int)] = []
            for i in 0..<g.pointee.n_node {
                guard let n = g.pointee.node[i], ops.contains(Proto.string(n.pointee.op_type)) else { continue }
                let domain = Proto.string(n.pointee.domain)
                guard domain.isEmpty || domain == "ai.onnx" else { continue }
                for k in 0..<n.pointee.n_input where Proto.string(n.pointee.input[k]) == a.name { uses.append((n, k)) }
            }
            guard !uses.isEmpty else { continue }
            applied.insert(a.name)
            let qType: Int32 = a.target == .int8 ? 3 : 2
            let sName = model.uniqueName(a.name + "_scale")
            let zName = model.uniqueName(a.name + "_zero_point")
            let qName = model.uniqueName(a.name + "_quantized")
            let dqName = model.uniqueName(a.name + "_dequantized")
            var scale = a.scale
            let zp = [UInt8(truncatingIfNeeded: a.zeroPoint)]
            let sT = withUnsafeBytes(of: &scale) { Proto.newTensor(name: sName, dataType: 1, dims: [], raw: $0) }
            let zT = zp.withUnsafeBytes { Proto.newTensor(name: zName, dataType: qType, dims: [], raw: $0) }
            var list = g.pointee.initializer
            var count = g.pointee.n_initializer
            Proto.append(sT, to: &list, count: &count)
            Proto.append(zT, to: &list, count: &count)
            g.pointee.initializer = list
            g.pointee.n_initializer = count
            insertAfterProducer(
                of: a.name,
                [
                    Proto.newNode(
                        op: "QuantizeLinear", name: model.uniqueName(a.name + "_QuantizeLinear"),
                        inputs: [a.name, sName, zName], outputs: [qName]),
                    Proto.newNode(
                        op: "DequantizeLinear", name: model.uniqueName(a.name + "_DequantizeLinear"),
                        inputs: [qName, sName, zName], outputs: [dqName])
                ])
            for (n, k) in uses {
                free(n.pointee.input[k])
                n.pointee.input[k] = Proto.cstring(dqName)
            }
        }
        return applied
    }
}
