// Small facts of the kernel the engine names in its own code: whether two stats are one file, errno
// values it reports, this process's parent.
#if canImport(Glibc)
import Glibc
#endif

extension FileIdentity {
    /// Same device and inode (whatever the path).
    public func isSameFile(as other: FileIdentity) -> Bool { device == other.device && inode == other.inode }
}

/// errno values the engine names in its own errors.
public enum ErrorNumber {
    public static let invalidArgument: Int32 = EINVAL
    public static let fileExists: Int32 = EEXIST
}

extension ProcessID {
    /// This process's parent.
    public static var parent: ProcessID { ProcessID(getppid()) }
}

/// open(2) flags, for the opens the restorer injects into a target and the access modes /proc shows.
public enum OpenFlag {
    public static let readOnly = O_RDONLY
    public static let writeOnly = O_WRONLY
    public static let readWrite = O_RDWR
    public static let accessModeMask = O_ACCMODE
    public static let create = O_CREAT
    public static let exclusive = O_EXCL
    public static let truncate = O_TRUNC
    public static let noControllingTerminal = O_NOCTTY
    public static let nonBlocking = O_NONBLOCK
    public static let closeOnExec = O_CLOEXEC
    public static let direct: Int32 = 0o40000
    public static let noFollow = O_NOFOLLOW
}

/// Socket options the engine reads from a victim's sockets and sets on a target's.
public enum SocketOption {
    public static let socketLevel = SOL_SOCKET
    public static let sendBuffer = SO_SNDBUF
    public static let receiveBuffer = SO_RCVBUF
    public static let sendBufferForce = SO_SNDBUFFORCE
    public static let receiveBufferForce = SO_RCVBUFFORCE
}

/// st_mode file types.
public enum FileType {
    public static let mask = UInt32(S_IFMT)
    public static let characterDevice = UInt32(S_IFCHR)
}

/// Signal numbers the engine names.
public enum SignalNumber {
    public static let trap = SIGTRAP
    public static let kill = SIGKILL
    public static let stop = SIGSTOP
    public static let `continue` = SIGCONT
}
