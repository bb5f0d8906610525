import CQKernels
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
        let a = Double(sorted[prevIndex])
        let b = Double(sorted[nextIndex])
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
        guard amax > 0 else {
            hist[0] = Double(values.count)
            return hist
        }
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
                    let start = g * i / levels
                    let end = (g + 1) * i / levels
                    let mass = prefix[end] - prefix[start]
                    let count = nonEmptyPrefix[end] - nonEmptyPrefix[start]
                    q = (mass / Double(count)) / sumQ - eps1Q
                }
                if p <= 0 || q <= 0 {
                    valid = false
                    return
                }
                kl += p * log(p / q)
            }
            for k in nz {
                if k >= i { break }
                term(k)
            }
            if lastEmpty && outliers > 0 { term(i - 1) }
            guard valid else { continue }
            if kl <= bestKL {
                bestKL = kl
                bestI = i
            }  // ties: the largest i
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
            let alpha = Double(i)  // in bin-width units
            let step = alpha / Double(qmax)
            var err = 0.0
            for k in nz {
                let c = Double(k) + 0.5
                let q = Swift.min((c / step).rounded(.toNearestOrEven), Double(qmax))
                let e = c - q * step
                err += hist[k] * e * e
            }
            if err <= best {
                best = err
                bestI = i
            }
        }
        return bestI
    }

    /// The range [beta, alpha] of one group of values by the method's reference implementation.
    static func referenceRange(
        _ values: UnsafeBufferPointer<Float>, lo: Float, hi: Float, calibration: Calibration,
        mapping: Mapping, levels: Int, qmaxSymmetric: Int
    ) -> (beta: Float, alpha: Float) {
        calibration.method.referenceRange(
            values, lo: lo, hi: hi, mapping: mapping, levels: levels, qmaxSymmetric: qmaxSymmetric)
    }

    /// The range for candidate `i` (the threshold in bin widths).
    static func threshold(_ i: Int, bins: Int, amax: Float, lo: Float, hi: Float, mapping: Mapping) -> (
        beta: Float, alpha: Float
    ) {
        let a = amax > 0 ? Float(Double(amax) / Double(bins) * Double(i)) : 0
        return mapping == .scale ? (-a, a) : (Swift.max(lo, -a), Swift.min(hi, a))
    }
}

/// The fast calibration path: the same ranges as `Calibrator.referenceRange`, computed by the C
/// kernels in calibrate.c with buffers allocated once per tensor (and per thread), never per group.
///
/// - percentile: the two order statistics numpy's linear method needs are found by selection
///   (O(n)) instead of a sort; the result is exactly the reference's.
/// - entropy and mse: the histogram is kept sparse (non-empty bins only) and each candidate's
///   objective is evaluated from it as the reference defines it (KL regrouped so that a candidate costs
///   one vectorised logarithm per group and one per distinct bin count instead of one per bin).
/// - The calibration's `exhaustive` flag evaluates every candidate: the reference's choice up to
///   rounding of the objective. Otherwise the candidates are searched coarse to fine (calibrate.c's
///   KL_SEARCH and MSE_SEARCH): the one approximation, bounded by the tests against the exhaustive
///   search (mse within 1 % of its error; entropy's reconstruction error within 1 % of its).
public final class CalibrationScratch {
    let bins: Int
    var dense: [UInt32]
    var binIndex: [UInt32]
    var counts: [UInt32]
    var prefix: [Int64]
    var floats: [Float]
    var scratch: [Double] = []

    init(capacity: Int, calibration: Calibration) {
        let b = calibration.method.scratchBins
        bins = b > 0 ? b : 0
        let sparse = Swift.min(capacity, bins)
        dense = [UInt32](repeating: 0, count: bins)
        binIndex = [UInt32](repeating: 0, count: Swift.max(sparse, 1))
        counts = [UInt32](repeating: 0, count: Swift.max(sparse, 1))
        prefix = [Int64](repeating: 0, count: Swift.max(sparse, 1) + 1)
        floats = calibration.method.needsFloatCopy ? [Float](repeating: 0, count: Swift.max(capacity, 1)) : []
    }

    /// The range [beta, alpha] of one group of values (`lo`, `hi` its min and max).
    func range(
        _ values: UnsafeBufferPointer<Float>, lo: Float, hi: Float, calibration: Calibration, mapping: Mapping,
        levels: Int, qmaxSymmetric: Int
    ) -> (beta: Float, alpha: Float) {
        calibration.method.range(
            values, lo: lo, hi: hi, mapping: mapping, levels: levels, qmaxSymmetric: qmaxSymmetric, scratch: self)
    }

    /// The entropy method's candidate over a dense histogram of counts (an activation's), by the C
    /// kernel evaluating every candidate (the reference's choice up to rounding of the objective); nil
    /// when a count is not a whole number below 2^32, which the kernel cannot hold.
    static func entropyCandidate(histogram hist: [Double], levels: Int) -> Int? {
        var bin: [UInt32] = []
        var cnt: [UInt32] = []
        for (k, c) in hist.enumerated() where c != 0 {
            guard c > 0, c < 4_294_967_296, c == c.rounded() else { return nil }
            bin.append(UInt32(k))
            cnt.append(UInt32(c))
        }
        let bins = hist.count
        if bins <= levels { return bins }
        guard !bin.isEmpty else { return bins }
        var prefix = [Int64](repeating: 0, count: bin.count + 1)
        var scratch = [Double](
            repeating: 0, count: Int(qk_calib_scratch_doubles(Int64(bin.count), Int64(bins), Int64(levels))))
        return Int(
            qk_entropy_candidate(
                bin, cnt, Int64(bin.count), &prefix, Int64(bins), Int64(levels), &scratch, 1, nil))
    }

