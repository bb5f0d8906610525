/// How the elements of a tensor map onto its quantization parameters.
///
/// Every granularity is a rank-preserving parameter shape P: along each axis
/// a parameter is shared (P = 1), distinct (P = D), or blocked (P = ceil(D / B)).
/// Element (i0, i1, …) uses the parameter at (i0 / b0, i1 / b1, …).
public struct ParamLayout: Sendable, Equatable {
    public let shape: [Int]
    public let paramShape: [Int]
    /// Per-axis divisor: D for shared axes, 1 for distinct ones, B for the blocked one.
    let divisors: [Int]
    /// The axis along which groups run (group granularity only).
    public let groupAxis: Int?

    public var paramCount: Int { paramShape.reduce(1, *) }

    public init(shape: [Int], granularity: Granularity, axis: Int, groupSize: Int) {
        self.shape = shape
        let r = shape.count
        var p = [Int](repeating: 1, count: r)
        var d = shape.map { Swift.max($0, 1) }
        var gAxis: Int? = nil
        switch granularity {
        case .tensor:
            break
        case .channel:
            if r > 0 {
                p[axis] = shape[axis]
                d[axis] = 1
            }
        case .element:
            p = shape
            d = [Int](repeating: 1, count: r)
        case .group:
            if r > 0 {
                let g = ParamLayout.groupAxis(rank: r, channelAxis: axis)
                gAxis = g
                for j in 0..<r where j != g {
                    p[j] = shape[j]
                    d[j] = 1
                }
                // ceil(D / B) without D + B - 1, which overflows for a group size near Int.max
                p[g] = shape[g] / groupSize + (shape[g] % groupSize == 0 ? 0 : 1)
                d[g] = groupSize
            }
        }
        self.paramShape = p
        self.divisors = d
        self.groupAxis = gAxis
    }

    /// Groups run along the reduction axis: the last axis, or the one before it
    /// when the output channels are last (ONNX MatMul `[K, N]`).
    public static func groupAxis(rank: Int, channelAxis: Int) -> Int {
        if rank < 2 { return 0 }
        return channelAxis == rank - 1 ? rank - 2 : rank - 1
    }

    /// Parameter index of the element at `coords` (one per axis).
    public func paramIndex(_ coords: [Int]) -> Int {
        var index = 0
        for j in 0..<coords.count { index = index * paramShape[j] + coords[j] / divisors[j] }
        return index
    }

    /// Parameter index of every element, in row-major order (reference path and gathering).
    public func paramIndices() -> [Int32] {
        let n = shape.reduce(1, *)
        var out = [Int32](repeating: 0, count: n)
        guard let last = shape.last else { return out }
        let b = divisors[shape.count - 1]
        forEachRow { row, pi in
            for k in 0..<last { out[row * last + k] = Int32(pi + k / b) }
        }
        return out
    }

    /// How parameters vary along the innermost axis.
    enum LastAxis {
        case shared, distinct
        case blocked(Int)
    }

    var lastAxisMode: LastAxis {
        guard let last = shape.last else { return .shared }
        let b = divisors[shape.count - 1]
        if paramShape[shape.count - 1] == 1 || b >= last { return .shared }
        if b == 1 { return .distinct }
        return .blocked(b)
    }

    /// When every parameter's elements form one contiguous range of the row-major order (per tensor,
    /// per channel of the first axis, groups along the last axis, per element), the start of each
    /// parameter's range (`paramCount + 1` values, the last being the element count); nil otherwise.
    public func contiguousBounds() -> [Int]? {
        let n = shape.reduce(1, *)
        let pc = paramCount
        guard let last = shape.last, n > 0 else { return nil }
        var bounds = [Int](repeating: -1, count: pc + 1)
        bounds[pc] = n
        var next = 0  // the parameter that must start next
        var ok = true
        let mode = lastAxisMode
        forEachRow { row, pi in
            guard ok else { return }
            let base = row * last
            switch mode {
            case .shared:
                if pi == next {
                    bounds[pi] = base
                    next += 1
                } else if pi != next - 1 {
                    ok = false
                }
            case .distinct:
                if pi == next {
                    for k in 0..<last { bounds[pi + k] = base + k }
                    next += last
                } else {
                    ok = false
                }
            case .blocked(let b):
                if pi == next {
                    var start = 0
                    var blk = 0
                    while start < last {
                        bounds[pi + blk] = base + start
                        start += b
                        blk += 1
                    }
                    next += blk
                } else {
                    ok = false
                }
            }
        }
        return ok && next == pc ? bounds : nil
    }

    /// Calls `body(rowIndex, firstParamIndexOfRow)` for each innermost row.
    func forEachRow(_ body: (Int, Int) throws -> Void) rethrows {
        let r = shape.count
        if r == 0 {
            try body(0, 0)
            return
        }
        let rows = shape.dropLast().reduce(1, *)
        if rows == 0 || shape[r - 1] == 0 { return }
        var pstrides = [Int](repeating: 1, count: r)
        for j in stride(from: r - 2, through: 0, by: -1) { pstrides[j] = pstrides[j + 1] * paramShape[j + 1] }
        var idx = [Int](repeating: 0, count: r - 1)
        for row in 0..<rows {
            var pi = 0
            for j in 0..<(r - 1) { pi += (idx[j] / divisors[j]) * pstrides[j] }
            try body(row, pi)
            var j = r - 2
            while j >= 0 {
                idx[j] += 1
                if idx[j] < shape[j] { break }
                idx[j] = 0
                j -= 1
            }
        }
    }
}
