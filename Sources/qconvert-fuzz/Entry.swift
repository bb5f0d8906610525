/// libFuzzer's callback, by its documented name (the sanitizer build's libFuzzer archive refers
/// to it); main.swift hands the same function to LLVMFuzzerRunDriver.
@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzOne(_ data: UnsafePointer<UInt8>?, _ size: Int) -> CInt {
    target(UnsafeRawBufferPointer(start: size > 0 ? data : nil, count: size))
    return 0
}
