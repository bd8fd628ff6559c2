// The restored process while the restorer builds it: a stub started with the victim's PID, stopped at
// its exec, turned into the victim by injected syscalls run from a scratch page, and finally given the
// victim's registers. Every method must run on the thread that called `spawn`.
import Sys

/// Where the restored process gets its PID: the old number in this node's PID namespace (`shared`, the
/// old PID must be free), or pid 1 of a new namespace (`fresh`: a victim that was pid 1 of its own
/// namespace, so a target node on the same machine can hold it while the victim still lives).
public enum PIDNamespace: Sendable { case shared, fresh }

final class TargetProcess {
    let processID: ProcessID
    let tracee: Tracee
    let memory: ProcessMemory
    let injector: SyscallInjector
    let scratchAddress: UInt64
    static let scratchByteCount: UInt64 = 16 * .pageSize
    var dataAddress: UInt64 { scratchAddress + .pageSize }
    /// Set by `resume()` (TargetProcessResume.swift).
    var isResumed = false
    /// Anonymous private ranges registered with the target's userfaultfd: pages go in by UFFDIO_COPY
    /// straight from FAM; everything else (private file pages) by pwrite to /proc/PID/mem.
    private var userfaultfd: Userfaultfd?
    private(set) var registeredRanges: [Range<UInt64>] = []
    /// Registered shared-memory mappings: a page found present there was installed through another
    /// mapping of the same object, with the same dumped bytes.
    private(set) var sharedRanges: [Range<UInt64>] = []
    /// Registered private pages found present before any install (`checkStrayPages`; nil: not looked yet).
    var strayPageAddresses: Set<UInt64>?
    /// Mapped memfds: in post-copy installed before the resume, since the process may read or write one
    /// through a descriptor, which userfaultfd does not see (a hole would read as zeros, and a write
    /// into one would drop the rest of the dumped page).
    private var memfdRanges: [Range<UInt64>] = []
    /// The threads besides the main one, created by `restoreState`, in the checkpoint's order; each with
    /// an injector that runs `syscall; int3` from the scratch page.
    var otherThreads: [(tracee: Tracee, injector: SyscallInjector)] = []
    /// Established TCP connections restored in repair mode: they go live when the process is let go.
    var liveTCPSockets: [(descriptor: Int32, end: TCPSocketEnd)] = []
    var allTracees: [Tracee] { [tracee] + otherThreads.map(\.tracee) }

    /// Descriptors restored before the pages (a tree's parent, so that its children inherit them).
    var descriptorsRestored = false
    /// Every file to open through the one its access check resolved (FileAccessCheck.swift).
    var reopenPaths = ReopenPaths()
    /// A tree member's: the descriptors and shared mappings it keeps from the parent it was cloned from.
    var inherited: (descriptors: Set<Int32>, mappingStarts: Set<UInt64>)?
    /// A tree's pipes, with this process's own number in the tree (TreePipes.swift).
    var treePipes: (restore: TreePipeRestore, ownProcessID: ProcessID)?
    /// A tree member's descriptors that are its parent's at another number (ProcessLineage).
    var renumbered: [RenumberedDescriptor] = []
    /// The parked ends of tree pipes this member inherited: kept until the whole tree is built.
    var keptParkedDescriptors: Set<Int32> = []

    init(processID: ProcessID, tracee: Tracee, memory: ProcessMemory, injector: SyscallInjector, scratchAddress: UInt64) {
        self.processID = processID
        self.tracee = tracee
        self.memory = memory
        self.injector = injector
        self.scratchAddress = scratchAddress
    }

