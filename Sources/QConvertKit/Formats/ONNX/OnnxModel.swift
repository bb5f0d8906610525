import COnnxProto
import Foundation

/// An unpacked ONNX model and where each of its tensors lives, shared by the reader and the writer.
public final class OnnxModel: CheckpointContainer, @unchecked Sendable {
    let model: UnsafeMutablePointer<Onnx__ModelProto>
    public let path: String
    let folder: String
    /// External data files opened so far, by resolved path.
    var externalFiles: [String: MappedFile] = [:]

    /// Where a tensor lives: an initializer of a graph, or the `value` of a Constant node.
    enum Home {
        case initializer(graph: Proto.GraphP)
        case constant(node: Proto.NodeP, graph: Proto.GraphP?, function: UnsafeMutablePointer<Onnx__FunctionProto>?)
    }

    struct Located {
        var tensor: Proto.TensorP
        var home: Home
        /// The name the graph knows it by (initializer name or Constant output).
        var graphName: String
    }

    /// Entry name → location.
    var located: [String: Located] = [:] { didSet { byGraphName = nil } }
    private var byGraphName: [String: Located]?

    /// The nodes of the main graph (not of subgraphs or functions), as read.
    lazy var mainNodes: Set<Proto.NodeP> = {
        guard let g = model.pointee.graph else { return [] }
        return Set((0..<g.pointee.n_node).compactMap { g.pointee.node[$0] })
    }()

    /// Ranks of the main graph's values where they are known (computed once, before any edit).
    lazy var ranks: [String: Int] = OnnxRanks.infer(self)

    /// The tensor a graph knows by `name` (an initializer or a Constant's output).
    func located(graphName name: String) -> Located? {
        if byGraphName == nil {
            byGraphName = Dictionary(located.values.map { ($0.graphName, $0) }, uniquingKeysWith: { a, _ in a })
        }
        return byGraphName?[name]
    }
    /// Value name → (op type, input index, node) of every consumer, across all graphs and functions.
    var consumers: [String: [(op: String, index: Int, node: Proto.NodeP)]] = [:]
    /// Every name used anywhere (values, initializers, nodes), to keep new names unique.
    var usedNames = Set<String>()
    /// Tensors of an editable copy whose raw_data is the read model's memory (kept weights): never
    /// freed here, detached before the copy is freed.
    private var borrowed = Set<Proto.TensorP>()
    /// The model an editable copy borrows from, alive as long as the copy.
    private var lender: OnnxModel?
    private let copyLock = NSLock()

    init(model: UnsafeMutablePointer<Onnx__ModelProto>, path: String) {
        self.model = model
        self.path = path
        folder = URL(fileURLWithPath: path).deletingLastPathComponent().path
    }

    deinit {
        for t in borrowed { t.pointee.raw_data = ProtobufCBinaryData(len: 0, data: nil) }
        onnx__model_proto__free_unpacked(model, nil)
    }

    /// A copy of the model for a writer to edit; this one stays as it was read, so its checkpoint can
    /// be converted again. Tensors named in `replaced` have no payload in the copy (the writer puts its
    /// own); every other raw payload is borrowed from this model, not copied.
    func editableCopy(replacing replaced: Set<String>) throws -> OnnxModel {
        copyLock.lock()
        defer { copyLock.unlock() }
        // The structure is packed without the raw payloads (a few kB for a model of any size): they are
        // set aside for the packing and put back before anything else can see this model.
        var setAside: [(Proto.TensorP, ProtobufCBinaryData)] = []
        for loc in located.values where loc.tensor.pointee.has_raw_data != 0 && loc.tensor.pointee.raw_data.len > 0 {
            setAside.append((loc.tensor, loc.tensor.pointee.raw_data))
            loc.tensor.pointee.raw_data = ProtobufCBinaryData(len: 0, data: nil)
        }
        let size = onnx__model_proto__get_packed_size(model)
        var structure = [UInt8](repeating: 0, count: size)
        let packed = onnx__model_proto__pack(model, &structure)
        for (t, d) in setAside { t.pointee.raw_data = d }
        guard packed == size, let m = onnx__model_proto__unpack(nil, size, structure) else {
            throw QConvertError.internal(message: "\(path): the model's structure could not be copied")
        }
        let copy = OnnxModel(model: m, path: path)
        copy.externalFiles = externalFiles
        try copy.index { _, _, _, _ in }
        copy.lender = self
        for (name, loc) in copy.located where !replaced.contains(name) {
            guard let mine = located[name], mine.tensor.pointee.has_raw_data != 0, mine.tensor.pointee.raw_data.len > 0
            else { continue }
            loc.tensor.pointee.raw_data = mine.tensor.pointee.raw_data
            copy.borrowed.insert(loc.tensor)
        }
        return copy
    }

