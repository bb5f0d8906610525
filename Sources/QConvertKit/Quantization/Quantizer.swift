import CQKernels
import Foundation

/// Per-tensor error metrics (QUANTIZATION.md section 6), all derived from `sums`.
public struct TensorMetrics: Sendable, Equatable {
    /// The raw sums; gates and model totals add these, never the derived figures.
    public var sums: ErrorSums
    public var maxAbsError: Double
    public var mse: Double
    /// nil when the reconstruction is exact (infinite SQNR).
    public var sqnrDB: Double?
    public var cosine: Double
    /// Fraction of elements whose value fell outside the representable range and was clamped.
    public var clippedFraction: Double
    public var bitsPerWeight: Double
    public var bytesBefore: Int
    public var bytesAfter: Int

    init(sums m: qk_metrics, count: Int, bytesBefore: Int, bytesAfter: Int) {
        sums = ErrorSums(m, count: count)
        maxAbsError = sums.maxAbsError
        mse = sums.mse
        sqnrDB = sums.sqnrDB
        cosine = sums.cosine
        clippedFraction = count > 0 ? Double(m.clipped) / Double(count) : 0
        bitsPerWeight = count > 0 ? Double(bytesAfter * 8) / Double(count) : 0
        self.bytesBefore = bytesBefore
        self.bytesAfter = bytesAfter
    }
}

/// The result of quantizing or casting one tensor.
public struct QuantizedTensor: Sendable {
    /// The stored values (packed two per byte along the last axis for 4-bit types).
    public var values: [UInt8]
    public var valuesDType: DType
    public var valuesShape: [Int]
    /// One scale (the step size Δ) per parameter, nil for casts.
    public var scale: [Float]?
    /// Zero points, one byte each in `target.zeroPointDType`; nil for symmetric mappings and casts.
    public var zeroPoint: [UInt8]?
    public var paramShape: [Int]
    public var metrics: TensorMetrics
    public var warnings: [String]
}

/// Quantization engine: calibration → (Δ, z) → integers (+ packing) → metrics. Knows no file format.
public enum Quantizer {
    /// The shape of the stored values: 4-bit types halve the last axis (rounded up).
    public static func storedShape(_ shape: [Int], target: TargetType) -> [Int] {
        if let b = target.traits.block, let last = shape.last {
            return shape.dropLast() + [last / b.elements * b.bytes]
        }
        let per = target.traits.valuesPerByte
        guard per > 1 else { return shape }
        guard let last = shape.last else { return [1] }
        return shape.dropLast() + [(last + per - 1) / per]
    }