    /// Starts the stub (this executable, stopped at exec) as `state.processID` and maps the scratch page.
    /// The scratch page also avoids `avoiding` (a tree's other processes' mappings: their clones keep it).
    static func spawn(state: ProcessState, stubPath: String, pidNamespace: PIDNamespace,
                      avoiding: [(UInt64, UInt64)] = []) throws(RestoreError) -> TargetProcess {
        let processID: ProcessID
        switch pidNamespace {
        case .shared:
            do {
                processID = try Spawn.tracedStub(path: stubPath, wantedPID: state.processID, personality: nil)
            } catch {
                if error.errno == .fileExists { throw .processIDInUse(state.processID) }
                throw .stubFailed("\(error)")
            }
            precondition(processID == state.processID, "clone3(set_tid) gave pid \(processID), wanted \(state.processID)")
        case .fresh:
            guard state.processID.rawValue == 1 else { throw .processIDInUse(state.processID) }
            // A SysV segment keeps its ID: a fresh IPC namespace has it free while the victim, on this
            // machine, may still hold it (post-copy's victim lives until the migration completes).
            let newIPCNamespace = state.holdsSysVSharedMemory
            do { processID = try Spawn.tracedStubInNewPIDNamespace(path: stubPath, newIPCNamespace: newIPCNamespace) } catch {
                throw .stubFailed("\(error)")
            }
        }
        do {
            let (tracee, reason) = try Tracee.adoptTracedChild(processID)
            guard reason == .signal(SignalNumber.trap) else {
                throw RestoreError.stubFailed("\(stubPath) did not stop at exec: \(reason)")
            }
            let memory = try ProcessMemory(processID, writable: true)
            let registers = try tracee.registers()
            let stubRanges = try ProcFS.maps(processID).map { ($0.start, $0.end) }
            guard let scratch = AddressSpace.freeRange(
                byteCount: scratchByteCount, avoiding: stubRanges + state.mappings.map { ($0.start, $0.end) } + avoiding) else {
                throw RestoreError.layout("no free range for the scratch mapping")
            }
            try memory.write(syscallTrapInstruction, at: registers.rip)
            let injector = SyscallInjector(tracee: tracee, instructionAddress: registers.rip, template: registers)
            let target = TargetProcess(processID: processID, tracee: tracee, memory: memory, injector: injector,
                                       scratchAddress: scratch)
            try injector.call("mmap(scratch)", Syscall.mmap, scratch, scratchByteCount, MemoryProtection.all.rawValue,
                               MapFlags.scratch.rawValue, UInt64.max, 0)
            try memory.write(syscallTrapInstruction, at: scratch)
            injector.instructionAddress = scratch
            try tracee.setSignalMask(~UInt64(0))
            return target
        } catch let error as RestoreError {
            Spawn.kill(processID)
            _ = try? Spawn.waitForExit(processID)
            throw error
        } catch {
            Spawn.kill(processID)
            _ = try? Spawn.waitForExit(processID)
            throw .stubFailed("\(error)")
        }
    }

    /// Kills the target (a target must never run on holes) and reaps it.
    func kill() {
        guard !isResumed else { return }
        // Each traced thread reports its death; the leader's comes last.
        Tracee.killAndWait(allTracees, processID: processID)
        memory.close()
    }

    // MARK: Layout

    /// Closes inherited fds, removes the stub's mappings, moves the vDSO, sets the mm fields and the exe,
    /// and maps every victim VMA at its address.
    func buildLayout(_ state: ProcessState) throws(RestoreError) {
        do {
            if let inherited {
                try keepInherited(inherited.descriptors, state: state)
            } else {
                try injector.call("close_range", Syscall.closeRange, 0, UInt64(UInt32.max), 0)
            }
            let stubMaps = try ProcFS.maps(processID)
            for entry in stubMaps where entry.start != scratchAddress && !entry.path.hasPrefix("[v")
                && inherited?.mappingStarts.contains(entry.start) != true {
                try injector.call("munmap(stub \(entry.path))", Syscall.munmap, entry.start, entry.byteCount)
            }
            try moveVDSO(stubMaps: stubMaps, state: state)
            try setMemoryDescriptor(state)
            try mapVictimMappings(state)
            try registerAnonymousMemory(state)
        } catch {
            throw RestoreError(error)
        }
    }

