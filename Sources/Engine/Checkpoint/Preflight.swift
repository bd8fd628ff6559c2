// The checks that run before the freeze, so that a process we cannot migrate is refused while it keeps
// running untouched. They read /proc only.
import Sys

enum Preflight {
    /// Throws the first reason `processID` cannot be migrated. With `allowingTree` (every mode today),
    /// its children (and theirs) migrate with it, each checked as it is (TreePreflight); otherwise a
    /// process with children is refused.
    static func check(_ processID: ProcessID, allowingTree: Bool = false) throws(CheckpointError) {
        if allowingTree {
            _ = try TreePreflight.check(root: processID)
        } else {
            try checkProcess(processID, checkingChildren: true)
        }
    }

    /// Every check of one process; its children only with `checkingChildren` (a tree checks them itself,
    /// and the pipes its processes share: the descriptors are returned for that).
    @discardableResult
    /// `allowingLoneEnds`: a process of a tree, whose pipes the tree judges (TreePipes).
    static func checkProcess(_ processID: ProcessID, checkingChildren: Bool = false, allowingLoneEnds: Bool = false) throws(CheckpointError) -> [OpenFile] {
        guard processID.rawValue > 0, ProcFS.isAlive(processID) else { throw .noSuchProcess(processID) }
        if processID == .current || processID == .parent { throw .cannotCheckpointSelf(processID) }
        let status: [String: String]
        do { status = try ProcFS.status(processID) } catch { throw .readFailed(processID, "reading its status", error) }
        if let tracer = status["TracerPid"], tracer != "0" { throw .alreadyTraced(processID, tracer: tracer) }
        let threads: [ProcessID]
        do { threads = try ProcFS.threadIDs(processID) } catch { throw .readFailed(processID, "listing its threads", error) }
        if threads.count > ProcessState.maximumThreadCount { throw .multipleThreads(processID, count: threads.count) }
        if checkingChildren { try checkNoChildren(processID) }
        let files = try descriptors(processID, allowingLoneEnds: allowingLoneEnds)
        _ = try mappings(processID)
        try ContextReader.checkRestorable(processID)
        return files
    }

    /// A checkpoint kills the victim: its children would be orphaned (re-parented, their exit statuses
    /// lost) and the restored process would not be their parent. A mode that migrates no trees refuses them.
    /// Also called once the victim is frozen, when it can fork no more.
    static func checkNoChildren(_ processID: ProcessID) throws(CheckpointError) {
        let children: [ProcessID]
        do { children = try ProcFS.childProcessIDs(processID) } catch {
            if !ProcFS.isAlive(processID) { throw .noSuchProcess(processID) }
            throw .system(processID, "\(error)")
        }
        if !children.isEmpty { throw .hasChildren(processID, children: children) }
    }

    /// How many pages a dump would take now (the process still runs; the count is a plan, not a promise).
    static func estimatedDirtyPageCount(_ processID: ProcessID) throws(CheckpointError) -> Int {
        let mappings = try mappings(processID)
        return try dirtyPageAddresses(processID, mappings: mappings).count
    }

    /// Every page that must be dumped: present or swapped anonymous pages, and private file pages that
    /// are no longer the file's (pagemap bit 61 clear). Shared file pages live in the file itself.
    static func dirtyPageAddresses(_ processID: ProcessID, mappings: [Mapping]) throws(CheckpointError) -> [UInt64] {
        var addresses: [UInt64] = []
        for mapping in mappings {
            switch mapping.kind {
            case .vdsoPart, .vsyscall: continue
            case .file where mapping.shared: continue
            case .sharedMemory(let memory) where memory.sysv != nil:
                // A SysV segment's pages are written through /proc/PID/mem (userfaultfd does not register
                // on it), which a read-only attach refuses: dump them once, from its first writable attach.
                let first = mappings.first { if case .sharedMemory(let other) = $0.kind { other.object == memory.object && $0.writable } else { false } }
                if first?.start == mapping.start { addresses += try sharedMemoryPageAddresses(processID, mapping: mapping) }
                continue
            case .sharedMemory:
                addresses += try sharedMemoryPageAddresses(processID, mapping: mapping)
                continue
            default: break
            }
            let isFile: Bool
            if case .file = mapping.kind { isFile = true } else { isFile = false }
            do {
                addresses += try ProcFS.presentPageAddresses(processID, address: mapping.start, pageCount: Int(mapping.byteCount / .pageSize),
                                                             excludingFilePages: isFile)
            } catch { throw .system(processID, "\(error)") }
        }
        return addresses
    }

    /// The pages of a shared-memory mapping its object holds (SEEK_DATA on the object itself, through
    /// map_files): a page this process never touched may hold another mapping's data, and a page it
    /// dropped with MADV_DONTNEED is still there; a hole reads as zeros and is not dumped.
    static func sharedMemoryPageAddresses(_ processID: ProcessID, mapping: Mapping) throws(CheckpointError) -> [UInt64] {
        let path = ProcFS.path(of: processID, .mappedFile(start: mapping.start, end: mapping.end))
        do {
            let object = try ForeignDescriptor(openingForReading: path)
            let start = Int64(mapping.fileOffset), end = start + Int64(mapping.byteCount)
            let page = Int64(ImageLayout.pageSize)
            return try object.dataRanges(from: start, to: end).flatMap { range in
                stride(from: range.lowerBound / page * page, to: range.upperBound, by: Int64.Stride(page)).map { mapping.start + UInt64($0 - start) }
            }
        } catch {
            if !ProcFS.isAlive(processID) { throw .noSuchProcess(processID) }
            throw .system(processID, "reading shared memory \(hex(mapping.start)): \(error)")
        }
    }

