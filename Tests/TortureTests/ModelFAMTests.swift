// The model FAM on its own: what the target sees after each store, flush, fence, early write-back and
// crash; and the checker, which must report each protocol violation for a hand-written wrong order and
// nothing for the real ImageWriter and ImageReader driven in the right one. Pages are dumped from this
// very test process through process_vm_readv, out of a shared mapping of our own.
import Glibc
import Testing
import Engine
import Sys
import Torture

/// SplitMix64: a tiny seeded generator, so a crash outcome is the same on every run.
private struct SeededRandom: RandomNumberGenerator {
    var state: UInt64

    mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var mixed = state
        mixed = (mixed ^ (mixed >> 30)) &* 0xBF58_476D_1CE4_E5B9
        mixed = (mixed ^ (mixed >> 27)) &* 0x94D0_49BB_1331_11EB
        return mixed ^ (mixed >> 31)
    }
}

private let selfProcessID = ProcessID(getpid())
private let testGeneration: UInt64 = 7
private let testKey: MigrationKey = {
    guard let key = try? MigrationKey(bytes: Array(repeating: 0x3C, count: MigrationKey.byteCount)) else { preconditionFailure("key refused") }
    return key
}()
private let pageByteCount = ImageLayout.pageSize

/// Stand-in victim memory: pages of a mapping in this process (its file removed at once), each with
/// its own pattern.
private final class SourcePages {
    let mapping: SharedMapping
    let pageCount: Int

    init(pageCount: Int) throws {
        let path = "/dev/shm/fammig-modelfamtest-\(getpid())-\(UInt64.random(in: 0...UInt64.max))"
        mapping = try SharedMapping.create(path: path, byteCount: pageCount * pageByteCount, prefault: true)
        try SharedMapping.remove(path: path)
        self.pageCount = pageCount
        for page in 0..<pageCount { mapping.store(bytes: Self.pattern(page: page), at: page * pageByteCount) }
    }

    static func pattern(page: Int) -> [UInt8] {
        (0..<pageByteCount).map { UInt8(truncatingIfNeeded: $0 &* 13 &+ page &* 29 &+ ($0 >> 7) &+ 1) }
    }

    var addresses: [UInt64] { (0..<pageCount).map { UInt64(mapping.address(at: $0 * pageByteCount)) } }
}

/// A model sized for an image of `pageCount` pages, the pages to dump, and a writer that created the
/// image on the source node (superblock, metadata, page table stored, nothing durable yet).
private func makeImage(pageCount: Int = 4) throws -> (model: ModelFAM, source: SourcePages, writer: ImageWriter) {
    let source = try SourcePages(pageCount: pageCount)
    let metadata: [UInt8] = Array("the process state of a test victim".utf8)
    let model = try ModelFAM(byteCount: ImageLayout.byteCount(metadataByteCount: metadata.count, pageCount: pageCount))
    let writer = try ImageWriter.create(backend: model.sourceNode, generation: testGeneration, metadata: metadata,
                                        pageAddresses: source.addresses, key: testKey)
    return (model, source, writer)
}

private func zeros(_ count: Int) -> [UInt8] { Array(repeating: 0, count: count) }

@Suite struct ModelFAMTests {
    // MARK: The cache and the fabric

    @Test func storeReachesTheTargetOnlyAfterFlushAndFence() throws {
        let model = try ModelFAM(byteCount: 4096)
        defer { model.release() }
        let bytes = (0..<100).map { UInt8($0 + 1) }
        model.sourceNode.store(bytes, at: 64)
        #expect(model.sourceNode.loadBytes(at: 64, count: 100) == bytes, "the writer sees its own store")
        #expect(model.fabricBytes(at: 64, count: 100) == zeros(100))
        #expect(model.targetNode.loadUInt64(at: 64) == 0)
        #expect(model.pendingLines == [1, 2])
        #expect(model.durability(line: 1) == .stored)

        model.sourceNode.flush(at: 64, count: 100)
        #expect(model.fabricBytes(at: 64, count: 100) == zeros(100), "a flush alone is not ordered")
        #expect(model.targetNode.loadUInt64(at: 64) == 0)
        #expect(model.pendingLines == [1, 2])
        #expect(model.durability(line: 2) == .flushed)

        model.sourceNode.fence()
        #expect(model.fabricBytes(at: 64, count: 100) == bytes)
        #expect(model.targetNode.loadBytes(at: 64, count: 100) == bytes)
        #expect(model.pendingLines.isEmpty)
        #expect(model.durability(line: 1) == .durable && model.durability(line: 2) == .durable)
        #expect(model.violations.isEmpty, "\(model.violations)")
    }

