// The image is untrusted input (another node wrote it, or someone who only wants it to look that way).
// Decoding checks that every length and count fits; this file checks what the decoded state says, before
// the restorer creates any process: addresses stay inside user space and agree with the page table, and
// every number the restorer hands to a syscall is one a real process could have had. A hostile image
// then gets a clear refusal, never a trap in the restorer (`UInt64(negative)`, an overflowing sum), and
// never a process that quietly holds more than the victim did (a dropped seccomp sandbox, a uid that
// setresuid reads as "leave unchanged" and so stays the restorer's).
import Sys

extension ImageReader {
    /// The image's state word, read without verifying anything else (to wait for a commit); nil when
    /// the backend is too small to hold a superblock or the word is not a valid state.
    public static func peekState(backend: any FAMBackend) -> ImageState? {
        guard backend.byteCount >= ImageLayout.pageSize,
              backend.loadBytes(at: 0, count: ImageLayout.magic.count) == ImageLayout.magic else { return nil }
        return ImageLayout.state(fromWord: backend.loadUInt64(at: ImageLayout.stateWordOffset))
    }
}

extension ProcessState {
    /// Everything the restorer relies on that decoding alone does not check; throws the first problem.
    /// Every dumped page must lie in a mapping that the restorer creates and may write.
    public func validate(pageAddresses: [UInt64], path: String) throws(ImageError) {
        if !members.isEmpty { try validateTree(pageAddresses: pageAddresses, path: path) }
        // A tree's pipes are checked across its processes (the root's call sees them all, TreePipes);
        // a process of no tree may hold none.
        if !members.isEmpty || !lineage.isRecorded, let problem = TreePipes.validate(self) {
            throw .unrestorableState(path: path, reason: problem)
        }
        try validateMappings(path: path)
        try validatePages(members.isEmpty ? pageAddresses : pageAddresses.filter { TreePageAddress.ordinal(of: $0) == 0 }, path: path)
        try validateThreads(path: path)
        try validateSignals(path: path)
        try validateCredentials(path: path)
        try validateLimitsAndSeccomp(path: path)
        try validateFiles(path: path)
        try validateMemoryDescriptor(path: path)
        try validateContext(path: path)
    }

