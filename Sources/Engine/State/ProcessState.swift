// What a checkpoint holds besides page contents: everything the restorer needs to rebuild the victim,
// and everything the state oracle compares.
import Sys

/// One signal's disposition (`struct kernel_sigaction` as rt_sigaction sees it).
public struct SignalAction: Equatable, Sendable {
    public var signal: Int32
    public var handler: UInt64
    public var flags: UInt64
    public var restorer: UInt64
    public var mask: UInt64

    public var isDefault: Bool { handler == 0 && flags == 0 && restorer == 0 && mask == 0 }
}

/// The fields of `struct prctl_mm_map` (PR_SET_MM_MAP) except exe_fd, plus the current brk.
public struct MemoryDescriptorFields: Equatable, Sendable {
    public var startCode: UInt64 = 0, endCode: UInt64 = 0
    public var startData: UInt64 = 0, endData: UInt64 = 0
    public var startBrk: UInt64 = 0, brk: UInt64 = 0
    public var startStack: UInt64 = 0
    public var argStart: UInt64 = 0, argEnd: UInt64 = 0
    public var envStart: UInt64 = 0, envEnd: UInt64 = 0
    /// The raw auxiliary vector (/proc/PID/auxv).
    public var auxiliaryVector: [UInt8] = []
}

/// Who the process is and what it may do.
public struct Credentials: Equatable, Sendable {
    /// Real, effective, saved, filesystem.
    public var userIDs: [UInt32] = [0, 0, 0, 0]
    public var groupIDs: [UInt32] = [0, 0, 0, 0]
    public var supplementaryGroups: [UInt32] = []
    public var inheritable: UInt64 = 0, permitted: UInt64 = 0, effective: UInt64 = 0
    public var bounding: UInt64 = 0, ambient: UInt64 = 0
    public var securebits: UInt32 = 0
    public var noNewPrivileges: Bool = false
}

/// A seccomp filter program, as PTRACE_SECCOMP_GET_FILTER gives it.
public struct SeccompFilter: Equatable, Sendable {
    public var program: [UInt8]
    public var flags: UInt64
}

/// What a mapping is, which decides how the restorer recreates it.
public enum MappingKind: Equatable, Sendable {
    case anonymous
    case heap
    case stack
    /// A private or shared mapping of a regular file at `path`.
    case file(path: String)
    /// `[vvar]`, `[vvar_vclock]`, `[vdso]`: moved from the restorer's own copy, never dumped.
    case vdsoPart(name: String)
    /// `[vsyscall]`: fixed by the kernel; nothing to do.
    case vsyscall
    /// A MAP_SHARED mapping of shared memory (shmem) that exists only in the process: shared anonymous
    /// memory ("/dev/zero (deleted)") or a memfd. Its pages are dumped like anonymous ones and installed
    /// into one new object per `SharedMemory.object`, so that mappings of one object stay one.
    case sharedMemory(SharedMemory)
}

/// One shared-memory object of the process, as its mappings see it.
public struct SharedMemory: Equatable, Sendable {
    /// Numbers the process's objects 0, 1, ... in the order of their lowest mapping: two mappings with
    /// one number map one object.
    public var object: Int32
    /// nil: shared anonymous memory; else the memfd's name.
    public var memfdName: String?
    /// The object's size (its shmem file's).
    public var byteCount: UInt64
    /// A memfd made without MFD_ALLOW_SEALING (its only seal is F_SEAL_SEAL).
    public var sealingForbidden = false
    /// A memfd's seals (F_GET_SEALS), added again once its pages are in (F_SEAL_WRITE is refused: it
    /// needs every writable mapping gone, and the pages come in through one).
    public var seals: UInt32 = 0
    /// A SysV segment (shmget/shmat); nil for shared anonymous memory and memfds.
    public var sysv: SysVSegment?
    /// The object's permission bits and owner (fchmod/fchown on a memfd; the creator's for shared
    /// anonymous memory). A SysV segment has its own (`sysv`).
    public var mode: UInt32 = 0o777
    public var userID: UInt32 = 0
    public var groupID: UInt32 = 0

    public init(object: Int32, memfdName: String?, byteCount: UInt64, sealingForbidden: Bool = false, seals: UInt32 = 0,
                sysv: SysVSegment? = nil, mode: UInt32 = 0o777, userID: UInt32 = 0, groupID: UInt32 = 0) {
        (self.object, self.memfdName, self.byteCount, self.sealingForbidden) = (object, memfdName, byteCount, sealingForbidden)
        (self.seals, self.sysv) = (seals, sysv)
        (self.mode, self.userID, self.groupID) = (mode, userID, groupID)
    }

    /// F_SEAL_SEAL, SHRINK, GROW, WRITE, FUTURE_WRITE, EXEC.
    public static let knownSeals: UInt32 = 0x3f
    public static let sealSeal: UInt32 = 1, writeSeal: UInt32 = 8
}

