/// What a tensor becomes: a quantized integer or fp8 type, a float cast, or unchanged.
public enum TargetType: String, Sendable, CaseIterable, Codable {
    case int8, uint8, int4, uint4
    case fp8_e4m3, fp8_e5m2
    case fp16, bf16
    case keep

    public var isIntegerQuantization: Bool { [.int8, .uint8, .int4, .uint4].contains(self) }
    public var isFP8: Bool { self == .fp8_e4m3 || self == .fp8_e5m2 }
    public var isQuantization: Bool { isIntegerQuantization || isFP8 }
    public var isCast: Bool { self == .fp16 || self == .bf16 }

    public var bits: Int {
        switch self {
        case .int8, .uint8, .fp8_e4m3, .fp8_e5m2: return 8
        case .int4, .uint4: return 4
        case .fp16, .bf16: return 16
        case .keep: return 0
        }
    }

    public var isSigned: Bool { self == .int8 || self == .int4 }

    /// Full integer range of the type.
    public var fullRange: (qmin: Int32, qmax: Int32) {
        switch self {
        case .int8: return (-128, 127)
        case .uint8: return (0, 255)
        case .int4: return (-8, 7)
        case .uint4: return (0, 15)
        default: return (0, 0)
        }
    }

    /// The stored dtype of the quantized values (4-bit types are packed into u8).
    public var storageDType: DType {
        switch self {
        case .int8: return .i8
        case .uint8, .int4, .uint4: return .u8
        case .fp8_e4m3: return .f8e4m3
        case .fp8_e5m2: return .f8e5m2
        case .fp16: return .f16
        case .bf16: return .bf16
        case .keep: return .u8
        }
    }

    /// The dtype of zero-point tensors (unpacked, one per byte for 4-bit types).
    public var zeroPointDType: DType { isSigned ? .i8 : .u8 }

    var fp8Format: FP8.Format? {
        switch self {
        case .fp8_e4m3: return .e4m3
        case .fp8_e5m2: return .e5m2
        default: return nil
        }
    }
}

/// scale: symmetric, zero point 0, restricted range; affine: zero point, range widened to contain 0.
public enum Mapping: String, Sendable, Codable, CaseIterable { case scale, affine }

/// Which elements share one (scale, zero point).
public enum Granularity: String, Sendable, Codable, CaseIterable { case tensor, channel, group, element }

/// How the range [beta, alpha] is chosen from the data.
public enum Calibration: Sendable, Equatable, Hashable {
    case max
    case percentile(Double)
    /// `exhaustive`: evaluate every candidate threshold instead of searching coarse to fine.
    case entropy(bins: Int, levels: Int?, exhaustive: Bool = false)
    case mse(bins: Int, exhaustive: Bool = false)

    public var name: String {
        switch self {
        case .max: return "max"
        case .percentile: return "percentile"
        case .entropy: return "entropy"
        case .mse: return "mse"
        }
    }
}

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
