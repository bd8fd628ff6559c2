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

/// A userfaultfd of another process's mm, held here. Invariant: `descriptor` is open until `close()`.
public final class Userfaultfd: @unchecked Sendable {
    public private(set) var descriptor: Int32

    /// Takes a copy of descriptor `remoteDescriptor` of `processID` (pidfd_getfd).
    public init(processID: ProcessID, remoteDescriptor: Int32) throws(SyscallError) {
        let pidfd = try checked("pidfd_open(\(processID))") { csys_pidfd_open(processID.rawValue) }
        defer { Glibc.close(pidfd) }
        descriptor = try checked("pidfd_getfd(\(processID), \(remoteDescriptor))") { csys_pidfd_getfd(pidfd, remoteDescriptor) }
    }

    /// Takes ownership of a userfaultfd descriptor of this process.
    init(descriptor: Int32) {
        self.descriptor = descriptor
    }

    deinit { close() }

    public func close() {
        if descriptor >= 0 { Glibc.close(descriptor); descriptor = -1 }
    }

    /// UFFDIO_API; returns the features the kernel offers.
    @discardableResult
    public func handshake() throws(SyscallError) -> UInt64 {
        var api = uffdio_api(api: UInt64(UFFD_API), features: 0, ioctls: 0)
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

    private func copyRaw(source: UInt64, to address: UInt64, byteCount: Int, dontWake: Bool) throws(SyscallError) -> CopyOutcome {
        var copy = uffdio_copy(dst: address, src: source, len: UInt64(byteCount),
                               mode: dontWake ? UInt64(UFFDIO_COPY_MODE_DONTWAKE) : 0, copy: 0)
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

    /// The next pending fault, or nil when none is pending (the descriptor is non-blocking).
    public func nextFault() throws(SyscallError) -> PageFault? {
        var message = uffd_msg()
        while true {
            let count = read(descriptor, &message, MemoryLayout<uffd_msg>.size)
            if count == MemoryLayout<uffd_msg>.size {
                guard message.event == UInt8(UFFD_EVENT_PAGEFAULT) else { continue }
                let fault = message.arg.pagefault
                return PageFault(address: fault.address & ~UInt64(4095), isWrite: fault.flags & UInt64(UFFD_PAGEFAULT_FLAG_WRITE) != 0,
                                 threadID: ProcessID(Int32(bitPattern: fault.feat.ptid)))
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
