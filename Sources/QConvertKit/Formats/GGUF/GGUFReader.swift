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
        case .q4_0, .q4_1, .q5_0, .q5_1, .q8_0: true
        case .f32, .f16, .bf16, .f64, .i8, .i16, .i32, .i64, .q8_1, .q2_K, .q3_K, .q4_K, .q5_K, .q6_K, .q8_K: false
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
                case .f32, .f16, .bf16, .f64, .i8, .i16, .i32, .i64, .q8_1, .q2_K, .q3_K, .q4_K, .q5_K, .q6_K, .q8_K:
                    break
                }
            }
        }
        return out
    }
}
