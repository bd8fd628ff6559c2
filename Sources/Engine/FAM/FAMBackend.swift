// Why this file exists: the engine writes and reads FAM only through this protocol, so the torture
// framework can put a model FAM (write-back caches, partial persistence, a store/flush/fence log) under
// the same engine code. Its methods mirror the hardware: stores land in the writer's cache, `flush`
// writes lines back, `fence` orders them; what a reader on another node sees is only what was fenced.
import Sys

/// Fabric-attached memory as one node sees it. Offsets are bytes from the start of the FAM file; an
/// offset outside `byteCount` is a programmer error (precondition), never input.
public protocol FAMBackend: AnyObject, Sendable {
    /// Size of the FAM region in bytes.
    var byteCount: Int { get }
    /// The file behind it, for messages; nil for a model that has none.
    var path: String? { get }
    // Writer side.
    func store(_ bytes: [UInt8], at byteOffset: Int)
    /// One 8-byte store; at an 8-aligned offset a reader sees either the old or the new value.
    func storeUInt64(_ value: UInt64, at byteOffset: Int)
    /// The dump path: process_vm_readv from `processID` straight into FAM. Returns the bytes copied.
    @discardableResult
    func storeFromProcess(processID: ProcessID, ranges: [ProcessReadRange]) throws(SyscallError) -> Int
    /// The same copy, begun now and finished by `PendingStore.finish()`: a backend may run it on a thread
    /// of its own (the real one does) while the caller seals the batch before it. The caller touches none
    /// of those bytes (no flush, no load) before `finish()`. A model does the copy at once.
    func startStoreFromProcess(processID: ProcessID, ranges: [ProcessReadRange]) -> PendingStore
    /// One private copy of `pageCount` pages of `pageByteCount` bytes from `byteOffset`, and
    /// `code(index, page)` of each page of that copy (its keyed mark code), begun now and finished by
    /// `PendingPages.finish()`: the real backend loads and codes them on a thread of its own while the caller
    /// installs the batch before (the nonlive restore's pipeline); a model does it at once. The caller
    /// installs the very bytes the codes were computed over, never a second read of FAM.
    func startPageLoad(at byteOffset: Int, pageCount: Int, pageByteCount: Int,
                       code: @escaping @Sendable (Int, ArraySlice<UInt8>) -> UInt64) -> PendingPages
    /// `code(index, page)` of each of `pageCount` pages of `pageByteCount` bytes from `byteOffset`, as
    /// the writer sees them (the dump's marks, coded before the batch is flushed): the real backend
    /// codes them on every CPU, a model at once, in order, on the caller's thread.
    func pageCodes(at byteOffset: Int, pageCount: Int, pageByteCount: Int,
                   code: @escaping @Sendable (Int, ArraySlice<UInt8>) -> UInt64) -> [UInt64]
    /// Writes back (clwb) every cache line overlapping the range; not ordered until `fence()`.
    func flush(at byteOffset: Int, count: Int)
    /// Orders every earlier flush before any later store (sfence).
    func fence()

    // Reader side.
    func loadBytes(at byteOffset: Int, count: Int) -> [UInt8]
    func loadUInt64(at byteOffset: Int) -> UInt64
    /// csys_digest64 of `count` bytes (a multiple of 8) as this node sees them.
    func digest(at byteOffset: Int, count: Int, seed: UInt64) -> UInt64
}

extension FAMBackend {
    /// At once, on the caller's thread: every backend whose stores must stay in the caller's order.
    public func startStoreFromProcess(processID: ProcessID, ranges: [ProcessReadRange]) -> PendingStore {
        PendingStore(outcome: Result { () throws(SyscallError) in try storeFromProcess(processID: processID, ranges: ranges) })
    }
}

extension FAMBackend {
    /// At once, on the caller's thread.
    public func startPageLoad(at byteOffset: Int, pageCount: Int, pageByteCount: Int,
                              code: @escaping @Sendable (Int, ArraySlice<UInt8>) -> UInt64) -> PendingPages {
        PendingPages(PendingPages.loadAndCode(loadBytes(at: byteOffset, count: pageCount * pageByteCount), pageByteCount: pageByteCount,
                                              threadCount: 1, code: code))
    }

    /// At once, in order, on the caller's thread, from one load of the whole run.
    public func pageCodes(at byteOffset: Int, pageCount: Int, pageByteCount: Int,
                          code: @escaping @Sendable (Int, ArraySlice<UInt8>) -> UInt64) -> [UInt64] {
        PageCoding.codes(of: loadBytes(at: byteOffset, count: pageCount * pageByteCount), pageByteCount: pageByteCount, threadCount: 1, code: code)
    }
}

/// Keyed page codes (HMAC-SHA256 of 4 KiB: the dump's and the restore's heaviest work per page) spread
/// over threads. Each thread codes one contiguous share of the pages; a code is a pure function of its
/// page, so the answer is the same on any thread count.
public enum PageCoding {
    /// Below this many pages a thread costs more than it saves.
    static let pagesPerThreadMin = 32

