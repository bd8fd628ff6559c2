// An image or a peer message is untrusted input. These tests build images that pass every checksum but
// say something hostile (a mapping outside user space, overlapping mappings or pages, more pages than the
// file holds, a truncated file, a huge length) and check that the library refuses each with its specific
// error, and that `fammig restore` and `fammig inspect` exit 2 with a clear message, creating no process.
// Seeded fuzzing of the metadata blob and of peer messages checks that decoding never traps. And the FAM
// file and the listener are only as open as they must be: mode 0600, the given address only.
import Foundation
import Glibc
import Testing
@testable import Engine
import Sys

// MARK: A plausible victim, and images of it

/// A state that validates, with an anonymous mapping over `dataRange` (none when nil); its fields filled
/// so that each of them reaches the decoder.
func plausibleState(processID: ProcessID, dataRange: Range<UInt64>?) -> ProcessState {
    let sourceStart = dataRange?.lowerBound ?? 0x7f00_0000_0000
    var mappings = [Mapping(start: 0x40_0000, end: 0x40_2000, readable: true, writable: false, executable: true, shared: false,
                            fileOffset: 0, kind: .file(path: "/usr/bin/true"))]
    if let dataRange {
        mappings.append(Mapping(start: dataRange.lowerBound, end: dataRange.upperBound, readable: true, writable: true,
                                executable: false, shared: false, fileOffset: 0, kind: .anonymous))
    }
    mappings.append(Mapping(start: AddressSpace.userSpaceEnd - 0x21000, end: AddressSpace.userSpaceEnd, readable: true,
                            writable: true, executable: false, shared: false, fileOffset: 0, kind: .stack))
    mappings.append(Mapping(start: AddressSpace.vsyscallRange.lowerBound, end: AddressSpace.vsyscallRange.upperBound,
                            readable: false, writable: false, executable: true, shared: false, fileOffset: 0, kind: .vsyscall))
    var registers = GeneralRegisters()
    (registers.rip, registers.rsp, registers.cs, registers.ss) = (0x40_1000, AddressSpace.userSpaceEnd - 0x1000, 0x33, 0x2b)
    func siginfo(_ signal: UInt8) -> [UInt8] { [signal, 0, 0, 0] + Array(repeating: 0, count: 124) }
    let thread = ThreadState(threadID: processID, registers: registers, extendedState: Array(repeating: 7, count: 576),
                             signalMask: 1 << 9, rseq: RseqConfiguration(address: sourceStart + 64, byteCount: 32, signature: 0x5305_3053, flags: 0),
                             pendingSignals: [PendingSignal(shared: false, siginfo: siginfo(10))], commandName: "victim")
    var descriptor = MemoryDescriptorFields()
    (descriptor.startCode, descriptor.endCode, descriptor.startBrk, descriptor.brk) = (0x40_0000, 0x40_2000, 0x60_0000, 0x62_0000)
    descriptor.auxiliaryVector = Array(repeating: 1, count: 32)
    var credentials = Credentials()
    credentials.userIDs = [1000, 1000, 1000, 1000]
    credentials.supplementaryGroups = [4, 24]
    credentials.permitted = 0x3
    credentials.effective = 0x1
    return ProcessState(
        processID: processID, executablePath: "/usr/bin/true", commandName: "victim", threads: [thread],
        signalActions: [SignalAction(signal: 10, handler: 0x40_1100, flags: 0x0400_0000, restorer: 0x40_1200, mask: 0)],
        sharedPendingSignals: [PendingSignal(shared: true, siginfo: siginfo(12))], memoryDescriptor: descriptor,
        personality: 0, parentDeathSignal: 0, credentials: credentials,
        resourceLimits: (0..<16).map { ResourceLimit(resource: $0, soft: 1024, hard: UInt64.max) },
        seccompMode: 2, seccompFilters: [SeccompFilter(program: Array(repeating: 6, count: 4 * 8), flags: 0)],
        mappings: mappings, files: [OpenFile(descriptor: 0, path: "/dev/null", flags: 0, position: 0),
                                    OpenFile(descriptor: 1, path: "/tmp/victim.out", flags: 0o1, position: 10)])
}

/// The range of `source`'s pages, for `plausibleState`.
func dataRange(of source: SourceMemory) -> Range<UInt64> {
    source.address(pageIndex: 0)..<(source.address(pageIndex: SourceMemory.pageCount - 1) + 4096)
}

