import Foundation
import Testing
@testable import QConvertKit
import CQKernels

@Suite struct HashTests {
    func xxh64(_ bytes: [UInt8], chunks: [Int]) -> String {
        var s = qk_xxh64_state()
        qk_xxh64_init(&s)
        var off = 0
        for c in chunks + [bytes.count] where off < bytes.count {
            let n = min(c, bytes.count - off)
            bytes.withUnsafeBytes { qk_xxh64_update(&s, $0.baseAddress! + off, n) }
            off += n
        }
        return String(format: "%016llx", qk_xxh64_digest(&s))
    }

    @Test func knownVectors() {
        // values printed by the Python xxhash package
        #expect(xxh64([], chunks: []) == "ef46db3751d8e999")
        #expect(xxh64(Array("abc".utf8), chunks: []) == "44bc2cf5ad770999")
    }

    @Test func streamingDoesNotDependOnChunking() {
        var rng = SeededRandom(1)
        let data = (0..<1000).map { _ in UInt8(truncatingIfNeeded: rng.next()) }
        let whole = xxh64(data, chunks: [1000])
        #expect(xxh64(data, chunks: [1, 31, 32, 33, 7, 100]) == whole)
        #expect(xxh64(data, chunks: [3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3]) == whole)
        #expect(ContentHash.xxh64.digest(of: data) == whole)
        #expect(ContentHash.sha256.digest(of: Array("abc".utf8)) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad")
    }
}