    private func moveVDSO(stubMaps: [MapsEntry], state: ProcessState) throws {
        let names = ["[vvar]", "[vvar_vclock]", "[vdso]"]
        let stubParts = names.compactMap { name in stubMaps.first { $0.path == name } }
        var victimParts: [String: Mapping] = [:]
        for mapping in state.mappings {
            if case .vdsoPart(let name) = mapping.kind { victimParts[name] = mapping }
        }
        let alreadyInPlace = stubParts.allSatisfy { victimParts[$0.path]?.start == $0.start }
        if alreadyInPlace && stubParts.count == victimParts.count { return }
        for part in stubParts {
            guard let wanted = victimParts[part.path] else {
                try injector.call("munmap(\(part.path))", Syscall.munmap, part.start, part.byteCount)
                continue
            }
            guard wanted.byteCount == part.byteCount else {
                throw RestoreError.layout("\(part.path) is \(part.byteCount) bytes here and \(wanted.byteCount) on the source; both nodes need the same kernel")
            }
        }
        // Park every part in a free range first, so that moves never overlap their own source.
        let totalByteCount = stubParts.reduce(0) { $0 + $1.byteCount }
        let avoid = stubMaps.map { ($0.start, $0.end) } + state.mappings.map { ($0.start, $0.end) }
        guard var parking = AddressSpace.freeRange(byteCount: totalByteCount, avoiding: avoid) else {
            throw RestoreError.layout("no free range to move the vDSO through")
        }
        var parked: [(name: String, address: UInt64, byteCount: UInt64)] = []
        for part in stubParts where victimParts[part.path] != nil {
            try injector.call("mremap(\(part.path))", Syscall.mremap, part.start, part.byteCount, part.byteCount, 3, parking)
            parked.append((part.path, parking, part.byteCount))
            parking += part.byteCount
        }
        for part in parked {
            let wanted = victimParts[part.name]!.start
            try injector.call("mremap(\(part.name))", Syscall.mremap, part.address, part.byteCount, part.byteCount, 3, wanted)
        }
    }

    private func setMemoryDescriptor(_ state: ProcessState) throws {
        let fields = state.memoryDescriptor
        let exeDescriptor = try openInTarget(try checkedPath(.executable, "the executable"), flags: OpenFlag.readOnly | OpenFlag.closeOnExec)
        let auxvAddress = dataAddress + 256
        try memory.write(fields.auxiliaryVector, at: auxvAddress)
        var record: [UInt8] = []
        for word in [fields.startCode, fields.endCode, fields.startData, fields.endData, fields.startBrk, fields.brk,
                     fields.startStack, fields.argStart, fields.argEnd, fields.envStart, fields.envEnd, auxvAddress] {
            record.appendLittleEndian(word)
        }
        record.appendLittleEndian(UInt32(fields.auxiliaryVector.count))
        record.appendLittleEndian(UInt32(exeDescriptor))
        try memory.write(record, at: dataAddress)
        try injector.call("prctl(PR_SET_MM, PR_SET_MM_MAP)", Syscall.prctl, 35, 14, dataAddress, UInt64(record.count))
        try injector.call("close(exe)", Syscall.close, UInt64(exeDescriptor))
    }

    private func mapVictimMappings(_ state: ProcessState) throws {
        var openFiles: [String: UInt64] = [:]
        var sharedObjectsMade: Set<Int32> = []
        defer { for descriptor in openFiles.values { _ = try? injector.raw("close", Syscall.close, [descriptor]) } }
        for mapping in state.mappings {
            switch mapping.kind {
            case .vdsoPart, .vsyscall:
                continue
            case .sharedMemory(let object):
                // Every mapping of an object is made with its first (they are one object); an object
                // inherited from the parent is already there (the tree preflight refuses half of one).
                guard sharedObjectsMade.insert(object.object).inserted,
                      inherited?.mappingStarts.contains(mapping.start) != true else { continue }
                try SharedMemoryRestorer(injector: injector, memory: memory, dataAddress: dataAddress)
                    .make(object, mappings: state.mappings, avoiding: [scratchAddress..<(scratchAddress + Self.scratchByteCount)])
            case .anonymous, .heap, .stack:
                var flags: MapFlags = [.private, .anonymous, .fixedNoReplace]
                if mapping.kind == .stack { flags.insert(.growsDown) }
                if mapping.noReserve { flags.insert(.noReserve) }
                try injector.call("mmap(\(hex(mapping.start)))", Syscall.mmap, mapping.start, mapping.byteCount,
                                  UInt64(mapping.protection), flags.rawValue, UInt64.max, 0)
            case .file(let path):
                let writableShared = mapping.writesBack
                let key = (writableShared ? "rw:" : "r:") + path
                let descriptor: UInt64
                if let open = openFiles[key] {
                    descriptor = open
                } else {
                    let checked = try checkedPath(path == state.executablePath && !writableShared ? .executable
                                                  : .mapping(path: path, writable: writableShared), "the mapping of \(path) at \(hex(mapping.start))")
                    descriptor = UInt64(try openInTarget(checked, flags: (writableShared ? OpenFlag.readWrite : OpenFlag.readOnly) | OpenFlag.closeOnExec))
                    openFiles[key] = descriptor
                }
                let flags: MapFlags = [mapping.shared ? .shared : .private, .fixedNoReplace]
                try injector.call("mmap(\(hex(mapping.start)) \(path))", Syscall.mmap, mapping.start, mapping.byteCount,
                                  UInt64(mapping.protection), flags.rawValue, descriptor, mapping.fileOffset)
            }
        }
        try adviseVictimMappings(state)
    }

