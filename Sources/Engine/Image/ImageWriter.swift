// Why this file exists: the source node's side of the image. It is the one place that orders stores,
// flushes and fences into FAM, so the protocol invariants of DESIGN.md §2 are preconditions here:
//   (1) a page's dumped mark is stored only after all of that page's lines are flushed and fenced;
//   (2) the commit record is stored only after every mark is flushed and fenced, and the metadata commit
//       (state metadataCommitted) only after superblock, metadata and page table are flushed and fenced.
// The other two, (3) read a page only after its mark and (4) read nothing that does not verify, are
// `ImageReader`'s. Fences are counted as epochs: a flush done in epoch e is durable once a fence has
// ended epoch e, i.e. once `fenceEpoch > e`.
//
// The writer works in small steps (one batch of slots at a time, slots in any order) so a dumper actor
// can interleave it with everything else and dump priority pages first.
import Sys

/// Writes one image into a FAM backend. One owner at a time: it keeps per-slot progress that a copy
/// would split, so hand it on, don't copy it.
public struct ImageWriter: Sendable {
    public enum Phase: Equatable, Sendable {
        case created, metadataCommitted, complete, aborted
    }

    public let backend: any FAMBackend
    public let generation: UInt64
    public let layout: ImageLayout
    public let pageAddresses: [UInt64]
    public private(set) var phase: Phase
    public private(set) var markedPageCount = 0

    /// Incremented by every fence; see the file comment.
    private var fenceEpoch = 0
    /// The epoch in which each page slot's lines were last flushed; nil before the first flush.
    private var pageFlushEpochs: [Int?]
    private var markedSlots: [Bool]
    /// The epoch of the latest mark flush; every mark is durable once `fenceEpoch` passes it.
    private var lastMarkFlushEpoch = -1
    /// The epoch in which superblock, metadata, page table and cleared marks were flushed.
    private var headerFlushEpoch: Int?

    private var path: String { backend.path ?? "FAM" }
    /// The page copy under way (begun, not finished).
    private struct PageCopy: Sendable {
        var slots: Range<Int>
        var processID: ProcessID
        var ranges: [ProcessReadRange]
        var pending: PendingStore?
    }
    private var copying: PageCopy?
    /// The keyed codes of a batch's pages, computed by `codeAhead` before the batch is flushed (on every
    /// CPU, while the next batch is read from the victim); `storeMark` takes a slot's code from here.
    private var codesAhead: (slots: Range<Int>, codes: [UInt64])?
    private let authenticator: ImageAuthenticator
    /// The header's code, stored in the superblock; the commit code is bound to it.
    private var headerCode: [UInt8] = []

    /// Lays out a new image in `backend` and stores superblock, metadata and page table (not yet
    /// durable: `commitMetadata()` makes them so). `pageAddresses` are the victim's pages to dump, one
    /// slot each, page-aligned and strictly increasing. Size the backend with `ImageLayout.byteCount`.
    /// `key` authenticates the image (header and commit codes); `creator` is recorded under the header
    /// code, and a restore never grants more than it. `imageIdentity` (MigrationPlan's) names the
    /// migration the image is of; a target that agreed on another refuses it.
    public static func create(backend: any FAMBackend, generation: UInt64, metadata: [UInt8],
                              pageAddresses: [UInt64], key: MigrationKey, imageIdentity: [UInt8]? = nil,
                              creator: ImageCreator = .current()) throws(ImageError) -> ImageWriter {
        if let imageIdentity {
            precondition(imageIdentity.count == ImageLayout.imageIdentityByteCount, "an image identity of \(imageIdentity.count) bytes")
            precondition(imageIdentity.contains { $0 != 0 }, "an image identity of zeros reads as none")
        }
        for (slot, address) in pageAddresses.enumerated() {
            precondition(address % UInt64(ImageLayout.pageSize) == 0, "page \(slot) at 0x\(String(address, radix: 16)) is not page-aligned")
            precondition(slot == 0 || pageAddresses[slot - 1] < address, "page addresses not increasing at slot \(slot)")
        }
        let layout = ImageLayout(metadataByteCount: metadata.count, pageCount: pageAddresses.count)
        guard backend.byteCount >= layout.fileByteCount else {
            throw .backendTooSmall(path: backend.path ?? "FAM", byteCount: backend.byteCount, requiredByteCount: layout.fileByteCount)
        }
        var writer = ImageWriter(backend: backend, generation: generation, layout: layout, pageAddresses: pageAddresses,
                                 authenticator: ImageAuthenticator(key: key, imageIdentity: imageIdentity))
        writer.storeInitialImage(metadata: metadata, creator: creator, imageIdentity: imageIdentity)
        return writer
    }

