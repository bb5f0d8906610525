import COnnxProto
import Foundation

/// Writes ONNX models with QDQ quantization: a quantized weight `W` becomes `W_quantized`, `W_scale`
/// (and `W_zero_point`) plus a DequantizeLinear node whose output is named `W`, so its consumers stay
/// untouched. Everything else in the model is kept as it was.
public struct OnnxWriter: FormatWriter {
    public init() {}
    public var name: String { "onnx" }
    public var fileExtensions: [String] { [".onnx"] }

    public func open(path: String, tensors: [OutputTensor], source: Checkpoint, options: WriterOptions) throws
        -> CheckpointSink
    {
        guard let model = source.container as? OnnxModel else {
            throw QConvertError.usage(
                message:
                    "\(path): ONNX output needs an ONNX input (a \(source.format) checkpoint holds tensors only, no graph)"
            )
        }
        guard !options.plans.isEmpty || tensors.isEmpty else {
            throw QConvertError.usage(message: "\(path): this operation cannot write ONNX")
        }
        let replaced = Set(options.plans.filter { $0.decision.scheme != nil }.map(\.name))
        return OnnxSink(
            path: path, model: try model.editableCopy(replacing: replaced), source: source, tensors: tensors,
            options: options)
    }

    public func check(_ plans: inout [TensorPlan], source: Checkpoint, output: String) throws {
        try Self.annotate(&plans, source: source, output: output)
    }

    /// Records in each quantized weight's plan the ONNX form it will take (for `plan` and the report),
    /// and adds a warning where the form falls back or onnxruntime would run it slowly.
    ///
    /// With `output`, a weight the model's opset cannot express is refused here, before any tensor is
    /// quantized (the message names the output); without, `plan` shows the refusal as a warning.
    public static func annotate(_ plans: inout [TensorPlan], source: Checkpoint, output: String? = nil) throws {
        guard let model = source.container as? OnnxModel else { return }
        let byName = Dictionary(plans.map { ($0.name, $0) }, uniquingKeysWith: { a, _ in a })
        func check(_ i: Int, _ body: () throws -> Void) throws {
            do { try body() } catch let e as QConvertError {
                guard output == nil else { throw e }
                plans[i].warnings.append("a conversion to ONNX would be refused: " + e.description)
            }
        }
        for i in plans.indices {
            guard let s = plans[i].decision.scheme, let loc = model.located[plans[i].name] else { continue }
            if s.target.isCast {
                try check(i) {
                    try OnnxSink.checkCast(s, opset: model.opset, path: output ?? source.path, name: loc.graphName)
                }
                continue
            }
            guard s.target.isQuantization else { continue }
            let choice = OnnxForms.choose(plans[i], loc: loc, model: model, plans: byName)
            if case .qdq = choice, plans[i].onnxForm == .auto, !s.target.isFP8 {
                // onnxruntime keeps a weight's DequantizeLinear at run time unless it becomes an integer
                // kernel: under `auto` such a weight stays float rather than make inference slower
                var p = plans[i]
                p.decision = .keep(reason: "onnx_form auto")
                p.warnings.append(
                    "kept float: onnxruntime would run its DequantizeLinear at every inference, slower than float "
                        + "(onnx_form: qdq quantizes it)")
                p.bytesAfter = p.bytesBefore
                p.scaleName = nil
                p.zeroPointName = nil
                p.paramShape = []
                p.calibrationSeconds = 0
                plans[i] = p
                continue
            }
            if case .qdq = choice {
                let p = plans[i]
                try check(i) {
                    _ = try OnnxSink.dequantizeLinearForm(
                        p, scheme: s, opset: model.opset, path: output ?? source.path, name: loc.graphName)
                }
            }
            switch choice {
            case .qdq: plans[i].onnxFormChosen = "qdq"
            case .matMulNBits(_, let bits, let bs, _): plans[i].onnxFormChosen = "matmulnbits \(bits)-bit, block \(bs)"
            case .dynamic: plans[i].onnxFormChosen = "dynamic"
            case .staticInteger: plans[i].onnxFormChosen = "static"
            case .gatherBlockQuantized(_, let bits, let bs):
                plans[i].onnxFormChosen = "gatherblockquantized \(bits)-bit, block \(bs)"
            }
            if let note = choice.note { plans[i].warnings.append(note) }
        }
    }
}

