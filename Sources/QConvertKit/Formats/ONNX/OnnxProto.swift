import COnnxProto
import Foundation

#if canImport(Glibc)
    import Glibc
#endif

/// Small helpers over the protobuf-c structs generated from Schemas/onnx.proto.
///
/// Memory rule: everything attached to a message is allocated with malloc/calloc/strdup, so that
/// `onnx__model_proto__free_unpacked` frees the edited model exactly as it frees an unpacked one.
enum Proto {
    typealias TensorP = UnsafeMutablePointer<Onnx__TensorProto>
    typealias NodeP = UnsafeMutablePointer<Onnx__NodeProto>
    typealias GraphP = UnsafeMutablePointer<Onnx__GraphProto>
    typealias AttrP = UnsafeMutablePointer<Onnx__AttributeProto>
    typealias EntryP = UnsafeMutablePointer<Onnx__StringStringEntryProto>

    static func string(_ p: UnsafeMutablePointer<CChar>?) -> String { p.map { String(cString: $0) } ?? "" }
    static func cstring(_ s: String) -> UnsafeMutablePointer<CChar> { strdup(s)! }

    static func strings(_ p: UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>?, _ n: Int) -> [String] {
        guard let p else { return [] }
        return (0..<n).map { string(p[$0]) }
    }

    /// A malloc'd array of `items` (nil when empty).
    static func array<T>(_ items: [T]) -> UnsafeMutablePointer<T>? {
        guard !items.isEmpty else { return nil }
        let p = malloc(MemoryLayout<T>.stride * items.count)!.bindMemory(to: T.self, capacity: items.count)
        for (i, v) in items.enumerated() { (p + i).initialize(to: v) }
        return p
    }

    static func stringArray(_ items: [String]) -> UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>? {
        array(items.map { Optional(cstring($0)) })
    }

    /// Appends to a repeated message field held as (count, pointer).
    static func append<T>(
        _ item: UnsafeMutablePointer<T>, to list: inout UnsafeMutablePointer<UnsafeMutablePointer<T>?>?,
        count: inout Int
    ) {
        let p = realloc(list, MemoryLayout<UnsafeMutablePointer<T>?>.stride * (count + 1))!
            .bindMemory(to: UnsafeMutablePointer<T>?.self, capacity: count + 1)
        p[count] = item
        list = p
        count += 1
    }

    /// Inserts into a repeated message field at `index`.
    static func insert<T>(
        _ item: UnsafeMutablePointer<T>, at index: Int,
        into list: inout UnsafeMutablePointer<UnsafeMutablePointer<T>?>?, count: inout Int
    ) {
        append(item, to: &list, count: &count)
        let p = list!
        var k = count - 1
        while k > index {
            p[k] = p[k - 1]
            k -= 1
        }
        p[index] = item
    }

    static func bytes(_ b: UnsafeRawBufferPointer) -> ProtobufCBinaryData {
        guard b.count > 0 else { return ProtobufCBinaryData(len: 0, data: nil) }
        let p = malloc(b.count)!
        memcpy(p, b.baseAddress!, b.count)
        return ProtobufCBinaryData(len: b.count, data: p.assumingMemoryBound(to: UInt8.self))
    }

    static func newTensor(name: String, dataType: Int32, dims: [Int], raw: UnsafeRawBufferPointer) -> TensorP {
        let t = calloc(1, MemoryLayout<Onnx__TensorProto>.stride)!.bindMemory(to: Onnx__TensorProto.self, capacity: 1)
        onnx__tensor_proto__init(t)
        t.pointee.name = cstring(name)
        t.pointee.has_data_type = 1
        t.pointee.data_type = dataType
        t.pointee.n_dims = dims.count
        t.pointee.dims = array(dims.map(Int64.init))
        t.pointee.has_raw_data = 1
        t.pointee.raw_data = bytes(raw)
        return t
    }

    static func newAttr(_ name: String) -> AttrP {
        let a = calloc(1, MemoryLayout<Onnx__AttributeProto>.stride)!.bindMemory(
            to: Onnx__AttributeProto.self, capacity: 1)
        onnx__attribute_proto__init(a)
        a.pointee.name = cstring(name)
        a.pointee.has_type = 1
        return a
    }

    static func intAttr(_ name: String, _ v: Int) -> AttrP {
        let a = newAttr(name)
        a.pointee.type = ONNX__ATTRIBUTE_PROTO__ATTRIBUTE_TYPE__INT
        a.pointee.has_i = 1
        a.pointee.i = Int64(v)
        return a
    }

    static func tensorAttr(_ name: String, _ t: TensorP) -> AttrP {
        let a = newAttr(name)
        a.pointee.type = ONNX__ATTRIBUTE_PROTO__ATTRIBUTE_TYPE__TENSOR
        a.pointee.t = t
        return a
    }

