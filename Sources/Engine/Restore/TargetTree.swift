// The restored process tree (every mode): the root is the stub started as the victim's PID; every other
// process is cloned (clone3 with set_tid) from its own restored parent once that parent's layout and
// descriptors are rebuilt, so that it inherits what it inherited at the source (the same open file
// descriptions, the same shared memory objects) and keeps only that. Sessions and groups are made as
// each process is created (each after its leader); a zombie is cloned, led where it led, and made to end
// with its old status, unreaped. A single process is a tree of one, restored exactly as before.
import Sys

final class TargetTree {
    let root: TargetProcess
    /// One per member of the checkpointed state, in its order; nil for a zombie.
    private(set) var members: [TargetProcess?] = []
    /// This node's number for each member (a zombie's too), in the same order: the tree's own numbers
    /// (the records') are its root's PID namespace's, which a fresh namespace numbers apart.
    private var memberNodeProcessIDs: [ProcessID] = []

    var processID: ProcessID { root.processID }
    private var live: [TargetProcess] { [root] + members.compactMap { $0 } }

    private init(root: TargetProcess) { self.root = root }

    static func spawn(state: ProcessState, stubPath: String, pidNamespace: PIDNamespace) throws(RestoreError) -> TargetTree {
        // Like its PID, a SysV segment's ID is the victim's until the victim is gone: in this node's
        // namespace, wait as for a PID in use (a fresh PID namespace comes with a fresh IPC namespace).
        if pidNamespace == .shared, !SharedMemoryRestorer.sysvIdentifiersInUse(state).isEmpty { throw .processIDInUse(state.processID) }
        let others = state.liveMembers.flatMap { $0.mappings.map { ($0.start, $0.end) } }
        return TargetTree(root: try TargetProcess.spawn(state: state, stubPath: stubPath, pidNamespace: pidNamespace, avoiding: others))
    }

    /// Every process's descriptors to open through its checked files (by the tree's own PIDs).
    private var reopenPaths: [ProcessID: ReopenPaths] = [:]

    /// Opens each regular file, directory and FIFO through the file its access check resolved.
    func openThrough(_ checked: CheckedFiles, rootProcessID: ProcessID) {
        reopenPaths = checked.reopenPaths
        root.reopenPaths = checked.reopenPaths[rootProcessID] ?? ReopenPaths()
    }

    /// Kills every process made so far (members first), none left running on holes.
    func kill() {
        for member in members.reversed() { member?.kill() }
        root.kill()
    }

    // MARK: Layout and creation