    private init(backend: any FAMBackend, generation: UInt64, layout: ImageLayout, pageAddresses: [UInt64],
                 authenticator: ImageAuthenticator) {
        self.authenticator = authenticator
        self.backend = backend
        self.generation = generation
        self.layout = layout
        self.pageAddresses = pageAddresses
        self.phase = .created
        self.pageFlushEpochs = Array(repeating: nil, count: layout.pageCount)
        self.markedSlots = Array(repeating: false, count: layout.pageCount)
    }

    private mutating func storeInitialImage(metadata: [UInt8], creator: ImageCreator, imageIdentity: [UInt8]?) {
        // The file may hold an older image: first make it unreadable, durably, before overwriting any of
        // it, so no reader ever mixes old and new regions.
        storeState(.creating)

        var paddedMetadata = metadata
        paddedMetadata.append(contentsOf: repeatElement(0, count: layout.paddedMetadataByteCount - metadata.count))
        backend.store(paddedMetadata, at: layout.metadata.offset)
        var pageTable = BinaryWriter()
        for address in pageAddresses { pageTable.writeUInt64(address) }
        backend.store(pageTable.bytes, at: layout.pageTable.offset)
        // Old marks would not count (their generation differs), but clearing them keeps the marks digest
        // independent of whatever the file held; likewise the commit record line.
        backend.store(Array(repeating: 0, count: layout.marksByteCount), at: layout.marks.offset)
        backend.store(Array(repeating: 0, count: ImageLayout.commitRecordByteCount), at: layout.commitRecord.offset)

        let superblock = ImageSuperblock(
            generation: generation, layout: layout,
            metadataDigest: SharedMapping.digest(of: paddedMetadata, seed: ImageDigestSeed.metadata(generation: generation)),
            pageTableDigest: SharedMapping.digest(of: pageTable.bytes, seed: ImageDigestSeed.pageTable(generation: generation)))
        let superblockBytes = superblock.encoded()
        backend.store(superblockBytes, at: 0)
        // Key identifier and creator, then the code over all of the header; flushed with the superblock.
        let extensionFields = authenticator.keyIdentifier + creator.encoded()
        precondition(extensionFields.count == ImageLayout.headerCodeOffset - ImageLayout.keyIdentifierOffset,
                     "authentication fields of \(extensionFields.count) bytes")
        headerCode = Array(authenticator.headerCode(superblock: superblockBytes, extensionFields: extensionFields,
                                                    paddedMetadata: paddedMetadata, pageTable: pageTable.bytes))
        backend.store(extensionFields + headerCode, at: ImageLayout.keyIdentifierOffset)
        // Zeros when none: the file may hold an older image's identity.
        if let imageIdentity {
            backend.store(imageIdentity, at: ImageLayout.imageIdentityOffset)
        } else if backend.loadBytes(at: ImageLayout.imageIdentityOffset, count: ImageLayout.imageIdentityByteCount).contains(where: { $0 != 0 }) {
            backend.store(Array(repeating: 0, count: ImageLayout.imageIdentityByteCount), at: ImageLayout.imageIdentityOffset)
        }
    }

    // MARK: Metadata commit

    /// Makes superblock, metadata and page table durable, then publishes state metadataCommitted: from
    /// here a target may restore the process and fault pages in.
    public mutating func commitMetadata() {
        precondition(phase == .created, "commitMetadata in phase \(phase)")
        backend.flush(at: 0, count: ImageLayout.superblockEncodedByteCount)
        backend.flush(at: layout.metadata.offset, count: layout.paddedMetadataByteCount)
        backend.flush(at: layout.pageTable.offset, count: layout.pageTableByteCount)
        backend.flush(at: layout.marks.offset, count: layout.marksByteCount)
        backend.flush(at: layout.commitRecord.offset, count: ImageLayout.commitRecordByteCount)
        headerFlushEpoch = fenceEpoch
        fence()
        // Invariant (2), metadata half: everything the state vouches for is flushed and fenced.
        precondition(headerFlushEpoch.map { $0 < fenceEpoch } == true, "metadata commit before the metadata is durable")
        storeState(.metadataCommitted)
        phase = .metadataCommitted
    }

