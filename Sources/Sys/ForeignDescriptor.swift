// Why this file exists: to read what a descriptor of another process holds (a pipe's buffered bytes, a
// socket's queue, a memfd's contents, a timer's ticks) and to fill a freshly made one on the target, the
// engine takes a copy of that descriptor into this process with pidfd_getfd (the same open file
// description, not a new open) and works on the copy. Reads never consume: pipes are read with tee(2),
// sockets with MSG_PEEK. Every kernel call for descriptors is here, typed.
internal import CSys
#if canImport(Glibc)
import Glibc
#endif

/// Syscall numbers (x86-64) that Glibc does not wrap for Swift.
private enum DescriptorSyscall {
    static let tee = 276, kcmp = 312, timerfdSettime = 286, timerfdGettime = 287
}

/// What fstat says about a descriptor's file.
public struct FileIdentity: Equatable, Sendable {
    public var device: UInt64
    public var inode: UInt64
    /// st_mode: type and permission bits.
    public var mode: UInt32
    public var userID: UInt32
    public var groupID: UInt32
    public var byteCount: Int64

    public var fileType: UInt32 { mode & UInt32(S_IFMT) }
    public var isRegular: Bool { fileType == UInt32(S_IFREG) }
    public var isDirectory: Bool { fileType == UInt32(S_IFDIR) }
    public var isFIFO: Bool { fileType == UInt32(S_IFIFO) }
    public var isSocket: Bool { fileType == UInt32(S_IFSOCK) }

    /// stat(2) of `path` (following links: /proc/PID/fd/N gives the descriptor's file); nil if it fails.
    public static func of(path: String) -> FileIdentity? {
        var info = stat()
        guard stat(path, &info) == 0 else { return nil }
        return FileIdentity(device: UInt64(info.st_dev), inode: UInt64(info.st_ino), mode: UInt32(info.st_mode),
                            userID: info.st_uid, groupID: info.st_gid, byteCount: Int64(info.st_size))
    }
}

/// kcmp's answer for two open file descriptions.
public enum DescriptionOrder: Equatable, Sendable { case same, before, after, unordered }

/// A timer's setting as timerfd_gettime/settime see it, in nanoseconds.
public struct TimerSetting: Equatable, Sendable {
    public var valueNanoseconds: UInt64
    public var intervalNanoseconds: UInt64
    public init(valueNanoseconds: UInt64, intervalNanoseconds: UInt64) {
        self.valueNanoseconds = valueNanoseconds
        self.intervalNanoseconds = intervalNanoseconds
    }
}

/// How a non-consuming read of a queue ended.
public enum PeekOutcome: Equatable, Sendable {
    case bytes([UInt8])
    /// More is queued than the caller allows.
    case tooLarge
}

/// What a non-consuming read of a socket's receive queue found.
public enum QueuePeek: Equatable, Sendable {
    /// Datagrams in order, or a stream's queued bytes as one message (none: the queue is empty).
    case messages([[UInt8]])
    case tooLarge
    /// A queued message carries descriptors or credentials, which cannot be carried.
    case controlData
}

/// A copy, in this process, of one descriptor of another process. Invariant: `descriptor` is open until
/// `deinit` and never handed out for closing.
public final class ForeignDescriptor {
    public let descriptor: Int32

    /// pidfd_getfd(`remoteDescriptor`) of `processID`: the very open file description it holds.
    public convenience init(processID: ProcessID, remoteDescriptor: Int32) throws(SyscallError) {
        try self.init(process: try ProcessHandle(processID), remoteDescriptor: remoteDescriptor)
    }

    /// pidfd_getfd(`remoteDescriptor`) of `process`: the very open file description it holds.
    public init(process: ProcessHandle, remoteDescriptor: Int32) throws(SyscallError) {
        descriptor = try process.copyOfDescriptor(remoteDescriptor)
    }

