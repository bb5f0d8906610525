/// What a tensor becomes: a quantized integer or fp8 type, a float cast, or unchanged.
public enum TargetType: String, Sendable, CaseIterable, Codable {
    case int8, uint8, int4, uint4
    case fp8_e4m3, fp8_e5m2
    case fp16, bf16
    /// llama.cpp's block types (GGUF outputs only)
    case q8_0, q4_0, q4_1
    case keep

    /// Every fact about the type, from one exhaustive table (adding a type is adding a row here).
    public var traits: TypeTraits {
        switch self {
        case .int8:
            return TypeTraits(kind: .integer, bits: 8, signed: true, fullRange: (-128, 127), storage: .i8, onnxType: 3)
        case .uint8:
            return TypeTraits(kind: .integer, bits: 8, signed: false, fullRange: (0, 255), storage: .u8, onnxType: 2)
        case .int4:
            return TypeTraits(kind: .integer, bits: 4, signed: true, fullRange: (-8, 7), storage: .u8, onnxType: 22)
        case .uint4:
            return TypeTraits(kind: .integer, bits: 4, signed: false, fullRange: (0, 15), storage: .u8, onnxType: 21)
        case .fp8_e4m3:
            return TypeTraits(kind: .fp8, bits: 8, signed: true, fullRange: (0, 0), storage: .f8e4m3, onnxType: 17)
        case .fp8_e5m2:
            return TypeTraits(kind: .fp8, bits: 8, signed: true, fullRange: (0, 0), storage: .f8e5m2, onnxType: 19)
        case .fp16:
            return TypeTraits(kind: .cast, bits: 16, signed: true, fullRange: (0, 0), storage: .f16, onnxType: 10)
        case .bf16:
            return TypeTraits(kind: .cast, bits: 16, signed: true, fullRange: (0, 0), storage: .bf16, onnxType: 16)
        case .q8_0:
            return TypeTraits(
                kind: .block, bits: 8, signed: true, fullRange: (-127, 127), storage: .u8, onnxType: 0, block: (32, 34))
        case .q4_0:
            return TypeTraits(
                kind: .block, bits: 4, signed: true, fullRange: (-8, 7), storage: .u8, onnxType: 0, block: (32, 18))
        case .q4_1:
            return TypeTraits(
                kind: .block, bits: 4, signed: false, fullRange: (0, 15), storage: .u8, onnxType: 0, block: (32, 20))
        case .keep:
            return TypeTraits(kind: .keep, bits: 0, signed: false, fullRange: (0, 0), storage: .u8, onnxType: 0)
        }
    }

    public var isIntegerQuantization: Bool { traits.kind == .integer }
    public var isFP8: Bool { traits.kind == .fp8 }
    public var isQuantization: Bool { isIntegerQuantization || isFP8 || isBlock }
    /// llama.cpp's block types: scales inside the blocks, no parameter tensors.
    public var isBlock: Bool { traits.kind == .block }
    public var isCast: Bool { traits.kind == .cast }
    public var bits: Int { traits.bits }
    /// Signed integer types (two's complement codes).
    public var isSigned: Bool { traits.kind == .integer && traits.signed }
    /// Integer types stored two values per byte (element 0 in the low nibble).
    public var isPacked4: Bool { traits.kind == .integer && traits.bits == 4 }
    /// Full integer range of the type.
    public var fullRange: (qmin: Int32, qmax: Int32) { traits.fullRange }
    /// The stored dtype of the quantized values (4-bit types are packed into u8).
    public var storageDType: DType { traits.storage }
    /// The dtype of zero-point tensors (unpacked, one per byte for 4-bit types).
    public var zeroPointDType: DType { isSigned ? .i8 : .u8 }
    /// The 8-bit integer type a 4-bit one widens to (one value per byte), itself otherwise.
    public var widened: TargetType { isPacked4 ? (isSigned ? .int8 : .uint8) : self }

    var fp8Format: FP8.Format? {
        switch self {
        case .fp8_e4m3: return .e4m3
        case .fp8_e5m2: return .e5m2
        case .int8, .uint8, .int4, .uint4, .fp16, .bf16, .q8_0, .q4_0, .q4_1, .keep: return nil
        }
    }
}

/// The facts of one target type (see `TargetType.traits`).
public struct TypeTraits: Sendable {
    public enum Kind: Sendable { case integer, fp8, block, cast, keep }
    public var kind: Kind
    public var bits: Int
    public var signed: Bool
    public var fullRange: (qmin: Int32, qmax: Int32)
    public var storage: DType
    /// ONNX TensorProto data type of the stored values (0: none).
    public var onnxType: Int32
    /// Block types: values per block and bytes per block.
    public var block: (elements: Int, bytes: Int)? = nil
    /// Values stored per byte: integer types narrower than a byte are packed (`Packing.pack`).
    public var valuesPerByte: Int { kind == .integer && bits < 8 ? 8 / bits : 1 }
}

/// scale: symmetric, zero point 0, restricted range; affine: zero point, range widened to contain 0.
public enum Mapping: String, Sendable, Codable, CaseIterable { case scale, affine }

/// Which elements share one (scale, zero point).
public enum Granularity: String, Sendable, Codable, CaseIterable { case tensor, channel, group, element }

/// A complete quantization recipe for one tensor, with its axis already resolved.
public struct QuantScheme: Sendable, Equatable, Hashable {
    public var target: TargetType
    public var mapping: Mapping
    public var granularity: Granularity
    public var axis: Int
    public var groupSize: Int
    public var calibration: Calibration
    /// fp16 casts: clamp overflow to the largest finite value instead of failing.
    public var saturate: Bool
    /// Symmetric integer mappings: use the full range (−2^(b−1) … 2^(b−1)−1, the largest magnitude at
    /// −2^(b−1), as llama.cpp's Q4_0 and onnxruntime's block quantizer do) instead of the restricted one.
    public var fullSymmetricRange = false
    /// The type scales are stored in (f32, f16 or bf16): the quantizer rounds each scale to it before
    /// quantizing with it, so the stored scale is the one the values were made with.
    public var scaleDType: DType = .f32

    public init(
        target: TargetType, mapping: Mapping = .scale, granularity: Granularity = .channel, axis: Int = 0,
        groupSize: Int = 128, calibration: Calibration = .max, saturate: Bool = false
    ) {
        self.target = target
        self.mapping = mapping
        self.granularity = granularity
        self.axis = axis
        self.groupSize = groupSize
        self.calibration = calibration
        self.saturate = saturate
    }

    /// Whether the scheme stores zero points: affine mappings, and unsigned types (whose symmetric
    /// zero point is the midpoint).
    public var hasZeroPoint: Bool { target.isIntegerQuantization && (mapping == .affine || !target.isSigned) }

    /// Integer range actually used: restricted and symmetric for scale mapping.
    public var integerRange: (qmin: Int32, qmax: Int32) {
        let full = target.fullRange
        if mapping == .scale && fullSymmetricRange { return full }
        if mapping == .scale {
            let m = Int32((1 << (target.bits - 1)) - 1)
            return target.isSigned ? (-m, m) : (1, full.qmax)  // unsigned: zero point at the midpoint (128, 8)
        }
        return full
    }
}