/// Writes a complete, well-checksummed image of `metadata` whose pages are `dumpedPageIndexes` of `source`.
@discardableResult
func writeStateImage(path: String, metadata: [UInt8], source: SourceMemory) throws -> ImageLayout {
    let addresses = dumpedPageIndexes.map { source.address(pageIndex: $0) }
    let fam = try RealFAM.create(path: path, byteCount: ImageLayout.byteCount(metadataByteCount: metadata.count, pageCount: addresses.count),
                                 prefault: false)
    var writer = try ImageWriter.create(backend: fam, generation: testGeneration, metadata: metadata, pageAddresses: addresses, key: testKey)
    writer.commitMetadata()
    try writer.dumpPages(processID: selfProcessID, slots: 0..<addresses.count)
    writer.commit()
    return writer.layout
}

/// Stores `fields` (offset, word) into the superblock and seals it again, so only what they say is wrong.
func patchSuperblock(path: String, _ fields: [(byteOffset: Int, value: UInt64)]) throws {
    let mapping = try SharedMapping.open(path: path, writable: true)
    for field in fields { mapping.storeUInt64(field.value, at: field.byteOffset) }
    let digested = mapping.loadBytes(at: 0, count: ImageLayout.superblockDigestOffset)
    mapping.storeUInt64(SharedMapping.digest(of: digested, seed: ImageDigestSeed.superblock), at: ImageLayout.superblockDigestOffset)
    // A hostile source holds the key: the codes verify too, so what the fields say is what is judged.
    try resealCodes(path: path)
}

/// Replaces the page table and seals it and the superblock again.
func replacePageTable(path: String, layout: ImageLayout, with addresses: [UInt64]) throws {
    let mapping = try SharedMapping.open(path: path, writable: true)
    var table = BinaryWriter()
    for address in addresses { table.writeUInt64(address) }
    mapping.store(bytes: table.bytes, at: layout.pageTable.offset)
    try patchSuperblock(path: path, [(ImageLayout.pageTableDigestOffset,
                                      SharedMapping.digest(of: table.bytes, seed: ImageDigestSeed.pageTable(generation: testGeneration)))])
}

/// What the restorer does before it creates a process (`Restorer.openImage`): nil when all of it passes.
func restorerRejection(_ path: String) -> ImageError? {
    do throws(ImageError) {
        let reader = try ImageReader.open(backend: try RealFAM.open(path: path, writable: false), key: testKey, requireComplete: true,
                                          deferPageChecks: true)
        try ProcessState.decode(reader.metadata).validate(pageAddresses: reader.pageAddresses, path: reader.path)
        return nil
    } catch {
        return error
    }
}

/// One hostile image: checksums all verify, the content does not.
enum HostileImage: CaseIterable, Sendable, CustomStringConvertible {
    case mappingAboveUserSpace, mappingInKernelSpace, misplacedVsyscall, overlappingMappings
    case duplicatePage, decreasingPages, pageOutsideMappings
    case pageCountBeyondPageArea, pageCountBeyondFile, truncatedPageArea, truncatedSuperblock
    case hugeMetadataByteCount, hugeStringLength

    var description: String {
        switch self {
        case .mappingAboveUserSpace: "mapping-above-user-space"
        case .mappingInKernelSpace: "mapping-in-kernel-space"
        case .misplacedVsyscall: "misplaced-vsyscall"
        case .overlappingMappings: "overlapping-mappings"
        case .duplicatePage: "duplicate-page"
        case .decreasingPages: "decreasing-pages"
        case .pageOutsideMappings: "page-outside-mappings"
        case .pageCountBeyondPageArea: "page-count-beyond-page-area"
        case .pageCountBeyondFile: "page-count-beyond-file"
        case .truncatedPageArea: "truncated-page-area"
        case .truncatedSuperblock: "truncated-superblock"
        case .hugeMetadataByteCount: "huge-metadata-byte-count"
        case .hugeStringLength: "huge-string-length"
        }
    }

    static let claimedPageCount: UInt64 = 1_000_000
    static let claimedMetadataByteCount: UInt64 = 1 << 40

