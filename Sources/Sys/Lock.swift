// A lock for classes whose fields several threads touch together (the engine's per-migration state):
// `withLock { ... }` around a block that reads and writes them. Built on the standard library's Mutex.
import Synchronization

public final class Lock: Sendable {
    private let mutex = Mutex(())

    public init() {}

    public func withLock<Result, Failure: Error>(_ body: () throws(Failure) -> Result) throws(Failure) -> Result {
        try mutex.withLock { (_) throws(Failure) -> Result in try body() }
    }
}
