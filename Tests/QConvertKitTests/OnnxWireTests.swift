import Foundation
import Testing

@testable import QConvertKit

@Suite struct OnnxWireTests {
    func varint(_ v: Int) -> [UInt8] { ProtobufBytes.varint(v) }
    func ld(_ field: Int, _ payload: [UInt8]) -> [UInt8] { ProtobufBytes.ld(field, payload) }

    func check(_ bytes: [UInt8]) throws -> OnnxWireCheck { try bytes.withUnsafeBytes { try OnnxWireCheck.check($0) } }

    /// If nodes nested `levels` deep: model.graph(7) → node(1) → attribute(5) → g(6) → …
    func nested(_ levels: Int) -> [UInt8] {
        var graph: [UInt8] = []
        for _ in 0..<levels {
            let attr = ld(1, Array("then_branch".utf8)) + varint(20 << 3) + varint(5) + ld(6, graph)
            graph = ld(1, ld(4, Array("If".utf8)) + ld(5, attr))
        }
        return varint(1 << 3) + varint(8) + ld(7, graph)
    }

    @Test func acceptsModerateNestingAndFindsLargePayloads() throws {
        _ = try check(nested(10))
        let tensor = ld(8, Array("w".utf8)) + ld(9, [UInt8](repeating: 1, count: 1 << 20))
        let model = varint(1 << 3) + varint(8) + ld(7, ld(5, tensor))
        let c = try check(model)
        #expect(c.largePayloads.count == 1)
        #expect(c.largePayloads[0].length == 1 << 20)
    }

    @Test func refusesDeepNesting() {
        #expect(throws: OnnxWireRule.self) { try check(nested(40)) }
    }

    @Test func refusesTruncationAndBadWireTypes() {
        let good = nested(3)
        for cut in [1, good.count / 2, good.count - 1] {
            #expect(throws: OnnxWireRule.self) { try check(Array(good[0..<cut])) }
        }
        #expect(throws: OnnxWireRule.self) { try check([0x0B]) }  // wire type 3 (group)
        #expect(throws: OnnxWireRule.self) { try check([0x0A, 0xFF, 0xFF, 0xFF, 0xFF, 0x0F]) }
        #expect(throws: OnnxWireRule.self) { try check([UInt8](repeating: 0xFF, count: 12)) }
    }
}