    /// Quantizes (or casts) float32 values of the given shape. `bytesBefore` is the
    /// source's stored size, for the metrics. `reference` selects the scalar kernels.
    /// `progress`, when given, receives counts of elements calibrated as a slow calibration goes on.
    public static func quantize(
        name: String, values x: UnsafeBufferPointer<Float>, shape: [Int], scheme: QuantScheme,
        bytesBefore: Int, reference: Bool = false,
        progress: (@Sendable (Int) -> Void)? = nil
    ) throws -> QuantizedTensor {
        let n = x.count
        var lo: Float = 0
        var hi: Float = 0
        if n > 0 {
            if qk_minmax_f32(x.baseAddress, Int64(n), &lo, &hi) != 0 {
                throw QConvertError.tensor(
                    name: name,
                    message:
                        "contains NaN or infinity and cannot be \(scheme.target.isCast ? "cast" : "quantized"); keep it with a rule (dtype: keep)"
                )
            }
        }
        switch scheme.target {
        case .keep:
            preconditionFailure("keep is not a quantization")
        case .fp16, .bf16:
            return try cast(name: name, x, shape: shape, scheme: scheme, bytesBefore: bytesBefore)
        case .q8_0, .q4_0, .q4_1:
            return try GGMLBlocks.quantize(name: name, x, shape: shape, target: scheme.target, bytesBefore: bytesBefore)
        case .int8, .uint8, .int4, .uint4, .fp8_e4m3, .fp8_e5m2:
            break
        }
        let layout = ParamLayout(
            shape: shape, granularity: scheme.granularity, axis: scheme.axis, groupSize: scheme.groupSize)
        var warnings: [String] = []
        var (scales, zps) = computeParameters(
            x, layout: layout, scheme: scheme, warnings: &warnings, reference: reference,
            progress: progress)
        if scheme.scaleDType != .f32 { roundScales(&scales, to: scheme.scaleDType) }

        var sums = qk_metrics()
        var q = [UInt8](repeating: 0, count: n)
        if let fmt = scheme.target.fp8Format {
            quantizeFP8(x, layout: layout, scales: scales, format: fmt, out: &q, sums: &sums)
        } else {
            let (qmin, qmax) = scheme.integerRange
            if reference {
                ReferenceKernels.quantize(
                    x, paramIndex: layout.paramIndices(), scales: scales, zeroPoints: zps,
                    qmin: qmin, qmax: qmax, out: &q, sums: &sums)
            } else {
                fastQuantize(x, layout: layout, scales: scales, zps: zps, qmin: qmin, qmax: qmax, out: &q, sums: &sums)
            }
        }
        let stored: [UInt8]
        if scheme.target.isPacked4 {
            stored = Packing.pack4(q, shape: shape)
        } else {
            stored = q
        }
        let zpBytes: [UInt8]? = scheme.hasZeroPoint ? zps.map { UInt8(truncatingIfNeeded: $0) } : nil
        let after = stored.count + scales.count * scheme.scaleDType.bits / 8 + (zpBytes?.count ?? 0)
        if scheme.granularity == .element {
            warnings.append("per-element parameters make the tensor larger than float32")
        }
        return QuantizedTensor(
            values: stored, valuesDType: scheme.target.storageDType,
            valuesShape: storedShape(shape, target: scheme.target),
            scale: scales, zeroPoint: zpBytes, paramShape: layout.paramShape,
            metrics: TensorMetrics(sums: sums, count: n, bytesBefore: bytesBefore, bytesAfter: after),
            warnings: warnings)
    }

