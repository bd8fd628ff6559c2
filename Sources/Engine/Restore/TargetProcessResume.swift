// The last steps of a restored process: its state read back for the oracles, the scratch page gone,
// its registers and masks set, and then let go (TargetProcess.swift builds it).
import Sys

extension TargetProcess {
    /// With `readBack`, reads the rebuilt state back for the oracles (while the scratch page still
    /// exists); then removes the scratch page (running its munmap to the syscall-exit stop, since the
    /// int3 after it is gone) and sets the victim's mask and registers. The target is stopped, about to
    /// run the victim's next instruction; returns the state read back from it (nil without `readBack`:
    /// the read-back is some ninety injected syscalls, and only an oracle looks at it, so it is not
    /// part of the downtime when none does).
    func prepareToResume(_ state: ProcessState, readBack: Bool) throws(RestoreError) -> ProcessState? {
        do {
            let injected = readBack
                ? try StateReader.injectQueries(injector: injector, threadInjectors: otherThreads.map(\.injector),
                                                memory: memory, dataAddress: dataAddress)
                : nil
            let result = try injector.callToExitStop("munmap(scratch)", Syscall.munmap, scratchAddress, Self.scratchByteCount)
            guard result == 0 else { throw RestoreError.system("munmap(scratch) failed: \(result)") }
            for (thread, threadTracee) in zip(state.threads, allTracees) {
                try threadTracee.setSignalMask(thread.signalMask)
                try threadTracee.setRegisters(thread.registers.resumableAfterRestore)
            }
            // Read as the checkpoint was: a tree's pipe ends are numbered by the tree (TargetTree).
            return try StateReader.read(tracees: allTracees, processID: processID, injected: injected, allowingLoneEnds: true)
        } catch {
            throw RestoreError(error)
        }
    }

    /// Lets the restored process run.
    func resume() throws(RestoreError) {
        do {
            for (descriptor, end) in liveTCPSockets {
                try TCPSocketRestorer.goLive(try ForeignDescriptor(processID: processID, remoteDescriptor: descriptor), end)
            }
            // The source locked these connections' segments while they were away (FrozenVictim).
            for port in TCPSocketRestorer.outsideConnectionPorts(liveTCPSockets.map {
                OpenFile(descriptor: $0.descriptor, path: "", flags: 0, position: 0, kind: .tcpSocket($0.end))
            }) {
                NetworkLock.unlock(port: port.port)
            }
            for thread in otherThreads { try thread.tracee.detach() }
            try tracee.detach()
        } catch { throw .system("\(error)") }
        isResumed = true
        memory.close()
    }
}