final class OnnxSink: CheckpointSink {
    let path: String
    let model: OnnxModel
    let source: Checkpoint
    let tensors: [OutputTensor]
    let options: WriterOptions
    var data: [Int: [UInt8]] = [:]
    /// What the graph holds for each converted tensor, for the metadata document.
    /// What the graph really holds for each converted tensor, applied to its metadata record.
    var stored: [String: (inout TensorRecord) -> Void] = [:]
    /// MatMulNBits/GatherBlockQuantized tensors packed ahead, on every core (by weight name).
    var prepacked: [String: (b: [UInt8], scales: [Float], zp: [UInt8]?)] = [:]
    /// Nodes taken out of the graph, freed once the model is written.
    var retired: [Proto.NodeP] = []
    /// DynamicQuantizeLinear outputs per activation (the dynamic form shares them).
    var dynamicInputs: [String: (String, String, String)] = [:]
    /// Static QuantizeLinear outputs per activation (quantized, scale, zero point), shared by the static
    /// integer form and the activation pairs.
    var staticInputs: [String: (String, String, String)] = [:]

    init(path: String, model: OnnxModel, source: Checkpoint, tensors: [OutputTensor], options: WriterOptions) {
        self.path = path
        self.model = model
        self.source = source
        self.tensors = tensors
        self.options = options
    }

    /// Output index of each converted tensor's values → its plan; and every output a converted tensor yields.
    lazy var planOfValues: [Int: Int] = {
        var m: [Int: Int] = [:]
        for (pi, outs) in outputsOfPlan.enumerated() where options.plans[pi].decision.scheme != nil { m[outs[0]] = pi }
        return m
    }()
    lazy var converted: Set<Int> = Set(planOfValues.keys.flatMap { outputsOfPlan[planOfValues[$0]!] })
    /// Each plan's outputs by role: values (or the cast tensor), then scale, then zero point.
    lazy var outputsOfPlan: [[Int]] = OutputRole.outputsByPlan(tensors, planCount: options.plans.count)

    func put(_ index: Int, _ bytes: UnsafeRawBufferPointer) throws {
        // Kept tensors stay where they are in the graph; only converted ones are needed.
        guard converted.contains(index) else { return }
        data[index] = [UInt8](bytes)
    }

    func abort() { data.removeAll() }

    func fail(_ m: String) -> QConvertError { .usage(message: "\(path): \(m)") }

