// The metadata region of an image: a ProcessState in little-endian binary. The reader treats the bytes
// as untrusted: every count is bounded, and values the restorer will use as addresses are checked.
import Sys

extension ProcessState {
    /// Bumped whenever the encoding changes; the image format version covers the layout around it.
    /// 3: each thread's sigaltstack, and the process context (cwd, umask, oom_score_adj, dumpable, THP).
    /// 4: the interval timers (setitimer).
    /// 5: shared-memory mappings (shared anonymous, memfd), and each descriptor's kind (directory, deleted file, memfd, dup, pipe, eventfd, signalfd, timerfd,
    ///    epoll, UNIX socket pair) with what it carries.
    /// 6: process trees: each process's lineage (parent, group, session, what it inherited), and the root's members.
    /// 7: POSIX timers; a mapped memfd's seals; SysV shared memory.
    /// 8: each thread's CPU affinity.
    /// 9: each mapping's madvise flags and (shared file mappings) whether it may write; the membarrier
    ///    registrations; the root directory.
    /// 10: tree pipe ends (a pipe whose two ends two processes of a tree hold); a member's descriptors
    ///    taken from its parent's at another number.
    static let encodingVersion: UInt32 = 10

    public func encoded() -> [UInt8] {
        var writer = BinaryWriter()
        writer.writeUInt32(Self.encodingVersion)
        writer.writeInt32(processID.rawValue)
        writer.writeString(executablePath)
        writer.writeString(commandName)
        writer.writeArray(threads) { writer, thread in thread.encode(into: &writer) }
        writer.writeArray(signalActions) { writer, action in
            writer.writeInt32(action.signal)
            for word in [action.handler, action.flags, action.restorer, action.mask] { writer.writeUInt64(word) }
        }
        writer.writeArray(sharedPendingSignals) { writer, pending in writer.writeBytes(pending.siginfo) }
        let fields = memoryDescriptor
        for word in [fields.startCode, fields.endCode, fields.startData, fields.endData, fields.startBrk, fields.brk,
                     fields.startStack, fields.argStart, fields.argEnd, fields.envStart, fields.envEnd] {
            writer.writeUInt64(word)
        }
        writer.writeBytes(fields.auxiliaryVector)
        writer.writeUInt32(personality)
        writer.writeInt32(parentDeathSignal)
        writer.writeArray(credentials.userIDs) { writer, id in writer.writeUInt32(id) }
        writer.writeArray(credentials.groupIDs) { writer, id in writer.writeUInt32(id) }
        writer.writeArray(credentials.supplementaryGroups) { writer, id in writer.writeUInt32(id) }
        for set in [credentials.inheritable, credentials.permitted, credentials.effective, credentials.bounding,
                    credentials.ambient] {
            writer.writeUInt64(set)
        }
        writer.writeUInt32(credentials.securebits)
        writer.writeBool(credentials.noNewPrivileges)
        writer.writeArray(resourceLimits) { writer, limit in
            writer.writeInt32(limit.resource)
            writer.writeUInt64(limit.soft)
            writer.writeUInt64(limit.hard)
        }
        writer.writeInt32(seccompMode)
        writer.writeArray(seccompFilters) { writer, filter in
            writer.writeBytes(filter.program)
            writer.writeUInt64(filter.flags)
        }
        writer.writeArray(mappings) { writer, mapping in mapping.encode(into: &writer) }
        writer.writeArray(files) { writer, file in file.encode(into: &writer) }
        writer.writeString(context.workingDirectory)
        writer.writeUInt32(context.fileCreationMask)
        writer.writeInt32(context.oomScoreAdjustment)
        writer.writeInt32(context.dumpable)
        writer.writeUInt32(context.transparentHugePagesDisabled)
        writer.writeUInt32(context.membarrierRegistrations)
        writer.writeString(context.rootDirectory)
        writer.writeArray(context.intervalTimers) { writer, timer in
            writer.writeInt32(timer.kind.rawValue)
            writer.writeUInt64(timer.intervalMicroseconds)
            writer.writeUInt64(timer.valueMicroseconds)
        }
        writer.writeArray(context.posixTimers) { writer, timer in
            writer.writeInt32(timer.id)
            writer.writeInt32(timer.clock)
            switch timer.notification {
            case .signal: writer.writeUInt8(0); writer.writeInt32(0)
            case .none: writer.writeUInt8(1); writer.writeInt32(0)
            case .thread(let thread): writer.writeUInt8(2); writer.writeInt32(thread.rawValue)
            }
            writer.writeInt32(timer.signal)
            writer.writeUInt64(timer.value)
            writer.writeUInt64(timer.valueNanoseconds)
            writer.writeUInt64(timer.intervalNanoseconds)
        }
        encodeTree(into: &writer)
        return writer.bytes
    }

