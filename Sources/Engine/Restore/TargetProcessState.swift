// The restored process's state beyond its memory (registers, signals, credentials, context, threads),
// restored by syscalls injected into it: TargetProcess's second half.
import Sys

extension TargetProcess {
    // MARK: State

    /// Descriptors, signal actions, pending signals, personality, rseq, seccomp, credentials, xstate, mask.
    func restoreState(_ state: ProcessState) throws(RestoreError) {
        do {
            try restoreSharedMemoryFiles(state)
            if !descriptorsRestored { try restoreDescriptors(state) }
            try restoreSignalActionsAndLimits(state)
            // Filters go in while the target still holds every capability (seccomp needs CAP_SYS_ADMIN or
            // no_new_privs); PTRACE_O_SUSPEND_SECCOMP keeps them from judging our later injections.
            for filter in state.seccompFilters {
                let programAddress = dataAddress + .pageSize
                try memory.write(filter.program, at: programAddress)
                var header: [UInt8] = []
                header.appendLittleEndian(UInt64(filter.program.count / 8))
                header.appendLittleEndian(programAddress)
                try memory.write(header, at: dataAddress)
                try injector.call("seccomp(SET_MODE_FILTER)", Syscall.seccomp, 1, filter.flags, dataAddress)
            }
            // Threads after the filters (a new thread inherits them) and before the credentials (clone3
            // with set_tid needs CAP_SYS_ADMIN, and each thread's credentials are its own).
            try createThreads(state.threads.dropFirst())
            for (threadState, threadInjector) in zip(state.threads, [injector] + otherThreads.map(\.injector)) {
                try restorePerThread(threadState, injector: threadInjector, isMain: threadInjector === injector)
            }
            // From here, not by injection: the tracer's own mask (the restorer may be pinned near its
            // tracee) is what the stub and its threads were created with, never the victim's.
            let online = CPUSet.online()
            for (threadState, threadTracee) in zip(state.threads, allTracees) {
                if let affinity = threadState.restoredAffinity(online: online) { try affinity.apply(to: threadTracee.processID) }
            }
            for pending in state.threads.flatMap({ thread in thread.pendingSignals.map { (thread.threadID, $0) } }) {
                try memory.write(pending.1.siginfo, at: dataAddress)
                try injector.call("rt_tgsigqueueinfo(\(pending.1.signal))", Syscall.rtTgsigqueueinfo,
                                  UInt64(state.processID.rawValue), UInt64(pending.0.rawValue), UInt64(pending.1.signal), dataAddress)
            }
            for pending in state.sharedPendingSignals {
                try memory.write(pending.siginfo, at: dataAddress)
                try injector.call("rt_sigqueueinfo(\(pending.signal))", Syscall.rtSigqueueinfo,
                                  UInt64(state.processID.rawValue), UInt64(pending.signal), dataAddress)
            }
            let context = ContextRestorer(injector: injector, memory: memory, dataAddress: dataAddress, processID: processID,
                                          workingDirectoryPath: try checkedPath(.workingDirectory, "the working directory \(state.context.workingDirectory)"),
                                          rootDirectoryPath: state.context.rootDirectory == "/" ? nil
                                              : try checkedPath(.rootDirectory, "the root directory \(state.context.rootDirectory)"))
            try context.restoreBeforeCredentials(state, threadInjectors: [injector] + otherThreads.map(\.injector))
            for threadInjector in [injector] + otherThreads.map(\.injector) {
                try CredentialRestorer(injector: threadInjector, memory: memory, dataAddress: dataAddress, processID: processID)
                    .restore(state.credentials)
            }
            try context.restoreAfterCredentials(state.context)
            // The extended state last: a syscall injected after it can change XSTATE_BV.
            for (threadState, threadInjector) in zip(state.threads, [injector] + otherThreads.map(\.injector)) {
                try threadInjector.tracee.setExtendedState(threadState.extendedState)
            }
        } catch {
            throw RestoreError(error)
        }
    }

