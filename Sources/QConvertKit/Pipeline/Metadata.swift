import CQKernels
import Foundation

public enum QConvertVersion {
    public static let string = "0.1.0"
}

/// The metadata document (QUANTIZATION.md section 7; Schemas/metadata.schema.json) carried by every
/// output: one Swift type for both directions. Writers encode it, every reader of a qconvert output
/// (dequantize, diff, batch, inspect) decodes it; keys are written sorted, so the same conversion gives
/// the same bytes.
public struct MetadataDocument: Codable, Sendable, Equatable {
    /// The key under which formats store the document.
    public static let key = "qconvert.quantization"
    public static let formatTag = "qconvert.quantization/2"
    /// Documents this version reads: its own, and those of earlier versions.
    public static let readableTags: Set<String> = ["qconvert.quantization/1", formatTag]
    static let dequantizeRule =
        "x = (q - zero_point) * scale; zero_point is 0 when absent; parameters broadcast against q (same rank, size 1 on shared axes; groups repeat group_size times along group_axis)"

    public struct Tool: Codable, Sendable, Equatable {
        public var name: String
        public var version: String
    }
    public struct Input: Codable, Sendable, Equatable {
        public var format: String
        public var hash: String
    }
    public struct PolicyRef: Codable, Sendable, Equatable {
        public var source: String
        public var sha256: String
    }

    public var format: String
    public var tool: Tool
    public var input: Input
    public var policy: PolicyRef
    public var dequantize: String?
    public var keptTensors: Int?
    /// Every converted tensor's record, by its name in the source; tensors not listed were copied.
    public var tensors: [String: TensorRecord]
    /// Statically quantized activations (ONNX, `--calibration`), by name, and the statistics file's hash.
    public var activations: [String: ActivationRecord]?
    public var calibrationStatistics: String?

    enum CodingKeys: String, CodingKey {
        case format, tool, input, policy, dequantize, tensors, activations
        case keptTensors = "kept_tensors"
        case calibrationStatistics = "calibration_statistics"
    }

    public init(
        plans: [TensorPlan], metrics: [Int: TensorMetrics], inputFormat: String, inputHash: String, policy: Policy,
        only: Set<Int>? = nil
    ) {
        var records: [String: TensorRecord] = [:]
        var kept = 0
        for (i, p) in plans.enumerated() {
            if let only, !only.contains(i) { continue }
            if let r = TensorRecord(p, metrics: metrics[i]) { records[p.name] = r } else { kept += 1 }
        }
        format = Self.formatTag
        tool = Tool(name: "qconvert", version: QConvertVersion.string)
        input = Input(format: inputFormat, hash: inputHash)
        self.policy = PolicyRef(source: policy.source, sha256: sha256Hex(policy.text))
        dequantize = Self.dequantizeRule
        keptTensors = kept
        tensors = records
    }

    /// The compact JSON text, keys sorted.
    public var encoded: String {
        let e = JSONEncoder()
        e.outputFormatting = [.sortedKeys, .withoutEscapingSlashes]
        // Every figure is finite or absent (an exact reconstruction has no SQNR): encoding cannot fail.
        // Non-finite figures are written as null (MetricsRecord): encoding cannot fail.
        guard let data = try? e.encode(self) else { preconditionFailure("metadata document could not be encoded") }
        return String(decoding: data, as: UTF8.self)
    }

    /// The document a checkpoint carries, if any; a document that is there but malformed is bad input.
    public static func find(in metadata: [(key: String, value: String)], path: String) throws -> MetadataDocument? {
        guard let text = metadata.first(where: { $0.key == key })?.value else { return nil }
        return try decode(text, path: path)
    }

    public static func decode(_ text: String, path: String) throws -> MetadataDocument {
        let doc: MetadataDocument
        do {
            doc = try JSONDecoder().decode(MetadataDocument.self, from: Data(text.utf8))
        } catch let DecodingError.dataCorrupted(c) {
            throw QConvertError.badInput(
                path: path, message: "the quantization metadata is not valid JSON (\(c.debugDescription))")
        } catch let DecodingError.keyNotFound(k, c) {
            throw QConvertError.badInput(
                path: path, message: "the quantization metadata lacks '\(Self.where(c.codingPath + [k]))'")
        } catch let DecodingError.typeMismatch(_, c) {
            throw QConvertError.badInput(
                path: path, message: "the quantization metadata has a wrong type at '\(Self.where(c.codingPath))'")
        } catch let DecodingError.valueNotFound(_, c) {
            throw QConvertError.badInput(
                path: path, message: "the quantization metadata has null at '\(Self.where(c.codingPath))'")
        } catch {
            throw QConvertError.badInput(path: path, message: "the quantization metadata cannot be read: \(error)")
        }
        guard readableTags.contains(doc.format) else {
            throw QConvertError.badInput(
                path: path,
                message:
                    "the quantization metadata is '\(doc.format)', which this qconvert \(QConvertVersion.string) does not know"
            )
        }
        return doc
    }