    @Test func fenceWithoutFlushWritesNothing() throws {
        let model = try ModelFAM(byteCount: 4096)
        defer { model.release() }
        model.sourceNode.storeUInt64(0x1122_3344, at: 0)
        model.sourceNode.fence()
        #expect(model.targetNode.loadUInt64(at: 0) == 0)
        #expect(model.pendingLines == [0])
        #expect(model.durability(line: 0) == .stored)
    }

    @Test func storeAfterFlushIsNotCoveredByThatFlush() throws {
        let model = try ModelFAM(byteCount: 4096)
        defer { model.release() }
        model.sourceNode.storeUInt64(1, at: 0)
        model.sourceNode.storeUInt64(2, at: 64)
        model.sourceNode.flush(at: 0, count: 128)
        model.sourceNode.storeUInt64(3, at: 8)  // line 0 again
        #expect(model.durability(line: 0) == .stored)
        model.sourceNode.fence()
        #expect(model.fabricBytes(at: 0, count: 16) == zeros(16), "line 0 was stored again after its flush")
        #expect(model.targetNode.loadUInt64(at: 64) == 2, "line 1 was flushed and fenced")
        #expect(model.pendingLines == [0])
        #expect(model.durability(line: 0) == .stored)
        #expect(model.durability(line: 1) == .durable)

        model.sourceNode.flush(at: 0, count: 16)
        model.sourceNode.fence()
        #expect(model.targetNode.loadUInt64(at: 0) == 1)
        #expect(model.targetNode.loadUInt64(at: 8) == 3)
        #expect(model.pendingLines.isEmpty)
    }

    @Test func writeBackMakesOneLineVisibleButNotDurable() throws {
        let model = try ModelFAM(byteCount: 4096)
        defer { model.release() }
        model.currentStep = 4
        model.sourceNode.store(Array(repeating: 0xAB, count: 192), at: 0)
        model.writeBack(line: 1)
        #expect(model.fabricBytes(at: 64, count: 64) == Array(repeating: 0xAB, count: 64))
        #expect(model.fabricBytes(at: 0, count: 64) == zeros(64))
        #expect(model.fabricBytes(at: 128, count: 64) == zeros(64))
        #expect(model.pendingLines == [0, 2])
        #expect(model.durability(line: 1) == .stored)

        // A polling load may see it; a read that depends on it was lucky, and the checker says so.
        #expect(model.targetNode.loadUInt64(at: 64) == 0xABAB_ABAB_ABAB_ABAB)
        #expect(model.violations.isEmpty)
        model.currentStep = 9
        _ = model.targetNode.loadBytes(at: 64, count: 64)
        let violations = model.violations
        #expect(violations.count == 1)
        guard case .readBeforeDurable(let read, let store, let line, let durability)? = violations.first else {
            Issue.record("expected readBeforeDurable, got \(violations)")
            return
        }
        #expect(read == FAMRead(kind: .loadBytes, byteOffset: 64, byteCount: 64, step: 9))
        #expect(store == FAMStore(id: 1, byteOffset: 0, byteCount: 192, step: 4, kind: .store))
        #expect(line == 1 && durability == .stored)

        // Flushed and fenced after an early write-back: durable now, nothing copied twice.
        model.sourceNode.flush(at: 0, count: 192)
        model.sourceNode.fence()
        #expect(model.durability(line: 1) == .durable)
        #expect(model.pendingLines.isEmpty)
        #expect(model.fabricBytes(at: 0, count: 192) == Array(repeating: 0xAB, count: 192))
    }

