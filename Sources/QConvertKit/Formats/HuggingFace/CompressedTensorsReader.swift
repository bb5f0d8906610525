import CQKernels
import Foundation

/// Reads a checkpoint in the compressed-tensors layout (config.json's `quantization_config`, status
/// `compressed`) as the float model it stands for, as GGUF's block types are read: each quantized Linear
/// weight becomes `m.weight` in the model's dtype, dequantized as compressed-tensors does it,
/// `(q − zero_point) · scale`, while it is used; its packed values, scale, zero point and shape tensors
/// are consumed. So `inspect`, `plan`, `diff`, `dequantize` and conversion to every format read it.
enum CompressedTensorsReader {
    struct Group {
        var targets: [String]
        /// The `re:` targets compiled once, as policy patterns are (linear time: the file is input).
        var patterns: [NamePattern]
        var bits: Int
        var float: Bool
        var strategy: String
        var groupSize: Int?
    }

    /// The groups of a compressed checkpoint's config; nil when the config describes no compressed-tensors
    /// checkpoint (or one whose weights are not compressed).
    static func groups(_ config: JSONValue, path: String) throws -> [Group]? {
        guard let q = config["quantization_config"], q["quant_method"]?.stringValue == "compressed-tensors",
            (q["quantization_status"]?.stringValue ?? "compressed") == "compressed"
        else { return nil }
        func bad(_ m: String) -> QConvertError { .badInput(path: path, message: "quantization_config: \(m)") }
        guard let cg = q["config_groups"]?.objectValue else { throw bad("no config_groups object") }
        var out: [Group] = []
        for (name, g) in cg {
            let targets = (g["targets"]?.arrayValue ?? []).compactMap(\.stringValue)
            guard let w = g["weights"], case .object = w else { continue }  // activations only: no weights to read
            guard let bits = w["num_bits"]?.nonNegativeInt, (1...8).contains(bits) else {
                throw bad("group '\(name)': num_bits is not 1 to 8")
            }
            let type = w["type"]?.stringValue ?? "int"
            guard type == "int" || (type == "float" && bits == 8) else {
                throw bad("group '\(name)': weights of type \(type) with \(bits) bits are not read")
            }
            let strategy = w["strategy"]?.stringValue ?? "tensor"
            guard ["tensor", "channel", "group"].contains(strategy) else {
                throw bad("group '\(name)': strategy '\(strategy)' is not read (tensor, channel and group are)")
            }
            let gs = w["group_size"]?.nonNegativeInt
            if strategy == "group" && (gs ?? 0) < 1 { throw bad("group '\(name)': no group_size") }
            // re.match semantics: anchored at the start only; a pattern the linear matcher cannot take
            // (look-around, back-references) selects nothing
            let patterns = targets.filter { $0.hasPrefix("re:") }.compactMap {
                NamePattern("re:(?:" + $0.dropFirst(3) + ").*")
            }
            out.append(
                Group(
                    targets: targets, patterns: patterns, bits: bits, float: type == "float", strategy: strategy,
                    groupSize: gs))
        }
        return out
    }

    /// Whether a group selects a module: a `re:` target matching its name, the name itself, or a class
    /// name (Linear), which selects every module holding quantized weights.
    static func selects(_ g: Group, _ module: String) -> Bool {
        g.patterns.contains { $0.matches(module) }
            || g.targets.contains { t in
                !t.hasPrefix("re:") && (t == module || !t.contains(".") && t.first?.isUppercase == true)
            }
    }

