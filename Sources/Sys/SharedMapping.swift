// Why this file exists: FAM is a file mapped MAP_SHARED, and the engine must store into it, load from it,
// write cache lines back and fence, and let process_vm_readv fill it straight from the victim. Those are
// all pointer operations; they live here so that Engine speaks only in byte offsets and counts.
import SystemPackage
internal import CSys
#if canImport(Glibc)
import Glibc
#endif

/// The cache-line write-back instruction a mapping uses for `flush(at:count:)`, best first.
public enum FlushInstruction: Int32, Sendable, CustomStringConvertible {
    /// Writes the line back and may keep it cached (cheapest for a writer that reads the page again).
    case clwb = 0
    /// Writes back and invalidates, weakly ordered: needs the `fence()` anyway.
    case clflushopt = 1
    /// Writes back and invalidates, ordered with other clflushes; the fallback every x86-64 has.
    case clflush = 2

    /// What this CPU offers (cpuid leaf 7), asked once per mapping.
    public static func best() -> FlushInstruction {
        FlushInstruction(rawValue: csys_best_flush_method()) ?? .clflush
    }

    public var description: String {
        switch self {
        case .clwb: "clwb"
        case .clflushopt: "clflushopt"
        case .clflush: "clflush"
        }
    }
}

/// One byte range of another process to copy into a mapping by `SharedMapping.readFromProcess`.
public typealias ProcessReadRange = (remoteAddress: UInt64, byteCount: Int, mappingOffset: Int)

/// A FAM file mapped MAP_SHARED into this process.
///
/// Invariant: `base` maps `byteCount` bytes of the file MAP_SHARED from creation until `close()` or
/// `deinit` unmaps them; no pointer leaves Sys (`address(at:)` gives an integer, package-internal, for
/// ioctls such as UFFDIO_COPY that name a source address).
///
/// `@unchecked Sendable` because the mapped bytes are shared memory by design (other nodes write them
/// too), and the only mutable Swift state, `base`, changes only in `close()`, which the owner calls once
/// no other thread uses the mapping. Offsets passed in are the engine's own, so a bad one is a
/// precondition failure; what the bytes say is input, and is judged by the caller.
public final class SharedMapping: @unchecked Sendable {
    public let path: String
    /// Bytes mapped: the file size at `open`, the requested size at `create`. 0 for an empty file.
    public let byteCount: Int
    public let isWritable: Bool
    public let flushInstruction: FlushInstruction
    /// The file's owner and permission bits, from the descriptor that was mapped (so they describe the
    /// very file whose bytes are read, not whatever the path names a moment later).
    public let ownerUserID: UInt32
    public let permissionBits: UInt32
    /// nil once closed, and for an empty file (mmap cannot map 0 bytes).
    private var base: UnsafeMutableRawPointer?
    /// This mapping's slot with the SIGBUS handler (csys_fam_bus_register): the file truncated under it
    /// is exit 2 with the path named, not a crash.
    private var busSlot: Int32 = -1

    private init(path: String, base: UnsafeMutableRawPointer?, byteCount: Int, isWritable: Bool,
                 ownerUserID: UInt32 = geteuid(), permissionBits: UInt32 = SharedMapping.createdFileMode) {
        self.ownerUserID = ownerUserID
        self.permissionBits = permissionBits
        self.path = path
        self.base = base
        self.byteCount = byteCount
        self.isWritable = isWritable
        self.flushInstruction = FlushInstruction.best()
        if let base { busSlot = csys_fam_bus_register(base, byteCount, path) }
    }

    deinit { close() }

    // MARK: Creating, opening, closing

