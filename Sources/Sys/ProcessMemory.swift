// Why this file exists: two independent ways into another process's memory. /proc/PID/mem works on
// read-only and PROT_NONE mappings (FOLL_FORCE) and is how the restorer writes; process_vm_readv
// is the fast path and the oracle's independent path.
internal import CSys
#if canImport(Glibc)
import Glibc
#endif

/// An open /proc/PID/mem. Invariant: `descriptor` is open until `close()` or deinit.
public final class ProcessMemory: @unchecked Sendable {
    public let processID: ProcessID
    private var descriptor: Int32

    public init(_ processID: ProcessID, writable: Bool) throws {
        self.processID = processID
        let path = "/proc/\(processID)/mem"
        descriptor = try retryingInterrupts("open(\(path))") { open(path, (writable ? O_RDWR : O_RDONLY) | O_CLOEXEC) }
    }

    deinit { close() }

    public func close() {
        if descriptor >= 0 { Glibc.close(descriptor); descriptor = -1 }
    }

    public func read(at address: UInt64, byteCount: Int) throws -> [UInt8] {
        var bytes = [UInt8](repeating: 0, count: byteCount)
        try bytes.withUnsafeMutableBytes { (buffer) throws in
            try transfer(UnsafeMutableRawBufferPointer(buffer), address: address, writing: false)
        }
        return bytes
    }

    public func write(_ bytes: [UInt8], at address: UInt64) throws {
        var copy = bytes
        try copy.withUnsafeMutableBytes { (buffer) throws in
            try transfer(buffer, address: address, writing: true)
        }
    }

    /// Writes `byteCount` bytes at `offset` of `bytes` into the process.
    public func write(_ bytes: [UInt8], offset: Int, byteCount: Int, to address: UInt64) throws {
        precondition(offset >= 0 && offset + byteCount <= bytes.count, "write of \(byteCount) bytes at \(offset) of \(bytes.count)")
        try bytes.withUnsafeBytes { (buffer) throws in
            try transfer(UnsafeMutableRawBufferPointer(mutating: UnsafeRawBufferPointer(rebasing: buffer[offset..<(offset + byteCount)])),
                         address: address, writing: true)
        }
    }

    /// Writes `byteCount` bytes from a FAM mapping straight into the process (no intermediate copy).
    public func write(from mapping: SharedMapping, at mappingOffset: Int, byteCount: Int, to address: UInt64) throws {
        precondition(mappingOffset >= 0 && mappingOffset + byteCount <= mapping.byteCount, "write past the FAM mapping")
        let source = UnsafeMutableRawPointer(bitPattern: mapping.address(at: mappingOffset))!
        try transfer(UnsafeMutableRawBufferPointer(start: source, count: byteCount), address: address, writing: true)
    }

    /// Digest of `byteCount` bytes at `address`, read through /proc/PID/mem.
    public func digest(at address: UInt64, byteCount: Int, seed: UInt64) throws -> UInt64 {
        let bytes = try read(at: address, byteCount: byteCount)
        return bytes.withUnsafeBytes { csys_digest64($0.baseAddress, $0.count, seed) }
    }

    private func transfer(_ buffer: UnsafeMutableRawBufferPointer, address: UInt64, writing: Bool) throws {
        var doneByteCount = 0
        let call = "\(writing ? "pwrite" : "pread")(/proc/\(processID)/mem, 0x\(String(address, radix: 16)))"
        while doneByteCount < buffer.count {
            let count = try retryingInterrupts(call) {
                writing
                    ? pwrite(descriptor, buffer.baseAddress! + doneByteCount, buffer.count - doneByteCount,
                             off_t(Int64(bitPattern: address &+ UInt64(doneByteCount))))
                    : pread(descriptor, buffer.baseAddress! + doneByteCount, buffer.count - doneByteCount,
                            off_t(Int64(bitPattern: address &+ UInt64(doneByteCount))))
            }
            if count == 0 { throw SyscallError(call: call, errno: .ioError) }
            doneByteCount += count
        }
    }
}

/// process_vm_readv of one range into a fresh array.
/// Reads another process's memory: process_vm_readv, or /proc/PID/mem where that refuses (EFAULT on
/// pages the process itself may not read, PROT_NONE, which /proc/PID/mem reads by force).
public func readProcessMemory(_ processID: ProcessID, address: UInt64, byteCount: Int) throws -> [UInt8] {
    do {
        return try processVMRead(processID, address: address, byteCount: byteCount)
    } catch let error as SyscallError where error.errno == .badAddress {
        // If /proc/PID/mem cannot read it either (a page past the end of its file), the first error stands.
        guard let memory = try? ProcessMemory(processID, writable: false) else { throw error }
        defer { memory.close() }
        guard let bytes = try? memory.read(at: address, byteCount: byteCount) else { throw error }
        return bytes
    }
}

public func processVMRead(_ processID: ProcessID, address: UInt64, byteCount: Int) throws -> [UInt8] {
    var bytes = [UInt8](repeating: 0, count: byteCount)
    let call = "process_vm_readv(\(processID), 0x\(String(address, radix: 16)), \(byteCount))"
    try bytes.withUnsafeMutableBytes { (buffer) throws in
        var doneByteCount = 0
        while doneByteCount < byteCount {
            var local = iovec(iov_base: buffer.baseAddress! + doneByteCount, iov_len: byteCount - doneByteCount)
            var remote = iovec(iov_base: UnsafeMutableRawPointer(bitPattern: UInt(address) + UInt(doneByteCount)),
                               iov_len: byteCount - doneByteCount)
            // A failure names the first address that could not be read.
            let call = doneByteCount == 0 ? call
                : "process_vm_readv(\(processID), 0x\(String(address + UInt64(doneByteCount), radix: 16)), \(byteCount - doneByteCount))"
            let count = try retryingInterrupts(call) { csys_process_vm_readv(processID.rawValue, &local, 1, &remote, 1) }
            if count == 0 { throw SyscallError(call: call, errno: .badAddress) }
            doneByteCount += count
        }
    }
    return bytes
}

/// The digest every page oracle and image mark uses (csys_digest64).
public func pageDigest(_ bytes: [UInt8], seed: UInt64 = 0) -> UInt64 {
    bytes.withUnsafeBytes { csys_digest64($0.baseAddress, $0.count, seed) }
}