    /// Writes the image to `path`; `scratch` holds a good copy when the hostile one is cut from it.
    func write(to path: String, scratch: String, state: ProcessState, source: SourceMemory) throws {
        func metadata(_ change: (inout ProcessState) -> Void) -> [UInt8] {
            var hostile = state
            change(&hostile)
            return hostile.encoded()
        }
        let anonymous = Mapping(start: 0, end: 0, readable: true, writable: true, executable: false, shared: false, fileOffset: 0, kind: .anonymous)
        // The last mapping is [vsyscall]; others go in before it, in address order.
        let vsyscallIndex = state.mappings.count - 1
        switch self {
        case .mappingAboveUserSpace:
            var mapping = anonymous
            (mapping.start, mapping.end) = (AddressSpace.userSpaceEnd, AddressSpace.userSpaceEnd + 0x1000)
            try writeStateImage(path: path, metadata: metadata { $0.mappings.insert(mapping, at: vsyscallIndex) }, source: source)
        case .mappingInKernelSpace:
            var mapping = anonymous
            (mapping.start, mapping.end) = (0xffff_8880_0000_0000, 0xffff_8880_0010_0000)
            try writeStateImage(path: path, metadata: metadata { $0.mappings.insert(mapping, at: vsyscallIndex) }, source: source)
        case .misplacedVsyscall:
            try writeStateImage(path: path, metadata: metadata {
                ($0.mappings[vsyscallIndex].start, $0.mappings[vsyscallIndex].end) = (0xffff_8880_0000_0000, 0xffff_8880_0000_1000)
            }, source: source)
        case .overlappingMappings:
            var mapping = anonymous
            (mapping.start, mapping.end) = (0x40_1000, 0x40_3000)  // over the executable's second page, in address order
            try writeStateImage(path: path, metadata: metadata { $0.mappings.insert(mapping, at: 1) }, source: source)
        case .duplicatePage, .decreasingPages:
            let layout = try writeStateImage(path: path, metadata: state.encoded(), source: source)
            var addresses = dumpedPageIndexes.map { source.address(pageIndex: $0) }
            if self == .duplicatePage { addresses[2] = addresses[1] } else { addresses.swapAt(2, 3) }
            try replacePageTable(path: path, layout: layout, with: addresses)
        case .pageOutsideMappings:
            try writeStateImage(path: path, metadata: plausibleState(processID: state.processID, dataRange: nil).encoded(), source: source)
        case .pageCountBeyondPageArea:
            try writeStateImage(path: path, metadata: state.encoded(), source: source)
            try patchSuperblock(path: path, [(ImageLayout.pageCountOffset, Self.claimedPageCount)])
        case .pageCountBeyondFile:
            // A superblock whose every region agrees with the claimed page count: only the file is too short.
            let layout = try writeStateImage(path: path, metadata: state.encoded(), source: source)
            let mapping = try SharedMapping.open(path: path, writable: true)
            let superblock = ImageSuperblock(generation: testGeneration,
                                             layout: ImageLayout(metadataByteCount: layout.metadataByteCount, pageCount: Int(Self.claimedPageCount)),
                                             metadataDigest: mapping.loadUInt64(at: ImageLayout.metadataDigestOffset),
                                             pageTableDigest: mapping.loadUInt64(at: ImageLayout.pageTableDigestOffset))
            mapping.store(bytes: superblock.encoded(), at: 0)
        case .truncatedPageArea, .truncatedSuperblock:
            let layout = try writeStateImage(path: scratch, metadata: state.encoded(), source: source)
            let byteCount = self == .truncatedPageArea ? layout.fileByteCount - ImageLayout.pageSize : 100
            let good = try SharedMapping.open(path: scratch, writable: false)
            try SharedMapping.create(path: path, byteCount: byteCount, prefault: false).store(bytes: good.loadBytes(at: 0, count: byteCount), at: 0)
        case .hugeMetadataByteCount:
            try writeStateImage(path: path, metadata: state.encoded(), source: source)
            try patchSuperblock(path: path, [(ImageLayout.metadataByteCountOffset, Self.claimedMetadataByteCount)])
        case .hugeStringLength:
            // The executable path's u32 length, after the encoding version and the pid.
            var metadata = state.encoded()
            metadata.replaceSubrange(8..<12, with: [0xF0, 0xFF, 0xFF, 0xFF])
            try writeStateImage(path: path, metadata: metadata, source: source)
        }
    }