    /// 64 stored lines, half of them flushed, lines 60..<64 flushed and fenced; then a crash.
    private func crashedModel(seed: UInt64) throws -> (model: ModelFAM, reached: [Int]) {
        let model = try ModelFAM(byteCount: 64 * 64)
        for line in 0..<64 { model.sourceNode.store(Array(repeating: UInt8(line + 1), count: 64), at: line * 64) }
        model.sourceNode.flush(at: 60 * 64, count: 4 * 64)
        model.sourceNode.fence()
        model.sourceNode.flush(at: 0, count: 32 * 64)
        var random = SeededRandom(state: seed)
        return (model, model.crash(using: &random))
    }

    @Test func crashLetsASeededSubsetThrough() throws {
        let (model, reached) = try crashedModel(seed: 1234)
        let (again, reachedAgain) = try crashedModel(seed: 1234)
        let (other, reachedOther) = try crashedModel(seed: 98765)
        defer { model.release(); again.release(); other.release() }

        #expect(reached == reachedAgain)
        #expect(model.fabricBytes(at: 0, count: 4096) == again.fabricBytes(at: 0, count: 4096))
        #expect(reached != reachedOther, "two seeds, one outcome")
        #expect(!reached.isEmpty && reached.count < 60, "a crash is neither all nor nothing: \(reached)")
        #expect(reached.allSatisfy { $0 < 60 }, "fenced lines were not pending")
        for line in 0..<64 {
            let expected = reached.contains(line) || line >= 60 ? Array(repeating: UInt8(line + 1), count: 64) : zeros(64)
            #expect(model.fabricBytes(at: line * 64, count: 64) == expected, "line \(line)")
        }
        #expect(model.isCrashed)
        #expect(model.pendingLines.isEmpty, "a dead cache writes nothing back later")
        #expect(model.durability(line: 0) == .flushed, "a line that got through at the crash is not durable")
    }

    // MARK: The checker, general rule

    @Test func dependentReadBeforeFenceNamesTheStore() throws {
        let model = try ModelFAM(byteCount: 8192)
        defer { model.release() }
        model.currentStep = 3
        model.sourceNode.storeUInt64(42, at: 128)
        model.sourceNode.flush(at: 128, count: 8)
        model.currentStep = 5
        _ = model.targetNode.loadBytes(at: 120, count: 24)
        _ = model.targetNode.digest(at: 128, count: 64, seed: 1)
        _ = model.targetNode.loadBytes(at: 0, count: 4096)
        #expect(model.violations.count == 3)
        for violation in model.violations {
            guard case .readBeforeDurable(_, let store, let line, let durability) = violation else {
                Issue.record("expected readBeforeDurable, got \(violation)")
                continue
            }
            #expect(store == FAMStore(id: 1, byteOffset: 128, byteCount: 8, step: 3, kind: .storeUInt64))
            #expect(line == 2 && durability == .flushed)
        }
        let message = "\(model.violations[0])"
        #expect(message.contains("read depended on store #1 (storeUInt64, bytes 128..<136, step 3) before it was durable"), "\(message)")
        #expect(message.contains("loadBytes of bytes 120..<144 at step 5"), "\(message)")

        model.sourceNode.fence()
        _ = model.targetNode.loadBytes(at: 120, count: 24)
        _ = model.targetNode.loadBytes(at: 0, count: 4096)
        #expect(model.violations.count == 3, "after the fence the store is durable")
    }

    @Test func pollingLoadsMaySeeValuesNotYetDurable() throws {
        let model = try ModelFAM(byteCount: 4096)
        defer { model.release() }
        model.sourceNode.storeUInt64(0x0102_0304_0506_0708, at: 256)
        model.writeBack(line: 4)
        #expect(model.targetNode.loadUInt64(at: 256) == 0x0102_0304_0506_0708)
        #expect(model.targetNode.loadBytes(at: 256, count: 8) == [8, 7, 6, 5, 4, 3, 2, 1])
        #expect(model.targetNode.loadBytes(at: 258, count: 4) == [6, 5, 4, 3])
        #expect(model.violations.isEmpty, "\(model.violations)")
        _ = model.targetNode.loadBytes(at: 252, count: 8)  // crosses a word: a dependent read
        #expect(model.violations.count == 1)
    }

    // MARK: The checker on the real image writer and reader

