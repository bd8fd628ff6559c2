// The descriptors a process holds, as the restorer recreates them and the state oracle compares them.
// Every record is stable across nodes: objects refer to each other by descriptor number (a pipe's other
// end, a socket's peer, an epoll's targets), never by inode, so a restored process reads back equal.
import Sys

/// What a file carried in the image looks like (a deleted file, a memfd): its bytes and its owner.
public struct CarriedFile: Equatable, Sendable {
    public var contents: [UInt8]
    /// Permission bits (st_mode & 0o7777).
    public var mode: UInt32
    public var userID: UInt32
    public var groupID: UInt32
}

/// One end of a pipe or FIFO. Both ends must be held by the process (else its buffered bytes would be
/// lost or duplicated on the other side): the end with the lowest descriptor, `channel`, stands for
/// the pipe.
public struct PipeEnd: Equatable, Sendable {
    /// The lowest descriptor holding either end of this pipe.
    public var channel: Int32
    public var isReadEnd: Bool
    /// F_GETPIPE_SZ.
    public var capacityByteCount: Int32
    /// The bytes buffered in the pipe, in order (on the read end's record; empty on the write end's).
    public var buffered: [UInt8]
}

/// One end of a pipe whose other end another process of the tree holds (a parent that writes, a child
/// that reads; two children of a shell's pipeline). The restore makes the pipe once, in the nearest
/// process that both holders descend from, and hands each end down to its holder (TreePipes.swift).
public struct TreePipeEnd: Equatable, Sendable {
    /// The pipe's number in the tree: the order in which the tree's processes (in tree order, each by
    /// descriptor) first hold it. -1 while a process's descriptors are read, before the tree numbers them.
    public var pipe: Int32
    public var isReadEnd: Bool
    /// F_GETPIPE_SZ.
    public var capacityByteCount: Int32
    /// The bytes buffered in the pipe, in order (on the read end's records; empty on the write end's).
    public var buffered: [UInt8]
    /// This node's inode of the pipe, only until the tree numbers its pipes (never in the image: 0).
    public var inode: UInt64 = 0
}

/// One end of a UNIX socket pair, the peer held by the process too.
public struct UnixSocketEnd: Equatable, Sendable {
    /// SOCK_STREAM 1 or SOCK_DGRAM 2.
    public var type: Int32
    /// The descriptor of the peer socket.
    public var peer: Int32
    /// The receive queue: datagrams in order, or a stream's bytes as one message.
    public var queued: [[UInt8]]
    /// RCV_SHUTDOWN 1 | SEND_SHUTDOWN 2.
    public var shutdown: UInt8
    /// SO_SNDBUF and SO_RCVBUF as getsockopt reports them.
    public var sendBufferByteCount: Int32
    public var receiveBufferByteCount: Int32
}

/// A timerfd, as /proc/PID/fdinfo shows it.
public struct TimerDescriptor: Equatable, Sendable {
    /// CLOCK_REALTIME 0, CLOCK_MONOTONIC 1, CLOCK_BOOTTIME 7, and the _ALARM variants 8, 9.
    public var clock: Int32
    /// Expirations not yet read.
    public var ticks: UInt64
    /// TFD_TIMER_ABSTIME 1 | TFD_TIMER_CANCEL_ON_SET 2, as timerfd_settime was last called.
    public var settimeFlags: Int32
    /// Time left until the next expiry (0: disarmed), and the period.
    public var valueNanoseconds: UInt64
    public var intervalNanoseconds: UInt64

    /// The setting to keep, from timerfd_gettime readings. A periodic timer whose expiry time has passed
    /// but whose expiry the kernel has not handled yet (a late timer interrupt on a loaded machine) reads
    /// 0 left, as a timer disarmed with a period still set does; kept as read, the restore would disarm
    /// a running timer. So such a reading is taken again, a millisecond apart, until the kernel handled
    /// the expiry (time left again, the expiry counted in the ticks) or `rereadsMax` readings all said 0:
    /// then it is disarmed.
    static func settledSetting(first: TimerSetting, rereadsMax: Int = 20, wait: () -> Void,
                               read: () throws(SyscallError) -> TimerSetting) throws(SyscallError) -> TimerSetting {
        var setting = first
        var rereads = 0
        // Bounded by rereadsMax.
        while setting.valueNanoseconds == 0 && setting.intervalNanoseconds != 0 && rereads < rereadsMax {
            wait()
            setting = try read()
            rereads += 1
        }
        return setting
    }
}