    func commit(
        metadata: [(key: String, value: String)], document: MetadataDocument?, perShard: [String: MetadataDocument]
    ) throws {
        let opset = model.opset
        var needIR = 0
        let planByName = Dictionary(options.plans.map { ($0.name, $0) }, uniquingKeysWith: { a, _ in a })
        defer {
            for n in retired { model.free(node: n) }
            retired = []
        }
        // each quantized weight's form, decided once on the graph as read
        var choices: [Int: OnnxForms.Choice] = [:]
        for (pi, p) in options.plans.enumerated() {
            guard let s = p.decision.scheme, s.target.isQuantization, let loc = model.located[p.name] else { continue }
            choices[pi] = OnnxForms.choose(p, loc: loc, model: model, plans: planByName)
        }
        prepack(choices)
        for (pi, p) in options.plans.enumerated() {
            guard let scheme = p.decision.scheme else { continue }
            guard let loc = model.located[p.name] else { continue }
            let outs = outputsOfPlan[pi]
            guard let values = data[outs[0]] else {
                throw QConvertError.internal(message: "\(path): no data for \(p.name)")
            }
            if scheme.target.isCast {
                try applyCast(p, scheme: scheme, loc: loc, values: values, opset: opset)
            } else {
                let scale = data[outs[1]]!
                let zp = outs.count > 2 ? data[outs[2]] : nil
                let choice = choices[pi] ?? .qdq(note: nil)
                switch choice {
                case .qdq:
                    needIR = max(
                        needIR,
                        try applyQuantize(
                            p, scheme: scheme, loc: loc, values: values, scale: scale, zeroPoint: zp, opset: opset))
                    let facts = stored[p.name]
                    stored[p.name] = { r in
                        facts?(&r)
                        r.onnx = OnnxFormRecord(form: "qdq")
                        r.onnx?.note = choice.note
                    }
                case .matMulNBits(let f, let bits, let bs, _):
                    try applyMatMulNBits(p, loc: loc, fit: f, bits: bits, blockSize: bs)
                case .dynamic(let f):
                    try applyDynamic(p, scheme: scheme, loc: loc, fit: f, values: values, scale: scale, zeroPoint: zp)
                case .staticInteger(let f):
                    try applyStaticInteger(
                        p, scheme: scheme, loc: loc, fit: f, values: values, scale: scale, zeroPoint: zp)
                case .gatherBlockQuantized(let f, let bits, let bs):
                    try applyGatherBlockQuantized(p, loc: loc, fit: f, bits: bits, blockSize: bs)
                }
            }
            data[outs[0]] = nil
        }
        let activationPairs = applyActivations(options.activations, ops: options.activationOps)
        let m = model.model
        if needIR > 0 && m.pointee.ir_version < Int64(needIR) {
            m.pointee.ir_version = Int64(needIR)
            m.pointee.has_ir_version = 1
        }
        var doc = document
        if doc != nil {
            for (name, edit) in stored { if doc!.tensors[name] != nil { edit(&doc!.tensors[name]!) } }
            // activations whose consumers became fused weight forms (MatMulNBits) got no pair
            doc!.activations = doc!.activations?.filter { activationPairs.contains($0.key) }
        }
        setMetadata(MetadataDocument.entries(metadata, doc))
        try write()
    }

    // MARK: - edits

    func replaceTensor(_ loc: OnnxModel.Located, with newTensors: [Proto.TensorP], nodes: [Proto.NodeP]) {
        switch loc.home {
        case .initializer(let g):
            // drop the float initializer, add the new ones, put the nodes first (their inputs are initializers)
            var n = g.pointee.n_initializer
            var list = g.pointee.initializer
            if let idx = (0..<n).first(where: { list?[$0] == loc.tensor }) {
                model.free(tensor: loc.tensor)
                for k in idx..<(n - 1) { list![k] = list![k + 1] }
                n -= 1
            }
            for t in newTensors { Proto.append(t, to: &list, count: &n) }
            g.pointee.initializer = list
            g.pointee.n_initializer = n
            // Before IR 4 every initializer must also be a graph input.
            if model.model.pointee.ir_version < 4 {
                var inputs = g.pointee.input
                var ni = g.pointee.n_input
                for t in newTensors {
                    Proto.append(
                        Proto.newValueInfo(
                            name: Proto.string(t.pointee.name), dataType: t.pointee.data_type, dims: Proto.dimsOf(t)),
                        to: &inputs, count: &ni)
                }
                g.pointee.input = inputs
                g.pointee.n_input = ni
            }
            var nodes_ = g.pointee.node
            var nn = g.pointee.n_node
            for (k, node) in nodes.enumerated() { Proto.insert(node, at: k, into: &nodes_, count: &nn) }
            g.pointee.node = nodes_
            g.pointee.n_node = nn
            removeGraphInput(g, loc.graphName)
        case .constant(let cnode, let g, let f):
            // the Constant node now yields the first new tensor; the others become Constant nodes too
            let first = newTensors[0]
            if let a = Proto.attribute(cnode, "value") {
                if let old = a.pointee.t { model.free(tensor: old) }
                a.pointee.t = first
            }
            Proto.setString(cnode.pointee.output, 0, Proto.string(first.pointee.name))
            var extra: [Proto.NodeP] = []
            for t in newTensors.dropFirst() {
                let out = Proto.string(t.pointee.name)
                extra.append(
                    Proto.newNode(
                        op: "Constant", name: model.uniqueName(out + "_Constant"), inputs: [], outputs: [out],
                        attributes: [Proto.tensorAttr("value", t)]))
            }
            if let g {
                OnnxSink.insert(extra + nodes, after: cnode, list: &g.pointee.node, count: &g.pointee.n_node)
            } else if let f {
                OnnxSink.insert(extra + nodes, after: cnode, list: &f.pointee.node, count: &f.pointee.n_node)
            }
        }
    }