    /// What the context restorer hands to chdir, umask, oom_score_adj, prctl and sigaltstack: values a
    /// process can have and the restorer can set (anything else would fail half-way through a restore).
    private func validateContext(path: String) throws(ImageError) {
        try Self.checkPath(context.workingDirectory, "the working directory", path: path)
        guard context.workingDirectory.utf8.count <= ProcessContext.workingDirectoryByteCountMax else {
            throw .unrestorableState(path: path, reason: "the working directory is \(context.workingDirectory.utf8.count) bytes long (PATH_MAX is \(KernelLimits.pathByteCountMax))")
        }
        guard context.rootDirectory.hasPrefix("/"), !context.rootDirectory.utf8.contains(0) else {
            throw .unrestorableState(path: path, reason: "the root directory \"\(context.rootDirectory.prefix(256))\" is not an absolute path")
        }
        guard context.fileCreationMask <= ProcessContext.fileCreationMaskMax else {
            throw .unrestorableState(path: path, reason: "umask 0o\(String(context.fileCreationMask, radix: 8)) has bits beyond 0o777")
        }
        guard ProcessContext.oomScoreAdjustments.contains(context.oomScoreAdjustment) else {
            throw .unrestorableState(path: path, reason: "oom_score_adj \(context.oomScoreAdjustment) is outside -1000...1000")
        }
        guard ProcessContext.dumpableValues.contains(context.dumpable) else {
            throw .unrestorableState(path: path, reason: "dumpable \(context.dumpable) is not 0 or 1")
        }
        guard ProcessContext.transparentHugePageValues.contains(context.transparentHugePagesDisabled) else {
            throw .unrestorableState(path: path, reason: "THP-disable \(context.transparentHugePagesDisabled) is not 0, 1 or 3")
        }
        let registrations = ProcessContext.membarrierRegistrationCommands.reduce(0, |)
        guard context.membarrierRegistrations & ~registrations == 0 else {
            throw .unrestorableState(path: path, reason: "membarrier registrations \(hex(UInt64(context.membarrierRegistrations))) are not MEMBARRIER_CMD_REGISTER_* commands")
        }
        // One of each, in order: the restorer sets all three, disarming what was not armed.
        guard context.intervalTimers.map(\.kind) == IntervalTimer.Kind.allCases else {
            throw .unrestorableState(path: path, reason: "the interval timers are \(context.intervalTimers.map { "\($0.kind)" }), not real, virtual, profiling")
        }
        for timer in context.intervalTimers where timer.intervalMicroseconds > IntervalTimer.microsecondsMax || timer.valueMicroseconds > IntervalTimer.microsecondsMax {
            throw .unrestorableState(path: path, reason: "interval timer \(timer) is beyond setitimer's range")
        }
        // POSIX timers: what timer_create and timer_settime take, each ID once, in order; a thread one
        // names a thread of the process.
        for (previous, next) in zip(context.posixTimers, context.posixTimers.dropFirst()) where previous.id >= next.id {
            throw .unrestorableState(path: path, reason: "POSIX timers \(previous.id) and \(next.id) are out of order or repeated")
        }
        let threadIDs = Set(threads.map(\.threadID))
        for timer in context.posixTimers {
            let what = "POSIX timer \(timer.id)"
            guard timer.id >= 0, PosixTimer.clocks.contains(timer.clock) else {
                throw .unrestorableState(path: path, reason: "\(what) has clock \(timer.clock), not one of \(PosixTimer.clocks.sorted())")
            }
            guard timer.notification == .none || KernelLimits.signalNumbers.contains(timer.signal) else {
                throw .unrestorableState(path: path, reason: "\(what) signals \(timer.signal)")
            }
            if case .thread(let thread) = timer.notification, !threadIDs.contains(thread) {
                throw .unrestorableState(path: path, reason: "\(what) signals thread \(thread), which the process does not have")
            }
            guard timer.valueNanoseconds <= PosixTimer.nanosecondsMax, timer.intervalNanoseconds <= PosixTimer.nanosecondsMax else {
                throw .unrestorableState(path: path, reason: "\(what) is set beyond timer_settime's range")
            }
        }
        for thread in threads {
            let stack = thread.signalStack
            let what = "thread \(thread.threadID)'s sigaltstack (\(stack.byteCount) bytes at \(hex(stack.address)), flags \(hex(UInt64(stack.flags))))"
            if stack.isDisabled {
                guard stack == .disabled else { throw .unrestorableState(path: path, reason: "\(what) is disabled but not empty") }
                continue
            }
            guard stack.flags & ~SignalStack.autoDisarmFlag == 0 else {
                throw .unrestorableState(path: path, reason: "\(what) has flags sigaltstack does not take")
            }
            guard stack.byteCount >= KernelLimits.signalStackByteCountMin, stack.byteCount <= AddressSpace.userSpaceEnd,
                  stack.address >= AddressSpace.lowestAddress, stack.address <= AddressSpace.userSpaceEnd - stack.byteCount else {
                throw .unrestorableState(path: path, reason: "\(what) is not inside user space or is smaller than MINSIGSTKSZ")
            }
        }
    }