    /// Every open descriptor, refusing what cannot be recreated (DescriptorReader); contents not read.
    static func descriptors(_ processID: ProcessID, allowingLoneEnds: Bool = false) throws(CheckpointError) -> [OpenFile] {
        try DescriptorReader.read(processID, contents: false, allowingLoneEnds: allowingLoneEnds)
    }

    /// A MAP_SHARED mapping of shared anonymous memory or of a memfd, numbered by object (device and
    /// inode) in address order; nil for any other mapping. A memfd with seals is refused (they would
    /// have to be set after its pages are in).
    static func sharedMemory(_ processID: ProcessID, entry: MapsEntry, range: String,
                             objects: inout [String: Int32]) throws(CheckpointError) -> SharedMemory? {
        let named = entry.kernelPath
        guard entry.shared, named.isDeleted else { return nil }
        let memfdName: String?
        var segment: SysVSegment?
        if named.isSharedAnonymousObject {
            memfdName = nil
        } else if let name = named.memfdName {
            memfdName = name
        } else if named.isSysVSegment {
            memfdName = nil
            segment = try sysvSegment(processID, entry: entry, range: range)
        } else {
            return nil
        }
        let path = ProcFS.path(of: processID, .mappedFile(start: entry.start, end: entry.end))
        guard let identity = FileIdentity.of(path: path) else {
            throw .unsupportedMapping(processID, range: range, reason: "its shared memory object cannot be opened through map_files")
        }
        var seals: UInt32 = 0
        if memfdName != nil {
            seals = (try? ForeignDescriptor(openingForReading: path).seals()) ?? 0
            guard seals & SharedMemory.writeSeal == 0, seals & ~SharedMemory.knownSeals == 0 else {
                throw .unsupportedMapping(processID, range: range, reason: "a mapped memfd with seals \(hex(UInt64(seals))): F_SEAL_WRITE needs every writable mapping gone, and the pages come in through one")
            }
        }
        let key = "\(entry.device) \(entry.inode)"
        let object = objects[key] ?? Int32(objects.count)
        objects[key] = object
        let byteCount = (UInt64(max(identity.byteCount, 0)) + .pageSize - 1) / .pageSize * .pageSize
        guard entry.fileOffset + entry.byteCount <= byteCount else {
            throw .unsupportedMapping(processID, range: range, reason: "it maps beyond the end of its shared memory object")
        }
        if segment != nil, entry.fileOffset != 0 || entry.byteCount != byteCount {
            throw .unsupportedMapping(processID, range: range, reason: "a part of a SysV attach (shmat attaches whole segments)")
        }
        var memory = SharedMemory(object: object, memfdName: memfdName, byteCount: byteCount, sealingForbidden: seals == SharedMemory.sealSeal,
                                  seals: seals, sysv: segment)
        if segment == nil { (memory.mode, memory.userID, memory.groupID) = (identity.mode & 0o7777, identity.userID, identity.groupID) }
        return memory
    }

    /// What /proc/sysvipc/shm says of the segment a mapping attaches (its inode is the shmid). Only a
    /// segment marked for removal and attached by this process alone goes with the process: any other
    /// would be left behind at the source, or shared with another process.
    static func sysvSegment(_ processID: ProcessID, entry: MapsEntry, range: String) throws(CheckpointError) -> SysVSegment {
        let table: [SysVSharedMemoryEntry]
        // The table of the process's own IPC namespace (the restored process of a fresh one, checked by
        // the state oracle, or a victim in a container).
        do { table = try IPCNamespace.sysvSharedMemory(asSeenBy: processID) } catch {
            throw .unsupportedMapping(processID, range: range, reason: "SysV shared memory, and /proc/sysvipc/shm cannot be read (\(error))")
        }
        // A mapping's inode is its segment's ID.
        guard let listed = table.first(where: { $0.identifier >= 0 && UInt64($0.identifier) == entry.inode }) else {
            throw .unsupportedMapping(processID, range: range, reason: "SysV segment \(entry.inode) is not listed in /proc/sysvipc/shm (another IPC namespace?)")
        }
        let (key, identifier, perms, size) = (listed.key, listed.identifier, listed.permissions, listed.byteCount)
        let (attachCount, userID, groupID) = (listed.attachCount, listed.userID, listed.groupID)
        let destroyFlag: UInt32 = 0o1000, lockFlag: UInt32 = 0o2000
        guard perms & destroyFlag != 0 else {
            throw .unsupportedMapping(processID, range: range, reason: "SysV segment \(identifier) (key \(hex(UInt64(bitPattern: key)))) is not marked for removal, so it would outlive the process at the source; only a segment removed with IPC_RMID while attached migrates")
        }
        guard perms & lockFlag == 0 else { throw .unsupportedMapping(processID, range: range, reason: "SysV segment \(identifier) is locked in memory (SHM_LOCK)") }
        guard size > 0, size <= SysVSegment.byteCountMax else { throw .unsupportedMapping(processID, range: range, reason: "SysV segment \(identifier) of \(size) bytes") }
        // nattch counts every VMA of the segment (a split attach counts twice), in every process.
        let ownCount = ((try? ProcFS.maps(processID)) ?? []).filter { $0.shared && $0.inode == entry.inode && $0.device == entry.device && $0.path == entry.path }.count
        guard attachCount == ownCount else {
            throw .unsupportedMapping(processID, range: range, reason: "SysV segment \(identifier) is attached \(attachCount) times, \(ownCount) of them by this process: it is shared with another process")
        }
        return SysVSegment(identifier: identifier, byteCount: size, mode: perms & 0o777, userID: userID, groupID: groupID, markedForRemoval: true)
    }