/// One registration in an epoll set.
public struct EpollEntry: Equatable, Sendable {
    public var descriptor: Int32
    public var events: UInt32
    public var data: UInt64
}

/// One inotify watch: its watch descriptor, the path of the inode it watches (found again from the
/// file handle fdinfo shows) and its mask (events and IN_ONESHOT, IN_EXCL_UNLINK).
public struct InotifyWatch: Equatable, Sendable {
    public var watchDescriptor: Int32
    public var path: String
    public var mask: UInt32

    public init(watchDescriptor: Int32, path: String, mask: UInt32) {
        (self.watchDescriptor, self.path, self.mask) = (watchDescriptor, path, mask)
    }
}

/// What an open descriptor is, which decides how the restorer recreates it.
public enum OpenFileKind: Equatable, Sendable {
    /// A regular file (or /dev/null) reopened by path at its offset.
    case regular
    /// A directory reopened by path, at its getdents position.
    case directory
    /// A regular file that was unlinked while open: its contents travel in the image and the restorer
    /// recreates it at its old path and unlinks it again.
    case deletedFile(CarriedFile)
    /// memfd_create(name): contents, seals.
    case memfd(name: String, file: CarriedFile, seals: UInt32)
    /// A memfd that is also mapped: reopened through the mapping at `mappingStart` (its object's lowest),
    /// which the layout restored with the object's pages.
    case memfdOfMapping(mappingStart: UInt64, mappingEnd: UInt64, seals: UInt32)
    /// dup of a lower descriptor: the same open file description (offset and status flags shared).
    case duplicate(of: Int32)
    /// A pipe end; with a path (OpenFile.path) a FIFO.
    case pipe(PipeEnd)
    /// A pipe end whose other end another process of the tree holds.
    case treePipe(TreePipeEnd)
    case eventCounter(count: UInt64, semaphore: Bool)
    case signalQueue(mask: UInt64)
    case timer(TimerDescriptor)
    case eventPoll([EpollEntry])
    case unixSocket(UnixSocketEnd)
    /// An IPv4/IPv6 TCP socket, listening or established (TCPSockets.swift).
    case tcpSocket(TCPSocketEnd)
    /// An inotify instance with its watches, by watch descriptor (events queued at the freeze are
    /// refused: reading them would take them from the victim).
    case inotify([InotifyWatch])

    /// A short name, for messages.
    public var name: String {
        switch self {
        case .regular: "file"
        case .directory: "directory"
        case .deletedFile: "deleted file"
        case .memfd, .memfdOfMapping: "memfd"
        case .duplicate: "duplicate"
        case .pipe: "pipe"
        case .treePipe: "pipe end"
        case .eventCounter: "eventfd"
        case .signalQueue: "signalfd"
        case .timer: "timerfd"
        case .eventPoll: "epoll"
        case .unixSocket: "unix socket"
        case .tcpSocket: "TCP socket"
        case .inotify: "inotify"
        }
    }

    /// The bytes this record carries in the image.
    var carriedByteCount: Int {
        switch self {
        case .deletedFile(let file), .memfd(_, let file, _): file.contents.count
        case .pipe(let end): end.buffered.count
        case .treePipe(let end): end.buffered.count
        case .unixSocket(let end): end.queued.reduce(0) { $0 + $1.count }
        case .tcpSocket(let end): (end.connection?.sendQueue.count ?? 0) + (end.connection?.receiveQueue.count ?? 0)
        default: 0
        }
    }
}

/// Limits on what the image carries for descriptors: the whole state travels in one message in
/// postcopy-socket (4 MiB), and a decoder must bound every length.
public enum DescriptorLimits {
    /// The bytes of all carried files, pipe buffers and socket queues together.
    public static let carriedByteCountMax = 2 << 20
    /// Datagrams queued on one socket.
    public static let queuedMessageCountMax = 1024
    /// Registrations in one epoll set.
    public static let epollEntryCountMax = 1 << 12
    /// Watches of one inotify instance (fs.inotify.max_user_watches is far larger; a process seldom
    /// holds more than a few hundred).
    public static let inotifyWatchCountMax = 1 << 13
    /// Pipe capacity the restorer sets (fs.pipe-max-size's default).
    public static let pipeCapacityByteCountMax: Int32 = 1 << 20
}
