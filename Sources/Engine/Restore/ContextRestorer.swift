// Gives the target the victim's process context (ProcessContext.swift). Two phases, because the
// credentials step in between changes what is allowed and what is kept: chdir must happen while the
// target still has the restorer's access to every directory; the dumpable flag must come after, since
// commit_creds resets it whenever the credentials lose capabilities or change IDs.
import Sys

struct ContextRestorer {
    let injector: SyscallInjector
    let memory: ProcessMemory
    let dataAddress: UInt64
    /// The target as this node numbers it (its /proc directory).
    let processID: ProcessID
    /// Where the working directory the access check resolved opens again (not its path, which may lead
    /// elsewhere by now).
    let workingDirectoryPath: String
    /// Where the root directory the access check resolved opens again; nil for this node's root.
    let rootDirectoryPath: String?

    /// cwd, root, umask, oom_score_adj, THP-disable, membarrier registrations, and each thread's sigaltstack (`threadInjectors` in the
    /// order of `state.threads`, main first).
    func restoreBeforeCredentials(_ state: ProcessState, threadInjectors: [SyscallInjector]) throws {
        let context = state.context
        try memory.write(Array(workingDirectoryPath.utf8) + [0], at: dataAddress)
        try injector.call("chdir(\(context.workingDirectory))", Syscall.chdir, dataAddress)
        // chroot after every open by path (descriptors, mappings, executable, working directory), and
        // while the target still has CAP_SYS_CHROOT; the working directory stays where chdir put it.
        if let rootDirectoryPath {
            try memory.write(Array(rootDirectoryPath.utf8) + [0], at: dataAddress)
            try injector.call("chroot(\(context.rootDirectory))", Syscall.chroot, dataAddress)
        }
        try injector.call("umask", Syscall.umask, UInt64(context.fileCreationMask))
        do {
            try ProcFS.writeText(ProcFS.path(of: processID, .oomScoreAdjustment), "\(context.oomScoreAdjustment)")
        } catch {
            throw RestoreError.system("setting oom_score_adj \(context.oomScoreAdjustment): \(error) (a value below the restorer's own needs CAP_SYS_RESOURCE)")
        }
        // PR_SET_THP_DISABLE(disable, flags): 3 is "disabled" with PR_THP_DISABLE_EXCEPT_ADVISED (1 << 1).
        let thp = UInt64(context.transparentHugePagesDisabled)
        try injector.call("prctl(PR_SET_THP_DISABLE)", Syscall.prctl, 41, thp & 1, thp & 2, 0, 0)
        for command in ProcessContext.membarrierRegistrationCommands where context.membarrierRegistrations & command != 0 {
            try injector.call("membarrier(register \(hex(UInt64(command))))", Syscall.membarrier, UInt64(command), 0, 0)
        }
        precondition(threadInjectors.count == state.threads.count, "one injector per thread")
        for (thread, threadInjector) in zip(state.threads, threadInjectors) where !thread.signalStack.isDisabled {
            try restoreSignalStack(thread.signalStack, injector: threadInjector)
        }
    }

    /// The dumpable flag, once the credentials are final; then the interval and POSIX timers, as late as the
    /// restore allows (ITIMER_REAL counts wall time from here), each with the time it had left at the
    /// freeze: the downtime does not count against it. A timer not armed then is disarmed here.
    func restoreAfterCredentials(_ context: ProcessContext) throws {
        try injector.call("prctl(PR_SET_DUMPABLE)", Syscall.prctl, 4, UInt64(context.dumpable))
        for var timer in context.intervalTimers {
            // No time left but an interval: ITIMER_REAL expired and waits for its SIGALRM to be taken
            // (it re-arms at dequeue; the signal is among the pending ones restored). setitimer with a
            // zero value would drop the interval too; one microsecond expires at once into that state.
            if timer.valueMicroseconds == 0 && timer.intervalMicroseconds != 0 { timer.valueMicroseconds = 1 }
            try memory.write(timer.itimerval, at: dataAddress)
            try injector.call("setitimer(\(timer.kind))", Syscall.setitimer, UInt64(timer.kind.rawValue), dataAddress, 0)
        }
        try restorePosixTimers(context.posixTimers)
    }

    /// Each POSIX timer with its own ID: with PR_TIMER_CREATE_RESTORE_IDS on, timer_create takes the ID
    /// written where it returns one (EBUSY if taken), so IDs need no filling of gaps; then armed with the
    /// time it had left. An expired periodic timer whose signal waits to be taken is armed 1 ns ahead.
    private func restorePosixTimers(_ timers: [PosixTimer]) throws {
        guard !timers.isEmpty else { return }
        let restoreIDs: UInt64 = 77, on: UInt64 = 1, off: UInt64 = 0
        do {
            try injector.call("prctl(PR_TIMER_CREATE_RESTORE_IDS, on)", Syscall.prctl, restoreIDs, on, 0, 0, 0)
        } catch {
            throw RestoreError.system("this kernel cannot create a POSIX timer with a given ID (PR_TIMER_CREATE_RESTORE_IDS, Linux 6.16): \(error)")
        }
        let eventAddress = dataAddress, idAddress = dataAddress + 64, settingAddress = dataAddress + 128
        for var timer in timers {
            try memory.write(timer.sigevent, at: eventAddress)
            var wanted: [UInt8] = []
            wanted.appendLittleEndian(timer.id)
            try memory.write(wanted, at: idAddress)
            try injector.call("timer_create(\(timer.id))", Syscall.timerCreate, UInt64(timer.clock), eventAddress, idAddress)
            let created = Int32(truncatingIfNeeded: try memory.read(at: idAddress, byteCount: 8).littleEndianWord(at: 0))
            guard created == timer.id else { throw RestoreError.system("timer_create gave POSIX timer \(created), not \(timer.id)") }
            if timer.valueNanoseconds == 0 && timer.intervalNanoseconds != 0 { timer.valueNanoseconds = 1 }
            guard timer.isArmed else { continue }
            try memory.write(timer.itimerspec, at: settingAddress)
            try injector.call("timer_settime(\(timer.id))", Syscall.timerSettime, UInt64(timer.id), 0, settingAddress, 0)
        }
        try injector.call("prctl(PR_TIMER_CREATE_RESTORE_IDS, off)", Syscall.prctl, restoreIDs, off, 0, 0, 0)
    }

    /// sigaltstack refuses (EPERM) to change the stack the thread is on, judged by its stack pointer:
    /// run it with the stack pointer on the scratch page, which no victim mapping overlaps.
    private func restoreSignalStack(_ stack: SignalStack, injector: SyscallInjector) throws {
        var record: [UInt8] = []
        record.appendLittleEndian(stack.address)
        record.appendLittleEndian(UInt64(stack.flags))  // int ss_flags, then 4 bytes of padding
        record.appendLittleEndian(stack.byteCount)
        try memory.write(record, at: dataAddress)
        let saved = injector.template
        defer { injector.template = saved }
        injector.template.rsp = dataAddress
        try injector.call("sigaltstack", Syscall.sigaltstack, dataAddress, 0)
    }
}
