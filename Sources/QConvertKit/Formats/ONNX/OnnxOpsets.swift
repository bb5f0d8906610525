/// The ONNX opset ladder: every operator feature qconvert writes, with the first default-domain opset
/// that has it. The writer asks this table only; the opset a model imports is never raised.
enum OnnxFeature: CaseIterable {
    /// DequantizeLinear with one scale (QuantizeLinear/DequantizeLinear appear at 10).
    case perTensorDequantize
    /// DequantizeLinear with an `axis` and a scale per channel.
    case perAxisDequantize
    /// A Cast to or from bfloat16.
    case bfloat16Cast
    /// DequantizeLinear of float8 values.
    case float8Dequantize
    /// DequantizeLinear whose scale (and output) is float16 or bfloat16.
    case float16ScaleDequantize
    /// DequantizeLinear with `block_size`.
    case blockedDequantize
    /// int4/uint4 tensors and their DequantizeLinear.
    case int4Dequantize
    /// DynamicQuantizeLinear and MatMulInteger.
    case dynamicQuantize

    var minimumOpset: Int {
        switch self {
        case .perTensorDequantize: 10
        case .perAxisDequantize: 13
        case .bfloat16Cast: 13
        case .float8Dequantize: 19
        case .float16ScaleDequantize: 19
        case .blockedDequantize: 21
        case .int4Dequantize: 21
        case .dynamicQuantize: 11
        }
    }

    var what: String {
        switch self {
        case .perTensorDequantize: "per-tensor DequantizeLinear"
        case .perAxisDequantize: "per-axis DequantizeLinear"
        case .bfloat16Cast: "a bfloat16 Cast"
        case .float8Dequantize: "float8 DequantizeLinear"
        case .float16ScaleDequantize: "DequantizeLinear with a float16/bfloat16 scale"
        case .blockedDequantize: "blocked DequantizeLinear"
        case .int4Dequantize: "int4/uint4 DequantizeLinear"
        case .dynamicQuantize: "DynamicQuantizeLinear and MatMulInteger"
        }
    }

    func available(at opset: Int) -> Bool { opset >= minimumOpset }

    /// The features a DequantizeLinear of this scheme needs, the most demanding last.
    static func dequantize(_ s: QuantScheme) -> [OnnxFeature] {
        var f: [OnnxFeature] = [s.granularity == .channel ? .perAxisDequantize : .perTensorDequantize]
        if s.target.isFP8 { f.append(.float8Dequantize) }
        if s.granularity == .group || s.granularity == .element { f.append(.blockedDequantize) }
        if s.target.isPacked4 { f.append(.int4Dequantize) }
        return f
    }
}
