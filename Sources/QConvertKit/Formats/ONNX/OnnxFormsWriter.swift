import COnnxProto
import Foundation

/// Writing the MatMulNBits and dynamic forms (see OnnxForms): new weight tensors, the replacement
/// nodes at the position of the MatMul/Gemm they replace, and the domain import.
extension OnnxSink {
    var mainGraph: Proto.GraphP? { model.model.pointee.graph }

    /// Packs every MatMulNBits and GatherBlockQuantized weight on all cores before the graph is edited
    /// (the packing is a pure function of the quantized tensor; the edits that follow are serial).
    func prepack(_ choices: [Int: OnnxForms.Choice]) {
        var jobs:
            [(
                name: String, layout: MatMulNBitsLayout, params: ParamLayout, values: [UInt8], scale: [Float],
                zp: [UInt8]?
            )] = []
        for (pi, choice) in choices.sorted(by: { $0.key < $1.key }) {
            let p = options.plans[pi]
            guard let s = p.decision.scheme else { continue }
            let outs = outputsOfPlan[pi]
            guard outs.count > 1, let values = data[outs[0]], let scale = data[outs[1]] else { continue }
            let layout: MatMulNBitsLayout
            switch choice {
            case .matMulNBits(let f, let bits, let bs, _):
                layout = MatMulNBitsLayout(
                    k: f.k, n: f.n, nAxis: f.nAxis, bits: bits, blockSize: bs, signed: s.target.isSigned)
            case .gatherBlockQuantized(let f, let bits, let bs):
                layout = MatMulNBitsLayout(
                    k: f.k, n: f.n, nAxis: 0, bits: bits, blockSize: bs, signed: s.target.isSigned)
            default: continue
            }
            let params = ParamLayout(shape: p.shape, granularity: s.granularity, axis: s.axis, groupSize: s.groupSize)
            let scales = scale.withUnsafeBytes { Array($0.bindMemory(to: Float.self)) }
            jobs.append((p.name, layout, params, values, scales, outs.count > 2 ? data[outs[2]] : nil))
        }
        guard !jobs.isEmpty else { return }
        let results = PackResults(count: jobs.count)
        let work = jobs
        DispatchQueue.concurrentPerform(iterations: work.count) { j in
            let job = work[j]
            results.set(j, job.layout.pack(values: job.values, scale: job.scale, zeroPoint: job.zp, params: job.params))
        }
        for (j, job) in jobs.enumerated() { if let r = results.get(j) { prepacked[job.name] = r } }
    }

    /// The packed weight of a MatMulNBits or GatherBlockQuantized plan as new initializers (codes with
    /// `codeDims`, scales `[N, blocks]`, zero points with `zeroDims(count)` when present), replacing the
    /// float weight; returns their names.
    func placePacked(
        _ p: TensorPlan, loc: OnnxModel.Located, kernel: String, n: Int, blocks: Int, codeDims: [Int],
        zeroDims: (Int) -> [Int]
    ) throws -> (codes: String, scale: String, zeroPoint: String?) {
        let w = loc.graphName
        guard let packed = prepacked.removeValue(forKey: p.name) else {
            throw QConvertError.internal(message: "\(path): tensor '\(w)' does not fit \(kernel) blocks")
        }
        let cName = model.uniqueName(w + "_quantized")
        let sName = model.uniqueName(w + "_scale")
        var tensors = [
            packed.b.withUnsafeBytes { Proto.newTensor(name: cName, dataType: 2, dims: codeDims, raw: $0) },
            packed.scales.withUnsafeBytes { Proto.newTensor(name: sName, dataType: 1, dims: [n, blocks], raw: $0) }
        ]
        var zName: String? = nil
        if let z = packed.zp {
            let name = model.uniqueName(w + "_zero_point")
            tensors.append(
                z.withUnsafeBytes { Proto.newTensor(name: name, dataType: 2, dims: zeroDims(z.count), raw: $0) })
            zName = name
        }
        replaceTensor(loc, with: tensors, nodes: [])
        return (cName, sName, zName)
    }

