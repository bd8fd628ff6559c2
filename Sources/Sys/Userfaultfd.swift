// Why this file exists: userfaultfd is how a restored process gets its pages: ranges are registered for
// missing-page faults, and UFFDIO_COPY installs pages straight from a FAM mapping. Its traps (partial
// copies, EEXIST, DONTWAKE) become values here so callers must handle them.
internal import CSys
#if canImport(Glibc)
import Glibc
#endif

/// The outcome of one UFFDIO_COPY.
public enum CopyOutcome: Equatable, Sendable {
    case copied
    /// EAGAIN: a later page of the range was already present; `byteCount` bytes were copied. Go on
    /// from there (never treat it as an error: skipped pages would read as zeros after unregister).
    case partial(byteCount: Int)
    /// EEXIST: the first page is already present. Skip one page, and still wake whoever waits on it.
    case firstPageAlreadyPresent
}

/// A missing-page fault read from the userfaultfd.
public struct PageFault: Equatable, Sendable {
    public var address: UInt64
    public var isWrite: Bool
    public var threadID: ProcessID
}

/// What the process did to its registered memory (non-cooperative events): the thread that did it waits
/// in the kernel until the event is read.
public enum MemoryEvent: Equatable, Sendable {
    /// mremap moved `length` bytes from `from` to `to` (registration and pages moved along).
    case remapped(from: UInt64, to: UInt64, length: UInt64)
    /// MADV_DONTNEED / MADV_REMOVE dropped the pages of the range: they read as zeros from now on.
    case removed(start: UInt64, end: UInt64)
    /// munmap removed the range.
    case unmapped(start: UInt64, end: UInt64)
}

/// One message of a userfaultfd.
public enum UserfaultMessage: Equatable, Sendable {
    case fault(PageFault)
    case event(MemoryEvent)
}

/// A userfaultfd of another process's mm, held here. Invariant: `descriptor` is open until `close()`.
public final class Userfaultfd: @unchecked Sendable {
    public private(set) var descriptor: Int32

    /// Takes a copy of descriptor `remoteDescriptor` of `processID` (pidfd_getfd).
    public init(processID: ProcessID, remoteDescriptor: Int32) throws(SyscallError) {
        descriptor = try ProcessHandle(processID).copyOfDescriptor(remoteDescriptor)
    }

    /// A new userfaultfd of this process's own mm (non-blocking, close-on-exec), before its handshake.
    public static func ofThisProcess() throws(SyscallError) -> Userfaultfd {
        let descriptor = try checked("userfaultfd") { csys_syscall6(Syscall.userfaultfd, Int(O_CLOEXEC | O_NONBLOCK), 0, 0, 0, 0, 0) }
        return Userfaultfd(descriptor: Int32(descriptor))
    }

    /// Another descriptor of the same userfaultfd (dup), as a debugger or a child that inherited it holds
    /// one: while any copy is open, closing the others releases nothing.
    public func copy() throws(SyscallError) -> Userfaultfd {
        let copied = try checked("dup(userfaultfd)") { dup(descriptor) }
        return Userfaultfd(descriptor: copied)
    }

    /// Takes ownership of a userfaultfd descriptor of this process.
    init(descriptor: Int32) {
        self.descriptor = descriptor
    }

    deinit { close() }

    public func close() {
        if descriptor >= 0 { Glibc.close(descriptor); descriptor = -1 }
    }

    /// The features a restore asks for: the faulting thread's ID, and events for mremap, MADV_DONTNEED
    /// and munmap of registered memory (without them a lazy page would be installed where the process
    /// dropped or moved it).
    /// UFFD_FEATURE_MISSING_SHMEM (1 << 5): missing-page faults on shared memory (shared anonymous,
    /// memfd), installed with UFFDIO_COPY and UFFDIO_ZEROPAGE like anonymous ones.
    public static let restoreFeatures: UInt64 = (1 << 2) | (1 << 3) | (1 << 5) | (1 << 6) | (1 << 8)

    /// UFFDIO_API asking for `features`; returns the features the kernel grants.
    @discardableResult
    public func handshake(features: UInt64 = 0) throws(SyscallError) -> UInt64 {
        var api = uffdio_api(api: UInt64(UFFD_API), features: features, ioctls: 0)
        try checked("ioctl(UFFDIO_API)") { csys_ioctl_pointer(descriptor, CSYS_UFFDIO_API, &api) }
        return api.features
    }

