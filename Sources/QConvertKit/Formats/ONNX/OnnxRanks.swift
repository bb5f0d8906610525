import COnnxProto
import Foundation

/// Lower bounds of the ranks of the main graph's values, where graph inputs, initializers and the
/// common operators tell them (no full shape inference): a value's rank is at least the one recorded. The ONNX forms use them to tell a batch of vectors (rank 2)
/// from a batch of sequences (rank ≥ 3), whose products are large enough for the dynamic form.
enum OnnxRanks {
    static let sameAsFirst: Set<String> = [
        "Relu", "Gelu", "Erf", "Tanh", "Sigmoid", "Softmax", "LogSoftmax", "LayerNormalization", "Cast", "Identity",
        "Dropout",
        "Clip", "Sqrt", "Exp", "Log", "Neg", "Abs", "Reciprocal", "Transpose", "Not", "HardSigmoid", "LeakyRelu", "Elu",
        "Selu",
        "SimplifiedLayerNormalization", "SkipLayerNormalization", "BatchNormalization", "InstanceNormalization", "Conv",
        "ConvTranspose", "MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "Slice", "Pad", "Concat",
        "Softplus",
        "FastGelu", "BiasGelu", "QuickGelu", "Mish", "HardSwish", "Floor", "Ceil", "Round", "Sign"
    ]
    static let elementwise: Set<String> = [
        "Add", "Sub", "Mul", "Div", "Pow", "Where", "Equal", "Greater", "Less", "GreaterOrEqual", "LessOrEqual", "And",
        "Or",
        "Max", "Min", "Sum", "Mean", "PRelu", "Mod"
    ]

    static func infer(_ model: OnnxModel) -> [String: Int] {
        guard let g = model.model.pointee.graph else { return [:] }
        var rank: [String: Int] = [:]
        var constants: [String: Proto.TensorP] = [:]
        var length: [String: Int] = [:]
        func valueRank(_ v: UnsafeMutablePointer<Onnx__ValueInfoProto>?) {
            guard let v, let t = v.pointee.type, t.pointee.value_case == ONNX__TYPE_PROTO__VALUE_TENSOR_TYPE,
                let tt = t.pointee.tensor_type, let shape = tt.pointee.shape
            else { return }
            rank[Proto.string(v.pointee.name)] = shape.pointee.n_dim
        }
        for i in 0..<g.pointee.n_input { valueRank(g.pointee.input[i]) }
        for i in 0..<g.pointee.n_value_info { valueRank(g.pointee.value_info[i]) }
        for i in 0..<g.pointee.n_initializer {
            guard let t = g.pointee.initializer[i] else { continue }
            rank[Proto.string(t.pointee.name)] = t.pointee.n_dims
            constants[Proto.string(t.pointee.name)] = t
        }
        /// The integer values of a small constant 1-D tensor (a Reshape shape, Unsqueeze axes).
        func ints(_ name: String) -> Int? {
            guard let t = constants[name], t.pointee.n_dims <= 1 else { return nil }
            let n = t.pointee.n_dims == 0 ? 1 : Int(t.pointee.dims[0])
            return n
        }
        for i in 0..<g.pointee.n_node {
            guard let node = g.pointee.node[i] else { continue }
            let op = Proto.string(node.pointee.op_type)
            let ins = Proto.strings(node.pointee.input, node.pointee.n_input)
            let outs = Proto.strings(node.pointee.output, node.pointee.n_output)
            guard let out = outs.first, !out.isEmpty else { continue }
            let known = ins.filter { !$0.isEmpty }.map { rank[$0] }
            var r: Int? = nil
            switch op {
            case "Constant":
                if let a = Proto.attribute(node, "value"), let t = a.pointee.t {
                    r = t.pointee.n_dims
                    constants[out] = t
                }
            case _ where sameAsFirst.contains(op): r = ins.first.flatMap { rank[$0] }
            case _ where elementwise.contains(op):
                // broadcasting: at least the largest known
                r = known.compactMap { $0 }.max()
            case "MatMul", "MatMulNBits", "MatMulInteger":
                if ins.count >= 2, let a = rank[ins[0]], let b = rank[ins[1]], a >= 2, b >= 2 { r = max(a, b) }
            case "Gemm", "Flatten": r = 2
            case "Gather":
                if ins.count == 2, let d = rank[ins[0]] { r = d + (rank[ins[1]] ?? 0) - 1 }
            case "Reshape": r = ins.count > 1 ? (ints(ins[1]) ?? length[ins[1]]) : nil
            case "Unsqueeze", "Squeeze":
                let axes =
                    Proto.attribute(node, "axes").map { $0.pointee.n_ints } ?? (ins.count > 1 ? ints(ins[1]) : nil)
                if let a = ins.first.flatMap({ rank[$0] }), let n = axes { r = op == "Unsqueeze" ? a + n : a - n }
            case "ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL2":
                if (Proto.intAttribute(node, "keepdims") ?? 1) == 1 { r = ins.first.flatMap { rank[$0] } }
            case "Shape": r = 1
            default: break
            }
            if let r { rank[out] = r }
            // the lengths of 1-D shape vectors built at run time (Shape → Gather → Unsqueeze → Concat → Reshape)
            switch op {
            case "Shape" where ins.count == 1 && node.pointee.n_attribute == 0: length[out] = rank[ins[0]]
            case "Unsqueeze" where rank[ins[0]] == 0: length[out] = 1
            case "Concat":
                let parts = ins.map { length[$0] ?? (rank[$0] == 1 ? ints($0) : nil) }
                if !parts.isEmpty, parts.allSatisfy({ $0 != nil }) { length[out] = parts.reduce(0) { $0 + $1! } }
            default: break
            }
        }
        return rank
    }
}
