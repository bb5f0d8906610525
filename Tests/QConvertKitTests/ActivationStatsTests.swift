import Foundation
import Testing

@testable import QConvertKit

/// The one-pass histogram of `calibrate`: its range grows by doubling as batches exceed it, and the bins
/// it writes hold exactly what a histogram over its final range, counted directly, holds.
@Suite struct ActivationStatsTests {
    @Test func growingHistogramEqualsTheDirectCountOverItsRange() {
        let bins = 2048
        // the first batch sets the range to 1; later ones reach 3 (two doublings, to 4)
        let hm: Float = 3  // the written range: 12 of 16 fine bins per bin over [0, 4]
        var batches: [[Float]] = []
        var all: [Float] = []
        var state: UInt64 = 7
        func next() -> Int {
            state = state &* 6_364_136_223_846_793_005 &+ 1_442_695_040_888_963_407
            return Int(state >> 33)
        }
        for b in 0..<6 {
            let limit = b == 0 ? 683 : (b < 3 ? 1365 : bins)  // bin centres up to 1, 2, then 3
            var v: [Float] = (0..<500).map { _ in
                let i = next() % limit
                let x = (Float(i) + 0.5) * hm / Float(bins)
                return next() % 2 == 0 ? x : -x
            }
            v += [0, 0, -.greatestFiniteMagnitude, .nan]  // zeros counted apart, masks left out
            if b == 0 { v.append(1) }  // the first range: exactly 1
            if b == 5 { v.append(-3) }  // the final max |x|: exactly 3
            batches.append(v)
            all += v
        }
        var t = ActivationStats.Tensor()
        var g = ActivationStats.GrowingHistogram(bins: bins)
        for v in batches { v.withUnsafeBufferPointer { g.observe(&t, $0) } }
        g.finish(&t)
        #expect(t.histogramMax == hm)
        #expect(t.min == -3 && t.max <= 3)
        #expect(t.zeros == 12)
        #expect(t.excluded == 12)
        var want = [Double](repeating: 0, count: bins)
        for x in all where abs(x) < ActivationStats.notData && x != 0 {
            want[min(Int(abs(x) / hm * Float(bins)), bins - 1)] += 1
        }
        #expect(t.histogram == want)
        #expect(t.count == all.count - 12)
    }

    @Test func theWrittenRangeStaysWithinAFewFineBinsOfTheMax() {
        for amax: Float in [0.3, 1.0001, 1.9, 7.5, 1000] {
            var t = ActivationStats.Tensor()
            var g = ActivationStats.GrowingHistogram(bins: 2048)
            let first: [Float] = [0.25, -0.125]
            let last: [Float] = [amax / 2, -amax]
            first.withUnsafeBufferPointer { g.observe(&t, $0) }
            last.withUnsafeBufferPointer { g.observe(&t, $0) }
            g.finish(&t)
            #expect(t.histogramMax >= amax)
            #expect(t.histogramMax < amax * (1 + 2.0 / 16))
            #expect(t.histogram.reduce(0, +) == 4)
        }
    }
}

extension ActivationStatsTests {
    /// An activation that is zero throughout (a masked branch, a ReLU that never fires) is written with its
    /// full histogram, all empty, so the file reads back (a count without a histogram is refused).
    @Test func anAllZeroTensorIsWrittenSoThatItReadsBack() throws {
        var t = ActivationStats.Tensor()
        var g = ActivationStats.GrowingHistogram(bins: 64)
        let zeros = [Float](repeating: 0, count: 10)
        zeros.withUnsafeBufferPointer { g.observe(&t, $0) }
        g.finish(&t)
        #expect(t.histogram == [Double](repeating: 0, count: 64) && t.zeros == 10 && t.constant)
        let stats = ActivationStats(
            modelPath: "m.onnx", modelSHA256: "", samples: 1, bins: 64, tensors: ["z": t])
        let path = NSTemporaryDirectory() + "/qconvert-zero-stats-\(getpid()).json"
        try stats.json.write(toFile: path, atomically: true, encoding: .utf8)
        defer { unlink(path) }
        let back = try ActivationStats.read(path: path)
        #expect(back.tensors["z"]?.count == 10 && back.tensors["z"]?.histogram.count == 64)
    }
}

extension ActivationStatsTests {
    /// Activations' entropy thresholds come from the C kernel, every candidate evaluated: the same choice
    /// as the reference on histograms shaped like activations' (a bulk and a long sparse tail); a count
    /// the kernel cannot hold sends the tensor to the reference.
    @Test func activationEntropyByTheKernelChoosesTheReferencesCandidate() {
        var state: UInt64 = 11
        func next() -> Double {
            state = state &* 6_364_136_223_846_793_005 &+ 1_442_695_040_888_963_407
            return Double(state >> 11) / Double(1 << 53)
        }
        for trial in 0..<12 {
            var hist = [Double](repeating: 0, count: 2048)
            let width = 60 + trial * 40
            for k in 0..<2048 {
                let bulk = k < width ? 5000 * exp(-Double(k) / Double(width / 3)) : 0
                let tail = next() < 0.03 ? Double(1 + Int(next() * 4)) : 0
                hist[k] = (bulk + tail).rounded()
            }
            let reference = Calibrator.entropyCandidate(hist: hist, levels: 128)
            #expect(CalibrationScratch.entropyCandidate(histogram: hist, levels: 128) == reference)
        }
        var huge = [Double](repeating: 1, count: 256)
        huge[3] = 5e9
        #expect(CalibrationScratch.entropyCandidate(histogram: huge, levels: 128) == nil)
    }
}