    /// Inserts nodes right after `anchor` in a node list (graph or function body), keeping the order topological.
    static func insert(
        _ nodes: [Proto.NodeP], after anchor: Proto.NodeP,
        list: inout UnsafeMutablePointer<UnsafeMutablePointer<Onnx__NodeProto>?>?, count: inout Int
    ) {
        let at = ((0..<count).first { list?[$0] == anchor } ?? -1) + 1
        for (k, node) in nodes.enumerated() { Proto.insert(node, at: at + k, into: &list, count: &count) }
    }

    /// Old IR versions also list initializers as graph inputs; a weight computed by a node cannot be one.
    func removeGraphInput(_ g: Proto.GraphP, _ name: String) {
        var n = g.pointee.n_input
        guard let list = g.pointee.input,
            let idx = (0..<n).first(where: { Proto.string(list[$0]?.pointee.name) == name })
        else { return }
        onnx__value_info_proto__free_unpacked(list[idx], nil)
        for k in idx..<(n - 1) { list[k] = list[k + 1] }
        n -= 1
        g.pointee.n_input = n
    }

    func onnxType(_ t: TargetType) -> Int32 { t.traits.onnxType }

    /// ONNX packs 4-bit values over the flattened tensor, element 0 in the low nibble.
    func flatPack4(_ rowPacked: [UInt8], shape: [Int]) -> [UInt8] {
        let q = Packing.unpack4(rowPacked, shape: shape)
        return Packing.pack4(q, shape: [q.count])
    }

    /// Whether the model's opset can express the scheme with DequantizeLinear: false when it can, true
    /// when the weight must be dequantized with Cast and Mul instead (`onnx_fallback: decompose`);
    /// throws when neither is possible. Checked before any tensor is quantized, and again when writing.
    static func dequantizeLinearForm(_ p: TensorPlan, scheme s: QuantScheme, opset: Int, path: String, name w: String)
        throws -> Bool
    {
        let needed = OnnxFeature.dequantize(s).reduce(.perTensorDequantize) {
            $1.minimumOpset >= $0.minimumOpset ? $1 : $0
        }
        let required = needed.minimumOpset
        let why = needed.what
        let floatOut = p.dtype
        let scaleInSourceType =
            (floatOut == .f16 || floatOut == .bf16) && OnnxFeature.float16ScaleDequantize.available(at: opset)
        if floatOut != .f32 && !scaleInSourceType && floatOut != .f16 && floatOut != .bf16 && floatOut != .f64 {
            throw QConvertError.usage(
                message: "\(path): tensor '\(w)' of \(floatOut.rawValue) cannot be dequantized in ONNX")
        }
        let decompose = opset < required
        if decompose {
            let cannot = s.granularity == .group || s.granularity == .element || s.target.isFP8
            if p.onnxFallback == .refuse || cannot {
                throw QConvertError.usage(
                    message:
                        "\(path): tensor '\(w)' needs \(why), which needs opset ≥ \(required), but the model imports opset \(opset); "
                        + (cannot
                            ? "choose granularity: channel or tensor and an integer dtype for this model (the opset is never raised)"
                            : "set 'onnx_fallback: decompose' to dequantize with Cast and Mul instead (the opset is never raised)")
                )
            }
        }
        return decompose
    }