    /// Whether `error` is this image's specific refusal.
    func isExpected(_ error: ImageError?, path: String) -> Bool {
        switch (self, error) {
        case (.mappingAboveUserSpace, .malformedMetadata(let reason)), (.mappingInKernelSpace, .malformedMetadata(let reason)):
            reason.contains("lies outside user space")
        case (.misplacedVsyscall, .malformedMetadata(let reason)): reason.contains("[vsyscall] but not where the kernel puts it")
        case (.overlappingMappings, .malformedMetadata(let reason)): reason.contains("overlap")
        case (.duplicatePage, .badPageAddress(path, 2, _, let reason)): reason.contains("is not above entry 1")
        case (.decreasingPages, .badPageAddress(path, 3, _, let reason)): reason.contains("is not above entry 2")
        case (.pageOutsideMappings, .badPageAddress(path, 0, _, let reason)): reason == "lies in no mapping of the process"
        case (.pageCountBeyondPageArea, .badRegion(path, .pageArea, let reason)): reason.contains("too few for the \(Self.claimedPageCount) pages")
        case (.pageCountBeyondFile, .truncated(path, _, let requiredByteCount)): requiredByteCount > Int(Self.claimedPageCount) * 4096
        case (.truncatedPageArea, .truncated(path, _, _)): true
        case (.truncatedSuperblock, .truncated(path, 100, ImageLayout.pageSize)): true
        case (.hugeMetadataByteCount, .badRegion(path, .metadata, let reason)): reason.contains("too few for the \(Self.claimedMetadataByteCount) bytes")
        case (.hugeStringLength, .malformedMetadata(let reason)): reason.contains("claims 4294967280 elements, the limit is 4096")
        default: false
        }
    }

    /// What `fammig` must print about it.
    var messageFragments: [String] {
        switch self {
        case .mappingAboveUserSpace, .mappingInKernelSpace: ["process metadata is malformed", "lies outside user space"]
        case .misplacedVsyscall: ["process metadata is malformed", "[vsyscall]"]
        case .overlappingMappings: ["process metadata is malformed", "overlap"]
        case .duplicatePage, .decreasingPages: ["page table entry", "is not above entry", "corrupted"]
        case .pageOutsideMappings: ["page table entry 0", "lies in no mapping of the process"]
        case .pageCountBeyondPageArea: ["page area region", "too few for the \(Self.claimedPageCount) pages"]
        case .pageCountBeyondFile, .truncatedPageArea, .truncatedSuperblock: ["image is truncated"]
        case .hugeMetadataByteCount: ["metadata region", "too few"]
        case .hugeStringLength: ["process metadata is malformed", "the limit is 4096"]
        }
    }

    /// `fammig inspect` does not check the state against the page table (only the restorer does).
    var inspectRejects: Bool { self != .pageOutsideMappings }
}

/// One hostile detail in an otherwise plausible state, refused by decoding or by `validate`.
enum HostileState: CaseIterable, Sendable {
    case negativeParentDeathSignal, negativePendingSignal, signalActionForKill, unchangedUserID, effectiveNotPermitted
    case seccompStrictMode, seccompModeWithoutFilter, seccompListenerFlag, seccompTooManyInstructions
    case mainThreadNotTheProcess, duplicateThreadID, negativeThreadID, rseqPastUserSpace
    case descriptorBeyondLimit, duplicateDescriptor, relativeFilePath, pathWithNUL, temporaryFile
    case softLimitAboveHard, sharedAnonymousMapping, brkAboveUserSpace

    func apply(to state: inout ProcessState) {
        let secondThreadID = ProcessID(state.processID.rawValue + 1)
        switch self {
        case .negativeParentDeathSignal: state.parentDeathSignal = -1
        case .negativePendingSignal: state.sharedPendingSignals[0].siginfo.replaceSubrange(0..<4, with: [0xFB, 0xFF, 0xFF, 0xFF])
        case .signalActionForKill: state.signalActions[0].signal = 9
        case .unchangedUserID: state.credentials.userIDs[1] = UInt32.max
        case .effectiveNotPermitted: state.credentials.effective = 1 << 21  // CAP_SYS_ADMIN, never permitted
        case .seccompStrictMode: (state.seccompMode, state.seccompFilters) = (1, [])
        case .seccompModeWithoutFilter: state.seccompFilters = []
        case .seccompListenerFlag: state.seccompFilters[0].flags = 0x8  // SECCOMP_FILTER_FLAG_NEW_LISTENER
        case .seccompTooManyInstructions:
            state.seccompFilters = Array(repeating: SeccompFilter(program: Array(repeating: 6, count: 4096 * 8), flags: 0), count: 8)
        case .mainThreadNotTheProcess: state.threads[0].threadID = secondThreadID
        case .duplicateThreadID: state.threads.append(state.threads[0])
        case .negativeThreadID:
            state.threads.append(state.threads[0])
            state.threads[1].threadID = ProcessID(-3)
        case .rseqPastUserSpace: state.threads[0].rseq?.address = UInt64.max - 16
        case .descriptorBeyondLimit: state.files[1].descriptor = 1 << 24
        case .duplicateDescriptor: state.files[1].descriptor = 0
        case .relativeFilePath: state.files[1].path = "tmp/victim.out"
        case .pathWithNUL: state.executablePath = "/usr/bin/true\0/../../evil"
        case .temporaryFile: state.files[1].flags = 0o20_000_000 | 0o2  // O_TMPFILE's own bit, O_RDWR
        case .softLimitAboveHard: state.resourceLimits[7].hard = 16
        case .sharedAnonymousMapping: state.mappings[1].shared = true
        case .brkAboveUserSpace: state.memoryDescriptor.brk = 0xffff_8000_0000_0000
        }
    }

