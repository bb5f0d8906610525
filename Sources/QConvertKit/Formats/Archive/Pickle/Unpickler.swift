import Foundation

/// A restricted pickle machine: it never runs code and never imports anything. Opcodes of
/// protocols 2 to 5 build plain values; GLOBAL may name only what torch's weights-only loader
/// allows; REDUCE, BUILD and NEWOBJ produce typed values for the few callables checkpoints use.
struct Unpickler {
    struct Failure: Error { let message: String }

    let data: UnsafeRawBufferPointer
    var pos = 0
    var stack: [PickleValue] = []
    var marks: [Int] = []
    var memo: [Int: PickleValue] = [:]
    /// Turns a persistent id (a tuple) into a storage.
    let persistentLoad: (PickleValue) throws -> PickleValue

    static let maxStack = 1 << 22
    static let maxMemo = 1 << 22

    init(_ data: UnsafeRawBufferPointer, persistentLoad: @escaping (PickleValue) throws -> PickleValue) {
        self.data = data
        self.persistentLoad = persistentLoad
    }

    func fail(_ m: String) -> Failure { Failure(message: m) }

    mutating func byte() throws -> UInt8 {
        guard pos < data.count else { throw fail("pickle ends early (truncated?)") }
        pos += 1
        return data[pos - 1]
    }

    mutating func take(_ n: Int) throws -> UnsafeRawBufferPointer {
        guard n >= 0, n <= data.count - pos else { throw fail("pickle field of \(n) bytes runs past the end") }
        defer { pos += n }
        return UnsafeRawBufferPointer(rebasing: data[pos..<(pos + n)])
    }

    mutating func uint(_ n: Int) throws -> UInt64 {
        let b = try take(n)
        var v: UInt64 = 0
        for k in (0..<n).reversed() { v = v << 8 | UInt64(b[k]) }
        return v
    }

    mutating func line() throws -> String {
        guard let nl = data[pos...].firstIndex(of: 0x0A) else { throw fail("unterminated text field") }
        let s = String(decoding: UnsafeRawBufferPointer(rebasing: data[pos..<nl]), as: UTF8.self)
        pos = nl + 1
        return s
    }

    mutating func pop() throws -> PickleValue {
        guard let v = stack.popLast() else { throw fail("stack underflow") }
        if case .mark = v { throw fail("unexpected MARK") }
        return v
    }

    mutating func popMark() throws -> [PickleValue] {
        guard let m = marks.popLast(), m <= stack.count else { throw fail("no MARK to pop to") }
        let items = Array(stack[m...])
        stack.removeSubrange(m...)
        return items
    }

    mutating func push(_ v: PickleValue) throws {
        guard stack.count < Unpickler.maxStack else { throw fail("pickle stack grows past \(Unpickler.maxStack)") }
        stack.append(v)
    }

    mutating func memoize(_ k: Int) throws {
        guard let top = stack.last else { throw fail("memoize on an empty stack") }
        guard memo.count < Unpickler.maxMemo else { throw fail("pickle memo grows past \(Unpickler.maxMemo)") }
        memo[k] = top
    }

