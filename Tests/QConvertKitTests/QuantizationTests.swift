import CQKernels
import Foundation
import Testing

@testable import QConvertKit

/// A small deterministic generator (SplitMix64) so failures reproduce.
struct SeededRandom {
    var state: UInt64
    init(_ seed: UInt64) { state = seed }
    mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
    mutating func uniform() -> Float { Float(next() >> 40) / Float(1 << 24) }
    mutating func normal() -> Float {
        let u1 = max(Double(next() >> 11) / Double(1 << 53), 1e-300)
        let u2 = Double(next() >> 11) / Double(1 << 53)
        return Float((-2 * log(u1)).squareRoot() * cos(2 * Double.pi * u2))
    }
}

func quantize(_ x: [Float], shape: [Int], _ scheme: QuantScheme, reference: Bool = false) throws -> QuantizedTensor {
    try x.withUnsafeBufferPointer {
        try Quantizer.quantize(
            name: "t", values: $0, shape: shape, scheme: scheme, bytesBefore: x.count * 4, reference: reference)
    }
}

@Suite struct GoldenExample {
    /// QUANTIZATION.md section 2.3: the explainer's example, corrected.
    @Test func workedExampleSymmetricInt8() throws {
        let x: [Float] = [-2.3, -1.1, 0.0, 1.5, 2.8, 4.0]
        let q = try quantize(x, shape: [6], QuantScheme(target: .int8, granularity: .tensor))
        #expect(q.values.map { Int8(bitPattern: $0) } == [-73, -35, 0, 48, 89, 127])
        #expect(q.scale == [Float(4) / 127])
        #expect(q.zeroPoint == nil)
        let back = Quantizer.dequantize(
            values: q.values, target: .int8, shape: [6], scale: q.scale, zeroPoint: nil,
            granularity: .tensor, axis: 0, groupSize: 1)
        let expected: [Double] = [-2.29921, -1.10236, 0, 1.51181, 2.80315, 4.0]
        for (a, b) in zip(back, expected) { #expect(abs(Double(a) - b) < 1e-5) }
    }

    /// symmetric_range: full: the largest magnitude lands on −8 (the scale is negative when it is positive),
    /// as Q4_0 and onnxruntime's block quantizer do; reference and fast kernels agree.
    @Test func fullSymmetricRangePutsTheExtremeOnQmin() throws {
        var scheme = QuantScheme(target: .int4, granularity: .tensor)
        scheme.fullSymmetricRange = true
        #expect(scheme.integerRange == (-8, 7))
        for reference in [true, false] {
            let pos = try quantize([1, -0.5, 0.25, 0.9375], shape: [4], scheme, reference: reference)
            #expect(pos.scale == [-0.125])
            #expect(Packing.unpack4(pos.values, shape: [4]).map { Int8(bitPattern: $0 << 4) >> 4 } == [-8, 4, -2, -8])
            let neg = try quantize([-1, 0.5, 0.875, 0], shape: [4], scheme, reference: reference)
            #expect(neg.scale == [0.125])
            #expect(Packing.unpack4(neg.values, shape: [4]).map { Int8(bitPattern: $0 << 4) >> 4 } == [-8, 4, 7, 0])
            let back = Quantizer.dequantize(
                values: neg.values, target: .int4, shape: [4], scale: neg.scale, zeroPoint: nil,
                granularity: .tensor, axis: 0, groupSize: 1)
            #expect(back == [-1, 0.5, 0.875, 0])
        }
    }

    @Test func affineZeroPointMatchesFormula() throws {
        // [-1, 3] widened already contains 0: Δ = 4/255, z = -128 - round(-1/Δ) = -128 + 64 = -64
        let x: [Float] = [-1, 0, 1, 3]
        let q = try quantize(x, shape: [4], QuantScheme(target: .int8, mapping: .affine, granularity: .tensor))
        let s = Float(4) / 255
        #expect(q.scale == [s])
        #expect(q.zeroPoint.map { $0.map { Int8(bitPattern: $0) } } == [-64])
        #expect(Int8(bitPattern: q.values[1]) == -64)  // real 0 is exact
        #expect(Int8(bitPattern: q.values[3]) == 127)
    }

    @Test func tiesRoundHalfToEven() throws {
        // Δ = 1 exactly (α = 127): x / Δ lands on .5 ties
        let x: [Float] = [127, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 3.5]
        let q = try quantize(x, shape: [8], QuantScheme(target: .int8, granularity: .tensor))
        #expect(q.values.map { Int8(bitPattern: $0) } == [127, 0, 2, 2, 0, -2, -2, 4])
    }

    @Test func zeroTensorGetsUnitScale() throws {
        let q = try quantize(
            [Float](repeating: 0, count: 10), shape: [10], QuantScheme(target: .int8, granularity: .tensor))
        #expect(q.scale == [1])
        #expect(q.values.allSatisfy { $0 == 0 })
        let a = try quantize(
            [Float](repeating: 0, count: 10), shape: [10],
            QuantScheme(target: .uint8, mapping: .affine, granularity: .tensor))
        #expect(a.scale == [1])
    }

    @Test func constantTensorDequantizesWithinHalfStep() throws {
        for c: Float in [0.3, -7.25, 1e-3] {
            for scheme in [
                QuantScheme(target: .int8, granularity: .tensor),
                QuantScheme(target: .uint8, mapping: .affine, granularity: .tensor),
                QuantScheme(target: .int4, granularity: .tensor),
                QuantScheme(target: .uint4, mapping: .affine, granularity: .tensor)
            ] {
                let x = [Float](repeating: c, count: 7)
                let q = try quantize(x, shape: [7], scheme)
                let back = Quantizer.dequantize(
                    values: q.values, target: scheme.target, shape: [7], scale: q.scale,
                    zeroPoint: q.zeroPoint, granularity: .tensor, axis: 0, groupSize: 1)
                for v in back { #expect(abs(v - c) <= q.scale![0] / 2 * 1.0001, "\(scheme.target) \(c) -> \(v)") }
            }
        }
    }

    @Test func nanIsAnErrorNamingTheTensor() {
        #expect(throws: QConvertError.self) {
            _ = try [Float(1), .nan].withUnsafeBufferPointer {
                try Quantizer.quantize(
                    name: "blk.0.w", values: $0, shape: [2], scheme: QuantScheme(target: .int8), bytesBefore: 8)
            }
        }
        do {
            _ = try quantize([1, .infinity], shape: [2], QuantScheme(target: .int8))
        } catch let e as QConvertError {
            #expect(e.description.contains("'t'"))
            #expect(e.description.contains("NaN or infinity"))
        } catch { Issue.record("unexpected error \(error)") }
    }
}

@Suite struct Properties {
    static let schemes: [QuantScheme] = [
        QuantScheme(target: .int8, granularity: .tensor),
        QuantScheme(target: .int8, granularity: .channel, axis: 0),
        QuantScheme(target: .int8, granularity: .channel, axis: 1),
        QuantScheme(target: .uint8, mapping: .affine, granularity: .channel, axis: 0),
        QuantScheme(target: .int8, mapping: .affine, granularity: .group, axis: 0, groupSize: 8),
        QuantScheme(target: .int4, granularity: .group, axis: 0, groupSize: 16),
        QuantScheme(target: .uint4, mapping: .affine, granularity: .group, axis: 1, groupSize: 5),
        QuantScheme(target: .uint8, granularity: .channel, axis: 0),
        QuantScheme(target: .int8, granularity: .element)
    ]

