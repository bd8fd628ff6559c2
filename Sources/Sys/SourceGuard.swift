// Why this file exists: before the commit record the victim is the only copy of the process, so the
// death of its tracer (the source node's fammig, SIGKILL included) must leave it running on as it was.
// The tracer seizes without PTRACE_O_EXITKILL and freezes the victim in a group-stop, so when the kernel
// detaches a dead tracer's tracees the victim stays stopped; but the tracer may have been half-way
// through an injected query then (registers, code at rip, a scratch mapping, blocked signals). A guard
// (a small child process, see CSys.h) holds a log of the victim's original values, written before each
// change, and when its owner goes without saying so it puts them back, detaches, and sends the SIGCONT
// the freeze's SIGSTOP owes. Once the image is committed it kills the victim instead (the image is the
// process now); while the commit record is being stored it leaves the victim stopped and says why.
internal import CSys
#if canImport(Glibc)
import Glibc
#endif

/// Invariant: `log` maps one `csys_source_guard_log`, shared with the guard child, until deinit; while
/// armed, `controlDescriptor` is the only write end of the guard's socket pair and `guardProcessID` is
/// an unreaped child of this process; `disarm()`, `actNow()` or deinit reaps it.
public final class SourceGuard: @unchecked Sendable {
    public let victimProcessID: ProcessID
    public let guardProcessID: ProcessID
    private let log: UnsafeMutablePointer<csys_source_guard_log>
    private let logByteCount = MemoryLayout<csys_source_guard_log>.size
    private let lock = Lock()
    private var controlDescriptor: Int32?
    /// The TCP sockets' recipes (csys_source_guard_log.recipes): reserved, not committed, memory; an
    /// image carries at most 2 MiB of queued bytes in all, and each byte is in one recipe.
    private let recipes: UnsafeMutableRawPointer
    public static let recipeByteCountMax = 8 << 20
    private var recipeByteCount = 0

    /// `addressRetry`: how long the guard retries rebuilding a socket whose address is still taken
    /// (by the target's copy of the process, until its node kills it).
    public init(victim: ProcessID, addressRetry: Duration = .seconds(30)) throws(SyscallError) {
        let mapped = mmap(nil, MemoryLayout<csys_source_guard_log>.size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0)
        guard let mapped, mapped != MAP_FAILED else { throw .current("mmap(source guard log)") }
        let reserved = mmap(nil, Self.recipeByteCountMax, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0)
        guard let reserved, reserved != MAP_FAILED else {
            let error = SyscallError.current("mmap(source guard recipes)")
            munmap(mapped, MemoryLayout<csys_source_guard_log>.size)
            throw error
        }
        recipes = reserved
        log = mapped.bindMemory(to: csys_source_guard_log.self, capacity: 1)
        log.pointee.victim = victim.rawValue
        log.pointee.phase = Int32(CSYS_SOURCE_GUARD_FROZEN)
        log.pointee.recipes = reserved.assumingMemoryBound(to: UInt8.self)
        log.pointee.recipeCapacity = UInt64(Self.recipeByteCountMax)
        log.pointee.addressRetryMilliseconds = Int32(clamping: addressRetry.components.seconds * 1000)
        var descriptor: Int32 = -1
        let child = csys_spawn_source_guard(log, &descriptor)
        guard child > 0 else {
            let error = SyscallError.current("fork(source guard)")
            munmap(mapped, MemoryLayout<csys_source_guard_log>.size)
            munmap(reserved, Self.recipeByteCountMax)
            throw error
        }
        victimProcessID = victim
        guardProcessID = ProcessID(child)
        controlDescriptor = descriptor
    }

    deinit {
        // Dropped without a word (the owner chose, in some failure path): nothing left to guard.
        release(word: UInt8(ascii: "D"))
        munmap(log, logByteCount)
        munmap(recipes, Self.recipeByteCountMax)
    }

    /// A loopback port about to be locked (Sys/NetworkLock.swift): a guard that lets the victim run on
    /// unlocks it. Recorded before the lock, so that one failing half-way is undone too.
    public func recordLockedPort(_ port: UInt16) {
        lock.withLock {
            let index = Int(log.pointee.lockedPortCount)
            precondition(index < Int(CSYS_SOURCE_GUARD_PORTS_MAX), "more locked ports than the guard's log holds")
            withUnsafeMutableBytes(of: &log.pointee.lockedPorts) { $0.bindMemory(to: UInt16.self)[index] = port }
            log.pointee.lockedPortCount = Int32(index + 1)
        }
    }

