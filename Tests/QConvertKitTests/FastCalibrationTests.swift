import CQKernels
import Foundation
import Testing

@testable import QConvertKit

/// The fast calibration path (calibrate.c) against the straightforward Swift reference
/// (`Calibrator.referenceRange`), on rows where the answer is easy to get wrong.
@Suite struct FastCalibrationMatchesReference {
    /// Named rows: heavy tails with outliers, constant, all zero, shorter than the histogram,
    /// exact ties (many equal values, values on bin edges), a single value, negative-only.
    static func rows() -> [(String, [Float])] {
        var rng = SeededRandom(42)
        func studentT() -> Float {
            let z = rng.normal()
            var c: Float = 0
            for _ in 0..<3 {
                let g = rng.normal()
                c += g * g
            }
            return z / (c / 3).squareRoot()
        }
        var out: [(String, [Float])] = []
        for k in 0..<6 {
            var r = (0..<1024).map { _ in studentT() * 0.05 }
            r[k * 37] = 3.5 * (k % 2 == 0 ? 1 : -1)
            out.append(("heavy-tailed \(k)", r))
        }
        out.append(("normal 4096", (0..<4096).map { _ in rng.normal() }))
        out.append(("group of 128", (0..<128).map { _ in studentT() }))
        out.append(("constant", [Float](repeating: 0.25, count: 300)))
        out.append(("all zero", [Float](repeating: 0, count: 300)))
        out.append(("short 5", [0.1, -0.7, 0.3, 2, -0.05]))
        out.append(("short 100", (0..<100).map { _ in rng.normal() }))
        out.append(("single", [1.5]))
        out.append(("ties", (0..<999).map { Float($0 % 9) * 0.5 - 2 }))
        out.append(("bin edges", (0..<2049).map { Float($0) / 2048 }))
        out.append(("negative only", (0..<700).map { _ in -abs(rng.normal()) - 0.1 }))
        return out
    }

    static let calibrations: [Calibration] = [
        .percentile(99.9), .percentile(50), .percentile(100), .percentile(0.5),
        .entropy(bins: 2048, levels: nil, exhaustive: true), .entropy(bins: 512, levels: 8, exhaustive: true),
        .entropy(bins: 64, levels: 128, exhaustive: true)
    ]

    func ranges(_ x: [Float], _ cal: Calibration, _ mapping: Mapping, levels: Int, qmax: Int)
        -> (fast: (beta: Float, alpha: Float), ref: (beta: Float, alpha: Float))
    {
        x.withUnsafeBufferPointer { v in
            let lo = x.min()!
            let hi = x.max()!
            let scratch = CalibrationScratch(capacity: x.count, calibration: cal)
            let f = scratch.range(
                v, lo: lo, hi: hi, calibration: cal, mapping: mapping, levels: levels, qmaxSymmetric: qmax)
            let r = Calibrator.referenceRange(
                v, lo: lo, hi: hi, calibration: cal, mapping: mapping, levels: levels,
                qmaxSymmetric: qmax)
            return (f, r)
        }
    }

