import Foundation

/// The block types of GGUF tensors: element count per block and bytes per block (llama.cpp's ggml types).
public enum GGMLType: UInt32, Sendable, CaseIterable {
    case f32 = 0
    case f16 = 1
    case q4_0 = 2
    case q4_1 = 3
    case q5_0 = 6
    case q5_1 = 7
    case q8_0 = 8
    case q8_1 = 9
    case q2_K = 10
    case q3_K = 11
    case q4_K = 12
    case q5_K = 13
    case q6_K = 14
    case q8_K = 15
    case i8 = 24
    case i16 = 25
    case i32 = 26
    case i64 = 27
    case f64 = 28
    case bf16 = 30

    /// (elements per block, bytes per block)
    public var block: (elements: Int, bytes: Int) {
        switch self {
        case .f32, .i32: (1, 4)
        case .f16, .bf16, .i16: (1, 2)
        case .i8: (1, 1)
        case .i64, .f64: (1, 8)
        case .q4_0: (32, 18)
        case .q4_1: (32, 20)
        case .q5_0: (32, 22)
        case .q5_1: (32, 24)
        case .q8_0: (32, 34)
        case .q8_1: (32, 36)
        case .q2_K: (256, 84)
        case .q3_K: (256, 110)
        case .q4_K: (256, 144)
        case .q5_K: (256, 176)
        case .q6_K: (256, 210)
        case .q8_K: (256, 292)
        }
    }

    /// llama.cpp's name (`Q8_0`, `F16`, ...).
    public var name: String {
        switch self {
        case .f32: "F32"
        case .f16: "F16"
        case .bf16: "BF16"
        case .f64: "F64"
        case .i8: "I8"
        case .i16: "I16"
        case .i32: "I32"
        case .i64: "I64"
        case .q4_0: "Q4_0"
        case .q4_1: "Q4_1"
        case .q5_0: "Q5_0"
        case .q5_1: "Q5_1"
        case .q8_0: "Q8_0"
        case .q8_1: "Q8_1"
        case .q2_K: "Q2_K"
        case .q3_K: "Q3_K"
        case .q4_K: "Q4_K"
        case .q5_K: "Q5_K"
        case .q6_K: "Q6_K"
        case .q8_K: "Q8_K"
        }
    }

    /// The dtype the tensor is read as: its own for plain types, float32 for block types (dequantized).
    var readDType: DType {
        switch self {
        case .f32: .f32
        case .f16: .f16
        case .bf16: .bf16
        case .f64: .f64
        case .i8: .i8
        case .i16: .i16
        case .i32: .i32
        case .i64: .i64
        case .q4_0, .q4_1, .q5_0, .q5_1, .q8_0, .q8_1, .q2_K, .q3_K, .q4_K, .q5_K, .q6_K, .q8_K: .f32
        }
    }
}

/// A GGUF metadata value (every type of the format, arrays nested).
public indirect enum GGUFValue: Sendable, Equatable {
    case uint(UInt64, type: UInt32)
    case int(Int64, type: UInt32)
    case float(Double, type: UInt32)
    case bool(Bool)
    case string(String)
    case array(elementType: UInt32, [GGUFValue])

    /// The value as text, for `inspect` and the checkpoint's metadata.
    public var text: String {
        switch self {
        case .uint(let v, _): String(v)
        case .int(let v, _): String(v)
        case .float(let v, _): "\(v)"
        case .bool(let b): b ? "true" : "false"
        case .string(let s): s
        case .array(_, let items):
            items.count > 16
                ? "[\(items.prefix(8).map(\.text).joined(separator: ", ")), … \(items.count) items]"
                : "[\(items.map(\.text).joined(separator: ", "))]"
        }
    }
}

/// One tensor as a GGUF file declares it (dims innermost first, as in the file).
public struct GGUFTensorInfo: Sendable {
    public var name: String
    public var dims: [Int]
    public var type: GGMLType
    /// Offset from the start of the data section.
    public var offset: Int
    public var byteCount: Int
}

/// A parsed and validated GGUF file (versions 2 and 3).
public struct GGUFFile: Sendable {
    public var version: Int
    public var metadata: [(key: String, value: GGUFValue)]
    public var tensors: [GGUFTensorInfo]
    public var alignment: Int
    /// Where the data section starts in the file.
    public var dataOffset: Int

    /// Bounds on what a file may declare before its bytes are read: counts and lengths must also fit in
    /// the bytes that remain, so a lying count costs nothing.
    static let maxTensors = 1 << 20
    static let maxKeyValues = 1 << 20
    static let maxStringLength = 1 << 26
    static let maxArrayDepth = 8
    static let maxDims = 4

