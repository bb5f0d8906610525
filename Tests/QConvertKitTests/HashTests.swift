import CQKernels
import Foundation
import Testing

@testable import QConvertKit

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
        #expect(
            ContentHash.sha256.digest(of: Array("abc".utf8))
                == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad")
    }

    func sha(_ bytes: [UInt8], chunks: [Int], portable: Bool) -> String {
        var d = Digester(.sha256, portable: portable)
        var off = 0
        for c in chunks + [bytes.count] where off < bytes.count {
            let n = min(c, bytes.count - off)
            bytes.withUnsafeBytes { d.update(UnsafeRawBufferPointer(rebasing: $0[off..<(off + n)])) }
            off += n
        }
        return d.hex()
    }

    /// FIPS 180-4 example vectors, both compression functions, every padding boundary.
    @Test func sha256KnownVectors() {
        let million = [UInt8](repeating: UInt8(ascii: "a"), count: 1_000_000)
        let two = Array("abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq".utf8)
        for portable in [true, false] {
            #expect(
                sha([], chunks: [], portable: portable)
                    == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855")
            #expect(
                sha(Array("abc".utf8), chunks: [], portable: portable)
                    == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
            )
            #expect(
                sha(two, chunks: [], portable: portable)
                    == "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1")
            #expect(
                sha(million, chunks: [1, 63, 64, 65, 4096], portable: portable)
                    == "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0")
        }
        // lengths around the 55/56/64-byte padding edges: the two implementations agree
        var rng = SeededRandom(7)
        let data = (0..<300).map { _ in UInt8(truncatingIfNeeded: rng.next()) }
        for n in [0, 1, 55, 56, 57, 63, 64, 65, 119, 120, 127, 128, 129, 300] {
            let bytes = Array(data[0..<n])
            #expect(
                sha(bytes, chunks: [], portable: true) == sha(bytes, chunks: [7, 13], portable: false), "length \(n)")
        }
        #expect(sha256Hex("abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad")
    }
}