    /// Replaces `old` by `new` (in order, at its position) in the main graph; `old` is freed after writing.
    func replaceNode(_ old: Proto.NodeP, with new: [Proto.NodeP]) {
        guard let g = mainGraph else { return }
        var list = g.pointee.node
        var n = g.pointee.n_node
        guard let idx = (0..<n).first(where: { list?[$0] == old }) else { return }
        for k in idx..<(n - 1) { list![k] = list![k + 1] }
        n -= 1
        for (j, node) in new.enumerated() { Proto.insert(node, at: idx + j, into: &list, count: &n) }
        g.pointee.node = list
        g.pointee.n_node = n
        retired.append(old)
    }

    /// Inserts nodes right after the node that produces `value` (first, when a graph input or initializer does).
    func insertAfterProducer(of value: String, _ nodes: [Proto.NodeP]) {
        guard let g = mainGraph else { return }
        var list = g.pointee.node
        var n = g.pointee.n_node
        let at =
            (0..<n).first(where: { i in list?[i].map { OnnxForms.outputs($0).contains(value) } ?? false }).map {
                $0 + 1
            } ?? 0
        for (j, node) in nodes.enumerated() { Proto.insert(node, at: at + j, into: &list, count: &n) }
        g.pointee.node = list
        g.pointee.n_node = n
    }

    /// Imports the com.microsoft domain at version 1 (once).
    func importMicrosoftDomain() {
        let m = model.model
        for i in 0..<m.pointee.n_opset_import
        where Proto.string(m.pointee.opset_import[i]?.pointee.domain) == "com.microsoft" { return }
        let o = calloc(1, MemoryLayout<Onnx__OperatorSetIdProto>.stride)!.bindMemory(
            to: Onnx__OperatorSetIdProto.self, capacity: 1)
        onnx__operator_set_id_proto__init(o)
        o.pointee.domain = Proto.cstring("com.microsoft")
        o.pointee.version = 1
        o.pointee.has_version = 1
        var list = m.pointee.opset_import
        var n = m.pointee.n_opset_import
        Proto.append(o, to: &list, count: &n)
        m.pointee.opset_import = list
        m.pointee.n_opset_import = n
    }

    func applyMatMulNBits(_ p: TensorPlan, loc: OnnxModel.Located, fit f: OnnxForms.Fit, bits: Int, blockSize: Int)
        throws
    {
        let w = loc.graphName
        let layout = MatMulNBitsLayout(k: f.k, n: f.n, nAxis: f.nAxis, bits: bits, blockSize: blockSize, signed: false)
        let (bName, sName, zName) = try placePacked(
            p, loc: loc, kernel: "MatMulNBits", n: f.n, blocks: layout.blocks,
            codeDims: [f.n, layout.blocks, layout.blob],
            zeroDims: { [$0] })
        for use in f.uses {
            var inputs = [use.a, bName, sName, zName ?? "", "", use.bias ?? ""]
            while inputs.last == "" { inputs.removeLast() }
            let node = Proto.newNode(
                op: "MatMulNBits", name: model.uniqueName(w + "_MatMulNBits"), inputs: inputs, outputs: [use.output],
                attributes: [
                    Proto.intAttr("K", f.k), Proto.intAttr("N", f.n), Proto.intAttr("bits", bits),
                    Proto.intAttr("block_size", blockSize), Proto.intAttr("accuracy_level", p.accuracyLevel)
                ])
            node.pointee.domain = Proto.cstring("com.microsoft")
            replaceNode(use.node, with: [node])
            if let add = use.biasAdd { replaceNode(add, with: []) }
        }
        importMicrosoftDomain()
        var form = blockedForm("matmulnbits", fit: f, nAxis: f.nAxis, bits: bits, blockSize: blockSize)
        form.accuracyLevel = p.accuracyLevel
        form.biasFolded = f.uses.contains { $0.bias != nil }
        record(p, values: bName, scale: sName, zeroPoint: zName, scaleShape: [f.n, layout.blocks], form: form)
    }