    /// Creates a new file of `byteCount` bytes (it must not exist yet), reserves its blocks and maps it
    /// read-write. `prefault` maps every page now (MAP_POPULATE) so the dump never takes first-touch faults.
    public static func create(path: String, byteCount: Int, prefault: Bool) throws(SyscallError) -> SharedMapping {
        precondition(byteCount > 0, "a FAM file needs at least one byte, asked for \(byteCount)")
        // 0600, never more whatever the umask (it only takes bits away): an image holds the victim's memory
        // and decides what the restored process becomes, so only its owner may read or write it. O_EXCL
        // also refuses a symlink planted at `path` in a shared directory such as /dev/shm.
        let descriptor = try retryingInterrupts("open(\(path), O_CREAT|O_EXCL)") {
            Glibc.open(path, O_CREAT | O_EXCL | O_RDWR | O_CLOEXEC, mode_t(Self.createdFileMode))
        }
        defer { _ = Glibc.close(descriptor) }
        do throws(SyscallError) {
            try retryingInterrupts("ftruncate(\(path), \(byteCount))") { ftruncate(descriptor, off_t(byteCount)) }
            // Reserve the blocks now: on a full /dev/shm this fails here with ENOSPC instead of killing
            // the dumper with SIGBUS half-way through. Filesystems that cannot reserve keep the size.
            let reserveResult = posix_fallocate(descriptor, 0, off_t(byteCount))
            if reserveResult != 0 && reserveResult != EOPNOTSUPP && reserveResult != EINVAL {
                throw SyscallError(call: "posix_fallocate(\(path), \(byteCount))", errno: Errno(rawValue: reserveResult))
            }
            let flags = MAP_SHARED | (prefault ? MAP_POPULATE : 0)
            let base = try map(path: path, descriptor: descriptor, byteCount: byteCount, writable: true, flags: flags)
            return SharedMapping(path: path, base: base, byteCount: byteCount, isWritable: true)
        } catch {
            // We created the file with O_EXCL, so it is ours to remove when we cannot finish it.
            _ = unlink(path)
            throw error
        }
    }

    /// The mode `create` gives a FAM file: read and write for its owner only.
    public static let createdFileMode: UInt32 = 0o600

    /// Maps an existing file whole. An empty file gives a mapping with `byteCount` 0 (mmap cannot map
    /// 0 bytes) so that the caller reports it like any other file too short to hold an image. Anything but
    /// a regular file is refused with EINVAL: the path is input, and a FIFO would block the open forever.
    /// `prefault` maps every page now (MAP_POPULATE): a pool mapped once per node never faults later.
    public static func open(path: String, writable: Bool, prefault: Bool = false) throws(SyscallError) -> SharedMapping {
        // O_NONBLOCK only so that opening a FIFO returns at once (to be refused below); mmap ignores it.
        let descriptor = try retryingInterrupts("open(\(path))") {
            Glibc.open(path, (writable ? O_RDWR : O_RDONLY) | O_CLOEXEC | O_NONBLOCK)
        }
        defer { _ = Glibc.close(descriptor) }
        var status = stat()
        try checked("fstat(\(path))") { fstat(descriptor, &status) }
        guard status.st_mode & S_IFMT == S_IFREG else {
            throw SyscallError(call: "open(\(path)): not a regular file", errno: .invalidArgument)
        }
        let byteCount = Int(status.st_size)
        let (owner, permissions) = (status.st_uid, UInt32(status.st_mode) & 0o7777)
        if byteCount == 0 {
            return SharedMapping(path: path, base: nil, byteCount: 0, isWritable: writable, ownerUserID: owner, permissionBits: permissions)
        }
        let base = try map(path: path, descriptor: descriptor, byteCount: byteCount, writable: writable,
                           flags: MAP_SHARED | (prefault ? MAP_POPULATE : 0))
        return SharedMapping(path: path, base: base, byteCount: byteCount, isWritable: writable, ownerUserID: owner, permissionBits: permissions)
    }

    /// The descriptor is closed right after mmap: the mapping keeps the file alive on its own.
    private static func map(path: String, descriptor: Int32, byteCount: Int, writable: Bool,
                            flags: Int32) throws(SyscallError) -> UnsafeMutableRawPointer {
        let protection = writable ? (PROT_READ | PROT_WRITE) : PROT_READ
        let address = mmap(nil, byteCount, protection, flags, descriptor, 0)
        guard let address, address != UnsafeMutableRawPointer(bitPattern: -1) else {
            throw SyscallError.current("mmap(\(path), \(byteCount))")
        }
        return address
    }