    mutating func load() throws -> PickleValue {
        while true {
            let op = try byte()
            switch op {
            case 0x80: let p = try byte(); guard p >= 2 && p <= 5 else { throw fail("pickle protocol \(p) is not supported") }
            case 0x95:   // FRAME: only a length hint; it must stay inside the data
                let n = try uint(8)
                guard n <= UInt64(data.count - pos) else { throw fail("FRAME of \(n) bytes runs past the end") }
            case UInt8(ascii: "."): return try pop()
            case UInt8(ascii: "("): marks.append(stack.count)
            case UInt8(ascii: "0"): _ = try pop()
            case UInt8(ascii: "1"): _ = try popMark()
            case UInt8(ascii: "2"): guard let t = stack.last else { throw fail("DUP on an empty stack") }; try push(t)
            case UInt8(ascii: "N"): try push(.none)
            case 0x88: try push(.bool(true))
            case 0x89: try push(.bool(false))
            case UInt8(ascii: "I"):
                let s = try line()
                if s == "01" { try push(.bool(true)) } else if s == "00" { try push(.bool(false)) }
                else { guard let v = Int(s) else { throw fail("bad INT '\(s)'") }; try push(.int(v)) }
            case UInt8(ascii: "J"): try push(.int(Int(Int32(truncatingIfNeeded: try uint(4)))))
            case UInt8(ascii: "K"): try push(.int(Int(try byte())))
            case UInt8(ascii: "M"): try push(.int(Int(try uint(2))))
            case 0x8a, 0x8b:
                let n = op == 0x8a ? Int(try byte()) : Int(try uint(4))
                guard n <= 64 else { throw fail("integer of \(n) bytes is too large") }
                let b = try take(n)
                if n > 8 { try push(.bigInt(Array(b))); continue }
                var v: Int64 = 0
                for k in (0..<n).reversed() { v = v << 8 | Int64(b[k]) }
                if n > 0 && n < 8 && b[n - 1] & 0x80 != 0 { v -= Int64(1) << (8 * Int64(n)) }
                try push(.int(Int(v)))
            case UInt8(ascii: "L"):
                var s = try line()
                if s.hasSuffix("L") { s.removeLast() }
                guard let v = Int(s) else { throw fail("bad LONG '\(s)'") }
                try push(.int(v))
            case UInt8(ascii: "G"): try push(.float(Double(bitPattern: try (0..<8).reduce(UInt64(0)) { acc, _ in acc << 8 | UInt64(try byte()) })))
            case UInt8(ascii: "F"): guard let v = Double(try line()) else { throw fail("bad FLOAT") }; try push(.float(v))
            case UInt8(ascii: "X"), 0x8c, 0x8d:
                let n = op == 0x8c ? Int(try byte()) : op == 0x8d ? Int(try uint(8)) : Int(try uint(4))
                guard let s = String(validating: try take(n), as: UTF8.self) else { throw fail("string is not UTF-8") }
                try push(.string(s))
            case UInt8(ascii: "T"), UInt8(ascii: "U"):
                let n = op == UInt8(ascii: "U") ? Int(try byte()) : Int(Int32(truncatingIfNeeded: try uint(4)))
                try push(.string(String(decoding: try take(n), as: UTF8.self)))
            case UInt8(ascii: "B"), UInt8(ascii: "C"), 0x8e, 0x96:
                let n = op == UInt8(ascii: "C") ? Int(try byte()) : (op == UInt8(ascii: "B") ? Int(try uint(4)) : Int(try uint(8)))
                try push(.bytes(Array(try take(n))))
            case UInt8(ascii: ")"): try push(.tuple([]))
            case UInt8(ascii: "t"): try push(.tuple(try popMark()))
            case 0x85: let a = try pop(); try push(.tuple([a]))
            case 0x86: let b = try pop(), a = try pop(); try push(.tuple([a, b]))
            case 0x87: let c = try pop(), b = try pop(), a = try pop(); try push(.tuple([a, b, c]))
            case UInt8(ascii: "]"): try push(.list(PickleList()))
            case UInt8(ascii: "l"): let l = PickleList(); l.items = try popMark(); try push(.list(l))
            case UInt8(ascii: "a"):
                let v = try pop()
                guard case .list(let l)? = stack.last else { throw fail("APPEND on something that is not a list") }
                l.items.append(v)
            case UInt8(ascii: "e"):
                let items = try popMark()
                guard case .list(let l)? = stack.last else { throw fail("APPENDS on something that is not a list") }
                l.items += items
            case UInt8(ascii: "}"): try push(.dict(PickleDict()))
            case UInt8(ascii: "d"):
                let items = try popMark()
                guard items.count % 2 == 0 else { throw fail("DICT with an odd number of items") }
                let d = PickleDict()
                for k in stride(from: 0, to: items.count, by: 2) { d.items.append((items[k], items[k + 1])) }
                try push(.dict(d))
            case UInt8(ascii: "s"):
                let v = try pop(), k = try pop()
                guard case .dict(let d)? = stack.last else { throw fail("SETITEM on something that is not a dict") }
                set(d, k, v)
            case UInt8(ascii: "u"):
                let items = try popMark()
                guard items.count % 2 == 0 else { throw fail("SETITEMS with an odd number of items") }
                guard case .dict(let d)? = stack.last else { throw fail("SETITEMS on something that is not a dict") }
                for k in stride(from: 0, to: items.count, by: 2) { set(d, items[k], items[k + 1]) }
            case 0x8f: try push(.set([]))
            case 0x90:
                let items = try popMark()
                guard case .set(let s)? = stack.last else { throw fail("ADDITEMS on something that is not a set") }
                stack[stack.count - 1] = .set(s + items)
            case 0x91: try push(.set(try popMark()))
            case UInt8(ascii: "c"):
                let module = try line(), name = try line()
                try push(try global(module, name))
            case 0x93:
                let name = try pop(), module = try pop()
                guard case .string(let n) = name, case .string(let m) = module else { throw fail("STACK_GLOBAL needs two strings") }
                try push(try global(m, n))
            case UInt8(ascii: "R"):
                let args = try pop(), callable = try pop()
                guard case .tuple(let a) = args else { throw fail("REDUCE arguments are not a tuple") }
                try push(try reduce(callable, a))
            case 0x81:
                let args = try pop(), cls = try pop()
                guard case .tuple(let a) = args else { throw fail("NEWOBJ arguments are not a tuple") }
                try push(try reduce(cls, a))
            case UInt8(ascii: "b"):
                let state = try pop()
                guard let target = stack.last else { throw fail("BUILD on an empty stack") }
                switch target {
                case .dict(let d): d.state = state
                case .tensor: break   // _rebuild_parameter_with_state: no Python state is kept
                default: throw fail("BUILD on something that is not an OrderedDict or a tensor")
                }
            case UInt8(ascii: "Q"): try push(try persistentLoad(try pop()))
            case UInt8(ascii: "P"): try push(try persistentLoad(.string(try line())))
            case UInt8(ascii: "h"): try get(Int(try byte()))
            case UInt8(ascii: "j"): try get(Int(try uint(4)))
            case UInt8(ascii: "g"): guard let k = Int(try line()) else { throw fail("bad GET") }; try get(k)
            case UInt8(ascii: "q"): try memoize(Int(try byte()))
            case UInt8(ascii: "r"): try memoize(Int(try uint(4)))
            case UInt8(ascii: "p"): guard let k = Int(try line()) else { throw fail("bad PUT") }; try memoize(k)
            case 0x94: try memoize(memo.count)
            default:
                throw fail(String(format: "opcode 0x%02x at byte %d is not allowed", op, pos - 1))
            }
        }
    }