    /// Percentile exactly; entropy with the exhaustive search exactly (the fast search is bounded below).
    @Test func percentileAndEntropyRangesAreTheReferences() {
        for (name, x) in Self.rows() {
            for cal in Self.calibrations {
                for mapping in [Mapping.scale, .affine] {
                    for (levels, qmax) in [(128, 127), (8, 7)] {
                        let (f, r) = ranges(x, cal, mapping, levels: levels, qmax: qmax)
                        #expect(
                            f.beta == r.beta && f.alpha == r.alpha,
                            "\(name) \(cal) \(mapping) levels \(levels): \(f) vs \(r)")
                    }
                }
            }
        }
    }

    /// The same histogram the Swift reference builds, as the sparse arrays the kernels take.
    func sparseHistogram(_ x: [Float], bins: Int) -> (bin: [UInt32], cnt: [UInt32]) {
        let amax = x.map { abs($0) }.max() ?? 0
        let hist = x.withUnsafeBufferPointer { Calibrator.absHistogram($0, amax: amax, bins: bins) }
        var bin: [UInt32] = []
        var cnt: [UInt32] = []
        for (k, h) in hist.enumerated() where h > 0 {
            bin.append(UInt32(k))
            cnt.append(UInt32(h))
        }
        // The kernel's own histogram is the same.
        var dense = [UInt32](repeating: 0, count: bins)
        var b2 = [UInt32](repeating: 0, count: max(x.count, 1))
        var c2 = b2
        let nz = x.withUnsafeBufferPointer {
            qk_sparse_abs_hist($0.baseAddress, Int64(x.count), amax, Int64(bins), &dense, &b2, &c2)
        }
        #expect(Array(b2.prefix(Int(nz))) == bin && Array(c2.prefix(Int(nz))) == cnt)
        #expect(dense.allSatisfy { $0 == 0 })
        return (bin, cnt)
    }

    func mseObjective(_ h: (bin: [UInt32], cnt: [UInt32]), bins: Int, levels: Int, qmax: Int, _ i: Int) -> Double {
        var prefix = [Int64](repeating: 0, count: h.bin.count + 1)
        return qk_mse_objective(
            h.bin, h.cnt, Int64(h.bin.count), &prefix, Int64(bins), Int64(levels), Int64(qmax), Int64(i))
    }

    func mseCandidate(_ h: (bin: [UInt32], cnt: [UInt32]), bins: Int, levels: Int, qmax: Int, exhaustive: Bool) -> (
        Int, Int
    ) {
        var prefix = [Int64](repeating: 0, count: h.bin.count + 1)
        var evaluations: Int64 = 0
        let i = qk_mse_candidate(
            h.bin, h.cnt, Int64(h.bin.count), &prefix, Int64(bins), Int64(levels), Int64(qmax),
            exhaustive ? 1 : 0, &evaluations)
        return (Int(i), Int(evaluations))
    }

    /// mse: the exhaustive kernel search finds the reference's minimum (its objective equal up to
    /// rounding), and the coarse-to-fine search stays within 1 % of it while evaluating far fewer candidates.
    @Test func mseSearchIsBoundedByTheExhaustiveOne() {
        var worst = 0.0
        for (name, x) in Self.rows() {
            for (bins, levels, qmax) in [(2048, 128, 127), (2048, 8, 7), (300, 128, 127)] {
                let h = sparseHistogram(x, bins: bins)
                let hist = x.withUnsafeBufferPointer {
                    Calibrator.absHistogram($0, amax: x.map { abs($0) }.max()!, bins: bins)
                }
                let ref = Calibrator.mseCandidate(hist: hist, levels: levels, qmax: qmax)
                let (exhaustive, _) = mseCandidate(h, bins: bins, levels: levels, qmax: qmax, exhaustive: true)
                let (fast, evaluations) = mseCandidate(h, bins: bins, levels: levels, qmax: qmax, exhaustive: false)
                let eRef = mseObjective(h, bins: bins, levels: levels, qmax: qmax, ref)
                let eEx = mseObjective(h, bins: bins, levels: levels, qmax: qmax, exhaustive)
                let eFast = mseObjective(h, bins: bins, levels: levels, qmax: qmax, fast)
                #expect(
                    abs(eEx - eRef) <= 1e-9 * max(eRef, 1e-300),
                    "\(name) bins \(bins): exhaustive \(exhaustive) \(eEx) vs reference \(ref) \(eRef)")
                #expect(
                    eFast <= eEx * 1.01 + 1e-12,
                    "\(name) bins \(bins) levels \(levels): \(fast) \(eFast) vs \(exhaustive) \(eEx)")
                if bins - levels > 200 {
                    #expect(evaluations < (bins - levels) / 8, "\(name): \(evaluations) evaluations")
                }
                if eEx > 0 { worst = max(worst, eFast / eEx - 1) }
            }
        }
        #expect(worst < 0.01)
    }

    /// Whole tensors: the fast path gives the reference's bytes for percentile and entropy, per
    /// channel and per group, and mse within 1 % of the reference's error.
    @Test func wholeTensorsMatchTheReference() throws {
        var rng = SeededRandom(7)
        let shape = [24, 200]
        var x = (0..<4800).map { _ in rng.normal() * 0.1 }
        x[17] = 4
        x[3000] = -6
        for k in 1000..<1200 { x[k] = 0.5 }  // a constant row
        for k in 2000..<2200 { x[k] = 0 }  // an all-zero row
        let calibrations: [Calibration] = [
            .percentile(99.5), .entropy(bins: 2048, levels: nil, exhaustive: true),
            .entropy(bins: 2048, levels: nil), .mse(bins: 2048)
        ]
        for cal in calibrations {
            for (target, mapping) in [(TargetType.int8, Mapping.scale), (.uint8, .affine), (.int4, .scale)] {
                for gran in [Granularity.channel, .group] {
                    let s = QuantScheme(
                        target: target, mapping: mapping, granularity: gran, axis: 0, groupSize: 64, calibration: cal)
                    let fast = try quantize(x, shape: shape, s)
                    let ref = try quantize(x, shape: shape, s, reference: true)
                    // The reference evaluates every candidate; the fast searches are held to its error.
                    if cal.method is MSECalibration {
                        #expect(fast.metrics.mse <= ref.metrics.mse * 1.01 + 1e-12, "\(cal) \(target) \(gran)")
                    } else if let e = cal.method as? EntropyCalibration, !e.exhaustiveSearch {
                        #expect(fast.metrics.mse <= ref.metrics.mse * 1.01 + 1e-12, "\(cal) \(target) \(gran)")
                    } else {
                        #expect(fast.scale == ref.scale, "\(cal) \(target) \(gran)")
                        #expect(fast.zeroPoint == ref.zeroPoint, "\(cal) \(target) \(gran)")
                        #expect(fast.values == ref.values, "\(cal) \(target) \(gran): values differ")
                    }
                }
            }
        }
    }

    /// Entropy's coarse-to-fine search does not always find the KL minimum of a row (the divergence is
    /// rugged on sparse histograms), so it is held to what matters: over a heavy-tailed tensor, the
    /// reconstruction error of the thresholds it picks is within 1 % of the exhaustive search's (it is
    /// lower in practice), per channel and per group, at 8 and 4 bits, and it evaluates far fewer candidates.
    @Test func entropySearchIsBoundedByTheExhaustiveOne() throws {
        var rng = SeededRandom(11)
        let rows = 96
        let cols = 1024
        var x = [Float](repeating: 0, count: rows * cols)
        for r in 0..<rows {
            let spread = 0.01 + 0.09 * rng.uniform()
            for c in 0..<cols {
                let z = rng.normal()
                var chi: Float = 0
                for _ in 0..<3 {
                    let g = rng.normal()
                    chi += g * g
                }
                x[r * cols + c] = z / (chi / 3).squareRoot() * spread
            }
        }
        for (target, gran) in [
            (TargetType.int8, Granularity.channel), (.int8, .group), (.int4, .channel), (.int4, .group)
        ] {
            let fast = QuantScheme(
                target: target, granularity: gran, groupSize: 128, calibration: .entropy(bins: 2048, levels: nil))
            let full = QuantScheme(
                target: target, granularity: gran, groupSize: 128,
                calibration: .entropy(bins: 2048, levels: nil, exhaustive: true))
            let f = try quantize(x, shape: [rows, cols], fast)
            let e = try quantize(x, shape: [rows, cols], full)
            #expect(f.metrics.mse <= e.metrics.mse * 1.01, "\(target) \(gran): \(f.metrics.mse) vs \(e.metrics.mse)")
        }
        // Candidates evaluated for one row: all 1921 exhaustively, a few dozen by the search.
        let row = Array(x[0..<cols])
        let amax = row.map { abs($0) }.max()!
        var dense = [UInt32](repeating: 0, count: 2048)
        var bin = [UInt32](repeating: 0, count: cols)
        var cnt = bin
        let nz = row.withUnsafeBufferPointer {
            qk_sparse_abs_hist($0.baseAddress, Int64(cols), amax, 2048, &dense, &bin, &cnt)
        }
        var prefix = [Int64](repeating: 0, count: Int(nz) + 1)
        var scratch = [Double](repeating: 0, count: Int(qk_calib_scratch_doubles(nz, 2048, 128)))
        var evalsFast: Int64 = 0
        var evalsFull: Int64 = 0
        _ = qk_entropy_candidate(bin, cnt, nz, &prefix, 2048, 128, &scratch, 0, &evalsFast)
        _ = qk_entropy_candidate(bin, cnt, nz, &prefix, 2048, 128, &scratch, 1, &evalsFull)
        #expect(evalsFull == 1921 && evalsFast < 100, "\(evalsFast) \(evalsFull)")
    }

    /// Calibration reads parameters in place when the layout keeps each one contiguous: the ranges must
    /// be exactly those the parameter index of every element gives, and nil whenever they are not contiguous.
    @Test func contiguousBoundsAgreeWithParameterIndices() {
        let cases: [([Int], Granularity, Int)] = [
            ([6, 10], .tensor, 0), ([6, 10], .channel, 0), ([6, 10], .channel, 1), ([6, 10], .group, 0),
            ([6, 10], .group, 1), ([6, 10], .element, 0), ([3, 4, 5], .channel, 0), ([3, 4, 5], .channel, 1),
            ([3, 4, 5], .channel, 2), ([3, 4, 5], .group, 0), ([3, 4, 5], .group, 2), ([7], .channel, 0),
            ([7], .group, 0)
        ]
        for (shape, gran, axis) in cases {
            let layout = ParamLayout(shape: shape, granularity: gran, axis: axis, groupSize: 4)
            let idx = layout.paramIndices().map(Int.init)
            let monotone = zip(idx, idx.dropFirst()).allSatisfy { $0 == $1 || $0 + 1 == $1 } && idx.first == 0
            let bounds = layout.contiguousBounds()
            #expect((bounds != nil) == monotone, "\(shape) \(gran) axis \(axis)")
            if let bounds {
                for k in 0..<layout.paramCount {
                    #expect(
                        idx[bounds[k]..<bounds[k + 1]].allSatisfy { $0 == k } && bounds[k] < bounds[k + 1],
                        "\(shape) \(gran) \(k)")
                }
            }
        }
    }

    @Test func selectionFindsOrderStatistics() {
        var rng = SeededRandom(3)
        for n in [1, 2, 3, 17, 100, 1000, 5001] {
            let x = (0..<n).map { _ in Float(Int(rng.uniform() * 20)) - 10 }  // many ties
            let sorted = x.sorted()
            for k in Set([0, n / 3, n / 2, n - 1]) {
                var a = x
                let v = qk_select_f32(&a, Int64(n), Int64(k))
                #expect(v == sorted[k])
                #expect(a[0..<k].allSatisfy { $0 <= v } && a[k...].allSatisfy { $0 >= v })
                if k + 1 < n { #expect(a[(k + 1)...].min()! == sorted[k + 1]) }
            }
        }
        // Adversarial: already sorted, reversed, all equal.
        for x in [
            (0..<10000).map(Float.init), (0..<10000).reversed().map(Float.init), [Float](repeating: 2, count: 10000)
        ] {
            var a = x
            #expect(qk_select_f32(&a, 10000, 4321) == x.sorted()[4321])
        }
    }
}