    /// The codes of pages `0..<pageCount`, each share `part(range)` (the codes of that range, in order):
    /// the first share here, the others on up to `threadCount - 1` threads of their own. A thread that
    /// cannot be made codes its share here instead.
    public static func codes(pageCount: Int, threadCount: Int, part: @escaping @Sendable (Range<Int>) -> [UInt64]) -> [UInt64] {
        precondition(pageCount >= 0 && threadCount >= 1, "\(pageCount) pages on \(threadCount) threads")
        let shareCount = max(1, min(threadCount, pageCount / pagesPerThreadMin))
        guard shareCount > 1 else { return part(0..<pageCount) }
        let shares = (0..<shareCount).map { index in (pageCount * index / shareCount)..<(pageCount * (index + 1) / shareCount) }
        final class Box: @unchecked Sendable { var codes: [UInt64] = [] }
        var helpers: [(thread: OSThread?, box: Box, share: Range<Int>)] = []
        for share in shares.dropFirst() {
            let box = Box()
            let thread = try? OSThread(name: "fammig-code", stackByteCount: 256 << 10) { box.codes = part(share) }
            helpers.append((thread, box, share))
        }
        var codes = part(shares[0])
        codes.reserveCapacity(pageCount)
        for helper in helpers {
            if let thread = helper.thread { thread.join() } else { helper.box.codes = part(helper.share) }
            precondition(helper.box.codes.count == helper.share.count, "\(helper.box.codes.count) codes for the \(helper.share.count) pages \(helper.share)")
            codes += helper.box.codes
        }
        precondition(codes.count == pageCount, "\(codes.count) codes for \(pageCount) pages")
        return codes
    }

    /// The codes of every page of `bytes` (whole pages of `pageByteCount`), each over its slice of the
    /// one copy (no copy per page).
    public static func codes(of bytes: [UInt8], pageByteCount: Int, threadCount: Int,
                             code: @escaping @Sendable (Int, ArraySlice<UInt8>) -> UInt64) -> [UInt64] {
        codes(pageCount: bytes.count / pageByteCount, threadCount: threadCount) { share in
            share.map { index in code(index, bytes[(index * pageByteCount)..<((index + 1) * pageByteCount)]) }
        }
    }
}

/// Pages loaded and coded (see `FAMBackend.startPageLoad`); `finish()` waits for them, once.
public final class PendingPages: @unchecked Sendable {
    public typealias Loaded = (bytes: [UInt8], codes: [UInt64])
    private final class Box: @unchecked Sendable { var loaded: Loaded? }
    private var loaded: Loaded?
    private var thread: OSThread?
    private var box: Box?

    init(_ loaded: Loaded) { self.loaded = loaded }

    /// Runs `load` on a new thread; if no thread can be made, runs it here.
    init(running load: @escaping @Sendable () -> Loaded) {
        let box = Box()
        do {
            thread = try OSThread(name: "fammig-verify", stackByteCount: 256 << 10) { box.loaded = load() }
            self.box = box
        } catch {
            loaded = load()
        }
    }

    /// The codes of each page of `bytes`, on up to `threadCount` threads.
    public static func loadAndCode(_ bytes: [UInt8], pageByteCount: Int, threadCount: Int,
                                   code: @escaping @Sendable (Int, ArraySlice<UInt8>) -> UInt64) -> Loaded {
        (bytes, PageCoding.codes(of: bytes, pageByteCount: pageByteCount, threadCount: threadCount, code: code))
    }

    /// Dropped unfinished (its owner failed): still wait, so no thread reads FAM after this.
    deinit { thread?.join() }

    public func finish() -> Loaded {
        if let thread {
            thread.join()
            self.thread = nil
            loaded = box?.loaded
        }
        guard let loaded else { preconditionFailure("pending pages finished twice") }
        self.loaded = nil
        return loaded
    }
}

/// A `storeFromProcess` under way: done already, or running on a thread of its own. `finish()` waits for
/// it (joining the thread) and gives its outcome; it must be called once, before anything reads, flushes
/// or frees the bytes it writes.
public final class PendingStore: @unchecked Sendable {
    private var outcome: Result<Int, SyscallError>?
    private var thread: OSThread?

    init(outcome: Result<Int, SyscallError>) { self.outcome = outcome }

    /// Runs `copy` on a new thread; if no thread can be made, runs it here.
    init(running copy: @escaping @Sendable () throws(SyscallError) -> Int) {
        let box = OutcomeBox()
        do {
            thread = try OSThread(name: "fammig-dump-copy", stackByteCount: 256 << 10) {
                box.outcome = Result { () throws(SyscallError) in try copy() }
            }
            self.box = box
        } catch {
            outcome = Result { () throws(SyscallError) in try copy() }
        }
    }

    private final class OutcomeBox: @unchecked Sendable { var outcome: Result<Int, SyscallError>? }
    private var box: OutcomeBox?

    /// Dropped unfinished (its owner failed): still wait, so no thread writes into FAM after this.
    deinit { thread?.join() }

    /// Waits for the copy; returns the bytes copied or throws its error.
    @discardableResult
    public func finish() throws(SyscallError) -> Int {
        if let thread {
            thread.join()
            self.thread = nil
            outcome = box?.outcome
        }
        guard let outcome else { preconditionFailure("a pending FAM store finished twice") }
        self.outcome = nil
        return try outcome.get()
    }
}