    /// A cast the model's opset cannot express.
    static func checkCast(_ s: QuantScheme, opset: Int, path: String, name w: String) throws {
        if s.target == .bf16 && !OnnxFeature.bfloat16Cast.available(at: opset) {
            throw QConvertError.usage(
                message:
                    "\(path): tensor '\(w)': \(OnnxFeature.bfloat16Cast.what) needs opset ≥ \(OnnxFeature.bfloat16Cast.minimumOpset) but the model imports \(opset); cast to fp16 instead"
            )
        }
    }

    /// Returns the IR version the new tensors need (0 when none).
    func applyQuantize(
        _ p: TensorPlan, scheme s: QuantScheme, loc: OnnxModel.Located, values: [UInt8], scale: [UInt8],
        zeroPoint: [UInt8]?, opset: Int
    ) throws -> Int {
        let w = loc.graphName
        let shape = p.shape
        let rank = shape.count
        let is4 = s.target.isPacked4
        let decompose = try OnnxSink.dequantizeLinearForm(p, scheme: s, opset: opset, path: path, name: w)
        let floatOut = p.dtype
        let scaleInSourceType =
            (floatOut == .f16 || floatOut == .bf16) && OnnxFeature.float16ScaleDequantize.available(at: opset)
        // Stored integers.
        var qType = onnxType(s.target)
        var qBytes = values
        if is4 {
            if decompose {
                // Cast from int4 needs opset 21 too: store one value per byte instead.
                let nib = Packing.unpack4(values, shape: shape)
                qBytes = s.target.isSigned ? nib.map(Packing.signExtend4) : nib
                qType = s.target.widened.traits.onnxType
            } else {
                qBytes = flatPack4(values, shape: shape)
            }
        }
        let qName = model.uniqueName(w + "_quantized")
        let qTensor = qBytes.withUnsafeBytes { Proto.newTensor(name: qName, dataType: qType, dims: shape, raw: $0) }
        // Parameter shape by ONNX convention (or broadcastable for the decomposed form).
        var pDims: [Int]
        var attrs: [Proto.AttrP] = []
        switch s.granularity {
        case .tensor:
            pDims = decompose ? [] : []
        case .channel:
            if decompose {
                pDims = [Int](repeating: 1, count: rank)
                pDims[s.axis] = shape[s.axis]
            } else {
                pDims = [shape[s.axis]]
                attrs.append(Proto.intAttr("axis", s.axis))
            }
        case .group:
            let g = ParamLayout.groupAxis(rank: rank, channelAxis: s.axis)
            pDims = p.paramShape
            attrs.append(Proto.intAttr("axis", g))
            attrs.append(Proto.intAttr("block_size", s.groupSize))
        case .element:
            pDims = shape
            attrs.append(Proto.intAttr("axis", 0))
            attrs.append(Proto.intAttr("block_size", 1))
        }
        let scaleName = model.uniqueName(w + "_scale")
        var scaleBytes = scale
        var scaleType: Int32 = 1
        if scaleInSourceType && !decompose {
            let f = scale.withUnsafeBytes { Array($0.bindMemory(to: Float.self)) }
            scaleBytes = Dequantizer.encode(f, as: floatOut)
            scaleType = Proto.dataType(floatOut)
        }
        let scaleTensor = scaleBytes.withUnsafeBytes {
            Proto.newTensor(name: scaleName, dataType: scaleType, dims: pDims, raw: $0)
        }
        var newTensors = [qTensor, scaleTensor]
        var dqInputs = [qName, scaleName]
        var zpName: String? = nil
        if let zp = zeroPoint {
            let name = model.uniqueName(w + "_zero_point")
            var zb = zp
            var zType = qType
            if is4 && !decompose {
                zb = Packing.pack4(zp.map { $0 & 0x0F }, shape: [zp.count])
            } else if is4 {
                zb = s.target.isSigned ? zp.map(Packing.signExtend4) : zp
                zType = s.target.widened.traits.onnxType
            }
            newTensors.append(zb.withUnsafeBytes { Proto.newTensor(name: name, dataType: zType, dims: pDims, raw: $0) })
            dqInputs.append(name)
            zpName = name
        }
        var nodes: [Proto.NodeP] = []
        let needsCastBack = floatOut != .f32 && !scaleInSourceType
        let dqOut = needsCastBack ? model.uniqueName(w + "_dequantized") : w
        if decompose {
            let castQ = model.uniqueName(qName + "_float")
            nodes.append(
                Proto.newNode(
                    op: "Cast", name: model.uniqueName(w + "_Cast"), inputs: [qName], outputs: [castQ],
                    attributes: [Proto.intAttr("to", 1)]))
            var centred = castQ
            if let zn = zpName {
                let castZ = model.uniqueName(zn + "_float")
                nodes.append(
                    Proto.newNode(
                        op: "Cast", name: model.uniqueName(zn + "_Cast"), inputs: [zn], outputs: [castZ],
                        attributes: [Proto.intAttr("to", 1)]))
                centred = model.uniqueName(w + "_centred")
                nodes.append(
                    Proto.newNode(
                        op: "Sub", name: model.uniqueName(w + "_Sub"), inputs: [castQ, castZ], outputs: [centred]))
            }
            nodes.append(
                Proto.newNode(
                    op: "Mul", name: model.uniqueName(w + "_Mul"), inputs: [centred, scaleName], outputs: [dqOut]))
        } else {
            nodes.append(
                Proto.newNode(
                    op: "DequantizeLinear", name: model.uniqueName(w + "_DequantizeLinear"), inputs: dqInputs,
                    outputs: [dqOut], attributes: attrs))
        }
        if needsCastBack {
            nodes.append(
                Proto.newNode(
                    op: "Cast", name: model.uniqueName(w + "_CastBack"), inputs: [dqOut], outputs: [w],
                    attributes: [Proto.intAttr("to", Int(Proto.dataType(floatOut)))]))
        }
        replaceTensor(loc, with: newTensors, nodes: nodes)
        let packing: PackingRecord? =
            !is4
            ? nil
            : decompose
                ? PackingRecord(
                    bits: 4, signed: nil, axis: nil, flattened: nil, unpacked: true, order: nil,
                    note: "one value per byte (the model's opset has no 4-bit types)")
                : PackingRecord(
                    bits: 4, signed: s.target.isSigned, axis: nil, flattened: true, unpacked: nil,
                    order: "low_nibble_first",
                    note: "ONNX layout: two values per byte over the flattened tensor, element 0 in the low nibble")
        stored[p.name] = { r in
            r.values = qName
            r.scale = scaleName
            r.zeroPoint = zpName
            r.scaleShape = pDims
            if is4 { r.packing = packing }
        }
        if is4 && !decompose { return 10 }
        if s.target.isFP8 { return 9 }
        return 0
    }