    /// For values inside the calibrated range, |x − x̂| ≤ Δ/2.
    @Test(arguments: schemes)
    func errorAtMostHalfStep(_ scheme: QuantScheme) throws {
        var rng = SeededRandom(42)
        let shape = [13, 37]
        let x = (0..<(13 * 37)).map { _ in rng.normal() * 3 }
        let q = try quantize(x, shape: shape, scheme)
        let back = Quantizer.dequantize(
            values: q.values, target: scheme.target, shape: shape, scale: q.scale, zeroPoint: q.zeroPoint,
            granularity: scheme.granularity, axis: scheme.axis, groupSize: scheme.groupSize)
        let layout = ParamLayout(
            shape: shape, granularity: scheme.granularity, axis: scheme.axis, groupSize: scheme.groupSize)
        let idx = layout.paramIndices()
        for i in 0..<x.count {
            let s = q.scale![Int(idx[i])]
            // Half a step, plus float32 rounding of x/Δ and of (q − z)·Δ.
            #expect(
                abs(x[i] - back[i]) <= s / 2 * 1.0001 + abs(x[i]) * 1e-6, "element \(i): \(x[i]) → \(back[i]), Δ \(s)")
        }
        #expect(q.metrics.clippedFraction == 0)
        #expect(Double(q.metrics.maxAbsError) <= Double(q.scale!.max()!) / 2 * 1.001)
    }

