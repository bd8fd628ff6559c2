// A victim and (in every mode that migrates trees) its whole process tree, frozen: each process seized and stopped before
// its children are listed (a stopped process forks no more), its zombies recorded as they are.
import Sys

final class FrozenTree {
    let root: FrozenVictim
    /// Every other process in creation order (each after its parent); nil for a zombie.
    private(set) var members: [(listing: TreeListing, frozen: FrozenVictim?)] = []
    private var rootListing: TreeListing?
    var processID: ProcessID { root.processID }
    /// The PID of each ordinal (TreePageAddress): the root, then the members.
    var processIDsByOrdinal: [ProcessID] { [root.processID] + members.map(\.listing.processID) }
    /// What could not be given back to any process of the tree when it was let go (its TCP sockets).
    var reinstateProblems: [String] { root.reinstateProblems + members.compactMap(\.frozen).flatMap(\.reinstateProblems) }
    var listing: [TreeListing] { (rootListing.map { [$0] } ?? []) + members.map(\.listing) }

    private init(root: FrozenVictim) { self.root = root }

    /// Freezes `processID`; with `allowingChildren`, every process of its tree too (else its children
    /// are refused as before, by the capture).
    /// `rootGuard`: the root's guard, started before the freeze (out of the downtime).
    static func freeze(_ processID: ProcessID, allowingChildren: Bool, rootGuard: SourceGuard? = nil) throws(CheckpointError) -> FrozenTree {
        let tree = FrozenTree(root: try FrozenVictim.freeze(processID, sourceGuard: rootGuard))
        guard allowingChildren else { return tree }
        tree.root.isTreeMember = true
        do {
            tree.rootListing = TreeListing(processID: processID, fields: try ProcessTreeFS.fields(processID), earlier: [])
            var queue = [processID]
            var next = 0
            // Ends when every frozen process's children are listed; the tree is bounded by processCountMax.
            while next < queue.count {
                let parent = queue[next]
                next += 1
                for child in try ProcFS.childProcessIDs(parent) {
                    guard tree.members.count + 1 < TreeLimits.processCountMax else {
                        throw CheckpointError.unsupportedTree(processID, reason: "it has more than \(TreeLimits.processCountMax) processes")
                    }
                    var frozen: FrozenVictim?
                    if try !ProcessTreeFS.fields(child).isZombie {
                        // No group-stop: its parent, frozen in the tree, would get a SIGCHLD it then carries.
                        do { frozen = try FrozenVictim.freeze(child, groupStop: false) } catch {
                            // It ended between the listing and the seize: its parent is frozen, so it stays a zombie.
                            guard (try? ProcessTreeFS.fields(child))?.isZombie == true else { throw error }
                        }
                    }
                    frozen?.isTreeMember = true
                    tree.members.append((TreeListing(processID: child, fields: try ProcessTreeFS.fields(child), earlier: tree.listing), frozen))
                    if frozen != nil { queue.append(child) }
                }
            }
            try TreePreflight.checkShape(tree.listing)
        } catch let error as CheckpointError {
            tree.release(kill: false)
            throw error
        } catch {
            tree.release(kill: false)
            throw .system(processID, "freezing its process tree: \(error)")
        }
        return tree
    }

    /// The root's state with one record per other process; each process's lineage read while frozen.
    /// `mappingFlags`: the root's, read by the dumper before the freeze.
    func capture(mappingFlags: StateReader.MappingFlags? = nil) throws(CheckpointError) -> ProcessState {
        var state = try root.capture(mappingFlags: mappingFlags)
        guard let rootListing else { return state }
        state.lineage = Self.lineage(rootListing)
        let all = listing
        for (listing, frozen) in members {
            var lineage = Self.lineage(listing)
            guard let frozen else {
                state.members.append(.zombie(ZombieProcess(processID: listing.ownProcessID, lineage: lineage, waitStatus: listing.fields.exitCode)))
                continue
            }
            let inherited = try TreePreflight.inheritance(of: listing, in: all)
            lineage.inheritedDescriptors = inherited.descriptors
            lineage.renumberedDescriptors = inherited.renumbered
            lineage.inheritedMappingStarts = inherited.mappings
            var member = try frozen.capture()
            member.lineage = lineage
            state.members.append(.live(member))
        }
        try state.numberTreePipes(root: processID)
        return state
    }

    /// Its place in the tree in the tree's own numbers (TreeListing).
    static func lineage(_ listing: TreeListing) -> ProcessLineage {
        var lineage = ProcessLineage()
        lineage.isRecorded = true
        lineage.parentProcessID = listing.ownParentProcessID
        lineage.processGroupID = listing.fields.ownProcessGroupID
        lineage.sessionID = listing.fields.ownSessionID
        lineage.exitSignal = listing.fields.exitSignal
        return lineage
    }