    /// A new open of what /proc/PID/fd/N names (works for a deleted file too), read-only: for reading
    /// contents of a file that the process may hold write-only. Never used on pipes (it would be a new
    /// reader of the pipe).
    public init(reopening processID: ProcessID, remoteDescriptor: Int32) throws(SyscallError) {
        let path = "/proc/\(processID)/fd/\(remoteDescriptor)"
        descriptor = try retryingInterrupts("open(\(path))") { open(path, O_RDONLY | O_CLOEXEC) }
    }

    /// open(path, O_RDONLY): a process's mapping through /proc/PID/map_files/START-END (root only), which
    /// names the very object mapped, also when it has no other name (shared anonymous memory, a memfd).
    public init(openingForReading path: String) throws(SyscallError) {
        descriptor = try retryingInterrupts("open(\(path))") { open(path, O_RDONLY | O_CLOEXEC) }
    }

    /// open(path, O_RDWR): a mapping's object through /proc/PID/map_files/START-END (root only), for
    /// what needs a writable descriptor of it (F_ADD_SEALS).
    public init(openingForWriting path: String) throws(SyscallError) {
        descriptor = try retryingInterrupts("open(\(path), O_RDWR)") { open(path, O_RDWR | O_CLOEXEC) }
    }

    /// The parts of [start, end) that hold data (lseek SEEK_DATA/SEEK_HOLE): for shared memory, the
    /// pages it has (resident or swapped); a hole reads as zeros and needs no copy.
    public func dataRanges(from start: Int64, to end: Int64) throws(SyscallError) -> [Range<Int64>] {
        var ranges: [Range<Int64>] = []
        var cursor = start
        while cursor < end {
            let data = lseek(descriptor, off_t(cursor), 3 /* SEEK_DATA */)
            if data < 0 {
                if Glibc.errno == ENXIO { break }  // no data from here on
                throw SyscallError.current("lseek(SEEK_DATA, \(cursor))")
            }
            if Int64(data) >= end { break }
            let hole = lseek(descriptor, data, 4 /* SEEK_HOLE */)
            if hole < 0 { throw SyscallError.current("lseek(SEEK_HOLE, \(data))") }
            ranges.append(Int64(data)..<min(Int64(hole), end))
            cursor = Int64(hole)
        }
        return ranges
    }

    /// A new file at `path` (O_CREAT|O_EXCL, never following a symlink, 0600 until `changeMode`), opened
    /// for writing: a deleted file the restorer recreates before the target opens it.
    public init(creatingExclusively path: String) throws(SyscallError) {
        descriptor = try retryingInterrupts("open(\(path), O_CREAT|O_EXCL)") {
            open(path, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0o600)
        }
    }

    deinit { Glibc.close(descriptor) }

    /// unlink(2).
    public static func removeFile(_ path: String) throws(SyscallError) {
        try checked("unlink(\(path))") { unlink(path) }
    }

    /// shutdown(2) of a socket: RCV_SHUTDOWN 1 | SEND_SHUTDOWN 2, as unix_diag reports them.
    public func shutdownSocket(_ mask: UInt8) throws(SyscallError) {
        guard mask != 0 else { return }
        try checked("shutdown(\(mask))") { Glibc.shutdown(descriptor, Int32(mask) - 1) }
    }

    /// How the open file descriptions of two descriptors of `processID` compare (kcmp KCMP_FILE): the
    /// same one (dup'ed, not opened twice), or which comes first in the kernel's (obfuscated but fixed)
    /// order, so that a sorted list finds a description in log n calls.
    public static func compareOpenFiles(_ processID: ProcessID, _ first: Int32, _ second: Int32) throws(SyscallError) -> DescriptionOrder {
        let pid = Int(processID.rawValue)
        let result = csys_syscall6(DescriptorSyscall.kcmp, pid, pid, 0 /* KCMP_FILE */, Int(first), Int(second), 0)
        if result < 0 { throw SyscallError.current("kcmp(\(processID), \(first), \(second))") }
        switch result {
        case 0: return .same
        case 1: return .before
        case 2: return .after
        default: return .unordered
        }
    }

