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
    ///
    /// For each candidate i: P = the first i bins with the mass of bins ≥ i added to bin i−1;
    /// Q = the first i bins merged into `levels` groups (group g covers bins
    /// [g·i/levels, (g+1)·i/levels)), each group's mass spread evenly over its non-empty bins.
    /// Both are normalised and smoothed (1e-4 moved into each empty bin). Bins empty in the
    /// histogram get the same ε in P and Q and add nothing to KL, so only non-empty bins are visited.
    public static func entropyCandidate(hist: [Double], levels: Int) -> Int {
        let bins = hist.count
        if bins <= levels { return bins }
        var prefix = [Double](repeating: 0, count: bins + 1)
        var nonEmptyPrefix = [Int](repeating: 0, count: bins + 1)
        var nz: [Int] = []
        for k in 0..<bins {
            prefix[k + 1] = prefix[k] + hist[k]
            nonEmptyPrefix[k + 1] = nonEmptyPrefix[k] + (hist[k] != 0 ? 1 : 0)
            if hist[k] != 0 { nz.append(k) }
        }
        let total = prefix[bins]
        guard total > 0 else { return bins }
        let eps = 1e-4
        var bestI = bins
        var bestKL = Double.infinity
        for i in levels...bins {
            let outliers = total - prefix[i]
            let nonEmptyQ = nonEmptyPrefix[i]
            guard nonEmptyQ > 0 else { continue }
            let lastEmpty = hist[i - 1] == 0
            let nonEmptyP = nonEmptyQ + (lastEmpty && outliers > 0 ? 1 : 0)
            let eps1P = eps * Double(i - nonEmptyP) / Double(nonEmptyP)
            let eps1Q = eps * Double(i - nonEmptyQ) / Double(nonEmptyQ)
            let sumQ = prefix[i]
            var kl = 0.0
            var valid = true
            func term(_ k: Int) {
                var pRaw = hist[k]
                if k == i - 1 { pRaw += outliers }
                let p = pRaw == 0 ? eps : pRaw / total - eps1P
                var q = eps
                if hist[k] != 0 {
                    let g = ((k + 1) * levels + i - 1) / i - 1
                    let start = g * i / levels, end = (g + 1) * i / levels
                    let mass = prefix[end] - prefix[start]
                    let count = nonEmptyPrefix[end] - nonEmptyPrefix[start]
                    q = (mass / Double(count)) / sumQ - eps1Q
                }
                if p <= 0 || q <= 0 { valid = false; return }
                kl += p * log(p / q)
            }
            for k in nz {
                if k >= i { break }
                term(k)
            }
            if lastEmpty && outliers > 0 { term(i - 1) }
            guard valid else { continue }
            if kl <= bestKL { bestKL = kl; bestI = i }   // ties: the largest i
        }
        return bestI
    }

    /// The candidate (same as entropy's) minimising the expected squared
    /// quantize→dequantize error of the bin centres, for a symmetric grid of `qmax` steps.
    public static func mseCandidate(hist: [Double], levels: Int, qmax: Int) -> Int {
        let bins = hist.count
        if bins <= levels { return bins }
        var bestI = bins
        var best = Double.infinity
        let nz = (0..<bins).filter { hist[$0] != 0 }
        for i in levels...bins {
            let alpha = Double(i)          // in bin-width units
            let step = alpha / Double(qmax)
            var err = 0.0
            for k in nz {
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
