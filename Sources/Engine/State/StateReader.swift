// Reads a stopped process's state: the dumper reads the victim with it at freeze, and the state oracle
// reads the restored target with it before the target runs, so both sides are read the same way.
import Sys

/// What only the process itself can tell (asked by injected syscalls).
struct InjectedAnswers: Equatable {
    var brk: UInt64
    var actions: [SignalAction]
    var securebits: UInt32
    var parentDeathSignal: Int32
    var resourceLimits: [ResourceLimit] = []
    /// PR_GET_TID_ADDRESS of each thread, main thread first.
    var clearChildTIDs: [UInt64] = []
    /// sigaltstack(NULL, &old) of each thread, main thread first.
    var signalStacks: [SignalStack] = []
    var dumpable: Int32 = 1
    var transparentHugePagesDisabled: UInt32 = 0
    var membarrierRegistrations: UInt32 = 0
    var intervalTimers: [IntervalTimer] = []
    var posixTimers: [PosixTimer] = []
}

enum StateReader {
    /// brk(0), rt_sigaction for every signal, PR_GET_SECUREBITS, PR_GET_PDEATHSIG and the rlimits from
    /// the main thread; PR_GET_TID_ADDRESS from every thread (`threadInjectors`: the others, in order).
    static func injectQueries(injector: SyscallInjector, threadInjectors: [SyscallInjector], memory: ProcessMemory,
                              dataAddress: UInt64) throws -> InjectedAnswers {
        var answers = InjectedAnswers(brk: 0, actions: [], securebits: 0, parentDeathSignal: 0)
        // The other threads' own queries first, one by one (each thread runs its own).
        var otherTIDAddresses: [UInt64] = [], otherStacks: [SignalStack] = []
        for threadInjector in threadInjectors {
            try threadInjector.call("prctl(PR_GET_TID_ADDRESS)", Syscall.prctl, 40, dataAddress)
            otherTIDAddresses.append(try memory.read(at: dataAddress, byteCount: 8).littleEndianWord(at: 0))
            try threadInjector.call("sigaltstack", Syscall.sigaltstack, 0, dataAddress)
            otherStacks.append(SignalStack(stackT: try memory.read(at: dataAddress, byteCount: 24)))
        }
        // The main thread's, all in one batch (one stop instead of some ninety): each answer that comes
        // through memory has a place of its own in `outputs`, read back at once afterwards.
        let layout = QueryLayout(dataAddress: dataAddress)
        let signals = (Int32(1)...64).filter { $0 != KernelLimits.killSignal && $0 != KernelLimits.stopSignal }
        typealias Call = SyscallInjector.BatchedCall
        var calls: [Call] = [Call("brk(0)", Syscall.brk, 0)]
        for (index, signal) in signals.enumerated() {
            calls.append(Call("rt_sigaction(\(signal))", Syscall.rtSigaction, UInt64(signal), 0, layout.output(QueryLayout.actions + index * 32), 8))
        }
        calls.append(Call("prctl(PR_GET_SECUREBITS)", Syscall.prctl, 27))
        calls.append(Call("prctl(PR_GET_PDEATHSIG)", Syscall.prctl, 2, layout.output(QueryLayout.parentDeathSignal)))
        for resource in 0..<16 {
            calls.append(Call("prlimit64(\(resource))", Syscall.prlimit64, 0, UInt64(resource), 0, layout.output(QueryLayout.limits + resource * 16)))
        }
        calls.append(Call("prctl(PR_GET_DUMPABLE)", Syscall.prctl, 3))
        calls.append(Call("prctl(PR_GET_THP_DISABLE)", Syscall.prctl, 42))
        calls.append(Call("membarrier(GET_REGISTRATIONS)", Syscall.membarrier, ProcessContext.membarrierGetRegistrations, 0, 0))
        calls.append(Call("prctl(PR_GET_TID_ADDRESS)", Syscall.prctl, 40, layout.output(QueryLayout.tidAddress)))
        calls.append(Call("sigaltstack", Syscall.sigaltstack, 0, layout.output(QueryLayout.signalStack)))
        // Last: ITIMER_REAL runs on while the process is stopped, and the shared pending signals (read
        // next) should see an expiry that getitimer already counted.
        for (index, kind) in IntervalTimer.Kind.allCases.enumerated() {
            calls.append(Call("getitimer(\(kind))", Syscall.getitimer, UInt64(kind.rawValue), layout.output(QueryLayout.timers + index * 32)))
        }
        precondition(256 + QueryLayout.outputByteCount <= Int.pageSize && SyscallInjector.batchLoopCode.count <= 256, "query answers overlap the table or the code")
        precondition(calls.count * SyscallInjector.batchEntryByteCount <= QueryLayout.tableByteCountLimit, "\(calls.count) queries overflow the scratch area")
        try memory.write(SyscallInjector.batchLoopCode, at: layout.codeAddress)
        let results = try injector.callBatch(calls, codeAddress: layout.codeAddress, tableAddress: layout.tableAddress, memory: memory)
        let outputs = try memory.read(at: layout.output(0), byteCount: QueryLayout.outputByteCount)
        func bytes(_ offset: Int, _ count: Int) -> [UInt8] { Array(outputs[offset..<(offset + count)]) }
        var resultIndex = 0
        func nextResult() -> UInt64 { defer { resultIndex += 1 }; return results[resultIndex] }

        answers.brk = nextResult()
        for (index, signal) in signals.enumerated() {
            _ = nextResult()
            let raw = bytes(QueryLayout.actions + index * 32, 32)
            answers.actions.append(SignalAction(signal: signal, handler: raw.littleEndianWord(at: 0),
                                                flags: raw.littleEndianWord(at: 8), restorer: raw.littleEndianWord(at: 16),
                                                mask: raw.littleEndianWord(at: 24)))
        }
        answers.securebits = UInt32(truncatingIfNeeded: nextResult())
        _ = nextResult()
        answers.parentDeathSignal = Int32(truncatingIfNeeded: bytes(QueryLayout.parentDeathSignal, 8).littleEndianWord(at: 0))
        for resource in Int32(0)..<16 {
            _ = nextResult()
            let raw = bytes(QueryLayout.limits + Int(resource) * 16, 16)
            answers.resourceLimits.append(ResourceLimit(resource: resource, soft: raw.littleEndianWord(at: 0), hard: raw.littleEndianWord(at: 8)))
        }
        answers.dumpable = Int32(truncatingIfNeeded: nextResult())
        answers.transparentHugePagesDisabled = UInt32(truncatingIfNeeded: nextResult())
        let registrations = Int64(bitPattern: nextResult())
        guard registrations >= 0 else {
            throw InjectionError.failed(name: "membarrier(MEMBARRIER_CMD_GET_REGISTRATIONS) (Linux 6.3)", errno: Int32(truncatingIfNeeded: -registrations))
        }
        answers.membarrierRegistrations = UInt32(truncatingIfNeeded: registrations)
        _ = nextResult()
        answers.clearChildTIDs = [bytes(QueryLayout.tidAddress, 8).littleEndianWord(at: 0)] + otherTIDAddresses
        _ = nextResult()
        answers.signalStacks = [SignalStack(stackT: bytes(QueryLayout.signalStack, 24))] + otherStacks
        for (index, kind) in IntervalTimer.Kind.allCases.enumerated() {
            _ = nextResult()
            guard let timer = IntervalTimer(kind: kind, itimerval: bytes(QueryLayout.timers + index * 32, 32)) else {
                throw InjectionError.failed(name: "getitimer(\(kind)) answered no valid itimerval", errno: ErrorNumber.invalidArgument)
            }
            answers.intervalTimers.append(timer)
        }
        precondition(resultIndex == calls.count, "\(calls.count - resultIndex) batched answers not read")
        // The POSIX timers right after the interval timers, for the same reason.
        for var timer in try PosixTimerReader.list(injector.tracee.processID) {
            try injector.call("timer_gettime(\(timer.id))", Syscall.timerGettime, UInt64(timer.id), dataAddress)
            guard let setting = PosixTimer.setting(itimerspec: try memory.read(at: dataAddress, byteCount: 32)) else {
                throw InjectionError.failed(name: "timer_gettime(\(timer.id)) answered no valid itimerspec", errno: ErrorNumber.invalidArgument)
            }
            (timer.valueNanoseconds, timer.intervalNanoseconds) = setting
            answers.posixTimers.append(timer)
        }
        return answers
    }

