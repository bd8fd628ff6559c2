// The state oracle: the restored target, read back before its first instruction, must hold exactly the
// checkpointed state. Each mismatch names the field.
import Engine
import Sys

public struct StateMismatch: Error, CustomStringConvertible, Sendable {
    public let field: String
    public let expected: String
    public let actual: String
    public var description: String { "\(field): expected \(expected), restored \(actual)" }
}

public enum StateOracle {
    /// Every difference between what was checkpointed and what was restored.
    public static func compare(checkpointed: ProcessState, restored: ProcessState) -> [StateMismatch] {
        var mismatches: [StateMismatch] = []
        func check<T: Equatable>(_ field: String, _ expected: T, _ actual: T, render: (T) -> String = { "\($0)" }) {
            if expected != actual { mismatches.append(StateMismatch(field: field, expected: render(expected), actual: render(actual))) }
        }
        check("pid", checkpointed.processID, restored.processID)
        check("executable", checkpointed.executablePath, restored.executablePath)
        check("command name", checkpointed.commandName, restored.commandName)
        check("thread count", checkpointed.threads.count, restored.threads.count)
        let online = CPUSet.online()
        for (expectedThread, actualThread) in zip(checkpointed.threads, restored.threads) {
            let prefix = "thread \(expectedThread.threadID)"
            let expectedWords = expectedResumeRegisters(expectedThread.registers).words
            let actualWords = actualThread.registers.words
            for (index, name) in GeneralRegisters.fieldNames.enumerated() where name != "orig_rax" {
                check("\(prefix) register \(name)", expectedWords[index], actualWords[index], render: hex)
            }
            if let offset = firstXStateDifference(expectedThread.extendedState, actualThread.extendedState) {
                mismatches.append(StateMismatch(field: "\(prefix) xstate",
                                                expected: "\(expectedThread.extendedState.count) bytes",
                                                actual: "\(actualThread.extendedState.count) bytes, first difference at byte \(offset)"))
            }
            check("\(prefix) signal mask", expectedThread.signalMask, actualThread.signalMask, render: hex)
            check("\(prefix) rseq", expectedThread.rseq, actualThread.rseq)
            check("\(prefix) tid", expectedThread.threadID, actualThread.threadID)
            check("\(prefix) robust list", expectedThread.robustListHead, actualThread.robustListHead, render: hex)
            check("\(prefix) robust list length", expectedThread.robustListLength, actualThread.robustListLength)
            check("\(prefix) clear-child-tid", expectedThread.clearChildTID, actualThread.clearChildTID, render: hex)
            check("\(prefix) name", expectedThread.commandName, actualThread.commandName)
            check("\(prefix) sigaltstack", expectedThread.signalStack, actualThread.signalStack)
            if let affinity = expectedThread.restoredAffinity(online: online) {
                check("\(prefix) CPU affinity", affinity, actualThread.cpuAffinity)
            }
            check("\(prefix) pending signals", expectedThread.pendingSignals.map(\.signal), actualThread.pendingSignals.map(\.signal))
            check("\(prefix) pending siginfo", expectedThread.pendingSignals, actualThread.pendingSignals) { "\($0.count) entries" }
        }
        let expectedActions = Dictionary(uniqueKeysWithValues: checkpointed.signalActions.map { ($0.signal, $0) })
        for action in restored.signalActions {
            check("sigaction \(action.signal)", expectedActions[action.signal], action)
        }
        // A timer armed at the freeze runs again from the restore on: one that had little time left may
        // have expired before this reading, its signal now pending (standard signals do not queue twice).
        let mayHaveFired = Set(timerMismatches(checkpointed.context.intervalTimers, restored.context.intervalTimers,
                                               restoredPendingSignals: Set(restored.sharedPendingSignals.map(\.signal)),
                                               into: &mismatches))
            .union(posixTimerMismatches(checkpointed.context.posixTimers, restored.context.posixTimers, into: &mismatches))
        let checkpointedSignals = Set(checkpointed.sharedPendingSignals.map(\.signal))
        // A POSIX timer's signal pending at the freeze is restored as a queued signal, not as the timer's
        // own: the timer's next expiry queues its own again, so one may be there twice.
        var keptCounts: [Int32: Int] = [:]
        let checkpointedCounts = Dictionary(checkpointed.sharedPendingSignals.map { ($0.signal, 1) }, uniquingKeysWith: +)
        let restoredPending = restored.sharedPendingSignals.filter { pending in
            guard mayHaveFired.contains(pending.signal) else { return true }
            guard checkpointedSignals.contains(pending.signal) else { return false }
            keptCounts[pending.signal, default: 0] += 1
            return keptCounts[pending.signal]! <= checkpointedCounts[pending.signal, default: 0]
        }
        check("shared pending signals", checkpointed.sharedPendingSignals, restoredPending) { "\($0.map(\.signal))" }
        check("mm fields", checkpointed.memoryDescriptor, restored.memoryDescriptor)
        check("personality", checkpointed.personality, restored.personality, render: { hex(UInt64($0)) })
        check("parent death signal", checkpointed.parentDeathSignal, restored.parentDeathSignal)
        check("credentials", checkpointed.credentials, restored.credentials)
        for (expected, actual) in zip(checkpointed.resourceLimits, restored.resourceLimits) {
            check("resource limit \(expected.resource)", expected, actual)
        }
        check("resource limit count", checkpointed.resourceLimits.count, restored.resourceLimits.count)
        check("seccomp mode", checkpointed.seccompMode, restored.seccompMode)
        check("seccomp filters", checkpointed.seccompFilters, restored.seccompFilters) { "\($0.count) filters" }
        let expectedLayout = coverage(checkpointed.mappings)
        let actualLayout = coverage(restored.mappings)
        if expectedLayout != actualLayout {
            mismatches.append(StateMismatch(field: "memory layout",
                                            expected: describe(expectedLayout.filter { !actualLayout.contains($0) }),
                                            actual: describe(actualLayout.filter { !expectedLayout.contains($0) })))
        }
        fileMismatches(checkpointed.files, restored.files, into: &mismatches)
        let expectedContext = checkpointed.context, actualContext = restored.context
        check("working directory", expectedContext.workingDirectory, actualContext.workingDirectory)
        check("root directory", expectedContext.rootDirectory, actualContext.rootDirectory)
        check("umask", expectedContext.fileCreationMask, actualContext.fileCreationMask) { "0o" + String($0, radix: 8) }
        check("oom_score_adj", expectedContext.oomScoreAdjustment, actualContext.oomScoreAdjustment)
        check("dumpable", expectedContext.dumpable, actualContext.dumpable)
        check("THP disable", expectedContext.transparentHugePagesDisabled, actualContext.transparentHugePagesDisabled)
        check("membarrier registrations", expectedContext.membarrierRegistrations, actualContext.membarrierRegistrations) { hex(UInt64($0)) }
        treeMismatches(checkpointed: checkpointed, restored: restored, into: &mismatches)
        return mismatches
    }

