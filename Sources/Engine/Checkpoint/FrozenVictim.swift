// The victim between freeze and release: seized and stopped by the dumper's thread, its state read
// through ptrace, /proc and a few injected syscalls, and its dirty pages listed from pagemap.
//
// Until the commit record the victim is the only copy of the process, so the tracer's death (fammig
// killed, SIGKILL included) must leave it as it was, running on: it is seized without
// PTRACE_O_EXITKILL and frozen in a group-stop (SIGSTOP), so the kernel's detach of a dead tracer
// leaves it stopped; a guard process (Sys/SourceGuard.swift) that logged its original registers,
// signal masks and code before every change puts them back and sends the SIGCONT. Injected queries
// end at their syscall's exit stop, not at an int3, so a tracer death there leaves no SIGTRAP to kill
// it. Once the image is committed, EXITKILL is set and the guard kills the victim instead.
import Sys

/// A seized, stopped victim: every thread. Every method must run on the thread that called `freeze`.
final class FrozenVictim {
    let processID: ProcessID
    /// The main thread's, then the other threads' in the order /proc lists them.
    private(set) var tracees: [Tracee]
    var tracee: Tracee { tracees[0] }
    private(set) var isReleased = false
    /// A process frozen as part of its tree (FrozenTree): its children are the tree's, not a refusal.
    var isTreeMember = false
    /// Undoes what this tracer changed if it dies before the commit record (see the top of the file).
    let sourceGuard: SourceGuard
    /// Whether the freeze sent the SIGSTOP (the victim ran): a release that lets it run sends SIGCONT.
    /// A victim found stopped already (a workload frozen at a system call) stays stopped, as it was.
    private let stoppedByFreeze: Bool

    private init(processID: ProcessID, tracee: Tracee, sourceGuard: SourceGuard, stoppedByFreeze: Bool) {
        self.processID = processID
        self.tracees = [tracee]
        self.sourceGuard = sourceGuard
        self.stoppedByFreeze = stoppedByFreeze
    }

    /// PTRACE_SEIZE of every thread (without EXITKILL) and a SIGSTOP, then waits for each thread's
    /// group-stop (a victim stopped already, or frozen without `groupStop`, is interrupted instead: a
    /// dead tracer then leaves it running with whatever it was given). Threads are listed again until
    /// no new one appeared: a stopped thread creates none. The group-stop is what the victim's parent
    /// sees (SIGCHLD, CLD_STOPPED, and CLD_CONTINUED when it runs on).
    /// `sourceGuard`: one started for `processID` before the freeze (a fork is milliseconds of downtime
    /// otherwise), or nil to start it here.
    static func freeze(_ processID: ProcessID, groupStop: Bool = true, sourceGuard preparedGuard: SourceGuard? = nil) throws(CheckpointError) -> FrozenVictim {
        // A victim detached with SIGSTOP a moment ago (a workload frozen at a system call) may not be
        // stopped yet: its SIGSTOP pending says it will be, and then it stays stopped, as it was meant to.
        let status = (try? ProcFS.status(processID)) ?? [:]
        let stopPending = ["SigPnd", "ShdPnd"].contains { (status[$0].flatMap { UInt64($0, radix: 16) } ?? 0) & (1 << (SignalNumber.stop - 1)) != 0 }
        let waitsForGroupStop = groupStop && !(status["State"] ?? "").hasPrefix("T")
        let sendsStop = waitsForGroupStop && !stopPending
        let sourceGuard: SourceGuard
        if let preparedGuard {
            precondition(preparedGuard.victimProcessID == processID, "the guard of \(preparedGuard.victimProcessID) for \(processID)")
            sourceGuard = preparedGuard
        } else {
            do { sourceGuard = try SourceGuard(victim: processID) } catch { throw .system(processID, "starting its guard: \(error)") }
        }
        let main: Tracee
        do { main = try Tracee.seize(processID, killedWithTracer: false) } catch {
            sourceGuard.disarm()
            // A process that ended just now (a zombie refuses PTRACE_SEIZE with EPERM) is gone, not forbidden.
            if (error as? SyscallError)?.errno == .noSuchProcess || ProcFS.isKilledOrEnded(processID) { throw .noSuchProcess(processID) }
            throw .system(processID, "\(error)")
        }
        let victim = FrozenVictim(processID: processID, tracee: main, sourceGuard: sourceGuard, stoppedByFreeze: sendsStop)
        do {
            if sendsStop {
                sourceGuard.willStopVictim()
                Spawn.kill(processID, signal: SignalNumber.stop)
            }
            try stop(main, processID: processID, groupStop: waitsForGroupStop)
            // Ends when a listing finds no thread not yet stopped: a stopped thread creates none, so the
            // rounds are bounded by the threads the victim can start before each one is seized.
            while true {
                let known = Set(victim.tracees.map(\.processID))
                let listed = try ProcFS.threadIDs(processID).filter { !known.contains($0) }
                if listed.isEmpty { break }
                for threadID in listed {
                    // A thread may exit between the listing and the seize: skip it.
                    guard let thread = try? Tracee.seize(threadID, killedWithTracer: false) else { continue }
                    victim.tracees.append(thread)
                    try stop(thread, processID: processID, groupStop: waitsForGroupStop)
                }
            }
            return victim
        } catch let error as CheckpointError {
            victim.letGo()
            throw error
        } catch {
            victim.letGo()
            throw .system(processID, "\(error)")
        }
    }

