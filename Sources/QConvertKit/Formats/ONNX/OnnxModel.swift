import COnnxProto
import Foundation

/// An unpacked ONNX model and where each of its tensors lives, shared by the reader and the writer.
public final class OnnxModel: @unchecked Sendable {
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
        if byGraphName == nil { byGraphName = Dictionary(located.values.map { ($0.graphName, $0) }, uniquingKeysWith: { a, _ in a }) }
        return byGraphName?[name]
    }
    /// Value name → (op type, input index, node) of every consumer, across all graphs and functions.
    var consumers: [String: [(op: String, index: Int, node: Proto.NodeP)]] = [:]
    /// Every name used anywhere (values, initializers, nodes), to keep new names unique.
    var usedNames = Set<String>()
    /// The writer edits the model in place (and frees replaced payloads): one output per reading.
    var written = false

    init(model: UnsafeMutablePointer<Onnx__ModelProto>, path: String) {
        self.model = model
        self.path = path
        folder = URL(fileURLWithPath: path).deletingLastPathComponent().path
    }

    deinit { onnx__model_proto__free_unpacked(model, nil) }

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

    func forEachFunction(_ body: (UnsafeMutablePointer<Onnx__FunctionProto>) throws -> Void) rethrows {
        for i in 0..<model.pointee.n_functions { if let f = model.pointee.functions[i] { try body(f) } }
    }
}