    static func `where`(_ path: [CodingKey]) -> String {
        path.map { $0.intValue.map(String.init) ?? $0.stringValue }.joined(separator: ".")
    }

    /// The same document sized for its widest possible figures, to reserve header room before they are known.
    static func widest(plans: [TensorPlan], policy: Policy, inputFormat: String) -> MetadataDocument {
        let widest = Dictionary(uniqueKeysWithValues: plans.indices.map { ($0, TensorMetrics.widest) })
        return MetadataDocument(
            plans: plans, metrics: widest, inputFormat: inputFormat,
            inputHash: "sha256:" + String(repeating: "0", count: 64),
            policy: policy)
    }
}

/// One statically quantized activation: QuantizeLinear/DequantizeLinear with these parameters.
public struct ActivationRecord: Codable, Sendable, Equatable {
    public var dtype: TargetType
    public var calibration: String
    /// The range chosen from the statistics, [beta, alpha].
    public var range: [Float]
    public var scale: Float
    public var zeroPoint: Int
    public var note: String?
    enum CodingKeys: String, CodingKey {
        case dtype, calibration, range, scale, note
        case zeroPoint = "zero_point"
    }
    init(_ a: ActivationParameters) {
        dtype = a.target
        calibration = a.method
        range = [a.beta, a.alpha]
        scale = a.scale
        zeroPoint = Int(a.zeroPoint)
        note = a.note
    }
}

/// One converted tensor: what it was, what it became, where its parameters are, how to read it back.
public struct TensorRecord: Codable, Sendable, Equatable {
    public var sourceDType: String
    public var sourceShape: [Int]
    public var dtype: TargetType
    public var storageDType: String
    public var storageShape: [Int]
    public var mapping: Mapping?
    public var granularity: Granularity?
    public var axis: Int?
    public var groupAxis: Int?
    public var groupSize: Int?
    public var calibration: CalibrationRecord?
    public var qmin: Int?
    public var qmax: Int?
    public var symmetricRange: String?
    /// The stored values' name when it differs from the tensor's (ONNX forms).
    public var values: String?
    public var scale: String?
    public var scaleShape: [Int]?
    public var zeroPoint: String?
    public var packing: PackingRecord?
    public var saturate: Bool?
    public var onnx: OnnxFormRecord?
    public var rule: String
    public var metrics: MetricsRecord?

    enum CodingKeys: String, CodingKey {
        case dtype, mapping, granularity, axis, calibration, qmin, qmax, values, scale, packing, saturate, onnx, rule,
            metrics
        case sourceDType = "source_dtype"
        case sourceShape = "source_shape"
        case storageDType = "storage_dtype"
        case storageShape = "storage_shape"
        case groupAxis = "group_axis"
        case groupSize = "group_size"
        case symmetricRange = "symmetric_range"
        case scaleShape = "scale_shape"
        case zeroPoint = "zero_point"
    }

    /// The record of a plan that converts its tensor; nil for a kept one.
    init?(_ p: TensorPlan, metrics: TensorMetrics?) {
        guard let s = p.decision.scheme else { return nil }
        sourceDType = p.dtype.safetensorsName ?? p.dtype.rawValue
        sourceShape = p.shape
        dtype = s.target
        storageDType = s.target.storageDType.safetensorsName ?? s.target.storageDType.rawValue
        storageShape = Quantizer.storedShape(p.shape, target: s.target)
        rule = p.rule
        self.metrics = metrics.map(MetricsRecord.init)
        if s.target.isQuantization {
            mapping = s.mapping
            granularity = s.granularity
            if s.granularity == .channel || s.granularity == .group { axis = s.axis }
            if s.granularity == .group {
                groupAxis = ParamLayout.groupAxis(rank: p.shape.count, channelAxis: s.axis)
                groupSize = s.groupSize
            }
            calibration = CalibrationRecord(s)
            if s.target.isIntegerQuantization {
                let (lo, hi) = s.integerRange
                qmin = Int(lo)
                qmax = Int(hi)
            }
            if s.fullSymmetricRange { symmetricRange = "full" }
            scale = p.scaleName
            scaleShape = p.paramShape
            zeroPoint = p.zeroPointName
            if s.target.isPacked4 { packing = .rows(signed: s.target.isSigned) }
        } else if s.target == .fp16 {
            saturate = s.saturate
        }
    }
}

public struct CalibrationRecord: Codable, Sendable, Equatable {
    public var method: String
    public var percentile: Double?
    public var bins: Int?
    public var levels: Int?
    public var search: String?

