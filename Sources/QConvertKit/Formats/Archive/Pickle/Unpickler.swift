import Foundation

/// A restricted pickle machine: it never runs code and never imports anything. Opcodes of
/// protocols 2 to 5 build plain values; GLOBAL may name only what torch's weights-only loader
/// allows; REDUCE, BUILD and NEWOBJ produce typed values for the few callables checkpoints use.
struct Unpickler {

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

    func fail(_ r: PickleRule) -> PickleRule { r }

    mutating func byte() throws -> UInt8 {
        guard pos < data.count else { throw fail(.truncated) }
        pos += 1
        return data[pos - 1]
    }

    mutating func take(_ n: Int) throws -> UnsafeRawBufferPointer {
        guard n >= 0, n <= data.count - pos else { throw fail(.pastEnd(what: "a field", bytes: UInt64(max(n, 0)))) }
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
        guard v <= UInt64(data.count - pos) else { throw fail(.pastEnd(what: "a length", bytes: v)) }
        return Int(v)
    }

    mutating func line() throws -> String {
        guard let nl = data[pos...].firstIndex(of: 0x0A) else { throw fail(.unterminatedText) }
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
        guard let v = stack.popLast() else { throw fail(.stackShape(op: "POP", problem: "stack underflow")) }
        let d = depths.removeLast()
        if case .mark = v { throw fail(.stackShape(op: "POP", problem: "unexpected MARK")) }
        return (v, depthOf(v, recorded: d))
    }

    mutating func popMark() throws -> [PickleValue] { try popMarkWithDepth().items }

    /// The items since the last MARK and the deepest of their depths.
    mutating func popMarkWithDepth() throws -> (items: [PickleValue], deepest: Int) {
        guard let m = marks.popLast(), m <= stack.count else {
            throw fail(.stackShape(op: "MARK", problem: "no MARK to pop to"))
        }
        let items = Array(stack[m...])
        var deepest = 0
        for (k, v) in items.enumerated() { deepest = max(deepest, depthOf(v, recorded: depths[m + k])) }
        stack.removeSubrange(m...)
        depths.removeSubrange(m...)
        return (items, deepest)
    }

    mutating func push(_ v: PickleValue, depth: Int = 0) throws {
        guard stack.count < Unpickler.maxStack else { throw fail(.limit(.stack, Unpickler.maxStack)) }
        guard depth <= Unpickler.maxDepth else { throw fail(.limit(.depth, Unpickler.maxDepth)) }
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
        guard let top = stack.last else { throw fail(.stackShape(op: what, problem: "empty stack")) }
        let d = max(depthOf(top, recorded: depths[depths.count - 1]), deepest + 1)
        guard d <= Unpickler.maxDepth else { throw fail(.limit(.depth, Unpickler.maxDepth)) }
        switch top {
        case .list(let l):
            guard !l.embedded else { throw fail(.sharedContainer(op: what, kind: "list")) }
            l.depth = d
        case .dict(let dict):
            guard !dict.embedded else { throw fail(.sharedContainer(op: what, kind: "dict")) }
            dict.depth = d
        default: break
        }
        depths[depths.count - 1] = d
    }

    mutating func memoize(_ k: Int) throws {
        guard let top = stack.last else { throw fail(.stackShape(op: "MEMOIZE", problem: "empty stack")) }
        guard memo.count < Unpickler.maxMemo else { throw fail(.limit(.memo, Unpickler.maxMemo)) }
        memo[k] = (top, depths[depths.count - 1])
    }