    @Test func metricsAreConsistent() throws {
        var rng = SeededRandom(7)
        let x = (0..<4096).map { _ in rng.normal() }
        let q = try quantize(x, shape: [64, 64], QuantScheme(target: .int8))
        let back = Quantizer.dequantize(
            values: q.values, target: .int8, shape: [64, 64], scale: q.scale, zeroPoint: nil,
            granularity: .channel, axis: 0, groupSize: 1)
        var e2 = 0.0
        var x2 = 0.0
        var xq = 0.0
        var q2 = 0.0
        var me = 0.0
        for (a, b) in zip(x, back) {
            let d = Double(a) - Double(b)
            e2 += d * d
            x2 += Double(a) * Double(a)
            xq += Double(a) * Double(b)
            q2 += Double(b) * Double(b)
            me = max(me, abs(d))
        }
        #expect(abs(q.metrics.sqnrDB! - 10 * log10(x2 / e2)) < 0.01)
        #expect(abs(q.metrics.cosine - xq / (x2.squareRoot() * q2.squareRoot())) < 1e-6)
        #expect(abs(q.metrics.maxAbsError - me) < 1e-7)
        #expect(q.metrics.bitsPerWeight == Double((4096 + 64 * 4) * 8) / 4096)
    }
}

@Suite struct FastKernelsMatchReference {
    /// Data with exact .5 ties, ±0, subnormals, huge values and outliers.
    static func nastyData(_ n: Int, seed: UInt64) -> [Float] {
        var rng = SeededRandom(seed)
        return (0..<n).map { i in
            switch i % 11 {
            case 0: return Float(Int(rng.next() % 255) - 127) + 0.5  // ties after Δ = 1 scaling
            case 1: return -0.0
            case 2: return Float.leastNonzeroMagnitude * Float(rng.next() % 100)
            case 3: return (rng.next() % 2 == 0 ? 1 : -1) * 3e7
            case 4: return 0.0
            default: return rng.normal() * 50
            }
        }
    }

    @Test(arguments: [1, 7, 15, 16, 17, 31, 33, 255, 1001, 4099])
    func lengths(_ n: Int) throws {
        let x = FastKernelsMatchReference.nastyData(n, seed: UInt64(n))
        for scheme in Properties.schemes + [
            QuantScheme(target: .int8, granularity: .tensor, calibration: .percentile(99))
        ] {
            let shape = n % 3 == 0 && n > 3 ? [3, n / 3] : [1, n]
            var s = scheme
            s.axis = min(s.axis, shape.count - 1)
            let fast = try quantize(x, shape: shape, s)
            let ref = try quantize(x, shape: shape, s, reference: true)
            #expect(fast.values == ref.values, "\(s.target) \(s.granularity) n=\(n)")
            #expect(fast.scale == ref.scale)
            #expect(fast.zeroPoint == ref.zeroPoint)
            #expect(abs(fast.metrics.mse - ref.metrics.mse) <= 1e-5 * max(ref.metrics.mse, 1e-30))
            #expect(fast.metrics.clippedFraction == ref.metrics.clippedFraction)
        }
    }

    @Test func exactTiesWithUnitScale() throws {
        // α = 127 makes Δ exactly 1, so every .5 input is a tie that must round to even.
        var x: [Float] = [127]
        for k in -126..<126 { x.append(Float(k) + 0.5) }
        let fast = try quantize(x, shape: [x.count], QuantScheme(target: .int8, granularity: .tensor))
        let ref = try quantize(x, shape: [x.count], QuantScheme(target: .int8, granularity: .tensor), reference: true)
        #expect(fast.values == ref.values)
        for (i, v) in x.enumerated() where i > 0 {
            #expect(Float(Int8(bitPattern: fast.values[i])) == v.rounded(.toNearestOrEven))
        }
    }

