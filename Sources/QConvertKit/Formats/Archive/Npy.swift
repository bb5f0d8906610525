import Foundation

/// The .npy format: magic, version, a Python-literal header dict, raw data.
enum Npy {
    static let magic: [UInt8] = [0x93, 0x4E, 0x55, 0x4D, 0x50, 0x59]  // \x93NUMPY
    static let maxHeader = 10000

    struct Header {
        var descr: String
        var fortranOrder: Bool
        var shape: [Int]
        var dataOffset: Int
    }

    /// numpy's dtype string for a dtype; types numpy lacks are stored as raw unsigned integers.
    static func descr(_ d: DType) -> String {
        switch d {
        case .f64: return "<f8"
        case .f32: return "<f4"
        case .f16: return "<f2"
        case .i64: return "<i8"
        case .i32: return "<i4"
        case .i16: return "<i2"
        case .i8: return "|i1"
        case .u64: return "<u8"
        case .u32: return "<u4"
        case .u16, .bf16: return "<u2"
        case .u8, .f8e4m3, .f8e5m2, .int4, .uint4: return "|u1"
        case .bool: return "|b1"
        case .c64: return "<c8"
        case .c128: return "<c16"
        }
    }

    /// (dtype, element size, big-endian) for a descr, or nil when unsupported.
    static func dtype(_ descr: String) -> (DType, Int, Bool)? {
        guard let order = descr.first, "<>|=".contains(order) else { return nil }
        let code = String(descr.dropFirst())
        let table: [String: (DType, Int)] = [
            "f8": (.f64, 8), "f4": (.f32, 4), "f2": (.f16, 2), "i8": (.i64, 8), "i4": (.i32, 4),
            "i2": (.i16, 2), "i1": (.i8, 1), "u8": (.u64, 8), "u4": (.u32, 4), "u2": (.u16, 2),
            "u1": (.u8, 1), "b1": (.bool, 1), "c8": (.c64, 8), "c16": (.c128, 16)
        ]
        guard let (d, size) = table[code] else { return nil }
        return (d, size, order == ">" && size > 1)
    }

    static func headerBytes(descr: String, shape: [Int]) -> [UInt8] {
        let shapeText =
            shape.isEmpty
            ? "()" : shape.count == 1 ? "(\(shape[0]),)" : "(" + shape.map(String.init).joined(separator: ", ") + ")"
        var text = "{'descr': '\(descr)', 'fortran_order': False, 'shape': \(shapeText), }"
        let total = 10 + text.utf8.count + 1
        text += String(repeating: " ", count: (64 - total % 64) % 64) + "\n"
        var out = magic + [1, 0]
        let n = text.utf8.count
        out += [UInt8(n & 0xFF), UInt8(n >> 8)]
        return out + Array(text.utf8)
    }

    static func parseHeader(_ b: UnsafeRawBufferPointer, name: String, path: String) throws -> Header {
        func bad(_ r: NpyRule) -> QConvertError { .violation(path: path, r) }
        guard b.count >= 10, Array(b[0..<6]) == magic else { throw bad(.badMagic(member: name)) }
        let major = b[6]
        let (len, start): (Int, Int)
        switch major {
        case 1:
            len = Int(b[8]) | Int(b[9]) << 8
            start = 10
        case 2, 3:
            guard b.count >= 12 else { throw bad(.truncatedHeader(member: name)) }
            len = Int(b[8]) | Int(b[9]) << 8 | Int(b[10]) << 16 | Int(b[11]) << 24
            start = 12
        default: throw bad(.unsupportedVersion(member: name, major: Int(major)))
        }
        guard len <= maxHeader else { throw bad(.headerTooLong(member: name, length: len, limit: maxHeader)) }
        guard start + len <= b.count else { throw bad(.truncatedHeader(member: name)) }
        let raw = Array(b[start..<(start + len)])
        let text = major == 3 ? String(decoding: raw, as: UTF8.self) : String(raw.map { Character(Unicode.Scalar($0)) })
        var p = NpyLiteralParser(Array(text.unicodeScalars))
        guard let dict = try? p.parseDict() else {
            throw bad(.unreadableHeader(member: name, text: text.trimmingCharacters(in: .whitespacesAndNewlines)))
        }
        guard Set(dict.keys) == ["descr", "fortran_order", "shape"] else {
            throw bad(.wrongKeys(member: name))
        }
        guard case .string(let descr)? = dict["descr"] else {
            throw bad(.notSimpleDType(member: name, descr: dict["descr"].map { "\($0)" } ?? ""))
        }
        guard case .bool(let fo)? = dict["fortran_order"] else { throw bad(.fortranOrderNotBool(member: name)) }
        guard case .tuple(let shape)? = dict["shape"], shape.allSatisfy({ $0 >= 0 }) else {
            throw bad(.badShape(member: name))
        }
        return Header(descr: descr, fortranOrder: fo, shape: shape, dataOffset: start + len)
    }
}

