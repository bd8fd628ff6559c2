// Why this file exists: the target node's side of the image. An image is input: another node wrote it,
// a copy may be cut short, memory may be corrupted. So `open` checks everything it will rely on before
// returning (protocol invariant 4), works from snapshots it verified rather than re-reading, and page
// reads go through `isMarked(slot:)` first (invariant 3), enforced by a precondition on our own
// bookkeeping of which marks this reader has seen.
import Sys

/// A verified view of one image in a FAM backend.
public struct ImageReader: Sendable {
    public let backend: any FAMBackend
    public let path: String
    public let generation: UInt64
    public let layout: ImageLayout
    /// The state when opened: metadataCommitted or complete.
    public let openedState: ImageState
    /// The engine's metadata blob, exactly as verified.
    public let metadata: [UInt8]
    /// The page address of each slot, page-aligned, inside user space and strictly increasing.
    public let pageAddresses: [UInt64]
    public let superblockDigest: UInt64
    public let metadataDigest: UInt64
    public let pageTableDigest: UInt64
    /// From the verified commit record, when opened with `requireComplete`.
    public let marksDigest: UInt64?
    /// True when opened with `requireComplete`: commit record, marks and every page verified.
    public let isVerifiedComplete: Bool
    /// Who wrote the image, as recorded under the header code.
    public let creator: ImageCreator
    /// Slots whose mark this reader has observed; only those pages may be read.
    private var observedMarks: [Bool]
    /// Checks each page's keyed code, bound to the header code it verified.
    private let authenticator: ImageAuthenticator
    private let headerCode: [UInt8]

    public var pageCount: Int { layout.pageCount }

    /// Opens and verifies an image. With `requireComplete` the image must be complete, and the commit
    /// record, every mark and every page are verified too; without it (post-copy, where the dump is still
    /// running) the metadata commit is enough, and each page is read only after its mark is observed.
    /// `deferPageChecks`: a complete image's pages are not digested here; the caller checks each page
    /// with `verifiedPages(slots:)` as it uses it, and installs the copy that was checked (the restorer
    /// does, batch by batch: FAM is read once per page).
    ///
    /// `key`: the migration's key. The image must carry its identifier (else: wrong key), its header
    /// code must verify (else: the header was changed after the source wrote it), and with
    /// `requireComplete` the commit code too (else: the commit record or marks were changed).
    /// `imageIdentity`: the migration the reader agreed on with the source (MigrationPlan's); an image
    /// of another (or of none) is refused. Nil: any image of this key.
    public static func open(backend: any FAMBackend, key: MigrationKey, requireComplete: Bool,
                            deferPageChecks: Bool = false, imageIdentity: [UInt8]? = nil) throws(ImageError) -> ImageReader {
        let path = backend.path ?? "FAM"
        guard backend.byteCount >= ImageLayout.pageSize else {
            let magicByteCount = ImageLayout.magic.count
            if backend.byteCount >= magicByteCount && backend.loadBytes(at: 0, count: magicByteCount) != ImageLayout.magic {
                throw .badMagic(path: path)
            }
            throw .truncated(path: path, byteCount: backend.byteCount, requiredByteCount: ImageLayout.pageSize)
        }
        let snapshot = backend.loadBytes(at: 0, count: ImageLayout.superblockEncodedByteCount)
        let (superblock, state) = try ImageSuperblock.decode(snapshot, path: path, fileByteCount: backend.byteCount,
                                                             requireComplete: requireComplete)
        let layout = superblock.layout
        let generation = superblock.generation

        let paddedMetadata = backend.loadBytes(at: layout.metadata.offset, count: layout.paddedMetadataByteCount)
        guard SharedMapping.digest(of: paddedMetadata, seed: ImageDigestSeed.metadata(generation: generation)) == superblock.metadataDigest else {
            throw .metadataChecksumMismatch(path: path)
        }
        let pageTable = backend.loadBytes(at: layout.pageTable.offset, count: layout.pageTableByteCount)
        guard SharedMapping.digest(of: pageTable, seed: ImageDigestSeed.pageTable(generation: generation)) == superblock.pageTableDigest else {
            throw .pageTableChecksumMismatch(path: path)
        }
        // Checksums first (a damaged image says "corrupted"), then the code (one that checksums but does
        // not authenticate was changed on purpose); nothing of the metadata is decoded before both.
        let storedIdentityBytes = Array(snapshot[ImageLayout.imageIdentityOffset..<(ImageLayout.imageIdentityOffset + ImageLayout.imageIdentityByteCount)])
        let storedIdentity = storedIdentityBytes.contains { $0 != 0 } ? storedIdentityBytes : nil
        if let imageIdentity, storedIdentity != imageIdentity { throw .anotherMigration(path: path) }
        let authenticator = ImageAuthenticator(key: key, imageIdentity: storedIdentity)
        let storedKeyIdentifier = Array(snapshot[ImageLayout.keyIdentifierOffset..<ImageLayout.creatorOffset])
        guard storedKeyIdentifier == authenticator.keyIdentifier else { throw .wrongKey(path: path) }
        let extensionFields = Array(snapshot[ImageLayout.keyIdentifierOffset..<ImageLayout.headerCodeOffset])
        let storedHeaderCode = Array(snapshot[ImageLayout.headerCodeOffset..<(ImageLayout.headerCodeOffset + ImageLayout.codeByteCount)])
        let headerCode = authenticator.headerCode(superblock: Array(snapshot[0..<ImageLayout.stateWordOffset]),
                                                  extensionFields: extensionFields, paddedMetadata: paddedMetadata, pageTable: pageTable)
        guard ImageAuthenticator.matches(headerCode, stored: storedHeaderCode) else {
            throw .headerNotAuthentic(path: path)
        }
        let creator = try ImageCreator.decode(Array(snapshot[ImageLayout.creatorOffset..<ImageLayout.headerCodeOffset]))
        let pageAddresses = try decodedPageAddresses(pageTable, pageCount: layout.pageCount, path: path)

        let marksDigest = requireComplete
            ? try verifiedCommitRecord(backend: backend, layout: layout, generation: generation, path: path,
                                       authenticator: authenticator, headerCode: storedHeaderCode) : nil
        var reader = ImageReader(
            backend: backend, path: path, generation: generation, layout: layout, openedState: state,
            metadata: Array(paddedMetadata.prefix(layout.metadataByteCount)), pageAddresses: pageAddresses,
            superblockDigest: superblock.superblockDigest, metadataDigest: superblock.metadataDigest,
            pageTableDigest: superblock.pageTableDigest,
            marksDigest: marksDigest,
            isVerifiedComplete: requireComplete, creator: creator,
            observedMarks: Array(repeating: false, count: layout.pageCount), authenticator: authenticator, headerCode: storedHeaderCode)
        if requireComplete && !deferPageChecks { try reader.verifyEveryPage() }
        return reader
    }