    /// A shared-memory object's owner and mode (the target made it as root), and a mapped memfd's seals
    /// once every page of it is in (they are installed before the state, in every mode): set from here
    /// through the object's lowest mapping (map_files, opened for writing, which F_ADD_SEALS needs),
    /// F_SEAL_SEAL last. An object inherited from the parent has them already.
    func restoreSharedMemoryFiles(_ state: ProcessState) throws {
        var done: Set<Int32> = []
        for mapping in state.mappings {
            guard case .sharedMemory(let object) = mapping.kind, object.sysv == nil, done.insert(object.object).inserted else { continue }
            let path = ProcFS.path(of: processID, .mappedFile(start: mapping.start, end: mapping.end))
            do {
                let file = try ForeignDescriptor(openingForWriting: path)
                let identity = try file.identity()
                if identity.userID != object.userID || identity.groupID != object.groupID {
                    try file.changeOwner(userID: object.userID, groupID: object.groupID)
                }
                if identity.mode & 0o7777 != object.mode { try file.changeMode(object.mode) }
                guard object.memfdName != nil, !object.sealingForbidden, object.seals != 0 else { continue }
                let present = try file.seals()
                guard present != object.seals else { continue }
                let missing = object.seals & ~present
                if missing & ~SharedMemory.sealSeal != 0 { try file.addSeals(missing & ~SharedMemory.sealSeal) }
                if missing & SharedMemory.sealSeal != 0 { try file.addSeals(SharedMemory.sealSeal) }
            } catch {
                throw RestoreError.system("giving shared memory object \(object.object) at \(hex(mapping.start)) its owner, mode 0o\(String(object.mode, radix: 8)) and seals \(hex(UInt64(object.seals))): \(error)")
            }
        }
    }

    /// The process's own descriptors (a tree member's inherited ones are already there).
    func restoreDescriptors(_ state: ProcessState) throws {
        let taken = Set(renumbered.map(\.descriptor))
        let own = state.files.filter { inherited?.descriptors.contains($0.descriptor) != true && !taken.contains($0.descriptor) }
        let descriptors = DescriptorRestorer(injector: injector, memory: memory, dataAddress: dataAddress, processID: processID,
                                             reopenPaths: reopenPaths, treePipes: treePipes)
        try descriptors.restore(own)
        liveTCPSockets = descriptors.liveSockets
        descriptorsRestored = true
    }

    /// Creates each thread with its old TID: the main thread runs clone3(set_tid) from the scratch page;
    /// the new thread spins there until it is seized and interrupted, then waits, every signal blocked,
    /// for its own state.
    /// Signal actions, personality, name, parent-death signal and resource limits in one batch of
    /// injected syscalls (one stop, not some twenty to eighty): every record has its own place in the
    /// data area, written at once, and the loop's code and table follow them.
    private func restoreSignalActionsAndLimits(_ state: ProcessState) throws {
        typealias Call = SyscallInjector.BatchedCall
        var records: [UInt8] = []
        var calls: [Call] = []
        let recordsAddress = dataAddress + 256
        func place(_ bytes: [UInt8]) -> UInt64 {
            defer { records += bytes }
            return recordsAddress + UInt64(records.count)
        }
        for action in state.signalActions where !action.isDefault {
            var record: [UInt8] = []
            for word in [action.handler, action.flags, action.restorer, action.mask] { record.appendLittleEndian(word) }
            calls.append(Call("rt_sigaction(\(action.signal))", Syscall.rtSigaction, UInt64(action.signal), place(record), 0, 8))
        }
        calls.append(Call("personality", Syscall.personality, UInt64(state.personality)))
        calls.append(Call("prctl(PR_SET_NAME)", Syscall.prctl, 15, place(Array(state.commandName.utf8.prefix(15)) + [UInt8](repeating: 0, count: 16 - min(15, state.commandName.utf8.count)))))
        // Always: the stub was started with PDEATHSIG SIGKILL, so that it dies with a crashed restorer.
        calls.append(Call("prctl(PR_SET_PDEATHSIG)", Syscall.prctl, 1, UInt64(state.parentDeathSignal)))
        // Limits before credentials: lowering needs nothing, raising a hard limit needs the
        // restorer's privileges, which the target still has here.
        for limit in state.resourceLimits {
            var record: [UInt8] = []
            record.appendLittleEndian(limit.soft)
            record.appendLittleEndian(limit.hard)
            calls.append(Call("prlimit64(\(limit.resource))", Syscall.prlimit64, 0, UInt64(limit.resource), place(record), 0))
        }
        let tableAddress = dataAddress + 4 * .pageSize
        precondition(256 + records.count <= 4 * Int(UInt64.pageSize), "\(records.count) bytes of records overlap the batch table")
        precondition(tableAddress + UInt64(calls.count * SyscallInjector.batchEntryByteCount) <= scratchAddress + Self.scratchByteCount,
                     "\(calls.count) injected calls overflow the scratch area")
        try memory.write(SyscallInjector.batchLoopCode, at: dataAddress)
        try memory.write(records, at: recordsAddress)
        try injector.callBatch(calls, codeAddress: dataAddress, tableAddress: tableAddress, memory: memory)
    }

