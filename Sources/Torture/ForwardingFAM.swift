// Why this file exists: torture's chaos and the tests wrap a FAM backend to disturb or watch one or two
// of its calls (a fence that pauses or does nothing, a load that is recorded, a second read that finds a
// page changed). Each wrapper once forwarded every other call by hand; this class forwards them all, so a
// wrapper overrides only what it changes.
import Engine
import Sys

/// A FAM backend that forwards every call to `inner`; subclass it and override what the wrapper changes.
/// `startStoreFromProcess` and `startPageLoad` are the protocol's at-once defaults, built on
/// `storeFromProcess` and `loadBytes`: a subclass sees every store and load, on the caller's thread.
open class ForwardingFAM: FAMBackend, @unchecked Sendable {
    public let inner: any FAMBackend

    public init(_ inner: any FAMBackend) { self.inner = inner }

    open var byteCount: Int { inner.byteCount }
    open var path: String? { inner.path }
    open func store(_ bytes: [UInt8], at byteOffset: Int) { inner.store(bytes, at: byteOffset) }
    open func storeUInt64(_ value: UInt64, at byteOffset: Int) { inner.storeUInt64(value, at: byteOffset) }
    @discardableResult
    open func storeFromProcess(processID: ProcessID, ranges: [ProcessReadRange]) throws(SyscallError) -> Int {
        try inner.storeFromProcess(processID: processID, ranges: ranges)
    }
    open func flush(at byteOffset: Int, count: Int) { inner.flush(at: byteOffset, count: count) }
    open func fence() { inner.fence() }
    open func loadBytes(at byteOffset: Int, count: Int) -> [UInt8] { inner.loadBytes(at: byteOffset, count: count) }
    open func loadUInt64(at byteOffset: Int) -> UInt64 { inner.loadUInt64(at: byteOffset) }
    open func digest(at byteOffset: Int, count: Int, seed: UInt64) -> UInt64 { inner.digest(at: byteOffset, count: count, seed: seed) }
}
