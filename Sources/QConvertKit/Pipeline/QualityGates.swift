import Foundation

/// Thresholds a CI step sets on a conversion (or a diff): each applies to every converted tensor
/// and to the whole model.
public struct QualityGates: Sendable, Equatable {
    public var minSQNR: Double?
    public var minCosine: Double?
    public var maxSizeRatio: Double?
    /// Kept for compatibility: a failing gate never writes the output (see `Converter.convert`).
    public var noOutputOnFail = false

    public init(minSQNR: Double? = nil, minCosine: Double? = nil, maxSizeRatio: Double? = nil, noOutputOnFail: Bool = false) {
        self.minSQNR = minSQNR
        self.minCosine = minCosine
        self.maxSizeRatio = maxSizeRatio
        self.noOutputOnFail = noOutputOnFail
    }

    public var isEmpty: Bool { minSQNR == nil && minCosine == nil && maxSizeRatio == nil }

    /// One failed gate: which tensor (or "model"), which gate, the value and the threshold.
    public struct Failure: Sendable, CustomStringConvertible {
        public var tensor: String
        public var gate: String
        public var value: Double
        public var threshold: Double
        public var description: String {
            "\(tensor): \(gate) \(String(format: "%.6g", value)) (limit \(String(format: "%.6g", threshold)))"
        }
    }

    /// Per-tensor and whole-model checks on error sums.
    public func evaluate(tensors: [(name: String, x2: Double, e2: Double, xq: Double, q2: Double, before: Int, after: Int)]) -> [Failure] {
        var out: [Failure] = []
        func sqnr(_ x2: Double, _ e2: Double) -> Double { e2 > 0 ? 10 * log10(x2 / e2) : .infinity }
        // The same definition as the per-tensor metrics: two all-zero tensors agree (1); one all-zero
        // tensor against any other agrees in nothing (0).
        func cosine(_ xq: Double, _ x2: Double, _ q2: Double) -> Double {
            if x2 > 0 && q2 > 0 { return xq / (x2.squareRoot() * q2.squareRoot()) }
            return x2 == 0 && q2 == 0 ? 1 : 0
        }
        var X2 = 0.0
        var E2 = 0.0
        var XQ = 0.0
        var Q2 = 0.0
        var B = 0
        var A = 0
        for t in tensors {
            X2 += t.x2
            E2 += t.e2
            XQ += t.xq
            Q2 += t.q2
            B += t.before
            A += t.after
            if let m = minSQNR, sqnr(t.x2, t.e2) < m {
                out.append(Failure(tensor: t.name, gate: "sqnr_db", value: sqnr(t.x2, t.e2), threshold: m))
            }
            if let m = minCosine, cosine(t.xq, t.x2, t.q2) < m {
                out.append(Failure(tensor: t.name, gate: "cosine", value: cosine(t.xq, t.x2, t.q2), threshold: m))
            }
            if let m = maxSizeRatio, t.before > 0, Double(t.after) / Double(t.before) > m {
                out.append(Failure(tensor: t.name, gate: "size_ratio", value: Double(t.after) / Double(t.before), threshold: m))
            }
        }
        if let m = minSQNR, sqnr(X2, E2) < m { out.append(Failure(tensor: "model", gate: "sqnr_db", value: sqnr(X2, E2), threshold: m)) }
        if let m = minCosine, cosine(XQ, X2, Q2) < m {
            out.append(Failure(tensor: "model", gate: "cosine", value: cosine(XQ, X2, Q2), threshold: m))
        }
        if let m = maxSizeRatio, B > 0, Double(A) / Double(B) > m {
            out.append(Failure(tensor: "model", gate: "size_ratio", value: Double(A) / Double(B), threshold: m))
        }
        return out
    }

    /// Gates on a conversion: quantized and cast tensors by their metrics; sizes over every tensor.
    public func evaluate(_ r: ConversionReport) -> [Failure] {
        var rows: [(name: String, x2: Double, e2: Double, xq: Double, q2: Double, before: Int, after: Int)] = []
        for t in r.tensors {
            if let m = t.metrics {
                // Recover the sums from the metrics (mse·n = Σe², SQNR gives Σx²).
                let n = Double(Shape(t.plan.shape).elementCount)
                let e2 = m.mse * n
                let x2 = m.sqnrDB.map { e2 * pow(10, $0 / 10) } ?? 1
                let q2 = x2
                rows.append((t.plan.name, x2, e2, m.cosine * x2, q2, m.bytesBefore, m.bytesAfter))
            } else {
                rows.append((t.plan.name, 0, 0, 0, 0, t.plan.bytesBefore, t.plan.bytesAfter))
            }
        }
        // kept tensors have no error (x2 = e2 = 0 passes the SQNR and cosine gates); only their sizes count
        return evaluate(tensors: rows)
    }
}

extension QualityGates {
    /// The per-tensor rows of an earlier conversion, from its metadata document: every converted tensor
    /// by its recorded metrics, and the tensors it kept as one row (their size ratio is 1, their error 0).
    /// `bytesBefore` and `bytesAfter` are the whole model's.
    public static func rows(metadata doc: JSONValue, bytesBefore: Int, bytesAfter: Int)
        -> [(name: String, x2: Double, e2: Double, xq: Double, q2: Double, before: Int, after: Int)]
    {
        var rows: [(name: String, x2: Double, e2: Double, xq: Double, q2: Double, before: Int, after: Int)] = []
        var before = 0
        var after = 0
        for (name, record) in doc["tensors"]?.objectValue ?? [] {
            guard let m = record["metrics"] else { continue }
            let n = Double((record["source_shape"]?.arrayValue ?? []).reduce(1) { $0 * ($1.nonNegativeInt ?? 1) })
            let e2 = (m["mse"]?.doubleValue ?? 0) * n
            let x2 = m["sqnr_db"]?.doubleValue.map { e2 * pow(10, $0 / 10) } ?? 1
            let b = m["bytes_before"]?.nonNegativeInt ?? 0
            let a = m["bytes_after"]?.nonNegativeInt ?? 0
            before += b
            after += a
            rows.append((name, x2, e2, (m["cosine"]?.doubleValue ?? 1) * x2, x2, b, a))
        }
        let keptBefore = bytesBefore - before
        let keptAfter = bytesAfter - after
        if keptBefore > 0 { rows.append(("kept tensors", 0, 0, 0, 0, keptBefore, max(keptAfter, 0))) }
        return rows
    }
}

/// A quality gate failed: the command line exits with its own code and names the tensors.
public struct GateFailure: Error, CustomStringConvertible {
    public var failures: [QualityGates.Failure]
    /// Whether an output was written anyway; nil where there is no output (diff).
    public var outputWritten: Bool?
    /// The conversion that failed, for its figures (batch manifests).
    public var report: ConversionReport?
    /// Where the rejected result was written for inspection, if anywhere.
    public var rejectedPath: String?
    public init(failures: [QualityGates.Failure], outputWritten: Bool?, report: ConversionReport? = nil) {
        self.failures = failures
        self.outputWritten = outputWritten
        self.report = report
    }
    public var description: String {
        "quality gate failed for \(failures.count) check\(failures.count == 1 ? "" : "s"): "
            + failures.prefix(5).map(\.description).joined(separator: "; ")
            + (failures.count > 5 ? "; … \(failures.count - 5) more" : "")
            + (rejectedPath.map { " (output not written; the rejected result is in \($0))" }
                ?? outputWritten.map { $0 ? " (output written for inspection)" : " (output not written)" } ?? "")
    }
}