    private func createThreads(_ threads: ArraySlice<ThreadState>) throws {
        guard !threads.isEmpty else { return }
        let codeAddress = scratchAddress + 16
        try memory.write(threadCloneInstructions, at: codeAddress)
        let cloneInjector = SyscallInjector(tracee: tracee, instructionAddress: codeAddress, template: injector.template)
        cloneInjector.trapOffset = threadCloneTrapOffset
        let argumentsAddress = dataAddress + 2048
        let wantedAddress = argumentsAddress + 128
        for thread in threads {
            let known = Set(allTracees.map(\.processID))
            var arguments: [UInt8] = []
            // struct clone_args: flags, pidfd, child_tid, parent_tid, exit_signal, stack, stack_size, tls,
            // set_tid, set_tid_size, cgroup. CLONE_VM|FS|FILES|SIGHAND|THREAD|SYSVSEM; no stack: the new
            // thread only spins, and gets its own registers before it runs anything else.
            for word: UInt64 in [0x50f00, 0, 0, 0, 0, 0, 0, 0, wantedAddress, 1, 0] { arguments.appendLittleEndian(word) }
            try memory.write(arguments, at: argumentsAddress)
            var wanted: [UInt8] = []
            wanted.appendLittleEndian(Int32(thread.threadID.rawValue))
            try memory.write(wanted, at: wantedAddress)
            let result = try cloneInjector.raw("clone3(thread \(thread.threadID))", Syscall.clone3, [argumentsAddress, 88])
            if result == -Int64(ErrorNumber.fileExists) { throw RestoreError.processIDInUse(thread.threadID) }
            if result < 0 { throw RestoreError.system("clone3 for thread \(thread.threadID) failed: errno \(-result)") }
            // The new thread as this node numbers it.
            guard let created = try ProcFS.threadIDs(processID).first(where: { !known.contains($0) }) else {
                throw RestoreError.system("thread \(thread.threadID) was created but is not listed")
            }
            let threadTracee = try Tracee.seize(created)
            try threadTracee.interrupt()
            // Ends at the seize's event stop or the thread's death; other stops are resumed past.
            while true {
                let reason = try threadTracee.waitForStop()
                if case .event(Tracee.eventStop, _) = reason { break }
                if reason.isTerminal { throw RestoreError.system("thread \(thread.threadID) died while being seized: \(reason)") }
                try threadTracee.resume()
            }
            try threadTracee.setSignalMask(~UInt64(0))
            otherThreads.append((threadTracee, SyscallInjector(tracee: threadTracee, instructionAddress: scratchAddress,
                                                                template: try threadTracee.registers())))
        }
    }

    /// What each thread sets for itself: rseq, its robust futex list, its clear-child-tid word, its name.
    private func restorePerThread(_ thread: ThreadState, injector: SyscallInjector, isMain: Bool) throws {
        if let rseq = thread.rseq {
            try injector.call("rseq", Syscall.rseq, rseq.address, UInt64(rseq.byteCount), 0, UInt64(rseq.signature))
        }
        if thread.robustListHead != 0 {
            try injector.call("set_robust_list", Syscall.setRobustList, thread.robustListHead, thread.robustListLength)
        }
        try injector.call("set_tid_address", Syscall.setTidAddress, thread.clearChildTID)
        if !isMain && !thread.commandName.isEmpty {
            try memory.write(Array(thread.commandName.utf8.prefix(15)) + [0], at: dataAddress)
            try injector.call("prctl(PR_SET_NAME)", Syscall.prctl, 15, dataAddress)
        }
    }

}