    public static func decode(_ bytes: [UInt8]) throws(ImageError) -> ProcessState {
        try decode(bytes, isMember: false)
    }

    static func decode(_ bytes: [UInt8], isMember: Bool) throws(ImageError) -> ProcessState {
        var reader = BinaryReader(bytes)
        let version = try reader.readUInt32()
        guard version == encodingVersion else {
            throw .malformedMetadata(reason: "process-state encoding \(version), this fammig reads \(encodingVersion)")
        }
        let processID = ProcessID(try reader.readInt32())
        guard processID.rawValue >= 1 else { throw .malformedMetadata(reason: "pid \(processID) cannot be restored") }
        let executablePath = try reader.readString(maximumByteCount: KernelLimits.pathByteCountMax)
        let commandName = try reader.readString(maximumByteCount: 15)
        let threads = try reader.readArray(maximumCount: ProcessState.maximumThreadCount) { (reader) throws(ImageError) in try ThreadState.decode(&reader) }
        guard !threads.isEmpty else { throw .malformedMetadata(reason: "no threads") }
        let actions = try reader.readArray(maximumCount: 64) { (reader) throws(ImageError) -> SignalAction in
            let signal = try reader.readInt32()
            guard (1...64).contains(signal) else { throw .malformedMetadata(reason: "signal action for signal \(signal)") }
            return SignalAction(signal: signal, handler: try reader.readUInt64(), flags: try reader.readUInt64(),
                                restorer: try reader.readUInt64(), mask: try reader.readUInt64())
        }
        let shared = try reader.readArray(maximumCount: StateLimits.sharedObjectCountMax) { (reader) throws(ImageError) in
            PendingSignal(shared: true, siginfo: try readSiginfo(&reader))
        }
        var fields = MemoryDescriptorFields()
        fields.startCode = try reader.readUInt64(); fields.endCode = try reader.readUInt64()
        fields.startData = try reader.readUInt64(); fields.endData = try reader.readUInt64()
        fields.startBrk = try reader.readUInt64(); fields.brk = try reader.readUInt64()
        fields.startStack = try reader.readUInt64()
        fields.argStart = try reader.readUInt64(); fields.argEnd = try reader.readUInt64()
        fields.envStart = try reader.readUInt64(); fields.envEnd = try reader.readUInt64()
        fields.auxiliaryVector = try reader.readBytes(maximumByteCount: 1024)
        let personality = try reader.readUInt32()
        let parentDeathSignal = try reader.readInt32()
        // The restorer passes it to prctl as an unsigned word: a negative one must never get that far.
        guard parentDeathSignal == 0 || KernelLimits.signalNumbers.contains(parentDeathSignal) else {
            throw .malformedMetadata(reason: "parent-death signal \(parentDeathSignal)")
        }
        var credentials = Credentials()
        credentials.userIDs = try reader.readArray(maximumCount: 4) { (reader) throws(ImageError) in try reader.readUInt32() }
        credentials.groupIDs = try reader.readArray(maximumCount: 4) { (reader) throws(ImageError) in try reader.readUInt32() }
        guard credentials.userIDs.count == 4, credentials.groupIDs.count == 4 else {
            throw .malformedMetadata(reason: "credentials need 4 user and 4 group IDs")
        }
        credentials.supplementaryGroups = try reader.readArray(maximumCount: 65536) { (reader) throws(ImageError) in try reader.readUInt32() }
        credentials.inheritable = try reader.readUInt64(); credentials.permitted = try reader.readUInt64()
        credentials.effective = try reader.readUInt64(); credentials.bounding = try reader.readUInt64()
        credentials.ambient = try reader.readUInt64()
        credentials.securebits = try reader.readUInt32()
        credentials.noNewPrivileges = try reader.readBool()
        let limits = try reader.readArray(maximumCount: 16) { (reader) throws(ImageError) -> ResourceLimit in
            let resource = try reader.readInt32()
            guard (0..<16).contains(resource) else { throw .malformedMetadata(reason: "resource limit \(resource)") }
            return ResourceLimit(resource: resource, soft: try reader.readUInt64(), hard: try reader.readUInt64())
        }
        let seccompMode = try reader.readInt32()
        let filters = try reader.readArray(maximumCount: 512) { (reader) throws(ImageError) -> SeccompFilter in
            let program = try reader.readBytes(maximumByteCount: KernelLimits.seccompFilterInstructionCountMax * 8)
            guard !program.isEmpty, program.count % 8 == 0 else {
                throw .malformedMetadata(reason: "seccomp filter of \(program.count) bytes")
            }
            return SeccompFilter(program: program, flags: try reader.readUInt64())
        }
        let mappings = try reader.readArray(maximumCount: 65530) { (reader) throws(ImageError) in try Mapping.decode(&reader) }
        for (previous, next) in zip(mappings, mappings.dropFirst()) where previous.end > next.start {
            throw .malformedMetadata(reason: "mappings \(hex(previous.start))-\(hex(previous.end)) and \(hex(next.start))-\(hex(next.end)) overlap or are out of order")
        }
        let files = try reader.readArray(maximumCount: 65536) { (reader) throws(ImageError) in try OpenFile.decode(&reader) }
        let carriedByteCount = files.reduce(0) { $0 + $1.kind.carriedByteCount }
        guard carriedByteCount <= DescriptorLimits.carriedByteCountMax else {
            throw .malformedMetadata(reason: "descriptors carry \(carriedByteCount) bytes, the limit is \(DescriptorLimits.carriedByteCountMax)")
        }
        var context = ProcessContext()
        context.workingDirectory = try reader.readString(maximumByteCount: ProcessContext.workingDirectoryByteCountMax)
        context.fileCreationMask = try reader.readUInt32()
        context.oomScoreAdjustment = try reader.readInt32()
        context.dumpable = try reader.readInt32()
        context.transparentHugePagesDisabled = try reader.readUInt32()
        context.membarrierRegistrations = try reader.readUInt32()
        context.rootDirectory = try reader.readString(maximumByteCount: ProcessContext.workingDirectoryByteCountMax)
        context.intervalTimers = try reader.readArray(maximumCount: IntervalTimer.Kind.allCases.count) { (reader) throws(ImageError) -> IntervalTimer in
            let rawKind = try reader.readInt32()
            guard let kind = IntervalTimer.Kind(rawValue: rawKind) else { throw .malformedMetadata(reason: "interval timer \(rawKind)") }
            return IntervalTimer(kind: kind, intervalMicroseconds: try reader.readUInt64(), valueMicroseconds: try reader.readUInt64())
        }
        context.posixTimers = try reader.readArray(maximumCount: PosixTimer.countMax) { (reader) throws(ImageError) -> PosixTimer in
            let id = try reader.readInt32(), clock = try reader.readInt32()
            let notification: PosixTimer.Notification
            let notify = try reader.readUInt8(), thread = try reader.readInt32()
            switch notify {
            case 0: notification = .signal
            case 1: notification = .none
            case 2: notification = .thread(ProcessID(thread))
            default: throw .malformedMetadata(reason: "POSIX timer \(id) notifies by unknown kind \(notify)")
            }
            return PosixTimer(id: id, clock: clock, notification: notification, signal: try reader.readInt32(), value: try reader.readUInt64(),
                              valueNanoseconds: try reader.readUInt64(), intervalNanoseconds: try reader.readUInt64())
        }
        let (lineage, members) = try decodeTree(&reader, isMember: isMember)
        try reader.expectEnd()
        var state = ProcessState(processID: processID, executablePath: executablePath, commandName: commandName, threads: threads,
                            signalActions: actions, sharedPendingSignals: shared, memoryDescriptor: fields,
                            personality: personality, parentDeathSignal: parentDeathSignal, credentials: credentials,
                            resourceLimits: limits,
                            seccompMode: seccompMode, seccompFilters: filters, mappings: mappings, files: files)
        state.context = context
        state.lineage = lineage
        state.members = members
        return state
    }