    /// The registers a thread frozen with `frozen` must resume with, from the kernel's own rules, written
    /// here apart from the engine's (an oracle that shares the engine's code shares its mistakes). A thread
    /// stopped inside a system call shows the call's number in orig_rax and, in rax, what the kernel will
    /// do on the way out: -ERESTARTSYS (512), -ERESTARTNOINTR (513) and -ERESTARTNOHAND (514) run the same
    /// call again when no handler is due, as after a stop; -ERESTART_RESTARTBLOCK (516) runs it again
    /// through restart_syscall, whose restart block stays in the source's kernel, so the image re-enters
    /// the original call (a relative sleep then sleeps in full). Re-running means: rip back over the
    /// two-byte `syscall` instruction, rax holding the call number. Any other rax (a call that returned, or
    /// no call: orig_rax -1) resumes as it was. orig_rax is not compared.
    static func expectedResumeRegisters(_ frozen: GeneralRegisters) -> GeneralRegisters {
        var expected = frozen
        let restartCodes: Set<Int64> = [-512, -513, -514, -516]
        if Int64(bitPattern: frozen.origRax) >= 0, restartCodes.contains(Int64(bitPattern: frozen.rax)) {
            expected.rip = frozen.rip &- 2
            expected.rax = frozen.origRax
        }
        return expected
    }