    /// Where the batched queries live in the scratch data area (at least 12 KiB from `dataAddress`,
    /// writable and executable): the loop's code, the answers that come through memory, the table.
    struct QueryLayout {
        let dataAddress: UInt64
        var codeAddress: UInt64 { dataAddress }
        var tableAddress: UInt64 { dataAddress + .pageSize }
        func output(_ offset: Int) -> UInt64 { dataAddress + 256 + UInt64(offset) }
        static let actions = 0                       // 62 struct sigaction of 32 bytes
        static let parentDeathSignal = 62 * 32       // one int, in 8 bytes
        static let limits = parentDeathSignal + 8    // 16 struct rlimit of 16 bytes
        static let tidAddress = limits + 16 * 16     // one pointer
        static let signalStack = tidAddress + 8      // one stack_t of 24 bytes
        static let timers = signalStack + 24         // 3 struct itimerval of 32 bytes
        static let outputByteCount = timers + 3 * 32
        /// The table fills the rest: 8 KiB, 128 entries.
        static let tableByteCountLimit = 8 * 1024
    }

    /// A read-back that was not asked for (no injected answers) reads nothing.
    static func read(tracees: [Tracee], processID: ProcessID, injected: InjectedAnswers?, allowingLoneEnds: Bool = false) throws -> ProcessState? {
        guard let injected else { return nil }
        return try read(tracees: tracees, processID: processID, injected: injected, excluding: nil, allowingLoneEnds: allowingLoneEnds)
    }