    private func validateMappings(path: String) throws(ImageError) {
        try Self.checkPath(executablePath, "the executable path", path: path)
        var sharedObjects: [Int32: SharedMemory] = [:]
        for (index, mapping) in mappings.enumerated() {
            let range = "mapping \(index) (\(hex(mapping.start))-\(hex(mapping.end)))"
            if let problem = mapping.addressProblem { throw .unrestorableState(path: path, reason: "\(range) \(problem)") }
            if index > 0, mappings[index - 1].end > mapping.start {
                throw .unrestorableState(path: path, reason: "\(range) overlaps or comes before mapping \(index - 1) (\(hex(mappings[index - 1].start))-\(hex(mappings[index - 1].end)))")
            }
            switch mapping.kind {
            case .file(let filePath):
                try Self.checkPath(filePath, range + "'s file", path: path)
            case .anonymous, .heap, .stack:
                // The restorer maps these private: shared anonymous memory is refused at checkpoint.
                guard !mapping.shared else {
                    throw .unrestorableState(path: path, reason: "\(range) is shared anonymous memory, which cannot be restored")
                }
            case .sharedMemory(let memory):
                guard mapping.shared else { throw .unrestorableState(path: path, reason: "\(range) is shared memory mapped private") }
                guard memory.memfdName?.utf8.contains(0) != true else { throw .unrestorableState(path: path, reason: "\(range)'s memfd name holds a NUL byte") }
                if let first = sharedObjects[memory.object], first != memory {
                    throw .unrestorableState(path: path, reason: "\(range) describes shared memory object \(memory.object) unlike its other mappings")
                }
                sharedObjects[memory.object] = memory
                if let segment = memory.sysv {
                    // shmat attaches a whole segment, and only one that goes with the process is recreated.
                    guard mapping.fileOffset == 0, mapping.byteCount == memory.byteCount, segment.markedForRemoval else {
                        throw .unrestorableState(path: path, reason: "\(range) is not a whole attach of a SysV segment marked for removal")
                    }
                    if sharedObjects.values.contains(where: { $0.object != memory.object && $0.sysv?.identifier == segment.identifier }) {
                        throw .unrestorableState(path: path, reason: "\(range): two shared memory objects are SysV segment \(segment.identifier)")
                    }
                }
            case .vdsoPart, .vsyscall:
                break
            }
        }
    }

    private func validatePages(_ pageAddresses: [UInt64], path: String) throws(ImageError) {
        var mappingIndex = 0
        for (slot, address) in pageAddresses.enumerated() {
            guard address % .pageSize == 0 else {
                throw .badPageAddress(path: path, slot: slot, address: address, reason: "is not page-aligned")
            }
            if slot > 0, pageAddresses[slot - 1] >= address {
                throw .badPageAddress(path: path, slot: slot, address: address,
                                      reason: "is not above entry \(slot - 1) (\(hex(pageAddresses[slot - 1])))")
            }
            // Both lists are sorted (checked above), so one forward walk pairs each page with its mapping.
            while mappingIndex < mappings.count && mappings[mappingIndex].end <= address { mappingIndex += 1 }
            guard mappingIndex < mappings.count, mappings[mappingIndex].contains(address) else {
                throw .badPageAddress(path: path, slot: slot, address: address, reason: "lies in no mapping of the process")
            }
            let mapping = mappings[mappingIndex]
            switch mapping.kind {
            case .vdsoPart, .vsyscall:
                throw .badPageAddress(path: path, slot: slot, address: address, reason: "lies in the vDSO, which is never dumped")
            case .sharedMemory:
                break
            default:
                guard !mapping.shared else {
                    throw .badPageAddress(path: path, slot: slot, address: address, reason: "lies in a shared mapping, which is never dumped")
                }
            }
        }
    }

    private func validateThreads(path: String) throws(ImageError) {
        guard processID.rawValue >= 1 else { throw .unrestorableState(path: path, reason: "process ID \(processID) is not a process ID") }
        guard !threads.isEmpty, threads.count <= Self.maximumThreadCount else {
            throw .unrestorableState(path: path, reason: "\(threads.count) threads (1...\(Self.maximumThreadCount) can be restored)")
        }
        guard threads[0].threadID == processID else {
            throw .unrestorableState(path: path, reason: "the first thread is \(threads[0].threadID), not the main thread \(processID)")
        }
        var seenThreadIDs: Set<Int32> = []
        for thread in threads {
            guard thread.threadID.rawValue >= 1, seenThreadIDs.insert(thread.threadID.rawValue).inserted else {
                throw .unrestorableState(path: path, reason: "thread ID \(thread.threadID) is not positive or appears twice")
            }
            if let rseq = thread.rseq {
                // The restorer adds byteCount to address (the rseq area's pages go in before the resume).
                guard rseq.byteCount >= 1, rseq.byteCount <= KernelLimits.rseqByteCountMax,
                      rseq.address >= AddressSpace.lowestAddress, rseq.address <= AddressSpace.userSpaceEnd - UInt64(rseq.byteCount) else {
                    throw .unrestorableState(path: path, reason: "thread \(thread.threadID)'s rseq area (\(rseq.byteCount) bytes at \(hex(rseq.address))) is not inside user space")
                }
            }
            for pending in thread.pendingSignals where !KernelLimits.signalNumbers.contains(pending.signal) {
                throw .unrestorableState(path: path, reason: "thread \(thread.threadID) has pending signal \(pending.signal)")
            }
        }
    }

