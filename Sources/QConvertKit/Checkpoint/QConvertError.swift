/// A rule of a file format that input breaks, with the data that shows how. Each reader of hostile
/// input has its own enum of them (`SafetensorsRule`, `NpyRule`, `OnnxWireRule`, `PickleRule`,
/// `ZipRule`), so callers and tests match the rule, not its wording; `description` is the wording.
public protocol FormatViolation: Error, CustomStringConvertible, Sendable {}

/// Every error the library reports. Each case names the file, tensor or key it is about,
/// and `description` is a single line a person can act on.
public enum QConvertError: Error, CustomStringConvertible, Equatable, Sendable {
    /// A file breaks a rule of its format.
    case violation(path: String, any FormatViolation)
    /// A file could not be read, or is not what it claims to be.
    case badInput(path: String, message: String)
    /// Reading failed at the operating-system level.
    case io(path: String, message: String)
    /// A policy file (or --set value) is wrong; line and column are 1-based, 0 when unknown.
    case policy(path: String, line: Int, column: Int, message: String)
    /// A tensor's values cannot be quantized as asked (NaN, overflow…).
    case tensor(name: String, message: String)
    /// The output could not be written.
    case write(path: String, message: String)
    /// The request itself is inconsistent (unknown format, tensors-only input to a graph format…).
    case usage(message: String)
    /// A fault of qconvert itself: a state its own code should never reach.
    case `internal`(message: String)

    public var description: String {
        switch self {
        case .violation(let p, let v): return "\(p): \(v)"
        case .badInput(let p, let m): return "\(p): \(m)"
        case .io(let p, let m): return "\(p): \(m)"
        case .policy(let p, let l, let c, let m):
            return l > 0 ? "\(p):\(l):\(c): \(m)" : "\(p): \(m)"
        case .tensor(let n, let m): return "tensor '\(n)': \(m)"
        case .write(let p, let m): return "\(p): cannot write: \(m)"
        case .usage(let m): return m
        case .internal(let m): return "internal fault: \(m)"
        }
    }

    /// The process exit code the command line uses for this error (see README, exit codes).
    public var exitStatus: ExitStatus {
        switch self {
        case .usage: .usage
        case .policy: .policy
        case .violation, .badInput, .io, .tensor: .badInput
        case .write: .writeFailed
        case .internal: .internalFault
        }
    }

    public var exitCode: Int32 { exitStatus.rawValue }

    /// The rule a file breaks, when the error is one.
    public var violation: (any FormatViolation)? {
        if case .violation(_, let v) = self { return v }
        return nil
    }

    public static func == (a: QConvertError, b: QConvertError) -> Bool {
        switch (a, b) {
        case (.violation(let p, let v), .violation(let q, let w)):
            p == q && type(of: v) == type(of: w) && v.description == w.description
        case (.badInput(let p, let m), .badInput(let q, let n)), (.io(let p, let m), .io(let q, let n)),
            (.write(let p, let m), .write(let q, let n)):
            p == q && m == n
        case (.policy(let p, let l, let c, let m), .policy(let q, let k, let d, let n)):
            p == q && l == k && c == d && m == n
        case (.tensor(let a, let m), .tensor(let b, let n)): a == b && m == n
        case (.usage(let m), .usage(let n)), (.internal(let m), .internal(let n)): m == n
        default: false
        }
    }
}
