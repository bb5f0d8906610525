/// Every exit status of the command line, in one table: the errors map to it, the help text and the
/// README's table are checked against it, and the C truncation guard is given its code from it.
public enum ExitStatus: Int32, CaseIterable, Sendable {
    case success = 0
    case policy = 2
    case badInput = 3
    case writeFailed = 4
    case gateFailed = 5
    case batchFailures = 6
    case usage = 64
    /// A fault of qconvert itself (an error nothing else names); the message says what failed.
    case internalFault = 70

    public var meaning: String {
        switch self {
        case .success: "success"
        case .policy: "policy error (unknown key, bad value, bad regex, `--strict` rule matching nothing, bad `--set`)"
        case .badInput:
            "bad input: unreadable or malformed checkpoint, NaN/Inf in a tensor to quantize, fp16 overflow, an input truncated while read"
        case .writeFailed: "the output could not be written"
        case .gateFailed: "a quality gate failed (`--min-sqnr`, `--min-cosine`, `--max-size-ratio`)"
        case .batchFailures: "batch: some models failed (the others were converted)"
        case .usage: "usage error (missing, conflicting or malformed options; a request the format cannot hold)"
        case .internalFault: "internal fault of qconvert (please report it with the message)"
        }
    }

    /// Interrupted by signal `n` (temporary files are removed): 128 + n.
    public static func interrupted(_ n: Int32) -> Int32 { 128 + n }

    /// One line per status, for `--help`.
    public static var summary: String {
        allCases.map { "\($0.rawValue) \($0.meaning.replacingOccurrences(of: "`", with: ""))" }.joined(separator: "; ")
            + "; 128+N interrupted by signal N (130 Ctrl-C, 143 SIGTERM)."
    }
}
