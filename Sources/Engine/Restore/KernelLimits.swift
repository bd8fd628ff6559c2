// The bounds of x86-64 Linux that restored state is validated against.

/// What x86-64 Linux allows a process; no real victim goes beyond it, so an image that does is refused.
enum KernelLimits {
    /// _NSIG: signals are 1...64.
    static let signalNumbers: ClosedRange<Int32> = 1...64
    /// rt_sigaction refuses these two.
    static let killSignal: Int32 = 9, stopSignal: Int32 = 19
    /// RLIM_NLIMITS: resources are 0..<16.
    static let resourceCount: Int32 = 16
    /// NGROUPS_MAX.
    static let supplementaryGroupCountMax = 65536
    /// (uid_t)-1: setresuid and setresgid read it as "leave this one unchanged", so it is never a real ID.
    static let unchangedID: UInt32 = .max
    /// BPF_MAXINSNS: instructions in one seccomp filter (8 bytes each).
    static let seccompFilterInstructionCountMax = 1 << 12
    /// PATH_MAX: the longest path a syscall takes, its NUL included.
    static let pathByteCountMax = 1 << 12
    /// The smallest capacity a pipe has (one page).
    static let pipeCapacityByteCountMin = Int32(ImageLayout.pageSize)
    /// MAX_INSNS_PER_PATH: the instructions of all of a thread's filters, each filter counting 4 more.
    static let seccompPathInstructionCountMax = 32768
    static let seccompFilterOverheadInstructionCount = 4
    /// SECCOMP_FILTER_FLAG_LOG | SECCOMP_FILTER_FLAG_SPEC_ALLOW: what PTRACE_SECCOMP_GET_METADATA can
    /// report. Others (NEW_LISTENER, TSYNC) would make the restorer's seccomp call do something else.
    static let seccompFilterFlagsRestorable: UInt64 = 0x2 | 0x4
    /// fs.nr_open's default: dup3 refuses a descriptor at or above it.
    static let descriptorLimit: Int32 = 1 << 20
    /// O_ACCMODE; 3 is no access mode.
    static let accessModeMask: Int32 = 0o3
    /// __O_TMPFILE: a file opened so has no name the restorer could open again.
    static let temporaryFileFlag: Int32 = 0o20_000_000
    /// The largest rseq area the restorer accepts (the kernel's is 32 bytes and grows slowly).
    static let rseqByteCountMax = UInt32(ImageLayout.pageSize)  // an rseq area within one page
    /// MINSIGSTKSZ on x86-64: sigaltstack refuses smaller stacks.
    static let signalStackByteCountMin: UInt64 = 2048
}
