import Foundation

/// Compares two checkpoints tensor by tensor (any formats), dequantizing qconvert outputs as needed.
public enum Diff {
    public struct Row: Sendable {
        public var name: String
        public var maxAbsError: Double
        public var sqnrDB: Double?
        public var cosine: Double
        public var x2: Double, e2: Double, xq: Double, q2: Double
        public var bytesA: Int, bytesB: Int
    }

    public struct Result: Sendable {
        public var rows: [Row]
        /// Tensors only one side has (parameter tensors of quantized ones excepted).
        public var onlyInA: [String]
        public var onlyInB: [String]

        public var json: String {
            JSONValue.object([
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
                ("only_in_a", .array(onlyInA.map(JSONValue.string))),
                ("only_in_b", .array(onlyInB.map(JSONValue.string)))
            ]).compact + "\n"
        }

        public func gateFailures(_ gates: QualityGates) -> [QualityGates.Failure] {
            gates.evaluate(tensors: rows.map { ($0.name, $0.x2, $0.e2, $0.xq, $0.q2, $0.bytesA, $0.bytesB) })
        }
    }

    /// Float values of every tensor of a checkpoint that has them (quantized ones dequantized),
    /// with the bytes each takes (parameters included).
    static func floats(_ ck: Checkpoint, path: String) throws -> [String: ([Float], Int)] {
        try ck.runDeferredChecks()
        var doc: JSONValue? = nil
        if let text = ck.metadata.first(where: { $0.key == MetadataDocument.key })?.value { doc = try? JSONParser.parse(text) }
        let records = doc?["tensors"]?.objectValue ?? []
        let byName = Dictionary(ck.entries.enumerated().map { ($1.name, $0) }, uniquingKeysWith: { a, _ in a })
        var params = Set<String>()
        for (_, r) in records {
            if let s = r["scale"]?.stringValue { params.insert(s) }
            if let z = r["zero_point"]?.stringValue { params.insert(z) }
        }
        var out: [String: ([Float], Int)] = [:]
        for (name, r) in records {
            guard let i = byName[r["values"]?.stringValue ?? name] else { continue }
            params.insert(ck.entries[i].name)
            var size = ck.entries[i].bytes.count
            for key in ["scale", "zero_point"] { if let n = r[key]?.stringValue, let j = byName[n] { size += ck.entries[j].bytes.count } }
            out[name] = (try Dequantizer.restore(ck.entries[i], record: r, ckpt: ck, byName: byName, path: path), size)
        }
        for e in ck.entries where out[e.name] == nil && !params.contains(e.name) && e.dtype.isFloatingPoint {
            out[e.name] = (
                try e.bytes.withUnsafeBytes { FloatDecoding.toFloat32($0, dtype: e.dtype, count: e.elementCount) }, e.bytes.count
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
            guard let (y, bytesB) = fb[name] else { continue }
            let (x, bytesA) = fa[name]!
            guard x.count == y.count else {
                // The checkpoints do not match: bad input (exit 3), not a mistake on the command line.
                throw QConvertError.badInput(path: b, message: "tensor '\(name)' has \(y.count) elements here but \(x.count) in \(a)")
            }
            var x2 = 0.0
            var e2 = 0.0
            var xq = 0.0
            var q2 = 0.0
            var me = 0.0
            for k in 0..<x.count {
                let xv = Double(x[k])
                let yv = Double(y[k])
                let d = xv - yv
                x2 += xv * xv
                e2 += d * d
                xq += xv * yv
                q2 += yv * yv
                me = max(me, abs(d))
            }
            let cos = x2 > 0 && q2 > 0 ? xq / (x2.squareRoot() * q2.squareRoot()) : (x2 == 0 && q2 == 0 ? 1 : 0)
            rows.append(
                Row(
                    name: name, maxAbsError: me, sqnrDB: e2 > 0 ? 10 * log10(x2 / e2) : nil, cosine: cos,
                    x2: x2, e2: e2, xq: xq, q2: q2, bytesA: bytesA, bytesB: bytesB))
        }
        rows.sort { ($0.sqnrDB ?? .infinity, $0.name) < ($1.sqnrDB ?? .infinity, $1.name) }  // worst first
        return Result(rows: rows, onlyInA: fa.keys.filter { fb[$0] == nil }.sorted(), onlyInB: fb.keys.filter { fa[$0] == nil }.sorted())
    }
}