    public func identity() throws(SyscallError) -> FileIdentity {
        var info = stat()
        try checked("fstat") { fstat(descriptor, &info) }
        return FileIdentity(device: UInt64(info.st_dev), inode: UInt64(info.st_ino), mode: UInt32(info.st_mode),
                            userID: info.st_uid, groupID: info.st_gid, byteCount: Int64(info.st_size))
    }

    /// The whole file from offset 0, if it has at most `maximumByteCount` bytes (nil otherwise).
    public func contents(maximumByteCount: Int) throws(SyscallError) -> [UInt8]? {
        let size = try identity().byteCount
        guard size >= 0, size <= Int64(maximumByteCount) else { return nil }
        var bytes = [UInt8](repeating: 0, count: Int(size))
        var done = 0
        while done < bytes.count {
            let count = try retryingInterrupts("pread") {
                bytes.withUnsafeMutableBytes { pread(descriptor, $0.baseAddress! + done, $0.count - done, off_t(done)) }
            }
            if count == 0 { throw SyscallError(call: "pread: the file shrank while it was read", errno: .ioError) }
            done += count
        }
        return bytes
    }

    /// pwrite of all `bytes` at `offset`.
    public func write(_ bytes: [UInt8], at offset: Int64) throws(SyscallError) {
        var done = 0
        while done < bytes.count {
            let count = try retryingInterrupts("pwrite") {
                bytes.withUnsafeBytes { pwrite(descriptor, $0.baseAddress! + done, $0.count - done, off_t(offset) + off_t(done)) }
            }
            done += count
        }
    }

    /// write(2) of all `bytes` (a pipe, a socket, an eventfd); a short write is an error, since the
    /// destination was sized to take them.
    public func append(_ bytes: [UInt8]) throws(SyscallError) {
        var done = 0
        while done < bytes.count {
            let count = try retryingInterrupts("write") {
                bytes.withUnsafeBytes { Glibc.write(descriptor, $0.baseAddress! + done, $0.count - done) }
            }
            done += count
        }
    }

    public func truncate(byteCount: Int64) throws(SyscallError) {
        try retryingInterrupts("ftruncate") { ftruncate(descriptor, off_t(byteCount)) }
    }

    public func changeMode(_ mode: UInt32) throws(SyscallError) {
        try checked("fchmod") { fchmod(descriptor, mode_t(mode & 0o7777)) }
    }

    public func changeOwner(userID: UInt32, groupID: UInt32) throws(SyscallError) {
        try checked("fchown") { fchown(descriptor, userID, groupID) }
    }

    // MARK: fcntl

    /// F_GET_SEALS of a memfd.
    public func seals() throws(SyscallError) -> UInt32 {
        UInt32(try checked("fcntl(F_GET_SEALS)") { fcntl(descriptor, 1034) })
    }

    /// F_ADD_SEALS.
    public func addSeals(_ seals: UInt32) throws(SyscallError) {
        try checked("fcntl(F_ADD_SEALS, \(seals))") { fcntl(descriptor, 1033, Int32(bitPattern: seals)) }
    }

    /// F_GETPIPE_SZ: the pipe's capacity in bytes.
    public func pipeCapacity() throws(SyscallError) -> Int {
        Int(try checked("fcntl(F_GETPIPE_SZ)") { fcntl(descriptor, 1032) })
    }

    /// F_SETPIPE_SZ (rounded up by the kernel to a power-of-two number of pages).
    public func setPipeCapacity(_ byteCount: Int) throws(SyscallError) {
        try checked("fcntl(F_SETPIPE_SZ, \(byteCount))") { fcntl(descriptor, 1031, Int32(byteCount)) }
    }

    /// FIONREAD: bytes queued for reading (a pipe's buffer, a stream socket's receive queue).
    public func queuedByteCount() throws(SyscallError) -> Int {
        var count: Int32 = 0
        try checked("ioctl(FIONREAD)") { csys_ioctl_pointer(descriptor, 0x541B, &count) }
        return Int(count)
    }

