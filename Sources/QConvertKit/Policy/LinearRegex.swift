/// A regular-expression matcher whose running time is linear in the subject's length.
///
/// Policy files come from users and from CI configuration, and tensor names come from hostile
/// checkpoints; a backtracking engine lets a pattern with nested quantifiers run for hours on a long
/// name. This engine compiles a pattern to a small program and runs it as a set of threads that
/// advance together over the name (Thompson's construction), so a match costs at most
/// `name length × program size` steps, whatever the pattern.
///
/// Syntax: literals; `.`; classes `[abc]`, `[a-z]`, `[^...]`; escapes `\d \w \s \D \W \S` and `\` before
/// any punctuation; groups `(...)` and `(?:...)`; alternation `|`; quantifiers `*`, `+`, `?`, `{n}`,
/// `{n,}`, `{n,m}` (a trailing `?` for laziness is accepted: only whether the whole name matches counts);
/// anchors `^` and `$`. Back-references and look-around are refused. A pattern compiles to at most
/// `LinearRegex.maxProgram` instructions and nests at most `maxDepth` groups.
public struct LinearRegex: Sendable {
    public static let maxProgram = 4096
    public static let maxDepth = 64
    public static let maxRepeat = 1000

    public struct SyntaxError: Error, CustomStringConvertible {
        public let message: String
        public var description: String { message }
    }

    enum Inst: Sendable {
        case char(CharSet)
        case split(Int, Int)
        case jump(Int)
        case atStart
        case atEnd
        case match
    }

    /// A set of Unicode scalars: ranges, optionally negated.
    struct CharSet: Sendable {
        var ranges: [ClosedRange<UInt32>]
        var negated = false
        func contains(_ c: UInt32) -> Bool {
            var hit = false
            for r in ranges where r.contains(c) {
                hit = true
                break
            }
            return hit != negated
        }
        static let any = CharSet(ranges: [0...0x10FFFF])
        static let digit = CharSet(ranges: [48...57])
        static let word = CharSet(ranges: [48...57, 65...90, 95...95, 97...122])
        static let space = CharSet(ranges: [9...13, 32...32])
    }

    indirect enum Node {
        case set(CharSet)
        case concat([Node])
        case alt([Node])
        case rep(Node, min: Int, max: Int?)
        case start
        case end
        case empty
    }

    let program: [Inst]

    public init(_ pattern: String) throws {
        var parser = Parser(chars: Array(pattern.unicodeScalars).map(\.value))
        let node = try parser.parseAlternation(depth: 0)
        if parser.pos < parser.chars.count { throw SyntaxError(message: "unbalanced ')'") }
        var c = Compiler()
        try c.emit(node)
        c.program.append(.match)
        program = c.program
    }

    /// Whether the pattern matches the whole of `text` (the pattern may anchor itself further).
    public func matches(_ text: String) -> Bool {
        let input = Array(text.unicodeScalars).map(\.value)
        let n = program.count
        var current = [Int]()
        var next = [Int]()
        var mark = [Int](repeating: -1, count: n)
        var stack = [Int]()
        current.reserveCapacity(n)
        next.reserveCapacity(n)

        // Follows jumps, splits and assertions from `pc` at position `i`, adding the character
        // and match instructions reached to `list`; `mark` keeps each pc once per position.
        func close(_ pc: Int, _ i: Int, _ list: inout [Int]) {
            stack.append(pc)
            while let p = stack.popLast() {
                if mark[p] == i { continue }
                mark[p] = i
                switch program[p] {
                case .jump(let t): stack.append(t)
                case .split(let a, let b):
                    stack.append(b)
                    stack.append(a)
                case .atStart: if i == 0 { stack.append(p + 1) }
                case .atEnd: if i == input.count { stack.append(p + 1) }
                case .char, .match: list.append(p)
                }
            }
        }
        close(0, 0, &current)
        for i in 0..<input.count {
            if current.isEmpty { return false }
            let c = input[i]
            next.removeAll(keepingCapacity: true)
            for p in current {
                if case .char(let set) = program[p], set.contains(c) { close(p + 1, i + 1, &next) }
            }
            swap(&current, &next)
        }
        return current.contains { if case .match = program[$0] { return true } else { return false } }
    }

