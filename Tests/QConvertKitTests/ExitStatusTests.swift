import Foundation
import Testing

@testable import QConvertKit

@Suite struct ExitStatusTable {
    /// The README's exit-code table lists exactly the statuses of `ExitStatus`, with their meanings.
    @Test func readmeTableIsTheCodeTable() throws {
        let readme = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
            .deletingLastPathComponent()
            .appendingPathComponent("README.md")
        let text = try String(contentsOf: readme, encoding: .utf8)
        guard let start = text.range(of: "### Exit codes") else {
            Issue.record("README has no exit-code section")
            return
        }
        var rows: [Int32: String] = [:]
        for line in text[start.upperBound...].split(separator: "\n") {
            if line.hasPrefix("## ") { break }
            let cells = line.split(separator: "|", omittingEmptySubsequences: false).map {
                $0.trimmingCharacters(in: .whitespaces)
            }
            if cells.count == 4, let code = Int32(cells[1]) { rows[code] = cells[2] }
        }
        #expect(rows == Dictionary(uniqueKeysWithValues: ExitStatus.allCases.map { ($0.rawValue, $0.meaning) }))
    }

    /// Every library error maps to a documented status other than success.
    @Test func everyErrorHasADocumentedStatus() {
        let errors: [QConvertError] = [
            .badInput(path: "p", message: "m"), .io(path: "p", message: "m"),
            .policy(path: "p", line: 1, column: 1, message: "m"),
            .tensor(name: "t", message: "m"), .write(path: "p", message: "m"), .usage(message: "m"),
            .internal(message: "m")
        ]
        for e in errors {
            #expect(e.exitStatus != .success)
            #expect(ExitStatus(rawValue: e.exitCode) == e.exitStatus)
            #expect(!e.description.contains("\n"))
        }
    }
}
