// Why this file exists: the decoders that read another node's bytes (the image reader: superblock,
// metadata, page table, marks, commit record; the process state codec; the frame decoder and the stream
// assembler in front of it; the sealed channel, ChannelFuzz.swift) are fuzzed here, each with an oracle stronger than "did not trap":
//   * state, frame: what decodes encodes back to the very same bytes (one encoding per value, so no
//     two byte strings mean one thing and nothing is silently dropped);
//   * stream: the frames handed out, re-encoded, are exactly a prefix of the bytes fed in;
//   * image, changed without the key: every covered byte that changed is refused on the path that reads
//     it (complete open; post-copy open, then each marked page's check);
//   * image, sealed again with the key (an insider): refused or accepted, never a trap, and what is
//     accepted is a process state that round-trips and that its creator could have had.
import Crypto
import Engine
import Sys

public enum FuzzTarget: String, CaseIterable, Sendable {
    case state, frame, stream, image
    /// The sealed channel's receiving side (ChannelFuzz.swift).
    case channel
}

/// The corpus of one campaign: named entries per target (files under Tests/fuzz/corpus/TARGET/).
public struct FuzzCorpus: Sendable {
    public var entries: [FuzzTarget: [(name: String, bytes: [UInt8])]]

    public init(entries: [FuzzTarget: [(name: String, bytes: [UInt8])]]) {
        // Sorted by name: the order reaches every input's choice of entry.
        self.entries = entries.mapValues { $0.sorted { $0.name < $1.name } }
    }

    public func count(_ target: FuzzTarget) -> Int { entries[target]?.count ?? 0 }
}

/// One input: which corpus entry it starts from and the bytes (and image mode) it is.
public struct FuzzInput: Sendable {
    public enum ImageMode: String, Sendable { case unchanged, changedWithoutKey, sealedWithKey }
    public var entryName: String
    public var bytes: [UInt8]
    public var imageMode: ImageMode

    public init(entryName: String, bytes: [UInt8], imageMode: ImageMode) {
        (self.entryName, self.bytes, self.imageMode) = (entryName, bytes, imageMode)
    }
}

/// What one input came to.
public enum FuzzVerdict: Equatable, Sendable {
    /// A decoder refused it (with an error, as it must for bad input).
    case refused
    /// It decoded (or opened) and every oracle held.
    case accepted
    /// An oracle broke: what happened.
    case broken(String)
}

public struct Fuzzer: Sendable {
    /// The key the corpus images are sealed under. Public on purpose: it authenticates nothing but the
    /// corpus, and an insider who holds the key is exactly what the sealed mode plays.
    public static let corpusKey = try! MigrationKey(bytes: (0..<MigrationKey.byteCount).map { UInt8($0) ^ 0xF5 })

    public let corpus: FuzzCorpus
    public let seed: UInt64
    private let mutator = FuzzMutator()

    public init(corpus: FuzzCorpus, seed: UInt64) {
        self.corpus = corpus
        self.seed = seed
    }

    /// Input `index` of `target`: the first ones are the corpus entries as they are, then mutations.
    public func input(_ target: FuzzTarget, index: Int) -> FuzzInput {
        let entries = corpus.entries[target] ?? []
        precondition(!entries.isEmpty, "no corpus entries for \(target)")
        if index < entries.count { return FuzzInput(entryName: entries[index].name, bytes: entries[index].bytes, imageMode: .unchanged) }
        var random = FuzzRandom(seed: seed, target: target.rawValue, index: index)
        let entry = entries[random.below(entries.count)]
        let other = entries[random.below(entries.count)].bytes
        switch target {
        case .state, .frame, .stream:
            return FuzzInput(entryName: entry.name, bytes: mutator.mutated(entry.bytes, other: other, random: &random), imageMode: .unchanged)
        case .image:
            if random.chance(1, in: 2) {
                let ranges = Self.coveredRanges(ofImage: entry.bytes)
                return FuzzInput(entryName: entry.name, bytes: mutator.mutated(entry.bytes, other: [], random: &random, keepingLength: true, ranges: ranges),
                                 imageMode: .changedWithoutKey)
            }
            return FuzzInput(entryName: entry.name, bytes: sealedMutation(of: entry.bytes, random: &random), imageMode: .sealedWithKey)
        case .channel:
            if random.chance(1, in: 2) {
                return FuzzInput(entryName: entry.name, bytes: mutator.mutated(entry.bytes, other: other, random: &random), imageMode: .changedWithoutKey)
            }
            return FuzzInput(entryName: entry.name, bytes: ChannelFuzz.insiderMutation(of: entry.bytes, mutator: mutator, random: &random),
                             imageMode: .sealedWithKey)
        }
    }

    /// Runs one input through its target.
    public func run(_ target: FuzzTarget, input: FuzzInput) -> FuzzVerdict {
        switch target {
        case .state: Self.checkState(input.bytes)
        case .frame: Self.checkFrame(input.bytes)
        case .stream: Self.checkStream(input.bytes, chunkSeed: UInt64(truncatingIfNeeded: input.bytes.count) ^ seed)
        case .image: checkImage(input)
        case .channel: ChannelFuzz.check(input.bytes)
        }
    }