    static func readSiginfo(_ reader: inout BinaryReader) throws(ImageError) -> [UInt8] {
        let siginfo = try reader.readBytes(maximumByteCount: 128)
        guard siginfo.count == 128 else { throw .malformedMetadata(reason: "siginfo of \(siginfo.count) bytes") }
        // si_signo, which the restorer passes to rt_sigqueueinfo as an unsigned word.
        let signal = PendingSignal(shared: false, siginfo: siginfo).signal
        guard KernelLimits.signalNumbers.contains(signal) else { throw .malformedMetadata(reason: "pending signal \(signal)") }
        return siginfo
    }
}

extension ThreadState {
    func encode(into writer: inout BinaryWriter) {
        writer.writeInt32(threadID.rawValue)
        writer.writeArray(registers.words) { writer, word in writer.writeUInt64(word) }
        writer.writeBytes(extendedState)
        writer.writeUInt64(signalMask)
        writer.writeBool(rseq != nil)
        if let rseq {
            writer.writeUInt64(rseq.address)
            writer.writeUInt32(rseq.byteCount)
            writer.writeUInt32(rseq.signature)
            writer.writeUInt32(rseq.flags)
        }
        writer.writeArray(pendingSignals) { writer, pending in writer.writeBytes(pending.siginfo) }
        writer.writeUInt64(robustListHead)
        writer.writeUInt64(robustListLength)
        writer.writeUInt64(clearChildTID)
        writer.writeString(commandName)
        writer.writeUInt64(signalStack.address)
        writer.writeUInt64(signalStack.byteCount)
        writer.writeUInt32(signalStack.flags)
        writer.writeArray(cpuAffinity.words) { writer, word in writer.writeUInt64(word) }
    }