    @Test func realWriterAndReaderInOrderBreakNothing() throws {
        let (model, source, writer) = try makeImage(pageCount: 5)
        var imageWriter = writer
        defer { model.release(); withExtendedLifetime(source) {} }
        // The scheduler's fabric actor writing every pending line back early must not matter either.
        func writeEverythingBack() { for line in model.pendingLines { model.writeBack(line: line) } }
        model.currentStep = 1
        imageWriter.commitMetadata()
        writeEverythingBack()
        model.currentStep = 2
        try imageWriter.dumpPages(processID: selfProcessID, slots: 3..<5)
        writeEverythingBack()
        model.currentStep = 3
        try imageWriter.copyPagesFromProcess(processID: selfProcessID, slots: 0..<3)
        imageWriter.flushPages(slots: 0..<3)
        imageWriter.fence()
        for slot in 0..<3 { imageWriter.storeMark(slot: slot) }
        model.currentStep = 4
        imageWriter.commit()
        #expect(model.pendingLines.isEmpty)

        model.currentStep = 5
        var reader = try ImageReader.open(backend: model.targetNode, key: testKey, requireComplete: true)
        for slot in 0..<5 {
            let isMarked = reader.isMarked(slot: slot)
            #expect(isMarked)
            #expect(reader.loadPage(slot: slot) == SourcePages.pattern(page: slot))
        }
        #expect(try reader.verifiedPages(slots: 0..<5) == (0..<5).flatMap { SourcePages.pattern(page: $0) })
        #expect(model.violations.isEmpty, "\(model.violations)")
        #expect(model.stores.contains { $0.kind == .storeFromProcess })
    }

    @Test func postcopyReaderAfterMetadataCommitBreaksNothing() throws {
        let (model, source, writer) = try makeImage(pageCount: 3)
        var imageWriter = writer
        defer { model.release(); withExtendedLifetime(source) {} }
        #expect(ImageReader.peekState(backend: model.targetNode) == nil, "the superblock is not visible before the commit")
        imageWriter.commitMetadata()
        #expect(ImageReader.peekState(backend: model.targetNode) == .metadataCommitted)
        var reader = try ImageReader.open(backend: model.targetNode, key: testKey, requireComplete: false)
        var isMarked = reader.isMarked(slot: 1)
        #expect(!isMarked)

        try imageWriter.dumpPages(processID: selfProcessID, slots: 1..<2)
        isMarked = reader.isMarked(slot: 1)
        #expect(!isMarked, "the mark is flushed, not yet fenced")
        imageWriter.fenceMarks()
        isMarked = reader.isMarked(slot: 1)
        #expect(isMarked)
        try reader.verifyPage(slot: 1)
        #expect(reader.loadPage(slot: 1) == SourcePages.pattern(page: 1))
        #expect(model.violations.isEmpty, "\(model.violations)")
    }

    @Test func markBeforeItsPageIsDurableBreaksInvariant1() throws {
        let (model, source, writer) = try makeImage()
        var imageWriter = writer
        defer { model.release(); withExtendedLifetime(source) {} }
        imageWriter.commitMetadata()
        model.currentStep = 10
        try imageWriter.copyPagesFromProcess(processID: selfProcessID, slots: 0..<2)
        imageWriter.flushPages(slots: 0..<2)
        // Wrong: the mark's tag before the fence that makes the page durable.
        model.currentStep = 11
        let tagOffset = imageWriter.layout.markOffset(slot: 1) + 8
        model.sourceNode.storeUInt64(ImageLayout.markTag(generation: testGeneration), at: tagOffset)

        let violations = model.violations
        #expect(violations.count == 1, "\(violations)")
        guard case .markBeforePageDurable(let slot, let mark, let pageStore, let line, let durability)? = violations.first else {
            Issue.record("expected markBeforePageDurable, got \(violations)")
            return
        }
        #expect(slot == 1)
        #expect(mark.byteRange == tagOffset..<(tagOffset + 8) && mark.kind == .storeUInt64 && mark.step == 11)
        #expect(pageStore.kind == .storeFromProcess && pageStore.step == 10)
        #expect(pageStore.byteRange.contains(imageWriter.layout.pageOffset(slot: 1)))
        #expect(line == ModelFAM.line(containing: imageWriter.layout.pageOffset(slot: 1)) && durability == .flushed)
        #expect(violations[0].invariant == 1)
        #expect("\(violations[0])".contains("invariant 1: the dumped mark of page slot 1 was stored by store #"))
    }