    // MARK: State and frames

    static func checkState(_ bytes: [UInt8]) -> FuzzVerdict {
        guard let state = try? ProcessState.decode(bytes) else { return .refused }
        guard state.encoded() == bytes else { return .broken("a process state decodes but does not encode back to the same bytes") }
        // What a restore does next with it; either may refuse, neither may trap.
        _ = try? state.validate(pageAddresses: [], path: "fuzz")
        _ = try? ImageCreator(userID: 1000, groupID: 1000, permittedCapabilities: 0).checkAdmits(state.credentials, path: "fuzz")
        return .accepted
    }

    static func checkFrame(_ bytes: [UInt8]) -> FuzzVerdict {
        guard let message = try? Message.decode(bytes) else { return .refused }
        guard message.encoded() == bytes else { return .broken("a \(message.kindName) frame decodes but does not encode back to the same bytes") }
        if case .metadata(let state, let pageAddresses) = message {
            _ = try? ProcessState.decode(state).validate(pageAddresses: pageAddresses, path: "the source's socket")
        }
        return .accepted
    }

    /// Feeds `bytes` to a FrameAssembler in seeded chunks, as TCP would cut them.
    static func checkStream(_ bytes: [UInt8], chunkSeed: UInt64) -> FuzzVerdict {
        var random = FuzzRandom(seed: chunkSeed)
        var assembler = FrameAssembler()
        var handedOutByteCount = 0
        var fedByteCount = 0
        // A limit on the loop: each round feeds at least one byte or ends.
        for _ in 0...(bytes.count + 1) {
            do {
                while let message = try assembler.nextMessage() {
                    let frame = message.encoded()
                    let end = handedOutByteCount + frame.count
                    defer { handedOutByteCount = end }
                    guard end <= fedByteCount, frame[...] == bytes[handedOutByteCount..<end] else {
                        return .broken("the assembler handed out a \(message.kindName) frame that is not the next bytes of the stream")
                    }
                }
            } catch {
                return .refused  // From here on the stream is refused; what came before was checked.
            }
            guard fedByteCount < bytes.count else { return .accepted }
            let chunkByteCount = 1 + random.below(random.chance(1, in: 16) ? 8 : .pageSize)
            let end = min(bytes.count, fedByteCount + chunkByteCount)
            assembler.append(bytes[fedByteCount..<end])
            fedByteCount = end
        }
        return .broken("the assembler did not finish a stream of \(bytes.count) bytes")
    }

    // MARK: Images

    /// The bytes the checksums and codes cover, in an image as its writer made it: superblock fields and
    /// authentication (not the state word: it is the one field meant to change, and it checks itself),
    /// metadata, page table, marks, commit record, pages. Padding after them is covered by nothing.
    static func coveredRanges(ofImage bytes: [UInt8]) -> [Range<Int>] {
        guard bytes.count >= ImageLayout.superblockEncodedByteCount,
              let (_, layout) = ImageLayout.decodeIgnoringState(Array(bytes[0..<ImageLayout.superblockEncodedByteCount]), fileByteCount: bytes.count)
        else { return [] }
        return [0..<ImageLayout.stateWordOffset, (ImageLayout.stateWordOffset + 8)..<ImageLayout.superblockEncodedByteCount,
                layout.metadata.offset..<(layout.metadata.offset + layout.paddedMetadataByteCount),
                layout.pageTable.offset..<(layout.pageTable.offset + layout.pageTableByteCount),
                layout.marks.offset..<(layout.marks.offset + layout.marksByteCount),
                layout.commitRecord.offset..<(layout.commitRecord.offset + ImageLayout.commitRecordByteCount),
                layout.pageArea.offset..<(layout.pageArea.offset + layout.pageCount * ImageLayout.pageSize)].filter { !$0.isEmpty }
    }

