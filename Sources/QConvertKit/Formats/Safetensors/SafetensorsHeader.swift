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
        func bad(_ m: String) -> QConvertError { .badInput(path: path, message: m) }
        let len = file.count
        guard len >= 8 else { throw bad("file is \(len) bytes, too small for a safetensors header (needs 8-byte length)") }
        let n64 = file.loadUnaligned(as: UInt64.self).littleEndian
        // A length the file cannot hold and no '{' after it: not a safetensors file at all (a text
        // file, another format), rather than a broken one.
        if (n64 > UInt64(len - 8)) && (len == 8 || file[8] != UInt8(ascii: "{")) {
            throw bad("not a safetensors file (its first 8 bytes are no header length and no JSON header follows)")
        }
        guard n64 <= UInt64(maxHeaderLength) else { throw bad("header length \(n64) exceeds the 100 MB limit") }
        let n = Int(n64)
        guard 8 + n <= len else { throw bad("header length \(n) runs past the end of the \(len)-byte file (truncated?)") }
        let hb = UnsafeRawBufferPointer(rebasing: file[8..<(8 + n)])
        guard String(validating: hb, as: UTF8.self) != nil else { throw bad("header is not valid UTF-8") }
        let root: JSONValue
        do { root = try JSONParser.parse(hb) } catch let e as JSONParser.ParseError {
            throw bad("header is not valid JSON: \(e.message) at header byte \(e.offset)")
        }
        guard let obj = root.objectValue else { throw bad("header is not a JSON object") }
        var metadata: [(key: String, value: String)] = []
        var infos: [SafetensorsTensorInfo] = []
        for (name, v) in obj {
            if name == "__metadata__" {
                switch v {
                case .null: continue
                case .object(let kv):
                    for (k, mv) in kv {
                        guard let s = mv.stringValue else { throw bad("__metadata__ value of '\(k)' is not a string") }
                        metadata.append((k, s))
                    }
                default: throw bad("__metadata__ is not an object of strings")
                }
                continue
            }
            guard let t = v.objectValue else { throw bad("tensor '\(name)': entry is not an object") }
            guard let dn = v["dtype"]?.stringValue else { throw bad("tensor '\(name)': missing or non-string dtype") }
            guard let dtype = DType(safetensorsName: dn) else { throw bad("tensor '\(name)': unknown dtype '\(dn)'") }
            guard let sh = v["shape"]?.arrayValue else { throw bad("tensor '\(name)': missing shape") }
            var shape: [Int] = []
            for d in sh {
                guard let i = d.nonNegativeInt else {
                    throw bad("tensor '\(name)': shape entry \(d.compact) is not a non-negative integer")
                }
                shape.append(i)
            }
            guard let offs = v["data_offsets"]?.arrayValue, offs.count == 2,
                let b = offs[0].nonNegativeInt, let e = offs[1].nonNegativeInt
            else {
                throw bad("tensor '\(name)': data_offsets must be two non-negative integers")
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
                        ? "tensor '\(t.name)': data starts at \(t.begin) but the previous tensor ends at \(prevEnd) (hole in the data)"
                        : "tensor '\(t.name)': data starts at \(t.begin), inside the previous tensor ending at \(prevEnd) (overlap)")
            }
            guard t.end >= t.begin else { throw bad("tensor '\(t.name)': data_offsets end \(t.end) is before begin \(t.begin)") }
            guard let nel = Shape(t.shape).checkedElementCount else { throw bad("tensor '\(t.name)': shape \(Shape(t.shape)) overflows") }
            let (nbits, o) = nel.multipliedReportingOverflow(by: t.dtype.bits)
            guard !o else { throw bad("tensor '\(t.name)': size in bits overflows") }
            guard nbits % 8 == 0 else { throw bad("tensor '\(t.name)': \(nel) elements of \(dn(t.dtype)) do not fill whole bytes") }
            guard t.end - t.begin == nbits / 8 else {
                throw bad(
                    "tensor '\(t.name)': shape \(Shape(t.shape)) of \(dn(t.dtype)) needs \(nbits / 8) bytes but data_offsets span \(t.end - t.begin)"
                )
            }
            prevEnd = t.end
        }
        guard prevEnd + 8 + n == len else {
            throw bad(
                prevEnd + 8 + n < len
                    ? "\(len - prevEnd - 8 - n) bytes after the last tensor (trailing data is not allowed)"
                    : "file is \(len) bytes but the header declares \(prevEnd + 8 + n) (truncated)")
        }
        return SafetensorsHeader(headerLength: n, metadata: metadata, tensors: infos)
    }

    static func dn(_ d: DType) -> String { d.safetensorsName ?? d.rawValue }
}