    private static func decodedPageAddresses(_ pageTable: [UInt8], pageCount: Int, path: String) throws(ImageError) -> [UInt64] {
        guard pageTable.count >= pageCount * 8 else {
            throw .badRegion(path: path, region: .pageTable, reason: "\(pageTable.count) bytes for \(pageCount) entries")
        }
        // One bulk little-endian load, not a reader call per entry: a 256 MiB image has 65,536 entries
        // and the target waits for them before it can start.
        let words = LittleEndian.words(pageTable, count: pageCount)
        var addresses: [UInt64] = []
        addresses.reserveCapacity(pageCount)
        for slot in 0..<pageCount {
            let address = words[slot]
            guard address % UInt64(ImageLayout.pageSize) == 0 else {
                throw .badPageAddress(path: path, slot: slot, address: address, reason: "is not page-aligned")
            }
            // Only user memory is ever dumped ([vsyscall] never is): anything else is not a victim's page.
            // A tree's page carries its process's ordinal above user space (TreePageAddress).
            let userAddress = TreePageAddress.address(of: address)
            guard userAddress >= AddressSpace.lowestAddress, userAddress < AddressSpace.userSpaceEnd,
                  TreePageAddress.ordinal(of: address) < TreeLimits.processCountMax else {
                throw .badPageAddress(path: path, slot: slot, address: address, reason: "lies outside user space")
            }
            if let previous = addresses.last, previous >= address {
                throw .badPageAddress(path: path, slot: slot, address: address,
                                      reason: "is not above entry \(slot - 1) (0x\(String(previous, radix: 16)))")
            }
            addresses.append(address)
        }
        return addresses
    }

