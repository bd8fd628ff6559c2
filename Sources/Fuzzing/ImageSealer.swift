// Why this file exists: a mutated image is refused at its first checksum, so a fuzzer that only flips
// bytes never reaches the decoders behind the checks. An insider who holds the migration key (a source
// node that went bad) can write any bytes and seal them; the reader must still refuse everything a
// real process could not have, without trapping. The sealer plays that insider: after a mutation it
// recomputes every checksum and code of the image under the key, in the order the writer makes them.
import Crypto
import Engine
import Sys

public enum ImageSealer {
    /// Seals what can be sealed: when the superblock's fields describe no valid layout, only its own
    /// checksum is fixed (the reader then refuses the layout, which is what is being fuzzed).
    public static func reseal(_ fam: MemoryFAM, key: MigrationKey) {
        guard fam.byteCount >= ImageLayout.superblockEncodedByteCount else { return }
        sealSuperblockDigest(fam)
        let snapshot = fam.loadBytes(at: 0, count: ImageLayout.superblockEncodedByteCount)
        guard let (generation, layout) = ImageLayout.decodeIgnoringState(snapshot, fileByteCount: fam.byteCount) else { return }
        let paddedMetadata = fam.loadBytes(at: layout.metadata.offset, count: layout.paddedMetadataByteCount)
        let pageTable = fam.loadBytes(at: layout.pageTable.offset, count: layout.pageTableByteCount)
        fam.storeUInt64(SharedMapping.digest(of: paddedMetadata, seed: ImageDigestSeed.metadata(generation: generation)),
                        at: ImageLayout.metadataDigestOffset)
        fam.storeUInt64(SharedMapping.digest(of: pageTable, seed: ImageDigestSeed.pageTable(generation: generation)),
                        at: ImageLayout.pageTableDigestOffset)
        sealSuperblockDigest(fam)

        let authenticator = ImageAuthenticator(key: key)
        fam.store(authenticator.keyIdentifier, at: ImageLayout.keyIdentifierOffset)
        let sealed = fam.loadBytes(at: 0, count: ImageLayout.superblockEncodedByteCount)
        let headerCode = Array(authenticator.headerCode(
            superblock: Array(sealed[0..<ImageLayout.stateWordOffset]),
            extensionFields: Array(sealed[ImageLayout.keyIdentifierOffset..<ImageLayout.headerCodeOffset]),
            paddedMetadata: paddedMetadata, pageTable: pageTable))
        fam.store(headerCode, at: ImageLayout.headerCodeOffset)

        // Every stored mark vouches for its page again (the page table may have moved it).
        let addresses = LittleEndian.words(pageTable, count: layout.pageCount)
        for slot in 0..<layout.pageCount {
            let markOffset = layout.markOffset(slot: slot)
            guard fam.loadUInt64(at: markOffset + 8) == ImageLayout.markTag(generation: generation) else { continue }
            let page = fam.loadBytes(at: layout.pageOffset(slot: slot), count: ImageLayout.pageSize)
            fam.storeUInt64(authenticator.markDigest(page: page, generation: generation, address: addresses[slot], headerCode: headerCode),
                            at: markOffset)
        }
        sealCommitRecord(fam, layout: layout, generation: generation, authenticator: authenticator, headerCode: headerCode)
    }

    /// Seals only what anyone can recompute (checksums, no codes): an attacker who can write FAM but
    /// does not hold the key. `forgedPages`: slots whose page this attacker rewrote, with its mark's
    /// unkeyed digest recomputed the way a checksum would be.
    public static func recomputeChecksums(_ fam: MemoryFAM, forgedPages: [Int] = []) {
        guard fam.byteCount >= ImageLayout.superblockEncodedByteCount else { return }
        sealSuperblockDigest(fam)
        let snapshot = fam.loadBytes(at: 0, count: ImageLayout.superblockEncodedByteCount)
        guard let (generation, layout) = ImageLayout.decodeIgnoringState(snapshot, fileByteCount: fam.byteCount) else { return }
        let pageTable = fam.loadBytes(at: layout.pageTable.offset, count: layout.pageTableByteCount)
        let addresses = LittleEndian.words(pageTable, count: layout.pageCount)
        for slot in forgedPages where slot < layout.pageCount {
            let page = fam.loadBytes(at: layout.pageOffset(slot: slot), count: ImageLayout.pageSize)
            fam.storeUInt64(SharedMapping.digest(of: page, seed: ImageDigestSeed.page(generation: generation, address: addresses[slot])),
                            at: layout.markOffset(slot: slot))
        }
        let marks = fam.loadBytes(at: layout.marks.offset, count: layout.marksByteCount)
        let record = fam.loadBytes(at: layout.commitRecord.offset, count: ImageLayout.commitRecordCodeOffset)
        guard LittleEndian.words(record, count: 1)[0] == ImageLayout.commitRecordMagic else { return }
        let words = LittleEndian.words(record, count: 3)
        fam.store(commitRecord(generation: words[1], pageCount: words[2], marks: marks, imageGeneration: generation), at: layout.commitRecord.offset)
    }

    private static func sealSuperblockDigest(_ fam: MemoryFAM) {
        let digested = fam.loadBytes(at: 0, count: ImageLayout.superblockDigestOffset)
        fam.storeUInt64(SharedMapping.digest(of: digested, seed: ImageDigestSeed.superblock), at: ImageLayout.superblockDigestOffset)
    }

    private static func sealCommitRecord(_ fam: MemoryFAM, layout: ImageLayout, generation: UInt64,
                                         authenticator: ImageAuthenticator, headerCode: [UInt8]) {
        let existing = fam.loadBytes(at: layout.commitRecord.offset, count: ImageLayout.commitRecordCodeOffset)
        // No commit record (a post-copy image before its commit): nothing to seal.
        guard LittleEndian.words(existing, count: 1)[0] == ImageLayout.commitRecordMagic else { return }
        let words = LittleEndian.words(existing, count: 3)
        let marks = fam.loadBytes(at: layout.marks.offset, count: layout.marksByteCount)
        var record = commitRecord(generation: words[1], pageCount: words[2], marks: marks, imageGeneration: generation)
        record += Array(authenticator.commitCode(headerCode: headerCode, commitRecord: record, marks: marks))
        fam.store(record, at: layout.commitRecord.offset)
    }

    /// The commit record's checksummed part, with its generation and page count as they were stored
    /// (a mutation there is what the reader must judge), and the marks digest and checksum recomputed.
    private static func commitRecord(generation: UInt64, pageCount: UInt64, marks: [UInt8], imageGeneration: UInt64) -> [UInt8] {
        var writer = BinaryWriter()
        writer.writeUInt64(ImageLayout.commitRecordMagic)
        writer.writeUInt64(generation)
        writer.writeUInt64(pageCount)
        writer.writeUInt64(SharedMapping.digest(of: marks, seed: ImageDigestSeed.marks(generation: imageGeneration)))
        writer.writeUInt64(SharedMapping.digest(of: writer.bytes, seed: ImageDigestSeed.commitRecord(generation: imageGeneration)))
        return writer.bytes
    }
}