    // MARK: Dumping pages, in steps

    /// The whole dump of a batch of slots: copy the pages from the victim straight into their slots,
    /// flush every line of them, fence, then digest each page from FAM and store and flush its mark.
    /// The marks are not fenced here: the next batch's page fence orders them (one fence per batch, not
    /// two), and `commit()` or `fenceMarks()` fences the last ones. A reader may see a mark late, never
    /// early. Slots may come in any order across calls; each slot is dumped once.
    public mutating func dumpPages(processID: ProcessID, slots: Range<Int>) throws(SyscallError) {
        try copyPagesFromProcess(processID: processID, slots: slots)
        seal(slots: slots)
    }

    /// Steps 2 to 4 of a batch copied into its slots (the unsealed batch): flush its lines, fence, then
    /// store and flush each page's mark (invariant 1, written once, here). The marks themselves are
    /// fenced by the next fence (the next batch's, `fenceMarks()` or `commit()`).
    public mutating func seal(slots: Range<Int>) {
        flushPages(slots: slots)
        fence()
        for slot in slots { storeMark(slot: slot) }
    }

    /// The whole dump of `slots`, one page run at a time, with the marks fenced at the end: a post-copy
    /// target that looks now sees every one of them (pages a target asked for, or needs before it resumes).
    /// Each run is read from its own process (a tree's runs may belong to several).
    public mutating func dumpPagesMarkedNow(_ runs: [(processID: ProcessID, slots: Range<Int>)]) throws(SyscallError) {
        for run in runs { try dumpPages(processID: run.processID, slots: run.slots) }
        fenceMarks()
    }

    /// Step 1: process_vm_readv the pages of `slots` into their slots, one range per run of adjacent
    /// pages. If a page cannot be read, nothing of the batch is marked; the caller may retry or abort.
    public mutating func copyPagesFromProcess(processID: ProcessID, slots: Range<Int>) throws(SyscallError) {
        startCopyingPagesFromProcess(processID: processID, slots: slots, concurrently: false)
        try finishCopyingPages()
    }

    /// Step 1, begun: `concurrently`, the copy may run on while the caller seals an earlier batch (the
    /// backend decides; a thread per copy, worth it for big batches only); else it is done here.
    /// `finishCopyingPages()` must come before anything else touches these slots. One copy at a time.
    public mutating func startCopyingPagesFromProcess(processID: ProcessID, slots: Range<Int>, concurrently: Bool = true) {
        precondition(phase == .created || phase == .metadataCommitted, "dump in phase \(phase)")
        precondition(slots.lowerBound >= 0 && slots.upperBound <= layout.pageCount, "slots \(slots) outside 0..<\(layout.pageCount)")
        precondition(copying == nil, "a page copy started while \(copying!.slots) is still being copied")
        var ranges: [ProcessReadRange] = []
        for slot in slots {
            precondition(!markedSlots[slot], "page slot \(slot) dumped twice")
            // A tree's page table tags each member's pages with its ordinal (TreePageAddress).
            let address = TreePageAddress.address(of: pageAddresses[slot])
            // Slots are consecutive, so adjacent pages are adjacent in FAM too: extend the last range.
            if let last = ranges.last, last.remoteAddress + UInt64(last.byteCount) == address {
                ranges[ranges.count - 1].byteCount += ImageLayout.pageSize
            } else {
                ranges.append((remoteAddress: address, byteCount: ImageLayout.pageSize, mappingOffset: layout.pageOffset(slot: slot)))
            }
        }
        // A page copied again after an earlier flush is no longer durable until flushed anew, nor coded.
        for slot in slots { pageFlushEpochs[slot] = nil }
        if let ahead = codesAhead, ahead.slots.overlaps(slots) { codesAhead = nil }
        let backend = backend
        let pending = ranges.isEmpty ? nil
            : concurrently ? backend.startStoreFromProcess(processID: processID, ranges: ranges)
            : PendingStore(outcome: Result { () throws(SyscallError) in try backend.storeFromProcess(processID: processID, ranges: ranges) })
        copying = PageCopy(slots: slots, processID: processID, ranges: ranges, pending: pending)
    }