    struct Parser {
        let chars: [UInt32]
        var pos = 0

        func peek() -> UInt32? { pos < chars.count ? chars[pos] : nil }
        func err(_ m: String) -> SyntaxError { SyntaxError(message: m) }

        mutating func parseAlternation(depth: Int) throws -> Node {
            if depth > LinearRegex.maxDepth {
                throw err("groups nested deeper than \(LinearRegex.maxDepth)")
            }
            var branches = [try parseConcat(depth: depth)]
            while peek() == 0x7C {  // |
                pos += 1
                branches.append(try parseConcat(depth: depth))
            }
            return branches.count == 1 ? branches[0] : .alt(branches)
        }

        mutating func parseConcat(depth: Int) throws -> Node {
            var items = [Node]()
            while let c = peek(), c != 0x7C, c != 0x29 {  // | )
                var atom = try parseAtom(depth: depth)
                atom = try parseQuantifiers(atom)
                items.append(atom)
            }
            return items.count == 1 ? items[0] : (items.isEmpty ? .empty : .concat(items))
        }

        mutating func parseQuantifiers(_ atom: Node) throws -> Node {
            var node = atom
            while let c = peek() {
                var lo = 0
                var hi: Int? = nil
                switch c {
                case 0x2A: (lo, hi) = (0, nil)  // *
                case 0x2B: (lo, hi) = (1, nil)  // +
                case 0x3F: (lo, hi) = (0, 1)  // ?
                case 0x7B:  // {
                    guard let (a, b, length) = braces() else { return node }
                    (lo, hi) = (a, b)
                    pos += length - 1
                default: return node
                }
                pos += 1
                if case .start = node { throw err("nothing to repeat") }
                if case .end = node { throw err("nothing to repeat") }
                if peek() == 0x3F { pos += 1 }  // lazy: same set of matches
                node = .rep(node, min: lo, max: hi)
            }
            return node
        }

        /// `{n}`, `{n,}` or `{n,m}` at `pos`: the bounds and the length of the text, or nil when the
        /// brace is a literal.
        func braces() -> (Int, Int?, Int)? {
            var i = pos + 1
            func number() -> Int? {
                var v = 0
                var any = false
                while i < chars.count, (48...57).contains(chars[i]) {
                    v = min(v * 10 + Int(chars[i] - 48), Int(Int32.max))
                    i += 1
                    any = true
                }
                return any ? v : nil
            }
            guard let lo = number() else { return nil }
            var hi: Int? = lo
            if i < chars.count, chars[i] == 0x2C {
                i += 1
                hi = number()
            }
            guard i < chars.count, chars[i] == 0x7D else { return nil }
            return (lo, hi, i - pos + 1)
        }

        mutating func parseAtom(depth: Int) throws -> Node {
            let c = chars[pos]
            pos += 1
            switch c {
            case 0x28:  // (
                if peek() == 0x3F {  // ?
                    guard pos + 1 < chars.count, chars[pos + 1] == 0x3A else {
                        throw err("only (?: ) groups are supported (no look-around or flags)")
                    }
                    pos += 2
                }
                let inner = try parseAlternation(depth: depth + 1)
                guard peek() == 0x29 else { throw err("missing ')'") }
                pos += 1
                return inner
            case 0x5B: return .set(try parseClass())  // [
            case 0x2E: return .set(.any)  // .
            case 0x5E: return .start  // ^
            case 0x24: return .end  // $
            case 0x5C: return .set(try parseEscape())  // backslash
            case 0x2A, 0x2B, 0x3F: throw err("nothing to repeat")
            default: return .set(CharSet(ranges: [c...c]))
            }
        }

