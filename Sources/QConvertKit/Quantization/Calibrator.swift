import Foundation

/// Range selection (QUANTIZATION.md section 5). All functions are pure and deterministic.
public enum Calibrator {
    /// numpy.percentile's default ('linear') method on already sorted values.
    public static func percentileSorted(_ sorted: UnsafeBufferPointer<Float>, _ p: Double) -> Double {
        let n = sorted.count
        precondition(n > 0)
        let virtual = (p / 100.0) * Double(n - 1)
        let prevIndex = Swift.max(0, Swift.min(n - 1, Int(virtual.rounded(.down))))
        let nextIndex = Swift.min(n - 1, prevIndex + 1)
        let t = virtual - Double(prevIndex)
        let a = Double(sorted[prevIndex]), b = Double(sorted[nextIndex])
        let diff = b - a
        // numpy's _lerp: from the nearer end, so that t = 1 gives b exactly.
        return t >= 0.5 ? b - diff * (1 - t) : a + diff * t
    }

    /// The p-th percentile (numpy linear method) of the values.
    public static func percentile(_ values: [Float], _ p: Double) -> Double {
        let s = values.sorted()
        return s.withUnsafeBufferPointer { percentileSorted($0, p) }
    }

    /// Histogram of |x| over [0, amax] with `bins` equal bins; the last bin is closed.
    public static func absHistogram(_ values: UnsafeBufferPointer<Float>, amax: Float, bins: Int) -> [Double] {
        var hist = [Double](repeating: 0, count: bins)
        guard amax > 0 else { hist[0] = Double(values.count); return hist }
        let width = Double(amax) / Double(bins)
        for v in values {
            var k = Int(Double(abs(v)) / width)
            if k >= bins { k = bins - 1 }
            hist[k] += 1
        }
        return hist
    }

    /// TensorRT's entropy calibration: the threshold whose clipped distribution
    /// loses the least information (KL divergence) when merged into `levels` levels.
    /// Returns the chosen threshold alpha in units of bins (the candidate i).
    public static func entropyCandidate(hist: [Double], levels: Int) -> Int {
        let bins = hist.count
        if bins <= levels { return bins }
        var suffix = [Double](repeating: 0, count: bins + 1)
        for k in stride(from: bins - 1, through: 0, by: -1) { suffix[k] = suffix[k + 1] + hist[k] }
        var bestI = bins
        var bestKL = Double.infinity
        var p = [Double](repeating: 0, count: bins)
        var q = [Double](repeating: 0, count: bins)
        for i in levels...bins {
            for k in 0..<i { p[k] = hist[k] }
            p[i - 1] += suffix[i]
            // Q: the first i bins merged into `levels` groups, each group's mass spread
            // evenly over its non-empty bins.
            for g in 0..<levels {
                let start = g * i / levels, end = (g + 1) * i / levels
                var mass = 0.0
                var nonEmpty = 0
                for k in start..<end { mass += hist[k]; if hist[k] != 0 { nonEmpty += 1 } }
                for k in start..<end { q[k] = (hist[k] != 0 && nonEmpty > 0) ? mass / Double(nonEmpty) : 0 }
            }
            guard normalizeAndSmooth(&p, count: i), normalizeAndSmooth(&q, count: i) else { continue }
            var kl = 0.0
            for k in 0..<i { kl += p[k] * log(p[k] / q[k]) }
            if kl <= bestKL { bestKL = kl; bestI = i }   // ties: the largest i
        }
        return bestI
    }

    /// Normalises to sum 1, then moves a tiny mass (1e-4 per empty bin) from the
    /// non-empty bins to the empty ones. False when the distribution cannot be used.
    static func normalizeAndSmooth(_ d: inout [Double], count: Int) -> Bool {
        var sum = 0.0
        var zeros = 0
        for k in 0..<count { sum += d[k]; if d[k] == 0 { zeros += 1 } }
        guard sum > 0 else { return false }
        let nonZeros = count - zeros
        let eps = 1e-4
        let eps1 = eps * Double(zeros) / Double(nonZeros)
        for k in 0..<count {
            let v = d[k] / sum
            d[k] = v == 0 ? eps : v - eps1
            if d[k] <= 0 { return false }
        }
        return true
    }

    /// The candidate (same as entropy's) minimising the expected squared
    /// quantize→dequantize error of the bin centres, for a symmetric grid of `qmax` steps.
    public static func mseCandidate(hist: [Double], levels: Int, qmax: Int) -> Int {
        let bins = hist.count
        if bins <= levels { return bins }
        var bestI = bins
        var best = Double.infinity
        for i in levels...bins {
            let alpha = Double(i)          // in bin-width units
            let step = alpha / Double(qmax)
            var err = 0.0
            for k in 0..<bins where hist[k] != 0 {
                let c = Double(k) + 0.5
                let q = Swift.min((c / step).rounded(.toNearestOrEven), Double(qmax))
                let e = c - q * step
                err += hist[k] * e * e
            }
            if err <= best { best = err; bestI = i }
        }
        return bestI
    }

    /// The range [beta, alpha] of one group of values under a calibration method.
    /// `lo` and `hi` are the group's min and max.
    static func range(_ values: UnsafeBufferPointer<Float>, lo: Float, hi: Float, calibration: Calibration,
                      mapping: Mapping, levels: Int, qmaxSymmetric: Int) -> (beta: Float, alpha: Float) {
        let amax = Swift.max(abs(lo), abs(hi))
        switch calibration {
        case .max:
            return mapping == .scale ? (-amax, amax) : (lo, hi)
        case .percentile(let p):
            if mapping == .scale {
                let mags = values.map { abs($0) }.sorted()
                let a = mags.withUnsafeBufferPointer { percentileSorted($0, p) }
                return (-Float(a), Float(a))
            }
            let s = values.sorted()
            return s.withUnsafeBufferPointer {
                (Float(percentileSorted($0, (100 - p) / 2)), Float(percentileSorted($0, 100 - (100 - p) / 2)))
            }
        case .entropy(let bins, let lv):
            let hist = absHistogram(values, amax: amax, bins: bins)
            let i = entropyCandidate(hist: hist, levels: lv ?? levels)
            let a = amax > 0 ? Float(Double(amax) / Double(bins) * Double(i)) : 0
            return mapping == .scale ? (-a, a) : (Swift.max(lo, -a), Swift.min(hi, a))
        case .mse(let bins):
            let hist = absHistogram(values, amax: amax, bins: bins)
            let i = mseCandidate(hist: hist, levels: levels, qmax: qmaxSymmetric)
            let a = amax > 0 ? Float(Double(amax) / Double(bins) * Double(i)) : 0
            return mapping == .scale ? (-a, a) : (Swift.max(lo, -a), Swift.min(hi, a))
        }
    }
}