    /// The slots of the copy under way, if any.
    public var slotsBeingCopied: Range<Int>? { copying?.slots }

    /// Step 1, finished: waits for the copy begun last. process_vm_readv refuses pages the victim may not
    /// read itself (PROT_NONE); /proc/PID/mem reads them by force. A page neither can read (beyond the
    /// end of its file) stays an error.
    public mutating func finishCopyingPages() throws(SyscallError) {
        guard let copy = copying else { preconditionFailure("finishCopyingPages without a copy under way") }
        copying = nil
        guard let pending = copy.pending else { return }
        do {
            try pending.finish()
        } catch where error.errno == .badAddress {
            for range in copy.ranges {
                let bytes: [UInt8]
                do { bytes = try readProcessMemory(copy.processID, address: range.remoteAddress, byteCount: range.byteCount) } catch let failure {
                    throw (failure as? SyscallError) ?? error
                }
                backend.store(bytes, at: range.mappingOffset)
            }
        }
    }

    /// Before step 2, for a batch copied in whole: the keyed code of each page of `slots` as it is in FAM
    /// now, all at once (the backend spreads them over the CPUs), for `storeMark` to store after the fence.
    /// Only this writer stores into page slots, and a slot copied again drops its code, so each code is
    /// of the bytes the flush makes durable.
    public mutating func codeAhead(slots: Range<Int>) {
        precondition(slots.lowerBound >= 0 && slots.upperBound <= layout.pageCount, "slots \(slots) outside 0..<\(layout.pageCount)")
        precondition(copying.map { !$0.slots.overlaps(slots) } ?? true, "codes of slots \(slots) while they are still being copied")
        guard !slots.isEmpty else { return }
        let (authenticator, generation, headerCode) = (authenticator, generation, headerCode)
        let addresses = Array(pageAddresses[slots])
        let codes = backend.pageCodes(at: layout.pageOffset(slot: slots.lowerBound), pageCount: slots.count,
                                      pageByteCount: ImageLayout.pageSize) { index, page in
            authenticator.markDigest(page: page, generation: generation, address: addresses[index], headerCode: headerCode)
        }
        precondition(codes.count == slots.count, "\(codes.count) codes for the \(slots.count) pages of \(slots)")
        codesAhead = (slots, codes)
    }

    /// Step 2: write back every line of the slots' pages (not yet ordered: see `fence()`).
    public mutating func flushPages(slots: Range<Int>) {
        precondition(slots.lowerBound >= 0 && slots.upperBound <= layout.pageCount, "slots \(slots) outside 0..<\(layout.pageCount)")
        precondition(copying.map { !$0.slots.overlaps(slots) } ?? true, "flush of slots \(slots) while they are still being copied")
        if slots.isEmpty { return }
        backend.flush(at: layout.pageOffset(slot: slots.lowerBound), count: slots.count * ImageLayout.pageSize)
        for slot in slots { pageFlushEpochs[slot] = fenceEpoch }
    }

    /// Step 3: sfence; every flush before it is durable before any store after it.
    public mutating func fence() {
        backend.fence()
        fenceEpoch += 1
    }