    /// The root's layout, its leadership, and then, in order, every member: created from its parent,
    /// led, and laid out (a zombie ends right there).
    func buildLayout(_ state: ProcessState) throws(RestoreError) {
        try root.buildLayout(state)
        guard state.lineage.isRecorded else { return }
        do {
            try lead(root, ownID: state.processID, state.lineage, parentGroup: nil, rootGroup: nil)
            if state.members.isEmpty { return }
            let treePipes = TreePipeRestore(state)
            root.treePipes = treePipes.map { ($0, state.processID) }
            try root.restoreDescriptors(state)
            // The parked ends of tree pipes each process holds (made there, or inherited), by this node's PID.
            var parkedHeld: [ProcessID: Set<Int32>] = [root.processID: treePipes?.parkedDescriptors(madeBy: state.processID) ?? []]
            let restoredRootGroup = try ProcessTreeFS.fields(root.processID).ownProcessGroupID
            // By the tree's own numbers, which the records use.
            var byProcessID: [ProcessID: TargetProcess] = [state.processID: root]
            for member in state.members {
                let lineage = member.lineage
                guard let parent = byProcessID[lineage.parentProcessID] else {
                    preconditionFailure("member \(member.processID)'s parent was validated but not created")
                }
                let child = try clone(member.processID, from: parent, exitSignal: lineage.exitSignal)
                parkedHeld[child.processID] = parkedHeld[parent.processID] ?? []
                members.append(child)
                memberNodeProcessIDs.append(child.processID)
                let parentGroup = try ProcessTreeFS.fields(parent.processID).ownProcessGroupID
                try lead(child, ownID: member.processID, lineage, parentGroup: parentGroup,
                         rootGroup: state.lineage.processGroupID == state.processID ? nil : (state.lineage.processGroupID, restoredRootGroup))
                switch member {
                case .zombie(let zombie):
                    try end(child, ownID: member.processID, status: zombie.waitStatus)
                    members[members.count - 1] = nil
                    try drainChildSignal(parent, signal: lineage.exitSignal)
                case .live(let memberState):
                    child.inherited = (Set(lineage.inheritedDescriptors), Set(lineage.inheritedMappingStarts))
                    child.renumbered = lineage.renumberedDescriptors
                    child.keptParkedDescriptors = parkedHeld[child.processID] ?? []
                    child.treePipes = treePipes.map { ($0, member.processID) }
                    // Before the layout: its executable and file mappings open through their checked files too.
                    child.reopenPaths = reopenPaths[member.processID] ?? ReopenPaths()
                    try child.buildLayout(memberState)
                    try child.restoreDescriptors(memberState)
                    parkedHeld[child.processID, default: []].formUnion(treePipes?.parkedDescriptors(madeBy: member.processID) ?? [])
                    byProcessID[member.processID] = child
                }
            }
            // Every holder has taken its ends: the parked ones go, in every process that holds them.
            for process in live {
                for descriptor in (parkedHeld[process.processID] ?? []).sorted() {
                    try process.injector.call("close(\(descriptor))", Syscall.close, UInt64(descriptor))
                }
            }
        } catch let error as RestoreError {
            throw error
        } catch {
            throw RestoreError(error)
        }
    }

    /// setsid for a session leader, setpgid for a group leader or a member of another group than its
    /// parent's. The root's group from outside the tree (`rootGroup`: checkpointed, restored) is the
    /// group the restorer gave the root.
    private func lead(_ process: TargetProcess, ownID pid: ProcessID, _ lineage: ProcessLineage, parentGroup: ProcessID?,
                      rootGroup: (ProcessID, ProcessID)?) throws {
        if lineage.sessionID == pid {
            try process.injector.call("setsid", Syscall.setsid)
        } else if lineage.processGroupID == pid {
            try process.injector.call("setpgid(0, 0)", Syscall.setpgid, 0, 0)
        } else if let parentGroup {
            var group = lineage.processGroupID
            if let rootGroup, group == rootGroup.0 { group = rootGroup.1 }
            if group != parentGroup { try process.injector.call("setpgid(0, \(group))", Syscall.setpgid, 0, UInt64(group.rawValue)) }
        }
    }

