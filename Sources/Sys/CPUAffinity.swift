// Why this file exists: a thread's CPU affinity is migrated state (a victim pinned by taskset or
// pthread_setaffinity_np must run where it asked to after the migration), and the restored threads are
// created by a tracer whose own mask says nothing about the victim's. The dumper reads each thread's mask
// with sched_getaffinity(tid); the restorer sets it with sched_setaffinity(tid), from outside the target.
internal import CSys
#if canImport(Glibc)
import Glibc
#endif

/// A set of CPUs, as `cpu_set_t` holds it: bit `c % 64` of word `c / 64` stands for CPU `c`. Kept without
/// trailing zero words, so one set has one value whatever the buffer it was read into.
public struct CPUSet: Equatable, Hashable, Sendable, CustomStringConvertible {
    /// The set's 64-bit words, lowest CPUs first, at most `wordCountMax`, the last one nonzero.
    public private(set) var words: [UInt64]

    /// CPUs a set may name: the 1024 of glibc's `cpu_set_t`.
    public static let cpuCountMax = 1024
    public static let wordCountMax = cpuCountMax / 64

    /// Nil when `words` has more than `wordCountMax` words (after trailing zero words are dropped).
    public init?(words: [UInt64]) {
        var trimmed = words
        while trimmed.last == 0 { trimmed.removeLast() }
        guard trimmed.count <= Self.wordCountMax else { return nil }
        self.words = trimmed
    }

    /// The set of these CPUs; nil when one is negative or not below `cpuCountMax`.
    public init?(cpus: [Int]) {
        var words = [UInt64](repeating: 0, count: Self.wordCountMax)
        for cpu in cpus {
            guard cpu >= 0, cpu < Self.cpuCountMax else { return nil }
            words[cpu / 64] |= 1 << UInt64(cpu % 64)
        }
        self.init(words: words)
    }

    public var isEmpty: Bool { words.isEmpty }

    /// The CPUs in the set, in increasing order.
    public var cpus: [Int] {
        words.enumerated().flatMap { index, word in (0..<64).filter { word & (1 << UInt64($0)) != 0 }.map { index * 64 + $0 } }
    }

    public func intersection(_ other: CPUSet) -> CPUSet {
        CPUSet(words: zip(words, other.words).map { $0 & $1 })!
    }

    /// As Cpus_allowed_list and taskset -c write it: "0-1", "1", "0,2-3".
    public var description: String {
        var parts: [String] = []
        var runStart: Int?
        var previous = -2
        for cpu in cpus + [-1] {
            if cpu == previous + 1 { previous = cpu; continue }
            if let start = runStart { parts.append(start == previous ? "\(start)" : "\(start)-\(previous)") }
            runStart = cpu
            previous = cpu
        }
        return parts.isEmpty ? "none" : parts.joined(separator: ",")
    }

    /// The CPU mask of thread `threadID` (sched_getaffinity; the kernel gives its allowed CPUs that are
    /// active). ESRCH when the thread is gone.
    public static func of(thread threadID: ProcessID) throws(SyscallError) -> CPUSet {
        var mask = [UInt64](repeating: 0, count: wordCountMax)
        _ = try checked("sched_getaffinity(\(threadID))") { csys_get_thread_affinity(threadID.rawValue, &mask) }
        return CPUSet(words: mask)!
    }

    /// Gives thread `threadID` this mask (sched_setaffinity). The kernel narrows it to the CPUs the
    /// thread's cpuset allows, and answers EINVAL when none of them is left.
    public func apply(to threadID: ProcessID) throws(SyscallError) {
        var mask = words + [UInt64](repeating: 0, count: Self.wordCountMax - words.count)
        _ = try checked("sched_setaffinity(\(threadID), \(self))") { csys_set_thread_affinity(threadID.rawValue, &mask) }
    }

    /// The CPUs online on this node (/sys/devices/system/cpu/online, e.g. "0-1"); nil when it cannot be
    /// read or parsed.
    public static func online() -> CPUSet? {
        guard let text = try? ProcFS.readText("/sys/devices/system/cpu/online") else { return nil }
        return parseList(text)
    }

    /// A CPU list as the kernel prints it ("0-3,5"); nil for anything else.
    public static func parseList(_ text: String) -> CPUSet? {
        var cpus: [Int] = []
        for part in text.trimmingWhitespace.split(separator: ",", omittingEmptySubsequences: false) {
            let bounds = part.split(separator: "-", omittingEmptySubsequences: false)
            guard bounds.count == 1 || bounds.count == 2, let low = Int(bounds[0]), let high = Int(bounds.last!), low >= 0,
                  low <= high, high < cpuCountMax else { return nil }
            cpus += Array(low...high)
        }
        return cpus.isEmpty ? nil : CPUSet(cpus: cpus)
    }
}

private extension String {
    var trimmingWhitespace: Substring {
        let start = firstIndex { !$0.isWhitespace } ?? endIndex
        let end = lastIndex { !$0.isWhitespace }.map { index(after: $0) } ?? start
        return self[start..<end]
    }
}
