import CQKernels
import Foundation

/// llama.cpp's block formats as quantization targets (Q8_0, Q4_0, Q4_1): blocks of 32 values along
/// the last axis, each with its float16 scale (and minimum) inside the block. The C kernel
/// (`qk_quantize_ggml_blocks`) uses llama.cpp's reference arithmetic, float32 throughout, so that blocks
/// are byte-identical to `gguf.quants.quantize`: it rounds half away from zero (Q8_0) or truncates after
/// adding one half (Q4_0, Q4_1), the one exception to qconvert's round-half-to-even rule.
enum GGMLBlocks {
    static let blockElements = 32

    static func quantize(
        name: String, _ x: UnsafeBufferPointer<Float>, shape: [Int], target: TargetType, bytesBefore: Int
    ) throws
        -> QuantizedTensor
    {
        guard let block = target.traits.block else { preconditionFailure("\(target) is not a block type") }
        let n = x.count
        let blocks = n / block.elements
        var out = [UInt8](repeating: 0, count: blocks * block.bytes)
        var m = qk_metrics()
        let type: Int32 =
            switch target {
            case .q8_0: Int32(QK_GGML_Q8_0)
            case .q4_0: Int32(QK_GGML_Q4_0)
            case .q4_1: Int32(QK_GGML_Q4_1)
            case .int8, .uint8, .int4, .uint4, .fp8_e4m3, .fp8_e5m2, .fp16, .bf16, .keep:
                preconditionFailure("not a block type")
            }
        // blocks are independent: chunks of rows on every core, their sums added in order
        let chunks = max(1, min(blocks / 4096, ProcessInfo.processInfo.activeProcessorCount * 4))
        var parts = [qk_metrics](repeating: qk_metrics(), count: chunks)
        out.withUnsafeMutableBufferPointer { o in
            parts.withUnsafeMutableBufferPointer { p in
                let o = UnsafeMutableSendable(o.baseAddress!)
                let p = UnsafeMutableSendable(p.baseAddress!)
                let src = UnsafeSendable(x)
                DispatchQueue.concurrentPerform(iterations: chunks) { c in
                    let first = blocks * c / chunks
                    let end = blocks * (c + 1) / chunks
                    qk_quantize_ggml_blocks(
                        src.value.baseAddress! + first * block.elements, Int64(end - first), type,
                        o.value + first * block.bytes,
                        p.value + c)
                }
            }
        }
        for part in parts {
            m.sum_x2 += part.sum_x2
            m.sum_e2 += part.sum_e2
            m.sum_xq += part.sum_xq
            m.sum_q2 += part.sum_q2
            m.max_err = max(m.max_err, part.max_err)
        }
        return QuantizedTensor(
            values: out, valuesDType: .u8, valuesShape: Quantizer.storedShape(shape, target: target), scale: nil,
            zeroPoint: nil, paramShape: [],
            metrics: TensorMetrics(sums: m, count: n, bytesBefore: bytesBefore, bytesAfter: out.count), warnings: [])
    }
}