    /// Checks the commit record and returns the marks digest it holds.
    private static func verifiedCommitRecord(backend: any FAMBackend, layout: ImageLayout, generation: UInt64, path: String,
                                             authenticator: ImageAuthenticator, headerCode: [UInt8]) throws(ImageError) -> UInt64 {
        let bytes = backend.loadBytes(at: layout.commitRecord.offset, count: ImageLayout.commitRecordByteCount)
        var recordReader = BinaryReader(bytes)
        let magic = try recordReader.readUInt64()
        let recordGeneration = try recordReader.readUInt64()
        let recordPageCount = try recordReader.readUInt64()
        let marksDigest = try recordReader.readUInt64()
        let recordDigest = try recordReader.readUInt64()
        if bytes.allSatisfy({ $0 == 0 }) {
            throw .badCommitRecord(path: path, reason: "is missing although the state says complete")
        }
        guard magic == ImageLayout.commitRecordMagic else { throw .badCommitRecord(path: path, reason: "has a bad magic") }
        guard recordGeneration == generation else {
            throw .badCommitRecord(path: path, reason: "is for generation \(recordGeneration), the superblock says \(generation)")
        }
        guard recordPageCount == UInt64(layout.pageCount) else {
            throw .badCommitRecord(path: path, reason: "counts \(recordPageCount) pages, the superblock says \(layout.pageCount)")
        }
        let digestedBytes = Array(bytes.prefix(ImageLayout.commitRecordDigestedByteCount))
        guard SharedMapping.digest(of: digestedBytes, seed: ImageDigestSeed.commitRecord(generation: generation)) == recordDigest else {
            throw .badCommitRecord(path: path, reason: "does not match its checksum")
        }
        let marksBytes = backend.loadBytes(at: layout.marks.offset, count: layout.marksByteCount)
        guard SharedMapping.digest(of: marksBytes, seed: ImageDigestSeed.marks(generation: generation)) == marksDigest else {
            throw .marksChecksumMismatch(path: path)
        }
        let storedCode = Array(bytes[ImageLayout.commitRecordCodeOffset...])
        let code = authenticator.commitCode(headerCode: headerCode, commitRecord: Array(bytes.prefix(ImageLayout.commitRecordCodeOffset)),
                                            marks: marksBytes)
        guard ImageAuthenticator.matches(code, stored: storedCode) else {
            throw .commitRecordNotAuthentic(path: path)
        }
        return marksDigest
    }

    /// Every slot must be marked and its page must match the mark's digest.
    private mutating func verifyEveryPage() throws(ImageError) {
        for slot in 0..<pageCount {
            guard isMarked(slot: slot) else {
                throw .pageNotMarked(path: path, slot: slot, address: pageAddresses[slot])
            }
            try verifyPage(slot: slot)
        }
    }

    // MARK: Marks and pages

    /// Reads the slot's mark from FAM now; once it is seen, this reader may read the page. The tag is
    /// read before the digest: the writer stored them in the opposite order in one cache line.
    public mutating func isMarked(slot: Int) -> Bool {
        if observedMarks[slot] { return true }
        let tag = backend.loadUInt64(at: layout.markOffset(slot: slot) + 8)
        guard tag == ImageLayout.markTag(generation: generation) else { return false }
        observedMarks[slot] = true
        return true
    }

    /// Whether this reader has already observed the slot's mark (no FAM read).
    public func hasObservedMark(slot: Int) -> Bool { observedMarks[slot] }

    /// The page digest its mark holds, or nil while the mark is not stored.
    public func pageDigest(slot: Int) -> UInt64? { PageChecker(self, observed: 0..<0).digest(slot: slot) }

    /// What checking pages against their marks needs, for `observed` slots whose marks this reader has
    /// seen (invariant 3, checked when it is made): the values fixed at the open, without the reader's
    /// record of observed marks. A thread keeps one outside the lock that guards a shared reader (a copy
    /// of the reader alive there would make the next mark recorded copy that whole record, a Bool per
    /// page of the image) and loads and checks its private copy without holding any lock.
    public struct PageChecker: Sendable {
        fileprivate let backend: any FAMBackend
        fileprivate let path: String
        fileprivate let generation: UInt64
        fileprivate let layout: ImageLayout
        fileprivate let pageAddresses: [UInt64]
        fileprivate let authenticator: ImageAuthenticator
        fileprivate let headerCode: [UInt8]
        /// The slots whose pages this checker may read.
        public let observed: Range<Int>

        fileprivate init(_ reader: ImageReader, observed: Range<Int>) {
            (backend, path, generation, layout) = (reader.backend, reader.path, reader.generation, reader.layout)
            (pageAddresses, authenticator, headerCode) = (reader.pageAddresses, reader.authenticator, reader.headerCode)
            self.observed = observed
        }

        /// The page digest the slot's mark holds, or nil while the mark is not stored.
        fileprivate func digest(slot: Int) -> UInt64? {
            let markOffset = layout.markOffset(slot: slot)
            guard backend.loadUInt64(at: markOffset + 8) == ImageLayout.markTag(generation: generation) else { return nil }
            return backend.loadUInt64(at: markOffset)
        }

