// Little-endian integers in byte arrays, at memory speed: the image's tables are read and written
// word by word, and a byte-by-byte reader is too slow for the page table of a big process.

public enum LittleEndian {
    /// Appends `value`'s bytes, least significant first.
    public static func append<Value: FixedWidthInteger>(_ value: Value, to bytes: inout [UInt8]) {
        withUnsafeBytes(of: value.littleEndian) { bytes.append(contentsOf: $0) }
    }

    /// `count` consecutive 64-bit words from the start of `bytes` (which holds at least `count * 8`).
    public static func words(_ bytes: [UInt8], count: Int) -> [UInt64] {
        precondition(bytes.count >= count * 8, "\(bytes.count) bytes hold fewer than \(count) words")
        return bytes.withUnsafeBytes { raw in
            (0..<count).map { UInt64(littleEndian: raw.loadUnaligned(fromByteOffset: $0 * 8, as: UInt64.self)) }
        }
    }
}