    static func decode(_ reader: inout BinaryReader) throws(ImageError) -> ThreadState {
        let threadID = ProcessID(try reader.readInt32())
        let words = try reader.readArray(maximumCount: 27) { (reader) throws(ImageError) in try reader.readUInt64() }
        guard words.count == 27 else { throw .malformedMetadata(reason: "thread \(threadID) has \(words.count) registers, not 27") }
        let extendedState = try reader.readBytes(maximumByteCount: 16384)
        let signalMask = try reader.readUInt64()
        var rseq: RseqConfiguration?
        if try reader.readBool() {
            rseq = RseqConfiguration(address: try reader.readUInt64(), byteCount: try reader.readUInt32(),
                                     signature: try reader.readUInt32(), flags: try reader.readUInt32())
        }
        let pending = try reader.readArray(maximumCount: StateLimits.pendingSignalCountMax) { (reader) throws(ImageError) in
            PendingSignal(shared: false, siginfo: try ProcessState.readSiginfo(&reader))
        }
        var thread = ThreadState(threadID: threadID, registers: GeneralRegisters(words: words), extendedState: extendedState,
                                 signalMask: signalMask, rseq: rseq, pendingSignals: pending)
        thread.robustListHead = try reader.readUInt64()
        thread.robustListLength = try reader.readUInt64()
        thread.clearChildTID = try reader.readUInt64()
        thread.commandName = try reader.readString(maximumByteCount: 64)
        thread.signalStack = SignalStack(address: try reader.readUInt64(), byteCount: try reader.readUInt64(), flags: try reader.readUInt32())
        let affinityWords = try reader.readArray(maximumCount: CPUSet.wordCountMax) { (reader) throws(ImageError) in try reader.readUInt64() }
        // Encoded without trailing zero words: another spelling of one mask would not encode back the same.
        guard let affinity = CPUSet(words: affinityWords), affinity.words == affinityWords else {
            throw .malformedMetadata(reason: "thread \(threadID) has a CPU mask with trailing zero words")
        }
        thread.cpuAffinity = affinity
        return thread
    }
}

