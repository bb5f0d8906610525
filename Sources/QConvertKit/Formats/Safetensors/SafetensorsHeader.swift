import Foundation

/// One tensor as declared in a safetensors header.
public struct SafetensorsTensorInfo: Sendable {
    public var name: String
    public var dtype: DType
    public var shape: [Int]
    public var begin: Int
    public var end: Int
}

/// A parsed and validated safetensors header (FORMATS.md section A: every rule of the reference reader).
public struct SafetensorsHeader: Sendable {
    public var headerLength: Int
    public var metadata: [(key: String, value: String)]
    /// Tensors in data-offset order.
    public var tensors: [SafetensorsTensorInfo]

    public static let maxHeaderLength = 100_000_000

    public static func parse(_ file: UnsafeRawBufferPointer, path: String) throws -> SafetensorsHeader {
        func bad(_ r: SafetensorsRule) -> QConvertError { .violation(path: path, r) }
        let len = file.count
        guard len >= 8 else { throw bad(.tooSmall(fileSize: len)) }
        let n64 = file.loadUnaligned(as: UInt64.self).littleEndian
        // A length the file cannot hold and no '{' after it: not a safetensors file at all (a text
        // file, another format), rather than a broken one.
        if (n64 > UInt64(len - 8)) && (len == 8 || file[8] != UInt8(ascii: "{")) {
            throw bad(.notSafetensors)
        }
        guard n64 <= UInt64(maxHeaderLength) else { throw bad(.headerTooLong(length: n64, limit: maxHeaderLength)) }
        let n = Int(n64)
        guard 8 + n <= len else { throw bad(.headerPastEnd(length: n, fileSize: len)) }
        let hb = UnsafeRawBufferPointer(rebasing: file[8..<(8 + n)])
        guard String(validating: hb, as: UTF8.self) != nil else { throw bad(.headerNotUTF8) }
        let root: JSONValue
        do { root = try JSONParser.parse(hb) } catch let e as JSONParser.ParseError {
            throw bad(.headerNotJSON(reason: e.message, offset: e.offset))
        }
        guard let obj = root.objectValue else { throw bad(.headerNotObject) }
        var metadata: [(key: String, value: String)] = []
        var infos: [SafetensorsTensorInfo] = []
        for (name, v) in obj {
            if name == "__metadata__" {
                switch v {
                case .null: continue
                case .object(let kv):
                    for (k, mv) in kv {
                        guard let s = mv.stringValue else { throw bad(.metadataValueNotString(key: k)) }
                        metadata.append((k, s))
                    }
                default: throw bad(.metadataNotObject)
                }
                continue
            }
            guard let t = v.objectValue else { throw bad(.entryNotObject(tensor: name)) }
            guard let dn = v["dtype"]?.stringValue else { throw bad(.badDType(tensor: name, dtype: nil)) }
            guard let dtype = DType(safetensorsName: dn) else { throw bad(.badDType(tensor: name, dtype: dn)) }
            guard let sh = v["shape"]?.arrayValue else { throw bad(.missingShape(tensor: name)) }
            var shape: [Int] = []
            for d in sh {
                guard let i = d.nonNegativeInt else {
                    throw bad(.badDimension(tensor: name, value: d.compact))
                }
                shape.append(i)
            }
            guard let offs = v["data_offsets"]?.arrayValue, offs.count == 2,
                let b = offs[0].nonNegativeInt, let e = offs[1].nonNegativeInt
            else {
                throw bad(.badOffsets(tensor: name))
            }
            _ = t
            infos.append(SafetensorsTensorInfo(name: name, dtype: dtype, shape: shape, begin: b, end: e))
        }
        infos.sort { ($0.begin, $0.end) < ($1.begin, $1.end) }
        var prevEnd = 0
        for t in infos {
            guard t.begin == prevEnd else {
                throw bad(
                    t.begin > prevEnd
                        ? .hole(tensor: t.name, begin: t.begin, previousEnd: prevEnd)
                        : .overlap(tensor: t.name, begin: t.begin, previousEnd: prevEnd))
            }
            guard t.end >= t.begin else { throw bad(.endBeforeBegin(tensor: t.name, begin: t.begin, end: t.end)) }
            guard let nel = Shape(t.shape).checkedElementCount else {
                throw bad(.shapeOverflows(tensor: t.name, shape: t.shape))
            }
            let (nbits, o) = nel.multipliedReportingOverflow(by: t.dtype.bits)
            guard !o else { throw bad(.bitsOverflow(tensor: t.name)) }
            guard nbits % 8 == 0 else { throw bad(.partialBytes(tensor: t.name, elements: nel, dtype: dn(t.dtype))) }
            guard t.end - t.begin == nbits / 8 else {
                throw bad(
                    .sizeMismatch(
                        tensor: t.name, shape: t.shape, dtype: dn(t.dtype), needs: nbits / 8, spans: t.end - t.begin))
            }
            prevEnd = t.end
        }
        guard prevEnd + 8 + n == len else {
            throw bad(
                prevEnd + 8 + n < len
                    ? .trailingData(bytes: len - prevEnd - 8 - n) : .truncated(fileSize: len, declared: prevEnd + 8 + n)
            )
        }
        return SafetensorsHeader(headerLength: n, metadata: metadata, tensors: infos)
    }