    static func newNode(op: String, name: String, inputs: [String], outputs: [String], attributes: [AttrP] = [])
        -> NodeP
    {
        let n = calloc(1, MemoryLayout<Onnx__NodeProto>.stride)!.bindMemory(to: Onnx__NodeProto.self, capacity: 1)
        onnx__node_proto__init(n)
        n.pointee.op_type = cstring(op)
        n.pointee.name = cstring(name)
        n.pointee.n_input = inputs.count
        n.pointee.input = stringArray(inputs)
        n.pointee.n_output = outputs.count
        n.pointee.output = stringArray(outputs)
        n.pointee.n_attribute = attributes.count
        n.pointee.attribute = array(attributes.map { Optional($0) })
        return n
    }

    static func newEntry(_ key: String, _ value: String) -> EntryP {
        let e = calloc(1, MemoryLayout<Onnx__StringStringEntryProto>.stride)!.bindMemory(
            to: Onnx__StringStringEntryProto.self, capacity: 1)
        onnx__string_string_entry_proto__init(e)
        e.pointee.key = cstring(key)
        e.pointee.value = cstring(value)
        return e
    }

    /// A graph input/value description of a tensor: elem type and fixed dims.
    static func newValueInfo(name: String, dataType: Int32, dims: [Int]) -> UnsafeMutablePointer<Onnx__ValueInfoProto> {
        let v = calloc(1, MemoryLayout<Onnx__ValueInfoProto>.stride)!.bindMemory(
            to: Onnx__ValueInfoProto.self, capacity: 1)
        onnx__value_info_proto__init(v)
        v.pointee.name = cstring(name)
        let type = calloc(1, MemoryLayout<Onnx__TypeProto>.stride)!.bindMemory(to: Onnx__TypeProto.self, capacity: 1)
        onnx__type_proto__init(type)
        let tt = calloc(1, MemoryLayout<Onnx__TypeProto__Tensor>.stride)!.bindMemory(
            to: Onnx__TypeProto__Tensor.self, capacity: 1)
        onnx__type_proto__tensor__init(tt)
        tt.pointee.has_elem_type = 1
        tt.pointee.elem_type = dataType
        let shape = calloc(1, MemoryLayout<Onnx__TensorShapeProto>.stride)!.bindMemory(
            to: Onnx__TensorShapeProto.self, capacity: 1)
        onnx__tensor_shape_proto__init(shape)
        var list: UnsafeMutablePointer<UnsafeMutablePointer<Onnx__TensorShapeProto__Dimension>?>? = nil
        var n = 0
        for d in dims {
            let dim = calloc(1, MemoryLayout<Onnx__TensorShapeProto__Dimension>.stride)!.bindMemory(
                to: Onnx__TensorShapeProto__Dimension.self, capacity: 1)
            onnx__tensor_shape_proto__dimension__init(dim)
            dim.pointee.value_case = ONNX__TENSOR_SHAPE_PROTO__DIMENSION__VALUE_DIM_VALUE
            dim.pointee.dim_value = Int64(d)
            append(dim, to: &list, count: &n)
        }
        shape.pointee.dim = list
        shape.pointee.n_dim = n
        tt.pointee.shape = shape
        type.pointee.value_case = ONNX__TYPE_PROTO__VALUE_TENSOR_TYPE
        type.pointee.tensor_type = tt
        v.pointee.type = type
        return v
    }

    static func attribute(_ node: NodeP, _ name: String) -> AttrP? {
        for i in 0..<node.pointee.n_attribute {
            if let a = node.pointee.attribute[i], string(a.pointee.name) == name { return a }
        }
        return nil
    }

    static func intAttribute(_ node: NodeP, _ name: String) -> Int? {
        guard let a = attribute(node, name),
            a.pointee.has_i != 0 || a.pointee.type == ONNX__ATTRIBUTE_PROTO__ATTRIBUTE_TYPE__INT
        else {
            return nil
        }
        return Int(a.pointee.i)
    }

    /// Replaces a node string (input/output name) in place.
    static func setString(_ list: UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>, _ i: Int, _ s: String) {
        free(list[i])
        list[i] = cstring(s)
    }

    /// ONNX data type ↔ dtype.
    static func dtype(_ t: Int32) -> DType? {
        switch t {
        case 1: return .f32
        case 2: return .u8
        case 3: return .i8
        case 4: return .u16
        case 5: return .i16
        case 6: return .i32
        case 7: return .i64
        case 9: return .bool
        case 10: return .f16
        case 11: return .f64
        case 12: return .u32
        case 13: return .u64
        case 14: return .c64
        case 15: return .c128
        case 16: return .bf16
        case 17: return .f8e4m3
        case 19: return .f8e5m2
        case 21: return .uint4
        case 22: return .int4
        default: return nil
        }
    }

    static func dataType(_ d: DType) -> Int32 {
        switch d {
        case .f32: return 1
        case .u8: return 2
        case .i8: return 3
        case .u16: return 4
        case .i16: return 5
        case .i32: return 6
        case .i64: return 7
        case .bool: return 9
        case .f16: return 10
        case .f64: return 11
        case .u32: return 12
        case .u64: return 13
        case .c64: return 14
        case .c128: return 15
        case .bf16: return 16
        case .f8e4m3: return 17
        case .f8e5m2: return 19
        case .uint4: return 21
        case .int4: return 22
        }
    }
}