    /// UFFDIO_REGISTER for missing-page faults.
    public func registerMissing(start: UInt64, byteCount: UInt64) throws(SyscallError) {
        var register = uffdio_register(range: uffdio_range(start: start, len: byteCount), mode: UInt64(UFFDIO_REGISTER_MODE_MISSING), ioctls: 0)
        try checked("ioctl(UFFDIO_REGISTER, 0x\(String(start, radix: 16)), \(byteCount))") {
            csys_ioctl_pointer(descriptor, CSYS_UFFDIO_REGISTER, &register)
        }
    }

    public func unregister(start: UInt64, byteCount: UInt64) throws(SyscallError) {
        var range = uffdio_range(start: start, len: byteCount)
        try checked("ioctl(UFFDIO_UNREGISTER, 0x\(String(start, radix: 16)))") {
            csys_ioctl_pointer(descriptor, CSYS_UFFDIO_UNREGISTER, &range)
        }
    }

    /// UFFDIO_COPY of `byteCount` bytes at `mappingOffset` of a FAM mapping to `address` of the target.
    public func copy(from mapping: SharedMapping, at mappingOffset: Int, to address: UInt64, byteCount: Int,
                     dontWake: Bool) throws(SyscallError) -> CopyOutcome {
        precondition(mappingOffset >= 0 && mappingOffset + byteCount <= mapping.byteCount, "copy past the FAM mapping")
        return try copyRaw(source: UInt64(mapping.address(at: mappingOffset)), to: address, byteCount: byteCount, dontWake: dontWake)
    }

    /// UFFDIO_COPY from bytes in this process (pages that came over a socket).
    public func copy(bytes: [UInt8], to address: UInt64, dontWake: Bool) throws -> CopyOutcome {
        precondition(bytes.count % 4096 == 0 && !bytes.isEmpty, "copy of \(bytes.count) bytes: not whole pages")
        return try bytes.withUnsafeBytes { (buffer) throws -> CopyOutcome in
            try copyRaw(source: UInt64(UInt(bitPattern: buffer.baseAddress)), to: address, byteCount: bytes.count, dontWake: dontWake)
        }
    }

    /// UFFDIO_COPY of `byteCount` bytes at `offset` of `bytes` (a private copy of pages, checked before).
    public func copy(bytes: [UInt8], offset: Int, byteCount: Int, to address: UInt64, dontWake: Bool) throws -> CopyOutcome {
        precondition(offset >= 0 && byteCount > 0 && offset + byteCount <= bytes.count && byteCount % 4096 == 0,
                     "copy of \(byteCount) bytes at \(offset) of \(bytes.count): not whole pages inside")
        return try bytes.withUnsafeBytes { (buffer) throws -> CopyOutcome in
            try copyRaw(source: UInt64(UInt(bitPattern: buffer.baseAddress! + offset)), to: address, byteCount: byteCount, dontWake: dontWake)
        }
    }

    private func copyRaw(source: UInt64, to address: UInt64, byteCount: Int, dontWake: Bool) throws(SyscallError) -> CopyOutcome {
        var copy = uffdio_copy(dst: address, src: source, len: UInt64(byteCount),
                               mode: dontWake ? UInt64(UFFDIO_COPY_MODE_DONTWAKE) : 0, copy: 0)
        // Repeats only on EINTR; ends at anything else.
        while true {
            if csys_ioctl_pointer(descriptor, CSYS_UFFDIO_COPY, &copy) == 0 { return .copied }
            let error = SyscallError.current("ioctl(UFFDIO_COPY, 0x\(String(address, radix: 16)), \(byteCount))")
            switch error.errno {
            case .interrupted: continue
            case .resourceTemporarilyUnavailable where copy.copy > 0: return .partial(byteCount: Int(copy.copy))
            case .fileExists: return .firstPageAlreadyPresent
            default: throw error
            }
        }
    }

