import CQKernels
import Foundation

/// Turns a qconvert-quantized checkpoint back into float tensors, using its metadata document.
public enum Dequantizer {
    public struct Result: Sendable {
        public var restored: Int
        public var copied: Int
    }

    public static func run(input: String, output: String, format: String? = nil) throws -> Result {
        let ckpt = try Converter.open(input)
        let doc = try MetadataDocument.find(in: ckpt.metadata, path: input)
        guard doc != nil || !ckpt.dequantizedOnRead.isEmpty else {
            throw QConvertError.badInput(
                path: input, message: "no '\(MetadataDocument.key)' metadata: not a qconvert-quantized file")
        }
        // block types and compressed-tensors weights are restored by the reader: those entries are floats
        let records = ckpt.storedRecords(doc).sorted { $0.key < $1.key }
        let byName = Dictionary(ckpt.entries.enumerated().map { ($1.name, $0) }, uniquingKeysWith: { a, _ in a })
        var consumed = Set<String>()
        struct Job {
            var entry: Int
            var record: TensorRecord
            var name: String
        }
        var jobs: [String: Job] = [:]
        for (name, rec) in records {
            let stored = rec.values ?? name
            guard let i = byName[stored] else {
                throw QConvertError.badInput(
                    path: input, message: "metadata describes tensor '\(name)' but the file does not hold it")
            }
            jobs[stored] = Job(entry: i, record: rec, name: name)
            if let s = rec.scale { consumed.insert(s) }
            if let z = rec.zeroPoint { consumed.insert(z) }
        }
        var outputs: [OutputTensor] = []
        var sources: [(entry: Int, job: Job?)] = []
        for (i, e) in ckpt.entries.enumerated() where !consumed.contains(e.name) {
            if let j = jobs[e.name] {
                let sd = j.record.sourceDType
                let shape = j.record.sourceShape
                guard let dtype = DType(safetensorsName: sd) ?? DType(rawValue: sd), shape.allSatisfy({ $0 >= 0 })
                else {
                    throw QConvertError.badInput(
                        path: input, message: "tensor '\(e.name)': metadata has a bad source_dtype or source_shape")
                }
                let outType: DType = [.f32, .f16, .bf16, .f64].contains(dtype) ? dtype : .f32
                outputs.append(
                    OutputTensor(
                        name: j.name, dtype: outType, shape: shape,
                        byteCount: Shape(shape).checkedByteCount(outType) ?? 0, shard: e.shard))
                sources.append((i, j))
            } else {
                outputs.append(
                    OutputTensor(name: e.name, dtype: e.dtype, shape: e.shape, byteCount: e.bytes.count, shard: e.shard)
                )
                sources.append((i, nil))
            }
        }
        let writer = try FormatRegistry.writer(for: output, format: format, source: ckpt)
        try PathGuard.checkOutput(output, input: ckpt)
        let sink = try writer.open(path: output, tensors: outputs, source: ckpt, options: WriterOptions())
        do {
            for (k, s) in sources.enumerated() {
                let e = ckpt.entries[s.entry]
                guard let job = s.job else {
                    try e.bytes.withUnsafeBytes { try sink.put(k, $0) }
                    continue
                }
                let values = try restore(e, record: job.record, ckpt: ckpt, byName: byName, path: input)
                let bytes = encode(values, as: outputs[k].dtype)
                try bytes.withUnsafeBytes { try sink.put(k, $0) }
            }
            let meta = ckpt.metadata.filter { $0.key != MetadataDocument.key }
            try sink.commit(metadata: meta, document: nil, perShard: [:])
        } catch {
            sink.abort()
            throw error
        }
        let decoded = ckpt.dequantizedOnRead.count
        return Result(restored: jobs.count + decoded, copied: sources.count - jobs.count - decoded)
    }