    /// Each mapping's madvise flags, once all are made (an inherited mapping of a tree's child came with
    /// its parent's: madvise again is harmless).
    private func adviseVictimMappings(_ state: ProcessState) throws {
        for mapping in state.mappings where !mapping.advice.isEmpty {
            for entry in MappingAdvice.catalog where mapping.advice.contains(entry.flag) {
                guard let advice = entry.madvise else { throw RestoreError.layout("mapping \(hex(mapping.start)) is \(entry.mnemonic), which cannot be restored") }
                try injector.call("madvise(\(hex(mapping.start)), \(entry.mnemonic))", Syscall.madvise, mapping.start, mapping.byteCount, UInt64(advice))
            }
        }
    }

    /// Creates a userfaultfd inside the target (it binds to the target's mm), takes it over with
    /// pidfd_getfd, and registers every private anonymous mapping for missing-page faults. (Private
    /// mappings of ext4 files cannot be registered: their dirty pages are written with pwrite.)
    private func registerAnonymousMemory(_ state: ProcessState) throws {
        let remote = try injector.call("userfaultfd", Syscall.userfaultfd, UInt64(OpenFlag.closeOnExec | OpenFlag.nonBlocking))
        let taken = try Userfaultfd(processID: processID, remoteDescriptor: Int32(remote))
        try injector.call("close(userfaultfd)", Syscall.close, remote)
        try taken.handshake(features: Userfaultfd.restoreFeatures)
        for mapping in state.mappings {
            switch mapping.kind {
            case .sharedMemory(let object) where object.sysv != nil:
                // userfaultfd does not register on a SysV attach (shmat gives it the segment's own
                // operations, so it is not shmem's mapping): its pages are written through /proc/PID/mem,
                // in post-copy before the resume, as unregistered memory is (LazyHandover).
                continue
            case .anonymous where !mapping.shared, .heap where !mapping.shared, .stack where !mapping.shared, .sharedMemory:
                try taken.registerMissing(start: mapping.start, byteCount: mapping.byteCount)
                registeredRanges.append(mapping.start..<mapping.end)
                if case .sharedMemory(let object) = mapping.kind {
                    sharedRanges.append(mapping.start..<mapping.end)
                    if object.memfdName != nil { memfdRanges.append(mapping.start..<mapping.end) }
                }
            default: continue
            }
        }
        userfaultfd = taken
    }

    /// openat(AT_FDCWD, path, flags) inside the target; returns the new descriptor.
    private func openInTarget(_ path: String, flags: Int32) throws -> Int32 {
        let pathAddress = dataAddress + 8192
        try memory.write(Array(path.utf8) + [0], at: pathAddress)
        let descriptor = try injector.call("openat(\(path))", Syscall.openat, UInt64(bitPattern: -100), pathAddress,
                                           UInt64(UInt32(bitPattern: flags)), 0)
        return Int32(descriptor)
    }

    // MARK: Pages

