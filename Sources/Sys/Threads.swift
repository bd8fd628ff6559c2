// Why this file exists: per-thread facts another process can read about a thread without running code in
// it (its robust futex list), and the machine code that creates a thread inside a tracee.
internal import CSys
#if canImport(Glibc)
import Glibc
#endif

/// A thread's robust futex list as set_robust_list registered it (head 0: none).
public struct RobustList: Equatable, Sendable {
    public var head: UInt64
    public var length: UInt64
}

/// get_robust_list(2) of another thread (PTRACE_MODE_READ is enough: we trace it).
public func robustList(of threadID: ProcessID) throws(SyscallError) -> RobustList {
    var head: UInt64 = 0
    var length: UInt64 = 0
    _ = try checked("get_robust_list(\(threadID))") { withUnsafeMutablePointer(to: &head) { headPointer in
        withUnsafeMutablePointer(to: &length) { lengthPointer in
            csys_syscall6(274 /* get_robust_list, x86-64 */, Int(threadID.rawValue),
                          Int(bitPattern: UInt(bitPattern: headPointer)), Int(bitPattern: UInt(bitPattern: lengthPointer)), 0, 0, 0)
        }
    } }
    return RobustList(head: head, length: length)
}

/// Code an injector runs to create a thread: `syscall; test rax,rax; jnz parent; child: jmp child;
/// parent: int3`. The new thread (rax 0) spins in place until the restorer seizes it; the caller traps
/// 10 bytes in.
public let threadCloneInstructions: [UInt8] = [0x0f, 0x05, 0x48, 0x85, 0xc0, 0x75, 0x02, 0xeb, 0xfe, 0xcc]
/// Where the caller of `threadCloneInstructions` stops (the byte after its int3).
public let threadCloneTrapOffset: UInt64 = 10