    /// The entropy method's candidate threshold (in bins) for one group, by the C kernel.
    func entropyCandidate(_ values: UnsafeBufferPointer<Float>, amax: Float, levels: Int, exhaustive: Bool) -> Int {
        let nz = histogram(values, amax: amax)
        let lev = Int64(levels)
        let need = Int(qk_calib_scratch_doubles(Int64(nz), Int64(bins), lev))
        if scratch.count < need { scratch = [Double](repeating: 0, count: Swift.max(need, scratch.count * 2)) }
        let i = binIndex.withUnsafeBufferPointer { b in
            counts.withUnsafeBufferPointer { c in
                prefix.withUnsafeMutableBufferPointer { pf in
                    scratch.withUnsafeMutableBufferPointer { sc in
                        qk_entropy_candidate(
                            b.baseAddress, c.baseAddress, Int64(nz), pf.baseAddress, Int64(bins),
                            lev, sc.baseAddress, exhaustive ? 1 : 0, nil)
                    }
                }
            }
        }
        return Int(i)
    }

    /// The mse method's candidate threshold (in bins) for one group, by the C kernel.
    func mseCandidate(
        _ values: UnsafeBufferPointer<Float>, amax: Float, levels: Int, qmaxSymmetric: Int, exhaustive: Bool
    ) -> Int {
        let nz = histogram(values, amax: amax)
        let i = binIndex.withUnsafeBufferPointer { b in
            counts.withUnsafeBufferPointer { c in
                prefix.withUnsafeMutableBufferPointer { pf in
                    qk_mse_candidate(
                        b.baseAddress, c.baseAddress, Int64(nz), pf.baseAddress, Int64(bins),
                        Int64(levels), Int64(qmaxSymmetric), exhaustive ? 1 : 0, nil)
                }
            }
        }
        return Int(i)
    }

    /// numpy's linear percentile from two order statistics found by selection; `a` is reordered.
    static func percentile(_ a: UnsafeMutablePointer<Float>, _ n: Int, _ p: Double) -> Double {
        let virtual = (p / 100.0) * Double(n - 1)
        let prevIndex = Swift.max(0, Swift.min(n - 1, Int(virtual.rounded(.down))))
        let nextIndex = Swift.min(n - 1, prevIndex + 1)
        let t = virtual - Double(prevIndex)
        let lower = Double(qk_select_f32(a, Int64(n), Int64(prevIndex)))
        // After selection everything from prevIndex + 1 on is ≥ a[prevIndex]: its minimum is the next order statistic.
        let upper = nextIndex == prevIndex ? lower : Double(qk_min_f32(a + nextIndex, Int64(n - nextIndex)))
        let diff = upper - lower
        return t >= 0.5 ? upper - diff * (1 - t) : lower + diff * t
    }

    /// Fills binIndex/counts with the sparse histogram of |x|; returns the number of non-empty bins.
    private func histogram(_ values: UnsafeBufferPointer<Float>, amax: Float) -> Int {
        let n = values.count
        let need = Swift.min(n, bins)
        if binIndex.count < need {
            binIndex = [UInt32](repeating: 0, count: need)
            counts = [UInt32](repeating: 0, count: need)
            prefix = [Int64](repeating: 0, count: need + 1)
        }
        return dense.withUnsafeMutableBufferPointer { d in
            binIndex.withUnsafeMutableBufferPointer { b in
                counts.withUnsafeMutableBufferPointer { c in
                    Int(
                        qk_sparse_abs_hist(
                            values.baseAddress, Int64(n), amax, Int64(bins), d.baseAddress, b.baseAddress,
                            c.baseAddress))
                }
            }
        }
    }
}

/// A rough cost model of the fast calibration path, for `plan` to say which tensors will be slow:
/// microseconds per parameter group from the group's length, fitted to measurements on this
/// project's benchmark machine (Benchmarks/calibration.py) within a factor of about 2.
public enum CalibrationCost {
    /// Estimates at or above this many seconds are reported as slow.
    public static let slow = 1.0
    /// Tensors with at most this many parameter groups (per tensor, few channels) are calibrated
    /// with the exhaustive search whatever the policy's `search`: it costs milliseconds there.
    public static let exhaustiveUpTo = 64

    public static func seconds(_ scheme: QuantScheme, layout: ParamLayout) -> Double {
        let groups = layout.paramCount
        guard groups > 0 else { return 0 }
        let n = Double(layout.shape.reduce(1, *)) / Double(groups)
        let micros = scheme.calibration.method.costMicros(
            groupLength: n, levels: Double(scheme.target.calibrationLevels))
        return micros * Double(groups) / 1e6
    }
}
