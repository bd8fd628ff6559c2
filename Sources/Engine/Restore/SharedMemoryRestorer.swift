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

    private enum Number { static let ftruncate = 77, memfdCreate = 319 }
    private static let mapShared: UInt64 = 0x01, mapAnonymous: UInt64 = 0x20, fixedNoReplace: UInt64 = 0x100000
    private static let mayMoveFixed: UInt64 = 3  // MREMAP_MAYMOVE | MREMAP_FIXED

    func make(_ object: SharedMemory, mappings: [Mapping], avoiding extra: [Range<UInt64>]) throws {
        let parts = mappings.filter { if case .sharedMemory(let other) = $0.kind { other.object == object.object } else { false } }
        precondition(!parts.isEmpty, "shared memory object \(object.object) has no mapping")
        if let name = object.memfdName {
            try memory.write(Array(name.utf8) + [0], at: dataAddress + 8192)
            // MFD_CLOEXEC, and MFD_ALLOW_SEALING unless the victim's had none.
            let descriptor = try injector.call("memfd_create(\(name))", Number.memfdCreate, dataAddress + 8192, object.sealingForbidden ? 1 : 3)
            defer { _ = try? injector.raw("close(memfd)", Syscall.close, [descriptor]) }
            try injector.call("ftruncate(memfd)", Number.ftruncate, descriptor, object.byteCount)
            for part in parts {
                try injector.call("mmap(\(hex(part.start)) memfd:\(name))", Syscall.mmap, part.start, part.byteCount,
                                  UInt64(part.protection), Self.mapShared | Self.fixedNoReplace, descriptor, part.fileOffset)
            }
            return
        }
        let avoid = mappings.map { ($0.start, $0.end) } + extra.map { ($0.lowerBound, $0.upperBound) }
        guard let staging = AddressSpace.freeRange(byteCount: object.byteCount, avoiding: avoid) else {
            throw RestoreError.layout("no free range of \(object.byteCount) bytes to make shared memory object \(object.object) in")
        }
        try injector.call("mmap(shared anonymous \(object.object))", Syscall.mmap, staging, object.byteCount, 3,
                          Self.mapShared | Self.mapAnonymous | Self.fixedNoReplace, UInt64.max, 0)
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
}