    /// Every process's pages, each member's tagged with its ordinal (TreePageAddress), sorted.
    func dirtyPageAddresses(state: ProcessState) throws(CheckpointError) -> [UInt64] {
        var addresses = try root.dirtyPageAddresses(mappings: state.mappings)
        for (ordinal, member) in state.liveProcesses.dropFirst() {
            guard let frozen = members[ordinal - 1].frozen else { preconditionFailure("live member \(ordinal) was not frozen") }
            addresses += try frozen.dirtyPageAddresses(mappings: member.mappings).map { TreePageAddress.tagged($0, ordinal: ordinal) }
        }
        return addresses
    }

    /// Kills the tree (children first, each reaped by its frozen parent, so that every PID is free for
    /// the restore whoever would otherwise adopt the orphans), or lets every process run on.
    func release(kill: Bool) {
        guard kill else {
            for member in members.reversed() { member.frozen?.release(kill: false) }
            root.release(kill: false)
            return
        }
        let frozenByProcessID = Dictionary(uniqueKeysWithValues: ([root] + members.compactMap(\.frozen)).map { ($0.processID, $0) })
        for member in members.reversed() {
            member.frozen?.release(kill: true)
            // wait4 takes the child's number as its parent knows it.
            frozenByProcessID[member.listing.fields.parentProcessID]?.reapChild(member.listing.ownProcessID)
        }
        root.release(kill: true)
    }
}

extension FrozenTree {
    private var frozenProcesses: [FrozenVictim] { [root] + members.compactMap(\.frozen) }

    /// The commit record is about to be stored, for every process (FrozenVictim.committing).
    func committing() { for process in frozenProcesses { process.committing() } }

    /// Every process detached and left stopped (FrozenVictim.leaveStopped).
    func leaveStopped() { for process in frozenProcesses.reversed() { process.leaveStopped() } }

    /// The image is complete: every process now dies with its tracer (FrozenVictim.committed).
    func committed() { for process in frozenProcesses { process.committed() } }

    /// What a dead tracer leaves (FrozenVictim.loseTracer): before the commit every process runs on,
    /// after it the tree is killed as its release kills it.
    package func loseTracer(resume: Bool = true) {
        if root.isCommitted { release(kill: true); return }
        for member in members.reversed() { member.frozen?.loseTracer(resume: resume) }
        root.loseTracer(resume: resume)
    }
}

extension FrozenVictim {
    /// Makes this frozen (and about to be killed) process reap `child` with an injected wait4: the
    /// victim's code at rip is overwritten and never put back.
    func reapChild(_ child: ProcessID) {
        guard let registers = try? tracee.registers(), let memory = try? ProcessMemory(processID, writable: true) else { return }
        defer { memory.close() }
        guard (try? memory.write(syscallTrapInstruction, at: registers.rip)) != nil else { return }
        let injector = SyscallInjector(tracee: tracee, instructionAddress: registers.rip, template: registers)
        // The child's end queued SIGCHLD here: blocked, it makes no signal stop in the injection.
        try? tracee.setSignalMask(~UInt64(0))
        // A signal stop that came first anyway is suppressed by the next attempt's resume.
        for _ in 0..<3 {
            if (try? injector.raw("wait4(\(child))", Syscall.wait4, [UInt64(child.rawValue), 0, WaitOptions.anyChild.rawValue, 0])) != nil { return }
        }
    }
}

extension Dumper {
    /// The PID of the victim's process that a page slot belongs to (a tree's: its ordinal's).
    func sourceProcessID(slot: Int) -> ProcessID {
        guard let processIDs = victim?.processIDsByOrdinal, processIDs.count > 1 else { return victimProcessID }
        return processIDs[TreePageAddress.ordinal(of: pageAddresses[slot])]
    }

    /// Runs of slots cut where the process changes, each with the PID it is read from.
    func splitByProcess(_ runs: [Range<Int>]) -> [(processID: ProcessID, slots: Range<Int>)] {
        var pieces: [(processID: ProcessID, slots: Range<Int>)] = []
        for run in runs {
            var start = run.lowerBound
            while start < run.upperBound {
                let ordinal = TreePageAddress.ordinal(of: pageAddresses[start])
                var end = start + 1
                while end < run.upperBound && TreePageAddress.ordinal(of: pageAddresses[end]) == ordinal { end += 1 }
                pieces.append((sourceProcessID(slot: start), start..<end))
                start = end
            }
        }
        return pieces
    }

    /// Copies the pages of `slots` from the process each belongs to (one call per process's run).
    func copyTreePages(_ slots: Range<Int>, processIDsByOrdinal: [ProcessID]) throws(SyscallError) {
        var start = slots.lowerBound
        while start < slots.upperBound {
            let ordinal = TreePageAddress.ordinal(of: pageAddresses[start])
            var end = start + 1
            while end < slots.upperBound && TreePageAddress.ordinal(of: pageAddresses[end]) == ordinal { end += 1 }
            try writer!.copyPagesFromProcess(processID: processIDsByOrdinal[ordinal], slots: start..<end)
            start = end
        }
    }
}
