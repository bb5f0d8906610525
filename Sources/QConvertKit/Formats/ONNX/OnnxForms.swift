import COnnxProto
import CQKernels
import Foundation

/// The forms a quantized MatMul/Gemm weight can take in an ONNX output, and the graph facts that
/// decide which one fits. onnxruntime rewrites `DequantizeLinear(W) → MatMul` into its integer
/// kernel only when nothing fuses first: on 2-D graphs `MatMul + Add` becomes `Gemm` and the
/// DequantizeLinear then runs at every inference (slower than the float model). Writing the kernel
/// (`com.microsoft.MatMulNBits`) or the dynamic pattern directly avoids the trap.
enum OnnxForms {
    /// One use of a weight as the B input of a MatMul or Gemm.
    struct Use {
        var node: Proto.NodeP
        /// The activation input.
        var a: String
        /// A 1-D [N] float initializer added to the product (Gemm's C, or a following Add).
        var bias: String?
        /// The Add node whose work the bias takes over (removed when the bias is folded).
        var biasAdd: Proto.NodeP?
        /// The value the replacement must produce (the Add's output when one is folded).
        var output: String
        /// The MatMul/Gemm product itself, before any bias.
        var product: String
    }

    /// A 2-D weight whose every use is a MatMul/Gemm B input.
    struct Fit {
        var k: Int
        var n: Int
        /// The weight's axis of length N: 1 for [K, N] (MatMul, Gemm), 0 for [N, K] (Gemm transB=1).
        var nAxis: Int
        var uses: [Use]
        /// The uses are Gather (axis 0) data inputs: an embedding, written as GatherBlockQuantized.
        var gather = false
    }

    enum Choice {
        case qdq(note: String?)
        case matMulNBits(Fit, bits: Int, blockSize: Int, note: String?)
        case dynamic(Fit)
        /// The activations' static QuantizeLinear + com.microsoft.MatMulIntegerToFloat (bias folded).
        case staticInteger(Fit)
        case gatherBlockQuantized(Fit, bits: Int, blockSize: Int)

        /// What `plan` and the summary say about the choice (a fallback, or a run-time trap).
        var note: String? {
            switch self {
            case .qdq(let n): return n
            case .matMulNBits(_, _, _, let n): return n
            case .dynamic, .staticInteger, .gatherBlockQuantized: return nil
            }
        }

    }

    static func floatAttribute(_ node: Proto.NodeP, _ name: String) -> Float? {
        guard let a = Proto.attribute(node, name) else { return nil }
        return a.pointee.f
    }

    static func inputs(_ node: Proto.NodeP) -> [String] { Proto.strings(node.pointee.input, node.pointee.n_input) }
    static func outputs(_ node: Proto.NodeP) -> [String] { Proto.strings(node.pointee.output, node.pointee.n_output) }

    /// A kept, 1-D float32 initializer of the main graph with `n` elements (a bias that can be folded).
    static func isBias(_ name: String, n: Int, model: OnnxModel, main: Proto.GraphP, plans: [String: TensorPlan])
        -> Bool
    {
        guard let loc = model.located(graphName: name),
            case .initializer(let g) = loc.home, g == main
        else { return false }
        if let p = plans[name], p.decision.scheme != nil { return false }
        let dims = Proto.dimsOf(loc.tensor)
        return dims == [n] && loc.tensor.pointee.data_type == 1
    }

