// Why this file exists: writer and reader must agree on where everything lives in a FAM image, byte for
// byte, on two nodes that share nothing else. This file is that agreement (format version 1):
//
//   offset 0       superblock (one 4 KiB page; fields below, little endian)
//   4096           metadata region      opaque engine blob (BinaryWriter), zero-padded to 8 bytes
//   ...            page table region    pageCount × u64 page address, page-aligned, strictly increasing
//   ...            marks region         pageCount × 16-byte dumped mark (u64 page code, u32 generation, u32 magic)
//   ...            commit record region magic, generation, pageCount, marks digest, digest, then the HMAC
//                  over it and every mark
//   ...            page area            pageCount × 4096-byte page slots; slot i at pageArea.offset + i*4096
//
// Every region starts on a 4 KiB boundary and is rounded up to whole pages, so a page slot never shares a
// cache line with anything else and regions never share a page. Every checksum is csys_digest64, seeded
// per purpose and bound to the generation, so a region copied from another image never verifies.

/// The life of an image, stored in the superblock's state word.
public enum ImageState: UInt32, Sendable, CaseIterable, CustomStringConvertible {
    /// Being written; nothing in it may be read.
    case creating = 0
    /// Superblock, metadata and page table are durable: a target may restore and start faulting.
    case metadataCommitted = 1
    /// Every page and mark is durable and the commit record verifies.
    case complete = 2
    /// The source gave up; never read.
    case aborted = 3

    public var description: String {
        switch self {
        case .creating: "creating"
        case .metadataCommitted: "metadataCommitted"
        case .complete: "complete"
        case .aborted: "aborted"
        }
    }
}

/// A byte range of the image file.
public struct ImageRegion: Equatable, Sendable {
    public var offset: Int
    public var byteCount: Int
    public var endOffset: Int { offset + byteCount }

    public init(offset: Int, byteCount: Int) {
        self.offset = offset
        self.byteCount = byteCount
    }
}

/// The regions in superblock region-table order.
public enum ImageRegionKind: Int, Sendable, CaseIterable, CustomStringConvertible {
    case metadata, pageTable, marks, pageArea, commitRecord

    public var description: String {
        switch self {
        case .metadata: "metadata"
        case .pageTable: "page table"
        case .marks: "marks"
        case .pageArea: "page area"
        case .commitRecord: "commit record"
        }
    }
}

/// Where everything of one image lives.
public struct ImageLayout: Equatable, Sendable {
    /// 2: the image is authenticated (key identifier, creator record, header and commit codes).
    /// 3: each dumped mark holds its page's keyed code, not an unkeyed digest.
    public static let formatVersion: UInt32 = 3
    public static let pageSize = 4096
    /// "FAMMIGI\0"
    public static let magic: [UInt8] = [0x46, 0x41, 0x4D, 0x4D, 0x49, 0x47, 0x49, 0x00]
    /// "FAMMIGC\0" read as a little-endian u64.
    package static let commitRecordMagic: UInt64 = 0x0043_4749_4D4D_4146
    /// "MARK" read as a little-endian u32.
    package static let markMagic: UInt32 = 0x4B52_414D
    package static let markByteCount = 16
    static let pageTableEntryByteCount = 8
    /// The commit record's checksummed words (magic, generation, pageCount, marks digest), its checksum
    /// after them, then its code.
    package static let commitRecordDigestedByteCount = 32
    package static let commitRecordCodeOffset = 40
    package static let codeByteCount = 32
    package static let commitRecordByteCount = commitRecordCodeOffset + codeByteCount

    // Superblock field offsets. The state word sits after the digested fields: it is the only field that
    // changes once the superblock is durable, so it is left out of the superblock digest and instead
    // checks itself (state in the low half, its complement in the high half). A state change is then one
    // aligned 8-byte store followed by flush + fence, and a reader never sees half of it.
    package static let versionOffset = 8            // u32 formatVersion, then u32 pageSize
    package static let generationOffset = 16
    package static let fileByteCountOffset = 24
    package static let pageCountOffset = 32
    package static let metadataByteCountOffset = 40
    package static let metadataDigestOffset = 48
    package static let pageTableDigestOffset = 56
    package static let regionTableOffset = 64       // 5 × (u64 offset, u64 byteCount)
    package static let superblockDigestOffset = 144 // digest of bytes [0, 144)
    package static let stateWordOffset = 152
    // Authentication, after the state word: written with the superblock, covered by the header code
    // (which is not in the checksum: a key identifier or creator record that is wrong is a refusal of
    // the key or of the header, never "corrupted").
    package static let keyIdentifierOffset = 160
    package static let keyIdentifierByteCount = 16
    package static let creatorOffset = 176       // ImageCreator.encodedByteCount bytes
    package static let headerCodeOffset = 192
    // The image identity (zero: none), after the header code: which migration the image is of, agreed
    // in the nodes' handshake (MigrationPlan.imageIdentity). Not under the header code itself, but bound
    // by it: the key identifier stored above is the key's identifier for this identity.
    package static let imageIdentityOffset = 224
    package static let imageIdentityByteCount = 16
    package static let superblockEncodedByteCount = 240

    public let metadataByteCount: Int
    public let pageCount: Int
    public let metadata: ImageRegion
    public let pageTable: ImageRegion
    public let marks: ImageRegion
    public let pageArea: ImageRegion
    public let commitRecord: ImageRegion
    public let fileByteCount: Int

