// Recreates one shared-memory object of the victim in the target with all its mappings, each at its
// address and offset, so that they share pages as they did. Shared anonymous memory has no name to open
// twice: it is made once at a free address, as large as the object, each mapping's part is mapped again
// where it belongs (mremap with old size 0 keeps the object and the offset), and the staging is unmapped. A memfd is made by name, sized,
// and mapped at each offset; its descriptor is closed (a descriptor the victim held reopens the object
// through map_files, DescriptorRestorer). The pages come afterwards, like anonymous ones.
import Sys

struct SharedMemoryRestorer {
    let injector: SyscallInjector
    let memory: ProcessMemory
    let dataAddress: UInt64

    private enum Number { static let ftruncate = 77, memfdCreate = 319, shmget = 29, shmat = 30, shmctl = 31 }
    private static let mayMoveFixed: UInt64 = 3  // MREMAP_MAYMOVE | MREMAP_FIXED

    func make(_ object: SharedMemory, mappings: [Mapping], avoiding extra: [Range<UInt64>]) throws {
        let parts = mappings.filter { if case .sharedMemory(let other) = $0.kind { other.object == object.object } else { false } }
        precondition(!parts.isEmpty, "shared memory object \(object.object) has no mapping")
        if let segment = object.sysv {
            try makeSysV(segment, parts: parts)
            return
        }
        if let name = object.memfdName {
            try memory.write(Array(name.utf8) + [0], at: dataAddress + 8192)
            // MFD_CLOEXEC, and MFD_ALLOW_SEALING unless the victim's had none.
            let descriptor = try injector.call("memfd_create(\(name))", Number.memfdCreate, dataAddress + 8192, object.sealingForbidden ? 1 : 3)
            defer { _ = try? injector.raw("close(memfd)", Syscall.close, [descriptor]) }
            try injector.call("ftruncate(memfd)", Number.ftruncate, descriptor, object.byteCount)
            for part in parts {
                try injector.call("mmap(\(hex(part.start)) memfd:\(name))", Syscall.mmap, part.start, part.byteCount,
                                  UInt64(part.protection), MapFlags([.shared, .fixedNoReplace]).rawValue, descriptor, part.fileOffset)
            }
            return
        }
        let avoid = mappings.map { ($0.start, $0.end) } + extra.map { ($0.lowerBound, $0.upperBound) }
        guard let staging = AddressSpace.freeRange(byteCount: object.byteCount, avoiding: avoid) else {
            throw RestoreError.layout("no free range of \(object.byteCount) bytes to make shared memory object \(object.object) in")
        }
        try injector.call("mmap(shared anonymous \(object.object))", Syscall.mmap, staging, object.byteCount,
                          MemoryProtection([.read, .write]).rawValue, MapFlags([.shared, .anonymous, .fixedNoReplace]).rawValue, UInt64.max, 0)
        for part in parts {
            // Old size 0: a second mapping of the same pages, not a move, so that mappings whose offsets
            // overlap (a view made by mremap(old_size 0)) each find their pages.
            try injector.call("mremap(\(hex(part.start)))", Syscall.mremap, staging + part.fileOffset, 0, part.byteCount,
                              Self.mayMoveFixed, part.start)
            if part.protection != 3 {
                try injector.call("mprotect(\(hex(part.start)))", Syscall.mprotect, part.start, part.byteCount, UInt64(part.protection))
            }
        }
        try injector.call("munmap(staging)", Syscall.munmap, staging, object.byteCount)
    }

    /// The SysV segment IDs of `state`'s tree that this node's IPC namespace still has (the victim's,
    /// while it lives on one machine).
    static func sysvIdentifiersInUse(_ state: ProcessState) -> [Int32] {
        let wanted = state.sysvSegmentIdentifiers
        guard !wanted.isEmpty, let present = try? ProcFS.sysvSharedMemoryIdentifiers() else { return [] }
        return wanted.filter(present.contains)
    }

    /// A SysV segment with its old ID (kernel.shm_next_id names the ID the next shmget of this IPC
    /// namespace takes), its mode and owner, attached at each of its addresses, and marked for removal
    /// again. Its pages come afterwards through its first writable attach (Preflight).
    private func makeSysV(_ segment: SysVSegment, parts: [Mapping]) throws {
        let privateKey: UInt64 = 0, create: UInt64 = 0o1000, exclusive: UInt64 = 0o2000
        // The target's own IPC namespace (a fresh one, or this node's).
        let nextIdentifier = "/proc/sys/kernel/shm_next_id", target = injector.tracee.processID
        do { try IPCNamespace.writeText(nextIdentifier, "\(segment.identifier)", asSeenBy: target) } catch {
            throw RestoreError.system("setting kernel.shm_next_id to \(segment.identifier) for a SysV segment: \(error)")
        }
        let made = try injector.raw("shmget(\(segment.identifier))", Number.shmget, [privateKey, segment.byteCount, create | exclusive | UInt64(segment.mode)])
        _ = try? IPCNamespace.writeText(nextIdentifier, "-1", asSeenBy: target)
        guard made >= 0 else {
            throw RestoreError.system("shmget for SysV segment \(segment.identifier) failed: errno \(-made) (ENOSPC: that ID is taken on this node)")
        }
        let identifier = UInt64(made)
        guard made == Int64(segment.identifier) else {
            _ = try? injector.raw("shmctl(IPC_RMID)", Number.shmctl, [identifier, 0, 0])
            throw RestoreError.system("shmget gave SysV segment \(made), not \(segment.identifier) (its ID is taken on this node)")
        }
        let readOnly: UInt64 = 0o10000, executable: UInt64 = 0o100000
        for part in parts {
            let flags = (part.writable ? 0 : readOnly) | (part.executable ? executable : 0)
            let address = try injector.call("shmat(\(segment.identifier), \(hex(part.start)))", Number.shmat, identifier, part.start, flags)
            guard address == part.start else { throw RestoreError.layout("shmat put SysV segment \(segment.identifier) at \(hex(address)), not \(hex(part.start))") }
        }
        if segment.userID != 0 || segment.groupID != 0 {
            // struct shmid64_ds: shm_perm (key, uid, gid, cuid, cgid, mode ...) first; IPC_SET takes uid,
            // gid and the low 9 bits of mode.
            var record: [UInt8] = []
            record.appendLittleEndian(UInt32(0))
            record.appendLittleEndian(segment.userID)
            record.appendLittleEndian(segment.groupID)
            record.appendLittleEndian(UInt64(0))  // cuid, cgid: not settable
            record.appendLittleEndian(UInt16(segment.mode))
            record += [UInt8](repeating: 0, count: 112 - record.count)
            try memory.write(record, at: dataAddress + 8192)
            let ipcSet: UInt64 = 1
            try injector.call("shmctl(\(segment.identifier), IPC_SET)", Number.shmctl, identifier, ipcSet, dataAddress + 8192)
        }
        if segment.markedForRemoval {
            let ipcRemove: UInt64 = 0
            try injector.call("shmctl(\(segment.identifier), IPC_RMID)", Number.shmctl, identifier, ipcRemove, 0)
        }
    }
}
