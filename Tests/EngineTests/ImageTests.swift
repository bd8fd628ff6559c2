// The FAM image on real /dev/shm files: a round trip with pages read from this very process through
// process_vm_readv, and one clear error for each way an image can be damaged. Every file is removed by a
// defer, also when an expectation fails.
import Foundation
import Glibc
import Testing
import Torture
@testable import Engine
import Sys

/// Unique /dev/shm paths for one test, all removed by `removeAll()`.
final class ScratchFiles {
    private let prefix = "/dev/shm/fammig-imagetest-\(getpid())-\(UInt64.random(in: 0...UInt64.max))"
    private var paths: [String] = []

    func path(_ name: String) -> String {
        let path = "\(prefix)-\(name)"
        paths.append(path)
        return path
    }

    func removeAll() {
        for path in paths { _ = try? SharedMapping.remove(path: path) }
    }
}

/// Stand-in victim memory: pages of a shared mapping in this process, each filled with its own pattern.
struct SourceMemory {
    static let pageCount = 8
    let mapping: SharedMapping

    init(path: String) throws {
        mapping = try SharedMapping.create(path: path, byteCount: Self.pageCount * ImageLayout.pageSize, prefault: true)
        for pageIndex in 0..<Self.pageCount { mapping.store(bytes: Self.pattern(pageIndex: pageIndex), at: pageIndex * ImageLayout.pageSize) }
    }

    static func pattern(pageIndex: Int) -> [UInt8] {
        (0..<ImageLayout.pageSize).map { UInt8(truncatingIfNeeded: $0 &* 7 &+ pageIndex &* 31 &+ ($0 >> 8)) }
    }

    func address(pageIndex: Int) -> UInt64 { UInt64(mapping.address(at: pageIndex * ImageLayout.pageSize)) }
}

/// The slots every image here dumps: source pages 0, 1, 2 (one run), 4 and 7.
let dumpedPageIndexes = [0, 1, 2, 4, 7]
let testGeneration: UInt64 = 42
/// The migration key every test image is written and read with (and a second one, for "wrong key").
let testKey = makeTestKey(fill: 0x5A)
let otherTestKey = makeTestKey(fill: 0xA5)

func makeTestKey(fill: UInt8) -> MigrationKey {
    guard let key = try? MigrationKey(bytes: Array(repeating: fill, count: MigrationKey.byteCount)) else {
        preconditionFailure("a 32-byte key was refused")
    }
    return key
}
let selfProcessID = ProcessID(getpid())

func sampleMetadata() -> [UInt8] {
    var writer = BinaryWriter()
    writer.writeString("memwalk")
    writer.writeUInt64(0x7fff_1234_5678)
    writer.writeArray([1, 2, 3] as [Int32]) { $0.writeInt32($1) }
    writer.writeBytes([9, 8, 7])
    return writer.bytes
}

/// Writes an image of `dumpedPageIndexes` into a new file; stops after `phase`.
@discardableResult
func writeImage(path: String, source: SourceMemory, upTo phase: ImageWriter.Phase = .complete) throws -> ImageWriter {
    let addresses = dumpedPageIndexes.map { source.address(pageIndex: $0) }
    let metadata = sampleMetadata()
    let byteCount = ImageLayout.byteCount(metadataByteCount: metadata.count, pageCount: addresses.count)
    let fam = try RealFAM.create(path: path, byteCount: byteCount, prefault: true)
    var writer = try ImageWriter.create(backend: fam, generation: testGeneration, metadata: metadata, pageAddresses: addresses, key: testKey)
    if phase == .created { return writer }
    writer.commitMetadata()
    if phase == .metadataCommitted { return writer }
    // Priority pages first: the dump order is not the slot order.
    try writer.dumpPages(processID: selfProcessID, slots: 3..<5)
    try writer.dumpPages(processID: selfProcessID, slots: 0..<3)
    writer.commit()
    return writer
}

/// Opens `path` the way a target node does, returning the error it gives, or nil.
func openError(_ path: String, requireComplete: Bool = true) -> ImageError? {
    do throws(ImageError) {
        _ = try ImageReader.open(backend: try RealFAM.open(path: path, writable: false), key: testKey, requireComplete: requireComplete)
        return nil
    } catch {
        return error
    }
}

func flipByte(path: String, at byteOffset: Int) throws {
    let mapping = try SharedMapping.open(path: path, writable: true)
    mapping.store(bytes: [mapping.loadBytes(at: byteOffset, count: 1)[0] ^ 0xFF], at: byteOffset)
}