    /// A thread that is to re-run its interrupted call must resume on a `syscall` instruction (0f 05):
    /// read from the restored process itself, so a rewind by the wrong length is caught even where the
    /// expected registers were derived wrongly.
    public static func restartsLandOnSyscall(processID: ProcessID, checkpointed: ProcessState, restored: ProcessState) -> [StateMismatch] {
        var mismatches: [StateMismatch] = []
        for (frozen, thread) in zip(checkpointed.threads, restored.threads)
        where expectedResumeRegisters(frozen.registers).rip != frozen.registers.rip {
            let bytes = (try? readProcessMemory(processID, address: thread.registers.rip, byteCount: 2)) ?? []
            if bytes != [0x0f, 0x05] {
                mismatches.append(StateMismatch(field: "thread \(frozen.threadID) restart", expected: "a syscall instruction at rip \(hex(thread.registers.rip))",
                                                actual: bytes.isEmpty ? "unreadable" : bytes.map { hex(UInt64($0)) }.joined(separator: " ")))
            }
        }
        return mismatches
    }

    /// The XSAVE header's XSTATE_BV (bytes 512..<520 of the standard format) says which components the
    /// CPU tracks as in use, not what they hold: the processor may drop a component back to its init
    /// state (init optimisation) whenever the thread is switched out, so the same registers read back
    /// with other bits under load. The kernel's ptrace copy writes a component's init values where its
    /// bit is clear, so comparing every other byte compares the registers themselves: a component
    /// wrongly left at init still differs in its bytes. Returns the first differing byte offset, or nil.
    static func firstXStateDifference(_ expected: [UInt8], _ actual: [UInt8]) -> Int? {
        let header = 512..<520
        if expected.count != actual.count { return min(expected.count, actual.count) }
        return zip(expected, actual).enumerated().first { !header.contains($0.offset) && $0.element.0 != $0.element.1 }?.offset
    }

    /// How far a restored timer's time left may be from the checkpointed one. ITIMER_REAL counts wall
    /// time from its setitimer in the restore to this reading (the restore and the schedule between its
    /// steps); a CPU timer loses the CPU time the target spends meanwhile, and setitimer adds a tick to it
    /// (at most 10 ms: HZ >= 100) so that it never fires early.
    static let realTimerSlackMicroseconds: UInt64 = 2_000_000
    static let cpuTimerSlackMicroseconds: UInt64 = 1_000_000
    static let cpuTimerTickMicroseconds: UInt64 = 10_000