    /// Unmaps. Safe to call twice; any access afterwards is a precondition failure.
    public func close() {
        if let base {
            csys_fam_bus_unregister(busSlot)
            busSlot = -1
            _ = munmap(base, byteCount)
            self.base = nil
        }
    }

    /// Removes a FAM file. Returns false when there was nothing to remove.
    @discardableResult
    public static func remove(path: String) throws(SyscallError) -> Bool {
        if unlink(path) == 0 { return true }
        let error = SyscallError.current("unlink(\(path))")
        if error.errno == .noSuchFileOrDirectory { return false }
        throw error
    }

    // MARK: Bounds

    /// The pointer to `byteOffset`, after checking that `[byteOffset, byteOffset + count)` is mapped.
    private func pointer(at byteOffset: Int, count: Int, forWriting: Bool = false) -> UnsafeMutableRawPointer {
        precondition(count >= 0 && byteOffset >= 0, "negative range \(byteOffset)+\(count) in \(path)")
        precondition(byteOffset <= byteCount && count <= byteCount - byteOffset,
                     "range \(byteOffset)+\(count) outside the \(byteCount)-byte mapping of \(path)")
        precondition(!forWriting || isWritable, "store into read-only mapping of \(path)")
        guard let base else { preconditionFailure("access to closed mapping of \(path)") }
        return base + byteOffset
    }

    /// The integer address of `byteOffset`, for Sys ioctls (UFFDIO_COPY) that take a source address.
    /// Valid only while the mapping is open.
    package func address(at byteOffset: Int) -> UInt {
        UInt(bitPattern: pointer(at: byteOffset, count: 0))
    }

    // MARK: Stores and loads (little endian)

    public func store(bytes: some Collection<UInt8>, at byteOffset: Int) {
        let target = pointer(at: byteOffset, count: bytes.count, forWriting: true)
        // An empty collection may have no base address at all.
        if bytes.isEmpty { return }
        let copied: Void? = bytes.withContiguousStorageIfAvailable { source in
            target.copyMemory(from: source.baseAddress!, byteCount: source.count)
        }
        if copied == nil {
            Array(bytes).withUnsafeBytes { target.copyMemory(from: $0.baseAddress!, byteCount: $0.count) }
        }
    }

    /// One store instruction when `byteOffset` is 8-aligned, so a reader never sees half of it.
    public func storeUInt64(_ value: UInt64, at byteOffset: Int) {
        pointer(at: byteOffset, count: 8, forWriting: true).storeBytes(of: value.littleEndian, as: UInt64.self)
    }

    public func storeUInt32(_ value: UInt32, at byteOffset: Int) {
        pointer(at: byteOffset, count: 4, forWriting: true).storeBytes(of: value.littleEndian, as: UInt32.self)
    }

    public func loadBytes(at byteOffset: Int, count: Int) -> [UInt8] {
        let source = pointer(at: byteOffset, count: count)
        return [UInt8](unsafeUninitializedCapacity: count) { buffer, initializedCount in
            if count > 0 { buffer.baseAddress!.initialize(from: source.assumingMemoryBound(to: UInt8.self), count: count) }
            initializedCount = count
        }
    }

    public func loadUInt64(at byteOffset: Int) -> UInt64 {
        UInt64(littleEndian: pointer(at: byteOffset, count: 8).loadUnaligned(as: UInt64.self))
    }

    public func loadUInt32(at byteOffset: Int) -> UInt32 {
        UInt32(littleEndian: pointer(at: byteOffset, count: 4).loadUnaligned(as: UInt32.self))
    }

    /// csys_digest64 of `count` mapped bytes; `count` must be a multiple of 8 (the digest ignores a tail).
    public func digest(at byteOffset: Int, count: Int, seed: UInt64) -> UInt64 {
        precondition(count % 8 == 0, "digest of \(count) bytes: not a multiple of 8")
        return csys_digest64(pointer(at: byteOffset, count: count), count, seed)
    }