    /// clone3 in `parent` with set_tid: the child returns from it into a spin loop on the scratch page
    /// (it shares the parent's copy), where it is seized, interrupted and given a parent-death signal.
    private func clone(_ processID: ProcessID, from parent: TargetProcess, exitSignal: Int32) throws -> TargetProcess {
        let codeAddress = parent.scratchAddress + 16
        try parent.memory.write(threadCloneInstructions, at: codeAddress)
        let cloneInjector = SyscallInjector(tracee: parent.tracee, instructionAddress: codeAddress, template: parent.injector.template)
        cloneInjector.trapOffset = threadCloneTrapOffset
        let argumentsAddress = parent.dataAddress + 2048
        let wantedAddress = argumentsAddress + 128
        var arguments: [UInt8] = []
        // struct clone_args: flags 0 (a fork), pidfd, child_tid, parent_tid, exit_signal, stack, stack_size,
        // tls, set_tid, set_tid_size, cgroup.
        for word: UInt64 in [0, 0, 0, 0, UInt64(exitSignal), 0, 0, 0, wantedAddress, 1, 0] { arguments.appendLittleEndian(word) }
        try parent.memory.write(arguments, at: argumentsAddress)
        var wanted: [UInt8] = []
        wanted.appendLittleEndian(Int32(processID.rawValue))
        try parent.memory.write(wanted, at: wantedAddress)
        let result = try cloneInjector.raw("clone3(process \(processID))", Syscall.clone3, [argumentsAddress, 88])
        if result == -Int64(ErrorNumber.fileExists) { throw RestoreError.processIDInUse(processID) }
        if result < 0 { throw RestoreError.system("clone3 for process \(processID) in \(parent.processID) failed: errno \(-result)") }
        precondition(result == Int64(processID.rawValue), "clone3(set_tid) gave pid \(result), wanted \(processID)")
        // The parent knows it by the tree's number; ptrace and /proc need this node's.
        guard let created = try ProcFS.childProcessIDs(parent.processID).first(where: { (try? ProcFS.innermostProcessID($0)) == processID }) else {
            throw RestoreError.system("process \(processID) was created in \(parent.processID) but is not listed")
        }
        let tracee = try Tracee.seize(created)
        try tracee.interrupt()
        // Ends at the seize's event stop or the process's death; other stops are resumed past.
        while true {
            let reason = try tracee.waitForStop()
            if case .event(Tracee.eventStop, _) = reason { break }
            if reason.isTerminal { throw RestoreError.system("process \(processID) died while being seized: \(reason)") }
            try tracee.resume()
        }
        try tracee.setSignalMask(~UInt64(0))
        let memory = try ProcessMemory(created, writable: true)
        let injector = SyscallInjector(tracee: tracee, instructionAddress: parent.scratchAddress, template: try tracee.registers())
        let child = TargetProcess(processID: created, tracee: tracee, memory: memory, injector: injector, scratchAddress: parent.scratchAddress)
        // Should the restorer die, the root stub dies (its parent-death signal) and so does each child.
        try injector.call("prctl(PR_SET_PDEATHSIG)", Syscall.prctl, 1, UInt64(SignalNumber.kill))
        return child
    }

    /// Ends a restored zombie with `status`: exit_group(code), or its signal at the default action
    /// with no core (RLIMIT_CORE 0). Its tracer (us) sees the end first, then its parent has a zombie.
    private func end(_ process: TargetProcess, ownID: ProcessID, status: Int32) throws {
        var registers = process.injector.template
        registers.rip = process.scratchAddress
        registers.origRax = UInt64.max
        if status & 0x7f == 0 {
            registers.rax = UInt64(Syscall.exitGroup)
            registers.rdi = UInt64((status >> 8) & 0xff)
        } else {
            let signal = UInt64(status & 0x7f)
            try process.memory.write([UInt8](repeating: 0, count: 32), at: process.dataAddress)
            if signal != 9 && signal != 19 {
                try process.injector.call("rt_sigaction(\(signal), SIG_DFL)", Syscall.rtSigaction, signal, process.dataAddress, 0, 8)
            }
            try process.injector.call("prlimit64(RLIMIT_CORE, 0)", Syscall.prlimit64, 0, 4, process.dataAddress, 0)
            try process.tracee.setSignalMask(0)
            registers.rax = UInt64(Syscall.kill)
            registers.rdi = UInt64(ownID.rawValue)
            registers.rsi = signal
        }
        try process.tracee.setRegisters(registers)
        try process.tracee.resume()
        // Ends at its death: a signal stop is its own signal, delivered; every other stop is resumed past.
        for _ in 0..<1000 {
            let reason = try process.tracee.waitForStop()
            if reason.isTerminal { return }
            if case .signal(let signal) = reason { try process.tracee.resume(signal: signal) } else { try process.tracee.resume() }
        }
        throw RestoreError.system("zombie \(process.processID) did not end")
    }