    /// A part of the refusal's reason.
    var reasonFragment: String {
        switch self {
        case .negativeParentDeathSignal: "parent-death signal -1"
        case .negativePendingSignal: "pending signal -5"
        case .signalActionForKill: "signal 9, which cannot have one"
        case .unchangedUserID: "keep the restorer's"
        case .effectiveNotPermitted: "are not all permitted"
        case .seccompStrictMode: "strict mode cannot be restored"
        case .seccompModeWithoutFilter: "filter mode without any filter"
        case .seccompListenerFlag: "has flags 0x8"
        case .seccompTooManyInstructions: "the kernel allows 32768"
        case .mainThreadNotTheProcess: "not the main thread"
        case .duplicateThreadID, .negativeThreadID: "is not positive or appears twice"
        case .rseqPastUserSpace: "rseq area"
        case .descriptorBeyondLimit: "fd 16777216 is outside"
        case .duplicateDescriptor: "fd 0 is outside 0..<1048576 or appears twice"
        case .relativeFilePath: "is not an absolute path"
        case .pathWithNUL: "holds a NUL byte"
        case .temporaryFile: "cannot be reopened"
        case .softLimitAboveHard: "resource limit 7 has soft 1024 above hard 16"
        case .sharedAnonymousMapping: "shared anonymous memory"
        case .brkAboveUserSpace: "brk 0xffff800000000000 lies above user space"
        }
    }
}

/// Decodes `state`'s encoding and validates it, as a restorer would: the refusal, or nil.
func stateRejection(_ state: ProcessState, pageAddresses: [UInt64] = []) -> ImageError? {
    do throws(ImageError) {
        try ProcessState.decode(state.encoded()).validate(pageAddresses: pageAddresses, path: "/dev/shm/test-image")
        return nil
    } catch {
        return error
    }
}

/// A seeded generator for fuzzing (splitmix64): the same cases every run.
struct FuzzRandom {
    var state: UInt64
    mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var mixed = state
        mixed = (mixed ^ (mixed >> 30)) &* 0xBF58_476D_1CE4_E5B9
        mixed = (mixed ^ (mixed >> 27)) &* 0x94D0_49BB_1331_11EB
        return mixed ^ (mixed >> 31)
    }
    mutating func below(_ bound: Int) -> Int { bound <= 0 ? 0 : Int(next() % UInt64(bound)) }

    /// `bytes` with one mutation: a flipped byte, a cut, garbage appended, a length-like word, or noise.
    mutating func mutated(_ bytes: [UInt8]) -> [UInt8] {
        var result = bytes
        switch below(5) {
        case 0: if !result.isEmpty { result[below(result.count)] ^= UInt8(truncatingIfNeeded: next() | 1) }
        case 1: result.removeLast(below(result.count + 1))
        case 2: result.append(contentsOf: (0..<below(16)).map { _ in UInt8(truncatingIfNeeded: next()) })
        case 3:
            // Counts and lengths are u32 words: the values that break naive decoders.
            let words: [UInt32] = [0, 1, 2, 3, 15, 16, 27, 64, 128, 4096, 65536, 0x7FFF_FFFF, 0x8000_0000, 0xFFFF_FFF0, 0xFFFF_FFFF]
            if result.count >= 4 {
                let offset = below(result.count - 3)
                let word = words[below(words.count)]
                for index in 0..<4 { result[offset + index] = UInt8(truncatingIfNeeded: word >> (8 * UInt32(index))) }
            }
        default: result = (0..<below(256)).map { _ in UInt8(truncatingIfNeeded: next()) }
        }
        return result
    }
}

@Suite struct UntrustedInputTests {
    static let testProcessID = ProcessID(4242)
    static let testDataRange: Range<UInt64> = 0x7f00_0000_0000..<0x7f00_0000_8000
    static var testPageAddresses: [UInt64] { [0x7f00_0000_0000, 0x7f00_0000_1000, 0x7f00_0000_5000] }