    /// The victim's TCP socket `descriptor`, read and about to be disconnected: `rebuild` makes it again
    /// what it was, `live` (a connection) ends its repair mode afterwards. False when the log is full
    /// (the caller refuses the checkpoint: a socket the guard cannot give back).
    public func recordTCPSocket(descriptor: Int32, isConnection: Bool, rebuild: TCPSocketRecipe, live: TCPSocketRecipe) -> Bool {
        lock.withLock {
            let index = Int(log.pointee.socketCount)
            let needed = rebuild.bytes.count + live.bytes.count
            guard index < Int(CSYS_SOURCE_GUARD_SOCKETS_MAX), recipeByteCount + needed <= Self.recipeByteCountMax else { return false }
            let rebuildOffset = recipeByteCount
            rebuild.bytes.withUnsafeBytes { if $0.count > 0 { recipes.advanced(by: rebuildOffset).copyMemory(from: $0.baseAddress!, byteCount: $0.count) } }
            let liveOffset = rebuildOffset + rebuild.bytes.count
            live.bytes.withUnsafeBytes { if $0.count > 0 { recipes.advanced(by: liveOffset).copyMemory(from: $0.baseAddress!, byteCount: $0.count) } }
            recipeByteCount = liveOffset + live.bytes.count
            withUnsafeMutableBytes(of: &log.pointee.sockets) { buffer in
                buffer.bindMemory(to: csys_source_guard_socket.self)[index] = csys_source_guard_socket(
                    descriptor: descriptor, isConnection: isConnection ? 1 : 0,
                    rebuildOffset: UInt64(rebuildOffset), rebuildByteCount: UInt64(rebuild.bytes.count),
                    liveOffset: UInt64(liveOffset), liveByteCount: UInt64(live.bytes.count))
            }
            log.pointee.socketCount = Int32(index + 1)
            return true
        }
    }

    /// A thread's registers and signal mask as they are before the tracer changes either.
    public func recordThread(_ threadID: ProcessID, registers: GeneralRegisters, signalMask: UInt64) {
        lock.withLock {
            let index = Int(log.pointee.threadCount)
            precondition(index < Int(CSYS_SOURCE_GUARD_THREADS_MAX), "more threads than the guard's log holds")
            withUnsafeMutableBytes(of: &log.pointee.threads) { buffer in
                let threads = buffer.bindMemory(to: csys_source_guard_thread.self)
                threads[index] = csys_source_guard_thread(threadID: threadID.rawValue, reserved: 0, signalMask: signalMask,
                                                          registers: registers.raw)
            }
            log.pointee.threadCount = Int32(index + 1)
        }
    }

    /// The victim's code at `address`, before the tracer writes its own there.
    public func recordCode(_ bytes: [UInt8], at address: UInt64) {
        precondition(bytes.count <= 16, "the guard's log keeps at most 16 bytes of code")
        lock.withLock {
            log.pointee.codeByteCount = 0
            withUnsafeMutableBytes(of: &log.pointee.code) { buffer in
                for (index, byte) in bytes.enumerated() { buffer[index] = byte }
            }
            log.pointee.codeAddress = address
            log.pointee.codeByteCount = Int32(bytes.count)
        }
    }

    /// A scratch mapping the tracer is about to make in the victim (unmapping a free range is harmless).
    public func recordScratch(address: UInt64, byteCount: UInt64) {
        lock.withLock {
            log.pointee.scratchAddress = address
            log.pointee.scratchByteCount = byteCount
        }
    }

    /// Everything recorded is back as it was.
    public func clearChanges() {
        lock.withLock {
            log.pointee.scratchByteCount = 0
            log.pointee.codeByteCount = 0
            log.pointee.threadCount = 0
        }
    }

    /// The victim is about to get its freeze's SIGSTOP: a guard that acts must send SIGCONT.
    public func willStopVictim() { lock.withLock { log.pointee.continueAfter = 1 } }

    /// The commit record is being stored (then: `committed`).
    public func committing() { lock.withLock { log.pointee.phase = Int32(CSYS_SOURCE_GUARD_COMMITTING) } }

    /// The image is complete: a guard that acts kills the victim.
    public func committed() { lock.withLock { log.pointee.phase = Int32(CSYS_SOURCE_GUARD_COMMITTED) } }

    /// Whether `committed` was said.
    public var isCommitted: Bool { lock.withLock { log.pointee.phase == Int32(CSYS_SOURCE_GUARD_COMMITTED) } }

    /// The tracer released the victim itself: the guard exits and touches nothing. Reaps it.
    public func disarm() { release(word: UInt8(ascii: "D")) }

    /// The guard acts now, as on its owner's death, and is reaped: what torture's nemesis does after it
    /// detached the victim as the kernel would for a dead tracer. Without `resume` the victim is left
    /// stopped (undone, detached, in its group-stop) instead of sent SIGCONT.
    public func actNow(resume: Bool = true) { release(word: UInt8(ascii: resume ? "A" : "S")) }

    private func release(word: UInt8) {
        guard let descriptor = lock.withLock({ () -> Int32? in
            defer { controlDescriptor = nil }
            return controlDescriptor
        }) else { return }
        _ = csys_source_guard_send(descriptor, CChar(bitPattern: word))
        _ = Glibc.close(descriptor)
        var status: Int32 = 0
        // Ends when the guard exits: at once on 'D'; after its work otherwise (its seizes are bounded).
        while waitpid(guardProcessID.rawValue, &status, 0) < 0 && errno == EINTR {}
    }
}