    /// The zombie's end queued its exit signal at the parent (blocked there while it is restored):
    /// take it back, so that only the signals pending at the checkpoint are pending after the restore.
    private func drainChildSignal(_ parent: TargetProcess, signal: Int32) throws {
        var record: [UInt8] = []
        record.appendLittleEndian(UInt64(1) << UInt64(signal - 1))
        record.appendLittleEndian(UInt64(0))
        record.appendLittleEndian(UInt64(0))
        try parent.memory.write(record, at: parent.dataAddress)
        _ = try parent.injector.raw("rt_sigtimedwait(\(signal))", Syscall.rtSigtimedwait,
                                    [parent.dataAddress, 0, parent.dataAddress + 8, 8])
    }

    // MARK: Pages

    /// Installs a run of pages at a tagged address (TreePageAddress) into the process it belongs to.
    @discardableResult
    func writePages(_ bytes: [UInt8], offset: Int, byteCount: Int, to address: UInt64) throws(RestoreError) -> Int {
        try process(ordinal: TreePageAddress.ordinal(of: address))
            .writePages(bytes, offset: offset, byteCount: byteCount, to: TreePageAddress.address(of: address))
    }

    private func process(ordinal: Int) throws(RestoreError) -> TargetProcess {
        if ordinal == 0 { return root }
        guard ordinal <= members.count, let member = members[ordinal - 1] else {
            throw .layout("pages for process \(ordinal) of the tree, which is not a live process")
        }
        return member
    }

    /// Writes bytes at a tagged address (TreePageAddress) of the process it belongs to.
    func writeBytes(_ bytes: [UInt8], to address: UInt64) throws {
        try process(ordinal: TreePageAddress.ordinal(of: address)).writeBytes(bytes, to: TreePageAddress.address(of: address))
    }

    /// The stray pages of every process, at tagged addresses (TreePageAddress; the root's untagged),
    /// made by the one look (`checkStrayPages`); nil until it was made.
    private(set) var strayPageAddresses: Set<UInt64>?

    /// Looks once, in every process, for registered pages present before any install
    /// (TargetProcess.checkStrayPages); a second call changes nothing.
    func checkStrayPages() throws(RestoreError) {
        guard strayPageAddresses == nil else { return }
        var tagged = try root.checkStrayPages(ordinal: 0)
        for (index, member) in members.enumerated() {
            guard let member else { continue }
            tagged.formUnion(try member.checkStrayPages(ordinal: index + 1))
        }
        strayPageAddresses = tagged
    }

    /// Whether that look was made.
    var strayPagesChecked: Bool { strayPageAddresses != nil }

    /// This node's PID of the process of `ordinal` (nil: a zombie, or no such process).
    func nodeProcessID(ordinal: Int) -> ProcessID? {
        ordinal == 0 ? root.processID : ordinal <= members.count ? members[ordinal - 1]?.processID : nil
    }

    /// Post-copy: one lazy memory for the whole tree. Each live process hands over its userfaultfd (it
    /// belongs to that process's mm), its ranges (tagged with its ordinal, as its page addresses are) and
    /// its watchdog; the fault handler and the pusher then serve every process through the one page
    /// table. A single process's is exactly its own.
    func makeLazyMemory(pageAddresses: [UInt64], origin: PageOrigin, observer: (any MigrationObserver)?,
                        gate: any TargetGate) throws(RestoreError) -> LazyMemory {
        guard !members.isEmpty else {
            return try root.makeLazyMemory(pageAddresses: pageAddresses, origin: origin, observer: observer, gate: gate)
        }
        var userfaultfds: [Userfaultfd?] = []
        var processIDs: [ProcessID?] = []
        var registered: [Range<UInt64>] = [], shared: [Range<UInt64>] = [], eager: [Range<UInt64>] = []
        var watchdogs: [HoleWatchdog] = []
        for (ordinal, process) in ([root] + members).enumerated() {
            guard let process else {
                userfaultfds.append(nil)
                processIDs.append(nil)
                continue
            }
            let handed: (userfaultfd: Userfaultfd, registered: [Range<UInt64>], shared: [Range<UInt64>], eager: [Range<UInt64>], watchdog: HoleWatchdog)
            do { handed = try process.handOver() } catch {
                // The watchdogs armed so far would kill their processes once this node lets them go:
                // the restorer kills the tree anyway.
                for watchdog in watchdogs { watchdog.disarm() }
                throw error
            }
            func tagged(_ ranges: [Range<UInt64>]) -> [Range<UInt64>] {
                ranges.map { TreePageAddress.tagged($0.lowerBound, ordinal: ordinal)..<TreePageAddress.tagged($0.upperBound, ordinal: ordinal) }
            }
            userfaultfds.append(handed.userfaultfd)
            processIDs.append(process.processID)
            registered += tagged(handed.registered)
            shared += tagged(handed.shared)
            eager += tagged(handed.eager)
            watchdogs.append(handed.watchdog)
        }
        return LazyMemory(targetProcessID: root.processID, pageAddresses: pageAddresses, userfaultfd: TreeUserfaultfd(byOrdinal: userfaultfds),
                          registeredRanges: registered, sharedRanges: shared, eagerRanges: eager, origin: origin, observer: observer,
                          gate: gate, watchdogs: watchdogs, processIDsByOrdinal: processIDs)
    }

