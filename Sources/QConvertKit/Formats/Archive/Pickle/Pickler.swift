import Foundation

/// Writes protocol-2 pickles using only the opcodes torch's weights-only loader accepts
/// (no memo: repeated globals are simply written again).
struct Pickler {
    var out: [UInt8] = [0x80, 0x02]
    /// Output tensor index → (storage key, dtype, element count) for persistent ids.
    let storageOf: (Int) -> (key: String, dtype: DType, numel: Int)

    init(storageOf: @escaping (Int) -> (key: String, dtype: DType, numel: Int)) { self.storageOf = storageOf }

    mutating func finish() -> [UInt8] {
        out.append(UInt8(ascii: "."))
        return out
    }

    mutating func global(_ module: String, _ name: String) {
        out.append(UInt8(ascii: "c"))
        out += Array("\(module)\n\(name)\n".utf8)
    }

    mutating func int(_ v: Int) {
        if v >= 0 && v < 256 {
            out += [UInt8(ascii: "K"), UInt8(v)]
        } else if v >= 0 && v < 65536 {
            out += [UInt8(ascii: "M"), UInt8(v & 0xFF), UInt8(v >> 8)]
        } else if v >= Int(Int32.min) && v <= Int(Int32.max) {
            out.append(UInt8(ascii: "J"))
            withUnsafeBytes(of: Int32(v).littleEndian) { out += $0 }
        } else {
            out += [0x8a, 8]
            withUnsafeBytes(of: Int64(v).littleEndian) { out += $0 }
        }
    }

    mutating func string(_ s: String) {
        let u = Array(s.utf8)
        out.append(UInt8(ascii: "X"))
        withUnsafeBytes(of: UInt32(u.count).littleEndian) { out += $0 }
        out += u
    }

    mutating func ints(_ v: [Int]) {
        switch v.count {
        case 0: out.append(UInt8(ascii: ")"))
        case 1...3:
            for x in v { int(x) }
            out.append([0x85, 0x86, 0x87][v.count - 1])
        default:
            out.append(UInt8(ascii: "("))
            for x in v { int(x) }
            out.append(UInt8(ascii: "t"))
        }
    }

    mutating func emptyOrderedDict() {
        global("collections", "OrderedDict")
        out += [UInt8(ascii: ")"), UInt8(ascii: "R")]
    }

    /// `_rebuild_tensor_v2` (or v3 for dtypes without a legacy storage class) of output tensor `index`,
    /// contiguous, at offset 0 of its own storage.
    mutating func tensor(_ index: Int, shape: [Int], parameter: Bool, requiresGrad: Bool) {
        let (key, dtype, numel) = storageOf(index)
        let legacy = TorchTypes.storageClass(dtype)
        if parameter {
            global("torch._utils", "_rebuild_parameter")
            out.append(UInt8(ascii: "("))
        }
        global("torch._utils", legacy != nil ? "_rebuild_tensor_v2" : "_rebuild_tensor_v3")
        out.append(UInt8(ascii: "("))
        // persistent id ('storage', class, key, 'cpu', numel)
        out.append(UInt8(ascii: "("))
        string("storage")
        if let legacy { global("torch", legacy) } else { global("torch.storage", "UntypedStorage") }
        string(key)
        string("cpu")
        int(legacy != nil ? numel : numel * max(dtype.bits / 8, 1))
        out.append(UInt8(ascii: "t"))
        out.append(UInt8(ascii: "Q"))
        int(0)
        ints(shape)
        var strides = [Int](repeating: 1, count: shape.count)
        for k in stride(from: shape.count - 2, through: 0, by: -1) { strides[k] = strides[k + 1] * shape[k + 1] }
        ints(strides)
        out.append(requiresGrad && !parameter ? 0x88 : 0x89)
        emptyOrderedDict()
        if legacy == nil { global("torch", TorchTypes.dtypeName(dtype)) }
        out += [UInt8(ascii: "t"), UInt8(ascii: "R")]
        if parameter {
            out.append(requiresGrad ? 0x88 : 0x89)
            emptyOrderedDict()
            out += [UInt8(ascii: "t"), UInt8(ascii: "R")]
        }
    }

    /// Any plain value; tensors are written through `tensorWriter`.
    mutating func value(_ v: PickleValue, tensorWriter: (inout Pickler, PTTensor) -> Void) {
        switch v {
        case .none, .mark: out.append(UInt8(ascii: "N"))
        case .bool(let b): out.append(b ? 0x88 : 0x89)
        case .int(let i): int(i)
        case .bigInt(let b): out += [0x8a, UInt8(b.count)] + b
        case .float(let d):
            out.append(UInt8(ascii: "G"))
            withUnsafeBytes(of: d.bitPattern.bigEndian) { out += $0 }
        case .string(let s): string(s)
        case .bytes(let b):
            global("_codecs", "encode")
            out.append(UInt8(ascii: "("))
            string(String(String.UnicodeScalarView(b.map { Unicode.Scalar($0) })))
            string("latin1")
            out += [UInt8(ascii: "t"), UInt8(ascii: "R")]
        case .tuple(let items):
            if items.count <= 3 && !items.isEmpty {
                for i in items { value(i, tensorWriter: tensorWriter) }
                out.append([0x85, 0x86, 0x87][items.count - 1])
            } else if items.isEmpty {
                out.append(UInt8(ascii: ")"))
            } else {
                out.append(UInt8(ascii: "("))
                for i in items { value(i, tensorWriter: tensorWriter) }
                out.append(UInt8(ascii: "t"))
            }
        case .list(let l):
            out.append(UInt8(ascii: "]"))
            if !l.items.isEmpty {
                out.append(UInt8(ascii: "("))
                for i in l.items { value(i, tensorWriter: tensorWriter) }
                out.append(UInt8(ascii: "e"))
            }
        case .set(let items):
            global("builtins", "set")
            out.append(UInt8(ascii: "("))
            out.append(UInt8(ascii: "]"))
            if !items.isEmpty {
                out.append(UInt8(ascii: "("))
                for i in items { value(i, tensorWriter: tensorWriter) }
                out.append(UInt8(ascii: "e"))
            }
            out += [UInt8(ascii: "t"), UInt8(ascii: "R")]
        case .dict(let d):
            if d.ordered { emptyOrderedDict() } else { out.append(UInt8(ascii: "}")) }
            if !d.items.isEmpty {
                out.append(UInt8(ascii: "("))
                for (k, v) in d.items {
                    value(k, tensorWriter: tensorWriter)
                    value(v, tensorWriter: tensorWriter)
                }
                out.append(UInt8(ascii: "u"))
            }
            if let s = d.state {
                value(s, tensorWriter: tensorWriter)
                out.append(UInt8(ascii: "b"))
            }
        case .global(let m, let n): global(m, n)
        case .tensor(let t): tensorWriter(&self, t)
        case .storage: out.append(UInt8(ascii: "N"))
        }
    }
}
