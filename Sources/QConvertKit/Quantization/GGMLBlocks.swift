import CQKernels
import Foundation

/// llama.cpp's block formats as quantization targets (Q8_0, Q4_0, Q4_1): blocks of 32 values along
/// the last axis, each with its float16 scale (and minimum) inside the block. The arithmetic is
/// llama.cpp's reference quantizer's, float32 throughout, so that blocks are byte-identical to
/// `gguf.quants.quantize`; it rounds half away from zero (Q8_0) or truncates after adding one half
/// (Q4_0, Q4_1), the one exception to qconvert's round-half-to-even rule.
enum GGMLBlocks {
    static let blockElements = 32

    static func half(_ x: Float) -> UInt16 {
        var v = x
        var h: UInt16 = 0
        _ = qk_f32_to_f16(&v, 1, &h, 0)
        return h
    }

    static func float(_ h: UInt16) -> Float {
        var v = h
        var f: Float = 0
        qk_f16_to_f32(&v, 1, &f)
        return f
    }

    static func quantize(
        name: String, _ x: UnsafeBufferPointer<Float>, shape: [Int], target: TargetType, bytesBefore: Int
    ) throws
        -> QuantizedTensor
    {
        guard let block = target.traits.block else { preconditionFailure("\(target) is not a block type") }
        let n = x.count
        let blocks = n / block.elements
        var out = [UInt8](repeating: 0, count: blocks * block.bytes)
        var sums = ErrorSums()
        sums.count = n
        var maxErr = 0.0
        out.withUnsafeMutableBufferPointer { o in
            for b in 0..<blocks {
                let v = UnsafeBufferPointer(rebasing: x[(b * 32)..<(b * 32 + 32)])
                let dst = o.baseAddress! + b * block.bytes
                var back = [Float](repeating: 0, count: 32)
                switch target {
                case .q8_0:
                    var amax: Float = 0
                    for e in v { amax = max(amax, abs(e)) }
                    let d = amax / 127
                    let id: Float = d == 0 ? 0 : 1 / d
                    let dh = half(d)
                    dst[0] = UInt8(dh & 0xFF)
                    dst[1] = UInt8(dh >> 8)
                    let df = float(dh)
                    for j in 0..<32 {
                        let q = Int8((v[j] * id).rounded(.toNearestOrAwayFromZero))
                        dst[2 + j] = UInt8(bitPattern: q)
                        back[j] = df * Float(q)
                    }
                case .q4_0:
                    var imax = 0
                    for j in 1..<32 where abs(v[j]) > abs(v[imax]) { imax = j }
                    let d = v[imax] / -8
                    let id: Float = d == 0 ? 0 : 1 / d
                    let dh = half(d)
                    dst[0] = UInt8(dh & 0xFF)
                    dst[1] = UInt8(dh >> 8)
                    let df = float(dh)
                    var q = [UInt8](repeating: 0, count: 32)
                    for j in 0..<32 {
                        q[j] = UInt8(min(max((v[j] * id + 8.5).rounded(.towardZero), 0), 15))
                        back[j] = df * Float(Int(q[j]) - 8)
                    }
                    for j in 0..<16 { dst[2 + j] = q[j] | (q[j + 16] << 4) }
                case .q4_1:
                    var lo = v[0]
                    var hi = v[0]
                    for e in v {
                        lo = min(lo, e)
                        hi = max(hi, e)
                    }
                    let d = (hi - lo) / 15
                    let id: Float = d == 0 ? 0 : 1 / d
                    let dh = half(d)
                    let mh = half(lo)
                    dst[0] = UInt8(dh & 0xFF)
                    dst[1] = UInt8(dh >> 8)
                    dst[2] = UInt8(mh & 0xFF)
                    dst[3] = UInt8(mh >> 8)
                    let df = float(dh)
                    let mf = float(mh)
                    var q = [UInt8](repeating: 0, count: 32)
                    for j in 0..<32 {
                        q[j] = UInt8(min(max(((v[j] - lo) * id + 0.5).rounded(.towardZero), 0), 15))
                        back[j] = df * Float(q[j]) + mf
                    }
                    for j in 0..<16 { dst[4 + j] = q[j] | (q[j + 16] << 4) }
                case .int8, .uint8, .int4, .uint4, .fp8_e4m3, .fp8_e5m2, .fp16, .bf16, .keep:
                    break
                }
                for j in 0..<32 {
                    let xv = Double(v[j])
                    let yv = Double(back[j])
                    sums.x2 += xv * xv
                    sums.e2 += (xv - yv) * (xv - yv)
                    sums.xq += xv * yv
                    sums.q2 += yv * yv
                    maxErr = max(maxErr, abs(xv - yv))
                }
            }
        }
        var m = qk_metrics()
        m.sum_x2 = sums.x2
        m.sum_e2 = sums.e2
        m.sum_xq = sums.xq
        m.sum_q2 = sums.q2
        m.max_err = Float(maxErr)
        return QuantizedTensor(
            values: out, valuesDType: .u8, valuesShape: Quantizer.storedShape(shape, target: target), scale: nil,
            zeroPoint: nil, paramShape: [],
            metrics: TensorMetrics(sums: m, count: n, bytesBefore: bytesBefore, bytesAfter: out.count), warnings: [])
    }
}