    public static func parse(_ b: UnsafeRawBufferPointer, path: String) throws -> GGUFFile {
        var r = GGUFCursor(bytes: b, path: path)
        guard b.count >= 4, Array(b[0..<4]) == Array("GGUF".utf8) else { throw r.bad(.notGGUF) }
        r.pos = 4
        let version = Int(try r.u32())
        guard version == 2 || version == 3 else { throw r.bad(.unsupportedVersion(version)) }
        let tensorCount = try r.u64()
        let kvCount = try r.u64()
        guard tensorCount <= UInt64(maxTensors), tensorCount <= UInt64(b.count / 24) else {
            throw r.bad(.countTooLarge(what: "tensor", count: tensorCount))
        }
        guard kvCount <= UInt64(maxKeyValues), kvCount <= UInt64(b.count / 13) else {
            throw r.bad(.countTooLarge(what: "metadata key", count: kvCount))
        }
        var metadata: [(key: String, value: GGUFValue)] = []
        var keys = Set<String>()
        for _ in 0..<Int(kvCount) {
            let key = try r.string()
            guard keys.insert(key).inserted else { throw r.bad(.duplicateKey(key)) }
            let type = try r.u32()
            metadata.append((key, try r.value(type: type, depth: 0)))
        }
        var alignment = 32
        if let a = metadata.first(where: { $0.key == "general.alignment" })?.value {
            guard case .uint(let v, _) = a, v > 0, v <= 1 << 20, v & (v - 1) == 0 else {
                throw r.bad(.badAlignment(a.text))
            }
            alignment = Int(v)
        }
        var infos: [GGUFTensorInfo] = []
        var names = Set<String>()
        for _ in 0..<Int(tensorCount) {
            let name = try r.string()
            guard names.insert(name).inserted else { throw r.bad(.duplicateTensor(name)) }
            let nd = Int(try r.u32())
            guard nd >= 1, nd <= maxDims else { throw r.bad(.badDimensionCount(tensor: name, count: nd)) }
            var dims: [Int] = []
            for _ in 0..<nd {
                let d = try r.u64()
                guard d <= UInt64(Int32.max) else { throw r.bad(.dimensionTooLarge(tensor: name, dim: d)) }
                dims.append(Int(d))
            }
            // the element count in either order of the dims (GGUF's and qconvert's) must be representable
            guard Shape(dims).checkedElementCount != nil, Shape(dims.reversed()).checkedElementCount != nil else {
                throw r.bad(.dimensionTooLarge(tensor: name, dim: UInt64(dims.max() ?? 0)))
            }
            let rawType = try r.u32()
            guard let type = GGMLType(rawValue: rawType) else { throw r.bad(.unknownType(tensor: name, type: rawType)) }
            let offset = try r.u64()
            let (per, size) = type.block
            guard dims[0] % per == 0 else {
                throw r.bad(.rowNotWholeBlocks(tensor: name, row: dims[0], type: type.name, block: per))
            }
            var bytes = dims[0] / per * size
            for d in dims.dropFirst() {
                let (m, o) = bytes.multipliedReportingOverflow(by: d)
                guard !o, m <= b.count else { throw r.bad(.tensorPastEnd(tensor: name)) }
                bytes = m
            }
            guard offset <= UInt64(b.count), Int(offset) % alignment == 0 else {
                throw r.bad(.misaligned(tensor: name, offset: offset, alignment: alignment))
            }
            infos.append(GGUFTensorInfo(name: name, dims: dims, type: type, offset: Int(offset), byteCount: bytes))
        }
        let dataOffset = (r.pos + alignment - 1) / alignment * alignment
        guard dataOffset <= b.count else { throw r.bad(.tensorPastEnd(tensor: infos.first?.name ?? "")) }
        // Every tensor inside the file, none overlapping another.
        var end = 0
        var lastName = ""
        for t in infos.sorted(by: { $0.offset < $1.offset }) {
            guard t.offset >= end else { throw r.bad(.overlap(tensor: t.name, other: lastName)) }
            guard t.byteCount <= b.count - dataOffset - t.offset else { throw r.bad(.tensorPastEnd(tensor: t.name)) }
            end = t.offset + t.byteCount
            lastName = t.name
        }
        return GGUFFile(
            version: version, metadata: metadata, tensors: infos, alignment: alignment, dataOffset: dataOffset)
    }
}

/// Reads the little-endian fields of a GGUF header, each bounded by the bytes that remain.
struct GGUFCursor {
    let bytes: UnsafeRawBufferPointer
    let path: String
    var pos = 0

    func bad(_ r: GGUFRule) -> QConvertError { .violation(path: path, r) }

    mutating func take(_ n: Int) throws -> UnsafeRawBufferPointer {
        guard n >= 0, n <= bytes.count - pos else { throw bad(.truncated(at: pos)) }
        defer { pos += n }
        return UnsafeRawBufferPointer(rebasing: bytes[pos..<(pos + n)])
    }

    mutating func u8() throws -> UInt8 { try take(1)[0] }
    mutating func u16() throws -> UInt16 { try take(2).loadUnaligned(as: UInt16.self).littleEndian }
    mutating func u32() throws -> UInt32 { try take(4).loadUnaligned(as: UInt32.self).littleEndian }
    mutating func u64() throws -> UInt64 { try take(8).loadUnaligned(as: UInt64.self).littleEndian }