    /// UFFDIO_ZEROPAGE: a page the victim never touched (it was not dumped) reads as zeros.
    public func zeroPage(at address: UInt64, dontWake: Bool) throws(SyscallError) -> CopyOutcome {
        var zero = uffdio_zeropage(range: uffdio_range(start: address, len: 4096), mode: dontWake ? UInt64(UFFDIO_ZEROPAGE_MODE_DONTWAKE) : 0, zeropage: 0)
        // Repeats only on EINTR; ends at anything else.
        while true {
            if csys_ioctl_pointer(descriptor, CSYS_UFFDIO_ZEROPAGE, &zero) == 0 { return .copied }
            let error = SyscallError.current("ioctl(UFFDIO_ZEROPAGE, 0x\(String(address, radix: 16)))")
            switch error.errno {
            case .interrupted: continue
            case .fileExists: return .firstPageAlreadyPresent
            default: throw error
            }
        }
    }

    /// UFFDIO_WAKE: wakes threads waiting on faults in the range.
    public func wake(address: UInt64, byteCount: Int) throws(SyscallError) {
        var range = uffdio_range(start: address, len: UInt64(byteCount))
        try checked("ioctl(UFFDIO_WAKE, 0x\(String(address, radix: 16)))") { csys_ioctl_pointer(descriptor, CSYS_UFFDIO_WAKE, &range) }
    }

    /// Whether a memory event of this userfaultfd is on its way: an mremap, munmap or MADV_DONTNEED met a
    /// registered range and its thread has not yet seen its event completed (read by us, or the
    /// userfaultfd released). Until the event is queued its thread runs in the kernel, so a read that
    /// finds no message does not prove that none will come; this does. The kernel counts such events
    /// (the context's mmap_changing, from the event's preparation until its thread saw it completed)
    /// and refuses UFFDIO_WRITEPROTECT with EAGAIN while the count is not zero, before it looks at the
    /// range (Linux 6.18, mm/userfaultfd.c); the probe asks to un-protect one page at 4 GiB, which no
    /// restore registers for write protection, so without an event it fails (ENOENT) and changes nothing.
    public func hasEventInFlight() -> Bool {
        var probe = uffdio_writeprotect(range: uffdio_range(start: 1 << 32, len: 4096), mode: 0)
        let result = csys_ioctl_pointer(descriptor, CSYS_UFFDIO_WRITEPROTECT, &probe)
        return result < 0 && errno == EAGAIN
    }

    /// The next pending fault or event, or nil when none is pending.
    public func nextMessage() throws(SyscallError) -> UserfaultMessage? {
        var message = uffd_msg()
        // Repeats on EINTR and on message kinds that are skipped; ends at a message, EAGAIN or an error.
        while true {
            let count = read(descriptor, &message, MemoryLayout<uffd_msg>.size)
            if count == MemoryLayout<uffd_msg>.size {
                switch Int32(message.event) {
                case Int32(UFFD_EVENT_PAGEFAULT):
                    let fault = message.arg.pagefault
                    return .fault(PageFault(address: fault.address & ~UInt64(4095),
                                            isWrite: fault.flags & UInt64(UFFD_PAGEFAULT_FLAG_WRITE) != 0,
                                            threadID: ProcessID(Int32(bitPattern: fault.feat.ptid))))
                case Int32(UFFD_EVENT_REMAP):
                    let remap = message.arg.remap
                    return .event(.remapped(from: remap.from, to: remap.to, length: remap.len))
                case Int32(UFFD_EVENT_REMOVE):
                    return .event(.removed(start: message.arg.remove.start, end: message.arg.remove.end))
                case Int32(UFFD_EVENT_UNMAP):
                    return .event(.unmapped(start: message.arg.remove.start, end: message.arg.remove.end))
                default:
                    continue
                }
            }
            let error = SyscallError.current("read(userfaultfd)")
            if error.errno == .interrupted { continue }
            if error.errno == .resourceTemporarilyUnavailable { return nil }
            throw error
        }
    }

    /// Waits up to `timeoutMilliseconds` for a fault to be readable.
    public func waitReadable(timeoutMilliseconds: Int32) -> Bool {
        var poller = pollfd(fd: descriptor, events: Int16(POLLIN), revents: 0)
        return poll(&poller, 1, timeoutMilliseconds) > 0
    }
}