    private func validateSignals(path: String) throws(ImageError) {
        var seenSignals: Set<Int32> = []
        for action in signalActions {
            guard KernelLimits.signalNumbers.contains(action.signal), action.signal != KernelLimits.killSignal,
                  action.signal != KernelLimits.stopSignal else {
                throw .unrestorableState(path: path, reason: "there is an action for signal \(action.signal), which cannot have one")
            }
            guard seenSignals.insert(action.signal).inserted else {
                throw .unrestorableState(path: path, reason: "signal \(action.signal) has two actions")
            }
        }
        for pending in sharedPendingSignals where !KernelLimits.signalNumbers.contains(pending.signal) {
            throw .unrestorableState(path: path, reason: "pending signal \(pending.signal) is not a signal")
        }
        guard parentDeathSignal == 0 || KernelLimits.signalNumbers.contains(parentDeathSignal) else {
            throw .unrestorableState(path: path, reason: "parent-death signal \(parentDeathSignal) is not a signal")
        }
    }

    private func validateCredentials(path: String) throws(ImageError) {
        let credentials = self.credentials
        guard credentials.userIDs.count == 4, credentials.groupIDs.count == 4 else {
            throw .unrestorableState(path: path, reason: "credentials need 4 user and 4 group IDs (real, effective, saved, filesystem)")
        }
        guard credentials.supplementaryGroups.count <= KernelLimits.supplementaryGroupCountMax else {
            throw .unrestorableState(path: path, reason: "\(credentials.supplementaryGroups.count) supplementary groups (at most \(KernelLimits.supplementaryGroupCountMax))")
        }
        for id in credentials.userIDs + credentials.groupIDs + credentials.supplementaryGroups where id == KernelLimits.unchangedID {
            throw .unrestorableState(path: path, reason: "a user or group ID is \(id), which setresuid reads as \"keep the restorer's\"")
        }
        guard credentials.effective & ~credentials.permitted == 0 else {
            throw .unrestorableState(path: path, reason: "effective capabilities \(hex(credentials.effective)) are not all permitted (\(hex(credentials.permitted)))")
        }
        guard credentials.ambient & ~(credentials.permitted & credentials.inheritable) == 0 else {
            throw .unrestorableState(path: path, reason: "ambient capabilities \(hex(credentials.ambient)) are not all permitted and inheritable")
        }
    }

    private func validateLimitsAndSeccomp(path: String) throws(ImageError) {
        var seenResources: Set<Int32> = []
        for limit in resourceLimits {
            guard (0..<KernelLimits.resourceCount).contains(limit.resource), seenResources.insert(limit.resource).inserted else {
                throw .unrestorableState(path: path, reason: "resource limit \(limit.resource) is unknown or appears twice")
            }
            guard limit.soft <= limit.hard else {
                throw .unrestorableState(path: path, reason: "resource limit \(limit.resource) has soft \(limit.soft) above hard \(limit.hard)")
            }
        }
        // The restorer installs filters only: a process in strict mode, or in filter mode without its
        // filters, would come back without its sandbox.
        switch (seccompMode, seccompFilters.isEmpty) {
        case (0, true), (2, false): break
        case (1, _):
            throw .unrestorableState(path: path, reason: "seccomp strict mode cannot be restored, and the process must not run without it")
        case (2, true):
            throw .unrestorableState(path: path, reason: "seccomp filter mode without any filter; the process must not run without its sandbox")
        default:
            throw .unrestorableState(path: path, reason: "seccomp mode \(seccompMode) with \(seccompFilters.count) filters")
        }
        var pathInstructionCount = 0
        for (index, filter) in seccompFilters.enumerated() {
            let instructionCount = filter.program.count / 8
            guard filter.program.count % 8 == 0, (1...KernelLimits.seccompFilterInstructionCountMax).contains(instructionCount) else {
                throw .unrestorableState(path: path, reason: "seccomp filter \(index) has \(filter.program.count) bytes, not 1...\(KernelLimits.seccompFilterInstructionCountMax) instructions of 8")
            }
            guard filter.flags & ~KernelLimits.seccompFilterFlagsRestorable == 0 else {
                throw .unrestorableState(path: path, reason: "seccomp filter \(index) has flags \(hex(filter.flags)), not only LOG and SPEC_ALLOW")
            }
            pathInstructionCount += instructionCount + KernelLimits.seccompFilterOverheadInstructionCount
        }
        guard pathInstructionCount <= KernelLimits.seccompPathInstructionCountMax else {
            throw .unrestorableState(path: path, reason: "the seccomp filters count \(pathInstructionCount) instructions, the kernel allows \(KernelLimits.seccompPathInstructionCountMax)")
        }
    }

