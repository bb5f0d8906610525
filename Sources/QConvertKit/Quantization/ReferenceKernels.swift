import CQKernels

/// Plain scalar kernels: the specification the fast C kernels are tested against bit for bit.
public enum ReferenceKernels {
    /// q = clamp(round_half_even(x / Δ) + z, qmin, qmax), one byte per element.
    static func quantize(
        _ x: UnsafeBufferPointer<Float>, paramIndex: [Int32], scales: [Float], zeroPoints: [Int32],
        qmin: Int32, qmax: Int32, out: inout [UInt8], sums: inout qk_metrics
    ) {
        var m = MetricSums()
        for i in 0..<x.count {
            let p = Int(paramIndex[i])
            let s = scales[p]
            let z = zeroPoints[p]
            let v = x[i] / s
            let lo = Float(qmin - z)
            let hi = Float(qmax - z)
            if v < lo - 0.5 || v > hi + 0.5 { m.clipped += 1 }
            let r = Swift.min(Swift.max(v, lo), hi).rounded(.toNearestOrEven)
            let q = Int32(r) + z
            out[i] = UInt8(truncatingIfNeeded: q)
            m.add(x[i], r * s)
        }
        m.store(into: &sums)
    }

    /// IEEE binary16 conversion by Swift's own Float16 (round to nearest even).
    public static func f32ToF16(_ x: [Float]) -> [UInt16] { x.map { Float16($0).bitPattern } }
    public static func f16ToF32(_ h: [UInt16]) -> [Float] { h.map { Float(Float16(bitPattern: $0)) } }

    /// bfloat16: round to nearest even on the dropped 16 bits, NaN stays NaN.
    public static func f32ToBF16(_ x: [Float]) -> [UInt16] {
        x.map { v in
            if v.isNaN { return UInt16(v.bitPattern >> 16) | 0x40 }
            let b = v.bitPattern
            let lower = b & 0xFFFF
            let upper = b >> 16
            if lower > 0x8000 || (lower == 0x8000 && (upper & 1) == 1) { return UInt16(truncatingIfNeeded: upper + 1) }
            return UInt16(upper)
        }
    }
}
