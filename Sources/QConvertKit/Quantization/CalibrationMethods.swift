import CQKernels
import Foundation

/// One way of choosing the range [β, α] of a group of values (QUANTIZATION.md section 5).
///
/// Adding a method is one type conforming to this protocol and one line in `Calibration.registry`:
/// the policy key `calibration: NAME` accepts it, the planner builds it from the policy's settings,
/// the metadata records its parameters, `plan` estimates its cost, and the quantizer calls its two
/// implementations (the reference, and the fast one the tests hold to it).
public protocol RangeCalibration: Sendable, Hashable {
    /// The name policies and the metadata use.
    static var name: String { get }
    /// The method with its parameters from a policy's settings (`percentile`, `bins`, `levels`, `search`).
    init(settings s: PolicySettings)
    /// The straightforward implementation: the fast one's reference. `lo`, `hi`: the group's min and max;
    /// `levels`: half the integer range (or 128 for fp8); `qmaxSymmetric`: the symmetric mapping's qmax.
    func referenceRange(
        _ values: UnsafeBufferPointer<Float>, lo: Float, hi: Float, mapping: Mapping, levels: Int, qmaxSymmetric: Int
    ) -> (beta: Float, alpha: Float)
    /// The fast implementation, with buffers allocated once per tensor and thread.
    func range(
        _ values: UnsafeBufferPointer<Float>, lo: Float, hi: Float, mapping: Mapping, levels: Int, qmaxSymmetric: Int,
        scratch: CalibrationScratch
    ) -> (beta: Float, alpha: Float)
    /// Histogram bins the fast path needs (0 for none), and whether it needs a float copy of a group.
    var scratchBins: Int { get }
    var needsFloatCopy: Bool { get }
    /// Estimated microseconds to calibrate one group of `n` values (`levels` as above), on the
    /// benchmark machine (Benchmarks/calibration.py), within a factor of about 2.
    func costMicros(groupLength n: Double, levels: Double) -> Double
    /// The method evaluating every candidate, used when few groups make that cheap.
    var exhaustive: Self { get }
    /// Records the parameters in the metadata.
    func record(into r: inout CalibrationRecord, target: TargetType)
    /// Notes on the parameters for a target, shown by `plan`.
    func warnings(target: TargetType) -> [String]
}

extension RangeCalibration {
    public var scratchBins: Int { 0 }
    public var needsFloatCopy: Bool { false }
    public var exhaustive: Self { self }
    public func record(into r: inout CalibrationRecord, target: TargetType) {}
    public func warnings(target: TargetType) -> [String] { [] }

    /// Without a faster way, the reference is the fast path too.
    public func range(
        _ values: UnsafeBufferPointer<Float>, lo: Float, hi: Float, mapping: Mapping, levels: Int, qmaxSymmetric: Int,
        scratch: CalibrationScratch
    ) -> (beta: Float, alpha: Float) {
        referenceRange(values, lo: lo, hi: hi, mapping: mapping, levels: levels, qmaxSymmetric: qmaxSymmetric)
    }
}

/// A method that picks a threshold among the bins of a histogram of |x| over [0, amax] (entropy, mse):
/// the range follows from the chosen bin, in the reference and the fast path alike.
public protocol HistogramThresholdCalibration: RangeCalibration {
    var bins: Int { get }
    /// The chosen bin, from the dense histogram (the reference).
    func candidate(_ hist: [Double], levels: Int, qmaxSymmetric: Int) -> Int
    /// The chosen bin, by the C kernels with `scratch`'s buffers.
    func candidate(
        _ values: UnsafeBufferPointer<Float>, amax: Float, levels: Int, qmaxSymmetric: Int, scratch: CalibrationScratch
    ) -> Int
}

extension HistogramThresholdCalibration {
    public var scratchBins: Int { bins }

    public func referenceRange(
        _ values: UnsafeBufferPointer<Float>, lo: Float, hi: Float, mapping: Mapping, levels: Int, qmaxSymmetric: Int
    ) -> (beta: Float, alpha: Float) {
        let amax = Swift.max(abs(lo), abs(hi))
        let i = candidate(
            Calibrator.absHistogram(values, amax: amax, bins: bins), levels: levels, qmaxSymmetric: qmaxSymmetric)
        return Calibrator.threshold(i, bins: bins, amax: amax, lo: lo, hi: hi, mapping: mapping)
    }

