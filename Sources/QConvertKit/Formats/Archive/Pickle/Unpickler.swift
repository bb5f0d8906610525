import Foundation

/// A restricted pickle machine: it never runs code and never imports anything. Opcodes of
/// protocols 2 to 5 build plain values; GLOBAL may name only what torch's weights-only loader
/// allows; REDUCE, BUILD and NEWOBJ produce typed values for the few callables checkpoints use.
struct Unpickler {
    struct Failure: Error { let message: String }

    let data: UnsafeRawBufferPointer
    var pos = 0
    var stack: [PickleValue] = []
    /// The nesting depth of each stack value (0 for scalars): a value nested deeper than `maxDepth`
    /// is refused while it is built, since freeing (or walking) it would recurse that deep.
    var depths: [Int] = []
    var marks: [Int] = []
    var memo: [Int: (value: PickleValue, depth: Int)] = [:]
    /// Turns a persistent id (a tuple) into a storage.
    let persistentLoad: (PickleValue) throws -> PickleValue

    static let maxStack = 1 << 22
    static let maxMemo = 1 << 22
    static let maxDepth = 256

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

    /// A length field of `width` bytes that must fit in what is left of the data.
    mutating func length(_ width: Int) throws -> Int {
        let v = try uint(width)
        guard v <= UInt64(data.count - pos) else { throw fail("a length of \(v) bytes runs past the end of the pickle") }
        return Int(v)
    }

    mutating func line() throws -> String {
        guard let nl = data[pos...].firstIndex(of: 0x0A) else { throw fail("unterminated text field") }
        let s = String(decoding: UnsafeRawBufferPointer(rebasing: data[pos..<nl]), as: UTF8.self)
        pos = nl + 1
        return s
    }

    /// A value's depth: lists and dicts carry theirs (it grows while they are filled).
    func depthOf(_ v: PickleValue, recorded: Int) -> Int {
        switch v {
        case .list(let l): return l.depth
        case .dict(let d): return d.depth
        default: return recorded
        }
    }

    mutating func pop() throws -> PickleValue { try popWithDepth().value }

    mutating func popWithDepth() throws -> (value: PickleValue, depth: Int) {
        guard let v = stack.popLast() else { throw fail("stack underflow") }
        let d = depths.removeLast()
        if case .mark = v { throw fail("unexpected MARK") }
        return (v, depthOf(v, recorded: d))
    }

    mutating func popMark() throws -> [PickleValue] { try popMarkWithDepth().items }

    /// The items since the last MARK and the deepest of their depths.
    mutating func popMarkWithDepth() throws -> (items: [PickleValue], deepest: Int) {
        guard let m = marks.popLast(), m <= stack.count else { throw fail("no MARK to pop to") }
        let items = Array(stack[m...])
        var deepest = 0
        for (k, v) in items.enumerated() { deepest = max(deepest, depthOf(v, recorded: depths[m + k])) }
        stack.removeSubrange(m...)
        depths.removeSubrange(m...)
        return (items, deepest)
    }

    mutating func push(_ v: PickleValue, depth: Int = 0) throws {
        guard stack.count < Unpickler.maxStack else { throw fail("pickle stack grows past \(Unpickler.maxStack)") }
        guard depth <= Unpickler.maxDepth else { throw fail("values nested deeper than \(Unpickler.maxDepth) levels") }
        stack.append(v)
        depths.append(depth)
    }

    /// Pushes a new container holding `items` (whose deepest depth is `deepest`).
    mutating func pushContainer(_ v: PickleValue, items: [PickleValue], deepest: Int) throws {
        embed(items)
        let d = deepest + 1
        if case .list(let l) = v { l.depth = d }
        if case .dict(let dict) = v { dict.depth = d }
        try push(v, depth: d)
    }

    /// Marks lists and dicts as held by another value: nothing may be added to them afterwards.
    func embed(_ items: [PickleValue]) {
        for v in items {
            if case .list(let l) = v { l.embedded = true } else if case .dict(let d) = v { d.embedded = true }
        }
    }

    /// The list or dict on top of the stack, to add items to: never one another value already holds
    /// (CPython's pickler fills a container before placing it; only a hostile pickle does otherwise).
    mutating func growTop(by deepest: Int, _ what: String) throws {
        guard let top = stack.last else { throw fail("\(what) on an empty stack") }
        let d = max(depthOf(top, recorded: depths[depths.count - 1]), deepest + 1)
        guard d <= Unpickler.maxDepth else { throw fail("values nested deeper than \(Unpickler.maxDepth) levels") }
        switch top {
        case .list(let l):
            guard !l.embedded else { throw fail("\(what) to a list that another value already holds") }
            l.depth = d
        case .dict(let dict):
            guard !dict.embedded else { throw fail("\(what) to a dict that another value already holds") }
            dict.depth = d
        default: break
        }
        depths[depths.count - 1] = d
    }

    mutating func memoize(_ k: Int) throws {
        guard let top = stack.last else { throw fail("memoize on an empty stack") }
        guard memo.count < Unpickler.maxMemo else { throw fail("pickle memo grows past \(Unpickler.maxMemo)") }
        memo[k] = (top, depths[depths.count - 1])
    }

