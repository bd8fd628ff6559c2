// Why this file exists: the process metadata in an image (registers, signal state, VMA table, ...) is
// encoded by the engine into one byte blob. The writer side is ours, so it asserts; the reader side
// reads bytes that crossed a node boundary through FAM, so every length and count is checked against
// what is left and against a limit, and a bad one throws `ImageError.malformedMetadata`, never traps.
import Sys

/// Appends little-endian values to a byte array.
public struct BinaryWriter: Sendable {
    public private(set) var bytes: [UInt8] = []

    public init() {}

    public mutating func writeUInt8(_ value: UInt8) { bytes.append(value) }
    public mutating func writeUInt16(_ value: UInt16) { appendLittleEndian(value) }
    public mutating func writeUInt32(_ value: UInt32) { appendLittleEndian(value) }
    public mutating func writeUInt64(_ value: UInt64) { appendLittleEndian(value) }
    public mutating func writeInt32(_ value: Int32) { appendLittleEndian(UInt32(bitPattern: value)) }
    public mutating func writeInt64(_ value: Int64) { appendLittleEndian(UInt64(bitPattern: value)) }
    public mutating func writeBool(_ value: Bool) { bytes.append(value ? 1 : 0) }

    /// Bytes as they are, no length: for fixed-size fields the reader knows the size of.
    public mutating func writeRawBytes(_ value: some Collection<UInt8>) { bytes.append(contentsOf: value) }

    /// A u32 byte count, then the bytes.
    public mutating func writeBytes(_ value: some Collection<UInt8>) {
        writeCount(value.count)
        bytes.append(contentsOf: value)
    }

    /// A u32 byte count, then the UTF-8 bytes.
    public mutating func writeString(_ value: String) { writeBytes(Array(value.utf8)) }

    /// A u32 element count, then each element as `writeElement` writes it.
    public mutating func writeArray<Element>(_ elements: [Element], _ writeElement: (inout BinaryWriter, Element) -> Void) {
        writeCount(elements.count)
        for element in elements { writeElement(&self, element) }
    }

    private mutating func writeCount(_ count: Int) {
        precondition(count <= Int(UInt32.max), "\(count) elements do not fit a u32 count")
        writeUInt32(UInt32(count))
    }

    private mutating func appendLittleEndian<Value: FixedWidthInteger>(_ value: Value) {
        LittleEndian.append(value, to: &bytes)
    }
}

/// Reads what `BinaryWriter` wrote, checking every read against the bytes that are left.
public struct BinaryReader: Sendable {
    /// Default cap on an array's element count; a caller with bigger tables passes its own.
    public static let defaultMaximumCount = 1 << 20

    private let bytes: [UInt8]
    public private(set) var byteOffset: Int = 0

    public init(_ bytes: [UInt8]) { self.bytes = bytes }

    public var remainingByteCount: Int { bytes.count - byteOffset }
    public var isAtEnd: Bool { byteOffset == bytes.count }

    public mutating func readUInt8() throws(ImageError) -> UInt8 { try readRawBytes(count: 1)[0] }
    public mutating func readUInt16() throws(ImageError) -> UInt16 { try readLittleEndian(UInt16.self) }
    public mutating func readUInt32() throws(ImageError) -> UInt32 { try readLittleEndian(UInt32.self) }
    public mutating func readUInt64() throws(ImageError) -> UInt64 { try readLittleEndian(UInt64.self) }
    public mutating func readInt32() throws(ImageError) -> Int32 { Int32(bitPattern: try readUInt32()) }
    public mutating func readInt64() throws(ImageError) -> Int64 { Int64(bitPattern: try readUInt64()) }

    public mutating func readBool() throws(ImageError) -> Bool {
        let startOffset = byteOffset
        switch try readUInt8() {
        case 0: return false
        case 1: return true
        case let other: throw .malformedMetadata(reason: "byte \(startOffset) is \(other), a bool must be 0 or 1")
        }
    }

    public mutating func readRawBytes(count: Int) throws(ImageError) -> [UInt8] {
        guard count >= 0, count <= remainingByteCount else {
            throw .malformedMetadata(reason: "\(count) bytes at byte \(byteOffset) run past the end (\(bytes.count) bytes)")
        }
        let slice = Array(bytes[byteOffset..<(byteOffset + count)])
        byteOffset += count
        return slice
    }

    /// A u32 byte count, then the bytes; at most `maximumByteCount` of them.
    public mutating func readBytes(maximumByteCount: Int = Int(UInt32.max)) throws(ImageError) -> [UInt8] {
        let count = try readCount(maximum: maximumByteCount, what: "byte array")
        return try readRawBytes(count: count)
    }

    public mutating func readString(maximumByteCount: Int = 1 << 16) throws(ImageError) -> String {
        let startOffset = byteOffset
        let utf8 = try readBytes(maximumByteCount: maximumByteCount)
        guard let string = String(validating: utf8, as: UTF8.self) else {
            throw .malformedMetadata(reason: "string at byte \(startOffset) is not valid UTF-8")
        }
        return string
    }

    /// A u32 element count, then each element as `readElement` reads it; at most `maximumCount` elements.
    /// `readElement` may throw any error (Swift does not infer typed throws for closures yet); one that is
    /// not an `ImageError` becomes `malformedMetadata` naming the element.
    public mutating func readArray<Element>(
        maximumCount: Int = BinaryReader.defaultMaximumCount,
        _ readElement: (inout BinaryReader) throws -> Element
    ) throws(ImageError) -> [Element] {
        let count = try readCount(maximum: maximumCount, what: "array")
        var elements: [Element] = []
        // Never trust a count for the allocation: every element takes at least one byte in practice,
        // and a corrupt count must not reserve gigabytes before the first element fails to read.
        elements.reserveCapacity(min(count, remainingByteCount))
        for elementIndex in 0..<count {
            do {
                elements.append(try readElement(&self))
            } catch let error as ImageError {
                throw error
            } catch {
                throw .malformedMetadata(reason: "array element \(elementIndex) before byte \(byteOffset): \(error)")
            }
        }
        return elements
    }

    /// Throws unless every byte was read: trailing bytes mean writer and reader disagree on the format.
    public func expectEnd() throws(ImageError) {
        guard isAtEnd else {
            throw .malformedMetadata(reason: "\(remainingByteCount) unread bytes after byte \(byteOffset)")
        }
    }

    private mutating func readCount(maximum: Int, what: String) throws(ImageError) -> Int {
        let startOffset = byteOffset
        let count = Int(try readUInt32())
        guard count <= maximum else {
            throw .malformedMetadata(reason: "\(what) at byte \(startOffset) claims \(count) elements, the limit is \(maximum)")
        }
        return count
    }

    private mutating func readLittleEndian<Value: FixedWidthInteger>(_ type: Value.Type) throws(ImageError) -> Value {
        let raw = try readRawBytes(count: MemoryLayout<Value>.size)
        var value = Value.zero
        for (index, byte) in raw.enumerated() { value |= Value(byte) << (8 * index) }
        return value
    }
}

extension Array where Element == UInt8 {
    mutating func appendLittleEndian<T: FixedWidthInteger>(_ value: T) {
        LittleEndian.append(value, to: &self)
    }
}