    /// Whether the weight is used only as a MatMul/Gemm B input the integer forms can take over, and how.
    static func fit(_ p: TensorPlan, loc: OnnxModel.Located, model: OnnxModel, plans: [String: TensorPlan]) -> Result<
        Fit, Why
    > {
        guard let main = model.model.pointee.graph, case .initializer(let g) = loc.home, g == main else {
            return .failure(Why("not an initializer of the main graph"))
        }
        guard p.shape.count == 2, p.dtype == .f32 else { return .failure(Why("not a 2-D float32 weight")) }
        let uses = model.consumers[loc.graphName] ?? []
        guard !uses.isEmpty else { return .failure(Why("no MatMul or Gemm uses it")) }
        // the replacement nodes go into the main graph: a use inside a subgraph or function keeps DequantizeLinear
        guard uses.allSatisfy({ model.mainNodes.contains($0.node) }) else {
            return .failure(Why("used inside a subgraph"))
        }
        // an embedding: every use the data input of a Gather along axis 0
        if uses.allSatisfy({ $0.op == "Gather" && $0.index == 0 && Proto.string($0.node.pointee.domain).isEmpty }) {
            var result: [Use] = []
            for u in uses {
                let ins = inputs(u.node)
                let out = outputs(u.node)
                guard (Proto.intAttribute(u.node, "axis") ?? 0) == 0, ins.count == 2, out.count == 1 else {
                    return .failure(Why("a Gather along another axis"))
                }
                result.append(Use(node: u.node, a: ins[1], bias: nil, biasAdd: nil, output: out[0], product: out[0]))
            }
            if let s = p.decision.scheme, s.granularity == .channel || s.granularity == .group, s.axis != 0 {
                return .failure(Why("quantized along axis \(s.axis), not the gathered rows"))
            }
            return .success(Fit(k: p.shape[1], n: p.shape[0], nAxis: 0, uses: result, gather: true))
        }
        var nAxis: Int? = nil
        var result: [Use] = []
        let graphOutputs = Set(
            (0..<main.pointee.n_output).compactMap { main.pointee.output[$0].map { Proto.string($0.pointee.name) } })
        for u in uses {
            guard u.index == 1, Proto.string(u.node.pointee.domain).isEmpty else {
                return .failure(Why("used by \(u.op) (not as a MatMul/Gemm weight)"))
            }
            let ins = inputs(u.node)
            let out = outputs(u.node)
            guard out.count == 1, !ins[0].isEmpty, ins[0] != loc.graphName else {
                return .failure(Why("an unusual \(u.op)"))
            }
            var axis = 1
            var bias: String? = nil
            switch u.op {
            case "MatMul": break
            case "Gemm":
                guard (Proto.intAttribute(u.node, "transA") ?? 0) == 0, (floatAttribute(u.node, "alpha") ?? 1) == 1
                else {
                    return .failure(Why("a Gemm with transA or alpha"))
                }
                if (Proto.intAttribute(u.node, "transB") ?? 0) != 0 { axis = 0 }
                if ins.count > 2, !ins[2].isEmpty {
                    guard (floatAttribute(u.node, "beta") ?? 1) == 1 else { return .failure(Why("a Gemm with beta")) }
                    bias = ins[2]
                }
            default:
                return .failure(Why("used by \(u.op)"))
            }
            if let a = nAxis, a != axis { return .failure(Why("used in both orientations")) }
            nAxis = axis
            let n = p.shape[axis]
            if let b = bias, !isBias(b, n: n, model: model, main: main, plans: plans) {
                return .failure(Why("the Gemm's C is not a constant 1-D bias"))
            }
            var use = Use(node: u.node, a: ins[0], bias: bias, biasAdd: nil, output: out[0], product: out[0])
            // MatMul → Add(constant [N]): the bias folds into the kernel.
            if u.op == "MatMul", !graphOutputs.contains(out[0]), let next = model.consumers[out[0]], next.count == 1,
                next[0].op == "Add", Proto.string(next[0].node.pointee.domain).isEmpty,
                model.mainNodes.contains(next[0].node)
            {
                let addIns = inputs(next[0].node)
                let other = addIns[1 - next[0].index]
                if addIns.count == 2, outputs(next[0].node).count == 1,
                    isBias(other, n: n, model: model, main: main, plans: plans)
                {
                    use.bias = other
                    use.biasAdd = next[0].node
                    use.output = outputs(next[0].node)[0]
                }
            }
            result.append(use)
        }
        let axis = nAxis ?? 1
        if let s = p.decision.scheme, s.granularity == .channel || s.granularity == .group, s.axis != axis {
            return .failure(Why("quantized along axis \(s.axis), not the output axis \(axis)"))
        }
        return .success(Fit(k: p.shape[1 - axis], n: p.shape[axis], nAxis: axis, uses: result))
    }

    struct Why: Error, CustomStringConvertible {
        var description: String
        init(_ d: String) { description = d }
    }