@Suite struct ImageTests {
    @Test func roundTripWithPagesOfThisProcess() throws {
        let files = ScratchFiles()
        defer { files.removeAll() }
        let source = try SourceMemory(path: files.path("source"))
        let imagePath = files.path("image")
        let writer = try writeImage(path: imagePath, source: source)
        #expect(writer.markedPageCount == dumpedPageIndexes.count)

        var reader = try ImageReader.open(backend: try RealFAM.open(path: imagePath, writable: false), key: testKey, requireComplete: true)
        #expect(reader.openedState == .complete)
        #expect(reader.generation == testGeneration)
        #expect(reader.metadata == sampleMetadata())
        #expect(reader.pageAddresses == dumpedPageIndexes.map { source.address(pageIndex: $0) })
        for (slot, pageIndex) in dumpedPageIndexes.enumerated() {
            let isMarked = reader.isMarked(slot: slot)
            #expect(isMarked)
            #expect(reader.loadPage(slot: slot) == SourceMemory.pattern(pageIndex: pageIndex))
            let address = source.address(pageIndex: pageIndex)
            // The mark holds the page's keyed code, bound to the header code the superblock carries.
            let headerCode = try RealFAM.open(path: imagePath, writable: false)
                .loadBytes(at: ImageLayout.headerCodeOffset, count: ImageLayout.codeByteCount)
            let expectedDigest = ImageAuthenticator(key: testKey).markDigest(page: SourceMemory.pattern(pageIndex: pageIndex), generation: testGeneration,
                                                                            address: address, headerCode: headerCode)
            #expect(reader.pageDigest(slot: slot) == expectedDigest)
            #expect(reader.slot(forAddress: address) == slot)
        }
        #expect(reader.slot(forAddress: source.address(pageIndex: 3)) == nil)

        var metadataReader = BinaryReader(reader.metadata)
        #expect(try metadataReader.readString() == "memwalk")
        #expect(try metadataReader.readUInt64() == 0x7fff_1234_5678)
        #expect(try metadataReader.readArray { try $0.readInt32() } == [1, 2, 3])
        #expect(try metadataReader.readBytes() == [9, 8, 7])
        try metadataReader.expectEnd()

        let summary = ImageSummary(reader: reader).lines.joined(separator: "\n")
        #expect(summary.contains("complete"))
        #expect(summary.contains("dumped marks    5 of 5"))
        #expect(summary.contains("page area"))
    }

    enum DamagedRegion: CaseIterable, Sendable { case superblock, metadata, pageTable, mark, page, commitRecord }

    @Test(arguments: DamagedRegion.allCases) func oneFlippedByteIsNamed(region: DamagedRegion) throws {
        let files = ScratchFiles()
        defer { files.removeAll() }
        let source = try SourceMemory(path: files.path("source"))
        let imagePath = files.path("image")
        let layout = try writeImage(path: imagePath, source: source).layout
        #expect(openError(imagePath) == nil)

        let expected: ImageError
        switch region {
        case .superblock:
            try flipByte(path: imagePath, at: ImageLayout.generationOffset)
            expected = .superblockChecksumMismatch(path: imagePath)
        case .metadata:
            try flipByte(path: imagePath, at: layout.metadata.offset + 3)
            expected = .metadataChecksumMismatch(path: imagePath)
        case .pageTable:
            try flipByte(path: imagePath, at: layout.pageTable.offset + 8 + 2)
            expected = .pageTableChecksumMismatch(path: imagePath)
        case .mark:
            try flipByte(path: imagePath, at: layout.markOffset(slot: 2) + 1)
            expected = .marksChecksumMismatch(path: imagePath)
        case .page:
            try flipByte(path: imagePath, at: layout.pageOffset(slot: 3) + 100)
            expected = .pageChecksumMismatch(path: imagePath, slot: 3, address: source.address(pageIndex: dumpedPageIndexes[3]))
        case .commitRecord:
            try flipByte(path: imagePath, at: layout.commitRecord.offset + 24)
            expected = .badCommitRecord(path: imagePath, reason: "does not match its checksum")
        }
        let error = openError(imagePath)
        #expect(error == expected)
        #expect(error?.description.contains(imagePath) == true)
    }

    @Test func pageChecksumMessageNamesSlotAndAddress() {
        let error = ImageError.pageChecksumMismatch(path: "/dev/shm/x", slot: 17, address: 0x7f00_0000_1000)
        #expect(error.description == "/dev/shm/x: page slot 17 (address 0x7f0000001000) does not match its mark checksum (a code under the migration key); the image is corrupted, or was changed by someone without the key.")
    }