    func finishInstalling() throws(RestoreError) {
        for process in live { try process.finishInstalling() }
    }

    // MARK: State and resume

    func restoreState(_ state: ProcessState) throws(RestoreError) {
        try root.restoreState(state)
        for (member, memberState) in zip(members, state.members) {
            guard let member, case .live(let live) = memberState else { continue }
            try member.restoreState(live)
        }
    }

    /// Every process read back as the checkpoint describes it: its state, its lineage from /proc, and
    /// what it shares with its parent found again with kcmp on the restored processes themselves.
    /// Without `readBack` (no oracle looks) each process is only made ready, and nothing is returned.
    func prepareToResume(_ state: ProcessState, readBack: Bool) throws(RestoreError) -> ProcessState? {
        guard readBack else {
            _ = try root.prepareToResume(state, readBack: false)
            for (member, memberState) in zip(members, state.members) {
                guard let member, case .live(let live) = memberState else { continue }
                _ = try member.prepareToResume(live, readBack: false)
            }
            return nil
        }
        guard var restored = try root.prepareToResume(state, readBack: true) else { return nil }
        guard state.lineage.isRecorded else { return restored }
        do {
            let rootListing = TreeListing(processID: root.processID, fields: try ProcessTreeFS.fields(root.processID), earlier: [])
            restored.lineage = FrozenTree.lineage(rootListing)
            var listing = [rootListing]
            for nodeProcessID in memberNodeProcessIDs {
                listing.append(TreeListing(processID: nodeProcessID, fields: try ProcessTreeFS.fields(nodeProcessID), earlier: listing))
            }
            for (index, (member, memberState)) in zip(members, state.members).enumerated() {
                var lineage = FrozenTree.lineage(listing[index + 1])
                guard let member, case .live(let live) = memberState else {
                    restored.members.append(.zombie(ZombieProcess(processID: listing[index + 1].ownProcessID, lineage: lineage,
                                                                  waitStatus: listing[index + 1].fields.isZombie ? listing[index + 1].fields.exitCode : -1)))
                    continue
                }
                let inherited = try TreePreflight.inheritance(of: listing[index + 1], in: listing)
                lineage.inheritedDescriptors = inherited.descriptors
                lineage.renumberedDescriptors = inherited.renumbered
                lineage.inheritedMappingStarts = inherited.mappings
                guard var memberRestored = try member.prepareToResume(live, readBack: true) else { continue }
                memberRestored.lineage = lineage
                restored.members.append(.live(memberRestored))
            }
            // Numbered as the checkpoint's were, so that the records compare equal.
            try restored.numberTreePipes(root: root.processID)
        } catch let error as RestoreError {
            throw error
        } catch {
            throw RestoreError(error)
        }
        return restored
    }

    /// Lets every process run, the children first.
    func resume() throws(RestoreError) {
        for member in members.reversed() { try member?.resume() }
        try root.resume()
    }
}