    mutating func load() throws -> PickleValue {
        while true {
            let op = try byte()
            switch op {
            case 0x80:
                let p = try byte()
                guard p >= 2 && p <= 5 else { throw fail("pickle protocol \(p) is not supported") }
            case 0x95:  // FRAME: only a length hint; it must stay inside the data
                let n = try uint(8)
                guard n <= UInt64(data.count - pos) else { throw fail("FRAME of \(n) bytes runs past the end") }
            case UInt8(ascii: "."): return try pop()
            case UInt8(ascii: "("): marks.append(stack.count)
            case UInt8(ascii: "0"): _ = try pop()
            case UInt8(ascii: "1"): _ = try popMark()
            case UInt8(ascii: "2"):
                guard let t = stack.last else { throw fail("DUP on an empty stack") }
                try push(t, depth: depths[depths.count - 1])
            case UInt8(ascii: "N"): try push(.none)
            case 0x88: try push(.bool(true))
            case 0x89: try push(.bool(false))
            case UInt8(ascii: "I"):
                let s = try line()
                if s == "01" {
                    try push(.bool(true))
                } else if s == "00" {
                    try push(.bool(false))
                } else {
                    guard let v = Int(s) else { throw fail("bad INT '\(s)'") }
                    try push(.int(v))
                }
            case UInt8(ascii: "J"): try push(.int(Int(Int32(truncatingIfNeeded: try uint(4)))))
            case UInt8(ascii: "K"): try push(.int(Int(try byte())))
            case UInt8(ascii: "M"): try push(.int(Int(try uint(2))))
            case 0x8a, 0x8b:
                let n = op == 0x8a ? Int(try byte()) : Int(try uint(4))
                guard n <= 64 else { throw fail("integer of \(n) bytes is too large") }
                let b = try take(n)
                if n > 8 {
                    try push(.bigInt(Array(b)))
                    continue
                }
                var v: Int64 = 0
                for k in (0..<n).reversed() { v = v << 8 | Int64(b[k]) }
                if n > 0 && n < 8 && b[n - 1] & 0x80 != 0 { v -= Int64(1) << (8 * Int64(n)) }
                try push(.int(Int(v)))
            case UInt8(ascii: "L"):
                var s = try line()
                if s.hasSuffix("L") { s.removeLast() }
                guard let v = Int(s) else { throw fail("bad LONG '\(s)'") }
                try push(.int(v))
            case UInt8(ascii: "G"):
                try push(.float(Double(bitPattern: try (0..<8).reduce(UInt64(0)) { acc, _ in acc << 8 | UInt64(try byte()) })))
            case UInt8(ascii: "F"):
                guard let v = Double(try line()) else { throw fail("bad FLOAT") }
                try push(.float(v))
            case UInt8(ascii: "X"), 0x8c, 0x8d:
                let n = op == 0x8c ? Int(try byte()) : op == 0x8d ? try length(8) : try length(4)
                guard let s = String(validating: try take(n), as: UTF8.self) else { throw fail("string is not UTF-8") }
                try push(.string(s))
            case UInt8(ascii: "T"), UInt8(ascii: "U"):
                let n = op == UInt8(ascii: "U") ? Int(try byte()) : try length(4)  // a negative BINSTRING length is huge here
                try push(.string(String(decoding: try take(n), as: UTF8.self)))
            case UInt8(ascii: "B"), UInt8(ascii: "C"), 0x8e, 0x96:
                let n = op == UInt8(ascii: "C") ? Int(try byte()) : (op == UInt8(ascii: "B") ? try length(4) : try length(8))
                try push(.bytes(Array(try take(n))))
            case UInt8(ascii: ")"): try push(.tuple([]), depth: 1)
            case UInt8(ascii: "t"):
                let (items, deepest) = try popMarkWithDepth()
                try pushContainer(.tuple(items), items: items, deepest: deepest)
            case 0x85, 0x86, 0x87:
                var items: [PickleValue] = []
                var deepest = 0
                for _ in 0..<Int(op - 0x84) {
                    let (v, d) = try popWithDepth()
                    items.insert(v, at: 0)
                    deepest = max(deepest, d)
                }
                try pushContainer(.tuple(items), items: items, deepest: deepest)
            case UInt8(ascii: "]"): try push(.list(PickleList()), depth: 1)
            case UInt8(ascii: "l"):
                let (items, deepest) = try popMarkWithDepth()
                let l = PickleList()
                l.items = items
                try pushContainer(.list(l), items: items, deepest: deepest)
            case UInt8(ascii: "a"):
                let (v, d) = try popWithDepth()
                guard case .list(let l)? = stack.last else { throw fail("APPEND on something that is not a list") }
                try growTop(by: d, "APPEND")
                embed([v])
                l.items.append(v)
            case UInt8(ascii: "e"):
                let (items, deepest) = try popMarkWithDepth()
                guard case .list(let l)? = stack.last else { throw fail("APPENDS on something that is not a list") }
                try growTop(by: deepest, "APPENDS")
                embed(items)
                l.items += items
            case UInt8(ascii: "}"): try push(.dict(PickleDict()), depth: 1)
            case UInt8(ascii: "d"):
                let (items, deepest) = try popMarkWithDepth()
                guard items.count % 2 == 0 else { throw fail("DICT with an odd number of items") }
                let d = PickleDict()
                for k in stride(from: 0, to: items.count, by: 2) { set(d, items[k], items[k + 1]) }
                try pushContainer(.dict(d), items: items, deepest: deepest)
            case UInt8(ascii: "s"):
                let (v, dv) = try popWithDepth()
                let (k, dk) = try popWithDepth()
                guard case .dict(let d)? = stack.last else { throw fail("SETITEM on something that is not a dict") }
                try growTop(by: max(dv, dk), "SETITEM")
                embed([k, v])
                set(d, k, v)
            case UInt8(ascii: "u"):
                let (items, deepest) = try popMarkWithDepth()
                guard items.count % 2 == 0 else { throw fail("SETITEMS with an odd number of items") }
                guard case .dict(let d)? = stack.last else { throw fail("SETITEMS on something that is not a dict") }
                try growTop(by: deepest, "SETITEMS")
                embed(items)
                for k in stride(from: 0, to: items.count, by: 2) { set(d, items[k], items[k + 1]) }
            case 0x8f: try push(.set([]), depth: 1)
            case 0x90:
                let (items, deepest) = try popMarkWithDepth()
                guard case .set? = stack.last else { throw fail("ADDITEMS on something that is not a set") }
                // Taken off the stack and put back: the array is then uniquely held and grows in place
                // (adding to a copy made every ADDITEMS quadratic).
                var (top, d) = try popWithDepth()
                guard case .set(var members) = top else { throw fail("ADDITEMS on something that is not a set") }
                top = .none  // the last other reference to the array: `members` now grows in place
                members += items
                embed(items)
                try push(.set(members), depth: max(d, deepest + 1))
            case 0x91:
                let (items, deepest) = try popMarkWithDepth()
                try pushContainer(.set(items), items: items, deepest: deepest)
            case UInt8(ascii: "c"):
                let module = try line()
                let name = try line()
                try push(try global(module, name))
            case 0x93:
                let name = try pop()
                let module = try pop()
                guard case .string(let n) = name, case .string(let m) = module else { throw fail("STACK_GLOBAL needs two strings") }
                try push(try global(m, n))
            case UInt8(ascii: "R"), 0x81:
                let (args, da) = try popWithDepth()
                let callable = try pop()
                guard case .tuple(let a) = args else { throw fail("\(op == 0x81 ? "NEWOBJ" : "REDUCE") arguments are not a tuple") }
                let result = try reduce(callable, a)
                try pushContainer(result, items: [args], deepest: da)
            case UInt8(ascii: "b"):
                let (state, ds) = try popWithDepth()
                guard let target = stack.last else { throw fail("BUILD on an empty stack") }
                switch target {
                case .dict(let d):
                    try growTop(by: ds, "BUILD")
                    embed([state])
                    d.state = state
                case .tensor: break  // _rebuild_parameter_with_state: no Python state is kept
                default: throw fail("BUILD on something that is not an OrderedDict or a tensor")
                }
            case UInt8(ascii: "Q"): try push(try persistentLoad(try pop()))
            case UInt8(ascii: "P"): try push(try persistentLoad(.string(try line())))
            case UInt8(ascii: "h"): try get(Int(try byte()))
            case UInt8(ascii: "j"): try get(Int(try uint(4)))
            case UInt8(ascii: "g"):
                guard let k = Int(try line()) else { throw fail("bad GET") }
                try get(k)
            case UInt8(ascii: "q"): try memoize(Int(try byte()))
            case UInt8(ascii: "r"): try memoize(Int(try uint(4)))
            case UInt8(ascii: "p"):
                guard let k = Int(try line()) else { throw fail("bad PUT") }
                try memoize(k)
            case 0x94: try memoize(memo.count)
            default:
                throw fail(String(format: "opcode 0x%02x at byte %d is not allowed", op, pos - 1))
            }
        }
    }

    /// Sets a key as Python would: an existing string key is replaced (found through the dict's index,
    /// not a scan: SETITEMS on a large dict was quadratic), other keys are appended.
    func set(_ d: PickleDict, _ k: PickleValue, _ v: PickleValue) {
        if case .string(let ks) = k {
            if let i = d.stringKeys[ks] {
                d.items[i].value = v
                return
            }
            d.stringKeys[ks] = d.items.count
        }
        d.items.append((k, v))
    }

    mutating func get(_ k: Int) throws {
        guard let v = memo[k] else { throw fail("memo key \(k) was never stored") }
        try push(v.value, depth: depthOf(v.value, recorded: v.depth))
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
                for item in l.items { if case .tuple(let kv) = item, kv.count == 2 { set(d, kv[0], kv[1]) } }
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
            return .bytes(s.unicodeScalars.map { UInt8(truncatingIfNeeded: $0.value) })  // latin-1
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
            let t = PTTensor(
                storage: st, dtype: dtype, offset: try int(a[1], "storage offset"),
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