    @Test func pageTableOutOfOrderNamesTheEntry() throws {
        let files = ScratchFiles()
        defer { files.removeAll() }
        let source = try SourceMemory(path: files.path("source"))
        let imagePath = files.path("image")
        let writer = try writeImage(path: imagePath, source: source)
        // Swap entries 1 and 2 and re-seal page table and superblock, so only the order is wrong.
        var addresses = writer.pageAddresses
        addresses.swapAt(1, 2)
        var table = BinaryWriter()
        for address in addresses { table.writeUInt64(address) }
        let fam = try RealFAM.open(path: imagePath, writable: true)
        fam.store(table.bytes, at: writer.layout.pageTable.offset)
        let metadata = fam.loadBytes(at: writer.layout.metadata.offset, count: writer.layout.paddedMetadataByteCount)
        let superblock = ImageSuperblock(
            generation: testGeneration, layout: writer.layout,
            metadataDigest: SharedMapping.digest(of: metadata, seed: ImageDigestSeed.metadata(generation: testGeneration)),
            pageTableDigest: SharedMapping.digest(of: table.bytes, seed: ImageDigestSeed.pageTable(generation: testGeneration)))
        fam.store(superblock.encoded(), at: 0)
        try resealCodes(path: imagePath)
        guard case .badPageAddress(imagePath, 2, addresses[2], let reason) = openError(imagePath) else {
            Issue.record("expected badPageAddress for entry 2, got \(String(describing: openError(imagePath)))")
            return
        }
        #expect(reason.contains("is not above entry 1"))
    }

    @Test func truncatedAndEmptyAndForeignFiles() throws {
        let files = ScratchFiles()
        defer { files.removeAll() }
        let source = try SourceMemory(path: files.path("source"))
        let imagePath = files.path("image")
        let layout = try writeImage(path: imagePath, source: source).layout

        let truncatedPath = files.path("truncated")
        let original = try SharedMapping.open(path: imagePath, writable: false)
        let truncated = try SharedMapping.create(path: truncatedPath, byteCount: 12288, prefault: false)
        truncated.store(bytes: original.loadBytes(at: 0, count: 12288), at: 0)
        let truncatedError = openError(truncatedPath)
        #expect(truncatedError == .truncated(path: truncatedPath, byteCount: 12288, requiredByteCount: layout.fileByteCount))
        #expect(truncatedError?.description == "\(truncatedPath): image is truncated: 12288 bytes, the superblock says \(layout.fileByteCount); the copy is incomplete.")

        let emptyPath = files.path("empty")
        #expect(FileManager.default.createFile(atPath: emptyPath, contents: Data()))
        #expect(openError(emptyPath) == .truncated(path: emptyPath, byteCount: 0, requiredByteCount: ImageLayout.pageSize))

        let foreignPath = files.path("foreign")
        #expect(FileManager.default.createFile(atPath: foreignPath, contents: Data(repeating: 0x5A, count: 8192)))
        let foreignError = openError(foreignPath)
        #expect(foreignError == .badMagic(path: foreignPath))
        #expect(foreignError?.description == "\(foreignPath) is not a FAM image (bad magic); pass the file the source node wrote.")

        let missingPath = files.path("missing")
        guard case .cannotOpen(missingPath, let syscallError) = openError(missingPath) else {
            Issue.record("expected cannotOpen for a missing file")
            return
        }
        #expect(syscallError.errno == .noSuchFileOrDirectory)
    }

    @Test func wrongVersionAndDamagedState() throws {
        let files = ScratchFiles()
        defer { files.removeAll() }
        let source = try SourceMemory(path: files.path("source"))
        let imagePath = files.path("image")
        try writeImage(path: imagePath, source: source)
        try flipByte(path: imagePath, at: ImageLayout.stateWordOffset + 5)
        #expect(openError(imagePath) == .damagedState(path: imagePath, word: ImageLayout.stateWord(.complete) ^ (0xFF << 40)))

        try SharedMapping.open(path: imagePath, writable: true).storeUInt32(7, at: ImageLayout.versionOffset)
        let versionError = openError(imagePath)
        #expect(versionError == .unsupportedVersion(path: imagePath, version: 7))
        #expect(versionError?.description == "\(imagePath): format version 7 is not supported (this fammig reads version 3).")
    }

