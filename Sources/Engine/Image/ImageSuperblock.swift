// Why this file exists: the superblock is the one place a reader learns where everything else is, so it
// is decoded from one snapshot and checked completely (magic, version, state, checksum, every region
// against the file) before any offset in it is used.
import Sys

/// The immutable part of the superblock: written once by `ImageWriter.create`, durable before the
/// metadata commit, never changed afterwards (only the state word after it changes).
struct ImageSuperblock: Equatable, Sendable {
    var generation: UInt64
    var layout: ImageLayout
    var metadataDigest: UInt64
    var pageTableDigest: UInt64
    /// Filled in by `encoded()` and by `decode`.
    var superblockDigest: UInt64 = 0

    /// Bytes [0, stateWordOffset): every field and the digest over them; not the state word.
    func encoded() -> [UInt8] {
        var writer = BinaryWriter()
        writer.writeRawBytes(ImageLayout.magic)
        writer.writeUInt32(ImageLayout.formatVersion)
        writer.writeUInt32(UInt32(ImageLayout.pageSize))
        writer.writeUInt64(generation)
        writer.writeUInt64(UInt64(layout.fileByteCount))
        writer.writeUInt64(UInt64(layout.pageCount))
        writer.writeUInt64(UInt64(layout.metadataByteCount))
        writer.writeUInt64(metadataDigest)
        writer.writeUInt64(pageTableDigest)
        for kind in ImageRegionKind.allCases {
            let region = layout.region(kind)
            writer.writeUInt64(UInt64(region.offset))
            writer.writeUInt64(UInt64(region.byteCount))
        }
        precondition(writer.bytes.count == ImageLayout.superblockDigestOffset, "superblock fields: \(writer.bytes.count) bytes")
        writer.writeUInt64(SharedMapping.digest(of: writer.bytes, seed: ImageDigestSeed.superblock))
        return writer.bytes
    }

    /// Decodes a snapshot of the first `superblockEncodedByteCount` bytes of a file of `fileByteCount`
    /// bytes. Checks magic, then version and page size (a future version may lay the rest out
    /// differently), then the state (a half-written superblock is normal while creating, so "not
    /// committed" is the true answer before any checksum), then the checksum, then every region.
    static func decode(_ snapshot: [UInt8], path: String, fileByteCount: Int,
                       requireComplete: Bool) throws(ImageError) -> (ImageSuperblock, ImageState) {
        precondition(snapshot.count == ImageLayout.superblockEncodedByteCount, "superblock snapshot of \(snapshot.count) bytes")
        var reader = BinaryReader(snapshot)
        guard try reader.readRawBytes(count: ImageLayout.magic.count) == ImageLayout.magic else { throw .badMagic(path: path) }
        let version = try reader.readUInt32()
        guard version == ImageLayout.formatVersion else { throw .unsupportedVersion(path: path, version: version) }
        let pageSize = try reader.readUInt32()
        guard pageSize == UInt32(ImageLayout.pageSize) else { throw .unsupportedPageSize(path: path, pageSize: pageSize) }

        let stateReader = BinaryReader(Array(snapshot[ImageLayout.stateWordOffset...]))
        let state = try checkedState(word: stateReader, path: path, requireComplete: requireComplete)

        let digestedBytes = Array(snapshot[0..<ImageLayout.superblockDigestOffset])
        var digestReader = BinaryReader(Array(snapshot[ImageLayout.superblockDigestOffset..<ImageLayout.stateWordOffset]))
        let storedDigest = try digestReader.readUInt64()
        guard SharedMapping.digest(of: digestedBytes, seed: ImageDigestSeed.superblock) == storedDigest else {
            throw .superblockChecksumMismatch(path: path)
        }

        let generation = try reader.readUInt64()
        let claimedFileByteCount = try reader.readUInt64()
        guard let imageByteCount = Int(exactly: claimedFileByteCount), imageByteCount <= fileByteCount else {
            throw .truncated(path: path, byteCount: fileByteCount, requiredByteCount: Int(clamping: claimedFileByteCount))
        }
        let rawPageCount = try reader.readUInt64()
        let rawMetadataByteCount = try reader.readUInt64()
        let metadataDigest = try reader.readUInt64()
        let pageTableDigest = try reader.readUInt64()
        var regions: [ImageRegion] = []
        for kind in ImageRegionKind.allCases {
            let offset = try reader.readUInt64()
            let byteCount = try reader.readUInt64()
            regions.append(try checkedRegion(kind, offset: offset, byteCount: byteCount,
                                             imageByteCount: imageByteCount, path: path))
        }
        let pageCount = try checkedCount(rawPageCount, unitByteCount: ImageLayout.pageSize,
                                         fits: regions[ImageRegionKind.pageArea.rawValue], kind: .pageArea, path: path)
        let metadataByteCount = try checkedCount(rawMetadataByteCount, unitByteCount: 1,
                                                 fits: regions[ImageRegionKind.metadata.rawValue], kind: .metadata, path: path)
        let layout = ImageLayout(metadataByteCount: metadataByteCount, pageCount: pageCount,
                                 regions: regions, fileByteCount: imageByteCount)
        guard layout.metadata.byteCount >= layout.paddedMetadataByteCount else {
            throw .badRegion(path: path, region: .metadata, reason: "has \(layout.metadata.byteCount) bytes, the metadata needs \(layout.paddedMetadataByteCount)")
        }
        try checkRegionSize(layout.pageTable, needs: layout.pageTableByteCount, kind: .pageTable, path: path)
        try checkRegionSize(layout.marks, needs: layout.marksByteCount, kind: .marks, path: path)
        try checkRegionSize(layout.commitRecord, needs: ImageLayout.commitRecordByteCount, kind: .commitRecord, path: path)
        try checkNoOverlap(regions, path: path)
        let superblock = ImageSuperblock(generation: generation, layout: layout, metadataDigest: metadataDigest,
                                         pageTableDigest: pageTableDigest, superblockDigest: storedDigest)
        return (superblock, state)
    }

