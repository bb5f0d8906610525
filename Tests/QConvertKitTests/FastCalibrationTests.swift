import Foundation
import Testing
@testable import QConvertKit
import CQKernels

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
            for _ in 0..<3 { let g = rng.normal(); c += g * g }
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
        .entropy(bins: 2048, levels: nil), .entropy(bins: 512, levels: 8), .entropy(bins: 64, levels: 128),
    ]

    func ranges(_ x: [Float], _ cal: Calibration, _ mapping: Mapping, levels: Int, qmax: Int)
        -> (fast: (beta: Float, alpha: Float), ref: (beta: Float, alpha: Float)) {
        x.withUnsafeBufferPointer { v in
            let lo = x.min()!, hi = x.max()!
            let scratch = CalibrationScratch(capacity: x.count, calibration: cal)
            let f = scratch.range(v, lo: lo, hi: hi, calibration: cal, mapping: mapping, levels: levels, qmaxSymmetric: qmax)
            let r = Calibrator.referenceRange(v, lo: lo, hi: hi, calibration: cal, mapping: mapping, levels: levels,
                                              qmaxSymmetric: qmax)
            return (f, r)
        }
    }

    @Test func percentileAndEntropyRangesAreTheReferences() {
        for (name, x) in Self.rows() {
            for cal in Self.calibrations {
                for mapping in [Mapping.scale, .affine] {
                    for (levels, qmax) in [(128, 127), (8, 7)] {
                        let (f, r) = ranges(x, cal, mapping, levels: levels, qmax: qmax)
                        #expect(f.beta == r.beta && f.alpha == r.alpha, "\(name) \(cal) \(mapping) levels \(levels): \(f) vs \(r)")
                    }
                }
            }
        }
    }

    /// The same histogram the Swift reference builds, as the sparse arrays the kernels take.
    func sparseHistogram(_ x: [Float], bins: Int) -> (bin: [UInt32], cnt: [UInt32]) {
        let amax = x.map { abs($0) }.max() ?? 0
        let hist = x.withUnsafeBufferPointer { Calibrator.absHistogram($0, amax: amax, bins: bins) }
        var bin: [UInt32] = [], cnt: [UInt32] = []
        for (k, h) in hist.enumerated() where h > 0 { bin.append(UInt32(k)); cnt.append(UInt32(h)) }
        // The kernel's own histogram is the same.
        var dense = [UInt32](repeating: 0, count: bins)
        var b2 = [UInt32](repeating: 0, count: max(x.count, 1)), c2 = b2
        let nz = x.withUnsafeBufferPointer { qk_sparse_abs_hist($0.baseAddress, Int64(x.count), amax, Int64(bins), &dense, &b2, &c2) }
        #expect(Array(b2.prefix(Int(nz))) == bin && Array(c2.prefix(Int(nz))) == cnt)
        #expect(dense.allSatisfy { $0 == 0 })
        return (bin, cnt)
    }

    func mseObjective(_ h: (bin: [UInt32], cnt: [UInt32]), bins: Int, levels: Int, qmax: Int, _ i: Int) -> Double {
        var prefix = [Int64](repeating: 0, count: h.bin.count + 1)
        return qk_mse_objective(h.bin, h.cnt, Int64(h.bin.count), &prefix, Int64(bins), Int64(levels), Int64(qmax), Int64(i))
    }

    func mseCandidate(_ h: (bin: [UInt32], cnt: [UInt32]), bins: Int, levels: Int, qmax: Int, exhaustive: Bool) -> (Int, Int) {
        var prefix = [Int64](repeating: 0, count: h.bin.count + 1)
        var evaluations: Int64 = 0
        let i = qk_mse_candidate(h.bin, h.cnt, Int64(h.bin.count), &prefix, Int64(bins), Int64(levels), Int64(qmax),
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
                let hist = x.withUnsafeBufferPointer { Calibrator.absHistogram($0, amax: x.map { abs($0) }.max()!, bins: bins) }
                let ref = Calibrator.mseCandidate(hist: hist, levels: levels, qmax: qmax)
                let (exhaustive, _) = mseCandidate(h, bins: bins, levels: levels, qmax: qmax, exhaustive: true)
                let (fast, evaluations) = mseCandidate(h, bins: bins, levels: levels, qmax: qmax, exhaustive: false)
                let eRef = mseObjective(h, bins: bins, levels: levels, qmax: qmax, ref)
                let eEx = mseObjective(h, bins: bins, levels: levels, qmax: qmax, exhaustive)
                let eFast = mseObjective(h, bins: bins, levels: levels, qmax: qmax, fast)
                #expect(abs(eEx - eRef) <= 1e-9 * max(eRef, 1e-300), "\(name) bins \(bins): exhaustive \(exhaustive) \(eEx) vs reference \(ref) \(eRef)")
                #expect(eFast <= eEx * 1.01 + 1e-12, "\(name) bins \(bins) levels \(levels): \(fast) \(eFast) vs \(exhaustive) \(eEx)")
                if bins - levels > 200 { #expect(evaluations < (bins - levels) / 8, "\(name): \(evaluations) evaluations") }
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
        x[17] = 4; x[3000] = -6
        for k in 1000..<1200 { x[k] = 0.5 }   // a constant row
        for k in 2000..<2200 { x[k] = 0 }     // an all-zero row
        for cal in [Calibration.percentile(99.5), .entropy(bins: 2048, levels: nil), .mse(bins: 2048)] {
            for (target, mapping) in [(TargetType.int8, Mapping.scale), (.uint8, .affine), (.int4, .scale)] {
                for gran in [Granularity.channel, .group] {
                    let s = QuantScheme(target: target, mapping: mapping, granularity: gran, axis: 0, groupSize: 64, calibration: cal)
                    let fast = try quantize(x, shape: shape, s)
                    let ref = try quantize(x, shape: shape, s, reference: true)
                    if case .mse = cal {
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

    @Test func selectionFindsOrderStatistics() {
        var rng = SeededRandom(3)
        for n in [1, 2, 3, 17, 100, 1000, 5001] {
            let x = (0..<n).map { _ in Float(Int(rng.uniform() * 20)) - 10 }   // many ties
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
        for x in [(0..<10000).map(Float.init), (0..<10000).reversed().map(Float.init), [Float](repeating: 2, count: 10000)] {
            var a = x
            #expect(qk_select_f32(&a, 10000, 4321) == x.sorted()[4321])
        }
    }
}