    static func dn(_ d: DType) -> String { d.safetensorsName ?? d.rawValue }
}

/// The rules of the reference safetensors reader (FORMATS.md section A) a file can break.
public enum SafetensorsRule: FormatViolation, Equatable {
    case tooSmall(fileSize: Int)
    case notSafetensors
    case headerTooLong(length: UInt64, limit: Int)
    case headerPastEnd(length: Int, fileSize: Int)
    case headerNotUTF8
    case headerNotJSON(reason: String, offset: Int)
    case headerNotObject
    case metadataValueNotString(key: String)
    case metadataNotObject
    case entryNotObject(tensor: String)
    case badDType(tensor: String, dtype: String?)
    case missingShape(tensor: String)
    case badDimension(tensor: String, value: String)
    case badOffsets(tensor: String)
    case hole(tensor: String, begin: Int, previousEnd: Int)
    case overlap(tensor: String, begin: Int, previousEnd: Int)
    case endBeforeBegin(tensor: String, begin: Int, end: Int)
    case shapeOverflows(tensor: String, shape: [Int])
    case bitsOverflow(tensor: String)
    case partialBytes(tensor: String, elements: Int, dtype: String)
    case sizeMismatch(tensor: String, shape: [Int], dtype: String, needs: Int, spans: Int)
    case trailingData(bytes: Int)
    case truncated(fileSize: Int, declared: Int)

    public var description: String {
        switch self {
        case .tooSmall(let n): "file is \(n) bytes, too small for a safetensors header (needs 8-byte length)"
        case .notSafetensors:
            "not a safetensors file (its first 8 bytes are no header length and no JSON header follows)"
        case .headerTooLong(let n, _): "header length \(n) exceeds the 100 MB limit"
        case .headerPastEnd(let n, let len): "header length \(n) runs past the end of the \(len)-byte file (truncated?)"
        case .headerNotUTF8: "header is not valid UTF-8"
        case .headerNotJSON(let why, let at): "header is not valid JSON: \(why) at header byte \(at)"
        case .headerNotObject: "header is not a JSON object"
        case .metadataValueNotString(let k): "__metadata__ value of '\(k)' is not a string"
        case .metadataNotObject: "__metadata__ is not an object of strings"
        case .entryNotObject(let t): "tensor '\(t)': entry is not an object"
        case .badDType(let t, nil): "tensor '\(t)': missing or non-string dtype"
        case .badDType(let t, let d?): "tensor '\(t)': unknown dtype '\(d)'"
        case .missingShape(let t): "tensor '\(t)': missing shape"
        case .badDimension(let t, let v): "tensor '\(t)': shape entry \(v) is not a non-negative integer"
        case .badOffsets(let t): "tensor '\(t)': data_offsets must be two non-negative integers"
        case .hole(let t, let b, let e):
            "tensor '\(t)': data starts at \(b) but the previous tensor ends at \(e) (hole in the data)"
        case .overlap(let t, let b, let e):
            "tensor '\(t)': data starts at \(b), inside the previous tensor ending at \(e) (overlap)"
        case .endBeforeBegin(let t, let b, let e): "tensor '\(t)': data_offsets end \(e) is before begin \(b)"
        case .shapeOverflows(let t, let s): "tensor '\(t)': shape \(Shape(s)) overflows"
        case .bitsOverflow(let t): "tensor '\(t)': size in bits overflows"
        case .partialBytes(let t, let n, let d): "tensor '\(t)': \(n) elements of \(d) do not fill whole bytes"
        case .sizeMismatch(let t, let s, let d, let need, let span):
            "tensor '\(t)': shape \(Shape(s)) of \(d) needs \(need) bytes but data_offsets span \(span)"
        case .trailingData(let n): "\(n) bytes after the last tensor (trailing data is not allowed)"
        case .truncated(let len, let declared): "file is \(len) bytes but the header declares \(declared) (truncated)"
        }
    }
}