    mutating func string() throws -> String {
        let n = try u64()
        guard n <= UInt64(GGUFFile.maxStringLength), n <= UInt64(bytes.count - pos) else {
            throw bad(.stringTooLong(at: pos, length: n))
        }
        let raw = try take(Int(n))
        guard let s = String(validating: raw, as: UTF8.self) else { throw bad(.notUTF8(at: pos - Int(n))) }
        return s
    }

    mutating func value(type: UInt32, depth: Int) throws -> GGUFValue {
        switch type {
        case 0: return .uint(UInt64(try u8()), type: type)
        case 1: return .int(Int64(Int8(bitPattern: try u8())), type: type)
        case 2: return .uint(UInt64(try u16()), type: type)
        case 3: return .int(Int64(Int16(bitPattern: try u16())), type: type)
        case 4: return .uint(UInt64(try u32()), type: type)
        case 5: return .int(Int64(Int32(bitPattern: try u32())), type: type)
        case 6: return .float(Double(Float(bitPattern: try u32())), type: type)
        case 7:
            let v = try u8()
            guard v <= 1 else { throw bad(.badBool(at: pos - 1)) }
            return .bool(v == 1)
        case 8: return .string(try string())
        case 9:
            guard depth < GGUFFile.maxArrayDepth else { throw bad(.arraysTooDeep(limit: GGUFFile.maxArrayDepth)) }
            let elementType = try u32()
            let count = try u64()
            // every element takes at least one byte (strings and arrays at least eight)
            guard count <= UInt64(bytes.count - pos) else {
                throw bad(.countTooLarge(what: "array element", count: count))
            }
            var items: [GGUFValue] = []
            items.reserveCapacity(Int(count))
            for _ in 0..<Int(count) { items.append(try value(type: elementType, depth: depth + 1)) }
            return .array(elementType: elementType, items)
        case 10: return .uint(try u64(), type: type)
        case 11: return .int(Int64(bitPattern: try u64()), type: type)
        case 12: return .float(Double(bitPattern: try u64()), type: type)
        default: throw bad(.unknownValueType(type, at: pos - 4))
        }
    }
}

/// The rules of the GGUF format (and qconvert's bounds on it) a file can break.
public enum GGUFRule: FormatViolation, Equatable {
    case notGGUF
    case unsupportedVersion(Int)
    case truncated(at: Int)
    case countTooLarge(what: String, count: UInt64)
    case stringTooLong(at: Int, length: UInt64)
    case notUTF8(at: Int)
    case badBool(at: Int)
    case unknownValueType(UInt32, at: Int)
    case arraysTooDeep(limit: Int)
    case duplicateKey(String)
    case duplicateTensor(String)
    case badAlignment(String)
    case badDimensionCount(tensor: String, count: Int)
    case dimensionTooLarge(tensor: String, dim: UInt64)
    case unknownType(tensor: String, type: UInt32)
    case rowNotWholeBlocks(tensor: String, row: Int, type: String, block: Int)
    case misaligned(tensor: String, offset: UInt64, alignment: Int)
    case tensorPastEnd(tensor: String)
    case overlap(tensor: String, other: String)
    case unsupportedType(tensor: String, type: String)

    public var description: String {
        switch self {
        case .notGGUF: "not a GGUF file (no GGUF magic)"
        case .unsupportedVersion(let v): "GGUF version \(v) is not supported (2 and 3 are)"
        case .truncated(let at): "the header ends early at byte \(at) (truncated?)"
        case .countTooLarge(let what, let n): "\(n) \(what)s declared: more than the file can hold"
        case .stringTooLong(let at, let n): "a string of \(n) bytes at byte \(at) runs past the end or the 64 MiB limit"
        case .notUTF8(let at): "the string at byte \(at) is not UTF-8"
        case .badBool(let at): "the bool at byte \(at) is neither 0 nor 1"
        case .unknownValueType(let t, let at): "metadata value type \(t) at byte \(at) is unknown"
        case .arraysTooDeep(let n): "metadata arrays nested deeper than \(n) levels"
        case .duplicateKey(let k): "metadata key '\(k)' appears twice"
        case .duplicateTensor(let t): "tensor '\(t)' appears twice"
        case .badAlignment(let a): "general.alignment \(a) is not a power of two up to 1 MiB"
        case .badDimensionCount(let t, let n): "tensor '\(t)': \(n) dimensions (1 to 4 allowed)"
        case .dimensionTooLarge(let t, let d): "tensor '\(t)': dimension \(d) is too large"
        case .unknownType(let t, let ty): "tensor '\(t)': unknown type \(ty)"
        case .rowNotWholeBlocks(let t, let row, let ty, let blk):
            "tensor '\(t)': a row of \(row) is not whole \(ty) blocks of \(blk)"
        case .misaligned(let t, let off, let a):
            "tensor '\(t)': data offset \(off) is not a multiple of the alignment \(a)"
        case .tensorPastEnd(let t): "tensor '\(t)': data runs past the end of the file (truncated?)"
        case .overlap(let t, let o): "tensor '\(t)': data overlaps tensor '\(o)'"
        case .unsupportedType(let t, let ty): "tensor '\(t)': type \(ty) cannot be read yet"
        }
    }
}
