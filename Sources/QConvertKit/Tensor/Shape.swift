/// A tensor shape with overflow-checked size arithmetic.
public struct Shape: Sendable, Hashable, Codable, CustomStringConvertible {
    public var dims: [Int]

    public init(_ dims: [Int]) { self.dims = dims }

    public var rank: Int { dims.count }

    /// Number of elements, or nil when the product overflows or a dim is negative.
    public var checkedElementCount: Int? {
        var n = 1
        for d in dims {
            guard d >= 0 else { return nil }
            let (p, o) = n.multipliedReportingOverflow(by: d)
            if o { return nil }
            n = p
        }
        return n
    }

    /// Number of elements; call only on validated shapes.
    public var elementCount: Int { checkedElementCount ?? 0 }

    /// Bytes needed for `dtype` (4-bit types packed two per byte), or nil on overflow.
    public func checkedByteCount(_ dtype: DType) -> Int? {
        guard let n = checkedElementCount else { return nil }
        let (bits, o) = n.multipliedReportingOverflow(by: dtype.bits)
        if o { return nil }
        return (bits + 7) / 8
    }

    public var description: String { "[" + dims.map(String.init).joined(separator: ", ") + "]" }
}