        /// The keyed code a page's mark must hold (the writer's definition: ImageAuthenticator.markDigest),
        /// over the page where it lies in a copy (no copy of its own per page).
        fileprivate func code(_ page: ArraySlice<UInt8>, address: UInt64) -> UInt64 {
            authenticator.markDigest(page: page, generation: generation, address: address, headerCode: headerCode)
        }

        /// The pages of `slots` (inside `observed`) as one private copy, read from FAM once, each page
        /// checked against its mark's keyed code. The answer says which leading pages passed; the bytes
        /// are only ever handed out for those (`CheckedPages.prefix`).
        ///
        /// The marks are read first, every one of them, and only then the pages (invariant 3 again, as
        /// defence in depth: a page's bytes are trusted only when its mark was seen before they were
        /// read, so a page read ahead of its mark can never pass); pages from the first one not marked
        /// are not read at all. Callers ask only for the run they mean to install: every page here is
        /// coded once.
        public func load(slots: Range<Int>) -> CheckedPages {
            precondition(slots.isEmpty || (slots.lowerBound >= observed.lowerBound && slots.upperBound <= observed.upperBound),
                         "page slots \(slots) read outside the observed \(observed)")
            guard !slots.isEmpty else { return CheckedPages(slots: slots, bytes: [], failure: nil) }
            var expected: [UInt64] = []
            expected.reserveCapacity(slots.count)
            var failure: (slot: Int, error: ImageError)?
            for slot in slots {
                guard let digest = digest(slot: slot) else {
                    failure = (slot, .pageNotMarked(path: path, slot: slot, address: pageAddresses[slot]))
                    break
                }
                expected.append(digest)
            }
            let markedCount = expected.count
            let bytes = markedCount == 0 ? []
                : backend.loadBytes(at: layout.pageOffset(slot: slots.lowerBound), count: markedCount * ImageLayout.pageSize)
            // A page that fails comes before any page not marked (those were not read): the first failure
            // in slot order is the one reported, as a check page by page gives.
            for index in 0..<markedCount {
                let slot = slots.lowerBound + index
                let start = index * ImageLayout.pageSize
                guard code(bytes[start..<(start + ImageLayout.pageSize)], address: pageAddresses[slot]) == expected[index] else {
                    failure = (slot, .pageChecksumMismatch(path: path, slot: slot, address: pageAddresses[slot]))
                    break
                }
            }
            return CheckedPages(slots: slots, bytes: bytes, failure: failure)
        }
    }

    /// A checker for `slots`, whose marks this reader must have observed (a precondition).
    public func pageChecker(observed slots: Range<Int>) -> PageChecker {
        for slot in slots { precondition(observedMarks[slot], "page slot \(slot) read before its mark was observed") }
        return PageChecker(self, observed: slots)
    }

    /// Byte offset of the slot's page in FAM (for UFFDIO_COPY straight from `backend.readableMapping`).
    /// Invariant (3): only for a slot whose mark this reader observed.
    public func pageOffset(slot: Int) -> Int {
        precondition(observedMarks[slot], "page slot \(slot) read before its mark was observed")
        return layout.pageOffset(slot: slot)
    }

    /// The page's bytes. Invariant (3): only for a slot whose mark this reader observed.
    public func loadPage(slot: Int) -> [UInt8] {
        backend.loadBytes(at: pageOffset(slot: slot), count: ImageLayout.pageSize)
    }

    /// Checks the page in FAM against its mark's keyed code (so a page or mark rewritten by someone
    /// without the key fails here, on every install path). Only for an observed mark.
    public func verifyPage(slot: Int) throws(ImageError) {
        _ = try verifiedPages(slots: slot..<(slot + 1))
    }

    /// The pages of `slots` as one private copy, each checked against its mark's keyed code: what a
    /// caller installs is exactly what was checked (invariant 4 without a window: a page checked in FAM
    /// and then copied from FAM again could be changed in between, and go in unchecked). Only for
    /// observed marks; throws for the first page that does not match.
    public func verifiedPages(slots: Range<Int>) throws(ImageError) -> [UInt8] {
        try pageChecker(observed: slots).load(slots: slots).prefix(slots.count)
    }

    /// The digest an observed mark of `slot` holds, or `pageNotMarked`.
    private func markedDigest(slot: Int) throws(ImageError) -> UInt64 {
        guard let digest = pageDigest(slot: slot) else { throw .pageNotMarked(path: path, slot: slot, address: pageAddresses[slot]) }
        return digest
    }