    func applyCast(_ p: TensorPlan, scheme s: QuantScheme, loc: OnnxModel.Located, values: [UInt8], opset: Int) throws {
        let w = loc.graphName
        try OnnxSink.checkCast(s, opset: opset, path: path, name: w)
        let name = model.uniqueName(w + (s.target == .fp16 ? "_fp16" : "_bf16"))
        let t = values.withUnsafeBytes {
            Proto.newTensor(name: name, dataType: onnxType(s.target), dims: p.shape, raw: $0)
        }
        let cast = Proto.newNode(
            op: "Cast", name: model.uniqueName(w + "_Cast"), inputs: [name], outputs: [w],
            attributes: [Proto.intAttr("to", Int(Proto.dataType(p.dtype)))])
        replaceTensor(loc, with: [t], nodes: [cast])
        stored[p.name] = { r in r.values = name }
    }

    func setMetadata(_ metadata: [(key: String, value: String)]) {
        let m = model.model
        let existing = Set(OnnxReader.metadataProps(m).map(\.0))
        var list = m.pointee.metadata_props
        var n = m.pointee.n_metadata_props
        for (k, v) in metadata {
            if existing.contains(k) {
                for i in 0..<n where Proto.string(list?[i]?.pointee.key) == k {
                    free(list![i]!.pointee.value)
                    list![i]!.pointee.value = Proto.cstring(v)
                }
            } else {
                Proto.append(Proto.newEntry(k, v), to: &list, count: &n)
            }
        }
        m.pointee.metadata_props = list
        m.pointee.n_metadata_props = n
    }