    /// Everything else, through ptrace and /proc. Every thread (`tracees`, main first) must be stopped,
    /// traced by the caller's thread.
    static func read(tracees: [Tracee], processID: ProcessID, injected: InjectedAnswers,
                     excluding excludedRange: Range<UInt64>? = nil, mappingFlags: MappingFlags? = nil, allowingLoneEnds: Bool = false) throws -> ProcessState {
        let tracee = tracees[0]
        let filters = try tracee.seccompFilters().map { SeccompFilter(program: $0.program, flags: $0.flags) }
        let sharedPending = try tracee.pendingSignals(shared: true).map { PendingSignal(shared: true, siginfo: $0) }
        var threads: [ThreadState] = []
        for (index, thread) in tracees.enumerated() {
            var state = ThreadState(threadID: try ProcFS.innermostProcessID(thread.processID), registers: try thread.registers(),
                                    extendedState: try thread.extendedState(), signalMask: try thread.signalMask(),
                                    rseq: try thread.rseqConfiguration(),
                                    pendingSignals: try thread.pendingSignals(shared: false).map { PendingSignal(shared: false, siginfo: $0) })
            let robust = try robustList(of: thread.processID)
            state.robustListHead = robust.head
            state.robustListLength = robust.length
            state.clearChildTID = index < injected.clearChildTIDs.count ? injected.clearChildTIDs[index] : 0
            state.signalStack = index < injected.signalStacks.count ? injected.signalStacks[index] : .disabled
            state.commandName = try ProcFS.commandName(processID, thread: thread.processID)
            state.cpuAffinity = try CPUSet.of(thread: thread.processID)
            threads.append(state)
        }

        let status = try ProcFS.status(processID)
        let stat = try ProcFS.statFields(processID)
        func statField(_ number: Int) throws -> UInt64 {
            guard let text = stat[number], let value = UInt64(text) else {
                throw CheckpointError.system(processID, "/proc/\(processID)/stat field \(number) unreadable")
            }
            return value
        }
        var descriptor = MemoryDescriptorFields()
        descriptor.startCode = try statField(26)
        descriptor.endCode = try statField(27)
        descriptor.startStack = try statField(28)
        descriptor.startData = try statField(45)
        descriptor.endData = try statField(46)
        descriptor.startBrk = try statField(47)
        descriptor.argStart = try statField(48)
        descriptor.argEnd = try statField(49)
        descriptor.envStart = try statField(50)
        descriptor.envEnd = try statField(51)
        descriptor.brk = injected.brk
        descriptor.auxiliaryVector = try ProcFS.readFile(ProcFS.path(of: processID, .auxiliaryVector))

        let personality = try ProcFS.personality(processID) ?? 0
        let files = try DescriptorReader.read(processID, contents: true, allowingLoneEnds: allowingLoneEnds)
        var mappings = try Preflight.mappings(processID)
        let flags = try mappingFlags.flatMap { $0.mappings == mappings ? $0.flags : nil } ?? ProcFS.smapsFlags(processID)
        if let excludedRange { mappings.removeAll { excludedRange.contains($0.start) } }
        applyFlags(flags, to: &mappings)
        var context = ProcessContext()
        context.workingDirectory = try ContextReader.workingDirectory(processID)
        context.rootDirectory = try ContextReader.rootDirectory(processID)
        context.fileCreationMask = try ContextReader.fileCreationMask(status: status, processID: processID)
        context.oomScoreAdjustment = try ContextReader.oomScoreAdjustment(processID)
        context.dumpable = injected.dumpable
        context.transparentHugePagesDisabled = injected.transparentHugePagesDisabled
        context.membarrierRegistrations = injected.membarrierRegistrations
        context.intervalTimers = injected.intervalTimers
        context.posixTimers = injected.posixTimers
        // Inside its own PID namespace (a node of its own) the process knows itself by another number.
        let ownProcessID = try ProcFS.innermostProcessID(processID)
        var state = ProcessState(
            processID: ownProcessID,
            executablePath: try ProcFS.readLink(ProcFS.path(of: processID, .executable)),
            commandName: try ProcFS.commandName(processID),
            threads: threads,
            signalActions: injected.actions,
            sharedPendingSignals: sharedPending,
            memoryDescriptor: descriptor,
            personality: personality,
            parentDeathSignal: injected.parentDeathSignal,
            credentials: try credentials(status: status, securebits: injected.securebits, processID: processID),
            resourceLimits: injected.resourceLimits,
            seccompMode: Int32(status["Seccomp"] ?? "0") ?? 0,
            seccompFilters: filters,
            mappings: mappings,
            files: files)
        state.context = context
        return state
    }