    /// Per-parameter (Δ, z) from the calibrated ranges.
    ///
    /// `reference` calibrates with the straightforward Swift implementation, and `progress` receives the
    /// number of elements calibrated as the work goes on (from any thread).
    static func computeParameters(
        _ x: UnsafeBufferPointer<Float>, layout: ParamLayout, scheme: QuantScheme,
        warnings: inout [String], reference: Bool = false,
        progress: (@Sendable (Int) -> Void)? = nil
    ) -> ([Float], [Int32]) {
        let pc = layout.paramCount
        var beta = [Float](repeating: .infinity, count: pc)
        var alpha = [Float](repeating: -.infinity, count: pc)
        let levels = scheme.target.isFP8 ? 128 : 1 << (scheme.target.bits - 1)
        let qmaxSym = scheme.target.isFP8 ? 127 : (1 << (scheme.target.bits - 1)) - 1
        warnings += scheme.calibration.method.warnings(target: scheme.target)
        if scheme.calibration.isMax {
            minMaxPerParam(x, layout: layout, lo: &beta, hi: &alpha)
            // the full symmetric range needs to know on which side the largest magnitude is
            if scheme.mapping == .scale && !scheme.fullSymmetricRange {
                for i in 0..<pc {
                    let a = Swift.max(abs(beta[i]), abs(alpha[i]))
                    beta[i] = -a
                    alpha[i] = a
                }
            }
        } else {
            // Each parameter's values as one contiguous range: in place when the layout already keeps
            // them together (per tensor, per channel of axis 0, groups along the last axis), otherwise
            // gathered (counting sort by parameter index).
            var counts: [Int]
            var grouped: [Float] = []
            if let bounds = layout.contiguousBounds() {
                counts = bounds
            } else {
                let idx = layout.paramIndices()
                counts = [Int](repeating: 0, count: pc + 1)
                for i in idx { counts[Int(i) + 1] += 1 }
                for k in 0..<pc { counts[k + 1] += counts[k] }
                grouped = [Float](repeating: 0, count: x.count)
                var fill = counts
                for (e, i) in idx.enumerated() {
                    grouped[fill[Int(i)]] = x[e]
                    fill[Int(i)] += 1
                }
            }
            var longest = 0
            for k in 0..<pc { longest = Swift.max(longest, counts[k + 1] - counts[k]) }
            let calibration = scheme.calibration
            let mapping = scheme.mapping
            let bounds = counts
            let widest = longest
            // Parameters are independent: chunks of them run on every core, each chunk with its own
            // scratch buffers. The result does not depend on the split.
            let chunks = (reference || pc < 64) ? 1 : Swift.min(pc, ProcessInfo.processInfo.activeProcessorCount * 4)
            let inPlace = grouped.isEmpty
            grouped.withUnsafeBufferPointer { gathered in
                let g = inPlace ? x : gathered
                beta.withUnsafeMutableBufferPointer { betaOut in
                    alpha.withUnsafeMutableBufferPointer { alphaOut in
                        let betaOut = UnsafeMutableSendable(betaOut.baseAddress!)
                        let alphaOut = UnsafeMutableSendable(alphaOut.baseAddress!)
                        let g = UnsafeSendable(g)
                        DispatchQueue.concurrentPerform(iterations: chunks) { chunk in
                            let first = pc * chunk / chunks
                            let end = pc * (chunk + 1) / chunks
                            let scratch =
                                reference ? nil : CalibrationScratch(capacity: widest, calibration: calibration)
                            for k in first..<end {
                                let part = UnsafeBufferPointer(rebasing: g.value[bounds[k]..<bounds[k + 1]])
                                guard !part.isEmpty else {
                                    betaOut.value[k] = 0
                                    alphaOut.value[k] = 0
                                    continue
                                }
                                var lo: Float = 0
                                var hi: Float = 0
                                _ = qk_minmax_f32(part.baseAddress, Int64(part.count), &lo, &hi)
                                // The kernels count a histogram bin in 32 bits: a larger group takes the reference path.
                                let fast = part.count <= Int(UInt32.max) ? scratch : nil
                                let r =
                                    fast?.range(
                                        part, lo: lo, hi: hi, calibration: calibration, mapping: mapping,
                                        levels: levels, qmaxSymmetric: qmaxSym)
                                    ?? Calibrator.referenceRange(
                                        part, lo: lo, hi: hi, calibration: calibration, mapping: mapping,
                                        levels: levels, qmaxSymmetric: qmaxSym)
                                betaOut.value[k] = r.beta
                                alphaOut.value[k] = r.alpha
                                if (k - first) % 256 == 255 { progress?(bounds[k + 1] - bounds[k - 255]) }
                            }
                            let rest = (end - first) % 256
                            if rest > 0 { progress?(bounds[end] - bounds[end - rest]) }
                        }
                    }
                }
            }
        }
        var scales = [Float](repeating: 1, count: pc)
        var zps = [Int32](repeating: 0, count: pc)
        for k in 0..<pc {
            let b = beta[k].isFinite ? beta[k] : 0
            let a = alpha[k].isFinite ? alpha[k] : 0
            (scales[k], zps[k]) = parameters(beta: b, alpha: a, scheme: scheme)
        }
        return (scales, zps)
    }

