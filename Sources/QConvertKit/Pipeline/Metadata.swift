import CQKernels
import Foundation

public enum QConvertVersion {
    public static let string = "0.1.0"
}

/// The metadata document (QUANTIZATION.md section 7; Schemas/metadata.schema.json) carried by every output.
public enum MetadataDocument {
    /// The key under which formats store the document.
    public static let key = "qconvert.quantization"
    public static let formatTag = "qconvert.quantization/1"

    /// One converted tensor's record.
    public static func tensorRecord(_ p: TensorPlan, metrics: TensorMetrics?) -> JSONValue {
        guard let s = p.decision.scheme else { return .null }
        var kv: [(String, JSONValue)] = [
            ("source_dtype", .string(p.dtype.safetensorsName ?? p.dtype.rawValue)),
            ("source_shape", .array(p.shape.map(JSONValue.int))),
            ("dtype", .string(s.target.rawValue)),
            ("storage_dtype", .string(s.target.storageDType.safetensorsName ?? s.target.storageDType.rawValue)),
            ("storage_shape", .array(Quantizer.storedShape(p.shape, target: s.target).map(JSONValue.int)))
        ]
        if s.target.isQuantization {
            kv.append(("mapping", .string(s.mapping.rawValue)))
            kv.append(("granularity", .string(s.granularity.rawValue)))
            kv.append(("axis", s.granularity == .channel || s.granularity == .group ? .int(s.axis) : .null))
            if s.granularity == .group {
                kv.append(("group_axis", .int(ParamLayout.groupAxis(rank: p.shape.count, channelAxis: s.axis))))
                kv.append(("group_size", .int(s.groupSize)))
            }
            var cal: [(String, JSONValue)] = [("method", .string(s.calibration.name))]
            switch s.calibration {
            case .percentile(let pc): cal.append(("percentile", .number(pc)))
            case .entropy(let bins, let lv, let exhaustive):
                cal.append(("bins", .int(bins)))
                cal.append(("search", .string(exhaustive ? "exhaustive" : "fast")))
                cal.append(("levels", .int(lv ?? (s.target.isFP8 ? 128 : 1 << (s.target.bits - 1)))))
            case .mse(let bins, let exhaustive):
                cal.append(("bins", .int(bins)))
                cal.append(("search", .string(exhaustive ? "exhaustive" : "fast")))
            case .max: break
            }
            kv.append(("calibration", .object(cal)))
            let (qmin, qmax) = s.integerRange
            if s.target.isIntegerQuantization {
                kv.append(("qmin", .int(Int(qmin))))
                kv.append(("qmax", .int(Int(qmax))))
            }
            if s.fullSymmetricRange { kv.append(("symmetric_range", .string("full"))) }
            kv.append(("scale", p.scaleName.map(JSONValue.string) ?? .null))
            kv.append(("scale_shape", .array(p.paramShape.map(JSONValue.int))))
            kv.append(("zero_point", p.zeroPointName.map(JSONValue.string) ?? .null))
            if s.target.isPacked4 {
                kv.append(
                    (
                        "packing",
                        .object([
                            ("bits", .int(4)), ("signed", .bool(s.target.isSigned)), ("axis", .int(-1)),
                            ("order", .string("low_nibble_first")),
                            (
                                "note",
                                .string(
                                    "two values per byte along the last axis, element 0 in the low nibble; an odd row length leaves the last high nibble 0"
                                )
                            )
                        ])
                    ))
            }
        } else if s.target == .fp16 {
            kv.append(("saturate", .bool(s.saturate)))
        }
        kv.append(("rule", .string(p.rule)))
        if let m = metrics { kv.append(("metrics", metricsJSON(m))) }
        return .object(kv)
    }

    public static func metricsJSON(_ m: TensorMetrics) -> JSONValue {
        .object([
            ("max_abs_err", .number(m.maxAbsError)),
            ("mse", .number(m.mse)),
            ("sqnr_db", m.sqnrDB.map(JSONValue.number) ?? .null),
            ("cosine", .number(m.cosine)),
            ("clipped", .number(m.clippedFraction)),
            ("bits_per_weight", .number(m.bitsPerWeight)),
            ("bytes_before", .int(m.bytesBefore)),
            ("bytes_after", .int(m.bytesAfter))
        ])
    }

    /// A metrics value whose JSON is at least as long as any real one, to size reservations.
    static let widestMetrics = TensorMetricsPlaceholder.value

    public static func document(
        plans: [TensorPlan], metrics: [Int: TensorMetrics], inputFormat: String,
        inputHash: String, policy: Policy, only: Set<Int>? = nil
    ) -> String {
        var tensors: [(String, JSONValue)] = []
        var kept = 0
        for (i, p) in plans.enumerated() {
            if let only, !only.contains(i) { continue }
            if p.decision.scheme == nil {
                kept += 1
                continue
            }
            tensors.append((p.name, tensorRecord(p, metrics: metrics[i])))
        }
        let doc: JSONValue = .object([
            ("format", .string(formatTag)),
            ("tool", .object([("name", .string("qconvert")), ("version", .string(QConvertVersion.string))])),
            ("input", .object([("format", .string(inputFormat)), ("hash", .string(inputHash))])),
            ("policy", .object([("source", .string(policy.source)), ("sha256", .string(sha256Hex(policy.text)))])),
            (
                "dequantize",
                .string(
                    "x = (q - zero_point) * scale; zero_point is 0 when absent; parameters broadcast against q (same rank, size 1 on shared axes; groups repeat group_size times along group_axis)"
                )
            ),
            ("kept_tensors", .int(kept)),
            ("tensors", .object(tensors))
        ])
        return doc.compact
    }
}

enum TensorMetricsPlaceholder {
    static var value: TensorMetrics {
        var s = qk_metrics()
        s.clipped = 0
        var m = TensorMetrics(sums: s, count: 1, bytesBefore: 0, bytesAfter: 0)
        m.bytesBefore = 999_999_999_999_999
        m.bytesAfter = 999_999_999_999_999
        let wide = -1.2345678901234567e-300
        m.maxAbsError = wide
        m.mse = wide
        m.sqnrDB = wide
        m.cosine = wide
        m.clippedFraction = wide
        m.bitsPerWeight = wide
        return m
    }
}