    /// Waits for one seized thread's group-stop (`groupStop`: the freeze's SIGSTOP is on its way), or
    /// interrupts it and waits for its interrupt stop; a signal that arrives first is delivered (the
    /// victim handles it before the freeze) rather than lost.
    private static func stop(_ tracee: Tracee, processID: ProcessID, groupStop: Bool) throws {
        if !groupStop { try tracee.interrupt() }
        for _ in 0..<1000 {
            let reason = try tracee.waitForStop()
            switch reason {
            case .event(Tracee.eventStop, let signal) where !groupStop || signal == SignalNumber.stop: return
            case .event: try tracee.resume()
            case .signal(let signal): try tracee.resume(signal: signal)
            case .syscall: try tracee.resume()
            case .exited, .killed: throw CheckpointError.victimDied(processID, reason: "\(reason)")
            }
        }
        throw CheckpointError.system(processID, "no interrupt stop after 1000 other stops")
    }

    private func detachAll() {
        for tracee in tracees where tracee.isAttached { try? tracee.detach() }
    }

    /// Detaches every thread and lets the victim run on as before the freeze; the guard has nothing
    /// left to do.
    private func letGo() {
        detachAll()
        if stoppedByFreeze { Spawn.kill(processID, signal: SignalNumber.continue) }
        sourceGuard.disarm()
    }

    /// Neither running on nor killed: every thread detached in its group-stop (it stays stopped until a
    /// SIGCONT), the guard disarmed. For a hand-over whose outcome this node cannot know.
    func leaveStopped() {
        guard !isReleased else { return }
        isReleased = true
        detachAll()
        sourceGuard.disarm()
    }

    /// Whether the image holding this victim is complete (`committed`).
    var isCommitted: Bool { sourceGuard.isCommitted }

    /// The commit record is about to be stored: a dead tracer from now on leaves the victim stopped.
    func committing() { sourceGuard.committing() }

    /// The image is complete: from now on the tracer's death kills the victim (EXITKILL), and so does
    /// the guard's (for a tracee the option could not be set on).
    func committed() {
        sourceGuard.committed()
        for tracee in tracees where tracee.isAttached { try? tracee.setKilledWithTracer(true) }
    }

    /// What the kernel does to this victim when its tracer dies: every thread detached where it
    /// stopped, nothing put back. Then the guard acts, as on its owner's death (without `resume`, it
    /// leaves the victim stopped rather than sending SIGCONT). Torture's nemesis kills the source node
    /// this way (its tracer is the driver's own thread, which lives on).
    package func loseTracer(resume: Bool = true) {
        guard !isReleased else { return }
        isReleased = true
        if sourceGuard.isCommitted {
            Tracee.killAndWait(tracees, processID: processID)
            sourceGuard.disarm()
            return
        }
        detachAll()
        sourceGuard.actNow(resume: resume)
    }

    /// Reads everything but page contents. Leaves the victim exactly as it was (registers, memory).
    /// `mappingFlags`: what the dumper read before the freeze (used if the mappings did not change).
    func capture(mappingFlags: StateReader.MappingFlags? = nil) throws(CheckpointError) -> ProcessState {
        do {
            return try captureThrowing(mappingFlags: mappingFlags)
        } catch let error as CheckpointError {
            throw error
        } catch {
            if !ProcFS.isAlive(processID) { throw .victimDied(processID, reason: "\(error)") }
            throw .system(processID, "\(error)")
        }
    }