    /// Rounds scales to float16 or bfloat16 (to nearest, ties to even); a scale that would round to zero
    /// or overflow takes the type's smallest or largest positive normal value, with its sign.
    static func roundScales(_ scales: inout [Float], to dtype: DType) {
        let n = scales.count
        var halves = [UInt16](repeating: 0, count: n)
        var back = [Float](repeating: 0, count: n)
        if dtype == .f16 {
            _ = halves.withUnsafeMutableBufferPointer { qk_f32_to_f16(scales, Int64(n), $0.baseAddress, 1) }
            halves.withUnsafeBytes { qk_f16_to_f32($0.baseAddress, Int64(n), &back) }
        } else {
            halves.withUnsafeMutableBufferPointer { qk_f32_to_bf16(scales, Int64(n), $0.baseAddress) }
            halves.withUnsafeBytes { qk_bf16_to_f32($0.baseAddress, Int64(n), &back) }
        }
        let smallest: Float = dtype == .f16 ? Float(Float16.leastNormalMagnitude) : Float.leastNormalMagnitude
        for i in 0..<n {
            let r = back[i]
            scales[i] = abs(r) >= smallest ? r : (scales[i] < 0 ? -smallest : smallest)
        }
    }

    /// (Δ, z) for one range (QUANTIZATION.md section 2), in float32 arithmetic.
    public static func parameters(beta: Float, alpha: Float, scheme: QuantScheme) -> (scale: Float, zeroPoint: Int32) {
        if let fmt = scheme.target.fp8Format {
            let a = Swift.max(abs(beta), abs(alpha))
            let s = a / FP8.maxFinite(fmt)
            return (s >= Float.leastNormalMagnitude ? s : 1, 0)
        }
        let (qmin, qmax) = scheme.integerRange
        if scheme.mapping == .scale && scheme.fullSymmetricRange {
            // the value of largest magnitude lands on qmin: Δ = m / −2^(b−1), negative when m > 0
            let m = abs(beta) >= abs(alpha) ? beta : alpha
            let half = Float((qmax - qmin + 1) / 2)
            let s = m / -half
            return (abs(s) >= Float.leastNormalMagnitude ? s : 1, (qmin + qmax + 1) / 2)
        }
        if scheme.mapping == .scale {
            let a = Swift.max(abs(beta), abs(alpha))
            let s = a / Float((qmax - qmin) / 2)
            return (s >= Float.leastNormalMagnitude ? s : 1, (qmin + qmax) / 2)
        }
        let b = Swift.min(beta, 0)
        let a = Swift.max(alpha, 0)
        let s = (a - b) / Float(qmax - qmin)
        guard s >= Float.leastNormalMagnitude else { return (1, scheme.target.isSigned ? 0 : qmin) }
        let r = (b / s).rounded(.toNearestOrEven)
        let z = Swift.min(Swift.max(Float(qmin) - r, Float(qmin)), Float(qmax))
        return (s, Int32(z))
    }

    static func minMaxPerParam(
        _ x: UnsafeBufferPointer<Float>, layout: ParamLayout, lo: inout [Float], hi: inout [Float]
    ) {
        guard let base = x.baseAddress, !x.isEmpty else { return }
        let L = layout.shape.last ?? 1
        let mode = layout.lastAxisMode
        layout.forEachRow { row, pi in
            let rowPtr = base + row * L
            switch mode {
            case .shared:
                var l: Float = 0
                var h: Float = 0
                _ = qk_minmax_f32(rowPtr, Int64(L), &l, &h)
                lo[pi] = Swift.min(lo[pi], l)
                hi[pi] = Swift.max(hi[pi], h)
            case .distinct:
                for k in 0..<L {
                    let v = rowPtr[k]
                    lo[pi + k] = Swift.min(lo[pi + k], v)
                    hi[pi + k] = Swift.max(hi[pi + k], v)
                }
            case .blocked(let b):
                var start = 0
                var blk = 0
                while start < L {
                    let len = Swift.min(b, L - start)
                    var l: Float = 0
                    var h: Float = 0
                    _ = qk_minmax_f32(rowPtr + start, Int64(len), &l, &h)
                    lo[pi + blk] = Swift.min(lo[pi + blk], l)
                    hi[pi + blk] = Swift.max(hi[pi + blk], h)
                    start += b
                    blk += 1
                }
            }
        }
    }