    /// The entries of the float model, and the names of the weights dequantized on read.
    static func decode(_ entries: [TensorEntry], groups: [Group], config: JSONValue, path: String) throws
        -> (entries: [TensorEntry], dequantized: [String])
    {
        let byName = Dictionary(entries.map { ($0.name, $0) }, uniquingKeysWith: { a, _ in a })
        func bad(_ m: String) -> QConvertError { .badInput(path: path, message: m) }
        var consumed = Set<String>()
        var replaced: [String: TensorEntry] = [:]
        var dequantized: [String] = []
        for e in entries {
            let module: String
            let packed: Bool
            if e.name.hasSuffix(".weight_packed") {
                module = String(e.name.dropLast(".weight_packed".count))
                packed = true
            } else if e.name.hasSuffix(".weight"), byName[e.name + "_scale"] != nil,
                [.i8, .f8e4m3].contains(e.dtype)
            {
                module = String(e.name.dropLast(".weight".count))
                packed = false
            } else {
                continue
            }
            guard
                let g = groups.first(where: { selects($0, module) })
                    ?? (groups.count == 1 ? groups[0] : nil)
            else { throw bad("'\(e.name)': no config group of quantization_config selects module '\(module)'") }
            guard let scale = byName[module + ".weight_scale"] else { throw bad("'\(e.name)' has no weight_scale") }
            guard [.f32, .f16, .bf16].contains(scale.dtype) else {
                throw bad("'\(module).weight_scale' is \(scale.dtype.rawValue), not a float type")
            }
            // the weight's shape: weight_shape for packed values, the values' own otherwise
            var shape = e.shape
            if packed {
                guard let s = byName[module + ".weight_shape"], s.dtype == .i64 || s.dtype == .i32, s.elementCount == 2
                else { throw bad("'\(e.name)' has no weight_shape of two integers") }
                let dims: [Int] = try s.bytes.withUnsafeBytes { raw in
                    s.dtype == .i64
                        ? (0..<2).map {
                            Int(Int64(littleEndian: raw.loadUnaligned(fromByteOffset: $0 * 8, as: Int64.self)))
                        }
                        : (0..<2).map {
                            Int(Int32(littleEndian: raw.loadUnaligned(fromByteOffset: $0 * 4, as: Int32.self)))
                        }
                }
                // in_features is bounded by what the packed words can hold before it is multiplied
                guard e.dtype == .i32, e.shape.count == 2, dims[0] == e.shape[0], dims[1] >= 0,
                    dims[1] <= e.shape[1] * 32, e.shape[1] == (dims[1] * g.bits + 31) / 32
                else {
                    throw bad(
                        "'\(e.name)' is \(e.dtype.rawValue) \(e.shape), not the int32 [\(dims[0]), ceil(\(dims[1])·\(g.bits)/32)] weight_shape \(dims) implies"
                    )
                }
                shape = dims
                consumed.insert(module + ".weight_shape")
            }
            guard shape.count == 2 else { throw bad("'\(e.name)' is not 2-D") }
            let (rows, cols) = (shape[0], shape[1])
            let groupsPerRow: Int
            switch g.strategy {
            case "tensor": groupsPerRow = 1
            case "channel": groupsPerRow = 1
            default: groupsPerRow = (cols + g.groupSize! - 1) / g.groupSize!
            }
            let paramRows = g.strategy == "tensor" ? 1 : rows
            guard scale.elementCount == paramRows * groupsPerRow else {
                throw bad(
                    "'\(module).weight_scale' holds \(scale.elementCount) values; \(g.strategy) quantization of \(shape) needs \(paramRows * groupsPerRow)"
                )
            }
            let zp = byName[module + ".weight_zero_point"]
            var zpPacked = false
            if let z = zp {
                let words = (rows * g.bits + 31) / 32
                if z.dtype == .i32, g.strategy != "tensor", z.shape == [words, groupsPerRow], words != rows {
                    zpPacked = true
                } else if z.elementCount == paramRows * groupsPerRow, [.i8, .i32, .u8].contains(z.dtype) {
                    zpPacked = false
                } else {
                    throw bad("'\(module).weight_zero_point' has the wrong type or shape \(z.shape)")
                }
                consumed.insert(z.name)
            }
            consumed.insert(scale.name)
            let outType = scale.dtype
            let zeroPointPacked = zpPacked
            let values = e
            let bits = g.bits
            let isFloat = g.float
            let groupSize = g.groupSize ?? cols
            // parameter of element (r, c): r · rowStride + c / groupSize (per tensor: 0; per channel: r)
            let rowStride = g.strategy == "tensor" ? 0 : groupsPerRow
            let columnsPerParameter = g.strategy == "group" ? groupSize : Int.max
            let count = rows * cols * outType.bits / 8
            let bytes = TensorBytes.deferred(
                DeferredBytes(count: count, path: path, what: "tensor '\(module).weight' (compressed-tensors)") {
                    let s = try scale.bytes.withUnsafeBytes {
                        FloatDecoding.toFloat32($0, dtype: scale.dtype, count: scale.elementCount)
                    }
                    var z = [Int32](repeating: 0, count: s.count)
                    if let zp {
                        z = try zp.bytes.withUnsafeBytes { raw in
                            zeroPointPacked
                                ? unpackColumns(raw, rows: rows, columns: groupsPerRow, bits: bits)
                                : (0..<s.count).map { i in
                                    switch zp.dtype {
                                    case .i32:
                                        Int32(littleEndian: raw.loadUnaligned(fromByteOffset: i * 4, as: Int32.self))
                                    case .u8: Int32(raw[i])
                                    default: Int32(Int8(bitPattern: raw[i]))
                                    }
                                }
                        }
                    }
                    var out = [Float](repeating: 0, count: rows * cols)
                    try values.bytes.withUnsafeBytes { raw in
                        let wordsPerRow = (cols * bits + 31) / 32
                        let half = Int32(1 << (bits - 1))
                        let mask = UInt64((1 << bits) - 1)
                        for r in 0..<rows {
                            for c in 0..<cols {
                                let p = r * rowStride + c / columnsPerParameter
                                let v: Float
                                if packed {
                                    let bit = c * bits
                                    let base = (r * wordsPerRow + bit / 32) * 4
                                    var word = UInt64(
                                        UInt32(littleEndian: raw.loadUnaligned(fromByteOffset: base, as: UInt32.self)))
                                    if bit % 32 + bits > 32 {
                                        word |=
                                            UInt64(
                                                UInt32(
                                                    littleEndian: raw.loadUnaligned(
                                                        fromByteOffset: base + 4, as: UInt32.self))) << 32
                                    }
                                    let q = Int32((word >> UInt64(bit % 32)) & mask) - half
                                    v = Float(q - z[p])
                                } else if isFloat {
                                    v = FP8.decode(raw[r * cols + c], format: .e4m3)
                                } else {
                                    v = Float(Int32(Int8(bitPattern: raw[r * cols + c])) - z[p])
                                }
                                out[r * cols + c] = v * s[p]
                            }
                        }
                    }
                    values.bytes.release()
                    return encodeFloats(out, as: outType)
                })
            replaced[e.name] = TensorEntry(
                name: module + ".weight", dtype: outType, shape: shape, bytes: bytes, outputAxis: 0, shard: e.shard)
            dequantized.append(module + ".weight")
        }
        var out: [TensorEntry] = []
        for e in entries where !consumed.contains(e.name) { out.append(replaced[e.name] ?? e) }
        return (out, dequantized)
    }