    /// `verifiedPages` begun now: the backend may load and code the pages on a thread of its own (the
    /// nonlive restore does, one batch ahead); the answer's `finish()` gives the checked copy, or throws
    /// for the first page that does not match. Only for observed marks.
    public func startVerifiedPages(slots: Range<Int>) throws(ImageError) -> PendingVerifiedPages {
        let expected = try slots.map { (slot) throws(ImageError) in try markedDigest(slot: slot) }
        let addresses = Array(pageAddresses[slots])
        // The checker, not the reader, goes to the loading thread: a copy of the reader alive there would
        // make the next mark recorded copy the whole observed-marks record.
        let checker = pageChecker(observed: slots)
        let pending = slots.isEmpty ? PendingPages(([], []))
            : backend.startPageLoad(at: pageOffset(slot: slots.lowerBound), pageCount: slots.count, pageByteCount: ImageLayout.pageSize) { index, page in
                checker.code(page, address: addresses[index])
            }
        return PendingVerifiedPages(slots: slots, expected: expected, pending: pending, path: path, pageAddresses: addresses)
    }

    /// The slot holding the page at `address` (page-aligned), or nil when the image has no such page.
    public func slot(forAddress address: UInt64) -> Int? { slotIndex(of: address, in: pageAddresses) }

    /// Whether the image is committed now: its state word says complete and its commit record verifies
    /// under the migration key (the state word alone is not authenticated: a FAM writer without the key
    /// could set it, and a target that took it for the commit would let its process go on its own while
    /// the victim still ran). Reads every mark once the word says complete.
    public func isCommittedAuthentically() -> Bool {
        guard (try? currentState()) == .complete else { return false }
        return (try? Self.verifiedCommitRecord(backend: backend, layout: layout, generation: generation, path: path,
                                               authenticator: authenticator, headerCode: headerCode)) != nil
    }

    /// The state word as it is in FAM now (a post-copy target polls it for complete or aborted).
    public func currentState() throws(ImageError) -> ImageState {
        let word = backend.loadUInt64(at: ImageLayout.stateWordOffset)
        guard let state = ImageLayout.state(fromWord: word) else { throw .damagedState(path: path, word: word) }
        return state
    }

    /// How many marks are stored now (reads every mark; for inspection, not the fault path).
    public func storedMarkCount() -> Int {
        (0..<pageCount).count(where: { pageDigest(slot: $0) != nil })
    }
}

/// A private copy of pages read once from FAM and checked against their marks (`PageChecker.load`):
/// the checked leading pages are what an installer puts in, so nothing goes in that no check saw.
public struct CheckedPages: Sendable {
    public let slots: Range<Int>
    let bytes: [UInt8]
    /// The first page that failed its check (not marked any more, or not its mark's code), and why.
    let failure: (slot: Int, error: ImageError)?

    /// The copy of the first `pageCount` pages; throws the first failure among them (the same error a
    /// check of just those pages gives). `bytes` may stop at the first page not marked: no page at or
    /// after a failure is ever handed out.
    public func prefix(_ pageCount: Int) throws(ImageError) -> [UInt8] {
        precondition(pageCount >= 0 && pageCount <= slots.count, "\(pageCount) pages wanted of \(slots.count) checked")
        if let failure, failure.slot < slots.lowerBound + pageCount { throw failure.error }
        precondition(bytes.count >= pageCount * ImageLayout.pageSize, "\(pageCount) checked pages handed out of \(bytes.count) bytes read")
        return bytes.count == pageCount * ImageLayout.pageSize ? bytes : Array(bytes.prefix(pageCount * ImageLayout.pageSize))
    }
}

/// Pages loaded and coded under way, against their marks (`ImageReader.startVerifiedPages`).
public struct PendingVerifiedPages: Sendable {
    public let slots: Range<Int>
    let expected: [UInt64]
    let pending: PendingPages
    let path: String
    let pageAddresses: [UInt64]

    /// Waits for the copy; throws for the first page whose code is not its mark's, else gives the copy
    /// (the bytes to install: no second read of FAM).
    public func finish() throws(ImageError) -> [UInt8] {
        let loaded = pending.finish()
        for (index, actual) in loaded.codes.enumerated() where actual != expected[index] {
            throw .pageChecksumMismatch(path: path, slot: slots.lowerBound + index, address: pageAddresses[index])
        }
        return loaded.bytes
    }
}
