import Foundation

/// Static quantization of activations: the forms the quantized model takes in onnxruntime's integer kernels.
extension OnnxSink {
    /// The static QuantizeLinear of activation `a` (its scale and zero point as initializers), inserted after
    /// its producer once and shared by every consumer: the quantized value's, scale's and zero point's names.
    func staticQuantize(_ a: ActivationParameters) -> (String, String, String) {
        if let known = staticInputs[a.name] { return known }
        let g = mainGraph!
        let qType: Int32 = a.target == .int8 ? 3 : 2
        let sName = model.uniqueName(a.name + "_scale")
        let zName = model.uniqueName(a.name + "_zero_point")
        let qName = model.uniqueName(a.name + "_quantized")
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
                    inputs: [a.name, sName, zName], outputs: [qName])
            ])
        staticInputs[a.name] = (qName, sName, zName)
        return (qName, sName, zName)
    }

    /// A MatMul/Gemm weight in the static integer form: its activations' static QuantizeLinear, then
    /// com.microsoft.MatMulIntegerToFloat(A, W, a_scale, w_scale, a_zero_point, w_zero_point, bias), the
    /// bias Add folded in.
    func applyStaticInteger(
        _ p: TensorPlan, scheme s: QuantScheme, loc: OnnxModel.Located, fit f: OnnxForms.Fit,
        values: [UInt8], scale: [UInt8], zeroPoint: [UInt8]?
    ) throws {
        let w = loc.graphName
        let (qName, sName, zName, pDims) = placeInteger8Weight(
            p, scheme: s, loc: loc, fit: f, values: values, scale: scale, zeroPoint: zeroPoint)
        var dtypes = Set<String>()
        for use in f.uses {
            guard let a = options.activations.first(where: { $0.name == use.a }) else {
                throw QConvertError.internal(message: "\(path): no activation parameters for '\(use.a)'")
            }
            dtypes.insert(a.target.rawValue)
            let (aq, ascale, azp) = staticQuantize(a)
            var inputs = [aq, qName, ascale, sName, azp, zName ?? "", use.bias ?? ""]
            while inputs.last == "" { inputs.removeLast() }
            let node = Proto.newNode(
                op: "MatMulIntegerToFloat", name: model.uniqueName(w + "_MatMulIntegerToFloat"), inputs: inputs,
                outputs: [use.output])
            node.pointee.domain = Proto.cstring("com.microsoft")
            replaceNode(use.node, with: [node])
            if let add = use.biasAdd { replaceNode(add, with: []) }
        }
        importMicrosoftDomain()
        var form = OnnxFormRecord(form: "static")
        form.activations = dtypes.sorted().joined(separator: ", ") + ", QuantizeLinear with the calibrated range"
        form.biasFolded = f.uses.contains { $0.bias != nil }
        record(p, values: qName, scale: sName, zeroPoint: zName, scaleShape: pDims, form: form)
    }

    /// Static quantization of activations: a QuantizeLinear/DequantizeLinear pair per calibrated activation,
    /// on its edges into the quantizable ops still in the graph (other consumers keep the float value; the
    /// QuantizeLinear is the static integer form's when it has one). With the weights' DequantizeLinear
    /// this is the QDQ pattern onnxruntime fuses into integer kernels (QLinearMatMul, QLinearConv).
    /// Returns the activations quantized (by a pair or by the static integer form).
    @discardableResult
    func applyActivations(_ params: [ActivationParameters], ops: Set<String>) -> Set<String> {
        var applied = Set(staticInputs.keys)
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
            let (qName, sName, zName) = staticQuantize(a)
            let dqName = model.uniqueName(a.name + "_dequantized")
            insertAfterProducer(
                of: qName,
                [
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

extension OnnxForms {
    /// Under static activation quantization, the form of a quantized weight, where it changes:
    /// - the weights of Conv-like ops in `ops` become DequantizeLinear, which with the activation's pair is
    ///   the pattern onnxruntime fuses (QLinearConv);
    /// - MatMul/Gemm weights whose every activation gets a pair take the static integer form: one
    ///   QuantizeLinear per activation and com.microsoft.MatMulIntegerToFloat with the bias folded
    ///   (MiniLM-L3, 1 thread, batch 16: 93 ms against 103 for weight-only quantization's dynamic form and
    ///   98 for the QDQ pattern, whose bias Adds onnxruntime does not fuse); where that form does not fit,
    ///   DequantizeLinear;
    /// - embedding tables keep GatherBlockQuantized (a DequantizeLinear before Gather would dequantize the
    ///   whole table at every run), and a MatMul weight whose activation has no pair keeps its form, as does
    ///   one whose `onnx_form` the policy sets.
    static func applyStatic(
        _ p: inout TensorPlan, source: Checkpoint, consumerOps: [String], activations: Set<String>, ops: Set<String>,
        plans: [String: TensorPlan]
    ) {
        guard !consumerOps.contains("Gather") else { return }
        let fused = ops.subtracting(["MatMul", "Gemm"])
        if consumerOps.contains(where: { fused.contains($0) }) {
            p.onnxForm = .qdq
            return
        }
        // an explicit onnx_form is the user's: qdq stays the portable QDQ pattern, the others their form
        guard p.onnxForm == .auto, let model = source.container as? OnnxModel, let loc = model.located[p.name],
            case .success(let f) = fit(p, loc: loc, model: model, plans: plans),
            f.uses.allSatisfy({ activations.contains($0.a) })
        else { return }
        p.onnxForm = .qdq
        p.activationsStatic = true
    }
}