    @Test func halfAndBFloatConversionsMatchSwift() {
        var x = FastKernelsMatchReference.nastyData(5000, seed: 3)
        x += [
            65504, 65519.99, -65504, 6.1e-5, 5.96e-8, 2.98e-8, 2.9802322e-08, 1e-9,
            Float.greatestFiniteMagnitude / 4e34, 0.1, 1.0 / 3
        ]
        var halves = [UInt16](repeating: 0, count: x.count)
        let overflow = qk_f32_to_f16(x, Int64(x.count), &halves, 0)
        #expect(halves == ReferenceKernels.f32ToF16(x))
        #expect(overflow == x.filter { $0.isFinite && abs($0) >= 65520 }.count)
        #expect(overflow > 0)
        var back = [Float](repeating: 0, count: x.count)
        halves.withUnsafeBytes { qk_f16_to_f32($0.baseAddress, Int64(x.count), &back) }
        #expect(back.map(\.bitPattern) == ReferenceKernels.f16ToF32(halves).map(\.bitPattern))
        var bf = [UInt16](repeating: 0, count: x.count)
        qk_f32_to_bf16(x, Int64(x.count), &bf)
        #expect(bf == ReferenceKernels.f32ToBF16(x))
        // every half bit pattern decodes as Swift's Float16 does
        let all = (0...0xFFFF).map { UInt16($0) }
        var f = [Float](repeating: 0, count: all.count)
        all.withUnsafeBytes { qk_f16_to_f32($0.baseAddress, Int64(all.count), &f) }
        let swiftF = ReferenceKernels.f16ToF32(all)
        #expect(zip(f, swiftF).allSatisfy { $0.bitPattern == $1.bitPattern || ($0.isNaN && $1.isNaN) })
    }

    @Test func halfOverflowIsReported() {
        let x: [Float] = [70000, 1, -1e6]
        var h = [UInt16](repeating: 0, count: 3)
        #expect(qk_f32_to_f16(x, 3, &h, 0) == 2)
        #expect(qk_f32_to_f16(x, 3, &h, 1) == 2)
        #expect(h[0] == 0x7BFF && h[2] == 0xFBFF)
    }
}

@Suite struct Calibrations {
    @Test func percentileMatchesNumpyLinear() {
        // numpy: np.percentile(np.arange(1, 11, dtype=np.float32), [0, 25, 50, 99, 100]) = [1, 3.25, 5.5, 9.91, 10]
        let x = (1...10).map(Float.init)
        #expect(Calibrator.percentile(x, 0) == 1)
        #expect(Calibrator.percentile(x, 25) == 3.25)
        #expect(Calibrator.percentile(x, 50) == 5.5)
        #expect(abs(Calibrator.percentile(x, 99) - 9.91) < 1e-12)
        #expect(Calibrator.percentile(x, 100) == 10)
    }

    @Test func percentileClipsOutliers() throws {
        var x = [Float](repeating: 0, count: 1000)
        for i in 0..<1000 { x[i] = Float(i % 100) / 100 }
        x[999] = 1000
        let q = try quantize(
            x, shape: [1000], QuantScheme(target: .int8, granularity: .tensor, calibration: .percentile(99)))
        #expect(q.scale![0] < 1.0 / 127 * 1.01)
        #expect(q.metrics.clippedFraction > 0)
    }

    @Test func entropyWithOneCandidateEqualsMaxAndWarns() throws {
        var rng = SeededRandom(5)
        let x = (0..<2000).map { _ in rng.normal() }
        let e = try quantize(
            x, shape: [2000],
            QuantScheme(target: .int8, granularity: .tensor, calibration: .entropy(bins: 128, levels: 128)))
        let m = try quantize(x, shape: [2000], QuantScheme(target: .int8, granularity: .tensor))
        #expect(e.scale == m.scale)
        #expect(e.warnings.contains { $0.contains("one candidate") })
    }

    @Test func entropyAndMseClipHeavyTails() throws {
        var rng = SeededRandom(9)
        var x = (0..<20000).map { _ in rng.normal() }
        x[0] = 60
        let e = try quantize(
            x, shape: [20000],
            QuantScheme(target: .int8, granularity: .tensor, calibration: .entropy(bins: 2048, levels: nil)))
        #expect(e.scale![0] * 127 < 30)
        #expect(e.scale![0] * 127 > 2)
        // mse minimises the squared error: never worse than max on data of many outliers
        var y = (0..<20000).map { _ in rng.normal() }
        for i in stride(from: 0, to: 20000, by: 500) { y[i] = 25 }
        let m = try quantize(
            y, shape: [20000], QuantScheme(target: .int8, granularity: .tensor, calibration: .mse(bins: 2048)))
        let mx = try quantize(y, shape: [20000], QuantScheme(target: .int8, granularity: .tensor))
        #expect(m.metrics.mse <= mx.metrics.mse)
        #expect(m.scale![0] <= mx.scale![0])
    }
}