    static func fastQuantize(
        _ x: UnsafeBufferPointer<Float>, layout: ParamLayout, scales: [Float], zps: [Int32],
        qmin: Int32, qmax: Int32, out: inout [UInt8], sums: inout qk_metrics
    ) {
        guard let base = x.baseAddress, !x.isEmpty else { return }
        let L = layout.shape.last ?? 1
        let mode = layout.lastAxisMode
        scales.withUnsafeBufferPointer { sc in
            zps.withUnsafeBufferPointer { zp in
                out.withUnsafeMutableBufferPointer { o in
                    layout.forEachRow { row, pi in
                        let xr = base + row * L
                        let orow = o.baseAddress! + row * L
                        switch mode {
                        case .shared:
                            qk_quantize_int_f32(xr, Int64(L), sc[pi], zp[pi], qmin, qmax, orow, &sums)
                        case .distinct:
                            qk_quantize_int_f32_vec(
                                xr, Int64(L), sc.baseAddress! + pi, zp.baseAddress! + pi, qmin, qmax, orow, &sums)
                        case .blocked(let b):
                            var start = 0
                            var blk = 0
                            while start < L {
                                let len = Swift.min(b, L - start)
                                qk_quantize_int_f32(
                                    xr + start, Int64(len), sc[pi + blk], zp[pi + blk], qmin, qmax, orow + start, &sums)
                                start += b
                                blk += 1
                            }
                        }
                    }
                }
            }
        }
    }

    static func quantizeFP8(
        _ x: UnsafeBufferPointer<Float>, layout: ParamLayout, scales: [Float], format: FP8.Format,
        out: inout [UInt8], sums: inout qk_metrics
    ) {
        let idx = layout.paramIndices()
        let maxV = FP8.maxFinite(format)
        var m = MetricSums()
        for i in 0..<x.count {
            let s = scales[Int(idx[i])]
            let v = x[i] / s
            if abs(v) > maxV { m.clipped += 1 }
            let code = FP8.encode(v, format: format)
            out[i] = code
            m.add(x[i], FP8.decode(code, format: format) * s)
        }
        m.store(into: &sums)
    }

    static func cast(name: String, _ x: UnsafeBufferPointer<Float>, shape: [Int], scheme: QuantScheme, bytesBefore: Int)
        throws
        -> QuantizedTensor
    {
        let n = x.count
        var halves = [UInt16](repeating: 0, count: n)
        var back = [Float](repeating: 0, count: n)
        if scheme.target == .fp16 {
            let overflow = halves.withUnsafeMutableBufferPointer {
                qk_f32_to_f16(x.baseAddress, Int64(n), $0.baseAddress, scheme.saturate ? 1 : 0)
            }
            if overflow > 0 && !scheme.saturate {
                throw QConvertError.tensor(
                    name: name,
                    message:
                        "\(overflow) values overflow float16 (|x| ≥ 65520); set 'saturate: true' in the rule to clamp them to ±65504, or keep the tensor"
                )
            }
            halves.withUnsafeBytes { qk_f16_to_f32($0.baseAddress, Int64(n), &back) }
        } else {
            halves.withUnsafeMutableBufferPointer { qk_f32_to_bf16(x.baseAddress, Int64(n), $0.baseAddress) }
            halves.withUnsafeBytes { qk_bf16_to_f32($0.baseAddress, Int64(n), &back) }
        }
        var m = MetricSums()
        for i in 0..<n { m.add(x[i], back[i]) }
        var sums = qk_metrics()
        m.store(into: &sums)
        let bytes = halves.withUnsafeBytes { [UInt8]($0) }
        return QuantizedTensor(
            values: bytes, valuesDType: scheme.target.storageDType, valuesShape: shape, scale: nil,
            zeroPoint: nil, paramShape: [],
            metrics: TensorMetrics(sums: sums, count: n, bytesBefore: bytesBefore, bytesAfter: bytes.count),
            warnings: [])
    }