    /// The VMA table, classified, refusing what the restorer cannot rebuild.
    /// Mappings whose madvise-like flags the restorer cannot give back: mlock (locking again faults every
    /// page in, and post-copy's pages are not there yet) and mseal (a sealed mapping cannot be laid out
    /// and filled the way the restore does).
    static func checkAdvice(_ mappings: [Mapping], processID: ProcessID) throws(CheckpointError) {
        for mapping in mappings where !mapping.advice.isDisjoint(with: MappingAdvice.refused) {
            let range = "\(hex(mapping.start))-\(hex(mapping.end))"
            let what = mapping.advice.contains(.locked) ? "locked in memory (mlock)" : "sealed (mseal)"
            throw .unsupportedMapping(processID, range: range, reason: "it is \(what), which the restore cannot do again")
        }
    }

    static func mappings(_ processID: ProcessID) throws(CheckpointError) -> [Mapping] {
        let entries: [MapsEntry]
        do { entries = try ProcFS.maps(processID) } catch { throw .readFailed(processID, "reading its memory map", error) }
        var result: [Mapping] = []
        var sharedObjects: [String: Int32] = [:]
        for entry in entries {
            let range = "\(hex(entry.start))-\(hex(entry.end)) \(entry.path)"
            let kind: MappingKind
            if let memory = try sharedMemory(processID, entry: entry, range: range, objects: &sharedObjects) {
                result.append(Mapping(start: entry.start, end: entry.end, readable: entry.readable, writable: entry.writable,
                                      executable: entry.executable, shared: true, fileOffset: entry.fileOffset, kind: .sharedMemory(memory)))
                continue
            }
            switch entry.path {
            case "": kind = .anonymous
            case "[heap]": kind = .heap
            case "[stack]": kind = .stack
            case "[vvar]", "[vvar_vclock]", "[vdso]": kind = .vdsoPart(name: entry.path)
            case "[vsyscall]": kind = .vsyscall
            default:
                let object = entry.kernelPath
                if object.isSpecial {
                    throw .unsupportedMapping(processID, range: range, reason: "special mapping \(entry.path)")
                }
                if object.isSysVSegment {
                    throw .unsupportedMapping(processID, range: range, reason: "SysV shared memory mapped in a way this fammig does not know")
                }
                if object.isDeleted {
                    throw .unsupportedMapping(processID, range: range, reason: entry.shared ? "its file was deleted"
                        : "a private mapping of a deleted file or memfd")
                }
                guard object.isFilePath else {
                    throw .unsupportedMapping(processID, range: range, reason: "not a regular file")
                }
                kind = .file(path: entry.path)
            }
            if entry.shared, case .anonymous = kind {
                throw .unsupportedMapping(processID, range: range, reason: "shared anonymous memory")
            }
            result.append(Mapping(start: entry.start, end: entry.end, readable: entry.readable,
                                  writable: entry.writable, executable: entry.executable, shared: entry.shared,
                                  fileOffset: entry.fileOffset, kind: kind))
        }
        // A SysV segment's pages go in through a writable attach (dirtyPageAddresses).
        for mapping in result {
            guard case .sharedMemory(let memory) = mapping.kind, let segment = memory.sysv else { continue }
            let writable = result.contains { if case .sharedMemory(let other) = $0.kind { other.object == memory.object && $0.writable } else { false } }
            if !writable {
                throw .unsupportedMapping(processID, range: "\(hex(mapping.start))-\(hex(mapping.end)) SysV segment \(segment.identifier)",
                                          reason: "a SysV segment attached only read-only (its pages are restored through a writable attach)")
            }
        }
        return result
    }
}

/// An address as 0x-hex, for messages and traces.
public func hex(_ value: UInt64) -> String { "0x" + String(value, radix: 16) }


/// The pages a dump of `processID` would hold right now (benchmarks use it for their baselines).
public func dumpablePageAddresses(of processID: ProcessID) throws(CheckpointError) -> [UInt64] {
    try Preflight.dirtyPageAddresses(processID, mappings: Preflight.mappings(processID))
}