    @Test func commitRecordBeforeTheMarksAreDurableBreaksInvariant2() throws {
        let (model, source, writer) = try makeImage(pageCount: 2)
        var imageWriter = writer
        defer { model.release(); withExtendedLifetime(source) {} }
        imageWriter.commitMetadata()
        try imageWriter.copyPagesFromProcess(processID: selfProcessID, slots: 0..<2)
        imageWriter.flushPages(slots: 0..<2)
        imageWriter.fence()
        for slot in 0..<2 { imageWriter.storeMark(slot: slot) }
        #expect(model.violations.isEmpty, "\(model.violations)")
        // Wrong: the commit record while the marks are flushed but not fenced.
        model.sourceNode.storeUInt64(ImageLayout.commitRecordMagic, at: imageWriter.layout.commitRecord.offset)

        let violations = model.violations
        #expect(violations.count == 1, "\(violations)")
        guard case .commitRecordBeforeMarksDurable(let record, let markStore, _, let durability)? = violations.first else {
            Issue.record("expected commitRecordBeforeMarksDurable, got \(violations)")
            return
        }
        #expect(record.byteOffset == imageWriter.layout.commitRecord.offset)
        #expect(markStore.kind == .storeUInt64 && imageWriter.layout.marks.offset..<imageWriter.layout.marks.endOffset ~= markStore.byteOffset)
        #expect(durability == .flushed)
        #expect(violations[0].invariant == 2)
    }

    @Test func metadataCommitBeforeTheSuperblockIsDurableBreaksInvariant2() throws {
        let (model, source, _) = try makeImage()
        defer { model.release(); withExtendedLifetime(source) {} }
        // Wrong: the state word set without flushing and fencing what it vouches for.
        model.sourceNode.storeUInt64(ImageLayout.stateWord(.metadataCommitted), at: ImageLayout.stateWordOffset)

        let violations = model.violations
        #expect(violations.count == 1, "\(violations)")
        guard case .stateBeforeDurable(let state, let stateStore, let part, let pendingStore, _, let durability)? = violations.first else {
            Issue.record("expected stateBeforeDurable, got \(violations)")
            return
        }
        #expect(state == .metadataCommitted && part == "superblock")
        #expect(stateStore.byteOffset == ImageLayout.stateWordOffset && stateStore.kind == .storeUInt64)
        #expect(pendingStore.byteOffset == 0 && pendingStore.kind == .store)
        #expect(durability == .stored)
        #expect("\(violations[0])".contains("invariant 2: state metadataCommitted was stored by"))
    }

    @Test func completeBeforeTheCommitRecordIsDurableBreaksInvariant2() throws {
        let (model, source, writer) = try makeImage(pageCount: 1)
        var imageWriter = writer
        defer { model.release(); withExtendedLifetime(source) {} }
        imageWriter.commitMetadata()
        try imageWriter.dumpPages(processID: selfProcessID, slots: 0..<1)
        imageWriter.fenceMarks()
        let commitRecordOffset = imageWriter.layout.commitRecord.offset
        model.sourceNode.storeUInt64(ImageLayout.commitRecordMagic, at: commitRecordOffset)
        #expect(model.violations.isEmpty, "the marks were fenced: \(model.violations)")
        // Wrong: state complete with the commit record neither flushed nor fenced.
        model.sourceNode.storeUInt64(ImageLayout.stateWord(.complete), at: ImageLayout.stateWordOffset)

        let violations = model.violations
        #expect(violations.count == 1, "\(violations)")
        guard case .stateBeforeDurable(.complete, _, "commit record", let pendingStore, _, _)? = violations.first else {
            Issue.record("expected stateBeforeDurable(complete, commit record), got \(violations)")
            return
        }
        #expect(pendingStore.byteOffset == commitRecordOffset)
    }

