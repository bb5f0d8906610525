/// 4-bit packing: two values per byte along the last axis, element 0 in the low nibble;
/// a row of odd length leaves the last high nibble 0.
public enum Packing {
    public static func pack4(_ q: [UInt8], shape: [Int]) -> [UInt8] {
        let L = shape.last ?? 1
        let rows = L == 0 ? 0 : q.count / L
        let pl = (L + 1) / 2
        var out = [UInt8](repeating: 0, count: rows * pl)
        for r in 0..<rows {
            for k in 0..<L {
                let v = q[r * L + k] & 0x0F
                out[r * pl + k / 2] |= (k & 1) == 0 ? v : v << 4
            }
        }
        return out
    }

    /// The inverse of `pack4`: one nibble per byte (not sign-extended).
    public static func unpack4(_ packed: [UInt8], shape: [Int]) -> [UInt8] {
        let L = shape.last ?? 1
        let n = shape.reduce(1, *)
        let rows = L == 0 ? 0 : n / L
        let pl = (L + 1) / 2
        var out = [UInt8](repeating: 0, count: n)
        for r in 0..<rows {
            for k in 0..<L {
                let b = packed[r * pl + k / 2]
                out[r * L + k] = (k & 1) == 0 ? b & 0x0F : b >> 4
            }
        }
        return out
    }

    /// A 4-bit two's complement code widened to a byte (0x0D → 0xFD); the high nibble is ignored.
    public static func signExtend4(_ b: UInt8) -> UInt8 { (b & 0x08) != 0 ? b | 0xF0 : b & 0x0F }
}
