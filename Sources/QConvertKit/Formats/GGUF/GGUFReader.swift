import CQKernels
import Foundation

/// Reads GGUF files (llama.cpp): plain tensors in place, block-quantized ones dequantized to float32
/// while they are worked on. Shapes are outermost first, as everywhere in qconvert (GGUF lists dims
/// innermost first); metadata values become the checkpoint's string metadata.
public struct GGUFReader: FormatReader {
    public init() {}
    public var name: String { "gguf" }
    public var fileExtensions: [String] { [".gguf"] }

    public func sniff(_ prefix: [UInt8], fileSize: Int) -> Bool {
        prefix.count >= 4 && Array(prefix[0..<4]) == Array("GGUF".utf8)
    }
    public func recognizesFolder(_ path: String) -> Bool { false }

    public func read(path: String) throws -> Checkpoint {
        let f = try MappedFile(path: path)
        let file = try GGUFFile.parse(f.bytes(at: 0, count: f.size), path: path)
        var entries: [TensorEntry] = []
        for t in file.tensors {
            let shape = Array(t.dims.reversed())
            let offset = file.dataOffset + t.offset
            let bytes: TensorBytes
            if t.type.block.elements == 1 {
                bytes = .mapped(f, offset: offset, count: t.byteCount)
            } else {
                guard GGUFBlocks.canDequantize(t.type) else {
                    throw QConvertError.violation(
                        path: path, GGUFRule.unsupportedType(tensor: t.name, type: t.type.name))
                }
                let count = t.dims.reduce(1, *)
                let type = t.type
                bytes = .deferred(
                    DeferredBytes(count: count * 4, path: path, what: "tensor '\(t.name)' (\(type.name))") {
                        let raw = f.bytes(at: offset, count: t.byteCount)
                        defer { f.release(offset: offset, count: t.byteCount) }
                        return GGUFBlocks.dequantize(type, raw, count: count).withUnsafeBytes { [UInt8]($0) }
                    })
            }
            // GGUF weights are [out, in] with blocks along `in`: the output channels are rows.
            entries.append(
                TensorEntry(
                    name: t.name, dtype: t.type.readDType, shape: shape, bytes: bytes,
                    outputAxis: shape.count >= 2 ? 0 : nil))
        }
        f.release(offset: 0, count: file.dataOffset)
        let metadata = file.metadata.map { (key: $0.key, value: $0.value.text) }
        return Checkpoint(
            format: name, path: path, files: [f], entries: entries, metadata: metadata,
            container: GGUFContainer(file: file))
    }
}

/// What a GGUF writer needs of a GGUF input: its typed metadata and tensor types.
final class GGUFContainer: CheckpointContainer {
    let file: GGUFFile
    init(file: GGUFFile) { self.file = file }
}

/// llama.cpp's block formats, dequantized (the `gguf` package's `quants.dequantize` is the reference
/// the tests hold this to).
enum GGUFBlocks {
    static func canDequantize(_ t: GGMLType) -> Bool {
        switch t {
        case .q4_0, .q4_1, .q5_0, .q5_1, .q8_0, .q2_K, .q3_K, .q4_K, .q5_K, .q6_K: true
        case .f32, .f16, .bf16, .f64, .i8, .i16, .i32, .i64, .q8_1, .q8_K: false
        }
    }

    static func half(_ p: UnsafeRawBufferPointer, _ at: Int) -> Float {
        var h = p.loadUnaligned(fromByteOffset: at, as: UInt16.self).littleEndian
        var f: Float = 0
        qk_f16_to_f32(&h, 1, &f)
        return f
    }