    /// Refusals found only now (a child forked after the preflight, a dumpable flag prctl cannot set) throw
    /// before anything was written anywhere: the dumper's abort detaches the victim, which runs on.
    private func captureThrowing(mappingFlags: StateReader.MappingFlags?) throws -> ProcessState {
        if !isTreeMember { try Preflight.checkNoChildren(processID) }
        try lockOutsideConnections()
        let registers = try tracee.registers()
        let signalMask = try tracee.signalMask()
        let injected = try injectQueries(registers: registers, signalMask: signalMask)
        // A tree numbers its pipes' lone ends (FrozenTree.capture); a process alone refuses them.
        let state = try StateReader.read(tracees: tracees, processID: processID, injected: injected, mappingFlags: mappingFlags,
                                         allowingLoneEnds: isTreeMember)
        try ContextReader.checkRestorable(state, processID: processID)
        try Preflight.checkAdvice(state.mappings, processID: processID)
        try recordTCPSocketsWithGuard(state.files)
        try detachTCPSockets(state.files)
        return state
    }

    /// Runs StateReader's injected queries from a scratch mapping that is removed again, with every
    /// signal blocked meanwhile; the victim's code, mask and registers are put back afterwards.
    private func injectQueries(registers: GeneralRegisters, signalMask: UInt64) throws -> InjectedAnswers {
        let memory = try ProcessMemory(processID, writable: true)
        defer { memory.close() }
        let mappings = try Preflight.mappings(processID)
        let scratchByteCount: UInt64 = 4 * .pageSize
        guard let scratch = AddressSpace.freeRange(byteCount: scratchByteCount, avoiding: mappings.map { ($0.start, $0.end) }) else {
            throw CheckpointError.system(processID, "no free address range for a scratch mapping")
        }
        let originalCode = try memory.read(at: registers.rip, byteCount: syscallTrapInstruction.count)
        // Logged before each change, so that a guard acting on a dead tracer puts back the originals.
        sourceGuard.recordThread(tracee.processID, registers: registers, signalMask: signalMask)
        sourceGuard.recordCode(originalCode, at: registers.rip)
        sourceGuard.recordScratch(address: scratch, byteCount: scratchByteCount)
        try tracee.setSignalMask(~UInt64(0))
        let injector = SyscallInjector(tracee: tracee, instructionAddress: registers.rip, template: registers)
        injector.endsAtSyscallExit = true
        defer {
            try? memory.write(originalCode, at: registers.rip)
            try? tracee.setRegisters(registers)
            // Back to an interrupt stop with its own registers, signals still blocked, then its mask.
            try? injector.park()
            try? tracee.setSignalMask(signalMask)
            sourceGuard.clearChanges()
        }
        try memory.write(syscallTrapInstruction, at: registers.rip)
        try injector.call("mmap(scratch)", Syscall.mmap, scratch, scratchByteCount, MemoryProtection.all.rawValue,
                               MapFlags.scratch.rawValue, UInt64.max, 0)
        defer { _ = try? injector.raw("munmap(scratch)", Syscall.munmap, [scratch, scratchByteCount]) }
        try memory.write(originalCode, at: registers.rip)
        try memory.write(syscallTrapInstruction, at: scratch)
        injector.instructionAddress = scratch
        // The other threads run their own queries from the scratch page too, signals blocked, and get
        // their registers and masks back.
        var others: [SyscallInjector] = []
        var saved: [(Tracee, GeneralRegisters, UInt64)] = []
        defer {
            for ((thread, threadRegisters, threadMask), threadInjector) in zip(saved, others) {
                try? thread.setRegisters(threadRegisters)
                try? threadInjector.park()
                try? thread.setSignalMask(threadMask)
            }
        }
        for thread in tracees.dropFirst() {
            let threadRegisters = try thread.registers()
            let threadMask = try thread.signalMask()
            sourceGuard.recordThread(thread.processID, registers: threadRegisters, signalMask: threadMask)
            saved.append((thread, threadRegisters, threadMask))
            try thread.setSignalMask(~UInt64(0))
            let threadInjector = SyscallInjector(tracee: thread, instructionAddress: scratch, template: threadRegisters)
            threadInjector.endsAtSyscallExit = true
            others.append(threadInjector)
        }
        return try StateReader.injectQueries(injector: injector, threadInjectors: others, memory: memory, dataAddress: scratch + .pageSize)
    }

    /// The pages to dump, read now that the victim cannot change them.
    func dirtyPageAddresses(mappings: [Mapping]) throws(CheckpointError) -> [UInt64] {
        try Preflight.dirtyPageAddresses(processID, mappings: mappings)
    }