    @Test func uncommittedImageIsRefusedUntilItsCommit() throws {
        let files = ScratchFiles()
        defer { files.removeAll() }
        let source = try SourceMemory(path: files.path("source"))
        let imagePath = files.path("image")
        var writer = try writeImage(path: imagePath, source: source, upTo: .created)
        let creatingError = openError(imagePath, requireComplete: false)
        #expect(creatingError == .uncommitted(path: imagePath, state: .creating))
        #expect(creatingError?.description == "\(imagePath): image is not committed (state: creating); the checkpoint did not finish, take it again.")

        writer.commitMetadata()
        #expect(openError(imagePath, requireComplete: true) == .uncommitted(path: imagePath, state: .metadataCommitted))
        // Post-copy: the metadata commit is enough, and a page becomes readable once its mark is seen.
        var reader = try ImageReader.open(backend: try RealFAM.open(path: imagePath, writable: false), key: testKey, requireComplete: false)
        #expect(reader.metadata == sampleMetadata())
        let markedBeforeDump = reader.isMarked(slot: 4)
        #expect(!markedBeforeDump)
        try writer.dumpPages(processID: selfProcessID, slots: 4..<5)
        writer.fenceMarks()
        let markedAfterDump = reader.isMarked(slot: 4)
        #expect(markedAfterDump)
        try reader.verifyPage(slot: 4)
        #expect(reader.loadPage(slot: 4) == SourceMemory.pattern(pageIndex: 7))
        #expect(reader.storedMarkCount() == 1)
        #expect(try reader.currentState() == .metadataCommitted)

        writer.abort()
        #expect(try reader.currentState() == .aborted)
        #expect(openError(imagePath, requireComplete: false) == .aborted(path: imagePath))
    }

    /// A target lets its restored process go on its own once it sees the commit (LazyMemory.imageIsCommitted):
    /// the state word alone is not authenticated, so a FAM writer without the key who sets it to complete
    /// before the commit record must not be taken for the commit; the real commit record is.
    @Test func aStateWordSetToCompleteWithoutTheCommitRecordIsNotTheCommit() throws {
        let files = ScratchFiles()
        defer { files.removeAll() }
        let source = try SourceMemory(path: files.path("source"))
        let imagePath = files.path("image")
        var writer = try writeImage(path: imagePath, source: source, upTo: .created)
        writer.commitMetadata()
        let forger = try RealFAM.open(path: imagePath, writable: true)
        let reader = try ImageReader.open(backend: try RealFAM.open(path: imagePath, writable: false), key: testKey, requireComplete: false)
        #expect(!reader.isCommittedAuthentically())
        try writer.dumpPages(processID: selfProcessID, slots: 0..<dumpedPageIndexes.count)
        writer.fenceMarks()
        forger.storeUInt64(ImageLayout.stateWord(.complete), at: ImageLayout.stateWordOffset)
        #expect(try reader.currentState() == .complete)
        #expect(!reader.isCommittedAuthentically(), "a forged state word was taken for the commit")
        writer.commit()
        #expect(reader.isCommittedAuthentically())
    }

    /// The fault path's check (LazyMemory.installFromFAM): one private copy, read once and checked
    /// outside any lock; what is handed out is that copy, and only its leading pages that passed.
    @Test func checkedPagesAreOneCopyAndOnlyItsCheckedPrefix() throws {
        let files = ScratchFiles()
        defer { files.removeAll() }
        let source = try SourceMemory(path: files.path("source"))
        let imagePath = files.path("image")
        let layout = try writeImage(path: imagePath, source: source).layout
        var reader = try ImageReader.open(backend: try RealFAM.open(path: imagePath, writable: false), key: testKey,
                                          requireComplete: true, deferPageChecks: true)
        for slot in 0..<reader.pageCount {
            let marked = reader.isMarked(slot: slot)
            #expect(marked)
        }
        let checker = reader.pageChecker(observed: 1..<5)
        let checked = checker.load(slots: 1..<5)
        // FAM changes after the load: the copy handed out is the one that was checked.
        try flipByte(path: imagePath, at: layout.pageOffset(slot: 3) + 100)
        let pages = try checked.prefix(4)
        #expect(pages.count == 4 * ImageLayout.pageSize)
        for (index, pageIndex) in dumpedPageIndexes[1..<5].enumerated() {
            #expect(Array(pages[(index * ImageLayout.pageSize)..<((index + 1) * ImageLayout.pageSize)]) == SourceMemory.pattern(pageIndex: pageIndex))
        }
        // Loaded now, slot 3 fails: the pages before it are handed out; a prefix that includes it throws
        // the error a check of just those pages gives.
        let changed = checker.load(slots: 1..<5)
        #expect(try changed.prefix(2) == Array(pages.prefix(2 * ImageLayout.pageSize)))
        let expected = ImageError.pageChecksumMismatch(path: imagePath, slot: 3, address: source.address(pageIndex: dumpedPageIndexes[3]))
        #expect(throws: expected) { try changed.prefix(3) }
        #expect(throws: expected) { try reader.verifiedPages(slots: 1..<5) }
        #expect(try reader.verifiedPages(slots: 1..<3) == Array(pages.prefix(2 * ImageLayout.pageSize)))
    }