    public func range(
        _ values: UnsafeBufferPointer<Float>, lo: Float, hi: Float, mapping: Mapping, levels: Int, qmaxSymmetric: Int,
        scratch: CalibrationScratch
    ) -> (beta: Float, alpha: Float) {
        let amax = Swift.max(abs(lo), abs(hi))
        let i = candidate(values, amax: amax, levels: levels, qmaxSymmetric: qmaxSymmetric, scratch: scratch)
        return Calibrator.threshold(i, bins: bins, amax: amax, lo: lo, hi: hi, mapping: mapping)
    }
}

/// How a scheme's range is calibrated: one registered method with its parameters.
public struct Calibration: Sendable, Hashable, CustomStringConvertible {
    /// Every method, by name: the one list to extend.
    public static let registry: [any RangeCalibration.Type] = [
        MaxCalibration.self, PercentileCalibration.self, EntropyCalibration.self, MSECalibration.self
    ]

    public let method: any RangeCalibration

    public init(_ method: any RangeCalibration) { self.method = method }

    /// The method a policy names, with its parameters; nil for a name no method has.
    public init?(name: String, settings: PolicySettings) {
        guard let type = Self.registry.first(where: { $0.name == name }) else { return nil }
        method = type.init(settings: settings)
    }

    public var name: String { type(of: method).name }
    public var isMax: Bool { method is MaxCalibration }
    public var description: String { "\(method)" }

    public static func == (a: Calibration, b: Calibration) -> Bool { AnyHashable(a.method) == AnyHashable(b.method) }
    public func hash(into h: inout Hasher) { h.combine(AnyHashable(method)) }

    public static let max = Calibration(MaxCalibration())
    public static func percentile(_ p: Double) -> Calibration { Calibration(PercentileCalibration(percentile: p)) }
    public static func entropy(bins: Int, levels: Int?, exhaustive: Bool = false) -> Calibration {
        Calibration(EntropyCalibration(bins: bins, levels: levels, exhaustive: exhaustive))
    }
    public static func mse(bins: Int, exhaustive: Bool = false) -> Calibration {
        Calibration(MSECalibration(bins: bins, exhaustive: exhaustive))
    }
}

/// The observed extremes: [−amax, amax] (scale) or [min, max] (affine).
public struct MaxCalibration: RangeCalibration {
    public static let name = "max"
    public init() {}
    public init(settings s: PolicySettings) {}

    public func referenceRange(
        _ values: UnsafeBufferPointer<Float>, lo: Float, hi: Float, mapping: Mapping, levels: Int, qmaxSymmetric: Int
    ) -> (beta: Float, alpha: Float) {
        let amax = Swift.max(abs(lo), abs(hi))
        return mapping == .scale ? (-amax, amax) : (lo, hi)
    }

    public func costMicros(groupLength n: Double, levels: Double) -> Double { 0 }
}

/// numpy's linear percentile of |x| (scale), or the central `percentile` % of the values (affine).
public struct PercentileCalibration: RangeCalibration {
    public static let name = "percentile"
    public var percentile: Double
    public init(percentile: Double) { self.percentile = percentile }
    public init(settings s: PolicySettings) { percentile = s.percentile ?? 99.99 }

    public func referenceRange(
        _ values: UnsafeBufferPointer<Float>, lo: Float, hi: Float, mapping: Mapping, levels: Int, qmaxSymmetric: Int
    ) -> (beta: Float, alpha: Float) {
        let p = percentile
        if mapping == .scale {
            let mags = values.map { abs($0) }.sorted()
            let a = mags.withUnsafeBufferPointer { Calibrator.percentileSorted($0, p) }
            return (-Float(a), Float(a))
        }
        let s = values.sorted()
        return s.withUnsafeBufferPointer {
            (
                Float(Calibrator.percentileSorted($0, (100 - p) / 2)),
                Float(Calibrator.percentileSorted($0, 100 - (100 - p) / 2))
            )
        }
    }

    /// The two order statistics numpy's linear method needs, found by selection (O(n)): exactly the reference.
    public func range(
        _ values: UnsafeBufferPointer<Float>, lo: Float, hi: Float, mapping: Mapping, levels: Int, qmaxSymmetric: Int,
        scratch: CalibrationScratch
    ) -> (beta: Float, alpha: Float) {
        let p = percentile
        return scratch.floats.withUnsafeMutableBufferPointer { buf in
            let a = buf.baseAddress!
            let n = values.count
            if mapping == .scale {
                qk_abs_copy_f32(values.baseAddress, Int64(n), a)
                let v = CalibrationScratch.percentile(a, n, p)
                return (-Float(v), Float(v))
            }
            _ = buf.initialize(from: values)
            return (
                Float(CalibrationScratch.percentile(a, n, (100 - p) / 2)),
                Float(CalibrationScratch.percentile(a, n, 100 - (100 - p) / 2))
            )
        }
    }

