/// Sub-byte packing: 8 / bits values per byte along the last axis, element 0 in the lowest bits; a row
/// whose length is not a multiple leaves the last byte's high bits 0. 4-bit types use it today.
public enum Packing {
    /// Codes of `bits` bits (1, 2 or 4; the low bits of each byte of `q`) packed along the last axis.
    public static func pack(_ q: [UInt8], shape: [Int], bits: Int) -> [UInt8] {
        precondition(bits == 1 || bits == 2 || bits == 4, "packing is for 1, 2 or 4 bits")
        let per = 8 / bits
        let mask = UInt8((1 << bits) - 1)
        let L = shape.last ?? 1
        let rows = L == 0 ? 0 : q.count / L
        let pl = (L + per - 1) / per
        var out = [UInt8](repeating: 0, count: rows * pl)
        q.withUnsafeBufferPointer { src in
            out.withUnsafeMutableBufferPointer { dst in
                for r in 0..<rows {
                    let row = src.baseAddress! + r * L
                    let o = dst.baseAddress! + r * pl
                    if bits == 4 {
                        // the common case, two codes a byte without divisions
                        var k = 0
                        while k + 1 < L {
                            o[k >> 1] = (row[k] & 0x0F) | (row[k + 1] << 4)
                            k += 2
                        }
                        if k < L { o[k >> 1] = row[k] & 0x0F }
                    } else {
                        for k in 0..<L { o[k / per] |= (row[k] & mask) << UInt8((k % per) * bits) }
                    }
                }
            }
        }
        return out
    }

    /// The inverse of `pack`: one code per byte (not sign-extended).
    public static func unpack(_ packed: [UInt8], shape: [Int], bits: Int) -> [UInt8] {
        precondition(bits == 1 || bits == 2 || bits == 4, "packing is for 1, 2 or 4 bits")
        let per = 8 / bits
        let mask = UInt8((1 << bits) - 1)
        let L = shape.last ?? 1
        let n = shape.reduce(1, *)
        let rows = L == 0 ? 0 : n / L
        let pl = (L + per - 1) / per
        var out = [UInt8](repeating: 0, count: n)
        packed.withUnsafeBufferPointer { src in
            out.withUnsafeMutableBufferPointer { dst in
                for r in 0..<rows {
                    let p = src.baseAddress! + r * pl
                    let o = dst.baseAddress! + r * L
                    if bits == 4 {
                        for k in 0..<L { o[k] = (k & 1) == 0 ? p[k >> 1] & 0x0F : p[k >> 1] >> 4 }
                    } else {
                        for k in 0..<L { o[k] = (p[k / per] >> UInt8((k % per) * bits)) & mask }
                    }
                }
            }
        }
        return out
    }

    public static func pack4(_ q: [UInt8], shape: [Int]) -> [UInt8] { pack(q, shape: shape, bits: 4) }
    public static func unpack4(_ packed: [UInt8], shape: [Int]) -> [UInt8] { unpack(packed, shape: shape, bits: 4) }

    /// A `bits`-bit two's complement code widened to a byte (4 bits: 0x0D → 0xFD); higher bits ignored.
    public static func signExtend(_ b: UInt8, bits: Int) -> UInt8 {
        let mask = UInt8((1 << bits) - 1)
        let sign = UInt8(1 << (bits - 1))
        return (b & sign) != 0 ? b | ~mask : b & mask
    }

    public static func signExtend4(_ b: UInt8) -> UInt8 { signExtend(b, bits: 4) }
}
