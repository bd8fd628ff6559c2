// Why this file exists: every failing call in Sys throws one error type that names the call and the errno,
// so an error message says which syscall failed and why, never just "operation failed".
import SystemPackage
internal import CSys
#if canImport(Glibc)
import Glibc
#endif

/// A syscall (or libc call) that failed, with the errno it left.
public struct SyscallError: Error, CustomStringConvertible, Equatable, Sendable {
    public let call: String
    public let errno: Errno

    public init(call: String, errno: Errno) {
        self.call = call
        self.errno = errno
    }

    /// Reads the thread's errno right after a failed libc call.
    static func current(_ call: String) -> SyscallError {
        SyscallError(call: call, errno: Errno(rawValue: Glibc.errno))
    }

    public var description: String { "\(call): \(errno)" }
}

/// Retries `body` while it fails with EINTR; any other failure is thrown as `SyscallError(call:)`.
/// `body` returns a libc-style value: negative means failure with errno set.
@discardableResult
func retryingInterrupts<T: BinaryInteger>(_ call: String, _ body: () -> T) throws(SyscallError) -> T {
    // Repeats only on EINTR; ends at anything else.
    while true {
        let result = body()
        if result >= 0 { return result }
        let error = SyscallError.current(call)
        if error.errno == .interrupted { continue }
        throw error
    }
}

/// Calls `body` once; a negative result is thrown as `SyscallError(call:)` (EINTR included).
@discardableResult
func checked<T: BinaryInteger>(_ call: String, _ body: () -> T) throws(SyscallError) -> T {
    let result = body()
    if result >= 0 { return result }
    throw SyscallError.current(call)
}