    /// Installs `byteCount` bytes at `offset` of `bytes` (pages checked against their marks, never read
    /// from FAM again) at `address` of the target: UFFDIO_COPY inside registered ranges (one copy never
    /// crosses a mapping), pwrite elsewhere and on stray pages (checkStrayPages). Returns the pages installed.
    @discardableResult
    func writePages(_ bytes: [UInt8], offset: Int, byteCount: Int, to address: UInt64) throws(RestoreError) -> Int {
        precondition(userfaultfd == nil || strayPageAddresses != nil, "pages installed before the look for stray pages")
        let strays = strayPageAddresses ?? []
        var installedPageCount = 0
        var done = 0
        do {
            while done < byteCount {
                let current = address + UInt64(done)
                let remaining = byteCount - done
                if let range = registeredRanges.first(where: { $0.contains(current) }), let userfaultfd, !strays.contains(current) {
                    // Up to the range's end or the next stray page, which is written, not copied.
                    let end = min(range.upperBound, strays.filter { $0 > current }.min() ?? .max)
                    let pieceByteCount = min(remaining, Int(end - current))
                    var pieceDone = 0
                    while pieceDone < pieceByteCount {
                        let outcome = try userfaultfd.copy(bytes: bytes, offset: offset + done + pieceDone, byteCount: pieceByteCount - pieceDone,
                                                           to: current + UInt64(pieceDone), dontWake: false)
                        switch outcome {
                        case .copied:
                            installedPageCount += (pieceByteCount - pieceDone) / .pageSize
                            pieceDone = pieceByteCount
                        case .partial(let copiedByteCount):
                            installedPageCount += copiedByteCount / .pageSize
                            pieceDone += copiedByteCount
                        case .firstPageAlreadyPresent where sharedRanges.contains(where: { $0.contains(current) }):
                            installedPageCount += 1
                            pieceDone += .pageSize
                        case .firstPageAlreadyPresent:
                            // The only installer here, and the look for stray pages found none at this page.
                            throw RestoreError.layout("page \(hex(current + UInt64(pieceDone))) of registered memory was present at its install, "
                                                      + "though it was not when the restore looked; the restore stops rather than guess whose it is")
                        }
                    }
                    done += pieceByteCount
                } else {
                    // Outside registered memory (pwrite), or a stray page inside it, written over whatever put it there.
                    let nextRegistered = registeredRanges.map(\.lowerBound).filter { $0 > current }.min() ?? UInt64.max
                    let pieceByteCount = strays.contains(current) ? .pageSize : min(remaining, Int(min(nextRegistered - current, UInt64(remaining))))
                    try memory.write(bytes, offset: offset + done, byteCount: pieceByteCount, to: current)
                    installedPageCount += pieceByteCount / .pageSize
                    done += pieceByteCount
                }
            }
        } catch let error as RestoreError {
            throw error
        } catch { throw .system("installing pages at \(hex(address)): \(error)") }
        return installedPageCount
    }

    /// Post-copy: the userfaultfd and its registered ranges move to lazy memory shared by the fault
    /// handler and the pusher; the target keeps no installer of its own. A watchdog is armed here, before
    /// the process ever runs: should this process die before the last page is in, the target dies too,
    /// instead of reading zeros where pages are missing (it holds the userfaultfd until then).
    func makeLazyMemory(pageAddresses: [UInt64], origin: PageOrigin, observer: (any MigrationObserver)?,
                        gate: any TargetGate) throws(RestoreError) -> LazyMemory {
        let handed = try handOver()
        return LazyMemory(targetProcessID: processID, pageAddresses: pageAddresses, userfaultfd: TreeUserfaultfd(handed.userfaultfd),
                          registeredRanges: handed.registered, sharedRanges: handed.shared, eagerRanges: handed.eager,
                          origin: origin, observer: observer, gate: gate,
                          watchdogs: [handed.watchdog])
    }

    /// What lazy memory takes over from this process (a tree's lazy memory takes it from each): its
    /// userfaultfd, its registered, shared and eagerly installed ranges, and its armed watchdog.
    func handOver() throws(RestoreError)
        -> (userfaultfd: Userfaultfd, registered: [Range<UInt64>], shared: [Range<UInt64>], eager: [Range<UInt64>], watchdog: HoleWatchdog) {
        guard let userfaultfd else { preconditionFailure("lazy memory before the userfaultfd was registered") }
        let watchdog: HoleWatchdog
        do { watchdog = try HoleWatchdog(guarding: processID, userfaultfd: userfaultfd) } catch {
            throw .system("starting the watchdog that kills the target if its fault server dies: \(error)")
        }
        self.userfaultfd = nil
        return (userfaultfd, registeredRanges, sharedRanges, memfdRanges, watchdog)
    }

    /// Ends eager installation: unregisters every range and lets the userfaultfd go.
    func finishInstalling() throws(RestoreError) {
        guard let userfaultfd else { return }
        do {
            for range in registeredRanges {
                try userfaultfd.unregister(start: range.lowerBound, byteCount: range.upperBound - range.lowerBound)
            }
        } catch { throw .system("\(error)") }
        userfaultfd.close()
        self.userfaultfd = nil
        registeredRanges = []
    }
}