    // MARK: Hostile images

    @Test func plausibleImageIsAccepted() throws {
        let files = ScratchFiles()
        defer { files.removeAll() }
        let source = try SourceMemory(path: files.path("source"))
        let imagePath = files.path("image")
        try writeStateImage(path: imagePath, metadata: plausibleState(processID: Self.testProcessID, dataRange: dataRange(of: source)).encoded(),
                            source: source)
        #expect(restorerRejection(imagePath) == nil)
    }

    @Test(arguments: HostileImage.allCases) func hostileImageIsRefusedWithItsReason(_ image: HostileImage) throws {
        let files = ScratchFiles()
        defer { files.removeAll() }
        let source = try SourceMemory(path: files.path("source"))
        let imagePath = files.path("image")
        try image.write(to: imagePath, scratch: files.path("good"),
                        state: plausibleState(processID: Self.testProcessID, dataRange: dataRange(of: source)), source: source)
        let error = restorerRejection(imagePath)
        #expect(image.isExpected(error, path: imagePath), "\(image): \(String(describing: error))")
        for fragment in image.messageFragments {
            #expect(error?.description.contains(fragment) == true, "\(image): \(String(describing: error))")
        }
    }

    // MARK: Hostile process states

    @Test func plausibleStateValidates() throws {
        let state = plausibleState(processID: Self.testProcessID, dataRange: Self.testDataRange)
        #expect(stateRejection(state, pageAddresses: Self.testPageAddresses) == nil)
        #expect(try ProcessState.decode(state.encoded()) == state)
    }

    @Test(arguments: HostileState.allCases) func hostileStateIsRefusedWithItsReason(_ hostile: HostileState) {
        var state = plausibleState(processID: Self.testProcessID, dataRange: Self.testDataRange)
        hostile.apply(to: &state)
        let error = stateRejection(state, pageAddresses: Self.testPageAddresses)
        switch error {
        case .malformedMetadata(let reason), .unrestorableState(_, let reason):
            #expect(reason.contains(hostile.reasonFragment), "\(hostile): \(reason)")
        default:
            Issue.record("\(hostile) was not refused as malformed or unrestorable: \(String(describing: error))")
        }
    }