/// The small Python-literal subset .npy headers use: a dict of str keys to str, bool or int tuples.
struct NpyLiteralParser {
    enum Value: CustomStringConvertible {
        case string(String)
        case bool(Bool)
        case tuple([Int])
        case other
        var description: String {
            switch self {
            case .string(let s): return "'\(s)'"
            case .bool(let b): return b ? "True" : "False"
            case .tuple(let t): return "\(t)"
            case .other: return "(unsupported)"
            }
        }
    }
    struct Bad: Error {}
    let s: [Unicode.Scalar]
    var i = 0
    init(_ s: [Unicode.Scalar]) { self.s = s }

    mutating func ws() { while i < s.count, s[i] == " " || s[i] == "\n" || s[i] == "\t" { i += 1 } }
    mutating func expect(_ c: Unicode.Scalar) throws {
        ws()
        guard i < s.count, s[i] == c else { throw Bad() }
        i += 1
    }
    mutating func peek(_ c: Unicode.Scalar) -> Bool {
        ws()
        return i < s.count && s[i] == c
    }

    mutating func parseDict() throws -> [String: Value] {
        try expect("{")
        var d: [String: Value] = [:]
        while !peek("}") {
            guard case .string(let k) = try value() else { throw Bad() }
            try expect(":")
            guard d[k] == nil else { throw Bad() }
            d[k] = try value()
            if peek(",") { i += 1 } else { break }
        }
        try expect("}")
        ws()
        guard i == s.count else { throw Bad() }
        return d
    }

    mutating func value() throws -> Value {
        ws()
        guard i < s.count else { throw Bad() }
        if s[i] == "'" || s[i] == "\"" {
            let q = s[i]
            i += 1
            var out = ""
            while i < s.count, s[i] != q {
                out.unicodeScalars.append(s[i])
                i += 1
            }
            guard i < s.count else { throw Bad() }
            i += 1
            return .string(out)
        }
        if s[i] == "(" {
            i += 1
            var t: [Int] = []
            while !peek(")") {
                var digits = ""
                ws()
                while i < s.count, ("0"..."9").contains(s[i]) {
                    digits.unicodeScalars.append(s[i])
                    i += 1
                }
                if i < s.count, s[i] == "L" { i += 1 }
                guard let v = Int(digits) else { throw Bad() }
                t.append(v)
                if peek(",") { i += 1 } else { break }
            }
            try expect(")")
            return .tuple(t)
        }
        for (word, v) in [("True", Value.bool(true)), ("False", Value.bool(false))] {
            let w = Array(word.unicodeScalars)
            if i + w.count <= s.count, Array(s[i..<(i + w.count)]) == w {
                i += w.count
                return v
            }
        }
        // anything else (a list for structured dtypes, etc.): skip to the next top-level comma
        var depth = 0
        while i < s.count {
            let c = s[i]
            if c == "[" || c == "(" {
                depth += 1
            } else if c == "]" || c == ")" {
                depth -= 1
            } else if (c == "," || c == "}") && depth == 0 {
                break
            }
            i += 1
        }
        return .other
    }
}

/// The rules of the .npy format (and of an .npz's members) a file can break.
public enum NpyRule: FormatViolation, Equatable {
    case badMagic(member: String)
    case truncatedHeader(member: String)
    case unsupportedVersion(member: String, major: Int)
    case headerTooLong(member: String, length: Int, limit: Int)
    case unreadableHeader(member: String, text: String)
    case wrongKeys(member: String)
    case notSimpleDType(member: String, descr: String)
    case fortranOrderNotBool(member: String)
    case badShape(member: String)
    case objectArray(array: String)
    case unsupportedDType(array: String, descr: String)
    case shapeOverflows(array: String, shape: [Int])
    case sizeMismatch(array: String, shape: [Int], descr: String, needs: Int, holds: Int)
    case notText(member: String, reason: String)

    public var description: String {
        switch self {
        case .badMagic(let m): "member '\(m)': not a .npy array (bad magic)"
        case .truncatedHeader(let m): "member '\(m)': truncated .npy header"
        case .unsupportedVersion(let m, let v): "member '\(m)': .npy version \(v) is not supported"
        case .headerTooLong(let m, let n, let limit): "member '\(m)': .npy header of \(n) bytes exceeds \(limit)"
        case .unreadableHeader(let m, let t): "member '\(m)': cannot read the .npy header \(t)"
        case .wrongKeys(let m): "member '\(m)': .npy header must have exactly descr, fortran_order and shape"
        case .notSimpleDType(let m, let d):
            "member '\(m)': descr \(d) is not a simple dtype (structured and object arrays are refused)"
        case .fortranOrderNotBool(let m): "member '\(m)': fortran_order is not a bool"
        case .badShape(let m): "member '\(m)': shape is not a tuple of non-negative integers"
        case .objectArray(let a): "array '\(a)': object arrays (|O) hold pickled Python objects and are refused"
        case .unsupportedDType(let a, let d): "array '\(a)': dtype '\(d)' is not supported"
        case .shapeOverflows(let a, let s): "array '\(a)': shape \(Shape(s)) overflows"
        case .sizeMismatch(let a, let s, let d, let need, let holds):
            "array '\(a)': shape \(Shape(s)) of \(d) needs \(need) bytes but the member holds \(holds)"
        case .notText(let m, let why): "member '\(m)' is \(why)"
        }
    }
}