    /// Each mapping's VmFlags (/proc/PID/smaps): MAP_NORESERVE ("nr") and its madvise flags (MappingAdvice),
    /// read while the process still runs: smaps walks every page table to count pages (some 10 ms for
    /// 512 MiB here, ten times that on a loaded machine), and its VmFlags are the only place that says
    /// them. Good for a later read only while the mappings listed then are the ones listed now (nr is
    /// fixed at mmap; an madvise on part of a mapping splits it, which changes the list, and smaps is read
    /// again; an madvise on a whole mapping in the moments between this read and the freeze is not seen,
    /// and the state oracle, which reads the target afresh, reports it).
    struct MappingFlags: Sendable {
        let mappings: [Mapping]
        let flags: [UInt64: SmapsFlags]

        /// The mappings with their flags applied.
        var flaggedMappings: [Mapping] {
            var flagged = mappings
            StateReader.applyFlags(flags, to: &flagged)
            return flagged
        }
    }

    static func mappingFlags(_ processID: ProcessID) -> MappingFlags? {
        guard let before = try? Preflight.mappings(processID) else { return nil }
        let flags = (try? ProcFS.smapsFlags(processID)) ?? [:]
        // A list that changed while smaps was read may pair a flag with the wrong mapping: no snapshot.
        guard let after = try? Preflight.mappings(processID), after == before else { return nil }
        return MappingFlags(mappings: before, flags: flags)
    }

    /// Sets each mapping's noReserve and advice from its VmFlags.
    static func applyFlags(_ flags: [UInt64: SmapsFlags], to mappings: inout [Mapping]) {
        for index in mappings.indices {
            guard let line = flags[mappings[index].start] else { continue }
            mappings[index].noReserve = line.contains("nr")
            mappings[index].advice = MappingAdvice(mnemonics: line.mnemonics)
            if mappings[index].shared, case .file = mappings[index].kind { mappings[index].mayWrite = line.contains("mw") }
        }
    }

    static func credentials(status: [String: String], securebits: UInt32, processID: ProcessID) throws -> Credentials {
        func numbers(_ key: String) -> [UInt32] {
            (status[key] ?? "").split(whereSeparator: { $0 == " " || $0 == "\t" }).compactMap { UInt32($0) }
        }
        func capabilitySet(_ key: String) throws -> UInt64 {
            guard let text = status[key], let value = UInt64(text, radix: 16) else {
                throw CheckpointError.system(processID, "/proc/\(processID)/status has no \(key)")
            }
            return value
        }
        var credentials = Credentials()
        credentials.userIDs = numbers("Uid")
        credentials.groupIDs = numbers("Gid")
        guard credentials.userIDs.count == 4, credentials.groupIDs.count == 4 else {
            throw CheckpointError.system(processID, "/proc/\(processID)/status has malformed Uid/Gid lines")
        }
        credentials.supplementaryGroups = numbers("Groups")
        credentials.inheritable = try capabilitySet("CapInh")
        credentials.permitted = try capabilitySet("CapPrm")
        credentials.effective = try capabilitySet("CapEff")
        credentials.bounding = try capabilitySet("CapBnd")
        credentials.ambient = try capabilitySet("CapAmb")
        credentials.noNewPrivileges = status["NoNewPrivs"] == "1"
        credentials.securebits = securebits
        return credentials
    }
}