    private func validateFiles(path: String) throws(ImageError) {
        var seenDescriptors: Set<Int32> = []
        for file in files {
            guard (0..<KernelLimits.descriptorLimit).contains(file.descriptor), seenDescriptors.insert(file.descriptor).inserted else {
                throw .unrestorableState(path: path, reason: "fd \(file.descriptor) is outside 0..<\(KernelLimits.descriptorLimit) or appears twice")
            }
            switch file.kind {
            case .regular, .directory, .deletedFile: try Self.checkPath(file.path, "fd \(file.descriptor)'s path", path: path)
            case .pipe where !file.path.isEmpty: try Self.checkPath(file.path, "fd \(file.descriptor)'s path", path: path)
            default: break
            }
            guard file.flags & KernelLimits.accessModeMask != KernelLimits.accessModeMask, file.flags & KernelLimits.temporaryFileFlag == 0 else {
                throw .unrestorableState(path: path, reason: "fd \(file.descriptor) has open flags 0o\(String(file.flags, radix: 8)), which cannot be reopened")
            }
            guard file.position >= 0 else {
                throw .unrestorableState(path: path, reason: "fd \(file.descriptor) is at position \(file.position)")
            }
        }
        try validateDescriptorRelations(path: path)
    }

    /// Records that refer to others must find them as they say: a dup's original is a lower, non-dup
    /// record; a pipe has one read and one write end naming the same channel, its lowest descriptor; a
    /// socket's peer names it back, with the same type; an epoll set watches existing non-epoll records.
    private func validateDescriptorRelations(path: String) throws(ImageError) {
        let byDescriptor = Dictionary(files.map { ($0.descriptor, $0) }, uniquingKeysWith: { first, _ in first })
        func bad(_ file: OpenFile, _ reason: String) -> ImageError {
            .unrestorableState(path: path, reason: "fd \(file.descriptor) (\(file.kind.name)) \(reason)")
        }
        for file in files {
            switch file.kind {
            case .duplicate(let original):
                guard original < file.descriptor, let target = byDescriptor[original] else { throw bad(file, "duplicates fd \(original), which is not a lower record") }
                if case .duplicate = target.kind { throw bad(file, "duplicates a duplicate") }
            case .pipe(let end):
                let ends = files.filter { if case .pipe(let other) = $0.kind { other.channel == end.channel } else { false } }
                let readEnds = ends.filter { if case .pipe(let other) = $0.kind { other.isReadEnd } else { false } }
                guard ends.count == 2, readEnds.count == 1, ends.map(\.descriptor).min() == end.channel,
                      ends[0].path == ends[1].path else {
                    throw bad(file, "is not one of exactly two ends (one read end) of pipe \(end.channel)")
                }
                guard (KernelLimits.pipeCapacityByteCountMin...DescriptorLimits.pipeCapacityByteCountMax).contains(end.capacityByteCount),
                      end.buffered.count <= Int(end.capacityByteCount), end.isReadEnd || end.buffered.isEmpty else {
                    throw bad(file, "has capacity \(end.capacityByteCount) with \(end.buffered.count) bytes buffered")
                }
            case .unixSocket(let end):
                guard end.type == 1 || end.type == 2 else { throw bad(file, "has socket type \(end.type)") }
                guard end.peer != file.descriptor, let peer = byDescriptor[end.peer], case .unixSocket(let other) = peer.kind,
                      other.peer == file.descriptor, other.type == end.type else {
                    throw bad(file, "names fd \(end.peer) as its peer, which does not name it back")
                }
                guard end.shutdown & ~3 == 0, end.sendBufferByteCount >= 0, end.receiveBufferByteCount >= 0 else {
                    throw bad(file, "has shutdown \(end.shutdown) or negative buffer sizes")
                }
            case .eventPoll(let entries):
                for entry in entries {
                    guard let target = byDescriptor[entry.descriptor] else { throw bad(file, "watches fd \(entry.descriptor), which is not restored") }
                    if case .eventPoll = target.kind { throw bad(file, "watches another epoll set") }
                }
            case .tcpSocket(let end):
                if let problem = end.problem { throw bad(file, problem) }
            case .eventCounter(let count, _):
                guard count < UInt64.max else { throw bad(file, "holds count \(count)") }
            case .timer(let timer):
                guard [0, 1, 7].contains(timer.clock), timer.settimeFlags & ~3 == 0 else { throw bad(file, "has clock \(timer.clock), flags \(timer.settimeFlags)") }
            case .memfd(let name, _, _):
                guard !name.utf8.contains(0) else { throw bad(file, "has a name with a NUL byte") }
            case .memfdOfMapping(let start, let end, _):
                guard mappings.contains(where: { mapping in
                    if case .sharedMemory(let memory) = mapping.kind { memory.memfdName != nil && mapping.start == start && mapping.end == end } else { false }
                }) else { throw bad(file, "reopens a memfd mapping at \(hex(start))-\(hex(end)) that is not restored") }
            case .inotify(let watches):
                for (previous, next) in zip(watches, watches.dropFirst()) where previous.watchDescriptor >= next.watchDescriptor {
                    throw bad(file, "lists watches \(previous.watchDescriptor) and \(next.watchDescriptor) out of order")
                }
                for watch in watches {
                    guard watch.watchDescriptor >= 1, watch.mask & ~InotifyReader.restorableMask == 0, watch.mask & InotifyReader.eventMask != 0 else {
                        throw bad(file, "has watch \(watch.watchDescriptor) with mask \(hex(UInt64(watch.mask)))")
                    }
                    try Self.checkPath(watch.path, "fd \(file.descriptor)'s watch \(watch.watchDescriptor)", path: path)
                }
            case .regular, .directory, .deletedFile, .signalQueue, .treePipe: break  // a tree pipe: TreePipes.validate
            }
        }
    }