    /// Reads off and drops whatever is queued now (FIONREAD bytes), without waiting for more: the
    /// IN_IGNORED events an inotify instance queued while the restorer shaped it.
    public func discardQueued() throws(SyscallError) {
        let count = try queuedByteCount()
        guard count > 0 else { return }
        var buffer = [UInt8](repeating: 0, count: count)
        let read = try retryingInterrupts("read(\(count))") { buffer.withUnsafeMutableBytes { Glibc.read(descriptor, $0.baseAddress, count) } }
        guard read == count else {
            Glibc.errno = EIO
            throw SyscallError.current("read(\(count)) of queued events, \(read) read")
        }
    }

    // MARK: Pipes

    /// Every byte buffered in the pipe this read end belongs to, left in place: tee(2) duplicates them
    /// into a pipe of ours as large as the victim's, which is then read. Nil if more than
    /// `maximumByteCount` are buffered.
    public func peekPipe(maximumByteCount: Int) throws(SyscallError) -> PeekOutcome {
        let buffered = try queuedByteCount()
        if buffered == 0 { return .bytes([]) }
        guard buffered <= maximumByteCount else { return .tooLarge }
        var ends: [Int32] = [-1, -1]
        try checked("pipe2") { ends.withUnsafeMutableBytes { csys_syscall6(293, Int(bitPattern: $0.baseAddress), Int(O_CLOEXEC | O_NONBLOCK), 0, 0, 0, 0) } }
        defer { Glibc.close(ends[0]); Glibc.close(ends[1]) }
        let capacity = try max(pipeCapacity(), buffered)
        try checked("fcntl(F_SETPIPE_SZ, \(capacity))") { fcntl(ends[1], 1031, Int32(capacity)) }
        // SPLICE_F_NONBLOCK (2): never wait for more than is there.
        let duplicated = csys_syscall6(DescriptorSyscall.tee, Int(descriptor), Int(ends[1]), buffered, 2, 0, 0)
        if duplicated < 0 { throw SyscallError.current("tee") }
        guard duplicated == buffered else {
            throw SyscallError(call: "tee duplicated \(duplicated) of \(buffered) buffered bytes", errno: .ioError)
        }
        var bytes = [UInt8](repeating: 0, count: buffered)
        var done = 0
        while done < buffered {
            let count = try retryingInterrupts("read(tee pipe)") {
                bytes.withUnsafeMutableBytes { read(ends[0], $0.baseAddress! + done, $0.count - done) }
            }
            if count == 0 { break }
            done += count
        }
        return .bytes(bytes)
    }

    // MARK: Sockets

    public func socketOption(level: Int32, name: Int32) throws(SyscallError) -> Int32 {
        var value: Int32 = 0
        var length = socklen_t(MemoryLayout<Int32>.size)
        try checked("getsockopt(\(level), \(name))") { getsockopt(descriptor, level, name, &value, &length) }
        return value
    }

    public func setSocketOption(level: Int32, name: Int32, value: Int32) throws(SyscallError) {
        var value = value
        try checked("setsockopt(\(level), \(name))") {
            setsockopt(descriptor, level, name, &value, socklen_t(MemoryLayout<Int32>.size))
        }
    }