    /// Frees the raw payload of the tensor an entry names, for a conversion that reads each entry once
    /// and is done with it (`Checkpoint.consume`); the model's editable copies never borrow it.
    public func releasePayload(entry name: String) {
        copyLock.lock()
        defer { copyLock.unlock() }
        guard let t = located[name]?.tensor, t.pointee.has_raw_data != 0, t.pointee.raw_data.len > 0 else { return }
        Foundation.free(t.pointee.raw_data.data)
        t.pointee.raw_data = ProtobufCBinaryData(len: 0, data: nil)
    }

    /// Frees a tensor of this model; a borrowed payload is detached first (it is not this model's).
    func free(tensor t: Proto.TensorP) {
        if borrowed.remove(t) != nil { t.pointee.raw_data = ProtobufCBinaryData(len: 0, data: nil) }
        onnx__tensor_proto__free_unpacked(t, nil)
    }

    /// Drops a tensor's raw payload (it moves to external data): freed when this model's, detached when borrowed.
    func dropPayload(_ t: Proto.TensorP) {
        if borrowed.remove(t) == nil { Foundation.free(t.pointee.raw_data.data) }
        t.pointee.raw_data = ProtobufCBinaryData(len: 0, data: nil)
        t.pointee.has_raw_data = 0
    }

    /// Frees a node taken out of the graph, detaching any borrowed payload its attributes hold.
    func free(node n: Proto.NodeP) {
        for a in 0..<n.pointee.n_attribute {
            guard let attr = n.pointee.attribute[a] else { continue }
            if let t = attr.pointee.t, borrowed.remove(t) != nil {
                t.pointee.raw_data = ProtobufCBinaryData(len: 0, data: nil)
            }
            for k in 0..<attr.pointee.n_tensors {
                if let t = attr.pointee.tensors[k], borrowed.remove(t) != nil {
                    t.pointee.raw_data = ProtobufCBinaryData(len: 0, data: nil)
                }
            }
        }
        onnx__node_proto__free_unpacked(n, nil)
    }

    /// The ai.onnx opset the model imports (0 when none).
    var opset: Int {
        for i in 0..<model.pointee.n_opset_import {
            guard let o = model.pointee.opset_import[i] else { continue }
            let d = Proto.string(o.pointee.domain)
            if d.isEmpty || d == "ai.onnx" { return Int(o.pointee.version) }
        }
        return 0
    }

    func uniqueName(_ base: String) -> String {
        var n = base
        var k = 1
        while usedNames.contains(n) {
            n = "\(base)_\(k)"
            k += 1
        }
        usedNames.insert(n)
        return n
    }

    /// Visits every graph (main, subgraphs at any depth, training graphs) and every function.
    func forEachGraph(_ body: (Proto.GraphP) throws -> Void) rethrows {
        func walk(_ g: Proto.GraphP) throws {
            try body(g)
            for i in 0..<g.pointee.n_node {
                guard let n = g.pointee.node[i] else { continue }
                try walkNode(n)
            }
        }
        func walkNode(_ n: Proto.NodeP) throws {
            for a in 0..<n.pointee.n_attribute {
                guard let attr = n.pointee.attribute[a] else { continue }
                if let sg = attr.pointee.g { try walk(sg) }
                for k in 0..<attr.pointee.n_graphs { if let sg = attr.pointee.graphs[k] { try walk(sg) } }
            }
        }
        if let g = model.pointee.graph { try walk(g) }
        for i in 0..<model.pointee.n_training_info {
            guard let t = model.pointee.training_info[i] else { continue }
            if let g = t.pointee.initialization { try walk(g) }
            if let g = t.pointee.algorithm { try walk(g) }
        }
        for i in 0..<model.pointee.n_functions {
            guard let f = model.pointee.functions[i] else { continue }
            for k in 0..<f.pointee.n_node { if let n = f.pointee.node[k] { try walkNode(n) } }
        }
    }