        mutating func parseEscape() throws -> CharSet {
            guard let c = peek() else { throw err("pattern ends with '\\'") }
            pos += 1
            switch c {
            case 0x64: return .digit  // d
            case 0x77: return .word  // w
            case 0x73: return .space  // s
            case 0x44: return CharSet(ranges: CharSet.digit.ranges, negated: true)
            case 0x57: return CharSet(ranges: CharSet.word.ranges, negated: true)
            case 0x53: return CharSet(ranges: CharSet.space.ranges, negated: true)
            case 0x6E: return CharSet(ranges: [10...10])  // n
            case 0x74: return CharSet(ranges: [9...9])  // t
            default:
                let isAlnum = (48...57).contains(c) || (65...90).contains(c) || (97...122).contains(c)
                if isAlnum { throw err("unsupported escape '\\\(Character(Unicode.Scalar(c)!))'") }
                return CharSet(ranges: [c...c])
            }
        }

        mutating func parseClass() throws -> CharSet {
            var set = CharSet(ranges: [])
            if peek() == 0x5E {
                set.negated = true
                pos += 1
            }
            var first = true
            while true {
                guard let c = peek() else { throw err("missing ']'") }
                if c == 0x5D, !first {
                    pos += 1
                    return set
                }
                first = false
                pos += 1
                var lo: UInt32
                if c == 0x5C {
                    let e = try parseEscape()
                    if e.negated || e.ranges.count != 1 || e.ranges[0].count != 1 {
                        if e.negated { throw err("negated escapes are not supported inside [...]") }
                        set.ranges += e.ranges
                        continue
                    }
                    lo = e.ranges[0].lowerBound
                } else {
                    lo = c
                }
                if peek() == 0x2D, pos + 1 < chars.count, chars[pos + 1] != 0x5D {  // a-z
                    pos += 1
                    var hi = chars[pos]
                    pos += 1
                    if hi == 0x5C {
                        let e = try parseEscape()
                        guard !e.negated, e.ranges.count == 1, e.ranges[0].count == 1 else {
                            throw err("bad range in [...]")
                        }
                        hi = e.ranges[0].lowerBound
                    }
                    guard lo <= hi else { throw err("range out of order in [...]") }
                    set.ranges.append(lo...hi)
                } else {
                    set.ranges.append(lo...lo)
                }
            }
        }
    }

    struct Compiler {
        var program = [Inst]()

        mutating func add(_ i: Inst) throws -> Int {
            if program.count >= LinearRegex.maxProgram {
                throw SyntaxError(message: "pattern too large (more than \(LinearRegex.maxProgram) instructions)")
            }
            program.append(i)
            return program.count - 1
        }

        mutating func emit(_ node: Node) throws {
            switch node {
            case .empty: break
            case .set(let s): _ = try add(.char(s))
            case .start: _ = try add(.atStart)
            case .end: _ = try add(.atEnd)
            case .concat(let items): for item in items { try emit(item) }
            case .alt(let branches):
                var jumps = [Int]()
                for (k, b) in branches.enumerated() {
                    if k < branches.count - 1 {
                        let split = try add(.split(0, 0))
                        try emit(b)
                        jumps.append(try add(.jump(0)))
                        program[split] = .split(split + 1, program.count)
                    } else {
                        try emit(b)
                    }
                }
                for j in jumps { program[j] = .jump(program.count) }
            case .rep(let inner, let lo, let hi):
                if lo > LinearRegex.maxRepeat || (hi ?? 0) > LinearRegex.maxRepeat {
                    throw SyntaxError(message: "repeat count above \(LinearRegex.maxRepeat)")
                }
                if let hi, hi < lo { throw SyntaxError(message: "repeat range out of order") }
                for _ in 0..<lo { try emit(inner) }
                if let hi {
                    // Optional copies: each may be skipped, jumping past the rest.
                    var splits = [Int]()
                    for _ in lo..<hi {
                        splits.append(try add(.split(0, 0)))
                        try emit(inner)
                    }
                    for s in splits { program[s] = .split(s + 1, program.count) }
                } else {
                    let split = try add(.split(0, 0))
                    try emit(inner)
                    _ = try add(.jump(split))
                    program[split] = .split(split + 1, program.count)
                }
            }
        }
    }
}