    /// Reconstructs float32 values x̂ = (q − z)·Δ from stored values and parameters.
    public static func dequantize(
        values: [UInt8], target: TargetType, shape: [Int], scale: [Float]?, zeroPoint: [UInt8]?,
        granularity: Granularity, axis: Int, groupSize: Int
    ) -> [Float] {
        let n = shape.reduce(1, *)
        switch target {
        case .keep:
            return []
        case .fp16:
            var out = [Float](repeating: 0, count: n)
            values.withUnsafeBytes { qk_f16_to_f32($0.baseAddress, Int64(n), &out) }
            return out
        case .bf16:
            var out = [Float](repeating: 0, count: n)
            values.withUnsafeBytes { qk_bf16_to_f32($0.baseAddress, Int64(n), &out) }
            return out
        case .q8_0, .q4_0, .q4_1:
            let type: GGMLType = target == .q8_0 ? .q8_0 : target == .q4_0 ? .q4_0 : .q4_1
            return values.withUnsafeBytes { GGUFBlocks.dequantize(type, $0, count: n) }
        case .int8, .uint8, .int4, .uint4, .fp8_e4m3, .fp8_e5m2:
            break
        }
        let layout = ParamLayout(shape: shape, granularity: granularity, axis: axis, groupSize: groupSize)
        let idx = layout.paramIndices()
        let scales = scale ?? [Float](repeating: 1, count: layout.paramCount)
        var out = [Float](repeating: 0, count: n)
        if let fmt = target.fp8Format {
            for i in 0..<n { out[i] = FP8.decode(values[i], format: fmt) * scales[Int(idx[i])] }
            return out
        }
        let q: [UInt8] = target.isPacked4 ? Packing.unpack4(values, shape: shape) : values
        for i in 0..<n {
            let p = Int(idx[i])
            let qi: Int32 = target.isSigned ? Int32(Int8(bitPattern: signExtend(q[i], target))) : Int32(q[i])
            let z: Int32
            if let zeroPoint {
                z = target.isSigned ? Int32(Int8(bitPattern: zeroPoint[p])) : Int32(zeroPoint[p])
            } else {
                z = 0
            }
            out[i] = Float(qi - z) * scales[p]
        }
        return out
    }

    @inline(__always)
    static func signExtend(_ b: UInt8, _ t: TargetType) -> UInt8 {
        t.isPacked4 && t.isSigned ? Packing.signExtend4(b) : b
    }
}

/// A pointer handed to concurrently running closures that each touch disjoint elements.
struct UnsafeMutableSendable<T>: @unchecked Sendable {
    let value: UnsafeMutablePointer<T>
    init(_ v: UnsafeMutablePointer<T>) { value = v }
}

/// A read-only buffer handed to concurrently running closures.
struct UnsafeSendable<T>: @unchecked Sendable {
    let value: UnsafeBufferPointer<T>
    init(_ v: UnsafeBufferPointer<T>) { value = v }
}

/// Double-precision metric sums for the scalar paths.
struct MetricSums {
    var x2 = 0.0, e2 = 0.0, xq = 0.0, q2 = 0.0
    var maxErr: Float = 0
    var clipped = 0

    @inline(__always)
    mutating func add(_ x: Float, _ xh: Float) {
        let e = x - xh
        x2 += Double(x * x)
        e2 += Double(e * e)
        xq += Double(x * xh)
        q2 += Double(xh * xh)
        maxErr = Swift.max(maxErr, abs(e))
    }

    func store(into s: inout qk_metrics) {
        s.sum_x2 += x2
        s.sum_e2 += e2
        s.sum_xq += xq
        s.sum_q2 += q2
        s.max_err = Swift.max(s.max_err, maxErr)
        s.clipped += Int64(clipped)
    }
}