    /// Invariant 3 as defence in depth on the fault path's check: `PageChecker.load` reads every mark of
    /// the run before any of its pages, and no page from the first one whose mark is gone; it codes only
    /// the pages it read (review of ImageReader.PageChecker.load).
    @Test func checkedPagesReadEveryMarkFirstAndNoPageAfterAMissingOne() throws {
        let files = ScratchFiles()
        defer { files.removeAll() }
        let source = try SourceMemory(path: files.path("source"))
        let imagePath = files.path("image")
        let layout = try writeImage(path: imagePath, source: source).layout
        let fam = LoadRecordingFAM(try RealFAM.open(path: imagePath, writable: true))
        var reader = try ImageReader.open(backend: fam, key: testKey, requireComplete: true, deferPageChecks: true)
        for slot in 0..<reader.pageCount {
            let marked = reader.isMarked(slot: slot)
            #expect(marked)
        }
        let checker = reader.pageChecker(observed: 1..<5)
        fam.loads.removeAll()
        let checked = checker.load(slots: 1..<5)
        #expect(try checked.prefix(4).count == 4 * ImageLayout.pageSize)
        let markLoads = fam.loads.filter { layout.marks.offset <= $0.byteOffset && $0.byteOffset < layout.marks.offset + layout.marksByteCount }
        let pageLoads = fam.loads.filter { $0.byteOffset >= layout.pageOffset(slot: 0) }
        #expect(Set(markLoads.map { ($0.byteOffset - layout.marks.offset) / ImageLayout.markByteCount }) == Set(1..<5))
        #expect(pageLoads.count == 1 && pageLoads.first?.byteOffset == layout.pageOffset(slot: 1) && pageLoads.first?.count == 4 * ImageLayout.pageSize)
        let lastMarkLoad = fam.loads.lastIndex { markLoads.map(\.byteOffset).contains($0.byteOffset) }
        let firstPageLoad = fam.loads.firstIndex { $0.byteOffset >= layout.pageOffset(slot: 0) }
        #expect(lastMarkLoad != nil && firstPageLoad != nil && lastMarkLoad! < firstPageLoad!)

        // Slot 3's mark is gone (rewritten in FAM after it was seen): only slots 1 and 2 are read, and
        // they are handed out; a prefix that includes slot 3 says it is not marked.
        fam.storeUInt64(0, at: layout.markOffset(slot: 3) + 8)
        fam.loads.removeAll()
        let cut = checker.load(slots: 1..<5)
        let cutPageLoads = fam.loads.filter { $0.byteOffset >= layout.pageOffset(slot: 0) }
        #expect(cutPageLoads.count == 1 && cutPageLoads.first?.count == 2 * ImageLayout.pageSize)
        #expect(try cut.prefix(2) == Array(try checked.prefix(4).prefix(2 * ImageLayout.pageSize)))
        let notMarked = ImageError.pageNotMarked(path: imagePath, slot: 3, address: source.address(pageIndex: dumpedPageIndexes[3]))
        #expect(throws: notMarked) { try cut.prefix(3) }
        #expect(throws: notMarked) { try cut.prefix(4) }
    }

    @Test func emptyImageRoundTrips() throws {
        let files = ScratchFiles()
        defer { files.removeAll() }
        let imagePath = files.path("image")
        let fam = try RealFAM.create(path: imagePath, byteCount: ImageLayout.byteCount(metadataByteCount: 0, pageCount: 0), prefault: false)
        var writer = try ImageWriter.create(backend: fam, generation: 3, metadata: [], pageAddresses: [], key: testKey)
        writer.commitMetadata()
        writer.commit()
        let reader = try ImageReader.open(backend: try RealFAM.open(path: imagePath, writable: false), key: testKey, requireComplete: true)
        #expect(reader.metadata.isEmpty && reader.pageCount == 0 && reader.openedState == .complete)
    }

