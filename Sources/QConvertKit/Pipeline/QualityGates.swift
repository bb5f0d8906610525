import Foundation

/// Thresholds a CI step sets on a conversion (or a diff): each applies to every converted tensor
/// and to the whole model.
public struct QualityGates: Sendable, Equatable {
    public var minSQNR: Double?
    public var minCosine: Double?
    public var maxSizeRatio: Double?
    /// Kept for compatibility: a failing gate never writes the output (see `Converter.convert`).
    public var noOutputOnFail = false

    public init(
        minSQNR: Double? = nil, minCosine: Double? = nil, maxSizeRatio: Double? = nil, noOutputOnFail: Bool = false
    ) {
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

    /// One tensor as the gates see it: its error sums, its sizes, and whether the conversion changed
    /// it (quantized or cast, or different values); only changed tensors count in the model's figures.
    public struct Row: Sendable {
        public var name: String
        public var sums: ErrorSums
        public var before: Int
        public var after: Int
        public var changed: Bool
        public init(name: String, sums: ErrorSums, before: Int, after: Int, changed: Bool) {
            self.name = name
            self.sums = sums
            self.before = before
            self.after = after
            self.changed = changed
        }
    }

    /// The whole model's sums: those of the tensors the conversion changed, added up.
    public static func modelSums(_ rows: [Row]) -> ErrorSums {
        rows.filter(\.changed).reduce(ErrorSums()) { $0 + $1.sums }
    }

    /// Per-tensor and whole-model checks; the model's failures come first.
    public func evaluate(_ rows: [Row]) -> [Failure] {
        var perTensor: [Failure] = []
        var model: [Failure] = []
        func check(_ name: String, _ s: ErrorSums, before: Int, after: Int, into out: inout [Failure]) {
            let sqnr = s.sqnrDB ?? .infinity
            if let m = minSQNR, sqnr < m {
                out.append(Failure(tensor: name, gate: "sqnr_db", value: sqnr, threshold: m))
            }
            if let m = minCosine, s.cosine < m {
                out.append(Failure(tensor: name, gate: "cosine", value: s.cosine, threshold: m))
            }
            if let m = maxSizeRatio, before > 0, Double(after) / Double(before) > m {
                out.append(
                    Failure(tensor: name, gate: "size_ratio", value: Double(after) / Double(before), threshold: m))
            }
        }
        for r in rows { check(r.name, r.sums, before: r.before, after: r.after, into: &perTensor) }
        check(
            "model", Self.modelSums(rows), before: rows.reduce(0) { $0 + $1.before },
            after: rows.reduce(0) { $0 + $1.after },
            into: &model)
        return model + perTensor
    }

    /// Gates on a conversion: quantized and cast tensors by their sums; sizes over every tensor.
    public func evaluate(_ r: ConversionReport) -> [Failure] { evaluate(r.gateRows) }
}

extension ConversionReport {
    /// Every tensor as the gates see it. Kept tensors have no error and do not count in the model's
    /// SQNR and cosine; their sizes do count.
    public var gateRows: [QualityGates.Row] {
        tensors.map { t in
            if let m = t.metrics {
                return QualityGates.Row(
                    name: t.plan.name, sums: m.sums, before: m.bytesBefore, after: m.bytesAfter, changed: true)
            }
            return QualityGates.Row(
                name: t.plan.name, sums: ErrorSums(), before: t.plan.bytesBefore, after: t.plan.bytesAfter,
                changed: false)
        }
    }

    /// The model's error sums (the tensors the conversion quantized or cast).
    public var modelSums: ErrorSums { QualityGates.modelSums(gateRows) }
}

extension QualityGates {
    /// The rows of an earlier conversion, from its metadata document: every converted tensor by its
    /// recorded sums, and the tensors it kept as one row (their size ratio is 1, their error 0).
    /// `bytesBefore` and `bytesAfter` are the whole model's.
    public static func rows(_ records: [String: TensorRecord], bytesBefore: Int, bytesAfter: Int) -> [Row] {
        var rows: [Row] = []
        var before = 0
        var after = 0
        for (name, r) in records.sorted(by: { $0.key < $1.key }) {
            guard let m = r.metrics else { continue }
            before += m.bytesBefore
            after += m.bytesAfter
            rows.append(Row(name: name, sums: m.errorSums, before: m.bytesBefore, after: m.bytesAfter, changed: true))
        }
        if bytesBefore - before > 0 {
            rows.append(
                Row(
                    name: "kept tensors", sums: ErrorSums(), before: bytesBefore - before,
                    after: max(bytesAfter - after, 0), changed: false
                ))
        }
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