    private static func checkedState(word stateReader: BinaryReader, path: String,
                                     requireComplete: Bool) throws(ImageError) -> ImageState {
        var stateReader = stateReader
        let word = try stateReader.readUInt64()
        guard let state = ImageLayout.state(fromWord: word) else { throw .damagedState(path: path, word: word) }
        switch (state, requireComplete) {
        case (.creating, _): throw .uncommitted(path: path, state: state)
        case (.aborted, _): throw .aborted(path: path)
        case (.metadataCommitted, true): throw .uncommitted(path: path, state: state)
        case (.metadataCommitted, false), (.complete, _): return state
        }
    }

    private static func checkedRegion(_ kind: ImageRegionKind, offset rawOffset: UInt64, byteCount rawByteCount: UInt64,
                                      imageByteCount: Int, path: String) throws(ImageError) -> ImageRegion {
        guard let offset = Int(exactly: rawOffset), let byteCount = Int(exactly: rawByteCount),
              offset <= imageByteCount, byteCount <= imageByteCount - offset else {
            throw .badRegion(path: path, region: kind, reason: "(offset \(rawOffset), \(rawByteCount) bytes) runs past the end of the \(imageByteCount)-byte image")
        }
        guard offset % ImageLayout.pageSize == 0, byteCount % ImageLayout.pageSize == 0 else {
            throw .badRegion(path: path, region: kind, reason: "(offset \(offset), \(byteCount) bytes) is not in whole \(ImageLayout.pageSize)-byte pages")
        }
        guard offset >= ImageLayout.pageSize else {
            throw .badRegion(path: path, region: kind, reason: "at offset \(offset) overlaps the superblock")
        }
        return ImageRegion(offset: offset, byteCount: byteCount)
    }

    /// A count from the superblock, as an Int, after checking that `count × unitByteCount` fits `region`
    /// (so no later multiplication overflows).
    private static func checkedCount(_ rawCount: UInt64, unitByteCount: Int, fits region: ImageRegion,
                                     kind: ImageRegionKind, path: String) throws(ImageError) -> Int {
        guard let count = Int(exactly: rawCount), count <= region.byteCount / unitByteCount else {
            throw .badRegion(path: path, region: kind, reason: "has \(region.byteCount) bytes, too few for the \(rawCount) \(unitByteCount == 1 ? "bytes" : "pages") the superblock claims")
        }
        return count
    }

    private static func checkRegionSize(_ region: ImageRegion, needs byteCount: Int, kind: ImageRegionKind,
                                        path: String) throws(ImageError) {
        guard region.byteCount >= byteCount else {
            throw .badRegion(path: path, region: kind, reason: "has \(region.byteCount) bytes, needs \(byteCount)")
        }
    }

    private static func checkNoOverlap(_ regions: [ImageRegion], path: String) throws(ImageError) {
        let ordered = zip(ImageRegionKind.allCases, regions).filter { $0.1.byteCount > 0 }.sorted { $0.1.offset < $1.1.offset }
        for (earlier, later) in zip(ordered, ordered.dropFirst()) where earlier.1.endOffset > later.1.offset {
            throw .badRegion(path: path, region: later.0, reason: "at offset \(later.1.offset) overlaps the \(earlier.0) region")
        }
    }
}

extension ImageLayout {
    /// For the torture FAM checker, which interprets the writer's own superblock whatever its state word
    /// says (it reads it while the image is still being created): the generation and layout `snapshot`
    /// (the first `superblockEncodedByteCount` bytes of a file of `fileByteCount` bytes) describes,
    /// checked as `ImageReader.open` checks them, or nil when it is not a valid superblock.
    package static func decodeIgnoringState(_ snapshot: [UInt8], fileByteCount: Int) -> (generation: UInt64, layout: ImageLayout)? {
        guard snapshot.count == superblockEncodedByteCount else { return nil }
        // The state word is not digested; `decode` judges it before anything else, so put a readable one there.
        var patched = snapshot
        let word = stateWord(.complete)
        for byteIndex in 0..<8 { patched[stateWordOffset + byteIndex] = UInt8(truncatingIfNeeded: word >> (8 * UInt64(byteIndex))) }
        guard let (superblock, _) = try? ImageSuperblock.decode(patched, path: "the writer's superblock", fileByteCount: fileByteCount,
                                                                requireComplete: false) else { return nil }
        return (superblock.generation, superblock.layout)
    }
}