    /// The metadata of a weight held in one of onnxruntime's blocked forms.
    func blockedForm(_ name: String, fit f: OnnxForms.Fit, nAxis: Int, bits: Int, blockSize: Int) -> OnnxFormRecord {
        var form = OnnxFormRecord(form: name)
        form.K = f.k
        form.N = f.n
        form.nAxis = nAxis
        form.bits = bits
        form.blockSize = blockSize
        return form
    }

    /// Records the tensors and form the graph holds a weight in, for its metadata record.
    func record(
        _ p: TensorPlan, values: String, scale: String, zeroPoint: String?, scaleShape: [Int], form: OnnxFormRecord
    ) {
        stored[p.name] = { r in
            r.values = values
            r.scale = scale
            r.zeroPoint = zeroPoint
            r.scaleShape = scaleShape
            r.onnx = form
        }
    }

    /// An embedding as com.microsoft.GatherBlockQuantized: the rows a run gathers are dequantized,
    /// not the whole table. Data [rows, cols·bits/8] (the MatMulNBits bytes, rows being whole blocks).
    func applyGatherBlockQuantized(
        _ p: TensorPlan, loc: OnnxModel.Located, fit f: OnnxForms.Fit, bits: Int, blockSize: Int
    ) throws {
        let w = loc.graphName
        let layout = MatMulNBitsLayout(k: f.k, n: f.n, nAxis: 0, bits: bits, blockSize: blockSize, signed: false)
        let (dName, sName, zName) = try placePacked(
            p, loc: loc, kernel: "GatherBlockQuantized", n: f.n, blocks: layout.blocks, codeDims: [f.n, f.k * bits / 8],
            zeroDims: { [f.n, $0 / f.n] })
        for use in f.uses {
            let node = Proto.newNode(
                op: "GatherBlockQuantized", name: model.uniqueName(w + "_GatherBlockQuantized"),
                inputs: [dName, use.a, sName] + (zName.map { [$0] } ?? []), outputs: [use.output],
                attributes: [
                    Proto.intAttr("bits", bits), Proto.intAttr("block_size", blockSize),
                    Proto.intAttr("gather_axis", 0), Proto.intAttr("quantize_axis", 1)
                ])
            node.pointee.domain = Proto.cstring("com.microsoft")
            replaceNode(use.node, with: [node])
        }
        importMicrosoftDomain()
        let form = blockedForm("gatherblockquantized", fit: f, nAxis: 0, bits: bits, blockSize: blockSize)
        record(p, values: dName, scale: sName, zeroPoint: zName, scaleShape: [f.n, layout.blocks], form: form)
    }

    /// An 8-bit weight as MatMulInteger-family kernels take it, in place of the float one: its codes [K, N],
    /// scale and zero point (none when symmetric) per tensor or per column. Returns their names and the
    /// parameters' dims.
    func placeInteger8Weight(
        _ p: TensorPlan, scheme s: QuantScheme, loc: OnnxModel.Located, fit f: OnnxForms.Fit,
        values: [UInt8], scale: [UInt8], zeroPoint: [UInt8]?
    ) -> (values: String, scale: String, zeroPoint: String?, dims: [Int]) {
        let w = loc.graphName
        let qType: Int32 = s.target == .int8 ? 3 : 2
        let pDims = s.granularity == .channel ? [f.n] : []
        let qName = model.uniqueName(w + "_quantized")
        let sName = model.uniqueName(w + "_scale")
        var tensors = [
            values.withUnsafeBytes { Proto.newTensor(name: qName, dataType: qType, dims: p.shape, raw: $0) },
            scale.withUnsafeBytes { Proto.newTensor(name: sName, dataType: 1, dims: pDims, raw: $0) }
        ]
        var zName: String? = nil
        if let z = zeroPoint {
            let name = model.uniqueName(w + "_zero_point")
            tensors.append(z.withUnsafeBytes { Proto.newTensor(name: name, dataType: qType, dims: pDims, raw: $0) })
            zName = name
        }
        replaceTensor(loc, with: tensors, nodes: [])
        return (qName, sName, zName, pDims)
    }