    /// The layout the writer uses for this much metadata and this many pages.
    public init(metadataByteCount: Int, pageCount: Int) {
        precondition(metadataByteCount >= 0 && pageCount >= 0, "negative image size: \(metadataByteCount), \(pageCount)")
        var nextOffset = Self.pageSize  // after the superblock
        func allocate(_ byteCount: Int) -> ImageRegion {
            let region = ImageRegion(offset: nextOffset, byteCount: Self.roundedUpToPage(byteCount))
            nextOffset = region.endOffset
            return region
        }
        self.metadataByteCount = metadataByteCount
        self.pageCount = pageCount
        metadata = allocate(metadataByteCount)
        pageTable = allocate(pageCount * Self.pageTableEntryByteCount)
        marks = allocate(pageCount * Self.markByteCount)
        commitRecord = allocate(Self.commitRecordByteCount)
        pageArea = allocate(pageCount * Self.pageSize)
        fileByteCount = nextOffset
    }

    /// A layout read back from a superblock; the reader has checked every region against the file.
    init(metadataByteCount: Int, pageCount: Int, regions: [ImageRegion], fileByteCount: Int) {
        precondition(regions.count == ImageRegionKind.allCases.count, "\(regions.count) regions")
        self.metadataByteCount = metadataByteCount
        self.pageCount = pageCount
        metadata = regions[ImageRegionKind.metadata.rawValue]
        pageTable = regions[ImageRegionKind.pageTable.rawValue]
        marks = regions[ImageRegionKind.marks.rawValue]
        pageArea = regions[ImageRegionKind.pageArea.rawValue]
        commitRecord = regions[ImageRegionKind.commitRecord.rawValue]
        self.fileByteCount = fileByteCount
    }

    /// The file size an image with this much metadata and this many pages needs: create the FAM file
    /// with exactly this many bytes.
    public static func byteCount(metadataByteCount: Int, pageCount: Int) -> Int {
        ImageLayout(metadataByteCount: metadataByteCount, pageCount: pageCount).fileByteCount
    }

    public func region(_ kind: ImageRegionKind) -> ImageRegion {
        switch kind {
        case .metadata: metadata
        case .pageTable: pageTable
        case .marks: marks
        case .pageArea: pageArea
        case .commitRecord: commitRecord
        }
    }

    /// Metadata is stored zero-padded to 8 bytes because the digest works on whole 8-byte words.
    package var paddedMetadataByteCount: Int { (metadataByteCount + 7) / 8 * 8 }
    package var pageTableByteCount: Int { pageCount * Self.pageTableEntryByteCount }
    package var marksByteCount: Int { pageCount * Self.markByteCount }

    public func pageOffset(slot: Int) -> Int {
        precondition(slot >= 0 && slot < pageCount, "page slot \(slot) outside 0..<\(pageCount)")
        return pageArea.offset + slot * Self.pageSize
    }

    package func markOffset(slot: Int) -> Int {
        precondition(slot >= 0 && slot < pageCount, "mark slot \(slot) outside 0..<\(pageCount)")
        return marks.offset + slot * Self.markByteCount
    }

    static func roundedUpToPage(_ byteCount: Int) -> Int {
        (byteCount + pageSize - 1) / pageSize * pageSize
    }

    // MARK: Records

    /// The second word of a mark: generation and magic together, stored after the digest word (same
    /// cache line, program order), so a reader that sees this word also sees the digest it vouches for.
    package static func markTag(generation: UInt64) -> UInt64 {
        UInt64(UInt32(truncatingIfNeeded: generation)) | UInt64(markMagic) << 32
    }

    package static func stateWord(_ state: ImageState) -> UInt64 {
        UInt64(state.rawValue) | UInt64(~state.rawValue) << 32
    }

    /// The state a state word holds, or nil when the word is damaged (halves disagree) or unknown.
    package static func state(fromWord word: UInt64) -> ImageState? {
        let low = UInt32(truncatingIfNeeded: word)
        guard UInt32(truncatingIfNeeded: word >> 32) == ~low else { return nil }
        return ImageState(rawValue: low)
    }
}

/// Digest seeds: one per purpose, mixed with the generation, so that no region verifies in the place of
/// another or in an image of another generation.
package enum ImageDigestSeed {
    package static let superblock: UInt64 = 0x5355_5045_5242_4C4B
    package static func metadata(generation: UInt64) -> UInt64 { generation ^ 0x4D45_5441_4441_5441 }
    package static func pageTable(generation: UInt64) -> UInt64 { generation ^ 0x5041_4745_5441_424C }
    package static func marks(generation: UInt64) -> UInt64 { generation ^ 0x4D41_524B_5245_4749 }
    package static func commitRecord(generation: UInt64) -> UInt64 { generation ^ 0x434F_4D4D_4954_5245 }
    /// Bound to the page's address too: a page in the wrong slot fails its mark.
    package static func page(generation: UInt64, address: UInt64) -> UInt64 {
        generation ^ (address &* 0x9E37_79B9_7F4A_7C15) ^ 0x5041_4745_4441_5441
    }
}

// The page size where arithmetic needs it, spelled once (above): `offset / .pageSize`, `address % .pageSize`.
extension Int {
    public static let pageSize = ImageLayout.pageSize
}

extension UInt64 {
    public static let pageSize = UInt64(ImageLayout.pageSize)
}