    func set(_ d: PickleDict, _ k: PickleValue, _ v: PickleValue) {
        if case .string(let ks) = k, let i = d.items.firstIndex(where: { if case .string(let s) = $0.key { return s == ks }; return false }) {
            d.items[i].value = v
        } else {
            d.items.append((k, v))
        }
    }

    mutating func get(_ k: Int) throws {
        guard let v = memo[k] else { throw fail("memo key \(k) was never stored") }
        try push(v)
    }

    func global(_ module: String, _ name: String) throws -> PickleValue {
        guard TorchTypes.isAllowed(module, name) else {
            throw fail("global '\(module).\(name)' is not allowed (only what torch's weights-only loader accepts)")
        }
        return .global(module: module, name: name)
    }

    func int(_ v: PickleValue, _ what: String) throws -> Int {
        guard case .int(let i) = v else { throw fail("\(what) is not an integer") }
        return i
    }

    func ints(_ v: PickleValue, _ what: String) throws -> [Int] {
        guard case .tuple(let t) = v else { throw fail("\(what) is not a tuple") }
        return try t.map { try int($0, what) }
    }

    /// What REDUCE (and NEWOBJ) may call: a fixed set of constructors, nothing else.
    func reduce(_ callable: PickleValue, _ a: [PickleValue]) throws -> PickleValue {
        guard case .global(let m, let n) = callable else { throw fail("REDUCE on something that is not an allowed callable") }
        switch (m, n) {
        case ("collections", "OrderedDict"), ("collections", "Counter"):
            let d = PickleDict()
            d.ordered = n == "OrderedDict"
            if let first = a.first, case .list(let l) = first {
                for item in l.items { if case .tuple(let kv) = item, kv.count == 2 { d.items.append((kv[0], kv[1])) } }
            }
            return .dict(d)
        case ("torch", "Size"):
            guard a.count == 1, case .tuple = a[0] else { throw fail("torch.Size needs one tuple") }
            return a[0]
        case ("torch", "device"):
            guard let s = a.first, case .string = s else { throw fail("torch.device needs a string") }
            return s
        case ("_codecs", "encode"):
            guard a.count >= 1, case .string(let s) = a[0] else { throw fail("_codecs.encode needs a string") }
            return .bytes(s.unicodeScalars.map { UInt8(truncatingIfNeeded: $0.value) })   // latin-1
        case ("builtins", "set"):
            if let first = a.first, case .list(let l) = first { return .set(l.items) }
            return .set([])
        case ("builtins", "bytearray"):
            if let first = a.first, case .bytes = first { return first }
            return .bytes([])
        case ("torch._utils", "_rebuild_tensor"), ("torch._utils", "_rebuild_tensor_v2"), ("torch._utils", "_rebuild_tensor_v3"):
            guard a.count >= 4, case .storage(let st) = a[0] else { throw fail("\(n): bad arguments") }
            var dtype = st.dtype
            if n == "_rebuild_tensor_v3" {
                guard a.count >= 7, case .global("torch", let dn) = a[6], let d = TorchTypes.dtypes[dn] else {
                    throw fail("_rebuild_tensor_v3: missing or unknown dtype")
                }
                dtype = d
            }
            let t = PTTensor(storage: st, dtype: dtype, offset: try int(a[1], "storage offset"),
                             shape: try ints(a[2], "size"), stride: try ints(a[3], "stride"))
            if a.count > 4, case .bool(let rg) = a[4] { t.requiresGrad = rg }
            return .tensor(t)
        case ("torch._utils", "_rebuild_parameter"), ("torch._utils", "_rebuild_parameter_with_state"):
            guard a.count >= 2, case .tensor(let t) = a[0] else { throw fail("\(n): bad arguments") }
            t.isParameter = true
            if case .bool(let rg) = a[1] { t.requiresGrad = rg }
            return .tensor(t)
        case ("torch._tensor", "_rebuild_from_type_v2"):
            guard a.count >= 3, case .tuple(let args) = a[2] else { throw fail("_rebuild_from_type_v2: bad arguments") }
            return try reduce(a[0], args)
        default:
            throw fail("'\(m).\(n)' is allowed by torch but not supported by qconvert (quantized, sparse, nested or meta tensors)")
        }
    }
}