    func applyDynamic(
        _ p: TensorPlan, scheme s: QuantScheme, loc: OnnxModel.Located, fit f: OnnxForms.Fit,
        values: [UInt8], scale: [UInt8], zeroPoint: [UInt8]?
    ) throws {
        let w = loc.graphName
        let (qName, sName, zName, pDims) = placeInteger8Weight(
            p, scheme: s, loc: loc, fit: f, values: values, scale: scale, zeroPoint: zeroPoint)
        for use in f.uses {
            // one DynamicQuantizeLinear per activation, shared by every weight that multiplies it
            let (aq, ascale, azp): (String, String, String)
            if let known = dynamicInputs[use.a] {
                (aq, ascale, azp) = known
            } else {
                aq = model.uniqueName(use.a + "_quantized")
                ascale = model.uniqueName(use.a + "_scale")
                azp = model.uniqueName(use.a + "_zero_point")
                insertAfterProducer(
                    of: use.a,
                    [
                        Proto.newNode(
                            op: "DynamicQuantizeLinear", name: model.uniqueName(use.a + "_DynamicQuantizeLinear"),
                            inputs: [use.a], outputs: [aq, ascale, azp])
                    ])
                dynamicInputs[use.a] = (aq, ascale, azp)
            }
            let yi = model.uniqueName(w + "_MatMulInteger_out")
            let yf = model.uniqueName(w + "_MatMulInteger_float")
            let sc = model.uniqueName(w + "_output_scale")
            // with a Gemm bias the product goes through an Add; a MatMul's own following Add stays as it was
            let product = use.biasAdd == nil && use.bias != nil ? model.uniqueName(w + "_product") : use.product
            var nodes = [
                Proto.newNode(
                    op: "MatMulInteger", name: model.uniqueName(w + "_MatMulInteger"),
                    inputs: [aq, qName, azp] + (zName.map { [$0] } ?? []), outputs: [yi]),
                Proto.newNode(
                    op: "Cast", name: model.uniqueName(w + "_Cast"), inputs: [yi], outputs: [yf],
                    attributes: [Proto.intAttr("to", 1)]),
                Proto.newNode(
                    op: "Mul", name: model.uniqueName(w + "_ScaleMul"), inputs: [ascale, sName], outputs: [sc]),
                Proto.newNode(op: "Mul", name: model.uniqueName(w + "_Mul"), inputs: [yf, sc], outputs: [product])
            ]
            if use.biasAdd == nil, let b = use.bias {
                nodes.append(
                    Proto.newNode(
                        op: "Add", name: model.uniqueName(w + "_BiasAdd"), inputs: [product, b], outputs: [use.output]))
            }
            replaceNode(use.node, with: nodes)
        }
        var form = OnnxFormRecord(form: "dynamic")
        form.activations = "uint8, DynamicQuantizeLinear per run"
        record(p, values: qName, scale: sName, zeroPoint: zName, scaleShape: pDims, form: form)
    }
}

/// Results of the parallel packing, written under a lock.
final class PackResults: @unchecked Sendable {
    private var items: [(b: [UInt8], scales: [Float], zp: [UInt8]?)?]
    private let lock = NSLock()
    init(count: Int) { items = Array(repeating: nil, count: count) }
    func set(_ i: Int, _ v: (b: [UInt8], scales: [Float], zp: [UInt8]?)?) {
        lock.lock()
        items[i] = v
        lock.unlock()
    }
    func get(_ i: Int) -> (b: [UInt8], scales: [Float], zp: [UInt8]?)? {
        lock.lock()
        defer { lock.unlock() }
        return items[i]
    }
}