    /// An insider's image: fields of the superblock, the metadata (any length that fits its region),
    /// the page table or the commit record changed, then everything sealed again under the key.
    private func sealedMutation(of bytes: [UInt8], random: inout FuzzRandom) -> [UInt8] {
        guard bytes.count >= ImageLayout.superblockEncodedByteCount,
              let (_, layout) = ImageLayout.decodeIgnoringState(Array(bytes[0..<ImageLayout.superblockEncodedByteCount]), fileByteCount: bytes.count)
        else { return bytes }
        let fam = MemoryFAM(bytes: bytes)
        switch random.below(4) {
        case 0:
            // The metadata blob, changed as the state target changes it, stored with its new length.
            let metadata = fam.loadBytes(at: layout.metadata.offset, count: layout.metadataByteCount)
            var changed = mutator.mutated(metadata, other: metadata, random: &random)
            changed = Array(changed.prefix(layout.metadata.byteCount))
            let padded = changed + Array(repeating: 0, count: (changed.count + 7) / 8 * 8 - changed.count)
            fam.store(padded, at: layout.metadata.offset)
            fam.storeUInt64(UInt64(changed.count), at: ImageLayout.metadataByteCountOffset)
        case 1:
            let fields = [ImageLayout.versionOffset..<ImageLayout.metadataDigestOffset,
                          ImageLayout.regionTableOffset..<ImageLayout.superblockDigestOffset,
                          ImageLayout.creatorOffset..<ImageLayout.headerCodeOffset]
            fam.store(mutator.mutated(fam.bytes, other: [], random: &random, keepingLength: true, ranges: fields)
                .prefix(ImageLayout.headerCodeOffset).map { $0 }, at: 0)
        case 2:
            let table = layout.pageTable.offset..<(layout.pageTable.offset + layout.pageTableByteCount)
            fam.store(mutator.mutated(fam.bytes, other: [], random: &random, keepingLength: true, ranges: [table].filter { !$0.isEmpty }), at: 0)
        default:
            let record = layout.commitRecord.offset..<(layout.commitRecord.offset + ImageLayout.commitRecordCodeOffset)
            let marks = layout.marks.offset..<(layout.marks.offset + layout.marksByteCount)
            fam.store(mutator.mutated(fam.bytes, other: [], random: &random, keepingLength: true, ranges: [record, marks].filter { !$0.isEmpty }), at: 0)
        }
        ImageSealer.reseal(fam, key: Self.corpusKey)
        return fam.bytes
    }

    private func checkImage(_ input: FuzzInput) -> FuzzVerdict {
        let original = (corpus.entries[.image] ?? []).first { $0.name == input.entryName }?.bytes ?? []
        switch input.imageMode {
        case .unchanged:
            // A corpus entry must restore, or the campaign fuzzes nothing behind the first check.
            do throws(ImageError) {
                var reader = try ImageReader.open(backend: MemoryFAM(bytes: input.bytes), key: Self.corpusKey, requireComplete: true)
                _ = try reader.checkedProcessState()
                for slot in 0..<reader.pageCount where !reader.isMarked(slot: slot) { return .broken("corpus image slot \(slot) is not marked") }
            } catch {
                return .broken("corpus image \(input.entryName) does not open: \(error)")
            }
            return .accepted
        case .changedWithoutKey:
            return checkChangedWithoutKey(input.bytes, original: original)
        case .sealedWithKey:
            return checkSealed(input.bytes)
        }
    }

    private func checkChangedWithoutKey(_ bytes: [UInt8], original: [UInt8]) -> FuzzVerdict {
        let covered = Self.coveredRanges(ofImage: original)
        if covered.contains(where: { bytes[$0] != original[$0] }),
           (try? ImageReader.open(backend: MemoryFAM(bytes: bytes), key: Self.corpusKey, requireComplete: true)) != nil {
            return .broken("an image changed without the key opens as complete")
        }
        // Post-copy: the header is checked at open, each page when its mark is observed.
        guard var reader = try? ImageReader.open(backend: MemoryFAM(bytes: bytes), key: Self.corpusKey, requireComplete: false),
              let (_, layout) = ImageLayout.decodeIgnoringState(Array(original[0..<ImageLayout.superblockEncodedByteCount]),
                                                                fileByteCount: original.count)
        else { return .refused }
        let header = covered.filter { $0.upperBound <= layout.pageTable.endOffset }
        if header.contains(where: { bytes[$0] != original[$0] }) {
            return .broken("a post-copy open accepted a header changed without the key")
        }
        _ = try? reader.checkedProcessState()
        for slot in 0..<reader.pageCount where reader.isMarked(slot: slot) {
            let pageRange = layout.pageOffset(slot: slot)..<(layout.pageOffset(slot: slot) + ImageLayout.pageSize)
            let markRange = layout.markOffset(slot: slot)..<(layout.markOffset(slot: slot) + ImageLayout.markByteCount)
            let pageChanged = bytes[pageRange] != original[pageRange] || bytes[markRange] != original[markRange]
            if pageChanged, (try? reader.verifyPage(slot: slot)) != nil {
                return .broken("post-copy installed page slot \(slot), changed without the key")
            }
        }
        return .accepted
    }

    private func checkSealed(_ bytes: [UInt8]) -> FuzzVerdict {
        var accepted = false
        for requireComplete in [true, false] {
            guard var reader = try? ImageReader.open(backend: MemoryFAM(bytes: bytes), key: Self.corpusKey, requireComplete: requireComplete),
                  let state = try? reader.checkedProcessState() else { continue }
            guard state.encoded() == reader.metadata else { return .broken("an accepted image's state does not encode back to its metadata") }
            guard zip(reader.pageAddresses, reader.pageAddresses.dropFirst()).allSatisfy({ $0 < $1 }) else {
                return .broken("an accepted image's page table is not strictly increasing")
            }
            for slot in 0..<reader.pageCount where reader.isMarked(slot: slot) { _ = try? reader.verifyPage(slot: slot) }
            accepted = true
        }
        return accepted ? .accepted : .refused
    }
}
