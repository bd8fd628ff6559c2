// Raw costs the benchmark compares the engine against, measured with nothing of the engine around them.
internal import CSys
#if canImport(Glibc)
import Glibc
#endif

public enum Baselines {
    /// Median microseconds of one UFFDIO_COPY of a 4 KiB page from a pre-faulted FAM mapping into a
    /// registered anonymous range of this process (what a fault served from FAM costs at least).
    public static func userfaultfdCopyMicroseconds(from mapping: SharedMapping, pageCount: Int) throws -> Double {
        precondition(pageCount > 0 && pageCount * 4096 <= mapping.byteCount, "baseline needs \(pageCount) pages of FAM")
        let userfaultfd = try Userfaultfd.ofThisProcess()
        defer { userfaultfd.close() }
        try userfaultfd.handshake()
        let byteCount = pageCount * 4096
        guard let region = mmap(nil, byteCount, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0), region != MAP_FAILED else {
            throw SyscallError.current("mmap(baseline)")
        }
        defer { munmap(region, byteCount) }
        let start = UInt64(UInt(bitPattern: region))
        try userfaultfd.registerMissing(start: start, byteCount: UInt64(byteCount))
        var samples: [Double] = []
        samples.reserveCapacity(pageCount)
        let clock = ContinuousClock()
        for page in 0..<pageCount {
            let before = clock.now
            _ = try userfaultfd.copy(from: mapping, at: page * 4096, to: start + UInt64(page) * 4096, byteCount: 4096, dontWake: true)
            let elapsed = clock.now - before
            samples.append(Double(elapsed.components.attoseconds) / 1e12 + Double(elapsed.components.seconds) * 1e6)
        }
        samples.sort()
        return samples[samples.count / 2]
    }
}