    /// The queued messages of a socket's receive queue, left in place (MSG_PEEK, with SO_PEEK_OFF moved
    /// from message to message and put back afterwards). A stream socket's queue comes as one message.
    /// `.tooLarge` when more than `maximumByteCount` bytes or `maximumCount` messages are queued, or
    /// when a message carries descriptors or credentials (SCM_RIGHTS cannot be carried).
    public func peekMessages(datagrams: Bool, maximumByteCount: Int, maximumCount: Int) throws(SyscallError) -> QueuePeek {
        let peekOffsetOption: Int32 = 42  // SO_PEEK_OFF
        let savedOffset = try socketOption(level: SOL_SOCKET, name: peekOffsetOption)
        try setSocketOption(level: SOL_SOCKET, name: peekOffsetOption, value: 0)
        defer { try? setSocketOption(level: SOL_SOCKET, name: peekOffsetOption, value: savedOffset) }
        var messages: [[UInt8]] = []
        var total = 0
        var buffer = [UInt8](repeating: 0, count: maximumByteCount + 1)
        var control = [UInt8](repeating: 0, count: 256)
        while messages.count <= maximumCount {
            var messageFlags: Int32 = 0
            var controlByteCount = 0
            let count = buffer.withUnsafeMutableBytes { bytes in
                control.withUnsafeMutableBytes { controlBytes in
                    var vector = iovec(iov_base: bytes.baseAddress, iov_len: bytes.count)
                    return withUnsafeMutablePointer(to: &vector) { vectorPointer in
                        var header = msghdr(msg_name: nil, msg_namelen: 0, msg_iov: vectorPointer, msg_iovlen: 1,
                                            msg_control: controlBytes.baseAddress, msg_controllen: controlBytes.count, msg_flags: 0)
                        let result = recvmsg(descriptor, &header, Int32(MSG_PEEK | MSG_DONTWAIT))
                        messageFlags = header.msg_flags
                        controlByteCount = Int(header.msg_controllen)
                        return result
                    }
                }
            }
            if count < 0 {
                if Glibc.errno == EAGAIN { break }
                if Glibc.errno == EINTR { continue }
                throw SyscallError.current("recvmsg(MSG_PEEK)")
            }
            if controlByteCount > 0 || messageFlags & Int32(MSG_CTRUNC) != 0 { return .controlData }
            if messageFlags & Int32(MSG_TRUNC) != 0 { return .tooLarge }
            if count == 0 && !datagrams { break }
            total += count
            if total > maximumByteCount { return .tooLarge }
            messages.append(Array(buffer[0..<count]))
            if !datagrams { break }
        }
        if messages.count > maximumCount { return .tooLarge }
        return .messages(messages)
    }

    // MARK: Timers and counters

    public func timerSetting() throws(SyscallError) -> TimerSetting {
        var raw = [Int64](repeating: 0, count: 4)  // struct itimerspec: interval, value
        let result = raw.withUnsafeMutableBytes { csys_syscall6(DescriptorSyscall.timerfdGettime, Int(descriptor), Int(bitPattern: $0.baseAddress), 0, 0, 0, 0) }
        if result < 0 { throw SyscallError.current("timerfd_gettime") }
        return TimerSetting(valueNanoseconds: UInt64(raw[2]) * 1_000_000_000 + UInt64(raw[3]),
                            intervalNanoseconds: UInt64(raw[0]) * 1_000_000_000 + UInt64(raw[1]))
    }

    /// timerfd_settime with `setting.valueNanoseconds` left from now. With TFD_TIMER_ABSTIME in
    /// `flags` the value is given as `clock`'s now plus the time left, so the flags read back as set.
    public func setTimer(_ setting: TimerSetting, flags: Int32, clock: Int32) throws(SyscallError) {
        var value = setting.valueNanoseconds
        if flags & 1 != 0 && value != 0 {
            var now = timespec()
            try checked("clock_gettime(\(clock))") { clock_gettime(clockid_t(clock), &now) }
            value += UInt64(now.tv_sec) * 1_000_000_000 + UInt64(now.tv_nsec)
        }
        var raw: [Int64] = [Int64(setting.intervalNanoseconds / 1_000_000_000), Int64(setting.intervalNanoseconds % 1_000_000_000),
                            Int64(value / 1_000_000_000), Int64(value % 1_000_000_000)]
        let result = raw.withUnsafeMutableBytes { csys_syscall6(DescriptorSyscall.timerfdSettime, Int(descriptor), Int(flags), Int(bitPattern: $0.baseAddress), 0, 0, 0) }
        if result < 0 { throw SyscallError.current("timerfd_settime") }
    }

    /// TFD_IOC_SET_TICKS (_IOW('T', 0, u64)): the expirations a read will report.
    public func setTimerTicks(_ ticks: UInt64) throws(SyscallError) {
        var value = ticks
        try checked("ioctl(TFD_IOC_SET_TICKS)") { csys_ioctl_pointer(descriptor, 0x4008_5400, &value) }
    }
}
