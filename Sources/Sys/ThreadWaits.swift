// Why this file exists: torture decides when a real process has stopped moving by itself (every thread
// asleep on a fault or a futex) and when a test program waits at its rendezvous, from /proc. The parsing
// of those files, and the syscall numbers it compares with, live here, typed.

/// The x86-64 numbers of the system calls whose waits torture recognises.
public enum SyscallNumber {
    public static let nanosleep = 35
    public static let rtSigtimedwait = 128
    public static let futex = 202
    public static let ppoll = 271
}

/// Where one thread of a process is, as /proc tells it.
public enum ThreadWait: Equatable, Sendable {
    /// Running or runnable, or in a stop (anything but a sleep).
    case running
    /// Gone, or a zombie.
    case ended
    /// Asleep in the kernel's userfault handler: a missing page, or an mremap/munmap/MADV_DONTNEED
    /// whose event waits to be read.
    case userfault
    /// Asleep on a futex (a mutex, a condition variable, a join).
    case futex
    /// Asleep on anything else (a timer, a descriptor), named by its wait channel.
    case other(String)
}

extension ProcFS {
    /// What thread `threadID` of `processID` waits on.
    public static func threadWait(_ processID: ProcessID, thread threadID: ProcessID) -> ThreadWait {
        guard let state = ProcFS.state(processID, thread: threadID), !state.hasEnded else { return .ended }
        guard state == .sleeping || state == .diskSleep else { return .running }
        guard let wchan = try? readText("/proc/\(processID.rawValue)/task/\(threadID.rawValue)/wchan") else { return .ended }
        if wchan.hasPrefix("handle_userfault") || wchan.hasPrefix("userfaultfd") { return .userfault }
        if wchan.hasPrefix("futex") { return .futex }
        return .other(wchan)
    }

    /// The system call thread `threadID` of `processID` is blocked in (nil: running, or not in one).
    public static func currentSyscall(_ processID: ProcessID, thread threadID: ProcessID) -> Int? {
        currentSyscallCall(processID, thread: threadID)?.number
    }

    /// The system call thread `threadID` of `processID` is blocked in, with its six arguments (nil:
    /// running, or not in one). /proc shows them in hex after the number.
    public static func currentSyscallCall(_ processID: ProcessID, thread threadID: ProcessID) -> (number: Int, arguments: [UInt64])? {
        guard let text = try? readText("/proc/\(processID.rawValue)/task/\(threadID.rawValue)/syscall") else { return nil }
        let fields = text.split(whereSeparator: { $0 == " " || $0 == "\n" })
        guard fields.count >= 7, let number = Int(fields[0]) else { return nil }
        let arguments = fields[1...6].compactMap { UInt64($0.hasPrefix("0x") ? $0.dropFirst(2) : $0[...], radix: 16) }
        return arguments.count == 6 ? (number, arguments) : nil
    }
}
