/// The two 8-bit float formats: E4M3FN (no infinities, max 448) and E5M2 (max 57344).
public enum FP8 {
    public enum Format: Sendable { case e4m3, e5m2 }

    static func params(_ f: Format) -> (mbits: Int, bias: Int, maxCode: UInt8, maxValue: Float) {
        switch f {
        case .e4m3: return (3, 7, 0x7E, 448)
        case .e5m2: return (2, 15, 0x7B, 57344)
        }
    }

    public static func maxFinite(_ f: Format) -> Float { params(f).maxValue }

    private static let e4m3Table: [Float] = (0..<256).map { decodeSlow(UInt8($0), format: .e4m3) }
    private static let e5m2Table: [Float] = (0..<256).map { decodeSlow(UInt8($0), format: .e5m2) }

    @inline(__always)
    public static func decode(_ b: UInt8, format: Format) -> Float {
        format == .e4m3 ? e4m3Table[Int(b)] : e5m2Table[Int(b)]
    }

    static func decodeSlow(_ b: UInt8, format: Format) -> Float {
        let (m, bias, _, _) = params(format)
        let sign: Float = (b & 0x80) != 0 ? -1 : 1
        let e = Int((b & 0x7F) >> UInt8(m))
        let man = Int(b) & ((1 << m) - 1)
        let expMax = (1 << (7 - m)) - 1
        if format == .e4m3, e == expMax, man == (1 << m) - 1 { return .nan }
        if format == .e5m2, e == expMax { return man == 0 ? sign * .infinity : .nan }
        if e == 0 { return sign * Float(man) * Float(sign: .plus, exponent: 1 - bias - m, significand: 1) }
        return sign * (1 + Float(man) / Float(1 << m)) * Float(sign: .plus, exponent: e - bias, significand: 1)
    }

    /// Round-to-nearest-even encoding that saturates to the largest finite value.
    /// The input must be finite.
    public static func encode(_ x: Float, format: Format) -> UInt8 {
        let (m, bias, maxCode, maxValue) = params(format)
        let sign: UInt8 = x.sign == .minus ? 0x80 : 0
        let a = abs(x)
        if a >= maxValue { return sign | maxCode }
        if a == 0 { return sign }
        let minExp = 1 - bias
        var e = Int(a.exponent)
        if e < minExp {
            // subnormal: units of 2^(minExp - m)
            let q = (a * Float(sign: .plus, exponent: m - minExp, significand: 1)).rounded(.toNearestOrEven)
            return sign | UInt8(q)  // q == 2^m is exactly the smallest normal code
        }
        let frac = a * Float(sign: .plus, exponent: -e, significand: 1) - 1  // [0, 1)
        var q = Int((frac * Float(1 << m)).rounded(.toNearestOrEven))
        if q == (1 << m) {
            q = 0
            e += 1
        }
        let code = UInt8((e + bias) << m | q)
        if code > maxCode { return sign | maxCode }
        return sign | code
    }
}