    private func validateMemoryDescriptor(path: String) throws(ImageError) {
        let fields = memoryDescriptor
        for (name, value) in [("start_code", fields.startCode), ("end_code", fields.endCode), ("start_data", fields.startData),
                              ("end_data", fields.endData), ("start_brk", fields.startBrk), ("brk", fields.brk),
                              ("start_stack", fields.startStack), ("arg_start", fields.argStart), ("arg_end", fields.argEnd),
                              ("env_start", fields.envStart), ("env_end", fields.envEnd)] where value > AddressSpace.userSpaceEnd {
            throw .unrestorableState(path: path, reason: "\(name) \(hex(value)) lies above user space")
        }
        guard fields.auxiliaryVector.count % 16 == 0 else {
            throw .unrestorableState(path: path, reason: "the auxiliary vector has \(fields.auxiliaryVector.count) bytes, not whole (type, value) pairs")
        }
    }

    /// A path the restorer opens inside the target: absolute, and no NUL (C would end it there).
    private static func checkPath(_ text: String, _ what: String, path: String) throws(ImageError) {
        guard text.hasPrefix("/") else {
            throw .unrestorableState(path: path, reason: "\(what) \"\(text.debugDescriptionWithoutQuotes)\" is not an absolute path")
        }
        guard !text.utf8.contains(0) else {
            throw .unrestorableState(path: path, reason: "\(what) \"\(text.debugDescriptionWithoutQuotes)\" holds a NUL byte, which would cut it short")
        }
    }
}

private extension String {
    /// The text with control characters escaped, for a message (an image may hold any bytes).
    var debugDescriptionWithoutQuotes: String { String(debugDescription.dropFirst().dropLast()) }
}