    mutating func load() throws -> PickleValue {
        while true {
            let op = try byte()
            switch op {
            case 0x80:
                let p = try byte()
                guard p >= 2 && p <= 5 else { throw fail(.unsupportedProtocol(Int(p))) }
            case 0x95:  // FRAME: only a length hint; it must stay inside the data
                let n = try uint(8)
                guard n <= UInt64(data.count - pos) else { throw fail(.pastEnd(what: "FRAME", bytes: n)) }
            case UInt8(ascii: "."): return try pop()
            case UInt8(ascii: "("): marks.append(stack.count)
            case UInt8(ascii: "0"): _ = try pop()
            case UInt8(ascii: "1"): _ = try popMark()
            case UInt8(ascii: "2"):
                guard let t = stack.last else { throw fail(.stackShape(op: "DUP", problem: "empty stack")) }
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
                    guard let v = Int(s) else { throw fail(.badLiteral(op: "INT", text: s)) }
                    try push(.int(v))
                }
            case UInt8(ascii: "J"): try push(.int(Int(Int32(truncatingIfNeeded: try uint(4)))))
            case UInt8(ascii: "K"): try push(.int(Int(try byte())))
            case UInt8(ascii: "M"): try push(.int(Int(try uint(2))))
            case 0x8a, 0x8b:
                let n = op == 0x8a ? Int(try byte()) : Int(try uint(4))
                guard n <= 64 else { throw fail(.badLiteral(op: "LONG", text: "\(n)-byte integer")) }
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
                guard let v = Int(s) else { throw fail(.badLiteral(op: "LONG", text: s)) }
                try push(.int(v))
            case UInt8(ascii: "G"):
                try push(
                    .float(
                        Double(bitPattern: try (0..<8).reduce(UInt64(0)) { acc, _ in acc << 8 | UInt64(try byte()) })))
            case UInt8(ascii: "F"):
                guard let v = Double(try line()) else { throw fail(.badLiteral(op: "FLOAT", text: nil)) }
                try push(.float(v))
            case UInt8(ascii: "X"), 0x8c, 0x8d:
                let n = op == 0x8c ? Int(try byte()) : op == 0x8d ? try length(8) : try length(4)
                guard let s = String(validating: try take(n), as: UTF8.self) else {
                    throw fail(.badLiteral(op: "string", text: "not UTF-8"))
                }
                try push(.string(s))
            case UInt8(ascii: "T"), UInt8(ascii: "U"):
                // a negative BINSTRING length is huge here
                let n = op == UInt8(ascii: "U") ? Int(try byte()) : try length(4)
                try push(.string(String(decoding: try take(n), as: UTF8.self)))
            case UInt8(ascii: "B"), UInt8(ascii: "C"), 0x8e, 0x96:
                let n =
                    op == UInt8(ascii: "C")
                    ? Int(try byte()) : (op == UInt8(ascii: "B") ? try length(4) : try length(8))
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
                guard case .list(let l)? = stack.last else {
                    throw fail(.wrongTarget(op: "APPEND", expected: "a list"))
                }
                try growTop(by: d, "APPEND")
                embed([v])
                l.items.append(v)
            case UInt8(ascii: "e"):
                let (items, deepest) = try popMarkWithDepth()
                guard case .list(let l)? = stack.last else {
                    throw fail(.wrongTarget(op: "APPENDS", expected: "a list"))
                }
                try growTop(by: deepest, "APPENDS")
                embed(items)
                l.items += items
            case UInt8(ascii: "}"): try push(.dict(PickleDict()), depth: 1)
            case UInt8(ascii: "d"):
                let (items, deepest) = try popMarkWithDepth()
                guard items.count % 2 == 0 else { throw fail(.oddItems(op: "DICT")) }
                let d = PickleDict()
                for k in stride(from: 0, to: items.count, by: 2) { set(d, items[k], items[k + 1]) }
                try pushContainer(.dict(d), items: items, deepest: deepest)
            case UInt8(ascii: "s"):
                let (v, dv) = try popWithDepth()
                let (k, dk) = try popWithDepth()
                guard case .dict(let d)? = stack.last else {
                    throw fail(.wrongTarget(op: "SETITEM", expected: "a dict"))
                }
                try growTop(by: max(dv, dk), "SETITEM")
                embed([k, v])
                set(d, k, v)
            case UInt8(ascii: "u"):
                let (items, deepest) = try popMarkWithDepth()
                guard items.count % 2 == 0 else { throw fail(.oddItems(op: "SETITEMS")) }
                guard case .dict(let d)? = stack.last else {
                    throw fail(.wrongTarget(op: "SETITEMS", expected: "a dict"))
                }
                try growTop(by: deepest, "SETITEMS")
                embed(items)
                for k in stride(from: 0, to: items.count, by: 2) { set(d, items[k], items[k + 1]) }
            case 0x8f: try push(.set([]), depth: 1)
            case 0x90:
                let (items, deepest) = try popMarkWithDepth()
                guard case .set? = stack.last else { throw fail(.wrongTarget(op: "ADDITEMS", expected: "a set")) }
                // Taken off the stack and put back: the array is then uniquely held and grows in place
                // (adding to a copy made every ADDITEMS quadratic).
                var (top, d) = try popWithDepth()
                guard case .set(var members) = top else { throw fail(.wrongTarget(op: "ADDITEMS", expected: "a set")) }
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
                guard case .string(let n) = name, case .string(let m) = module else {
                    throw fail(.badArguments(callable: "STACK_GLOBAL", detail: "needs two strings"))
                }
                try push(try global(m, n))
            case UInt8(ascii: "R"), 0x81:
                let (args, da) = try popWithDepth()
                let callable = try pop()
                guard case .tuple(let a) = args else {
                    throw fail(
                        .badArguments(callable: op == 0x81 ? "NEWOBJ" : "REDUCE", detail: "arguments are not a tuple"))
                }
                let result = try reduce(callable, a)
                try pushContainer(result, items: [args], deepest: da)
            case UInt8(ascii: "b"):
                let (state, ds) = try popWithDepth()
                guard let target = stack.last else { throw fail(.stackShape(op: "BUILD", problem: "empty stack")) }
                switch target {
                case .dict(let d):
                    try growTop(by: ds, "BUILD")
                    embed([state])
                    d.state = state
                case .tensor: break  // _rebuild_parameter_with_state: no Python state is kept
                default: throw fail(.wrongTarget(op: "BUILD", expected: "an OrderedDict or a tensor"))
                }
            case UInt8(ascii: "Q"): try push(try persistentLoad(try pop()))
            case UInt8(ascii: "P"): try push(try persistentLoad(.string(try line())))
            case UInt8(ascii: "h"): try get(Int(try byte()))
            case UInt8(ascii: "j"): try get(Int(try uint(4)))
            case UInt8(ascii: "g"):
                guard let k = Int(try line()) else { throw fail(.badLiteral(op: "GET", text: nil)) }
                try get(k)
            case UInt8(ascii: "q"): try memoize(Int(try byte()))
            case UInt8(ascii: "r"): try memoize(Int(try uint(4)))
            case UInt8(ascii: "p"):
                guard let k = Int(try line()) else { throw fail(.badLiteral(op: "PUT", text: nil)) }
                try memoize(k)
            case 0x94: try memoize(memo.count)
            default:
                throw fail(.opcodeNotAllowed(op, at: pos - 1))
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
        guard let v = memo[k] else { throw fail(.unknownMemo(k)) }
        try push(v.value, depth: depthOf(v.value, recorded: v.depth))
    }

    func global(_ module: String, _ name: String) throws -> PickleValue {
        guard TorchTypes.isAllowed(module, name) else {
            throw fail(.globalNotAllowed(module: module, name: name))
        }
        return .global(module: module, name: name)
    }

    func int(_ v: PickleValue, _ what: String) throws -> Int {
        guard case .int(let i) = v else { throw fail(.badArguments(callable: what, detail: "not an integer")) }
        return i
    }

    func ints(_ v: PickleValue, _ what: String) throws -> [Int] {
        guard case .tuple(let t) = v else { throw fail(.badArguments(callable: what, detail: "not a tuple")) }
        return try t.map { try int($0, what) }
    }

    /// What REDUCE (and NEWOBJ) may call: a fixed set of constructors, nothing else.
    func reduce(_ callable: PickleValue, _ a: [PickleValue]) throws -> PickleValue {
        guard case .global(let m, let n) = callable else {
            throw fail(.wrongTarget(op: "REDUCE", expected: "an allowed callable"))
        }
        switch (m, n) {
        case ("collections", "OrderedDict"), ("collections", "Counter"):
            let d = PickleDict()
            d.ordered = n == "OrderedDict"
            if let first = a.first, case .list(let l) = first {
                for item in l.items { if case .tuple(let kv) = item, kv.count == 2 { set(d, kv[0], kv[1]) } }
            }
            return .dict(d)
        case ("torch", "Size"):
            guard a.count == 1, case .tuple = a[0] else {
                throw fail(.badArguments(callable: "torch.Size", detail: "needs one tuple"))
            }
            return a[0]
        case ("torch", "device"):
            guard let s = a.first, case .string = s else {
                throw fail(.badArguments(callable: "torch.device", detail: "needs a string"))
            }
            return s
        case ("_codecs", "encode"):
            guard a.count >= 1, case .string(let s) = a[0] else {
                throw fail(.badArguments(callable: "_codecs.encode", detail: "needs a string"))
            }
            return .bytes(s.unicodeScalars.map { UInt8(truncatingIfNeeded: $0.value) })  // latin-1
        case ("builtins", "set"):
            if let first = a.first, case .list(let l) = first { return .set(l.items) }
            return .set([])
        case ("builtins", "bytearray"):
            if let first = a.first, case .bytes = first { return first }
            return .bytes([])
        case ("torch._utils", "_rebuild_tensor"), ("torch._utils", "_rebuild_tensor_v2"),
            ("torch._utils", "_rebuild_tensor_v3"):
            guard a.count >= 4, case .storage(let st) = a[0] else {
                throw fail(.badArguments(callable: n, detail: "bad arguments"))
            }
            var dtype = st.dtype
            if n == "_rebuild_tensor_v3" {
                guard a.count >= 7, case .global("torch", let dn) = a[6], let d = TorchTypes.dtypes[dn] else {
                    throw fail(.badArguments(callable: "_rebuild_tensor_v3", detail: "missing or unknown dtype"))
                }
                dtype = d
            }
            let t = PTTensor(
                storage: st, dtype: dtype, offset: try int(a[1], "storage offset"),
                shape: try ints(a[2], "size"), stride: try ints(a[3], "stride"))
            if a.count > 4, case .bool(let rg) = a[4] { t.requiresGrad = rg }
            return .tensor(t)
        case ("torch._utils", "_rebuild_parameter"), ("torch._utils", "_rebuild_parameter_with_state"):
            guard a.count >= 2, case .tensor(let t) = a[0] else {
                throw fail(.badArguments(callable: n, detail: "bad arguments"))
            }
            t.isParameter = true
            if case .bool(let rg) = a[1] { t.requiresGrad = rg }
            return .tensor(t)
        case ("torch._tensor", "_rebuild_from_type_v2"):
            guard a.count >= 3, case .tuple(let args) = a[2] else {
                throw fail(.badArguments(callable: "_rebuild_from_type_v2", detail: "bad arguments"))
            }
            return try reduce(a[0], args)
        default:
            throw fail(.unsupportedTorch(callable: "\(m).\(n)"))
        }
    }
}

/// The rules of qconvert's restricted unpickler (what torch's weights-only loader accepts, with bounds)
/// a pickle can break.
public indirect enum PickleRule: FormatViolation, Equatable {
    public enum Limit: String, Sendable { case stack, depth, memo }

    case truncated
    case pastEnd(what: String, bytes: UInt64)
    case unterminatedText
    case stackShape(op: String, problem: String)
    case limit(Limit, Int)
    case unsupportedProtocol(Int)
    case badLiteral(op: String, text: String?)
    case wrongTarget(op: String, expected: String)
    case sharedContainer(op: String, kind: String)
    case oddItems(op: String)
    case unknownMemo(Int)
    case opcodeNotAllowed(UInt8, at: Int)
    case globalNotAllowed(module: String, name: String)
    case badArguments(callable: String, detail: String)
    case unsupportedTorch(callable: String)
    /// torch.save's storages (persistent ids, records, types).
    case storage(String)
    /// A rule broken inside an archive member (`archive/data.pkl`).
    case inMember(String, PickleRule)

    public var description: String {
        switch self {
        case .truncated: "pickle ends early (truncated?)"
        case .pastEnd(let what, let n): "\(what) of \(n) bytes runs past the end of the pickle"
        case .unterminatedText: "unterminated text field"
        case .stackShape(let op, let problem): "\(op): \(problem)"
        case .limit(.stack, let n): "pickle stack grows past \(n)"
        case .limit(.depth, let n): "values nested deeper than \(n) levels"
        case .limit(.memo, let n): "pickle memo grows past \(n)"
        case .unsupportedProtocol(let p): "pickle protocol \(p) is not supported"
        case .badLiteral(let op, let t?): "bad \(op) '\(t)'"
        case .badLiteral(let op, nil): "bad \(op)"
        case .wrongTarget(let op, let expected): "\(op) on something that is not \(expected)"
        case .sharedContainer(let op, let kind): "\(op) to a \(kind) that another value already holds"
        case .oddItems(let op): "\(op) with an odd number of items"
        case .unknownMemo(let k): "memo key \(k) was never stored"
        case .opcodeNotAllowed(let op, let at): String(format: "opcode 0x%02x at byte %d is not allowed", op, at)
        case .globalNotAllowed(let m, let n):
            "global '\(m).\(n)' is not allowed (only what torch's weights-only loader accepts)"
        case .badArguments(let c, let d): "\(c): \(d)"
        case .unsupportedTorch(let c):
            "'\(c)' is allowed by torch but not supported by qconvert (quantized, sparse, nested or meta tensors)"
        case .storage(let m): m
        case .inMember(let m, let r): "\(m): \(r)"
        }
    }
}