    /// The MatMulNBits bits and block size for a scheme, or why it has none.
    static func blocking(_ s: QuantScheme, k: Int) -> Result<(bits: Int, blockSize: Int), Why> {
        let bits: Int
        switch s.target {
        case .int8, .uint8: bits = 8
        case .int4, .uint4: bits = 4
        case .fp8_e4m3, .fp8_e5m2, .fp16, .bf16, .q8_0, .q4_0, .q4_1, .keep:
            return .failure(Why("\(s.target.rawValue) has no MatMulNBits form"))
        }
        switch s.granularity {
        case .tensor, .channel:
            // one scale per column, repeated in every block (exact)
            var bs = 16
            while bs < min(k, 128) { bs *= 2 }
            return .success((bits, bs))
        case .group:
            let g = s.groupSize
            guard g >= 16, g & (g - 1) == 0 else { return .failure(Why("group size \(g) is not a power of two ≥ 16")) }
            return .success((bits, g))
        case .element:
            return .failure(Why("per-element scales have no MatMulNBits form"))
        }
    }

    /// Blocking for GatherBlockQuantized, whose rows are not padded per block: the block must divide
    /// the row (one scale per row is repeated in every block, exactly).
    static func gatherBlocking(_ s: QuantScheme, k: Int) -> Result<(bits: Int, blockSize: Int), Why> {
        switch blocking(s, k: k) {
        case .failure(let why): return .failure(why)
        case .success(let b):
            if s.granularity == .group {
                guard k % b.blockSize == 0 else {
                    return .failure(Why("rows of \(k) are not a whole number of groups of \(b.blockSize)"))
                }
                return .success(b)
            }
            for bs in [128, 64, 32, 16] where k % bs == 0 { return .success((b.bits, bs)) }
            return .failure(Why("rows of \(k) are not a multiple of 16"))
        }
    }

    /// Decides the form of one quantized weight.
    static func choose(_ p: TensorPlan, loc: OnnxModel.Located, model: OnnxModel, plans: [String: TensorPlan]) -> Choice
    {
        guard let s = p.decision.scheme, s.target.isQuantization else { return .qdq(note: nil) }
        let fitted = fit(p, loc: loc, model: model, plans: plans)
        if case .success(let f) = fitted, f.gather {
            // embeddings: the integer kernel gathers rows and dequantizes only those (every form but qdq)
            if p.onnxForm == .qdq {
                return .qdq(
                    note:
                        "onnxruntime dequantizes the whole table at every run before gathering rows (onnx_form: auto gathers from GatherBlockQuantized)"
                )
            }
            switch gatherBlocking(s, k: f.k) {
            case .success(let b): return .gatherBlockQuantized(f, bits: b.bits, blockSize: b.blockSize)
            case .failure(let why):
                return .qdq(
                    note: p.onnxForm == .auto ? nil : "DequantizeLinear instead of GatherBlockQuantized: \(why)")
            }
        }
        if p.activationsStatic, case .success(let f) = fitted, !f.gather, f.nAxis == 1,
            s.target == .int8 || s.target == .uint8, s.granularity == .tensor || s.granularity == .channel
        {
            return .staticInteger(f)
        }
        switch p.onnxForm {
        case .qdq:
            // (only a 2-D product fuses with its bias into Gemm)
            if case .success(let f) = fitted,
                f.uses.contains(where: { $0.bias != nil && (model.ranks[$0.a] ?? 2) < 3 })
            {
                return .qdq(
                    note:
                        "onnxruntime may fuse its MatMul and bias into Gemm and then dequantize at every run (onnx_form: matmulnbits avoids it)"
                )
            }
            return .qdq(note: nil)
        case .auto, .matmulnbits:
            // 8-bit weights multiplying sequences (activations of rank ≥ 3): the products are large
            // matrices, where quantizing the activations at run time (the dynamic form) is fastest
            if p.onnxForm == .auto, case .success(let f) = fitted, !f.gather, f.nAxis == 1,
                OnnxFeature.dynamicQuantize.available(at: model.opset),
                s.target == .int8 || s.target == .uint8, s.granularity == .tensor || s.granularity == .channel,
                f.uses.allSatisfy({ (model.ranks[$0.a] ?? 0) >= 3 })
            {
                return .dynamic(f)
            }
            switch fitted {
            case .failure(let why):
                return .qdq(note: p.onnxForm == .auto ? nil : "DequantizeLinear instead of MatMulNBits: \(why)")
            case .success(let f):
                switch blocking(s, k: f.k) {
                case .failure(let why):
                    return .qdq(note: p.onnxForm == .auto ? nil : "DequantizeLinear instead of MatMulNBits: \(why)")
                case .success(let b): return .matMulNBits(f, bits: b.bits, blockSize: b.blockSize, note: nil)
                }
            }
        case .dynamic:
            guard case .success(let f) = fitted else {
                if case .failure(let why) = fitted {
                    return .qdq(note: "DequantizeLinear instead of the dynamic form: \(why)")
                }
                return .qdq(note: nil)
            }
            let integer8 = s.target == .int8 || s.target == .uint8
            if integer8, s.granularity == .tensor || s.granularity == .channel, f.nAxis == 1,
                OnnxFeature.dynamicQuantize.available(at: model.opset)
            {
                return .dynamic(f)
            }
            let why =
                !integer8
                ? "MatMulInteger takes 8-bit weights"
                : (s.granularity == .group || s.granularity == .element)
                    ? "MatMulInteger takes one scale per column"
                    : f.nAxis != 1 ? "the weight is transposed (Gemm transB)" : "opset \(model.opset) < 11"
            if case .success(let b) = blocking(s, k: f.k) {
                return .matMulNBits(
                    f, bits: b.bits, blockSize: b.blockSize, note: "MatMulNBits instead of the dynamic form: \(why)")
            }
            return .qdq(note: "DequantizeLinear instead of the dynamic form: \(why)")
        }
    }
}