    /// Compares the interval timers; returns the signals of those that may have expired since the
    /// restore armed them.
    static func timerMismatches(_ expected: [IntervalTimer], _ actual: [IntervalTimer], restoredPendingSignals: Set<Int32>,
                                into mismatches: inout [StateMismatch]) -> [Int32] {
        guard expected.map(\.kind) == actual.map(\.kind) else {
            mismatches.append(StateMismatch(field: "interval timers", expected: "\(expected)", actual: "\(actual)"))
            return []
        }
        var mayHaveFired: [Int32] = []
        for (wanted, got) in zip(expected, actual) {
            func mismatch(_ what: String) {
                mismatches.append(StateMismatch(field: "interval timer \(wanted.kind)\(what)", expected: "\(wanted)", actual: "\(got)"))
            }
            if wanted.intervalMicroseconds != got.intervalMicroseconds { mismatch(" interval") }
            guard wanted.isArmed else {
                // Expired and waiting for its signal to be taken (ITIMER_REAL re-arms at dequeue); restored
                // so, it may not have expired yet, with at most 1 us left (getitimer's floor).
                let waitsForDequeue = wanted.intervalMicroseconds != 0 && got.valueMicroseconds <= 1
                if got.isArmed && !waitsForDequeue { mismatch(" armed") }
                continue
            }
            let slack = wanted.kind == .real ? realTimerSlackMicroseconds : cpuTimerSlackMicroseconds
            let upper = wanted.valueMicroseconds + (wanted.kind == .real ? 0 : cpuTimerTickMicroseconds)
            let lower = wanted.valueMicroseconds > slack ? wanted.valueMicroseconds - slack : 1
            if got.valueMicroseconds >= lower && got.valueMicroseconds <= upper {
                // Read with little left, it may expire before the pending signals are read a moment
                // later (seen on a loaded machine: SIGALRM pending, the timer read as still running).
                if got.valueMicroseconds <= slack && restoredPendingSignals.contains(wanted.kind.signal) { mayHaveFired.append(wanted.kind.signal) }
                continue
            }
            // Expired meanwhile: a periodic CPU timer was reloaded with its interval; ITIMER_REAL and a
            // one-shot timer are off, their signal pending (else the timer was lost, not expired).
            let expired = wanted.valueMicroseconds <= slack && got.valueMicroseconds <= wanted.intervalMicroseconds
                && (got.isArmed || restoredPendingSignals.contains(wanted.kind.signal))
            if expired {
                mayHaveFired.append(wanted.kind.signal)
            } else {
                mismatch(" time left")
            }
        }
        return mayHaveFired
    }

    /// Compares the POSIX timers: the same IDs, each with the same clock, notification, signal, value and
    /// period; its time left may be lower by the slack (it runs from its timer_settime in the restore), and
    /// one with little left, or a periodic one, may have expired meanwhile. Returns the signals of the
    /// process-directed ones that may have fired (their signal may be pending in the restored process).
    static func posixTimerMismatches(_ expected: [PosixTimer], _ actual: [PosixTimer], into mismatches: inout [StateMismatch]) -> [Int32] {
        guard expected.map(\.id) == actual.map(\.id) else {
            mismatches.append(StateMismatch(field: "POSIX timers", expected: "IDs \(expected.map(\.id))", actual: "IDs \(actual.map(\.id))"))
            return []
        }
        let slack = descriptorTimerSlackNanoseconds
        var mayHaveFired: [Int32] = []
        for (wanted, got) in zip(expected, actual) {
            var comparable = got
            comparable.valueNanoseconds = wanted.valueNanoseconds
            if comparable != wanted {
                mismatches.append(StateMismatch(field: "POSIX timer \(wanted.id)", expected: "\(wanted)", actual: "\(got)"))
                continue
            }
            let periodic = wanted.intervalNanoseconds != 0
            let problem: String?
            if !wanted.isArmed {
                // A periodic one expired and waiting for its signal to be taken is armed again 1 ns ahead.
                problem = got.isArmed && !(periodic && got.valueNanoseconds <= wanted.intervalNanoseconds) ? "a disarmed timer runs" : nil
            } else if got.isArmed && got.valueNanoseconds <= wanted.valueNanoseconds && wanted.valueNanoseconds - got.valueNanoseconds <= slack {
                problem = nil
            } else if got.isArmed && got.valueNanoseconds > wanted.valueNanoseconds && !(periodic && got.valueNanoseconds <= wanted.intervalNanoseconds) {
                problem = "more time left than at the checkpoint"
            } else if wanted.valueNanoseconds > slack && !(periodic && wanted.intervalNanoseconds <= slack) {
                problem = got.isArmed ? "time left lost" : "an armed timer was disarmed"
            } else if !periodic {
                problem = got.isArmed ? "a one-shot timer re-armed" : nil
            } else {
                problem = got.valueNanoseconds <= wanted.intervalNanoseconds ? nil : "re-armed beyond its interval"
            }
            if let problem {
                mismatches.append(StateMismatch(field: "POSIX timer \(wanted.id) time left", expected: "\(wanted)", actual: "\(got): \(problem)"))
            }
            let mayFire = wanted.valueNanoseconds <= slack || (periodic && wanted.intervalNanoseconds <= slack) || !wanted.isArmed
            if mayFire, case .signal = wanted.notification { mayHaveFired.append(wanted.signal) }
        }
        return mayHaveFired
    }