    init(_ s: QuantScheme) {
        method = s.calibration.name
        s.calibration.method.record(into: &self, target: s.target)
    }
}

/// How 4-bit values share bytes.
public struct PackingRecord: Codable, Sendable, Equatable {
    public var bits: Int
    public var signed: Bool?
    /// -1: two values per byte along the last axis. Absent with `flattened`: over the flattened tensor.
    public var axis: Int?
    /// Packed over the flattened tensor (ONNX's 4-bit layout); version 1 wrote this as `"axis": null`.
    public var flattened: Bool?
    /// One value per byte (an ONNX model whose opset has no 4-bit types).
    public var unpacked: Bool?
    public var order: String?
    public var note: String?

    enum CodingKeys: String, CodingKey { case bits, signed, axis, flattened, unpacked, order, note }

    public init(bits: Int, signed: Bool?, axis: Int?, flattened: Bool?, unpacked: Bool?, order: String?, note: String?)
    {
        self.bits = bits
        self.signed = signed
        self.axis = axis
        self.flattened = flattened
        self.unpacked = unpacked
        self.order = order
        self.note = note
    }

    public init(from decoder: Decoder) throws {
        let c = try decoder.container(keyedBy: CodingKeys.self)
        bits = try c.decode(Int.self, forKey: .bits)
        signed = try c.decodeIfPresent(Bool.self, forKey: .signed)
        axis = try c.decodeIfPresent(Int.self, forKey: .axis)
        unpacked = try c.decodeIfPresent(Bool.self, forKey: .unpacked)
        order = try c.decodeIfPresent(String.self, forKey: .order)
        note = try c.decodeIfPresent(String.self, forKey: .note)
        flattened = try c.decodeIfPresent(Bool.self, forKey: .flattened)
        if flattened == nil, c.contains(.axis), try c.decodeNil(forKey: .axis) { flattened = true }  // version 1
    }

    static func rows(signed: Bool) -> PackingRecord {
        PackingRecord(
            bits: 4, signed: signed, axis: -1, flattened: nil, unpacked: nil, order: "low_nibble_first",
            note:
                "two values per byte along the last axis, element 0 in the low nibble; an odd row length leaves the last high nibble 0"
        )
    }
}

/// The form an ONNX output holds a quantized weight in.
public struct OnnxFormRecord: Codable, Sendable, Equatable {
    public var form: String
    public var note: String?
    public var K: Int?
    public var N: Int?
    public var nAxis: Int?
    public var bits: Int?
    public var blockSize: Int?
    public var accuracyLevel: Int?
    public var biasFolded: Bool?
    public var activations: String?

    enum CodingKeys: String, CodingKey {
        case form, note, K, N, bits, activations
        case nAxis = "n_axis"
        case blockSize = "block_size"
        case accuracyLevel = "accuracy_level"
        case biasFolded = "bias_folded"
    }

    public init(form: String) { self.form = form }
}

/// A tensor's error figures as recorded; `sums` (version 2) are what gates and model totals add.
public struct MetricsRecord: Codable, Sendable, Equatable {
    public struct Sums: Codable, Sendable, Equatable {
        public var x2: Double
        public var e2: Double
        public var xq: Double
        public var q2: Double
        public var count: Int

        enum CodingKeys: String, CodingKey { case x2, e2, xq, q2, count }

        init(x2: Double, e2: Double, xq: Double, q2: Double, count: Int) {
            self.x2 = x2
            self.e2 = e2
            self.xq = xq
            self.q2 = q2
            self.count = count
        }

        public init(from decoder: Decoder) throws {
            let c = try decoder.container(keyedBy: CodingKeys.self)
            x2 = try c.decodeFinite(.x2)
            e2 = try c.decodeFinite(.e2)
            xq = try c.decodeFinite(.xq)
            q2 = try c.decodeFinite(.q2)
            count = try c.decode(Int.self, forKey: .count)
        }

        public func encode(to encoder: Encoder) throws {
            var c = encoder.container(keyedBy: CodingKeys.self)
            try c.encodeFinite(x2, .x2)
            try c.encodeFinite(e2, .e2)
            try c.encodeFinite(xq, .xq)
            try c.encodeFinite(q2, .q2)
            try c.encode(count, forKey: .count)
        }
    }
    public var maxAbsErr: Double
    public var mse: Double
    public var sqnrDB: Double?
    public var cosine: Double
    public var clipped: Double
    public var bitsPerWeight: Double
    public var bytesBefore: Int
    public var bytesAfter: Int
    public var sums: Sums?

    enum CodingKeys: String, CodingKey {
        case mse, cosine, clipped, sums
        case maxAbsErr = "max_abs_err"
        case sqnrDB = "sqnr_db"
        case bitsPerWeight = "bits_per_weight"
        case bytesBefore = "bytes_before"
        case bytesAfter = "bytes_after"
    }

