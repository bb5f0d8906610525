import Foundation

/// Compares two checkpoints tensor by tensor (any formats), dequantizing qconvert outputs as needed.
public enum Diff {
    public struct Row: Sendable {
        public var name: String
        public var sums: ErrorSums
        public var bytesA: Int, bytesB: Int
        /// Whether the two sides differ in stored form (dtype, quantized or not) or in value; only
        /// such tensors count in the model's figures, as only converted ones do in a conversion's.
        public var changed: Bool
        public var maxAbsError: Double { sums.maxAbsError }
        public var sqnrDB: Double? { sums.sqnrDB }
        public var cosine: Double { sums.cosine }
    }

    public struct Result: Sendable {
        public var rows: [Row]
        /// Tensors only one side has (parameter tensors of quantized ones excepted).
        public var onlyInA: [String]
        public var onlyInB: [String]

        var gateRows: [QualityGates.Row] {
            rows.map {
                QualityGates.Row(name: $0.name, sums: $0.sums, before: $0.bytesA, after: $0.bytesB, changed: $0.changed)
            }
        }

        /// The model's sums: those of the tensors that differ, added up.
        public var model: ErrorSums { QualityGates.modelSums(gateRows) }

        public var json: String {
            let m = model
            return JSONValue.object([
                ("format", .string("qconvert.diff/1")),
                (
                    "tensors",
                    .array(
                        rows.map { r in
                            .object([
                                ("name", .string(r.name)), ("max_abs_err", .number(r.maxAbsError)),
                                ("sqnr_db", r.sqnrDB.map(JSONValue.number) ?? .null), ("cosine", .number(r.cosine)),
                                ("bytes_a", .int(r.bytesA)), ("bytes_b", .int(r.bytesB))
                            ])
                        })
                ),
                (
                    "model",
                    .object([
                        ("tensors", .int(rows.filter(\.changed).count)), ("max_abs_err", .number(m.maxAbsError)),
                        ("sqnr_db", m.sqnrDB.map(JSONValue.number) ?? .null), ("cosine", .number(m.cosine))
                    ])
                ),
                ("only_in_a", .array(onlyInA.map(JSONValue.string))),
                ("only_in_b", .array(onlyInB.map(JSONValue.string)))
            ]).compact + "\n"
        }

        public func gateFailures(_ gates: QualityGates) -> [QualityGates.Failure] { gates.evaluate(gateRows) }
    }

    /// Float values of every tensor of a checkpoint that has them (quantized ones dequantized),
    /// with the bytes each takes (parameters included).
    static func floats(_ ck: Checkpoint, path: String) throws -> [String: (values: [Float], bytes: Int, form: String)] {
        // block types are restored by the reader of the format that holds them (GGUF): its entries are floats
        let records = ck.storedRecords(try MetadataDocument.find(in: ck.metadata, path: path))
        let byName = Dictionary(ck.entries.enumerated().map { ($1.name, $0) }, uniquingKeysWith: { a, _ in a })
        var params = Set<String>()
        for (_, r) in records {
            if let s = r.scale { params.insert(s) }
            if let z = r.zeroPoint { params.insert(z) }
        }
        var out: [String: (values: [Float], bytes: Int, form: String)] = [:]
        for (name, r) in records {
            guard let i = byName[r.values ?? name] else { continue }
            params.insert(ck.entries[i].name)
            var size = ck.entries[i].bytes.count
            for n in [r.scale, r.zeroPoint].compactMap({ $0 }) {
                if let j = byName[n] { size += ck.entries[j].bytes.count }
            }
            let form = "quantized " + r.dtype.rawValue
            out[name] = (
                try Dequantizer.restore(ck.entries[i], record: r, ckpt: ck, byName: byName, path: path), size, form
            )
        }
        for e in ck.entries where out[e.name] == nil && !params.contains(e.name) && e.dtype.isFloatingPoint {
            out[e.name] = (
                try e.bytes.withUnsafeBytes { FloatDecoding.toFloat32($0, dtype: e.dtype, count: e.elementCount) },
                e.bytes.count,
                e.dtype.rawValue
            )
        }
        return out
    }

    public static func run(_ a: String, _ b: String) throws -> Result {
        let ca = try Converter.open(a)
        let cb = try Converter.open(b)
        let fa = try floats(ca, path: a)
        let fb = try floats(cb, path: b)
        var rows: [Row] = []
        for name in fa.keys.sorted() {
            guard let sb = fb[name], let sa = fa[name] else { continue }
            guard sa.values.count == sb.values.count else {
                // The checkpoints do not match: bad input (exit 3), not a mistake on the command line.
                throw QConvertError.badInput(
                    path: b,
                    message: "tensor '\(name)' has \(sb.values.count) elements here but \(sa.values.count) in \(a)")
            }
            let sums = sa.values.withUnsafeBufferPointer { x in
                sb.values.withUnsafeBufferPointer { y in ErrorSums(reference: x, compared: y) }
            }
            rows.append(
                Row(
                    name: name, sums: sums, bytesA: sa.bytes, bytesB: sb.bytes,
                    changed: sa.form != sb.form || sums.e2 > 0))
        }
        rows.sort { ($0.sqnrDB ?? .infinity, $0.name) < ($1.sqnrDB ?? .infinity, $1.name) }  // worst first
        return Result(
            rows: rows, onlyInA: fa.keys.filter { fb[$0] == nil }.sorted(),
            onlyInB: fb.keys.filter { fa[$0] == nil }.sorted())
    }
}