    /// Finds every tensor of a known element type (initializers of every graph, Constant values, in
    /// subgraphs and function bodies too), names it uniquely (repeated names get #2, #3, ...), and
    /// records where it lives, every name in use and every value's consumers. `visit` sees each tensor
    /// as it is named; the same model always gives the same names.
    func index(_ visit: (Proto.TensorP, DType, _ name: String, _ graphName: String) throws -> Void) throws {
        var names = Set<String>()
        var nextSuffix: [String: Int] = [:]
        func register(_ t: Proto.TensorP, graphName: String, home: Home) throws {
            // strings and exotic types stay as they are
            guard t.pointee.has_data_type != 0, let dtype = Proto.dtype(t.pointee.data_type) else { return }
            var name = graphName
            // Repeated names (across subgraphs, or a hostile file's thousands of copies): the next
            // suffix to try is remembered per name, so this stays linear.
            var k = nextSuffix[graphName] ?? 2
            while names.contains(name) {
                name = "\(graphName)#\(k)"
                k += 1
            }
            if name != graphName { nextSuffix[graphName] = k }
            names.insert(name)
            try visit(t, dtype, name, graphName)
            located[name] = Located(tensor: t, home: home, graphName: graphName)
        }
        func visitNode(_ n: Proto.NodeP, graph: Proto.GraphP?, function: UnsafeMutablePointer<Onnx__FunctionProto>?)
            throws
        {
            let op = Proto.string(n.pointee.op_type)
            usedNames.insert(Proto.string(n.pointee.name))
            let inputs = Proto.strings(n.pointee.input, n.pointee.n_input)
            let outputs = Proto.strings(n.pointee.output, n.pointee.n_output)
            for o in outputs { usedNames.insert(o) }
            for (k, i) in inputs.enumerated() where !i.isEmpty { consumers[i, default: []].append((op, k, n)) }
            let domain = Proto.string(n.pointee.domain)
            if op == "Constant", domain.isEmpty || domain == "ai.onnx", let out = outputs.first,
                let a = Proto.attribute(n, "value"), let t = a.pointee.t
            {
                try register(t, graphName: out, home: .constant(node: n, graph: graph, function: function))
            }
        }
        try forEachGraph { g in
            for i in 0..<g.pointee.n_initializer {
                guard let t = g.pointee.initializer[i] else { continue }
                let n = Proto.string(t.pointee.name)
                usedNames.insert(n)
                try register(t, graphName: n, home: .initializer(graph: g))
            }
            for i in 0..<g.pointee.n_input {
                if let v = g.pointee.input[i] { usedNames.insert(Proto.string(v.pointee.name)) }
            }
            for i in 0..<g.pointee.n_output {
                if let v = g.pointee.output[i] { usedNames.insert(Proto.string(v.pointee.name)) }
            }
            for i in 0..<g.pointee.n_node {
                guard let n = g.pointee.node[i] else { continue }
                try visitNode(n, graph: g, function: nil)
            }
        }
        try forEachFunction { f in
            for i in 0..<f.pointee.n_node {
                guard let n = f.pointee.node[i] else { continue }
                try visitNode(n, graph: nil, function: f)
            }
        }
    }

    func forEachFunction(_ body: (UnsafeMutablePointer<Onnx__FunctionProto>) throws -> Void) rethrows {
        for i in 0..<model.pointee.n_functions { if let f = model.pointee.functions[i] { try body(f) } }
    }
}