/// MatMulNBits' weight layout: B [N, ceil(K/bs), bs·bits/8] of unsigned codes along K (4-bit: element
/// 2i in the low nibble), scales [N, blocks], zero points packed along the blocks (default
/// 2^(bits−1) when absent). Converts qconvert's quantized tensor to it and back, exactly.
struct MatMulNBitsLayout {
    var k: Int
    var n: Int
    var nAxis: Int
    var bits: Int
    var blockSize: Int
    var signed: Bool

    var blocks: Int { (k + blockSize - 1) / blockSize }
    var blob: Int { blockSize * bits / 8 }
    var offset: UInt8 { signed ? UInt8(1 << (bits - 1)) : 0 }
    var shape: [Int] { nAxis == 1 ? [k, n] : [n, k] }

    /// Element index in the weight's row-major layout of (column n, depth k).
    func element(_ n_: Int, _ k_: Int) -> Int { nAxis == 1 ? k_ * n + n_ : n_ * k + k_ }

    /// The tensor's codes, one per element (two's complement for signed types), from qconvert's values.
    func codes(_ values: [UInt8]) -> [UInt8] {
        bits == 4 ? Packing.unpack4(values, shape: shape) : values
    }

    /// B, scales and zero points (nil when the default applies) from qconvert's tensors.
    /// Returns nil when a block would span two scales (the scheme does not fit the blocking).
    func pack(values: [UInt8], scale: [Float], zeroPoint: [UInt8]?, params: ParamLayout) -> (
        b: [UInt8], scales: [Float], zp: [UInt8]?
    )? {
        let q = codes(values)
        let mask: UInt8 = bits == 4 ? 0x0F : 0xFF
        guard q.count == n * k else { return nil }
        // unsigned codes along K for each column: two's complement + 2^(b−1) is an xor with it
        var nk = [UInt8](repeating: 0, count: n * k)
        if nAxis == 1 {
            q.withUnsafeBufferPointer { src in
                nk.withUnsafeMutableBufferPointer {
                    qk_transpose_xor_u8(src.baseAddress, Int64(k), Int64(n), offset, $0.baseAddress)
                }
            }
        } else {
            nk = offset == 0 ? q : q.map { $0 ^ offset }
        }
        var scales = [Float](repeating: 0, count: n * blocks)
        var zps = [UInt8](repeating: 0, count: n * blocks)
        let needZP = zeroPoint != nil || !signed
        for col in 0..<n {
            for blk in 0..<blocks {
                let k0 = blk * blockSize
                let k1 = min(k0 + blockSize, k) - 1
                let first = params.paramIndex(nAxis == 1 ? [k0, col] : [col, k0])
                // parameters are constant or blocked along K: a block is one parameter if its ends are
                guard params.paramIndex(nAxis == 1 ? [k1, col] : [col, k1]) == first else { return nil }
                scales[col * blocks + blk] = scale[first]
                // also the padding's code
                zps[col * blocks + blk] = zeroPoint.map { ($0[first] &+ offset) & mask } ?? offset
            }
        }
        var b = [UInt8](repeating: 0, count: n * blocks * blob)
        nk.withUnsafeBufferPointer { c in
            zps.withUnsafeBufferPointer { z in
                b.withUnsafeMutableBufferPointer {
                    qk_pack_blocks(
                        c.baseAddress, Int64(n), Int64(k), Int64(blockSize), Int32(bits), z.baseAddress, $0.baseAddress)
                }
            }
        }
        guard needZP else { return (b, scales, nil) }
        if bits == 8 { return (b, scales, zps) }
        let per = (blocks + 1) / 2
        var packed = [UInt8](repeating: 0, count: n * per)
        for col in 0..<n {
            for blk in 0..<blocks {
                packed[col * per + blk / 2] |= blk % 2 == 0 ? zps[col * blocks + blk] : zps[col * blocks + blk] << 4
            }
        }
        return (b, scales, packed)
    }