    /// How far a restored timerfd's time left may be below the checkpointed one (the restore and the
    /// schedule between its steps); it may never be above.
    static let descriptorTimerSlackNanoseconds: UInt64 = 2_000_000_000

    /// Every descriptor must come back with the same number, kind, flags, offset and everything it
    /// holds: buffered pipe bytes, queued messages, a counter, a mask, a carried file's bytes and seals,
    /// an epoll set's registrations. A timerfd runs on from its restore: its time left may be lower by the
    /// slack, and it may have expired meanwhile (more ticks, time left wrapped to the interval).
    static func fileMismatches(_ expected: [OpenFile], _ actual: [OpenFile], into mismatches: inout [StateMismatch]) {
        if expected.map(\.descriptor) != actual.map(\.descriptor) {
            mismatches.append(StateMismatch(field: "open descriptors", expected: "\(expected.map(\.descriptor))", actual: "\(actual.map(\.descriptor))"))
            return
        }
        for (wanted, got) in zip(expected, actual) {
            let field = "fd \(wanted.descriptor) (\(wanted.kind.name))"
            func mismatch(_ what: String, _ expectedText: String, _ actualText: String) {
                mismatches.append(StateMismatch(field: field + what, expected: expectedText, actual: actualText))
            }
            if case .timer(let wantedTimer) = wanted.kind, case .timer(let gotTimer) = got.kind {
                var comparable = got
                comparable.kind = wanted.kind
                if comparable != wanted { mismatch("", "\(wanted)", "\(got)") }
                if let problem = timerProblem(wantedTimer, gotTimer) { mismatch(" timer", "\(wantedTimer)", "\(gotTimer): \(problem)") }
                continue
            }
            if case .tcpSocket(let wantedSocket) = wanted.kind, case .tcpSocket(let gotSocket) = got.kind {
                var comparable = got
                comparable.kind = wanted.kind
                if comparable != wanted { mismatch("", "\(wanted)", "\(got)") }
                if let problem = tcpSocketProblem(wantedSocket, gotSocket) { mismatch(" socket", describe(wanted.kind), "\(describe(got.kind)): \(problem)") }
                continue
            }
            guard wanted != got else { continue }
            if wanted.kind.name != got.kind.name { mismatch(" kind", wanted.kind.name, got.kind.name); continue }
            if wanted.path != got.path { mismatch(" path", wanted.path, got.path) }
            if wanted.flags != got.flags { mismatch(" flags", "0o" + String(wanted.flags, radix: 8), "0o" + String(got.flags, radix: 8)) }
            if wanted.position != got.position { mismatch(" offset", "\(wanted.position)", "\(got.position)") }
            if wanted.kind != got.kind { mismatch(" contents", describe(wanted.kind), describe(got.kind)) }
        }
    }

    static func timerProblem(_ wanted: TimerDescriptor, _ got: TimerDescriptor) -> String? {
        if wanted.clock != got.clock || wanted.settimeFlags != got.settimeFlags || wanted.intervalNanoseconds != got.intervalNanoseconds {
            return "clock, flags or interval differ"
        }
        if got.ticks < wanted.ticks { return "ticks were lost" }
        if wanted.valueNanoseconds == 0 { return got.valueNanoseconds == 0 && got.ticks == wanted.ticks ? nil : "a disarmed timer runs" }
        if got.ticks == wanted.ticks {
            if got.valueNanoseconds == 0 { return "an armed timer was disarmed" }
            if got.valueNanoseconds > wanted.valueNanoseconds { return "more time left than at the checkpoint" }
            return wanted.valueNanoseconds - got.valueNanoseconds <= descriptorTimerSlackNanoseconds ? nil : "time left lost"
        }
        // Expired since the restore armed it: only if little time was left, and then it is off (one-shot)
        // or re-armed within its interval.
        if wanted.valueNanoseconds > descriptorTimerSlackNanoseconds { return "expired though much time was left" }
        if wanted.intervalNanoseconds == 0 { return got.valueNanoseconds == 0 ? nil : "a one-shot timer re-armed" }
        return got.valueNanoseconds <= wanted.intervalNanoseconds ? nil : "re-armed beyond its interval"
    }