    // MARK: - output

    /// Every tensor proto in the model (initializers, Constant values, subgraphs, functions).
    func allTensors() -> [Proto.TensorP] {
        var out: [Proto.TensorP] = []
        func node(_ n: Proto.NodeP) {
            for a in 0..<n.pointee.n_attribute {
                guard let attr = n.pointee.attribute[a] else { continue }
                if let t = attr.pointee.t { out.append(t) }
                for k in 0..<attr.pointee.n_tensors { if let t = attr.pointee.tensors[k] { out.append(t) } }
            }
        }
        model.forEachGraph { g in
            for i in 0..<g.pointee.n_initializer { if let t = g.pointee.initializer[i] { out.append(t) } }
            for i in 0..<g.pointee.n_node { if let n = g.pointee.node[i] { node(n) } }
        }
        model.forEachFunction { f in for i in 0..<f.pointee.n_node { if let n = f.pointee.node[i] { node(n) } } }
        return out
    }

    func isExternal(_ t: Proto.TensorP) -> Bool {
        t.pointee.has_data_location != 0 && t.pointee.data_location == ONNX__TENSOR_PROTO__DATA_LOCATION__EXTERNAL
    }

    func write() throws {
        let m = model.model
        let tensorsNow = allTensors()
        // Bytes of tensors that live in the input's external files, by tensor.
        var externalBytes: [Proto.TensorP: TensorBytes] = [:]
        let present = Set(tensorsNow)
        let entries = Dictionary(source.entries.map { ($0.name, $0.bytes) }, uniquingKeysWith: { a, _ in a })
        for (name, loc) in model.located where present.contains(loc.tensor) && isExternal(loc.tensor) {
            if let b = entries[name] { externalBytes[loc.tensor] = b }
        }
        let inlineSize = onnx__model_proto__get_packed_size(m) + externalBytes.values.reduce(0) { $0 + $1.count }
        let useExternal = options.externalData || inlineSize >= 1_900_000_000
        var dataFile: AtomicFile?
        let dataName = URL(fileURLWithPath: path).lastPathComponent + ".data"
        do {
            if useExternal {
                let df = try AtomicFile(
                    path: URL(fileURLWithPath: path).deletingLastPathComponent().appendingPathComponent(dataName).path)
                dataFile = df
                var offset = 0
                for t in tensorsNow {
                    let bytes: UnsafeRawBufferPointer
                    var holder: TensorBytes? = nil
                    if let e = externalBytes[t] {
                        holder = e
                        bytes = UnsafeRawBufferPointer(start: nil, count: 0)
                    } else if t.pointee.has_raw_data != 0 && t.pointee.raw_data.len >= 1024 {
                        bytes = UnsafeRawBufferPointer(start: t.pointee.raw_data.data, count: t.pointee.raw_data.len)
                    } else {
                        continue
                    }
                    offset = (offset + 4095) / 4096 * 4096
                    let len: Int
                    if let h = holder {
                        len = h.count
                        try h.withUnsafeBytes { try df.pwrite($0, at: offset) }
                        h.release()
                    } else {
                        len = bytes.count
                        try df.pwrite(bytes, at: offset)
                    }
                    setExternal(t, location: dataName, offset: offset, length: len)
                    offset += len
                }
            } else {
                for (t, b) in externalBytes {
                    clearExternal(t)
                    try b.withUnsafeBytes { t.pointee.raw_data = Proto.bytes($0) }
                    t.pointee.has_raw_data = 1
                }
            }
            let size = onnx__model_proto__get_packed_size(m)
            guard size < Int(Int32.max) else {
                throw QConvertError.write(path: path, message: "the model's graph alone exceeds 2 GB")
            }
            // Pack straight into the file (no second copy of the model in memory).
            let out = try AtomicFile(path: path)
            do {
                let sink = PackSink(file: out)
                let buffer = ProtobufCBuffer(append: { buf, len, data in
                    let box = UnsafeMutableRawPointer(buf!).assumingMemoryBound(to: PackBuffer.self)
                    Unmanaged<PackSink>.fromOpaque(box.pointee.sink).takeUnretainedValue().append(data, len)
                })
                var pb = PackBuffer(base: buffer, sink: Unmanaged.passUnretained(sink).toOpaque())
                let written = withExtendedLifetime(sink) {
                    withUnsafeMutablePointer(to: &pb) { p in
                        p.withMemoryRebound(to: ProtobufCBuffer.self, capacity: 1) {
                            onnx__model_proto__pack_to_buffer(m, $0)
                        }
                    }
                }
                _ = buffer
                sink.flush()
                if let e = sink.error { throw e }
                guard written == size, sink.offset == size else {
                    throw QConvertError.write(path: path, message: "protobuf packing failed")
                }
                try dataFile?.commit()
                try out.commit()
            } catch {
                out.abort()
                throw error
            }
        } catch {
            dataFile?.abort()
            throw error
        }
    }