    @Test func pageReadBeforeItsMarkBreaksInvariant3() throws {
        let (model, source, writer) = try makeImage(pageCount: 3)
        var imageWriter = writer
        defer { model.release(); withExtendedLifetime(source) {} }
        imageWriter.commitMetadata()
        try imageWriter.dumpPages(processID: selfProcessID, slots: 0..<3)
        imageWriter.commit()
        let layout = imageWriter.layout

        // Wrong: the page read without a polling load of its mark first (its bytes are durable).
        model.currentStep = 20
        _ = model.targetNode.loadBytes(at: layout.pageOffset(slot: 1), count: pageByteCount)
        var violations = model.violations
        #expect(violations.count == 1, "\(violations)")
        #expect(violations.first == .pageReadBeforeMark(
            slot: 1, read: FAMRead(kind: .loadBytes, byteOffset: layout.pageOffset(slot: 1), byteCount: pageByteCount, step: 20)))
        #expect(violations.first?.invariant == 3)

        // Right for slot 1 once its mark is observed; a run over slots 0...2 still misses slot 0's.
        #expect(model.targetNode.loadUInt64(at: layout.markOffset(slot: 1) + 8) == ImageLayout.markTag(generation: testGeneration))
        _ = model.targetNode.digest(at: layout.pageOffset(slot: 1), count: pageByteCount, seed: 3)
        #expect(model.violations.count == 1, "slot 1's mark was observed")
        _ = model.targetNode.loadBytes(at: layout.pageOffset(slot: 0), count: 3 * pageByteCount)
        violations = model.violations
        #expect(violations.count == 2)
        guard case .pageReadBeforeMark(let slot, let read)? = violations.last else {
            Issue.record("expected pageReadBeforeMark, got \(violations)")
            return
        }
        #expect(slot == 0 && read.kind == .loadBytes)
    }

    @Test func aNewImageWithdrawsTheMarksTheTargetObserved() throws {
        let (model, source, writer) = try makeImage(pageCount: 2)
        var imageWriter = writer
        defer { model.release(); withExtendedLifetime(source) {} }
        imageWriter.commitMetadata()
        try imageWriter.dumpPages(processID: selfProcessID, slots: 0..<2)
        imageWriter.commit()
        let reader = try ImageReader.open(backend: model.targetNode, key: testKey, requireComplete: true)
        #expect(reader.loadPage(slot: 0) == SourcePages.pattern(page: 0))
        #expect(model.violations.isEmpty, "\(model.violations)")

        // The same file, generation and layout again: the cleared marks must be observed anew.
        var secondWriter = try ImageWriter.create(backend: model.sourceNode, generation: testGeneration,
                                                  metadata: Array("the process state of a test victim".utf8),
                                                  pageAddresses: source.addresses, key: testKey)
        secondWriter.commitMetadata()
        _ = model.targetNode.loadBytes(at: imageWriter.layout.pageOffset(slot: 0), count: pageByteCount)
        #expect(model.violations.count == 1)
        #expect(model.violationCount == 1)
        guard case .pageReadBeforeMark(0, _)? = model.violations.first else {
            Issue.record("expected pageReadBeforeMark of slot 0, got \(model.violations)")
            return
        }
    }

    // MARK: Lifetime

    @Test func releaseUnmapsAndLeavesNoFile() throws {
        let directory = "/dev/shm/fammig-modelfamtest-dir-\(getpid())-\(UInt64.random(in: 0...UInt64.max))"
        #expect(mkdir(directory, 0o700) == 0)
        defer { _ = rmdir(directory) }
        let ledger = ModelFAMLedger()
        let first = try ModelFAM(byteCount: 1 << 20, directory: directory, ledger: ledger)
        do {
            let second = try ModelFAM(byteCount: 4096, directory: directory, ledger: ledger)
            #expect(ledger.liveModelCount == 2)
            #expect(try ProcFS.directoryEntries(directory).filter { $0 != "." && $0 != ".." }.isEmpty, "the files are removed at once")
            second.sourceNode.storeUInt64(1, at: 0)
        }
        #expect(ledger.liveModelCount == 1, "a model dropped without release is unmapped too")
        first.sourceNode.store([1, 2, 3], at: 1000)
        first.sourceNode.flush(at: 1000, count: 3)
        first.sourceNode.fence()
        first.release()
        first.release()
        #expect(first.isReleased)
        #expect(ledger.liveModelCount == 0)
        #expect(ledger.createdModelCount == 2)
        #expect(first.stores.count == 1, "the log outlives the mappings")
    }
}