    public init(from decoder: Decoder) throws {
        let c = try decoder.container(keyedBy: CodingKeys.self)
        maxAbsErr = try c.decodeFinite(.maxAbsErr)
        mse = try c.decodeFinite(.mse)
        sqnrDB = try c.decodeIfPresent(Double.self, forKey: .sqnrDB)
        cosine = try c.decodeFinite(.cosine)
        clipped = try c.decodeFinite(.clipped)
        bitsPerWeight = try c.decodeFinite(.bitsPerWeight)
        bytesBefore = try c.decode(Int.self, forKey: .bytesBefore)
        bytesAfter = try c.decode(Int.self, forKey: .bytesAfter)
        sums = try c.decodeIfPresent(Sums.self, forKey: .sums)
    }

    public func encode(to encoder: Encoder) throws {
        var c = encoder.container(keyedBy: CodingKeys.self)
        try c.encodeFinite(maxAbsErr, .maxAbsErr)
        try c.encodeFinite(mse, .mse)
        if let v = sqnrDB { try c.encodeFinite(v, .sqnrDB) }
        try c.encodeFinite(cosine, .cosine)
        try c.encodeFinite(clipped, .clipped)
        try c.encodeFinite(bitsPerWeight, .bitsPerWeight)
        try c.encode(bytesBefore, forKey: .bytesBefore)
        try c.encode(bytesAfter, forKey: .bytesAfter)
        try c.encodeIfPresent(sums, forKey: .sums)
    }

    init(_ m: TensorMetrics) {
        maxAbsErr = m.maxAbsError
        mse = m.mse
        sqnrDB = m.sqnrDB
        cosine = m.cosine
        clipped = m.clippedFraction
        bitsPerWeight = m.bitsPerWeight
        bytesBefore = m.bytesBefore
        bytesAfter = m.bytesAfter
        sums = Sums(x2: m.sums.x2, e2: m.sums.e2, xq: m.sums.xq, q2: m.sums.q2, count: m.sums.count)
    }

    /// The raw sums; a version-1 record (no sums) gives them back from its figures as well as they allow.
    public var errorSums: ErrorSums {
        var s = ErrorSums()
        s.maxAbsError = maxAbsErr
        if let r = sums {
            s.x2 = r.x2
            s.e2 = r.e2
            s.xq = r.xq
            s.q2 = r.q2
            s.count = r.count
        } else {
            let n = bitsPerWeight > 0 ? Double(bytesAfter * 8) / bitsPerWeight : 0
            s.count = Int(n.rounded())
            s.e2 = mse * n
            s.x2 = sqnrDB.map { s.e2 * pow(10, $0 / 10) } ?? 0
            s.q2 = s.x2
            s.xq = cosine * s.x2
        }
        return s
    }
}

extension TensorMetrics {
    /// Metrics whose JSON is at least as long as any real one, to size reservations.
    static var widest: TensorMetrics {
        var s = qk_metrics()
        s.clipped = 0
        var m = TensorMetrics(sums: s, count: 1, bytesBefore: 0, bytesAfter: 0)
        let wide = -1.2345678901234567e-300
        m.bytesBefore = 999_999_999_999_999
        m.bytesAfter = 999_999_999_999_999
        m.maxAbsError = wide
        m.mse = wide
        m.sqnrDB = wide
        m.cosine = wide
        m.clippedFraction = wide
        m.bitsPerWeight = wide
        m.sums = ErrorSums()
        m.sums.x2 = wide
        m.sums.e2 = wide
        m.sums.xq = wide
        m.sums.q2 = wide
        m.sums.count = 999_999_999_999_999
        return m
    }
}

/// Figures of a tensor holding infinities or NaN are not finite: JSON has no such numbers, so they are
/// written as null (as qconvert's other documents do) and read back as NaN.
extension KeyedEncodingContainer {
    mutating func encodeFinite(_ v: Double, _ key: Key) throws {
        if v.isFinite { try encode(v, forKey: key) } else { try encodeNil(forKey: key) }
    }
}

extension KeyedDecodingContainer {
    func decodeFinite(_ key: Key) throws -> Double { try decodeIfPresent(Double.self, forKey: key) ?? .nan }
}

extension Checkpoint {
    /// The document's records of tensors the checkpoint holds quantized. Tensors its reader dequantizes
    /// (GGUF blocks, compressed-tensors weights) are floats already: their records only describe them.
    public func storedRecords(_ doc: MetadataDocument?) -> [String: TensorRecord] {
        let decoded = Set(dequantizedOnRead)
        return (doc?.tensors ?? [:]).filter { !$0.value.dtype.isBlock && !decoded.contains($0.key) }
    }
}