    public var needsFloatCopy: Bool { true }
    public func costMicros(groupLength n: Double, levels: Double) -> Double { 0.008 * n }
    public func record(into r: inout CalibrationRecord, target: TargetType) { r.percentile = percentile }
}

/// TensorRT's entropy calibration: the threshold whose clipped histogram of |x| loses the least
/// information (KL divergence) merged into `levels` levels.
public struct EntropyCalibration: HistogramThresholdCalibration {
    public static let name = "entropy"
    public var bins: Int
    /// nil: the target's (half its integer range, 128 for fp8).
    public var levels: Int?
    /// Every candidate threshold instead of a coarse-to-fine search.
    public var exhaustiveSearch: Bool

    public init(bins: Int, levels: Int?, exhaustive: Bool) {
        self.bins = bins
        self.levels = levels
        exhaustiveSearch = exhaustive
    }
    public init(settings s: PolicySettings) {
        self.init(bins: s.bins ?? 2048, levels: s.levels, exhaustive: s.search == .exhaustive)
    }

    public func candidate(_ hist: [Double], levels: Int, qmaxSymmetric: Int) -> Int {
        Calibrator.entropyCandidate(hist: hist, levels: self.levels ?? levels)
    }

    public func candidate(
        _ values: UnsafeBufferPointer<Float>, amax: Float, levels: Int, qmaxSymmetric: Int, scratch: CalibrationScratch
    ) -> Int {
        scratch.entropyCandidate(values, amax: amax, levels: self.levels ?? levels, exhaustive: exhaustiveSearch)
    }
    public var exhaustive: EntropyCalibration { EntropyCalibration(bins: bins, levels: levels, exhaustive: true) }

    public func costMicros(groupLength n: Double, levels: Double) -> Double {
        let b = Double(bins)
        let l = Double(self.levels ?? Int(levels))
        let candidates = Swift.max(b - l + 1, 1)
        let evaluations = exhaustiveSearch ? candidates : Swift.min(candidates, 50)
        return 0.005 * n + evaluations * (0.1 + 0.002 * Swift.min(n, l, b) + 0.0003 * Swift.min(n, b))
    }

    public func record(into r: inout CalibrationRecord, target: TargetType) {
        r.bins = bins
        r.search = exhaustiveSearch ? "exhaustive" : "fast"
        r.levels = levels ?? target.calibrationLevels
    }

    public func warnings(target: TargetType) -> [String] {
        let l = levels ?? target.calibrationLevels
        return bins <= l ? ["entropy with bins \(bins) ≤ levels \(l) has one candidate: it equals max"] : []
    }
}

/// The threshold minimising the expected squared error of quantizing the histogram of |x|.
public struct MSECalibration: HistogramThresholdCalibration {
    public static let name = "mse"
    public var bins: Int
    public var exhaustiveSearch: Bool

    public init(bins: Int, exhaustive: Bool) {
        self.bins = bins
        exhaustiveSearch = exhaustive
    }
    public init(settings s: PolicySettings) { self.init(bins: s.bins ?? 2048, exhaustive: s.search == .exhaustive) }

    public func candidate(_ hist: [Double], levels: Int, qmaxSymmetric: Int) -> Int {
        Calibrator.mseCandidate(hist: hist, levels: levels, qmax: qmaxSymmetric)
    }

    public func candidate(
        _ values: UnsafeBufferPointer<Float>, amax: Float, levels: Int, qmaxSymmetric: Int, scratch: CalibrationScratch
    ) -> Int {
        scratch.mseCandidate(
            values, amax: amax, levels: levels, qmaxSymmetric: qmaxSymmetric, exhaustive: exhaustiveSearch)
    }
    public var exhaustive: MSECalibration { MSECalibration(bins: bins, exhaustive: true) }

    public func costMicros(groupLength n: Double, levels: Double) -> Double {
        let b = Double(bins)
        let candidates = Swift.max(b - levels + 1, 1)
        let evaluations = exhaustiveSearch ? candidates : Swift.min(candidates, 70)
        return 0.005 * n + evaluations * (0.05 + 0.0003 * Swift.min(n, b))
    }

    public func record(into r: inout CalibrationRecord, target: TargetType) {
        r.bins = bins
        r.search = exhaustiveSearch ? "exhaustive" : "fast"
    }
}

extension TargetType {
    /// Half the integer range (the levels entropy merges into), 128 for fp8.
    public var calibrationLevels: Int { isFP8 ? 128 : 1 << (bits - 1) }
}
