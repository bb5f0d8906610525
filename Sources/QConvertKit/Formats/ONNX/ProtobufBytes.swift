/// Protobuf wire bytes written by hand: fields appended to a model (calibration), and test models.
enum ProtobufBytes {
    static func varint(_ v: Int) -> [UInt8] {
        var v = UInt64(v)
        var out: [UInt8] = []
        repeat {
            let b = UInt8(v & 0x7F)
            v >>= 7
            out.append(v != 0 ? b | 0x80 : b)
        } while v != 0
        return out
    }

    /// A length-delimited field.
    static func ld(_ field: Int, _ payload: [UInt8]) -> [UInt8] {
        varint(field << 3 | 2) + varint(payload.count) + payload
    }
    static func text(_ field: Int, _ s: String) -> [UInt8] { ld(field, Array(s.utf8)) }
}