    func clearExternal(_ t: Proto.TensorP) {
        for i in 0..<t.pointee.n_external_data {
            onnx__string_string_entry_proto__free_unpacked(t.pointee.external_data[i], nil)
        }
        free(t.pointee.external_data)
        t.pointee.external_data = nil
        t.pointee.n_external_data = 0
        t.pointee.has_data_location = 0
        t.pointee.data_location = ONNX__TENSOR_PROTO__DATA_LOCATION__DEFAULT
    }

    func setExternal(_ t: Proto.TensorP, location: String, offset: Int, length: Int) {
        clearExternal(t)
        if t.pointee.has_raw_data != 0 { model.dropPayload(t) }
        var list = t.pointee.external_data
        var n = 0
        for (k, v) in [("location", location), ("offset", String(offset)), ("length", String(length))] {
            Proto.append(Proto.newEntry(k, v), to: &list, count: &n)
        }
        t.pointee.external_data = list
        t.pointee.n_external_data = n
        t.pointee.has_data_location = 1
        t.pointee.data_location = ONNX__TENSOR_PROTO__DATA_LOCATION__EXTERNAL
    }
}

/// protobuf-c's output buffer: the C struct first, then our context.
struct PackBuffer {
    var base: ProtobufCBuffer
    var sink: UnsafeMutableRawPointer
}

/// Receives packed bytes in order and writes them to the output file.
final class PackSink {
    let file: AtomicFile
    var offset = 0
    var error: Error?
    var pending: [UInt8] = []

    init(file: AtomicFile) {
        self.file = file
        pending.reserveCapacity(1 << 20)
    }

    func append(_ data: UnsafePointer<UInt8>?, _ len: Int) {
        guard error == nil, let data, len > 0 else { return }
        // Small appends are gathered; large payloads go straight to the file.
        if pending.count + len > 1 << 20 { flush() }
        if len >= 1 << 20 {
            do { try file.pwrite(UnsafeRawBufferPointer(start: data, count: len), at: offset) } catch {
                self.error = error
            }
            offset += len
        } else {
            pending.append(contentsOf: UnsafeBufferPointer(start: data, count: len))
        }
        if pending.count >= 1 << 20 { flush() }
    }

    func flush() {
        guard !pending.isEmpty else { return }
        do { try file.pwrite(pending, at: offset) } catch { self.error = error }
        offset += pending.count
        pending.removeAll(keepingCapacity: true)
    }
}
