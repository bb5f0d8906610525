/// An element type of a stored tensor.
public enum DType: String, Sendable, CaseIterable, Codable {
    case f64, f32, f16, bf16, f8e4m3, f8e5m2
    case i64, i32, i16, i8, u64, u32, u16, u8
    case int4, uint4
    case bool
    case c64, c128

    /// Bits per element (4 for the packed 4-bit types).
    public var bits: Int {
        switch self {
        case .f64, .i64, .u64, .c64: return 64
        case .c128: return 128
        case .f32, .i32, .u32: return 32
        case .f16, .bf16, .i16, .u16: return 16
        case .f8e4m3, .f8e5m2, .i8, .u8, .bool: return 8
        case .int4, .uint4: return 4
        }
    }

    /// Floating-point types that a policy may quantize or cast.
    public var isFloatingPoint: Bool {
        switch self {
        case .f64, .f32, .f16, .bf16, .f8e4m3, .f8e5m2: return true
        default: return false
        }
    }

    /// The safetensors dtype string, if the format has one.
    public var safetensorsName: String? {
        switch self {
        case .f64: return "F64"
        case .f32: return "F32"
        case .f16: return "F16"
        case .bf16: return "BF16"
        case .f8e4m3: return "F8_E4M3"
        case .f8e5m2: return "F8_E5M2"
        case .i64: return "I64"
        case .i32: return "I32"
        case .i16: return "I16"
        case .i8: return "I8"
        case .u64: return "U64"
        case .u32: return "U32"
        case .u16: return "U16"
        case .u8: return "U8"
        case .bool: return "BOOL"
        case .c64: return "C64"
        case .int4, .uint4, .c128: return nil
        }
    }

    public init?(safetensorsName: String) {
        guard let t = DType.allCases.first(where: { $0.safetensorsName == safetensorsName }) else { return nil }
        self = t
    }

    /// Name used in reports and the metadata document.
    public var displayName: String {
        switch self {
        case .f8e4m3: return "fp8_e4m3"
        case .f8e5m2: return "fp8_e5m2"
        default: return rawValue
        }
    }

    /// Rank in the safetensors reference writer's sort (higher sorts first).
    var safetensorsAlignmentRank: Int {
        switch self {
        case .bool: return 0
        case .int4, .uint4: return 1
        case .u8: return 3
        case .i8: return 4
        case .f8e5m2: return 5
        case .f8e4m3: return 6
        case .i16: return 11
        case .u16: return 12
        case .f16: return 13
        case .bf16: return 14
        case .i32: return 15
        case .u32: return 16
        case .f32: return 17
        case .c64: return 18
        case .f64: return 19
        case .i64: return 20
        case .u64: return 21
        case .c128: return 22
        }
    }
}