    /// Ends the checkpoint: kills the victim (migration) or lets it run on (`--leave-running`).
    func release(kill: Bool) {
        guard !isReleased else { return }
        isReleased = true
        if kill {
            // The tracer sees each thread's death; the parent (maybe us) reaps the process.
            sourceGuard.committed()
            Tracee.killAndWait(tracees, processID: processID)
            sourceGuard.disarm()
        } else {
            reinstateTCPSockets()
            letGo()
        }
    }

    /// Local ports of connections whose peer is outside the victim, locked (Sys/NetworkLock.swift)
    /// before they are read; the target unlocks them once its sockets are live, or `release` does when
    /// the victim runs on.
    private(set) var lockedPorts: [UInt16] = []

    private func lockOutsideConnections() throws {
        // Reading every descriptor twice costs downtime: only a process with a socket can need a lock.
        let hasSocket = try ProcFS.descriptors(processID).contains {
            ((try? ProcFS.readLink(ProcFS.path(of: processID, .descriptor($0)))) ?? "").hasPrefix("socket:")
        }
        guard hasSocket else { return }
        let files = try Preflight.descriptors(processID)
        for (port, family) in TCPSocketRestorer.outsideConnectionPorts(files) {
            lockedPorts.append(port)  // first: a lock that fails half-way is undone too
            sourceGuard.recordLockedPort(port)
            try NetworkLock.lock(port: port, family: family)
        }
    }

    /// Before its sockets are disconnected, the guard learns how to give each back (the calls of
    /// `reinstate` and `goLive`, written down): a tracer that dies before the commit record then leaves
    /// the victim its connections, live, and its ports unlocked.
    private func recordTCPSocketsWithGuard(_ files: [OpenFile]) throws {
        for file in files {
            guard case .tcpSocket(let end) = file.kind else { continue }
            let rebuild = TCPSocketRecipe(), live = TCPSocketRecipe()
            try TCPSocketRestorer.reinstate(rebuild, end)
            if !end.isListening { try TCPSocketRestorer.goLive(live, end) }
            guard sourceGuard.recordTCPSocket(descriptor: file.descriptor, isConnection: !end.isListening, rebuild: rebuild, live: live) else {
                throw CheckpointError.system(processID, "more TCP sockets (or queued bytes) than the source guard can give back: fd \(file.descriptor)")
            }
        }
    }

    /// TCP sockets read at the capture and since disconnected (TCPSocketRestorer.detach).
    private var detachedSockets: [(descriptor: Int32, end: TCPSocketEnd)] = []

    /// Frees the address of every TCP socket just read, so that the target's can take it on this node
    /// (on one machine the two would collide: a connection's address pair, a listener's port); a
    /// connection, in repair mode since it was read, goes without a FIN or RST.
    private func detachTCPSockets(_ files: [OpenFile]) throws {
        for file in files {
            guard case .tcpSocket(let end) = file.kind else { continue }
            let socket = try ForeignDescriptor(processID: processID, remoteDescriptor: file.descriptor)
            try TCPSocketRestorer.detach(socket, end)
            detachedSockets.append((file.descriptor, end))
        }
    }

    /// The checkpoint was abandoned before the victim's end: its sockets become again what they were.
    private func reinstateTCPSockets() {
        var rebuilt: [(ForeignDescriptor, TCPSocketEnd)] = []
        for (descriptor, end) in detachedSockets {
            do {
                let socket = try ForeignDescriptor(processID: processID, remoteDescriptor: descriptor)
                try TCPSocketRestorer.reinstate(socket, end)
                if !end.isListening { rebuilt.append((socket, end)) }
            } catch {
                // Nothing better to do than say so: the victim runs on, this socket no longer connected.
                reportReinstateFailure(descriptor, end, error)
            }
        }
        for (socket, end) in rebuilt {
            do { try TCPSocketRestorer.goLive(socket, end) } catch { reportReinstateFailure(socket.descriptor, end, error) }
        }
        detachedSockets = []
        for port in lockedPorts { NetworkLock.unlock(port: port) }
        lockedPorts = []
    }

    /// What could not be given back to a victim that runs on (the dumper logs each).
    private(set) var reinstateProblems: [String] = []

    private func reportReinstateFailure(_ descriptor: Int32, _ end: TCPSocketEnd, _ error: any Error) {
        reinstateProblems.append("could not give the victim back its TCP socket fd \(descriptor) (\(end.local)): \(error)")
    }
}

extension Array where Element == UInt8 {
    func littleEndianWord(at offset: Int) -> UInt64 {
        var value: UInt64 = 0
        for index in 0..<8 { value |= UInt64(self[offset + index]) << (8 * index) }
        return value
    }
}