    /// The socket path has no image reader: the page table arrives in the metadata message.
    @Test func peerPageTableIsCheckedByDecoderAndValidation() {
        var payload = BinaryWriter()
        payload.writeUInt8(2)  // metadata
        payload.writeBytes([UInt8]())
        payload.writeArray([0x7f00_0000_1000, 0x7f00_0000_1000] as [UInt64]) { $0.writeUInt64($1) }
        var frame = BinaryWriter()
        frame.writeUInt32(UInt32(payload.bytes.count))
        frame.writeRawBytes(payload.bytes)
        do throws(TransportError) {
            _ = try Message.decode(frame.bytes)
            Issue.record("a repeated page table entry was accepted")
        } catch {
            #expect("\(error)".contains("not above entry 0"), "\(error)")
        }

        let state = plausibleState(processID: Self.testProcessID, dataRange: Self.testDataRange)
        let outside: [UInt64] = [0x7f00_0000_0000, 0x7f00_0000_8000]
        #expect(stateRejection(state, pageAddresses: outside)
                == .badPageAddress(path: "/dev/shm/test-image", slot: 1, address: 0x7f00_0000_8000, reason: "lies in no mapping of the process"))
        guard case .badPageAddress(_, 1, _, let reason) = stateRejection(state, pageAddresses: [0x7f00_0000_1000, 0x7f00_0000_1000]) else {
            Issue.record("a repeated page address was accepted by validate")
            return
        }
        #expect(reason.contains("is not above entry 0"))
        guard case .badPageAddress(_, 0, _, let vdsoReason) = stateRejection(state, pageAddresses: [AddressSpace.vsyscallRange.lowerBound]) else {
            Issue.record("a page in [vsyscall] was accepted")
            return
        }
        #expect(vdsoReason.contains("vDSO"))
    }

    // MARK: Fuzzing: decoding throws or gives a state that encodes back to the same; it never traps

    @Test func mutatedProcessStatesNeverTrap() throws {
        var state = plausibleState(processID: Self.testProcessID, dataRange: Self.testDataRange)
        var second = state.threads[0]
        second.threadID = ProcessID(Self.testProcessID.rawValue + 1)
        second.rseq = nil
        state.threads.append(second)
        state.mappings.insert(Mapping(start: 0x40_2000, end: 0x40_3000, readable: true, writable: false, executable: false,
                                      shared: false, fileOffset: 0, kind: .vdsoPart(name: "[vdso]")), at: 1)
        let encoded = state.encoded()
        try #require(stateRejection(state, pageAddresses: Self.testPageAddresses) == nil)
        var random = FuzzRandom(state: 0x5EED_57A7_E000_0001)
        var decodedCount = 0, validCount = 0
        for _ in 0..<4000 {
            let mutated = random.mutated(encoded)
            guard let decoded = try? ProcessState.decode(mutated) else { continue }
            decodedCount += 1
            #expect(try ProcessState.decode(decoded.encoded()) == decoded, "a decoded state does not encode back to itself")
            if (try? decoded.validate(pageAddresses: Self.testPageAddresses, path: "fuzz")) != nil { validCount += 1 }
        }
        // Flipped register or digest-free bytes stay valid; most mutations do not.
        #expect(decodedCount > 0 && decodedCount < 4000)
        #expect(validCount <= decodedCount)
    }

    @Test func mutatedMessagesNeverTrap() throws {
        let state = plausibleState(processID: Self.testProcessID, dataRange: Self.testDataRange).encoded()
        let messages: [Message] = [
            .metadata(state: state, pageAddresses: Self.testPageAddresses), .hello(mode: 2, generation: 9, nonce: [UInt8](repeating: 7, count: 32), proof: []),
            .pages(address: 0x7f00_0000_0000, bytes: Array(repeating: 0xA5, count: 8192)), .pageRequest(address: 0x7f00_0000_1000),
            .marked(slots: [0, 2, 7]), .abort(reason: "the source gave up"), .complete(generation: 9),
        ]
        let frames = messages.map { $0.encoded() }
        var random = FuzzRandom(state: 0x5EED_3E55_A6E0_0002)
        var decodedCount = 0
        for _ in 0..<4000 {
            let frame = random.mutated(frames[random.below(frames.count)])
            guard let message = try? Message.decode(frame) else { continue }
            decodedCount += 1
            switch message {
            case .metadata(let stateBytes, let pageAddresses):
                #expect(zip(pageAddresses, pageAddresses.dropFirst()).allSatisfy { $0 < $1 } && pageAddresses.allSatisfy { $0 % 4096 == 0 })
                // What the restorer does with it next: decode and validate, either may refuse.
                _ = try? ProcessState.decode(stateBytes).validate(pageAddresses: pageAddresses, path: "the source's socket")
            case .pages(let address, let bytes):
                #expect(!bytes.isEmpty && bytes.count % 4096 == 0 && bytes.count <= Message.maximumPagesByteCount)
                #expect(address <= UInt64.max - UInt64(bytes.count) + 1)
            case .pageRequest(let address):
                #expect(address % 4096 == 0)
            default:
                break
            }
        }
        #expect(decodedCount > 0 && decodedCount < 4000)
    }

    // MARK: Only as open as it must be

    @Test func famFilesAreCreatedOwnerOnlyWhateverTheUmask() throws {
        let files = ScratchFiles()
        defer { files.removeAll() }
        // The umask can only take bits away: with none, the mode is exactly what create asks for.
        let previousMask = umask(0)
        defer { umask(previousMask) }
        let mappingPath = files.path("mapping")
        let backendPath = files.path("backend")
        _ = try SharedMapping.create(path: mappingPath, byteCount: 4096, prefault: false)
        _ = try RealFAM.create(path: backendPath, byteCount: 8192, prefault: false)
        for path in [mappingPath, backendPath] {
            var status = stat()
            try #require(stat(path, &status) == 0)
            #expect(status.st_mode & S_IFMT == S_IFREG)
            #expect(status.st_mode & 0o7777 == 0o600, "\(path) has mode 0o\(String(status.st_mode & 0o7777, radix: 8))")
            #expect(status.st_uid == getuid())
        }
    }

    /// The FAM path is input too: a FIFO must not block the open, a directory is no image.
    @Test func famPathThatIsNotARegularFileIsRefusedAtOnce() throws {
        let files = ScratchFiles()
        defer { files.removeAll() }
        let fifoPath = files.path("fifo")
        try #require(mkfifo(fifoPath, 0o600) == 0)
        for path in [fifoPath, "/dev/shm"] {
            guard case .cannotOpen(path, let error) = openError(path) else {
                Issue.record("\(path) was not refused with cannotOpen: \(String(describing: openError(path)))")
                continue
            }
            #expect(error.errno == .invalidArgument && error.call.contains("not a regular file"), "\(error)")
        }
    }

    @Test func listenerBindsOnlyTheGivenAddress() throws {
        let listener = try TCPTransport.listen(on: Endpoint(host: "127.0.0.1", port: 0))
        defer { listener.close() }
        #expect(listener.socket.localHost == "127.0.0.1")
        #expect(listener.endpoint.host == "127.0.0.1" && listener.endpoint.port != 0)
        // Another address of this very machine (all of 127/8 is loopback) must not reach it.
        let elsewhere = Endpoint(host: "127.0.0.2", port: listener.endpoint.port)
        do throws(TransportError) {
            let transport = try TCPTransport.connect(to: elsewhere, timeoutMilliseconds: 100)
            transport.close()
            Issue.record("a listener on 127.0.0.1 accepted a connection to 127.0.0.2")
        } catch {
            guard case .cannotConnect(_, let syscallError) = error else { Issue.record("\(error)"); return }
            #expect(syscallError.errno == .connectionRefused)
        }
        let client = try TCPTransport.connect(to: listener.endpoint, timeoutMilliseconds: 5_000)
        defer { client.close() }
        let server = try #require(try TCPTransport.accept(on: listener, timeoutMilliseconds: 5_000))
        server.close()
    }
}

