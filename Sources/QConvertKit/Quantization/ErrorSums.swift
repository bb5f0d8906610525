import CQKernels
import Foundation

/// The raw sums every error figure of qconvert is computed from (QUANTIZATION.md section 6): the
/// per-tensor metrics of a conversion, the rows of `diff`, and the quality gates on both. Sums of
/// several tensors add up, so a model's figures come from the same definition as a tensor's.
public struct ErrorSums: Sendable, Equatable {
    /// Σx² of the reference values.
    public var x2 = 0.0
    /// Σ(x − x̂)².
    public var e2 = 0.0
    /// Σx·x̂.
    public var xq = 0.0
    /// Σx̂² of the compared values.
    public var q2 = 0.0
    public var count = 0
    public var maxAbsError = 0.0

    public init() {}

    init(_ m: qk_metrics, count: Int) {
        x2 = m.sum_x2
        e2 = m.sum_e2
        xq = m.sum_xq
        q2 = m.sum_q2
        self.count = count
        maxAbsError = Double(m.max_err)
    }

    /// The sums of comparing `y` against the reference `x`, element by element.
    public init(reference x: UnsafeBufferPointer<Float>, compared y: UnsafeBufferPointer<Float>) {
        precondition(x.count == y.count, "callers compare equal lengths")
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
        maxAbsError = me
        count = x.count
    }

    public static func + (a: ErrorSums, b: ErrorSums) -> ErrorSums {
        var s = a
        s.x2 += b.x2
        s.e2 += b.e2
        s.xq += b.xq
        s.q2 += b.q2
        s.count += b.count
        s.maxAbsError = max(a.maxAbsError, b.maxAbsError)
        return s
    }

    /// 10·log10(Σx² / Σe²); nil when the values agree exactly (infinite), −∞ when the reference is
    /// all zero and the compared values are not.
    public var sqnrDB: Double? {
        guard e2 > 0 else { return nil }
        return x2 > 0 ? 10 * log10(x2 / e2) : -.infinity
    }

    /// Σx·x̂ / (√Σx² · √Σx̂²). Two all-zero sides agree (1); one all-zero side against any other
    /// agrees in nothing (0).
    public var cosine: Double {
        if x2 > 0 && q2 > 0 { return xq / (x2.squareRoot() * q2.squareRoot()) }
        return x2 == 0 && q2 == 0 ? 1 : 0
    }

    public var mse: Double { count > 0 ? e2 / Double(count) : 0 }
}
