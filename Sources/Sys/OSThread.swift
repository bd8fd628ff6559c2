// Why this file exists: the threaded driver gives every actor an OS thread of its own (ptrace answers
// only the thread that attached) and must know when each has ended, not only when it said so: a thread
// that signalled "done" but has not returned yet still holds its actor, and whatever the actor owns
// (a restored process's watchdog child, a socket) outlives the run. A joined pthread has returned.
internal import CSys
import SystemPackage
#if canImport(Glibc)
import Glibc
#endif

/// One OS thread running one closure; `join()` waits until it has returned and released the closure.
public final class OSThread: @unchecked Sendable {
    private var handle: pthread_t
    private var joined = false

    private final class Start {
        let body: () -> Void
        let name: String
        init(body: @escaping () -> Void, name: String) {
            self.body = body
            self.name = name
        }
    }

    /// Starts `body` on a new thread named `name` (the kernel keeps 15 bytes of it) with a stack of
    /// `stackByteCount` bytes.
    public init(name: String, stackByteCount: Int = 8 << 20, body: @escaping @Sendable () -> Void) throws(SyscallError) {
        var attributes = pthread_attr_t()
        pthread_attr_init(&attributes)
        defer { pthread_attr_destroy(&attributes) }
        pthread_attr_setstacksize(&attributes, stackByteCount)
        let start = Unmanaged.passRetained(Start(body: body, name: name)).toOpaque()
        var handle = pthread_t()
        let result = pthread_create(&handle, &attributes, { argument in
            let start = Unmanaged<Start>.fromOpaque(argument!).takeRetainedValue()
            // PR_SET_NAME (15): the calling thread's name, at most 15 bytes and a NUL.
            var name = Array(start.name.utf8.prefix(15)) + [0]
            _ = name.withUnsafeMutableBufferPointer { csys_prctl(15, UInt(bitPattern: $0.baseAddress), 0, 0, 0) }
            start.body()
            return nil
        }, start)
        guard result == 0 else {
            Unmanaged<Start>.fromOpaque(start).release()
            throw SyscallError(call: "pthread_create(\(name))", errno: Errno(rawValue: result))
        }
        self.handle = handle
    }

    /// Waits until the thread has returned. Calling it again does nothing.
    public func join() {
        guard !joined else { return }
        joined = true
        pthread_join(handle, nil)
    }

    deinit {
        if !joined { pthread_detach(handle) }
    }

    /// Lets another runnable thread of this CPU run first.
    public static func yield() { sched_yield() }

    /// Sleeps the calling thread for `duration` (EINTR resumes with the time left).
    public static func sleep(for duration: Duration) {
        let (seconds, attoseconds) = duration.components
        var request = timespec(tv_sec: Int(max(0, seconds)), tv_nsec: Int(max(0, attoseconds) / 1_000_000_000))
        var remaining = timespec()
        // Repeats only on EINTR, with the time left; ends when it has slept.
        while nanosleep(&request, &remaining) != 0 && errno == EINTR { request = remaining }
    }
}