extension ProcessTests {
    /// `fammig restore` and `fammig inspect` of a hostile image: exit 2, a message that says what is wrong,
    /// and no process created.
    @Suite(.serialized) struct UntrustedInputCLITests {
        /// A PID no process has now: the hostile image claims it, so a restore that went ahead would show.
        static func freeProcessID() throws -> ProcessID {
            let candidate = (20_000..<32_000).reversed().first { processLife(ProcessID(Int32($0))) == .gone }
            return ProcessID(Int32(try #require(candidate)))
        }

        @Test(arguments: HostileImage.allCases) func fammigRefusesHostileImage(_ image: HostileImage) throws {
            let files = ScratchFiles()
            defer { files.removeAll() }
            let leftovers = LeftoverCheck()
            defer { leftovers.finish() }
            let source = try SourceMemory(path: files.path("source"))
            let imagePath = files.path("image")
            let claimedProcessID = try Self.freeProcessID()
            try image.write(to: imagePath, scratch: files.path("good"),
                            state: plausibleState(processID: claimedProcessID, dataRange: dataRange(of: source)), source: source)

            let keyPath = files.path("key")
            try writeKeyFile(testKey, to: keyPath)
            for command in image.inspectRejects ? ["restore", "inspect"] : ["restore"] {
                let outcome = try leftovers.fammig(command, "--fam", imagePath, "--key-file", keyPath)
                #expect(outcome.exitStatus == 2 && !outcome.killedBySignal, "\(command) of \(image): exit \(outcome.exitStatus): \(outcome.standardError)")
                for fragment in image.messageFragments {
                    #expect(outcome.standardError.contains(fragment), "\(command) of \(image): \(outcome.standardError)")
                }
                #expect(!outcome.standardOutput.contains("restored pid"), "\(command) of \(image): \(outcome.standardOutput)")
            }
            let life = processLife(claimedProcessID)
            #expect(life == .gone, "a refused restore of \(image) left pid \(claimedProcessID): \(life)")
            if life == .running, let executable = try? ProcFS.readLink("/proc/\(claimedProcessID)/exe"), executable.hasSuffix("/true") {
                Spawn.kill(claimedProcessID)
            }
        }

        @Test func fammigRefusesAFIFOInsteadOfBlocking() throws {
            let files = ScratchFiles()
            defer { files.removeAll() }
            let leftovers = LeftoverCheck()
            defer { leftovers.finish() }
            let fifoPath = files.path("fifo")
            try #require(mkfifo(fifoPath, 0o600) == 0)
            let keyPath = files.path("key")
            try writeKeyFile(testKey, to: keyPath)
            for command in ["restore", "inspect"] {
                let outcome = try leftovers.fammig([command, "--fam", fifoPath, "--key-file", keyPath], timeout: .seconds(20))
                #expect(outcome.exitStatus == 2 && !outcome.killedBySignal, "\(command): exit \(outcome.exitStatus): \(outcome.standardError)")
                #expect(outcome.standardError.contains("not a regular file"), "\(command): \(outcome.standardError)")
            }
        }
    }
}