    /// An image carries the identity of its migration, which the nodes' handshake agreed on: a target that
    /// agreed on another refuses it by name before it uses any of it, as it refuses an image of no
    /// migration (a checkpoint's); a reader that asks for none (inspect, restore) reads it; a FAM writer
    /// without the key who rewrites the stored identity to ours gets the key's refusal (the key identifier
    /// under the header code is bound to the identity it was written with).
    @Test func anImageOfAnotherMigrationIsRefused() throws {
        let files = ScratchFiles()
        defer { files.removeAll() }
        let ours = [UInt8](repeating: 0xA5, count: ImageLayout.imageIdentityByteCount)
        let theirs = [UInt8](repeating: 0x5A, count: ImageLayout.imageIdentityByteCount)
        func write(_ path: String, identity: [UInt8]?, over existing: Bool = false) throws {
            let fam = existing ? try RealFAM.open(path: path, writable: true)
                : try RealFAM.create(path: path, byteCount: ImageLayout.byteCount(metadataByteCount: 0, pageCount: 0), prefault: false)
            var writer = try ImageWriter.create(backend: fam, generation: 3, metadata: [], pageAddresses: [], key: testKey, imageIdentity: identity)
            writer.commitMetadata()
            writer.commit()
        }
        func openError(_ path: String, expecting identity: [UInt8]?) -> ImageError? {
            do throws(ImageError) {
                _ = try ImageReader.open(backend: try RealFAM.open(path: path, writable: false), key: testKey, requireComplete: true,
                                         imageIdentity: identity)
                return nil
            } catch { return error }
        }
        let theirImage = files.path("theirs")
        try write(theirImage, identity: theirs)
        #expect(openError(theirImage, expecting: ours) == .anotherMigration(path: theirImage))
        #expect(ImageError.anotherMigration(path: theirImage).description.contains("pass the FAM file this migration's source writes"))
        #expect(openError(theirImage, expecting: theirs) == nil)
        #expect(openError(theirImage, expecting: nil) == nil)
        let checkpoint = files.path("checkpoint")
        try write(checkpoint, identity: nil)
        #expect(openError(checkpoint, expecting: ours) == .anotherMigration(path: checkpoint))
        #expect(openError(checkpoint, expecting: nil) == nil)
        // The file held an image of ours before: a new image of no migration leaves no identity behind.
        try write(checkpoint, identity: ours, over: true)
        #expect(openError(checkpoint, expecting: ours) == nil)
        try write(checkpoint, identity: nil, over: true)
        #expect(openError(checkpoint, expecting: ours) == .anotherMigration(path: checkpoint))
        let mapping = try SharedMapping.open(path: theirImage, writable: true)
        mapping.store(bytes: ours, at: ImageLayout.imageIdentityOffset)
        #expect(openError(theirImage, expecting: ours) == .wrongKey(path: theirImage))
    }