@Suite struct PackingAndFP8 {
    @Test func packingMatchesOnnxLayout() {
        // int4 [-1, 2, 7] packs to 2f 07 (element 0 in the low nibble, odd count pads with 0)
        let q: [UInt8] = [0xFF, 0x02, 0x07].map { $0 & 0x0F }
        #expect(Packing.pack4(q, shape: [3]) == [0x2F, 0x07])
    }

    @Test(arguments: [[1], [5], [2, 3], [3, 4], [4, 7, 5]])
    func packRoundTrip(_ shape: [Int]) {
        var rng = SeededRandom(UInt64(shape.reduce(1, *)))
        let n = shape.reduce(1, *)
        let q = (0..<n).map { _ in UInt8(rng.next() % 16) }
        let packed = Packing.pack4(q, shape: shape)
        #expect(packed.count == shape.dropLast().reduce(1, *) * ((shape.last! + 1) / 2))
        #expect(Packing.unpack4(packed, shape: shape) == q)
    }

    @Test func int4RoundTripThroughQuantizer() throws {
        var rng = SeededRandom(11)
        let x = (0..<(6 * 9)).map { _ in rng.normal() }
        for t in [TargetType.int4, .uint4] {
            let s = QuantScheme(
                target: t, mapping: t == .int4 ? .scale : .affine, granularity: .group, axis: 0, groupSize: 4)
            let q = try quantize(x, shape: [6, 9], s)
            #expect(q.valuesShape == [6, 5])
            let back = Quantizer.dequantize(
                values: q.values, target: t, shape: [6, 9], scale: q.scale, zeroPoint: q.zeroPoint,
                granularity: .group, axis: 0, groupSize: 4)
            #expect(back.count == x.count)
            #expect(q.metrics.cosine > 0.95)
        }
    }

    @Test func fp8EncodingSaturatesAndRounds() {
        #expect(FP8.encode(448, format: .e4m3) == 0x7E)
        #expect(FP8.encode(1000, format: .e4m3) == 0x7E)
        #expect(FP8.encode(-1000, format: .e4m3) == 0xFE)
        #expect(FP8.encode(57344, format: .e5m2) == 0x7B)
        #expect(FP8.encode(1, format: .e4m3) == 0x38)
        #expect(FP8.encode(1, format: .e5m2) == 0x3C)
        // smallest e4m3 subnormal is 2^-9; half of it ties to even (0)
        #expect(FP8.encode(Float(sign: .plus, exponent: -9, significand: 1), format: .e4m3) == 0x01)
        #expect(FP8.encode(Float(sign: .plus, exponent: -10, significand: 1), format: .e4m3) == 0x00)
        // every finite code decodes and re-encodes to itself
        for f in [FP8.Format.e4m3, .e5m2] {
            for c in 0...255 {
                let v = FP8.decode(UInt8(c), format: f)
                guard v.isFinite else { continue }
                let back = FP8.encode(v, format: f)
                #expect(back == UInt8(c) || (v == 0 && (back & 0x7F) == 0), "\(f) code \(c)")
            }
        }
    }
}

