/// A pass over the protobuf wire bytes before protobuf-c unpacks them: protobuf-c recurses
/// into nested graphs and types without a depth limit, so a crafted model could exhaust the
/// stack. This walks the recursive paths of the schema, checks every length against its
/// enclosing message, and refuses nesting deeper than `maxDepth`.
struct OnnxWireCheck {
    enum Kind { case model, graph, node, attribute, function, training, valueInfo, type, typeInner, tensor }

    static let maxDepth = 64
    /// Byte ranges of large payload fields inside tensors, in file order.
    var largePayloads: [(offset: Int, length: Int)] = []

    /// Which fields of which message lead to which nested message kind.
    static func child(_ k: Kind, _ field: UInt64) -> Kind? {
        switch (k, field) {
        case (.model, 7): return .graph
        case (.model, 20): return .training
        case (.model, 25): return .function
        case (.training, 1), (.training, 2): return .graph
        case (.graph, 1): return .node
        case (.graph, 5): return .tensor
        case (.graph, 11), (.graph, 12), (.graph, 13): return .valueInfo
        case (.function, 7): return .node
        case (.function, 11): return .attribute
        case (.function, 12): return .valueInfo
        case (.node, 5): return .attribute
        case (.attribute, 5), (.attribute, 10): return .tensor
        case (.attribute, 6), (.attribute, 11): return .graph
        case (.attribute, 14), (.attribute, 15): return .type
        case (.valueInfo, 2): return .type
        case (.type, 4), (.type, 5), (.type, 9): return .typeInner  // Sequence, Map, Optional
        case (.typeInner, 1), (.typeInner, 2): return .type
        default: return nil
        }
    }

    static func check(_ bytes: UnsafeRawBufferPointer) throws -> OnnxWireCheck {
        var c = OnnxWireCheck()
        try c.scan(bytes, 0, bytes.count, .model, depth: 0)
        return c
    }

    mutating func scan(_ b: UnsafeRawBufferPointer, _ start: Int, _ end: Int, _ kind: Kind, depth: Int) throws {
        guard depth <= OnnxWireCheck.maxDepth else {
            throw OnnxWireRule.tooDeep(limit: OnnxWireCheck.maxDepth)
        }
        var pos = start
        func varint() throws -> UInt64 {
            var v: UInt64 = 0
            var shift: UInt64 = 0
            while true {
                guard pos < end else { throw OnnxWireRule.truncatedVarint(at: pos) }
                let c = b[pos]
                pos += 1
                v |= UInt64(c & 0x7F) << shift
                if c & 0x80 == 0 { return v }
                shift += 7
                guard shift < 64 else { throw OnnxWireRule.overlongVarint(at: pos) }
            }
        }
        while pos < end {
            let tag = try varint()
            let field = tag >> 3
            guard field != 0 else { throw OnnxWireRule.fieldZero(at: pos) }
            switch tag & 7 {
            case 0: _ = try varint()
            case 1: pos += 8
            case 5: pos += 4
            case 2:
                let len = try varint()
                guard len <= UInt64(end - pos) else {
                    throw OnnxWireRule.fieldPastEnd(length: len, at: pos)
                }
                let l = Int(len)
                if kind != .tensor, let c = OnnxWireCheck.child(kind, field) {
                    try scan(b, pos, pos + l, c, depth: depth + 1)
                } else if kind == .tensor && l >= 1 << 20 {
                    largePayloads.append((pos, l))
                }
                pos += l
            default:
                throw OnnxWireRule.badWireType(Int(tag & 7), at: pos)
            }
            guard pos <= end else { throw OnnxWireRule.fieldPastEnd(length: nil, at: pos) }
        }
    }
}

/// The protobuf wire rules an ONNX file can break (checked before protobuf-c decodes it).
public enum OnnxWireRule: FormatViolation, Equatable {
    case tooDeep(limit: Int)
    case truncatedVarint(at: Int)
    case overlongVarint(at: Int)
    case fieldZero(at: Int)
    case fieldPastEnd(length: UInt64?, at: Int)
    case badWireType(Int, at: Int)
    case undecodable
    case tooLarge

    public var description: String {
        let prefix = "not a valid ONNX model: "
        return switch self {
        case .tooDeep(let n): prefix + "nesting deeper than \(n) levels (subgraphs or types)"
        case .truncatedVarint(let p): prefix + "truncated protobuf (varint runs past the end at byte \(p))"
        case .overlongVarint(let p): prefix + "corrupt protobuf (overlong varint at byte \(p))"
        case .fieldZero(let p): prefix + "corrupt protobuf (field number 0 at byte \(p))"
        case .fieldPastEnd(let n?, let p):
            prefix + "truncated protobuf (a field of \(n) bytes runs past the end at byte \(p))"
        case .fieldPastEnd(nil, _): prefix + "truncated protobuf (field runs past the end)"
        case .badWireType(let t, let p): prefix + "corrupt protobuf (wire type \(t) at byte \(p))"
        case .undecodable: "not a valid ONNX model (protobuf could not be decoded)"
        case .tooLarge: "a protobuf model over 2 GB cannot be read; such models keep their weights in external data"
        }
    }
}
