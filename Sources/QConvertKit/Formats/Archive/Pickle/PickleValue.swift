import Foundation

/// A value read from (or to be written as) a restricted pickle. Lists and dicts are reference
/// types because the pickle's memo can refer back to them while they are being filled.
indirect enum PickleValue {
    case none
    case bool(Bool)
    case int(Int)
    /// An integer wider than 64 bits, as its little-endian two's-complement bytes.
    case bigInt([UInt8])
    case float(Double)
    case string(String)
    case bytes([UInt8])
    case tuple([PickleValue])
    case list(PickleList)
    case dict(PickleDict)
    case set([PickleValue])
    /// An allowed class or function reference, e.g. torch.float8_e4m3fn.
    case global(module: String, name: String)
    case tensor(PTTensor)
    case storage(PTStorage)
    case mark
}

final class PickleList {
    var items: [PickleValue] = []
    /// Nesting depth (1 + the deepest item) and whether another container holds this one: the
    /// unpickler adds nothing to a held container, so a recorded depth never goes stale.
    var depth = 1
    var embedded = false
}

final class PickleDict {
    var items: [(key: PickleValue, value: PickleValue)] = []
    /// Position of each string key in `items`, so that SETITEM finds an existing key at once.
    var stringKeys: [String: Int] = [:]
    var depth = 1
    var embedded = false
    /// collections.OrderedDict rather than dict.
    var ordered = false
    /// State set by BUILD (Module.state_dict's `_metadata`), written back the same way.
    var state: PickleValue?
}

/// A storage named by a persistent id: one `data/<key>` record of the archive.
struct PTStorage {
    var key: String
    var dtype: DType
    /// Elements for typed storages; bytes for UntypedStorage.
    var numel: Int
}

/// A tensor rebuilt by _rebuild_tensor_v2/v3 (and _rebuild_parameter).
final class PTTensor {
    var storage: PTStorage
    var dtype: DType
    var offset: Int
    var shape: [Int]
    var stride: [Int]
    var requiresGrad = false
    var isParameter = false
    /// Index of the checkpoint entry holding its data (tied tensors share one).
    var entry = -1
    init(storage: PTStorage, dtype: DType, offset: Int, shape: [Int], stride: [Int]) {
        self.storage = storage
        self.dtype = dtype
        self.offset = offset
        self.shape = shape
        self.stride = stride
    }
}

enum TorchTypes {
    /// Legacy typed storage classes and their element types.
    static let storages: [String: DType] = [
        "DoubleStorage": .f64, "FloatStorage": .f32, "HalfStorage": .f16, "BFloat16Storage": .bf16,
        "LongStorage": .i64, "IntStorage": .i32, "ShortStorage": .i16, "CharStorage": .i8,
        "ByteStorage": .u8, "BoolStorage": .bool, "ComplexFloatStorage": .c64, "ComplexDoubleStorage": .c128
    ]
    /// torch.<dtype> names.
    static let dtypes: [String: DType] = [
        "float64": .f64, "double": .f64, "float32": .f32, "float": .f32, "float16": .f16, "half": .f16,
        "bfloat16": .bf16, "int64": .i64, "long": .i64, "int32": .i32, "int": .i32, "int16": .i16, "short": .i16,
        "int8": .i8, "uint8": .u8, "bool": .bool, "uint16": .u16, "uint32": .u32, "uint64": .u64,
        "float8_e4m3fn": .f8e4m3, "float8_e5m2": .f8e5m2, "complex64": .c64, "complex128": .c128
    ]

    static func storageClass(_ d: DType) -> String? { storages.first { $0.value == d }?.key }

    static func dtypeName(_ d: DType) -> String {
        switch d {
        case .f8e4m3: return "float8_e4m3fn"
        case .f8e5m2: return "float8_e5m2"
        case .f64: return "float64"
        case .f32: return "float32"
        case .f16: return "float16"
        case .bf16: return "bfloat16"
        case .i64: return "int64"
        case .i32: return "int32"
        case .i16: return "int16"
        case .i8: return "int8"
        case .u8, .int4, .uint4: return "uint8"
        case .u16: return "uint16"
        case .u32: return "uint32"
        case .u64: return "uint64"
        case .bool: return "bool"
        case .c64: return "complex64"
        case .c128: return "complex128"
        }
    }

    /// The globals torch's weights_only loader accepts (FORMATS.md section C).
    static func isAllowed(_ module: String, _ name: String) -> Bool {
        switch module {
        case "collections": return name == "OrderedDict" || name == "Counter"
        case "torch.nn.parameter": return name == "Parameter"
        case "_codecs": return name == "encode"
        case "builtins": return ["bytearray", "set", "complex"].contains(name)
        case "torch.storage": return name == "UntypedStorage" || name == "TypedStorage"
        case "torch._tensor": return name == "_rebuild_from_type_v2"
        case "torch._utils":
            return [
                "_rebuild_tensor", "_rebuild_tensor_v2", "_rebuild_tensor_v3", "_rebuild_parameter",
                "_rebuild_parameter_with_state", "_rebuild_qtensor", "_rebuild_sparse_tensor",
                "_rebuild_meta_tensor_no_storage", "_rebuild_nested_tensor", "_rebuild_wrapper_subclass",
                "_rebuild_device_tensor_from_numpy", "_rebuild_device_tensor_from_cpu_tensor"
            ].contains(name)
        case "torch":
            return [
                "Size", "Tensor", "device", "per_tensor_affine", "per_channel_affine", "per_tensor_symmetric",
                "per_channel_symmetric", "per_channel_affine_float_qparams"
            ].contains(name)
                || dtypes[name] != nil || name.hasSuffix("Storage")
        default: return false
        }
    }
}