/// A SysV shared memory segment as /proc/sysvipc/shm shows it. Only a segment marked for removal
/// (IPC_RMID: it goes with its last attach, so with the process) migrates, recreated with its ID; its
/// key is then IPC_PRIVATE (the kernel forgets it at IPC_RMID).
public struct SysVSegment: Equatable, Sendable {
    /// shmid, given again on the target (kernel.shm_next_id).
    public var identifier: Int32
    /// The segment's own size (shm_segsz), not rounded to pages.
    public var byteCount: UInt64
    /// The permission bits (shm_perm.mode & 0o777).
    public var mode: UInt32
    public var userID: UInt32
    public var groupID: UInt32
    /// SHM_DEST: marked for removal.
    public var markedForRemoval: Bool

    public init(identifier: Int32, byteCount: UInt64, mode: UInt32, userID: UInt32, groupID: UInt32, markedForRemoval: Bool) {
        (self.identifier, self.byteCount, self.mode, self.userID, self.groupID) = (identifier, byteCount, mode, userID, groupID)
        self.markedForRemoval = markedForRemoval
    }

    /// SHMMAX here is far larger; what an image may ask for.
    public static let byteCountMax: UInt64 = 1 << 40
}

/// One VMA of the victim.
public struct Mapping: Equatable, Sendable {
    public var start: UInt64
    public var end: UInt64
    public var readable: Bool
    public var writable: Bool
    public var executable: Bool
    public var shared: Bool
    public var fileOffset: UInt64
    public var kind: MappingKind
    /// MAP_NORESERVE (VmFlags "nr"): no commit charge, so a huge sparse reservation fits where RAM does not.
    public var noReserve = false
    /// What madvise(2) (or mlock, mseal) set on it, as /proc/PID/smaps's VmFlags show (MappingAdvice).
    public var advice: MappingAdvice = []
    /// Whether mprotect may make it writable (VmFlags "mw"); read for shared file mappings only, where it
    /// says whether the file was opened for writing (a private mapping may always write its copy).
    public var mayWrite = true

    public var byteCount: UInt64 { end - start }
    /// A shared mapping that writes, or may be made to write, its file: mapped from an open for writing.
    public var writesBack: Bool { shared && (writable || mayWrite) }
    public var protection: Int32 { (readable ? 1 : 0) | (writable ? 2 : 0) | (executable ? 4 : 0) }
    public func contains(_ address: UInt64) -> Bool { address >= start && address < end }
}

/// The madvise(2) flags of a mapping, each a VmFlags mnemonic of /proc/PID/smaps. The restorer gives
/// each back with its madvise; `locked` (mlock) and `sealed` (mseal) are read so that they can be refused
/// before anything is lost: locking again would fault every page in (post-copy's pages are not there
/// yet), and a sealed mapping could not be laid out and filled as the restore does.
public struct MappingAdvice: OptionSet, Equatable, Hashable, Sendable, CustomStringConvertible {
    public let rawValue: UInt16
    public init(rawValue: UInt16) { self.rawValue = rawValue }

    public static let dontDump = MappingAdvice(rawValue: 1 << 0)
    public static let dontFork = MappingAdvice(rawValue: 1 << 1)
    public static let wipeOnFork = MappingAdvice(rawValue: 1 << 2)
    public static let hugePage = MappingAdvice(rawValue: 1 << 3)
    public static let noHugePage = MappingAdvice(rawValue: 1 << 4)
    public static let mergeable = MappingAdvice(rawValue: 1 << 5)
    public static let sequential = MappingAdvice(rawValue: 1 << 6)
    public static let random = MappingAdvice(rawValue: 1 << 7)
    public static let locked = MappingAdvice(rawValue: 1 << 8)
    public static let sealed = MappingAdvice(rawValue: 1 << 9)

    /// Each flag with its VmFlags mnemonic and the madvise advice that sets it (nil: not set by madvise).
    public static let catalog: [(flag: MappingAdvice, mnemonic: String, madvise: Int32?)] = [
        (.dontDump, "dd", 16), (.dontFork, "dc", 10), (.wipeOnFork, "wf", 18), (.hugePage, "hg", 14),
        (.noHugePage, "nh", 15), (.mergeable, "mg", 12), (.sequential, "sr", 2), (.random, "rr", 1),
        (.locked, "lo", nil), (.sealed, "sl", nil),
    ]
    public static let known = MappingAdvice(catalog.map(\.flag))
    /// What the restorer cannot give back.
    public static let refused: MappingAdvice = [.locked, .sealed]