    public static func restore(
        _ e: TensorEntry, record r: TensorRecord, ckpt: Checkpoint, byName: [String: Int], path: String
    ) throws
        -> [Float]
    {
        func bad(_ m: String) -> QConvertError { .badInput(path: path, message: "tensor '\(e.name)': \(m)") }
        var target = r.dtype
        let shape = r.sourceShape
        guard shape.allSatisfy({ $0 >= 0 }), Shape(shape).checkedByteCount(.f32) != nil else {
            throw bad("metadata source_shape is not a valid shape")
        }
        if let form = r.onnx?.form, form == "matmulnbits" || form == "gatherblockquantized" {
            return try restoreMatMulNBits(
                e, record: r, target: target, shape: shape, ckpt: ckpt, byName: byName, path: path)
        }
        var values = try e.bytes.withUnsafeBytes { [UInt8]($0) }
        let is4 = target.isPacked4
        if is4, r.packing?.unpacked == true {
            // stored one value per byte (an ONNX model too old for 4-bit types)
            target = target.widened
        } else if is4, r.packing?.flattened == true {
            // packed over the flattened tensor (ONNX): repack along rows
            let n = shape.reduce(1, *)
            if values.count == (n + 1) / 2 { values = Packing.pack4(Packing.unpack4(values, shape: [n]), shape: shape) }
        }
        let expected = Shape(Quantizer.storedShape(shape, target: target)).checkedByteCount(target.storageDType) ?? -1
        guard values.count == expected else { throw bad("holds \(values.count) bytes, metadata implies \(expected)") }
        var scale: [Float]? = nil
        var zp: [UInt8]? = nil
        let granularity = r.granularity ?? .tensor
        let axis = r.axis ?? 0
        let groupSize = r.groupSize ?? 1
        // The metadata is input like any other: an axis outside the shape would index out of bounds.
        if axis < 0 { throw bad("metadata axis \(axis) is not an axis") }
        if granularity == .channel || granularity == .group {
            guard !shape.isEmpty, axis < shape.count else {
                throw bad("metadata axis \(r.axis.map(String.init) ?? "null") is outside the rank-\(shape.count) shape")
            }
        }
        let layout = ParamLayout(shape: shape, granularity: granularity, axis: axis, groupSize: max(groupSize, 1))
        if let sn = r.scale {
            guard let si = byName[sn] else { throw bad("scale tensor '\(sn)' is missing") }
            let se = ckpt.entries[si]
            guard se.dtype == .f32, se.elementCount == layout.paramCount else {
                throw bad("scale tensor '\(sn)' has the wrong type or size")
            }
            scale = try se.bytes.withUnsafeBytes { FloatDecoding.toFloat32($0, dtype: .f32, count: se.elementCount) }
        }
        if let zn = r.zeroPoint {
            guard let zi = byName[zn] else { throw bad("zero-point tensor '\(zn)' is missing") }
            let ze = ckpt.entries[zi]
            guard ze.elementCount == layout.paramCount, ze.dtype.bits == 8 else {
                throw bad("zero-point tensor '\(zn)' has the wrong type or size")
            }
            zp = try ze.bytes.withUnsafeBytes { [UInt8]($0) }
            if is4, zp!.count == (layout.paramCount + 1) / 2, layout.paramCount > 1 || r.packing?.flattened == true {
                zp = Packing.unpack4(zp!, shape: [layout.paramCount])  // ONNX packs 4-bit zero points too
            }
        }
        return Quantizer.dequantize(
            values: values, target: target, shape: shape, scale: scale, zeroPoint: zp,
            granularity: granularity, axis: axis, groupSize: max(groupSize, 1))
    }

    /// A weight stored as onnxruntime's MatMulNBits (B [N, blocks, blob], scales [N, blocks], packed zero
    /// points): back to qconvert's layout, then dequantized like any other. The metadata is checked
    /// against the shape first (it is input like any other).
    static func restoreMatMulNBits(
        _ e: TensorEntry, record r: TensorRecord, target: TargetType, shape: [Int], ckpt: Checkpoint,
        byName: [String: Int], path: String
    ) throws -> [Float] {
        func bad(_ m: String) -> QConvertError { .badInput(path: path, message: "tensor '\(e.name)': \(m)") }
        let o = r.onnx
        guard let k = o?.K, let n = o?.N, let nAxis = o?.nAxis, let bits = o?.bits, let bs = o?.blockSize,
            nAxis >= 0, nAxis <= 1, shape.count == 2, shape[nAxis] == n, shape[1 - nAxis] == k, k > 0, n > 0,
            bs >= 16, bs <= 1 << 20, bs & (bs - 1) == 0,
            bits == target.bits, target.isIntegerQuantization
        else { throw bad("metadata of its MatMulNBits form does not match its shape \(Shape(shape))") }
        let granularity = r.granularity ?? .tensor
        let axis = r.axis ?? nAxis
        let groupSize = max(r.groupSize ?? 1, 1)
        guard axis >= 0, axis < 2 else { throw bad("metadata axis is outside the rank-2 shape") }
        let params = ParamLayout(shape: shape, granularity: granularity, axis: axis, groupSize: groupSize)
        let layout = MatMulNBitsLayout(k: k, n: n, nAxis: nAxis, bits: bits, blockSize: bs, signed: target.isSigned)
        guard let sn = r.scale, let si = byName[sn], ckpt.entries[si].dtype == .f32 else {
            throw bad("scale tensor is missing")
        }
        let se = ckpt.entries[si]
        let scales = try se.bytes.withUnsafeBytes { FloatDecoding.toFloat32($0, dtype: .f32, count: se.elementCount) }
        var zp: [UInt8]? = nil
        if let zn = r.zeroPoint {
            guard let zi = byName[zn] else { throw bad("zero-point tensor '\(zn)' is missing") }
            zp = try ckpt.entries[zi].bytes.withUnsafeBytes { [UInt8]($0) }
        }
        let b = try e.bytes.withUnsafeBytes { [UInt8]($0) }
        let canonical: (values: [UInt8], scale: [Float], zeroPoint: [UInt8]?)
        do {
            canonical = try layout.unpack(
                b: b, scales: scales, zp: zp, paramIndex: params.paramIndices(), paramCount: params.paramCount)
        } catch {
            throw bad("\(error)")
        }
        return Quantizer.dequantize(
            values: canonical.values, target: target, shape: shape, scale: canonical.scale,
            zeroPoint: canonical.zeroPoint,
            granularity: granularity, axis: axis, groupSize: groupSize)
    }

    static func encode(_ v: [Float], as dtype: DType) -> [UInt8] {
        switch dtype {
        case .f16:
            var h = [UInt16](repeating: 0, count: v.count)
            _ = qk_f32_to_f16(v, Int64(v.count), &h, 1)
            return h.withUnsafeBytes { [UInt8]($0) }
        case .bf16:
            var h = [UInt16](repeating: 0, count: v.count)
            qk_f32_to_bf16(v, Int64(v.count), &h)
            return h.withUnsafeBytes { [UInt8]($0) }
        case .f64:
            return v.map(Double.init).withUnsafeBytes { [UInt8]($0) }
        default:
            return v.withUnsafeBytes { [UInt8]($0) }
        }
    }
}