/// Every quantized type of the traits table, swept the way llama.cpp's test-quantize-fns does: the fast
/// kernels equal the reference ones, the stored bytes are as the table says, and dequantizing stays
/// within half a step (integers) or the format's relative precision (fp8).
@Suite struct EveryTargetType {
    @Test(arguments: TargetType.allCases.filter(\.isQuantization))
    func quantizesDequantizesAndAgreesWithTheReference(_ target: TargetType) throws {
        var rng = SeededRandom(11)
        if let block = target.traits.block {
            // llama.cpp's blocks: whole blocks per row, scales inside (byte identity with the gguf
            // package's quantizer is an interop test)
            let shape = [6, 2 * block.elements]
            let x = (0..<(6 * 2 * block.elements)).map { _ in rng.normal() }
            let q = try quantize(
                x, shape: shape, QuantScheme(target: target, granularity: .group, axis: 0, groupSize: block.elements))
            #expect(q.values.count == 12 * block.bytes && q.scale == nil)
            #expect(Shape(Quantizer.storedShape(shape, target: target)).elementCount == q.values.count)
            let back = Quantizer.dequantize(
                values: q.values, target: target, shape: shape, scale: nil, zeroPoint: nil, granularity: .group,
                axis: 0,
                groupSize: block.elements)
            for b in 0..<12 {
                let part = x[(b * block.elements)..<((b + 1) * block.elements)]
                let amax = part.map(abs).max()!
                let range = part.max()! - part.min()!
                // Q8_0 and Q4_1 round to the nearest level; Q4_0's grid −8d … 7d clips the side opposite
                // the extreme by up to one step
                let bound: Float =
                    switch target {
                    case .q8_0: amax / 127 * 0.51
                    case .q4_0: amax / 8 * 1.01
                    default: range / 15 * 0.51
                    }
                for i in part.indices { #expect(abs(back[i] - x[i]) <= bound + 1e-3 * amax, "\(target) \(i)") }
            }
            return
        }
        let shape = [6, 37]  // odd rows: 4-bit packing leaves a high nibble
        let x = (0..<(6 * 37)).map { _ in rng.normal() }
        for mapping in Mapping.allCases where !(target.isFP8 && mapping == .affine) {
            for granularity in [Granularity.tensor, .channel, .group] {
                let scheme = QuantScheme(
                    target: target, mapping: mapping, granularity: granularity, axis: 0, groupSize: 16)
                let fast = try quantize(x, shape: shape, scheme)
                let ref = try quantize(x, shape: shape, scheme, reference: true)
                #expect(
                    fast.values == ref.values && fast.scale == ref.scale && fast.zeroPoint == ref.zeroPoint,
                    "\(target) \(mapping) \(granularity)")
                let stored = Shape(Quantizer.storedShape(shape, target: target)).checkedByteCount(target.storageDType)
                #expect(fast.values.count == stored)
                #expect(target.traits.storage == target.storageDType && target.bits == target.traits.bits)
                let layout = ParamLayout(shape: shape, granularity: granularity, axis: 0, groupSize: 16)
                let back = Quantizer.dequantize(
                    values: fast.values, target: target, shape: shape, scale: fast.scale, zeroPoint: fast.zeroPoint,
                    granularity: granularity, axis: 0, groupSize: 16)
                let index = layout.paramIndices()
                for i in x.indices {
                    let step = abs(fast.scale![Int(index[i])])
                    let bound =
                        target.isFP8 ? abs(x[i]) * (target == .fp8_e4m3 ? 0.0625 : 0.125) + step : step / 2 + 1e-6
                    #expect(abs(back[i] - x[i]) <= bound, "\(target) \(mapping) \(granularity) element \(i)")
                }
            }
        }
    }
}

@Suite struct SubBytePacking {
    /// Every width packs and unpacks back, rows of any length (tails leave high bits 0), low bits first.
    @Test(arguments: [1, 2, 4]) func packRoundTrips(bits: Int) {
        var rng = SeededRandom(UInt64(bits) + 1)
        for shape in [[3, 7], [2, 8], [1, 1], [5, 13], [0, 4]] {
            let n = shape.reduce(1, *)
            let q = (0..<n).map { _ in UInt8(truncatingIfNeeded: rng.next()) & UInt8((1 << bits) - 1) }
            let packed = Packing.pack(q, shape: shape, bits: bits)
            let per = 8 / bits
            #expect(packed.count == shape.dropLast().reduce(1, *) * ((shape.last! + per - 1) / per))
            #expect(Packing.unpack(packed, shape: shape, bits: bits) == q)
        }
        #expect(Packing.pack([1, 0, 1, 1], shape: [4], bits: 1) == [0b1101])
        #expect(Packing.pack([3, 2, 1], shape: [3], bits: 2) == [0b01_10_11])
        #expect(Packing.pack([0xA, 0x3, 0x7], shape: [3], bits: 4) == [0x3A, 0x07])
    }

    @Test func signExtension() {
        #expect(Packing.signExtend(0x0D, bits: 4) == 0xFD)
        #expect(Packing.signExtend(0x07, bits: 4) == 0x07)
        #expect(Packing.signExtend(0b10, bits: 2) == 0xFE)
        #expect(Packing.signExtend(0b1, bits: 1) == 0xFF)
    }
}