    /// `count` values from whole blocks of `type`.
    static func dequantize(_ type: GGMLType, _ raw: UnsafeRawBufferPointer, count: Int) -> [Float] {
        let (per, size) = type.block
        var out = [Float](repeating: 0, count: count)
        out.withUnsafeMutableBufferPointer { y in
            for b in 0..<(count / per) {
                let blk = UnsafeRawBufferPointer(rebasing: raw[(b * size)..<((b + 1) * size)])
                let o = b * per
                switch type {
                case .q8_0:
                    let d = half(blk, 0)
                    for j in 0..<32 { y[o + j] = d * Float(Int8(bitPattern: blk[2 + j])) }
                case .q4_0:
                    let d = half(blk, 0)
                    for j in 0..<16 {
                        let q = blk[2 + j]
                        y[o + j] = d * Float(Int(q & 0x0F) - 8)
                        y[o + j + 16] = d * Float(Int(q >> 4) - 8)
                    }
                case .q4_1:
                    let d = half(blk, 0)
                    let m = half(blk, 2)
                    for j in 0..<16 {
                        let q = blk[4 + j]
                        y[o + j] = d * Float(q & 0x0F) + m
                        y[o + j + 16] = d * Float(q >> 4) + m
                    }
                case .q5_0, .q5_1:
                    let d = half(blk, 0)
                    let m: Float = type == .q5_1 ? half(blk, 2) : 0
                    let h = type == .q5_1 ? 4 : 2
                    let qh = blk.loadUnaligned(fromByteOffset: h, as: UInt32.self).littleEndian
                    let qs = h + 4
                    let shift = type == .q5_0 ? 16 : 0
                    for j in 0..<16 {
                        let lo = Int(blk[qs + j] & 0x0F) | Int((qh >> UInt32(j)) & 1) << 4
                        let hi = Int(blk[qs + j] >> 4) | Int((qh >> UInt32(j + 16)) & 1) << 4
                        y[o + j] = d * Float(lo - shift) + m
                        y[o + j + 16] = d * Float(hi - shift) + m
                    }
                case .q2_K: q2K(blk, y.baseAddress! + o)
                case .q3_K: q3K(blk, y.baseAddress! + o)
                case .q4_K, .q5_K: q45K(blk, y.baseAddress! + o, five: type == .q5_K)
                case .q6_K: q6K(blk, y.baseAddress! + o)
                case .f32, .f16, .bf16, .f64, .i8, .i16, .i32, .i64, .q8_1, .q8_K:
                    break
                }
            }
        }
        return out
    }

    // K-quants: super-blocks of 256 values in sub-blocks with 6- or 8-bit scales, in float32 arithmetic in
    // the order llama.cpp's dequantize_row_* and the gguf package use: (d · scale) · q − (dmin · min).

    /// Q2_K: scales[16] (low nibble scale, high nibble min), qs[64] (2 bits), d, dmin.
    static func q2K(_ b: UnsafeRawBufferPointer, _ y: UnsafeMutablePointer<Float>) {
        let d = half(b, 80)
        let dmin = half(b, 82)
        var out = 0
        for n in 0..<2 {
            let q = 16 + n * 32
            for j in 0..<4 {
                let shift = UInt8(2 * j)
                for part in 0..<2 {
                    let sc = b[n * 8 + j * 2 + part]
                    let dl = d * Float(sc & 0x0F)
                    let ml = dmin * Float(sc >> 4)
                    for l in 0..<16 {
                        y[out] = dl * Float((b[q + part * 16 + l] >> shift) & 3) - ml
                        out += 1
                    }
                }
            }
        }
    }