extension Mapping {
    func encode(into writer: inout BinaryWriter) {
        writer.writeUInt64(start)
        writer.writeUInt64(end)
        writer.writeUInt8((readable ? 1 : 0) | (writable ? 2 : 0) | (executable ? 4 : 0) | (shared ? 8 : 0) | (noReserve ? 16 : 0)
                          | (mayWrite ? 0 : 32))
        writer.writeUInt64(fileOffset)
        writer.writeUInt16(advice.rawValue)
        switch kind {
        case .anonymous: writer.writeUInt8(0)
        case .heap: writer.writeUInt8(1)
        case .stack: writer.writeUInt8(2)
        case .file(let path): writer.writeUInt8(3); writer.writeString(path)
        case .vdsoPart(let name): writer.writeUInt8(4); writer.writeString(name)
        case .vsyscall: writer.writeUInt8(5)
        case .sharedMemory(let memory):
            writer.writeUInt8(6)
            writer.writeInt32(memory.object)
            writer.writeBool(memory.memfdName != nil)
            if let name = memory.memfdName { writer.writeString(name) }
            writer.writeUInt64(memory.byteCount)
            writer.writeBool(memory.sealingForbidden)
            writer.writeUInt32(memory.seals)
            writer.writeBool(memory.sysv != nil)
            if let segment = memory.sysv {
                writer.writeInt32(segment.identifier)
                writer.writeUInt64(segment.byteCount)
                writer.writeUInt32(segment.mode)
                writer.writeUInt32(segment.userID)
                writer.writeUInt32(segment.groupID)
                writer.writeBool(segment.markedForRemoval)
            }
            writer.writeUInt32(memory.mode)
            writer.writeUInt32(memory.userID)
            writer.writeUInt32(memory.groupID)
        }
    }

