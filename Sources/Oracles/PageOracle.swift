// The page oracle: at freeze it digests every page the dumper will dump, reading through /proc/PID/mem
// (the dumper reads with process_vm_readv); before the target runs it reads each page back from the
// target with process_vm_readv and compares. The kernel rewrites rseq's cpu fields whenever a process
// runs, so those bytes are masked on both sides.
import Engine
import Sys

public struct PageMismatch: Error, CustomStringConvertible, Sendable {
    public let address: UInt64
    public let reason: String
    public var description: String { "page 0x\(String(address, radix: 16)): \(reason)" }
}

public final class PageOracle: @unchecked Sendable {
    private(set) var digests: [UInt64: UInt64] = [:]
    private var maskedRanges: [(UInt64, UInt64)] = []
    public private(set) var checkedPageCount = 0
    static let runByteLimit = 2 << 20

    public init() {}

    /// Digests every page of `pageAddresses` in the frozen process.
    public func recordFrozen(processID: ProcessID, pageAddresses: [UInt64], rseq: [RseqConfiguration]) throws {
        try recordFrozen(processIDs: [processID], pageAddresses: pageAddresses, rseq: [rseq])
    }

    /// Digests every page of a frozen tree: a page address carries the ordinal of its process
    /// (TreePageAddress; `processIDs` and `rseq` are by ordinal), and is read from that process.
    public func recordFrozen(processIDs: [ProcessID], pageAddresses: [UInt64], rseq: [[RseqConfiguration]]) throws {
        maskedRanges = rseq.enumerated().flatMap { ordinal, configurations in
            configurations.flatMap { Self.rseqCPUFields($0) }.map {
                (TreePageAddress.tagged($0.0, ordinal: ordinal), TreePageAddress.tagged($0.1, ordinal: ordinal))
            }
        }
        digests.reserveCapacity(pageAddresses.count)
        for (ordinal, processID) in processIDs.enumerated() {
            let own = pageAddresses.filter { TreePageAddress.ordinal(of: $0) == ordinal }
            if own.isEmpty { continue }
            let memory = try ProcessMemory(processID, writable: false)
            defer { memory.close() }
            try Self.forEachRun(own) { start, pageCount in
                let bytes = try memory.read(at: TreePageAddress.address(of: start), byteCount: pageCount * .pageSize)
                for index in 0..<pageCount {
                    let address = start + UInt64(index) * .pageSize
                    digests[address] = digestPage(bytes, offset: index * .pageSize, address: address)
                }
            }
        }
    }

    /// Reads recorded pages back from the target and compares; throws on the first mismatch. Without
    /// `addresses`, every recorded page (a nonlive target holds them all before it runs).
    public func verifyTarget(processID: ProcessID, addresses requested: [UInt64]? = nil) throws {
        try verifyTarget(processIDs: [processID], addresses: requested)
    }

    /// The same for a tree: each page read back from the process of its ordinal (`processIDs`).
    public func verifyTarget(processIDs: [ProcessID], addresses requested: [UInt64]? = nil) throws {
        if requested == nil { checkedPageCount = 0 }
        let addresses = requested ?? digests.keys.sorted()
        try Self.forEachRun(addresses) { start, pageCount in
            let ordinal = TreePageAddress.ordinal(of: start)
            guard ordinal < processIDs.count else {
                throw PageMismatch(address: start, reason: "its process (ordinal \(ordinal) of the tree) was not restored")
            }
            let bytes = try readProcessMemory(processIDs[ordinal], address: TreePageAddress.address(of: start), byteCount: pageCount * .pageSize)
            for index in 0..<pageCount {
                let address = start + UInt64(index) * .pageSize
                guard digestPage(bytes, offset: index * .pageSize, address: address) == digests[address] else {
                    throw PageMismatch(address: address, reason: "restored contents differ from the freeze digest")
                }
                checkedPageCount += 1
            }
        }
    }

    /// Reads `byteCount` bytes back from the target at `targetAddress` (where pages frozen at
    /// `frozenAddress` are now) and compares them with their freeze digests.
    ///
    /// Through /proc/PID/mem, never process_vm_readv: a page the engine counts installed but that is
    /// missing would make process_vm_readv fault into the target's userfaultfd, whose only reader is the
    /// thread asking (torture hung so on a deliberate bug); /proc/PID/mem answers EIO instead.
    public func verifyTarget(processID: ProcessID, frozenAddress: UInt64, targetAddress: UInt64, byteCount: Int) throws {
        let bytes: [UInt8]
        do {
            let memory = try ProcessMemory(processID, writable: false)
            defer { memory.close() }
            bytes = try memory.read(at: targetAddress, byteCount: byteCount)
        } catch {
            throw PageMismatch(address: frozenAddress, reason: "installed, but not readable in the target (\(error)): the page is missing")
        }
        for index in 0..<(byteCount / .pageSize) {
            let address = frozenAddress + UInt64(index) * .pageSize
            guard digestPage(bytes, offset: index * .pageSize, address: address) == digests[address] else {
                throw PageMismatch(address: address, reason: "restored contents differ from the freeze digest"
                                   + (targetAddress == frozenAddress ? "" : " (read at \(hex(targetAddress + UInt64(index) * .pageSize)), where it moved)"))
            }
            checkedPageCount += 1
        }
    }

    /// Checks bytes that were installed at `address` (whole pages) against the freeze digests.
    public func verify(bytes: [UInt8], at address: UInt64) throws {
        for index in 0..<(bytes.count / .pageSize) {
            let pageAddress = address + UInt64(index) * .pageSize
            guard digestPage(bytes, offset: index * .pageSize, address: pageAddress) == digests[pageAddress] else {
                throw PageMismatch(address: pageAddress, reason: "the installed contents differ from the freeze digest")
            }
            checkedPageCount += 1
        }
    }

    private func digestPage(_ bytes: [UInt8], offset: Int, address: UInt64) -> UInt64 {
        var page = Array(bytes[offset..<(offset + .pageSize)])
        for (start, end) in maskedRanges where start < address + .pageSize && end > address {
            for byteAddress in max(start, address)..<min(end, address + .pageSize) { page[Int(byteAddress - address)] = 0 }
        }
        return pageDigest(page)
    }

    /// rseq+0..8 (cpu_id_start, cpu_id) and rseq+24..32 (node_id, mm_cid) belong to the kernel.
    static func rseqCPUFields(_ rseq: RseqConfiguration?) -> [(UInt64, UInt64)] {
        guard let rseq else { return [] }
        return [(rseq.address, rseq.address + 8), (rseq.address + 24, rseq.address + 32)]
    }

    /// Calls `body` for each run of adjacent pages, at most `runByteLimit` bytes each.
    static func forEachRun(_ addresses: [UInt64], _ body: (UInt64, Int) throws -> Void) throws {
        var index = 0
        while index < addresses.count {
            var count = 1
            while index + count < addresses.count, count * .pageSize < runByteLimit,
                  addresses[index + count] == addresses[index] + UInt64(count) * .pageSize {
                count += 1
            }
            try body(addresses[index], count)
            index += count
        }
    }
}