    /// Q3_K: hmask[32], qs[64] (low 2 bits), scales[12] (sixteen 6-bit scales, offset 32), d.
    static func q3K(_ b: UnsafeRawBufferPointer, _ y: UnsafeMutablePointer<Float>) {
        let d = half(b, 108)
        var scales = [Int](repeating: 0, count: 16)
        for i in 0..<16 {
            let low = i < 8 ? (b[96 + i] & 0x0F) : (b[96 + i - 8] >> 4)
            let high = (b[96 + 8 + i % 4] >> UInt8(2 * (i / 4))) & 3
            scales[i] = Int(low | high << 4) - 32
        }
        var out = 0
        var m: UInt8 = 1
        var s = 0
        for n in 0..<2 {
            let q = 32 + n * 32
            for j in 0..<4 {
                let shift = UInt8(2 * j)
                for part in 0..<2 {
                    let dl = d * Float(scales[s])
                    s += 1
                    for l in 0..<16 {
                        let k = part * 16 + l
                        let v = Int((b[q + k] >> shift) & 3) - ((b[k] & m) != 0 ? 0 : 4)
                        y[out] = dl * Float(v)
                        out += 1
                    }
                }
                m <<= 1
            }
        }
    }

    /// The 6-bit scale and min of sub-block j of Q4_K and Q5_K (12 bytes for eight pairs).
    static func scaleMin(_ j: Int, _ sc: UnsafeRawBufferPointer, _ at: Int) -> (Float, Float) {
        if j < 4 { return (Float(sc[at + j] & 63), Float(sc[at + j + 4] & 63)) }
        let s = (sc[at + j + 4] & 0x0F) | ((sc[at + j - 4] >> 6) << 4)
        let m = (sc[at + j + 4] >> 4) | ((sc[at + j] >> 6) << 4)
        return (Float(s), Float(m))
    }

    /// Q4_K: d, dmin, scales[12], qs[128]; Q5_K: the same with qh[32] (fifth bits) before qs.
    static func q45K(_ b: UnsafeRawBufferPointer, _ y: UnsafeMutablePointer<Float>, five: Bool) {
        let d = half(b, 0)
        let dmin = half(b, 2)
        let qs = five ? 48 : 16
        var out = 0
        for j in 0..<4 {
            let (s1, m1) = scaleMin(2 * j, b, 4)
            let (s2, m2) = scaleMin(2 * j + 1, b, 4)
            let d1 = d * s1
            let n1 = dmin * m1
            let d2 = d * s2
            let n2 = dmin * m2
            for l in 0..<32 {
                let h: UInt8 = five ? ((b[16 + l] >> UInt8(2 * j)) & 1) << 4 : 0
                y[out + l] = d1 * Float((b[qs + j * 32 + l] & 0x0F) | h) - n1
            }
            for l in 0..<32 {
                let h: UInt8 = five ? ((b[16 + l] >> UInt8(2 * j + 1)) & 1) << 4 : 0
                y[out + 32 + l] = d2 * Float((b[qs + j * 32 + l] >> 4) | h) - n2
            }
            out += 64
        }
    }

    /// Q6_K: ql[128] (low 4 bits), qh[64] (high 2 bits), scales[16] (int8), d.
    static func q6K(_ b: UnsafeRawBufferPointer, _ y: UnsafeMutablePointer<Float>) {
        let d = half(b, 208)
        for n in 0..<2 {
            let ql = n * 64
            let qh = 128 + n * 32
            let sc = 192 + n * 8
            let o = n * 128
            for l in 0..<32 {
                let s = l / 16
                let h = b[qh + l]
                let q1 = Int((b[ql + l] & 0x0F) | ((h & 3) << 4)) - 32
                let q2 = Int((b[ql + l + 32] & 0x0F) | (((h >> 2) & 3) << 4)) - 32
                let q3 = Int((b[ql + l] >> 4) | (((h >> 4) & 3) << 4)) - 32
                let q4 = Int((b[ql + l + 32] >> 4) | (((h >> 6) & 3) << 4)) - 32
                func scale(_ k: Int) -> Float { Float(Int8(bitPattern: b[sc + s + 2 * k])) }
                y[o + l] = d * scale(0) * Float(q1)
                y[o + l + 32] = d * scale(1) * Float(q2)
                y[o + l + 64] = d * scale(2) * Float(q3)
                y[o + l + 96] = d * scale(3) * Float(q4)
            }
        }
    }
}
