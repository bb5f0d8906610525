/// Every error the library reports. Each case names the file, tensor or key it is about,
/// and `description` is a single line a person can act on.
public enum QConvertError: Error, CustomStringConvertible, Equatable, Sendable {
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
        case .badInput, .io, .tensor: .badInput
        case .write: .writeFailed
        case .internal: .internalFault
        }
    }

    public var exitCode: Int32 { exitStatus.rawValue }
}