    /// The flags among VmFlags' mnemonics (others are ignored: permissions, accounting, userfaultfd's).
    public init<S: Sequence>(mnemonics: S) where S.Element: StringProtocol {
        var advice: MappingAdvice = []
        for mnemonic in mnemonics {
            if let entry = Self.catalog.first(where: { $0.mnemonic == mnemonic }) { advice.insert(entry.flag) }
        }
        self = advice
    }

    public var description: String {
        Self.catalog.filter { contains($0.flag) }.map(\.mnemonic).joined(separator: " ")
    }
}

/// An open descriptor the restorer recreates (OpenFiles.swift has the kinds).
public struct OpenFile: Equatable, Sendable {
    public var descriptor: Int32
    /// The path it is reopened by (regular files, directories, FIFOs; where a deleted file lived), or
    /// empty for objects without one (pipes, sockets, eventfd, ...).
    public var path: String
    /// open(2) flags as /proc/PID/fdinfo shows them (octal there), O_CLOEXEC included.
    public var flags: Int32
    public var position: Int64
    public var kind: OpenFileKind = .regular

    public init(descriptor: Int32, path: String, flags: Int32, position: Int64, kind: OpenFileKind = .regular) {
        (self.descriptor, self.path, self.flags, self.position, self.kind) = (descriptor, path, flags, position, kind)
    }
}

/// A queued signal, as the raw 128-byte siginfo PTRACE_PEEKSIGINFO gives.
public struct PendingSignal: Equatable, Sendable {
    public var shared: Bool
    public var siginfo: [UInt8]
    public var signal: Int32 {
        Int32(siginfo[0]) | Int32(siginfo[1]) << 8 | Int32(siginfo[2]) << 16 | Int32(siginfo[3]) << 24
    }
}

/// One resource limit (getrlimit/prlimit64).
public struct ResourceLimit: Equatable, Sendable {
    public var resource: Int32
    public var soft: UInt64
    public var hard: UInt64
}

/// The state of one thread.
public struct ThreadState: Equatable, Sendable {
    public var threadID: ProcessID
    public var registers: GeneralRegisters
    public var extendedState: [UInt8]
    public var signalMask: UInt64
    public var rseq: RseqConfiguration?
    public var pendingSignals: [PendingSignal]
    /// set_robust_list: the head of the thread's robust futex list and its length (0, 0: none).
    public var robustListHead: UInt64 = 0
    public var robustListLength: UInt64 = 0
    /// set_tid_address (CLONE_CHILD_CLEARTID): zeroed and futex-woken when the thread exits; pthread_join waits on it.
    public var clearChildTID: UInt64 = 0
    /// /proc/PID/task/TID/comm.
    public var commandName: String = ""
    /// sigaltstack(2).
    public var signalStack = SignalStack.disabled
    /// sched_getaffinity(2): the CPUs the thread may run on (taskset, pthread_setaffinity_np). Empty: not
    /// recorded, and the restored thread keeps the mask it was created with.
    public var cpuAffinity = CPUSet(words: [])!

    /// The mask a thread checkpointed with `cpuAffinity` gets on a node whose online CPUs are `online`:
    /// the CPUs of both; all of `online` when the victim's CPUs are none of this node's (a mask that
    /// names only absent CPUs cannot be set); nil when there is nothing to set (not recorded, or this
    /// node's CPUs unknown). The restorer sets it and the state oracle expects it.
    public func restoredAffinity(online: CPUSet?) -> CPUSet? {
        guard !cpuAffinity.isEmpty, let online else { return nil }
        let common = cpuAffinity.intersection(online)
        return common.isEmpty ? online : common
    }
}

/// Everything about the victim but its page contents.
public struct ProcessState: Equatable, Sendable {
    public var processID: ProcessID
    public var executablePath: String
    /// The thread's name (/proc/PID/comm, PR_SET_NAME), as `ps` shows it.
    public var commandName: String
    public var threads: [ThreadState]
    public var signalActions: [SignalAction]
    public var sharedPendingSignals: [PendingSignal]
    public var memoryDescriptor: MemoryDescriptorFields
    public var personality: UInt32
    public var parentDeathSignal: Int32
    public var credentials: Credentials
    /// Every RLIMIT_*, in resource order.
    public var resourceLimits: [ResourceLimit]
    public var seccompMode: Int32
    /// Oldest first, the order in which the restorer installs them.
    public var seccompFilters: [SeccompFilter]
    public var mappings: [Mapping]
    public var files: [OpenFile]
    /// cwd, umask, oom_score_adj, dumpable, THP-disable.
    public var context = ProcessContext()
    /// Its parent, process group and session, and what it inherited from its parent (ProcessTree.swift).
    public var lineage = ProcessLineage()
    /// The root of a tree only: every other process of the tree, each after its parent (ProcessTree.swift).
    public var members: [TreeMember] = []

    public var mainThread: ThreadState { threads[0] }
    /// More threads than this are refused at checkpoint and rejected in an image.
    public static let maximumThreadCount = 256
}