    static func decode(_ reader: inout BinaryReader) throws(ImageError) -> Mapping {
        let start = try reader.readUInt64()
        let end = try reader.readUInt64()
        let bits = try reader.readUInt8()
        guard bits & ~0x3F == 0 else { throw .malformedMetadata(reason: "mapping at \(hex(start)) has unknown flag bits \(hex(UInt64(bits)))") }
        let fileOffset = try reader.readUInt64()
        let advice = MappingAdvice(rawValue: try reader.readUInt16())
        guard advice.isSubset(of: MappingAdvice.known.subtracting(MappingAdvice.refused)) else {
            throw .malformedMetadata(reason: "mapping \(hex(start))-\(hex(end)) has madvise flags \(hex(UInt64(advice.rawValue))) that cannot be restored")
        }
        let kind: MappingKind
        switch try reader.readUInt8() {
        case 0: kind = .anonymous
        case 1: kind = .heap
        case 2: kind = .stack
        case 3: kind = .file(path: try reader.readString(maximumByteCount: KernelLimits.pathByteCountMax))
        case 4:
            let name = try reader.readString(maximumByteCount: 32)
            guard ["[vvar]", "[vvar_vclock]", "[vdso]"].contains(name) else {
                throw .malformedMetadata(reason: "unknown vDSO part \(name)")
            }
            kind = .vdsoPart(name: name)
        case 5: kind = .vsyscall
        case 6:
            let object = try reader.readInt32()
            let name: String? = try reader.readBool() ? try reader.readString(maximumByteCount: 249) : nil
            let byteCount = try reader.readUInt64()
            let sealingForbidden = try reader.readBool()
            let seals = try reader.readUInt32()
            var segment: SysVSegment?
            if try reader.readBool() {
                segment = SysVSegment(identifier: try reader.readInt32(), byteCount: try reader.readUInt64(), mode: try reader.readUInt32(),
                                      userID: try reader.readUInt32(), groupID: try reader.readUInt32(), markedForRemoval: try reader.readBool())
            }
            let mode = try reader.readUInt32(), userID = try reader.readUInt32(), groupID = try reader.readUInt32()
            guard mode <= 0o7777 else { throw .malformedMetadata(reason: "shared memory object \(object) has mode 0o\(String(mode, radix: 8))") }
            guard (0..<65536).contains(object), byteCount % .pageSize == 0, byteCount <= AddressSpace.userSpaceEnd,
                  fileOffset <= byteCount, end &- start <= byteCount - fileOffset else {
                throw .malformedMetadata(reason: "shared memory object \(object) of \(byteCount) bytes mapped at offset \(hex(fileOffset))")
            }
            guard seals & ~SharedMemory.knownSeals == 0, seals == 0 || name != nil, !(name != nil && segment != nil) else {
                throw .malformedMetadata(reason: "shared memory object \(object) has seals \(hex(UInt64(seals))) or is both a memfd and a SysV segment")
            }
            if let segment {
                guard segment.identifier >= 0, segment.byteCount > 0, segment.byteCount <= SysVSegment.byteCountMax,
                      (segment.byteCount + .pageSize - 1) / .pageSize * .pageSize == byteCount, segment.mode <= 0o777 else {
                    throw .malformedMetadata(reason: "SysV segment \(segment.identifier) of \(segment.byteCount) bytes, mode 0o\(String(segment.mode, radix: 8)), in an object of \(byteCount)")
                }
            }
            kind = .sharedMemory(SharedMemory(object: object, memfdName: name, byteCount: byteCount, sealingForbidden: sealingForbidden,
                                              seals: seals, sysv: segment, mode: mode, userID: userID, groupID: groupID))
        case let other: throw .malformedMetadata(reason: "unknown mapping kind \(other)")
        }
        var mapping = Mapping(start: start, end: end, readable: bits & 1 != 0, writable: bits & 2 != 0,
                              executable: bits & 4 != 0, shared: bits & 8 != 0, fileOffset: fileOffset, kind: kind)
        mapping.noReserve = bits & 16 != 0
        mapping.advice = advice
        mapping.mayWrite = bits & 32 == 0
        guard mapping.mayWrite || !mapping.writable else {
            throw .malformedMetadata(reason: "mapping \(hex(start))-\(hex(end)) is writable but may not write")
        }
        if let problem = mapping.addressProblem { throw .malformedMetadata(reason: "mapping \(hex(start))-\(hex(end)) \(problem)") }
        return mapping
    }
}

/// Bounds on what a decoded process state may hold, so a hostile image cannot make the decoder allocate
/// without limit.
enum StateLimits {
    /// Shared-memory objects of one process.
    static let sharedObjectCountMax = 1 << 12
    /// Signals pending on one thread or process (the kernel's default RLIMIT_SIGPENDING is far above
    /// what a process holds while frozen; 4 Ki is what the decoder accepts).
    static let pendingSignalCountMax = 1 << 12
}