extension TargetProcess {
    /// Writes bytes that came over the socket into the target (private file pages).
    func writeBytes(_ bytes: [UInt8], to address: UInt64) throws {
        try memory.write(bytes, at: address)
    }

    /// The one place where a page present in registered private memory is told apart from one another
    /// installer of ours put there. A read of the process's command line or environment
    /// (/proc/PID/cmdline, as ps does, by anyone) between the mmap of the stack and its registration
    /// faults the argument page in as the kernel's zero page, and UFFDIO_COPY then answers EEXIST, which an
    /// installer must take for "installed already" in post-copy (the fault handler, the pusher and torture's
    /// racer meet on pages): the process would run on a zeroed top stack page (a `ret` to 0). Once
    /// registered, no reader can fault a page in any more (the kernel refuses remote faults it cannot hand
    /// to the userfaultfd), so one look before the first install, in the step after the layout, finds every
    /// such page; every mode then writes each over with its dumped bytes (pwrite, as a page outside
    /// registered memory), and an EEXIST from then on is another installer's page. Returns them tagged with
    /// this process's `ordinal` in its tree (TreePageAddress), as the tree's page table names them.
    func checkStrayPages(ordinal: Int) throws(RestoreError) -> Set<UInt64> {
        precondition(strayPageAddresses == nil, "the look for stray pages made twice")
        let found = Set(try pagesPresentInPrivateRegisteredMemory())
        strayPageAddresses = found
        return Set(found.map { TreePageAddress.tagged($0, ordinal: ordinal) })
    }

    /// Pages present (or swapped) in the registered private mappings, read from pagemap: before any
    /// install, only a reader that faulted one in before the registration can have put them there.
    private func pagesPresentInPrivateRegisteredMemory() throws(RestoreError) -> [UInt64] {
        var addresses: [UInt64] = []
        do {
            for range in registeredRanges where !sharedRanges.contains(range) {
                addresses += try ProcFS.presentPageAddresses(processID, address: range.lowerBound,
                                                             pageCount: Int((range.upperBound - range.lowerBound) / .pageSize),
                                                             excludingFilePages: false)
            }
        } catch { throw .system("reading the target's pagemap: \(error)") }
        return addresses
    }

    /// A tree member cloned from its restored parent keeps what it inherited (`inherited`, and the parked
    /// ends of tree pipes), nothing else.
    /// What it holds at another number than its parent is moved there, first parked above every
    /// number, so that one move never lands on another's source.
    func keepInherited(_ inherited: Set<Int32>, state: ProcessState) throws {
        let present = try ProcFS.descriptors(processID)
        let base = (present + renumbered.map(\.descriptor)).max().map { UInt64($0) + 1 } ?? 0
        var moves: [(parked: Int32, to: RenumberedDescriptor)] = []
        for move in renumbered {
            moves.append((Int32(try injector.call("fcntl(F_DUPFD \(move.parentDescriptor))", Syscall.fcntl, UInt64(move.parentDescriptor), 0, base)), move))
        }
        for descriptor in present where !inherited.contains(descriptor) && !keptParkedDescriptors.contains(descriptor) {
            try injector.call("close(\(descriptor))", Syscall.close, UInt64(descriptor))
        }
        for (parked, move) in moves {
            let closeOnExec = (state.files.first { $0.descriptor == move.descriptor }?.flags ?? 0) & OpenFlag.closeOnExec
            try injector.call("dup3(\(move.descriptor))", Syscall.dup3, UInt64(parked), UInt64(move.descriptor), UInt64(UInt32(bitPattern: closeOnExec)))
            try injector.call("close", Syscall.close, UInt64(parked))
        }
    }
}