    static func describe(_ kind: OpenFileKind) -> String {
        switch kind {
        case .deletedFile(let file): "\(file.contents.count) bytes, mode 0o\(String(file.mode, radix: 8)), owner \(file.userID):\(file.groupID), digest \(hex(digest(file.contents)))"
        case .memfd(let name, let file, let seals): "memfd \(name), \(file.contents.count) bytes, mode 0o\(String(file.mode, radix: 8)), seals \(hex(UInt64(seals))), digest \(hex(digest(file.contents)))"
        case .treePipe(let end): "tree pipe \(end.pipe) \(end.isReadEnd ? "read" : "write") end, capacity \(end.capacityByteCount), \(end.buffered.count) bytes buffered, digest \(hex(digest(end.buffered)))"
        case .pipe(let end): "channel \(end.channel) \(end.isReadEnd ? "read" : "write") end, capacity \(end.capacityByteCount), \(end.buffered.count) bytes buffered, digest \(hex(digest(end.buffered)))"
        case .tcpSocket(let end): tcpDescription(end)
        case .unixSocket(let end): "type \(end.type), peer \(end.peer), \(end.queued.count) messages of \(end.queued.map(\.count)) bytes, digest \(hex(digest(end.queued.flatMap { $0 }))), shutdown \(end.shutdown), buffers \(end.sendBufferByteCount)/\(end.receiveBufferByteCount)"
        default: "\(kind)"
        }
    }

    /// FNV-1a, to name a content difference without printing the contents.
    static func digest(_ bytes: [UInt8]) -> UInt64 {
        bytes.reduce(0xcbf2_9ce4_8422_2325) { ($0 ^ UInt64($1)) &* 0x100_0000_01b3 }
    }

    /// Mappings with adjacent, alike VMAs merged (same kind, sharing, protection and madvise flags; files at
    /// contiguous offsets): the kernel merges such neighbours when the restorer maps them one by one.
    /// The heap is anonymous memory the kernel labels by the brk range: an anonymous VMA right before it
    /// (a static program's bss when brk is not randomised) merges with it, and the whole shows as heap.
    static func coverage(_ mappings: [Mapping]) -> [Mapping] {
        func anonymousLike(_ kind: MappingKind) -> Bool { kind == .anonymous || kind == .heap }
        var result: [Mapping] = []
        for mapping in mappings {
            if var last = result.last, last.end == mapping.start,
               last.kind == mapping.kind || anonymousLike(last.kind) && anonymousLike(mapping.kind),
               last.shared == mapping.shared, last.protection == mapping.protection, last.advice == mapping.advice,
               last.mayWrite == mapping.mayWrite {
                if mapping.kind == .heap { last.kind = .heap }
                let contiguous: Bool
                switch mapping.kind {
                case .file, .sharedMemory: contiguous = last.fileOffset + last.byteCount == mapping.fileOffset
                default: contiguous = true
                }
                if contiguous {
                    last.end = mapping.end
                    result[result.count - 1] = last
                    continue
                }
            }
            result.append(mapping)
        }
        return result
    }

    static func describe(_ mappings: [Mapping]) -> String {
        mappings.map { "\(hex($0.start))-\(hex($0.end)) \($0.kind)" + ($0.advice.isEmpty ? "" : " [\($0.advice)]") }.joined(separator: ", ")
    }
}