    /// Step 4: the slot's page code (keyed: `ImageAuthenticator.markDigest`), from the page as it is in
    /// FAM, stored as its mark; the mark's line flushed.
    public mutating func storeMark(slot: Int) {
        precondition(phase == .created || phase == .metadataCommitted, "storeMark in phase \(phase)")
        precondition(!markedSlots[slot], "mark of page slot \(slot) stored twice")
        // Invariant (1): the page's lines were flushed, and a fence has passed since.
        guard let flushEpoch = pageFlushEpochs[slot] else { preconditionFailure("mark of page slot \(slot) before its page was flushed") }
        precondition(flushEpoch < fenceEpoch, "mark of page slot \(slot) before its flush was fenced")
        let digest: UInt64
        if let ahead = codesAhead, ahead.slots.contains(slot) {
            digest = ahead.codes[slot - ahead.slots.lowerBound]
        } else {
            let page = backend.loadBytes(at: layout.pageOffset(slot: slot), count: ImageLayout.pageSize)
            digest = authenticator.markDigest(page: page, generation: generation, address: pageAddresses[slot], headerCode: headerCode)
        }
        let markOffset = layout.markOffset(slot: slot)
        // Digest first, tag second, both in one cache line: a reader that sees the tag sees the digest.
        backend.storeUInt64(digest, at: markOffset)
        backend.storeUInt64(ImageLayout.markTag(generation: generation), at: markOffset + 8)
        backend.flush(at: markOffset, count: ImageLayout.markByteCount)
        lastMarkFlushEpoch = fenceEpoch
        markedSlots[slot] = true
        markedPageCount += 1
    }

    /// Fences the marks stored since the last fence, so readers see them now rather than at the next batch.
    public mutating func fenceMarks() { fence() }

    public func isMarked(slot: Int) -> Bool { markedSlots[slot] }

    // MARK: Commit and abort

    /// After every page is marked: fence the marks, store the commit record, fence it, then publish
    /// state complete. From here the source's memory is no longer needed.
    public mutating func commit() {
        precondition(phase == .metadataCommitted, "commit in phase \(phase)")
        precondition(markedPageCount == layout.pageCount, "commit record before every mark: \(markedPageCount)/\(layout.pageCount)")
        fence()
        // Invariant (2): every mark is flushed (at store) and fenced.
        precondition(lastMarkFlushEpoch < fenceEpoch, "commit record before the marks are fenced")
        let marksDigest = backend.digest(at: layout.marks.offset, count: layout.marksByteCount,
                                         seed: ImageDigestSeed.marks(generation: generation))
        var record = Self.encodedCommitRecord(generation: generation, pageCount: layout.pageCount, marksDigest: marksDigest)
        // The code covers the marks themselves, not only their (unkeyed) checksum.
        let marks = backend.loadBytes(at: layout.marks.offset, count: layout.marksByteCount)
        precondition(copying == nil, "commit record while pages are still being copied")
        record += Array(authenticator.commitCode(headerCode: headerCode, commitRecord: record, marks: marks))
        precondition(record.count == ImageLayout.commitRecordByteCount, "commit record of \(record.count) bytes")
        backend.store(record, at: layout.commitRecord.offset)
        backend.flush(at: layout.commitRecord.offset, count: record.count)
        fence()
        storeState(.complete)
        phase = .complete
    }

    /// Marks the image unusable, durably. Allowed in any phase (a complete image can be withdrawn);
    /// aborting twice does nothing more.
    public mutating func abort() {
        // A copy still running would write into FAM that may be handed to someone else once withdrawn.
        if copying != nil { try? finishCopyingPages() }
        if phase == .aborted { return }
        storeState(.aborted)
        phase = .aborted
    }

    /// One aligned 8-byte store of the self-checking state word, written back and fenced.
    private mutating func storeState(_ state: ImageState) {
        backend.storeUInt64(ImageLayout.stateWord(state), at: ImageLayout.stateWordOffset)
        backend.flush(at: ImageLayout.stateWordOffset, count: 8)
        fence()
    }

    /// magic, generation, pageCount, marks digest, then a digest over those four words (the code follows).
    static func encodedCommitRecord(generation: UInt64, pageCount: Int, marksDigest: UInt64) -> [UInt8] {
        var writer = BinaryWriter()
        writer.writeUInt64(ImageLayout.commitRecordMagic)
        writer.writeUInt64(generation)
        writer.writeUInt64(UInt64(pageCount))
        writer.writeUInt64(marksDigest)
        writer.writeUInt64(SharedMapping.digest(of: writer.bytes, seed: ImageDigestSeed.commitRecord(generation: generation)))
        precondition(writer.bytes.count == ImageLayout.commitRecordCodeOffset, "commit record of \(writer.bytes.count) bytes")
        return writer.bytes
    }
}