    /// Values packed along the first axis: `columns` columns of `rows` values, each column's values
    /// densely in the bit stream of its words, offset by 2^(bits−1).
    static func unpackColumns(_ raw: UnsafeRawBufferPointer, rows: Int, columns: Int, bits: Int) -> [Int32] {
        var out = [Int32](repeating: 0, count: rows * columns)
        let half = Int32(1 << (bits - 1))
        let mask = UInt64((1 << bits) - 1)
        for j in 0..<columns {
            for r in 0..<rows {
                let bit = r * bits
                func word(_ w: Int) -> UInt64 {
                    UInt64(
                        UInt32(littleEndian: raw.loadUnaligned(fromByteOffset: (w * columns + j) * 4, as: UInt32.self)))
                }
                var v = word(bit / 32)
                if bit % 32 + bits > 32 { v |= word(bit / 32 + 1) << 32 }
                out[r * columns + j] = Int32((v >> UInt64(bit % 32)) & mask) - half
            }
        }
        return out
    }

    static func encodeFloats(_ v: [Float], as dtype: DType) -> [UInt8] {
        switch dtype {
        case .f16:
            var h = [UInt16](repeating: 0, count: v.count)
            _ = h.withUnsafeMutableBufferPointer { qk_f32_to_f16(v, Int64(v.count), $0.baseAddress, 1) }
            return h.withUnsafeBytes { [UInt8]($0) }
        case .bf16:
            var h = [UInt16](repeating: 0, count: v.count)
            h.withUnsafeMutableBufferPointer { qk_f32_to_bf16(v, Int64(v.count), $0.baseAddress) }
            return h.withUnsafeBytes { [UInt8]($0) }
        default:
            return v.withUnsafeBytes { [UInt8]($0) }
        }
    }
}
