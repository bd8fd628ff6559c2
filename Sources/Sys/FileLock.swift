// Why this file exists: the nodes that share a FAM pool on one machine take turns at its allocation
// table. flock(2) on the pool file is that turn: exclusive, and released by the kernel when the holder
// dies, so a node killed in the middle of an update never leaves the table locked (the table itself is
// crash-safe on its own: see Engine/FAM/FAMPool.swift). It serialises processes of one machine only;
// nodes on several machines sharing real FAM need the fabric's atomics or a librarian service instead.
import SystemPackage
#if canImport(Glibc)
import Glibc
#endif

/// An exclusive flock on a file, held from `acquire` until `release` (or deinit).
///
/// Invariant: `descriptor` is open, and holds the lock, until `release()` closes it.
public final class FileLock: @unchecked Sendable {
    private var descriptor: Int32

    private init(descriptor: Int32) { self.descriptor = descriptor }

    deinit { release() }

    /// Waits until this process holds the lock on `path` (an existing file or device). The descriptor is
    /// opened read-only, without following a symlink, and never blocks on a FIFO.
    public static func acquire(path: String) throws(SyscallError) -> FileLock {
        let descriptor = try retryingInterrupts("open(\(path))") { Glibc.open(path, O_RDONLY | O_CLOEXEC | O_NOFOLLOW | O_NONBLOCK) }
        do throws(SyscallError) {
            _ = try retryingInterrupts("flock(\(path), LOCK_EX)") { flock(descriptor, LOCK_EX) }
        } catch {
            _ = Glibc.close(descriptor)
            throw error
        }
        return FileLock(descriptor: descriptor)
    }

    /// The lock on `path` if nobody holds it now, else nil (flock LOCK_NB: a holder that died holds
    /// nothing). With `creating`, a missing file is made first (0600, never through a symlink).
    public static func tryAcquire(path: String, creating: Bool = false) throws(SyscallError) -> FileLock? {
        let flags = O_RDONLY | O_CLOEXEC | O_NOFOLLOW | O_NONBLOCK | (creating ? O_CREAT : 0)
        let descriptor = try retryingInterrupts("open(\(path))") { Glibc.open(path, flags, 0o600) }
        let outcome = flock(descriptor, LOCK_EX | LOCK_NB)
        if outcome == 0 { return FileLock(descriptor: descriptor) }
        let error = SyscallError.current("flock(\(path), LOCK_EX | LOCK_NB)")
        _ = Glibc.close(descriptor)
        if error.errno == .wouldBlock { return nil }
        throw error
    }

    /// Lets go of the lock. Idempotent.
    public func release() {
        guard descriptor >= 0 else { return }
        _ = Glibc.close(descriptor)
        descriptor = -1
    }
}