    @Test func unreadablePageIsAnErrorAndStaysUnmarked() throws {
        let files = ScratchFiles()
        defer { files.removeAll() }
        // Pages 1 and 2 of this source lie beyond the end of its file once it is truncated: the kernel
        // reads page 1's run only up to there, then refuses page 1 itself.
        let sourcePath = files.path("source")
        let source = try SourceMemory(path: sourcePath)
        #expect(truncate(sourcePath, off_t(ImageLayout.pageSize)) == 0)
        let addresses = (0..<3).map { source.address(pageIndex: $0) }
        let imagePath = files.path("image")
        let byteCount = ImageLayout.byteCount(metadataByteCount: 0, pageCount: addresses.count)
        let fam = try RealFAM.create(path: imagePath, byteCount: byteCount, prefault: false)
        var writer = try ImageWriter.create(backend: fam, generation: 1, metadata: [], pageAddresses: addresses, key: testKey)
        writer.commitMetadata()
        let error = #expect(throws: SyscallError.self) {
            try writer.dumpPages(processID: selfProcessID, slots: 0..<3)
        }
        #expect(error?.errno == .badAddress)
        #expect(error?.call.contains(String(addresses[1], radix: 16)) == true)
        #expect(writer.markedPageCount == 0)
        #expect(!writer.isMarked(slot: 0))
    }

    /// The nonlive pipeline: one batch is copied (on the real backend's own thread) while the one before
    /// it is flushed, fenced and marked; every page still reads back as the source's.
    @Test func copyUnderWayWhileTheBatchBeforeIsSealedRoundTrips() throws {
        let files = ScratchFiles()
        defer { files.removeAll() }
        let source = try SourceMemory(path: files.path("source"))
        let imagePath = files.path("image")
        var writer = try writeImage(path: imagePath, source: source, upTo: .metadataCommitted)
        writer.startCopyingPagesFromProcess(processID: selfProcessID, slots: 0..<3)
        try writer.finishCopyingPages()
        writer.startCopyingPagesFromProcess(processID: selfProcessID, slots: 3..<5)
        #expect(writer.slotsBeingCopied == 3..<5)
        writer.flushPages(slots: 0..<3)
        writer.fence()
        for slot in 0..<3 { writer.storeMark(slot: slot) }
        try writer.finishCopyingPages()
        #expect(writer.slotsBeingCopied == nil)
        writer.flushPages(slots: 3..<5)
        writer.fence()
        for slot in 3..<5 { writer.storeMark(slot: slot) }
        writer.commit()

        let reader = try ImageReader.open(backend: try RealFAM.open(path: imagePath, writable: false), key: testKey, requireComplete: true)
        for (slot, pageIndex) in dumpedPageIndexes.enumerated() {
            #expect(reader.loadPage(slot: slot) == SourceMemory.pattern(pageIndex: pageIndex))
            try reader.verifyPage(slot: slot)
        }
    }

    /// A copy begun and refused (pages past the end of their file) throws when it is finished, and
    /// leaves its batch unmarked, as the one-step copy does.
    @Test func refusedCopyUnderWayThrowsAtItsFinish() throws {
        let files = ScratchFiles()
        defer { files.removeAll() }
        let sourcePath = files.path("source")
        let source = try SourceMemory(path: sourcePath)
        #expect(truncate(sourcePath, off_t(ImageLayout.pageSize)) == 0)
        let addresses = (0..<3).map { source.address(pageIndex: $0) }
        let fam = try RealFAM.create(path: files.path("image"), byteCount: ImageLayout.byteCount(metadataByteCount: 0, pageCount: 3), prefault: false)
        var writer = try ImageWriter.create(backend: fam, generation: 1, metadata: [], pageAddresses: addresses, key: testKey)
        writer.commitMetadata()
        writer.startCopyingPagesFromProcess(processID: selfProcessID, slots: 0..<3)
        let error = #expect(throws: SyscallError.self) { try writer.finishCopyingPages() }
        #expect(error?.errno == .badAddress)
        #expect(writer.markedPageCount == 0)
        #expect(writer.slotsBeingCopied == nil)
    }

    // MARK: The writer's preconditions are the protocol invariants: breaking one traps

    @Test func markBeforeItsPageIsFencedTraps() async throws {
        let files = ScratchFiles()
        defer { files.removeAll() }
        let sourcePath = files.path("source")
        let imagePath = files.path("image")
        let result = await #expect(processExitsWith: .failure, observing: [\.standardErrorContent]) {
            [sourcePath = sourcePath as String, imagePath = imagePath as String] in
            let source = try SourceMemory(path: sourcePath)
            var writer = try writeImage(path: imagePath, source: source, upTo: .metadataCommitted)
            try writer.copyPagesFromProcess(processID: selfProcessID, slots: 0..<1)
            writer.flushPages(slots: 0..<1)
            writer.storeMark(slot: 0)  // invariant (1): no fence since the flush
        }
        let standardError = String(decoding: result?.standardErrorContent ?? [], as: UTF8.self)
        #expect(standardError.contains("before its flush was fenced"))
    }

    @Test func flushOfPagesStillBeingCopiedTraps() async throws {
        let files = ScratchFiles()
        defer { files.removeAll() }
        let sourcePath = files.path("source")
        let imagePath = files.path("image")
        let result = await #expect(processExitsWith: .failure, observing: [\.standardErrorContent]) {
            [sourcePath = sourcePath as String, imagePath = imagePath as String] in
            let source = try SourceMemory(path: sourcePath)
            var writer = try writeImage(path: imagePath, source: source, upTo: .metadataCommitted)
            writer.startCopyingPagesFromProcess(processID: selfProcessID, slots: 0..<3)
            writer.flushPages(slots: 2..<4)  // slot 2 may still be being written
        }
        let standardError = String(decoding: result?.standardErrorContent ?? [], as: UTF8.self)
        #expect(standardError.contains("while they are still being copied"))
    }

    @Test func commitBeforeEveryMarkTraps() async throws {
        let files = ScratchFiles()
        defer { files.removeAll() }
        let sourcePath = files.path("source")
        let imagePath = files.path("image")
        let result = await #expect(processExitsWith: .failure, observing: [\.standardErrorContent]) {
            [sourcePath = sourcePath as String, imagePath = imagePath as String] in
            let source = try SourceMemory(path: sourcePath)
            var writer = try writeImage(path: imagePath, source: source, upTo: .metadataCommitted)
            try writer.dumpPages(processID: selfProcessID, slots: 0..<4)
            writer.commit()  // invariant (2): slot 4 has no mark
        }
        let standardError = String(decoding: result?.standardErrorContent ?? [], as: UTF8.self)
        #expect(standardError.contains("commit record before every mark: 4/5"))
    }

    // MARK: BinaryReader never traps on bad input

    @Test func binaryCodecRoundTrip() throws {
        var writer = BinaryWriter()
        writer.writeUInt8(0xAB)
        writer.writeUInt16(0xBEEF)
        writer.writeUInt32(0xDEAD_BEEF)
        writer.writeUInt64(0x0123_4567_89AB_CDEF)
        writer.writeInt32(-5)
        writer.writeInt64(-6)
        writer.writeBool(true)
        writer.writeString("héllo")
        writer.writeArray(["a", "bc"]) { $0.writeString($1) }
        #expect(Array(writer.bytes[1..<3]) == [0xEF, 0xBE])  // little endian

        var reader = BinaryReader(writer.bytes)
        #expect(try reader.readUInt8() == 0xAB)
        #expect(try reader.readUInt16() == 0xBEEF)
        #expect(try reader.readUInt32() == 0xDEAD_BEEF)
        #expect(try reader.readUInt64() == 0x0123_4567_89AB_CDEF)
        #expect(try reader.readInt32() == -5)
        #expect(try reader.readInt64() == -6)
        #expect(try reader.readBool() == true)
        #expect(try reader.readString() == "héllo")
        #expect(try reader.readArray { try $0.readString() } == ["a", "bc"])
        try reader.expectEnd()
    }

    @Test func corruptedLengthFieldIsMalformedMetadata() throws {
        var writer = BinaryWriter()
        writer.writeUInt32(1)
        writer.writeBytes([1, 2, 3])
        var blob = writer.bytes
        blob.replaceSubrange(4..<8, with: [0xF0, 0xFF, 0xFF, 0xFF])  // the byte array's length field

        var reader = BinaryReader(blob)
        #expect(try reader.readUInt32() == 1)
        do throws(ImageError) {
            _ = try reader.readBytes()
            Issue.record("a length past the end was accepted")
        } catch {
            guard case .malformedMetadata(let reason) = error else { Issue.record("wrong error \(error)"); return }
            #expect(reason.contains("run past the end"))
        }
    }

    @Test func otherBadMetadataIsMalformedMetadata() {
        func failure(_ bytes: [UInt8], _ read: (inout BinaryReader) throws -> Void) -> ImageError? {
            var reader = BinaryReader(bytes)
            do { try read(&reader); return nil } catch { return error as? ImageError }
        }
        func isMalformed(_ error: ImageError?) -> Bool {
            if case .malformedMetadata = error { true } else { false }
        }
        #expect(isMalformed(failure([2]) { _ = try $0.readBool() }))
        #expect(isMalformed(failure([1, 2, 3]) { _ = try $0.readUInt64() }))
        #expect(isMalformed(failure([2, 0, 0, 0, 0xC3, 0x28]) { _ = try $0.readString() }))
        #expect(isMalformed(failure([0xFF, 0xFF, 0xFF, 0x7F]) { _ = try $0.readArray { try $0.readUInt8() } }))
        #expect(isMalformed(failure([3, 0, 0, 0, 1]) { _ = try $0.readArray(maximumCount: 10) { try $0.readUInt8() } }))
        #expect(isMalformed(failure([0, 0]) { _ = try $0.readUInt8(); try $0.expectEnd() }))
    }
}

/// A real FAM file that records every load the reader makes through it (offset and byte count, in order).
final class LoadRecordingFAM: ForwardingFAM, @unchecked Sendable {
    struct Load { var byteOffset: Int; var count: Int }
    var loads: [Load] = []

    override func loadBytes(at byteOffset: Int, count: Int) -> [UInt8] {
        loads.append(Load(byteOffset: byteOffset, count: count))
        return inner.loadBytes(at: byteOffset, count: count)
    }
    override func loadUInt64(at byteOffset: Int) -> UInt64 {
        loads.append(Load(byteOffset: byteOffset, count: 8))
        return inner.loadUInt64(at: byteOffset)
    }
}
