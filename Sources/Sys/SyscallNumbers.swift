// Why this file exists: the engine injects system calls into the victim and the target (SyscallInjector)
// and names them here, once, by the kernel's x86-64 numbers; the flag words those calls take are typed
// beside them (as swift-system types `OpenOptions`), so no magic number reaches the engine.

/// x86-64 syscall numbers the engine injects.
public enum Syscall {
    public static let read = 0, write = 1, open = 2, close = 3, lseek = 8, mmap = 9, mprotect = 10, munmap = 11
    public static let brk = 12, rtSigaction = 13, mremap = 25, madvise = 28, membarrier = 324, dup2 = 33, prctl = 157, personality = 135
    public static let setresuid = 117, setresgid = 119, setgroups = 116, capset = 126, rtSigqueueinfo = 129
    public static let setfsuid = 122, setfsgid = 123
    public static let arch_prctl = 158, openat = 257, rtTgsigqueueinfo = 297, dup3 = 292, rseq = 334, seccomp = 317
    public static let userfaultfd = 323, closeRange = 436, prlimit64 = 302, fcntl = 72
    public static let clone3 = 435, setRobustList = 273, setTidAddress = 218
    public static let chdir = 80, chroot = 161, umask = 95, sigaltstack = 131, getitimer = 36, setitimer = 38
    public static let timerCreate = 222, timerSettime = 223, timerGettime = 224, timerDelete = 226
    public static let getpid = 39, wait4 = 61, kill = 62, setpgid = 109, setsid = 112, rtSigtimedwait = 128, exitGroup = 231
}

/// mmap's `prot` word.
public struct MemoryProtection: OptionSet, Sendable {
    public let rawValue: UInt64
    public init(rawValue: UInt64) { self.rawValue = rawValue }
    public static let read = MemoryProtection(rawValue: 0x1)
    public static let write = MemoryProtection(rawValue: 0x2)
    public static let execute = MemoryProtection(rawValue: 0x4)
    public static let all: MemoryProtection = [.read, .write, .execute]
}

/// mmap's `flags` word (the ones the engine uses).
public struct MapFlags: OptionSet, Sendable {
    public let rawValue: UInt64
    public init(rawValue: UInt64) { self.rawValue = rawValue }
    public static let shared = MapFlags(rawValue: 0x01)
    public static let `private` = MapFlags(rawValue: 0x02)
    public static let fixed = MapFlags(rawValue: 0x10)
    public static let anonymous = MapFlags(rawValue: 0x20)
    public static let growsDown = MapFlags(rawValue: 0x0100)
    public static let noReserve = MapFlags(rawValue: 0x4000)
    /// MAP_FIXED_NOREPLACE: at that address or not at all (EEXIST), never over a mapping.
    public static let fixedNoReplace = MapFlags(rawValue: 0x10_0000)
    /// The injector's scratch page: private, anonymous, never over a mapping of the process.
    public static let scratch: MapFlags = [.private, .anonymous, .fixedNoReplace]
}

/// wait4's `options` word.
public struct WaitOptions: OptionSet, Sendable {
    public let rawValue: UInt64
    public init(rawValue: UInt64) { self.rawValue = rawValue }
    /// __WALL: children of any kind (clone children too).
    public static let anyChild = WaitOptions(rawValue: 0x4000_0000)
}