    /// qconvert's values (packed as its writers store them), scales and zero points back from the
    /// MatMulNBits tensors; `paramCount` parameters, indexed per element by `paramIndex`.
    func unpack(b: [UInt8], scales: [Float], zp: [UInt8]?, paramIndex: [Int32], paramCount: Int) throws -> (
        values: [UInt8], scale: [Float], zeroPoint: [UInt8]?
    ) {
        guard b.count == n * blocks * blob, scales.count == n * blocks else {
            throw Why(
                "MatMulNBits tensors have \(b.count) bytes and \(scales.count) scales, expected \(n * blocks * blob) and \(n * blocks)"
            )
        }
        let per = bits == 4 ? (blocks + 1) / 2 : blocks
        if let zp, zp.count != n * per {
            throw Why("MatMulNBits zero points hold \(zp.count) bytes, expected \(n * per)")
        }
        let mask: UInt8 = bits == 4 ? 0x0F : 0xFF
        var q = [UInt8](repeating: 0, count: k * n)
        var scale = [Float](repeating: 0, count: paramCount)
        var zpOut: [UInt8]? = zp == nil ? nil : [UInt8](repeating: 0, count: paramCount)
        for col in 0..<n {
            for blk in 0..<blocks {
                var z = offset
                if let zp {
                    let byte = zp[col * per + (bits == 4 ? blk / 2 : blk)]
                    z = bits == 4 ? (blk % 2 == 0 ? byte & 0x0F : byte >> 4) : byte
                }
                for j in 0..<min(blockSize, k - blk * blockSize) {
                    let e = element(col, blk * blockSize + j)
                    let byte = b[(col * blocks + blk) * blob + (bits == 4 ? j / 2 : j)]
                    let code = bits == 4 ? (j % 2 == 0 ? byte & 0x0F : byte >> 4) : byte
                    q[e] = (code &- offset) & mask
                    let pi = Int(paramIndex[e])
                    scale[pi] = scales[col * blocks + blk]
                    zpOut?[pi] = (z &- offset) & mask
                }
            }
        }
        // a signed 4-bit zero point is stored sign-extended in one byte by qconvert
        if bits == 4, signed, var z = zpOut {
            for i in z.indices where z[i] & 0x08 != 0 { z[i] |= 0xF0 }
            zpOut = z
        }
        let values = bits == 4 ? Packing.pack4(q, shape: shape) : q
        return (values, scale, zpOut)
    }

    struct Why: Error, CustomStringConvertible {
        var description: String
        init(_ d: String) { description = d }
    }
}