    /// The same digest of bytes already in memory (a snapshot a reader verified before parsing it).
    public static func digest(of bytes: [UInt8], seed: UInt64) -> UInt64 {
        precondition(bytes.count % 8 == 0, "digest of \(bytes.count) bytes: not a multiple of 8")
        return bytes.withUnsafeBytes { csys_digest64($0.baseAddress, $0.count, seed) }
    }

    // MARK: Persistence

    /// Writes back every cache line overlapping the range. Not ordered until `fence()`.
    public func flush(at byteOffset: Int, count: Int) {
        csys_flush_range(pointer(at: byteOffset, count: count), count, flushInstruction.rawValue)
    }

    /// sfence: every earlier flush and store reaches the fabric before any later store.
    public func fence() {
        csys_sfence()
    }

    // MARK: Dump hot path

    /// The kernel's limit on iovecs per process_vm_readv call (IOV_MAX).
    static let iovecLimit = 1024

    /// Copies each range of `processID`'s memory straight into the mapping with process_vm_readv, up to
    /// 1024 ranges per call, no intermediate buffer. A short read (the kernel stops at the first page it
    /// cannot read) is continued from where it stopped; if that page still cannot be read, the error
    /// names its address. Returns the bytes copied (the sum of all `byteCount`s).
    @discardableResult
    public func readFromProcess(processID: ProcessID, ranges: [ProcessReadRange]) throws(SyscallError) -> Int {
        for range in ranges {
            precondition(range.byteCount > 0, "empty range at 0x\(String(range.remoteAddress, radix: 16))")
            _ = pointer(at: range.mappingOffset, count: range.byteCount, forWriting: true)
        }
        var rangeIndex = 0
        var doneInRangeByteCount = 0  // of ranges[rangeIndex], after a short read
        var copiedByteCount = 0
        var localVectors: [iovec] = []
        var remoteVectors: [iovec] = []
        localVectors.reserveCapacity(min(ranges.count, Self.iovecLimit))
        remoteVectors.reserveCapacity(min(ranges.count, Self.iovecLimit))
        while rangeIndex < ranges.count {
            localVectors.removeAll(keepingCapacity: true)
            remoteVectors.removeAll(keepingCapacity: true)
            var batchIndex = rangeIndex
            while batchIndex < ranges.count && localVectors.count < Self.iovecLimit {
                let range = ranges[batchIndex]
                let skipped = batchIndex == rangeIndex ? doneInRangeByteCount : 0
                let local = pointer(at: range.mappingOffset + skipped, count: range.byteCount - skipped, forWriting: true)
                localVectors.append(iovec(iov_base: local, iov_len: range.byteCount - skipped))
                remoteVectors.append(iovec(iov_base: UnsafeMutableRawPointer(bitPattern: UInt(range.remoteAddress) + UInt(skipped)),
                                           iov_len: range.byteCount - skipped))
                batchIndex += 1
            }
            let firstAddress = ranges[rangeIndex].remoteAddress + UInt64(doneInRangeByteCount)
            let call = "process_vm_readv(\(processID), 0x\(String(firstAddress, radix: 16)))"
            let vectorCount = UInt(localVectors.count)
            let readCount = try retryingInterrupts(call) {
                csys_process_vm_readv(processID.rawValue, localVectors, vectorCount, remoteVectors, vectorCount)
            }
            // 0 bytes for a non-empty request means the first page is unreadable; without this the loop
            // would never end.
            if readCount == 0 { throw SyscallError(call: call, errno: .badAddress) }
            copiedByteCount += readCount
            var unaccountedByteCount = readCount
            while unaccountedByteCount > 0 {
                let leftInRange = ranges[rangeIndex].byteCount - doneInRangeByteCount
                if unaccountedByteCount >= leftInRange {
                    unaccountedByteCount -= leftInRange
                    rangeIndex += 1
                    doneInRangeByteCount = 0
                } else {
                    doneInRangeByteCount += unaccountedByteCount
                    unaccountedByteCount = 0
                }
            }
        }
        return copiedByteCount
    }
}
